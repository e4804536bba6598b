//! The conversation of each session as the RunRegistry recorded it
//! (`messages` table): appended in batches, read newest-first in pages the
//! way the web UI asks (`offset` counts back from the newest message, each
//! page is in chronological order).

use agentgate_actors::store::HistoryEntry;
use diesel::prelude::*;
use serde_json::{json, Value};

use super::schema::{messages, sessions};
use super::{write_transaction, AnyConnection, DbError};

/// Longest summary taken from a first prompt (chars).
const SUMMARY_CHARS: usize = 100;

/// Appends `entries` and deletes the oldest messages beyond `keep`, in one
/// transaction; the session's `updated_at` becomes its last activity.
pub fn append(
    conn: &mut AnyConnection,
    session_id: &str,
    entries: &[HistoryEntry],
    keep: usize,
) -> Result<(), DbError> {
    let keep = i64::try_from(keep).unwrap_or(i64::MAX);
    write_transaction(conn, |conn| {
        for e in entries {
            diesel::insert_into(messages::table)
                .values((
                    messages::session_id.eq(session_id),
                    messages::kind.eq(e.kind),
                    messages::role.eq(e.role),
                    messages::tool_id.eq(e.tool_id.as_deref()),
                    messages::body.eq(&*e.body),
                    messages::created_at.eq(&e.timestamp),
                ))
                .execute(conn)?;
        }
        // The newest message beyond `keep`: it and every older one go.
        let cutoff: Option<i32> = messages::table
            .filter(messages::session_id.eq(session_id))
            .order(messages::id.desc())
            .offset(keep)
            .select(messages::id)
            .first(conn)
            .optional()?;
        if let Some(cutoff) = cutoff {
            diesel::delete(
                messages::table
                    .filter(messages::session_id.eq(session_id))
                    .filter(messages::id.le(cutoff)),
            )
            .execute(conn)?;
        }
        if let Some(last) = entries.last() {
            diesel::update(sessions::table.find(session_id))
                .set(sessions::updated_at.eq(&last.timestamp))
                .execute(conn)?;
        }
        Ok(())
    })
}

pub fn count(conn: &mut AnyConnection, session_id: &str) -> Result<i64, DbError> {
    Ok(messages::table
        .filter(messages::session_id.eq(session_id))
        .count()
        .get_result(conn)?)
}

/// The session's first prompt, shortened: its summary when it has no name.
pub fn first_prompt(conn: &mut AnyConnection, session_id: &str) -> Result<Option<String>, DbError> {
    let body: Option<String> = messages::table
        .filter(messages::session_id.eq(session_id))
        .filter(messages::kind.eq("text"))
        .filter(messages::role.eq("user"))
        .order(messages::id.asc())
        .select(messages::body)
        .first(conn)
        .optional()?;
    Ok(body.and_then(|b| {
        let v: Value = serde_json::from_str(&b).ok()?;
        let text = v["content"].as_str()?.trim();
        (!text.is_empty()).then(|| text.chars().take(SUMMARY_CHARS).collect())
    }))
}

/// One page of history.
pub struct Page {
    pub messages: Vec<Value>,
    pub total: i64,
    pub has_more: bool,
}

/// The page that ends `offset` messages before the newest, `limit` long (all
/// when `None`), oldest first. A `tool_use` carries its `toolResult` when the
/// result is recorded (even on an older or newer page), as the reference's
/// history does.
pub fn page(
    conn: &mut AnyConnection,
    session_id: &str,
    limit: Option<i64>,
    offset: i64,
) -> Result<Page, DbError> {
    let total = count(conn, session_id)?;
    let mut rows: Vec<(String, Option<String>, String)> = messages::table
        .filter(messages::session_id.eq(session_id))
        .order(messages::id.desc())
        .limit(limit.unwrap_or(i64::MAX))
        .offset(offset)
        .select((messages::kind, messages::tool_id, messages::body))
        .load(conn)?;
    rows.reverse();
    let tool_ids: Vec<&str> = rows
        .iter()
        .filter(|(kind, _, _)| kind == "tool_use")
        .filter_map(|(_, id, _)| id.as_deref())
        .collect();
    let results: Vec<(Option<String>, String)> = if tool_ids.is_empty() {
        Vec::new()
    } else {
        messages::table
            .filter(messages::session_id.eq(session_id))
            .filter(messages::kind.eq("tool_result"))
            .filter(messages::tool_id.eq_any(&tool_ids))
            .select((messages::tool_id, messages::body))
            .load(conn)?
    };
    let results: std::collections::HashMap<String, Value> = results
        .into_iter()
        .filter_map(|(id, body)| Some((id?, serde_json::from_str(&body).ok()?)))
        .collect();
    let shown = i64::try_from(rows.len()).unwrap_or(i64::MAX);
    let messages = rows
        .into_iter()
        .filter_map(|(kind, tool_id, body)| {
            let mut v: Value = serde_json::from_str(&body).ok()?;
            if kind == "tool_use" {
                if let Some(r) = tool_id.and_then(|id| results.get(&id)) {
                    v["toolResult"] = json!({
                        "content": r["content"].as_str().unwrap_or_default(),
                        "isError": r["isError"].as_bool().unwrap_or(false),
                    });
                }
            }
            Some(v)
        })
        .collect();
    Ok(Page {
        messages,
        total,
        has_more: offset.saturating_add(shown) < total,
    })
}
