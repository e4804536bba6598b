-- Tokens carry the version current when they were issued (claim `ver`); a
-- revocation (`agentgate token --revoke`, a password change) increments it,
-- so every earlier token of the user is refused.
ALTER TABLE users ADD COLUMN token_version INTEGER NOT NULL DEFAULT 0;
