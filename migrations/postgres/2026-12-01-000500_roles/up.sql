-- Admins may use the admin API and page (/api/admin/*, /admin). The first
-- user is one; `agentgate token --user NAME --admin` makes others.
ALTER TABLE users ADD COLUMN is_admin BOOLEAN NOT NULL DEFAULT FALSE;
UPDATE users SET is_admin = TRUE WHERE id = (SELECT MIN(id) FROM users);
