//! `fanout`'s readers: a thousand raw WebSocket clients (`raw_ws.rs`) served
//! by a few threads, each waiting on its share of the sockets with one epoll
//! set (mio, edge-triggered) and reading every socket that has bytes until it
//! has none. The awc readers on one task cost about 1 us of CPU per delivery
//! on one thread (a task wake-up, a `Bytes` and a codec step per frame), the
//! load generator's ceiling near the target's 1.2 M deliveries/s, and a
//! reader starved on that thread went silent long enough for the gateway to
//! close it with 4008; here one read(2) takes many frames and a frame costs
//! a scan.
//!
//! Every delivery's seq is checked as `read_run_after` checks it: a gap,
//! a duplicate or a reorder counts in [`SeqCheck`], and a reader is done
//! only at its run's `complete`. A 4008 close is recovered as a client
//! does: a new socket subscribes with the last seq seen (after a growing
//! delay when the previous resubscription got nothing before its close).

use std::time::{Duration, Instant};

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use serde_json::json;

use crate::raw_ws::{RawIn, RawWs};
use crate::stats::{Histogram, SeqCheck};
use crate::ws::{scan, sequenced, unix_nanos};

/// 4008 closes one reader recovers from before its run counts as failed
/// (as `read_run_after`'s `MAX_REJOINS`).
const MAX_REJOINS: usize = 20;

/// One subscribed socket and where to open another (after a 4008).
pub struct FanSock {
    pub ws: RawWs,
    pub url: String,
}

/// What one socket saw of one run.
#[derive(Default)]
pub struct FanSeen {
    pub deltas: usize,
    pub last: Option<Instant>,
    pub rejoins: usize,
    pub seqc: SeqCheck,
}

/// What the readers saw together: per socket (in order), and every
/// delta's latency from the provider's stamp to its read.
pub struct FanRun {
    pub seen: Vec<Result<FanSeen, String>>,
    pub hist: Histogram,
}

/// Reads every socket of `socks` until its run's `complete` (or
/// `deadline`), on `threads` threads; the sockets come back (still open,
/// blocking) for the next run.
pub fn read_all(socks: &mut [FanSock], session: &str, deadline: Instant, threads: usize) -> FanRun {
    let per = socks.len().div_ceil(threads.max(1)).max(1);
    let parts: Vec<(Vec<Result<FanSeen, String>>, Histogram)> = std::thread::scope(|scope| {
        let handles: Vec<_> = socks
            .chunks_mut(per)
            .map(|part| scope.spawn(move || read_part(part, session, deadline)))
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join().unwrap_or_else(|_| {
                    (
                        vec![Err("reader thread panicked".into())],
                        Histogram::default(),
                    )
                })
            })
            .collect()
    });
    let mut out = FanRun {
        seen: Vec::with_capacity(socks.len()),
        hist: Histogram::default(),
    };
    for (seen, hist) in parts {
        out.seen.extend(seen);
        out.hist.merge(&hist);
    }
    out
}

/// One reader's state during a run.
struct Reader<'a> {
    sock: &'a mut FanSock,
    seen: FanSeen,
    /// Seqs seen since the last resubscription (none: it was closed again
    /// before it got anywhere, so the next one waits a little).
    progressed: bool,
    /// A resubscription waiting for its delay.
    rejoin_at: Option<Instant>,
    /// Set once, when the reader is done.
    result: Option<Result<FanSeen, String>>,
}

impl Reader<'_> {
    fn done(&self) -> bool {
        self.result.is_some()
    }

    fn finish(&mut self, result: Result<FanSeen, String>, left: &mut usize) {
        if self.result.is_none() {
            *left -= 1;
            self.result = Some(result);
        }
    }
}

/// What a frame or close tells its reader.
enum Step {
    More,
    Complete,
    Rejoin,
}

fn read_part(
    part: &mut [FanSock],
    session: &str,
    deadline: Instant,
) -> (Vec<Result<FanSeen, String>>, Histogram) {
    let mut hist = Histogram::default();
    let mut poll = match Poll::new() {
        Ok(p) => p,
        Err(e) => {
            return (
                part.iter().map(|_| Err(format!("epoll: {e}"))).collect(),
                hist,
            )
        }
    };
    let mut readers: Vec<Reader<'_>> = part
        .iter_mut()
        .map(|sock| Reader {
            sock,
            seen: FanSeen::default(),
            progressed: true,
            rejoin_at: None,
            result: None,
        })
        .collect();
    let mut left = readers.len();
    for (i, r) in readers.iter_mut().enumerate() {
        if let Err(e) = watch(&poll, r, i) {
            r.finish(Err(e), &mut left);
        }
    }
    let mut events = Events::with_capacity(1024);
    // Bytes already in a reader's buffer (read with its ack) come first.
    let mut ready: Vec<usize> = (0..readers.len()).collect();
    while left > 0 {
        for &i in &ready {
            let r = &mut readers[i];
            if r.done() || r.rejoin_at.is_some() {
                continue;
            }
            match drain(r, &mut hist) {
                Ok(Step::More) => {}
                Ok(Step::Complete) => {
                    let _ = poll.registry().deregister(&mut SourceFd(&r.sock.ws.fd()));
                    let _ = r.sock.ws.set_nonblocking(false);
                    let seen = std::mem::take(&mut r.seen);
                    r.finish(Ok(seen), &mut left);
                }
                Ok(Step::Rejoin) => {
                    let _ = poll.registry().deregister(&mut SourceFd(&r.sock.ws.fd()));
                    r.seen.rejoins += 1;
                    if r.seen.rejoins > MAX_REJOINS {
                        r.finish(Err("closed with 4008 too often".into()), &mut left);
                        continue;
                    }
                    let delay = if r.progressed {
                        Duration::ZERO
                    } else {
                        Duration::from_millis(100 * r.seen.rejoins as u64)
                    };
                    r.rejoin_at = Some(Instant::now() + delay);
                }
                Err(e) => r.finish(Err(e), &mut left),
            }
        }
        ready.clear();
        // Resubscriptions whose delay is over.
        let now = Instant::now();
        let mut next_rejoin = None::<Instant>;
        for (i, r) in readers.iter_mut().enumerate() {
            let Some(at) = r.rejoin_at.filter(|_| !r.done()) else {
                continue;
            };
            if at > now {
                next_rejoin = Some(next_rejoin.map_or(at, |n| n.min(at)));
                continue;
            }
            r.rejoin_at = None;
            match rejoin(&poll, r, i, session) {
                Ok(()) => ready.push(i),
                Err(e) => r.finish(Err(e), &mut left),
            }
        }
        if left == 0 {
            break;
        }
        if !ready.is_empty() {
            continue;
        }
        let now = Instant::now();
        if now >= deadline {
            for r in readers.iter_mut() {
                r.finish(Err("timed out waiting for a frame".into()), &mut left);
            }
            break;
        }
        let wake = next_rejoin.map_or(deadline, |n| n.min(deadline));
        match poll.poll(&mut events, Some(wake - now)) {
            Ok(()) => ready.extend(events.iter().map(|e| e.token().0)),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                for r in readers.iter_mut() {
                    r.finish(Err(format!("epoll: {e}")), &mut left);
                }
            }
        }
    }
    let results = readers
        .into_iter()
        .map(|r| {
            r.result
                .unwrap_or_else(|| Err("reader never finished".into()))
        })
        .collect();
    (results, hist)
}

/// Adds the reader's socket to the epoll set (nonblocking from here).
fn watch(poll: &Poll, r: &mut Reader<'_>, i: usize) -> Result<(), String> {
    r.sock.ws.set_nonblocking(true)?;
    poll.registry()
        .register(&mut SourceFd(&r.sock.ws.fd()), Token(i), Interest::READABLE)
        .map_err(|e| format!("epoll add: {e}"))
}

/// A new socket subscribed from the last seq seen, watched in the old one's place.
fn rejoin(poll: &Poll, r: &mut Reader<'_>, i: usize, session: &str) -> Result<(), String> {
    let mut ws = RawWs::connect(&r.sock.url)?;
    let sub = json!({"type": "chat.subscribe", "sessions": [{"sessionId": session, "lastSeq": r.seen.seqc.last()}]});
    ws.send_text(&sub.to_string())?;
    r.sock.ws = ws;
    r.progressed = false;
    watch(poll, r, i)
}

/// Reads the socket until it has nothing more (edge-triggered: the next
/// readiness comes only for new bytes), checking every frame.
fn drain(r: &mut Reader<'_>, hist: &mut Histogram) -> Result<Step, String> {
    // One clock read per wake-up of a socket: its frames arrived by then.
    let (now, unix) = (Instant::now(), unix_nanos());
    loop {
        let frame = match r.sock.ws.try_next()? {
            None => return Ok(Step::More),
            Some(RawIn::Text(b)) => b,
            Some(RawIn::Binary) => continue,
            Some(RawIn::Close(Some(4008))) => return Ok(Step::Rejoin),
            Some(RawIn::Close(code)) => return Err(format!("socket closed with {code:?}")),
            Some(RawIn::Ended) => return Err("socket ended".into()),
        };
        let Some((seq, s)) = sequenced(frame)? else {
            continue;
        };
        r.seen.seqc.see(seq);
        r.progressed = true;
        match s.kind {
            "stream_delta" => {
                r.seen.deltas += 1;
                r.seen.last = Some(now);
                if let Some(ts) = s.ts {
                    hist.record(unix.saturating_sub(ts));
                }
            }
            "complete" => return Ok(Step::Complete),
            "error" => return Err(format!("run error: {}", String::from_utf8_lossy(frame))),
            _ => {}
        }
    }
}

/// Opens `n` sockets to `url` (handshakes one after the other: on loopback
/// a fraction of a millisecond each).
pub fn open(url: &str, n: usize) -> Result<Vec<FanSock>, String> {
    (0..n)
        .map(|_| {
            Ok(FanSock {
                ws: RawWs::connect(url)?,
                url: url.to_string(),
            })
        })
        .collect()
}

/// Reads until a text frame of `kind`; returns it. A close or a
/// `protocol_error` first is an error.
pub fn until_kind(ws: &mut RawWs, kind: &str, deadline: Instant) -> Result<String, String> {
    loop {
        match ws.next(deadline)? {
            RawIn::Text(b) => {
                let s = scan(b);
                if s.kind == kind {
                    return Ok(String::from_utf8_lossy(b).into_owned());
                }
                if s.kind == "protocol_error" {
                    return Err(format!("protocol_error: {}", String::from_utf8_lossy(b)));
                }
            }
            RawIn::Binary => {}
            RawIn::Close(code) => return Err(format!("socket closed with {code:?}")),
            RawIn::Ended => return Err("socket ended".into()),
        }
    }
}

fn send_subscribe(ws: &mut RawWs, session: &str, last_seq: u64) -> Result<(), String> {
    let sub = json!({"type": "chat.subscribe", "sessions": [{"sessionId": session, "lastSeq": last_seq}]});
    ws.send_text(&sub.to_string())
}

/// Subscribes every socket to the live run from seq 0 (all asked first,
/// then each ack read). On another node than the run's (`remote`), the
/// node may not know of the run yet when the sender has just seen its
/// first events (its start reaches Redis a moment later): such a socket
/// asks again, answered each time, for up to 10 s.
pub fn subscribe_live(socks: &mut [FanSock], session: &str, remote: bool) -> Result<(), String> {
    for s in socks.iter_mut() {
        send_subscribe(&mut s.ws, session, 0)?;
    }
    let deadline = Instant::now() + Duration::from_secs(if remote { 10 } else { 60 });
    for s in socks.iter_mut() {
        loop {
            let ack = until_kind(&mut s.ws, "chat_subscribed", deadline)?;
            if ack.contains("\"isProcessing\":true") {
                break;
            }
            if !remote || Instant::now() > deadline {
                return Err(format!("subscribed to a run that is not processing: {ack}"));
            }
            std::thread::sleep(Duration::from_millis(20));
            send_subscribe(&mut s.ws, session, 0)?;
        }
    }
    Ok(())
}

/// Starts a run that waits on a permission (so subscribers can attach
/// before any event streams); returns the gateway's permission request id.
pub fn start_gated(ws: &mut RawWs, session: &str, prompt: &str) -> Result<String, String> {
    let send = json!({"type": "chat.send", "sessionId": session, "content": format!("permission:Bash {prompt}")});
    ws.send_text(&send.to_string())?;
    let req = until_kind(
        ws,
        "permission_request",
        Instant::now() + Duration::from_secs(30),
    )?;
    crate::ws::field_str(&req, "requestId")
        .map(str::to_string)
        .ok_or_else(|| format!("permission_request without requestId: {req}"))
}

pub fn release_gate(ws: &mut RawWs, request_id: &str) -> Result<(), String> {
    let allow = json!({"type": "chat.permission-response", "requestId": request_id, "allow": true});
    ws.send_text(&allow.to_string())
}
