//! `ShellSocket`: one `/shell` WebSocket connection (PROTOCOL.md section 5).
//!
//! Owns: the connection (an actix-web-actors `WebsocketContext`), its
//! heartbeat, the PTY it is attached to (by PTY id, so output of a PTY it
//! left is ignored), the set of auth URLs it already announced (bounded by
//! [`MAX_ANNOUNCED_URLS`]), a fragmented message being reassembled
//! (bounded by [`MAX_INBOUND_FRAME`]), the client messages queued behind a
//! command that waits for its PTY, and the PTY messages held during `init`.
//!
//! Handles: client frames (`init`, `input`, `resize`; anything else gets an
//! `error` frame and the socket stays open), [`PtyOutput`] (writes the
//! shared output frame, preceded by `auth_url` frames for URLs new to this
//! socket), [`PtyEnded`].
//!
//! Sends: [`LookupPty`] / [`LaunchPty`] to the hub; in cluster mode
//! [`ClaimPty`] (before a launch) and [`ReleasePty`] (after a failed one) to
//! the PtyPlacement; [`AttachSocket`],
//! [`DetachSocket`], [`WriteInput`], [`ResizePty`] to its PtySession.
//! `init`, `input` and `resize` run one at a time, in arrival order: each
//! waits for its PTY's answer in a spawned future (the heartbeat and the
//! reading of frames go on), and messages that arrive meanwhile queue behind
//! it, at most [`MAX_PENDING_BYTES`]; a message beyond is dropped with the
//! "input buffer is full" error a full PTY input queue gives. PTY messages
//! that arrive while an `init` runs are held, unacknowledged (so the PTY's
//! flow control still counts them in flight), until it is done, then
//! written or dropped as if they had waited in the mailbox.
//!
//! Stops: when the client closes, the heartbeat fails, a frame is too large
//! (close 1009), the PTY lets it go as a slow consumer (close 4008), its
//! token expires or is revoked (close 1008, [`TokenWatch`]), or on
//! shutdown (close 1001). Stopping detaches it from its PTY (by its own id),
//! which keeps running.

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use actix::prelude::*;
use actix_http::ws::Item;
use actix_web::{web, HttpRequest, HttpResponse};
use actix_web_actors::ws::{self, CloseCode, CloseReason, WebsocketContext};
use bytestring::ByteString;
use tokio::sync::oneshot;

use super::launch::{build_launch, check_project_dir, InitError, InitRequest, Mode};
use super::placement::{ClaimPty, Placement, PtyPlacement, ReleasePty};
use super::pty_hub::{LaunchError, LaunchPty, Launched, LookupPty, PtyHub};
use super::pty_session::{
    AttachSocket, DetachSocket, InputRejected, PtySession, ResizePty, WriteInput,
    SOCKET_MAILBOX_CAPACITY,
};
use super::url_detect::DetectedUrl;
use super::{
    ClientFrame, EndReason, InitFrame, ServerFrame, SocketHandle, TermSize, MAX_TERM_COLS,
    MAX_TERM_ROWS,
};
use crate::config::{GatewayConfig, MAX_INBOUND_FRAME};
use crate::heartbeat::Heartbeat;
use crate::metrics::{metrics, note_close, stop_reason, Connection, Endpoint, PanicWatch};
use crate::store::{self, Store};
use crate::token_watch::{TokenWatch, CLOSE_TOKEN_INVALID};
use crate::watchdog::{Stalled, WatchedConn};
use crate::AuthUser;

/// Auth URLs remembered per socket for "announce once"; beyond this the
/// oldest is forgotten (it could then be announced again, which is harmless).
pub const MAX_ANNOUNCED_URLS: usize = 256;
/// How often `init` retries when the PTY it found ended or another socket
/// started one at the same moment.
const INIT_ATTEMPTS: usize = 3;
/// Bytes of client messages queued behind a command waiting for its PTY;
/// a message beyond is dropped with the same error as a full PTY input queue.
pub const MAX_PENDING_BYTES: usize = MAX_INBOUND_FRAME;
/// Close code for a socket that fell too far behind (PROTOCOL.md section 7).
const CLOSE_SLOW_CONSUMER: u16 = 4008;

static NEXT_SOCKET_ID: AtomicU64 = AtomicU64::new(1);

/// Sent by a PtySession: one output frame (already serialized, shared by
/// every socket of the PTY; `None` when only URLs are announced) and the
/// URLs detected around it.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct PtyOutput {
    pub pty: u64,
    pub frame: Option<ByteString>,
    pub urls: Arc<[DetectedUrl]>,
}

/// Sent by a PtySession when it lets go of this socket.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct PtyEnded {
    pub pty: u64,
    pub reason: EndReason,
}

/// What a ShellSocket needs from the gateway.
#[derive(Clone)]
pub struct ShellDeps {
    pub hub: Addr<PtyHub>,
    pub store: Store,
    pub config: Arc<GatewayConfig>,
    /// Cluster mode: which node runs each terminal.
    pub placement: Option<Addr<PtyPlacement>>,
}

/// URLs this socket announced, oldest first.
#[derive(Debug, Default)]
struct AnnouncedUrls {
    order: VecDeque<String>,
    set: HashSet<String>,
}

impl AnnouncedUrls {
    /// `true` if the URL is new (and now remembered).
    fn insert(&mut self, url: &str) -> bool {
        if self.set.contains(url) {
            return false;
        }
        if self.order.len() >= MAX_ANNOUNCED_URLS {
            if let Some(old) = self.order.pop_front() {
                self.set.remove(&old);
            }
        }
        self.order.push_back(url.to_string());
        self.set.insert(url.to_string());
        true
    }

    fn clear(&mut self) {
        self.order.clear();
        self.set.clear();
    }
}

pub struct ShellSocket {
    id: u64,
    user: AuthUser,
    deps: ShellDeps,
    hb: Heartbeat,
    /// The PTY this socket is attached to.
    attached: Option<(u64, Addr<PtySession>)>,
    /// An `init` has succeeded at least once.
    initialized: bool,
    announced: AnnouncedUrls,
    /// A fragmented message being reassembled.
    fragment: Option<Vec<u8>>,
    /// This socket's connection, watched for a client that stopped reading.
    conn: Option<WatchedConn>,
    /// A command (`init`, `input`, `resize`) is waiting for its PTY's answer.
    busy: bool,
    /// Client messages that arrived while busy, in order (at most
    /// [`MAX_PENDING_BYTES`]).
    pending: VecDeque<Vec<u8>>,
    pending_bytes: usize,
    /// While an `init` runs: the PTY messages that arrived meanwhile, each
    /// with the acknowledgement its PTY waits for (see [`PtyOutput`]).
    held: Option<VecDeque<(Held, oneshot::Sender<()>)>>,
    /// The token it was opened with (closed with 1008 when it ends).
    token: TokenWatch,
    /// Counted in `agentgate_connections_*` while the actor lives.
    metric: Option<Connection>,
    _panics: PanicWatch,
    /// `conn{endpoint, socket, user}`: this socket's log lines.
    span: tracing::Span,
}

/// A PTY message held while an `init` runs.
enum Held {
    Output(PtyOutput),
    Ended(PtyEnded),
}

impl ShellSocket {
    pub fn new(user: AuthUser, deps: ShellDeps) -> Self {
        ShellSocket {
            id: NEXT_SOCKET_ID.fetch_add(1, Ordering::Relaxed),
            token: TokenWatch::none(user.id),
            user,
            deps,
            hb: Heartbeat::default(),
            attached: None,
            initialized: false,
            announced: AnnouncedUrls::default(),
            fragment: None,
            conn: None,
            busy: false,
            pending: VecDeque::new(),
            pending_bytes: 0,
            held: None,
            metric: None,
            _panics: PanicWatch::new("ShellSocket", ""),
            span: tracing::Span::none(),
        }
    }

    /// Completes the upgrade of an authenticated request and starts the actor.
    pub fn start<S>(
        req: &HttpRequest,
        stream: S,
        user: AuthUser,
        deps: ShellDeps,
        conn: Option<WatchedConn>,
        token: TokenWatch,
    ) -> Result<HttpResponse, actix_web::Error>
    where
        S: futures_util::Stream<Item = Result<web::Bytes, actix_web::error::PayloadError>>
            + 'static,
    {
        let mut socket = ShellSocket::new(user, deps);
        socket.conn = conn;
        socket.token = token;
        ws::WsResponseBuilder::new(socket, req, stream)
            .frame_size(MAX_INBOUND_FRAME)
            .start()
    }

    fn handle_for(&self, ctx: &mut WebsocketContext<Self>) -> SocketHandle {
        let addr = ctx.address();
        SocketHandle {
            id: self.id,
            output: addr.clone().recipient(),
            ended: addr.recipient(),
        }
    }

    fn send_error(ctx: &mut WebsocketContext<Self>, message: &str) {
        ctx.text(ServerFrame::Error { message }.to_text());
    }

    fn detach(&mut self) {
        if let Some((_, addr)) = self.attached.take() {
            addr.do_send(DetachSocket { socket: self.id });
        }
    }

    fn too_large(&mut self, ctx: &mut WebsocketContext<Self>) {
        Self::send_error(ctx, "Message too large");
        let reason = Some(CloseReason {
            code: CloseCode::Size,
            description: Some("message too large".into()),
        });
        note_close(&mut self.metric, &reason);
        ctx.close(reason);
        ctx.stop();
    }

    /// One complete client message: handled now, or queued behind the
    /// command that is waiting for its PTY.
    fn on_message(&mut self, bytes: &[u8], ctx: &mut WebsocketContext<Self>) {
        if !self.busy {
            return self.handle_message(bytes, ctx);
        }
        if self.pending_bytes + bytes.len() > MAX_PENDING_BYTES {
            Self::send_error(ctx, &InputRejected::QueueFull.to_string());
            return;
        }
        self.pending_bytes += bytes.len();
        self.pending.push_back(bytes.to_vec());
    }

    /// The command in flight got its answer: handle what queued meanwhile,
    /// until the next command waits.
    fn command_done(&mut self, ctx: &mut WebsocketContext<Self>) {
        self.busy = false;
        while !self.busy {
            let Some(next) = self.pending.pop_front() else {
                return;
            };
            self.pending_bytes -= next.len();
            self.handle_message(&next, ctx);
        }
    }

    /// Runs `request` beside the socket (its heartbeat and frames go on);
    /// later commands wait until it is answered, so they keep their order.
    fn run_command<F>(
        &mut self,
        request: F,
        answered: impl FnOnce(&mut Self, F::Output, &mut WebsocketContext<Self>) + 'static,
        ctx: &mut WebsocketContext<Self>,
    ) where
        F: std::future::Future + 'static,
    {
        self.busy = true;
        ctx.spawn(request.into_actor(self).map(|result, act, ctx| {
            answered(act, result, ctx);
            act.command_done(ctx);
        }));
    }

    fn handle_message(&mut self, bytes: &[u8], ctx: &mut WebsocketContext<Self>) {
        match ClientFrame::parse(bytes) {
            Ok(ClientFrame::Init(frame)) => self.on_init(frame, ctx),
            Ok(ClientFrame::Input { data }) => self.on_input(data, ctx),
            Ok(ClientFrame::Resize { cols, rows }) => self.on_resize(cols, rows, ctx),
            Err(message) => Self::send_error(ctx, &message),
        }
    }

    fn on_init(&mut self, frame: InitFrame, ctx: &mut WebsocketContext<Self>) {
        let req = match InitRequest::from_frame(frame) {
            Ok(req) => req,
            Err(err) => {
                Self::send_error(ctx, &err.to_string());
                return;
            }
        };
        // A socket watches one PTY at a time: leave the previous one.
        self.detach();
        self.announced.clear();
        let socket = self.handle_for(ctx);
        let open = open_terminal(self.deps.clone(), self.user.id, req, socket);
        // The PTY it attaches to may write before `attached` is known: what
        // any PTY sends meanwhile waits, unacknowledged, until it is.
        self.held = Some(VecDeque::new());
        self.run_command(
            open,
            |act, result, ctx| {
                match result {
                    Ok(attached) => {
                        act.attached = Some(attached);
                        act.initialized = true;
                    }
                    Err(err) => Self::send_error(ctx, &err.to_string()),
                }
                for (msg, ack) in act.held.take().into_iter().flatten() {
                    match msg {
                        Held::Output(msg) => act.on_output(msg, ctx),
                        Held::Ended(msg) => act.on_ended(msg, ctx),
                    }
                    let _ = ack.send(());
                }
            },
            ctx,
        );
    }

    fn on_input(&mut self, data: Option<String>, ctx: &mut WebsocketContext<Self>) {
        let Some(data) = data else {
            Self::send_error(ctx, "Invalid input: \"data\" must be a string");
            return;
        };
        let Some((_, addr)) = &self.attached else {
            if !self.initialized {
                Self::send_error(ctx, "No terminal session: send init first");
            }
            // After the process exited, keystrokes have nowhere to go (as in the reference).
            return;
        };
        let write = addr.send(WriteInput { data });
        self.run_command(
            write,
            |_, result, ctx| {
                if let Ok(Err(InputRejected::QueueFull)) = result {
                    Self::send_error(ctx, &InputRejected::QueueFull.to_string());
                }
            },
            ctx,
        );
    }

    fn on_resize(
        &mut self,
        cols: Option<u64>,
        rows: Option<u64>,
        ctx: &mut WebsocketContext<Self>,
    ) {
        let Some(size) = TermSize::from_dims(cols, rows) else {
            Self::send_error(
                ctx,
                &format!("Invalid terminal size: cols must be 1-{MAX_TERM_COLS} and rows 1-{MAX_TERM_ROWS}"),
            );
            return;
        };
        let Some((_, addr)) = &self.attached else {
            if !self.initialized {
                Self::send_error(ctx, "No terminal session: send init first");
            }
            return;
        };
        let resize = addr.send(ResizePty { size });
        self.run_command(resize, |_, _, _| {}, ctx);
    }
}

/// Why `init` attached to no PTY; the text is the client's `error` frame.
#[derive(Debug, thiserror::Error)]
enum OpenError {
    #[error(transparent)]
    Invalid(#[from] InitError),
    #[error(transparent)]
    Launch(#[from] LaunchError),
    #[error("Terminal service unavailable")]
    HubGone(#[from] MailboxError),
    #[error("Could not load the session")]
    SessionLookup(#[source] store::StoreError),
    #[error("Terminal session is busy; try again")]
    Busy,
    #[error("This terminal runs on node {0}; connect to that node to use it (route /shell with sticky sessions)")]
    OtherNode(String),
}

/// The `init` sequence: reattach to the key's live PTY, or validate and
/// launch a new one.
async fn open_terminal(
    deps: ShellDeps,
    owner: i64,
    req: InitRequest,
    socket: SocketHandle,
) -> Result<(u64, Addr<PtySession>), OpenError> {
    let key = req.key();
    let mut replace = req.replaces_existing();
    for _ in 0..INIT_ATTEMPTS {
        let lookup = LookupPty {
            owner,
            key: key.clone(),
            replace,
        };
        if let Some((id, pty)) = deps.hub.send(lookup).await? {
            let attach = AttachSocket {
                socket: socket.clone(),
                size: req.size,
            };
            if let Ok(Ok(())) = pty.send(attach).await {
                return Ok((id, pty));
            }
            // It ended between the lookup and the attach: start a new one.
            continue;
        }
        // Never kill a PTY that another socket starts while this one validates.
        replace = false;

        let path = req.project_path.clone();
        let cwd = tokio::task::spawn_blocking(move || check_project_dir(&path))
            .await
            .unwrap_or(Err(InitError::InvalidProjectPath))?;
        req.check_session_id()?;
        let mode = req.mode()?;
        let resume = match (mode, req.resume_lookup()) {
            (Mode::Provider(kind), Some(app_id)) => {
                let row = store::owned_session(&deps.store, app_id, owner).await.map_err(|err| {
                    tracing::warn!(actor = "ShellSocket", error = %err, "session lookup failed");
                    OpenError::SessionLookup(err)
                })?;
                row.filter(|r| r.provider == kind.as_str())
                    .and_then(|r| r.provider_session_id)
            }
            _ => None,
        };
        let spec = build_launch(&req, cwd, resume.as_deref(), &deps.config)?;
        // Cluster mode: the key may live on another node (its PTY is a
        // process there); Redis being unreachable opens it here.
        if let Some(placement) = &deps.placement {
            let claim = ClaimPty {
                owner,
                key: key.clone(),
            };
            if let Ok(Placement::Elsewhere(node)) = placement.send(claim).await {
                return Err(OpenError::OtherNode(node));
            }
        }
        let launch = LaunchPty {
            owner,
            key: key.clone(),
            spec,
            socket: socket.clone(),
        };
        let launched = deps.hub.send(launch).await?;
        if launched.is_err() {
            if let Some(placement) = &deps.placement {
                placement.do_send(ReleasePty {
                    owner,
                    key: key.clone(),
                });
            }
        }
        match launched? {
            Launched::Started(id, pty) => return Ok((id, pty)),
            Launched::Existing => continue,
        }
    }
    Err(OpenError::Busy)
}

impl Actor for ShellSocket {
    type Context = WebsocketContext<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        // PtySession's ordering argument relies on this capacity (see SOCKET_MAILBOX_CAPACITY).
        ctx.set_mailbox_capacity(SOCKET_MAILBOX_CAPACITY);
        self.metric = Some(Connection::open(Endpoint::Shell));
        self._panics.ids = format!("socket={}", self.id);
        if let Some(conn) = &mut self.conn {
            conn.watch("ShellSocket", ctx.address().recipient());
        }
        Heartbeat::start(
            ctx,
            self.deps.config.heartbeat,
            |a: &mut ShellSocket| &mut a.hb,
            "ShellSocket",
        );
        self.token.start(
            ctx,
            &self.deps.store.clone(),
            self.deps.config.heartbeat,
            |act: &mut Self, ctx, reason| {
                tracing::info!(
                    actor = "ShellSocket",
                    socket = act.id,
                    reason,
                    "closing socket with 1008"
                );
                let reason = Some(CloseReason {
                    code: CloseCode::Other(CLOSE_TOKEN_INVALID),
                    description: Some(reason.into()),
                });
                note_close(&mut act.metric, &reason);
                ctx.close(reason);
                ctx.stop();
            },
        );
        self.span = tracing::info_span!("conn", endpoint = "shell", socket = self.id, user = %self.user.username);
        let _entered = self.span.clone().entered();
        tracing::info!(event = "actor.started", actor = "ShellSocket", socket = self.id, user = %self.user.username, "actor started");
    }

    fn stopped(&mut self, _ctx: &mut Self::Context) {
        let _entered = self.span.clone().entered();
        // Detaches only this socket; the PTY keeps running for its detach timeout.
        self.detach();
        tracing::info!(
            event = "actor.stopped",
            actor = "ShellSocket",
            socket = self.id,
            reason = %stop_reason(&self.metric),
            "actor stopped"
        );
    }
}

impl StreamHandler<Result<ws::Message, ws::ProtocolError>> for ShellSocket {
    fn handle(&mut self, item: Result<ws::Message, ws::ProtocolError>, ctx: &mut Self::Context) {
        let msg = match item {
            Ok(msg) => msg,
            Err(ws::ProtocolError::Overflow) => {
                self.too_large(ctx);
                return;
            }
            // A text frame that is not UTF-8 (actix reports it as an I/O
            // error with Utf8Error's text): 1007, RFC 6455 8.1.
            Err(ws::ProtocolError::Io(err)) if err.to_string().contains("utf-8") => {
                let reason = Some(CloseReason {
                    code: CloseCode::Invalid,
                    description: Some("text frame is not valid UTF-8".into()),
                });
                note_close(&mut self.metric, &reason);
                ctx.close(reason);
                ctx.stop();
                return;
            }
            Err(err) => {
                tracing::debug!(actor = "ShellSocket", socket = self.id, error = %err, "protocol error");
                ctx.stop();
                return;
            }
        };
        match msg {
            ws::Message::Text(text) => self.on_message(text.as_bytes(), ctx),
            ws::Message::Binary(bytes) => self.on_message(&bytes, ctx),
            ws::Message::Continuation(item) => {
                let (bytes, last) = match item {
                    Item::FirstText(b) | Item::FirstBinary(b) => {
                        self.fragment = Some(Vec::new());
                        (b, false)
                    }
                    Item::Continue(b) => (b, false),
                    Item::Last(b) => (b, true),
                };
                let Some(buf) = self.fragment.as_mut() else {
                    Self::send_error(
                        ctx,
                        "Invalid message: continuation without a first fragment",
                    );
                    return;
                };
                if buf.len() + bytes.len() > MAX_INBOUND_FRAME {
                    self.fragment = None;
                    self.too_large(ctx);
                    return;
                }
                buf.extend_from_slice(&bytes);
                if last {
                    if let Some(whole) = self.fragment.take() {
                        self.on_message(&whole, ctx);
                    }
                }
            }
            ws::Message::Ping(payload) => ctx.pong(&payload),
            ws::Message::Pong(_) => self.hb.pong(),
            ws::Message::Close(reason) => {
                note_close(&mut self.metric, &reason);
                ctx.close(reason);
                ctx.stop();
            }
            ws::Message::Nop => {}
        }
    }
}

impl Handler<PtyOutput> for ShellSocket {
    /// Acknowledged when written: the PTY counts a frame in flight until
    /// then (its flow control). A frame held during an `init` is
    /// acknowledged when the init is done and the frame written or dropped.
    type Result = Response<()>;

    fn handle(&mut self, msg: PtyOutput, ctx: &mut Self::Context) -> Response<()> {
        if let Some(held) = &mut self.held {
            let (ack, acked) = oneshot::channel();
            held.push_back((Held::Output(msg), ack));
            return Response::fut(async move {
                let _ = acked.await;
            });
        }
        self.on_output(msg, ctx);
        Response::reply(())
    }
}

impl ShellSocket {
    fn on_output(&mut self, msg: PtyOutput, ctx: &mut WebsocketContext<Self>) {
        if self.attached.as_ref().map(|(id, _)| *id) != Some(msg.pty) {
            return;
        }
        for found in msg.urls.iter() {
            if self.announced.insert(&found.url) {
                ctx.text(
                    ServerFrame::AuthUrl {
                        url: &found.url,
                        auto_open: found.auto_open,
                    }
                    .to_text(),
                );
            }
        }
        if let Some(frame) = msg.frame {
            metrics().sent(Endpoint::Shell, frame.len());
            ctx.text(frame);
        }
    }
}

impl Handler<Stalled> for ShellSocket {
    type Result = ();

    fn handle(&mut self, _: Stalled, ctx: &mut Self::Context) {
        let reason = Some(CloseReason {
            code: CloseCode::Other(CLOSE_SLOW_CONSUMER),
            description: Some("slow consumer".into()),
        });
        note_close(&mut self.metric, &reason);
        ctx.close(reason);
        ctx.stop();
    }
}

impl Handler<PtyEnded> for ShellSocket {
    type Result = ();

    fn handle(&mut self, msg: PtyEnded, ctx: &mut Self::Context) {
        if let Some(held) = &mut self.held {
            // Nobody waits for this answer (the PTY sends it with do_send).
            let (ack, _) = oneshot::channel();
            held.push_back((Held::Ended(msg), ack));
            return;
        }
        self.on_ended(msg, ctx);
    }
}

impl ShellSocket {
    fn on_ended(&mut self, msg: PtyEnded, ctx: &mut WebsocketContext<Self>) {
        if self.attached.as_ref().map(|(id, _)| *id) != Some(msg.pty) {
            return;
        }
        self.attached = None;
        match msg.reason {
            // The exit line was the last output; the client may init again.
            EndReason::Exited => {}
            EndReason::SlowConsumer => {
                let reason = Some(CloseReason {
                    code: CloseCode::Other(CLOSE_SLOW_CONSUMER),
                    description: Some("slow consumer".into()),
                });
                note_close(&mut self.metric, &reason);
                ctx.close(reason);
                ctx.stop();
            }
            EndReason::Shutdown => {
                let reason = Some(CloseReason {
                    code: CloseCode::Away,
                    description: Some("server shutting down".into()),
                });
                note_close(&mut self.metric, &reason);
                ctx.close(reason);
                ctx.stop();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn announced_urls_are_remembered_once_and_bounded() {
        let mut a = AnnouncedUrls::default();
        assert!(a.insert("https://x/"));
        assert!(!a.insert("https://x/"));
        for i in 0..(MAX_ANNOUNCED_URLS * 2) {
            assert!(a.insert(&format!("https://h/{i}")));
        }
        assert!(a.order.len() <= MAX_ANNOUNCED_URLS && a.set.len() <= MAX_ANNOUNCED_URLS);
        a.clear();
        assert!(a.insert("https://x/"));
    }
}
