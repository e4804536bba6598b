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
//! Sends: [`TerminatePty`] to PtySessions.
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
use super::pty_session::{PtyClosed, PtyParams, PtySession, TerminatePty, TerminateReason};
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
#[rtype(result = "Result<Launched, String>")]
pub struct LaunchPty {
    pub owner: i64,
    pub key: String,
    pub spec: LaunchSpec,
    pub socket: SocketHandle,
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
            actor = "PtyHub",
            detach_secs = self.detach_timeout().as_secs(),
            "actor started"
        );
    }

    fn stopped(&mut self, _ctx: &mut Self::Context) {
        tracing::info!(
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
    type Result = Result<Launched, String>;

    fn handle(&mut self, msg: LaunchPty, ctx: &mut Self::Context) -> Self::Result {
        if self.shutting_down {
            return Err("Gateway is shutting down".to_string());
        }
        let slot = (msg.owner, msg.key);
        if self.live(&slot).is_some() {
            return Ok(Launched::Existing);
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
            format!("Failed to start terminal: {err}")
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
        }
    }
}

impl Handler<ShutdownPtys> for PtyHub {
    type Result = ResponseFuture<()>;

    fn handle(&mut self, _: ShutdownPtys, _ctx: &mut Self::Context) -> Self::Result {
        self.shutting_down = true;
        let live: Vec<Addr<PtySession>> =
            self.sessions.drain().map(|(_, (_, addr))| addr).collect();
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

impl Handler<LivePtys> for PtyHub {
    type Result = usize;

    fn handle(&mut self, _: LivePtys, _ctx: &mut Self::Context) -> usize {
        self.sessions.retain(|_, (_, addr)| addr.connected());
        self.sessions.len()
    }
}
