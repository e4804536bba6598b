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
//! stalls this actor (actix-web stops polling it while its write buffer is
//! full), its mailbox fills, and the registry closes it with 4008.
//!
//! **Stops** on client close, heartbeat timeout, [`CloseSocket`], or a
//! protocol error; `stopped` tells the registry.

use std::time::Duration;

use actix::prelude::*;
use actix_web_actors::ws;
use serde_json::json;

use crate::heartbeat::Heartbeat;
use crate::protocol::{frame_of, now_iso, protocol_error, ChatError, ClientMessage, ErrorCode};
use crate::run_registry::{
    AbortRun, CloseSocket, Connect, Deliver, Disconnect, RespondPermission, RunRegistry, SocketId,
    StartRun, Subscribe,
};
use crate::store::{self, Store};
use crate::AuthUser;

/// Deliveries queued for one socket before it counts as a slow consumer.
pub const MAILBOX_CAPACITY: usize = 256;
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
}

impl ChatSocket {
    pub fn new(
        user: AuthUser,
        registry: Addr<RunRegistry>,
        store: Store,
        heartbeat_interval: Duration,
    ) -> Self {
        ChatSocket {
            user,
            registry,
            store,
            heartbeat_interval,
            hb: Heartbeat::default(),
            id: None,
            inflight: 0,
        }
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
            } => {
                let fut = async move {
                    let row = match store::owned_session(&store, &session_id, user_id).await {
                        Ok(Some(row)) => row,
                        Ok(None) => return Err((Self::not_found(), session_id)),
                        Err(e) => {
                            return Err((
                                ChatError::new(ErrorCode::InternalError, e.to_string()),
                                session_id,
                            ))
                        }
                    };
                    let start = StartRun {
                        socket,
                        user_id,
                        session: row,
                        content,
                        options,
                        client_request_id,
                    };
                    match registry.send(start).await {
                        Ok(Ok(())) => Ok(()),
                        Ok(Err(e)) => Err((e, session_id)),
                        Err(e) => Err((
                            ChatError::new(ErrorCode::InternalError, e.to_string()),
                            session_id,
                        )),
                    }
                };
                ctx.spawn(fut.into_actor(self).map(|res, act, ctx| {
                    act.inflight -= 1;
                    if let Err((err, sid)) = res {
                        Self::send_error(ctx, &err, Some(&sid));
                    }
                }));
            }
            ClientMessage::Abort { session_id } => {
                let fut = async move {
                    let res = registry
                        .send(AbortRun {
                            user_id,
                            session_id: session_id.clone(),
                        })
                        .await;
                    match res {
                        Ok(Ok(())) => Ok(()),
                        Ok(Err(e)) => Err((e, session_id)),
                        Err(e) => Err((
                            ChatError::new(ErrorCode::InternalError, e.to_string()),
                            session_id,
                        )),
                    }
                };
                ctx.spawn(fut.into_actor(self).map(|res, act, ctx| {
                    act.inflight -= 1;
                    if let Err((err, sid)) = res {
                        Self::send_error(ctx, &err, Some(&sid));
                    }
                }));
            }
            ClientMessage::Subscribe { sessions } => {
                // One after the other, so acks come back in the order asked.
                let fut = async move {
                    let mut missing = Vec::new();
                    for target in sessions {
                        match store::owned_session(&store, &target.session_id, user_id).await {
                            Ok(Some(row)) => {
                                let _ = registry
                                    .send(Subscribe {
                                        socket,
                                        session: row,
                                        last_seq: target.last_seq,
                                    })
                                    .await;
                            }
                            Ok(None) => missing.push((Self::not_found(), target.session_id)),
                            Err(e) => missing.push((
                                ChatError::new(ErrorCode::InternalError, e.to_string()),
                                target.session_id,
                            )),
                        }
                    }
                    missing
                };
                ctx.spawn(fut.into_actor(self).map(|missing, act, ctx| {
                    act.inflight -= 1;
                    for (err, sid) in missing {
                        Self::send_error(ctx, &err, Some(&sid));
                    }
                }));
            }
            ClientMessage::PermissionResponse {
                request_id,
                decision,
            } => {
                let answer = RespondPermission {
                    user_id,
                    request_id,
                    decision,
                };
                ctx.spawn(registry.send(answer).into_actor(self).map(|_, act, _| {
                    act.inflight -= 1;
                }));
            }
            ClientMessage::Ignored => self.inflight -= 1,
        }
    }
}

impl Actor for ChatSocket {
    type Context = ws::WebsocketContext<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(MAILBOX_CAPACITY);
        Heartbeat::start(
            ctx,
            self.heartbeat_interval,
            |a: &mut Self| &mut a.hb,
            "ChatSocket",
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
                    tracing::info!(actor = "ChatSocket", socket = id, user = %act.user.username, "actor started");
                }
                Err(_) => {
                    tracing::error!(actor = "ChatSocket", reason = "registry unavailable", "actor stopped");
                    ctx.stop();
                }
            })
            .wait(ctx);
    }

    fn stopped(&mut self, _: &mut Self::Context) {
        if let Some(id) = self.id {
            self.registry.do_send(Disconnect { socket: id });
            tracing::info!(actor = "ChatSocket", socket = id, user = %self.user.username, "actor stopped");
        }
    }
}

impl Handler<Deliver> for ChatSocket {
    type Result = ();

    fn handle(&mut self, msg: Deliver, ctx: &mut Self::Context) {
        for frame in msg.0.iter() {
            ctx.text(frame.clone());
        }
    }
}

impl Handler<CloseSocket> for ChatSocket {
    type Result = ();

    fn handle(&mut self, msg: CloseSocket, ctx: &mut Self::Context) {
        ctx.close(Some(ws::CloseReason {
            code: ws::CloseCode::from(msg.code),
            description: Some(msg.reason.to_string()),
        }));
        ctx.stop();
    }
}

impl StreamHandler<Result<ws::Message, ws::ProtocolError>> for ChatSocket {
    fn handle(&mut self, item: Result<ws::Message, ws::ProtocolError>, ctx: &mut Self::Context) {
        match item {
            Ok(ws::Message::Text(text)) => self.on_text(&text, ctx),
            Ok(ws::Message::Binary(_)) => Self::send_error(
                ctx,
                &ChatError::new(
                    ErrorCode::InvalidPayload,
                    "Invalid websocket payload: binary frames are not accepted",
                ),
                None,
            ),
            Ok(ws::Message::Continuation(_)) => Self::send_error(
                ctx,
                &ChatError::new(
                    ErrorCode::InvalidPayload,
                    "Invalid websocket payload: fragmented frames are not accepted",
                ),
                None,
            ),
            Ok(ws::Message::Ping(payload)) => {
                self.hb.pong();
                ctx.pong(&payload);
            }
            Ok(ws::Message::Pong(_)) => self.hb.pong(),
            Ok(ws::Message::Close(reason)) => {
                ctx.close(reason);
                ctx.stop();
            }
            Ok(ws::Message::Nop) => {}
            Err(ws::ProtocolError::Overflow) => {
                // Refused from the frame header; the payload is never buffered (E5).
                ctx.text(frame_of(&json!({
                    "kind": "protocol_error",
                    "code": ErrorCode::MessageTooLarge.as_str(),
                    "error": "Frame exceeds the 8 MiB limit",
                    "sessionId": null,
                    "timestamp": now_iso(),
                })));
                ctx.close(Some(ws::CloseReason {
                    code: ws::CloseCode::Size,
                    description: Some("frame too large".into()),
                }));
                ctx.stop();
            }
            Err(err) => {
                tracing::debug!(actor = "ChatSocket", %err, "protocol error; closing");
                ctx.close(Some(ws::CloseCode::Protocol.into()));
                ctx.stop();
            }
        }
    }
}
