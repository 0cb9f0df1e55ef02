//! Definition kinds: typed views of the stored, schema-validated JSON documents that describe one
//! module each. The schema says what a field may hold; `validate()` says what a schema cannot
//! (rules across fields), reporting every problem with its JSON pointer.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::envelope::ContentType;
use crate::schema::{Problem, SchemaRegistry};

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
    #[serde(default)]
    pub origin: Option<String>,
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    #[serde(default)]
    pub sentinel: Option<String>,
    #[serde(default = "default_heartbeat")]
    pub heartbeat_seconds: u32,
    #[serde(default = "default_max_message_bytes")]
    pub max_message_bytes: usize,
    /// Echo every received message back to its sender before it enters the pipeline.
    #[serde(default)]
    pub echo: bool,
    /// Seconds an unauthenticated connection behind a sentinel may stay open (0 = no deadline).
    #[serde(default = "default_auth_timeout")]
    pub auth_timeout_seconds: u32,
    #[serde(default = "default_true")]
    pub enabled: bool,
}

impl ListenerDefinition {
    /// True when the listener is served on the main port at `path` (server mode, no own port).
    pub fn is_path_mounted(&self) -> bool {
        self.mode == ListenerMode::Server && self.port.is_none()
    }

    /// Rules across fields. `password_stored` says whether a password is already stored for this
    /// key, so an update may omit it.
    pub fn validate(&self, password_stored: bool) -> Vec<Problem> {
        let mut problems = Vec::new();
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
                            "a secure server listener needs its own port (the main port is plain HTTP)",
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
            }
        }
        problems
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
}

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

    pub fn validate(&self) -> Vec<Problem> {
        let mut problems = Vec::new();
        match self.method {
            SentinelMethod::AccessKey => {
                if self.credential.is_some() {
                    problems.push(Problem::new(
                        "/credential",
                        "credential applies to the basic method; accessKey uses deviceId and accessKey",
                    ));
                }
            }
            SentinelMethod::Basic => {
                for (pointer, value) in [
                    ("/deviceId", &self.device_id),
                    ("/accessKey", &self.access_key),
                ] {
                    if value.is_some() {
                        problems.push(Problem::new(
                            pointer,
                            "applies to the accessKey method; basic uses credential",
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

/// Message-type selector: the payload value at `pointer` must be one of `values`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MessageTypeSelector {
    pub pointer: String,
    pub values: Vec<Value>,
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
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum SubscriberFormat {
    Payload,
    #[default]
    Envelope,
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
    #[serde(default = "default_true")]
    pub enabled: bool,
}

impl DownstreamDefinition {
    pub fn validate(&self, document: &Value) -> Vec<Problem> {
        let mut problems = Vec::new();
        let applies: &[&str] = match self.downstream_type {
            DownstreamType::Store => &["batchSize"],
            DownstreamType::Websocket => &["path", "format"],
            DownstreamType::Webhook => &["url", "headers", "maxRetries", "timeoutMs"],
        };
        for field in [
            "path",
            "format",
            "url",
            "headers",
            "maxRetries",
            "timeoutMs",
            "batchSize",
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
        problems
    }
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
            Definition::Listener(d) => d.validate(password_stored),
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
    use serde_json::json;

    fn listener(extra: Value) -> Value {
        let mut base = json!({"key": "plant-a", "name": "Plant A", "listenerType": "websocket",
            "mode": "server", "contentType": "json", "path": "/devices", "sentinel": "keys"});
        for (k, v) in extra.as_object().unwrap() {
            base[k] = v.clone();
        }
        base
    }

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
