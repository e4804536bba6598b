//! The request guard: one middleware in front of every route (PROTOCOL.md
//! section 3). In this order, before any handler runs (so before anything is
//! upgraded or spawned):
//!
//! 0. Shutdown: once the gateway is shutting down, an upgrade gets 503
//!    `SHUTTING_DOWN` (requests still answer while runs finish).
//! 1. Host (DNS rebinding): while the gateway listens on a loopback address,
//!    a `Host` that is neither a loopback name or address nor listed in
//!    `--allowed-hosts` gets 403 `HOST_NOT_ALLOWED`.
//! 2. Origin (cross-site WebSocket hijacking, CSRF): an upgrade or a
//!    state-changing call (any method but GET/HEAD/OPTIONS) carrying `Origin`
//!    is accepted only from the gateway's own origin (scheme, host and port of
//!    the request's `Host`) or one listed in `--allowed-origins`; else 403
//!    `ORIGIN_NOT_ALLOWED`. No `Origin` (a non-browser client) passes.
//! 3. Authentication: every route needs a valid token (or platform mode)
//!    unless it is in [`PUBLIC_ROUTES`]; the user is stored in the request's
//!    extensions, where handlers take it with the [`Authed`] extractor. A
//!    route added without a second thought is therefore private.

use std::future::{ready, Ready};
use std::net::IpAddr;

use actix_web::body::{EitherBody, MessageBody};
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::header::{HeaderMap, HOST, ORIGIN, UPGRADE};
use actix_web::http::{Method, StatusCode};
use actix_web::middleware::Next;
use actix_web::{web, FromRequest, HttpMessage, HttpRequest, HttpResponse, ResponseError};
use agentgate_actors::protocol::ErrorCode;
use agentgate_actors::AuthUser;

use crate::api::{ApiError, AuthError};
use crate::state::AppState;

/// The routes anyone may call, by method and route pattern. Everything else
/// needs a token. A path that matches no route at all reaches only the
/// fallback (the JSON 404), which is public too.
pub const PUBLIC_ROUTES: &[(&str, &str)] = &[
    ("GET", "/health"),
    ("POST", "/api/auth/register"),
    ("POST", "/api/auth/login"),
    ("GET", "/api/auth/status"),
    // The admin page's files hold no data; its API calls carry a token.
    ("GET", "/admin"),
    ("GET", "/admin/admin.js"),
];

/// Which origins may drive the gateway from a browser besides its own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AllowedOrigins {
    /// `--allowed-origins '*'`: any page may (logged as a warning at start).
    Any,
    List(Vec<url::Origin>),
}

/// The Host and Origin rules, fixed at start from the flags.
#[derive(Debug, Clone)]
pub struct Policy {
    /// The listen address is loopback: only loopback (or allowed) Host names.
    loopback_listen: bool,
    /// The gateway's own origins use `https` (TLS) or `http`.
    tls: bool,
    /// Extra names accepted in `Host` (lower case, no port).
    allowed_hosts: Vec<String>,
    allowed_origins: AllowedOrigins,
}

impl Policy {
    /// Checks the flags; an entry that is not an origin is an error naming it.
    pub fn new(
        listen: IpAddr,
        tls: bool,
        allowed_origins: &[String],
        allowed_hosts: &[String],
    ) -> Result<Policy, String> {
        let entries: Vec<&str> = allowed_origins
            .iter()
            .map(|o| o.trim())
            .filter(|o| !o.is_empty())
            .collect();
        let allowed_origins = if entries.contains(&"*") {
            AllowedOrigins::Any
        } else {
            let mut list = Vec::new();
            for entry in entries {
                let origin = url::Url::parse(entry)
                    .ok()
                    .filter(|u| matches!(u.scheme(), "http" | "https") && u.has_host())
                    .map(|u| u.origin())
                    .ok_or_else(|| {
                        format!(
                            "invalid --allowed-origins entry '{entry}': expected scheme://host[:port] (http or https), or '*'"
                        )
                    })?;
                list.push(origin);
            }
            AllowedOrigins::List(list)
        };
        let mut hosts = Vec::new();
        for entry in allowed_hosts
            .iter()
            .map(|h| h.trim())
            .filter(|h| !h.is_empty())
        {
            match url::Url::parse(&format!("http://{entry}")) {
                // A port (even :80, which the URL parser would drop) is a mistake here.
                Ok(u)
                    if u.path() == "/"
                        && (!entry.contains(':') || entry.ends_with(']'))
                        && u.username().is_empty() =>
                {
                    hosts.push(u.host_str().unwrap_or_default().to_string())
                }
                _ => {
                    return Err(format!(
                        "invalid --allowed-hosts entry '{entry}': expected a host name or address without port"
                    ))
                }
            }
        }
        Ok(Policy {
            loopback_listen: listen.is_loopback(),
            tls,
            allowed_hosts: hosts,
            allowed_origins,
        })
    }

    pub fn allows_any_origin(&self) -> bool {
        self.allowed_origins == AllowedOrigins::Any
    }

    /// The `Host` of the request parsed as a URL authority of the gateway's scheme.
    fn own_url(&self, host: &str) -> Option<url::Url> {
        let scheme = if self.tls { "https" } else { "http" };
        url::Url::parse(&format!("{scheme}://{host}"))
            .ok()
            .filter(|u| u.path() == "/" && u.username().is_empty() && u.password().is_none())
    }

    /// Rule 1 (DNS rebinding): on a loopback listener, only loopback names.
    pub fn check_host(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        if !self.loopback_listen {
            return Ok(());
        }
        // An HTTP/1.0 request without Host names nothing that could be rebound.
        let Some(value) = headers.get(HOST) else {
            return Ok(());
        };
        let refuse = |shown: &str| {
            ApiError::new(
                StatusCode::FORBIDDEN,
                "HOST_NOT_ALLOWED",
                format!(
                    "Host '{shown}' is not a loopback name; this gateway listens on loopback only (add the name to --allowed-hosts if it is yours)"
                ),
            )
        };
        let Some(text) = value.to_str().ok() else {
            return Err(refuse("<not ASCII>"));
        };
        let shown: String = text.chars().take(100).collect();
        let url = self.own_url(text).ok_or_else(|| refuse(&shown))?;
        let allowed = match url.host() {
            Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
            Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
            Some(url::Host::Domain(name)) => {
                name == "localhost"
                    || name.ends_with(".localhost")
                    || self.allowed_hosts.iter().any(|h| h == name)
            }
            None => false,
        };
        // An allowed address literal (e.g. the machine's LAN address) is listed too.
        let listed = url
            .host_str()
            .is_some_and(|h| self.allowed_hosts.iter().any(|a| a == h));
        if allowed || listed {
            Ok(())
        } else {
            Err(refuse(&shown))
        }
    }

    /// Rule 2 (cross-site requests): upgrades and state-changing calls from a
    /// browser page of another origin are refused.
    pub fn check_origin(&self, method: &Method, headers: &HeaderMap) -> Result<(), ApiError> {
        let Some(origin) = headers.get(ORIGIN) else {
            return Ok(());
        };
        let upgrade = headers.contains_key(UPGRADE);
        let state_changing = !matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS);
        if !(upgrade || state_changing) || self.allows_any_origin() {
            return Ok(());
        }
        let text = origin.to_str().unwrap_or("<not ASCII>");
        let shown: String = text.chars().take(100).collect();
        // "null" (sandboxed frames, file:// pages) parses to no origin: refused.
        let origin = url::Url::parse(text).ok().map(|u| u.origin());
        let own = headers
            .get(HOST)
            .and_then(|h| h.to_str().ok())
            .and_then(|h| self.own_url(h))
            .map(|u| u.origin());
        let ok = origin.as_ref().is_some_and(|o| {
            o.is_tuple()
                && (own.as_ref() == Some(o)
                    || matches!(&self.allowed_origins, AllowedOrigins::List(l) if l.contains(o)))
        });
        if ok {
            Ok(())
        } else {
            Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "ORIGIN_NOT_ALLOWED",
                format!(
                    "Origin '{shown}' may not use this gateway (start it with --allowed-origins {shown} to allow that page)"
                ),
            ))
        }
    }
}

/// Whether a request may pass without a token: a listed public route, or no
/// route at all (the fallback). Matched on the path the router will see
/// (percent-decoded), so `/w%73` is `/ws`.
fn is_public(req: &ServiceRequest) -> bool {
    let path = req.match_info().as_str();
    match req.request().resource_map().match_pattern(path) {
        None => true,
        Some(pattern) => PUBLIC_ROUTES
            .iter()
            .any(|(method, p)| *p == pattern && req.method().as_str() == *method),
    }
}

/// A refusal in the shape of the route family: `/api/auth/*` answers the
/// reference's flat `{success, error: "message", code}`, the rest the envelope.
pub fn refusal(path: &str, err: ApiError) -> HttpResponse {
    if path.starts_with("/api/auth/") {
        AuthError(err).error_response()
    } else {
        err.error_response()
    }
}

/// The middleware (`App::wrap(from_fn(guard))`).
pub async fn guard(
    req: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<EitherBody<impl MessageBody>>, actix_web::Error> {
    let Some(state) = req.app_data::<web::Data<AppState>>().cloned() else {
        let err = ApiError::internal("request guard without AppState");
        return Ok(req
            .into_response(err.error_response())
            .map_into_right_body());
    };
    let checked = match check_shutdown(&state, req.headers())
        .and_then(|()| state.policy.check_host(req.headers()))
        .and_then(|()| state.policy.check_origin(req.method(), req.headers()))
    {
        Err(err) => Err(err),
        Ok(()) if is_public(&req) => Ok(None),
        Ok(()) => state.authenticate_request(req.request()).await.map(Some),
    };
    match checked {
        Ok(identity) => {
            if let Some(identity) = identity {
                req.extensions_mut().insert(identity);
            }
            next.call(req)
                .await
                .map(ServiceResponse::map_into_left_body)
        }
        Err(err) => {
            if err.status == StatusCode::FORBIDDEN {
                tracing::warn!(path = %req.path(), code = err.code, peer = ?req.peer_addr(), "request refused by the guard");
            }
            let response = refusal(req.path(), err);
            Ok(req.into_response(response).map_into_right_body())
        }
    }
}

/// An upgrade once the shutdown began: 503 `SHUTTING_DOWN` (see
/// `AppState::shutting_down`).
fn check_shutdown(state: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    let shutting_down = state
        .shutting_down
        .load(std::sync::atomic::Ordering::SeqCst);
    if shutting_down && headers.contains_key(UPGRADE) {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::ShuttingDown.as_str(),
            "the gateway is shutting down",
        ));
    }
    Ok(())
}

/// Who made a request, as the guard established it.
#[derive(Debug, Clone)]
pub struct Identity {
    pub user: AuthUser,
    /// The user's token version the request's token carries (current: the
    /// guard refuses older ones). A refreshed token gets the same.
    pub token_version: i32,
    /// When the request's token expires; `None` in platform mode (no token).
    pub expires: Option<std::time::SystemTime>,
    /// The user may use the admin routes.
    pub admin: bool,
}

impl Identity {
    /// What a socket opened with this request watches: its token's expiry
    /// and version (platform mode: nothing).
    pub fn token_watch(&self) -> agentgate_actors::token_watch::TokenWatch {
        agentgate_actors::token_watch::TokenWatch {
            user_id: self.user.id,
            expires: self.expires,
            version: self.expires.map(|_| i64::from(self.token_version)),
        }
    }
}

impl FromRequest for Identity {
    type Error = ApiError;
    type Future = Ready<Result<Identity, ApiError>>;

    fn from_request(req: &HttpRequest, _: &mut actix_web::dev::Payload) -> Self::Future {
        // Absent only on a public route (a handler there must not ask for a user).
        ready(
            req.extensions()
                .get::<Identity>()
                .cloned()
                .ok_or_else(|| ApiError::unauthorized("Missing token")),
        )
    }
}

/// The authenticated user of a request (the [`Identity`]'s user).
pub struct Authed(pub AuthUser);

impl FromRequest for Authed {
    type Error = ApiError;
    type Future = Ready<Result<Authed, ApiError>>;

    fn from_request(req: &HttpRequest, payload: &mut actix_web::dev::Payload) -> Self::Future {
        ready(
            Identity::from_request(req, payload)
                .into_inner()
                .map(|i| Authed(i.user)),
        )
    }
}

/// The user of a request to an admin route: any other user gets 403
/// `ADMIN_ONLY` (the first user is an admin; `agentgate token --admin` makes more).
pub struct Admin(pub AuthUser);

impl FromRequest for Admin {
    type Error = ApiError;
    type Future = Ready<Result<Admin, ApiError>>;

    fn from_request(req: &HttpRequest, payload: &mut actix_web::dev::Payload) -> Self::Future {
        ready(
            Identity::from_request(req, payload)
                .into_inner()
                .and_then(|i| {
                    if i.admin {
                        Ok(Admin(i.user))
                    } else {
                        Err(ApiError::new(
                            actix_web::http::StatusCode::FORBIDDEN,
                            "ADMIN_ONLY",
                            "This route is for admins",
                        ))
                    }
                }),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use actix_web::http::header::HeaderValue;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(
                actix_web::http::header::HeaderName::from_static(k),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    fn loopback(origins: &[&str], hosts: &[&str]) -> Policy {
        let o: Vec<String> = origins.iter().map(|s| s.to_string()).collect();
        let h: Vec<String> = hosts.iter().map(|s| s.to_string()).collect();
        Policy::new("127.0.0.1".parse().unwrap(), false, &o, &h).unwrap()
    }

    #[test]
    fn loopback_hosts_pass_and_others_are_refused() {
        let p = loopback(&[], &["dev.example"]);
        for ok in [
            "127.0.0.1:3001",
            "127.8.9.10",
            "localhost:3001",
            "LocalHost",
            "app.localhost:80",
            "[::1]:3001",
            "dev.example:3001",
        ] {
            assert!(p.check_host(&headers(&[("host", ok)])).is_ok(), "{ok}");
        }
        for bad in [
            "evil.example:3001",
            "localhost.evil.example",
            "192.168.1.2:3001",
            "[::2]",
            "a b",
            "x@127.0.0.1",
            "127.0.0.1/evil",
            "",
        ] {
            let err = p.check_host(&headers(&[("host", bad)])).unwrap_err();
            assert_eq!(
                (err.status.as_u16(), err.code),
                (403, "HOST_NOT_ALLOWED"),
                "{bad}"
            );
        }
        assert!(p.check_host(&HeaderMap::new()).is_ok());
        // Not listening on loopback: any Host.
        let open = Policy::new("0.0.0.0".parse().unwrap(), false, &[], &[]).unwrap();
        assert!(open
            .check_host(&headers(&[("host", "evil.example")]))
            .is_ok());
    }

    #[test]
    fn origins_are_compared_by_scheme_host_and_port() {
        let p = loopback(&["http://localhost:5173", "https://ui.example"], &[]);
        let upgrade = |origin: &str, host: &str| {
            p.check_origin(
                &Method::GET,
                &headers(&[("origin", origin), ("host", host), ("upgrade", "websocket")]),
            )
        };
        assert!(upgrade("http://127.0.0.1:3001", "127.0.0.1:3001").is_ok());
        assert!(upgrade("http://localhost", "localhost:80").is_ok());
        assert!(upgrade("http://localhost:5173", "127.0.0.1:3001").is_ok());
        assert!(upgrade("https://ui.example:443", "127.0.0.1:3001").is_ok());
        for bad in [
            "http://evil.example",
            "http://127.0.0.1:3002",
            "https://127.0.0.1:3001",
            "null",
            "garbage",
            "http://ui.example",
        ] {
            let err = upgrade(bad, "127.0.0.1:3001").unwrap_err();
            assert_eq!(
                (err.status.as_u16(), err.code),
                (403, "ORIGIN_NOT_ALLOWED"),
                "{bad}"
            );
        }
        // A plain GET (no upgrade) from another origin is not state-changing.
        let h = headers(&[
            ("origin", "http://evil.example"),
            ("host", "127.0.0.1:3001"),
        ]);
        assert!(p.check_origin(&Method::GET, &h).is_ok());
        assert!(p.check_origin(&Method::POST, &h).is_err());
        assert!(p.check_origin(&Method::DELETE, &h).is_err());
        // No Origin: a non-browser client.
        assert!(p
            .check_origin(&Method::POST, &headers(&[("host", "127.0.0.1:3001")]))
            .is_ok());
        let any = loopback(&["*"], &[]);
        assert!(any.allows_any_origin());
        assert!(any.check_origin(&Method::POST, &h).is_ok());
    }

    #[test]
    fn bad_flag_entries_are_named() {
        let err = Policy::new(
            "127.0.0.1".parse().unwrap(),
            false,
            &["localhost:5173".to_string()],
            &[],
        )
        .unwrap_err();
        assert!(err.contains("'localhost:5173'"), "{err}");
        let err = Policy::new(
            "127.0.0.1".parse().unwrap(),
            false,
            &[],
            &["host:80".to_string()],
        )
        .unwrap_err();
        assert!(err.contains("'host:80'"), "{err}");
    }
}
