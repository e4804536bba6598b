//! Plugins: real plugin server processes (the `echo_plugin` example and
//! small shell scripts) under a real gateway, real WebSocket clients through
//! `/plugin-ws/{name}`, and the plugin REST routes.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::{json, Value};

use crate::util::{eventually, example_bin, pid_alive, rss_kib, TestServer, WsEvent, WAIT};

/// The `echo_plugin` example binary.
fn echo_plugin_bin() -> &'static Path {
    example_bin("echo_plugin")
}

pub fn plugin_dir(data: &Path, name: &str) -> PathBuf {
    let dir = data.join("plugins").join(name);
    std::fs::create_dir_all(&dir).expect("plugin dir");
    dir
}

pub fn write_manifest(dir: &Path, manifest: Value) {
    std::fs::write(dir.join("manifest.json"), manifest.to_string()).expect("manifest");
}

/// A plugin whose server is a shell script with `body`.
pub fn script_plugin(data: &Path, name: &str, body: &str) -> PathBuf {
    let dir = plugin_dir(data, name);
    let run = dir.join("run.sh");
    std::fs::write(&run, format!("#!/bin/sh\n{body}\n")).expect("script");
    std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    write_manifest(&dir, json!({"name": name, "server": "run.sh"}));
    dir
}

/// The echo plugin with its test hooks, started through a one-line script.
pub fn echo_plugin(data: &Path, name: &str) -> PathBuf {
    let bin = echo_plugin_bin().display().to_string();
    script_plugin(data, name, &format!("exec '{bin}' --test-hooks"))
}

/// A gateway over a data dir prepared by `prepare`, plus a token.
fn start(prepare: impl FnOnce(&Path)) -> (TestServer, String) {
    start_env(prepare, |_| {})
}

fn start_env(prepare: impl FnOnce(&Path), env: impl FnOnce(&mut Command)) -> (TestServer, String) {
    let data = tempfile::tempdir().expect("data dir");
    prepare(data.path());
    let server = TestServer::start_in(data, env);
    let token = server.token("alice");
    (server, token)
}

pub async fn plugins(server: &TestServer, token: &str) -> Vec<Value> {
    let (status, body) = server.get("/api/plugins", Some(token)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["success"], true);
    body["data"]["plugins"]
        .as_array()
        .expect("plugins array")
        .clone()
}

pub async fn plugin(server: &TestServer, token: &str, name: &str) -> Option<Value> {
    plugins(server, token)
        .await
        .into_iter()
        .find(|p| p["name"] == name)
}

/// Polls `GET /api/plugins` until `name` satisfies `ok` (bounded by `WAIT`).
pub async fn wait_plugin(
    server: &TestServer,
    token: &str,
    name: &str,
    ok: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let p = plugin(server, token, name).await.unwrap_or(Value::Null);
        if ok(&p) {
            return p;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "plugin {name} never got there; last {p}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

pub async fn wait_running(server: &TestServer, token: &str, name: &str) -> Value {
    wait_plugin(server, token, name, |p| p["running"] == true).await
}

#[actix_rt::test]
async fn text_and_binary_frames_round_trip() {
    let (server, token) = start(|d| {
        echo_plugin(d, "echo");
    });
    let p = wait_running(&server, &token, "echo").await;
    assert!(p["port"].as_u64().is_some(), "{p}");
    let mut ws = server.ws(&format!("/plugin-ws/echo?token={token}")).await;
    ws.send_text("hello plugin").await;
    assert!(matches!(ws.recv().await, WsEvent::Text(t) if t == "hello plugin"));
    ws.send_binary(vec![0, 1, 2, 254, 255]).await;
    assert!(matches!(ws.recv().await, WsEvent::Binary(b) if b == [0, 1, 2, 254, 255]));
    ws.send_text("héllo ✓").await;
    assert!(matches!(ws.recv().await, WsEvent::Text(t) if t == "héllo ✓"));
}

#[actix_rt::test]
async fn three_thousand_frames_arrive_in_order() {
    let (server, token) = start(|d| {
        echo_plugin(d, "echo");
    });
    wait_running(&server, &token, "echo").await;
    let mut ws = server.ws(&format!("/plugin-ws/echo?token={token}")).await;
    const N: usize = 3000;
    for i in 0..N {
        if i % 2 == 0 {
            ws.send_text(format!("frame {i}")).await;
        } else {
            ws.send_binary((i as u32).to_be_bytes().to_vec()).await;
        }
    }
    for i in 0..N {
        match ws.recv().await {
            WsEvent::Text(t) if i % 2 == 0 => assert_eq!(t, format!("frame {i}")),
            WsEvent::Binary(b) if i % 2 == 1 => assert_eq!(b, (i as u32).to_be_bytes()),
            other => panic!("frame {i}: unexpected {other:?}"),
        }
    }
}

#[actix_rt::test]
async fn a_4_mib_frame_round_trips() {
    let (server, token) = start(|d| {
        echo_plugin(d, "echo");
    });
    wait_running(&server, &token, "echo").await;
    let mut ws = server.ws(&format!("/plugin-ws/echo?token={token}")).await;
    let big: Vec<u8> = (0..4 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
    ws.send_binary(big.clone()).await;
    match ws.recv().await {
        WsEvent::Binary(b) => assert!(
            b == big,
            "4 MiB frame came back altered ({} bytes)",
            b.len()
        ),
        other => panic!("expected the 4 MiB frame, got {other:?}"),
    }
    // The socket still works after it.
    ws.send_text("after").await;
    assert!(matches!(ws.recv().await, WsEvent::Text(t) if t == "after"));
}

#[actix_rt::test]
async fn client_close_reaches_the_plugin() {
    let mut dir = PathBuf::new();
    let (server, token) = start(|d| {
        dir = echo_plugin(d, "echo");
    });
    wait_running(&server, &token, "echo").await;
    let mut ws = server.ws(&format!("/plugin-ws/echo?token={token}")).await;
    ws.send_text("ping").await;
    ws.recv().await;
    ws.close(4001).await;
    assert_eq!(ws.recv_close().await, Some(4001));
    let log = dir.join("closes.log");
    eventually("the plugin recorded the client's close", || {
        std::fs::read_to_string(&log).is_ok_and(|l| l.lines().any(|c| c == "4001"))
    })
    .await;
}

#[actix_rt::test]
async fn plugin_close_reaches_the_client_with_its_code() {
    let (server, token) = start(|d| {
        echo_plugin(d, "echo");
    });
    wait_running(&server, &token, "echo").await;
    let mut ws = server.ws(&format!("/plugin-ws/echo?token={token}")).await;
    ws.send_text("__close__ 4321").await;
    match ws.recv().await {
        WsEvent::Close(code, reason) => {
            assert_eq!(code, Some(4321));
            assert_eq!(reason, "plugin closing");
        }
        other => panic!("expected the plugin's close, got {other:?}"),
    }
}

#[actix_rt::test]
async fn invalid_names_and_stopped_plugins_are_closed_with_4400_and_4404() {
    let (server, token) = start(|d| {
        echo_plugin(d, "echo");
    });
    wait_running(&server, &token, "echo").await;

    for bad in ["bad.name", "bad%20name", "x%2Fy"] {
        let mut ws = server.ws(&format!("/plugin-ws/{bad}?token={token}")).await;
        match ws.recv().await {
            WsEvent::Close(code, reason) => {
                assert_eq!(code, Some(4400), "{bad}");
                assert_eq!(reason, "Invalid plugin name");
            }
            other => panic!("{bad}: expected close 4400, got {other:?}"),
        }
    }
    let mut ws = server.ws(&format!("/plugin-ws/nope?token={token}")).await;
    match ws.recv().await {
        WsEvent::Close(code, reason) => {
            assert_eq!(code, Some(4404));
            assert_eq!(reason, "Plugin not running");
        }
        other => panic!("expected close 4404, got {other:?}"),
    }
    assert_eq!(
        server.try_ws("/plugin-ws/echo").await.err().as_deref(),
        Some("status 401")
    );

    // Stopped over REST: its clients get 1001, new ones 4404 until it is started again.
    let mut connected = server.ws(&format!("/plugin-ws/echo?token={token}")).await;
    connected.send_text("hi").await;
    assert!(matches!(connected.recv().await, WsEvent::Text(t) if t == "hi"));
    let (status, body) = server
        .post("/api/plugins/echo/stop", Some(&token), json!({}))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["data"]["state"], "stopped");
    assert_eq!(body["data"]["running"], false);
    let pid = body["data"]["pid"].as_i64();
    assert_eq!(pid, None);
    match connected.recv().await {
        WsEvent::Close(code, reason) => {
            assert_eq!(code, Some(1001));
            assert_eq!(reason, "Plugin stopping");
        }
        other => panic!("expected close 1001, got {other:?}"),
    }
    let mut ws = server.ws(&format!("/plugin-ws/echo?token={token}")).await;
    assert_eq!(ws.recv_close().await, Some(4404));

    let (status, body) = server
        .post("/api/plugins/echo/start", Some(&token), json!({}))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["data"]["running"], true);
    let mut ws = server.ws(&format!("/plugin-ws/echo?token={token}")).await;
    ws.send_text("back").await;
    assert!(matches!(ws.recv().await, WsEvent::Text(t) if t == "back"));

    let (status, body) = server
        .post("/api/plugins/nope/start", Some(&token), json!({}))
        .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (404, Some("PLUGIN_NOT_FOUND"))
    );
    let (status, body) = server
        .post("/api/plugins/bad.name/stop", Some(&token), json!({}))
        .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (400, Some("INVALID_PLUGIN_NAME"))
    );
    let (status, _) = server.get("/api/plugins", None).await;
    assert_eq!(status, 401);
    let (status, _) = server.post("/api/plugins/echo/stop", None, json!({})).await;
    assert_eq!(status, 401);
}

#[actix_rt::test]
async fn a_killed_plugin_closes_its_clients_with_4502_and_comes_back() {
    let (server, token) = start(|d| {
        echo_plugin(d, "echo");
    });
    let before = wait_running(&server, &token, "echo").await;
    let pid = before["pid"].as_i64().expect("pid") as i32;
    let mut ws = server.ws(&format!("/plugin-ws/echo?token={token}")).await;
    ws.send_text("one").await;
    assert!(matches!(ws.recv().await, WsEvent::Text(t) if t == "one"));

    // SAFETY: signalling the plugin process this test's gateway started.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    match ws.recv().await {
        WsEvent::Close(code, reason) => {
            assert_eq!(code, Some(4502));
            assert_eq!(reason, "Upstream error");
        }
        other => panic!("expected close 4502, got {other:?}"),
    }

    let after = wait_plugin(&server, &token, "echo", |p| {
        p["running"] == true && p["pid"].as_i64() != Some(i64::from(pid))
    })
    .await;
    assert_eq!(after["restarts"], 1, "{after}");
    assert!(
        after["lastError"]
            .as_str()
            .unwrap_or("")
            .contains("SIGKILL"),
        "{after}"
    );
    let mut ws = server.ws(&format!("/plugin-ws/echo?token={token}")).await;
    ws.send_text("two").await;
    assert!(matches!(ws.recv().await, WsEvent::Text(t) if t == "two"));
    assert!(server.logs().contains("restarting"), "restart not logged");
}

#[actix_rt::test]
async fn the_plugin_environment_is_minimal() {
    let mut dir = PathBuf::new();
    let (server, token) = start_env(
        |d| {
            // The binary itself (no shell in between, which would add its own variables).
            dir = plugin_dir(d, "echo");
            std::fs::copy(echo_plugin_bin(), dir.join("echo_plugin")).expect("copy plugin");
            write_manifest(
                &dir,
                json!({"name": "echo", "server": "echo_plugin", "args": ["--test-hooks"]}),
            );
        },
        |cmd| {
            cmd.env("AGENTGATE_HEARTBEAT_SECS", "30")
                .env("SOME_OTHER_VAR", "not for plugins");
        },
    );
    wait_running(&server, &token, "echo").await;
    let mut ws = server.ws(&format!("/plugin-ws/echo?token={token}")).await;
    ws.send_text("__env__").await;
    let env = ws.recv_json().await;
    let mut keys: Vec<&str> = env
        .as_object()
        .expect("env object")
        .keys()
        .map(String::as_str)
        .collect();
    keys.sort_unstable();
    assert_eq!(keys, ["HOME", "PATH", "PLUGIN_NAME"], "{env}");
    assert_eq!(env["PLUGIN_NAME"], "echo");
    assert_eq!(env["PATH"].as_str(), std::env::var("PATH").ok().as_deref());
}

#[actix_rt::test]
async fn a_broken_manifest_is_skipped_and_the_gateway_still_serves() {
    let (server, token) = start(|d| {
        echo_plugin(d, "echo");
        let broken = plugin_dir(d, "broken");
        std::fs::write(broken.join("manifest.json"), "{ not json").expect("write");
        let escaping = plugin_dir(d, "escaping");
        write_manifest(
            &escaping,
            json!({"name": "escaping", "server": "../echo/run.sh"}),
        );
        let misnamed = plugin_dir(d, "misnamed");
        write_manifest(&misnamed, json!({"name": "other", "server": "run.sh"}));
    });
    wait_running(&server, &token, "echo").await;
    let names: Vec<Value> = plugins(&server, &token)
        .await
        .into_iter()
        .map(|p| p["name"].clone())
        .collect();
    assert_eq!(names, [json!("echo")]);
    let logs = server.logs();
    for skipped in ["broken", "escaping", "misnamed"] {
        assert!(
            logs.lines()
                .any(|l| l.contains("invalid manifest") && l.contains(skipped)),
            "no log line for {skipped}: {logs}"
        );
    }
    let (status, _) = server.get("/health", None).await;
    assert_eq!(status, 200);
    let mut ws = server.ws(&format!("/plugin-ws/echo?token={token}")).await;
    ws.send_text("still here").await;
    assert!(matches!(ws.recv().await, WsEvent::Text(t) if t == "still here"));
}

/// A plugin that never prints the ready line, one that prints garbage, one
/// that exits at once and one that announces a port nobody listens on are
/// each reported over REST with the reason and retried; a good plugin beside
/// them serves meanwhile, and a disabled one is listed but not started.
#[actix_rt::test]
async fn bad_plugins_are_reported_and_retried_without_blocking_the_others() {
    let (server, token) = start(|d| {
        echo_plugin(d, "echo");
        script_plugin(d, "silent", "exec sleep 600");
        script_plugin(d, "garbage", "echo 'this is not json'\nexec sleep 600");
        script_plugin(d, "quitter", "echo 'cannot start' >&2\nexit 3");
        script_plugin(
            d,
            "liar",
            "echo '{\"ready\":true,\"port\":1}'\nexec sleep 600",
        );
        let off = script_plugin(d, "off", "exec sleep 600");
        write_manifest(
            &off,
            json!({"name": "off", "server": "run.sh", "enabled": false}),
        );
    });
    wait_running(&server, &token, "echo").await;
    let mut ws = server.ws(&format!("/plugin-ws/echo?token={token}")).await;
    ws.send_text("serving").await;
    assert!(matches!(ws.recv().await, WsEvent::Text(t) if t == "serving"));

    let expected = [
        ("quitter", "exit status: 3"),
        ("liar", "nothing accepts connections"),
        ("garbage", "this is not json"),
        ("silent", "no ready line"),
    ];
    for (name, reason) in expected {
        let p = wait_plugin(&server, &token, name, |p| p["restarts"].as_u64() >= Some(1)).await;
        assert_eq!(p["running"], false, "{p}");
        let err = p["lastError"].as_str().unwrap_or("");
        assert!(
            err.contains(reason),
            "{name}: lastError {err:?} lacks {reason:?}"
        );
        let mut ws = server.ws(&format!("/plugin-ws/{name}?token={token}")).await;
        assert_eq!(ws.recv_close().await, Some(4404), "{name}");
    }
    let off = plugin(&server, &token, "off")
        .await
        .expect("disabled plugin listed");
    assert_eq!(
        (off["enabled"].clone(), off["state"].clone()),
        (json!(false), json!("disabled"))
    );
    let (status, body) = server
        .post("/api/plugins/off/start", Some(&token), json!({}))
        .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (409, Some("PLUGIN_DISABLED"))
    );
    let logs = server.logs();
    assert!(logs.contains("cannot start"), "plugin stderr not logged");
    // The good plugin kept serving the whole time.
    ws.send_text("still serving").await;
    assert!(matches!(ws.recv().await, WsEvent::Text(t) if t == "still serving"));
}

#[actix_rt::test]
async fn gateway_shutdown_stops_plugin_servers() {
    let (mut server, token) = start(|d| {
        echo_plugin(d, "echo");
    });
    let p = wait_running(&server, &token, "echo").await;
    let pid = p["pid"].as_i64().expect("pid") as i32;
    assert!(pid_alive(pid));
    let mut ws = server.ws(&format!("/plugin-ws/echo?token={token}")).await;
    ws.send_text("hi").await;
    assert!(matches!(ws.recv().await, WsEvent::Text(t) if t == "hi"));
    // SAFETY: signalling the gateway this test started.
    unsafe { libc::kill(server.pid() as i32, libc::SIGTERM) };
    assert_eq!(ws.recv_close().await, Some(1001));
    let status = server.wait_exit();
    assert!(status.success(), "gateway exit {status:?}");
    eventually("the plugin server is gone", || !pid_alive(pid)).await;
}

/// Frames of the backpressure test: 64 KiB each, 64 MiB per direction.
const FLOOD_FRAMES: usize = 1024;
const FLOOD_FRAME_BYTES: usize = 64 * 1024;
/// Most the gateway's resident memory may grow while 64 MiB pass through a
/// slow side: the proxy's queues hold about 1.5 MiB, so anything near the
/// flood size means frames piled up in the gateway.
const MAX_GROWTH_KIB: u64 = 24 * 1024;

/// Backpressure both ways: a plugin flooding a client that reads slowly,
/// and a client flooding a plugin that stops reading, each with 64 MiB;
/// every frame arrives, in order, and the gateway's memory stays bounded.
#[actix_rt::test]
async fn a_slow_side_slows_the_other_and_gateway_memory_stays_bounded() {
    let (server, token) = start(|d| {
        echo_plugin(d, "echo");
    });
    wait_running(&server, &token, "echo").await;
    let gateway = server.pid();
    let mut ws = server.ws(&format!("/plugin-ws/echo?token={token}")).await;
    // Warm up the buffers a 64 KiB frame needs before taking the baseline.
    ws.send_binary(vec![7; FLOOD_FRAME_BYTES]).await;
    assert!(matches!(ws.recv().await, WsEvent::Binary(b) if b.len() == FLOOD_FRAME_BYTES));
    let baseline = rss_kib(gateway);
    let mut peak = baseline;

    // Plugin -> slow client.
    ws.send_text(format!("__flood__ {FLOOD_FRAMES} {FLOOD_FRAME_BYTES}"))
        .await;
    for i in 0..FLOOD_FRAMES {
        match ws.recv().await {
            WsEvent::Binary(b) => {
                assert_eq!(b.len(), FLOOD_FRAME_BYTES);
                assert_eq!(
                    b.get(..4),
                    Some(&(i as u32).to_be_bytes()[..]),
                    "frame {i} out of order"
                );
            }
            other => panic!("flood frame {i}: {other:?}"),
        }
        if i % 16 == 0 {
            peak = peak.max(rss_kib(gateway));
            // A slow reader, not a synchronisation.
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    // Client -> plugin that stops reading for a while.
    ws.send_text("__sink__").await;
    ws.send_text("__pause__ 1500").await;
    for i in 0..FLOOD_FRAMES {
        ws.send_binary(vec![1; FLOOD_FRAME_BYTES]).await;
        if i % 16 == 0 {
            peak = peak.max(rss_kib(gateway));
        }
    }
    ws.send_text("__count__").await;
    assert!(matches!(ws.recv().await, WsEvent::Text(t) if t == FLOOD_FRAMES.to_string()));
    let growth = peak.saturating_sub(baseline);
    assert!(
        growth < MAX_GROWTH_KIB,
        "gateway RSS grew by {growth} KiB while relaying 2 x 64 MiB"
    );
}

/// A plugin client that stops reading while the plugin echoes megabytes back
/// is cut off by the gateway within a few heartbeat intervals.
#[actix_rt::test]
async fn a_plugin_client_that_stops_reading_is_cut_off() {
    let (server, token) = start_env(
        |d| {
            echo_plugin(d, "echo");
        },
        |cmd| {
            cmd.arg("--heartbeat-secs").arg("1");
        },
    );
    wait_running(&server, &token, "echo").await;
    let before = crate::delivery::gateway_conns(server.pid(), server.addr.port());
    let mut ws = server.ws(&format!("/plugin-ws/echo?token={token}")).await;
    let conn = crate::delivery::new_conn(&server, &before).await;
    // Send until the gateway stops taking frames or cuts the connection;
    // never read. (Each direction has its own backpressure: while the echo
    // plugin keeps reading, the client's frames keep going, and the cut can
    // come while it is still sending.)
    for _ in 0..256 {
        let send = ws.try_send_binary(vec![7u8; 1024 * 1024]);
        match tokio::time::timeout(Duration::from_secs(2), send).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) | Err(_) => break,
        }
    }
    let took = crate::delivery::until_dropped(&server, conn).await;
    assert!(took < Duration::from_secs(10), "{took:?}");
}
