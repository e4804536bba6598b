//! Process handles that cannot hit a reused pid (Linux pidfds).
//!
//! A pid remembered for seconds may belong to another process by the time a
//! signal is sent; a pidfd refers to one process for its whole life, and a
//! signal through it to a process that is gone fails with `ESRCH` instead of
//! reaching a newcomer. A pidfd is also readable once its process has
//! exited, which is how a provider run waits (bounded) for its CLI.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

/// Opens a pidfd for `pid`. For our own unreaped child this is race-free;
/// for another process the caller checks afterwards (in /proc) that it is
/// still the process it meant.
pub fn open(pid: i32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this descriptor to us.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Sends `signal` to the process behind `fd`; `Ok` also when it is gone.
pub fn signal(fd: &OwnedFd, signal: i32) -> io::Result<()> {
    // SAFETY: pidfd_send_signal with a null siginfo is kill(2) on the pidfd.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            fd.as_raw_fd(),
            signal,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    if rc == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::ESRCH) {
        Ok(())
    } else {
        Err(err)
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
        signal(&fd, libc::SIGKILL).unwrap();
        assert!(exited_within(&fd, Duration::from_secs(10)).await);
        let _ = child.wait();
        // Reaped: the pid may be reused, the pidfd still means the dead process.
        signal(&fd, libc::SIGKILL).unwrap();
    }
}
