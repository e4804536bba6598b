//! `shell`: `cat` of a large text file through `/shell` to a client, versus
//! the same file read from a raw PTY in this process, in the same run.

use std::io::{BufWriter, Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::json;
use tokio::time::Instant;

use crate::gateway::Gateway;
use crate::report::{Row, Target, Unit};
use crate::stats::median;
use crate::ws::{self, recv, In};
use crate::Ctx;

/// Bytes per PTY read in the baseline.
const READ_CHUNK: usize = 64 * 1024;
/// A URL every this many lines, so auth URL detection has something to find.
const URL_EVERY: usize = 100_000;

/// Writes `bytes` of log-like text lines; returns the number of lines.
fn write_log(path: &Path, bytes: usize) -> Result<usize, String> {
    let file = std::fs::File::create(path).map_err(|e| e.to_string())?;
    let mut w = BufWriter::with_capacity(1 << 20, file);
    let (mut written, mut lines) = (0, 0);
    while written < bytes {
        let line = if lines % URL_EVERY == URL_EVERY - 1 {
            format!("{lines:09} INFO see https://example.com/docs/item/{lines} for details\n")
        } else {
            format!(
                "{lines:09} INFO worker-{} request {} completed in {} ms path=/api/items/{} status=200\n",
                lines % 8,
                lines * 7,
                lines % 97,
                lines % 1000
            )
        };
        w.write_all(line.as_bytes()).map_err(|e| e.to_string())?;
        written += line.len();
        lines += 1;
    }
    w.flush().map_err(|e| e.to_string())?;
    Ok(lines)
}

/// `cat FILE` on a fresh PTY, read here until the child is gone: MB/s of file bytes.
fn raw_pty(file: &Path, file_bytes: usize) -> Result<f64, String> {
    let (mut master, mut slave) = (-1, -1);
    // SAFETY: openpty writes two fds into the out-pointers; null name/termios/winsize are allowed.
    let rc = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(format!("openpty: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: fresh fds owned by nobody else.
    let (master, slave) = unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
    let t0 = std::time::Instant::now();
    let mut child = Command::new("cat")
        .arg(file)
        .stdin(Stdio::from(slave.try_clone().map_err(|e| e.to_string())?))
        .stdout(Stdio::from(slave.try_clone().map_err(|e| e.to_string())?))
        .stderr(Stdio::from(slave))
        .spawn()
        .map_err(|e| format!("spawn cat: {e}"))?;
    let mut master = std::fs::File::from(master);
    let mut buf = vec![0u8; READ_CHUNK];
    let mut got = 0usize;
    // The slave closes with the child: read ends with EIO (bounded by the file size).
    loop {
        match master.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => got += n,
        }
    }
    let elapsed = t0.elapsed().as_secs_f64().max(1e-9);
    let _ = child.wait();
    if got < file_bytes {
        return Err(format!("raw PTY read {got} of {file_bytes} bytes"));
    }
    Ok(file_bytes as f64 / 1e6 / elapsed)
}

/// Counts `\n` escapes in a JSON frame (the file has no backslashes of its own).
fn escaped_newlines(frame: &[u8]) -> usize {
    frame.windows(2).filter(|w| w == b"\\n").count()
}

pub async fn shell(ctx: &Ctx) -> Result<Vec<Row>, String> {
    let s = "shell";
    let bytes = if ctx.quick { 32 << 20 } else { 200 << 20 };
    let reps = if ctx.quick { 1 } else { ctx.reps };
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let file = dir.path().join("big.log");
    let lines = write_log(&file, bytes)?;
    let file_bytes = std::fs::metadata(&file).map_err(|e| e.to_string())?.len() as usize;
    let gw = Gateway::start(&ctx.bins, |_, _| {})?;
    let (mut via, mut raw) = (vec![], vec![]);
    let mut urls = 0;
    for rep in 0..reps {
        let f = file.clone();
        raw.push(
            actix_rt::task::spawn_blocking(move || raw_pty(&f, file_bytes))
                .await
                .map_err(|e| e.to_string())??,
        );
        let mut sock = ws::connect(
            &ctx.client,
            &gw.ws_url(&format!("/shell?token={}", gw.token)),
        )
        .await?;
        // A distinct command per rep: the same one would reattach to the finished key.
        let cmd = format!("cat {} # {rep}", file.display());
        let t0 = Instant::now();
        ws::send_json(
            &mut sock,
            &json!({"type": "init", "projectPath": dir.path(), "isPlainShell": true, "initialCommand": cmd, "cols": 200, "rows": 50}),
        )
        .await?;
        let deadline = Instant::now()
            + Duration::from_secs(30)
            + Duration::from_millis((bytes >> 20) as u64 * 200);
        let mut seen_lines = 0;
        let mut first = true;
        loop {
            match recv(&mut sock, deadline).await? {
                In::Text(t) => {
                    first = false;
                    let text = std::str::from_utf8(&t).unwrap_or("");
                    if text.contains("\"type\":\"auth_url\"") {
                        urls += 1;
                        continue;
                    }
                    seen_lines += escaped_newlines(&t);
                    if text.contains("Process exited with code") {
                        break;
                    }
                }
                In::Binary => {}
                In::Close(_) | In::Ended if first => {
                    return Ok(vec![Row::unavailable(
                        s,
                        "/shell closed at once (not implemented in this build)",
                    )]);
                }
                In::Close(c) => {
                    return Err(format!("/shell closed with {c:?} before the command ended"))
                }
                In::Ended => return Err("/shell ended before the command ended".into()),
            }
        }
        let elapsed = t0.elapsed().as_secs_f64().max(1e-9);
        if seen_lines < lines {
            return Err(format!("/shell delivered {seen_lines} of {lines} lines"));
        }
        via.push(file_bytes as f64 / 1e6 / elapsed);
    }
    Ok(vec![Row::new(
        s,
        &format!("cat {} MB through /shell", file_bytes >> 20),
        median(&via),
        Unit::MBps,
        Target::AtLeast(35.0),
    )
    .baseline(median(&raw))
    .also(median(&via) >= 0.7 * median(&raw))
    .note(format!(
        "baseline: raw PTY read in-process; target also >= 70% of it; auth_url frames: {urls}"
    ))])
}
