//! A real terminal client for `/shell`: your terminal in raw mode, attached
//! to a persistent PTY on the gateway. Keystrokes and window resizes go up,
//! output comes down; when the connection drops it reconnects with backoff
//! and reattaches to the same session (the gateway replays its output, or
//! redraws the screen of a full-screen program).
//!
//! ```text
//! agentgate serve &                                   # the gateway
//! export AGENTGATE_TOKEN=$(agentgate token --user me) # a token
//! cargo run --example terminal -- [--url ws://127.0.0.1:3001] [--session NAME] [--command CMD] [--dir DIR]
//! ```
//!
//! `Ctrl-]` leaves the client; the PTY keeps running on the gateway (until
//! `--shell-detach-secs`), and running the example again with the same
//! `--session` reattaches to it. The client ends when the process exits.

use std::io::{Read, Write};
use std::time::Duration;

use actix_codec::Framed;
use agentgate_actors::shell::utf8::Utf8Carry;
use awc::ws::{Codec, Frame, Message};
use awc::BoxedSocket;
use crossterm::terminal;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;

/// The key that leaves the client (Ctrl-], as in telnet).
const DETACH_KEY: u8 = 0x1d;
/// Reconnect backoff: first delay, doubling up to the cap.
const BACKOFF_START: Duration = Duration::from_millis(250);
const BACKOFF_MAX: Duration = Duration::from_secs(10);
/// Keystrokes buffered while reconnecting (older ones are dropped beyond it).
const STDIN_QUEUE: usize = 256;
/// The gateway's exit line (PROTOCOL.md section 5).
const EXIT_MARKER: &str = "\x1b[33mProcess exited with code";

struct Options {
    url: String,
    token: String,
    session: String,
    command: Option<String>,
    dir: String,
}

fn options() -> Result<Options, String> {
    let mut url = std::env::var("AGENTGATE_URL").unwrap_or_else(|_| "ws://127.0.0.1:3001".into());
    let mut token = std::env::var("AGENTGATE_TOKEN").ok();
    let mut session = "terminal".to_string();
    let mut command = None;
    let mut dir = std::env::current_dir()
        .map_err(|e| format!("current dir: {e}"))?
        .display()
        .to_string();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().ok_or_else(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--url" => url = value()?,
            "--token" => token = Some(value()?),
            "--session" => session = value()?,
            "--command" => command = Some(value()?),
            "--dir" => dir = value()?,
            "-h" | "--help" => {
                return Err("usage: terminal [--url ws://HOST:PORT] [--token JWT] [--session NAME] [--command CMD] [--dir DIR]".into())
            }
            other => return Err(format!("unknown argument {other}")),
        }
    }
    let token = token.ok_or("no token: set AGENTGATE_TOKEN or pass --token")?;
    Ok(Options {
        url,
        token,
        session,
        command,
        dir,
    })
}

/// Restores the terminal however the client ends.
struct RawMode;

impl RawMode {
    fn enable() -> std::io::Result<RawMode> {
        terminal::enable_raw_mode()?;
        Ok(RawMode)
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let _ = terminal::disable_raw_mode();
    }
}

/// A status line of the client itself (raw mode needs `\r\n`).
fn status(text: &str) {
    let mut out = std::io::stdout();
    let _ = write!(out, "\r\n\x1b[2m[terminal] {text}\x1b[0m\r\n");
    let _ = out.flush();
}

fn init_frame(opts: &Options) -> Value {
    let (cols, rows) = terminal::size().unwrap_or((80, 24));
    let mut init = json!({
        "type": "init",
        "projectPath": opts.dir,
        "sessionId": opts.session,
        "isPlainShell": true,
        "cols": cols,
        "rows": rows,
    });
    if let Some(cmd) = &opts.command {
        init["initialCommand"] = json!(cmd);
    }
    init
}

async fn connect(opts: &Options) -> Result<Framed<BoxedSocket, Codec>, String> {
    let client = awc::Client::builder()
        .timeout(Duration::from_secs(10))
        .max_http_version(awc::http::Version::HTTP_11)
        .finish();
    let (_, ws) = client
        .ws(format!("{}/shell", opts.url.trim_end_matches('/')))
        .bearer_auth(&opts.token)
        .max_frame_size(64 * 1024 * 1024)
        .connect()
        .await
        .map_err(|e| e.to_string())?;
    Ok(ws)
}

/// How one connection ended.
enum Outcome {
    /// The user left (Ctrl-]) or the process exited: stop.
    Done,
    /// The connection dropped: reconnect.
    Lost(String),
}

async fn session(
    opts: &Options,
    ws: &mut Framed<BoxedSocket, Codec>,
    keys: &mut mpsc::Receiver<Vec<u8>>,
    winch: &mut tokio::signal::unix::Signal,
    utf8: &mut Utf8Carry,
) -> Outcome {
    if let Err(e) = ws
        .send(Message::Text(init_frame(opts).to_string().into()))
        .await
    {
        return Outcome::Lost(e.to_string());
    }
    let mut stdout = std::io::stdout();
    loop {
        tokio::select! {
            frame = ws.next() => {
                let frame = match frame {
                    None => return Outcome::Lost("connection closed".into()),
                    Some(Err(e)) => return Outcome::Lost(e.to_string()),
                    Some(Ok(frame)) => frame,
                };
                match frame {
                    Frame::Text(bytes) => {
                        let Ok(v) = serde_json::from_slice::<Value>(&bytes) else { continue };
                        match v["type"].as_str() {
                            Some("output") => {
                                let data = v["data"].as_str().unwrap_or_default();
                                let _ = stdout.write_all(data.as_bytes());
                                let _ = stdout.flush();
                                if data.contains(EXIT_MARKER) {
                                    return Outcome::Done;
                                }
                            }
                            Some("auth_url") => status(&format!("open this URL to log in: {}", v["url"].as_str().unwrap_or_default())),
                            Some("error") => {
                                status(&format!("error: {}", v["message"].as_str().unwrap_or_default()));
                                return Outcome::Done;
                            }
                            _ => {}
                        }
                    }
                    Frame::Ping(payload) => {
                        if let Err(e) = ws.send(Message::Pong(payload)).await {
                            return Outcome::Lost(e.to_string());
                        }
                    }
                    Frame::Close(reason) => {
                        let why = reason.map(|r| format!("closed by the gateway ({})", u16::from(r.code))).unwrap_or_else(|| "closed by the gateway".into());
                        return Outcome::Lost(why);
                    }
                    _ => {}
                }
            }
            key = keys.recv() => {
                let Some(bytes) = key else { return Outcome::Done };
                if let Some(i) = bytes.iter().position(|&b| b == DETACH_KEY) {
                    if i > 0 {
                        let data = utf8.decode(&bytes[..i]);
                        let _ = ws.send(Message::Text(json!({"type": "input", "data": data}).to_string().into())).await;
                    }
                    let _ = ws.close().await;
                    status(&format!("detached; `--session {}` reattaches", opts.session));
                    return Outcome::Done;
                }
                // A multibyte character split between two reads is kept whole.
                let data = utf8.decode(&bytes);
                if data.is_empty() {
                    continue;
                }
                if let Err(e) = ws.send(Message::Text(json!({"type": "input", "data": data}).to_string().into())).await {
                    return Outcome::Lost(e.to_string());
                }
            }
            _ = winch.recv() => {
                if let Ok((cols, rows)) = terminal::size() {
                    let resize = json!({"type": "resize", "cols": cols, "rows": rows});
                    if let Err(e) = ws.send(Message::Text(resize.to_string().into())).await {
                        return Outcome::Lost(e.to_string());
                    }
                }
            }
        }
    }
}

/// Reads raw keystrokes on a thread (stdin reads block) into a bounded queue.
fn spawn_stdin_reader() -> mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = mpsc::channel(STDIN_QUEUE);
    std::thread::spawn(move || {
        let mut stdin = std::io::stdin();
        let mut buf = [0u8; 4096];
        loop {
            match stdin.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if tx.blocking_send(buf[..n].to_vec()).is_err() {
                        break;
                    }
                }
            }
        }
    });
    rx
}

#[actix_rt::main]
async fn main() {
    let opts = match options() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
    let mut winch = match signal(SignalKind::window_change()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("cannot watch window size changes: {e}");
            std::process::exit(1);
        }
    };
    let _raw = match RawMode::enable() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("cannot put the terminal in raw mode (is stdin a terminal?): {e}");
            std::process::exit(1);
        }
    };
    let mut keys = spawn_stdin_reader();
    let mut utf8 = Utf8Carry::new();
    let mut backoff = BACKOFF_START;
    let mut attempts = 0u32;
    loop {
        match connect(&opts).await {
            Ok(mut ws) => {
                if attempts > 0 {
                    // The gateway replays or redraws the session from here.
                    let _ = std::io::stdout().write_all(b"\x1b[H\x1b[2J");
                }
                backoff = BACKOFF_START;
                attempts += 1;
                match session(&opts, &mut ws, &mut keys, &mut winch, &mut utf8).await {
                    Outcome::Done => break,
                    Outcome::Lost(why) => status(&format!("connection lost ({why}); reconnecting")),
                }
            }
            Err(e) => {
                if attempts == 0 {
                    status(&format!("cannot connect to {}: {e}", opts.url));
                    break;
                }
                status(&format!("reconnect failed ({e}); next try in {backoff:?}"));
            }
        }
        // Wait, unless the user leaves meanwhile.
        let leave = tokio::select! {
            _ = tokio::time::sleep(backoff) => false,
            key = keys.recv() => key.is_none_or(|k| k.contains(&DETACH_KEY)),
        };
        if leave {
            break;
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}
