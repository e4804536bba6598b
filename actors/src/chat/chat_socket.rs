//! `ChatSocket`: one `/ws` connection.
//!
//! **Owns** the WebSocket (actix-web-actors context), the heartbeat state and
//! the connection's user.
//!
//! **Handles** client frames (parsed into [`ClientMessage`]), [`Deliver`]
//! (frames from the RunRegistry, written in order) and [`CloseSocket`].
//!
//! **Sends** [`Connect`]/[`Disconnect`], [`StartRun`], [`AbortRun`],
//! [`Subscribe`], [`RespondPermission`] to the RunRegistry. It never waits on
//! a run: each request is a spawned future, so an abort or a subscribe is
//! handled while a run streams. Session rows are read on the blocking pool.
//!
//! **Bounds**: the mailbox holds [`MAILBOX_CAPACITY`] deliveries (each a
//! batch of at most 64 KiB of provider output). A client that stops reading
//! stalls this actor (its connection task stops polling it while a write
//! waits), its mailbox fills, and the registry closes it with 4008.
//! Delivered batches wait in a backlog of shared frames (the bytes the
//! registry serialized once, not copies) and are encoded as WebSocket text
//! frames at most [`WRITE_BYTES_PER_POLL`] per poll, i.e. only as fast as the
//! HTTP layer writes: a thousand subscribers behind one fast run hold one copy
//! of the stream, not a thousand encoded ones. The socket encodes them itself,
//! into one exact-size buffer per write ([`RawOut`], which the route writes
//! ahead of the context's own frames: pings, pongs, errors, the close). A
//! backlog above [`BACKLOG_MAX_BYTES`] closes the socket with 4008 as well.
//!
//! **Stops** on client close, heartbeat timeout, [`CloseSocket`], a
//! protocol error, or when its token expires or is revoked (close 1008,
//! [`TokenWatch`]); `stopped` tells the registry.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use actix_web_actors::ws;

use crate::chat::run_registry::{
    resolve_cwd, AbortRun, CloseSocket, Connect, Deliver, Disconnect, Drained, RespondPermission,
    RunRegistry, SocketId, StartRun, Subscribe,
};
use crate::config::MAX_INBOUND_FRAME;
use crate::heartbeat::Heartbeat;
use crate::metrics::{metrics, note_close, stop_reason, Connection, Endpoint, PanicWatch};
use crate::protocol::{protocol_error, ChatError, ClientMessage, ErrorCode, Frame};
use crate::store::{self, SessionRow, Store};
use crate::token_watch::{TokenWatch, CLOSE_TOKEN_INVALID};
use crate::watchdog::{Stalled, WatchedConn};
use crate::write_pump::{Backlog, RawOut, WritePump};
use crate::AuthUser;

/// Deliveries queued for one socket (the registry keeps at most
/// `SUBSCRIBER_MAX_BATCHES` of its own in flight, plus rare out-of-band frames).
pub const MAILBOX_CAPACITY: usize = 256;
/// Bytes of delivered frames one socket may hold unwritten. The registry's
/// budget keeps it near `SUBSCRIBER_HIGH_WATER`; this only guards against a
/// bug, and closes with 4008.
pub const BACKLOG_MAX_BYTES: usize = 8 * 1024 * 1024;
/// Written bytes are reported to the registry ([`Drained`]) in steps of
/// this many bytes or [`DRAINED_REPORT_BATCHES`] deliveries. What is left
/// unreported stays far below the registry's budget (1 MiB, 64 deliveries),
/// so it never waits for a report that does not come; a stream of
/// one-event deliveries costs one report per 16 events, not one each.
const DRAINED_REPORT_BYTES: usize = 32 * 1024;
const DRAINED_REPORT_BATCHES: usize = 16;
const _: () = assert!(
    DRAINED_REPORT_BYTES < crate::chat::run_registry::SUBSCRIBER_LOW_WATER
        && DRAINED_REPORT_BATCHES < crate::chat::run_registry::SUBSCRIBER_MAX_BATCHES
);
/// Frame bytes handed to the WebSocket encoder per poll of this actor. Polls
/// come when the HTTP layer has room, so this bounds the encoded copy per socket.
pub const WRITE_BYTES_PER_POLL: usize = 64 * 1024;
/// Client requests of one socket being answered at once; more are refused
/// with `RATE_LIMITED` rather than queued.
pub const MAX_INFLIGHT: usize = 64;

pub struct ChatSocket {
    user: AuthUser,
    registry: Addr<RunRegistry>,
    store: Store,
    heartbeat_interval: Duration,
    hb: Heartbeat,
    id: Option<SocketId>,
    /// Requests spawned and not yet answered (bounded by [`MAX_INFLIGHT`]).
    inflight: usize,
    /// Delivered batches not yet fully written, oldest first, with when
    /// the first one's provider line was read (live deliveries).
    backlog: VecDeque<(Arc<[Frame]>, Option<tokio::time::Instant>)>,
    /// Index of the next frame to write in `backlog.front()`.
    backlog_next: usize,
    /// Bytes of the frames in `backlog` not yet written.
    backlog_bytes: usize,
    /// Where backlog frames are encoded (the route wraps the context's
    /// body in [`crate::write_pump::WithRaw`] with it).
    raw: RawOut,
    /// Written and finished since the last [`Drained`] report.
    drained_bytes: usize,
    drained_batches: usize,
    /// This socket's connection, watched for a client that stopped reading.
    conn: Option<WatchedConn>,
    /// The token it was opened with (closed with 1008 when it ends).
    token: TokenWatch,
    /// Most entries of one `chat.subscribe` (`--max-subscribe-entries`).
    subscribe_limit: usize,
    /// A fragmented message being reassembled (at most
    /// [`MAX_INBOUND_FRAME`] bytes in all).
    fragment: Option<Fragment>,
    /// Counted in `agentgate_connections_*` while the actor lives.
    metric: Option<Connection>,
    _panics: PanicWatch,
    /// `conn{endpoint, socket, user}`: this socket's log lines.
    span: tracing::Span,
}

/// A fragmented message in progress.
enum Fragment {
    /// A text message: its bytes so far (UTF-8 is checked when complete,
    /// since a character may be split between fragments).
    Text(Vec<u8>),
    /// A binary message: refused at its first fragment, the rest skipped.
    Binary,
}

/// The text of a frame actix could not decode as UTF-8 (it reports it as an
/// I/O error carrying `Utf8Error`'s text).
fn is_utf8_error(err: &ws::ProtocolError) -> bool {
    matches!(err, ws::ProtocolError::Io(e) if e.to_string().contains("utf-8"))
}

impl ChatSocket {
    pub fn new(
        user: AuthUser,
        registry: Addr<RunRegistry>,
        store: Store,
        heartbeat_interval: Duration,
    ) -> Self {
        ChatSocket {
            token: TokenWatch::none(user.id),
            registry,
            store,
            heartbeat_interval,
            hb: Heartbeat::default(),
            id: None,
            inflight: 0,
            backlog: VecDeque::new(),
            backlog_next: 0,
            backlog_bytes: 0,
            raw: RawOut::default(),
            drained_bytes: 0,
            drained_batches: 0,
            conn: None,
            fragment: None,
            subscribe_limit: crate::limits::DEFAULT_LIMITS.subscribe_entries,
            metric: None,
            _panics: PanicWatch::new("ChatSocket", ""),
            span: tracing::info_span!("conn", endpoint = "ws", socket = tracing::field::Empty, user = %user.username),
            user,
        }
    }

    /// At most `limit` entries per `chat.subscribe` frame.
    pub fn subscribe_limit(mut self, limit: usize) -> Self {
        self.subscribe_limit = limit;
        self
    }

    /// Where it encodes the frames it writes: the route writes them to the
    /// connection ahead of the context's (`WithRaw::new(context, raw)`).
    pub fn raw_out(&self) -> RawOut {
        self.raw.clone()
    }

    /// Closes the socket with 1008 when `token` expires or is revoked.
    pub fn token(mut self, token: TokenWatch) -> Self {
        self.token = token;
        self
    }

    /// Lets the [`ConnWatchdog`](crate::watchdog::ConnWatchdog) cut off this
    /// socket's connection when its client stops reading.
    pub fn watched(mut self, conn: Option<WatchedConn>) -> Self {
        self.conn = conn;
        self
    }

    /// Hands backlog frames to the encoder until `budget` bytes are written
    /// or the backlog is empty; true when frames remain.
    fn write_backlog(&mut self, budget: usize, _: &mut ws::WebsocketContext<Self>) -> bool {
        // What this write encodes, so its frames go into one allocation.
        let mut encoded = 0;
        let mut payload = 0;
        let mut next = self.backlog_next;
        'size: for (batch, _) in &self.backlog {
            for frame in &batch[next..] {
                if payload >= budget {
                    break 'size;
                }
                payload += frame.len();
                encoded += RawOut::text_len(frame.len());
            }
            next = 0;
        }
        self.raw.reserve(encoded);
        let mut written = 0;
        while written < budget {
            let Some((batch, _)) = self.backlog.front() else {
                break;
            };
            match batch.get(self.backlog_next) {
                Some(frame) => {
                    written += frame.len();
                    self.backlog_bytes = self.backlog_bytes.saturating_sub(frame.len());
                    self.raw.text(frame.as_bytes());
                    self.backlog_next += 1;
                }
                None => self.finish_batch(),
            }
        }
        // A batch whose last frame was just written is finished too.
        if self
            .backlog
            .front()
            .is_some_and(|(b, _)| self.backlog_next >= b.len())
        {
            self.finish_batch();
        }
        metrics().sent(Endpoint::Chat, written);
        self.drained_bytes += written;
        let idle = self.backlog.is_empty();
        if self.drained_bytes >= DRAINED_REPORT_BYTES
            || self.drained_batches >= DRAINED_REPORT_BATCHES
        {
            if let Some(socket) = self.id {
                // Returns budget to the registry, which then sends more.
                self.registry.do_send(Drained {
                    socket,
                    bytes: std::mem::take(&mut self.drained_bytes),
                    batches: std::mem::take(&mut self.drained_batches),
                });
            }
        }
        !idle
    }

    /// The front batch is written: it counts as drained, and a live one's
    /// delay from the provider's line is observed.
    fn finish_batch(&mut self) {
        if let Some((_, Some(read_at))) = self.backlog.pop_front() {
            metrics()
                .delivery_latency
                .observe(read_at.elapsed().as_secs_f64());
        }
        self.backlog_next = 0;
        self.drained_batches += 1;
    }

    fn close(&mut self, code: u16, reason: &str, ctx: &mut ws::WebsocketContext<Self>) {
        if code == 4008 {
            // A slow client would only fall further behind: drop its backlog.
            self.backlog.clear();
            self.backlog_bytes = 0;
        } else {
            // Shutdown (1001) after a run's last events: the client gets them first.
            self.write_backlog(usize::MAX, ctx);
        }
        let reason = Some(ws::CloseReason {
            code: ws::CloseCode::from(code),
            description: Some(reason.to_string()),
        });
        note_close(&mut self.metric, &reason);
        ctx.close(reason);
        ctx.stop();
    }

    fn send_error(ctx: &mut ws::WebsocketContext<Self>, err: &ChatError, session_id: Option<&str>) {
        ctx.text(protocol_error(err, session_id));
    }

    fn not_found() -> ChatError {
        ChatError::new(
            ErrorCode::SessionNotFound,
            "Session not found; create one with POST /api/providers/sessions",
        )
    }

    fn on_text(&mut self, text: &str, ctx: &mut ws::WebsocketContext<Self>) {
        let msg = match ClientMessage::parse(text) {
            Ok(msg) => msg,
            Err(err) => return Self::send_error(ctx, &err, None),
        };
        let Some(socket) = self.id else {
            return Self::send_error(
                ctx,
                &ChatError::new(ErrorCode::InternalError, "socket not registered"),
                None,
            );
        };
        if matches!(msg, ClientMessage::Ignored) {
            return;
        }
        if self.inflight >= MAX_INFLIGHT {
            // A client flooding requests is told so; nothing is queued for it.
            return Self::send_error(
                ctx,
                &ChatError::new(
                    ErrorCode::RateLimited,
                    "Too many requests in flight on this socket; wait for answers",
                ),
                None,
            );
        }
        self.inflight += 1;
        let (store, registry, user_id) = (self.store.clone(), self.registry.clone(), self.user.id);
        match msg {
            ClientMessage::Send {
                session_id,
                content,
                options,
                client_request_id,
            } => self.answer(ctx, async move {
                let start = async {
                    // Values that reach the CLI's argv are checked first (a clear refusal).
                    crate::provider::check_options(&options)
                        .map_err(|m| ChatError::new(ErrorCode::InvalidPayload, m))?;
                    let session = owned_row(&store, &session_id, user_id).await?;
                    let (project, opts) = (session.project_path.clone(), options.clone());
                    let cwd = tokio::task::spawn_blocking(move || resolve_cwd(&project, &opts))
                        .await
                        .map_err(internal)?;
                    let start = StartRun {
                        socket: Some(socket),
                        user_id,
                        session,
                        content,
                        options,
                        client_request_id,
                        cwd,
                    };
                    registry.send(start).await.map_err(internal)?.map(|_| ())
                };
                refusal(start.await, session_id)
            }),
            ClientMessage::Abort { session_id } => self.answer(ctx, async move {
                let abort = AbortRun {
                    user_id,
                    session_id: session_id.clone(),
                };
                let result = registry.send(abort).await.map_err(internal);
                refusal(result.and_then(|r| r), session_id)
            }),
            ClientMessage::Subscribe { sessions } if sessions.len() > self.subscribe_limit => {
                self.inflight -= 1;
                let limit = self.subscribe_limit;
                Self::send_error(
                    ctx,
                    &ChatError::new(
                        ErrorCode::TooManyEntries,
                        format!("chat.subscribe has {} entries; at most {limit} per frame (--max-subscribe-entries): send several frames", sessions.len()),
                    ),
                    None,
                );
            }
            // One entry after the other, so acks come back in the order asked.
            ClientMessage::Subscribe { sessions } => self.answer(ctx, async move {
                let mut refusals = Vec::new();
                for target in sessions {
                    match owned_row(&store, &target.session_id, user_id).await {
                        Ok(session) => {
                            let subscribe = Subscribe {
                                socket,
                                session,
                                last_seq: target.last_seq,
                                follow: false,
                            };
                            if let Err(e) = registry.send(subscribe).await {
                                refusals.push((internal(e), target.session_id));
                            }
                        }
                        Err(e) => refusals.push((e, target.session_id)),
                    }
                }
                refusals
            }),
            // Never answered with an error, as in the reference.
            ClientMessage::PermissionResponse {
                request_id,
                decision,
            } => self.answer(ctx, async move {
                let answer = RespondPermission {
                    user_id,
                    request_id,
                    decision,
                };
                let _ = registry.send(answer).await;
                Vec::new()
            }),
            ClientMessage::Ignored => self.inflight -= 1,
        }
    }

    /// Runs one client request beside the stream (never blocking the
    /// socket) and answers its refusals as `protocol_error`s.
    fn answer(
        &mut self,
        ctx: &mut ws::WebsocketContext<Self>,
        request: impl std::future::Future<Output = Refusals> + 'static,
    ) {
        ctx.spawn(request.into_actor(self).map(|refusals, act, ctx| {
            act.inflight -= 1;
            for (err, session_id) in refusals {
                Self::send_error(ctx, &err, Some(&session_id));
            }
        }));
    }
}

/// Errors to answer, each with the session it concerns.
type Refusals = Vec<(ChatError, String)>;

fn internal(err: impl std::fmt::Display) -> ChatError {
    ChatError::new(ErrorCode::InternalError, err.to_string())
}

fn refusal(result: Result<(), ChatError>, session_id: String) -> Refusals {
    result.err().map(|e| (e, session_id)).into_iter().collect()
}

/// The session row if it exists and belongs to the user (else `SESSION_NOT_FOUND`, E3).
async fn owned_row(store: &Store, session_id: &str, user_id: i64) -> Result<SessionRow, ChatError> {
    match store::owned_session(store, session_id, user_id).await {
        Ok(Some(row)) => Ok(row),
        Ok(None) => Err(ChatSocket::not_found()),
        Err(e) => Err(internal(e)),
    }
}

impl Actor for ChatSocket {
    type Context = ws::WebsocketContext<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(MAILBOX_CAPACITY);
        self.metric = Some(Connection::open(Endpoint::Chat));
        let span = self.span.clone();
        let _entered = span.enter();
        ctx.spawn(WritePump(WRITE_BYTES_PER_POLL));
        if let Some(conn) = &mut self.conn {
            conn.watch("ChatSocket", ctx.address().recipient());
        }
        Heartbeat::start(
            ctx,
            self.heartbeat_interval,
            |a: &mut Self| &mut a.hb,
            "ChatSocket",
        );
        self.token.start(
            ctx,
            &self.store.clone(),
            self.heartbeat_interval,
            |act: &mut Self, ctx, reason| {
                tracing::info!(actor = "ChatSocket", socket = ?act.id, reason, "closing socket with 1008");
                act.close(CLOSE_TOKEN_INVALID, reason, ctx);
            },
        );
        let connect = Connect {
            user_id: self.user.id,
            deliver: ctx.address().recipient(),
            close: ctx.address().recipient(),
        };
        // One-off registration: frames wait until the socket has its id.
        self.registry
            .send(connect)
            .into_actor(self)
            .map(|res, act, ctx| match res {
                Ok(id) => {
                    act.id = Some(id);
                    act._panics.ids = format!("socket={id}");
                    act.span.record("socket", id);
                    let _entered = act.span.clone().entered();
                    tracing::info!(event = "actor.started", actor = "ChatSocket", socket = id, user = %act.user.username, "actor started");
                }
                Err(_) => {
                    tracing::error!(event = "actor.stopped", actor = "ChatSocket", reason = "registry unavailable", "actor stopped");
                    ctx.stop();
                }
            })
            .wait(ctx);
    }

    fn stopped(&mut self, _: &mut Self::Context) {
        let _entered = self.span.clone().entered();
        if let Some(id) = self.id {
            self.registry.do_send(Disconnect { socket: id });
            tracing::info!(event = "actor.stopped", reason = %stop_reason(&self.metric), actor = "ChatSocket", socket = id, user = %self.user.username, "actor stopped");
        }
    }
}

impl Handler<Deliver> for ChatSocket {
    type Result = ();

    fn handle(&mut self, msg: Deliver, ctx: &mut Self::Context) {
        // Queued, not encoded: the pump writes as fast as the client reads.
        self.backlog_bytes += msg.0.iter().map(|f| f.len()).sum::<usize>();
        self.backlog.push_back((msg.0, msg.1));
        if self.backlog_bytes > BACKLOG_MAX_BYTES {
            tracing::warn!(actor = "ChatSocket", socket = ?self.id, backlog_bytes = self.backlog_bytes, reason = "slow consumer", "closing socket with 4008");
            self.close(4008, "slow consumer", ctx);
        }
    }
}

impl Handler<Stalled> for ChatSocket {
    type Result = ();

    fn handle(&mut self, _: Stalled, ctx: &mut Self::Context) {
        self.close(4008, "slow consumer", ctx);
    }
}

impl Handler<CloseSocket> for ChatSocket {
    type Result = ();

    fn handle(&mut self, msg: CloseSocket, ctx: &mut Self::Context) {
        self.close(msg.code, msg.reason, ctx);
    }
}

impl Backlog for ChatSocket {
    fn write_backlog(&mut self, budget: usize, ctx: &mut ws::WebsocketContext<Self>) -> bool {
        ChatSocket::write_backlog(self, budget, ctx)
    }
}

impl ChatSocket {
    fn binary_refused(ctx: &mut ws::WebsocketContext<Self>) {
        Self::send_error(
            ctx,
            &ChatError::new(
                ErrorCode::InvalidPayload,
                "Invalid websocket payload: binary frames are not accepted; send JSON text",
            ),
            None,
        );
    }

    /// Refused from the frame header or the reassembled length; the
    /// payload beyond the limit is never buffered (E5).
    fn too_large(&mut self, ctx: &mut ws::WebsocketContext<Self>) {
        let err = ChatError::new(
            ErrorCode::MessageTooLarge,
            format!("Message exceeds the {} MiB limit", MAX_INBOUND_FRAME >> 20),
        );
        Self::send_error(ctx, &err, None);
        let reason = Some(ws::CloseReason {
            code: ws::CloseCode::Size,
            description: Some("message too large".into()),
        });
        note_close(&mut self.metric, &reason);
        ctx.close(reason);
        ctx.stop();
    }

    /// RFC 6455 8.1: a text message that is not UTF-8 fails the connection with 1007.
    fn invalid_utf8(&mut self, ctx: &mut ws::WebsocketContext<Self>) {
        let reason = Some(ws::CloseReason {
            code: ws::CloseCode::Invalid,
            description: Some("text frame is not valid UTF-8".into()),
        });
        note_close(&mut self.metric, &reason);
        ctx.close(reason);
        ctx.stop();
    }

    /// One fragment of a fragmented message (RFC 6455 5.4); the codec
    /// already refuses fragments out of order.
    fn on_fragment(&mut self, item: actix_http::ws::Item, ctx: &mut ws::WebsocketContext<Self>) {
        use actix_http::ws::Item;
        let (bytes, last) = match item {
            Item::FirstText(b) => {
                self.fragment = Some(Fragment::Text(Vec::with_capacity(b.len())));
                (b, false)
            }
            Item::FirstBinary(_) => {
                self.fragment = Some(Fragment::Binary);
                return Self::binary_refused(ctx);
            }
            Item::Continue(b) => (b, false),
            Item::Last(b) => (b, true),
        };
        let buf = match self.fragment.as_mut() {
            Some(Fragment::Text(buf)) => buf,
            Some(Fragment::Binary) => {
                if last {
                    self.fragment = None;
                }
                return;
            }
            None => return,
        };
        if buf.len() + bytes.len() > MAX_INBOUND_FRAME {
            self.fragment = None;
            return self.too_large(ctx);
        }
        buf.extend_from_slice(&bytes);
        if !last {
            return;
        }
        let Some(Fragment::Text(whole)) = self.fragment.take() else {
            return;
        };
        match String::from_utf8(whole) {
            Ok(text) => self.on_text(&text, ctx),
            Err(_) => self.invalid_utf8(ctx),
        }
    }
}

impl StreamHandler<Result<ws::Message, ws::ProtocolError>> for ChatSocket {
    fn handle(&mut self, item: Result<ws::Message, ws::ProtocolError>, ctx: &mut Self::Context) {
        let span = self.span.clone();
        let _entered = span.enter();
        match item {
            Ok(ws::Message::Text(text)) => self.on_text(&text, ctx),
            Ok(ws::Message::Binary(_)) => Self::binary_refused(ctx),
            Ok(ws::Message::Continuation(item)) => self.on_fragment(item, ctx),
            Ok(ws::Message::Ping(payload)) => {
                self.hb.pong();
                ctx.pong(&payload);
            }
            Ok(ws::Message::Pong(_)) => self.hb.pong(),
            Ok(ws::Message::Close(reason)) => {
                if let (Some(m), Some(r)) = (&mut self.metric, &reason) {
                    m.close_code(r.code.into());
                }
                ctx.close(reason);
                ctx.stop();
            }
            Ok(ws::Message::Nop) => {}
            Err(ws::ProtocolError::Overflow) => self.too_large(ctx),
            Err(err) if is_utf8_error(&err) => self.invalid_utf8(ctx),
            Err(err) => {
                tracing::debug!(actor = "ChatSocket", %err, "protocol error; closing");
                let reason = Some(ws::CloseCode::Protocol.into());
                note_close(&mut self.metric, &reason);
                ctx.close(reason);
                ctx.stop();
            }
        }
    }
}
