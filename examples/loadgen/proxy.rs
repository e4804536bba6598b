//! `proxy`: 64-byte echo round trips and pipelined throughput through
//! `/plugin-ws/echo` versus straight to a second instance of the same echo
//! plugin (`examples/echo_plugin.rs`), in the same run.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::rc::Rc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::sync::Semaphore;
use tokio::time::Instant;

use crate::gateway::Gateway;
use crate::report::{Row, Target, Unit};
use crate::stats::{median, Histogram};
use crate::ws::{self, recv, In, Ws};
use crate::Ctx;

/// Bytes per echo message.
const MSG_BYTES: usize = 64;
/// Messages in flight in the pipelined test.
const WINDOW: usize = 256;
/// How long the gateway's plugin host gets to start the echo plugin.
const PLUGIN_START: Duration = Duration::from_secs(20);

/// An echo plugin we start ourselves for the direct baseline.
struct Direct {
    child: Child,
    port: u16,
}

impl Drop for Direct {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_direct(ctx: &Ctx) -> Result<Direct, String> {
    let mut child = Command::new(&ctx.bins.echo_plugin)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("spawn {}: {e}", ctx.bins.echo_plugin.display()))?;
    let stdout = child.stdout.take().ok_or("stdout")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    let line = rx
        .recv_timeout(PLUGIN_START)
        .map_err(|_| "echo plugin printed no ready line")?;
    let v: serde_json::Value =
        serde_json::from_str(line.trim()).map_err(|e| format!("ready line {line:?}: {e}"))?;
    let port = v["port"].as_u64().ok_or("ready line without port")? as u16;
    Ok(Direct { child, port })
}

fn payload() -> String {
    "e".repeat(MSG_BYTES)
}

/// Sequential round trips: p50/p99 in nanoseconds.
async fn round_trips(ws: &mut Ws, n: usize) -> Result<Histogram, String> {
    let msg = payload();
    let mut hist = Histogram::default();
    let deadline = Instant::now() + Duration::from_secs(60);
    for i in 0..n + n / 10 {
        let t0 = Instant::now();
        ws::send_text(ws, msg.clone()).await?;
        loop {
            match recv(ws, deadline).await? {
                In::Text(_) => break,
                In::Binary => {}
                In::Close(c) => return Err(format!("echo socket closed with {c:?}")),
                In::Ended => return Err("echo socket ended".into()),
            }
        }
        // The first tenth warms up.
        if i >= n / 10 {
            hist.record(t0.elapsed().as_nanos() as u64);
        }
    }
    Ok(hist)
}

/// Pipelined echoes with `WINDOW` in flight: messages per second.
async fn pipelined(ws: Ws, n: usize) -> Result<f64, String> {
    let (mut tx, mut rx) = ws.split();
    let window = Rc::new(Semaphore::new(WINDOW));
    let msg = payload();
    let t0 = Instant::now();
    let deadline = t0 + Duration::from_secs(120);
    let send = {
        let window = window.clone();
        async move {
            for _ in 0..n {
                match window.try_acquire() {
                    Ok(p) => p.forget(),
                    Err(_) => {
                        // Flush what is queued before waiting for echoes.
                        tx.flush().await.map_err(|e| e.to_string())?;
                        let p = tokio::time::timeout_at(deadline, window.acquire())
                            .await
                            .map_err(|_| "pipelined echo timed out".to_string())?
                            .map_err(|e| e.to_string())?;
                        p.forget();
                    }
                }
                tx.feed(awc::ws::Message::Text(msg.clone().into()))
                    .await
                    .map_err(|e| e.to_string())?;
            }
            tx.flush().await.map_err(|e| e.to_string())?;
            Ok::<_, String>(tx)
        }
    };
    let receive = async move {
        let mut got = 0;
        while got < n {
            match tokio::time::timeout_at(deadline, rx.next()).await {
                Err(_) => return Err("pipelined echo timed out".to_string()),
                Ok(Some(Ok(awc::ws::Frame::Text(_)))) => {
                    got += 1;
                    window.add_permits(1);
                }
                Ok(Some(Ok(_))) => {}
                Ok(Some(Err(e))) => return Err(e.to_string()),
                Ok(None) => return Err("echo socket ended".into()),
            }
        }
        Ok(())
    };
    let (sent, received) = futures_util::future::join(send, receive).await;
    drop(sent?);
    received?;
    Ok(n as f64 / t0.elapsed().as_secs_f64().max(1e-9))
}

async fn connect_via_gateway(ctx: &Ctx, gw: &Gateway) -> Result<Ws, String> {
    let url = gw.ws_url(&format!("/plugin-ws/echo?token={}", gw.token));
    let deadline = Instant::now() + PLUGIN_START;
    // The plugin host starts the plugin in the background: 4404 until it is up.
    loop {
        let mut ws = ws::connect(&ctx.client, &url).await?;
        ws::send_text(&mut ws, "ping".into()).await?;
        match recv(&mut ws, deadline).await? {
            In::Text(_) => return Ok(ws),
            In::Close(Some(4404)) | In::Ended if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            In::Close(c) => return Err(format!("/plugin-ws/echo closed with {c:?}")),
            _ => return Err("/plugin-ws/echo did not echo".into()),
        }
    }
}

pub async fn proxy(ctx: &Ctx) -> Result<Vec<Row>, String> {
    let s = "proxy";
    if !ctx.bins.echo_plugin.is_file() {
        return Ok(vec![Row::unavailable(s, "examples/echo_plugin not built")]);
    }
    let (rtts, msgs) = if ctx.quick {
        (2_000, 50_000)
    } else {
        (10_000, 200_000)
    };
    let echo = ctx.bins.echo_plugin.clone();
    let gw = Gateway::start(&ctx.bins, |data, _| {
        let dir = data.join("plugins").join("echo");
        let _ = std::fs::create_dir_all(&dir);
        let _ = std::fs::copy(&echo, dir.join("echo_plugin"));
        let _ = std::fs::write(
            dir.join("manifest.json"),
            r#"{"name":"echo","server":"echo_plugin"}"#,
        );
    })?;
    let direct = start_direct(ctx)?;
    let direct_url = format!("ws://127.0.0.1:{}/ws", direct.port);
    let (mut gw_p50, mut d_p50, mut gw_p99, mut d_p99, mut gw_tp, mut d_tp) =
        (vec![], vec![], vec![], vec![], vec![], vec![]);
    for _ in 0..ctx.reps {
        let mut a = ws::connect(&ctx.client, &direct_url).await?;
        let h = round_trips(&mut a, rtts).await?;
        d_p50.push(h.quantile(0.5) as f64 / 1e3);
        d_p99.push(h.quantile(0.99) as f64 / 1e3);
        let mut b = connect_via_gateway(ctx, &gw).await?;
        let h = round_trips(&mut b, rtts).await?;
        gw_p50.push(h.quantile(0.5) as f64 / 1e3);
        gw_p99.push(h.quantile(0.99) as f64 / 1e3);
        d_tp.push(pipelined(a, msgs).await?);
        gw_tp.push(pipelined(b, msgs).await?);
    }
    let (gp, dp) = (median(&gw_p50), median(&d_p50));
    Ok(vec![
        Row::new(
            s,
            &format!("pipelined echo msgs/s ({MSG_BYTES} B, {WINDOW} in flight)"),
            median(&gw_tp),
            Unit::PerSec,
            Target::RatioAtLeast(0.8),
        )
        .baseline(median(&d_tp)),
        Row::new(s, "round trip p50", gp, Unit::Micros, Target::None).baseline(dp),
        Row::new(
            s,
            "round trip p99",
            median(&gw_p99),
            Unit::Micros,
            Target::None,
        )
        .baseline(median(&d_p99)),
        Row::new(
            s,
            "added p50 latency",
            gp - dp,
            Unit::Micros,
            Target::AtMost(50.0),
        ),
    ])
}
