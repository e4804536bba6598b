//! What operators see: Prometheus metrics scraped from `--metrics-listen`
//! and parsed by a Prometheus text-format parser, each checked to move
//! when its cause happens, against a real gateway with `fake_claude`, real
//! PTYs and the `echo_plugin` example.

use std::collections::HashMap;
use std::time::Duration;

use serde_json::json;

use crate::chat::{send, until_complete};
use crate::util::{example_bin, project_dir, TestServer, WsEvent, WAIT};

/// Heartbeat of these gateways: a silent socket is dropped after two.
const HEARTBEAT_SECS: &str = "1";
/// A prompt that makes the run actor panic (debug builds; see provider_run.rs).
pub const PANIC_PROMPT: &str = "please panic now";

/// A scrape, parsed: sample name and labels -> value (histograms: their count).
pub struct Scrape(Vec<(String, HashMap<String, String>, f64)>);

impl Scrape {
    /// The sum of the samples of `name` whose labels include `labels`.
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.0
            .iter()
            .filter(|(n, l, _)| {
                n == name
                    && labels
                        .iter()
                        .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|(_, _, v)| v)
            .sum()
    }

    pub fn has(&self, name: &str) -> bool {
        self.0.iter().any(|(n, _, _)| n == name)
    }
}

/// The `metrics on http://ADDR/metrics` line the gateway prints.
pub async fn metrics_url(server: &TestServer) -> String {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Some(url) = server
            .stdout()
            .lines()
            .find_map(|l| l.strip_prefix("metrics on ").map(str::to_string))
        {
            return url;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no `metrics on` line: {}",
            server.stdout()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// GET the metrics and parse them with `prometheus-parse`.
pub async fn scrape(url: &str) -> Scrape {
    let mut res = awc::Client::default()
        .get(url)
        .send()
        .await
        .expect("scrape");
    assert_eq!(res.status().as_u16(), 200);
    let ctype = res
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    assert!(ctype.starts_with("text/plain; version=0.0.4"), "{ctype}");
    let body = res.body().limit(4 << 20).await.expect("body");
    let text = String::from_utf8(body.to_vec()).expect("utf8");
    let lines = text.lines().map(|l| Ok(l.to_string()));
    let parsed = prometheus_parse::Scrape::parse(lines).expect("Prometheus text format");
    // Every family has HELP and TYPE, as exposition requires.
    for name in parsed.docs.keys() {
        assert!(
            text.contains(&format!("# TYPE {name} ")),
            "{name} has no TYPE"
        );
    }
    let samples = parsed
        .samples
        .into_iter()
        .map(|s| {
            let value = match s.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => v,
                prometheus_parse::Value::Histogram(buckets) => buckets
                    .iter()
                    .find(|b| b.less_than == f64::INFINITY)
                    .map_or(0.0, |b| b.count),
                prometheus_parse::Value::Summary(_) => 0.0,
            };
            let labels: HashMap<String, String> = s
                .labels
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            (s.metric, labels, value)
        })
        .collect();
    Scrape(samples)
}

/// Scrapes until `ok` holds for the value of `name` with `labels` (bounded by WAIT).
pub async fn wait_metric(
    url: &str,
    name: &str,
    labels: &[(&str, &str)],
    ok: impl Fn(f64) -> bool,
) -> Scrape {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let s = scrape(url).await;
        let v = s.get(name, labels);
        if ok(v) {
            return s;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{name}{labels:?} stayed at {v}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

fn gateway(data: tempfile::TempDir) -> TestServer {
    TestServer::start_in(data, |cmd| {
        cmd.arg("--claude-bin")
            .arg(example_bin("fake_claude"))
            .args(["--metrics-listen", "127.0.0.1:0"])
            .args(["--heartbeat-secs", HEARTBEAT_SECS])
            .args(["--permission-timeout-secs", "1"])
            .args(["--shell-detach-secs", "600"])
            .args(["--login-failures-per-user", "2"])
            .env("AGENTGATE_TEST_PANIC_PROMPT", PANIC_PROMPT);
    })
}

/// Each metric family moves when its cause happens; none carries a
/// session, run or user id as a label.
#[actix_rt::test]
async fn every_metric_moves_with_its_cause() {
    let data = tempfile::tempdir().expect("data dir");
    crate::plugins::echo_plugin(data.path(), "echo");
    let server = gateway(data);
    let url = metrics_url(&server).await;
    assert!(url.starts_with("http://127.0.0.1:"), "{url}");
    let (token, project, session) = server.alice_session().await;
    let m0 = scrape(&url).await;

    // A run: connection open, run active then ended, events, bytes, latency, db.
    let mut ws = server.ws(&format!("/ws?token={token}")).await;
    wait_metric(
        &url,
        "agentgate_connections_open",
        &[("endpoint", "ws")],
        |v| v == 1.0,
    )
    .await;
    send(&mut ws, &session, "text:5 delay_ms:300").await;
    let (first, _) = ws.recv_until_kind("stream_delta").await;
    assert_eq!(first["kind"], "stream_delta");
    let mid = scrape(&url).await;
    assert_eq!(
        mid.get("agentgate_runs_active", &[("provider", "claude")]),
        1.0
    );
    let events = until_complete(&mut ws, &session).await;
    assert_eq!(events.last().unwrap()["success"], true);
    let m1 = wait_metric(
        &url,
        "agentgate_runs_ended_total",
        &[("provider", "claude"), ("outcome", "success")],
        |v| v == 1.0,
    )
    .await;
    assert_eq!(
        m1.get("agentgate_runs_active", &[("provider", "claude")]),
        0.0
    );
    assert_eq!(
        m1.get("agentgate_events_total", &[("kind", "stream_delta")]),
        5.0
    );
    assert_eq!(
        m1.get("agentgate_events_total", &[("kind", "complete")]),
        1.0
    );
    assert_eq!(
        m1.get("agentgate_run_duration_seconds", &[("provider", "claude")]),
        1.0
    );
    assert!(m1.get("agentgate_sent_bytes_total", &[("endpoint", "ws")]) > 500.0);
    assert!(m1.get("agentgate_delivery_latency_seconds", &[]) >= 5.0);
    // The seq is written in the background after the complete.
    wait_metric(
        &url,
        "agentgate_db_operation_duration_seconds",
        &[("op", "set_last_seq")],
        |v| v >= 1.0,
    )
    .await;
    assert!(m1.get("agentgate_connections_opened_total", &[("endpoint", "ws")]) >= 1.0);

    // Failed and aborted runs.
    send(&mut ws, &session, "text:2 exit:3").await;
    until_complete(&mut ws, &session).await;
    send(&mut ws, &session, "text:1000 delay_ms:50").await;
    ws.recv_until_kind("stream_delta").await;
    ws.send_json(json!({"type": "chat.abort", "sessionId": session}))
        .await;
    let events = until_complete(&mut ws, &session).await;
    assert_eq!(events.last().unwrap()["aborted"], true);
    let m2 = wait_metric(
        &url,
        "agentgate_runs_ended_total",
        &[("provider", "claude"), ("outcome", "aborted")],
        |v| v == 1.0,
    )
    .await;
    assert_eq!(
        m2.get(
            "agentgate_runs_ended_total",
            &[("provider", "claude"), ("outcome", "failed")]
        ),
        1.0
    );

    // Permissions: one answered, one left to time out (1 s).
    send(&mut ws, &session, "permission:Bash text:1").await;
    let (req, _) = ws.recv_until_kind("permission_request").await;
    let pending = scrape(&url).await;
    assert_eq!(pending.get("agentgate_permissions_pending", &[]), 1.0);
    ws.send_json(
        json!({"type":"chat.permission-response","requestId": req["requestId"], "allow": true}),
    )
    .await;
    until_complete(&mut ws, &session).await;
    send(&mut ws, &session, "permission:Bash text:1").await;
    ws.recv_until_kind("permission_request").await;
    until_complete(&mut ws, &session).await;
    let m3 = scrape(&url).await;
    assert_eq!(m3.get("agentgate_permissions_pending", &[]), 0.0);
    assert_eq!(m3.get("agentgate_permissions_answered_total", &[]), 1.0);
    assert_eq!(m3.get("agentgate_permissions_timed_out_total", &[]), 1.0);

    // A replay: a second socket subscribes to a live run from its first event;
    // a truncated one: the run's first events have left the 10,000-event buffer.
    send(&mut ws, &session, "text:10100 size:8").await;
    let (first, _) = ws.recv_until_kind("stream_delta").await;
    until_complete(&mut ws, &session).await;
    let mut late = server.ws(&format!("/ws?token={token}")).await;
    late.send_json(json!({"type":"chat.subscribe","sessions":[{"sessionId": session, "lastSeq": first["seq"]}]}))
        .await;
    // What it missed is gone: the ack says so, and the replay goes on from
    // the oldest event left, through the run's `complete` (no 4008, which
    // would only bring the same resubscription back).
    let ack = loop {
        let v = late.recv_json().await;
        if v["kind"] == "chat_subscribed" {
            break v;
        }
    };
    assert_eq!(ack["replayTruncated"], true, "{ack}");
    let (replayed, _) = late.recv_until_kind("stream_delta").await;
    assert_eq!(replayed["seq"], ack["oldestSeq"], "{ack} then {replayed}");
    until_complete(&mut late, &session).await;
    let m4 = wait_metric(&url, "agentgate_replays_truncated_total", &[], |v| v == 1.0).await;
    assert_eq!(m4.get("agentgate_replays_total", &[]), 1.0);
    assert_eq!(
        m4.get("agentgate_slow_consumer_disconnects_total", &[]),
        0.0
    );

    // A socket that never answers a ping is dropped after two heartbeats.
    let silent = server.ws(&format!("/ws?token={token}")).await;
    wait_metric(
        &url,
        "agentgate_heartbeat_timeouts_total",
        &[("actor", "ChatSocket")],
        |v| v >= 1.0,
    )
    .await;
    drop(silent);
    // The first socket was not read meanwhile either: a new one.
    let mut ws = server.ws(&format!("/ws?token={token}")).await;

    // A panicking run actor: counted, and its run completes as failed.
    send(&mut ws, &session, PANIC_PROMPT).await;
    let events = until_complete(&mut ws, &session).await;
    assert_eq!(events.last().unwrap()["success"], false);
    drop(ws);
    wait_metric(
        &url,
        "agentgate_actor_panics_total",
        &[("actor", "ProviderRun")],
        |v| v == 1.0,
    )
    .await;

    // A terminal: live, output bytes, detached when its socket leaves.
    let mut shell = server.ws(&format!("/shell?token={token}")).await;
    shell
        .send_json(json!({"type":"init","projectPath": project.path(), "initialCommand": "echo metrics-shell-ready; exec sleep 300", "cols": 80, "rows": 24}))
        .await;
    loop {
        match shell.recv().await {
            WsEvent::Text(t) if t.contains("metrics-shell-ready") => break,
            WsEvent::Text(_) => {}
            other => panic!("shell ended: {other:?}"),
        }
    }
    let m5 = scrape(&url).await;
    assert_eq!(m5.get("agentgate_ptys_live", &[]), 1.0);
    assert_eq!(m5.get("agentgate_ptys_detached", &[]), 0.0);
    assert!(m5.get("agentgate_shell_output_bytes_total", &[]) >= 20.0);
    assert!(m5.get("agentgate_sent_bytes_total", &[("endpoint", "shell")]) >= 20.0);
    assert_eq!(
        m5.get("agentgate_connections_open", &[("endpoint", "shell")]),
        1.0
    );
    shell.close(1000).await;
    let m6 = wait_metric(&url, "agentgate_ptys_detached", &[], |v| v == 1.0).await;
    assert_eq!(m6.get("agentgate_ptys_live", &[]), 1.0);
    wait_metric(
        &url,
        "agentgate_connections_closed_total",
        &[("endpoint", "shell"), ("code", "1000")],
        |v| v == 1.0,
    )
    .await;

    // A plugin: up, killed, restarted.
    let p = crate::plugins::wait_running(&server, &token, "echo").await;
    let up = scrape(&url).await;
    assert_eq!(up.get("agentgate_plugin_up", &[("plugin", "echo")]), 1.0);
    let pid = p["pid"].as_i64().expect("pid") as i32;
    // SAFETY: signalling the plugin process this test's gateway started.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    wait_metric(
        &url,
        "agentgate_plugin_restarts_total",
        &[("plugin", "echo")],
        |v| v == 1.0,
    )
    .await;
    wait_metric(&url, "agentgate_plugin_up", &[("plugin", "echo")], |v| {
        v == 1.0
    })
    .await;
    // What the proxy relays to its client is counted as sent.
    let mut proxied = server.ws(&format!("/plugin-ws/echo?token={token}")).await;
    let echo = "x".repeat(300);
    proxied.send_text(&echo).await;
    assert!(matches!(proxied.recv().await, WsEvent::Text(t) if t == echo));
    let relayed = scrape(&url).await;
    assert!(relayed.get("agentgate_sent_bytes_total", &[("endpoint", "plugin")]) >= 300.0);
    drop(proxied);

    // Logins: two wrong passwords, then the per-user limit (2) answers 429.
    let wrong = json!({"username": "alice", "password": "wrong"});
    for _ in 0..2 {
        let (status, _) = server.post("/api/auth/login", None, wrong.clone()).await;
        assert_eq!(status, 401);
    }
    let (status, _) = server.post("/api/auth/login", None, wrong).await;
    assert_eq!(status, 429);
    let m6 = scrape(&url).await;
    assert_eq!(m6.get("agentgate_logins_failed_total", &[]), 2.0);
    assert_eq!(m6.get("agentgate_logins_throttled_total", &[]), 1.0);

    // Nothing identifies a session, run or user in a label.
    let ids = [session.as_str(), "alice"];
    for (name, labels, _) in &m6.0 {
        for v in labels.values() {
            assert!(!ids.contains(&v.as_str()), "{name} labelled {v}");
        }
    }
    assert!(m0.has("agentgate_permissions_pending"));
}

/// Flow control and disconnects: a client that stops reading pauses its
/// run and is cut off by the watchdog; a subscriber left far behind while
/// another keeps the run going is closed as a slow consumer (4008).
#[actix_rt::test]
async fn flow_control_and_disconnect_metrics() {
    let server = TestServer::start_with(|cmd| {
        cmd.arg("--claude-bin")
            .arg(example_bin("fake_claude"))
            .args(["--metrics-listen", "0"])
            .args(["--heartbeat-secs", "2"]);
    });
    let url = metrics_url(&server).await;
    assert!(
        url.starts_with("http://127.0.0.1:"),
        "a bare port is loopback: {url}"
    );
    let (token, _project, session) = server.alice_session().await;

    // One reader that keeps up, one that never reads: the second falls behind.
    let mut reader = server.ws(&format!("/ws?token={token}")).await;
    let mut idle = server.ws(&format!("/ws?token={token}")).await;
    send(&mut reader, &session, "text:9000 size:4000").await;
    let (first, _) = reader.recv_until_kind("stream_delta").await;
    idle.send_json(json!({"type":"chat.subscribe","sessions":[{"sessionId": session, "lastSeq": first["seq"]}]}))
        .await;
    let events = until_complete(&mut reader, &session).await;
    assert_eq!(events.last().unwrap()["success"], true);
    let s = wait_metric(
        &url,
        "agentgate_slow_consumer_disconnects_total",
        &[],
        |v| v >= 1.0,
    )
    .await;
    // The idle socket's own close waits until its client reads again (or
    // the watchdog cuts it), so only the registry's decision is counted here.
    let stuck = s.get("agentgate_stuck_client_disconnects_total", &[]);
    drop(idle);

    // Alone and not reading: the run pauses, the watchdog cuts the client off.
    let mut stuck_ws = server.ws(&format!("/ws?token={token}")).await;
    send(&mut stuck_ws, &session, "text:5000 size:4000").await;
    let s = wait_metric(&url, "agentgate_stuck_client_disconnects_total", &[], |v| {
        v >= stuck + 1.0
    })
    .await;
    assert!(s.get("agentgate_flow_control_pauses_total", &[]) >= 1.0);
    wait_metric(
        &url,
        "agentgate_flow_control_paused_seconds_total",
        &[],
        |v| v > 0.0,
    )
    .await;
    drop(stuck_ws);
    drop(reader);
}

/// Without `--metrics-listen` nothing listens for scrapes.
#[actix_rt::test]
async fn metrics_are_off_by_default() {
    let server = TestServer::start();
    let (status, _) = server.get("/metrics", None).await;
    assert_ne!(status, 200, "the gateway's own port serves no metrics");
    assert!(
        !server.stdout().contains("metrics on"),
        "{}",
        server.stdout()
    );
}

/// The gateway's log lines (`--log-format json`), each parsed; panics on a line that is not JSON.
fn json_log(server: &TestServer) -> Vec<serde_json::Value> {
    server
        .logs()
        .lines()
        // The default panic hook prints its own plain lines after ours.
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

/// Supervision events with `event`, `actor`, the actor's ids and `reason`.
fn supervision<'a>(
    log: &'a [serde_json::Value],
    event: &str,
    actor: &str,
) -> Vec<&'a serde_json::Value> {
    log.iter()
        .filter(|l| l["fields"]["event"] == event && l["fields"]["actor"] == actor)
        .collect()
}

async fn wait_log(server: &TestServer, what: &str, ok: impl Fn(&[serde_json::Value]) -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !ok(&json_log(server)) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no {what} in the log:\n{}",
            server.logs()
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// `--log-format json`: one JSON object per line; a run, a terminal, a
/// plugin crash and restart, and a panicking run each log their supervision
/// events with stable fields, inside a `run` or `conn` span.
#[actix_rt::test]
async fn supervision_events_are_json_with_stable_fields() {
    let data = tempfile::tempdir().expect("data dir");
    crate::plugins::echo_plugin(data.path(), "echo");
    let server = TestServer::start_in(data, |cmd| {
        cmd.arg("--claude-bin")
            .arg(example_bin("fake_claude"))
            .args(["--log-format", "json"])
            .env("AGENTGATE_TEST_PANIC_PROMPT", PANIC_PROMPT);
    });
    let (token, project, session) = server.alice_session().await;

    // A run: its ProviderRun starts and stops, in the run's span.
    let mut ws = server.ws(&format!("/ws?token={token}")).await;
    send(&mut ws, &session, "text:2").await;
    let events = until_complete(&mut ws, &session).await;
    let run_id = events[0]["runId"].as_str().expect("runId").to_string();
    let is_run = |l: &serde_json::Value| l["fields"]["run_id"] == run_id.as_str();
    wait_log(&server, "the run's actor.stopped", |log| {
        supervision(log, "actor.stopped", "ProviderRun")
            .iter()
            .any(|l| is_run(l))
    })
    .await;
    let log = json_log(&server);
    let started = supervision(&log, "actor.started", "ProviderRun");
    let started = started
        .into_iter()
        .find(|l| is_run(l))
        .expect("actor.started of the run");
    assert_eq!(started["fields"]["session_id"], session.as_str());
    assert_eq!(started["fields"]["provider"], "claude");
    assert_eq!(started["span"]["name"], "run", "{started}");
    assert_eq!(started["span"]["run_id"], run_id.as_str());
    let stopped = supervision(&log, "actor.stopped", "ProviderRun");
    let stopped = stopped
        .into_iter()
        .find(|l| is_run(l))
        .expect("actor.stopped of the run");
    assert_eq!(stopped["fields"]["reason"], "process exited");
    let chat = supervision(&log, "actor.started", "ChatSocket");
    assert!(chat[0]["fields"]["socket"].is_u64(), "{}", chat[0]);
    assert_eq!(chat[0]["span"]["name"], "conn");

    // A terminal: PtySession and ShellSocket start; the socket stops with its close code.
    let mut shell = server.ws(&format!("/shell?token={token}")).await;
    shell
        .send_json(json!({"type":"init","projectPath": project.path(), "initialCommand": "echo events-shell-ready; exec sleep 300", "cols": 80, "rows": 24}))
        .await;
    loop {
        match shell.recv().await {
            WsEvent::Text(t) if t.contains("events-shell-ready") => break,
            WsEvent::Text(_) => {}
            other => panic!("shell ended: {other:?}"),
        }
    }
    shell.close(1000).await;
    wait_log(&server, "ShellSocket actor.stopped", |log| {
        !supervision(log, "actor.stopped", "ShellSocket").is_empty()
    })
    .await;
    let log = json_log(&server);
    let pty = supervision(&log, "actor.started", "PtySession");
    assert!(pty[0]["fields"]["pty"].is_u64(), "{}", pty[0]);
    assert!(pty[0]["fields"]["pid"].is_u64(), "{}", pty[0]);
    let closed = supervision(&log, "actor.stopped", "ShellSocket");
    assert_eq!(
        closed[0]["fields"]["reason"], "closed with 1000",
        "{}",
        closed[0]
    );

    // A plugin crash: actor.restarted with the plugin, its restart count and why.
    let p = crate::plugins::wait_running(&server, &token, "echo").await;
    let pid = p["pid"].as_i64().expect("pid") as i32;
    // SAFETY: signalling the plugin process this test's gateway started.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    wait_log(&server, "actor.restarted", |log| {
        !supervision(log, "actor.restarted", "PluginHost").is_empty()
    })
    .await;
    let log = json_log(&server);
    let restarted = supervision(&log, "actor.restarted", "PluginHost");
    assert_eq!(restarted[0]["fields"]["plugin"], "echo");
    assert_eq!(restarted[0]["fields"]["restarts"], 1);
    assert!(
        restarted[0]["fields"]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("SIGKILL")),
        "{}",
        restarted[0]
    );

    // A panicking run: actor.panicked with its ids; the gateway goes on.
    send(&mut ws, &session, PANIC_PROMPT).await;
    let events = until_complete(&mut ws, &session).await;
    let panicked_run = events[0]["runId"].as_str().expect("runId").to_string();
    wait_log(&server, "actor.panicked", |log| {
        !supervision(log, "actor.panicked", "ProviderRun").is_empty()
    })
    .await;
    let log = json_log(&server);
    let panicked = supervision(&log, "actor.panicked", "ProviderRun");
    assert_eq!(panicked[0]["level"], "ERROR");
    assert_eq!(panicked[0]["fields"]["reason"], "panic");
    assert!(
        panicked[0]["fields"]["ids"]
            .as_str()
            .is_some_and(|ids| ids.contains(&panicked_run)),
        "{}",
        panicked[0]
    );
    send(&mut ws, &session, "text:1").await;
    let events = until_complete(&mut ws, &session).await;
    assert_eq!(
        events.last().unwrap()["success"],
        true,
        "the gateway went on"
    );
}

/// `agentgate status` against the gateway of `server` (extra args appended).
fn status(server: &TestServer, args: &[&str]) -> std::process::Output {
    std::process::Command::new(crate::util::agentgate_bin())
        .arg("status")
        .arg("--url")
        .arg(server.url(""))
        .arg("--data-dir")
        .arg(server.data_dir())
        .args(args)
        .env_remove("AGENTGATE_TOKEN")
        .output()
        .expect("run agentgate status")
}

async fn snapshot(server: &TestServer, token: &str) -> serde_json::Value {
    let (code, body) = server.get("/api/admin/snapshot", Some(token)).await;
    assert_eq!(code, 200, "{body}");
    body["data"].clone()
}

/// Roles, the admin API and `agentgate status`: the first user is an admin
/// and sees every run, terminal and plugin; another user is refused until
/// `agentgate token --admin` makes them one; the actions reach the actors
/// that own what they act on.
#[actix_rt::test]
async fn admin_api_roles_and_status() {
    let data = tempfile::tempdir().expect("data dir");
    crate::plugins::echo_plugin(data.path(), "echo");
    let server = TestServer::start_in(data, |cmd| {
        cmd.arg("--claude-bin").arg(example_bin("fake_claude"));
    });
    let admin = server.token("alice");
    let bob = server.token("bob");
    let project = project_dir();

    // Not an admin: 403 on every admin route, and `status` says so.
    let (code, body) = server.get("/api/admin/snapshot", Some(&bob)).await;
    assert_eq!(
        (code, body["error"]["code"].as_str()),
        (403, Some("ADMIN_ONLY")),
        "{body}"
    );
    let (code, _) = server
        .post("/api/admin/ptys/1/kill", Some(&bob), json!({}))
        .await;
    assert_eq!(code, 403);
    let (code, _) = server.get("/api/admin/snapshot", None).await;
    assert_eq!(code, 401);
    let out = status(&server, &["--token", &bob]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("403"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Bob streams a run; the admin sees it with its seq climbing.
    let session = server.create_session(&bob, "claude", project.path()).await;
    let mut ws = server.ws(&format!("/ws?token={bob}")).await;
    send(&mut ws, &session, "text:100000 delay_ms:20").await;
    ws.recv_until_kind("stream_delta").await;
    let run_of = |snap: &serde_json::Value| {
        snap["runs"]
            .as_array()
            .and_then(|r| {
                r.iter()
                    .find(|r| r["sessionId"] == session.as_str())
                    .cloned()
            })
            .unwrap_or(serde_json::Value::Null)
    };
    let first = run_of(&snapshot(&server, &admin).await);
    assert_eq!(first["user"], "bob", "{first}");
    assert_eq!(first["provider"], "claude");
    assert_eq!(first["state"], "running");
    assert_eq!(first["subscribers"], 1);
    let seq = first["lastSeq"].as_u64().expect("lastSeq");
    loop {
        ws.recv_json().await;
        let now = run_of(&snapshot(&server, &admin).await);
        if now["lastSeq"].as_u64() > Some(seq) {
            break;
        }
    }
    let snap = snapshot(&server, &admin).await;
    let socket = snap["sockets"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["user"] == "bob").cloned())
        .expect("bob's chat socket");
    let echo = snap["plugins"]
        .as_array()
        .and_then(|p| p.iter().find(|p| p["name"] == "echo").cloned())
        .expect("the echo plugin");
    assert!(echo["restarts"].is_u64(), "{echo}");

    // `status` prints it as tables, and as JSON.
    let out = status(&server, &[]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for needle in ["RUNS (1)", "CHAT SOCKETS", "TERMINALS", "PLUGINS", "echo"] {
        assert!(text.contains(needle), "{needle} missing:\n{text}");
    }
    let row = text
        .lines()
        .find(|l| l.contains(&session))
        .unwrap_or_else(|| panic!("no row for the run:\n{text}"));
    assert!(
        row.contains("bob") && row.contains("claude") && row.contains("running"),
        "{row}"
    );
    let out = status(&server, &["--json"]);
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("status --json");
    assert_eq!(run_of(&json)["user"], "bob");

    // The live stream: a snapshot event.
    let mut res = server
        .client()
        .get(server.url("/api/admin/events"))
        .bearer_auth(&admin)
        .send()
        .await
        .expect("events");
    assert_eq!(res.status().as_u16(), 200);
    let chunk = futures_util::StreamExt::next(&mut res)
        .await
        .expect("a chunk")
        .expect("bytes");
    let chunk = String::from_utf8_lossy(&chunk).to_string();
    assert!(chunk.starts_with("event: snapshot\ndata: {"), "{chunk}");
    drop(res);

    // Abort from the admin API: bob's client gets complete with aborted: true.
    let (code, body) = server
        .post(
            &format!("/api/admin/runs/{session}/abort"),
            Some(&admin),
            json!({}),
        )
        .await;
    assert_eq!(code, 200, "{body}");
    let events = until_complete(&mut ws, &session).await;
    assert_eq!(events.last().unwrap()["aborted"], true);
    let (code, _) = server
        .post(
            &format!("/api/admin/runs/{session}/abort"),
            Some(&admin),
            json!({}),
        )
        .await;
    assert_eq!(code, 404, "no run left to abort");

    // Disconnect bob's socket: closed with 4000.
    let (code, body) = server
        .post(
            &format!("/api/admin/sockets/{}/disconnect", socket["id"]),
            Some(&admin),
            json!({}),
        )
        .await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(ws.recv_close().await, Some(4000));

    // Kill bob's terminal: his client sees it end.
    let mut shell = server.ws(&format!("/shell?token={bob}")).await;
    shell
        .send_json(json!({"type":"init","projectPath": project.path(), "initialCommand": "echo admin-shell-ready; exec sleep 300", "cols": 80, "rows": 24}))
        .await;
    loop {
        match shell.recv().await {
            WsEvent::Text(t) if t.contains("admin-shell-ready") => break,
            WsEvent::Text(_) => {}
            other => panic!("shell ended: {other:?}"),
        }
    }
    let snap = snapshot(&server, &admin).await;
    let pty = snap["ptys"][0].clone();
    assert_eq!(pty["user"], "bob", "{snap}");
    assert_eq!(pty["sockets"], 1);
    let (code, _) = server
        .post(
            &format!("/api/admin/ptys/{}/kill", pty["id"]),
            Some(&admin),
            json!({}),
        )
        .await;
    assert_eq!(code, 200);
    loop {
        match shell.recv().await {
            WsEvent::Text(t) if t.contains("Process exited") || t.contains("exit") => break,
            WsEvent::Text(_) => {}
            WsEvent::Close(..) | WsEvent::Ended => break,
            other => panic!("unexpected {other:?}"),
        }
    }
    let deadline = tokio::time::Instant::now() + WAIT;
    while !snapshot(&server, &admin).await["ptys"]
        .as_array()
        .is_some_and(|p| p.is_empty())
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the terminal lives on"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }

    // An open plugin proxy is listed with its plugin and user.
    let mut proxied = server.ws(&format!("/plugin-ws/echo?token={bob}")).await;
    proxied.send_text("ping").await;
    assert!(matches!(proxied.recv().await, WsEvent::Text(t) if t == "ping"));
    let snap = snapshot(&server, &admin).await;
    let proxy = &snap["pluginProxies"][0];
    assert_eq!(
        (proxy["plugin"].as_str(), proxy["user"].as_str()),
        (Some("echo"), Some("bob")),
        "{snap}"
    );
    let out = status(&server, &[]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("PLUGIN PROXIES (1)"));
    proxied.close(1000).await;
    let deadline = tokio::time::Instant::now() + WAIT;
    while snapshot(&server, &admin).await["pluginProxies"]
        .as_array()
        .is_some_and(|p| !p.is_empty())
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the closed proxy is still listed"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }

    // Stop and restart a plugin.
    let (code, body) = server
        .post("/api/admin/plugins/echo/stop", Some(&admin), json!({}))
        .await;
    assert_eq!(
        (code, body["data"]["state"].as_str()),
        (200, Some("stopped")),
        "{body}"
    );
    let (code, body) = server
        .post("/api/admin/plugins/echo/restart", Some(&admin), json!({}))
        .await;
    assert_eq!(
        (code, body["data"]["running"].as_bool()),
        (200, Some(true)),
        "{body}"
    );

    // `agentgate token --admin` makes bob an admin.
    let out = std::process::Command::new(crate::util::agentgate_bin())
        .args(["token", "--user", "bob", "--admin", "--data-dir"])
        .arg(server.data_dir())
        .env_remove("AGENTGATE_JWT_SECRET")
        .output()
        .expect("agentgate token --admin");
    assert!(out.status.success());
    let bob_admin = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let (code, _) = server.get("/api/admin/snapshot", Some(&bob_admin)).await;
    assert_eq!(code, 200);
}

/// The admin page in headless Chromium: the admin signs in, sees a
/// streaming run with its seq climbing and its events/s chart moving,
/// aborts it from the page (the chat client gets `complete` with
/// `aborted: true`), sees a crashed plugin's restart count go up and the
/// restart among the supervision events; another user is refused.
/// Screenshots: `<target>/tmp/browser-artifacts/admin-page/`.
#[actix_rt::test]
async fn the_admin_page_in_a_real_browser() {
    use crate::support::browser::{artifacts_dir, BrowserScript};
    let data = tempfile::tempdir().expect("data dir");
    crate::plugins::echo_plugin(data.path(), "echo");
    let server = TestServer::start_in(data, |cmd| {
        cmd.arg("--claude-bin").arg(example_bin("fake_claude"));
    });
    // The first user registers (and is the admin); bob is added later.
    let (code, body) = server
        .post(
            "/api/auth/register",
            None,
            json!({"username": "alice", "password": "admin pass 1"}),
        )
        .await;
    assert_eq!(code, 201, "{body}");
    let out = crate::web_ui::user_add(server.data_dir(), "bob", "bob pass 1\n");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let bob = server.token("bob");
    let project = project_dir();
    let session = server.create_session(&bob, "claude", project.path()).await;
    let mut ws = server.ws(&format!("/ws?token={bob}")).await;
    send(&mut ws, &session, "text:100000 delay_ms:20").await;
    ws.recv_until_kind("stream_delta").await;

    let artifacts = artifacts_dir("admin-page");
    let config = json!({
        "base": server.url(""),
        "admin": {"username": "alice", "password": "admin pass 1"},
        "user": {"username": "bob", "password": "bob pass 1"},
        "session": session,
    });
    let script = BrowserScript::start("admin.js", config, &artifacts);
    // Blocking waits run off the runtime, so the gateway's clients are not starved.
    let wait = |mut script: BrowserScript, name: &'static str| {
        tokio::task::spawn_blocking(move || {
            let step = script.wait_step(name, Duration::from_secs(180));
            (script, step)
        })
    };
    let (script, seq) = wait(script, "seq").await.expect("browser");
    assert!(seq["later"].as_u64() > seq["first"].as_u64(), "{seq}");
    assert!(seq["rate"].as_f64() > Some(0.0), "{seq}");
    let (mut script, aborted) = wait(script, "aborted").await.expect("browser");
    assert!(
        aborted["state"].as_str().unwrap_or("").contains("aborted"),
        "{aborted}"
    );
    let events = until_complete(&mut ws, &session).await;
    assert_eq!(events.last().unwrap()["aborted"], true);

    // Crash the plugin; the page shows its restart count go up.
    let p = crate::plugins::wait_running(&server, &bob, "echo").await;
    let before = p["restarts"].as_u64().expect("restarts");
    script.send(json!({"restartsAbove": before}));
    let pid = p["pid"].as_i64().expect("pid") as i32;
    // SAFETY: signalling the plugin process this test's gateway started.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let (script, restarts) = wait(script, "restarts").await.expect("browser");
    assert!(restarts["value"].as_u64() > Some(before), "{restarts}");
    let (script, refused) = wait(script, "refused").await.expect("browser");
    assert_eq!(refused["text"], "This user is not an admin", "{refused}");
    assert_eq!(refused["appHidden"], true);
    let shots = tokio::task::spawn_blocking(move || {
        let shots = script.screenshots();
        script.finish(Duration::from_secs(60));
        shots
    })
    .await
    .expect("browser");
    assert_eq!(shots.len(), 3, "{shots:?}");
    for shot in shots {
        assert!(
            std::fs::metadata(&shot).is_ok_and(|m| m.len() > 1000),
            "{}",
            shot.display()
        );
    }
}

/// Remote-session streams count what they send, by endpoint: the
/// WebSocket follower (`remote_ws`) and the SSE stream (`remote_sse`).
#[actix_rt::test]
async fn remote_session_streams_count_their_bytes() {
    let server = TestServer::start_with(|cmd| {
        cmd.arg("--claude-bin")
            .arg(example_bin("fake_claude"))
            .args(["--metrics-listen", "0"]);
    });
    let url = metrics_url(&server).await;
    let r = crate::remote::remote(&server, "alice", "text:3").await;

    let mut res = crate::remote::open_sse(&server, &r, None).await;
    let events = crate::remote::read_sse(&mut res, crate::remote::is_result).await;
    // Each event's data alone is more than its JSON once parsed back.
    let data: usize = events.iter().map(|e| e.2.to_string().len()).sum();
    let m = wait_metric(
        &url,
        "agentgate_sent_bytes_total",
        &[("endpoint", "remote_sse")],
        |v| v >= data as f64,
    )
    .await;
    assert_eq!(
        m.get("agentgate_sent_bytes_total", &[("endpoint", "remote_ws")]),
        0.0
    );
    drop(res);

    let mut session = crate::remote::follow(&server.url(""), &r);
    let followed = crate::remote::until_result(&mut session).await;
    assert!(!followed.is_empty());
    wait_metric(
        &url,
        "agentgate_sent_bytes_total",
        &[("endpoint", "remote_ws")],
        |v| v >= 200.0,
    )
    .await;
}
