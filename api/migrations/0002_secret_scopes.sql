-- Secrets get a scope: the repository pattern whose task definitions may
-- use them (NULL: global, admin only). Values are sealed by the server
-- (AES-256-GCM, key in DATA_DIR/secrets.key) before they reach this table.
ALTER TABLE secrets ADD COLUMN scope TEXT;
