//! The sentinel: identifies the device behind a message and authenticates it against the device
//! registry before the message may be routed.
//!
//! Credentials found at connect time (query parameters, upgrade headers) are checked once and
//! bind the connection to a device ([`DeviceBinding`]); each later message only re-checks that
//! the bound key is still current and the device still enabled (a memory lookup), so key rotation
//! and disabling take effect at once. Credentials in the body are checked on every message with
//! one HMAC, and the key field is removed from the payload before anything else sees it.

use std::sync::Arc;

use iotgate_core::credentials::{parse_basic, KeyDigest};
use iotgate_core::definition::{Locator, LocatorSource, SentinelDefinition, SentinelMethod};
use iotgate_core::envelope::remove_at_pointer;
use iotgate_core::Payload;
use prometheus_client::metrics::counter::Counter;
use serde_json::Value;

use crate::metrics::Metrics;
use crate::registry::{DeviceRegistry, RegisteredDevice};
use crate::rejection::{Rejection, RejectionCode};

/// Query parameters and headers of the upgrade request, captured once at connect time.
#[derive(Debug, Default, Clone)]
pub struct ConnectionCredentials {
    pub query: Vec<(String, String)>,
    /// Header names lower-cased.
    pub headers: Vec<(String, String)>,
}

impl ConnectionCredentials {
    fn find(&self, locator: &Locator) -> Option<&str> {
        let name = locator.name.as_deref()?;
        match locator.from {
            LocatorSource::Query => self
                .query
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.as_str()),
            LocatorSource::Header => self
                .headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.as_str()),
            LocatorSource::Body => None,
        }
    }
}

/// A connection bound to a device by credentials checked at connect time.
#[derive(Debug, Clone)]
pub struct DeviceBinding {
    pub device_id: Arc<str>,
    /// The digest of the key presented at connect time, re-checked against the registry on each
    /// message so a rotated key stops working at once.
    pub key_digest: KeyDigest,
}

/// Values resolved at connect time for locators that point outside the body.
#[derive(Debug, Default, Clone)]
pub struct ConnectTimeValues {
    device_id: Option<String>,
    secret: Option<String>,
}

pub struct Sentinel {
    pub definition: SentinelDefinition,
    pub key: Arc<str>,
    method: SentinelMethod,
    device_id_locator: Locator,
    secret_locator: Locator,
    authenticated: Counter,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for Sentinel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sentinel").field("key", &self.key).finish()
    }
}

fn body_value<'a>(payload: &'a Payload, pointer: &str) -> Result<Option<&'a Value>, Rejection> {
    match payload {
        Payload::Json(value) => Ok(value.pointer(pointer)),
        _ => Err(Rejection::new(
            RejectionCode::MissingCredentials,
            "body credentials need a json listener",
        )),
    }
}

fn as_text(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

impl Sentinel {
    pub fn new(definition: SentinelDefinition, metrics: Arc<Metrics>) -> Self {
        let (device_id_locator, secret_locator) = match definition.method {
            SentinelMethod::AccessKey => (
                definition.device_id_locator(),
                definition.access_key_locator(),
            ),
            // For basic, one locator carries both; the "device id locator" is the same one.
            SentinelMethod::Basic => (
                definition.credential_locator(),
                definition.credential_locator(),
            ),
        };
        let key: Arc<str> = Arc::from(definition.key.as_str());
        Self {
            authenticated: metrics.authenticated(&key),
            method: definition.method,
            device_id_locator,
            secret_locator,
            key,
            definition,
            metrics,
        }
    }

    pub fn max_failures(&self) -> u32 {
        self.definition.max_failures
    }

    pub fn enabled(&self) -> bool {
        self.definition.enabled
    }

    /// True when every credential comes from the upgrade request.
    fn fully_connect_time(&self) -> bool {
        self.device_id_locator.from != LocatorSource::Body
            && self.secret_locator.from != LocatorSource::Body
    }

    /// Connect-time step. Returns the binding when all credentials are in the request, the
    /// partial values when some come later in the body, or the rejection.
    pub fn authenticate_connection(
        &self,
        registry: &DeviceRegistry,
        request: &ConnectionCredentials,
    ) -> Result<(Option<DeviceBinding>, ConnectTimeValues), Rejection> {
        let mut values = ConnectTimeValues::default();
        match self.method {
            SentinelMethod::AccessKey => {
                if self.device_id_locator.from != LocatorSource::Body {
                    values.device_id = request.find(&self.device_id_locator).map(str::to_owned);
                }
                if self.secret_locator.from != LocatorSource::Body {
                    values.secret = request.find(&self.secret_locator).map(str::to_owned);
                }
            }
            SentinelMethod::Basic => {
                if self.secret_locator.from != LocatorSource::Body {
                    if let Some(raw) = request.find(&self.secret_locator) {
                        let (id, key) = parse_basic(raw).ok_or_else(|| {
                            self.rejected(Rejection::new(
                                RejectionCode::MissingCredentials,
                                "the credential is not base64 of deviceId:key",
                            ))
                        })?;
                        values.device_id = Some(id);
                        values.secret = Some(key);
                    }
                }
            }
        }
        if !self.fully_connect_time() {
            return Ok((None, values));
        }
        let (Some(device_id), Some(secret)) = (&values.device_id, &values.secret) else {
            return Err(self.rejected(Rejection::new(
                RejectionCode::MissingCredentials,
                "the connection request carries no device credentials",
            )));
        };
        let (device, digest) = registry
            .authenticate(device_id, secret)
            .map_err(|r| self.rejected(r.claimed_by(device_id)))?;
        Ok((
            Some(DeviceBinding {
                device_id: device.device_id.clone(),
                key_digest: digest,
            }),
            ConnectTimeValues::default(),
        ))
    }

    /// Per-message step: identifies and authenticates, removing the credential from the body.
    pub fn authenticate_message(
        &self,
        registry: &DeviceRegistry,
        binding: Option<&DeviceBinding>,
        connect_values: &ConnectTimeValues,
        payload: &mut Payload,
    ) -> Result<Arc<RegisteredDevice>, Rejection> {
        let result = self.authenticate_message_inner(registry, binding, connect_values, payload);
        match result {
            Ok(device) => {
                self.authenticated.inc();
                Ok(device)
            }
            Err(rejection) => Err(self.rejected(rejection)),
        }
    }

    fn authenticate_message_inner(
        &self,
        registry: &DeviceRegistry,
        binding: Option<&DeviceBinding>,
        connect_values: &ConnectTimeValues,
        payload: &mut Payload,
    ) -> Result<Arc<RegisteredDevice>, Rejection> {
        if let Some(binding) = binding {
            let Some(device) = registry.get(&binding.device_id) else {
                return Err(Rejection::new(
                    RejectionCode::UnknownDevice,
                    "the device bound to this connection no longer exists",
                )
                .claimed_by(&binding.device_id));
            };
            if !device.enabled {
                return Err(Rejection::new(
                    RejectionCode::DeviceDisabled,
                    "the device is disabled",
                )
                .claimed_by(&binding.device_id));
            }
            if !device.holds_digest(&binding.key_digest) {
                return Err(Rejection::new(
                    RejectionCode::InvalidKey,
                    "the access key of this connection was replaced",
                )
                .claimed_by(&binding.device_id));
            }
            return Ok(device);
        }

        // Take the secret out of the body first, so that it is gone whatever happens next
        // (a rejected message is dead-lettered without it).
        let body_secret = if self.secret_locator.from == LocatorSource::Body {
            let pointer = self
                .secret_locator
                .pointer
                .as_deref()
                .unwrap_or("/accessKey");
            let secret = body_value(payload, pointer)?.and_then(as_text);
            if let Payload::Json(value) = payload {
                remove_at_pointer(value, pointer);
            }
            secret
        } else {
            None
        };

        let (device_id, secret) = match self.method {
            SentinelMethod::AccessKey => {
                let device_id = if self.device_id_locator.from == LocatorSource::Body {
                    let pointer = self
                        .device_id_locator
                        .pointer
                        .as_deref()
                        .unwrap_or("/deviceId");
                    body_value(payload, pointer)?.and_then(as_text)
                } else {
                    connect_values.device_id.clone()
                };
                let secret = body_secret.or_else(|| connect_values.secret.clone());
                (device_id, secret)
            }
            SentinelMethod::Basic => match body_secret {
                Some(raw) => match parse_basic(&raw) {
                    Some((id, key)) => (Some(id), Some(key)),
                    None => {
                        return Err(Rejection::new(
                            RejectionCode::MissingCredentials,
                            "the credential is not base64 of deviceId:key",
                        ))
                    }
                },
                None => (
                    connect_values.device_id.clone(),
                    connect_values.secret.clone(),
                ),
            },
        };
        let Some(device_id) = device_id else {
            return Err(Rejection::new(
                RejectionCode::MissingCredentials,
                "the message does not carry a device id",
            ));
        };
        let Some(secret) = secret else {
            return Err(Rejection::new(
                RejectionCode::MissingCredentials,
                "the message does not carry an access key",
            ));
        };
        registry
            .authenticate(&device_id, &secret)
            .map(|(device, _)| device)
            .map_err(|rejection| rejection.claimed_by(&device_id))
    }

    fn rejected(&self, rejection: Rejection) -> Rejection {
        self.metrics.rejected(&self.key, rejection.code).inc();
        rejection
    }
}
