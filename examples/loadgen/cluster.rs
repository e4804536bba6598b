//! cluster-fanout: the fanout of `chat::fanout` (one run, 1,000
//! subscribers) across three gateway nodes in cluster mode, beside the
//! same fanout on one node measured in the same run. The tool starts
//! everything itself: a `redis-server` of its own (tests/support/redis.rs),
//! a fresh database on the machine's PostgreSQL (tests/support/postgres.rs,
//! 127.0.0.1:5432 or `AGENTGATE_TEST_POSTGRES_URL`), and three nodes
//! sharing them and one JWT secret. The run starts on node A; the
//! subscribers are spread over A, B and C (a third on each).
//!
//! Also the added latency of a cross-node subscriber: one paced run on
//! node A read by its local sender and by one subscriber on node B.

use futures_util::future::join_all;
use tokio::time::Instant;

use crate::chat::{
    chat_socket, fanout_over, gaps_row, mb, read_run, release_gate, session, start_gated,
    subscribe, FanoutStats,
};
use crate::gateway::{ClusterNode, Gateway};
use crate::report::{Row, Target, Unit};
use crate::stats::{median, SeqCheck};
use crate::test_postgres::TestDatabase;
use crate::test_redis::TestRedis;
use crate::Ctx;

/// The lease the nodes run with (the gateway's default).
const LEASE_MS: u64 = 10_000;

/// Runs `f`, turning a panic (PostgreSQL or Redis missing: the support
/// code panics naming what is missing) into an error row.
fn setup<T>(what: &str, f: impl FnOnce() -> T) -> Result<T, String> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).map_err(|e| {
        let msg = e
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default();
        format!("{what}: {msg}")
    })
}

pub async fn cluster_fanout(ctx: &Ctx) -> Result<Vec<Row>, String> {
    let subscribers = 1_000;
    let events = if ctx.quick { 2_000 } else { 20_000 };
    let reps = if ctx.quick { 1 } else { ctx.reps };
    let s = "cluster-fanout";

    // The same-run baseline: one node, as `fanout` runs it.
    let single = Gateway::start(&ctx.bins, |_, _| {})?;
    let base = fanout_over(ctx, &[&single], subscribers, events, reps).await?;
    drop(single);

    let db = setup("PostgreSQL", TestDatabase::create)?;
    let redis = setup("Redis", TestRedis::start)?;
    let secret = format!(
        "{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    );
    let (redis_url, mut nodes) = (redis.url(), Vec::new());
    for id in ["node-a", "node-b", "node-c"] {
        nodes.push(Gateway::start_node(
            &ctx.bins,
            &ClusterNode {
                database_url: &db.url,
                redis_url: &redis_url,
                secret: &secret,
                node_id: id,
                lease_ms: LEASE_MS,
            },
        )?);
    }
    let refs: Vec<&Gateway> = nodes.iter().collect();
    let spread = fanout_over(ctx, &refs, subscribers, events, reps).await?;
    let (local, remote) = cross_node_latency(ctx, &nodes[0], &nodes[1], reps).await?;
    let peak = nodes.iter().map(Gateway::hwm_kib).max().unwrap_or(0);
    let with = |f: &FanoutStats| format!("1 run x {} -> {} sockets", f.events, f.subscribers);
    let mut rows = vec![
        Row::new(
            s,
            &format!(
                "deliveries/s, 3 nodes ({}; baseline: 1 node)",
                with(&spread)
            ),
            spread.rate,
            Unit::PerSec,
            Target::None,
        )
        .baseline(base.rate),
        Row::new(
            s,
            "p50 latency, 3 nodes (baseline: 1 node)",
            spread.p50,
            Unit::Millis,
            Target::None,
        )
        .baseline(base.p50),
        Row::new(
            s,
            "p99 latency, 3 nodes (baseline: 1 node)",
            spread.p99,
            Unit::Millis,
            Target::None,
        )
        .baseline(base.p99),
        Row::new(
            s,
            "max latency, 3 nodes",
            spread.max_ms,
            Unit::Millis,
            Target::None,
        ),
        Row::new(
            s,
            "peak RSS of the largest node",
            mb(peak),
            Unit::MB,
            Target::None,
        ),
        Row::new(
            s,
            "4008 closes of a reading client, 3 nodes",
            spread.rejoins as f64,
            Unit::Count,
            Target::None,
        ),
        gaps_row(s, "seq gaps, 3 nodes", &spread),
        gaps_row(s, "seq gaps, 1 node", &base),
    ];
    rows.push(
        Row::new(
            s,
            "cross-node subscriber p50 latency (baseline: local)",
            remote.0,
            Unit::Millis,
            Target::None,
        )
        .baseline(local.0)
        .note(format!("added {:.3} ms", remote.0 - local.0)),
    );
    rows.push(
        Row::new(
            s,
            "cross-node subscriber p99 latency (baseline: local)",
            remote.1,
            Unit::Millis,
            Target::None,
        )
        .baseline(local.1)
        .note(format!("added {:.3} ms", remote.1 - local.1)),
    );
    drop(nodes);
    drop(redis);
    drop(db);
    Ok(rows)
}

/// A paced run on `a` (one delta per millisecond) read by its sender on `a`
/// and by one subscriber on `b`: the (p50, p99) latency in ms of each,
/// medians over the repetitions.
async fn cross_node_latency(
    ctx: &Ctx,
    a: &Gateway,
    b: &Gateway,
    reps: usize,
) -> Result<((f64, f64), (f64, f64)), String> {
    let events = if ctx.quick { 1_000 } else { 5_000 };
    let (mut lp50, mut lp99, mut rp50, mut rp99) = (vec![], vec![], vec![], vec![]);
    let mut local = chat_socket(ctx, a).await?;
    let mut remote = chat_socket(ctx, b).await?;
    for _ in 0..reps {
        let (_project, sid) = session(a).await?;
        let request = start_gated(
            &mut local,
            &sid,
            &format!("text:{events} size:64 ts delay_ms:1"),
        )
        .await?;
        subscribe(&mut remote, &sid, 0).await?;
        release_gate(&mut local, &request).await?;
        let deadline = Instant::now() + std::time::Duration::from_secs(120);
        let mut seen = join_all([&mut local, &mut remote].map(|ws| async move {
            let mut seqc = SeqCheck::default();
            read_run(ws, &mut seqc, deadline).await
        }))
        .await
        .into_iter();
        let (l, r) = (seen.next().ok_or("local")??, seen.next().ok_or("remote")??);
        if l.deltas != events || r.deltas != events {
            return Err(format!(
                "cross-node latency run: local saw {} and remote {} of {events} deltas",
                l.deltas, r.deltas
            ));
        }
        lp50.push(crate::chat::ms(l.hist.quantile(0.5)));
        lp99.push(crate::chat::ms(l.hist.quantile(0.99)));
        rp50.push(crate::chat::ms(r.hist.quantile(0.5)));
        rp99.push(crate::chat::ms(r.hist.quantile(0.99)));
    }
    Ok((
        (median(&lp50), median(&lp99)),
        (median(&rp50), median(&rp99)),
    ))
}
