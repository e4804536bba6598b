//! A one-shot timer with microsecond resolution (a timerfd under tokio's
//! reactor). tokio's timers tick in whole milliseconds, too coarse for the
//! stdout reader's batching wait (50 us; see `provider_run`), and a thread
//! sleep would stop the registry that shares the reader's thread.

use std::io;
use std::os::fd::OwnedFd;
use std::time::Duration;

use rustix::time::{
    timerfd_create, timerfd_settime, Itimerspec, TimerfdClockId, TimerfdFlags, TimerfdTimerFlags,
    Timespec,
};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

pub struct FineTimer {
    fd: AsyncFd<OwnedFd>,
}

impl FineTimer {
    /// A disarmed timer on the current tokio reactor (one descriptor).
    pub fn new() -> io::Result<FineTimer> {
        let fd = timerfd_create(
            TimerfdClockId::Monotonic,
            TimerfdFlags::NONBLOCK | TimerfdFlags::CLOEXEC,
        )?;
        // SAFETY: `fd` is an OwnedFd moved into the AsyncFd: it stays open
        // and refers to the same timerfd for the AsyncFd's whole life.
        let fd = unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }
            .map_err(|e| io::Error::other(e.to_string()))?;
        Ok(FineTimer { fd })
    }

    /// Waits `d` (at once for zero: a zero `it_value` would disarm the timer).
    pub async fn sleep(&self, d: Duration) -> io::Result<()> {
        if d.is_zero() {
            return Ok(());
        }
        let zero = Timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        let spec = Itimerspec {
            it_interval: zero,
            it_value: Timespec {
                tv_sec: d.as_secs() as _,
                tv_nsec: d.subsec_nanos() as _,
            },
        };
        timerfd_settime(self.fd.get_ref(), TimerfdTimerFlags::empty(), &spec)?;
        loop {
            let mut ready = self.fd.readable().await?;
            let mut expirations = [0u8; 8];
            match rustix::io::read(self.fd.get_ref(), &mut expirations) {
                Ok(_) => return Ok(()),
                Err(rustix::io::Errno::AGAIN) => ready.clear_ready(),
                Err(e) => return Err(e.into()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[tokio::test]
    async fn waits_at_least_its_duration_and_can_be_reused() {
        let timer = FineTimer::new().unwrap();
        for micros in [150u64, 0, 400] {
            let d = Duration::from_micros(micros);
            let start = Instant::now();
            timer.sleep(d).await.unwrap();
            let took = start.elapsed();
            assert!(took >= d, "{micros} us: woke after {took:?}");
            // A missed wake-up would hang here instead; bound it.
            assert!(took < Duration::from_secs(5), "{micros} us: {took:?}");
        }
    }
}
