//! The agentgate load generator and benchmark suite (issue 6).
//!
//! Starts the release gateway (`target/release/agentgate`) as a child process
//! on 127.0.0.1:0 with a temp data dir, fresh for every scenario, and drives
//! it with real WebSocket clients (awc on the actix runtime). Every figure
//! is set beside a baseline measured in the same run on the same machine:
//! the fake provider piped straight into a reader (chat), a raw PTY (shell),
//! a direct connection to the same echo plugin (proxy).
//!
//! ```text
//! cargo build --release --bins --examples
//! target/release/examples/loadgen                 # full suite
//! target/release/examples/loadgen --quick         # reduced sizes, < 3 minutes on 2 cores
//! target/release/examples/loadgen --scenario chat-one --json out.json
//! ```
//!
//! Scenarios: chat-one, chat-node (a Node `ws` reader), chat-many, fanout,
//! cluster-fanout (fanout over three nodes in cluster mode beside one node,
//! with the machine's PostgreSQL and a redis-server the tool starts), replay, idle, shell, proxy, slow-client (never reads), slow-reader (ten
//! times slower than the run), and `micro` (the per-event parse and serialization cost,
//! in-process; run it under callgrind for instruction counts). Figures are medians over `--reps` repetitions. Traffic goes
//! to 127.0.0.1 only; every wait is bounded. The tool raises its own
//! RLIMIT_NOFILE to the hard limit (`idle` needs about 10,200 descriptors
//! in the tool and twice as many in the gateway, which inherits the limit
//! and holds two per socket; with less it opens as many sockets as fit).
//!
//! Environment: `LOADGEN_GATEWAY_LOG` sets the gateway's `RUST_LOG`
//! (default `info`), `LOADGEN_ECHO_LOGS=1` copies its log to stderr,
//! `LOADGEN_FANOUT_THREADS` the threads reading fanout's sockets (2).

#[path = "loadgen/chat.rs"]
mod chat;
#[path = "loadgen/cluster.rs"]
mod cluster;
#[path = "loadgen/conns.rs"]
mod conns;
#[path = "loadgen/fan_read.rs"]
mod fan_read;
#[path = "loadgen/gateway.rs"]
mod gateway;
#[path = "loadgen/micro.rs"]
mod micro;
#[path = "loadgen/node.rs"]
mod node;
#[path = "loadgen/proxy.rs"]
mod proxy;
#[path = "loadgen/raw_ws.rs"]
mod raw_ws;
#[path = "loadgen/report.rs"]
mod report;
#[path = "loadgen/shell.rs"]
mod shell;
#[path = "loadgen/stats.rs"]
mod stats;
#[path = "loadgen/ws.rs"]
mod ws;
// The machine's PostgreSQL (a fresh database) and a redis-server of our own
// for cluster-fanout: the same code the tests use.
#[path = "../tests/support/postgres.rs"]
#[allow(dead_code)]
mod test_postgres;
#[path = "../tests/support/redis.rs"]
#[allow(dead_code)]
mod test_redis;

use std::path::PathBuf;
use std::time::Instant;

use clap::Parser;
use serde_json::json;

use gateway::Bins;
use report::Row;

const SCENARIOS: [&str; 12] = [
    "chat-one",
    "chat-node",
    "chat-many",
    "fanout",
    "cluster-fanout",
    "replay",
    "idle",
    "shell",
    "proxy",
    "slow-client",
    "slow-reader",
    "micro",
];

#[derive(Parser, Debug)]
#[command(about = "agentgate benchmark suite: load generator, same-run baselines, targets")]
struct Args {
    /// Reduced sizes: the whole suite in under 3 minutes on 2 cores.
    #[arg(long)]
    quick: bool,
    /// Run only these scenarios (repeat or comma-separate); default all.
    #[arg(long = "scenario", value_delimiter = ',')]
    scenarios: Vec<String>,
    /// Write the results as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Repetitions per figure (the median is reported); default 3.
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Events per run in chat-one (default 200,000; 50,000 with --quick)
    /// and fanout (20,000; 2,000 with --quick).
    #[arg(long)]
    events: Option<usize>,
    /// Directory holding agentgate, examples/fake_claude and examples/echo_plugin
    /// (default: the profile dir this tool was built into).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
}

/// What every scenario gets.
pub struct Ctx {
    pub bins: Bins,
    pub quick: bool,
    pub reps: usize,
    /// `--events`: overrides chat-one's and fanout's events per run.
    pub events: Option<usize>,
    pub client: awc::Client,
    /// RLIMIT_NOFILE after raising it.
    pub nofile: u64,
}

/// Raises the soft RLIMIT_NOFILE to the hard limit; returns the new soft limit.
fn raise_nofile() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct we pass.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 1024;
        }
        if lim.rlim_cur < lim.rlim_max {
            let want = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &want) == 0 {
                lim.rlim_cur = lim.rlim_max;
            }
        }
    }
    lim.rlim_cur
}

fn machine() -> serde_json::Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_string())
        .unwrap_or_default();
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_mb = meminfo
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<u64>().ok())
        .map_or(0, |kib| kib / 1024);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    json!({
        "cpu": cpu,
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        "mem_mb": mem_mb,
        "kernel": kernel.trim(),
        "loadavg_at_start": load.split_whitespace().take(3).collect::<Vec<_>>().join(" "),
    })
}

async fn run_scenario(name: &str, ctx: &Ctx) -> Vec<Row> {
    let result = match name {
        "chat-one" => chat::chat_one(ctx).await,
        "chat-many" => chat::chat_many(ctx).await,
        "fanout" => chat::fanout(ctx).await,
        "cluster-fanout" => cluster::cluster_fanout(ctx).await,
        "replay" => chat::replay(ctx).await,
        "idle" => chat::idle(ctx).await,
        "shell" => shell::shell(ctx).await,
        "proxy" => proxy::proxy(ctx).await,
        "chat-node" => node::chat_node(ctx).await,
        "slow-client" => chat::slow_client(ctx).await,
        "slow-reader" => chat::slow_reader(ctx).await,
        "micro" => micro::micro(ctx).await,
        other => Err(format!("unknown scenario {other:?}")),
    };
    result.unwrap_or_else(|err| {
        let mut row = Row::unavailable(name, &format!("error: {err}"));
        row.also = Some(false);
        vec![row]
    })
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let scenarios: Vec<String> = if args.scenarios.is_empty() {
        SCENARIOS.iter().map(|s| s.to_string()).collect()
    } else {
        args.scenarios.clone()
    };
    if let Some(bad) = scenarios.iter().find(|s| !SCENARIOS.contains(&s.as_str())) {
        eprintln!("unknown scenario {bad:?}; known: {}", SCENARIOS.join(", "));
        return std::process::ExitCode::from(2);
    }
    let bins = args
        .bin_dir
        .as_deref()
        .map(Bins::in_dir)
        .unwrap_or_else(Bins::beside_self);
    if let Err(e) = bins.check() {
        eprintln!("{e}");
        return std::process::ExitCode::from(2);
    }
    let nofile = raise_nofile();
    let machine = machine();
    eprintln!("machine: {machine}");
    eprintln!("RLIMIT_NOFILE: {nofile}");
    let started = Instant::now();
    let rows = actix_rt::System::new().block_on(async {
        let ctx = Ctx {
            bins,
            quick: args.quick,
            reps: args.reps.max(1),
            events: args.events,
            client: ws::client(),
            nofile,
        };
        let mut rows = Vec::new();
        for name in &scenarios {
            let t0 = Instant::now();
            eprintln!("== {name} ...");
            let got = run_scenario(name, &ctx).await;
            eprint!("{}", report::table(&got));
            eprintln!("== {name} done in {:.1} s", t0.elapsed().as_secs_f64());
            rows.extend(got);
        }
        rows
    });
    let total = started.elapsed().as_secs_f64();
    println!("{}", report::table(&rows));
    println!(
        "{} mode, {} reps, {:.0} s; machine: {} ({} cores), load at start {}",
        if args.quick { "quick" } else { "full" },
        args.reps,
        total,
        machine["cpu"].as_str().unwrap_or("?"),
        machine["cores"],
        machine["loadavg_at_start"].as_str().unwrap_or("?"),
    );
    if let Some(path) = &args.json {
        let doc = json!({
            "quick": args.quick,
            "reps": args.reps,
            "seconds": total,
            "machine": machine,
            "rows": rows.iter().map(Row::to_json).collect::<Vec<_>>(),
        });
        let text = serde_json::to_string_pretty(&doc).unwrap_or_default();
        if let Err(e) = std::fs::write(path, text) {
            eprintln!("cannot write {}: {e}", path.display());
            return std::process::ExitCode::FAILURE;
        }
    }
    if rows.iter().any(|r| r.pass() == Some(false)) {
        std::process::ExitCode::FAILURE
    } else {
        std::process::ExitCode::SUCCESS
    }
}
