//! `ProviderRun`: one live provider CLI process.
//!
//! **Owns** the child process (in its own session and process group, cwd = the turn's
//! project path, the gateway's environment minus its secrets), the writer
//! side of its stdin (a task fed by a bounded channel), and the reader of
//! its stdout with the provider's [`LineParser`].
//!
//! **Handles** [`Abort`] (interrupt, close stdin, then SIGTERM and SIGKILL to
//! the group after grace periods), [`Kill`] (SIGKILL to the group, at
//! shutdown) and [`AnswerPermission`] (writes the provider's permission
//! reply), all from the RunRegistry; and its own `KillGroup`.
//!
//! **Process control**: the child gets `PR_SET_PDEATHSIG` (SIGKILL), so a
//! gateway that dies without its shutdown takes the CLI with it. Signals go
//! through pidfds: the CLI's, opened at spawn, and one per descendant found
//! in /proc (checked to still be that descendant once opened), so no signal
//! can reach a process that reused a remembered pid. The group is signalled
//! with `killpg` only while the CLI is not reaped: its zombie keeps the
//! group id reserved. Every wait is bounded: once stdout ends, the CLI has
//! [`EXIT_GRACE`] to exit, and once it exited, its descendants have as long
//! to release stdout; then the group and the tree are killed, and the run is
//! reported once (as failed if its turn had not ended).
//!
//! **Sends** [`RunEvents`] to the RunRegistry, awaited, so a busy registry
//! slows the reading of stdout (backpressure) instead of queueing, at most
//! one batch per [`BATCH_INTERVAL`] while lines come faster; and one
//! [`RunExited`] when the process is gone (or, from `Drop`, when this actor
//! died without reporting, e.g. a panic).
//!
//! **Stops** when stdout is closed and the process has exited; the process
//! group is killed then (before the CLI is reaped), so nothing the CLI
//! started outlives its run.

use std::collections::HashMap;
use std::ffi::OsString;
use std::os::fd::OwnedFd;
use std::process::Stdio;
use std::time::Duration;

use actix::prelude::*;
use rustix::process::Pid;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWriteExt, BufReader};
use tokio::sync::mpsc;
use tracing::Instrument;

use crate::chat::run_registry::{RunEvents, RunExited, RunRegistry};
use crate::fine_timer::FineTimer;
use crate::kill::{self, Signal};
use crate::lines::read_line_bounded;
use crate::metrics::PanicWatch;
use crate::protocol::PermissionDecision;
use crate::provider::cli_support::{preview, STDERR_LINE_MAX};
use crate::provider::{LineParser, Provider, ProviderEvent, Turn};
use crate::quiet_pipe::QuietPipe;

/// After an interrupt, how long the CLI gets to exit by itself before SIGTERM.
pub const ABORT_GRACE: Duration = Duration::from_secs(2);
/// After SIGTERM, how long before SIGKILL.
pub const KILL_GRACE: Duration = Duration::from_secs(2);
/// After stdout ends, how long the CLI may take to exit (and after it
/// exited, how long its descendants may hold stdout) before the group and
/// its tree are killed.
pub const EXIT_GRACE: Duration = Duration::from_secs(5);
/// After a SIGKILL, how long until the process must be gone (a process in
/// uninterruptible sleep may take a moment).
const KILL_WAIT: Duration = Duration::from_secs(5);
/// How long the stderr reader may take to finish after the exit.
const STDERR_GRACE: Duration = Duration::from_secs(2);
/// Descendants tracked by pidfd at most (a CLI with more is unusual; the
/// group signal still reaches those in its group).
const MAX_TRACKED: usize = 1024;
/// Stdin writes queued for the writer task. Writes are small and rare
/// (a turn, permission answers, an interrupt); a full queue makes the
/// sender wait.
const STDIN_QUEUE: usize = 64;
/// Most events (or lines: text deltas share one grouped event) sent to the
/// registry in one batch.
const BATCH_MAX_EVENTS: usize = 256;
/// The stdout reader's buffer; a line within it is parsed where it is.
const STDOUT_BUFFER_BYTES: usize = 64 * 1024;
/// The CLI's stdout pipe (Linux's default is 64 KiB): room for the CLI to
/// write on while the gateway parses and hands on the batch it read, so a
/// fast CLI does not block and wait to be woken after every read. In
/// `chat-one` (A/B, eight pairs) 72-88% of the pipe baseline became 81-87%.
/// When it is full the CLI's writes block, as with any pipe. Refused (a user
/// over `pipe-user-pages-soft`), it keeps the default.
const STDOUT_PIPE_BYTES: usize = 256 * 1024;
/// Most stdout bytes parsed into one batch (keeps every batch, and so every
/// subscriber's queued batch, small).
const BATCH_MAX_BYTES: usize = 64 * 1024;
/// Batches of one run start at most this often: a CLI that writes a line
/// per syscall faster than the gateway hands a batch on would otherwise get
/// a batch (a registry turn, a socket write and its drain report, each a
/// cross-thread wake-up) per line or two. Waiting lets the pipe fill: at a
/// million lines/s a batch holds about fifty. The interval counts from the
/// start of the previous batch (its first line), so a batch that took
/// longer than this to parse and hand on is followed at once: a CLI ahead
/// of the gateway keeps the pipe full, and a wait then only stalls both
/// (with the wait counted from the end of each batch, `chat-one` ran at
/// 55-64% of the pipe instead of 67-79%). A line that comes after a pause
/// longer than this goes on at once; the wait adds at most this much
/// latency, and only while lines come faster.
pub const BATCH_INTERVAL: Duration = Duration::from_micros(50);
/// Longest stdout line accepted; a longer one is dropped (logged) rather
/// than buffered without bound.
pub const MAX_LINE_BYTES: usize = 32 * 1024 * 1024;
/// stderr kept for the error message of a failed run.
const STDERR_TAIL_BYTES: usize = 2048;

/// Interrupt the run (from the RunRegistry on `chat.abort` or shutdown).
#[derive(Message)]
#[rtype(result = "()")]
pub struct Abort;

/// Kill the whole process group now (from the RunRegistry at gateway shutdown).
#[derive(Message)]
#[rtype(result = "()")]
pub struct Kill;

/// From the run's own exit watcher: SIGKILL the group and the tree; with
/// `reaping`, no group signal is sent any more afterwards (the CLI is about
/// to be reaped and its group id freed).
#[derive(Message)]
#[rtype(result = "()")]
struct KillGroup {
    reaping: bool,
}

/// Answer a permission request (from the RunRegistry).
#[derive(Message)]
#[rtype(result = "()")]
pub struct AnswerPermission {
    pub provider_request_id: String,
    pub decision: PermissionDecision,
    pub original_input: Value,
}

enum StdinCmd {
    Write(Vec<u8>),
    Close,
}

pub struct ProviderRun {
    session_id: String,
    run_id: String,
    provider: &'static dyn Provider,
    turn: Option<Turn>,
    registry: Addr<RunRegistry>,
    child_env: Vec<(OsString, OsString)>,
    /// Process group id (= the child's pid) once spawned; `None` once the
    /// child is reaped (the id may then belong to someone else).
    pgid: Option<i32>,
    /// The child's pidfd.
    leader: Option<OwnedFd>,
    /// Descendants seen so far, by pidfd. Some CLIs (Gemini, OpenCode) start
    /// tools in their own process group, which a group signal misses; they
    /// are found by walking /proc from the child before it is signalled.
    tree: HashMap<i32, OwnedFd>,
    stdin: Option<mpsc::Sender<StdinCmd>>,
    /// Set once RunExited was sent, so Drop does not report twice.
    reported: bool,
    aborting: bool,
    /// Silence (outside a permission prompt) after which the CLI is killed.
    idle_limit: Option<Duration>,
    _panics: PanicWatch,
    /// `run{session_id, run_id, provider}`: this run's log lines (and its
    /// stdout reader's) are inside it, so `RUST_LOG` can pick one run.
    span: tracing::Span,
}

impl ProviderRun {
    pub fn new(
        session_id: String,
        run_id: String,
        provider: &'static dyn Provider,
        turn: Turn,
        registry: Addr<RunRegistry>,
        child_env: Vec<(OsString, OsString)>,
    ) -> Self {
        ProviderRun {
            span: tracing::info_span!("run", session_id = %session_id, run_id = %run_id, provider = %provider.kind()),
            _panics: PanicWatch::new(
                "ProviderRun",
                format!("session_id={session_id} run_id={run_id}"),
            ),
            session_id,
            run_id,
            provider,
            turn: Some(turn),
            registry,
            child_env,
            pgid: None,
            leader: None,
            tree: HashMap::new(),
            stdin: None,
            reported: false,
            aborting: false,
            idle_limit: None,
        }
    }

    /// Kills a CLI that prints nothing for `limit` (`--provider-idle-secs`),
    /// except while it waits for the user's answer to a permission prompt.
    pub fn idle_limit(mut self, limit: Duration) -> Self {
        self.idle_limit = Some(limit);
        self
    }

    fn report_exit(&mut self, exit_code: Option<i32>, error: Option<String>) {
        if self.reported {
            return;
        }
        self.reported = true;
        self.registry.do_send(RunExited {
            session_id: self.session_id.clone(),
            run_id: self.run_id.clone(),
            exit_code,
            error,
        });
    }

    /// Opens pidfds for processes of the run not tracked yet: descendants
    /// of the CLI, and members of its session (orphans the CLI left behind
    /// keep the session id after they were reparented).
    fn track_descendants(&mut self) {
        let Some(sid) = self.pgid else {
            return;
        };
        let all = crate::procfs::all();
        let in_session: Vec<i32> = all
            .iter()
            .filter(|p| p.session == sid && p.pid != sid && !p.zombie)
            .map(|p| p.pid)
            .collect();
        for pid in kill::descendants_in(&all, sid)
            .into_iter()
            .chain(in_session)
        {
            if self.tree.len() >= MAX_TRACKED || self.tree.contains_key(&pid) {
                continue;
            }
            let ours = |ppid: i32| ppid == sid || self.tree.contains_key(&ppid);
            let fd = crate::pidfd::open(pid).ok().filter(|_| {
                // Still the process the walk saw (its pid was not reused).
                crate::procfs::stat(pid)
                    .is_some_and(|p| !p.zombie && (p.session == sid || ours(p.ppid)))
            });
            if let Some(fd) = fd {
                self.tree.insert(pid, fd);
            }
        }
    }

    /// Signals the CLI, its process group and every descendant found so far.
    fn signal_group(&mut self, signal: Signal) {
        let Some(pgid) = self.pgid else {
            return;
        };
        self.track_descendants();
        if let Some(leader) = &self.leader {
            let _ = crate::pidfd::signal(leader, signal);
        }
        // The child is not reaped yet (pgid is cleared before it is), so no
        // other process can have this group id.
        kill::signal_group(pgid, signal);
        for fd in self.tree.values() {
            let _ = crate::pidfd::signal(fd, signal);
        }
    }

    fn write_stdin(&self, cmd: StdinCmd, ctx: &mut Context<Self>) {
        let Some(tx) = &self.stdin else {
            return;
        };
        if let Err(mpsc::error::TrySendError::Full(cmd)) = tx.try_send(cmd) {
            let tx = tx.clone();
            ctx.spawn(
                async move {
                    let _ = tx.send(cmd).await;
                }
                .into_actor(self),
            );
        }
    }
}

impl Actor for ProviderRun {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        let span = self.span.clone();
        let _entered = span.enter();
        let Some(turn) = self.turn.take() else {
            return;
        };
        #[cfg(debug_assertions)]
        injected_panic(&turn);
        let spec = self.provider.command(&turn);
        let mut cmd = tokio::process::Command::new(&spec.program);
        cmd.args(&spec.args)
            .current_dir(&turn.cwd)
            .env_clear()
            .envs(self.child_env.iter().map(|(k, v)| (k, v)))
            // Tools that resolve paths against $PWD must see the project, not the gateway's cwd.
            .env("PWD", &turn.cwd)
            .envs(spec.env.iter().map(|(k, v)| (k, v)))
            .stdin(if spec.stdin.is_some() || spec.keep_stdin_open {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let gateway = std::process::id() as i32;
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                // A gateway that dies without its shutdown (SIGKILL, crash)
                // takes the CLI with it instead of leaving it editing files.
                let _ = rustix::process::set_parent_process_death_signal(Some(Signal::KILL));
                // Own session (so also own process group): abort and exit
                // kill the group and every process left in the session,
                // whatever group a tool moved to, and the CLI gets no
                // controlling terminal of the gateway's.
                rustix::process::setsid()?;
                // SCHED_BATCH: the same CPU share, but a CLI (and what it
                // runs) waking up does not preempt the gateway relaying its
                // output. Each CLI's session is its own autogroup, as heavy
                // as the whole gateway; a hundred CLIs waking together held
                // the relay back (chat-many's paced p99). Not fatal if refused.
                let param = libc::sched_param { sched_priority: 0 };
                libc::sched_setscheduler(0, libc::SCHED_BATCH, &param);
                if rustix::process::getppid() != Pid::from_raw(gateway) {
                    // The gateway died before the line above: do not run.
                    return Err(std::io::Error::other("gateway gone"));
                }
                Ok(())
            });
        }
        let mut child = match cmd.spawn() {
            Ok(child) => child,
            Err(err) => {
                let error = if err.kind() == std::io::ErrorKind::NotFound {
                    format!(
                        "{} is not installed or not on PATH ({}); install it or set --{}-bin",
                        self.provider.kind(),
                        spec.program.display(),
                        self.provider.kind()
                    )
                } else {
                    format!("Failed to start {}: {err}", spec.program.display())
                };
                tracing::warn!(actor = "ProviderRun", session_id = %self.session_id, run_id = %self.run_id, reason = %error, "spawn failed");
                self.report_exit(None, Some(error));
                ctx.stop();
                return;
            }
        };
        self.pgid = child.id().and_then(|pid| i32::try_from(pid).ok());
        // Our unreaped child: its pid cannot have been reused yet.
        self.leader = self.pgid.and_then(|pid| crate::pidfd::open(pid).ok());
        tracing::info!(event = "actor.started", actor = "ProviderRun", session_id = %self.session_id, run_id = %self.run_id, provider = %self.provider.kind(), pid = ?self.pgid, program = %spec.program.display(), "actor started");

        if let Some(mut stdin) = child.stdin.take() {
            let (tx, mut rx) = mpsc::channel::<StdinCmd>(STDIN_QUEUE);
            if let Some(bytes) = spec.stdin {
                let _ = tx.try_send(StdinCmd::Write(bytes));
            }
            if !spec.keep_stdin_open {
                let _ = tx.try_send(StdinCmd::Close);
            }
            let run_id = self.run_id.clone();
            actix::spawn(async move {
                while let Some(cmd) = rx.recv().await {
                    match cmd {
                        StdinCmd::Write(bytes) => {
                            if let Err(err) = stdin.write_all(&bytes).await {
                                tracing::debug!(run_id = %run_id, %err, "stdin closed by the provider");
                                break;
                            }
                            let _ = stdin.flush().await;
                        }
                        StdinCmd::Close => break,
                    }
                }
                // Dropping stdin closes it: the CLI sees EOF.
            });
            self.stdin = Some(tx);
        }

        let stderr_tail = child.stderr.take().map(|stderr| {
            let run_id = self.run_id.clone();
            actix::spawn(read_stderr(stderr, run_id))
        });

        // Out of tokio's registration (which every line the CLI writes would
        // wake while the reader waits for the pipe to fill): see quiet_pipe.
        let stdout = child
            .stdout
            .take()
            .map(|out| {
                out.into_owned_fd().and_then(|fd| {
                    if let Err(e) = rustix::pipe::fcntl_setpipe_size(&fd, STDOUT_PIPE_BYTES) {
                        tracing::debug!(run_id = %self.run_id, error = %e, "stdout pipe keeps its size");
                    }
                    QuietPipe::new(fd)
                })
            });
        let Some(Ok(stdout)) = stdout else {
            self.report_exit(None, Some("provider stdout unavailable".into()));
            ctx.stop();
            return;
        };
        let mut parser = self.provider.parser(&turn);
        let reader = StdoutReader {
            session_id: self.session_id.clone(),
            run_id: self.run_id.clone(),
            registry: self.registry.clone(),
            stdin: self.stdin.clone(),
            keep_stdin_open: spec.keep_stdin_open,
            idle_timeout: self.idle_limit.or(spec.idle_timeout),
        };
        let exit_fd = self.leader.as_ref().and_then(|fd| fd.try_clone().ok());
        let me = ctx.address();
        ctx.spawn(
            async move {
                let mut stuck = false;
                let outcome = {
                    let read = reader.run(stdout, &mut parser);
                    tokio::pin!(read);
                    tokio::select! {
                        outcome = &mut read => outcome,
                        () = exited(exit_fd.as_ref()) => {
                            // The CLI is gone; a descendant may still hold stdout.
                            match tokio::time::timeout(EXIT_GRACE, &mut read).await {
                                Ok(outcome) => outcome,
                                Err(_) => {
                                    let _ = me.send(KillGroup { reaping: false }).await;
                                    read.await
                                }
                            }
                        }
                    }
                };
                if outcome == ReadOutcome::IdleTimeout {
                    let _ = me.send(KillGroup { reaping: false }).await;
                }
                // Stdout ended: the CLI gets a bounded time to exit.
                if !exited_within(exit_fd.as_ref(), EXIT_GRACE).await {
                    stuck = outcome == ReadOutcome::Eof;
                    let _ = me.send(KillGroup { reaping: false }).await;
                    exited_within(exit_fd.as_ref(), KILL_WAIT).await;
                }
                // Exited and not reaped: its group id is still its own, so
                // whatever it left running in the group goes with it now.
                let _ = me.send(KillGroup { reaping: true }).await;
                let status = match tokio::time::timeout(KILL_WAIT, child.wait()).await {
                    Ok(status) => status,
                    Err(_) => Err(std::io::Error::other("the provider did not exit after SIGKILL")),
                };
                let tail = match stderr_tail {
                    Some(mut handle) => match tokio::time::timeout(STDERR_GRACE, &mut handle).await {
                        Ok(tail) => tail.unwrap_or_default(),
                        Err(_) => {
                            handle.abort();
                            String::new()
                        }
                    },
                    None => String::new(),
                };
                // Providers that end a turn with the process, or report
                // failures only on stderr, speak now (before the registry
                // would synthesize a failed complete).
                let mut events = Vec::new();
                for line in tail.lines() {
                    parser.stderr_line(line, &mut events);
                }
                parser.exited(status.as_ref().ok().and_then(|s| s.code()), &mut events);
                reader.flush(&mut events).await;
                (if stuck { ReadOutcome::Stuck } else { outcome }, status, tail)
            }
            .instrument(self.span.clone())
            .into_actor(self)
            .map(|(outcome, status, tail), act, ctx| {
                let (code, signal) = match &status {
                    Ok(s) => {
                        use std::os::unix::process::ExitStatusExt;
                        (s.code(), s.signal())
                    }
                    Err(_) => (None, None),
                };
                let error = match outcome {
                    ReadOutcome::IdleTimeout => Some(format!(
                        "{} produced no output for too long and was stopped",
                        act.provider.kind()
                    )),
                    ReadOutcome::Stuck => Some(format!(
                        "{} closed its output but did not exit, and was stopped",
                        act.provider.kind()
                    )),
                    ReadOutcome::Eof => {
                        let mut msg = match (code, signal) {
                            (Some(code), _) => format!("{} exited with code {code} before finishing the turn", act.provider.kind()),
                            (None, Some(sig)) => format!("{} was killed by signal {sig} before finishing the turn", act.provider.kind()),
                            _ => format!("{} ended before finishing the turn", act.provider.kind()),
                        };
                        if !tail.trim().is_empty() {
                            msg.push_str(": ");
                            msg.push_str(tail.trim());
                        }
                        Some(msg)
                    }
                };
                let _entered = act.span.clone().entered();
                tracing::info!(actor = "ProviderRun", session_id = %act.session_id, run_id = %act.run_id, exit_code = ?code, signal = ?signal, aborted = act.aborting, "process exited");
                act.report_exit(code, error);
                ctx.stop();
            }),
        );
    }

    fn stopped(&mut self, _: &mut Self::Context) {
        let _entered = self.span.clone().entered();
        tracing::info!(event = "actor.stopped", actor = "ProviderRun", session_id = %self.session_id, run_id = %self.run_id, reason = if self.aborting { "aborted" } else { "process exited" }, "actor stopped");
    }
}

/// Debug builds only (release builds have no such hook): a prompt equal to
/// `AGENTGATE_TEST_PANIC_PROMPT` makes the run actor panic as it starts, so
/// the integration tests can watch a panicking run being supervised (the
/// run completes as failed, `actor.panicked` is logged and counted, the
/// gateway goes on). No real CLI or input can make this actor panic on demand.
#[cfg(debug_assertions)]
fn injected_panic(turn: &Turn) {
    if std::env::var_os("AGENTGATE_TEST_PANIC_PROMPT").is_some_and(|p| p == *turn.content) {
        panic!("injected panic (AGENTGATE_TEST_PANIC_PROMPT)");
    }
}

impl Drop for ProviderRun {
    fn drop(&mut self) {
        // Reached without a report only if the actor died (e.g. a panic):
        // the run still gets its failed complete and its processes die.
        if !self.reported {
            let _entered = self.span.clone().entered();
            tracing::error!(actor = "ProviderRun", session_id = %self.session_id, run_id = %self.run_id, reason = "actor died", "supervision: run actor crashed");
            self.signal_group(Signal::KILL);
            self.report_exit(
                None,
                Some("The provider run crashed inside the gateway".into()),
            );
        }
    }
}

impl Handler<Abort> for ProviderRun {
    type Result = ();

    fn handle(&mut self, _: Abort, ctx: &mut Context<Self>) {
        if self.aborting {
            return;
        }
        self.aborting = true;
        // Before the CLI can exit and orphan its tools, remember them.
        self.track_descendants();
        if let Some(bytes) = self.provider.interrupt() {
            self.write_stdin(StdinCmd::Write(bytes), ctx);
        }
        self.write_stdin(StdinCmd::Close, ctx);
        if self.provider.interrupt().is_none() {
            // No interrupt protocol: terminate at once.
            self.signal_group(Signal::TERM);
        }
        ctx.run_later(ABORT_GRACE, |act, ctx| {
            act.signal_group(Signal::TERM);
            ctx.run_later(KILL_GRACE, |act, _| act.signal_group(Signal::KILL));
        });
    }
}

impl Handler<Kill> for ProviderRun {
    type Result = ();

    fn handle(&mut self, _: Kill, _: &mut Context<Self>) {
        self.aborting = true;
        self.signal_group(Signal::KILL);
    }
}

impl Handler<KillGroup> for ProviderRun {
    type Result = ();

    fn handle(&mut self, msg: KillGroup, _: &mut Context<Self>) {
        self.signal_group(Signal::KILL);
        if msg.reaping {
            self.pgid = None;
        }
    }
}

impl Handler<AnswerPermission> for ProviderRun {
    type Result = ();

    fn handle(&mut self, msg: AnswerPermission, ctx: &mut Context<Self>) {
        if let Some(bytes) = self.provider.permission_reply(
            &msg.provider_request_id,
            &msg.decision,
            &msg.original_input,
        ) {
            self.write_stdin(StdinCmd::Write(bytes), ctx);
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ReadOutcome {
    Eof,
    IdleTimeout,
    /// Stdout ended but the CLI did not exit within [`EXIT_GRACE`].
    Stuck,
}

/// The CLI's exit (or never, without a pidfd: the callers' bounds apply).
async fn exited(fd: Option<&OwnedFd>) {
    match fd {
        Some(fd) => crate::pidfd::exited(fd).await,
        None => std::future::pending().await,
    }
}

async fn exited_within(fd: Option<&OwnedFd>, limit: Duration) -> bool {
    tokio::time::timeout(limit, exited(fd)).await.is_ok()
}

/// The stdout loop: read lines, parse in batches, hand batches to the registry.
struct StdoutReader {
    session_id: String,
    run_id: String,
    registry: Addr<RunRegistry>,
    stdin: Option<mpsc::Sender<StdinCmd>>,
    keep_stdin_open: bool,
    idle_timeout: Option<Duration>,
}

impl StdoutReader {
    async fn run(&self, stdout: QuietPipe, parser: &mut Box<dyn LineParser>) -> ReadOutcome {
        let mut reader = BufReader::with_capacity(STDOUT_BUFFER_BYTES, stdout);
        let mut line = Vec::with_capacity(4096);
        let mut events = Vec::new();
        // A permission prompt waits for a person, not for the CLI: no idle limit then.
        let mut awaiting_user = false;
        // No timer (no descriptor left): batches as the lines come.
        let timer = FineTimer::new()
            .inspect_err(|e| tracing::warn!(run_id = %self.run_id, error = %e, "no batching timer"))
            .ok();
        // When the previous batch's first line was read.
        let mut last_batch: Option<tokio::time::Instant> = None;
        let outcome = loop {
            let (mut batch_bytes, mut batch_lines) = (0, 0);
            let mut read_at = None;
            // Parse every complete line already buffered before awaiting the registry.
            let eof = loop {
                // A whole line in the buffer is parsed where it is (no copy).
                if let Some(end) = memchr::memchr(b'\n', reader.buffer()) {
                    let bytes = &reader.buffer()[..=end];
                    read_at.get_or_insert_with(tokio::time::Instant::now);
                    batch_bytes += bytes.len();
                    batch_lines += 1;
                    parse_stdout_line(parser.as_mut(), bytes, &mut events);
                    reader.consume(end + 1);
                } else if batch_bytes > 0 {
                    // No complete line left: hand over what this batch has.
                    break false;
                } else {
                    if let (Some(timer), Some(at)) = (&timer, last_batch) {
                        let wait = BATCH_INTERVAL.saturating_sub(at.elapsed());
                        if !wait.is_zero() {
                            // The CLI's writes must not wake this thread while it waits.
                            reader.get_mut().quiet();
                            let _ = timer.sleep(wait).await;
                        }
                    }
                    line.clear();
                    let read = match self.idle_timeout.filter(|_| !awaiting_user) {
                        Some(limit) => {
                            match tokio::time::timeout(
                                limit,
                                read_stdout_line(&mut reader, &mut line),
                            )
                            .await
                            {
                                Ok(r) => r,
                                Err(_) => {
                                    self.flush(&mut events).await;
                                    return ReadOutcome::IdleTimeout;
                                }
                            }
                        }
                        None => read_stdout_line(&mut reader, &mut line).await,
                    };
                    match read {
                        LineRead::Eof => break true,
                        LineRead::TooLong => {
                            tracing::warn!(run_id = %self.run_id, limit = MAX_LINE_BYTES, "dropping an over-long stdout line");
                            // Its first MAX_LINE_BYTES were read into `line`.
                            line = Vec::new();
                            break false;
                        }
                        LineRead::Line => {
                            read_at.get_or_insert_with(tokio::time::Instant::now);
                            batch_bytes += line.len();
                            batch_lines += 1;
                            parse_stdout_line(parser.as_mut(), &line, &mut events);
                        }
                    }
                    // A line longer than the reader's buffer leaves no
                    // allocation behind: a turn ends with two lines of its
                    // whole text (assistant, result), and a hundred runs
                    // ending together each kept 150 KB until their stdout
                    // ended (11.6 MB at chat-many's peak).
                    if line.capacity() > STDOUT_BUFFER_BYTES {
                        line = Vec::new();
                    }
                }
                let full = events.len().max(batch_lines) >= BATCH_MAX_EVENTS;
                if full || batch_bytes >= BATCH_MAX_BYTES {
                    break false;
                }
            };
            if eof {
                parser.finish(&mut events);
                self.flush_read(&mut events, read_at).await;
                break ReadOutcome::Eof;
            }
            awaiting_user = events
                .iter()
                .any(|e| matches!(e, ProviderEvent::PermissionRequested { .. }));
            last_batch = read_at;
            self.flush_read(&mut events, read_at).await;
        };
        outcome
    }

    /// Writes replies to stdin and sends the rest to the registry (awaited).
    async fn flush(&self, events: &mut Vec<ProviderEvent>) {
        self.flush_read(events, None).await
    }

    /// [`flush`](Self::flush) of events parsed from lines read since `read_at`.
    async fn flush_read(
        &self,
        events: &mut Vec<ProviderEvent>,
        read_at: Option<tokio::time::Instant>,
    ) {
        if events.is_empty() {
            return;
        }
        let for_the_run = |e: &ProviderEvent| {
            matches!(
                e,
                ProviderEvent::Reply(_) | ProviderEvent::TurnComplete { .. }
            )
        };
        if !events.iter().any(for_the_run) {
            // The usual batch (deltas): handed over as it is, not moved event by event.
            let batch = std::mem::replace(events, Vec::with_capacity(events.len()));
            return self.send_batch(batch, read_at).await;
        }
        let mut batch = Vec::with_capacity(events.len());
        for event in events.drain(..) {
            match event {
                ProviderEvent::Reply(bytes) => {
                    if let Some(tx) = &self.stdin {
                        let _ = tx.send(StdinCmd::Write(bytes)).await;
                    }
                }
                ProviderEvent::TurnComplete { .. } => {
                    // The turn is over: close stdin so the CLI exits.
                    if self.keep_stdin_open {
                        if let Some(tx) = &self.stdin {
                            let _ = tx.send(StdinCmd::Close).await;
                        }
                    }
                    batch.push(event);
                }
                other => batch.push(other),
            }
        }
        self.send_batch(batch, read_at).await
    }

    async fn send_batch(&self, batch: Vec<ProviderEvent>, read_at: Option<tokio::time::Instant>) {
        if batch.is_empty() {
            return;
        }
        let msg = RunEvents {
            session_id: self.session_id.clone(),
            run_id: self.run_id.clone(),
            events: batch,
            read_at,
        };
        if self.registry.send(msg).await.is_err() {
            tracing::error!(run_id = %self.run_id, "run registry is gone; dropping events");
        }
    }
}

/// Hands one stdout line (its newline included, if any) to the parser
/// (grouping text deltas): blank lines are skipped, bytes that are not
/// UTF-8 are replaced.
fn parse_stdout_line(parser: &mut dyn LineParser, bytes: &[u8], events: &mut Vec<ProviderEvent>) {
    match std::str::from_utf8(bytes) {
        Ok(text) => {
            let text = text.trim_end_matches(['\n', '\r']);
            if !text.trim().is_empty() {
                parser.parse_line_grouped(text, events);
            }
        }
        Err(_) => {
            let text = String::from_utf8_lossy(bytes);
            parser.parse_line_grouped(text.trim_end_matches(['\n', '\r']), events);
        }
    }
}

enum LineRead {
    Line,
    TooLong,
    Eof,
}

/// Reads one stdout line into `line` (with its newline), holding at most
/// [`MAX_LINE_BYTES`]: an over-long line is skipped. A read error ends
/// the stream as EOF does.
async fn read_stdout_line<R: AsyncRead + Unpin>(
    reader: &mut BufReader<R>,
    line: &mut Vec<u8>,
) -> LineRead {
    match read_line_bounded(reader, line, MAX_LINE_BYTES).await {
        Ok(0) | Err(_) => LineRead::Eof,
        Ok(n) if n > line.len() => LineRead::TooLong,
        Ok(_) => LineRead::Line,
    }
}

/// Logs stderr line by line until EOF and returns its tail (for the error
/// message of a failed run, and for the parser's `stderr_line` hook at
/// exit). A line holds at most [`STDERR_LINE_MAX`] bytes (the rest of a
/// longer one, or of one that never ends, is read and dropped) and is
/// decoded lossily: a CLI that is never done with a line or writes bytes
/// that are not UTF-8 neither grows memory nor stops being read (a stderr
/// left unread would block it on a full pipe).
async fn read_stderr(stderr: impl AsyncRead + Unpin, run_id: String) -> String {
    let mut reader = BufReader::new(stderr);
    let mut bytes = Vec::with_capacity(256);
    let mut tail = String::new();
    loop {
        bytes.clear();
        match read_line_bounded(&mut reader, &mut bytes, STDERR_LINE_MAX).await {
            Ok(0) => break,
            Ok(_) => {}
            Err(err) => {
                tracing::debug!(run_id = %run_id, %err, "provider stderr unreadable");
                break;
            }
        }
        let text = String::from_utf8_lossy(&bytes);
        // Replacement characters may have made it longer than the bytes were.
        let line = preview(text.trim_end_matches(['\n', '\r']), STDERR_LINE_MAX);
        tracing::debug!(run_id = %run_id, stderr = %line, "provider stderr");
        tail.push_str(line);
        tail.push('\n');
        if tail.len() > STDERR_TAIL_BYTES {
            let cut = tail.len() - STDERR_TAIL_BYTES;
            let cut = (cut..tail.len())
                .find(|i| tail.is_char_boundary(*i))
                .unwrap_or(tail.len());
            tail.drain(..cut);
        }
    }
    tail
}
