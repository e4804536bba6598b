//! Cluster mode (`--redis-url`): several gateway nodes share live runs
//! through Redis. The [`bus::ClusterBus`] actor (one per node) owns the
//! Redis connections; this module holds what it and the `RunRegistry`
//! exchange, the Redis key layout and the Lua scripts (pure parts, unit
//! tested here).
//!
//! Key layout (all under `agentgate:`):
//!
//! | key | type | what |
//! |---|---|---|
//! | `lease:{session}` | string `{node}\|{run}`, PX lease | the node that may run the session now (SET NX) |
//! | `running` | hash session -> [`RunMeta`] JSON | live runs cluster-wide (`/api/providers/sessions/running`, node-loss sweep) |
//! | `run:{session}` | string [`RunMeta`] JSON | the session's current or last run (retained like the stream after it completed) |
//! | `events:{session}` | stream, ids `{seq}-0` | every sequenced frame of the session, the cross-node replay buffer (MAXLEN ~ the replay buffer) |
//! | `reaped:{run}` | string | a run ended by another node because its owner was lost |
//! | `cmd:{node}` | stream | commands for a node (abort, permission answer) and their replies |
//! | `upserts` | stream | `session_upserted` frames, forwarded by every node to the owner's sockets |

pub mod bus;

use serde::{Deserialize, Serialize};

use crate::protocol::Frame;

/// Prefix of every key.
pub const PREFIX: &str = "agentgate:";

pub fn lease_key(session: &str) -> String {
    format!("{PREFIX}lease:{session}")
}
pub fn events_key(session: &str) -> String {
    format!("{PREFIX}events:{session}")
}
pub fn meta_key(session: &str) -> String {
    format!("{PREFIX}run:{session}")
}
pub fn reaped_key(run: &str) -> String {
    format!("{PREFIX}reaped:{run}")
}
pub fn cmd_key(node: &str) -> String {
    format!("{PREFIX}cmd:{node}")
}
pub const RUNNING_KEY: &str = "agentgate:running";
pub const UPSERTS_KEY: &str = "agentgate:upserts";

/// The value of a lease key: who holds it for which run.
pub fn lease_value(node: &str, run: &str) -> String {
    format!("{node}|{run}")
}

/// A session's stream id for a seq (explicit ids: a seq is added once).
pub fn stream_id(seq: u64) -> String {
    format!("{seq}-0")
}

/// The seq of a stream id `{seq}-{n}`.
pub fn seq_of(id: &str) -> Option<u64> {
    id.split('-').next()?.parse().ok()
}

/// A run as the cluster knows it (the `running` hash and `run:{session}`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RunMeta {
    pub node: String,
    pub run_id: String,
    pub user_id: i64,
    pub provider: String,
    pub started_at: String,
    pub first_seq: u64,
    /// Set in `run:{session}` once the run completed.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub completed: bool,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub last_seq: u64,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

impl RunMeta {
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }
    pub fn parse(json: &[u8]) -> Option<RunMeta> {
        serde_json::from_slice(json).ok()
    }
}

/// One sequenced frame on its way to the session's stream.
#[derive(Debug, Clone)]
pub struct Outgoing {
    pub seq: u64,
    pub run_id: std::sync::Arc<str>,
    pub kind: &'static str,
    pub frame: Frame,
}

/// One frame read from a session's stream.
#[derive(Debug, Clone, PartialEq)]
pub struct RemoteEvent {
    pub seq: u64,
    pub run_id: String,
    /// The node that added it.
    pub node: String,
    pub kind: String,
    pub frame: Frame,
}

/// `running` entries of a user, with the last seq of each session's stream.
#[derive(Debug, Clone)]
pub struct ClusterRun {
    pub session_id: String,
    pub meta: RunMeta,
    pub last_seq: u64,
}

/// Acquire a session's lease (KEYS: lease, events, running; ARGV: value,
/// lease ms, session, node). Refused (`-1`) when another node holds the
/// lease, or when the `running` hash still lists a run of another node
/// (its lease expired but it was not reaped yet: the sweep ends it within
/// half a lease). A lease of this node's own (a completed run whose
/// release is still on its way) is taken over. Returns the stream's last
/// id (`0-0` for none), so the new run continues above it.
pub const ACQUIRE_LUA: &str = r#"
local cur = redis.call('GET', KEYS[1])
if cur and string.sub(cur, 1, string.len(ARGV[4]) + 1) ~= ARGV[4] .. '|' then return '-1' end
local entry = redis.call('HGET', KEYS[3], ARGV[3])
if entry then
  local ok, meta = pcall(cjson.decode, entry)
  if ok and meta.node ~= ARGV[4] then return '-1' end
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('PERSIST', KEYS[2])
local last = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', 1)
if #last == 0 then return '0-0' end
return last[1][1]
"#;

/// Keep (or put back, after Redis came back empty) a lease this node
/// holds (KEYS: lease, running, meta, reaped; ARGV: value, lease ms,
/// session, running entry or '', meta). 0: lost (another node holds it, or
/// reaped the run); 1: held.
pub const REASSERT_LUA: &str = r#"
if redis.call('EXISTS', KEYS[4]) == 1 then return 0 end
local cur = redis.call('GET', KEYS[1])
if not cur then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
elseif cur == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
else
  return 0
end
if ARGV[4] ~= '' then redis.call('HSET', KEYS[2], ARGV[3], ARGV[4]) end
redis.call('SET', KEYS[3], ARGV[5])
return 1
"#;

/// Add frames to a session's stream in seq order (KEYS: events, lease,
/// reaped, running, meta; ARGV: lease value, maxlen, node, lease ms,
/// retention ms, session, then (seq, run, kind, frame) per frame).
///
/// -1 when the lease is another node's, or the run was reaped (a node cut
/// off from Redis that comes back must not add to a run another node
/// ended); a lease Redis lost (it came back empty) is put back. Else how
/// many were added: a seq at or below the stream's last is refused by
/// Redis and skipped (it was added before). The run's `complete` frees the
/// session in the same step (lease, `running` entry; the meta says
/// completed; stream and meta expire after the retention), so whoever
/// reads the `complete` may start the next run at once.
pub const PUBLISH_LUA: &str = r#"
local cur = redis.call('GET', KEYS[2])
if cur ~= ARGV[1] then
  if cur or redis.call('EXISTS', KEYS[3]) == 1 then return -1 end
  redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[4])
end
local added = 0
for i = 7, #ARGV, 4 do
  local r = redis.pcall('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], ARGV[i] .. '-0',
    'run', ARGV[i + 1], 'node', ARGV[3], 'kind', ARGV[i + 2], 'frame', ARGV[i + 3])
  if type(r) ~= 'table' or not r.err then
    added = added + 1
    if ARGV[i + 2] == 'complete' then
      if redis.call('GET', KEYS[2]) == ARGV[1] and string.sub(ARGV[1], -string.len(ARGV[i + 1]) - 1) == '|' .. ARGV[i + 1] then
        redis.call('DEL', KEYS[2])
      end
      local e = redis.call('HGET', KEYS[4], ARGV[6])
      if e then
        local ok, m = pcall(cjson.decode, e)
        if ok and m.runId == ARGV[i + 1] then redis.call('HDEL', KEYS[4], ARGV[6]) end
      end
      local cm = redis.call('GET', KEYS[5])
      if cm then
        local ok, m = pcall(cjson.decode, cm)
        if ok and m.runId == ARGV[i + 1] then
          m.completed = true
          m.lastSeq = tonumber(ARGV[i])
          redis.call('SET', KEYS[5], cjson.encode(m), 'PX', ARGV[5])
        end
      end
      redis.call('PEXPIRE', KEYS[1], ARGV[5])
    end
  end
end
return added
"#;

/// After a run's last frame is in its stream (KEYS: lease, running, meta,
/// events; ARGV: lease value, session, running entry, completed meta,
/// retention ms): the lease is deleted if still this one, the `running`
/// entry if still this run's, and the stream and meta expire after the
/// retention.
pub const RELEASE_LUA: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
if redis.call('HGET', KEYS[2], ARGV[2]) == ARGV[3] then redis.call('HDEL', KEYS[2], ARGV[2]) end
local cur = redis.call('GET', KEYS[3])
if (not cur) or cur == ARGV[3] then
  redis.call('SET', KEYS[3], ARGV[4], 'PX', ARGV[5])
end
redis.call('PEXPIRE', KEYS[4], ARGV[5])
return 1
"#;

/// The node-loss sweep, for one `running` entry (KEYS: lease, running,
/// events, reaped; ARGV: session, entry as read, this node, lease ms,
/// retention ms, the entry's run id). Only when the lease is gone and the entry unchanged: the
/// entry is removed, the lease taken for the reap, the run marked reaped;
/// returns the stream's last id (exactly one node gets it), else nil.
pub const REAP_LUA: &str = r#"
if redis.call('EXISTS', KEYS[1]) == 1 then return false end
if redis.call('HGET', KEYS[2], ARGV[1]) ~= ARGV[2] then return false end
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('SET', KEYS[1], ARGV[3] .. '|' .. ARGV[6], 'PX', ARGV[4])
redis.call('SET', KEYS[4], '1', 'PX', ARGV[5])
local last = redis.call('XREVRANGE', KEYS[3], '+', '-', 'COUNT', 1)
if #last == 0 then return '0-0' end
return last[1][1]
"#;

fn bytes(v: &redis::Value) -> Option<&[u8]> {
    match v {
        redis::Value::BulkString(b) => Some(b),
        redis::Value::SimpleString(s) => Some(s.as_bytes()),
        _ => None,
    }
}

fn text(v: &redis::Value) -> Option<String> {
    bytes(v).map(|b| String::from_utf8_lossy(b).into_owned())
}

/// A stream entry's fields, in order.
pub type Fields = Vec<(String, Vec<u8>)>;
/// Stream entries: (id, fields).
pub type Entries = Vec<(String, Fields)>;

/// The entries of one stream in an XRANGE/XREAD answer: `[[id, [f, v, ...]], ...]`.
pub fn parse_entries(v: &redis::Value) -> Entries {
    let redis::Value::Array(entries) = v else {
        return Vec::new();
    };
    entries
        .iter()
        .filter_map(|e| {
            let redis::Value::Array(pair) = e else {
                return None;
            };
            let id = text(pair.first()?)?;
            let redis::Value::Array(fields) = pair.get(1)? else {
                return None;
            };
            let fields = fields
                .chunks(2)
                .filter_map(|kv| Some((text(kv.first()?)?, bytes(kv.get(1)?)?.to_vec())))
                .collect();
            Some((id, fields))
        })
        .collect()
}

/// An XREAD answer: per stream key its entries (nil when nothing came).
pub fn parse_xread(v: &redis::Value) -> Vec<(String, Entries)> {
    match v {
        redis::Value::Array(streams) => streams
            .iter()
            .filter_map(|s| {
                let redis::Value::Array(pair) = s else {
                    return None;
                };
                Some((text(pair.first()?)?, parse_entries(pair.get(1)?)))
            })
            .collect(),
        // RESP3 answers a map.
        redis::Value::Map(streams) => streams
            .iter()
            .filter_map(|(k, v)| Some((text(k)?, parse_entries(v))))
            .collect(),
        _ => Vec::new(),
    }
}

/// A session stream entry as a [`RemoteEvent`]; `None` for a malformed one.
pub fn remote_event(id: &str, fields: Fields) -> Option<RemoteEvent> {
    let seq = seq_of(id)?;
    let (mut run_id, mut node, mut kind, mut frame) = (None, None, None, None);
    for (k, v) in fields {
        match k.as_str() {
            "run" => run_id = String::from_utf8(v).ok(),
            "node" => node = String::from_utf8(v).ok(),
            "kind" => kind = String::from_utf8(v).ok(),
            "frame" => frame = Frame::try_from(v).ok(),
            _ => {}
        }
    }
    Some(RemoteEvent {
        seq,
        run_id: run_id?,
        node: node.unwrap_or_default(),
        kind: kind?,
        frame: frame?,
    })
}

/// A generated node id: 8 hex digits of a v4 uuid.
pub fn generated_node_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..8].to_string()
}

/// A node id must be usable in a key and a log line.
pub fn valid_node_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
}

#[cfg(test)]
mod tests {
    use super::*;
    use redis::Value;

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    #[test]
    fn keys_and_ids() {
        assert_eq!(lease_key("s1"), "agentgate:lease:s1");
        assert_eq!(events_key("s1"), "agentgate:events:s1");
        assert_eq!(lease_value("n1", "r1"), "n1|r1");
        assert_eq!(stream_id(42), "42-0");
        assert_eq!(seq_of("42-0"), Some(42));
        assert_eq!(seq_of("1700000000000-3"), Some(1_700_000_000_000));
        assert_eq!(seq_of("x"), None);
    }

    #[test]
    fn run_meta_round_trips_and_omits_defaults() {
        let meta = RunMeta {
            node: "a".into(),
            run_id: "r".into(),
            user_id: 7,
            provider: "claude".into(),
            started_at: "t".into(),
            first_seq: 3,
            completed: false,
            last_seq: 0,
        };
        let json = meta.to_json();
        assert!(!json.contains("completed"), "{json}");
        assert_eq!(
            json,
            r#"{"node":"a","runId":"r","userId":7,"provider":"claude","startedAt":"t","firstSeq":3}"#
        );
        assert_eq!(RunMeta::parse(json.as_bytes()), Some(meta));
        assert_eq!(RunMeta::parse(b"{nope"), None);
    }

    #[test]
    fn xread_answers_are_parsed_into_events() {
        let entry = |id: &str, seq_frame: &str| {
            Value::Array(vec![
                bulk(id),
                Value::Array(vec![
                    bulk("run"),
                    bulk("r1"),
                    bulk("node"),
                    bulk("a"),
                    bulk("kind"),
                    bulk("text"),
                    bulk("frame"),
                    bulk(seq_frame),
                ]),
            ])
        };
        let answer = Value::Array(vec![Value::Array(vec![
            bulk("agentgate:events:s1"),
            Value::Array(vec![
                entry("5-0", "{\"seq\":5}"),
                entry("6-0", "{\"seq\":6}"),
            ]),
        ])]);
        let streams = parse_xread(&answer);
        assert_eq!(streams.len(), 1);
        assert_eq!(streams[0].0, "agentgate:events:s1");
        let events: Vec<RemoteEvent> = streams[0]
            .1
            .iter()
            .cloned()
            .filter_map(|(id, f)| remote_event(&id, f))
            .collect();
        assert_eq!(events.len(), 2);
        assert_eq!(events[1].seq, 6);
        assert_eq!(events[1].run_id, "r1");
        assert_eq!(events[1].node, "a");
        assert_eq!(&*events[1].frame, "{\"seq\":6}");
        // Nothing came (BLOCK timed out).
        assert!(parse_xread(&Value::Nil).is_empty());
        // A malformed entry is skipped, not a panic.
        assert!(remote_event("5-0", vec![("run".into(), b"r".to_vec())]).is_none());
    }

    #[test]
    fn node_ids() {
        let id = generated_node_id();
        assert_eq!(id.len(), 8);
        assert!(valid_node_id(&id));
        assert!(valid_node_id("node-a.1_x"));
        assert!(!valid_node_id(""));
        assert!(!valid_node_id("a b"));
        assert!(!valid_node_id("a|b"));
        assert!(!valid_node_id(&"x".repeat(65)));
    }
}
