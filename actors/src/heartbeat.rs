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

    /// At each interval of a socket that sends its own pings: false when
    /// the previous ping went unanswered (drop the socket), else the next
    /// ping is due and now awaited.
    pub fn tick(&mut self) -> bool {
        if self.awaiting_pong {
            return false;
        }
        self.awaiting_pong = true;
        true
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
            if !state(act).tick() {
                crate::metrics::metrics().heartbeat_timeout(kind);
                tracing::info!(
                    actor = kind,
                    reason = "heartbeat timeout",
                    "dropping socket that missed a ping"
                );
                ctx.stop();
                return;
            }
            ctx.ping(b"");
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use actix::StreamHandler;
    use actix_web::web::Bytes;
    use actix_web_actors::ws;
    use futures_util::{Stream, StreamExt};
    use tokio::time::timeout;

    /// A ping as the server writes it (FIN + opcode 9, no payload, unmasked).
    const PING: [u8; 2] = [0x89, 0x00];
    /// A pong as a client writes it (masked, zero mask key, no payload).
    const PONG: [u8; 6] = [0x8a, 0x80, 0, 0, 0, 0];
    const INTERVAL: Duration = Duration::from_secs(30);
    const MS: Duration = Duration::from_millis(1);

    /// A socket with nothing but the heartbeat.
    struct Bare {
        hb: Heartbeat,
    }

    impl Actor for Bare {
        type Context = WebsocketContext<Self>;

        fn started(&mut self, ctx: &mut Self::Context) {
            Heartbeat::start(ctx, INTERVAL, |a: &mut Self| &mut a.hb, "test");
        }
    }

    impl StreamHandler<Result<ws::Message, ws::ProtocolError>> for Bare {
        fn handle(&mut self, msg: Result<ws::Message, ws::ProtocolError>, _: &mut Self::Context) {
            if let Ok(ws::Message::Pong(_)) = msg {
                self.hb.pong();
            }
        }
    }

    type Client = tokio::sync::mpsc::UnboundedSender<Result<Bytes, actix_web::error::PayloadError>>;

    /// Starts a socket; returns what the client sends into it and what it writes.
    fn open() -> (Client, impl Stream<Item = Result<Bytes, actix_web::Error>>) {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let input = futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx));
        (
            tx,
            WebsocketContext::create(
                Bare {
                    hb: Heartbeat::default(),
                },
                input,
            ),
        )
    }

    /// On paused time: the first ping goes out at exactly one interval; a
    /// socket that never answers is dropped at exactly the next one.
    #[actix_rt::test]
    async fn a_silent_socket_is_dropped_one_interval_after_its_ping() {
        tokio::time::pause();
        let (_client, out) = open();
        let mut out = Box::pin(out);
        assert!(
            timeout(INTERVAL - MS, out.next()).await.is_err(),
            "early ping"
        );
        let ping = timeout(2 * MS, out.next())
            .await
            .expect("ping at the interval");
        assert_eq!(ping.expect("open").expect("frame").as_ref(), PING);
        assert!(
            timeout(INTERVAL - 2 * MS, out.next()).await.is_err(),
            "dropped early"
        );
        let end = timeout(2 * MS, out.next())
            .await
            .expect("dropped at the interval");
        assert!(end.is_none(), "the socket stopped: {end:?}");
    }

    /// A socket that answers every ping stays open however long it lives.
    #[actix_rt::test]
    async fn an_answering_socket_stays_open() {
        tokio::time::pause();
        let (client, out) = open();
        let mut out = Box::pin(out);
        for _ in 0..10 {
            let ping = timeout(INTERVAL + MS, out.next()).await.expect("a ping");
            assert_eq!(ping.expect("open").expect("frame").as_ref(), PING);
            client
                .send(Ok(Bytes::from_static(&PONG)))
                .expect("socket reads");
        }
    }
}
