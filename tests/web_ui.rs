//! The web UI's side of the gateway without a browser: static serving of a
//! built single-page app (`--web-dir`, the data dir's `web-ui/dist`), the help
//! page without one, `agentgate user add`, and the REST routes the reference's
//! web UI reads (projects, session details, history pages) in its shapes.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Stdio};

use diesel::connection::SimpleConnection;
use diesel::{Connection, SqliteConnection};
use serde_json::{json, Value};

use crate::chat::{send, streamed_text};
use crate::util::{
    agentgate_bin, children_of, eventually, example_bin, pid_alive, TestServer, WsClient, WAIT,
};

/// One raw HTTP/1.1 GET with the path sent byte for byte (no client-side
/// normalization of `..` or `%2e`): `(status, lower-cased head, body)`.
pub fn raw_get(server: &TestServer, path: &str, extra: &str) -> (u16, String, Vec<u8>) {
    let mut stream = TcpStream::connect(server.addr).expect("connect");
    stream.set_read_timeout(Some(WAIT)).unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n{extra}\r\n",
        server.addr
    )
    .unwrap();
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).expect("read response");
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("end of head");
    let head = String::from_utf8_lossy(&raw[..split]).to_lowercase();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status");
    (status, head, raw[split + 4..].to_vec())
}

fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().find_map(|l| {
        l.strip_prefix(name)
            .and_then(|r| r.strip_prefix(':'))
            .map(str::trim)
    })
}

const INDEX: &str = "<!doctype html><title>fake app</title><div id=root></div>";
const SECRET: &str = "top secret outside the web dir";

/// A built app: index, hashed assets, a service worker, a hidden file, and a
/// symlink that leads out of the folder (beside a secret file).
fn fake_app(root: &Path) -> std::path::PathBuf {
    let dist = root.join("dist");
    std::fs::create_dir_all(dist.join("assets")).unwrap();
    std::fs::write(dist.join("index.html"), INDEX).unwrap();
    std::fs::write(dist.join("assets/app-1a2b3c.js"), "console.log('app');").unwrap();
    std::fs::write(dist.join("assets/style-9f8e.css"), "body{color:red}").unwrap();
    std::fs::write(dist.join("sw.js"), "self.addEventListener('fetch',()=>{});").unwrap();
    std::fs::write(
        dist.join("logo.svg"),
        "<svg xmlns='http://www.w3.org/2000/svg'/>",
    )
    .unwrap();
    std::fs::write(dist.join(".env"), SECRET).unwrap();
    std::fs::write(root.join("secret.txt"), SECRET).unwrap();
    std::os::unix::fs::symlink(root.join("secret.txt"), dist.join("leak.txt")).unwrap();
    dist
}

/// Content types, caching, the SPA fallback, 404s, no listing, no traversal.
#[actix_rt::test]
async fn serves_a_single_page_app_safely() {
    let app = tempfile::tempdir().unwrap();
    let dist = fake_app(app.path());
    let server = TestServer::start_with(|cmd| {
        cmd.arg("--web-dir").arg(&dist);
    });
    eventually("the UI's URL printed", || {
        server
            .stdout()
            .contains(&format!("web UI on http://{}/", server.addr))
    })
    .await;

    for path in [
        "/",
        "/session/6353e92a",
        "/assets",
        "/assets/",
        "/index.html",
    ] {
        let (status, head, body) = raw_get(&server, path, "");
        assert_eq!(status, 200, "{path}");
        assert_eq!(
            String::from_utf8_lossy(&body),
            INDEX,
            "{path}: no listing, the app"
        );
        assert_eq!(
            header(&head, "content-type"),
            Some("text/html; charset=utf-8")
        );
        assert_eq!(
            header(&head, "cache-control"),
            Some("no-cache, no-store, must-revalidate"),
            "{path}"
        );
    }
    let (status, head, body) = raw_get(&server, "/assets/app-1a2b3c.js", "");
    assert_eq!(
        (status, body.as_slice()),
        (200, &b"console.log('app');"[..])
    );
    assert!(header(&head, "content-type")
        .unwrap()
        .contains("javascript"));
    assert_eq!(
        header(&head, "cache-control"),
        Some("public, max-age=31536000, immutable")
    );
    // A repeated load revalidates with the ETag and gets no body.
    let etag = header(&head, "etag").expect("etag").to_string();
    let (status, _, body) = raw_get(
        &server,
        "/assets/app-1a2b3c.js",
        &format!("If-None-Match: {etag}\r\n"),
    );
    assert_eq!((status, body.len()), (304, 0));
    let (_, head, _) = raw_get(&server, "/assets/style-9f8e.css", "");
    assert!(header(&head, "content-type")
        .unwrap()
        .starts_with("text/css"));
    let (_, head, _) = raw_get(&server, "/logo.svg", "");
    assert_eq!(header(&head, "content-type"), Some("image/svg+xml"));
    let (status, head, _) = raw_get(&server, "/sw.js", "");
    assert_eq!(status, 200);
    assert_eq!(header(&head, "cache-control"), Some("no-cache"));

    // Missing files with an extension are 404s, not the app.
    for path in ["/assets/missing-0000.js", "/favicon.png", "/a/b/c.map"] {
        let (status, _, body) = raw_get(&server, path, "");
        assert_eq!(status, 404, "{path}");
        assert_ne!(String::from_utf8_lossy(&body), INDEX);
    }
    // Nothing outside the folder, however the path is spelled, and no hidden files.
    for path in [
        "/leak.txt",
        "/../secret.txt",
        "/assets/../../secret.txt",
        "/%2e%2e/secret.txt",
        "/assets/..%2f..%2fsecret.txt",
        "/assets/%2e%2e%2f%2e%2e%2fsecret.txt",
        "/.env",
        "/assets/..%5c..%5csecret.txt",
    ] {
        let (status, _, body) = raw_get(&server, path, "");
        let body = String::from_utf8_lossy(&body);
        assert!(!body.contains(SECRET), "{path} leaked the secret");
        assert!(status == 404 || body == INDEX, "{path}: {status} {body}");
    }

    // The API keeps its JSON 404s and the upgrades their auth.
    let (status, body) = server.get("/api/nope", None).await;
    assert_eq!(
        (status, body["error"]["code"].clone()),
        (404, json!("NOT_FOUND"))
    );
    let (status, body) = server.post("/", None, json!({})).await;
    assert_eq!(
        (status, body["error"]["code"].clone()),
        (404, json!("NOT_FOUND"))
    );
    assert_eq!(
        server.try_ws("/ws").await.err().as_deref(),
        Some("status 401")
    );
}

/// Without a UI, `/` tells a newcomer how to get one; the data dir's installed
/// copy is served by default; a `--web-dir` without an app is refused at start.
#[actix_rt::test]
async fn help_page_default_install_dir_and_a_bad_web_dir() {
    let server = TestServer::start();
    let (status, head, body) = raw_get(&server, "/", "");
    assert_eq!(status, 200);
    assert!(header(&head, "content-type")
        .unwrap()
        .starts_with("text/html"));
    let body = String::from_utf8_lossy(&body);
    assert!(body.contains("agentgate web-ui install"), "{body}");
    let (status, body) = server.get("/session/abc", None).await;
    assert_eq!(
        (status, body["error"]["code"].clone()),
        (404, json!("NOT_FOUND"))
    );
    drop(server);

    let data = tempfile::tempdir().unwrap();
    fake_app(&data.path().join("web-ui"));
    let server = TestServer::start_in(data, |_| {});
    let (status, _, body) = raw_get(&server, "/", "");
    assert_eq!(
        (status, String::from_utf8_lossy(&body).as_ref()),
        (200, INDEX)
    );
    eventually("the UI's URL printed", || {
        server.stdout().contains("web UI on http://")
    })
    .await;
    drop(server);

    let empty = tempfile::tempdir().unwrap();
    let data = tempfile::tempdir().unwrap();
    let out = Command::new(agentgate_bin())
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(data.path())
        .arg("--web-dir")
        .arg(empty.path())
        .stdin(Stdio::null())
        .output()
        .expect("run serve");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("no index.html"), "{stderr}");
}

/// Runs `agentgate user add NAME` with `stdin` as its input.
pub fn user_add(data_dir: &Path, name: &str, stdin: &str) -> std::process::Output {
    let mut child = Command::new(agentgate_bin())
        .args(["user", "add", name, "--data-dir"])
        .arg(data_dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn user add");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    child.wait_with_output().expect("user add output")
}

/// An admin adds users from the command line while registration stays closed.
#[actix_rt::test]
async fn user_add_reads_the_password_from_stdin() {
    let server = TestServer::start();
    let creds = json!({"username": "ann", "password": "first-pass"});
    let (status, _) = server.post("/api/auth/register", None, creds).await;
    assert_eq!(status, 201);

    let out = user_add(server.data_dir(), "bob", "bobs password\n");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (status, body) = server
        .post(
            "/api/auth/login",
            None,
            json!({"username": "bob", "password": "bobs password"}),
        )
        .await;
    assert_eq!(
        (status, body["user"]["username"].clone()),
        (200, json!("bob"))
    );

    let again = user_add(server.data_dir(), "bob", "other\n");
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("already exists"));
    let empty = user_add(server.data_dir(), "carol", "\n");
    assert!(!empty.status.success());
    let (status, body) = server
        .post(
            "/api/auth/register",
            None,
            json!({"username": "carol", "password": "pw"}),
        )
        .await;
    assert_eq!(
        (status, body["code"].clone()),
        (403, json!("REGISTRATION_CLOSED"))
    );
    assert!(body["error"].is_string());
}

fn fake_claude_server(data: Option<tempfile::TempDir>, extra: &[&str]) -> TestServer {
    let add = |cmd: &mut Command| {
        cmd.arg("--claude-bin").arg(example_bin("fake_claude"));
        cmd.args(extra);
    };
    match data {
        Some(data) => TestServer::start_in(data, add),
        None => TestServer::start_with(add),
    }
}

/// Every frame until the session's `complete` (gateway kinds included).
async fn frames_until_complete(ws: &mut WsClient, session: &str) -> Vec<Value> {
    let mut frames = Vec::new();
    loop {
        let v = ws.recv_json().await;
        let done = v["kind"] == "complete" && v["sessionId"] == session;
        frames.push(v);
        if done {
            return frames;
        }
    }
}

fn kinds(messages: &Value) -> Vec<(String, String)> {
    messages
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["kind"].as_str().unwrap_or_default().to_string(),
                m["role"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

/// The gateway records each conversation itself: durable before `complete`
/// goes out (fetched right after it), paged newest-first, with summary,
/// count and project on the session, per user, and kept across a SIGKILL.
#[actix_rt::test]
async fn history_is_recorded_paged_and_survives_a_kill() {
    let server = fake_claude_server(None, &[]);
    let token = server.token("alice");
    let project = crate::util::project_dir();
    let session = server
        .create_session(&token, "claude", project.path())
        .await;
    let mut ws = server.ws(&format!("/ws?token={token}")).await;

    // A tool that asks for permission, then three streamed deltas, while the
    // test holds the database's write lock: the turn ends, but `complete`
    // waits until its history is written.
    let mut lock =
        SqliteConnection::establish(server.data_dir().join("agentgate.db").to_str().unwrap())
            .expect("open the gateway's database");
    send(&mut ws, &session, "text:3 permission:Bash").await;
    let (req, mut frames) = ws.recv_until_kind("permission_request").await;
    lock.batch_execute("PRAGMA busy_timeout = 5000; BEGIN IMMEDIATE;")
        .unwrap();
    ws.send_json(
        json!({"type":"chat.permission-response","requestId": req["requestId"],"allow": true}),
    )
    .await;
    frames.push(req);
    let (end, before_end) = ws.recv_until_kind("stream_end").await;
    frames.extend(before_end);
    frames.push(end);
    // The CLI printed its result and is gone; whatever the registry sent
    // before its answer to a probe has arrived: no complete among it.
    let cli = children_of(server.pid());
    for pid in cli {
        eventually("the CLI exits after its result", || !pid_alive(pid)).await;
    }
    let (early, probe) = ws.frames_before_probe(&session).await;
    assert!(
        early.iter().all(|f| f["kind"] != "complete"),
        "complete was sent before its history was written: {early:?}"
    );
    assert_eq!(
        probe["isProcessing"], true,
        "a finishing run is still processing"
    );
    frames.extend(early);
    lock.batch_execute("COMMIT;").unwrap();
    frames.extend(frames_until_complete(&mut ws, &session).await);
    let upserted = frames
        .iter()
        .find(|f| f["kind"] == "session_upserted")
        .expect("session_upserted");
    let (status, body) = server
        .get(
            &format!("/api/providers/sessions/{session}/messages"),
            Some(&token),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let first = &body["data"];
    assert_eq!(
        kinds(&first["messages"]),
        [
            ("text".into(), "user".into()),
            ("tool_use".into(), String::new()),
            ("tool_result".into(), String::new()),
            ("text".into(), "assistant".into()),
        ],
        "{first:#}"
    );
    let messages = first["messages"].as_array().unwrap();
    assert_eq!(messages[0]["content"], "text:3 permission:Bash");
    assert_eq!(messages[3]["content"], streamed_text(&frames).as_str());
    assert_eq!(messages[1]["toolResult"]["content"], "done");
    assert!(messages.iter().all(|m| m["sessionId"] == session.as_str()));
    assert_eq!(
        (first["total"].clone(), first["hasMore"].clone()),
        (json!(4), json!(false))
    );

    send(&mut ws, &session, "text:2").await;
    frames_until_complete(&mut ws, &session).await;
    // Newest first: offset 0 is the latest two, in order; offset 2 the two before.
    let page = |offset: u64| {
        let path = format!("/api/providers/sessions/{session}/messages?limit=2&offset={offset}");
        let (server, token) = (&server, &token);
        async move { server.get(&path, Some(token)).await }
    };
    let (_, latest) = page(0).await;
    assert_eq!(latest["data"]["messages"][0]["content"], "text:2");
    assert_eq!(latest["data"]["messages"][1]["role"], "assistant");
    assert_eq!(
        (
            latest["data"]["total"].clone(),
            latest["data"]["hasMore"].clone()
        ),
        (json!(6), json!(true))
    );
    let (_, older) = page(2).await;
    assert_eq!(kinds(&older["data"]["messages"])[0].0, "tool_result");
    let (_, oldest) = page(4).await;
    assert_eq!(
        oldest["data"]["messages"][0]["content"],
        "text:3 permission:Bash"
    );
    assert_eq!(oldest["data"]["hasMore"], false);

    // The session's details and the project list say the same.
    let (_, details) = server
        .get(&format!("/api/providers/sessions/{session}"), Some(&token))
        .await;
    let details = &details["data"];
    assert_eq!(details["summary"], "text:3 permission:Bash");
    assert_eq!(details["messageCount"], 6);
    assert!(details["lastActivity"]
        .as_str()
        .is_some_and(|t| t.len() > 10));
    assert!(details.get("providerSessionId").is_none());
    let (status, projects) = server.get("/api/projects", Some(&token)).await;
    assert_eq!(status, 200);
    let listed = &projects[0];
    assert_eq!(projects.as_array().unwrap().len(), 1, "{projects}");
    assert_eq!(listed["projectId"], details["project"]["projectId"]);
    assert_eq!(listed["fullPath"], project.path().to_str().unwrap());
    assert_eq!(listed["sessions"][0]["id"], session.as_str());
    assert_eq!(listed["sessions"][0]["messageCount"], 6);
    assert_eq!(listed["sessionMeta"], json!({"hasMore": false, "total": 1}));
    // session_upserted names the same project, as the web UI files sessions by projectId.
    assert_eq!(upserted["project"]["projectId"], listed["projectId"]);
    assert_eq!(upserted["project"]["isStarred"], false);
    assert!(upserted["session"]["lastActivity"].is_string());

    // Another user sees none of it.
    let bob = server.token("bob");
    let (status, body) = server
        .get(
            &format!("/api/providers/sessions/{session}/messages"),
            Some(&bob),
        )
        .await;
    assert_eq!(
        (status, body["error"]["code"].clone()),
        (404, json!("SESSION_NOT_FOUND"))
    );
    let (_, theirs) = server.get("/api/projects", Some(&bob)).await;
    assert_eq!(theirs, json!([]));

    // History was durable before each complete: a SIGKILL loses none of it.
    drop(ws);
    let server = fake_claude_server(Some(server.kill_keep_data()), &[]);
    let (_, after) = server
        .get(
            &format!("/api/providers/sessions/{session}/messages"),
            Some(&token),
        )
        .await;
    assert_eq!(after["data"]["total"], 6);
    assert_eq!(after["data"]["messages"], {
        let (_, all) = page_of(&server, &session, &token).await;
        all
    });
}

async fn page_of(server: &TestServer, session: &str, token: &str) -> (u16, Value) {
    let (status, body) = server
        .get(
            &format!("/api/providers/sessions/{session}/messages"),
            Some(token),
        )
        .await;
    (status, body["data"]["messages"].clone())
}

/// `--history-max-messages` keeps the newest messages of a session.
#[actix_rt::test]
async fn history_is_bounded_per_session() {
    let server = fake_claude_server(None, &["--history-max-messages", "3"]);
    let token = server.token("alice");
    let project = crate::util::project_dir();
    let session = server
        .create_session(&token, "claude", project.path())
        .await;
    let mut ws = server.ws(&format!("/ws?token={token}")).await;
    for prompt in ["text:1 size:4", "text:2 size:4", "text:3 size:4"] {
        send(&mut ws, &session, prompt).await;
        frames_until_complete(&mut ws, &session).await;
    }
    let (_, messages) = page_of(&server, &session, &token).await;
    assert_eq!(
        kinds(&messages),
        [
            ("text".into(), "assistant".into()),
            ("text".into(), "user".into()),
            ("text".into(), "assistant".into()),
        ]
    );
    assert_eq!(messages[1]["content"], "text:3 size:4");
}

/// Projects as the web UI manages them: create (the folder too), refuse
/// duplicates and system folders, star, rename, list sessions per project.
#[actix_rt::test]
async fn projects_are_created_listed_and_starred_per_user() {
    let server = TestServer::start();
    let token = server.token("alice");
    let base = tempfile::tempdir().unwrap();
    let dir = base.path().join("new-app");
    let (status, body) = server
        .post(
            "/api/projects/create-project",
            Some(&token),
            json!({"path": dir, "customName": "My App"}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert!(dir.is_dir(), "the folder was created");
    let created = &body["project"];
    assert_eq!(created["displayName"], "My App");
    assert_eq!(created["sessions"], json!([]));
    let id = created["projectId"].as_str().unwrap().to_string();

    let (status, body) = server
        .post(
            "/api/projects/create-project",
            Some(&token),
            json!({"path": dir}),
        )
        .await;
    assert_eq!(
        (status, body["error"]["code"].clone()),
        (409, json!("PROJECT_ALREADY_EXISTS"))
    );
    for (path, code) in [
        (json!("relative/dir"), "INVALID_PROJECT_PATH"),
        (json!("/etc"), "INVALID_PROJECT_PATH"),
        (json!("/usr/lib/x"), "INVALID_PROJECT_PATH"),
        (json!(""), "PROJECT_PATH_REQUIRED"),
    ] {
        let (status, body) = server
            .post(
                "/api/projects/create-project",
                Some(&token),
                json!({"path": path}),
            )
            .await;
        assert_eq!(
            (status, body["error"]["code"].clone()),
            (400, json!(code)),
            "{path}"
        );
    }

    let (status, body) = server
        .post(
            &format!("/api/projects/{id}/toggle-star"),
            Some(&token),
            json!({}),
        )
        .await;
    assert_eq!((status, body["isStarred"].clone()), (200, json!(true)));
    let (status, _) = server
        .put(
            &format!("/api/projects/{id}/rename"),
            Some(&token),
            json!({"displayName": "Renamed"}),
        )
        .await;
    assert_eq!(status, 200);
    let session = server.create_session(&token, "claude", &dir).await;
    let (_, projects) = server.get("/api/projects", Some(&token)).await;
    assert_eq!(projects[0]["isStarred"], true);
    assert_eq!(projects[0]["displayName"], "Renamed");
    assert_eq!(projects[0]["sessions"][0]["id"], session.as_str());
    let (status, page) = server
        .get(
            &format!("/api/projects/{id}/sessions?limit=5&offset=0"),
            Some(&token),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(page["projectId"], id.as_str());
    assert_eq!(page["sessions"][0]["id"], session.as_str());
    assert_eq!(page["sessionMeta"], json!({"hasMore": false, "total": 1}));

    let bob = server.token("bob");
    let (status, body) = server
        .get(&format!("/api/projects/{id}/sessions"), Some(&bob))
        .await;
    assert_eq!(
        (status, body["error"]["code"].clone()),
        (404, json!("PROJECT_NOT_FOUND"))
    );
    let (status, _) = server
        .get(
            &format!("/api/projects/{id}/sessions?limit=-1"),
            Some(&token),
        )
        .await;
    assert_eq!(status, 400);
    let (status, _) = server.get("/api/projects", None).await;
    assert_eq!(status, 401);
}
