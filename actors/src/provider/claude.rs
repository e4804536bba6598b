//! Claude Code CLI adapter (PROTOCOL.md 4.1, PROVIDERS.md section 2).
//!
//! The CLI runs with stream-json in and out and the stdio permission
//! protocol. Text streams live as `stream_delta`/`stream_end` from the
//! `stream_event` lines (`--include-partial-messages`); the `assistant` line
//! that repeats a streamed text block is not sent again. The turn ends at
//! the `result` line; `is_error` there (whatever the subtype says) makes it
//! a failed turn.

use std::borrow::Cow;
use std::collections::HashSet;

use serde_json::{json, Map, Value};

use super::json_scan::{once, Scanner};
use super::{
    safe_id, CommandSpec, Deltas, LineParser, Provider, ProviderEvent, ProviderKind, Turn,
};
use crate::protocol::{Event, EventBody, PermissionDecision, Role};

/// Permission modes the CLI accepts from `options.permissionMode`.
const PERMISSION_MODES: [&str; 5] = [
    "default",
    "acceptEdits",
    "bypassPermissions",
    "plan",
    "auto",
];
/// User text blocks that are CLI bookkeeping, not something the user wrote.
const HIDDEN_USER_PREFIXES: [&str; 4] = [
    "<system-reminder>",
    "Caveat:",
    "[Request interrupted",
    "Base directory for this skill:",
];
/// Context window assumed for `token_budget` (the reference's default).
const CONTEXT_WINDOW: u64 = 160_000;

pub struct Claude;

fn tool_list(options: &Value, key: &str) -> Option<String> {
    let list: Vec<&str> = options
        .get("toolsSettings")
        .and_then(|t| t.get(key))
        .and_then(Value::as_array)?
        .iter()
        .filter_map(Value::as_str)
        .map(str::trim)
        .filter(|s| super::valid_tool_pattern(s))
        .collect();
    (!list.is_empty()).then(|| list.join(","))
}

/// The argv every turn starts with (PROTOCOL.md 4.1): stream-json both ways,
/// partial messages, permission prompts over stdio. The CLI self-test and the
/// load generator's baseline run the CLI with the same list.
pub const STREAM_ARGS: [&str; 9] = [
    "-p",
    "--input-format",
    "stream-json",
    "--output-format",
    "stream-json",
    "--verbose",
    "--include-partial-messages",
    "--permission-prompt-tool",
    "stdio",
];

impl Provider for Claude {
    fn kind(&self) -> ProviderKind {
        ProviderKind::Claude
    }

    fn command(&self, turn: &Turn) -> CommandSpec {
        let mut spec = CommandSpec::new(&turn.bin);
        for arg in STREAM_ARGS {
            spec.arg(arg);
        }
        if let Some(id) = turn.provider_session_id.as_deref() {
            // The equals form keeps an id from being read as a flag (the
            // registry only hands out ids that pass `safe_id`).
            spec.arg(format!("--resume={id}"));
        }
        // Every client-chosen value goes as `--flag=value`: it cannot
        // become a flag of its own, whatever it starts with.
        if let Some(model) = turn.model() {
            spec.arg(format!("--model={model}"));
        }
        let skip = turn
            .options
            .get("toolsSettings")
            .and_then(|t| t.get("skipPermissions"))
            .or_else(|| turn.options.get("skipPermissions"))
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let mode = turn
            .option_str("permissionMode")
            .filter(|m| PERMISSION_MODES.contains(m));
        let mode = match (mode, skip) {
            (Some("plan"), _) => Some("plan"),
            (_, true) => Some("bypassPermissions"),
            (mode, false) => mode.filter(|m| *m != "default"),
        };
        if let Some(mode) = mode {
            spec.arg(format!("--permission-mode={mode}"));
        }
        if let Some(allowed) = tool_list(&turn.options, "allowedTools") {
            spec.arg(format!("--allowedTools={allowed}"));
        }
        if let Some(denied) = tool_list(&turn.options, "disallowedTools") {
            spec.arg(format!("--disallowedTools={denied}"));
        }
        let mut line = json!({
            "type": "user",
            "message": {"role": "user", "content": turn.content},
            "parent_tool_use_id": null,
            "session_id": "default",
        })
        .to_string()
        .into_bytes();
        line.push(b'\n');
        spec.stdin = Some(line);
        // Stdin carries permission answers and the interrupt; closed after `result`.
        spec.keep_stdin_open = true;
        spec
    }

    fn parser(&self, turn: &Turn) -> Box<dyn LineParser> {
        Box::new(ClaudeParser {
            announced: turn.provider_session_id.clone(),
            ..ClaudeParser::default()
        })
    }

    fn permission_reply(
        &self,
        provider_request_id: &str,
        decision: &PermissionDecision,
        original_input: &Value,
    ) -> Option<Vec<u8>> {
        let response = if decision.allow {
            let mut allow = json!({
                "behavior": "allow",
                "updatedInput": decision.updated_input.clone().unwrap_or_else(|| original_input.clone()),
            });
            // `rememberEntry` becomes the permission update the CLI's
            // control protocol carries: its own rule matching (which splits
            // compound commands) decides later calls of this run.
            if let Some(rule) = decision.remember_entry.as_deref().and_then(allow_rule) {
                allow["updatedPermissions"] = json!([rule]);
            }
            allow
        } else {
            json!({
                "behavior": "deny",
                "message": decision.message.clone().unwrap_or_else(|| "User denied tool use".into()),
            })
        };
        Some(line(json!({
            "type": "control_response",
            "response": {"subtype": "success", "request_id": provider_request_id, "response": response},
        })))
    }

    fn interrupt(&self) -> Option<Vec<u8>> {
        Some(line(json!({
            "type": "control_request",
            "request_id": format!("interrupt-{}", uuid::Uuid::new_v4()),
            "request": {"subtype": "interrupt"},
        })))
    }
}

/// `Tool` or `Tool(specifier)` as the CLI's `addRules` permission update
/// (SDK `PermissionUpdate`) for this process's session; `None` for
/// anything that is not a valid tool pattern.
fn allow_rule(entry: &str) -> Option<Value> {
    let entry = entry.trim();
    if !super::valid_tool_pattern(entry) {
        return None;
    }
    let rule = match entry.split_once('(') {
        Some((tool, rest)) => {
            json!({"toolName": tool, "ruleContent": rest.strip_suffix(')')?})
        }
        None => json!({"toolName": entry}),
    };
    Some(
        json!({"type": "addRules", "rules": [rule], "behavior": "allow", "destination": "session"}),
    )
}

fn line(value: Value) -> Vec<u8> {
    let mut bytes = value.to_string().into_bytes();
    bytes.push(b'\n');
    bytes
}

/// A `stream_event` text delta line, read in place by [`json_scan`]: the
/// bulk of a streaming turn is parsed without a `Value` tree or serde's
/// derived reader (the text is borrowed unless it has escapes). Unknown
/// fields are skipped (and checked); anything else the scanner does not
/// handle takes the `Value` path.
struct DeltaLine<'a> {
    kind: &'a str,
    session_id: Option<Cow<'a, str>>,
    parent_tool_use_id: Option<Cow<'a, str>>,
    event_kind: &'a str,
    index: Option<u64>,
    delta_kind: &'a str,
    text: Text<'a>,
}

/// A delta's text as read from its line.
enum Text<'a> {
    /// Written as serde_json writes it (nothing to decode to forward it):
    /// the inside of the literal and the length of the decoded text.
    Escaped(&'a str, usize),
    /// Any other literal, decoded.
    Decoded(Cow<'a, str>),
}

impl<'a> Text<'a> {
    fn read(s: &mut Scanner<'a>) -> Option<Text<'a>> {
        match s.canonical_string() {
            Some((escaped, len)) => Some(Text::Escaped(escaped, len)),
            None => s.string().map(Text::Decoded),
        }
    }

    fn is_empty(&self) -> bool {
        match self {
            Text::Escaped(_, len) => *len == 0,
            Text::Decoded(text) => text.is_empty(),
        }
    }

    fn decoded(&self) -> Cow<'a, str> {
        match self {
            Text::Escaped(escaped, len) if escaped.len() == *len => Cow::Borrowed(escaped),
            Text::Escaped(escaped, len) => Cow::Owned(super::unescape(escaped, *len)),
            Text::Decoded(text) => text.clone(),
        }
    }
}

/// A string field without escapes (the kinds compared below).
fn plain<'a>(s: &mut Scanner<'a>) -> Option<&'a str> {
    match s.string()? {
        Cow::Borrowed(v) => Some(v),
        Cow::Owned(_) => None,
    }
}

/// How the CLI starts every text delta line (these keys, this order, no
/// spaces), up to the index; [`DeltaLine::exact`] reads such a line with
/// two comparisons where the key-by-key scan reads fourteen strings.
const EXACT_HEAD: &[u8] =
    br#"{"type":"stream_event","event":{"type":"content_block_delta","index":"#;
/// ... and from the index to the text.
const EXACT_DELTA: &[u8] = br#","delta":{"type":"text_delta","text":"#;

impl<'a> DeltaLine<'a> {
    fn scan(line: &'a str) -> Option<DeltaLine<'a>> {
        Self::exact(line).or_else(|| Self::by_keys(line))
    }

    /// A delta line that begins exactly as the CLI writes one: the event
    /// object is then whole (its keys and the delta's are fixed by the
    /// prefix, so none is repeated) and only the top level's other keys are
    /// read one by one. Anything unusual (a second `type` or `event` among
    /// them included) is left to [`DeltaLine::by_keys`].
    fn exact(line: &'a str) -> Option<DeltaLine<'a>> {
        let mut s = Scanner::new(line);
        s.literal(EXACT_HEAD)?;
        let index = s.opt_u64()?;
        s.literal(EXACT_DELTA)?;
        let text = Text::read(&mut s)?;
        s.literal(b"}}")?;
        let (mut session_id, mut parent) = (None, None);
        // The keys the CLI writes next, compared rather than read.
        if s.literal(br#","session_id":"#).is_some() {
            session_id = Some(s.opt_string()?);
        }
        if s.literal(br#","parent_tool_use_id":"#).is_some() {
            parent = Some(s.opt_string()?);
        }
        s.object_rest(|s, key| match key {
            "session_id" => once(&mut session_id, s.opt_string()?),
            "parent_tool_use_id" => once(&mut parent, s.opt_string()?),
            "type" | "event" => None,
            _ => s.skip(1),
        })?;
        s.end()?;
        Some(DeltaLine {
            kind: "stream_event",
            session_id: session_id.flatten(),
            parent_tool_use_id: parent.flatten(),
            event_kind: "content_block_delta",
            index,
            delta_kind: "text_delta",
            text,
        })
    }

    /// Any other line, key by key.
    fn by_keys(line: &'a str) -> Option<DeltaLine<'a>> {
        let mut s = Scanner::new(line);
        let (mut kind, mut session_id, mut parent, mut event) = (None, None, None, None);
        s.object(|s, key| match key {
            "type" => once(&mut kind, plain(s)?),
            "session_id" => once(&mut session_id, s.opt_string()?),
            "parent_tool_use_id" => once(&mut parent, s.opt_string()?),
            "event" => once(&mut event, Self::event(s)?),
            _ => s.skip(1),
        })?;
        s.end()?;
        let (event_kind, index, delta_kind, text) = event?;
        Some(DeltaLine {
            kind: kind?,
            session_id: session_id.flatten(),
            parent_tool_use_id: parent.flatten(),
            event_kind,
            index,
            delta_kind,
            text,
        })
    }

    #[allow(clippy::type_complexity)]
    fn event(s: &mut Scanner<'a>) -> Option<(&'a str, Option<u64>, &'a str, Text<'a>)> {
        let (mut kind, mut index, mut delta) = (None, None, None);
        s.object(|s, key| match key {
            "type" => once(&mut kind, plain(s)?),
            "index" => once(&mut index, s.opt_u64()?),
            "delta" => {
                let (mut kind, mut text) = (None, None);
                s.object(|s, key| match key {
                    "type" => once(&mut kind, plain(s)?),
                    "text" => once(&mut text, Text::read(s)?),
                    _ => s.skip(3),
                })?;
                once(&mut delta, (kind?, text?))
            }
            _ => s.skip(2),
        })?;
        let (delta_kind, text) = delta?;
        Some((kind?, index.flatten(), delta_kind, text))
    }
}

/// Parsing state of one run.
#[derive(Default)]
pub struct ClaudeParser {
    /// The native id already known (resumed or announced), so it is announced once.
    announced: Option<String>,
    /// API message ids whose text was streamed as deltas (their `assistant`
    /// text blocks are not sent again). Cleared at each `result`.
    streamed_messages: HashSet<String>,
    /// The message id of the current stream (`message_start`).
    current_message: Option<String>,
    /// Content block indexes of the current message that are open text
    /// streams (a handful at most: a list, not a hashed set, since every
    /// delta inserts).
    open_text_blocks: Vec<u64>,
    /// `current_message` is already in `streamed_messages` (spares every
    /// delta a hash lookup).
    current_streamed: bool,
    /// Messages whose token usage was already reported.
    usage_reported: HashSet<String>,
}

fn text_of(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        Value::Array(items) => {
            // Tool results may be a list of content blocks; keep their text.
            let texts: Vec<&str> = items
                .iter()
                .filter_map(|b| b.get("text").and_then(Value::as_str))
                .collect();
            if texts.len() == items.len() {
                texts.join("\n")
            } else {
                value.to_string()
            }
        }
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

fn token_budget(usage: &Map<String, Value>) -> EventBody {
    let n = |k: &str| usage.get(k).and_then(Value::as_u64).unwrap_or(0);
    let (input, output) = (n("input_tokens"), n("output_tokens"));
    let (cache_read, cache_creation) = (
        n("cache_read_input_tokens"),
        n("cache_creation_input_tokens"),
    );
    let input_total = input + cache_read + cache_creation;
    EventBody::Status {
        text: Some("token_budget".into()),
        status: None,
        tokens: None,
        token_budget: Some(json!({
            "used": input_total + output,
            "total": CONTEXT_WINDOW,
            "inputTokens": input_total,
            "outputTokens": output,
            "cacheReadTokens": cache_read,
            "cacheCreationTokens": cache_creation,
            "cacheTokens": cache_read + cache_creation,
            "breakdown": {"input": input_total, "output": output},
        })),
    }
}

impl ClaudeParser {
    fn emit(out: &mut Vec<ProviderEvent>, body: EventBody, parent: &Option<String>) {
        out.push(ProviderEvent::Emit(Event {
            body,
            parent_tool_use_id: parent.clone(),
        }));
    }

    fn stream_event(
        &mut self,
        event: &Value,
        parent: &Option<String>,
        out: &mut Vec<ProviderEvent>,
    ) {
        let index = event.get("index").and_then(Value::as_u64).unwrap_or(0);
        match event
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or_default()
        {
            "message_start" => {
                self.current_message = event
                    .pointer("/message/id")
                    .and_then(Value::as_str)
                    .map(str::to_string);
                self.current_streamed = false;
                self.open_text_blocks.clear();
            }
            "content_block_delta" => {
                let delta = event.get("delta");
                if delta.and_then(|d| d.get("type")).and_then(Value::as_str) != Some("text_delta") {
                    return;
                }
                let text = delta
                    .and_then(|d| d.get("text"))
                    .and_then(Value::as_str)
                    .unwrap_or_default();
                if text.is_empty() {
                    return;
                }
                self.text_block_streamed(index);
                Self::emit(
                    out,
                    EventBody::StreamDelta {
                        content: text.to_string(),
                    },
                    parent,
                );
            }
            "content_block_stop" if self.close_text_block(index) => {
                Self::emit(out, EventBody::StreamEnd {}, parent);
            }
            "message_stop" => {
                // An interrupted stream may never stop its blocks.
                for _ in self.open_text_blocks.drain(..) {
                    Self::emit(out, EventBody::StreamEnd {}, parent);
                }
            }
            _ => {}
        }
    }

    fn assistant(&mut self, v: &Value, parent: &Option<String>, out: &mut Vec<ProviderEvent>) {
        let Some(message) = v.get("message") else {
            return;
        };
        let message_id = message
            .get("id")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let streamed = self.streamed_messages.contains(message_id);
        match message.get("content") {
            Some(Value::String(text)) if !text.is_empty() && !streamed => {
                Self::emit(out, EventBody::text(Role::Assistant, text.clone()), parent);
            }
            Some(Value::Array(blocks)) => {
                for block in blocks {
                    match block
                        .get("type")
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                    {
                        "text" => {
                            let text = block
                                .get("text")
                                .and_then(Value::as_str)
                                .unwrap_or_default();
                            if !text.is_empty() && !streamed {
                                Self::emit(out, EventBody::text(Role::Assistant, text), parent);
                            }
                        }
                        "thinking" => {
                            let text = block
                                .get("thinking")
                                .and_then(Value::as_str)
                                .unwrap_or_default();
                            if !text.is_empty() {
                                Self::emit(
                                    out,
                                    EventBody::Thinking {
                                        content: text.to_string(),
                                    },
                                    parent,
                                );
                            }
                        }
                        "tool_use" => Self::emit(
                            out,
                            EventBody::ToolUse {
                                tool_name: block
                                    .get("name")
                                    .and_then(Value::as_str)
                                    .unwrap_or("UnknownTool")
                                    .to_string(),
                                tool_input: block.get("input").cloned().unwrap_or(Value::Null),
                                tool_id: block
                                    .get("id")
                                    .and_then(Value::as_str)
                                    .unwrap_or_default()
                                    .to_string(),
                            },
                            parent,
                        ),
                        _ => {}
                    }
                }
            }
            _ => {}
        }
        if let Some(usage) = message.get("usage").and_then(Value::as_object) {
            if self.usage_reported.insert(message_id.to_string()) {
                Self::emit(out, token_budget(usage), parent);
            }
        }
    }

    fn user(&mut self, v: &Value, parent: &Option<String>, out: &mut Vec<ProviderEvent>) {
        if v.get("isMeta").and_then(Value::as_bool) == Some(true) {
            return;
        }
        let content = v.pointer("/message/content");
        let blocks: Vec<Value> = match content {
            Some(Value::Array(blocks)) => blocks.clone(),
            Some(Value::String(s)) => vec![json!({"type": "text", "text": s})],
            _ => return,
        };
        for block in blocks {
            match block
                .get("type")
                .and_then(Value::as_str)
                .unwrap_or_default()
            {
                "tool_result" => {
                    let tool_id = block
                        .get("tool_use_id")
                        .and_then(Value::as_str)
                        .unwrap_or_default();
                    let content = text_of(block.get("content").unwrap_or(&Value::Null));
                    let is_error = block
                        .get("is_error")
                        .and_then(Value::as_bool)
                        .unwrap_or(false);
                    Self::emit(
                        out,
                        EventBody::tool_result(tool_id, content, is_error),
                        parent,
                    );
                }
                "text" => {
                    let text = block
                        .get("text")
                        .and_then(Value::as_str)
                        .unwrap_or_default();
                    if !text.is_empty() && !HIDDEN_USER_PREFIXES.iter().any(|p| text.starts_with(p))
                    {
                        Self::emit(out, EventBody::text(Role::User, text), parent);
                    }
                }
                _ => {}
            }
        }
    }

    fn result(&mut self, v: &Value, out: &mut Vec<ProviderEvent>) {
        self.streamed_messages.clear();
        self.current_streamed = false;
        self.usage_reported.clear();
        let subtype = v
            .get("subtype")
            .and_then(Value::as_str)
            .unwrap_or("success");
        let is_error =
            v.get("is_error").and_then(Value::as_bool).unwrap_or(false) || subtype != "success";
        if is_error {
            let errors: Vec<String> = v
                .get("errors")
                .and_then(Value::as_array)
                .map(|e| e.iter().map(text_of).collect())
                .unwrap_or_default();
            let message = v
                .get("result")
                .and_then(Value::as_str)
                .filter(|r| !r.is_empty())
                .map(str::to_string)
                .or_else(|| (!errors.is_empty()).then(|| errors.join("; ")))
                .unwrap_or_else(|| format!("Claude ended the turn with an error ({subtype})"));
            Self::emit(out, EventBody::error(message), &None);
        }
        out.push(ProviderEvent::TurnComplete {
            exit_code: if is_error { 1 } else { 0 },
        });
    }

    fn control_request(&mut self, v: &Value, out: &mut Vec<ProviderEvent>) {
        let request_id = v
            .get("request_id")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        let request = v.get("request").cloned().unwrap_or(Value::Null);
        match request
            .get("subtype")
            .and_then(Value::as_str)
            .unwrap_or_default()
        {
            "can_use_tool" => {
                let mut context = Map::new();
                for (from, to) in [
                    ("permission_suggestions", "suggestions"),
                    ("blocked_path", "blockedPath"),
                    ("tool_use_id", "toolUseId"),
                    ("decision_reason", "decisionReason"),
                    ("description", "description"),
                    ("title", "title"),
                ] {
                    if let Some(value) = request.get(from).filter(|v| !v.is_null()) {
                        context.insert(to.into(), value.clone());
                    }
                }
                out.push(ProviderEvent::PermissionRequested {
                    provider_request_id: request_id,
                    tool_name: request
                        .get("tool_name")
                        .and_then(Value::as_str)
                        .unwrap_or("UnknownTool")
                        .to_string(),
                    input: request.get("input").cloned().unwrap_or_else(|| json!({})),
                    context: (!context.is_empty()).then_some(Value::Object(context)),
                });
            }
            "hook_callback" => out.push(ProviderEvent::Reply(line(json!({
                "type": "control_response",
                "response": {"subtype": "success", "request_id": request_id, "response": {}},
            })))),
            other => {
                // Answer so the CLI never waits on us for something we do not support.
                out.push(ProviderEvent::Reply(line(json!({
                    "type": "control_response",
                    "response": {"subtype": "error", "request_id": request_id, "error": format!("unsupported control request: {other}")},
                }))))
            }
        }
    }
}

impl ClaudeParser {
    /// The fast path for text deltas; false when `line` is anything else.
    /// Same effects, in the same order, as the `Value` path for such a line
    /// (`grouped`: a text as serde_json writes it goes into the
    /// [`Deltas`] that `out` ends with, or a new one).
    fn text_delta(&mut self, line: &str, out: &mut Vec<ProviderEvent>, grouped: bool) -> bool {
        let Some(l) = DeltaLine::scan(line) else {
            return false;
        };
        if l.kind != "stream_event"
            || l.event_kind != "content_block_delta"
            || l.delta_kind != "text_delta"
        {
            return false;
        }
        self.announce(l.session_id.as_deref(), out);
        if l.text.is_empty() {
            return true;
        }
        self.text_block_streamed(l.index.unwrap_or(0));
        let parent = l.parent_tool_use_id.map(Cow::into_owned);
        if let (Text::Escaped(escaped, len), true) = (&l.text, grouped) {
            match out.last_mut() {
                Some(ProviderEvent::Deltas(deltas)) => deltas.push(escaped, *len, parent),
                _ => {
                    let mut deltas = Deltas::default();
                    deltas.push(escaped, *len, parent);
                    out.push(ProviderEvent::Deltas(deltas));
                }
            }
            return true;
        }
        let content = l.text.decoded().into_owned();
        Self::emit(out, EventBody::StreamDelta { content }, &parent);
        true
    }

    /// Text was streamed in block `index` of the current message.
    fn text_block_streamed(&mut self, index: u64) {
        if !self.open_text_blocks.contains(&index) {
            self.open_text_blocks.push(index);
        }
        if !self.current_streamed {
            if let Some(id) = &self.current_message {
                self.streamed_messages.insert(id.clone());
                self.current_streamed = true;
            }
        }
    }

    /// Block `index` stopped; true if it was an open text stream.
    fn close_text_block(&mut self, index: u64) -> bool {
        let open = self.open_text_blocks.iter().position(|i| *i == index);
        open.map(|at| self.open_text_blocks.swap_remove(at))
            .is_some()
    }

    /// A native id seen for the first time is announced once.
    fn announce(&mut self, id: Option<&str>, out: &mut Vec<ProviderEvent>) {
        if let Some(id) = id {
            if !id.is_empty() && self.announced.as_deref() != Some(id) && safe_id(id) {
                self.announced = Some(id.to_string());
                out.push(ProviderEvent::SessionCreated(id.to_string()));
            }
        }
    }

    /// Every line the fast path does not take.
    fn parse_value_line(&mut self, line: &str, out: &mut Vec<ProviderEvent>) {
        let v: Value = match serde_json::from_str(line) {
            Ok(v @ Value::Object(_)) => v,
            _ => {
                let shown: String = line.chars().take(200).collect();
                tracing::warn!(provider = "claude", line = %shown, "ignoring a stdout line that is not a JSON object");
                return;
            }
        };
        self.announce(v.get("session_id").and_then(Value::as_str), out);
        let parent = v
            .get("parent_tool_use_id")
            .and_then(Value::as_str)
            .map(str::to_string);
        match v.get("type").and_then(Value::as_str).unwrap_or_default() {
            "stream_event" => {
                if let Some(event) = v.get("event") {
                    self.stream_event(event, &parent, out);
                }
            }
            "assistant" => self.assistant(&v, &parent, out),
            "user" => self.user(&v, &parent, out),
            "result" => self.result(&v, out),
            "control_request" => self.control_request(&v, out),
            "control_cancel_request" => {
                if let Some(id) = v.get("request_id").and_then(Value::as_str) {
                    out.push(ProviderEvent::PermissionWithdrawn {
                        provider_request_id: id.to_string(),
                    });
                }
            }
            // system/init (id captured above), status, api_retry, control_response, rate limits...
            _ => {}
        }
    }
}

impl LineParser for ClaudeParser {
    fn parse_line(&mut self, line: &str, out: &mut Vec<ProviderEvent>) {
        if !self.text_delta(line, out, false) {
            self.parse_value_line(line, out);
        }
    }

    fn parse_line_grouped(&mut self, line: &str, out: &mut Vec<ProviderEvent>) {
        if !self.text_delta(line, out, true) {
            self.parse_value_line(line, out);
        }
    }

    fn finish(&mut self, out: &mut Vec<ProviderEvent>) {
        for _ in self.open_text_blocks.drain(..) {
            Self::emit(out, EventBody::StreamEnd {}, &None);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Grouped deltas as the events they stand for.
    fn ungrouped(events: Vec<ProviderEvent>) -> Vec<ProviderEvent> {
        let mut out = Vec::new();
        for event in events {
            match event {
                ProviderEvent::Deltas(d) => out.extend(d.events().map(ProviderEvent::Emit)),
                other => out.push(other),
            }
        }
        out
    }

    fn parse_all(lines: &str) -> Vec<ProviderEvent> {
        let mut parser = ClaudeParser::default();
        let mut out = Vec::new();
        for line in lines.lines() {
            parser.parse_line(line, &mut out);
        }
        parser.finish(&mut out);
        out
    }

    #[test]
    fn text_delta_fast_path_matches_the_value_path() {
        let lines = [
            r#"{"type":"system","subtype":"init","session_id":"s-1"}"#,
            r#"{"type":"stream_event","event":{"type":"message_start","message":{"id":"m1"}},"session_id":"s-1","parent_tool_use_id":null}"#,
            r#"{"type":"stream_event","event":{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"plain"}},"session_id":"s-1","parent_tool_use_id":null}"#,
            r#"{"type":"stream_event","event":{"type":"content_block_delta","index":1,"delta":{"type":"text_delta","text":"esc \"q\" \n \u00e9"}},"session_id":"s-2","parent_tool_use_id":"toolu_1","extra":[1,2]}"#,
            r#"{"type":"stream_event","event":{"type":"content_block_delta","index":null,"delta":{"type":"text_delta","text":""}},"session_id":"s-2"}"#,
            r#"{"type":"stream_event","event":{"type":"content_block_delta","index":-1,"delta":{"type":"text_delta","text":"neg"}}}"#,
            r#"{"type":"stream_event","event":{"type":"content_block_delta","index":0,"delta":{"type":"input_json_delta","partial_json":"{"}}}"#,
            r#"{"type":"stream_event","event":{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":5}}}"#,
            r#"["stream_event",null,null,{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"array"}}]"#,
            r#"{"type":"stream_event","event":{"type":"content_block_stop","index":0}}"#,
            r#"{"type":"stream_event","event":{"type":"content_block_stop","index":1}}"#,
            // As the real CLI writes them (uuid, api_message_id).
            r#"{"type":"stream_event","event":{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"real"}},"session_id":"708c3a00-c950-43b2-b3bc-49b7a806f227","parent_tool_use_id":null,"uuid":"fbe394c1-f98d-491d-960b-290c7a5b7760","api_message_id":"msg_9"}"#,
            r#" { "type" : "stream_event" , "event" : { "delta" : { "text" : "spaced" , "type" : "text_delta" } , "index" : 3 , "type" : "content_block_delta" } } "#,
            r#"{"type":"stream_event","event":{"type":"content_block_delta","index":2,"delta":{"type":"text_delta","text":"nested","x":{"a":[1,{"b":null}],"c":true}}},"extra":{"deep":[[[]]]},"n":-12}"#,
            r#"{"type":"stream_event","session_id":"s\u002d3","parent_tool_use_id":"t\"q","event":{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"escaped ids"}}}"#,
            // Duplicate keys: a Value keeps the last one.
            r#"{"type":"stream_event","type":"assistant","event":{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"dup"}}}"#,
            r#"{"type":"stream_event","event":{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"a","text":"b"}}}"#,
            // Escaped keys, floats, trailing bytes, bad strings, deep nesting.
            r#"{"t\u0079pe":"stream_event","event":{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"key"}}}"#,
            r#"{"type":"stream_event","event":{"type":"content_block_delta","index":1.0,"delta":{"type":"text_delta","text":"float"}}}"#,
            r#"{"type":"stream_event","event":{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"trail"}}} x"#,
            r#"{"type":"stream_event","event":{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"lone \ud800"}}}"#,
            r#"{"type":"stream_event","x":[[[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]],"event":{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"deep"}}}"#,
            r#"{"type":"stream_event","event":{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"big","n":123456789012345678901234567890}}}"#,
            r#"{"type":"stream_event","event":{"type":"content_block_stop","index":3}}"#,
            // The CLI's own prefix (the exact reader) with unusual rests.
            r#"{"type":"stream_event","event":{"type":"content_block_delta","index":4,"delta":{"type":"text_delta","text":"then a type"}},"type":"assistant"}"#,
            r#"{"type":"stream_event","event":{"type":"content_block_delta","index":4,"delta":{"type":"text_delta","text":"then an event"}},"event":{"type":"message_stop"}}"#,
            r#"{"type":"stream_event","event":{"type":"content_block_delta","index":4,"delta":{"type":"text_delta","text":"two ids"}},"session_id":"s-4","session_id":"s-5"}"#,
            r#"{"type":"stream_event","event":{"type":"content_block_delta","index":null,"delta":{"type":"text_delta","text":"e\u0301 \"x\""}},"session_id":"s-4","parent_tool_use_id":"toolu_2","uuid":"u","n":[1,{"a":null}]}"#,
            r#"{"type":"stream_event","event":{"type":"content_block_delta","index":4,"delta":{"type":"text_delta","text":"more in delta","x":1}},"session_id":"s-4"}"#,
            r#"{"type":"stream_event","event":{"type":"content_block_delta","index":4,"delta":{"type":"text_delta","text":"open"}}"#,
            r#"{"type":"stream_event","event":{"type":"content_block_delta","index":4,"delta":{"type":"text_delta","text":"comma"}},}"#,
            r#"{"type":"stream_event","event":{"type":"content_block_delta","index":4,"delta":{"type":"text_delta","text":"after"}}} {}"#,
            r#"{"type":"stream_event","event":{"type":"content_block_stop","index":4}}"#,
            r#"{"type":"stream_event","event":{"type":"message_stop"}}"#,
        ];
        let mut fast = ClaudeParser::default();
        let mut slow = ClaudeParser::default();
        let mut grouping = ClaudeParser::default();
        let (mut a, mut b, mut c) = (Vec::new(), Vec::new(), Vec::new());
        for line in lines {
            fast.parse_line(line, &mut a);
            slow.parse_value_line(line, &mut b);
            grouping.parse_line_grouped(line, &mut c);
        }
        assert_eq!(a, b);
        assert!(c
            .iter()
            .any(|e| matches!(e, ProviderEvent::Deltas(d) if d.len() > 1)));
        assert_eq!(ungrouped(c), b, "grouped deltas stand for the same events");
        assert!(a.iter().any(|e| matches!(e, ProviderEvent::Emit(ev) if ev.body == EventBody::StreamDelta { content: "esc \"q\" \n é".into() } && ev.parent_tool_use_id.as_deref() == Some("toolu_1"))));
    }

    /// The scanner is a second JSON reader beside serde_json, so every small
    /// corruption of real delta lines (a byte deleted, doubled or replaced by
    /// JSON punctuation, the line cut short) must give the same events
    /// through both paths: the scanner may decline a line, never read it
    /// differently.
    #[test]
    fn fast_path_agrees_with_the_value_path_on_corrupted_lines() {
        let mut seeds: Vec<String> = fixture("text")
            .lines()
            .filter(|l| l.contains("text_delta"))
            .take(3)
            .map(str::to_string)
            .collect();
        seeds.push(r#"{"type":"stream_event","session_id":"s\u002d3","parent_tool_use_id":"t\"q","event":{"type":"content_block_delta","index":7,"delta":{"type":"text_delta","text":"a\\b \u00e9 \ud83d\ude00"}},"x":[1.5e3,-0,true,null,{}]}"#.to_string());
        // Escapes as serde_json (and the CLI) writes them: taken as written.
        seeds.push(r#"{"type":"stream_event","event":{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"q\"\\ \n\t\u001f é"}},"session_id":"s-9","parent_tool_use_id":null}"#.to_string());
        assert!(seeds.len() >= 2, "the text fixture has delta lines");
        let swaps = [
            b'"', b'\\', b'{', b'}', b'[', b']', b',', b':', b' ', b'0', b'-', b'e', b'u', b'n',
            b'x',
        ];
        let (mut checked, mut taken) = (0usize, 0usize);
        let mut check = |bytes: Vec<u8>| {
            let Ok(line) = String::from_utf8(bytes) else {
                return;
            };
            let (mut fast, mut slow) = (ClaudeParser::default(), ClaudeParser::default());
            let mut grouping = ClaudeParser::default();
            let (mut a, mut b, mut c) = (Vec::new(), Vec::new(), Vec::new());
            fast.parse_line(&line, &mut a);
            slow.parse_value_line(&line, &mut b);
            // Twice: the second delta joins the first one's group.
            grouping.parse_line_grouped(&line, &mut c);
            grouping.parse_line_grouped(&line, &mut c);
            assert_eq!(a, b, "paths disagree on {line:?}");
            slow.parse_value_line(&line, &mut b);
            assert_eq!(ungrouped(c), b, "grouped deltas disagree on {line:?}");
            checked += 1;
            taken += usize::from(DeltaLine::scan(&line).is_some());
        };
        for seed in &seeds {
            let s = seed.as_bytes();
            for i in 0..s.len() {
                let mut cut = s.to_vec();
                cut.remove(i);
                check(cut);
                let mut doubled = s.to_vec();
                doubled.insert(i, s[i]);
                check(doubled);
                check(s[..i].to_vec());
                for &c in &swaps {
                    let mut swapped = s.to_vec();
                    swapped[i] = c;
                    check(swapped);
                }
            }
        }
        // Not vacuous: many corrupted lines were still read by the scanner.
        assert!(
            checked > 10_000 && taken > 2_000,
            "{checked} checked, {taken} scanned"
        );
    }

    /// The lines a streaming turn is made of are read by the scanner, not
    /// handed to serde_json.
    #[test]
    fn text_deltas_take_the_scanner() {
        let real = r#"{"type":"stream_event","event":{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"I will \"create\" it.\n"}},"session_id":"708c3a00-c950-43b2-b3bc-49b7a806f227","parent_tool_use_id":null,"uuid":"fbe394c1-f98d-491d-960b-290c7a5b7760","api_message_id":"msg_9"}"#;
        let l = DeltaLine::exact(real).expect("read by the exact reader");
        let k = DeltaLine::by_keys(real).expect("scanned");
        assert_eq!(
            (
                l.kind,
                l.event_kind,
                l.index,
                l.delta_kind,
                l.text.decoded()
            ),
            (
                k.kind,
                k.event_kind,
                k.index,
                k.delta_kind,
                k.text.decoded()
            )
        );
        assert_eq!(
            (&l.session_id, &l.parent_tool_use_id),
            (&k.session_id, &k.parent_tool_use_id)
        );
        assert!(matches!(l.text, Text::Escaped(..)), "taken as written");
        assert_eq!(
            (
                l.kind,
                l.event_kind,
                l.index,
                l.delta_kind,
                &*l.text.decoded()
            ),
            (
                "stream_event",
                "content_block_delta",
                Some(0),
                "text_delta",
                "I will \"create\" it.\n"
            )
        );
        assert_eq!(
            l.session_id.as_deref(),
            Some("708c3a00-c950-43b2-b3bc-49b7a806f227")
        );
        assert_eq!(l.parent_tool_use_id, None);
    }

    fn fixture(name: &str) -> String {
        let path = format!(
            "{}/../tests/fixtures/claude/{name}.jsonl",
            env!("CARGO_MANIFEST_DIR")
        );
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    fn kinds(events: &[ProviderEvent]) -> Vec<String> {
        events
            .iter()
            .map(|e| match e {
                ProviderEvent::Emit(ev) => ev.body.kind().to_string(),
                ProviderEvent::SessionCreated(_) => "session_created".into(),
                ProviderEvent::PermissionRequested { .. } => "permission_requested".into(),
                ProviderEvent::PermissionWithdrawn { .. } => "permission_withdrawn".into(),
                ProviderEvent::TurnComplete { exit_code } => format!("turn_complete:{exit_code}"),
                ProviderEvent::Reply(_) => "reply".into(),
                ProviderEvent::Deltas(_) => "deltas".into(),
            })
            .collect()
    }

    /// The real CLI's plain answer: id once, live deltas, no repeated text, one successful end.
    #[test]
    fn streamed_text_is_not_sent_twice() {
        let events = parse_all(&fixture("text"));
        let k = kinds(&events);
        assert_eq!(k.first().map(String::as_str), Some("session_created"));
        assert_eq!(k.iter().filter(|k| *k == "session_created").count(), 1);
        assert!(!k.contains(&"text".to_string()), "{k:?}");
        let text: String = events
            .iter()
            .filter_map(|e| match e {
                ProviderEvent::Emit(Event {
                    body: EventBody::StreamDelta { content },
                    ..
                }) => Some(content.as_str()),
                _ => None,
            })
            .collect();
        let result: Value = fixture("text")
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .find(|v| v["type"] == "result")
            .unwrap();
        assert_eq!(text, result["result"].as_str().unwrap());
        assert_eq!(k.iter().filter(|k| *k == "stream_end").count(), 1);
        assert_eq!(k.last().map(String::as_str), Some("turn_complete:0"));
    }

    #[test]
    fn tool_permission_request_and_result() {
        let events = parse_all(&fixture("tool_allow"));
        let k = kinds(&events);
        assert!(k.contains(&"tool_use".into()), "{k:?}");
        let perm = events.iter().find_map(|e| match e {
            ProviderEvent::PermissionRequested {
                provider_request_id,
                tool_name,
                input,
                context,
            } => Some((
                provider_request_id.clone(),
                tool_name.clone(),
                input.clone(),
                context.clone(),
            )),
            _ => None,
        });
        let (rid, tool, input, context) = perm.expect("a permission request");
        assert!(!rid.is_empty());
        assert_eq!(tool, "Bash");
        assert!(input["command"].as_str().unwrap().contains("made"));
        assert!(context.unwrap().get("suggestions").is_some());
        assert!(k.contains(&"tool_result".into()));
        assert_eq!(k.last().map(String::as_str), Some("turn_complete:0"));
    }

    #[test]
    fn denied_tool_result_is_an_error_result() {
        let events = parse_all(&fixture("tool_deny"));
        let denied = events.iter().any(|e| {
            matches!(
                e,
                ProviderEvent::Emit(Event {
                    body: EventBody::ToolResult { is_error: true, .. },
                    ..
                })
            )
        });
        assert!(denied);
    }

    #[test]
    fn cancel_request_withdraws_the_permission() {
        let k = kinds(&parse_all(&fixture("interrupt_pending_permission")));
        let req = k.iter().position(|k| k == "permission_requested").unwrap();
        let wd = k.iter().position(|k| k == "permission_withdrawn").unwrap();
        assert!(req < wd);
        assert_eq!(k.last().map(String::as_str), Some("turn_complete:1"));
    }

    #[test]
    fn api_error_result_is_a_failed_turn_with_an_error_event() {
        let events = parse_all(&fixture("api_error_500_no_retry"));
        let k = kinds(&events);
        assert_eq!(k.last().map(String::as_str), Some("turn_complete:1"));
        let error = events.iter().find_map(|e| match e {
            ProviderEvent::Emit(Event {
                body: EventBody::Error { content, .. },
                ..
            }) => Some(content.clone()),
            _ => None,
        });
        assert!(error.unwrap().contains("500"));
    }

    #[test]
    fn unknown_resume_id_reports_the_cli_error() {
        let events = parse_all(&fixture("resume_unknown_session"));
        let error = events.iter().find_map(|e| match e {
            ProviderEvent::Emit(Event {
                body: EventBody::Error { content, .. },
                ..
            }) => Some(content.clone()),
            _ => None,
        });
        assert!(error.unwrap().contains("No conversation found"));
    }

    /// Every documented line type (PROVIDERS.md 2.3), unknown types and garbage.
    #[test]
    fn documented_lines_unknown_types_and_garbage() {
        let lines = r#"{"type":"system","subtype":"init","session_id":"0f6e2d1c","cwd":"/x"}
{"type":"assistant","message":{"id":"msg_01","role":"assistant","content":[{"type":"thinking","thinking":"I should list."}],"usage":{"input_tokens":9,"cache_read_input_tokens":5100,"output_tokens":40}},"parent_tool_use_id":null,"session_id":"0f6e2d1c"}
{"type":"assistant","message":{"id":"msg_01","role":"assistant","content":[{"type":"tool_use","id":"toolu_01","name":"Bash","input":{"command":"npm test"}}]},"parent_tool_use_id":"toolu_parent","session_id":"0f6e2d1c"}
{"type":"control_request","request_id":"hookcb-3","request":{"subtype":"hook_callback","callback_id":"hook_0","input":{}}}
{"type":"control_request","request_id":"weird-1","request":{"subtype":"mystery"}}
{"type":"user","message":{"role":"user","content":[{"type":"tool_result","tool_use_id":"toolu_01","content":[{"type":"text","text":"4 passing"}],"is_error":false}]},"session_id":"0f6e2d1c"}
{"type":"user","message":{"role":"user","content":[{"type":"text","text":"<system-reminder>x</system-reminder>"}]},"session_id":"0f6e2d1c"}
{"type":"assistant","message":{"id":"msg_02","role":"assistant","content":[{"type":"text","text":"All 4 tests pass."}]},"session_id":"0f6e2d1c"}
{"type":"rate_limit_event","whatever":1}
{"type":"brand_new_thing","x":[1,2]}
not json at all
[1,2,3]
{"type":"result","subtype":"error_max_turns","is_error":true,"session_id":"0f6e2d1c"}"#;
        let events = parse_all(lines);
        assert_eq!(
            kinds(&events),
            vec![
                "session_created",
                "thinking",
                "status",
                "tool_use",
                "reply",
                "reply",
                "tool_result",
                "text",
                "error",
                "turn_complete:1"
            ]
        );
        match &events[3] {
            ProviderEvent::Emit(ev) => {
                assert_eq!(ev.parent_tool_use_id.as_deref(), Some("toolu_parent"))
            }
            other => panic!("{other:?}"),
        }
        match &events[6] {
            ProviderEvent::Emit(Event {
                body: EventBody::ToolResult { content, .. },
                ..
            }) => assert_eq!(content, "4 passing"),
            other => panic!("{other:?}"),
        }
        match &events[5] {
            ProviderEvent::Reply(bytes) => {
                let v: Value = serde_json::from_slice(bytes).unwrap();
                assert_eq!(v["response"]["subtype"], "error");
                assert_eq!(v["response"]["request_id"], "weird-1");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn command_line_and_resume() {
        let turn = Turn {
            app_session_id: "app".into(),
            provider_session_id: Some("0f6e2d1c-5b4a".into()),
            content: "hi \"there\"".into(),
            options: json!({"model": "sonnet", "permissionMode": "acceptEdits", "toolsSettings": {"allowedTools": ["Read", "Bash(git log:*)"]}}),
            cwd: "/tmp".into(),
            bin: "claude".into(),
        };
        let spec = Claude.command(&turn);
        let args: Vec<String> = spec
            .args
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert!(args.contains(&"--resume=0f6e2d1c-5b4a".to_string()));
        assert!(args.contains(&"--permission-mode=acceptEdits".to_string()));
        assert!(args.contains(&"--model=sonnet".to_string()));
        assert!(args.contains(&"--allowedTools=Read,Bash(git log:*)".to_string()));
        let stdin: Value = serde_json::from_slice(spec.stdin.as_ref().unwrap()).unwrap();
        assert_eq!(stdin["message"]["content"], "hi \"there\"");
        assert!(spec.keep_stdin_open);

        let evil = Turn {
            options: json!({"permissionMode": "yolo", "model": "--dangerously"}),
            ..turn
        };
        let args: Vec<String> = Claude
            .command(&evil)
            .args
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert!(!args
            .iter()
            .any(|a| a.contains("dangerously") || a.starts_with("--permission-mode")));

        // The web UI's "default" model is the CLI's own default: no flag.
        let web_ui = Turn {
            options: json!({"model": "default", "effort": "default", "permissionMode": "default"}),
            ..evil
        };
        let args: Vec<String> = Claude
            .command(&web_ui)
            .args
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert!(!args.iter().any(|a| a.starts_with("--model")), "{args:?}");
    }

    /// `rememberEntry` travels as the CLI's own `addRules` update; an
    /// entry that is no tool pattern adds nothing.
    #[test]
    fn remember_entry_becomes_an_add_rules_update() {
        let reply = |entry: &str| {
            let decision = PermissionDecision {
                allow: true,
                remember_entry: Some(entry.into()),
                ..PermissionDecision::default()
            };
            let line = Claude
                .permission_reply("perm-1", &decision, &json!({"command": "git log"}))
                .unwrap();
            serde_json::from_slice::<Value>(&line).unwrap()["response"]["response"].clone()
        };
        assert_eq!(
            reply("Bash(git log:*)")["updatedPermissions"],
            json!([{"type": "addRules", "rules": [{"toolName": "Bash", "ruleContent": "git log:*"}], "behavior": "allow", "destination": "session"}])
        );
        assert_eq!(
            reply("Read")["updatedPermissions"][0]["rules"],
            json!([{"toolName": "Read"}])
        );
        for bad in ["", "-x", "Bash(a", "Bash(a,b)"] {
            assert!(reply(bad).get("updatedPermissions").is_none(), "{bad}");
        }
        // A deny never adds a rule.
        let deny = PermissionDecision {
            remember_entry: Some("Bash".into()),
            ..PermissionDecision::default()
        };
        let line = Claude.permission_reply("p", &deny, &json!({})).unwrap();
        assert!(!String::from_utf8(line)
            .unwrap()
            .contains("updatedPermissions"));
    }

    #[test]
    fn permission_replies_echo_the_cli_request_id() {
        let allow = Claude
            .permission_reply(
                "perm-1",
                &PermissionDecision {
                    allow: true,
                    updated_input: None,
                    message: None,
                    remember_entry: None,
                },
                &json!({"command": "ls"}),
            )
            .unwrap();
        let v: Value = serde_json::from_slice(&allow).unwrap();
        assert!(v["response"]["response"]
            .get("updatedPermissions")
            .is_none());
        assert_eq!(v["response"]["request_id"], "perm-1");
        assert_eq!(v["response"]["response"]["behavior"], "allow");
        assert_eq!(v["response"]["response"]["updatedInput"]["command"], "ls");
        let deny = Claude
            .permission_reply(
                "perm-2",
                &PermissionDecision {
                    allow: false,
                    updated_input: None,
                    message: None,
                    remember_entry: None,
                },
                &json!({}),
            )
            .unwrap();
        let v: Value = serde_json::from_slice(&deny).unwrap();
        assert_eq!(v["response"]["response"]["behavior"], "deny");
        assert_eq!(v["response"]["response"]["message"], "User denied tool use");
    }
}
