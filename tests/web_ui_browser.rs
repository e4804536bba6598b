//! The web UI in a real browser (Debian's Chromium driven by playwright-core,
//! see support::browser): the help page of a gateway without a UI, and the
//! reference's own UI (CloudCLI) end to end with the real Claude CLI.

use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::json;

use crate::support::anthropic::{AnthropicStub, Reply};
use crate::support::browser::{artifacts_dir, BrowserScript};
use crate::support::clis::claude_bin;
use crate::util::{agentgate_bin, eventually, project_dir, TestServer};
use crate::web_ui::user_add;

/// The reference's web UI on npm (AGPL-3.0: fetched at test time by
/// `agentgate web-ui install` into the test's data dir, never committed).
const CLOUDCLI_VERSION: &str = "1.37.2";

/// Installing the browser and playwright-core on a fresh machine takes a while.
const FIRST_STEP: Duration = Duration::from_secs(300);
const STEP: Duration = Duration::from_secs(60);

/// A newcomer opening a gateway without a UI reads how to get one; the
/// harness also loads a page with the headers a test gives it (a token).
#[test]
fn help_page_reads_in_a_real_browser() {
    let server = TestServer::start();
    let artifacts = artifacts_dir("help_page");
    let mut script = BrowserScript::start(
        "page_text.js",
        json!({
            "url": server.url("/"),
            "name": "help-page",
            "waitForText": "agentgate is running",
        }),
        &artifacts,
    );
    let launched = script.wait_step("launched", FIRST_STEP);
    assert!(launched["version"].is_string(), "{launched}");
    let page = script.wait_step("loaded", STEP);
    assert_eq!(page["status"], 200, "{page}");
    let text = page["text"].as_str().unwrap_or_default();
    assert!(text.contains("agentgate web-ui install"), "{text}");
    script.finish(STEP);
    // The harness sends a page's requests with the headers a test gives it.
    let token = server.token("alice");
    let mut script = BrowserScript::start(
        "page_text.js",
        json!({
            "url": server.url("/api/auth/user"),
            "name": "auth-user",
            "headers": {"Authorization": format!("Bearer {token}")},
        }),
        &artifacts_dir("help_page_auth"),
    );
    let page = script.wait_step("loaded", FIRST_STEP);
    assert_eq!(page["status"], 200, "{page}");
    assert!(
        page["text"].as_str().unwrap_or_default().contains("alice"),
        "{page}"
    );
    script.finish(STEP);
    let shot = &artifacts.join("01-help-page.png");
    assert!(
        std::fs::metadata(shot)
            .map(|m| m.len() > 1000)
            .unwrap_or(false),
        "no screenshot at {}",
        shot.display()
    );
}

/// The stand-in model's streamed answer after the tool ran: `tok0 ... tok39`.
fn answer() -> Reply {
    Reply::chunks((0..ANSWER_WORDS).map(|i| format!("tok{i} ")))
        // Slow enough that the page shows part of it before the rest.
        .with_delay(Duration::from_millis(60))
}
const ANSWER_WORDS: usize = 40;
/// What the tool call creates in the project, and what the Shell tab creates.
const TOOL_FILE: &str = "made-by-claude.txt";
const SHELL_FILE: &str = "made-in-shell.txt";

/// A new user's whole path through the reference's own web UI (CloudCLI,
/// installed with `agentgate web-ui install`) served by agentgate, with the real Claude
/// CLI against the Anthropic stand-in: register, project listed, new session,
/// permission prompt answered "Allow once" (the tool really runs), streamed
/// answer, run complete; after a reload the conversation comes from history;
/// the Shell tab's keys reach a PTY; another user sees none of it.
#[actix_rt::test]
async fn cloudcli_end_to_end() {
    // As the README says: `agentgate web-ui install`, then `serve` serves it.
    let data = tempfile::tempdir().expect("data dir");
    let install = Command::new(agentgate_bin())
        .args([
            "web-ui",
            "install",
            "--version",
            CLOUDCLI_VERSION,
            "--data-dir",
        ])
        .arg(data.path())
        .stdin(Stdio::null())
        .output()
        .expect("run agentgate web-ui install");
    assert!(
        install.status.success(),
        "agentgate web-ui install failed (needs npm and the npm registry): {}",
        String::from_utf8_lossy(&install.stderr)
    );
    let claude = claude_bin();
    let stub = AnthropicStub::start();
    let home = tempfile::tempdir().expect("home");
    let project = project_dir();
    let project_path = project.path().canonicalize().expect("project path");
    // The Shell tab runs Claude's interactive TUI: no onboarding, trusted
    // folder, the stand-in's key accepted without asking.
    let config = json!({
        "hasCompletedOnboarding": true,
        "customApiKeyResponses": {"approved": ["test"], "rejected": []},
        "projects": {project_path.to_str().unwrap(): {"hasTrustDialogAccepted": true}},
    });
    std::fs::write(home.path().join(".claude.json"), config.to_string()).expect("~/.claude.json");
    let env = stub.claude_env(home.path());
    let server = TestServer::start_in(data, |cmd| {
        cmd.arg("--claude-bin").arg(&claude);
        for (k, v) in env {
            cmd.env(k, v);
        }
    });
    let tool_command = format!("echo tool-ran > {TOOL_FILE}");
    stub.push(Reply::bash(&tool_command));
    stub.push(answer());
    stub.set_default(Reply::text("(nothing more)"));

    eventually("serve to print the web UI's URL", || {
        server.stdout().contains("web UI on http://")
    })
    .await;
    let artifacts = artifacts_dir("cloudcli");
    let name = project_path
        .file_name()
        .unwrap()
        .to_string_lossy()
        .to_string();
    let mut script = BrowserScript::start(
        "cloudcli.js",
        json!({
            "url": server.url("/"),
            "username": "alice",
            "password": "alice password 1",
            "projectName": name,
            "projectPath": project_path,
            "prompt": "Please write the file",
            "answerWords": ANSWER_WORDS,
            "shellFile": SHELL_FILE,
            "toolFile": TOOL_FILE,
            "other": {"username": "bob", "password": "bobs password 2"},
        }),
        &artifacts,
    );
    script.wait_step("launched", FIRST_STEP);
    let setup = script.wait_step("setup_form", STEP);
    assert_eq!(setup["needsSetup"], true, "{setup}");
    script.wait_step("registered", STEP);

    // The first user exists: registration is closed, an admin adds bob.
    let (status, _) = server
        .post(
            "/api/auth/register",
            None,
            json!({"username": "mallory", "password": "pw"}),
        )
        .await;
    assert_eq!(status, 403);
    let out = user_add(server.data_dir(), "bob", "bobs password 2\n");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    script.wait_step("project_listed", STEP);
    let token = login(&server, "alice", "alice password 1").await;
    let (_, projects) = server.get("/api/projects", Some(&token)).await;
    assert_eq!(
        projects[0]["fullPath"]
            .as_str()
            .map(std::path::PathBuf::from),
        Some(project_path.clone()),
        "{projects}"
    );
    let asked = script.wait_step("permission_shown", STEP);
    assert!(
        asked["text"].as_str().unwrap_or_default().contains("Bash"),
        "{asked}"
    );
    // The script goes on to click "Allow once" at once, so it looked for
    // the file itself while the prompt was up.
    assert_eq!(
        asked["toolFileBeforeAllow"], false,
        "the tool ran before it was allowed: {asked}"
    );
    let partial = script.wait_step("answer_streaming", STEP);
    let shown = partial["words"].as_u64().unwrap_or(0);
    assert!(
        shown > 0 && shown < ANSWER_WORDS as u64,
        "the answer did not arrive in parts: {partial}"
    );
    script.wait_step("answered", STEP);
    let done = script.wait_step("completed", STEP);
    // Each event once: the UI does not drop repeated seqs itself, so a
    // socket must never get one twice (PROTOCOL.md E8).
    assert_eq!(done["lastWordShown"], 1, "{done}");
    assert_eq!(done["seqsReceivedTwice"], 0, "{done}");
    assert_eq!(
        std::fs::read_to_string(project_path.join(TOOL_FILE))
            .unwrap_or_default()
            .trim(),
        "tool-ran"
    );
    let session = done["sessionId"].as_str().expect("sessionId").to_string();
    // What the page showed is what the gateway recorded.
    let (status, body) = server
        .get(
            &format!("/api/providers/sessions/{session}/messages?limit=50&offset=0"),
            Some(&token),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let history = body["data"]["messages"].to_string();
    assert!(history.contains("Please write the file"), "{history}");
    assert!(history.contains("tok39"), "{history}");
    let (_, running) = server
        .get("/api/providers/sessions/running", Some(&token))
        .await;
    assert_eq!(running["data"]["sessions"], json!([]), "{running}");

    let reloaded = script.wait_step("reloaded", STEP);
    assert_eq!(reloaded["lastWordShown"], 1, "{reloaded}");
    let text = reloaded["text"].as_str().unwrap_or_default();
    assert!(
        text.contains("Please write the file") && text.contains("tok39"),
        "{text}"
    );

    let typed = script.wait_step("shell_typed", STEP);
    let inputs = typed["sent"]
        .as_array()
        .map(|a| a.iter().filter(|m| m["type"] == "input").count())
        .unwrap_or(0);
    assert!(
        inputs >= SHELL_FILE.len(),
        "one input frame per key: {typed}"
    );
    // The keys reached a PTY: the command they typed ran in the project.
    let shell_file = project_path.join(SHELL_FILE);
    eventually("the Shell tab's command to create its file", || {
        shell_file.exists()
    })
    .await;
    script.send(json!({"shellFileSeen": true}));

    let other = script.wait_step("other_user", STEP);
    let text = other["text"].as_str().unwrap_or_default();
    assert_eq!(other["username"], "bob", "{other}");
    for secret in [name.as_str(), "Please write the file", "tok39"] {
        assert!(!text.contains(secret), "bob sees {secret:?}: {text}");
    }
    let bob = login(&server, "bob", "bobs password 2").await;
    let (_, projects) = server.get("/api/projects", Some(&bob)).await;
    assert_eq!(projects, json!([]));
    let (status, _) = server
        .get(&format!("/api/providers/sessions/{session}"), Some(&bob))
        .await;
    assert_eq!(status, 404);

    script.finish(STEP);
    let shots = std::fs::read_dir(&artifacts)
        .map(|d| {
            d.flatten()
                .filter(|e| e.path().extension().is_some_and(|x| x == "png"))
                .count()
        })
        .unwrap_or(0);
    assert!(shots >= 6, "screenshots missing in {}", artifacts.display());
}

async fn login(server: &TestServer, username: &str, password: &str) -> String {
    let (status, body) = server
        .post(
            "/api/auth/login",
            None,
            json!({"username": username, "password": password}),
        )
        .await;
    assert_eq!(status, 200, "login {username}: {body}");
    body["token"].as_str().expect("token").to_string()
}
