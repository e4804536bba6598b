//! HTTP routes and WebSocket upgrades (PROTOCOL.md sections 2 and 3).
//!
//! The request guard (`guard.rs`) runs before every handler here: Host and
//! Origin rules, then authentication for every route not listed public, so a
//! refused token answers 401 and nothing is spawned. Handlers take the user
//! with the [`Authed`] extractor. Unknown paths answer 404 without upgrading.

use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse};
use actix_web_actors::ws;
use agentgate_actors::chat::chat_socket::ChatSocket;
use agentgate_actors::chat::run_registry::ListRunning;
use agentgate_actors::config::MAX_INBOUND_FRAME;
use agentgate_actors::provider::ProviderKind;
use agentgate_actors::shell::{ShellDeps, ShellSocket};
use agentgate_actors::write_pump::WithRaw;
use serde_json::json;

use crate::api::{self, ApiError, AuthError};
use crate::auth;
use crate::db;
use crate::guard::{Authed, Identity};
use crate::request_input::{Credentials, NewSession};
use crate::state::AppState;
use agentgate_actors::metrics::metrics;

use crate::throttle::{CheckLogin, LoginFailed, LoginSucceeded};

/// Longest accepted username and password (bytes).
pub const MAX_CREDENTIAL_LEN: usize = 256;
/// Longest session name taken from `initialMessage`.
const MAX_SESSION_NAME_CHARS: usize = 100;

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.route("/health", web::get().to(health))
        .service(
            web::resource("/api/auth/register")
                .app_data(auth_json_config())
                .route(web::post().to(register)),
        )
        .service(
            web::resource("/api/auth/login")
                .app_data(auth_json_config())
                .route(web::post().to(login)),
        )
        .route("/api/auth/status", web::get().to(auth_status))
        .route("/api/auth/user", web::get().to(auth_user))
        .route("/api/auth/refresh", web::post().to(auth_refresh))
        .route("/api/auth/logout", web::post().to(auth_logout))
        .route("/api/providers/sessions", web::post().to(create_session))
        .route(
            "/api/providers/sessions/running",
            web::get().to(running_sessions),
        )
        .route(
            "/api/providers/sessions/{id}",
            web::get().to(crate::ui_api::session_details),
        )
        .route("/ws", web::get().to(chat_ws))
        .route("/shell", web::get().to(shell_ws))
        .route("/plugin-ws/{name}", web::get().to(plugin_ws));
}

/// Answer for every path not routed above.
pub async fn not_found() -> Result<HttpResponse, ApiError> {
    Err(ApiError::not_found("NOT_FOUND", "No such route"))
}

/// JSON body errors in the envelope rather than actix's plain text.
pub fn json_config() -> web::JsonConfig {
    web::JsonConfig::default()
        .limit(1024 * 1024)
        .error_handler(|err, _req| {
            ApiError::bad_request("INVALID_BODY", format!("Invalid JSON body: {err}")).into()
        })
}

/// Body errors of `/api/auth/*` in the reference's flat shape.
fn auth_json_config() -> web::JsonConfig {
    json_config().error_handler(|err, _req| {
        AuthError(ApiError::bad_request(
            "INVALID_BODY",
            format!("Invalid JSON body: {err}"),
        ))
        .into()
    })
}

async fn health() -> HttpResponse {
    HttpResponse::Ok().json(json!({"status": "ok"}))
}

impl Credentials {
    fn validate(&self) -> Result<(), ApiError> {
        let name = self.username.trim();
        if name.is_empty() || self.password.is_empty() {
            return Err(ApiError::bad_request(
                "INVALID_CREDENTIALS_FORMAT",
                "username and password are required",
            ));
        }
        if name.len() > MAX_CREDENTIAL_LEN || self.password.len() > MAX_CREDENTIAL_LEN {
            return Err(ApiError::bad_request(
                "INVALID_CREDENTIALS_FORMAT",
                "username or password too long",
            ));
        }
        Ok(())
    }
}

/// The reference's login answer: `token` and `user` at the top level (the web
/// UI reads them there), repeated under `data` for envelope clients.
fn token_answer(state: &AppState, user: &db::User) -> serde_json::Value {
    let token = state
        .keys
        .issue(i64::from(user.id), &user.username, user.token_version);
    let user = json!({"id": user.id, "username": user.username});
    json!({
        "success": true,
        "token": token,
        "user": user,
        "data": {"token": token, "user": user},
    })
}

fn registration_closed() -> ApiError {
    ApiError::new(
        StatusCode::FORBIDDEN,
        "REGISTRATION_CLOSED",
        "A user already exists; log in instead",
    )
}

/// A permit to run one password hash now, or 503 at once (never a queue).
fn hash_permit(state: &AppState) -> Result<tokio::sync::OwnedSemaphorePermit, ApiError> {
    state.hashes.clone().try_acquire_owned().map_err(|_| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "SERVER_BUSY",
            "Too many logins at once; try again in a second",
        )
        .retry_after(1)
    })
}

async fn register(
    state: web::Data<AppState>,
    body: web::Json<Credentials>,
) -> Result<HttpResponse, AuthError> {
    body.validate()?;
    // Closed registration costs no hash: checked first (and again, atomically, on insert).
    let db = state.db.clone();
    if web::block(move || db.conn().and_then(|mut c| db::user_count(&mut c))).await?? > 0 {
        return Err(registration_closed().into());
    }
    let permit = hash_permit(&state)?;
    let password = body.password.clone();
    let hash = web::block(move || {
        let _permit = permit;
        auth::hash_password(&password)
    })
    .await?
    .map_err(ApiError::internal)?;
    let db = state.db.clone();
    let name = body.username.trim().to_string();
    let user = web::block(move || {
        db.conn()
            .and_then(|mut c| db::register_first_user(&mut c, &name, &hash))
    })
    .await??
    .ok_or_else(registration_closed)?;
    tracing::info!(user = %user.username, "registered first user");
    Ok(HttpResponse::Created().json(token_answer(&state, &user)))
}

/// Login, in this order so that refusals cost nothing: body checks, the
/// failed-login throttle (429 + `Retry-After`), a hash permit (503), then
/// the password check, which hashes against a dummy for unknown users so the
/// answer's timing does not tell which usernames exist.
async fn login(
    req: HttpRequest,
    state: web::Data<AppState>,
    body: web::Json<Credentials>,
) -> Result<HttpResponse, AuthError> {
    body.validate()?;
    let name = body.username.trim().to_string();
    let addr = req.peer_addr().map(|a| a.ip());
    let check = CheckLogin {
        username: name.clone(),
        addr,
    };
    if let Err(wait) = state
        .throttle
        .send(check)
        .await
        .map_err(ApiError::internal)?
    {
        let secs = wait.as_secs_f64().ceil().max(1.0) as u64;
        metrics().logins_throttled.inc();
        tracing::warn!(user = %name, ?addr, retry_after = secs, "login throttled");
        return Err(ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "TOO_MANY_ATTEMPTS",
            format!("Too many failed logins; try again in {secs} s"),
        )
        .retry_after(secs)
        .into());
    }
    let permit = hash_permit(&state)?;
    let db = state.db.clone();
    let lookup = name.clone();
    let password = body.password.clone();
    // Hashing runs on the blocking pool too: argon2 is deliberately slow.
    let user = web::block(move || -> Result<Option<db::User>, db::DbError> {
        let _permit = permit;
        let user = db::user_by_name(&mut *db.conn()?, &lookup)?;
        let hash = user.as_ref().and_then(|u| u.password_hash.as_deref());
        let ok = auth::verify_password_timed(&password, hash);
        Ok(user.filter(|_| ok))
    })
    .await??;
    let Some(user) = user else {
        metrics().logins_failed.inc();
        state.throttle.do_send(LoginFailed {
            username: name,
            addr,
        });
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "INVALID_CREDENTIALS",
            "Invalid username or password",
        )
        .into());
    };
    state.throttle.do_send(LoginSucceeded { username: name });
    Ok(HttpResponse::Ok().json(token_answer(&state, &user)))
}

/// `{needsSetup}`: the web UI shows its registration form while no user exists.
async fn auth_status(state: web::Data<AppState>) -> Result<HttpResponse, AuthError> {
    let db = state.db.clone();
    let users = web::block(move || db.conn().and_then(|mut c| db::user_count(&mut c))).await??;
    Ok(HttpResponse::Ok().json(json!({"needsSetup": users == 0, "isAuthenticated": false})))
}

/// `{user:{id,username}}` of the token; anything else signs the web UI out.
async fn auth_user(Authed(user): Authed) -> Result<HttpResponse, AuthError> {
    Ok(HttpResponse::Ok().json(json!({"user": {"id": user.id, "username": user.username}})))
}

/// A fresh token for the caller (the web UI refreshes at half the lifetime).
async fn auth_refresh(
    identity: Identity,
    state: web::Data<AppState>,
) -> Result<HttpResponse, AuthError> {
    let user = &identity.user;
    let token = state
        .keys
        .issue(user.id, &user.username, identity.token_version);
    Ok(HttpResponse::Ok().json(json!({"success": true, "token": token})))
}

/// Tokens are not revoked (as in the reference): logging out is the client
/// forgetting it (`agentgate token --revoke` revokes).
async fn auth_logout(_user: Authed) -> Result<HttpResponse, AuthError> {
    Ok(HttpResponse::Ok().json(json!({"success": true, "message": "Logged out successfully"})))
}

async fn create_session(
    Authed(user): Authed,
    state: web::Data<AppState>,
    body: web::Json<NewSession>,
) -> Result<HttpResponse, ApiError> {
    let body = body.into_inner();
    let provider = body.provider.as_deref().map(str::trim).unwrap_or_default();
    let Ok(kind) = provider.parse::<ProviderKind>() else {
        return Err(ApiError::bad_request(
            "UNSUPPORTED_PROVIDER",
            format!("Unsupported provider '{provider}'; expected one of claude, codex, cursor, gemini, opencode"),
        ));
    };
    let project_path = body
        .project_path
        .as_deref()
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .ok_or_else(|| ApiError::bad_request("PROJECT_PATH_REQUIRED", "projectPath is required"))?
        .to_string();
    let name = body
        .initial_message
        .as_deref()
        .map(str::trim)
        .filter(|m| !m.is_empty())
        .map(|m| m.chars().take(MAX_SESSION_NAME_CHARS).collect::<String>());
    // Counted only once the request is valid: a refused body costs no place.
    state.admit_session(&user).await?;
    let db = state.db.clone();
    let uid = i32::try_from(user.id).map_err(ApiError::internal)?;
    let session = web::block(move || {
        db.conn().and_then(|mut c| {
            db::create_session(&mut c, uid, kind.as_str(), &project_path, name.as_deref())
        })
    })
    .await??;
    tracing::info!(session_id = %session.id, provider = %session.provider, user = %user.username, "session created");
    Ok(api::created(json!({
        "sessionId": session.id,
        "provider": session.provider,
        "projectPath": session.project_path,
        "sessionName": session.custom_name,
    })))
}

async fn running_sessions(
    Authed(user): Authed,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let sessions = state
        .registry
        .send(ListRunning { user_id: user.id })
        .await
        .map_err(ApiError::internal)?;
    Ok(api::ok(json!({"sessions": sessions})))
}

async fn chat_ws(
    identity: Identity,
    req: HttpRequest,
    stream: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, actix_web::Error> {
    let socket = ChatSocket::new(
        identity.user.clone(),
        state.registry.clone(),
        state.store.clone(),
        state.config.heartbeat,
    )
    .watched(state.watched(&req))
    .token(identity.token_watch())
    .subscribe_limit(state.config.limits.subscribe_entries);
    let stream = state.admit_socket(&identity.user, stream).await?;
    // As `WsResponseBuilder::start`, with the frames the socket encodes
    // itself written ahead of its context's (see `write_pump::RawOut`).
    let mut res = ws::handshake(&req)?;
    let raw = socket.raw_out();
    let codec = actix_http::ws::Codec::new().max_size(MAX_INBOUND_FRAME);
    let body = ws::WebsocketContext::with_codec(socket, stream, codec);
    Ok(res.streaming(WithRaw::new(body, raw)))
}

async fn shell_ws(
    identity: Identity,
    req: HttpRequest,
    stream: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, actix_web::Error> {
    let deps = ShellDeps {
        hub: state.shells.clone(),
        store: state.store.clone(),
        config: state.config.clone(),
        placement: state.pty_placement.clone(),
    };
    let token = identity.token_watch();
    let stream = state.admit_socket(&identity.user, stream).await?;
    ShellSocket::start(
        &req,
        stream,
        identity.user,
        deps,
        state.watched(&req),
        token,
    )
}

async fn plugin_ws(
    Authed(user): Authed,
    req: HttpRequest,
    stream: web::Payload,
    path: web::Path<String>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, actix_web::Error> {
    let stream = state.admit_socket(&user, stream).await?;
    // Name check (4400), port lookup (4404), then one PluginProxy actor per socket.
    agentgate_actors::plugin::start_proxy(
        &req,
        stream,
        &path,
        &state.plugins,
        state.config.heartbeat,
        state.watched(&req),
        &user.username,
    )
    .await
}
