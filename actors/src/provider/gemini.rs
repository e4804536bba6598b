//! Google Gemini CLI adapter: headless `gemini --output-format stream-json`,
//! one process per turn. (The reference dropped Gemini; it comes back here.)
//!
//! Command (checked against @google/gemini-cli 0.61.0):
//! `gemini --output-format stream-json --skip-trust [--model=M]
//! [--approval-mode=auto_edit|yolo|plan] [--resume=<session id>]`, with the
//! prompt on stdin (stdin that is not a TTY makes the CLI headless and is
//! the prompt; stdin is then closed). No shell wrapper: the binary is spawned
//! directly. `--skip-trust` because the gateway session already names this
//! project folder; without it a fresh folder exits 55. Without `--model` the
//! CLI's own default (settings or "auto" routing) applies. In the default
//! approval mode the CLI offers the model no tool that needs confirmation
//! (stream-json has no approval event); `bypassPermissions` -> `yolo`.
//!
//! Stream: `init.session_id` -> `SessionCreated` (new sessions only);
//! assistant `message` deltas -> `stream_delta` (a non-delta message is a
//! whole block: delta + `stream_end`), user echoes are skipped; `tool_use` /
//! `tool_result` -> the same kinds (`tool_id` pairs them); `error`
//! (non-final warnings such as loop detection) -> `error`; `result` (always
//! last) -> token `status`, then `TurnComplete{0}` for `status: success`,
//! else `error` with the API's message + `TurnComplete{1}`. A process that
//! exits without `result` (auth exit 41, untrusted folder 55, ...) gets an
//! `error` naming the documented cause and the stderr tail.

use serde_json::{json, Value};

use super::cli_support::{
    common_setup, emit, parse_json_line, str_field, value_text, PermissionMode, TurnEnd,
};
use super::{CommandSpec, LineParser, Provider, ProviderEvent, ProviderKind, Turn};
use crate::protocol::EventBody;

/// Stderr lines Gemini prints on every run that explain nothing.
const STDERR_NOISE: [&str; 6] = [
    "256-color support not detected",
    "Ripgrep is not available",
    "[STARTUP]",
    "Loaded cached credentials",
    "DeprecationWarning",
    "--trace-deprecation",
];

pub struct Gemini;

impl Provider for Gemini {
    fn kind(&self) -> ProviderKind {
        ProviderKind::Gemini
    }

    fn command(&self, turn: &Turn) -> CommandSpec {
        let mut spec = CommandSpec::new(&turn.bin);
        spec.arg("--output-format")
            .arg("stream-json")
            .arg("--skip-trust");
        if let Some(model) = turn.model() {
            spec.arg(format!("--model={model}"));
        }
        match PermissionMode::of(turn) {
            PermissionMode::Default => {}
            PermissionMode::AcceptEdits => {
                spec.arg("--approval-mode=auto_edit");
            }
            PermissionMode::Bypass => {
                spec.arg("--approval-mode=yolo");
            }
            PermissionMode::Plan => {
                spec.arg("--approval-mode=plan");
            }
        }
        if let Some(id) = &turn.provider_session_id {
            spec.arg(format!("--resume={id}"));
        }
        spec.stdin = Some(turn.content.clone().into_bytes());
        common_setup(&mut spec);
        spec
    }

    fn parser(&self, turn: &Turn) -> Box<dyn LineParser> {
        Box::new(GeminiParser::new(turn.provider_session_id.clone()))
    }
}

/// Parsing state of one Gemini turn.
pub struct GeminiParser {
    known_id: Option<String>,
    turn: TurnEnd,
}

impl GeminiParser {
    pub fn new(known_id: Option<String>) -> Self {
        GeminiParser {
            known_id,
            turn: TurnEnd::default(),
        }
    }
}

/// What the CLI's documented exit codes mean, for a run without `result`.
fn exit_meaning(code: i32) -> &'static str {
    match code {
        41 => "authentication failed (check GEMINI_API_KEY and the selected auth type)",
        42 => "invalid input",
        44 => "sandbox error",
        52 => "invalid configuration",
        53 => "turn limit reached",
        55 => "the folder is not trusted",
        127 => "the gemini CLI is not installed",
        _ => "the run failed",
    }
}

impl LineParser for GeminiParser {
    fn parse_line(&mut self, line: &str, out: &mut Vec<ProviderEvent>) {
        let Some(event) = parse_json_line(ProviderKind::Gemini, line) else {
            return;
        };
        match str_field(&event, "type").unwrap_or("") {
            "init" => {
                if let Some(id) = str_field(&event, "session_id") {
                    if self.known_id.as_deref() != Some(id) {
                        self.known_id = Some(id.to_string());
                        out.push(ProviderEvent::SessionCreated(id.to_string()));
                    }
                }
            }
            "message" => {
                // The user's prompt is echoed back; the client already has it.
                if str_field(&event, "role") != Some("assistant") {
                    return;
                }
                let content = event.get("content").and_then(Value::as_str).unwrap_or("");
                self.turn.text.delta(out, content);
                if event.get("delta").and_then(Value::as_bool) != Some(true) {
                    self.turn.text.end(out);
                }
            }
            "tool_use" => {
                self.turn.text.end(out);
                emit(
                    out,
                    EventBody::ToolUse {
                        tool_name: str_field(&event, "tool_name").unwrap_or("Tool").to_string(),
                        tool_input: event
                            .get("parameters")
                            .filter(|p| !p.is_null())
                            .cloned()
                            .unwrap_or(json!({})),
                        tool_id: str_field(&event, "tool_id").unwrap_or("").to_string(),
                    },
                );
            }
            "tool_result" => {
                self.turn.text.end(out);
                let is_error = str_field(&event, "status") == Some("error");
                let mut content = value_text(event.get("output"));
                if content.is_empty() {
                    if let Some(err) = event.get("error") {
                        content = str_field(err, "message")
                            .map_or_else(|| value_text(Some(err)), str::to_string);
                    }
                }
                emit(
                    out,
                    EventBody::tool_result(
                        str_field(&event, "tool_id").unwrap_or(""),
                        content,
                        is_error,
                    ),
                );
            }
            "error" => {
                let msg = str_field(&event, "message").unwrap_or("Gemini reported an error");
                emit(out, EventBody::error(msg));
            }
            "result" => {
                self.turn.text.end(out);
                if let Some(stats) = event.get("stats").filter(|s| s.is_object()) {
                    emit(out, token_status(stats));
                }
                if str_field(&event, "status") == Some("success") {
                    self.turn.complete(out, 0);
                } else {
                    let msg = event
                        .get("error")
                        .and_then(|e| str_field(e, "message"))
                        .unwrap_or("Gemini turn failed");
                    emit(out, EventBody::error(msg));
                    self.turn.complete(out, 1);
                }
            }
            other => {
                tracing::debug!(provider = "gemini", event = other, "ignoring event");
            }
        }
    }

    fn finish(&mut self, out: &mut Vec<ProviderEvent>) {
        self.turn.text.end(out);
    }

    fn stderr_line(&mut self, line: &str, _out: &mut Vec<ProviderEvent>) {
        self.turn.stderr_line(line, &STDERR_NOISE);
    }

    fn exited(&mut self, exit_code: Option<i32>, out: &mut Vec<ProviderEvent>) {
        let Some(code) = self.turn.open_at_exit(exit_code) else {
            return;
        };
        if code != 0 {
            let mut msg = format!("gemini exited with code {code}: {}", exit_meaning(code));
            if let Some(tail) = self.turn.stderr.text() {
                msg.push('\n');
                msg.push_str(&tail);
            }
            emit(out, EventBody::error(msg));
        }
        self.turn.complete(out, code);
    }
}

/// `status {text:"token_budget", tokenBudget}` from `result.stats`.
fn token_status(stats: &Value) -> EventBody {
    let n = |k: &str| stats.get(k).and_then(Value::as_u64).unwrap_or(0);
    let (input, output) = (n("input_tokens"), n("output_tokens"));
    let total = stats
        .get("total_tokens")
        .and_then(Value::as_u64)
        .unwrap_or(input + output);
    EventBody::Status {
        text: Some("token_budget".into()),
        status: None,
        tokens: None,
        token_budget: Some(json!({
            "used": total,
            "inputTokens": input,
            "outputTokens": output,
            "cachedInputTokens": n("cached"),
        })),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::provider::cli_support::test_util::*;
    use crate::provider::cli_support::CLI_IDLE_TIMEOUT;

    const FIXTURE: &str = include_str!("../../tests/fixtures/gemini/full-turn.jsonl");
    const FAILED: &str = include_str!("../../tests/fixtures/gemini/api-error.jsonl");

    #[test]
    fn argv_prompt_on_stdin_and_modes() {
        let spec = Gemini.command(&turn(json!({"model": "gemini-2.5-flash"}), None));
        assert_eq!(
            args(&spec),
            [
                "--output-format",
                "stream-json",
                "--skip-trust",
                "--model=gemini-2.5-flash"
            ]
        );
        assert_eq!(spec.stdin.as_deref(), Some(&b"hello there"[..]));
        assert!(!spec.keep_stdin_open);
        assert_eq!(spec.idle_timeout, Some(CLI_IDLE_TIMEOUT));

        let resumed = args(&Gemini.command(&turn(
            json!({"permissionMode": "bypassPermissions"}),
            Some("f753174c-8758-452a-bad8-f6ebaf430987"),
        )));
        assert_eq!(
            resumed[3..],
            [
                "--approval-mode=yolo",
                "--resume=f753174c-8758-452a-bad8-f6ebaf430987"
            ]
        );
        let edits = args(&Gemini.command(&turn(json!({"permissionMode": "acceptEdits"}), None)));
        assert!(edits.contains(&"--approval-mode=auto_edit".to_string()));
        let plan = args(&Gemini.command(&turn(json!({"permissionMode": "plan"}), None)));
        assert!(plan.contains(&"--approval-mode=plan".to_string()));
    }

    #[test]
    fn full_turn_maps_every_event_type() {
        let mut parser = GeminiParser::new(None);
        let events = run_lines(&mut parser, FIXTURE, Some(Some(0)));
        assert_eq!(sessions(&events), ["f753174c-8758-452a-bad8-f6ebaf430987"]);
        assert_eq!(turn_ends(&events), [0]);
        assert_streams_balanced(&events);
        // The user echo is not streamed; both assistant blocks are.
        assert_eq!(streamed_text(&events), "I'll list them.gem is there.");
        let bodies = bodies(&events);
        let ends = bodies
            .iter()
            .filter(|b| matches!(b, EventBody::StreamEnd {}))
            .count();
        assert_eq!(ends, 2, "one stream per text block: {bodies:?}");
        assert!(bodies.iter().any(|b| matches!(b,
            EventBody::ToolUse { tool_name, tool_input, tool_id }
                if tool_name == "run_shell_command"
                && tool_input["command"] == "echo gem > g.txt; cat g.txt"
                && tool_id == "run_shell_command__1")));
        let results = tool_results(&bodies);
        assert_eq!(
            results,
            [
                ("run_shell_command__1".to_string(), "gem".to_string(), false),
                ("read_file__2".to_string(), "No such file".to_string(), true),
            ]
        );
        assert_eq!(errors(&events), ["Loop detected, stopping"]);
        assert!(bodies.iter().any(|b| matches!(b,
            EventBody::Status { token_budget: Some(t), .. } if t["used"] == 49)));
    }

    #[test]
    fn api_error_result_fails_the_turn_with_its_message() {
        let mut parser = GeminiParser::new(None);
        let events = run_lines(&mut parser, FAILED, Some(Some(144)));
        assert_eq!(turn_ends(&events), [1]);
        let errs = errors(&events);
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert!(errs[0].contains("stand-in bad request"), "{errs:?}");
    }

    #[test]
    fn exit_without_result_names_the_cause() {
        let mut parser = GeminiParser::new(None);
        let mut out = Vec::new();
        parser.stderr_line(
            "Warning: 256-color support not detected. Using a terminal...",
            &mut out,
        );
        parser.stderr_line("Invalid auth method selected.", &mut out);
        parser.exited(Some(41), &mut out);
        assert_eq!(turn_ends(&out), [41]);
        let errs = errors(&out);
        assert_eq!(errs.len(), 1);
        assert!(errs[0].starts_with("gemini exited with code 41: authentication failed"));
        assert!(
            errs[0].ends_with("\nInvalid auth method selected."),
            "{errs:?}"
        );
        assert!(!errs[0].contains("256-color"));
    }

    #[test]
    fn resumed_session_not_announced_and_garbage_tolerated() {
        let mut parser = GeminiParser::new(Some("s-1".into()));
        let events = run_lines(
            &mut parser,
            "{\"type\":\"init\",\"session_id\":\"s-1\"}\nGemini says hi\n{\"type\":\"telemetry\",\"x\":1}\n{\"type\":\"message\",\"role\":\"assistant\",\"content\":\"whole\"}\n{\"type\":\"message\"}\n{\"type\":\"result\",\"status\":\"success\"}\n{\"type\":\"result\",\"status\":\"error\"}",
            Some(Some(0)),
        );
        assert!(sessions(&events).is_empty());
        assert_streams_balanced(&events);
        assert_eq!(streamed_text(&events), "whole");
        assert_eq!(turn_ends(&events), [0]);
    }
}
