//! A stand-in for the Claude Code CLI that speaks its stream-json protocol
//! (init, `stream_event` text deltas, `assistant`, `result`, `can_use_tool`
//! control requests, interrupts) as fast as it can, scripted by the prompt.
//! The gateway cannot tell it from the real CLI; the tests use it for cases
//! the real CLI cannot be made to do on demand (crash, hang, garbage, a
//! duplicate result), and the benchmarks use it as a full-speed provider.
//!
//! A test program, so an example rather than a binary of the production
//! package: `cargo build --example fake_claude`, then run the gateway with
//! `--claude-bin target/debug/examples/fake_claude` (the tests build and
//! locate it themselves, see `tests/util.rs`). The prompt is a list of
//! `key:value` words, e.g. `text:1000 size:64 ts`:
//!
//! | word | effect |
//! |---|---|
//! | `text:N` | stream N text deltas (default 3) |
//! | `size:B` | each delta carries B bytes of payload (default 8) |
//! | `delay_ms:D` | sleep D ms between deltas (an interrupt stops the stream) |
//! | `ts` | each delta starts with `t=<unix nanos>;`, stamped when the line is written to stdout (latency measurement) |
//! | `chunk:B` | write stdout in chunks of up to B bytes (default: every line on its own with `ts` or `delay_ms`, else 64 KiB) |
//! | `permission:TOOL` | ask `can_use_tool` for TOOL first; the answer decides the tool result |
//! | `asks:N` | with `permission`, ask N times in the turn (default 1); a tool an answer allowed by a whole-tool `addRules` update is not asked again |
//! | `exit:C` | exit with code C before the result |
//! | `crash` | kill itself with SIGKILL mid-stream |
//! | `hang` | stop writing and never exit by itself |
//! | `garbage` | interleave lines that are not JSON |
//! | `double_result` | print the result line twice |
//! | `error_result` | end with an error result |
//! | `args` | first delta is the argv (to check `--resume`) |
//! | `sched` | first delta is `sched_policy=N`, this process's scheduling policy (`sched_getscheduler`) |
//! | `pipe` | first delta is `stdout_pipe=N`, the capacity of the pipe on its stdout in bytes (`F_GETPIPE_SZ`) |
//! | `session:ID` | announce ID as the session id (default: the resumed id or a new one) |
//! | `stderr:TEXT` | write TEXT to stderr first |
//! | `stderr_flood:M` | write to stderr first: a line of M MiB (its newline after the last byte), a line that is not UTF-8 (`bad \xff\xfe bytes`), then `flood over` |
//! | `linger` | after the result, close stdout and stderr and never exit |
//! | `orphan` | first start `sleep 3600` in its own process group, holding stdout and stderr, and leave it behind |

use std::fmt::Write as _;
use std::io::{BufRead, Write};
use std::sync::mpsc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

struct Script {
    deltas: usize,
    size: usize,
    delay: Duration,
    timestamps: bool,
    permission: Option<String>,
    asks: usize,
    exit: Option<i32>,
    crash: bool,
    hang: bool,
    garbage: bool,
    double_result: bool,
    error_result: bool,
    args: bool,
    sched: bool,
    pipe: bool,
    session: Option<String>,
    stderr: Option<String>,
    stderr_flood: usize,
    chunk: Option<usize>,
    linger: bool,
    orphan: bool,
}

impl Script {
    fn parse(prompt: &str) -> Script {
        let mut s = Script {
            deltas: 3,
            size: 8,
            delay: Duration::ZERO,
            timestamps: false,
            permission: None,
            asks: 1,
            exit: None,
            crash: false,
            hang: false,
            linger: false,
            orphan: false,
            garbage: false,
            double_result: false,
            error_result: false,
            args: false,
            sched: false,
            pipe: false,
            session: None,
            stderr: None,
            stderr_flood: 0,
            chunk: None,
        };
        for word in prompt.split_whitespace() {
            let (key, value) = word.split_once(':').unwrap_or((word, ""));
            match key {
                "text" => s.deltas = value.parse().unwrap_or(3),
                "size" => s.size = value.parse().unwrap_or(8),
                "delay_ms" => s.delay = Duration::from_millis(value.parse().unwrap_or(0)),
                "ts" => s.timestamps = true,
                "permission" => s.permission = Some(value.to_string()),
                "asks" => s.asks = value.parse().unwrap_or(1),
                "exit" => s.exit = value.parse().ok(),
                "crash" => s.crash = true,
                "hang" => s.hang = true,
                "linger" => s.linger = true,
                "orphan" => s.orphan = true,
                "garbage" => s.garbage = true,
                "double_result" => s.double_result = true,
                "error_result" => s.error_result = true,
                "args" => s.args = true,
                "sched" => s.sched = true,
                "pipe" => s.pipe = true,
                "session" => s.session = Some(value.to_string()),
                "stderr" => s.stderr = Some(value.to_string()),
                "stderr_flood" => s.stderr_flood = value.parse().unwrap_or(0),
                "chunk" => s.chunk = value.parse().ok(),
                _ => {}
            }
        }
        s
    }
}

/// A line of `mib` MiB on stderr, then one that is not UTF-8, then `flood over`.
fn stderr_flood(mib: usize) {
    let mut err = std::io::stderr().lock();
    let block = vec![b'x'; 1024 * 1024];
    for _ in 0..mib {
        if err.write_all(&block).is_err() {
            return;
        }
    }
    let _ = err.write_all(b"\nbad \xff\xfe bytes\nflood over\n");
}

fn nanos() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

/// Digits of a unix-nanosecond stamp (fixed width until the year 2286).
const STAMP_DIGITS: usize = 19;
/// Longest text repeated in the final assistant and result lines.
const FULL_TEXT_MAX: usize = 1024 * 1024;
/// Default stdout chunk when lines need not be written one by one.
const DEFAULT_CHUNK: usize = 64 * 1024;

/// Stdout with its own buffer, so `ts` stamps can be written at the moment
/// the bytes go to the pipe (placeholders patched on flush) whatever the chunking.
struct Out {
    buf: Vec<u8>,
    /// Offsets in `buf` of stamp placeholders.
    stamps: Vec<usize>,
    session: String,
    /// The session id as a JSON string (quoted, escaped), for the delta fast path.
    session_json: String,
    /// Flush once `buf` holds this many bytes; 0 = after every line.
    chunk: usize,
}

impl Out {
    fn set_session(&mut self, session: String) {
        self.session_json = serde_json::to_string(&session).unwrap_or_else(|_| "\"\"".into());
        self.session = session;
    }

    fn line(&mut self, v: Value) {
        // Serializing a Value into a Vec cannot fail.
        let _ = serde_json::to_writer(&mut self.buf, &v);
        self.end_line();
    }

    fn raw_line(&mut self, text: &str) {
        self.buf.extend_from_slice(text.as_bytes());
        self.end_line();
    }

    fn end_line(&mut self) {
        self.buf.push(b'\n');
        if self.buf.len() >= self.chunk {
            self.flush();
        }
    }

    fn flush(&mut self) {
        if !self.stamps.is_empty() {
            let now = format!("{:0width$}", nanos(), width = STAMP_DIGITS);
            for &at in &self.stamps {
                self.buf[at..at + STAMP_DIGITS].copy_from_slice(now.as_bytes());
            }
            self.stamps.clear();
        }
        // A closed stdout means the gateway is gone: stop quietly.
        let mut stdout = std::io::stdout().lock();
        if stdout.write_all(&self.buf).is_err() || stdout.flush().is_err() {
            std::process::exit(0);
        }
        self.buf.clear();
    }

    fn stream(&mut self, event: Value) {
        let session = self.session.clone();
        self.line(json!({"type":"stream_event","event":event,"session_id":session,"parent_tool_use_id":null}));
    }

    /// One text delta without building a `Value` (the benchmarks' hot path).
    /// `payload` is plain ASCII; `stamp` puts `t=<nanos>;` first.
    fn text_delta(&mut self, i: usize, payload: &str, stamp: bool) {
        self.buf.extend_from_slice(
            br#"{"type":"stream_event","event":{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":""#,
        );
        if stamp {
            self.buf.extend_from_slice(b"t=");
            self.stamps.push(self.buf.len());
            self.buf.extend_from_slice(&[b'0'; STAMP_DIGITS]);
            self.buf.push(b';');
        }
        let _ = write!(self.buf, "{i}:{payload} ");
        self.buf.extend_from_slice(br#""}},"session_id":"#);
        self.buf.extend_from_slice(self.session_json.as_bytes());
        self.buf
            .extend_from_slice(br#","parent_tool_use_id":null}"#);
        self.end_line();
    }
}

enum Input {
    Line(Value),
    Eof,
}

fn main() {
    let argv: Vec<String> = std::env::args().collect();
    let resumed = argv
        .iter()
        .find_map(|a| a.strip_prefix("--resume=").map(str::to_string));
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines().map_while(Result::ok) {
            if let Ok(v) = serde_json::from_str::<Value>(&line) {
                if tx.send(Input::Line(v)).is_err() {
                    return;
                }
            }
        }
        let _ = tx.send(Input::Eof);
    });

    let mut out = Out {
        buf: Vec::with_capacity(DEFAULT_CHUNK + 4096),
        stamps: Vec::new(),
        session: String::new(),
        session_json: String::new(),
        chunk: 0,
    };
    let mut turn = 0;
    // One process serves turns until stdin closes, as the real CLI.
    loop {
        let prompt = loop {
            match rx.recv() {
                Ok(Input::Line(v)) if v["type"] == "user" => {
                    break v["message"]["content"]
                        .as_str()
                        .unwrap_or_default()
                        .to_string()
                }
                Ok(Input::Line(_)) => continue,
                Ok(Input::Eof) | Err(_) => std::process::exit(0),
            }
        };
        turn += 1;
        let script = Script::parse(&prompt);
        if let Some(text) = &script.stderr {
            eprintln!("{text}");
        }
        if script.stderr_flood > 0 {
            stderr_flood(script.stderr_flood);
        }
        if script.orphan {
            use std::os::unix::process::CommandExt;
            // A background job that outlives the CLI and keeps its pipes open.
            let _ = std::process::Command::new("sleep")
                .arg("3600")
                .process_group(0)
                .spawn();
        }
        out.set_session(
            script
                .session
                .clone()
                .or_else(|| resumed.clone())
                .unwrap_or_else(|| format!("fake-{}-{}", std::process::id(), nanos())),
        );
        let line_by_line = script.timestamps || !script.delay.is_zero();
        out.chunk = script
            .chunk
            .unwrap_or(if line_by_line { 0 } else { DEFAULT_CHUNK });
        let session = out.session.clone();
        out.line(json!({"type":"system","subtype":"init","session_id":session,"cwd":std::env::current_dir().map(|d| d.display().to_string()).unwrap_or_default(),"model":"fake","tools":["Bash"]}));

        let mut tool_denied = None;
        // Whole-tool allow rules the answers added (`updatedPermissions`
        // `addRules` without `ruleContent`), as the real CLI keeps them for
        // the session: such a tool is not asked again.
        let mut allowed_tools: Vec<String> = Vec::new();
        for ask in 0..script.asks {
            let Some(tool) = &script.permission else {
                break;
            };
            let (tool_id, request_id) = (format!("toolu_fake_{ask}"), format!("perm-{turn}-{ask}"));
            out.line(json!({"type":"assistant","message":{"id":format!("msg_tool_{turn}_{ask}"),"role":"assistant","content":[{"type":"tool_use","id":tool_id,"name":tool,"input":{"command":"touch allowed.txt"}}]},"session_id":session,"parent_tool_use_id":null}));
            if allowed_tools.contains(tool) {
                let _ = std::fs::write("allowed.txt", "by rule");
                out.line(json!({"type":"user","message":{"role":"user","content":[{"type":"tool_result","tool_use_id":tool_id,"content":"done","is_error":false}]},"session_id":session,"parent_tool_use_id":null}));
                tool_denied = Some(false);
                continue;
            }
            out.line(json!({"type":"control_request","request_id":request_id,"request":{"subtype":"can_use_tool","tool_name":tool,"input":{"command":"touch allowed.txt"},"tool_use_id":tool_id}}));
            out.flush();
            let answer = loop {
                match rx.recv() {
                    Ok(Input::Line(v)) if v["type"] == "control_response" => break v,
                    Ok(Input::Line(v)) if v["request"]["subtype"] == "interrupt" => {
                        out.line(json!({"type":"control_cancel_request","request_id":request_id}));
                        interrupted(&mut out);
                        drain_until_eof(&rx);
                    }
                    Ok(Input::Line(_)) => {}
                    Ok(Input::Eof) | Err(_) => std::process::exit(1),
                }
            };
            let allowed = answer["response"]["response"]["behavior"] == "allow";
            for update in answer["response"]["response"]["updatedPermissions"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|u| u["type"] == "addRules" && u["behavior"] == "allow")
            {
                for rule in update["rules"].as_array().into_iter().flatten() {
                    if let (Some(name), None) = (rule["toolName"].as_str(), rule.get("ruleContent"))
                    {
                        allowed_tools.push(name.to_string());
                    }
                }
            }
            if allowed {
                // The "tool" really acts in the project dir, so tests can see it ran.
                let _ = std::fs::write(
                    "allowed.txt",
                    answer["response"]["response"]["updatedInput"].to_string(),
                );
            }
            tool_denied = Some(!allowed);
            let content = if allowed {
                "done"
            } else {
                "User denied tool use"
            };
            out.line(json!({"type":"user","message":{"role":"user","content":[{"type":"tool_result","tool_use_id":tool_id,"content":content,"is_error":!allowed}]},"session_id":session,"parent_tool_use_id":null}));
        }

        let msg_id = format!("msg_{turn}");
        out.stream(
            json!({"type":"message_start","message":{"id":msg_id,"role":"assistant","content":[]}}),
        );
        out.stream(json!({"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}));
        let payload = "x".repeat(script.size);
        // The final assistant/result lines repeat the text only while it stays small
        // (a huge line would exceed the gateway's line limit).
        let keep_full =
            script.deltas < 10_000 && script.deltas.saturating_mul(script.size + 8) < FULL_TEXT_MAX;
        let mut full = String::new();
        for i in 0..script.deltas {
            if script.crash && i == script.deltas / 2 {
                out.flush();
                unsafe { libc::kill(std::process::id() as i32, libc::SIGKILL) };
            }
            if let Some(code) = script.exit.filter(|_| i == script.deltas / 2) {
                out.flush();
                std::process::exit(code);
            }
            if script.hang && i == script.deltas / 2 {
                out.flush();
                loop {
                    std::thread::sleep(Duration::from_secs(3600));
                }
            }
            if script.garbage && i % 2 == 0 {
                out.raw_line(&format!("this is not json {i}"));
            }
            if (script.args || script.sched || script.pipe) && i == 0 {
                let text = if script.args {
                    argv[1..].join(" ")
                } else if script.sched {
                    // SAFETY: no arguments, no memory touched.
                    format!("sched_policy={}", unsafe { libc::sched_getscheduler(0) })
                } else {
                    // SAFETY: a query of descriptor 1, no memory touched.
                    format!("stdout_pipe={}", unsafe {
                        libc::fcntl(1, libc::F_GETPIPE_SZ)
                    })
                };
                if keep_full {
                    full.push_str(&text);
                }
                out.stream(json!({"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":text}}));
            } else {
                if keep_full {
                    let _ = write!(full, "{i}:{payload} ");
                }
                out.text_delta(i, &payload, script.timestamps);
            }
            if !script.delay.is_zero() {
                if let Ok(Input::Line(v)) = rx.recv_timeout(script.delay) {
                    if v["request"]["subtype"] == "interrupt" {
                        interrupted(&mut out);
                        drain_until_eof(&rx);
                    }
                }
            }
        }
        let session = out.session.clone();
        out.line(json!({"type":"assistant","message":{"id":msg_id,"role":"assistant","content":[{"type":"text","text":full}],"usage":{"input_tokens":3,"output_tokens":script.deltas}},"session_id":session,"parent_tool_use_id":null}));
        out.stream(json!({"type":"content_block_stop","index":0}));
        out.stream(json!({"type":"message_stop"}));
        let is_error = script.error_result;
        let result = json!({"type":"result","subtype": if is_error {"error_during_execution"} else {"success"},"is_error":is_error,"result": if is_error {"fake failure".to_string()} else {full.clone()},"session_id":session,"num_turns":1,"permission_denials": if tool_denied == Some(true) {json!([{"tool_name":"Bash"}])} else {json!([])}});
        out.line(result.clone());
        if script.double_result {
            out.line(result);
        }
        out.flush();
        if script.linger {
            // SAFETY: closing our own standard streams; nothing writes them after this.
            unsafe {
                libc::close(1);
                libc::close(2);
            }
            loop {
                std::thread::sleep(Duration::from_secs(3600));
            }
        }
    }
}

fn interrupted(out: &mut Out) {
    let session = out.session.clone();
    out.line(json!({"type":"control_response","response":{"subtype":"success","request_id":"interrupt","response":{}}}));
    out.line(json!({"type":"result","subtype":"error_during_execution","is_error":true,"session_id":session,"terminal_reason":"aborted_streaming"}));
    out.flush();
}

fn drain_until_eof(rx: &mpsc::Receiver<Input>) -> ! {
    loop {
        match rx.recv() {
            Ok(Input::Line(_)) => {}
            Ok(Input::Eof) | Err(_) => std::process::exit(1),
        }
    }
}
