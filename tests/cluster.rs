//! Gateways on PostgreSQL (`--database-url postgres://...`, a fresh database
//! per test on the machine's server, see support::postgres) with the
//! scripted stand-in CLI: the session and its seq survive a restart, and two
//! gateways sharing the database never hand out the same seq.

use std::collections::BTreeSet;

use serde_json::json;

use crate::chat::{send, seqs, until_complete};
use crate::support::postgres::TestDatabase;
use crate::util::{example_bin, project_dir, TestServer, WsClient};

fn gateway_on(db: &TestDatabase, data: tempfile::TempDir) -> TestServer {
    TestServer::start_on(data, Some(&db.url), |cmd| {
        cmd.arg("--claude-bin").arg(example_bin("fake_claude"));
    })
}

/// One run of `script` on `session`; its seqs, checked contiguous.
async fn run(ws: &mut WsClient, session: &str, script: &str) -> Vec<u64> {
    send(ws, session, script).await;
    let events = until_complete(ws, session).await;
    assert_eq!(events.last().unwrap()["success"], true, "{events:?}");
    let s = seqs(&events);
    assert!(s.windows(2).all(|w| w[1] == w[0] + 1), "gap in {s:?}");
    s
}

/// The row's `lastSeq` over REST once the background write landed.
async fn persisted_seq(server: &TestServer, token: &str, session: &str, want: u64) -> u64 {
    let path = format!("/api/providers/sessions/{session}");
    let mut persisted = 0;
    for _ in 0..250 {
        let (status, body) = server.get(&path, Some(token)).await;
        assert_eq!(status, 200, "{body}");
        persisted = body["data"]["lastSeq"].as_u64().unwrap_or(0);
        if persisted == want {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    persisted
}

/// A real chat run on PostgreSQL; the gateway is SIGKILLed and started again
/// on the same database: the session is there, and seq continues above it.
#[actix_rt::test]
async fn postgres_gateway_keeps_the_session_and_seq_across_a_restart() {
    let db = TestDatabase::create();
    let server = gateway_on(&db, tempfile::tempdir().unwrap());
    let token = server.token("alice");
    let project = project_dir();
    let session = server
        .create_session(&token, "claude", project.path())
        .await;
    let mut ws = server.ws(&format!("/ws?token={token}")).await;
    let first = run(&mut ws, &session, "text:3").await;
    let last = *first.last().unwrap();
    assert_eq!(persisted_seq(&server, &token, &session, last).await, last);

    let data = server.kill_keep_data();
    // Everything is in PostgreSQL: no SQLite file was made beside the secret.
    assert!(
        !data.path().join("agentgate.db").exists(),
        "a SQLite database was created although --database-url is PostgreSQL"
    );
    let server = gateway_on(&db, data);
    let (status, row) = server
        .get(&format!("/api/providers/sessions/{session}"), Some(&token))
        .await;
    assert_eq!(status, 200, "{row}");
    assert_eq!(row["data"]["lastSeq"], last);
    let mut ws = server.ws(&format!("/ws?token={token}")).await;
    ws.send_json(json!({"type":"chat.subscribe","sessions":[{"sessionId": session}]}))
        .await;
    let ack = ws.recv_json().await;
    assert_eq!(ack["isProcessing"], false, "{ack}");
    assert!(ack["lastSeq"].as_u64().unwrap() >= last, "{ack}");
    let second = run(&mut ws, &session, "text:2").await;
    assert!(
        second[0] > last,
        "seq went back after a restart: {second:?} after {last}"
    );
    // The history the first run recorded was read back from PostgreSQL.
    let (status, history) = server
        .get(
            &format!("/api/providers/sessions/{session}/messages"),
            Some(&token),
        )
        .await;
    assert_eq!(status, 200, "{history}");
    assert!(history.to_string().contains("text:3"), "{history}");
}

/// Two gateways on one database run the same session at once (nothing
/// stops that before cluster mode's leases): B's run holds a block of seqs
/// while waiting for a permission, A's run takes seqs above that block, and
/// when B's run needs its next block it continues above A's. No seq is used
/// twice (B's client sees a jump instead).
#[actix_rt::test]
async fn two_gateways_running_one_session_never_repeat_a_seq() {
    let db = TestDatabase::create();
    let a = gateway_on(&db, tempfile::tempdir().unwrap());
    let b = gateway_on(&db, tempfile::tempdir().unwrap());
    // The users are shared; each gateway signs with its own data dir's secret.
    let (token_a, token_b) = (a.token("alice"), b.token("alice"));
    let project = project_dir();
    let session = a.create_session(&token_a, "claude", project.path()).await;
    let mut ws_a = a.ws(&format!("/ws?token={token_a}")).await;
    let mut ws_b = b.ws(&format!("/ws?token={token_b}")).await;

    // More deltas than one block of seqs (10,000) holds.
    send(&mut ws_b, &session, "permission:Bash text:12000").await;
    let (request, before) = ws_b.recv_until_kind("permission_request").await;
    let mut on_b = seqs(&before);
    on_b.extend(request["seq"].as_u64());
    let on_a = run(&mut ws_a, &session, "text:3").await;
    ws_b.send_json(
        json!({"type":"chat.permission-response","requestId": request["requestId"], "allow": true}),
    )
    .await;
    let events = until_complete(&mut ws_b, &session).await;
    assert_eq!(events.last().unwrap()["success"], true);
    on_b.extend(seqs(&events));
    assert!(on_b.len() > 12_000, "{} events on B", on_b.len());
    assert!(on_b.windows(2).all(|w| w[1] > w[0]), "B's seqs go back");
    let on_b: BTreeSet<u64> = on_b.into_iter().collect();
    let twice: Vec<&u64> = on_a.iter().filter(|s| on_b.contains(s)).collect();
    assert!(twice.is_empty(), "seqs used by both gateways: {twice:?}");
}

/// The tests' own Redis (support::redis): it answers on its port, a SIGKILL
/// closes the port, and a restart brings it back on the same port, empty
/// (nothing is persisted), as the Redis-loss tests need.
#[test]
fn test_redis_is_killed_and_restarted_on_its_port() {
    use crate::support::redis::TestRedis;
    let mut redis = TestRedis::start();
    let port = redis.port();
    assert_eq!(redis.url(), format!("redis://127.0.0.1:{port}"));
    assert_eq!(redis.command(&["SET", "k", "v"]).as_deref(), Ok("OK"));
    assert_eq!(redis.command(&["GET", "k"]).as_deref(), Ok("v"));
    let pid = redis.pid().expect("running") as i32;
    redis.kill();
    assert!(
        !crate::util::pid_alive(pid),
        "redis-server survived SIGKILL"
    );
    assert!(!redis.alive(), "port {port} still answers after the kill");
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err());
    redis.restart();
    assert_eq!(redis.port(), port);
    assert!(redis.alive());
    assert_eq!(redis.command(&["GET", "k"]).as_deref(), Ok("(nil)"));
    assert!(redis.command(&["NOSUCHCOMMAND"]).is_err());
}
