//! Provider adapters: how each agent CLI is started and how its stdout is
//! turned into normalized events.
//!
//! A [`Provider`] is stateless and shared; it builds the command line for a
//! turn and encodes what the run must write to the CLI's stdin (the user
//! turn, permission answers, interrupts). A [`LineParser`] is created per run
//! and owns the parsing state (open text blocks, the captured native id).
//! The ProviderRun actor drives both; the RunRegistry never sees a provider
//! type, so a new provider is one module plus one arm in [`provider_for`].

pub mod claude;
pub(crate) mod cli_support;
pub mod codex;
pub mod cursor;
pub mod gemini;
pub(crate) mod json_scan;
pub mod opencode;

use std::ffi::OsString;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde_json::Value;

use crate::protocol::{Event, PermissionDecision};

/// The agent CLIs agentgate drives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ProviderKind {
    Claude,
    Codex,
    Cursor,
    Gemini,
    Opencode,
}

impl ProviderKind {
    pub const ALL: [ProviderKind; 5] = [
        ProviderKind::Claude,
        ProviderKind::Codex,
        ProviderKind::Cursor,
        ProviderKind::Gemini,
        ProviderKind::Opencode,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ProviderKind::Claude => "claude",
            ProviderKind::Codex => "codex",
            ProviderKind::Cursor => "cursor",
            ProviderKind::Gemini => "gemini",
            ProviderKind::Opencode => "opencode",
        }
    }

    /// The plain command name looked up on `PATH` when no `--<name>-bin` is given.
    pub fn default_bin(self) -> &'static str {
        match self {
            ProviderKind::Claude => "claude",
            ProviderKind::Codex => "codex",
            ProviderKind::Cursor => "cursor-agent",
            ProviderKind::Gemini => "gemini",
            ProviderKind::Opencode => "opencode",
        }
    }
}

impl fmt::Display for ProviderKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ProviderKind {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, ()> {
        ProviderKind::ALL
            .into_iter()
            .find(|p| p.as_str() == s)
            .ok_or(())
    }
}

/// Whether an id (an app or native session id, a model name) is safe to
/// pass as a CLI argument value: the safe pattern `^[a-zA-Z0-9_.:-]+$`, not
/// starting with `-` (it would read as a flag), at most 256 bytes. The one
/// id check: the registry, the adapters and `/shell` all use it.
pub fn safe_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 256
        && !id.starts_with('-')
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-' | ':'))
}

/// Longest model name, effort word and tool pattern accepted from a client.
pub const MAX_MODEL_LEN: usize = 128;
pub const MAX_EFFORT_LEN: usize = 32;
pub const MAX_TOOL_PATTERN_LEN: usize = 512;

/// A model name a client may pick: `sonnet`, `claude-opus-4-1`,
/// `opus[1m]`, `gpt-5.5`, `anthropic/claude-sonnet-4`, `gemini-2.5-pro`.
/// Never starts with `-` and holds no space, quote or shell character.
pub fn valid_model(m: &str) -> bool {
    !m.is_empty()
        && m.len() <= MAX_MODEL_LEN
        && !m.starts_with('-')
        && m.chars().all(|c| {
            c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-' | ':' | '/' | '@' | '[' | ']')
        })
}

/// A reasoning effort or variant word (`low`, `high`, `xhigh`, `max`).
pub fn valid_effort(e: &str) -> bool {
    !e.is_empty()
        && e.len() <= MAX_EFFORT_LEN
        && !e.starts_with('-')
        && e.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// A tool permission pattern: a tool name (`Read`, `mcp__server__tool`,
/// `Bash`) optionally followed by one parenthesised specifier
/// (`Bash(git log:*)`, `Edit(src/**)`). No control characters, no comma
/// (the list is joined with commas), never a leading `-`.
pub fn valid_tool_pattern(p: &str) -> bool {
    let (name, rest) = match p.find('(') {
        Some(i) => (&p[..i], Some(&p[i..])),
        None => (p, None),
    };
    let name_ok = !name.is_empty()
        && !name.starts_with('-')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '*'));
    let rest_ok = rest.is_none_or(|r| {
        r.len() >= 2 && r.ends_with(')') && !r[1..r.len() - 1].contains(['(', ')'])
    });
    name_ok
        && rest_ok
        && p.len() <= MAX_TOOL_PATTERN_LEN
        && !p.chars().any(|c| c.is_control() || c == ',')
}

/// Checks the client-chosen `options` that reach a CLI's argv (`model`,
/// `effort`, `toolsSettings.allowedTools` / `disallowedTools`); the error
/// names the field and says what is accepted. Blank values and the web
/// UI's `"default"` are no choice and pass. The adapters also pass every
/// value as `--flag=value`, so even a value that slipped through could not
/// become a flag.
pub fn check_options(options: &Value) -> Result<(), String> {
    let chosen = |key: &str| {
        options
            .get(key)
            .and_then(Value::as_str)
            .map(str::trim)
            .filter(|s| !s.is_empty() && *s != "default")
    };
    let shown = |v: &str| v.chars().take(60).collect::<String>();
    if let Some(model) = chosen("model").filter(|m| !valid_model(m)) {
        return Err(format!(
            "Invalid options.model '{}': a model name is 1-{MAX_MODEL_LEN} letters, digits and _ . - : / @ [ ], not starting with -",
            shown(model)
        ));
    }
    if let Some(effort) = chosen("effort").filter(|e| !valid_effort(e)) {
        return Err(format!(
            "Invalid options.effort '{}': an effort is one word of letters, digits, - and _ (e.g. low, high)",
            shown(effort)
        ));
    }
    for key in ["allowedTools", "disallowedTools"] {
        let list = options.get("toolsSettings").and_then(|t| t.get(key));
        let Some(list) = list else { continue };
        let Some(items) = list.as_array() else {
            if list.is_null() {
                continue;
            }
            return Err(format!(
                "Invalid options.toolsSettings.{key}: expected an array of tool patterns"
            ));
        };
        for item in items {
            let Some(p) = item.as_str() else {
                return Err(format!(
                    "Invalid options.toolsSettings.{key}: every entry must be a string"
                ));
            };
            let p = p.trim();
            if !p.is_empty() && !valid_tool_pattern(p) {
                return Err(format!(
                    "Invalid tool pattern '{}' in options.toolsSettings.{key}: expected Tool or Tool(specifier), e.g. Bash(git log:*)",
                    shown(p)
                ));
            }
        }
    }
    Ok(())
}

/// Everything a provider needs to build one turn's command.
#[derive(Debug, Clone)]
pub struct Turn {
    /// The app session id (never sent to the CLI; for logs).
    pub app_session_id: String,
    /// The provider-native id to resume, if the session has one (always
    /// [`safe_id`]: the registry drops any other).
    pub provider_session_id: Option<String>,
    /// The user's prompt.
    pub content: String,
    /// The client's `options` object (`model`, `permissionMode`, `toolsSettings`, ...).
    pub options: Value,
    /// Working directory: the session's project path (or a client `cwd` inside it).
    pub cwd: PathBuf,
    /// The CLI binary (from `--<provider>-bin`, else the plain name).
    pub bin: PathBuf,
}

impl Turn {
    /// A non-blank string option.
    pub fn option_str(&self, key: &str) -> Option<&str> {
        self.options
            .get(key)
            .and_then(Value::as_str)
            .map(str::trim)
            .filter(|s| !s.is_empty())
    }

    /// The `model` option; the web UI's `"default"` means "no model flag"
    /// (the CLI's own default), not a model named default. Only a
    /// [`valid_model`] (the chat socket refuses others with a clear error).
    pub fn model(&self) -> Option<&str> {
        self.option_str("model")
            .filter(|m| *m != "default" && valid_model(m))
    }

    /// The `effort` option, with `"default"` meaning none, as for [`Turn::model`].
    pub fn effort(&self) -> Option<&str> {
        self.option_str("effort")
            .filter(|e| *e != "default" && valid_effort(e))
    }
}

/// What to spawn for a turn.
#[derive(Debug, Clone)]
pub struct CommandSpec {
    pub program: PathBuf,
    pub args: Vec<OsString>,
    /// Variables set on top of the gateway's environment (minus its secrets).
    pub env: Vec<(OsString, OsString)>,
    /// Bytes written to stdin right after spawning (e.g. the stream-json user turn).
    pub stdin: Option<Vec<u8>>,
    /// Keep stdin open after `stdin` is written (Claude's control protocol);
    /// otherwise it is closed so the CLI sees EOF.
    pub keep_stdin_open: bool,
    /// Kill the run if no stdout line arrives for this long (a hung CLI).
    /// `None` for providers that wait on the user (permission prompts).
    pub idle_timeout: Option<Duration>,
}

impl CommandSpec {
    pub fn new(program: &Path) -> Self {
        CommandSpec {
            program: program.to_path_buf(),
            args: Vec::new(),
            env: Vec::new(),
            stdin: None,
            keep_stdin_open: false,
            idle_timeout: None,
        }
    }

    pub fn arg(&mut self, arg: impl Into<OsString>) -> &mut Self {
        self.args.push(arg.into());
        self
    }
}

/// What a parser makes of stdout lines. `Emit` is forwarded to clients; the
/// other variants are for the registry or the run itself.
#[derive(Debug, Clone, PartialEq)]
pub enum ProviderEvent {
    /// A normalized event for clients.
    Emit(Event),
    /// The provider announced its native session id (swallowed: persisted,
    /// then `session_upserted` to the owner's sockets).
    SessionCreated(String),
    /// The CLI asks whether a tool may run (`provider_request_id` is the CLI's id).
    PermissionRequested {
        provider_request_id: String,
        tool_name: String,
        input: Value,
        context: Option<Value>,
    },
    /// The CLI withdrew a permission request.
    PermissionWithdrawn { provider_request_id: String },
    /// The turn ended (Claude `result`, Codex `turn.completed`/`turn.failed`, ...).
    /// The registry turns the first one into `complete`.
    TurnComplete { exit_code: i32 },
    /// Bytes the run must write to the CLI's stdin (e.g. acknowledging a hook callback).
    Reply(Vec<u8>),
    /// Text deltas in a row, made only by [`LineParser::parse_line_grouped`]:
    /// each is forwarded as an `Emit` of a `stream_delta` would be.
    Deltas(Deltas),
}

impl ProviderEvent {
    /// Seqs this event may take (an upper bound: most events take one).
    pub fn seqs(&self) -> usize {
        match self {
            ProviderEvent::Deltas(d) => d.len(),
            _ => 1,
        }
    }
}

/// Text deltas that followed one another in a batch (the bulk of a streamed
/// turn), each text kept as serde_json writes it escaped, one after the
/// other in one string: a delta costs no allocation of its own, and the
/// registry copies its text into the frame and the history as it is,
/// without decoding it and escaping it again.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Deltas {
    /// The texts, escaped as serde_json escapes them, one after the other.
    escaped: String,
    deltas: Vec<DeltaText>,
}

/// One text of [`Deltas`].
#[derive(Debug, Clone, PartialEq)]
pub struct DeltaText {
    /// Where its escaped text ends (it starts where the previous one ends).
    end: usize,
    /// Bytes of the decoded text.
    pub len: usize,
    /// Claude subagent grouping, as [`Event::parent_tool_use_id`].
    pub parent_tool_use_id: Option<String>,
}

impl Deltas {
    /// Appends a text; `escaped` must be what serde_json writes inside the
    /// quotes for a text of `len` bytes (the scanner's
    /// `canonical_string`), or the frames written from it are wrong.
    pub fn push(&mut self, escaped: &str, len: usize, parent_tool_use_id: Option<String>) {
        self.escaped.push_str(escaped);
        self.deltas.push(DeltaText {
            end: self.escaped.len(),
            len,
            parent_tool_use_id,
        });
    }

    pub fn len(&self) -> usize {
        self.deltas.len()
    }

    pub fn is_empty(&self) -> bool {
        self.deltas.is_empty()
    }

    /// Each text, escaped, with its delta.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &DeltaText)> {
        let mut start = 0;
        self.deltas.iter().map(move |d| {
            let escaped = self.escaped.get(start..d.end).unwrap_or_default();
            start = d.end;
            (escaped, d)
        })
    }

    /// The deltas as the events they stand for.
    pub fn events(&self) -> impl Iterator<Item = Event> + '_ {
        self.iter().map(|(escaped, d)| d.event(escaped))
    }
}

impl DeltaText {
    /// The event this delta stands for, its text `escaped` (from [`Deltas::iter`]), decoded.
    pub fn event(&self, escaped: &str) -> Event {
        Event {
            body: crate::protocol::EventBody::StreamDelta {
                content: unescape(escaped, self.len),
            },
            parent_tool_use_id: self.parent_tool_use_id.clone(),
        }
    }
}

/// The text of a string written `escaped` (inside its quotes) by
/// serde_json, `len` bytes decoded.
pub fn unescape(escaped: &str, len: usize) -> String {
    if len == escaped.len() {
        // Nothing was escaped.
        return escaped.to_string();
    }
    let mut literal = String::with_capacity(escaped.len() + 2);
    literal.push('"');
    literal.push_str(escaped);
    literal.push('"');
    serde_json::from_str(&literal).unwrap_or_default()
}

/// Per-run parser state. Parsing never fails: a malformed line is logged and
/// skipped (or becomes an informational `error` event), never fatal.
pub trait LineParser: Send {
    fn parse_line(&mut self, line: &str, out: &mut Vec<ProviderEvent>);

    /// [`parse_line`](Self::parse_line) for a run's batches, which may hold
    /// [`ProviderEvent::Deltas`]: a parser may add a text delta to the last
    /// event of `out` when that is one. Default: `parse_line`.
    fn parse_line_grouped(&mut self, line: &str, out: &mut Vec<ProviderEvent>) {
        self.parse_line(line, out)
    }

    /// Called once at stdout EOF, e.g. to close an open text stream.
    fn finish(&mut self, _out: &mut Vec<ProviderEvent>) {}

    /// Called for each stderr line (after the run has logged it). Providers
    /// that report failures only on stderr (Cursor, CLI start-up errors)
    /// keep a bounded tail here to name the cause in `exited`. Default: nothing.
    fn stderr_line(&mut self, _line: &str, _out: &mut Vec<ProviderEvent>) {}

    /// Called once after the process exited and stdout reached EOF (after
    /// `finish`), with its exit code (`None` when killed by a signal). The
    /// events are handled like parsed ones, before the registry synthesizes a
    /// failed `complete` for a run without `TurnComplete`. Providers whose
    /// turn ends with the process (OpenCode has no final line; Cursor may end
    /// without `result`) report `TurnComplete` here. Default: nothing.
    fn exited(&mut self, _exit_code: Option<i32>, _out: &mut Vec<ProviderEvent>) {}
}

/// A provider CLI adapter.
pub trait Provider: Send + Sync + 'static {
    fn kind(&self) -> ProviderKind;

    /// The command for one turn.
    fn command(&self, turn: &Turn) -> CommandSpec;

    /// A fresh parser for one run.
    fn parser(&self, turn: &Turn) -> Box<dyn LineParser>;

    /// The stdin line answering a permission request, for providers with a
    /// permission protocol.
    fn permission_reply(
        &self,
        _provider_request_id: &str,
        _decision: &PermissionDecision,
        _original_input: &Value,
    ) -> Option<Vec<u8>> {
        None
    }

    /// The stdin line asking the CLI to interrupt the turn, if it has one.
    fn interrupt(&self) -> Option<Vec<u8>> {
        None
    }
}

/// The adapter for a provider, or `None` when agentgate has none yet.
pub fn provider_for(kind: ProviderKind) -> Option<&'static dyn Provider> {
    match kind {
        ProviderKind::Claude => Some(&claude::Claude),
        ProviderKind::Codex => Some(&codex::Codex),
        ProviderKind::Cursor => Some(&cursor::Cursor),
        ProviderKind::Gemini => Some(&gemini::Gemini),
        ProviderKind::Opencode => Some(&opencode::Opencode),
    }
}

#[cfg(test)]
mod tests {
    use super::cli_support::test_util::{args, turn};
    use super::*;
    use serde_json::json;

    /// Client values that start with `-` (or are flags outright) never
    /// become argv entries of their own, for every provider: they are
    /// dropped, or glued to their flag as `--flag=value`, and the prompt
    /// comes on stdin or after `--`.
    #[test]
    fn client_values_never_become_flags() {
        let hostile = json!({
            "model": "--dangerously-skip-permissions",
            "effort": "-c",
            "permissionMode": "--yolo",
            "toolsSettings": {"allowedTools": ["--dangerously-skip-permissions", "-x", "Read"],
                              "disallowedTools": ["-rf"]},
        });
        let valid = json!({
            "model": "claude-opus-4-1[1m]",
            "effort": "high",
            "toolsSettings": {"allowedTools": ["Bash(git log:*)"]},
        });
        for kind in ProviderKind::ALL {
            let provider = provider_for(kind).unwrap();
            let mut t = turn(hostile.clone(), None);
            t.content = "--help; -rf".into();
            let argv = args(&provider.command(&t));
            let prompt_at = argv.iter().position(|a| a == "--");
            for (i, a) in argv.iter().enumerate() {
                if prompt_at.is_some_and(|p| i > p) {
                    continue;
                }
                for bad in ["--dangerously", "-c", "-x", "-rf", "--yolo", "--help"] {
                    assert!(
                        a != bad && !a.starts_with("--dangerously") && !a.ends_with("=-c"),
                        "{kind:?}: {a} in {argv:?}"
                    );
                }
            }
            assert!(check_options(&hostile).is_err());
            let argv = args(&provider.command(&turn(valid.clone(), None)));
            assert!(
                argv.contains(&"--model=claude-opus-4-1[1m]".to_string()),
                "{kind:?}: {argv:?}"
            );
            assert!(check_options(&valid).is_ok());
        }
    }

    #[test]
    fn option_checks_name_the_field() {
        for (options, field) in [
            (json!({"model": "-m"}), "options.model"),
            (json!({"model": "a b"}), "options.model"),
            (json!({"model": "x".repeat(129)}), "options.model"),
            (json!({"effort": "--high"}), "options.effort"),
            (json!({"effort": "hi gh"}), "options.effort"),
            (
                json!({"toolsSettings": {"allowedTools": ["-x"]}}),
                "allowedTools",
            ),
            (
                json!({"toolsSettings": {"allowedTools": "Read"}}),
                "allowedTools",
            ),
            (
                json!({"toolsSettings": {"disallowedTools": [1]}}),
                "disallowedTools",
            ),
            (
                json!({"toolsSettings": {"allowedTools": ["Bash(a,b)"]}}),
                "allowedTools",
            ),
            (
                json!({"toolsSettings": {"allowedTools": ["Bash(x"]}}),
                "allowedTools",
            ),
            (
                json!({"toolsSettings": {"allowedTools": ["Bash(x)y)"]}}),
                "allowedTools",
            ),
            (
                json!({"toolsSettings": {"allowedTools": ["Bash(l\ns)"]}}),
                "allowedTools",
            ),
        ] {
            let err = check_options(&options).unwrap_err();
            assert!(err.contains(field), "{options}: {err}");
        }
        for ok in [
            json!({}),
            json!({"model": "default", "effort": "default"}),
            json!({"model": "", "effort": "  "}),
            json!({"model": "anthropic/claude-sonnet-4", "effort": "xhigh"}),
            json!({"toolsSettings": {"allowedTools": ["mcp__srv__tool", "Edit(src/**)", "Bash(npm run test:*)", ""], "disallowedTools": null}}),
        ] {
            assert!(check_options(&ok).is_ok(), "{ok}");
        }
    }

    #[test]
    fn safe_ids_cannot_be_flags_or_shell_text() {
        for ok in ["0f6e2d1c-5b4a", "ses_abc", "thread.1:2", "A-z_9"] {
            assert!(safe_id(ok), "{ok}");
        }
        for bad in [
            "",
            "-x",
            "--resume",
            "a b",
            "a;rm",
            "$(id)",
            "a/b",
            "é",
            &"x".repeat(257),
        ] {
            assert!(!safe_id(bad), "{bad}");
        }
    }
}
