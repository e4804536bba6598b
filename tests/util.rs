//! Shared helpers for the integration tests: a real `agentgate serve`
//! process on an ephemeral port with its own data dir, tokens from the real
//! `agentgate token` command, a WebSocket client (awc) and REST helpers.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix_codec::Framed;
use awc::error::WsProtocolError as ProtocolError;
use awc::ws::{CloseCode, Codec, Frame, Message};
use awc::BoxedSocket;
use futures_util::{SinkExt, StreamExt};
use serde_json::Value;

/// Upper bound for any single wait in a test (an event that does not arrive fails the test).
/// Generous: it only bounds failures, and real CLIs start slowly while the
/// whole suite shares 2 cores.
pub const WAIT: Duration = Duration::from_secs(60);

pub fn agentgate_bin() -> &'static str {
    env!("CARGO_BIN_EXE_agentgate")
}

/// The binary of example `name` (a test program such as `fake_claude` or
/// `echo_plugin`). `cargo test --test tests` builds the gateway binary but
/// not examples, so this builds it once per test run and name (a no-op when
/// it is fresh; cargo releases its lock while tests run).
pub fn example_bin(name: &'static str) -> &'static Path {
    static BINS: Mutex<Vec<(&str, &'static Path)>> = Mutex::new(Vec::new());
    // A test that panicked while building poisons nothing worth keeping.
    let mut bins = BINS.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, bin)) = bins.iter().find(|(n, _)| *n == name) {
        return bin;
    }
    let profile_dir = Path::new(agentgate_bin()).parent().expect("target dir");
    let mut cmd = Command::new(env!("CARGO"));
    cmd.args(["build", "-q", "--example", name, "--manifest-path"])
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml"))
        .stdin(Stdio::null());
    if profile_dir.ends_with("release") {
        cmd.arg("--release");
    }
    let status = cmd
        .status()
        .unwrap_or_else(|e| panic!("run cargo build --example {name}: {e}"));
    assert!(status.success(), "building the {name} example failed");
    let bin = profile_dir.join("examples").join(name);
    assert!(bin.exists(), "{} missing after the build", bin.display());
    let bin: &'static Path = Box::leak(bin.into_boxed_path());
    bins.push((name, bin));
    bin
}

/// A running gateway. Killed when dropped.
pub struct TestServer {
    child: Child,
    pub addr: SocketAddr,
    data: tempfile::TempDir,
    logs: Arc<Mutex<String>>,
    /// Set for a server started with `--tls-cert`: clients speak https/wss and trust this.
    tls: Option<Arc<rustls::ClientConfig>>,
    /// Stdout after the `listening on` line.
    stdout: Arc<Mutex<String>>,
    /// `--database-url` given to the server and to its `agentgate token` runs.
    database_url: Option<String>,
}

impl TestServer {
    pub fn start() -> TestServer {
        TestServer::start_with(|_| {})
    }

    /// Starts `agentgate serve --listen 127.0.0.1:0 --data-dir <temp>`; `f`
    /// may add flags or env before the spawn.
    pub fn start_with(f: impl FnOnce(&mut Command)) -> TestServer {
        TestServer::start_in(tempfile::tempdir().expect("temp dir"), f)
    }

    /// Starts a server with `--tls-cert/--tls-key` of a leaf that `ca` signed;
    /// the REST and WebSocket helpers then speak https:// and wss:// trusting `ca`.
    pub fn start_tls(
        ca: &crate::support::tls::TestCa,
        leaf: &crate::support::tls::TestLeaf,
        f: impl FnOnce(&mut Command),
    ) -> TestServer {
        let (cert, key) = (leaf.cert_path.clone(), leaf.key_path.clone());
        let mut server = TestServer::start_with(move |cmd| {
            cmd.arg("--tls-cert").arg(cert).arg("--tls-key").arg(key);
            f(cmd)
        });
        server.tls = Some(ca.client_config());
        server
    }

    /// Same, with a data dir prepared by the caller (e.g. plugins written into it,
    /// or a restart on the data dir of a previous server).
    pub fn start_in(data: tempfile::TempDir, f: impl FnOnce(&mut Command)) -> TestServer {
        TestServer::start_on(data, None, f)
    }

    /// Same, on the database `database_url` (e.g. a PostgreSQL test
    /// database) instead of the data dir's SQLite file; `token` uses it too.
    pub fn start_on(
        data: tempfile::TempDir,
        database_url: Option<&str>,
        f: impl FnOnce(&mut Command),
    ) -> TestServer {
        let mut cmd = Command::new(agentgate_bin());
        if let Some(url) = database_url {
            cmd.arg("--database-url").arg(url);
        }
        cmd.arg("serve")
            .arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--data-dir")
            .arg(data.path())
            .env_remove("AGENTGATE_JWT_SECRET")
            .env_remove("AGENTGATE_PLATFORM")
            .env(
                "RUST_LOG",
                std::env::var("TEST_RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        f(&mut cmd);
        let mut child = cmd.spawn().expect("spawn agentgate serve");
        let logs = Arc::new(Mutex::new(String::new()));
        let stderr = child.stderr.take().expect("stderr piped");
        let sink = logs.clone();
        let echo = std::env::var_os("TEST_ECHO_LOGS").is_some();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if echo {
                    eprintln!("[gateway] {line}");
                }
                if let Ok(mut l) = sink.lock() {
                    l.push_str(&line);
                    l.push('\n');
                }
            }
        });
        let stdout = child.stdout.take().expect("stdout piped");
        let (tx, rx) = std::sync::mpsc::channel();
        let rest = Arc::new(Mutex::new(String::new()));
        let rest_sink = rest.clone();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(stdout);
            let mut line = String::new();
            let _ = reader.read_line(&mut line);
            let _ = tx.send(line);
            // Keep draining so the gateway never blocks on a full stdout pipe.
            for line in reader.lines().map_while(Result::ok) {
                if let Ok(mut r) = rest_sink.lock() {
                    r.push_str(&line);
                    r.push('\n');
                }
            }
        });
        let line = rx
            .recv_timeout(WAIT)
            .expect("gateway printed no `listening on` line in time");
        let trimmed = line.trim();
        let addr = trimmed
            .strip_prefix("listening on http://")
            .or_else(|| trimmed.strip_prefix("listening on https://"))
            .unwrap_or_else(|| panic!("unexpected first stdout line: {line:?}"))
            .parse()
            .expect("listen address");
        TestServer {
            child,
            addr,
            data,
            logs,
            tls: None,
            stdout: rest,
            database_url: database_url.map(str::to_string),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn data_dir(&self) -> &Path {
        self.data.path()
    }

    /// Stops the server with SIGKILL and hands back its data dir (for restart tests).
    pub fn kill_keep_data(mut self) -> tempfile::TempDir {
        let _ = self.child.kill();
        let _ = self.child.wait();
        std::mem::replace(&mut self.data, tempfile::tempdir().expect("temp dir"))
    }

    /// Waits (bounded) for the server to exit.
    pub fn wait_exit(&mut self) -> std::process::ExitStatus {
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(std::time::Instant::now() < deadline, "gateway did not exit");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// What the gateway printed on stdout after its `listening on` line.
    pub fn stdout(&self) -> String {
        self.stdout.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Everything the gateway logged so far.
    pub fn logs(&self) -> String {
        self.logs.lock().map(|l| l.clone()).unwrap_or_default()
    }

    /// A token from the real `agentgate token --user NAME`.
    pub fn token(&self, user: &str) -> String {
        let out = Command::new(agentgate_bin())
            .args(self.database_args())
            .arg("token")
            .arg("--user")
            .arg(user)
            .arg("--data-dir")
            .arg(self.data.path())
            .env_remove("AGENTGATE_JWT_SECRET")
            .output()
            .expect("run agentgate token");
        assert!(
            out.status.success(),
            "agentgate token failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout)
            .expect("utf8 token")
            .trim()
            .to_string()
    }

    /// `agentgate token --revoke --user NAME`: every earlier token of the user is revoked.
    pub fn revoke(&self, user: &str) {
        let out = Command::new(agentgate_bin())
            .args(self.database_args())
            .args(["token", "--revoke", "--user", user, "--data-dir"])
            .arg(self.data.path())
            .env_remove("AGENTGATE_JWT_SECRET")
            .output()
            .expect("run agentgate token --revoke");
        assert!(
            out.status.success(),
            "agentgate token --revoke failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn database_args(&self) -> Vec<String> {
        match &self.database_url {
            Some(url) => vec!["--database-url".into(), url.clone()],
            None => Vec::new(),
        }
    }

    pub fn url(&self, path: &str) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{}{}", self.addr, path)
    }

    pub fn ws_url(&self, path: &str) -> String {
        let scheme = if self.tls.is_some() { "wss" } else { "ws" };
        format!("{scheme}://{}{}", self.addr, path)
    }

    /// An HTTP client for this server (TLS trusting the test CA when served over TLS).
    pub fn client(&self) -> awc::Client {
        client_for(self.tls.clone())
    }

    /// Opens a WebSocket; panics if the upgrade fails.
    pub async fn ws(&self, path: &str) -> WsClient {
        self.try_ws(path)
            .await
            .unwrap_or_else(|e| panic!("upgrade of {path} failed: {e}"))
    }

    /// Opens a WebSocket; the error carries the HTTP status when refused.
    pub async fn try_ws(&self, path: &str) -> Result<WsClient, String> {
        connect_ws_with(&self.client(), &self.ws_url(path), None).await
    }

    /// `/ws` with a fresh token for `user`.
    pub async fn chat(&self, user: &str) -> WsClient {
        let token = self.token(user);
        self.ws(&format!("/ws?token={token}")).await
    }

    pub async fn get(&self, path: &str, token: Option<&str>) -> (u16, Value) {
        let mut req = self.client().get(self.url(path));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        read_json(req.send().await.expect("GET")).await
    }

    pub async fn post(&self, path: &str, token: Option<&str>, body: Value) -> (u16, Value) {
        let mut req = self.client().post(self.url(path));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        read_json(req.send_json(&body).await.expect("POST")).await
    }

    pub async fn put(&self, path: &str, token: Option<&str>, body: Value) -> (u16, Value) {
        let mut req = self.client().put(self.url(path));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        read_json(req.send_json(&body).await.expect("PUT")).await
    }

    /// Alice's token, a new project dir and a Claude session of hers in it.
    pub async fn alice_session(&self) -> (String, tempfile::TempDir, String) {
        let token = self.token("alice");
        let project = project_dir();
        let session = self.create_session(&token, "claude", project.path()).await;
        (token, project, session)
    }

    /// Creates a session over REST and returns its id.
    pub async fn create_session(&self, token: &str, provider: &str, project: &Path) -> String {
        let (status, body) = self
            .post(
                "/api/providers/sessions",
                Some(token),
                serde_json::json!({"provider": provider, "projectPath": project}),
            )
            .await;
        assert_eq!(status, 201, "create session: {body}");
        body["data"]["sessionId"]
            .as_str()
            .expect("sessionId")
            .to_string()
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        // A failing test shows what the gateway warned about (a 4008's
        // reason, say): CI keeps nothing else of it.
        if std::thread::panicking() {
            let logs = self.logs();
            let warned: Vec<&str> = logs
                .lines()
                .filter(|l| l.contains("WARN") || l.contains("ERROR"))
                .collect();
            let from = warned.len().saturating_sub(40);
            for line in &warned[from..] {
                eprintln!("[gateway {}] {line}", self.addr);
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn read_json(
    mut res: awc::ClientResponse<
        impl futures_util::Stream<Item = Result<actix_web::web::Bytes, awc::error::PayloadError>>
            + Unpin,
    >,
) -> (u16, Value) {
    let status = res.status().as_u16();
    let body = res.body().limit(16 * 1024 * 1024).await.expect("body");
    let value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    (status, value)
}

/// An awc client; with `tls`, https:// and wss:// trust only that configuration's roots.
pub fn client_for(tls: Option<Arc<rustls::ClientConfig>>) -> awc::Client {
    // Without a test CA: no roots at all, so no https:// peer is trusted.
    let tls = tls.unwrap_or_else(|| {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("TLS versions")
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Arc::new(config)
    });
    // HTTP/1.1 only through the config's ALPN: awc's max_http_version would
    // replace the TLS configuration with its default one.
    awc::Client::builder()
        .timeout(Duration::from_secs(10))
        .connector(awc::Connector::new().rustls_0_23(tls))
        .finish()
}

pub async fn connect_ws(url: &str, bearer: Option<&str>) -> Result<WsClient, String> {
    connect_ws_with(&client_for(None), url, bearer).await
}

pub async fn connect_ws_with(
    client: &awc::Client,
    url: &str,
    bearer: Option<&str>,
) -> Result<WsClient, String> {
    let mut req = client.ws(url).max_frame_size(64 * 1024 * 1024);
    if let Some(t) = bearer {
        req = req.bearer_auth(t);
    }
    match req.connect().await {
        Ok((_res, framed)) => Ok(WsClient {
            framed,
            auto_pong: true,
        }),
        Err(awc::error::WsClientError::InvalidResponseStatus(status)) => {
            Err(format!("status {}", status.as_u16()))
        }
        Err(e) => Err(e.to_string()),
    }
}

/// What `recv` can yield.
#[derive(Debug)]
pub enum WsEvent {
    Text(String),
    Binary(Vec<u8>),
    Close(Option<u16>, String),
    Ping,
    /// The connection ended without a close frame.
    Ended,
}

pub struct WsClient {
    framed: Framed<BoxedSocket, Codec>,
    /// Answer pings automatically (off for the heartbeat test).
    pub auto_pong: bool,
}

impl WsClient {
    pub async fn send_text(&mut self, text: impl Into<String>) {
        let text: String = text.into();
        self.framed
            .send(Message::Text(text.into()))
            .await
            .expect("send text");
    }

    pub async fn send_json(&mut self, value: Value) {
        self.send_text(value.to_string()).await
    }

    pub async fn send_binary(&mut self, data: Vec<u8>) {
        self.try_send_binary(data).await.expect("send binary");
    }

    /// A binary frame to a server that may drop the connection meanwhile.
    pub async fn try_send_binary(&mut self, data: Vec<u8>) -> Result<(), ProtocolError> {
        self.framed.send(Message::Binary(data.into())).await
    }

    pub async fn close(&mut self, code: u16) {
        let _ = self
            .framed
            .send(Message::Close(Some(awc::ws::CloseReason {
                code: CloseCode::from(code),
                description: None,
            })))
            .await;
    }

    /// The next frame (pings answered and skipped when `auto_pong`), or panics after `WAIT`.
    pub async fn recv(&mut self) -> WsEvent {
        self.recv_within(WAIT)
            .await
            .expect("no WebSocket frame within the wait limit")
    }

    /// The next frame within `limit`, or `None`.
    pub async fn recv_within(&mut self, limit: Duration) -> Option<WsEvent> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let frame = match tokio::time::timeout_at(deadline, self.framed.next()).await {
                Err(_) => return None,
                Ok(None) => return Some(WsEvent::Ended),
                Ok(Some(Err(e))) => {
                    return Some(WsEvent::Close(None, format!("protocol error: {e}")))
                }
                Ok(Some(Ok(frame))) => frame,
            };
            match frame {
                Frame::Text(b) => {
                    return Some(WsEvent::Text(
                        String::from_utf8(b.to_vec()).expect("text frame is UTF-8"),
                    ))
                }
                Frame::Binary(b) => return Some(WsEvent::Binary(b.to_vec())),
                Frame::Close(reason) => {
                    return Some(WsEvent::Close(
                        reason.as_ref().map(|r| u16::from(r.code)),
                        reason.and_then(|r| r.description).unwrap_or_default(),
                    ))
                }
                Frame::Ping(payload) => {
                    if self.auto_pong {
                        let _ = self.framed.send(Message::Pong(payload)).await;
                    } else {
                        return Some(WsEvent::Ping);
                    }
                }
                Frame::Pong(_) | Frame::Continuation(_) => {}
            }
        }
    }

    /// The next text frame parsed as JSON; panics on anything else.
    pub async fn recv_json(&mut self) -> Value {
        match self.recv().await {
            WsEvent::Text(t) => {
                serde_json::from_str(&t).unwrap_or_else(|e| panic!("frame is not JSON ({e}): {t}"))
            }
            other => panic!("expected a text frame, got {other:?}"),
        }
    }

    /// What reached this `/ws` socket before now, proven without a clock: a
    /// `chat.subscribe` of `session` (idle, or asking replay after the
    /// largest `lastSeq`) goes through the RunRegistry, which writes its
    /// answer to this socket after everything it had sent it before.
    /// Returns the frames that came first, and the answer.
    pub async fn frames_before_probe(&mut self, session: &str) -> (Vec<Value>, Value) {
        self.send_json(serde_json::json!({"type": "chat.subscribe",
            "sessions": [{"sessionId": session, "lastSeq": u64::MAX}]}))
            .await;
        let mut before = Vec::new();
        loop {
            let v = self.recv_json().await;
            if v["kind"] == "chat_subscribed" && v["sessionId"] == session {
                return (before, v);
            }
            before.push(v);
        }
    }

    /// Reads JSON frames until one has `kind == kind`; returns it and everything before it.
    pub async fn recv_until_kind(&mut self, kind: &str) -> (Value, Vec<Value>) {
        let mut seen = Vec::new();
        loop {
            let v = self.recv_json().await;
            if v["kind"] == kind {
                return (v, seen);
            }
            seen.push(v);
        }
    }

    /// Waits for the close frame (or the end of the connection) and returns its code.
    pub async fn recv_close(&mut self) -> Option<u16> {
        loop {
            match self.recv().await {
                WsEvent::Close(code, _) => return code,
                WsEvent::Ended => return None,
                _ => {}
            }
        }
    }
}

/// A project directory for a test.
pub fn project_dir() -> tempfile::TempDir {
    tempfile::tempdir().expect("temp project dir")
}

/// Path of a binary in the same target dir as `agentgate`.
pub fn sibling_bin(name: &str) -> PathBuf {
    Path::new(agentgate_bin()).with_file_name(name)
}

/// Whether a process exists.
pub fn pid_alive(pid: i32) -> bool {
    // kill(pid, 0) checks existence; a zombie still "exists", so also check /proc state.
    if unsafe { libc::kill(pid, 0) } != 0 {
        return false;
    }
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z'),
        Err(_) => false,
    }
}

/// Polls `cond` every 20 ms until it holds or `WAIT` passes (for state outside any event stream, e.g. a pid).
pub async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// VmRSS of a process in KiB.
pub fn rss_kib(pid: u32) -> u64 {
    status_kib(pid, "VmRSS:")
}

/// The most resident memory a process ever had (KiB).
pub fn peak_rss_kib(pid: u32) -> u64 {
    status_kib(pid, "VmHWM:")
}

fn status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// Pids of the direct children of a process.
pub fn children_of(pid: u32) -> Vec<i32> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in entries.flatten() {
        let Ok(p) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if let Ok(stat) = std::fs::read_to_string(format!("/proc/{p}/stat")) {
            let fields: Vec<&str> = stat
                .rsplit(')')
                .next()
                .unwrap_or("")
                .split_whitespace()
                .collect();
            if fields.get(1).and_then(|pp| pp.parse::<u32>().ok()) == Some(pid) {
                out.push(p);
            }
        }
    }
    out
}
