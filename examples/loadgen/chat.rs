//! Chat scenarios (`/ws`): chat-one, chat-many, fanout, replay, idle,
//! slow-client (never reads), slow-reader (ten times slower), and the same-run baseline (the fake provider piped straight
//! into a reader).

use std::cell::{Cell, RefCell};
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::rc::Rc;
use std::time::Duration;

use futures_util::future::join_all;
use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio::time::Instant;

use agentgate_actors::chat::run_registry::{
    DELIVERY_MAX_BYTES, REPLAY_MAX_BYTES, REPLAY_STRETCH_BYTES, SUBSCRIBER_HIGH_WATER,
};
// The argv the gateway's Claude adapter passes (PROTOCOL.md 4.1); the fake ignores all but `--resume`.
use agentgate_actors::provider::claude::STREAM_ARGS as CLAUDE_ARGS;

use crate::fan_read::{self, FanSock};
use crate::gateway::{Bins, Gateway};
use crate::raw_ws::{RawIn, RawWs};
use crate::report::{Row, Target, Unit};
use crate::stats::{median, Histogram, SeqCheck};
use crate::ws::{self, recv_text, scan, sequenced, In, Ws};
use crate::Ctx;

/// Payload bytes per chat event (the events are small text deltas).
const EVENT_BYTES: usize = 64;
/// Descriptors the gateway needs beside its sockets (database, pipes, listeners).
const IDLE_FD_RESERVE: u64 = 200;
/// Sockets connected at once when opening many (the gateway's accept backlog is larger).
const CONNECT_PARALLEL: usize = 128;
/// 4008 closes one reader recovers from before the run counts as failed.
const MAX_REJOINS: usize = 20;
/// Peak RSS target for the chat scenarios (issue 6).
const RSS_TARGET_MB: f64 = 150.0;

pub(crate) fn mb(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64().max(1e-9)
}

pub(crate) fn ms(nanos: u64) -> f64 {
    nanos as f64 / 1e6
}

/// A per-run deadline generous enough for a slow machine, never unbounded
/// (twenty times longer for a gateway under `LOADGEN_GATEWAY_WRAP`, e.g.
/// callgrind).
fn run_deadline(events: usize) -> Instant {
    let wrapped = std::env::var_os("LOADGEN_GATEWAY_WRAP").is_some_and(|w| !w.is_empty());
    let slow = if wrapped { 20 } else { 1 };
    Instant::now() + (Duration::from_secs(60) + Duration::from_micros(events as u64 * 200)) * slow
}

/// A project dir and a session in it.
pub(crate) async fn session(gw: &Gateway) -> Result<(tempfile::TempDir, String), String> {
    let project = tempfile::tempdir().map_err(|e| e.to_string())?;
    let id = gw.create_session(project.path()).await?;
    Ok((project, id))
}

pub(crate) async fn chat_socket(ctx: &Ctx, gw: &Gateway) -> Result<Ws, String> {
    ws::connect(&ctx.client, &gw.ws_url(&format!("/ws?token={}", gw.token))).await
}

/// Opens `n` sockets, `CONNECT_PARALLEL` at a time.
async fn open_many(ctx: &Ctx, gw: &Gateway, n: usize) -> Result<Vec<Ws>, String> {
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let batch = (n - out.len()).min(CONNECT_PARALLEL);
        let opened = join_all((0..batch).map(|_| chat_socket(ctx, gw))).await;
        for s in opened {
            out.push(s?);
        }
    }
    Ok(out)
}

async fn send_chat(ws: &mut Ws, session: &str, prompt: &str) -> Result<(), String> {
    ws::send_json(
        ws,
        &json!({"type": "chat.send", "sessionId": session, "content": prompt}),
    )
    .await
}

/// What one socket saw of one run.
#[derive(Default)]
pub(crate) struct RunSeen {
    pub deltas: usize,
    first: Option<Instant>,
    last: Option<Instant>,
    pub hist: Histogram,
    /// Latencies of the deltas in the caller's steady-state window.
    steady: Histogram,
    /// 4008 closes recovered by reconnecting and resubscribing.
    rejoins: usize,
}

/// How a reader recovers from a 4008 close, as a real client does: a new
/// socket subscribes with the last seq it saw and the replay continues.
struct Rejoin<'a> {
    ctx: &'a Ctx,
    gw: &'a Gateway,
    session: &'a str,
}

impl RunSeen {
    fn span(&self) -> Option<(Instant, Instant)> {
        Some((self.first?, self.last?))
    }

    /// Counts a delta read now; its latency (if stamped) goes into `hist`
    /// and is returned.
    fn delta(&mut self, ts: Option<u64>) -> Option<u64> {
        let now = Instant::now();
        self.first.get_or_insert(now);
        self.last = Some(now);
        self.deltas += 1;
        let latency = ws::unix_nanos().saturating_sub(ts?);
        self.hist.record(latency);
        Some(latency)
    }
}

/// Reads one socket until the run's `complete`, checking seq continuity.
pub(crate) async fn read_run(
    ws: &mut Ws,
    seqc: &mut SeqCheck,
    deadline: Instant,
) -> Result<RunSeen, String> {
    read_run_after(ws, seqc, deadline, 0..=0, None).await
}

/// Same, with `steady` the deltas (1-based) whose latency also goes into
/// `RunSeen::steady` (the rest of a run's start and end excluded).
async fn read_run_after(
    ws: &mut Ws,
    seqc: &mut SeqCheck,
    deadline: Instant,
    steady: std::ops::RangeInclusive<usize>,
    rejoin: Option<&Rejoin<'_>>,
) -> Result<RunSeen, String> {
    let mut seen = RunSeen::default();
    loop {
        let frame = match ws::recv(ws, deadline).await? {
            In::Text(b) => b,
            In::Binary => continue,
            In::Close(Some(4008)) if rejoin.is_some() && seen.rejoins < MAX_REJOINS => {
                let Some(r) = rejoin else { continue };
                // A resubscriber still too far behind a live run is closed
                // again before its ack: it retries after a growing delay,
                // as a client's reconnect does, and catches up at the latest
                // once the run completes.
                loop {
                    seen.rejoins += 1;
                    *ws = chat_socket(r.ctx, r.gw).await?;
                    match send_subscribe(ws, r.session, seqc.last()).await {
                        Ok(_) => break,
                        Err(e) if e.contains("4008") && seen.rejoins < MAX_REJOINS => {
                            let backoff = Duration::from_millis(100 * seen.rejoins as u64);
                            actix_rt::time::sleep(backoff).await;
                        }
                        Err(e) => return Err(format!("resubscribing after 4008: {e}")),
                    }
                }
                continue;
            }
            In::Close(code) => return Err(format!("socket closed with {code:?}")),
            In::Ended => return Err("socket ended".into()),
        };
        let s = scan(&frame);
        if s.kind == "protocol_error" {
            return Err(format!(
                "protocol_error: {}",
                String::from_utf8_lossy(&frame)
            ));
        }
        let Some(seq) = s.seq else { continue };
        seqc.see(seq);
        match s.kind {
            "stream_delta" => {
                if let Some(latency) = seen.delta(s.ts) {
                    if steady.contains(&seen.deltas) {
                        seen.steady.record(latency);
                    }
                }
            }
            "complete" => return Ok(seen),
            "error" => return Err(format!("run error: {}", String::from_utf8_lossy(&frame))),
            _ => {}
        }
    }
}

/// Reads until a frame of `kind`; returns it.
async fn until_kind(ws: &mut Ws, kind: &str, deadline: Instant) -> Result<String, String> {
    loop {
        let frame = recv_text(ws, deadline).await?;
        let s = scan(&frame);
        if s.kind == kind {
            return Ok(String::from_utf8_lossy(&frame).into_owned());
        }
        if s.kind == "protocol_error" {
            return Err(format!(
                "protocol_error: {}",
                String::from_utf8_lossy(&frame)
            ));
        }
    }
}

/// Events per second over the span from the first to the last delta.
fn rate(count: usize, span: Option<(Instant, Instant)>) -> f64 {
    match span {
        Some((a, b)) if count > 1 => (count - 1) as f64 / secs(b - a),
        _ => 0.0,
    }
}

fn merge_span(
    a: Option<(Instant, Instant)>,
    b: Option<(Instant, Instant)>,
) -> Option<(Instant, Instant)> {
    match (a, b) {
        (Some((a0, a1)), Some((b0, b1))) => Some((a0.min(b0), a1.max(b1))),
        (x, None) | (None, x) => x,
    }
}

// ---------------------------------------------------------------- baseline

/// The fake provider piped straight into a reader: its lines/s is the
/// ceiling any gateway could reach on this machine, and its latency the
/// pipe's own.
pub struct PipeResult {
    pub lines_per_sec: f64,
    pub hist: Histogram,
}

/// First and last line times of a pipe reader.
type PipeSpan = Option<(std::time::Instant, std::time::Instant)>;

/// The fake CLI started in `dir` as the gateway starts it, with the user
/// turn `prompt` written to its stdin (kept open, as the gateway does).
pub fn spawn_fake(
    bins: &Bins,
    dir: &std::path::Path,
    prompt: &str,
) -> Result<(std::process::Child, std::process::ChildStdin), String> {
    let mut child = Command::new(&bins.fake_claude)
        .args(CLAUDE_ARGS)
        .current_dir(dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("spawn fake_claude: {e}"))?;
    let mut stdin = child.stdin.take().ok_or("stdin")?;
    let user = json!({"type": "user", "message": {"role": "user", "content": prompt}});
    writeln!(stdin, "{user}").map_err(|e| e.to_string())?;
    stdin.flush().map_err(|e| e.to_string())?;
    Ok((child, stdin))
}

/// `steady`: the deltas (1-based) whose latency is recorded; all when `None`.
fn pipe_one(
    bins: &Bins,
    prompt: &str,
    steady: Option<std::ops::RangeInclusive<usize>>,
) -> Result<(usize, PipeSpan, Histogram), String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let (mut child, stdin) = spawn_fake(bins, dir.path(), prompt)?;
    let stdout = child.stdout.take().ok_or("stdout")?;
    let mut reader = BufReader::with_capacity(64 * 1024, stdout);
    let mut line = Vec::with_capacity(4096);
    let (mut count, mut first, mut last) = (0usize, None, None);
    let mut hist = Histogram::default();
    loop {
        line.clear();
        match reader.read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        let text = String::from_utf8_lossy(&line);
        if text.contains("\"text_delta\"") {
            let now = std::time::Instant::now();
            first.get_or_insert(now);
            last = Some(now);
            count += 1;
            let recorded = steady.as_ref().is_none_or(|r| r.contains(&count));
            if let Some(i) = text.find("\"text\":\"t=").filter(|_| recorded) {
                if let Some(ts) = text.get(i + 10..).and_then(|r| {
                    let end = r
                        .bytes()
                        .position(|b| !b.is_ascii_digit())
                        .unwrap_or(r.len());
                    r.get(..end)?.parse::<u64>().ok()
                }) {
                    hist.record(ws::unix_nanos().saturating_sub(ts));
                }
            }
        } else if text.contains("\"type\":\"result\"") {
            break;
        }
    }
    drop(stdin);
    let _ = child.kill();
    let _ = child.wait();
    Ok((count, first.zip(last), hist))
}

/// `runs` fake providers at once, each read by its own thread; latencies
/// of the `steady` deltas (all when `None`).
pub async fn pipe_baseline(
    bins: &Bins,
    prompt: &str,
    runs: usize,
    steady: Option<std::ops::RangeInclusive<usize>>,
) -> Result<PipeResult, String> {
    let bins = bins.clone();
    let prompt = prompt.to_string();
    actix_rt::task::spawn_blocking(move || {
        let handles: Vec<_> = (0..runs)
            .map(|_| {
                let (b, p, st) = (bins.clone(), prompt.clone(), steady.clone());
                std::thread::spawn(move || pipe_one(&b, &p, st))
            })
            .collect();
        let mut total = 0;
        let mut span: PipeSpan = None;
        let mut hist = Histogram::default();
        for h in handles {
            let (count, s, hi) = h
                .join()
                .map_err(|_| "baseline reader panicked".to_string())??;
            total += count;
            hist.merge(&hi);
            span = match (span, s) {
                (Some((a0, a1)), Some((b0, b1))) => Some((a0.min(b0), a1.max(b1))),
                (x, None) | (None, x) => x,
            };
        }
        let lines_per_sec = match span {
            Some((a, b)) if total > 1 => (total - 1) as f64 / (b - a).as_secs_f64().max(1e-9),
            _ => 0.0,
        };
        Ok(PipeResult {
            lines_per_sec,
            hist,
        })
    })
    .await
    .map_err(|e| format!("baseline task: {e}"))?
}

// ---------------------------------------------------------------- chat-one

pub async fn chat_one(ctx: &Ctx) -> Result<Vec<Row>, String> {
    let events = ctx
        .events
        .unwrap_or(if ctx.quick { 50_000 } else { 200_000 });
    // `LOADGEN_CHAT_ONE_EXTRA="delay_ms:1"` paces the fake CLI (one event per
    // batch: the per-batch cost under callgrind, which otherwise sees full pipes).
    let extra = std::env::var("LOADGEN_CHAT_ONE_EXTRA").unwrap_or_default();
    let prompt = format!("text:{events} size:{EVENT_BYTES} ts {extra}");
    let gw = Gateway::start(&ctx.bins, |_, _| {})?;
    let (_project, sid) = session(&gw).await?;
    let url = gw.ws_url(&format!("/ws?token={}", gw.token));
    // The reader is a blocking client on its own thread, as the baseline's
    // pipe reader is (see raw_ws.rs); it moves to that thread and back per run.
    let mut reader = Some(RawReader {
        ws: RawWs::connect(&url)?,
        url,
        seqc: SeqCheck::starting_after(0),
    });
    let (mut rates, mut base_rates, mut p50, mut p99, mut bp50, mut bp99) =
        (vec![], vec![], vec![], vec![], vec![], vec![]);
    let mut max_lat = 0u64;
    let mut complete = true;
    let mut rejoins = 0;
    let cpu0 = gw.cpu_secs();
    for _ in 0..ctx.reps {
        let base = pipe_baseline(&ctx.bins, &prompt, 1, None).await?;
        base_rates.push(base.lines_per_sec);
        bp50.push(ms(base.hist.quantile(0.5)));
        bp99.push(ms(base.hist.quantile(0.99)));
        let mut r = reader.take().ok_or("reader lost")?;
        let (sid, prompt, deadline) = (sid.clone(), prompt.clone(), run_deadline(events));
        let (r, seen) = actix_rt::task::spawn_blocking(move || {
            let seen = r.run(&sid, &prompt, deadline);
            (r, seen)
        })
        .await
        .map_err(|e| format!("reader thread: {e}"))?;
        let seen = seen?;
        reader = Some(r);
        rejoins += seen.rejoins;
        complete &= seen.deltas == events;
        rates.push(rate(seen.deltas, seen.span()));
        p50.push(ms(seen.hist.quantile(0.5)));
        p99.push(ms(seen.hist.quantile(0.99)));
        max_lat = max_lat.max(seen.hist.max());
    }
    let seqc = reader.map(|r| r.seqc).unwrap_or_default();
    let cpu = gw.cpu_secs() - cpu0;
    let s = "chat-one";
    let per_event_us = cpu * 1e6 / (events * ctx.reps) as f64;
    Ok(vec![
        Row::new(
            s,
            &format!("events/s (1 run x {events})"),
            median(&rates),
            Unit::PerSec,
            // Issue 16: within 20% of the raw pipe.
            Target::RatioAtLeast(0.8),
        )
        .baseline(median(&base_rates))
        .note(format!("gateway CPU {per_event_us:.1} us/event")),
        Row::new(s, "p50 latency", median(&p50), Unit::Millis, Target::None)
            .baseline(median(&bp50)),
        Row::new(s, "p99 latency", median(&p99), Unit::Millis, Target::None)
            .baseline(median(&bp99)),
        Row::new(s, "max latency", ms(max_lat), Unit::Millis, Target::None),
        Row::new(
            s,
            "peak RSS",
            mb(gw.hwm_kib()),
            Unit::MB,
            Target::Below(RSS_TARGET_MB),
        ),
        Row::new(
            s,
            "4008 closes of a reading client",
            rejoins as f64,
            Unit::Count,
            Target::None,
        )
        .note("each recovered by resubscribing with its lastSeq (counted in seq gaps if not)"),
        Row::new(
            s,
            "seq gaps",
            seqc.gaps as f64,
            Unit::Count,
            Target::Equals(0.0),
        )
        .also(complete)
        .note(if complete { "" } else { "events missing" }),
    ])
}

/// chat-one's reader: a raw socket and its seq check, with the 4008 recovery
/// of `read_run_after` (a new socket resubscribing with its last seq).
struct RawReader {
    ws: RawWs,
    url: String,
    seqc: SeqCheck,
}

impl RawReader {
    /// Sends the turn and reads until the run's `complete`.
    fn run(&mut self, session: &str, prompt: &str, deadline: Instant) -> Result<RunSeen, String> {
        let send = json!({"type": "chat.send", "sessionId": session, "content": prompt});
        self.ws.send_text(&send.to_string())?;
        let deadline = deadline.into_std();
        let mut seen = RunSeen::default();
        loop {
            let frame = match self.ws.next(deadline)? {
                RawIn::Text(b) => b,
                RawIn::Binary => continue,
                RawIn::Close(Some(4008)) if seen.rejoins < MAX_REJOINS => {
                    seen.rejoins += 1;
                    self.ws = RawWs::connect(&self.url)?;
                    let sub = json!({"type": "chat.subscribe", "sessions": [{"sessionId": session, "lastSeq": self.seqc.last()}]});
                    self.ws.send_text(&sub.to_string())?;
                    continue;
                }
                RawIn::Close(code) => return Err(format!("socket closed with {code:?}")),
                RawIn::Ended => return Err("socket ended".into()),
            };
            let Some((seq, s)) = sequenced(frame)? else {
                continue;
            };
            self.seqc.see(seq);
            match s.kind {
                "stream_delta" => {
                    seen.delta(s.ts);
                }
                "complete" => return Ok(seen),
                "error" => return Err(format!("run error: {}", String::from_utf8_lossy(frame))),
                _ => {}
            }
        }
    }
}

// ---------------------------------------------------------------- chat-many

/// Runs `prompt` once on every (socket, session) pair at the same time.
/// What the sockets of `many_runs` saw together.
struct ManySeen {
    total: usize,
    span: Option<(Instant, Instant)>,
    hist: Histogram,
    steady: Histogram,
    complete: bool,
    rejoins: usize,
}

async fn many_runs(
    ctx: &Ctx,
    gw: &Gateway,
    socks: &mut [(Ws, String, SeqCheck)],
    prompt: &str,
    events: usize,
    steady: std::ops::RangeInclusive<usize>,
) -> Result<ManySeen, String> {
    let deadline = run_deadline(events * 4);
    for (ws, sid, _) in socks.iter_mut() {
        send_chat(ws, sid, prompt).await?;
    }
    let results = join_all(socks.iter_mut().map(|(ws, sid, seqc)| {
        let steady = steady.clone();
        async move {
            let rejoin = Rejoin {
                ctx,
                gw,
                session: sid,
            };
            read_run_after(ws, seqc, deadline, steady, Some(&rejoin)).await
        }
    }))
    .await;
    let mut all = ManySeen {
        total: 0,
        span: None,
        hist: Histogram::default(),
        steady: Histogram::default(),
        complete: true,
        rejoins: 0,
    };
    for r in results {
        let seen = r?;
        all.complete &= seen.deltas == events;
        all.total += seen.deltas;
        all.span = merge_span(all.span, seen.span());
        all.hist.merge(&seen.hist);
        all.steady.merge(&seen.steady);
        all.rejoins += seen.rejoins;
    }
    Ok(all)
}

/// The gateway's own delivery latency (`agentgate_delivery_latency_seconds`:
/// from reading a CLI's line to writing its frame to the socket) as
/// cumulative counts by upper bound, from its `/metrics` on `port`.
async fn gateway_latency(port: u16) -> Result<Vec<(f64, u64)>, String> {
    let mut res = ws::client()
        .get(format!("http://127.0.0.1:{port}/metrics"))
        .send()
        .await
        .map_err(|e| format!("GET /metrics: {e}"))?;
    let body = res
        .body()
        .limit(4 << 20)
        .await
        .map_err(|e| format!("GET /metrics body: {e}"))?;
    let text = String::from_utf8_lossy(&body);
    let lines = text.lines().map(|l| Ok(l.to_string()));
    let scrape = prometheus_parse::Scrape::parse(lines).map_err(|e| format!("/metrics: {e}"))?;
    let buckets: Vec<(f64, u64)> = scrape
        .samples
        .into_iter()
        .filter(|s| s.metric == "agentgate_delivery_latency_seconds")
        .find_map(|s| match s.value {
            prometheus_parse::Value::Histogram(b) => Some(b),
            _ => None,
        })
        .unwrap_or_default()
        .iter()
        .map(|b| (b.less_than, b.count as u64))
        .collect();
    if buckets.is_empty() {
        return Err("no agentgate_delivery_latency_seconds in /metrics".into());
    }
    Ok(buckets)
}

/// Of the observations between two scrapes, the share above `secs` (an
/// upper bound of the gateway's buckets).
fn share_above(before: &[(f64, u64)], after: &[(f64, u64)], secs: f64) -> f64 {
    let count = |b: &[(f64, u64)], le: f64| {
        b.iter()
            .find(|(l, _)| (*l - le).abs() < 1e-9 || (l.is_infinite() && le.is_infinite()))
            .map_or(0, |(_, c)| *c)
    };
    let total = count(after, f64::INFINITY) - count(before, f64::INFINITY);
    let below = count(after, secs) - count(before, secs);
    if total == 0 {
        return 0.0;
    }
    (total - below) as f64 / total as f64
}

/// A free port on 127.0.0.1 for the gateway's metrics listener.
fn free_port() -> Result<u16, String> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| format!("bind: {e}"))?;
    l.local_addr()
        .map(|a| a.port())
        .map_err(|e| format!("bind: {e}"))
}

pub async fn chat_many(ctx: &Ctx) -> Result<Vec<Row>, String> {
    let runs = 100;
    let events = if ctx.quick { 1_000 } else { 2_000 };
    // 100 runs x 100 events/s = the 10,000 events/s offered load.
    let (paced_events, delay_ms) = (if ctx.quick { 200 } else { 500 }, 10);
    // Steady state: the first and last 0.5 s of the paced runs (100 processes
    // starting, then exiting, at once on 2 cores) are reported apart.
    let steady = 51..=paced_events - 50;
    let prompt = format!("text:{events} size:{EVENT_BYTES} ts");
    let paced = format!("text:{paced_events} size:{EVENT_BYTES} ts delay_ms:{delay_ms}");
    // Its metrics tell which part of the latency is the gateway's own.
    let metrics = free_port()?;
    let gw = Gateway::start(&ctx.bins, |_, cmd| {
        cmd.arg("--metrics-listen")
            .arg(format!("127.0.0.1:{metrics}"));
    })?;
    let mut projects = Vec::new();
    let mut socks = Vec::new();
    let sockets = open_many(ctx, &gw, runs).await?;
    for ws in sockets {
        let (p, sid) = session(&gw).await?;
        projects.push(p);
        socks.push((ws, sid, SeqCheck::starting_after(0)));
    }
    let (mut rates, mut base_rates, mut p50, mut p99) = (vec![], vec![], vec![], vec![]);
    let (mut paced_p50, mut paced_p99, mut offered) = (vec![], vec![], vec![]);
    let mut paced_all_p99 = vec![];
    let (mut paced_base_p99, mut paced_base_late_25) = (vec![], vec![]);
    // Shares of the paced events later than 1 ms and 2.5 ms (the gateway's
    // bucket bounds): end to end, and inside the gateway.
    let (mut late_1, mut late_25, mut gw_late_1, mut gw_late_25) = (vec![], vec![], vec![], vec![]);
    let mut max_lat = 0;
    let mut complete = true;
    let mut rejoins = 0;
    for _ in 0..ctx.reps {
        let base = pipe_baseline(&ctx.bins, &prompt, runs, None).await?;
        base_rates.push(base.lines_per_sec);
        let m = many_runs(ctx, &gw, &mut socks, &prompt, events, 0..=0).await?;
        complete &= m.complete;
        rejoins += m.rejoins;
        rates.push(rate(m.total, m.span));
        p50.push(ms(m.hist.quantile(0.5)));
        p99.push(ms(m.hist.quantile(0.99)));
        max_lat = max_lat.max(m.hist.max());
        // The same paced CLIs piped into a thread each: the machine's own
        // latency at this load, with no gateway and no socket.
        let pbase = pipe_baseline(&ctx.bins, &paced, runs, Some(steady.clone())).await?;
        paced_base_p99.push(ms(pbase.hist.quantile(0.99)));
        paced_base_late_25.push(100.0 * pbase.hist.share_above(2_500_000));
        let before = gateway_latency(metrics).await?;
        let m = many_runs(ctx, &gw, &mut socks, &paced, paced_events, steady.clone()).await?;
        let after = gateway_latency(metrics).await?;
        late_1.push(100.0 * m.hist.share_above(1_000_000));
        late_25.push(100.0 * m.hist.share_above(2_500_000));
        gw_late_1.push(100.0 * share_above(&before, &after, 0.001));
        gw_late_25.push(100.0 * share_above(&before, &after, 0.0025));
        complete &= m.complete;
        rejoins += m.rejoins;
        offered.push(rate(m.total, m.span));
        paced_p50.push(ms(m.steady.quantile(0.5)));
        paced_p99.push(ms(m.steady.quantile(0.99)));
        paced_all_p99.push(ms(m.hist.quantile(0.99)));
    }
    let gaps: u64 = socks.iter().map(|(_, _, s)| s.gaps).sum();
    let s = "chat-many";
    Ok(vec![
        Row::new(s, &format!("events/s ({runs} runs x {events})"), median(&rates), Unit::PerSec, Target::AtLeast(150_000.0))
            .baseline(median(&base_rates))
            .note("baseline: 100 fake providers piped into 100 readers"),
        Row::new(s, "p50 latency at full speed", median(&p50), Unit::Millis, Target::None),
        Row::new(s, "p99 latency at full speed", median(&p99), Unit::Millis, Target::None),
        Row::new(s, "max latency at full speed", ms(max_lat), Unit::Millis, Target::None),
        Row::new(s, "p50 latency at 10k events/s", median(&paced_p50), Unit::Millis, Target::None),
        Row::new(s, "p99 latency at 10k events/s", median(&paced_p99), Unit::Millis, Target::Below(2.0))
            .baseline(median(&paced_base_p99))
            .note(format!("offered {:.0} events/s ({runs} runs, one event every {delay_ms} ms each); steady state: each run's first and last 50 events are left out; baseline: the same paced CLIs piped into a thread each", median(&offered))),
        Row::new(s, "p99 at 10k events/s incl. run start/end", median(&paced_all_p99), Unit::Millis, Target::None)
            .note("100 CLI processes start and exit at the same moment on 2 cores"),
        Row::new(s, "% of them later than 1 ms (incl. start/end)", median(&late_1), Unit::Percent, Target::None)
            .note(format!("{:.2}% inside the gateway (from reading the CLI's line to writing the frame: its agentgate_delivery_latency_seconds)", median(&gw_late_1))),
        Row::new(s, "% of them later than 2.5 ms (incl. start/end)", median(&late_25), Unit::Percent, Target::None)
            .note(format!("{:.2}% inside the gateway; the rest is the CLI's pipe, the kernel and the reader; {:.2}% of the piped baseline's", median(&gw_late_25), median(&paced_base_late_25))),
        Row::new(s, "peak RSS", mb(gw.hwm_kib()), Unit::MB, Target::Below(RSS_TARGET_MB)),
        Row::new(s, "RSS after the runs", mb(gw.rss_kib()), Unit::MB, Target::None)
            .note(format!("the {runs} completed runs' replay buffers are kept for 5 minutes")),
        Row::new(s, "4008 closes of a reading client", rejoins as f64, Unit::Count, Target::None)
            .note("each recovered by resubscribing with its lastSeq (counted in seq gaps if not)"),
        Row::new(s, "seq gaps", gaps as f64, Unit::Count, Target::Equals(0.0))
            .also(complete)
            .note(if complete { "" } else { "events missing" }),
    ])
}

// ---------------------------------------------------------------- fanout

/// Starts a run that waits on a permission (so subscribers can attach
/// before any event streams); returns the gateway's permission request id.
pub(crate) async fn start_gated(ws: &mut Ws, sid: &str, prompt: &str) -> Result<String, String> {
    send_chat(ws, sid, &format!("permission:Bash {prompt}")).await?;
    let req = until_kind(
        ws,
        "permission_request",
        Instant::now() + Duration::from_secs(30),
    )
    .await?;
    ws::field_str(&req, "requestId")
        .map(str::to_string)
        .ok_or_else(|| format!("permission_request without requestId: {req}"))
}

pub(crate) async fn release_gate(ws: &mut Ws, request_id: &str) -> Result<(), String> {
    ws::send_json(
        ws,
        &json!({"type": "chat.permission-response", "requestId": request_id, "allow": true}),
    )
    .await
}

/// Subscribes `ws` to the live run and waits for the ack; returns the seq to continue from.
pub(crate) async fn subscribe(ws: &mut Ws, sid: &str, last_seq: u64) -> Result<(), String> {
    let ack = send_subscribe(ws, sid, last_seq).await?;
    if !ack.contains("\"isProcessing\":true") {
        return Err(format!("subscribed to a run that is not processing: {ack}"));
    }
    Ok(())
}

/// Subscribes to the session from `last_seq`; returns the ack. After a 4008
/// the run may have completed meanwhile (its catch-up then ends with the
/// `complete` the reader waits for), so the rejoin takes any ack.
async fn send_subscribe(ws: &mut Ws, sid: &str, last_seq: u64) -> Result<String, String> {
    ws::send_json(
        ws,
        &json!({"type": "chat.subscribe", "sessions": [{"sessionId": sid, "lastSeq": last_seq}]}),
    )
    .await?;
    until_kind(
        ws,
        "chat_subscribed",
        Instant::now() + Duration::from_secs(60),
    )
    .await
}

/// What one fanout measurement gave (medians over the repetitions).
pub struct FanoutStats {
    pub events: usize,
    pub subscribers: usize,
    pub rate: f64,
    pub p50: f64,
    pub p99: f64,
    pub max_ms: f64,
    pub rejoins: usize,
    pub gaps: u64,
    pub complete: bool,
}

/// Threads that read fanout's sockets (`LOADGEN_FANOUT_THREADS`, default 2:
/// one per core of the machines the targets are set for).
fn fanout_threads() -> usize {
    std::env::var("LOADGEN_FANOUT_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|n| *n > 0)
        .unwrap_or(2)
}

/// Runs `f` on the blocking pool (the raw sockets block), off the runtime's thread.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, String> {
    actix_rt::task::spawn_blocking(f)
        .await
        .map_err(|e| format!("reader thread: {e}"))
}

/// One run of `events` deltas started on `gws[0]`, followed by
/// `subscribers` sockets (the sender included) spread round-robin over
/// `gws` (one node: the single-node `fanout`; several: `cluster-fanout`).
/// The readers are raw clients on a few threads (`fan_read.rs`).
pub async fn fanout_over(
    _ctx: &Ctx,
    gws: &[&Gateway],
    subscribers: usize,
    events: usize,
    reps: usize,
) -> Result<FanoutStats, String> {
    let owner_gw = *gws.first().ok_or("no gateway")?;
    // Each node's sockets, one block after the other (the owner first).
    let mut socks: Vec<FanSock> = Vec::with_capacity(subscribers);
    let mut blocks = Vec::with_capacity(gws.len());
    for (i, gw) in gws.iter().enumerate() {
        let n = subscribers / gws.len() + usize::from(i < subscribers % gws.len());
        let url = gw.ws_url(&format!("/ws?token={}", gw.token));
        let opened = blocking(move || fan_read::open(&url, n)).await??;
        let remote = gw.addr != owner_gw.addr;
        blocks.push((socks.len()..socks.len() + opened.len(), remote));
        socks.extend(opened);
    }
    if socks.is_empty() {
        return Err("no sockets".into());
    }
    let threads = fanout_threads();
    let (mut rates, mut p50, mut p99) = (vec![], vec![], vec![]);
    let (mut gaps, mut complete, mut max_lat, mut rejoins) = (0, true, 0, 0);
    for _ in 0..reps {
        // A fresh session each time: the sockets stay subscribed to the previous one.
        let (_project, sid) = session(owner_gw).await?;
        let prompt = format!("text:{events} size:{EVENT_BYTES} ts");
        let deadline = run_deadline(events * subscribers / 20).into_std();
        let blocks = blocks.clone();
        let (back, run, t0) = blocking(move || {
            let request = fan_read::start_gated(&mut socks[0].ws, &sid, &prompt)?;
            for (range, remote) in blocks {
                // The owner sent the turn: it follows the run already.
                let range = range.start.max(1)..range.end;
                fan_read::subscribe_live(&mut socks[range], &sid, remote)?;
            }
            let t0 = std::time::Instant::now();
            fan_read::release_gate(&mut socks[0].ws, &request)?;
            let run = fan_read::read_all(&mut socks, &sid, deadline, threads);
            Ok::<_, String>((socks, run, t0))
        })
        .await??;
        socks = back;
        let mut total = 0;
        let mut end = t0;
        for seen in run.seen {
            let seen = seen?;
            gaps += seen.seqc.gaps;
            rejoins += seen.rejoins;
            complete &= seen.deltas == events;
            total += seen.deltas;
            end = end.max(seen.last.unwrap_or(t0));
        }
        rates.push(total as f64 / secs(end - t0));
        p50.push(ms(run.hist.quantile(0.5)));
        p99.push(ms(run.hist.quantile(0.99)));
        max_lat = max_lat.max(run.hist.max());
    }
    Ok(FanoutStats {
        events,
        subscribers,
        rate: median(&rates),
        p50: median(&p50),
        p99: median(&p99),
        max_ms: ms(max_lat),
        rejoins,
        gaps,
        complete,
    })
}

pub async fn fanout(ctx: &Ctx) -> Result<Vec<Row>, String> {
    let subscribers = 1_000;
    let events = ctx.events.unwrap_or(if ctx.quick { 2_000 } else { 20_000 });
    let reps = if ctx.quick { 1 } else { ctx.reps };
    let gw = Gateway::start(&ctx.bins, |_, _| {})?;
    let f = fanout_over(ctx, &[&gw], subscribers, events, reps).await?;
    let s = "fanout";
    Ok(vec![
        Row::new(
            s,
            &format!("deliveries/s (1 run x {events} -> {subscribers} sockets)"),
            f.rate,
            Unit::PerSec,
            // Issue 16's target.
            Target::AtLeast(1_200_000.0),
        ),
        Row::new(s, "p50 latency", f.p50, Unit::Millis, Target::None),
        Row::new(s, "p99 latency", f.p99, Unit::Millis, Target::None),
        Row::new(s, "max latency", f.max_ms, Unit::Millis, Target::None),
        Row::new(s, "peak RSS", mb(gw.hwm_kib()), Unit::MB, Target::None),
        Row::new(s, "4008 closes of a reading client", f.rejoins as f64, Unit::Count, Target::None)
            .note("far behind while others kept up (E4); each recovered by resubscribing with its lastSeq"),
        gaps_row(s, "seq gaps", &f),
    ])
}

/// Seq gaps of a fanout measurement, failing it when a subscriber missed events.
pub fn gaps_row(s: &str, figure: &str, f: &FanoutStats) -> Row {
    Row::new(s, figure, f.gaps as f64, Unit::Count, Target::Equals(0.0))
        .also(f.complete)
        .note(if f.complete {
            ""
        } else {
            "a subscriber missed events"
        })
}

// ---------------------------------------------------------------- replay

pub async fn replay(ctx: &Ctx) -> Result<Vec<Row>, String> {
    let buffered = 5_000;
    let reps = ctx.reps.max(5);
    let gw = Gateway::start(&ctx.bins, |_, _| {})?;
    let (_project, sid) = session(&gw).await?;
    let mut owner = chat_socket(ctx, &gw).await?;
    // `hang` stops the stream half-way and keeps the run alive: 5,000 deltas stay buffered.
    send_chat(
        &mut owner,
        &sid,
        &format!("text:{} size:{EVENT_BYTES} hang", buffered * 2),
    )
    .await?;
    let mut owner_seq = SeqCheck::starting_after(0);
    let mut deltas = 0;
    let deadline = run_deadline(buffered);
    while deltas < buffered {
        let frame = recv_text(&mut owner, deadline).await?;
        let s = scan(&frame);
        if let Some(seq) = s.seq {
            owner_seq.see(seq);
            if s.kind == "stream_delta" {
                deltas += 1;
            }
        }
    }
    let last = owner_seq.last();
    let (mut times, mut counts_ok) = (vec![], true);
    for _ in 0..reps {
        let mut ws = chat_socket(ctx, &gw).await?;
        let t0 = Instant::now();
        ws::send_json(
            &mut ws,
            &json!({"type": "chat.subscribe", "sessions": [{"sessionId": sid, "lastSeq": 0}]}),
        )
        .await?;
        let mut seqc = SeqCheck::default();
        let mut got = 0;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let frame = recv_text(&mut ws, deadline).await?;
            let s = scan(&frame);
            if let Some(seq) = s.seq {
                seqc.see(seq);
                got += 1;
                if seq >= last {
                    break;
                }
            }
        }
        times.push(secs(t0.elapsed()) * 1e3);
        counts_ok &= got as u64 == last && seqc.gaps == 0;
    }
    let _ = ws::send_json(&mut owner, &json!({"type": "chat.abort", "sessionId": sid})).await;
    let s = "replay";
    Ok(vec![Row::new(
        s,
        &format!("time to replay {last} events (lastSeq 0)"),
        median(&times),
        Unit::Millis,
        Target::Below(20.0),
    )
    .also(counts_ok)
    .note(format!(
        "median of {reps}; every event, in order: {counts_ok}"
    ))])
}

// ---------------------------------------------------------------- idle

pub async fn idle(ctx: &Ctx) -> Result<Vec<Row>, String> {
    let want = if ctx.quick { 2_000 } else { 10_000 };
    // The gateway (which inherits our limit) holds two descriptors per
    // socket: the connection and the stall watchdog's duplicate of it. Past
    // its limit, accept(2) fails with EMFILE and the sockets beyond it wait
    // for an answer that never comes.
    let fit = (ctx.nofile.saturating_sub(IDLE_FD_RESERVE) / 2) as usize;
    let n = want.min(fit);
    if n < want / 2 {
        return Ok(vec![Row::unavailable(
            "idle",
            &format!(
                "needs RLIMIT_NOFILE >= {} for {want} sockets (have {}); raise the hard limit (ulimit -Hn)",
                2 * want as u64 + IDLE_FD_RESERVE,
                ctx.nofile
            ),
        )]);
    }
    let gw = Gateway::start(&ctx.bins, |_, _| {})?;
    // One socket first, so one-time allocations are not counted per socket.
    drop(chat_socket(ctx, &gw).await?);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = gw.rss_kib();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let ready = Rc::new(Cell::new(0usize));
    let failed = Rc::new(RefCell::new(None::<String>));
    let t0 = Instant::now();
    let mut handles = Vec::with_capacity(n);
    let mut opened = 0;
    while opened < n {
        let batch = (n - opened).min(CONNECT_PARALLEL);
        let socks = join_all((0..batch).map(|_| chat_socket(ctx, &gw))).await;
        for ws in socks {
            let mut ws = ws?;
            let (ready, mut stop) = (ready.clone(), stop_rx.clone());
            let failed = failed.clone();
            handles.push(actix_rt::spawn(async move {
                // A ping proves the socket's actor runs and reads; then it idles.
                if ws.send(awc::ws::Message::Ping(Default::default())).await.is_err() {
                    *failed.borrow_mut() = Some("ping failed".into());
                    return;
                }
                loop {
                    tokio::select! {
                        _ = stop.changed() => return,
                        f = ws.next() => match f {
                            Some(Ok(awc::ws::Frame::Pong(_))) => ready.set(ready.get() + 1),
                            Some(Ok(awc::ws::Frame::Ping(p))) => { let _ = ws.send(awc::ws::Message::Pong(p)).await; }
                            Some(Ok(_)) => {}
                            _ => { *failed.borrow_mut() = Some("socket closed while idle".into()); return; }
                        }
                    }
                }
            }));
        }
        opened += batch;
    }
    let connect_secs = secs(t0.elapsed());
    let deadline = Instant::now() + Duration::from_secs(60);
    while ready.get() < n && failed.borrow().is_none() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Let the allocator settle after the connect burst.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = gw.rss_kib();
    let all = ready.get() == n;
    let _ = stop_tx.send(true);
    for h in handles {
        let _ = h.await;
    }
    if let Some(err) = failed.borrow().clone() {
        return Err(err);
    }
    let per = after.saturating_sub(before) as f64 / n as f64;
    let s = "idle";
    Ok(vec![
        Row::new(
            s,
            &format!("RSS per idle socket ({n} sockets)"),
            per,
            Unit::KiB,
            Target::AtMost(8.0),
        )
        .also(all)
        .note(format!(
            "gateway RSS {:.1} -> {:.1} MB; all answered a ping: {all}{}",
            mb(before),
            mb(after),
            if n < want {
                format!("; {n} of {want} sockets: RLIMIT_NOFILE {} holds two descriptors per socket in the gateway", ctx.nofile)
            } else {
                String::new()
            }
        )),
        Row::new(
            s,
            "sockets opened/s",
            n as f64 / connect_secs,
            Unit::PerSec,
            Target::None,
        ),
    ])
}

// ---------------------------------------------------------------- slow-client

/// Heartbeat of the stuck-client scenario: the stuck socket must be gone
/// within two of these after it stopped reading (plus the watchdog's tick).
const SLOW_HEARTBEAT_SECS: u64 = 2;

/// Gateway RSS cap for `subscribers` subscribers: the idle gateway, the
/// replay buffer, and per subscriber its delivery budget (high-water mark
/// plus one delivery) plus the encoder's share, with 8 MB allocator slack.
/// With `kept_place` a subscriber is closed with 4008 while the run goes
/// on, so the buffer may hold its place's stretch too (the registry's
/// bound for a session with kept places).
fn rss_cap_mb(base_kib: u64, subscribers: usize, kept_place: bool) -> (f64, String) {
    let per_socket = (SUBSCRIBER_HIGH_WATER + 2 * DELIVERY_MAX_BYTES) as f64 / 1048576.0;
    let mut replay = REPLAY_MAX_BYTES as f64 / 1048576.0;
    if kept_place {
        replay += REPLAY_STRETCH_BYTES as f64 / 1048576.0;
    }
    let cap = mb(base_kib) + replay + subscribers as f64 * per_socket + 8.0;
    let stretch = if kept_place {
        " (with a kept place's stretch)"
    } else {
        ""
    };
    (
        cap,
        format!(
            "cap = idle {:.0} MB + replay buffer {replay:.0} MB{stretch} + {subscribers} x budget {per_socket:.1} MB + 8 MB slack",
            mb(base_kib)
        ),
    )
}

/// Samples the gateway's RSS every 20 ms until stopped; returns the peak.
fn rss_sampler(
    pid: u32,
) -> (
    tokio::sync::watch::Sender<bool>,
    actix_rt::task::JoinHandle<u64>,
) {
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let handle = actix_rt::spawn(async move {
        let mut peak = 0;
        loop {
            peak = peak.max(crate::gateway::status_kib(pid, "VmRSS:"));
            tokio::select! {
                _ = stop_rx.changed() => return peak,
                _ = tokio::time::sleep(Duration::from_millis(20)) => {}
            }
        }
    });
    (stop_tx, handle)
}

/// One subscriber never reads while another reads a 1 GB run: the stuck
/// one is cut off by the gateway (it cannot even take a close frame) within
/// two heartbeat intervals, memory stays bounded, the other loses nothing.
pub async fn slow_client(ctx: &Ctx) -> Result<Vec<Row>, String> {
    let event_bytes = 16 * 1024;
    let total_bytes: usize = if ctx.quick { 128 << 20 } else { 1 << 30 };
    let events = total_bytes / event_bytes;
    let gw = Gateway::start(&ctx.bins, |_, cmd| {
        cmd.arg("--heartbeat-secs")
            .arg(SLOW_HEARTBEAT_SECS.to_string());
    })?;
    let base_kib = gw.rss_kib();
    let (_project, sid) = session(&gw).await?;
    let mut fast = chat_socket(ctx, &gw).await?;
    let before = gw.client_ports();
    let mut stuck = chat_socket(ctx, &gw).await?;
    let stuck_port = {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(p) = gw.client_ports().difference(&before).next() {
                break *p;
            }
            if Instant::now() > deadline {
                return Err("the stuck socket's connection was not found".into());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    let request = start_gated(
        &mut fast,
        &sid,
        &format!("text:{events} size:{event_bytes}"),
    )
    .await?;
    subscribe(&mut stuck, &sid, 0).await?;
    // From here the stuck socket reads nothing, ever.
    let (stop, sampler) = rss_sampler(gw.pid());
    let t0 = Instant::now();
    release_gate(&mut fast, &request).await?;
    let watcher = {
        let gw_ports = gw.clone_ports_probe();
        actix_rt::spawn(async move {
            let deadline = Instant::now() + Duration::from_secs(120);
            while gw_ports().contains(&stuck_port) && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Instant::now()
        })
    };
    let mut seqc = SeqCheck::default();
    let seen = read_run(&mut fast, &mut seqc, run_deadline(events * 20)).await;
    let elapsed = secs(t0.elapsed());
    let cut_at = watcher.await.map_err(|e| e.to_string())?;
    let _ = stop.send(true);
    let peak = sampler.await.unwrap_or(0);
    let seen = seen?;
    let cut_secs = secs(cut_at.duration_since(t0));
    let still_open = gw.client_ports().contains(&stuck_port);
    drop(stuck);
    let hwm = gw.hwm_kib();
    let (cap_mb, cap_note) = rss_cap_mb(base_kib, 2, true);
    let fast_ok = seen.deltas == events && seqc.gaps == 0;
    let s = "slow-client";
    Ok(vec![
        Row::new(
            s,
            &format!("peak RSS while streaming {} MB", total_bytes >> 20),
            mb(hwm.max(peak)),
            Unit::MB,
            Target::Below(cap_mb),
        )
        .note(cap_note),
        Row::new(
            s,
            &format!("stuck socket dropped after (heartbeat {SLOW_HEARTBEAT_SECS} s)"),
            cut_secs,
            Unit::Secs,
            Target::AtMost(2.25 * SLOW_HEARTBEAT_SECS as f64 + 0.3),
        )
        .also(!still_open)
        .note("from the run's start; target: two heartbeat intervals, plus the watchdog's tick (1/8 interval) and 0.3 s for filling the socket buffers and polling"),
        Row::new(
            s,
            "other subscriber: events missed",
            (events - seen.deltas.min(events)) as f64 + seqc.gaps as f64,
            Unit::Count,
            Target::Equals(0.0),
        )
        .also(fast_ok),
        Row::new(
            s,
            "other subscriber throughput",
            (seen.deltas * event_bytes) as f64 / 1e6 / elapsed,
            Unit::MBps,
            Target::None,
        ),
    ])
}

// ---------------------------------------------------------------- slow-reader

/// One reader ten times slower than the provider (measured in the same
/// run: the fake CLI piped into a reader): it is never closed, gets every
/// event, and the run is paused for it; memory stays bounded.
pub async fn slow_reader(ctx: &Ctx) -> Result<Vec<Row>, String> {
    let event_bytes = 1024;
    let events = if ctx.quick { 50_000 } else { 200_000 };
    let prompt = format!("text:{events} size:{event_bytes}");
    let producer = pipe_baseline(&ctx.bins, &prompt, 1, None)
        .await?
        .lines_per_sec;
    let target_rate = producer / 10.0;
    let gw = Gateway::start(&ctx.bins, |_, _| {})?;
    let base_kib = gw.rss_kib();
    let (_project, sid) = session(&gw).await?;
    let mut ws = chat_socket(ctx, &gw).await?;
    let (stop, sampler) = rss_sampler(gw.pid());
    send_chat(&mut ws, &sid, &prompt).await?;
    let deadline =
        run_deadline(events) + Duration::from_secs_f64(events as f64 / target_rate * 2.0);
    let mut seqc = SeqCheck::default();
    let (mut deltas, mut closed) = (0usize, None);
    let mut first = None;
    let step = 200;
    loop {
        let frame = match ws::recv(&mut ws, deadline).await? {
            In::Text(b) => b,
            In::Binary => continue,
            In::Close(code) => {
                closed = Some(code.unwrap_or(0));
                break;
            }
            In::Ended => {
                closed = Some(0);
                break;
            }
        };
        let sc = scan(&frame);
        let Some(seq) = sc.seq else { continue };
        seqc.see(seq);
        if sc.kind == "stream_delta" {
            let t = *first.get_or_insert_with(Instant::now);
            deltas += 1;
            if deltas % step == 0 {
                // Hold the reading back to the target rate.
                let due = t + Duration::from_secs_f64(deltas as f64 / target_rate);
                tokio::time::sleep_until(due).await;
            }
        }
        if sc.kind == "complete" {
            break;
        }
    }
    let rate = first.map_or(0.0, |t| deltas as f64 / secs(t.elapsed()));
    let _ = stop.send(true);
    let peak = sampler.await.unwrap_or(0);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (pauses, paused_ms) = crate::node::pauses(&gw);
    let hwm = gw.hwm_kib();
    let (cap_mb, cap_note) = rss_cap_mb(base_kib, 1, false);
    let s = "slow-reader";
    Ok(vec![
        Row::new(
            s,
            "reader events/s (10x slower than the provider)",
            rate,
            Unit::PerSec,
            Target::None,
        )
        .baseline(producer)
        .note("baseline: the fake CLI piped into a reader, same run"),
        Row::new(
            s,
            "closes of the slow reader",
            closed.map_or(0.0, |_| 1.0),
            Unit::Count,
            Target::Equals(0.0),
        )
        .note(closed.map_or(String::new(), |c| format!("closed with {c}"))),
        Row::new(
            s,
            "events missed",
            (events - deltas.min(events)) as f64 + seqc.gaps as f64,
            Unit::Count,
            Target::Equals(0.0),
        ),
        Row::new(s, "run pauses", pauses, Unit::Count, Target::AtLeast(1.0)),
        Row::new(s, "paused time", paused_ms, Unit::Millis, Target::None),
        Row::new(
            s,
            &format!("peak RSS ({} MB run)", (events * event_bytes) >> 20),
            mb(hwm.max(peak)),
            Unit::MB,
            Target::Below(cap_mb),
        )
        .note(cap_note),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two scrapes of the gateway's cumulative buckets: of the 100
    /// observations between them, 10 were above 2.5 ms and 30 above 1 ms.
    #[test]
    fn gateway_shares_come_from_the_difference_of_two_scrapes() {
        let before = [(0.001, 50), (0.0025, 60), (f64::INFINITY, 70)];
        let after = [(0.001, 120), (0.0025, 150), (f64::INFINITY, 170)];
        assert!((share_above(&before, &after, 0.0025) - 0.10).abs() < 1e-9);
        assert!((share_above(&before, &after, 0.001) - 0.30).abs() < 1e-9);
        assert_eq!(share_above(&after, &after, 0.001), 0.0);
    }
}
