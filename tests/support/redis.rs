//! A real `redis-server` per test: its own process on a free loopback port,
//! in a temp dir of its own, with nothing persisted (`--save ""
//! --appendonly no`), so a test can SIGKILL it and start it again on the
//! same port (clients reconnect to the same URL) with an empty dataset, as
//! after a real crash without persistence.
//!
//! Redis has no `--port 0`: a free port is picked (bound and released) and
//! the server started on it; when another process took the port in between
//! and the server exits on the bind failure, another port is tried.
//!
//! When `redis-server` is not on the PATH, the first test installs Debian's
//! `redis-server` package with apt-get when running as root; otherwise, or
//! when that fails, every Redis test FAILS naming the package. Nothing is
//! skipped. Only std and libc, so unit tests of the crates can include this
//! file by `#[path]` like `postgres.rs`.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// How long a started server may take to answer PING.
const START_WAIT: Duration = Duration::from_secs(30);
/// Ports tried before giving up when others keep taking them.
const PORT_TRIES: usize = 20;

/// The `redis-server` executable, installed first when missing (see module doc).
fn redis_server_bin() -> PathBuf {
    static BIN: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(bin) = find_on_path("redis-server") {
            return Ok(bin);
        }
        install_debian_redis()?;
        find_on_path("redis-server").ok_or_else(|| {
            "Debian's `redis-server` package installed, yet no `redis-server` on the PATH".into()
        })
    })
    .clone()
    .unwrap_or_else(|missing| {
        panic!(
            "the cluster tests need a real Redis: {missing}. Install Debian's `redis-server` \
             package (apt-get install redis-server) or put `redis-server` on the PATH"
        )
    })
}

fn find_on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/bin"), PathBuf::from("/usr/sbin")])
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

fn install_debian_redis() -> Result<(), String> {
    if unsafe { libc::geteuid() } != 0 || !Path::new("/usr/bin/apt-get").exists() {
        return Err(
            "`redis-server` is not installed and this is not root with apt-get to install \
             Debian's `redis-server` package"
                .into(),
        );
    }
    for args in [
        &["update", "-q"][..],
        &[
            "install",
            "-y",
            "-q",
            "--no-install-recommends",
            "redis-server",
        ][..],
    ] {
        let out = Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("apt-get {args:?}: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "apt-get {args:?} failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
    }
    Ok(())
}

/// A port nobody listens on right now (the kernel's pick, released at once).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind 127.0.0.1:0 to find a free port")
}

/// One `redis-server` of one test. Killed (SIGKILL) and its dir removed when dropped.
pub struct TestRedis {
    child: Option<Child>,
    port: u16,
    dir: PathBuf,
    /// How many times it was started (names the log files).
    starts: u32,
}

impl TestRedis {
    /// Starts a fresh server; panics (naming what is missing) when it cannot.
    pub fn start() -> TestRedis {
        let bin = redis_server_bin();
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "agentgate-test-redis-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        let mut redis = TestRedis {
            child: None,
            port: 0,
            dir,
            starts: 0,
        };
        let mut failures = Vec::new();
        for _ in 0..PORT_TRIES {
            redis.port = free_port();
            match redis.spawn(&bin) {
                Ok(()) => return redis,
                Err(e) => failures.push(e),
            }
        }
        panic!("redis-server did not start on any of {PORT_TRIES} free ports: {failures:#?}");
    }

    /// `redis://127.0.0.1:PORT`, for `--redis-url`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGKILL, waited for: the port is closed when this returns.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port, empty (nothing was persisted).
    /// Panics when the port was taken meanwhile or the server does not answer.
    pub fn restart(&mut self) {
        self.kill();
        let bin = redis_server_bin();
        // A port just released may still be held by a socket in TIME_WAIT of
        // a client; redis sets SO_REUSEADDR, so this only retries for a
        // foreign listener, briefly.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match self.spawn(&bin) {
                Ok(()) => return,
                Err(e) if Instant::now() >= deadline => {
                    panic!(
                        "redis-server did not start again on port {}: {e}",
                        self.port
                    )
                }
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    /// Spawns on `self.port` and waits for PING; Err when it exited (e.g. the
    /// port was taken) or never answered, with its log.
    fn spawn(&mut self, bin: &Path) -> Result<(), String> {
        self.starts += 1;
        let log = self.dir.join(format!("redis-{}.log", self.starts));
        let log_file =
            std::fs::File::create(&log).map_err(|e| format!("{}: {e}", log.display()))?;
        let mut child = Command::new(bin)
            .arg("--port")
            .arg(self.port.to_string())
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(["--daemonize", "no", "--protected-mode", "yes"])
            .arg("--dir")
            .arg(&self.dir)
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().map_err(|e| e.to_string())?)
            .stderr(log_file)
            .spawn()
            .map_err(|e| format!("spawn {}: {e}", bin.display()))?;
        let deadline = Instant::now() + START_WAIT;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(format!(
                    "redis-server on port {} exited with {status}: {}",
                    self.port,
                    std::fs::read_to_string(&log).unwrap_or_default().trim()
                ));
            }
            if self.command(&["PING"]).as_deref() == Ok("PONG") {
                self.child = Some(child);
                return Ok(());
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "redis-server on port {} did not answer PING within {START_WAIT:?}: {}",
                    self.port,
                    std::fs::read_to_string(&log).unwrap_or_default().trim()
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Whether the server answers PING now.
    pub fn alive(&self) -> bool {
        self.command(&["PING"]).as_deref() == Ok("PONG")
    }

    /// One command over a fresh connection (RESP), for tests to look at what
    /// the gateways stored. The reply flattened to text: a simple string,
    /// bulk string or integer as is, nil as "(nil)", an array as its items
    /// one per line; a Redis error reply is an Err.
    pub fn command(&self, args: &[&str]) -> Result<String, String> {
        let mut stream = TcpStream::connect(("127.0.0.1", self.port)).map_err(|e| e.to_string())?;
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .map_err(|e| e.to_string())?;
        let mut req = format!("*{}\r\n", args.len()).into_bytes();
        for a in args {
            req.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
            req.extend_from_slice(a.as_bytes());
            req.extend_from_slice(b"\r\n");
        }
        stream.write_all(&req).map_err(|e| e.to_string())?;
        let mut reader = BufReader::new(stream);
        read_reply(&mut reader)
    }
}

/// One RESP2 reply, flattened (see [`TestRedis::command`]).
fn read_reply(r: &mut impl BufRead) -> Result<String, String> {
    let mut line = String::new();
    r.read_line(&mut line).map_err(|e| e.to_string())?;
    let line = line.trim_end_matches(['\r', '\n']);
    let (kind, rest) = line.split_at(line.len().min(1));
    match kind {
        "+" | ":" => Ok(rest.to_string()),
        "-" => Err(rest.to_string()),
        "$" => {
            let len: i64 = rest
                .parse()
                .map_err(|_| format!("bad bulk length {rest:?}"))?;
            if len < 0 {
                return Ok("(nil)".into());
            }
            let mut buf = vec![0; len as usize + 2];
            r.read_exact(&mut buf).map_err(|e| e.to_string())?;
            buf.truncate(len as usize);
            Ok(String::from_utf8_lossy(&buf).into_owned())
        }
        "*" => {
            let n: i64 = rest
                .parse()
                .map_err(|_| format!("bad array length {rest:?}"))?;
            let mut items = Vec::new();
            for _ in 0..n.max(0) {
                items.push(read_reply(r)?);
            }
            Ok(items.join("\n"))
        }
        _ => Err(format!("unexpected reply line {line:?}")),
    }
}

impl Drop for TestRedis {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
