//! End to end with the REAL Claude Code CLI (installed from npm on first
//! use, see support::clis) against the local Anthropic stand-in
//! (support::anthropic), through a real gateway and real WebSockets.

use std::time::Duration;

use serde_json::json;

use crate::chat::{next_event, of_kind, send, streamed_text, until_complete};
use crate::support::anthropic::{AnthropicStub, Reply};
use crate::support::clis::claude_bin;
use crate::util::{children_of, eventually, pid_alive, project_dir, TestServer, WsClient};

struct Setup {
    stub: AnthropicStub,
    _home: tempfile::TempDir,
    server: TestServer,
}

fn setup() -> Setup {
    let bin = claude_bin();
    let stub = AnthropicStub::start();
    let home = tempfile::tempdir().expect("home");
    let env = stub.claude_env(home.path());
    let server = TestServer::start_with(|cmd| {
        cmd.arg("--claude-bin").arg(&bin);
        for (k, v) in env {
            cmd.env(k, v);
        }
    });
    Setup {
        stub,
        _home: home,
        server,
    }
}

/// A claude session of user alice with a chat socket.
struct Open {
    token: String,
    project: tempfile::TempDir,
    session: String,
    ws: WsClient,
}

impl Setup {
    async fn open(&self) -> Open {
        let token = self.server.token("alice");
        let project = project_dir();
        let session = self
            .server
            .create_session(&token, "claude", project.path())
            .await;
        let ws = self.server.ws(&format!("/ws?token={token}")).await;
        Open {
            token,
            project,
            session,
            ws,
        }
    }
}

/// A streamed answer arrives live as deltas; resume carries the history.
#[actix_rt::test]
async fn streamed_answer_and_resume_with_history() {
    let s = setup();
    let Open {
        token: _,
        project: _project,
        session,
        mut ws,
    } = s.open().await;
    let first = Reply::numbered(40);
    s.stub.push(first.clone());
    send(&mut ws, &session, "first question").await;
    let events = until_complete(&mut ws, &session).await;
    assert_eq!(streamed_text(&events), first.full_text());
    assert_eq!(of_kind(&events, "stream_delta").len(), 40);
    assert!(!of_kind(&events, "stream_end").is_empty());
    let complete = events.last().unwrap();
    assert_eq!(
        (complete["success"].clone(), complete["exitCode"].clone()),
        (json!(true), json!(0))
    );

    s.stub.push(Reply::text("second answer"));
    send(&mut ws, &session, "second question").await;
    let events = until_complete(&mut ws, &session).await;
    assert_eq!(streamed_text(&events), "second answer");
    let requests = s.stub.message_requests();
    let last = requests.last().expect("a second model call");
    assert!(
        last.contains_text("first question"),
        "resume lost the first turn"
    );
    assert!(
        last.contains_text(&first.full_text()),
        "resume lost the first answer"
    );
    assert_eq!(last.last_user_text().as_deref(), Some("second question"));
}

/// 3,000 deltas arrive whole and in order.
#[actix_rt::test]
async fn three_thousand_deltas_arrive_whole_and_in_order() {
    let s = setup();
    let Open {
        token: _,
        project: _project,
        session,
        mut ws,
    } = s.open().await;
    let reply = Reply::numbered(3000);
    s.stub.push(reply.clone());
    send(&mut ws, &session, "count").await;
    let events = until_complete(&mut ws, &session).await;
    assert_eq!(streamed_text(&events), reply.full_text());
    let seqs: Vec<u64> = events.iter().filter_map(|e| e["seq"].as_u64()).collect();
    assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1));
}

/// Abort mid-stream: one complete {aborted}, the CLI is gone, the API stream
/// was closed; a second socket subscribing mid-run got ack, replay, live.
#[actix_rt::test]
async fn abort_mid_stream_and_subscribe_mid_run() {
    let s = setup();
    let Open {
        token,
        project: _project,
        session,
        mut ws,
    } = s.open().await;
    s.stub
        .push(Reply::numbered(400).with_delay(Duration::from_millis(30)));
    send(&mut ws, &session, "talk slowly").await;
    let mut mine = Vec::new();
    while of_kind(&mine, "stream_delta").len() < 5 {
        mine.push(next_event(&mut ws).await);
    }
    let last_seq = mine[1]["seq"].as_u64().unwrap();
    let mut other = s.server.ws(&format!("/ws?token={token}")).await;
    other.send_json(json!({"type":"chat.subscribe","sessions":[{"sessionId": session, "lastSeq": last_seq}]})).await;
    let ack = other.recv_json().await;
    assert_eq!(
        (ack["kind"].clone(), ack["isProcessing"].clone()),
        (json!("chat_subscribed"), json!(true))
    );
    let replayed = next_event(&mut other).await;
    assert_eq!(replayed["seq"].as_u64(), Some(last_seq + 1));

    let cli_pids = children_of(s.server.pid());
    assert!(!cli_pids.is_empty());
    ws.send_json(json!({"type":"chat.abort","sessionId": session}))
        .await;
    let events = until_complete(&mut ws, &session).await;
    let complete = events.last().unwrap();
    assert_eq!(
        (complete["aborted"].clone(), complete["success"].clone()),
        (json!(true), json!(false))
    );
    let theirs = until_complete(&mut other, &session).await;
    assert_eq!(theirs.last().unwrap()["seq"], complete["seq"]);
    for pid in cli_pids {
        eventually("claude gone after abort", || !pid_alive(pid)).await;
    }
    s.stub.wait_for_aborted_streams(1, Duration::from_secs(20));
    let (late, _) = ws.frames_before_probe(&session).await;
    assert!(
        late.is_empty(),
        "a second complete or late event arrived: {late:?}"
    );
}

/// Permission allow: the tool really runs in the project dir; pending
/// requests are listed on subscribe. Deny: it does not run.
#[actix_rt::test]
async fn permission_allow_and_deny() {
    let s = setup();
    let Open {
        token,
        project,
        session,
        mut ws,
    } = s.open().await;

    s.stub.push(Reply::bash("echo made > made.txt"));
    s.stub.push(Reply::text("created it"));
    send(&mut ws, &session, "make a file").await;
    let (req, _) = ws.recv_until_kind("permission_request").await;
    assert_eq!(req["toolName"], "Bash");
    assert_eq!(req["input"]["command"], "echo made > made.txt");
    let mut other = s.server.ws(&format!("/ws?token={token}")).await;
    other
        .send_json(json!({"type":"chat.subscribe","sessions":[{"sessionId": session}]}))
        .await;
    let ack = other.recv_json().await;
    assert_eq!(ack["pendingPermissions"][0]["requestId"], req["requestId"]);
    ws.send_json(
        json!({"type":"chat.permission-response","requestId": req["requestId"], "allow": true}),
    )
    .await;
    let events = until_complete(&mut ws, &session).await;
    assert_eq!(events.last().unwrap()["success"], true);
    assert_eq!(
        std::fs::read_to_string(project.path().join("made.txt"))
            .unwrap()
            .trim(),
        "made"
    );
    let results = of_kind(&events, "tool_result");
    assert_eq!(results[0]["isError"], false);

    s.stub.push(Reply::bash("echo nope > denied.txt"));
    s.stub.push(Reply::text("ok, not doing it"));
    send(&mut ws, &session, "make another").await;
    let (req, _) = ws.recv_until_kind("permission_request").await;
    ws.send_json(json!({"type":"chat.permission-response","requestId": req["requestId"], "allow": false, "message": "not today"})).await;
    let events = until_complete(&mut ws, &session).await;
    assert!(!project.path().join("denied.txt").exists());
    let results = of_kind(&events, "tool_result");
    assert_eq!(results[0]["isError"], true);
    assert!(
        results[0]["content"]
            .as_str()
            .unwrap()
            .contains("not today"),
        "{}",
        results[0]
    );
}

/// The CLI killed with SIGKILL mid-run: one failed complete; the session runs again.
#[actix_rt::test]
async fn cli_killed_mid_run_then_session_runs_again() {
    let s = setup();
    let Open {
        token: _,
        project: _project,
        session,
        mut ws,
    } = s.open().await;
    s.stub
        .push(Reply::numbered(400).with_delay(Duration::from_millis(30)));
    send(&mut ws, &session, "talk slowly").await;
    let first = next_event(&mut ws).await;
    assert_eq!(first["kind"], "stream_delta");
    for pid in children_of(s.server.pid()) {
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    let events = until_complete(&mut ws, &session).await;
    assert_eq!(of_kind(&events, "complete").len(), 1);
    assert_eq!(events.last().unwrap()["success"], false);
    assert_eq!(of_kind(&events, "error").len(), 1);

    s.stub.push(Reply::text("back again"));
    send(&mut ws, &session, "still there?").await;
    let events = until_complete(&mut ws, &session).await;
    assert_eq!(streamed_text(&events), "back again", "{events:#?}");
    assert_eq!(events.last().unwrap()["success"], true);
}

/// Two sessions stream at once and stay isolated; an API error ends in one failed complete.
#[actix_rt::test]
async fn two_sessions_at_once_and_api_error() {
    let s = setup();
    let token = s.server.token("alice");
    let (pa, pb) = (project_dir(), project_dir());
    let a = s.server.create_session(&token, "claude", pa.path()).await;
    let b = s.server.create_session(&token, "claude", pb.path()).await;
    let mut wa = s.server.ws(&format!("/ws?token={token}")).await;
    let mut wb = s.server.ws(&format!("/ws?token={token}")).await;
    let reply = Reply::numbered(300).with_delay(Duration::from_millis(2));
    s.stub.set_default(reply.clone());
    send(&mut wa, &a, "one").await;
    send(&mut wb, &b, "two").await;
    let ea = until_complete(&mut wa, &a).await;
    let eb = until_complete(&mut wb, &b).await;
    assert_eq!(streamed_text(&ea), reply.full_text());
    assert_eq!(streamed_text(&eb), reply.full_text());
    assert!(ea.iter().all(|e| e["sessionId"] == a.as_str()));
    assert!(eb.iter().all(|e| e["sessionId"] == b.as_str()));

    s.stub
        .set_default(Reply::http_error(500, "stand-in internal error"));
    send(&mut wa, &a, "fail please").await;
    let events = until_complete(&mut wa, &a).await;
    let complete = events.last().unwrap();
    assert_eq!(
        (complete["success"].clone(), complete["exitCode"].clone()),
        (json!(false), json!(1))
    );
    let errors = of_kind(&events, "error");
    assert!(
        errors
            .iter()
            .any(|e| e["content"].as_str().unwrap_or_default().contains("500")),
        "{errors:?}"
    );
}

/// `rememberEntry` is handed to the real CLI as its own `addRules`
/// permission update, and the CLI's rule matching decides: after
/// remembering `Bash(git log:*)`, `git log -1; touch pwned` is still asked
/// (the gateway auto-approved it by prefix before) and, denied, creates
/// nothing. That the update reaches the CLI at all: after remembering
/// `Bash(touch:*)`, the next `touch` of the run is not asked.
#[actix_rt::test]
async fn a_remembered_rule_is_enforced_by_the_cli() {
    let s = setup();
    let Open {
        token: _,
        project,
        session,
        mut ws,
    } = s.open().await;
    let answer = |req: &serde_json::Value, allow: bool, remember: &str| {
        json!({"type": "chat.permission-response", "requestId": req["requestId"],
            "allow": allow, "rememberEntry": remember, "message": "not that"})
    };
    // The redirect makes the CLI ask even for a read-only git log.
    s.stub.push(Reply::bash("git log -1 > first.txt"));
    s.stub.push(Reply::bash("git log -1; touch pwned"));
    s.stub.push(Reply::text("done"));
    send(&mut ws, &session, "look at the history").await;
    let (req, _) = ws.recv_until_kind("permission_request").await;
    assert_eq!(req["input"]["command"], "git log -1 > first.txt", "{req}");
    ws.send_json(answer(&req, true, "Bash(git log:*)")).await;
    let (req, _) = ws.recv_until_kind("permission_request").await;
    assert_eq!(req["input"]["command"], "git log -1; touch pwned", "{req}");
    ws.send_json(answer(&req, false, "")).await;
    let events = until_complete(&mut ws, &session).await;
    assert_eq!(events.last().unwrap()["success"], true, "{events:?}");
    assert!(
        project.path().join("first.txt").exists(),
        "the allowed call did not run"
    );
    assert!(
        !project.path().join("pwned").exists(),
        "the compound command ran"
    );

    s.stub.push(Reply::bash("touch a.txt"));
    s.stub.push(Reply::bash("touch b.txt"));
    s.stub.push(Reply::text("done"));
    send(&mut ws, &session, "make two files").await;
    let (req, _) = ws.recv_until_kind("permission_request").await;
    assert_eq!(req["input"]["command"], "touch a.txt", "{req}");
    ws.send_json(answer(&req, true, "Bash(touch:*)")).await;
    let events = until_complete(&mut ws, &session).await;
    assert!(
        of_kind(&events, "permission_request").is_empty(),
        "the remembered rule did not reach the CLI: {events:?}"
    );
    assert!(
        project.path().join("b.txt").exists(),
        "the second touch did not run"
    );
}
