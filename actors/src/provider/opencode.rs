//! OpenCode adapter: `opencode run --format json`, one process per turn.
//!
//! Command (checked against opencode-ai 1.18.33):
//! `opencode run --format json --thinking --dir=<cwd> [--session=<id>] [--model=<p/m>]
//! [--variant=<effort>] [--agent=plan | --auto]`, with the prompt on stdin
//! (a single argv prompt with spaces reaches the model wrapped in quotes;
//! stdin does not). `--thinking` only makes the CLI print the reasoning parts
//! it has anyway. Permission mode: plan -> `--agent=plan`, bypass ->
//! `--auto`, acceptEdits -> env `OPENCODE_PERMISSION={"edit":"allow"}`,
//! default -> nothing (tools the config marks `ask` are auto-rejected).
//!
//! Stream: every line is `{type, timestamp, sessionID, part|error}` with the
//! data nested under `part` (the reference read a flat shape and lost the
//! text; flat fields are only a fallback here). `sessionID` ->
//! `SessionCreated` (once, new sessions only); `text` -> `stream_delta` +
//! `stream_end` (parts arrive complete); `reasoning` -> `thinking`;
//! `tool_use` (completed or failed tool parts) -> `tool_use` + `tool_result`
//! from `part.state`; `step_finish` -> token `status`; `error` -> `error`
//! with `error.data.message`. There is no final line: the turn ends with the
//! process. At stdout EOF (`finish`) a turn whose last step finished with a
//! final reason (`stop`, not `tool-calls`) and no `error` event is reported
//! as a success; `exited` (when the run reports the exit code) decides the
//! rest: exit 0 without an `error` event is success, anything else a
//! failure. A run killed mid-step reports nothing (the registry fails it).

use serde_json::{json, Value};

use super::cli_support::{
    common_setup, emit, parse_json_line, str_field, value_text, PermissionMode, TurnEnd,
};
use super::{CommandSpec, LineParser, Provider, ProviderEvent, ProviderKind, Turn};
use crate::protocol::EventBody;

pub struct Opencode;

impl Provider for Opencode {
    fn kind(&self) -> ProviderKind {
        ProviderKind::Opencode
    }

    fn command(&self, turn: &Turn) -> CommandSpec {
        let mut spec = CommandSpec::new(&turn.bin);
        spec.arg("run")
            .arg("--format")
            .arg("json")
            .arg("--thinking");
        let mut dir = std::ffi::OsString::from("--dir=");
        dir.push(&turn.cwd);
        spec.arg(dir);
        if let Some(id) = &turn.provider_session_id {
            spec.arg(format!("--session={id}"));
        }
        if let Some(model) = turn.model() {
            spec.arg(format!("--model={model}"));
        }
        // Variants are provider-specific words (high, max, minimal, ...).
        if let Some(effort) = turn
            .effort()
            .filter(|e| e.len() <= 32 && e.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'))
        {
            spec.arg(format!("--variant={effort}"));
        }
        match PermissionMode::of(turn) {
            PermissionMode::Default => {}
            PermissionMode::AcceptEdits => {
                spec.env
                    .push(("OPENCODE_PERMISSION".into(), r#"{"edit":"allow"}"#.into()));
            }
            PermissionMode::Bypass => {
                spec.arg("--auto");
            }
            PermissionMode::Plan => {
                spec.arg("--agent=plan");
            }
        }
        spec.stdin = Some(turn.content.clone().into_bytes());
        common_setup(&mut spec);
        spec
    }

    fn parser(&self, turn: &Turn) -> Box<dyn LineParser> {
        Box::new(OpencodeParser::new(turn.provider_session_id.clone()))
    }
}

/// Parsing state of one OpenCode turn.
pub struct OpencodeParser {
    /// The id the turn resumed; compared with the first `sessionID` seen
    /// (later lines repeat it and are not looked at again).
    known_id: Option<String>,
    id_checked: bool,
    turn: TurnEnd,
    /// An `error` event was seen: the turn failed even if the exit is 0.
    saw_error: bool,
    /// `part.reason` of the last `step_finish` (`None` while a step runs).
    last_step_reason: Option<String>,
}

impl OpencodeParser {
    pub fn new(known_id: Option<String>) -> Self {
        OpencodeParser {
            known_id,
            id_checked: false,
            turn: TurnEnd::default(),
            saw_error: false,
            last_step_reason: None,
        }
    }
}

/// A field of the nested `part`, falling back to the flat event.
fn part_field<'a>(event: &'a Value, key: &str) -> Option<&'a Value> {
    event
        .get("part")
        .and_then(|p| p.get(key))
        .or_else(|| event.get(key))
        .filter(|v| !v.is_null())
}

fn part_str<'a>(event: &'a Value, key: &str) -> Option<&'a str> {
    part_field(event, key)
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
}

/// The message of an `error` event: `error.data.message`, `error.message`,
/// a string `error`, or the error's name.
fn error_message(event: &Value) -> String {
    let err = event.get("error");
    err.and_then(|e| e.get("data"))
        .and_then(|d| str_field(d, "message"))
        .or_else(|| err.and_then(|e| str_field(e, "message")))
        .or_else(|| err.and_then(Value::as_str).filter(|s| !s.is_empty()))
        .or_else(|| str_field(event, "message"))
        .or_else(|| err.and_then(|e| str_field(e, "name")))
        .unwrap_or("Unknown OpenCode error")
        .to_string()
}

impl LineParser for OpencodeParser {
    fn parse_line(&mut self, line: &str, out: &mut Vec<ProviderEvent>) {
        let Some(event) = parse_json_line(ProviderKind::Opencode, line) else {
            return;
        };
        let session = str_field(&event, "sessionID").or_else(|| part_str(&event, "sessionID"));
        if let Some(id) = session.filter(|_| !self.id_checked) {
            self.id_checked = true;
            // A resume that landed in another session is announced too.
            if self.known_id.as_deref() != Some(id) {
                self.known_id = Some(id.to_string());
                out.push(ProviderEvent::SessionCreated(id.to_string()));
            }
        }
        match str_field(&event, "type").unwrap_or("") {
            "text" => {
                let role = part_str(&event, "role")
                    .or_else(|| event.get("message").and_then(|m| str_field(m, "role")));
                if role == Some("user") {
                    return;
                }
                if let Some(text) = part_str(&event, "text") {
                    self.turn.text.message(out, text);
                }
            }
            "reasoning" => {
                if let Some(text) = part_str(&event, "text") {
                    self.turn.text.end(out);
                    emit(
                        out,
                        EventBody::Thinking {
                            content: text.to_string(),
                        },
                    );
                }
            }
            "tool_use" => {
                self.turn.text.end(out);
                let state = part_field(&event, "state").cloned().unwrap_or(json!({}));
                let tool_id = part_str(&event, "callID")
                    .or_else(|| part_str(&event, "id"))
                    .unwrap_or("")
                    .to_string();
                let input = state
                    .get("input")
                    .or_else(|| part_field(&event, "input"))
                    .filter(|v| !v.is_null())
                    .cloned()
                    .unwrap_or(json!({}));
                emit(
                    out,
                    EventBody::ToolUse {
                        tool_name: part_str(&event, "tool").unwrap_or("Tool").to_string(),
                        tool_input: input,
                        tool_id: tool_id.clone(),
                    },
                );
                match str_field(&state, "status") {
                    Some("completed") => {
                        let content = value_text(state.get("output"));
                        emit(out, EventBody::tool_result(tool_id, content, false));
                    }
                    Some("error") => {
                        let content = value_text(state.get("error"));
                        emit(out, EventBody::tool_result(tool_id, content, true));
                    }
                    _ => {}
                }
            }
            "step_start" => self.last_step_reason = None,
            "step_finish" => {
                self.turn.text.end(out);
                self.last_step_reason =
                    Some(part_str(&event, "reason").unwrap_or("stop").to_string());
                if let Some(tokens) = part_field(&event, "tokens").filter(|t| t.is_object()) {
                    emit(out, token_status(tokens));
                }
            }
            "error" => {
                self.turn.text.end(out);
                self.saw_error = true;
                emit(out, EventBody::error(error_message(&event)));
            }
            other => {
                // done and anything newer carry nothing to show.
                tracing::debug!(provider = "opencode", event = other, "ignoring event");
            }
        }
    }

    fn finish(&mut self, out: &mut Vec<ProviderEvent>) {
        self.turn.text.end(out);
        let final_step = self
            .last_step_reason
            .as_deref()
            .is_some_and(|r| r != "tool-calls");
        if final_step && !self.saw_error {
            self.turn.complete(out, 0);
        }
    }

    fn stderr_line(&mut self, line: &str, _out: &mut Vec<ProviderEvent>) {
        self.turn.stderr_line(line, &[]);
    }

    fn exited(&mut self, exit_code: Option<i32>, out: &mut Vec<ProviderEvent>) {
        if std::mem::replace(&mut self.turn.ended, true) {
            return;
        }
        self.turn.text.end(out);
        let Some(code) = exit_code else {
            return; // killed: the registry reports it
        };
        if code == 0 && !self.saw_error {
            out.push(ProviderEvent::TurnComplete { exit_code: 0 });
            return;
        }
        if !self.saw_error {
            emit(
                out,
                EventBody::error(self.turn.exit_message("opencode", code)),
            );
        }
        out.push(ProviderEvent::TurnComplete {
            exit_code: if code == 0 { 1 } else { code },
        });
    }
}

/// `status {text:"token_budget", tokenBudget}` from `step_finish.part.tokens`.
fn token_status(tokens: &Value) -> EventBody {
    let n = |k: &str| tokens.get(k).and_then(Value::as_u64).unwrap_or(0);
    let (input, output) = (n("input"), n("output"));
    let cache_read = tokens
        .get("cache")
        .and_then(|c| c.get("read"))
        .and_then(Value::as_u64)
        .unwrap_or(0);
    EventBody::Status {
        text: Some("token_budget".into()),
        status: None,
        tokens: None,
        token_budget: Some(json!({
            "used": tokens.get("total").and_then(Value::as_u64).unwrap_or(input + output),
            "inputTokens": input,
            "outputTokens": output,
            "reasoningTokens": n("reasoning"),
            "cacheReadTokens": cache_read,
        })),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::provider::cli_support::test_util::*;
    use crate::provider::cli_support::CLI_IDLE_TIMEOUT;

    const FIXTURE: &str = include_str!("../../tests/fixtures/opencode/full-turn.jsonl");
    const FAILED: &str = include_str!("../../tests/fixtures/opencode/api-error.jsonl");

    #[test]
    fn argv_prompt_on_stdin_and_modes() {
        let spec = Opencode.command(&turn(
            json!({"model": "local/test-model", "effort": "high"}),
            Some("ses_abc"),
        ));
        assert_eq!(
            args(&spec),
            [
                "run",
                "--format",
                "json",
                "--thinking",
                "--dir=/work/project",
                "--session=ses_abc",
                "--model=local/test-model",
                "--variant=high"
            ]
        );
        assert_eq!(spec.stdin.as_deref(), Some(&b"hello there"[..]));
        assert_eq!(spec.idle_timeout, Some(CLI_IDLE_TIMEOUT));

        let bypass = Opencode.command(&turn(json!({"skipPermissions": true}), None));
        assert_eq!(args(&bypass).last().map(String::as_str), Some("--auto"));
        let plan = Opencode.command(&turn(json!({"permissionMode": "plan"}), None));
        assert_eq!(args(&plan).last().map(String::as_str), Some("--agent=plan"));
        let edits = Opencode.command(&turn(
            json!({"permissionMode": "acceptEdits", "effort": "$(rm -rf)"}),
            None,
        ));
        assert!(edits
            .env
            .contains(&("OPENCODE_PERMISSION".into(), r#"{"edit":"allow"}"#.into())));
        assert!(!args(&edits).iter().any(|a| a.starts_with("--variant")));
    }

    #[test]
    fn nested_part_shape_is_read() {
        let mut parser = OpencodeParser::new(None);
        let events = run_lines(&mut parser, FIXTURE, Some(Some(0)));
        assert_eq!(sessions(&events), ["ses_dff18cf7cffewixEm06jg4qdh8"]);
        assert_eq!(turn_ends(&events), [0]);
        assert_streams_balanced(&events);
        assert_eq!(streamed_text(&events), "I'll run it.ran: oc\n");
        let bodies = bodies(&events);
        assert!(bodies.iter().any(|b| matches!(b,
            EventBody::Thinking { content } if content == "Pondering the request")));
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
        assert_eq!(uses.len(), 3);
        assert_eq!(uses[0].0, "bash");
        assert_eq!(uses[0].1["command"], "echo oc > oc.txt; cat oc.txt");
        assert_eq!(uses[0].2, "call_5f62c8dd");
        assert_eq!(uses[1].0, "write");
        assert_eq!(uses[2].1["command"], "echo ask > ask.txt");
        let results = tool_results(&bodies);
        assert_eq!(
            results,
            [
                ("call_5f62c8dd".into(), "oc\n".into(), false),
                (
                    "call_c9e985c3".into(),
                    "Wrote file successfully.".into(),
                    false
                ),
                (
                    "call_c6b6fd24".into(),
                    "The user rejected permission to use this specific tool call.".into(),
                    true
                ),
            ]
        );
        let budgets = bodies
            .iter()
            .filter(|b| matches!(b, EventBody::Status { .. }))
            .count();
        assert_eq!(budgets, 2, "one per step_finish");
        assert!(errors(&events).is_empty());
    }

    #[test]
    fn api_error_fails_the_turn_with_the_provider_message() {
        let mut parser = OpencodeParser::new(None);
        let events = run_lines(&mut parser, FAILED, Some(Some(1)));
        assert_eq!(errors(&events), ["stand-in bad request"]);
        assert_eq!(turn_ends(&events), [1]);
        // An error event fails the turn even when the process exits 0.
        let mut parser = OpencodeParser::new(None);
        let events = run_lines(&mut parser, FAILED, Some(Some(0)));
        assert_eq!(turn_ends(&events), [1]);
    }

    #[test]
    fn stdout_eof_after_a_final_step_is_success_without_the_exit_code() {
        // The run may not report the exit code: EOF after the final step ends the turn.
        let mut parser = OpencodeParser::new(None);
        let events = run_lines(&mut parser, FIXTURE, None);
        assert_eq!(turn_ends(&events), [0]);
        // Killed mid-step (after a tool step, before the final one): no turn end.
        let cut: String = FIXTURE.lines().take(8).collect::<Vec<_>>().join("\n");
        let mut parser = OpencodeParser::new(None);
        let events = run_lines(&mut parser, &cut, Some(None));
        assert!(turn_ends(&events).is_empty(), "{events:?}");
        // An error event never ends as success.
        let mut parser = OpencodeParser::new(None);
        let events = run_lines(&mut parser, &format!("{FIXTURE}\n{FAILED}"), None);
        assert!(turn_ends(&events).is_empty());
    }

    #[test]
    fn exit_codes_decide_the_turn() {
        let mut parser = OpencodeParser::new(None);
        let mut out = Vec::new();
        parser.stderr_line("Error: unknown model", &mut out);
        parser.exited(Some(2), &mut out);
        assert_eq!(turn_ends(&out), [2]);
        assert_eq!(
            errors(&out),
            ["opencode exited with code 2: Error: unknown model"]
        );
        // Killed (abort): nothing, the registry reports it.
        let mut parser = OpencodeParser::new(None);
        let mut out = Vec::new();
        parser.exited(None, &mut out);
        assert!(out.is_empty());
    }

    #[test]
    fn flat_shape_fallback_user_echo_and_garbage() {
        let mut parser = OpencodeParser::new(Some("ses_known".into()));
        let events = run_lines(
            &mut parser,
            concat!(
                "{\"type\":\"text\",\"sessionID\":\"ses_known\",\"text\":\"flat text\"}\n",
                "{\"type\":\"text\",\"sessionID\":\"ses_known\",\"part\":{\"type\":\"text\",\"role\":\"user\",\"text\":\"echo\"}}\n",
                "INFO some log line\n",
                "{\"type\":\"done\",\"sessionID\":\"ses_known\",\"reason\":\"idle\",\"rejected\":[]}\n",
                "{\"type\":\"error\",\"sessionID\":\"ses_known\",\"error\":{\"name\":\"ProviderAuthError\"}}\n",
            ),
            Some(Some(1)),
        );
        assert!(sessions(&events).is_empty());
        assert_eq!(streamed_text(&events), "flat text");
        let mut other = OpencodeParser::new(Some("ses_old".into()));
        let other_events = run_lines(
            &mut other,
            "{\"type\":\"step_start\",\"sessionID\":\"ses_new\"}\n{\"type\":\"step_start\",\"sessionID\":\"ses_child\"}",
            None,
        );
        assert_eq!(sessions(&other_events), ["ses_new"]);
        assert_eq!(errors(&events), ["ProviderAuthError"]);
        assert_eq!(turn_ends(&events), [1]);
    }
}
