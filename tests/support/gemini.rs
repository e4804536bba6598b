//! Stand-in for the Gemini API (`streamGenerateContent?alt=sse`, and `generateContent` for the
//! CLI's model-routing call) on 127.0.0.1:0, so the real Gemini CLI runs offline. Replies follow
//! the trigger words of [`super::model_stub::Script`]; `RUNCMD` asks for `run_shell_command`,
//! which the CLI offers only in `yolo` approval mode.
//!
//! ```ignore
//! let api = GeminiStub::start();
//! cmd.envs(api.gemini_env(home.path()));   // HOME must be `home`: settings go to ~/.gemini
//! ```

use std::path::Path;

use serde_json::{json, Value};

use super::model_stub::{
    pong_chunks, recall_text, Request, Responder, Script, StubServer, FAIL_MESSAGE,
};

/// The model name the tests pass (any name works; it only appears in the URL).
pub const GEMINI_MODEL: &str = "gemini-2.5-flash";

/// A running Gemini stand-in; stopped when dropped.
pub struct GeminiStub {
    pub server: StubServer,
}

impl GeminiStub {
    pub fn start() -> GeminiStub {
        GeminiStub {
            server: StubServer::start(handle),
        }
    }

    /// Env for a real `gemini` whose HOME is `home`: writes `~/.gemini/settings.json` selecting
    /// API-key auth (otherwise a custom base URL switches to "gateway" auth, which headless mode
    /// rejects with exit 41) and one attempt per request (no 30 s backoffs on errors).
    pub fn gemini_env(&self, home: &Path) -> Vec<(String, String)> {
        let dir = home.join(".gemini");
        std::fs::create_dir_all(&dir).expect("create ~/.gemini");
        let settings = json!({
            "security": {"auth": {"selectedType": "gemini-api-key"}},
            "general": {"maxAttempts": 1},
        });
        std::fs::write(dir.join("settings.json"), settings.to_string())
            .expect("write gemini settings.json");
        vec![
            ("GEMINI_API_KEY".into(), "dummy".into()),
            ("GOOGLE_GEMINI_BASE_URL".into(), self.server.base_url()),
            // Skips the CLI's self-relaunch (about 1 s per turn).
            ("GEMINI_CLI_NO_RELAUNCH".into(), "true".into()),
        ]
    }
}

fn handle(req: &Request, res: &mut Responder) {
    let streaming = req.path.contains(":streamGenerateContent");
    if req.method != "POST" || !(streaming || req.path.contains(":generateContent")) {
        res.json(404, &json!({"error": {"code": 404, "message": format!("no route {}", req.path), "status": "NOT_FOUND"}}));
        return;
    }
    let contents = req
        .json
        .get("contents")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let user_texts: Vec<String> = contents
        .iter()
        .filter(|c| c.get("role").and_then(Value::as_str) == Some("user"))
        .flat_map(|c| {
            c.get("parts")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default()
        })
        .filter_map(|p| p.get("text").and_then(Value::as_str).map(str::to_string))
        .collect();
    let prompt = user_texts.last().cloned().unwrap_or_default();
    let last_parts = contents
        .last()
        .and_then(|c| c.get("parts"))
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let function_response = last_parts
        .iter()
        .find_map(|p| p.get("functionResponse").cloned());

    let parts_chunks: Vec<Vec<Value>> = if !streaming {
        // The routing call of the "auto" model: a JSON verdict as text.
        vec![vec![
            json!({"text": json!({"complexity_reasoning": "stand-in", "complexity_score": 1}).to_string()}),
        ]]
    } else if let Some(fr) = function_response {
        let out = fr
            .get("response")
            .and_then(|r| r.get("output"))
            .and_then(Value::as_str)
            .map(str::to_string)
            .unwrap_or_else(|| fr.get("response").map(Value::to_string).unwrap_or_default());
        vec![vec![json!({"text": format!("ran: {out}")})]]
    } else {
        match Script::of(&prompt) {
            Script::Fail400 => {
                res.json(
                    400,
                    &json!({"error": {"code": 400, "message": FAIL_MESSAGE, "status": "INVALID_ARGUMENT"}}),
                );
                return;
            }
            Script::RunCommand(cmd) => vec![vec![json!({"functionCall": {
                "name": "run_shell_command",
                "args": {"command": cmd, "description": "Run the requested command"}}})]],
            Script::Recall => vec![vec![json!({"text": recall_text(&user_texts)})]],
            Script::Text(p) => pong_chunks(&p)
                .into_iter()
                .map(|t| vec![json!({"text": t})])
                .collect(),
        }
    };
    let last = parts_chunks.len().saturating_sub(1);
    let bodies: Vec<Value> = parts_chunks
        .into_iter()
        .enumerate()
        .map(|(i, parts)| {
            let mut candidate = json!({"content": {"role": "model", "parts": parts}, "index": 0});
            let mut body = json!({"modelVersion": "gemini-2.5-flash"});
            if i == last {
                candidate["finishReason"] = json!("STOP");
                body["usageMetadata"] =
                    json!({"promptTokenCount": 42, "candidatesTokenCount": 7, "totalTokenCount": 49});
            }
            body["candidates"] = json!([candidate]);
            body
        })
        .collect();
    if !streaming {
        res.json(200, &bodies[0]);
        return;
    }
    for b in &bodies {
        if !res.sse_json(b) {
            return;
        }
    }
}
