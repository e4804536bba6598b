//! WebSocket heartbeat shared by every socket actor: a ping every interval;
//! a socket that did not answer the previous ping is dropped.

use std::time::Duration;

use actix::{Actor, ActorContext, AsyncContext};
use actix_web_actors::ws::WebsocketContext;

/// Per-socket heartbeat state, a field of the socket actor.
#[derive(Debug, Default)]
pub struct Heartbeat {
    awaiting_pong: bool,
}

impl Heartbeat {
    /// Call on every pong (any pong counts, as in the reference).
    pub fn pong(&mut self) {
        self.awaiting_pong = false;
    }

    /// Starts the ping timer. `state` picks the actor's `Heartbeat` field.
    pub fn start<A>(
        ctx: &mut WebsocketContext<A>,
        interval: Duration,
        state: fn(&mut A) -> &mut Heartbeat,
        kind: &'static str,
    ) where
        A: Actor<Context = WebsocketContext<A>>,
    {
        ctx.run_interval(interval, move |act, ctx| {
            let hb = state(act);
            if hb.awaiting_pong {
                tracing::info!(
                    actor = kind,
                    reason = "heartbeat timeout",
                    "dropping socket that missed a ping"
                );
                ctx.stop();
                return;
            }
            hb.awaiting_pong = true;
            ctx.ping(b"");
        });
    }
}
