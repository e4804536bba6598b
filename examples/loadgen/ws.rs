//! WebSocket client side of the load generator: awc sockets on the actix
//! (single-threaded tokio) runtime, and a cheap scanner for the few fields
//! of a server frame the benchmarks need (no full JSON parse per event, so
//! the client stays far cheaper than the gateway it measures).

use std::sync::LazyLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use actix_codec::Framed;
use actix_web::web::Bytes;
use awc::ws::{Codec, Frame, Message};
use awc::BoxedSocket;
use futures_util::{SinkExt, StreamExt};
use memchr::memmem::Finder;
use tokio::time::Instant;

pub type Ws = Framed<BoxedSocket, Codec>;

/// Largest frame the client accepts (slow-client events are 16 KiB; replay batches are many frames).
const MAX_FRAME: usize = 64 * 1024 * 1024;
/// Handshake timeout per socket.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// One awc client for many sockets, without awc's default limit of 100 connections.
pub fn client() -> awc::Client {
    awc::Client::builder()
        .timeout(CONNECT_TIMEOUT)
        .max_http_version(awc::http::Version::HTTP_11)
        .connector(awc::Connector::new().limit(0).timeout(CONNECT_TIMEOUT))
        .finish()
}

pub async fn connect(client: &awc::Client, url: &str) -> Result<Ws, String> {
    match client.ws(url).max_frame_size(MAX_FRAME).connect().await {
        Ok((_, framed)) => Ok(framed),
        Err(e) => Err(format!("connect {}: {e}", redact(url))),
    }
}

fn redact(url: &str) -> String {
    match url.split_once("token=") {
        Some((a, _)) => format!("{a}token=REDACTED"),
        None => url.to_string(),
    }
}

/// What a socket yields to the benchmarks.
pub enum In {
    Text(Bytes),
    Binary,
    Close(Option<u16>),
    /// The connection ended without a close frame.
    Ended,
}

/// The next data frame or close, answering pings; `Err` after `deadline`.
pub async fn recv(ws: &mut Ws, deadline: Instant) -> Result<In, String> {
    loop {
        let frame = match tokio::time::timeout_at(deadline, ws.next()).await {
            Err(_) => return Err("timed out waiting for a frame".into()),
            Ok(None) => return Ok(In::Ended),
            Ok(Some(Err(e))) => return Err(format!("protocol error: {e}")),
            Ok(Some(Ok(f))) => f,
        };
        match frame {
            Frame::Text(b) => return Ok(In::Text(b)),
            Frame::Binary(_) => return Ok(In::Binary),
            Frame::Close(reason) => return Ok(In::Close(reason.map(|r| u16::from(r.code)))),
            Frame::Ping(p) => {
                let _ = ws.send(Message::Pong(p)).await;
            }
            Frame::Pong(_) | Frame::Continuation(_) => {}
        }
    }
}

/// The next text frame; a close or the end of the stream is an error.
pub async fn recv_text(ws: &mut Ws, deadline: Instant) -> Result<Bytes, String> {
    loop {
        match recv(ws, deadline).await? {
            In::Text(b) => return Ok(b),
            In::Binary => {}
            In::Close(code) => return Err(format!("socket closed with {code:?}")),
            In::Ended => return Err("socket ended".into()),
        }
    }
}

pub async fn send_text(ws: &mut Ws, text: String) -> Result<(), String> {
    ws.send(Message::Text(text.into()))
        .await
        .map_err(|e| format!("send: {e}"))
}

pub async fn send_json(ws: &mut Ws, v: &serde_json::Value) -> Result<(), String> {
    send_text(ws, v.to_string()).await
}

/// Wall clock in unix nanoseconds (the fake provider stamps events with the same clock).
pub fn unix_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// The fields of a server frame the benchmarks look at.
#[derive(Debug, Default, Clone, Copy)]
pub struct Scan<'a> {
    pub kind: &'a str,
    pub seq: Option<u64>,
    /// Provider send time (`t=<nanos>;` at the start of a delta's content).
    pub ts: Option<u64>,
}

/// The decimal number at the start of `b`.
fn digits(b: &[u8]) -> Option<u64> {
    let end = b
        .iter()
        .position(|c| !c.is_ascii_digit())
        .unwrap_or(b.len());
    if end == 0 || end > 19 {
        return None;
    }
    Some(b[..end].iter().fold(0, |n, c| n * 10 + u64::from(c - b'0')))
}

/// Finds `"key":"value"` and returns `value` (no escapes expected).
pub fn field_str<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    let pat = format!("\"{key}\":\"");
    let start = text.find(&pat)? + pat.len();
    let rest = text.get(start..)?;
    rest.find('"').and_then(|end| rest.get(..end))
}

/// The keys [`scan`] looks for, each searched for once per frame with
/// memchr's SIMD substring search (`str::find` built a searcher per call
/// and was most of fanout's reader CPU: about 0.3 us a frame).
static SEQ_KEY: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\"seq\":"));
static KIND_KEY: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\"kind\":\""));
static STAMP_KEY: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\"content\":\"t="));

/// A reader's view of a frame: its seq and [`scan`] when it carries a seq,
/// `None` for frames without one (acks, notices), an error for
/// `protocol_error`.
pub fn sequenced(frame: &[u8]) -> Result<Option<(u64, Scan<'_>)>, String> {
    let s = scan(frame);
    match s.seq {
        Some(seq) => Ok(Some((seq, s))),
        None if s.kind == "protocol_error" => Err(format!(
            "protocol_error: {}",
            String::from_utf8_lossy(frame)
        )),
        None => Ok(None),
    }
}

/// The seq, kind and stamp of a server frame, from its bytes (keys are
/// found where they are, in any order; a key's quotes cannot occur inside
/// a JSON string, where a quote is escaped).
pub fn scan(frame: &[u8]) -> Scan<'_> {
    let mut out = Scan::default();
    if let Some(i) = SEQ_KEY.find(frame) {
        out.seq = digits(&frame[i + 6..]);
    }
    if let Some(i) = KIND_KEY.find(frame) {
        let rest = &frame[i + 8..];
        if let Some(end) = memchr::memchr(b'"', rest) {
            out.kind = std::str::from_utf8(&rest[..end]).unwrap_or("");
        }
    }
    if out.kind == "stream_delta" {
        if let Some(i) = STAMP_KEY.find(frame) {
            out.ts = digits(&frame[i + 13..]);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scans_an_event_frame() {
        let f = br#"{"id":"r:7","sessionId":"s","timestamp":"x","provider":"claude","seq":7,"runId":"r","kind":"stream_delta","content":"t=1234;0:xx "}"#;
        let s = scan(f);
        assert_eq!((s.kind, s.seq, s.ts), ("stream_delta", Some(7), Some(1234)));
        let ack = br#"{"kind":"chat_subscribed","lastSeq":9,"sessionId":"s"}"#;
        let s = scan(ack);
        assert_eq!((s.kind, s.seq), ("chat_subscribed", None));
        assert_eq!(
            field_str(std::str::from_utf8(ack).unwrap(), "sessionId"),
            Some("s")
        );
    }
}
