//! The write pump of a socket actor that keeps a backlog of frames: it runs
//! for the life of the socket and hands at most a budget of bytes to the
//! WebSocket encoder per poll, waking itself while frames remain, so the
//! next poll (when the HTTP layer has written) continues. Frames are thus
//! encoded only as fast as the client reads. [`RawOut`] and [`WithRaw`]
//! let it encode them itself, into the bytes its connection writes.

use std::cell::RefCell;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context as TaskContext, Poll};

use actix::fut::ActorFuture;
use actix::Actor;
use actix_web::web::{Bytes, BytesMut};
use actix_web_actors::ws::WebsocketContext;
use futures_util::Stream;

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

/// WebSocket frames a socket actor encodes itself, straight into the bytes
/// its connection writes: one exact-size buffer per write, instead of a
/// queued message per frame that actix-web-actors' encoder copies into a
/// buffer it grows as it goes (for a thousand followers of one run that
/// was most of the gateway's work per delivery). The response body
/// ([`WithRaw`]) writes them ahead of what the actor's `WebsocketContext`
/// encoded in the same poll (pings, pongs, errors, the close frame), so a
/// close still follows every frame written before it. Shared by the actor
/// and its connection's body stream, on one worker thread.
#[derive(Clone, Default)]
pub struct RawOut(Rc<RefCell<BytesMut>>);

impl RawOut {
    /// The bytes of a text frame of `payload_len` bytes.
    pub fn text_len(payload_len: usize) -> usize {
        let header = match payload_len {
            0..=125 => 2,
            126..=0xFFFF => 4,
            _ => 10,
        };
        header + payload_len
    }

    /// Room for `bytes` more (see [`RawOut::text_len`]), so a write's
    /// frames go into one allocation.
    pub fn reserve(&self, bytes: usize) {
        self.0.borrow_mut().reserve(bytes);
    }

    /// Appends one final, unmasked text frame (RFC 6455 5.2: a server's
    /// frames are not masked; no extension is negotiated on these sockets).
    pub fn text(&self, payload: &[u8]) {
        let mut buf = self.0.borrow_mut();
        let len = payload.len();
        match len {
            0..=125 => buf.extend_from_slice(&[0x81, len as u8]),
            126..=0xFFFF => {
                let [hi, lo] = (len as u16).to_be_bytes();
                buf.extend_from_slice(&[0x81, 126, hi, lo]);
            }
            _ => {
                buf.extend_from_slice(&[0x81, 127]);
                buf.extend_from_slice(&(len as u64).to_be_bytes());
            }
        }
        buf.extend_from_slice(payload);
    }

    fn take(&self) -> Option<Bytes> {
        let mut buf = self.0.borrow_mut();
        (!buf.is_empty()).then(|| std::mem::take(&mut *buf).freeze())
    }
}

/// A socket actor's response body: the frames it wrote to its [`RawOut`],
/// then what its `WebsocketContext` encoded, in the order they were made.
pub struct WithRaw<S> {
    inner: Pin<Box<S>>,
    raw: RawOut,
    /// What the context encoded in a poll that also wrote raw frames.
    held: Option<Result<Bytes, actix_web::Error>>,
    ended: bool,
}

impl<S> WithRaw<S> {
    pub fn new(inner: S, raw: RawOut) -> Self {
        WithRaw {
            inner: Box::pin(inner),
            raw,
            held: None,
            ended: false,
        }
    }
}

impl<S> Stream for WithRaw<S>
where
    S: Stream<Item = Result<Bytes, actix_web::Error>>,
{
    type Item = Result<Bytes, actix_web::Error>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if let Some(item) = this.held.take() {
            return Poll::Ready(Some(item));
        }
        // The actor runs inside the context's stream: it writes raw frames
        // only while that is polled.
        let inner = if this.ended {
            Poll::Ready(None)
        } else {
            this.inner.as_mut().poll_next(cx)
        };
        if let Some(raw) = this.raw.take() {
            match inner {
                Poll::Ready(Some(item)) => this.held = Some(item),
                Poll::Ready(None) => this.ended = true,
                Poll::Pending => {}
            }
            return Poll::Ready(Some(Ok(raw)));
        }
        if matches!(inner, Poll::Ready(None)) {
            this.ended = true;
        }
        inner
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use actix_http::ws::{Codec, Message};
    use futures_util::StreamExt;
    use tokio_util::codec::Encoder;

    /// The frames written raw are, byte for byte, those actix-http's
    /// server codec makes, at each length encoding's edges.
    #[test]
    fn raw_text_frames_are_the_codecs() {
        for len in [0, 1, 125, 126, 127, 65_535, 65_536, 70_000] {
            let text = "x".repeat(len);
            let raw = RawOut::default();
            raw.reserve(RawOut::text_len(len));
            raw.text(text.as_bytes());
            let mut want = BytesMut::new();
            Codec::new()
                .encode(Message::Text(text.into()), &mut want)
                .unwrap();
            let got = raw.take().unwrap();
            assert_eq!(got.len(), RawOut::text_len(len), "length {len}");
            assert_eq!(&got[..], &want[..], "length {len}");
        }
    }

    /// What the actor wrote raw in a poll comes before what its context
    /// encoded in the same poll (a close follows the frames before it),
    /// and the body ends only after both.
    #[actix_rt::test]
    async fn raw_frames_go_ahead_of_the_context_and_before_the_end() {
        let raw = RawOut::default();
        let mut polls = 0;
        let actor = raw.clone();
        let context = futures_util::stream::poll_fn(move |_| {
            polls += 1;
            match polls {
                1 => {
                    actor.text(b"event");
                    Poll::Ready(Some(Ok(Bytes::from_static(b"close"))))
                }
                2 => {
                    actor.text(b"last");
                    Poll::Ready(None)
                }
                _ => panic!("polled after its end"),
            }
        });
        let body: Vec<Bytes> = WithRaw::new(context, raw)
            .map(|item| item.unwrap())
            .collect()
            .await;
        let frame = |s: &str| {
            let out = RawOut::default();
            out.text(s.as_bytes());
            out.take().unwrap()
        };
        assert_eq!(
            body,
            [frame("event"), Bytes::from_static(b"close"), frame("last")]
        );
    }
}
