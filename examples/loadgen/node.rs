//! chat-node: a run read by the WebSocket library Node and browser-like
//! clients use (`ws`, pinned [`WS_VERSION`], installed into
//! `.cache/loadgen-node` on first use), parsing every frame, as the reference
//! web UI's users would. The reader script is `examples/loadgen/node_reader.cjs`.
//! Baseline: the same Node reader parsing the fake CLI's stdout from a pipe.
//! A reader slower than the provider must pause the run, never be closed.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde_json::Value;

use crate::gateway::{status_kib, Bins, Gateway};
use crate::report::{Row, Target, Unit};
use crate::stats::median;
use crate::Ctx;

/// The `ws` package the reader uses (npm).
pub const WS_VERSION: &str = "8.23.0";
/// Peak RSS target for a chat run (as the other chat scenarios).
const RSS_TARGET_MB: f64 = 150.0;

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// `node_modules` with the pinned `ws`, installed with npm if missing.
fn node_modules() -> Result<PathBuf, String> {
    let prefix = repo().join(".cache").join("loadgen-node");
    let modules = prefix.join("node_modules");
    let pkg = modules.join("ws").join("package.json");
    let installed = std::fs::read_to_string(&pkg)
        .ok()
        .and_then(|t| serde_json::from_str::<Value>(&t).ok())
        .is_some_and(|v| v["version"] == WS_VERSION);
    if !installed {
        std::fs::create_dir_all(&prefix).map_err(|e| format!("{}: {e}", prefix.display()))?;
        let status = std::process::Command::new("npm")
            .args([
                "install",
                "--no-audit",
                "--no-fund",
                "--no-save",
                "--prefix",
            ])
            .arg(&prefix)
            .arg(format!("ws@{WS_VERSION}"))
            .status()
            .map_err(|e| format!("npm (needed for the Node reader): {e}"))?;
        if !status.success() {
            return Err(format!("npm install ws@{WS_VERSION} failed: {status}"));
        }
    }
    Ok(modules)
}

fn script() -> PathBuf {
    repo()
        .join("examples")
        .join("loadgen")
        .join("node_reader.cjs")
}

/// What the reader printed.
struct Read {
    deltas: u64,
    gaps: u64,
    duplicates: u64,
    closes4008: u64,
    secs: f64,
    complete: bool,
}

fn parse(out: &[u8]) -> Result<Read, String> {
    let text = String::from_utf8_lossy(out);
    let line = text.lines().last().unwrap_or_default();
    let v: Value = serde_json::from_str(line).map_err(|e| format!("reader said {text:?}: {e}"))?;
    let n = |k: &str| v[k].as_u64().unwrap_or(0);
    Ok(Read {
        deltas: n("deltas"),
        gaps: n("gaps"),
        duplicates: n("duplicates"),
        closes4008: n("closes4008"),
        secs: v["secs"].as_f64().unwrap_or(0.0).max(1e-9),
        complete: v["complete"] == true,
    })
}

/// The fake CLI's stdout piped straight into the Node reader.
fn pipe_baseline(bins: &Bins, modules: &Path, prompt: &str) -> Result<Read, String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let (mut fake, stdin) = crate::chat::spawn_fake(bins, dir.path(), prompt)?;
    let stdout = fake.stdout.take().ok_or("stdout")?;
    let node = std::process::Command::new("node")
        .arg(script())
        .arg("pipe")
        .env("NODE_PATH", modules)
        .stdin(Stdio::from(stdout))
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| format!("spawn node: {e}"))?;
    // The fake exits at the end of its input, once its turn is written.
    drop(stdin);
    let out = node.wait_with_output().map_err(|e| e.to_string())?;
    let _ = fake.kill();
    let _ = fake.wait();
    parse(&out.stdout)
}

/// `pauses` and `paused_ms` of the gateway's last "run completed" log line.
pub fn pauses(gw: &Gateway) -> (f64, f64) {
    // The text log colours its fields: drop the escape sequences first.
    let tail: String = {
        let raw = gw.log_tail();
        let mut out = String::with_capacity(raw.len());
        let mut chars = raw.chars();
        while let Some(c) = chars.next() {
            if c == '\u{1b}' {
                for c in chars.by_ref() {
                    if c.is_ascii_alphabetic() {
                        break;
                    }
                }
            } else {
                out.push(c);
            }
        }
        out
    };
    let Some(line) = tail.lines().rev().find(|l| l.contains("run completed")) else {
        return (0.0, 0.0);
    };
    let field = |key: &str| {
        line.split(key)
            .nth(1)
            .map(|r| {
                r.trim_start_matches(['=', '"', ':', ' '])
                    .chars()
                    .take_while(char::is_ascii_digit)
                    .collect::<String>()
            })
            .and_then(|d| d.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (field("pauses"), field("paused_ms"))
}

pub async fn chat_node(ctx: &Ctx) -> Result<Vec<Row>, String> {
    let events = ctx
        .events
        .unwrap_or(if ctx.quick { 50_000 } else { 200_000 });
    let modules = node_modules()?;
    let prompt = format!("text:{events} size:64");
    let mut base_rates = Vec::new();
    let mut rates = Vec::new();
    let mut peaks = Vec::new();
    let mut pause_counts = Vec::new();
    let mut paused = Vec::new();
    let (mut closes, mut lost, mut complete) = (0, 0, true);
    for _ in 0..ctx.reps {
        let (f, m, p) = (ctx.bins.clone(), modules.clone(), prompt.clone());
        let base = actix_rt::task::spawn_blocking(move || pipe_baseline(&f, &m, &p))
            .await
            .map_err(|e| e.to_string())??;
        base_rates.push(base.deltas as f64 / base.secs);

        let gw = Gateway::start(&ctx.bins, |_, _| {})?;
        let project = tempfile::tempdir().map_err(|e| e.to_string())?;
        let sid = gw.create_session(project.path()).await?;
        let url = gw.ws_url(&format!("/ws?token={}", gw.token));
        let mut child = tokio::process::Command::new("node")
            .arg(script())
            .args(["ws", &url, &sid, &prompt])
            .env("NODE_PATH", &modules)
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("spawn node: {e}"))?;
        let mut stdout = child.stdout.take().ok_or("stdout")?;
        let pid = gw.pid();
        let mut peak = 0;
        let mut out = Vec::new();
        let read = async {
            use tokio::io::AsyncReadExt;
            stdout.read_to_end(&mut out).await
        };
        tokio::pin!(read);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(600);
        loop {
            tokio::select! {
                r = &mut read => { r.map_err(|e| e.to_string())?; break; }
                _ = tokio::time::sleep(Duration::from_millis(20)) => {
                    peak = peak.max(status_kib(pid, "VmRSS:"));
                    if tokio::time::Instant::now() > deadline {
                        return Err("the Node reader did not finish in 600 s".into());
                    }
                }
            }
        }
        let _ = child.wait().await;
        let got = parse(&out)?;
        peaks.push(peak.max(gw.hwm_kib()) as f64 / 1024.0);
        rates.push(got.deltas as f64 / got.secs);
        closes += got.closes4008;
        lost += (events as u64).saturating_sub(got.deltas) + got.gaps + got.duplicates;
        complete &= got.complete;
        // The completion line is logged right after the last frame went out.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let (p, ms) = pauses(&gw);
        pause_counts.push(p);
        paused.push(ms);
    }
    let s = "chat-node";
    Ok(vec![
        Row::new(
            s,
            &format!("events/s read by Node ws (1 run x {events})"),
            median(&rates),
            Unit::PerSec,
            Target::None,
        )
        .baseline(median(&base_rates))
        .note("baseline: the same Node reader parsing the fake CLI's stdout from a pipe"),
        Row::new(
            s,
            "4008 closes",
            closes as f64,
            Unit::Count,
            Target::Equals(0.0),
        ),
        Row::new(
            s,
            "events lost (missing + gaps + duplicates)",
            lost as f64,
            Unit::Count,
            Target::Equals(0.0),
        )
        .also(complete),
        Row::new(
            s,
            "peak RSS",
            median(&peaks),
            Unit::MB,
            Target::Below(RSS_TARGET_MB),
        ),
        Row::new(
            s,
            "run pauses (median)",
            median(&pause_counts),
            Unit::Count,
            Target::None,
        ),
        Row::new(
            s,
            "paused time (median)",
            median(&paused),
            Unit::Millis,
            Target::None,
        ),
    ])
}
