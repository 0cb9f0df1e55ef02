//! Start-up and shutdown: opens the data directory and database, fills the device registry,
//! starts the pipeline and every stored module, binds the main port (admin API, path-mounted
//! listeners, subscriber endpoints; HTTPS when given a certificate), and on a stop signal drains
//! everything in order.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use actix_web::dev::Service as _;
use actix_web::{web, App, HttpRequest, HttpResponse, HttpServer};
use iotgate_core::credentials::{KeyHasher, KeySealer};
use iotgate_core::SchemaRegistry;
use iotgate_listener::subscriber::{serve_subscriber, SubscriberFilter, SubscriptionLimits};
use iotgate_listener::{AttemptLimiter, ConnectionLimitSettings, ConnectionLimits, TrustedProxies};
use iotgate_pipeline::downstream::DeliveryMode;
use iotgate_pipeline::downstream::DownstreamContext;
use iotgate_pipeline::{DeadLetterLimits, DeadLetters, DeviceRegistry, Metrics, Outbox, Pipeline};
use iotgate_store::{SecretCheck, ServerSecret, Store};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::accounts::Accounts;
use crate::api::{self, AppState};
use crate::audit::AuditLog;
use crate::auth::guard::{authenticate_request, from_own_origin};
use crate::auth::{AdminAuth, CredentialSource};
use crate::cluster::Cluster;
use crate::config::Config;
use crate::sealing::PasswordSealer;
use crate::supervisor::{Supervisor, SupervisorParts};
use crate::tls::ReloadableCertificate;

pub struct Application {
    address: SocketAddr,
    tls: bool,
    server: actix_web::dev::Server,
    /// The `--metrics-bind` server, if any.
    metrics_server: Option<actix_web::dev::Server>,
    state: web::Data<AppState>,
    /// Printed once by the binary when the first admin's password was generated.
    pub generated_admin_password: Option<String>,
    contact_flusher: tokio::task::JoinHandle<()>,
    contact_flusher_stop: CancellationToken,
    dead_letter_task: tokio::task::JoinHandle<()>,
    /// Audit summaries and retention; certificate reloads. Stopped after the servers.
    background_stop: CancellationToken,
    audit_task: tokio::task::JoinHandle<()>,
    /// Pings the database; its state is what /healthz and `iotgate_database_up` report.
    health_task: tokio::task::JoinHandle<()>,
    /// Heartbeat row and, on PostgreSQL, other nodes' changes (see [`crate::cluster`]).
    cluster_task: tokio::task::JoinHandle<()>,
    /// The NATS bus between nodes (`--bus-url`), stopped last.
    bus_stop: CancellationToken,
    bus_task: Option<tokio::task::JoinHandle<()>>,
    /// Device presence events: remembered, routed, and queued messages handed over.
    presence_task: tokio::task::JoinHandle<()>,
    /// Dead-letters queued messages to devices that expired.
    outbox_sweeper: tokio::task::JoinHandle<()>,
}

/// Creates the data directory readable by iotgate alone (0700). An existing directory is left as
/// the operator made it, with a warning when others can read it.
fn prepare_data_dir(dir: &Path) -> anyhow::Result<()> {
    if dir.exists() {
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir)?.permissions().mode();
            if mode & 0o077 != 0 {
                tracing::warn!(dir = %dir.display(), mode = format!("{:o}", mode & 0o777), "the data directory can be read by other users; it holds the server secret and the database: chmod 700 it");
            }
        }
        return Ok(());
    }
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        builder.mode(0o700);
    }
    builder
        .create(dir)
        .map_err(|e| anyhow::anyhow!("cannot create the data directory {}: {e}", dir.display()))
}

/// The file of a `sqlite:` URL (`None` for an in-memory database or another engine).
fn sqlite_file(url: &str) -> Option<std::path::PathBuf> {
    let rest = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))?;
    let path = rest.split('?').next().unwrap_or_default();
    (!path.is_empty() && path != ":memory:").then(|| std::path::PathBuf::from(path))
}

/// The database file and its WAL companions readable by iotgate alone (0600). The file is
/// created before SQLite opens it, since SQLite gives its journal files the database's mode.
fn secure_database_file(url: &str) -> anyhow::Result<()> {
    let Some(path) = sqlite_file(url) else {
        return Ok(());
    };
    #[cfg(unix)]
    {
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        if !path.exists() {
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
                .map_err(|e| {
                    anyhow::anyhow!("cannot create the database {}: {e}", path.display())
                })?;
        }
        for suffix in ["", "-wal", "-shm"] {
            let file = std::path::PathBuf::from(format!("{}{suffix}", path.display()));
            if let Ok(metadata) = std::fs::metadata(&file) {
                if metadata.permissions().mode() & 0o077 != 0 {
                    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600))?;
                }
            }
        }
    }
    Ok(())
}

/// The server secret from `--secret-file` (default `<data-dir>/server.secret`), checked against
/// the database: a node whose secret is not the one the database was set up with could verify
/// no device key the others issued, so it refuses to start, and a missing file is only created
/// for a database that has no secret yet.
async fn server_secret(config: &Config, store: &Store) -> anyhow::Result<ServerSecret> {
    let path = config
        .secret_file
        .clone()
        .unwrap_or_else(|| ServerSecret::default_path(&config.data_dir));
    let secret = match ServerSecret::load(&path)? {
        Some(secret) => secret,
        None if store.secret_check().await?.is_some() => anyhow::bail!(
            "there is no server secret at {}, and the database was set up with one: copy the \
             secret file of a node already using this database there (or point --secret-file \
             / IOTGATE_SECRET_FILE at it)",
            path.display()
        ),
        None => ServerSecret::create(&path)?,
    };
    match store.settle_secret_check(&secret.check_value()).await? {
        SecretCheck::Recorded | SecretCheck::Matches => Ok(secret),
        SecretCheck::Mismatch => anyhow::bail!(
            "the server secret at {} does not match the secret this database was set up with: \
             every node sharing a database needs a copy of the same secret file (--secret-file / \
             IOTGATE_SECRET_FILE)",
            path.display()
        ),
    }
}

/// Connects to the NATS bus of `--bus-url`. Subjects are prefixed with the start of the server
/// secret's check value, so the nodes of one platform (one secret) share them and other
/// platforms on the same NATS server are not heard. The error names the host, never the URL's
/// credentials.
async fn connect_bus(
    url: &str,
    secret: &ServerSecret,
    store: &Store,
    pipeline: &Arc<iotgate_pipeline::Pipeline>,
    metrics: &Arc<Metrics>,
    stop: &CancellationToken,
) -> anyhow::Result<(iotgate_pipeline::bus::LiveBus, tokio::task::JoinHandle<()>)> {
    let host = url::Url::parse(url)
        .ok()
        .and_then(|u| Some(format!("{}:{}", u.host_str()?, u.port().unwrap_or(4222))))
        .unwrap_or_else(|| "the --bus-url host".to_owned());
    let settings = iotgate_pipeline::bus::BusSettings {
        url: url.to_owned(),
        subject_prefix: format!("iotgate.{}", &secret.check_value()[..16]),
        node: store.node_id().to_owned(),
    };
    let connecting =
        iotgate_pipeline::bus::connect(settings, pipeline.clone(), metrics.clone(), stop.clone());
    match tokio::time::timeout(Duration::from_secs(10), connecting).await {
        Ok(Ok(connected)) => {
            tracing::info!(bus = %host, "connected to the NATS bus between nodes");
            Ok(connected)
        }
        Ok(Err(error)) => anyhow::bail!("cannot connect to the NATS bus at {host}: {error}"),
        Err(_) => anyhow::bail!("cannot connect to the NATS bus at {host}: no answer within 10 s"),
    }
}

/// Trust roots for outbound TLS (client-mode listeners, webhooks): the public web roots plus
/// any operator-supplied CA file.
fn client_tls(config: &Config) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(path) = &config.tls_ca_file {
        let file = std::fs::File::open(path)
            .map_err(|e| anyhow::anyhow!("cannot open the CA file {}: {e}", path.display()))?;
        for cert in rustls_pemfile::certs(&mut std::io::BufReader::new(file)) {
            roots.add(cert?)?;
        }
    }
    Ok(Arc::new(
        rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    ))
}

/// `--static-dir` and its mount, checked: the directory exists, and the mount is a path of its
/// own (not `/`, the API, the admin UI's assets, health or metrics).
fn static_content(config: &Config) -> anyhow::Result<Option<(String, std::path::PathBuf)>> {
    let Some(dir) = &config.static_dir else {
        return Ok(None);
    };
    if !dir.is_dir() {
        anyhow::bail!("--static-dir {} is not a directory", dir.display());
    }
    let mount = config.static_mount.trim_end_matches('/').to_owned();
    if !mount.starts_with('/') || mount.is_empty() {
        anyhow::bail!(
            "--static-mount {} must be a path such as /site (not /, which serves the admin UI)",
            config.static_mount
        );
    }
    if let Some(problem) = iotgate_core::definition::reserved_path_problem("", &mount) {
        anyhow::bail!("--static-mount {mount}: {}", problem.message);
    }
    Ok(Some((mount, dir.clone())))
}

impl Application {
    pub async fn build(config: Config) -> anyhow::Result<Self> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        prepare_data_dir(&config.data_dir)?;
        let database_url = config
            .database_url
            .clone()
            .unwrap_or_else(|| Store::default_url(&config.data_dir));
        secure_database_file(&database_url)?;
        let store = Store::connect(&database_url).await?;
        let secret = server_secret(&config, &store).await?;
        let runtime = tokio::runtime::Handle::current();
        let trusted_proxies = Arc::new(
            TrustedProxies::parse(&config.trusted_proxies)
                .map_err(|e| anyhow::anyhow!("--trusted-proxies: {e}"))?,
        );
        let certificate = match (&config.tls_cert_file, &config.tls_key_file) {
            (Some(cert), Some(key)) => Some(ReloadableCertificate::load(cert, key)?),
            _ => None,
        };
        let tls = certificate.is_some();

        let metrics = Arc::new(Metrics::new());
        metrics
            .node_info
            .get_or_create(&vec![("node".to_owned(), store.node_id().to_owned())])
            .set(1);
        let registry = Arc::new(DeviceRegistry::new(
            KeyHasher::new(secret.bytes()),
            KeySealer::new(secret.bytes()),
        ));
        registry.load(&store.all_devices().await?);
        tracing::info!(devices = registry.len(), "device registry loaded");
        let (dead_letters, dead_letter_task) = DeadLetters::start(
            store.clone(),
            metrics.clone(),
            10_000,
            DeadLetterLimits {
                max_rows: config.dead_letter_max_rows,
                max_bytes: config.dead_letter_max_bytes,
                rate_per_address: config.dead_letter_rate_per_ip,
            },
            &runtime,
        );
        let pipeline = Arc::new(Pipeline::new(
            registry.clone(),
            dead_letters.clone(),
            metrics.clone(),
        ));

        let bus_stop = CancellationToken::new();
        let (bus, bus_task) = match &config.bus_url {
            Some(url) => {
                let (bus, task) =
                    connect_bus(url, &secret, &store, &pipeline, &metrics, &bus_stop).await?;
                (Some(bus), Some(task))
            }
            None => (None, None),
        };

        let contact_flusher_stop = CancellationToken::new();
        let contact_flusher = runtime.spawn(registry.clone().run_contact_flusher(
            store.clone(),
            Duration::from_secs(2),
            contact_flusher_stop.clone(),
        ));

        let static_content = static_content(&config)?;
        let client_tls = client_tls(&config)?;
        let http = reqwest::Client::builder()
            .use_preconfigured_tls(rustls::ClientConfig::clone(&client_tls))
            .user_agent(concat!("iotgate/", env!("CARGO_PKG_VERSION")))
            // A webhook answers for itself: a redirect could send envelopes (and the webhook's
            // headers) to any host, so 3xx is a failed delivery like any other.
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        // Argon2 capacity: one verification per core for device Basic credentials, and a
        // separate capacity for admin logins, so no device storm can starve an admin.
        let device_hashing = Arc::new(Semaphore::new(cores));
        let admin_hashing = Arc::new(Semaphore::new((cores / 2).max(1)));
        let shutdown = CancellationToken::new();
        let handshake_timeout = Duration::from_millis(config.handshake_timeout_ms.max(100));
        let schemas = Arc::new(SchemaRegistry::new());
        let supervisor = Arc::new(Supervisor::new(SupervisorParts {
            store: store.clone(),
            schemas: schemas.clone(),
            pipeline: pipeline.clone(),
            runtime: runtime.clone(),
            sealer: PasswordSealer::new(secret.bytes()),
            downstream_context: DownstreamContext {
                store: store.clone(),
                metrics: metrics.clone(),
                dead_letters: dead_letters.clone(),
                http,
                runtime: runtime.clone(),
                client_tls: client_tls.clone(),
                bus: bus.clone(),
                connections: pipeline.connections.clone(),
            },
            hashing: device_hashing,
            basic_attempts: Arc::new(AttemptLimiter::new(
                config.auth_failures_per_ip,
                Duration::from_secs(60),
            )),
            trusted_proxies: trusted_proxies.clone(),
            client_tls,
            limits: ConnectionLimits::new(ConnectionLimitSettings {
                max_connections: config.max_connections,
                max_connections_per_ip: config.max_connections_per_ip,
                connect_rate_per_ip: config.connect_rate_per_ip,
            }),
            handshake_timeout,
            port_offset: config.port_offset,
            static_mount: static_content.as_ref().map(|(mount, _)| mount.clone()),
            shutdown: shutdown.clone(),
        }));

        let auth = Arc::new(AdminAuth::new(store.clone(), admin_hashing));
        let generated_admin_password = auth.bootstrap(config.admin_password.as_deref()).await?;
        let audit = Arc::new(AuditLog::new(store.clone()));
        let accounts = Arc::new(Accounts::new(store.clone(), auth.clone(), schemas.clone()));

        let background_stop = CancellationToken::new();
        let retention = (config.audit_retention_days > 0)
            .then(|| time::Duration::days(i64::from(config.audit_retention_days)));
        audit.purge(retention).await;
        let health_task = {
            let store = store.clone();
            let metrics = metrics.clone();
            let stop = background_stop.clone();
            runtime.spawn(async move {
                store
                    .watch_health(stop, |up| {
                        metrics.database_up.set(i64::from(up));
                        if up {
                            metrics.database_reconnects.inc();
                        }
                    })
                    .await;
            })
        };
        let outbox = Arc::new(Outbox::new(
            store.clone(),
            pipeline.connections.clone(),
            dead_letters.clone(),
            metrics.clone(),
        ));
        let presence_task = runtime.spawn(iotgate_pipeline::presence::run_presence(
            pipeline.clone(),
            Some(outbox.clone()),
            background_stop.clone(),
        ));
        let outbox_sweeper = runtime.spawn(outbox.clone().run_sweeper(background_stop.clone()));
        let audit_task = audit.clone().spawn_maintenance(
            pipeline.auth_failures.clone(),
            auth.clone(),
            retention,
            background_stop.clone(),
        );
        #[cfg(unix)]
        if let Some(certificate) = &certificate {
            certificate
                .clone()
                .reload_on_sighup(background_stop.clone())?;
        }

        let state = web::Data::new(AppState {
            store: store.clone(),
            schemas,
            pipeline: pipeline.clone(),
            supervisor: supervisor.clone(),
            auth,
            accounts,
            audit,
            tls,
            shutdown: shutdown.clone(),
            bus,
            outbox,
        });
        let app_state = state.clone();
        let served_static = static_content.clone();
        let metrics_public = config.metrics_public;
        let proxies = trusted_proxies.clone();
        let server = HttpServer::new(move || {
            let proxies = proxies.clone();
            App::new()
                // First of all: who the client is (behind a trusted proxy, the one it names).
                .wrap_fn(move |request, service| {
                    iotgate_listener::client_address::attach(&request, &proxies, tls);
                    service.call(request)
                })
                .app_data(app_state.clone())
                .app_data(web::QueryConfig::default().error_handler(api::query_error))
                .app_data(web::PathConfig::default().error_handler(api::path_error))
                .app_data(web::PayloadConfig::new(1024 * 1024))
                .configure(|c| api::configure(c, metrics_public))
                .configure(crate::ui::configure)
                .configure(|config| {
                    if let Some((mount, dir)) = &served_static {
                        // actix-files refuses paths that leave the directory and hidden files.
                        config
                            .service(actix_files::Files::new(mount, dir).index_file("index.html"));
                    }
                })
                .default_service(web::to(dispatch))
        })
        .disable_signals()
        .shutdown_timeout(5)
        .backlog(4096)
        .max_connections(100_000)
        .client_request_timeout(handshake_timeout)
        // Close the TCP connection as soon as a response (or a WebSocket closing handshake) is
        // done, instead of lingering for the peer to close first: clients expect the server
        // to drop TCP after the close frames (RFC 6455 7.1.1), and idle sockets cost memory.
        .client_disconnect_timeout(Duration::ZERO)
        // Acks, refusals and live frames are small writes that must leave at once: with Nagle's
        // algorithm on (the OS default actix keeps), a lightly loaded subscriber or an acking
        // device waited for the peer's delayed ACK (p99 13.8 ms at 10,000 msg/s against 7.4 ms
        // at 20,000 in the capacity bench).
        .tcp_nodelay(true)
        .tls_handshake_timeout(handshake_timeout);
        let server = match &certificate {
            Some(certificate) => server.bind_rustls_0_23(config.bind, certificate.server_config()),
            None => server.bind(config.bind),
        }
        .map_err(|e| anyhow::anyhow!("cannot bind {}: {e}", config.bind))?;
        let address = *server.addrs().first().expect("bound to one address");
        supervisor.set_main_address(address, tls);
        supervisor.start_all().await?;
        let cluster_task = Arc::new(Cluster {
            store: store.clone(),
            supervisor: supervisor.clone(),
            registry: registry.clone(),
            auth: state.auth.clone(),
            address: format!("{}://{address}", if tls { "https" } else { "http" }),
            started_at: crate::cluster::timestamp_ago(Duration::ZERO),
        })
        .spawn(background_stop.clone());
        let server = server.run();

        let metrics_server = match config.metrics_bind {
            Some(bind) => {
                let pipeline = pipeline.clone();
                let server = HttpServer::new(move || {
                    let pipeline = pipeline.clone();
                    App::new().route(
                        "/metrics",
                        web::get().to(move || {
                            let pipeline = pipeline.clone();
                            async move { api::metrics_response(&pipeline) }
                        }),
                    )
                })
                .workers(1)
                .disable_signals()
                .shutdown_timeout(1)
                .bind(bind)
                .map_err(|e| anyhow::anyhow!("cannot bind --metrics-bind {bind}: {e}"))?;
                let bound = server.addrs();
                tracing::info!(addresses = ?bound, "metrics served without authentication");
                Some(server.run())
            }
            None => None,
        };

        Ok(Self {
            address,
            tls,
            server,
            metrics_server,
            state,
            generated_admin_password,
            contact_flusher,
            contact_flusher_stop,
            dead_letter_task,
            background_stop,
            audit_task,
            health_task,
            cluster_task,
            bus_stop,
            bus_task,
            presence_task,
            outbox_sweeper,
        })
    }

    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// `https` when the main port serves TLS, else `http`.
    pub fn scheme(&self) -> &'static str {
        if self.tls {
            "https"
        } else {
            "http"
        }
    }

    /// Serves until `stop` resolves, then shuts down gracefully: stop accepting, close device
    /// connections with 1001, drain every downstream queue and dead letter, flush device
    /// contacts, close the database.
    pub async fn run_until(
        self,
        stop: impl std::future::Future<Output = ()>,
    ) -> anyhow::Result<()> {
        let handle = self.server.handle();
        let server = tokio::spawn(self.server);
        let metrics_server = self.metrics_server.map(|server| {
            let handle = server.handle();
            (handle, tokio::spawn(server))
        });
        stop.await;
        tracing::info!("stopping: closing connections and draining queues");
        self.state.shutdown.cancel();
        let stopping = tokio::spawn(handle.stop(true));
        self.state.supervisor.shutdown().await;
        let _ = stopping.await;
        let _ = server.await;
        if let Some((handle, task)) = metrics_server {
            handle.stop(true).await;
            let _ = task.await;
        }
        self.background_stop.cancel();
        let _ = self.audit_task.await;
        let _ = self.health_task.await;
        let _ = self.cluster_task.await;
        let _ = self.presence_task.await;
        let _ = self.outbox_sweeper.await;
        self.bus_stop.cancel();
        if let Some(task) = self.bus_task {
            let _ = tokio::time::timeout(Duration::from_secs(2), task).await;
        }
        self.contact_flusher_stop.cancel();
        let _ = self.contact_flusher.await;
        let store = self.state.store.clone();
        drop(self.state);
        // The dead letter writer ends when its last sender is gone; do not wait forever on a
        // stray clone.
        let _ = tokio::time::timeout(Duration::from_secs(2), self.dead_letter_task).await;
        store.close().await;
        tracing::info!("stopped");
        Ok(())
    }
}

/// Everything on the main port that is not the API: path-mounted listeners and the subscriber
/// endpoints of websocket downstream modules.
async fn dispatch(
    state: web::Data<AppState>,
    request: HttpRequest,
    body: web::Payload,
) -> HttpResponse {
    let path = request.path().to_owned();
    let listener = state.supervisor.mounts.load().get(&path).cloned();
    if let Some(listener) = listener {
        return listener.handle_upgrade(request, body).await;
    }
    if let Some(hub) = state.pipeline.topology().hub_at(&path) {
        // Any signed-in role may watch the live view.
        let principal = match authenticate_request(&state, &request, true).await {
            Ok(principal) => principal,
            Err(_) => {
                return HttpResponse::Unauthorized().json(serde_json::json!({"error": {
                    "code": "unauthorized",
                    "message": "subscribers need a token (?token=, Authorization: Bearer, or the session cookie)"}}));
            }
        };
        // A browser sends the session cookie with a WebSocket opened by any page of the same
        // host (SameSite ignores ports), so a subscription whose credential is the cookie must
        // come from our own origin, or another page could read the live feed (cross-site
        // WebSocket hijacking). Only a token the request carries itself (header or query),
        // and that actually authenticated it, exempts it.
        if principal.source == CredentialSource::Cookie
            && !from_own_origin(&request, principal.client.forwarded_host.as_deref())
        {
            return HttpResponse::Forbidden().json(serde_json::json!({"error": {
                "code": "forbidden",
                "message": "a subscription riding on the session cookie must come from the admin UI's origin"}}));
        }
        let limits = SubscriptionLimits {
            revoked: state.auth.revocation_signal(&principal),
            expires_in: (principal.expires_at - time::OffsetDateTime::now_utc())
                .try_into()
                .unwrap_or(Duration::ZERO),
        };
        let mut filter = SubscriberFilter::default();
        let mut mode = DeliveryMode::All;
        for (name, value) in url::form_urlencoded::parse(request.query_string().as_bytes()) {
            match &*name {
                "deviceId" => filter.device_id = Some(value.into_owned()),
                "listener" => filter.listener = Some(value.into_owned()),
                "mode" => match &*value {
                    "all" => mode = DeliveryMode::All,
                    "latest" => mode = DeliveryMode::Latest,
                    other => {
                        return HttpResponse::BadRequest().json(serde_json::json!({"error": {
                            "code": "bad_request",
                            "message": format!("mode is all or latest, not {other}")}}));
                    }
                },
                _ => {}
            }
        }
        return serve_subscriber(
            hub,
            &request,
            body,
            filter,
            mode,
            state.shutdown.clone(),
            limits,
        );
    }
    HttpResponse::NotFound().json(serde_json::json!({"error": {
        "code": "not_found",
        "message": format!("nothing is served at {}; the API is under /api/v1", iotgate_core::log_safe::LogSafe(&path))}}))
}
