//! Stand-ins for the OpenAI Responses API (the real Codex CLI) and an OpenAI-compatible Chat
//! Completions endpoint (the real OpenCode CLI), on 127.0.0.1:0. Replies follow the trigger words
//! of [`super::model_stub::Script`].
//!
//! What the CLIs really send (see /work/shared/PROVIDER-CLIS.md): Codex 0.169 `POST
//! /v1/responses` (`stream: true`; a tool round trip is a second POST whose `input` ends with the
//! `function_call_output`); OpenCode 1.18 `POST /v1/chat/completions` twice per new session (a
//! title call without tools, then the agent call with tools), SSE chunks ending in `[DONE]`.
//!
//! ```ignore
//! let api = OpenAiStub::start();
//! cmd.envs(api.codex_env(home.path()));    // CODEX_HOME with a custom provider at the stub
//! cmd.envs(api.opencode_env());            // OPENCODE_CONFIG_CONTENT pointing at the stub
//! ```

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use serde_json::{json, Value};

use super::model_stub::{
    pong_chunks, recall_text, Request, Responder, Script, StubServer, FAIL_MESSAGE,
};

/// The Codex model slug the stand-in is configured with (known to codex 0.169, so no
/// "model metadata not found" warning).
pub const CODEX_MODEL: &str = "gpt-5.5";
/// The OpenCode `provider/model` the stand-in is configured as.
pub const OPENCODE_MODEL: &str = "local/test-model";

static NEXT_CALL: AtomicU64 = AtomicU64::new(1);

/// A running OpenAI stand-in; stopped when dropped.
pub struct OpenAiStub {
    pub server: StubServer,
}

impl OpenAiStub {
    pub fn start() -> OpenAiStub {
        OpenAiStub {
            server: StubServer::start(handle),
        }
    }

    /// `http://127.0.0.1:PORT/v1`
    pub fn v1_url(&self) -> String {
        format!("{}/v1", self.server.base_url())
    }

    /// Env for a real `codex`: `CODEX_HOME=<dir>/codex-home` holding a `config.toml` whose custom
    /// provider points at this stub (the `OPENAI_BASE_URL` env is ignored by codex 0.169), no
    /// retries, and a dummy key.
    pub fn codex_env(&self, dir: &Path) -> Vec<(String, String)> {
        let home = dir.join("codex-home");
        std::fs::create_dir_all(&home).expect("create CODEX_HOME");
        let config = format!(
            r#"model = "{CODEX_MODEL}"
model_provider = "local"

[model_providers.local]
name = "local stand-in"
base_url = "{}"
wire_api = "responses"
env_key = "OPENAI_API_KEY"
stream_max_retries = 0
request_max_retries = 0

[features]
unbounded_connection_retries = false
"#,
            self.v1_url()
        );
        std::fs::write(home.join("config.toml"), config).expect("write codex config.toml");
        vec![
            ("CODEX_HOME".into(), home.display().to_string()),
            ("OPENAI_API_KEY".into(), "dummy".into()),
        ]
    }

    /// Env for a real `opencode`: the provider config inline (no file needed) and no network
    /// fetches of the models catalogue or updates.
    pub fn opencode_env(&self) -> Vec<(String, String)> {
        let config = json!({
            "provider": {"local": {
                "npm": "@ai-sdk/openai-compatible",
                "name": "Local stand-in",
                "options": {"baseURL": self.v1_url(), "apiKey": "dummy"},
                "models": {"test-model": {"name": "Test model", "tool_call": true}},
            }},
            "model": OPENCODE_MODEL,
            "autoupdate": false,
        });
        vec![
            ("OPENCODE_CONFIG_CONTENT".into(), config.to_string()),
            ("OPENCODE_DISABLE_MODELS_FETCH".into(), "1".into()),
            ("OPENCODE_DISABLE_AUTOUPDATE".into(), "1".into()),
        ]
    }
}

fn handle(req: &Request, res: &mut Responder) {
    if req.method != "POST" {
        res.json(404, &json!({"error": {"message": "not found"}}));
    } else if req.path.ends_with("/responses") {
        responses(req, res);
    } else if req.path.ends_with("/chat/completions") {
        chat_completions(req, res);
    } else {
        res.json(
            404,
            &json!({"error": {"message": format!("no route {}", req.path)}}),
        );
    }
}

fn fail(res: &mut Responder) {
    res.json(
        400,
        &json!({"error": {"message": FAIL_MESSAGE, "type": "invalid_request_error", "code": "bad_thing", "param": null}}),
    );
}

/// Text of a message `content`: a string, or the `text` of its parts.
fn content_text(content: Option<&Value>) -> String {
    match content {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(parts)) => parts
            .iter()
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join(""),
        _ => String::new(),
    }
}

/// A tool output as text.
fn output_text(output: Option<&Value>) -> String {
    match output {
        Some(Value::String(s)) => s.clone(),
        Some(v @ Value::Array(_)) => content_text(Some(v)),
        Some(Value::Object(o)) => o
            .get("content")
            .map(|c| content_text(Some(c)))
            .unwrap_or_else(|| Value::Object(o.clone()).to_string()),
        _ => String::new(),
    }
}

// ---- Responses API (Codex) ----

fn responses(req: &Request, res: &mut Responder) {
    let input = req
        .json
        .get("input")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let user_texts: Vec<String> = input
        .iter()
        .filter(|i| i.get("role").and_then(Value::as_str) == Some("user"))
        .map(|i| content_text(i.get("content")))
        .collect();
    let prompt = user_texts.last().cloned().unwrap_or_default();
    let last_type = input
        .last()
        .and_then(|i| i.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("");
    let item = if last_type.ends_with("_output") {
        let out = output_text(input.last().and_then(|i| i.get("output")));
        message_item(&format!("ran: {out}"))
    } else {
        match Script::of(&prompt) {
            Script::Fail400 => return fail(res),
            Script::RunCommand(cmd) => json!({
                "type": "function_call",
                "id": format!("fc_{}", NEXT_CALL.load(Ordering::Relaxed)),
                "call_id": format!("call_{}", NEXT_CALL.fetch_add(1, Ordering::Relaxed)),
                "name": "exec_command",
                "arguments": json!({"cmd": cmd}).to_string(),
            }),
            Script::Recall => message_item(&recall_text(&user_texts)),
            Script::Text(p) => message_item(&pong_chunks(&p).concat()),
        }
    };
    let id = format!("resp_{}", NEXT_CALL.fetch_add(1, Ordering::Relaxed));
    let events = [
        json!({"type": "response.created", "response": {"id": id}}),
        json!({"type": "response.output_item.done", "output_index": 0, "item": item}),
        json!({"type": "response.completed", "response": {"id": id,
            "usage": {"input_tokens": 42, "output_tokens": 7, "total_tokens": 49}}}),
    ];
    for e in &events {
        if !res.sse_json(e) {
            return;
        }
    }
}

fn message_item(text: &str) -> Value {
    json!({
        "type": "message",
        "role": "assistant",
        "id": format!("msg_{}", NEXT_CALL.fetch_add(1, Ordering::Relaxed)),
        "content": [{"type": "output_text", "text": text, "annotations": []}],
    })
}

// ---- Chat Completions (OpenCode) ----

fn chat_completions(req: &Request, res: &mut Responder) {
    let messages = req
        .json
        .get("messages")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let user_texts: Vec<String> = messages
        .iter()
        .filter(|m| m.get("role").and_then(Value::as_str) == Some("user"))
        .map(|m| content_text(m.get("content")))
        .collect();
    let prompt = user_texts.last().cloned().unwrap_or_default();
    let has_tools = req
        .json
        .get("tools")
        .and_then(Value::as_array)
        .is_some_and(|t| !t.is_empty());
    let last = messages.last();
    let chunk = |delta: Value, finish: Option<&str>| {
        json!({"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1,
               "model": "test-model",
               "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
    };
    let text_chunks = |parts: Vec<String>| {
        let mut out = vec![chunk(json!({"role": "assistant", "content": ""}), None)];
        out.extend(
            parts
                .into_iter()
                .map(|p| chunk(json!({"content": p}), None)),
        );
        out.push(chunk(json!({}), Some("stop")));
        out
    };
    let events = if !has_tools {
        // The title-generation call.
        text_chunks(vec!["Stand-in title".into()])
    } else if last.and_then(|m| m.get("role")).and_then(Value::as_str) == Some("tool") {
        let out = output_text(last.and_then(|m| m.get("content")));
        text_chunks(vec!["ran: ".into(), out])
    } else {
        match Script::of(&prompt) {
            Script::Fail400 => return fail(res),
            Script::RunCommand(cmd) => vec![
                chunk(
                    json!({"role": "assistant", "tool_calls": [{"index": 0,
                        "id": format!("call_{}", NEXT_CALL.fetch_add(1, Ordering::Relaxed)),
                        "type": "function",
                        "function": {"name": "bash", "arguments":
                            json!({"command": cmd, "description": "Run the requested command"}).to_string()}}]}),
                    None,
                ),
                chunk(json!({}), Some("tool_calls")),
            ],
            Script::Recall => text_chunks(vec![recall_text(&user_texts)]),
            Script::Text(p) => text_chunks(pong_chunks(&p)),
        }
    };
    for e in &events {
        if !res.sse_json(e) {
            return;
        }
    }
    let usage = json!({"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1,
        "model": "test-model", "choices": [],
        "usage": {"prompt_tokens": 42, "completion_tokens": 7, "total_tokens": 49}});
    if res.sse_json(&usage) {
        res.sse("[DONE]");
    }
}
