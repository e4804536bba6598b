//! The machine's PostgreSQL for tests: a fresh database per test, created
//! here and dropped with the [`TestDatabase`]. Shared by the store unit tests
//! (`src/db`, through `#[path]`) and the integration tests, so it uses only
//! diesel and std.
//!
//! The server is 127.0.0.1:5432 with trust auth for user `postgres` (the
//! project's machines run it), or `AGENTGATE_TEST_POSTGRES_URL` (a URL of a
//! database the user may `CREATE DATABASE` from). When it does not answer,
//! the first test starts Debian's cluster, installing the `postgresql`
//! package first when running as root without it; if that fails too, every
//! PostgreSQL test FAILS naming what is missing. Nothing is skipped.

use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use diesel::pg::PgConnection;
use diesel::{Connection, RunQueryDsl};

const DEFAULT_ADMIN_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";
/// How long a freshly started server may take to accept connections.
const START_WAIT: Duration = Duration::from_secs(60);

fn admin_url() -> String {
    std::env::var("AGENTGATE_TEST_POSTGRES_URL").unwrap_or_else(|_| DEFAULT_ADMIN_URL.to_string())
}

/// `url` with its database (the path) replaced by `name`.
fn with_database(url: &str, name: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let authority_end = base
        .find("://")
        .map(|i| i + 3)
        .and_then(|start| base[start..].find('/').map(|j| start + j))
        .unwrap_or(base.len());
    let mut out = format!("{}/{name}", &base[..authority_end]);
    if let Some(q) = query {
        out.push('?');
        out.push_str(q);
    }
    out
}

fn connect(url: &str) -> Result<PgConnection, String> {
    let sep = if url.contains('?') { '&' } else { '?' };
    PgConnection::establish(&format!("{url}{sep}connect_timeout=5")).map_err(|e| e.to_string())
}

fn run(cmd: &mut Command) -> Result<(), String> {
    let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Debian's clusters as `(version, name, pg_hba path)`.
fn debian_clusters() -> Vec<(String, String, String)> {
    let Ok(out) = Command::new("pg_lsclusters").arg("--no-header").output() else {
        return Vec::new();
    };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let (version, name) = (f.first()?, f.get(1)?);
            let hba = format!("/etc/postgresql/{version}/{name}/pg_hba.conf");
            Some((version.to_string(), name.to_string(), hba))
        })
        .collect()
}

/// Starts (installing first, as root, if needed) Debian's PostgreSQL.
fn start_debian_postgres() -> Result<(), String> {
    let mut installed_here = false;
    if debian_clusters().is_empty() {
        if unsafe { libc::geteuid() } != 0 || !Path::new("/usr/bin/apt-get").exists() {
            return Err(
                "no PostgreSQL cluster here and not root with apt-get to install \
                 Debian's `postgresql` package"
                    .into(),
            );
        }
        run(Command::new("apt-get").arg("update").arg("-q"))?;
        run(Command::new("apt-get")
            .args([
                "install",
                "-y",
                "-q",
                "--no-install-recommends",
                "postgresql",
            ])
            .env("DEBIAN_FRONTEND", "noninteractive"))?;
        installed_here = true;
    }
    let clusters = debian_clusters();
    if clusters.is_empty() {
        return Err("`postgresql` is installed but pg_lsclusters lists no cluster".into());
    }
    for (version, name, hba) in &clusters {
        if installed_here {
            // Our own fresh cluster: the tests' user connects over TCP
            // without a password, as on the project's machines.
            let old = std::fs::read_to_string(hba).map_err(|e| format!("{hba}: {e}"))?;
            std::fs::write(hba, format!("host all postgres 127.0.0.1/32 trust\n{old}"))
                .map_err(|e| format!("{hba}: {e}"))?;
        }
        let _ = run(Command::new("pg_ctlcluster").args([
            "--skip-systemctl-redirect",
            version,
            name,
            "start",
        ]));
        if installed_here {
            let _ = run(Command::new("pg_ctlcluster").args([
                "--skip-systemctl-redirect",
                version,
                name,
                "reload",
            ]));
        }
    }
    Ok(())
}

/// Ok once the server answers; the error names what is missing.
fn server() -> Result<(), String> {
    static READY: OnceLock<Result<(), String>> = OnceLock::new();
    READY
        .get_or_init(|| {
            let url = admin_url();
            let first = match connect(&url) {
                Ok(_) => return Ok(()),
                Err(e) => e,
            };
            let started = start_debian_postgres();
            let deadline = Instant::now() + START_WAIT;
            let mut last = first.clone();
            while started.is_ok() && Instant::now() < deadline {
                match connect(&url) {
                    Ok(_) => return Ok(()),
                    Err(e) => last = e,
                }
                std::thread::sleep(Duration::from_millis(250));
            }
            Err(format!(
                "PostgreSQL is not reachable at {url} ({first}); starting it failed: {}; \
                 last error: {last}. The PostgreSQL store tests need Debian's `postgresql` \
                 package running on 127.0.0.1:5432 with trust auth for user postgres \
                 (or AGENTGATE_TEST_POSTGRES_URL)",
                started
                    .err()
                    .unwrap_or_else(|| "it did not answer in time".into())
            ))
        })
        .clone()
}

/// A database of its own for one test, dropped (with its connections) at the end.
pub struct TestDatabase {
    /// `postgres://.../<name>`, for `--database-url` or `Db::open`.
    pub url: String,
    name: String,
}

impl TestDatabase {
    /// Panics, naming what is missing, when PostgreSQL is not there.
    pub fn create() -> TestDatabase {
        if let Err(missing) = server() {
            panic!("{missing}");
        }
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let name = format!(
            "agentgate_test_{}_{}_{nanos}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let admin = admin_url();
        let mut conn = connect(&admin).unwrap_or_else(|e| panic!("PostgreSQL at {admin}: {e}"));
        diesel::sql_query(format!("CREATE DATABASE \"{name}\""))
            .execute(&mut conn)
            .unwrap_or_else(|e| panic!("CREATE DATABASE {name} at {admin}: {e}"));
        TestDatabase {
            url: with_database(&admin, &name),
            name,
        }
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        // FORCE (PostgreSQL 13+) ends the pools' connections still open.
        match connect(&admin_url()) {
            Ok(mut conn) => {
                let drop = format!("DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)", self.name);
                if let Err(e) = diesel::sql_query(drop).execute(&mut conn) {
                    eprintln!("could not drop test database {}: {e}", self.name);
                }
            }
            Err(e) => eprintln!("could not drop test database {}: {e}", self.name),
        }
    }
}
