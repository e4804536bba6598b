//! OpenAI Codex CLI adapter: `codex exec --json`, one process per turn.
//!
//! Command (checked against codex-cli 0.169.0):
//! `codex exec --json --skip-git-repo-check [--model=M] --sandbox=<mode>
//! [--config=model_reasoning_effort="E"] --cd=<cwd> [resume <thread id>] -`, with
//! the prompt on stdin (`-`; stdin is then closed). Exec options must come
//! before `resume`. Sandbox from the permission mode: default/acceptEdits ->
//! `workspace-write`, bypass -> `danger-full-access`, plan -> `read-only`
//! (exec never asks for approval; `approval_policy` values the reference used
//! are rejected by current CLIs).
//!
//! Stream (JSONL; parsed as generic JSON because the `web_search` item
//! carries the key `id` twice):
//! - `thread.started.thread_id` -> `SessionCreated` (new sessions only);
//! - `item.*` by item type: `agent_message` -> `stream_delta` + `stream_end`;
//!   `reasoning` -> `thinking`; `command_execution`, `file_change`,
//!   `mcp_tool_call`, `web_search` -> `tool_use` when first seen and
//!   `tool_result` when completed (ids are the item ids made unique per run);
//!   `todo_list` -> `tool_use TodoList`; `error` items -> `error`; unknown
//!   item types -> `tool_use` named after the type, carrying the whole item;
//! - top-level `error` (e.g. "Reconnecting... 1/5") -> `error`;
//! - `turn.completed` -> token `status` + `TurnComplete{0}`;
//!   `turn.failed` -> `error` (unless the same text was just reported) +
//!   `TurnComplete{1}`.
//! - A process that exits without a turn end (bad flags, untrusted dir) gets
//!   an `error` naming the exit and the stderr tail, then `TurnComplete`.

use std::collections::HashSet;

use serde_json::{json, Value};

use super::cli_support::{
    common_setup, emit, parse_json_line, run_nonce, str_field, value_text, PermissionMode, TurnEnd,
};
use super::{CommandSpec, LineParser, Provider, ProviderEvent, ProviderKind, Turn};
use crate::protocol::EventBody;

/// Reasoning efforts Codex accepts for `model_reasoning_effort`.
const EFFORTS: [&str; 5] = ["minimal", "low", "medium", "high", "xhigh"];

/// Stderr lines Codex always prints that explain nothing.
const STDERR_NOISE: [&str; 2] = [
    "Reading additional input from stdin",
    "WARNING: proceeding, even though we could not create PATH aliases",
];

pub struct Codex;

impl Provider for Codex {
    fn kind(&self) -> ProviderKind {
        ProviderKind::Codex
    }

    fn command(&self, turn: &Turn) -> CommandSpec {
        let mut spec = CommandSpec::new(&turn.bin);
        spec.arg("exec").arg("--json").arg("--skip-git-repo-check");
        if let Some(model) = turn.model() {
            spec.arg(format!("--model={model}"));
        }
        let sandbox = match PermissionMode::of(turn) {
            PermissionMode::Default | PermissionMode::AcceptEdits => "workspace-write",
            PermissionMode::Bypass => "danger-full-access",
            PermissionMode::Plan => "read-only",
        };
        spec.arg(format!("--sandbox={sandbox}"));
        if let Some(effort) = turn.effort().filter(|e| EFFORTS.contains(e)) {
            spec.arg(format!("--config=model_reasoning_effort=\"{effort}\""));
        }
        let mut cd = std::ffi::OsString::from("--cd=");
        cd.push(&turn.cwd);
        spec.arg(cd);
        if let Some(id) = &turn.provider_session_id {
            // A positional: the registry only hands out `safe_id`s, which
            // never start with `-`.
            spec.arg("resume").arg(id);
        }
        // The prompt comes on stdin: no argv length limit, not visible in ps,
        // never parsed as a flag.
        spec.arg("-");
        spec.stdin = Some(turn.content.clone().into_bytes());
        common_setup(&mut spec);
        spec
    }

    fn parser(&self, turn: &Turn) -> Box<dyn LineParser> {
        Box::new(CodexParser::new(turn.provider_session_id.clone()))
    }
}

/// Parsing state of one Codex turn.
pub struct CodexParser {
    /// The id the turn resumed (not announced again).
    known_id: Option<String>,
    /// Makes item ids unique across the session's turns.
    nonce: String,
    /// Items whose `tool_use` went out and whose result has not (bounded by
    /// the tools running at once: entries leave on completion).
    open_tools: HashSet<String>,
    /// Counter for `todo_list` snapshots (each is its own `tool_use`).
    todo_snapshots: u32,
    turn: TurnEnd,
    /// The last `error` text sent, so `turn.failed` does not repeat it.
    last_error: Option<String>,
}

impl CodexParser {
    pub fn new(known_id: Option<String>) -> Self {
        CodexParser {
            known_id,
            nonce: run_nonce(),
            open_tools: HashSet::new(),
            todo_snapshots: 0,
            turn: TurnEnd::default(),
            last_error: None,
        }
    }

    fn tool_id(&self, item_id: &str) -> String {
        format!("codex-{}-{}", self.nonce, item_id)
    }

    fn error(&mut self, out: &mut Vec<ProviderEvent>, message: &str) {
        self.last_error = Some(message.to_string());
        emit(out, EventBody::error(message));
    }

    /// Emits the `tool_use` of an item once.
    fn tool_use(
        &mut self,
        out: &mut Vec<ProviderEvent>,
        item_id: &str,
        tool_name: &str,
        tool_input: Value,
    ) {
        if self.open_tools.insert(item_id.to_string()) {
            self.turn.text.end(out);
            emit(
                out,
                EventBody::ToolUse {
                    tool_name: tool_name.to_string(),
                    tool_input,
                    tool_id: self.tool_id(item_id),
                },
            );
        }
    }

    /// Emits the `tool_result` of an item (after its `tool_use`).
    fn tool_result(
        &mut self,
        out: &mut Vec<ProviderEvent>,
        item_id: &str,
        content: String,
        is_error: bool,
    ) {
        self.open_tools.remove(item_id);
        emit(
            out,
            EventBody::tool_result(self.tool_id(item_id), content, is_error),
        );
    }

    fn item(&mut self, out: &mut Vec<ProviderEvent>, phase: &str, item: &Value) {
        let completed = phase == "item.completed";
        let item_id = str_field(item, "id").unwrap_or("item").to_string();
        let status = str_field(item, "status").unwrap_or("");
        let failed = matches!(status, "failed" | "declined");
        match str_field(item, "type").unwrap_or("") {
            "agent_message" => {
                // Codex sends whole messages on completion only.
                if completed {
                    if let Some(text) = str_field(item, "text") {
                        self.turn.text.message(out, text);
                    }
                }
            }
            "reasoning" => {
                if completed {
                    if let Some(text) = str_field(item, "text") {
                        self.turn.text.end(out);
                        emit(
                            out,
                            EventBody::Thinking {
                                content: text.to_string(),
                            },
                        );
                    }
                }
            }
            "command_execution" => {
                let command = str_field(item, "command").unwrap_or("");
                self.tool_use(out, &item_id, "Bash", json!({ "command": command }));
                if completed {
                    let exit_code = item.get("exit_code").and_then(Value::as_i64);
                    let mut content = value_text(item.get("aggregated_output"));
                    let is_error = failed || exit_code.is_some_and(|c| c != 0);
                    if content.is_empty() && is_error {
                        content = match exit_code {
                            Some(c) => format!("Command failed with exit code {c}"),
                            None => format!("Command {status}"),
                        };
                    }
                    self.tool_result(out, &item_id, content, is_error);
                }
            }
            "file_change" => {
                let changes = item.get("changes").cloned().unwrap_or(Value::Null);
                self.tool_use(out, &item_id, "FileChanges", changes.clone());
                if completed {
                    let summary = changes
                        .as_array()
                        .map(|list| {
                            list.iter()
                                .map(|c| {
                                    format!(
                                        "{} {}",
                                        str_field(c, "kind").unwrap_or("change"),
                                        str_field(c, "path").unwrap_or("?")
                                    )
                                })
                                .collect::<Vec<_>>()
                                .join("\n")
                        })
                        .unwrap_or_default();
                    self.tool_result(out, &item_id, summary, failed);
                }
            }
            "mcp_tool_call" => {
                let name = str_field(item, "tool").unwrap_or("MCP");
                let name = match str_field(item, "server") {
                    Some(server) => format!("mcp__{server}__{name}"),
                    None => name.to_string(),
                };
                let args = item.get("arguments").cloned().unwrap_or(json!({}));
                self.tool_use(out, &item_id, &name, args);
                if completed {
                    let error = item.get("error").filter(|e| !e.is_null()).map(|e| {
                        str_field(e, "message").map_or_else(|| value_text(Some(e)), str::to_string)
                    });
                    let content = match (&error, item.get("result")) {
                        (Some(msg), _) => msg.clone(),
                        (None, Some(result)) => mcp_result_text(result),
                        (None, None) => String::new(),
                    };
                    self.tool_result(out, &item_id, content, failed || error.is_some());
                }
            }
            "web_search" => {
                let query = str_field(item, "query").unwrap_or("");
                // A started item may not carry its query yet; announce it
                // when it does, or at completion.
                if completed || !query.is_empty() {
                    self.tool_use(out, &item_id, "WebSearch", json!({ "query": query }));
                }
                if completed {
                    let content = format!("Searched the web for \"{query}\"");
                    self.tool_result(out, &item_id, content, failed);
                }
            }
            "todo_list" => {
                // Each snapshot of the plan is shown; there is no result.
                self.todo_snapshots += 1;
                let id = format!("{item_id}-{}", self.todo_snapshots);
                let items = item.get("items").cloned().unwrap_or(json!([]));
                self.turn.text.end(out);
                emit(
                    out,
                    EventBody::ToolUse {
                        tool_name: "TodoList".into(),
                        tool_input: json!({ "items": items }),
                        tool_id: self.tool_id(&id),
                    },
                );
            }
            "error" => {
                if completed {
                    let msg = str_field(item, "message").unwrap_or("Codex reported an error");
                    self.error(out, msg);
                }
            }
            other => {
                // Forward-compatible: show unknown items once complete.
                if completed {
                    let name = if other.is_empty() { "Unknown" } else { other };
                    self.tool_use(out, &item_id, name, item.clone());
                    self.open_tools.remove(&item_id);
                }
            }
        }
    }
}

/// The text of an MCP tool result: its text blocks, else the JSON.
fn mcp_result_text(result: &Value) -> String {
    let texts: Vec<&str> = result
        .get("content")
        .and_then(Value::as_array)
        .map(|blocks| {
            blocks
                .iter()
                .filter_map(|b| b.get("text").and_then(Value::as_str))
                .collect()
        })
        .unwrap_or_default();
    if texts.is_empty() {
        value_text(Some(result))
    } else {
        texts.join("\n")
    }
}

impl LineParser for CodexParser {
    fn parse_line(&mut self, line: &str, out: &mut Vec<ProviderEvent>) {
        let Some(event) = parse_json_line(ProviderKind::Codex, line) else {
            return;
        };
        match str_field(&event, "type").unwrap_or("") {
            "thread.started" => {
                if let Some(id) = str_field(&event, "thread_id") {
                    if self.known_id.as_deref() != Some(id) {
                        self.known_id = Some(id.to_string());
                        out.push(ProviderEvent::SessionCreated(id.to_string()));
                    }
                }
            }
            phase @ ("item.started" | "item.updated" | "item.completed") => {
                if let Some(item) = event.get("item").filter(|i| i.is_object()) {
                    self.item(out, phase, item);
                }
            }
            "turn.completed" => {
                self.turn.text.end(out);
                if let Some(usage) = event.get("usage").filter(|u| u.is_object()) {
                    emit(out, token_status(usage));
                }
                self.turn.complete(out, 0);
            }
            "turn.failed" => {
                let msg = event
                    .get("error")
                    .and_then(|e| str_field(e, "message"))
                    .unwrap_or("Codex turn failed")
                    .to_string();
                self.turn.text.end(out);
                if self.last_error.as_deref() != Some(msg.as_str()) {
                    self.error(out, &msg);
                }
                self.turn.complete(out, 1);
            }
            "error" => {
                let msg = str_field(&event, "message").unwrap_or("Codex reported an error");
                let msg = msg.to_string();
                self.error(out, &msg);
            }
            other => {
                tracing::debug!(provider = "codex", event = other, "ignoring event");
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
            let msg = self.turn.exit_message("codex", code);
            self.error(out, &msg);
        }
        self.turn.complete(out, code);
    }
}

/// `status {text:"token_budget", tokenBudget}` from a usage object.
fn token_status(usage: &Value) -> EventBody {
    let n = |k: &str| usage.get(k).and_then(Value::as_u64).unwrap_or(0);
    let input = n("input_tokens");
    let output = n("output_tokens");
    EventBody::Status {
        text: Some("token_budget".into()),
        status: None,
        tokens: None,
        token_budget: Some(json!({
            "used": input + output,
            "inputTokens": input,
            "outputTokens": output,
            "cachedInputTokens": n("cached_input_tokens"),
            "reasoningOutputTokens": n("reasoning_output_tokens"),
        })),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::provider::cli_support::test_util::*;
    use crate::provider::cli_support::CLI_IDLE_TIMEOUT;

    const FIXTURE: &str = include_str!("../../tests/fixtures/codex/full-turn.jsonl");
    const FAILED: &str = include_str!("../../tests/fixtures/codex/failed-turn.jsonl");

    #[test]
    fn new_session_argv_puts_prompt_on_stdin() {
        let turn = turn(json!({"model": "gpt-5.5", "effort": "high"}), None);
        let spec = Codex.command(&turn);
        assert_eq!(spec.program, turn.bin);
        assert_eq!(
            args(&spec),
            [
                "exec",
                "--json",
                "--skip-git-repo-check",
                "--model=gpt-5.5",
                "--sandbox=workspace-write",
                "--config=model_reasoning_effort=\"high\"",
                "--cd=/work/project",
                "-"
            ]
        );
        assert_eq!(spec.stdin.as_deref(), Some(&b"hello there"[..]));
        assert!(!spec.keep_stdin_open);
        assert_eq!(spec.idle_timeout, Some(CLI_IDLE_TIMEOUT));
    }

    #[test]
    fn resume_and_permission_modes() {
        let spec = Codex.command(&turn(
            json!({"permissionMode": "bypassPermissions", "effort": "bogus\"x"}),
            Some("0199-thread"),
        ));
        let a = args(&spec);
        assert!(a.contains(&"--sandbox=danger-full-access".to_string()));
        assert!(!a.iter().any(|x| x.contains("bogus")), "{a:?}");
        // Exec options come before `resume <id>`, the prompt marker last.
        assert_eq!(a[a.len() - 3..], ["resume", "0199-thread", "-"]);
        let plan = args(&Codex.command(&turn(json!({"permissionMode": "plan"}), None)));
        assert!(plan.contains(&"--sandbox=read-only".to_string()));
        let skip = args(&Codex.command(&turn(json!({"skipPermissions": true}), None)));
        assert!(skip.contains(&"--sandbox=danger-full-access".to_string()));
    }

    #[test]
    fn full_turn_maps_every_item_type() {
        let mut parser = CodexParser::new(None);
        let events = run_lines(&mut parser, FIXTURE, Some(Some(0)));
        assert_eq!(sessions(&events), ["01a200de-0fe4-7dd0-b563-59bffbcf78d8"]);
        assert_eq!(turn_ends(&events), [0]);
        assert_streams_balanced(&events);
        assert_eq!(streamed_text(&events), "Fixed the failing test.");
        let bodies = bodies(&events);
        let tool_uses: Vec<(String, Value)> = bodies
            .iter()
            .filter_map(|b| match b {
                EventBody::ToolUse {
                    tool_name,
                    tool_input,
                    ..
                } => Some((tool_name.clone(), tool_input.clone())),
                _ => None,
            })
            .collect();
        let names: Vec<&str> = tool_uses.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "Bash",
                "Bash",
                "FileChanges",
                "mcp__docs__search",
                "WebSearch",
                "TodoList",
                "TodoList",
                "plan"
            ]
        );
        assert_eq!(
            tool_uses[0].1["command"],
            "/bin/bash -lc 'echo hello-from-tool'"
        );
        assert_eq!(tool_uses[4].1["query"], "stand-in query");
        let results = tool_results(&bodies);
        assert_eq!(results.len(), 5, "{results:?}");
        assert_eq!(results[0].1, "hello-from-tool\n");
        assert!(!results[0].2);
        assert_eq!(results[1].1, "data\n");
        assert!(results[1].2, "exit code 3 is an error");
        assert!(results[2].1.contains("add src/hello.txt"));
        assert_eq!(results[3].1, "3 hits");
        // The result pairs with its tool_use.
        let first_use_id = bodies
            .iter()
            .find_map(|b| match b {
                EventBody::ToolUse { tool_id, .. } => Some(tool_id.clone()),
                _ => None,
            })
            .unwrap();
        assert_eq!(results[0].0, first_use_id);
        assert!(bodies.iter().any(|b| matches!(b,
            EventBody::Thinking { content } if content == "**Thinking** about the reply")));
        assert_eq!(
            errors(&events),
            [
                "Model metadata for `test-model` not found.",
                "Reconnecting... 1/5"
            ]
        );
        let budget = bodies
            .iter()
            .find_map(|b| match b {
                EventBody::Status { token_budget, .. } => token_budget.clone(),
                _ => None,
            })
            .unwrap();
        assert_eq!(budget["used"], 49);
    }

    #[test]
    fn failed_turn_reports_the_message_once_and_fails() {
        let mut parser = CodexParser::new(None);
        let events = run_lines(&mut parser, FAILED, Some(Some(1)));
        assert_eq!(turn_ends(&events), [1]);
        let errs = errors(&events);
        assert_eq!(
            errs,
            [
                "Reconnecting... 1/5 (stream disconnected before completion: stand-in forced failure)",
                "stream disconnected before completion: stand-in forced failure"
            ]
        );
    }

    #[test]
    fn resumed_thread_is_not_announced_again() {
        let mut parser = CodexParser::new(Some("t-1".into()));
        let events = run_lines(
            &mut parser,
            "{\"type\":\"thread.started\",\"thread_id\":\"t-1\"}\n{\"type\":\"turn.completed\"}",
            None,
        );
        assert!(sessions(&events).is_empty());
        assert_eq!(turn_ends(&events), [0]);
    }

    #[test]
    fn exit_without_turn_end_fails_with_stderr() {
        let mut parser = CodexParser::new(None);
        let mut out = Vec::new();
        parser.stderr_line("Reading additional input from stdin...", &mut out);
        parser.stderr_line(
            "Not inside a trusted directory and --skip-git-repo-check was not specified.",
            &mut out,
        );
        parser.exited(Some(1), &mut out);
        assert_eq!(turn_ends(&out), [1]);
        assert_eq!(
            errors(&out),
            ["codex exited with code 1: Not inside a trusted directory and --skip-git-repo-check was not specified."]
        );
        // A kill is left to the registry.
        let mut killed = CodexParser::new(None);
        let mut out = Vec::new();
        killed.exited(None, &mut out);
        assert!(out.is_empty());
    }

    #[test]
    fn garbage_and_unknown_events_are_tolerated() {
        let mut parser = CodexParser::new(None);
        let events = run_lines(
            &mut parser,
            "not json\n[]\n{\"type\":\"future.thing\",\"x\":1}\n{\"type\":\"item.completed\",\"item\":\"nope\"}\n{\"type\":\"item.completed\"}\n{\"no_type\":true}",
            Some(Some(0)),
        );
        assert!(bodies(&events).is_empty(), "{events:?}");
        assert_eq!(turn_ends(&events), [0]);
    }

    #[test]
    fn only_one_turn_end() {
        let mut parser = CodexParser::new(None);
        let events = run_lines(
            &mut parser,
            "{\"type\":\"turn.completed\"}\n{\"type\":\"turn.failed\",\"error\":{\"message\":\"late\"}}",
            Some(Some(1)),
        );
        assert_eq!(turn_ends(&events), [0]);
    }
}
