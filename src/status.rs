//! `agentgate status`: a running gateway's admin snapshot
//! (`GET /api/admin/snapshot`) as tables for an operator's terminal, or
//! as JSON (`--json`) for scripts.

use std::time::Duration;

use serde_json::Value;

use crate::config::Common;

/// A token minted for `status` lives this long (it is used once, at once).
const STATUS_TOKEN_LIFETIME: Duration = Duration::from_secs(60);
/// The whole request, connect to last byte.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

pub fn run(common: &Common, url: &str, token: Option<String>, json: bool) -> std::io::Result<()> {
    let token = match token {
        Some(t) => t,
        None => mint_admin_token(common)?,
    };
    let endpoint = format!("{}/api/admin/snapshot", url.trim_end_matches('/'));
    let body = actix_web::rt::System::new().block_on(fetch(&endpoint, &token))?;
    let data = &body["data"];
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(data).map_err(std::io::Error::other)?
        );
    } else {
        print!("{}", render(data));
    }
    Ok(())
}

fn mint_admin_token(common: &Common) -> std::io::Result<String> {
    let db = crate::files::open_private(common)?;
    let mut conn = db.conn().map_err(std::io::Error::other)?;
    let admin = crate::db::first_admin(&mut conn)
        .map_err(std::io::Error::other)?
        .ok_or_else(|| {
            std::io::Error::other("no admin in this data dir; pass --token of an admin")
        })?;
    let keys = crate::auth::Keys::load(&common.data_dir())?;
    Ok(keys.issue_for(
        i64::from(admin.id),
        &admin.username,
        admin.token_version,
        STATUS_TOKEN_LIFETIME,
    ))
}

async fn fetch(url: &str, token: &str) -> std::io::Result<Value> {
    let client = awc::Client::builder().timeout(REQUEST_TIMEOUT).finish();
    let mut res = client
        .get(url)
        .bearer_auth(token)
        .send()
        .await
        .map_err(|e| std::io::Error::other(format!("{url}: {e}")))?;
    let status = res.status();
    let body: Value = res
        .json()
        .limit(16 << 20)
        .await
        .map_err(|e| std::io::Error::other(format!("{url}: {e}")))?;
    if !status.is_success() {
        let msg = body["error"]["message"]
            .as_str()
            .or(body["error"].as_str())
            .unwrap_or("request refused");
        return Err(std::io::Error::other(format!("{url}: {status}: {msg}")));
    }
    Ok(body)
}

/// One table: a title, then aligned columns (or "none").
fn table(out: &mut String, title: &str, headers: &[&str], rows: Vec<Vec<String>>) {
    out.push_str(&format!("{title} ({})\n", rows.len()));
    if rows.is_empty() {
        out.push_str("  none\n\n");
        return;
    }
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let mut l = String::from(" ");
        for (cell, w) in cells.iter().zip(&widths) {
            l.push(' ');
            l.push_str(cell);
            l.push_str(&" ".repeat(w - cell.chars().count()));
            l.push(' ');
        }
        l.trim_end().to_string() + "\n"
    };
    out.push_str(&line(headers.iter().map(|h| h.to_string()).collect()));
    for row in rows {
        out.push_str(&line(row));
    }
    out.push('\n');
}

fn s(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn list(v: &Value) -> &[Value] {
    v.as_array().map(Vec::as_slice).unwrap_or_default()
}

pub fn render(data: &Value) -> String {
    let mut out = String::new();
    let runs = list(&data["runs"])
        .iter()
        .map(|r| {
            vec![
                s(&r["sessionId"]),
                s(&r["user"]),
                s(&r["provider"]),
                s(&r["state"]) + if r["paused"] == true { " (paused)" } else { "" },
                s(&r["lastSeq"]),
                s(&r["subscribers"]),
                s(&r["pendingPermissions"]),
                format!("{}s", s(&r["ageSecs"])),
            ]
        })
        .collect();
    table(
        &mut out,
        "RUNS",
        &[
            "SESSION", "USER", "PROVIDER", "STATE", "SEQ", "SUBS", "PERMS", "AGE",
        ],
        runs,
    );
    let sockets = list(&data["sockets"])
        .iter()
        .map(|x| {
            vec![
                s(&x["id"]),
                s(&x["user"]),
                s(&x["sessions"]),
                s(&x["queuedBytes"]),
                s(&x["queuedDeliveries"]),
            ]
        })
        .collect();
    table(
        &mut out,
        "CHAT SOCKETS",
        &[
            "ID",
            "USER",
            "SESSIONS",
            "QUEUED BYTES",
            "QUEUED DELIVERIES",
        ],
        sockets,
    );
    let ptys = list(&data["ptys"])
        .iter()
        .map(|p| {
            vec![
                s(&p["id"]),
                s(&p["user"]),
                s(&p["pid"]),
                if p["sockets"] == 0 {
                    "detached".into()
                } else {
                    format!("{} attached", s(&p["sockets"]))
                },
                format!("{}s", s(&p["ageSecs"])),
                s(&p["command"]),
            ]
        })
        .collect();
    table(
        &mut out,
        "TERMINALS",
        &["ID", "USER", "PID", "STATE", "AGE", "COMMAND"],
        ptys,
    );
    let plugins = list(&data["plugins"])
        .iter()
        .map(|p| {
            vec![
                s(&p["name"]),
                s(&p["state"]),
                s(&p["pid"]),
                s(&p["restarts"]),
                s(&p["lastError"]),
            ]
        })
        .collect();
    table(
        &mut out,
        "PLUGINS",
        &["NAME", "STATE", "PID", "RESTARTS", "LAST ERROR"],
        plugins,
    );
    let proxies = list(&data["pluginProxies"])
        .iter()
        .map(|p| {
            vec![
                s(&p["id"]),
                s(&p["plugin"]),
                s(&p["user"]),
                format!("{}s", s(&p["ageSecs"])),
            ]
        })
        .collect();
    table(
        &mut out,
        "PLUGIN PROXIES",
        &["ID", "PLUGIN", "USER", "AGE"],
        proxies,
    );
    if let Some(conns) = data["connections"].as_object() {
        let parts: Vec<String> = conns.iter().map(|(k, v)| format!("{k}={v}")).collect();
        out.push_str(&format!("CONNECTIONS  {}\n", parts.join("  ")));
    }
    out
}
