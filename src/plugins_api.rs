//! Plugin REST routes (envelope of PROTOCOL.md section 2), all authenticated
//! (by the request guard; handlers take the user with [`Authed`]):
//!
//! | route | answer |
//! |---|---|
//! | `GET /api/plugins` | `{plugins: [{name, enabled, state, running, port, pid, restarts, lastError, node}]}` (`node`: the id of the node that answers and runs these servers in cluster mode, else null) |
//! | `POST /api/plugins/{name}/start` | the plugin's status once it is ready or failed; 404 `PLUGIN_NOT_FOUND`, 409 `PLUGIN_DISABLED` |
//! | `POST /api/plugins/{name}/stop` | the plugin's status once its server has exited; 404 `PLUGIN_NOT_FOUND`, 409 `PLUGIN_DISABLED` |
//!
//! The handlers only translate: the `PluginRegistry` actor owns the state.

use actix_web::http::StatusCode;
use actix_web::{web, HttpResponse};
use agentgate_actors::plugin::{
    valid_name, ListPlugins, PluginError, PluginStatus, StartPlugin, StopPlugin,
};
use serde_json::json;

use crate::api::{self, ApiError};
use crate::guard::Authed;
use crate::state::AppState;

pub fn configure(cfg: &mut web::ServiceConfig) {
    cfg.route("/api/plugins", web::get().to(list))
        .route("/api/plugins/{name}/start", web::post().to(start))
        .route("/api/plugins/{name}/stop", web::post().to(stop));
}

async fn list(_user: Authed, state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let plugins = state
        .plugins
        .send(ListPlugins)
        .await
        .map_err(ApiError::internal)?;
    // Each node runs the plugin servers of its own data dir; /plugin-ws/{name}
    // reaches the one of the node the client is connected to.
    let node = state.cluster.as_ref().map(|c| c.node_id.clone());
    let mut plugins = serde_json::to_value(plugins).map_err(ApiError::internal)?;
    for p in plugins.as_array_mut().into_iter().flatten() {
        p["node"] = json!(node);
    }
    Ok(api::ok(json!({ "plugins": plugins })))
}

async fn start(
    Authed(user): Authed,
    state: web::Data<AppState>,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let name = checked_name(path.into_inner())?;
    tracing::info!(plugin = %name, user = %user.username, "plugin start requested");
    let answer = state.plugins.send(StartPlugin { name }).await;
    answer_of(answer)
}

async fn stop(
    Authed(user): Authed,
    state: web::Data<AppState>,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let name = checked_name(path.into_inner())?;
    tracing::info!(plugin = %name, user = %user.username, "plugin stop requested");
    let answer = state.plugins.send(StopPlugin { name }).await;
    answer_of(answer)
}

pub(crate) fn checked_name(name: String) -> Result<String, ApiError> {
    if valid_name(&name) {
        Ok(name)
    } else {
        Err(ApiError::bad_request(
            "INVALID_PLUGIN_NAME",
            "Invalid plugin name: must match ^[a-zA-Z0-9_-]+$",
        ))
    }
}

pub(crate) fn answer_of(
    answer: Result<Result<PluginStatus, PluginError>, actix::MailboxError>,
) -> Result<HttpResponse, ApiError> {
    match answer.map_err(ApiError::internal)? {
        Ok(status) => Ok(api::ok(status)),
        Err(err @ PluginError::NotFound(_)) => {
            Err(ApiError::not_found("PLUGIN_NOT_FOUND", err.to_string()))
        }
        Err(err @ PluginError::Disabled(_)) => Err(ApiError::new(
            StatusCode::CONFLICT,
            "PLUGIN_DISABLED",
            err.to_string(),
        )),
        Err(err @ PluginError::Unavailable(_)) => Err(ApiError::internal(err)),
    }
}
