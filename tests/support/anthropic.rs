//! A scripted stand-in for the Anthropic Messages API, so the real Claude Code CLI runs offline.
//!
//! Plain std threads + `std::net` (independent of any async runtime): one accept thread, one
//! thread per connection, every response ends with `connection: close`. What Claude Code 2.1.330
//! really calls (see /work/notes/claude-cli.md): `POST /v1/messages?beta=true` with `"stream":true`
//! (SSE), and after a broken stream a NON-streaming `POST /v1/messages` fallback. Both consume the
//! next scripted [`Reply`] (or the default one when the queue is empty). `POST .../count_tokens` is
//! answered without touching the queue; anything else gets a 404 (and is still logged).
//!
//! Usage:
//! ```ignore
//! let stub = AnthropicStub::start();
//! stub.push(Reply::bash("echo made > made.txt"));   // 1st model call: ask to run a tool
//! stub.push(Reply::text("done"));                   // 2nd model call (carries the tool_result)
//! cmd.envs(stub.claude_env(home.path()));
//! // ... run the turn ...
//! let reqs = stub.wait_for_requests(2, Duration::from_secs(20));
//! assert!(reqs[1].contains_text("made"));
//! ```

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// Largest request head we accept (Claude's headers are ~1 KB).
const MAX_HEAD_BYTES: usize = 64 * 1024;
/// Largest request body we accept (Claude's first request is ~55-90 KB; long histories grow).
const MAX_BODY_BYTES: usize = 32 * 1024 * 1024;
/// A connection that sends nothing for this long is dropped.
const READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Text of the reply used when the queue is empty (unless [`AnthropicStub::set_default`]).
pub const DEFAULT_REPLY_TEXT: &str = "Hello from the stand-in.";

/// One scripted answer to one model call.
#[derive(Clone, Debug)]
pub enum Reply {
    /// Streamed text: one `text_delta` per chunk, `delay` slept after each delta (slow streams
    /// for abort tests). Non-streaming calls get the joined text.
    Text {
        chunks: Vec<String>,
        delay: Duration,
    },
    /// An optional text block, then one `tool_use` block; `stop_reason: "tool_use"`. The CLI
    /// then (after permission) runs the tool and calls the API again with the `tool_result`.
    ToolUse {
        text: Option<String>,
        id: String,
        name: String,
        input: Value,
    },
    /// An HTTP error with an Anthropic error body, e.g. 500 `api_error`, 529 `overloaded_error`.
    /// Note: the CLI retries 5xx/529 (set `CLAUDE_CODE_MAX_RETRIES=0`, as [`AnthropicStub::claude_env`]
    /// does) and re-sends a 400 about 6 times with fewer beta features; use
    /// [`AnthropicStub::set_default`] or [`AnthropicStub::push_n`] to fail every attempt.
    HttpError {
        status: u16,
        error_type: String,
        message: String,
    },
    /// HTTP 200 + `message_start`, then an SSE `error` event. The CLI then falls back to a
    /// non-streaming request, which takes the NEXT reply.
    SseError { error_type: String, message: String },
}

impl Reply {
    /// Text streamed as a single delta.
    pub fn text(text: &str) -> Reply {
        Reply::Text {
            chunks: vec![text.to_string()],
            delay: Duration::ZERO,
        }
    }

    /// Text streamed as the given deltas, in order.
    pub fn chunks<S: Into<String>>(chunks: impl IntoIterator<Item = S>) -> Reply {
        Reply::Text {
            chunks: chunks.into_iter().map(Into::into).collect(),
            delay: Duration::ZERO,
        }
    }

    /// `n` deltas `"w0 "`, `"w1 "`, ... (full text: [`Reply::full_text`]).
    pub fn numbered(n: usize) -> Reply {
        Reply::chunks((0..n).map(|i| format!("w{i} ")))
    }

    /// Sleep `delay` after every text delta (only for [`Reply::Text`]).
    pub fn with_delay(self, delay: Duration) -> Reply {
        match self {
            Reply::Text { chunks, .. } => Reply::Text { chunks, delay },
            other => other,
        }
    }

    /// A `Bash` tool call running `command` (in default permission mode the CLI asks
    /// `can_use_tool` first).
    pub fn bash(command: &str) -> Reply {
        Reply::tool_use(
            "Bash",
            json!({ "command": command, "description": "Run a command for the test" }),
        )
    }

    /// A call of tool `name` with `input`, preceded by a short text block.
    pub fn tool_use(name: &str, input: Value) -> Reply {
        static NEXT_TOOL_ID: AtomicU64 = AtomicU64::new(1);
        Reply::ToolUse {
            text: Some("Let me do that.".to_string()),
            id: format!(
                "toolu_stub{:04}",
                NEXT_TOOL_ID.fetch_add(1, Ordering::Relaxed)
            ),
            name: name.to_string(),
            input,
        }
    }

    /// HTTP error `status` with a matching Anthropic error type (529 overloaded, 500 api_error,
    /// 429 rate_limit, 4xx invalid_request).
    pub fn http_error(status: u16, message: &str) -> Reply {
        let error_type = match status {
            529 => "overloaded_error",
            429 => "rate_limit_error",
            401 => "authentication_error",
            400..=499 => "invalid_request_error",
            _ => "api_error",
        };
        Reply::HttpError {
            status,
            error_type: error_type.to_string(),
            message: message.to_string(),
        }
    }

    /// Mid-stream SSE `error` event (`overloaded_error`).
    pub fn sse_error(message: &str) -> Reply {
        Reply::SseError {
            error_type: "overloaded_error".to_string(),
            message: message.to_string(),
        }
    }

    /// The text this reply streams (what ends up in the CLI's `result` line for a text reply).
    pub fn full_text(&self) -> String {
        match self {
            Reply::Text { chunks, .. } => chunks.concat(),
            Reply::ToolUse { text, .. } => text.clone().unwrap_or_default(),
            _ => String::new(),
        }
    }
}

/// One request as received by the stand-in.
#[derive(Clone, Debug)]
pub struct RecordedRequest {
    pub method: String,
    /// Path with query, e.g. `/v1/messages?beta=true`.
    pub path: String,
    /// Header names lower-cased.
    pub headers: Vec<(String, String)>,
    /// Parsed JSON body (`Value::Null` when empty or not JSON).
    pub body: Value,
}

impl RecordedRequest {
    /// First header value with this (case-insensitive) name.
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
    }

    /// A model call (`POST /v1/messages...`, not count_tokens).
    pub fn is_messages_call(&self) -> bool {
        self.method == "POST"
            && self.path.starts_with("/v1/messages")
            && !self.path.contains("count_tokens")
    }

    /// `body.stream == true`.
    pub fn is_stream(&self) -> bool {
        self.body.get("stream").and_then(Value::as_bool) == Some(true)
    }

    /// `body.model`.
    pub fn model(&self) -> Option<&str> {
        self.body.get("model").and_then(Value::as_str)
    }

    /// Every `(role, text)` of `body.messages`: text blocks, tool_result contents (as text) and
    /// tool_use inputs (as JSON), in order. The CLI's own `<system-reminder>` blocks are included.
    pub fn message_texts(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        let Some(messages) = self.body.get("messages").and_then(Value::as_array) else {
            return out;
        };
        for m in messages {
            let role = m
                .get("role")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string();
            match m.get("content") {
                Some(Value::String(s)) => out.push((role, s.clone())),
                Some(Value::Array(blocks)) => {
                    for b in blocks {
                        let text = match b.get("type").and_then(Value::as_str) {
                            Some("text") => {
                                b.get("text").and_then(Value::as_str).map(str::to_string)
                            }
                            Some("tool_result") => match b.get("content") {
                                Some(Value::String(s)) => Some(s.clone()),
                                Some(other) => Some(other.to_string()),
                                None => None,
                            },
                            Some("tool_use") => b.get("input").map(Value::to_string),
                            _ => None,
                        };
                        if let Some(t) = text {
                            out.push((role.clone(), t));
                        }
                    }
                }
                _ => {}
            }
        }
        out
    }

    /// True if any message text (see [`RecordedRequest::message_texts`]) contains `needle`.
    pub fn contains_text(&self, needle: &str) -> bool {
        self.message_texts().iter().any(|(_, t)| t.contains(needle))
    }

    /// The newest user-typed text: the last `text` block of the last `user` message that is not
    /// a `<system-reminder>` (None if the last user message only carries tool results).
    pub fn last_user_text(&self) -> Option<String> {
        let messages = self.body.get("messages")?.as_array()?;
        let last_user = messages
            .iter()
            .rev()
            .find(|m| m.get("role").and_then(Value::as_str) == Some("user"))?;
        match last_user.get("content")? {
            Value::String(s) => Some(s.clone()),
            Value::Array(blocks) => blocks
                .iter()
                .rev()
                .filter(|b| b.get("type").and_then(Value::as_str) == Some("text"))
                .filter_map(|b| b.get("text").and_then(Value::as_str))
                .find(|t| !t.starts_with("<system-reminder>"))
                .map(str::to_string),
            _ => None,
        }
    }

    /// `tool_result` blocks of the last message: `(tool_use_id, content text, is_error)`.
    pub fn tool_results(&self) -> Vec<(String, String, bool)> {
        let Some(last) = self
            .body
            .get("messages")
            .and_then(Value::as_array)
            .and_then(|m| m.last())
        else {
            return Vec::new();
        };
        let Some(blocks) = last.get("content").and_then(Value::as_array) else {
            return Vec::new();
        };
        blocks
            .iter()
            .filter(|b| b.get("type").and_then(Value::as_str) == Some("tool_result"))
            .map(|b| {
                let id = b.get("tool_use_id").and_then(Value::as_str).unwrap_or("");
                let content = match b.get("content") {
                    Some(Value::String(s)) => s.clone(),
                    Some(other) => other.to_string(),
                    None => String::new(),
                };
                let is_error = b.get("is_error").and_then(Value::as_bool) == Some(true);
                (id.to_string(), content, is_error)
            })
            .collect()
    }
}

#[derive(Default)]
struct State {
    queue: VecDeque<Reply>,
    default: Option<Reply>,
    requests: Vec<RecordedRequest>,
    /// Streams the client closed before we finished writing (e.g. after an interrupt).
    aborted_streams: usize,
}

struct Shared {
    state: Mutex<State>,
    /// Notified on every new request and every aborted stream.
    changed: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panicking connection thread must not take the whole stand-in down.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Handle of a running stand-in; dropping it stops accepting connections.
pub struct AnthropicStub {
    addr: SocketAddr,
    shared: Arc<Shared>,
    stop: Arc<AtomicBool>,
    accept_thread: Option<JoinHandle<()>>,
}

impl AnthropicStub {
    /// Binds 127.0.0.1:0 and starts serving.
    ///
    /// # Panics
    /// If the port cannot be bound.
    pub fn start() -> AnthropicStub {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind Anthropic stand-in");
        let addr = listener.local_addr().expect("stand-in local addr");
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            changed: Condvar::new(),
        });
        let stop = Arc::new(AtomicBool::new(false));
        let accept_thread = {
            let shared = Arc::clone(&shared);
            let stop = Arc::clone(&stop);
            std::thread::Builder::new()
                .name("anthropic-stub-accept".into())
                .spawn(move || {
                    for conn in listener.incoming() {
                        if stop.load(Ordering::SeqCst) {
                            break;
                        }
                        let Ok(stream) = conn else { continue };
                        let shared = Arc::clone(&shared);
                        let _ = std::thread::Builder::new()
                            .name("anthropic-stub-conn".into())
                            .spawn(move || handle_connection(stream, &shared));
                    }
                })
                .expect("spawn stand-in accept thread")
        };
        AnthropicStub {
            addr,
            shared,
            stop,
            accept_thread: Some(accept_thread),
        }
    }

    /// `http://127.0.0.1:PORT` - the value for `ANTHROPIC_BASE_URL`.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Queues `reply` for the next model call.
    pub fn push(&self, reply: Reply) {
        self.shared.lock().queue.push_back(reply);
    }

    /// Queues `reply` for the next `n` model calls (e.g. an error that must survive retries).
    pub fn push_n(&self, reply: Reply, n: usize) {
        let mut st = self.shared.lock();
        for _ in 0..n {
            st.queue.push_back(reply.clone());
        }
    }

    /// Reply used whenever the queue is empty (initially `Reply::text(DEFAULT_REPLY_TEXT)`).
    pub fn set_default(&self, reply: Reply) {
        self.shared.lock().default = Some(reply);
    }

    /// Scripted replies not yet consumed.
    pub fn queued(&self) -> usize {
        self.shared.lock().queue.len()
    }

    /// Every request received so far, in arrival order.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.shared.lock().requests.clone()
    }

    /// Only the model calls (`POST /v1/messages`, streaming or not).
    pub fn message_requests(&self) -> Vec<RecordedRequest> {
        self.requests()
            .into_iter()
            .filter(RecordedRequest::is_messages_call)
            .collect()
    }

    /// Waits until at least `n` model calls arrived and returns them all.
    ///
    /// # Panics
    /// After `timeout`, listing what did arrive.
    pub fn wait_for_requests(&self, n: usize, timeout: Duration) -> Vec<RecordedRequest> {
        let deadline = Instant::now() + timeout;
        let mut st = self.shared.lock();
        loop {
            let calls: Vec<RecordedRequest> = st
                .requests
                .iter()
                .filter(|r| r.is_messages_call())
                .cloned()
                .collect();
            if calls.len() >= n {
                return calls;
            }
            let now = Instant::now();
            if now >= deadline {
                let seen: Vec<String> = st
                    .requests
                    .iter()
                    .map(|r| format!("{} {}", r.method, r.path))
                    .collect();
                panic!(
                    "Anthropic stand-in: expected {n} model calls within {timeout:?}, got {}: {seen:?}",
                    calls.len()
                );
            }
            st = self
                .shared
                .changed
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Number of SSE responses the client closed before the stand-in finished writing them.
    pub fn aborted_streams(&self) -> usize {
        self.shared.lock().aborted_streams
    }

    /// Waits until at least `n` streams were closed early by the client (e.g. after interrupt).
    ///
    /// # Panics
    /// After `timeout`.
    pub fn wait_for_aborted_streams(&self, n: usize, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let mut st = self.shared.lock();
        while st.aborted_streams < n {
            let now = Instant::now();
            if now >= deadline {
                panic!(
                    "Anthropic stand-in: expected {n} client-aborted streams within {timeout:?}, got {}",
                    st.aborted_streams
                );
            }
            st = self
                .shared
                .changed
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Environment for a Claude Code child process using this stand-in, with `home` as `HOME`:
    /// `ANTHROPIC_BASE_URL`, `ANTHROPIC_API_KEY=test`, `CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC=1`,
    /// `CLAUDE_CODE_MAX_RETRIES=0` (errors end the turn at once instead of ~10 backoff retries)
    /// and `IS_SANDBOX=1` (lets `--permission-mode bypassPermissions` run as root, as in CI).
    pub fn claude_env(&self, home: &Path) -> Vec<(String, String)> {
        [
            ("ANTHROPIC_BASE_URL", self.base_url()),
            ("ANTHROPIC_API_KEY", "test".to_string()),
            ("CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC", "1".to_string()),
            ("CLAUDE_CODE_MAX_RETRIES", "0".to_string()),
            ("IS_SANDBOX", "1".to_string()),
            ("HOME", home.display().to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }
}

impl Drop for AnthropicStub {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the blocking accept() so the thread sees the flag.
        let _ = TcpStream::connect(self.addr);
        if let Some(t) = self.accept_thread.take() {
            let _ = t.join();
        }
    }
}

fn handle_connection(stream: TcpStream, shared: &Shared) {
    let _ = stream.set_read_timeout(Some(READ_TIMEOUT));
    let _ = stream.set_nodelay(true);
    let Ok(read_half) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(read_half);
    let mut writer = stream;
    let Some(request) = read_request(&mut reader) else {
        return;
    };

    let is_call = request.is_messages_call();
    let is_count = request.method == "POST" && request.path.contains("count_tokens");
    let stream_wanted = request.is_stream();
    let model = request.model().unwrap_or("claude-stub").to_string();
    let reply = {
        let mut st = shared.lock();
        st.requests.push(request);
        shared.changed.notify_all();
        if is_call {
            Some(match st.queue.pop_front() {
                Some(r) => r,
                None => st
                    .default
                    .clone()
                    .unwrap_or_else(|| Reply::text(DEFAULT_REPLY_TEXT)),
            })
        } else {
            None
        }
    };

    let result = match reply {
        None if is_count => write_json(&mut writer, 200, &json!({ "input_tokens": 10 })),
        None => write_json(
            &mut writer,
            404,
            &json!({"type": "error", "error": {"type": "not_found_error", "message": "not served by the stand-in"}}),
        ),
        Some(reply) if stream_wanted => write_stream(&mut writer, &reply, &model),
        Some(reply) => write_non_stream(&mut writer, &reply, &model),
    };
    if result.is_err() && stream_wanted {
        shared.lock().aborted_streams += 1;
        shared.changed.notify_all();
    }
}

/// Reads one HTTP/1.1 request (Content-Length or chunked body). None on malformed input.
fn read_request(reader: &mut BufReader<TcpStream>) -> Option<RecordedRequest> {
    let mut head_len = 0usize;
    let mut line = String::new();
    reader.read_line(&mut line).ok()?;
    head_len += line.len();
    let mut parts = line.split_whitespace();
    let method = parts.next()?.to_string();
    let path = parts.next()?.to_string();
    let mut headers = Vec::new();
    loop {
        line.clear();
        let n = reader.read_line(&mut line).ok()?;
        head_len += n;
        if n == 0 || head_len > MAX_HEAD_BYTES {
            return None;
        }
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        let (k, v) = l.split_once(':')?;
        headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
    }
    let get = |name: &str| {
        headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    };
    let mut body = Vec::new();
    if get("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
        loop {
            line.clear();
            reader.read_line(&mut line).ok()?;
            let size = usize::from_str_radix(line.trim().split(';').next()?, 16).ok()?;
            if size == 0 {
                line.clear();
                let _ = reader.read_line(&mut line);
                break;
            }
            if body.len() + size > MAX_BODY_BYTES {
                return None;
            }
            let start = body.len();
            body.resize(start + size, 0);
            reader.read_exact(&mut body[start..]).ok()?;
            line.clear();
            reader.read_line(&mut line).ok()?;
        }
    } else if let Some(len) = get("content-length").and_then(|v| v.parse::<usize>().ok()) {
        if len > MAX_BODY_BYTES {
            return None;
        }
        body.resize(len, 0);
        reader.read_exact(&mut body).ok()?;
    }
    let body = serde_json::from_slice(&body).unwrap_or(Value::Null);
    Some(RecordedRequest {
        method,
        path,
        headers,
        body,
    })
}

fn status_text(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        529 => "Overloaded",
        _ => "Error",
    }
}

fn write_json(w: &mut TcpStream, status: u16, body: &Value) -> std::io::Result<()> {
    let body = body.to_string();
    let response = format!(
        "HTTP/1.1 {status} {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nrequest-id: req_stub\r\nconnection: close\r\n\r\n{body}",
        status_text(status),
        body.len()
    );
    w.write_all(response.as_bytes())
}

fn error_body(error_type: &str, message: &str) -> Value {
    json!({ "type": "error", "error": { "type": error_type, "message": message } })
}

fn next_message_id() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    format!("msg_stub{:05}", NEXT.fetch_add(1, Ordering::Relaxed))
}

fn usage(output_tokens: usize) -> Value {
    json!({ "input_tokens": 10, "output_tokens": output_tokens,
            "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0 })
}

fn write_non_stream(w: &mut TcpStream, reply: &Reply, model: &str) -> std::io::Result<()> {
    let (content, stop_reason) = match reply {
        Reply::HttpError {
            status,
            error_type,
            message,
        } => return write_json(w, *status, &error_body(error_type, message)),
        Reply::SseError {
            error_type,
            message,
        } => return write_json(w, 529, &error_body(error_type, message)),
        Reply::Text { chunks, .. } => (
            json!([{ "type": "text", "text": chunks.concat() }]),
            "end_turn",
        ),
        Reply::ToolUse {
            text,
            id,
            name,
            input,
        } => {
            let mut blocks = Vec::new();
            if let Some(t) = text {
                blocks.push(json!({ "type": "text", "text": t }));
            }
            blocks.push(json!({ "type": "tool_use", "id": id, "name": name, "input": input }));
            (Value::Array(blocks), "tool_use")
        }
    };
    let msg = json!({
        "id": next_message_id(), "type": "message", "role": "assistant", "model": model,
        "content": content, "stop_reason": stop_reason, "stop_sequence": null, "usage": usage(3),
    });
    write_json(w, 200, &msg)
}

fn sse(w: &mut TcpStream, event: &str, data: &Value) -> std::io::Result<()> {
    // One write per event: a slow stream must reach the client event by event.
    w.write_all(format!("event: {event}\ndata: {data}\n\n").as_bytes())
}

fn write_stream(w: &mut TcpStream, reply: &Reply, model: &str) -> std::io::Result<()> {
    if let Reply::HttpError {
        status,
        error_type,
        message,
    } = reply
    {
        return write_json(w, *status, &error_body(error_type, message));
    }
    w.write_all(
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\nrequest-id: req_stub\r\nconnection: close\r\n\r\n",
    )?;
    let id = next_message_id();
    sse(
        w,
        "message_start",
        &json!({"type": "message_start", "message": {
            "id": id, "type": "message", "role": "assistant", "model": model, "content": [],
            "stop_reason": null, "stop_sequence": null, "usage": usage(1) }}),
    )?;
    let (stop_reason, output_tokens) = match reply {
        Reply::SseError {
            error_type,
            message,
        } => {
            return sse(w, "error", &error_body(error_type, message));
        }
        Reply::HttpError { .. } => unreachable!("handled above"),
        Reply::Text { chunks, delay } => {
            text_block(w, 0, chunks, *delay)?;
            ("end_turn", chunks.len())
        }
        Reply::ToolUse {
            text,
            id,
            name,
            input,
        } => {
            let mut index = 0;
            if let Some(t) = text {
                text_block(w, 0, std::slice::from_ref(t), Duration::ZERO)?;
                index = 1;
            }
            sse(
                w,
                "content_block_start",
                &json!({"type": "content_block_start", "index": index,
                        "content_block": {"type": "tool_use", "id": id, "name": name, "input": {}}}),
            )?;
            // Split the JSON in two deltas, as the real API streams it in pieces.
            let json_text = input.to_string();
            let mid = json_text.len() / 2;
            let split = (0..=mid)
                .rev()
                .find(|i| json_text.is_char_boundary(*i))
                .unwrap_or(0);
            for part in [&json_text[..split], &json_text[split..]] {
                sse(
                    w,
                    "content_block_delta",
                    &json!({"type": "content_block_delta", "index": index,
                            "delta": {"type": "input_json_delta", "partial_json": part}}),
                )?;
            }
            sse(
                w,
                "content_block_stop",
                &json!({"type": "content_block_stop", "index": index}),
            )?;
            ("tool_use", 5)
        }
    };
    sse(
        w,
        "message_delta",
        &json!({"type": "message_delta", "delta": {"stop_reason": stop_reason, "stop_sequence": null},
                "usage": {"output_tokens": output_tokens}}),
    )?;
    sse(w, "message_stop", &json!({"type": "message_stop"}))
}

fn text_block(
    w: &mut TcpStream,
    index: usize,
    chunks: &[String],
    delay: Duration,
) -> std::io::Result<()> {
    sse(
        w,
        "content_block_start",
        &json!({"type": "content_block_start", "index": index,
                "content_block": {"type": "text", "text": ""}}),
    )?;
    for chunk in chunks {
        sse(
            w,
            "content_block_delta",
            &json!({"type": "content_block_delta", "index": index,
                    "delta": {"type": "text_delta", "text": chunk}}),
        )?;
        if !delay.is_zero() {
            std::thread::sleep(delay);
        }
    }
    sse(
        w,
        "content_block_stop",
        &json!({"type": "content_block_stop", "index": index}),
    )
}
