//! Process handles that cannot hit a reused pid (Linux pidfds).
//!
//! A pid remembered for seconds may belong to another process by the time a
//! signal is sent; a pidfd refers to one process for its whole life, and a
//! signal through it to a process that is gone fails with `ESRCH` instead of
//! reaching a newcomer. A pidfd is also readable once its process has
//! exited, which is how a provider run waits (bounded) for its CLI.

use std::io;
use std::os::fd::OwnedFd;
use std::time::Duration;

use rustix::process::{pidfd_open, pidfd_send_signal, Pid, PidfdFlags, Signal};

/// Opens a pidfd for `pid`. For our own unreaped child this is race-free;
/// for another process the caller checks afterwards (in /proc) that it is
/// still the process it meant.
pub fn open(pid: i32) -> io::Result<OwnedFd> {
    let pid = Pid::from_raw(pid)
        .filter(|_| pid > 0)
        .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
    Ok(pidfd_open(pid, PidfdFlags::empty())?)
}

/// Sends `signal` to the process behind `fd`; `Ok` also when it is gone.
pub fn signal(fd: &OwnedFd, signal: Signal) -> io::Result<()> {
    match pidfd_send_signal(fd, signal) {
        Ok(()) | Err(rustix::io::Errno::SRCH) => Ok(()),
        Err(err) => Err(err.into()),
    }
}

/// Waits until the process behind `fd` has exited (it is not reaped), at
/// most `limit`; true if it exited.
pub async fn exited_within(fd: &OwnedFd, limit: Duration) -> bool {
    tokio::time::timeout(limit, exited(fd)).await.is_ok()
}

/// Waits until the process behind `fd` has exited.
pub async fn exited(fd: &OwnedFd) {
    let waited = async {
        let dup = fd.try_clone()?;
        // SAFETY: `dup` is an OwnedFd moved into the AsyncFd: it stays open
        // and refers to the same pidfd for the AsyncFd's whole life.
        let ready = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(dup, tokio::io::Interest::READABLE)
        }
        .map_err(|e| io::Error::other(e.to_string()))?;
        let _ = ready.readable().await?;
        io::Result::Ok(())
    };
    if waited.await.is_err() {
        // Not pollable (cannot happen on Linux 5.3+): never report an exit
        // that did not happen; the callers' bounds still apply.
        std::future::pending::<()>().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[actix_rt::test]
    async fn a_pidfd_sees_the_exit_and_signals_nobody_after_it() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let fd = open(child.id() as i32).unwrap();
        assert!(!exited_within(&fd, Duration::from_millis(50)).await);
        signal(&fd, Signal::KILL).unwrap();
        assert!(exited_within(&fd, Duration::from_secs(10)).await);
        let _ = child.wait();
        // Reaped: the pid may be reused, the pidfd still means the dead process.
        signal(&fd, Signal::KILL).unwrap();
    }
}
