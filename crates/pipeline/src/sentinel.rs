//! The sentinel: identifies the device behind a message and authenticates it against the device
//! registry before the message may be routed.
//!
//! Credentials found at connect time (query parameters, upgrade headers) are checked once and
//! bind the connection to a device ([`DeviceBinding`]); each later message only re-checks that
//! the bound key is still current and the device still enabled (a memory lookup), so key rotation
//! and disabling take effect at once. Credentials in the body are checked on every message with
//! one HMAC, and the key field is removed from the payload before anything else sees it.
//!
//! Connection tokens (the `token` method, [`crate::token`]) are checked only at connect time,
//! before the upgrade: a refused token is answered with HTTP 401, never with an open socket.

use std::sync::Arc;

use iotgate_core::credentials::{parse_basic, parse_sas, KeyDigest};
use iotgate_core::definition::{Locator, LocatorSource, SentinelDefinition, SentinelMethod};
use iotgate_core::envelope::remove_at_pointer;
use iotgate_core::Payload;
use prometheus_client::metrics::counter::Counter;
use serde_json::Value;

use crate::metrics::Metrics;
use crate::registry::{DeviceRegistry, RegisteredDevice};
use crate::rejection::{Rejection, RejectionCode};
use crate::token::TokenVerifier;

/// Query parameters and headers of the upgrade request, captured once at connect time.
#[derive(Debug, Default, Clone)]
pub struct ConnectionCredentials {
    pub query: Vec<(String, String)>,
    /// Header names lower-cased.
    pub headers: Vec<(String, String)>,
}

impl ConnectionCredentials {
    /// A connection token: the `access_token` query parameter (browsers cannot set headers on
    /// a WebSocket), else an `Authorization: Bearer` header.
    pub fn bearer_token(&self) -> Option<&str> {
        self.query
            .iter()
            .find(|(k, _)| k == "access_token")
            .map(|(_, v)| v.as_str())
            .or_else(|| {
                self.headers
                    .iter()
                    .find(|(k, _)| k.eq_ignore_ascii_case("authorization"))
                    .and_then(|(_, v)| {
                        let (scheme, token) = v.trim().split_once(' ')?;
                        scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
                    })
            })
            .filter(|t| !t.is_empty())
    }

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
    /// message so a rotated key stops working at once. `None` for a connection token, which no
    /// device key signs: rotating a device key leaves it open.
    pub key_digest: Option<KeyDigest>,
    /// When the credential stops being valid (a signed token's expiry), in UNIX seconds.
    pub expires_at: Option<u64>,
    /// Bound by a connection token: the connection ends when `expires_at` passes (1008
    /// `token_expired`). A shared-access signature instead has its next message refused.
    pub closes_at_expiry: bool,
    /// Azure Web PubSub roles the token granted (`webpubsub.joinLeaveGroup`,
    /// `webpubsub.sendToGroup`, or their `.<group>` forms); see [`crate::token::permits`].
    pub roles: Arc<[String]>,
    /// Groups the token asked to join at connect (`webpubsub.group`).
    pub groups: Arc<[String]>,
}

impl DeviceBinding {
    /// A binding by a device key (access key, Basic credential or shared-access signature).
    fn by_key(device_id: Arc<str>, key_digest: KeyDigest, expires_at: Option<u64>) -> Self {
        Self {
            device_id,
            key_digest: Some(key_digest),
            expires_at,
            closes_at_expiry: false,
            roles: Arc::from(Vec::new()),
            groups: Arc::from(Vec::new()),
        }
    }
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
    /// The token method's verifier; `None` for the other methods.
    tokens: Option<TokenVerifier>,
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

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
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
            // For basic and sas, one locator carries both; the "device id locator" is the same.
            SentinelMethod::Basic | SentinelMethod::Sas => (
                definition.credential_locator(),
                definition.credential_locator(),
            ),
            // Tokens come from the access_token query parameter or an Authorization header;
            // the locators are not used.
            SentinelMethod::Token => (
                Locator::header("authorization"),
                Locator::header("authorization"),
            ),
        };
        let key: Arc<str> = Arc::from(definition.key.as_str());
        Self {
            authenticated: metrics.authenticated(&key),
            method: definition.method,
            tokens: None,
            device_id_locator,
            secret_locator,
            key,
            definition,
            metrics,
        }
    }

    /// A token sentinel with its verifier (see [`TokenVerifier::new`]).
    pub fn with_tokens(mut self, verifier: TokenVerifier) -> Self {
        self.tokens = Some(verifier);
        self
    }

    /// True when refusals are answered before the upgrade (HTTP 401), not on an open socket.
    pub fn refuses_before_upgrade(&self) -> bool {
        self.method == SentinelMethod::Token
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
            SentinelMethod::Sas => {
                if self.secret_locator.from != LocatorSource::Body {
                    let Some(raw) = request.find(&self.secret_locator) else {
                        return Err(self.rejected(Rejection::new(
                            RejectionCode::MissingCredentials,
                            "the connection request carries no shared-access signature",
                        )));
                    };
                    let (device, digest, expires_at) = self
                        .verify_sas(registry, raw)
                        .map_err(|r| self.rejected(r))?;
                    return Ok((
                        Some(DeviceBinding::by_key(
                            device.device_id.clone(),
                            digest,
                            Some(expires_at),
                        )),
                        ConnectTimeValues::default(),
                    ));
                }
            }
            SentinelMethod::Token => {
                let binding = self
                    .verify_token(registry, request)
                    .map_err(|r| self.rejected(r))?;
                return Ok((Some(binding), ConnectTimeValues::default()));
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
            Some(DeviceBinding::by_key(
                device.device_id.clone(),
                digest,
                None,
            )),
            ConnectTimeValues::default(),
        ))
    }

    /// The token method: the token from `access_token` or an `Authorization: Bearer` header,
    /// verified, and its device known and enabled.
    fn verify_token(
        &self,
        registry: &DeviceRegistry,
        request: &ConnectionCredentials,
    ) -> Result<DeviceBinding, Rejection> {
        let Some(raw) = request.bearer_token() else {
            return Err(Rejection::new(
                RejectionCode::MissingToken,
                "the connection request carries no token: give access_token=... or Authorization: Bearer ...",
            ));
        };
        let Some(verifier) = &self.tokens else {
            return Err(Rejection::new(
                RejectionCode::SentinelUnavailable,
                "the sentinel's token keys are not loaded",
            ));
        };
        let token = verifier.verify(raw)?;
        let Some(device) = registry.get(&token.device_id) else {
            return Err(Rejection::new(
                RejectionCode::UnknownDevice,
                "no device is registered with the token's sub",
            )
            .claimed_by(&token.device_id));
        };
        if !device.enabled {
            return Err(
                Rejection::new(RejectionCode::DeviceDisabled, "the device is disabled")
                    .claimed_by(&token.device_id),
            );
        }
        Ok(DeviceBinding {
            device_id: device.device_id.clone(),
            key_digest: None,
            expires_at: Some(token.expires_at),
            closes_at_expiry: true,
            roles: token.roles,
            groups: token.groups,
        })
    }

    /// Per-message step: identifies and authenticates, removing the credential from the body.
    /// Returns the device and the digest of the key it used.
    pub fn authenticate_message(
        &self,
        registry: &DeviceRegistry,
        binding: Option<&DeviceBinding>,
        connect_values: &ConnectTimeValues,
        payload: &mut Payload,
    ) -> Result<(Arc<RegisteredDevice>, Option<KeyDigest>), Rejection> {
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
    ) -> Result<(Arc<RegisteredDevice>, Option<KeyDigest>), Rejection> {
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
            if binding
                .key_digest
                .is_some_and(|digest| !device.holds_digest(&digest))
            {
                return Err(Rejection::new(
                    RejectionCode::InvalidKey,
                    "the access key of this connection was replaced",
                )
                .claimed_by(&binding.device_id));
            }
            if binding.expires_at.is_some_and(|at| unix_now() >= at) {
                return Err(Rejection::new(
                    RejectionCode::TokenExpired,
                    "the signature this connection was opened with has expired; reconnect with a new one",
                )
                .claimed_by(&binding.device_id));
            }
            return Ok((device, binding.key_digest));
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

        if self.method == SentinelMethod::Token {
            return Err(Rejection::new(
                RejectionCode::MissingToken,
                "this connection was not opened with a token",
            ));
        }
        if self.method == SentinelMethod::Sas {
            let Some(raw) = body_secret else {
                return Err(Rejection::new(
                    RejectionCode::MissingCredentials,
                    "the message does not carry a shared-access signature",
                ));
            };
            return self
                .verify_sas(registry, &raw)
                .map(|(device, digest, _)| (device, Some(digest)));
        }
        let (device_id, secret) = match self.method {
            SentinelMethod::Sas | SentinelMethod::Token => unreachable!("handled above"),
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
            .map(|(device, digest)| (device, Some(digest)))
            .map_err(|rejection| rejection.claimed_by(&device_id))
    }

    /// Checks a shared-access signature: well formed, not expired, for this sentinel's resource
    /// (which names the device), and signed with one of the device's keys. Returns the device,
    /// the digest of the key that signed it, and the expiry.
    fn verify_sas(
        &self,
        registry: &DeviceRegistry,
        raw: &str,
    ) -> Result<(Arc<RegisteredDevice>, KeyDigest, u64), Rejection> {
        let token = parse_sas(raw).ok_or_else(|| {
            Rejection::new(
                RejectionCode::InvalidToken,
                "not a shared-access signature (SharedAccessSignature sr=...&sig=...&se=...)",
            )
        })?;
        let template = self.definition.sas_resource();
        let (prefix, suffix) = template.split_once("{deviceId}").unwrap_or((template, ""));
        let device_id = token
            .resource
            .strip_prefix(prefix)
            .and_then(|rest| rest.strip_suffix(suffix))
            .filter(|id| !id.is_empty())
            .ok_or_else(|| {
                Rejection::new(
                    RejectionCode::InvalidToken,
                    format!("the signature names another resource; expected {template}"),
                )
            })?
            .to_owned();
        if unix_now() >= token.expiry {
            return Err(Rejection::new(
                RejectionCode::TokenExpired,
                "the shared-access signature has expired",
            )
            .claimed_by(&device_id));
        }
        let (device, digest) = registry
            .authenticate_sas(&device_id, &token)
            .map_err(|r| r.claimed_by(&device_id))?;
        Ok((device, digest, token.expiry))
    }

    fn rejected(&self, rejection: Rejection) -> Rejection {
        self.metrics.rejected(&self.key, rejection.code).inc();
        rejection
    }
}
