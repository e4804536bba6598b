//! `PtySession`: one persistent terminal (PROTOCOL.md section 5), one actor
//! per (user, session key).
//!
//! Owns: the child process (a session leader with the PTY as its
//! controlling terminal, killed with its whole session through a
//! [`SessionGuard`]), both halves of the PTY master, the UTF-8 carry of a
//! split character, the auth URL detector, the byte-bounded replay buffer,
//! the vt100 screen state, the queue of input not yet written, and the
//! attached sockets with the number of output frames each has in flight.
//!
//! Handles: [`AttachSocket`] (reattach: reconnect line, then the redrawn
//! screen or the replay), [`DetachSocket`] (by socket id only),
//! [`WriteInput`], [`ResizePty`], [`TerminatePty`] (from the hub: replaced
//! by a login command / `forceRestart`, or shutdown), and its own
//! `Delivered` acknowledgements.
//!
//! Sends: [`PtyOutput`] to every attached socket (one serialized frame
//! shared by all), [`PtyEnded`] when it lets go of a socket, [`PtyClosed`]
//! to the hub when it stops.
//!
//! Flow control: each output frame is sent with `send` and counted in
//! flight until the socket has handled it. A socket whose client does not
//! read stops handling its mailbox (actix-web-actors polls it only when the
//! connection can take more bytes), so its count grows. When every
//! attached socket has [`OUTPUT_HIGH_WATER`] frames in flight the PTY is
//! not read until one drains: the kernel's PTY buffer fills and the child
//! blocks in `write`, and the gateway's memory stays flat. A socket that
//! reaches [`SLOW_CONSUMER_LIMIT`] while another socket keeps the PTY going
//! is let go (`PtyEnded::SlowConsumer`, close 4008; it can reattach). With
//! no socket attached the PTY is read into the bounded replay buffer, so a
//! detached program never blocks.
//!
//! Stops: when the process has exited and its remaining output was read
//! (the exit line is the last output), on the detach timeout (no socket for
//! `--shell-detach-secs`), when replaced, or on shutdown. In every case the
//! child's whole session is killed first.

use std::collections::{BTreeMap, VecDeque};
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::process::ExitStatus;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use bytestring::ByteString;
use futures_util::FutureExt;
use pty_process::{OwnedReadPty, OwnedWritePty};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::launch::LaunchSpec;
use super::replay::ReplayBuffer;
use super::screen::Screen;
use super::shell_socket::{PtyEnded, PtyOutput};
use super::url_detect::{rewrite_open_url, DetectedUrl, UrlDetector, URL_SETTLE};
use super::utf8::Utf8Carry;
use super::{
    exit_line, EndReason, ServerFrame, ShellLimits, SocketHandle, TermSize, RECONNECT_LINE,
};
use crate::kill::SessionGuard;
use crate::metrics::{metrics, PanicWatch};

/// Largest single PTY read.
pub const READ_CHUNK_BYTES: usize = 64 * 1024;
/// Output frames in flight per socket above which that socket counts as behind.
pub const OUTPUT_HIGH_WATER: usize = 8;
/// A socket this far behind is let go while other sockets keep the PTY
/// going. Together with the replay frames this stays below
/// [`SOCKET_MAILBOX_CAPACITY`], so `send` never parks and frames stay in order.
pub const SLOW_CONSUMER_LIMIT: usize = 32;
/// Mailbox capacity a socket actor must set for the ordering argument above.
pub const SOCKET_MAILBOX_CAPACITY: usize = 64;
/// A reattach replays in at most this many frames (each at least
/// [`REPLAY_FRAME_BYTES`]), so a replay alone never makes a socket "slow".
pub const REPLAY_MAX_FRAMES: usize = 8;
pub const REPLAY_FRAME_BYTES: usize = 128 * 1024;
/// Input accepted but not yet written to the PTY; input beyond it is
/// refused with an error frame (a child that reads no input cannot make the
/// gateway buffer without bound). One maximal inbound frame fits.
pub const INPUT_QUEUE_BYTES: usize = crate::config::MAX_INBOUND_FRAME;
/// After the child exits, how long to wait for its last output when
/// nothing more arrives (a background job may keep the PTY open).
pub const EXIT_DRAIN_GRACE: Duration = Duration::from_millis(300);
/// Upper bound of that wait while slow sockets hold the reading back.
pub const EXIT_DRAIN_MAX: Duration = Duration::from_secs(10);
/// How often attached sockets are checked for actors that died without
/// detaching (an idle PTY would otherwise never notice, and never start its
/// detach timeout); shorter when the detach timeout itself is shorter.
pub const SOCKET_SWEEP_INTERVAL: Duration = Duration::from_secs(10);

/// Sent by the PtySession to the hub when it stops (any reason).
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct PtyClosed {
    pub owner: i64,
    pub key: String,
    pub pty: u64,
}

/// Sent by a ShellSocket (reattach) to a live PTY: attach this socket,
/// send it the reconnect line and the current screen or the replay.
/// `Err` when the PTY is already ending; the socket then launches anew.
#[derive(Message, Debug)]
#[rtype(result = "Result<(), PtyGone>")]
pub struct AttachSocket {
    pub socket: SocketHandle,
    /// The client's size from its `init`, applied to the PTY.
    pub size: Option<TermSize>,
}

/// The PTY is ending or gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("terminal session has ended")]
pub struct PtyGone;

/// Sent by a ShellSocket when it closes or re-inits: detach exactly this
/// socket (a stale socket's late close never detaches another one).
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct DetachSocket {
    pub socket: u64,
}

/// Sent by a ShellSocket for an `input` frame.
#[derive(Message, Debug)]
#[rtype(result = "Result<(), InputRejected>")]
pub struct WriteInput {
    pub data: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum InputRejected {
    #[error("Terminal input buffer is full; input dropped")]
    QueueFull,
    #[error("Terminal session has ended")]
    Ended,
}

/// Sent by a ShellSocket for a valid `resize` frame.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct ResizePty {
    pub size: TermSize,
}

/// Sent by the PtyHub: kill this PTY now.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct TerminatePty {
    pub reason: TerminateReason,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TerminateReason {
    /// A login command or `forceRestart` replaces it: its sockets see the
    /// exit line as for any other exit.
    Replaced,
    /// Gateway shutdown: its sockets are closed with 1001 at once.
    Shutdown,
    /// An admin killed it (admin API): its sockets see the exit line.
    Admin,
}

/// The admin snapshot's view of one terminal (answered by [`DescribePty`]).
#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PtyInfo {
    pub id: u64,
    pub user_id: i64,
    pub key: String,
    pub pid: i32,
    pub command: String,
    /// Sockets attached now (0: detached, waiting for a reconnect).
    pub sockets: usize,
    pub age_secs: u64,
    /// Bytes held for replay to a reattaching client.
    pub replay_bytes: usize,
    /// Output frames sent to sockets and not yet written by them.
    pub in_flight: usize,
}

/// From the PtyHub: describe this terminal for the admin snapshot.
#[derive(Message, Debug)]
#[rtype(result = "PtyInfo")]
pub struct DescribePty;

/// Internal: a socket handled one output frame (or is gone).
#[derive(Message, Debug)]
#[rtype(result = "()")]
struct Delivered {
    socket: u64,
    ok: bool,
}

/// What the hub needs to start a PTY.
#[derive(Debug)]
pub struct PtyParams {
    pub id: u64,
    pub owner: i64,
    pub key: String,
    pub spec: LaunchSpec,
    /// The socket that asked for it (gets the welcome line).
    pub first: SocketHandle,
    pub hub: Recipient<PtyClosed>,
    pub limits: ShellLimits,
    pub detach_timeout: Duration,
}

struct Attached {
    handle: SocketHandle,
    /// Output frames sent and not yet handled by the socket.
    in_flight: usize,
}

pub struct PtySession {
    /// Counts and logs a panic of this actor (`actor.panicked`).
    _panics: PanicWatch,
    /// For the admin snapshot's age.
    started: tokio::time::Instant,
    id: u64,
    owner: i64,
    key: String,
    summary: String,
    hub: Recipient<PtyClosed>,
    pid: i32,
    /// Kills the child's session on drop, whatever ends this actor.
    guard: SessionGuard,
    /// Taken by `started` to wait for the exit status.
    child: Option<tokio::process::Child>,
    /// The PTY master fd for resizes; valid while `reader` (here or inside
    /// the read future, both owned by this actor's context) lives.
    fd: RawFd,
    /// `None` while a read is in flight.
    reader: Option<OwnedReadPty>,
    read_buf: Vec<u8>,
    reading: bool,
    read_eof: bool,
    /// `None` while a write is in flight.
    writer: Option<OwnedWritePty>,
    input: VecDeque<Vec<u8>>,
    input_bytes: usize,
    utf8: Utf8Carry,
    urls: UrlDetector,
    replay: ReplayBuffer,
    screen: Screen,
    sockets: BTreeMap<u64, Attached>,
    detach_timeout: Duration,
    detach_timer: Option<SpawnHandle>,
    /// Announces a held-back auth URL when no more output comes.
    url_timer: Option<SpawnHandle>,
    welcome: Option<(u64, String)>,
    /// `Some` once the child was reaped (`None` inside if waiting failed).
    exit_status: Option<Option<ExitStatus>>,
    exit_seen_at: Option<Instant>,
    /// Set once the end is decided; nothing attaches afterwards.
    finished: bool,
    stop_reason: &'static str,
}

impl PtySession {
    /// Opens a PTY and spawns the child on it (in the caller's runtime: the
    /// actor must then be started on the same arbiter).
    pub fn spawn(params: PtyParams) -> std::io::Result<PtySession> {
        let PtyParams {
            id,
            owner,
            key,
            spec,
            first,
            hub,
            limits,
            detach_timeout,
        } = params;
        let (pty, pts) = pty_process::open().map_err(std::io::Error::other)?;
        pty.resize(pty_process::Size::new(spec.size.rows, spec.size.cols))
            .map_err(std::io::Error::other)?;
        let fd = pty.as_raw_fd();
        let child = pty_process::Command::new(&spec.program)
            .args(&spec.args)
            .env_clear()
            .envs(spec.env.iter().map(|(k, v)| (k, v)))
            .current_dir(&spec.cwd)
            .spawn(pts)
            .map_err(std::io::Error::other)?;
        let pid = child
            .id()
            .and_then(|p| i32::try_from(p).ok())
            .ok_or_else(|| std::io::Error::other("child exited before it could be tracked"))?;
        let (reader, writer) = pty.into_split();
        let mut sockets = BTreeMap::new();
        let first_id = first.id;
        sockets.insert(
            first.id,
            Attached {
                handle: first,
                in_flight: 0,
            },
        );
        Ok(PtySession {
            id,
            owner,
            key,
            summary: spec.summary,
            hub,
            pid,
            guard: SessionGuard::new(pid),
            child: Some(child),
            fd,
            reader: Some(reader),
            read_buf: Vec::new(),
            reading: false,
            read_eof: false,
            writer: Some(writer),
            input: VecDeque::new(),
            input_bytes: 0,
            utf8: Utf8Carry::new(),
            urls: UrlDetector::new(),
            replay: ReplayBuffer::new(limits.replay_bytes),
            screen: Screen::new(spec.size),
            sockets,
            detach_timeout,
            detach_timer: None,
            url_timer: None,
            welcome: Some((first_id, spec.welcome)),
            exit_status: None,
            exit_seen_at: None,
            finished: false,
            stop_reason: "running",
            _panics: PanicWatch::new("PtySession", format!("pty={id}")),
            started: tokio::time::Instant::now(),
        })
    }

    /// The child's pid (also its session and process group id).
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// Every attached socket is behind: stop reading the PTY.
    fn paused(&self) -> bool {
        !self.sockets.is_empty()
            && self
                .sockets
                .values()
                .all(|a| a.in_flight >= OUTPUT_HIGH_WATER)
    }

    fn schedule_read(&mut self, ctx: &mut Context<Self>) {
        if self.reading || self.read_eof || self.finished || self.paused() {
            return;
        }
        let Some(mut reader) = self.reader.take() else {
            return;
        };
        let mut buf = std::mem::take(&mut self.read_buf);
        buf.resize(READ_CHUNK_BYTES, 0);
        self.reading = true;
        let read = async move {
            let mut result = reader.read(&mut buf).await;
            // The line discipline hands out at most ~4 KiB per read; take
            // what is already there too, so a fast producer costs one frame
            // per READ_CHUNK_BYTES instead of one per 4 KiB.
            if let Ok(mut filled) = result {
                while filled > 0 && filled < buf.len() {
                    match reader.read(&mut buf[filled..]).now_or_never() {
                        Some(Ok(more)) if more > 0 => filled += more,
                        // Not ready, EOF or an error: the next read sees it.
                        _ => break,
                    }
                }
                result = Ok(filled);
            }
            (reader, buf, result)
        };
        ctx.spawn(
            read.into_actor(self)
                .map(|(reader, buf, result), act, ctx| {
                    act.reading = false;
                    act.reader = Some(reader);
                    match result {
                        Ok(n) if n > 0 => {
                            metrics().shell_output_bytes.inc_by(n as u64);
                            // Not truncated: the next read reuses the
                            // buffer without zeroing it again.
                            act.on_output(buf.get(..n).unwrap_or_default(), ctx);
                        }
                        // EIO: every holder of the terminal side has closed it.
                        Ok(_) | Err(_) => act.on_read_end(ctx),
                    }
                    act.read_buf = buf;
                    act.schedule_read(ctx);
                }),
        );
    }

    fn on_output(&mut self, bytes: &[u8], ctx: &mut Context<Self>) {
        let text = self.utf8.decode(bytes);
        if !text.is_empty() {
            self.emit(&text, ctx);
        }
    }

    /// One chunk of output: URL detection on the raw text (the `OPEN_URL:`
    /// cue must still be visible), then the rewritten text into the screen,
    /// the replay buffer and every socket.
    fn emit(&mut self, text: &str, ctx: &mut Context<Self>) {
        let urls: Arc<[DetectedUrl]> = self.urls.feed(text).into();
        self.arm_url_settle(ctx);
        let text = rewrite_open_url(text);
        self.screen.process(&text);
        self.replay.push(&text);
        let frame = ServerFrame::Output { data: &text }.to_text();
        self.broadcast(Some(frame), urls, ctx);
    }

    /// A URL that ended the output is held back by the detector: announce it
    /// after [`URL_SETTLE`] unless more output settles it first.
    fn arm_url_settle(&mut self, ctx: &mut Context<Self>) {
        if let Some(handle) = self.url_timer.take() {
            ctx.cancel_future(handle);
        }
        if self.urls.has_pending() {
            self.url_timer = Some(ctx.run_later(URL_SETTLE, |act, ctx| {
                act.url_timer = None;
                let urls = act.urls.flush();
                if !urls.is_empty() && !act.finished {
                    act.broadcast(None, urls.into(), ctx);
                }
            }));
        }
    }

    fn broadcast(
        &mut self,
        frame: Option<ByteString>,
        urls: Arc<[DetectedUrl]>,
        ctx: &mut Context<Self>,
    ) {
        let slow: Vec<u64> = self
            .sockets
            .iter()
            .filter(|(_, a)| a.in_flight >= SLOW_CONSUMER_LIMIT)
            .map(|(id, _)| *id)
            .collect();
        for id in slow {
            if let Some(att) = self.sockets.remove(&id) {
                tracing::warn!(actor = "PtySession", key = %self.key, socket = id, "socket too far behind; letting it go (4008)");
                att.handle.ended.do_send(PtyEnded {
                    pty: self.id,
                    reason: EndReason::SlowConsumer,
                });
            }
        }
        let ids: Vec<u64> = self.sockets.keys().copied().collect();
        for id in ids {
            self.deliver(id, frame.clone(), urls.clone(), ctx);
        }
        self.maybe_start_detach_timer(ctx);
    }

    /// Sends one frame to one socket, counted in flight until handled.
    /// `send` enqueues at once (the socket's mailbox has room by
    /// construction), so frames keep their order; only the wait for the
    /// acknowledgement runs as a task, which outlives this actor so the
    /// last frames are not cancelled when it stops.
    fn deliver(
        &mut self,
        id: u64,
        frame: Option<ByteString>,
        urls: Arc<[DetectedUrl]>,
        ctx: &mut Context<Self>,
    ) {
        let Some(att) = self.sockets.get_mut(&id) else {
            return;
        };
        att.in_flight += 1;
        let request = att.handle.output.send(PtyOutput {
            pty: self.id,
            frame,
            urls,
        });
        let me = ctx.address();
        actix::spawn(async move {
            let ok = request.await.is_ok();
            me.do_send(Delivered { socket: id, ok });
        });
    }

    fn deliver_text(&mut self, id: u64, text: &str, ctx: &mut Context<Self>) {
        let frame = ServerFrame::Output { data: text }.to_text();
        self.deliver(id, Some(frame), Arc::from(Vec::new()), ctx);
    }

    fn on_read_end(&mut self, ctx: &mut Context<Self>) {
        self.read_eof = true;
        if self.exit_status.is_some() {
            self.finish(ctx);
        }
    }

    fn on_child_exit(&mut self, status: Option<ExitStatus>, ctx: &mut Context<Self>) {
        self.exit_status = Some(status);
        self.exit_seen_at = Some(Instant::now());
        if self.read_eof {
            self.finish(ctx);
        } else {
            ctx.run_later(EXIT_DRAIN_GRACE, Self::check_drain);
        }
    }

    /// The child exited but the PTY is still open: wait while slow sockets
    /// hold back the reading (bounded), otherwise end now.
    fn check_drain(&mut self, ctx: &mut Context<Self>) {
        if self.finished {
            return;
        }
        let waited = self.exit_seen_at.map_or(Duration::ZERO, |t| t.elapsed());
        if self.paused() && waited < EXIT_DRAIN_MAX {
            ctx.run_later(EXIT_DRAIN_GRACE, Self::check_drain);
        } else {
            self.finish(ctx);
        }
    }

    /// The process is gone: last output, exit line, let go of every socket.
    fn finish(&mut self, ctx: &mut Context<Self>) {
        if self.finished {
            return;
        }
        let tail = self.utf8.finish();
        if !tail.is_empty() {
            self.emit(&tail, ctx);
        }
        let urls = self.urls.flush();
        if !urls.is_empty() {
            self.broadcast(None, urls.into(), ctx);
        }
        self.finished = true;
        self.stop_reason = "process exited";
        // Background jobs of the exited program die with it.
        self.guard.kill();
        let status = self.exit_status.flatten();
        let line = exit_line(status);
        let ids: Vec<u64> = self.sockets.keys().copied().collect();
        for id in &ids {
            self.deliver_text(*id, &line, ctx);
        }
        for att in std::mem::take(&mut self.sockets).into_values() {
            att.handle.ended.do_send(PtyEnded {
                pty: self.id,
                reason: EndReason::Exited,
            });
        }
        tracing::info!(actor = "PtySession", key = %self.key, pty = self.id, code = ?status.and_then(|s| s.code()), "process exited");
        ctx.stop();
    }

    fn maybe_start_detach_timer(&mut self, ctx: &mut Context<Self>) {
        if self.sockets.is_empty() && self.detach_timer.is_none() && !self.finished {
            metrics().ptys_detached.inc();
            self.detach_timer = Some(ctx.run_later(self.detach_timeout, |act, ctx| {
                act.detach_timer = None;
                metrics().ptys_detached.dec();
                if act.sockets.is_empty() && !act.finished {
                    tracing::info!(actor = "PtySession", key = %act.key, pty = act.id, "detach timeout; killing the terminal");
                    act.finished = true;
                    act.stop_reason = "detach timeout";
                    act.guard.kill();
                    ctx.stop();
                }
            }));
        }
    }

    fn cancel_detach_timer(&mut self, ctx: &mut Context<Self>) {
        if let Some(handle) = self.detach_timer.take() {
            metrics().ptys_detached.dec();
            ctx.cancel_future(handle);
        }
    }

    fn schedule_write(&mut self, ctx: &mut Context<Self>) {
        if self.finished || self.input.is_empty() {
            return;
        }
        let Some(mut writer) = self.writer.take() else {
            return;
        };
        let Some(data) = self.input.pop_front() else {
            self.writer = Some(writer);
            return;
        };
        self.input_bytes -= data.len();
        let write = async move {
            let result = writer.write_all(&data).await;
            (writer, result)
        };
        ctx.spawn(write.into_actor(self).map(|(writer, result), act, ctx| {
            act.writer = Some(writer);
            if let Err(err) = result {
                // The child closed its terminal; pending input has nowhere to go.
                tracing::debug!(actor = "PtySession", key = %act.key, error = %err, "PTY write failed; input dropped");
                act.input.clear();
                act.input_bytes = 0;
            }
            act.schedule_write(ctx);
        }));
    }

    fn resize(&mut self, size: TermSize) {
        if self.finished {
            return;
        }
        let ws = rustix::termios::Winsize {
            ws_row: size.rows,
            ws_col: size.cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: `fd` is the PTY master, open while this actor runs (see the
        // field doc); the borrow ends with the call.
        let master = unsafe { BorrowedFd::borrow_raw(self.fd) };
        if let Err(err) = rustix::termios::tcsetwinsize(master, ws) {
            tracing::debug!(actor = "PtySession", key = %self.key, "resize failed: {}", std::io::Error::from(err));
            return;
        }
        self.screen.resize(size);
    }

    /// Splits `text` into at most about [`REPLAY_MAX_FRAMES`] frames.
    fn replay_frame_bytes(&self, len: usize) -> usize {
        REPLAY_FRAME_BYTES.max(len / REPLAY_MAX_FRAMES + 1)
    }
}

/// `text` in pieces of at most `max` bytes, on char boundaries.
fn split_text(text: &str, max: usize) -> Vec<&str> {
    let max = max.max(4);
    let mut parts = Vec::new();
    let mut rest = text;
    while !rest.is_empty() {
        let mut take = max.min(rest.len());
        while !rest.is_char_boundary(take) {
            take -= 1;
        }
        parts.push(&rest[..take]);
        rest = &rest[take..];
    }
    parts
}

impl Actor for PtySession {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        metrics().ptys_live.inc();
        tracing::info!(event = "actor.started", actor = "PtySession", key = %self.key, pty = self.id, pid = self.pid, command = %self.summary, "actor started");
        if let Some(mut child) = self.child.take() {
            let wait = async move { child.wait().await.ok() };
            ctx.spawn(
                wait.into_actor(self)
                    .map(|status, act, ctx| act.on_child_exit(status, ctx)),
            );
        }
        if let Some((socket, welcome)) = self.welcome.take() {
            self.deliver_text(socket, &welcome, ctx);
        }
        ctx.run_interval(SOCKET_SWEEP_INTERVAL.min(self.detach_timeout), |act, ctx| {
            let before = act.sockets.len();
            act.sockets.retain(|_, a| a.handle.output.connected());
            if act.sockets.len() < before {
                tracing::info!(actor = "PtySession", key = %act.key, pty = act.id, gone = before - act.sockets.len(), "dropped sockets whose actors are gone");
                act.maybe_start_detach_timer(ctx);
                act.schedule_read(ctx);
            }
        });
        self.schedule_read(ctx);
    }

    fn stopped(&mut self, _ctx: &mut Self::Context) {
        metrics().ptys_live.dec();
        if self.detach_timer.take().is_some() {
            metrics().ptys_detached.dec();
        }
        self.guard.kill();
        self.hub.do_send(PtyClosed {
            owner: self.owner,
            key: self.key.clone(),
            pty: self.id,
        });
        tracing::info!(event = "actor.stopped", actor = "PtySession", key = %self.key, pty = self.id, reason = self.stop_reason, "actor stopped");
    }
}

impl Handler<AttachSocket> for PtySession {
    type Result = Result<(), PtyGone>;

    fn handle(&mut self, msg: AttachSocket, ctx: &mut Self::Context) -> Self::Result {
        if self.finished {
            return Err(PtyGone);
        }
        self.cancel_detach_timer(ctx);
        if let Some(size) = msg.size {
            self.resize(size);
        }
        let id = msg.socket.id;
        self.sockets.insert(
            id,
            Attached {
                handle: msg.socket,
                in_flight: 0,
            },
        );
        tracing::info!(actor = "PtySession", key = %self.key, pty = self.id, socket = id, sockets = self.sockets.len(), "socket reattached");
        self.deliver_text(id, RECONNECT_LINE, ctx);
        if self.screen.in_alternate_screen() {
            let redraw = self.screen.redraw();
            for part in split_text(&redraw, self.replay_frame_bytes(redraw.len())) {
                self.deliver_text(id, part, ctx);
            }
        } else {
            let frames = self
                .replay
                .frames(self.replay_frame_bytes(self.replay.len_bytes()));
            for frame in frames {
                self.deliver_text(id, &frame, ctx);
            }
        }
        Ok(())
    }
}

impl Handler<DetachSocket> for PtySession {
    type Result = ();

    fn handle(&mut self, msg: DetachSocket, ctx: &mut Self::Context) {
        if self.sockets.remove(&msg.socket).is_some() {
            tracing::info!(actor = "PtySession", key = %self.key, pty = self.id, socket = msg.socket, sockets = self.sockets.len(), "socket detached");
            self.maybe_start_detach_timer(ctx);
            // A slow socket leaving may unblock the others.
            self.schedule_read(ctx);
        }
    }
}

impl Handler<WriteInput> for PtySession {
    type Result = Result<(), InputRejected>;

    fn handle(&mut self, msg: WriteInput, ctx: &mut Self::Context) -> Self::Result {
        if self.finished {
            return Err(InputRejected::Ended);
        }
        if msg.data.is_empty() {
            return Ok(());
        }
        if self.input_bytes + msg.data.len() > INPUT_QUEUE_BYTES {
            return Err(InputRejected::QueueFull);
        }
        self.input_bytes += msg.data.len();
        self.input.push_back(msg.data.into_bytes());
        self.schedule_write(ctx);
        Ok(())
    }
}

impl Handler<ResizePty> for PtySession {
    type Result = ();

    fn handle(&mut self, msg: ResizePty, _ctx: &mut Self::Context) {
        self.resize(msg.size);
    }
}

impl Handler<DescribePty> for PtySession {
    type Result = MessageResult<DescribePty>;

    fn handle(&mut self, _: DescribePty, _: &mut Self::Context) -> Self::Result {
        MessageResult(PtyInfo {
            id: self.id,
            user_id: self.owner,
            key: self.key.clone(),
            pid: self.pid,
            command: self.summary.clone(),
            sockets: self.sockets.len(),
            age_secs: self.started.elapsed().as_secs(),
            replay_bytes: self.replay.len_bytes(),
            in_flight: self.sockets.values().map(|a| a.in_flight).sum(),
        })
    }
}

impl Handler<TerminatePty> for PtySession {
    type Result = ();

    fn handle(&mut self, msg: TerminatePty, ctx: &mut Self::Context) {
        if self.finished {
            return;
        }
        match msg.reason {
            TerminateReason::Replaced => {
                // The exit is then observed like any other (exit line to its sockets).
                tracing::info!(actor = "PtySession", key = %self.key, pty = self.id, "replaced; killing the terminal");
                self.guard.kill();
            }
            TerminateReason::Admin => {
                tracing::warn!(actor = "PtySession", key = %self.key, pty = self.id, reason = "killed by an admin", "killing the terminal");
                self.stop_reason = "killed by an admin";
                self.guard.kill();
            }
            TerminateReason::Shutdown => {
                self.finished = true;
                self.stop_reason = "shutdown";
                self.guard.kill();
                for att in std::mem::take(&mut self.sockets).into_values() {
                    att.handle.ended.do_send(PtyEnded {
                        pty: self.id,
                        reason: EndReason::Shutdown,
                    });
                }
                ctx.stop();
            }
        }
    }
}

impl Handler<Delivered> for PtySession {
    type Result = ();

    fn handle(&mut self, msg: Delivered, ctx: &mut Self::Context) {
        let Some(att) = self.sockets.get_mut(&msg.socket) else {
            return;
        };
        att.in_flight = att.in_flight.saturating_sub(1);
        if !msg.ok {
            // The socket actor is gone without detaching (it crashed).
            self.sockets.remove(&msg.socket);
            self.maybe_start_detach_timer(ctx);
        }
        self.schedule_read(ctx);
    }
}

/// Test-only view of the flow-control state.
#[cfg(test)]
#[derive(Message)]
#[rtype(result = "FlowView")]
pub(crate) struct FlowState;

#[cfg(test)]
#[derive(Debug, MessageResponse)]
pub(crate) struct FlowView(pub bool, pub usize, pub usize);

#[cfg(test)]
impl Handler<FlowState> for PtySession {
    type Result = FlowView;

    /// (paused, attached sockets, replay bytes)
    fn handle(&mut self, _: FlowState, _: &mut Self::Context) -> Self::Result {
        FlowView(self.paused(), self.sockets.len(), self.replay.len_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::GatewayConfig;
    use crate::shell::launch::{build_launch, InitRequest};
    use serde_json::json;
    use std::sync::atomic::{AtomicU64, Ordering};
    use tokio::sync::mpsc;

    /// What a test socket saw.
    #[derive(Debug)]
    enum Seen {
        Output(String),
        Ended(EndReason),
    }

    /// A stand-in socket: forwards what it receives to the test; can be
    /// told to stall its mailbox (like a client that stopped reading).
    struct TestSocket {
        tx: mpsc::UnboundedSender<Seen>,
        stall: Option<Duration>,
    }

    impl Actor for TestSocket {
        type Context = Context<Self>;
        fn started(&mut self, ctx: &mut Self::Context) {
            ctx.set_mailbox_capacity(SOCKET_MAILBOX_CAPACITY);
        }
    }

    impl Handler<PtyOutput> for TestSocket {
        type Result = ();
        fn handle(&mut self, msg: PtyOutput, ctx: &mut Self::Context) {
            if let Some(frame) = &msg.frame {
                let v: serde_json::Value = serde_json::from_str(frame).unwrap();
                let _ = self
                    .tx
                    .send(Seen::Output(v["data"].as_str().unwrap().to_string()));
            }
            if let Some(d) = self.stall.take() {
                ctx.wait(actix::fut::wrap_future(tokio::time::sleep(d)));
            }
        }
    }

    /// Stops the test socket without detaching (a torn-down connection).
    #[derive(Message)]
    #[rtype(result = "()")]
    struct Vanish;

    impl Handler<Vanish> for TestSocket {
        type Result = ();
        fn handle(&mut self, _: Vanish, ctx: &mut Self::Context) {
            ctx.stop();
        }
    }

    impl Handler<PtyEnded> for TestSocket {
        type Result = ();
        fn handle(&mut self, msg: PtyEnded, _: &mut Self::Context) {
            let _ = self.tx.send(Seen::Ended(msg.reason));
        }
    }

    struct TestHub(mpsc::UnboundedSender<u64>);
    impl Actor for TestHub {
        type Context = Context<Self>;
    }
    impl Handler<PtyClosed> for TestHub {
        type Result = ();
        fn handle(&mut self, msg: PtyClosed, _: &mut Self::Context) {
            let _ = self.0.send(msg.pty);
        }
    }

    static NEXT: AtomicU64 = AtomicU64::new(1);

    fn socket(stall: Option<Duration>) -> (SocketHandle, mpsc::UnboundedReceiver<Seen>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let addr = TestSocket { tx, stall }.start();
        let handle = SocketHandle {
            id: NEXT.fetch_add(1, Ordering::Relaxed),
            output: addr.clone().recipient(),
            ended: addr.recipient(),
        };
        (handle, rx)
    }

    fn start(
        command: &str,
        first: SocketHandle,
        detach: Duration,
    ) -> (Addr<PtySession>, i32, mpsc::UnboundedReceiver<u64>) {
        let (hub_tx, hub_rx) = mpsc::unbounded_channel();
        let hub = TestHub(hub_tx).start();
        let dir = std::env::temp_dir();
        let req =
            InitRequest::parse(&json!({"projectPath": dir, "initialCommand": command})).unwrap();
        let spec = build_launch(&req, dir.clone(), None, &GatewayConfig::for_tests(dir)).unwrap();
        let session = PtySession::spawn(PtyParams {
            id: NEXT.fetch_add(1, Ordering::Relaxed),
            owner: 1,
            key: req.key(),
            spec,
            first,
            hub: hub.recipient(),
            limits: ShellLimits::default(),
            detach_timeout: detach,
        })
        .expect("spawn");
        let pid = session.pid();
        (session.start(), pid, hub_rx)
    }

    async fn collect_until_end(rx: &mut mpsc::UnboundedReceiver<Seen>) -> (String, EndReason) {
        let mut out = String::new();
        loop {
            match tokio::time::timeout(Duration::from_secs(20), rx.recv()).await {
                Ok(Some(Seen::Output(s))) => out.push_str(&s),
                Ok(Some(Seen::Ended(r))) => return (out, r),
                other => panic!("no end (got {other:?}); output so far: {out:?}"),
            }
        }
    }

    fn alive(pid: i32) -> bool {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| {
                !s.rsplit(')')
                    .next()
                    .unwrap_or("")
                    .trim_start()
                    .starts_with('Z')
            })
            .unwrap_or(false)
    }

    #[actix_rt::test]
    async fn output_then_exit_line_then_end_in_order() {
        let (sock, mut rx) = socket(None);
        let (_pty, _pid, mut hub) =
            start("printf 'hello\\n'; exit 3", sock, Duration::from_secs(60));
        let (out, reason) = collect_until_end(&mut rx).await;
        assert!(out.starts_with("\x1b[36mStarting terminal in: "), "{out:?}");
        assert!(out.contains("hello"), "{out:?}");
        assert!(
            out.ends_with("\r\n\x1b[33mProcess exited with code 3\x1b[0m\r\n"),
            "{out:?}"
        );
        assert_eq!(reason, EndReason::Exited);
        assert!(tokio::time::timeout(Duration::from_secs(5), hub.recv())
            .await
            .unwrap()
            .is_some());
    }

    #[actix_rt::test]
    async fn output_written_just_before_exit_is_not_lost() {
        let (sock, mut rx) = socket(None);
        let (_pty, _, _hub) = start(
            "head -c 300000 /dev/zero | tr '\\0' x; printf END",
            sock,
            Duration::from_secs(60),
        );
        let (out, _) = collect_until_end(&mut rx).await;
        let body = out.split("END").next().unwrap_or_default();
        assert_eq!(body.matches('x').count(), 300_000);
        assert!(
            out.contains("END\r\n\x1b[33mProcess exited with code 0"),
            "{}",
            &out[out.len().saturating_sub(80)..]
        );
    }

    #[actix_rt::test]
    async fn input_reaches_the_child_and_resize_is_visible() {
        let (sock, mut rx) = socket(None);
        let (pty, _, _hub) = start(
            "read line; stty size; echo \"got:$line\"",
            sock,
            Duration::from_secs(60),
        );
        pty.send(ResizePty {
            size: TermSize {
                cols: 123,
                rows: 45,
            },
        })
        .await
        .unwrap();
        pty.send(WriteInput {
            data: "abc\r".into(),
        })
        .await
        .unwrap()
        .unwrap();
        let (out, _) = collect_until_end(&mut rx).await;
        assert!(out.contains("45 123"), "{out:?}");
        assert!(out.contains("got:abc"), "{out:?}");
    }

    #[actix_rt::test]
    async fn reattach_replays_and_detach_timeout_kills_the_session() {
        let (first, mut rx1) = socket(None);
        let first_id = first.id;
        let detach = Duration::from_millis(500);
        let (pty, pid, mut hub) = start("echo READY; sleep 1000 & sleep 1000", first, detach);
        loop {
            match rx1.recv().await {
                Some(Seen::Output(s)) if s.contains("READY") => break,
                Some(_) => {}
                None => panic!("socket closed"),
            }
        }
        // A second socket attaches and gets the reconnect line and the replay.
        let (second, mut rx2) = socket(None);
        let second_id = second.id;
        pty.send(AttachSocket {
            socket: second,
            size: None,
        })
        .await
        .unwrap()
        .unwrap();
        let mut replay = String::new();
        while !replay.contains("READY") {
            match tokio::time::timeout(Duration::from_secs(10), rx2.recv()).await {
                Ok(Some(Seen::Output(s))) => replay.push_str(&s),
                other => panic!("no replay: {other:?}"),
            }
        }
        assert!(replay.starts_with(RECONNECT_LINE), "{replay:?}");

        // Detaching one of two keeps the PTY; detaching both starts the timeout.
        pty.send(DetachSocket { socket: first_id }).await.unwrap();
        assert_eq!(pty.send(FlowState).await.unwrap().1, 1);
        pty.send(DetachSocket { socket: first_id }).await.unwrap();
        assert_eq!(
            pty.send(FlowState).await.unwrap().1,
            1,
            "a repeated close changes nothing"
        );
        // On paused time the timeout is exact: not a millisecond early, nor late.
        tokio::time::pause();
        let detached_at = tokio::time::Instant::now();
        pty.send(DetachSocket { socket: second_id }).await.unwrap();
        tokio::time::advance(detach - Duration::from_millis(1)).await;
        pty.send(FlowState).await.unwrap();
        assert!(hub.try_recv().is_err(), "killed before the detach timeout");
        let closed = tokio::time::timeout(Duration::from_secs(10), hub.recv())
            .await
            .expect("detach timeout")
            .unwrap();
        assert!(closed > 0);
        // Timers fire on the runtime's 1 ms ticks, so "at" is within one tick.
        let at = detached_at.elapsed();
        assert!(
            at >= detach && at <= detach + Duration::from_millis(1),
            "killed at {at:?}, not at the detach timeout {detach:?}"
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        while alive(pid) {
            assert!(
                Instant::now() < deadline,
                "child {pid} survived the detach timeout"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // SIGKILL is delivered asynchronously: the job may take a moment to die.
        while !crate::kill::session_members(pid).is_empty() {
            assert!(Instant::now() < deadline, "background job survived");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[actix_rt::test]
    async fn a_stalled_socket_pauses_reading_and_nothing_is_lost() {
        // The socket stalls for 2 s after its first frame, as a client that stops reading.
        let (sock, mut rx) = socket(Some(Duration::from_secs(2)));
        let (pty, _, _hub) = start(
            "sleep 0.2; head -c 3000000 /dev/zero | tr '\\0' y; printf DONE",
            sock,
            Duration::from_secs(60),
        );
        // While stalled, the PTY is paused and the replay buffer stays bounded.
        let mut saw_paused = false;
        for _ in 0..100 {
            let FlowView(paused, _, replay) = pty.send(FlowState).await.unwrap();
            assert!(replay <= ShellLimits::default().replay_bytes);
            if paused {
                saw_paused = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(saw_paused, "reading never paused for a stalled socket");
        let (out, _) = collect_until_end(&mut rx).await;
        assert_eq!(
            out.matches('y').count(),
            3_000_000,
            "output lost under flow control"
        );
        assert!(out.contains("DONE"));
    }

    /// A socket actor that vanished without `DetachSocket` (its connection
    /// was torn down mid-init) must not keep an idle PTY alive forever.
    #[actix_rt::test]
    async fn a_vanished_socket_still_lets_the_detach_timeout_run() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let sock_addr = TestSocket { tx, stall: None }.start();
        let handle = SocketHandle {
            id: NEXT.fetch_add(1, Ordering::Relaxed),
            output: sock_addr.clone().recipient(),
            ended: sock_addr.clone().recipient(),
        };
        let (_pty, pid, mut hub) = start("exec sleep 1000", handle, Duration::from_millis(300));
        // The welcome line arrives, then the socket actor stops without detaching.
        assert!(matches!(rx.recv().await, Some(Seen::Output(_))));
        sock_addr.send(Vanish).await.unwrap();
        let closed = tokio::time::timeout(Duration::from_secs(10), hub.recv()).await;
        assert!(closed.is_ok(), "the PTY outlived its vanished socket");
        let deadline = Instant::now() + Duration::from_secs(10);
        while alive(pid) {
            assert!(Instant::now() < deadline);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[actix_rt::test]
    async fn shutdown_kills_and_ends_sockets() {
        let (sock, mut rx) = socket(None);
        let (pty, pid, _hub) = start("sleep 1000", sock, Duration::from_secs(60));
        pty.send(TerminatePty {
            reason: TerminateReason::Shutdown,
        })
        .await
        .unwrap();
        let (_, reason) = collect_until_end(&mut rx).await;
        assert_eq!(reason, EndReason::Shutdown);
        let deadline = Instant::now() + Duration::from_secs(10);
        while alive(pid) {
            assert!(Instant::now() < deadline);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[test]
    fn split_text_keeps_chars_whole() {
        let text = "é€𝄞".repeat(100);
        let parts = split_text(&text, 5);
        assert!(parts.iter().all(|p| p.len() <= 5 && !p.is_empty()));
        assert_eq!(parts.concat(), text);
    }
}
