//! The web UI in a real browser (Debian's Chromium driven by playwright-core,
//! see support::browser): the help page of a gateway without a UI.

use std::time::Duration;

use serde_json::json;

use crate::support::browser::{artifacts_dir, BrowserScript};
use crate::util::TestServer;

/// Installing the browser and playwright-core on a fresh machine takes a while.
const FIRST_STEP: Duration = Duration::from_secs(300);
const STEP: Duration = Duration::from_secs(60);

/// A newcomer opening a gateway without a UI reads how to get one.
#[test]
fn help_page_reads_in_a_real_browser() {
    let server = TestServer::start();
    let artifacts = artifacts_dir("help_page");
    let mut script = BrowserScript::start(
        "page_text.js",
        json!({"url": server.url("/"), "name": "help-page"}),
        &artifacts,
    );
    let launched = script.wait_step("launched", FIRST_STEP);
    assert!(launched["version"].is_string(), "{launched}");
    let page = script.wait_step("loaded", STEP);
    assert_eq!(page["status"], 200, "{page}");
    let text = page["text"].as_str().unwrap_or_default();
    assert!(text.contains("agentgate web-ui install"), "{text}");
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
