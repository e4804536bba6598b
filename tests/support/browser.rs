//! A real browser for integration tests: Debian's Chromium driven by
//! `playwright-core` from a Node script under `tests/browser/`.
//!
//! - [`chromium`]: `/usr/bin/chromium`, installed with `apt-get` on first use
//!   when missing and we are root (CI); otherwise the test fails naming the
//!   Debian package. Never a browser download.
//! - [`playwright_modules`]: a pinned `playwright-core` installed with npm into
//!   `<repo>/.cache/browser/` once per machine (the cache-fill helper of
//!   [`super::clis`]).
//! - [`BrowserScript`]: runs `node tests/browser/<script>` with a JSON config;
//!   the script reports steps as JSON lines on stdout (`{"step": name, ...}`,
//!   see `tests/browser/harness.js`), which the test awaits and asserts on, and
//!   may be sent JSON lines on its stdin. Screenshots go into
//!   [`artifacts_dir`] (under the target dir, never committed).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::clis::{npm_install_at, once_per_key};

/// Where Debian's `chromium` package puts the browser.
pub const CHROMIUM: &str = "/usr/bin/chromium";
/// Debian packages the browser needs (fonts, so screenshots show text).
const APT_PACKAGES: &[&str] = &["chromium", "fonts-dejavu-core"];
/// Pinned `playwright-core` (no browser download: it only drives ours).
pub const PLAYWRIGHT_CORE_VERSION: &str = "1.65.1";

/// `/usr/bin/chromium`, installing Debian's `chromium` on first use when it
/// is missing and this process is root.
///
/// # Panics
/// When it is missing and cannot be installed (not root, or apt failed).
pub fn chromium() -> PathBuf {
    once_per_key("apt:chromium".into(), || {
        let path = PathBuf::from(CHROMIUM);
        if path.exists() {
            return path;
        }
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            panic!(
                "the browser tests need Debian's `chromium` package ({CHROMIUM} is missing) and \
                 this user cannot install it: run `sudo apt-get install -y {}`",
                APT_PACKAGES.join(" ")
            );
        }
        // A fresh machine may have no package lists yet: update and retry once.
        if !apt_install() {
            apt(&["update"]);
            assert!(
                apt_install(),
                "`apt-get install {}` failed (see its output above); the browser tests need {CHROMIUM}",
                APT_PACKAGES.join(" ")
            );
        }
        assert!(
            path.exists(),
            "apt-get installed {} but {CHROMIUM} does not exist",
            APT_PACKAGES.join(" ")
        );
        path
    })
}

fn apt_install() -> bool {
    let mut args = vec!["install", "-y", "--no-install-recommends"];
    args.extend_from_slice(APT_PACKAGES);
    apt(&args)
}

fn apt(args: &[&str]) -> bool {
    eprintln!("browser tests: apt-get {}", args.join(" "));
    Command::new("apt-get")
        // Another process may hold dpkg's lock (a parallel test run): wait for it.
        .args(["-o", "DPkg::Lock::Timeout=600"])
        .args(args)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .stdin(Stdio::null())
        .status()
        .unwrap_or_else(|e| panic!("cannot run apt-get to install chromium: {e}"))
        .success()
}

/// The `node_modules` folder holding the pinned `playwright-core`.
pub fn playwright_modules() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join(".cache")
        .join("browser");
    let package = npm_install_at(
        &root,
        &format!("playwright-core-{PLAYWRIGHT_CORE_VERSION}"),
        "playwright-core",
        PLAYWRIGHT_CORE_VERSION,
        Path::new("node_modules/playwright-core/package.json"),
    );
    package
        .ancestors()
        .nth(2)
        .expect("node_modules/playwright-core/package.json has a node_modules")
        .to_path_buf()
}

/// `<target>/tmp/browser-artifacts/<name>/`, emptied: screenshots and the
/// script's stderr of one test.
pub fn artifacts_dir(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("browser-artifacts")
        .join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)
        .unwrap_or_else(|e| panic!("cannot create artifacts dir {}: {e}", dir.display()));
    dir
}

/// A running `node tests/browser/<script>`; killed when dropped.
pub struct BrowserScript {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<Value>,
    /// Every step received so far, in order.
    pub steps: Vec<Value>,
    artifacts: PathBuf,
}

impl BrowserScript {
    /// Starts `tests/browser/<script>` with `config` (as `BROWSER_CONFIG`;
    /// the harness adds the artifacts dir and the browser path).
    pub fn start(script: &str, config: Value, artifacts: &Path) -> BrowserScript {
        let chromium = chromium();
        let modules = playwright_modules();
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests")
            .join("browser")
            .join(script);
        assert!(path.is_file(), "no browser script {}", path.display());
        let stderr = std::fs::File::create(artifacts.join("node-stderr.log"))
            .expect("create node-stderr.log");
        let mut child = Command::new("node")
            .arg(&path)
            // Its own process group, so that killing it also ends Chromium.
            .process_group(0)
            .env("NODE_PATH", &modules)
            .env("BROWSER_CONFIG", config.to_string())
            .env("BROWSER_ARTIFACTS", artifacts)
            .env("CHROMIUM_PATH", &chromium)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(stderr))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run `node` for the browser tests: {e}"));
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                // Anything that is not a step (a stray console.log) is kept as text.
                let value = serde_json::from_str::<Value>(&line)
                    .ok()
                    .filter(|v| v.get("step").is_some())
                    .unwrap_or_else(|| json!({"step": "stdout", "text": line}));
                if tx.send(value).is_err() {
                    break;
                }
            }
        });
        BrowserScript {
            stdin: child.stdin.take(),
            child,
            lines,
            steps: Vec::new(),
            artifacts: artifacts.to_path_buf(),
        }
    }

    /// The next step line; panics with the script's stderr when it failed,
    /// exited or said nothing within `limit`.
    pub fn next_step(&mut self, limit: Duration) -> Value {
        match self.lines.recv_timeout(limit) {
            Ok(step) => {
                self.steps.push(step.clone());
                if step["step"] == "error" {
                    self.fail(&format!(
                        "the browser script failed: {}",
                        step["message"].as_str().unwrap_or("?")
                    ));
                }
                step
            }
            Err(RecvTimeoutError::Timeout) => {
                self.fail(&format!("no step from the browser script within {limit:?}"))
            }
            Err(RecvTimeoutError::Disconnected) => {
                let status = self.child.wait().ok();
                self.fail(&format!("the browser script exited ({status:?})"))
            }
        }
    }

    /// Skips to the step named `name` (earlier ones stay in [`Self::steps`]).
    pub fn wait_step(&mut self, name: &str, limit: Duration) -> Value {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let step = self.next_step(left.max(Duration::from_millis(1)));
            if step["step"] == name {
                return step;
            }
        }
    }

    /// Sends one JSON line to the script (`await fromTest()` in harness.js).
    pub fn send(&mut self, value: Value) {
        let stdin = self.stdin.as_mut().expect("script stdin open");
        writeln!(stdin, "{value}").expect("write to the browser script");
        stdin.flush().expect("flush the browser script's stdin");
    }

    /// Waits for the script's `done` step and its exit with status 0.
    pub fn finish(mut self, limit: Duration) -> Vec<Value> {
        self.wait_step("done", limit);
        drop(self.stdin.take());
        let status = self.child.wait().expect("wait for the browser script");
        if !status.success() {
            self.fail(&format!("the browser script exited with {status}"));
        }
        std::mem::take(&mut self.steps)
    }

    /// Screenshot paths reported so far (`{"step":"screenshot","path":...}`).
    pub fn screenshots(&self) -> Vec<PathBuf> {
        self.steps
            .iter()
            .filter(|s| s["step"] == "screenshot")
            .filter_map(|s| s["path"].as_str().map(PathBuf::from))
            .collect()
    }

    fn kill(&mut self) {
        if let Ok(pid) = i32::try_from(self.child.id()) {
            // SAFETY: signals the process group we created for the script.
            unsafe { libc::kill(-pid, libc::SIGKILL) };
        }
        let _ = self.child.wait();
    }

    fn fail(&mut self, why: &str) -> ! {
        self.kill();
        let stderr =
            std::fs::read_to_string(self.artifacts.join("node-stderr.log")).unwrap_or_default();
        let tail: String = {
            let lines: Vec<&str> = stderr.lines().collect();
            lines[lines.len().saturating_sub(60)..].join("\n")
        };
        panic!(
            "{why}\nsteps so far: {}\nartifacts: {}\n--- script stderr (last lines) ---\n{tail}",
            serde_json::to_string(&self.steps).unwrap_or_default(),
            self.artifacts.display()
        );
    }
}

impl Drop for BrowserScript {
    fn drop(&mut self) {
        self.kill();
    }
}
