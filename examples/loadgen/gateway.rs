//! The gateway under test: a real `agentgate serve` child process on
//! 127.0.0.1:0 with its own temp data dir, started fresh for each scenario
//! so its peak RSS (VmHWM) belongs to that scenario alone.
//!
//! `LOADGEN_GATEWAY_WRAP="valgrind --tool=callgrind ..."` starts the gateway
//! under a tool (then ignore its RSS and speed, count its instructions).
//! `LOADGEN_PERF=<file>` attaches `perf record -g` (cpu-clock) to each
//! gateway started (run one scenario, or the file is overwritten).

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// How long the gateway gets to print its `listening on` line.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// After SIGTERM, how long before SIGKILL when stopping the gateway.
const STOP_GRACE: Duration = Duration::from_secs(5);
/// Gateway stderr lines kept for error messages.
const LOG_TAIL_LINES: usize = 200;

/// Where the binaries under test live (by default next to this example).
#[derive(Clone, Debug)]
pub struct Bins {
    pub agentgate: PathBuf,
    pub fake_claude: PathBuf,
    pub echo_plugin: PathBuf,
}

impl Bins {
    /// `dir` is the profile dir (`target/release`); the example lives in `dir/examples`.
    pub fn in_dir(dir: &Path) -> Bins {
        Bins {
            agentgate: dir.join("agentgate"),
            fake_claude: dir.join("examples").join("fake_claude"),
            echo_plugin: dir.join("examples").join("echo_plugin"),
        }
    }

    /// The profile dir of the running loadgen (`target/<profile>/examples/loadgen`).
    pub fn beside_self() -> Bins {
        let exe = std::env::current_exe().unwrap_or_default();
        let dir = exe
            .parent()
            .and_then(Path::parent)
            .map(Path::to_path_buf)
            .unwrap_or_default();
        Bins::in_dir(&dir)
    }

    pub fn check(&self) -> Result<(), String> {
        for p in [&self.agentgate, &self.fake_claude] {
            if !p.is_file() {
                return Err(format!(
                    "{} not found; build with `cargo build --release --bins --examples` or pass --bin-dir",
                    p.display()
                ));
            }
        }
        Ok(())
    }
}

/// What a cluster-mode node is started with.
pub struct ClusterNode<'a> {
    /// The PostgreSQL database every node shares.
    pub database_url: &'a str,
    pub redis_url: &'a str,
    /// `AGENTGATE_JWT_SECRET` of every node.
    pub secret: &'a str,
    pub node_id: &'a str,
    pub lease_ms: u64,
}

pub struct Gateway {
    child: Child,
    /// `perf record` attached to the gateway when `LOADGEN_PERF=<file>` is set.
    perf: Option<Child>,
    pub addr: SocketAddr,
    /// Removed when the gateway is dropped.
    _data: tempfile::TempDir,
    pub token: String,
    logs: Arc<Mutex<VecDeque<String>>>,
}

impl Gateway {
    /// Starts a gateway; `prepare` may write into the data dir first
    /// (plugins) and add flags.
    pub fn start(
        bins: &Bins,
        prepare: impl FnOnce(&Path, &mut Command),
    ) -> Result<Gateway, String> {
        Gateway::start_as(bins, None, prepare)
    }

    /// A node in cluster mode (`--redis-url`, `--node-id`, the shared
    /// database and JWT secret); the token works on every node.
    pub fn start_node(bins: &Bins, node: &ClusterNode<'_>) -> Result<Gateway, String> {
        Gateway::start_as(bins, Some(node), |_, _| {})
    }

    fn start_as(
        bins: &Bins,
        node: Option<&ClusterNode<'_>>,
        prepare: impl FnOnce(&Path, &mut Command),
    ) -> Result<Gateway, String> {
        let data = tempfile::tempdir().map_err(|e| format!("temp dir: {e}"))?;
        if let Some(node) = node {
            // The token command signs with the data dir's secret: the shared one.
            use std::os::unix::fs::PermissionsExt;
            let file = data.path().join("jwt-secret");
            std::fs::write(&file, node.secret).map_err(|e| format!("jwt-secret: {e}"))?;
            std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600))
                .map_err(|e| format!("jwt-secret: {e}"))?;
        }
        let token = token(bins, data.path(), node.map(|n| n.database_url), "bench")?;
        // `LOADGEN_GATEWAY_WRAP="valgrind --tool=callgrind"` runs the gateway under a tool.
        let wrap = std::env::var("LOADGEN_GATEWAY_WRAP").unwrap_or_default();
        let mut words = wrap.split_whitespace();
        let mut cmd = match words.next() {
            Some(tool) => {
                let mut c = Command::new(tool);
                c.args(words).arg(&bins.agentgate);
                c
            }
            None => Command::new(&bins.agentgate),
        };
        if let Some(node) = node {
            cmd.arg("--database-url").arg(node.database_url);
        }
        cmd.arg("serve")
            .arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--data-dir")
            .arg(data.path())
            .arg("--claude-bin")
            .arg(&bins.fake_claude)
            // Every scenario runs as one user: its sockets, runs and
            // sessions are far above the per-user defaults.
            .args(["--max-sockets-per-user", "1000000"])
            .args(["--max-runs-per-user", "1000000"])
            .args(["--max-ptys-per-user", "1000000"])
            .args(["--max-sessions-per-minute", "1000000"])
            .env_remove("AGENTGATE_JWT_SECRET")
            .env_remove("AGENTGATE_PLATFORM")
            .env(
                "RUST_LOG",
                std::env::var("LOADGEN_GATEWAY_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(node) = node {
            cmd.env("AGENTGATE_JWT_SECRET", node.secret)
                .arg("--redis-url")
                .arg(node.redis_url)
                .arg("--node-id")
                .arg(node.node_id)
                .arg("--cluster-lease-ms")
                .arg(node.lease_ms.to_string());
        }
        prepare(data.path(), &mut cmd);
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("spawn {}: {e}", bins.agentgate.display()))?;
        let logs = Arc::new(Mutex::new(VecDeque::new()));
        if let Some(stderr) = child.stderr.take() {
            let sink = logs.clone();
            let echo = std::env::var_os("LOADGEN_ECHO_LOGS").is_some();
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    if echo {
                        eprintln!("[gateway] {line}");
                    }
                    if let Ok(mut l) = sink.lock() {
                        if l.len() >= LOG_TAIL_LINES {
                            l.pop_front();
                        }
                        l.push_back(line);
                    }
                }
            });
        }
        let stdout = child.stdout.take().ok_or("gateway stdout not piped")?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(stdout);
            let mut line = String::new();
            let _ = reader.read_line(&mut line);
            let _ = tx.send(line);
            // Keep draining so the gateway never blocks on a full pipe.
            let mut rest = Vec::new();
            let _ = reader.read_to_end(&mut rest);
        });
        let perf = std::env::var_os("LOADGEN_PERF").and_then(|out| {
            Command::new("perf")
                .args(["record", "-e", "cpu-clock", "-F", "1999", "-g", "-o"])
                .arg(out)
                .arg("-p")
                .arg(child.id().to_string())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .ok()
        });
        let mut gw = Gateway {
            child,
            perf,
            addr: "127.0.0.1:0".parse().map_err(|_| "addr")?,
            _data: data,
            token,
            logs,
        };
        let line = rx
            .recv_timeout(START_TIMEOUT)
            .map_err(|_| format!("gateway did not start:\n{}", gw.log_tail()))?;
        gw.addr = line
            .trim()
            .strip_prefix("listening on http://")
            .and_then(|a| a.parse().ok())
            .ok_or_else(|| format!("unexpected gateway stdout {line:?}:\n{}", gw.log_tail()))?;
        Ok(gw)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log_tail(&self) -> String {
        self.logs
            .lock()
            .map(|l| l.iter().cloned().collect::<Vec<_>>().join("\n"))
            .unwrap_or_default()
    }

    /// Current resident set in KiB.
    /// Client ports of the connections the gateway holds now.
    pub fn client_ports(&self) -> std::collections::HashSet<u16> {
        crate::conns::client_ports(self.pid(), self.addr.port())
    }

    /// The same, as a closure a spawned task can own.
    pub fn clone_ports_probe(&self) -> impl Fn() -> std::collections::HashSet<u16> {
        let (pid, port) = (self.pid(), self.addr.port());
        move || crate::conns::client_ports(pid, port)
    }

    pub fn rss_kib(&self) -> u64 {
        status_kib(self.pid(), "VmRSS:")
    }

    /// Peak resident set since start in KiB.
    pub fn hwm_kib(&self) -> u64 {
        status_kib(self.pid(), "VmHWM:")
    }

    /// CPU time (user + system) of the gateway so far, in seconds.
    pub fn cpu_secs(&self) -> f64 {
        cpu_secs(self.pid())
    }

    pub fn ws_url(&self, path: &str) -> String {
        format!("ws://{}{}", self.addr, path)
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// `POST /api/providers/sessions` for claude in `project`.
    pub async fn create_session(&self, project: &Path) -> Result<String, String> {
        let client = awc::Client::builder()
            .timeout(Duration::from_secs(20))
            .finish();
        let mut res = client
            .post(self.url("/api/providers/sessions"))
            .bearer_auth(&self.token)
            .send_json(&json!({"provider": "claude", "projectPath": project}))
            .await
            .map_err(|e| format!("create session: {e}"))?;
        let body: Value = res
            .json()
            .await
            .map_err(|e| format!("create session body: {e}"))?;
        body["data"]["sessionId"]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| format!("create session: {body}"))
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if let Some(mut perf) = self.perf.take() {
            // SAFETY: plain kill(2) on our own child; SIGINT makes perf write its file.
            unsafe {
                libc::kill(perf.id() as i32, libc::SIGINT);
            }
            let _ = perf.wait();
        }
        // SAFETY: plain kill(2) on our own child.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let deadline = Instant::now() + STOP_GRACE;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn token(
    bins: &Bins,
    data: &Path,
    database_url: Option<&str>,
    user: &str,
) -> Result<String, String> {
    let mut cmd = Command::new(&bins.agentgate);
    if let Some(url) = database_url {
        cmd.arg("--database-url").arg(url);
    }
    let out = cmd
        .arg("token")
        .arg("--user")
        .arg(user)
        .arg("--data-dir")
        .arg(data)
        .env_remove("AGENTGATE_JWT_SECRET")
        .env("RUST_LOG", "warn")
        .output()
        .map_err(|e| format!("agentgate token: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "agentgate token failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

pub fn status_kib(pid: u32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// utime + stime of a process from /proc/<pid>/stat, in seconds.
pub fn cpu_secs(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the `(comm)`: state is field 3; utime 14, stime 15.
    let rest = stat.rsplit(')').next().unwrap_or("");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    (ticks(11) + ticks(12)) / hz
}
