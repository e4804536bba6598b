//! The reconnect policy of Claude Code's `SessionsWebSocket` (seed 001),
//! as a state machine without I/O, so it can be tested close code by close
//! code.
//!
//! Exactly the seed's rules:
//! - 4003 (unauthorized) is permanent: no reconnect.
//! - 4001 (session not found) is retried at most [`ReconnectPolicy::session_not_found_retries`]
//!   times, after `delay × n` for the n-th retry.
//! - Any other close of a connection that had opened is retried after
//!   `delay`, at most [`ReconnectPolicy::max_attempts`] times.
//! - A connection that never opened (refused at the upgrade, e.g. HTTP 404
//!   or 401, or unreachable) is final.
//! - Both counters reset whenever a connection opens. So, as in the seed, a
//!   server that accepts and then closes each time is redialled without end;
//!   what stops the client is a refused upgrade or 4003.

use std::time::Duration;

/// The seed's settings (2 s, 5 attempts, 3 retries of 4001, ping every 30 s).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReconnectPolicy {
    pub delay: Duration,
    pub max_attempts: u32,
    pub session_not_found_retries: u32,
    pub ping_interval: Duration,
}

impl Default for ReconnectPolicy {
    fn default() -> Self {
        ReconnectPolicy {
            delay: Duration::from_millis(2000),
            max_attempts: 5,
            session_not_found_retries: 3,
            ping_interval: Duration::from_millis(30_000),
        }
    }
}

/// Why a session stopped reconnecting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FinalClose {
    /// Closed with a permanent code (4003: the token was refused, revoked or expired).
    Permanent(u16),
    /// 4001 more often than the retry budget allows.
    SessionNotFound,
    /// The connection never opened (the upgrade was refused or the server unreachable).
    NeverOpened,
    /// [`ReconnectPolicy::max_attempts`] reconnects without an open in between.
    AttemptsExhausted,
}

/// What to do after a close.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Reconnect { after: Duration },
    Stop(FinalClose),
}

/// The policy's counters for one session.
#[derive(Debug, Clone)]
pub struct PolicyState {
    policy: ReconnectPolicy,
    attempts: u32,
    not_found_retries: u32,
}

impl PolicyState {
    pub fn new(policy: ReconnectPolicy) -> Self {
        PolicyState {
            policy,
            attempts: 0,
            not_found_retries: 0,
        }
    }

    pub fn policy(&self) -> &ReconnectPolicy {
        &self.policy
    }

    /// A connection opened: both budgets are full again.
    pub fn on_open(&mut self) {
        self.attempts = 0;
        self.not_found_retries = 0;
    }

    /// A connection closed with `code` (`None`: no close frame, e.g. the
    /// network dropped, 1006); `opened` says whether it had opened.
    pub fn on_close(&mut self, code: Option<u16>, opened: bool) -> Decision {
        if code == Some(4003) {
            return Decision::Stop(FinalClose::Permanent(4003));
        }
        if code == Some(4001) {
            self.not_found_retries += 1;
            if self.not_found_retries > self.policy.session_not_found_retries {
                return Decision::Stop(FinalClose::SessionNotFound);
            }
            return Decision::Reconnect {
                after: self.policy.delay * self.not_found_retries,
            };
        }
        if !opened {
            return Decision::Stop(FinalClose::NeverOpened);
        }
        if self.attempts >= self.policy.max_attempts {
            return Decision::Stop(FinalClose::AttemptsExhausted);
        }
        self.attempts += 1;
        Decision::Reconnect {
            after: self.policy.delay,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TWO: Duration = Duration::from_secs(2);

    fn state() -> PolicyState {
        PolicyState::new(ReconnectPolicy::default())
    }

    #[test]
    fn four_thousand_three_is_permanent_even_right_after_an_open() {
        let mut s = state();
        s.on_open();
        assert_eq!(
            s.on_close(Some(4003), true),
            Decision::Stop(FinalClose::Permanent(4003))
        );
    }

    #[test]
    fn four_thousand_one_backs_off_linearly_three_times_then_stops() {
        let mut s = state();
        s.on_open();
        let decisions: Vec<Decision> = (0..4).map(|_| s.on_close(Some(4001), false)).collect();
        assert_eq!(
            decisions,
            [
                Decision::Reconnect { after: TWO },
                Decision::Reconnect { after: TWO * 2 },
                Decision::Reconnect { after: TWO * 3 },
                Decision::Stop(FinalClose::SessionNotFound),
            ]
        );
    }

    #[test]
    fn an_open_resets_the_four_thousand_one_budget() {
        let mut s = state();
        for _ in 0..10 {
            s.on_open();
            assert_eq!(
                s.on_close(Some(4001), true),
                Decision::Reconnect { after: TWO }
            );
        }
    }

    #[test]
    fn other_closes_after_an_open_reconnect_after_two_seconds() {
        for code in [
            None,
            Some(1000),
            Some(1001),
            Some(1006),
            Some(1011),
            Some(4008),
        ] {
            let mut s = state();
            s.on_open();
            assert_eq!(
                s.on_close(code, true),
                Decision::Reconnect { after: TWO },
                "{code:?}"
            );
        }
    }

    #[test]
    fn a_connection_that_never_opened_is_final() {
        let mut s = state();
        s.on_open();
        assert_eq!(
            s.on_close(Some(1006), true),
            Decision::Reconnect { after: TWO }
        );
        // The reconnect is refused at the upgrade (404, 401) or unreachable.
        assert_eq!(
            s.on_close(None, false),
            Decision::Stop(FinalClose::NeverOpened)
        );
    }

    #[test]
    fn five_attempts_without_an_open_in_between_exhaust_the_budget() {
        let mut s = state();
        s.on_open();
        for _ in 0..5 {
            assert_eq!(
                s.on_close(Some(1006), true),
                Decision::Reconnect { after: TWO }
            );
        }
        assert_eq!(
            s.on_close(Some(1006), true),
            Decision::Stop(FinalClose::AttemptsExhausted)
        );
    }
}
