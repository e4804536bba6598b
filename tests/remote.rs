//! Remote sessions (PROTOCOL.md section 8) with the `agentgate-client`
//! library against a real gateway, `fake_claude` as the provider: the run a
//! `/ws` client sees, rendered as stream-json; user turns over REST;
//! permissions answered from either side; interrupts; a cut connection
//! resumed with each message once; the reconnect policy close code by close
//! code.

use std::time::Duration;

use agentgate_client::{
    create_session, environments, Closed, Event, FinalClose, RemoteSession, SessionConfig,
};
use futures_util::StreamExt;
use serde_json::{json, Value};

use crate::chat::{of_kind, streamed_text, until_complete};
use crate::support::proxy::Proxy;
use crate::util::{example_bin, project_dir, TestServer, WsClient};

/// Bound on waiting for one event (CLIs start slowly on a loaded machine).
const WAIT: Duration = Duration::from_secs(60);

fn fake_server() -> TestServer {
    TestServer::start_with(|cmd| {
        cmd.arg("--claude-bin").arg(example_bin("fake_claude"));
    })
}

/// A user with a project (its first session made over `/api`, so it is an
/// environment) and a remote session created in it by `prompt`.
pub(crate) struct Remote {
    token: String,
    project: tempfile::TempDir,
    /// `session_<app id>`.
    id: String,
    /// The app id, as `/ws` knows it.
    app_id: String,
}

pub(crate) async fn remote(server: &TestServer, user: &str, prompt: &str) -> Remote {
    let token = server.token(user);
    let project = project_dir();
    server
        .create_session(&token, "claude", project.path())
        .await;
    let base = server.url("");
    let envs = environments(&base, &token).await.expect("environments");
    let path = project.path().to_str().unwrap();
    let env = envs
        .iter()
        .find(|e| e.path.as_deref() == Some(path))
        .unwrap_or_else(|| panic!("the project is no environment: {envs:?}"));
    let id = create_session(&base, &token, &env.id, prompt)
        .await
        .expect("POST /v1/sessions");
    assert!(id.starts_with("session_"), "{id}");
    let app_id = id.trim_start_matches("session_").to_string();
    Remote {
        token,
        project,
        id,
        app_id,
    }
}

/// A `/ws` client subscribed to the session's running run (from its start).
async fn ws_follow(server: &TestServer, r: &Remote) -> WsClient {
    let mut ws = server.ws(&format!("/ws?token={}", r.token)).await;
    ws.send_json(
        json!({"type":"chat.subscribe","sessions":[{"sessionId": r.app_id, "lastSeq": 0}]}),
    )
    .await;
    let ack = ws.recv_json().await;
    assert_eq!(ack["isProcessing"], true, "the run is still running: {ack}");
    ws
}

pub(crate) fn follow(server_url: &str, r: &Remote) -> RemoteSession {
    let token = r.token.clone();
    RemoteSession::connect(SessionConfig::new(server_url, r.id.clone(), move || {
        token.clone()
    }))
}

async fn next(session: &mut RemoteSession) -> Event {
    tokio::time::timeout(WAIT, session.next())
        .await
        .expect("an event in time")
        .expect("the session stream is open")
}

/// The next permission request (other events skipped).
async fn next_permission(session: &mut RemoteSession) -> agentgate_client::PermissionRequest {
    loop {
        if let Event::PermissionRequest(p) = next(session).await {
            return p;
        }
    }
}

/// Events up to and including the next `result` message.
pub(crate) async fn until_result(session: &mut RemoteSession) -> Vec<Event> {
    let mut events = Vec::new();
    loop {
        let event = next(session).await;
        let done = matches!(&event, Event::Message(m) if m["type"] == "result");
        let closed = matches!(&event, Event::Closed(_));
        events.push(event);
        assert!(!closed, "closed before a result: {events:?}");
        if done {
            return events;
        }
    }
}

fn messages<'a>(events: &'a [Event], ty: &str) -> Vec<&'a Value> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Message(m) if m["type"] == ty => Some(m),
            _ => None,
        })
        .collect()
}

fn assistant_text(events: &[Event]) -> String {
    messages(events, "assistant")
        .iter()
        .flat_map(|m| {
            m["message"]["content"]
                .as_array()
                .cloned()
                .unwrap_or_default()
        })
        .filter(|b| b["type"] == "text")
        .map(|b| b["text"].as_str().unwrap_or_default().to_string())
        .collect()
}

/// The first run (started by POST /v1/sessions before the client even
/// connected) arrives whole, as stream-json rendered from the same run a
/// `/ws` client sees; a second turn goes out by POST and renders too; a turn
/// while one runs is refused with 409.
#[actix_rt::test]
async fn a_remote_client_follows_the_first_turn_and_sends_the_next() {
    let server = fake_server();
    let r = remote(&server, "alice", "text:5").await;
    let mut session = follow(&server.url(""), &r);
    assert_eq!(next(&mut session).await, Event::Connected);
    let events = until_result(&mut session).await;
    let init = messages(&events, "system");
    assert_eq!(init.len(), 1, "{events:?}");
    assert_eq!(init[0]["subtype"], "init");
    assert!(init[0]["slash_commands"].is_array());
    assert_eq!(init[0]["session_id"], r.id.as_str());
    assert_eq!(messages(&events, "stream_event").len(), 5);
    assert_eq!(messages(&events, "assistant").len(), 1);
    let deltas: String = messages(&events, "stream_event")
        .iter()
        .map(|m| m["event"]["delta"]["text"].as_str().unwrap_or_default())
        .collect();
    assert!(!deltas.is_empty());
    assert_eq!(assistant_text(&events), deltas);
    let result = messages(&events, "result")[0];
    assert_eq!(result["subtype"], "success");
    assert_eq!(result["is_error"], false);

    let (status, body) = server
        .get(&format!("/v1/sessions/{}", r.id), Some(&r.token))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["id"], r.id.as_str());
    assert_eq!(body["title"], "text:5");

    session
        .send_message("text:20 delay_ms:30")
        .await
        .expect("second turn");
    let mut ws = ws_follow(&server, &r).await;
    let ws_events = until_complete(&mut ws, &r.app_id).await;
    let events = until_result(&mut session).await;
    assert_eq!(
        messages(&events, "system").len(),
        1,
        "each run starts with its init"
    );
    assert_eq!(assistant_text(&events), streamed_text(&ws_events));
    assert_eq!(ws_events.last().unwrap()["success"], true);

    session
        .send_message("text:40 delay_ms:50")
        .await
        .expect("third turn");
    let refused = session.send_message("text:1").await.unwrap_err();
    assert!(
        matches!(&refused, agentgate_client::Error::Http { status: 409, .. }),
        "{refused:?}"
    );
    until_result(&mut session).await;
}

/// A permission prompt reaches both clients with the same request id; the
/// first answer wins and the other client sees the prompt withdrawn; "allow"
/// lets the tool really run in the project, "deny" keeps it from running.
#[actix_rt::test]
async fn the_first_permission_answer_wins_across_ws_and_remote_clients() {
    let server = fake_server();
    let r = remote(&server, "alice", "text:1").await;
    let mut session = follow(&server.url(""), &r);
    until_result(&mut session).await;

    // Answered on /ws: the remote prompt is withdrawn.
    session
        .send_message("permission:Bash text:1")
        .await
        .unwrap();
    let remote_req = next_permission(&mut session).await;
    let mut ws = ws_follow(&server, &r).await;
    let (ws_req, _) = ws.recv_until_kind("permission_request").await;
    assert_eq!(remote_req.request_id, ws_req["requestId"].as_str().unwrap());
    assert_eq!(remote_req.tool_name, "Bash");
    assert_eq!(remote_req.input["command"], "touch allowed.txt");
    assert_eq!(remote_req.tool_use_id.as_deref(), Some("toolu_fake_0"));
    ws.send_json(
        json!({"type":"chat.permission-response","requestId": ws_req["requestId"], "allow": true}),
    )
    .await;
    let events = until_result(&mut session).await;
    assert!(
        events.contains(&Event::PermissionCancelled {
            request_id: remote_req.request_id.clone()
        }),
        "{events:?}"
    );
    assert!(
        r.project.path().join("allowed.txt").exists(),
        "the tool ran"
    );
    let results = messages(&events, "user");
    assert_eq!(results[0]["message"]["content"][0]["is_error"], false);
    std::fs::remove_file(r.project.path().join("allowed.txt")).unwrap();

    // Denied by the remote client: /ws sees it withdrawn, the tool never runs.
    session
        .send_message("permission:Bash text:1")
        .await
        .unwrap();
    let p = next_permission(&mut session).await;
    let mut ws = ws_follow(&server, &r).await;
    session.deny(&p.request_id, "not now");
    let ws_events = until_complete(&mut ws, &r.app_id).await;
    let cancelled = of_kind(&ws_events, "permission_cancelled");
    assert_eq!(cancelled[0]["requestId"], p.request_id.as_str());
    assert_eq!(cancelled[0]["reason"], "answered");
    assert_eq!(of_kind(&ws_events, "tool_result")[0]["isError"], true);
    assert!(!r.project.path().join("allowed.txt").exists());
    let events = until_result(&mut session).await;
    assert_eq!(
        messages(&events, "user")[0]["message"]["content"][0]["is_error"],
        true
    );
}

/// `control_request` `interrupt` aborts the run: the client gets its
/// `control_response` and an error `result`; `/ws` sees `complete` aborted.
#[actix_rt::test]
async fn an_interrupt_from_the_remote_client_aborts_the_run() {
    let server = fake_server();
    let r = remote(&server, "alice", "text:1").await;
    let mut session = follow(&server.url(""), &r);
    until_result(&mut session).await;
    session.send_message("text:500 delay_ms:20").await.unwrap();
    while !matches!(next(&mut session).await, Event::Message(m) if m["type"] == "stream_event") {}
    let mut ws = ws_follow(&server, &r).await;
    session.interrupt();
    let mut events = until_result(&mut session).await;
    // The interrupt's answer and the run's end race; both come.
    while messages(&events, "control_response").is_empty() {
        events.push(next(&mut session).await);
    }
    let answer = messages(&events, "control_response");
    assert_eq!(answer[0]["response"]["subtype"], "success", "{events:?}");
    let result = messages(&events, "result")[0];
    assert_eq!(result["is_error"], true);
    assert!(result["errors"].to_string().contains("aborted"), "{result}");
    let ws_events = until_complete(&mut ws, &r.app_id).await;
    assert_eq!(ws_events.last().unwrap()["aborted"], true);
}

/// The connection drops mid-turn (the proxy cuts it): the client reconnects
/// after the seed's 2 s with the same URL and no cursor, and still shows
/// each message exactly once: one init, one whole assistant text, one result.
#[actix_rt::test]
async fn a_dropped_connection_resumes_and_each_message_shows_once() {
    let server = fake_server();
    let r = remote(&server, "alice", "text:1").await;
    let proxy = Proxy::forward(server.addr);
    let mut session = follow(&format!("http://{}", proxy.addr), &r);
    until_result(&mut session).await;
    session.send_message("text:60 delay_ms:50").await.unwrap();
    let mut ws = ws_follow(&server, &r).await;
    let mut events = Vec::new();
    let mut deltas = 0;
    while deltas < 10 {
        let e = next(&mut session).await;
        if matches!(&e, Event::Message(m) if m["type"] == "stream_event") {
            deltas += 1;
        }
        events.push(e);
    }
    assert!(proxy.cut() >= 1);
    loop {
        let e = next(&mut session).await;
        let done = matches!(&e, Event::Message(m) if m["type"] == "result");
        events.push(e);
        if done {
            break;
        }
    }
    let ws_events = until_complete(&mut ws, &r.app_id).await;
    let reconnects: Vec<&Event> = events
        .iter()
        .filter(|e| matches!(e, Event::Reconnecting { .. }))
        .collect();
    assert_eq!(
        reconnects,
        [&Event::Reconnecting {
            close_code: None,
            after: Duration::from_secs(2)
        }]
    );
    let connects = events.iter().filter(|e| **e == Event::Connected).count();
    assert_eq!(connects, 1, "one reconnect");
    assert_eq!(messages(&events, "system").len(), 1, "{events:?}");
    assert_eq!(messages(&events, "assistant").len(), 1, "{events:?}");
    assert_eq!(assistant_text(&events), streamed_text(&ws_events));
    assert_eq!(messages(&events, "result").len(), 1);
}

async fn closed(session: &mut RemoteSession) -> Closed {
    loop {
        if let Event::Closed(c) = next(session).await {
            return c;
        }
    }
}

/// Refusals at the upgrade are final (the seed stops on a connection that
/// never opened): 404 for an unknown or another user's session, 401 for a
/// bad token.
#[actix_rt::test]
async fn refused_upgrades_are_final() {
    let server = fake_server();
    let r = remote(&server, "alice", "text:1").await;
    let base = server.url("");
    let never = |status| Closed {
        reason: Some(FinalClose::NeverOpened),
        close_code: None,
        http_status: Some(status),
    };
    let bob = server.token("bob");
    let cases = [
        (
            "session_00000000-0000-4000-8000-000000000000",
            r.token.clone(),
            404,
        ),
        (r.id.as_str(), bob, 404),
        (r.id.as_str(), "not-a-jwt".to_string(), 401),
    ];
    for (id, token, status) in cases {
        let mut s = RemoteSession::connect(SessionConfig::new(&base, id, move || token.clone()));
        assert_eq!(closed(&mut s).await, never(status), "{id}");
    }
}

/// A token that expires while the socket is open: closed with 4003, which
/// the client takes as final. Every attempt asks for a fresh token.
#[actix_rt::test]
async fn an_expiring_token_closes_with_4003_for_good() {
    let server = fake_server();
    let r = remote(&server, "alice", "text:1").await;
    let secret = std::fs::read(server.data_dir().join("jwt-secret")).expect("jwt secret");
    let uid = jwt_claims(&r.token)["uid"].as_i64().expect("uid claim");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let short = jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &json!({"sub": "alice", "uid": uid, "iat": now, "exp": now + 3}),
        &jsonwebtoken::EncodingKey::from_secret(&secret),
    )
    .unwrap();
    let asked = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = asked.clone();
    let mut s = RemoteSession::connect(SessionConfig::new(
        server.url(""),
        r.id.clone(),
        move || {
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            short.clone()
        },
    ));
    assert_eq!(next(&mut s).await, Event::Connected);
    assert_eq!(
        closed(&mut s).await,
        Closed {
            reason: Some(FinalClose::Permanent(4003)),
            close_code: Some(4003),
            http_status: None
        }
    );
    assert_eq!(asked.load(std::sync::atomic::Ordering::SeqCst), 1);
}

/// A token revoked while the socket is open (`agentgate token --revoke`):
/// closed with 4003 at the next check, and the client stops for good.
#[actix_rt::test]
async fn a_revoked_token_closes_with_4003_for_good() {
    let server = TestServer::start_with(|cmd| {
        cmd.arg("--claude-bin")
            .arg(example_bin("fake_claude"))
            // Revocation is checked every heartbeat (a shorter one drops
            // sockets of tasks starved on a loaded machine).
            .arg("--heartbeat-secs")
            .arg("2");
    });
    let r = remote(&server, "alice", "text:1").await;
    let mut s = follow(&server.url(""), &r);
    assert_eq!(next(&mut s).await, Event::Connected);
    until_result(&mut s).await;
    server.revoke("alice");
    assert_eq!(
        closed(&mut s).await,
        Closed {
            reason: Some(FinalClose::Permanent(4003)),
            close_code: Some(4003),
            http_status: None
        }
    );
}

/// Gateway shutdown closes with 1001: the client schedules a reconnect
/// (not final), and the attempt, finding no gateway, ends it.
#[actix_rt::test]
async fn shutdown_is_reconnected_until_the_gateway_is_gone() {
    let mut server = fake_server();
    let r = remote(&server, "alice", "text:1").await;
    let mut s = follow(&server.url(""), &r);
    assert_eq!(next(&mut s).await, Event::Connected);
    until_result(&mut s).await;
    unsafe { libc::kill(server.pid() as i32, libc::SIGTERM) };
    assert_eq!(
        next(&mut s).await,
        Event::Reconnecting {
            close_code: Some(1001),
            after: Duration::from_secs(2)
        }
    );
    server.wait_exit();
    assert_eq!(
        closed(&mut s).await,
        Closed {
            reason: Some(FinalClose::NeverOpened),
            close_code: None,
            http_status: None
        }
    );
}

fn jwt_claims(token: &str) -> Value {
    use base64::Engine;
    let payload = token.split('.').nth(1).expect("a JWT");
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .expect("base64url");
    serde_json::from_slice(&bytes).expect("claims")
}

/// One SSE event of the stream: (event, id, data).
pub(crate) type SseEvent = (String, Option<u64>, Value);

/// Reads SSE events from a streaming response until `done` says so.
pub(crate) async fn read_sse(
    res: &mut awc::ClientResponse<
        impl futures_util::Stream<Item = Result<actix_web::web::Bytes, awc::error::PayloadError>>
            + Unpin,
    >,
    mut done: impl FnMut(&SseEvent) -> bool,
) -> Vec<SseEvent> {
    let mut text = String::new();
    let mut events = Vec::new();
    loop {
        let chunk = tokio::time::timeout(WAIT, res.next())
            .await
            .expect("SSE data in time")
            .expect("the stream is open")
            .expect("a chunk");
        text.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(end) = text.find("\n\n") {
            let block: String = text.drain(..end + 2).collect();
            let (mut event, mut id, mut data) = (String::new(), None, Value::Null);
            for line in block.lines() {
                if let Some(v) = line.strip_prefix("event: ") {
                    event = v.to_string();
                } else if let Some(v) = line.strip_prefix("id: ") {
                    id = v.parse().ok();
                } else if let Some(v) = line.strip_prefix("data: ") {
                    data = serde_json::from_str(v).expect("data is JSON");
                }
            }
            let e = (event, id, data);
            let stop = done(&e);
            events.push(e);
            if stop {
                return events;
            }
        }
    }
}

pub(crate) fn is_result(e: &SseEvent) -> bool {
    e.0 == "client_event" && e.2["payload"]["type"] == "result"
}

pub(crate) async fn open_sse(
    server: &TestServer,
    r: &Remote,
    last_event_id: Option<u64>,
) -> awc::ClientResponse<
    impl futures_util::Stream<Item = Result<actix_web::web::Bytes, awc::error::PayloadError>> + Unpin,
> {
    let mut req = awc::Client::builder()
        .disable_timeout()
        .finish()
        .get(server.url(&format!("/v1/code/sessions/{}/events/stream", r.id)))
        .bearer_auth(&r.token)
        .insert_header(("accept", "text/event-stream"));
    if let Some(id) = last_event_id {
        req = req.insert_header(("last-event-id", id.to_string()));
    }
    let res = req.send().await.expect("GET events/stream");
    assert_eq!(res.status().as_u16(), 200);
    assert_eq!(
        res.headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok()),
        Some("text/event-stream")
    );
    res
}

/// The SSE generation: `client_event` ids are agentgate's seqs (the same as
/// `/ws` sees), deltas come as `ephemeral_event`, a turn POSTed to
/// `/v1/code/sessions/{id}/events` answers the seq its run starts at, a
/// stream resumed with `Last-Event-ID` continues right after it (no second
/// `init`), and one whose cursor the buffer no longer reaches gets
/// `catch_up_truncated` first.
#[actix_rt::test]
async fn the_sse_stream_numbers_by_seq_and_resumes_from_last_event_id() {
    let server = fake_server();
    let r = remote(&server, "alice", "text:3").await;
    let mut res = open_sse(&server, &r, None).await;
    let first = read_sse(&mut res, is_result).await;
    let kinds: Vec<&str> = first.iter().map(|e| e.0.as_str()).collect();
    assert_eq!(kinds.iter().filter(|k| **k == "ephemeral_event").count(), 3);
    let numbered: Vec<(u64, u64)> = first
        .iter()
        .filter_map(|e| Some((e.1?, e.2["sequence_num"].as_u64()?)))
        .collect();
    assert!(numbered.iter().all(|(id, n)| id == n), "{numbered:?}");
    assert!(numbered.windows(2).all(|w| w[0].0 < w[1].0));
    let first_end = numbered.last().unwrap().0;

    // The next turn, posted the SSE generation's way.
    let (status, body) = server
        .post(
            &format!("/v1/code/sessions/{}/events", r.id),
            Some(&r.token),
            json!({"events": [{"payload": {"type": "user", "uuid": "u-2", "session_id": r.id,
                "parent_tool_use_id": null, "message": {"role": "user", "content": "text:4"}}}]}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let run_start = body["results"][0]["sequence_num"].as_u64().unwrap();
    assert_eq!(run_start, first_end + 1);
    let second = read_sse(&mut res, is_result).await;
    assert_eq!(second[0].2["payload"]["subtype"], "init");
    let ids: Vec<u64> = second.iter().filter_map(|e| e.1).collect();
    assert!(ids[0] >= run_start);
    drop(res);

    // Resume in the middle of the second run.
    let cursor = ids[0];
    let mut res = open_sse(&server, &r, Some(cursor)).await;
    let resumed = read_sse(&mut res, is_result).await;
    let resumed_ids: Vec<u64> = resumed.iter().filter_map(|e| e.1).collect();
    assert_eq!(resumed_ids, ids[1..].to_vec());
    assert!(
        !resumed.iter().any(|e| e.2["payload"]["subtype"] == "init"),
        "no second init: {resumed:?}"
    );
    drop(res);

    // A cursor in the first run: that run is no longer buffered.
    let mut res = open_sse(&server, &r, Some(1)).await;
    let behind = read_sse(&mut res, is_result).await;
    assert_eq!(behind[0].0, "catch_up_truncated");
}

/// An open SSE stream is one of the user's sockets (`--max-sockets-per-user`):
/// with a limit of one, a `/ws` upgrade and a second stream are refused
/// with 429 while it is open, and its place comes back once the client
/// drops it (the gateway notices at its next write to the stream: within a
/// heartbeat interval).
#[actix_rt::test]
async fn an_sse_stream_counts_as_a_socket_of_its_user() {
    let server = TestServer::start_with(|cmd| {
        cmd.arg("--claude-bin")
            .arg(example_bin("fake_claude"))
            .args(["--max-sockets-per-user", "1", "--heartbeat-secs", "2"]);
    });
    let r = remote(&server, "alice", "text:3").await;
    let mut res = open_sse(&server, &r, None).await;
    read_sse(&mut res, is_result).await;
    let ws = format!("/ws?token={}", r.token);
    assert_eq!(
        server.try_ws(&ws).await.err().as_deref(),
        Some("status 429")
    );
    let second = awc::Client::new()
        .get(server.url(&format!("/v1/code/sessions/{}/events/stream", r.id)))
        .bearer_auth(&r.token)
        .send()
        .await
        .expect("second GET events/stream");
    assert_eq!(second.status().as_u16(), 429);
    // Another user is not counted against alice.
    server.chat("bob").await;

    drop(res);
    // The gateway learns of the dropped connection at its next heartbeat
    // write (no event reaches this client), so the upgrade is retried
    // until it is let in, within a bound.
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        match server.try_ws(&ws).await {
            Ok(_) => break,
            Err(e) => {
                assert_eq!(e, "status 429");
                assert!(
                    std::time::Instant::now() < deadline,
                    "the stream's place never came back"
                );
                actix_rt::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}
