//! REST routes the reference's web UI reads beyond the chat protocol, in its
//! shapes (WEB-UI.md), all authenticated and per user:
//!
//! | route | answer |
//! |---|---|
//! | `GET /api/projects?sessionsLimit&sessionsOffset` | a raw array `[{projectId, path, fullPath, displayName, isStarred, sessions, sessionMeta}]`: the projects table plus every path with sessions |
//! | `POST /api/projects/create-project` | `{path, customName?}` -> `{success, project, message}`; 400 `PROJECT_PATH_REQUIRED` / `INVALID_PROJECT_PATH`, 409 `PROJECT_ALREADY_EXISTS` |
//! | `GET /api/projects/{id}/sessions?limit&offset` | raw `{projectId, sessions, sessionMeta:{hasMore,total}}`, most recent first; 404 `PROJECT_NOT_FOUND` |
//! | `POST /api/projects/{id}/toggle-star` | `{success, isStarred}` |
//! | `PUT /api/projects/{id}/rename` | `{displayName}` -> `{success}` |
//! | `GET /api/providers/sessions/{id}` | the session with `summary`, `lastActivity`, `messageCount`, `project` |
//! | `GET /api/providers/sessions/{id}/messages?limit&offset` | `{messages, total, hasMore, offset, limit}`: the recorded history, `offset` counted back from the newest, each page oldest first |
//!
//! Sessions summarize as the reference's: `{id, provider, summary,
//! messageCount, lastActivity}`.

use std::collections::HashMap;
use std::path::{Component, Path, PathBuf};

use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse};
use serde_json::{json, Value};

use crate::api::{self, ApiError};
use crate::db::{self, history, project, project::Project, project::SessionSummary};
use crate::guard::Authed;
use crate::request_input::{NewProject, Rename};
use crate::state::AppState;

/// Sessions per project page, by default and at most (the reference's).
const SESSIONS_PAGE: i64 = 20;
const SESSIONS_PAGE_MAX: i64 = 200;
/// Largest history page a client may ask for.
const MESSAGES_PAGE_MAX: i64 = 10_000;
/// Folders that are never a project (the reference refuses these too).
const SYSTEM_DIRS: [&str; 12] = [
    "/", "/bin", "/boot", "/dev", "/etc", "/lib", "/lib64", "/proc", "/run", "/sbin", "/sys",
    "/usr",
];

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.route("/api/projects", web::get().to(list_projects))
        .route(
            "/api/projects/create-project",
            web::post().to(create_project),
        )
        .route(
            "/api/projects/{id}/sessions",
            web::get().to(project_sessions),
        )
        .route(
            "/api/projects/{id}/toggle-star",
            web::post().to(toggle_star),
        )
        .route("/api/projects/{id}/rename", web::put().to(rename_project))
        .route(
            "/api/providers/sessions/{id}/messages",
            web::get().to(session_messages),
        );
}

/// A non-negative integer query parameter, or 400.
fn query_int(req: &HttpRequest, name: &str) -> Result<Option<i64>, ApiError> {
    let query = web::Query::<HashMap<String, String>>::from_query(req.query_string())
        .map_err(|e| ApiError::bad_request("INVALID_QUERY_PARAMETER", e.to_string()))?;
    let Some(raw) = query.get(name).map(|v| v.trim()).filter(|v| !v.is_empty()) else {
        return Ok(None);
    };
    raw.parse::<i64>()
        .ok()
        .filter(|v| *v >= 0)
        .map(Some)
        .ok_or_else(|| {
            ApiError::bad_request(
                "INVALID_QUERY_PARAMETER",
                format!("{name} must be a non-negative integer"),
            )
        })
}

fn user_id(user: &agentgate_actors::AuthUser) -> Result<i32, ApiError> {
    i32::try_from(user.id).map_err(ApiError::internal)
}

fn project_id(raw: &str) -> Result<i32, ApiError> {
    raw.parse()
        .map_err(|_| ApiError::not_found("PROJECT_NOT_FOUND", "Project not found"))
}

pub fn session_summary_json(s: &SessionSummary) -> Value {
    json!({
        "id": s.id,
        "provider": s.provider,
        "summary": s.summary,
        "messageCount": s.message_count,
        "lastActivity": s.last_activity,
        "createdAt": s.created_at,
    })
}

fn project_json(p: &Project, sessions: &[SessionSummary], total: i64, offset: i64) -> Value {
    let shown = i64::try_from(sessions.len()).unwrap_or(i64::MAX);
    json!({
        "projectId": p.id.to_string(),
        "path": p.path,
        "fullPath": p.path,
        "displayName": p.name(),
        "customName": p.display_name,
        "isStarred": p.is_starred,
        "isArchived": false,
        "sessions": sessions.iter().map(session_summary_json).collect::<Vec<_>>(),
        "sessionMeta": {"hasMore": offset + shown < total, "total": total},
    })
}

fn sessions_window(req: &HttpRequest, limit: &str, offset: &str) -> Result<(i64, i64), ApiError> {
    let limit = query_int(req, limit)?
        .unwrap_or(SESSIONS_PAGE)
        .clamp(1, SESSIONS_PAGE_MAX);
    Ok((limit, query_int(req, offset)?.unwrap_or(0)))
}

async fn list_projects(
    Authed(user): Authed,
    req: HttpRequest,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let uid = user_id(&user)?;
    let (limit, offset) = sessions_window(&req, "sessionsLimit", "sessionsOffset")?;
    let db = state.db.clone();
    let projects = web::block(move || -> Result<Vec<Value>, db::DbError> {
        let mut conn = db.conn()?;
        project::projects_of(&mut conn, uid)?
            .iter()
            .map(|p| {
                let (sessions, total) =
                    project::sessions_page(&mut conn, uid, &p.path, limit, offset)?;
                Ok(project_json(p, &sessions, total, offset))
            })
            .collect()
    })
    .await??;
    // A raw array, as the reference answers (the UI reads no envelope here).
    Ok(HttpResponse::Ok().json(projects))
}

async fn project_sessions(
    Authed(user): Authed,
    req: HttpRequest,
    state: web::Data<AppState>,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let (uid, id) = (user_id(&user)?, project_id(&path)?);
    let (limit, offset) = sessions_window(&req, "limit", "offset")?;
    let db = state.db.clone();
    let page = web::block(move || -> Result<Option<Value>, db::DbError> {
        let mut conn = db.conn()?;
        let Some(p) = project::project_by_id(&mut conn, uid, id)? else {
            return Ok(None);
        };
        let (sessions, total) = project::sessions_page(&mut conn, uid, &p.path, limit, offset)?;
        let shown = i64::try_from(sessions.len()).unwrap_or(i64::MAX);
        Ok(Some(json!({
            "projectId": p.id.to_string(),
            "sessions": sessions.iter().map(session_summary_json).collect::<Vec<_>>(),
            "sessionMeta": {"hasMore": offset + shown < total, "total": total},
        })))
    })
    .await??
    .ok_or_else(|| ApiError::not_found("PROJECT_NOT_FOUND", "Project not found"))?;
    Ok(HttpResponse::Ok().json(page))
}

/// The folder a project may live in: absolute, not a system folder, and a
/// directory (created when missing, as the reference does). Blocking.
fn project_dir(raw: &str) -> Result<PathBuf, ApiError> {
    let invalid = |why: &str| {
        ApiError::bad_request(
            "INVALID_PROJECT_PATH",
            format!("Invalid project path: {why}"),
        )
    };
    let path = Path::new(raw);
    if !path.is_absolute() {
        return Err(invalid("it must be absolute"));
    }
    if path.components().any(|c| matches!(c, Component::ParentDir)) {
        return Err(invalid("it must not contain '..'"));
    }
    let system = |p: &Path| {
        SYSTEM_DIRS
            .iter()
            .any(|d| p == Path::new(d) || (*d != "/" && p.starts_with(d)))
    };
    if system(path) {
        return Err(invalid("system folders cannot be projects"));
    }
    if !path.exists() {
        std::fs::create_dir_all(path).map_err(|e| invalid(&format!("cannot create it: {e}")))?;
    }
    let resolved = path.canonicalize().map_err(|e| invalid(&e.to_string()))?;
    if !resolved.is_dir() {
        return Err(ApiError::bad_request(
            "PROJECT_PATH_NOT_DIRECTORY",
            "The path exists but is not a directory",
        ));
    }
    if system(&resolved) {
        return Err(invalid("system folders cannot be projects"));
    }
    Ok(resolved)
}

async fn create_project(
    Authed(user): Authed,
    state: web::Data<AppState>,
    body: web::Json<NewProject>,
) -> Result<HttpResponse, ApiError> {
    let uid = user_id(&user)?;
    let body = body.into_inner();
    let raw = body
        .path
        .as_deref()
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .ok_or_else(|| ApiError::bad_request("PROJECT_PATH_REQUIRED", "path is required"))?
        .to_string();
    let name = body
        .custom_name
        .map(|n| n.trim().to_string())
        .filter(|n| !n.is_empty());
    let db = state.db.clone();
    let created = web::block(move || -> Result<Result<Project, ApiError>, db::DbError> {
        let dir = match project_dir(&raw) {
            Ok(dir) => dir,
            Err(e) => return Ok(Err(e)),
        };
        let path = dir.to_string_lossy().into_owned();
        let mut conn = db.conn()?;
        Ok(
            project::create_project(&mut conn, uid, &path, name.as_deref())?.ok_or_else(|| {
                ApiError::new(
                    StatusCode::CONFLICT,
                    "PROJECT_ALREADY_EXISTS",
                    format!("Project path already exists: {path}"),
                )
            }),
        )
    })
    .await???;
    tracing::info!(user = %user.username, path = %created.path, "project created");
    Ok(HttpResponse::Ok().json(json!({
        "success": true,
        "project": project_json(&created, &[], 0, 0),
        "message": "Project created successfully",
    })))
}

async fn toggle_star(
    Authed(user): Authed,
    state: web::Data<AppState>,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let (uid, id) = (user_id(&user)?, project_id(&path)?);
    let db = state.db.clone();
    let starred = web::block(move || {
        db.conn()
            .and_then(|mut c| project::toggle_star(&mut c, uid, id))
    })
    .await??
    .ok_or_else(|| ApiError::not_found("PROJECT_NOT_FOUND", "Project not found"))?;
    Ok(HttpResponse::Ok().json(json!({"success": true, "isStarred": starred})))
}

async fn rename_project(
    Authed(user): Authed,
    state: web::Data<AppState>,
    path: web::Path<String>,
    body: web::Json<Rename>,
) -> Result<HttpResponse, ApiError> {
    let (uid, id) = (user_id(&user)?, project_id(&path)?);
    let name = body
        .into_inner()
        .display_name
        .map(|n| n.trim().to_string())
        .filter(|n| !n.is_empty());
    let db = state.db.clone();
    let found = web::block(move || {
        db.conn()
            .and_then(|mut c| project::rename(&mut c, uid, id, name.as_deref()))
    })
    .await??;
    if !found {
        return Err(ApiError::not_found(
            "PROJECT_NOT_FOUND",
            "Project not found",
        ));
    }
    Ok(HttpResponse::Ok().json(json!({"success": true})))
}

/// `GET /api/providers/sessions/{id}`: the row plus what the web UI resolves
/// a deep link with (`summary`, `lastActivity`, `project`).
pub async fn session_details(
    Authed(user): Authed,
    state: web::Data<AppState>,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let db = state.db.clone();
    let id = path.into_inner();
    let uid = user.id;
    let details = web::block(move || -> Result<Option<Value>, db::DbError> {
        let mut conn = db.conn()?;
        let Some(s) = db::session_by_id(&mut conn, &id)?.filter(|s| i64::from(s.user_id) == uid)
        else {
            return Ok(None);
        };
        let summary = project::summary_of(&mut conn, &s)?;
        let project = project::project_for_path(&mut conn, s.user_id, &s.project_path)?;
        // provider_session_id never reaches a client (PROTOCOL.md section 2).
        Ok(Some(json!({
            "sessionId": s.id,
            "provider": s.provider,
            "projectPath": s.project_path,
            "sessionName": s.custom_name,
            "summary": summary.summary,
            "messageCount": summary.message_count,
            "archived": s.archived,
            "isArchived": s.archived,
            "lastSeq": s.last_seq,
            "createdAt": s.created_at,
            "updatedAt": s.updated_at,
            "lastActivity": s.updated_at,
            "project": project.map(|p| json!({
                "projectId": p.id.to_string(),
                "path": p.path,
                "fullPath": p.path,
                "displayName": p.name(),
                "isStarred": p.is_starred,
            })),
        })))
    })
    .await??
    .ok_or_else(|| ApiError::not_found("SESSION_NOT_FOUND", "Session not found"))?;
    Ok(api::ok(details))
}

async fn session_messages(
    Authed(user): Authed,
    req: HttpRequest,
    state: web::Data<AppState>,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let limit = query_int(&req, "limit")?.map(|l| l.min(MESSAGES_PAGE_MAX));
    let offset = query_int(&req, "offset")?.unwrap_or(0);
    let db = state.db.clone();
    let (id, uid) = (path.into_inner(), user.id);
    let page = web::block(move || -> Result<Option<history::Page>, db::DbError> {
        let mut conn = db.conn()?;
        if db::session_by_id(&mut conn, &id)?.is_none_or(|s| i64::from(s.user_id) != uid) {
            return Ok(None);
        }
        history::page(&mut conn, &id, limit, offset).map(Some)
    })
    .await??
    .ok_or_else(|| ApiError::not_found("SESSION_NOT_FOUND", "Session not found"))?;
    Ok(api::ok(json!({
        "messages": page.messages,
        "total": page.total,
        "hasMore": page.has_more,
        "offset": offset,
        "limit": limit,
    })))
}
