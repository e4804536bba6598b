//! `RemoteSession`: one followed session over
//! `/v1/sessions/ws/{id}/subscribe`, reconnecting by [`ReconnectPolicy`].

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use awc::ws::{CloseCode, CloseReason, Frame, Message};
use futures_util::{SinkExt, Stream, StreamExt};
use serde_json::{json, Value};
use tokio::sync::mpsc;

use crate::policy::{Decision, FinalClose, PolicyState, ReconnectPolicy};

/// Events waiting for the application; the socket is read no faster.
const EVENTS_QUEUE: usize = 256;
/// Answers and interrupts waiting to be written; more are refused.
const COMMANDS_QUEUE: usize = 64;
/// A REST call gives up after this.
const HTTP_TIMEOUT: Duration = Duration::from_secs(30);

/// Where and how to follow a session.
#[derive(Clone)]
pub struct SessionConfig {
    /// `http://host:port` (or `https://`) of the gateway.
    pub base_url: String,
    /// The session id (`session_<app id>`, or the app id).
    pub session_id: String,
    /// Called for every connection attempt (the seed asks for a fresh token each time).
    pub token: Arc<dyn Fn() -> String + Send + Sync>,
    pub policy: ReconnectPolicy,
}

impl SessionConfig {
    pub fn new(
        base_url: impl Into<String>,
        session_id: impl Into<String>,
        token: impl Fn() -> String + Send + Sync + 'static,
    ) -> Self {
        SessionConfig {
            base_url: base_url.into().trim_end_matches('/').to_string(),
            session_id: session_id.into(),
            token: Arc::new(token),
            policy: ReconnectPolicy::default(),
        }
    }

    fn ws_url(&self) -> String {
        let base = self
            .base_url
            .replacen("https://", "wss://", 1)
            .replacen("http://", "ws://", 1);
        format!("{base}/v1/sessions/ws/{}/subscribe", self.session_id)
    }
}

/// A `can_use_tool` request of the followed run.
#[derive(Debug, Clone, PartialEq)]
pub struct PermissionRequest {
    pub request_id: String,
    pub tool_name: String,
    pub input: Value,
    pub tool_use_id: Option<String>,
    pub description: Option<String>,
}

/// How a session ended for good.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Closed {
    /// `None`: closed by this side ([`RemoteSession::close`]).
    pub reason: Option<FinalClose>,
    /// The last close code the server sent, if any.
    pub close_code: Option<u16>,
    /// The HTTP status of a refused upgrade (404 unknown session, 401 bad token).
    pub http_status: Option<u16>,
}

/// What a followed session yields.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A connection opened (the first one, or a reconnect).
    Connected,
    /// A stream-json message (`system`, `assistant`, `user`, `result`,
    /// `stream_event`, `keep_alive`, `control_response`, ...).
    Message(Value),
    /// The run asks whether a tool may run: answer with
    /// [`RemoteSession::allow`] or [`RemoteSession::deny`].
    PermissionRequest(PermissionRequest),
    /// A request was withdrawn (answered elsewhere, timed out, run ended).
    PermissionCancelled { request_id: String },
    /// The connection closed and a reconnect is scheduled (not final).
    Reconnecting {
        close_code: Option<u16>,
        after: Duration,
    },
    /// The last event: no more reconnects.
    Closed(Closed),
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("HTTP {status}: {message}")]
    Http { status: u16, message: String },
    #[error("request failed: {0}")]
    Transport(String),
}

enum Command {
    Send(Value),
    Close,
}

/// A followed session: a [`Stream`] of [`Event`]s, plus answers,
/// interrupts and user turns. Dropping it closes the connection.
pub struct RemoteSession {
    config: SessionConfig,
    events: mpsc::Receiver<Event>,
    commands: mpsc::Sender<Command>,
}

impl RemoteSession {
    /// Starts following (on the current actix runtime); the first event is
    /// `Connected`, or `Closed` when the upgrade is refused.
    pub fn connect(config: SessionConfig) -> RemoteSession {
        let (events_tx, events) = mpsc::channel(EVENTS_QUEUE);
        let (commands, commands_rx) = mpsc::channel(COMMANDS_QUEUE);
        actix_rt::spawn(drive(config.clone(), events_tx, commands_rx));
        RemoteSession {
            config,
            events,
            commands,
        }
    }

    fn command(&self, command: Command) {
        if self.commands.try_send(command).is_err() {
            tracing::warn!("remote session: command queue full or closed; dropped");
        }
    }

    /// Lets the tool run with `input` (the request's input, or an edited one).
    pub fn allow(&self, request_id: &str, input: Value) {
        self.command(Command::Send(json!({
            "type": "control_response",
            "response": {"subtype": "success", "request_id": request_id,
                         "response": {"behavior": "allow", "updatedInput": input}},
        })));
    }

    /// Refuses the tool.
    pub fn deny(&self, request_id: &str, message: &str) {
        self.command(Command::Send(json!({
            "type": "control_response",
            "response": {"subtype": "success", "request_id": request_id,
                         "response": {"behavior": "deny", "message": message}},
        })));
    }

    /// Interrupts the running turn.
    pub fn interrupt(&self) {
        self.command(Command::Send(json!({
            "type": "control_request",
            "request_id": uuid::Uuid::new_v4().to_string(),
            "request": {"subtype": "interrupt"},
        })));
    }

    /// Closes the connection; the stream ends with `Closed { reason: None }`.
    pub fn close(&self) {
        self.command(Command::Close);
    }

    /// Sends a user turn (`POST /v1/sessions/{id}/events`). A run already
    /// in progress is refused with HTTP 409 (`RUN_IN_PROGRESS`).
    pub async fn send_message(&self, text: &str) -> Result<Value, Error> {
        let body = json!({"events": [{
            "uuid": uuid::Uuid::new_v4().to_string(),
            "session_id": self.config.session_id,
            "type": "user",
            "parent_tool_use_id": null,
            "message": {"role": "user", "content": text},
        }]});
        let url = format!(
            "{}/v1/sessions/{}/events",
            self.config.base_url, self.config.session_id
        );
        post(&url, &(self.config.token)(), &body).await
    }
}

impl Stream for RemoteSession {
    type Item = Event;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Event>> {
        self.events.poll_recv(cx)
    }
}

fn http_client() -> awc::Client {
    awc::Client::builder().timeout(HTTP_TIMEOUT).finish()
}

async fn post(url: &str, token: &str, body: &Value) -> Result<Value, Error> {
    let mut res = http_client()
        .post(url)
        .bearer_auth(token)
        .insert_header(("anthropic-version", "2023-06-01"))
        .send_json(body)
        .await
        .map_err(|e| Error::Transport(e.to_string()))?;
    answer(&mut res).await
}

async fn answer<S>(res: &mut awc::ClientResponse<S>) -> Result<Value, Error>
where
    S: futures_util::Stream<Item = Result<bytes::Bytes, awc::error::PayloadError>> + Unpin,
{
    let status = res.status().as_u16();
    let body = res
        .body()
        .limit(16 * 1024 * 1024)
        .await
        .map_err(|e| Error::Transport(e.to_string()))?;
    let value: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    if (200..300).contains(&status) {
        return Ok(value);
    }
    let message = value
        .pointer("/error/message")
        .and_then(Value::as_str)
        .map(str::to_string)
        .unwrap_or_else(|| String::from_utf8_lossy(&body).into_owned());
    Err(Error::Http { status, message })
}

/// A project of the user, where a session's agent runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Environment {
    pub id: String,
    pub name: String,
    pub path: Option<String>,
}

/// `GET /v1/environment_providers`.
pub async fn environments(base_url: &str, token: &str) -> Result<Vec<Environment>, Error> {
    let mut res = http_client()
        .get(format!(
            "{}/v1/environment_providers",
            base_url.trim_end_matches('/')
        ))
        .bearer_auth(token)
        .send()
        .await
        .map_err(|e| Error::Transport(e.to_string()))?;
    let value = answer(&mut res).await?;
    Ok(value["environments"]
        .as_array()
        .map(|list| {
            list.iter()
                .map(|e| Environment {
                    id: e["environment_id"].as_str().unwrap_or_default().to_string(),
                    name: e["name"].as_str().unwrap_or_default().to_string(),
                    path: e["path"].as_str().map(str::to_string),
                })
                .collect()
        })
        .unwrap_or_default())
}

/// `POST /v1/sessions`: a session in the environment, its first turn
/// started from `prompt`. Returns the session id.
pub async fn create_session(
    base_url: &str,
    token: &str,
    environment_id: &str,
    prompt: &str,
) -> Result<String, Error> {
    let body = json!({
        "title": prompt.chars().take(80).collect::<String>(),
        "events": [{"type": "event", "data": {
            "uuid": uuid::Uuid::new_v4().to_string(),
            "session_id": "",
            "type": "user",
            "parent_tool_use_id": null,
            "message": {"role": "user", "content": prompt},
        }}],
        "session_context": {"sources": [], "outcomes": []},
        "environment_id": environment_id,
    });
    let value = post(
        &format!("{}/v1/sessions", base_url.trim_end_matches('/')),
        token,
        &body,
    )
    .await?;
    value["id"]
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| Error::Transport(format!("no session id in {value}")))
}

fn event_of(text: &[u8]) -> Option<Event> {
    let value: Value = serde_json::from_slice(text).ok()?;
    let str_of = |v: &Value| v.as_str().map(str::to_string);
    Some(match value["type"].as_str()? {
        "control_request" if value["request"]["subtype"] == "can_use_tool" => {
            let request = &value["request"];
            Event::PermissionRequest(PermissionRequest {
                request_id: str_of(&value["request_id"])?,
                tool_name: str_of(&request["tool_name"]).unwrap_or_default(),
                input: request["input"].clone(),
                tool_use_id: str_of(&request["tool_use_id"]),
                description: str_of(&request["description"]),
            })
        }
        "control_cancel_request" => Event::PermissionCancelled {
            request_id: str_of(&value["request_id"])?,
        },
        _ => Event::Message(value),
    })
}

/// How one connection ended.
enum Ended {
    /// The server closed it (its code, `None` without a close frame).
    Server(Option<u16>),
    /// [`RemoteSession::close`], or the session was dropped.
    Client,
}

async fn drive(
    config: SessionConfig,
    events: mpsc::Sender<Event>,
    mut commands: mpsc::Receiver<Command>,
) {
    let mut state = PolicyState::new(config.policy.clone());
    let url = config.ws_url();
    loop {
        let token = (config.token)();
        let connecting = awc::Client::builder()
            .timeout(HTTP_TIMEOUT)
            .finish()
            .ws(url.as_str())
            .bearer_auth(&token)
            .header("anthropic-version", "2023-06-01")
            .max_frame_size(64 * 1024 * 1024)
            .connect()
            .await;
        let (code, opened, http_status) = match connecting {
            Err(err) => {
                let status = match &err {
                    awc::error::WsClientError::InvalidResponseStatus(s) => Some(s.as_u16()),
                    _ => None,
                };
                tracing::debug!(%err, "remote session: connect failed");
                (None, false, status)
            }
            Ok((_, framed)) => {
                state.on_open();
                if events.send(Event::Connected).await.is_err() {
                    return;
                }
                match run(framed, &events, &mut commands, state.policy().ping_interval).await {
                    Ended::Client => {
                        let _ = events
                            .send(Event::Closed(Closed {
                                reason: None,
                                close_code: None,
                                http_status: None,
                            }))
                            .await;
                        return;
                    }
                    Ended::Server(code) => (code, true, None),
                }
            }
        };
        match state.on_close(code, opened) {
            Decision::Reconnect { after } => {
                let event = Event::Reconnecting {
                    close_code: code,
                    after,
                };
                if events.send(event).await.is_err() {
                    return;
                }
                let wait = tokio::time::sleep(after);
                tokio::pin!(wait);
                // While disconnected nothing can be sent (as in the seed); a close ends it.
                loop {
                    tokio::select! {
                        _ = &mut wait => break,
                        cmd = commands.recv() => match cmd {
                            Some(Command::Send(_)) => tracing::warn!("remote session: not connected; message dropped"),
                            Some(Command::Close) | None => {
                                let _ = events.send(Event::Closed(Closed { reason: None, close_code: code, http_status: None })).await;
                                return;
                            }
                        },
                    }
                }
            }
            Decision::Stop(reason) => {
                let _ = events
                    .send(Event::Closed(Closed {
                        reason: Some(reason),
                        close_code: code,
                        http_status,
                    }))
                    .await;
                return;
            }
        }
    }
}

async fn run(
    mut framed: actix_codec::Framed<awc::BoxedSocket, awc::ws::Codec>,
    events: &mpsc::Sender<Event>,
    commands: &mut mpsc::Receiver<Command>,
    ping_interval: Duration,
) -> Ended {
    let start = tokio::time::Instant::now() + ping_interval;
    let mut ping = tokio::time::interval_at(start, ping_interval);
    loop {
        tokio::select! {
            frame = framed.next() => match frame {
                Some(Ok(Frame::Text(text))) => {
                    if let Some(event) = event_of(&text) {
                        if events.send(event).await.is_err() {
                            let _ = framed.send(Message::Close(Some(CloseCode::Normal.into()))).await;
                            return Ended::Client;
                        }
                    }
                }
                Some(Ok(Frame::Ping(payload))) => {
                    let _ = framed.send(Message::Pong(payload)).await;
                }
                Some(Ok(Frame::Close(reason))) => {
                    let code = reason.as_ref().map(|r: &CloseReason| u16::from(r.code));
                    let _ = framed.send(Message::Close(reason)).await;
                    return Ended::Server(code);
                }
                Some(Ok(_)) => {}
                Some(Err(_)) | None => return Ended::Server(None),
            },
            _ = ping.tick() => {
                // The seed pings and never checks the pong; a dead peer shows as a failed write.
                if framed.send(Message::Ping(Default::default())).await.is_err() {
                    return Ended::Server(None);
                }
            }
            cmd = commands.recv() => match cmd {
                Some(Command::Send(value)) => {
                    if framed.send(Message::Text(value.to_string().into())).await.is_err() {
                        return Ended::Server(None);
                    }
                }
                Some(Command::Close) | None => {
                    let _ = framed.send(Message::Close(Some(CloseCode::Normal.into()))).await;
                    return Ended::Client;
                }
            },
        }
    }
}
