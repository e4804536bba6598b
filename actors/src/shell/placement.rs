//! `PtyPlacement`: which node of a cluster runs each terminal (cluster
//! mode, `--redis-url`). A PTY is a process of one node and stays there; a
//! `/shell` `init` for a key whose PTY lives on another node is refused
//! with an error naming that node (the load balancer must keep a client's
//! `/shell` on one node: sticky sessions).
//!
//! Owns: a Redis connection (made on first use, dropped on an error and
//! made again on the next use) and the set of keys this node holds. Each
//! key is `agentgate:pty:{user id}:{session key}` = node id with a TTL of
//! the cluster lease, renewed every third of it while the PTY lives, so a
//! dead node's terminals are released within the lease time.
//!
//! Handles: [`ClaimPty`] (from a ShellSocket before it launches a PTY: the
//! key is set to this node unless another node holds it, which is the
//! answer), [`ReleasePty`] (from the PtyHub when a PTY is gone: deleted if
//! still this node's), [`HeldPtys`] (tests, diagnostics).
//!
//! Sends: nothing to other actors. When Redis cannot be reached a claim
//! answers [`Placement::Unknown`] and the terminal opens locally (an outage
//! must not take terminals away); the held keys are written again by the
//! next renewal once Redis is back (a restarted Redis starts empty).

use std::collections::HashSet;
use std::time::Duration;

use actix::prelude::*;
use redis::aio::MultiplexedConnection;

/// Bound on one Redis round trip; a claim waits at most this long.
const REDIS_TIMEOUT: Duration = Duration::from_secs(1);

/// Set the key to this node unless another node holds it; the holder
/// (this node included) is the answer.
const CLAIM: &str = "local v = redis.call('GET', KEYS[1]) \
    if v == false or v == ARGV[1] then \
      redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2]) return ARGV[1] end \
    return v";
/// Delete the key only if this node holds it.
const RELEASE: &str = "if redis.call('GET', KEYS[1]) == ARGV[1] then \
      return redis.call('DEL', KEYS[1]) end return 0";

/// The Redis key of a terminal.
pub fn pty_key(owner: i64, key: &str) -> String {
    format!("agentgate:pty:{owner}:{key}")
}

/// Where a claimed terminal lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Placement {
    /// On this node: launch it here.
    Here,
    /// On the node with this id: refuse the `init`, naming it.
    Elsewhere(String),
    /// Redis did not answer: launch here (the claim is written by the next
    /// renewal once Redis is back).
    Unknown(String),
}

/// Sent by a ShellSocket before launching a PTY for a key with no live PTY
/// on this node.
#[derive(Message, Debug)]
#[rtype(result = "Placement")]
pub struct ClaimPty {
    pub owner: i64,
    pub key: String,
}

/// Sent by the PtyHub when the key's PTY is gone (or its launch failed).
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct ReleasePty {
    pub owner: i64,
    pub key: String,
}

/// The Redis keys this node holds now.
#[derive(Message, Debug)]
#[rtype(result = "Vec<String>")]
pub struct HeldPtys;

pub struct PtyPlacement {
    client: redis::Client,
    conn: Option<MultiplexedConnection>,
    node: String,
    ttl: Duration,
    held: HashSet<String>,
    renewing: bool,
}

impl PtyPlacement {
    /// Fails on a malformed URL only (an unreachable server is retried on use).
    pub fn new(redis_url: &str, node: &str, ttl: Duration) -> Result<Self, String> {
        let client = redis::Client::open(redis_url).map_err(|e| format!("--redis-url: {e}"))?;
        Ok(PtyPlacement {
            client,
            conn: None,
            node: node.to_string(),
            ttl: ttl.max(Duration::from_millis(300)),
            held: HashSet::new(),
            renewing: false,
        })
    }

    /// The cached connection or a new one, within [`REDIS_TIMEOUT`].
    fn connection(
        &self,
    ) -> impl std::future::Future<Output = Result<MultiplexedConnection, String>> + 'static {
        let cached = self.conn.clone();
        let client = self.client.clone();
        async move {
            if let Some(conn) = cached {
                return Ok(conn);
            }
            let config = redis::AsyncConnectionConfig::new()
                .set_connection_timeout(Some(REDIS_TIMEOUT))
                .set_response_timeout(Some(REDIS_TIMEOUT));
            client
                .get_multiplexed_async_connection_with_config(&config)
                .await
                .map_err(|e| e.to_string())
        }
    }

    fn script(code: &str, key: &str, node: &str, ttl_ms: u64) -> redis::Cmd {
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(code).arg(1).arg(key).arg(node).arg(ttl_ms);
        cmd
    }

    /// Writes every held key again (renewal; also after a Redis restart).
    fn renew(&mut self, ctx: &mut Context<Self>) {
        if self.renewing || self.held.is_empty() {
            return;
        }
        self.renewing = true;
        let connect = self.connection();
        let mut pipe = redis::pipe();
        let ttl_ms = self.ttl.as_millis() as u64;
        for key in &self.held {
            pipe.add_command(Self::script(CLAIM, key, &self.node, ttl_ms));
        }
        let keys: Vec<String> = self.held.iter().cloned().collect();
        let work = async move {
            let mut conn = connect.await?;
            let holders: Vec<String> = pipe
                .query_async(&mut conn)
                .await
                .map_err(|e| e.to_string())?;
            Ok::<_, String>((conn, holders))
        };
        ctx.spawn(work.into_actor(self).map(move |result, act, _| {
            act.renewing = false;
            match result {
                Ok((conn, holders)) => {
                    act.conn = Some(conn);
                    for (key, holder) in keys.iter().zip(holders) {
                        if holder != act.node {
                            // Another node claimed it while Redis had lost ours
                            // (restarted empty); the PTY stays here anyway.
                            tracing::warn!(actor = "PtyPlacement", key = %key, holder = %holder, "terminal key taken by another node");
                        }
                    }
                }
                Err(error) => {
                    act.conn = None;
                    tracing::warn!(actor = "PtyPlacement", %error, "terminal placements not renewed; Redis unreachable");
                }
            }
        }));
    }
}

impl Actor for PtyPlacement {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        tracing::info!(
            event = "actor.started",
            actor = "PtyPlacement",
            node_id = %self.node,
            ttl_ms = self.ttl.as_millis() as u64,
            "actor started"
        );
        ctx.run_interval(self.ttl / 3, |act, ctx| act.renew(ctx));
    }

    fn stopped(&mut self, _ctx: &mut Self::Context) {
        tracing::info!(
            event = "actor.stopped",
            actor = "PtyPlacement",
            held = self.held.len(),
            reason = "system stopping",
            "actor stopped"
        );
    }
}

impl Handler<ClaimPty> for PtyPlacement {
    type Result = ResponseActFuture<Self, Placement>;

    fn handle(&mut self, msg: ClaimPty, _: &mut Self::Context) -> Self::Result {
        let key = pty_key(msg.owner, &msg.key);
        let connect = self.connection();
        let cmd = Self::script(CLAIM, &key, &self.node, self.ttl.as_millis() as u64);
        let work = async move {
            let mut conn = connect.await?;
            let holder: String = cmd
                .query_async(&mut conn)
                .await
                .map_err(|e| e.to_string())?;
            Ok::<_, String>((conn, holder))
        };
        Box::pin(work.into_actor(self).map(move |result, act, _| match result {
            Ok((conn, holder)) => {
                act.conn = Some(conn);
                if holder == act.node {
                    act.held.insert(key);
                    Placement::Here
                } else {
                    Placement::Elsewhere(holder)
                }
            }
            Err(error) => {
                act.conn = None;
                tracing::warn!(actor = "PtyPlacement", key = %key, %error, "terminal placement unknown (Redis unreachable); opening it here");
                act.held.insert(key);
                Placement::Unknown(error)
            }
        }))
    }
}

impl Handler<ReleasePty> for PtyPlacement {
    type Result = ();

    fn handle(&mut self, msg: ReleasePty, ctx: &mut Self::Context) {
        let key = pty_key(msg.owner, &msg.key);
        if !self.held.remove(&key) {
            return;
        }
        let connect = self.connection();
        let cmd = Self::script(RELEASE, &key, &self.node, 0);
        let work = async move {
            let mut conn = connect.await?;
            cmd.query_async::<i64>(&mut conn)
                .await
                .map_err(|e| e.to_string())?;
            Ok::<_, String>(conn)
        };
        ctx.spawn(work.into_actor(self).map(|result, act, _| match result {
            Ok(conn) => act.conn = Some(conn),
            // The key expires by itself within the TTL.
            Err(_) => act.conn = None,
        }));
    }
}

impl Handler<HeldPtys> for PtyPlacement {
    type Result = Vec<String>;

    fn handle(&mut self, _: HeldPtys, _: &mut Self::Context) -> Vec<String> {
        let mut held: Vec<String> = self.held.iter().cloned().collect();
        held.sort();
        held
    }
}

#[cfg(test)]
#[path = "../../../tests/support/redis.rs"]
#[allow(dead_code)]
mod test_redis;

#[cfg(test)]
mod tests {
    use super::test_redis::TestRedis;
    use super::*;

    fn start(redis: &TestRedis, node: &str) -> Addr<PtyPlacement> {
        PtyPlacement::new(&redis.url(), node, Duration::from_millis(600))
            .unwrap()
            .start()
    }

    fn claim(key: &str) -> ClaimPty {
        ClaimPty {
            owner: 7,
            key: key.into(),
        }
    }

    /// Two nodes on a real Redis: the first claim wins, the second names
    /// the holder; a claim again by the holder is still Here; after the
    /// release the other node may take it; renewal keeps a held key past
    /// its TTL and writes it again after Redis restarted empty; a bad URL
    /// is refused at construction.
    #[actix_rt::test]
    async fn claims_name_the_holder_and_renewal_survives_a_redis_restart() {
        let mut redis = TestRedis::start();
        let (a, b) = (start(&redis, "node-a"), start(&redis, "node-b"));
        assert_eq!(a.send(claim("p_default")).await.unwrap(), Placement::Here);
        assert_eq!(
            b.send(claim("p_default")).await.unwrap(),
            Placement::Elsewhere("node-a".into())
        );
        assert_eq!(a.send(claim("p_default")).await.unwrap(), Placement::Here);
        assert_eq!(
            redis
                .command(&["GET", "agentgate:pty:7:p_default"])
                .as_deref(),
            Ok("node-a")
        );
        // Users are apart even with equal keys.
        let other_user = ClaimPty {
            owner: 8,
            key: "p_default".into(),
        };
        assert_eq!(b.send(other_user).await.unwrap(), Placement::Here);

        // Held past several TTLs by renewal (awaited through Redis's own TTL).
        let key = "agentgate:pty:7:p_default";
        let mut renewed = false;
        for _ in 0..100 {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let ttl: i64 = redis.command(&["PTTL", key]).unwrap().parse().unwrap();
            assert!(ttl > 0, "held key expired (PTTL {ttl})");
            if ttl > 450 {
                // Rewritten after its TTL had gone below a third left.
                renewed = true;
            }
        }
        assert!(renewed);

        redis.restart();
        let mut back = false;
        for _ in 0..100 {
            if redis.command(&["GET", key]).as_deref() == Ok("node-a") {
                back = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(
            back,
            "the held key was not written again after Redis restarted"
        );
        assert_eq!(
            b.send(claim("p_default")).await.unwrap(),
            Placement::Elsewhere("node-a".into())
        );

        a.send(ReleasePty {
            owner: 7,
            key: "p_default".into(),
        })
        .await
        .unwrap();
        assert!(a.send(HeldPtys).await.unwrap().is_empty());
        let mut released = false;
        for _ in 0..100 {
            if b.send(claim("p_default")).await.unwrap() == Placement::Here {
                released = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(
            released,
            "node-b could not take the key after node-a released it"
        );

        // Redis gone: the claim answers Unknown (the terminal opens locally).
        redis.kill();
        assert!(matches!(
            a.send(claim("q_default")).await.unwrap(),
            Placement::Unknown(_)
        ));
        assert!(PtyPlacement::new("not a url", "n", Duration::from_secs(1)).is_err());
    }
}
