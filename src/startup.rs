//! Start-up and shutdown: opens the data directory and database, fills the device registry,
//! starts the pipeline and every stored module, binds the main port (admin API, path-mounted
//! listeners, subscriber endpoints), and on a stop signal drains everything in order.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use actix_web::{web, App, HttpRequest, HttpResponse, HttpServer};
use iotgate_core::credentials::KeyHasher;
use iotgate_core::SchemaRegistry;
use iotgate_listener::subscriber::{serve_subscriber, SubscriberFilter};
use iotgate_listener::{ConnectionLimitSettings, ConnectionLimits};
use iotgate_pipeline::downstream::DownstreamContext;
use iotgate_pipeline::{DeadLetters, DeviceRegistry, Metrics, Pipeline};
use iotgate_store::{ServerSecret, Store};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::api::{self, AppState};
use crate::auth::{presented_token, AdminAuth};
use crate::config::Config;
use crate::sealing::PasswordSealer;
use crate::supervisor::{Supervisor, SupervisorParts};

pub struct Application {
    address: SocketAddr,
    server: actix_web::dev::Server,
    state: web::Data<AppState>,
    /// Printed once by the binary when the first admin's password was generated.
    pub generated_admin_password: Option<String>,
    contact_flusher: tokio::task::JoinHandle<()>,
    contact_flusher_stop: CancellationToken,
    dead_letter_task: tokio::task::JoinHandle<()>,
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

impl Application {
    pub async fn build(config: Config) -> anyhow::Result<Self> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        std::fs::create_dir_all(&config.data_dir).map_err(|e| {
            anyhow::anyhow!(
                "cannot create the data directory {}: {e}",
                config.data_dir.display()
            )
        })?;
        let secret = ServerSecret::load_or_create(&config.data_dir)?;
        let database_url = config
            .database_url
            .clone()
            .unwrap_or_else(|| Store::default_url(&config.data_dir));
        let store = Store::connect(&database_url).await?;
        let runtime = tokio::runtime::Handle::current();

        let metrics = Arc::new(Metrics::new());
        let registry = Arc::new(DeviceRegistry::new(KeyHasher::new(secret.bytes())));
        registry.load(&store.all_devices().await?);
        tracing::info!(devices = registry.len(), "device registry loaded");
        let (dead_letters, dead_letter_task) =
            DeadLetters::start(store.clone(), metrics.clone(), 10_000, &runtime);
        let pipeline = Arc::new(Pipeline::new(
            registry.clone(),
            dead_letters.clone(),
            metrics.clone(),
        ));

        let contact_flusher_stop = CancellationToken::new();
        let contact_flusher = runtime.spawn(registry.clone().run_contact_flusher(
            store.clone(),
            Duration::from_secs(2),
            contact_flusher_stop.clone(),
        ));

        let client_tls = client_tls(&config)?;
        let http = reqwest::Client::builder()
            .use_preconfigured_tls(rustls::ClientConfig::clone(&client_tls))
            .user_agent(concat!("iotgate/", env!("CARGO_PKG_VERSION")))
            .build()?;
        // Argon2 verifications in parallel, process-wide: one per core.
        let hashing = Arc::new(Semaphore::new(
            std::thread::available_parallelism().map_or(2, |n| n.get()),
        ));
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
            },
            hashing: hashing.clone(),
            client_tls,
            limits: ConnectionLimits::new(ConnectionLimitSettings {
                max_connections: config.max_connections,
                max_connections_per_ip: config.max_connections_per_ip,
                connect_rate_per_ip: config.connect_rate_per_ip,
            }),
            handshake_timeout,
            shutdown: shutdown.clone(),
        }));

        let auth = Arc::new(AdminAuth::new(store.clone(), hashing));
        let generated_admin_password = auth.bootstrap(config.admin_password.as_deref()).await?;

        let state = web::Data::new(AppState {
            store: store.clone(),
            schemas,
            pipeline,
            supervisor: supervisor.clone(),
            auth,
            shutdown: shutdown.clone(),
        });
        let app_state = state.clone();
        let server = HttpServer::new(move || {
            App::new()
                .app_data(app_state.clone())
                .app_data(web::QueryConfig::default().error_handler(api::query_error))
                .app_data(web::PathConfig::default().error_handler(api::path_error))
                .app_data(web::PayloadConfig::new(1024 * 1024))
                .configure(api::configure)
                .configure(crate::ui::configure)
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
        .bind(config.bind)
        .map_err(|e| anyhow::anyhow!("cannot bind {}: {e}", config.bind))?;
        let address = *server.addrs().first().expect("bound to one address");
        supervisor.set_main_address(address);
        supervisor.start_all().await?;
        let server = server.run();

        Ok(Self {
            address,
            server,
            state,
            generated_admin_password,
            contact_flusher,
            contact_flusher_stop,
            dead_letter_task,
        })
    }

    pub fn address(&self) -> SocketAddr {
        self.address
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
        stop.await;
        tracing::info!("stopping: closing connections and draining queues");
        self.state.shutdown.cancel();
        let stopping = tokio::spawn(handle.stop(true));
        self.state.supervisor.shutdown().await;
        let _ = stopping.await;
        let _ = server.await;
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
        let authorized = match presented_token(&request, true) {
            Some(token) => state.auth.authenticate(&token).await.is_some(),
            None => false,
        };
        // A browser sends the session cookie with a WebSocket opened by any page of the same
        // host (SameSite ignores ports), so a cookie-borne subscription must come from our own
        // origin, or another page could read the live feed (cross-site WebSocket hijacking).
        if authorized
            && !crate::auth::token_not_from_cookie(&request)
            && !crate::auth::from_own_origin(&request)
        {
            return HttpResponse::Forbidden().json(serde_json::json!({"error": {
                "code": "forbidden",
                "message": "a subscription riding on the session cookie must come from the admin UI's origin"}}));
        }
        if !authorized {
            return HttpResponse::Unauthorized().json(serde_json::json!({"error": {
                "code": "unauthorized",
                "message": "subscribers need an admin token (?token=, Authorization: Bearer, or the session cookie)"}}));
        }
        let mut filter = SubscriberFilter::default();
        for (name, value) in url::form_urlencoded::parse(request.query_string().as_bytes()) {
            match &*name {
                "deviceId" => filter.device_id = Some(value.into_owned()),
                "listener" => filter.listener = Some(value.into_owned()),
                _ => {}
            }
        }
        return serve_subscriber(hub, &request, body, filter, state.shutdown.clone());
    }
    HttpResponse::NotFound().json(serde_json::json!({"error": {
        "code": "not_found",
        "message": format!("nothing is served at {path}; the API is under /api/v1")}}))
}
