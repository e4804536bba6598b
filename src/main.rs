//! `agentgate`: a WebSocket gateway that lets browser and terminal clients
//! drive AI coding agent CLIs (Claude Code, Codex, Cursor, Gemini, OpenCode).
//!
//! # Layout
//! - [`config`]: the CLI (`serve`, `token`, `migrate`) and its env variables.
//! - [`server`]: startup, the HTTP server, the shutdown sequence.
//! - [`routes`]: REST routes and WebSocket upgrades (auth first).
//! - [`auth`]: JWTs, the secret, password hashes.
//! - [`db`]: SQLite (default) or PostgreSQL through diesel, off the actor threads.
//! - [`tls`]: the rustls configuration of `--tls-cert` / `--tls-key`.
//! - [`ui_api`]: the REST routes the web UI reads (projects, history pages).
//! - [`web_ui`]: the built web UI served after the API, and `web-ui install`.
//! - [`guard`]: the middleware before every route: Host and Origin rules,
//!   authentication (the public routes are listed there), the `Authed` extractor.
//! - [`throttle`]: the `LoginThrottle` actor (failed logins per user and address).
//! - [`files`]: data dir 0700, secret/database/WAL 0600 at every start.
//! - the actors live in the `agentgate-actors` crate (`actors/`): RunRegistry,
//!   ProviderRun, ChatSocket, the shell and plugin actors.
//!
//! Panic policy: a panic inside an actor unwinds only that actor's task
//! (tokio catches it); the actor's drop guards report the crash to its
//! supervisor (e.g. a ProviderRun's run gets its failed `complete`) and kill
//! its child process group. The panic hook below logs every panic as a
//! structured event so operators see it.

mod admin_api;
mod api;
mod auth;
mod config;
mod db;
mod files;
mod guard;
mod listener;
mod plugins_api;
mod remote_api;
mod request_input;
mod routes;
mod server;
mod state;
mod status;
mod supervision_layer;
mod throttle;
mod tls;
mod ui_api;
mod web_ui;

use std::process::ExitCode;

use clap::Parser;

use config::{Cli, Command, LogFormat, UserCommand, WebUiCommand};

fn init_logging(format: LogFormat) {
    use tracing_subscriber::prelude::*;
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Logs go to stderr: stdout carries the `listening on` line and tokens.
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    // Supervision events also go to the admin page (supervision_layer.rs).
    let registry = tracing_subscriber::registry()
        .with(filter)
        .with(supervision_layer::SupervisionLayer);
    match format {
        LogFormat::Json => registry.with(fmt.json()).init(),
        LogFormat::Text => registry.with(fmt).init(),
    }
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let thread = std::thread::current();
        tracing::error!(
            event = "panic",
            thread = thread.name().unwrap_or("unnamed"),
            location = info.location().map(|l| l.to_string()).unwrap_or_default(),
            payload = info
                .payload()
                .downcast_ref::<&str>()
                .copied()
                .or_else(|| info.payload().downcast_ref::<String>().map(String::as_str))
                .unwrap_or("non-string panic payload"),
            "panic caught; the actor that panicked is stopped, others continue"
        );
        default_hook(info);
    }));
}

/// glibc's malloc gives threads arenas of their own (up to 8 per core) and
/// a freed chunk goes back to the arena it came from, so memory freed after
/// one thread's burst (the provider reads' final lines, the socket writes,
/// the database calls) stays resident beside the registry's replay buffers
/// instead of being reused for them. With one arena `chat-many` peaks at
/// 149-151 MB instead of 158-159 MB (RSS; small allocations still come from
/// each thread's own cache without the arena's lock). An operator's own
/// `MALLOC_ARENA_MAX` wins.
fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: mallopt only sets a malloc parameter; called before any
        // other thread exists.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 1);
        }
    }
}

fn main() -> ExitCode {
    tune_allocator();
    let cli = Cli::parse();
    init_logging(cli.common.log_format);
    let result = match cli.command {
        Command::Serve(args) => {
            actix_web::rt::System::new().block_on(server::serve(cli.common, *args))
        }
        Command::Token {
            user,
            revoke,
            ttl_secs,
            admin,
        } => token(&cli.common, &user, revoke, ttl_secs, admin),
        Command::Migrate => migrate(&cli.common),
        Command::Status { url, token, json } => status::run(&cli.common, &url, token, json),
        Command::WebUi(WebUiCommand::Install { version }) => {
            web_ui::install::install(&cli.common.data_dir(), &version).map(|dir| {
                eprintln!(
                    "installed; `agentgate serve` now serves it on its own address (e.g. http://127.0.0.1:3001/)"
                );
                println!("{}", dir.display());
            })
        }
        Command::User(UserCommand::Add { name }) => user_add(&cli.common, &name),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("agentgate: {err}");
            ExitCode::FAILURE
        }
    }
}

fn token(
    common: &config::Common,
    user: &str,
    revoke: bool,
    ttl_secs: Option<u64>,
    admin: bool,
) -> std::io::Result<()> {
    let user = user.trim();
    if user.is_empty() {
        return Err(std::io::Error::other("--user must not be empty"));
    }
    let data_dir = common.data_dir();
    let db = files::open_private(common)?;
    let mut conn = db.conn().map_err(std::io::Error::other)?;
    if revoke {
        let row = db::revoke_tokens(&mut conn, user)
            .map_err(std::io::Error::other)?
            .ok_or_else(|| std::io::Error::other(format!("no user named {user}")))?;
        // A running gateway notices within a heartbeat interval and closes the user's sockets.
        eprintln!(
            "revoked every earlier token of {} (token version {})",
            row.username, row.token_version
        );
        return Ok(());
    }
    let keys = auth::Keys::load(&data_dir)?;
    files::check_secret_file(&data_dir);
    let mut row = db::ensure_user(&mut conn, user).map_err(std::io::Error::other)?;
    if admin && !row.is_admin {
        row = db::set_admin(&mut conn, user)
            .map_err(std::io::Error::other)?
            .ok_or_else(|| std::io::Error::other(format!("no user named {user}")))?;
        eprintln!("{} is an admin now", row.username);
    }
    println!(
        "{}",
        keys.issue_for(
            i64::from(row.id),
            &row.username,
            row.token_version,
            ttl_secs.map_or(auth::TOKEN_LIFETIME, std::time::Duration::from_secs),
        )
    );
    Ok(())
}

/// `agentgate user add NAME`: the password is one line of stdin (not echoed
/// when stdin is a terminal), so it never shows in `ps` or shell history.
fn user_add(common: &config::Common, name: &str) -> std::io::Result<()> {
    let name = name.trim();
    if name.is_empty() || name.len() > routes::MAX_CREDENTIAL_LEN {
        return Err(std::io::Error::other(format!(
            "the user name must be 1 to {} bytes",
            routes::MAX_CREDENTIAL_LEN
        )));
    }
    let password = read_password(&format!("Password for {name}: "))?;
    if password.is_empty() || password.len() > routes::MAX_CREDENTIAL_LEN {
        return Err(std::io::Error::other(format!(
            "the password (one line on stdin) must be 1 to {} bytes",
            routes::MAX_CREDENTIAL_LEN
        )));
    }
    let db = files::open_private(common)?;
    let hash = auth::hash_password(&password).map_err(std::io::Error::other)?;
    let mut conn = db.conn().map_err(std::io::Error::other)?;
    match db::add_user(&mut conn, name, &hash).map_err(std::io::Error::other)? {
        Some(user) => {
            eprintln!("added user {} (id {})", user.username, user.id);
            Ok(())
        }
        None => Err(std::io::Error::other(format!("user {name} already exists"))),
    }
}

/// One line of stdin without its line ending; echo is off while a terminal types it.
fn read_password(prompt: &str) -> std::io::Result<String> {
    use std::io::{BufRead, IsTerminal};
    let stdin = std::io::stdin();
    let tty = stdin.is_terminal();
    // SAFETY: tcgetattr/tcsetattr on fd 0 with a zeroed, then filled termios.
    let saved = tty.then(|| unsafe {
        let mut t: libc::termios = std::mem::zeroed();
        (libc::tcgetattr(0, &mut t) == 0).then_some(t)
    });
    if let Some(Some(t)) = saved {
        eprint!("{prompt}");
        let mut quiet = t;
        quiet.c_lflag &= !libc::ECHO;
        unsafe { libc::tcsetattr(0, libc::TCSANOW, &quiet) };
    }
    let mut line = String::new();
    let read = stdin.lock().read_line(&mut line);
    if let Some(Some(t)) = saved {
        unsafe { libc::tcsetattr(0, libc::TCSANOW, &t) };
        eprintln!();
    }
    read?;
    Ok(line.trim_end_matches(['\n', '\r']).to_string())
}

fn migrate(common: &config::Common) -> std::io::Result<()> {
    // Db::open applies pending migrations; report how many were left.
    let db = files::open_private(common)?;
    let pending = db.migrate().map_err(std::io::Error::other)?;
    eprintln!("migrations up to date ({pending} pending after open)");
    Ok(())
}
