//! Remote sessions with the REAL Claude Code clients, driven in a PTY and
//! read off a `vt100` screen as a user would:
//!
//! - 2.1.100 (`node cli.js --remote "<prompt>"`, the WebSocket generation,
//!   fetched with `npm pack` into `.cache/`);
//! - 2.1.330 (`claude --cloud "<prompt>"`, the SSE generation, the pinned
//!   native binary the other tests use).
//!
//! The client's base URL is fixed to `https://api.anthropic.com`, so it is
//! pointed here the only way it allows: `HTTPS_PROXY` names a loopback
//! CONNECT proxy (tests/support/proxy.rs) that tunnels only
//! `api.anthropic.com:443` to the gateway, which serves TLS itself
//! (`--tls-cert`) with a leaf for that name signed by a CA made by the test
//! (`NODE_EXTRA_CA_CERTS`). Its token is an agentgate JWT
//! (`CLAUDE_CODE_OAUTH_TOKEN`). The agent behind the gateway is the real
//! Claude CLI against the Anthropic stand-in, so tools really run in the
//! project.

use std::ffi::OsString;
use std::time::Duration;

use serde_json::json;

use crate::support::anthropic::{AnthropicStub, Reply};
use crate::support::clis::{claude_bin, claude_js};
use crate::support::proxy::Proxy;
use crate::support::terminal::{Spec, Terminal};
use crate::support::tls::TestCa;
use crate::util::{project_dir, TestServer, WsClient};

/// Bound on one thing showing up on screen (two real CLIs on 2 shared cores).
const SCREEN_WAIT: Duration = Duration::from_secs(90);
/// The organization the client sends as `x-organization-uuid`.
const ORG: &str = "00000000-0000-4000-8000-0000000000aa";

struct Rig {
    stub: AnthropicStub,
    server: TestServer,
    proxy: Proxy,
    ca: TestCa,
    token: String,
    /// Where the agent runs (the user's project, offered as the environment).
    project: tempfile::TempDir,
    /// The client's HOME and working directory (another "machine").
    client_home: tempfile::TempDir,
    client_cwd: tempfile::TempDir,
    _agent_home: tempfile::TempDir,
}

fn rig() -> Rig {
    let claude = claude_bin();
    let stub = AnthropicStub::start();
    let agent_home = tempfile::tempdir().expect("agent home");
    let agent_env = stub.claude_env(agent_home.path());
    let ca = TestCa::new();
    // The client asks for api.anthropic.com; the test's own REST calls dial 127.0.0.1.
    let leaf = ca.leaf(&["api.anthropic.com", "127.0.0.1"]);
    let server = TestServer::start_tls(&ca, &leaf, |cmd| {
        // The client's requests say `Host: api.anthropic.com`.
        cmd.arg("--allowed-hosts").arg("api.anthropic.com");
        cmd.arg("--claude-bin").arg(&claude);
        for (k, v) in agent_env {
            cmd.env(k, v);
        }
    });
    let proxy = Proxy::connect(server.addr, "api.anthropic.com:443");
    let token = server.token("alice");
    let client_home = tempfile::tempdir().expect("client home");
    let client_cwd = tempfile::tempdir().expect("client cwd");
    let config = json!({
        "hasCompletedOnboarding": true,
        "oauthAccount": {
            "accountUuid": "00000000-0000-4000-8000-0000000000bb",
            "emailAddress": "alice@example.com",
            "organizationUuid": ORG,
            "organizationName": "agentgate test",
        },
        // Without it `--remote` only prints "Created remote session" and exits.
        "cachedGrowthBookFeatures": {"tengu_remote_backend": true},
        "projects": {client_cwd.path().to_str().unwrap(): {"hasTrustDialogAccepted": true}},
    });
    std::fs::write(client_home.path().join(".claude.json"), config.to_string())
        .expect("write ~/.claude.json");
    Rig {
        stub,
        server,
        proxy,
        ca,
        token,
        project: project_dir(),
        client_home,
        client_cwd,
        _agent_home: agent_home,
    }
}

impl Rig {
    /// Makes the project one of alice's (so it is an environment) and
    /// returns the `/ws` client the test watches the gateway with.
    async fn with_project(&self) -> WsClient {
        self.server
            .create_session(&self.token, "claude", self.project.path())
            .await;
        self.server.ws(&format!("/ws?token={}", self.token)).await
    }

    fn client_env(&self) -> Vec<(OsString, OsString)> {
        let path = std::env::var_os("PATH").unwrap_or_default();
        let pairs: [(&str, OsString); 11] = [
            ("PATH", path),
            ("HOME", self.client_home.path().into()),
            ("HTTPS_PROXY", self.proxy.url().into()),
            ("https_proxy", self.proxy.url().into()),
            ("NO_PROXY", "127.0.0.1,localhost".into()),
            ("NODE_EXTRA_CA_CERTS", self.ca.pem_path.clone().into()),
            ("CLAUDE_CODE_OAUTH_TOKEN", self.token.clone().into()),
            ("DISABLE_AUTOUPDATER", "1".into()),
            ("TERM", "xterm-256color".into()),
            ("LANG", "C.UTF-8".into()),
            ("TZ", "UTC".into()),
        ];
        pairs
            .into_iter()
            .map(|(k, v)| (OsString::from(k), v))
            .collect()
    }

    /// Claude Code 2.1.100 `--remote "<prompt>"` in a terminal.
    fn remote_client(&self, prompt: &str) -> Terminal {
        let node = which("node");
        Terminal::spawn(Spec {
            program: node,
            args: vec![
                claude_js().into(),
                "--remote".into(),
                prompt.into(),
                // Its own account of each dial and close, for a failure's message.
                "--debug-file".into(),
                self.client_debug_file().into(),
            ],
            env: self.client_env(),
            cwd: self.client_cwd.path().to_path_buf(),
        })
    }

    fn client_debug_file(&self) -> std::path::PathBuf {
        self.client_home.path().join("debug.txt")
    }

    /// What a failed dial count needs to be understood: the gateway's
    /// dials and closes, and the client's own lines on its socket.
    fn dial_story(&self) -> String {
        let logs = self.server.logs();
        let gateway = logs
            .lines()
            .filter(|l| {
                l.contains("/subscribe")
                    || l.contains("RemoteSocket")
                    || l.contains("dropping socket")
            })
            .collect::<Vec<_>>()
            .join("\n");
        let client = std::fs::read_to_string(self.client_debug_file()).unwrap_or_default();
        let client = client
            .lines()
            .filter(|l| {
                l.contains("[SessionsWebSocket]")
                    || (l.contains("[useRemoteSession]") && !l.contains("type=stream_event"))
            })
            .collect::<Vec<_>>()
            .join("\n");
        format!("gateway:\n{gateway}\nclient:\n{client}")
    }

    /// Claude Code 2.1.330 `--cloud "<prompt>"` in a terminal.
    fn cloud_client(&self, prompt: &str) -> Terminal {
        Terminal::spawn(Spec {
            program: claude_bin(),
            args: vec!["--cloud".into(), prompt.into()],
            env: self.client_env(),
            cwd: self.client_cwd.path().to_path_buf(),
        })
    }
}

fn which(program: &str) -> std::path::PathBuf {
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|dir| dir.join(program))
                .find(|p| p.is_file())
        })
        .unwrap_or_else(|| panic!("`{program}` is not on PATH (Node.js >= 18 is needed)"))
}

fn count(screen: &str, text: &str) -> usize {
    screen.matches(text).count()
}

/// Subscribes `ws` to the user's running run (the one the client started)
/// and waits for its first streamed text.
async fn await_first_delta(ws: &mut WsClient, server: &TestServer, token: &str) {
    // The client posts the turn on its own time: wait (bounded) for its run.
    let deadline = std::time::Instant::now() + SCREEN_WAIT;
    let session = loop {
        let (status, body) = server
            .get("/api/providers/sessions/running", Some(token))
            .await;
        assert_eq!(status, 200, "{body}");
        if let Some(id) = body["data"]["sessions"][0]["sessionId"].as_str() {
            break id.to_string();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no run started: {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    ws.send_json(
        json!({"type":"chat.subscribe","sessions":[{"sessionId": session, "lastSeq": 0}]}),
    )
    .await;
    ws.recv_until_kind("stream_delta").await;
}

/// Types a turn into the input box once the previous turn has ended.
async fn ask(term: &mut Terminal, text: &str) {
    term.wait_for("the input box", SCREEN_WAIT, |s| {
        !s.contains("esc to interrupt")
    })
    .await;
    term.type_text(text).await;
    term.enter().await;
}

/// The option of the dialog the cursor (`❯`) is on.
fn selected(screen: &str) -> Option<String> {
    screen.lines().find_map(|line| {
        let rest = line.trim_start().strip_prefix("❯ ")?;
        let (number, label) = rest.split_once(". ")?;
        number
            .chars()
            .all(|c| c.is_ascii_digit())
            .then(|| label.trim().to_string())
    })
}

/// Moves the dialog's cursor down to the option labelled `label`.
async fn select_option(term: &mut Terminal, label: &str) {
    for _ in 0..5 {
        let screen = term.screen();
        if selected(&screen).as_deref() == Some(label) {
            return;
        }
        term.type_text("\x1b[B").await; // Down
        let before = selected(&screen);
        term.wait_for("the cursor to move", SCREEN_WAIT, |s| selected(s) != before)
            .await;
    }
    panic!("no option {label:?} in the dialog:\n{}", term.screen());
}

/// The WebSocket generation end to end: the first answer renders, a second
/// turn goes out by POST and renders, a permission dialog appears and "Yes"
/// lets the tool really run in the project while "No" keeps it from
/// running, a connection dropped mid-turn is survived with the answer shown
/// once, and a revoked token stops the client for good (4003).
#[actix_rt::test]
async fn claude_code_2_1_100_remote_follows_and_steers_a_session() {
    let rig = rig();
    let mut ws = rig.with_project().await;
    rig.stub.push(Reply::text("FIRST-ANSWER-4711"));
    let mut term = rig.remote_client("say the first thing");
    term.wait_for("the first answer", SCREEN_WAIT, |s| {
        s.contains("FIRST-ANSWER-4711")
    })
    .await;
    let first = rig.stub.message_requests();
    assert_eq!(
        first.last().and_then(|r| r.last_user_text()).as_deref(),
        Some("say the first thing"),
        "the agent got the prompt"
    );

    // A second turn: typed, POSTed, answered, rendered.
    rig.stub.push(Reply::text("SECOND-ANSWER-0815"));
    ask(&mut term, "and the second").await;
    let screen = term
        .wait_for("the second answer", SCREEN_WAIT, |s| {
            s.contains("SECOND-ANSWER-0815")
        })
        .await;
    assert_eq!(count(&screen, "FIRST-ANSWER-4711"), 1, "{screen}");

    // A permission dialog; "Yes" runs the tool in the project.
    rig.stub.push(Reply::bash("echo made > made.txt"));
    rig.stub.push(Reply::text("MADE-IT"));
    ask(&mut term, "make the file").await;
    term.wait_for("the permission dialog", SCREEN_WAIT, |s| {
        s.contains("Do you want to proceed?") && s.contains("echo made > made.txt")
    })
    .await;
    term.enter().await;
    term.wait_for("the answer after the tool", SCREEN_WAIT, |s| {
        s.contains("MADE-IT")
    })
    .await;
    let made = std::fs::read_to_string(rig.project.path().join("made.txt"))
        .expect("the tool ran in the project");
    assert_eq!(made.trim(), "made");

    // "No": the tool never runs.
    rig.stub.push(Reply::bash("echo refused > refused.txt"));
    rig.stub.push(Reply::text("NOT-MADE"));
    ask(&mut term, "make another file").await;
    term.wait_for("the second permission dialog", SCREEN_WAIT, |s| {
        s.contains("Do you want to proceed?") && s.contains("refused.txt")
    })
    .await;
    select_option(&mut term, "No").await;
    term.enter().await;
    term.wait_for("the answer after the refusal", SCREEN_WAIT, |s| {
        s.contains("NOT-MADE")
    })
    .await;
    assert!(!rig.project.path().join("refused.txt").exists());

    // The connection drops mid-turn: the client reconnects by itself and
    // the answer is shown once.
    let chunks: Vec<String> = (0..30).map(|i| format!("RESUMED-{i} ")).collect();
    rig.stub
        .push(Reply::chunks(chunks.clone()).with_delay(Duration::from_millis(150)));
    let subscribes = |logs: &str| logs.matches("/subscribe").count();
    let dialled = subscribes(&rig.server.logs());
    ask(&mut term, "stream slowly").await;
    // The model is streaming its ~4.5 s answer: cut every connection now.
    await_first_delta(&mut ws, &rig.server, &rig.token).await;
    assert!(rig.proxy.cut() >= 1);
    let screen = term
        .wait_for("the answer after the reconnect", SCREEN_WAIT, |s| {
            s.contains("RESUMED-29")
        })
        .await;
    assert_eq!(count(&screen, "RESUMED-0 "), 1, "shown once:\n{screen}");
    assert_eq!(
        subscribes(&rig.server.logs()),
        dialled + 1,
        "the client dialled the socket again, once\n{}",
        rig.dial_story()
    );
    assert!(term.running());

    // A revoked token: the socket is closed with 4003 and the client, taking
    // that as final, never dials again (it would after 2 s otherwise).
    let dialled = subscribes(&rig.server.logs());
    rig.server.revoke("alice");
    let deadline = std::time::Instant::now() + SCREEN_WAIT;
    while !rig.server.logs().contains("closing socket with 4003") {
        assert!(std::time::Instant::now() < deadline, "no 4003 close");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(
        subscribes(&rig.server.logs()),
        dialled,
        "it dialled again\n{}",
        rig.dial_story()
    );
    term.kill().await;
}

/// The SSE generation: `claude --cloud` creates the session, its answer
/// renders, and a second turn works.
#[actix_rt::test]
async fn claude_code_2_1_330_cloud_answers_and_takes_a_second_turn() {
    let rig = rig();
    let _ws = rig.with_project().await;
    rig.stub.push(Reply::text("CLOUD-ANSWER-1234"));
    let mut term = rig.cloud_client("hello from the cloud client");
    term.wait_for("the first answer", SCREEN_WAIT, |s| {
        s.contains("CLOUD-ANSWER-1234")
    })
    .await;
    rig.stub.push(Reply::text("CLOUD-SECOND-5678"));
    term.type_text("and again").await;
    term.enter().await;
    let screen = term
        .wait_for("the second answer", SCREEN_WAIT, |s| {
            s.contains("CLOUD-SECOND-5678")
        })
        .await;
    assert_eq!(count(&screen, "CLOUD-ANSWER-1234"), 1, "{screen}");
    term.kill().await;
}
