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
    /// (the CLI's own default), not a model named default.
    pub fn model(&self) -> Option<&str> {
        self.option_str("model").filter(|m| *m != "default")
    }

    /// The `effort` option, with `"default"` meaning none, as for [`Turn::model`].
    pub fn effort(&self) -> Option<&str> {
        self.option_str("effort").filter(|e| *e != "default")
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
}

/// Per-run parser state. Parsing never fails: a malformed line is logged and
/// skipped (or becomes an informational `error` event), never fatal.
pub trait LineParser: Send {
    fn parse_line(&mut self, line: &str, out: &mut Vec<ProviderEvent>);

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
    use super::safe_id;

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
