-- Seqs up to this may have been used (reserved before use): after a crash a session continues above it.
ALTER TABLE sessions ADD COLUMN seq_reserved BIGINT NOT NULL DEFAULT 0;
