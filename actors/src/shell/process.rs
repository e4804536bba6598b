//! Killing a PTY child together with everything it started.
//!
//! The child is a session leader (pty-process calls `setsid`), so its pid is
//! also its session id and process group id. An interactive shell puts each
//! job in its own process group, so killing the child's group is not enough
//! (`sleep 1000 &` would survive); every process whose session is the
//! child's is killed. Only a process that called `setsid` itself (a daemon)
//! leaves the session, as it would leave a closed terminal.

/// SIGKILLs the session `sid`: its leader's process group, then every
/// process still in the session. Two passes catch a fork that raced the
/// first one.
pub fn kill_session(sid: i32) {
    if sid <= 1 {
        return;
    }
    for _ in 0..2 {
        // SAFETY: kill(2) has no memory-safety preconditions; a negative
        // pid addresses the process group.
        unsafe {
            libc::kill(-sid, libc::SIGKILL);
        }
        for pid in session_members(sid) {
            // SAFETY: as above.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
        }
    }
}

/// Pids of the live (not zombie) processes in session `sid`.
pub fn session_members(sid: i32) -> Vec<i32> {
    crate::procfs::all()
        .into_iter()
        .filter(|p| p.session == sid && !p.zombie)
        .map(|p| p.pid)
        .collect()
}

/// Kills the session when dropped: the owner of a PTY child holds one, so
/// even an actor that panics leaves no orphans behind.
#[derive(Debug)]
pub struct SessionGuard {
    sid: i32,
    armed: bool,
}

impl SessionGuard {
    pub fn new(sid: i32) -> Self {
        Self { sid, armed: true }
    }

    /// Kills now (idempotent).
    pub fn kill(&mut self) {
        if self.armed {
            self.armed = false;
            kill_session(self.sid);
        }
    }
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        self.kill();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::CommandExt;
    use std::time::{Duration, Instant};

    fn alive(pid: i32) -> bool {
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Ok(stat) => !stat
                .rsplit(')')
                .next()
                .unwrap_or("")
                .trim_start()
                .starts_with('Z'),
            Err(_) => false,
        }
    }

    #[test]
    fn kills_jobs_in_other_process_groups_of_the_session() {
        // A session leader that starts a job in its own process group (as an
        // interactive shell does) and reports the job's pid.
        let mut cmd = std::process::Command::new("bash");
        cmd.args(["-c", "set -m; sleep 300 & echo $!; wait"])
            .stdout(std::process::Stdio::piped());
        // SAFETY: setsid is async-signal-safe.
        unsafe {
            cmd.pre_exec(|| {
                libc::setsid();
                Ok(())
            });
        }
        let mut child = cmd.spawn().expect("spawn bash");
        let sid = child.id() as i32;
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.take().unwrap()),
            &mut line,
        )
        .unwrap();
        let job: i32 = line.trim().parse().expect("job pid");
        assert_eq!(crate::procfs::stat(job).map(|p| p.session), Some(sid));
        assert!(session_members(sid).contains(&job));

        let mut guard = SessionGuard::new(sid);
        guard.kill();
        let _ = child.wait();
        let deadline = Instant::now() + Duration::from_secs(10);
        while alive(job) {
            assert!(Instant::now() < deadline, "job {job} survived");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}
