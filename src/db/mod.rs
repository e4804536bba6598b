//! The database through diesel: SQLite (embedded, the default) or PostgreSQL
//! (`--database-url postgres://...`, for several gateways sharing one
//! database). Queries are written once over [`AnyConnection`], diesel's
//! `MultiConnection` of both; each backend has its own embedded migrations
//! (`migrations/sqlite`, `migrations/postgres`) for the one schema in
//! [`schema`].
//!
//! Diesel is blocking, so nothing here runs on an actor or request thread:
//! HTTP handlers call these functions inside `web::block`, and the actors
//! reach the database through the [`SessionStore`] implementation below,
//! which they call on tokio's blocking pool. Queries are plain functions over
//! `&mut AnyConnection` so they can be tested without HTTP.

pub mod history;
pub mod project;
pub mod schema;

use agentgate_actors::metrics::metrics;
use std::time::Duration;

use agentgate_actors::store::{HistoryEntry, ProjectRef, SessionRow, SessionStore, StoreError};
use diesel::connection::{AnsiTransactionManager, SimpleConnection, TransactionManager};
use diesel::pg::PgConnection;
use diesel::prelude::*;
use diesel::r2d2::{CustomizeConnection, ManageConnection, Pool, PooledConnection, R2D2Connection};
use diesel::sqlite::SqliteConnection;
use diesel_migrations::{embed_migrations, EmbeddedMigrations, MigrationHarness};

use schema::{projects, sessions, users};

pub const SQLITE_MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations/sqlite");
pub const POSTGRES_MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations/postgres");

/// How long a writer waits for SQLite's lock before failing.
const BUSY_TIMEOUT_MS: u32 = 5_000;
/// Connections in the pool: SQLite has one writer; a few readers suffice
/// (and keep a PostgreSQL server's connection count low per gateway).
const POOL_SIZE: u32 = 4;
/// PostgreSQL advisory lock keys: one taken by every [`write_transaction`]
/// (the single-writer rule SQLite's `BEGIN IMMEDIATE` gives), one around
/// migrations (two gateways starting at once apply them once).
const PG_WRITE_LOCK: i64 = 0x6167_6774_7772; // "agtwr"
const PG_MIGRATE_LOCK: i64 = 0x6167_6774_6d67; // "agtmg"

/// A connection to either backend; queries take `&mut AnyConnection`.
#[derive(diesel::MultiConnection)]
pub enum AnyConnection {
    Sqlite(SqliteConnection),
    Postgresql(PgConnection),
}

/// Runs `$body` with `$c` bound to the inner connection of the backend in
/// use: for the few statements diesel's `MultiConnection` cannot express
/// (`RETURNING`, `ON CONFLICT`), written once and compiled for each backend.
macro_rules! per_backend {
    ($conn:expr, |$c:ident| $body:expr) => {
        match $conn {
            $crate::db::AnyConnection::Sqlite($c) => $body,
            $crate::db::AnyConnection::Postgresql($c) => $body,
        }
    };
}
pub(crate) use per_backend;

/// Which database a URL names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

impl Backend {
    /// `postgres://` and `postgresql://` are PostgreSQL; anything else
    /// (`sqlite://path`, a plain path) is a SQLite file.
    pub fn of(url: &str) -> Backend {
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Backend::Postgres
        } else {
            Backend::Sqlite
        }
    }
}

pub type Conn = PooledConnection<Manager>;

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("database: {0}")]
    Query(#[from] diesel::result::Error),
    #[error("database pool: cannot open {path}: {source}")]
    Open {
        path: String,
        #[source]
        source: diesel::ConnectionError,
    },
    #[error("database pool: {0}")]
    Pool(#[from] diesel::r2d2::PoolError),
    #[error("migrations: {0}")]
    Migration(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// Opens connections of the URL's backend (diesel's own manager would try
/// each backend in turn, and SQLite accepts any string as a file name).
#[derive(Debug)]
pub struct Manager {
    url: String,
    backend: Backend,
}

impl Manager {
    fn establish(&self) -> ConnectionResult<AnyConnection> {
        match self.backend {
            Backend::Sqlite => SqliteConnection::establish(&self.url).map(AnyConnection::Sqlite),
            Backend::Postgres => PgConnection::establish(&self.url).map(AnyConnection::Postgresql),
        }
    }
}

impl ManageConnection for Manager {
    type Connection = AnyConnection;
    type Error = diesel::r2d2::Error;

    fn connect(&self) -> Result<AnyConnection, Self::Error> {
        self.establish()
            .map_err(diesel::r2d2::Error::ConnectionError)
    }

    fn is_valid(&self, conn: &mut AnyConnection) -> Result<(), Self::Error> {
        conn.ping().map_err(diesel::r2d2::Error::QueryError)
    }

    fn has_broken(&self, conn: &mut AnyConnection) -> bool {
        std::thread::panicking() || conn.is_broken()
    }
}

#[derive(Debug)]
struct Pragmas;

impl CustomizeConnection<AnyConnection, diesel::r2d2::Error> for Pragmas {
    fn on_acquire(&self, conn: &mut AnyConnection) -> Result<(), diesel::r2d2::Error> {
        // WAL is set once in `Db::open` (it is stored in the file); here only
        // the per-connection settings. The busy timeout makes a concurrent
        // writer wait instead of failing with SQLITE_BUSY.
        let AnyConnection::Sqlite(conn) = conn else {
            return Ok(());
        };
        conn.batch_execute(&format!(
            "PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}; PRAGMA synchronous = NORMAL; \
             PRAGMA foreign_keys = ON;"
        ))
        .map_err(diesel::r2d2::Error::QueryError)
    }
}

/// The connection pool. Cloning shares it.
#[derive(Clone)]
pub struct Db {
    pool: Pool<Manager>,
}

impl Db {
    /// Opens the database at `url` and applies pending migrations:
    /// `postgres://...` (the database must exist), else `sqlite://path` or a
    /// plain path (created if missing).
    pub fn open(url: &str) -> Result<Db, DbError> {
        let backend = Backend::of(url);
        let target = match backend {
            Backend::Sqlite => url.strip_prefix("sqlite://").unwrap_or(url),
            Backend::Postgres => url,
        };
        let manager = Manager {
            url: target.to_string(),
            backend,
        };
        // One connection first: its error names what is wrong at once (the
        // pool would retry until its timeout and keep only the last message).
        let mut first = manager.establish().map_err(|source| DbError::Open {
            path: redact(target),
            source,
        })?;
        if let AnyConnection::Sqlite(first) = &mut first {
            // WAL lets readers run beside the writer. Switched once, on one
            // connection: several pool connections switching at once on a new
            // file fail with "database is locked".
            first
                .batch_execute(&format!(
                    "PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}; PRAGMA journal_mode = WAL;"
                ))
                .map_err(DbError::Query)?;
        }
        drop(first);
        let pool = Pool::builder()
            .max_size(POOL_SIZE)
            .connection_timeout(Duration::from_secs(10))
            .connection_customizer(Box::new(Pragmas))
            .build(manager)?;
        let db = Db { pool };
        db.migrate()?;
        Ok(db)
    }

    /// Applies the embedded migrations of the backend; returns how many ran.
    pub fn migrate(&self) -> Result<usize, DbError> {
        let mut conn = self.conn()?;
        let applied = match &mut *conn {
            AnyConnection::Sqlite(c) => {
                c.run_pending_migrations(SQLITE_MIGRATIONS).map(|v| v.len())
            }
            AnyConnection::Postgresql(c) => {
                c.batch_execute(&format!("SELECT pg_advisory_lock({PG_MIGRATE_LOCK})"))?;
                let applied = c
                    .run_pending_migrations(POSTGRES_MIGRATIONS)
                    .map(|v| v.len());
                c.batch_execute(&format!("SELECT pg_advisory_unlock({PG_MIGRATE_LOCK})"))?;
                applied
            }
        };
        applied.map_err(DbError::Migration)
    }

    pub fn conn(&self) -> Result<Conn, DbError> {
        Ok(self.pool.get()?)
    }
}

/// The URL without its password, for error messages.
fn redact(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("***"));
            u.to_string()
        }
        _ => url.to_string(),
    }
}

/// Runs `f` in a transaction that holds the write lock from its start, so a
/// read-then-write inside it cannot race another writer: SQLite's `BEGIN
/// IMMEDIATE`; on PostgreSQL a transaction-scoped advisory lock every such
/// transaction takes (single statements outside need none).
pub fn write_transaction<T, F>(conn: &mut AnyConnection, f: F) -> Result<T, DbError>
where
    F: FnOnce(&mut AnyConnection) -> Result<T, DbError>,
{
    match conn {
        AnyConnection::Sqlite(c) => {
            AnsiTransactionManager::begin_transaction_sql(c, "BEGIN IMMEDIATE")?
        }
        AnyConnection::Postgresql(c) => {
            AnsiTransactionManager::begin_transaction_sql(c, "BEGIN")?;
            if let Err(e) =
                c.batch_execute(&format!("SELECT pg_advisory_xact_lock({PG_WRITE_LOCK})"))
            {
                let _ = AnsiTransactionManager::rollback_transaction(c);
                return Err(e.into());
            }
        }
    }
    match f(conn) {
        Ok(value) => {
            <AnyConnection as Connection>::TransactionManager::commit_transaction(conn)?;
            Ok(value)
        }
        Err(e) => {
            <AnyConnection as Connection>::TransactionManager::rollback_transaction(conn)?;
            Err(e)
        }
    }
}

pub(crate) fn now() -> String {
    agentgate_actors::protocol::now_iso()
}

#[derive(Debug, Clone, Queryable, Selectable)]
#[diesel(table_name = users)]
pub struct User {
    pub id: i32,
    pub username: String,
    pub password_hash: Option<String>,
    #[allow(dead_code)] // selected with the row; kept for a future users listing
    pub created_at: String,
    /// Tokens issued with an older version are revoked.
    pub token_version: i32,
    /// May use the admin API and page (the first user is one).
    pub is_admin: bool,
}

pub fn user_by_name(conn: &mut AnyConnection, name: &str) -> Result<Option<User>, DbError> {
    Ok(users::table
        .filter(users::username.eq(name))
        .select(User::as_select())
        .first(conn)
        .optional()?)
}

pub fn user_by_id(conn: &mut AnyConnection, id: i64) -> Result<Option<User>, DbError> {
    let Ok(id) = i32::try_from(id) else {
        return Ok(None);
    };
    Ok(users::table
        .find(id)
        .select(User::as_select())
        .first(conn)
        .optional()?)
}

pub fn first_user(conn: &mut AnyConnection) -> Result<Option<User>, DbError> {
    Ok(users::table
        .order(users::id.asc())
        .select(User::as_select())
        .first(conn)
        .optional()?)
}

/// Every user's name by id (the admin snapshot names users).
pub fn usernames(
    conn: &mut AnyConnection,
) -> Result<std::collections::HashMap<i64, String>, DbError> {
    Ok(users::table
        .select((users::id, users::username))
        .load::<(i32, String)>(conn)?
        .into_iter()
        .map(|(id, name)| (i64::from(id), name))
        .collect())
}

/// The first admin (by id), for `agentgate status` without `--token`.
pub fn first_admin(conn: &mut AnyConnection) -> Result<Option<User>, DbError> {
    Ok(users::table
        .filter(users::is_admin.eq(true))
        .order(users::id.asc())
        .select(User::as_select())
        .first(conn)
        .optional()?)
}

pub fn user_count(conn: &mut AnyConnection) -> Result<i64, DbError> {
    Ok(users::table.count().get_result(conn)?)
}

pub fn create_user(
    conn: &mut AnyConnection,
    name: &str,
    password_hash: Option<&str>,
) -> Result<User, DbError> {
    // The first user is an admin, however it was created (callers hold a transaction).
    let first = user_count(conn)? == 0;
    let now = now();
    Ok(per_backend!(conn, |c| diesel::insert_into(users::table)
        .values((
            users::is_admin.eq(first),
            users::username.eq(name),
            users::password_hash.eq(password_hash),
            users::created_at.eq(&now),
        ))
        .returning(User::as_returning())
        .get_result(c))?)
}

/// The user named `name`, created without a password if missing.
pub fn ensure_user(conn: &mut AnyConnection, name: &str) -> Result<User, DbError> {
    write_transaction(conn, |conn| match user_by_name(conn, name)? {
        Some(user) => Ok(user),
        None => create_user(conn, name, None),
    })
}

/// Adds a user with a password (`agentgate user add`); `None` when the name is taken.
pub fn add_user(
    conn: &mut AnyConnection,
    name: &str,
    password_hash: &str,
) -> Result<Option<User>, DbError> {
    write_transaction(conn, |conn| {
        if user_by_name(conn, name)?.is_some() {
            return Ok(None);
        }
        create_user(conn, name, Some(password_hash)).map(Some)
    })
}

/// Revokes every token issued so far to `name`; the user with the new version,
/// `None` if there is no such user.
pub fn revoke_tokens(conn: &mut AnyConnection, name: &str) -> Result<Option<User>, DbError> {
    Ok(per_backend!(conn, |c| diesel::update(
        users::table.filter(users::username.eq(name))
    )
    .set(users::token_version.eq(users::token_version + 1))
    .returning(User::as_returning())
    .get_result(c)
    .optional())?)
}

/// Makes `name` an admin (`agentgate token --admin`); the user with the new role.
pub fn set_admin(conn: &mut AnyConnection, name: &str) -> Result<Option<User>, DbError> {
    Ok(per_backend!(conn, |c| diesel::update(
        users::table.filter(users::username.eq(name))
    )
    .set(users::is_admin.eq(true))
    .returning(User::as_returning())
    .get_result(c)
    .optional())?)
}

/// Sets a user's password hash; earlier tokens are revoked with it.
#[allow(dead_code)] // the password-changing commands and routes call it
pub fn set_password(
    conn: &mut AnyConnection,
    user_id: i32,
    password_hash: &str,
) -> Result<Option<User>, DbError> {
    Ok(per_backend!(conn, |c| diesel::update(
        users::table.find(user_id)
    )
    .set((
        users::password_hash.eq(password_hash),
        users::token_version.eq(users::token_version + 1),
    ))
    .returning(User::as_returning())
    .get_result(c)
    .optional())?)
}

/// Creates the first user; `None` when a user already exists (registration is closed).
pub fn register_first_user(
    conn: &mut AnyConnection,
    name: &str,
    password_hash: &str,
) -> Result<Option<User>, DbError> {
    // IMMEDIATE takes the write lock first, so two racing registrations cannot both win.
    write_transaction(conn, |conn| {
        if user_count(conn)? > 0 {
            return Ok(None);
        }
        create_user(conn, name, Some(password_hash)).map(Some)
    })
}

#[derive(Debug, Clone, Queryable, Selectable)]
#[diesel(table_name = sessions)]
pub struct Session {
    pub id: String,
    pub user_id: i32,
    pub provider: String,
    pub provider_session_id: Option<String>,
    pub project_path: String,
    pub custom_name: Option<String>,
    pub archived: bool,
    pub last_seq: i64,
    pub created_at: String,
    pub updated_at: String,
    pub seq_reserved: i64,
}

/// The row as the actors see it: with its project, summary and message count.
pub fn session_row(conn: &mut AnyConnection, s: Session) -> Result<SessionRow, DbError> {
    let summary = project::summary_of(conn, &s)?;
    let project =
        project::project_for_path(conn, s.user_id, &s.project_path)?.map(|p| ProjectRef {
            id: p.id.to_string(),
            display_name: p.name(),
            is_starred: p.is_starred,
        });
    Ok(SessionRow {
        id: s.id,
        user_id: i64::from(s.user_id),
        provider: s.provider,
        provider_session_id: s.provider_session_id,
        project_path: s.project_path,
        custom_name: s.custom_name,
        archived: s.archived,
        last_seq: u64::try_from(s.last_seq).unwrap_or(0),
        seq_reserved: u64::try_from(s.seq_reserved).unwrap_or(0),
        created_at: s.created_at,
        updated_at: s.updated_at,
        project,
        summary: summary.summary,
        message_count: u64::try_from(summary.message_count).unwrap_or(0),
    })
}

pub fn create_session(
    conn: &mut AnyConnection,
    user_id: i32,
    provider: &str,
    project_path: &str,
    name: Option<&str>,
) -> Result<Session, DbError> {
    let now = now();
    write_transaction(conn, |conn| {
        project::add_if_missing(conn, user_id, project_path, &now)?;
        let id = uuid::Uuid::new_v4().to_string();
        Ok(per_backend!(conn, |c| diesel::insert_into(
            sessions::table
        )
        .values((
            sessions::id.eq(&id),
            sessions::user_id.eq(user_id),
            sessions::provider.eq(provider),
            sessions::project_path.eq(project_path),
            sessions::custom_name.eq(name),
            sessions::created_at.eq(&now),
            sessions::updated_at.eq(&now),
        ))
        .returning(Session::as_returning())
        .get_result(c))?)
    })
}

/// The user's projects (each a session was ever created in) as `(path,
/// created_at)`, newest first.
pub fn user_projects(
    conn: &mut AnyConnection,
    user_id: i32,
) -> Result<Vec<(String, String)>, DbError> {
    Ok(projects::table
        .filter(projects::user_id.eq(user_id))
        .order((projects::created_at.desc(), projects::id.desc()))
        .select((projects::path, projects::created_at))
        .load(conn)?)
}

pub fn session_by_id(conn: &mut AnyConnection, id: &str) -> Result<Option<Session>, DbError> {
    Ok(sessions::table
        .find(id)
        .select(Session::as_select())
        .first(conn)
        .optional()?)
}

/// The [`SessionStore`] the actors use.
pub struct DbStore(pub Db);

fn store_err(e: DbError) -> StoreError {
    StoreError::backend(e)
}

impl SessionStore for DbStore {
    fn session(&self, id: &str) -> Result<Option<SessionRow>, StoreError> {
        metrics().db_op("session", || {
            let mut conn = self.0.conn().map_err(store_err)?;
            session_by_id(&mut conn, id)
                .and_then(|s| s.map(|s| session_row(&mut conn, s)).transpose())
                .map_err(store_err)
        })
    }

    fn append_history(
        &self,
        id: &str,
        entries: &[HistoryEntry],
        keep: usize,
    ) -> Result<(), StoreError> {
        metrics().db_op("append_history", || {
            let mut conn = self.0.conn().map_err(store_err)?;
            history::append(&mut conn, id, entries, keep).map_err(store_err)
        })
    }

    fn set_provider_session_id(&self, id: &str, psid: Option<&str>) -> Result<(), StoreError> {
        metrics().db_op("set_provider_session_id", || {
            let mut conn = self.0.conn().map_err(store_err)?;
            diesel::update(sessions::table.find(id))
                .set((
                    sessions::provider_session_id.eq(psid),
                    sessions::updated_at.eq(now()),
                ))
                .execute(&mut conn)
                .map_err(|e| store_err(e.into()))?;
            Ok(())
        })
    }

    fn set_last_seq(&self, id: &str, last_seq: u64) -> Result<(), StoreError> {
        metrics().db_op("set_last_seq", || {
            let mut conn = self.0.conn().map_err(store_err)?;
            let seq = i64::try_from(last_seq).unwrap_or(i64::MAX);
            // max() so a late, smaller write never moves the counter back.
            diesel::update(sessions::table.find(id))
                .filter(sessions::last_seq.lt(seq))
                .set((sessions::last_seq.eq(seq), sessions::updated_at.eq(now())))
                .execute(&mut conn)
                .map_err(|e| store_err(e.into()))?;
            Ok(())
        })
    }

    fn token_version(&self, user_id: i64) -> Result<Option<i64>, StoreError> {
        metrics().db_op("token_version", || {
            let mut conn = self.0.conn().map_err(store_err)?;
            user_by_id(&mut conn, user_id)
                .map(|u| u.map(|u| i64::from(u.token_version)))
                .map_err(store_err)
        })
    }

    fn reserve_seq(&self, id: &str, after: u64, count: u64) -> Result<u64, StoreError> {
        metrics().db_op("reserve_seq", || self.reserve_block(id, after, count))
    }

    fn release_seq(&self, id: &str, last_seq: u64, reserved: u64) -> Result<(), StoreError> {
        metrics().db_op("release_seq", || self.release_block(id, last_seq, reserved))
    }
}

impl DbStore {
    fn reserve_block(&self, id: &str, after: u64, count: u64) -> Result<u64, StoreError> {
        let mut conn = self.0.conn().map_err(store_err)?;
        let after = i64::try_from(after).unwrap_or(i64::MAX);
        let count = i64::try_from(count).unwrap_or(i64::MAX);
        // Read and write under the write lock: two gateways reserving at
        // once get disjoint blocks, the second above the first.
        let end = write_transaction(&mut conn, |conn| {
            let row: Option<(i64, i64)> = sessions::table
                .find(id)
                .select((sessions::seq_reserved, sessions::last_seq))
                .first(conn)
                .optional()?;
            let Some((reserved, last)) = row else {
                // No row (deleted): nobody else can use its seqs.
                return Ok(after.saturating_add(count));
            };
            let end = reserved.max(last).max(after).saturating_add(count);
            diesel::update(sessions::table.find(id))
                .set(sessions::seq_reserved.eq(end))
                .execute(conn)?;
            Ok(end)
        })
        .map_err(store_err)?;
        Ok(u64::try_from(end).unwrap_or(0))
    }

    fn release_block(&self, id: &str, last_seq: u64, reserved: u64) -> Result<(), StoreError> {
        self.set_last_seq(id, last_seq)?;
        let mut conn = self.0.conn().map_err(store_err)?;
        let seq = i64::try_from(last_seq).unwrap_or(i64::MAX);
        let reserved = i64::try_from(reserved).unwrap_or(i64::MAX);
        // A reservation beyond ours is another gateway's: it stays.
        diesel::update(sessions::table.find(id))
            .filter(sessions::seq_reserved.le(reserved))
            .set(sessions::seq_reserved.eq(seq))
            .execute(&mut conn)
            .map_err(|e| store_err(e.into()))?;
        Ok(())
    }
}

#[cfg(test)]
#[path = "../../tests/support/postgres.rs"]
mod test_postgres;

#[cfg(test)]
mod tests {
    use super::*;
    use agentgate_actors::protocol::Frame;

    /// Each test body runs twice: on a SQLite file and on a fresh PostgreSQL
    /// database. It gets the URL, so it can open several pools (gateways).
    macro_rules! on_both_backends {
        ($($name:ident($url:ident) $body:block)*) => {$(
            mod $name {
                use super::*;

                fn body($url: &str) $body

                #[test]
                fn sqlite() {
                    let dir = tempfile::tempdir().unwrap();
                    body(dir.path().join("t.db").to_str().unwrap());
                }

                #[test]
                fn postgres() {
                    let db = super::super::test_postgres::TestDatabase::create();
                    body(&db.url);
                }
            }
        )*};
    }

    fn session_of(db: &Db, user: &str) -> Session {
        let mut conn = db.conn().unwrap();
        let user = ensure_user(&mut conn, user).unwrap();
        create_session(&mut conn, user.id, "claude", "/tmp/p", None).unwrap()
    }

    fn entry(n: usize) -> HistoryEntry {
        HistoryEntry {
            kind: "text",
            role: Some("user"),
            tool_id: None,
            body: Frame::from(format!(r#"{{"type":"text","content":"prompt {n}"}}"#)),
            timestamp: format!("2026-12-01T00:00:{n:02}.000Z"),
        }
    }

    on_both_backends! {
        registration_closes_after_the_first_user(url) {
            let db = Db::open(url).unwrap();
            let mut conn = db.conn().unwrap();
            let first = register_first_user(&mut conn, "a", "h").unwrap().unwrap();
            assert!(first.is_admin, "the first user is an admin");
            assert!(register_first_user(&mut conn, "b", "h").unwrap().is_none());
            assert!(!ensure_user(&mut conn, "b").unwrap().is_admin);
            assert!(set_admin(&mut conn, "b").unwrap().unwrap().is_admin);
            assert_eq!(first_admin(&mut conn).unwrap().unwrap().username, "a");
            assert_eq!(usernames(&mut conn).unwrap().len(), 2);
            assert_eq!(ensure_user(&mut conn, "b").unwrap().username, "b");
            assert_eq!(ensure_user(&mut conn, "b").unwrap().id, 2);
            assert_eq!(user_count(&mut conn).unwrap(), 2);
            assert!(add_user(&mut conn, "b", "h2").unwrap().is_none());
            assert_eq!(first_user(&mut conn).unwrap().unwrap().username, "a");
        }

        revocation_and_password_change_bump_the_token_version(url) {
            let db = Db::open(url).unwrap();
            let mut conn = db.conn().unwrap();
            let user = ensure_user(&mut conn, "a").unwrap();
            assert_eq!(user.token_version, 0);
            assert_eq!(
                revoke_tokens(&mut conn, "a").unwrap().unwrap().token_version,
                1
            );
            assert!(revoke_tokens(&mut conn, "nobody").unwrap().is_none());
            let changed = set_password(&mut conn, user.id, "h").unwrap().unwrap();
            assert_eq!(
                (changed.token_version, changed.password_hash.as_deref()),
                (2, Some("h"))
            );
            assert_eq!(DbStore(db.clone()).token_version(i64::from(user.id)).unwrap(), Some(2));
        }

        migrations_apply_once(url) {
            let db = Db::open(url).unwrap();
            // A second gateway opening the same database finds nothing to do.
            let again = Db::open(url).unwrap();
            assert_eq!(again.migrate().unwrap(), 0);
            assert_eq!(db.migrate().unwrap(), 0);
        }

        sessions_and_projects_round_trip(url) {
            let db = Db::open(url).unwrap();
            let s = session_of(&db, "a");
            let mut conn = db.conn().unwrap();
            let again = session_by_id(&mut conn, &s.id).unwrap().unwrap();
            assert_eq!((again.provider.as_str(), again.archived), ("claude", false));
            // The session's path became a project, once.
            create_session(&mut conn, s.user_id, "codex", "/tmp/p", Some("named")).unwrap();
            let projects = project::projects_of(&mut conn, s.user_id).unwrap();
            assert_eq!(projects.len(), 1, "{projects:?}");
            assert_eq!(projects[0].name(), "p");
            assert!(project::create_project(&mut conn, s.user_id, "/tmp/p", None).unwrap().is_none());
            let q = project::create_project(&mut conn, s.user_id, "/tmp/q", Some("Q")).unwrap().unwrap();
            assert_eq!(q.name(), "Q");
            assert_eq!(project::toggle_star(&mut conn, s.user_id, q.id).unwrap(), Some(true));
            assert!(project::rename(&mut conn, s.user_id, q.id, Some("R")).unwrap());
            assert_eq!(user_projects(&mut conn, s.user_id).unwrap().len(), 2);
            let (page, total) = project::sessions_page(&mut conn, s.user_id, "/tmp/p", 10, 0).unwrap();
            assert_eq!((page.len(), total), (2, 2));
            let row = DbStore(db.clone()).session(&s.id).unwrap().unwrap();
            assert_eq!(row.project.map(|p| p.display_name), Some("p".to_string()));
        }

        history_keeps_the_newest_messages(url) {
            let db = Db::open(url).unwrap();
            let s = session_of(&db, "a");
            let store = DbStore(db.clone());
            let entries: Vec<HistoryEntry> = (0..5).map(entry).collect();
            store.append_history(&s.id, &entries[..2], 3).unwrap();
            store.append_history(&s.id, &entries[2..], 3).unwrap();
            let mut conn = db.conn().unwrap();
            let page = history::page(&mut conn, &s.id, None, 0).unwrap();
            let texts: Vec<&str> = page.messages.iter().map(|m| m["content"].as_str().unwrap()).collect();
            assert_eq!(texts, ["prompt 2", "prompt 3", "prompt 4"]);
            assert_eq!(page.total, 3);
            let row = store.session(&s.id).unwrap().unwrap();
            assert_eq!((row.summary.as_str(), row.message_count), ("prompt 2", 3));
            assert_eq!(row.updated_at, "2026-12-01T00:00:04.000Z");
        }

        last_seq_never_moves_back(url) {
            let db = Db::open(url).unwrap();
            let s = session_of(&db, "a");
            let store = DbStore(db.clone());
            store.set_last_seq(&s.id, 10).unwrap();
            store.set_last_seq(&s.id, 4).unwrap();
            assert_eq!(store.session(&s.id).unwrap().unwrap().last_seq, 10);
        }

        seq_blocks_follow_each_other_and_release_gives_back_the_rest(url) {
            let db = Db::open(url).unwrap();
            let s = session_of(&db, "a");
            let store = DbStore(db.clone());
            // One gateway: each block follows its previous one.
            assert_eq!(store.reserve_seq(&s.id, 0, 20_000).unwrap(), 20_000);
            assert_eq!(store.reserve_seq(&s.id, 20_000, 10_000).unwrap(), 30_000);
            let row = store.session(&s.id).unwrap().unwrap();
            assert_eq!((row.last_seq, row.seq_reserved), (0, 30_000));
            store.release_seq(&s.id, 123, 30_000).unwrap();
            let row = store.session(&s.id).unwrap().unwrap();
            assert_eq!((row.last_seq, row.seq_reserved), (123, 123));
            // A caller whose view is stale gets a block above what is reserved.
            assert_eq!(store.reserve_seq(&s.id, 0, 10).unwrap(), 133);
            // Another gateway reserved beyond ours: releasing ours keeps theirs.
            let other = DbStore(Db::open(url).unwrap());
            assert_eq!(other.reserve_seq(&s.id, 0, 10).unwrap(), 143);
            store.release_seq(&s.id, 130, 133).unwrap();
            let row = store.session(&s.id).unwrap().unwrap();
            assert_eq!((row.last_seq, row.seq_reserved), (130, 143));
        }

        two_gateways_racing_never_get_the_same_seq(url) {
            const BLOCK: u64 = 100;
            const ROUNDS: usize = 40;
            let a = Db::open(url).unwrap();
            let s = session_of(&a, "a");
            let b = Db::open(url).unwrap();
            let start = std::sync::Arc::new(std::sync::Barrier::new(2));
            let racers: Vec<_> = [a, b]
                .into_iter()
                .map(|db| {
                    let (id, start) = (s.id.clone(), start.clone());
                    std::thread::spawn(move || {
                        let store = DbStore(db);
                        start.wait();
                        let mut mine = 0;
                        let mut blocks = Vec::new();
                        for _ in 0..ROUNDS {
                            let end = store.reserve_seq(&id, mine, BLOCK).unwrap();
                            blocks.push((end - BLOCK + 1, end));
                            mine = end;
                        }
                        blocks
                    })
                })
                .collect();
            let mut blocks: Vec<(u64, u64)> =
                racers.into_iter().flat_map(|r| r.join().unwrap()).collect();
            blocks.sort();
            for w in blocks.windows(2) {
                assert!(w[0].1 < w[1].0, "blocks {:?} and {:?} overlap", w[0], w[1]);
            }
            // Nothing lost either: together they cover 1..=80 blocks exactly.
            assert_eq!(blocks.first().unwrap().0, 1);
            assert_eq!(blocks.last().unwrap().1, 2 * ROUNDS as u64 * BLOCK);
        }
    }
}
