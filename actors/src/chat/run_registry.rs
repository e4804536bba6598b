//! `RunRegistry`: the one supervisor of chat runs.
//!
//! **Owns**, per app session: the current run (id, provider, status, start
//! time, its `ProviderRun` address), the seq counter and its persisted
//! reservation, the bounded replay buffer, the subscribed sockets with the
//! last seq each was sent, pending permission requests; per connected
//! subscriber its delivery budget; and the `clientRequestId` table (its own
//! 10-minute lifetime, independent of session eviction).
//!
//! **Handles**: [`Connect`], [`Disconnect`], [`Drained`] (subscribers);
//! [`StartRun`], [`AbortRun`], [`Subscribe`], [`RespondPermission`],
//! [`ListRunning`] (clients, through their socket or REST); [`RunEvents`],
//! [`RunExited`] (from `ProviderRun`); [`Shutdown`] (the binary).
//!
//! **Sends**: [`Deliver`] and [`CloseSocket`] to subscribers; [`Abort`],
//! [`Kill`] and [`AnswerPermission`] to `ProviderRun`s.
//!
//! **Delivery (PROTOCOL.md E4, E7, E8)**: every sequenced event goes into
//! the session's replay buffer, once; a subscriber is a cursor into that
//! buffer (the last seq it was sent) plus a budget of bytes and deliveries
//! it has been sent and has not yet reported written ([`Drained`]). A
//! subscriber is sent frames from its cursor while it is under
//! [`SUBSCRIBER_HIGH_WATER`] bytes and [`SUBSCRIBER_MAX_BATCHES`]
//! deliveries, each delivery at most [`DELIVERY_MAX_BYTES`]; live events,
//! replay after `chat.subscribe` and catch-up after completion all take this
//! one path, so a replay is streamed as the socket drains and a socket never
//! gets a seq twice. When too many subscribers of a run are behind (every
//! one, with one or two subscribers; all but the slowest sixteenth with
//! more, [`pace_quorum`]), the answer to the `ProviderRun`'s [`RunEvents`]
//! is withheld: it reads no more stdout and the CLI blocks on its pipe. The
//! run resumes when a quorum of subscribers has caught up and is below
//! [`SUBSCRIBER_LOW_WATER`], when subscribers leave, or when the run ends.
//! The quorum is what keeps a thousand followers of one run together when
//! the gateway is the bottleneck: with "any one keeps up", the few sockets
//! served first raced ahead and the rest were closed as far behind.
//! A subscriber is far behind when the oldest event its client may lack
//! (counting what its socket holds unwritten, which a 4008 drops) is within
//! [`FAR_BEHIND_MARGIN_EVENTS`] / [`FAR_BEHIND_MARGIN_BYTES`] of leaving the
//! buffer. Being behind costs no memory of its own (its lag is the shared
//! buffer), so nothing acts earlier. A far-behind subscriber whose client is
//! reading (it reported a write within one heartbeat interval; E4 cuts one
//! that made no progress for two) holds the run: the answer is withheld as
//! for a pause until it is twice the margin away, so the readers a busy
//! machine happens to serve last are not closed (with a thousand followers
//! on two cores, the same few went unread for 12 s and were closed again
//! and again). A run waits for such readers alone (its quorum there) at
//! most [`HOLD_GRACE`] plus a quarter of its time ([`HOLD_SHARE`]), so a
//! reader slower than the run for good slows it by at most that. A
//! far-behind subscriber that is not reading, or once the run's hold time
//! is spent, is closed with 4008 while the buffer still holds what it
//! missed, so it catches up by resubscribing with its `lastSeq` (E4). Its
//! place is kept for that: for [`REJOIN_GRACE`] the events its client lacks
//! stay in the buffer beyond its bounds (at most [`REPLAY_STRETCH_EVENTS`] /
//! [`REPLAY_STRETCH_BYTES`] more, [`REJOIN_PLACES_MAX`] places per session;
//! past the stretch they leave as any others), and a resubscription of the
//! same user from there takes the place over while it catches up (kept
//! while its client is written more, each time for [`REJOIN_GRACE`] again).
//! A kept place never pauses or holds the run. A
//! resubscriber that arrives inside that margin holds the run the same way
//! while it reads, and is otherwise closed only once its events leave the
//! buffer. A subscriber that stops reading holds the run no longer than a
//! heartbeat interval and is the watchdog's (E4's no-progress rule); while
//! it is one of few, the run goes on without it.
//! In cluster mode a node applies these rules to another node's run for
//! its own subscribers too, and asks that node to wait while they hold or
//! pace it (`cluster.rs`).
//!
//! **Invariants**:
//! - `seq` is assigned only here, +1 per forwarded event, strictly increasing
//!   per session across runs and restarts. E9: seqs are reserved in blocks
//!   of [`SEQ_BLOCK`] that are written to the database before any of them is
//!   used; after a crash the session continues above the reservation.
//! - A run's terminal state is set exactly once (`Status::Completed`): the
//!   first `complete` wins; later ones (a result after an abort, the exit of
//!   a killed process) are dropped. Messages carry the run id, so a finished
//!   run's late exit never completes the session's next run. A new run of a
//!   session starts only once the previous run's process is gone (bounded by
//!   [`PREVIOUS_RUN_EXIT_WAIT`]).
//! - Each event is serialized once; the same bytes go to the replay buffer
//!   and to every subscriber.
//!
//! **Bounds**: the replay buffer keeps the last [`REPLAY_MAX_EVENTS`] events
//! and at most [`REPLAY_MAX_BYTES`] (oldest dropped first), and while places
//! are kept (each for [`REJOIN_GRACE`]) up to half as much again; per subscriber
//! at most [`SUBSCRIBER_HIGH_WATER`] plus one delivery is in flight; the
//! `clientRequestId` table holds [`CLIENT_REQUESTS_MAX`] ids per session for
//! [`CLIENT_REQUEST_TTL`].
//!
//! **Stops** with the system; it never stops on a client's or run's error.
//! A panic in one of its own handlers or timers (a registry bug) is caught
//! ([`RunRegistry::guarded`]) and stops it, and its `actix::Supervisor`
//! restarts it behind the same address: its live runs fail with one
//! `complete`, its sockets are closed with 1001, its per-session state is
//! dropped (logged as `actor.panicked`, then `actor.restarted`).

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use serde_json::Value;
use tokio::sync::oneshot;
// The runtime's clock: timers and ages agree, and tests can pause it.
use tokio::time::Instant;

use crate::chat::history::HistoryLog;
use crate::chat::provider_run::{Abort, AnswerPermission, Kill, ProviderRun};
use crate::config::GatewayConfig;
use crate::metrics::metrics;
use crate::protocol::{
    event_id, now_iso, set_now_iso, ChatError, EnvelopeHead, ErrorCode, Event, EventBody, Frame,
    PendingPermission, PermissionDecision, ServerFrame, SubscribedRun, UpsertedProject,
    UpsertedSession,
};
use crate::provider::{provider_for, safe_id, Deltas, Provider, ProviderEvent, ProviderKind, Turn};
use crate::store::{self, ProjectRef, SessionRow, Store};

mod cluster;
mod replay;
use replay::ReplayBuffer;

/// Events kept for replay per session (PROTOCOL.md asks for at least 5000).
pub const REPLAY_MAX_EVENTS: usize = 10_000;
/// Bytes kept for replay per session.
pub const REPLAY_MAX_BYTES: usize = 32 * 1024 * 1024;
/// Beyond those bounds, a session keeps the events a subscriber closed with
/// 4008 lacks, for its resubscription ([`REJOIN_GRACE`]), up to this many
/// events and bytes more.
pub const REPLAY_STRETCH_EVENTS: usize = REPLAY_MAX_EVENTS / 2;
pub const REPLAY_STRETCH_BYTES: usize = REPLAY_MAX_BYTES / 2;
/// A completed run's buffer is kept this long for late subscribers.
pub const COMPLETED_RUN_RETENTION: Duration = Duration::from_secs(300);
/// A repeated `clientRequestId` within this window starts nothing (E6).
pub const CLIENT_REQUEST_TTL: Duration = Duration::from_secs(600);
/// Remembered `clientRequestId`s per session; the oldest is forgotten first.
pub const CLIENT_REQUESTS_MAX: usize = 256;
/// How often expired `clientRequestId`s are forgotten.
const CLIENT_REQUEST_SWEEP: Duration = Duration::from_secs(60);
/// Bytes sent to a subscriber and not yet written to its client, above
/// which it is sent nothing more (and counts as behind).
pub const SUBSCRIBER_HIGH_WATER: usize = 1024 * 1024;
/// A run paused for its subscribers resumes when enough of them
/// ([`pace_quorum`]) have caught up and have less than this in flight.
pub const SUBSCRIBER_LOW_WATER: usize = 256 * 1024;
/// Of a run's subscribers, at most `1/PACE_LEFT_BEHIND` (and at least one)
/// may be behind while it moves on; see [`pace_quorum`].
const PACE_LEFT_BEHIND: usize = 16;

/// Subscribers that must have caught up for a run with `n` of them to move
/// on: all but the slowest `n / PACE_LEFT_BEHIND`, leaving out at least one
/// (so with one or two subscribers, one keeping up keeps the run going, as
/// E4 asks) and waiting for at least one. When the gateway itself is the
/// bottleneck (a thousand followers on two cores) its subscribers fall
/// behind together and the run waits for most of them, instead of racing
/// ahead for the few served first while the others are closed as far behind.
pub fn pace_quorum(n: usize) -> usize {
    n.saturating_sub((n / PACE_LEFT_BEHIND).max(1)).max(1)
}
/// Deliveries in flight per subscriber (its mailbox must hold more).
pub const SUBSCRIBER_MAX_BATCHES: usize = 64;
/// Most frame bytes in one delivery (a single larger frame goes alone).
pub const DELIVERY_MAX_BYTES: usize = 64 * 1024;
/// Most frames in one delivery.
const DELIVERY_MAX_FRAMES: usize = 256;
/// A subscriber is far behind (closed with 4008) when the oldest event its
/// client may lack is this close to leaving the replay buffer: fewer events,
/// or bytes, than this would push it out. What is left is the time its
/// client has to resubscribe with its `lastSeq` and lose nothing.
pub const FAR_BEHIND_MARGIN_EVENTS: usize = REPLAY_MAX_EVENTS / 8;
pub const FAR_BEHIND_MARGIN_BYTES: usize = REPLAY_MAX_BYTES / 8;
/// A run is held for its far-behind readers (paused for them alone) at
/// most this long plus `1/HOLD_SHARE` of its time so far; beyond that they
/// are closed with 4008 as far behind (E4), so a reader that is slower than
/// the run for good slows it by at most a quarter. A far-behind subscriber
/// holds the run while it is reading: it reported a write ([`Drained`])
/// within one heartbeat interval (E4 cuts one that made no progress for two).
pub const HOLD_GRACE: Duration = Duration::from_secs(2);
pub const HOLD_SHARE: u32 = 4;
/// A subscriber closed with 4008 while its run goes on keeps its place: the
/// events its client lacks stay in the replay buffer this long (beyond its
/// bounds, up to the stretch) for its resubscription, and from that
/// resubscription on while it catches up: this long again after each write
/// to its client (one that reads slower than the run fills the stretch and
/// loses the place that way). The seed's client reconnects 2 s after a close.
pub const REJOIN_GRACE: Duration = Duration::from_secs(5);
/// Places kept at once per session; a subscriber closed beyond them keeps
/// none (as one whose events already left the buffer).
pub const REJOIN_PLACES_MAX: usize = 64;
/// How often holds are looked at while nothing else happens (a holder that
/// stopped reading sends nothing that would end its hold).
const HOLD_REVIEW_EVERY: Duration = Duration::from_millis(250);
/// Seqs reserved (persisted) at a time (E9). A new block is written when
/// less than half of the current one is left.
pub const SEQ_BLOCK: u64 = 10_000;
/// Seqs kept in reserve for events the registry itself adds (error,
/// complete, permission cancellations): a batch that would eat into it
/// waits for the next block to be persisted.
const SEQ_MARGIN: u64 = 1_000;
/// How long a new run waits for the previous run's process to be gone.
pub const PREVIOUS_RUN_EXIT_WAIT: Duration = Duration::from_secs(10);
/// Messages queued for the registry. `ProviderRun`s deliver with
/// `send().await`, so a full mailbox makes them wait (and so stop reading
/// their CLI's stdout) instead of queueing more.
pub const MAILBOX_CAPACITY: usize = 1024;
/// Longest summary taken from a first prompt (chars), as the database's.
const SUMMARY_CHARS: usize = 100;
/// Pending history is written at least this often.
const HISTORY_FLUSH_EVERY: Duration = Duration::from_secs(1);
/// A turn's `complete` waits at most this long for its history to be written.
const HISTORY_WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Tools that always wait for the user, without a timeout.
const INTERACTIVE_TOOLS: [&str; 2] = ["AskUserQuestion", "ExitPlanMode"];

/// Identifies a connected subscriber (a chat socket, or any other socket
/// actor that speaks [`Deliver`], [`CloseSocket`] and [`Drained`]).
pub type SocketId = u64;

/// Frames for one socket, in order. Shared, not copied, across subscribers.
/// With a live delivery, when the provider line of its first frame was read
/// (for `agentgate_delivery_latency_seconds`).
#[derive(Message, Clone)]
#[rtype(result = "()")]
pub struct Deliver(pub Arc<[Frame]>, pub Option<Instant>);

/// Asks a chat socket to close with a code (4008 slow consumer, 1001 shutdown).
#[derive(Message)]
#[rtype(result = "()")]
pub struct CloseSocket {
    pub code: u16,
    pub reason: &'static str,
}

/// A subscriber opened (e.g. sent by `ChatSocket::started`); returns its id.
/// The subscriber reports what it wrote with [`Drained`]; until then each
/// [`Deliver`] counts against its budget.
#[derive(Message)]
#[rtype(result = "SocketId")]
pub struct Connect {
    pub user_id: i64,
    pub deliver: Recipient<Deliver>,
    pub close: Recipient<CloseSocket>,
}

/// A subscriber closed (sent by `ChatSocket::stopped`). Idempotent.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Disconnect {
    pub socket: SocketId,
}

/// From a subscriber: it wrote `bytes` of delivered frames to its client
/// and finished `batches` deliveries. Returns that much budget.
#[derive(Message, Debug, Clone, Copy)]
#[rtype(result = "()")]
pub struct Drained {
    pub socket: SocketId,
    pub bytes: usize,
    pub batches: usize,
}

/// `chat.send` from a socket (or a remote-session turn over REST, without
/// one), after the caller checked the row belongs to the user.
#[derive(Message)]
#[rtype(result = "Result<RunStarted, ChatError>")]
pub struct StartRun {
    /// The sending socket, which becomes a subscriber; `None` for REST.
    pub socket: Option<SocketId>,
    pub user_id: i64,
    pub session: SessionRow,
    pub content: String,
    pub options: Value,
    pub client_request_id: Option<String>,
    /// The run's working directory, from [`resolve_cwd`] (the socket resolves
    /// it on the blocking pool: it touches the filesystem).
    pub cwd: PathBuf,
}

/// What [`StartRun`] started (or, for a repeated `clientRequestId`, had started).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunStarted {
    pub run_id: String,
    /// Seq of the run's first event (0 when a repeated request names a run already gone).
    pub first_seq: u64,
    /// A repeated `clientRequestId`: nothing was started.
    pub duplicate: bool,
}

/// The `user_id` of an [`AbortRun`] from the admin API: any user's run.
pub const ADMIN_USER: i64 = -1;

/// `chat.abort` from a socket (or, with [`ADMIN_USER`], from an admin).
#[derive(Message)]
#[rtype(result = "Result<(), ChatError>")]
pub struct AbortRun {
    pub user_id: i64,
    pub session_id: String,
}

/// One `chat.subscribe` entry, after the socket checked the row belongs to the
/// user. The registry answers on the socket itself (`chat_subscribed`, then
/// replay), so the ack always precedes the replayed and live events.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Subscribe {
    pub socket: SocketId,
    pub session: SessionRow,
    pub last_seq: Option<u64>,
    /// A remote-session follower (PROTOCOL.md 8): attached even while no run
    /// runs (it follows the session's next turns), and sent the current or
    /// retained run from `max(lastSeq + 1, runFirstSeq)`, completed or not.
    pub follow: bool,
}

/// `chat.permission-response` from a socket. Unknown ids are ignored.
#[derive(Message)]
#[rtype(result = "()")]
pub struct RespondPermission {
    pub user_id: i64,
    pub request_id: String,
    pub decision: PermissionDecision,
}

/// `GET /api/providers/sessions/running`: the user's running runs.
#[derive(Message)]
#[rtype(result = "Vec<RunningSession>")]
pub struct ListRunning {
    pub user_id: i64,
}

#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RunningSession {
    pub session_id: String,
    pub provider: String,
    pub started_at: String,
    pub last_seq: u64,
    pub run_id: String,
    /// Cluster mode: the node whose process runs it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
}

/// Parsed stdout of a run (from `ProviderRun`, awaited: the answer is
/// withheld while the run is paused for its subscribers, or while the next
/// block of seqs is being persisted).
#[derive(Message)]
#[rtype(result = "()")]
pub struct RunEvents {
    pub session_id: String,
    pub run_id: String,
    pub events: Vec<ProviderEvent>,
    /// When the batch's first stdout line was read.
    pub read_at: Option<Instant>,
}

/// The provider process ended, or the run actor died (from `ProviderRun`).
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct RunExited {
    pub session_id: String,
    pub run_id: String,
    /// Exit code, `None` when killed by a signal or never started.
    pub exit_code: Option<i32>,
    /// What went wrong, for the `error` event when the run had not completed.
    pub error: Option<String>,
}

/// Gateway shutdown: refuse new runs (`SHUTTING_DOWN`), complete every
/// running run, kill their processes, close every chat socket with 1001,
/// write every seq counter. Answers when done.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Shutdown;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    Running,
    /// The turn ended; its history is being written, then `complete` goes out.
    Finishing,
    Completed,
}

struct Pending {
    request_id: String,
    provider_request_id: String,
    tool_name: String,
    input: Value,
    context: Option<Value>,
    received_at: String,
    timer: Option<SpawnHandle>,
}

struct Run {
    id: String,
    status: Status,
    started_at: String,
    /// For `agentgate_run_duration_seconds`.
    started: Instant,
    /// Seq of the run's first event (E2 `runFirstSeq`).
    first_seq: u64,
    /// Seq of the run's newest event (E7: who had reached this run).
    last_seq: u64,
    addr: Option<Addr<ProviderRun>>,
    pending: Vec<Pending>,
    /// Ended by an abort: what the process prints while winding down is dropped.
    aborted: bool,
    /// The native id when the run started; a run that dies before its turn
    /// ends may have announced an id whose transcript was never written.
    provider_id_at_start: Option<String>,
    /// Times this run was paused for its subscribers, and for how long.
    pauses: u32,
    paused_for: Duration,
    /// Times it was held for far-behind readers, and for how long in all.
    holds: u32,
    held_for: Duration,
    /// Sends waiting for this run's process to be gone.
    exit_waiters: Vec<oneshot::Sender<()>>,
    /// Cluster mode: the run lives on this other node, and its events come
    /// from the session's stream (see `cluster.rs`); never sequenced here.
    remote: Option<String>,
    /// What every envelope of the run starts with, escaped once.
    head: EnvelopeHead,
}

impl Run {
    /// Not completed yet (a finishing run still counts as processing).
    fn is_live(&self) -> bool {
        self.status != Status::Completed
    }
}

/// A withheld `RunEvents` answer.
struct Pause {
    resume: oneshot::Sender<()>,
    since: Instant,
    /// Subscribers that caught up and drained below the low-water mark
    /// since the pause (the run resumes when they are a [`pace_quorum`]).
    ready: BTreeSet<SocketId>,
    /// Since when it has waited for far-behind readers alone (its quorum
    /// was there): the run's hold time ([`HOLD_GRACE`]).
    held_since: Option<Instant>,
}

struct SessionState {
    owner: i64,
    provider: ProviderKind,
    project_path: String,
    created_at: String,
    provider_session_id: Option<String>,
    last_seq: u64,
    /// Seqs up to this are persisted as reserved (E9).
    reserved_seq: u64,
    /// A reservation write is in flight.
    reserving: bool,
    /// Batches that must wait for a block while one is being written; told
    /// when that write answered (then they ask again). At most one per
    /// in-flight `RunEvents`/`StartRun`, so bounded by the mailbox.
    reserve_waiters: Vec<oneshot::Sender<()>>,
    /// A block reserved above another gateway's seqs, not moved to yet
    /// (`SessionState::jump_to`).
    next_block: Option<(u64, u64)>,
    /// Replay buffer: contiguous seqs, oldest first.
    buffer: ReplayBuffer,
    /// The last [`DELIVERY_CACHE`] deliveries built (with two subscribers
    /// or more), oldest first: every subscriber that needs a range starting
    /// where one does takes the same frames (one allocation, not one per
    /// socket). In a fan-out the caught-up subscribers take the same ranges
    /// (several when a batch is larger than a delivery), and one behind
    /// takes, as it drains, the ranges the others took before it. They are
    /// recent events, mostly still buffered: at most 32 x 64 KiB of frames
    /// (and their arena chunks) are kept alive by it beyond the buffer.
    deliveries: VecDeque<Chunk>,
    /// Subscribed sockets and the last seq each was sent (E8 watermark).
    subscribers: BTreeMap<SocketId, u64>,
    /// Subscribers that (re)subscribed already far behind: closed only
    /// when their events leave the buffer, until they are out of the margin.
    catching_up: BTreeSet<SocketId>,
    /// Far-behind subscribers that are reading: the run waits for them
    /// (see [`HOLD_GRACE`]) until they are twice the margin away from
    /// losing events.
    holding: BTreeSet<SocketId>,
    /// Where subscribers closed with 4008 left off, kept in the buffer for
    /// their resubscriptions ([`REJOIN_GRACE`]); at most [`REJOIN_PLACES_MAX`].
    places: Vec<Place>,
    run: Option<Run>,
    paused: Option<Pause>,
    /// The last database write of the native id, so writes land in order.
    id_write: Option<tokio::task::JoinHandle<()>>,
    /// The conversation not yet written to the database.
    history: HistoryLog,
    /// What `session_upserted` says of it (row values, kept current here).
    summary: String,
    message_count: u64,
    last_activity: String,
    project: Option<ProjectRef>,
}

/// A subscriber's place in the replay buffer after a 4008 close: its
/// client's user, the oldest seq that client may lack, until when it is
/// kept, and its resubscription once it came (then kept while that one is
/// far behind).
struct Place {
    user_id: i64,
    from: u64,
    until: Instant,
    socket: Option<SocketId>,
}

impl SessionState {
    /// The oldest seq the client of a subscriber at `sent` with `in_flight`
    /// bytes unwritten may lack (the newest seq + 1: none); `None` when
    /// some of those events left the buffer.
    fn lacking_from(&self, sent: u64, in_flight: usize) -> Option<u64> {
        let lag = self.lag_bytes(sent)?;
        let Some(front) = self.buffer.front_seq() else {
            return Some(self.last_seq + 1);
        };
        let written = self
            .buffer
            .total_bytes()
            .saturating_sub(lag + in_flight as u64);
        if written < self.buffer[0].end - self.buffer[0].frame.len() as u64 {
            return None;
        }
        let first = self.buffer.first_ending_after(written);
        Some(front + first as u64)
    }

    /// The buffer keeps what the places need (the lowest of them) and no more.
    fn keep_places(&mut self) {
        let floor = self.places.iter().map(|p| p.from).min();
        self.buffer.keep_from(floor);
    }

    /// Continues the session's seqs in the block `start+1..=end` (reserved
    /// above another gateway's). The replay buffer holds contiguous seqs
    /// only, so it starts anew: a subscriber that had every event stays
    /// caught up; one still behind is closed as a slow consumer at its next
    /// delivery (4008) and resubscribes with its `lastSeq`.
    fn jump_to(&mut self, start: u64, end: u64, session_id: &str) {
        self.next_block = None;
        if start <= self.last_seq {
            self.reserved_seq = self.reserved_seq.max(end);
            return;
        }
        tracing::warn!(
            session_id,
            from = self.last_seq,
            to = start,
            "seqs were reserved by another gateway on the same database; continuing above them"
        );
        self.skip_to(start);
        self.reserved_seq = end;
    }

    /// Continues the session at `seq`, above seqs it never had (another
    /// gateway's or node's): the replay buffer, which holds contiguous seqs
    /// only, starts anew, and a subscriber that had every event stays caught
    /// up (one still behind is closed 4008 at its next delivery).
    fn skip_to(&mut self, seq: u64) {
        let old = self.last_seq;
        for sent in self.subscribers.values_mut() {
            if *sent >= old {
                *sent = seq;
            }
        }
        self.buffer.clear();
        self.deliveries.clear();
        self.last_seq = seq;
    }

    /// Bytes of the session's events after `sent`; `None` when some of
    /// them are no longer buffered.
    fn lag_bytes(&self, sent: u64) -> Option<u64> {
        if sent >= self.last_seq {
            return Some(0);
        }
        let front = self.buffer.front_seq()?;
        if sent + 1 < front {
            return None;
        }
        let before = if sent + 1 == front {
            self.buffer[0].end - self.buffer[0].frame.len() as u64
        } else {
            self.buffer[(sent - front) as usize].end
        };
        Some(self.buffer.total_bytes() - before)
    }

    /// Far behind: the oldest event the subscriber's client may lack is
    /// within [`FAR_BEHIND_MARGIN_EVENTS`] / [`FAR_BEHIND_MARGIN_BYTES`] of
    /// leaving the buffer, or gone. Its cursor is at `sent`; the `in_flight`
    /// bytes delivered to its socket and not yet written count as lacking
    /// (a 4008 drops them), so this is about what the client holds.
    fn far_behind(&self, sent: u64, in_flight: usize) -> bool {
        self.within_margins(sent, in_flight, self.margins())
    }

    /// Far-behind margins of the session's subscribers: one, or for a run
    /// of another node two, since what is on its way from the owner
    /// (a batch, the owner's unpublished frames up to
    /// `cluster::bus::PUBLISH_WINDOW`, a stream read) still comes in after
    /// this node asked the run to wait.
    fn margins(&self) -> usize {
        match self.run.as_ref() {
            Some(run) if run.remote.is_some() => 2,
            _ => 1,
        }
    }

    /// Still at risk, for a subscriber that holds the run: within twice the
    /// far-behind margin (so a hold ends with room to spare, not at once
    /// again).
    fn at_risk(&self, sent: u64, in_flight: usize) -> bool {
        self.within_margins(sent, in_flight, self.margins() + 1)
    }

    /// The oldest event the client may lack is within `margins` times the
    /// far-behind margin of leaving the buffer, or gone.
    fn within_margins(&self, sent: u64, in_flight: usize, margins: usize) -> bool {
        let Some(lag) = self.lag_bytes(sent) else {
            return true;
        };
        let lacking = lag + in_flight as u64;
        if lacking > (REPLAY_MAX_BYTES - margins * FAR_BEHIND_MARGIN_BYTES) as u64 {
            return true;
        }
        let max_events = REPLAY_MAX_EVENTS - margins * FAR_BEHIND_MARGIN_EVENTS;
        if self.buffer.len() <= max_events {
            return false;
        }
        // The first buffered event that ends after what the client was written.
        let written = self.buffer.total_bytes().saturating_sub(lacking);
        let first = self.buffer.first_ending_after(written);
        self.buffer.len() - first > max_events
    }

    /// The run may be held for far-behind readers: it runs (here, or on
    /// another node, which this node then asks to wait: `cluster.rs`), and
    /// has been paused for them alone (its quorum was there) less than
    /// [`HOLD_GRACE`] plus `1/HOLD_SHARE` of its time.
    fn may_hold(&self, now: Instant) -> bool {
        let Some(run) = self.run.as_ref() else {
            return false;
        };
        if run.status != Status::Running {
            return false;
        }
        let holding = self
            .paused
            .as_ref()
            .and_then(|p| p.held_since)
            .map_or(Duration::ZERO, |s| now - s);
        run.held_for + holding < HOLD_GRACE + (now - run.started) / HOLD_SHARE
    }

    fn hold(&mut self, socket: SocketId) {
        if self.holding.is_empty() {
            if let Some(run) = self.run.as_mut() {
                run.holds += 1;
            }
        }
        self.holding.insert(socket);
    }
}

struct SocketEntry {
    user_id: i64,
    deliver: Recipient<Deliver>,
    close: Recipient<CloseSocket>,
    /// Delivered and not yet reported written.
    bytes_in_flight: usize,
    batches_in_flight: usize,
    /// When it last reported a write ([`Drained`]).
    drained_at: Option<Instant>,
    /// Sessions this socket follows.
    sessions: BTreeSet<String>,
}

impl SocketEntry {
    fn has_room(&self) -> bool {
        self.bytes_in_flight < SUBSCRIBER_HIGH_WATER
            && self.batches_in_flight < SUBSCRIBER_MAX_BATCHES
    }

    /// Its client is reading: it reported a write within `window`.
    fn reading(&self, now: Instant, window: Duration) -> bool {
        self.drained_at.is_some_and(|at| now - at < window)
    }
}

/// Deliveries kept per session for reuse ([`SessionState::deliveries`]).
const DELIVERY_CACHE: usize = 32;

/// A delivery built for one subscriber, shared with the others: its first
/// and last seq, its frame bytes, its frames.
struct Chunk {
    from: u64,
    to: u64,
    bytes: usize,
    frames: Arc<[Frame]>,
}

pub struct RunRegistry {
    config: Arc<GatewayConfig>,
    store: Store,
    sockets: FastMap<SocketId, SocketEntry>,
    next_socket: SocketId,
    sessions: FastMap<String, SessionState>,
    /// Gateway request id -> app session id, for pending permissions.
    permissions: HashMap<String, String>,
    /// Per session: `clientRequestId` -> (run id, when), oldest first (E6).
    client_requests: HashMap<String, VecDeque<(String, String, Instant)>>,
    /// Shutdown began: new runs are refused.
    shutting_down: bool,
    /// Why a handler panicked, until the restart that follows has run.
    panicked: Option<String>,
    /// The adapter for each provider ([`provider_for`], or a test's own).
    providers: ProviderLookup,
    /// Start a `ProviderRun` per run (the model test plays its part itself).
    spawn_processes: bool,
    /// While a `RunEvents` batch is sequenced: when its first line was read.
    reading: Option<Instant>,
    /// Cluster mode (`--redis-url`): the bus and what goes to it.
    cluster: Option<cluster::ClusterLink>,
}

/// The maps looked up for every event and every delivery: SipHash of a
/// session id cost about 250 instructions a lookup, foldhash a tenth. Their
/// keys are the gateway's own (session ids are UUIDs it made, socket ids
/// its counter), and foldhash is still seeded per process.
type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// How the registry finds a provider's adapter.
pub type ProviderLookup = fn(ProviderKind) -> Option<&'static dyn Provider>;

impl RunRegistry {
    pub fn new(config: Arc<GatewayConfig>, store: Store) -> Self {
        RunRegistry::with_providers(config, store, provider_for)
    }

    pub fn with_providers(
        config: Arc<GatewayConfig>,
        store: Store,
        providers: ProviderLookup,
    ) -> Self {
        RunRegistry {
            config,
            store,
            sockets: FastMap::default(),
            next_socket: 1,
            sessions: FastMap::default(),
            permissions: HashMap::new(),
            client_requests: HashMap::new(),
            shutting_down: false,
            panicked: None,
            providers,
            spawn_processes: true,
            reading: None,
            cluster: None,
        }
    }

    /// Runs get no `ProviderRun`: the caller sends `RunEvents` and
    /// `RunExited` itself (the model-based test).
    #[cfg(test)]
    pub(crate) fn without_processes(mut self) -> Self {
        self.spawn_processes = false;
        self
    }

    /// Runs a handler's or timer's body. A panic in it is a registry bug
    /// that may have left its state half-changed: it is logged, the caller
    /// gets `fallback`, and the actor stops, so its `Supervisor` restarts
    /// it (see [`Supervised::restarting`]) with the same mailbox and address.
    fn guarded<R>(
        &mut self,
        ctx: &mut Context<Self>,
        what: &'static str,
        fallback: R,
        body: impl FnOnce(&mut Self, &mut Context<Self>) -> R,
    ) -> R {
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| body(self, ctx))) {
            Ok(result) => result,
            Err(panic) => {
                let reason = panic_message(panic.as_ref());
                metrics()
                    .actor_panics
                    .with_label_values(&["RunRegistry"])
                    .inc();
                tracing::error!(actor = "RunRegistry", event = "actor.panicked", handler = what, reason = %reason, "supervision: actor panicked; restarting it");
                self.panicked = Some(reason);
                ctx.stop();
                fallback
            }
        }
    }

    /// Ends every live run (its process killed, an `error` and a failed
    /// `complete`, `aborted` as given), sends each subscriber what it was not
    /// sent yet whatever its budget (these are the runs' last events), and
    /// closes every socket with 1001 (clients reconnect and resubscribe).
    /// Returns how many runs and sockets it ended.
    fn end_all_runs(
        &mut self,
        error: &str,
        aborted: bool,
        close_reason: &'static str,
        ctx: &mut Context<Self>,
    ) -> (usize, usize) {
        let running: Vec<String> = self
            .sessions
            .iter()
            .filter(|(_, s)| {
                s.run
                    .as_ref()
                    .is_some_and(|r| r.is_live() && r.remote.is_none())
            })
            .map(|(id, _)| id.clone())
            .collect();
        let runs = running.len();
        for session_id in running {
            if let Some(addr) = self
                .sessions
                .get(&session_id)
                .and_then(|s| s.run.as_ref())
                .and_then(|r| r.addr.clone())
            {
                addr.do_send(Kill);
            }
            self.emit(&session_id, EventBody::error(error));
            self.complete(&session_id, 1, aborted, ctx);
        }
        let follows: Vec<(SocketId, String)> = self
            .sessions
            .iter()
            .flat_map(|(id, s)| {
                s.subscribers
                    .keys()
                    .map(move |socket| (*socket, id.clone()))
            })
            .collect();
        for (socket, session_id) in follows {
            let Some(state) = self.sessions.get_mut(&session_id) else {
                continue;
            };
            let Some(sent) = state.subscribers.get_mut(&socket) else {
                continue;
            };
            let rest: Arc<[Frame]> = state.buffer.frames_after(*sent).cloned().collect();
            *sent = state.last_seq;
            if !rest.is_empty() {
                self.deliver_to(socket, rest);
            }
        }
        let sockets = self.sockets.len();
        for (_, socket) in self.sockets.drain() {
            socket.close.do_send(CloseSocket {
                code: 1001,
                reason: close_reason,
            });
        }
        (runs, sockets)
    }

    /// Sends frames to one socket and counts them against its budget; a full
    /// mailbox (only possible for out-of-band frames) marks it a slow consumer.
    fn deliver_to(&mut self, socket: SocketId, frames: Arc<[Frame]>) -> bool {
        self.deliver_read_at(socket, frames, None)
    }

    fn deliver_read_at(
        &mut self,
        socket: SocketId,
        frames: Arc<[Frame]>,
        read_at: Option<Instant>,
    ) -> bool {
        let bytes = frames.iter().map(|f| f.len()).sum();
        self.deliver_sized(socket, frames, bytes, read_at)
    }

    /// [`Self::deliver_read_at`] of frames of `bytes` in all.
    fn deliver_sized(
        &mut self,
        socket: SocketId,
        frames: Arc<[Frame]>,
        bytes: usize,
        read_at: Option<Instant>,
    ) -> bool {
        let Some(entry) = self.sockets.get_mut(&socket) else {
            return false;
        };
        match entry.deliver.try_send(Deliver(frames, read_at)) {
            Ok(()) => {
                entry.bytes_in_flight += bytes;
                entry.batches_in_flight += 1;
                true
            }
            Err(SendError::Full(_)) => {
                self.drop_slow_consumer(socket, "mailbox full");
                false
            }
            Err(SendError::Closed(_)) => {
                self.forget_socket(socket);
                false
            }
        }
    }

    fn drop_slow_consumer(&mut self, socket: SocketId, why: &'static str) {
        let kept = self.keep_place(socket);
        if let Some(entry) = self.sockets.get(&socket) {
            metrics().slow_consumer_disconnects.inc();
            // How long its client had been silent (None: it never wrote).
            let since_write_ms = entry.drained_at.map(|at| at.elapsed().as_millis() as u64);
            tracing::warn!(
                actor = "ChatSocket",
                socket,
                reason = "slow consumer",
                detail = why,
                since_write_ms,
                place_kept = kept,
                "closing socket with 4008"
            );
            // Once per socket: it is forgotten right after.
            entry.close.do_send(CloseSocket {
                code: 4008,
                reason: "slow consumer",
            });
        }
        self.forget_socket(socket);
    }

    /// Keeps the place of a subscriber about to be closed with 4008 in each
    /// session with a live run it follows, if the events its client lacks
    /// are still buffered and the session has room for one more place.
    /// True when one was kept.
    fn keep_place(&mut self, socket: SocketId) -> bool {
        let Some(entry) = self.sockets.get(&socket) else {
            return false;
        };
        let mut kept = false;
        for session_id in &entry.sessions {
            let Some(state) = self.sessions.get_mut(session_id) else {
                continue;
            };
            let live = state.run.as_ref().is_some_and(Run::is_live);
            let Some(&sent) = state.subscribers.get(&socket) else {
                continue;
            };
            if !live || state.places.len() >= REJOIN_PLACES_MAX {
                continue;
            }
            let Some(from) = state.lacking_from(sent, entry.bytes_in_flight) else {
                continue;
            };
            if from > state.last_seq {
                // Its client has every event: nothing to keep.
                continue;
            }
            state.places.push(Place {
                user_id: entry.user_id,
                from,
                until: Instant::now() + REJOIN_GRACE,
                socket: None,
            });
            state.keep_places();
            kept = true;
        }
        kept
    }

    /// Gives up the session's places that are no longer needed: their time
    /// is over, their events left the buffer anyway (the stretch was full),
    /// or their resubscriber is gone or out of the far-behind margin (a
    /// resubscriber's place follows its cursor).
    fn review_places(
        state: &mut SessionState,
        sockets: &FastMap<SocketId, SocketEntry>,
        now: Instant,
    ) {
        if state.places.is_empty() {
            return;
        }
        let mut places = std::mem::take(&mut state.places);
        let front = state.buffer.front_seq().unwrap_or(state.last_seq + 1);
        places.retain_mut(|place| {
            if now >= place.until || place.from < front {
                return false;
            }
            let Some(socket) = place.socket else {
                return true;
            };
            let (Some(entry), Some(&sent)) = (sockets.get(&socket), state.subscribers.get(&socket))
            else {
                return false;
            };
            if !state.far_behind(sent, entry.bytes_in_flight) {
                return false;
            }
            match state.lacking_from(sent, entry.bytes_in_flight) {
                Some(from) => {
                    // Its client was written more: it is catching up, so
                    // the place stays while it does (the stretch bounds it).
                    if from > place.from {
                        place.until = now + REJOIN_GRACE;
                    }
                    place.from = from;
                    true
                }
                None => false,
            }
        });
        state.places = places;
        state.keep_places();
    }

    fn forget_socket(&mut self, socket: SocketId) {
        let Some(entry) = self.sockets.remove(&socket) else {
            return;
        };
        for session_id in entry.sessions {
            let Some(state) = self.sessions.get_mut(&session_id) else {
                continue;
            };
            state.subscribers.remove(&socket);
            state.catching_up.remove(&socket);
            state.holding.remove(&socket);
            // A history write still under way keeps it until the periodic flush.
            if self.disposable(&session_id) {
                self.sessions.remove(&session_id);
            } else {
                self.maybe_resume(&session_id, None);
            }
        }
    }

    /// Subscribes the socket to the session with its cursor at `sent` (the
    /// last seq it has). An existing subscription keeps its cursor, or with
    /// `forward` (a client's `lastSeq`) the higher of both (E8): a cursor
    /// never moves back, and only the client moves it past undelivered events.
    fn attach(&mut self, socket: SocketId, session_id: &str, sent: u64, forward: bool) {
        let (Some(entry), Some(state)) = (
            self.sockets.get_mut(&socket),
            self.sessions.get_mut(session_id),
        ) else {
            return;
        };
        entry.sessions.insert(session_id.to_string());
        let cursor = state.subscribers.entry(socket).or_insert(sent);
        if forward {
            *cursor = (*cursor).max(sent);
        }
    }

    /// Sends the socket what it has not been sent of the session, as far as
    /// its budget allows. `live`: not a replay after `chat.subscribe` (its
    /// deliveries are timed from the provider's line).
    fn pump(&mut self, socket: SocketId, session_id: &str, live: bool) {
        loop {
            let (Some(entry), Some(state)) =
                (self.sockets.get(&socket), self.sessions.get(session_id))
            else {
                return;
            };
            let Some(&sent) = state.subscribers.get(&socket) else {
                return;
            };
            if sent >= state.last_seq || !entry.has_room() {
                return;
            }
            let Some(front) = state.buffer.front_seq() else {
                return self.drop_slow_consumer(socket, "its events left the replay buffer");
            };
            if sent + 1 < front {
                return self.drop_slow_consumer(socket, "its events left the replay buffer");
            }
            let start = (sent + 1 - front) as usize;
            let limit = DELIVERY_MAX_BYTES.min(SUBSCRIBER_HIGH_WATER - entry.bytes_in_flight);
            let read_at = state.buffer.read_at(start).filter(|_| live);
            // The longest delivery already built from here that fits.
            let cached = state
                .deliveries
                .iter()
                .filter(|c| c.from == sent + 1 && c.bytes <= limit)
                .max_by_key(|c| c.to)
                .map(|c| (c.to, c.bytes, c.frames.clone()));
            let share = cached.is_none() && state.subscribers.len() > 1;
            let (to, bytes, frames) = cached.unwrap_or_else(|| {
                let mut end = start;
                let mut bytes = 0;
                while end < state.buffer.len() && end - start < DELIVERY_MAX_FRAMES {
                    let len = state.buffer[end].frame.len();
                    if end > start && bytes + len > limit {
                        break;
                    }
                    bytes += len;
                    end += 1;
                }
                let frames = state.buffer.frames(start..end);
                (state.buffer.seq(end - 1), bytes, frames)
            });
            let Some(state) = self.sessions.get_mut(session_id) else {
                return;
            };
            if share {
                if state.deliveries.len() >= DELIVERY_CACHE {
                    state.deliveries.pop_front();
                }
                state.deliveries.push_back(Chunk {
                    from: sent + 1,
                    to,
                    bytes,
                    frames: frames.clone(),
                });
            }
            if let Some(cursor) = state.subscribers.get_mut(&socket) {
                *cursor = to;
            }
            if !self.deliver_sized(socket, frames, bytes, read_at) {
                return;
            }
        }
    }

    /// Sends every subscriber of the session what it can take, holds the
    /// run for those about to lose events that are reading, and closes the
    /// others (far behind while the run moves on).
    fn fan_out(&mut self, session_id: &str) {
        self.cluster_publish();
        let Some(state) = self.sessions.get(session_id) else {
            return;
        };
        let subscribers: Vec<SocketId> = state.subscribers.keys().copied().collect();
        for socket in subscribers {
            self.pump(socket, session_id, true);
        }
        let Some(state) = self.sessions.get_mut(session_id) else {
            return;
        };
        let sockets = &self.sockets;
        let now = Instant::now();
        Self::review_places(state, sockets, now);
        let far: Vec<SocketId> = state
            .subscribers
            .iter()
            .filter(|(socket, sent)| {
                let in_flight = sockets.get(socket).map_or(0, |e| e.bytes_in_flight);
                state.far_behind(**sent, in_flight)
            })
            .map(|(socket, _)| *socket)
            .collect();
        // Out of the margin, a resubscriber is a subscriber like any other.
        state.catching_up.retain(|s| far.binary_search(s).is_ok());
        let may_hold = state.may_hold(now);
        let window = self.config.heartbeat;
        let mut close = Vec::new();
        for socket in far {
            let buffered = state.lag_bytes(state.subscribers[&socket]).is_some();
            if state.holding.contains(&socket) && buffered {
                continue;
            }
            let reading = sockets.get(&socket).is_some_and(|e| e.reading(now, window));
            if may_hold && reading && buffered {
                // The run waits for it rather than lose it: `should_pause`.
                state.hold(socket);
                continue;
            }
            if state.catching_up.contains(&socket) && buffered {
                continue;
            }
            close.push(socket);
        }
        for socket in close {
            self.drop_slow_consumer(socket, "far behind the run");
        }
    }

    /// Ends the session's holds that no longer apply: the holder is twice
    /// the margin away from losing events, or wrote nothing for a heartbeat
    /// interval, or the run's hold time is spent, or the run no longer runs.
    /// A holder still far behind is closed at the next fan-out. True when a
    /// hold ended.
    fn review_holds(&mut self, session_id: &str) -> bool {
        let Some(state) = self.sessions.get_mut(session_id) else {
            return false;
        };
        if state.holding.is_empty() {
            return false;
        }
        let now = Instant::now();
        let may_hold = state.may_hold(now);
        let window = self.config.heartbeat;
        let ended: Vec<SocketId> = state
            .holding
            .iter()
            .copied()
            .filter(|s| {
                let (Some(entry), Some(sent)) = (self.sockets.get(s), state.subscribers.get(s))
                else {
                    return true;
                };
                !may_hold
                    || !entry.reading(now, window)
                    || !state.at_risk(*sent, entry.bytes_in_flight)
            })
            .collect();
        for socket in &ended {
            state.holding.remove(socket);
        }
        !ended.is_empty()
    }

    /// Too many of the session's subscribers are behind for its run to move
    /// on (every one, with one or two subscribers; see [`pace_quorum`]).
    fn should_pause(&self, session_id: &str) -> bool {
        self.sessions.get(session_id).is_some_and(|s| {
            let n = s.subscribers.len();
            let caught_up = s.subscribers.values().filter(|sent| **sent >= s.last_seq);
            n > 0 && (caught_up.count() < pace_quorum(n) || !s.holding.is_empty())
        }) || self.cluster_wait(session_id)
    }

    /// Caught up with the session and below the low-water mark.
    fn is_ready(&self, state: &SessionState, socket: SocketId) -> bool {
        state.subscribers.get(&socket).is_some_and(|sent| {
            *sent >= state.last_seq
                && self
                    .sockets
                    .get(&socket)
                    .is_some_and(|e| e.bytes_in_flight <= SUBSCRIBER_LOW_WATER)
        })
    }

    /// Resumes the session's paused run when it need not wait any more: no
    /// subscriber, no running run, or a [`pace_quorum`] of subscribers
    /// caught up and below the low-water mark and no far-behind reader
    /// holding it. `drained`: the subscriber whose budget came back (only
    /// it can have become ready); `None` when the subscribers changed,
    /// which counts them all again.
    fn maybe_resume(&mut self, session_id: &str, drained: Option<SocketId>) {
        let drained = drained.filter(|_| !self.review_holds(session_id));
        let Some(state) = self.sessions.get(session_id) else {
            return;
        };
        let Some(pause) = state.paused.as_ref() else {
            return;
        };
        let running = state
            .run
            .as_ref()
            .is_some_and(|r| r.status == Status::Running);
        if !running {
            return self.resume(session_id);
        }
        // Other nodes' subscribers, or the publishing to them, need it to wait.
        if self.cluster_wait(session_id) {
            return;
        }
        if state.subscribers.is_empty() {
            return self.resume(session_id);
        }
        let ready = match drained {
            Some(socket) if pause.ready.contains(&socket) || !self.is_ready(state, socket) => {
                return;
            }
            Some(socket) => vec![socket],
            None => {
                let all = state.subscribers.keys();
                all.copied().filter(|s| self.is_ready(state, *s)).collect()
            }
        };
        let need = pace_quorum(state.subscribers.len());
        let Some(state) = self.sessions.get_mut(session_id) else {
            return;
        };
        let held = !state.holding.is_empty();
        let Some(pause) = state.paused.as_mut() else {
            return;
        };
        if drained.is_none() {
            pause.ready.clear();
        }
        pause.ready.extend(ready);
        if pause.ready.len() < need {
            return;
        }
        if held {
            // From here the run waits for its far-behind readers alone.
            pause.held_since.get_or_insert_with(Instant::now);
        } else {
            self.resume(session_id);
        }
    }

    fn resume(&mut self, session_id: &str) {
        let Some(state) = self.sessions.get_mut(session_id) else {
            return;
        };
        let Some(pause) = state.paused.take() else {
            return;
        };
        let paused = pause.since.elapsed();
        metrics().paused_for(paused);
        if let Some(run) = state.run.as_mut() {
            run.paused_for += paused;
            run.held_for += pause.held_since.map_or(Duration::ZERO, |s| s.elapsed());
        }
        let _ = pause.resume.send(());
        self.cluster_flow_resumed(session_id);
    }

    /// Pauses the session's run (its subscribers are behind: `should_pause`):
    /// the receiver is told when it may go on.
    fn pause(&mut self, session_id: &str) -> Option<oneshot::Receiver<()>> {
        let state = self.sessions.get(session_id)?;
        let ready = state.subscribers.keys().copied();
        let ready: BTreeSet<SocketId> = ready.filter(|s| self.is_ready(state, *s)).collect();
        let now = Instant::now();
        // Its quorum is there: it waits for far-behind readers alone.
        let held = ready.len() >= pace_quorum(state.subscribers.len()) && !state.holding.is_empty();
        let held_since = held.then_some(now);
        let state = self.sessions.get_mut(session_id)?;
        let (tx, rx) = oneshot::channel();
        if let Some(old) = state.paused.replace(Pause {
            resume: tx,
            since: now,
            ready,
            held_since,
        }) {
            // One batch at a time per run; an older pause cannot exist, but never strand it.
            let _ = old.resume.send(());
        }
        if let Some(run) = state.run.as_mut() {
            run.pauses += 1;
        }
        metrics().flow_control_pauses.inc();
        Some(rx)
    }

    /// Sequences, serializes (once) and buffers one event.
    fn sequence(&mut self, session_id: &str, event: &Event) {
        let Some(state) = self.sessions.get_mut(session_id) else {
            return;
        };
        let Some(run) = state.run.as_mut().filter(|r| r.remote.is_none()) else {
            return;
        };
        state.last_seq += 1;
        let seq = state.last_seq;
        run.last_seq = seq;
        let run_id = run.id.as_str();
        set_now_iso(&mut state.last_activity);
        let timestamp = state.last_activity.as_str();
        let parent = event.parent_tool_use_id.as_deref();
        let frame = run.head.frame(seq, timestamp, parent, &event.body);
        // Stored first, so the history shares the stored copy.
        let frame = state.buffer.push(seq, frame, self.reading);
        if self.config.history_max_messages > 0 {
            let provider = state.provider.as_str();
            let id = || event_id(run_id, seq);
            state
                .history
                .record(session_id, provider, id, timestamp, &event.body, &frame);
        }
        let history_batch = state.history.batch_ready();
        metrics().event(event.body.kind());
        if seq > state.reserved_seq {
            // Only when the database failed to take reservations (logged there).
            state.reserved_seq = seq;
        }
        if let Some(link) = self.cluster.as_mut() {
            let id = event_id(&run.id, seq);
            link.outgoing(session_id, seq, &id, event.body.kind(), &frame);
        }
        if history_batch {
            self.flush_history(session_id, None);
        }
    }

    /// Sequences text deltas in a row (most of a streamed turn) as
    /// [`sequence`](Self::sequence) does each, their frames written straight
    /// into the replay buffer from the escaped texts (no frame of their own,
    /// no decoding and escaping again), with one session lookup and one
    /// clock reading for them all.
    fn sequence_deltas(&mut self, session_id: &str, deltas: &Deltas) {
        let done = self.sequence_escaped(session_id, deltas);
        // A parent id that needs escaping: the usual way. (Skipped before
        // decoding: `events().skip(done)` would decode and drop every
        // delta already written.)
        for (escaped, delta) in deltas.iter().skip(done) {
            self.sequence(session_id, &delta.event(escaped));
        }
        let ready = self.sessions.get(session_id);
        if ready.is_some_and(|s| s.history.batch_ready()) {
            self.flush_history(session_id, None);
        }
    }

    /// The deltas [`sequence_deltas`](Self::sequence_deltas) writes from
    /// their escaped text, from the first on: how many (all of them when
    /// there is nothing to sequence them into, as `sequence` would drop them).
    fn sequence_escaped(&mut self, session_id: &str, deltas: &Deltas) -> usize {
        let Some(state) = self.sessions.get_mut(session_id) else {
            return deltas.len();
        };
        let Some(run) = state.run.as_mut().filter(|r| r.remote.is_none()) else {
            return deltas.len();
        };
        set_now_iso(&mut state.last_activity);
        let record = self.config.history_max_messages > 0;
        let mut done = 0;
        for (escaped, delta) in deltas.iter() {
            let seq = state.last_seq + 1;
            let timestamp = state.last_activity.as_str();
            let parent = delta.parent_tool_use_id.as_deref();
            let Some(frame) = run.head.escaped_delta(seq, timestamp, parent, escaped) else {
                break;
            };
            state.last_seq = seq;
            run.last_seq = seq;
            let write = |w: &mut replay::FrameWriter| frame.write(|s| w.push_str(s));
            let frame = state
                .buffer
                .push_written(seq, frame.len(), self.reading, write);
            if record {
                let id = || event_id(&run.id, seq);
                let history = &mut state.history;
                history.record_escaped_delta(id, timestamp, escaped, delta.len);
            }
            if seq > state.reserved_seq {
                // Only when the database failed to take reservations (logged there).
                state.reserved_seq = seq;
            }
            if let Some(link) = self.cluster.as_mut() {
                let id = event_id(&run.id, seq);
                link.outgoing(session_id, seq, &id, "stream_delta", &frame);
            }
            done += 1;
        }
        metrics().events("stream_delta", done as u64);
        done
    }

    /// Hands the session's pending history to the store, after its previous
    /// write; `done` is told when this write (and every earlier one) ended.
    fn flush_history(&mut self, session_id: &str, done: Option<oneshot::Sender<()>>) {
        let keep = self.config.history_max_messages;
        let Some(state) = self.sessions.get_mut(session_id) else {
            if let Some(done) = done {
                let _ = done.send(());
            }
            return;
        };
        let (entries, dropped) = state.history.take();
        if dropped > 0 {
            tracing::error!(
                session_id,
                dropped,
                "history: the database fell behind; messages left out of the history"
            );
        }
        if entries.is_empty() && done.is_none() {
            return;
        }
        let (store, sid) = (self.store.clone(), session_id.to_string());
        state.history.chain(async move {
            if !entries.is_empty() {
                let id = sid.clone();
                let write = store::blocking(&store, move |s| s.append_history(&id, &entries, keep));
                if let Err(err) = write.await {
                    tracing::error!(session_id = %sid, %err, "failed to write history");
                }
            }
            if let Some(done) = done {
                let _ = done.send(());
            }
        });
    }

    /// Writes every session's pending history (the periodic flush), and
    /// forgets sessions nobody follows any more once their history is written.
    fn flush_all_history(&mut self) {
        let pending: Vec<String> = self
            .sessions
            .iter()
            .filter(|(_, s)| s.history.has_pending())
            .map(|(id, _)| id.clone())
            .collect();
        for id in pending {
            self.flush_history(&id, None);
        }
        let idle: Vec<String> = self
            .sessions
            .keys()
            .filter(|id| self.disposable(id))
            .cloned()
            .collect();
        for id in idle {
            self.sessions.remove(&id);
        }
    }

    /// The session's state may be forgotten (it is loaded again from the
    /// database when needed): no subscriber, no run, no pause, no history
    /// write and no seq reservation under way, and (cluster mode) not
    /// followed. A reservation answered into a state loaded anew is lost,
    /// and that state's counters, from a row read before it, take the next
    /// block for another gateway's: the run's seqs jump and its readers are
    /// closed with 4008. A followed session's stream is read on past frames
    /// a state loaded anew would never get.
    fn disposable(&self, session_id: &str) -> bool {
        self.sessions.get(session_id).is_some_and(|s| {
            s.subscribers.is_empty()
                && s.run.is_none()
                && s.paused.is_none()
                && !s.reserving
                && !s.history.has_pending()
                && !s.history.writing()
        }) && !self.followed_here(session_id)
    }

    /// The turn ended: its history is made durable first, then `complete`
    /// goes out (the web UI reads the history as soon as it sees `complete`).
    /// Meanwhile the run still counts as processing.
    fn finish(&mut self, session_id: &str, exit_code: i32, ctx: &mut Context<Self>) {
        let Some(state) = self.sessions.get_mut(session_id) else {
            return;
        };
        let provider = state.provider.as_str();
        let Some(run) = state.run.as_mut().filter(|r| r.status == Status::Running) else {
            return;
        };
        run.status = Status::Finishing;
        let run_id = run.id.clone();
        state.history.close_text(session_id, provider);
        let (done, written) = oneshot::channel();
        self.flush_history(session_id, Some(done));
        let sid = session_id.to_string();
        let wait = async move {
            if tokio::time::timeout(HISTORY_WRITE_TIMEOUT, written)
                .await
                .is_err()
            {
                tracing::error!(session_id = %sid, "history write timed out; completing the run anyway");
            }
            sid
        };
        ctx.spawn(wait.into_actor(self).map(move |sid, act, ctx| {
            act.guarded(ctx, "RunEvents", (), |act, ctx| {
                let finishing = act
                    .sessions
                    .get(&sid)
                    .and_then(|s| s.run.as_ref())
                    .is_some_and(|r| r.id == run_id && r.status == Status::Finishing);
                if finishing {
                    act.complete(&sid, exit_code, false, ctx);
                }
            })
        }));
    }

    /// Emits one event to the session's subscribers.
    fn emit(&mut self, session_id: &str, body: EventBody) {
        self.sequence(session_id, &Event::from(body));
        self.fan_out(session_id);
    }

    /// Writes the session's last seq (for REST and restarts after a clean stop).
    fn persist_seq(&mut self, session_id: &str) {
        let Some(state) = self.sessions.get(session_id) else {
            return;
        };
        let (id, seq, store) = (session_id.to_string(), state.last_seq, self.store.clone());
        actix::spawn(async move {
            let sid = id.clone();
            if let Err(err) = store::blocking(&store, move |s| s.set_last_seq(&sid, seq)).await {
                tracing::error!(session_id = %id, %err, "failed to persist seq");
            }
        });
    }

    /// E9: when fewer than `needed` + [`SEQ_MARGIN`] reserved seqs are left,
    /// returns the write of the next block, to await before using them; when
    /// less than half a block is left, starts that write in the background.
    fn reserve_seqs(
        &mut self,
        session_id: &str,
        needed: u64,
        ctx: &mut Context<Self>,
    ) -> Option<ResponseActFuture<Self, ()>> {
        let state = self.sessions.get_mut(session_id)?;
        let mut left = state.reserved_seq.saturating_sub(state.last_seq);
        let mut must_wait = left < needed + SEQ_MARGIN;
        if let Some((start, end)) = state.next_block {
            // A block above another gateway's seqs is ours already: moved to
            // once every subscriber has all events (none loses a replay),
            // or when the current block is used up.
            let caught_up = state
                .subscribers
                .values()
                .all(|&sent| sent >= state.last_seq);
            if !(must_wait || caught_up) {
                return None;
            }
            state.jump_to(start, end, session_id);
            left = state.reserved_seq.saturating_sub(state.last_seq);
            must_wait = left < needed + SEQ_MARGIN;
        }
        if !must_wait && (left >= SEQ_BLOCK / 2 || state.reserving) {
            return None;
        }
        if state.reserving {
            // One reservation at a time per session: the store's answer then
            // tells whether the block follows ours (see `reserved`). This one
            // is asked again once the write under way has answered.
            let (tx, rx) = oneshot::channel();
            state.reserve_waiters.push(tx);
            let sid = session_id.to_string();
            let again = async move {
                let _ = rx.await;
            }
            .into_actor(self)
            .then(move |_, act, ctx| -> ResponseActFuture<Self, ()> {
                match act.reserve_seqs(&sid, needed, ctx) {
                    Some(write) => write,
                    None => Box::pin(fut::ready(())),
                }
            });
            return Some(Box::pin(again));
        }
        let upto = state.last_seq + needed + SEQ_MARGIN + SEQ_BLOCK;
        let (after, count) = (state.reserved_seq, upto - state.reserved_seq.min(upto));
        state.reserving = true;
        let (id, store) = (session_id.to_string(), self.store.clone());
        let write =
            async move { store::blocking(&store, move |s| s.reserve_seq(&id, after, count)).await };
        let sid = session_id.to_string();
        let done = write.into_actor(self).map(move |result, act, ctx| {
            act.guarded(ctx, "seq reservation", (), |act, _| {
                act.reserved(&sid, upto, count, result)
            })
        });
        if must_wait {
            Some(Box::pin(done))
        } else {
            ctx.spawn(done);
            None
        }
    }

    fn reserved(
        &mut self,
        session_id: &str,
        upto: u64,
        count: u64,
        result: Result<u64, store::StoreError>,
    ) {
        let Some(state) = self.sessions.get_mut(session_id) else {
            return;
        };
        state.reserving = false;
        for waiter in state.reserve_waiters.drain(..) {
            let _ = waiter.send(());
        }
        match result {
            Ok(end) => {
                let start = end.saturating_sub(count);
                if start > state.reserved_seq {
                    // Another gateway on the same database reserved seqs
                    // since our last block: ours continue above theirs
                    // (a jump, never a seq used twice), once that is safe
                    // for the replay buffer (see `reserve_seqs`).
                    if state.run.is_none() && state.buffer.is_empty() {
                        state.jump_to(start, end, session_id);
                    } else {
                        state.next_block = Some((start, end));
                    }
                } else {
                    state.reserved_seq = state.reserved_seq.max(end);
                }
            }
            // Even on failure the run goes on (its output is not lost); the
            // seqs are then only as safe as the database lets them be.
            Err(_) => state.reserved_seq = state.reserved_seq.max(upto),
        }
        if let Err(err) = result {
            tracing::error!(session_id, %err, "failed to persist the seq reservation; seqs may repeat after a crash");
            let running = state
                .run
                .as_ref()
                .is_some_and(|r| r.status == Status::Running);
            if running {
                self.emit(
                    session_id,
                    EventBody::error(format!(
                        "The gateway could not write to its database ({err}); the run continues"
                    )),
                );
            }
        }
    }

    /// Ends the session's current run once; `false` if it had already ended.
    fn complete(
        &mut self,
        session_id: &str,
        exit_code: i32,
        aborted: bool,
        ctx: &mut Context<Self>,
    ) -> bool {
        let Some(state) = self.sessions.get_mut(session_id) else {
            return false;
        };
        let Some(run) = state.run.as_mut().filter(|r| r.is_live()) else {
            return false;
        };
        run.status = Status::Completed;
        run.aborted = aborted;
        let run_id = run.id.clone();
        let pending = std::mem::take(&mut run.pending);
        let m = metrics();
        let provider = state.provider.as_str();
        let outcome = match (aborted, exit_code) {
            (true, _) => "aborted",
            (false, 0) => "success",
            (false, _) => "failed",
        };
        m.runs_active.with_label_values(&[provider]).dec();
        m.runs_ended.with_label_values(&[provider, outcome]).inc();
        m.run_duration
            .with_label_values(&[provider])
            .observe(run.started.elapsed().as_secs_f64());
        m.permissions_pending.sub(pending.len() as i64);
        let reason = if aborted { "aborted" } else { "run_ended" };
        for p in pending {
            if let Some(timer) = p.timer {
                ctx.cancel_future(timer);
            }
            self.permissions.remove(&p.request_id);
            let body = EventBody::PermissionCancelled {
                request_id: p.request_id,
                reason: reason.to_string(),
            };
            self.sequence(session_id, &Event::from(body));
        }
        let body = EventBody::Complete {
            actual_session_id: session_id.to_string(),
            exit_code,
            success: exit_code == 0 && !aborted,
            aborted,
        };
        self.sequence(session_id, &Event::from(body));
        self.fan_out(session_id);
        self.resume(session_id);
        // The run no longer runs: its holds end (counted in its figures).
        self.review_holds(session_id);
        self.persist_seq(session_id);
        self.cluster_run_done(session_id, &run_id, ctx);
        // An abort or a shutdown completes at once; what the run said is still kept.
        if let Some(state) = self.sessions.get_mut(session_id) {
            let provider = state.provider.as_str();
            state.history.close_text(session_id, provider);
        }
        self.flush_history(session_id, None);
        let (pauses, paused_ms, holds, held_ms) = self
            .sessions
            .get(session_id)
            .and_then(|s| s.run.as_ref())
            .map_or((0, 0, 0, 0), |r| {
                let ms = |d: Duration| d.as_millis() as u64;
                (r.pauses, ms(r.paused_for), r.holds, ms(r.held_for))
            });
        run_span(session_id, &run_id).in_scope(|| {
            tracing::info!(actor = "ProviderRun", session_id, run_id = %run_id, exit_code, aborted, pauses, paused_ms, holds, held_ms, "run completed")
        });
        // Keep the buffer for late subscribers, then forget the run.
        let sid = session_id.to_string();
        ctx.run_later(COMPLETED_RUN_RETENTION, move |act, ctx| {
            act.guarded(ctx, "eviction", (), |act, _| act.evict(&sid, &run_id))
        });
        true
    }

    fn evict(&mut self, session_id: &str, run_id: &str) {
        let Some(state) = self.sessions.get_mut(session_id) else {
            return;
        };
        let finished_same_run = state
            .run
            .as_ref()
            .is_some_and(|r| r.id == run_id && r.status == Status::Completed);
        if !finished_same_run {
            return;
        }
        state.run = None;
        state.buffer.clear();
        state.deliveries.clear();
        // A history write still under way keeps it until the periodic flush.
        if self.disposable(session_id) {
            self.sessions.remove(session_id);
        }
    }

    fn state_for(&mut self, row: &SessionRow, provider: ProviderKind) -> &mut SessionState {
        // E9: a session loaded from the database continues above every seq
        // that may have been used before a crash.
        let floor = row.last_seq.max(row.seq_reserved);
        let state = self
            .sessions
            .entry(row.id.clone())
            .or_insert_with(|| SessionState {
                owner: row.user_id,
                provider,
                project_path: row.project_path.clone(),
                created_at: row.created_at.clone(),
                provider_session_id: row.provider_session_id.clone(),
                last_seq: floor,
                reserved_seq: floor,
                reserving: false,
                reserve_waiters: Vec::new(),
                next_block: None,
                buffer: ReplayBuffer::default(),
                deliveries: VecDeque::new(),
                subscribers: BTreeMap::new(),
                catching_up: BTreeSet::new(),
                places: Vec::new(),
                holding: BTreeSet::new(),
                run: None,
                paused: None,
                id_write: None,
                history: HistoryLog::default(),
                summary: row.summary.clone(),
                message_count: row.message_count,
                last_activity: row.updated_at.clone(),
                project: row.project.clone(),
            });
        // While the state lives its counters are the registry's own: every
        // seq it uses comes from a block the store handed it, so a row that
        // leads them (another gateway on the same database ran the session)
        // is not merged here; the next reservation continues above it.
        // The project may have been renamed or starred since.
        state.project.clone_from(&row.project);
        state
    }

    fn session_upserted(&mut self, session_id: &str) {
        let Some(state) = self.sessions.get(session_id) else {
            return;
        };
        let now = now_iso();
        let frame = ServerFrame::SessionUpserted {
            session_id: session_id.to_string(),
            provider_session_id: state.provider_session_id.clone(),
            provider: state.provider.as_str().to_string(),
            session: UpsertedSession {
                id: session_id.to_string(),
                summary: state.summary.clone(),
                message_count: state.message_count + state.history.recorded(),
                last_activity: state.last_activity.clone(),
                created_at: state.created_at.clone(),
            },
            // The web UI files the session under this project (by projectId).
            project: UpsertedProject {
                project_id: state.project.as_ref().map(|p| p.id.clone()),
                path: state.project_path.clone(),
                full_path: state.project_path.clone(),
                display_name: state.project.as_ref().map_or_else(
                    || {
                        Path::new(&state.project_path)
                            .file_name()
                            .map(|n| n.to_string_lossy().into_owned())
                            .unwrap_or_else(|| state.project_path.clone())
                    },
                    |p| p.display_name.clone(),
                ),
                is_starred: state.project.as_ref().is_some_and(|p| p.is_starred),
            },
            timestamp: now,
        }
        .to_frame();
        let owner = state.owner;
        let frames: Arc<[Frame]> = vec![frame].into();
        let sockets: Vec<SocketId> = self
            .sockets
            .iter()
            .filter(|(_, s)| s.user_id == owner)
            .map(|(id, _)| *id)
            .collect();
        for socket in sockets {
            self.deliver_to(socket, frames.clone());
        }
        self.cluster_upsert(owner, &frames[0]);
    }

    /// Records (or forgets) the session's native id: in memory now, in the
    /// database in order (each write waits for the previous one of the
    /// session), and announced to the owner's sockets.
    fn set_provider_id(&mut self, session_id: &str, native: Option<String>) {
        let Some(state) = self.sessions.get_mut(session_id) else {
            return;
        };
        state.provider_session_id = native.clone();
        let previous = state.id_write.take();
        let (store, sid) = (self.store.clone(), session_id.to_string());
        state.id_write = Some(actix::spawn(async move {
            if let Some(previous) = previous {
                let _ = previous.await;
            }
            let id = sid.clone();
            let result = store::blocking(&store, move |s| {
                s.set_provider_session_id(&id, native.as_deref())
            })
            .await;
            if let Err(err) = result {
                tracing::error!(session_id = %sid, %err, "failed to persist provider session id");
            }
        }));
        self.session_upserted(session_id);
    }

    /// Removes a pending permission request of the session's run (matched
    /// by `is_it`), stops its timer and forgets its id. Returns it with the
    /// run's address, to answer the CLI.
    fn take_pending(
        &mut self,
        session_id: &str,
        is_it: impl Fn(&Pending) -> bool,
        ctx: &mut Context<Self>,
    ) -> Option<(Pending, Option<Addr<ProviderRun>>)> {
        let run = self.sessions.get_mut(session_id)?.run.as_mut()?;
        let pos = run.pending.iter().position(is_it)?;
        let mut pending = run.pending.remove(pos);
        if let Some(timer) = pending.timer.take() {
            ctx.cancel_future(timer);
        }
        let addr = run.addr.clone();
        self.permissions.remove(&pending.request_id);
        metrics().permissions_pending.dec();
        Some((pending, addr))
    }

    fn handle_provider_event(
        &mut self,
        session_id: &str,
        event: ProviderEvent,
        ctx: &mut Context<Self>,
    ) {
        match event {
            ProviderEvent::Emit(event) => self.sequence(session_id, &event),
            ProviderEvent::Deltas(deltas) => self.sequence_deltas(session_id, &deltas),
            ProviderEvent::SessionCreated(native) if !safe_id(&native) => {
                tracing::warn!(
                    session_id,
                    "ignoring a native session id with unsafe characters"
                );
            }
            ProviderEvent::SessionCreated(native) => {
                let known = self
                    .sessions
                    .get(session_id)
                    .is_some_and(|s| s.provider_session_id.as_deref() == Some(native.as_str()));
                if !known {
                    // Send what is sequenced first so events stay in order for subscribers.
                    self.fan_out(session_id);
                    self.set_provider_id(session_id, Some(native));
                }
            }
            ProviderEvent::PermissionRequested {
                provider_request_id,
                tool_name,
                input,
                context,
            } => {
                let Some(run) = self
                    .sessions
                    .get_mut(session_id)
                    .and_then(|s| s.run.as_mut())
                else {
                    return;
                };
                if run.status != Status::Running {
                    return;
                }
                // Never answered here: a remembered rule is the CLI's to
                // apply (the allow carried it as a permission update), and
                // providers without such a protocol never auto-approve.
                let request_id = uuid::Uuid::new_v4().to_string();
                let timer = (!INTERACTIVE_TOOLS.contains(&tool_name.as_str())).then(|| {
                    let (sid, rid) = (session_id.to_string(), request_id.clone());
                    ctx.run_later(self.config.permission_timeout, move |act, ctx| {
                        act.guarded(ctx, "permission timeout", (), |act, ctx| {
                            act.permission_timed_out(&sid, &rid, ctx)
                        })
                    })
                });
                metrics().permissions_pending.inc();
                run.pending.push(Pending {
                    request_id: request_id.clone(),
                    provider_request_id,
                    tool_name: tool_name.clone(),
                    input: input.clone(),
                    context: context.clone(),
                    received_at: now_iso(),
                    timer,
                });
                self.permissions
                    .insert(request_id.clone(), session_id.to_string());
                let body = EventBody::PermissionRequest {
                    request_id,
                    tool_name,
                    input,
                    context,
                };
                self.sequence(session_id, &Event::from(body));
            }
            ProviderEvent::PermissionWithdrawn {
                provider_request_id,
            } => {
                let taken = self.take_pending(
                    session_id,
                    |p| p.provider_request_id == provider_request_id,
                    ctx,
                );
                if let Some((p, _)) = taken {
                    let body = EventBody::PermissionCancelled {
                        request_id: p.request_id,
                        reason: "cancelled".into(),
                    };
                    self.sequence(session_id, &Event::from(body));
                }
            }
            ProviderEvent::TurnComplete { exit_code } => {
                self.finish(session_id, exit_code, ctx);
            }
            // Stdin replies are the run's business; it never forwards them.
            ProviderEvent::Reply(_) => {}
        }
    }

    fn permission_timed_out(
        &mut self,
        session_id: &str,
        request_id: &str,
        ctx: &mut Context<Self>,
    ) {
        let Some((p, addr)) = self.take_pending(session_id, |p| p.request_id == request_id, ctx)
        else {
            return;
        };
        if let Some(addr) = addr {
            addr.do_send(AnswerPermission {
                provider_request_id: p.provider_request_id,
                decision: PermissionDecision {
                    allow: false,
                    updated_input: None,
                    message: Some("Permission request timed out".into()),
                    remember_entry: None,
                },
                original_input: p.input,
            });
        }
        metrics().permissions_timed_out.inc();
        tracing::info!(session_id, request_id, "permission request timed out");
        self.emit(
            session_id,
            EventBody::PermissionCancelled {
                request_id: request_id.to_string(),
                reason: "timeout".into(),
            },
        );
    }

    /// `chat.subscribe` for one session: the ack, then (for a live run, or a
    /// completed run the client had reached, E7) what this socket has not
    /// been sent, streamed as it drains.
    fn subscribe(&mut self, msg: Subscribe) {
        let session_id = msg.session.id.clone();
        if msg.follow {
            // A follower stays for the session's next runs: it needs the state now.
            if let Ok(kind) = msg.session.provider.parse() {
                self.state_for(&msg.session, kind);
            }
        }
        let from = msg.last_seq.unwrap_or(0);
        let state = self.sessions.get(&session_id);
        let run = state.and_then(|s| s.run.as_ref());
        let running = run.is_some_and(Run::is_live);
        let session_last = state.map(|s| s.last_seq).unwrap_or(msg.session.last_seq);
        let pending = run
            .map(|r| {
                r.pending
                    .iter()
                    .map(|p| PendingPermission {
                        request_id: p.request_id.clone(),
                        tool_name: p.tool_name.clone(),
                        input: p.input.clone(),
                        session_id: session_id.to_string(),
                        received_at: p.received_at.clone(),
                        context: p.context.clone(),
                    })
                    .collect()
            })
            .unwrap_or_default();
        // Where this socket's cursor starts, if it follows the session.
        let mut cursor = None;
        let mut subscribed_run = None;
        if let (Some(run), Some(state)) = (run, state) {
            // The buffer may still hold the previous run's tail: the run's own
            // events start at first_seq.
            let oldest = state
                .buffer
                .front_seq()
                .map(|s| s.max(run.first_seq))
                .filter(|o| *o <= state.last_seq)
                .unwrap_or(state.last_seq + 1);
            // Saturating: lastSeq is any u64 a client sends.
            let wanted = from.saturating_add(1).max(run.first_seq);
            subscribed_run = Some(SubscribedRun {
                run_id: run.id.clone(),
                run_first_seq: run.first_seq,
                oldest_seq: oldest,
                replay_truncated: wanted < oldest && wanted <= run.last_seq,
            });
            let reached = from > 0 && run.first_seq - 1 <= from && from < run.last_seq;
            let already = state.subscribers.get(&msg.socket).copied();
            cursor = match (already, running, reached) {
                // E8: never back, never twice.
                (Some(sent), _, _) => Some(sent.max(from)),
                (None, true, _) => Some(from.max(run.first_seq - 1)),
                // A follower: the run from its start (or after lastSeq), completed or not.
                (None, false, _) if msg.follow => Some(from.max(run.first_seq - 1)),
                // E7: catch-up of a completed run the client had reached.
                (None, false, true) => Some(from),
                (None, false, false) => None,
            }
            // A lastSeq from the future means "nothing yet": live from here.
            .map(|sent| sent.min(state.last_seq))
            // E2: what is gone is gone, and the ack says so
            // (`replayTruncated`, refresh history over REST); the replay goes
            // on from the oldest event left. Closing it with 4008 instead
            // would only bring the same resubscription back, for ever.
            .map(|sent| {
                if wanted < oldest {
                    sent.max(oldest - 1)
                } else {
                    sent
                }
            });
        } else if let Some(state) = state.filter(|_| msg.follow) {
            // No run in memory: a follower waits for the next one.
            cursor = Some(state.last_seq);
        }
        let subscribed_run_truncated = subscribed_run.as_ref().is_some_and(|r| r.replay_truncated);
        let ack = ServerFrame::ChatSubscribed {
            session_id: session_id.clone(),
            is_processing: running,
            last_seq: session_last,
            pending_permissions: pending,
            run: subscribed_run,
            timestamp: now_iso(),
        }
        .to_frame();
        self.deliver_to(msg.socket, vec![ack].into());
        if let Some(sent) = cursor {
            if sent < session_last {
                metrics().replays.inc();
                if subscribed_run_truncated {
                    metrics().replays_truncated.inc();
                }
            }
            let new = self
                .sessions
                .get(&session_id)
                .is_some_and(|s| !s.subscribers.contains_key(&msg.socket));
            self.attach(msg.socket, &session_id, sent, true);
            self.pump(msg.socket, &session_id, false);
            // A resubscriber already in the margin (a 4008 closed it there)
            // gets time to catch up: it is closed only once its events leave.
            let entry = self.sockets.get(&msg.socket);
            let (in_flight, user_id) = (entry.map(|e| e.bytes_in_flight), entry.map(|e| e.user_id));
            if let (true, Some(state), Some(in_flight)) =
                (new, self.sessions.get_mut(&session_id), in_flight)
            {
                let cursor = state.subscribers.get(&msg.socket).copied();
                if cursor.is_some_and(|c| state.far_behind(c, in_flight)) {
                    state.catching_up.insert(msg.socket);
                }
                // The place its previous socket left (same user, its client
                // has everything before it) is its own while it catches up.
                let place = state
                    .places
                    .iter_mut()
                    .filter(|p| {
                        p.socket.is_none() && Some(p.user_id) == user_id && p.from <= sent + 1
                    })
                    .max_by_key(|p| p.from);
                if let Some(place) = place {
                    place.socket = Some(msg.socket);
                    place.until = Instant::now() + REJOIN_GRACE;
                }
            }
        }
    }

    /// The previous run's process is still winding down (an abort, or the
    /// exit after its result): a wait for it to be gone.
    fn previous_run_exit(&mut self, session_id: &str) -> Option<oneshot::Receiver<()>> {
        let run = self.sessions.get_mut(session_id)?.run.as_mut()?;
        if run.status != Status::Completed || run.addr.is_none() {
            return None;
        }
        let (tx, rx) = oneshot::channel();
        run.exit_waiters.push(tx);
        Some(rx)
    }

    /// `preset`: the run id (cluster mode leased the session for it).
    fn start_run(
        &mut self,
        msg: StartRun,
        preset: Option<String>,
        ctx: &mut Context<Self>,
    ) -> Result<RunStarted, ChatError> {
        if self.shutting_down {
            return Err(ChatError::new(
                ErrorCode::ShuttingDown,
                "The gateway is shutting down; try again when it is back",
            ));
        }
        let row = msg.session;
        let unsupported = || {
            ChatError::new(
                ErrorCode::UnsupportedProvider,
                format!("Provider '{}' is not supported", row.provider),
            )
        };
        let kind: ProviderKind = row.provider.parse().map_err(|_| unsupported())?;
        let provider = (self.providers)(kind).ok_or_else(unsupported)?;
        let session_id = row.id.clone();
        let now = Instant::now();
        let bin = self.config.bin(kind);
        let record_history = self.config.history_max_messages > 0;
        self.state_for(&row, kind);

        // E6: a repeated clientRequestId starts nothing and gets the original run id.
        let requests = self.client_requests.entry(session_id.clone()).or_default();
        requests.retain(|(_, _, at)| now.duration_since(*at) < CLIENT_REQUEST_TTL);
        if let Some(crid) = &msg.client_request_id {
            if let Some((_, run_id, _)) = requests.iter().find(|(c, _, _)| c == crid) {
                let state = self.sessions.get(&session_id);
                let started = RunStarted {
                    run_id: run_id.clone(),
                    first_seq: state
                        .and_then(|s| s.run.as_ref())
                        .filter(|r| &r.id == run_id)
                        .map_or(0, |r| r.first_seq),
                    duplicate: true,
                };
                let frame = accepted_frame(&session_id, run_id, crid, true);
                if let Some(socket) = msg.socket {
                    let last = state.map_or(0, |s| s.last_seq);
                    self.attach(socket, &session_id, last, false);
                    self.deliver_to(socket, vec![frame].into());
                }
                return Ok(started);
            }
        }
        // The user's runs running now (the limit counts live runs, which this registry owns).
        let running = self
            .sessions
            .values()
            .filter(|s| {
                s.owner == msg.user_id
                    && s.run
                        .as_ref()
                        .is_some_and(|r| r.is_live() && r.remote.is_none())
            })
            .count();
        let Some(state) = self.sessions.get_mut(&session_id) else {
            return Err(ChatError::new(
                ErrorCode::InternalError,
                "session state missing",
            ));
        };
        if state.run.as_ref().is_some_and(Run::is_live) {
            return Err(ChatError::new(
                ErrorCode::RunInProgress,
                "A run is already in progress for this session",
            ));
        }
        let limit = self.config.limits.runs_per_user;
        if running >= limit {
            return Err(ChatError::new(
                ErrorCode::TooManyRuns,
                format!("{running} runs of this user are running (--max-runs-per-user {limit}); wait for one to complete or abort one"),
            ));
        }

        let run_id = preset.unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
        if record_history {
            let (prompt_id, now) = (format!("{run_id}:prompt"), now_iso());
            state
                .history
                .prompt(&session_id, kind.as_str(), &prompt_id, &now, &msg.content);
            state.last_activity = now;
        }
        if state.summary.is_empty() {
            state.summary = msg.content.trim().chars().take(SUMMARY_CHARS).collect();
        }
        let turn = Turn {
            app_session_id: session_id.clone(),
            // Never hand an id that could be read as a flag to any CLI.
            provider_session_id: state.provider_session_id.clone().filter(|id| {
                let ok = safe_id(id);
                if !ok {
                    tracing::warn!(session_id = %session_id, "not resuming: the stored native id has unsafe characters");
                }
                ok
            }),
            content: msg.content,
            options: msg.options,
            cwd: msg.cwd,
            bin,
        };
        // Only what some subscriber has not been sent stays buffered from the previous run.
        let keep_from = state
            .subscribers
            .values()
            .map(|sent| sent + 1)
            .min()
            .unwrap_or(state.last_seq + 1);
        state.buffer.drop_before(keep_from);
        let first_seq = state.last_seq + 1;
        state.run = Some(Run {
            id: run_id.clone(),
            status: Status::Running,
            started_at: now_iso(),
            started: Instant::now(),
            first_seq,
            last_seq: first_seq - 1,
            addr: None,
            pending: Vec::new(),
            aborted: false,
            provider_id_at_start: state.provider_session_id.clone(),
            pauses: 0,
            paused_for: Duration::ZERO,
            holds: 0,
            held_for: Duration::ZERO,
            exit_waiters: Vec::new(),
            remote: None,
            head: EnvelopeHead::new(&session_id, state.provider.as_str(), &run_id),
        });
        if let Some(socket) = msg.socket {
            self.attach(socket, &session_id, first_seq - 1, false);
        }
        if let Some(crid) = &msg.client_request_id {
            let requests = self.client_requests.entry(session_id.clone()).or_default();
            if requests.len() >= CLIENT_REQUESTS_MAX {
                requests.pop_front();
            }
            requests.push_back((crid.clone(), run_id.clone(), now));
            if let Some(socket) = msg.socket {
                let frame = accepted_frame(&session_id, &run_id, crid, false);
                self.deliver_to(socket, vec![frame].into());
            }
        }

        if self.spawn_processes {
            let registry = ctx.address();
            let child_env = self.config.child_env.clone();
            let idle = self.config.provider_idle;
            let (sid, rid) = (session_id.clone(), run_id.clone());
            // On the registry's own thread: a batch reaches the registry
            // without waking another thread (README, Performance).
            let addr = ProviderRun::new(sid, rid, provider, turn, registry, child_env)
                .idle_limit(idle)
                .start();
            if let Some(run) = self
                .sessions
                .get_mut(&session_id)
                .and_then(|s| s.run.as_mut())
            {
                run.addr = Some(addr);
            }
        }
        metrics()
            .runs_active
            .with_label_values(&[kind.as_str()])
            .inc();
        run_span(&session_id, &run_id).in_scope(|| {
            tracing::info!(actor = "ProviderRun", session_id = %session_id, run_id = %run_id, provider = %kind, "run started")
        });
        Ok(RunStarted {
            run_id,
            first_seq,
            duplicate: false,
        })
    }

    /// The run's events, once its seqs are reserved: sequenced, buffered,
    /// fanned out; the answer is withheld while every subscriber is behind.
    fn run_events(
        &mut self,
        msg: RunEvents,
        ctx: &mut Context<Self>,
    ) -> ResponseActFuture<Self, ()> {
        // Output of a previous run's process, or of an aborted run winding
        // down, belongs to nobody. A run that completed normally may still
        // print (background work); that is forwarded, as the reference does.
        let current = self
            .sessions
            .get(&msg.session_id)
            .and_then(|s| s.run.as_ref())
            .is_some_and(|r| r.id == msg.run_id && !r.aborted);
        if !current {
            return Box::pin(fut::ready(()));
        }
        self.reading = msg.read_at;
        for event in msg.events {
            self.handle_provider_event(&msg.session_id, event, ctx);
        }
        self.reading = None;
        self.fan_out(&msg.session_id);
        let still_current = self
            .sessions
            .get(&msg.session_id)
            .and_then(|s| s.run.as_ref())
            .is_some_and(|r| r.id == msg.run_id && !r.aborted);
        if !still_current || !self.should_pause(&msg.session_id) {
            return Box::pin(fut::ready(()));
        }
        let Some(rx) = self.pause(&msg.session_id) else {
            return Box::pin(fut::ready(()));
        };
        tracing::debug!(session_id = %msg.session_id, run_id = %msg.run_id, "run paused: too many subscribers are behind");
        Box::pin(
            async move {
                let _ = rx.await;
            }
            .into_actor(self),
        )
    }
}

/// The span of one run's log lines, as `ProviderRun` opens it (`RUST_LOG`
/// filters like `[run{run_id=...}]=debug` pick one run).
fn run_span(session_id: &str, run_id: &str) -> tracing::Span {
    tracing::info_span!("run", session_id = %session_id, run_id = %run_id)
}

fn accepted_frame(
    session_id: &str,
    run_id: &str,
    client_request_id: &str,
    duplicate: bool,
) -> Frame {
    ServerFrame::ChatAccepted {
        session_id: session_id.to_string(),
        run_id: run_id.to_string(),
        client_request_id: client_request_id.to_string(),
        duplicate,
        timestamp: now_iso(),
    }
    .to_frame()
}

/// The session's project path, or a client `options.cwd` inside it.
/// Blocking (it canonicalizes paths): call it off actor threads.
pub fn resolve_cwd(project_path: &str, options: &Value) -> PathBuf {
    let project = PathBuf::from(project_path);
    let Some(cwd) = options
        .get("cwd")
        .and_then(Value::as_str)
        .filter(|c| !c.is_empty())
    else {
        return project;
    };
    let candidate = project.join(cwd);
    match (candidate.canonicalize(), project.canonicalize()) {
        (Ok(c), Ok(p)) if c.starts_with(&p) => c,
        _ => {
            tracing::warn!(
                cwd,
                project_path,
                "ignoring options.cwd outside the project"
            );
            project
        }
    }
}

impl Actor for RunRegistry {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(MAILBOX_CAPACITY);
        ctx.run_interval(HISTORY_FLUSH_EVERY, |act, ctx| {
            act.guarded(ctx, "history flush", (), |act, _| act.flush_all_history())
        });
        // E6 ids live 10 minutes whatever happens to their session's state.
        ctx.run_interval(CLIENT_REQUEST_SWEEP, |act, ctx| {
            act.guarded(ctx, "clientRequestId sweep", (), |act, _| {
                let now = Instant::now();
                act.client_requests.retain(|_, ids| {
                    ids.retain(|(_, _, at)| now.duration_since(*at) < CLIENT_REQUEST_TTL);
                    !ids.is_empty()
                });
            })
        });
        // A holder that stopped reading sends nothing that would end its hold.
        ctx.run_interval(HOLD_REVIEW_EVERY, |act, ctx| {
            act.guarded(ctx, "hold review", (), |act, _| {
                let held: Vec<String> = act
                    .sessions
                    .iter()
                    .filter(|(_, s)| !s.holding.is_empty())
                    .map(|(id, _)| id.clone())
                    .collect();
                for session_id in held {
                    if act.review_holds(&session_id) {
                        act.maybe_resume(&session_id, None);
                    }
                }
            })
        });
        if self.cluster.is_some() {
            ctx.run_interval(cluster::UNFOLLOW_EVERY, |act, ctx| {
                act.guarded(ctx, "cluster unfollow", (), |act, _| act.unfollow_idle())
            });
            // Flow waits: renewed to other nodes' runs, expired for ours.
            ctx.run_interval(crate::cluster::bus::FLOW_RENEW_EVERY, |act, ctx| {
                act.guarded(ctx, "cluster flow", (), |act, _| act.cluster_flow_tick())
            });
        }
        tracing::info!(
            event = "actor.started",
            actor = "RunRegistry",
            "actor started"
        );
    }

    fn stopped(&mut self, _: &mut Self::Context) {
        tracing::info!(
            event = "actor.stopped",
            actor = "RunRegistry",
            reason = self.panicked.as_deref().unwrap_or("stopped"),
            "actor stopped"
        );
    }
}

/// Run under `actix::Supervisor` (the binary does): after a panic in a
/// handler or timer ([`RunRegistry::guarded`] stops the actor) the same
/// actor value is restarted with the same mailbox, so every `Addr` held by
/// sockets, runs and routes stays valid. What it owned may be inconsistent,
/// so it is given up the way a shutdown gives it up: every live run is
/// killed and gets an `error` and a failed `complete`, every subscriber is
/// sent what it was not sent yet and closed with 1001 (its client
/// reconnects and resubscribes), and the per-session state is dropped. Seq
/// numbering stays safe (E9): a session is loaded again from the database
/// above its persisted reservation. The `clientRequestId` table is kept, so
/// a resend after the restart still runs nothing twice.
impl Supervised for RunRegistry {
    fn restarting(&mut self, ctx: &mut Context<Self>) {
        let reason = self.panicked.take().unwrap_or_else(|| "stopped".into());
        let ended = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.end_all_runs(
                "The gateway's run registry failed and was restarted; this run was stopped",
                false,
                "run registry restarted",
                ctx,
            )
        }));
        let (runs_failed, sockets_closed) = ended.unwrap_or_else(|_| {
            // Too broken to complete its runs: at least no process and no socket is left behind.
            let runs = self
                .sessions
                .values()
                .filter_map(|s| s.run.as_ref()?.addr.clone());
            runs.for_each(|addr| addr.do_send(Kill));
            let sockets = self.sockets.len();
            for (_, socket) in self.sockets.drain() {
                socket.close.do_send(CloseSocket {
                    code: 1001,
                    reason: "run registry restarted",
                });
            }
            (0, sockets)
        });
        for state in self.sessions.values_mut() {
            // A withheld batch answer must not keep its run waiting.
            if let Some(pause) = state.paused.take() {
                let _ = pause.resume.send(());
            }
        }
        self.sessions.clear();
        self.permissions.clear();
        self.sockets.clear();
        self.cluster_reset();
        tracing::warn!(actor = "RunRegistry", event = "actor.restarted", reason = %reason, runs_failed, sockets_closed, "supervision: actor restarted");
    }
}

fn internal_error() -> ChatError {
    ChatError::new(
        ErrorCode::InternalError,
        "The gateway's run registry failed; try again",
    )
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "panic".into())
}

impl Handler<Connect> for RunRegistry {
    type Result = SocketId;

    fn handle(&mut self, msg: Connect, ctx: &mut Context<Self>) -> SocketId {
        let id = self.next_socket;
        self.next_socket += 1;
        if self.shutting_down {
            // Its upgrade raced the HTTP server's pause: it would never be closed.
            msg.close.do_send(CloseSocket {
                code: 1001,
                reason: "server shutting down",
            });
            return id;
        }
        let close = msg.close.clone();
        let registered = self.guarded(ctx, "Connect", false, |act, _| {
            let entry = SocketEntry {
                user_id: msg.user_id,
                deliver: msg.deliver,
                close: msg.close,
                bytes_in_flight: 0,
                batches_in_flight: 0,
                drained_at: None,
                sessions: BTreeSet::new(),
            };
            act.sockets.insert(id, entry);
            true
        });
        if !registered {
            // Never registered, so the restart cannot close it.
            close.do_send(CloseSocket {
                code: 1001,
                reason: "run registry restarted",
            });
        }
        id
    }
}

impl Handler<Disconnect> for RunRegistry {
    type Result = ();

    fn handle(&mut self, msg: Disconnect, ctx: &mut Context<Self>) {
        self.guarded(ctx, "Disconnect", (), |act, _| {
            act.forget_socket(msg.socket);
        })
    }
}

impl Handler<Drained> for RunRegistry {
    type Result = ();

    fn handle(&mut self, msg: Drained, ctx: &mut Context<Self>) {
        self.guarded(ctx, "Drained", (), |act, _| {
            let Some(entry) = act.sockets.get_mut(&msg.socket) else {
                return;
            };
            entry.bytes_in_flight = entry.bytes_in_flight.saturating_sub(msg.bytes);
            entry.batches_in_flight = entry.batches_in_flight.saturating_sub(msg.batches);
            if msg.bytes > 0 || msg.batches > 0 {
                entry.drained_at = Some(Instant::now());
            }
            let sessions: Vec<String> = entry.sessions.iter().cloned().collect();
            for session_id in sessions {
                act.pump(msg.socket, &session_id, true);
                act.maybe_resume(&session_id, Some(msg.socket));
            }
        })
    }
}

impl Handler<StartRun> for RunRegistry {
    type Result = ResponseActFuture<Self, Result<RunStarted, ChatError>>;

    fn handle(&mut self, msg: StartRun, ctx: &mut Context<Self>) -> Self::Result {
        self.guarded(
            ctx,
            "StartRun",
            Box::pin(fut::ready(Err(internal_error()))),
            |act, ctx| {
                if act.cluster.is_some() {
                    return act.start_run_clustered(msg, ctx);
                }
                act.start_when_ready(msg, None, ctx)
            },
        )
    }
}

impl RunRegistry {
    /// Starts the run once the previous run's process is gone and its first
    /// seqs are reserved.
    fn start_when_ready(
        &mut self,
        msg: StartRun,
        preset: Option<String>,
        ctx: &mut Context<Self>,
    ) -> ResponseActFuture<Self, Result<RunStarted, ChatError>> {
        let session_id = msg.session.id.clone();
        let previous = self.previous_run_exit(&session_id);
        // E9: the run's first seqs are persisted as reserved before it starts.
        if let Ok(kind) = msg.session.provider.parse::<ProviderKind>() {
            self.state_for(&msg.session, kind);
        }
        let reservation = self.reserve_seqs(&session_id, 0, ctx);
        if previous.is_none() && reservation.is_none() {
            return Box::pin(fut::ready(self.start_run(msg, preset, ctx)));
        }
        let sid = session_id.clone();
        let wait_previous = async move {
            if let Some(rx) = previous {
                if tokio::time::timeout(PREVIOUS_RUN_EXIT_WAIT, rx).await.is_err() {
                    tracing::warn!(session_id = %sid, "the previous run's process is still not gone; starting anyway");
                }
            }
        }
        .into_actor(self);
        let reserved: ResponseActFuture<Self, ()> = match reservation {
            Some(r) => r,
            None => Box::pin(fut::ready(())),
        };
        Box::pin(
            wait_previous
                .then(|_, _, _| reserved)
                .map(move |_, act, ctx| {
                    act.guarded(ctx, "StartRun", Err(internal_error()), |act, ctx| {
                        act.start_run(msg, preset, ctx)
                    })
                }),
        )
    }
}

/// Admin snapshot: every connected subscriber and every run in memory
/// (live, or completed and retained for late subscribers).
#[derive(Message)]
#[rtype(result = "RegistrySnapshot")]
pub struct AdminSnapshot;

#[derive(Debug, Clone, Default, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RegistrySnapshot {
    pub sockets: Vec<SocketInfo>,
    pub runs: Vec<RunInfo>,
}

#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SocketInfo {
    pub id: SocketId,
    pub user_id: i64,
    /// Delivered to the socket and not yet written by it (its queue).
    pub queued_bytes: usize,
    pub queued_deliveries: usize,
    /// Sessions it follows.
    pub sessions: usize,
}

#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RunInfo {
    pub session_id: String,
    pub run_id: String,
    pub user_id: i64,
    pub provider: String,
    /// `running`, `finishing` (its history is being written) or `completed`.
    pub state: &'static str,
    pub aborted: bool,
    pub first_seq: u64,
    pub last_seq: u64,
    pub subscribers: usize,
    /// Every subscriber is behind: the run is not read until one catches up.
    pub paused: bool,
    pub pauses: u32,
    pub age_secs: u64,
    pub pending_permissions: usize,
    pub buffered_events: usize,
    pub buffered_bytes: usize,
}

impl Handler<AdminSnapshot> for RunRegistry {
    type Result = MessageResult<AdminSnapshot>;

    fn handle(&mut self, _: AdminSnapshot, _: &mut Context<Self>) -> Self::Result {
        let mut sockets: Vec<SocketInfo> = self
            .sockets
            .iter()
            .map(|(id, e)| SocketInfo {
                id: *id,
                user_id: e.user_id,
                queued_bytes: e.bytes_in_flight,
                queued_deliveries: e.batches_in_flight,
                sessions: e.sessions.len(),
            })
            .collect();
        sockets.sort_by_key(|s| s.id);
        let mut runs: Vec<RunInfo> = self
            .sessions
            .iter()
            .filter_map(|(id, s)| {
                let run = s.run.as_ref()?;
                Some(RunInfo {
                    session_id: id.clone(),
                    run_id: run.id.clone(),
                    user_id: s.owner,
                    provider: s.provider.as_str().to_string(),
                    state: match run.status {
                        Status::Running => "running",
                        Status::Finishing => "finishing",
                        Status::Completed => "completed",
                    },
                    aborted: run.aborted,
                    first_seq: run.first_seq,
                    last_seq: run.last_seq,
                    subscribers: s.subscribers.len(),
                    paused: s.paused.is_some(),
                    pauses: run.pauses,
                    age_secs: run.started.elapsed().as_secs(),
                    pending_permissions: run.pending.len(),
                    buffered_events: s.buffer.len(),
                    buffered_bytes: s.buffer.bytes(),
                })
            })
            .collect();
        runs.sort_by(|a, b| b.age_secs.cmp(&a.age_secs).then(a.run_id.cmp(&b.run_id)));
        MessageResult(RegistrySnapshot { sockets, runs })
    }
}

/// Admin action: close a subscriber's socket (4000, "disconnected by an
/// admin"); false when there is no such socket.
#[derive(Message)]
#[rtype(result = "bool")]
pub struct AdminDisconnect {
    pub socket: SocketId,
}

impl Handler<AdminDisconnect> for RunRegistry {
    type Result = bool;

    fn handle(&mut self, msg: AdminDisconnect, _: &mut Context<Self>) -> bool {
        let Some(entry) = self.sockets.get(&msg.socket) else {
            return false;
        };
        tracing::warn!(
            actor = "ChatSocket",
            socket = msg.socket,
            reason = "disconnected by an admin",
            "closing socket with 4000"
        );
        entry.close.do_send(CloseSocket {
            code: 4000,
            reason: "disconnected by an admin",
        });
        self.forget_socket(msg.socket);
        true
    }
}

impl Handler<AbortRun> for RunRegistry {
    type Result = ResponseActFuture<Self, Result<(), ChatError>>;

    fn handle(&mut self, msg: AbortRun, ctx: &mut Context<Self>) -> Self::Result {
        let fallback: Self::Result = Box::pin(fut::ready(Err(internal_error())));
        self.guarded(ctx, "AbortRun", fallback, |act, ctx| {
            if let Some(routed) = act.route_abort(&msg) {
                return routed;
            }
            Box::pin(fut::ready(act.abort_run(msg, ctx)))
        })
    }
}

impl RunRegistry {
    fn abort_run(&mut self, msg: AbortRun, ctx: &mut Context<Self>) -> Result<(), ChatError> {
        let no_run = || ChatError::new(ErrorCode::NoActiveRun, "No active run for this session");
        let state = self.sessions.get(&msg.session_id).ok_or_else(no_run)?;
        // An admin (ADMIN_USER) may abort anyone's run.
        if state.owner != msg.user_id && msg.user_id != ADMIN_USER {
            return Err(ChatError::new(
                ErrorCode::SessionNotFound,
                "Session not found",
            ));
        }
        let run = state
            .run
            .as_ref()
            .filter(|r| r.is_live())
            .ok_or_else(no_run)?;
        // exitCode 0 when the interrupt reached the run, as the reference.
        let delivered = run.addr.as_ref().is_some_and(|a| {
            a.do_send(Abort);
            a.connected()
        });
        run_span(&msg.session_id, &run.id).in_scope(
            || tracing::info!(session_id = %msg.session_id, run_id = %run.id, "abort requested"),
        );
        self.complete(&msg.session_id, if delivered { 0 } else { 1 }, true, ctx);
        Ok(())
    }
}

/// Test-only: the handler panics, as a registry bug would (the wire
/// cannot send it: it exists only in the actors crate's unit tests).
#[cfg(test)]
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct PanicForTest;

#[cfg(test)]
impl Handler<PanicForTest> for RunRegistry {
    type Result = ();

    fn handle(&mut self, _: PanicForTest, ctx: &mut Context<Self>) {
        self.guarded(ctx, "PanicForTest", (), |_, _| {
            panic!("registry bug (test)")
        });
    }
}

/// Test-only view of the delivery state: per socket (bytes, batches in
/// flight), per session (last seq, buffer front, cursors).
#[cfg(test)]
#[derive(Message)]
#[rtype(result = "String")]
pub(crate) struct Inspect;

#[cfg(test)]
impl Handler<Inspect> for RunRegistry {
    type Result = String;

    fn handle(&mut self, _: Inspect, _: &mut Context<Self>) -> String {
        let mut out = String::new();
        for (id, e) in &self.sockets {
            out += &format!(
                "socket {id}: {} B / {} in flight, sessions {:?}\n",
                e.bytes_in_flight, e.batches_in_flight, e.sessions
            );
        }
        for (id, st) in &self.sessions {
            out += &format!(
                "session {id}: last {} front {:?} cursors {:?} run {:?} paused {} holding {:?}\n",
                st.last_seq,
                st.buffer.front_seq(),
                st.subscribers,
                st.run
                    .as_ref()
                    .map(|r| (&r.id, r.status, r.first_seq, r.last_seq)),
                st.paused.is_some(),
                st.holding
            );
        }
        out
    }
}

impl Handler<Subscribe> for RunRegistry {
    type Result = ResponseActFuture<Self, ()>;

    fn handle(&mut self, msg: Subscribe, ctx: &mut Context<Self>) -> Self::Result {
        self.guarded(ctx, "Subscribe", Box::pin(fut::ready(())), |act, ctx| {
            if act.cluster.is_some() {
                return act.subscribe_clustered(msg, ctx);
            }
            act.subscribe(msg);
            Box::pin(fut::ready(()))
        })
    }
}

impl Handler<RespondPermission> for RunRegistry {
    type Result = ();

    fn handle(&mut self, msg: RespondPermission, ctx: &mut Context<Self>) {
        self.guarded(ctx, "RespondPermission", (), |act, ctx| {
            let Some(session_id) = act.permissions.get(&msg.request_id).cloned() else {
                return;
            };
            if act.sessions.get(&session_id).map(|s| s.owner) != Some(msg.user_id) {
                return;
            }
            if act.route_permission(&session_id, &msg, ctx) {
                return;
            }
            let request_id = msg.request_id.clone();
            let Some((p, addr)) =
                act.take_pending(&session_id, |p| p.request_id == request_id, ctx)
            else {
                return;
            };
            metrics().permissions_answered.inc();
            if let Some(addr) = addr {
                addr.do_send(AnswerPermission {
                    provider_request_id: p.provider_request_id,
                    decision: msg.decision,
                    original_input: p.input,
                });
            }
            // The first answer wins: every other follower (a second /ws client, a
            // remote-session client) sees the prompt withdrawn.
            act.emit(
                &session_id,
                EventBody::PermissionCancelled {
                    request_id,
                    reason: "answered".into(),
                },
            );
        })
    }
}

impl Handler<ListRunning> for RunRegistry {
    type Result = ResponseActFuture<Self, Vec<RunningSession>>;

    fn handle(&mut self, msg: ListRunning, ctx: &mut Context<Self>) -> Self::Result {
        let fallback: Self::Result = Box::pin(fut::ready(Vec::new()));
        self.guarded(ctx, "ListRunning", fallback, |act, _| {
            if act.cluster.is_some() {
                return act.list_running_clustered(msg.user_id);
            }
            Box::pin(fut::ready(act.list_running(msg.user_id)))
        })
    }
}

impl RunRegistry {
    /// The user's live runs that this node runs.
    fn list_running(&self, user_id: i64) -> Vec<RunningSession> {
        let node = self.cluster.as_ref().map(|c| c.node.to_string());
        let mut list: Vec<RunningSession> = self
            .sessions
            .iter()
            .filter(|(_, s)| s.owner == user_id)
            .filter_map(|(id, s)| {
                let run = s
                    .run
                    .as_ref()
                    .filter(|r| r.is_live() && r.remote.is_none())?;
                Some(RunningSession {
                    session_id: id.clone(),
                    provider: s.provider.as_str().to_string(),
                    started_at: run.started_at.clone(),
                    last_seq: s.last_seq,
                    run_id: run.id.clone(),
                    node: node.clone(),
                })
            })
            .collect();
        list.sort_by(|a, b| a.started_at.cmp(&b.started_at));
        list
    }
}

impl Handler<RunEvents> for RunRegistry {
    type Result = ResponseActFuture<Self, ()>;

    fn handle(&mut self, msg: RunEvents, ctx: &mut Context<Self>) -> Self::Result {
        self.guarded(ctx, "RunEvents", Box::pin(fut::ready(())), |act, ctx| {
            let seqs = msg.events.iter().map(ProviderEvent::seqs).sum::<usize>();
            match act.reserve_seqs(&msg.session_id, seqs as u64, ctx) {
                None => act.run_events(msg, ctx),
                // The next block of seqs is persisted before any of it is used.
                Some(reserved) => Box::pin(reserved.then(move |_, act, ctx| {
                    let fallback: Self::Result = Box::pin(fut::ready(()));
                    act.guarded(ctx, "RunEvents", fallback, |act, ctx| {
                        act.run_events(msg, ctx)
                    })
                })),
            }
        })
    }
}

impl Handler<RunExited> for RunRegistry {
    type Result = ();

    fn handle(&mut self, msg: RunExited, ctx: &mut Context<Self>) {
        self.guarded(ctx, "RunExited", (), |act, ctx| {
            let Some(run) = act
                .sessions
                .get_mut(&msg.session_id)
                .and_then(|s| s.run.as_mut())
                .filter(|r| r.id == msg.run_id)
            else {
                return;
            };
            run.addr = None;
            // A send waiting for this process to be gone may start now.
            for waiter in run.exit_waiters.drain(..) {
                let _ = waiter.send(());
            }
            if run.status != Status::Running {
                return;
            }
            // The CLI died mid-turn: an id it announced in this run may name a
            // conversation it never saved, and resuming it would fail forever.
            let at_start = run.provider_id_at_start.clone();
            let changed = act
                .sessions
                .get(&msg.session_id)
                .is_some_and(|s| s.provider_session_id != at_start);
            if changed {
                tracing::info!(session_id = %msg.session_id, "forgetting the native id announced by a run that died mid-turn");
                act.set_provider_id(&msg.session_id, at_start);
            }
            let error = msg.error.unwrap_or_else(|| match msg.exit_code {
                Some(code) => format!("The provider exited with code {code} before finishing the turn"),
                None => "The provider was killed before finishing the turn".to_string(),
            });
            run_span(&msg.session_id, &msg.run_id).in_scope(|| {
                tracing::warn!(actor = "ProviderRun", session_id = %msg.session_id, run_id = %msg.run_id, exit_code = ?msg.exit_code, reason = %error, "run ended without a result")
            });
            act.emit(&msg.session_id, EventBody::error(error));
            let code = msg.exit_code.filter(|c| *c != 0).unwrap_or(1);
            act.finish(&msg.session_id, code, ctx);
        })
    }
}

impl Handler<Shutdown> for RunRegistry {
    type Result = ResponseFuture<()>;

    fn handle(&mut self, _: Shutdown, ctx: &mut Context<Self>) -> Self::Result {
        let fallback: Self::Result = Box::pin(async {});
        self.guarded(ctx, "Shutdown", fallback, |act, ctx| act.shut_down(ctx))
    }
}

impl RunRegistry {
    fn shut_down(&mut self, ctx: &mut Context<Self>) -> ResponseFuture<()> {
        self.shutting_down = true;
        self.end_all_runs(
            "The gateway is shutting down",
            true,
            "server shutting down",
            ctx,
        );
        // Every counter now (not in the background), and the reservations
        // released: nothing runs any more, so a clean restart continues at
        // the next seq.
        let seqs: Vec<(String, u64, u64)> = self
            .sessions
            .iter()
            .map(|(id, s)| (id.clone(), s.last_seq, s.reserved_seq))
            .collect();
        let store = self.store.clone();
        tracing::info!(
            actor = "RunRegistry",
            reason = "shutdown",
            "runs completed and sockets closed"
        );
        // Every session's history is written before the gateway exits.
        let ids: Vec<String> = self.sessions.keys().cloned().collect();
        let mut written = Vec::with_capacity(ids.len());
        for id in ids {
            let (done, rx) = oneshot::channel();
            self.flush_history(&id, Some(done));
            written.push(rx);
        }
        Box::pin(async move {
            let all = futures_util::future::join_all(written);
            if tokio::time::timeout(HISTORY_WRITE_TIMEOUT, all)
                .await
                .is_err()
            {
                tracing::error!("history writes did not finish before shutdown");
            }
            let result = store::blocking(&store, move |s| {
                seqs.iter()
                    .try_for_each(|(id, seq, reserved)| s.release_seq(id, *seq, *reserved))
            })
            .await;
            if let Err(err) = result {
                tracing::error!(%err, "failed to persist seq counters at shutdown");
            }
        })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use serde_json::json;

    use crate::provider::{CommandSpec, LineParser};
    use crate::store::{SessionStore, StoreError};
    use std::sync::Mutex;

    /// The database seam in memory (the registry's only dependency besides
    /// its children): last seqs by session id, reservations by `<id>:reserved`,
    /// each block above every earlier one and above `after`, as the
    /// database makes them. With a [`Gate`], the first reservation waits.
    #[derive(Default)]
    pub(crate) struct MemStore(pub(crate) Mutex<HashMap<String, u64>>, Option<Gate>);

    /// Holds the first reservation until the test lets it go, and says
    /// when it has arrived.
    struct Gate {
        entered: tokio::sync::mpsc::UnboundedSender<()>,
        release: Mutex<Option<std::sync::mpsc::Receiver<()>>>,
    }

    impl SessionStore for MemStore {
        fn session(&self, _: &str) -> Result<Option<SessionRow>, StoreError> {
            Ok(None)
        }
        fn set_provider_session_id(&self, _: &str, _: Option<&str>) -> Result<(), StoreError> {
            Ok(())
        }
        fn set_last_seq(&self, id: &str, seq: u64) -> Result<(), StoreError> {
            if let Ok(mut m) = self.0.lock() {
                m.insert(id.to_string(), seq);
            }
            Ok(())
        }
        fn reserve_seq(&self, id: &str, after: u64, count: u64) -> Result<u64, StoreError> {
            if let Some(gate) = &self.1 {
                let _ = gate.entered.send(());
                let first = gate.release.lock().ok().and_then(|mut r| r.take());
                if let Some(release) = first {
                    let _ = release.recv();
                }
            }
            let key = format!("{id}:reserved");
            let Ok(mut m) = self.0.lock() else {
                return Ok(after + count);
            };
            let end = m.get(&key).copied().unwrap_or(0).max(after) + count;
            m.insert(key, end);
            Ok(end)
        }
        fn release_seq(&self, id: &str, seq: u64, _: u64) -> Result<(), StoreError> {
            self.set_last_seq(id, seq)
        }
        fn append_history(
            &self,
            _: &str,
            _: &[crate::store::HistoryEntry],
            _: usize,
        ) -> Result<(), StoreError> {
            Ok(())
        }
    }

    /// A provider whose parser has a bug: it panics on the line `PANIC`.
    struct Buggy;

    struct BuggyParser;

    impl LineParser for BuggyParser {
        fn parse_line(&mut self, line: &str, out: &mut Vec<ProviderEvent>) {
            assert!(line != "PANIC", "parser bug");
            out.push(ProviderEvent::Emit(
                EventBody::text(crate::protocol::Role::Assistant, line).into(),
            ));
            if line == "done" {
                out.push(ProviderEvent::TurnComplete { exit_code: 0 });
            }
        }
    }

    impl Provider for Buggy {
        fn kind(&self) -> ProviderKind {
            ProviderKind::Claude
        }
        fn command(&self, turn: &Turn) -> CommandSpec {
            let mut spec = CommandSpec::new(std::path::Path::new("/bin/sh"));
            spec.arg("-c").arg(turn.content.clone());
            spec
        }
        fn parser(&self, _: &Turn) -> Box<dyn LineParser> {
            Box::new(BuggyParser)
        }
    }

    fn buggy(_: ProviderKind) -> Option<&'static dyn Provider> {
        Some(&Buggy)
    }

    /// Stands in for a chat socket: forwards frames to the test.
    struct Sink(tokio::sync::mpsc::UnboundedSender<Value>);

    impl Actor for Sink {
        type Context = Context<Self>;
        fn started(&mut self, ctx: &mut Context<Self>) {
            // As a chat socket's: a replay sends a whole budget at once.
            ctx.set_mailbox_capacity(crate::chat::chat_socket::MAILBOX_CAPACITY);
        }
    }

    impl Handler<Deliver> for Sink {
        type Result = ();
        fn handle(&mut self, msg: Deliver, _: &mut Context<Self>) {
            for f in msg.0.iter() {
                let _ = self.0.send(serde_json::from_str(f).unwrap_or(Value::Null));
            }
        }
    }

    /// A close request reaches the test as `{"kind": "close", "code": N}`.
    impl Handler<CloseSocket> for Sink {
        type Result = ();
        fn handle(&mut self, msg: CloseSocket, _: &mut Context<Self>) {
            let _ = self.0.send(json!({"kind": "close", "code": msg.code}));
        }
    }

    async fn until_complete(rx: &mut tokio::sync::mpsc::UnboundedReceiver<Value>) -> Vec<Value> {
        let mut out = Vec::new();
        loop {
            let v = tokio::time::timeout(Duration::from_secs(20), rx.recv())
                .await
                .expect("complete within 20 s")
                .expect("sink open");
            let done = v["kind"] == "complete";
            out.push(v);
            if done {
                return out;
            }
        }
    }

    type Frames = tokio::sync::mpsc::UnboundedReceiver<Value>;

    /// A registry with the [`Buggy`] provider and one connected [`Sink`].
    async fn registry_and_sink() -> (Addr<RunRegistry>, SocketId, Frames) {
        let config = Arc::new(GatewayConfig::for_tests(std::env::temp_dir()));
        let store: Store = Arc::new(MemStore::default());
        let registry = RunRegistry::with_providers(config, store, buggy).start();
        let (socket, rx) = connect_sink(&registry).await;
        (registry, socket, rx)
    }

    /// A registry whose runs get no process: the test reports their events.
    async fn registry_without_processes() -> (Addr<RunRegistry>, SocketId, Frames) {
        let config = Arc::new(GatewayConfig::for_tests(std::env::temp_dir()));
        let store: Store = Arc::new(MemStore::default());
        let registry = RunRegistry::with_providers(config, store, buggy)
            .without_processes()
            .start();
        let (socket, rx) = connect_sink(&registry).await;
        (registry, socket, rx)
    }

    async fn connect_sink(registry: &Addr<RunRegistry>) -> (SocketId, Frames) {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let sink = Sink(tx).start();
        let socket = registry
            .send(Connect {
                user_id: 1,
                deliver: sink.clone().recipient(),
                close: sink.recipient(),
            })
            .await
            .unwrap();
        (socket, rx)
    }

    /// The next frame of a kind, skipping others (bounded: a missing frame fails).
    async fn next_of_kind(rx: &mut Frames, kind: &str) -> Value {
        loop {
            let v = tokio::time::timeout(Duration::from_secs(20), rx.recv())
                .await
                .unwrap_or_else(|_| panic!("no {kind} within 20 s"))
                .expect("sink open");
            if v["kind"] == kind {
                return v;
            }
        }
    }

    fn row() -> SessionRow {
        session_row("s1")
    }

    /// A fresh session of user 1 (provider claude, project the temp dir).
    pub(crate) fn session_row(id: &str) -> SessionRow {
        SessionRow {
            id: id.into(),
            user_id: 1,
            provider: "claude".into(),
            provider_session_id: None,
            project_path: std::env::temp_dir().display().to_string(),
            custom_name: None,
            archived: false,
            last_seq: 0,
            seq_reserved: 0,
            created_at: String::new(),
            updated_at: String::new(),
            project: None,
            summary: String::new(),
            message_count: 0,
        }
    }

    fn start_run(socket: SocketId, content: &str) -> StartRun {
        StartRun {
            socket: Some(socket),
            user_id: 1,
            session: row(),
            content: content.into(),
            options: json!({}),
            client_request_id: None,
            cwd: std::env::temp_dir(),
        }
    }

    /// A panic inside one run (a parser bug) ends that run with an error and a
    /// failed complete, kills its process, and leaves the registry serving.
    #[actix_rt::test]
    async fn a_panicking_run_never_takes_down_the_registry() {
        let (registry, socket, mut rx) = registry_and_sink().await;
        let start = |content: &str| start_run(socket, content);
        let pidfile = std::env::temp_dir().join(format!("ag-panic-{}", std::process::id()));
        let script = format!("echo $$ > {}; echo PANIC; sleep 30", pidfile.display());
        registry.send(start(&script)).await.unwrap().unwrap();
        let events = until_complete(&mut rx).await;
        let kinds: Vec<&str> = events
            .iter()
            .map(|e| e["kind"].as_str().unwrap_or(""))
            .collect();
        assert_eq!(kinds, ["error", "complete"]);
        assert!(events[0]["content"].as_str().unwrap().contains("crashed"));
        assert_eq!(events[1]["success"], false);
        // The process the run started is gone.
        let pid: i32 = std::fs::read_to_string(&pidfile)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while crate::kill::exists(pid)
            && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .unwrap_or_default()
                .contains(") Z")
        {
            assert!(
                std::time::Instant::now() < deadline,
                "process {pid} survived its run's crash"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let _ = std::fs::remove_file(&pidfile);
        // The registry still serves: the next run of the session works.
        registry
            .send(start("echo again; echo done"))
            .await
            .unwrap()
            .unwrap();
        let events = until_complete(&mut rx).await;
        assert_eq!(events.last().unwrap()["success"], true);
        assert_eq!(events[0]["seq"], 3);
    }

    /// Starts a run whose process only sleeps (its events come from the
    /// test, as a ProviderRun would report them); returns the run id.
    async fn start_sleeping(registry: &Addr<RunRegistry>, socket: SocketId) -> String {
        let start = start_run(socket, "sleep 30");
        registry.send(start).await.unwrap().unwrap();
        let running = registry.send(ListRunning { user_id: 1 }).await.unwrap();
        running[0].run_id.clone()
    }

    /// Ends the test's run (its `sleep` gets SIGTERM at once).
    async fn abort(registry: &Addr<RunRegistry>) {
        let abort = AbortRun {
            user_id: 1,
            session_id: "s1".into(),
        };
        registry.send(abort).await.unwrap().unwrap();
    }

    /// `lastSeq` is any u64 a client sends: the largest one overflowed
    /// `lastSeq + 1` (a panic that killed the registry in debug builds).
    #[actix_rt::test]
    async fn the_largest_last_seq_is_answered_not_a_crash() {
        let (registry, socket, mut rx) = registry_and_sink().await;
        let run_id = start_sleeping(&registry, socket).await;
        // One event in the replay buffer, as a ProviderRun would report it.
        let text = EventBody::text(crate::protocol::Role::Assistant, "hi");
        registry
            .send(RunEvents {
                session_id: "s1".into(),
                run_id,
                events: vec![ProviderEvent::Emit(text.into())],
                read_at: None,
            })
            .await
            .unwrap();
        assert_eq!(rx.recv().await.unwrap()["kind"], "text");
        let subscribe = Subscribe {
            socket,
            session: row(),
            last_seq: Some(u64::MAX),
            follow: false,
        };
        registry.send(subscribe).await.unwrap();
        let ack = rx.recv().await.unwrap();
        assert_eq!(ack["kind"], "chat_subscribed");
        assert_eq!(ack["replayTruncated"], false);
        // Still serving.
        let running = registry.send(ListRunning { user_id: 1 }).await.unwrap();
        assert_eq!(running.len(), 1);
        abort(&registry).await;
    }

    /// Two subscribes in a row, then what the sink got: the second is
    /// handled after anything the registry had due when the first was
    /// answered (timers included).
    async fn settle(
        registry: &Addr<RunRegistry>,
        socket: SocketId,
        rx: &mut tokio::sync::mpsc::UnboundedReceiver<Value>,
    ) -> Vec<Value> {
        for _ in 0..2 {
            let subscribe = Subscribe {
                socket,
                session: row(),
                last_seq: Some(u64::MAX),
                follow: false,
            };
            registry.send(subscribe).await.unwrap();
        }
        std::iter::from_fn(|| rx.try_recv().ok()).collect()
    }

    /// On paused time: a pending permission is still pending one
    /// millisecond before `permission_timeout`, and cancelled with reason
    /// `timeout` (and denied to the CLI) when it is reached. The subscribes
    /// ask for replay after `lastSeq` u64::MAX, the largest a client can send.
    #[actix_rt::test]
    async fn a_pending_permission_times_out_exactly_at_the_timeout() {
        let timeout = GatewayConfig::for_tests(std::env::temp_dir()).permission_timeout;
        let (registry, socket, mut rx) = registry_and_sink().await;
        let run_id = start_sleeping(&registry, socket).await;
        tokio::time::pause();
        // The CLI asks, as a ProviderRun would report it.
        registry
            .send(RunEvents {
                session_id: "s1".into(),
                run_id,
                events: vec![ProviderEvent::PermissionRequested {
                    provider_request_id: "p1".into(),
                    tool_name: "Bash".into(),
                    input: json!({"command": "ls"}),
                    context: None,
                }],
                read_at: None,
            })
            .await
            .unwrap();
        let request = rx.recv().await.unwrap();
        assert_eq!(request["kind"], "permission_request");
        let kinds = |frames: &[Value]| {
            frames
                .iter()
                .map(|v| v["kind"].as_str().unwrap_or_default().to_string())
                .collect::<Vec<_>>()
        };

        tokio::time::advance(timeout - Duration::from_millis(1)).await;
        let frames = settle(&registry, socket, &mut rx).await;
        assert_eq!(kinds(&frames), ["chat_subscribed", "chat_subscribed"]);
        assert_eq!(
            frames[1]["pendingPermissions"][0]["requestId"],
            request["requestId"]
        );

        // Timers fire on the runtime's 1 ms ticks: "at" is within one tick.
        tokio::time::advance(Duration::from_millis(2)).await;
        let frames = settle(&registry, socket, &mut rx).await;
        let cancelled = frames
            .iter()
            .find(|v| v["kind"] == "permission_cancelled")
            .unwrap_or_else(|| panic!("not cancelled at the timeout: {frames:?}"));
        assert_eq!(cancelled["requestId"], request["requestId"]);
        assert_eq!(cancelled["reason"], "timeout");
        assert_eq!(frames.last().unwrap()["pendingPermissions"], json!([]));
        abort(&registry).await;
    }

    /// A `chat.send` with a `clientRequestId` from `socket`.
    fn send_with_id(socket: SocketId, client_request_id: &str) -> StartRun {
        StartRun {
            client_request_id: Some(client_request_id.into()),
            ..start_run(socket, "hello")
        }
    }

    /// The end of a run's turn, as its ProviderRun would report it.
    fn turn_end(run_id: &str) -> RunEvents {
        RunEvents {
            session_id: "s1".into(),
            run_id: run_id.into(),
            events: vec![ProviderEvent::TurnComplete { exit_code: 0 }],
            read_at: None,
        }
    }

    /// `n` text events of `size` bytes each for the run, as its ProviderRun batches them.
    fn texts(run_id: &str, n: usize, size: usize) -> RunEvents {
        let text = || EventBody::text(crate::protocol::Role::Assistant, "x".repeat(size));
        RunEvents {
            session_id: "s1".into(),
            run_id: run_id.into(),
            events: (0..n).map(|_| ProviderEvent::Emit(text().into())).collect(),
            read_at: None,
        }
    }

    /// The sink wrote everything it was delivered (its whole budget comes back).
    fn drained_all(socket: SocketId) -> Drained {
        Drained {
            socket,
            bytes: usize::MAX,
            batches: usize::MAX,
        }
    }

    /// Frames the sink holds now, without waiting (after a barrier on the registry).
    async fn held(registry: &Addr<RunRegistry>, rx: &mut Frames) -> Vec<Value> {
        registry.send(Inspect).await.unwrap();
        tokio::task::yield_now().await;
        let mut out = Vec::new();
        while let Ok(v) = rx.try_recv() {
            out.push(v);
        }
        out
    }

    /// E4 with the far-behind rule: a subscriber whose client wrote nothing
    /// while another keeps the run going is not closed while the buffer
    /// still holds what it lacks with room to spare (8,000 events behind:
    /// more than half the buffer, the old mark), is closed with 4008 once
    /// it would otherwise lose events within the margin, and the client
    /// resubscribing with its `lastSeq` (0) while the run goes on gets every
    /// event: it arrives inside the margin, so it is given time to catch up.
    #[actix_rt::test]
    async fn far_behind_is_closed_before_its_events_leave_and_catches_up() {
        let ((registry, run, fast, mut fast_rx, _, mut slow_rx), ack) =
            run_and_subscriber_acked().await;
        assert_eq!(ack["isProcessing"], true);
        // 1 KB events: the slow socket's budget (1 MiB) holds about 1,000 of
        // them, so its cursor is far ahead of what its client was written.
        // Batches of 50 (55 KB): the fast sink takes each whole, so the run
        // never waits for it (a batch answer is withheld while it would).
        let mut sent = 0;
        let mut closed_at = None;
        while sent < 9_000 && closed_at.is_none() {
            feed(&registry, &run.run_id, fast, 100).await;
            sent += 100;
            let frames = held(&registry, &mut slow_rx).await;
            if frames
                .iter()
                .any(|v| v["kind"] == "close" && v["code"] == 4008)
            {
                closed_at = Some(sent);
            }
        }
        let closed_at = closed_at.expect("never closed as far behind");
        let margin = REPLAY_MAX_EVENTS - FAR_BEHIND_MARGIN_EVENTS;
        assert!(
            closed_at > 8_000 && closed_at <= margin + 100,
            "closed after {closed_at} events (margin at {margin})"
        );
        // The run goes on while the client reconnects, up to the margin.
        feed(&registry, &run.run_id, fast, 1_000).await;
        let last = held(&registry, &mut fast_rx).await;
        let last = last.iter().filter_map(|v| v["seq"].as_u64()).max().unwrap();

        let (again, mut again_rx, ack) = new_subscriber(&registry, 0).await;
        assert_eq!(ack["replayTruncated"], false, "{ack}");
        // Still catching up (inside the margin) while the run moves on: not closed.
        feed(&registry, &run.run_id, fast, 50).await;
        registry.send(turn_end(&run.run_id)).await.unwrap();
        let mut seqs = Vec::new();
        loop {
            let mut frames = held(&registry, &mut again_rx).await;
            if frames.is_empty() {
                // `complete` waits for the history write.
                let next = tokio::time::timeout(Duration::from_secs(20), again_rx.recv());
                let next = next.await.expect("the replay stalled").expect("sink open");
                frames.push(next);
            }
            assert!(
                !frames.iter().any(|v| v["kind"] == "close"),
                "closed again while catching up"
            );
            seqs.extend(frames.iter().filter_map(|v| v["seq"].as_u64()));
            if frames.iter().any(|v| v["kind"] == "complete") {
                break;
            }
            registry.send(drained_all(again)).await.unwrap();
        }
        assert!(seqs.len() as u64 > last + 50);
        assert_eq!(seqs, (1..=*seqs.last().unwrap()).collect::<Vec<_>>());
    }

    /// A registry, a run of `fast` (its frames) and a second socket (its frames).
    type RunAndSubscriber = (
        Addr<RunRegistry>,
        RunStarted,
        SocketId,
        Frames,
        SocketId,
        Frames,
    );

    /// A registry with a run of `fast` and a second socket subscribed to it
    /// from seq 0, and that subscription's ack.
    async fn run_and_subscriber_acked() -> (RunAndSubscriber, Value) {
        let (registry, fast, fast_rx) = registry_without_processes().await;
        let run = registry
            .send(start_run(fast, "hello"))
            .await
            .unwrap()
            .unwrap();
        let (slow, slow_rx, ack) = new_subscriber(&registry, 0).await;
        ((registry, run, fast, fast_rx, slow, slow_rx), ack)
    }

    /// The same on a paused clock (its ack read).
    async fn run_and_subscriber() -> RunAndSubscriber {
        tokio::time::pause();
        run_and_subscriber_acked().await.0
    }

    /// A run of `fast` (which drains everything it gets) fed 1 KB events
    /// until a subscriber from seq 0 that reads nothing (so never holds it)
    /// is closed with 4008 as far behind; returns the last seq that
    /// subscriber was sent (what its client has at most) and `fast`'s frames.
    async fn closed_far_behind() -> (Addr<RunRegistry>, RunStarted, SocketId, Frames, u64) {
        let (registry, run, fast, fast_rx, _, mut slow_rx) = run_and_subscriber().await;
        let mut frames = Vec::new();
        for _ in 0..200 {
            feed(&registry, &run.run_id, fast, 100).await;
            frames.extend(held(&registry, &mut slow_rx).await);
            if frames
                .iter()
                .any(|v| v["kind"] == "close" && v["code"] == 4008)
            {
                let last = frames.iter().filter_map(|v| v["seq"].as_u64()).max();
                return (registry, run, fast, fast_rx, last.unwrap());
            }
        }
        panic!("never closed as far behind");
    }

    /// `n` 1 KB events in batches of 50, each drained by `fast` at once.
    async fn feed(registry: &Addr<RunRegistry>, run_id: &str, fast: SocketId, n: usize) {
        for _ in 0..n / 50 {
            registry.send(texts(run_id, 50, 1_000)).await.unwrap();
            registry.send(drained_all(fast)).await.unwrap();
        }
    }

    /// A new subscriber from `last_seq`: its ack.
    async fn new_subscriber(
        registry: &Addr<RunRegistry>,
        last_seq: u64,
    ) -> (SocketId, Frames, Value) {
        let (again, mut again_rx) = connect_sink(registry).await;
        registry
            .send(Subscribe {
                socket: again,
                session: row(),
                last_seq: Some(last_seq),
                follow: false,
            })
            .await
            .unwrap();
        let ack = next_of_kind(&mut again_rx, "chat_subscribed").await;
        (again, again_rx, ack)
    }

    /// A subscriber closed with 4008 keeps its place: its resubscription,
    /// once the run has gone on 4,000 events (its events would have left
    /// the buffer's 10,000 by then), is replayed from its `lastSeq` to the
    /// run's end, nothing cut and nothing twice.
    #[actix_rt::test]
    async fn a_closed_subscribers_place_is_kept_for_its_resubscription() {
        let (registry, run, fast, _fast_rx, last) = closed_far_behind().await;
        feed(&registry, &run.run_id, fast, 4_000).await;
        let (again, mut again_rx, ack) = new_subscriber(&registry, last).await;
        assert_eq!(ack["replayTruncated"], false, "{ack}");
        feed(&registry, &run.run_id, fast, 500).await;
        registry.send(turn_end(&run.run_id)).await.unwrap();
        let mut seqs = Vec::new();
        read_to_complete(&registry, again, &mut again_rx, &mut seqs).await;
        assert_eq!(seqs, (last + 1..=*seqs.last().unwrap()).collect::<Vec<_>>());
        assert!(seqs.len() > 4_500, "{} events", seqs.len());
    }

    /// Adds the seqs of a resubscriber's `frames` to `seqs`, asserting that
    /// none is a close; true once the run's `complete` is among them.
    fn caught_up(frames: &[Value], seqs: &mut Vec<u64>) -> bool {
        assert!(
            !frames.iter().any(|v| v["kind"] == "close"),
            "closed while catching up: {:?}",
            frames.iter().find(|v| v["kind"] == "close")
        );
        seqs.extend(frames.iter().filter_map(|v| v["seq"].as_u64()));
        frames.iter().any(|v| v["kind"] == "complete")
    }

    /// Reads the resubscriber `again` (writing everything it gets) to the
    /// run's `complete`, through [`caught_up`].
    async fn read_to_complete(
        registry: &Addr<RunRegistry>,
        again: SocketId,
        again_rx: &mut Frames,
        seqs: &mut Vec<u64>,
    ) {
        loop {
            let mut frames = held(registry, again_rx).await;
            if frames.is_empty() {
                // `complete` waits for the history write.
                frames.push(next_of_kind(again_rx, "complete").await);
            }
            if caught_up(&frames, seqs) {
                break;
            }
            registry.send(drained_all(again)).await.unwrap();
        }
    }

    /// A kept place is bounded: once [`REJOIN_GRACE`] has passed without a
    /// resubscription its events leave with the buffer's usual bounds, and
    /// a late resubscriber is told so (`replayTruncated`).
    #[actix_rt::test]
    async fn a_kept_place_ends_with_its_grace() {
        let (registry, run, fast, _fast_rx, last) = closed_far_behind().await;
        tokio::time::advance(REJOIN_GRACE).await;
        feed(&registry, &run.run_id, fast, 4_000).await;
        let (_, _rx, ack) = new_subscriber(&registry, last).await;
        assert_eq!(ack["replayTruncated"], true, "{ack}");
    }

    /// A resubscriber that takes longer than [`REJOIN_GRACE`] to catch up
    /// keeps its place while its client is written more: the run goes on
    /// (a batch a second, each spawned: its answer may wait for a hold), its
    /// client writes a little more than that each second, and after twice
    /// the grace it is still beyond the buffer's bounds, not closed, and
    /// gets every event to the end.
    #[actix_rt::test]
    async fn a_resubscriber_that_keeps_reading_keeps_its_place_past_the_grace() {
        let (registry, run, fast, mut fast_rx, last) = closed_far_behind().await;
        feed(&registry, &run.run_id, fast, 4_000).await;
        let (again, mut again_rx, ack) = new_subscriber(&registry, last).await;
        assert_eq!(ack["replayTruncated"], false, "{ack}");
        let mut seqs = Vec::new();
        for _ in 0..2 * REJOIN_GRACE.as_secs() {
            tokio::time::advance(Duration::from_secs(1)).await;
            drop(feed_batch(&registry, &run.run_id)); // runs detached
            registry.send(drained_all(fast)).await.unwrap();
            caught_up(&held(&registry, &mut again_rx).await, &mut seqs);
            // About 150 of its 1 KB events: three times the batch.
            let some = Drained {
                socket: again,
                bytes: 165_000,
                batches: 3,
            };
            registry.send(some).await.unwrap();
        }
        let newest = held(&registry, &mut fast_rx).await;
        let newest = newest.iter().filter_map(|v| v["seq"].as_u64()).max();
        let lacking = newest.unwrap() - seqs.last().unwrap();
        assert!(
            lacking > REPLAY_MAX_EVENTS as u64,
            "within the buffer's bounds already: {lacking} events behind"
        );
        let end = registry.send(turn_end(&run.run_id));
        tokio::spawn(async move { end.await.unwrap() });
        read_to_complete(&registry, again, &mut again_rx, &mut seqs).await;
        assert_eq!(seqs, (last + 1..=*seqs.last().unwrap()).collect::<Vec<_>>());
    }

    /// The pace quorum: with one or two subscribers one keeping up keeps the
    /// run going (E4: the other is left behind), with more the run waits
    /// for all but the slowest sixteenth (and at least one).
    #[test]
    fn a_run_waits_for_most_of_its_subscribers() {
        assert_eq!(
            (1..=5).map(pace_quorum).collect::<Vec<_>>(),
            [1, 1, 2, 3, 4],
            "one or two subscribers: one keeping up is enough"
        );
        assert_eq!(pace_quorum(1_000), 1_000 - 1_000 / PACE_LEFT_BEHIND);
    }

    /// A batch of the run sent to the registry: its answer comes when the
    /// run is not held (or paused) for its subscribers.
    fn feed_batch(registry: &Addr<RunRegistry>, run_id: &str) -> tokio::task::JoinHandle<()> {
        let answer = registry.send(texts(run_id, 50, 1_000));
        tokio::spawn(async move {
            answer.await.unwrap();
        })
    }

    /// A registry with a run of `fast` (which drains everything it gets)
    /// and a second subscriber from seq 0; the run is `age` old (paused
    /// clock), so it has hold time to spare (2 s + a quarter of it).
    async fn fast_and_slow(
        age: Duration,
    ) -> (Addr<RunRegistry>, RunStarted, SocketId, SocketId, Frames) {
        let (registry, run, fast, _fast_rx, slow, slow_rx) = run_and_subscriber().await;
        tokio::time::advance(age).await;
        (registry, run, fast, slow, slow_rx)
    }

    /// Feeds 50-event batches; the slow subscriber writes a tenth of what
    /// it is sent after each (it reads, slowly). Returns the batch whose
    /// answer is withheld (the run held for the slow one) and the slow
    /// one's frames so far; panics if it is closed first.
    async fn feed_until_held(
        registry: &Addr<RunRegistry>,
        run_id: &str,
        fast: SocketId,
        slow: SocketId,
        slow_rx: &mut Frames,
    ) -> (tokio::task::JoinHandle<()>, Vec<Value>) {
        let mut frames = Vec::new();
        for _ in 0..400 {
            let answer = feed_batch(registry, run_id);
            frames.extend(held(registry, slow_rx).await);
            assert!(
                !frames.iter().any(|v| v["kind"] == "close"),
                "closed while it was reading"
            );
            if !registry.send(Inspect).await.unwrap().contains("holding {}") {
                return (answer, frames);
            }
            registry.send(drained_all(fast)).await.unwrap();
            let tenth = Drained {
                socket: slow,
                bytes: 5_500,
                batches: 1,
            };
            registry.send(tenth).await.unwrap();
        }
        panic!("the run was never held for the slow reader");
    }

    /// The run is held for a far-behind subscriber that is reading (instead
    /// of closing it with 4008, as it is one that reads nothing): once it
    /// has read back to twice the margin the run goes on, and it gets every
    /// event of the run without a close.
    #[actix_rt::test]
    async fn a_reading_subscriber_far_behind_holds_the_run_and_loses_nothing() {
        let (registry, run, fast, slow, mut slow_rx) = fast_and_slow(Duration::from_secs(8)).await;
        let (answer, mut frames) =
            feed_until_held(&registry, &run.run_id, fast, slow, &mut slow_rx).await;
        assert!(!answer.is_finished(), "answered while held");
        // It reads: the run goes on once it is out of reach, without any
        // time passing (not the no-progress rule ending the hold).
        let t0 = Instant::now();
        for _ in 0..100 {
            if registry.send(Inspect).await.unwrap().contains("holding {}") {
                break;
            }
            registry.send(drained_all(slow)).await.unwrap();
            frames.extend(held(&registry, &mut slow_rx).await);
        }
        answer.await.unwrap();
        assert_eq!(Instant::now(), t0, "the hold ended by the clock");
        for _ in 0..40 {
            let answer = feed_batch(&registry, &run.run_id);
            registry.send(drained_all(fast)).await.unwrap();
            registry.send(drained_all(slow)).await.unwrap();
            answer.await.unwrap();
        }
        registry.send(turn_end(&run.run_id)).await.unwrap();
        loop {
            registry.send(drained_all(slow)).await.unwrap();
            let more = held(&registry, &mut slow_rx).await;
            frames.extend(more);
            if frames.iter().any(|v| v["kind"] == "complete") {
                break;
            }
            if !frames.is_empty() {
                continue;
            }
            frames.push(next_of_kind(&mut slow_rx, "complete").await);
        }
        assert!(!frames.iter().any(|v| v["kind"] == "close"), "closed");
        let seqs: Vec<u64> = frames.iter().filter_map(|v| v["seq"].as_u64()).collect();
        assert_eq!(seqs, (1..=*seqs.last().unwrap()).collect::<Vec<_>>());
        assert!(seqs.len() > REPLAY_MAX_EVENTS, "{} events", seqs.len());
    }

    /// E4 still holds for a far-behind subscriber that holds the run: one
    /// that stops reading holds it for one heartbeat interval (from its
    /// last write), then is closed with 4008 as the run goes on.
    #[actix_rt::test]
    async fn a_holder_that_stops_reading_is_closed_a_heartbeat_later() {
        let heartbeat = GatewayConfig::for_tests(std::env::temp_dir()).heartbeat;
        // An old run: its hold time (a quarter of it) outlasts the heartbeat.
        let (registry, run, fast, slow, mut slow_rx) = fast_and_slow(heartbeat * 8).await;
        let (answer, _) = feed_until_held(&registry, &run.run_id, fast, slow, &mut slow_rx).await;
        let t0 = Instant::now();
        tokio::time::advance(heartbeat - Duration::from_millis(100)).await;
        held(&registry, &mut slow_rx).await;
        assert!(!answer.is_finished(), "released while it was reading");
        answer.await.unwrap();
        let waited = Instant::now() - t0;
        assert!(waited <= heartbeat + HOLD_REVIEW_EVERY, "{waited:?}");
        let answer = feed_batch(&registry, &run.run_id);
        let frames = held(&registry, &mut slow_rx).await;
        assert!(
            frames
                .iter()
                .any(|v| v["kind"] == "close" && v["code"] == 4008),
            "not closed once it stopped reading: {frames:?}"
        );
        answer.await.unwrap();
    }

    /// E4 for a single slow reader beside a fast one: one that reads but
    /// never catches up holds the run no longer than [`HOLD_GRACE`] plus a
    /// quarter of the run's time, then is closed with 4008 as far behind.
    #[actix_rt::test]
    async fn a_holder_that_stays_behind_is_closed_once_the_hold_time_is_spent() {
        // Reads a little every 100 ms, never enough to get out of reach.
        let (registry, run, fast, slow, mut slow_rx) = fast_and_slow(Duration::from_secs(8)).await;
        let (answer, _) = feed_until_held(&registry, &run.run_id, fast, slow, &mut slow_rx).await;
        let t0 = Instant::now();
        while !answer.is_finished() {
            tokio::time::advance(Duration::from_millis(100)).await;
            let trickle = Drained {
                socket: slow,
                bytes: 1_000,
                batches: 0,
            };
            registry.send(trickle).await.unwrap();
            held(&registry, &mut slow_rx).await;
            assert!(
                Instant::now() - t0 < Duration::from_secs(30),
                "held for good"
            );
        }
        // Held 2 s plus a quarter of the run's 8 s and of the hold itself.
        let held_for = (Instant::now() - t0).as_secs_f64();
        assert!((5.2..=5.6).contains(&held_for), "held for {held_for} s");
        let answer = feed_batch(&registry, &run.run_id);
        let frames = held(&registry, &mut slow_rx).await;
        assert!(
            frames
                .iter()
                .any(|v| v["kind"] == "close" && v["code"] == 4008),
            "not closed once its hold time was spent: {frames:?}"
        );
        answer.await.unwrap();
    }

    /// Advances paused time to `at` (no-op when already past it).
    async fn advance_to(at: Instant) {
        tokio::time::advance(at.saturating_duration_since(Instant::now())).await;
    }

    /// E6 on paused time: the `clientRequestId` table outlives the session
    /// state. A run completes with no socket left, its state is evicted
    /// after 5 minutes; a resend at minute 9 still starts nothing and gets
    /// the original run id, one after minute 10 runs the prompt again.
    #[actix_rt::test]
    async fn a_client_request_id_is_remembered_ten_minutes_past_eviction() {
        tokio::time::pause();
        let t0 = Instant::now();
        let (registry, socket, mut rx) = registry_without_processes().await;
        let first = registry
            .send(send_with_id(socket, "r1"))
            .await
            .unwrap()
            .unwrap();
        assert!(!first.duplicate);
        let accepted = next_of_kind(&mut rx, "chat_accepted").await;
        assert_eq!(accepted["duplicate"], false);
        registry.send(turn_end(&first.run_id)).await.unwrap();
        assert_eq!(next_of_kind(&mut rx, "complete").await["success"], true);
        registry
            .send(RunExited {
                session_id: "s1".into(),
                run_id: first.run_id.clone(),
                exit_code: Some(0),
                error: None,
            })
            .await
            .unwrap();
        // The client went away (a reconnect in progress).
        registry.send(Disconnect { socket }).await.unwrap();

        // Past the completed run's retention its session state is gone.
        advance_to(t0 + COMPLETED_RUN_RETENTION + Duration::from_secs(1)).await;
        registry.send(Inspect).await.unwrap();
        let state = registry.send(Inspect).await.unwrap();
        assert!(!state.contains("session s1"), "not evicted: {state}");

        // Minute 9, from the reconnected client: a duplicate, nothing runs.
        let (socket, mut rx) = connect_sink(&registry).await;
        advance_to(t0 + Duration::from_secs(9 * 60)).await;
        let again = registry
            .send(send_with_id(socket, "r1"))
            .await
            .unwrap()
            .unwrap();
        assert!(again.duplicate, "minute 9: the prompt ran twice");
        assert_eq!(again.run_id, first.run_id);
        let accepted = next_of_kind(&mut rx, "chat_accepted").await;
        assert_eq!(
            (accepted["duplicate"].clone(), accepted["runId"].clone()),
            (json!(true), json!(first.run_id))
        );
        assert!(registry
            .send(ListRunning { user_id: 1 })
            .await
            .unwrap()
            .is_empty());

        // After minute 10 the id is forgotten: the same request runs.
        advance_to(t0 + CLIENT_REQUEST_TTL + Duration::from_secs(1)).await;
        let late = registry
            .send(send_with_id(socket, "r1"))
            .await
            .unwrap()
            .unwrap();
        assert!(!late.duplicate, "minute 10: still deduped");
        assert_ne!(late.run_id, first.run_id);
        let running = registry.send(ListRunning { user_id: 1 }).await.unwrap();
        assert_eq!(running.len(), 1);
        assert_eq!(
            next_of_kind(&mut rx, "chat_accepted").await["duplicate"],
            false
        );
    }

    /// Shutdown: the live run gets its error and failed `complete`, the
    /// socket is told to close with 1001; from then on `chat.send` is
    /// refused with `SHUTTING_DOWN` and a socket that registers late (its
    /// upgrade raced the HTTP server's pause) is closed at once.
    #[actix_rt::test]
    async fn after_shutdown_runs_and_new_sockets_are_refused() {
        let (registry, socket, mut rx) = registry_without_processes().await;
        registry
            .send(start_run(socket, "hello"))
            .await
            .unwrap()
            .unwrap();
        registry.send(Shutdown).await.unwrap();
        let error = next_of_kind(&mut rx, "error").await;
        assert!(error["content"].as_str().unwrap().contains("shutting down"));
        let complete = next_of_kind(&mut rx, "complete").await;
        assert_eq!(
            (complete["success"].clone(), complete["aborted"].clone()),
            (json!(false), json!(true))
        );
        assert_eq!(next_of_kind(&mut rx, "close").await["code"], 1001);

        let refused = registry.send(start_run(socket, "again")).await.unwrap();
        assert_eq!(refused.unwrap_err().code, ErrorCode::ShuttingDown);
        let (late, mut late_rx) = connect_sink(&registry).await;
        assert_eq!(next_of_kind(&mut late_rx, "close").await["code"], 1001);
        let refused = registry.send(start_run(late, "late")).await.unwrap();
        assert_eq!(refused.unwrap_err().code, ErrorCode::ShuttingDown);
        assert!(registry
            .send(ListRunning { user_id: 1 })
            .await
            .unwrap()
            .is_empty());
    }

    /// A panic inside the registry itself (a bug in a handler): under its
    /// Supervisor it is restarted behind the same address; the live run gets
    /// one failed `complete`, its socket everything it was owed and a 1001
    /// close; the next run of the session, loaded as the database has it,
    /// continues above every seq delivered.
    #[actix_rt::test]
    async fn a_panicking_registry_is_restarted_and_fails_its_runs_once() {
        let config = Arc::new(GatewayConfig::for_tests(std::env::temp_dir()));
        let mem = Arc::new(MemStore::default());
        let store: Store = mem.clone();
        let registry = Supervisor::start(move |_| {
            RunRegistry::with_providers(config, store, buggy).without_processes()
        });
        let (socket, mut rx) = connect_sink(&registry).await;
        let first = registry
            .send(start_run(socket, "hello"))
            .await
            .unwrap()
            .unwrap();
        let text = EventBody::text(crate::protocol::Role::Assistant, "hi");
        let events = RunEvents {
            session_id: "s1".into(),
            run_id: first.run_id.clone(),
            events: vec![ProviderEvent::Emit(text.into())],
            read_at: None,
        };
        registry.send(events).await.unwrap();
        assert_eq!(next_of_kind(&mut rx, "text").await["seq"], 1);

        registry.send(PanicForTest).await.unwrap();
        let error = next_of_kind(&mut rx, "error").await;
        assert!(
            error["content"].as_str().unwrap().contains("restarted"),
            "{error}"
        );
        let complete = next_of_kind(&mut rx, "complete").await;
        assert_eq!(complete["runId"], json!(first.run_id));
        assert_eq!(
            (complete["success"].clone(), complete["aborted"].clone()),
            (json!(false), json!(false))
        );
        assert_eq!(next_of_kind(&mut rx, "close").await["code"], 1001);

        // The same address serves again; the old run's late exit changes nothing.
        let (socket, mut rx) = connect_sink(&registry).await;
        assert!(registry
            .send(ListRunning { user_id: 1 })
            .await
            .unwrap()
            .is_empty());
        let exited = RunExited {
            session_id: "s1".into(),
            run_id: first.run_id.clone(),
            exit_code: None,
            error: Some("killed".into()),
        };
        registry.send(exited).await.unwrap();
        let reserved = mem.0.lock().unwrap().get("s1:reserved").copied();
        let session = SessionRow {
            seq_reserved: reserved.expect("a reservation was written"),
            ..row()
        };
        let again = StartRun {
            session,
            ..start_run(socket, "again")
        };
        let second = registry.send(again).await.unwrap().unwrap();
        assert!(
            second.first_seq > complete["seq"].as_u64().unwrap(),
            "seq {} reused after the restart",
            second.first_seq
        );
        registry.send(turn_end(&second.run_id)).await.unwrap();
        let complete = next_of_kind(&mut rx, "complete").await;
        assert_eq!(
            (complete["runId"].clone(), complete["success"].clone()),
            (json!(second.run_id), json!(true))
        );
    }

    #[test]
    fn cwd_outside_the_project_is_ignored() {
        let dir = std::env::temp_dir().join(format!("ag-cwd-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("sub")).unwrap();
        let p = dir.to_str().unwrap();
        assert_eq!(
            resolve_cwd(p, &json!({"cwd": "sub"})),
            dir.join("sub").canonicalize().unwrap()
        );
        assert_eq!(resolve_cwd(p, &json!({"cwd": "/etc"})), PathBuf::from(p));
        assert_eq!(resolve_cwd(p, &json!({"cwd": "../.."})), PathBuf::from(p));
        assert_eq!(resolve_cwd(p, &json!({})), PathBuf::from(p));
        let _ = std::fs::remove_dir_all(dir);
    }

    /// The periodic history flush forgets idle session states. One whose
    /// first seq reservation is still being written is not idle: forgotten,
    /// the answer was lost and the run started on a state loaded anew,
    /// whose next reservation read its own block as another gateway's, so
    /// the run's seqs jumped by a block (readers saw a gap, cluster
    /// followers closed theirs with 4008). The run's seqs stay 1, 2, 3, ...
    #[actix_rt::test]
    async fn a_flush_during_the_first_reservation_keeps_the_seqs_contiguous() {
        let (entered, mut entered_rx) = tokio::sync::mpsc::unbounded_channel();
        let (release, release_rx) = std::sync::mpsc::channel();
        let gate = Gate {
            entered,
            release: Mutex::new(Some(release_rx)),
        };
        let store: Store = Arc::new(MemStore(Mutex::default(), Some(gate)));
        let config = Arc::new(GatewayConfig::for_tests(std::env::temp_dir()));
        let registry = RunRegistry::with_providers(config, store, buggy)
            .without_processes()
            .start();
        let (socket, mut rx) = connect_sink(&registry).await;
        let started = actix_rt::spawn(registry.send(start_run(socket, "x")));
        entered_rx.recv().await.expect("the run reserves its seqs");
        // The flush comes while the reservation is being written.
        tokio::time::pause();
        tokio::time::advance(HISTORY_FLUSH_EVERY * 2).await;
        registry.send(Inspect).await.unwrap();
        release.send(()).unwrap();
        let run = started.await.unwrap().unwrap().unwrap();
        assert_eq!(run.first_seq, 1);
        for _ in 0..3 {
            registry.send(texts(&run.run_id, 3, 10)).await.unwrap();
            registry.send(drained_all(socket)).await.unwrap();
        }
        let frames = held(&registry, &mut rx).await;
        let seqs: Vec<u64> = frames.iter().filter_map(|v| v["seq"].as_u64()).collect();
        assert_eq!(seqs, (1..=9).collect::<Vec<_>>(), "{frames:?}");
    }
}
