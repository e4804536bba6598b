//! `RemoteSocket`: one WebSocket of Claude Code's remote-session client
//! (`/v1/sessions/ws/{id}/subscribe`), following one session.
//!
//! **Owns** the WebSocket, its heartbeat, the follower's [`Follow`] state
//! (renderer) and its backlog of rendered frames.
//!
//! **Handles** client frames ([`Inbound`]: `control_response` answers a
//! permission, `control_request` `interrupt` aborts the run), [`Deliver`]
//! (the run's `/ws` frames, rendered to SDK messages here) and
//! [`CloseSocket`].
//!
//! **Sends** [`Connect`], [`Subscribe`] (`follow`), [`RespondPermission`],
//! [`AbortRun`], [`Disconnect`] to the RunRegistry; [`Claim`] when it opens
//! and [`Leave`] when it closes to [`Followers`](super::followers::Followers).
//! A `keep_alive` every [`KEEP_ALIVE_EVERY`] while a turn is silent.
//!
//! **Bounds**: like a chat socket, it is one subscriber of the registry's
//! delivery budget: each delivered batch is rendered, and reported
//! [`Drained`] once its rendered frames are written, so the registry sends no
//! faster than this client reads (and pauses the run, or closes the socket
//! with 4008, as for any subscriber). Rendered frames wait in a backlog
//! written at most [`WRITE_BYTES_PER_POLL`] per poll; above
//! [`BACKLOG_MAX_BYTES`] (a bug guard) the socket closes with 4008. A client
//! that stops reading altogether is cut off by the connection watchdog.
//!
//! **Stops** on client close, heartbeat timeout, [`CloseSocket`] (1001 at
//! shutdown), or the token's expiry (4003, which the client takes as final).

use std::collections::VecDeque;
use std::time::Instant;

use actix::prelude::*;
use actix_web_actors::ws;
use bytestring::ByteString;
use serde_json::Value;

use super::followers::{Claim, Leave, ResumePoint};
use super::sdk::{control_response, error_message, Inbound};
use super::{guard_token, Follow, RemoteDeps, Target, KEEP_ALIVE_EVERY};
use crate::chat::run_registry::{
    AbortRun, CloseSocket, Connect, Deliver, Disconnect, Drained, RespondPermission, SocketId,
    Subscribe,
};
use crate::heartbeat::Heartbeat;
use crate::metrics::{metrics, note_close, Connection, Endpoint, PanicWatch};
use crate::protocol::frame_of;
use crate::watchdog::{Stalled, WatchedConn};
use crate::write_pump::{Backlog, WritePump};

/// Deliveries queued before the registry counts the socket as a slow consumer.
pub const MAILBOX_CAPACITY: usize = 256;
/// Rendered bytes one socket may hold unwritten; more closes it with 4008.
pub const BACKLOG_MAX_BYTES: usize = 16 * 1024 * 1024;
/// Frame bytes handed to the WebSocket encoder per poll.
pub const WRITE_BYTES_PER_POLL: usize = 64 * 1024;

pub struct RemoteSocket {
    deps: RemoteDeps,
    target: Target,
    follow: Follow,
    hb: Heartbeat,
    id: Option<SocketId>,
    /// Rendered frames not yet written, each with what writing it tells and
    /// the registry bytes it finishes (reported [`Drained`] when written).
    backlog: VecDeque<(Mark, ByteString, Option<Drains>)>,
    backlog_bytes: usize,
    /// Where a reconnecting client must continue (left in `Followers` on close).
    resume: Option<ResumePoint>,
    last_write: Instant,
    /// This socket's connection, watched for a client that stopped reading.
    conn: Option<WatchedConn>,
    /// Counted in `agentgate_connections_*` while the actor lives.
    metric: Option<Connection>,
    _panics: PanicWatch,
}

/// Registry bytes and deliveries a written frame finishes (reported [`Drained`]).
type Drains = (usize, usize);

/// What writing a backlog frame tells about the client.
enum Mark {
    Nothing,
    /// It needs everything after this seq.
    Resume(u64),
    /// It has this run's `init`.
    Init(String),
}

impl RemoteSocket {
    pub fn new(deps: RemoteDeps, target: Target) -> Self {
        RemoteSocket {
            follow: Follow::new(&target),
            deps,
            target,
            hb: Heartbeat::default(),
            id: None,
            backlog: VecDeque::new(),
            backlog_bytes: 0,
            resume: None,
            last_write: Instant::now(),
            conn: None,
            metric: None,
            _panics: PanicWatch::new("RemoteSocket", ""),
        }
    }

    /// Lets the connection watchdog cut off this socket when its client stops reading.
    pub fn watched(mut self, conn: Option<WatchedConn>) -> Self {
        self.conn = conn;
        self
    }

    /// Returns budget to the registry: `bytes` of `batches` deliveries are written.
    fn drained(&self, (bytes, batches): Drains) {
        if let Some(socket) = self.id {
            self.deps.registry.do_send(Drained {
                socket,
                bytes,
                batches,
            });
        }
    }

    fn queue(&mut self, mark: Mark, message: &Value) {
        let frame = frame_of(message);
        self.backlog_bytes += frame.len();
        self.backlog.push_back((mark, frame, None));
    }

    /// Writes backlog frames until `budget` bytes; true when frames remain.
    fn write_backlog(&mut self, budget: usize, ctx: &mut ws::WebsocketContext<Self>) -> bool {
        let mut written = 0;
        while written < budget {
            let Some((mark, frame, drains)) = self.backlog.pop_front() else {
                metrics().sent(Endpoint::Remote, written);
                return false;
            };
            if let Some(bytes) = drains {
                self.drained(bytes);
            }
            written += frame.len();
            self.backlog_bytes = self.backlog_bytes.saturating_sub(frame.len());
            ctx.text(frame);
            let point = self.resume.get_or_insert(ResumePoint {
                after: 0,
                init_of: None,
            });
            match mark {
                Mark::Nothing => {}
                Mark::Resume(after) => point.after = after,
                Mark::Init(run_id) => point.init_of = Some(run_id),
            }
            self.last_write = Instant::now();
        }
        metrics().sent(Endpoint::Remote, written);
        !self.backlog.is_empty()
    }

    fn close(&mut self, code: u16, reason: &str, ctx: &mut ws::WebsocketContext<Self>) {
        if code == 4008 {
            // Its client resumes from what was written; the rest would only pile up.
            self.backlog.clear();
            self.backlog_bytes = 0;
        } else {
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

    fn reply(&mut self, message: Value, ctx: &mut ws::WebsocketContext<Self>) {
        self.queue(Mark::Nothing, &message);
        self.write_backlog(WRITE_BYTES_PER_POLL, ctx);
    }

    fn on_text(&mut self, text: &str, ctx: &mut ws::WebsocketContext<Self>) {
        let parsed = serde_json::from_str::<Value>(text)
            .map_err(|_| super::sdk::Refused("not JSON".into()))
            .and_then(|v| Inbound::parse(&v));
        let (user_id, session_id) = (self.target.user.id, self.target.session.id.clone());
        match parsed {
            Err(refused) => self.reply(error_message(&refused.0), ctx),
            Ok(Inbound::Ignored) => {}
            Ok(Inbound::User { .. }) => self.reply(
                error_message("user turns are sent with POST /v1/sessions/{id}/events"),
                ctx,
            ),
            Ok(Inbound::UnsupportedControl {
                request_id,
                subtype,
            }) => self.reply(
                control_response(
                    &request_id,
                    Some(&format!("Unsupported control request subtype: {subtype}")),
                ),
                ctx,
            ),
            // Same path as chat.permission-response: the first answer wins.
            Ok(Inbound::PermissionAnswer {
                request_id,
                decision,
            }) => self.deps.registry.do_send(RespondPermission {
                user_id,
                request_id,
                decision,
            }),
            Ok(Inbound::Interrupt { request_id }) => {
                let abort = self.deps.registry.send(AbortRun {
                    user_id,
                    session_id,
                });
                ctx.spawn(abort.into_actor(self).map(move |res, act, ctx| {
                    let error = match res {
                        Ok(Ok(())) => None,
                        Ok(Err(e)) => Some(e.message),
                        Err(e) => Some(e.to_string()),
                    };
                    act.reply(control_response(&request_id, error.as_deref()), ctx);
                }));
            }
        }
    }

    fn subscribe(&mut self, socket: SocketId, ctx: &mut ws::WebsocketContext<Self>) {
        let claim = self.deps.followers.send(Claim {
            user_id: self.target.user.id,
            session_id: self.target.session.id.clone(),
        });
        ctx.wait(claim.into_actor(self).map(move |claimed, act, _| {
            act.resume = claimed.ok().flatten();
            let last_seq = act.resume.as_ref().map(|p| p.after);
            act.deps.registry.do_send(Subscribe {
                socket,
                session: act.target.session.clone(),
                last_seq,
                follow: true,
            });
            tracing::info!(actor = "RemoteSocket", socket, session_id = %act.target.session.id, resumed_after = ?last_seq, "following");
        }));
    }
}

impl Actor for RemoteSocket {
    type Context = ws::WebsocketContext<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(MAILBOX_CAPACITY);
        self.metric = Some(Connection::open(Endpoint::Remote));
        ctx.spawn(WritePump(WRITE_BYTES_PER_POLL));
        if let Some(conn) = &mut self.conn {
            conn.watch("RemoteSocket", ctx.address().recipient());
        }
        Heartbeat::start(
            ctx,
            self.deps.heartbeat,
            |a: &mut Self| &mut a.hb,
            "RemoteSocket",
        );
        ctx.run_interval(KEEP_ALIVE_EVERY, |act, ctx| {
            if act.follow.processing && act.last_write.elapsed() >= KEEP_ALIVE_EVERY {
                act.reply(serde_json::json!({"type": "keep_alive"}), ctx);
            }
        });
        guard_token(
            ctx,
            &self.deps,
            &self.target,
            |act: &mut Self, ctx, reason| {
                tracing::info!(actor = "RemoteSocket", socket = ?act.id, reason, "closing socket with 4003");
                act.close(4003, reason, ctx);
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
                    tracing::info!(event = "actor.started", actor = "RemoteSocket", socket = id, user = %act.target.user.username, session_id = %act.target.session.id, "actor started");
                    act.subscribe(id, ctx);
                }
                Err(_) => {
                    tracing::error!(event = "actor.stopped", actor = "RemoteSocket", reason = "registry unavailable", "actor stopped");
                    ctx.stop();
                }
            })
            .wait(ctx);
    }

    fn stopped(&mut self, _: &mut Self::Context) {
        let Some(id) = self.id else {
            return;
        };
        self.deps.registry.do_send(Disconnect { socket: id });
        if let Some(point) = self.resume.take() {
            self.deps.followers.do_send(Leave {
                user_id: self.target.user.id,
                session_id: self.target.session.id.clone(),
                point,
            });
        }
        tracing::info!(event = "actor.stopped", reason = "stopped", actor = "RemoteSocket", socket = id, session_id = %self.target.session.id, resume = ?self.resume, "actor stopped");
    }
}

impl Handler<Deliver> for RemoteSocket {
    type Result = ();

    fn handle(&mut self, msg: Deliver, ctx: &mut Self::Context) {
        let mut rendered = Vec::new();
        let resume = &mut self.resume;
        self.follow
            .on_frames(&msg.0, &mut rendered, |ack, renderer, _| match resume {
                // A reconnect inside the run whose init it has: no second one.
                Some(point) => {
                    if ack.run_id.is_some() && point.init_of == ack.run_id {
                        if let Some(run_id) = &ack.run_id {
                            renderer.resume_in(run_id);
                        }
                    }
                }
                // A new follower that leaves before anything is written
                // resumes at the start of the run it was being sent.
                None => {
                    *resume = Some(ResumePoint {
                        after: match ack.run_first_seq {
                            Some(first) => first.saturating_sub(1).min(ack.last_seq),
                            None => ack.last_seq,
                        },
                        init_of: None,
                    })
                }
            });
        for r in rendered {
            let mark = match (r.seq, r.message["subtype"].as_str()) {
                (Some(seq), _) => Mark::Resume(self.follow.renderer.resume_point(seq)),
                (None, Some("init")) => {
                    Mark::Init(r.message["uuid"].as_str().unwrap_or_default().to_string())
                }
                (None, _) => Mark::Nothing,
            };
            self.queue(mark, &r.message);
        }
        // The batch is drained when its last rendered frame is written.
        let delivered: usize = msg.0.iter().map(|f| f.len()).sum();
        match self.backlog.back_mut() {
            Some((_, _, Some((bytes, batches)))) => {
                *bytes += delivered;
                *batches += 1;
            }
            Some((_, _, drains)) => *drains = Some((delivered, 1)),
            None => self.drained((delivered, 1)),
        }
        if self.backlog_bytes > BACKLOG_MAX_BYTES {
            tracing::warn!(actor = "RemoteSocket", socket = ?self.id, backlog_bytes = self.backlog_bytes, reason = "slow consumer", "closing socket with 4008");
            self.close(4008, "slow consumer", ctx);
        }
    }
}

impl Handler<Stalled> for RemoteSocket {
    type Result = ();

    fn handle(&mut self, _: Stalled, ctx: &mut Self::Context) {
        self.close(4008, "slow consumer", ctx);
    }
}

impl Handler<CloseSocket> for RemoteSocket {
    type Result = ();

    fn handle(&mut self, msg: CloseSocket, ctx: &mut Self::Context) {
        self.close(msg.code, msg.reason, ctx);
    }
}

impl Backlog for RemoteSocket {
    fn write_backlog(&mut self, budget: usize, ctx: &mut ws::WebsocketContext<Self>) -> bool {
        RemoteSocket::write_backlog(self, budget, ctx)
    }
}

impl StreamHandler<Result<ws::Message, ws::ProtocolError>> for RemoteSocket {
    fn handle(&mut self, item: Result<ws::Message, ws::ProtocolError>, ctx: &mut Self::Context) {
        match item {
            Ok(ws::Message::Text(text)) => self.on_text(&text, ctx),
            Ok(ws::Message::Binary(_)) | Ok(ws::Message::Continuation(_)) => {
                self.reply(error_message("only text frames are accepted"), ctx)
            }
            Ok(ws::Message::Ping(payload)) => {
                self.hb.pong();
                ctx.pong(&payload);
            }
            Ok(ws::Message::Pong(_)) => self.hb.pong(),
            Ok(ws::Message::Close(reason)) => {
                note_close(&mut self.metric, &reason);
                ctx.close(reason);
                ctx.stop();
            }
            Ok(ws::Message::Nop) => {}
            Err(ws::ProtocolError::Overflow) => self.close(1009, "frame too large", ctx),
            Err(err) => {
                tracing::debug!(actor = "RemoteSocket", %err, "protocol error; closing");
                let reason = Some(ws::CloseCode::Protocol.into());
                note_close(&mut self.metric, &reason);
                ctx.close(reason);
                ctx.stop();
            }
        }
    }
}
