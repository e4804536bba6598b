//! The one integration-test binary (`autotests = false`): each module is one
//! area, all of them against a real `agentgate serve` process.
//!
//! - `util`: start a server, tokens, WebSocket and REST clients.
//! - `chat`: the `/ws` protocol with the scripted stand-in CLI `fake_claude`.
//! - `cluster`: gateways on the machine's PostgreSQL (`--database-url postgres://...`): restarts, two gateways on one database.
//! - `cluster_nodes`: cluster mode (`--redis-url`) between two nodes: follow, lease, routed commands, node and Redis loss.
//! - `cluster_mode`: three nodes in cluster mode (`--redis-url`, support::cluster): cross-node follow, fan-out, abort, permissions, node and Redis loss, races, ownership.
//! - `claude_e2e`: the real Claude Code CLI through the gateway, against the Anthropic stand-in.
//! - `foundation`: CLI, auth refusals, REST routes, bad frames, heartbeat, restart, SIGTERM.
//! - `providers`: Codex, Gemini, OpenCode (real CLIs) and Cursor (fake CLI) end to end, one row each.
//! - `shell`: `/shell` terminals: real bash in real PTYs, reattach, replay, screen restore, auth URLs, flow control.
//! - `security`: TLS, Origin/Host checks, hardened auth, limits, hostile input.
//! - `plugins`: plugin servers (the `echo_plugin` example, shell scripts), `/plugin-ws/{name}`, plugin REST.
//! - `remote`: remote sessions (`/v1/...`) with the `agentgate-client` library: follow, steer, permissions, reconnects, SSE.
//! - `remote_cli`: the real Claude Code remote-session clients (2.1.100 `--remote`, 2.1.330 `--cloud`) in a PTY.
//! - `operators`: Prometheus metrics (scraped and parsed), supervision events, the admin API and page, `agentgate status`.
//! - `web_ui`: static serving of a built web UI, the help page, `user add`, the REST routes the web UI reads.
//! - `web_ui_browser`: the web UI in headless Chromium (support::browser): the help page, the real CloudCLI build end to end.

mod util;

// Real provider CLIs (installed from npm on first use) and model API stand-ins.
mod support;

mod chat;
mod claude_e2e;
mod cluster;
mod cluster_mode;
mod cluster_nodes;
mod delivery;
mod foundation;
mod operators;
mod plugins;
mod providers;
mod remote;
mod remote_cli;
mod security;
mod shell;
mod web_ui;
mod web_ui_browser;
