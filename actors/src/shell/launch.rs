//! The `init` message of `/shell` and what it starts (PROTOCOL.md section 5):
//! parsing, the PTY session key, validation, the login/forceRestart reset,
//! and the command line.
//!
//! Command building never puts client text into a shell script except the
//! plain shell's own `initialCommand` (which *is* the user's shell line, as
//! in the reference). Provider CLIs run as `bash -c 'exec "$0" "$@"' BIN
//! ARGS...`: the script is a constant and the binary and the resume id are
//! separate argv entries, so no quoting can go wrong; the resume id comes
//! from the session row and, like the client's session id, must pass
//! [`safe_id`] (the one id check of the gateway).

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use base64::Engine as _;
#[cfg(test)]
use serde_json::Value;

use super::{InitFrame, TermSize};
use crate::config::GatewayConfig;
use crate::provider::{safe_id, ProviderKind};

/// The constant script provider CLIs run under (arguments come from argv).
const EXEC_ARGV_SCRIPT: &str = "exec \"$0\" \"$@\"";

/// Substrings of an `initialCommand` that make it a login command: the
/// existing PTY for its key is killed and replaced (reference behaviour).
const LOGIN_COMMAND_MARKERS: [&str; 3] = ["setup-token", "cursor-agent login", "auth login"];

/// Why an `init` cannot start a terminal; the `Display` text is the
/// `error` frame's `message` (the first two are the reference's wording).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InitError {
    #[error("Invalid project path")]
    InvalidProjectPath,
    #[error("Invalid session ID")]
    InvalidSessionId,
    #[error("Unsupported provider: {0}")]
    UnsupportedProvider(String),
}

/// What runs in the PTY.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// `initialCommand` under `bash -c`, or the user's interactive shell.
    Plain,
    /// A provider CLI, resumed when the session row has a native id.
    Provider(ProviderKind),
}

/// A parsed `init` frame. Field types are read leniently like the
/// reference: a field of the wrong type counts as absent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InitRequest {
    pub project_path: String,
    pub session_id: Option<String>,
    pub has_session: bool,
    /// `provider` as sent (default `claude`).
    pub provider: String,
    /// `initialCommand` (empty when absent).
    pub initial_command: String,
    /// Resolved as in the reference: `isPlainShell`, or an initial command
    /// without a session, or provider `plain-shell`.
    pub is_plain_shell: bool,
    pub force_restart: bool,
    /// `cols`/`rows` if both are valid sizes.
    pub size: Option<TermSize>,
}

impl InitRequest {
    /// What an `init` frame asks for; only a missing or empty `projectPath`
    /// is an error.
    pub fn from_frame(frame: InitFrame) -> Result<Self, InitError> {
        let project_path = frame
            .project_path
            .filter(|p| !p.is_empty())
            .ok_or(InitError::InvalidProjectPath)?;
        let provider = frame.provider.unwrap_or_else(|| "claude".to_string());
        let initial_command = frame.initial_command.unwrap_or_default();
        let is_plain_shell = frame.is_plain_shell
            || (!initial_command.is_empty() && !frame.has_session)
            || provider == "plain-shell";
        Ok(InitRequest {
            project_path,
            session_id: frame.session_id.filter(|s| !s.is_empty()),
            has_session: frame.has_session,
            provider,
            initial_command,
            is_plain_shell,
            force_restart: frame.force_restart,
            size: TermSize::from_dims(frame.cols, frame.rows),
        })
    }

    /// An `init` frame's fields as JSON (the tests' shorthand).
    #[cfg(test)]
    pub fn parse(frame: &Value) -> Result<Self, InitError> {
        use serde::Deserialize;
        Self::from_frame(InitFrame::deserialize(frame).unwrap_or_default())
    }

    /// `<projectPath>_<sessionId or "default">`, plus
    /// `_cmd_<first 16 chars of base64(initialCommand)>` for a plain shell
    /// with an initial command.
    pub fn key(&self) -> String {
        let mut key = format!(
            "{}_{}",
            self.project_path,
            self.session_id.as_deref().unwrap_or("default")
        );
        if self.is_plain_shell && !self.initial_command.is_empty() {
            let encoded =
                base64::engine::general_purpose::STANDARD.encode(self.initial_command.as_bytes());
            key.push_str("_cmd_");
            key.push_str(&encoded[..encoded.len().min(16)]);
        }
        key
    }

    pub fn is_login_command(&self) -> bool {
        !self.initial_command.is_empty()
            && LOGIN_COMMAND_MARKERS
                .iter()
                .any(|m| self.initial_command.contains(m))
    }

    /// Login commands and `forceRestart` kill and replace an existing PTY.
    pub fn replaces_existing(&self) -> bool {
        self.force_restart || self.is_login_command()
    }

    pub fn mode(&self) -> Result<Mode, InitError> {
        if self.is_plain_shell {
            return Ok(Mode::Plain);
        }
        self.provider
            .parse::<ProviderKind>()
            .map(Mode::Provider)
            .map_err(|()| InitError::UnsupportedProvider(self.provider.clone()))
    }

    /// The app session id whose row gives the provider's resume id, if any.
    pub fn resume_lookup(&self) -> Option<&str> {
        match self.mode() {
            Ok(Mode::Provider(_)) if self.has_session => self.session_id.as_deref(),
            _ => None,
        }
    }

    /// The session id must match the safe pattern before anything starts.
    pub fn check_session_id(&self) -> Result<(), InitError> {
        match &self.session_id {
            Some(id) if !safe_id(id) => Err(InitError::InvalidSessionId),
            _ => Ok(()),
        }
    }
}

/// Resolves the project path (relative to the gateway's working directory,
/// like `path.resolve`) and checks it is an existing directory. Blocking
/// (a `stat`): call it off the actor threads.
pub fn check_project_dir(project_path: &str) -> Result<PathBuf, InitError> {
    let path = Path::new(project_path);
    let resolved = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir()
            .map_err(|_| InitError::InvalidProjectPath)?
            .join(path)
    };
    match std::fs::metadata(&resolved) {
        Ok(meta) if meta.is_dir() => Ok(resolved),
        _ => Err(InitError::InvalidProjectPath),
    }
}

/// Everything needed to spawn a PTY child.
#[derive(Debug, Clone)]
pub struct LaunchSpec {
    pub program: PathBuf,
    pub args: Vec<OsString>,
    pub cwd: PathBuf,
    /// The complete environment (the gateway's minus its secrets, plus the terminal variables).
    pub env: Vec<(OsString, OsString)>,
    pub size: TermSize,
    /// Cyan line sent to the first socket.
    pub welcome: String,
    /// For logs: what runs (never the command text, which may hold secrets).
    pub summary: String,
}

fn provider_display_name(kind: ProviderKind) -> &'static str {
    match kind {
        ProviderKind::Claude => "Claude",
        ProviderKind::Codex => "Codex",
        ProviderKind::Cursor => "Cursor",
        ProviderKind::Gemini => "Gemini",
        ProviderKind::Opencode => "OpenCode",
    }
}

/// The CLI's arguments to resume a native session (PROTOCOL.md section 5).
fn resume_args(kind: ProviderKind, id: &str) -> Vec<OsString> {
    match kind {
        ProviderKind::Claude | ProviderKind::Gemini => vec!["--resume".into(), id.into()],
        ProviderKind::Cursor => vec![format!("--resume={id}").into()],
        ProviderKind::Codex => vec!["resume".into(), id.into()],
        ProviderKind::Opencode => vec!["--session".into(), id.into()],
    }
}

/// The environment of a PTY child: the gateway's environment minus its
/// secrets (`config.child_env`, filtered once more so no `AGENTGATE_*`
/// value can slip through), plus the terminal variables.
pub fn child_env(config: &GatewayConfig) -> Vec<(OsString, OsString)> {
    const TERMINAL_VARS: [(&str, &str); 3] = [
        ("TERM", "xterm-256color"),
        ("COLORTERM", "truecolor"),
        ("FORCE_COLOR", "3"),
    ];
    let mut env: Vec<(OsString, OsString)> = config
        .child_env
        .iter()
        .filter(|(k, _)| {
            let k = k.to_string_lossy();
            !k.starts_with("AGENTGATE_") && !TERMINAL_VARS.iter().any(|(t, _)| *t == k)
        })
        .cloned()
        .collect();
    env.extend(
        TERMINAL_VARS
            .iter()
            .map(|(k, v)| (OsString::from(k), OsString::from(v))),
    );
    env
}

/// Builds the command for a validated `init`. `resume_id` is the session
/// row's provider-native id (ignored unless it matches the safe pattern).
pub fn build_launch(
    req: &InitRequest,
    cwd: PathBuf,
    resume_id: Option<&str>,
    config: &GatewayConfig,
) -> Result<LaunchSpec, InitError> {
    let env = child_env(config);
    let size = req.size.unwrap_or_default();
    let shown_path = &req.project_path;
    let (program, args, welcome, summary) = match req.mode()? {
        Mode::Plain if !req.initial_command.is_empty() => (
            PathBuf::from("bash"),
            vec![OsString::from("-c"), OsString::from(&req.initial_command)],
            format!("\x1b[36mStarting terminal in: {shown_path}\x1b[0m\r\n"),
            "bash -c <initialCommand>".to_string(),
        ),
        Mode::Plain => {
            let shell = env
                .iter()
                .find(|(k, v)| k == "SHELL" && !v.is_empty())
                .map(|(_, v)| PathBuf::from(v))
                .unwrap_or_else(|| PathBuf::from("bash"));
            let summary = format!("interactive shell {}", shell.display());
            (
                shell,
                Vec::new(),
                format!("\x1b[36mStarting terminal in: {shown_path}\x1b[0m\r\n"),
                summary,
            )
        }
        Mode::Provider(kind) => {
            let resume = resume_id.filter(|id| {
                let ok = safe_id(id);
                if !ok {
                    tracing::warn!(provider = %kind, "stored provider session id fails the safe pattern; starting without resume");
                }
                ok
            });
            let mut args = vec![
                OsString::from("-c"),
                OsString::from(EXEC_ARGV_SCRIPT),
                config.bin(kind).into_os_string(),
            ];
            if let Some(id) = resume {
                args.extend(resume_args(kind, id));
            }
            let name = provider_display_name(kind);
            let welcome = if req.has_session {
                let shown_id = req.session_id.as_deref().unwrap_or_default();
                format!("\x1b[36mResuming {name} session {shown_id} in: {shown_path}\x1b[0m\r\n")
            } else {
                format!("\x1b[36mStarting new {name} session in: {shown_path}\x1b[0m\r\n")
            };
            let summary = format!(
                "{kind} cli{}",
                if resume.is_some() { " (resume)" } else { "" }
            );
            (PathBuf::from("bash"), args, welcome, summary)
        }
    };
    Ok(LaunchSpec {
        program,
        args,
        cwd,
        env,
        size,
        welcome,
        summary,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn config() -> GatewayConfig {
        let mut c = GatewayConfig::for_tests(PathBuf::from("/tmp"));
        c.child_env = vec![
            ("PATH".into(), "/usr/bin".into()),
            ("SHELL".into(), "/bin/zsh".into()),
            ("TERM".into(), "dumb".into()),
            ("AGENTGATE_JWT_SECRET".into(), "s3cret".into()),
        ];
        c
    }

    fn init(v: Value) -> InitRequest {
        InitRequest::parse(&v).expect("valid init")
    }

    #[test]
    fn key_follows_the_reference_format() {
        assert_eq!(init(json!({"projectPath": "/p"})).key(), "/p_default");
        assert_eq!(
            init(json!({"projectPath": "/p", "sessionId": "s1"})).key(),
            "/p_s1"
        );
        // base64("npm run dev") = "bnBtIHJ1biBkZXY=", first 16 chars.
        assert_eq!(
            init(json!({"projectPath": "/p", "initialCommand": "npm run dev"})).key(),
            "/p_default_cmd_bnBtIHJ1biBkZXY="
        );
        assert_eq!(
            init(json!({"projectPath": "/p", "initialCommand": "a very long command line"})).key(),
            "/p_default_cmd_YSB2ZXJ5IGxvbmcg"
        );
        // With a session the initial command does not make it a plain shell, so no suffix.
        assert_eq!(
            init(json!({"projectPath": "/p", "sessionId": "s", "hasSession": true, "initialCommand": "x"})).key(),
            "/p_s"
        );
    }

    #[test]
    fn plain_shell_resolution_matches_the_reference() {
        assert!(init(json!({"projectPath": "/p", "isPlainShell": true})).is_plain_shell);
        assert!(init(json!({"projectPath": "/p", "provider": "plain-shell"})).is_plain_shell);
        assert!(init(json!({"projectPath": "/p", "initialCommand": "ls"})).is_plain_shell);
        assert!(!init(json!({"projectPath": "/p"})).is_plain_shell);
        assert_eq!(
            init(json!({"projectPath": "/p"})).mode(),
            Ok(Mode::Provider(ProviderKind::Claude))
        );
    }

    #[test]
    fn wrong_types_count_as_absent_and_a_missing_path_is_an_error() {
        let r = init(
            json!({"projectPath": "/p", "sessionId": 5, "hasSession": "yes", "cols": "80", "rows": 24}),
        );
        assert_eq!(r.session_id, None);
        assert!(!r.has_session);
        assert_eq!(r.size, None);
        assert_eq!(
            InitRequest::parse(&json!({"type": "init"})),
            Err(InitError::InvalidProjectPath)
        );
        assert_eq!(
            InitRequest::parse(&json!({"projectPath": ""})),
            Err(InitError::InvalidProjectPath)
        );
        assert_eq!(
            InitRequest::parse(&json!({"projectPath": 7})),
            Err(InitError::InvalidProjectPath)
        );
    }

    #[test]
    fn sizes_outside_the_limits_are_dropped() {
        let ok = init(json!({"projectPath": "/p", "cols": 120, "rows": 40}));
        assert_eq!(
            ok.size,
            Some(TermSize {
                cols: 120,
                rows: 40
            })
        );
        for (c, r) in [
            (json!(0), json!(24)),
            (json!(80), json!(-1)),
            (json!(1e9), json!(24)),
            (json!(80.5), json!(24)),
        ] {
            assert_eq!(
                init(json!({"projectPath": "/p", "cols": c, "rows": r})).size,
                None
            );
        }
    }

    #[test]
    fn login_commands_and_force_restart_replace() {
        for cmd in ["claude setup-token", "cursor-agent login", "gh auth login"] {
            assert!(
                init(json!({"projectPath": "/p", "initialCommand": cmd})).replaces_existing(),
                "{cmd}"
            );
        }
        assert!(!init(json!({"projectPath": "/p", "initialCommand": "ls"})).replaces_existing());
        assert!(init(json!({"projectPath": "/p", "forceRestart": true})).replaces_existing());
    }

    #[test]
    fn session_id_must_match_the_safe_pattern() {
        assert!(safe_id("abc-DEF_1.2:3"));
        for bad in ["", "a b", "a;rm -rf /", "$(id)", "a\"b", "é", "a/b"] {
            assert!(!safe_id(bad), "{bad}");
        }
        let r = init(json!({"projectPath": "/p", "sessionId": "x;y"}));
        assert_eq!(r.check_session_id(), Err(InitError::InvalidSessionId));
        // One id check for the whole gateway: an id that reads as a flag is refused here too.
        let r = init(json!({"projectPath": "/p", "sessionId": "--help"}));
        assert_eq!(r.check_session_id(), Err(InitError::InvalidSessionId));
    }

    #[test]
    fn project_dir_must_exist_and_be_a_directory() {
        let dir = std::env::temp_dir();
        assert!(check_project_dir(dir.to_str().unwrap()).is_ok());
        assert_eq!(
            check_project_dir("/definitely/not/here"),
            Err(InitError::InvalidProjectPath)
        );
        assert_eq!(
            check_project_dir("/etc/hostname"),
            Err(InitError::InvalidProjectPath)
        );
    }

    #[test]
    fn plain_shell_runs_the_initial_command_under_bash() {
        let r = init(json!({"projectPath": "/p", "initialCommand": "echo hi; exit 3"}));
        let spec = build_launch(&r, "/p".into(), None, &config()).unwrap();
        assert_eq!(spec.program, PathBuf::from("bash"));
        assert_eq!(
            spec.args,
            vec![OsString::from("-c"), OsString::from("echo hi; exit 3")]
        );
        assert_eq!(spec.welcome, "\x1b[36mStarting terminal in: /p\x1b[0m\r\n");
    }

    #[test]
    fn plain_shell_without_a_command_is_the_users_shell() {
        let r = init(json!({"projectPath": "/p", "isPlainShell": true}));
        let spec = build_launch(&r, "/p".into(), None, &config()).unwrap();
        assert_eq!(spec.program, PathBuf::from("/bin/zsh"));
        assert!(spec.args.is_empty());
        let mut c = config();
        c.child_env.retain(|(k, _)| k != "SHELL");
        assert_eq!(
            build_launch(&r, "/p".into(), None, &c).unwrap().program,
            PathBuf::from("bash")
        );
    }

    #[test]
    fn env_has_terminal_vars_and_no_gateway_secret() {
        let r = init(json!({"projectPath": "/p", "isPlainShell": true}));
        let env = build_launch(&r, "/p".into(), None, &config()).unwrap().env;
        let get = |k: &str| {
            env.iter()
                .filter(|(key, _)| key == k)
                .map(|(_, v)| v.clone())
                .collect::<Vec<_>>()
        };
        assert_eq!(get("TERM"), vec![OsString::from("xterm-256color")]);
        assert_eq!(get("COLORTERM"), vec![OsString::from("truecolor")]);
        assert_eq!(get("FORCE_COLOR"), vec![OsString::from("3")]);
        assert_eq!(get("PATH"), vec![OsString::from("/usr/bin")]);
        assert!(get("AGENTGATE_JWT_SECRET").is_empty());
    }

    #[test]
    fn provider_commands_pass_the_resume_id_as_its_own_argument() {
        let mut c = config();
        c.provider_bins
            .insert(ProviderKind::Claude, PathBuf::from("/opt/my claude"));
        let cases = [
            ("claude", vec!["/opt/my claude", "--resume", "nat-1"]),
            ("cursor", vec!["cursor-agent", "--resume=nat-1"]),
            ("codex", vec!["codex", "resume", "nat-1"]),
            ("opencode", vec!["opencode", "--session", "nat-1"]),
            ("gemini", vec!["gemini", "--resume", "nat-1"]),
        ];
        for (provider, expected) in cases {
            let r = init(
                json!({"projectPath": "/p", "provider": provider, "sessionId": "app-1", "hasSession": true}),
            );
            assert_eq!(r.resume_lookup(), Some("app-1"));
            let spec = build_launch(&r, "/p".into(), Some("nat-1"), &c).unwrap();
            assert_eq!(spec.program, PathBuf::from("bash"));
            let mut want: Vec<OsString> = vec!["-c".into(), EXEC_ARGV_SCRIPT.into()];
            want.extend(expected.iter().map(OsString::from));
            assert_eq!(spec.args, want, "{provider}");
            assert!(spec.welcome.contains("Resuming"), "{}", spec.welcome);
        }
    }

    #[test]
    fn an_unsafe_or_missing_resume_id_starts_fresh() {
        let r = init(
            json!({"projectPath": "/p", "provider": "claude", "sessionId": "app-1", "hasSession": true}),
        );
        for resume in [None, Some("x; rm -rf ~"), Some("$(reboot)")] {
            let spec = build_launch(&r, "/p".into(), resume, &config()).unwrap();
            assert_eq!(spec.args.len(), 3, "{resume:?}");
        }
        let fresh = init(json!({"projectPath": "/p", "provider": "codex"}));
        assert_eq!(fresh.resume_lookup(), None);
        let spec = build_launch(&fresh, "/p".into(), None, &config()).unwrap();
        assert_eq!(
            spec.welcome,
            "\x1b[36mStarting new Codex session in: /p\x1b[0m\r\n"
        );
    }

    #[test]
    fn an_unknown_provider_is_an_error() {
        let r = init(json!({"projectPath": "/p", "provider": "nope"}));
        assert_eq!(
            build_launch(&r, "/p".into(), None, &config())
                .unwrap_err()
                .to_string(),
            "Unsupported provider: nope"
        );
    }

    #[test]
    fn the_exec_script_runs_argv_without_interpretation() {
        // The real bash with a hostile-looking argument: it arrives verbatim.
        let out = std::process::Command::new("bash")
            .args([
                "-c",
                EXEC_ARGV_SCRIPT,
                "printf",
                "%s|",
                "$(echo pwned)",
                "a b;c",
            ])
            .output()
            .expect("bash");
        assert_eq!(String::from_utf8_lossy(&out.stdout), "$(echo pwned)|a b;c|");
    }
}
