//! `/shell`: persistent terminals over WebSocket (PROTOCOL.md section 5).
//!
//! # Actors
//!
//! | actor | file | owns |
//! |---|---|---|
//! | [`PtyHub`] | [`pty_hub`] | the registry of live PTYs by (user, session key); starts them, replaces them on login/`forceRestart`, kills them all on shutdown |
//! | [`PtySession`] | [`pty_session`] | one child process in its own session and PTY, its replay buffer, screen state and URL detector, and the sockets attached to it |
//! | [`ShellSocket`] | [`shell_socket`] | one `/shell` WebSocket connection: parses frames, runs `init`, forwards input and resizes, writes output and `auth_url` frames |
//!
//! Plain helpers: [`launch`] (init parsing, key, validation, command),
//! [`url_detect`], [`utf8`], [`replay`], [`screen`]; the kill of a PTY's
//! session is [`crate::kill::SessionGuard`].
//!
//! # Flow
//!
//! `init` → the socket asks the hub for the key's live PTY (`LookupPty`; a
//! login command or `forceRestart` kills the old one first) and attaches
//! to it (`AttachSocket`: reconnect line, then the replay or the redrawn
//! screen). If there is none it validates the path and session id, resolves
//! the provider's resume id from the session row, and asks the hub to
//! `LaunchPty`. The PTY's output goes to every attached socket as
//! `PtyOutput` (one serialized frame shared by all); input and resizes go
//! back as `WriteInput` / `ResizePty`. A closed socket sends `DetachSocket`
//! with its own id only, so a stale socket's late close never detaches the
//! socket that replaced it. With no socket left the PTY keeps running for
//! `--shell-detach-secs`, then its whole session is killed.
//!
//! # Invariants
//!
//! - A PTY's child, and every process in its session, dies with the
//!   `PtySession` (exit, detach timeout, replacement, shutdown, or a panic:
//!   [`crate::kill::SessionGuard`] kills on drop).
//! - Memory per PTY is bounded: replay buffer ([`replay::REPLAY_BUFFER_BYTES`]
//!   by default), URL text buffer (32 KiB), screen (terminal size, itself
//!   bounded by [`MAX_TERM_COLS`] x [`MAX_TERM_ROWS`]), input queue
//!   ([`pty_session::INPUT_QUEUE_BYTES`]), and per socket at most
//!   [`pty_session::SLOW_CONSUMER_LIMIT`] output frames in flight.
//! - Flow control: when every attached socket has
//!   [`pty_session::OUTPUT_HIGH_WATER`] frames in flight the PTY is not read
//!   until one drains, so the child blocks instead of the gateway growing.
//!   With no socket attached the PTY is read into the bounded replay buffer.
//! - PTYs belong to the user who started them: the registry is keyed by
//!   (user id, session key), so another user's `init` with the same key
//!   starts its own PTY instead of attaching to someone else's terminal.

pub mod launch;
pub mod placement;
pub mod pty_hub;
pub mod pty_session;
pub mod replay;
pub mod screen;
pub mod shell_socket;
pub mod url_detect;
pub mod utf8;

use actix::Recipient;
use bytestring::ByteString;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::protocol::lenient;

pub use placement::PtyPlacement;
pub use pty_hub::{KillPty, ListPtys, PtyHub, ShutdownPtys};
pub use pty_session::PtyInfo;
pub use pty_session::PtySession;
pub use shell_socket::{PtyEnded, PtyOutput, ShellDeps, ShellSocket};

/// Terminal size used when `init` carries none (the reference's default).
pub const DEFAULT_COLS: u16 = 80;
pub const DEFAULT_ROWS: u16 = 24;
/// Largest accepted terminal size: far beyond any real screen, small enough
/// that the server-side screen state stays a few MiB at most.
pub const MAX_TERM_COLS: u16 = 500;
pub const MAX_TERM_ROWS: u16 = 200;

/// A terminal size in character cells.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TermSize {
    pub cols: u16,
    pub rows: u16,
}

impl Default for TermSize {
    fn default() -> Self {
        TermSize {
            cols: DEFAULT_COLS,
            rows: DEFAULT_ROWS,
        }
    }
}

impl TermSize {
    /// A size from a frame's `cols` and `rows`: both whole numbers within
    /// 1..=[`MAX_TERM_COLS`] and 1..=[`MAX_TERM_ROWS`].
    pub fn from_dims(cols: Option<u64>, rows: Option<u64>) -> Option<TermSize> {
        let dim = |n: Option<u64>, max: u16| {
            let n = n?;
            (1..=u64::from(max)).contains(&n).then_some(n as u16)
        };
        Some(TermSize {
            cols: dim(cols, MAX_TERM_COLS)?,
            rows: dim(rows, MAX_TERM_ROWS)?,
        })
    }
}

/// Settings of the shell subsystem beyond [`GatewayConfig`](crate::config::GatewayConfig).
#[derive(Debug, Clone, Copy)]
pub struct ShellLimits {
    /// Bound of each PTY's replay buffer in bytes.
    pub replay_bytes: usize,
}

impl Default for ShellLimits {
    fn default() -> Self {
        ShellLimits {
            replay_bytes: replay::REPLAY_BUFFER_BYTES,
        }
    }
}

/// How a socket reaches a PTY's output: its id (unique per connection, the
/// identity that makes a stale close harmless) and its recipients.
#[derive(Clone)]
pub struct SocketHandle {
    pub id: u64,
    pub output: Recipient<PtyOutput>,
    pub ended: Recipient<PtyEnded>,
}

impl std::fmt::Debug for SocketHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SocketHandle")
            .field("id", &self.id)
            .finish()
    }
}

/// Why a PTY let go of a socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndReason {
    /// The process exited (the exit line was the last output); the socket stays open.
    Exited,
    /// The socket fell too far behind while others kept the PTY going: close 4008.
    SlowConsumer,
    /// The gateway is shutting down: close 1001.
    Shutdown,
}

/// Client → server frames of `/shell`. Fields are lenient (a field of the
/// wrong type counts as absent); [`ClientFrame::parse`] gives the error
/// text for what is refused.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ClientFrame {
    Init(InitFrame),
    Input {
        #[serde(default, deserialize_with = "lenient::opt_string")]
        data: Option<String>,
    },
    Resize {
        #[serde(default, deserialize_with = "lenient::opt_u64")]
        cols: Option<u64>,
        #[serde(default, deserialize_with = "lenient::opt_u64")]
        rows: Option<u64>,
    },
}

/// The fields of an `init` frame as sent; [`launch::InitRequest`] is what
/// they mean.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InitFrame {
    #[serde(default, deserialize_with = "lenient::opt_string")]
    pub project_path: Option<String>,
    #[serde(default, deserialize_with = "lenient::opt_string")]
    pub session_id: Option<String>,
    #[serde(default, deserialize_with = "lenient::flag")]
    pub has_session: bool,
    #[serde(default, deserialize_with = "lenient::opt_string")]
    pub provider: Option<String>,
    #[serde(default, deserialize_with = "lenient::opt_string")]
    pub initial_command: Option<String>,
    #[serde(default, deserialize_with = "lenient::flag")]
    pub is_plain_shell: bool,
    #[serde(default, deserialize_with = "lenient::flag")]
    pub force_restart: bool,
    #[serde(default, deserialize_with = "lenient::opt_u64")]
    pub cols: Option<u64>,
    #[serde(default, deserialize_with = "lenient::opt_u64")]
    pub rows: Option<u64>,
}

const NOT_A_FRAME: &str = "Invalid message: expected a JSON object with a \"type\"";

impl ClientFrame {
    /// Parses one frame; the error is the text of the `error` frame to answer.
    pub fn parse(bytes: &[u8]) -> Result<ClientFrame, String> {
        // An object straight into the enum (the keystroke path); anything
        // else, or a frame it refuses, is read as a value to say why (serde
        // would also read a tagged enum from an array).
        let object = bytes
            .iter()
            .find(|b| !b.is_ascii_whitespace())
            .is_some_and(|b| *b == b'{');
        if object {
            if let Ok(frame) = serde_json::from_slice(bytes) {
                return Ok(frame);
            }
        }
        let value: Value = match serde_json::from_slice(bytes) {
            Ok(v @ Value::Object(_)) => v,
            _ => return Err(NOT_A_FRAME.into()),
        };
        // Duplicate keys (last one wins in a value) are the only other way here.
        ClientFrame::deserialize(&value).map_err(|_| {
            match value.get("type").and_then(Value::as_str) {
                Some(ty) if !KNOWN_TYPES.contains(&ty) => format!("Unknown message type: {ty}"),
                _ => NOT_A_FRAME.into(),
            }
        })
    }
}

/// The `type`s of [`ClientFrame`].
const KNOWN_TYPES: [&str; 3] = ["init", "input", "resize"];

/// Server → client frames of `/shell`.
#[derive(Debug, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerFrame<'a> {
    Output {
        data: &'a str,
    },
    AuthUrl {
        url: &'a str,
        #[serde(rename = "autoOpen")]
        auto_open: bool,
    },
    Error {
        message: &'a str,
    },
}

impl ServerFrame<'_> {
    /// Serialized once; clones of the result share the bytes.
    pub fn to_text(&self) -> ByteString {
        if let ServerFrame::Output { data } = self {
            // The bulk of a terminal's traffic: written directly (serde's
            // byte-at-a-time escaping was a quarter of the work per read).
            let mut text = String::with_capacity(data.len() + data.len() / 16 + 32);
            text.push_str("{\"type\":\"output\",\"data\":");
            crate::json_text::push_json_str(&mut text, data);
            text.push('}');
            return ByteString::from(text);
        }
        // Serializing a struct of strings and bools cannot fail.
        ByteString::from(serde_json::to_string(self).unwrap_or_default())
    }
}

/// The line a reattaching socket gets first (cyan).
pub const RECONNECT_LINE: &str = "\x1b[36m[Reconnected to existing session]\x1b[0m\r\n";

/// The line sent when the process ends (yellow). A process killed by a
/// signal reports `128 + signal`, as a shell would.
pub fn exit_line(status: Option<std::process::ExitStatus>) -> String {
    use std::os::unix::process::ExitStatusExt;
    let text = match status {
        Some(s) => match (s.code(), s.signal()) {
            (Some(code), _) => format!("Process exited with code {code}"),
            (None, Some(sig)) => format!("Process exited with code {} (signal {sig})", 128 + sig),
            (None, None) => "Process exited".to_string(),
        },
        None => "Process exited".to_string(),
    };
    format!("\r\n\x1b[33m{text}\x1b[0m\r\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn frames_have_the_reference_shape() {
        assert_eq!(
            ServerFrame::Output { data: "a\"b" }.to_text(),
            r#"{"type":"output","data":"a\"b"}"#
        );
        assert_eq!(
            ServerFrame::AuthUrl {
                url: "https://x/",
                auto_open: true
            }
            .to_text(),
            r#"{"type":"auth_url","url":"https://x/","autoOpen":true}"#
        );
        assert_eq!(
            ServerFrame::Error {
                message: "Invalid project path"
            }
            .to_text(),
            r#"{"type":"error","message":"Invalid project path"}"#
        );
    }

    /// The size a `resize` frame with these `cols` and `rows` asks for.
    fn resize(cols: &Value, rows: &Value) -> Option<TermSize> {
        let text = json!({"type": "resize", "cols": cols, "rows": rows}).to_string();
        match ClientFrame::parse(text.as_bytes()) {
            Ok(ClientFrame::Resize { cols, rows }) => TermSize::from_dims(cols, rows),
            other => panic!("not a resize: {other:?}"),
        }
    }

    #[test]
    fn sizes_are_bounded() {
        assert_eq!(
            resize(&json!(1), &json!(1)),
            Some(TermSize { cols: 1, rows: 1 })
        );
        assert_eq!(
            resize(&json!(MAX_TERM_COLS), &json!(MAX_TERM_ROWS)),
            Some(TermSize {
                cols: MAX_TERM_COLS,
                rows: MAX_TERM_ROWS
            })
        );
        for (c, r) in [
            (json!(0), json!(1)),
            (json!(1), json!(0)),
            (json!(501), json!(1)),
            (json!(1), json!(201)),
            (json!(null), json!(1)),
            (json!(-5), json!(5)),
            (json!(2.5), json!(5)),
        ] {
            assert_eq!(resize(&c, &r), None, "{c} {r}");
        }
    }

    #[test]
    fn client_frames_are_typed_and_bad_ones_say_why() {
        let parse = |text: &str| ClientFrame::parse(text.as_bytes());
        assert_eq!(
            parse(r#"{"data":"ls\r","type":"input"}"#),
            Ok(ClientFrame::Input {
                data: Some("ls\r".into())
            })
        );
        // A field of the wrong type counts as absent.
        assert_eq!(
            parse(r#"{"type":"input","data":5}"#),
            Ok(ClientFrame::Input { data: None })
        );
        let init = parse(
            r#"{"type":"init","projectPath":"/p","hasSession":"yes","provider":7,"cols":80,"rows":24}"#,
        );
        assert_eq!(
            init,
            Ok(ClientFrame::Init(InitFrame {
                project_path: Some("/p".into()),
                cols: Some(80),
                rows: Some(24),
                ..InitFrame::default()
            }))
        );
        // Duplicate keys: the last one wins, as in a JSON value.
        assert_eq!(
            parse(r#"{"type":"input","data":"a","data":"b"}"#),
            Ok(ClientFrame::Input {
                data: Some("b".into())
            })
        );
        let not_a_frame = Err(NOT_A_FRAME.to_string());
        for bad in [
            "",
            "{",
            "[\"input\",\"x\"]",
            "\"input\"",
            "{}",
            r#"{"type":5}"#,
        ] {
            assert_eq!(parse(bad), not_a_frame, "{bad}");
        }
        assert_eq!(
            parse(r#"{"type":"launch"}"#),
            Err("Unknown message type: launch".to_string())
        );
    }

    #[test]
    fn exit_line_reports_code_or_signal() {
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(
            exit_line(Some(std::process::ExitStatus::from_raw(3 << 8))),
            "\r\n\x1b[33mProcess exited with code 3\x1b[0m\r\n"
        );
        assert!(
            exit_line(Some(std::process::ExitStatus::from_raw(9))).contains("code 137 (signal 9)")
        );
    }
}
