//! Helpers shared by the JSON-lines adapters (Codex, Gemini, OpenCode,
//! Cursor): tolerant line decoding, the text-stream state, permission-mode
//! mapping, a bounded stderr tail, how a turn ends ([`TurnEnd`]) and the
//! hung-CLI timeout.

use std::collections::VecDeque;
use std::time::Duration;

use serde_json::Value;

use super::{CommandSpec, ProviderEvent, ProviderKind, Turn};
use crate::protocol::{Event, EventBody};

/// A CLI that prints no stdout line for this long is treated as hung and
/// killed. Agents print nothing while a tool runs (a test suite, a build),
/// so this is generous; it exists so a wedged CLI (e.g. OpenCode retrying a
/// dead API forever) gives the session back instead of holding it for good.
pub const CLI_IDLE_TIMEOUT: Duration = Duration::from_secs(10 * 60);

/// Stderr lines kept per run to explain a failed exit (oldest dropped first).
pub const STDERR_TAIL_LINES: usize = 20;

/// Longest stderr line kept (longer lines are cut at a char boundary).
pub const STDERR_LINE_MAX: usize = 2_000;

/// How much of a malformed stdout line goes into the log.
const LOG_LINE_PREVIEW: usize = 200;

/// Sets what every JSON-lines adapter's command shares: the hung-CLI
/// timeout. (`PWD` = the turn's cwd is set by `ProviderRun` for every child.)
pub fn common_setup(spec: &mut CommandSpec) {
    spec.idle_timeout = Some(CLI_IDLE_TIMEOUT);
}

/// Pushes a client event.
pub fn emit(out: &mut Vec<ProviderEvent>, body: EventBody) {
    out.push(ProviderEvent::Emit(Event::from(body)));
}

/// Decodes one stdout line as a JSON object. Blank lines are skipped;
/// anything else that is not a JSON object is logged and skipped (never
/// fatal). Parsed as a generic `Value` so duplicate keys (Codex) and unknown
/// fields are tolerated.
pub fn parse_json_line(provider: ProviderKind, line: &str) -> Option<Value> {
    let line = line.trim();
    if line.is_empty() {
        return None;
    }
    match serde_json::from_str::<Value>(line) {
        Ok(v @ Value::Object(_)) => Some(v),
        Ok(_) | Err(_) => {
            tracing::warn!(
                provider = provider.as_str(),
                line = %preview(line, LOG_LINE_PREVIEW),
                "skipping a stdout line that is not a JSON object"
            );
            None
        }
    }
}

/// The first `max` bytes of `s`, cut at a char boundary.
pub fn preview(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// A non-empty string field.
pub fn str_field<'a>(v: &'a Value, key: &str) -> Option<&'a str> {
    v.get(key).and_then(Value::as_str).filter(|s| !s.is_empty())
}

/// A tool output as text: strings as they are, `null` as "", anything else
/// as pretty JSON (so structured results are not lost).
pub fn value_text(v: Option<&Value>) -> String {
    match v {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(s)) => s.clone(),
        Some(other) => serde_json::to_string_pretty(other).unwrap_or_default(),
    }
}

/// The assistant text stream of one run: `stream_delta` chunks closed by one
/// `stream_end`. Every adapter sends assistant text this way, also when the
/// CLI delivers whole messages, so clients see one shape from every provider.
#[derive(Debug, Default)]
pub struct TextStream {
    open: bool,
}

impl TextStream {
    /// Streams a chunk (empty chunks are dropped).
    pub fn delta(&mut self, out: &mut Vec<ProviderEvent>, text: &str) {
        if text.is_empty() {
            return;
        }
        self.open = true;
        emit(
            out,
            EventBody::StreamDelta {
                content: text.to_string(),
            },
        );
    }

    /// Closes the open stream, if any.
    pub fn end(&mut self, out: &mut Vec<ProviderEvent>) {
        if std::mem::take(&mut self.open) {
            emit(out, EventBody::StreamEnd {});
        }
    }

    /// A whole message: one delta, then the end.
    pub fn message(&mut self, out: &mut Vec<ProviderEvent>, text: &str) {
        self.delta(out, text);
        self.end(out);
    }
}

/// The permission stance a client asked for, from `options.permissionMode`
/// and `skipPermissions` (top level or in `toolsSettings`). Each adapter maps
/// it to its CLI's own flag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PermissionMode {
    /// The CLI's own default.
    Default,
    /// Auto-approve file edits.
    AcceptEdits,
    /// Auto-approve everything (no sandbox where the CLI has one).
    Bypass,
    /// Read-only planning.
    Plan,
}

impl PermissionMode {
    pub fn of(turn: &Turn) -> PermissionMode {
        let skip = |v: &Value| v.get("skipPermissions").and_then(Value::as_bool) == Some(true);
        let skip_all = skip(&turn.options) || turn.options.get("toolsSettings").is_some_and(skip);
        let mode = match turn.option_str("permissionMode") {
            Some("acceptEdits") | Some("auto_edit") => PermissionMode::AcceptEdits,
            Some("bypassPermissions") | Some("yolo") => PermissionMode::Bypass,
            Some("plan") => PermissionMode::Plan,
            _ => PermissionMode::Default,
        };
        // As the reference: skipPermissions upgrades every mode except plan.
        if skip_all && mode != PermissionMode::Plan {
            PermissionMode::Bypass
        } else {
            mode
        }
    }
}

/// The last few stderr lines of a run, to explain a failed exit.
#[derive(Debug, Default)]
pub struct StderrTail {
    lines: VecDeque<String>,
}

impl StderrTail {
    /// Keeps a line (bounded: the oldest is dropped when full).
    pub fn push(&mut self, line: &str) {
        let line = line.trim();
        if line.is_empty() {
            return;
        }
        if self.lines.len() == STDERR_TAIL_LINES {
            self.lines.pop_front();
        }
        self.lines
            .push_back(preview(line, STDERR_LINE_MAX).to_string());
    }

    /// The kept lines joined, or `None` when there were none.
    pub fn text(&self) -> Option<String> {
        if self.lines.is_empty() {
            None
        } else {
            Some(
                self.lines
                    .iter()
                    .map(String::as_str)
                    .collect::<Vec<_>>()
                    .join("\n"),
            )
        }
    }
}

/// How a JSON-lines turn ends, the same for every adapter: the assistant
/// text stream, the stderr tail that explains a failed exit, and whether
/// the turn has completed. It completes exactly once, whichever comes
/// first: the CLI's result line, EOF, or the exit.
#[derive(Debug, Default)]
pub struct TurnEnd {
    pub text: TextStream,
    pub stderr: StderrTail,
    pub ended: bool,
}

impl TurnEnd {
    /// Closes the text stream and completes the turn (once).
    pub fn complete(&mut self, out: &mut Vec<ProviderEvent>, exit_code: i32) {
        self.text.end(out);
        if !std::mem::replace(&mut self.ended, true) {
            out.push(ProviderEvent::TurnComplete { exit_code });
        }
    }

    /// Keeps a stderr line for the failure message, unless it contains one
    /// of the CLI's known harmless `noise` lines.
    pub fn stderr_line(&mut self, line: &str, noise: &[&str]) {
        if !noise.iter().any(|n| line.contains(n)) {
            self.stderr.push(line);
        }
    }

    /// The exit code of a CLI that exited by itself while its turn was
    /// open; `None` when the turn had completed or the CLI was killed (an
    /// abort or the idle timeout: the registry reports those).
    pub fn open_at_exit(&self, exit_code: Option<i32>) -> Option<i32> {
        exit_code.filter(|_| !self.ended)
    }

    /// `"<cli> exited with code N"`, then `": "` and the stderr tail if any.
    pub fn exit_message(&self, cli: &str, code: i32) -> String {
        match self.stderr.text() {
            Some(tail) => format!("{cli} exited with code {code}: {tail}"),
            None => format!("{cli} exited with code {code}"),
        }
    }
}

/// A short id unique to one run, to make provider item ids (Codex numbers
/// items `item_0`, `item_1`, ... in every turn) unique within a session.
pub fn run_nonce() -> String {
    let id = uuid::Uuid::new_v4().simple().to_string();
    id[..8].to_string()
}

#[cfg(test)]
pub mod test_util {
    //! Helpers for the adapters' unit tests.
    use super::*;
    use std::path::PathBuf;

    pub fn turn(options: Value, resume: Option<&str>) -> Turn {
        Turn {
            app_session_id: "app-1".into(),
            provider_session_id: resume.map(str::to_string),
            content: "hello there".into(),
            options,
            cwd: PathBuf::from("/work/project"),
            bin: PathBuf::from("/opt/bin/agent"),
        }
    }

    /// Runs every line of a fixture through a parser, then `finish` and
    /// (when given) `exited`.
    pub fn run_lines(
        parser: &mut dyn super::super::LineParser,
        text: &str,
        exit: Option<Option<i32>>,
    ) -> Vec<ProviderEvent> {
        let mut out = Vec::new();
        for line in text.lines() {
            parser.parse_line(line, &mut out);
        }
        parser.finish(&mut out);
        if let Some(code) = exit {
            parser.exited(code, &mut out);
        }
        out
    }

    /// The client events only.
    pub fn bodies(events: &[ProviderEvent]) -> Vec<EventBody> {
        events
            .iter()
            .filter_map(|e| match e {
                ProviderEvent::Emit(ev) => Some(ev.body.clone()),
                _ => None,
            })
            .collect()
    }

    /// `(toolId, content, isError)` of every `tool_result`, in order.
    pub fn tool_results(bodies: &[EventBody]) -> Vec<(String, String, bool)> {
        bodies
            .iter()
            .filter_map(|b| match b {
                EventBody::ToolResult {
                    tool_id,
                    content,
                    is_error,
                    ..
                } => Some((tool_id.clone(), content.clone(), *is_error)),
                _ => None,
            })
            .collect()
    }

    /// The concatenated streamed text.
    pub fn streamed_text(events: &[ProviderEvent]) -> String {
        bodies(events)
            .into_iter()
            .filter_map(|b| match b {
                EventBody::StreamDelta { content } => Some(content),
                _ => None,
            })
            .collect()
    }

    /// All `TurnComplete` exit codes.
    pub fn turn_ends(events: &[ProviderEvent]) -> Vec<i32> {
        events
            .iter()
            .filter_map(|e| match e {
                ProviderEvent::TurnComplete { exit_code } => Some(*exit_code),
                _ => None,
            })
            .collect()
    }

    /// All captured native ids.
    pub fn sessions(events: &[ProviderEvent]) -> Vec<String> {
        events
            .iter()
            .filter_map(|e| match e {
                ProviderEvent::SessionCreated(id) => Some(id.clone()),
                _ => None,
            })
            .collect()
    }

    /// The `error` contents.
    pub fn errors(events: &[ProviderEvent]) -> Vec<String> {
        bodies(events)
            .into_iter()
            .filter_map(|b| match b {
                EventBody::Error { content, .. } => Some(content),
                _ => None,
            })
            .collect()
    }

    /// Streams are balanced: every run of deltas is closed by exactly one
    /// `stream_end`, and no `stream_end` comes without deltas.
    pub fn assert_streams_balanced(events: &[ProviderEvent]) {
        let mut open = false;
        for b in bodies(events) {
            match b {
                EventBody::StreamDelta { .. } => open = true,
                EventBody::StreamEnd {} => {
                    assert!(open, "stream_end without an open stream: {events:?}");
                    open = false;
                }
                _ => {}
            }
        }
        assert!(!open, "stream left open: {events:?}");
    }

    /// The args as strings, for argv assertions.
    pub fn args(spec: &super::super::CommandSpec) -> Vec<String> {
        spec.args
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect()
    }

    #[test]
    fn permission_mode_mapping() {
        let of = |o: Value| PermissionMode::of(&turn(o, None));
        assert_eq!(of(serde_json::json!({})), PermissionMode::Default);
        assert_eq!(
            of(serde_json::json!({"permissionMode": "acceptEdits"})),
            PermissionMode::AcceptEdits
        );
        assert_eq!(
            of(serde_json::json!({"permissionMode": "bypassPermissions"})),
            PermissionMode::Bypass
        );
        assert_eq!(
            of(serde_json::json!({"permissionMode": "plan", "skipPermissions": true})),
            PermissionMode::Plan
        );
        assert_eq!(
            of(serde_json::json!({"toolsSettings": {"skipPermissions": true}})),
            PermissionMode::Bypass
        );
        assert_eq!(
            of(serde_json::json!({"permissionMode": 7})),
            PermissionMode::Default
        );
    }

    #[test]
    fn stderr_tail_is_bounded() {
        let mut tail = StderrTail::default();
        assert_eq!(tail.text(), None);
        for i in 0..(STDERR_TAIL_LINES + 5) {
            tail.push(&format!("line {i}"));
        }
        tail.push("   ");
        let text = tail.text().unwrap();
        assert_eq!(text.lines().count(), STDERR_TAIL_LINES);
        assert!(text.starts_with("line 5\n"));
        tail.push(&"é".repeat(STDERR_LINE_MAX));
        assert!(tail.text().unwrap().lines().last().unwrap().len() <= STDERR_LINE_MAX);
    }

    #[test]
    fn non_objects_are_skipped() {
        assert!(parse_json_line(ProviderKind::Codex, "").is_none());
        assert!(parse_json_line(ProviderKind::Codex, "not json {").is_none());
        assert!(parse_json_line(ProviderKind::Codex, "[1]").is_none());
        // Duplicate keys: the last one wins, nothing fails.
        let v = parse_json_line(ProviderKind::Codex, r#"{"id":"a","id":"b"}"#).unwrap();
        assert_eq!(v["id"], "b");
    }
}
