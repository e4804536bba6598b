//! Cluster mode between two real gateway nodes (support::cluster: one fresh
//! PostgreSQL database, one redis-server of the test's own, one JWT
//! secret) with the scripted stand-in CLI: a run on node A followed from
//! node B, the lease refusing a second run anywhere, the running list
//! naming the node, commands from B reaching A's run.

use serde_json::{json, Value};

use crate::chat::{of_kind, send, seqs, until_complete};
use crate::support::cluster::TestCluster;
use crate::util::WsClient;

/// Alice's session made on node A, and a `/ws` client of hers on A and on B.
async fn alice_on_both(
    cluster: &TestCluster,
) -> (String, tempfile::TempDir, String, WsClient, WsClient) {
    let (token, project, session) = cluster.alice_session(0).await;
    let ws_a = cluster.node(0).ws(&format!("/ws?token={token}")).await;
    let ws_b = cluster.node(1).ws(&format!("/ws?token={token}")).await;
    (token, project, session, ws_a, ws_b)
}

async fn subscribe(ws: &mut WsClient, session: &str, last_seq: Option<u64>) -> Value {
    let mut entry = json!({"sessionId": session});
    if let Some(seq) = last_seq {
        entry["lastSeq"] = json!(seq);
    }
    ws.send_json(json!({"type": "chat.subscribe", "sessions": [entry]}))
        .await;
    loop {
        let v = ws.recv_json().await;
        if v["kind"] == "chat_subscribed" && v["sessionId"] == session {
            return v;
        }
    }
}

/// Seqs of the run's events, each once, in order, from `first` on.
fn assert_contiguous_from(events: &[Value], first: u64) {
    let s = seqs(events);
    assert_eq!(s.first().copied(), Some(first), "first seq: {s:?}");
    assert!(
        s.windows(2).all(|w| w[1] == w[0] + 1),
        "gap or duplicate: {s:?}"
    );
}

/// A run on node A followed from node B from its first seq: every event
/// once with no gap, one `complete`; meanwhile `chat.send` on B gets
/// `RUN_IN_PROGRESS` (the lease is A's), and B's running list names node-a.
#[actix_rt::test]
async fn a_run_on_one_node_is_followed_from_another() {
    let cluster = TestCluster::start(2);
    let b = cluster.node(1);
    let (token, _project, session, mut ws_a, mut ws_b) = alice_on_both(&cluster).await;

    send(&mut ws_a, &session, "text:200 delay_ms:5").await;
    let (first, _) = ws_a.recv_until_kind("stream_delta").await;
    let run_id = first["runId"].as_str().unwrap().to_string();

    let ack = subscribe(&mut ws_b, &session, None).await;
    assert_eq!(ack["isProcessing"], true, "{ack}");
    assert_eq!(ack["runId"], run_id.as_str(), "{ack}");
    let first_seq = ack["runFirstSeq"].as_u64().expect("runFirstSeq");

    // The lease is node A's: a send on B is refused while the run lives.
    send(&mut ws_b, &session, "text:1").await;
    let mut on_b = Vec::new();
    let refused = loop {
        let v = ws_b.recv_json().await;
        if v["kind"] == "protocol_error" {
            break v;
        }
        if v["seq"].is_u64() {
            on_b.push(v);
        }
    };
    assert_eq!(refused["code"], "RUN_IN_PROGRESS", "{refused}");

    let (status, running) = b.get("/api/providers/sessions/running", Some(&token)).await;
    assert_eq!(status, 200, "{running}");
    let entry = running["data"]["sessions"]
        .as_array()
        .and_then(|l| {
            l.iter()
                .find(|r| r["sessionId"] == session.as_str())
                .cloned()
        })
        .unwrap_or_else(|| panic!("the run on node A is not listed on B: {running}"));
    assert_eq!(entry["node"], "node-a", "{entry}");
    assert_eq!(entry["runId"], run_id.as_str(), "{entry}");

    let done = on_b.last().is_some_and(|v| v["kind"] == "complete");
    if !done {
        on_b.extend(until_complete(&mut ws_b, &session).await);
    }
    let on_a = until_complete(&mut ws_a, &session).await;
    assert_contiguous_from(&on_b, first_seq);
    assert_eq!(of_kind(&on_b, "complete").len(), 1);
    assert_eq!(on_b.last().unwrap()["success"], true, "{:?}", on_b.last());
    assert_eq!(of_kind(&on_b, "stream_delta").len(), 200);
    // The same frames on both nodes, byte for byte the same events.
    assert_eq!(on_b.last(), on_a.last());

    // Once A's run completed, B may run the session; seqs continue above A's.
    let last_a = on_a.last().unwrap()["seq"].as_u64().unwrap();
    send(&mut ws_b, &session, "text:3").await;
    let second = until_complete(&mut ws_b, &session).await;
    assert_eq!(
        second.last().unwrap()["success"],
        true,
        "{:?}",
        second.last()
    );
    assert!(
        seqs(&second)[0] > last_a,
        "B's run reused seqs: {:?} after {last_a}",
        seqs(&second)
    );
    // ... and A's socket, which follows the session, sees B's run too.
    let on_a = until_complete(&mut ws_a, &session).await;
    assert_eq!(seqs(&on_a), seqs(&second));
}

/// Waits (bounded) until `node`'s log has a line containing `needle`.
async fn log_line(node: &crate::util::TestServer, needle: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !node.logs().contains(needle) {
        assert!(
            std::time::Instant::now() < deadline,
            "no log line with {needle:?}:\n{}",
            node.logs()
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// A permission prompt of a run on node A is listed in `chat_subscribed`
/// on node B and answered from B; an abort sent on B ends the next run on
/// A: both nodes' clients see the same outcome.
#[actix_rt::test]
async fn commands_sent_on_another_node_reach_the_run() {
    let cluster = TestCluster::start(2);
    let a = cluster.node(0);
    let (token, project, session, mut ws_a, mut ws_b) = alice_on_both(&cluster).await;

    send(&mut ws_a, &session, "permission:Bash text:3").await;
    let (request, _) = ws_a.recv_until_kind("permission_request").await;
    let ack = subscribe(&mut ws_b, &session, None).await;
    let pending = ack["pendingPermissions"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert_eq!(pending.len(), 1, "{ack}");
    assert_eq!(pending[0]["requestId"], request["requestId"], "{ack}");
    ws_b.send_json(json!({"type": "chat.permission-response",
        "requestId": request["requestId"], "allow": true}))
        .await;
    let on_a = until_complete(&mut ws_a, &session).await;
    let on_b = until_complete(&mut ws_b, &session).await;
    for events in [&on_a, &on_b] {
        let cancelled = of_kind(events, "permission_cancelled");
        assert_eq!(cancelled.len(), 1, "{events:?}");
        assert_eq!(cancelled[0]["reason"], "answered");
        assert_eq!(events.last().unwrap()["success"], true, "{events:?}");
    }
    // The CLI was told allow: its tool result is no error (a deny is one).
    let results = of_kind(&on_a, "tool_result");
    assert_eq!(results.len(), 1, "{on_a:?}");
    assert_eq!(results[0]["isError"], false, "{results:?}");

    send(&mut ws_a, &session, "text:2000 delay_ms:5").await;
    ws_b.recv_until_kind("stream_delta").await;
    ws_b.send_json(json!({"type": "chat.abort", "sessionId": session}))
        .await;
    let on_b = until_complete(&mut ws_b, &session).await;
    let on_a = until_complete(&mut ws_a, &session).await;
    assert_eq!(on_b.last().unwrap()["aborted"], true, "{:?}", on_b.last());
    assert_eq!(on_a.last(), on_b.last());
    assert!(of_kind(&on_a, "stream_delta").len() < 2000);

    // B knows nothing of this session (no socket there follows it): the
    // abort finds the run's node in the cluster's list of runs.
    let other = a.create_session(&token, "claude", project.path()).await;
    send(&mut ws_a, &other, "text:2000 delay_ms:5").await;
    ws_a.recv_until_kind("stream_delta").await;
    ws_b.send_json(json!({"type": "chat.abort", "sessionId": other}))
        .await;
    let on_a = until_complete(&mut ws_a, &other).await;
    assert_eq!(on_a.last().unwrap()["aborted"], true, "{:?}", on_a.last());
    // And B's client was answered without an error.
    let (before, _) = ws_b.frames_before_probe(&other).await;
    assert!(
        before.iter().all(|v| v["kind"] != "protocol_error"),
        "{before:?}"
    );
}

/// Node A is SIGKILLed mid-run: the client on node B gets one failed
/// `complete` after an error naming node-a, within a few leases, and the
/// session runs again at once on B.
#[actix_rt::test]
async fn a_lost_node_s_run_is_ended_by_a_survivor() {
    let mut cluster = TestCluster::start(2);
    let (_token, _project, session, mut ws_a, mut ws_b) = alice_on_both(&cluster).await;
    send(&mut ws_a, &session, "text:100000 delay_ms:10").await;
    ws_a.recv_until_kind("stream_delta").await;
    let ack = subscribe(&mut ws_b, &session, None).await;
    assert_eq!(ack["isProcessing"], true, "{ack}");
    ws_b.recv_until_kind("stream_delta").await;

    let _data = cluster.kill(0);
    let killed = std::time::Instant::now();
    let events = until_complete(&mut ws_b, &session).await;
    let waited = killed.elapsed();
    let complete = events.last().unwrap();
    assert_eq!(complete["success"], false, "{complete}");
    assert_eq!(complete["aborted"], false, "{complete}");
    let errors = of_kind(&events, "error");
    assert!(
        errors.iter().any(|e| e["content"]
            .as_str()
            .unwrap_or("")
            .contains("node node-a was lost")),
        "{errors:?}"
    );
    assert_eq!(of_kind(&events, "complete").len(), 1);
    let s = seqs(&events);
    assert!(s.windows(2).all(|w| w[1] == w[0] + 1), "gap: {s:?}");
    // Lease expiry plus half a lease of sweep, with room for a loaded machine.
    assert!(
        waited < std::time::Duration::from_millis(cluster.lease_ms * 4),
        "the lost run ended after {waited:?}"
    );
    log_line(cluster.node(1), "cluster.run_reaped").await;

    send(&mut ws_b, &session, "text:2").await;
    let next = until_complete(&mut ws_b, &session).await;
    assert_eq!(next.last().unwrap()["success"], true, "{next:?}");
    assert!(seqs(&next)[0] > *s.last().unwrap());
}

/// Redis is killed and started again (empty) mid-run: node A's client
/// never stops receiving; node B's follower resumes with no gap and no
/// duplicate, and gets the one `complete`.
#[actix_rt::test]
async fn a_follower_resumes_without_a_gap_after_redis_comes_back() {
    let mut cluster = TestCluster::start(2);
    let (token, project, session, mut ws_a, mut ws_b) = alice_on_both(&cluster).await;
    send(&mut ws_a, &session, "text:600 delay_ms:5").await;
    ws_a.recv_until_kind("stream_delta").await;
    let ack = subscribe(&mut ws_b, &session, None).await;
    let first_seq = ack["runFirstSeq"].as_u64().unwrap();
    // What B has of the run before Redis goes: from its first seq to a delta.
    let mut on_b = Vec::new();
    loop {
        let v = ws_b.recv_json().await;
        if v["seq"].is_u64() && v["sessionId"] == session.as_str() {
            let delta = v["kind"] == "stream_delta";
            on_b.push(v);
            if delta {
                break;
            }
        }
    }

    cluster.redis.kill();
    log_line(cluster.node(0), "cluster.disconnected").await;
    // A's own client keeps receiving while Redis is down.
    let (during, _) = ws_a.recv_until_kind("stream_delta").await;
    assert!(during["seq"].as_u64() > on_b.last().unwrap()["seq"].as_u64());
    // A new run anywhere is refused meanwhile.
    let other = cluster
        .node(1)
        .create_session(&token, "claude", project.path())
        .await;
    send(&mut ws_b, &other, "text:1").await;
    let refused = loop {
        let v = ws_b.recv_json().await;
        if v["kind"] == "protocol_error" {
            break v;
        }
        if v["seq"].is_u64() && v["sessionId"] == session.as_str() {
            on_b.push(v);
        }
    };
    assert_eq!(refused["code"], "CLUSTER_UNAVAILABLE", "{refused}");

    cluster.redis.restart();
    let done = on_b.last().is_some_and(|v| v["kind"] == "complete");
    if !done {
        on_b.extend(until_complete(&mut ws_b, &session).await);
    }
    until_complete(&mut ws_a, &session).await;
    assert_contiguous_from(&on_b, first_seq);
    assert_eq!(of_kind(&on_b, "complete").len(), 1);
    assert_eq!(on_b.last().unwrap()["success"], true);
    assert_eq!(of_kind(&on_b, "stream_delta").len(), 600);
}

/// Node A is frozen (SIGSTOP: it can neither renew its lease nor write)
/// past its lease: node B ends the run (one failed `complete` naming
/// node-a). When A thaws, its writes for that run are refused, so B's
/// client never gets a second `complete` or anything after it; A stops
/// its run and tells its own client with an error and a failed `complete`.
#[actix_rt::test]
async fn a_node_cut_off_past_its_lease_adds_nothing_to_the_reaped_run() {
    let cluster = TestCluster::start(2);
    let a = cluster.node(0);
    let (_token, _project, session, mut ws_a, mut ws_b) = alice_on_both(&cluster).await;
    send(&mut ws_a, &session, "text:100000 delay_ms:2").await;
    ws_a.recv_until_kind("stream_delta").await;
    subscribe(&mut ws_b, &session, None).await;
    ws_b.recv_until_kind("stream_delta").await;

    let signal = |sig: &str| {
        let status = std::process::Command::new("kill")
            .args([sig, &a.pid().to_string()])
            .status()
            .expect("kill");
        assert!(status.success(), "kill {sig}");
    };
    signal("-STOP");
    let on_b = until_complete(&mut ws_b, &session).await;
    signal("-CONT");
    let complete = on_b.last().unwrap();
    assert_eq!(complete["success"], false, "{complete}");
    assert!(
        of_kind(&on_b, "error").iter().any(|e| e["content"]
            .as_str()
            .unwrap_or("")
            .contains("node node-a was lost")),
        "{:?}",
        of_kind(&on_b, "error")
    );

    // A finds its lease gone and stops the run for its own client.
    let on_a = until_complete(&mut ws_a, &session).await;
    assert_eq!(on_a.last().unwrap()["success"], false);
    assert!(
        of_kind(&on_a, "error").iter().any(|e| e["content"]
            .as_str()
            .unwrap_or("")
            .contains("lost the session's lease")),
        "{:?}",
        of_kind(&on_a, "error")
    );
    log_line(a, "cluster.lease_lost").await;

    // Nothing more of that run reaches B: the next frame B gets is the
    // ack of a probe subscribe (the registry answers after all it sent).
    let (after, _) = ws_b.frames_before_probe(&session).await;
    let late: Vec<&Value> = after.iter().filter(|v| v["seq"].is_u64()).collect();
    assert!(
        late.is_empty(),
        "frames after the reaped run's complete: {late:?}"
    );
    // The session runs again (on B).
    send(&mut ws_b, &session, "text:2").await;
    let next = until_complete(&mut ws_b, &session).await;
    assert_eq!(next.last().unwrap()["success"], true, "{next:?}");
}

/// E4 across nodes: a reader on node B that stops for a moment while a
/// reader on node A keeps the run going. B's subscribers cannot withhold
/// A's batches, so B asks A to wait (a `Flow` notice on A's command stream,
/// renewed while it lasts): the run on A stops until B's reader reads
/// again, instead of racing ahead until B's reader is out of B's replay
/// buffer (4008). Then both get every event, in order, and nobody is closed.
#[actix_rt::test]
async fn a_reader_on_another_node_that_stops_for_a_moment_holds_the_run() {
    let cluster = TestCluster::start(2);
    let (_token, _project, session, mut reader, mut pausing) = alice_on_both(&cluster).await;
    // 30,000 deltas of 2 KB: a replay buffer (and the stream) keeps 10,000.
    send(&mut reader, &session, "text:30000 size:2000").await;
    let (first, _) = reader.recv_until_kind("stream_delta").await;
    let first = first["seq"].as_u64().unwrap();
    let ack = subscribe(&mut pausing, &session, Some(first - 1)).await;
    assert_eq!(ack["isProcessing"], true, "{ack}");
    // A run that went on without B's reader fails here.
    crate::delivery::pause_then_read_everything(&mut reader, &mut pausing, &session, first, 30_000)
        .await;
    assert!(
        !cluster.logs().contains("closing socket with 4008"),
        "a reader was closed as a slow consumer:\n{}",
        cluster.logs()
    );
}
