//! The token a connection was opened with, watched while it is open: the
//! connection ends at the token's expiry, or at the first check (every
//! heartbeat interval) that finds the user's token version moved past the
//! token's (`agentgate token --revoke`, a password change) or the user gone.
//! `/ws` and `/shell` close with 1008, remote-session sockets with 4003.

use std::time::{Duration, SystemTime};

use actix::prelude::*;

use crate::store::{self, Store};

/// Close code of a `/ws` or `/shell` socket whose token expired or was revoked.
pub const CLOSE_TOKEN_INVALID: u16 = 1008;

/// What the binary knows of a connection's token. Platform mode has no
/// token: [`TokenWatch::none`] never ends anything.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenWatch {
    pub user_id: i64,
    /// When the token stops being valid.
    pub expires: Option<SystemTime>,
    /// The token version the token carries; a newer one in the database
    /// revokes it.
    pub version: Option<i64>,
}

impl TokenWatch {
    /// No token (platform mode): nothing to watch.
    pub fn none(user_id: i64) -> TokenWatch {
        TokenWatch {
            user_id,
            expires: None,
            version: None,
        }
    }

    /// Runs `end` once the token stops being valid (see the module doc).
    /// A database error is no proof of revocation: the next check decides.
    pub fn start<A, C>(
        self,
        ctx: &mut C,
        store: &Store,
        interval: Duration,
        end: fn(&mut A, &mut C, &'static str),
    ) where
        A: Actor<Context = C>,
        C: AsyncContext<A> + 'static,
    {
        if let Some(expires) = self.expires {
            let left = expires
                .duration_since(SystemTime::now())
                .unwrap_or_default();
            ctx.run_later(left, move |act, ctx| end(act, ctx, "token expired"));
        }
        let Some(version) = self.version else {
            return;
        };
        let (store, user_id) = (store.clone(), self.user_id);
        ctx.run_interval(interval, move |act, ctx| {
            let store = store.clone();
            let check =
                async move { store::blocking(&store, move |s| s.token_version(user_id)).await };
            ctx.spawn(check.into_actor(act).map(move |current, act, ctx| {
                let revoked = match current {
                    Ok(Some(current)) => current > version,
                    Ok(None) => true,
                    Err(_) => false,
                };
                if revoked {
                    end(act, ctx, "token revoked");
                }
            }));
        });
    }
}
