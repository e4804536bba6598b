//! `ClusterBus`: this node's link to Redis in cluster mode (one per node).
//!
//! **Owns** the two Redis connections (one for commands and scripts, one
//! for the blocking stream reads), whether Redis is reachable, the leases
//! this node holds (per session: the run, its `running` entry, the frames
//! not yet in the session's stream and the recent ones, republished after
//! Redis comes back), the sessions this node follows (the last seq read of
//! each) and the commands it routed to other nodes and awaits answers for.
//!
//! **Handles** from the `RunRegistry`: [`AcquireLease`], [`RegisterRun`],
//! [`ReleaseLease`], [`Publish`], [`RunDone`] (owner side), [`Follow`],
//! [`Unfollow`], [`SendFlow`] (follower side), [`PublishUpsert`],
//! [`ListClusterRuns`], [`RouteCommand`]; [`AttachRegistry`] and [`Drain`]
//! from the binary.
//!
//! **Sends** [`RemoteEvents`], [`RemoteUpsert`], [`LeaseLost`],
//! [`PublishBacklog`] and [`RemoteFlow`] (a follower's `Command::Flow`
//! notice) to the registry, and the registry's own
//! `AbortRun`/`RespondPermission` for a command another node routed here.
//!
//! **Timers**: reconnect every [`RECONNECT_EVERY`] while Redis is down;
//! lease renewal every third of the lease; the node-loss sweep every half
//! lease; a PING every second (so a lost Redis is noticed while idle).
//!
//! **Bounds**: per held lease at most [`BACKLOG_MAX`] frames are kept
//! (shared with the registry's replay buffer, so cheap). While Redis is
//! reachable, more than [`PUBLISH_WINDOW`] of them not yet in the stream
//! make the run wait ([`PublishBacklog`]: backpressure, so a run faster
//! than Redis takes its frames never drops one). Only when Redis is down
//! that long are the oldest unpublished ones dropped (logged) and
//! followers see a gap (they are closed with 4008 and resubscribe:
//! `replayTruncated`). One publish pipeline and one stream read are in
//! flight at a time; a read takes at most [`READ_COUNT`] entries per
//! stream and its answer is handed to the registry (awaited) before the
//! next read, so a slow registry slows the reads, not memory. Routed
//! commands wait at most [`COMMAND_TIMEOUT`].

use std::collections::hash_map::Entry;
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Value};
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use super::*;
use crate::chat::run_registry::{
    AbortRun, RunRegistry, COMPLETED_RUN_RETENTION, REPLAY_MAX_EVENTS,
};
use crate::protocol::{now_iso, ChatError, Envelope, ErrorCode, EventBody, PermissionDecision};

/// How often a lost Redis is tried again.
pub const RECONNECT_EVERY: Duration = Duration::from_millis(500);
/// Frames kept per held lease (unpublished ones and the recent ones).
pub const BACKLOG_MAX: usize = REPLAY_MAX_EVENTS;
/// Most frames in one publish script call.
const PUBLISH_BATCH: usize = 512;
/// Frames of a session not yet in its stream above which its run waits
/// (the registry is told [`PublishBacklog`]), while Redis is reachable: the
/// run goes at the pace Redis takes its frames, so what a follower lacks
/// is never more than this behind the owner and is never dropped. It goes
/// on once they are down to [`PUBLISH_BATCH`]. While Redis is down the run
/// goes on and [`BACKLOG_MAX`] applies.
pub const PUBLISH_WINDOW: usize = 2 * PUBLISH_BATCH;
/// Stream entries read per stream per read.
pub const READ_COUNT: usize = 512;
/// How long one stream read blocks in Redis (a new follow waits at most this).
const READ_BLOCK_MS: u64 = 100;
/// Answers from Redis slower than this count as Redis lost.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(5);
/// A routed command unanswered this long gets an error.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(5);
/// Entries kept in the command and upsert streams.
const SMALL_STREAM_MAXLEN: usize = 1000;

/// What a node is started with (`--redis-url`, `--node-id`, `--cluster-lease-ms`).
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    pub redis_url: String,
    pub node_id: String,
    pub lease: Duration,
}

const SCRIPTS: [&str; 5] = [
    ACQUIRE_LUA,
    REASSERT_LUA,
    PUBLISH_LUA,
    RELEASE_LUA,
    REAP_LUA,
];
const ACQUIRE: usize = 0;
const REASSERT: usize = 1;
const PUBLISH: usize = 2;
const RELEASE: usize = 3;
const REAP: usize = 4;

struct Lease {
    run_id: String,
    value: String,
    /// The `node` of its stream entries: the run's node (this one, or for
    /// a reap the lost node, so every node, this one included, delivers them).
    owner: String,
    meta: RunMeta,
    /// The run completed: the lease is released once its frames are in.
    done: bool,
    /// Frames of the session, oldest first: those above `published` are
    /// not in the stream yet; the others are kept for a republish.
    frames: VecDeque<Outgoing>,
    published: u64,
    /// The registry was told its run must wait for the publishing ([`PUBLISH_WINDOW`]).
    backlog_full: bool,
}

impl Lease {
    /// Frames not in the stream yet (`frames` is in seq order).
    fn unpublished(&self) -> usize {
        self.frames.len() - self.frames.partition_point(|o| o.seq <= self.published)
    }
}

pub struct ClusterBus {
    config: ClusterConfig,
    node: Arc<str>,
    client: redis::Client,
    cmd: Option<MultiplexedConnection>,
    reader: Option<MultiplexedConnection>,
    /// The reader connection's `CLIENT ID`, to end its blocking read early
    /// (`CLIENT UNBLOCK`) when a new stream is to be read; `None` where
    /// Redis refuses `CLIENT` (then a new stream waits for the block's end).
    reader_id: Option<i64>,
    shas: Vec<String>,
    connecting: bool,
    /// Redis was reachable once (for the first `cluster.connected`).
    was_connected: bool,
    registry: Option<Addr<RunRegistry>>,
    leases: HashMap<String, Lease>,
    flushing: bool,
    reading: bool,
    sweeping: bool,
    /// Followed sessions and the last seq read of each.
    follows: HashMap<String, u64>,
    cmd_cursor: String,
    upsert_cursor: String,
    /// Routed commands waiting for their answer, by command id.
    waiting: HashMap<String, oneshot::Sender<Result<(), ChatError>>>,
    drain_waiters: Vec<oneshot::Sender<()>>,
}

impl ClusterBus {
    /// Fails on a malformed URL (not on an unreachable server: that is retried).
    pub fn new(config: ClusterConfig) -> Result<ClusterBus, String> {
        let client = redis::Client::open(config.redis_url.as_str())
            .map_err(|e| format!("--redis-url {}: {e}", redact(&config.redis_url)))?;
        Ok(ClusterBus {
            node: config.node_id.as_str().into(),
            config,
            client,
            cmd: None,
            reader: None,
            reader_id: None,
            shas: Vec::new(),
            connecting: false,
            was_connected: false,
            registry: None,
            leases: HashMap::new(),
            flushing: false,
            reading: false,
            sweeping: false,
            follows: HashMap::new(),
            cmd_cursor: String::new(),
            upsert_cursor: String::new(),
            waiting: HashMap::new(),
            drain_waiters: Vec::new(),
        })
    }

    pub fn node_id(&self) -> &str {
        &self.node
    }

    fn lease_ms(&self) -> u64 {
        self.config.lease.as_millis() as u64
    }

    fn evalsha(&self, script: usize, keys: &[&str]) -> redis::Cmd {
        let mut c = redis::cmd("EVALSHA");
        c.arg(&self.shas[script]).arg(keys.len()).arg(keys);
        c
    }

    fn connect(&mut self, ctx: &mut Context<Self>) {
        if self.connecting || self.cmd.is_some() {
            return;
        }
        self.connecting = true;
        let client = self.client.clone();
        let connect = async move {
            let config = AsyncConnectionConfig::new()
                .set_connection_timeout(Some(Duration::from_secs(1)))
                .set_response_timeout(Some(RESPONSE_TIMEOUT));
            let mut cmd = client
                .get_multiplexed_async_connection_with_config(&config)
                .await?;
            let mut reader = client
                .get_multiplexed_async_connection_with_config(&config)
                .await?;
            let reader_id: Option<i64> = redis::cmd("CLIENT")
                .arg("ID")
                .query_async(&mut reader)
                .await
                .ok();
            let mut shas = Vec::new();
            for code in SCRIPTS {
                let sha: String = redis::cmd("SCRIPT")
                    .arg("LOAD")
                    .arg(code)
                    .query_async(&mut cmd)
                    .await?;
                shas.push(sha);
            }
            let (secs, micros): (u64, u64) = redis::cmd("TIME").query_async(&mut cmd).await?;
            let now_ms = secs * 1000 + micros / 1000;
            Ok::<_, redis::RedisError>((cmd, (reader, reader_id), shas, now_ms))
        };
        ctx.spawn(connect.into_actor(self).map(|result, act, ctx| {
            act.connecting = false;
            match result {
                Ok((cmd, reader, shas, now_ms)) => act.connected(cmd, reader, shas, now_ms, ctx),
                Err(err) => {
                    if !act.was_connected {
                        tracing::warn!(event = "cluster.unreachable", node_id = %act.node, %err, "cluster: Redis unreachable; retrying");
                    }
                    ctx.run_later(RECONNECT_EVERY, |act, ctx| act.connect(ctx));
                }
            }
        }));
    }

    fn connected(
        &mut self,
        cmd: MultiplexedConnection,
        (reader, reader_id): (MultiplexedConnection, Option<i64>),
        shas: Vec<String>,
        now_ms: u64,
        ctx: &mut Context<Self>,
    ) {
        self.cmd = Some(cmd);
        self.reader = Some(reader);
        self.reader_id = reader_id;
        self.shas = shas;
        // New entries only; after a reconnect the cursors go on (Redis
        // may have kept them, and ids of a restarted Redis are above them).
        if self.cmd_cursor.is_empty() {
            self.cmd_cursor = format!("{now_ms}-0");
            self.upsert_cursor = format!("{now_ms}-0");
        }
        tracing::info!(event = "cluster.connected", node_id = %self.node, redis = %redact(&self.config.redis_url), leases = self.leases.len(), follows = self.follows.len(), "cluster: connected to Redis");
        self.was_connected = true;
        // Redis may have come back empty (it keeps nothing on disk): the
        // leases are put back and every kept frame is offered again
        // (those already in a stream are refused there).
        for lease in self.leases.values_mut() {
            lease.published = 0;
        }
        self.backlog_check_all();
        self.renew(ctx);
        self.flush(ctx);
        self.read(ctx);
    }

    /// A Redis call failed: drop the connections and reconnect.
    fn lost(&mut self, err: &redis::RedisError, ctx: &mut Context<Self>) {
        if self.cmd.is_none() {
            return;
        }
        self.cmd = None;
        self.reader = None;
        // Local sockets keep receiving local runs while Redis is down.
        self.backlog_check_all();
        tracing::warn!(event = "cluster.disconnected", node_id = %self.node, %err, "cluster: lost Redis; new runs are refused (CLUSTER_UNAVAILABLE) until it is back");
        ctx.run_later(RECONNECT_EVERY, |act, ctx| act.connect(ctx));
    }

    /// Renews (or puts back) every held lease; a lost one ends its run here.
    fn renew(&mut self, ctx: &mut Context<Self>) {
        let Some(mut con) = self.cmd.clone() else {
            return;
        };
        if self.leases.is_empty() {
            return;
        }
        let mut pipe = redis::pipe();
        let mut order = Vec::new();
        // A completed run's lease is only kept until its frames are in.
        for (session, lease) in self.leases.iter().filter(|(_, l)| !l.done) {
            let entry = lease.meta.to_json();
            pipe.add_command(
                self.evalsha(
                    REASSERT,
                    &[
                        &lease_key(session),
                        RUNNING_KEY,
                        &meta_key(session),
                        &reaped_key(&lease.run_id),
                    ],
                )
                .arg(&lease.value)
                .arg(self.lease_ms())
                .arg(session)
                .arg(entry)
                .arg(lease.meta.to_json())
                .clone(),
            );
            order.push((session.clone(), lease.value.clone()));
        }
        if order.is_empty() {
            return;
        }
        let query = async move { pipe.query_async::<Vec<i64>>(&mut con).await };
        ctx.spawn(
            query
                .into_actor(self)
                .map(move |result, act, ctx| match result {
                    Ok(held) => {
                        for ((session, value), held) in order.into_iter().zip(held) {
                            if held == 0 {
                                act.lease_lost(&session, &value);
                            }
                        }
                    }
                    Err(err) => act.lost(&err, ctx),
                }),
        );
    }

    fn lease_lost(&mut self, session: &str, value: &str) {
        let Some(lease) = self.leases.get(session).filter(|l| l.value == value) else {
            return;
        };
        let run_id = lease.run_id.clone();
        self.remove_lease(session);
        tracing::warn!(event = "cluster.lease_lost", node_id = %self.node, session_id = session, run_id = %run_id, "cluster: this node lost the session's lease (another node ended or took the run); stopping the run here");
        if let Some(registry) = &self.registry {
            registry.do_send(LeaseLost {
                session_id: session.to_string(),
                run_id,
            });
        }
        self.drained();
    }

    /// Sends the frames not yet in their streams, one pipeline at a time,
    /// then releases the leases of completed runs that are all in.
    fn flush(&mut self, ctx: &mut Context<Self>) {
        if self.flushing {
            return;
        }
        let Some(mut con) = self.cmd.clone() else {
            return;
        };
        let mut pipe = redis::pipe();
        let mut batches = Vec::new();
        for (session, lease) in &self.leases {
            let pending: Vec<&Outgoing> = lease
                .frames
                .iter()
                .filter(|o| o.seq > lease.published)
                .take(PUBLISH_BATCH)
                .collect();
            let Some(last) = pending.last().map(|o| o.seq) else {
                continue;
            };
            let ends = pending
                .iter()
                .any(|o| o.kind == "complete" && *o.run_id == *lease.run_id);
            let mut c = self.evalsha(
                PUBLISH,
                &[
                    &events_key(session),
                    &lease_key(session),
                    &reaped_key(&lease.run_id),
                    RUNNING_KEY,
                    &meta_key(session),
                ],
            );
            c.arg(&lease.value)
                .arg(BACKLOG_MAX)
                .arg(&lease.owner)
                .arg(self.lease_ms())
                .arg(COMPLETED_RUN_RETENTION.as_millis() as u64)
                .arg(session);
            for o in pending {
                c.arg(o.seq)
                    .arg(&*o.run_id)
                    .arg(o.kind)
                    .arg(o.frame.as_bytes().as_ref());
            }
            pipe.add_command(c);
            batches.push((session.clone(), lease.value.clone(), last, ends));
        }
        if batches.is_empty() {
            self.release_done(ctx);
            return;
        }
        self.flushing = true;
        let query = async move { pipe.query_async::<Vec<i64>>(&mut con).await };
        ctx.spawn(query.into_actor(self).map(move |result, act, ctx| {
            act.flushing = false;
            match result {
                Ok(answers) => {
                    let mut refused = false;
                    for ((session, value, last, ends), added) in batches.into_iter().zip(answers) {
                        let Some(lease) = act.leases.get_mut(&session).filter(|l| l.value == value)
                        else {
                            continue;
                        };
                        if added < 0 && lease.done {
                            tracing::warn!(event = "cluster.lease_lost", node_id = %act.node, session_id = %session, run_id = %lease.run_id, "cluster: the last frames of a completed run were refused (another node holds the session now)");
                            act.remove_lease(&session);
                            act.drained();
                        } else if added < 0 {
                            // Another node holds the lease or reaped the
                            // run: the renewal finds it lost and stops it.
                            refused = true;
                        } else if ends {
                            // The complete freed the session in Redis. What
                            // follows in the stream is another run's.
                            act.remove_lease(&session);
                            if let Some(cursor) = act.follows.get_mut(&session) {
                                *cursor = (*cursor).max(last);
                            }
                            act.drained();
                        } else {
                            lease.published = lease.published.max(last);
                            act.backlog_check(&session);
                        }
                    }
                    if refused {
                        act.renew(ctx);
                        ctx.run_later(Duration::from_millis(50), |act, ctx| act.flush(ctx));
                    } else {
                        act.flush(ctx);
                    }
                }
                Err(err) => act.lost(&err, ctx),
            }
        }));
    }

    /// Releases the leases of completed runs whose frames are all in.
    fn release_done(&mut self, ctx: &mut Context<Self>) {
        let Some(mut con) = self.cmd.clone() else {
            return;
        };
        let done: Vec<String> = self
            .leases
            .iter()
            .filter(|(_, l)| l.done && l.frames.back().is_none_or(|o| o.seq <= l.published))
            .map(|(s, _)| s.clone())
            .collect();
        if done.is_empty() {
            self.drained();
            return;
        }
        let retention = COMPLETED_RUN_RETENTION.as_millis() as u64;
        let mut pipe = redis::pipe();
        for session in &done {
            let Some(lease) = self.remove_lease(session) else {
                continue;
            };
            let mut completed = lease.meta.clone();
            completed.completed = true;
            completed.last_seq = lease.frames.back().map_or(0, |o| o.seq);
            pipe.add_command(
                self.evalsha(
                    RELEASE,
                    &[
                        &lease_key(session),
                        RUNNING_KEY,
                        &meta_key(session),
                        &events_key(session),
                    ],
                )
                .arg(&lease.value)
                .arg(session)
                .arg(lease.meta.to_json())
                .arg(completed.to_json())
                .arg(retention)
                .clone(),
            );
        }
        let query = async move { pipe.query_async::<Vec<i64>>(&mut con).await };
        ctx.spawn(query.into_actor(self).map(|result, act, ctx| {
            if let Err(err) = result {
                // The lease then expires by itself, and the `running` entry
                // is swept (a failed `complete` after the real one is
                // refused: its seq is taken).
                act.lost(&err, ctx);
            }
            act.drained();
        }));
    }

    /// Tells the registry when the session's run must wait for its frames
    /// to reach the stream ([`PUBLISH_WINDOW`]) and when it may go on.
    fn backlog_check(&mut self, session: &str) {
        let connected = self.cmd.is_some();
        let Some(lease) = self.leases.get_mut(session) else {
            return;
        };
        let unpublished = lease.unpublished();
        let full = connected
            && if lease.backlog_full {
                unpublished > PUBLISH_BATCH
            } else {
                unpublished > PUBLISH_WINDOW
            };
        if full == lease.backlog_full {
            return;
        }
        lease.backlog_full = full;
        if let Some(registry) = &self.registry {
            registry.do_send(PublishBacklog {
                session_id: session.to_string(),
                full,
            });
        }
    }

    /// [`Self::backlog_check`] for every lease (Redis came or went).
    fn backlog_check_all(&mut self) {
        let sessions: Vec<String> = self.leases.keys().cloned().collect();
        for session in sessions {
            self.backlog_check(&session);
        }
    }

    /// A lease ends here; a run that waited for its publishing no longer does.
    fn remove_lease(&mut self, session: &str) -> Option<Lease> {
        let lease = self.leases.remove(session)?;
        if self.follows.contains_key(session) {
            // Its stream is read from now on (another node's next run).
            self.unblock_reader();
        }
        if lease.backlog_full {
            if let Some(registry) = &self.registry {
                registry.do_send(PublishBacklog {
                    session_id: session.to_string(),
                    full: false,
                });
            }
        }
        Some(lease)
    }

    fn drained(&mut self) {
        if self.leases.is_empty() {
            for waiter in self.drain_waiters.drain(..) {
                let _ = waiter.send(());
            }
        }
    }

    /// One blocking read of every followed stream, this node's command
    /// stream and the upsert stream; what came is handed to the registry
    /// before the next read.
    fn read(&mut self, ctx: &mut Context<Self>) {
        if self.reading {
            return;
        }
        let Some(mut con) = self.reader.clone() else {
            return;
        };
        self.reading = true;
        let mut keys = vec![cmd_key(&self.node), UPSERTS_KEY.to_string()];
        let mut ids = vec![self.cmd_cursor.clone(), self.upsert_cursor.clone()];
        // A session whose lease this node holds has only this node's frames
        // in its stream until the lease ends (then its cursor moves past them).
        for (session, seq) in self
            .follows
            .iter()
            .filter(|(s, _)| self.leases.get(*s).is_none_or(|l| l.owner != *self.node))
        {
            keys.push(events_key(session));
            ids.push(stream_id(*seq));
        }
        let mut c = redis::cmd("XREAD");
        c.arg("COUNT")
            .arg(READ_COUNT)
            .arg("BLOCK")
            .arg(READ_BLOCK_MS)
            .arg("STREAMS")
            .arg(&keys)
            .arg(&ids);
        let query = async move { c.query_async::<Value>(&mut con).await };
        ctx.spawn(
            query
                .into_actor(self)
                .then(|result, act, ctx| {
                    let handed: Pin<Box<dyn Future<Output = ()>>> = match result {
                        Ok(answer) => act.on_read(&answer, ctx),
                        Err(err) => {
                            act.lost(&err, ctx);
                            Box::pin(async {})
                        }
                    };
                    handed.into_actor(act)
                })
                .map(|_, act, ctx| {
                    act.reading = false;
                    act.read(ctx);
                }),
        );
    }

    /// Ends the reader's blocking `XREAD` now, as if it had timed out; the
    /// read loop then reads again, with the streams as they are by then.
    /// A no-op if the read is not blocked yet (its command still on its way
    /// to Redis): that read waits out its block as before.
    fn unblock_reader(&self) {
        if !self.reading {
            return;
        }
        let (Some(id), Some(mut con)) = (self.reader_id, self.cmd.clone()) else {
            return;
        };
        let unblock = async move {
            let _: redis::RedisResult<i64> = redis::cmd("CLIENT")
                .arg("UNBLOCK")
                .arg(id)
                .query_async(&mut con)
                .await;
        };
        actix::spawn(unblock);
    }

    fn on_read(
        &mut self,
        answer: &Value,
        ctx: &mut Context<Self>,
    ) -> Pin<Box<dyn Future<Output = ()>>> {
        let cmd_stream = cmd_key(&self.node);
        let mut handoffs = Vec::new();
        for (key, entries) in parse_xread(answer) {
            if key == cmd_stream {
                for (id, fields) in entries {
                    self.cmd_cursor = id;
                    self.on_command(fields, ctx);
                }
            } else if key == UPSERTS_KEY {
                for (id, fields) in entries {
                    self.upsert_cursor = id;
                    self.on_upsert(fields);
                }
            } else if let Some(session) = key.strip_prefix(&format!("{PREFIX}events:")) {
                let entries_len = entries.len();
                let events: Vec<RemoteEvent> = entries
                    .into_iter()
                    .filter_map(|(id, f)| remote_event(&id, f))
                    .collect();
                // A full answer: the stream has more for it than was read.
                let more = entries_len >= READ_COUNT;
                let Some(last) = events.last().map(|e| e.seq) else {
                    continue;
                };
                let Some(cursor) = self.follows.get_mut(session) else {
                    continue;
                };
                *cursor = (*cursor).max(last);
                if let Some(registry) = &self.registry {
                    handoffs.push(registry.send(RemoteEvents {
                        session_id: session.to_string(),
                        events,
                        more,
                    }));
                }
            }
        }
        Box::pin(async move {
            for handoff in handoffs {
                let _ = handoff.await;
            }
        })
    }

    fn on_upsert(&mut self, fields: Vec<(String, Vec<u8>)>) {
        let (mut node, mut user, mut frame) = (None, None, None);
        for (k, v) in fields {
            match k.as_str() {
                "node" => node = String::from_utf8(v).ok(),
                "user" => {
                    user = String::from_utf8(v)
                        .ok()
                        .and_then(|u| u.parse::<i64>().ok())
                }
                "frame" => frame = crate::protocol::Frame::try_from(v).ok(),
                _ => {}
            }
        }
        let (Some(node), Some(user_id), Some(frame)) = (node, user, frame) else {
            return;
        };
        if node == *self.node {
            return;
        }
        if let Some(registry) = &self.registry {
            registry.do_send(RemoteUpsert { user_id, frame });
        }
    }

    /// A command entry: a request from another node (run it on the
    /// registry, answer on its command stream) or the answer to ours.
    fn on_command(&mut self, fields: Vec<(String, Vec<u8>)>, ctx: &mut Context<Self>) {
        let Some(body) = fields
            .into_iter()
            .find(|(k, _)| k == "msg")
            .and_then(|(_, v)| serde_json::from_slice::<Wire>(&v).ok())
        else {
            return;
        };
        match body {
            Wire::Reply { id, error } => {
                if let Some(waiter) = self.waiting.remove(&id) {
                    let _ = waiter.send(match error {
                        None => Ok(()),
                        Some((code, message)) => Err(ChatError::new(
                            ErrorCode::parse(&code).unwrap_or(ErrorCode::InternalError),
                            message,
                        )),
                    });
                }
            }
            Wire::Notice {
                from,
                command:
                    Command::Flow {
                        session_id,
                        run_id,
                        wait,
                    },
            } => {
                if let Some(registry) = &self.registry {
                    registry.do_send(RemoteFlow {
                        session_id,
                        run_id,
                        node: from,
                        wait,
                    });
                }
            }
            Wire::Notice { .. } => {}
            Wire::Request { id, from, command } => {
                let Some(registry) = self.registry.clone() else {
                    return;
                };
                let run = async move {
                    match command {
                        Command::Abort {
                            user_id,
                            session_id,
                        } => registry
                            .send(AbortRun {
                                user_id,
                                session_id,
                            })
                            .await
                            .unwrap_or_else(|_| {
                                Err(ChatError::new(ErrorCode::InternalError, "registry gone"))
                            }),
                        Command::Permission {
                            user_id,
                            request_id,
                            decision,
                        } => {
                            let _ = registry
                                .send(crate::chat::run_registry::RespondPermission {
                                    user_id,
                                    request_id,
                                    decision,
                                })
                                .await;
                            Ok(())
                        }
                        // Sent as a notice; a request of it is answered.
                        Command::Flow { .. } => Ok(()),
                    }
                };
                ctx.spawn(run.into_actor(self).map(move |result, act, ctx| {
                    let reply = Wire::Reply {
                        id,
                        error: result
                            .err()
                            .map(|e| (e.code.as_str().to_string(), e.message)),
                    };
                    act.send_wire(&from, &reply, ctx);
                }));
            }
        }
    }

    fn send_wire(&mut self, node: &str, wire: &Wire, ctx: &mut Context<Self>) -> bool {
        let Some(mut con) = self.cmd.clone() else {
            return false;
        };
        let mut c = redis::cmd("XADD");
        c.arg(cmd_key(node))
            .arg("MAXLEN")
            .arg("~")
            .arg(SMALL_STREAM_MAXLEN)
            .arg("*")
            .arg("msg")
            .arg(serde_json::to_vec(wire).unwrap_or_default());
        let query = async move { c.query_async::<Value>(&mut con).await };
        ctx.spawn(query.into_actor(self).map(|result, act, ctx| {
            if let Err(err) = result {
                act.lost(&err, ctx);
            }
        }));
        true
    }

    /// The node-loss sweep: every `running` entry whose lease is gone is
    /// ended by exactly one node (the one whose script call finds it so).
    fn sweep(&mut self, ctx: &mut Context<Self>) {
        if self.sweeping {
            return;
        }
        let Some(mut con) = self.cmd.clone() else {
            return;
        };
        self.sweeping = true;
        let scan = async move {
            let entries: HashMap<String, Vec<u8>> = redis::cmd("HGETALL")
                .arg(RUNNING_KEY)
                .query_async(&mut con)
                .await?;
            Ok::<_, redis::RedisError>((entries, con))
        };
        ctx.spawn(
            scan.into_actor(self)
                .then(|result, act, _| {
                    let (entries, mut con) = match result {
                        Ok(r) => r,
                        Err(err) => {
                            return Box::pin(fut::ready(Err(err))) as SweepFuture;
                        }
                    };
                    let lease_ms = act.lease_ms();
                    let retention = COMPLETED_RUN_RETENTION.as_millis() as u64;
                    let mut pipe = redis::pipe();
                    let mut candidates = Vec::new();
                    for (session, entry) in entries {
                        // Our own live runs renew their leases; a held lease is skipped by the script anyway.
                        if act.leases.contains_key(&session) {
                            continue;
                        }
                        let Some(meta) = RunMeta::parse(&entry) else {
                            continue;
                        };
                        pipe.add_command(
                            act.evalsha(
                                REAP,
                                &[
                                    &lease_key(&session),
                                    RUNNING_KEY,
                                    &events_key(&session),
                                    &reaped_key(&meta.run_id),
                                ],
                            )
                            .arg(&session)
                            .arg(&entry)
                            .arg(&*act.node)
                            .arg(lease_ms)
                            .arg(retention)
                            .arg(&meta.run_id)
                            .clone(),
                        );
                        candidates.push((session, meta));
                    }
                    Box::pin(
                        async move {
                            if candidates.is_empty() {
                                return Ok((Vec::new(), Vec::new()));
                            }
                            let won: Vec<Option<String>> = pipe.query_async(&mut con).await?;
                            Ok((candidates, won))
                        }
                        .into_actor(act),
                    )
                })
                .map(|result, act, ctx| {
                    act.sweeping = false;
                    match result {
                        Ok((candidates, won)) => {
                            for ((session, meta), last) in candidates.into_iter().zip(won) {
                                if let Some(last) = last.as_deref().and_then(seq_of) {
                                    act.reap(session, meta, last, ctx);
                                }
                            }
                        }
                        Err(err) => act.lost(&err, ctx),
                    }
                }),
        );
    }

    /// This node won the reap of a lost node's run: one `error` naming the
    /// node and one failed `complete`, after the stream's last seq, through
    /// the same publish path (so every follower on every node gets them).
    fn reap(&mut self, session: String, meta: RunMeta, last: u64, ctx: &mut Context<Self>) {
        tracing::warn!(event = "cluster.run_reaped", node_id = %self.node, lost_node = %meta.node, session_id = %session, run_id = %meta.run_id, last_seq = last, "cluster: the node owning a run was lost; ending its run");
        let run_id: Arc<str> = meta.run_id.as_str().into();
        let frame = |seq: u64, body: &EventBody| {
            Envelope {
                id: &format!("{}:{seq}", meta.run_id),
                session_id: &session,
                timestamp: &now_iso(),
                provider: &meta.provider,
                seq,
                run_id: &meta.run_id,
                parent_tool_use_id: None,
                body,
            }
            .to_frame()
        };
        let error = EventBody::error(format!(
            "node {} was lost; its run was ended by node {}",
            meta.node, self.node
        ));
        let complete = EventBody::Complete {
            actual_session_id: session.clone(),
            exit_code: 1,
            success: false,
            aborted: false,
        };
        let frames = VecDeque::from(vec![
            Outgoing {
                seq: last + 1,
                run_id: run_id.clone(),
                kind: "error",
                frame: frame(last + 1, &error),
            },
            Outgoing {
                seq: last + 2,
                run_id,
                kind: "complete",
                frame: frame(last + 2, &complete),
            },
        ]);
        self.leases.insert(
            session,
            Lease {
                run_id: meta.run_id.clone(),
                value: lease_value(&self.node, &meta.run_id),
                owner: meta.node.clone(),
                meta,
                done: true,
                frames,
                published: last,
                backlog_full: false,
            },
        );
        self.flush(ctx);
    }
}

type SweepFuture = ResponseActFuture<
    ClusterBus,
    Result<(Vec<(String, RunMeta)>, Vec<Option<String>>), redis::RedisError>,
>;

/// A message on a node's command stream.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
enum Wire {
    Request {
        id: String,
        from: String,
        command: Command,
    },
    Reply {
        id: String,
        /// (code, message) of a refusal.
        error: Option<(String, String)>,
    },
    /// A command that gets no answer.
    Notice { from: String, command: Command },
}

/// A command for the run's owner node.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "c", rename_all = "snake_case")]
pub enum Command {
    Abort {
        user_id: i64,
        session_id: String,
    },
    Permission {
        user_id: i64,
        request_id: String,
        decision: PermissionDecision,
    },
    /// Flow control of a run from a node that follows it (a [`Wire::Notice`]):
    /// `wait` while that node's subscribers need the run to wait (renewed
    /// every [`FLOW_RENEW_EVERY`]; the owner forgets one not renewed for
    /// [`FLOW_EXPIRY`]), then `wait: false`.
    Flow {
        session_id: String,
        run_id: String,
        wait: bool,
    },
}

/// How often a follower renews its `Flow` wait while it lasts.
pub const FLOW_RENEW_EVERY: Duration = Duration::from_millis(500);
/// A `Flow` wait not renewed this long is forgotten by the owner (the
/// follower was lost, or its `wait: false` was).
pub const FLOW_EXPIRY: Duration = Duration::from_secs(3);

use std::future::Future;
use std::pin::Pin;

/// The URL without its password, for logs.
pub fn redact(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("***"));
            u.to_string()
        }
        _ => url.to_string(),
    }
}

impl Actor for ClusterBus {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        tracing::info!(event = "actor.started", actor = "ClusterBus", node_id = %self.node, lease_ms = self.lease_ms(), "actor started");
        self.connect(ctx);
        let lease = self.config.lease;
        ctx.run_interval(lease / 3, |act, ctx| act.renew(ctx));
        ctx.run_interval(lease / 2, |act, ctx| act.sweep(ctx));
        ctx.run_interval(Duration::from_secs(1), |act, ctx| {
            let Some(mut con) = act.cmd.clone() else {
                return;
            };
            let ping = async move { redis::cmd("PING").query_async::<Value>(&mut con).await };
            ctx.spawn(ping.into_actor(act).map(|result, act, ctx| {
                if let Err(err) = result {
                    act.lost(&err, ctx);
                }
            }));
        });
    }

    fn stopped(&mut self, _: &mut Context<Self>) {
        tracing::info!(event = "actor.stopped", actor = "ClusterBus", node_id = %self.node, "actor stopped");
    }
}

/// The registry this bus hands remote frames and commands to (sent once, at start).
#[derive(Message)]
#[rtype(result = "()")]
pub struct AttachRegistry(pub Addr<RunRegistry>);

impl Handler<AttachRegistry> for ClusterBus {
    type Result = ();
    fn handle(&mut self, msg: AttachRegistry, _: &mut Context<Self>) {
        self.registry = Some(msg.0);
    }
}

fn unavailable() -> ChatError {
    ChatError::new(
        ErrorCode::ClusterUnavailable,
        "The cluster (Redis) is unreachable; new runs are refused until it is back",
    )
}

/// Take the session's lease for a new run (`SET NX PX`). Answers the last
/// seq in the session's stream, `RUN_IN_PROGRESS` when another node holds
/// it, `CLUSTER_UNAVAILABLE` while Redis is unreachable.
#[derive(Message)]
#[rtype(result = "Result<u64, ChatError>")]
pub struct AcquireLease {
    pub session_id: String,
    pub meta: RunMeta,
}

impl Handler<AcquireLease> for ClusterBus {
    type Result = ResponseActFuture<Self, Result<u64, ChatError>>;

    fn handle(&mut self, msg: AcquireLease, _: &mut Context<Self>) -> Self::Result {
        let Some(mut con) = self.cmd.clone() else {
            return Box::pin(fut::ready(Err(unavailable())));
        };
        let value = lease_value(&self.node, &msg.meta.run_id);
        let mut c = self.evalsha(
            ACQUIRE,
            &[
                &lease_key(&msg.session_id),
                &events_key(&msg.session_id),
                RUNNING_KEY,
            ],
        );
        c.arg(&value)
            .arg(self.lease_ms())
            .arg(&msg.session_id)
            .arg(&*self.node);
        let query = async move { c.query_async::<String>(&mut con).await };
        Box::pin(query.into_actor(self).map(move |result, act, ctx| {
            let last = match result {
                Ok(last) => last,
                Err(err) => {
                    act.lost(&err, ctx);
                    return Err(unavailable());
                }
            };
            if last == "-1" {
                return Err(ChatError::new(
                    ErrorCode::RunInProgress,
                    "A run is already in progress for this session (on another node)",
                ));
            }
            let last = seq_of(&last).unwrap_or(0);
            // An own completed run still flushing keeps its frames (they
            // carry their run id); the lease is the new run's now.
            // (So is the registry's word on their publishing.)
            let (frames, published, backlog_full) = act
                .leases
                .remove(&msg.session_id)
                .map(|l| (l.frames, l.published, l.backlog_full))
                .unwrap_or_default();
            let session = msg.session_id.clone();
            act.leases.insert(
                msg.session_id,
                Lease {
                    run_id: msg.meta.run_id.clone(),
                    value,
                    owner: act.node.to_string(),
                    meta: msg.meta,
                    done: false,
                    frames,
                    published,
                    backlog_full,
                },
            );
            act.backlog_check(&session);
            Ok(last)
        }))
    }
}

/// The run started with these values: its `running` entry is written.
#[derive(Message)]
#[rtype(result = "()")]
pub struct RegisterRun {
    pub session_id: String,
    pub run_id: String,
    pub first_seq: u64,
    pub started_at: String,
}

impl Handler<RegisterRun> for ClusterBus {
    type Result = ();
    fn handle(&mut self, msg: RegisterRun, ctx: &mut Context<Self>) {
        let Some(lease) = self
            .leases
            .get_mut(&msg.session_id)
            .filter(|l| l.run_id == msg.run_id)
        else {
            return;
        };
        lease.meta.first_seq = msg.first_seq;
        lease.meta.started_at = msg.started_at;
        self.renew(ctx);
    }
}

/// The run did not start after all (or was refused locally): give the lease back.
#[derive(Message)]
#[rtype(result = "()")]
pub struct ReleaseLease {
    pub session_id: String,
    pub run_id: String,
}

impl Handler<ReleaseLease> for ClusterBus {
    type Result = ();
    fn handle(&mut self, msg: ReleaseLease, ctx: &mut Context<Self>) {
        self.lease_done(&msg.session_id, &msg.run_id, ctx);
    }
}

/// Sequenced frames of a run this node owns, in seq order.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Publish {
    pub session_id: String,
    pub frames: Vec<Outgoing>,
}

impl Handler<Publish> for ClusterBus {
    type Result = ();
    fn handle(&mut self, msg: Publish, ctx: &mut Context<Self>) {
        // Not (or no longer) ours: what a run prints after its complete,
        // or after its lease was lost, stays on this node.
        let Some(lease) = self.leases.get_mut(&msg.session_id) else {
            return;
        };
        let mut dropped = 0;
        for o in msg.frames {
            if lease.frames.len() >= BACKLOG_MAX {
                if let Some(old) = lease.frames.pop_front() {
                    if old.seq > lease.published {
                        dropped += 1;
                        lease.published = old.seq;
                    }
                }
            }
            lease.frames.push_back(o);
        }
        if dropped > 0 {
            tracing::error!(event = "cluster.backlog_full", node_id = %self.node, session_id = %msg.session_id, dropped, "cluster: Redis is unreachable and the backlog is full; frames dropped (followers on other nodes see a gap)");
        }
        self.backlog_check(&msg.session_id);
        self.flush(ctx);
    }
}

/// The run completed and its last frame was published: the lease is
/// released once every frame is in the stream.
#[derive(Message)]
#[rtype(result = "()")]
pub struct RunDone {
    pub session_id: String,
    pub run_id: String,
}

impl Handler<RunDone> for ClusterBus {
    type Result = ();
    fn handle(&mut self, msg: RunDone, ctx: &mut Context<Self>) {
        self.lease_done(&msg.session_id, &msg.run_id, ctx);
    }
}

impl ClusterBus {
    /// The run's lease is given back once its frames are in the stream
    /// (both for a run that ended and one that never started).
    fn lease_done(&mut self, session_id: &str, run_id: &str, ctx: &mut Context<Self>) {
        if let Some(lease) = self
            .leases
            .get_mut(session_id)
            .filter(|l| l.run_id == run_id)
        {
            lease.done = true;
            self.flush(ctx);
        }
    }
}

/// What a node needs to follow a session: its current or last run, and the
/// stream from that run's first seq (or from `from`, whichever is lower).
#[derive(Debug, Default)]
pub struct Followed {
    pub meta: Option<RunMeta>,
    pub events: Vec<RemoteEvent>,
    /// Where the stream read goes on: the registry sends it back as
    /// `Follow { from: Some(cursor) }` once it took these events, so no
    /// later entry reaches it before them.
    pub cursor: u64,
}

/// Start following a session's stream (its later entries come as
/// [`RemoteEvents`]). With Redis down it answers nothing and follows once
/// it is back.
#[derive(Message)]
#[rtype(result = "Followed")]
pub struct Follow {
    pub session_id: String,
    /// Follow from after this seq without reading anything now (the owner
    /// of a run: what comes after its run may be another node's).
    pub from: Option<u64>,
}

impl Handler<Follow> for ClusterBus {
    type Result = ResponseActFuture<Self, Followed>;

    fn handle(&mut self, msg: Follow, ctx: &mut Context<Self>) -> Self::Result {
        if let Some(from) = msg.from {
            if let Entry::Vacant(entry) = self.follows.entry(msg.session_id) {
                entry.insert(from);
                // The read under way does not name this stream: end its
                // block so the next one does. Else the run's first events
                // waited up to READ_BLOCK_MS (a cross-node p99 of 45 ms).
                self.unblock_reader();
            }
            self.read(ctx);
            return Box::pin(fut::ready(Followed::default()));
        }
        let Some(mut con) = self.cmd.clone() else {
            // Read from the start once Redis is back.
            return Box::pin(fut::ready(Followed::default()));
        };
        let session = msg.session_id.clone();
        let query = async move {
            let meta: Option<Vec<u8>> = redis::cmd("GET")
                .arg(meta_key(&session))
                .query_async(&mut con)
                .await?;
            let meta = meta.and_then(|m| RunMeta::parse(&m));
            // The current (or last) run from its first seq; without one the
            // stream is gone too (they expire together), so from its start.
            let from = meta.as_ref().map_or(0, |m| m.first_seq.saturating_sub(1));
            let entries: Value = redis::cmd("XRANGE")
                .arg(events_key(&session))
                .arg(stream_id(from + 1))
                .arg("+")
                .arg("COUNT")
                .arg(REPLAY_MAX_EVENTS)
                .query_async(&mut con)
                .await?;
            let events: Vec<RemoteEvent> = parse_entries(&entries)
                .into_iter()
                .filter_map(|(id, f)| remote_event(&id, f))
                .collect();
            Ok::<_, redis::RedisError>((meta, events, from))
        };
        Box::pin(
            query
                .into_actor(self)
                .map(move |result, act, ctx| match result {
                    Ok((meta, events, start)) => {
                        let cursor = events.last().map_or(start, |e| e.seq);
                        Followed {
                            meta,
                            events,
                            cursor,
                        }
                    }
                    Err(err) => {
                        act.lost(&err, ctx);
                        Followed::default()
                    }
                }),
        )
    }
}

/// A followed session's stream entries after `after`, read now (a
/// subscribe on this node sees what the stream has, not only what the live
/// reads brought so far). Empty while Redis is down.
#[derive(Message)]
#[rtype(result = "Vec<RemoteEvent>")]
pub struct CatchUp {
    pub session_id: String,
    pub after: u64,
}

impl Handler<CatchUp> for ClusterBus {
    type Result = ResponseActFuture<Self, Vec<RemoteEvent>>;

    fn handle(&mut self, msg: CatchUp, _: &mut Context<Self>) -> Self::Result {
        let Some(mut con) = self.cmd.clone() else {
            return Box::pin(fut::ready(Vec::new()));
        };
        let query = async move {
            redis::cmd("XRANGE")
                .arg(events_key(&msg.session_id))
                .arg(stream_id(msg.after + 1))
                .arg("+")
                .arg("COUNT")
                .arg(REPLAY_MAX_EVENTS)
                .query_async::<Value>(&mut con)
                .await
        };
        Box::pin(query.into_actor(self).map(|result, act, ctx| {
            match result {
                Ok(entries) => parse_entries(&entries)
                    .into_iter()
                    .filter_map(|(id, f)| remote_event(&id, f))
                    .collect(),
                Err(err) => {
                    act.lost(&err, ctx);
                    Vec::new()
                }
            }
        }))
    }
}

#[derive(Message)]
#[rtype(result = "()")]
pub struct Unfollow {
    pub session_id: String,
}

impl Handler<Unfollow> for ClusterBus {
    type Result = ();
    fn handle(&mut self, msg: Unfollow, _: &mut Context<Self>) {
        self.follows.remove(&msg.session_id);
    }
}

/// A `session_upserted` frame for the owner's sockets on every node.
#[derive(Message)]
#[rtype(result = "()")]
pub struct PublishUpsert {
    pub user_id: i64,
    pub frame: crate::protocol::Frame,
}

impl Handler<PublishUpsert> for ClusterBus {
    type Result = ();
    fn handle(&mut self, msg: PublishUpsert, ctx: &mut Context<Self>) {
        let Some(mut con) = self.cmd.clone() else {
            return;
        };
        let mut c = redis::cmd("XADD");
        c.arg(UPSERTS_KEY)
            .arg("MAXLEN")
            .arg("~")
            .arg(SMALL_STREAM_MAXLEN)
            .arg("*")
            .arg("node")
            .arg(&*self.node)
            .arg("user")
            .arg(msg.user_id)
            .arg("frame")
            .arg(msg.frame.as_bytes().as_ref());
        let query = async move { c.query_async::<Value>(&mut con).await };
        ctx.spawn(query.into_actor(self).map(|result, act, ctx| {
            if let Err(err) = result {
                act.lost(&err, ctx);
            }
        }));
    }
}

/// The user's runs on every node (`running` entries), with each session's last seq.
#[derive(Message)]
#[rtype(result = "Result<Vec<ClusterRun>, ChatError>")]
pub struct ListClusterRuns {
    pub user_id: i64,
}

impl Handler<ListClusterRuns> for ClusterBus {
    type Result = ResponseActFuture<Self, Result<Vec<ClusterRun>, ChatError>>;

    fn handle(&mut self, msg: ListClusterRuns, _: &mut Context<Self>) -> Self::Result {
        let Some(mut con) = self.cmd.clone() else {
            return Box::pin(fut::ready(Err(unavailable())));
        };
        let query = async move {
            let entries: HashMap<String, Vec<u8>> = redis::cmd("HGETALL")
                .arg(RUNNING_KEY)
                .query_async(&mut con)
                .await?;
            let mine: Vec<(String, RunMeta)> = entries
                .into_iter()
                .filter_map(|(s, e)| Some((s, RunMeta::parse(&e)?)))
                .filter(|(_, m)| m.user_id == msg.user_id)
                .collect();
            let mut pipe = redis::pipe();
            for (session, _) in &mine {
                pipe.cmd("XREVRANGE")
                    .arg(events_key(session))
                    .arg("+")
                    .arg("-")
                    .arg("COUNT")
                    .arg(1);
            }
            let lasts: Vec<Value> = if mine.is_empty() {
                Vec::new()
            } else {
                pipe.query_async(&mut con).await?
            };
            Ok::<_, redis::RedisError>(
                mine.into_iter()
                    .zip(lasts)
                    .map(|((session_id, meta), last)| {
                        let last_seq = parse_entries(&last)
                            .first()
                            .and_then(|(id, _)| seq_of(id))
                            .unwrap_or(meta.first_seq.saturating_sub(1));
                        ClusterRun {
                            session_id,
                            meta,
                            last_seq,
                        }
                    })
                    .collect(),
            )
        };
        Box::pin(query.into_actor(self).map(|result, act, ctx| {
            result.map_err(|err| {
                act.lost(&err, ctx);
                unavailable()
            })
        }))
    }
}

/// A command for a run on another node; answered with the owner's answer,
/// or an error when it does not answer within [`COMMAND_TIMEOUT`].
#[derive(Message)]
#[rtype(result = "Result<(), ChatError>")]
pub struct RouteCommand {
    pub node: String,
    pub command: Command,
}

impl Handler<RouteCommand> for ClusterBus {
    type Result = ResponseFuture<Result<(), ChatError>>;

    fn handle(&mut self, msg: RouteCommand, ctx: &mut Context<Self>) -> Self::Result {
        let id = uuid::Uuid::new_v4().to_string();
        let wire = Wire::Request {
            id: id.clone(),
            from: self.node.to_string(),
            command: msg.command,
        };
        if !self.send_wire(&msg.node, &wire, ctx) {
            return Box::pin(async { Err(unavailable()) });
        }
        let (tx, rx) = oneshot::channel();
        self.waiting.insert(id.clone(), tx);
        let node = msg.node;
        let addr = ctx.address();
        Box::pin(async move {
            match tokio::time::timeout(COMMAND_TIMEOUT, rx).await {
                Ok(Ok(answer)) => answer,
                _ => {
                    addr.do_send(ForgetCommand(id));
                    Err(ChatError::new(
                        ErrorCode::ClusterUnavailable,
                        format!("node {node}, which runs this session, did not answer"),
                    ))
                }
            }
        })
    }
}

#[derive(Message)]
#[rtype(result = "()")]
struct ForgetCommand(String);

impl Handler<ForgetCommand> for ClusterBus {
    type Result = ();
    fn handle(&mut self, msg: ForgetCommand, _: &mut Context<Self>) {
        self.waiting.remove(&msg.0);
    }
}

/// Shutdown: answers once every held lease is released (each run's last
/// frames are in its stream), or after `timeout`.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Drain {
    pub timeout: Duration,
}

impl Handler<Drain> for ClusterBus {
    type Result = ResponseFuture<()>;
    fn handle(&mut self, msg: Drain, ctx: &mut Context<Self>) -> Self::Result {
        let (tx, rx) = oneshot::channel();
        self.drain_waiters.push(tx);
        self.drained();
        self.flush(ctx);
        Box::pin(async move {
            let _ = tokio::time::timeout(msg.timeout, rx).await;
        })
    }
}

/// To the registry: entries of a followed session's stream, in seq order.
#[derive(Message)]
#[rtype(result = "()")]
pub struct RemoteEvents {
    pub session_id: String,
    pub events: Vec<RemoteEvent>,
    /// The read was full: the stream holds more for this node than it
    /// read (it is behind the owner by at least [`READ_COUNT`]).
    pub more: bool,
}

/// To the registry: the session's run must wait for its frames to reach
/// the stream (`full`), or may go on ([`PUBLISH_WINDOW`]).
#[derive(Message)]
#[rtype(result = "()")]
pub struct PublishBacklog {
    pub session_id: String,
    pub full: bool,
}

/// To the registry (owner side): a follower node's subscribers need the
/// run to wait (`wait`, renewed while they do), or no longer do.
#[derive(Message)]
#[rtype(result = "()")]
pub struct RemoteFlow {
    pub session_id: String,
    pub run_id: String,
    pub node: String,
    pub wait: bool,
}

/// From the registry (follower side): tell the run's node that this
/// node's subscribers need its run to wait, or no longer do.
#[derive(Message)]
#[rtype(result = "()")]
pub struct SendFlow {
    pub node: String,
    pub session_id: String,
    pub run_id: String,
    pub wait: bool,
}

impl Handler<SendFlow> for ClusterBus {
    type Result = ();
    fn handle(&mut self, msg: SendFlow, ctx: &mut Context<Self>) {
        let wire = Wire::Notice {
            from: self.node.to_string(),
            command: Command::Flow {
                session_id: msg.session_id,
                run_id: msg.run_id,
                wait: msg.wait,
            },
        };
        // Redis down: nothing reaches the owner either way; its wait expires.
        self.send_wire(&msg.node, &wire, ctx);
    }
}

/// To the registry: a `session_upserted` from another node, for the user's sockets.
#[derive(Message)]
#[rtype(result = "()")]
pub struct RemoteUpsert {
    pub user_id: i64,
    pub frame: crate::protocol::Frame,
}

/// To the registry: this node no longer holds the session's lease (another
/// node reaped the run while this one was cut off): stop the run.
#[derive(Message)]
#[rtype(result = "()")]
pub struct LeaseLost {
    pub session_id: String,
    pub run_id: String,
}
