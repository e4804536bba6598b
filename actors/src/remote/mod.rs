//! Remote sessions (PROTOCOL.md section 8, seed 001): Claude Code's
//! remote-session client following an agentgate session.
//!
//! A remote follower is one more subscriber of the session's RunRegistry run
//! (same seq, replay, fan-out, permissions and bounds as a `/ws` socket); it
//! sees the run as Claude stream-json messages ([`sdk`]) instead of `/ws`
//! envelopes. Two transports, one actor each:
//!
//! | actor | file | transport |
//! |---|---|---|
//! | [`RemoteSocket`](remote_socket::RemoteSocket) | [`remote_socket`] | WebSocket `/v1/sessions/ws/{id}/subscribe` (Claude Code 2.1.88 - 2.1.117 `--remote`) |
//! | [`EventStream`](event_stream::EventStream) | [`event_stream`] | SSE `/v1/code/sessions/{id}/events/stream` (2.1.118 and later, `--cloud`) |
//! | [`Followers`](followers::Followers) | [`followers`] | where closed sockets left off (the socket client sends no cursor) |
//!
//! What a follower is sent when it (re)connects:
//! - WebSocket, a new follower: the current run (or the last one, while the
//!   registry retains it) from its first event, rendered from a `system`
//!   `init`; then the session's next runs live.
//! - WebSocket, a reconnect (a socket of the same user and session closed
//!   within [`followers::RESUME_WINDOW`]): exactly what the closed socket had
//!   not written, from the start of a text block it was in the middle of. The
//!   client appends every message it gets, so this is what makes each message
//!   show once.
//! - SSE: after `Last-Event-ID` / `from_sequence_num` (the client's own
//!   cursor, agentgate's seq), or from the run's start when it is 0;
//!   `catch_up_truncated` when the replay buffer no longer reaches back.

pub mod event_stream;
pub mod followers;
pub mod remote_socket;
pub mod sdk;

use std::time::{Duration, SystemTime};

use actix::prelude::*;
use serde_json::Value;

use crate::chat::run_registry::RunRegistry;
use crate::protocol::Frame;
use crate::store::{SessionRow, Store};
use crate::AuthUser;
use sdk::{Rendered, Renderer};

/// A silent turn gets a `keep_alive` this often (the client reconnects
/// after 60 s without anything).
pub const KEEP_ALIVE_EVERY: Duration = Duration::from_secs(20);

/// The prefix of session ids as remote-session clients see them.
pub const SESSION_PREFIX: &str = "session_";

/// `session_<app id>`: the id remote clients know a session by.
pub fn remote_id(app_id: &str) -> String {
    format!("{SESSION_PREFIX}{app_id}")
}

/// The app id of a remote id (a bare app id is accepted as well).
pub fn app_id(remote_id: &str) -> &str {
    remote_id.strip_prefix(SESSION_PREFIX).unwrap_or(remote_id)
}

/// What a follower actor needs, built by the binary per request.
#[derive(Clone)]
pub struct RemoteDeps {
    pub registry: Addr<RunRegistry>,
    pub followers: Addr<followers::Followers>,
    /// Token versions (revocation) are read through it.
    pub store: Store,
    /// Ping interval; also how often a follower checks its token is not revoked.
    pub heartbeat: Duration,
}

/// The followed session, checked by the binary to belong to the user.
#[derive(Debug, Clone)]
pub struct Target {
    pub user: AuthUser,
    pub session: SessionRow,
    /// When the connection's token stops being valid (closed with 4003 then).
    pub token_expires: Option<SystemTime>,
    /// The token version the connection's token carries; a newer one in the
    /// database (`agentgate token --revoke`) closes it with 4003. `None`:
    /// platform mode, no token.
    pub token_version: Option<i64>,
}

/// Ends a follower when its token runs out or is revoked (see
/// [`TokenWatch`](crate::token_watch::TokenWatch)).
pub fn guard_token<A, C>(
    ctx: &mut C,
    deps: &RemoteDeps,
    target: &Target,
    end: fn(&mut A, &mut C, &'static str),
) where
    A: Actor<Context = C>,
    C: AsyncContext<A> + 'static,
{
    let watch = crate::token_watch::TokenWatch {
        user_id: target.user.id,
        expires: target.token_expires,
        version: target.token_version,
    };
    watch.start(ctx, &deps.store, deps.heartbeat, end);
}

/// The `chat_subscribed` ack the registry sends first.
#[derive(Debug, Default, Clone)]
pub struct Ack {
    pub is_processing: bool,
    pub run_id: Option<String>,
    pub run_first_seq: Option<u64>,
    pub replay_truncated: bool,
    pub last_seq: u64,
}

/// Rendering state shared by both transports.
pub struct Follow {
    pub renderer: Renderer,
    /// A run is running (keep-alives are sent while it is silent).
    pub processing: bool,
}

impl Follow {
    pub fn new(target: &Target) -> Follow {
        Follow {
            renderer: Renderer::new(
                remote_id(&target.session.id),
                target.session.project_path.clone(),
                None,
            ),
            processing: false,
        }
    }

    /// Renders a delivered batch. `on_ack` sees the registry's ack (it comes
    /// first, before the replay) and may set up the renderer for it.
    pub fn on_frames(
        &mut self,
        frames: &[Frame],
        out: &mut Vec<Rendered>,
        mut on_ack: impl FnMut(&Ack, &mut Renderer, &mut Vec<Rendered>),
    ) {
        for frame in frames {
            let Ok(value) = serde_json::from_str::<Value>(frame) else {
                continue;
            };
            match value.get("kind").and_then(Value::as_str) {
                Some("chat_subscribed") => {
                    let a = Ack {
                        is_processing: value["isProcessing"].as_bool().unwrap_or(false),
                        run_id: value["runId"].as_str().map(str::to_string),
                        run_first_seq: value["runFirstSeq"].as_u64(),
                        replay_truncated: value["replayTruncated"].as_bool().unwrap_or(false),
                        last_seq: value["lastSeq"].as_u64().unwrap_or(0),
                    };
                    self.processing = a.is_processing;
                    on_ack(&a, &mut self.renderer, out);
                }
                Some("complete") => {
                    self.renderer.render(&value, out);
                    self.processing = false;
                }
                Some(_) if value.get("seq").is_some() => {
                    self.processing = true;
                    self.renderer.render(&value, out);
                }
                // session_upserted, chat_accepted: nothing for these clients.
                _ => {}
            }
        }
    }
}
