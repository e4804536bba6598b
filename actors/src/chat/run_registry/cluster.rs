//! The `RunRegistry`'s cluster side (`--redis-url`; with no bus none of
//! this runs and the registry is the single-node one).
//!
//! **Owner side**: a `chat.send` first takes the session's lease from the
//! [`ClusterBus`] ([`AcquireLease`]: `RUN_IN_PROGRESS` when another node
//! holds it, `CLUSTER_UNAVAILABLE` while Redis is down); the run continues
//! above the stream's last seq with a block of seqs of its own. Every
//! sequenced frame (the same bytes as the replay buffer's) goes to the bus
//! ([`Publish`], one message per fan-out), and [`RunDone`] after the
//! `complete` releases the lease once everything is in the stream.
//!
//! **Follower side**: the first subscriber of a session on this node makes
//! the registry follow its stream ([`Follow`]); a run of another node is
//! kept here as a *remote run* (no `ProviderRun`, the owner node recorded)
//! whose frames ([`RemoteEvents`]) go into the session's replay buffer
//! with their own seqs, so every delivery rule (cursors, budgets, no
//! duplicate per socket, `chat_subscribed`, `replayTruncated`, 4008) holds
//! as for a local run. Its `complete` ends it here. Pending permissions are
//! read from its frames. `chat.abort` and `chat.permission-response` for it
//! are routed to the owner ([`RouteCommand`]). A session nobody here
//! subscribes to any more is unfollowed (every [`UNFOLLOW_EVERY`]).
//!
//! **Flow control across nodes**: a remote run is paced and held by this
//! node's subscribers by the single-node rules (`should_pause`, holds
//! within the same budgets), and since they cannot withhold the owner's
//! batches, the owner is asked to wait: [`SendFlow`] (a `Command::Flow`
//! notice on its command stream) when this node pauses the run, renewed
//! every `FLOW_RENEW_EVERY`, and `wait: false` when it resumes. This node
//! also asks it to wait while its stream reads come back full (it is
//! behind the stream). The owner's run waits while any follower's wait is
//! fresh ([`FLOW_EXPIRY`]: a lost follower stops holding it), and while
//! the bus has more than `PUBLISH_WINDOW` of its frames not yet in Redis
//! ([`PublishBacklog`]). A follower's subscribers are far behind one
//! margin earlier (`SessionState::margins`): what is on its way from the
//! owner still comes in after the wait is asked.
//!
//! **Handles** [`RemoteEvents`], [`RemoteUpsert`], [`LeaseLost`],
//! [`RemoteFlow`], [`PublishBacklog`] (from the bus).

use std::collections::{HashMap, HashSet};

use super::*;
use crate::cluster::bus::{
    AcquireLease, CatchUp, ClusterBus, Command, Follow, Followed, LeaseLost, ListClusterRuns,
    Publish, PublishBacklog, RegisterRun, ReleaseLease, RemoteEvents, RemoteFlow, RemoteUpsert,
    RouteCommand, RunDone, SendFlow, Unfollow, FLOW_EXPIRY,
};
use crate::cluster::{Outgoing, RemoteEvent, RunMeta};

/// How often sessions nobody here follows any more are unfollowed.
pub(super) const UNFOLLOW_EVERY: Duration = Duration::from_secs(1);

pub(super) struct ClusterLink {
    pub(super) bus: Addr<ClusterBus>,
    pub(super) node: Arc<str>,
    /// Sequenced frames not yet handed to the bus (one `Publish` per
    /// session per fan-out), in seq order.
    outbox: Vec<(String, Outgoing)>,
    /// Sessions whose stream this node follows.
    followed: HashSet<String>,
    /// The run id of the current outbox entries (shared by them).
    run_id: Option<Arc<str>>,
    /// Per session: a local run's `complete` (and what followed it), held
    /// back until this node's seq reservation is given back in the
    /// database, so the next run (on any node) continues right above it.
    held: HashMap<String, Vec<Outgoing>>,
    /// Sends waiting for that (a next run on this node).
    release_waiters: HashMap<String, Vec<oneshot::Sender<()>>>,
    /// Per followed session: the highest seq taken from its stream (the
    /// `Follow`/`CatchUp` answers and the live reads overlap; each entry
    /// is taken once).
    stream_seq: HashMap<String, u64>,
    /// Owner side, per session of a local run: the nodes whose subscribers
    /// need it to wait, and when each last said so (forgotten after
    /// [`FLOW_EXPIRY`]). At most one entry per node following it.
    waits: HashMap<String, HashMap<String, Instant>>,
    /// Owner side: sessions whose frames the bus has not got into Redis
    /// for more than `PUBLISH_WINDOW` (their run waits for the publishing).
    publish_full: HashSet<String>,
    /// Follower side: sessions whose last stream read was full (this node
    /// is behind the stream; the run waits until it has caught up).
    stream_behind: HashSet<String>,
}

/// A DB release slower than this lets the held frames go anyway (the next
/// run's seqs may then jump, never repeat).
const RELEASE_WAIT: Duration = Duration::from_secs(5);

impl ClusterLink {
    /// A frame of a local run, for the session's stream (`id` is `{run}:{seq}`).
    pub(super) fn outgoing(
        &mut self,
        session_id: &str,
        seq: u64,
        id: &str,
        kind: &'static str,
        frame: &Frame,
    ) {
        let run = id.rsplit_once(':').map_or(id, |(run, _)| run);
        let run_id = match &self.run_id {
            Some(r) if &**r == run => r.clone(),
            _ => {
                let r: Arc<str> = run.into();
                self.run_id = Some(r.clone());
                r
            }
        };
        self.outbox.push((
            session_id.to_string(),
            Outgoing {
                seq,
                run_id,
                kind,
                frame: frame.clone(),
            },
        ));
    }
}

fn unavailable() -> ChatError {
    ChatError::new(
        ErrorCode::ClusterUnavailable,
        "The cluster (Redis) is unreachable; try again when it is back",
    )
}

impl RunRegistry {
    /// Cluster mode: runs are leased, published and followed through `bus`.
    pub fn with_cluster(mut self, bus: Addr<ClusterBus>, node_id: &str) -> Self {
        self.cluster = Some(ClusterLink {
            bus,
            node: node_id.into(),
            outbox: Vec::new(),
            followed: HashSet::new(),
            run_id: None,
            held: HashMap::new(),
            release_waiters: HashMap::new(),
            stream_seq: HashMap::new(),
            waits: HashMap::new(),
            publish_full: HashSet::new(),
            stream_behind: HashSet::new(),
        });
        self
    }

    /// Cluster reasons for the session's run to wait: (owner) a follower
    /// node asked it to, or its frames are not getting into Redis fast
    /// enough; (follower) this node is behind the session's stream.
    pub(super) fn cluster_wait(&self, session_id: &str) -> bool {
        let Some(link) = self.cluster.as_ref() else {
            return false;
        };
        let now = Instant::now();
        link.publish_full.contains(session_id)
            || link.stream_behind.contains(session_id)
            || link
                .waits
                .get(session_id)
                .is_some_and(|w| w.values().any(|at| now - *at < FLOW_EXPIRY))
    }

    /// This node follows the session's stream (its state must stay, see
    /// [`RunRegistry::disposable`]).
    pub(super) fn followed_here(&self, session_id: &str) -> bool {
        self.cluster
            .as_ref()
            .is_some_and(|c| c.followed.contains(session_id))
    }

    /// The run of another node, when the session's current run is one that
    /// still runs: (its node, its id).
    fn live_remote(&self, session_id: &str) -> Option<(String, String)> {
        let run = self.sessions.get(session_id)?.run.as_ref()?;
        let node = run.remote.clone()?;
        (run.status == Status::Running).then(|| (node, run.id.clone()))
    }

    /// The session's run is another node's and this node asked it to wait.
    fn paused_remote(&self, session_id: &str) -> bool {
        self.sessions.get(session_id).is_some_and(|s| {
            s.paused.is_some() && s.run.as_ref().is_some_and(|r| r.remote.is_some())
        })
    }

    fn send_flow(&self, session_id: &str, node: String, run_id: String, wait: bool) {
        if let Some(link) = &self.cluster {
            link.bus.do_send(SendFlow {
                node,
                session_id: session_id.to_string(),
                run_id,
                wait,
            });
        }
    }

    /// Follower side, after frames of a remote run came in: this node's
    /// subscribers pace and hold it by the single-node rules (`should_pause`,
    /// holds), and since they cannot withhold the owner's batches, the
    /// owner is asked to wait (a `Flow` notice, renewed while it lasts)
    /// and told when it may go on (`resume`).
    fn remote_pace(&mut self, session_id: &str) {
        let Some((node, run_id)) = self.live_remote(session_id) else {
            // A remote run that ended here (its `complete`) waits for nothing.
            if self.paused_remote(session_id) {
                self.resume(session_id);
            }
            return;
        };
        let paused = self
            .sessions
            .get(session_id)
            .is_some_and(|s| s.paused.is_some());
        if paused {
            self.maybe_resume(session_id, None);
        } else if self.should_pause(session_id) && self.pause(session_id).is_some() {
            tracing::debug!(session_id, run_id = %run_id, node = %node, "remote run paused: this node's subscribers are behind");
            self.send_flow(session_id, node, run_id, true);
        }
    }

    /// A paused run of another node goes on: its node is told.
    pub(super) fn cluster_flow_resumed(&mut self, session_id: &str) {
        if self.cluster.is_none() {
            return;
        }
        let Some(run) = self.sessions.get(session_id).and_then(|s| s.run.as_ref()) else {
            return;
        };
        if let Some(node) = run.remote.clone() {
            self.send_flow(session_id, node, run.id.clone(), false);
        }
    }

    /// Every `FLOW_RENEW_EVERY`: this node's waits on other nodes' runs are
    /// renewed; followers' waits on this node's runs that were not renewed
    /// for [`FLOW_EXPIRY`] are forgotten (the run may go on).
    pub(super) fn cluster_flow_tick(&mut self) {
        let renew: Vec<(String, String, String)> = self
            .sessions
            .iter()
            .filter(|(_, s)| s.paused.is_some())
            .filter_map(|(id, s)| {
                let run = s.run.as_ref().filter(|r| r.status == Status::Running)?;
                Some((id.clone(), run.remote.clone()?, run.id.clone()))
            })
            .collect();
        for (session_id, node, run_id) in renew {
            self.send_flow(&session_id, node, run_id, true);
        }
        let Some(link) = self.cluster.as_mut() else {
            return;
        };
        let now = Instant::now();
        let mut expired = Vec::new();
        link.waits.retain(|session_id, nodes| {
            let before = nodes.len();
            nodes.retain(|_, at| now - *at < FLOW_EXPIRY);
            if nodes.len() < before {
                expired.push(session_id.clone());
            }
            !nodes.is_empty()
        });
        for session_id in expired {
            tracing::warn!(session_id = %session_id, "cluster: a follower's wait on this run was not renewed; the run goes on");
            self.maybe_resume(&session_id, None);
        }
    }

    /// Hands the sequenced frames to the bus, one message per session.
    pub(super) fn cluster_publish(&mut self) {
        let Some(link) = self.cluster.as_mut() else {
            return;
        };
        if link.outbox.is_empty() {
            return;
        }
        let mut batch: Option<Publish> = None;
        for (session_id, o) in link.outbox.drain(..) {
            if let Some(held) = link.held.get_mut(&session_id) {
                held.push(o);
                continue;
            }
            if o.kind == "complete" {
                link.held.insert(session_id, vec![o]);
                continue;
            }
            match &mut batch {
                Some(b) if b.session_id == session_id => b.frames.push(o),
                _ => {
                    if let Some(b) = batch.take() {
                        link.bus.do_send(b);
                    }
                    batch = Some(Publish {
                        session_id,
                        frames: vec![o],
                    });
                }
            }
        }
        if let Some(b) = batch {
            link.bus.do_send(b);
        }
    }

    /// After a local run's `complete`: this node's seq reservation is given
    /// back in the database, then the held `complete` goes to the stream
    /// (which frees the lease), so the next run, on any node, continues
    /// right above this one's last seq.
    pub(super) fn cluster_run_done(
        &mut self,
        session_id: &str,
        run_id: &str,
        ctx: &mut Context<Self>,
    ) {
        if self.cluster.is_none() {
            return;
        }
        self.cluster_publish();
        let remote = self
            .sessions
            .get(session_id)
            .and_then(|s| s.run.as_ref())
            .is_some_and(|r| r.remote.is_some());
        let Some(state) = self.sessions.get(session_id).filter(|_| !remote) else {
            return;
        };
        if let Some(link) = self.cluster.as_mut() {
            link.waits.remove(session_id);
            // Its own frames need not be read back by a later catch-up.
            let taken = link.stream_seq.entry(session_id.to_string()).or_insert(0);
            *taken = (*taken).max(state.last_seq);
        }
        let (id, seq, reserved, store) = (
            session_id.to_string(),
            state.last_seq,
            state.reserved_seq,
            self.store.clone(),
        );
        let release = async move {
            let sid = id.clone();
            let write = store::blocking(&store, move |s| s.release_seq(&sid, seq, reserved));
            match tokio::time::timeout(RELEASE_WAIT, write).await {
                Ok(Ok(())) => {}
                Ok(Err(err)) => {
                    tracing::error!(session_id = %id, %err, "failed to release the seq reservation")
                }
                Err(_) => {
                    tracing::error!(session_id = %id, "the seq reservation release timed out")
                }
            }
        };
        let (sid, rid) = (session_id.to_string(), run_id.to_string());
        ctx.spawn(release.into_actor(self).map(move |_, act, _| {
            let Some(link) = act.cluster.as_mut() else {
                return;
            };
            if let Some(frames) = link.held.remove(&sid) {
                link.bus.do_send(Publish {
                    session_id: sid.clone(),
                    frames,
                });
            }
            link.bus.do_send(RunDone {
                session_id: sid.clone(),
                run_id: rid,
            });
            for waiter in link.release_waiters.remove(&sid).unwrap_or_default() {
                let _ = waiter.send(());
            }
        }));
    }

    pub(super) fn cluster_upsert(&self, user_id: i64, frame: &Frame) {
        if let Some(link) = &self.cluster {
            link.bus.do_send(crate::cluster::bus::PublishUpsert {
                user_id,
                frame: frame.clone(),
            });
        }
    }

    /// After a restart the followed sessions' state is gone: follow anew.
    pub(super) fn cluster_reset(&mut self) {
        if let Some(link) = self.cluster.as_mut() {
            for session_id in link.followed.drain() {
                link.bus.do_send(Unfollow { session_id });
            }
            link.outbox.clear();
            link.held.clear();
            link.release_waiters.clear();
            link.stream_seq.clear();
            link.waits.clear();
            link.stream_behind.clear();
            // (`publish_full` is the bus's word, which outlives a restart.)
        }
    }

    /// `chat.send` in cluster mode: the lease first, then the run as on one node.
    pub(super) fn start_run_clustered(
        &mut self,
        msg: StartRun,
        ctx: &mut Context<Self>,
    ) -> ResponseActFuture<Self, Result<RunStarted, ChatError>> {
        let session_id = msg.session.id.clone();
        let now = Instant::now();
        // A resent clientRequestId of this node, a live run here, a
        // shutdown, a bad provider: answered as on one node.
        let duplicate = msg.client_request_id.as_ref().is_some_and(|crid| {
            self.client_requests.get(&session_id).is_some_and(|ids| {
                ids.iter()
                    .any(|(c, _, at)| c == crid && now.duration_since(*at) < CLIENT_REQUEST_TTL)
            })
        });
        let live_here = self
            .sessions
            .get(&session_id)
            .and_then(|s| s.run.as_ref())
            .is_some_and(Run::is_live);
        let kind = msg.session.provider.parse::<ProviderKind>().ok();
        let (Some(kind), Some(link)) = (kind, self.cluster.as_ref()) else {
            return Box::pin(fut::ready(self.start_run(msg, None, ctx)));
        };
        if self.shutting_down || duplicate || live_here || (self.providers)(kind).is_none() {
            return Box::pin(fut::ready(self.start_run(msg, None, ctx)));
        }
        let run_id = uuid::Uuid::new_v4().to_string();
        let meta = RunMeta {
            node: link.node.to_string(),
            run_id: run_id.clone(),
            user_id: msg.user_id,
            provider: kind.as_str().to_string(),
            started_at: now_iso(),
            first_seq: 0,
            completed: false,
            last_seq: 0,
        };
        let bus = link.bus.clone();
        // The previous run's reservation is given back first (see `cluster_run_done`).
        let released = self.cluster.as_mut().and_then(|link| {
            link.held.contains_key(&session_id).then(|| {
                let (tx, rx) = oneshot::channel();
                link.release_waiters
                    .entry(session_id.clone())
                    .or_default()
                    .push(tx);
                rx
            })
        });
        let acquire = AcquireLease {
            session_id: session_id.clone(),
            meta,
        };
        let lease = async move {
            if let Some(rx) = released {
                let _ = tokio::time::timeout(RELEASE_WAIT, rx).await;
            }
            bus.send(acquire).await
        };
        Box::pin(lease.into_actor(self).then(move |answer, act, ctx| {
            let stream_last = match answer {
                Ok(Ok(last)) => last,
                Ok(Err(refused)) => {
                    return Box::pin(fut::ready(Err(refused)))
                        as ResponseActFuture<Self, Result<RunStarted, ChatError>>
                }
                Err(_) => return Box::pin(fut::ready(Err(unavailable()))),
            };
            let fallback: ResponseActFuture<Self, Result<RunStarted, ChatError>> =
                Box::pin(fut::ready(Err(internal_error())));
            let (sid, rid) = (session_id.clone(), run_id.clone());
            let started = act.guarded(ctx, "StartRun", fallback, |act, ctx| {
                act.state_for(&msg.session, kind);
                act.align_seqs(&session_id, stream_last);
                act.start_when_ready(msg, Some(run_id), ctx)
            });
            Box::pin(started.map(move |result, act, _| {
                let Some(link) = act.cluster.as_ref() else {
                    return result;
                };
                match &result {
                    Ok(run) if !run.duplicate => {
                        link.bus.do_send(RegisterRun {
                            session_id: sid.clone(),
                            run_id: rid,
                            first_seq: run.first_seq,
                            started_at: act
                                .sessions
                                .get(&sid)
                                .and_then(|s| s.run.as_ref())
                                .map_or_else(now_iso, |r| r.started_at.clone()),
                        });
                        act.follow_after(&sid, run.first_seq.saturating_sub(1));
                    }
                    _ => link.bus.do_send(ReleaseLease {
                        session_id: sid,
                        run_id: rid,
                    }),
                }
                result
            }))
        }))
    }

    /// The stream read of a followed session goes on after `cursor` (the
    /// events up to it were taken from the `Follow` answer).
    fn follow_on(&mut self, session_id: &str, cursor: u64) {
        if let Some(link) = self.cluster.as_mut() {
            // Again: an unfollow sweep may have run while the answer was on
            // its way (the subscriber attaches right after this).
            link.followed.insert(session_id.to_string());
            link.bus.do_send(Follow {
                session_id: session_id.to_string(),
                from: Some(cursor),
            });
        }
    }

    /// The sending socket stays subscribed after its run, as on one node:
    /// the session's next run may be another node's, so it is followed.
    fn follow_after(&mut self, session_id: &str, seq: u64) {
        let Some(link) = self.cluster.as_mut() else {
            return;
        };
        if link.followed.insert(session_id.to_string()) {
            link.bus.do_send(Follow {
                session_id: session_id.to_string(),
                from: Some(seq),
            });
        }
    }

    /// The session's next run continues above every seq of its stream (a
    /// run of another node may have used them), in a block of seqs this
    /// node reserves itself (the block it may still hold from an earlier
    /// run was given back, see [`RunRegistry::cluster_run_done`]).
    fn align_seqs(&mut self, session_id: &str, stream_last: u64) {
        let Some(state) = self.sessions.get_mut(session_id) else {
            return;
        };
        if stream_last > state.last_seq {
            state.skip_to(stream_last);
        }
        state.next_block = None;
        state.reserved_seq = state.last_seq;
    }

    /// `chat.subscribe` in cluster mode: a session without a live local run
    /// is followed (its stream read from its run's first seq) before the ack.
    pub(super) fn subscribe_clustered(
        &mut self,
        msg: Subscribe,
        _: &mut Context<Self>,
    ) -> ResponseActFuture<Self, ()> {
        let session_id = msg.session.id.clone();
        let Ok(kind) = msg.session.provider.parse::<ProviderKind>() else {
            self.subscribe(msg);
            return Box::pin(fut::ready(()));
        };
        self.state_for(&msg.session, kind);
        let local_live = self
            .sessions
            .get(&session_id)
            .and_then(|s| s.run.as_ref())
            .is_some_and(|r| r.is_live() && r.remote.is_none());
        let Some(link) = self.cluster.as_mut() else {
            self.subscribe(msg);
            return Box::pin(fut::ready(()));
        };
        if link.followed.contains(&session_id) {
            if local_live {
                self.subscribe(msg);
                return Box::pin(fut::ready(()));
            }
            // What the stream has beyond the live reads so far (another
            // node's run may have started since), before the ack.
            let after = link.stream_seq.get(&session_id).copied().unwrap_or(0);
            let catch_up = link.bus.send(CatchUp {
                session_id: session_id.clone(),
                after,
            });
            return Box::pin(catch_up.into_actor(self).map(move |events, act, ctx| {
                act.guarded(ctx, "Subscribe", (), |act, ctx| {
                    act.remote_events(&session_id, events.unwrap_or_default(), false, ctx);
                    act.subscribe(msg);
                })
            }));
        }
        // Followed even with a local run: the session's next run may be another node's.
        link.followed.insert(session_id.clone());
        let follow = link.bus.send(Follow {
            session_id: session_id.clone(),
            from: None,
        });
        if local_live {
            self.subscribe(msg);
            let sid = session_id.clone();
            return Box::pin(follow.into_actor(self).map(move |followed, act, _| {
                act.follow_on(&sid, followed.map_or(0, |f| f.cursor));
            }));
        }
        Box::pin(follow.into_actor(self).map(move |followed, act, ctx| {
            act.guarded(ctx, "Subscribe", (), |act, ctx| {
                let Followed {
                    meta,
                    events,
                    cursor,
                } = followed.unwrap_or_default();
                if let Some(meta) = meta {
                    act.remote_run_from_meta(&session_id, &meta);
                }
                act.remote_events(&session_id, events, false, ctx);
                act.follow_on(&session_id, cursor);
                act.subscribe(msg);
            })
        }))
    }

    /// A run named by the session's `run:` key that this node does not know:
    /// a remote run from its first seq (its frames come next).
    fn remote_run_from_meta(&mut self, session_id: &str, meta: &RunMeta) {
        let me = self.cluster.as_ref().map(|c| c.node.clone());
        if me.as_deref() == Some(meta.node.as_str()) || meta.first_seq == 0 {
            return;
        }
        let Some(state) = self.sessions.get(session_id) else {
            return;
        };
        let known = state
            .run
            .as_ref()
            .is_some_and(|r| r.id == meta.run_id || (r.is_live() && r.remote.is_none()));
        if !known {
            self.begin_remote_run(
                session_id,
                &meta.run_id,
                &meta.node,
                meta.first_seq,
                &meta.started_at,
            );
        }
    }

    /// A run of another node starts here at `first_seq`.
    fn begin_remote_run(
        &mut self,
        session_id: &str,
        run_id: &str,
        node: &str,
        first_seq: u64,
        started_at: &str,
    ) {
        // A wait this node asked of the previous remote run (whose
        // `complete` it never read) ends: its node is told.
        if self.paused_remote(session_id) {
            self.resume(session_id);
        }
        let Some(state) = self.sessions.get_mut(session_id) else {
            return;
        };
        let before = first_seq.saturating_sub(1);
        if before < state.last_seq {
            // Our counters came from the database (another node's block of
            // seqs): the run's own seqs are the truth. Nothing here had them.
            state.buffer.clear();
            state.deliveries.clear();
            for sent in state.subscribers.values_mut() {
                *sent = (*sent).min(before);
            }
            state.last_seq = before;
        } else if before > state.last_seq {
            // Seqs this node never saw (another node's runs): a jump.
            state.skip_to(before);
        }
        if let Some(old) = state.run.take() {
            for p in old.pending {
                self.permissions.remove(&p.request_id);
            }
        }
        state.run = Some(Run {
            id: run_id.to_string(),
            status: Status::Running,
            started_at: started_at.to_string(),
            started: Instant::now(),
            first_seq,
            last_seq: before,
            addr: None,
            pending: Vec::new(),
            aborted: false,
            provider_id_at_start: None,
            pauses: 0,
            paused_for: Duration::ZERO,
            holds: 0,
            held_for: Duration::ZERO,
            exit_waiters: Vec::new(),
            remote: Some(node.to_string()),
            head: EnvelopeHead::new(session_id, state.provider.as_str(), run_id),
        });
        tracing::info!(
            session_id,
            run_id,
            node,
            first_seq,
            "cluster: following a run of another node"
        );
    }

    /// Frames of a followed session's stream: buffered as the remote run's
    /// (a new run id starts a new remote run), then fanned out.
    fn remote_events(
        &mut self,
        session_id: &str,
        events: Vec<RemoteEvent>,
        more: bool,
        ctx: &mut Context<Self>,
    ) {
        if let Some(link) = self.cluster.as_mut() {
            if more {
                link.stream_behind.insert(session_id.to_string());
            } else {
                link.stream_behind.remove(session_id);
            }
        }
        self.remote_events_in(session_id, events, ctx);
        self.remote_pace(session_id);
    }

    fn remote_events_in(
        &mut self,
        session_id: &str,
        events: Vec<RemoteEvent>,
        ctx: &mut Context<Self>,
    ) {
        // Without a state nothing here takes the frames: the stream's
        // cursor stays, so a later subscribe's catch-up still reads them.
        if !self.sessions.contains_key(session_id) {
            return;
        }
        let me = self.cluster.as_ref().map(|c| c.node.clone());
        let mut any = false;
        for ev in events {
            let Some(link) = self.cluster.as_mut() else {
                return;
            };
            let taken = link.stream_seq.entry(session_id.to_string()).or_insert(0);
            if ev.seq <= *taken {
                continue;
            }
            *taken = ev.seq;
            // This node's own frames are delivered locally.
            if me.as_deref() == Some(ev.node.as_str()) {
                continue;
            }
            let Some(state) = self.sessions.get(session_id) else {
                return;
            };
            match state.run.as_ref() {
                Some(run) if run.id == ev.run_id => {
                    if run.remote.is_none() || ev.seq <= state.last_seq {
                        continue;
                    }
                }
                // A live local run owns the session (the lease says so).
                Some(run) if run.is_live() && run.remote.is_none() => continue,
                _ => {
                    let started_at = now_iso();
                    self.begin_remote_run(session_id, &ev.run_id, &ev.node, ev.seq, &started_at)
                }
            }
            if self.buffer_remote(session_id, ev, ctx) {
                any = true;
            }
        }
        if any {
            self.fan_out(session_id);
        }
    }

    /// One frame of the session's remote run into its replay buffer.
    fn buffer_remote(
        &mut self,
        session_id: &str,
        ev: RemoteEvent,
        ctx: &mut Context<Self>,
    ) -> bool {
        let Some(state) = self.sessions.get_mut(session_id) else {
            return false;
        };
        if ev.seq > state.last_seq + 1 {
            // Frames missing from the stream (trimmed, or lost while Redis
            // was down): whoever did not have them is closed with 4008 and
            // resubscribes (`replayTruncated`).
            let behind: Vec<SocketId> = state
                .subscribers
                .iter()
                .filter(|(_, sent)| **sent < ev.seq - 1)
                .map(|(s, _)| *s)
                .collect();
            tracing::warn!(
                session_id,
                from = state.last_seq,
                to = ev.seq,
                "cluster: a gap in the session's stream"
            );
            state.buffer.clear();
            state.deliveries.clear();
            state.last_seq = ev.seq - 1;
            for socket in behind {
                self.drop_slow_consumer(socket, "events missing from the cluster stream");
            }
        }
        let Some(state) = self.sessions.get_mut(session_id) else {
            return false;
        };
        let Some(run) = state.run.as_mut() else {
            return false;
        };
        state.last_seq = ev.seq;
        run.last_seq = ev.seq;
        match ev.kind.as_str() {
            "permission_request" => {
                if let Ok(v) = serde_json::from_str::<Value>(&ev.frame) {
                    let text = |k: &str| v.get(k).and_then(Value::as_str).unwrap_or_default();
                    let request_id = text("requestId").to_string();
                    if !request_id.is_empty() {
                        self.permissions
                            .insert(request_id.clone(), session_id.to_string());
                        run.pending.push(Pending {
                            request_id,
                            provider_request_id: String::new(),
                            tool_name: text("toolName").to_string(),
                            input: v.get("input").cloned().unwrap_or(Value::Null),
                            context: v.get("context").cloned(),
                            received_at: text("timestamp").to_string(),
                            timer: None,
                        });
                    }
                }
            }
            "permission_cancelled" => {
                if let Ok(v) = serde_json::from_str::<Value>(&ev.frame) {
                    if let Some(id) = v.get("requestId").and_then(Value::as_str) {
                        run.pending.retain(|p| p.request_id != id);
                        self.permissions.remove(id);
                    }
                }
            }
            "complete" if run.status != Status::Completed => {
                run.status = Status::Completed;
                for p in std::mem::take(&mut run.pending) {
                    self.permissions.remove(&p.request_id);
                }
                let (sid, rid) = (session_id.to_string(), run.id.clone());
                ctx.run_later(COMPLETED_RUN_RETENTION, move |act, ctx| {
                    act.guarded(ctx, "eviction", (), |act, _| act.evict(&sid, &rid))
                });
            }
            _ => {}
        }
        state.buffer.push(ev.seq, ev.frame, None);
        true
    }

    /// Sessions with no subscriber here are no longer followed; a remote
    /// run still live is forgotten (this node hears no more of it).
    pub(super) fn unfollow_idle(&mut self) {
        let Some(link) = self.cluster.as_mut() else {
            return;
        };
        let idle: Vec<String> = link
            .followed
            .iter()
            .filter(|s| {
                self.sessions
                    .get(*s)
                    .is_none_or(|st| st.subscribers.is_empty())
            })
            .cloned()
            .collect();
        for session_id in idle {
            let Some(link) = self.cluster.as_mut() else {
                return;
            };
            link.followed.remove(&session_id);
            link.stream_seq.remove(&session_id);
            link.stream_behind.remove(&session_id);
            link.bus.do_send(Unfollow {
                session_id: session_id.clone(),
            });
            // A wait this node asked of the run's node ends with it.
            if self.paused_remote(&session_id) {
                self.resume(&session_id);
            }
            if let Some(state) = self.sessions.get_mut(&session_id) {
                if state.run.as_ref().is_some_and(|r| r.remote.is_some()) {
                    if let Some(run) = state.run.take() {
                        for p in run.pending {
                            self.permissions.remove(&p.request_id);
                        }
                    }
                    state.buffer.clear();
                    state.deliveries.clear();
                }
            }
        }
    }

    /// `/api/providers/sessions/running` in cluster mode: the `running`
    /// entries of every node (this node's alone while Redis is down).
    pub(super) fn list_running_clustered(
        &mut self,
        user_id: i64,
    ) -> ResponseActFuture<Self, Vec<RunningSession>> {
        let Some(link) = self.cluster.as_ref() else {
            return Box::pin(fut::ready(self.list_running(user_id)));
        };
        let query = link.bus.send(ListClusterRuns { user_id });
        Box::pin(query.into_actor(self).map(move |answer, act, _| {
            let mut list = act.list_running(user_id);
            if let Ok(Ok(runs)) = answer {
                for run in runs {
                    if list.iter().any(|r| r.session_id == run.session_id) {
                        continue;
                    }
                    list.push(RunningSession {
                        session_id: run.session_id,
                        provider: run.meta.provider,
                        started_at: run.meta.started_at,
                        last_seq: run.last_seq,
                        run_id: run.meta.run_id,
                        node: Some(run.meta.node),
                    });
                }
                list.sort_by(|a, b| a.started_at.cmp(&b.started_at));
            }
            list
        }))
    }

    /// `chat.abort` for a remote run: routed to its node, answered with its answer.
    pub(super) fn route_abort(
        &mut self,
        msg: &AbortRun,
    ) -> Option<ResponseActFuture<Self, Result<(), ChatError>>> {
        let link = self.cluster.as_ref()?;
        let bus = link.bus.clone();
        let me = link.node.clone();
        let command = Command::Abort {
            user_id: msg.user_id,
            session_id: msg.session_id.clone(),
        };
        let Some(state) = self.sessions.get(&msg.session_id) else {
            // This node knows nothing of the session (no socket here follows
            // it): the cluster's list of the user's runs says where it runs.
            if msg.user_id == ADMIN_USER {
                return None;
            }
            let sid = msg.session_id.clone();
            let find = bus.send(ListClusterRuns {
                user_id: msg.user_id,
            });
            let routed = async move {
                let runs = find.await.map_err(|_| unavailable())??;
                let no_run =
                    || ChatError::new(ErrorCode::NoActiveRun, "No active run for this session");
                let run = runs
                    .into_iter()
                    .find(|r| r.session_id == sid)
                    .ok_or_else(no_run)?;
                if *run.meta.node == *me {
                    return Err(no_run());
                }
                tracing::info!(session_id = %sid, node = %run.meta.node, "abort routed to the run's node");
                bus.send(RouteCommand {
                    node: run.meta.node,
                    command,
                })
                .await
                .map_err(|_| unavailable())?
            };
            return Some(Box::pin(routed.into_actor(self)));
        };
        if state.owner != msg.user_id && msg.user_id != ADMIN_USER {
            return None;
        }
        let run = state.run.as_ref().filter(|r| r.is_live())?;
        let node = run.remote.clone()?;
        tracing::info!(session_id = %msg.session_id, run_id = %run.id, node = %node, "abort routed to the run's node");
        let routed = bus.send(RouteCommand { node, command });
        Some(Box::pin(routed.into_actor(self).map(|answer, _, _| {
            answer.unwrap_or_else(|_| Err(unavailable()))
        })))
    }

    /// `chat.permission-response` for a remote run's request: routed to its
    /// node (whose `permission_cancelled` comes back through the stream).
    pub(super) fn route_permission(
        &mut self,
        session_id: &str,
        msg: &RespondPermission,
        ctx: &mut Context<Self>,
    ) -> bool {
        let Some(link) = self.cluster.as_ref() else {
            return false;
        };
        let Some(node) = self
            .sessions
            .get(session_id)
            .and_then(|s| s.run.as_ref())
            .and_then(|r| r.remote.clone())
        else {
            return false;
        };
        let routed = link.bus.send(RouteCommand {
            node,
            command: Command::Permission {
                user_id: msg.user_id,
                request_id: msg.request_id.clone(),
                decision: msg.decision.clone(),
            },
        });
        let sid = session_id.to_string();
        ctx.spawn(routed.into_actor(self).map(move |answer, _, _| {
            if !matches!(answer, Ok(Ok(()))) {
                tracing::warn!(session_id = %sid, "a permission answer for a run on another node was not delivered");
            }
        }));
        true
    }
}

impl Handler<RemoteEvents> for RunRegistry {
    type Result = ();

    fn handle(&mut self, msg: RemoteEvents, ctx: &mut Context<Self>) {
        self.guarded(ctx, "RemoteEvents", (), |act, ctx| {
            act.remote_events(&msg.session_id, msg.events, msg.more, ctx)
        })
    }
}

impl Handler<RemoteFlow> for RunRegistry {
    type Result = ();

    fn handle(&mut self, msg: RemoteFlow, ctx: &mut Context<Self>) {
        self.guarded(ctx, "RemoteFlow", (), |act, _| {
            let ours = act
                .sessions
                .get(&msg.session_id)
                .and_then(|s| s.run.as_ref())
                .is_some_and(|r| {
                    r.id == msg.run_id && r.status == Status::Running && r.remote.is_none()
                });
            let Some(link) = act.cluster.as_mut() else {
                return;
            };
            if ours && msg.wait {
                // Its next batch is withheld (`should_pause`).
                let nodes = link.waits.entry(msg.session_id).or_default();
                nodes.insert(msg.node, Instant::now());
                return;
            }
            let Some(nodes) = link.waits.get_mut(&msg.session_id) else {
                return;
            };
            nodes.remove(&msg.node);
            if nodes.is_empty() {
                link.waits.remove(&msg.session_id);
            }
            act.maybe_resume(&msg.session_id, None);
        })
    }
}

impl Handler<PublishBacklog> for RunRegistry {
    type Result = ();

    fn handle(&mut self, msg: PublishBacklog, ctx: &mut Context<Self>) {
        self.guarded(ctx, "PublishBacklog", (), |act, _| {
            let Some(link) = act.cluster.as_mut() else {
                return;
            };
            if msg.full {
                link.publish_full.insert(msg.session_id);
            } else if link.publish_full.remove(&msg.session_id) {
                act.maybe_resume(&msg.session_id, None);
            }
        })
    }
}

impl Handler<RemoteUpsert> for RunRegistry {
    type Result = ();

    fn handle(&mut self, msg: RemoteUpsert, ctx: &mut Context<Self>) {
        self.guarded(ctx, "RemoteUpsert", (), |act, _| {
            let frames: Arc<[Frame]> = vec![msg.frame].into();
            let sockets: Vec<SocketId> = act
                .sockets
                .iter()
                .filter(|(_, s)| s.user_id == msg.user_id)
                .map(|(id, _)| *id)
                .collect();
            for socket in sockets {
                act.deliver_to(socket, frames.clone());
            }
        })
    }
}

impl Handler<LeaseLost> for RunRegistry {
    type Result = ();

    fn handle(&mut self, msg: LeaseLost, ctx: &mut Context<Self>) {
        self.guarded(ctx, "LeaseLost", (), |act, ctx| {
            let Some(run) = act
                .sessions
                .get(&msg.session_id)
                .and_then(|s| s.run.as_ref())
                .filter(|r| r.id == msg.run_id && r.is_live() && r.remote.is_none())
            else {
                return;
            };
            if let Some(addr) = &run.addr {
                addr.do_send(Kill);
            }
            let node = act.cluster.as_ref().map(|c| c.node.to_string()).unwrap_or_default();
            act.emit(
                &msg.session_id,
                EventBody::error(format!(
                    "node {node} lost the session's lease (it was cut off from the cluster and another node ended the run); the run was stopped"
                )),
            );
            act.complete(&msg.session_id, 1, false, ctx);
        })
    }
}
