//! `UserLimits`: the per-user limits that are not owned by another actor.
//!
//! **Owns** the number of open sockets of each user (`/ws`, `/shell`,
//! `/plugin-ws/{name}`, remote-session sockets) and the times of each
//! user's recent session creations.
//!
//! **Handles** [`AdmitSocket`] (a [`SocketTicket`], or a refusal once the
//! user has `sockets_per_user` open), [`ReleaseSocket`] (sent by a
//! ticket's `Drop`), [`AdmitSession`] (refused with the wait once the
//! user created `sessions_per_minute` in the last minute).
//!
//! **Sends** nothing. Counts that belong to other actors stay there: runs
//! per user in the RunRegistry, PTYs per user in the PtyHub.
//!
//! **Bounds**: one counter per user with an open socket; at most
//! `sessions_per_minute` instants per user that created a session within
//! the last minute (older ones are dropped on every check and by a sweep).

use std::collections::{HashMap, VecDeque};
use std::pin::Pin;
use std::task::{Context as TaskContext, Poll};
use std::time::{Duration, Instant};

use actix::prelude::*;
use futures_util::Stream;

/// Per-user limits, each a flag of `agentgate serve` (defaults below).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Open WebSockets per user (`--max-sockets-per-user`).
    pub sockets_per_user: usize,
    /// Runs running at once per user (`--max-runs-per-user`).
    pub runs_per_user: usize,
    /// Live PTYs per user, attached or detached (`--max-ptys-per-user`).
    pub ptys_per_user: usize,
    /// Entries of one `chat.subscribe` frame (`--max-subscribe-entries`).
    pub subscribe_entries: usize,
    /// Sessions one user may create per minute (`--max-sessions-per-minute`).
    pub sessions_per_minute: usize,
}

/// The flags' defaults.
pub const DEFAULT_LIMITS: Limits = Limits {
    sockets_per_user: 64,
    runs_per_user: 8,
    ptys_per_user: 16,
    subscribe_entries: 256,
    sessions_per_minute: 30,
};

impl Default for Limits {
    fn default() -> Self {
        DEFAULT_LIMITS
    }
}

/// The window of `sessions_per_minute`.
const SESSION_WINDOW: Duration = Duration::from_secs(60);

pub struct UserLimits {
    limits: Limits,
    sockets: HashMap<i64, usize>,
    sessions: HashMap<i64, VecDeque<Instant>>,
}

impl UserLimits {
    pub fn new(limits: Limits) -> Self {
        UserLimits {
            limits,
            sockets: HashMap::new(),
            sessions: HashMap::new(),
        }
    }
}

impl Actor for UserLimits {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        // Users who stopped creating sessions are forgotten.
        ctx.run_interval(SESSION_WINDOW, |act, _| {
            let now = Instant::now();
            act.sessions.retain(|_, times| {
                times.retain(|t| now.duration_since(*t) < SESSION_WINDOW);
                !times.is_empty()
            });
        });
        tracing::info!(actor = "UserLimits", limits = ?self.limits, "actor started");
    }
}

/// Asks to open one more socket for a user: a ticket to keep while it is
/// open, or `Err(limit)`.
#[derive(Message)]
#[rtype(result = "Result<SocketTicket, usize>")]
pub struct AdmitSocket {
    pub user_id: i64,
}

/// A socket of the user closed (a ticket dropped).
#[derive(Message)]
#[rtype(result = "()")]
pub struct ReleaseSocket {
    pub user_id: i64,
}

/// Asks to create one more session: `Err(wait)` when the user created
/// `sessions_per_minute` within the last minute.
#[derive(Message)]
#[rtype(result = "Result<(), Duration>")]
pub struct AdmitSession {
    pub user_id: i64,
}

/// Holds one of a user's socket places; dropping it gives it back.
pub struct SocketTicket {
    user_id: i64,
    limiter: Addr<UserLimits>,
}

impl Drop for SocketTicket {
    fn drop(&mut self) {
        // do_send ignores the mailbox bound: a release is never lost.
        self.limiter.do_send(ReleaseSocket {
            user_id: self.user_id,
        });
    }
}

impl Handler<AdmitSocket> for UserLimits {
    type Result = Result<SocketTicket, usize>;

    fn handle(&mut self, msg: AdmitSocket, ctx: &mut Self::Context) -> Self::Result {
        let open = self.sockets.entry(msg.user_id).or_default();
        if *open >= self.limits.sockets_per_user {
            return Err(self.limits.sockets_per_user);
        }
        *open += 1;
        Ok(SocketTicket {
            user_id: msg.user_id,
            limiter: ctx.address(),
        })
    }
}

impl Handler<ReleaseSocket> for UserLimits {
    type Result = ();

    fn handle(&mut self, msg: ReleaseSocket, _: &mut Self::Context) {
        if let Some(open) = self.sockets.get_mut(&msg.user_id) {
            *open = open.saturating_sub(1);
            if *open == 0 {
                self.sockets.remove(&msg.user_id);
            }
        }
    }
}

impl Handler<AdmitSession> for UserLimits {
    type Result = Result<(), Duration>;

    fn handle(&mut self, msg: AdmitSession, _: &mut Self::Context) -> Self::Result {
        let now = Instant::now();
        let times = self.sessions.entry(msg.user_id).or_default();
        times.retain(|t| now.duration_since(*t) < SESSION_WINDOW);
        if times.len() >= self.limits.sessions_per_minute {
            let oldest = times.front().copied().unwrap_or(now);
            return Err(SESSION_WINDOW.saturating_sub(now.duration_since(oldest)));
        }
        times.push_back(now);
        Ok(())
    }
}

/// A socket's inbound byte stream carrying its ticket: the place is given
/// back when the socket actor drops its stream (it stopped, or the client
/// went away), without the actor knowing about limits.
pub struct Ticketed<S> {
    inner: S,
    _ticket: SocketTicket,
}

impl<S> Ticketed<S> {
    pub fn new(inner: S, ticket: SocketTicket) -> Self {
        Ticketed {
            inner,
            _ticket: ticket,
        }
    }
}

impl<S: Stream + Unpin> Stream for Ticketed<S> {
    type Item = S::Item;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Option<S::Item>> {
        Pin::new(&mut self.inner).poll_next(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(sockets: usize, sessions: usize) -> Limits {
        Limits {
            sockets_per_user: sockets,
            sessions_per_minute: sessions,
            ..Limits::default()
        }
    }

    #[actix_rt::test]
    async fn sockets_are_counted_per_user_and_given_back_on_drop() {
        let limiter = UserLimits::new(limits(2, 1)).start();
        let a1 = limiter
            .send(AdmitSocket { user_id: 1 })
            .await
            .unwrap()
            .unwrap();
        let _a2 = limiter
            .send(AdmitSocket { user_id: 1 })
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            limiter
                .send(AdmitSocket { user_id: 1 })
                .await
                .unwrap()
                .err(),
            Some(2)
        );
        // Another user has places of their own.
        let _b = limiter
            .send(AdmitSocket { user_id: 2 })
            .await
            .unwrap()
            .unwrap();
        drop(a1);
        assert!(limiter
            .send(AdmitSocket { user_id: 1 })
            .await
            .unwrap()
            .is_ok());
    }

    #[actix_rt::test]
    async fn sessions_per_minute_say_how_long_to_wait() {
        let limiter = UserLimits::new(limits(1, 2)).start();
        let admit = |user_id| limiter.send(AdmitSession { user_id });
        assert!(admit(1).await.unwrap().is_ok());
        assert!(admit(1).await.unwrap().is_ok());
        let wait = admit(1).await.unwrap().unwrap_err();
        assert!(
            wait <= SESSION_WINDOW && wait > Duration::from_secs(59),
            "{wait:?}"
        );
        assert!(admit(2).await.unwrap().is_ok());
    }
}
