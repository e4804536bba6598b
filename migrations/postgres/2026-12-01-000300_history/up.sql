-- The conversation of each session as agentgate recorded it (GET /api/providers/sessions/{id}/messages):
-- the user's prompts and the normalized events of each run, provider-independent.
CREATE TABLE messages (
    id SERIAL PRIMARY KEY,
    session_id TEXT NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
    -- text, tool_use, tool_result, thinking, error, interactive_prompt, task_notification
    kind TEXT NOT NULL,
    -- user or assistant for text
    role TEXT,
    -- tool_use / tool_result pairing
    tool_id TEXT,
    -- the message as the web UI reads it (PROTOCOL.md section 4 event shapes), JSON
    body TEXT NOT NULL,
    created_at TEXT NOT NULL
);

CREATE INDEX messages_session ON messages (session_id, id);
