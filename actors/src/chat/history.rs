//! What the RunRegistry records of a session's conversation, for
//! `GET /api/providers/sessions/{id}/messages` (the web UI's history).
//!
//! Not an actor: a [`HistoryLog`] is a field of the registry's per-session
//! state, fed from the one place every event passes (`sequence`), so the
//! history is provider-independent. It keeps the user's prompts and the
//! normalized messages (`text`, `tool_use`, `tool_result`, `thinking`,
//! `error`, `interactive_prompt`, `task_notification`); streamed deltas are
//! kept as the one `text` they add up to. Control kinds (`status`,
//! `permission_*`, `stream_end`, `complete`) are not history.
//!
//! The log only collects; the registry writes its batches with the store on
//! the blocking pool, one write after the other per session
//! ([`HistoryLog::chain`]), and waits for the last one before a run's
//! `complete` goes out.
//!
//! **Bounds**: a message above [`MAX_ENTRY_BYTES`] is cut (its text says
//! so). The entries waiting for the database are bounded by
//! [`MAX_QUEUED_WRITES`] writes of at most [`BATCH_ENTRIES`] entries or
//! about [`BATCH_BYTES`] each; when the database falls that far behind,
//! further entries are dropped and counted (logged), never queued without
//! limit. The database keeps at most `--history-max-messages` per session,
//! the oldest deleted first.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use serde_json::{json, Value};

use crate::json_text::push_json_escaped;
use crate::protocol::{frame_of, push_json_str, EventBody, Frame, Role};
use crate::store::HistoryEntry;

/// Largest recorded message (bytes of JSON); longer text is cut.
pub const MAX_ENTRY_BYTES: usize = 1024 * 1024;
/// A batch is written once it has this many entries...
pub const BATCH_ENTRIES: usize = 256;
/// ...or this many bytes (and at the latest by the registry's periodic flush).
pub const BATCH_BYTES: usize = 1024 * 1024;
/// Writes of one session waiting for the database before entries are dropped.
pub const MAX_QUEUED_WRITES: usize = 8;

/// Text streamed as deltas, not yet ended.
struct OpenText {
    id: String,
    timestamp: String,
    /// Its entry so far: the head of [`text_entry`]'s JSON and the text
    /// escaped. Written as the deltas come, the text is held once (not as a
    /// string and again as the entry when it ends), and it grows by a
    /// quarter at a time, not by doubling: a hundred runs streaming at once
    /// each hold one of these for the whole turn.
    json: String,
    /// Bytes of text kept (before escaping).
    len: usize,
    /// Bytes left out beyond [`MAX_ENTRY_BYTES`].
    cut: usize,
}

impl OpenText {
    /// Room for `more` bytes of escaped text; `room`: bytes the text may
    /// still take.
    fn reserve(&mut self, more: usize, room: usize) {
        let json = &mut self.json;
        if json.capacity() - json.len() < more {
            // Never more room than the text may still take.
            let grow = (json.len() / 4).max(1024).min(room);
            json.reserve_exact(more.max(grow));
        }
    }
}

/// The not-yet-written history of one session.
#[derive(Default)]
pub struct HistoryLog {
    pending: Vec<HistoryEntry>,
    pending_bytes: usize,
    open_text: Option<OpenText>,
    /// Entries dropped because the database fell behind (logged once per batch).
    dropped: usize,
    /// The last write of this session; the next one waits for it.
    last_write: Option<tokio::task::JoinHandle<()>>,
    /// Writes spawned and not finished.
    queued: Arc<AtomicUsize>,
    /// Entries recorded since this log was made (for message counts).
    recorded: u64,
}

impl HistoryLog {
    /// The user's prompt of a run.
    pub fn prompt(
        &mut self,
        session_id: &str,
        provider: &str,
        id: &str,
        timestamp: &str,
        content: &str,
    ) {
        self.close_text(session_id, provider);
        let (content, cut) = cut_text(content);
        let body = text_entry(id, session_id, timestamp, provider, "user", content, cut);
        self.push(HistoryEntry {
            kind: "text",
            role: Some("user"),
            tool_id: None,
            body,
            timestamp: timestamp.to_string(),
        });
    }

    /// One sequenced event (`frame` is its live frame, `id` makes its
    /// envelope id: only the first delta of a text needs it).
    pub fn record(
        &mut self,
        session_id: &str,
        provider: &str,
        id: impl FnOnce() -> String,
        timestamp: &str,
        body: &EventBody,
        frame: &Frame,
    ) {
        let (kind, role, tool_id) = match body {
            EventBody::StreamDelta { content } => return self.delta(id, timestamp, content),
            EventBody::StreamEnd {} => return self.close_text(session_id, provider),
            EventBody::Text { role, .. } => (
                "text",
                Some(match role {
                    Role::User => "user",
                    Role::Assistant => "assistant",
                }),
                None,
            ),
            EventBody::ToolUse { tool_id, .. } => ("tool_use", None, Some(tool_id.clone())),
            EventBody::ToolResult { tool_id, .. } => ("tool_result", None, Some(tool_id.clone())),
            EventBody::Thinking { .. } => ("thinking", None, None),
            EventBody::Error { .. } => ("error", None, None),
            EventBody::InteractivePrompt { .. } => ("interactive_prompt", None, None),
            EventBody::TaskNotification { .. } => ("task_notification", None, None),
            EventBody::Status { .. }
            | EventBody::PermissionRequest { .. }
            | EventBody::PermissionCancelled { .. }
            | EventBody::Complete { .. } => return,
        };
        self.close_text(session_id, provider);
        let body = if frame.len() > MAX_ENTRY_BYTES {
            cut_frame(frame)
        } else {
            frame.clone()
        };
        self.push(HistoryEntry {
            kind,
            role,
            tool_id,
            body,
            timestamp: timestamp.to_string(),
        });
    }

    /// A `stream_delta` whose text is `escaped` as serde_json writes it
    /// (`len` bytes decoded): what [`record`](Self::record) does with it,
    /// the escaped text copied as it is (unless it is cut).
    pub fn record_escaped_delta(
        &mut self,
        id: impl FnOnce() -> String,
        timestamp: &str,
        escaped: &str,
        len: usize,
    ) {
        let kept = self.open_text.as_ref().map_or(0, |open| open.len);
        let room = MAX_ENTRY_BYTES.saturating_sub(kept);
        if len > room {
            // Cut where a char ends in the decoded text, as any delta.
            return self.delta(id, timestamp, &crate::provider::unescape(escaped, len));
        }
        let open = self.open_text(id, timestamp);
        open.reserve(escaped.len(), room);
        open.json.push_str(escaped);
        open.len += len;
    }

    /// A `stream_delta`'s text joins the streamed text (as far as it fits).
    fn delta(&mut self, id: impl FnOnce() -> String, timestamp: &str, content: &str) {
        let open = self.open_text(id, timestamp);
        let room = MAX_ENTRY_BYTES.saturating_sub(open.len);
        let (head, rest) = split_at_char(content, room);
        open.reserve(head.len(), room);
        push_json_escaped(&mut open.json, head);
        open.len += head.len();
        open.cut += rest.len();
    }

    /// The streamed text being recorded (a new one starts with this delta).
    fn open_text(&mut self, id: impl FnOnce() -> String, timestamp: &str) -> &mut OpenText {
        self.open_text.get_or_insert_with(|| OpenText {
            id: id(),
            timestamp: timestamp.to_string(),
            json: String::from(TEXT_ENTRY_HEAD),
            len: 0,
            cut: 0,
        })
    }

    /// Ends streamed text: it becomes one assistant `text` entry.
    pub fn close_text(&mut self, session_id: &str, provider: &str) {
        let Some(open) = self.open_text.take() else {
            return;
        };
        if open.len == 0 {
            return;
        }
        let body = finish_text_entry(
            open.json,
            &open.id,
            session_id,
            &open.timestamp,
            provider,
            "assistant",
            open.cut,
        );
        self.push(HistoryEntry {
            kind: "text",
            role: Some("assistant"),
            tool_id: None,
            body,
            timestamp: open.timestamp,
        });
    }

    fn push(&mut self, entry: HistoryEntry) {
        if self.queued.load(Ordering::Acquire) >= MAX_QUEUED_WRITES {
            self.dropped += 1;
            return;
        }
        self.pending_bytes += entry.body.len();
        self.pending.push(entry);
        self.recorded += 1;
    }

    /// Entries recorded since this log was made.
    pub fn recorded(&self) -> u64 {
        self.recorded
    }

    /// Whether a batch is full enough to be written now.
    pub fn batch_ready(&self) -> bool {
        self.pending.len() >= BATCH_ENTRIES || self.pending_bytes >= BATCH_BYTES
    }

    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    /// Whether a write of this session has not finished yet.
    pub fn writing(&self) -> bool {
        self.queued.load(Ordering::Acquire) > 0
    }

    /// The entries to write (streamed text that is still open stays).
    /// Also returns how many entries were dropped since the last take.
    pub fn take(&mut self) -> (Vec<HistoryEntry>, usize) {
        self.pending_bytes = 0;
        (
            std::mem::take(&mut self.pending),
            std::mem::take(&mut self.dropped),
        )
    }

    /// Spawns `write` after the session's previous write (so batches land
    /// in order) and makes it the last one.
    pub fn chain<F>(&mut self, write: F)
    where
        F: std::future::Future<Output = ()> + 'static,
    {
        let previous = self.last_write.take();
        let queued = self.queued.clone();
        queued.fetch_add(1, Ordering::AcqRel);
        self.last_write = Some(actix::spawn(async move {
            if let Some(previous) = previous {
                let _ = previous.await;
            }
            write.await;
            queued.fetch_sub(1, Ordering::AcqRel);
        }));
    }
}

/// `text` cut to [`MAX_ENTRY_BYTES`] at a char boundary, and the bytes left out.
fn cut_text(text: &str) -> (&str, usize) {
    let (head, _) = split_at_char(text, MAX_ENTRY_BYTES);
    (head, text.len() - head.len())
}

fn split_at_char(text: &str, max: usize) -> (&str, &str) {
    let mut at = max.min(text.len());
    while !text.is_char_boundary(at) {
        at -= 1;
    }
    text.split_at(at)
}

/// The history entry of a `text` message: byte for byte
/// `frame_of(&json!({"id", "sessionId", "timestamp", "provider", "kind":
/// "text", "role", "content": with_cut_note(content, cut)}))` (a `Value`
/// map writes its keys in sorted order), written directly: streamed text
/// of up to a megabyte is copied once instead of into a `Value`, and its
/// escape check runs a word at a time.
fn text_entry(
    id: &str,
    session_id: &str,
    timestamp: &str,
    provider: &str,
    role: &str,
    content: &str,
    cut: usize,
) -> Frame {
    let strings = [content, id, provider, role, session_id, timestamp];
    let mut buf = String::with_capacity(100 + strings.iter().map(|s| s.len()).sum::<usize>());
    buf.push_str(TEXT_ENTRY_HEAD);
    push_json_escaped(&mut buf, content);
    finish_text_entry(buf, id, session_id, timestamp, provider, role, cut)
}

/// What a `text` entry's JSON starts with: its content comes first.
const TEXT_ENTRY_HEAD: &str = "{\"content\":\"";

/// Ends a [`text_entry`] whose head and escaped content are in `buf`.
fn finish_text_entry(
    mut buf: String,
    id: &str,
    session_id: &str,
    timestamp: &str,
    provider: &str,
    role: &str,
    cut: usize,
) -> Frame {
    if cut > 0 {
        push_json_escaped(&mut buf, &with_cut_note("", cut));
    }
    buf.push('"');
    buf.push_str(",\"id\":");
    push_json_str(&mut buf, id);
    buf.push_str(",\"kind\":\"text\",\"provider\":");
    push_json_str(&mut buf, provider);
    buf.push_str(",\"role\":");
    push_json_str(&mut buf, role);
    buf.push_str(",\"sessionId\":");
    push_json_str(&mut buf, session_id);
    buf.push_str(",\"timestamp\":");
    push_json_str(&mut buf, timestamp);
    buf.push('}');
    // Kept until written; a frame of a larger allocation keeps all of it.
    buf.shrink_to_fit();
    Frame::from(buf)
}

fn with_cut_note(text: &str, cut: usize) -> String {
    if cut == 0 {
        text.to_string()
    } else {
        format!("{text}\n[... {cut} more bytes not kept in the history]")
    }
}

/// A frame above [`MAX_ENTRY_BYTES`] with its long strings cut.
fn cut_frame(frame: &Frame) -> Frame {
    let Ok(mut value) = serde_json::from_str::<Value>(frame) else {
        return frame_of(
            &json!({"kind": "error", "content": "[message too large for the history]"}),
        );
    };
    // Strings get an equal share of the budget.
    fn cut_strings(v: &mut Value, budget: usize) {
        match v {
            Value::String(s) if s.len() > budget => {
                let (head, _) = split_at_char(s, budget);
                *s = with_cut_note(head, s.len() - head.len());
            }
            Value::Array(items) => items.iter_mut().for_each(|i| cut_strings(i, budget)),
            Value::Object(map) => map.values_mut().for_each(|i| cut_strings(i, budget)),
            _ => {}
        }
    }
    cut_strings(&mut value, MAX_ENTRY_BYTES / 4);
    frame_of(&value)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delta(log: &mut HistoryLog, id: &str, text: &str) {
        let body = EventBody::StreamDelta {
            content: text.into(),
        };
        log.record(
            "s",
            "claude",
            || id.to_string(),
            "t",
            &body,
            &frame_of(&body),
        );
    }

    /// The directly written text entry is what the `Value` map gave.
    #[test]
    fn text_entries_are_byte_for_byte_the_value_map() {
        for (content, cut) in [
            ("plain", 0),
            ("", 0),
            ("q \" b \\ nl \n é \u{1}", 0),
            ("head", 42),
        ] {
            let expected = frame_of(&json!({
                "id": "run-1:7",
                "sessionId": "sess\"1",
                "timestamp": "2026-07-08T10:00:05.120Z",
                "provider": "claude",
                "kind": "text",
                "role": "assistant",
                "content": with_cut_note(content, cut),
            }));
            let got = text_entry(
                "run-1:7",
                "sess\"1",
                "2026-07-08T10:00:05.120Z",
                "claude",
                "assistant",
                content,
                cut,
            );
            assert_eq!(got, expected);
        }
    }

    #[test]
    fn deltas_become_one_text_and_control_kinds_are_not_history() {
        let mut log = HistoryLog::default();
        log.prompt("s", "claude", "r:prompt", "t0", "say hi");
        delta(&mut log, "r:1", "Hel");
        delta(&mut log, "r:2", "lo");
        let end = EventBody::StreamEnd {};
        log.record("s", "claude", || "r:3".into(), "t", &end, &frame_of(&end));
        let status = EventBody::Status {
            text: Some("working".into()),
            status: None,
            tokens: None,
            token_budget: None,
        };
        log.record(
            "s",
            "claude",
            || "r:4".into(),
            "t",
            &status,
            &frame_of(&status),
        );
        let tool = EventBody::ToolUse {
            tool_name: "Bash".into(),
            tool_input: json!({"command": "ls"}),
            tool_id: "toolu_1".into(),
        };
        log.record("s", "claude", || "r:5".into(), "t", &tool, &frame_of(&tool));
        let (entries, dropped) = log.take();
        assert_eq!(dropped, 0);
        let kinds: Vec<_> = entries.iter().map(|e| (e.kind, e.role)).collect();
        assert_eq!(
            kinds,
            [
                ("text", Some("user")),
                ("text", Some("assistant")),
                ("tool_use", None)
            ]
        );
        let text: Value = serde_json::from_str(&entries[1].body).unwrap();
        assert_eq!(
            (text["content"].as_str(), text["id"].as_str()),
            (Some("Hello"), Some("r:1"))
        );
        assert_eq!(entries[2].tool_id.as_deref(), Some("toolu_1"));
    }

    /// Deltas recorded from their escaped text make the entry that the
    /// decoded deltas make, where the text is cut too.
    #[test]
    fn escaped_deltas_are_recorded_as_decoded_ones() {
        let texts = [
            "Hel".to_string(),
            "lo \" \\ \n \u{1f}".to_string(),
            "é".repeat(MAX_ENTRY_BYTES / 4),
            "\n".repeat(10),
            "xé".repeat(MAX_ENTRY_BYTES / 4),
            "after the cut".to_string(),
        ];
        let (mut decoded, mut escaped) = (HistoryLog::default(), HistoryLog::default());
        for (i, text) in texts.iter().enumerate() {
            delta(&mut decoded, &format!("r:{i}"), text);
            let literal = serde_json::to_string(text).unwrap();
            let inside = &literal[1..literal.len() - 1];
            escaped.record_escaped_delta(|| format!("r:{i}"), "t", inside, text.len());
        }
        let mut entries = Vec::new();
        for log in [&mut decoded, &mut escaped] {
            log.close_text("s", "claude");
            let (got, _) = log.take();
            let got: Vec<_> = got.into_iter().map(|e| (e.kind, e.role, e.body)).collect();
            entries.push(got);
        }
        assert_eq!(entries[0].len(), 1);
        assert!(entries[0][0]
            .2
            .contains("more bytes not kept in the history]"));
        assert_eq!(entries[0], entries[1]);
    }

    #[test]
    fn open_text_stays_until_it_ends_and_long_text_is_cut() {
        let mut log = HistoryLog::default();
        delta(&mut log, "r:1", &"é".repeat(MAX_ENTRY_BYTES));
        assert!(
            log.take().0.is_empty(),
            "streaming text is written when it ends"
        );
        log.close_text("s", "claude");
        let (entries, _) = log.take();
        let text: Value = serde_json::from_str(&entries[0].body).unwrap();
        let content = text["content"].as_str().unwrap();
        assert!(content.len() <= MAX_ENTRY_BYTES + 100);
        assert!(content.ends_with("more bytes not kept in the history]"));
    }
}
