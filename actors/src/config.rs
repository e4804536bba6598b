//! Settings the actors need, built by the binary from its CLI flags.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

use crate::provider::ProviderKind;

/// Largest inbound WebSocket frame accepted (E5): larger frames are refused
/// from their header, never buffered.
pub const MAX_INBOUND_FRAME: usize = 8 * 1024 * 1024;

#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// Ping interval on every socket; a socket that missed the previous ping is dropped.
    pub heartbeat: Duration,
    /// A detached PTY is killed after this.
    pub shell_detach: Duration,
    /// A pending tool permission is denied after this (interactive tools wait forever).
    pub permission_timeout: Duration,
    /// A provider CLI that prints nothing for this long (outside a
    /// permission prompt) is killed and its run completes as failed.
    pub provider_idle: Duration,
    /// Binary per provider (`--claude-bin` etc.).
    pub provider_bins: BTreeMap<ProviderKind, PathBuf>,
    /// The environment children get: the gateway's minus its secrets and its own settings.
    pub child_env: Vec<(OsString, OsString)>,
    /// Gateway data directory (plugins live below it).
    pub data_dir: PathBuf,
    /// Messages of history kept per session (oldest deleted first); 0 records none.
    pub history_max_messages: usize,
    /// Per-user limits (`--max-*` flags).
    pub limits: crate::limits::Limits,
}

/// Default of `--history-max-messages`.
pub const DEFAULT_HISTORY_MAX_MESSAGES: usize = 10_000;

impl GatewayConfig {
    /// The binary for a provider: the configured path or the plain command name.
    pub fn bin(&self, kind: ProviderKind) -> PathBuf {
        self.provider_bins
            .get(&kind)
            .cloned()
            .unwrap_or_else(|| PathBuf::from(kind.default_bin()))
    }

    /// The environment for children: everything except `AGENTGATE_*` (the
    /// JWT secret and the gateway's own settings).
    pub fn child_env_from_process() -> Vec<(OsString, OsString)> {
        std::env::vars_os()
            .filter(|(k, _)| !k.to_string_lossy().starts_with("AGENTGATE_"))
            .collect()
    }

    /// The CLI's defaults, for the actors' unit tests (the binary builds its
    /// config from its flags).
    #[cfg(test)]
    pub fn for_tests(data_dir: PathBuf) -> Self {
        GatewayConfig {
            heartbeat: Duration::from_secs(30),
            shell_detach: Duration::from_secs(1800),
            permission_timeout: Duration::from_secs(300),
            provider_idle: crate::provider::cli_support::CLI_IDLE_TIMEOUT,
            provider_bins: BTreeMap::new(),
            child_env: Self::child_env_from_process(),
            data_dir,
            history_max_messages: DEFAULT_HISTORY_MAX_MESSAGES,
            limits: crate::limits::Limits::default(),
        }
    }
}
