//! `PluginProxy`: one `/plugin-ws/{name}` client socket relayed to its
//! plugin's server at `ws://127.0.0.1:<port>/ws` (PROTOCOL.md section 6).
//!
//! Owns: both legs after their handshakes as raw bytes — the client's
//! upgraded request stream and the response body it feeds (through a
//! bounded channel), and the plugin's TCP socket — with one [`Scanner`]
//! per direction, the buffered bytes of each direction and the heartbeat.
//!
//! Handles: [`Stalled`] from the connection watchdog; its own [`Relay`]
//! future moves the bytes; a timer sends the heartbeat pings.
//!
//! Sends: data frames (text, binary, continuation) both ways byte for byte
//! as they came, in order, batched into one write per burst: neither leg
//! negotiates an extension, so a frame needs no re-encoding, and frames to
//! the plugin keep the masking key the client chose for them (a key is per
//! frame and the client's own; the plugin hop is loopback). Every frame is
//! checked first ([`frames`](super::frames)): a client frame that breaks
//! RFC 6455 fails the client with 1002, invalid UTF-8 (also across
//! fragments, and as soon as the bad byte arrives) with 1007, a frame over
//! 8 MiB with 1009, and the plugin gets 1001. Pings are answered and pongs
//! consumed on each leg; our own pings and closes go between frames. A close
//! on either side closes the other with the same code when that code may be
//! sent (else without a code). An upstream that cannot be reached, errors,
//! breaks the protocol or ends without a close frame closes the client with
//! 4502 "Upstream error". A client that disappears gets the upstream closed
//! with 1001.
//!
//! Refusals: an invalid name is accepted and closed with 4400 "Invalid plugin
//! name"; a plugin that is not running with 4404 "Plugin not running".
//!
//! Backpressure, per direction, with bounded memory:
//! - plugin → client: the plugin is read only when everything read before
//!   has gone into the channel to the response body ([`CLIENT_QUEUE_CHUNKS`]
//!   chunks of at most one read, [`READ_CHUNK`], or one frame), and the HTTP
//!   layer takes from the channel only while its write buffer has room; so a
//!   slow client stops the reads from the plugin (TCP then slows it).
//! - client → plugin: the client is read only while fewer than
//!   [`UPSTREAM_BUFFER_BYTES`] wait for the plugin's socket, so a slow
//!   plugin stops the reads from the client. Plugin frames keep flowing
//!   meanwhile, so an echoing plugin can never deadlock it.
//!
//! Stops: on a close from either side, an upstream error, the client's
//! stream ending, a missed heartbeat or a stalled client. What is still
//! queued for either side then goes out from a task of its own: towards the
//! plugin bounded by [`UPSTREAM_CLOSE_TIMEOUT`], which also waits for its
//! close reply; towards the client watched by the connection watchdog until
//! the response has ended (so a client that stopped reading is still cut
//! off), with the connection's reads ended so it closes right after.

use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context as TaskContext, Poll, Waker};
use std::time::Duration;

use actix::fut::ActorFuture;
use actix::prelude::*;
use actix_web::error::PayloadError;
use actix_web::web::{Buf, Bytes, BytesMut};
use actix_web::{HttpRequest, HttpResponse};
use actix_web_actors::ws;
use futures_util::Stream;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::PollSender;

use super::frames::{self, Control, Next, Scanner, Sender, Violation};
use super::manifest::valid_name;
use super::plugin_registry::{LookupPort, PluginPort, PluginRegistry, ProxyClosed, ProxyOpened};

/// Ids of proxies, for the admin snapshot.
static NEXT_PROXY: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
use crate::config::MAX_INBOUND_FRAME;
use crate::heartbeat::Heartbeat;
use crate::metrics::{metrics, Connection, Endpoint, PanicWatch};
use crate::watchdog::{ReadCloser, Stalled, WatchedConn};

/// Close code for an invalid plugin name (PROTOCOL.md section 7).
pub const CLOSE_INVALID_NAME: u16 = 4400;
/// Close code for a plugin that is not running.
pub const CLOSE_NOT_RUNNING: u16 = 4404;
/// Close code for an upstream plugin error.
pub const CLOSE_UPSTREAM_ERROR: u16 = 4502;
/// How long connecting and the upstream handshake may take.
pub const UPSTREAM_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// After the proxy stopped: how long the last queued bytes and the close
/// frame may take to reach either side, and then how long the plugin's
/// close reply may take.
pub const UPSTREAM_CLOSE_TIMEOUT: Duration = Duration::from_secs(2);
/// Bytes waiting for the plugin's socket above which client reads pause.
pub const UPSTREAM_BUFFER_BYTES: usize = 256 * 1024;
/// Chunks queued for the client's response body (each one read from the
/// plugin, or one frame).
pub const CLIENT_QUEUE_CHUNKS: usize = 4;
/// Most bytes read from the plugin at once (a frame that is still arriving
/// grows the buffer up to its size, at most 8 MiB).
pub const READ_CHUNK: usize = 64 * 1024;
/// Control frames of our own (pongs, pings) waiting for the client above
/// which client reads pause, so a ping flood cannot grow the queue.
const OUTBOX_MAX: usize = 64;
/// Rounds of reading and writing per poll before yielding to the other
/// tasks of the thread (the actor's mailbox and timers included).
const ROUNDS_PER_POLL: usize = 16;

/// What the upgrade route decided before the socket was accepted.
#[derive(Debug)]
enum Target {
    Refuse(u16, &'static str),
    Upstream(PluginPort),
}

/// A close frame to send: `None` inside means one without a status code.
type CloseFrame = Option<(u16, String)>;

/// Accepts a `/plugin-ws/{name}` upgrade (the caller has authenticated) and
/// starts its `PluginProxy`. Refusals are accepted and then closed with
/// 4400/4404, as the protocol says.
pub async fn start_proxy<S>(
    req: &HttpRequest,
    stream: S,
    name: &str,
    registry: &Addr<PluginRegistry>,
    heartbeat: Duration,
    conn: Option<WatchedConn>,
    user: &str,
) -> Result<HttpResponse, actix_web::Error>
where
    S: Stream<Item = Result<Bytes, PayloadError>> + 'static,
{
    let mut response = ws::handshake(req)?;
    let target = if !valid_name(name) {
        Target::Refuse(CLOSE_INVALID_NAME, "Invalid plugin name")
    } else {
        let lookup = registry
            .send(LookupPort {
                name: name.to_string(),
            })
            .await;
        match lookup {
            Ok(Some(plugin)) => Target::Upstream(plugin),
            Ok(None) => Target::Refuse(CLOSE_NOT_RUNNING, "Plugin not running"),
            Err(err) => {
                tracing::error!(plugin = %name, error = %err, "plugin registry unavailable");
                Target::Refuse(CLOSE_NOT_RUNNING, "Plugin not running")
            }
        }
    };
    // The name is only logged once it is known to be safe to print.
    let name = if valid_name(name) { name } else { "<invalid>" };
    let (tx, rx) = mpsc::channel(CLIENT_QUEUE_CHUNKS);
    let (handoff, held) = oneshot::channel();
    let (dropped, body_gone) = oneshot::channel();
    PluginProxy {
        name: name.to_string(),
        target: Some(target),
        heartbeat,
        hb: Heartbeat::default(),
        client_in: Some(Box::pin(stream)),
        client_in_handoff: Some(handoff),
        client_buf: BytesMut::new(),
        client_scan: Scanner::new(Sender::Client, MAX_INBOUND_FRAME),
        outbox: VecDeque::new(),
        client_out: Some(PollSender::new(tx.clone())),
        client_tx: Some(tx),
        upstream: None,
        waker: None,
        stop_reason: "client closed",
        client_reads: conn.as_ref().and_then(WatchedConn::read_closer),
        body_gone: Some(body_gone),
        conn,
        metric: None,
        _panics: PanicWatch::new("PluginProxy", format!("plugin={name}")),
        listed: Some((
            registry.clone(),
            NEXT_PROXY.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            user.to_string(),
        )),
    }
    .start();
    Ok(response.streaming(ClientOutput {
        chunks: rx,
        held,
        _input: None,
        _dropped: dropped,
    }))
}

/// The client's bytes after the upgrade (the request stream, which may
/// carry a ticket of the socket limits, given back when it is dropped).
type ClientInput = Pin<Box<dyn Stream<Item = Result<Bytes, PayloadError>>>>;

/// The response body of the upgrade: what the proxy queued for the client.
struct ClientOutput {
    chunks: mpsc::Receiver<Bytes>,
    /// The client's input stream, handed over when the proxy stops.
    held: oneshot::Receiver<Option<ClientInput>>,
    /// Kept until the body is dropped: actix-http closes the connection when
    /// a response ends before its request stream was dropped, while a dropped
    /// one is drained until the client closes (which a WebSocket client waits
    /// for the server to do).
    _input: Option<ClientInput>,
    /// Tells the proxy's last task when the body is dropped.
    _dropped: oneshot::Sender<()>,
}

impl Stream for ClientOutput {
    type Item = Result<Bytes, std::convert::Infallible>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Option<Self::Item>> {
        let chunk = std::task::ready!(self.chunks.poll_recv(cx));
        if chunk.is_none() {
            if let Ok(input) = self.held.try_recv() {
                self._input = input;
            }
        }
        Poll::Ready(chunk.map(Ok))
    }
}

/// The plugin leg after its handshake.
struct Upstream {
    io: awc::BoxedSocket,
    /// Read from the plugin, not yet relayed (a partial frame at most, between polls).
    read_buf: BytesMut,
    scan: Scanner,
    /// Waiting for the plugin's socket.
    write_buf: BytesMut,
}

pub struct PluginProxy {
    name: String,
    /// Taken in `started()`.
    target: Option<Target>,
    heartbeat: Duration,
    hb: Heartbeat,
    /// The client's bytes after the upgrade; `None` once it ended.
    client_in: Option<ClientInput>,
    /// Hands `client_in` to the response body when the proxy stops.
    client_in_handoff: Option<oneshot::Sender<Option<ClientInput>>>,
    /// Received from the client, not yet relayed (a partial frame).
    client_buf: BytesMut,
    client_scan: Scanner,
    /// Whole frames for the client, waiting for room in the channel.
    outbox: VecDeque<Bytes>,
    /// The channel to the response body; `None` once the proxy stopped.
    client_out: Option<PollSender<Bytes>>,
    /// The same channel, for the last frames sent after the proxy stopped.
    client_tx: Option<mpsc::Sender<Bytes>>,
    upstream: Option<Upstream>,
    /// Wakes the relay when a timer or message queued something.
    waker: Option<Waker>,
    /// For the supervision log line in `stopped()`.
    stop_reason: &'static str,
    /// The client's connection, watched for a client that stopped reading.
    conn: Option<WatchedConn>,
    /// Ends the client connection's reads when the proxy stops, so it closes
    /// right after the last frames.
    client_reads: Option<ReadCloser>,
    /// Resolves when the HTTP layer dropped the response body.
    body_gone: Option<oneshot::Receiver<()>>,
    /// Counted in `agentgate_connections_*` while the actor lives.
    metric: Option<Connection>,
    _panics: PanicWatch,
    /// Listed in the registry's open proxies (admin snapshot) while attached:
    /// the registry, this proxy's id and its user.
    listed: Option<(Addr<PluginRegistry>, u64, String)>,
}

impl Actor for PluginProxy {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        self.metric = Some(Connection::open(Endpoint::Plugin));
        let plugin = match self.target.take() {
            None => return,
            Some(Target::Refuse(code, reason)) => {
                self.listed = None;
                self.finish(ctx, reason, Some(Some((code, reason.into()))), None);
                return;
            }
            Some(Target::Upstream(plugin)) => plugin,
        };
        if let Some((registry, id, user)) = &self.listed {
            registry.do_send(ProxyOpened {
                id: *id,
                plugin: self.name.clone(),
                user: user.clone(),
            });
        }
        let PluginPort {
            port,
            mut going_away,
        } = plugin;
        ctx.spawn(
            async move {
                // An error means the registry is gone: the gateway is exiting.
                let _ = going_away.changed().await;
            }
            .into_actor(self)
            .map(|(), act, ctx| act.plugin_stopping(ctx)),
        );
        tracing::info!(event = "actor.started", actor = "PluginProxy", plugin = %self.name, port, "actor started");
        if let Some(conn) = &mut self.conn {
            conn.watch("PluginProxy", ctx.address().recipient());
        }
        ctx.run_interval(self.heartbeat, |act, ctx| {
            if !act.hb.tick() {
                crate::metrics::metrics().heartbeat_timeout("PluginProxy");
                tracing::info!(
                    actor = "PluginProxy",
                    reason = "heartbeat timeout",
                    "dropping socket that missed a ping"
                );
                act.finish(ctx, "heartbeat timeout", None, Some(going_away_close()));
                return;
            }
            let mut ping = Vec::with_capacity(2);
            frames::server_frame(&mut ping, frames::OP_PING, b"");
            act.queue_for_client(ping);
        });
        let url = format!("ws://127.0.0.1:{port}/ws");
        // Waiting here (not spawning) keeps client bytes unread until the
        // plugin socket exists, so nothing is buffered meanwhile.
        ctx.wait(
            async move {
                awc::Client::builder()
                    .timeout(UPSTREAM_CONNECT_TIMEOUT)
                    .finish()
                    .ws(url)
                    .connect()
                    .await
            }
            .into_actor(self)
            .map(|res, act, ctx| match res {
                // Neither leg offers an extension, so a plugin naming one is broken.
                Ok((response, _))
                    if response.headers().contains_key("sec-websocket-extensions") =>
                {
                    act.upstream_failed(
                        ctx,
                        "plugin negotiated an extension it was not offered",
                        None,
                    );
                }
                Ok((_, framed)) => {
                    let parts = framed.into_parts();
                    act.upstream = Some(Upstream {
                        io: parts.io,
                        // Bytes the plugin sent right after its handshake.
                        read_buf: parts.read_buf,
                        scan: Scanner::new(Sender::Server, MAX_INBOUND_FRAME),
                        write_buf: BytesMut::new(),
                    });
                    // Frames that came with the handshake go first.
                    act.relay_upstream(ctx);
                    ctx.spawn(Relay);
                }
                Err(err) => act.upstream_failed(ctx, &format!("connect failed: {err}"), None),
            }),
        );
    }

    fn stopped(&mut self, _ctx: &mut Self::Context) {
        if let Some((registry, id, _)) = self.listed.take() {
            registry.do_send(ProxyClosed { id });
        }
        // The last frames for each side, and the plugin's close reply, are
        // waited for by tasks of their own.
        self.client_out = None;
        if let Some(handoff) = self.client_in_handoff.take() {
            let _ = handoff.send(self.client_in.take());
        }
        let tail = ClientTail {
            last: std::mem::take(&mut self.outbox),
            tx: self.client_tx.take(),
            reads: self.client_reads.take(),
            body_gone: self.body_gone.take(),
            conn: self.conn.take(),
        };
        actix::spawn(tail.run(self.heartbeat * 2 + UPSTREAM_CLOSE_TIMEOUT));
        if let Some(upstream) = self.upstream.take() {
            actix::spawn(linger(upstream));
        }
        tracing::info!(event = "actor.stopped", actor = "PluginProxy", plugin = %self.name, reason = self.stop_reason, "actor stopped");
    }
}

/// The end of the client leg after the proxy stopped.
struct ClientTail {
    /// Frames still for the client, its close frame last.
    last: VecDeque<Bytes>,
    tx: Option<mpsc::Sender<Bytes>>,
    reads: Option<ReadCloser>,
    /// Resolves when the HTTP layer dropped the response body.
    body_gone: Option<oneshot::Receiver<()>>,
    /// Still watched until then: a client that stopped reading is cut off
    /// by the watchdog, which also ends this task.
    conn: Option<WatchedConn>,
}

impl ClientTail {
    /// Sends the last frames, ends the body and the connection's reads (so
    /// actix-http closes the connection once they are written), and keeps
    /// the connection watched until the body is gone. Bounded by `limit`
    /// when no watchdog watches.
    async fn run(self, limit: Duration) {
        let ClientTail {
            last,
            tx,
            reads,
            body_gone,
            conn,
        } = self;
        let _ = tokio::time::timeout(limit, async move {
            if let Some(tx) = tx {
                for chunk in last {
                    let len = chunk.len();
                    if tx.send(chunk).await.is_err() {
                        break;
                    }
                    metrics().sent(Endpoint::Plugin, len);
                }
            }
            if let Some(reads) = reads {
                reads.end_reads();
            }
            if let Some(gone) = body_gone {
                let _ = gone.await;
            }
            drop(conn);
        })
        .await;
    }
}

impl Handler<Stalled> for PluginProxy {
    type Result = ();

    fn handle(&mut self, _: Stalled, ctx: &mut Self::Context) {
        let client = Some((4008, "slow consumer".to_string()));
        self.finish(ctx, "slow consumer", Some(client), Some(going_away_close()));
    }
}

/// 1001 without a reason: what the plugin gets when the client is gone.
fn going_away_close() -> CloseFrame {
    Some((1001, String::new()))
}

impl PluginProxy {
    /// Queues whole frames for the client and wakes the relay to send them.
    fn queue_for_client(&mut self, frames: impl Into<Bytes>) {
        self.outbox.push_back(frames.into());
        if let Some(waker) = &self.waker {
            waker.wake_by_ref();
        }
    }

    /// Stops the proxy: `client` and `upstream` are the close frames to
    /// send last on each side (`None`: none, the connection just ends).
    fn finish(
        &mut self,
        ctx: &mut Context<Self>,
        reason: &'static str,
        client: Option<CloseFrame>,
        upstream: Option<CloseFrame>,
    ) {
        if stopping(ctx) {
            return;
        }
        self.stop_reason = reason;
        if let (Some(metric), Some(Some((code, _)))) = (self.metric.as_mut(), &client) {
            metric.close_code(*code);
        }
        if let Some(close) = client {
            let mut frame = Vec::new();
            let body = frames::close_body(close.as_ref().map(|(c, r)| (*c, r.as_str())));
            frames::server_frame(&mut frame, frames::OP_CLOSE, &body);
            self.queue_for_client(frame);
        }
        match (upstream, self.upstream.as_mut()) {
            (Some(close), Some(up)) => {
                let body = frames::close_body(close.as_ref().map(|(c, r)| (*c, r.as_str())));
                let mut frame = Vec::new();
                frames::client_frame(&mut frame, frames::OP_CLOSE, &body, mask_key());
                up.write_buf.extend_from_slice(&frame);
            }
            // No close frame: the plugin's socket is dropped at once.
            (None, _) => self.upstream = None,
            (Some(_), None) => {}
        }
        ctx.stop();
    }

    /// The plugin is being stopped on purpose: both sides get 1001.
    fn plugin_stopping(&mut self, ctx: &mut Context<Self>) {
        let close = Some((1001, "Plugin stopping".to_string()));
        self.finish(ctx, "plugin stopping", Some(close.clone()), Some(close));
    }

    /// Closes the client with 4502; `upstream` is what the plugin gets.
    fn upstream_failed(
        &mut self,
        ctx: &mut Context<Self>,
        detail: &str,
        upstream: Option<CloseFrame>,
    ) {
        if stopping(ctx) {
            return;
        }
        tracing::warn!(actor = "PluginProxy", plugin = %self.name, error = %detail, "upstream error");
        let client = Some((CLOSE_UPSTREAM_ERROR, "Upstream error".to_string()));
        self.finish(ctx, "upstream error", Some(client), upstream);
    }

    /// A client frame broke the protocol: the client gets the violation's
    /// code, the plugin 1001.
    fn client_failed(&mut self, ctx: &mut Context<Self>, v: Violation) {
        tracing::info!(actor = "PluginProxy", plugin = %self.name, code = v.code, error = v.reason, "client protocol error");
        let client = Some((v.code, v.reason.to_string()));
        self.finish(ctx, v.reason, Some(client), Some(going_away_close()));
    }

    /// Moves bytes both ways until nothing is ready (or the round limit,
    /// then it wakes itself to continue after the other tasks had a turn).
    /// Ready when the proxy is stopping.
    fn relay(&mut self, ctx: &mut Context<Self>, cx: &mut TaskContext<'_>) -> Poll<()> {
        if !self.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            self.waker = Some(cx.waker().clone());
        }
        // A source that had nothing to read is not asked again in this
        // poll: its waker is registered, and the next poll comes when it
        // has something (each ask of an idle socket costs a readiness check).
        let (mut upstream_idle, mut client_idle) = (false, false);
        for _ in 0..ROUNDS_PER_POLL {
            let mut progress = self.flush_outbox(ctx, cx);
            progress |= self.flush_upstream(ctx, cx);
            if !upstream_idle && self.outbox.is_empty() {
                let read = self.read_upstream(ctx, cx);
                upstream_idle = !read;
                progress |= read;
            }
            let room = self
                .upstream
                .as_ref()
                .is_some_and(|up| up.write_buf.len() < UPSTREAM_BUFFER_BYTES);
            if !client_idle && room && self.outbox.len() < OUTBOX_MAX {
                let read = self.read_client(ctx, cx);
                client_idle = !read;
                progress |= read;
            }
            if stopping(ctx) {
                return Poll::Ready(());
            }
            if !progress {
                return Poll::Pending;
            }
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    /// Hands queued frames to the response body while it has room.
    fn flush_outbox(&mut self, ctx: &mut Context<Self>, cx: &mut TaskContext<'_>) -> bool {
        let (Some(out), Some(tx)) = (self.client_out.as_mut(), self.client_tx.as_ref()) else {
            return false;
        };
        let mut progress = false;
        while let Some(chunk) = self.outbox.pop_front() {
            // While the channel has room, a plain send (no reservation
            // future); when it is full, a reservation registers the waker.
            let len = chunk.len();
            match tx.try_send(chunk) {
                Ok(()) => {
                    metrics().sent(Endpoint::Plugin, len);
                    progress = true;
                    continue;
                }
                Err(mpsc::error::TrySendError::Full(chunk)) => self.outbox.push_front(chunk),
                Err(mpsc::error::TrySendError::Closed(_)) => {
                    self.finish(ctx, "client disconnected", None, Some(going_away_close()));
                    return false;
                }
            }
            match out.poll_reserve(cx) {
                Poll::Ready(Ok(())) => {
                    if let Some(chunk) = self.outbox.pop_front() {
                        let len = chunk.len();
                        if out.send_item(chunk).is_ok() {
                            metrics().sent(Endpoint::Plugin, len);
                        }
                    }
                    progress = true;
                }
                Poll::Ready(Err(_)) => {
                    // The HTTP layer dropped the body: the client is gone.
                    self.finish(ctx, "client disconnected", None, Some(going_away_close()));
                    return false;
                }
                Poll::Pending => break,
            }
        }
        progress
    }

    /// Writes what waits for the plugin.
    fn flush_upstream(&mut self, ctx: &mut Context<Self>, cx: &mut TaskContext<'_>) -> bool {
        let Some(up) = self.upstream.as_mut() else {
            return false;
        };
        let mut progress = false;
        while !up.write_buf.is_empty() {
            match Pin::new(&mut up.io).poll_write(cx, &up.write_buf) {
                Poll::Ready(Ok(n)) if n > 0 => {
                    up.write_buf.advance(n);
                    progress = true;
                }
                Poll::Ready(Ok(_)) => {
                    self.upstream_failed(ctx, "write failed: connection closed", None);
                    return false;
                }
                Poll::Ready(Err(err)) => {
                    self.upstream_failed(ctx, &format!("write failed: {err}"), None);
                    return false;
                }
                Poll::Pending => break,
            }
        }
        progress
    }

    /// Reads from the plugin once and relays the whole frames read.
    fn read_upstream(&mut self, ctx: &mut Context<Self>, cx: &mut TaskContext<'_>) -> bool {
        let Some(up) = self.upstream.as_mut() else {
            return false;
        };
        if up.read_buf.capacity() - up.read_buf.len() < READ_CHUNK / 4 {
            up.read_buf.reserve(READ_CHUNK);
        }
        match tokio_util::io::poll_read_buf(Pin::new(&mut up.io), cx, &mut up.read_buf) {
            Poll::Pending => false,
            Poll::Ready(Ok(0)) => {
                let detail = "plugin closed the connection without a close frame";
                self.upstream_failed(ctx, detail, None);
                false
            }
            Poll::Ready(Ok(_)) => {
                self.relay_upstream(ctx);
                true
            }
            Poll::Ready(Err(err)) => {
                self.upstream_failed(ctx, &format!("read failed: {err}"), None);
                false
            }
        }
    }

    /// Relays the whole frames at the head of the plugin's read buffer.
    fn relay_upstream(&mut self, ctx: &mut Context<Self>) {
        loop {
            let Some(up) = self.upstream.as_mut() else {
                return;
            };
            let mut relay = 0;
            let next = loop {
                relay += up.scan.small_run(&up.read_buf[relay..]);
                match up.scan.next(&up.read_buf[relay..]) {
                    Next::Data(n) => relay += n,
                    other => break other,
                }
            };
            if relay > 0 {
                let chunk = up.read_buf.split_to(relay).freeze();
                self.queue_for_client(chunk);
            }
            let Some(up) = self.upstream.as_mut() else {
                return;
            };
            match next {
                Next::Data(_) => unreachable!("consumed above"),
                Next::Partial => return,
                Next::Fail(v) => {
                    let detail = format!("plugin broke the protocol: {}", v.reason);
                    self.upstream_failed(
                        ctx,
                        &detail,
                        Some(Some((frames::CLOSE_PROTOCOL, String::new()))),
                    );
                    return;
                }
                Next::Control { len, control } => {
                    up.read_buf.advance(len);
                    match control {
                        Control::Ping(payload) => {
                            // A plugin that pings while not reading gets no
                            // pong: the buffer bound holds.
                            if up.write_buf.len() < UPSTREAM_BUFFER_BYTES {
                                let mut pong = Vec::with_capacity(6 + payload.len());
                                frames::client_frame(
                                    &mut pong,
                                    frames::OP_PONG,
                                    &payload,
                                    mask_key(),
                                );
                                up.write_buf.extend_from_slice(&pong);
                            }
                        }
                        Control::Pong => {}
                        Control::Close(close) => {
                            let close =
                                close.filter(|(code, _)| frames::receivable_close_code(*code));
                            // Answer the plugin's close with the same code.
                            self.finish(ctx, "plugin closed", Some(close.clone()), Some(close));
                            return;
                        }
                    }
                }
            }
        }
    }

    /// Reads from the client once and queues the whole frames read for the plugin.
    fn read_client(&mut self, ctx: &mut Context<Self>, cx: &mut TaskContext<'_>) -> bool {
        let Some(input) = self.client_in.as_mut() else {
            return false;
        };
        let chunk = match Pin::new(input).poll_next(cx) {
            Poll::Pending => return false,
            Poll::Ready(Some(Ok(chunk))) => chunk,
            Poll::Ready(Some(Err(err))) => {
                tracing::debug!(actor = "PluginProxy", plugin = %self.name, error = %err, "client stream error");
                self.client_in = None;
                self.finish(ctx, "client disconnected", None, Some(going_away_close()));
                return false;
            }
            Poll::Ready(None) => {
                self.client_in = None;
                self.finish(ctx, "client disconnected", None, Some(going_away_close()));
                return false;
            }
        };
        if self.client_buf.is_empty() {
            // The usual case: whole frames in the chunk, relayed straight from it.
            let used = self.relay_client(ctx, &chunk);
            if !stopping(ctx) {
                self.client_buf.extend_from_slice(&chunk[used..]);
            }
        } else {
            self.client_buf.extend_from_slice(&chunk);
            let buf = std::mem::take(&mut self.client_buf);
            let used = self.relay_client(ctx, &buf);
            self.client_buf = buf;
            self.client_buf.advance(used);
        }
        true
    }

    /// Relays the whole frames at the head of `buf` from the client; returns
    /// how many bytes were consumed.
    fn relay_client(&mut self, ctx: &mut Context<Self>, buf: &[u8]) -> usize {
        let mut done = 0;
        loop {
            let mut relay = done;
            let next = loop {
                relay += self.client_scan.small_run(&buf[relay..]);
                match self.client_scan.next(&buf[relay..]) {
                    Next::Data(n) => relay += n,
                    other => break other,
                }
            };
            if relay > done {
                if let Some(up) = self.upstream.as_mut() {
                    up.write_buf.extend_from_slice(&buf[done..relay]);
                }
                done = relay;
            }
            match next {
                Next::Data(_) => unreachable!("consumed above"),
                Next::Partial => return done,
                Next::Fail(v) => {
                    self.client_failed(ctx, v);
                    return buf.len();
                }
                Next::Control { len, control } => {
                    done += len;
                    match control {
                        Control::Ping(payload) => {
                            let mut pong = Vec::with_capacity(2 + payload.len());
                            frames::server_frame(&mut pong, frames::OP_PONG, &payload);
                            self.queue_for_client(pong);
                        }
                        Control::Pong => self.hb.pong(),
                        Control::Close(close) => {
                            // Passed on to the plugin, and answered with the same code.
                            self.finish(ctx, "client closed", Some(close.clone()), Some(close));
                            return buf.len();
                        }
                    }
                }
            }
        }
    }
}

/// Runs for the life of the actor: moves bytes both ways.
struct Relay;

impl ActorFuture<PluginProxy> for Relay {
    type Output = ();

    fn poll(
        self: Pin<&mut Self>,
        act: &mut PluginProxy,
        ctx: &mut Context<PluginProxy>,
        task: &mut TaskContext<'_>,
    ) -> Poll<()> {
        act.relay(ctx, task)
    }
}

/// After the proxy stopped: writes what is left for the plugin (its close
/// frame last), then reads until the plugin's close reply or the end of the
/// connection, each for at most [`UPSTREAM_CLOSE_TIMEOUT`], so the plugin
/// sees a clean closing handshake and cannot keep the socket alive.
async fn linger(mut up: Upstream) {
    let written = tokio::time::timeout(UPSTREAM_CLOSE_TIMEOUT, async {
        up.io.write_all(&up.write_buf).await?;
        up.io.flush().await
    })
    .await;
    if !matches!(written, Ok(Ok(()))) {
        tracing::info!(
            actor = "PluginProxy",
            "plugin did not take the last frames in time; dropping its socket"
        );
        return;
    }
    let _ = tokio::time::timeout(UPSTREAM_CLOSE_TIMEOUT, async {
        loop {
            loop {
                match up.scan.next(&up.read_buf) {
                    Next::Data(n)
                    | Next::Control {
                        len: n,
                        control: Control::Ping(_) | Control::Pong,
                    } => {
                        up.read_buf.advance(n);
                    }
                    Next::Control {
                        control: Control::Close(_),
                        ..
                    }
                    | Next::Fail(_) => return,
                    Next::Partial => break,
                }
            }
            up.read_buf.reserve(READ_CHUNK);
            match futures_util::future::poll_fn(|cx| {
                tokio_util::io::poll_read_buf(Pin::new(&mut up.io), cx, &mut up.read_buf)
            })
            .await
            {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
}

/// A masking key for a frame of our own to the plugin.
fn mask_key() -> [u8; 4] {
    let id = uuid::Uuid::new_v4();
    let b = id.as_bytes();
    [b[0], b[1], b[2], b[3]]
}

/// Whether the proxy has begun to stop (its close frames may already be queued).
fn stopping(ctx: &Context<PluginProxy>) -> bool {
    matches!(ctx.state(), ActorState::Stopping | ActorState::Stopped)
}
