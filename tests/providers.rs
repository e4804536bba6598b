//! Every non-Claude provider end to end through `/ws`: the real Codex, Gemini and OpenCode CLIs
//! (pinned npm versions, installed on first use into `.cache/agent-clis/`) against local
//! stand-ins of their model APIs, and Cursor through a fake executable that replays its
//! documented stream (no registry ships the Cursor CLI).
//!
//! One table, one row per provider: a new provider is one [`Row`]. Each row runs the same
//! black-box checks a user would make, in one session:
//! 1. a streamed answer, `session_upserted` with the native id, one successful `complete`;
//! 2. a shell command that really runs in the project dir (`tool_use` + `tool_result`);
//! 3. resume: the next turn's model request carries the earlier turns (`RECALL`);
//! 4. an API failure (HTTP 400): an `error` with the API's message and one failed `complete`,
//!    within the usual wait (no multi-minute retry hang);
//! 5. abort while a command runs: `complete {aborted:true}` and no process left in the project dir.
//!
//! `AGENTGATE_TEST_PROVIDERS=codex,cursor` limits the rows (debugging).

use std::any::Any;
use std::path::{Path, PathBuf};
use std::process::Command;

use futures_util::FutureExt;
use serde_json::{json, Value};

use crate::support::clis::npm_cli;
use crate::support::gemini::{GeminiStub, GEMINI_MODEL};
use crate::support::model_stub::FAIL_MESSAGE;
use crate::support::openai::{OpenAiStub, CODEX_MODEL, OPENCODE_MODEL};
use crate::util::{eventually, project_dir, TestServer, WsClient, WAIT};

/// Pinned CLI versions (the ones PROVIDER-CLIS.md was verified with).
const CODEX_VERSION: &str = "0.169.0";
const GEMINI_VERSION: &str = "0.61.0";
const OPENCODE_VERSION: &str = "1.18.33";

/// What a row needs to run its provider: gateway flag for the binary, env for the children,
/// and whatever must stay alive (the stand-in server) while the row runs.
struct Setup {
    bin_flag: &'static str,
    bin: PathBuf,
    env: Vec<(String, String)>,
    _keep: Box<dyn Any>,
}

struct Row {
    provider: &'static str,
    /// Prepares the CLI and its API stand-in; `home` is the children's (and gateway's) HOME.
    setup: fn(home: &Path) -> Setup,
    /// `options` of every `chat.send` (model; Gemini offers shell tools only in yolo mode).
    options: fn() -> Value,
}

const ROWS: &[Row] = &[
    Row {
        provider: "codex",
        setup: |home| {
            let api = OpenAiStub::start();
            Setup {
                bin_flag: "--codex-bin",
                bin: npm_cli("@openai/codex", CODEX_VERSION, "codex"),
                env: api.codex_env(home),
                _keep: Box::new(api),
            }
        },
        options: || json!({"model": CODEX_MODEL}),
    },
    Row {
        provider: "gemini",
        setup: |home| {
            let api = GeminiStub::start();
            Setup {
                bin_flag: "--gemini-bin",
                bin: npm_cli("@google/gemini-cli", GEMINI_VERSION, "gemini"),
                env: api.gemini_env(home),
                _keep: Box::new(api),
            }
        },
        options: || json!({"model": GEMINI_MODEL, "permissionMode": "bypassPermissions"}),
    },
    Row {
        provider: "opencode",
        setup: |_| {
            let api = OpenAiStub::start();
            Setup {
                bin_flag: "--opencode-bin",
                bin: npm_cli("opencode-ai", OPENCODE_VERSION, "opencode"),
                env: api.opencode_env(),
                _keep: Box::new(api),
            }
        },
        options: || json!({"model": OPENCODE_MODEL}),
    },
    Row {
        provider: "cursor",
        setup: |home| Setup {
            bin_flag: "--cursor-bin",
            bin: Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests/fixtures/cursor/fake-cursor-agent"),
            env: vec![(
                "CURSOR_FAKE_HOME".into(),
                home.join("cursor-chats").display().to_string(),
            )],
            _keep: Box::new(()),
        },
        options: || json!({}),
    },
];

/// The table: every row runs all checks; failures are collected so one broken provider does
/// not hide the others, and the test fails naming each.
#[actix_rt::test]
async fn every_provider_streams_runs_tools_resumes_fails_and_aborts_the_same_way() {
    let only = std::env::var("AGENTGATE_TEST_PROVIDERS").ok();
    let mut failures = Vec::new();
    for row in ROWS {
        if only
            .as_deref()
            .is_some_and(|o| !o.split(',').any(|p| p.trim() == row.provider))
        {
            continue;
        }
        let outcome = std::panic::AssertUnwindSafe(check_row(row))
            .catch_unwind()
            .await;
        if let Err(panic) = outcome {
            let msg = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            failures.push(format!("{}: {msg}", row.provider));
        }
    }
    assert!(
        failures.is_empty(),
        "providers failed:\n{}",
        failures.join("\n")
    );
}

async fn check_row(row: &Row) {
    let p = row.provider;
    let home = tempfile::tempdir().expect("home dir");
    let setup = (row.setup)(home.path());
    let server = TestServer::start_with(|cmd: &mut Command| {
        cmd.arg(setup.bin_flag)
            .arg(&setup.bin)
            .env("HOME", home.path());
        for var in [
            "XDG_CONFIG_HOME",
            "XDG_DATA_HOME",
            "XDG_CACHE_HOME",
            "XDG_STATE_HOME",
        ] {
            cmd.env_remove(var);
        }
        cmd.envs(setup.env.iter().map(|(k, v)| (k, v)));
    });
    let token = server.token("alice");
    let project = project_dir();
    let project_path = std::fs::canonicalize(project.path()).expect("project path");
    let _reaper = Reaper(project_path.clone());
    let session = server.create_session(&token, p, &project_path).await;
    let mut ws = server.ws(&format!("/ws?token={token}")).await;
    let options = (row.options)();

    // 1. A streamed answer; the native id is announced (never as a run event).
    let secret = format!("ZEBRA-{p}-42");
    let (events, gateway) = turn(
        &mut ws,
        &session,
        &format!("remember {secret} please"),
        &options,
    )
    .await;
    let text = streamed_text(&events);
    assert!(
        text.contains("pong: ") && text.contains(&secret),
        "{p}: streamed answer {text:?} in {events:?}"
    );
    assert_success(p, &events);
    assert_streams_closed(p, &events);
    let upserted = gateway
        .iter()
        .find(|g| g["kind"] == "session_upserted" && g["sessionId"] == session.as_str())
        .unwrap_or_else(|| panic!("{p}: no session_upserted: {gateway:?}"));
    let native = upserted["providerSessionId"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        !native.is_empty(),
        "{p}: no providerSessionId in {upserted}"
    );
    assert!(events
        .iter()
        .all(|e| e["kind"] != "session_created" && e["sessionId"] == session.as_str()));

    // 2. A command that really runs in the project dir, shown as tool_use + tool_result.
    let marker = format!("made-by-{p}");
    let (events, _) = turn(
        &mut ws,
        &session,
        &format!("RUNCMD: echo {marker} > made.txt; cat made.txt"),
        &options,
    )
    .await;
    assert_success(p, &events);
    let written = std::fs::read_to_string(project_path.join("made.txt")).unwrap_or_default();
    assert_eq!(
        written.trim(),
        marker,
        "{p}: made.txt in the project dir; events {events:?}"
    );
    let result = events
        .iter()
        .find(|e| {
            e["kind"] == "tool_result" && e["content"].as_str().is_some_and(|c| c.contains(&marker))
        })
        .unwrap_or_else(|| panic!("{p}: no tool_result with the output: {events:?}"));
    assert_eq!(result["isError"], false, "{p}: {result}");
    let tool_use = events
        .iter()
        .find(|e| e["kind"] == "tool_use" && e["toolId"] == result["toolId"])
        .unwrap_or_else(|| panic!("{p}: no tool_use for {}: {events:?}", result["toolId"]));
    assert!(
        tool_use["toolInput"].to_string().contains(&marker),
        "{p}: tool input {tool_use}"
    );
    assert!(
        streamed_text(&events).contains("ran: "),
        "{p}: answer after the tool: {events:?}"
    );

    // 3. Resume: the CLI resumes the native session, so the model sees the first turn.
    let (events, _) = turn(&mut ws, &session, "RECALL", &options).await;
    assert_success(p, &events);
    let text = streamed_text(&events);
    assert!(
        text.contains(&secret),
        "{p}: resumed turn did not carry the history: {text:?}"
    );

    // 4. An API failure ends the turn with the API's message and one failed complete.
    let (events, _) = turn(&mut ws, &session, "FAIL400 now", &options).await;
    let complete = events.last().expect("complete");
    assert_eq!(
        (complete["success"].clone(), complete["aborted"].clone()),
        (json!(false), json!(false)),
        "{p}: {complete}"
    );
    assert_ne!(complete["exitCode"], 0, "{p}: {complete}");
    assert!(
        of_kind(&events, "error").iter().any(|e| e["content"]
            .as_str()
            .is_some_and(|c| c.contains(FAIL_MESSAGE))),
        "{p}: no error event with the API message: {events:?}"
    );

    // 5. Abort while a command runs: one aborted complete, nothing left in the project dir.
    send(
        &mut ws,
        &session,
        "RUNCMD: echo started > started.txt; sleep 60",
        &options,
    )
    .await;
    let started = project_path.join("started.txt");
    eventually(&format!("{p}: the command started"), || started.exists()).await;
    ws.send_json(json!({"type": "chat.abort", "sessionId": session}))
        .await;
    let (events, _) = until_complete(&mut ws, &session).await;
    let complete = events.last().expect("complete");
    assert_eq!(
        (complete["aborted"].clone(), complete["success"].clone()),
        (json!(true), json!(false)),
        "{p}: {complete}"
    );
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let left = processes_in(&project_path);
        if left.is_empty() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{p}: processes left in the project dir after abort: {left:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    eprintln!("{p}: every check passed");
}

async fn send(ws: &mut WsClient, session: &str, content: &str, options: &Value) {
    ws.send_json(
        json!({"type": "chat.send", "sessionId": session, "content": content, "options": options}),
    )
    .await;
}

/// Sends a turn and returns its run events (up to and including `complete`) and the gateway
/// frames (e.g. `session_upserted`) seen meanwhile.
async fn turn(
    ws: &mut WsClient,
    session: &str,
    content: &str,
    options: &Value,
) -> (Vec<Value>, Vec<Value>) {
    send(ws, session, content, options).await;
    until_complete(ws, session).await
}

async fn until_complete(ws: &mut WsClient, session: &str) -> (Vec<Value>, Vec<Value>) {
    let (mut events, mut gateway) = (Vec::new(), Vec::new());
    loop {
        let v = ws.recv_json().await;
        if v["kind"] == "protocol_error" {
            panic!("protocol_error: {v}");
        }
        if v["sessionId"] != session || !v["seq"].is_u64() {
            gateway.push(v);
            continue;
        }
        let done = v["kind"] == "complete";
        events.push(v);
        if done {
            return (events, gateway);
        }
    }
}

fn of_kind<'a>(events: &'a [Value], kind: &str) -> Vec<&'a Value> {
    events.iter().filter(|e| e["kind"] == kind).collect()
}

fn streamed_text(events: &[Value]) -> String {
    of_kind(events, "stream_delta")
        .iter()
        .map(|e| e["content"].as_str().unwrap_or_default())
        .collect()
}

fn assert_success(p: &str, events: &[Value]) {
    assert_eq!(
        of_kind(events, "complete").len(),
        1,
        "{p}: one complete: {events:?}"
    );
    let complete = events.last().expect("complete");
    assert_eq!(
        (
            complete["exitCode"].clone(),
            complete["success"].clone(),
            complete["aborted"].clone()
        ),
        (json!(0), json!(true), json!(false)),
        "{p}: events {events:?}"
    );
}

/// Every `stream_delta` run is closed by a `stream_end` before the turn completes.
fn assert_streams_closed(p: &str, events: &[Value]) {
    let mut open = false;
    for e in events {
        match e["kind"].as_str() {
            Some("stream_delta") => open = true,
            Some("stream_end") => open = false,
            _ => {}
        }
    }
    assert!(!open, "{p}: stream not ended: {events:?}");
}

/// When a row ends (pass or fail), SIGKILLs what its turns left running in its own temp
/// project dir, so a failed abort check does not leave processes behind.
struct Reaper(PathBuf);

impl Drop for Reaper {
    fn drop(&mut self) {
        for entry in processes_in(&self.0) {
            if let Some(pid) = entry.split(' ').next().and_then(|p| p.parse::<i32>().ok()) {
                // SAFETY: kill has no memory-safety preconditions; the pid runs in this test's dir.
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                }
            }
        }
    }
}

/// Live processes whose working directory is `dir` (zombies do not count), as "pid (comm".
fn processes_in(dir: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .bytes()
                .all(|b| b.is_ascii_digit())
        })
        .filter(|e| std::fs::read_link(e.path().join("cwd")).is_ok_and(|cwd| cwd == dir))
        .filter_map(|e| {
            let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
            let state = stat.rsplit(')').next()?.trim_start().chars().next()?;
            (state != 'Z').then(|| {
                format!(
                    "{} {}",
                    e.file_name().to_string_lossy(),
                    stat.split(')').next().unwrap_or("")
                )
            })
        })
        .collect()
}
