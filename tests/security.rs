//! Security and bad input (issue 12): TLS, Origin/Host checks, hardened auth,
//! limits, hostile frames. Every test runs a real `agentgate serve`.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::support::tls::TestCa;
use crate::util::{agentgate_bin, client_for, connect_ws_with, TestServer, WAIT};

/// Runs `agentgate serve` with `args` on a fresh data dir, expecting it to
/// refuse to start; returns its stderr.
fn serve_refuses(args: &[&std::ffi::OsStr]) -> String {
    let data = tempfile::tempdir().unwrap();
    let mut child = Command::new(agentgate_bin())
        .arg("serve")
        .arg("--listen")
        .arg("127.0.0.1:0")
        .arg("--data-dir")
        .arg(data.path())
        .args(args)
        .env_remove("AGENTGATE_JWT_SECRET")
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
