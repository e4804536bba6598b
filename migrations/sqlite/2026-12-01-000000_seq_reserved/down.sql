ALTER TABLE sessions DROP COLUMN seq_reserved;
