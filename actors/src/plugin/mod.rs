//! Plugins (PROTOCOL.md section 6): managed plugin servers and the
//! `/plugin-ws/{name}` passthrough.
//!
//! | piece | file | role |
//! |---|---|---|
//! | discovery | [`manifest`] | reads and validates `<data-dir>/plugins/<name>/manifest.json` |
//! | `PluginRegistry` | [`plugin_registry`] | knows every plugin by name: its host and its last status; answers port lookups and REST |
//! | `PluginHost` | [`plugin_host`] | one per enabled plugin: spawns the server, waits for its ready line, restarts it with backoff, stops it |
//! | `PluginProxy` | [`plugin_proxy`] | one per client socket: relays frames to `ws://127.0.0.1:<port>/ws` and back, with backpressure |
//! | frame checks | [`frames`] | RFC 6455 frame boundaries and receiver checks for the relay (UTF-8 incrementally) |
//!
//! Message graph (acyclic for request/response): REST and the upgrade route
//! ask the registry; the registry commands hosts (`StartServer`,
//! `StopServer`); hosts only *tell* the registry their status
//! (`HostStatusChanged`). A proxy asks the registry for a port once, then
//! talks only to its client and its plugin.

pub mod frames;
pub mod manifest;
pub mod plugin_host;
pub mod plugin_proxy;
pub mod plugin_registry;

use serde::Serialize;

pub use manifest::{valid_name, PluginManifest};
pub use plugin_proxy::start_proxy;
pub use plugin_registry::{
    ListPlugins, ListProxies, LookupPort, PluginError, PluginRegistry, ProxyClosed, ProxyInfo,
    ProxyOpened, StartPlugin, StopAllPlugins, StopPlugin,
};

/// Lifecycle state of a plugin server, as shown over REST.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PluginState {
    /// `enabled: false` in the manifest: listed, never started.
    Disabled,
    /// Not running and not scheduled (stopped over REST or at shutdown).
    Stopped,
    /// Spawned, waiting for the ready line.
    Starting,
    /// Ready: the port accepts connections.
    Running,
    /// Failed or crashed; a restart is scheduled.
    Backoff,
    /// Asked to exit (TERM sent, KILL after a grace period).
    Stopping,
}

/// One plugin as reported by `GET /api/plugins`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PluginStatus {
    pub name: String,
    pub enabled: bool,
    pub state: PluginState,
    /// True only while the server is ready (clients can connect).
    pub running: bool,
    pub port: Option<u16>,
    pub pid: Option<u32>,
    /// Automatic restarts since the gateway started.
    pub restarts: u32,
    /// Why the last start or run failed; kept after a later success so users see why it restarted.
    pub last_error: Option<String>,
}

impl PluginStatus {
    /// The status of a plugin that has not been started (or never will be).
    pub fn idle(manifest: &PluginManifest) -> Self {
        PluginStatus {
            name: manifest.name.clone(),
            enabled: manifest.enabled,
            state: if manifest.enabled {
                PluginState::Stopped
            } else {
                PluginState::Disabled
            },
            running: false,
            port: None,
            pid: None,
            restarts: 0,
            last_error: None,
        }
    }
}
