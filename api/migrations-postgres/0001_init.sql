-- Wharf control-plane state on PostgreSQL, version 1: the same tables as
-- the SQLite schema after its migrations 0001–0004 (see
-- api/migrations/), in PostgreSQL's types. Each resource is one JSON
-- document (`body`, the API's own shape, as text so both stores hold the
-- same bytes) plus the columns that queries filter and order on. Text
-- that is ordered on compares bytewise (COLLATE "C"), as SQLite does,
-- whatever the database's locale.

CREATE TABLE task_definitions (
    family        TEXT    COLLATE "C" NOT NULL,
    revision      BIGINT  NOT NULL,
    status        TEXT    NOT NULL,
    registered_at TEXT    NOT NULL,
    body          TEXT    NOT NULL,
    PRIMARY KEY (family, revision)
);

CREATE TABLE tasks (
    id         TEXT COLLATE "C" PRIMARY KEY,
    family     TEXT COLLATE "C" NOT NULL,
    service    TEXT COLLATE "C",
    status     TEXT NOT NULL,
    created_at TEXT COLLATE "C" NOT NULL,
    body       TEXT NOT NULL
);
CREATE INDEX tasks_by_status ON tasks (status, created_at);
CREATE INDEX tasks_by_created ON tasks (created_at);
CREATE INDEX tasks_by_service ON tasks (service, created_at);

-- The retained output of stopped tasks (a LogPage document).
CREATE TABLE task_logs (
    task_id TEXT PRIMARY KEY,
    body    TEXT NOT NULL
);

CREATE TABLE services (
    name TEXT COLLATE "C" PRIMARY KEY,
    body TEXT NOT NULL
);

CREATE TABLE service_events (
    id      BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    service TEXT COLLATE "C" NOT NULL,
    at      TEXT NOT NULL,
    message TEXT NOT NULL
);
CREATE INDEX service_events_by_service ON service_events (service, id);

-- Values are sealed by the server (AES-256-GCM, key in
-- DATA_DIR/secrets.key) before they reach this table; scope NULL: global.
CREATE TABLE secrets (
    name       TEXT COLLATE "C" PRIMARY KEY,
    value      TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    scope      TEXT
);

CREATE TABLE tokens (
    id   TEXT COLLATE "C" PRIMARY KEY,
    hash TEXT NOT NULL UNIQUE,
    body TEXT NOT NULL
);

CREATE TABLE audit (
    id       BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at       TEXT    NOT NULL,
    token_id TEXT    NOT NULL,
    actor    TEXT    NOT NULL,
    method   TEXT    NOT NULL,
    path     TEXT    NOT NULL,
    status   INTEGER NOT NULL
);

-- What an operator set on a node (a `NodeState` document).
CREATE TABLE nodes (
    name TEXT COLLATE "C" PRIMARY KEY,
    body TEXT NOT NULL
);

-- Join tokens for edge nodes: the hash of the secret only (a `JoinToken`
-- document).
CREATE TABLE join_tokens (
    id   TEXT COLLATE "C" PRIMARY KEY,
    hash TEXT NOT NULL UNIQUE,
    body TEXT NOT NULL
);
