//! The actor system of agentgate.
//!
//! # Layout
//!
//! | actor | file | role |
//! |---|---|---|
//! | `RunRegistry` | [`chat::run_registry`] | supervisor of chat runs: seq numbering, replay buffer, subscribers, complete/abort dedupe, pending permissions |
//! | `ProviderRun` | [`chat::provider_run`] | one live provider CLI process: spawn, stdin, stdout parsing, abort, exit |
//! | `ChatSocket` | [`chat::chat_socket`] | one `/ws` connection: parses frames, dispatches to the registry, writes frames |
//! | `PluginRegistry`, `PluginHost`, `PluginProxy` | [`plugin`] | plugin servers under supervision (one host each) and one proxy per `/plugin-ws/{name}` socket |
//! | `PtyHub`, `PtySession`, `ShellSocket` | [`shell`] | `/shell` terminals: the registry of live PTYs by (user, key), one actor per PTY (child, replay, screen, attached sockets), one per socket |
//! | `RemoteSocket`, `EventStream`, `Followers` | [`remote`] | Claude Code's remote-session client: one follower of a session's runs per WebSocket or SSE stream, rendered as stream-json messages; where closed sockets left off |
//!
//! Everything else is plain data or functions: [`protocol`] (wire types),
//! [`provider`] (the adapter trait and the adapters), [`store`] (the database
//! seam the binary implements), [`config`], [`heartbeat`], [`limits`]
//! (per-user limits: the `UserLimits` actor counts sockets and session
//! creations), [`token_watch`] (ends connections whose token expired or was
//! revoked), [`watchdog`] (cuts off connections whose client stopped
//! reading), [`lines`] (bounded line reading of child output), [`json_text`]
//! (JSON string escaping and scanning for the frame writers), [`fine_timer`]
//! (a microsecond one-shot timer for the stdout reader's batching),
//! [`quiet_pipe`] (a child's pipe that wakes nobody while the reader lets it fill), [`kill`] (every signal
//! sent to a child by pid or group, and how far each kind of child is
//! chased) with [`pidfd`] (signals and exit waits that cannot hit a reused
//! pid) and [`procfs`] (finding the processes a kill must reach).
//!
//! Invariants: only the RunRegistry assigns `seq`; each piece of mutable state
//! has exactly one owning actor and others reach it with typed messages; every
//! queue between actors is bounded (see each actor's module doc for what
//! happens when it is full).

pub mod chat;
pub mod cluster;
pub mod config;
pub mod fine_timer;
pub mod heartbeat;
pub mod json_text;
pub mod kill;
pub mod limits;
pub mod lines;
pub mod metrics;
pub mod pidfd;
pub mod plugin;
pub mod procfs;
pub mod protocol;
pub mod provider;
pub mod quiet_pipe;
pub mod remote;
pub mod shell;
pub mod store;
pub mod token_watch;
pub mod watchdog;
pub mod write_pump;

/// The authenticated user of a connection, established by the binary before
/// any upgrade.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthUser {
    pub id: i64,
    pub username: String,
}
