//! SQLite through diesel.
//!
//! Diesel is blocking, so nothing here runs on an actor or request thread:
//! HTTP handlers call these functions inside `web::block`, and the actors
//! reach the database through the [`SessionStore`] implementation below,
//! which they call on tokio's blocking pool. Queries are plain functions over
//! `&mut SqliteConnection` so they can be tested without HTTP.

pub mod history;
pub mod project;
pub mod schema;

use agentgate_actors::metrics::metrics;
use std::time::Duration;

use agentgate_actors::store::{HistoryEntry, ProjectRef, SessionRow, SessionStore, StoreError};
use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use diesel::r2d2::{ConnectionManager, CustomizeConnection, Pool, PooledConnection};
use diesel::sqlite::SqliteConnection;
use diesel_migrations::{embed_migrations, EmbeddedMigrations, MigrationHarness};

use schema::{projects, sessions, users};

pub const MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations");

/// How long a writer waits for SQLite's lock before failing.
const BUSY_TIMEOUT_MS: u32 = 5_000;
/// Connections in the pool: SQLite has one writer; a few readers suffice.
const POOL_SIZE: u32 = 4;

pub type Conn = PooledConnection<ConnectionManager<SqliteConnection>>;

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

#[derive(Debug)]
struct Pragmas;

impl CustomizeConnection<SqliteConnection, diesel::r2d2::Error> for Pragmas {
    fn on_acquire(&self, conn: &mut SqliteConnection) -> Result<(), diesel::r2d2::Error> {
        // WAL lets readers run beside the writer; the busy timeout makes a
        // concurrent writer wait instead of failing with SQLITE_BUSY.
        // WAL is set once in `Db::open` (it is stored in the file); here only
        // the per-connection settings. The busy timeout makes a concurrent
        // writer wait instead of failing with SQLITE_BUSY.
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
    pool: Pool<ConnectionManager<SqliteConnection>>,
}

impl Db {
    /// Opens (creating if missing) the database at `url` (`sqlite://path` or a
    /// plain path) and applies pending migrations.
    pub fn open(url: &str) -> Result<Db, DbError> {
        let path = url.strip_prefix("sqlite://").unwrap_or(url);
        // WAL lets readers run beside the writer. Switched once, on one
        // connection: several pool connections switching at once on a new
        // file fail with "database is locked".
        let mut first = SqliteConnection::establish(path).map_err(|source| DbError::Open {
            path: path.to_string(),
            source,
        })?;
        first
            .batch_execute(&format!(
                "PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}; PRAGMA journal_mode = WAL;"
            ))
            .map_err(DbError::Query)?;
        drop(first);
        let manager = ConnectionManager::<SqliteConnection>::new(path);
        let pool = Pool::builder()
            .max_size(POOL_SIZE)
            .connection_timeout(Duration::from_secs(10))
            .connection_customizer(Box::new(Pragmas))
            .build(manager)?;
        let db = Db { pool };
        db.migrate()?;
        Ok(db)
    }

    /// Applies the embedded migrations; returns how many ran.
    pub fn migrate(&self) -> Result<usize, DbError> {
        let mut conn = self.conn()?;
        let applied = conn
            .run_pending_migrations(MIGRATIONS)
            .map_err(DbError::Migration)?;
        Ok(applied.len())
    }

    pub fn conn(&self) -> Result<Conn, DbError> {
        Ok(self.pool.get()?)
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

pub fn user_by_name(conn: &mut SqliteConnection, name: &str) -> Result<Option<User>, DbError> {
    Ok(users::table
        .filter(users::username.eq(name))
        .select(User::as_select())
        .first(conn)
        .optional()?)
}

pub fn user_by_id(conn: &mut SqliteConnection, id: i64) -> Result<Option<User>, DbError> {
    let Ok(id) = i32::try_from(id) else {
        return Ok(None);
    };
    Ok(users::table
        .find(id)
        .select(User::as_select())
        .first(conn)
        .optional()?)
}

pub fn first_user(conn: &mut SqliteConnection) -> Result<Option<User>, DbError> {
    Ok(users::table
        .order(users::id.asc())
        .select(User::as_select())
        .first(conn)
        .optional()?)
}

/// Every user's name by id (the admin snapshot names users).
pub fn usernames(
    conn: &mut SqliteConnection,
) -> Result<std::collections::HashMap<i64, String>, DbError> {
    Ok(users::table
        .select((users::id, users::username))
        .load::<(i32, String)>(conn)?
        .into_iter()
        .map(|(id, name)| (i64::from(id), name))
        .collect())
}

/// The first admin (by id), for `agentgate status` without `--token`.
pub fn first_admin(conn: &mut SqliteConnection) -> Result<Option<User>, DbError> {
    Ok(users::table
        .filter(users::is_admin.eq(true))
        .order(users::id.asc())
        .select(User::as_select())
        .first(conn)
        .optional()?)
}

pub fn user_count(conn: &mut SqliteConnection) -> Result<i64, DbError> {
    Ok(users::table.count().get_result(conn)?)
}

pub fn create_user(
    conn: &mut SqliteConnection,
    name: &str,
    password_hash: Option<&str>,
) -> Result<User, DbError> {
    // The first user is an admin, however it was created (callers hold a transaction).
    let first = user_count(conn)? == 0;
    Ok(diesel::insert_into(users::table)
        .values((
            users::is_admin.eq(first),
            users::username.eq(name),
            users::password_hash.eq(password_hash),
            users::created_at.eq(now()),
        ))
        .returning(User::as_returning())
        .get_result(conn)?)
}

/// The user named `name`, created without a password if missing.
pub fn ensure_user(conn: &mut SqliteConnection, name: &str) -> Result<User, DbError> {
    conn.immediate_transaction(|conn| match user_by_name(conn, name)? {
        Some(user) => Ok(user),
        None => create_user(conn, name, None),
    })
}

/// Adds a user with a password (`agentgate user add`); `None` when the name is taken.
pub fn add_user(
    conn: &mut SqliteConnection,
    name: &str,
    password_hash: &str,
) -> Result<Option<User>, DbError> {
    conn.immediate_transaction(|conn| {
        if user_by_name(conn, name)?.is_some() {
            return Ok(None);
        }
        create_user(conn, name, Some(password_hash)).map(Some)
    })
}

/// Revokes every token issued so far to `name`; the user with the new version,
/// `None` if there is no such user.
pub fn revoke_tokens(conn: &mut SqliteConnection, name: &str) -> Result<Option<User>, DbError> {
    Ok(
        diesel::update(users::table.filter(users::username.eq(name)))
            .set(users::token_version.eq(users::token_version + 1))
            .returning(User::as_returning())
            .get_result(conn)
            .optional()?,
    )
}

/// Makes `name` an admin (`agentgate token --admin`); the user with the new role.
pub fn set_admin(conn: &mut SqliteConnection, name: &str) -> Result<Option<User>, DbError> {
    Ok(
        diesel::update(users::table.filter(users::username.eq(name)))
            .set(users::is_admin.eq(true))
            .returning(User::as_returning())
            .get_result(conn)
            .optional()?,
    )
}

/// Sets a user's password hash; earlier tokens are revoked with it.
#[allow(dead_code)] // the password-changing commands and routes call it
pub fn set_password(
    conn: &mut SqliteConnection,
    user_id: i32,
    password_hash: &str,
) -> Result<Option<User>, DbError> {
    Ok(diesel::update(users::table.find(user_id))
        .set((
            users::password_hash.eq(password_hash),
            users::token_version.eq(users::token_version + 1),
        ))
        .returning(User::as_returning())
        .get_result(conn)
        .optional()?)
}

/// Creates the first user; `None` when a user already exists (registration is closed).
pub fn register_first_user(
    conn: &mut SqliteConnection,
    name: &str,
    password_hash: &str,
) -> Result<Option<User>, DbError> {
    // IMMEDIATE takes the write lock first, so two racing registrations cannot both win.
    conn.immediate_transaction(|conn| {
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
pub fn session_row(conn: &mut SqliteConnection, s: Session) -> Result<SessionRow, DbError> {
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
    conn: &mut SqliteConnection,
    user_id: i32,
    provider: &str,
    project_path: &str,
    name: Option<&str>,
) -> Result<Session, DbError> {
    let now = now();
    conn.immediate_transaction(|conn| {
        diesel::insert_into(projects::table)
            .values((
                projects::user_id.eq(user_id),
                projects::path.eq(project_path),
                projects::created_at.eq(&now),
            ))
            .on_conflict((projects::user_id, projects::path))
            .do_nothing()
            .execute(conn)?;
        Ok(diesel::insert_into(sessions::table)
            .values((
                sessions::id.eq(uuid::Uuid::new_v4().to_string()),
                sessions::user_id.eq(user_id),
                sessions::provider.eq(provider),
                sessions::project_path.eq(project_path),
                sessions::custom_name.eq(name),
                sessions::created_at.eq(&now),
                sessions::updated_at.eq(&now),
            ))
            .returning(Session::as_returning())
            .get_result(conn)?)
    })
}

/// The user's projects (each a session was ever created in) as `(path,
/// created_at)`, newest first.
pub fn user_projects(
    conn: &mut SqliteConnection,
    user_id: i32,
) -> Result<Vec<(String, String)>, DbError> {
    Ok(projects::table
        .filter(projects::user_id.eq(user_id))
        .order((projects::created_at.desc(), projects::id.desc()))
        .select((projects::path, projects::created_at))
        .load(conn)?)
}

pub fn session_by_id(conn: &mut SqliteConnection, id: &str) -> Result<Option<Session>, DbError> {
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

    fn reserve_seq(&self, id: &str, upto: u64) -> Result<(), StoreError> {
        metrics().db_op("reserve_seq", || {
            let mut conn = self.0.conn().map_err(store_err)?;
            let upto = i64::try_from(upto).unwrap_or(i64::MAX);
            diesel::update(sessions::table.find(id))
                .filter(sessions::seq_reserved.lt(upto))
                .set(sessions::seq_reserved.eq(upto))
                .execute(&mut conn)
                .map_err(|e| store_err(e.into()))?;
            Ok(())
        })
    }

    fn release_seq(&self, id: &str, last_seq: u64) -> Result<(), StoreError> {
        metrics().db_op("release_seq", || {
            self.set_last_seq(id, last_seq)?;
            let mut conn = self.0.conn().map_err(store_err)?;
            let seq = i64::try_from(last_seq).unwrap_or(i64::MAX);
            diesel::update(sessions::table.find(id))
                .set(sessions::seq_reserved.eq(seq))
                .execute(&mut conn)
                .map_err(|e| store_err(e.into()))?;
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_db() -> (tempfile::TempDir, Db) {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(dir.path().join("t.db").to_str().unwrap()).unwrap();
        (dir, db)
    }

    #[test]
    fn registration_closes_after_the_first_user() {
        let (_dir, db) = temp_db();
        let mut conn = db.conn().unwrap();
        assert!(register_first_user(&mut conn, "a", "h").unwrap().is_some());
        assert!(register_first_user(&mut conn, "b", "h").unwrap().is_none());
        assert_eq!(ensure_user(&mut conn, "b").unwrap().username, "b");
        assert_eq!(ensure_user(&mut conn, "b").unwrap().id, 2);
    }

    #[test]
    fn revocation_and_password_change_bump_the_token_version() {
        let (_dir, db) = temp_db();
        let mut conn = db.conn().unwrap();
        let user = ensure_user(&mut conn, "a").unwrap();
        assert_eq!(user.token_version, 0);
        assert_eq!(
            revoke_tokens(&mut conn, "a")
                .unwrap()
                .unwrap()
                .token_version,
            1
        );
        assert!(revoke_tokens(&mut conn, "nobody").unwrap().is_none());
        let changed = set_password(&mut conn, user.id, "h").unwrap().unwrap();
        assert_eq!(
            (changed.token_version, changed.password_hash.as_deref()),
            (2, Some("h"))
        );
    }

    #[test]
    fn last_seq_never_moves_back() {
        let (_dir, db) = temp_db();
        let mut conn = db.conn().unwrap();
        let user = ensure_user(&mut conn, "a").unwrap();
        let s = create_session(&mut conn, user.id, "claude", "/tmp", None).unwrap();
        let store = DbStore(db.clone());
        store.set_last_seq(&s.id, 10).unwrap();
        store.set_last_seq(&s.id, 4).unwrap();
        assert_eq!(store.session(&s.id).unwrap().unwrap().last_seq, 10);
    }

    #[test]
    fn seq_reservations_never_move_back_until_released() {
        let (_dir, db) = temp_db();
        let mut conn = db.conn().unwrap();
        let user = ensure_user(&mut conn, "a").unwrap();
        let s = create_session(&mut conn, user.id, "claude", "/tmp", None).unwrap();
        let store = DbStore(db.clone());
        store.reserve_seq(&s.id, 20_000).unwrap();
        store.reserve_seq(&s.id, 10_000).unwrap();
        let row = store.session(&s.id).unwrap().unwrap();
        assert_eq!((row.last_seq, row.seq_reserved), (0, 20_000));
        store.release_seq(&s.id, 123).unwrap();
        let row = store.session(&s.id).unwrap().unwrap();
        assert_eq!((row.last_seq, row.seq_reserved), (123, 123));
    }
}
