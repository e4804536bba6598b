//! The admin API (admins only: the [`Admin`] extractor answers 403
//! `ADMIN_ONLY` to anyone else). What is running, for whom, and whether
//! anything is stuck, gathered by typed messages to the actors that own it:
//!
//! | route | answer |
//! |---|---|
//! | `GET /api/admin/snapshot` | chat sockets and runs (RunRegistry), terminals (PtyHub, each PtySession describing itself), plugin servers and open plugin proxies (PluginRegistry), open connections by endpoint |
//! | `GET /api/admin/events` | server-sent events: `snapshot` once a second, each built only when the client has read the previous one (at most one in flight per client) |
//! | `POST /api/admin/runs/{sessionId}/abort` | aborts the session's live run (its clients get `complete` with `aborted: true`) |
//! | `POST /api/admin/ptys/{id}/kill` | kills the terminal (its sockets see the exit line) |
//! | `POST /api/admin/plugins/{name}/restart` / `stop` | the plugin's status afterwards |
//! | `POST /api/admin/sockets/{id}/disconnect` | closes the chat socket with 4000 |
//!
//! The page at `/admin` (files embedded in the binary) reads these.

use std::collections::HashMap;
use std::time::Duration;

use actix_web::http::StatusCode;
use actix_web::{web, HttpResponse};
use agentgate_actors::chat::run_registry::{
    AbortRun, AdminDisconnect, AdminSnapshot, RegistrySnapshot, ADMIN_USER,
};
use agentgate_actors::metrics::{metrics, RecentSupervision};
use agentgate_actors::plugin::{ListPlugins, ListProxies, StartPlugin, StopPlugin};
use agentgate_actors::shell::{KillPty, ListPtys};
use serde_json::{json, Value};

use crate::api::{self, ApiError};
use crate::db;
use crate::guard::Admin;
use crate::plugins_api::{answer_of, checked_name};
use crate::state::AppState;

/// How often the event stream sends a snapshot.
const EVENTS_EVERY: Duration = Duration::from_secs(1);

/// The admin page's files, embedded: no build step, nothing from a CDN.
const PAGE_HTML: &str = include_str!("admin_page/index.html");
const PAGE_JS: &str = include_str!("admin_page/admin.js");

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.route("/admin", web::get().to(page))
        .route("/admin/admin.js", web::get().to(page_js))
        .route("/api/admin/snapshot", web::get().to(snapshot))
        .route("/api/admin/events", web::get().to(events))
        .route("/api/admin/runs/{session}/abort", web::post().to(abort_run))
        .route("/api/admin/ptys/{id}/kill", web::post().to(kill_pty))
        .route(
            "/api/admin/plugins/{name}/restart",
            web::post().to(restart_plugin),
        )
        .route(
            "/api/admin/plugins/{name}/stop",
            web::post().to(stop_plugin),
        )
        .route(
            "/api/admin/sockets/{id}/disconnect",
            web::post().to(disconnect),
        );
}

/// The page itself holds no data (public, like the login form); it asks
/// for the snapshot with the admin's token.
async fn page() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/html; charset=utf-8")
        .insert_header((
            "Content-Security-Policy",
            "default-src 'self'; style-src 'self' 'unsafe-inline'",
        ))
        .body(PAGE_HTML)
}

async fn page_js() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/javascript; charset=utf-8")
        .body(PAGE_JS)
}

/// The whole snapshot as JSON (also what `agentgate status` prints).
pub async fn gather(state: &AppState) -> Result<Value, ApiError> {
    let (registry, ptys, plugins, proxies, supervision) = tokio::join!(
        state.registry.send(AdminSnapshot),
        state.shells.send(ListPtys),
        state.plugins.send(ListPlugins),
        state.plugins.send(ListProxies),
        state.supervision.send(RecentSupervision),
    );
    let registry: RegistrySnapshot = registry.unwrap_or_default();
    let ptys = ptys.map_err(ApiError::internal)?;
    let plugins = plugins.map_err(ApiError::internal)?;
    let db = state.db.clone();
    let names: HashMap<i64, String> =
        web::block(move || db.conn().and_then(|mut c| db::usernames(&mut c))).await??;
    let name = |id: i64| names.get(&id).cloned().unwrap_or_default();
    let mut sockets = serde_json::to_value(&registry.sockets).map_err(ApiError::internal)?;
    let mut runs = serde_json::to_value(&registry.runs).map_err(ApiError::internal)?;
    let mut ptys_json = serde_json::to_value(&ptys).map_err(ApiError::internal)?;
    for list in [&mut sockets, &mut runs, &mut ptys_json] {
        for item in list.as_array_mut().into_iter().flatten() {
            let user = item["userId"].as_i64().map(name).unwrap_or_default();
            item["user"] = json!(user);
        }
    }
    let m = metrics();
    let connections: Value = ["ws", "shell", "plugin", "remote_ws", "remote_sse"]
        .iter()
        .map(|e| {
            (
                e.to_string(),
                json!(m.connections_open.with_label_values(&[e]).get()),
            )
        })
        .collect::<serde_json::Map<_, _>>()
        .into();
    Ok(json!({
        "sockets": sockets,
        "runs": runs,
        "ptys": ptys_json,
        "plugins": plugins,
        "pluginProxies": proxies.unwrap_or_default(),
        "connections": connections,
        "supervision": supervision.unwrap_or_default(),
    }))
}

async fn snapshot(_: Admin, state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    Ok(api::ok(gather(&state).await?))
}

/// One `snapshot` event per second; the next is built only once the
/// previous one was taken by the connection, so a client that stops
/// reading holds one snapshot, not a growing queue.
async fn events(Admin(user): Admin, state: web::Data<AppState>) -> HttpResponse {
    tracing::info!(user = %user.username, "admin event stream opened");
    let stream = futures_util::stream::unfold((state, true), |(state, first)| async move {
        if !first {
            tokio::time::sleep(EVENTS_EVERY).await;
        }
        let chunk = match gather(&state).await {
            Ok(v) => format!("event: snapshot\ndata: {v}\n\n"),
            Err(e) => format!("event: error\ndata: {}\n\n", json!(e.message)),
        };
        Some((
            Ok::<_, actix_web::Error>(web::Bytes::from(chunk)),
            (state, false),
        ))
    });
    HttpResponse::Ok()
        .content_type("text/event-stream")
        .insert_header(("Cache-Control", "no-cache"))
        .streaming(stream)
}

async fn abort_run(
    Admin(user): Admin,
    state: web::Data<AppState>,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let session_id = path.into_inner();
    tracing::warn!(admin = %user.username, session_id = %session_id, "admin aborts a run");
    let abort = AbortRun {
        user_id: ADMIN_USER,
        session_id: session_id.clone(),
    };
    match state
        .registry
        .send(abort)
        .await
        .map_err(ApiError::internal)?
    {
        Ok(()) => Ok(api::ok(json!({"sessionId": session_id, "aborted": true}))),
        Err(err) => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "NO_ACTIVE_RUN",
            err.message,
        )),
    }
}

async fn kill_pty(
    Admin(user): Admin,
    state: web::Data<AppState>,
    path: web::Path<u64>,
) -> Result<HttpResponse, ApiError> {
    let id = path.into_inner();
    tracing::warn!(admin = %user.username, pty = id, "admin kills a terminal");
    if state
        .shells
        .send(KillPty { id })
        .await
        .map_err(ApiError::internal)?
    {
        Ok(api::ok(json!({"id": id, "killed": true})))
    } else {
        Err(ApiError::not_found(
            "PTY_NOT_FOUND",
            format!("No live terminal {id}"),
        ))
    }
}

async fn restart_plugin(
    Admin(user): Admin,
    state: web::Data<AppState>,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let name = checked_name(path.into_inner())?;
    tracing::warn!(admin = %user.username, plugin = %name, "admin restarts a plugin");
    let stopped = state.plugins.send(StopPlugin { name: name.clone() }).await;
    answer_of(stopped)?;
    answer_of(state.plugins.send(StartPlugin { name }).await)
}

async fn stop_plugin(
    Admin(user): Admin,
    state: web::Data<AppState>,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let name = checked_name(path.into_inner())?;
    tracing::warn!(admin = %user.username, plugin = %name, "admin stops a plugin");
    answer_of(state.plugins.send(StopPlugin { name }).await)
}

async fn disconnect(
    Admin(user): Admin,
    state: web::Data<AppState>,
    path: web::Path<u64>,
) -> Result<HttpResponse, ApiError> {
    let socket = path.into_inner();
    tracing::warn!(admin = %user.username, socket, "admin disconnects a socket");
    if state
        .registry
        .send(AdminDisconnect { socket })
        .await
        .map_err(ApiError::internal)?
    {
        Ok(api::ok(json!({"id": socket, "disconnected": true})))
    } else {
        Err(ApiError::not_found(
            "SOCKET_NOT_FOUND",
            format!("No chat socket {socket}"),
        ))
    }
}
