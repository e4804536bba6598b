//! The web UI's side of the gateway without a browser: static serving of a
//! built single-page app (`--web-dir`, the data dir's `web-ui/dist`), the help
//! page without one, `agentgate user add`, and the REST routes the reference's
//! web UI reads (projects, session details, history pages) in its shapes.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Stdio};

use serde_json::json;

use crate::util::{agentgate_bin, eventually, TestServer, WAIT};

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
