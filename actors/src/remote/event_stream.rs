//! `EventStream`: one SSE stream of the remote-session client's second
//! generation (`GET /v1/code/sessions/{id}/events/stream`, Claude Code
//! 2.1.118 and later, `claude --cloud`), following one session.
//!
//! **Owns** the sending half of the response body (a bounded channel of
//! chunks) and the follower's [`Follow`] state.
//!
//! **Handles** [`Deliver`] (the run's `/ws` frames): each rendered message
//! becomes an `event: client_event` with `id:` and `sequence_num` = the
//! event's seq, or an `ephemeral_event` for stream deltas; and
//! [`CloseSocket`] (ends the stream).
//!
//! **Sends** [`Connect`], [`Subscribe`] (`follow`, after the client's
//! cursor), [`Disconnect`] to the RunRegistry. A heartbeat `ephemeral_event`
//! every [`HEARTBEAT_EVERY`] (the client redials a silent stream).
//!
//! **Bounds**: it is one subscriber of the registry's delivery budget: a
//! delivered batch is reported [`Drained`] once its chunk is in the body
//! channel ([`CHANNEL_CHUNKS`] chunks, one per batch), so the registry sends
//! no faster than the HTTP layer writes. While the channel is full the actor
//! waits for room, at most [`STALL_LIMIT`]; a client that reads nothing for
//! that long is dropped (the stream ends) and resumes from its
//! `Last-Event-ID`: nothing is lost while the registry retains the run.
//!
//! **Stops** when the client goes away (noticed at the next chunk or
//! heartbeat), at [`CloseSocket`], or when the token expires.

use actix::prelude::*;
use actix_web::web::Bytes;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::sdk::Rendered;
use super::{guard_token, Follow, RemoteDeps, Target};
use crate::chat::run_registry::{
    CloseSocket, Connect, Deliver, Disconnect, Drained, SocketId, Subscribe,
};
use crate::metrics::{metrics, Connection, Endpoint, PanicWatch};
use crate::protocol::now_iso;

/// Chunks of SSE text waiting for the HTTP layer.
pub const CHANNEL_CHUNKS: usize = 64;
/// Deliveries queued before the registry counts the stream as a slow consumer.
pub const MAILBOX_CAPACITY: usize = 256;
/// A heartbeat this often keeps the client's liveness timer from redialling.
pub const HEARTBEAT_EVERY: std::time::Duration = std::time::Duration::from_secs(15);
/// Longest wait for room in the body channel before the client counts as gone.
pub const STALL_LIMIT: std::time::Duration = std::time::Duration::from_secs(60);

pub struct EventStream {
    deps: RemoteDeps,
    target: Target,
    follow: Follow,
    /// The client's cursor: events after this seq (0: from the run's start).
    after: u64,
    tx: mpsc::Sender<Bytes>,
    id: Option<SocketId>,
    /// Counted in `agentgate_connections_*` while the actor lives.
    _metric: Option<Connection>,
    _panics: PanicWatch,
}

impl EventStream {
    /// The actor and the response body it feeds.
    pub fn new(
        deps: RemoteDeps,
        target: Target,
        after: u64,
    ) -> (EventStream, mpsc::Receiver<Bytes>) {
        let (tx, rx) = mpsc::channel(CHANNEL_CHUNKS);
        let stream = EventStream {
            follow: Follow::new(&target),
            deps,
            target,
            after,
            tx,
            id: None,
            _metric: None,
            _panics: PanicWatch::new("EventStream", ""),
        };
        (stream, rx)
    }

    /// Queues a chunk for the client, then reports `drains` (registry bytes
    /// of the batch it renders) to the registry. A full channel is waited on
    /// (nothing else is handled meanwhile) up to [`STALL_LIMIT`].
    fn push(&mut self, chunk: String, drains: Option<usize>, ctx: &mut Context<Self>) {
        if chunk.is_empty() {
            return self.drained(drains);
        }
        let chunk = Bytes::from(chunk);
        let len = chunk.len();
        let sent = match self.tx.try_send(chunk) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Closed(_)) => return ctx.stop(),
            Err(mpsc::error::TrySendError::Full(chunk)) => {
                let tx = self.tx.clone();
                let wait = async move { tokio::time::timeout(STALL_LIMIT, tx.send(chunk)).await };
                ctx.wait(wait.into_actor(self).map(move |res, act, ctx| match res {
                    Ok(Ok(())) => {
                        metrics().sent(Endpoint::RemoteSse, len);
                        act.drained(drains)
                    }
                    Ok(Err(_)) => ctx.stop(),
                    Err(_) => {
                        tracing::warn!(actor = "EventStream", socket = ?act.id, reason = "slow consumer", "ending the stream; the client resumes from its Last-Event-ID");
                        ctx.stop();
                    }
                }));
                false
            }
        };
        if sent {
            metrics().sent(Endpoint::RemoteSse, len);
            self.drained(drains);
        }
    }

    fn drained(&self, drains: Option<usize>) {
        if let (Some(socket), Some(bytes)) = (self.id, drains) {
            self.deps.registry.do_send(Drained {
                socket,
                bytes,
                batches: 1,
            });
        }
    }
}

/// One SSE event.
fn sse(out: &mut String, event: &str, id: Option<u64>, data: &Value) {
    out.push_str("event: ");
    out.push_str(event);
    out.push('\n');
    if let Some(id) = id {
        out.push_str(&format!("id: {id}\n"));
    }
    out.push_str("data: ");
    out.push_str(&data.to_string());
    out.push_str("\n\n");
}

fn write_rendered(out: &mut String, r: &Rendered) {
    if r.ephemeral {
        let data = json!({
            "event_type": r.message["type"],
            "payload": r.message,
        });
        sse(out, "ephemeral_event", None, &data);
        return;
    }
    let mut data = json!({
        "event_type": r.message["type"],
        "source": "worker",
        "created_at": now_iso(),
        "payload": r.message,
    });
    if let Some(seq) = r.seq {
        data["sequence_num"] = json!(seq);
    }
    sse(out, "client_event", r.seq, &data);
}

impl Actor for EventStream {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(MAILBOX_CAPACITY);
        self._metric = Some(Connection::open(Endpoint::RemoteSse));
        ctx.run_interval(HEARTBEAT_EVERY, |act, ctx| {
            let mut out = String::new();
            sse(
                &mut out,
                "ephemeral_event",
                None,
                &json!({"event_type": "heartbeat", "payload": {"type": "keep_alive"}}),
            );
            act.push(out, None, ctx);
        });
        guard_token(
            ctx,
            &self.deps,
            &self.target,
            |act: &mut Self, ctx, reason| {
                tracing::info!(actor = "EventStream", socket = ?act.id, reason, "ending the stream");
                ctx.stop();
            },
        );
        let connect = Connect {
            user_id: self.target.user.id,
            deliver: ctx.address().recipient(),
            close: ctx.address().recipient(),
        };
        self.deps
            .registry
            .send(connect)
            .into_actor(self)
            .map(|res, act, ctx| match res {
                Ok(id) => {
                    act.id = Some(id);
                    tracing::info!(event = "actor.started", actor = "EventStream", socket = id, user = %act.target.user.username, session_id = %act.target.session.id, after = act.after, "actor started");
                    act.deps.registry.do_send(Subscribe {
                        socket: id,
                        session: act.target.session.clone(),
                        last_seq: (act.after > 0).then_some(act.after),
                        follow: true,
                    });
                }
                Err(_) => {
                    tracing::error!(event = "actor.stopped", actor = "EventStream", reason = "registry unavailable", "actor stopped");
                    ctx.stop();
                }
            })
            .wait(ctx);
    }

    fn stopped(&mut self, _: &mut Self::Context) {
        if let Some(id) = self.id {
            self.deps.registry.do_send(Disconnect { socket: id });
            tracing::info!(event = "actor.stopped", reason = "stopped", actor = "EventStream", socket = id, session_id = %self.target.session.id, "actor stopped");
        }
    }
}

impl Handler<Deliver> for EventStream {
    type Result = ();

    fn handle(&mut self, msg: Deliver, ctx: &mut Self::Context) {
        let mut rendered = Vec::new();
        let after = self.after;
        let mut truncated = false;
        self.follow
            .on_frames(&msg.0, &mut rendered, |ack, renderer, _| {
                if after == 0 {
                    return;
                }
                let first = ack.run_first_seq.unwrap_or(ack.last_seq + 1);
                // The client had the run's start: no second init.
                if let Some(run_id) = ack.run_id.as_deref().filter(|_| after >= first) {
                    renderer.resume_in(run_id);
                }
                // Events after its cursor that the buffer no longer holds.
                truncated = ack.replay_truncated || (after + 1 < first && after < ack.last_seq);
            });
        let mut out = String::new();
        if truncated {
            sse(&mut out, "catch_up_truncated", None, &json!({}));
        }
        for r in &rendered {
            write_rendered(&mut out, r);
        }
        let delivered = msg.0.iter().map(|f| f.len()).sum();
        self.push(out, Some(delivered), ctx);
    }
}

impl Handler<CloseSocket> for EventStream {
    type Result = ();

    fn handle(&mut self, _: CloseSocket, ctx: &mut Self::Context) {
        ctx.stop();
    }
}
