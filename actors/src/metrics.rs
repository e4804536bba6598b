//! Prometheus metrics of the whole gateway (`--metrics-listen`), and the
//! supervision events of every actor.
//!
//! The metrics live in one process-wide registry ([`metrics()`]): that is
//! static state beside the actors, the one exception to "state lives in its
//! actor". It holds nothing but atomic counters, gauges and histogram
//! buckets (no session state, nothing any actor reads back), which is how
//! Prometheus client libraries are built; the alternative, a metrics actor,
//! would cost a message per event on the hottest paths.
//!
//! Hot paths stay cheap: every label combination used per event (event
//! kinds, endpoints) is resolved once, so counting is one atomic add with no
//! lookup and no allocation. Labels are low-cardinality by construction:
//! endpoint, provider, outcome, close code, event kind, actor kind, plugin
//! name (from the operator's plugins directory), database operation; never a
//! session, run or user id.
//!
//! Supervision events ([`actor_started`] and friends) are `tracing` events
//! with stable fields: `event` (`actor.started`, `actor.stopped`,
//! `actor.restarted`, `actor.panicked`), `actor` (the kind), the ids the
//! actor owns, and `reason`. README "Operating agentgate" lists them.

use std::sync::LazyLock;
use std::time::{Duration, Instant};

use prometheus::{
    Counter, Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Where a connection came in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// `/ws` chat sockets.
    Chat,
    /// `/shell` terminal sockets.
    Shell,
    /// `/plugin-ws/{name}` proxied sockets.
    Plugin,
    /// Remote-session WebSockets (`/v1/.../subscribe`).
    Remote,
    /// Remote-session server-sent event streams.
    RemoteSse,
}

impl Endpoint {
    const ALL: [Endpoint; 5] = [
        Endpoint::Chat,
        Endpoint::Shell,
        Endpoint::Plugin,
        Endpoint::Remote,
        Endpoint::RemoteSse,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Endpoint::Chat => "ws",
            Endpoint::Shell => "shell",
            Endpoint::Plugin => "plugin",
            Endpoint::Remote => "remote_ws",
            Endpoint::RemoteSse => "remote_sse",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Event kinds counted in `agentgate_events_total` (EventBody kinds).
const EVENT_KINDS: [&str; 14] = [
    "text",
    "stream_delta",
    "stream_end",
    "thinking",
    "tool_use",
    "tool_result",
    "error",
    "status",
    "permission_request",
    "permission_cancelled",
    "interactive_prompt",
    "task_notification",
    "complete",
    "other",
];

/// Buckets of latencies measured in milliseconds to seconds.
const LATENCY_BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];
/// Buckets of run durations (a turn takes seconds to tens of minutes).
const RUN_BUCKETS: [f64; 10] = [
    1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0,
];

pub struct Metrics {
    registry: Registry,
    pub connections_open: IntGaugeVec,
    pub connections_opened: IntCounterVec,
    pub connections_closed: IntCounterVec,
    pub runs_active: IntGaugeVec,
    pub runs_ended: IntCounterVec,
    pub run_duration: HistogramVec,
    pub events: IntCounterVec,
    pub sent_bytes: IntCounterVec,
    pub delivery_latency: Histogram,
    pub replays: IntCounter,
    pub replays_truncated: IntCounter,
    pub slow_consumer_disconnects: IntCounter,
    pub stuck_client_disconnects: IntCounter,
    pub flow_control_pauses: IntCounter,
    pub flow_control_paused_seconds: Counter,
    pub permissions_pending: IntGauge,
    pub permissions_answered: IntCounter,
    pub permissions_timed_out: IntCounter,
    pub ptys_live: IntGauge,
    pub ptys_detached: IntGauge,
    pub shell_output_bytes: IntCounter,
    pub plugin_up: IntGaugeVec,
    pub plugin_restarts: IntCounterVec,
    pub actor_panics: IntCounterVec,
    pub heartbeat_timeouts: IntCounterVec,
    pub db_duration: HistogramVec,
    pub logins_failed: IntCounter,
    pub logins_throttled: IntCounter,
    // Pre-resolved children for the per-event paths.
    events_by_kind: Vec<IntCounter>,
    sent_by_endpoint: Vec<IntCounter>,
    open_by_endpoint: Vec<IntGauge>,
    opened_by_endpoint: Vec<IntCounter>,
}

fn opts(name: &str, help: &str) -> Opts {
    Opts::new(name, help)
}

// The names and labels below are constants: registering them cannot fail
// except for a programming error, caught by the unit test.
#[allow(clippy::expect_used)]
fn build() -> Metrics {
    let registry = Registry::new();
    macro_rules! reg {
        ($m:expr) => {{
            let m = $m.expect("valid metric");
            registry
                .register(Box::new(m.clone()))
                .expect("unique metric");
            m
        }};
    }
    let connections_open = reg!(IntGaugeVec::new(
        opts(
            "agentgate_connections_open",
            "Open client connections by endpoint"
        ),
        &["endpoint"]
    ));
    let connections_opened = reg!(IntCounterVec::new(
        opts(
            "agentgate_connections_opened_total",
            "Client connections accepted by endpoint"
        ),
        &["endpoint"]
    ));
    let connections_closed = reg!(IntCounterVec::new(
        opts(
            "agentgate_connections_closed_total",
            "Client connections closed by endpoint and WebSocket close code (none: dropped without one)"
        ),
        &["endpoint", "code"]
    ));
    let runs_active = reg!(IntGaugeVec::new(
        opts("agentgate_runs_active", "Provider runs not yet completed"),
        &["provider"]
    ));
    let runs_ended = reg!(IntCounterVec::new(
        opts(
            "agentgate_runs_ended_total",
            "Provider runs completed, by outcome (success, failed, aborted)"
        ),
        &["provider", "outcome"]
    ));
    let run_duration = reg!(HistogramVec::new(
        HistogramOpts::new(
            "agentgate_run_duration_seconds",
            "From a run's start to its complete"
        )
        .buckets(RUN_BUCKETS.to_vec()),
        &["provider"]
    ));
    let events = reg!(IntCounterVec::new(
        opts(
            "agentgate_events_total",
            "Sequenced run events by kind (each counted once, however many subscribers)"
        ),
        &["kind"]
    ));
    let sent_bytes = reg!(IntCounterVec::new(
        opts(
            "agentgate_sent_bytes_total",
            "Frame bytes written to clients by endpoint"
        ),
        &["endpoint"]
    ));
    let delivery_latency = reg!(Histogram::with_opts(
        HistogramOpts::new(
            "agentgate_delivery_latency_seconds",
            "From reading a provider's stdout line to writing its frame to a chat socket (live delivery, not replays)"
        )
        .buckets(LATENCY_BUCKETS.to_vec())
    ));
    let replays = reg!(IntCounter::new(
        "agentgate_replays_total",
        "chat.subscribe requests answered with a replay of missed events"
    ));
    let replays_truncated = reg!(IntCounter::new(
        "agentgate_replays_truncated_total",
        "Replays whose first wanted events had left the replay buffer"
    ));
    let slow_consumer_disconnects = reg!(IntCounter::new(
        "agentgate_slow_consumer_disconnects_total",
        "Subscribers closed with 4008 for falling too far behind"
    ));
    let stuck_client_disconnects = reg!(IntCounter::new(
        "agentgate_stuck_client_disconnects_total",
        "Connections cut by the watchdog: the client stopped reading"
    ));
    let flow_control_pauses = reg!(IntCounter::new(
        "agentgate_flow_control_pauses_total",
        "Times a run stopped reading its CLI because every subscriber was behind"
    ));
    let flow_control_paused_seconds = reg!(Counter::new(
        "agentgate_flow_control_paused_seconds_total",
        "Time runs spent paused for their subscribers"
    ));
    let permissions_pending = reg!(IntGauge::new(
        "agentgate_permissions_pending",
        "Tool permission requests waiting for an answer"
    ));
    let permissions_answered = reg!(IntCounter::new(
        "agentgate_permissions_answered_total",
        "Tool permission requests answered by a client"
    ));
    let permissions_timed_out = reg!(IntCounter::new(
        "agentgate_permissions_timed_out_total",
        "Tool permission requests denied because nobody answered in time"
    ));
    let ptys_live = reg!(IntGauge::new(
        "agentgate_ptys_live",
        "Live terminals (PTY sessions)"
    ));
    let ptys_detached = reg!(IntGauge::new(
        "agentgate_ptys_detached",
        "Live terminals with no socket attached (waiting for a reconnect)"
    ));
    let shell_output_bytes = reg!(IntCounter::new(
        "agentgate_shell_output_bytes_total",
        "Bytes read from terminals' PTYs"
    ));
    let plugin_up = reg!(IntGaugeVec::new(
        opts(
            "agentgate_plugin_up",
            "1 while the plugin's server is running, else 0"
        ),
        &["plugin"]
    ));
    let plugin_restarts = reg!(IntCounterVec::new(
        opts(
            "agentgate_plugin_restarts_total",
            "Plugin servers restarted after they exited"
        ),
        &["plugin"]
    ));
    let actor_panics = reg!(IntCounterVec::new(
        opts(
            "agentgate_actor_panics_total",
            "Actors that panicked, by actor kind"
        ),
        &["actor"]
    ));
    let heartbeat_timeouts = reg!(IntCounterVec::new(
        opts(
            "agentgate_heartbeat_timeouts_total",
            "Sockets dropped for missing a ping, by socket actor kind"
        ),
        &["actor"]
    ));
    let db_duration = reg!(HistogramVec::new(
        HistogramOpts::new(
            "agentgate_db_operation_duration_seconds",
            "Database operations of the actors, by operation"
        )
        .buckets(LATENCY_BUCKETS.to_vec()),
        &["op"]
    ));
    let logins_failed = reg!(IntCounter::new(
        "agentgate_logins_failed_total",
        "Logins refused for a wrong user name or password"
    ));
    let logins_throttled = reg!(IntCounter::new(
        "agentgate_logins_throttled_total",
        "Logins refused with 429 by the failed-login limits"
    ));
    let events_by_kind = EVENT_KINDS
        .iter()
        .map(|k| events.with_label_values(&[*k]))
        .collect();
    let sent_by_endpoint = Endpoint::ALL
        .iter()
        .map(|e| sent_bytes.with_label_values(&[e.as_str()]))
        .collect();
    let open_by_endpoint = Endpoint::ALL
        .iter()
        .map(|e| connections_open.with_label_values(&[e.as_str()]))
        .collect();
    let opened_by_endpoint = Endpoint::ALL
        .iter()
        .map(|e| connections_opened.with_label_values(&[e.as_str()]))
        .collect();
    Metrics {
        registry,
        connections_open,
        connections_opened,
        connections_closed,
        runs_active,
        runs_ended,
        run_duration,
        events,
        sent_bytes,
        delivery_latency,
        replays,
        replays_truncated,
        slow_consumer_disconnects,
        stuck_client_disconnects,
        flow_control_pauses,
        flow_control_paused_seconds,
        permissions_pending,
        permissions_answered,
        permissions_timed_out,
        ptys_live,
        ptys_detached,
        shell_output_bytes,
        plugin_up,
        plugin_restarts,
        actor_panics,
        heartbeat_timeouts,
        db_duration,
        logins_failed,
        logins_throttled,
        events_by_kind,
        sent_by_endpoint,
        open_by_endpoint,
        opened_by_endpoint,
    }
}

static METRICS: LazyLock<Metrics> = LazyLock::new(build);

/// The process-wide metrics.
pub fn metrics() -> &'static Metrics {
    &METRICS
}

impl Metrics {
    /// One sequenced event of `kind` ([`EventBody::kind`](crate::protocol::EventBody::kind)).
    pub fn event(&self, kind: &str) {
        self.events(kind, 1);
    }

    /// `n` events of one kind (one atomic add for a batch).
    pub fn events(&self, kind: &str, n: u64) {
        let i = EVENT_KINDS
            .iter()
            .position(|k| *k == kind)
            .unwrap_or(EVENT_KINDS.len() - 1);
        self.events_by_kind[i].inc_by(n);
    }

    pub fn sent(&self, endpoint: Endpoint, bytes: usize) {
        self.sent_by_endpoint[endpoint.index()].inc_by(bytes as u64);
    }

    pub fn paused_for(&self, d: Duration) {
        // Once per resume, not per event: the float counter's CAS is fine here.
        self.flow_control_paused_seconds.inc_by(d.as_secs_f64());
    }

    /// A socket of actor kind `actor` missed a ping.
    pub fn heartbeat_timeout(&self, actor: &str) {
        self.heartbeat_timeouts.with_label_values(&[actor]).inc();
    }

    /// Times a database operation of the actors' store.
    pub fn db_op<T>(&self, op: &'static str, f: impl FnOnce() -> T) -> T {
        let start = Instant::now();
        let out = f();
        self.db_duration
            .with_label_values(&[op])
            .observe(start.elapsed().as_secs_f64());
        out
    }

    /// The text exposition format (what `GET /metrics` answers).
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        if let Err(err) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::error!(%err, "encoding metrics failed");
        }
        String::from_utf8(out).unwrap_or_default()
    }
}

/// A client connection counted in `agentgate_connections_*`: opened when
/// made, closed (with the close code it was given, if any) when dropped.
/// A field of each socket actor.
pub struct Connection {
    endpoint: Endpoint,
    code: Option<u16>,
}

impl Connection {
    pub fn open(endpoint: Endpoint) -> Self {
        let m = metrics();
        m.opened_by_endpoint[endpoint.index()].inc();
        m.open_by_endpoint[endpoint.index()].inc();
        Connection {
            endpoint,
            code: None,
        }
    }

    /// The close code the connection ended with (the first one set wins:
    /// the gateway's own close, or the client's).
    pub fn close_code(&mut self, code: u16) {
        self.code.get_or_insert(code);
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        let m = metrics();
        m.open_by_endpoint[self.endpoint.index()].dec();
        let mut buf = [0u8; 5];
        let code = match self.code {
            Some(code) => format_code(code, &mut buf),
            None => "none",
        };
        m.connections_closed
            .with_label_values(&[self.endpoint.as_str(), code])
            .inc();
    }
}

/// The `reason` of a socket actor's `actor.stopped` event: its close code, if any.
pub fn stop_reason(metric: &Option<Connection>) -> String {
    match metric.as_ref().and_then(|m| m.code) {
        Some(code) => format!("closed with {code}"),
        None => "connection ended without a close frame".to_string(),
    }
}

/// Records the close code of `reason` (sent or received) on the socket's connection.
pub fn note_close(
    metric: &mut Option<Connection>,
    reason: &Option<actix_web_actors::ws::CloseReason>,
) {
    if let (Some(m), Some(r)) = (metric, reason) {
        m.close_code(r.code.into());
    }
}

/// A u16 as decimal text without allocating.
fn format_code(code: u16, buf: &mut [u8; 5]) -> &str {
    let mut n = code;
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    std::str::from_utf8(&buf[i..]).unwrap_or("none")
}

/// Counts and logs a panic of the actor that owns it: a field of each
/// actor, whose drop runs while the panic unwinds the actor's task.
pub struct PanicWatch {
    pub actor: &'static str,
    /// The actor's ids, for the `actor.panicked` event.
    pub ids: String,
}

impl PanicWatch {
    pub fn new(actor: &'static str, ids: impl Into<String>) -> Self {
        PanicWatch {
            actor,
            ids: ids.into(),
        }
    }
}

impl Drop for PanicWatch {
    fn drop(&mut self) {
        if std::thread::panicking() {
            metrics()
                .actor_panics
                .with_label_values(&[self.actor])
                .inc();
            tracing::error!(
                event = "actor.panicked",
                actor = self.actor,
                ids = %self.ids,
                reason = "panic",
                "supervision: actor panicked; its supervisor cleans up, others continue"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_metric_registers_and_renders() {
        let m = metrics();
        m.event("stream_delta");
        m.event("no_such_kind");
        // The registry's tests pause runs on a paused clock in the same process.
        let paused = m.flow_control_paused_seconds.get();
        m.paused_for(Duration::from_millis(1500));
        let paused = m.flow_control_paused_seconds.get() - paused;
        assert!(paused >= 1.5 - 1e-9, "{paused}");
        {
            let mut c = Connection::open(Endpoint::Shell);
            c.close_code(4008);
        }
        let text = m.render();
        assert!(text.contains("agentgate_events_total{kind=\"stream_delta\"}"));
        assert!(text.contains("agentgate_events_total{kind=\"other\"}"));
        assert!(text.contains("agentgate_flow_control_paused_seconds_total "));
        assert!(
            text.contains("agentgate_connections_closed_total{code=\"4008\",endpoint=\"shell\"} 1")
        );
    }

    #[test]
    fn codes_format_without_allocating() {
        let mut buf = [0u8; 5];
        assert_eq!(format_code(0, &mut buf), "0");
        assert_eq!(format_code(1000, &mut buf), "1000");
        assert_eq!(format_code(65535, &mut buf), "65535");
    }
}

/// The last supervision events, for the admin page: fed by the binary's
/// log layer (one [`Supervised`] per `actor.*` event, dropped when the
/// mailbox is full: the log has them anyway), read with [`RecentSupervision`].
///
/// **Owns** the last [`SUPERVISION_KEPT`] events. **Handles** [`Supervised`],
/// [`RecentSupervision`]. **Sends** nothing.
#[derive(Default)]
pub struct SupervisionLog {
    recent: std::collections::VecDeque<serde_json::Value>,
}

/// Supervision events the admin page shows.
pub const SUPERVISION_KEPT: usize = 50;

/// Where the log layer sends supervision events (set once at startup; the
/// same process-wide-handle exception as the metrics registry).
pub static SUPERVISION: std::sync::OnceLock<actix::Recipient<Supervised>> =
    std::sync::OnceLock::new();

/// One supervision event: its fields and level, with a timestamp.
#[derive(actix::Message)]
#[rtype(result = "()")]
pub struct Supervised(pub serde_json::Value);

/// The kept supervision events, oldest first.
#[derive(actix::Message)]
#[rtype(result = "Vec<serde_json::Value>")]
pub struct RecentSupervision;

impl actix::Actor for SupervisionLog {
    type Context = actix::Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(256);
    }
}

impl actix::Handler<Supervised> for SupervisionLog {
    type Result = ();

    fn handle(&mut self, msg: Supervised, _: &mut Self::Context) {
        if self.recent.len() >= SUPERVISION_KEPT {
            self.recent.pop_front();
        }
        self.recent.push_back(msg.0);
    }
}

impl actix::Handler<RecentSupervision> for SupervisionLog {
    type Result = actix::MessageResult<RecentSupervision>;

    fn handle(&mut self, _: RecentSupervision, _: &mut Self::Context) -> Self::Result {
        actix::MessageResult(self.recent.iter().cloned().collect())
    }
}
