//! Model-based test of the RunRegistry: seeded random interleavings of
//! sends (with and without a repeated `clientRequestId`), aborts,
//! subscribes with random `lastSeq`, socket drops and reconnects, provider
//! batches of random sizes, turn ends, exits and crashes, stale messages of
//! finished runs, and subscribers that drain at random paces. After every
//! step: at most one `complete` per run, per socket and session strictly
//! increasing seqs (never one twice, E8) with no gap except where the client
//! itself asked to skip (a `lastSeq` ahead), nothing delivered after a
//! socket's close, and what a socket holds unwritten within its budget. At
//! the end of a case, once everything is drained: exactly one `complete` per
//! run. `MODEL_CASES` sets the number of cases (default 2000), `MODEL_SEED`
//! the first seed; a failure prints the seed of its case.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};

use actix::prelude::*;
use serde_json::{json, Value};

use super::run_registry::tests::{session_row, MemStore};
use super::run_registry::*;
use crate::config::GatewayConfig;
use crate::protocol::{EventBody, Role};
use crate::provider::{CommandSpec, LineParser, Provider, ProviderEvent, ProviderKind, Turn};
use crate::store::{SessionRow, Store};

/// Never started: the model plays the ProviderRun's part itself.
struct NoProcess;

impl Provider for NoProcess {
    fn kind(&self) -> ProviderKind {
        ProviderKind::Claude
    }
    fn command(&self, _: &Turn) -> CommandSpec {
        CommandSpec::new(std::path::Path::new("/nonexistent"))
    }
    fn parser(&self, _: &Turn) -> Box<dyn LineParser> {
        unreachable!("the model starts no process")
    }
}

fn no_process(_: ProviderKind) -> Option<&'static dyn Provider> {
    Some(&NoProcess)
}

/// What one sink (a stand-in socket) was sent, in order.
#[derive(Default)]
struct Received {
    frames: Vec<Value>,
    bytes_unacked: usize,
    batches_unacked: usize,
    closed: bool,
    after_close: usize,
}

struct Sink(Arc<Mutex<Received>>);

impl Actor for Sink {
    type Context = Context<Self>;
}

impl Handler<Deliver> for Sink {
    type Result = ();
    fn handle(&mut self, msg: Deliver, _: &mut Context<Self>) {
        let mut r = self.0.lock().unwrap();
        if r.closed {
            r.after_close += 1;
        }
        r.batches_unacked += 1;
        for f in msg.0.iter() {
            r.bytes_unacked += f.len();
            r.frames.push(serde_json::from_str(f).unwrap());
        }
    }
}

impl Handler<CloseSocket> for Sink {
    type Result = ();
    fn handle(&mut self, _: CloseSocket, _: &mut Context<Self>) {
        self.0.lock().unwrap().closed = true;
    }
}

/// Answered after every message queued before it: a barrier.
#[derive(Message)]
#[rtype(result = "()")]
struct Sync;

impl Handler<Sync> for Sink {
    type Result = ();
    fn handle(&mut self, _: Sync, _: &mut Context<Self>) {}
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

struct SocketModel {
    id: SocketId,
    addr: Addr<Sink>,
    rx: Arc<Mutex<Received>>,
    /// Frames of `rx` already checked.
    checked: usize,
    /// Per session: the last seq received, and the highest lastSeq asked for.
    last: HashMap<String, u64>,
    asked: HashMap<String, u64>,
    gone: bool,
}

struct Case {
    rng: Rng,
    registry: Addr<RunRegistry>,
    sockets: Vec<SocketModel>,
    sessions: Vec<SessionRow>,
    /// Per session: the current run id as learned from chat_accepted.
    runs: HashMap<String, String>,
    /// Every run id ever started, with its session.
    all_runs: Vec<(String, String)>,
    /// Completes seen, by run id: the distinct seqs.
    completes: HashMap<String, HashSet<u64>>,
    /// A batch the registry has not answered (paused), per run.
    in_flight: HashMap<String, tokio::task::JoinHandle<()>>,
    next_request: u64,
    seed: u64,
}

impl Case {
    async fn connect(&mut self) {
        let rx = Arc::new(Mutex::new(Received::default()));
        let addr = Sink(rx.clone()).start();
        let id = self
            .registry
            .send(Connect {
                user_id: 1,
                deliver: addr.clone().recipient(),
                close: addr.clone().recipient(),
            })
            .await
            .unwrap();
        self.sockets.push(SocketModel {
            id,
            addr,
            rx,
            checked: 0,
            last: HashMap::new(),
            asked: HashMap::new(),
            gone: false,
        });
    }

    fn live_socket(&mut self) -> Option<usize> {
        let live: Vec<usize> = (0..self.sockets.len())
            .filter(|i| !self.sockets[*i].gone)
            .collect();
        (!live.is_empty()).then(|| live[self.rng.below(live.len() as u64) as usize])
    }

    async fn barrier(&self) {
        for s in &self.sockets {
            let _ = s.addr.send(Sync).await;
        }
    }

    /// Checks what every socket received since the last check.
    fn check(&mut self, step: &str) {
        let seed = self.seed;
        for s in self.sockets.iter_mut() {
            let r = s.rx.lock().unwrap();
            assert_eq!(
                r.after_close, 0,
                "seed {seed} {step}: delivered after close"
            );
            // Budget: 1 MiB in flight plus one delivery and the small
            // out-of-band frames (acks, chat_accepted).
            assert!(
                r.bytes_unacked <= SUBSCRIBER_HIGH_WATER + DELIVERY_MAX_BYTES + 64 * 1024,
                "seed {seed} {step}: socket {} holds {} bytes unwritten",
                s.id,
                r.bytes_unacked
            );
            for f in &r.frames[s.checked..] {
                if f["kind"] == "chat_accepted" {
                    if f["duplicate"] == false {
                        let sid = f["sessionId"].as_str().unwrap().to_string();
                        let rid = f["runId"].as_str().unwrap().to_string();
                        self.runs.insert(sid.clone(), rid.clone());
                        self.all_runs.push((rid, sid));
                    }
                    continue;
                }
                let Some(seq) = f["seq"].as_u64() else {
                    continue;
                };
                let sid = f["sessionId"].as_str().unwrap().to_string();
                let prev = s.last.get(&sid).copied();
                if let Some(prev) = prev {
                    assert!(
                        seq > prev,
                        "seed {seed} {step}: socket {} got seq {seq} after {prev}",
                        s.id
                    );
                    let asked = s.asked.get(&sid).copied().unwrap_or(0);
                    assert!(
                        seq == prev + 1 || seq == asked + 1,
                        "seed {seed} {step}: socket {} skipped from {prev} to {seq} (asked {asked})",
                        s.id
                    );
                }
                s.last.insert(sid, seq);
                if f["kind"] == "complete" {
                    let rid = f["runId"].as_str().unwrap().to_string();
                    let seqs = self.completes.entry(rid.clone()).or_default();
                    seqs.insert(seq);
                    assert_eq!(
                        seqs.len(),
                        1,
                        "seed {seed} {step}: run {rid} completed twice"
                    );
                }
            }
            s.checked = r.frames.len();
            if r.closed && !s.gone {
                s.gone = true;
            }
        }
    }

    async fn drain(&mut self, i: usize, all: bool) {
        let (bytes, batches) = {
            let mut r = self.sockets[i].rx.lock().unwrap();
            let bytes = if all {
                r.bytes_unacked
            } else {
                r.bytes_unacked / (1 + self.rng.below(4) as usize)
            };
            let batches = if all {
                r.batches_unacked
            } else {
                r.batches_unacked.min(1 + self.rng.below(8) as usize)
            };
            r.bytes_unacked -= bytes;
            r.batches_unacked -= batches;
            (bytes, batches)
        };
        let socket = self.sockets[i].id;
        self.registry
            .send(Drained {
                socket,
                bytes,
                batches,
            })
            .await
            .unwrap();
    }

    fn batch(&mut self, session: &str, run_id: &str) -> Vec<ProviderEvent> {
        let many = self.rng.chance(20);
        let n = 1 + self.rng.below(if many { 300 } else { 20 });
        let big = self.rng.chance(10);
        let size = if big { 3000 } else { 1 + self.rng.below(100) } as usize;
        let mut events: Vec<ProviderEvent> = (0..n)
            .map(|_| ProviderEvent::Emit(EventBody::text(Role::Assistant, "x".repeat(size)).into()))
            .collect();
        if self.rng.chance(8) {
            events.push(ProviderEvent::TurnComplete {
                exit_code: self.rng.below(2) as i32,
            });
        }
        let _ = (session, run_id);
        events
    }

    async fn step(&mut self) {
        let session = self.sessions[self.rng.below(self.sessions.len() as u64) as usize].clone();
        let roll = self.rng.below(100);
        let step;
        match roll {
            0..=11 => {
                step = "send";
                let Some(i) = self.live_socket() else { return };
                let crid = if self.rng.chance(20) && self.next_request > 0 {
                    // A resend of an earlier request id (E6).
                    format!("req-{}", self.rng.below(self.next_request))
                } else {
                    self.next_request += 1;
                    format!("req-{}", self.next_request - 1)
                };
                let _ = self
                    .registry
                    .send(StartRun {
                        socket: Some(self.sockets[i].id),
                        user_id: 1,
                        session: session.clone(),
                        content: String::new(),
                        options: json!({}),
                        client_request_id: Some(crid),
                        cwd: std::env::temp_dir(),
                    })
                    .await
                    .unwrap();
            }
            12..=16 => {
                step = "abort";
                let _ = self
                    .registry
                    .send(AbortRun {
                        user_id: 1,
                        session_id: session.id.clone(),
                    })
                    .await
                    .unwrap();
            }
            17..=26 => {
                step = "subscribe";
                let Some(i) = self.live_socket() else { return };
                let top = self.sockets[i].last.values().copied().max().unwrap_or(0) + 50;
                let last_seq = match self.rng.below(4) {
                    0 => None,
                    _ => Some(self.rng.below(top)),
                };
                let s = &mut self.sockets[i];
                if let (Some(l), Some(_)) = (last_seq, s.last.get(&session.id)) {
                    // A lastSeq ahead of what it has lets the socket skip there.
                    let a = s.asked.entry(session.id.clone()).or_insert(0);
                    *a = (*a).max(l);
                }
                if !s.last.contains_key(&session.id) {
                    s.asked.insert(session.id.clone(), last_seq.unwrap_or(0));
                }
                self.registry
                    .send(Subscribe {
                        socket: s.id,
                        session: session.clone(),
                        last_seq,
                        follow: false,
                    })
                    .await
                    .unwrap();
            }
            27..=30 => {
                step = "drop";
                let Some(i) = self.live_socket() else { return };
                self.sockets[i].gone = true;
                let socket = self.sockets[i].id;
                self.registry.send(Disconnect { socket }).await.unwrap();
                // From here on nothing may arrive.
                self.barrier().await;
                let mut r = self.sockets[i].rx.lock().unwrap();
                r.closed = true;
            }
            31..=33 => {
                step = "connect";
                if self.sockets.iter().filter(|s| !s.gone).count() < 5 {
                    self.connect().await;
                }
            }
            34..=63 => {
                step = "batch";
                let Some(run_id) = self.runs.get(&session.id).cloned() else {
                    return;
                };
                if self
                    .in_flight
                    .get(&run_id)
                    .is_some_and(|h| !h.is_finished())
                {
                    return;
                }
                let events = self.batch(&session.id, &run_id);
                let msg = RunEvents {
                    session_id: session.id.clone(),
                    run_id: run_id.clone(),
                    events,
                    read_at: None,
                };
                let registry = self.registry.clone();
                let handle = tokio::task::spawn_local(async move {
                    let _ = registry.send(msg).await;
                });
                self.in_flight.insert(run_id, handle);
            }
            64..=68 => {
                step = "exit";
                let Some(run_id) = self.runs.get(&session.id).cloned() else {
                    return;
                };
                let crash = self.rng.chance(50);
                self.registry
                    .send(RunExited {
                        session_id: session.id.clone(),
                        run_id,
                        exit_code: if crash {
                            None
                        } else {
                            Some(self.rng.below(3) as i32)
                        },
                        error: crash.then(|| "crashed".to_string()),
                    })
                    .await
                    .unwrap();
            }
            69..=71 => {
                step = "stale";
                // A late exit or batch of an earlier run of any session.
                if self.all_runs.is_empty() {
                    return;
                }
                let (run_id, sid) =
                    self.all_runs[self.rng.below(self.all_runs.len() as u64) as usize].clone();
                if self.runs.get(&sid) == Some(&run_id) {
                    return;
                }
                self.registry
                    .send(RunExited {
                        session_id: sid,
                        run_id,
                        exit_code: Some(0),
                        error: None,
                    })
                    .await
                    .unwrap();
            }
            _ => {
                step = "drain";
                let Some(i) = self.live_socket() else { return };
                let all = self.rng.chance(30);
                self.drain(i, all).await;
            }
        }
        // Let spawned batches and deliveries settle, then check.
        tokio::task::yield_now().await;
        self.barrier().await;
        if std::env::var_os("MODEL_TRACE").is_some() {
            eprintln!("step {step} session {} runs {:?}", session.id, self.runs);
        }
        self.check(step);
    }
}

async fn run_case(seed: u64) {
    let config = Arc::new(GatewayConfig::for_tests(std::env::temp_dir()));
    let store: Store = Arc::new(MemStore::default());
    let registry = RunRegistry::with_providers(config, store, no_process)
        .without_processes()
        .start();
    let mut case = Case {
        rng: Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1),
        registry,
        sockets: Vec::new(),
        sessions: Vec::new(),
        runs: HashMap::new(),
        all_runs: Vec::new(),
        completes: HashMap::new(),
        in_flight: HashMap::new(),
        next_request: 0,
        seed,
    };
    let n_sessions = 1 + case.rng.below(2);
    for i in 0..n_sessions {
        case.sessions.push(session_row(&format!("s{i}")));
    }
    for _ in 0..1 + case.rng.below(3) {
        case.connect().await;
    }
    let steps = 20 + case.rng.below(60);
    for _ in 0..steps {
        case.step().await;
    }
    // Wind down: abort what runs, drain everything until nothing moves.
    for s in case.sessions.clone() {
        let _ = case
            .registry
            .send(AbortRun {
                user_id: 1,
                session_id: s.id.clone(),
            })
            .await;
    }
    for _ in 0..200 {
        for i in 0..case.sockets.len() {
            if !case.sockets[i].gone {
                case.drain(i, true).await;
            }
        }
        tokio::task::yield_now().await;
        case.barrier().await;
        case.check("wind down");
        let idle = case.sockets.iter().all(|s| {
            let r = s.rx.lock().unwrap();
            s.gone || (r.bytes_unacked == 0 && r.batches_unacked == 0)
        });
        if idle {
            break;
        }
    }
    // Nothing was skipped silently (checked at every step), and every
    // socket still following a session got it to its end: the same last
    // seq as the furthest socket (an aborted run ends with its complete).
    let ended: BTreeMap<&String, usize> =
        case.completes.iter().map(|(r, s)| (r, s.len())).collect();
    assert!(ended.values().all(|n| *n == 1), "seed {seed}: {ended:?}");
    let mut furthest: HashMap<String, u64> = HashMap::new();
    for s in &case.sockets {
        for (sid, last) in &s.last {
            let f = furthest.entry(sid.clone()).or_insert(0);
            *f = (*f).max(*last);
        }
    }
    if std::env::var_os("MODEL_TRACE").is_some() {
        eprintln!("{}", case.registry.send(Inspect).await.unwrap());
    }
    for s in case.sockets.iter().filter(|s| !s.gone) {
        for (sid, last) in &s.last {
            let end = furthest[sid];
            let asked = s.asked.get(sid).copied().unwrap_or(0);
            assert!(
                *last == end || asked >= end,
                "seed {seed}: socket {} stopped at {last} of session {sid}, which went to {end}",
                s.id
            );
        }
    }
    let _ = &case.all_runs;
}

#[test]
fn random_interleavings_keep_the_delivery_invariants() {
    let cases: u64 = std::env::var("MODEL_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000);
    let first: u64 = std::env::var("MODEL_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let system = actix::System::new();
    system.block_on(async move {
        let local = tokio::task::LocalSet::new();
        local
            .run_until(async move {
                for seed in first..first + cases {
                    run_case(seed).await;
                }
            })
            .await;
    });
}
