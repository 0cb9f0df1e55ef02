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

use actix_web::{web, App, HttpRequest, HttpResponse, HttpServer};
use arc_swap::ArcSwap;
use iotgate_core::definition::{DefinitionKind, DownstreamType, ListenerMode};
use iotgate_core::{Definition, Problem, SchemaRegistry};
use iotgate_listener::{
    BasicCredentialVerifier, ClientListener, ConnectionLimits, ListenerState, ListenerStatus,
    ListenerStatusView, ServerListener,
};
use iotgate_pipeline::downstream::DownstreamContext;
use iotgate_pipeline::{Downstream, ListenerContext, Pipeline, Router, Sentinel, Topology};
use iotgate_store::{Store, StoredDefinition};
use serde_json::Value;
use time::OffsetDateTime;
use tokio::sync::{Mutex, Semaphore};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::error::ApiError;
use crate::sealing::PasswordSealer;

/// Prefix of a server-mode listener's stored password (an Argon2id PHC string follows).
const ARGON2_PREFIX: &str = "argon2:";

/// Path-mounted server listeners of the main port, by path. Read per upgrade request.
pub type MountTable = ArcSwap<HashMap<String, Arc<ServerListener>>>;

enum RunningListener {
    Server {
        listener: Arc<ServerListener>,
        own_server: Option<(actix_web::dev::ServerHandle, JoinHandle<()>)>,
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
    pub hashing: Arc<Semaphore>,
    pub client_tls: Arc<rustls::ClientConfig>,
    pub limits: Arc<ConnectionLimits>,
    /// Time a client has to send its upgrade request (and finish TLS) on own-port listeners.
    pub handshake_timeout: Duration,
    pub shutdown: CancellationToken,
}

pub struct Supervisor {
    parts: SupervisorParts,
    /// The main port's address, for listener URLs.
    main_address: std::sync::OnceLock<SocketAddr>,
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

    pub fn set_main_address(&self, address: SocketAddr) {
        let _ = self.main_address.set(address);
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
                let key = stored.key.clone();
                let password_stored = stored.secret.is_some();
                match Definition::parse(
                    &self.parts.schemas,
                    kind,
                    &stored.document,
                    password_stored,
                ) {
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

    pub async fn list(&self, kind: DefinitionKind) -> Vec<Value> {
        let state = self.state.lock().await;
        state
            .stored
            .range((kind, String::new())..)
            .take_while(|((k, _), _)| *k == kind)
            .map(|(_, stored)| stored.document.clone())
            .collect()
    }

    pub async fn get(&self, kind: DefinitionKind, key: &str) -> Result<Value, ApiError> {
        let state = self.state.lock().await;
        state
            .stored
            .get(&(kind, key.to_owned()))
            .map(|s| s.document.clone())
            .ok_or_else(|| ApiError::NotFound(format!("{kind} {key} not found")))
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

    pub async fn create(&self, kind: DefinitionKind, document: Value) -> Result<Value, ApiError> {
        let mut state = self.state.lock().await;
        let key = document
            .get("key")
            .and_then(Value::as_str)
            .map(str::to_owned);
        if let Some(key) = &key {
            if state.stored.contains_key(&(kind, key.clone())) {
                return Err(ApiError::Conflict(format!("{kind} {key} already exists")));
            }
        }
        let (definition, stored) = self.prepare(&state, kind, document, None).await?;
        self.parts.store.insert_definition(&stored).await?;
        tracing::info!(kind = %kind, key = %stored.key, "definition created");
        let response = stored.document.clone();
        self.apply(&mut state, kind, stored, Some(definition)).await;
        Ok(response)
    }

    pub async fn update(
        &self,
        kind: DefinitionKind,
        key: &str,
        document: Value,
    ) -> Result<Value, ApiError> {
        let mut state = self.state.lock().await;
        let Some(previous) = state.stored.get(&(kind, key.to_owned())).cloned() else {
            return Err(ApiError::NotFound(format!("{kind} {key} not found")));
        };
        if document.get("key").and_then(Value::as_str) != Some(key) {
            return Err(ApiError::Validation(vec![Problem::new(
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
        let response = stored.document.clone();
        self.apply(&mut state, kind, stored, Some(definition)).await;
        Ok(response)
    }

    pub async fn delete(&self, kind: DefinitionKind, key: &str) -> Result<(), ApiError> {
        let mut state = self.state.lock().await;
        if !state.stored.contains_key(&(kind, key.to_owned())) {
            return Err(ApiError::NotFound(format!("{kind} {key} not found")));
        }
        if let Some(user) = users_of(&state, kind, key) {
            return Err(ApiError::Conflict(format!(
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
        Ok(())
    }

    /// Validates a write and produces the stored form (secret hashed or sealed, password removed).
    async fn prepare(
        &self,
        state: &State,
        kind: DefinitionKind,
        mut document: Value,
        previous: Option<&StoredDefinition>,
    ) -> Result<(Definition, StoredDefinition), ApiError> {
        if !document.is_object() {
            return Err(ApiError::Validation(vec![Problem::new(
                "",
                "a definition is a JSON object",
            )]));
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
            &document,
            reusable_secret.is_some(),
        )
        .map_err(ApiError::Validation)?;
        let problems = self.reference_problems(state, &definition);
        if !problems.is_empty() {
            return Err(ApiError::Validation(problems));
        }
        if let Some(conflict) = path_conflict(state, &definition) {
            return Err(ApiError::Conflict(conflict));
        }
        let mut secret = None;
        if let Definition::Listener(listener) = &definition {
            if !listener.anonymous {
                secret = match &listener.password {
                    Some(password) if listener.mode == ListenerMode::Client => {
                        Some(self.parts.sealer.seal(password))
                    }
                    Some(password) => Some(format!(
                        "{ARGON2_PREFIX}{}",
                        crate::auth::hash_password_async(password.clone()).await?
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
            }
            DefinitionKind::Downstream => {
                self.start_downstream(state, &key);
                self.install_topology(state);
            }
            DefinitionKind::Route => self.install_topology(state),
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
            let sentinel = Sentinel::new(definition.clone(), self.parts.pipeline.metrics.clone());
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
            let (handle, task) = Downstream::start(definition, &self.parts.downstream_context);
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
                    ))
                };
                let listener = Arc::new(ServerListener::new(
                    definition.clone(),
                    context,
                    status.clone(),
                    basic,
                    self.parts.pipeline.clone(),
                    self.parts.limits.clone(),
                    token,
                ));
                if definition.port.is_none() {
                    let mut mounts = HashMap::clone(&self.mounts.load());
                    mounts.insert(definition.path.clone(), listener.clone());
                    self.mounts.store(Arc::new(mounts));
                    let address = self.main_address.get().copied();
                    let url = address
                        .map(|a| format!("ws://{a}{}", definition.path))
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
                    match self.start_own_port(&listener) {
                        Ok((address, handle, task)) => {
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
                                    own_server: Some((handle, task)),
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

    /// Binds an own-port HTTP server (optionally TLS) that serves only this listener's path.
    fn start_own_port(
        &self,
        listener: &Arc<ServerListener>,
    ) -> Result<(SocketAddr, actix_web::dev::ServerHandle, JoinHandle<()>), String> {
        let definition = &listener.definition;
        let host = definition
            .host_name
            .clone()
            .unwrap_or_else(|| "0.0.0.0".to_owned());
        let port = definition.port.unwrap_or(0);
        let served = listener.clone();
        let server = HttpServer::new(move || {
            let served = served.clone();
            App::new().default_service(web::to(move |request: HttpRequest, body: web::Payload| {
                let served = served.clone();
                async move {
                    if request.path() == served.definition.path {
                        served.handle_upgrade(request, body).await
                    } else {
                        HttpResponse::NotFound().json(serde_json::json!({"error": {"code": "not_found", "message": "no listener at this path"}}))
                    }
                }
            }))
        })
        .workers(2)
        .disable_signals()
        .shutdown_timeout(2)
        .backlog(4096)
        .client_request_timeout(self.parts.handshake_timeout)
        .client_disconnect_timeout(Duration::ZERO)
        .tls_handshake_timeout(self.parts.handshake_timeout);
        let server = if definition.secure {
            let config = load_server_tls(
                definition.tls_cert_file.as_deref().unwrap_or_default(),
                definition.tls_key_file.as_deref().unwrap_or_default(),
            )?;
            server.bind_rustls_0_23((host.as_str(), port), config)
        } else {
            server.bind((host.as_str(), port))
        }
        .map_err(|e| format!("could not bind {host}:{port}: {e}"))?;
        let address = *server.addrs().first().ok_or("no address bound")?;
        let running = server.run();
        let handle = running.handle();
        let task = self.parts.runtime.spawn(async move {
            if let Err(error) = running.await {
                tracing::error!(error = %error, "own-port listener server failed");
            }
        });
        Ok((address, handle, task))
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
                if let Some((handle, task)) = own_server {
                    handle.stop(true).await;
                    let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
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
        // A connection finishes the message it is handling before it closes; only then may the
        // pipeline be taken down, or that message would find no sentinel or downstream.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
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

fn load_server_tls(cert_file: &str, key_file: &str) -> Result<rustls::ServerConfig, String> {
    let certs = rustls_pemfile::certs(&mut std::io::BufReader::new(
        std::fs::File::open(cert_file)
            .map_err(|e| format!("cannot open tlsCertFile {cert_file}: {e}"))?,
    ))
    .collect::<Result<Vec<_>, _>>()
    .map_err(|e| format!("tlsCertFile {cert_file} is not PEM: {e}"))?;
    if certs.is_empty() {
        return Err(format!("tlsCertFile {cert_file} holds no certificate"));
    }
    let key = rustls_pemfile::private_key(&mut std::io::BufReader::new(
        std::fs::File::open(key_file)
            .map_err(|e| format!("cannot open tlsKeyFile {key_file}: {e}"))?,
    ))
    .map_err(|e| format!("tlsKeyFile {key_file} is not PEM: {e}"))?
    .ok_or_else(|| format!("tlsKeyFile {key_file} holds no private key"))?;
    rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| format!("the TLS certificate and key do not fit: {e}"))
}
