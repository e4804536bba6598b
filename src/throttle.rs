//! `LoginThrottle`: an actor that owns the failed-login counters, per
//! username and per client address (IPv6 by /64), so that password guessing
//! is slowed down before any hash is computed.
//!
//! Messages: [`CheckLogin`] (may this attempt be hashed at all? else how long
//! to wait), [`LoginFailed`], [`LoginSucceeded`] (clears the username's
//! failures). Rule: after `max` failures within `window`, further attempts
//! are refused until the oldest of them is `window` old; the login route
//! answers 429 with `Retry-After`.
//!
//! Bounded: each key keeps at most `max` timestamps and each table at most
//! [`MAX_KEYS`] keys; when full, expired keys are dropped first, then the key
//! whose last failure is oldest. It never stops (no children, no timers).

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::time::{Duration, Instant};

use actix::{Actor, Context, Handler, Message};

/// Keys per table (usernames, addresses) kept at most.
pub const MAX_KEYS: usize = 10_000;

/// Failures of one kind of key within a sliding window.
struct Window {
    max: usize,
    window: Duration,
    failures: HashMap<String, VecDeque<Instant>>,
}

impl Window {
    fn new(max: u32, window: Duration) -> Window {
        Window {
            max: max.max(1) as usize,
            window,
            failures: HashMap::new(),
        }
    }

    fn expire(&mut self, key: &str, now: Instant) {
        if let Some(times) = self.failures.get_mut(key) {
            while times
                .front()
                .is_some_and(|t| now.duration_since(*t) >= self.window)
            {
                times.pop_front();
            }
            if times.is_empty() {
                self.failures.remove(key);
            }
        }
    }

    /// How long `key` must wait, if it is at its limit.
    fn wait(&mut self, key: &str, now: Instant) -> Option<Duration> {
        self.expire(key, now);
        let times = self.failures.get(key)?;
        if times.len() < self.max {
            return None;
        }
        let oldest = *times.front()?;
        Some(self.window.saturating_sub(now.duration_since(oldest)))
    }

    fn record(&mut self, key: &str, now: Instant) {
        if !self.failures.contains_key(key) && self.failures.len() >= MAX_KEYS {
            let window = self.window;
            self.failures
                .retain(|_, t| t.back().is_some_and(|l| now.duration_since(*l) < window));
            if self.failures.len() >= MAX_KEYS {
                let stalest = self
                    .failures
                    .iter()
                    .min_by_key(|(_, t)| t.back().copied())
                    .map(|(k, _)| k.clone());
                if let Some(k) = stalest {
                    self.failures.remove(&k);
                }
            }
        }
        let times = self.failures.entry(key.to_string()).or_default();
        times.push_back(now);
        while times.len() > self.max {
            times.pop_front();
        }
    }
}

/// The address key: IPv4 as is, IPv6 by its /64 (one host usually owns a /64).
fn address_key(addr: IpAddr) -> String {
    match addr {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => v4.to_string(),
            None => {
                let s = v6.segments();
                format!("{:x}:{:x}:{:x}:{:x}::/64", s[0], s[1], s[2], s[3])
            }
        },
    }
}

pub struct LoginThrottle {
    users: Window,
    addresses: Window,
}

impl LoginThrottle {
    pub fn new(per_user: u32, per_address: u32, window: Duration) -> LoginThrottle {
        LoginThrottle {
            users: Window::new(per_user, window),
            addresses: Window::new(per_address, window),
        }
    }
}

impl Actor for LoginThrottle {
    type Context = Context<Self>;
}

/// May a login for `username` from `addr` be checked now? `Err(wait)` if not.
#[derive(Message)]
#[rtype(result = "Result<(), Duration>")]
pub struct CheckLogin {
    pub username: String,
    pub addr: Option<IpAddr>,
}

/// A login failed (unknown user or wrong password).
#[derive(Message)]
#[rtype(result = "()")]
pub struct LoginFailed {
    pub username: String,
    pub addr: Option<IpAddr>,
}

/// A login succeeded: the username's failures are forgotten (the address's
/// stay, so one address cannot reset its budget with a known account).
#[derive(Message)]
#[rtype(result = "()")]
pub struct LoginSucceeded {
    pub username: String,
}

impl Handler<CheckLogin> for LoginThrottle {
    type Result = Result<(), Duration>;

    fn handle(&mut self, msg: CheckLogin, _: &mut Context<Self>) -> Self::Result {
        let now = Instant::now();
        let by_user = self.users.wait(&msg.username, now);
        let by_addr = msg
            .addr
            .and_then(|a| self.addresses.wait(&address_key(a), now));
        match by_user.into_iter().chain(by_addr).max() {
            Some(wait) => Err(wait),
            None => Ok(()),
        }
    }
}

impl Handler<LoginFailed> for LoginThrottle {
    type Result = ();

    fn handle(&mut self, msg: LoginFailed, _: &mut Context<Self>) {
        let now = Instant::now();
        self.users.record(&msg.username, now);
        if let Some(addr) = msg.addr {
            self.addresses.record(&address_key(addr), now);
        }
    }
}

impl Handler<LoginSucceeded> for LoginThrottle {
    type Result = ();

    fn handle(&mut self, msg: LoginSucceeded, _: &mut Context<Self>) {
        self.users.failures.remove(&msg.username);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_refuses_after_max_failures_until_the_oldest_expires() {
        let mut w = Window::new(3, Duration::from_secs(60));
        let t0 = Instant::now();
        for i in 0..3 {
            assert_eq!(w.wait("ann", t0 + Duration::from_secs(i)), None);
            w.record("ann", t0 + Duration::from_secs(i));
        }
        let wait = w.wait("ann", t0 + Duration::from_secs(10)).unwrap();
        assert_eq!(wait, Duration::from_secs(50));
        assert_eq!(w.wait("bob", t0), None);
        assert_eq!(w.wait("ann", t0 + Duration::from_secs(60)), None);
    }

    #[test]
    fn tables_stay_bounded() {
        let mut w = Window::new(2, Duration::from_secs(60));
        let t0 = Instant::now();
        for i in 0..(MAX_KEYS + 50) {
            w.record(&format!("user{i}"), t0);
            w.record(&format!("user{i}"), t0);
            w.record(&format!("user{i}"), t0);
        }
        assert_eq!(w.failures.len(), MAX_KEYS);
        assert!(w.failures.values().all(|t| t.len() <= 2));
    }

    #[test]
    fn ipv6_addresses_share_their_64() {
        let a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().unwrap();
        assert_eq!(address_key(a), address_key(b));
        assert_eq!(address_key(mapped), "10.0.0.1");
    }
}
