//! `ConnWatchdog`: cuts off WebSocket connections whose client stopped reading.
//!
//! Why it exists: actix-http polls a socket actor only while the
//! connection's write buffer has room. A client that stops reading fills
//! the kernel's buffers, then actix-http's, and from then on the actor is
//! never polled again: its heartbeat timer, its mailbox and any close
//! request sent to it wait forever, and TCP zero-window probes keep the
//! connection open. So stall detection cannot live in the stalled actor.
//!
//! **Owns** a duplicate of each watched connection's socket descriptor (taken
//! in the upgrade route from the raw descriptor that `HttpServer::on_connect`
//! records, see [`ConnFd`]), and per connection the kernel's count of bytes
//! the peer acknowledged (`TCP_INFO.tcpi_bytes_acked`) with the time it last
//! moved.
//!
//! **Handles** [`Watch`] (a socket actor started) and [`Unwatch`] (it
//! stopped; the duplicate is closed at once so the connection closes when
//! actix-http closes its own descriptor).
//!
//! **Sends** [`Stalled`] to the socket actor when its client has taken no
//! byte for nearly two heartbeat intervals while bytes wait in the kernel's
//! send queue (a polled actor closes with 4008). If the connection is still
//! watched at two intervals (checked every eighth of one), it is dropped from here: `SO_LINGER` 0 and
//! `shutdown(2)` on the duplicate, which wakes the connection's task (the
//! binary's `listener.rs`) with an error, so it drops the connection (and the actor, whose `stopped`
//! runs) and the kernel discards the unsent bytes with a reset.
//!
//! A client that reads, however slowly, moves `bytes_acked` and is never
//! cut off; one with nothing queued for it is the heartbeat's business.
//!
//! **Stops** with the system.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use actix::prelude::*;

/// Raw descriptor of an accepted TCP connection, stored in the connection's
/// extensions by the binary's `on_connect` hook. Only valid while the
/// connection is alive, i.e. while one of its requests is being handled:
/// [`watched_conn`] duplicates it right then.
#[derive(Debug, Clone, Copy)]
pub struct ConnFd(pub RawFd);

/// The raw descriptor of `io` (what `HttpServer::on_connect` hands over) if
/// it is a plain TCP stream.
pub fn conn_fd(io: &dyn std::any::Any) -> Option<ConnFd> {
    io.downcast_ref::<tokio::net::TcpStream>()
        .map(|tcp| ConnFd(tcp.as_raw_fd()))
}

/// A connection to watch: the watchdog and a duplicate of the socket.
pub struct WatchedConn {
    watchdog: Addr<ConnWatchdog>,
    fd: Option<OwnedFd>,
    id: u64,
}

/// Duplicates the connection's descriptor (call while handling its request).
pub fn watched_conn(fd: Option<&ConnFd>, watchdog: &Addr<ConnWatchdog>) -> Option<WatchedConn> {
    let fd = fd?;
    // SAFETY: the descriptor belongs to the connection whose request is being
    // handled, so it is open for the duration of this call.
    let borrowed = unsafe { BorrowedFd::borrow_raw(fd.0) };
    let owned = borrowed.try_clone_to_owned().ok()?;
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    Some(WatchedConn {
        watchdog: watchdog.clone(),
        fd: Some(owned),
        id: NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
    })
}

impl WatchedConn {
    /// Starts watching; `stalled` is told first when the client stops reading.
    /// A duplicate of its own for a socket actor that ends the connection's
    /// reads itself ([`end_reads`]); call before `watch`.
    pub fn read_closer(&self) -> Option<ReadCloser> {
        Some(ReadCloser(self.fd.as_ref()?.try_clone().ok()?))
    }

    pub fn watch(&mut self, kind: &'static str, stalled: Recipient<Stalled>) {
        if let Some(fd) = self.fd.take() {
            self.watchdog.do_send(Watch {
                id: self.id,
                fd,
                kind,
                stalled,
            });
        }
    }
}

impl Drop for WatchedConn {
    fn drop(&mut self) {
        // Sent from the socket actor's drop, so the duplicate never outlives
        // the connection by more than one message.
        self.watchdog.do_send(Unwatch { id: self.id });
    }
}

/// A socket actor started: watch its connection.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Watch {
    pub id: u64,
    pub fd: OwnedFd,
    pub kind: &'static str,
    pub stalled: Recipient<Stalled>,
}

/// A socket actor stopped: forget (close) the duplicate.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Unwatch {
    pub id: u64,
}

/// To a socket actor: its client made no progress for two heartbeat
/// intervals; close (4008). If the actor cannot run, the watchdog drops the
/// connection one tick later.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Stalled;

/// How many watch ticks per heartbeat interval (a cut comes at most one
/// tick after two intervals without progress).
const TICKS_PER_INTERVAL: u32 = 8;
/// How long before the cut the actor is asked to close itself (4008).
const POLITE_TICKS: u32 = 2;
/// Intervals without progress before a connection counts as stuck.
const STALL_INTERVALS: u32 = 2;

struct Conn {
    fd: OwnedFd,
    kind: &'static str,
    stalled: Recipient<Stalled>,
    acked: u64,
    progress_at: Instant,
    told_at: Option<Instant>,
}

pub struct ConnWatchdog {
    interval: Duration,
    conns: HashMap<u64, Conn>,
}

impl ConnWatchdog {
    pub fn new(heartbeat: Duration) -> Self {
        ConnWatchdog {
            interval: heartbeat,
            conns: HashMap::new(),
        }
    }

    fn tick(&mut self) {
        let now = Instant::now();
        let limit = self.interval * STALL_INTERVALS;
        let polite = limit.saturating_sub(self.interval * POLITE_TICKS / TICKS_PER_INTERVAL);
        let mut dropped = Vec::new();
        for (id, conn) in self.conns.iter_mut() {
            let Some((acked, unsent)) = send_progress(conn.fd.as_raw_fd()) else {
                // Not a TCP socket any more (or closed): nothing to watch.
                dropped.push(*id);
                continue;
            };
            if acked != conn.acked || unsent == 0 {
                conn.acked = acked;
                conn.progress_at = now;
                conn.told_at = None;
                continue;
            }
            let stalled_for = now.duration_since(conn.progress_at);
            if stalled_for < polite {
                continue;
            }
            match conn.told_at {
                None if stalled_for < limit => {
                    tracing::warn!(
                        actor = conn.kind,
                        conn = id,
                        unsent,
                        reason = "client stopped reading",
                        "closing stuck socket with 4008"
                    );
                    conn.told_at = Some(now);
                    crate::metrics::metrics().stuck_client_disconnects.inc();
                    conn.stalled.do_send(Stalled);
                }
                _ if stalled_for >= limit => {
                    tracing::warn!(
                        actor = conn.kind,
                        conn = id,
                        unsent,
                        reason = "client stopped reading",
                        "supervision: dropping stuck connection"
                    );
                    if conn.told_at.is_none() {
                        crate::metrics::metrics().stuck_client_disconnects.inc();
                    }
                    cut(conn.fd.as_raw_fd());
                    dropped.push(*id);
                }
                _ => {}
            }
        }
        for id in dropped {
            self.conns.remove(&id);
        }
    }
}

/// `(bytes the peer acknowledged, bytes in the send queue)` of a TCP socket.
fn send_progress(fd: RawFd) -> Option<(u64, u64)> {
    // SAFETY: tcp_info is plain data; getsockopt writes at most `len` bytes
    // into it, ioctl(SIOCOUTQ) writes one int.
    unsafe {
        let mut info: libc::tcp_info = std::mem::zeroed();
        let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
        let rc = libc::getsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        );
        if rc != 0 {
            return None;
        }
        let mut unsent: libc::c_int = 0;
        if libc::ioctl(fd, libc::TIOCOUTQ, &mut unsent) != 0 {
            return None;
        }
        Some((info.tcpi_bytes_acked, unsent.max(0) as u64))
    }
}

/// The client connection's descriptor, held by a socket actor that ends
/// the connection itself when it stops.
#[derive(Debug)]
pub struct ReadCloser(OwnedFd);

impl ReadCloser {
    /// Ends the reads of the connection (`shutdown(SHUT_RD)`); writes go on.
    ///
    /// Why: after a WebSocket closing handshake the server should close the
    /// TCP connection first (RFC 6455 section 7.1.1), but actix-http, once
    /// the response (the socket's output) ended with its request stream
    /// unread, keeps the connection for `client_disconnect_timeout` waiting
    /// for the client to close, which a WebSocket client does not do. A read
    /// side at its end makes it flush what is left and close at once.
    pub fn end_reads(self) {
        // SAFETY: a plain socket call on a descriptor this value owns.
        unsafe {
            libc::shutdown(self.0.as_raw_fd(), libc::SHUT_RD);
        }
    }
}

/// Drops a connection whose owner cannot run: reset on close, and wake
/// every reader and writer of the socket with an error.
fn cut(fd: RawFd) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: plain socket calls on a descriptor this actor owns.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
        libc::shutdown(fd, libc::SHUT_RDWR);
    }
}

impl Actor for ConnWatchdog {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        // Watch and Unwatch come once per socket (do_send): the mailbox
        // holds at most two messages per open connection.
        let tick = (self.interval / TICKS_PER_INTERVAL).max(Duration::from_millis(10));
        ctx.run_interval(tick, |act, _| act.tick());
        tracing::info!(event = "actor.started", actor = "ConnWatchdog", interval = ?self.interval, "actor started");
    }

    fn stopped(&mut self, _: &mut Self::Context) {
        tracing::info!(
            event = "actor.stopped",
            reason = "stopped",
            actor = "ConnWatchdog",
            "actor stopped"
        );
    }
}

impl Handler<Watch> for ConnWatchdog {
    type Result = ();

    fn handle(&mut self, msg: Watch, _: &mut Context<Self>) {
        let acked = send_progress(msg.fd.as_raw_fd()).map_or(0, |(a, _)| a);
        self.conns.insert(
            msg.id,
            Conn {
                fd: msg.fd,
                kind: msg.kind,
                stalled: msg.stalled,
                acked,
                progress_at: Instant::now(),
                told_at: None,
            },
        );
    }
}

impl Handler<Unwatch> for ConnWatchdog {
    type Result = ();

    fn handle(&mut self, msg: Unwatch, _: &mut Context<Self>) {
        self.conns.remove(&msg.id);
    }
}
