//! What the kill paths read from `/proc`: processes that left their
//! parent's process group (a CLI's detached tools, a shell's jobs) are found
//! here, by parent or by session.

/// A process as `/proc/<pid>/stat` describes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stat {
    pub pid: i32,
    pub ppid: i32,
    pub session: i32,
    /// Exited but not reaped: nothing left to kill.
    pub zombie: bool,
}

/// The stat of one process, if it exists.
pub fn stat(pid: i32) -> Option<Stat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces and parentheses; the
    // fields after it start after the last ')': state ppid pgrp session ...
    let mut fields = text.get(text.rfind(')')? + 1..)?.split_whitespace();
    let state = fields.next()?;
    let ppid = fields.next()?.parse().ok()?;
    let session = fields.nth(1)?.parse().ok()?;
    Some(Stat {
        pid,
        ppid,
        session,
        zombie: state == "Z",
    })
}

/// Every process readable now.
pub fn all() -> Vec<Stat> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(stat)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_our_own_stat() {
        let me = stat(std::process::id() as i32).expect("own stat");
        assert_eq!(me.ppid, std::os::unix::process::parent_id() as i32);
        // A session whose leader lives outside our pid namespace (a CI
        // container started without a session of its own) reads as 0, which
        // getsid cannot return as a Pid; a session of our own must match.
        if me.session > 0 {
            assert_eq!(
                Some(me.session),
                rustix::process::getsid(None)
                    .ok()
                    .map(|p| p.as_raw_nonzero().get())
            );
        } else {
            assert_eq!(me.session, 0);
        }
        assert!(!me.zombie);
        assert!(all().iter().any(|s| s.pid == me.pid));
    }
}
