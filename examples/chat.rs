//! An interactive `/ws` chat client: create or pick a session, send prompts,
//! print streamed text as it arrives, answer permission prompts, abort, and
//! survive dropped connections (reconnect with backoff, then
//! `chat.subscribe` with the last seq seen, so nothing is lost or repeated).
//!
//! ```sh
//! cargo run --release -- serve &
//! TOKEN=$(cargo run -q --release -- token --user me)
//! cargo run --example chat -- --token "$TOKEN" --project "$PWD"          # new claude session
//! cargo run --example chat -- --token "$TOKEN" --session <uuid>          # existing session
//! ```
//!
//! At the prompt: type a message and Enter; `/abort` interrupts the run;
//! `/quit` leaves. A permission request asks `allow? [y]es/[n]o/[a]lways`.

use std::time::Duration;

use actix_codec::Framed;
use awc::ws::{Codec, Frame, Message};
use awc::BoxedSocket;
use clap::Parser;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::sync::mpsc;

#[derive(Parser)]
struct Args {
    /// Gateway base URL.
    #[arg(long, default_value = "http://127.0.0.1:3001")]
    url: String,
    /// JWT (from `agentgate token --user NAME`).
    #[arg(long, env = "AGENTGATE_TOKEN")]
    token: String,
    /// An existing session id.
    #[arg(long)]
    session: Option<String>,
    /// Create a new session for this project directory.
    #[arg(long)]
    project: Option<String>,
    /// Provider of a new session.
    #[arg(long, default_value = "claude")]
    provider: String,
}

/// Longest pause between reconnect attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(10);

enum Input {
    Line(String),
    Eof,
}

#[actix_rt::main]
async fn main() {
    let args = Args::parse();
    let session = match (&args.session, &args.project) {
        (Some(s), _) => s.clone(),
        (None, Some(project)) => match create_session(&args, project).await {
            Ok(id) => id,
            Err(e) => return eprintln!("cannot create a session: {e}"),
        },
        (None, None) => return eprintln!("give --session <uuid> or --project <dir>"),
    };
    println!("session {session} — type a message, /abort, /quit");

    // Stdin is read on a thread; lines reach the async loop through a small channel.
    let (tx, mut rx) = mpsc::channel::<Input>(16);
    std::thread::spawn(move || {
        let stdin = std::io::stdin();
        let mut line = String::new();
        loop {
            line.clear();
            match stdin.read_line(&mut line) {
                Ok(0) | Err(_) => {
                    let _ = tx.blocking_send(Input::Eof);
                    return;
                }
                Ok(_) => {
                    if tx
                        .blocking_send(Input::Line(line.trim_end().to_string()))
                        .is_err()
                    {
                        return;
                    }
                }
            }
        }
    });

    let ws_url = format!(
        "{}/ws?token={}",
        args.url.replacen("http", "ws", 1),
        args.token
    );
    let mut last_seq: u64 = 0;
    let mut backoff = Duration::from_millis(250);
    let mut pending: Option<(String, String)> = None; // (requestId, toolName)
    let mut first = true;
    loop {
        let mut ws = match connect(&ws_url).await {
            Ok(ws) => ws,
            Err(e) => {
                eprintln!("\n[connect failed: {e}; retrying in {backoff:?}]");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
                continue;
            }
        };
        backoff = Duration::from_millis(250);
        if !first {
            eprintln!("\n[reconnected; resuming after seq {last_seq}]");
        }
        first = false;
        let subscribe = json!({"type":"chat.subscribe","sessions":[{"sessionId": session, "lastSeq": last_seq}]});
        if ws
            .send(Message::Text(subscribe.to_string().into()))
            .await
            .is_err()
        {
            continue;
        }
        loop {
            tokio::select! {
                frame = ws.next() => match frame {
                    Some(Ok(Frame::Text(bytes))) => {
                        let Ok(v) = serde_json::from_slice::<Value>(&bytes) else { continue };
                        if let Some(seq) = v["seq"].as_u64() {
                            last_seq = last_seq.max(seq);
                        }
                        if let Some(p) = show(&v) {
                            pending = Some(p);
                        }
                    }
                    Some(Ok(Frame::Ping(p))) => { let _ = ws.send(Message::Pong(p)).await; }
                    Some(Ok(Frame::Close(reason))) => {
                        eprintln!("\n[closed: {reason:?}]");
                        break;
                    }
                    Some(Ok(_)) => {}
                    Some(Err(e)) => { eprintln!("\n[connection error: {e}]"); break; }
                    None => { eprintln!("\n[connection lost]"); break; }
                },
                input = rx.recv() => {
                    let line = match input {
                        Some(Input::Line(line)) => line,
                        Some(Input::Eof) | None => return,
                    };
                    let frame = if let Some((request_id, tool)) = pending.take() {
                        let answer = line.trim().to_lowercase();
                        let allow = answer.starts_with('y') || answer.starts_with('a');
                        let remember = answer.starts_with('a').then_some(tool);
                        json!({"type":"chat.permission-response","requestId": request_id,"allow": allow,"rememberEntry": remember})
                    } else if line == "/quit" {
                        return;
                    } else if line == "/abort" {
                        json!({"type":"chat.abort","sessionId": session})
                    } else if line.trim().is_empty() {
                        continue;
                    } else {
                        json!({"type":"chat.send","sessionId": session,"content": line})
                    };
                    if ws.send(Message::Text(frame.to_string().into())).await.is_err() {
                        eprintln!("\n[send failed; reconnecting]");
                        break;
                    }
                }
            }
        }
        tokio::time::sleep(backoff).await;
    }
}

/// Prints one event; returns a pending permission request to answer.
fn show(v: &Value) -> Option<(String, String)> {
    use std::io::Write;
    let text = |k: &str| v[k].as_str().unwrap_or_default().to_string();
    match v["kind"].as_str().unwrap_or_default() {
        "stream_delta" => {
            print!("{}", text("content"));
            let _ = std::io::stdout().flush();
        }
        "stream_end" => println!(),
        "text" if v["role"] == "assistant" => println!("{}", text("content")),
        "thinking" => println!("(thinking) {}", text("content")),
        "tool_use" => println!("[tool {}] {}", text("toolName"), v["toolInput"]),
        "tool_result" => {
            let content: String = text("content").chars().take(400).collect();
            println!(
                "[result{}] {content}",
                if v["isError"] == true { " (error)" } else { "" }
            );
        }
        "error" => println!("[error] {}", text("content")),
        "permission_request" => {
            println!(
                "\n[permission] {} wants to run {}",
                text("toolName"),
                v["input"]
            );
            print!("allow? [y]es/[n]o/[a]lways: ");
            let _ = std::io::stdout().flush();
            return Some((text("requestId"), text("toolName")));
        }
        "permission_cancelled" => println!(
            "[permission request {}: {}]",
            text("requestId"),
            text("reason")
        ),
        "complete" => println!(
            "\n[done: {}]",
            if v["aborted"] == true {
                "aborted"
            } else if v["success"] == true {
                "ok"
            } else {
                "failed"
            }
        ),
        "chat_subscribed" => {
            if v["isProcessing"] == true {
                println!("[a run is in progress; catching up]");
            }
            if let Some(p) = v["pendingPermissions"].as_array().and_then(|p| p.first()) {
                println!(
                    "\n[permission] {} wants to run {}",
                    p["toolName"], p["input"]
                );
                print!("allow? [y]es/[n]o/[a]lways: ");
                let _ = std::io::stdout().flush();
                return Some((
                    p["requestId"].as_str().unwrap_or_default().into(),
                    p["toolName"].as_str().unwrap_or_default().into(),
                ));
            }
        }
        "protocol_error" => println!("[{}] {}", text("code"), text("error")),
        _ => {}
    }
    None
}

async fn connect(url: &str) -> Result<Framed<BoxedSocket, Codec>, String> {
    let client = awc::Client::builder()
        .timeout(Duration::from_secs(10))
        .finish();
    client
        .ws(url)
        .max_frame_size(16 * 1024 * 1024)
        .connect()
        .await
        .map(|(_, framed)| framed)
        .map_err(|e| e.to_string())
}

async fn create_session(args: &Args, project: &str) -> Result<String, String> {
    let mut res = awc::Client::new()
        .post(format!("{}/api/providers/sessions", args.url))
        .bearer_auth(&args.token)
        .send_json(&json!({"provider": args.provider, "projectPath": project}))
        .await
        .map_err(|e| e.to_string())?;
    let body: Value = res.json().await.map_err(|e| e.to_string())?;
    body["data"]["sessionId"]
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| body.to_string())
}
