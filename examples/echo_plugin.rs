//! A minimal agentgate plugin server, and the template for writing one.
//!
//! The contract (PROTOCOL.md section 6): the gateway starts the server in
//! the plugin's folder with only `PATH`, `HOME` and `PLUGIN_NAME` set; the
//! server binds a port on 127.0.0.1, prints one stdout line
//! `{"ready":true,"port":N}` within 10 s, and serves WebSocket on `/ws`. The
//! gateway relays each `/plugin-ws/<name>` client socket to `/ws`.
//!
//! This one echoes every text and binary frame back. With `--test-hooks`
//! (used by the gateway's tests) it also answers the text frame `__env__`
//! with its environment as a JSON object, closes the socket with code N on
//! `__close__ N`, and appends every close it receives to `closes.log` in its
//! folder.
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

use actix::{Actor, ActorContext, StreamHandler};
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
}

impl Actor for Echo {
    type Context = ws::WebsocketContext<Self>;
}

impl Echo {
    /// Test hooks; returns false when `text` is not one of them.
    fn hook(&self, text: &str, ctx: &mut ws::WebsocketContext<Self>) -> bool {
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
        if let Some(code) = text.strip_prefix("__close__ ") {
            if let Ok(code) = code.trim().parse::<u16>() {
                ctx.close(Some(ws::CloseReason {
                    code: ws::CloseCode::from(code),
                    description: Some("plugin closing".into()),
                }));
                ctx.stop();
                return true;
            }
        }
        false
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
