//! Test support for running the REAL provider CLIs offline.
//!
//! - [`clis`]: `claude_bin()` / `npm_cli(package, version, bin)` install pinned npm CLIs into
//!   `<repo>/.cache/agent-clis/` once and return the executable path.
//! - [`anthropic`]: `AnthropicStub`, a scripted Anthropic Messages API on 127.0.0.1:0 with a log of
//!   the requests it received; `stub.claude_env(home)` gives the env a Claude child needs.
//! - [`browser`]: Debian's Chromium and a pinned playwright-core (installed on first use), running the
//!   Node scripts of `tests/browser/` that report steps as JSON lines.
//! - [`postgres`]: `TestDatabase`, a fresh database per test on the machine's PostgreSQL.
//! - [`redis`]: `TestRedis`, a `redis-server` of the test's own on a free port (kill, restart on the same port).
//! - [`cluster`]: `TestCluster`, N gateway nodes in cluster mode sharing one database, one Redis and one JWT secret.
//! - [`tls`]: `TestCa`, a throw-away CA (rcgen) signing leaf certificates, and a client config trusting it.
//!
//! Facts about the Claude CLI stream: /work/notes/claude-cli.md and tests/fixtures/claude/*.jsonl.

// Each test area uses a different subset of these helpers.
#![allow(dead_code)]

pub mod anthropic;
pub mod browser;
pub mod clis;
pub mod cluster;
pub mod gemini;
pub mod model_stub;
pub mod openai;
pub mod postgres;
pub mod proxy;
pub mod redis;
pub mod terminal;
pub mod tls;

mod selftest;
