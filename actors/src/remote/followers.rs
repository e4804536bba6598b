//! `Followers`: where remote-session sockets that closed left off.
//!
//! Claude Code's remote-session client reconnects with the same URL and no
//! cursor, and it shows every message it is sent (it dedupes nothing). So
//! when a remote socket closes, it leaves a resume point here (the seq after
//! which its client needs everything again, see
//! [`Renderer::resume_point`](super::sdk::Renderer::resume_point)); a socket
//! of the same user and session that opens within [`RESUME_WINDOW`] claims
//! the newest one and continues from there. A socket that finds none is a
//! new follower and gets the run from its start.
//!
//! **Owns** the resume points. **Handles** [`Claim`], [`Leave`]. **Sends**
//! nothing. **Bounds**: at most [`MAX_POINTS_PER_SESSION`] points per (user,
//! session), each kept [`RESUME_WINDOW`]; expired ones are swept on every
//! message. **Stops** with the system.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use actix::prelude::*;

/// A closed socket's point is claimable this long: the seed's client
/// reconnects 2 s after a close, up to 5 times (4001: 2, 4, 6 s).
pub const RESUME_WINDOW: Duration = Duration::from_secs(60);
/// Points kept per (user, session); the oldest is forgotten first.
pub const MAX_POINTS_PER_SESSION: usize = 8;

type Key = (i64, String);

/// Where a closed socket left off.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResumePoint {
    /// Its client needs everything after this seq.
    pub after: u64,
    /// The run whose `init` its client was sent (not sent again).
    pub init_of: Option<String>,
}

/// Takes the newest resume point of a closed socket of this user and session.
#[derive(Message)]
#[rtype(result = "Option<ResumePoint>")]
pub struct Claim {
    pub user_id: i64,
    pub session_id: String,
}

/// A remote socket closed; its client needs what comes after `point`.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Leave {
    pub user_id: i64,
    pub session_id: String,
    pub point: ResumePoint,
}

#[derive(Default)]
pub struct Followers {
    points: HashMap<Key, VecDeque<(ResumePoint, Instant)>>,
}

impl Followers {
    fn sweep(&mut self) {
        let now = Instant::now();
        self.points.retain(|_, points| {
            points.retain(|(_, at)| now.duration_since(*at) < RESUME_WINDOW);
            !points.is_empty()
        });
    }
}

impl Actor for Followers {
    type Context = Context<Self>;

    fn started(&mut self, _: &mut Self::Context) {
        tracing::info!(
            event = "actor.started",
            actor = "Followers",
            "actor started"
        );
    }
}

impl Handler<Claim> for Followers {
    type Result = Option<ResumePoint>;

    fn handle(&mut self, msg: Claim, _: &mut Self::Context) -> Option<ResumePoint> {
        self.sweep();
        let key = (msg.user_id, msg.session_id);
        let points = self.points.get_mut(&key)?;
        let resume = points.pop_back().map(|(point, _)| point);
        if points.is_empty() {
            self.points.remove(&key);
        }
        resume
    }
}

impl Handler<Leave> for Followers {
    type Result = ();

    fn handle(&mut self, msg: Leave, _: &mut Self::Context) {
        self.sweep();
        let points = self
            .points
            .entry((msg.user_id, msg.session_id))
            .or_default();
        if points.len() >= MAX_POINTS_PER_SESSION {
            points.pop_front();
        }
        points.push_back((msg.point, Instant::now()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[actix_rt::test]
    async fn the_newest_point_of_the_same_user_and_session_is_claimed_once() {
        let f = Followers::default().start();
        let leave = |user_id, session: &str, after| Leave {
            user_id,
            session_id: session.into(),
            point: ResumePoint {
                after,
                init_of: None,
            },
        };
        let claim = |user_id, session: &str| Claim {
            user_id,
            session_id: session.into(),
        };
        f.send(leave(1, "s", 4)).await.unwrap();
        f.send(leave(1, "s", 9)).await.unwrap();
        assert_eq!(f.send(claim(2, "s")).await.unwrap(), None, "another user");
        assert_eq!(
            f.send(claim(1, "t")).await.unwrap(),
            None,
            "another session"
        );
        let after = |p: Option<ResumePoint>| p.map(|p| p.after);
        assert_eq!(after(f.send(claim(1, "s")).await.unwrap()), Some(9));
        assert_eq!(after(f.send(claim(1, "s")).await.unwrap()), Some(4));
        assert_eq!(f.send(claim(1, "s")).await.unwrap(), None);
        for i in 0..20 {
            f.send(leave(1, "s", i)).await.unwrap();
        }
        let mut claimed = 0;
        while f.send(claim(1, "s")).await.unwrap().is_some() {
            claimed += 1;
        }
        assert_eq!(claimed, MAX_POINTS_PER_SESSION);
    }
}
