//! Definition kinds: typed views of the stored, schema-validated JSON documents that describe one
//! module each. The schema says what a field may hold; `validate()` says what a schema cannot
//! (rules across fields), reporting every problem with its JSON pointer.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::compression_settings::CompressionSettings;
use crate::envelope::ContentType;
use crate::origin::OriginPattern;
use crate::schema::{Problem, SchemaRegistry};
use crate::websocket_settings::WebSocketSettings;

/// Paths on the main port that belong to iotgate itself and can never be a listener or a
/// subscriber path.
pub const RESERVED_PATH_PREFIXES: [&str; 4] = ["/api", "/healthz", "/metrics", "/assets"];

/// The four kinds of stored definitions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DefinitionKind {
    Listener,
    Sentinel,
    Route,
    Downstream,
}

impl DefinitionKind {
    pub const ALL: [DefinitionKind; 4] = [
        DefinitionKind::Sentinel,
        DefinitionKind::Downstream,
        DefinitionKind::Route,
        DefinitionKind::Listener,
    ];

    /// The schema file name (`schemas/<name>.json`) and the value stored in the database.
    pub fn schema_name(self) -> &'static str {
        match self {
            DefinitionKind::Listener => "listener",
            DefinitionKind::Sentinel => "sentinel",
            DefinitionKind::Route => "route",
            DefinitionKind::Downstream => "downstream",
        }
    }

    /// The REST collection name (`/api/v1/<collection>`).
    pub fn collection(self) -> &'static str {
        match self {
            DefinitionKind::Listener => "listeners",
            DefinitionKind::Sentinel => "sentinels",
            DefinitionKind::Route => "routes",
            DefinitionKind::Downstream => "downstreams",
        }
    }
}

impl std::fmt::Display for DefinitionKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.schema_name())
    }
}

fn default_true() -> bool {
    true
}
fn default_heartbeat() -> u32 {
    30
}
fn default_max_message_bytes() -> usize {
    64 * 1024
}
fn default_auth_timeout() -> u32 {
    30
}
fn default_max_failures() -> u32 {
    5
}
fn default_max_retries() -> u32 {
    5
}
fn default_timeout_ms() -> u64 {
    5000
}
fn default_batch_size() -> usize {
    512
}
fn default_queue_capacity() -> usize {
    10_000
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ListenerType {
    Websocket,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ListenerMode {
    Server,
    Client,
}

/// How a frame carries the message (Node-RED's websocket nodes send either).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum MessageMode {
    /// The frame is the payload.
    #[default]
    Payload,
    /// The frame is a whole message object: `payload` plus properties such as `topic`.
    Message,
}

/// What a listener promises a device about each message it accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum AcknowledgeMode {
    /// No acknowledgement; only refusals are answered.
    #[default]
    None,
    /// Acknowledged once the message passed the sentinel and sits in every routed downstream's
    /// queue.
    Accepted,
    /// Acknowledged once every durable downstream it was routed to has committed it.
    Stored,
}

impl AcknowledgeMode {
    pub fn as_str(self) -> &'static str {
        match self {
            AcknowledgeMode::None => "none",
            AcknowledgeMode::Accepted => "accepted",
            AcknowledgeMode::Stored => "stored",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MessageIdSource {
    /// A JSON pointer into the body (json listeners).
    Body,
    /// The connection's frame number (1, 2, 3, ...).
    Frame,
}

/// Where an acknowledging listener finds each message's id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MessageIdLocator {
    pub from: MessageIdSource,
    #[serde(default)]
    pub pointer: Option<String>,
}

/// The resolved rule a connection uses to name each message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MessageIdRule {
    Body { pointer: String },
    Frame,
}

/// Default number of unacknowledged messages per connection.
pub const DEFAULT_MAX_IN_FLIGHT: u32 = 64;
/// Default time within which a repeated (device, message id) is a duplicate.
pub const DEFAULT_DEDUP_WINDOW_SECONDS: u32 = 600;

/// `origin`: one string (as before lists existed) or a list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum OriginSetting {
    One(String),
    Many(Vec<String>),
}

impl OriginSetting {
    pub fn entries(&self) -> &[String] {
        match self {
            OriginSetting::One(one) => std::slice::from_ref(one),
            OriginSetting::Many(many) => many,
        }
    }
}

/// A WebSocket listener module.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ListenerDefinition {
    pub key: String,
    pub name: String,
    #[serde(default)]
    pub description: Option<String>,
    pub listener_type: ListenerType,
    pub mode: ListenerMode,
    pub content_type: ContentType,
    #[serde(default)]
    pub host_name: Option<String>,
    #[serde(default)]
    pub port: Option<u16>,
    #[serde(default)]
    pub secure: bool,
    #[serde(default)]
    pub tls_cert_file: Option<String>,
    #[serde(default)]
    pub tls_key_file: Option<String>,
    #[serde(default = "default_true")]
    pub anonymous: bool,
    #[serde(default)]
    pub user_name: Option<String>,
    /// Only present on a write; never stored in the document.
    #[serde(default, skip_serializing)]
    pub password: Option<String>,
    pub path: String,
    #[serde(default)]
    pub sub_protocol: Option<String>,
    /// Server: the allowed `Origin`s (exact or `https://*.domain`). Client: the one sent.
    #[serde(default)]
    pub origin: Option<OriginSetting>,
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Client mode: let a password or headers travel over plain `ws://`. Off by default, so a
    /// credential is never sent in clear by accident.
    #[serde(default)]
    pub allow_insecure_credentials: bool,
    /// Server mode with an own port: every connection starts with a PROXY protocol header (v1
    /// or v2) from a trusted load balancer, which names the real client address.
    #[serde(default)]
    pub proxy_protocol: bool,
    #[serde(default)]
    pub sentinel: Option<String>,
    #[serde(default = "default_heartbeat")]
    pub heartbeat_seconds: u32,
    #[serde(default = "default_max_message_bytes")]
    pub max_message_bytes: usize,
    /// Echo every received message back to its sender before it enters the pipeline.
    #[serde(default)]
    pub echo: bool,
    /// Whether a frame is the payload or a whole message object (json and msgpack listeners).
    #[serde(default)]
    pub message_mode: MessageMode,
    /// Seconds an unauthenticated connection behind a sentinel may stay open (0 = no deadline).
    #[serde(default = "default_auth_timeout")]
    pub auth_timeout_seconds: u32,
    /// What the listener tells a device about each message it accepts.
    #[serde(default)]
    pub acknowledge: AcknowledgeMode,
    /// Where an acknowledged message's id is found; see [`ListenerDefinition::message_id_rule`].
    #[serde(default)]
    pub message_id: Option<MessageIdLocator>,
    /// Unacknowledged messages a connection may have before the listener stops reading it.
    #[serde(default)]
    pub max_in_flight: Option<u32>,
    /// Seconds within which a repeated (device id, message id) is acknowledged as a duplicate
    /// instead of stored again (0 = no de-duplication).
    #[serde(default)]
    pub dedup_window_seconds: Option<u32>,
    /// What the frames on a connection mean: plain messages, or the Azure Web PubSub client
    /// protocol (groups, events, acks; `json.webpubsub.azure.v1` and its reliable form).
    #[serde(default)]
    pub protocol: ListenerProtocol,
    /// Web PubSub: messages devices send to a group also enter the pipeline (message type
    /// `sendToGroup`), besides reaching the group's members.
    #[serde(default)]
    pub route_group_messages: bool,
    /// Web PubSub reliable protocol: how long a dropped connection may be resumed (groups kept,
    /// missed messages replayed) before it ends.
    #[serde(default = "default_resume_window")]
    pub resume_window_seconds: u32,
    /// WebSocket transport settings (frame cap, handshake timeouts, auto-ping, idle timeout);
    /// read them through [`ListenerDefinition::websocket_settings`], which applies defaults.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub websocket: Option<WebSocketSettings>,
    /// permessage-deflate (RFC 7692); read it through
    /// [`ListenerDefinition::compression_settings`], which applies defaults.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compression: Option<CompressionSettings>,
    #[serde(default = "default_true")]
    pub enabled: bool,
}

/// The protocol spoken on a listener's connections.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ListenerProtocol {
    /// Each frame is one message (json, text, binary, msgpack per `contentType`).
    #[default]
    Plain,
    /// The Azure Web PubSub client protocol.
    Webpubsub,
}

fn default_resume_window() -> u32 {
    30
}

impl ListenerDefinition {
    /// True when the listener is served on the main port at `path` (server mode, no own port).
    pub fn is_path_mounted(&self) -> bool {
        self.mode == ListenerMode::Server && self.port.is_none()
    }

    /// How each message is named: the configured locator, else `/messageId` in the body for json
    /// listeners and the frame number for text and binary ones.
    pub fn message_id_rule(&self) -> MessageIdRule {
        match &self.message_id {
            Some(MessageIdLocator {
                from: MessageIdSource::Body,
                pointer: Some(pointer),
            }) => MessageIdRule::Body {
                pointer: pointer.clone(),
            },
            Some(MessageIdLocator {
                from: MessageIdSource::Frame,
                ..
            }) => MessageIdRule::Frame,
            _ if self.content_type.is_structured() => MessageIdRule::Body {
                pointer: "/messageId".to_owned(),
            },
            _ => MessageIdRule::Frame,
        }
    }

    /// The allowed origins, parsed (server mode); empty when any origin is accepted. Entries
    /// are validated on write, so one that does not parse here is skipped.
    pub fn origin_patterns(&self) -> Vec<OriginPattern> {
        self.origin
            .iter()
            .flat_map(OriginSetting::entries)
            .filter_map(|o| OriginPattern::parse(o).ok())
            .collect()
    }

    pub fn max_in_flight(&self) -> u32 {
        self.max_in_flight.unwrap_or(DEFAULT_MAX_IN_FLIGHT)
    }

    pub fn dedup_window_seconds(&self) -> u32 {
        self.dedup_window_seconds
            .unwrap_or(DEFAULT_DEDUP_WINDOW_SECONDS)
    }

    /// Rules across fields. `password_stored` says whether a password is already stored for this
    /// key, so an update may omit it.
    pub fn validate(&self, password_stored: bool) -> Vec<Problem> {
        let mut problems = Vec::new();
        self.validate_acknowledgement(&mut problems);
        if self.protocol == ListenerProtocol::Webpubsub {
            if self.mode != ListenerMode::Server {
                problems.push(Problem::new(
                    "/protocol",
                    "the Web PubSub protocol is served by server-mode listeners",
                ));
            }
            if self.content_type != ContentType::Json {
                problems.push(Problem::new(
                    "/contentType",
                    "a Web PubSub listener speaks JSON frames: contentType must be json",
                ));
            }
            if self.sentinel.is_none() {
                problems.push(Problem::new(
                    "/sentinel",
                    "a Web PubSub listener needs a sentinel that identifies the device at connect (method token, or credentials in the query or a header)",
                ));
            }
            if self.sub_protocol.is_some() {
                problems.push(Problem::new(
                    "/subProtocol",
                    "a Web PubSub listener negotiates json.webpubsub.azure.v1 or json.reliable.webpubsub.azure.v1 itself",
                ));
            }
            if self.message_mode == MessageMode::Message {
                problems.push(Problem::new(
                    "/messageMode",
                    "message mode does not apply to Web PubSub listeners: events carry their data",
                ));
            }
        } else if self.route_group_messages {
            problems.push(Problem::new(
                "/routeGroupMessages",
                "routeGroupMessages applies only to Web PubSub listeners (protocol webpubsub)",
            ));
        }
        self.validate_origins(&mut problems);
        if self.message_mode == MessageMode::Message && !self.content_type.is_structured() {
            problems.push(Problem::new(
                "/messageMode",
                "message mode needs a json or msgpack listener: the frame is an object with a payload",
            ));
        }
        if self.anonymous && self.sentinel.is_none() {
            problems.push(Problem::new(
                "/sentinel",
                "a sentinel is required when anonymous is true: it authenticates each device",
            ));
        }
        if !self.anonymous {
            if self.user_name.is_none() {
                problems.push(Problem::new(
                    "/userName",
                    "userName is required when anonymous is false",
                ));
            }
            if self.password.is_none() && !password_stored {
                problems.push(Problem::new(
                    "/password",
                    "password is required when anonymous is false",
                ));
            }
        } else {
            if self.user_name.is_some() {
                problems.push(Problem::new(
                    "/userName",
                    "userName applies only when anonymous is false",
                ));
            }
            if self.password.is_some() {
                problems.push(Problem::new(
                    "/password",
                    "password applies only when anonymous is false",
                ));
            }
        }
        match self.mode {
            ListenerMode::Server => {
                if !self.headers.is_empty() {
                    problems.push(Problem::new(
                        "/headers",
                        "headers apply only to client mode (they are sent with the upgrade request)",
                    ));
                }
                if self.secure {
                    if self.port.is_none() {
                        problems.push(Problem::new(
                            "/port",
                            "a secure server listener needs its own port; path-mounted listeners are served over TLS when iotgate runs with --tls-cert-file and --tls-key-file",
                        ));
                    }
                    if self.tls_cert_file.is_none() {
                        problems.push(Problem::new(
                            "/tlsCertFile",
                            "tlsCertFile is required when secure is true",
                        ));
                    }
                    if self.tls_key_file.is_none() {
                        problems.push(Problem::new(
                            "/tlsKeyFile",
                            "tlsKeyFile is required when secure is true",
                        ));
                    }
                } else {
                    for (pointer, value) in [
                        ("/tlsCertFile", &self.tls_cert_file),
                        ("/tlsKeyFile", &self.tls_key_file),
                    ] {
                        if value.is_some() {
                            problems.push(Problem::new(
                                pointer,
                                "TLS files apply only when secure is true",
                            ));
                        }
                    }
                }
                if self.path.contains('?') {
                    problems.push(Problem::new(
                        "/path",
                        "a server listener's path cannot carry a query string",
                    ));
                }
                if self.allow_insecure_credentials {
                    problems.push(Problem::new(
                        "/allowInsecureCredentials",
                        "allowInsecureCredentials applies only to client mode",
                    ));
                }
                if self.proxy_protocol && self.port.is_none() {
                    problems.push(Problem::new(
                        "/proxyProtocol",
                        "proxyProtocol needs an own port: the main port does not read PROXY headers",
                    ));
                }
                if self.port.is_none() {
                    if let Some(problem) = reserved_path_problem("/path", &self.path) {
                        problems.push(problem);
                    }
                    if self.host_name.is_some() {
                        problems.push(Problem::new(
                            "/hostName",
                            "hostName (the bind address) applies only with an own port",
                        ));
                    }
                }
            }
            ListenerMode::Client => {
                if self.host_name.is_none() {
                    problems.push(Problem::new(
                        "/hostName",
                        "hostName is required in client mode: the remote server to connect to",
                    ));
                }
                if self.port == Some(0) {
                    problems.push(Problem::new(
                        "/port",
                        "the remote port must be between 1 and 65535",
                    ));
                }
                for (pointer, value) in [
                    ("/tlsCertFile", &self.tls_cert_file),
                    ("/tlsKeyFile", &self.tls_key_file),
                ] {
                    if value.is_some() {
                        problems.push(Problem::new(
                            pointer,
                            "TLS files apply only to server mode; client mode uses secure for wss://",
                        ));
                    }
                }
                let sends_credentials = !self.anonymous || !self.headers.is_empty();
                if sends_credentials && !self.secure && !self.allow_insecure_credentials {
                    problems.push(Problem::new(
                        "/secure",
                        "a password or headers would travel in clear over ws://: set secure to true (wss://), or allowInsecureCredentials to true to accept that",
                    ));
                }
                if self.proxy_protocol {
                    problems.push(Problem::new(
                        "/proxyProtocol",
                        "proxyProtocol applies only to server mode",
                    ));
                }
            }
        }
        problems
    }
}

impl ListenerDefinition {
    fn validate_origins(&self, problems: &mut Vec<Problem>) {
        let Some(setting) = &self.origin else {
            return;
        };
        let list = matches!(setting, OriginSetting::Many(_));
        for (i, entry) in setting.entries().iter().enumerate() {
            let pointer = if list {
                format!("/origin/{i}")
            } else {
                "/origin".to_owned()
            };
            match OriginPattern::parse(entry) {
                Err(why) => problems.push(Problem::new(pointer, why)),
                Ok(pattern) if self.mode == ListenerMode::Client && pattern.is_wildcard() => {
                    problems.push(Problem::new(
                        pointer,
                        "client mode sends one Origin: a wildcard applies to server mode only",
                    ))
                }
                Ok(_) => {}
            }
        }
        if self.mode == ListenerMode::Client && setting.entries().len() > 1 {
            problems.push(Problem::new(
                "/origin",
                "client mode sends one Origin: give a single origin",
            ));
        }
    }

    fn validate_acknowledgement(&self, problems: &mut Vec<Problem>) {
        if self.acknowledge == AcknowledgeMode::None {
            for (pointer, given) in [
                ("/messageId", self.message_id.is_some()),
                ("/maxInFlight", self.max_in_flight.is_some()),
                ("/dedupWindowSeconds", self.dedup_window_seconds.is_some()),
            ] {
                if given {
                    problems.push(Problem::new(
                        pointer,
                        "applies only when acknowledge is accepted or stored",
                    ));
                }
            }
            return;
        }
        if let Some(locator) = &self.message_id {
            match locator.from {
                MessageIdSource::Body if !self.content_type.is_structured() => {
                    problems.push(Problem::new(
                        "/messageId/from",
                        "a body pointer needs a json or msgpack listener; text and binary listeners number their frames (from: frame)",
                    ))
                }
                MessageIdSource::Frame if locator.pointer.is_some() => problems.push(Problem::new(
                    "/messageId/pointer",
                    "pointer applies to from: body; frame numbers need none",
                )),
                _ => {}
            }
        }
    }
}

/// A path that would shadow iotgate's own endpoints.
pub fn reserved_path_problem(pointer: &str, path: &str) -> Option<Problem> {
    if path == "/" {
        return Some(Problem::new(
            pointer,
            "/ serves the admin UI; choose a path such as /devices",
        ));
    }
    RESERVED_PATH_PREFIXES
        .iter()
        .find(|prefix| path == **prefix || path.starts_with(&format!("{prefix}/")))
        .map(|prefix| Problem::new(pointer, format!("{prefix} is reserved for iotgate itself")))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum SentinelMethod {
    AccessKey,
    Basic,
    /// Shared-access signatures signed with the device's key (Azure IoT style).
    Sas,
    /// Connection tokens (JWT) naming the device in `sub`: signed with a secret the server
    /// generates (HS256), or by an issuer elsewhere whose public key is configured (RS256,
    /// ES256). Read from the `access_token` query parameter or an `Authorization: Bearer`
    /// header, and checked before the upgrade.
    Token,
}

/// The signature algorithm a token sentinel accepts; a token signed any other way is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum TokenAlgorithm {
    /// HMAC-SHA-256 with the sentinel's own secret, generated and kept by the server.
    #[default]
    HS256,
    /// RSASSA-PKCS1-v1_5 with SHA-256, verified with a configured public key.
    RS256,
    /// ECDSA on P-256 with SHA-256, verified with a configured public key.
    ES256,
}

impl TokenAlgorithm {
    /// The name a token's `alg` header carries.
    pub fn as_str(self) -> &'static str {
        match self {
            TokenAlgorithm::HS256 => "HS256",
            TokenAlgorithm::RS256 => "RS256",
            TokenAlgorithm::ES256 => "ES256",
        }
    }
}

/// Seconds of clock difference allowed when checking a token's `exp` and `nbf`, by default.
pub const DEFAULT_CLOCK_SKEW_SECONDS: u32 = 60;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LocatorSource {
    Body,
    Query,
    Header,
}

/// Where a credential is found: a JSON pointer into the body, or a query parameter or header of
/// the upgrade request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Locator {
    pub from: LocatorSource,
    #[serde(default)]
    pub pointer: Option<String>,
    #[serde(default)]
    pub name: Option<String>,
}

impl Locator {
    pub fn body(pointer: &str) -> Self {
        Self {
            from: LocatorSource::Body,
            pointer: Some(pointer.to_owned()),
            name: None,
        }
    }
    pub fn header(name: &str) -> Self {
        Self {
            from: LocatorSource::Header,
            pointer: None,
            name: Some(name.to_owned()),
        }
    }

    fn validate(&self, pointer: &str, problems: &mut Vec<Problem>) {
        match self.from {
            LocatorSource::Body if self.name.is_some() => problems.push(Problem::new(
                format!("{pointer}/name"),
                "name applies to query and header locators; body locators use pointer",
            )),
            LocatorSource::Query | LocatorSource::Header if self.pointer.is_some() => problems
                .push(Problem::new(
                    format!("{pointer}/pointer"),
                    "pointer applies to body locators; query and header locators use name",
                )),
            _ => {}
        }
    }
}

/// The sentinel module's definition.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SentinelDefinition {
    pub key: String,
    pub name: String,
    #[serde(default)]
    pub description: Option<String>,
    pub method: SentinelMethod,
    #[serde(default)]
    pub device_id: Option<Locator>,
    #[serde(default)]
    pub access_key: Option<Locator>,
    #[serde(default)]
    pub credential: Option<Locator>,
    /// sas: the resource a token names, with `{deviceId}` where the device's id stands.
    #[serde(default)]
    pub sas_resource: Option<String>,
    /// token: how tokens are signed (default HS256, with a secret the server generates).
    #[serde(default)]
    pub algorithm: Option<TokenAlgorithm>,
    /// token with RS256/ES256: a PEM file holding the issuer's public key.
    #[serde(default)]
    pub public_key_file: Option<String>,
    /// token with RS256/ES256: a JWKS file holding the issuer's public keys (by `kid`).
    #[serde(default)]
    pub jwks_file: Option<String>,
    /// token: the `aud` a token must name; absent, a token naming any audience is refused.
    #[serde(default)]
    pub audience: Option<String>,
    /// token: seconds of clock difference allowed on `exp` and `nbf` (default 60).
    #[serde(default)]
    pub clock_skew_seconds: Option<u32>,
    /// Per-device message rate limit; absent = unlimited.
    #[serde(default)]
    pub device_messages_per_second: Option<u32>,
    #[serde(default = "default_max_failures")]
    pub max_failures: u32,
    #[serde(default = "default_true")]
    pub enabled: bool,
}

impl SentinelDefinition {
    pub fn device_id_locator(&self) -> Locator {
        self.device_id
            .clone()
            .unwrap_or_else(|| Locator::body("/deviceId"))
    }
    pub fn access_key_locator(&self) -> Locator {
        self.access_key
            .clone()
            .unwrap_or_else(|| Locator::body("/accessKey"))
    }
    pub fn credential_locator(&self) -> Locator {
        self.credential
            .clone()
            .unwrap_or_else(|| Locator::header("authorization"))
    }

    /// The sas resource template (default `devices/{deviceId}`).
    pub fn sas_resource(&self) -> &str {
        self.sas_resource.as_deref().unwrap_or("devices/{deviceId}")
    }

    /// The token algorithm (default HS256).
    pub fn token_algorithm(&self) -> TokenAlgorithm {
        self.algorithm.unwrap_or_default()
    }

    /// True for a token sentinel whose secret the server generates and signs with (HS256).
    pub fn uses_generated_secret(&self) -> bool {
        self.method == SentinelMethod::Token && self.token_algorithm() == TokenAlgorithm::HS256
    }

    pub fn clock_skew_seconds(&self) -> u32 {
        self.clock_skew_seconds
            .unwrap_or(DEFAULT_CLOCK_SKEW_SECONDS)
    }

    fn validate_token_fields(&self, problems: &mut Vec<Problem>) {
        let token_fields: [(&str, bool); 5] = [
            ("/algorithm", self.algorithm.is_some()),
            ("/publicKeyFile", self.public_key_file.is_some()),
            ("/jwksFile", self.jwks_file.is_some()),
            ("/audience", self.audience.is_some()),
            ("/clockSkewSeconds", self.clock_skew_seconds.is_some()),
        ];
        if self.method != SentinelMethod::Token {
            for (pointer, present) in token_fields {
                if present {
                    problems.push(Problem::new(pointer, "applies to the token method only"));
                }
            }
            return;
        }
        for (pointer, present) in [
            ("/deviceId", self.device_id.is_some()),
            ("/accessKey", self.access_key.is_some()),
            ("/credential", self.credential.is_some()),
        ] {
            if present {
                problems.push(Problem::new(
                    pointer,
                    "the token method reads the access_token query parameter or an Authorization: Bearer header",
                ));
            }
        }
        match self.token_algorithm() {
            TokenAlgorithm::HS256 => {
                for (pointer, present) in [
                    ("/publicKeyFile", self.public_key_file.is_some()),
                    ("/jwksFile", self.jwks_file.is_some()),
                ] {
                    if present {
                        problems.push(Problem::new(
                            pointer,
                            "HS256 tokens are signed with the sentinel's generated secret; a public key applies to RS256 and ES256",
                        ));
                    }
                }
            }
            TokenAlgorithm::RS256 | TokenAlgorithm::ES256 => {
                match (&self.public_key_file, &self.jwks_file) {
                    (Some(_), Some(_)) => problems.push(Problem::new(
                        "/jwksFile",
                        "give either publicKeyFile or jwksFile, not both",
                    )),
                    (None, None) => problems.push(Problem::new(
                        "/publicKeyFile",
                        "RS256 and ES256 tokens are verified with the issuer's public key: give publicKeyFile (PEM) or jwksFile (JWKS)",
                    )),
                    _ => {}
                }
            }
        }
    }

    pub fn validate(&self) -> Vec<Problem> {
        let mut problems = Vec::new();
        self.validate_token_fields(&mut problems);
        if self.method != SentinelMethod::Sas && self.sas_resource.is_some() {
            problems.push(Problem::new(
                "/sasResource",
                "applies to the sas method only",
            ));
        }
        if let Some(resource) = &self.sas_resource {
            if resource.matches("{deviceId}").count() != 1 {
                problems.push(Problem::new(
                    "/sasResource",
                    "the resource must contain {deviceId} exactly once, as in devices/{deviceId}",
                ));
            }
        }
        match self.method {
            SentinelMethod::AccessKey => {
                if self.credential.is_some() {
                    problems.push(Problem::new(
                        "/credential",
                        "credential applies to the basic method; accessKey uses deviceId and accessKey",
                    ));
                }
            }
            // Reported by validate_token_fields.
            SentinelMethod::Token => {}
            SentinelMethod::Basic | SentinelMethod::Sas => {
                for (pointer, value) in [
                    ("/deviceId", &self.device_id),
                    ("/accessKey", &self.access_key),
                ] {
                    if value.is_some() {
                        problems.push(Problem::new(
                            pointer,
                            "applies to the accessKey method; basic and sas use credential",
                        ));
                    }
                }
            }
        }
        for (pointer, locator) in [
            ("/deviceId", &self.device_id),
            ("/accessKey", &self.access_key),
            ("/credential", &self.credential),
        ] {
            if let Some(locator) = locator {
                locator.validate(pointer, &mut problems);
            }
        }
        problems
    }
}

/// Message-type selector: the payload value at `pointer` must be one of `values`; without a
/// pointer, the envelope's own message type (a Web PubSub event name, `$connected`, ...) must.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MessageTypeSelector {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pointer: Option<String>,
    pub values: Vec<Value>,
}

/// How an envelope's device is known, for route selection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceIdentity {
    /// A sentinel authenticated the device.
    Authenticated,
    /// The message names a device on a listener without a sentinel.
    Claimed,
}

/// A route: selectors (each optional) and the downstream modules matching envelopes go to.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RouteDefinition {
    pub key: String,
    pub name: String,
    #[serde(default)]
    pub description: Option<String>,
    #[serde(default)]
    pub listeners: Option<Vec<String>>,
    #[serde(default)]
    pub device_types: Option<Vec<String>>,
    #[serde(default)]
    pub device_ids: Option<Vec<String>>,
    #[serde(default)]
    pub message_type: Option<MessageTypeSelector>,
    /// Only envelopes whose device a sentinel authenticated, or only those that merely claim a
    /// device (listeners without a sentinel); absent: both.
    #[serde(default)]
    pub device_identity: Option<DeviceIdentity>,
    pub downstreams: Vec<String>,
    #[serde(default = "default_true")]
    pub enabled: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DownstreamType {
    Store,
    Websocket,
    Webhook,
    /// Publishes to NATS (JetStream with publish acks, or core NATS).
    Nats,
    /// Publishes to an MQTT 3.1.1 broker.
    Mqtt,
    /// Connects out to a WebSocket server and sends each envelope as a frame.
    #[serde(rename = "websocket-client")]
    WebsocketClient,
    /// Sends each routed message to device connections: back to the sender, a group, a
    /// listener's connections or the message's device.
    Devices,
}

/// Which device connections a `devices` downstream sends each routed message to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceTarget {
    /// The connection the message came from (a reply to the session).
    Sender,
    /// The members of `group` on the message's listener (or the given `listener`).
    Group,
    /// Every connection of the message's listener (or the given `listener`).
    Listener,
    /// Every connection of the message's device (on the given `listener` only, when set).
    Device,
}

impl DownstreamType {
    pub fn as_str(self) -> &'static str {
        match self {
            DownstreamType::Store => "store",
            DownstreamType::Websocket => "websocket",
            DownstreamType::Webhook => "webhook",
            DownstreamType::Nats => "nats",
            DownstreamType::Mqtt => "mqtt",
            DownstreamType::WebsocketClient => "websocket-client",
            DownstreamType::Devices => "devices",
        }
    }
}

/// The placeholders a `subject` or `topic` template may use.
pub const TEMPLATE_PLACEHOLDERS: [&str; 3] = ["listenerKey", "deviceId", "deviceType"];

/// One part of a parsed subject or topic template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TemplatePart {
    Literal(String),
    /// One of [`TEMPLATE_PLACEHOLDERS`].
    Placeholder(&'static str),
}

/// Splits a `{placeholder}` template; the message names what is wrong.
pub fn parse_template(template: &str) -> Result<Vec<TemplatePart>, String> {
    let mut parts = Vec::new();
    let mut rest = template;
    while let Some(open) = rest.find(['{', '}']) {
        if rest.as_bytes()[open] == b'}' {
            return Err(format!(
                "unbalanced }} at character {}",
                template.len() - rest.len() + open + 1
            ));
        }
        if open > 0 {
            parts.push(TemplatePart::Literal(rest[..open].to_owned()));
        }
        let after = &rest[open + 1..];
        let close = after
            .find('}')
            .ok_or_else(|| "a { is not closed by }".to_owned())?;
        let name = &after[..close];
        let known = TEMPLATE_PLACEHOLDERS
            .iter()
            .find(|p| **p == name)
            .ok_or_else(|| {
                format!(
                    "unknown placeholder {{{name}}}; use {}",
                    TEMPLATE_PLACEHOLDERS
                        .iter()
                        .map(|p| format!("{{{p}}}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            })?;
        parts.push(TemplatePart::Placeholder(known));
        rest = &after[close + 1..];
    }
    if !rest.is_empty() {
        parts.push(TemplatePart::Literal(rest.to_owned()));
    }
    Ok(parts)
}

/// The default `subject` of a nats downstream.
pub const DEFAULT_NATS_SUBJECT: &str = "iotgate.{listenerKey}.{deviceId}";
/// The default `topic` of an mqtt downstream.
pub const DEFAULT_MQTT_TOPIC: &str = "iotgate/{listenerKey}/{deviceId}";

/// What a downstream that sends frames sends for each envelope.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum SubscriberFormat {
    /// The payload alone, as JSON text.
    Payload,
    /// The whole envelope as JSON text.
    #[default]
    Envelope,
    /// Node-RED's whole message: `{"payload", "topic", "_msgid", ...}` as JSON text.
    Message,
    /// The whole envelope as MessagePack, in binary frames.
    Msgpack,
}

/// A downstream module (sink).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DownstreamDefinition {
    pub key: String,
    pub name: String,
    #[serde(default)]
    pub description: Option<String>,
    #[serde(rename = "type")]
    pub downstream_type: DownstreamType,
    #[serde(default)]
    pub path: Option<String>,
    #[serde(default)]
    pub format: SubscriberFormat,
    #[serde(default)]
    pub url: Option<String>,
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    #[serde(default = "default_max_retries")]
    pub max_retries: u32,
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    #[serde(default = "default_queue_capacity")]
    pub queue_capacity: usize,
    /// store: telemetry rows older than this are deleted in the background.
    #[serde(default)]
    pub retention_hours: Option<u32>,
    /// store: the newest rows kept; older ones are deleted in the background.
    #[serde(default)]
    pub max_rows: Option<u64>,
    /// nats, mqtt, websocket-client: the user name sent to the broker or server.
    #[serde(default)]
    pub user_name: Option<String>,
    /// nats, mqtt, websocket-client: sealed at rest, never returned; in clear at runtime.
    #[serde(default)]
    pub password: Option<String>,
    /// nats: an authentication token (instead of userName/password); sealed like a password.
    #[serde(default)]
    pub token: Option<String>,
    /// nats: subject template.
    #[serde(default)]
    pub subject: Option<String>,
    /// nats: publish through JetStream and wait for its publish acknowledgement.
    #[serde(default = "default_true")]
    pub jet_stream: bool,
    /// nats: a stream to create when missing, capturing the subject template's subjects.
    #[serde(default)]
    pub stream: Option<String>,
    /// mqtt: the client id (default `iotgate-<key>`).
    #[serde(default)]
    pub client_id: Option<String>,
    /// mqtt: topic template.
    #[serde(default)]
    pub topic: Option<String>,
    /// mqtt: 0 or 1.
    #[serde(default = "default_qos")]
    pub qos: u8,
    /// mqtt: the retain flag of every publish.
    #[serde(default)]
    pub retain: bool,
    /// websocket-client: the subprotocol asked for.
    #[serde(default)]
    pub sub_protocol: Option<String>,
    /// websocket-client: the Origin header sent.
    #[serde(default)]
    pub origin: Option<String>,
    /// devices: which connections each message goes to.
    #[serde(default)]
    pub target: Option<DeviceTarget>,
    /// devices with target group: the group's name.
    #[serde(default)]
    pub group: Option<String>,
    /// devices: the listener whose connections are addressed instead of the message's own.
    #[serde(default)]
    pub listener: Option<String>,
    #[serde(default = "default_true")]
    pub enabled: bool,
}

fn default_qos() -> u8 {
    1
}

impl DownstreamDefinition {
    /// True for modules that commit what they receive (the store's transaction, a webhook's 2xx):
    /// listeners with `acknowledge: stored` wait for them.
    pub fn is_durable(&self) -> bool {
        match self.downstream_type {
            DownstreamType::Store | DownstreamType::Webhook => true,
            // JetStream's publish acknowledgement and MQTT's PUBACK say the broker has it.
            DownstreamType::Nats => self.jet_stream,
            DownstreamType::Mqtt => self.qos >= 1,
            DownstreamType::Websocket
            | DownstreamType::WebsocketClient
            | DownstreamType::Devices => false,
        }
    }

    /// The subject (nats) or topic (mqtt) template in force.
    pub fn address_template(&self) -> &str {
        match self.downstream_type {
            DownstreamType::Nats => self.subject.as_deref().unwrap_or(DEFAULT_NATS_SUBJECT),
            DownstreamType::Mqtt => self.topic.as_deref().unwrap_or(DEFAULT_MQTT_TOPIC),
            _ => "",
        }
    }

    pub fn validate(&self, document: &Value) -> Vec<Problem> {
        let mut problems = Vec::new();
        let applies: &[&str] = match self.downstream_type {
            DownstreamType::Store => &["batchSize", "timeoutMs", "retentionHours", "maxRows"],
            DownstreamType::Websocket => &["path", "format"],
            DownstreamType::Webhook => &["url", "headers", "maxRetries", "timeoutMs"],
            DownstreamType::Nats => &[
                "url",
                "format",
                "maxRetries",
                "timeoutMs",
                "userName",
                "password",
                "token",
                "subject",
                "jetStream",
                "stream",
            ],
            DownstreamType::Mqtt => &[
                "url",
                "format",
                "maxRetries",
                "timeoutMs",
                "userName",
                "password",
                "clientId",
                "topic",
                "qos",
                "retain",
            ],
            DownstreamType::WebsocketClient => &[
                "url",
                "format",
                "headers",
                "userName",
                "password",
                "subProtocol",
                "origin",
            ],
            DownstreamType::Devices => &["format", "target", "group", "listener"],
        };
        for field in [
            "path",
            "format",
            "url",
            "headers",
            "maxRetries",
            "timeoutMs",
            "batchSize",
            "retentionHours",
            "maxRows",
            "userName",
            "password",
            "token",
            "subject",
            "jetStream",
            "stream",
            "clientId",
            "topic",
            "qos",
            "retain",
            "subProtocol",
            "origin",
            "target",
            "group",
            "listener",
        ] {
            if document.get(field).is_some() && !applies.contains(&field) {
                problems.push(Problem::new(
                    format!("/{field}"),
                    format!(
                        "{field} does not apply to a {} downstream",
                        serde_json::to_value(self.downstream_type)
                            .ok()
                            .and_then(|v| v.as_str().map(str::to_owned))
                            .unwrap_or_default()
                    ),
                ));
            }
        }
        if let Some(path) = &self.path {
            if let Some(problem) = reserved_path_problem("/path", path) {
                problems.push(problem);
            }
        }
        self.validate_devices(&mut problems);
        self.validate_broker(document, &mut problems);
        problems
    }

    /// The rules of the devices type that a schema cannot say.
    fn validate_devices(&self, problems: &mut Vec<Problem>) {
        if self.downstream_type != DownstreamType::Devices {
            return;
        }
        if !matches!(
            self.format,
            SubscriberFormat::Payload | SubscriberFormat::Envelope
        ) {
            problems.push(Problem::new(
                "/format",
                "a devices downstream sends the payload or the envelope",
            ));
        }
        match self.target {
            None => problems.push(Problem::new(
                "/target",
                "a devices downstream needs a target: sender, group, listener or device",
            )),
            Some(DeviceTarget::Group) if self.group.is_none() => {
                problems.push(Problem::new("/group", "target group needs a group name"))
            }
            Some(DeviceTarget::Sender) if self.listener.is_some() => problems.push(Problem::new(
                "/listener",
                "target sender answers on the sender's own connection; listener does not apply",
            )),
            Some(target) if target != DeviceTarget::Group && self.group.is_some() => {
                problems.push(Problem::new("/group", "group applies to target group only"))
            }
            Some(_) => {}
        }
    }

    /// The rules of the nats, mqtt and websocket-client types that a schema cannot say.
    fn validate_broker(&self, document: &Value, problems: &mut Vec<Problem>) {
        let kind = self.downstream_type;
        if !matches!(
            kind,
            DownstreamType::Nats | DownstreamType::Mqtt | DownstreamType::WebsocketClient
        ) {
            return;
        }
        // A password stored earlier arrives here as the runtime value, so "given" means a
        // non-empty value after the placeholder was resolved.
        let has_password = self.password.as_deref().is_some_and(|p| !p.is_empty());
        let has_user = self.user_name.as_deref().is_some_and(|u| !u.is_empty());
        if has_user && !has_password && document.get("userName").is_some() {
            problems.push(Problem::new(
                "/password",
                "a userName needs a password (send it; null keeps a stored one)",
            ));
        }
        if has_password && !has_user {
            problems.push(Problem::new("/userName", "a password needs a userName"));
        }
        if self.token.as_deref().is_some_and(|t| !t.is_empty()) && has_user {
            problems.push(Problem::new(
                "/token",
                "use either token or userName/password, not both",
            ));
        }
        if kind == DownstreamType::Nats && !self.jet_stream && self.stream.is_some() {
            problems.push(Problem::new(
                "/stream",
                "stream needs jetStream: true (core NATS has no streams)",
            ));
        }
        if kind == DownstreamType::Mqtt && self.qos > 1 {
            problems.push(Problem::new("/qos", "qos is 0 or 1"));
        }
        if let Some(url) = &self.url {
            let schemes: &[&str] = match kind {
                DownstreamType::Nats => &["nats", "tls"],
                DownstreamType::Mqtt => &["mqtt", "mqtts"],
                _ => &["ws", "wss"],
            };
            let wrong_scheme = || {
                Problem::new(
                    "/url",
                    format!(
                        "a {} downstream connects to a {} URL",
                        kind.as_str(),
                        schemes
                            .iter()
                            .map(|s| format!("{s}://"))
                            .collect::<Vec<_>>()
                            .join(" or ")
                    ),
                )
            };
            match url::Url::parse(url) {
                Ok(parsed) if schemes.contains(&parsed.scheme()) => {
                    if parsed.host_str().is_none_or(str::is_empty) {
                        problems.push(Problem::new("/url", "the URL names no host"));
                    } else if parsed.port() == Some(0) {
                        problems.push(Problem::new("/url", "port 0 is not a port to connect to"));
                    }
                    if !parsed.username().is_empty() || parsed.password().is_some() {
                        problems.push(Problem::new(
                            "/url",
                            "put credentials in userName/password (sealed at rest), not in the URL",
                        ));
                    }
                }
                Ok(_) => problems.push(wrong_scheme()),
                Err(error) => {
                    if url.contains("://")
                        && schemes.iter().any(|s| url.starts_with(&format!("{s}://")))
                    {
                        problems.push(Problem::new("/url", format!("not a valid URL: {error}")));
                    } else {
                        problems.push(wrong_scheme());
                    }
                }
            }
        }
        let (field, template) = match kind {
            DownstreamType::Nats => ("subject", self.address_template()),
            DownstreamType::Mqtt => ("topic", self.address_template()),
            _ => return,
        };
        let pointer = format!("/{field}");
        match parse_template(template) {
            Err(message) => problems.push(Problem::new(pointer, format!("{field}: {message}"))),
            Ok(parts) => {
                let literal: String = parts
                    .iter()
                    .map(|p| match p {
                        TemplatePart::Literal(text) => text.as_str(),
                        TemplatePart::Placeholder(_) => "x",
                    })
                    .collect();
                let problem = if kind == DownstreamType::Nats {
                    nats_subject_problem(&literal)
                } else {
                    mqtt_topic_problem(&literal)
                };
                if let Some(message) = problem {
                    problems.push(Problem::new(pointer, format!("{field}: {message}")));
                }
            }
        }
        if let Some(stream) = &self.stream {
            if stream.is_empty()
                || stream
                    .chars()
                    .any(|c| c.is_whitespace() || c.is_control() || ".*>/\\".contains(c))
            {
                problems.push(Problem::new(
                    "/stream",
                    "a stream name has no spaces and none of . * > / \\",
                ));
            }
        }
    }
}

/// Why a (rendered) NATS subject is not one a publisher may use.
pub fn nats_subject_problem(subject: &str) -> Option<String> {
    if subject.is_empty() {
        return Some("the subject is empty".into());
    }
    if subject.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Some("a subject has no spaces or control characters".into());
    }
    if subject.split('.').any(str::is_empty) {
        return Some("a subject has no empty tokens (.. or a leading or trailing dot)".into());
    }
    if subject.split('.').any(|t| t.contains(['*', '>'])) {
        return Some("a publish subject has no wildcards (* or >)".into());
    }
    None
}

/// Why a (rendered) MQTT topic is not one a publisher may use.
pub fn mqtt_topic_problem(topic: &str) -> Option<String> {
    if topic.is_empty() {
        return Some("the topic is empty".into());
    }
    if topic.contains(['+', '#']) {
        return Some("a publish topic has no wildcards (+ or #)".into());
    }
    if topic.contains('\0') {
        return Some("a topic has no NUL characters".into());
    }
    if topic.len() > 65_535 {
        return Some("a topic is at most 65535 bytes".into());
    }
    None
}

/// Rewrites numbers with no fractional part (`8080.0`) as integers, as JSON Schema counts them.
fn normalize_whole_numbers(value: &mut Value) {
    match value {
        Value::Number(n) if n.is_f64() => {
            if let Some(f) = n.as_f64() {
                if f.fract() == 0.0 && f.abs() < 9.0e15 {
                    *value = Value::from(f as i64);
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(normalize_whole_numbers),
        Value::Object(map) => map.values_mut().for_each(normalize_whole_numbers),
        _ => {}
    }
}

/// A parsed, validated definition of any kind.
#[derive(Debug, Clone, PartialEq)]
pub enum Definition {
    Listener(ListenerDefinition),
    Sentinel(SentinelDefinition),
    Route(RouteDefinition),
    Downstream(DownstreamDefinition),
}

impl Definition {
    pub fn key(&self) -> &str {
        match self {
            Definition::Listener(d) => &d.key,
            Definition::Sentinel(d) => &d.key,
            Definition::Route(d) => &d.key,
            Definition::Downstream(d) => &d.key,
        }
    }

    pub fn kind(&self) -> DefinitionKind {
        match self {
            Definition::Listener(_) => DefinitionKind::Listener,
            Definition::Sentinel(_) => DefinitionKind::Sentinel,
            Definition::Route(_) => DefinitionKind::Route,
            Definition::Downstream(_) => DefinitionKind::Downstream,
        }
    }

    /// Schema validation, then typed parsing, then the kind's cross-field rules: every problem
    /// found at once. `password_stored` only matters for listeners (see
    /// [`ListenerDefinition::validate`]).
    pub fn parse(
        schemas: &SchemaRegistry,
        kind: DefinitionKind,
        document: &Value,
        password_stored: bool,
    ) -> Result<Definition, Vec<Problem>> {
        let mut problems = schemas.definition_problems(kind, document);
        // Cross-field rules run even when the schema found problems, so one answer lists
        // everything: fields the schema rejected are left out of this second look, and if the
        // rest still does not form a definition (a required field is missing), the schema's
        // report is the whole answer.
        let mut lenient = document.clone();
        // JSON Schema's "integer" accepts 8080.0; the typed view must too.
        normalize_whole_numbers(&mut lenient);
        if let Some(object) = lenient.as_object_mut() {
            for problem in &problems {
                if let Some(field) = problem.pointer.strip_prefix('/') {
                    let top = field.split('/').next().unwrap_or_default();
                    object.remove(top);
                    // Identity fields every kind requires: a stand-in keeps the rest checkable.
                    if top == "key" || top == "name" {
                        object.insert(top.to_owned(), Value::String("stand-in".to_owned()));
                    }
                }
            }
        }
        let parsed = match kind {
            DefinitionKind::Listener => serde_json::from_value(lenient).map(Definition::Listener),
            DefinitionKind::Sentinel => serde_json::from_value(lenient).map(Definition::Sentinel),
            DefinitionKind::Route => serde_json::from_value(lenient).map(Definition::Route),
            DefinitionKind::Downstream => {
                serde_json::from_value(lenient).map(Definition::Downstream)
            }
        };
        let parsed = match parsed {
            Ok(parsed) => parsed,
            Err(_) if !problems.is_empty() => return Err(problems),
            // The schema and the struct describe the same fields; a mismatch is reported.
            Err(e) => {
                return Err(vec![Problem::new(
                    "",
                    format!("definition does not fit its type: {e}"),
                )])
            }
        };
        let cross = match &parsed {
            Definition::Listener(d) => {
                let mut problems = d.validate(password_stored);
                d.validate_websocket(document, &mut problems);
                problems
            }
            Definition::Sentinel(d) => d.validate(),
            Definition::Route(_) => Vec::new(),
            Definition::Downstream(d) => d.validate(document),
        };
        for problem in cross {
            if !problems.iter().any(|p| p.pointer == problem.pointer) {
                problems.push(problem);
            }
        }
        if problems.is_empty() {
            Ok(parsed)
        } else {
            problems.sort_by(|a, b| a.pointer.cmp(&b.pointer));
            Err(problems)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_listeners::listener;
    use serde_json::json;

    #[test]
    fn anonymous_listener_needs_a_sentinel() {
        let schemas = SchemaRegistry::new();
        let mut doc = listener(json!({}));
        doc.as_object_mut().unwrap().remove("sentinel");
        let problems =
            Definition::parse(&schemas, DefinitionKind::Listener, &doc, false).unwrap_err();
        assert_eq!(problems[0].pointer, "/sentinel");
    }

    #[test]
    fn basic_listener_reports_all_missing_credentials() {
        let schemas = SchemaRegistry::new();
        let doc = listener(json!({"anonymous": false, "secure": true}));
        let problems =
            Definition::parse(&schemas, DefinitionKind::Listener, &doc, false).unwrap_err();
        let pointers: Vec<_> = problems.iter().map(|p| p.pointer.as_str()).collect();
        assert_eq!(
            pointers,
            [
                "/password",
                "/port",
                "/tlsCertFile",
                "/tlsKeyFile",
                "/userName"
            ]
        );
    }

    #[test]
    fn schema_and_cross_field_problems_come_together() {
        let schemas = SchemaRegistry::new();
        let doc = listener(json!({"key": "Bad_Key", "port": 70000, "anonymous": false}));
        let problems =
            Definition::parse(&schemas, DefinitionKind::Listener, &doc, false).unwrap_err();
        let pointers: Vec<_> = problems.iter().map(|p| p.pointer.as_str()).collect();
        assert_eq!(pointers, ["/key", "/password", "/port", "/userName"]);
    }

    #[test]
    fn stored_password_satisfies_update() {
        let schemas = SchemaRegistry::new();
        let doc = listener(json!({"anonymous": false, "userName": "dev"}));
        let doc = {
            let mut d = doc;
            d.as_object_mut().unwrap().remove("sentinel");
            d
        };
        assert!(Definition::parse(&schemas, DefinitionKind::Listener, &doc, true).is_ok());
        assert!(Definition::parse(&schemas, DefinitionKind::Listener, &doc, false).is_err());
    }

    #[test]
    fn client_credentials_over_plain_ws_need_consent() {
        let schemas = SchemaRegistry::new();
        let client = json!({"key": "feed", "name": "Feed", "listenerType": "websocket",
            "mode": "client", "contentType": "json", "hostName": "feed.example", "path": "/in",
            "anonymous": false, "userName": "gw", "password": "gw-password-1"});
        let problems =
            Definition::parse(&schemas, DefinitionKind::Listener, &client, false).unwrap_err();
        assert_eq!(problems[0].pointer, "/secure");
        let mut consented = client.clone();
        consented["allowInsecureCredentials"] = json!(true);
        assert!(Definition::parse(&schemas, DefinitionKind::Listener, &consented, false).is_ok());
        let mut over_tls = client.clone();
        over_tls["secure"] = json!(true);
        assert!(Definition::parse(&schemas, DefinitionKind::Listener, &over_tls, false).is_ok());
        let headers_only = json!({"key": "feed", "name": "Feed", "listenerType": "websocket",
            "mode": "client", "contentType": "json", "hostName": "feed.example", "path": "/in",
            "sentinel": "keys", "headers": {"authorization": "Bearer x"}});
        let problems = Definition::parse(&schemas, DefinitionKind::Listener, &headers_only, false)
            .unwrap_err();
        assert_eq!(problems[0].pointer, "/secure");
    }

    #[test]
    fn proxy_protocol_needs_an_own_port() {
        let schemas = SchemaRegistry::new();
        let doc = listener(json!({"proxyProtocol": true}));
        let problems =
            Definition::parse(&schemas, DefinitionKind::Listener, &doc, false).unwrap_err();
        assert_eq!(problems[0].pointer, "/proxyProtocol");
        let doc = listener(json!({"proxyProtocol": true, "port": 0}));
        assert!(Definition::parse(&schemas, DefinitionKind::Listener, &doc, false).is_ok());
    }

    #[test]
    fn reserved_paths_are_refused() {
        let schemas = SchemaRegistry::new();
        for path in ["/", "/api/x", "/healthz", "/metrics"] {
            let doc = listener(json!({"path": path}));
            let problems =
                Definition::parse(&schemas, DefinitionKind::Listener, &doc, false).unwrap_err();
            assert_eq!(problems[0].pointer, "/path", "{path}");
        }
    }

    #[test]
    fn downstream_fields_must_fit_the_type() {
        let schemas = SchemaRegistry::new();
        let doc = json!({"key": "hook", "name": "h", "type": "webhook", "url": "http://x/y", "path": "/p"});
        let problems =
            Definition::parse(&schemas, DefinitionKind::Downstream, &doc, false).unwrap_err();
        assert_eq!(problems[0].pointer, "/path");
    }
}
