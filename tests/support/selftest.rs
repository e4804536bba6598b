//! Proves the support module works end to end: the pinned real Claude Code CLI installs, starts
//! with a temp HOME and answers a plain text turn from the Anthropic stand-in.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tempfile::TempDir;

// The flags agentgate uses for Claude: the adapter's own list.
use agentgate_actors::provider::claude::STREAM_ARGS;

use super::anthropic::{AnthropicStub, Reply};
use super::clis::claude_bin;

/// Longest one CLI turn may take here (it takes ~1 s; the first run also installs the CLI,
/// which happens before this clock starts).
const TURN_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest the CLI may take to exit after stdin is closed (it takes ~50 ms).
const EXIT_TIMEOUT: Duration = Duration::from_secs(20);
/// How often we check whether the CLI has exited.
const EXIT_POLL: Duration = Duration::from_millis(20);

fn tempdir() -> TempDir {
    tempfile::tempdir().expect("create temp dir")
}

/// One real `claude` process in stream-json mode with stdin kept open.
struct ClaudeRun {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
    seen: Vec<Value>,
}

impl ClaudeRun {
    fn spawn(stub: &AnthropicStub, home: &Path, project: &Path, extra: &[&str]) -> ClaudeRun {
        let claude = claude_bin();
        let mut child = Command::new(&claude)
            .args(STREAM_ARGS)
            .args(extra)
            .current_dir(project)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .envs(stub.claude_env(home))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", claude.display()));
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().expect("stdout");
        // A reader thread turns the blocking pipe into a channel we can wait on with a deadline.
        let (tx, rx) = mpsc::channel::<String>();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        ClaudeRun {
            child,
            stdin,
            lines: rx,
            seen: Vec::new(),
        }
    }

    fn send(&mut self, v: Value) {
        let stdin = self.stdin.as_mut().expect("stdin still open");
        stdin
            .write_all(format!("{v}\n").as_bytes())
            .expect("write to claude stdin");
        stdin.flush().expect("flush claude stdin");
    }

    fn user(&mut self, text: &str) {
        self.send(
            json!({"type": "user", "message": {"role": "user", "content": text},
                         "parent_tool_use_id": null, "session_id": "default"}),
        );
    }

    /// Reads lines until one matches `pred` and returns it.
    fn until(&mut self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + TURN_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = match self.lines.recv_timeout(left) {
                Ok(line) => line,
                Err(e) => {
                    let _ = self.child.kill();
                    panic!("claude: no {what} ({e:?}); lines so far: {:#?}", self.seen);
                }
            };
            let v: Value = serde_json::from_str(&line)
                .unwrap_or_else(|e| panic!("claude printed a non-JSON line ({e}): {line}"));
            self.seen.push(v.clone());
            if pred(&v) {
                return v;
            }
        }
    }

    fn result(&mut self) -> Value {
        self.until("result line", |v| v["type"] == "result")
    }

    /// Closes stdin (which ends the CLI) and returns its exit code.
    fn close(mut self) -> i32 {
        drop(self.stdin.take());
        let deadline = Instant::now() + EXIT_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status.code().unwrap_or(-1);
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("claude did not exit within {EXIT_TIMEOUT:?} after stdin was closed");
            }
            std::thread::sleep(EXIT_POLL);
        }
    }
}

#[test]
fn real_claude_cli_answers_plain_text_through_the_stand_in() {
    let stub = AnthropicStub::start();
    let reply = Reply::numbered(50);
    let expected = reply.full_text();
    stub.push(reply);
    let (home, project) = (tempdir(), tempdir());

    let mut run = ClaudeRun::spawn(
        &stub,
        home.path(),
        project.path(),
        &["--model", "stub-model"],
    );
    run.user("hi");
    let result = run.result();
    assert_eq!(result["subtype"], "success", "result: {result}");
    assert_eq!(result["is_error"], false, "result: {result}");
    assert_eq!(result["result"], expected.as_str());
    let session_id = result["session_id"].as_str().expect("session_id");
    assert_eq!(run.seen[0]["type"], "system");
    assert_eq!(run.seen[0]["subtype"], "init");
    assert_eq!(run.seen[0]["session_id"], session_id);
    let streamed: String = run
        .seen
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
    assert_eq!(run.close(), 0, "exit code after a successful turn");
}

/// Answers the pending `can_use_tool` request and returns it.
fn answer_permission(run: &mut ClaudeRun, allow: bool) -> Value {
    let req = run.until("can_use_tool request", |v| {
        v["type"] == "control_request" && v["request"]["subtype"] == "can_use_tool"
    });
    let id = req["request_id"].clone();
    let response = if allow {
        json!({"behavior": "allow", "updatedInput": req["request"]["input"].clone()})
    } else {
        json!({"behavior": "deny", "message": "User denied tool use"})
    };
    run.send(json!({"type": "control_response",
                    "response": {"subtype": "success", "request_id": id, "response": response}}));
    req
}

#[test]
fn stand_in_tool_use_runs_in_project_dir_after_allow() {
    let stub = AnthropicStub::start();
    stub.push(Reply::bash("echo made > made.txt"));
    stub.push(Reply::text("created it"));
    let (home, project) = (tempdir(), tempdir());
    let mut run = ClaudeRun::spawn(&stub, home.path(), project.path(), &[]);
    run.user("make a file");
    let req = answer_permission(&mut run, true);
    assert_eq!(req["request"]["tool_name"], "Bash");
    let result = run.result();
    assert_eq!(result["result"], "created it");
    assert_eq!(
        std::fs::read_to_string(project.path().join("made.txt")).expect("made.txt"),
        "made\n"
    );
    let calls = stub.message_requests();
    assert_eq!(calls.len(), 2);
    let results = calls[1].tool_results();
    assert_eq!(results.len(), 1, "{results:?}");
    assert!(!results[0].2, "tool result is not an error");
    assert_eq!(run.close(), 0);
}

#[test]
fn stand_in_tool_use_denied() {
    let stub = AnthropicStub::start();
    stub.push(Reply::bash("echo made > made.txt"));
    let (home, project) = (tempdir(), tempdir());
    let mut run = ClaudeRun::spawn(&stub, home.path(), project.path(), &[]);
    run.user("make a file");
    answer_permission(&mut run, false);
    let result = run.result();
    assert_eq!(result["is_error"], false);
    assert!(!project.path().join("made.txt").exists());
    let calls = stub.message_requests();
    assert_eq!(calls[1].tool_results()[0].1, "User denied tool use");
    assert!(calls[1].tool_results()[0].2);
    run.close();
}

#[test]
fn stand_in_slow_stream_interrupt() {
    let stub = AnthropicStub::start();
    stub.push(Reply::numbered(3000).with_delay(Duration::from_millis(20)));
    let (home, project) = (tempdir(), tempdir());
    let mut run = ClaudeRun::spawn(&stub, home.path(), project.path(), &[]);
    run.user("slow please");
    run.until("a text delta", |v| {
        v["event"]["delta"]["type"] == "text_delta"
    });
    run.send(json!({"type": "control_request", "request_id": "int-1", "request": {"subtype": "interrupt"}}));
    let ack = run.until("interrupt ack", |v| v["type"] == "control_response");
    assert_eq!(ack["response"]["request_id"], "int-1");
    let result = run.result();
    assert_eq!(result["subtype"], "error_during_execution");
    assert_eq!(result["terminal_reason"], "aborted_streaming");
    stub.wait_for_aborted_streams(1, Duration::from_secs(10));
    assert_eq!(run.close(), 1);
}

#[test]
fn stand_in_many_deltas_and_resume_history() {
    let stub = AnthropicStub::start();
    let reply = Reply::numbered(3000);
    let expected = reply.full_text();
    stub.push(reply);
    let (home, project) = (tempdir(), tempdir());
    let mut run = ClaudeRun::spawn(&stub, home.path(), project.path(), &[]);
    run.user("first question");
    let result = run.result();
    assert_eq!(result["result"], expected.as_str());
    let session = result["session_id"].as_str().expect("sid").to_string();
    assert_eq!(run.close(), 0);

    stub.push(Reply::text("second answer"));
    let resume = format!("--resume={session}");
    let mut run = ClaudeRun::spawn(&stub, home.path(), project.path(), &[&resume]);
    run.user("second question");
    let result = run.result();
    assert_eq!(result["result"], "second answer");
    assert_eq!(result["session_id"], session.as_str());
    let calls = stub.wait_for_requests(2, Duration::from_secs(5));
    assert!(calls[1].contains_text("first question"));
    assert!(calls[1].contains_text("w2999 "));
    assert_eq!(
        calls[1].last_user_text().as_deref(),
        Some("second question")
    );
    assert_eq!(run.close(), 0);
}

#[test]
fn stand_in_http_error_and_sse_error() {
    let stub = AnthropicStub::start();
    stub.push(Reply::http_error(529, "stub overloaded"));
    stub.push(Reply::sse_error("mid-stream failure"));
    stub.push(Reply::text("fallback answer"));
    let (home, project) = (tempdir(), tempdir());
    let mut run = ClaudeRun::spawn(&stub, home.path(), project.path(), &[]);
    run.user("one");
    let result = run.result();
    assert_eq!(result["is_error"], true, "{result}");
    assert_eq!(result["api_error_status"], 529);
    run.user("two");
    let result = run.result();
    assert_eq!(result["is_error"], false, "{result}");
    assert_eq!(result["result"], "fallback answer");
    let calls = stub.message_requests();
    assert_eq!(calls.len(), 3);
    assert!(
        !calls[2].is_stream(),
        "fallback after an SSE error is non-streaming"
    );
    assert_eq!(run.close(), 0);
}
