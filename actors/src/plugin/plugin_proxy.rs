//! `PluginProxy`: one `/plugin-ws/{name}` client socket relayed to its
//! plugin's server at `ws://127.0.0.1:<port>/ws` (PROTOCOL.md section 6).
//!
//! Owns: the client socket (its `WebsocketContext`), the read half of the
//! upstream socket, the sending end of the queue to the upstream writer task
//! and the byte budget of that queue, the heartbeat state.
//!
//! Handles: client frames (`StreamHandler`), upstream frames (polled by the
//! [`UpstreamPump`] future it runs), and [`UpstreamFailed`] from its writer
//! task.
//!
//! Sends: text, binary and continuation frames both ways unchanged and in
//! order; a close on either side closes the other with the same code when
//! that code may be sent (else without a code). An upstream that cannot be
//! reached, errors or ends without a close frame closes the client with 4502
//! "Upstream error". A client that disappears gets the upstream closed with
//! 1001.
//!
//! Refusals: an invalid name is accepted and closed with 4400 "Invalid plugin
//! name"; a plugin that is not running with 4404 "Plugin not running".
//!
//! Backpressure, per direction, with bounded memory:
//! - plugin → client: the HTTP layer polls this actor only while the
//!   client's write buffer has room, and the pump moves at most
//!   [`PUMP_FRAMES_PER_POLL`] frames / [`PUMP_BYTES_PER_POLL`] bytes per poll,
//!   so a slow client stops the reads from the plugin (TCP then slows it).
//! - client → plugin: frames go through a queue bounded by
//!   [`UPSTREAM_QUEUE_FRAMES`] and [`UPSTREAM_QUEUE_BYTES`] to a writer task
//!   that awaits the plugin's socket. When the queue is full the actor stops
//!   reading the client (`ctx.wait`) until there is room, and keeps relaying
//!   plugin frames meanwhile so an echoing plugin can never deadlock it.
//!
//! Stops: on a close from either side, an upstream error, the client's
//! stream ending, or a missed heartbeat.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use actix::fut::ActorFuture;
use actix::prelude::*;
use actix_http::ws::Item;
use actix_web::{web, HttpRequest, HttpResponse};
use actix_web_actors::ws::{self, CloseCode, CloseReason, WebsocketContext};
use awc::ws::Frame;
use bytestring::ByteString;
use futures_util::{Sink, SinkExt, Stream, StreamExt};
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};

use super::manifest::valid_name;
use super::plugin_registry::{LookupPort, PluginPort, PluginRegistry};
use crate::config::MAX_INBOUND_FRAME;
use crate::heartbeat::Heartbeat;
use crate::metrics::{note_close, Connection, Endpoint, PanicWatch};
use crate::watchdog::{Stalled, WatchedConn};

/// Close code for an invalid plugin name (PROTOCOL.md section 7).
pub const CLOSE_INVALID_NAME: u16 = 4400;
/// Close code for a plugin that is not running.
pub const CLOSE_NOT_RUNNING: u16 = 4404;
/// Close code for an upstream plugin error.
pub const CLOSE_UPSTREAM_ERROR: u16 = 4502;
/// How long connecting and the upstream handshake may take.
pub const UPSTREAM_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// After the proxy stopped: how long the last queued frames and the close
/// frame may take to reach the plugin, and then how long its close reply may take.
pub const UPSTREAM_CLOSE_TIMEOUT: Duration = Duration::from_secs(2);
/// Most frames queued towards the plugin; when full, client reads pause.
pub const UPSTREAM_QUEUE_FRAMES: usize = 256;
/// Most bytes queued towards the plugin; when full, client reads pause. A
/// larger frame takes the whole budget, so it waits for an empty queue.
pub const UPSTREAM_QUEUE_BYTES: u32 = 1024 * 1024;
/// What an empty or tiny frame costs in the byte budget, so the byte bound
/// also bounds the count.
const MIN_FRAME_COST: u32 = 64;
/// Plugin frames moved to the client per poll before yielding to the HTTP
/// layer (which then writes them out and decides whether to poll again).
pub const PUMP_FRAMES_PER_POLL: usize = 64;
/// Plugin bytes moved to the client per poll before yielding.
pub const PUMP_BYTES_PER_POLL: usize = 256 * 1024;

/// The read half of the plugin socket.
type UpstreamFrames = Pin<Box<dyn Stream<Item = Result<Frame, ws::ProtocolError>>>>;

/// What the upgrade route decided before the socket was accepted.
#[derive(Debug)]
enum Target {
    Refuse(u16, &'static str),
    Upstream(PluginPort),
}

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
) -> Result<HttpResponse, actix_web::Error>
where
    S: futures_util::Stream<Item = Result<web::Bytes, actix_web::error::PayloadError>> + 'static,
{
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
    let proxy = PluginProxy {
        name: name.to_string(),
        target: Some(target),
        heartbeat,
        hb: Heartbeat::default(),
        upstream: None,
        to_upstream: None,
        close_upstream: None,
        handback: None,
        budget: Arc::new(Semaphore::new(UPSTREAM_QUEUE_BYTES as usize)),
        stop_reason: "client closed",
        conn,
        metric: None,
        _panics: PanicWatch::new("PluginProxy", format!("plugin={name}")),
    };
    ws::WsResponseBuilder::new(proxy, req, stream)
        .frame_size(MAX_INBOUND_FRAME)
        .start()
}

/// A frame for the plugin plus its share of the queue's byte budget,
/// returned when the writer has handed the frame to the socket.
struct Outgoing {
    msg: ws::Message,
    _budget: OwnedSemaphorePermit,
}

/// Sent by the writer task when writing to the plugin failed.
#[derive(Message, Debug)]
#[rtype(result = "()")]
struct UpstreamFailed(String);

pub struct PluginProxy {
    name: String,
    /// Taken in `started()`.
    target: Option<Target>,
    heartbeat: Duration,
    hb: Heartbeat,
    /// Read half of the plugin socket; `None` before connecting and after it ended.
    upstream: Option<UpstreamFrames>,
    /// Queue to the writer task; dropping it lets the writer finish and close.
    to_upstream: Option<mpsc::Sender<Outgoing>>,
    /// The close frame the writer sends after the queue (1001 if dropped unsent).
    close_upstream: Option<oneshot::Sender<Option<CloseReason>>>,
    /// Gives the read half to the writer task when the actor stops.
    handback: Option<oneshot::Sender<Option<UpstreamFrames>>>,
    /// Byte budget of the queue to the writer.
    budget: Arc<Semaphore>,
    /// For the supervision log line in `stopped()`.
    stop_reason: &'static str,
    /// The client's connection, watched for a client that stopped reading.
    conn: Option<WatchedConn>,
    /// Counted in `agentgate_connections_*` while the actor lives.
    metric: Option<Connection>,
    _panics: PanicWatch,
}

impl Actor for PluginProxy {
    type Context = WebsocketContext<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        self.metric = Some(Connection::open(Endpoint::Plugin));
        let plugin = match self.target.take() {
            None => return,
            Some(Target::Refuse(code, reason)) => {
                self.stop_reason = reason;
                let reason = Some(CloseReason {
                    code: CloseCode::Other(code),
                    description: Some(reason.to_string()),
                });
                note_close(&mut self.metric, &reason);
                ctx.close(reason);
                ctx.stop();
                return;
            }
            Some(Target::Upstream(plugin)) => plugin,
        };
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
        Heartbeat::start(ctx, self.heartbeat, |a: &mut Self| &mut a.hb, "PluginProxy");
        let url = format!("ws://127.0.0.1:{port}/ws");
        // Waiting here (not spawning) keeps client frames unread until the
        // plugin socket exists, so nothing is buffered or reordered meanwhile.
        ctx.wait(
            async move {
                awc::Client::builder()
                    .timeout(UPSTREAM_CONNECT_TIMEOUT)
                    .finish()
                    .ws(url)
                    .max_frame_size(MAX_INBOUND_FRAME)
                    .connect()
                    .await
            }
            .into_actor(self)
            .map(|res, act, ctx| match res {
                Ok((_response, framed)) => act.attach(framed, ctx),
                Err(err) => act.upstream_failed(&format!("connect failed: {err}"), ctx),
            }),
        );
    }

    fn stopped(&mut self, _ctx: &mut Self::Context) {
        // The writer task reads the plugin's close reply on the read half
        // before dropping the socket (bounded by UPSTREAM_CLOSE_TIMEOUT).
        if let Some(handback) = self.handback.take() {
            let _ = handback.send(self.upstream.take());
        }
        tracing::info!(event = "actor.stopped", actor = "PluginProxy", plugin = %self.name, reason = self.stop_reason, "actor stopped");
    }
}

impl Handler<Stalled> for PluginProxy {
    type Result = ();

    fn handle(&mut self, _: Stalled, ctx: &mut Self::Context) {
        if stopping(ctx) {
            return;
        }
        self.stop_reason = "slow consumer";
        self.finish_upstream(None);
        let reason = Some(CloseReason {
            code: CloseCode::Other(4008),
            description: Some("slow consumer".to_string()),
        });
        note_close(&mut self.metric, &reason);
        ctx.close(reason);
        ctx.stop();
    }
}

impl PluginProxy {
    /// Splits the plugin socket: the write half goes to a writer task, the
    /// read half is polled by the pump.
    fn attach<S>(&mut self, framed: S, ctx: &mut WebsocketContext<Self>)
    where
        S: Stream<Item = Result<Frame, ws::ProtocolError>>
            + Sink<ws::Message, Error = ws::ProtocolError>
            + 'static,
    {
        let (sink, stream) = framed.split();
        let (tx, rx) = mpsc::channel(UPSTREAM_QUEUE_FRAMES);
        let (close_tx, close_rx) = oneshot::channel();
        let (handback_tx, handback_rx) = oneshot::channel();
        let ends = WriterEnds {
            queue: rx,
            close: close_rx,
            handback: handback_rx,
        };
        actix::spawn(write_upstream(sink, ends, ctx.address()));
        self.upstream = Some(Box::pin(stream));
        self.to_upstream = Some(tx);
        self.close_upstream = Some(close_tx);
        self.handback = Some(handback_tx);
        ctx.spawn(UpstreamPump);
    }

    /// The plugin is being stopped on purpose: both sides get 1001.
    fn plugin_stopping(&mut self, ctx: &mut WebsocketContext<Self>) {
        if stopping(ctx) {
            return;
        }
        self.stop_reason = "plugin stopping";
        self.finish_upstream(Some(Some(CloseCode::Away.into())));
        let reason = Some(CloseReason {
            code: CloseCode::Away,
            description: Some("Plugin stopping".to_string()),
        });
        note_close(&mut self.metric, &reason);
        ctx.close(reason);
        ctx.stop();
    }

    /// Closes the client with 4502 and lets the writer close the plugin side.
    fn upstream_failed(&mut self, detail: &str, ctx: &mut WebsocketContext<Self>) {
        if stopping(ctx) {
            return;
        }
        tracing::warn!(actor = "PluginProxy", plugin = %self.name, error = %detail, "upstream error");
        self.stop_reason = "upstream error";
        self.upstream = None;
        self.finish_upstream(None);
        let reason = Some(CloseReason {
            code: CloseCode::Other(CLOSE_UPSTREAM_ERROR),
            description: Some("Upstream error".to_string()),
        });
        note_close(&mut self.metric, &reason);
        ctx.close(reason);
        ctx.stop();
    }

    /// Ends the queue to the plugin: the writer sends what is queued, then
    /// the close frame `close` (1001 when `None`: the client went away).
    fn finish_upstream(&mut self, close: Option<Option<CloseReason>>) {
        if let (Some(tx), Some(close)) = (self.close_upstream.take(), close) {
            let _ = tx.send(close);
        }
        self.close_upstream = None;
        self.to_upstream = None;
    }

    /// Queues a client frame for the plugin. When the queue is full, stops
    /// reading the client until there is room (plugin frames keep flowing).
    fn forward(&mut self, msg: ws::Message, ctx: &mut WebsocketContext<Self>) {
        let Some(tx) = &self.to_upstream else {
            return;
        };
        let cost = frame_cost(&msg);
        let msg = match self.budget.clone().try_acquire_many_owned(cost) {
            Ok(permit) => match tx.try_send(Outgoing {
                msg,
                _budget: permit,
            }) {
                Ok(()) => return,
                // The writer ended: it reports why with UpstreamFailed.
                Err(mpsc::error::TrySendError::Closed(_)) => return,
                Err(mpsc::error::TrySendError::Full(out)) => out.msg,
            },
            Err(_) => msg,
        };
        let budget = self.budget.clone();
        let tx = tx.clone();
        let room = async move {
            let permit = budget.acquire_many_owned(cost).await.ok()?;
            let slot = tx.reserve_owned().await.ok()?;
            slot.send(Outgoing {
                msg,
                _budget: permit,
            });
            Some(())
        };
        ctx.wait(WaitForRoom {
            room: Box::pin(room),
        });
    }

    /// Moves plugin frames to the client: until the plugin has nothing more
    /// ready, or the per-poll limits are reached (then it wakes itself to
    /// continue after the HTTP layer has written). Ready when the upstream is gone.
    fn pump(&mut self, ctx: &mut WebsocketContext<Self>, task: &mut TaskContext<'_>) -> Poll<()> {
        let mut frames = 0;
        let mut bytes = 0;
        loop {
            // Nothing may follow the close frame; the read half now belongs
            // to the writer task (handed back in `stopped()`).
            if stopping(ctx) {
                return Poll::Ready(());
            }
            let Some(upstream) = self.upstream.as_mut() else {
                return Poll::Ready(());
            };
            match upstream.as_mut().poll_next(task) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Ok(frame))) => {
                    bytes += frame_len(&frame);
                    self.on_upstream_frame(frame, ctx);
                }
                Poll::Ready(Some(Err(err))) => {
                    self.upstream_failed(&format!("read failed: {err}"), ctx);
                    return Poll::Ready(());
                }
                Poll::Ready(None) => {
                    self.upstream_failed("plugin closed the connection without a close frame", ctx);
                    return Poll::Ready(());
                }
            }
            frames += 1;
            if frames >= PUMP_FRAMES_PER_POLL || bytes >= PUMP_BYTES_PER_POLL {
                task.waker().wake_by_ref();
                return Poll::Pending;
            }
        }
    }

    fn on_upstream_frame(&mut self, frame: Frame, ctx: &mut WebsocketContext<Self>) {
        match frame {
            Frame::Text(bytes) => match ByteString::try_from(bytes) {
                Ok(text) => ctx.text(text),
                Err(_) => self.upstream_failed("plugin sent a text frame that is not UTF-8", ctx),
            },
            Frame::Binary(bytes) => ctx.binary(bytes),
            Frame::Continuation(item) => ctx.write_raw(ws::Message::Continuation(item)),
            Frame::Ping(payload) => {
                // A pong is tiny; if the queue is full the plugin is not
                // reading anyway, so dropping this one pong loses nothing.
                if let Some(tx) = &self.to_upstream {
                    if let Ok(permit) = self.budget.clone().try_acquire_many_owned(MIN_FRAME_COST) {
                        let _ = tx.try_send(Outgoing {
                            msg: ws::Message::Pong(payload),
                            _budget: permit,
                        });
                    }
                }
            }
            Frame::Pong(_) => {}
            Frame::Close(reason) => {
                self.stop_reason = "plugin closed";
                let reason = sendable(reason);
                self.upstream = None;
                // Answer the plugin's close with the same code.
                self.finish_upstream(Some(reason.clone()));
                note_close(&mut self.metric, &reason);
                ctx.close(reason);
                ctx.stop();
            }
        }
    }
}

impl StreamHandler<Result<ws::Message, ws::ProtocolError>> for PluginProxy {
    fn handle(&mut self, msg: Result<ws::Message, ws::ProtocolError>, ctx: &mut Self::Context) {
        if stopping(ctx) {
            return;
        }
        match msg {
            Ok(
                msg
                @ (ws::Message::Text(_) | ws::Message::Binary(_) | ws::Message::Continuation(_)),
            ) => self.forward(msg, ctx),
            Ok(ws::Message::Ping(payload)) => ctx.pong(&payload),
            Ok(ws::Message::Pong(_)) => self.hb.pong(),
            Ok(ws::Message::Close(reason)) => {
                self.stop_reason = "client closed";
                let reason = sendable(reason);
                self.finish_upstream(Some(reason.clone()));
                note_close(&mut self.metric, &reason);
                ctx.close(reason);
                ctx.stop();
            }
            Ok(ws::Message::Nop) => {}
            Err(err) => {
                let (code, text) = match err {
                    ws::ProtocolError::Overflow => (CloseCode::Size, "Frame too large"),
                    _ => (CloseCode::Protocol, "Protocol error"),
                };
                tracing::info!(actor = "PluginProxy", plugin = %self.name, error = %err, "client protocol error");
                self.stop_reason = text;
                self.finish_upstream(Some(Some(CloseReason {
                    code: CloseCode::Away,
                    description: None,
                })));
                let reason = Some(CloseReason {
                    code,
                    description: Some(text.to_string()),
                });
                note_close(&mut self.metric, &reason);
                ctx.close(reason);
                ctx.stop();
            }
        }
    }

    fn finished(&mut self, ctx: &mut Self::Context) {
        if !stopping(ctx) {
            self.stop_reason = "client disconnected";
        }
        ctx.stop();
    }
}

impl Handler<UpstreamFailed> for PluginProxy {
    type Result = ();

    fn handle(&mut self, msg: UpstreamFailed, ctx: &mut Self::Context) {
        if self.to_upstream.is_some() {
            self.upstream_failed(&format!("write failed: {}", msg.0), ctx);
        }
    }
}

/// Runs for the life of the actor: relays plugin frames to the client.
struct UpstreamPump;

impl ActorFuture<PluginProxy> for UpstreamPump {
    type Output = ();

    fn poll(
        self: Pin<&mut Self>,
        act: &mut PluginProxy,
        ctx: &mut WebsocketContext<PluginProxy>,
        task: &mut TaskContext<'_>,
    ) -> Poll<()> {
        act.pump(ctx, task)
    }
}

/// Pauses the actor (so client frames stay unread) until a client frame fits
/// into the queue to the plugin. Relays plugin frames while it waits: the
/// actor's other futures do not run during a `ctx.wait`.
struct WaitForRoom {
    room: Pin<Box<dyn std::future::Future<Output = Option<()>>>>,
}

impl ActorFuture<PluginProxy> for WaitForRoom {
    type Output = ();

    fn poll(
        self: Pin<&mut Self>,
        act: &mut PluginProxy,
        ctx: &mut WebsocketContext<PluginProxy>,
        task: &mut TaskContext<'_>,
    ) -> Poll<()> {
        let this = self.get_mut();
        if act.pump(ctx, task).is_ready() && act.upstream.is_none() {
            // Upstream gone (the actor is stopping): stop waiting.
            return Poll::Ready(());
        }
        // `None`: the writer ended; it reports the failure itself.
        this.room.as_mut().poll(task).map(|_| ())
    }
}

/// The writer task's ends of its channels from the proxy.
struct WriterEnds {
    /// Frames for the plugin; ends when the proxy drops its sender.
    queue: mpsc::Receiver<Outgoing>,
    /// The close frame to send after the queue; dropped unsent means 1001.
    close: oneshot::Receiver<Option<CloseReason>>,
    /// The read half, handed back when the proxy actor stops.
    handback: oneshot::Receiver<Option<UpstreamFrames>>,
}

/// Writes queued frames to the plugin (batching what is already queued into
/// one flush), then the close frame; then waits for the plugin's close reply
/// on the read half before the socket is dropped, so the plugin sees a clean
/// closing handshake. Once the proxy has stopped, every step is bounded by
/// [`UPSTREAM_CLOSE_TIMEOUT`]: a plugin that stopped reading cannot keep this
/// task (or the socket) alive. Reports a write error to the proxy.
async fn write_upstream<S>(mut sink: S, ends: WriterEnds, proxy: Addr<PluginProxy>)
where
    S: Sink<ws::Message, Error = ws::ProtocolError> + Unpin,
{
    let WriterEnds {
        mut queue,
        close,
        handback,
    } = ends;
    let write = async {
        while let Some(out) = queue.recv().await {
            sink.feed(out.msg).await?;
            while let Ok(out) = queue.try_recv() {
                sink.feed(out.msg).await?;
            }
            sink.flush().await?;
        }
        let close = close.await.unwrap_or(Some(CloseReason {
            code: CloseCode::Away,
            description: None,
        }));
        sink.send(ws::Message::Close(close)).await
    };
    let mut write = std::pin::pin!(write);
    let mut handback = std::pin::pin!(async { handback.await.ok().flatten() });
    let written = tokio::select! {
        written = &mut write => written,
        read_half = &mut handback => {
            // The proxy stopped while frames were still on their way.
            match tokio::time::timeout(UPSTREAM_CLOSE_TIMEOUT, &mut write).await {
                Ok(written) => {
                    report(&proxy, written);
                    linger(read_half).await;
                }
                Err(_) => tracing::info!(actor = "PluginProxy", "plugin did not take the last frames in time; dropping its socket"),
            }
            return;
        }
    };
    report(&proxy, written);
    // The queue ends only when the proxy is stopping, so this resolves soon.
    let read_half = handback.await;
    linger(read_half).await;
}

fn report(proxy: &Addr<PluginProxy>, written: Result<(), ws::ProtocolError>) {
    if let Err(err) = written {
        proxy.do_send(UpstreamFailed(err.to_string()));
    }
}

/// Reads (and drops) plugin frames until its close reply or the end of the
/// connection, for at most [`UPSTREAM_CLOSE_TIMEOUT`].
async fn linger(read_half: Option<UpstreamFrames>) {
    let Some(mut frames) = read_half else {
        return;
    };
    let _ = tokio::time::timeout(UPSTREAM_CLOSE_TIMEOUT, async {
        while let Some(Ok(frame)) = frames.next().await {
            if matches!(frame, Frame::Close(_)) {
                return;
            }
        }
    })
    .await;
}

/// Whether the proxy has begun to stop (its close frame may already be queued).
fn stopping(ctx: &WebsocketContext<PluginProxy>) -> bool {
    matches!(ctx.state(), ActorState::Stopping | ActorState::Stopped)
}

/// The close reason to pass on: codes an endpoint may send are kept
/// (1000-1003, 1007-1014, 3000-4999); reserved ones (1005, 1006, 1015, ...)
/// become a close without a code.
fn sendable(reason: Option<CloseReason>) -> Option<CloseReason> {
    let reason = reason?;
    let code = u16::from(reason.code);
    let ok = matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999);
    ok.then_some(reason)
}

fn frame_len(frame: &Frame) -> usize {
    match frame {
        Frame::Text(b) | Frame::Binary(b) | Frame::Ping(b) | Frame::Pong(b) => b.len(),
        Frame::Continuation(
            Item::FirstText(b) | Item::FirstBinary(b) | Item::Continue(b) | Item::Last(b),
        ) => b.len(),
        Frame::Close(_) => 0,
    }
}

/// The budget a client frame takes while queued.
fn frame_cost(msg: &ws::Message) -> u32 {
    let len = match msg {
        ws::Message::Text(t) => t.len(),
        ws::Message::Binary(b) | ws::Message::Ping(b) | ws::Message::Pong(b) => b.len(),
        ws::Message::Continuation(
            Item::FirstText(b) | Item::FirstBinary(b) | Item::Continue(b) | Item::Last(b),
        ) => b.len(),
        ws::Message::Close(_) | ws::Message::Nop => 0,
    };
    u32::try_from(len)
        .unwrap_or(u32::MAX)
        .clamp(MIN_FRAME_COST, UPSTREAM_QUEUE_BYTES)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_codes_pass_through_only_when_sendable() {
        let r = |code: u16| {
            Some(CloseReason {
                code: CloseCode::from(code),
                description: Some("why".into()),
            })
        };
        for code in [1000, 1001, 1008, 1011, 3000, 4000, 4999] {
            assert_eq!(sendable(r(code)), r(code), "{code}");
        }
        for code in [0, 999, 1004, 1005, 1006, 1015, 2000, 5000] {
            assert_eq!(sendable(r(code)), None, "{code}");
        }
        assert_eq!(sendable(None), None);
    }

    #[test]
    fn frame_cost_is_bounded_both_ways() {
        assert_eq!(frame_cost(&ws::Message::Text("".into())), MIN_FRAME_COST);
        assert_eq!(
            frame_cost(&ws::Message::Binary(vec![0u8; 1000].into())),
            1000
        );
        assert_eq!(
            frame_cost(&ws::Message::Binary(vec![0u8; 4 << 20].into())),
            UPSTREAM_QUEUE_BYTES
        );
    }
}
