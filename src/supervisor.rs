//! The supervisor: turns stored definitions into running modules and keeps them in step with
//! every change, without restart.
//!
//! A write is validated (schema, cross-field rules, references to other definitions, path
//! clashes), stored, and then applied to exactly the module it names:
//! - a listener is stopped (its connections close with 1001) and started again; other listeners
//!   keep their connections;
//! - a sentinel, route or downstream change builds a new pipeline topology that reuses every
//!   untouched module and is swapped in atomically; a replaced downstream drains its queue.
//!
//! Changes are serialized by one async mutex; the hot path never takes it.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use arc_swap::ArcSwap;
use iotgate_core::definition::{
    DefinitionKind, DownstreamType, ListenerDefinition, ListenerMode, SentinelDefinition,
    SentinelMethod,
};
use iotgate_core::{Definition, Problem, SchemaRegistry};
use iotgate_listener::own_port::{OwnPortServer, OwnPortSettings};
use iotgate_listener::{
    AttemptLimiter, BasicCredentialVerifier, ClientListener, ConnectionLimits, ListenerState,
    ListenerStatus, ListenerStatusView, ServerListener, TrustedProxies,
};
use iotgate_pipeline::downstream::DownstreamContext;
use iotgate_pipeline::{
    CloseCause, Downstream, ListenerContext, Pipeline, Router, Sentinel, TokenVerifier, Topology,
};
use iotgate_store::{Store, StoreError, StoredDefinition};
use serde_json::Value;
use time::OffsetDateTime;
use tokio::sync::{Mutex, Semaphore};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::sealing::{redacted_document, PasswordSealer};
use crate::token_secrets;

/// Prefix of a server-mode listener's stored password (an Argon2id PHC string follows).
const ARGON2_PREFIX: &str = "argon2:";

/// Path-mounted server listeners of the main port, by path. Read per upgrade request.
pub type MountTable = ArcSwap<HashMap<String, Arc<ServerListener>>>;

/// Why a definition change was refused. The API maps these to statuses in one place
/// (`crate::error`).
#[derive(Debug, thiserror::Error)]
pub enum DefinitionError {
    #[error("{kind} {key} not found")]
    NotFound { kind: DefinitionKind, key: String },
    #[error("{0}")]
    Conflict(String),
    #[error("the definition has {} problem(s)", .0.len())]
    Invalid(Vec<Problem>),
    #[error("definition storage failed")]
    Store(#[from] StoreError),
    #[error("the secret could not be hashed")]
    Hashing(#[source] anyhow::Error),
}

/// Why a connection token could not be issued for a listener. The API maps these to statuses
/// in one place (`crate::error`).
#[derive(Debug, thiserror::Error)]
pub enum TokenIssueError {
    #[error("no listener has the key {0}")]
    UnknownListener(String),
    #[error("listener {0} connects out (client mode); devices do not connect to it")]
    NotServer(String),
    #[error(
        "listener {0} is not behind an HS256 token sentinel; tokens for it cannot be issued here"
    )]
    NotBehindTokenSentinel(String),
    #[error(
        "the token secret of sentinel {0} cannot be unsealed with this server secret; rotate it"
    )]
    SecretUnreadable(String),
}

/// What signing a connection token for one listener needs.
pub struct TokenIssuer {
    pub listener: ListenerDefinition,
    pub audience: Option<String>,
    /// The sentinel's current HS256 secret.
    pub secret: Vec<u8>,
    /// Whether the main port serves TLS (the scheme of a path-mounted listener's URL).
    pub main_tls: bool,
}

impl std::fmt::Debug for TokenIssuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenIssuer")
            .field("listener", &self.listener.key)
            .finish_non_exhaustive()
    }
}

/// An error with its causes, one line.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A stored definition before and after a change, as stored (header values sealed): the audit
/// log diffs them, redacted.
#[derive(Debug, Clone)]
pub struct DefinitionChange {
    pub before: Option<Value>,
    pub after: Value,
}

impl DefinitionChange {
    /// The definition as the API answers it (header values redacted).
    pub fn view(&self) -> Value {
        redacted_document(&self.after)
    }
}

enum RunningListener {
    Server {
        listener: Arc<ServerListener>,
        own_server: Option<OwnPortServer>,
    },
    Client {
        listener: Arc<ClientListener>,
        task: JoinHandle<()>,
    },
}

impl RunningListener {
    fn token(&self) -> &CancellationToken {
        match self {
            RunningListener::Server { listener, .. } => listener.shutdown_token(),
            RunningListener::Client { listener, .. } => listener.shutdown_token(),
        }
    }
}

struct RunningDownstream {
    handle: Downstream,
    task: Option<JoinHandle<()>>,
}

#[derive(Default)]
struct State {
    /// Every stored definition, valid or not, by kind and key.
    stored: BTreeMap<(DefinitionKind, String), StoredDefinition>,
    /// The valid ones, parsed.
    parsed: HashMap<(DefinitionKind, String), Definition>,
    listeners: HashMap<String, RunningListener>,
    sentinels: HashMap<String, Arc<Sentinel>>,
    downstreams: HashMap<String, RunningDownstream>,
    /// Tasks of replaced downstream modules still draining; awaited at shutdown.
    draining: Vec<JoinHandle<()>>,
}

/// Everything the supervisor needs to build modules.
pub struct SupervisorParts {
    pub store: Store,
    pub schemas: Arc<SchemaRegistry>,
    pub pipeline: Arc<Pipeline>,
    pub runtime: tokio::runtime::Handle,
    pub sealer: PasswordSealer,
    pub downstream_context: DownstreamContext,
    /// Argon2 capacity of Basic listeners (admin login has its own).
    pub hashing: Arc<Semaphore>,
    /// Basic credentials needing a fresh Argon2 run, per source address, over all listeners.
    pub basic_attempts: Arc<AttemptLimiter<std::net::IpAddr>>,
    pub trusted_proxies: Arc<TrustedProxies>,
    pub client_tls: Arc<rustls::ClientConfig>,
    pub limits: Arc<ConnectionLimits>,
    /// Time a client has to send its upgrade request (and finish TLS) on own-port listeners.
    pub handshake_timeout: Duration,
    /// `--port-offset`: added to every non-zero own port.
    pub port_offset: u16,
    /// Where `--static-dir` is served on the main port, if it is: no listener may sit under it.
    pub static_mount: Option<String>,
    pub shutdown: CancellationToken,
}

pub struct Supervisor {
    parts: SupervisorParts,
    /// The main port's address and whether it serves TLS, for listener URLs.
    main_address: std::sync::OnceLock<(SocketAddr, bool)>,
    pub mounts: Arc<MountTable>,
    statuses: RwLock<HashMap<String, Arc<ListenerStatus>>>,
    state: Mutex<State>,
}

impl std::fmt::Debug for Supervisor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Supervisor")
    }
}

fn now() -> String {
    iotgate_core::envelope::format_timestamp(OffsetDateTime::now_utc())
}

impl Supervisor {
    pub fn new(parts: SupervisorParts) -> Self {
        Self {
            parts,
            main_address: std::sync::OnceLock::new(),
            mounts: Arc::new(ArcSwap::from_pointee(HashMap::new())),
            statuses: RwLock::new(HashMap::new()),
            state: Mutex::new(State::default()),
        }
    }

    pub fn set_main_address(&self, address: SocketAddr, tls: bool) {
        let _ = self.main_address.set((address, tls));
    }

    pub fn schemas(&self) -> &SchemaRegistry {
        &self.parts.schemas
    }

    /// Loads every stored definition, validates it again, and starts what is valid. A bad
    /// definition is reported in its listener status (or the log) and the others still start.
    pub async fn start_all(&self) -> anyhow::Result<()> {
        let mut state = self.state.lock().await;
        for kind in DefinitionKind::ALL {
            for stored in self
                .parts
                .store
                .list_definitions(kind.schema_name())
                .await?
            {
                let mut stored = stored;
                let key = stored.key.clone();
                let password_stored = stored.secret.is_some();
                // Header values stored in clear by an older version are sealed now.
                if let Some(headers) = stored.document.get("headers") {
                    let sealed = self.parts.sealer.seal_stored_headers(headers);
                    if &sealed != headers {
                        stored.document["headers"] = sealed;
                        self.parts.store.update_definition(&stored).await?;
                        tracing::info!(kind = %kind, key = %key, "stored header values sealed");
                    }
                }
                let parsed = self
                    .runtime_document(&stored.document)
                    .and_then(|document| {
                        Definition::parse(&self.parts.schemas, kind, &document, password_stored)
                    });
                match parsed {
                    Ok(definition) => {
                        state.parsed.insert((kind, key.clone()), definition);
                    }
                    Err(problems) => {
                        let summary = problems
                            .iter()
                            .map(|p| format!("{}: {}", p.pointer, p.message))
                            .collect::<Vec<_>>()
                            .join("; ");
                        tracing::error!(kind = %kind, key = %key, problems = %summary, "stored definition is invalid; module not started");
                        if kind == DefinitionKind::Listener {
                            let status = Arc::new(ListenerStatus::new(
                                &key,
                                ListenerState::Error,
                                self.parts.pipeline.metrics.listener(&key),
                            ));
                            status.set(
                                ListenerState::Error,
                                Some(format!("stored definition is invalid: {summary}")),
                            );
                            self.statuses
                                .write()
                                .expect("statuses lock")
                                .insert(key.clone(), status);
                        }
                    }
                }
                state.stored.insert((kind, key), stored);
            }
        }
        // Static content and a stored listener must not share paths: say so and do not start.
        for definition in state.parsed.values() {
            if let Some(conflict) =
                static_mount_conflict(self.parts.static_mount.as_deref(), definition)
            {
                anyhow::bail!("{conflict}; choose another --static-mount or change the definition");
            }
        }
        // Sentinels, downstreams and routes first, so listeners start into a complete pipeline.
        let downstream_keys: Vec<String> = keys_of(&state, DefinitionKind::Downstream);
        for key in &downstream_keys {
            self.start_downstream(&mut state, key);
        }
        let sentinel_keys: Vec<String> = keys_of(&state, DefinitionKind::Sentinel);
        for key in &sentinel_keys {
            self.start_sentinel(&mut state, key);
        }
        self.install_topology(&state);
        let listener_keys: Vec<String> = keys_of(&state, DefinitionKind::Listener);
        for key in &listener_keys {
            self.start_listener(&mut state, key).await;
        }
        Ok(())
    }

    /// A stored document with its header values in clear, as its module runs it; the names of
    /// headers sealed under another server secret are a problem.
    fn runtime_document(&self, stored: &Value) -> Result<Value, Vec<Problem>> {
        let mut document = stored.clone();
        if let Some(headers) = stored.get("headers") {
            document["headers"] = self.parts.sealer.open_headers(headers).map_err(|names| {
                names
                    .iter()
                    .map(|name| {
                        Problem::new(
                            format!("/headers/{name}"),
                            "the stored value cannot be unsealed with this server secret; set it again",
                        )
                    })
                    .collect::<Vec<_>>()
            })?;
        }
        self.parts
            .sealer
            .open_secret_fields(&mut document)
            .map_err(|fields| {
                fields
                    .iter()
                    .map(|field| {
                        Problem::new(
                            format!("/{field}"),
                            "the stored value cannot be unsealed with this server secret; set it again",
                        )
                    })
                    .collect::<Vec<_>>()
            })?;
        Ok(document)
    }

    /// The connection status of a running downstream that connects out. `Ok(None)` when the
    /// downstream exists but has no connection (another type, or disabled).
    pub async fn downstream_status(
        &self,
        key: &str,
    ) -> Result<Option<iotgate_pipeline::downstream::LinkStatusView>, DefinitionError> {
        let state = self.state.lock().await;
        if !state
            .stored
            .contains_key(&(DefinitionKind::Downstream, key.to_owned()))
        {
            return Err(DefinitionError::NotFound {
                kind: DefinitionKind::Downstream,
                key: key.to_owned(),
            });
        }
        Ok(state
            .downstreams
            .get(key)
            .and_then(|running| running.handle.link_status()))
    }

    /// Tries a stored downstream's connection once (connect, authenticate, publish a probe).
    /// `Ok(None)` for types that do not connect out.
    pub async fn probe_downstream(
        &self,
        key: &str,
    ) -> Result<Option<iotgate_pipeline::downstream::ProbeReport>, DefinitionError> {
        let definition = {
            let state = self.state.lock().await;
            match state
                .parsed
                .get(&(DefinitionKind::Downstream, key.to_owned()))
            {
                Some(Definition::Downstream(definition)) => definition.clone(),
                _ if state
                    .stored
                    .contains_key(&(DefinitionKind::Downstream, key.to_owned())) =>
                {
                    return Err(DefinitionError::Invalid(vec![Problem::new(
                        "",
                        format!(
                            "the stored definition of downstream {key} is invalid; fix it first"
                        ),
                    )]))
                }
                _ => {
                    return Err(DefinitionError::NotFound {
                        kind: DefinitionKind::Downstream,
                        key: key.to_owned(),
                    })
                }
            }
        };
        let mut definition = definition;
        definition.headers = resolved_headers(&definition.headers)
            .map_err(|e| DefinitionError::Invalid(vec![Problem::new("/headers", e)]))?;
        Ok(iotgate_pipeline::downstream::probe(&definition, &self.parts.client_tls).await)
    }

    /// Every definition of a kind, as the API shows them (header values redacted).
    pub async fn list(&self, kind: DefinitionKind) -> Vec<Value> {
        let state = self.state.lock().await;
        state
            .stored
            .range((kind, String::new())..)
            .take_while(|((k, _), _)| *k == kind)
            .map(|(_, stored)| redacted_document(&stored.document))
            .collect()
    }

    /// One definition as the API shows it (header values redacted).
    pub async fn get(&self, kind: DefinitionKind, key: &str) -> Result<Value, DefinitionError> {
        let state = self.state.lock().await;
        state
            .stored
            .get(&(kind, key.to_owned()))
            .map(|s| redacted_document(&s.document))
            .ok_or_else(|| DefinitionError::NotFound {
                kind,
                key: key.to_owned(),
            })
    }

    pub fn listener_status(&self, key: &str) -> Option<ListenerStatusView> {
        self.statuses
            .read()
            .expect("statuses lock")
            .get(key)
            .map(|s| s.view())
    }

    /// Every listener's status, ordered by key.
    pub fn listener_statuses(&self) -> Vec<ListenerStatusView> {
        let mut views: Vec<_> = self
            .statuses
            .read()
            .expect("statuses lock")
            .values()
            .map(|s| s.view())
            .collect();
        views.sort_by(|a, b| a.key.cmp(&b.key));
        views
    }

    pub async fn create(
        &self,
        kind: DefinitionKind,
        document: Value,
    ) -> Result<DefinitionChange, DefinitionError> {
        let mut state = self.state.lock().await;
        let key = document
            .get("key")
            .and_then(Value::as_str)
            .map(str::to_owned);
        if let Some(key) = &key {
            if state.stored.contains_key(&(kind, key.clone())) {
                return Err(DefinitionError::Conflict(format!(
                    "{kind} {key} already exists"
                )));
            }
        }
        let (definition, stored) = self.prepare(&state, kind, document, None).await?;
        self.parts.store.insert_definition(&stored).await?;
        tracing::info!(kind = %kind, key = %stored.key, "definition created");
        let change = DefinitionChange {
            before: None,
            after: stored.document.clone(),
        };
        self.apply(&mut state, kind, stored, Some(definition)).await;
        Ok(change)
    }

    pub async fn update(
        &self,
        kind: DefinitionKind,
        key: &str,
        document: Value,
    ) -> Result<DefinitionChange, DefinitionError> {
        let mut state = self.state.lock().await;
        let Some(previous) = state.stored.get(&(kind, key.to_owned())).cloned() else {
            return Err(DefinitionError::NotFound {
                kind,
                key: key.to_owned(),
            });
        };
        if document.get("key").and_then(Value::as_str) != Some(key) {
            return Err(DefinitionError::Invalid(vec![Problem::new(
                "/key",
                format!("keys are immutable: the body's key must be {key}"),
            )]));
        }
        let (definition, mut stored) = self
            .prepare(&state, kind, document, Some(&previous))
            .await?;
        stored.created_at = previous.created_at.clone();
        self.parts.store.update_definition(&stored).await?;
        tracing::info!(kind = %kind, key = %key, "definition updated");
        let change = DefinitionChange {
            before: Some(previous.document.clone()),
            after: stored.document.clone(),
        };
        self.apply(&mut state, kind, stored, Some(definition)).await;
        Ok(change)
    }

    /// Deletes a definition; returns the stored document it had.
    pub async fn delete(&self, kind: DefinitionKind, key: &str) -> Result<Value, DefinitionError> {
        let mut state = self.state.lock().await;
        if !state.stored.contains_key(&(kind, key.to_owned())) {
            return Err(DefinitionError::NotFound {
                kind,
                key: key.to_owned(),
            });
        }
        if let Some(user) = users_of(&state, kind, key) {
            return Err(DefinitionError::Conflict(format!(
                "{kind} {key} is used by {user}; change or delete that first"
            )));
        }
        self.parts
            .store
            .delete_definition(kind.schema_name(), key)
            .await?;
        tracing::info!(kind = %kind, key = %key, "definition deleted");
        let stored = state
            .stored
            .remove(&(kind, key.to_owned()))
            .expect("checked above");
        state.parsed.remove(&(kind, key.to_owned()));
        self.retire(&mut state, kind, &stored.key).await;
        if kind != DefinitionKind::Listener {
            self.install_topology(&state);
        } else {
            self.statuses.write().expect("statuses lock").remove(key);
        }
        Ok(stored.document)
    }

    /// Brings one definition in line with the database after another node changed it: starts,
    /// replaces or stops its module. Nothing happens when this node already runs what is stored
    /// (its own writes come back as no-ops).
    pub async fn sync_definition(
        &self,
        kind: DefinitionKind,
        key: &str,
    ) -> Result<bool, StoreError> {
        let stored = self
            .parts
            .store
            .get_definition(kind.schema_name(), key)
            .await?;
        let mut state = self.state.lock().await;
        Ok(self.reconcile(&mut state, kind, key, stored).await)
    }

    /// Compares every definition with the database and applies the differences: the safety net
    /// for a change notification this node missed. Returns how many modules changed.
    pub async fn resync(&self) -> Result<usize, StoreError> {
        let mut changed = 0;
        for kind in DefinitionKind::ALL {
            let stored = self
                .parts
                .store
                .list_definitions(kind.schema_name())
                .await?;
            let mut state = self.state.lock().await;
            let mut gone: std::collections::BTreeSet<String> = state
                .stored
                .keys()
                .filter(|(k, _)| *k == kind)
                .map(|(_, key)| key.clone())
                .collect();
            for definition in stored {
                gone.remove(&definition.key);
                let key = definition.key.clone();
                changed += usize::from(
                    self.reconcile(&mut state, kind, &key, Some(definition))
                        .await,
                );
            }
            for key in gone {
                changed += usize::from(self.reconcile(&mut state, kind, &key, None).await);
            }
        }
        Ok(changed)
    }

    /// Makes the running module of `(kind, key)` match `stored` (None: deleted). True when
    /// something changed.
    async fn reconcile(
        &self,
        state: &mut State,
        kind: DefinitionKind,
        key: &str,
        stored: Option<StoredDefinition>,
    ) -> bool {
        let current = state.stored.get(&(kind, key.to_owned()));
        match (stored, current) {
            (None, None) => false,
            (None, Some(_)) => {
                state.stored.remove(&(kind, key.to_owned()));
                state.parsed.remove(&(kind, key.to_owned()));
                self.retire(state, kind, key).await;
                if kind == DefinitionKind::Listener {
                    self.statuses.write().expect("statuses lock").remove(key);
                } else {
                    self.install_topology(state);
                }
                tracing::info!(kind = %kind, key = %key, "definition deleted on another node; module stopped");
                true
            }
            (Some(stored), Some(current))
                if current.document == stored.document && current.secret == stored.secret =>
            {
                false
            }
            (Some(stored), _) => {
                let parsed = self
                    .runtime_document(&stored.document)
                    .and_then(|document| {
                        Definition::parse(
                            &self.parts.schemas,
                            kind,
                            &document,
                            stored.secret.is_some(),
                        )
                    });
                match parsed {
                    Ok(definition) => {
                        self.apply(state, kind, stored, Some(definition)).await;
                        tracing::info!(kind = %kind, key = %key, "definition changed on another node; module started or replaced");
                        true
                    }
                    Err(problems) => {
                        let summary = problems
                            .iter()
                            .map(|p| format!("{}: {}", p.pointer, p.message))
                            .collect::<Vec<_>>()
                            .join("; ");
                        tracing::error!(kind = %kind, key = %key, problems = %summary, "definition changed on another node is invalid here; not applied");
                        false
                    }
                }
            }
        }
    }

    /// Validates a write and produces the stored form (secret hashed or sealed, password removed).
    async fn prepare(
        &self,
        state: &State,
        kind: DefinitionKind,
        mut document: Value,
        previous: Option<&StoredDefinition>,
    ) -> Result<(Definition, StoredDefinition), DefinitionError> {
        if !document.is_object() {
            return Err(DefinitionError::Invalid(vec![Problem::new(
                "",
                "a definition is a JSON object",
            )]));
        }
        // Header values: sealed for storage, in clear for the module; the placeholder stands for
        // the value stored before.
        let mut runtime = document.clone();
        if let Some(submitted) = document.get("headers").and_then(Value::as_object) {
            let previous = previous.and_then(|p| p.document.get("headers"));
            let headers = self
                .parts
                .sealer
                .seal_headers(submitted, previous)
                .map_err(DefinitionError::Invalid)?;
            runtime["headers"] = headers.plain;
            document["headers"] = headers.stored;
        }
        if kind == DefinitionKind::Downstream {
            self.parts
                .sealer
                .seal_secret_fields(&mut document, &mut runtime, previous.map(|p| &p.document))
                .map_err(DefinitionError::Invalid)?;
        }
        // A stored password can stand in for an omitted one only if it suits the new mode:
        // a server listener needs a hash, a client listener a sealed password.
        let new_mode_is_client = document.get("mode").and_then(Value::as_str) == Some("client");
        let reusable_secret = previous
            .and_then(|p| p.secret.clone())
            .filter(|s| PasswordSealer::is_sealed(s) == new_mode_is_client);
        let definition = Definition::parse(
            &self.parts.schemas,
            kind,
            &runtime,
            reusable_secret.is_some(),
        )
        .map_err(DefinitionError::Invalid)?;
        let problems = self.reference_problems(state, &definition);
        if !problems.is_empty() {
            return Err(DefinitionError::Invalid(problems));
        }
        if let Some(conflict) = path_conflict(state, &definition)
            .or_else(|| static_mount_conflict(self.parts.static_mount.as_deref(), &definition))
        {
            return Err(DefinitionError::Conflict(conflict));
        }
        let mut secret = None;
        if let Definition::Sentinel(sentinel) = &definition {
            secret = self.sentinel_secret(sentinel, previous)?;
        }
        if let Definition::Listener(listener) = &definition {
            if !listener.anonymous {
                secret = match &listener.password {
                    Some(password) if listener.mode == ListenerMode::Client => {
                        Some(self.parts.sealer.seal(password))
                    }
                    Some(password) => Some(format!(
                        "{ARGON2_PREFIX}{}",
                        crate::auth::hash_password_async(password.clone())
                            .await
                            .map_err(DefinitionError::Hashing)?
                    )),
                    None => reusable_secret,
                };
            }
            if let Some(object) = document.as_object_mut() {
                object.remove("password");
            }
        }
        let stamp = now();
        Ok((
            definition,
            StoredDefinition {
                kind: kind.schema_name().to_owned(),
                key: definition_key(&document),
                document,
                secret,
                created_at: stamp.clone(),
                updated_at: stamp,
            },
        ))
    }

    /// The secret column of a sentinel being written: an HS256 token sentinel keeps its stored
    /// secrets, or gets fresh ones; RS256/ES256 key files must load now (a problem at the
    /// field's pointer otherwise); other methods store none.
    fn sentinel_secret(
        &self,
        sentinel: &SentinelDefinition,
        previous: Option<&StoredDefinition>,
    ) -> Result<Option<String>, DefinitionError> {
        if sentinel.method != SentinelMethod::Token {
            return Ok(None);
        }
        if !sentinel.uses_generated_secret() {
            if let Err(error) = TokenVerifier::new(sentinel, None) {
                let pointer = if sentinel.public_key_file.is_some() {
                    "/publicKeyFile"
                } else {
                    "/jwksFile"
                };
                return Err(DefinitionError::Invalid(vec![Problem::new(
                    pointer,
                    error_chain(&error),
                )]));
            }
            return Ok(None);
        }
        let kept = previous
            .and_then(|p| p.secret.as_deref())
            .filter(|stored| token_secrets::open(&self.parts.sealer, stored).is_some());
        Ok(Some(match kept {
            Some(stored) => stored.to_owned(),
            None => token_secrets::seal(&self.parts.sealer, &token_secrets::generate()),
        }))
    }

    /// Replaces the HS256 secret of token sentinel `key`; tokens signed with the old secret keep
    /// verifying for `grace_seconds`. Live connections stay open (their token was checked when
    /// they connected).
    pub async fn rotate_token_secret(
        &self,
        key: &str,
        grace_seconds: u64,
    ) -> Result<u64, DefinitionError> {
        let mut state = self.state.lock().await;
        let id = (DefinitionKind::Sentinel, key.to_owned());
        let Some(stored) = state.stored.get(&id).cloned() else {
            return Err(DefinitionError::NotFound {
                kind: DefinitionKind::Sentinel,
                key: key.to_owned(),
            });
        };
        let generated = matches!(state.parsed.get(&id), Some(Definition::Sentinel(s)) if s.uses_generated_secret());
        let current = stored
            .secret
            .as_deref()
            .and_then(|s| token_secrets::open(&self.parts.sealer, s));
        let (true, Some(current)) = (generated, current) else {
            return Err(DefinitionError::Conflict(format!(
                "sentinel {key} is not an HS256 token sentinel with a readable secret; only those have a secret to rotate"
            )));
        };
        let unix = unix_now();
        let rotated = token_secrets::rotate(&current, grace_seconds, unix);
        let mut updated = stored;
        updated.secret = Some(token_secrets::seal(&self.parts.sealer, &rotated));
        updated.updated_at = now();
        self.parts.store.update_definition(&updated).await?;
        tracing::info!(sentinel = %key, grace_seconds, "token secret rotated");
        self.apply(&mut state, DefinitionKind::Sentinel, updated, None)
            .await;
        Ok(unix.saturating_add(grace_seconds))
    }

    /// What signing a connection token for listener `key` needs: the listener (for the client
    /// URL), its sentinel's audience and current secret. Refused unless the listener is behind
    /// an HS256 token sentinel.
    pub async fn token_issuer(&self, key: &str) -> Result<TokenIssuer, TokenIssueError> {
        let state = self.state.lock().await;
        let Some(Definition::Listener(listener)) = state
            .parsed
            .get(&(DefinitionKind::Listener, key.to_owned()))
        else {
            return Err(TokenIssueError::UnknownListener(key.to_owned()));
        };
        if listener.mode != ListenerMode::Server {
            return Err(TokenIssueError::NotServer(key.to_owned()));
        }
        let sentinel_key = listener
            .sentinel
            .clone()
            .ok_or_else(|| TokenIssueError::NotBehindTokenSentinel(key.to_owned()))?;
        let id = (DefinitionKind::Sentinel, sentinel_key.clone());
        let Some(Definition::Sentinel(sentinel)) = state.parsed.get(&id) else {
            return Err(TokenIssueError::NotBehindTokenSentinel(key.to_owned()));
        };
        if !sentinel.uses_generated_secret() {
            return Err(TokenIssueError::NotBehindTokenSentinel(key.to_owned()));
        }
        let secrets = state
            .stored
            .get(&id)
            .and_then(|s| s.secret.as_deref())
            .and_then(|s| token_secrets::open(&self.parts.sealer, s))
            .ok_or(TokenIssueError::SecretUnreadable(sentinel_key))?;
        Ok(TokenIssuer {
            listener: listener.clone(),
            audience: sentinel.audience.clone(),
            secret: secrets.current,
            main_tls: self.main_address.get().is_some_and(|(_, tls)| *tls),
        })
    }

    /// Names another definition that must exist but does not.
    fn reference_problems(&self, state: &State, definition: &Definition) -> Vec<Problem> {
        let exists =
            |kind: DefinitionKind, key: &str| state.stored.contains_key(&(kind, key.to_owned()));
        let mut problems = Vec::new();
        match definition {
            Definition::Listener(listener) => {
                if let Some(sentinel) = &listener.sentinel {
                    if !exists(DefinitionKind::Sentinel, sentinel) {
                        problems.push(Problem::new(
                            "/sentinel",
                            format!("no sentinel has the key {sentinel}"),
                        ));
                    }
                }
            }
            Definition::Route(route) => {
                for (i, key) in route.downstreams.iter().enumerate() {
                    if !exists(DefinitionKind::Downstream, key) {
                        problems.push(Problem::new(
                            format!("/downstreams/{i}"),
                            format!("no downstream has the key {key}"),
                        ));
                    }
                }
                for (i, key) in route.listeners.iter().flatten().enumerate() {
                    if !exists(DefinitionKind::Listener, key) {
                        problems.push(Problem::new(
                            format!("/listeners/{i}"),
                            format!("no listener has the key {key}"),
                        ));
                    }
                }
            }
            Definition::Sentinel(_) | Definition::Downstream(_) => {}
        }
        problems.extend(header_variable_problems(definition));
        problems
    }

    /// Stores the new state of one definition and restarts only its module.
    async fn apply(
        &self,
        state: &mut State,
        kind: DefinitionKind,
        stored: StoredDefinition,
        definition: Option<Definition>,
    ) {
        let key = stored.key.clone();
        state.stored.insert((kind, key.clone()), stored);
        if let Some(definition) = definition {
            state.parsed.insert((kind, key.clone()), definition);
        }
        self.retire(state, kind, &key).await;
        match kind {
            DefinitionKind::Listener => self.start_listener(state, &key).await,
            DefinitionKind::Sentinel => {
                self.start_sentinel(state, &key);
                self.install_topology(state);
                self.close_connections_of_disabled_sentinel(state, &key);
            }
            DefinitionKind::Downstream => {
                self.start_downstream(state, &key);
                self.install_topology(state);
            }
            DefinitionKind::Route => self.install_topology(state),
        }
    }

    /// A disabled sentinel refuses every message; the connections that relied on it are closed
    /// at once (1008 `sentinel_disabled`) rather than left open to be refused one by one.
    fn close_connections_of_disabled_sentinel(&self, state: &State, key: &str) {
        let disabled = matches!(
            state.parsed.get(&(DefinitionKind::Sentinel, key.to_owned())),
            Some(Definition::Sentinel(s)) if !s.enabled
        );
        if !disabled {
            return;
        }
        for running in state.listeners.values() {
            let context = match running {
                RunningListener::Server { listener, .. } => &listener.context,
                RunningListener::Client { listener, .. } => &listener.context,
            };
            if context.sentinel.as_deref() == Some(key) {
                let closed = context.live.close_all(CloseCause::SentinelDisabled);
                tracing::info!(sentinel = %key, listener = %context.key, closed, "sentinel disabled; its connections were closed");
            }
        }
    }

    /// Stops the running module of a definition (if any).
    async fn retire(&self, state: &mut State, kind: DefinitionKind, key: &str) {
        match kind {
            DefinitionKind::Listener => {
                if let Some(running) = state.listeners.remove(key) {
                    self.stop_listener(running).await;
                }
            }
            DefinitionKind::Sentinel => {
                state.sentinels.remove(key);
            }
            DefinitionKind::Downstream => {
                if let Some(running) = state.downstreams.remove(key) {
                    // Its queue closes when the old topology lets go of it; the task then drains.
                    if let Some(task) = running.task {
                        state.draining.push(task);
                    }
                }
            }
            DefinitionKind::Route => {}
        }
    }

    fn start_sentinel(&self, state: &mut State, key: &str) {
        if let Some(Definition::Sentinel(definition)) = state
            .parsed
            .get(&(DefinitionKind::Sentinel, key.to_owned()))
        {
            let mut sentinel =
                Sentinel::new(definition.clone(), self.parts.pipeline.metrics.clone());
            if definition.method == SentinelMethod::Token {
                let secrets = state
                    .stored
                    .get(&(DefinitionKind::Sentinel, key.to_owned()))
                    .and_then(|s| s.secret.as_deref())
                    .and_then(|s| token_secrets::open(&self.parts.sealer, s));
                // Without its keys the sentinel still runs and refuses every token as
                // sentinel_unavailable (503), which says more than a missing sentinel would.
                match TokenVerifier::new(definition, secrets.as_ref()) {
                    Ok(verifier) => sentinel = sentinel.with_tokens(verifier),
                    Err(error) => {
                        tracing::error!(sentinel = %key, error = %error_chain(&error), "token keys could not be loaded; every token is refused")
                    }
                }
            }
            state.sentinels.insert(key.to_owned(), Arc::new(sentinel));
        }
    }

    fn start_downstream(&self, state: &mut State, key: &str) {
        if let Some(Definition::Downstream(definition)) = state
            .parsed
            .get(&(DefinitionKind::Downstream, key.to_owned()))
        {
            if !definition.enabled {
                return;
            }
            let mut definition = definition.clone();
            match resolved_headers(&definition.headers) {
                Ok(headers) => definition.headers = headers,
                Err(error) => {
                    tracing::error!(downstream = %key, error = %error, "downstream not started");
                    return;
                }
            }
            let (handle, task) = Downstream::start(&definition, &self.parts.downstream_context);
            state
                .downstreams
                .insert(key.to_owned(), RunningDownstream { handle, task });
        }
    }

    /// Builds the topology from the running sentinels, downstreams and the valid routes.
    fn install_topology(&self, state: &State) {
        let routes: Vec<_> = state
            .parsed
            .values()
            .filter_map(|d| match d {
                Definition::Route(route) => Some(route.clone()),
                _ => None,
            })
            .collect();
        let topology = Topology {
            sentinels: state.sentinels.clone(),
            router: Router::new(&routes, &self.parts.pipeline.metrics),
            downstreams: state
                .downstreams
                .iter()
                .map(|(k, d)| (k.clone(), d.handle.clone()))
                .collect(),
        };
        self.parts.pipeline.replace_topology(topology);
    }

    async fn start_listener(&self, state: &mut State, key: &str) {
        let Some(Definition::Listener(definition)) = state
            .parsed
            .get(&(DefinitionKind::Listener, key.to_owned()))
            .cloned()
        else {
            return;
        };
        let secret = state
            .stored
            .get(&(DefinitionKind::Listener, key.to_owned()))
            .and_then(|s| s.secret.clone());
        let metrics = &self.parts.pipeline.metrics;
        let status = Arc::new(ListenerStatus::new(
            key,
            ListenerState::Connecting,
            metrics.listener(key),
        ));
        self.statuses
            .write()
            .expect("statuses lock")
            .insert(key.to_owned(), status.clone());
        if !definition.enabled {
            status.set(ListenerState::Disabled, None);
            return;
        }
        let context = ListenerContext::new(&definition, metrics);
        let token = self.parts.shutdown.child_token();
        match definition.mode {
            ListenerMode::Client => {
                let mut definition = definition;
                match resolved_headers(&definition.headers) {
                    Ok(headers) => definition.headers = headers,
                    Err(error) => {
                        status.set(ListenerState::Error, Some(error));
                        return;
                    }
                }
                let password = secret.as_deref().and_then(|s| self.parts.sealer.unseal(s));
                if !definition.anonymous && password.is_none() {
                    status.set(ListenerState::Error, Some("the stored password cannot be unsealed with this server secret; set it again".into()));
                    return;
                }
                let listener = Arc::new(ClientListener::new(
                    definition,
                    context,
                    status,
                    password,
                    self.parts.client_tls.clone(),
                    self.parts.pipeline.clone(),
                    token,
                ));
                let task = self.parts.runtime.spawn(listener.clone().run());
                state
                    .listeners
                    .insert(key.to_owned(), RunningListener::Client { listener, task });
            }
            ListenerMode::Server => {
                let basic = if definition.anonymous {
                    None
                } else {
                    let Some(hash) = secret
                        .as_deref()
                        .and_then(|s| s.strip_prefix(ARGON2_PREFIX))
                    else {
                        status.set(ListenerState::Error, Some("no password hash is stored for this listener; set the password again".into()));
                        return;
                    };
                    Some(BasicCredentialVerifier::new(
                        definition.user_name.clone().unwrap_or_default(),
                        hash.to_owned(),
                        self.parts.hashing.clone(),
                        self.parts.basic_attempts.clone(),
                    ))
                };
                let listener = Arc::new(ServerListener::new(
                    definition.clone(),
                    context,
                    status.clone(),
                    basic,
                    self.parts.pipeline.clone(),
                    self.parts.downstream_context.bus.clone(),
                    self.parts.limits.clone(),
                    token,
                ));
                if definition.port.is_none() {
                    let mut mounts = HashMap::clone(&self.mounts.load());
                    mounts.insert(definition.path.clone(), listener.clone());
                    self.mounts.store(Arc::new(mounts));
                    let url = self
                        .main_address
                        .get()
                        .map(|(a, tls)| {
                            let scheme = if *tls { "wss" } else { "ws" };
                            format!("{scheme}://{a}{}", definition.path)
                        })
                        .unwrap_or_default();
                    iotgate_listener::server::mark_running(&status, url);
                    state.listeners.insert(
                        key.to_owned(),
                        RunningListener::Server {
                            listener,
                            own_server: None,
                        },
                    );
                } else {
                    let settings = OwnPortSettings {
                        handshake_timeout: self.parts.handshake_timeout,
                        port_offset: self.parts.port_offset,
                        trusted_proxies: self.parts.trusted_proxies.clone(),
                        runtime: self.parts.runtime.clone(),
                    };
                    match iotgate_listener::own_port::serve(&listener, &settings) {
                        Ok(server) => {
                            let address = server.address;
                            let scheme = if definition.secure { "wss" } else { "ws" };
                            let host = if address.ip().is_unspecified() {
                                "127.0.0.1".to_owned()
                            } else {
                                address.ip().to_string()
                            };
                            iotgate_listener::server::mark_running(
                                &status,
                                format!("{scheme}://{host}:{}{}", address.port(), definition.path),
                            );
                            state.listeners.insert(
                                key.to_owned(),
                                RunningListener::Server {
                                    listener,
                                    own_server: Some(server),
                                },
                            );
                        }
                        Err(error) => {
                            tracing::error!(listener = %key, error = %error, "listener could not start");
                            status.set(ListenerState::Error, Some(error));
                        }
                    }
                }
            }
        }
    }

    async fn stop_listener(&self, running: RunningListener) {
        running.token().cancel();
        match running {
            RunningListener::Server {
                listener,
                own_server,
            } => {
                let path = &listener.definition.path;
                let current = self.mounts.load();
                if current.get(path).is_some_and(|l| Arc::ptr_eq(l, &listener)) {
                    let mut mounts = HashMap::clone(&current);
                    mounts.remove(path);
                    self.mounts.store(Arc::new(mounts));
                }
                if let Some(server) = own_server {
                    server.handle.stop(true).await;
                    let _ = tokio::time::timeout(Duration::from_secs(5), server.task).await;
                }
                listener.status.set(ListenerState::Stopped, None);
            }
            RunningListener::Client { task, .. } => {
                let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
            }
        }
    }

    /// Device connections still open, over all listeners.
    fn open_connections(&self) -> i64 {
        self.statuses
            .read()
            .expect("statuses lock")
            .values()
            .map(|s| s.view().connections)
            .sum()
    }

    /// Stops every listener, then lets every downstream module drain: nothing accepted is lost.
    pub async fn shutdown(&self) {
        let mut state = self.state.lock().await;
        let listeners: Vec<RunningListener> = state.listeners.drain().map(|(_, l)| l).collect();
        for listener in &listeners {
            listener.token().cancel();
        }
        for listener in listeners {
            self.stop_listener(listener).await;
        }
        // A connection finishes the message it is handling, and on an acknowledging listener
        // waits for the answers of its messages in flight (at most DRAIN_LIMIT), before it
        // closes; only then may the pipeline be taken down, or those messages would find no
        // sentinel or downstream.
        let deadline = tokio::time::Instant::now()
            + iotgate_listener::acks::DRAIN_LIMIT
            + Duration::from_secs(5);
        while self.open_connections() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Drop every sender: the empty topology, and the supervisor's own handles.
        self.parts.pipeline.replace_topology(Topology::default());
        let mut tasks: Vec<JoinHandle<()>> = state.draining.drain(..).collect();
        tasks.extend(state.downstreams.drain().filter_map(|(_, d)| d.task));
        state.sentinels.clear();
        drop(state);
        for task in tasks {
            if tokio::time::timeout(Duration::from_secs(30), task)
                .await
                .is_err()
            {
                tracing::error!("a downstream module did not drain within 30 s");
            }
        }
        self.parts.pipeline.dead_letters.flush().await;
    }
}

/// The header values a module sends (client-mode listeners, webhooks).
fn sent_headers(definition: &Definition) -> Option<&BTreeMap<String, String>> {
    match definition {
        Definition::Listener(l) if l.mode == ListenerMode::Client => Some(&l.headers),
        Definition::Downstream(d) if d.downstream_type == DownstreamType::Webhook => {
            Some(&d.headers)
        }
        _ => None,
    }
}

/// `${NAME}` in sent header values must name a set variable: checked on write (422 naming it)
/// and resolved when the module starts.
fn header_variable_problems(definition: &Definition) -> Vec<Problem> {
    let Some(headers) = sent_headers(definition) else {
        return Vec::new();
    };
    headers
        .iter()
        .filter_map(|(name, value)| {
            iotgate_core::env_subst::substitute_env(value)
                .err()
                .map(|error| Problem::new(format!("/headers/{name}"), error.to_string()))
        })
        .collect()
}

/// The header values with `${NAME}` resolved from the environment.
fn resolved_headers(
    headers: &BTreeMap<String, String>,
) -> Result<BTreeMap<String, String>, String> {
    headers
        .iter()
        .map(|(name, value)| {
            iotgate_core::env_subst::substitute_env(value)
                .map(|resolved| (name.clone(), resolved))
                .map_err(|error| format!("header {name}: {error}"))
        })
        .collect()
}

fn keys_of(state: &State, kind: DefinitionKind) -> Vec<String> {
    state
        .parsed
        .keys()
        .filter(|(k, _)| *k == kind)
        .map(|(_, key)| key.clone())
        .collect()
}

fn definition_key(document: &Value) -> String {
    document
        .get("key")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned()
}

/// The first definition that refers to `kind`/`key`, as "listener x" / "route y".
fn users_of(state: &State, kind: DefinitionKind, key: &str) -> Option<String> {
    state.parsed.values().find_map(|d| match (kind, d) {
        (DefinitionKind::Sentinel, Definition::Listener(l))
            if l.sentinel.as_deref() == Some(key) =>
        {
            Some(format!("listener {}", l.key))
        }
        (DefinitionKind::Downstream, Definition::Route(r))
            if r.downstreams.iter().any(|d| d == key) =>
        {
            Some(format!("route {}", r.key))
        }
        (DefinitionKind::Listener, Definition::Route(r))
            if r.listeners.iter().flatten().any(|l| l == key) =>
        {
            Some(format!("route {}", r.key))
        }
        _ => None,
    })
}

/// A main-port path the static content mount covers.
fn static_mount_conflict(mount: Option<&str>, definition: &Definition) -> Option<String> {
    let mount = mount?;
    let (what, key, path) = match definition {
        Definition::Listener(l) if l.is_path_mounted() => ("listener", &l.key, &l.path),
        Definition::Downstream(d) if d.downstream_type == DownstreamType::Websocket => {
            ("downstream", &d.key, d.path.as_ref()?)
        }
        _ => return None,
    };
    let under = path == mount || path.starts_with(&format!("{}/", mount.trim_end_matches('/')));
    under.then(|| {
        format!("the path {path} of {what} {key} lies under the static content mount {mount} (--static-mount)")
    })
}

/// A main-port path already used by another listener or subscriber endpoint.
fn path_conflict(state: &State, definition: &Definition) -> Option<String> {
    let (own_key, path) = match definition {
        Definition::Listener(l) if l.is_path_mounted() => (&l.key, &l.path),
        Definition::Downstream(d) if d.downstream_type == DownstreamType::Websocket => {
            (&d.key, d.path.as_ref()?)
        }
        _ => return None,
    };
    state.parsed.values().find_map(|other| {
        let (other_key, other_path, what) = match other {
            Definition::Listener(l) if l.is_path_mounted() => (&l.key, &l.path, "listener"),
            Definition::Downstream(d) if d.downstream_type == DownstreamType::Websocket => {
                (&d.key, d.path.as_ref()?, "downstream")
            }
            _ => return None,
        };
        (other_key != own_key && other_path == path)
            .then(|| format!("the path {path} is already used by {what} {other_key}"))
    })
}
