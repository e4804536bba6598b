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
            Ok(ws::Message::Continuation(item)) => ctx.write_raw(ws::Message::Continuation(item)),
            Ok(ws::Message::Ping(payload)) => ctx.pong(&payload),
            Ok(ws::Message::Close(reason)) => {
                self.record_close(&reason);
                ctx.close(reason);
                ctx.stop();
            }
            Ok(ws::Message::Pong(_) | ws::Message::Nop) => {}
            Err(err) => {
                eprintln!("echo plugin: protocol error: {err}");
                ctx.stop();
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
