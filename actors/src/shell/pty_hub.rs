//! `PtyHub`: the registry of live PTYs, one actor per gateway.
//!
//! Owns: the map (user id, session key) → live [`PtySession`] with the
//! PTY's id, and the id counter. Keying by user keeps one user's terminal
//! out of another user's reach even when their keys are equal.
//!
//! Handles: [`LookupPty`] (the live PTY for a key; with `replace` it kills
//! that PTY first, for login commands and `forceRestart`), [`LaunchPty`]
//! (starts a PtySession unless one appeared for the key meanwhile),
//! [`PtyClosed`] (from a stopping PtySession; removes the entry only if it
//! is still that PTY's, so a replaced PTY's late end never removes its
//! successor), [`ShutdownPtys`] (kills every PTY and refuses new ones),
//! [`LivePtys`].
//!
//! Sends: [`TerminatePty`] to PtySessions; in cluster mode [`ReleasePty`]
//! to the [`PtyPlacement`] when a key's PTY is gone.
//!
//! Stops: with the actor system. PtySessions are independent actors, so a
//! panic in one never reaches the hub or another PTY; a PtySession that
//! dies without a `PtyClosed` is dropped from the map when its address is
//! found disconnected.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;

use super::launch::LaunchSpec;
use super::placement::{PtyPlacement, ReleasePty};
use super::pty_session::{
    DescribePty, PtyClosed, PtyInfo, PtyParams, PtySession, TerminatePty, TerminateReason,
};
use super::{ShellLimits, SocketHandle};
use crate::config::GatewayConfig;

/// Sent by a ShellSocket on `init`: the live PTY for the key, if any. With
/// `replace` an existing PTY is killed and removed and `None` is returned.
#[derive(Message, Debug)]
#[rtype(result = "Option<(u64, Addr<PtySession>)>")]
pub struct LookupPty {
    pub owner: i64,
    pub key: String,
    pub replace: bool,
}

/// Sent by a ShellSocket after validating an `init` with no live PTY:
/// start one with `socket` attached.
#[derive(Message, Debug)]
#[rtype(result = "Result<Launched, LaunchError>")]
pub struct LaunchPty {
    pub owner: i64,
    pub key: String,
    pub spec: LaunchSpec,
    pub socket: SocketHandle,
}

/// Why [`LaunchPty`] started nothing; the text is the client's `error` frame.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error("Gateway is shutting down")]
    ShuttingDown,
    #[error("Failed to start terminal: {0}")]
    Spawn(#[source] std::io::Error),
    #[error("Too many terminals: {0} of this user are open (--max-ptys-per-user); close one (exit its shell) first")]
    TooMany(usize),
}

#[derive(Debug)]
pub enum Launched {
    /// A new PTY with the socket attached.
    Started(u64, Addr<PtySession>),
    /// Another socket started one for this key meanwhile: look it up again.
    Existing,
}

/// Sent by the binary's shutdown sequence: kill every PTY (their sockets
/// are closed with 1001) and refuse new ones. Resolves once every
/// PtySession has killed its process session.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct ShutdownPtys;

/// Number of live PTYs (diagnostics and tests).
#[derive(Message, Debug)]
#[rtype(result = "usize")]
pub struct LivePtys;

pub struct PtyHub {
    config: Arc<GatewayConfig>,
    limits: ShellLimits,
    /// Live PTYs; an entry is removed on `PtyClosed` with the same id, on
    /// replacement, or when found disconnected.
    sessions: HashMap<(i64, String), (u64, Addr<PtySession>)>,
    next_id: u64,
    shutting_down: bool,
    /// Cluster mode: told when a key's PTY is gone.
    placement: Option<Addr<PtyPlacement>>,
}

impl PtyHub {
    pub fn new(config: Arc<GatewayConfig>) -> Self {
        Self::with_limits(config, ShellLimits::default())
    }

    pub fn with_limits(config: Arc<GatewayConfig>, limits: ShellLimits) -> Self {
        PtyHub {
            config,
            limits,
            sessions: HashMap::new(),
            next_id: 1,
            shutting_down: false,
            placement: None,
        }
    }

    /// Cluster mode: terminals' keys are placed through `placement`.
    pub fn with_placement(mut self, placement: Option<Addr<PtyPlacement>>) -> Self {
        self.placement = placement;
        self
    }

    /// The key has no PTY here any more: other nodes may open it.
    fn released(&self, (owner, key): &(i64, String)) {
        if let Some(placement) = &self.placement {
            placement.do_send(ReleasePty {
                owner: *owner,
                key: key.clone(),
            });
        }
    }

    fn detach_timeout(&self) -> Duration {
        self.config.shell_detach
    }

    /// The live entry for a key, dropping one whose actor is gone.
    fn live(&mut self, slot: &(i64, String)) -> Option<(u64, Addr<PtySession>)> {
        match self.sessions.get(slot) {
            Some((id, addr)) if addr.connected() => Some((*id, addr.clone())),
            Some(_) => {
                self.sessions.remove(slot);
                self.released(slot);
                None
            }
            None => None,
        }
    }
}

impl Actor for PtyHub {
    type Context = Context<Self>;

    fn started(&mut self, _ctx: &mut Self::Context) {
        tracing::info!(
            event = "actor.started",
            actor = "PtyHub",
            detach_secs = self.detach_timeout().as_secs(),
            "actor started"
        );
    }

    fn stopped(&mut self, _ctx: &mut Self::Context) {
        tracing::info!(
            event = "actor.stopped",
            actor = "PtyHub",
            live = self.sessions.len(),
            reason = "system stopping",
            "actor stopped"
        );
    }
}

impl Handler<LookupPty> for PtyHub {
    type Result = Option<(u64, Addr<PtySession>)>;

    fn handle(&mut self, msg: LookupPty, _ctx: &mut Self::Context) -> Self::Result {
        let slot = (msg.owner, msg.key);
        let live = self.live(&slot)?;
        if msg.replace {
            self.sessions.remove(&slot);
            tracing::info!(actor = "PtyHub", key = %slot.1, pty = live.0, "replacing terminal (login command or forceRestart)");
            live.1.do_send(TerminatePty {
                reason: TerminateReason::Replaced,
            });
            return None;
        }
        Some(live)
    }
}

impl Handler<LaunchPty> for PtyHub {
    type Result = Result<Launched, LaunchError>;

    fn handle(&mut self, msg: LaunchPty, ctx: &mut Self::Context) -> Self::Result {
        if self.shutting_down {
            return Err(LaunchError::ShuttingDown);
        }
        let slot = (msg.owner, msg.key);
        if self.live(&slot).is_some() {
            return Ok(Launched::Existing);
        }
        // Detached PTYs count too: each lives until its detach timeout.
        let open = self
            .sessions
            .iter()
            .filter(|((owner, _), (_, addr))| *owner == slot.0 && addr.connected())
            .count();
        if open >= self.config.limits.ptys_per_user {
            tracing::warn!(
                actor = "PtyHub",
                owner = slot.0,
                open,
                "terminal refused: too many for this user"
            );
            return Err(LaunchError::TooMany(open));
        }
        let id = self.next_id;
        self.next_id += 1;
        let session = PtySession::spawn(PtyParams {
            id,
            owner: slot.0,
            key: slot.1.clone(),
            spec: msg.spec,
            first: msg.socket,
            hub: ctx.address().recipient(),
            limits: self.limits,
            detach_timeout: self.detach_timeout(),
        })
        .map_err(|err| {
            tracing::warn!(actor = "PtyHub", key = %slot.1, error = %err, "terminal failed to start");
            LaunchError::Spawn(err)
        })?;
        let addr = session.start();
        self.sessions.insert(slot, (id, addr.clone()));
        Ok(Launched::Started(id, addr))
    }
}

impl Handler<PtyClosed> for PtyHub {
    type Result = ();

    fn handle(&mut self, msg: PtyClosed, _ctx: &mut Self::Context) {
        let slot = (msg.owner, msg.key);
        if self
            .sessions
            .get(&slot)
            .is_some_and(|(id, _)| *id == msg.pty)
        {
            self.sessions.remove(&slot);
            self.released(&slot);
        }
    }
}

impl Handler<ShutdownPtys> for PtyHub {
    type Result = ResponseFuture<()>;

    fn handle(&mut self, _: ShutdownPtys, _ctx: &mut Self::Context) -> Self::Result {
        self.shutting_down = true;
        let drained: Vec<_> = self.sessions.drain().collect();
        let mut live = Vec::with_capacity(drained.len());
        for (slot, (_, addr)) in drained {
            self.released(&slot);
            live.push(addr);
        }
        tracing::info!(
            actor = "PtyHub",
            live = live.len(),
            "shutdown: killing every terminal"
        );
        Box::pin(async move {
            let kills = live.iter().map(|addr| {
                addr.send(TerminatePty {
                    reason: TerminateReason::Shutdown,
                })
            });
            futures_util::future::join_all(kills).await;
        })
    }
}

/// Admin snapshot: every live terminal, described by its own actor.
#[derive(Message, Debug)]
#[rtype(result = "Vec<PtyInfo>")]
pub struct ListPtys;

impl Handler<ListPtys> for PtyHub {
    type Result = ResponseFuture<Vec<PtyInfo>>;

    fn handle(&mut self, _: ListPtys, _: &mut Self::Context) -> Self::Result {
        let live: Vec<Addr<PtySession>> = self
            .sessions
            .values()
            .map(|(_, addr)| addr.clone())
            .collect();
        Box::pin(async move {
            let asks = live.iter().map(|addr| addr.send(DescribePty));
            let mut list: Vec<PtyInfo> = futures_util::future::join_all(asks)
                .await
                .into_iter()
                .filter_map(Result::ok)
                .collect();
            list.sort_by_key(|p| p.id);
            list
        })
    }
}

/// Admin action: kill the terminal with this id; false when there is none.
#[derive(Message, Debug)]
#[rtype(result = "bool")]
pub struct KillPty {
    pub id: u64,
}

impl Handler<KillPty> for PtyHub {
    type Result = bool;

    fn handle(&mut self, msg: KillPty, _: &mut Self::Context) -> bool {
        let Some((_, addr)) = self.sessions.values().find(|(id, _)| *id == msg.id) else {
            return false;
        };
        addr.do_send(TerminatePty {
            reason: TerminateReason::Admin,
        });
        true
    }
}

impl Handler<LivePtys> for PtyHub {
    type Result = usize;

    fn handle(&mut self, _: LivePtys, _ctx: &mut Self::Context) -> usize {
        self.sessions.retain(|_, (_, addr)| addr.connected());
        self.sessions.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shell::launch::{build_launch, InitRequest};
    use crate::shell::{PtyEnded, PtyOutput};
    use serde_json::json;
    use std::time::Instant;

    /// A socket that ignores everything.
    struct Quiet;
    impl Actor for Quiet {
        type Context = Context<Self>;
    }
    impl Handler<PtyOutput> for Quiet {
        type Result = ();
        fn handle(&mut self, _: PtyOutput, _: &mut Self::Context) {}
    }
    impl Handler<PtyEnded> for Quiet {
        type Result = ();
        fn handle(&mut self, _: PtyEnded, _: &mut Self::Context) {}
    }

    fn socket(id: u64) -> SocketHandle {
        let addr = Quiet.start();
        SocketHandle {
            id,
            output: addr.clone().recipient(),
            ended: addr.recipient(),
        }
    }

    fn launch(owner: i64, session: &str, socket_id: u64) -> LaunchPty {
        let dir = std::env::temp_dir();
        let req = InitRequest::parse(
            &json!({"projectPath": dir, "sessionId": session, "initialCommand": "exec sleep 987654"}),
        )
        .unwrap();
        LaunchPty {
            owner,
            key: req.key(),
            spec: build_launch(&req, dir.clone(), None, &GatewayConfig::for_tests(dir)).unwrap(),
            socket: socket(socket_id),
        }
    }

    fn key(session: &str) -> String {
        let dir = std::env::temp_dir();
        InitRequest::parse(
            &json!({"projectPath": dir, "sessionId": session, "initialCommand": "exec sleep 987654"}),
        )
        .unwrap()
        .key()
    }

    async fn until(what: &str, mut cond: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !cond() {
            assert!(Instant::now() < deadline, "timed out: {what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Processes of this test (its PTYs run `sleep 987654`).
    fn test_sleepers() -> usize {
        std::fs::read_dir("/proc")
            .map(|entries| {
                entries
                    .filter_map(Result::ok)
                    .filter(|e| {
                        std::fs::read(e.path().join("cmdline"))
                            .is_ok_and(|c| c == b"sleep\0987654\0")
                    })
                    .count()
            })
            .unwrap_or(0)
    }

    #[actix_rt::test]
    async fn keys_are_per_user_replacement_is_clean_and_shutdown_kills_all() {
        let dir = std::env::temp_dir();
        let hub = PtyHub::new(Arc::new(GatewayConfig::for_tests(dir))).start();

        let Ok(Launched::Started(a_id, a)) = hub.send(launch(1, "k", 1)).await.unwrap() else {
            panic!("first launch")
        };
        // Same key, other user: a separate PTY. Same key, same user: "look it up".
        assert!(matches!(
            hub.send(launch(2, "k", 2)).await.unwrap(),
            Ok(Launched::Started(..))
        ));
        assert!(matches!(
            hub.send(launch(1, "k", 3)).await.unwrap(),
            Ok(Launched::Existing)
        ));
        assert_eq!(hub.send(LivePtys).await.unwrap(), 2);
        let found = hub
            .send(LookupPty {
                owner: 1,
                key: key("k"),
                replace: false,
            })
            .await
            .unwrap();
        assert_eq!(found.map(|(id, _)| id), Some(a_id));

        // Replacement: the old PTY is removed at once; its late PtyClosed
        // must not remove the new one registered under the same key.
        let replaced = hub
            .send(LookupPty {
                owner: 1,
                key: key("k"),
                replace: true,
            })
            .await
            .unwrap();
        assert!(replaced.is_none());
        let Ok(Launched::Started(b_id, _)) = hub.send(launch(1, "k", 4)).await.unwrap() else {
            panic!("launch after replace")
        };
        assert_ne!(a_id, b_id);
        until("replaced PTY stopped", || !a.connected()).await;
        let found = hub
            .send(LookupPty {
                owner: 1,
                key: key("k"),
                replace: false,
            })
            .await
            .unwrap();
        assert_eq!(found.map(|(id, _)| id), Some(b_id));

        // Shutdown: every PTY's process dies and new launches are refused.
        until("both PTYs running", || test_sleepers() == 2).await;
        hub.send(ShutdownPtys).await.unwrap();
        assert_eq!(hub.send(LivePtys).await.unwrap(), 0);
        until("every PTY killed", || test_sleepers() == 0).await;
        assert!(hub.send(launch(1, "k2", 5)).await.unwrap().is_err());
    }
}
