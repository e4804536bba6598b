//! A minimal agentgate plugin server, and the template for writing one.
//!
//! The contract (PROTOCOL.md section 6): the gateway starts the server in
//! the plugin's folder with only `PATH`, `HOME` and `PLUGIN_NAME` set; the
//! server binds a port on 127.0.0.1, prints one stdout line
//! `{"ready":true,"port":N}` within 10 s, and serves WebSocket on `/ws`. The
//! gateway relays each `/plugin-ws/<name>` client socket to `/ws`.
//!
//! This one echoes every text and binary frame back. With `--test-hooks`
//! (used by the gateway's tests) it also understands these text frames:
//!
//! | frame | effect |
//! |---|---|
//! | `__env__` | answers with its environment as a JSON object |
//! | `__close__ N` | closes the socket with code N |
//! | `__flood__ N SIZE` | sends N binary frames of SIZE bytes, each starting with its index (u32, big endian) |
//! | `__sink__` | from now on counts binary frames instead of echoing them |
//! | `__count__` | answers with the number of binary frames counted |
//! | `__pause__ MS` | stops reading this socket for MS milliseconds |
//!
//! and appends the code of every close it receives to `closes.log` in its folder.
//!
//! What a plugin must check itself: actix-web-actors turns an invalid UTF-8
//! text frame into a protocol error and passes fragments of a message on
//! unchecked, so this server checks fragmented text incrementally
//! ([`Utf8Check`]) and closes with 1007 on invalid UTF-8, 1009 on a frame over
//! its limit and 1002 on other protocol errors (actix-http checks close codes
//! and reasons); Autobahn|Testsuite cases 1-10 pass against it
//! (`scripts/autobahn --direct`).
//!
//! Try it by hand:
//!
//! ```text
//! cargo build --example echo_plugin
//! mkdir -p ~/.local/share/agentgate/plugins/echo
//! cp target/debug/examples/echo_plugin ~/.local/share/agentgate/plugins/echo/
//! echo '{"name":"echo","server":"echo_plugin"}' > ~/.local/share/agentgate/plugins/echo/manifest.json
//! cargo run -- serve          # then connect a WebSocket client to /plugin-ws/echo?token=...
//! ```

use std::io::Write;
use std::time::Duration;

use actix::{Actor, ActorContext, AsyncContext, StreamHandler};
use actix_http::ws::Item;
use actix_web::{web, App, HttpRequest, HttpResponse, HttpServer};
use actix_web_actors::ws;

/// Largest frame accepted (the gateway relays frames up to 8 MiB).
const MAX_FRAME: usize = 16 * 1024 * 1024;
/// Seconds in-flight sockets get after SIGTERM (the gateway sends SIGKILL after 3).
const SHUTDOWN_SECS: u64 = 1;
/// Where `--test-hooks` records the closes it receives.
const CLOSE_LOG: &str = "closes.log";

struct Echo {
    test_hooks: bool,
    /// The text message whose fragments are arriving, checked as they come.
    fragmented_text: Option<Utf8Check>,
    /// `__sink__`: count binary frames instead of echoing them.
    sink: bool,
    counted: u64,
}

impl Actor for Echo {
    type Context = ws::WebsocketContext<Self>;
}

impl Echo {
    /// Test hooks; returns false when `text` is not one of them.
    fn hook(&mut self, text: &str, ctx: &mut ws::WebsocketContext<Self>) -> bool {
        if !self.test_hooks {
            return false;
        }
        if text == "__env__" {
            let env: serde_json::Map<String, serde_json::Value> = std::env::vars()
                .map(|(k, v)| (k, serde_json::Value::String(v)))
                .collect();
            ctx.text(serde_json::Value::Object(env).to_string());
            return true;
        }
        let mut words = text.split_whitespace();
        let command = words.next().unwrap_or_default();
        let mut arg = || words.next().and_then(|w| w.parse::<u64>().ok());
        match (command, arg(), arg()) {
            ("__close__", Some(code), _) => {
                ctx.close(Some(ws::CloseReason {
                    code: ws::CloseCode::from(u16::try_from(code).unwrap_or(1000)),
                    description: Some("plugin closing".into()),
                }));
                ctx.stop();
            }
            ("__flood__", Some(n), Some(size)) => {
                for i in 0..n {
                    let mut frame = vec![0u8; size.max(4) as usize];
                    frame[..4].copy_from_slice(&(i as u32).to_be_bytes());
                    ctx.binary(frame);
                }
            }
            ("__sink__", _, _) => self.sink = true,
            ("__count__", _, _) => ctx.text(self.counted.to_string()),
            ("__pause__", Some(ms), _) => {
                ctx.wait(actix::fut::wrap_future(actix::clock::sleep(
                    Duration::from_millis(ms),
                )));
            }
            _ => return false,
        }
        true
    }

    fn record_close(&self, reason: &Option<ws::CloseReason>) {
        if !self.test_hooks {
            return;
        }
        let line = match reason {
            Some(r) => format!("{}\n", u16::from(r.code)),
            None => "none\n".to_string(),
        };
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(CLOSE_LOG);
        if let Ok(mut file) = file {
            let _ = file.write_all(line.as_bytes());
        }
    }
}

/// Incremental UTF-8 check of a fragmented text message: a character may be
/// cut between two fragments, so up to 3 bytes are carried to the next one.
#[derive(Default)]
struct Utf8Check {
    carry: Vec<u8>,
}

impl Utf8Check {
    /// False as soon as the bytes so far cannot start valid UTF-8.
    fn feed(&mut self, mut data: &[u8]) -> bool {
        while !self.carry.is_empty() && !data.is_empty() {
            self.carry.push(data[0]);
            data = &data[1..];
            match std::str::from_utf8(&self.carry) {
                Ok(_) => self.carry.clear(),
                Err(e) if e.error_len().is_none() => {}
                Err(_) => return false,
            }
        }
        match std::str::from_utf8(data) {
            Ok(_) => true,
            Err(e) if e.error_len().is_none() => {
                self.carry.extend_from_slice(&data[e.valid_up_to()..]);
                true
            }
            Err(_) => false,
        }
    }

    /// At the last fragment: no character left incomplete.
    fn complete(&self) -> bool {
        self.carry.is_empty()
    }
}

impl Echo {
    /// Fails the connection with `code`, as RFC 6455 asks of an endpoint
    /// that received something invalid.
    fn fail(&self, ctx: &mut ws::WebsocketContext<Self>, code: u16, why: &str) {
        ctx.close(Some(ws::CloseReason {
            code: ws::CloseCode::from(code),
            description: Some(why.into()),
        }));
        ctx.stop();
    }

    /// Checks a fragment of a text message; false when the connection was failed.
    fn check_fragment(&mut self, item: &Item, ctx: &mut ws::WebsocketContext<Self>) -> bool {
        let (bytes, last) = match item {
            Item::FirstText(b) => {
                self.fragmented_text = Some(Utf8Check::default());
                (b, false)
            }
            Item::FirstBinary(_) => return true,
            Item::Continue(b) => (b, false),
            Item::Last(b) => (b, true),
        };
        let Some(check) = self.fragmented_text.as_mut() else {
            return true; // a binary message
        };
        let valid = check.feed(bytes) && (!last || check.complete());
        if last {
            self.fragmented_text = None;
        }
        if !valid {
            self.fail(ctx, 1007, "Invalid UTF-8");
        }
        valid
    }
}

impl StreamHandler<Result<ws::Message, ws::ProtocolError>> for Echo {
    fn handle(&mut self, msg: Result<ws::Message, ws::ProtocolError>, ctx: &mut Self::Context) {
        match msg {
            Ok(ws::Message::Text(text)) => {
                if !self.hook(&text, ctx) {
                    ctx.text(text);
                }
            }
            Ok(ws::Message::Binary(_)) if self.sink => self.counted += 1,
            Ok(ws::Message::Binary(bytes)) => ctx.binary(bytes),
            Ok(ws::Message::Continuation(item)) => {
                if self.check_fragment(&item, ctx) {
                    ctx.write_raw(ws::Message::Continuation(item));
                }
            }
            Ok(ws::Message::Ping(payload)) => ctx.pong(&payload),
            Ok(ws::Message::Close(reason)) => {
                self.record_close(&reason);
                ctx.close(reason);
                ctx.stop();
            }
            Ok(ws::Message::Pong(_) | ws::Message::Nop) => {}
            Err(err) => {
                eprintln!("echo plugin: protocol error: {err}");
                let (code, why) = match err {
                    // actix-http reports reserved bits as Io(InvalidData),
                    // actix-web-actors a text frame that is not UTF-8 as Io(Other).
                    ws::ProtocolError::Io(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                        (1002, "Protocol error")
                    }
                    ws::ProtocolError::Io(_) => (1007, "Invalid UTF-8"),
                    ws::ProtocolError::Overflow => (1009, "Frame too large"),
                    _ => (1002, "Protocol error"),
                };
                self.fail(ctx, code, why);
            }
        }
    }
}

async fn socket(
    req: HttpRequest,
    stream: web::Payload,
    test_hooks: web::Data<bool>,
) -> Result<HttpResponse, actix_web::Error> {
    let echo = Echo {
        test_hooks: **test_hooks,
        fragmented_text: None,
        sink: false,
        counted: 0,
    };
    ws::WsResponseBuilder::new(echo, &req, stream)
        .frame_size(MAX_FRAME)
        .start()
}

#[actix_web::main]
async fn main() -> std::io::Result<()> {
    let test_hooks = std::env::args().any(|a| a == "--test-hooks");
    let server = HttpServer::new(move || {
        App::new()
            .app_data(web::Data::new(test_hooks))
            .route("/ws", web::get().to(socket))
    })
    .workers(1)
    .shutdown_timeout(SHUTDOWN_SECS)
    // Close the TCP connection right after a WebSocket's closing handshake
    // (the server closes first, RFC 6455 section 7.1.1) instead of waiting
    // up to 1 s for the client to close, as actix-http does by default.
    .client_disconnect_timeout(Duration::ZERO)
    .bind(("127.0.0.1", 0))?;
    let port = server
        .addrs()
        .first()
        .map(|a| a.port())
        .ok_or_else(|| std::io::Error::other("no listening address"))?;
    // The one line the gateway waits for; everything else goes to stderr.
    println!("{}", serde_json::json!({"ready": true, "port": port}));
    std::io::stdout().flush()?;
    eprintln!(
        "echo plugin {:?} listening on 127.0.0.1:{port}",
        std::env::var("PLUGIN_NAME").unwrap_or_default()
    );
    server.run().await
}
