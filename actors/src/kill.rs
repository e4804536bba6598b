//! Every signal the gateway sends to processes it started by pid or group,
//! in one place and without `unsafe` (rustix's typed `kill`/`killpg`);
//! signals that must not hit a reused pid go through [`crate::pidfd`].
//!
//! Each child runs in a process group (or session) of its own, but a group
//! signal is not always enough, so each family reaches further:
//! - a provider CLI (`ProviderRun`): its own session; its descendants found
//!   with [`descendants_in`] and the members of its session are tracked by
//!   pidfd and signalled with the group;
//! - a PTY child ([`kill_session`], [`SessionGuard`]) is a session leader
//!   whose interactive shell puts each job in its own group, so every
//!   process of its session is killed (`sleep 1000 &` would survive a group
//!   kill). Only a process that called `setsid` itself (a daemon) leaves the
//!   session, as it would leave a closed terminal;
//! - a plugin server ([`signal_group`]): its group.
//!
//! A process that is already gone (ESRCH) is not an error: every function
//! here is best effort and idempotent.

use std::collections::HashMap;

pub use rustix::process::Signal;
use rustix::process::{kill_process, kill_process_group, test_kill_process, Pid};

/// Sends `signal` to the process `pid` (ignored for pid 0 or less).
pub fn signal_process(pid: i32, signal: Signal) {
    if let Some(pid) = positive(pid) {
        let _ = kill_process(pid, signal);
    }
}

/// Sends `signal` to the process group `pgid` (ignored for 0 or less).
pub fn signal_group(pgid: i32, signal: Signal) {
    if let Some(pgid) = positive(pgid) {
        let _ = kill_process_group(pgid, signal);
    }
}

/// Whether `pid` exists (a zombie counts: it has not been reaped).
pub fn exists(pid: i32) -> bool {
    positive(pid).is_some_and(|pid| test_kill_process(pid).is_ok())
}

fn positive(pid: i32) -> Option<Pid> {
    if pid > 0 {
        Pid::from_raw(pid)
    } else {
        None
    }
}

/// Every descendant of `root` (children, grandchildren, ...), from `/proc`.
pub fn descendants(root: i32) -> Vec<i32> {
    descendants_in(&crate::procfs::all(), root)
}

/// Every descendant of `root` among `all` (one `/proc` walk, several uses).
pub fn descendants_in(all: &[crate::procfs::Stat], root: i32) -> Vec<i32> {
    let mut children: HashMap<i32, Vec<i32>> = HashMap::new();
    for p in all {
        children.entry(p.ppid).or_default().push(p.pid);
    }
    let mut out = Vec::new();
    let mut stack = vec![root];
    while let Some(pid) = stack.pop() {
        if let Some(kids) = children.get(&pid) {
            for &kid in kids {
                if !out.contains(&kid) {
                    out.push(kid);
                    stack.push(kid);
                }
            }
        }
    }
    out
}

/// SIGKILLs the session `sid`: its leader's process group, then every
/// process still in the session. Two passes catch a fork that raced the
/// first one.
pub fn kill_session(sid: i32) {
    if sid <= 1 {
        return;
    }
    for _ in 0..2 {
        signal_group(sid, Signal::KILL);
        for pid in session_members(sid) {
            signal_process(pid, Signal::KILL);
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
        crate::procfs::stat(pid).is_some_and(|p| !p.zombie)
    }

    /// Waits (bounded) until `pid` is gone or a zombie.
    fn until_dead(pid: i32, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while alive(pid) {
            assert!(Instant::now() < deadline, "{what} {pid} survived");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Reads one line of the child's stdout.
    fn line_of(child: &mut std::process::Child) -> String {
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.take().unwrap()),
            &mut line,
        )
        .unwrap();
        line
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
                rustix::process::setsid()?;
                Ok(())
            });
        }
        let mut child = cmd.spawn().expect("spawn bash");
        let sid = child.id() as i32;
        let job: i32 = line_of(&mut child).trim().parse().expect("job pid");
        assert_eq!(crate::procfs::stat(job).map(|p| p.session), Some(sid));
        assert!(session_members(sid).contains(&job));

        let mut guard = SessionGuard::new(sid);
        guard.kill();
        let _ = child.wait();
        until_dead(job, "job");
    }

    /// A CLI (its own group) whose child starts a grandchild in a session
    /// of its own: the grandchild is in neither the CLI's group nor its
    /// session, and `descendants` must still list it (it failed with the
    /// walk cut to direct children).
    #[test]
    fn descendants_finds_grandchildren_in_other_groups() {
        let mut cmd = std::process::Command::new("sh");
        // A subshell (the middle process) prints the grandchild's pid, and
        // both shells wait for stdin to close.
        cmd.args(["-c", "(setsid sleep 300 & echo $!; read _); read _"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .process_group(0);
        let mut child = cmd.spawn().unwrap();
        let pid = child.id() as i32;
        let grandchild: i32 = line_of(&mut child).trim().parse().expect("pid");
        // `setsid` runs just after the fork: wait until the grandchild has
        // its own session (and so its own group).
        let deadline = Instant::now() + Duration::from_secs(10);
        while crate::procfs::stat(grandchild).map(|p| p.session) != Some(grandchild) {
            assert!(Instant::now() < deadline, "grandchild never left the group");
            std::thread::sleep(Duration::from_millis(10));
        }
        let middle = crate::procfs::stat(grandchild).map(|p| p.ppid);
        assert!(
            middle.is_some_and(|m| m != pid),
            "not a grandchild of {pid}"
        );
        assert!(
            descendants(pid).contains(&grandchild),
            "{grandchild} is not among {pid}'s descendants"
        );
        signal_process(grandchild, Signal::KILL);
        until_dead(grandchild, "grandchild");
        drop(child.stdin.take());
        let _ = child.wait();
    }
}
