//! Cluster mode (`--redis-url`): three gateway nodes on one machine
//! (support::cluster: one fresh PostgreSQL database, the test's own
//! `redis-server`, one JWT secret) with the scripted stand-in CLI. What a
//! user of any node sees of a run on another: the whole run from seq 1
//! with no gap and one `complete`, fan-out to every node, abort and
//! permission answers from another node, a SIGKILLed owner or a restarted
//! Redis, racing sends, and ownership.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::chat::{of_kind, send, seqs, until_complete};
use crate::support::cluster::TestCluster;
use crate::util::{children_of, eventually, pid_alive, project_dir, WsClient};

const A: usize = 0;
const B: usize = 1;
const C: usize = 2;

/// A `/ws` client of `user` on node `i` (a token minted there, valid on all).
async fn client(cluster: &TestCluster, i: usize, user: &str) -> WsClient {
    let token = cluster.node(i).token(user);
    cluster.node(i).ws(&format!("/ws?token={token}")).await
}

/// Subscribes `ws` to `session` after `last_seq`; returns the ack.
async fn subscribe(ws: &mut WsClient, session: &str, last_seq: u64) -> Value {
    ws.send_json(
        json!({"type":"chat.subscribe","sessions":[{"sessionId": session, "lastSeq": last_seq}]}),
    )
    .await;
    loop {
        let v = ws.recv_json().await;
        if v["sessionId"] == session
            && (v["kind"] == "chat_subscribed" || v["kind"] == "protocol_error")
        {
            return v;
        }
    }
}

/// Starts a run of `script` on `ws` that first waits on a Bash permission
/// (so subscribers can attach while it is live, before anything streams);
/// returns the request id to release it with [`allow`], and the run's
/// events so far (the request last).
async fn start_gated(ws: &mut WsClient, session: &str, script: &str) -> (String, Vec<Value>) {
    send(ws, session, &format!("permission:Bash {script}")).await;
    let (request, before) = ws.recv_until_kind("permission_request").await;
    let mut events: Vec<Value> = before
        .into_iter()
        .filter(|v| v["sessionId"] == session && v["seq"].is_u64())
        .collect();
    let id = request["requestId"]
        .as_str()
        .expect("requestId")
        .to_string();
    events.push(request);
    (id, events)
}

async fn allow(ws: &mut WsClient, request_id: &str) {
    ws.send_json(json!({"type":"chat.permission-response","requestId": request_id, "allow": true}))
        .await;
}

/// [`subscribe`] to a run that is live on another node. That node may not
/// know of the run yet when the sender has just seen its first events (its
/// start reaches Redis a moment later) and answer `isProcessing: false`:
/// the subscribe is then repeated, each answered, until the run shows as
/// live (bounded by `WAIT`). The README says so.
async fn subscribe_live(ws: &mut WsClient, session: &str, last_seq: u64) -> Value {
    let deadline = Instant::now() + crate::util::WAIT;
    loop {
        let ack = subscribe(ws, session, last_seq).await;
        if ack["isProcessing"] == true || ack["kind"] != "chat_subscribed" {
            return ack;
        }
        assert!(
            Instant::now() < deadline,
            "the run never showed as live here: {ack}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The next frame of `session` that carries a seq.
async fn next_of(ws: &mut WsClient, session: &str) -> Value {
    loop {
        let v = ws.recv_json().await;
        if v["sessionId"] == session && v["seq"].is_u64() {
            return v;
        }
    }
}

/// Seqs are `from, from+1, ...` with nothing missing or repeated.
fn assert_contiguous_from(events: &[Value], from: u64, who: &str) {
    let s = seqs(events);
    let want: Vec<u64> = (from..from + s.len() as u64).collect();
    assert_eq!(s, want, "{who}: seqs are not contiguous from {from}");
}

/// After a `complete`: nothing more of the session arrives before a probe.
async fn assert_nothing_after(ws: &mut WsClient, session: &str, who: &str) {
    let (late, _) = ws.frames_before_probe(session).await;
    let late: Vec<&Value> = late.iter().filter(|v| v["sessionId"] == session).collect();
    assert!(
        late.is_empty(),
        "{who} got frames after the complete: {late:?}"
    );
}

/// What a user compares across clients: seq, kind and content.
fn digest(events: &[Value]) -> Vec<(u64, String, String)> {
    events
        .iter()
        .map(|e| {
            (
                e["seq"].as_u64().unwrap_or(0),
                e["kind"].as_str().unwrap_or("").to_string(),
                e["content"].to_string(),
            )
        })
        .collect()
}

/// A client on node B that subscribes while the run on node A waits on a
/// permission, and one on node C that joins mid-stream, both with
/// `lastSeq` 0, follow the run from seq 1: no gap, no duplicate, exactly
/// one `complete`, the same events as the sender on A.
#[actix_rt::test]
async fn a_client_on_another_node_follows_a_run_from_seq_1() {
    let cluster = TestCluster::start(3);
    let (_token, _project, session) = cluster.alice_session(A).await;
    let mut on_a = client(&cluster, A, "alice").await;
    let mut on_b = client(&cluster, B, "alice").await;
    let (request, mut a_events) = start_gated(&mut on_a, &session, "text:60 delay_ms:20").await;
    let ack = subscribe_live(&mut on_b, &session, 0).await;
    assert_eq!(
        (ack["kind"].clone(), ack["isProcessing"].clone()),
        (json!("chat_subscribed"), json!(true)),
        "{ack}"
    );
    assert_eq!(ack["runFirstSeq"], 1, "{ack}");
    let first = next_of(&mut on_b, &session).await;
    assert_eq!(first["seq"], 1, "B's first event: {first}");
    let mut b_events = vec![first];
    allow(&mut on_a, &request).await;
    // C joins while the run streams, asking for everything.
    loop {
        let v = next_of(&mut on_b, &session).await;
        let kind = v["kind"].clone();
        b_events.push(v);
        if kind == "stream_delta" {
            break;
        }
    }
    let mut on_c = client(&cluster, C, "alice").await;
    let ack = subscribe_live(&mut on_c, &session, 0).await;
    assert_eq!(ack["isProcessing"], true, "{ack}");
    assert_eq!(ack["runFirstSeq"], 1, "{ack}");
    assert_eq!(ack["replayTruncated"], false, "{ack}");

    a_events.extend(until_complete(&mut on_a, &session).await);
    b_events.extend(until_complete(&mut on_b, &session).await);
    let c_events = until_complete(&mut on_c, &session).await;
    for (who, events) in [("A", &a_events), ("B", &b_events), ("C", &c_events)] {
        assert_contiguous_from(events, 1, who);
        assert_eq!(of_kind(events, "complete").len(), 1, "{who}");
        assert_eq!(events.last().unwrap()["success"], true, "{who}");
        assert_eq!(of_kind(events, "stream_delta").len(), 60, "{who}");
    }
    assert_eq!(digest(&b_events), digest(&a_events));
    assert_eq!(digest(&c_events), digest(&a_events));
    let run_ids: BTreeSet<String> = b_events
        .iter()
        .filter_map(|e| e["runId"].as_str().map(str::to_string))
        .collect();
    assert_eq!(run_ids.len(), 1, "one runId on B: {run_ids:?}");
    assert_nothing_after(&mut on_b, &session, "B").await;
    assert_nothing_after(&mut on_c, &session, "C").await;
}

/// Fan-out: two clients on each of the three nodes, subscribed while the
/// run on A waits on a permission, receive the same run from seq 1, every
/// event once, in order.
#[actix_rt::test]
async fn fan_out_reaches_clients_on_all_three_nodes() {
    let cluster = TestCluster::start(3);
    let (_token, _project, session) = cluster.alice_session(A).await;
    let mut sender = client(&cluster, A, "alice").await;
    let (request, mut sent) = start_gated(&mut sender, &session, "text:300 size:32").await;
    let mut followers = Vec::new();
    for node in [A, B, C] {
        for _ in 0..2 {
            let mut ws = client(&cluster, node, "alice").await;
            let ack = subscribe_live(&mut ws, &session, 0).await;
            assert_eq!(ack["isProcessing"], true, "{ack}");
            followers.push((node, ws));
        }
    }
    allow(&mut sender, &request).await;
    sent.extend(until_complete(&mut sender, &session).await);
    assert_contiguous_from(&sent, 1, "sender");
    for (node, ws) in &mut followers {
        let got = until_complete(ws, &session).await;
        let who = crate::support::cluster::node_id(*node);
        assert_contiguous_from(&got, 1, &who);
        assert_eq!(digest(&got), digest(&sent), "{who}");
        assert_eq!(of_kind(&got, "complete").len(), 1, "{who}");
        assert_nothing_after(ws, &session, &who).await;
    }
}

/// A client on node C aborts a run on node A: the CLI on A is stopped and
/// every client, on A and C, gets one `complete` with `aborted: true`.
#[actix_rt::test]
async fn abort_sent_on_another_node_reaches_the_run() {
    let cluster = TestCluster::start(3);
    let (_token, _project, session) = cluster.alice_session(A).await;
    let mut on_a = client(&cluster, A, "alice").await;
    send(&mut on_a, &session, "text:5000 delay_ms:20").await;
    let first = next_of(&mut on_a, &session).await;
    let pids = children_of(cluster.node(A).pid());
    assert!(!pids.is_empty(), "no CLI process under node A");
    let mut on_c = client(&cluster, C, "alice").await;
    let ack = subscribe_live(&mut on_c, &session, first["seq"].as_u64().unwrap()).await;
    assert_eq!(ack["isProcessing"], true, "{ack}");
    next_of(&mut on_c, &session).await;

    on_c.send_json(json!({"type":"chat.abort","sessionId": session}))
        .await;
    for (who, ws) in [("A", &mut on_a), ("C", &mut on_c)] {
        let events = until_complete(ws, &session).await;
        let complete = events.last().unwrap();
        assert_eq!(
            (complete["aborted"].clone(), complete["success"].clone()),
            (json!(true), json!(false)),
            "{who}: {complete}"
        );
        assert!(
            of_kind(&events, "stream_delta").len() < 5000,
            "{who}: the run was not cut short"
        );
        assert_nothing_after(ws, &session, who).await;
    }
    for pid in pids {
        eventually("the CLI on node A gone after an abort from C", || {
            !pid_alive(pid)
        })
        .await;
    }
    // Nothing runs any more, on any node.
    on_c.send_json(json!({"type":"chat.abort","sessionId": session}))
        .await;
    loop {
        let v = on_c.recv_json().await;
        if v["kind"] == "protocol_error" {
            assert_eq!(v["code"], "NO_ACTIVE_RUN", "{v}");
            break;
        }
    }
}

/// A permission request of a run on node A is listed in `chat_subscribed`
/// on node C, answered there, and the answer reaches the CLI on A: the tool
/// runs in the project dir and the run completes.
#[actix_rt::test]
async fn a_permission_answer_sent_on_another_node_reaches_the_run() {
    let cluster = TestCluster::start(3);
    let (_token, project, session) = cluster.alice_session(A).await;
    let mut on_a = client(&cluster, A, "alice").await;
    send(&mut on_a, &session, "permission:Bash text:2").await;
    let (request, _) = on_a.recv_until_kind("permission_request").await;
    let request_id = request["requestId"].as_str().unwrap().to_string();

    let mut on_c = client(&cluster, C, "alice").await;
    let ack = subscribe_live(&mut on_c, &session, u64::MAX).await;
    assert_eq!(ack["isProcessing"], true, "{ack}");
    assert_eq!(
        ack["pendingPermissions"][0]["requestId"],
        request_id.as_str(),
        "pending on C: {ack}"
    );
    assert_eq!(ack["pendingPermissions"][0]["toolName"], "Bash", "{ack}");
    on_c.send_json(
        json!({"type":"chat.permission-response","requestId": request_id, "allow": true}),
    )
    .await;
    let events = until_complete(&mut on_a, &session).await;
    assert_eq!(events.last().unwrap()["success"], true, "{events:?}");
    let result = of_kind(&events, "tool_result");
    assert_eq!(result.len(), 1, "{events:?}");
    assert_eq!(result[0]["isError"], false, "{events:?}");
    assert!(
        project.path().join("allowed.txt").exists(),
        "the allowed tool did not run in the project dir"
    );
    let on_c_events = until_complete(&mut on_c, &session).await;
    assert_eq!(on_c_events.last().unwrap()["success"], true);
}

/// Node A is SIGKILLed mid-run: its lease runs out and clients on B and C
/// each get one failed `complete` naming the lost node, within the lease
/// time (plus one lease for the survivors to notice); the session runs
/// again at once, on B.
#[actix_rt::test]
async fn sigkill_of_the_owning_node_ends_the_run_everywhere_within_the_lease() {
    let mut cluster = TestCluster::start(3);
    let lease = Duration::from_millis(cluster.lease_ms);
    let (_token, _project, session) = cluster.alice_session(A).await;
    let mut on_a = client(&cluster, A, "alice").await;
    let mut on_b = client(&cluster, B, "alice").await;
    let mut on_c = client(&cluster, C, "alice").await;
    send(&mut on_a, &session, "text:100000 delay_ms:10").await;
    next_of(&mut on_a, &session).await;
    assert_eq!(
        subscribe_live(&mut on_b, &session, 0).await["isProcessing"],
        true
    );
    assert_eq!(
        subscribe_live(&mut on_c, &session, 0).await["isProcessing"],
        true
    );
    let mut seen_b = vec![next_of(&mut on_b, &session).await];
    let mut seen_c = vec![next_of(&mut on_c, &session).await];

    let _ = cluster.kill(A);
    let killed_at = Instant::now();
    for (who, ws, seen) in [("B", &mut on_b, &mut seen_b), ("C", &mut on_c, &mut seen_c)] {
        seen.extend(until_complete(ws, &session).await);
        let took = killed_at.elapsed();
        assert_contiguous_from(seen, 1, who);
        let complete = seen.last().unwrap();
        assert_eq!(complete["success"], false, "{who}: {complete}");
        assert_eq!(of_kind(seen, "complete").len(), 1, "{who}");
        let said = seen
            .iter()
            .rev()
            .take(3)
            .map(Value::to_string)
            .collect::<String>();
        assert!(
            said.contains("node node-a was lost"),
            "{who}: no frame names the lost node: {said}"
        );
        assert!(
            took <= lease * 2,
            "{who}: the failed complete came {took:?} after the kill (lease {lease:?})"
        );
        assert_nothing_after(ws, &session, who).await;
    }
    let last = *seqs(&seen_b).last().unwrap();
    send(&mut on_b, &session, "text:2").await;
    let again = until_complete(&mut on_b, &session).await;
    assert_eq!(again.last().unwrap()["success"], true, "{again:?}");
    // After a crash seq only has to go up (E9): the lost node's unused
    // reservation may be skipped.
    let next = again[0]["seq"].as_u64().unwrap();
    assert!(next > last, "{again:?}");
    assert_contiguous_from(&again, next, "B's next run");
}

/// Redis is SIGKILLed mid-run and started again (empty): the client on the
/// owning node keeps receiving the run meanwhile, a new run is refused
/// with CLUSTER_UNAVAILABLE while Redis is gone, and after it is back the
/// follower on node B has every event from seq 1 with no gap, one
/// `complete`, and new runs are taken again.
#[actix_rt::test]
async fn redis_killed_and_restarted_mid_run_leaves_no_gap() {
    let mut cluster = TestCluster::start(3);
    let (token, project, session) = cluster.alice_session(A).await;
    let other = cluster
        .node(A)
        .create_session(&token, "claude", project.path())
        .await;
    let mut on_a = client(&cluster, A, "alice").await;
    let mut on_b = client(&cluster, B, "alice").await;
    send(&mut on_a, &session, "text:400 delay_ms:20").await;
    let mut seen_a = vec![next_of(&mut on_a, &session).await];
    assert_eq!(
        subscribe_live(&mut on_b, &session, 0).await["isProcessing"],
        true
    );
    let mut seen_b = Vec::new();
    for _ in 0..5 {
        seen_b.push(next_of(&mut on_b, &session).await);
    }

    cluster.redis.kill();
    // The local client keeps receiving the local run.
    let at_kill = seen_b.last().unwrap()["seq"].as_u64().unwrap();
    loop {
        let v = next_of(&mut on_a, &session).await;
        let seq = v["seq"].as_u64().unwrap();
        seen_a.push(v);
        if seq >= at_kill + 20 {
            break;
        }
    }
    // A new run needs the cluster (its lease): refused, clearly.
    let mut on_c = client(&cluster, C, "alice").await;
    send(&mut on_c, &other, "text:1").await;
    let refused = loop {
        let v = on_c.recv_json().await;
        if v["sessionId"] == other.as_str() {
            break v;
        }
    };
    assert_eq!(
        (refused["kind"].clone(), refused["code"].clone()),
        (json!("protocol_error"), json!("CLUSTER_UNAVAILABLE")),
        "{refused}"
    );

    cluster.redis.restart();
    seen_a.extend(until_complete(&mut on_a, &session).await);
    seen_b.extend(until_complete(&mut on_b, &session).await);
    assert_contiguous_from(&seen_a, 1, "A");
    assert_contiguous_from(&seen_b, 1, "B");
    assert_eq!(digest(&seen_b), digest(&seen_a));
    assert_eq!(of_kind(&seen_b, "complete").len(), 1);
    assert_eq!(seen_b.last().unwrap()["success"], true);
    assert_nothing_after(&mut on_b, &session, "B").await;

    // Runs are taken again once the nodes are back on Redis; each try is
    // answered (refused or run), so this waits on events, not a clock.
    let deadline = Instant::now() + crate::util::WAIT;
    loop {
        send(&mut on_c, &other, "text:1").await;
        let v = loop {
            let v = on_c.recv_json().await;
            if v["sessionId"] == other.as_str()
                && (v["kind"] == "protocol_error" || v["kind"] == "complete")
            {
                break v;
            }
        };
        if v["kind"] == "complete" {
            assert_eq!(v["success"], true, "{v}");
            break;
        }
        assert_eq!(v["code"], "CLUSTER_UNAVAILABLE", "{v}");
        assert!(
            Instant::now() < deadline,
            "runs still refused after Redis came back"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Two nodes race `chat.send` on one session, several times: each time one
/// send gets RUN_IN_PROGRESS and the other starts the one run (held on a
/// permission): an observer on node C sees one live run with one pending
/// request, the running list has one entry, and after the answer the
/// observer sees that run end with one `complete`.
#[actix_rt::test]
async fn two_nodes_racing_chat_send_start_one_run() {
    let cluster = TestCluster::start(3);
    let (token, _project, session) = cluster.alice_session(A).await;
    let mut on_a = client(&cluster, A, "alice").await;
    let mut on_b = client(&cluster, B, "alice").await;
    let mut observer = client(&cluster, C, "alice").await;
    for round in 0..3 {
        // clientRequestId (E6): the sender whose send started the run is
        // told so by `chat_accepted`; frames of the session that a socket
        // also receives (its node follows the session) decide nothing.
        let frame = |id: &str| {
            json!({"type":"chat.send","sessionId": session, "content":"permission:Bash text:20",
                "clientRequestId": format!("race-{round}-{id}")})
        };
        tokio::join!(on_a.send_json(frame("a")), on_b.send_json(frame("b")));
        let (id_a, id_b) = (format!("race-{round}-a"), format!("race-{round}-b"));
        let (a, b) = tokio::join!(
            race_outcome(&mut on_a, &session, &id_a),
            race_outcome(&mut on_b, &session, &id_b)
        );
        let winners: Vec<&String> = [&a, &b].into_iter().flatten().collect();
        assert_eq!(
            winners.len(),
            1,
            "round {round}: one run and one RUN_IN_PROGRESS (A {a:?}, B {b:?})"
        );
        let run_id = winners[0].clone();
        // The run waits on its permission: the observer sees it live with
        // that one request (answered below by the winner).
        let ack = loop {
            let ack = subscribe_live(&mut observer, &session, 0).await;
            if ack["pendingPermissions"]
                .as_array()
                .is_some_and(|p| !p.is_empty())
            {
                break ack;
            }
        };
        assert_eq!(ack["isProcessing"], true, "round {round}: {ack}");
        assert_eq!(ack["runId"], run_id.as_str(), "round {round}: {ack}");
        let pending = ack["pendingPermissions"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        assert_eq!(pending.len(), 1, "round {round}: {ack}");
        let request_id = pending[0]["requestId"].as_str().unwrap().to_string();
        let (_, list) = cluster
            .node(C)
            .get("/api/providers/sessions/running", Some(&token))
            .await;
        assert_eq!(
            list["data"]["sessions"].as_array().map(Vec::len),
            Some(1),
            "round {round}: {list}"
        );
        let winner = if a.is_some() { &mut on_a } else { &mut on_b };
        allow(winner, &request_id).await;
        let watched = until_complete(&mut observer, &session).await;
        let run_ids: BTreeSet<&str> = watched.iter().filter_map(|e| e["runId"].as_str()).collect();
        assert_eq!(run_ids, BTreeSet::from([run_id.as_str()]), "round {round}");
        assert_eq!(of_kind(&watched, "complete").len(), 1, "round {round}");
        assert_eq!(of_kind(&watched, "stream_delta").len(), 20, "round {round}");
        until_complete(winner, &session).await;
        assert_nothing_after(&mut observer, &session, "observer").await;
    }
}

/// What a racing sender got: `Some(runId)` when its send (`client_id`)
/// started the run (`chat_accepted`), `None` for RUN_IN_PROGRESS.
async fn race_outcome(ws: &mut WsClient, session: &str, client_id: &str) -> Option<String> {
    loop {
        let v = ws.recv_json().await;
        if v["sessionId"] != session {
            continue;
        }
        if v["kind"] == "protocol_error" {
            assert_eq!(v["code"], "RUN_IN_PROGRESS", "{v}");
            return None;
        }
        if v["kind"] == "chat_accepted" {
            assert_eq!(v["clientRequestId"], client_id, "{v}");
            assert_eq!(v["duplicate"], false, "{v}");
            return Some(v["runId"].as_str().expect("runId").to_string());
        }
    }
}

/// Alice's session, running on node A, is invisible to Bob on every node:
/// not found over REST and `/ws`, not in his running list, no abort, no
/// send, and none of its frames or `session_upserted`; Alice's running list
/// on every node shows it on node-a.
#[actix_rt::test]
async fn a_users_session_is_invisible_to_another_user_on_every_node() {
    let cluster = TestCluster::start(3);
    let alice = cluster.node(A).token("alice");
    let project = project_dir();
    let session = cluster
        .node(A)
        .create_session(&alice, "claude", project.path())
        .await;
    let mut bobs = Vec::new();
    for node in [A, B, C] {
        let mut ws = client(&cluster, node, "bob").await;
        let bob = cluster.node(node).token("bob");
        let own = cluster
            .node(node)
            .create_session(&bob, "claude", project.path())
            .await;
        assert_eq!(subscribe(&mut ws, &own, 0).await["kind"], "chat_subscribed");
        bobs.push((node, ws, bob, own));
    }
    let mut alice_on_c = client(&cluster, C, "alice").await;
    let mut on_a = client(&cluster, A, "alice").await;
    send(&mut on_a, &session, "text:2000 delay_ms:10").await;
    next_of(&mut on_a, &session).await;
    // session_upserted reaches Alice's socket on another node.
    let (upserted, _) = alice_on_c.recv_until_kind("session_upserted").await;
    assert_eq!(upserted["sessionId"], session.as_str(), "{upserted}");

    for node in [A, B, C] {
        let (status, list) = cluster
            .node(node)
            .get("/api/providers/sessions/running", Some(&alice))
            .await;
        assert_eq!(status, 200, "{list}");
        let running = list["data"]["sessions"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        assert_eq!(running.len(), 1, "alice's list on node {node}: {list}");
        assert_eq!(running[0]["sessionId"], session.as_str());
        assert_eq!(running[0]["node"], "node-a", "{list}");
    }
    for (node, ws, bob, own) in &mut bobs {
        let server = cluster.node(*node);
        let (status, body) = server
            .get(&format!("/api/providers/sessions/{session}"), Some(bob))
            .await;
        assert_eq!(status, 404, "node {node}: {body}");
        let (_, list) = server
            .get("/api/providers/sessions/running", Some(bob))
            .await;
        assert_eq!(list["data"]["sessions"], json!([]), "node {node}: {list}");
        let refused = subscribe(ws, &session, 0).await;
        assert_eq!(
            refused["code"], "SESSION_NOT_FOUND",
            "node {node}: {refused}"
        );
        for attempt in [
            json!({"type":"chat.abort","sessionId": session}),
            json!({"type":"chat.send","sessionId": session, "content":"text:1"}),
        ] {
            ws.send_json(attempt.clone()).await;
            let v = loop {
                let v = ws.recv_json().await;
                if v["kind"] == "protocol_error" {
                    break v;
                }
            };
            assert!(
                v["code"] == "SESSION_NOT_FOUND" || v["code"] == "NO_ACTIVE_RUN",
                "node {node}, {attempt}: {v}"
            );
        }
        let (seen, _) = ws.frames_before_probe(own).await;
        let leaked: Vec<&Value> = seen
            .iter()
            .filter(|v| v["sessionId"] == session.as_str())
            .collect();
        assert!(leaked.is_empty(), "bob on node {node} saw {leaked:?}");
    }
    // Bob's attempts did not disturb the run: it still runs, on node A.
    let (_, list) = cluster
        .node(B)
        .get("/api/providers/sessions/running", Some(&alice))
        .await;
    assert_eq!(list["data"]["sessions"][0]["node"], "node-a", "{list}");
    let (so_far, _) = on_a.frames_before_probe(&session).await;
    assert!(of_kind(&so_far, "complete").is_empty(), "{so_far:?}");
    on_a.send_json(json!({"type":"chat.abort","sessionId": session}))
        .await;
    let events = until_complete(&mut on_a, &session).await;
    assert_eq!(
        events.last().unwrap()["aborted"],
        true,
        "{:?}",
        events.last()
    );
}

/// The next `/shell` frame that says something: `Ok(output)` or `Err(error message)`.
async fn shell_answer(ws: &mut WsClient) -> Result<String, String> {
    let v = ws.recv_json().await;
    match v["type"].as_str() {
        Some("output") => Ok(v["data"].as_str().unwrap_or_default().to_string()),
        Some("error") => Err(v["message"].as_str().unwrap_or_default().to_string()),
        _ => panic!("unexpected /shell frame {v}"),
    }
}

/// Reads `/shell` output until it contains `needle`; panics on an error frame.
async fn shell_until(ws: &mut WsClient, needle: &str) {
    let mut out = String::new();
    while !out.contains(needle) {
        match shell_answer(ws).await {
            Ok(data) => out.push_str(&data),
            Err(e) => panic!("error frame while waiting for {needle:?}: {e}"),
        }
    }
}

/// `/shell` PTYs stay on their node: a terminal opened on node A is
/// refused on node B with an error naming node-a (another user's equal key
/// opens there), until it exits on A; then B may open it, and A refuses it
/// naming node-b. `/api/plugins` says which node runs the plugin servers.
#[actix_rt::test]
async fn a_terminal_stays_on_its_node_and_plugins_name_their_node() {
    let cluster = TestCluster::start_full(
        2,
        crate::support::cluster::TEST_LEASE_MS,
        |_, data| {
            crate::plugins::echo_plugin(data, "echo");
        },
        |_, _| {},
    );
    let alice = cluster.node(A).token("alice");
    let project = project_dir();
    let init = json!({"type":"init","projectPath": project.path(), "sessionId":"term-1",
        "isPlainShell": true, "initialCommand": "cat"});
    let mut on_a = cluster.node(A).ws(&format!("/shell?token={alice}")).await;
    on_a.send_json(init.clone()).await;
    shell_answer(&mut on_a)
        .await
        .expect("the terminal opens on node A");
    let held = cluster.redis.command(&["KEYS", "agentgate:pty:*"]).unwrap();
    assert_eq!(held.lines().count(), 1, "placement keys: {held}");
    assert_eq!(
        cluster.redis.command(&["GET", held.trim()]).as_deref(),
        Ok("node-a")
    );

    let mut on_b = cluster.node(B).ws(&format!("/shell?token={alice}")).await;
    on_b.send_json(init.clone()).await;
    let refused = shell_answer(&mut on_b)
        .await
        .expect_err("refused on node B");
    assert!(refused.contains("node-a"), "{refused}");
    // Another user's terminal with the same key is theirs, on node B.
    let bob = cluster.node(B).token("bob");
    let mut bob_on_b = cluster.node(B).ws(&format!("/shell?token={bob}")).await;
    bob_on_b.send_json(init.clone()).await;
    shell_answer(&mut bob_on_b)
        .await
        .expect("bob's terminal opens on B");

    // The PTY on A ends (cat reads EOF): its key is released.
    on_a.send_json(json!({"type":"input","data":"\u{4}"})).await;
    shell_until(&mut on_a, "Process exited with code").await;
    // The release reaches Redis asynchronously: each init is answered (error
    // or output), so this waits on answers, bounded.
    let deadline = Instant::now() + crate::util::WAIT;
    loop {
        let mut ws = cluster.node(B).ws(&format!("/shell?token={alice}")).await;
        ws.send_json(init.clone()).await;
        match shell_answer(&mut ws).await {
            Ok(_) => {
                on_b = ws;
                break;
            }
            Err(e) => {
                assert!(e.contains("node-a"), "{e}");
                assert!(Instant::now() < deadline, "the key stayed on node-a: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    let mut again_a = cluster.node(A).ws(&format!("/shell?token={alice}")).await;
    again_a.send_json(init).await;
    let refused = shell_answer(&mut again_a)
        .await
        .expect_err("refused on node A now");
    assert!(refused.contains("node-b"), "{refused}");
    drop(on_b);

    for node in [A, B] {
        let (status, body) = cluster.node(node).get("/api/plugins", Some(&alice)).await;
        assert_eq!(status, 200, "{body}");
        let plugins = body["data"]["plugins"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        assert_eq!(plugins.len(), 1, "{body}");
        assert_eq!(plugins[0]["name"], "echo");
        assert_eq!(
            plugins[0]["node"],
            crate::support::cluster::node_id(node).as_str(),
            "{body}"
        );
    }
}
