//! The one integration-test binary (`autotests = false`): each module is one
//! area, all of them against a real `agentgate serve` process.
//!
//! - `util`: start a server, tokens, WebSocket and REST clients.
//! - `foundation`: CLI, auth refusals, REST routes, bad frames, heartbeat, restart, SIGTERM.

mod util;

// Real provider CLIs (installed from npm on first use) and model API stand-ins.
mod support;

mod foundation;
