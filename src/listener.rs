//! The HTTP listener: actix-server accepts, actix-http's HTTP/1 service
//! serves the actix-web `App` (every route, the guard, the access log), and
//! each upgraded connection (`/ws`, `/shell`, `/plugin-ws/*`) gets a lean
//! task of its own ([`Upgraded`]) once the App has answered the upgrade.
//!
//! Why not actix-web's `HttpServer`: its HTTP/1 dispatcher keeps fixed
//! 8 KiB read and write buffers (actix-http's `HW_BUFFER_SIZE`, no setting)
//! and its ~2.8 KiB task for the whole life of a connection, also after a
//! WebSocket upgrade, when a socket may idle for hours; that was most of
//! the 18 KiB per idle `/ws` socket (README Performance, `idle`). Here
//! actix-http hands an upgrade request over with its connection
//! (`HttpService::upgrade`), the dispatcher ends, and the request goes
//! through a second instance of the same App (same state, built per worker),
//! so the Host/Origin guard, authentication, the socket limits and the socket
//! actors with their WebSocket framing (actix-web-actors) are exactly those
//! of before. Only the bytes after the handshake move differently: the
//! socket is read into a stack buffer and each read is handed to the
//! request's payload as an exact-size chunk (paused while the payload holds
//! its 32 KiB, as actix-http does), and the response body's chunks are
//! written as they come. An idle upgraded connection holds no buffer.
//!
//! A refused upgrade (401, 403, 404, 429...) is written with actix-http's
//! codec and the connection closed (`Connection: close`).

use std::cell::RefCell;
use std::collections::VecDeque;
use std::io;
use std::marker::PhantomData;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::rc::{Rc, Weak};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use actix_codec::{AsyncRead, AsyncWrite, Encoder, Framed, ReadBuf};
use actix_http::body::{BoxBody, MessageBody};
use actix_http::error::PayloadError;
use actix_http::h1::{self, Codec};
use actix_http::{ConnectionType, Extensions, HttpService, Request, Response, StatusCode};
use actix_service::boxed::{BoxService, BoxServiceFactory};
use actix_service::{Service, ServiceFactory};
use actix_web::web::{Bytes, BytesMut};
use futures_util::future::LocalBoxFuture;
use futures_util::Stream;
use tokio::io::AsyncWriteExt;

/// The App as actix-http serves it: a refusal is a response too.
pub type AppFactory = BoxServiceFactory<(), Request, Response<BoxBody>, Response<BoxBody>, ()>;
type AppService = BoxService<Request, Response<BoxBody>, Response<BoxBody>>;
/// Builds one App instance (called twice per worker: requests and upgrades).
pub type MakeApp = Arc<dyn Fn() -> AppFactory + Send + Sync>;

/// Pending connections the kernel queues before accept (capped by
/// `net.core.somaxconn`, 4096 on current Linux): a burst of thousands of
/// sockets opening at once is queued rather than refused.
pub const LISTEN_BACKLOG: u32 = 4096;
/// Bytes read ahead of the request payload's reader before reading pauses
/// (actix-http's h1 payload pauses at the same size).
const INBOUND_MAX_BYTES: usize = 32 * 1024;
/// Largest read of an upgraded connection (a stack buffer, copied out at
/// the size read).
const READ_CHUNK: usize = 16 * 1024;
/// How long a closed connection waits for its shutdown (TLS close_notify)
/// to be written; actix-web's `client_disconnect_timeout`.
pub const CLIENT_DISCONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// A request head must arrive within this (actix-web's default).
pub const CLIENT_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// A TCP listener on `addr` with [`LISTEN_BACKLOG`].
pub fn bind(addr: std::net::SocketAddr) -> io::Result<std::net::TcpListener> {
    let socket = match addr {
        std::net::SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        std::net::SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)?.into_std()
}

/// The HTTP/1 service for connections of type `T` (plain TCP or TLS).
pub fn http_service<T>(
    make_app: &MakeApp,
    on_connect: fn(&T, &mut Extensions),
) -> HttpService<T, AppFactory, BoxBody, h1::ExpectHandler, Upgrades<T>>
where
    T: AsyncRead + AsyncWrite + Unpin + 'static,
{
    HttpService::build()
        .client_request_timeout(CLIENT_REQUEST_TIMEOUT)
        .client_disconnect_timeout(CLIENT_DISCONNECT_TIMEOUT)
        // As Node's `ws` does: a chat delta or keystroke echo is one small
        // write that should leave at once, not wait for the peer's delayed
        // ACK (writes are already batched per socket, so Nagle saves little).
        .tcp_nodelay(true)
        .on_connect_ext(on_connect)
        .upgrade(Upgrades {
            make_app: make_app.clone(),
            _io: PhantomData,
        })
        .finish(make_app())
}

/// Builds the upgrade service of a worker (its own App instance).
pub struct Upgrades<T> {
    make_app: MakeApp,
    _io: PhantomData<fn(T)>,
}

impl<T> ServiceFactory<(Request, Framed<T, Codec>)> for Upgrades<T>
where
    T: AsyncRead + AsyncWrite + Unpin + 'static,
{
    type Response = ();
    type Error = actix_http::Error;
    type Config = ();
    type Service = UpgradeService;
    type InitError = ();
    type Future = LocalBoxFuture<'static, Result<UpgradeService, ()>>;

    fn new_service(&self, _: ()) -> Self::Future {
        let app = (self.make_app)().new_service(());
        Box::pin(async move {
            Ok(UpgradeService {
                app: Rc::new(app.await?),
            })
        })
    }
}

/// Takes an upgrade request with its connection and spawns its task.
pub struct UpgradeService {
    app: Rc<AppService>,
}

impl<T> Service<(Request, Framed<T, Codec>)> for UpgradeService
where
    T: AsyncRead + AsyncWrite + Unpin + 'static,
{
    type Response = ();
    type Error = actix_http::Error;
    type Future = std::future::Ready<Result<(), actix_http::Error>>;

    actix_service::always_ready!();

    fn call(&self, (req, framed): (Request, Framed<T, Codec>)) -> Self::Future {
        let parts = framed.into_parts();
        // What the client sent after the request head (a first frame) is
        // copied out, so the dispatcher's two 8 KiB buffers are freed now.
        let early = (!parts.read_buf.is_empty()).then(|| Bytes::copy_from_slice(&parts.read_buf));
        // Its own task: the dispatcher's (and its buffers) ends here.
        actix_web::rt::spawn(serve(self.app.clone(), req, parts.io, parts.codec, early));
        std::future::ready(Ok(()))
    }
}

/// Answers the upgrade request through the App, then moves the bytes.
async fn serve<T>(app: Rc<AppService>, req: Request, io: T, mut codec: Codec, early: Option<Bytes>)
where
    T: AsyncRead + AsyncWrite + Unpin + 'static,
{
    let (inbound, payload) = inbound();
    let mut inbound = Some(inbound);
    let mut io = io;
    if let (Some(inbound), Some(early)) = (&mut inbound, early) {
        inbound.feed(early);
    }
    let payload: actix_http::BoxedPayloadStream = Box::pin(payload);
    let (req, _) = req.replace_payload(actix_http::Payload::Stream { payload });
    // The socket is read while the App answers: a handler may wait for
    // the request's body (an upgrade header on any route reaches here).
    let mut call = app.call(req);
    let res = std::future::poll_fn(|cx| {
        if let Poll::Ready(res) = call.as_mut().poll(cx) {
            return Poll::Ready(res);
        }
        while read_inbound(&mut io, &mut inbound, cx) {}
        Poll::Pending
    })
    .await;
    drop(call);
    let res = match res {
        Ok(res) | Err(res) => res,
    };
    let upgraded = res.status() == StatusCode::SWITCHING_PROTOCOLS;
    let (mut head, body) = res.into_parts();
    if !upgraded {
        head.head_mut().set_connection_type(ConnectionType::Close);
    }
    let mut out = BytesMut::new();
    if let Err(err) = codec.encode(h1::Message::Item((head, body.size())), &mut out) {
        tracing::debug!(%err, "cannot encode the upgrade answer");
        return;
    }
    let mut conn = Upgraded {
        io,
        body,
        body_done: false,
        // A refusal's body is framed by the codec (length or chunked) and
        // nothing more is read; after a 101 both directions are raw bytes.
        inbound: inbound.filter(|_| upgraded),
        codec: (!upgraded).then_some(codec),
        out: out.freeze(),
        unflushed: false,
    };
    if let Err(err) = std::future::poll_fn(|cx| conn.poll_conn(cx)).await {
        tracing::debug!(%err, "upgraded connection ended");
        return;
    }
    let _ = tokio::time::timeout(CLIENT_DISCONNECT_TIMEOUT, conn.io.shutdown()).await;
    if upgraded {
        // A lingering close: what the client still sends (its close frame)
        // is read and dropped until it closes too. Closed with unread bytes,
        // the socket would answer with a reset, and a client whose reset
        // came before it read our close frame took the close for a dropped
        // connection and dialled again (a 4003 that must end its retries).
        let _ = tokio::time::timeout(CLIENT_DISCONNECT_TIMEOUT, drain(&mut conn.io)).await;
    }
}

/// Reads `io` to its end (or an error), dropping what comes.
async fn drain<T: AsyncRead + Unpin>(io: &mut T) {
    use tokio::io::AsyncReadExt;
    // On the heap, not in the future: a local array would be part of every
    // connection's task (`serve`'s future is as large as its largest
    // state) for the connection's whole life, 1 KiB more per idle socket.
    let mut buf = vec![0u8; 1024];
    while matches!(io.read(&mut buf).await, Ok(n) if n > 0) {}
}

/// One upgraded connection: the socket, the response body (the socket
/// actor's outbound frames) and the sender of the request payload (its
/// inbound bytes). Ends when the body has ended and is written, or on an
/// I/O error; dropping it drops the body, which stops the actor.
struct Upgraded<T> {
    io: T,
    body: BoxBody,
    body_done: bool,
    /// `None` once the client's side ended or the payload was dropped.
    inbound: Option<InboundSender>,
    /// Encodes body chunks (a refusal); `None`: written as they are.
    codec: Option<Codec>,
    /// The rest of the chunk being written.
    out: Bytes,
    unflushed: bool,
}

impl<T: AsyncRead + AsyncWrite + Unpin> Upgraded<T> {
    /// Writes the current chunk, then takes the next from the body; true
    /// when something changed, `Err` when the connection is lost.
    fn poll_outbound(&mut self, cx: &mut Context<'_>) -> io::Result<bool> {
        let mut progress = false;
        while !self.out.is_empty() {
            match Pin::new(&mut self.io).poll_write(cx, &self.out)? {
                Poll::Ready(0) => return Err(io::ErrorKind::WriteZero.into()),
                Poll::Ready(n) => {
                    let _ = self.out.split_to(n);
                    self.unflushed = true;
                    progress = true;
                }
                Poll::Pending => return Ok(progress),
            }
        }
        if !self.body_done {
            match Pin::new(&mut self.body).poll_next(cx) {
                Poll::Ready(Some(Ok(chunk))) => {
                    self.out = self.encode(Some(chunk))?;
                    return Ok(true);
                }
                Poll::Ready(Some(Err(err))) => return Err(io::Error::other(err.to_string())),
                Poll::Ready(None) => {
                    self.body_done = true;
                    self.out = self.encode(None)?;
                    return Ok(true);
                }
                Poll::Pending => {}
            }
        }
        // Nothing more to write now: what TLS buffered goes out.
        if self.unflushed {
            if let Poll::Ready(res) = Pin::new(&mut self.io).poll_flush(cx) {
                res?;
                self.unflushed = false;
            }
        }
        Ok(progress)
    }

    fn encode(&mut self, chunk: Option<Bytes>) -> io::Result<Bytes> {
        let Some(codec) = &mut self.codec else {
            return Ok(chunk.unwrap_or_default());
        };
        let mut buf = BytesMut::new();
        codec.encode(h1::Message::Chunk(chunk), &mut buf)?;
        Ok(buf.freeze())
    }

    fn finished(&self) -> bool {
        self.body_done && self.out.is_empty() && !self.unflushed
    }

    /// Moves bytes both ways until the body has ended and is written.
    fn poll_conn(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            let read = read_inbound(&mut self.io, &mut self.inbound, cx);
            let wrote = self.poll_outbound(cx)?;
            if self.finished() {
                return Poll::Ready(Ok(()));
            }
            if !read && !wrote {
                return Poll::Pending;
            }
        }
    }
}

/// Reads what the client sent while the payload wants more; true when
/// something changed. `inbound` becomes `None` at the end of the client's
/// side, on an error, or when the payload's reader is gone.
fn read_inbound<T: AsyncRead + Unpin>(
    io: &mut T,
    inbound: &mut Option<InboundSender>,
    cx: &mut Context<'_>,
) -> bool {
    let Some(sender) = inbound else {
        return false;
    };
    match sender.wants(cx) {
        Wants::More => {}
        // Woken when the payload's reader has taken some.
        Wants::Pause => return false,
        // The reader is gone (the actor stopped); its body ends next.
        Wants::Nothing => {
            *inbound = None;
            return false;
        }
    }
    let mut scratch = [MaybeUninit::<u8>::uninit(); READ_CHUNK];
    let mut buf = ReadBuf::uninit(&mut scratch);
    match Pin::new(io).poll_read(cx, &mut buf) {
        Poll::Pending => false,
        Poll::Ready(Ok(())) if buf.filled().is_empty() => {
            sender.end(None);
            *inbound = None;
            true
        }
        Poll::Ready(Ok(())) => {
            sender.feed(Bytes::copy_from_slice(buf.filled()));
            true
        }
        Poll::Ready(Err(err)) => {
            sender.end(Some(PayloadError::Io(err)));
            *inbound = None;
            true
        }
    }
}

/// The request payload of an upgraded connection: what was read from the
/// socket and not yet taken by the payload's reader (the socket actor's
/// WebSocket decoder), at most [`INBOUND_MAX_BYTES`] ahead of it.
#[derive(Default)]
struct Inbound {
    chunks: VecDeque<Bytes>,
    bytes: usize,
    /// The client's side ended (`Some(None)`) or failed.
    end: Option<Option<PayloadError>>,
    reader: Option<Waker>,
    sender: Option<Waker>,
}

/// The connection task's end of [`Inbound`]; the reader holds the only
/// strong reference, so a dropped payload is seen here.
struct InboundSender(Weak<RefCell<Inbound>>);

/// The payload's reader's end.
struct InboundReader(Rc<RefCell<Inbound>>);

fn inbound() -> (InboundSender, InboundReader) {
    let shared = Rc::new(RefCell::new(Inbound::default()));
    (InboundSender(Rc::downgrade(&shared)), InboundReader(shared))
}

enum Wants {
    More,
    Pause,
    Nothing,
}

impl InboundSender {
    fn wants(&self, cx: &Context<'_>) -> Wants {
        let Some(shared) = self.0.upgrade() else {
            return Wants::Nothing;
        };
        let mut shared = shared.borrow_mut();
        if shared.bytes < INBOUND_MAX_BYTES {
            return Wants::More;
        }
        shared.sender = Some(cx.waker().clone());
        Wants::Pause
    }

    fn feed(&mut self, chunk: Bytes) {
        if let Some(shared) = self.0.upgrade() {
            let mut shared = shared.borrow_mut();
            shared.bytes += chunk.len();
            shared.chunks.push_back(chunk);
            if let Some(reader) = shared.reader.take() {
                reader.wake();
            }
        }
    }

    fn end(&mut self, err: Option<PayloadError>) {
        if let Some(shared) = self.0.upgrade() {
            let mut shared = shared.borrow_mut();
            shared.end = Some(err);
            if let Some(reader) = shared.reader.take() {
                reader.wake();
            }
        }
    }
}

impl Stream for InboundReader {
    type Item = Result<Bytes, PayloadError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let mut shared = self.0.borrow_mut();
        if let Some(chunk) = shared.chunks.pop_front() {
            shared.bytes -= chunk.len();
            if shared.chunks.is_empty() {
                // An idle connection keeps no queue.
                shared.chunks = VecDeque::new();
            }
            if let Some(sender) = shared.sender.take() {
                sender.wake();
            }
            return Poll::Ready(Some(Ok(chunk)));
        }
        match shared.end.take() {
            Some(Some(err)) => {
                // The error once, then the end.
                shared.end = Some(None);
                Poll::Ready(Some(Err(err)))
            }
            Some(None) => {
                shared.end = Some(None);
                Poll::Ready(None)
            }
            None => {
                shared.reader = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }
}

impl Drop for InboundReader {
    fn drop(&mut self) {
        // The connection task stops reading for a reader that is gone.
        if let Some(sender) = self.0.borrow_mut().sender.take() {
            sender.wake();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use actix_service::fn_service;

    /// A connection's task is `serve`'s future, allocated once at its
    /// largest state and held for the connection's whole life: what it
    /// keeps inline is paid by every idle socket (README Performance,
    /// `idle`). A 1 KiB array in the lingering close's read once made
    /// every socket 0.9 KiB larger.
    #[actix_rt::test]
    async fn a_connections_task_holds_no_buffer() {
        let app: Rc<AppService> = Rc::new(actix_service::boxed::service(fn_service(
            |_: Request| async { Ok::<_, Response<BoxBody>>(Response::ok().map_into_boxed_body()) },
        )));
        let (io, _peer) = tokio::io::duplex(64);
        let task = serve(app, Request::new(), io, Codec::default(), None);
        let size = std::mem::size_of_val(&task);
        // 976 bytes today: the request, the codec, the body and the socket.
        assert!(size <= 1280, "serve's future is {size} bytes");
    }
}
