-- Join tokens for edge nodes (`wharf node token create`): only the hash of
-- the secret is stored, with the labels given to nodes that join with it
-- and when it expires. A `JoinToken` document.
CREATE TABLE join_tokens (
    id TEXT PRIMARY KEY,
    hash TEXT NOT NULL UNIQUE,
    body TEXT NOT NULL
);
