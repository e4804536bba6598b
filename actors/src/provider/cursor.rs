//! Cursor agent CLI adapter: `cursor-agent --print --output-format
//! stream-json`, one process per turn.
//!
//! No registry package ships this CLI, so the argv follows Cursor's CLI
//! documentation (https://cursor.com/docs/cli/reference/output-format and
//! the parameter reference) and is tested against a fake executable:
//! `cursor-agent --print --output-format stream-json --trust
//! [--resume=<id>] [--model=M] [--force | --mode=plan] -- <prompt>`.
//! The prompt is the positional argument (the CLI appends piped stdin to it
//! rather than reading the prompt from stdin); it is passed as one argv
//! element, never through a shell, always behind `--`.
//! stdin is closed at once. `--trust` because headless runs in a folder the
//! CLI does not yet trust otherwise die with "Workspace Trust Required" (the
//! reference retried with it; the gateway session already names the folder).
//! bypassPermissions / skipPermissions -> `--force`; plan -> `--mode=plan`.
//!
//! Stream: `system/init.session_id` -> `SessionCreated` (new sessions only);
//! `user` echoes skipped; each `assistant` line is one whole message -> all
//! its text blocks as `stream_delta` + `stream_end` (the reference streamed
//! only `content[0]` and never ended the stream); `thinking` deltas are
//! gathered into one `thinking`; `tool_call started/completed` -> `tool_use`
//! / `tool_result` (the reference showed no tools live); `result` ->
//! `TurnComplete{0}` for a success, else `error` + `TurnComplete{1}`. A
//! failed run may end without `result` and with its message on stderr only:
//! `exited` then reports the stderr tail and the exit code.

use serde_json::{json, Value};

use super::cli_support::{
    common_setup, emit, parse_json_line, str_field, value_text, PermissionMode, TurnEnd,
};
use super::{CommandSpec, LineParser, Provider, ProviderEvent, ProviderKind, Turn};
use crate::protocol::EventBody;

/// Thinking text gathered before it is sent as one `thinking` event; a
/// longer run of deltas is sent in pieces of this size (nothing is dropped).
const MAX_THINKING_BYTES: usize = 256 * 1024;

pub struct Cursor;

impl Provider for Cursor {
    fn kind(&self) -> ProviderKind {
        ProviderKind::Cursor
    }

    fn command(&self, turn: &Turn) -> CommandSpec {
        let mut spec = CommandSpec::new(&turn.bin);
        spec.arg("--print")
            .arg("--output-format")
            .arg("stream-json")
            .arg("--trust");
        if let Some(id) = &turn.provider_session_id {
            spec.arg(format!("--resume={id}"));
        }
        if let Some(model) = turn.model() {
            spec.arg(format!("--model={model}"));
        }
        match PermissionMode::of(turn) {
            PermissionMode::Bypass => {
                spec.arg("--force");
            }
            PermissionMode::Plan => {
                spec.arg("--mode=plan");
            }
            PermissionMode::Default | PermissionMode::AcceptEdits => {}
        }
        // The prompt is the one positional, always after `--`.
        spec.arg("--");
        spec.arg(turn.content.as_str());
        common_setup(&mut spec);
        spec
    }

    fn parser(&self, turn: &Turn) -> Box<dyn LineParser> {
        Box::new(CursorParser::new(turn.provider_session_id.clone()))
    }
}

/// Parsing state of one Cursor turn.
pub struct CursorParser {
    /// The id the turn resumed; compared with the first `session_id` seen.
    known_id: Option<String>,
    id_checked: bool,
    turn: TurnEnd,
    /// Thinking deltas not yet sent (bounded by `MAX_THINKING_BYTES`).
    thinking: String,
    /// Tool calls announced but not completed (entries leave on completion).
    open_tools: std::collections::HashSet<String>,
}

impl CursorParser {
    pub fn new(known_id: Option<String>) -> Self {
        CursorParser {
            known_id,
            id_checked: false,
            turn: TurnEnd::default(),
            thinking: String::new(),
            open_tools: Default::default(),
        }
    }

    fn capture_session(&mut self, event: &Value, out: &mut Vec<ProviderEvent>) {
        if self.id_checked {
            return;
        }
        if let Some(id) = str_field(event, "session_id") {
            self.id_checked = true;
            if self.known_id.as_deref() != Some(id) {
                self.known_id = Some(id.to_string());
                out.push(ProviderEvent::SessionCreated(id.to_string()));
            }
        }
    }

    fn flush_thinking(&mut self, out: &mut Vec<ProviderEvent>) {
        if !self.thinking.is_empty() {
            emit(
                out,
                EventBody::Thinking {
                    content: std::mem::take(&mut self.thinking),
                },
            );
        }
    }

    fn end_turn(&mut self, out: &mut Vec<ProviderEvent>, exit_code: i32) {
        self.flush_thinking(out);
        self.turn.complete(out, exit_code);
    }

    fn tool_call(&mut self, event: &Value, out: &mut Vec<ProviderEvent>) {
        let Some((key, call)) = event
            .get("tool_call")
            .and_then(Value::as_object)
            .and_then(|m| m.iter().find(|(_, v)| v.is_object()))
        else {
            return;
        };
        let tool_id = str_field(event, "call_id")
            .or_else(|| str_field(event, "id"))
            .unwrap_or("")
            .to_string();
        let (name, input) = if key == "function" {
            let name = str_field(call, "name").unwrap_or("function").to_string();
            let input = match call.get("arguments") {
                Some(Value::String(s)) => {
                    serde_json::from_str(s).unwrap_or_else(|_| json!({ "arguments": s }))
                }
                Some(v) if !v.is_null() => v.clone(),
                _ => json!({}),
            };
            (name, input)
        } else {
            let input = call.get("args").cloned().unwrap_or(json!({}));
            (tool_name(key), input)
        };
        if self.open_tools.insert(tool_id.clone()) {
            self.turn.text.end(out);
            emit(
                out,
                EventBody::ToolUse {
                    tool_name: name,
                    tool_input: input,
                    tool_id: tool_id.clone(),
                },
            );
        }
        if str_field(event, "subtype") == Some("completed") {
            self.open_tools.remove(&tool_id);
            let (content, is_error) = tool_outcome(call.get("result"));
            emit(out, EventBody::tool_result(tool_id, content, is_error));
        }
    }
}

/// A display name for a `<name>ToolCall` key, in the names clients know
/// from Claude where one fits.
fn tool_name(key: &str) -> String {
    match key {
        "readToolCall" => "Read".into(),
        "writeToolCall" => "Write".into(),
        "editToolCall" => "Edit".into(),
        "shellToolCall" => "Bash".into(),
        "grepToolCall" => "Grep".into(),
        "globToolCall" => "Glob".into(),
        "lsToolCall" => "LS".into(),
        "deleteToolCall" => "Delete".into(),
        "todoToolCall" | "updateTodosToolCall" => "TodoWrite".into(),
        "webSearchToolCall" => "WebSearch".into(),
        other => {
            let base = other.strip_suffix("ToolCall").unwrap_or(other);
            let mut chars = base.chars();
            match chars.next() {
                Some(first) => first.to_uppercase().chain(chars).collect(),
                None => "Tool".into(),
            }
        }
    }
}

/// The text and error flag of a tool call's `result`: `success` (shell
/// stdout/stderr, read content, else the JSON) or any other outcome key
/// (`error`, `failure`, `rejected`, ...) as an error.
fn tool_outcome(result: Option<&Value>) -> (String, bool) {
    let Some(result) = result.and_then(Value::as_object) else {
        return (String::new(), false);
    };
    if let Some(success) = result.get("success") {
        let failed_exit = success
            .get("exitCode")
            .and_then(Value::as_i64)
            .is_some_and(|c| c != 0);
        return (outcome_text(success), failed_exit);
    }
    match result.iter().next() {
        Some((_, detail)) => (outcome_text(detail), true),
        None => (String::new(), false),
    }
}

fn outcome_text(detail: &Value) -> String {
    let stdout = str_field(detail, "stdout");
    let stderr = str_field(detail, "stderr");
    if stdout.is_some() || stderr.is_some() {
        return [stdout, stderr]
            .into_iter()
            .flatten()
            .collect::<Vec<_>>()
            .join("\n");
    }
    for key in ["content", "errorMessage", "message", "error"] {
        if let Some(text) = str_field(detail, key) {
            return text.to_string();
        }
    }
    value_text(Some(detail))
}

impl LineParser for CursorParser {
    fn parse_line(&mut self, line: &str, out: &mut Vec<ProviderEvent>) {
        let Some(event) = parse_json_line(ProviderKind::Cursor, line) else {
            return;
        };
        let ty = str_field(&event, "type").unwrap_or("");
        if ty != "thinking" {
            self.flush_thinking(out);
        }
        match ty {
            "system" => {
                if str_field(&event, "subtype").unwrap_or("init") == "init" {
                    self.capture_session(&event, out);
                }
            }
            "user" => {} // the prompt echoed back
            "assistant" => {
                self.capture_session(&event, out);
                let content = event.get("message").and_then(|m| m.get("content"));
                match content {
                    Some(Value::String(s)) => self.turn.text.delta(out, s),
                    Some(Value::Array(blocks)) => {
                        for block in blocks {
                            if str_field(block, "type").unwrap_or("text") == "text" {
                                if let Some(text) = str_field(block, "text") {
                                    self.turn.text.delta(out, text);
                                }
                            }
                        }
                    }
                    _ => {}
                }
                // Each line is a whole message between tool calls.
                self.turn.text.end(out);
            }
            "thinking" => {
                if let Some(text) = event.get("text").and_then(Value::as_str) {
                    if self.thinking.len() + text.len() > MAX_THINKING_BYTES {
                        self.flush_thinking(out);
                    }
                    self.thinking.push_str(text);
                }
                if str_field(&event, "subtype") == Some("completed") {
                    self.flush_thinking(out);
                }
            }
            "tool_call" => self.tool_call(&event, out),
            "result" => {
                self.capture_session(&event, out);
                let success = str_field(&event, "subtype") == Some("success")
                    && event.get("is_error").and_then(Value::as_bool) != Some(true);
                if success {
                    self.end_turn(out, 0);
                } else {
                    let msg = str_field(&event, "error")
                        .or_else(|| str_field(&event, "result"))
                        .unwrap_or("Cursor run failed");
                    self.turn.text.end(out);
                    emit(out, EventBody::error(msg));
                    self.end_turn(out, 1);
                }
            }
            other => {
                tracing::debug!(provider = "cursor", event = other, "ignoring event");
            }
        }
    }

    fn finish(&mut self, out: &mut Vec<ProviderEvent>) {
        self.flush_thinking(out);
        self.turn.text.end(out);
    }

    fn stderr_line(&mut self, line: &str, _out: &mut Vec<ProviderEvent>) {
        self.turn.stderr_line(line, &[]);
    }

    fn exited(&mut self, exit_code: Option<i32>, out: &mut Vec<ProviderEvent>) {
        let Some(code) = self.turn.open_at_exit(exit_code) else {
            return;
        };
        if code != 0 {
            let msg = match self.turn.stderr.text() {
                Some(tail) => tail,
                None => format!("cursor-agent exited with code {code}"),
            };
            emit(out, EventBody::error(msg));
        }
        self.end_turn(out, code);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::provider::cli_support::test_util::*;
    use crate::provider::cli_support::CLI_IDLE_TIMEOUT;

    const FIXTURE: &str = include_str!("../../tests/fixtures/cursor/full-turn.jsonl");

    #[test]
    fn argv_prompt_is_one_positional_and_modes_map() {
        let spec = Cursor.command(&turn(json!({"model": "sonnet-4"}), Some("c6b62c6f")));
        assert_eq!(
            args(&spec),
            [
                "--print",
                "--output-format",
                "stream-json",
                "--trust",
                "--resume=c6b62c6f",
                "--model=sonnet-4",
                "--",
                "hello there"
            ]
        );
        assert_eq!(spec.stdin, None);
        assert!(!spec.keep_stdin_open);
        assert_eq!(spec.idle_timeout, Some(CLI_IDLE_TIMEOUT));

        let mut dashed = turn(json!({"skipPermissions": true}), None);
        dashed.content = "--help me; rm -rf /".into();
        let a = args(&Cursor.command(&dashed));
        assert_eq!(a[a.len() - 3..], ["--force", "--", "--help me; rm -rf /"]);
        let plan = args(&Cursor.command(&turn(json!({"permissionMode": "plan"}), None)));
        assert!(plan.contains(&"--mode=plan".to_string()));
    }

    #[test]
    fn full_turn_maps_every_event_type() {
        let mut parser = CursorParser::new(None);
        let events = run_lines(&mut parser, FIXTURE, Some(Some(0)));
        assert_eq!(sessions(&events), ["c6b62c6f-7ead-4fd6-9922-e952131177ff"]);
        assert_eq!(turn_ends(&events), [0]);
        assert_streams_balanced(&events);
        assert_eq!(
            streamed_text(&events),
            "I'll create README.md.Second block.Done."
        );
        let bodies = bodies(&events);
        assert!(bodies.iter().any(|b| matches!(b,
            EventBody::Thinking { content } if content == "Plan: write the file")));
        let uses: Vec<(String, Value, String)> = bodies
            .iter()
            .filter_map(|b| match b {
                EventBody::ToolUse {
                    tool_name,
                    tool_input,
                    tool_id,
                } => Some((tool_name.clone(), tool_input.clone(), tool_id.clone())),
                _ => None,
            })
            .collect();
        let names: Vec<&str> = uses.iter().map(|u| u.0.as_str()).collect();
        assert_eq!(names, ["Write", "Read", "grep", "Bash", "Bash"]);
        assert_eq!(uses[0].1["path"], "README.md");
        assert_eq!(uses[2].1["pattern"], "TODO");
        let results = tool_results(&bodies);
        assert_eq!(results.len(), 4, "{results:?}");
        assert_eq!(results[0].0, "toolu_vrtx_01");
        assert!(results[0].1.contains("linesCreated"));
        assert_eq!(results[1].1, "{\"name\":\"app\"}");
        assert_eq!(results[2], ("toolu_vrtx_04".into(), "hi".into(), false));
        assert_eq!(
            results[3],
            ("toolu_vrtx_05".into(), "boom\nbad".into(), true)
        );
    }

    #[test]
    fn error_result_and_stderr_only_failure() {
        let mut parser = CursorParser::new(None);
        let events = run_lines(
            &mut parser,
            "{\"type\":\"result\",\"subtype\":\"error\",\"is_error\":true,\"result\":\"rate limited\",\"session_id\":\"s1\"}",
            Some(Some(1)),
        );
        assert_eq!(sessions(&events), ["s1"]);
        assert_eq!(errors(&events), ["rate limited"]);
        assert_eq!(turn_ends(&events), [1]);

        let mut parser = CursorParser::new(None);
        let mut out = Vec::new();
        parser.parse_line(
            "{\"type\":\"system\",\"subtype\":\"init\",\"session_id\":\"s2\"}",
            &mut out,
        );
        parser.stderr_line("Error: You've hit your usage limit", &mut out);
        parser.finish(&mut out);
        parser.exited(Some(1), &mut out);
        assert_eq!(errors(&out), ["Error: You've hit your usage limit"]);
        assert_eq!(turn_ends(&out), [1]);
    }

    #[test]
    fn garbage_unknown_and_resume() {
        let mut parser = CursorParser::new(Some("s-known".into()));
        let events = run_lines(
            &mut parser,
            concat!(
                "{\"type\":\"system\",\"subtype\":\"init\",\"session_id\":\"s-known\"}\n",
                "Workspace Trust Required\n",
                "{\"type\":\"telemetry\",\"data\":1}\n",
                "{\"type\":\"tool_call\",\"subtype\":\"started\",\"call_id\":\"x\",\"tool_call\":{}}\n",
                "{\"type\":\"assistant\",\"message\":{\"content\":\"plain string\"}}\n",
            ),
            Some(Some(0)),
        );
        assert!(sessions(&events).is_empty());
        assert_eq!(streamed_text(&events), "plain string");
        assert_streams_balanced(&events);
        assert_eq!(turn_ends(&events), [0]);
    }

    #[test]
    fn tool_names() {
        assert_eq!(tool_name("shellToolCall"), "Bash");
        assert_eq!(tool_name("semSearchToolCall"), "SemSearch");
        assert_eq!(tool_name("ToolCall"), "Tool");
    }
}
