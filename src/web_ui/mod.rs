//! The web UI: a built single-page app (the reference's CloudCLI, or any
//! other) served after the API and WebSocket routes, and
//! `agentgate web-ui install`, which fetches CloudCLI from npm ([`install`]).
//!
//! Serving rules (the app is addressed by relative `/api/...` paths and
//! same-origin `/ws` and `/shell`, so it must come from the gateway itself):
//! - a file below the UI's folder is served with its content type; hashed
//!   `assets/*` are cached for a year, everything else revalidates;
//! - any other GET whose last segment has no extension (`/`, `/session/<id>`)
//!   gets `index.html`, never cached, so client-side routes survive a reload;
//! - a missing file with an extension is a 404, as is anything under `/api`;
//! - no directory listings; `..`, `%2F`, hidden segments and symlinks that
//!   lead out of the folder never reach a file outside it.
//!
//! Without a UI, `GET /` answers a small page that says how to get one.

pub mod install;

use std::path::{Path, PathBuf};

use actix_files::{NamedFile, PathBufWrap};
use actix_web::http::header::{self, HeaderValue};
use actix_web::http::Method;
use actix_web::{web, HttpRequest, HttpResponse};

use crate::api::ApiError;

/// npm package of the reference's web UI (AGPL-3.0: fetched, never bundled).
pub const CLOUDCLI_PACKAGE: &str = "@cloudcli-ai/cloudcli";
/// The CloudCLI version agentgate is tested with.
pub const CLOUDCLI_VERSION: &str = "1.37.2";
/// Folder below the data dir that `web-ui install` fills (`<it>/dist` is served).
pub const INSTALL_DIR: &str = "web-ui";

/// Hashed build output: its names change with its content.
const IMMUTABLE: &str = "public, max-age=31536000, immutable";
/// Everything else (index.html, the service worker, the manifest) revalidates.
const REVALIDATE: &str = "no-cache";
const INDEX_NO_STORE: &str = "no-cache, no-store, must-revalidate";

/// The UI being served, if any (app data of every worker).
#[derive(Debug, Clone)]
pub struct WebUi {
    /// Canonical folder holding `index.html`.
    root: Option<PathBuf>,
}

/// Where `web-ui install` puts the build for a data dir.
pub fn installed_dir(data_dir: &Path) -> PathBuf {
    data_dir.join(INSTALL_DIR).join("dist")
}

impl WebUi {
    /// `--web-dir` if given (it must hold an `index.html`), else the UI
    /// installed into the data dir, else none.
    pub fn resolve(explicit: Option<&Path>, data_dir: &Path) -> std::io::Result<WebUi> {
        let (dir, required) = match explicit {
            Some(dir) => (dir.to_path_buf(), true),
            None => (installed_dir(data_dir), false),
        };
        if dir.join("index.html").is_file() {
            return Ok(WebUi {
                root: Some(dir.canonicalize()?),
            });
        }
        if required {
            return Err(std::io::Error::other(format!(
                "--web-dir {}: no index.html there (point it at a built single-page app, e.g. CloudCLI's dist/)",
                dir.display()
            )));
        }
        Ok(WebUi { root: None })
    }

    pub fn root(&self) -> Option<&Path> {
        self.root.as_deref()
    }
}

/// The default service: static files and the SPA fallback, or the JSON 404.
pub async fn serve(req: HttpRequest, ui: web::Data<WebUi>) -> Result<HttpResponse, ApiError> {
    let path = req.path();
    let is_read = req.method() == Method::GET || req.method() == Method::HEAD;
    // The remote-session API (`/v1/...`) answers JSON too, never the SPA.
    if !is_read || path == "/api" || path.starts_with("/api/") || path.starts_with("/v1/") {
        return crate::routes::not_found().await;
    }
    let Some(root) = ui.root() else {
        if path == "/" {
            return Ok(help_page());
        }
        return crate::routes::not_found().await;
    };
    // Rejects `%2F`, hidden segments and odd characters; `..` only ever pops
    // segments of the request itself, never above the root.
    let Ok(relative) = PathBufWrap::parse_path(path, false) else {
        return Ok(not_found_file());
    };
    let relative: &Path = relative.as_ref();
    if let Some(file) = existing_file(root, relative).await {
        let cache = if relative.starts_with("assets") {
            IMMUTABLE
        } else if relative == Path::new("index.html") {
            INDEX_NO_STORE
        } else {
            REVALIDATE
        };
        return Ok(file_response(file, &req, cache).await);
    }
    let has_extension = relative
        .file_name()
        .is_some_and(|name| name.to_string_lossy().contains('.'));
    if has_extension {
        return Ok(not_found_file());
    }
    match existing_file(root, Path::new("index.html")).await {
        Some(index) => Ok(file_response(index, &req, INDEX_NO_STORE).await),
        None => Ok(not_found_file()),
    }
}

/// The canonical path of a regular file below `root`, or `None` (missing, a
/// directory, or a symlink that leads out of the folder).
async fn existing_file(root: &Path, relative: &Path) -> Option<PathBuf> {
    let candidate = root.join(relative);
    let canonical = tokio::fs::canonicalize(&candidate).await.ok()?;
    if !canonical.starts_with(root) {
        tracing::warn!(path = %candidate.display(), "web UI: refusing a path that leads out of the UI folder");
        return None;
    }
    let meta = tokio::fs::metadata(&canonical).await.ok()?;
    meta.is_file().then_some(canonical)
}

async fn file_response(path: PathBuf, req: &HttpRequest, cache: &'static str) -> HttpResponse {
    match NamedFile::open_async(&path).await {
        Ok(file) => {
            let mut res = file
                .disable_content_disposition()
                .use_etag(true)
                .use_last_modified(true)
                .into_response(req);
            res.headers_mut()
                .insert(header::CACHE_CONTROL, HeaderValue::from_static(cache));
            res
        }
        Err(err) => {
            tracing::warn!(path = %path.display(), %err, "web UI: cannot open file");
            not_found_file()
        }
    }
}

fn not_found_file() -> HttpResponse {
    HttpResponse::NotFound()
        .content_type("text/plain; charset=utf-8")
        .body("Not found")
}

/// `GET /` without a UI: what this is and how to get the UI.
fn help_page() -> HttpResponse {
    let body = format!(
        r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>agentgate</title>
<style>body{{font-family:system-ui,sans-serif;max-width:44rem;margin:3rem auto;padding:0 1rem;line-height:1.5}}code,pre{{background:#f3f3f3;padding:.1rem .3rem}}pre{{padding:.6rem}}</style>
</head><body>
<h1>agentgate is running</h1>
<p>This gateway serves its API (<code>/api/...</code>) and WebSockets (<code>/ws</code>, <code>/shell</code>, <code>/plugin-ws/&lt;name&gt;</code>), but no web UI is installed.</p>
<p>To chat from this browser, fetch the reference's web UI (CloudCLI {CLOUDCLI_VERSION}, AGPL-3.0, from npm) into the data dir and restart the gateway:</p>
<pre>agentgate web-ui install
agentgate serve</pre>
<p>Or serve any built single-page app with <code>agentgate serve --web-dir DIR</code> (env <code>AGENTGATE_WEB_DIR</code>).</p>
<p>Health: <a href="/health">/health</a></p>
</body></html>
"#
    );
    HttpResponse::Ok()
        .content_type("text/html; charset=utf-8")
        .insert_header((header::CACHE_CONTROL, REVALIDATE))
        .body(body)
}
