//! Foundation: auth on every route, REST envelopes, bad frames on `/ws`,
//! heartbeat, persistence across restarts, clean exit on SIGTERM.

use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::json;

use crate::util::{TestServer, WsEvent};

fn secret_of(server: &TestServer) -> Vec<u8> {
    std::fs::read(server.data_dir().join("jwt-secret")).expect("jwt-secret file")
}

fn sign(secret: &[u8], claims: serde_json::Value) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret),
    )
    .unwrap()
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Every refused token form gets 401 on every upgrade path; both accepted forms upgrade.
#[actix_rt::test]
async fn upgrades_refuse_bad_tokens_and_accept_query_and_bearer() {
    let server = TestServer::start();
    let good = server.token("alice");
    let secret = secret_of(&server);
    let expired = sign(
        &secret,
        json!({"sub":"alice","uid":1,"iat":now()-100,"exp":now()-10}),
    );
    let wrong_key = sign(
        b"some-other-secret-some-other-secret",
        json!({"sub":"alice","uid":1,"iat":now(),"exp":now()+100}),
    );
    use base64::Engine;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let alg_none = format!(
        "{}.{}.",
        b64.encode(br#"{"alg":"none","typ":"JWT"}"#),
        b64.encode(format!(
            r#"{{"sub":"alice","uid":1,"iat":{},"exp":{}}}"#,
            now(),
            now() + 100
        ))
    );
    for path in ["/ws", "/shell", "/plugin-ws/echo"] {
        for (what, token) in [
            ("missing", None),
            ("malformed", Some("abc.def")),
            ("expired", Some(expired.as_str())),
            ("wrong key", Some(wrong_key.as_str())),
            ("alg none", Some(alg_none.as_str())),
        ] {
            let url = match token {
                Some(t) => format!("{path}?token={t}"),
                None => path.to_string(),
            };
            let err = server
                .try_ws(&url)
                .await
                .err()
                .unwrap_or_else(|| panic!("{what} token on {path} was accepted"));
            assert_eq!(err, "status 401", "{what} token on {path}");
        }
    }
    // Query token and bearer header both work on /ws.
    let mut ws = server.ws(&format!("/ws?token={good}")).await;
    ws.send_text("not json").await;
    assert_eq!(ws.recv_json().await["code"], "INVALID_PAYLOAD");
    let mut ws = crate::util::connect_ws(&server.ws_url("/ws"), Some(&good))
        .await
        .expect("bearer upgrade");
    ws.send_text("[]").await;
    assert_eq!(ws.recv_json().await["code"], "INVALID_PAYLOAD");
    // The query token never shows up in the logs.
    assert!(!server.logs().contains(&good), "token leaked into logs");
    assert!(server.logs().contains("token=REDACTED"));
}

/// Unknown paths are not upgraded.
#[actix_rt::test]
async fn unknown_path_is_404() {
    let server = TestServer::start();
    let token = server.token("alice");
    assert_eq!(
        server
            .try_ws(&format!("/nope?token={token}"))
            .await
            .err()
            .as_deref(),
        Some("status 404")
    );
    let (status, body) = server.get("/api/nope", Some(&token)).await;
    assert_eq!(status, 404);
    assert_eq!(body["error"]["code"], "NOT_FOUND");
}

/// Register works once, login checks the password, and REST needs a token.
#[actix_rt::test]
async fn register_login_and_rest_auth() {
    let server = TestServer::start();
    let (status, health) = server.get("/health", None).await;
    assert_eq!((status, health), (200, json!({"status": "ok"})));

    let creds = json!({"username": "ann", "password": "s3cret"});
    let (_, status_body) = server.get("/api/auth/status", None).await;
    assert_eq!(status_body["needsSetup"], true);
    let (status, body) = server.post("/api/auth/register", None, creds.clone()).await;
    assert_eq!(status, 201, "{body}");
    // The reference's shape: token and user at the top level (also under data).
    let token = body["token"].as_str().unwrap().to_string();
    assert_eq!(body["user"]["username"], "ann");
    assert_eq!(body["data"]["token"], body["token"]);
    let (_, status_body) = server.get("/api/auth/status", None).await;
    assert_eq!(status_body["needsSetup"], false);
    let (status, me) = server.get("/api/auth/user", Some(&token)).await;
    assert_eq!(
        (status, me["user"]["username"].clone()),
        (200, json!("ann"))
    );
    let (status, me) = server.get("/api/auth/user", None).await;
    assert_eq!(status, 401);
    assert!(me["error"].is_string(), "{me}");
    let (status, body) = server
        .post(
            "/api/auth/register",
            None,
            json!({"username":"bob","password":"x"}),
        )
        .await;
    assert_eq!((status, body["success"].clone()), (403, json!(false)));

    let (status, body) = server.post("/api/auth/login", None, creds).await;
    assert_eq!(status, 200, "{body}");
    assert!(body["token"].is_string());
    assert_eq!(body["user"]["username"], "ann");
    let (status, refreshed) = server
        .post("/api/auth/refresh", Some(&token), json!({}))
        .await;
    assert_eq!(status, 200);
    let (status, _) = server
        .get("/api/auth/user", Some(refreshed["token"].as_str().unwrap()))
        .await;
    assert_eq!(status, 200);
    let (status, body) = server
        .post(
            "/api/auth/login",
            None,
            json!({"username":"ann","password":"wrong"}),
        )
        .await;
    assert_eq!(status, 401);
    // A string the web UI shows as it is, with the code beside it.
    assert_eq!(body["error"], "Invalid username or password");
    assert_eq!(body["code"], "INVALID_CREDENTIALS");
    let (status, _) = server
        .post(
            "/api/auth/login",
            None,
            json!({"username":"nobody","password":"x"}),
        )
        .await;
    assert_eq!(status, 401);

    let (status, body) = server.get("/api/providers/sessions/running", None).await;
    assert_eq!(
        (status, body["error"]["code"].clone()),
        (401, json!("UNAUTHORIZED"))
    );
    let (status, body) = server
        .get("/api/providers/sessions/running", Some(&token))
        .await;
    assert_eq!(status, 200);
    assert_eq!(body, json!({"success": true, "data": {"sessions": []}}));
}

/// Session REST: creation errors, owner-only reads.
#[actix_rt::test]
async fn sessions_rest_codes_and_ownership() {
    let server = TestServer::start();
    let alice = server.token("alice");
    let bob = server.token("bob");
    let (status, body) = server
        .post(
            "/api/providers/sessions",
            Some(&alice),
            json!({"provider":"claude"}),
        )
        .await;
    assert_eq!(
        (status, body["error"]["code"].clone()),
        (400, json!("PROJECT_PATH_REQUIRED"))
    );
    let (status, body) = server
        .post(
            "/api/providers/sessions",
            Some(&alice),
            json!({"provider":"eliza","projectPath":"/tmp"}),
        )
        .await;
    assert_eq!(
        (status, body["error"]["code"].clone()),
        (400, json!("UNSUPPORTED_PROVIDER"))
    );
    let (status, body) = server
        .post(
            "/api/providers/sessions",
            Some(&alice),
            json!({"provider":"claude","projectPath":"/tmp","initialMessage":"Fix the tests"}),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let id = body["data"]["sessionId"].as_str().unwrap().to_string();
    assert!(uuid::Uuid::parse_str(&id).is_ok());
    assert_eq!(body["data"]["sessionName"], "Fix the tests");
    assert_eq!(body["data"]["provider"], "claude");

    let (status, body) = server
        .get(&format!("/api/providers/sessions/{id}"), Some(&alice))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["data"]["projectPath"], "/tmp");
    assert!(body["data"].get("providerSessionId").is_none());
    let (status, body) = server
        .get(&format!("/api/providers/sessions/{id}"), Some(&bob))
        .await;
    assert_eq!(
        (status, body["error"]["code"].clone()),
        (404, json!("SESSION_NOT_FOUND"))
    );
    let (status, _) = server
        .post(
            "/api/providers/sessions",
            Some(&alice),
            json!("not an object"),
        )
        .await;
    assert_eq!(status, 400);
}

/// Platform mode: no token; refused while no user exists, then the first user.
#[actix_rt::test]
async fn platform_mode_uses_the_first_user() {
    let server = TestServer::start_with(|cmd| {
        cmd.arg("--platform");
    });
    assert_eq!(
        server.try_ws("/ws").await.err().as_deref(),
        Some("status 401")
    );
    let _ = server.token("owner");
    let mut ws = server.ws("/ws").await;
    ws.send_json(json!({"type": "chat.dance"})).await;
    assert_eq!(ws.recv_json().await["code"], "UNKNOWN_MESSAGE_TYPE");
    let (status, _) = server
        .post(
            "/api/providers/sessions",
            None,
            json!({"provider":"claude","projectPath":"/tmp"}),
        )
        .await;
    assert_eq!(status, 201);
}

/// Bad frames get protocol errors and the socket stays open.
#[actix_rt::test]
async fn bad_frames_get_protocol_errors_and_socket_stays_open() {
    let server = TestServer::start();
    let bob = server.token("bob");
    let alice = server.token("alice");
    let project = crate::util::project_dir();
    let bobs = server.create_session(&bob, "claude", project.path()).await;
    let mut ws = server.ws(&format!("/ws?token={alice}")).await;
    let cases = [
        ("{", "INVALID_PAYLOAD"),
        ("42", "INVALID_PAYLOAD"),
        (r#"{"type":"chat.nope"}"#, "UNKNOWN_MESSAGE_TYPE"),
        (r#"{"content":"hi"}"#, "UNKNOWN_MESSAGE_TYPE"),
        (
            r#"{"type":"chat.send","content":"hi"}"#,
            "SESSION_ID_REQUIRED",
        ),
        (r#"{"type":"chat.abort"}"#, "SESSION_ID_REQUIRED"),
        (
            r#"{"type":"chat.send","sessionId":"00000000-0000-0000-0000-000000000000","content":"hi"}"#,
            "SESSION_NOT_FOUND",
        ),
    ];
    for (frame, code) in cases {
        ws.send_text(frame).await;
        let v = ws.recv_json().await;
        assert_eq!(v["kind"], "protocol_error", "{frame}: {v}");
        assert_eq!(v["code"], code, "{frame}: {v}");
        assert!(v["timestamp"].is_string());
    }
    // Another user's session is "not found" too (E3).
    ws.send_json(json!({"type":"chat.send","sessionId": bobs,"content":"hi"}))
        .await;
    let v = ws.recv_json().await;
    assert_eq!(
        (v["code"].clone(), v["sessionId"].clone()),
        (json!("SESSION_NOT_FOUND"), json!(bobs))
    );
    // Binary frames are not JSON text.
    ws.send_binary(vec![1, 2, 3]).await;
    assert_eq!(ws.recv_json().await["code"], "INVALID_PAYLOAD");
    // Still open: a valid frame is still answered.
    ws.send_json(json!({"type":"chat.subscribe","sessions":[]}))
        .await;
    ws.send_text("{").await;
    assert_eq!(ws.recv_json().await["code"], "INVALID_PAYLOAD");
}

/// A frame over the 8 MiB limit is refused (1009 or MESSAGE_TOO_LARGE), never buffered.
#[actix_rt::test]
async fn oversized_frame_is_refused() {
    let server = TestServer::start();
    let mut ws = server.chat("alice").await;
    ws.send_text("x".repeat(9 * 1024 * 1024)).await;
    match ws.recv().await {
        WsEvent::Close(code, _) => assert_eq!(code, Some(1009)),
        WsEvent::Text(t) => assert!(t.contains("MESSAGE_TOO_LARGE"), "{t}"),
        other => panic!("unexpected {other:?}"),
    }
}

/// A client that never answers pings is dropped after the next interval.
#[actix_rt::test]
async fn heartbeat_drops_a_silent_client() {
    let server = TestServer::start_with(|cmd| {
        cmd.arg("--heartbeat-secs").arg("1");
    });
    let mut silent = server.chat("alice").await;
    silent.auto_pong = false;
    let mut polite = server.chat("alice").await;
    // The silent one sees a ping, ignores it, and is dropped; meanwhile the
    // polite one answers its pings (recv_within does) and must stay connected.
    let mut pings = 0;
    loop {
        tokio::select! {
            ev = silent.recv() => match ev {
                WsEvent::Ping => pings += 1,
                WsEvent::Close(..) | WsEvent::Ended => break,
                other => panic!("unexpected {other:?}"),
            },
            ev = polite.recv_within(crate::util::WAIT) => panic!("the polite client was disconnected: {ev:?}"),
        }
    }
    assert!(pings >= 1);
    // The polite one (answering pings) is still served.
    polite.send_text("{").await;
    assert_eq!(polite.recv_json().await["code"], "INVALID_PAYLOAD");
}

/// Users, sessions and the JWT secret survive a restart on the same data dir.
#[actix_rt::test]
async fn data_survives_restart() {
    let server = TestServer::start();
    let token = server.token("alice");
    let project = crate::util::project_dir();
    let id = server.create_session(&token, "codex", project.path()).await;
    let data = server.kill_keep_data();
    let server = TestServer::start_in(data, |_| {});
    // The old token still verifies (same secret) and the session is still there.
    let (status, body) = server
        .get(&format!("/api/providers/sessions/{id}"), Some(&token))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["data"]["provider"], "codex");
    // Opening the pool (fresh file, then again) never trips over SQLite's lock.
    assert!(
        !server.logs().contains("database is locked"),
        "{}",
        server.logs()
    );
}

/// SIGTERM: sockets are closed with 1001, a socket opened after that is
/// never upgraded (the server stopped accepting before the actors closed
/// the first), and the process exits 0.
#[actix_rt::test]
async fn sigterm_closes_sockets_and_exits_zero() {
    let mut server = TestServer::start();
    let token = server.token("alice");
    let mut ws = server.ws(&format!("/ws?token={token}")).await;
    ws.send_text("{").await;
    ws.recv_json().await;
    unsafe { libc::kill(server.pid() as i32, libc::SIGTERM) };
    assert_eq!(ws.recv_close().await, Some(1001));
    let late = server.try_ws(&format!("/ws?token={token}")).await;
    assert!(late.is_err(), "a socket was upgraded during shutdown");
    let status = server.wait_exit();
    assert!(status.success(), "exit status {status:?}");
}
