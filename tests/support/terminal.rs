//! A real terminal for interactive CLIs: the program runs in a PTY, its
//! output is fed to a `vt100` screen, and tests read that screen as a user
//! would and type into it.
//!
//! ```ignore
//! let mut t = Terminal::spawn(cmd_spec);
//! t.wait_for("the answer", |s| s.contains("42")).await;
//! t.type_line("next question").await;
//! ```

use std::ffi::OsString;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Screen size of the terminal.
pub const ROWS: u16 = 50;
pub const COLS: u16 = 140;
/// How often the screen is looked at while waiting.
const POLL: Duration = Duration::from_millis(100);

/// What to run.
pub struct Spec {
    pub program: PathBuf,
    pub args: Vec<OsString>,
    /// The whole environment (nothing is inherited).
    pub env: Vec<(OsString, OsString)>,
    pub cwd: PathBuf,
}

pub struct Terminal {
    parser: Arc<Mutex<vt100::Parser>>,
    /// Everything the program wrote, for failure messages.
    raw: Arc<Mutex<Vec<u8>>>,
    writer: pty_process::OwnedWritePty,
    child: tokio::process::Child,
}

impl Terminal {
    /// Starts the program in a fresh PTY (on the current actix runtime).
    pub fn spawn(spec: Spec) -> Terminal {
        let (pty, pts) = pty_process::open().expect("open a pty");
        pty.resize(pty_process::Size::new(ROWS, COLS))
            .expect("resize the pty");
        let child = pty_process::Command::new(&spec.program)
            .args(&spec.args)
            .env_clear()
            .envs(spec.env.iter().map(|(k, v)| (k, v)))
            .current_dir(&spec.cwd)
            .kill_on_drop(true)
            .spawn(pts)
            .unwrap_or_else(|e| panic!("spawn {}: {e}", spec.program.display()));
        let (mut reader, writer) = pty.into_split();
        let parser = Arc::new(Mutex::new(vt100::Parser::new(ROWS, COLS, 0)));
        let raw = Arc::new(Mutex::new(Vec::new()));
        let (p, r) = (parser.clone(), raw.clone());
        actix_rt::spawn(async move {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                match reader.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => {
                        if let Ok(mut p) = p.lock() {
                            p.process(&buf[..n]);
                        }
                        if let Ok(mut r) = r.lock() {
                            // The last 1 MiB is plenty for a failure message.
                            if r.len() > 1 << 20 {
                                let cut = n.min(r.len());
                                r.drain(..cut);
                            }
                            r.extend_from_slice(&buf[..n]);
                        }
                    }
                }
            }
        });
        Terminal {
            parser,
            raw,
            writer,
            child,
        }
    }

    /// The visible screen as text.
    pub fn screen(&self) -> String {
        self.parser
            .lock()
            .map(|p| p.screen().contents())
            .unwrap_or_default()
    }

    /// Waits (bounded) until the screen satisfies `cond`; returns that screen.
    pub async fn wait_for(
        &self,
        what: &str,
        limit: Duration,
        cond: impl Fn(&str) -> bool,
    ) -> String {
        let deadline = Instant::now() + limit;
        loop {
            let screen = self.screen();
            if cond(&screen) {
                return screen;
            }
            if Instant::now() > deadline {
                panic!("terminal: no {what} within {limit:?}; screen:\n{screen}");
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Types text as keystrokes (no Enter).
    pub async fn type_text(&mut self, text: &str) {
        self.writer
            .write_all(text.as_bytes())
            .await
            .expect("write to the pty");
        self.writer.flush().await.expect("flush the pty");
    }

    /// Presses Enter.
    pub async fn enter(&mut self) {
        self.type_text("\r").await;
    }

    /// Whether the program is still running.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Ends the program (SIGKILL) and reaps it.
    pub async fn kill(&mut self) {
        let _ = self.child.kill().await;
    }

    /// Everything written so far, escapes stripped of nothing (for debugging).
    pub fn raw_output(&self) -> String {
        self.raw
            .lock()
            .map(|r| String::from_utf8_lossy(&r).into_owned())
            .unwrap_or_default()
    }
}
