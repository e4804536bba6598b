//! N gateway nodes in cluster mode on one machine: one fresh PostgreSQL
//! database ([`TestDatabase`]), one `redis-server` of the test's own
//! ([`TestRedis`], which a test may kill and restart), one JWT secret, and
//! per node `agentgate serve --node-id node-X --redis-url ...
//! --cluster-lease-ms N` with the scripted stand-in CLI `fake_claude`.
//!
//! Every node's data dir holds the same `jwt-secret` file beside the
//! `AGENTGATE_JWT_SECRET` the node runs with, so `node.token(user)` (the
//! real `agentgate token` on that data dir) mints a token valid on all of
//! them, as a shared secret promises.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use super::postgres::TestDatabase;
use super::redis::TestRedis;
use crate::util::{example_bin, TestServer};

/// The lease the test clusters run with unless told otherwise: short, so a
/// lost node is noticed quickly, yet several renewals long on a loaded
/// 2-core machine.
pub const TEST_LEASE_MS: u64 = 2_000;

/// Node ids by index: `node-a`, `node-b`, ...
pub fn node_id(i: usize) -> String {
    format!("node-{}", (b'a' + i as u8) as char)
}

/// A cluster of gateway nodes. Dropping it kills the nodes, then Redis, then
/// drops the database.
pub struct TestCluster {
    // Field order is drop order: nodes before the services they use.
    nodes: Vec<Option<TestServer>>,
    pub redis: TestRedis,
    pub db: TestDatabase,
    pub secret: String,
    pub lease_ms: u64,
}

impl TestCluster {
    /// `n` nodes with [`TEST_LEASE_MS`].
    pub fn start(n: usize) -> TestCluster {
        TestCluster::start_with(n, TEST_LEASE_MS, |_, _| {})
    }

    /// `n` nodes with `lease_ms`; `f(i, cmd)` may add flags or env to node `i`.
    pub fn start_with(n: usize, lease_ms: u64, f: impl Fn(usize, &mut Command)) -> TestCluster {
        TestCluster::start_full(n, lease_ms, |_, _| {}, f)
    }

    /// The same; `prepare(i, data_dir)` first writes into node `i`'s data
    /// dir (e.g. plugins).
    pub fn start_full(
        n: usize,
        lease_ms: u64,
        prepare: impl Fn(usize, &Path),
        f: impl Fn(usize, &mut Command),
    ) -> TestCluster {
        let db = TestDatabase::create();
        let redis = TestRedis::start();
        let secret = format!(
            "{}{}",
            uuid::Uuid::new_v4().simple(),
            uuid::Uuid::new_v4().simple()
        );
        let mut cluster = TestCluster {
            nodes: Vec::new(),
            redis,
            db,
            secret,
            lease_ms,
        };
        for i in 0..n {
            let data = tempfile::tempdir().expect("temp dir");
            prepare(i, data.path());
            let node = cluster.spawn_node(i, data, &f);
            cluster.nodes.push(Some(node));
        }
        cluster
    }

    fn spawn_node(
        &self,
        i: usize,
        data: tempfile::TempDir,
        f: &impl Fn(usize, &mut Command),
    ) -> TestServer {
        let secret_file = data.path().join("jwt-secret");
        std::fs::write(&secret_file, &self.secret).expect("write jwt-secret");
        std::fs::set_permissions(&secret_file, std::fs::Permissions::from_mode(0o600))
            .expect("chmod jwt-secret");
        let (redis_url, lease) = (self.redis.url(), self.lease_ms.to_string());
        TestServer::start_on(data, Some(&self.db.url), |cmd| {
            cmd.env("AGENTGATE_JWT_SECRET", &self.secret)
                .arg("--redis-url")
                .arg(redis_url)
                .arg("--node-id")
                .arg(node_id(i))
                .arg("--cluster-lease-ms")
                .arg(lease)
                .arg("--claude-bin")
                .arg(example_bin("fake_claude"));
            f(i, cmd);
        })
    }

    /// Node `i`; panics when it was killed.
    pub fn node(&self, i: usize) -> &TestServer {
        self.nodes[i]
            .as_ref()
            .unwrap_or_else(|| panic!("{} was killed", node_id(i)))
    }

    /// Alice's token, a project dir and a new Claude session of hers, made
    /// on node `i` (the token is valid on every node: one secret).
    pub async fn alice_session(&self, i: usize) -> (String, tempfile::TempDir, String) {
        self.node(i).alice_session().await
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// SIGKILLs node `i` (waited for); its data dir is handed back.
    pub fn kill(&mut self, i: usize) -> tempfile::TempDir {
        self.nodes[i]
            .take()
            .unwrap_or_else(|| panic!("{} was killed already", node_id(i)))
            .kill_keep_data()
    }

    /// Starts node `i` again with the same id on `data` (from [`Self::kill`]).
    pub fn restart(&mut self, i: usize, data: tempfile::TempDir) {
        assert!(self.nodes[i].is_none(), "{} is running", node_id(i));
        let node = self.spawn_node(i, data, &|_, _| {});
        self.nodes[i] = Some(node);
    }

    /// Everything every node logged, each line prefixed with its id (for failure messages).
    pub fn logs(&self) -> String {
        let mut out = String::new();
        for (i, node) in self.nodes.iter().enumerate() {
            if let Some(node) = node {
                for line in node.logs().lines() {
                    out.push_str(&format!("[{}] {line}\n", node_id(i)));
                }
            }
        }
        out
    }
}
