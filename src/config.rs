//! Command line and configuration (PROTOCOL.md section 1). Every flag has an
//! environment variable; the flag wins.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(
    name = "agentgate",
    version,
    about = "WebSocket gateway for AI coding agent CLIs"
)]
pub struct Cli {
    #[command(flatten)]
    pub common: Common,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Start the gateway (HTTP + WebSocket).
    Serve(Box<ServeArgs>),
    /// Print a signed JWT for a user on stdout (the user is created if missing).
    Token {
        #[arg(long)]
        user: String,
        /// Instead: revoke every token issued to the user so far (their live
        /// sockets are closed with 1008); prints nothing on stdout.
        #[arg(long)]
        revoke: bool,
        /// Also make the user an admin (admin API, /admin page, `status`).
        #[arg(long, conflicts_with = "revoke")]
        admin: bool,
        /// Lifetime of the printed token in seconds (default 30 days); a
        /// socket opened with it is closed with 1008 when it runs out.
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..), conflicts_with = "revoke")]
        ttl_secs: Option<u64>,
    },
    /// Apply the embedded database migrations and exit.
    Migrate,
    /// What a running gateway is doing: its admin snapshot as tables
    /// (chat sockets, runs, terminals, plugins), or JSON with `--json`.
    Status {
        /// The gateway's address.
        #[arg(long, env = "AGENTGATE_URL", default_value = "http://127.0.0.1:3001")]
        url: String,
        /// An admin's token; default: one minted for the first admin from
        /// the data dir's secret (an operator on the gateway's machine).
        #[arg(long, env = "AGENTGATE_TOKEN", hide_env_values = true)]
        token: Option<String>,
        /// Print the snapshot as JSON (for scripts).
        #[arg(long)]
        json: bool,
    },
    /// The reference's web UI (CloudCLI), served by `serve`.
    #[command(name = "web-ui", subcommand)]
    WebUi(WebUiCommand),
    /// Manage users (the first one may also register over HTTP).
    #[command(subcommand)]
    User(UserCommand),
}

#[derive(Debug, Subcommand)]
pub enum WebUiCommand {
    /// Fetch the CloudCLI build from npm into <data-dir>/web-ui (needs npm and tar).
    Install {
        /// The `@cloudcli-ai/cloudcli` version to fetch.
        #[arg(long, default_value = crate::web_ui::CLOUDCLI_VERSION)]
        version: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum UserCommand {
    /// Add a user who logs in with a password, read from stdin (one line).
    Add { name: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Options shared by every subcommand (they all open the database).
#[derive(Debug, Args)]
pub struct Common {
    /// Data directory (database, JWT secret, plugins).
    #[arg(long, env = "AGENTGATE_DATA_DIR", global = true)]
    pub data_dir: Option<PathBuf>,
    /// Database URL: sqlite://<path> (default sqlite://<data-dir>/agentgate.db)
    /// or postgres://user@host:port/db (an existing database; several
    /// gateways may share it).
    #[arg(long, env = "AGENTGATE_DATABASE_URL", global = true)]
    pub database_url: Option<String>,
    #[arg(
        long,
        env = "AGENTGATE_LOG_FORMAT",
        value_enum,
        default_value = "text",
        global = true
    )]
    pub log_format: LogFormat,
}

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Address to listen on; port 0 picks a free port (printed on stdout).
    #[arg(long, env = "AGENTGATE_LISTEN", default_value = "127.0.0.1:3001")]
    pub listen: SocketAddr,
    /// No token needed: every connection is the first user in the database.
    #[arg(long, env = "AGENTGATE_PLATFORM", value_parser = clap::builder::BoolishValueParser::new(), default_value = "false", num_args = 0..=1, default_missing_value = "true")]
    pub platform: bool,
    /// WebSocket ping interval; a socket that missed the previous ping is dropped.
    #[arg(long, env = "AGENTGATE_HEARTBEAT_SECS", default_value = "30", value_parser = clap::value_parser!(u64).range(1..))]
    pub heartbeat_secs: u64,
    /// A detached PTY is killed after this many seconds.
    #[arg(long, env = "AGENTGATE_SHELL_DETACH_SECS", default_value = "1800", value_parser = clap::value_parser!(u64).range(1..))]
    pub shell_detach_secs: u64,
    /// A pending tool permission is denied after this many seconds.
    #[arg(long, env = "AGENTGATE_PERMISSION_TIMEOUT_SECS", default_value = "300", value_parser = clap::value_parser!(u64).range(1..))]
    pub permission_timeout_secs: u64,
    /// Browser origins (scheme://host[:port], comma-separated) allowed to open
    /// sockets and make state-changing calls besides the gateway's own; `*` allows any.
    #[arg(long, env = "AGENTGATE_ALLOWED_ORIGINS", value_delimiter = ',')]
    pub allowed_origins: Vec<String>,
    /// Host names (comma-separated) accepted besides loopback ones while
    /// listening on a loopback address (the DNS-rebinding rule).
    #[arg(long, env = "AGENTGATE_ALLOWED_HOSTS", value_delimiter = ',')]
    pub allowed_hosts: Vec<String>,
    /// Password hashes (login, register; ~19 MiB each) run at once; beyond it: 503.
    #[arg(long, env = "AGENTGATE_MAX_CONCURRENT_HASHES", default_value = "4", value_parser = clap::value_parser!(u32).range(1..))]
    pub max_concurrent_hashes: u32,
    /// Failed logins per username within --login-window-secs before 429.
    #[arg(long, env = "AGENTGATE_LOGIN_FAILURES_PER_USER", default_value = "5", value_parser = clap::value_parser!(u32).range(1..))]
    pub login_failures_per_user: u32,
    /// Failed logins per client address (IPv6: per /64) within the window before 429.
    #[arg(long, env = "AGENTGATE_LOGIN_FAILURES_PER_ADDRESS", default_value = "20", value_parser = clap::value_parser!(u32).range(1..))]
    pub login_failures_per_address: u32,
    /// The sliding window of the failed-login limits.
    #[arg(long, env = "AGENTGATE_LOGIN_WINDOW_SECS", default_value = "300", value_parser = clap::value_parser!(u64).range(1..))]
    pub login_window_secs: u64,
    /// WebSockets one user may have open at once (`/ws`, `/shell`,
    /// `/plugin-ws`, remote sessions); beyond it the upgrade gets 429 `TOO_MANY_SOCKETS`.
    #[arg(long, env = "AGENTGATE_MAX_SOCKETS_PER_USER", default_value_t = agentgate_actors::limits::DEFAULT_LIMITS.sockets_per_user as u32, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_sockets_per_user: u32,
    /// Runs one user may have running at once; beyond it `chat.send` gets `TOO_MANY_RUNS`.
    #[arg(long, env = "AGENTGATE_MAX_RUNS_PER_USER", default_value_t = agentgate_actors::limits::DEFAULT_LIMITS.runs_per_user as u32, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_runs_per_user: u32,
    /// Live terminals (attached or detached) per user; beyond it `init` gets an `error` frame.
    #[arg(long, env = "AGENTGATE_MAX_PTYS_PER_USER", default_value_t = agentgate_actors::limits::DEFAULT_LIMITS.ptys_per_user as u32, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_ptys_per_user: u32,
    /// Entries of one `chat.subscribe` frame; a longer one gets `TOO_MANY_ENTRIES`.
    #[arg(long, env = "AGENTGATE_MAX_SUBSCRIBE_ENTRIES", default_value_t = agentgate_actors::limits::DEFAULT_LIMITS.subscribe_entries as u32, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_subscribe_entries: u32,
    /// Sessions one user may create per minute; beyond it 429 `TOO_MANY_SESSIONS` with `Retry-After`.
    #[arg(long, env = "AGENTGATE_MAX_SESSIONS_PER_MINUTE", default_value_t = agentgate_actors::limits::DEFAULT_LIMITS.sessions_per_minute as u32, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_sessions_per_minute: u32,
    /// PEM certificate chain (leaf first): serve HTTPS and wss:// instead of plain HTTP.
    #[arg(long, env = "AGENTGATE_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1) of `--tls-cert`.
    #[arg(long, env = "AGENTGATE_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// A provider CLI that prints nothing for this many seconds (outside a
    /// permission prompt) is killed and its run completes as failed.
    #[arg(long, env = "AGENTGATE_PROVIDER_IDLE_SECS", default_value = "600", value_parser = clap::value_parser!(u64).range(1..))]
    pub provider_idle_secs: u64,
    #[arg(long, env = "AGENTGATE_CLAUDE_BIN")]
    pub claude_bin: Option<PathBuf>,
    #[arg(long, env = "AGENTGATE_CODEX_BIN")]
    pub codex_bin: Option<PathBuf>,
    #[arg(long, env = "AGENTGATE_CURSOR_BIN")]
    pub cursor_bin: Option<PathBuf>,
    #[arg(long, env = "AGENTGATE_GEMINI_BIN")]
    pub gemini_bin: Option<PathBuf>,
    #[arg(long, env = "AGENTGATE_OPENCODE_BIN")]
    pub opencode_bin: Option<PathBuf>,
    /// Messages of history kept per session for the web UI (the oldest are
    /// deleted first); 0 records no history.
    #[arg(long, env = "AGENTGATE_HISTORY_MAX_MESSAGES", default_value_t = agentgate_actors::config::DEFAULT_HISTORY_MAX_MESSAGES)]
    pub history_max_messages: usize,
    /// Serve Prometheus metrics (`GET /metrics`) on this address; off when
    /// not given. A bare port means 127.0.0.1:PORT: metrics name plugins and
    /// providers, so they stay on loopback unless an address says otherwise.
    #[arg(long, env = "AGENTGATE_METRICS_LISTEN", value_parser = parse_metrics_listen)]
    pub metrics_listen: Option<SocketAddr>,
    /// Cluster mode: share live runs with the other nodes on this Redis
    /// (`redis://[:password@]host:port[/db]`). Needs a PostgreSQL
    /// `--database-url` shared by every node, and the same `AGENTGATE_JWT_SECRET`.
    #[arg(long, env = "AGENTGATE_REDIS_URL", hide_env_values = true)]
    pub redis_url: Option<String>,
    /// This node's id in cluster mode (letters, digits, `-`, `_`, `.`);
    /// default: generated at start and logged.
    #[arg(long, env = "AGENTGATE_NODE_ID")]
    pub node_id: Option<String>,
    /// Cluster mode: a run's lease on its session, renewed every third of
    /// it while the run lives; a node that stops renewing (it died) has its
    /// runs ended by another node within about 1.5 times this.
    #[arg(long, env = "AGENTGATE_CLUSTER_LEASE_MS", default_value = "10000", value_parser = clap::value_parser!(u64).range(300..))]
    pub cluster_lease_ms: u64,
    /// A built single-page web UI to serve after the API routes (default:
    /// <data-dir>/web-ui/dist when `agentgate web-ui install` put one there).
    #[arg(long, env = "AGENTGATE_WEB_DIR")]
    pub web_dir: Option<PathBuf>,
}

/// `ADDR:PORT`, or a bare port on loopback.
fn parse_metrics_listen(value: &str) -> Result<SocketAddr, String> {
    if let Ok(port) = value.parse::<u16>() {
        return Ok(SocketAddr::from(([127, 0, 0, 1], port)));
    }
    value
        .parse()
        .map_err(|_| format!("expected ADDR:PORT or a port, got {value:?}"))
}

impl Common {
    /// `--data-dir`, else `$XDG_DATA_HOME/agentgate`, else `~/.local/share/agentgate`.
    pub fn data_dir(&self) -> PathBuf {
        if let Some(dir) = &self.data_dir {
            return dir.clone();
        }
        if let Some(xdg) = std::env::var_os("XDG_DATA_HOME").filter(|v| !v.is_empty()) {
            return PathBuf::from(xdg).join("agentgate");
        }
        let home = std::env::var_os("HOME")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("."));
        home.join(".local/share/agentgate")
    }

    pub fn database_url(&self) -> String {
        self.database_url.clone().unwrap_or_else(|| {
            format!(
                "sqlite://{}",
                self.data_dir().join("agentgate.db").display()
            )
        })
    }
}
