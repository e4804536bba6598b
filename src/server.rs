//! `agentgate serve`: opens the database, starts the actors and the HTTP
//! server (`listener.rs`), and runs the shutdown sequence on SIGINT/SIGTERM.
//!
//! Shutdown: stop accepting connections, tell every supervising actor to finish its
//! children (runs get their terminal `complete`, child process groups are
//! killed, sockets close with 1001), then stop the HTTP server and exit 0.

use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use actix::{Actor, Arbiter, Supervisor};
use actix_service::ServiceFactoryExt;
use actix_web::dev::Service;
use actix_web::{web, App, HttpServer};
use agentgate_actors::chat::run_registry::{RunRegistry, Shutdown as RunShutdown};
use agentgate_actors::cluster::bus::{AttachRegistry, ClusterBus, ClusterConfig, Drain};
use agentgate_actors::config::GatewayConfig;
use agentgate_actors::limits::UserLimits;
use agentgate_actors::plugin::{PluginRegistry, StopAllPlugins};
use agentgate_actors::provider::ProviderKind;
use agentgate_actors::remote::followers::Followers;
use agentgate_actors::shell::{PtyHub, PtyPlacement, ShutdownPtys};
use agentgate_actors::store::Store;
use agentgate_actors::watchdog::{conn_fd, ConnFd, ConnWatchdog};
use futures_util::FutureExt;

use crate::auth::Keys;
use crate::config::{Common, ServeArgs};
use crate::db::DbStore;
use crate::guard::Policy;
use crate::listener::{self, AppFactory, MakeApp};
use crate::request_input::redact_query;
use crate::routes;
use crate::state::{AppState, ClusterNode};
use crate::throttle::LoginThrottle;
use crate::web_ui::WebUi;

/// How long the HTTP server waits for connections after the actors closed them.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// After the actors closed every socket, how long their close frames get to
/// reach the clients before the HTTP server stops.
const CLOSE_FRAME_FLUSH: Duration = Duration::from_millis(200);
/// How long a shutdown waits for the runs' last frames to reach Redis.
const CLUSTER_DRAIN: Duration = Duration::from_secs(3);
/// HTTP worker threads; the actors run on the system arbiter beside them.
const HTTP_WORKERS: usize = 2;

pub fn gateway_config(common: &Common, args: &ServeArgs) -> GatewayConfig {
    let mut config = GatewayConfig {
        heartbeat: Duration::from_secs(args.heartbeat_secs),
        shell_detach: Duration::from_secs(args.shell_detach_secs),
        permission_timeout: Duration::from_secs(args.permission_timeout_secs),
        provider_idle: Duration::from_secs(args.provider_idle_secs),
        provider_bins: Default::default(),
        child_env: GatewayConfig::child_env_from_process(),
        data_dir: common.data_dir(),
        history_max_messages: args.history_max_messages,
        limits: agentgate_actors::limits::Limits {
            sockets_per_user: args.max_sockets_per_user as usize,
            runs_per_user: args.max_runs_per_user as usize,
            ptys_per_user: args.max_ptys_per_user as usize,
            subscribe_entries: args.max_subscribe_entries as usize,
            sessions_per_minute: args.max_sessions_per_minute as usize,
        },
    };
    let bins = [
        (ProviderKind::Claude, &args.claude_bin),
        (ProviderKind::Codex, &args.codex_bin),
        (ProviderKind::Cursor, &args.cursor_bin),
        (ProviderKind::Gemini, &args.gemini_bin),
        (ProviderKind::Opencode, &args.opencode_bin),
    ];
    for (kind, bin) in bins {
        if let Some(bin) = bin {
            config.provider_bins.insert(kind, bin.clone());
        }
    }
    config
}

pub async fn serve(common: Common, args: ServeArgs) -> std::io::Result<()> {
    let data_dir = common.data_dir();
    let policy = Policy::new(
        args.listen.ip(),
        args.tls_cert.is_some(),
        &args.allowed_origins,
        &args.allowed_hosts,
    )
    .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    if policy.allows_any_origin() {
        tracing::warn!("--allowed-origins '*': any web page the user visits may open sockets and run commands here");
    }
    let db = crate::files::open_private(&common)?;
    let keys = Keys::load(&data_dir)?;
    crate::files::check_secret_file(&data_dir);
    let config = Arc::new(gateway_config(&common, &args));
    let web_ui = web::Data::new(WebUi::resolve(args.web_dir.as_deref(), &data_dir)?);
    // The dummy hash is computed now, so the first unknown-user login costs what any login costs.
    web::block(|| crate::auth::dummy_hash().len())
        .await
        .map_err(std::io::Error::other)?;

    let cluster = cluster_node(&common, &args)?;
    let store: Store = Arc::new(DbStore(db.clone()));
    // Supervised: a panic inside the registry restarts it behind the same address
    // (its runs fail, its sockets are closed; see `Supervised for RunRegistry`).
    let (registry_config, registry_store) = (config.clone(), store.clone());
    let registry_cluster = cluster.as_ref().map(|c| (c.bus.clone(), c.node_id.clone()));
    let registry = Supervisor::start(move |_| {
        let registry = RunRegistry::new(registry_config, registry_store);
        match registry_cluster {
            Some((bus, node)) => registry.with_cluster(bus, &node),
            None => registry,
        }
    });
    if let Some(c) = &cluster {
        c.bus.do_send(AttachRegistry(registry.clone()));
    }
    // Terminals (PTY reads, screen state) run on their own thread.
    let shells_arbiter = Arbiter::new();
    let shells_config = config.clone();
    // Cluster mode: which node runs each terminal (its own Redis link).
    let pty_placement = match (&cluster, &args.redis_url) {
        (Some(c), Some(url)) => Some(
            PtyPlacement::new(
                url,
                &c.node_id,
                Duration::from_millis(args.cluster_lease_ms),
            )
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?
            .start(),
        ),
        _ => None,
    };
    let hub_placement = pty_placement.clone();
    let shells = PtyHub::start_in_arbiter(&shells_arbiter.handle(), move |_| {
        PtyHub::new(shells_config).with_placement(hub_placement)
    });
    // Discovers <data-dir>/plugins and starts the enabled plugin servers.
    let plugins = PluginRegistry::new(config.clone()).start();
    // On its own thread: it must run while socket actors cannot (see watchdog.rs).
    let watchdog_arbiter = Arbiter::new();
    let heartbeat = config.heartbeat;
    let watchdog = ConnWatchdog::start_in_arbiter(&watchdog_arbiter.handle(), move |_| {
        ConnWatchdog::new(heartbeat)
    });
    let followers = Followers::default().start();
    // The last supervision events, for the admin page.
    let supervision = agentgate_actors::metrics::SupervisionLog::default().start();
    let _ = agentgate_actors::metrics::SUPERVISION.set(supervision.clone().recipient());
    let limits = UserLimits::new(config.limits).start();

    let state = web::Data::new(AppState {
        config: config.clone(),
        store,
        db,
        keys,
        platform: args.platform,
        registry,
        shells,
        pty_placement,
        plugins,
        watchdog,
        policy,
        hashes: Arc::new(tokio::sync::Semaphore::new(
            args.max_concurrent_hashes as usize,
        )),
        throttle: LoginThrottle::new(
            args.login_failures_per_user,
            args.login_failures_per_address,
            Duration::from_secs(args.login_window_secs),
        )
        .start(),
        followers,
        limits,
        supervision,
        cluster,
        shutting_down: Arc::default(),
    });

    let (app_state, app_web_ui) = (state.clone(), web_ui.clone());
    let make_app: MakeApp = Arc::new(move || app(app_state.clone(), app_web_ui.clone()));
    let listener = listener::bind(args.listen)?;
    let addrs = [listener.local_addr()?];
    let builder = actix_web::dev::Server::build()
        .workers(HTTP_WORKERS)
        .disable_signals()
        .shutdown_timeout(SHUTDOWN_GRACE.as_secs());
    let (server, scheme) = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => {
            let tls = crate::tls::server_config(cert, key)?;
            let builder = builder.listen("agentgate-https", listener, move || {
                listener::http_service::<TlsStream>(&make_app, on_connect).rustls_0_23(tls.clone())
            })?;
            (builder, "https")
        }
        _ => {
            let builder = builder.listen("agentgate-http", listener, move || {
                listener::http_service::<TcpStream>(&make_app, on_connect).tcp()
            })?;
            (builder, "http")
        }
    };

    for addr in &addrs {
        // Tests and scripts read this line to learn an ephemeral port.
        println!("listening on {scheme}://{addr}");
    }
    match web_ui.root() {
        Some(root) => {
            for addr in &addrs {
                println!("web UI on {scheme}://{addr}/ (from {})", root.display());
            }
        }
        None => tracing::info!(
            "no web UI installed (`agentgate web-ui install` fetches one); GET / explains"
        ),
    }
    std::io::stdout().flush()?;
    tracing::info!(listen = ?addrs, tls = scheme == "https", platform = args.platform, data_dir = %data_dir.display(), "agentgate started");

    let metrics = match args.metrics_listen {
        Some(addr) => Some(metrics_server(addr)?),
        None => None,
    };
    let server = server.run();
    let handle = server.handle();
    let shutdown_state = state.clone();
    actix_web::rt::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutdown requested: finishing runs and closing sockets");
        // Stop accepting first: no new socket or request starts while the
        // actors finish (the registry also refuses new runs: SHUTTING_DOWN),
        // and no upgrade on a connection the accept loop still takes.
        shutdown_state
            .shutting_down
            .store(true, std::sync::atomic::Ordering::SeqCst);
        handle.pause().await;
        shutdown_actors(&shutdown_state).await;
        handle.stop(true).await;
        if let Some(metrics) = metrics {
            metrics.stop(true).await;
        }
    });
    server.await?;
    tracing::info!("agentgate stopped");
    Ok(())
}

/// The App: every HTTP route and WebSocket upgrade, behind the guard and
/// the access log (one instance per worker for requests, one for upgrades).
fn app(state: web::Data<AppState>, web_ui: web::Data<WebUi>) -> AppFactory {
    let app = App::new()
        .app_data(state)
        .app_data(web_ui)
        .app_data(routes::json_config())
        // Host, Origin and authentication before any handler (guard.rs).
        .wrap(actix_web::middleware::from_fn(crate::guard::guard))
        // Outermost: refusals of the guard are logged too.
        .wrap_fn(|req, srv| {
            // Our own access log: the query token never reaches a log line.
            let method = req.method().clone();
            let path = req.path().to_string();
            let query = redact_query(req.query_string());
            srv.call(req).map(move |res| {
                if let Ok(res) = &res {
                    tracing::info!(%method, %path, query = %query, status = res.status().as_u16(), "request");
                }
                res
            })
        })
        .configure(routes::configure)
        .configure(crate::plugins_api::configure)
        .configure(crate::admin_api::configure)
        .configure(crate::remote_api::configure)
        .configure(crate::ui_api::configure)
        // After every API and WebSocket route: the web UI, else the JSON 404.
        .default_service(web::to(crate::web_ui::serve));
    // AppConfig's host and scheme are only read by URL generation and
    // connection info, which no route uses.
    actix_service::boxed::factory(
        actix_service::map_config(app, |_| actix_web::dev::AppConfig::default())
            .map(|res| res.map_into_boxed_body().into())
            .map_err(|err: actix_web::Error| err.error_response().into()),
    )
}

/// The raw descriptor of each connection, for the stall watchdog.
fn on_connect<T: 'static>(io: &T, ext: &mut actix_web::dev::Extensions) {
    let io: &dyn std::any::Any = io;
    if let Some(fd) = conn_fd(io).or_else(|| tls_conn_fd(io)) {
        ext.insert(fd);
    }
}

/// `GET /metrics` on its own listener (`--metrics-listen`), outside the
/// guard: Prometheus scrapes without a token, so the address (loopback by
/// default) is the access control. One worker: a scrape is a few KiB.
fn metrics_server(addr: std::net::SocketAddr) -> std::io::Result<actix_web::dev::ServerHandle> {
    if !addr.ip().is_loopback() {
        tracing::warn!(%addr, "metrics served beyond loopback: anyone who reaches this address reads them");
    }
    let server = HttpServer::new(|| {
        App::new().route(
            "/metrics",
            web::get().to(|| async {
                actix_web::HttpResponse::Ok()
                    .content_type("text/plain; version=0.0.4; charset=utf-8")
                    .body(agentgate_actors::metrics::metrics().render())
            }),
        )
    })
    .workers(1)
    .disable_signals()
    .bind(addr)?;
    for addr in server.addrs() {
        println!("metrics on http://{addr}/metrics");
    }
    std::io::stdout().flush()?;
    let server = server.run();
    let handle = server.handle();
    actix_web::rt::spawn(server);
    Ok(handle)
}

type TcpStream = actix_web::rt::net::TcpStream;
type TlsStream = actix_tls::accept::rustls_0_23::TlsStream<TcpStream>;

/// The raw descriptor under a TLS connection (what `on_connect` sees with
/// `--tls-cert`), for the stall watchdog.
fn tls_conn_fd(io: &dyn std::any::Any) -> Option<ConnFd> {
    use std::os::fd::AsRawFd;
    io.downcast_ref::<TlsStream>()
        .map(|tls| ConnFd((**tls).get_ref().0.as_raw_fd()))
}

/// Cluster mode: refuses SQLite (the nodes must share a database), checks
/// the node id and the Redis URL, and starts this node's bus (it connects
/// in the background and retries while Redis is unreachable).
fn cluster_node(common: &Common, args: &ServeArgs) -> std::io::Result<Option<ClusterNode>> {
    let Some(url) = &args.redis_url else {
        return Ok(None);
    };
    let invalid = |m: String| std::io::Error::new(std::io::ErrorKind::InvalidInput, m);
    let database = common.database_url();
    if !(database.starts_with("postgres://") || database.starts_with("postgresql://")) {
        return Err(invalid(
            "cluster mode (--redis-url) needs a database every node shares: give --database-url postgres://... (SQLite is one node's file)".into(),
        ));
    }
    let node_id = args
        .node_id
        .clone()
        .unwrap_or_else(agentgate_actors::cluster::generated_node_id);
    if !agentgate_actors::cluster::valid_node_id(&node_id) {
        return Err(invalid(format!(
            "--node-id {node_id:?}: use 1 to 64 letters, digits, '-', '_' or '.'"
        )));
    }
    let bus = ClusterBus::new(ClusterConfig {
        redis_url: url.clone(),
        node_id: node_id.clone(),
        lease: Duration::from_millis(args.cluster_lease_ms),
    })
    .map_err(invalid)?
    .start();
    tracing::info!(event = "cluster.node", node_id = %node_id, redis = %agentgate_actors::cluster::bus::redact(url), lease_ms = args.cluster_lease_ms, "cluster mode: this node's id");
    Ok(Some(ClusterNode { bus, node_id }))
}

/// Tells each supervising actor to finish its children, and waits for it.
async fn shutdown_actors(state: &AppState) {
    if state.registry.send(RunShutdown).await.is_err() {
        tracing::error!("run registry did not answer the shutdown");
    }
    // The runs' last frames reach their streams and the leases are released.
    if let Some(cluster) = &state.cluster {
        let drain = Drain {
            timeout: CLUSTER_DRAIN,
        };
        if cluster.bus.send(drain).await.is_err() {
            tracing::error!("cluster bus did not answer the shutdown");
        }
    }
    // SIGTERM to every plugin server, SIGKILL after its grace period.
    if state.plugins.send(StopAllPlugins).await.is_err() {
        tracing::error!("plugin registry did not answer the shutdown");
    }
    // SIGKILL every terminal's process session; its sockets close with 1001.
    if state.shells.send(ShutdownPtys).await.is_err() {
        tracing::error!("terminal registry did not answer the shutdown");
    }
    tokio::time::sleep(CLOSE_FRAME_FLUSH).await;
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers; stop the gateway with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!(signal = "SIGTERM", "signal received"),
        _ = int.recv() => tracing::info!(signal = "SIGINT", "signal received"),
    }
}
