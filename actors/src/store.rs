//! The actors' view of the database, injected by the binary.
//!
//! The actors crate does not depend on diesel: `src/` implements
//! [`SessionStore`] over its SQLite pool and hands an `Arc<dyn SessionStore>`
//! to the actors. Every method blocks, so actors call it through
//! [`blocking`], which runs it on tokio's blocking pool and never on an actor
//! thread, at most [`BLOCKING_CALLS_MAX`] at once.

use std::sync::Arc;

/// A row of the `sessions` table as the actors need it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionRow {
    /// The app session id (UUID) clients use.
    pub id: String,
    /// The owning user.
    pub user_id: i64,
    pub provider: String,
    /// The provider-native id; never sent to a client except in `session_upserted`.
    pub provider_session_id: Option<String>,
    pub project_path: String,
    pub custom_name: Option<String>,
    pub archived: bool,
    /// Highest `seq` sent for this session (persisted so seq keeps increasing across restarts).
    pub last_seq: u64,
    /// Seqs up to this may have been used (reserved before use, E9); a
    /// session continues above it after a crash.
    pub seq_reserved: u64,
    pub created_at: String,
    pub updated_at: String,
    /// The user's project row for `project_path` (`session_upserted.project`).
    pub project: Option<ProjectRef>,
    /// The name a client gave it, else its first prompt (from the history).
    pub summary: String,
    /// Messages recorded in its history.
    pub message_count: u64,
}

/// The project a session belongs to, as the web UI names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProjectRef {
    /// The row id, as a string (the reference's `projectId`).
    pub id: String,
    pub display_name: String,
    pub is_starred: bool,
}

/// One message of a session's recorded conversation
/// ([`chat::history`](crate::chat::history)).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryEntry {
    /// `text`, `tool_use`, `tool_result`, `thinking`, `error`, ...
    pub kind: &'static str,
    /// `user` or `assistant` for `text`.
    pub role: Option<&'static str>,
    /// Pairs a `tool_result` with its `tool_use`.
    pub tool_id: Option<String>,
    /// The message as clients read it (JSON).
    pub body: crate::protocol::Frame,
    pub timestamp: String,
}

/// Why a store call failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The backend (the binary's database) failed.
    #[error("database error: {0}")]
    Backend(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The blocking task running the call panicked or was cancelled.
    #[error("database error: database task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

impl StoreError {
    pub fn backend(err: impl std::error::Error + Send + Sync + 'static) -> Self {
        StoreError::Backend(Box::new(err))
    }
}

/// Session persistence the actors depend on.
pub trait SessionStore: Send + Sync + 'static {
    /// The session row by app id, whoever owns it.
    fn session(&self, id: &str) -> Result<Option<SessionRow>, StoreError>;
    /// Records the provider-native id captured from a run (`None` forgets it).
    fn set_provider_session_id(
        &self,
        id: &str,
        provider_session_id: Option<&str>,
    ) -> Result<(), StoreError>;
    /// Records the session's highest seq (never moves it back).
    fn set_last_seq(&self, id: &str, last_seq: u64) -> Result<(), StoreError>;
    /// Reserves `count` seqs above every seq reserved so far (and above
    /// `after`, the caller's own reservation), atomically against every other
    /// gateway on the same database, and returns the end of the block: the
    /// caller owns `end - count + 1 ..= end` and uses none of them before
    /// this returns (E9). When nobody reserved since the caller's previous
    /// block, the new one follows it (`end - count == after`).
    fn reserve_seq(&self, id: &str, after: u64, count: u64) -> Result<u64, StoreError>;
    /// At a clean shutdown: the session's last seq, and no seq reserved
    /// beyond it, unless someone reserved after the caller's block ending
    /// at `reserved` (that reservation is theirs and stays).
    fn release_seq(&self, id: &str, last_seq: u64, reserved: u64) -> Result<(), StoreError>;
    /// The user's current token version: a token carrying an older one is
    /// revoked; `None` when the user is gone. Remote-session sockets check it
    /// while open (closed with 4003). Default: nothing is ever revoked.
    fn token_version(&self, _user_id: i64) -> Result<Option<i64>, StoreError> {
        Ok(Some(0))
    }
    /// Appends to the session's history in one transaction, keeping its
    /// newest `keep` messages.
    fn append_history(
        &self,
        id: &str,
        entries: &[HistoryEntry],
        keep: usize,
    ) -> Result<(), StoreError>;
}

pub type Store = Arc<dyn SessionStore>;

/// Store calls running on the blocking pool at once; the others wait here,
/// as futures. The database pool has 4 connections (one SQLite writer), so
/// more at once only wait inside it, each on a thread of its own: a hundred
/// runs ending together (`chat-many`) took 198 threads, each with its stack
/// and a share of malloc's per-thread arenas (70 threads and 3.4 MB less
/// peak RSS with this limit).
pub const BLOCKING_CALLS_MAX: usize = 8;
static BLOCKING_CALLS: tokio::sync::Semaphore =
    tokio::sync::Semaphore::const_new(BLOCKING_CALLS_MAX);

/// Runs a blocking store call on the blocking pool (at most
/// [`BLOCKING_CALLS_MAX`] at once, in the order they came).
pub async fn blocking<T, F>(store: &Store, f: F) -> Result<T, StoreError>
where
    T: Send + 'static,
    F: FnOnce(&dyn SessionStore) -> Result<T, StoreError> + Send + 'static,
{
    let store = store.clone();
    // Never closed, so acquiring cannot fail. The permit goes with the call:
    // a caller that stops waiting does not free a slot still in use.
    let permit = BLOCKING_CALLS.acquire().await.ok();
    tokio::task::spawn_blocking(move || {
        let _permit = permit;
        f(store.as_ref())
    })
    .await?
}

/// Looks up a session the user may see: another user's session is "not found" (E3).
pub async fn owned_session(
    store: &Store,
    session_id: &str,
    user_id: i64,
) -> Result<Option<SessionRow>, StoreError> {
    let id = session_id.to_string();
    let row = blocking(store, move |s| s.session(&id)).await?;
    Ok(row.filter(|r| r.user_id == user_id))
}
