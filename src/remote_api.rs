//! Remote sessions (PROTOCOL.md section 8): the HTTP side of the protocol
//! Claude Code's remote-session client speaks, so it can follow and steer
//! an agentgate session from another machine.
//!
//! | route | what |
//! |---|---|
//! | `GET /v1/environment_providers` | the user's projects, each an environment |
//! | `POST /v1/sessions` | a session in that project; its first user event starts the first turn |
//! | `GET /v1/sessions/{id}` | the session |
//! | `POST /v1/sessions/{id}/events`, `POST /v1/code/sessions/{id}/events` | user turns (`RUN_IN_PROGRESS`: 409), permission answers, interrupts |
//! | `GET /v1/sessions/ws/{id}/subscribe` | the WebSocket generation ([`RemoteSocket`]) |
//! | `GET /v1/code/sessions/{id}/events/stream` | the SSE generation ([`EventStream`]) |
//! | `POST /v1/code/sessions/{id}/client/presence` | accepted, nothing kept |
//!
//! Auth is agentgate's JWT (`Authorization: Bearer`, where the real client
//! puts `CLAUDE_CODE_OAUTH_TOKEN`, or `?token=`). Ids are `session_<app id>`
//! (a bare app id works too). Errors have the Anthropic API's shape,
//! `{"type":"error","error":{"type","message","code"}}`; an unknown or
//! foreign session is 404 (at the upgrade too, which the client takes as
//! final), a bad token 401.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use actix::Actor;
use actix_web::http::StatusCode;
use actix_web::{web, HttpMessage, HttpRequest, HttpResponse, ResponseError};
use actix_web_actors::ws;
use agentgate_actors::chat::run_registry::{
    AbortRun, ListRunning, RespondPermission, RunStarted, StartRun,
};
use agentgate_actors::config::MAX_INBOUND_FRAME;
use agentgate_actors::protocol::{ChatError, ErrorCode};
use agentgate_actors::provider::{safe_id, ProviderKind};
use agentgate_actors::remote::event_stream::EventStream;
use agentgate_actors::remote::remote_socket::RemoteSocket;
use agentgate_actors::remote::sdk::Inbound;
use agentgate_actors::remote::{app_id, remote_id, RemoteDeps, Target};
use agentgate_actors::store::SessionRow;
use agentgate_actors::AuthUser;
use serde_json::{json, Value};

use crate::api::ApiError;
use crate::auth::request_token;
use crate::db;
use crate::guard::Identity;
use crate::request_input::query_value;
use crate::state::AppState;

/// User events accepted in one POST.
const MAX_EVENTS_PER_POST: usize = 32;

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.route(
        "/v1/environment_providers",
        web::get().to(environment_providers),
    )
    .route("/v1/sessions", web::post().to(create_session))
    .route("/v1/sessions/{id}", web::get().to(get_session))
    .route("/v1/sessions/{id}/events", web::post().to(post_events))
    .route("/v1/sessions/ws/{id}/subscribe", web::get().to(subscribe))
    .route("/v1/code/sessions/{id}/events", web::post().to(post_events))
    .route(
        "/v1/code/sessions/{id}/events/stream",
        web::get().to(event_stream),
    )
    .route(
        "/v1/code/sessions/{id}/client/presence",
        web::post().to(presence),
    );
}

/// An error in the Anthropic API's shape, with agentgate's code beside.
#[derive(Debug)]
pub struct V1Error {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl V1Error {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        V1Error {
            status,
            code,
            message: message.into(),
        }
    }

    fn not_found() -> Self {
        V1Error::new(
            StatusCode::NOT_FOUND,
            "SESSION_NOT_FOUND",
            "Session not found",
        )
    }

    fn bad_request(message: impl Into<String>) -> Self {
        V1Error::new(StatusCode::BAD_REQUEST, "INVALID_BODY", message)
    }
}

impl std::fmt::Display for V1Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

impl ResponseError for V1Error {
    fn status_code(&self) -> StatusCode {
        self.status
    }

    fn error_response(&self) -> HttpResponse {
        let kind = match self.status.as_u16() {
            401 => "authentication_error",
            403 => "permission_error",
            404 => "not_found_error",
            409 => "conflict_error",
            429 => "rate_limit_error",
            400..=499 => "invalid_request_error",
            _ => "api_error",
        };
        HttpResponse::build(self.status).json(json!({
            "type": "error",
            "error": {"type": kind, "message": self.message, "code": self.code},
        }))
    }
}

impl From<ApiError> for V1Error {
    fn from(e: ApiError) -> Self {
        V1Error::new(e.status, e.code, e.message)
    }
}

impl From<ChatError> for V1Error {
    fn from(e: ChatError) -> Self {
        let status = match e.code {
            ErrorCode::RunInProgress => StatusCode::CONFLICT,
            ErrorCode::SessionNotFound => StatusCode::NOT_FOUND,
            ErrorCode::NoActiveRun => StatusCode::CONFLICT,
            ErrorCode::TooManyRuns => StatusCode::TOO_MANY_REQUESTS,
            ErrorCode::ClusterUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::InternalError => StatusCode::INTERNAL_SERVER_ERROR,
            _ => StatusCode::BAD_REQUEST,
        };
        V1Error::new(status, e.code.as_str(), e.message)
    }
}

fn internal(err: impl std::fmt::Display) -> V1Error {
    V1Error::from(ApiError::internal(err))
}

/// The caller and when its token expires (`None` in platform mode).
/// The caller of a request.
struct Caller {
    user: AuthUser,
    /// When its token expires, and the token version it carries (`None`
    /// in platform mode: no token).
    expires: Option<SystemTime>,
    token_version: Option<i64>,
}

fn caller(state: &AppState, req: &HttpRequest) -> Result<Caller, V1Error> {
    // The request guard authenticated the request before any handler runs.
    let identity = req
        .extensions()
        .get::<Identity>()
        .cloned()
        .ok_or_else(|| V1Error::from(ApiError::unauthorized("Missing token")))?;
    let claims = (!state.platform)
        .then(|| request_token(req))
        .flatten()
        .and_then(|t| state.keys.verify(&t));
    Ok(Caller {
        user: identity.user,
        expires: claims
            .as_ref()
            .map(|c| UNIX_EPOCH + Duration::from_secs(c.exp)),
        token_version: claims.map(|_| i64::from(identity.token_version)),
    })
}

impl Caller {
    fn target(self, session: SessionRow) -> Target {
        Target {
            user: self.user,
            session,
            token_expires: self.expires,
            token_version: self.token_version,
        }
    }
}

/// The user's session named by a remote id, or 404 (another user's too).
async fn owned(state: &AppState, user: &AuthUser, id: &str) -> Result<SessionRow, V1Error> {
    let (db, id, uid) = (state.db.clone(), app_id(id).to_string(), user.id);
    // The row with its project and summary (what session_upserted names).
    web::block(move || {
        db.conn().and_then(|mut c| {
            db::session_by_id(&mut c, &id)?
                .filter(|s| i64::from(s.user_id) == uid)
                .map(|s| db::session_row(&mut c, s))
                .transpose()
        })
    })
    .await
    .map_err(internal)?
    .map_err(internal)?
    .ok_or_else(V1Error::not_found)
}

/// `env_<hex of the project path>`: stable, and decodable without a table.
fn environment_id(path: &str) -> String {
    let hex: String = path.bytes().map(|b| format!("{b:02x}")).collect();
    format!("env_{hex}")
}

fn environment_path(id: &str) -> Option<String> {
    let hex = id.strip_prefix("env_")?;
    if hex.len() % 2 != 0 {
        return None;
    }
    let bytes: Option<Vec<u8>> = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
        .collect();
    String::from_utf8(bytes?).ok()
}

async fn projects(state: &AppState, user: &AuthUser) -> Result<Vec<(String, String)>, V1Error> {
    let db = state.db.clone();
    let uid = i32::try_from(user.id).map_err(internal)?;
    web::block(move || db.conn().and_then(|mut c| db::user_projects(&mut c, uid)))
        .await
        .map_err(internal)?
        .map_err(internal)
}

async fn environment_providers(
    req: HttpRequest,
    state: web::Data<AppState>,
) -> Result<HttpResponse, V1Error> {
    let user = caller(&state, &req)?.user;
    let environments: Vec<Value> = projects(&state, &user)
        .await?
        .into_iter()
        .map(|(path, created_at)| {
            let name = std::path::Path::new(&path)
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| path.clone());
            json!({
                "kind": "anthropic_cloud",
                "environment_id": environment_id(&path),
                "name": name,
                "path": path,
                "created_at": created_at,
                "state": "active",
            })
        })
        .collect();
    let (first, last) = (
        environments.first().map(|e| e["environment_id"].clone()),
        environments.last().map(|e| e["environment_id"].clone()),
    );
    Ok(HttpResponse::Ok().json(json!({
        "environments": environments,
        "has_more": false,
        "first_id": first,
        "last_id": last,
    })))
}

/// An event of a POST body: `{type:"event", data}` (POST /v1/sessions),
/// `{payload}` (the SSE generation) or the message itself.
fn event_message(event: &Value) -> &Value {
    event
        .get("data")
        .filter(|_| event.get("type").and_then(Value::as_str) == Some("event"))
        .or_else(|| event.get("payload"))
        .unwrap_or(event)
}

fn events_of(body: &Value) -> Result<Vec<Inbound>, V1Error> {
    let events = body
        .get("events")
        .and_then(Value::as_array)
        .ok_or_else(|| V1Error::bad_request("events must be an array"))?;
    if events.len() > MAX_EVENTS_PER_POST {
        return Err(V1Error::bad_request(format!(
            "at most {MAX_EVENTS_PER_POST} events per request"
        )));
    }
    events
        .iter()
        .map(|e| Inbound::parse(event_message(e)).map_err(|r| V1Error::bad_request(r.0)))
        .collect()
}

/// Starts a user turn in the session, as `chat.send` would.
async fn start_turn(
    state: &AppState,
    user: &AuthUser,
    session: SessionRow,
    content: String,
    uuid: Option<String>,
    model: Option<String>,
) -> Result<RunStarted, V1Error> {
    let options = match model.filter(|m| safe_id(m)) {
        Some(model) => json!({ "model": model }),
        None => json!({}),
    };
    let cwd = std::path::PathBuf::from(&session.project_path);
    let start = StartRun {
        socket: None,
        user_id: user.id,
        session,
        content,
        options,
        // The event's uuid: a client that re-posts it never runs it twice (E6).
        client_request_id: uuid,
        cwd,
    };
    Ok(state.registry.send(start).await.map_err(internal)??)
}

async fn is_running(state: &AppState, user: &AuthUser, session_id: &str) -> bool {
    state
        .registry
        .send(ListRunning { user_id: user.id })
        .await
        .map(|list| list.iter().any(|r| r.session_id == session_id))
        .unwrap_or(false)
}

fn session_json(session: &SessionRow, running: bool, context: Option<&Value>) -> Value {
    json!({
        "type": "session",
        "id": remote_id(&session.id),
        "title": session.custom_name.clone().unwrap_or_default(),
        "session_status": if running { "running" } else { "idle" },
        "environment_id": environment_id(&session.project_path),
        "provider": session.provider,
        "created_at": session.created_at,
        "updated_at": session.updated_at,
        "session_context": context.cloned().unwrap_or_else(|| json!({"sources": [], "outcomes": []})),
    })
}

async fn create_session(
    req: HttpRequest,
    state: web::Data<AppState>,
    body: web::Json<Value>,
) -> Result<HttpResponse, V1Error> {
    let user = caller(&state, &req)?.user;
    let body = body.into_inner();
    let environment = body
        .get("environment_id")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let known = projects(&state, &user).await?;
    let project = environment_path(environment)
        .filter(|p| known.iter().any(|(k, _)| k == p))
        .ok_or_else(|| {
            V1Error::new(
                StatusCode::NOT_FOUND,
                "ENVIRONMENT_NOT_FOUND",
                "No such environment; GET /v1/environment_providers lists them",
            )
        })?;
    // Extension: another provider than Claude for the session.
    let provider = body
        .get("provider")
        .and_then(Value::as_str)
        .unwrap_or("claude");
    let kind: ProviderKind = provider
        .parse()
        .map_err(|_| V1Error::bad_request(format!("Unsupported provider '{provider}'")))?;
    let turns = match body.get("events") {
        Some(_) => events_of(&body)?,
        None => Vec::new(),
    };
    let title = body
        .get("title")
        .and_then(Value::as_str)
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(|t| t.chars().take(100).collect::<String>());
    state.admit_session(&user).await.map_err(V1Error::from)?;
    let db = state.db.clone();
    let uid = i32::try_from(user.id).map_err(internal)?;
    let session = web::block(move || {
        db.conn().and_then(|mut c| {
            let s = db::create_session(&mut c, uid, kind.as_str(), &project, title.as_deref())?;
            db::session_row(&mut c, s)
        })
    })
    .await
    .map_err(internal)?
    .map_err(internal)?;
    tracing::info!(session_id = %session.id, provider = %session.provider, user = %user.username, "remote session created");
    let model = body
        .pointer("/session_context/model")
        .and_then(Value::as_str)
        .map(str::to_string);
    let mut running = false;
    // Like the real service: the initial events' first user turn starts at once.
    if let Some(Inbound::User { content, uuid }) = turns
        .into_iter()
        .find(|t| matches!(t, Inbound::User { .. }))
    {
        start_turn(&state, &user, session.clone(), content, uuid, model).await?;
        running = true;
    }
    Ok(HttpResponse::Ok().json(session_json(&session, running, body.get("session_context"))))
}

async fn get_session(
    req: HttpRequest,
    state: web::Data<AppState>,
    path: web::Path<String>,
) -> Result<HttpResponse, V1Error> {
    let user = caller(&state, &req)?.user;
    let session = owned(&state, &user, &path).await?;
    let running = is_running(&state, &user, &session.id).await;
    Ok(HttpResponse::Ok().json(session_json(&session, running, None)))
}

/// User turns, permission answers and interrupts, in order. Each gets a
/// result; a user turn's `sequence_num` is the seq its run starts at.
async fn post_events(
    req: HttpRequest,
    state: web::Data<AppState>,
    path: web::Path<String>,
    body: web::Json<Value>,
) -> Result<HttpResponse, V1Error> {
    let user = caller(&state, &req)?.user;
    let session = owned(&state, &user, &path).await?;
    let mut results = Vec::new();
    for event in events_of(&body)? {
        let result = match event {
            Inbound::User { content, uuid } => {
                let started =
                    start_turn(&state, &user, session.clone(), content, uuid, None).await?;
                json!({"sequence_num": started.first_seq, "run_id": started.run_id, "duplicate": started.duplicate})
            }
            Inbound::PermissionAnswer {
                request_id,
                decision,
            } => {
                let answer = RespondPermission {
                    user_id: user.id,
                    request_id,
                    decision,
                };
                state.registry.send(answer).await.map_err(internal)?;
                json!({"sequence_num": 0})
            }
            Inbound::Interrupt { .. } => {
                let abort = AbortRun {
                    user_id: user.id,
                    session_id: session.id.clone(),
                };
                state.registry.send(abort).await.map_err(internal)??;
                json!({"sequence_num": 0})
            }
            // Accepted and not acted on: a client's other requests (model or
            // mode switches) must not fail the turns posted beside them.
            Inbound::UnsupportedControl { subtype, .. } => json!({
                "sequence_num": 0,
                "error": format!("Unsupported control request subtype: {subtype}"),
            }),
            Inbound::Ignored => json!({"sequence_num": 0}),
        };
        results.push(result);
    }
    Ok(HttpResponse::Ok().json(json!({ "results": results })))
}

fn deps(state: &AppState) -> RemoteDeps {
    RemoteDeps {
        registry: state.registry.clone(),
        followers: state.followers.clone(),
        store: state.store.clone(),
        heartbeat: state.config.heartbeat,
    }
}

async fn subscribe(
    req: HttpRequest,
    stream: web::Payload,
    state: web::Data<AppState>,
    path: web::Path<String>,
) -> Result<HttpResponse, actix_web::Error> {
    let caller = caller(&state, &req)?;
    let session = owned(&state, &caller.user, &path).await?;
    let target = caller.target(session);
    let stream = state
        .admit_socket(&target.user, stream)
        .await
        .map_err(V1Error::from)?;
    let socket = RemoteSocket::new(deps(&state), target).watched(state.watched(&req));
    ws::WsResponseBuilder::new(socket, &req, stream)
        .frame_size(MAX_INBOUND_FRAME)
        .start()
}

/// The client's cursor: `Last-Event-ID`, else `?from_sequence_num=`.
fn cursor(req: &HttpRequest) -> u64 {
    let header = req
        .headers()
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok());
    header
        .or_else(|| {
            query_value(req.query_string(), "from_sequence_num")?
                .parse()
                .ok()
        })
        .unwrap_or(0)
}

async fn event_stream(
    req: HttpRequest,
    state: web::Data<AppState>,
    path: web::Path<String>,
) -> Result<HttpResponse, V1Error> {
    let caller = caller(&state, &req)?;
    let session = owned(&state, &caller.user, &path).await?;
    let target = caller.target(session);
    let user = target.user.clone();
    let (actor, rx) = EventStream::new(deps(&state), target, cursor(&req));
    // Pinned: the ticketed stream below is polled through `Unpin`.
    let body = Box::pin(futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|chunk| (Ok::<_, std::convert::Infallible>(chunk), rx))
    }));
    // An open stream counts as one of the user's sockets, given back when
    // actix drops the body (the client went away or the stream ended).
    let body = state.admit_socket(&user, body).await?;
    actor.start();
    Ok(HttpResponse::Ok()
        .content_type("text/event-stream")
        .insert_header(("cache-control", "no-cache"))
        .streaming(body))
}

async fn presence(
    req: HttpRequest,
    state: web::Data<AppState>,
    path: web::Path<String>,
) -> Result<HttpResponse, V1Error> {
    let user = caller(&state, &req)?.user;
    owned(&state, &user, &path).await?;
    Ok(HttpResponse::Ok().json(json!({})))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn environment_ids_round_trip() {
        for path in ["/tmp/proj", "/home/a b/é", ""] {
            assert_eq!(
                environment_path(&environment_id(path)).as_deref(),
                Some(path)
            );
        }
        assert_eq!(environment_path("env_zz"), None);
        assert_eq!(environment_path("env_abc"), None);
        assert_eq!(environment_path("other"), None);
    }
}
