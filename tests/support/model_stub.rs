//! A tiny HTTP/1.1 server for model-API stand-ins ([`super::openai`], [`super::gemini`]).
//!
//! Plain std threads + `std::net`, like [`super::anthropic`]: one accept thread, one thread per
//! connection, one request per connection (`connection: close`), every request recorded. The
//! stand-ins decide their reply from trigger words in the newest user prompt ([`Script`]), so one
//! table-driven test can send the same prompts to every provider:
//!
//! | prompt contains | reply |
//! |---|---|
//! | `RUNCMD: <cmd>` | a shell tool call running `<cmd>`; once the tool output comes back: `ran: <output>` |
//! | `RECALL` | `history: <every user text in the request, joined by " | ">` (proves resume sent the history) |
//! | `FAIL400` | HTTP 400 with the message `stand-in bad request` |
//! | anything else | `pong: <prompt>`, streamed in several chunks |

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::Value;

/// Largest request head accepted.
const MAX_HEAD_BYTES: usize = 64 * 1024;
/// Largest request body accepted (Codex sends its whole history and tool list every call).
const MAX_BODY_BYTES: usize = 32 * 1024 * 1024;
/// A connection that sends nothing for this long is dropped.
const READ_TIMEOUT: Duration = Duration::from_secs(30);
/// How often the accept loop checks for shutdown.
const ACCEPT_POLL: Duration = Duration::from_millis(20);
/// Message of every scripted API failure.
pub const FAIL_MESSAGE: &str = "stand-in bad request";

/// What the newest user prompt asks the stand-in to do.
#[derive(Debug, Clone, PartialEq)]
pub enum Script {
    RunCommand(String),
    Recall,
    Fail400,
    Text(String),
}

impl Script {
    pub fn of(prompt: &str) -> Script {
        if let Some((_, cmd)) = prompt.split_once("RUNCMD:") {
            Script::RunCommand(cmd.trim().to_string())
        } else if prompt.contains("RECALL") {
            Script::Recall
        } else if prompt.contains("FAIL400") {
            Script::Fail400
        } else {
            Script::Text(prompt.trim().to_string())
        }
    }
}

/// The text reply chunks for a plain prompt: `pong: <prompt>` in three pieces.
pub fn pong_chunks(prompt: &str) -> Vec<String> {
    let prompt: String = prompt.chars().take(200).collect();
    let mid = prompt
        .char_indices()
        .nth(prompt.chars().count() / 2)
        .map_or(prompt.len(), |(i, _)| i);
    vec![
        "pong: ".to_string(),
        prompt[..mid].to_string(),
        prompt[mid..].to_string(),
    ]
}

/// The `RECALL` reply from the user texts of a request.
pub fn recall_text(user_texts: &[String]) -> String {
    format!("history: {}", user_texts.join(" | "))
}

/// One request as received.
#[derive(Debug, Clone)]
pub struct Request {
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
    /// The body parsed as JSON (`Null` when it is not JSON).
    pub json: Value,
}

impl Request {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Whether the raw JSON body mentions `needle` anywhere.
    pub fn contains_text(&self, needle: &str) -> bool {
        self.json.to_string().contains(needle)
    }
}

/// Writes one response.
pub struct Responder {
    stream: TcpStream,
    started: bool,
}

impl Responder {
    /// A complete JSON response.
    pub fn json(&mut self, status: u16, body: &Value) {
        let body = body.to_string();
        let head = format!(
            "HTTP/1.1 {status} {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
            reason(status),
            body.len()
        );
        let _ = self.stream.write_all(head.as_bytes());
        let _ = self.stream.write_all(body.as_bytes());
        let _ = self.stream.flush();
    }

    /// Sends one SSE `data:` event (the head goes out first). `false` when the client is gone.
    pub fn sse(&mut self, data: &str) -> bool {
        if !self.started {
            self.started = true;
            let head = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\nconnection: close\r\n\r\n";
            if self.stream.write_all(head.as_bytes()).is_err() {
                return false;
            }
        }
        self.stream
            .write_all(format!("data: {data}\n\n").as_bytes())
            .and_then(|_| self.stream.flush())
            .is_ok()
    }

    /// Sends a JSON value as one SSE event.
    pub fn sse_json(&mut self, value: &Value) -> bool {
        self.sse(&value.to_string())
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        500 => "Internal Server Error",
        _ => "Status",
    }
}

type Handler = dyn Fn(&Request, &mut Responder) + Send + Sync;

struct Shared {
    requests: Mutex<Vec<Request>>,
    arrived: Condvar,
}

/// A running stand-in server; stopped when dropped.
pub struct StubServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    stop: Arc<AtomicBool>,
    accept: Option<JoinHandle<()>>,
}

impl StubServer {
    /// Binds 127.0.0.1:0 and serves every request with `handler`.
    pub fn start(handler: impl Fn(&Request, &mut Responder) + Send + Sync + 'static) -> StubServer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind stand-in");
        listener
            .set_nonblocking(true)
            .expect("non-blocking listener");
        let addr = listener.local_addr().expect("stand-in address");
        let shared = Arc::new(Shared {
            requests: Mutex::new(Vec::new()),
            arrived: Condvar::new(),
        });
        let stop = Arc::new(AtomicBool::new(false));
        let handler: Arc<Handler> = Arc::new(handler);
        let accept = {
            let (shared, stop) = (shared.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((stream, _)) => {
                            let (shared, handler) = (shared.clone(), handler.clone());
                            std::thread::spawn(move || serve(stream, &shared, &*handler));
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                            std::thread::sleep(ACCEPT_POLL)
                        }
                        Err(_) => std::thread::sleep(ACCEPT_POLL),
                    }
                }
            })
        };
        StubServer {
            addr,
            shared,
            stop,
            accept: Some(accept),
        }
    }

    /// `http://127.0.0.1:PORT`
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every request received so far.
    pub fn requests(&self) -> Vec<Request> {
        self.shared
            .requests
            .lock()
            .map(|r| r.clone())
            .unwrap_or_default()
    }

    /// Waits (bounded) until `n` requests arrived; panics with the count otherwise.
    pub fn wait_for_requests(&self, n: usize, timeout: Duration) -> Vec<Request> {
        let deadline = Instant::now() + timeout;
        let mut guard = self
            .shared
            .requests
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        while guard.len() < n {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "stand-in got {} requests, expected {n}",
                guard.len()
            );
            guard = self
                .shared
                .arrived
                .wait_timeout(guard, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        guard.clone()
    }
}

impl Drop for StubServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
    }
}

fn serve(stream: TcpStream, shared: &Shared, handler: &Handler) {
    let _ = stream.set_read_timeout(Some(READ_TIMEOUT));
    let _ = stream.set_nonblocking(false);
    let Ok(write_half) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(stream);
    let Some(request) = read_request(&mut reader) else {
        return;
    };
    if let Ok(mut list) = shared.requests.lock() {
        list.push(request.clone());
    }
    shared.arrived.notify_all();
    let mut responder = Responder {
        stream: write_half,
        started: false,
    };
    handler(&request, &mut responder);
    let _ = responder.stream.shutdown(std::net::Shutdown::Both);
}

fn read_request(reader: &mut BufReader<TcpStream>) -> Option<Request> {
    let mut head_bytes = 0;
    let mut line = String::new();
    reader.read_line(&mut line).ok()?;
    let mut parts = line.split_whitespace();
    let method = parts.next()?.to_string();
    let path = parts.next()?.to_string();
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        let n = reader.read_line(&mut h).ok()?;
        head_bytes += n;
        if n == 0 || head_bytes > MAX_HEAD_BYTES {
            return None;
        }
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.push((k.trim().to_string(), v.trim().to_string()));
        }
    }
    let header = |name: &str| {
        headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.clone())
    };
    let body = if header("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
        read_chunked(reader)?
    } else {
        let len: usize = header("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        if len > MAX_BODY_BYTES {
            return None;
        }
        let mut body = vec![0; len];
        reader.read_exact(&mut body).ok()?;
        body
    };
    Some(Request {
        method,
        path,
        headers,
        json: serde_json::from_slice(&body).unwrap_or(Value::Null),
    })
}

fn read_chunked(reader: &mut BufReader<TcpStream>) -> Option<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let mut size_line = String::new();
        reader.read_line(&mut size_line).ok()?;
        let size = usize::from_str_radix(size_line.trim().split(';').next()?, 16).ok()?;
        if body.len() + size > MAX_BODY_BYTES {
            return None;
        }
        let mut chunk = vec![0; size + 2]; // data + CRLF
        reader.read_exact(&mut chunk).ok()?;
        if size == 0 {
            return Some(body);
        }
        body.extend_from_slice(&chunk[..size]);
    }
}
