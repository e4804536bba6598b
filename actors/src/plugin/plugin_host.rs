//! `PluginHost`: the supervisor of one plugin's server process.
//!
//! Owns: the plugin's manifest, its minimal environment, the pid of the live
//! server (its process group), the lifecycle state, the restart bookkeeping
//! (consecutive failures, restart count, last error) and the replies waiting
//! for a start or stop to finish.
//!
//! Handles: [`StartServer`], [`StopServer`] (from the registry), and from its
//! own helper tasks [`ReadyOutcome`] (the stdout reader: ready line seen and
//! port accepting, or why not) and [`ServerExited`] (the reaper task).
//!
//! Sends: [`HostStatusChanged`] to the registry after every state change.
//!
//! Lifecycle of one server: spawn in the plugin folder with only `PATH`,
//! `HOME` and `PLUGIN_NAME`, in its own process group → `Starting` → the
//! stdout line `{"ready":true,"port":N}` within [`READY_TIMEOUT`] and the port
//! accepting a connection → `Running`. A server that fails to start, or exits
//! while running, is restarted after a capped exponential backoff
//! ([`BACKOFF_INITIAL`] doubling up to [`BACKOFF_MAX`]); each restart is
//! logged as a supervision event. Stopping sends SIGTERM to the process
//! group, then SIGKILL after [`KILL_GRACE`].
//!
//! Stops: with the registry (at gateway exit). `stopped()` SIGKILLs a server
//! still alive, so no plugin process outlives its host.

use std::ffi::OsString;
use std::process::Stdio;
use std::time::{Duration, Instant};

use actix::prelude::*;
use actix::WeakRecipient;
use tokio::io::{AsyncBufRead, AsyncRead, BufReader};
use tokio::sync::oneshot;

use super::manifest::PluginManifest;
use super::{PluginState, PluginStatus};
use crate::kill::{self, Signal};
use crate::lines::read_line_bounded;
use crate::metrics::metrics;

/// How long a new server has to print its ready line (PROTOCOL.md section 6).
pub const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// After the ready line, how long the announced port may take to accept a connection.
pub const PORT_PROBE_WINDOW: Duration = Duration::from_secs(2);
/// Pause between two connection attempts to the announced port.
pub const PORT_PROBE_INTERVAL: Duration = Duration::from_millis(50);
/// First restart delay after a failure; doubles with each consecutive failure.
pub const BACKOFF_INITIAL: Duration = Duration::from_millis(500);
/// Cap of the restart delay, so a broken plugin costs one spawn per 30 s.
pub const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// A server that stayed up this long counts as healthy: its next crash starts the backoff over.
pub const STABLE_UPTIME: Duration = Duration::from_secs(30);
/// Between SIGTERM and SIGKILL when stopping a server.
pub const KILL_GRACE: Duration = Duration::from_secs(3);
/// A stop reply never waits longer than this (KILL is sent well before).
pub const STOP_REPLY_TIMEOUT: Duration = Duration::from_secs(6);
/// A start reply never waits longer than this (ready timeout plus the port probe).
pub const START_REPLY_TIMEOUT: Duration = Duration::from_secs(13);
/// Longest stdout/stderr line logged; the rest of a longer line is dropped, never buffered.
pub const MAX_LOG_LINE: usize = 8 * 1024;
/// Longest piece of a non-ready stdout line quoted in `lastError`.
const MAX_QUOTED_LINE: usize = 200;

/// Sent by a host to the registry after each state change. Sent with
/// `do_send`: a few per lifecycle transition, never per frame or line.
#[derive(Message, Debug, Clone)]
#[rtype(result = "()")]
pub struct HostStatusChanged(pub PluginStatus);

/// Sent by the registry (REST start) to start the server now: a stopped
/// server is spawned, a pending backoff is cut short. Answers once the
/// server is ready or the attempt failed.
#[derive(Message, Debug)]
#[rtype(result = "PluginStatus")]
pub struct StartServer;

/// Sent by the registry (REST stop, gateway shutdown) to stop the server
/// and not restart it. Answers once the process has exited.
#[derive(Message, Debug)]
#[rtype(result = "PluginStatus")]
pub struct StopServer;

/// Sent by the stdout reader of server `generation`, once: ready (with the
/// port, which accepted a connection) or why it is not.
#[derive(Message, Debug)]
#[rtype(result = "()")]
struct ReadyOutcome {
    generation: u64,
    result: Result<u16, String>,
}

/// Sent by the reaper task when server `generation` has exited.
#[derive(Message, Debug)]
#[rtype(result = "()")]
struct ServerExited {
    generation: u64,
    status: String,
}

/// What to do once a server we signalled has exited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AfterExit {
    /// Stay stopped (REST stop, shutdown).
    Stop,
    /// It failed to start: restart after the backoff.
    Backoff,
    /// A start arrived while it was stopping: spawn again at once.
    Start,
}

#[derive(Debug)]
enum HostState {
    Stopped,
    Starting { pid: u32 },
    Running { pid: u32, port: u16, since: Instant },
    Backoff { timer: SpawnHandle },
    Stopping { pid: u32, after: AfterExit },
}

pub struct PluginHost {
    manifest: PluginManifest,
    /// The whole environment of the server: `PATH`, `HOME`, `PLUGIN_NAME`.
    env: Vec<(OsString, OsString)>,
    /// Weak, so the registry and its hosts do not keep each other alive.
    registry: WeakRecipient<HostStatusChanged>,
    state: HostState,
    /// Number of the current (or last) server process. Messages of an older
    /// process carry an older number and are ignored, so a late exit never
    /// touches its successor.
    generation: u64,
    /// Consecutive failures; picks the next backoff delay. Reset by a stop,
    /// a REST start, or a crash after [`STABLE_UPTIME`].
    failures: u32,
    /// Automatic restarts so far (REST `restarts`).
    restarts: u32,
    last_error: Option<String>,
    /// Replies to [`StartServer`]; answered when the state leaves `Starting`.
    start_waiters: Vec<oneshot::Sender<()>>,
    /// Replies to [`StopServer`]; answered when the state is `Stopped`.
    stop_waiters: Vec<oneshot::Sender<()>>,
}

impl PluginHost {
    /// `inherited` is the environment children may see; only `PATH` and
    /// `HOME` are taken from it.
    pub fn new(
        manifest: PluginManifest,
        inherited: &[(OsString, OsString)],
        registry: WeakRecipient<HostStatusChanged>,
    ) -> Self {
        let env = minimal_env(&manifest.name, inherited);
        PluginHost {
            manifest,
            env,
            registry,
            state: HostState::Stopped,
            generation: 0,
            failures: 0,
            restarts: 0,
            last_error: None,
            start_waiters: Vec::new(),
            stop_waiters: Vec::new(),
        }
    }

    pub fn status(&self) -> PluginStatus {
        let (state, running, port, pid) = match &self.state {
            HostState::Stopped => (PluginState::Stopped, false, None, None),
            HostState::Starting { pid } => (PluginState::Starting, false, None, Some(*pid)),
            HostState::Running { pid, port, .. } => {
                (PluginState::Running, true, Some(*port), Some(*pid))
            }
            HostState::Backoff { .. } => (PluginState::Backoff, false, None, None),
            HostState::Stopping { pid, .. } => (PluginState::Stopping, false, None, Some(*pid)),
        };
        PluginStatus {
            name: self.manifest.name.clone(),
            enabled: self.manifest.enabled,
            state,
            running,
            port,
            pid,
            restarts: self.restarts,
            last_error: self.last_error.clone(),
        }
    }

    /// Tells the registry the new status and answers waiters it concerns.
    fn changed(&mut self) {
        let up = matches!(self.state, HostState::Running { .. });
        metrics()
            .plugin_up
            .with_label_values(&[&self.manifest.name])
            .set(i64::from(up));
        if let Some(registry) = self.registry.upgrade() {
            registry.do_send(HostStatusChanged(self.status()));
        }
        let starting = matches!(
            self.state,
            HostState::Starting { .. }
                | HostState::Stopping {
                    after: AfterExit::Start,
                    ..
                }
        );
        if !starting {
            for w in self.start_waiters.drain(..) {
                let _ = w.send(());
            }
        }
        if matches!(self.state, HostState::Stopped) {
            for w in self.stop_waiters.drain(..) {
                let _ = w.send(());
            }
        }
    }

    /// Spawns a new server process; on failure schedules the next attempt.
    fn spawn_server(&mut self, ctx: &mut Context<Self>) {
        self.generation += 1;
        match self.launch(self.generation, ctx) {
            Ok(pid) => {
                tracing::info!(actor = "PluginHost", plugin = %self.manifest.name, pid, generation = self.generation, "plugin server spawned");
                self.state = HostState::Starting { pid };
            }
            Err(reason) => {
                self.last_error = Some(reason.clone());
                self.schedule_restart(ctx, &reason, None, None);
            }
        }
        self.changed();
    }

    /// Starts the process and its three helper tasks (stdout reader, stderr
    /// logger, reaper). Returns the pid.
    fn launch(&self, generation: u64, ctx: &mut Context<Self>) -> Result<u32, String> {
        let m = &self.manifest;
        let dir = std::fs::canonicalize(&m.dir)
            .map_err(|e| format!("plugin folder {}: {e}", m.dir.display()))?;
        let server = std::fs::canonicalize(m.server_path())
            .map_err(|e| format!("server {}: {e}", m.server.display()))?;
        // A symlink may point outside; the manifest rule is about where it runs from.
        if !server.starts_with(&dir) {
            return Err(format!(
                "server {} resolves outside the plugin folder",
                m.server.display()
            ));
        }
        let mut command = tokio::process::Command::new(&server);
        // SAFETY: the closure runs in the forked child before exec and only
        // calls prctl, which is async-signal-safe.
        unsafe {
            command.pre_exec(|| {
                // If the gateway dies without stopping it (SIGKILL, crash),
                // the server gets SIGTERM instead of living on as an orphan.
                let _ = rustix::process::set_parent_process_death_signal(Some(Signal::TERM));
                Ok(())
            });
        }
        let mut child = command
            .args(&m.args)
            .current_dir(&dir)
            .env_clear()
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Own process group: stopping signals the server and everything it started.
            .process_group(0)
            // Last resort if the reaper task is dropped with the runtime.
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("cannot start server {}: {e}", m.server.display()))?;
        let pid = child
            .id()
            .ok_or_else(|| "server exited before it could be tracked".to_string())?;
        let name = m.name.clone();
        let addr = ctx.address();

        if let Some(stderr) = child.stderr.take() {
            actix::spawn(log_lines(
                name.clone(),
                pid,
                "stderr",
                BufReader::new(stderr),
            ));
        }
        if let Some(stdout) = child.stdout.take() {
            let addr = addr.clone();
            let name = name.clone();
            actix::spawn(async move {
                let mut reader = BufReader::new(stdout);
                let deadline = tokio::time::Instant::now() + READY_TIMEOUT;
                let result = await_ready(&name, pid, &mut reader, deadline).await;
                let ready = result.is_ok();
                addr.do_send(ReadyOutcome { generation, result });
                if ready {
                    // Keep draining so the server never blocks on a full pipe.
                    log_lines(name, pid, "stdout", reader).await;
                }
            });
        }
        actix::spawn(async move {
            let status = match child.wait().await {
                Ok(status) => status.to_string(),
                Err(e) => format!("wait failed: {e}"),
            };
            addr.do_send(ServerExited { generation, status });
        });
        Ok(pid)
    }

    /// Enters `Backoff` and schedules the next spawn. `pid`/`exit` are for the log.
    fn schedule_restart(
        &mut self,
        ctx: &mut Context<Self>,
        reason: &str,
        pid: Option<u32>,
        exit: Option<&str>,
    ) {
        self.failures = self.failures.saturating_add(1);
        let delay = backoff_delay(self.failures);
        tracing::warn!(
            actor = "PluginHost",
            plugin = %self.manifest.name,
            pid,
            exit_status = exit,
            attempt = self.failures,
            next_delay_ms = delay.as_millis() as u64,
            reason,
            "plugin server failed; restarting after backoff"
        );
        let timer = ctx.run_later(delay, |act, ctx| {
            if matches!(act.state, HostState::Backoff { .. }) {
                act.restarts = act.restarts.saturating_add(1);
                metrics()
                    .plugin_restarts
                    .with_label_values(&[&act.manifest.name])
                    .inc();
                tracing::info!(
                    event = "actor.restarted",
                    actor = "PluginHost",
                    plugin = %act.manifest.name,
                    attempt = act.failures,
                    restarts = act.restarts,
                    reason = act.last_error.as_deref().unwrap_or("failed"),
                    "supervision: restarting plugin server"
                );
                act.spawn_server(ctx);
            }
        });
        self.state = HostState::Backoff { timer };
    }

    /// SIGTERM to the server's group now, SIGKILL after [`KILL_GRACE`] if
    /// this same process has not exited by then.
    fn terminate(&mut self, pid: u32, after: AfterExit, ctx: &mut Context<Self>) {
        signal_group(pid, Signal::TERM);
        self.state = HostState::Stopping { pid, after };
        let generation = self.generation;
        ctx.run_later(KILL_GRACE, move |act, _| {
            if act.generation == generation && matches!(act.state, HostState::Stopping { .. }) {
                tracing::warn!(actor = "PluginHost", plugin = %act.manifest.name, pid, "plugin server ignored SIGTERM; sending SIGKILL");
                signal_group(pid, Signal::KILL);
            }
        });
    }

    /// The pid of a server process that has not been reaped yet.
    fn live_pid(&self) -> Option<u32> {
        match self.state {
            HostState::Starting { pid }
            | HostState::Running { pid, .. }
            | HostState::Stopping { pid, .. } => Some(pid),
            HostState::Stopped | HostState::Backoff { .. } => None,
        }
    }
}

impl Actor for PluginHost {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        tracing::info!(event = "actor.started", actor = "PluginHost", plugin = %self.manifest.name, "actor started");
        self.spawn_server(ctx);
    }

    fn stopped(&mut self, _ctx: &mut Self::Context) {
        if let Some(pid) = self.live_pid() {
            signal_group(pid, Signal::KILL);
        }
        tracing::info!(event = "actor.stopped", actor = "PluginHost", plugin = %self.manifest.name, reason = "gateway exit", "actor stopped");
    }
}

impl Handler<StartServer> for PluginHost {
    type Result = ResponseActFuture<Self, PluginStatus>;

    fn handle(&mut self, _msg: StartServer, ctx: &mut Self::Context) -> Self::Result {
        match &mut self.state {
            HostState::Running { .. } => return Box::pin(fut::ready(self.status())),
            HostState::Starting { .. } => {}
            HostState::Stopping { after, .. } => *after = AfterExit::Start,
            HostState::Stopped => {
                self.failures = 0;
                self.spawn_server(ctx);
            }
            HostState::Backoff { timer } => {
                let timer = *timer;
                ctx.cancel_future(timer);
                self.failures = 0;
                self.spawn_server(ctx);
            }
        }
        let (tx, rx) = oneshot::channel();
        self.start_waiters.push(tx);
        self.changed();
        Box::pin(
            async move {
                let _ = tokio::time::timeout(START_REPLY_TIMEOUT, rx).await;
            }
            .into_actor(self)
            .map(|(), act, _| act.status()),
        )
    }
}

impl Handler<StopServer> for PluginHost {
    type Result = ResponseActFuture<Self, PluginStatus>;

    fn handle(&mut self, _msg: StopServer, ctx: &mut Self::Context) -> Self::Result {
        self.failures = 0;
        match &mut self.state {
            HostState::Stopped => return Box::pin(fut::ready(self.status())),
            HostState::Backoff { timer } => {
                let timer = *timer;
                ctx.cancel_future(timer);
                self.state = HostState::Stopped;
                tracing::info!(actor = "PluginHost", plugin = %self.manifest.name, reason = "stop requested", "pending restart cancelled");
                self.changed();
                return Box::pin(fut::ready(self.status()));
            }
            HostState::Stopping { after, .. } => *after = AfterExit::Stop,
            HostState::Starting { pid } | HostState::Running { pid, .. } => {
                let pid = *pid;
                tracing::info!(actor = "PluginHost", plugin = %self.manifest.name, pid, reason = "stop requested", "stopping plugin server");
                self.terminate(pid, AfterExit::Stop, ctx);
            }
        }
        let (tx, rx) = oneshot::channel();
        self.stop_waiters.push(tx);
        self.changed();
        Box::pin(
            async move {
                let _ = tokio::time::timeout(STOP_REPLY_TIMEOUT, rx).await;
            }
            .into_actor(self)
            .map(|(), act, _| act.status()),
        )
    }
}

impl Handler<ReadyOutcome> for PluginHost {
    type Result = ();

    fn handle(&mut self, msg: ReadyOutcome, ctx: &mut Self::Context) {
        let HostState::Starting { pid } = self.state else {
            return;
        };
        if msg.generation != self.generation {
            return;
        }
        match msg.result {
            Ok(port) => {
                tracing::info!(actor = "PluginHost", plugin = %self.manifest.name, pid, port, "plugin server ready");
                self.state = HostState::Running {
                    pid,
                    port,
                    since: Instant::now(),
                };
            }
            Err(reason) => {
                tracing::warn!(actor = "PluginHost", plugin = %self.manifest.name, pid, reason = %reason, "plugin server did not become ready; stopping it");
                self.last_error = Some(reason);
                self.terminate(pid, AfterExit::Backoff, ctx);
            }
        }
        self.changed();
    }
}

impl Handler<ServerExited> for PluginHost {
    type Result = ();

    fn handle(&mut self, msg: ServerExited, ctx: &mut Self::Context) {
        if msg.generation != self.generation {
            return;
        }
        let status = msg.status;
        match std::mem::replace(&mut self.state, HostState::Stopped) {
            HostState::Starting { pid } => {
                let reason = format!("exited ({status}) before announcing readiness");
                self.last_error = Some(reason.clone());
                self.schedule_restart(ctx, &reason, Some(pid), Some(&status));
            }
            HostState::Running { pid, since, .. } => {
                if since.elapsed() >= STABLE_UPTIME {
                    self.failures = 0;
                }
                let reason = format!("exited ({status}) while running");
                self.last_error = Some(reason.clone());
                self.schedule_restart(ctx, &reason, Some(pid), Some(&status));
            }
            HostState::Stopping { pid, after } => match after {
                AfterExit::Stop => {
                    tracing::info!(actor = "PluginHost", plugin = %self.manifest.name, pid, exit_status = %status, "plugin server stopped");
                }
                AfterExit::Backoff => {
                    let reason = self.last_error.clone().unwrap_or_default();
                    self.schedule_restart(ctx, &reason, Some(pid), Some(&status));
                }
                AfterExit::Start => {
                    self.failures = 0;
                    self.spawn_server(ctx);
                    return;
                }
            },
            // No process of this generation was alive: nothing to do.
            other @ (HostState::Stopped | HostState::Backoff { .. }) => self.state = other,
        }
        self.changed();
    }
}

/// The server's whole environment: `PATH` and `HOME` from `inherited`, plus `PLUGIN_NAME`.
pub fn minimal_env(name: &str, inherited: &[(OsString, OsString)]) -> Vec<(OsString, OsString)> {
    let mut env: Vec<(OsString, OsString)> = inherited
        .iter()
        .filter(|(k, _)| k == "PATH" || k == "HOME")
        .cloned()
        .collect();
    env.push(("PLUGIN_NAME".into(), name.into()));
    env
}

/// Delay before restart number `failures` (1-based): doubling from
/// [`BACKOFF_INITIAL`], capped at [`BACKOFF_MAX`].
pub fn backoff_delay(failures: u32) -> Duration {
    let doublings = failures.saturating_sub(1).min(16);
    BACKOFF_INITIAL
        .saturating_mul(1u32 << doublings)
        .min(BACKOFF_MAX)
}

/// Parses `{"ready":true,"port":N}` (other fields allowed; port 1..=65535).
pub fn parse_ready_line(line: &str) -> Option<u16> {
    let value: serde_json::Value = serde_json::from_str(line.trim()).ok()?;
    if value.get("ready")?.as_bool()? {
        let port = u16::try_from(value.get("port")?.as_u64()?).ok()?;
        (port != 0).then_some(port)
    } else {
        None
    }
}

/// Signals the process group led by `pid` (the server was spawned with
/// `process_group(0)`, so its pgid is its pid). Only called for a process
/// that has not been reaped, so the pid cannot have been reused.
fn signal_group(pid: u32, signal: Signal) {
    if let Ok(pgid) = i32::try_from(pid) {
        kill::signal_group(pgid, signal);
    }
}

fn line_text(buf: &[u8]) -> String {
    String::from_utf8_lossy(buf).trim_end().to_string()
}

/// Reads stdout until the ready line (then probes the port) or the
/// deadline. Lines before it are logged, not fatal.
async fn await_ready<R: AsyncBufRead + Unpin>(
    name: &str,
    pid: u32,
    reader: &mut R,
    deadline: tokio::time::Instant,
) -> Result<u16, String> {
    let mut last_line: Option<String> = None;
    let mut stdout_closed = false;
    let mut buf = Vec::new();
    let read = async {
        loop {
            buf.clear();
            match read_line_bounded(reader, &mut buf, MAX_LOG_LINE).await {
                Ok(0) => {
                    // Usually the server is exiting: let the reaper report
                    // its exit status first; if it lives on without stdout,
                    // the deadline ends it.
                    stdout_closed = true;
                    std::future::pending::<()>().await;
                }
                Ok(_) => {}
                Err(e) => return Err(format!("stdout read failed: {e}")),
            }
            let line = line_text(&buf);
            if let Some(port) = parse_ready_line(&line) {
                return Ok(port);
            }
            tracing::info!(plugin = %name, pid, stream = "stdout", line = %line, "plugin output before ready");
            last_line = Some(line.chars().take(MAX_QUOTED_LINE).collect());
        }
    };
    let port = match tokio::time::timeout_at(deadline, read).await {
        Ok(Ok(port)) => port,
        Ok(Err(reason)) => return Err(quote_last(reason, last_line.as_deref())),
        Err(_) => {
            let reason = format!(
                "{} {{\"ready\":true,\"port\":N}} within {} s",
                if stdout_closed {
                    "closed stdout without printing"
                } else {
                    "no ready line"
                },
                READY_TIMEOUT.as_secs()
            );
            return Err(quote_last(reason, last_line.as_deref()));
        }
    };
    probe_port(port).await.map(|()| port)
}

fn quote_last(reason: String, last_line: Option<&str>) -> String {
    match last_line {
        Some(line) => format!("{reason} (last stdout line: {line:?})"),
        None => reason,
    }
}

/// Waits until `127.0.0.1:port` accepts a TCP connection, for at most
/// [`PORT_PROBE_WINDOW`]: a plugin that announces a port it never bound is a
/// failed start, not a running plugin.
async fn probe_port(port: u16) -> Result<(), String> {
    let deadline = tokio::time::Instant::now() + PORT_PROBE_WINDOW;
    loop {
        let attempt = tokio::time::timeout_at(
            deadline,
            tokio::net::TcpStream::connect(("127.0.0.1", port)),
        )
        .await;
        let err = match attempt {
            Ok(Ok(_stream)) => return Ok(()),
            Ok(Err(e)) => e.to_string(),
            Err(_) => "timed out".to_string(),
        };
        if tokio::time::Instant::now() + PORT_PROBE_INTERVAL >= deadline {
            return Err(format!(
                "announced port {port} but nothing accepts connections there ({err})"
            ));
        }
        tokio::time::sleep(PORT_PROBE_INTERVAL).await;
    }
}

/// Logs every line of a plugin's output stream until EOF, tagged with the plugin.
async fn log_lines<R: AsyncRead + Unpin>(
    name: String,
    pid: u32,
    stream: &'static str,
    mut reader: BufReader<R>,
) {
    let mut buf = Vec::new();
    loop {
        buf.clear();
        match read_line_bounded(&mut reader, &mut buf, MAX_LOG_LINE).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {
                tracing::info!(plugin = %name, pid, stream, line = %line_text(&buf), "plugin output")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_line_is_strict_about_its_fields() {
        assert_eq!(
            parse_ready_line(r#"{"ready":true,"port":4242}"#),
            Some(4242)
        );
        assert_eq!(
            parse_ready_line(r#"  {"port":1,"ready":true,"pid":7}  "#),
            Some(1)
        );
        for bad in [
            "",
            "ready",
            r#"{"ready":false,"port":4242}"#,
            r#"{"ready":"true","port":4242}"#,
            r#"{"ready":true}"#,
            r#"{"ready":true,"port":0}"#,
            r#"{"ready":true,"port":70000}"#,
            r#"{"ready":true,"port":-1}"#,
            r#"{"ready":true,"port":"80"}"#,
            "[1,2]",
        ] {
            assert_eq!(parse_ready_line(bad), None, "{bad}");
        }
    }

    #[test]
    fn backoff_doubles_and_is_capped() {
        assert_eq!(backoff_delay(1), BACKOFF_INITIAL);
        assert_eq!(backoff_delay(2), BACKOFF_INITIAL * 2);
        assert_eq!(backoff_delay(3), BACKOFF_INITIAL * 4);
        assert_eq!(backoff_delay(20), BACKOFF_MAX);
        assert_eq!(backoff_delay(u32::MAX), BACKOFF_MAX);
    }

    #[test]
    fn environment_is_minimal() {
        let inherited: Vec<(OsString, OsString)> = [
            ("PATH", "/usr/bin"),
            ("HOME", "/home/u"),
            ("SECRET_TOKEN", "x"),
            ("AGENTGATE_JWT_SECRET", "y"),
        ]
        .into_iter()
        .map(|(k, v)| (k.into(), v.into()))
        .collect();
        let env = minimal_env("echo", &inherited);
        let keys: Vec<_> = env
            .iter()
            .map(|(k, _)| k.to_string_lossy().into_owned())
            .collect();
        assert_eq!(keys, ["PATH", "HOME", "PLUGIN_NAME"]);
        assert_eq!(env.last().map(|(_, v)| v.clone()), Some("echo".into()));
    }
}
