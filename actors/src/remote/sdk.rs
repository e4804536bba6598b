//! Claude stream-json ("SDK") messages for remote-session clients, rendered
//! from the `/ws` events of a run, and the client's own frames parsed.
//!
//! One [`Renderer`] per follower turns the RunRegistry's envelopes into what
//! Claude Code's remote-session client renders (`REMOTE-SESSIONS.md`): a
//! `system` `init` when a run starts, a `stream_event` per text delta (it only
//! drives the client's spinner), one `assistant` message per text block (when
//! its stream ends), thinking block or tool call, a `user` message per tool
//! result, `control_request` `can_use_tool` / `control_cancel_request` for
//! permissions (with agentgate's request id), and a `result` when the run
//! completes. Every provider is rendered the same way from its normalized
//! events, so each event gives at most one message and its `seq` can be the
//! message's `sequence_num` (the SSE generation resumes by it).
//!
//! The client appends every message it is sent and dedupes nothing, so a
//! reconnecting client must be sent only what it has not shown: see
//! [`Renderer::resume_point`].

use std::collections::VecDeque;

use serde_json::{json, Map, Value};

/// Errors of a run kept for its `result` (the last ones; older are dropped).
const MAX_RUN_ERRORS: usize = 8;

/// One message for the client.
#[derive(Debug, Clone, PartialEq)]
pub struct Rendered {
    /// The seq of the event it was rendered from (`None`: a message of the
    /// gateway's own, e.g. `system` `init`).
    pub seq: Option<u64>,
    pub message: Value,
    /// Live-only (a `stream_event`): the SSE generation sends it as an
    /// `ephemeral_event`, which is never replayed by sequence number.
    pub ephemeral: bool,
}

/// The run a renderer is in.
#[derive(Debug, Default)]
struct RunView {
    id: String,
    /// Text of the open text block, streamed so far.
    text: String,
    /// Seq before the open text block's first delta: a client resumed from
    /// there gets the whole block again (and its `assistant` message once).
    text_from: Option<u64>,
    text_parent: Option<String>,
    /// The last assistant text, the `result` field of the run's `result`.
    last_text: String,
    errors: VecDeque<String>,
    started_at: Option<String>,
    usage: Option<Value>,
}

/// Renders the events of one session's runs for one follower.
#[derive(Debug)]
pub struct Renderer {
    /// The id clients know the session by (`session_<app id>`).
    session_id: String,
    cwd: String,
    model: String,
    run: Option<RunView>,
}

impl Renderer {
    pub fn new(session_id: impl Into<String>, cwd: impl Into<String>, model: Option<&str>) -> Self {
        Renderer {
            session_id: session_id.into(),
            cwd: cwd.into(),
            model: model.unwrap_or("default").to_string(),
            run: None,
        }
    }

    /// A follower that resumes inside run `run_id` already has its `init`.
    pub fn resume_in(&mut self, run_id: &str) {
        self.run = Some(RunView {
            id: run_id.to_string(),
            ..RunView::default()
        });
    }

    /// The id of the run being rendered.
    pub fn run_id(&self) -> Option<&str> {
        self.run.as_ref().map(|r| r.id.as_str())
    }

    /// Where a client that was sent everything up to `last_sent` must resume:
    /// `last_sent`, or before the text block it was streaming (its
    /// `assistant` message comes at the block's end, rendered from all of it).
    pub fn resume_point(&self, last_sent: u64) -> u64 {
        self.run
            .as_ref()
            .and_then(|r| r.text_from)
            .map_or(last_sent, |from| from.min(last_sent))
    }

    /// The `system` `init` message of a run (its uuid is the run id).
    pub fn init(&self, run_id: &str) -> Value {
        json!({
            "type": "system",
            "subtype": "init",
            "uuid": run_id,
            "session_id": self.session_id,
            "cwd": self.cwd,
            "model": self.model,
            "tools": [],
            "mcp_servers": [],
            "slash_commands": [],
            "agents": [],
            "skills": [],
            "plugins": [],
            "permissionMode": "default",
            "apiKeySource": "none",
            "output_style": "default",
        })
    }

    /// Renders one `/ws` event frame (other frames give nothing).
    pub fn render(&mut self, event: &Value, out: &mut Vec<Rendered>) {
        let (Some(seq), Some(run_id), Some(kind)) = (
            event.get("seq").and_then(Value::as_u64),
            event.get("runId").and_then(Value::as_str),
            event.get("kind").and_then(Value::as_str),
        ) else {
            return;
        };
        if self.run_id() != Some(run_id) {
            out.push(Rendered {
                seq: None,
                message: self.init(run_id),
                ephemeral: false,
            });
            self.run = Some(RunView {
                id: run_id.to_string(),
                ..RunView::default()
            });
        }
        let parent = event.get("parentToolUseId").cloned().unwrap_or(Value::Null);
        let str_of = |key: &str| event.get(key).and_then(Value::as_str).unwrap_or_default();
        let uuid = message_uuid(run_id, seq);
        let session_id = self.session_id.clone();
        let model = self.model.clone();
        let Some(run) = self.run.as_mut() else {
            return;
        };
        if run.started_at.is_none() {
            run.started_at = event
                .get("timestamp")
                .and_then(Value::as_str)
                .map(str::to_string);
        }
        let assistant = |content: Value, parent: Value| {
            json!({
                "type": "assistant",
                "uuid": uuid,
                "session_id": session_id,
                "parent_tool_use_id": parent,
                "message": {
                    "id": format!("msg_{}", uuid.replace('-', "")),
                    "type": "message",
                    "role": "assistant",
                    "model": model,
                    "content": [content],
                    "stop_reason": null,
                    "stop_sequence": null,
                    "usage": {"input_tokens": 0, "output_tokens": 0},
                },
            })
        };
        let mut push = |message: Value, ephemeral: bool| {
            out.push(Rendered {
                seq: Some(seq),
                message,
                ephemeral,
            })
        };
        match kind {
            "stream_delta" => {
                let text = str_of("content");
                if run.text_from.is_none() {
                    run.text_from = Some(seq - 1);
                    run.text_parent = parent.as_str().map(str::to_string);
                }
                run.text.push_str(text);
                push(
                    json!({
                        "type": "stream_event",
                        "uuid": uuid,
                        "session_id": session_id,
                        "parent_tool_use_id": parent,
                        "event": {
                            "type": "content_block_delta",
                            "index": 0,
                            "delta": {"type": "text_delta", "text": text},
                        },
                    }),
                    true,
                );
            }
            "stream_end" => {
                if let Some(message) = run.close_text(&assistant) {
                    push(message, false);
                }
            }
            "text" if str_of("role") != "user" => {
                run.last_text = str_of("content").to_string();
                push(
                    assistant(json!({"type": "text", "text": str_of("content")}), parent),
                    false,
                );
            }
            "interactive_prompt" => {
                push(
                    assistant(json!({"type": "text", "text": str_of("content")}), parent),
                    false,
                );
            }
            "thinking" => push(
                assistant(
                    json!({"type": "thinking", "thinking": str_of("content"), "signature": ""}),
                    parent,
                ),
                false,
            ),
            "tool_use" => push(
                assistant(
                    json!({
                        "type": "tool_use",
                        "id": str_of("toolId"),
                        "name": str_of("toolName"),
                        "input": event.get("toolInput").cloned().unwrap_or_else(|| json!({})),
                    }),
                    parent,
                ),
                false,
            ),
            "tool_result" => push(
                json!({
                    "type": "user",
                    "uuid": uuid,
                    "session_id": session_id,
                    "parent_tool_use_id": parent,
                    "message": {
                        "role": "user",
                        "content": [{
                            "type": "tool_result",
                            "tool_use_id": str_of("toolId"),
                            "content": str_of("content"),
                            "is_error": event.get("isError").and_then(Value::as_bool).unwrap_or(false),
                        }],
                    },
                }),
                false,
            ),
            "error" => {
                if run.errors.len() >= MAX_RUN_ERRORS {
                    run.errors.pop_front();
                }
                run.errors.push_back(str_of("content").to_string());
            }
            "status" => {
                if let Some(budget) = event.get("tokenBudget") {
                    run.usage = Some(json!({
                        "input_tokens": budget.get("inputTokens").cloned().unwrap_or(json!(0)),
                        "output_tokens": budget.get("outputTokens").cloned().unwrap_or(json!(0)),
                        "cache_read_input_tokens": budget.get("cacheReadTokens").cloned().unwrap_or(json!(0)),
                        "cache_creation_input_tokens": budget.get("cacheCreationTokens").cloned().unwrap_or(json!(0)),
                    }));
                }
            }
            "permission_request" => {
                let request_id = str_of("requestId");
                let context = event.get("context").and_then(Value::as_object);
                let from_context = |key: &str| {
                    context
                        .and_then(|c| c.get(key))
                        .cloned()
                        .unwrap_or(Value::Null)
                };
                let tool_use_id = from_context("toolUseId")
                    .as_str()
                    .map_or_else(|| request_id.to_string(), str::to_string);
                let mut request = Map::new();
                request.insert("subtype".into(), json!("can_use_tool"));
                request.insert("tool_name".into(), json!(str_of("toolName")));
                request.insert(
                    "input".into(),
                    event.get("input").cloned().unwrap_or_else(|| json!({})),
                );
                request.insert("tool_use_id".into(), json!(tool_use_id));
                request.insert(
                    "permission_suggestions".into(),
                    match from_context("suggestions") {
                        Value::Null => json!([]),
                        v => v,
                    },
                );
                for (from, to) in [
                    ("description", "description"),
                    ("blockedPath", "blocked_path"),
                    ("decisionReason", "decision_reason"),
                    ("title", "title"),
                ] {
                    let v = from_context(from);
                    if !v.is_null() {
                        request.insert(to.into(), v);
                    }
                }
                push(
                    json!({"type": "control_request", "request_id": request_id, "request": request}),
                    false,
                );
            }
            "permission_cancelled" => push(
                json!({"type": "control_cancel_request", "request_id": str_of("requestId")}),
                false,
            ),
            "complete" => {
                // An interrupted stream never ended its block: show what came.
                let flushed = run.close_text(&assistant);
                let success = event.get("success").and_then(Value::as_bool) == Some(true);
                let aborted = event.get("aborted").and_then(Value::as_bool) == Some(true);
                let duration_ms = run
                    .started_at
                    .as_deref()
                    .zip(event.get("timestamp").and_then(Value::as_str))
                    .and_then(|(from, to)| {
                        let from = humantime::parse_rfc3339(from).ok()?;
                        let to = humantime::parse_rfc3339(to).ok()?;
                        to.duration_since(from).ok()
                    })
                    .map_or(0, |d| d.as_millis() as u64);
                let mut result = json!({
                    "type": "result",
                    "subtype": if success { "success" } else { "error_during_execution" },
                    "is_error": !success,
                    "duration_ms": duration_ms,
                    "duration_api_ms": 0,
                    "num_turns": 1,
                    "result": run.last_text,
                    "session_id": session_id,
                    "total_cost_usd": 0,
                    "usage": run.usage.clone().unwrap_or_else(|| json!({"input_tokens": 0, "output_tokens": 0})),
                    "permission_denials": [],
                    "uuid": uuid,
                });
                if !success {
                    let mut errors: Vec<String> = run.errors.iter().cloned().collect();
                    if aborted {
                        errors.push("The run was aborted".into());
                    } else if errors.is_empty() {
                        errors.push(format!(
                            "The run failed (exit code {})",
                            event.get("exitCode").cloned().unwrap_or(Value::Null)
                        ));
                    }
                    result["errors"] = json!(errors);
                }
                if let Some(message) = flushed {
                    out.push(Rendered {
                        seq: None,
                        message,
                        ephemeral: false,
                    });
                }
                out.push(Rendered {
                    seq: Some(seq),
                    message: result,
                    ephemeral: false,
                });
            }
            // User text (the client shows its own prompt), task notifications.
            _ => {}
        }
    }
}

impl RunView {
    /// Ends the open text block: its `assistant` message, if it had text.
    fn close_text(&mut self, assistant: &dyn Fn(Value, Value) -> Value) -> Option<Value> {
        self.text_from.take()?;
        let text = std::mem::take(&mut self.text);
        let parent = self.text_parent.take().map_or(Value::Null, Value::String);
        if text.is_empty() {
            return None;
        }
        let message = assistant(json!({"type": "text", "text": text}), parent);
        self.last_text = text;
        Some(message)
    }
}

/// A stable uuid per (run, seq): the run's uuid with the seq in its last
/// group, so a client that dedupes by uuid sees a replayed message as the same.
pub fn message_uuid(run_id: &str, seq: u64) -> String {
    match run_id.get(..23) {
        Some(prefix) if run_id.len() == 36 => format!("{prefix}-{:012x}", seq & 0xffff_ffff_ffff),
        _ => uuid::Uuid::new_v4().to_string(),
    }
}

/// A frame from a remote-session client (over its socket, or POSTed).
#[derive(Debug, Clone, PartialEq)]
pub enum Inbound {
    /// A user turn (`type: "user"`): its text, and its uuid (idempotency key).
    User {
        content: String,
        uuid: Option<String>,
    },
    /// `control_response` to a `can_use_tool` request.
    PermissionAnswer {
        request_id: String,
        decision: crate::protocol::PermissionDecision,
    },
    /// `control_request` `interrupt`.
    Interrupt { request_id: String },
    /// Another `control_request`: answered as unsupported.
    UnsupportedControl { request_id: String, subtype: String },
    /// Frames the client may send that need no action (`keep_alive`, ...).
    Ignored,
}

/// Why a client frame was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused(pub String);

impl Inbound {
    pub fn parse(value: &Value) -> Result<Inbound, Refused> {
        let Some(obj) = value.as_object() else {
            return Err(Refused("expected a JSON object".into()));
        };
        let ty = obj.get("type").and_then(Value::as_str).unwrap_or_default();
        let text = |v: Option<&Value>| v.and_then(Value::as_str).unwrap_or_default().to_string();
        match ty {
            "user" => {
                let content = match value.pointer("/message/content") {
                    Some(Value::String(s)) => s.clone(),
                    Some(Value::Array(blocks)) => blocks
                        .iter()
                        .filter(|b| b.get("type").and_then(Value::as_str) == Some("text"))
                        .filter_map(|b| b.get("text").and_then(Value::as_str))
                        .collect::<Vec<_>>()
                        .join("\n"),
                    _ => return Err(Refused("a user message needs message.content".into())),
                };
                if content.trim().is_empty() {
                    return Err(Refused("the user message has no text".into()));
                }
                Ok(Inbound::User {
                    content,
                    uuid: obj
                        .get("uuid")
                        .and_then(Value::as_str)
                        .filter(|u| !u.is_empty())
                        .map(str::to_string),
                })
            }
            "control_response" => {
                let response = obj.get("response").and_then(Value::as_object);
                let request_id = text(response.and_then(|r| r.get("request_id")));
                if request_id.is_empty() {
                    return Err(Refused("control_response needs response.request_id".into()));
                }
                let subtype = text(response.and_then(|r| r.get("subtype")));
                let inner = response.and_then(|r| r.get("response"));
                let behavior = text(inner.and_then(|r| r.get("behavior")));
                let allow = subtype == "success" && behavior == "allow";
                let message = inner
                    .and_then(|r| r.get("message"))
                    .or_else(|| response.and_then(|r| r.get("error")))
                    .and_then(Value::as_str)
                    .map(str::to_string);
                Ok(Inbound::PermissionAnswer {
                    request_id,
                    decision: crate::protocol::PermissionDecision {
                        allow,
                        updated_input: inner
                            .and_then(|r| r.get("updatedInput"))
                            .filter(|v| v.is_object())
                            .cloned(),
                        message,
                        remember_entry: None,
                    },
                })
            }
            "control_request" => {
                let request_id = text(obj.get("request_id"));
                let subtype = text(value.pointer("/request/subtype"));
                match subtype.as_str() {
                    "interrupt" => Ok(Inbound::Interrupt { request_id }),
                    _ => Ok(Inbound::UnsupportedControl {
                        request_id,
                        subtype,
                    }),
                }
            }
            "keep_alive" | "control_cancel_request" | "update_environment_variables" => {
                Ok(Inbound::Ignored)
            }
            "" => Err(Refused("a frame needs a string type".into())),
            other => Err(Refused(format!("unsupported message type: {other}"))),
        }
    }
}

/// `control_response` answering a client's `control_request`.
pub fn control_response(request_id: &str, error: Option<&str>) -> Value {
    match error {
        None => json!({
            "type": "control_response",
            "response": {"subtype": "success", "request_id": request_id},
        }),
        Some(error) => json!({
            "type": "control_response",
            "response": {"subtype": "error", "request_id": request_id, "error": error},
        }),
    }
}

/// An error for a bad client frame. The real client ignores unknown types,
/// so it is safe to send; other clients learn what was wrong.
pub fn error_message(message: &str) -> Value {
    json!({"type": "error", "error": {"type": "invalid_request_error", "message": message}})
}

#[cfg(test)]
mod tests {
    use super::*;

    const RUN: &str = "6c9fe3f6-75cf-4729-ba8e-3e96b15a1e69";

    fn ev(seq: u64, kind: &str, fields: Value) -> Value {
        let mut v = json!({"seq": seq, "runId": RUN, "kind": kind, "timestamp": "2026-07-08T10:00:05.000Z"});
        if let (Some(o), Some(f)) = (v.as_object_mut(), fields.as_object()) {
            o.extend(f.clone());
        }
        v
    }

    fn render_all(r: &mut Renderer, events: &[Value]) -> Vec<Rendered> {
        let mut out = Vec::new();
        for e in events {
            r.render(e, &mut out);
        }
        out
    }

    #[test]
    fn a_streamed_turn_is_init_deltas_one_assistant_and_a_result() {
        let mut r = Renderer::new("session_x", "/p", Some("m"));
        let out = render_all(
            &mut r,
            &[
                ev(1, "stream_delta", json!({"content": "Hel"})),
                ev(2, "stream_delta", json!({"content": "lo"})),
                ev(3, "stream_end", json!({})),
                ev(
                    4,
                    "complete",
                    json!({"success": true, "exitCode": 0, "aborted": false}),
                ),
            ],
        );
        let types: Vec<&str> = out
            .iter()
            .map(|m| m.message["type"].as_str().unwrap())
            .collect();
        assert_eq!(
            types,
            [
                "system",
                "stream_event",
                "stream_event",
                "assistant",
                "result"
            ]
        );
        assert_eq!(out[0].message["slash_commands"], json!([]));
        assert_eq!(out[3].message["message"]["content"][0]["text"], "Hello");
        assert_eq!(out[3].seq, Some(3));
        assert!(out[1].ephemeral && !out[3].ephemeral);
        assert_eq!(out[4].message["subtype"], "success");
        assert_eq!(out[4].message["result"], "Hello");
        assert_eq!(out[4].seq, Some(4));
    }

    #[test]
    fn resume_point_is_before_an_open_text_block() {
        let mut r = Renderer::new("s", "/p", None);
        render_all(
            &mut r,
            &[
                ev(
                    5,
                    "tool_use",
                    json!({"toolName": "Bash", "toolId": "t", "toolInput": {}}),
                ),
                ev(6, "stream_delta", json!({"content": "a"})),
                ev(7, "stream_delta", json!({"content": "b"})),
            ],
        );
        assert_eq!(r.resume_point(7), 5);
        render_all(&mut r, &[ev(8, "stream_end", json!({}))]);
        assert_eq!(r.resume_point(8), 8);
    }

    #[test]
    fn permissions_become_control_requests_with_the_gateway_id() {
        let mut r = Renderer::new("s", "/p", None);
        r.resume_in(RUN);
        let out = render_all(
            &mut r,
            &[
                ev(
                    1,
                    "permission_request",
                    json!({"requestId": "req-1", "toolName": "Bash", "input": {"command": "ls"},
                           "context": {"toolUseId": "toolu_1", "description": "List"}}),
                ),
                ev(
                    2,
                    "permission_cancelled",
                    json!({"requestId": "req-1", "reason": "answered"}),
                ),
            ],
        );
        assert_eq!(out.len(), 2, "no init for a resumed follower");
        let req = &out[0].message;
        assert_eq!(req["request_id"], "req-1");
        assert_eq!(req["request"]["subtype"], "can_use_tool");
        assert_eq!(req["request"]["tool_use_id"], "toolu_1");
        assert_eq!(req["request"]["input"]["command"], "ls");
        assert_eq!(req["request"]["description"], "List");
        assert_eq!(out[1].message["type"], "control_cancel_request");
    }

    #[test]
    fn a_failed_or_aborted_run_ends_with_an_error_result() {
        let mut r = Renderer::new("s", "/p", None);
        let out = render_all(
            &mut r,
            &[
                ev(1, "stream_delta", json!({"content": "partial"})),
                ev(2, "error", json!({"content": "boom"})),
                ev(
                    3,
                    "complete",
                    json!({"success": false, "exitCode": 1, "aborted": true}),
                ),
            ],
        );
        let result = &out.last().unwrap().message;
        assert_eq!(result["subtype"], "error_during_execution");
        assert_eq!(result["is_error"], true);
        assert_eq!(result["errors"][0], "boom");
        // The interrupted block is shown before the result.
        assert_eq!(out[out.len() - 2].message["type"], "assistant");
    }

    #[test]
    fn a_new_run_starts_with_its_init() {
        let mut r = Renderer::new("s", "/p", None);
        r.resume_in("other-run");
        let out = render_all(
            &mut r,
            &[ev(9, "text", json!({"role": "assistant", "content": "x"}))],
        );
        assert_eq!(out[0].message["subtype"], "init");
        assert_eq!(out[0].message["uuid"], RUN);
        assert_eq!(out[1].message["uuid"], message_uuid(RUN, 9));
        assert_eq!(message_uuid(RUN, 9), "6c9fe3f6-75cf-4729-ba8e-000000000009");
    }

    #[test]
    fn inbound_frames() {
        let allow = json!({"type":"control_response","response":{"subtype":"success","request_id":"r1","response":{"behavior":"allow","updatedInput":{"command":"ls"}}}});
        let Ok(Inbound::PermissionAnswer {
            request_id,
            decision,
        }) = Inbound::parse(&allow)
        else {
            panic!("not an answer");
        };
        assert_eq!(request_id, "r1");
        assert!(decision.allow);
        assert_eq!(decision.updated_input, Some(json!({"command": "ls"})));
        let deny = json!({"type":"control_response","response":{"subtype":"success","request_id":"r1","response":{"behavior":"deny","message":"no"}}});
        let Ok(Inbound::PermissionAnswer { decision, .. }) = Inbound::parse(&deny) else {
            panic!("not an answer");
        };
        assert!(!decision.allow);
        assert_eq!(decision.message.as_deref(), Some("no"));
        assert_eq!(
            Inbound::parse(
                &json!({"type":"control_request","request_id":"i","request":{"subtype":"interrupt"}})
            ),
            Ok(Inbound::Interrupt {
                request_id: "i".into()
            })
        );
        assert_eq!(
            Inbound::parse(
                &json!({"type":"user","uuid":"u","message":{"role":"user","content":[{"type":"text","text":"hi"}]}})
            ),
            Ok(Inbound::User {
                content: "hi".into(),
                uuid: Some("u".into())
            })
        );
        assert!(Inbound::parse(&json!({"type":"control_response","response":{}})).is_err());
        assert!(Inbound::parse(&json!([1])).is_err());
        assert!(Inbound::parse(&json!({"type":"dance"})).is_err());
        assert_eq!(
            Inbound::parse(&json!({"type":"keep_alive"})),
            Ok(Inbound::Ignored)
        );
    }
}
