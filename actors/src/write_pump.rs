//! The write pump of a socket actor that keeps a backlog of frames: it runs
//! for the life of the socket and hands at most a budget of bytes to the
//! WebSocket encoder per poll, waking itself while frames remain, so the
//! next poll (when the HTTP layer has written) continues. Frames are thus
//! encoded only as fast as the client reads.

use std::pin::Pin;
use std::task::{Context as TaskContext, Poll};

use actix::fut::ActorFuture;
use actix::Actor;
use actix_web_actors::ws::WebsocketContext;

/// A socket actor with a backlog of frames to write.
pub trait Backlog: Actor<Context = WebsocketContext<Self>> {
    /// Writes backlog frames until `budget` bytes are written or the
    /// backlog is empty; true when frames remain.
    fn write_backlog(&mut self, budget: usize, ctx: &mut WebsocketContext<Self>) -> bool;
}

/// Spawn once per socket: `ctx.spawn(WritePump(bytes_per_poll))`.
pub struct WritePump(pub usize);

impl<A: Backlog> ActorFuture<A> for WritePump {
    type Output = ();

    fn poll(
        self: Pin<&mut Self>,
        act: &mut A,
        ctx: &mut WebsocketContext<A>,
        task: &mut TaskContext<'_>,
    ) -> Poll<()> {
        if act.write_backlog(self.0, ctx) {
            task.waker().wake_by_ref();
        }
        Poll::Pending
    }
}
