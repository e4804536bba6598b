//! Client library for agentgate's remote sessions (PROTOCOL.md section 8):
//! follow and steer an agent session running on another machine, as
//! Claude Code's remote-session client does, with that client's reconnect
//! policy (seed 001).
//!
//! ```no_run
//! use agentgate_client::{Event, RemoteSession, SessionConfig};
//! use futures_util::StreamExt;
//!
//! # async fn run() {
//! let config = SessionConfig::new("http://127.0.0.1:3001", "session_<id>", || "JWT".to_string());
//! let mut session = RemoteSession::connect(config);
//! session.send_message("Hello").await.unwrap();
//! while let Some(event) = session.next().await {
//!     match event {
//!         Event::Message(m) if m["type"] == "assistant" => println!("{}", m["message"]["content"]),
//!         Event::PermissionRequest(p) => session.allow(&p.request_id, p.input.clone()),
//!         Event::Closed(why) => { eprintln!("closed: {why:?}"); break; }
//!         _ => {}
//!     }
//! }
//! # }
//! ```
//!
//! The session runs on the actix runtime (`#[actix_rt::main]`), like `awc`.

pub mod policy;
mod session;

pub use policy::{Decision, FinalClose, PolicyState, ReconnectPolicy};
pub use session::{
    create_session, environments, Closed, Environment, Error, Event, PermissionRequest,
    RemoteSession, SessionConfig,
};
