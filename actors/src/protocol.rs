//! Wire types of the `/ws` chat protocol (PROTOCOL.md section 4).
//!
//! Inbound frames are parsed leniently from JSON into [`ClientMessage`] (the
//! reference coerces a non-string `content` to `""`, so we do too); outbound
//! provider events are the typed [`EventBody`] kinds, serialized exactly once
//! by the RunRegistry inside an [`Envelope`] and shared as a [`Frame`].

use bytestring::ByteString;
use serde::Serialize;
use serde_json::{Map, Value};

/// One serialized server->client text frame. Cloning shares the bytes: the
/// RunRegistry serializes an event once and hands clones to every subscriber.
pub type Frame = ByteString;

/// Current time as ISO 8601 with milliseconds, e.g. `2026-07-08T10:00:05.120Z`.
/// Formatted once per millisecond per thread: a streaming run stamps
/// hundreds of events within the same millisecond.
pub fn now_iso() -> String {
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
            last.1.clone()
        }
        Err(_) => humantime::format_rfc3339_millis(now).to_string(),
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
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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
            ErrorCode::InternalError => "INTERNAL_ERROR",
        }
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

/// `{kind:"protocol_error", code, error, sessionId, timestamp}`.
pub fn protocol_error(err: &ChatError, session_id: Option<&str>) -> Frame {
    frame_of(&serde_json::json!({
        "kind": "protocol_error",
        "code": err.code.as_str(),
        "error": err.message,
        "sessionId": session_id,
        "timestamp": now_iso(),
    }))
}

/// One entry of `chat.subscribe.sessions`.
#[derive(Debug, Clone, PartialEq)]
pub struct SubscribeTarget {
    pub session_id: String,
    pub last_seq: Option<u64>,
}

/// A client's answer to a `permission_request`.
#[derive(Debug, Clone, PartialEq)]
pub struct PermissionDecision {
    pub allow: bool,
    pub updated_input: Option<Value>,
    pub message: Option<String>,
    pub remember_entry: Option<String>,
}

/// Inbound `/ws` frames, one variant per `type`.
#[derive(Debug, Clone, PartialEq)]
pub enum ClientMessage {
    Send {
        session_id: String,
        content: String,
        options: Value,
        client_request_id: Option<String>,
    },
    Abort {
        session_id: String,
    },
    Subscribe {
        sessions: Vec<SubscribeTarget>,
    },
    PermissionResponse {
        request_id: String,
        decision: PermissionDecision,
    },
    /// A `chat.permission-response` without a usable `requestId`: ignored,
    /// as in the reference (it never answers with an error).
    Ignored,
}

fn str_field(obj: &Map<String, Value>, key: &str) -> String {
    obj.get(key)
        .and_then(Value::as_str)
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

impl ClientMessage {
    /// Parses one text frame. Errors carry the `protocol_error` to answer with.
    pub fn parse(text: &str) -> Result<ClientMessage, ChatError> {
        let value: Value = serde_json::from_str(text).map_err(|_| {
            ChatError::new(
                ErrorCode::InvalidPayload,
                "Invalid websocket payload: not JSON",
            )
        })?;
        let Value::Object(obj) = value else {
            return Err(ChatError::new(
                ErrorCode::InvalidPayload,
                "Invalid websocket payload: expected a JSON object",
            ));
        };
        let ty = obj.get("type").and_then(Value::as_str).unwrap_or_default();
        match ty {
            "chat.send" => {
                let session_id = str_field(&obj, "sessionId");
                if session_id.is_empty() {
                    return Err(ChatError::new(
                        ErrorCode::SessionIdRequired,
                        "chat.send requires a sessionId",
                    ));
                }
                Ok(ClientMessage::Send {
                    session_id,
                    // The reference coerces a non-string content to "".
                    content: obj
                        .get("content")
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                        .to_string(),
                    options: match obj.get("options") {
                        Some(v @ Value::Object(_)) => v.clone(),
                        _ => Value::Object(Map::new()),
                    },
                    client_request_id: obj
                        .get("clientRequestId")
                        .and_then(Value::as_str)
                        .filter(|s| !s.is_empty())
                        .map(str::to_string),
                })
            }
            "chat.abort" => {
                let session_id = str_field(&obj, "sessionId");
                if session_id.is_empty() {
                    return Err(ChatError::new(
                        ErrorCode::SessionIdRequired,
                        "chat.abort requires a sessionId",
                    ));
                }
                Ok(ClientMessage::Abort { session_id })
            }
            "chat.subscribe" => {
                let sessions = obj
                    .get("sessions")
                    .and_then(Value::as_array)
                    .map(|list| {
                        list.iter()
                            .filter_map(|entry| {
                                let session_id = entry
                                    .get("sessionId")
                                    .and_then(Value::as_str)
                                    .map(str::trim)
                                    .filter(|s| !s.is_empty())?;
                                let last_seq = entry.get("lastSeq").and_then(Value::as_u64);
                                Some(SubscribeTarget {
                                    session_id: session_id.to_string(),
                                    last_seq,
                                })
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                Ok(ClientMessage::Subscribe { sessions })
            }
            "chat.permission-response" => {
                let request_id = str_field(&obj, "requestId");
                if request_id.is_empty() {
                    return Ok(ClientMessage::Ignored);
                }
                let allow = match obj.get("allow") {
                    Some(Value::Bool(b)) => *b,
                    Some(Value::Null) | None => false,
                    // JavaScript truthiness, as the reference's Boolean(allow).
                    Some(Value::Number(n)) => n.as_f64().is_some_and(|f| f != 0.0),
                    Some(Value::String(s)) => !s.is_empty(),
                    Some(_) => true,
                };
                Ok(ClientMessage::PermissionResponse {
                    request_id,
                    decision: PermissionDecision {
                        allow,
                        updated_input: obj.get("updatedInput").filter(|v| !v.is_null()).cloned(),
                        message: obj
                            .get("message")
                            .and_then(Value::as_str)
                            .map(str::to_string),
                        remember_entry: obj
                            .get("rememberEntry")
                            .and_then(Value::as_str)
                            .filter(|s| !s.is_empty())
                            .map(str::to_string),
                    },
                })
            }
            "" => Err(ChatError::new(
                ErrorCode::UnknownMessageType,
                "Frame has no message type",
            )),
            other => Err(ChatError::new(
                ErrorCode::UnknownMessageType,
                format!("Unknown message type: {other}"),
            )),
        }
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
    TaskNotification {
        content: String,
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
    /// fifth of the work. The envelope's own fields are written directly
    /// (strings that need no escaping are copied as they are) instead of
    /// through serde's flatten map, and a `stream_delta` body too; other
    /// bodies are serialized by serde and spliced in.
    pub fn to_frame(&self) -> Frame {
        SCRATCH.with(|scratch| {
            let Ok(mut buf) = scratch.try_borrow_mut() else {
                return frame_of(self);
            };
            buf.clear();
            buf.extend_from_slice(b"{\"id\":");
            push_json_str(&mut buf, self.id);
            buf.extend_from_slice(b",\"sessionId\":");
            push_json_str(&mut buf, self.session_id);
            buf.extend_from_slice(b",\"timestamp\":");
            push_json_str(&mut buf, self.timestamp);
            buf.extend_from_slice(b",\"provider\":");
            push_json_str(&mut buf, self.provider);
            buf.extend_from_slice(b",\"seq\":");
            // Writing a number into a Vec cannot fail.
            let _ = serde_json::to_writer(&mut *buf, &self.seq);
            buf.extend_from_slice(b",\"runId\":");
            push_json_str(&mut buf, self.run_id);
            if let Some(parent) = self.parent_tool_use_id {
                buf.extend_from_slice(b",\"parentToolUseId\":");
                push_json_str(&mut buf, parent);
            }
            if let EventBody::StreamDelta { content } = self.body {
                buf.extend_from_slice(b",\"kind\":\"stream_delta\",\"content\":");
                push_json_str(&mut buf, content);
                buf.push(b'}');
            } else {
                // The body is an internally tagged struct variant: a JSON object
                // whose entries continue ours once its `{` becomes a `,`.
                let at = buf.len();
                let spliced = serde_json::to_writer(&mut *buf, self.body).is_ok()
                    && buf.get(at) == Some(&b'{');
                if !spliced {
                    drop(buf);
                    return frame_of(self);
                }
                if let Some(open) = buf.get_mut(at) {
                    *open = b',';
                }
            }
            let frame = match std::str::from_utf8(&buf) {
                Ok(text) => ByteString::from(text),
                Err(_) => {
                    drop(buf);
                    return frame_of(self);
                }
            };
            if buf.capacity() > SCRATCH_KEEP_BYTES {
                *buf = Vec::new();
            }
            frame
        })
    }
}

/// Appends `s` as a JSON string: copied as it is when no byte needs an
/// escape (the check has no early exit, so it compiles to vector code),
/// else escaped by serde_json exactly as [`frame_of`] would.
fn push_json_str(buf: &mut Vec<u8>, s: &str) {
    let needs_escape = s.bytes().fold(false, |acc, b| {
        acc | (b < 0x20) | (b == b'"') | (b == b'\\')
    });
    if needs_escape {
        // Writing a str into a Vec cannot fail.
        let _ = serde_json::to_writer(&mut *buf, s);
    } else {
        buf.push(b'"');
        buf.extend_from_slice(s.as_bytes());
        buf.push(b'"');
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
