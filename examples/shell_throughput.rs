//! Output throughput of `/shell`: `cat` of a large file through the gateway
//! to a WebSocket client, against the same `cat` read straight from a PTY in
//! this process, in the same run.
//!
//! ```text
//! cargo build --release --bin agentgate
//! cargo run --release --example shell_throughput -- [MEGABYTES]   # default 200
//! ```
//!
//! The example starts its own gateway (the `agentgate` binary next to it in
//! the target dir, on an ephemeral port with a temporary data dir) unless
//! `AGENTGATE_URL` (e.g. `ws://127.0.0.1:3001`) and `AGENTGATE_TOKEN` point
//! it at a running one. It prints one line per path, MB/s of file bytes, and
//! the gateway's peak RSS while streaming.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use actix_codec::Framed;
use awc::ws::{Codec, Frame, Message};
use awc::BoxedSocket;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::io::AsyncReadExt;

const DEFAULT_MB: u64 = 200;
/// Upper bound for one run of either path.
const RUN_LIMIT: Duration = Duration::from_secs(900);

struct Gateway {
    child: Option<Child>,
    url: String,
    token: String,
    _data: Option<tempfile::TempDir>,
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn gateway() -> Gateway {
    if let (Ok(url), Ok(token)) = (
        std::env::var("AGENTGATE_URL"),
        std::env::var("AGENTGATE_TOKEN"),
    ) {
        return Gateway {
            child: None,
            url,
            token,
            _data: None,
        };
    }
    let bin = std::env::current_exe()
        .ok()
        .and_then(|exe| Some(exe.parent()?.parent()?.join("agentgate")))
        .filter(|p| p.exists())
        .expect("agentgate binary not found next to the example: run `cargo build --release --bin agentgate` first");
    let data = tempfile::tempdir().expect("temp dir");
    let mut child = Command::new(&bin)
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(data.path())
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start agentgate serve");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("listening line");
    let addr = line
        .trim()
        .strip_prefix("listening on http://")
        .expect("listening line")
        .to_string();
    let out = Command::new(&bin)
        .args(["token", "--user", "bench", "--data-dir"])
        .arg(data.path())
        .output()
        .expect("agentgate token");
    let token = String::from_utf8(out.stdout)
        .expect("token")
        .trim()
        .to_string();
    Gateway {
        child: Some(child),
        url: format!("ws://{addr}"),
        token,
        _data: Some(data),
    }
}

fn make_file(dir: &Path, megabytes: u64) -> PathBuf {
    let file = dir.join("big.txt");
    let lines = megabytes * 1_000_000 / 9;
    let status = Command::new("sh")
        .arg("-c")
        .arg(format!("seq -w 1 {lines} > '{}'", file.display()))
        .status()
        .expect("seq");
    assert!(status.success());
    file
}

/// `cat` in a PTY read by this process: the ceiling for any terminal gateway.
async fn raw_pty(file: &Path) -> (u64, Duration) {
    let (pty, pts) = pty_process::open().expect("open pty");
    pty.resize(pty_process::Size::new(24, 80)).expect("resize");
    let mut child = pty_process::Command::new("cat")
        .arg(file)
        .spawn(pts)
        .expect("spawn cat");
    let (mut reader, _writer) = pty.into_split();
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0u64;
    let start = Instant::now();
    loop {
        match reader.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => total += n as u64,
        }
    }
    let elapsed = start.elapsed();
    let _ = child.wait().await;
    (total, elapsed)
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
            line.split_whitespace().nth(1)?.parse().ok()
        })
        .unwrap_or(0)
}

/// The same `cat` through `/shell`: bytes of `data` received and the time
/// from `init` to the exit line.
async fn through_shell(gw: &Gateway, project: &Path) -> (u64, Duration, u64) {
    let client = awc::Client::builder()
        .max_http_version(awc::http::Version::HTTP_11)
        .finish();
    let (_, mut ws): (_, Framed<BoxedSocket, Codec>) = client
        .ws(format!("{}/shell?token={}", gw.url, gw.token))
        .max_frame_size(64 * 1024 * 1024)
        .connect()
        .await
        .expect("connect /shell");
    let init = json!({"type": "init", "projectPath": project, "initialCommand": "cat big.txt"});
    let start = Instant::now();
    ws.send(Message::Text(init.to_string().into()))
        .await
        .expect("send init");
    let pid = gw.child.as_ref().map(Child::id);
    let mut total = 0u64;
    let mut peak_rss = 0u64;
    let mut frames = 0u64;
    while let Some(frame) = ws.next().await {
        match frame.expect("frame") {
            Frame::Text(bytes) => {
                let v: Value = serde_json::from_slice(&bytes).expect("json");
                let data = v["data"].as_str().unwrap_or_default();
                if data.contains("Process exited with code") {
                    break;
                }
                total += data.len() as u64;
                frames += 1;
                if frames % 256 == 0 {
                    if let Some(pid) = pid {
                        peak_rss = peak_rss.max(rss_kib(pid));
                    }
                }
            }
            Frame::Ping(p) => ws.send(Message::Pong(p)).await.expect("pong"),
            Frame::Close(_) => break,
            _ => {}
        }
    }
    (total, start.elapsed(), peak_rss)
}

fn mb_per_s(bytes: u64, elapsed: Duration) -> f64 {
    bytes as f64 / 1e6 / elapsed.as_secs_f64().max(1e-9)
}

#[actix_rt::main]
async fn main() {
    let megabytes = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(DEFAULT_MB);
    let project = tempfile::tempdir().expect("temp dir");
    let file = make_file(project.path(), megabytes);
    let size = std::fs::metadata(&file).expect("file").len();
    println!("file: {:.1} MB", size as f64 / 1e6);

    let (raw_bytes, raw_time) = tokio::time::timeout(RUN_LIMIT, raw_pty(&file))
        .await
        .expect("raw PTY run timed out");
    println!(
        "raw PTY read (in-process): {:>8.1} MB/s  ({} bytes in {:.2?})",
        mb_per_s(raw_bytes, raw_time),
        raw_bytes,
        raw_time
    );

    let gw = gateway();
    let (shell_bytes, shell_time, peak_rss) =
        tokio::time::timeout(RUN_LIMIT, through_shell(&gw, project.path()))
            .await
            .expect("/shell run timed out");
    println!(
        "/shell WebSocket client:   {:>8.1} MB/s  ({} bytes in {:.2?}{})",
        mb_per_s(shell_bytes, shell_time),
        shell_bytes,
        shell_time,
        if peak_rss > 0 {
            format!(", gateway peak RSS {} MiB", peak_rss / 1024)
        } else {
            String::new()
        }
    );
    println!(
        "ratio: {:.0}% of the raw PTY rate",
        100.0 * mb_per_s(shell_bytes, shell_time) / mb_per_s(raw_bytes, raw_time)
    );
}
