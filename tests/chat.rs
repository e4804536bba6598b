//! The `/ws` chat protocol at the wire level, with the scripted stand-in
//! CLI (`fake_claude`, see examples/fake_claude.rs) as the provider: the
//! reference registry's own test cases, plus crashes, hangs, garbage,
//! fan-out, replay, permissions and idempotent sends.

use serde_json::{json, Value};

use crate::util::{
    children_of, eventually, example_bin, peak_rss_kib, pid_alive, project_dir, TestServer,
    WsClient,
};

fn fake_server() -> TestServer {
    fake_server_with(|_| {})
}

fn fake_server_with(f: impl FnOnce(&mut std::process::Command)) -> TestServer {
    TestServer::start_with(|cmd| {
        cmd.arg("--claude-bin").arg(example_bin("fake_claude"));
        f(cmd);
    })
}

struct Chat {
    token: String,
    session: String,
    ws: WsClient,
    project: tempfile::TempDir,
}

async fn chat(server: &TestServer, user: &str) -> Chat {
    let token = server.token(user);
    let project = project_dir();
    let session = server
        .create_session(&token, "claude", project.path())
        .await;
    let ws = server.ws(&format!("/ws?token={token}")).await;
    Chat {
        token,
        session,
        ws,
        project,
    }
}

pub async fn send(ws: &mut WsClient, session: &str, content: &str) {
    ws.send_json(json!({"type": "chat.send", "sessionId": session, "content": content}))
        .await;
}

/// The next run event (gateway kinds without a seq, like `session_upserted`, are skipped).
pub async fn next_event(ws: &mut WsClient) -> Value {
    loop {
        let v = ws.recv_json().await;
        if v["seq"].is_u64() || v["kind"] == "protocol_error" {
            return v;
        }
    }
}

/// Run events of the session up to and including its `complete` (other
/// sessions' frames and gateway kinds are kept out).
pub async fn until_complete(ws: &mut WsClient, session: &str) -> Vec<Value> {
    let mut events = Vec::new();
    loop {
        let v = ws.recv_json().await;
        if v["sessionId"] != session || !v["seq"].is_u64() {
            continue;
        }
        let done = v["kind"] == "complete";
        events.push(v);
        if done {
            return events;
        }
    }
}

pub fn of_kind<'a>(events: &'a [Value], kind: &str) -> Vec<&'a Value> {
    events.iter().filter(|e| e["kind"] == kind).collect()
}

pub fn seqs(events: &[Value]) -> Vec<u64> {
    events.iter().filter_map(|e| e["seq"].as_u64()).collect()
}

pub fn streamed_text(events: &[Value]) -> String {
    of_kind(events, "stream_delta")
        .iter()
        .map(|e| e["content"].as_str().unwrap_or_default())
        .collect()
}

/// Events carry the app id, a run id and contiguous seqs; the native id is
/// swallowed into `session_upserted` and used to resume; seq continues across runs.
#[actix_rt::test]
async fn events_are_sequenced_under_the_app_id_and_resume_uses_the_native_id() {
    let server = fake_server();
    let mut c = chat(&server, "alice").await;
    send(&mut c.ws, &c.session, "text:5 session:native-123").await;
    let mut first = Vec::new();
    let mut upserted = None;
    loop {
        let v = c.ws.recv_json().await;
        if v["kind"] == "session_upserted" {
            upserted = Some(v);
            continue;
        }
        let done = v["kind"] == "complete";
        first.push(v);
        if done {
            break;
        }
    }
    let upserted = upserted.expect("session_upserted");
    assert_eq!(upserted["sessionId"], c.session);
    assert_eq!(upserted["providerSessionId"], "native-123");
    assert_eq!(upserted["provider"], "claude");
    assert!(first.iter().all(|e| e["kind"] != "session_created"));
    assert!(first.iter().all(|e| e["sessionId"] == c.session));
    let run_id = first[0]["runId"].as_str().unwrap().to_string();
    assert!(first.iter().all(|e| e["runId"] == run_id.as_str()));
    let s = seqs(&first);
    assert_eq!(s, (1..=s.len() as u64).collect::<Vec<_>>());
    assert_eq!(of_kind(&first, "stream_delta").len(), 5);
    let complete = first.last().unwrap();
    assert_eq!(complete["actualSessionId"], c.session);
    assert_eq!(
        (
            complete["exitCode"].clone(),
            complete["success"].clone(),
            complete["aborted"].clone()
        ),
        (json!(0), json!(true), json!(false))
    );
    // Streamed text is not repeated as a `text` event.
    assert!(of_kind(&first, "text").is_empty());

    // The second send resumes with the captured native id and continues seq.
    send(&mut c.ws, &c.session, "args text:2").await;
    let second = until_complete(&mut c.ws, &c.session).await;
    assert!(
        streamed_text(&second).contains("--resume=native-123"),
        "{second:?}"
    );
    assert_eq!(seqs(&second)[0], s.last().unwrap() + 1);
    assert_ne!(second[0]["runId"], run_id.as_str());

    // seq is persisted (in the background, right after the complete): visible over REST.
    let path = format!("/api/providers/sessions/{}", c.session);
    let last = seqs(&second).last().copied();
    let mut persisted = None;
    for _ in 0..200 {
        persisted = server.get(&path, Some(&c.token)).await.1["data"]["lastSeq"].as_u64();
        if persisted == last {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(persisted, last);
}

/// The text a run of `prompt` streams, and its events: the fake CLI's
/// reports on its own process (`sched`, `pipe`).
async fn streamed_by(prompt: &str) -> (String, Vec<Value>) {
    let server = fake_server();
    let mut c = chat(&server, "alice").await;
    send(&mut c.ws, &c.session, prompt).await;
    let events = until_complete(&mut c.ws, &c.session).await;
    (streamed_text(&events), events)
}

/// Agent CLIs run as batch tasks (README, "Agent CLIs and the scheduler"):
/// the CLI, asked for its own scheduling policy, reports SCHED_BATCH.
#[actix_rt::test]
async fn agent_clis_run_under_sched_batch() {
    let (text, events) = streamed_by("sched text:1").await;
    assert_eq!(
        text,
        format!("sched_policy={}", libc::SCHED_BATCH),
        "{events:?}"
    );
}

/// The CLI's stdout pipe holds 256 KiB (README, "Every queue is bounded"),
/// not Linux's default 64 KiB: the CLI measures it on its own stdout.
#[actix_rt::test]
async fn agent_cli_stdout_is_a_256_kib_pipe() {
    let (text, events) = streamed_by("pipe text:1").await;
    assert_eq!(text, "stdout_pipe=262144", "{events:?}");
}

/// A duplicate `result` yields one `complete`; a second send while running is
/// refused, and allowed again after completion.
#[actix_rt::test]
async fn one_complete_per_run_and_run_in_progress() {
    let server = fake_server();
    let mut c = chat(&server, "alice").await;
    send(&mut c.ws, &c.session, "text:3 double_result").await;
    let events = until_complete(&mut c.ws, &c.session).await;
    assert_eq!(of_kind(&events, "complete").len(), 1);

    send(&mut c.ws, &c.session, "text:50 delay_ms:40").await;
    let first = next_event(&mut c.ws).await;
    assert_eq!(first["sessionId"], c.session);
    send(&mut c.ws, &c.session, "text:1").await;
    let mut refused = None;
    let mut events = vec![first];
    loop {
        let v = c.ws.recv_json().await;
        if v["kind"] == "protocol_error" {
            refused = Some(v);
            continue;
        }
        let done = v["kind"] == "complete";
        events.push(v);
        if done {
            break;
        }
    }
    let refused = refused.expect("RUN_IN_PROGRESS");
    assert_eq!(refused["code"], "RUN_IN_PROGRESS");
    assert_eq!(refused["sessionId"], c.session);
    // The refused send did not disturb the running one.
    assert_eq!(of_kind(&events, "stream_delta").len(), 50);
    // Allowed again after completion. Events from before are not repeated.
    send(&mut c.ws, &c.session, "text:1").await;
    let again = until_complete(&mut c.ws, &c.session).await;
    assert_eq!(again.last().unwrap()["success"], true);
    // Duplicate results never leaked a second complete afterwards either.
    let (late, _) = c.ws.frames_before_probe(&c.session).await;
    assert!(late.is_empty(), "{late:?}");
}

/// Abort: one `complete {aborted:true}` at once, the process is gone, a late
/// result from the CLI is dropped; the running list follows.
#[actix_rt::test]
async fn abort_completes_once_and_kills_the_process() {
    let server = fake_server();
    let mut c = chat(&server, "alice").await;
    let (_, list) = server
        .get("/api/providers/sessions/running", Some(&c.token))
        .await;
    assert_eq!(list["data"]["sessions"], json!([]));
    c.ws.send_json(json!({"type":"chat.abort","sessionId": c.session}))
        .await;
    let v = c.ws.recv_json().await;
    assert_eq!(v["code"], "NO_ACTIVE_RUN");

    send(&mut c.ws, &c.session, "text:1000 delay_ms:20").await;
    let first = next_event(&mut c.ws).await;
    assert_eq!(first["kind"], "stream_delta");
    let (_, list) = server
        .get("/api/providers/sessions/running", Some(&c.token))
        .await;
    let running = list["data"]["sessions"].as_array().unwrap().clone();
    assert_eq!(running.len(), 1);
    assert_eq!(running[0]["sessionId"], c.session);
    assert_eq!(running[0]["provider"], "claude");
    assert!(running[0]["startedAt"].is_string());
    let pids = children_of(server.pid());
    assert!(!pids.is_empty(), "provider process not found");

    c.ws.send_json(json!({"type":"chat.abort","sessionId": c.session}))
        .await;
    let events = until_complete(&mut c.ws, &c.session).await;
    let complete = events.last().unwrap();
    assert_eq!(
        (complete["aborted"].clone(), complete["success"].clone()),
        (json!(true), json!(false))
    );
    for pid in pids {
        eventually("provider process gone after abort", || !pid_alive(pid)).await;
    }
    // The CLI's own late result (error_during_execution) was dropped: no second complete.
    let (late, _) = c.ws.frames_before_probe(&c.session).await;
    assert!(late.is_empty(), "{late:?}");
    let (_, list) = server
        .get("/api/providers/sessions/running", Some(&c.token))
        .await;
    assert_eq!(list["data"]["sessions"], json!([]));
}

/// A CLI that ignores the interrupt and stdin EOF is killed (TERM, then KILL);
/// its late exit never completes the session's next run.
#[actix_rt::test]
async fn stale_exit_of_an_aborted_run_never_completes_the_next_run() {
    let server = fake_server();
    let mut c = chat(&server, "alice").await;
    send(&mut c.ws, &c.session, "text:4 hang").await;
    let _ = c.ws.recv_json().await;
    let pids = children_of(server.pid());
    c.ws.send_json(json!({"type":"chat.abort","sessionId": c.session}))
        .await;
    until_complete(&mut c.ws, &c.session).await;
    // The next run streams for ~6 s, across the old process's kill (~2-4 s after the abort).
    send(&mut c.ws, &c.session, "text:60 delay_ms:100").await;
    let events = until_complete(&mut c.ws, &c.session).await;
    assert_eq!(
        of_kind(&events, "stream_delta").len(),
        60,
        "next run was cut short: {:?}",
        events.last()
    );
    assert_eq!(events.last().unwrap()["success"], true);
    for pid in pids {
        eventually("hung provider killed", || !pid_alive(pid)).await;
    }
}

/// SIGKILL mid-run: an error event and one failed complete; the session runs again.
/// A CLI that writes 128 MiB to stderr as one line, then a line that is
/// not UTF-8, then one more line, and exits without a result: the gateway
/// reads its stderr to the end (the failure names the last lines, the
/// invalid bytes replaced) with at most a bounded line in memory.
#[actix_rt::test]
async fn stderr_is_read_to_the_end_in_bounded_lines() {
    let server = fake_server();
    let mut c = chat(&server, "alice").await;
    let peak_before = peak_rss_kib(server.pid());
    send(&mut c.ws, &c.session, "text:2 stderr_flood:128 exit:3").await;
    let events = until_complete(&mut c.ws, &c.session).await;
    assert_eq!(events.last().unwrap()["exitCode"], 3);
    let errors = of_kind(&events, "error");
    let message = errors[0]["content"].as_str().unwrap();
    assert!(message.contains("flood over"), "{message}");
    assert!(message.contains("bad \u{FFFD}\u{FFFD} bytes"), "{message}");
    assert!(
        message.len() < 8 * 1024,
        "{} bytes of stderr quoted",
        message.len()
    );
    // The whole line would be 128 MiB (a String doubling to 256 MiB).
    let grown_mib = peak_rss_kib(server.pid()).saturating_sub(peak_before) / 1024;
    assert!(grown_mib < 32, "gateway peak RSS grew by {grown_mib} MiB");
}

#[actix_rt::test]
async fn crashed_provider_gives_one_failed_complete_and_session_recovers() {
    let server = fake_server();
    let mut c = chat(&server, "alice").await;
    send(&mut c.ws, &c.session, "text:10 crash").await;
    let events = until_complete(&mut c.ws, &c.session).await;
    let complete = events.last().unwrap();
    assert_eq!(complete["success"], false);
    assert_ne!(complete["exitCode"], 0);
    let errors = of_kind(&events, "error");
    assert_eq!(errors.len(), 1);
    assert!(
        errors[0]["content"].as_str().unwrap().contains("signal 9"),
        "{}",
        errors[0]
    );
    send(&mut c.ws, &c.session, "text:2").await;
    assert_eq!(
        until_complete(&mut c.ws, &c.session).await.last().unwrap()["success"],
        true
    );
    // An exit code without a result, garbage lines and an error result.
    send(&mut c.ws, &c.session, "text:4 exit:3 stderr:boom").await;
    let events = until_complete(&mut c.ws, &c.session).await;
    assert_eq!(events.last().unwrap()["exitCode"], 3);
    assert!(of_kind(&events, "error")[0]["content"]
        .as_str()
        .unwrap()
        .contains("boom"));
    send(&mut c.ws, &c.session, "text:6 garbage").await;
    let events = until_complete(&mut c.ws, &c.session).await;
    assert_eq!(of_kind(&events, "stream_delta").len(), 6);
    assert_eq!(events.last().unwrap()["success"], true);
    send(&mut c.ws, &c.session, "text:1 error_result").await;
    let events = until_complete(&mut c.ws, &c.session).await;
    assert_eq!(of_kind(&events, "error").len(), 1);
    assert_eq!(
        (
            events.last().unwrap()["success"].clone(),
            events.last().unwrap()["exitCode"].clone()
        ),
        (json!(false), json!(1))
    );
}

/// A missing binary: a readable error and one failed complete.
#[actix_rt::test]
async fn missing_binary_is_a_readable_error() {
    let server = TestServer::start_with(|cmd| {
        cmd.arg("--claude-bin").arg("/nonexistent/claude");
    });
    let mut c = chat(&server, "alice").await;
    send(&mut c.ws, &c.session, "hello").await;
    let events = until_complete(&mut c.ws, &c.session).await;
    let errors = of_kind(&events, "error");
    assert_eq!(errors.len(), 1);
    assert!(
        errors[0]["content"]
            .as_str()
            .unwrap()
            .contains("not installed"),
        "{}",
        errors[0]
    );
    assert_eq!(events.last().unwrap()["success"], false);
}

/// A second socket subscribing mid-run gets `chat_subscribed` first, then
/// exactly the events after its lastSeq, then live ones; the first socket keeps streaming.
#[actix_rt::test]
async fn subscribe_mid_run_replays_after_last_seq_then_live() {
    let server = fake_server();
    let mut c = chat(&server, "alice").await;
    send(&mut c.ws, &c.session, "text:80 delay_ms:25").await;
    let mut seen = Vec::new();
    for _ in 0..10 {
        seen.push(next_event(&mut c.ws).await);
    }
    let last_seq = seen[4]["seq"].as_u64().unwrap();
    let mut second = server.ws(&format!("/ws?token={}", c.token)).await;
    second
        .send_json(json!({"type":"chat.subscribe","sessions":[{"sessionId": c.session, "lastSeq": last_seq}, {"lastSeq": 1}]}))
        .await;
    let ack = second.recv_json().await;
    assert_eq!(ack["kind"], "chat_subscribed");
    assert_eq!(ack["sessionId"], c.session);
    assert_eq!(ack["isProcessing"], true);
    assert_eq!(ack["replayTruncated"], false);
    assert_eq!(ack["runFirstSeq"], 1);
    assert!(ack["lastSeq"].as_u64().unwrap() >= 10);
    let theirs = until_complete(&mut second, &c.session).await;
    let s = seqs(&theirs);
    assert_eq!(s[0], last_seq + 1, "replay starts right after lastSeq");
    assert!(
        s.windows(2).all(|w| w[1] == w[0] + 1),
        "no gaps or duplicates: {s:?}"
    );
    let mine = until_complete(&mut c.ws, &c.session).await;
    seen.extend(mine);
    assert_eq!(seqs(&seen), (1..=seen.len() as u64).collect::<Vec<_>>());
    assert_eq!(s.last(), seqs(&seen).last());

    // After completion: not processing, not replayed.
    second
        .send_json(
            json!({"type":"chat.subscribe","sessions":[{"sessionId": c.session, "lastSeq": 0}]}),
        )
        .await;
    let ack = second.recv_json().await;
    assert_eq!(
        (ack["kind"].clone(), ack["isProcessing"].clone()),
        (json!("chat_subscribed"), json!(false))
    );
    assert_eq!(ack["lastSeq"].as_u64(), s.last().copied());
    let (replayed, _) = second.frames_before_probe(&c.session).await;
    assert!(replayed.is_empty(), "an idle session replayed {replayed:?}");

    // Another user's session is not found, not subscribed.
    let mut bob = server.chat("bob").await;
    bob.send_json(json!({"type":"chat.subscribe","sessions":[{"sessionId": c.session}]}))
        .await;
    assert_eq!(bob.recv_json().await["code"], "SESSION_NOT_FOUND");
    bob.send_json(json!({"type":"chat.abort","sessionId": c.session}))
        .await;
    let v = bob.recv_json().await;
    assert!(
        v["code"] == "SESSION_NOT_FOUND" || v["code"] == "NO_ACTIVE_RUN",
        "{v}"
    );
}

/// Two sessions stream at once and stay isolated; the socket that closes mid-run does not disturb the run.
#[actix_rt::test]
async fn two_sessions_stream_in_isolation() {
    let server = fake_server();
    let mut a = chat(&server, "alice").await;
    let mut b = chat(&server, "bob").await;
    send(&mut a.ws, &a.session, "text:300 size:16").await;
    send(&mut b.ws, &b.session, "text:200 size:16").await;
    let ea = until_complete(&mut a.ws, &a.session).await;
    let eb = until_complete(&mut b.ws, &b.session).await;
    assert_eq!(of_kind(&ea, "stream_delta").len(), 300);
    assert_eq!(of_kind(&eb, "stream_delta").len(), 200);
    assert!(ea.iter().all(|e| e["sessionId"] == a.session));
    assert!(eb.iter().all(|e| e["sessionId"] == b.session));
    // Bob never saw Alice's session_upserted (E3).
    let (seen, _) = b.ws.frames_before_probe(&b.session).await;
    for frame in seen {
        assert!(!frame.to_string().contains(&a.session), "{frame}");
    }
}

/// Thousands of deltas arrive whole and in order.
#[actix_rt::test]
async fn many_deltas_arrive_whole_and_in_order() {
    let server = fake_server();
    let mut c = chat(&server, "alice").await;
    send(&mut c.ws, &c.session, "text:5000 size:32").await;
    let events = until_complete(&mut c.ws, &c.session).await;
    let deltas = of_kind(&events, "stream_delta");
    assert_eq!(deltas.len(), 5000);
    for (i, d) in deltas.iter().enumerate() {
        assert!(
            d["content"].as_str().unwrap().starts_with(&format!("{i}:")),
            "delta {i}: {d}"
        );
    }
    let s = seqs(&events);
    assert!(s.windows(2).all(|w| w[1] == w[0] + 1));
}

/// Permission prompts: allow runs the tool, deny does not, pending requests
/// are listed on subscribe, timeouts and run end cancel them, rememberEntry
/// allows the rest of the run.
#[actix_rt::test]
async fn permissions_allow_deny_pending_and_timeout() {
    let server = fake_server_with(|cmd| {
        cmd.arg("--permission-timeout-secs").arg("1");
    });
    let mut c = chat(&server, "alice").await;
    // Allow: the tool acts in the project dir.
    send(&mut c.ws, &c.session, "permission:Bash text:1").await;
    let (req, _) = c.ws.recv_until_kind("permission_request").await;
    assert_eq!(req["toolName"], "Bash");
    assert_eq!(req["input"]["command"], "touch allowed.txt");
    let request_id = req["requestId"].as_str().unwrap().to_string();
    // Listed while pending.
    let mut other = server.ws(&format!("/ws?token={}", c.token)).await;
    other.send_json(json!({"type":"chat.subscribe","sessions":[{"sessionId": c.session, "lastSeq": 999999}]})).await;
    let ack = other.recv_json().await;
    assert_eq!(
        ack["pendingPermissions"][0]["requestId"],
        request_id.as_str()
    );
    assert_eq!(ack["pendingPermissions"][0]["toolName"], "Bash");
    c.ws.send_json(json!({"type":"chat.permission-response","requestId": request_id, "allow": true, "updatedInput": {"command": "touch allowed.txt", "edited": true}})).await;
    let events = until_complete(&mut c.ws, &c.session).await;
    assert_eq!(events.last().unwrap()["success"], true);
    let written = std::fs::read_to_string(c.project.path().join("allowed.txt"))
        .expect("tool ran in the project dir");
    assert!(
        written.contains("edited"),
        "updatedInput reached the CLI: {written}"
    );

    // Deny: no file, an error tool result.
    std::fs::remove_file(c.project.path().join("allowed.txt")).unwrap();
    send(&mut c.ws, &c.session, "permission:Bash text:1").await;
    let (req, _) = c.ws.recv_until_kind("permission_request").await;
    c.ws.send_json(
        json!({"type":"chat.permission-response","requestId": req["requestId"], "allow": false}),
    )
    .await;
    let events = until_complete(&mut c.ws, &c.session).await;
    let result = of_kind(&events, "tool_result");
    assert_eq!(result[0]["isError"], true);
    assert!(!c.project.path().join("allowed.txt").exists());

    // Timeout: cancelled with reason timeout, the CLI is told no.
    send(&mut c.ws, &c.session, "permission:Bash text:1").await;
    let (req, _) = c.ws.recv_until_kind("permission_request").await;
    let (cancelled, _) = c.ws.recv_until_kind("permission_cancelled").await;
    assert_eq!(cancelled["requestId"], req["requestId"]);
    assert_eq!(cancelled["reason"], "timeout");
    let events = until_complete(&mut c.ws, &c.session).await;
    assert_eq!(of_kind(&events, "tool_result")[0]["isError"], true);

    // Abort while pending: the request is cancelled before the complete.
    send(&mut c.ws, &c.session, "permission:AskUserQuestion text:1").await;
    let (req, _) = c.ws.recv_until_kind("permission_request").await;
    c.ws.send_json(json!({"type":"chat.abort","sessionId": c.session}))
        .await;
    let events = until_complete(&mut c.ws, &c.session).await;
    let cancelled = of_kind(&events, "permission_cancelled");
    assert_eq!(cancelled.len(), 1);
    assert_eq!(cancelled[0]["requestId"], req["requestId"]);
    // A late answer to a request that is gone is ignored.
    c.ws.send_json(
        json!({"type":"chat.permission-response","requestId": req["requestId"], "allow": true}),
    )
    .await;
    c.ws.send_json(json!({"type":"chat.permission-response","allow": true}))
        .await;
    let (late, _) = c.ws.frames_before_probe(&c.session).await;
    assert!(late.is_empty(), "{late:?}");
}

/// E6: a repeated clientRequestId starts nothing and returns the original runId.
#[actix_rt::test]
async fn client_request_id_makes_send_idempotent() {
    let server = fake_server();
    let mut c = chat(&server, "alice").await;
    let frame = json!({"type":"chat.send","sessionId": c.session,"content":"text:3","clientRequestId":"req-1"});
    c.ws.send_json(frame.clone()).await;
    let accepted = c.ws.recv_json().await;
    assert_eq!(accepted["kind"], "chat_accepted");
    assert_eq!(accepted["duplicate"], false);
    let events = until_complete(&mut c.ws, &c.session).await;
    assert_eq!(events[0]["runId"], accepted["runId"]);
    c.ws.send_json(frame).await;
    let again = c.ws.recv_json().await;
    assert_eq!(
        (again["kind"].clone(), again["duplicate"].clone()),
        (json!("chat_accepted"), json!(true))
    );
    assert_eq!(again["runId"], accepted["runId"]);
    // The registry sent the duplicate's answer while handling it; a probe
    // after it finds nothing started: no events, the session idle, seq unchanged.
    let (started, probe) = c.ws.frames_before_probe(&c.session).await;
    assert!(
        started.is_empty(),
        "the duplicate started a run: {started:?}"
    );
    assert_eq!(probe["isProcessing"], false, "the duplicate started a run");
    assert_eq!(probe["lastSeq"], events.last().unwrap()["seq"]);
}

/// E4: a subscriber that stops reading is closed with 4008 after a bounded
/// backlog; the subscriber that reads gets every event.
#[actix_rt::test]
async fn slow_consumer_is_closed_with_4008_and_others_are_unaffected() {
    let server = fake_server();
    let mut c = chat(&server, "alice").await;
    let mut slow = server.ws(&format!("/ws?token={}", c.token)).await;
    // 40,000 deltas of 2 KB: far more than a socket's bounded backlog.
    send(&mut c.ws, &c.session, "text:40000 size:2000 delay_ms:0").await;
    let first = next_event(&mut c.ws).await;
    slow.send_json(json!({"type":"chat.subscribe","sessions":[{"sessionId": c.session, "lastSeq": first["seq"]}]})).await;
    let mut events = vec![first];
    events.extend(until_complete(&mut c.ws, &c.session).await);
    assert_eq!(of_kind(&events, "stream_delta").len(), 40_000);
    assert_eq!(events.last().unwrap()["success"], true);
    // The slow one now reads: whatever was queued, then the 4008 close.
    let mut received = 0usize;
    let code = loop {
        match slow.recv().await {
            crate::util::WsEvent::Text(_) => received += 1,
            crate::util::WsEvent::Close(code, _) => break code,
            other => panic!("unexpected {other:?}"),
        }
    };
    assert_eq!(code, Some(4008));
    assert!(
        received < 40_000,
        "the slow socket was never cut off ({received} frames)"
    );
}

/// seq keeps increasing across a gateway restart, SIGKILL included (E9: the
/// next run starts above the seqs reserved before the crash).
#[actix_rt::test]
async fn seq_continues_after_a_restart() {
    let server = fake_server();
    let mut c = chat(&server, "alice").await;
    send(&mut c.ws, &c.session, "text:3").await;
    let events = until_complete(&mut c.ws, &c.session).await;
    let last = *seqs(&events).last().unwrap();
    let path = format!("/api/providers/sessions/{}", c.session);
    let mut persisted = 0;
    for _ in 0..200 {
        persisted = server.get(&path, Some(&c.token)).await.1["data"]["lastSeq"]
            .as_u64()
            .unwrap_or(0);
        if persisted == last {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(persisted, last);
    let data = server.kill_keep_data();
    let server = TestServer::start_in(data, |cmd| {
        cmd.arg("--claude-bin").arg(example_bin("fake_claude"));
    });
    let mut ws = server.ws(&format!("/ws?token={}", c.token)).await;
    ws.send_json(json!({"type":"chat.subscribe","sessions":[{"sessionId": c.session}]}))
        .await;
    let ack = ws.recv_json().await;
    assert_eq!(ack["isProcessing"], false);
    assert!(ack["lastSeq"].as_u64().unwrap() >= last, "{ack}");
    send(&mut ws, &c.session, "text:2").await;
    let events = until_complete(&mut ws, &c.session).await;
    assert!(seqs(&events)[0] > last, "seq went back after a restart");
    assert!(seqs(&events).windows(2).all(|w| w[1] == w[0] + 1));
}

/// SIGTERM mid-run: the run gets its error and complete, the CLI is killed,
/// the socket closes with 1001, the gateway exits 0 and seq was saved.
#[actix_rt::test]
async fn shutdown_mid_run_completes_the_run_and_kills_the_cli() {
    let mut server = fake_server();
    let mut c = chat(&server, "alice").await;
    send(&mut c.ws, &c.session, "text:10000 delay_ms:50").await;
    let _ = next_event(&mut c.ws).await;
    let cli = children_of(server.pid());
    assert!(!cli.is_empty());
    unsafe { libc::kill(server.pid() as i32, libc::SIGTERM) };
    let events = until_complete(&mut c.ws, &c.session).await;
    let complete = events.last().unwrap().clone();
    assert_eq!(complete["success"], false);
    assert!(of_kind(&events, "error")
        .iter()
        .any(|e| e["content"].as_str().unwrap().contains("shutting down")));
    assert_eq!(c.ws.recv_close().await, Some(1001));
    assert!(server.wait_exit().success());
    for pid in cli {
        eventually("CLI gone with the gateway", || !pid_alive(pid)).await;
    }
    let data = server.kill_keep_data();
    let server = TestServer::start_in(data, |_| {});
    let (_, row) = server
        .get(
            &format!("/api/providers/sessions/{}", c.session),
            Some(&c.token),
        )
        .await;
    assert_eq!(row["data"]["lastSeq"], complete["seq"]);
}

/// A CLI that dies before ending its turn may never have saved the
/// conversation it announced: that id is forgotten (the previous one kept),
/// so the next send does not resume a conversation that does not exist.
#[actix_rt::test]
async fn id_announced_by_a_crashed_run_is_not_resumed() {
    let server = fake_server();
    let mut c = chat(&server, "alice").await;
    send(&mut c.ws, &c.session, "text:4 crash session:lost-1").await;
    until_complete(&mut c.ws, &c.session).await;
    send(&mut c.ws, &c.session, "args text:1 session:kept-2").await;
    let events = until_complete(&mut c.ws, &c.session).await;
    assert!(
        !streamed_text(&events).contains("--resume"),
        "{}",
        streamed_text(&events)
    );
    // A resumed session that crashes keeps the id it had.
    send(&mut c.ws, &c.session, "text:4 crash session:lost-3").await;
    until_complete(&mut c.ws, &c.session).await;
    send(&mut c.ws, &c.session, "args text:1").await;
    let events = until_complete(&mut c.ws, &c.session).await;
    assert!(
        streamed_text(&events).contains("--resume=kept-2"),
        "{}",
        streamed_text(&events)
    );
}

/// `rememberEntry` allows that tool for the rest of the run: it reaches the
/// CLI as an `addRules` update, and the CLI (here the fake, which applies
/// whole-tool rules) does not ask again; the gateway answers nothing itself.
#[actix_rt::test]
async fn remember_entry_allows_the_tool_for_the_rest_of_the_run() {
    let server = fake_server();
    let mut c = chat(&server, "alice").await;
    send(&mut c.ws, &c.session, "permission:Bash asks:3 text:1").await;
    let (req, _) = c.ws.recv_until_kind("permission_request").await;
    c.ws.send_json(json!({"type":"chat.permission-response","requestId": req["requestId"], "allow": true, "rememberEntry": "Bash"}))
        .await;
    let events = until_complete(&mut c.ws, &c.session).await;
    assert!(
        of_kind(&events, "permission_request").is_empty(),
        "asked again: {events:?}"
    );
    let results = of_kind(&events, "tool_result");
    assert_eq!(results.len(), 3);
    assert!(results.iter().all(|r| r["isError"] == false));
    // Only for that run: the next run asks again.
    send(&mut c.ws, &c.session, "permission:Bash text:1").await;
    let (req, _) = c.ws.recv_until_kind("permission_request").await;
    c.ws.send_json(
        json!({"type":"chat.permission-response","requestId": req["requestId"], "allow": false}),
    )
    .await;
    until_complete(&mut c.ws, &c.session).await;
}

/// `options.cwd` is honoured inside the project and ignored outside it.
#[actix_rt::test]
async fn options_cwd_only_inside_the_project() {
    let server = fake_server();
    let mut c = chat(&server, "alice").await;
    std::fs::create_dir(c.project.path().join("sub")).unwrap();
    for (cwd, expected) in [
        ("sub", c.project.path().join("sub")),
        ("/tmp", c.project.path().to_path_buf()),
    ] {
        let frame = json!({"type":"chat.send","sessionId": c.session,"content":"permission:Bash text:1","options":{"cwd": cwd}});
        c.ws.send_json(frame).await;
        let (req, _) = c.ws.recv_until_kind("permission_request").await;
        c.ws.send_json(
            json!({"type":"chat.permission-response","requestId": req["requestId"], "allow": true}),
        )
        .await;
        until_complete(&mut c.ws, &c.session).await;
        let written = expected.join("allowed.txt");
        assert!(
            written.exists(),
            "options.cwd {cwd}: no file at {}",
            written.display()
        );
        std::fs::remove_file(written).unwrap();
    }
}
