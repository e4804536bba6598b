//! Security and bad input (issue 12): TLS, Origin/Host checks, hardened auth,
//! limits, hostile frames. Every test runs a real `agentgate serve`.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::support::tls::TestCa;
use crate::util::{
    agentgate_bin, children_of, client_for, connect_ws_with, example_bin, project_dir, TestServer,
    WsEvent, WAIT,
};

/// Runs `agentgate serve` with `args` on a fresh data dir, expecting it to
/// refuse to start; returns its stderr.
fn serve_refuses(args: &[&std::ffi::OsStr]) -> String {
    serve_refuses_with(args, &[])
}

fn serve_refuses_with(args: &[&std::ffi::OsStr], env: &[(&str, &str)]) -> String {
    let data = tempfile::tempdir().unwrap();
    let mut child = Command::new(agentgate_bin())
        .arg("serve")
        .arg("--listen")
        .arg("127.0.0.1:0")
        .arg("--data-dir")
        .arg(data.path())
        .args(args)
        .env_remove("AGENTGATE_JWT_SECRET")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn agentgate serve");
    let deadline = Instant::now() + WAIT;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("agentgate serve {args:?} did not refuse to start");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let out = child.wait_with_output().unwrap();
    assert!(!status.success(), "serve {args:?} exited 0");
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("listening on"),
        "serve {args:?} started listening"
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// `--tls-cert/--tls-key`: HTTPS and wss:// with a certificate the test made;
/// a client that does not trust the CA, or speaks plain HTTP, gets nothing.
#[actix_rt::test]
async fn tls_serves_https_and_wss() {
    let ca = TestCa::new();
    let leaf = ca.leaf(&["localhost", "127.0.0.1"]);
    let server = TestServer::start_tls(&ca, &leaf, |_| {});
    assert!(server.url("/").starts_with("https://"));

    let (status, body) = server.get("/health", None).await;
    assert_eq!((status, body), (200, json!({"status": "ok"})));
    let token = server.token("alice");
    let (status, body) = server
        .get("/api/providers/sessions/running", Some(&token))
        .await;
    assert_eq!(status, 200, "{body}");

    // wss:// with the query token: a real chat socket behind TLS.
    let mut ws = server.ws(&format!("/ws?token={token}")).await;
    ws.send_text("not json").await;
    assert_eq!(ws.recv_json().await["code"], "INVALID_PAYLOAD");
    ws.send_json(json!({"type": "chat.send", "sessionId": "nope", "content": "hi"}))
        .await;
    assert_eq!(ws.recv_json().await["code"], "SESSION_NOT_FOUND");
    // And /shell: a real bash in a PTY, reached over wss://.
    let project = crate::util::project_dir();
    let mut shell = server.ws(&format!("/shell?token={token}")).await;
    shell
        .send_json(
            json!({"type": "init", "projectPath": project.path(), "isPlainShell": true,
            "initialCommand": "echo tls-$((40+2))", "cols": 80, "rows": 24}),
        )
        .await;
    let mut seen = String::new();
    while !seen.contains("tls-42") {
        let frame = shell.recv_json().await;
        seen.push_str(frame["data"].as_str().unwrap_or_default());
    }

    // A client trusting another CA refuses the handshake.
    let stranger = TestCa::new();
    let res = client_for(Some(stranger.client_config()))
        .get(server.url("/health"))
        .send()
        .await;
    assert!(
        res.is_err(),
        "a certificate from an untrusted CA was accepted"
    );
    let ws = connect_ws_with(
        &client_for(Some(stranger.client_config())),
        &server.ws_url("/ws"),
        Some(&token),
    )
    .await;
    assert!(ws.is_err(), "wss:// with an untrusted CA upgraded");
    // Plain HTTP on the TLS port is not served.
    let res = client_for(None)
        .get(format!("http://{}/health", server.addr))
        .send()
        .await;
    assert!(
        res.map(|r| r.status().is_success()).is_err(),
        "plain HTTP answered on the TLS port"
    );
}

/// Node's own TLS stack (OpenSSL), trusting the test CA through `ca`, gets the answer.
#[actix_rt::test]
async fn tls_works_for_node_https() {
    let ca = TestCa::new();
    let leaf = ca.leaf(&["localhost", "127.0.0.1"]);
    let server = TestServer::start_tls(&ca, &leaf, |_| {});
    let script = r#"
        const fs = require('fs'), https = require('https');
        const [port, ca] = process.argv.slice(1);
        https.get({host: 'localhost', port, path: '/health', ca: fs.readFileSync(ca)}, res => {
            let body = '';
            res.on('data', d => body += d);
            res.on('end', () => { console.log(res.statusCode + ' ' + body); });
        }).on('error', e => { console.error(e.message); process.exit(2); });
    "#;
    let out = tokio::process::Command::new("node")
        .arg("-e")
        .arg(script)
        .arg(server.addr.port().to_string())
        .arg(&ca.pem_path)
        .output();
    let out = tokio::time::timeout(WAIT, out)
        .await
        .expect("node timed out")
        .expect("node is required by the test suite (see .ci/run)");
    assert!(
        out.status.success(),
        "node https: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        r#"200 {"status":"ok"}"#
    );
}

/// Bad TLS settings stop the gateway at start with a message that names the problem.
#[test]
fn tls_misconfiguration_is_refused_at_start() {
    let ca = TestCa::new();
    let leaf = ca.leaf(&["localhost"]);
    let other = ca.leaf(&["other.test"]);
    let junk = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(junk.path(), "not a pem file\n").unwrap();

    let err = serve_refuses(&["--tls-cert".as_ref(), leaf.cert_path.as_os_str()]);
    assert!(err.contains("--tls-key"), "{err}");
    let err = serve_refuses(&[
        "--tls-cert".as_ref(),
        junk.path().as_os_str(),
        "--tls-key".as_ref(),
        leaf.key_path.as_os_str(),
    ]);
    assert!(
        err.contains("no CERTIFICATE") && err.contains(&*junk.path().to_string_lossy()),
        "{err}"
    );
    let err = serve_refuses(&[
        "--tls-cert".as_ref(),
        leaf.cert_path.as_os_str(),
        "--tls-key".as_ref(),
        junk.path().as_os_str(),
    ]);
    assert!(err.contains("private key"), "{err}");
    // A key that belongs to another certificate.
    let err = serve_refuses(&[
        "--tls-cert".as_ref(),
        leaf.cert_path.as_os_str(),
        "--tls-key".as_ref(),
        other.key_path.as_os_str(),
    ]);
    assert!(err.contains("rejected"), "{err}");
}

/// One raw HTTP/1.1 request (the test controls every header, `Host`
/// included); returns the status and the body.
fn raw(addr: SocketAddr, method: &str, path: &str, headers: &[(&str, &str)]) -> (u16, String) {
    let mut stream = std::net::TcpStream::connect(addr).expect("connect");
    stream.set_read_timeout(Some(WAIT)).unwrap();
    let mut req = format!("{method} {path} HTTP/1.1\r\n");
    if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
        req.push_str(&format!("Host: {addr}\r\n"));
    }
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    let body = if method == "POST" { "{}" } else { "" };
    if method == "POST" {
        req.push_str("Content-Type: application/json\r\n");
    }
    if !headers
        .iter()
        .any(|(k, _)| k.eq_ignore_ascii_case("connection"))
    {
        req.push_str("Connection: close\r\n");
    }
    req.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
    stream.write_all(req.as_bytes()).expect("write request");
    let mut answer = Vec::new();
    // An accepted upgrade keeps the connection open: read the head only.
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => answer.extend_from_slice(&buf[..n]),
            Err(e) => panic!("read answer of {method} {path}: {e}"),
        }
        let text = String::from_utf8_lossy(&answer);
        if text.starts_with("HTTP/1.1 101") && text.contains("\r\n\r\n") {
            break;
        }
    }
    let text = String::from_utf8_lossy(&answer).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {text:?}"));
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// The headers of a WebSocket upgrade request.
const UPGRADE: &[(&str, &str)] = &[
    ("Upgrade", "websocket"),
    ("Connection", "Upgrade"),
    ("Sec-WebSocket-Version", "13"),
    ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
];

fn with<'a>(base: &[(&'a str, &'a str)], more: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
    base.iter().chain(more).copied().collect()
}

fn code_of(body: &str) -> Value {
    let v: Value = serde_json::from_str(body).unwrap_or(Value::Null);
    if v["error"].is_object() {
        v["error"]["code"].clone()
    } else {
        v["code"].clone()
    }
}

/// Cross-site WebSocket hijacking, in platform mode above all (no token in
/// the way): an upgrade or a POST from another page's origin is refused with
/// 403 before anything is upgraded or spawned; the gateway's own origin, an
/// allowed one, and clients without `Origin` get through.
#[actix_rt::test]
async fn foreign_origins_are_refused_before_anything_spawns() {
    let server = TestServer::start_with(|cmd| {
        cmd.arg("--platform")
            .arg("--allowed-origins")
            .arg("http://localhost:5173, https://ui.example");
    });
    let _ = server.token("owner");
    let own = format!("http://{}", server.addr);
    let project = crate::util::project_dir();
    let evil = [("Origin", "http://evil.example")];
    for path in ["/ws", "/shell", "/plugin-ws/echo"] {
        for origin in [
            "http://evil.example",
            "null",
            "https://127.0.0.1",
            "http://localhost:5174",
        ] {
            let (status, body) = raw(
                server.addr,
                "GET",
                path,
                &with(UPGRADE, &[("Origin", origin)]),
            );
            assert_eq!(status, 403, "{origin} on {path}: {body}");
            assert_eq!(code_of(&body), "ORIGIN_NOT_ALLOWED", "{body}");
        }
    }
    let sessions = format!(
        r#"{{"provider":"claude","projectPath":"{}"}}"#,
        project.path().display()
    );
    let _ = sessions;
    let (status, body) = raw(server.addr, "POST", "/api/providers/sessions", &evil);
    assert_eq!((status, code_of(&body)), (403, json!("ORIGIN_NOT_ALLOWED")));
    let (status, _) = raw(server.addr, "POST", "/api/auth/login", &evil);
    assert_eq!(status, 403);
    // Nothing was spawned by any of it: the gateway has no child process.
    assert_eq!(children_of(server.pid()), Vec::<i32>::new());
    // A GET that changes nothing may come from anywhere (the browser keeps the answer from the page).
    let (status, _) = raw(server.addr, "GET", "/api/providers/sessions/running", &evil);
    assert_eq!(status, 200);

    // The gateway's own origin, the allowed ones, and no Origin at all: upgraded.
    for origin in [own.as_str(), "http://localhost:5173", "https://ui.example"] {
        let (status, body) = raw(
            server.addr,
            "GET",
            "/ws",
            &with(UPGRADE, &[("Origin", origin)]),
        );
        assert_eq!(status, 101, "{origin}: {body}");
    }
    let (status, _) = raw(server.addr, "GET", "/ws", UPGRADE);
    assert_eq!(status, 101);
    // And a real terminal from the own origin works.
    let mut shell = crate::util::connect_ws_with(&server.client(), &server.ws_url("/shell"), None)
        .await
        .expect("upgrade");
    shell
        .send_json(
            json!({"type": "init", "projectPath": project.path(), "isPlainShell": true,
            "initialCommand": "echo origin-$((6*7))"}),
        )
        .await;
    let mut seen = String::new();
    while !seen.contains("origin-42") {
        seen.push_str(shell.recv_json().await["data"].as_str().unwrap_or_default());
    }
}

/// DNS rebinding: on a loopback listener, a Host that is not a loopback name
/// is refused on every route, the public ones included, unless allowed.
#[actix_rt::test]
async fn a_rebound_host_name_is_refused_on_loopback() {
    let server = TestServer::start_with(|cmd| {
        cmd.arg("--platform")
            .arg("--allowed-hosts")
            .arg("devbox.internal");
    });
    let _ = server.token("owner");
    let port = server.addr.port();
    for host in [
        format!("evil.example:{port}"),
        format!("192.168.7.7:{port}"),
        "localhost.evil.example".into(),
    ] {
        let (status, body) = raw(server.addr, "GET", "/health", &[("Host", &host)]);
        assert_eq!(
            (status, code_of(&body)),
            (403, json!("HOST_NOT_ALLOWED")),
            "{host}: {body}"
        );
        // Same-origin by its own Host, as a rebound page would be: still refused.
        let origin = format!("http://{host}");
        let (status, _) = raw(
            server.addr,
            "GET",
            "/shell",
            &with(UPGRADE, &[("Host", &host), ("Origin", &origin)]),
        );
        assert_eq!(status, 403, "{host}");
    }
    assert_eq!(children_of(server.pid()), Vec::<i32>::new());
    for host in [
        format!("localhost:{port}"),
        format!("127.0.0.1:{port}"),
        format!("[::1]:{port}"),
        format!("devbox.internal:{port}"),
    ] {
        let (status, body) = raw(server.addr, "GET", "/health", &[("Host", &host)]);
        assert_eq!(status, 200, "{host}: {body}");
    }
}

/// Bad `--allowed-origins` / `--allowed-hosts` entries stop the start; `*` is allowed with a warning.
#[actix_rt::test]
async fn origin_flags_are_checked_at_start() {
    let err = serve_refuses(&["--allowed-origins".as_ref(), "localhost:5173".as_ref()]);
    assert!(err.contains("'localhost:5173'"), "{err}");
    let err = serve_refuses_with(&[], &[("AGENTGATE_ALLOWED_HOSTS", "box:8080")]);
    assert!(err.contains("'box:8080'"), "{err}");
    let server = TestServer::start_with(|cmd| {
        cmd.env("AGENTGATE_ALLOWED_ORIGINS", "*");
    });
    assert!(
        server.logs().contains("--allowed-origins '*'"),
        "{}",
        server.logs()
    );
    let token = server.token("ann");
    let (status, _) = raw(
        server.addr,
        "GET",
        &format!("/ws?token={token}"),
        &with(UPGRADE, &[("Origin", "http://anything.example")]),
    );
    assert_eq!(status, 101);
}

/// No route is public by omission: every private route answers 401 without
/// a token, also when its path is percent-encoded; the public ones answer.
#[actix_rt::test]
async fn every_route_but_the_public_ones_needs_a_token() {
    let server = TestServer::start();
    for (method, path) in [
        ("POST", "/api/providers/sessions"),
        ("GET", "/api/providers/sessions/running"),
        ("GET", "/api/providers/sessions/some-id"),
        ("GET", "/api/plugins"),
        ("POST", "/api/plugins/echo/start"),
        ("POST", "/api/plugins/echo/stop"),
        ("GET", "/ws"),
        ("GET", "/shell"),
        ("GET", "/plugin-ws/echo"),
        ("GET", "/w%73"),
        ("GET", "/%73hell"),
        ("GET", "/api/providers/sessions/%72unning"),
    ] {
        let headers = if method == "GET" { UPGRADE } else { &[] };
        let (status, body) = raw(server.addr, method, path, headers);
        assert_eq!(status, 401, "{method} {path}: {body}");
    }
    assert_eq!(raw(server.addr, "GET", "/health", &[]).0, 200);
    let (status, body) = raw(server.addr, "POST", "/api/auth/login", &[]);
    assert_eq!(status, 400, "{body}");
    assert_eq!(raw(server.addr, "GET", "/no/such/route", &[]).0, 404);
}

async fn post_with_headers(
    server: &TestServer,
    path: &str,
    body: Value,
) -> (u16, Option<String>, Value) {
    let mut res = server
        .client()
        .post(server.url(path))
        .send_json(&body)
        .await
        .expect("POST");
    let retry = res
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let bytes = res.body().await.expect("body");
    (
        res.status().as_u16(),
        retry,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

fn error_code(body: &Value) -> Value {
    if body["error"].is_object() {
        body["error"]["code"].clone()
    } else {
        body["code"].clone()
    }
}

/// A login flood: with one hash allowed at a time, the extra logins are
/// refused at once with 503 + Retry-After (never queued), unknown usernames
/// occupy a hash like known ones (the dummy hash: their timing is a real
/// user's), and a closed registration answers 403 without needing a hash.
#[actix_rt::test]
async fn login_flood_is_bounded_and_registration_checks_first() {
    let server = TestServer::start_with(|cmd| {
        cmd.arg("--max-concurrent-hashes").arg("1");
    });
    let (status, _, body) = post_with_headers(
        &server,
        "/api/auth/register",
        json!({"username": "ann", "password": "correct horse"}),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let attempts = (0..16).map(|i| {
        post_with_headers(
            &server,
            "/api/auth/login",
            json!({"username": format!("nobody{i}"), "password": "guess"}),
        )
    });
    let register = post_with_headers(
        &server,
        "/api/auth/register",
        json!({"username": "mallory", "password": "x"}),
    );
    let (answers, register) = tokio::join!(futures_util::future::join_all(attempts), register);
    let busy: Vec<_> = answers.iter().filter(|(s, _, _)| *s == 503).collect();
    let refused = answers.iter().filter(|(s, _, _)| *s == 401).count();
    assert_eq!(busy.len() + refused, answers.len(), "{answers:?}");
    assert!(
        !busy.is_empty(),
        "no login was refused while the only hash slot was taken: {answers:?}"
    );
    assert!(refused >= 1, "{answers:?}");
    for (_, retry, body) in &busy {
        assert_eq!(retry.as_deref(), Some("1"));
        assert_eq!(error_code(body), "SERVER_BUSY");
    }
    assert_eq!(
        (register.0, error_code(&register.2)),
        (403, json!("REGISTRATION_CLOSED"))
    );
    // The flood is over: ann logs in.
    let (status, _, body) = post_with_headers(
        &server,
        "/api/auth/login",
        json!({"username": "ann", "password": "correct horse"}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
}

/// Failed logins are throttled per username and per client address: 429
/// with Retry-After and a clear error, even for the right password, until the
/// window has passed.
#[actix_rt::test]
async fn failed_logins_are_throttled_per_user_and_per_address() {
    let server = TestServer::start_with(|cmd| {
        cmd.args([
            "--login-failures-per-user",
            "3",
            "--login-failures-per-address",
            "5",
        ])
        .args(["--login-window-secs", "600"]);
    });
    let good = json!({"username": "ann", "password": "correct horse"});
    assert_eq!(
        post_with_headers(&server, "/api/auth/register", good.clone())
            .await
            .0,
        201
    );
    let wrong = |user: &str| json!({"username": user, "password": "wrong"});
    for _ in 0..3 {
        assert_eq!(
            post_with_headers(&server, "/api/auth/login", wrong("ann"))
                .await
                .0,
            401
        );
    }
    let (status, retry, body) = post_with_headers(&server, "/api/auth/login", good.clone()).await;
    assert_eq!(
        (status, error_code(&body)),
        (429, json!("TOO_MANY_ATTEMPTS")),
        "{body}"
    );
    let secs: u64 = retry.expect("Retry-After").parse().unwrap();
    assert!((1..=600).contains(&secs), "{secs}");
    let message = body["error"]["message"]
        .as_str()
        .or(body["error"].as_str())
        .unwrap_or_default();
    assert!(message.contains("try again in"), "{body}");
    // Another username from the same address still has budget: 2 more failures...
    for _ in 0..2 {
        assert_eq!(
            post_with_headers(&server, "/api/auth/login", wrong("bob"))
                .await
                .0,
            401
        );
    }
    // ...then the address is at its limit for every name.
    let (status, retry, _) = post_with_headers(&server, "/api/auth/login", wrong("carol")).await;
    assert_eq!(status, 429);
    assert!(retry.is_some());
}

/// `AGENTGATE_JWT_SECRET` shorter than 32 bytes stops the start.
#[test]
fn a_short_jwt_secret_is_refused() {
    let err = serve_refuses_with(&[], &[("AGENTGATE_JWT_SECRET", "hunter2")]);
    assert!(
        err.contains("AGENTGATE_JWT_SECRET is 7 bytes; at least 32"),
        "{err}"
    );
}

fn mode_of(path: &Path) -> u32 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o777
}

/// At start the data dir is made 0700 and the secret, database and WAL files
/// 0600 (with a warning when they were looser); a half-written secret file is
/// replaced instead of being used.
#[actix_rt::test]
async fn private_files_are_made_private_at_start() {
    // A fresh data dir: everything private from the first byte.
    let server = TestServer::start();
    let token = server.token("ann");
    let dir = server.data_dir().to_path_buf();
    assert_eq!(mode_of(&dir), 0o700);
    for f in [
        "jwt-secret",
        "agentgate.db",
        "agentgate.db-wal",
        "agentgate.db-shm",
    ] {
        assert_eq!(mode_of(&dir.join(f)), 0o600, "{f}");
    }
    // Loosen everything, and leave a half-written secret behind.
    let data = server.kill_keep_data();
    std::fs::set_permissions(data.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    for f in ["agentgate.db", "agentgate.db-wal", "agentgate.db-shm"] {
        let p = data.path().join(f);
        if p.exists() {
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        }
    }
    let secret = data.path().join("jwt-secret");
    std::fs::write(&secret, "3f9a").unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o644)).unwrap();
    let server = TestServer::start_in(data, |_| {});
    let logs = server.logs();
    assert!(logs.contains("readable by other users"), "{logs}");
    assert!(logs.contains("JWT secret file is incomplete"), "{logs}");
    assert_eq!(mode_of(server.data_dir()), 0o700);
    for f in [
        "jwt-secret",
        "agentgate.db",
        "agentgate.db-wal",
        "agentgate.db-shm",
    ] {
        assert_eq!(mode_of(&server.data_dir().join(f)), 0o600, "{f}");
    }
    assert_eq!(
        std::fs::read(server.data_dir().join("jwt-secret"))
            .unwrap()
            .len(),
        96
    );
    // The secret changed, so the token of the old one is refused; a new one works.
    let (status, _) = server
        .get("/api/providers/sessions/running", Some(&token))
        .await;
    assert_eq!(status, 401);
    let fresh = server.token("ann");
    let (status, _) = server
        .get("/api/providers/sessions/running", Some(&fresh))
        .await;
    assert_eq!(status, 200);
}

/// `agentgate token --revoke --user NAME`: every earlier token of the user is
/// refused (REST and upgrades); tokens issued afterwards work; other users are untouched.
#[actix_rt::test]
async fn revoked_tokens_are_refused() {
    let server = TestServer::start();
    let old = server.token("ann");
    let bobs = server.token("bob");
    let out = Command::new(agentgate_bin())
        .args(["token", "--revoke", "--user", "ann", "--data-dir"])
        .arg(server.data_dir())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.stdout.is_empty());
    assert!(String::from_utf8_lossy(&out.stderr).contains("revoked"));
    let (status, body) = server
        .get("/api/providers/sessions/running", Some(&old))
        .await;
    assert_eq!(status, 401, "{body}");
    assert_eq!(body["error"]["message"], "Token revoked");
    assert_eq!(
        server
            .try_ws(&format!("/ws?token={old}"))
            .await
            .err()
            .as_deref(),
        Some("status 401")
    );
    assert_eq!(
        server
            .get("/api/providers/sessions/running", Some(&bobs))
            .await
            .0,
        200
    );
    let new = server.token("ann");
    assert_eq!(
        server
            .get("/api/providers/sessions/running", Some(&new))
            .await
            .0,
        200
    );
    // An unknown user is an error, not a silent success.
    let out = Command::new(agentgate_bin())
        .args(["token", "--revoke", "--user", "nobody", "--data-dir"])
        .arg(server.data_dir())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no user named nobody"));
}

/// The close code and reason a socket ends with (pings answered meanwhile).
async fn close_of(ws: &mut crate::util::WsClient) -> (Option<u16>, String) {
    loop {
        match ws.recv().await {
            WsEvent::Close(code, reason) => return (code, reason),
            WsEvent::Ended => return (None, String::new()),
            _ => {}
        }
    }
}

/// A token revoked while `/ws` and `/shell` are open closes both with 1008
/// (checked every heartbeat), and a token that runs out closes them at its
/// expiry; another user's socket stays open.
#[actix_rt::test]
async fn revoked_or_expired_tokens_close_live_sockets_with_1008() {
    let server = TestServer::start_with(|cmd| {
        cmd.arg("--heartbeat-secs").arg("2");
    });
    let ann = server.token("ann");
    let bob = server.token("bob");
    let mut chat = server.ws(&format!("/ws?token={ann}")).await;
    let mut shell = server.ws(&format!("/shell?token={ann}")).await;
    let mut bobs = server.ws(&format!("/ws?token={bob}")).await;
    server.revoke("ann");
    assert_eq!(
        close_of(&mut chat).await,
        (Some(1008), "token revoked".into())
    );
    assert_eq!(
        close_of(&mut shell).await,
        (Some(1008), "token revoked".into())
    );
    // Bob's socket still answers (a bad frame gets its protocol_error).
    bobs.send_text("{").await;
    assert_eq!(bobs.recv_json().await["code"], "INVALID_PAYLOAD");

    let out = Command::new(agentgate_bin())
        .args(["token", "--user", "bob", "--ttl-secs", "3", "--data-dir"])
        .arg(server.data_dir())
        .output()
        .unwrap();
    assert!(out.status.success());
    let short = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let opened = Instant::now();
    let mut chat = server.ws(&format!("/ws?token={short}")).await;
    let mut shell = server.ws(&format!("/shell?token={short}")).await;
    assert_eq!(
        close_of(&mut chat).await,
        (Some(1008), "token expired".into())
    );
    assert_eq!(
        close_of(&mut shell).await,
        (Some(1008), "token expired".into())
    );
    // Expiry is in whole seconds: 3 s after issue is at least 2 s after opening.
    assert!(
        opened.elapsed() >= Duration::from_secs(2),
        "{:?}",
        opened.elapsed()
    );
    assert_eq!(
        server
            .try_ws(&format!("/ws?token={short}"))
            .await
            .err()
            .as_deref(),
        Some("status 401")
    );
    // Bob's long-lived token was not touched (his first socket, unread
    // meanwhile, was dropped by the heartbeat: a new one).
    let mut bobs = server.ws(&format!("/ws?token={bob}")).await;
    bobs.send_text("{").await;
    assert_eq!(bobs.recv_json().await["code"], "INVALID_PAYLOAD");
}

/// A WebSocket client over a plain TCP stream that writes any frame, legal
/// or not (fragments, invalid UTF-8 in text frames, raw opcodes).
pub struct RawWs(std::net::TcpStream);

impl RawWs {
    /// Upgrades `path` (a token in its query); panics unless 101.
    pub fn open(addr: SocketAddr, path: &str) -> RawWs {
        let mut stream = std::net::TcpStream::connect(addr).expect("connect");
        stream.set_read_timeout(Some(WAIT)).unwrap();
        let mut req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n");
        for (k, v) in UPGRADE {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        req.push_str("\r\n");
        stream.write_all(req.as_bytes()).unwrap();
        // Byte by byte up to the end of the head: nothing after it is consumed.
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            stream.read_exact(&mut byte).expect("upgrade answer");
            head.push(byte[0]);
        }
        let head = String::from_utf8_lossy(&head);
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        RawWs(stream)
    }

    /// Writes one client frame (masked with a zero key, which leaves the payload as is).
    pub fn send(&mut self, opcode: u8, fin: bool, payload: &[u8]) {
        let mut frame = vec![(u8::from(fin) << 7) | opcode];
        match payload.len() {
            n if n < 126 => frame.push(0x80 | n as u8),
            n if n <= 0xffff => {
                frame.push(0x80 | 126);
                frame.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                frame.push(0x80 | 127);
                frame.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        frame.extend_from_slice(&[0, 0, 0, 0]);
        frame.extend_from_slice(payload);
        // The server may close before reading everything (an oversized message).
        let _ = self.0.write_all(&frame);
    }

    pub fn text(&mut self, text: &str) {
        self.send(1, true, text.as_bytes());
    }

    /// The next server frame: opcode and payload; `None` at the end of the connection.
    pub fn recv(&mut self) -> Option<(u8, Vec<u8>)> {
        let mut head = [0u8; 2];
        self.0.read_exact(&mut head).ok()?;
        let len = match head[1] & 0x7f {
            126 => {
                let mut b = [0u8; 2];
                self.0.read_exact(&mut b).ok()?;
                u64::from(u16::from_be_bytes(b))
            }
            127 => {
                let mut b = [0u8; 8];
                self.0.read_exact(&mut b).ok()?;
                u64::from_be_bytes(b)
            }
            n => u64::from(n),
        };
        let mut payload = vec![0u8; len as usize];
        self.0.read_exact(&mut payload).ok()?;
        Some((head[0] & 0x0f, payload))
    }

    /// The next text frame as JSON (pings skipped).
    pub fn recv_json(&mut self) -> Value {
        loop {
            match self.recv() {
                Some((1, payload)) => return serde_json::from_slice(&payload).unwrap(),
                Some((9, _)) => continue,
                other => panic!("expected a text frame, got {other:?}"),
            }
        }
    }

    /// The close code the server ends with (text frames before it are returned too).
    pub fn recv_close(&mut self) -> (Option<u16>, Vec<Value>) {
        let mut texts = Vec::new();
        loop {
            match self.recv() {
                Some((8, payload)) => {
                    let code =
                        (payload.len() >= 2).then(|| u16::from_be_bytes([payload[0], payload[1]]));
                    return (code, texts);
                }
                Some((1, payload)) => texts.push(serde_json::from_slice(&payload).unwrap()),
                Some(_) => {}
                None => return (None, texts),
            }
        }
    }
}

/// RFC 6455 frames on `/ws`: a fragmented text message (a character split
/// between fragments) is reassembled and handled; binary frames, fragmented
/// or not, get `protocol_error` and the socket stays open; JSON nested
/// deeper than 128 levels is refused; a message above 8 MiB across
/// fragments is refused with 1009; invalid UTF-8 closes with 1007, whole or
/// fragmented, on `/ws` and `/shell`.
#[actix_rt::test]
async fn ws_frames_are_reassembled_and_checked() {
    let server = TestServer::start();
    let token = server.token("ann");
    let path = format!("/ws?token={token}");
    let mut ws = RawWs::open(server.addr, &path);
    let msg = r#"{"type":"chat.subscribe","sessions":[{"sessionId":"né"}]}"#.as_bytes();
    let split = msg.iter().position(|&b| b == 0xc3).unwrap() + 1;
    ws.send(1, false, &msg[..10]);
    ws.send(0, false, &msg[10..split]);
    ws.send(0, true, &msg[split..]);
    let v = ws.recv_json();
    assert_eq!(
        (v["code"].as_str(), v["sessionId"].as_str()),
        (Some("SESSION_NOT_FOUND"), Some("né")),
        "{v}"
    );

    ws.send(2, true, b"\x00\x01binary");
    let v = ws.recv_json();
    assert_eq!(v["code"], "INVALID_PAYLOAD", "{v}");
    assert!(v["error"].as_str().unwrap().contains("binary"), "{v}");
    ws.send(2, false, b"part");
    ws.send(0, false, b"part");
    ws.send(0, true, b"part");
    assert_eq!(ws.recv_json()["code"], "INVALID_PAYLOAD");

    let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    ws.text(&deep);
    let v = ws.recv_json();
    assert_eq!(v["code"], "INVALID_PAYLOAD");
    assert!(
        v["error"].as_str().unwrap().contains("deeper than 128"),
        "{v}"
    );
    // Still open and answering after all of it.
    ws.text("{");
    assert_eq!(ws.recv_json()["code"], "INVALID_PAYLOAD");

    // 8 fragments of 1 MiB after "{": each is below the limit, the message is not.
    let chunk = vec![b' '; 1 << 20];
    ws.send(1, false, b"{");
    for _ in 0..8 {
        ws.send(0, false, &chunk);
    }
    let (code, texts) = ws.recv_close();
    assert_eq!(code, Some(1009));
    assert_eq!(
        texts.last().map(|v| v["code"].clone()),
        Some(json!("MESSAGE_TOO_LARGE"))
    );

    let mut ws = RawWs::open(server.addr, &path);
    ws.send(1, false, b"{\"type\":\"");
    ws.send(0, true, b"\xff\"}");
    assert_eq!(ws.recv_close().0, Some(1007));
    for path in [path.clone(), format!("/shell?token={token}")] {
        let mut ws = RawWs::open(server.addr, &path);
        ws.send(1, true, b"{\"type\":\"\xc3\"}");
        assert_eq!(ws.recv_close().0, Some(1007), "{path}");
    }
    assert!(!server.logs().contains("panicked"), "{}", server.logs());
}

/// Client values that would reach a CLI's argv (model, effort, tool
/// patterns) are checked before anything is spawned: one starting with `-`
/// is refused with a `protocol_error` naming the field, and no process starts.
#[actix_rt::test]
async fn option_values_that_look_like_flags_are_refused() {
    let server = TestServer::start_with(|cmd| {
        cmd.arg("--claude-bin").arg(example_bin("fake_claude"));
    });
    let token = server.token("ann");
    let project = project_dir();
    let session = server
        .create_session(&token, "claude", project.path())
        .await;
    let mut ws = server.ws(&format!("/ws?token={token}")).await;
    for (options, field) in [
        (
            json!({"model": "--dangerously-skip-permissions"}),
            "options.model",
        ),
        (json!({"effort": "-c"}), "options.effort"),
        (
            json!({"toolsSettings": {"allowedTools": ["Read", "--dangerously-skip-permissions"]}}),
            "options.toolsSettings.allowedTools",
        ),
    ] {
        ws.send_json(
            json!({"type": "chat.send", "sessionId": session, "content": "hi", "options": options}),
        )
        .await;
        let v = ws.recv_json().await;
        assert_eq!(
            (v["kind"].as_str(), v["code"].as_str()),
            (Some("protocol_error"), Some("INVALID_PAYLOAD")),
            "{v}"
        );
        assert!(v["error"].as_str().unwrap().contains(field), "{v}");
        assert_eq!(v["sessionId"], session.as_str());
    }
    assert!(children_of(server.pid()).is_empty(), "a CLI was started");
}

/// Per-user limits refuse clearly, each at its flag's value, and count one
/// user only: sockets (429 `TOO_MANY_SOCKETS` at the upgrade, the place
/// given back when a socket closes), sessions per minute (429
/// `TOO_MANY_SESSIONS` with `Retry-After`), runs at once (`TOO_MANY_RUNS`),
/// entries of one `chat.subscribe` (`TOO_MANY_ENTRIES`), and terminals
/// (an `error` frame naming the flag; a detached one counts).
#[actix_rt::test]
async fn per_user_limits_refuse_clearly() {
    let server = TestServer::start_with(|cmd| {
        cmd.arg("--claude-bin")
            .arg(example_bin("fake_claude"))
            .args(["--max-sockets-per-user", "2", "--max-runs-per-user", "1"])
            .args(["--max-ptys-per-user", "1", "--max-subscribe-entries", "3"])
            .args(["--max-sessions-per-minute", "3"]);
    });
    let ann = server.token("ann");
    let bob = server.token("bob");
    let project = project_dir();
    let mut sessions = Vec::new();
    for _ in 0..3 {
        sessions.push(server.create_session(&ann, "claude", project.path()).await);
    }
    let mut res = server
        .client()
        .post(server.url("/api/providers/sessions"))
        .bearer_auth(&ann)
        .send_json(&json!({"provider": "claude", "projectPath": project.path()}))
        .await
        .unwrap();
    assert_eq!(res.status().as_u16(), 429);
    let wait: u64 = res
        .headers()
        .get("retry-after")
        .unwrap()
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=61).contains(&wait), "{wait}");
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["error"]["code"], "TOO_MANY_SESSIONS", "{body}");
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("--max-sessions-per-minute"));
    let bobs_session = server.create_session(&bob, "claude", project.path()).await;

    // Two sockets of ann: a third is refused before the upgrade; bob's are not.
    let mut chat = server.ws(&format!("/ws?token={ann}")).await;
    let mut shell = server.ws(&format!("/shell?token={ann}")).await;
    assert_eq!(
        server
            .try_ws(&format!("/ws?token={ann}"))
            .await
            .err()
            .as_deref(),
        Some("status 429")
    );
    let mut bobs = server.ws(&format!("/ws?token={bob}")).await;

    let entries = |n: usize| -> Vec<Value> {
        sessions
            .iter()
            .cycle()
            .take(n)
            .map(|s| json!({"sessionId": s}))
            .collect()
    };
    chat.send_json(json!({"type": "chat.subscribe", "sessions": entries(4)}))
        .await;
    let v = chat.recv_json().await;
    assert_eq!(v["code"], "TOO_MANY_ENTRIES", "{v}");
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .contains("--max-subscribe-entries"),
        "{v}"
    );
    chat.send_json(json!({"type": "chat.subscribe", "sessions": entries(3)}))
        .await;
    for _ in 0..3 {
        assert_eq!(chat.recv_json().await["kind"], "chat_subscribed");
    }

    let send =
        |session: &str| json!({"type": "chat.send", "sessionId": session, "content": "hang"});
    chat.send_json(send(&sessions[0])).await;
    chat.recv_until_kind("stream_delta").await;
    chat.send_json(send(&sessions[1])).await;
    let (v, _) = chat.recv_until_kind("protocol_error").await;
    assert_eq!(
        (v["code"].as_str(), v["sessionId"].as_str()),
        (Some("TOO_MANY_RUNS"), Some(sessions[1].as_str())),
        "{v}"
    );
    assert!(
        v["error"].as_str().unwrap().contains("--max-runs-per-user"),
        "{v}"
    );
    // Bob's run is his own.
    bobs.send_json(json!({"type": "chat.send", "sessionId": bobs_session, "content": "text:2"}))
        .await;
    let (done, _) = bobs.recv_until_kind("complete").await;
    assert_eq!(done["success"], true, "{done}");
    // Once ann's run is aborted, her next one starts.
    chat.send_json(json!({"type": "chat.abort", "sessionId": sessions[0]}))
        .await;
    chat.recv_until_kind("complete").await;
    chat.send_json(json!({"type": "chat.send", "sessionId": sessions[1], "content": "text:1"}))
        .await;
    let (done, _) = chat.recv_until_kind("complete").await;
    assert_eq!(done["success"], true, "{done}");

    let init = |id: &str| {
        json!({"type": "init", "projectPath": project.path(), "sessionId": id,
               "isPlainShell": true, "initialCommand": "sleep 60", "cols": 80, "rows": 24})
    };
    shell.send_json(init("one")).await;
    // Leaving it (a second init) detaches it; it still counts.
    shell.send_json(init("two")).await;
    let message = loop {
        let v = shell.recv_json().await;
        if v["type"] == "error" {
            break v["message"].as_str().unwrap().to_string();
        }
    };
    assert!(
        message.contains("Too many terminals") && message.contains("--max-ptys-per-user"),
        "{message}"
    );

    // A closed socket gives its place back.
    chat.close(1000).await;
    assert_eq!(chat.recv_close().await, Some(1000));
    let deadline = Instant::now() + WAIT;
    loop {
        match server.try_ws(&format!("/ws?token={ann}")).await {
            Ok(_) => break,
            Err(e) => {
                assert_eq!(e, "status 429");
                assert!(
                    Instant::now() < deadline,
                    "the closed socket's place never came back"
                );
                // The place is given back when the socket actor has stopped, just after its close.
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

/// One hostile client throws every bad-input class at one gateway while
/// another user's run streams: malformed, wrong-typed, unknown and oversized
/// frames, fragments, invalid UTF-8, binary, deep nesting, option values
/// that look like flags, unknown and foreign sessions and permission ids,
/// forged, expired and revoked tokens, cross-site origins, bad shell and
/// plugin requests. Nothing panics, the other run streams every seq once,
/// in order, to a successful end, and the gateway keeps serving.
#[actix_rt::test]
async fn a_hostile_client_does_not_disturb_another_users_run() {
    let server = TestServer::start_with(|cmd| {
        cmd.arg("--claude-bin").arg(example_bin("fake_claude"));
    });
    let bob = server.token("bob");
    let mallory = server.token("mallory");
    let project = project_dir();
    let bobs_session = server.create_session(&bob, "claude", project.path()).await;
    let evil_session = server
        .create_session(&mallory, "claude", project.path())
        .await;
    let mut bobs = server.ws(&format!("/ws?token={bob}")).await;
    bobs.send_json(json!({"type": "chat.send", "sessionId": bobs_session,
        "content": "text:300 delay_ms:10 permission:Bash"}))
        .await;
    let (asked, before) = bobs.recv_until_kind("permission_request").await;

    let ws_path = format!("/ws?token={mallory}");
    let mut m = RawWs::open(server.addr, &ws_path);
    let refusals = [
        "{".to_string(),
        "[]".into(),
        "null".into(),
        r#"{"type": 7}"#.into(),
        r#"{"type": "chat.nope"}"#.into(),
        r#"{"type": "chat.send", "sessionId": 5, "content": []}"#.into(),
        json!({"type": "chat.send", "sessionId": "no-such-session", "content": "hi"}).to_string(),
        json!({"type": "chat.send", "sessionId": bobs_session, "content": "hi"}).to_string(),
        json!({"type": "chat.abort", "sessionId": bobs_session}).to_string(),
        json!({"type": "chat.subscribe", "sessions": [{"sessionId": bobs_session, "lastSeq": -1}]})
            .to_string(),
        json!({"type": "chat.send", "sessionId": evil_session, "content": "hi",
            "options": {"model": "--dangerously-skip-permissions"}})
        .to_string(),
        json!({"type": "chat.subscribe", "sessions": vec![json!({"sessionId": "x"}); 300]})
            .to_string(),
        format!("{}{}", "{\"a\":".repeat(50_000), "}".repeat(50_000)),
    ];
    for frame in &refusals {
        m.text(frame);
        let v = m.recv_json();
        assert_eq!(v["kind"], "protocol_error", "{frame:.80}: {v}");
    }
    // Answers to another user's permission request are ignored, silently.
    m.text(&json!({"type": "chat.permission-response", "requestId": asked["requestId"], "allow": true}).to_string());
    m.send(2, true, b"\x00binary");
    assert_eq!(m.recv_json()["code"], "INVALID_PAYLOAD");
    m.send(2, false, b"part");
    m.send(0, true, b"part");
    assert_eq!(m.recv_json()["code"], "INVALID_PAYLOAD");
    // Probe: the socket still answers in order (nothing above was answered late).
    m.text("{");
    assert_eq!(
        m.recv_json()["error"],
        "Invalid websocket payload: not JSON"
    );
    m.send(1, false, b"{\"type\":");
    m.send(0, true, b"\"\xc3\"}");
    assert_eq!(m.recv_close().0, Some(1007));
    let mut m = RawWs::open(server.addr, &ws_path);
    m.send(1, true, &vec![b' '; 9 << 20]);
    assert_eq!(m.recv_close().0, Some(1009));
    let mut shell = RawWs::open(server.addr, &format!("/shell?token={mallory}"));
    for frame in [
        "{".to_string(),
        r#"{"type": "input", "data": 5}"#.into(),
        r#"{"type": "resize", "cols": -1, "rows": 1e309}"#.into(),
        json!({"type": "init", "projectPath": "/nonexistent/dir"}).to_string(),
        json!({"type": "init", "projectPath": project.path(), "sessionId": "../../etc", "provider": "claude"}).to_string(),
    ] {
        shell.text(&frame);
        assert_eq!(shell.recv_json()["type"], "error", "{frame}");
    }
    shell.send(1, true, b"{\"type\":\"\xff\"}");
    assert_eq!(shell.recv_close().0, Some(1007));
    let mut plugin = RawWs::open(server.addr, &format!("/plugin-ws/..%2Fetc?token={mallory}"));
    assert_eq!(plugin.recv_close().0, Some(4400));

    // Bad tokens and foreign origins are refused before any upgrade.
    let mut forged = mallory.clone();
    let last = forged.pop().unwrap();
    forged.push(if last == 'A' { 'B' } else { 'A' });
    let out = Command::new(agentgate_bin())
        .args(["token", "--user", "eve", "--ttl-secs", "1", "--data-dir"])
        .arg(server.data_dir())
        .output()
        .unwrap();
    let expiring = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let revoked = server.token("trent");
    server.revoke("trent");
    // Refused upgrades end the connection at once (no keep-alive wait).
    let upgrade_then_close: Vec<(&str, &str)> = UPGRADE
        .iter()
        .map(|&(k, v)| {
            if k == "Connection" {
                (k, "close")
            } else {
                (k, v)
            }
        })
        .collect();
    for token in [forged.as_str(), "garbage", "", revoked.as_str()] {
        for path in ["/ws", "/shell"] {
            let (status, _) = raw(
                server.addr,
                "GET",
                &format!("{path}?token={token}"),
                &upgrade_then_close,
            );
            assert_eq!(status, 401, "{path} {token:.20}");
        }
    }
    let evil = with(&upgrade_then_close, &[("Origin", "http://evil.example")]);
    assert_eq!(
        raw(server.addr, "GET", &format!("/ws?token={mallory}"), &evil).0,
        403
    );
    let deadline = Instant::now() + WAIT;
    while raw(
        server.addr,
        "GET",
        &format!("/ws?token={expiring}"),
        &upgrade_then_close,
    )
    .0 != 401
    {
        assert!(Instant::now() < deadline, "an expired token kept working");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Bob's run was untouched: he answers his prompt, and it streams to the end.
    bobs.send_json(
        json!({"type": "chat.permission-response", "requestId": asked["requestId"], "allow": true}),
    )
    .await;
    let events = crate::chat::until_complete(&mut bobs, &bobs_session).await;
    let done = events.last().unwrap();
    assert_eq!(
        (done["success"].as_bool(), done["aborted"].as_bool()),
        (Some(true), Some(false)),
        "{done}"
    );
    let seqs: Vec<u64> = before
        .iter()
        .chain(std::iter::once(&asked))
        .chain(&events)
        .filter_map(|e| e["seq"].as_u64())
        .collect();
    let first = seqs[0];
    assert_eq!(seqs, (first..first + seqs.len() as u64).collect::<Vec<_>>());
    assert_eq!(crate::chat::of_kind(&events, "stream_delta").len(), 300);
    let (status, body) = server.get("/health", None).await;
    assert_eq!((status, body["status"].as_str()), (200, Some("ok")));
    let logs = server.logs();
    assert!(
        !logs.contains("panicked") && !logs.contains("restarted"),
        "{logs}"
    );
}
