CREATE TABLE users (
    id INTEGER PRIMARY KEY AUTOINCREMENT NOT NULL,
    username TEXT NOT NULL UNIQUE,
    -- argon2 PHC string; NULL for users created by `agentgate token` (they cannot log in with a password)
    password_hash TEXT,
    created_at TEXT NOT NULL
);

CREATE TABLE projects (
    id INTEGER PRIMARY KEY AUTOINCREMENT NOT NULL,
    user_id INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    path TEXT NOT NULL,
    display_name TEXT,
    is_starred BOOLEAN NOT NULL DEFAULT 0,
    created_at TEXT NOT NULL,
    UNIQUE (user_id, path)
);

CREATE TABLE sessions (
    -- the app session id (UUID) clients use
    id TEXT PRIMARY KEY NOT NULL,
    user_id INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    provider TEXT NOT NULL,
    -- the provider-native id, captured from the provider's first announcement
    provider_session_id TEXT,
    project_path TEXT NOT NULL,
    custom_name TEXT,
    archived BOOLEAN NOT NULL DEFAULT 0,
    -- highest seq sent for this session, so seq keeps increasing across runs and restarts
    last_seq BIGINT NOT NULL DEFAULT 0,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL
);

CREATE INDEX sessions_user_id ON sessions (user_id);
