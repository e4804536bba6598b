//! Which TCP connections a process holds open, from /proc (shared by the
//! loadgen and the integration tests: "did the gateway drop this client?").

use std::collections::HashSet;

/// Client ports of the TCP connections to `port` that process `pid` holds
/// a descriptor for (from /proc/net/tcp and /proc/<pid>/fd).
pub fn client_ports(pid: u32, port: u16) -> HashSet<u16> {
    let inodes: HashSet<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.filter_map(Result::ok)
                .filter_map(|e| std::fs::read_link(e.path()).ok())
                .filter_map(|l| {
                    let l = l.to_string_lossy().into_owned();
                    Some(l.strip_prefix("socket:[")?.strip_suffix(']')?.to_string())
                })
                .collect()
        })
        .unwrap_or_default();
    let mut out = HashSet::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let text = std::fs::read_to_string(table).unwrap_or_default();
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            let port_of =
                |a: &str| u16::from_str_radix(a.rsplit(':').next().unwrap_or(""), 16).ok();
            if f.len() > 9 && port_of(f[1]) == Some(port) && inodes.contains(f[9]) {
                out.extend(port_of(f[2]));
            }
        }
    }
    out
}
