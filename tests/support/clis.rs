//! Installs pinned provider CLIs from npm into `<repo>/.cache/agent-clis/` on first use, so
//! integration tests can run the REAL binaries offline (only the npm registry is needed, once):
//! `npm install` for packages with dependencies or native parts ([`npm_cli`]), `npm pack` for a
//! plain-JS package that runs with `node` as it is ([`npm_pack`], Claude Code 2.1.100).
//!
//! Safe under concurrency: threads of one test process share one `OnceLock` per CLI; several test
//! processes each install into a private temp dir beside the target and `rename` it into place
//! (atomic on one filesystem); the loser of that race deletes its copy and uses the winner's.
//! Failures panic with a clear message: a test that needs a CLI never silently skips.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime};

/// Pinned Claude Code version (npm `@anthropic-ai/claude-code`); its linux-x64 native binary comes
/// as an optional dependency and runs without node.
pub const CLAUDE_CODE_VERSION: &str = "2.1.330";

/// Longest an `npm install` may take before we kill it and fail (the Claude package is ~360 MB).
const NPM_INSTALL_TIMEOUT: Duration = Duration::from_secs(600);
/// How often we check whether npm has finished.
const NPM_POLL_INTERVAL: Duration = Duration::from_millis(100);
/// Temp install dirs older than this are leftovers of killed test runs and are deleted.
const STALE_TEMP_AGE: Duration = Duration::from_secs(3600);
/// File written into a finished install before it is renamed into place.
const COMPLETE_MARKER: &str = ".install-complete";

/// Path of the pinned real `claude` executable, installing it on first use.
pub fn claude_bin() -> PathBuf {
    npm_cli("@anthropic-ai/claude-code", CLAUDE_CODE_VERSION, "claude")
}

/// Claude Code's last plain-JS build whose `--remote` client speaks the
/// WebSocket protocol of seed 001 and whose permission dialogs work
/// (2.1.112 - 2.1.117 crash on them; 2.1.118 and later use SSE).
pub const CLAUDE_CODE_JS_VERSION: &str = "2.1.100";

/// `cli.js` of Claude Code [`CLAUDE_CODE_JS_VERSION`], fetched on first use
/// with `npm pack` (no install scripts, no dependencies: it runs with `node`).
pub fn claude_js() -> PathBuf {
    npm_pack(
        "@anthropic-ai/claude-code",
        CLAUDE_CODE_JS_VERSION,
        "cli.js",
    )
}

/// Fetches `package@version` with `npm pack` and unpacks it into
/// `<repo>/.cache/agent-clis/pack-<name>-<version>/package/` once; returns
/// `<that>/package/<file>`. Same concurrency rules as [`npm_cli`].
pub fn npm_pack(package: &str, version: &str, file: &str) -> PathBuf {
    once_per_key(format!("pack:{package}@{version}#{file}"), || {
        pack_once(package, version, file)
    })
}

fn pack_once(package: &str, version: &str, file: &str) -> PathBuf {
    let name = package.rsplit('/').next().unwrap_or(package);
    let spec = format!("{package}@{version}");
    let wanted = Path::new("package").join(file);
    let missing = "the package has no such file";
    into_cache(
        &cache_root(),
        &format!("pack-{name}-{version}"),
        &wanted,
        &spec,
        missing,
        |tmp| {
            run_npm(tmp, &["pack", &spec, "--silent"], &spec);
            let tarball = std::fs::read_dir(tmp)
                .ok()
                .and_then(|entries| {
                    entries
                        .flatten()
                        .map(|e| e.path())
                        .find(|p| p.extension().is_some_and(|x| x == "tgz"))
                })
                .unwrap_or_else(|| panic!("`npm pack {spec}` left no .tgz in {}", tmp.display()));
            let status = Command::new("tar")
                .arg("xzf")
                .arg(&tarball)
                .arg("-C")
                .arg(tmp)
                .status()
                .unwrap_or_else(|e| panic!("cannot run tar to unpack {spec}: {e}"));
            assert!(
                status.success(),
                "tar could not unpack {}",
                tarball.display()
            );
            let _ = std::fs::remove_file(&tarball);
        },
    )
}

/// Root of the CLI cache: `<repo>/.cache/agent-clis` (gitignored).
pub fn cache_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join(".cache")
        .join("agent-clis")
}

/// Installs `package@version` with npm into `<repo>/.cache/agent-clis/<bin_name>-<version>/` (once
/// per machine) and returns `<that dir>/node_modules/.bin/<bin_name>`.
///
/// Quick when already installed (one `stat`). Examples: `npm_cli("@openai/codex", "0.169.0", "codex")`,
/// `npm_cli("@google/gemini-cli", "0.61.0", "gemini")`, `npm_cli("opencode-ai", "1.18.33", "opencode")`.
///
/// # Panics
/// When npm is missing, the install fails or times out, or the package has no such bin.
pub fn npm_cli(package: &str, version: &str, bin_name: &str) -> PathBuf {
    once_per_key(format!("{package}@{version}#{bin_name}"), || {
        install_once(package, version, bin_name)
    })
}

/// Runs `init` once per key in this process; other threads asking for the
/// same key wait for it. If it panics the cell stays empty and the next
/// caller tries again (and fails loudly in its own test).
pub fn once_per_key(key: String, init: impl FnOnce() -> PathBuf) -> PathBuf {
    static CELLS: OnceLock<Mutex<HashMap<String, Arc<OnceLock<PathBuf>>>>> = OnceLock::new();
    let cell = {
        let mut cells = CELLS
            .get_or_init(Default::default)
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        Arc::clone(cells.entry(key).or_default())
    };
    cell.get_or_init(init).clone()
}

fn install_once(package: &str, version: &str, bin_name: &str) -> PathBuf {
    let bin = Path::new("node_modules").join(".bin").join(bin_name);
    let missing = "wrong bin name, or the platform's optional native package was not installed";
    install_into(
        &cache_root(),
        &format!("{bin_name}-{version}"),
        package,
        version,
        &bin,
        missing,
    )
}

/// Installs `package@version` with `npm install` into `<root>/<dir_name>/`
/// once per machine (same concurrency rules as [`npm_cli`]) and returns
/// `<that dir>/<wanted>`; e.g. the browser harness's `playwright-core` in
/// `.cache/browser/`.
pub fn npm_install_at(
    root: &Path,
    dir_name: &str,
    package: &str,
    version: &str,
    wanted: &Path,
) -> PathBuf {
    let key = format!("{}/{dir_name}:{package}@{version}", root.display());
    once_per_key(key, || {
        install_into(
            root,
            dir_name,
            package,
            version,
            wanted,
            "the package has no such file",
        )
    })
}

fn install_into(
    root: &Path,
    dir_name: &str,
    package: &str,
    version: &str,
    wanted: &Path,
    missing: &str,
) -> PathBuf {
    let spec = format!("{package}@{version}");
    into_cache(root, dir_name, wanted, &spec, missing, |tmp| {
        let manifest = serde_json::json!({
            "name": format!("cache-{dir_name}"),
            "private": true,
            "dependencies": { package: version },
        });
        std::fs::write(tmp.join("package.json"), manifest.to_string())
            .unwrap_or_else(|e| panic!("cannot write package.json in {}: {e}", tmp.display()));
        run_npm_install(tmp, package, version);
    })
}

/// Fills `<root>/<dir_name>/` once per machine: `fill` works in a private
/// temp dir beside it, which is renamed into place (atomic; the loser of a
/// race between processes deletes its copy and uses the winner's). Returns
/// the path of `wanted` inside it; panics when `fill` did not produce it
/// (`missing` says why that may be).
fn into_cache(
    root: &Path,
    dir_name: &str,
    wanted: &Path,
    spec: &str,
    missing: &str,
    fill: impl FnOnce(&Path),
) -> PathBuf {
    let target = root.join(dir_name);
    let path = target.join(wanted);
    if is_complete(&target, &path) {
        return path;
    }
    std::fs::create_dir_all(root)
        .unwrap_or_else(|e| panic!("cannot create cache dir {}: {e}", root.display()));
    remove_stale_temps(root, dir_name);

    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let tmp = root.join(format!(".tmp-{dir_name}-{}-{nanos}", std::process::id()));
    std::fs::create_dir_all(&tmp)
        .unwrap_or_else(|e| panic!("cannot create temp install dir {}: {e}", tmp.display()));
    fill(&tmp);
    if !tmp.join(wanted).exists() {
        let _ = std::fs::remove_dir_all(&tmp);
        panic!(
            "{spec} was fetched but {} does not exist ({missing})",
            tmp.join(wanted).display()
        );
    }
    std::fs::write(tmp.join(COMPLETE_MARKER), format!("{spec}\n"))
        .unwrap_or_else(|e| panic!("cannot write install marker in {}: {e}", tmp.display()));
    if let Err(e) = std::fs::rename(&tmp, &target) {
        // Another process won the race (target now exists and is complete): use its copy.
        let _ = std::fs::remove_dir_all(&tmp);
        if !is_complete(&target, &path) {
            panic!(
                "cannot move {spec} into {}: {e} (an incomplete directory is in the way? \
                 delete it and rerun)",
                target.display()
            );
        }
    }
    path
}

fn is_complete(dir: &Path, bin: &Path) -> bool {
    dir.join(COMPLETE_MARKER).is_file() && bin.exists()
}

fn run_npm_install(dir: &Path, package: &str, version: &str) {
    run_npm(
        dir,
        &["install", "--no-audit", "--no-fund", "--loglevel=error"],
        &format!("{package}@{version}"),
    );
}

/// Runs `npm <args>` in `dir` (bounded by [`NPM_INSTALL_TIMEOUT`]); panics
/// with npm's output when it fails. `spec` names the package in messages.
fn run_npm(dir: &Path, args: &[&str], spec: &str) {
    let mut child = Command::new("npm")
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        // npm output is small; it goes to files so a full pipe can never block npm.
        .stdout(log_file(dir, "npm-stdout.log"))
        .stderr(log_file(dir, "npm-stderr.log"))
        .spawn()
        .unwrap_or_else(|e| {
            let _ = std::fs::remove_dir_all(dir);
            panic!(
                "cannot run `npm` for {spec} (the integration tests need it): {e}. \
                 Install Node.js + npm (node >= 20) and make sure `npm` is on PATH."
            )
        });
    let started = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if started.elapsed() > NPM_INSTALL_TIMEOUT => {
                let _ = child.kill();
                let _ = child.wait();
                let log = read_logs(dir);
                let _ = std::fs::remove_dir_all(dir);
                panic!(
                    "`npm {}` for {spec} did not finish within {NPM_INSTALL_TIMEOUT:?} \
                     (registry unreachable?)\n{log}",
                    args.join(" ")
                );
            }
            Ok(None) => std::thread::sleep(NPM_POLL_INTERVAL),
            Err(e) => panic!("waiting for npm failed: {e}"),
        }
    };
    if !status.success() {
        let log = read_logs(dir);
        let _ = std::fs::remove_dir_all(dir);
        panic!(
            "`npm {}` for {spec} failed ({status}):\n{log}",
            args.join(" ")
        );
    }
}

fn log_file(dir: &Path, name: &str) -> Stdio {
    match std::fs::File::create(dir.join(name)) {
        Ok(f) => Stdio::from(f),
        Err(_) => Stdio::null(),
    }
}

fn read_logs(dir: &Path) -> String {
    let read = |n: &str| std::fs::read_to_string(dir.join(n)).unwrap_or_default();
    format!(
        "--- npm stdout ---\n{}\n--- npm stderr ---\n{}",
        read("npm-stdout.log"),
        read("npm-stderr.log")
    )
}

/// Deletes `.tmp-<dir_name>-*` dirs left by killed runs; young ones may belong to a live install.
fn remove_stale_temps(root: &Path, dir_name: &str) {
    let prefix = format!(".tmp-{dir_name}-");
    let Ok(entries) = std::fs::read_dir(root) else {
        return;
    };
    for entry in entries.flatten() {
        if !entry.file_name().to_string_lossy().starts_with(&prefix) {
            continue;
        }
        let old = entry
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age > STALE_TEMP_AGE);
        if old {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}
