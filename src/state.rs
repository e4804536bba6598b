//! Shared application state handed to every HTTP handler: handles to the
//! actors and the database pool (the only shared mutable thing, behind r2d2).

use std::sync::Arc;

use actix::Addr;
use actix_web::{web, HttpRequest};
use agentgate_actors::chat::run_registry::RunRegistry;
use agentgate_actors::config::GatewayConfig;
use agentgate_actors::limits::{AdmitSession, AdmitSocket, SocketTicket, Ticketed, UserLimits};
use agentgate_actors::plugin::PluginRegistry;
use agentgate_actors::remote::followers::Followers;
use agentgate_actors::shell::PtyHub;
use agentgate_actors::store::Store;
use agentgate_actors::watchdog::{watched_conn, ConnFd, ConnWatchdog, WatchedConn};
use agentgate_actors::AuthUser;

use crate::api::ApiError;
use crate::auth::{request_token, Keys};
use crate::db::{self, Db};
use crate::guard::{Identity, Policy};
use crate::throttle::LoginThrottle;

/// This node in cluster mode (`--redis-url`).
pub struct ClusterNode {
    /// The link to Redis (leases, streams, routed commands).
    pub bus: Addr<agentgate_actors::cluster::bus::ClusterBus>,
    /// `--node-id`, or the generated one.
    pub node_id: String,
}

pub struct AppState {
    pub config: Arc<GatewayConfig>,
    pub db: Db,
    /// The same database seen through the actors' seam.
    pub store: Store,
    pub keys: Keys,
    /// Platform mode: no token, every request is the first user.
    pub platform: bool,
    /// The supervisor of chat runs.
    pub registry: Addr<RunRegistry>,
    /// The registry of live terminals (`/shell`).
    pub shells: Addr<PtyHub>,
    /// Cluster mode: which node runs each terminal (`None` on a single node).
    pub pty_placement: Option<Addr<agentgate_actors::shell::PtyPlacement>>,
    /// The plugin directory: plugin servers and their ports.
    pub plugins: Addr<PluginRegistry>,
    /// Cuts off WebSocket connections whose client stopped reading.
    pub watchdog: Addr<ConnWatchdog>,
    /// Host and Origin rules (`--allowed-hosts`, `--allowed-origins`).
    pub policy: Policy,
    /// Password hashes (argon2, ~19 MiB each) allowed to run at once; beyond
    /// it a login or register is refused at once (503), never queued.
    pub hashes: Arc<tokio::sync::Semaphore>,
    /// Failed-login counters per username and per client address.
    pub throttle: Addr<LoginThrottle>,
    /// Where closed remote-session sockets left off (PROTOCOL.md 8).
    pub followers: Addr<Followers>,
    /// Open sockets and session creations per user (`--max-sockets-per-user`,
    /// `--max-sessions-per-minute`).
    pub limits: Addr<UserLimits>,
    /// The last supervision events (admin page).
    pub supervision: Addr<agentgate_actors::metrics::SupervisionLog>,
    /// Cluster mode: this node's id and its bus; `None` on a single node.
    pub cluster: Option<ClusterNode>,
    /// Set once, when the shutdown begins: the guard refuses upgrades from
    /// then on (503 `SHUTTING_DOWN`). Pausing the HTTP server is not enough:
    /// its accept loop takes the pause in its own time, and on a loaded
    /// machine a socket opened after the 1001 closes was still upgraded.
    pub shutting_down: Arc<std::sync::atomic::AtomicBool>,
}

impl AppState {
    /// The request's connection, for the watchdog (call before the upgrade).
    pub fn watched(&self, req: &HttpRequest) -> Option<WatchedConn> {
        let conn = watched_conn(req.conn_data::<ConnFd>(), &self.watchdog);
        if conn.is_none() {
            tracing::warn!("connection descriptor unknown: this socket is not watched for stalls");
        }
        conn
    }

    /// One more socket for the user, or 429 `TOO_MANY_SOCKETS` before the
    /// upgrade. The returned stream carries the ticket: the place is given
    /// back when the socket actor drops it (a WebSocket's inbound payload)
    /// or the response body is dropped (an SSE stream's outbound events).
    pub async fn admit_socket<S>(
        &self,
        user: &AuthUser,
        stream: S,
    ) -> Result<Ticketed<S>, ApiError> {
        let ticket: SocketTicket = self
            .limits
            .send(AdmitSocket { user_id: user.id })
            .await
            .map_err(ApiError::internal)?
            .map_err(|limit| {
                tracing::warn!(user = %user.username, limit, "socket refused: too many open sockets");
                ApiError::new(
                    actix_web::http::StatusCode::TOO_MANY_REQUESTS,
                    "TOO_MANY_SOCKETS",
                    format!("{limit} sockets of this user are open already (--max-sockets-per-user); close one first"),
                )
            })?;
        Ok(Ticketed::new(stream, ticket))
    }

    /// One more session for the user, or 429 `TOO_MANY_SESSIONS` with
    /// `Retry-After` once `--max-sessions-per-minute` were created in the last minute.
    pub async fn admit_session(&self, user: &AuthUser) -> Result<(), ApiError> {
        let admitted = self
            .limits
            .send(AdmitSession { user_id: user.id })
            .await
            .map_err(ApiError::internal)?;
        admitted.map_err(|wait| {
            let limit = self.config.limits.sessions_per_minute;
            ApiError::new(
                actix_web::http::StatusCode::TOO_MANY_REQUESTS,
                "TOO_MANY_SESSIONS",
                format!("{limit} sessions were created in the last minute (--max-sessions-per-minute); retry later"),
            )
            .retry_after(wait.as_secs() + 1)
        })
    }

    /// The user of a request (the request guard calls this for every private
    /// route, before any upgrade or spawn): platform mode's first user, else
    /// a valid token of an existing user that was not revoked since it was issued.
    pub async fn authenticate_request(&self, req: &HttpRequest) -> Result<Identity, ApiError> {
        let db = self.db.clone();
        if self.platform {
            let user = web::block(move || db.conn().and_then(|mut c| db::first_user(&mut c)))
                .await??
                .ok_or_else(|| ApiError::unauthorized("Platform mode: no user exists yet"))?;
            return Ok(Identity {
                admin: user.is_admin,
                token_version: user.token_version,
                expires: None,
                user: AuthUser {
                    id: i64::from(user.id),
                    username: user.username,
                },
            });
        }
        let token = request_token(req).ok_or_else(|| ApiError::unauthorized("Missing token"))?;
        let claims = self
            .keys
            .verify(&token)
            .ok_or_else(|| ApiError::unauthorized("Invalid or expired token"))?;
        // A token of a user that no longer exists (e.g. a reset database) is refused.
        let uid = claims.uid;
        let user = web::block(move || db.conn().and_then(|mut c| db::user_by_id(&mut c, uid)))
            .await??
            .filter(|u| u.username == claims.sub)
            .ok_or_else(|| ApiError::unauthorized("Unknown user"))?;
        if claims.ver < user.token_version {
            return Err(ApiError::unauthorized("Token revoked"));
        }
        Ok(Identity {
            admin: user.is_admin,
            token_version: user.token_version,
            expires: Some(std::time::UNIX_EPOCH + std::time::Duration::from_secs(claims.exp)),
            user: AuthUser {
                id: i64::from(user.id),
                username: user.username,
            },
        })
    }
}
