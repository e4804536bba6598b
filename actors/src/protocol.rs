//! Wire types of the `/ws` chat protocol (PROTOCOL.md section 4).
//!
//! One serde-tagged enum per direction: inbound frames deserialize into
//! [`ClientMessage`] (tagged by `type`, fields read leniently as the
//! reference reads them: a non-string `content` is `""`), and the gateway's
//! own outbound frames are [`ServerFrame`]s (tagged by `kind`). Provider
//! events are the typed [`EventBody`] kinds, serialized exactly once by the
//! RunRegistry inside an [`Envelope`] and shared as a [`Frame`]; their
//! writer, [`Envelope::to_frame`], is tested byte for byte against serde's
//! output for every kind.

use bytestring::ByteString;
use serde::{Deserialize, Serialize};
use serde_json::Value;

pub(crate) use crate::json_text::{push_json_str, push_u64};

/// One serialized server->client text frame. Cloning shares the bytes: the
/// RunRegistry serializes an event once and hands clones to every subscriber.
pub type Frame = ByteString;

/// Current time as ISO 8601 with milliseconds, e.g. `2026-07-08T10:00:05.120Z`.
/// Formatted once per millisecond per thread: a streaming run stamps
/// hundreds of events within the same millisecond.
pub fn now_iso() -> String {
    let mut now = String::new();
    set_now_iso(&mut now);
    now
}

/// [`now_iso`] into `dst`, which keeps its allocation: the registry stamps
/// every event of a streaming run into the session's last-activity time,
/// which then changes once per millisecond, not once per event.
pub fn set_now_iso(dst: &mut String) {
    thread_local! {
        static LAST: std::cell::RefCell<(u128, String)> = const { std::cell::RefCell::new((0, String::new())) };
    }
    let now = std::time::SystemTime::now();
    let millis = now
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    LAST.with(|last| match last.try_borrow_mut() {
        Ok(mut last) => {
            if last.0 != millis || last.1.is_empty() {
                *last = (millis, humantime::format_rfc3339_millis(now).to_string());
            }
            if *dst != last.1 {
                dst.clear();
                dst.push_str(&last.1);
            }
        }
        Err(_) => *dst = humantime::format_rfc3339_millis(now).to_string(),
    })
}

/// Capacity of the per-thread serialization buffer kept between frames; a
/// bigger one (left by a huge frame) is released instead of kept.
const SCRATCH_KEEP_BYTES: usize = 64 * 1024;

thread_local! {
    /// Reused by [`frame_of`]: serializing into a growing `String` per frame
    /// cost two or three reallocations and left frames in allocations up to
    /// twice their size (kept for minutes in replay buffers).
    static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Serializes a JSON value into a frame (an exact-size allocation). Serializing
/// a `Value` or a derived struct cannot fail (no non-string map keys), so a
/// failure is a bug we log.
pub fn frame_of<T: Serialize>(value: &T) -> Frame {
    let failed = |err: &dyn std::fmt::Display| {
        tracing::error!(%err, "failed to serialize a frame");
        ByteString::from_static("{}")
    };
    SCRATCH.with(|scratch| {
        let Ok(mut buf) = scratch.try_borrow_mut() else {
            // Re-entered from inside a Serialize impl: fall back to a fresh buffer.
            return serde_json::to_string(value)
                .map(ByteString::from)
                .unwrap_or_else(|e| failed(&e));
        };
        buf.clear();
        let frame = match serde_json::to_writer(&mut *buf, value) {
            // serde_json writes UTF-8 only; the check is cheap insurance.
            Ok(()) => std::str::from_utf8(&buf)
                .map(ByteString::from)
                .unwrap_or_else(|e| failed(&e)),
            Err(err) => failed(&err),
        };
        if buf.capacity() > SCRATCH_KEEP_BYTES {
            *buf = Vec::new();
        }
        frame
    })
}

/// Error codes of `protocol_error` frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ErrorCode {
    InvalidPayload,
    UnknownMessageType,
    SessionIdRequired,
    SessionNotFound,
    UnsupportedProvider,
    RunInProgress,
    NoActiveRun,
    MessageTooLarge,
    /// Extension: too many requests in flight on one socket.
    RateLimited,
    /// Extension: the gateway is shutting down and starts no new run.
    ShuttingDown,
    /// Extension: the user has `--max-runs-per-user` runs running.
    TooManyRuns,
    /// Extension: a `chat.subscribe` with more than `--max-subscribe-entries` entries.
    TooManyEntries,
    /// Extension (cluster mode): Redis is unreachable, so no new run can be
    /// leased, or the node that owns a run did not answer a routed command.
    ClusterUnavailable,
    InternalError,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidPayload => "INVALID_PAYLOAD",
            ErrorCode::UnknownMessageType => "UNKNOWN_MESSAGE_TYPE",
            ErrorCode::SessionIdRequired => "SESSION_ID_REQUIRED",
            ErrorCode::SessionNotFound => "SESSION_NOT_FOUND",
            ErrorCode::UnsupportedProvider => "UNSUPPORTED_PROVIDER",
            ErrorCode::RunInProgress => "RUN_IN_PROGRESS",
            ErrorCode::NoActiveRun => "NO_ACTIVE_RUN",
            ErrorCode::MessageTooLarge => "MESSAGE_TOO_LARGE",
            ErrorCode::RateLimited => "RATE_LIMITED",
            ErrorCode::ShuttingDown => "SHUTTING_DOWN",
            ErrorCode::TooManyRuns => "TOO_MANY_RUNS",
            ErrorCode::TooManyEntries => "TOO_MANY_ENTRIES",
            ErrorCode::ClusterUnavailable => "CLUSTER_UNAVAILABLE",
            ErrorCode::InternalError => "INTERNAL_ERROR",
        }
    }

    /// The code of [`ErrorCode::as_str`] (an answer routed from another
    /// node), read by the same serde names, so no second list to keep.
    pub fn parse(code: &str) -> Option<ErrorCode> {
        use serde::de::{value::StrDeserializer, IntoDeserializer};
        let code: StrDeserializer<'_, serde::de::value::Error> = code.into_deserializer();
        ErrorCode::deserialize(code).ok()
    }
}

/// A chat-level refusal: the code plus a human-readable message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatError {
    pub code: ErrorCode,
    pub message: String,
}

impl ChatError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ChatError {
            code,
            message: message.into(),
        }
    }
}

/// The gateway's own `/ws` frames (server -> client), tagged by `kind` like
/// the provider events beside them (those are [`Envelope`]s, written on the
/// hot path by [`Envelope::to_frame`]).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ServerFrame {
    /// The answer to one `chat.subscribe` entry, before its replay.
    #[serde(rename_all = "camelCase")]
    ChatSubscribed {
        session_id: String,
        is_processing: bool,
        last_seq: u64,
        pending_permissions: Vec<PendingPermission>,
        /// Present while the session has a current or retained run (E2).
        #[serde(flatten)]
        run: Option<SubscribedRun>,
        timestamp: String,
    },
    /// A session's row changed (its native id); sent to every socket of the owner.
    #[serde(rename_all = "camelCase")]
    SessionUpserted {
        session_id: String,
        provider_session_id: Option<String>,
        provider: String,
        session: UpsertedSession,
        project: UpsertedProject,
        timestamp: String,
    },
    /// E6: a `chat.send` with a `clientRequestId` was accepted (or was a repeat).
    #[serde(rename_all = "camelCase")]
    ChatAccepted {
        session_id: String,
        run_id: String,
        client_request_id: String,
        duplicate: bool,
        timestamp: String,
    },
    /// A refused frame or request; `sessionId` is `null` when it concerns none.
    #[serde(rename_all = "camelCase")]
    ProtocolError {
        code: ErrorCode,
        error: String,
        session_id: Option<String>,
        timestamp: String,
    },
}

impl ServerFrame {
    /// The `protocol_error` frame of a refusal.
    pub fn protocol_error(err: &ChatError, session_id: Option<&str>) -> Self {
        ServerFrame::ProtocolError {
            code: err.code,
            error: err.message.clone(),
            session_id: session_id.map(str::to_string),
            timestamp: now_iso(),
        }
    }

    pub fn to_frame(&self) -> Frame {
        frame_of(self)
    }
}

/// `chat_subscribed` fields of the session's current (or retained) run.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SubscribedRun {
    pub run_id: String,
    pub run_first_seq: u64,
    pub oldest_seq: u64,
    pub replay_truncated: bool,
}

/// One entry of `chat_subscribed.pendingPermissions`.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PendingPermission {
    pub request_id: String,
    pub tool_name: String,
    pub input: Value,
    pub session_id: String,
    pub received_at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub context: Option<Value>,
}

/// `session_upserted.session`.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct UpsertedSession {
    pub id: String,
    pub summary: String,
    pub message_count: u64,
    pub last_activity: String,
    pub created_at: String,
}

/// `session_upserted.project`.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct UpsertedProject {
    /// The project row's id, as the web UI files sessions by it.
    pub project_id: Option<String>,
    pub path: String,
    pub full_path: String,
    pub display_name: String,
    pub is_starred: bool,
}

/// `{kind:"protocol_error", code, error, sessionId, timestamp}`.
pub fn protocol_error(err: &ChatError, session_id: Option<&str>) -> Frame {
    ServerFrame::protocol_error(err, session_id).to_frame()
}

/// One entry of `chat.subscribe.sessions`.
#[derive(Debug, Clone, PartialEq)]
pub struct SubscribeTarget {
    pub session_id: String,
    pub last_seq: Option<u64>,
}

/// A client's answer to a `permission_request` (the default is a bare deny).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PermissionDecision {
    /// JavaScript truthiness, as the reference's `Boolean(allow)`.
    #[serde(default, deserialize_with = "lenient::truthy")]
    pub allow: bool,
    #[serde(default)]
    pub updated_input: Option<Value>,
    #[serde(default, deserialize_with = "lenient::opt_string")]
    pub message: Option<String>,
    #[serde(default, deserialize_with = "lenient::non_empty")]
    pub remember_entry: Option<String>,
}

/// Inbound `/ws` frames (client -> server), tagged by `type`. Fields are
/// read leniently, as the reference reads them: a field of the wrong type
/// counts as absent (a non-string `content` is `""`, a non-object `options`
/// is `{}`), and ids are trimmed. [`ClientMessage::parse`] then refuses what
/// the reference refuses.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(tag = "type")]
pub enum ClientMessage {
    #[serde(rename = "chat.send", rename_all = "camelCase")]
    Send {
        #[serde(default, deserialize_with = "lenient::trimmed")]
        session_id: String,
        #[serde(default, deserialize_with = "lenient::string")]
        content: String,
        #[serde(
            default = "lenient::empty_object",
            deserialize_with = "lenient::object"
        )]
        options: Value,
        #[serde(default, deserialize_with = "lenient::non_empty")]
        client_request_id: Option<String>,
    },
    #[serde(rename = "chat.abort", rename_all = "camelCase")]
    Abort {
        #[serde(default, deserialize_with = "lenient::trimmed")]
        session_id: String,
    },
    #[serde(rename = "chat.subscribe")]
    Subscribe {
        #[serde(default, deserialize_with = "lenient::targets")]
        sessions: Vec<SubscribeTarget>,
    },
    #[serde(rename = "chat.permission-response", rename_all = "camelCase")]
    PermissionResponse {
        #[serde(default, deserialize_with = "lenient::trimmed")]
        request_id: String,
        #[serde(flatten)]
        decision: PermissionDecision,
    },
    /// A `chat.permission-response` without a usable `requestId`: ignored,
    /// as in the reference (it never answers with an error).
    #[serde(skip)]
    Ignored,
}

impl ClientMessage {
    /// Parses one text frame. Errors carry the `protocol_error` to answer with.
    pub fn parse(text: &str) -> Result<ClientMessage, ChatError> {
        // serde_json stops at 128 levels of nesting (its recursion limit,
        // on by default), so a deeply nested frame is refused without deep
        // recursion.
        let value: Value = serde_json::from_str(text).map_err(|e| {
            let message = if e.to_string().contains("recursion limit") {
                "Invalid websocket payload: JSON nested deeper than 128 levels"
            } else {
                "Invalid websocket payload: not JSON"
            };
            ChatError::new(ErrorCode::InvalidPayload, message)
        })?;
        // Checked first: serde would also read a tagged enum from an array.
        if !value.is_object() {
            return Err(ChatError::new(
                ErrorCode::InvalidPayload,
                "Invalid websocket payload: expected a JSON object",
            ));
        }
        // Every field is lenient, so only the `type` tag can fail here.
        let msg = ClientMessage::deserialize(&value).map_err(|err| {
            match value.get("type").and_then(Value::as_str) {
                None | Some("") => {
                    ChatError::new(ErrorCode::UnknownMessageType, "Frame has no message type")
                }
                Some(ty) if KNOWN_TYPES.contains(&ty) => ChatError::new(
                    ErrorCode::InvalidPayload,
                    format!("Invalid websocket payload: {err}"),
                ),
                Some(other) => ChatError::new(
                    ErrorCode::UnknownMessageType,
                    format!("Unknown message type: {other}"),
                ),
            }
        })?;
        match msg {
            ClientMessage::Send { ref session_id, .. } if session_id.is_empty() => {
                Err(ChatError::new(
                    ErrorCode::SessionIdRequired,
                    "chat.send requires a sessionId",
                ))
            }
            ClientMessage::Abort { ref session_id } if session_id.is_empty() => {
                Err(ChatError::new(
                    ErrorCode::SessionIdRequired,
                    "chat.abort requires a sessionId",
                ))
            }
            ClientMessage::PermissionResponse { ref request_id, .. } if request_id.is_empty() => {
                Ok(ClientMessage::Ignored)
            }
            msg => Ok(msg),
        }
    }
}

/// The `type`s of [`ClientMessage`].
const KNOWN_TYPES: [&str; 4] = [
    "chat.send",
    "chat.abort",
    "chat.subscribe",
    "chat.permission-response",
];

/// Field readers for [`ClientMessage`] (and the `/shell` frames): each
/// takes any JSON value and keeps it only if it has the expected type, as
/// the reference's checks do.
pub(crate) mod lenient {
    use serde::{Deserialize, Deserializer};
    use serde_json::{Map, Value};

    use super::SubscribeTarget;

    pub fn empty_object() -> Value {
        Value::Object(Map::new())
    }

    pub fn string<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
        Ok(match Value::deserialize(d)? {
            Value::String(s) => s,
            _ => String::new(),
        })
    }

    pub fn trimmed<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
        let s = string(d)?;
        Ok(match s.trim() {
            t if t.len() == s.len() => s,
            t => t.to_string(),
        })
    }

    pub fn opt_string<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
        Ok(match Value::deserialize(d)? {
            Value::String(s) => Some(s),
            _ => None,
        })
    }

    pub fn non_empty<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
        Ok(opt_string(d)?.filter(|s| !s.is_empty()))
    }

    /// `true` only for JSON `true`.
    pub fn flag<'de, D: Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
        Ok(matches!(Value::deserialize(d)?, Value::Bool(true)))
    }

    /// A non-negative whole number, else `None`.
    pub fn opt_u64<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
        Ok(match Value::deserialize(d)? {
            Value::Number(n) => n.as_u64(),
            _ => None,
        })
    }

    pub fn object<'de, D: Deserializer<'de>>(d: D) -> Result<Value, D::Error> {
        Ok(match Value::deserialize(d)? {
            v @ Value::Object(_) => v,
            _ => empty_object(),
        })
    }

    /// JavaScript truthiness (`Boolean(x)`).
    pub fn truthy<'de, D: Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
        Ok(match Value::deserialize(d)? {
            Value::Bool(b) => b,
            Value::Null => false,
            Value::Number(n) => n.as_f64().is_some_and(|f| f != 0.0),
            Value::String(s) => !s.is_empty(),
            Value::Array(_) | Value::Object(_) => true,
        })
    }

    /// `sessions`: entries without a non-blank string `sessionId` are skipped.
    pub fn targets<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<SubscribeTarget>, D::Error> {
        let Value::Array(list) = Value::deserialize(d)? else {
            return Ok(Vec::new());
        };
        Ok(list
            .iter()
            .filter_map(|entry| {
                let session_id = entry
                    .get("sessionId")
                    .and_then(Value::as_str)
                    .map(str::trim)
                    .filter(|s| !s.is_empty())?;
                Some(SubscribeTarget {
                    session_id: session_id.to_string(),
                    last_seq: entry.get("lastSeq").and_then(Value::as_u64),
                })
            })
            .collect())
    }
}

/// Role of a `text` event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    User,
    Assistant,
}

/// `toolResult` object of a `tool_result` event.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ToolResult {
    pub content: String,
    pub is_error: bool,
}

/// The kinds a provider run forwards to clients, with each kind's own fields.
/// `complete`, `permission_request` and `permission_cancelled` are produced
/// only by the RunRegistry (it owns the dedupe and the request ids).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum EventBody {
    #[serde(rename_all = "camelCase")]
    Text { role: Role, content: String },
    #[serde(rename_all = "camelCase")]
    StreamDelta { content: String },
    #[serde(rename_all = "camelCase")]
    StreamEnd {},
    #[serde(rename_all = "camelCase")]
    Thinking { content: String },
    #[serde(rename_all = "camelCase")]
    ToolUse {
        tool_name: String,
        tool_input: Value,
        tool_id: String,
    },
    /// `content`/`isError` at top level as the reference's live events, and
    /// `toolResult` as PROTOCOL.md names it.
    #[serde(rename_all = "camelCase")]
    ToolResult {
        tool_id: String,
        content: String,
        is_error: bool,
        tool_result: ToolResult,
    },
    #[serde(rename_all = "camelCase")]
    Error { content: String, is_error: bool },
    /// Token usage (`text: "token_budget"` with `tokenBudget`) or a status line.
    #[serde(rename_all = "camelCase")]
    Status {
        #[serde(skip_serializing_if = "Option::is_none")]
        text: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        status: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        tokens: Option<u64>,
        #[serde(skip_serializing_if = "Option::is_none")]
        token_budget: Option<Value>,
    },
    #[serde(rename_all = "camelCase")]
    PermissionRequest {
        request_id: String,
        tool_name: String,
        input: Value,
        #[serde(skip_serializing_if = "Option::is_none")]
        context: Option<Value>,
    },
    #[serde(rename_all = "camelCase")]
    PermissionCancelled { request_id: String, reason: String },
    #[serde(rename_all = "camelCase")]
    InteractivePrompt { content: String },
    #[serde(rename_all = "camelCase")]
    /// A background task's update; the web UI shows `summary`.
    TaskNotification {
        summary: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        status: Option<String>,
    },
    #[serde(rename_all = "camelCase")]
    Complete {
        actual_session_id: String,
        exit_code: i32,
        success: bool,
        aborted: bool,
    },
}

impl EventBody {
    pub fn text(role: Role, content: impl Into<String>) -> Self {
        EventBody::Text {
            role,
            content: content.into(),
        }
    }

    pub fn error(content: impl Into<String>) -> Self {
        EventBody::Error {
            content: content.into(),
            is_error: true,
        }
    }

    pub fn tool_result(tool_id: impl Into<String>, content: String, is_error: bool) -> Self {
        EventBody::ToolResult {
            tool_id: tool_id.into(),
            tool_result: ToolResult {
                content: content.clone(),
                is_error,
            },
            content,
            is_error,
        }
    }

    /// The wire `kind` of this body.
    pub fn kind(&self) -> &'static str {
        match self {
            EventBody::Text { .. } => "text",
            EventBody::StreamDelta { .. } => "stream_delta",
            EventBody::StreamEnd {} => "stream_end",
            EventBody::Thinking { .. } => "thinking",
            EventBody::ToolUse { .. } => "tool_use",
            EventBody::ToolResult { .. } => "tool_result",
            EventBody::Error { .. } => "error",
            EventBody::Status { .. } => "status",
            EventBody::PermissionRequest { .. } => "permission_request",
            EventBody::PermissionCancelled { .. } => "permission_cancelled",
            EventBody::InteractivePrompt { .. } => "interactive_prompt",
            EventBody::TaskNotification { .. } => "task_notification",
            EventBody::Complete { .. } => "complete",
        }
    }
}

/// A normalized provider event before the registry sequences it.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub body: EventBody,
    /// Claude subagent grouping (`parent_tool_use_id`), forwarded as `parentToolUseId`.
    pub parent_tool_use_id: Option<String>,
}

impl From<EventBody> for Event {
    fn from(body: EventBody) -> Self {
        Event {
            body,
            parent_tool_use_id: None,
        }
    }
}

/// The envelope of a live provider event: written once per event by the
/// RunRegistry, the same bytes go to every subscriber and the replay buffer.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Envelope<'a> {
    pub id: &'a str,
    pub session_id: &'a str,
    pub timestamp: &'a str,
    pub provider: &'a str,
    pub seq: u64,
    pub run_id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parent_tool_use_id: Option<&'a str>,
    #[serde(flatten)]
    pub body: &'a EventBody,
}

impl Envelope<'_> {
    /// The frame of this event: byte for byte what [`frame_of`] gives, for a
    /// fraction of the work. The envelope's own fields are written directly
    /// (strings that need no escaping are copied as they are) instead of
    /// through serde's flatten map, and a `stream_delta` body too; other
    /// bodies are serialized by serde and spliced in. The frame is written
    /// straight into its own allocation, sized for the usual case (nothing
    /// to escape), which becomes the shared frame without a copy.
    pub fn to_frame(&self) -> Frame {
        const ID: &str = "{\"id\":";
        const SESSION: &str = ",\"sessionId\":";
        const TIMESTAMP: &str = ",\"timestamp\":";
        const PROVIDER: &str = ",\"provider\":";
        const SEQ: &str = ",\"seq\":";
        const RUN: &str = ",\"runId\":";
        const PARENT: &str = ",\"parentToolUseId\":";
        const DELTA: &str = ",\"kind\":\"stream_delta\",\"content\":";
        // The exact size when nothing needs escaping (the usual case), so
        // the frame's allocation is shared as it is (a larger one would cost
        // the frame another allocation).
        let quoted = |s: &str| s.len() + 2;
        let mut size = ID.len() + quoted(self.id);
        size += SESSION.len() + quoted(self.session_id);
        size += TIMESTAMP.len() + quoted(self.timestamp);
        size += PROVIDER.len() + quoted(self.provider);
        size += SEQ.len() + decimal_len(self.seq);
        size += RUN.len() + quoted(self.run_id);
        if let Some(parent) = self.parent_tool_use_id {
            size += PARENT.len() + quoted(parent);
        }
        if let EventBody::StreamDelta { content } = self.body {
            size += DELTA.len() + quoted(content) + 1;
        }
        let mut buf = String::with_capacity(size);
        buf.push_str(ID);
        push_json_str(&mut buf, self.id);
        buf.push_str(SESSION);
        push_json_str(&mut buf, self.session_id);
        buf.push_str(TIMESTAMP);
        push_json_str(&mut buf, self.timestamp);
        buf.push_str(PROVIDER);
        push_json_str(&mut buf, self.provider);
        buf.push_str(SEQ);
        push_u64(&mut buf, self.seq);
        buf.push_str(RUN);
        push_json_str(&mut buf, self.run_id);
        if let Some(parent) = self.parent_tool_use_id {
            buf.push_str(PARENT);
            push_json_str(&mut buf, parent);
        }
        if let EventBody::StreamDelta { content } = self.body {
            buf.push_str(DELTA);
            push_json_str(&mut buf, content);
            buf.push('}');
        } else {
            // The body is an internally tagged struct variant: a JSON object
            // whose entries continue ours after its `{`.
            let body = match serde_json::to_string(self.body) {
                Ok(body) if body.starts_with('{') => body,
                _ => return frame_of(self),
            };
            buf.push(',');
            buf.push_str(&body[1..]);
        }
        ByteString::from(buf)
    }
}

/// What a run's event envelopes share, escaped once when the run starts:
/// [`EnvelopeHead::frame`] writes the bytes [`Envelope::to_frame`] writes
/// (tested) but copies the session id, provider and run id (twice) where
/// `to_frame` escapes each of them again for every event.
pub struct EnvelopeHead {
    /// `{"id":"<run id>:` (escaping is per character, so the id's escaped
    /// run id is the escaped run id).
    id: String,
    /// `","sessionId":"<session id>","timestamp":`
    session: String,
    /// `,"provider":"<provider>","seq":`
    provider: String,
    /// `,"runId":"<run id>"`
    run: String,
    /// `run` and a `stream_delta`'s kind, up to its text's opening quote.
    delta: String,
    /// The last timestamp of [`EnvelopeHead::escaped_delta`], and what its
    /// frames hold from after the first seq to the second: a streamed
    /// run's timestamps change once per millisecond, not per event.
    stamped: (String, String),
    /// The raw values, for bodies `frame` hands to [`Envelope::to_frame`].
    raw: (String, &'static str, String),
}

impl EnvelopeHead {
    pub fn new(session_id: &str, provider: &'static str, run_id: &str) -> Self {
        let mut id = String::from("{\"id\":");
        push_json_str(&mut id, run_id);
        id.pop();
        id.push(':');
        let mut session = String::from("\",\"sessionId\":");
        push_json_str(&mut session, session_id);
        session.push_str(",\"timestamp\":");
        let mut prov = String::from(",\"provider\":");
        push_json_str(&mut prov, provider);
        prov.push_str(",\"seq\":");
        let mut run = String::from(",\"runId\":");
        push_json_str(&mut run, run_id);
        let delta = format!("{run}{}", DeltaFrame::DELTA);
        EnvelopeHead {
            id,
            session,
            provider: prov,
            run,
            delta,
            stamped: (String::new(), String::new()),
            raw: (session_id.to_string(), provider, run_id.to_string()),
        }
    }

    /// The frame of event `seq` of this run; a `stream_delta` is written
    /// here, any other body by [`Envelope::to_frame`].
    pub fn frame(
        &self,
        seq: u64,
        timestamp: &str,
        parent_tool_use_id: Option<&str>,
        body: &EventBody,
    ) -> Frame {
        const PARENT: &str = ",\"parentToolUseId\":";
        const DELTA: &str = ",\"kind\":\"stream_delta\",\"content\":";
        let EventBody::StreamDelta { content } = body else {
            let (session_id, provider, run_id) = &self.raw;
            return Envelope {
                id: &event_id(run_id, seq),
                session_id,
                timestamp,
                provider,
                seq,
                run_id,
                parent_tool_use_id,
                body,
            }
            .to_frame();
        };
        let digits = decimal_len(seq);
        // Exact when nothing needs escaping (see `to_frame`).
        let mut size = self.id.len() + digits + self.session.len() + timestamp.len() + 2;
        size += self.provider.len() + digits + self.run.len();
        if let Some(parent) = parent_tool_use_id {
            size += PARENT.len() + parent.len() + 2;
        }
        size += DELTA.len() + content.len() + 3;
        let mut buf = String::with_capacity(size);
        buf.push_str(&self.id);
        push_u64(&mut buf, seq);
        buf.push_str(&self.session);
        push_json_str(&mut buf, timestamp);
        buf.push_str(&self.provider);
        push_u64(&mut buf, seq);
        buf.push_str(&self.run);
        if let Some(parent) = parent_tool_use_id {
            buf.push_str(PARENT);
            push_json_str(&mut buf, parent);
        }
        buf.push_str(DELTA);
        push_json_str(&mut buf, content);
        buf.push('}');
        ByteString::from(buf)
    }
}

/// The frame of a `stream_delta` whose text is given escaped (as serde_json
/// writes it inside the quotes): [`EnvelopeHead::frame`]'s bytes for the
/// decoded text, copied from the pieces it is made of (tested).
pub struct DeltaFrame<'a> {
    head: &'a EnvelopeHead,
    seq: u64,
    parent: Option<&'a str>,
    escaped: &'a str,
}

impl EnvelopeHead {
    /// The frame of event `seq`, a `stream_delta` whose text is `escaped`;
    /// `None` when the timestamp or parent id would need escaping (never
    /// from the registry's clock or a CLI's tool ids; the caller then
    /// decodes the text for [`EnvelopeHead::frame`]).
    pub fn escaped_delta<'a>(
        &'a mut self,
        seq: u64,
        timestamp: &'a str,
        parent: Option<&'a str>,
        escaped: &'a str,
    ) -> Option<DeltaFrame<'a>> {
        let plain = |s: &str| crate::json_text::find_special(s.as_bytes()).is_none();
        if !plain(timestamp) || !parent.is_none_or(plain) {
            return None;
        }
        if self.stamped.0 != timestamp {
            let (stamp, middle) = &mut self.stamped;
            stamp.clear();
            stamp.push_str(timestamp);
            middle.clear();
            middle.push_str(&self.session);
            middle.push('"');
            middle.push_str(timestamp);
            middle.push('"');
            middle.push_str(&self.provider);
        }
        Some(DeltaFrame {
            head: self,
            seq,
            parent,
            escaped,
        })
    }
}

impl DeltaFrame<'_> {
    const PARENT: &'static str = ",\"parentToolUseId\":\"";
    const DELTA: &'static str = ",\"kind\":\"stream_delta\",\"content\":\"";

    /// Its length in bytes.
    pub fn len(&self) -> usize {
        let head = self.head;
        let digits = decimal_len(self.seq);
        let mut len = head.id.len() + digits + head.stamped.1.len() + digits;
        len += match self.parent {
            Some(parent) => {
                head.run.len() + Self::PARENT.len() + parent.len() + 1 + Self::DELTA.len()
            }
            None => head.delta.len(),
        };
        len + self.escaped.len() + 2
    }

    pub fn is_empty(&self) -> bool {
        false
    }

    /// Hands its bytes to `push`, piece by piece.
    pub fn write(&self, mut push: impl FnMut(&str)) {
        let head = self.head;
        let mut digits = itoa::Buffer::new();
        let seq = digits.format(self.seq);
        push(&head.id);
        push(seq);
        push(&head.stamped.1);
        push(seq);
        match self.parent {
            Some(parent) => {
                push(&head.run);
                push(Self::PARENT);
                push(parent);
                push("\"");
                push(Self::DELTA);
            }
            None => push(&head.delta),
        }
        push(self.escaped);
        push("\"}");
    }
}

/// Digits of `n` in decimal.
fn decimal_len(n: u64) -> usize {
    n.checked_ilog10().map_or(1, |d| d as usize + 1)
}

/// The envelope id of event `seq` of run `run_id`: `<run_id>:<seq>`.
pub fn event_id(run_id: &str, seq: u64) -> String {
    let mut id = String::with_capacity(run_id.len() + 21);
    id.push_str(run_id);
    id.push(':');
    push_u64(&mut id, seq);
    id
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A frame nested a million levels deep is refused by serde_json's
    /// recursion limit (128) with a clear error, on a 256 KiB stack: the
    /// parser never recurses deeper than that limit.
    #[test]
    fn deeply_nested_frames_are_refused_without_deep_recursion() {
        let run = std::thread::Builder::new()
            .stack_size(256 * 1024)
            .spawn(|| {
                let deep = format!("{}{}", "[".repeat(1_000_000), "]".repeat(1_000_000));
                let err = ClientMessage::parse(&deep).unwrap_err();
                assert_eq!(err.code, ErrorCode::InvalidPayload);
                assert!(err.message.contains("deeper than 128"), "{}", err.message);
                let opts = |depth: usize| {
                    format!(
                        r#"{{"type":"chat.send","sessionId":"s","content":"hi","options":{{"a":{}1{}}}}}"#,
                        "[".repeat(depth),
                        "]".repeat(depth)
                    )
                };
                assert!(ClientMessage::parse(&opts(200)).is_err());
                assert!(matches!(
                    ClientMessage::parse(&opts(100)),
                    Ok(ClientMessage::Send { .. })
                ));
            })
            .unwrap();
        run.join().expect("no stack overflow, no panic");
    }

    /// One body of every kind, with strings that need escaping and optional
    /// fields both set and unset.
    fn every_kind() -> Vec<EventBody> {
        let odd = "quote \" backslash \\ newline \n nul \u{0} é 𝄞";
        let input = serde_json::json!({"command": odd, "n": [1, 2.5, null]});
        vec![
            EventBody::text(Role::User, odd),
            EventBody::text(Role::Assistant, "plain"),
            EventBody::StreamDelta {
                content: odd.into(),
            },
            EventBody::StreamEnd {},
            EventBody::Thinking {
                content: odd.into(),
            },
            EventBody::ToolUse {
                tool_name: "Bash".into(),
                tool_input: input.clone(),
                tool_id: "toolu_\"1".into(),
            },
            EventBody::tool_result("toolu_1", odd.into(), true),
            EventBody::tool_result("toolu_2", String::new(), false),
            EventBody::error(odd),
            EventBody::Status {
                text: Some("token_budget".into()),
                status: None,
                tokens: Some(u64::MAX),
                token_budget: Some(serde_json::json!({"used": 1, "total": 2})),
            },
            EventBody::Status {
                text: None,
                status: Some(odd.into()),
                tokens: None,
                token_budget: None,
            },
            EventBody::PermissionRequest {
                request_id: "r1".into(),
                tool_name: "Bash".into(),
                input: input.clone(),
                context: Some(serde_json::json!({"why": odd})),
            },
            EventBody::PermissionRequest {
                request_id: "r2".into(),
                tool_name: "Edit".into(),
                input,
                context: None,
            },
            EventBody::PermissionCancelled {
                request_id: "r1".into(),
                reason: "timeout".into(),
            },
            EventBody::InteractivePrompt {
                content: odd.into(),
            },
            EventBody::TaskNotification {
                summary: odd.into(),
                status: Some("done".into()),
            },
            EventBody::TaskNotification {
                summary: String::new(),
                status: None,
            },
            EventBody::Complete {
                actual_session_id: "s".into(),
                exit_code: -1,
                success: false,
                aborted: true,
            },
        ]
    }

    /// [`every_kind`] covers every variant: a new kind fails to compile
    /// here until it has a sample (and so a byte-for-byte check).
    #[test]
    fn every_kind_covers_every_variant() {
        let index = |body: &EventBody| match body {
            EventBody::Text { .. } => 0,
            EventBody::StreamDelta { .. } => 1,
            EventBody::StreamEnd {} => 2,
            EventBody::Thinking { .. } => 3,
            EventBody::ToolUse { .. } => 4,
            EventBody::ToolResult { .. } => 5,
            EventBody::Error { .. } => 6,
            EventBody::Status { .. } => 7,
            EventBody::PermissionRequest { .. } => 8,
            EventBody::PermissionCancelled { .. } => 9,
            EventBody::InteractivePrompt { .. } => 10,
            EventBody::TaskNotification { .. } => 11,
            EventBody::Complete { .. } => 12,
        };
        let covered: std::collections::BTreeSet<usize> = every_kind().iter().map(index).collect();
        assert_eq!(covered, (0..13).collect());
    }

    /// The hand-written envelope writer is byte for byte serde's output
    /// (`frame_of` of the derived `Serialize`), for every event kind.
    #[test]
    fn envelope_to_frame_is_byte_for_byte_frame_of() {
        let texts = [
            "plain text",
            "",
            "quote \" backslash \\ newline \n tab \t nul \u{0} del \u{7f}",
            "unicode é ✓ 𝄞 and \u{1f} control",
        ];
        let mut bodies: Vec<EventBody> = texts
            .iter()
            .map(|t| EventBody::StreamDelta {
                content: t.to_string(),
            })
            .collect();
        bodies.push(EventBody::StreamEnd {});
        bodies.push(EventBody::error("boom \"x\""));
        bodies.push(EventBody::Complete {
            actual_session_id: "s".into(),
            exit_code: 1,
            success: false,
            aborted: true,
        });
        bodies.extend(every_kind());
        for body in &bodies {
            for parent in [None, Some("toolu_1"), Some("we\"ird")] {
                for id in ["run:1", "r\\un:2"] {
                    let env = Envelope {
                        id,
                        session_id: "6353e92a-3dda-4327-85e4-f02c17e3b567",
                        timestamp: "2026-07-08T10:00:05.120Z",
                        provider: "claude",
                        seq: u64::MAX,
                        run_id: "6c9fe3f6-75cf-4729-ba8e-3e96b15a1e69",
                        parent_tool_use_id: parent,
                        body,
                    };
                    assert_eq!(env.to_frame(), frame_of(&env));
                }
            }
        }
    }

    /// A run's envelope head writes what `to_frame` writes (and so what
    /// serde writes), whatever the ids hold and however long the seq.
    #[test]
    fn envelope_head_frames_are_to_frame_s() {
        let mut bodies: Vec<EventBody> = ["plain", "", "q \" b \\ nl \n \u{1f} é 𝄞"]
            .iter()
            .map(|t| EventBody::StreamDelta {
                content: t.to_string(),
            })
            .collect();
        bodies.push(EventBody::StreamEnd {});
        bodies.extend(every_kind());
        let ids = [
            (
                "6353e92a-3dda-4327-85e4-f02c17e3b567",
                "6c9fe3f6-75cf-4729-ba8e-3e96b15a1e69",
            ),
            ("s\"1\\", "r\\un\n:2"),
        ];
        for (session_id, run_id) in ids {
            let head = EnvelopeHead::new(session_id, "claude", run_id);
            for body in &bodies {
                for parent in [None, Some("toolu_1"), Some("we\"ird")] {
                    for seq in [0, 9, 10, 12_345, u64::MAX] {
                        let id = event_id(run_id, seq);
                        let env = Envelope {
                            id: &id,
                            session_id,
                            timestamp: "2026-07-08T10:00:05.120Z",
                            provider: "claude",
                            seq,
                            run_id,
                            parent_tool_use_id: parent,
                            body,
                        };
                        let frame = head.frame(seq, env.timestamp, parent, body);
                        assert_eq!(frame, env.to_frame());
                        assert_eq!(frame, frame_of(&env));
                    }
                }
            }
        }
    }

    /// A delta written from its escaped text is the frame `frame` writes
    /// for the decoded text (and so what serde writes), whatever the ids
    /// hold; a parent that needs escaping is left to `frame`.
    #[test]
    fn escaped_delta_frames_are_frame_s() {
        let ids = [
            (
                "6353e92a-3dda-4327-85e4-f02c17e3b567",
                "6c9fe3f6-75cf-4729-ba8e-3e96b15a1e69",
            ),
            ("s\"1\\", "r\\un\n:2"),
        ];
        let texts = ["plain", "", "q \" b \\ nl \n tab \t \u{1f} \u{8} é 𝄞"];
        for (session_id, run_id) in ids {
            let mut head = EnvelopeHead::new(session_id, "claude", run_id);
            for text in texts {
                let literal = serde_json::to_string(text).unwrap();
                let escaped = &literal[1..literal.len() - 1];
                for parent in [None, Some("toolu_1"), Some("we\"ird")] {
                    for seq in [0, 9, 10, 12_345, u64::MAX] {
                        // The stamp a head keeps changes with the time.
                        let ts = ["2026-07-08T10:00:05.120Z", "2026-07-08T10:00:05.1211Z"]
                            [seq as usize % 2];
                        let body = EventBody::StreamDelta {
                            content: text.to_string(),
                        };
                        let Some(delta) = head.escaped_delta(seq, ts, parent, escaped) else {
                            assert_eq!(parent, Some("we\"ird"));
                            continue;
                        };
                        let mut written = String::new();
                        delta.write(|s| written.push_str(s));
                        assert_eq!(written.len(), delta.len());
                        assert_eq!(head.frame(seq, ts, parent, &body), written.as_str());
                    }
                }
            }
        }
        let mut head = EnvelopeHead::new("s", "claude", "r");
        assert!(head.escaped_delta(1, "bad\"stamp", None, "x").is_none());
    }

    /// A code routed from another node reads back as itself; an unknown
    /// one is refused (the bus then answers INTERNAL_ERROR).
    #[test]
    fn error_codes_read_back_by_their_wire_names() {
        use ErrorCode::*;
        for code in [
            RunInProgress,
            ClusterUnavailable,
            TooManyEntries,
            InternalError,
        ] {
            assert_eq!(serde_json::to_value(code).unwrap(), code.as_str());
            assert_eq!(ErrorCode::parse(code.as_str()), Some(code));
        }
        assert_eq!(ErrorCode::parse("run_in_progress"), None);
        assert_eq!(ErrorCode::parse(""), None);
    }

    #[test]
    fn parse_rejects_non_json_and_non_objects() {
        assert_eq!(
            ClientMessage::parse("nope").unwrap_err().code,
            ErrorCode::InvalidPayload
        );
        assert_eq!(
            ClientMessage::parse("[1,2]").unwrap_err().code,
            ErrorCode::InvalidPayload
        );
        assert_eq!(
            ClientMessage::parse(r#"{"type":"chat.dance"}"#)
                .unwrap_err()
                .code,
            ErrorCode::UnknownMessageType
        );
        assert_eq!(
            ClientMessage::parse(r#"{"sessionId":"x"}"#)
                .unwrap_err()
                .code,
            ErrorCode::UnknownMessageType
        );
    }

    /// Each bad frame gets the code (and message) the hand-written reader gave it.
    #[test]
    fn bad_frames_get_the_same_codes_as_before() {
        use ErrorCode::*;
        let cases: [(&str, ErrorCode, &str); 13] = [
            ("", InvalidPayload, "Invalid websocket payload: not JSON"),
            (
                "{\"type\":",
                InvalidPayload,
                "Invalid websocket payload: not JSON",
            ),
            (
                "[1,2]",
                InvalidPayload,
                "Invalid websocket payload: expected a JSON object",
            ),
            // serde reads a tagged enum from an array too; the wire never did.
            (
                r#"["chat.abort","s1"]"#,
                InvalidPayload,
                "Invalid websocket payload: expected a JSON object",
            ),
            (
                "\"chat.send\"",
                InvalidPayload,
                "Invalid websocket payload: expected a JSON object",
            ),
            ("{}", UnknownMessageType, "Frame has no message type"),
            (
                r#"{"type":""}"#,
                UnknownMessageType,
                "Frame has no message type",
            ),
            (
                r#"{"type":7}"#,
                UnknownMessageType,
                "Frame has no message type",
            ),
            (
                r#"{"type":"chat.dance"}"#,
                UnknownMessageType,
                "Unknown message type: chat.dance",
            ),
            (
                r#"{"type":"chat.send"}"#,
                SessionIdRequired,
                "chat.send requires a sessionId",
            ),
            (
                r#"{"type":"chat.send","sessionId":7}"#,
                SessionIdRequired,
                "chat.send requires a sessionId",
            ),
            (
                r#"{"type":"chat.abort","sessionId":" "}"#,
                SessionIdRequired,
                "chat.abort requires a sessionId",
            ),
            (
                r#"{"type":"chat.abort","sessionId":null}"#,
                SessionIdRequired,
                "chat.abort requires a sessionId",
            ),
        ];
        for (text, code, message) in cases {
            assert_eq!(
                ClientMessage::parse(text),
                Err(ChatError::new(code, message)),
                "{text}"
            );
        }
    }

    /// Fields of the wrong type count as absent, as the reference reads them.
    #[test]
    fn fields_are_read_leniently() {
        assert_eq!(
            ClientMessage::parse(
                r#"{"type":"chat.send","sessionId":"s","content":"hi","options":[1],"clientRequestId":"","extra":1}"#
            ),
            Ok(ClientMessage::Send {
                session_id: "s".into(),
                content: "hi".into(),
                options: serde_json::json!({}),
                client_request_id: None,
            })
        );
        assert_eq!(
            ClientMessage::parse(
                r#"{"type":"chat.send","sessionId":"s","options":{"cwd":"x"},"clientRequestId":"c1"}"#
            ),
            Ok(ClientMessage::Send {
                session_id: "s".into(),
                content: String::new(),
                options: serde_json::json!({"cwd": "x"}),
                client_request_id: Some("c1".into()),
            })
        );
        assert_eq!(
            ClientMessage::parse(r#"{"type":"chat.subscribe","sessions":{"sessionId":"a"}}"#),
            Ok(ClientMessage::Subscribe { sessions: vec![] })
        );
        assert_eq!(
            ClientMessage::parse(
                r#"{"type":"chat.subscribe","sessions":[7,{"sessionId":" a ","lastSeq":-1}]}"#
            ),
            Ok(ClientMessage::Subscribe {
                sessions: vec![SubscribeTarget {
                    session_id: "a".into(),
                    last_seq: None
                }]
            })
        );
        let decision = |text: &str| match ClientMessage::parse(text) {
            Ok(ClientMessage::PermissionResponse {
                request_id,
                decision,
            }) => {
                assert_eq!(request_id, "r1");
                decision
            }
            other => panic!("{text}: {other:?}"),
        };
        for (allow, expected) in [
            ("true", true),
            ("false", false),
            ("null", false),
            ("0", false),
            ("0.0", false),
            ("2", true),
            ("\"\"", false),
            ("\"no\"", true),
            ("[]", true),
            ("{}", true),
        ] {
            let text = format!(
                r#"{{"type":"chat.permission-response","requestId":" r1 ","allow":{allow}}}"#
            );
            assert_eq!(decision(&text).allow, expected, "allow: {allow}");
        }
        assert_eq!(
            decision(r#"{"type":"chat.permission-response","requestId":"r1"}"#),
            PermissionDecision::default()
        );
        assert_eq!(
            decision(
                r#"{"type":"chat.permission-response","requestId":"r1","allow":true,"updatedInput":{"a":1},"message":"","rememberEntry":"Bash"}"#
            ),
            PermissionDecision {
                allow: true,
                updated_input: Some(serde_json::json!({"a": 1})),
                message: Some(String::new()),
                remember_entry: Some("Bash".into()),
            }
        );
        assert_eq!(
            decision(
                r#"{"type":"chat.permission-response","requestId":"r1","updatedInput":null,"message":3,"rememberEntry":""}"#
            ),
            PermissionDecision::default()
        );
        assert_eq!(
            ClientMessage::parse(r#"{"type":"chat.permission-response","requestId":7}"#),
            Ok(ClientMessage::Ignored)
        );
    }

    /// The gateway frames carry the fields PROTOCOL.md names, and nothing
    /// absent is written as `null` except `sessionId` of a protocol_error.
    #[test]
    fn server_frames_serialize_as_the_protocol_says() {
        let v = |f: ServerFrame| -> Value { serde_json::from_str(&f.to_frame()).unwrap() };
        let err = ChatError::new(ErrorCode::MessageTooLarge, "too big");
        let e = v(ServerFrame::protocol_error(&err, None));
        assert_eq!(e["kind"], "protocol_error");
        assert_eq!(e["code"], "MESSAGE_TOO_LARGE");
        assert_eq!(e["error"], "too big");
        assert!(e["sessionId"].is_null() && e.as_object().unwrap().contains_key("sessionId"));
        assert!(e["timestamp"].is_string());
        let accepted = v(ServerFrame::ChatAccepted {
            session_id: "s".into(),
            run_id: "r".into(),
            client_request_id: "c".into(),
            duplicate: true,
            timestamp: "t".into(),
        });
        assert_eq!(
            accepted,
            serde_json::json!({"kind": "chat_accepted", "sessionId": "s", "runId": "r",
                "clientRequestId": "c", "duplicate": true, "timestamp": "t"})
        );
        let idle = ServerFrame::ChatSubscribed {
            session_id: "s".into(),
            is_processing: false,
            last_seq: 9,
            pending_permissions: vec![],
            run: None,
            timestamp: "t".into(),
        };
        assert_eq!(
            v(idle),
            serde_json::json!({"kind": "chat_subscribed", "sessionId": "s", "isProcessing": false,
                "lastSeq": 9, "pendingPermissions": [], "timestamp": "t"})
        );
        let running = ServerFrame::ChatSubscribed {
            session_id: "s".into(),
            is_processing: true,
            last_seq: 9,
            pending_permissions: vec![PendingPermission {
                request_id: "p".into(),
                tool_name: "Bash".into(),
                input: serde_json::json!({"command": "ls"}),
                session_id: "s".into(),
                received_at: "t0".into(),
                context: None,
            }],
            run: Some(SubscribedRun {
                run_id: "r".into(),
                run_first_seq: 5,
                oldest_seq: 6,
                replay_truncated: true,
            }),
            timestamp: "t".into(),
        };
        assert_eq!(
            v(running),
            serde_json::json!({"kind": "chat_subscribed", "sessionId": "s", "isProcessing": true,
                "lastSeq": 9, "pendingPermissions": [{"requestId": "p", "toolName": "Bash",
                "input": {"command": "ls"}, "sessionId": "s", "receivedAt": "t0"}],
                "runId": "r", "runFirstSeq": 5, "oldestSeq": 6, "replayTruncated": true,
                "timestamp": "t"})
        );
        let upserted = ServerFrame::SessionUpserted {
            session_id: "s".into(),
            provider_session_id: None,
            provider: "claude".into(),
            session: UpsertedSession {
                id: "s".into(),
                summary: String::new(),
                message_count: 0,
                last_activity: "t".into(),
                created_at: "c".into(),
            },
            project: UpsertedProject {
                project_id: Some("3".into()),
                path: "/p/x".into(),
                full_path: "/p/x".into(),
                display_name: "x".into(),
                is_starred: true,
            },
            timestamp: "t".into(),
        };
        assert_eq!(
            v(upserted),
            serde_json::json!({"kind": "session_upserted", "sessionId": "s",
                "providerSessionId": null, "provider": "claude",
                "session": {"id": "s", "summary": "", "messageCount": 0, "lastActivity": "t", "createdAt": "c"},
                "project": {"projectId": "3", "path": "/p/x", "fullPath": "/p/x", "displayName": "x", "isStarred": true},
                "timestamp": "t"})
        );
    }

    #[test]
    fn send_requires_a_session_and_coerces_content() {
        assert_eq!(
            ClientMessage::parse(r#"{"type":"chat.send","sessionId":"  "}"#)
                .unwrap_err()
                .code,
            ErrorCode::SessionIdRequired
        );
        let msg = ClientMessage::parse(r#"{"type":"chat.send","sessionId":" s1 ","content":42}"#)
            .unwrap();
        let ClientMessage::Send {
            session_id,
            content,
            ..
        } = msg
        else {
            panic!("expected Send, got {msg:?}");
        };
        assert_eq!(session_id, "s1");
        assert_eq!(content, "");
    }

    #[test]
    fn subscribe_skips_entries_without_session() {
        let msg = ClientMessage::parse(
            r#"{"type":"chat.subscribe","sessions":[{"lastSeq":3},{"sessionId":"a","lastSeq":7},{"sessionId":"b"}]}"#,
        )
        .unwrap();
        assert_eq!(
            msg,
            ClientMessage::Subscribe {
                sessions: vec![
                    SubscribeTarget {
                        session_id: "a".into(),
                        last_seq: Some(7)
                    },
                    SubscribeTarget {
                        session_id: "b".into(),
                        last_seq: None
                    },
                ]
            }
        );
    }

    #[test]
    fn permission_response_without_id_is_ignored() {
        assert_eq!(
            ClientMessage::parse(r#"{"type":"chat.permission-response","allow":true}"#).unwrap(),
            ClientMessage::Ignored
        );
    }

    #[test]
    fn envelope_serializes_kind_and_camel_case_fields() {
        let body = EventBody::ToolUse {
            tool_name: "Bash".into(),
            tool_input: serde_json::json!({"command": "ls"}),
            tool_id: "t1".into(),
        };
        let env = Envelope {
            id: "i",
            session_id: "s",
            timestamp: "now",
            provider: "claude",
            seq: 4,
            run_id: "r",
            parent_tool_use_id: None,
            body: &body,
        };
        let v: Value = serde_json::to_value(&env).unwrap();
        assert_eq!(v["kind"], "tool_use");
        assert_eq!(v["toolName"], "Bash");
        assert_eq!(v["toolInput"]["command"], "ls");
        assert_eq!(v["seq"], 4);
        assert_eq!(v["sessionId"], "s");
        assert!(v.get("parentToolUseId").is_none());
    }

    #[test]
    fn task_notification_carries_the_summary_the_web_ui_shows() {
        let body = EventBody::TaskNotification {
            summary: "Background task finished".into(),
            status: Some("completed".into()),
        };
        let v: Value = serde_json::to_value(&body).unwrap();
        assert_eq!(v["kind"], "task_notification");
        assert_eq!(v["summary"], "Background task finished");
    }
}
