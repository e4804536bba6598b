//! Proves the support module works end to end: the pinned real Claude Code CLI installs, starts
//! with a temp HOME and answers a plain text turn from the Anthropic stand-in.

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::anthropic::{AnthropicStub, Reply};
use super::clis::claude_bin;

/// Longest one CLI turn may take here (it takes ~1 s; the first run also installs the CLI,
/// which happens before this clock starts).
const TURN_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest the CLI may take to exit after stdin is closed (it takes ~50 ms).
const EXIT_TIMEOUT: Duration = Duration::from_secs(20);

#[test]
fn real_claude_cli_answers_plain_text_through_the_stand_in() {
    let claude = claude_bin();
    let stub = AnthropicStub::start();
    let reply = Reply::numbered(50);
    let expected = reply.full_text();
    stub.push(reply);

    let home = tempfile::tempdir().expect("temp HOME");
    let project = tempfile::tempdir().expect("temp project dir");
    let mut child = Command::new(&claude)
        .args([
            "-p",
            "--input-format",
            "stream-json",
            "--output-format",
            "stream-json",
            "--verbose",
            "--include-partial-messages",
            "--permission-prompt-tool",
            "stdio",
            "--model",
            "stub-model",
        ])
        .current_dir(project.path())
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .envs(stub.claude_env(home.path()))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {}: {e}", claude.display()));

    let mut stdin = child.stdin.take().expect("stdin");
    stdin
        .write_all(
            b"{\"type\":\"user\",\"message\":{\"role\":\"user\",\"content\":\"hi\"},\"parent_tool_use_id\":null,\"session_id\":\"default\"}\n",
        )
        .expect("write user turn");
    stdin.flush().expect("flush");

    // A reader thread turns the blocking pipe into a channel we can wait on with a deadline.
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });

    let deadline = Instant::now() + TURN_TIMEOUT;
    let mut lines: Vec<Value> = Vec::new();
    let result = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = match rx.recv_timeout(left) {
            Ok(line) => line,
            Err(e) => {
                let _ = child.kill();
                panic!("no result line from claude ({e:?}); lines so far: {lines:#?}");
            }
        };
        let v: Value = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("claude printed a non-JSON line ({e}): {line}"));
        let is_result = v["type"] == "result";
        lines.push(v.clone());
        if is_result {
            break v;
        }
    };

    assert_eq!(result["subtype"], "success", "result: {result}");
    assert_eq!(result["is_error"], false, "result: {result}");
    assert_eq!(result["result"], expected.as_str());
    let session_id = result["session_id"].as_str().expect("session_id");
    assert_eq!(lines[0]["type"], "system");
    assert_eq!(lines[0]["subtype"], "init");
    assert_eq!(lines[0]["session_id"], session_id);
    let streamed: String = lines
        .iter()
        .filter(|l| l["type"] == "stream_event" && l["event"]["delta"]["type"] == "text_delta")
        .filter_map(|l| l["event"]["delta"]["text"].as_str())
        .collect();
    assert_eq!(streamed, expected, "text deltas joined");

    let calls = stub.message_requests();
    assert_eq!(calls.len(), 1, "one model call for a plain text turn");
    assert!(calls[0].is_stream());
    assert_eq!(calls[0].model(), Some("stub-model"));
    assert_eq!(calls[0].last_user_text().as_deref(), Some("hi"));
    assert_eq!(calls[0].header("x-api-key"), Some("test"));

    // stdin EOF ends the CLI.
    drop(stdin);
    let exit_deadline = Instant::now() + EXIT_TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if Instant::now() > exit_deadline {
            let _ = child.kill();
            panic!("claude did not exit within {EXIT_TIMEOUT:?} after stdin was closed");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "claude exit status {status}");
}
