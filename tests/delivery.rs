//! Delivery that loses nothing (PROTOCOL.md E4, E6-E9): flow control for
//! slow readers, stuck clients cut off, catch-up after completion, per-socket
//! watermarks, crash-safe seq and faults, against a real gateway with the
//! scripted `fake_claude` and real bash PTYs.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::chat::{next_event, of_kind, send, seqs, until_complete};
use crate::util::{eventually, example_bin, project_dir, rss_kib, TestServer, WsClient, WsEvent};

/// Heartbeat for these tests: a stuck client is cut off after two of them.
const HEARTBEAT_SECS: u64 = 2;

fn server() -> TestServer {
    TestServer::start_with(|cmd| {
        cmd.arg("--claude-bin")
            .arg(example_bin("fake_claude"))
            .arg("--heartbeat-secs")
            .arg(HEARTBEAT_SECS.to_string());
    })
}

#[path = "../examples/loadgen/conns.rs"]
mod conns;
pub use conns::client_ports as gateway_conns;

/// Waits until the gateway holds exactly one connection more than `before`, and returns its client port.
pub async fn new_conn(server: &TestServer, before: &std::collections::HashSet<u16>) -> u16 {
    let (pid, port) = (server.pid(), server.addr.port());
    let mut found = None;
    eventually("the gateway holds the new connection", || {
        let now = gateway_conns(pid, port);
        found = now.difference(before).next().copied();
        found.is_some()
    })
    .await;
    found.unwrap()
}

/// A `/ws` client that sends a run of ~20 MB and then never reads is cut off
/// by the gateway (its descriptor closes while the client still holds the
/// connection) within a few heartbeat intervals, and the run, paused for it,
/// then completes. A client that had seen the first event and resubscribes
/// gets the rest, `complete` included (E7), without a gap.
#[actix_rt::test]
async fn a_chat_client_that_stops_reading_is_cut_off_and_loses_nothing() {
    let server = server();
    let (token, _project, session) = server.alice_session().await;
    let (pid, port) = (server.pid(), server.addr.port());
    let before = gateway_conns(pid, port);
    let mut stuck = server.ws(&format!("/ws?token={token}")).await;
    let conn = new_conn(&server, &before).await;
    send(&mut stuck, &session, "text:5000 size:4000").await;
    let started = Instant::now();
    // The client reads nothing from here on; it keeps its end open.
    eventually("the stuck connection is dropped by the gateway", || {
        !gateway_conns(pid, port).contains(&conn)
    })
    .await;
    let cut_after = started.elapsed();
    assert!(
        cut_after < Duration::from_secs(8 * HEARTBEAT_SECS),
        "cut off only after {cut_after:?}"
    );
    assert!(
        server.logs().contains("stuck"),
        "no supervision log line for the stuck socket"
    );
    // The run was not lost: once it completed, a client that saw seq 1 gets
    // 2..=complete (its socket opened only then: unread, it would miss pings).
    for _ in 0..1500 {
        let (_, row) = server
            .get("/api/providers/sessions/running", Some(&token))
            .await;
        if row["data"]["sessions"]
            .as_array()
            .is_some_and(|s| s.is_empty())
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut ws = server.ws(&format!("/ws?token={token}")).await;
    ws.send_json(
        json!({"type":"chat.subscribe","sessions":[{"sessionId": session, "lastSeq": 1}]}),
    )
    .await;
    let ack = ws.recv_json().await;
    assert_eq!(ack["kind"], "chat_subscribed");
    assert_eq!(ack["isProcessing"], false, "{ack}");
    assert_eq!(ack["replayTruncated"], false, "{ack}");
    let events = until_complete(&mut ws, &session).await;
    let s = seqs(&events);
    assert_eq!(s[0], 2);
    assert!(s.windows(2).all(|w| w[1] == w[0] + 1), "gap in the replay");
    assert_eq!(of_kind(&events, "stream_delta").len(), 4999);
    assert_eq!(events.last().unwrap()["success"], true);
    drop(stuck);
}

/// A reader ten times slower than the provider is never closed and gets
/// every event: the run is paused for it (the provider blocks on its pipe)
/// and the gateway's memory stays bounded.
#[actix_rt::test]
async fn a_slow_reader_pauses_the_run_and_gets_everything() {
    let server = server();
    let (token, _project, session) = server.alice_session().await;
    let mut ws = server.ws(&format!("/ws?token={token}")).await;
    // 30,000 deltas of 2 KB (60 MB): more than the replay buffer and every
    // socket budget together, so without pausing something would be lost.
    send(&mut ws, &session, "text:30000 size:2000").await;
    let rss_before = rss_kib(server.pid());
    let mut seq_prev = 0;
    let mut deltas = 0;
    let mut peak = 0;
    loop {
        let v = match ws.recv().await {
            WsEvent::Text(t) => serde_json::from_str::<Value>(&t).unwrap(),
            other => panic!("the slow reader was cut off: {other:?}"),
        };
        let Some(seq) = v["seq"].as_u64() else {
            continue;
        };
        assert_eq!(seq, seq_prev + 1, "gap or duplicate");
        seq_prev = seq;
        if v["kind"] == "stream_delta" {
            deltas += 1;
            if deltas % 500 == 0 {
                // Slower than the provider: about 25 MB/s at most.
                tokio::time::sleep(Duration::from_millis(40)).await;
                peak = peak.max(rss_kib(server.pid()));
            }
        }
        if v["kind"] == "complete" {
            assert_eq!(v["success"], true);
            break;
        }
    }
    assert_eq!(deltas, 30_000);
    let grown = peak.saturating_sub(rss_before);
    assert!(
        grown < 48 * 1024,
        "gateway RSS grew by {grown} KiB while a slow reader followed a 60 MB run"
    );
}

/// E8: a repeated `chat.subscribe` on a socket that follows a live run
/// replays nothing it was already sent (the reference's web UI re-sends it
/// mid-run).
#[actix_rt::test]
async fn a_repeated_subscribe_never_sends_a_seq_twice() {
    let server = server();
    let (token, _project, session) = server.alice_session().await;
    let mut ws = server.ws(&format!("/ws?token={token}")).await;
    send(&mut ws, &session, "text:300 delay_ms:5").await;
    let first = next_event(&mut ws).await;
    assert_eq!(first["seq"], 1);
    for last in [0, 1] {
        ws.send_json(
            json!({"type":"chat.subscribe","sessions":[{"sessionId": session, "lastSeq": last}]}),
        )
        .await;
    }
    let mut seen = vec![1];
    let mut acks = 0;
    loop {
        let v = ws.recv_json().await;
        if v["kind"] == "chat_subscribed" {
            acks += 1;
            continue;
        }
        if let Some(seq) = v["seq"].as_u64() {
            seen.push(seq);
        }
        if v["kind"] == "complete" {
            break;
        }
    }
    assert_eq!(acks, 2);
    let mut sorted = seen.clone();
    sorted.dedup();
    assert_eq!(sorted.len(), seen.len(), "a seq arrived twice");
    assert!(seen.windows(2).all(|w| w[1] == w[0] + 1), "gap or reorder");
}

/// E7: a completed run is replayed (with its `complete`) to a subscriber
/// that had reached it, and not at all to one with `lastSeq` 0 or before
/// the run.
#[actix_rt::test]
async fn completed_run_catch_up_only_for_subscribers_that_reached_it() {
    let server = server();
    let (token, project, session) = server.alice_session().await;
    let mut ws = server.ws(&format!("/ws?token={token}")).await;
    send(&mut ws, &session, "text:3").await;
    let run1 = until_complete(&mut ws, &session).await;
    send(&mut ws, &session, "text:5").await;
    let run2 = until_complete(&mut ws, &session).await;
    let first2 = seqs(&run2)[0];
    let last1 = *seqs(&run1).last().unwrap();
    assert_eq!(first2, last1 + 1);

    // A second, idle session marks the end of what a subscribe sent: its
    // ack comes right after the first entry's ack and replay.
    let marker = server
        .create_session(&token, "claude", project.path())
        .await;
    let subscribe = |last: u64| {
        json!({"type":"chat.subscribe","sessions":[
            {"sessionId": session, "lastSeq": last},
            {"sessionId": marker},
        ]})
    };
    for (last, expect) in [
        (0, None),
        (1, None),
        (last1, Some(first2)),
        (first2 + 1, Some(first2 + 2)),
    ] {
        let mut c = server.ws(&format!("/ws?token={token}")).await;
        c.send_json(subscribe(last)).await;
        let ack = c.recv_json().await;
        assert_eq!(ack["kind"], "chat_subscribed");
        assert_eq!(ack["runFirstSeq"], first2);
        let mut replayed = Vec::new();
        loop {
            let v = c.recv_json().await;
            if v["kind"] == "chat_subscribed" {
                assert_eq!(v["sessionId"], marker);
                break;
            }
            replayed.push(v);
        }
        match expect {
            None => assert!(
                replayed.is_empty(),
                "lastSeq {last}: a completed run was replayed: {replayed:?}"
            ),
            Some(from) => {
                assert_eq!(seqs(&replayed)[0], from, "lastSeq {last}");
                assert_eq!(replayed.last().unwrap()["kind"], "complete");
                let s = seqs(&replayed);
                assert!(s.windows(2).all(|w| w[1] == w[0] + 1));
            }
        }
    }
}

/// E7 with E4: a subscriber more than 5,000 events (half the replay buffer)
/// behind a completed run gets all of it and its `complete`, streamed in
/// budgeted deliveries, and is not closed as far behind: the run no longer
/// moves on without it.
#[actix_rt::test]
async fn a_subscriber_far_behind_a_completed_run_catches_up() {
    let server = server();
    let (token, _project, session) = server.alice_session().await;
    let mut ws = server.ws(&format!("/ws?token={token}")).await;
    send(&mut ws, &session, "text:7000").await;
    let run = seqs(&until_complete(&mut ws, &session).await);
    let (first, last) = (run[0], *run.last().unwrap());
    assert!(last - first > 5_000, "{first}..{last}");

    let mut c = server.ws(&format!("/ws?token={token}")).await;
    c.send_json(
        json!({"type":"chat.subscribe","sessions":[{"sessionId": session, "lastSeq": first}]}),
    )
    .await;
    let ack = c.recv_json().await;
    assert_eq!(ack["kind"], "chat_subscribed", "{ack}");
    let replayed = seqs(&until_complete(&mut c, &session).await);
    assert_eq!(replayed, (first + 1..=last).collect::<Vec<_>>());
}

/// E4's far-behind rule: a subscriber that reads nothing while another
/// keeps a live run going, 8,000 events behind (more than half the replay
/// buffer of 10,000; its lag is shared frames, no memory of its own), is not
/// closed while the buffer still holds what it lacks: once it reads again it
/// gets every event of the run, in order, and no 4008. (A subscriber about
/// to lose events is closed with 4008 and catches up by resubscribing:
/// `run_registry::tests::far_behind_is_closed_before_its_events_leave_and_catches_up`.)
#[actix_rt::test]
async fn a_subscriber_far_behind_within_the_buffer_is_not_closed() {
    // A long heartbeat: the watchdog's no-progress rule stays out of it.
    let server = TestServer::start_with(|cmd| {
        cmd.arg("--claude-bin")
            .arg(example_bin("fake_claude"))
            .args(["--heartbeat-secs", "60"]);
    });
    let (token, _project, session) = server.alice_session().await;
    let mut reader = server.ws(&format!("/ws?token={token}")).await;
    let mut behind = server.ws(&format!("/ws?token={token}")).await;
    send(&mut reader, &session, "text:8000 size:2000").await;
    let (first, _) = reader.recv_until_kind("stream_delta").await;
    let first = first["seq"].as_u64().unwrap();
    behind
        .send_json(json!({"type":"chat.subscribe","sessions":[{"sessionId": session, "lastSeq": first - 1}]}))
        .await;
    // `behind` reads nothing until the run has completed for `reader`.
    let run = seqs(&until_complete(&mut reader, &session).await);
    let last = *run.last().unwrap();
    assert!(last - first >= 7_999, "{first}..{last}");
    // (A `session_upserted` for the user's sockets may come first.)
    let (ack, _) = behind.recv_until_kind("chat_subscribed").await;
    assert_eq!(ack["isProcessing"], true, "{ack}");
    let events = until_complete(&mut behind, &session).await;
    assert_eq!(seqs(&events), (first..=last).collect::<Vec<_>>());
    assert_eq!(of_kind(&events, "stream_delta").len(), 8_000);
    assert!(
        !server.logs().contains("closing socket with 4008"),
        "a subscriber was closed as a slow consumer"
    );
}

/// E4 for a reader that stops for a moment (a busy client, or one a busy
/// machine serves last) while another keeps the run going: it falls far
/// behind, but its socket wrote within the last heartbeat interval, so the
/// run waits for it (it holds the run) instead of closing it with 4008; when it reads
/// again it gets every event, and the run goes on for both. (One that stops
/// for good is closed: `run_registry::tests::a_holder_that_stops_reading_is_closed_a_heartbeat_later`.)
#[actix_rt::test]
async fn a_reader_that_stops_for_a_moment_holds_the_run_and_loses_nothing() {
    let server = server();
    let (token, _project, session) = server.alice_session().await;
    let mut reader = server.ws(&format!("/ws?token={token}")).await;
    let mut pausing = server.ws(&format!("/ws?token={token}")).await;
    // 30,000 deltas of 2 KB: the replay buffer keeps 10,000 of them.
    send(&mut reader, &session, "text:30000 size:2000").await;
    let (first, _) = reader.recv_until_kind("stream_delta").await;
    let first = first["seq"].as_u64().unwrap();
    pausing
        .send_json(json!({"type":"chat.subscribe","sessions":[{"sessionId": session, "lastSeq": first - 1}]}))
        .await;
    let (ack, _) = pausing.recv_until_kind("chat_subscribed").await;
    assert_eq!(ack["isProcessing"], true, "{ack}");
    pause_then_read_everything(&mut reader, &mut pausing, &session, first, 30_000).await;
    assert!(
        !server.logs().contains("closing socket with 4008"),
        "a reader was closed as a slow consumer"
    );
}

/// The rest of a hold test: `pausing`, subscribed from `first`, reads one
/// delta and then nothing while `reader` reads on, until the run stops
/// (it waits for `pausing`) or 20,000 events later (it went on without it;
/// more than a replay buffer reaches: `pausing` was closed or lost events).
/// Then both read on (a reader that stopped now would hold the run in
/// turn) to the run's end. Asserts that the run waited and that both got
/// every seq from `first`, in order, `deltas` deltas among them.
pub async fn pause_then_read_everything(
    reader: &mut WsClient,
    pausing: &mut WsClient,
    session: &str,
    first: u64,
    deltas: usize,
) {
    let mut paused_events = vec![pausing.recv_until_kind("stream_delta").await.0];
    let paused_at = paused_events[0]["seq"].as_u64().unwrap();
    let mut reader_events = vec![first];
    let held = loop {
        match reader.recv_within(Duration::from_millis(500)).await {
            None => break true,
            Some(WsEvent::Text(t)) => {
                let v: Value = serde_json::from_str(&t).unwrap();
                let Some(seq) = v["seq"].as_u64() else {
                    continue;
                };
                reader_events.push(seq);
                assert_ne!(v["kind"], "complete", "the run ended without waiting");
                if seq > paused_at + 20_000 {
                    break false;
                }
            }
            other => panic!("the reader got {other:?}"),
        }
    };
    let resumed = async {
        loop {
            let v = match pausing.recv().await {
                WsEvent::Text(t) => serde_json::from_str::<Value>(&t).unwrap(),
                other => panic!(
                    "the paused reader got {other:?} after seq {:?}",
                    seqs(&paused_events).last()
                ),
            };
            if v["seq"].is_u64() {
                let done = v["kind"] == "complete";
                paused_events.push(v);
                if done {
                    break;
                }
            }
        }
    };
    let (_, rest) = tokio::join!(resumed, until_complete(reader, session));
    assert!(held, "the run went on 20,000 events past the paused reader");
    let got = seqs(&paused_events);
    let last = *got.last().unwrap();
    assert_eq!(got, (first..=last).collect::<Vec<_>>());
    assert_eq!(of_kind(&paused_events, "stream_delta").len(), deltas);
    reader_events.extend(seqs(&rest));
    assert_eq!(reader_events, (first..=last).collect::<Vec<_>>());
}

/// E4 with a kept place: a reader that stops for good while another keeps
/// the run going is closed with 4008 (once it no longer counts as reading,
/// or its hold time is spent). Its client reads what came before the close
/// and resubscribes with its `lastSeq` only once the run has gone on past
/// what the replay buffer's bounds keep (32 MiB: about 4,100 events of
/// 8 KB): its place was kept for it (the events it lacks stayed beyond the
/// bounds), so the ack says nothing was cut (`replayTruncated` false) and
/// it gets every event after its `lastSeq`, in order, to the run's
/// `complete`. The run is paced (1 event per 2 ms), so where it is when the
/// client resubscribes does not depend on the machine's speed, and a debug
/// build on a loaded machine serves both readers with room to spare (the
/// resubscriber must read faster than the run to catch up; its place stays
/// while it does).
#[actix_rt::test]
async fn a_reader_closed_with_4008_that_resubscribes_in_time_loses_nothing() {
    // A 30 s heartbeat: the stopped client is closed with 4008 once its
    // hold time is spent (2 s plus a quarter of the run's), long before a
    // missed ping or the watchdog (two intervals without progress) would
    // drop it, even on a loaded machine.
    let server = TestServer::start_with(|cmd| {
        cmd.arg("--claude-bin")
            .arg(example_bin("fake_claude"))
            .args(["--heartbeat-secs", "30"]);
    });
    let (token, _project, session) = server.alice_session().await;
    let mut reader = server.ws(&format!("/ws?token={token}")).await;
    let mut stopping = server.ws(&format!("/ws?token={token}")).await;
    send(&mut reader, &session, "text:8000 size:8000 delay_ms:2").await;
    let (first, _) = reader.recv_until_kind("stream_delta").await;
    let first = first["seq"].as_u64().unwrap();
    stopping
        .send_json(json!({"type":"chat.subscribe","sessions":[{"sessionId": session, "lastSeq": first - 1}]}))
        .await;
    let (ack, _) = stopping.recv_until_kind("chat_subscribed").await;
    assert_eq!(ack["isProcessing"], true, "{ack}");
    let mut stopped_events = vec![stopping.recv_until_kind("stream_delta").await.0];
    // The reader reads on to the end and says how far it got. It keeps up
    // with the run (4 MB/s) even in a debug build on a loaded machine: it
    // looks at each 8 KB delta's head only (`seq_and_kind`).
    let (newest_tx, mut newest) = tokio::sync::watch::channel(first);
    let read_all = async {
        let mut got = vec![first];
        loop {
            let t = match reader.recv().await {
                WsEvent::Text(t) => t,
                other => panic!("the reader got {other:?}"),
            };
            let Some((seq, kind)) = seq_and_kind(&t) else {
                continue;
            };
            got.push(seq);
            let _ = newest_tx.send(seq);
            if kind == "complete" {
                return got;
            }
        }
    };
    let rejoin = async {
        let mut stopping = stopping;
        // `stopping` reads nothing until the gateway has closed it.
        eventually("the stopped reader is closed with 4008", || {
            server.logs().contains("closing socket with 4008")
        })
        .await;
        let code = loop {
            match stopping.recv().await {
                WsEvent::Text(t) => {
                    let v: Value = serde_json::from_str(&t).unwrap();
                    if v["seq"].is_u64() {
                        stopped_events.push(v);
                    }
                }
                WsEvent::Close(code, _) => break code,
                other => panic!("the stopped reader got {other:?}"),
            }
        };
        assert_eq!(code, Some(4008));
        // Gone at once (it never answers the close), not at the server's shutdown.
        drop(stopping);
        let last = *seqs(&stopped_events).last().unwrap();
        // Past the buffer's bounds: without its place, seq last + 1 is gone
        // (and within the half more a place may keep: about 6,100 events).
        let reached = *newest.wait_for(|s| *s >= last + 4_300).await.unwrap();
        assert!(
            reached < last + 5_800,
            "the run ran {reached} - {last} past it"
        );
        let mut again = server.ws(&format!("/ws?token={token}")).await;
        again
            .send_json(json!({"type":"chat.subscribe","sessions":[{"sessionId": session, "lastSeq": last}]}))
            .await;
        let (ack, _) = again.recv_until_kind("chat_subscribed").await;
        assert_eq!(ack["replayTruncated"], false, "{ack}");
        let mut rest = Vec::new();
        loop {
            match again.recv().await {
                WsEvent::Text(t) => match seq_and_kind(&t) {
                    Some((seq, kind)) => {
                        rest.push((seq, kind == "stream_delta"));
                        if kind == "complete" {
                            break;
                        }
                    }
                    None => continue,
                },
                other => panic!("the resubscriber got {other:?}"),
            }
        }
        (last, rest)
    };
    let (got, (last, rest)) = tokio::join!(read_all, rejoin);
    drop(reader);
    let end = *got.last().unwrap();
    assert_eq!(got, (first..=end).collect::<Vec<_>>());
    let stopped = seqs(&stopped_events);
    assert_eq!(stopped, (first..=last).collect::<Vec<_>>());
    let rest_seqs: Vec<u64> = rest.iter().map(|(seq, _)| *seq).collect();
    assert_eq!(rest_seqs, (last + 1..=end).collect::<Vec<_>>());
    let rest_deltas = rest.iter().filter(|(_, delta)| *delta).count();
    assert_eq!(
        of_kind(&stopped_events, "stream_delta").len() + rest_deltas,
        8_000
    );
    // The log's fields are colored: `place_kept`, then `=true` after its escapes.
    let logs = server.logs();
    let close = logs
        .lines()
        .find(|l| l.contains("closing socket with 4008"))
        .unwrap_or_default();
    let kept = close.split("place_kept").nth(1).unwrap_or_default();
    assert!(
        kept.starts_with("\u{1b}[0m\u{1b}[2m=\u{1b}[0mtrue") || kept.starts_with("=true"),
        "the 4008 kept no place: {close}"
    );
}

/// The seq and kind of an event frame, from its head (the envelope's
/// fields come before the content), without parsing the content.
fn seq_and_kind(frame: &str) -> Option<(u64, String)> {
    let head = frame.get(..400).unwrap_or(frame);
    let head = head.get(..head.find("\"content\"").unwrap_or(head.len()))?;
    let seq = head.split("\"seq\":").nth(1)?;
    let seq = seq[..seq.find(|c: char| !c.is_ascii_digit())?]
        .parse()
        .ok()?;
    let kind = head.split("\"kind\":\"").nth(1)?;
    Some((seq, kind[..kind.find('"')?].to_string()))
}

/// Waits until the gateway no longer holds the connection with client port
/// `conn` (the client still holds its end), bounded; returns how long it took.
pub async fn until_dropped(server: &TestServer, conn: u16) -> Duration {
    let (pid, port) = (server.pid(), server.addr.port());
    let started = Instant::now();
    eventually("the stuck connection is dropped by the gateway", || {
        !gateway_conns(pid, port).contains(&conn)
    })
    .await;
    started.elapsed()
}

/// Behind TLS the watchdog sees the same socket: a wss:// client that stops
/// reading is cut off too.
#[actix_rt::test]
async fn a_stuck_client_behind_tls_is_cut_off() {
    let ca = crate::support::tls::TestCa::new();
    let leaf = ca.leaf(&["localhost", "127.0.0.1"]);
    let server = TestServer::start_tls(&ca, &leaf, |cmd| {
        cmd.arg("--claude-bin")
            .arg(example_bin("fake_claude"))
            .arg("--heartbeat-secs")
            .arg(HEARTBEAT_SECS.to_string());
    });
    let (token, _project, session) = server.alice_session().await;
    let before = gateway_conns(server.pid(), server.addr.port());
    let mut stuck = server.ws(&format!("/ws?token={token}")).await;
    let conn = new_conn(&server, &before).await;
    send(&mut stuck, &session, "text:5000 size:4000").await;
    let took = until_dropped(&server, conn).await;
    assert!(took < Duration::from_secs(8 * HEARTBEAT_SECS), "{took:?}");
    assert!(!server.logs().contains("not watched"));
}

/// `/shell`: a terminal client that stops reading while a command floods
/// the PTY is cut off; the PTY, detached, keeps running for a reattach.
#[actix_rt::test]
async fn a_stuck_shell_client_is_cut_off() {
    let server = server();
    let token = server.token("alice");
    let project = project_dir();
    let before = gateway_conns(server.pid(), server.addr.port());
    let mut stuck = server.ws(&format!("/shell?token={token}")).await;
    let conn = new_conn(&server, &before).await;
    stuck
        .send_json(
            json!({"type": "init", "projectPath": project.path(), "sessionId": "stuck",
            "initialCommand": "exec bash --norc --noprofile", "cols": 100, "rows": 30}),
        )
        .await;
    stuck
        .send_json(
            json!({"type": "input", "data": "yes | head -c 300000000; echo done-flooding\n"}),
        )
        .await;
    let took = until_dropped(&server, conn).await;
    assert!(took < Duration::from_secs(8 * HEARTBEAT_SECS), "{took:?}");
    // The terminal survived its client: a new socket reattaches to it.
    let mut again = server.ws(&format!("/shell?token={token}")).await;
    again
        .send_json(
            json!({"type": "init", "projectPath": project.path(), "sessionId": "stuck",
            "initialCommand": "exec bash --norc --noprofile", "cols": 100, "rows": 30}),
        )
        .await;
    let mut text = String::new();
    while !text.contains("Reconnected to existing session") {
        let v = again.recv_json().await;
        text.push_str(v["data"].as_str().unwrap_or_default());
    }
    drop(stuck);
}

/// Processes whose working directory is `dir` (a test's project dir is unique).
fn procs_in(dir: &std::path::Path) -> Vec<i32> {
    let dir = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
    std::fs::read_dir("/proc")
        .map(|d| {
            d.filter_map(Result::ok)
                .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
                .filter(|pid| {
                    std::fs::read_link(format!("/proc/{pid}/cwd")).is_ok_and(|c| c == dir)
                })
                .filter(|pid| crate::util::pid_alive(*pid))
                .collect()
        })
        .unwrap_or_default()
}

fn server_with(f: impl FnOnce(&mut std::process::Command)) -> TestServer {
    TestServer::start_with(|cmd| {
        cmd.arg("--claude-bin")
            .arg(example_bin("fake_claude"))
            .arg("--heartbeat-secs")
            .arg(HEARTBEAT_SECS.to_string());
        f(cmd);
    })
}

/// A CLI that closes its output after its result but never exits is
/// stopped within the exit grace; the next send starts once it is gone.
/// A CLI that exits but leaves a background job holding its pipes: the job
/// is killed, and the next send works.
#[actix_rt::test]
async fn clis_that_linger_or_leave_jobs_behind_are_stopped_in_bounded_time() {
    let server = server();
    let token = server.token("alice");
    for script in ["text:3 linger", "text:3 orphan"] {
        let project = project_dir();
        let session = server
            .create_session(&token, "claude", project.path())
            .await;
        let mut ws = server.ws(&format!("/ws?token={token}")).await;
        send(&mut ws, &session, script).await;
        let events = until_complete(&mut ws, &session).await;
        assert_eq!(events.last().unwrap()["success"], true, "{script}");
        assert!(
            !procs_in(project.path()).is_empty(),
            "{script}: nothing left behind to stop"
        );
        let started = Instant::now();
        eventually(
            &format!("{script}: every process of the run is gone"),
            || procs_in(project.path()).is_empty(),
        )
        .await;
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "{script}: {:?}",
            started.elapsed()
        );
        // (The heartbeat dropped the unread socket meanwhile.)
        let mut ws = server.ws(&format!("/ws?token={token}")).await;
        send(&mut ws, &session, "text:2").await;
        let next = until_complete(&mut ws, &session).await;
        assert_eq!(next.last().unwrap()["success"], true, "{script}: {next:?}");
        assert_eq!(of_kind(&next, "complete").len(), 1);
    }
}

/// A CLI that hangs (SIGSTOP) ends in exactly one failed `complete` through
/// the idle limit, and its process is killed.
#[actix_rt::test]
async fn a_stopped_cli_ends_in_one_failed_complete_via_the_idle_limit() {
    let server = server_with(|cmd| {
        cmd.arg("--provider-idle-secs").arg("2");
    });
    let (token, project, session) = server.alice_session().await;
    let mut ws = server.ws(&format!("/ws?token={token}")).await;
    send(&mut ws, &session, "text:100000 delay_ms:20").await;
    let _ = next_event(&mut ws).await;
    let cli = procs_in(project.path());
    assert_eq!(cli.len(), 1, "{cli:?}");
    unsafe { libc::kill(cli[0], libc::SIGSTOP) };
    let events = until_complete(&mut ws, &session).await;
    let complete = events.last().unwrap();
    assert_eq!(complete["success"], false);
    assert!(of_kind(&events, "error")
        .iter()
        .any(|e| e["content"].as_str().unwrap_or("").contains("no output")));
    eventually("the stopped CLI is killed", || {
        !crate::util::pid_alive(cli[0])
    })
    .await;
    // Exactly one complete: the next frame is the answer to a new send.
    send(&mut ws, &session, "text:1").await;
    let next = until_complete(&mut ws, &session).await;
    assert_eq!(of_kind(&next, "complete").len(), 1);
    assert_eq!(next.last().unwrap()["success"], true);
}

/// A send right after an abort waits until the aborted CLI is gone: two
/// CLIs never run for one session (both would resume the same native id).
#[actix_rt::test]
async fn a_send_right_after_an_abort_waits_for_the_aborted_cli() {
    let server = server();
    let (token, project, session) = server.alice_session().await;
    let mut ws = server.ws(&format!("/ws?token={token}")).await;
    // `hang` ignores the interrupt: it only goes with SIGTERM after the grace.
    send(&mut ws, &session, "text:4 hang").await;
    let _ = next_event(&mut ws).await;
    let old = procs_in(project.path());
    assert_eq!(old.len(), 1);
    ws.send_json(json!({"type":"chat.abort","sessionId": session}))
        .await;
    send(&mut ws, &session, "text:50 delay_ms:10").await;
    let aborted = until_complete(&mut ws, &session).await;
    assert_eq!(aborted.last().unwrap()["aborted"], true);
    let first = next_event(&mut ws).await;
    assert_eq!(first["kind"], "stream_delta", "{first}");
    assert!(
        !crate::util::pid_alive(old[0]),
        "the next run started while the aborted CLI was still alive"
    );
    let rest = until_complete(&mut ws, &session).await;
    assert_eq!(rest.last().unwrap()["success"], true);
}

/// The gateway SIGKILLed mid-run, at a point that differs per run: its CLI
/// dies with it (PR_SET_PDEATHSIG), and after a restart the session's next
/// event has a higher seq than anything a client received (E9).
#[actix_rt::test]
async fn gateway_sigkill_mid_run_then_restart_continues_above_every_seq() {
    let server = server();
    let (token, project, session) = server.alice_session().await;
    let mut ws = server.ws(&format!("/ws?token={token}")).await;
    send(&mut ws, &session, "text:200000 size:16").await;
    // A point between 1 and ~30,000 events, from the clock (printed to replay a failure).
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    let stop_after = 1 + (nanos as u64 * 2_654_435_761 % 30_000);
    eprintln!("SIGKILL after {stop_after} events");
    let mut max_seq = 0;
    for _ in 0..stop_after {
        let v = next_event(&mut ws).await;
        max_seq = max_seq.max(v["seq"].as_u64().unwrap_or(0));
    }
    let cli = procs_in(project.path());
    assert_eq!(cli.len(), 1);
    let data = server.kill_keep_data();
    // Frames already on their way count as received too.
    while let Some(WsEvent::Text(t)) = ws.recv_within(Duration::from_millis(500)).await {
        let v: Value = serde_json::from_str(&t).unwrap();
        max_seq = max_seq.max(v["seq"].as_u64().unwrap_or(0));
    }
    eventually("the CLI died with the gateway", || {
        !crate::util::pid_alive(cli[0])
    })
    .await;
    let server = TestServer::start_in(data, |cmd| {
        cmd.arg("--claude-bin").arg(example_bin("fake_claude"));
    });
    let mut ws = server.ws(&format!("/ws?token={token}")).await;
    send(&mut ws, &session, "text:2").await;
    let events = until_complete(&mut ws, &session).await;
    let first = seqs(&events)[0];
    assert!(
        first > max_seq,
        "seq {first} after a crash, a client had seen {max_seq}"
    );
}

/// The database locked by another writer mid-run: the run still completes,
/// and the failure is logged and told to the client.
#[actix_rt::test]
async fn a_locked_database_mid_run_is_reported_and_the_run_completes() {
    use diesel::connection::SimpleConnection;
    use diesel::Connection;
    let server = server();
    let (token, _project, session) = server.alice_session().await;
    let mut ws = server.ws(&format!("/ws?token={token}")).await;
    // Slow enough to take the lock between the start and the next reservation.
    send(&mut ws, &session, "text:20000 size:8 delay_ms:0").await;
    let first = next_event(&mut ws).await;
    assert_eq!(first["seq"], 1);
    let db = server.data_dir().join("agentgate.db");
    let mut lock = diesel::SqliteConnection::establish(db.to_str().unwrap()).unwrap();
    // The gateway may be writing right now (a seq reservation, the history
    // flush): wait for that write instead of failing with SQLITE_BUSY.
    lock.batch_execute("PRAGMA busy_timeout = 10000; BEGIN EXCLUSIVE")
        .unwrap();
    let events = until_complete(&mut ws, &session).await;
    lock.batch_execute("ROLLBACK").unwrap();
    assert_eq!(events.last().unwrap()["success"], true);
    assert_eq!(of_kind(&events, "stream_delta").len() + 1, 20_000);
    let told = of_kind(&events, "error")
        .iter()
        .any(|e| e["content"].as_str().unwrap_or("").contains("database"));
    assert!(told, "no error event about the database");
    assert!(server
        .logs()
        .contains("failed to persist the seq reservation"));
}

/// 50 clients that reconnect in a loop, each resubscribing with its
/// `lastSeq`, while a run streams: every socket's seqs are strictly
/// increasing and together they cover the run with no gap.
#[actix_rt::test]
async fn fifty_reconnecting_clients_see_no_gap_and_no_duplicate() {
    let server = server();
    let (token, _project, session) = server.alice_session().await;
    let mut ws = server.ws(&format!("/ws?token={token}")).await;
    send(&mut ws, &session, "text:6000 size:32 delay_ms:1").await;
    let first = next_event(&mut ws).await;
    let first_seq = first["seq"].as_u64().unwrap();
    let mut clients = Vec::new();
    for i in 0..50u64 {
        let (url, session) = (
            server.ws_url(&format!("/ws?token={token}")),
            session.clone(),
        );
        let client = server.client();
        clients.push(tokio::task::spawn_local(async move {
            let mut seen: Vec<u64> = Vec::new();
            let mut last = first_seq - 1;
            let mut reconnects = 0;
            loop {
                let mut c = crate::util::connect_ws_with(&client, &url, None).await.unwrap();
                c.send_json(json!({"type":"chat.subscribe","sessions":[{"sessionId": session, "lastSeq": last}]}))
                    .await;
                // Each connection reads a different number of frames, then
                // drops without a close; a connection the gateway ends (its
                // heartbeat, when this task was starved) is reconnected too.
                let budget = 50 + (i * 37 + reconnects * 11) % 400;
                let mut read = 0;
                while read < budget {
                    let text = match c.recv().await {
                        WsEvent::Text(t) => t,
                        WsEvent::Ping | WsEvent::Binary(_) => continue,
                        WsEvent::Close(..) | WsEvent::Ended => break,
                    };
                    let v: Value = serde_json::from_str(&text).unwrap();
                    let Some(seq) = v["seq"].as_u64() else { continue };
                    assert!(seq > last, "client {i}: seq {seq} after {last}");
                    assert_eq!(seq, last + 1, "client {i}: gap after {last}");
                    last = seq;
                    seen.push(seq);
                    if v["kind"] == "complete" {
                        return (seen, reconnects);
                    }
                    read += 1;
                }
                drop(c);
                reconnects += 1;
            }
        }));
    }
    // The sender leaves: the 50 clients alone keep the run going.
    drop(ws);
    for (i, client) in clients.into_iter().enumerate() {
        let (seen, reconnects) = client.await.unwrap();
        assert_eq!(seen.first(), Some(&first_seq), "client {i}");
        assert!(reconnects > 0, "client {i} never reconnected");
    }
}

/// 1,500 chat sockets, each following a session, dropped without a close
/// frame: the gateway's descriptors return to what they were before.
#[actix_rt::test]
async fn fifteen_hundred_sockets_dropped_without_a_close_leave_no_descriptor() {
    // The test and the gateway (which inherits the limit) need ~1,600 each.
    unsafe {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        lim.rlim_cur = lim.rlim_max.min(8192).max(lim.rlim_cur);
        libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        assert!(
            lim.rlim_cur >= 4096,
            "RLIMIT_NOFILE hard limit {} too low",
            lim.rlim_max
        );
    }
    // The default heartbeat: these sockets are not read while they are opened.
    // One user with 1,500 sockets: above the default per-user limit.
    let server = TestServer::start_with(|cmd| {
        cmd.arg("--claude-bin")
            .arg(example_bin("fake_claude"))
            .args(["--max-sockets-per-user", "2000"]);
    });
    let (token, _project, session) = server.alice_session().await;
    let pid = server.pid();
    let count = || {
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .map(|d| d.count())
            .unwrap_or(0)
    };
    // One socket first, so lazily opened descriptors (database pool) exist.
    let mut first = server.ws(&format!("/ws?token={token}")).await;
    first
        .send_json(json!({"type":"chat.subscribe","sessions":[{"sessionId": session}]}))
        .await;
    let _ = first.recv_json().await;
    drop(first);
    let mut baseline = 0;
    eventually("the first socket is gone", || {
        let now = count();
        let settled = now == baseline;
        baseline = now;
        settled
    })
    .await;
    let mut sockets = Vec::new();
    for _ in 0..1500 {
        let mut ws = server.ws(&format!("/ws?token={token}")).await;
        ws.send_json(json!({"type":"chat.subscribe","sessions":[{"sessionId": session}]}))
            .await;
        sockets.push(ws);
    }
    for ws in sockets.iter_mut() {
        assert_eq!(ws.recv_json().await["kind"], "chat_subscribed");
    }
    assert!(count() >= baseline + 1500, "the sockets are not open");
    drop(sockets);
    eventually("descriptors back to the baseline", || count() <= baseline).await;
    // And the gateway still serves.
    let mut ws = server.ws(&format!("/ws?token={token}")).await;
    send(&mut ws, &session, "text:2").await;
    let events = until_complete(&mut ws, &session).await;
    assert_eq!(events.last().unwrap()["success"], true);
}
