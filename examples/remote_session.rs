//! Follow a remote session from a terminal with `agentgate-client`: print
//! the agent's answers as they complete, answer its permission prompts, and
//! type the next turns. Reconnects by the seed's policy (shown as
//! `[reconnecting ...]`; a final close ends the program).
//!
//! ```sh
//! TOKEN=$(cargo run -q --release -- token --user me)
//! # a new session in a project of yours (one you created a session in before):
//! cargo run --example remote_session -- --token "$TOKEN" --project "$PWD" "Explain this repo"
//! # or follow an existing one:
//! cargo run --example remote_session -- --token "$TOKEN" --session session_<id>
//! ```
//!
//! At the prompt: a line is the next turn; `/interrupt` stops the running
//! turn; `/quit` leaves. A permission prompt asks `allow? [y/n]`.

use std::io::Write;

use agentgate_client::{create_session, environments, Event, RemoteSession, SessionConfig};
use clap::Parser;
use futures_util::StreamExt;
use serde_json::Value;
use tokio::sync::mpsc;

#[derive(Parser)]
struct Args {
    /// Gateway base URL.
    #[arg(long, default_value = "http://127.0.0.1:3001")]
    url: String,
    /// JWT (from `agentgate token --user NAME`).
    #[arg(long, env = "AGENTGATE_TOKEN")]
    token: String,
    /// Follow this session (`session_<id>` or the app id).
    #[arg(long)]
    session: Option<String>,
    /// Create a session in this project (one of your environments).
    #[arg(long)]
    project: Option<String>,
    /// The first prompt of a new session.
    prompt: Option<String>,
}

#[actix_rt::main]
async fn main() {
    let args = Args::parse();
    let session_id = match (&args.session, &args.project) {
        (Some(id), _) => id.clone(),
        (None, Some(project)) => match new_session(&args, project).await {
            Ok(id) => id,
            Err(e) => return eprintln!("cannot create a session: {e}"),
        },
        (None, None) => return eprintln!("give --session <id> or --project <dir> \"<prompt>\""),
    };
    println!("following {session_id} — type a message, /interrupt, /quit");

    // Stdin is read on a thread; lines reach the async loop through a small channel.
    let (tx, mut lines) = mpsc::channel::<String>(16);
    std::thread::spawn(move || {
        let stdin = std::io::stdin();
        let mut line = String::new();
        while matches!(stdin.read_line(&mut line), Ok(n) if n > 0) {
            if tx.blocking_send(line.trim_end().to_string()).is_err() {
                return;
            }
            line.clear();
        }
    });

    let token = args.token.clone();
    let mut session = RemoteSession::connect(SessionConfig::new(
        args.url.clone(),
        session_id,
        move || token.clone(),
    ));
    let mut asking: Option<(String, Value)> = None;
    loop {
        tokio::select! {
            event = session.next() => match event {
                None => return,
                Some(Event::Closed(why)) => {
                    eprintln!("[closed: {why:?}]");
                    return;
                }
                Some(event) => show(&event, &mut asking),
            },
            line = lines.recv() => {
                let Some(line) = line else {
                    session.close();
                    continue;
                };
                if let Some((request_id, input)) = asking.take() {
                    if line.trim().eq_ignore_ascii_case("y") {
                        session.allow(&request_id, input);
                    } else {
                        session.deny(&request_id, "Denied from the remote terminal");
                    }
                    continue;
                }
                match line.trim() {
                    "" => {}
                    "/quit" => session.close(),
                    "/interrupt" => session.interrupt(),
                    text => {
                        if let Err(e) = session.send_message(text).await {
                            eprintln!("[not sent: {e}]");
                        }
                    }
                }
            }
        }
    }
}

async fn new_session(args: &Args, project: &str) -> Result<String, String> {
    let project = std::fs::canonicalize(project)
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| project.to_string());
    let envs = environments(&args.url, &args.token)
        .await
        .map_err(|e| e.to_string())?;
    let env = envs
        .iter()
        .find(|e| e.path.as_deref() == Some(project.as_str()))
        .ok_or_else(|| {
            format!("{project} is not one of your projects (create a session in it first)")
        })?;
    let prompt = args.prompt.as_deref().unwrap_or("Hello");
    create_session(&args.url, &args.token, &env.id, prompt)
        .await
        .map_err(|e| e.to_string())
}

fn show(event: &Event, asking: &mut Option<(String, Value)>) {
    match event {
        Event::Connected => eprintln!("[connected]"),
        Event::Reconnecting { close_code, after } => {
            eprintln!("[reconnecting in {after:?} after close {close_code:?}]")
        }
        Event::PermissionRequest(p) => {
            print!("\n{} wants to run {}: allow? [y/n] ", p.tool_name, p.input);
            let _ = std::io::stdout().flush();
            *asking = Some((p.request_id.clone(), p.input.clone()));
        }
        Event::PermissionCancelled { request_id } => {
            if asking.as_ref().is_some_and(|(id, _)| id == request_id) {
                *asking = None;
                println!("\n[the prompt was answered elsewhere]");
            }
        }
        Event::Message(m) => match m["type"].as_str() {
            Some("assistant") => {
                for block in m["message"]["content"].as_array().into_iter().flatten() {
                    match block["type"].as_str() {
                        Some("text") => println!("\n{}", block["text"].as_str().unwrap_or("")),
                        Some("tool_use") => println!("\n[{} {}]", block["name"], block["input"]),
                        _ => {}
                    }
                }
            }
            Some("result") if m["is_error"] == true => println!("\n[turn failed: {}]", m["errors"]),
            Some("result") => println!("\n[turn done]"),
            _ => {}
        },
        Event::Closed(_) => {}
    }
}
