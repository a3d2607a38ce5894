-- Wharf control-plane state, version 1.
--
-- Each resource is one JSON document (`body`, the API's own shape) plus
-- the columns that queries filter and order on. Documents keep the schema
-- small while the resources are young; a column moves out of `body` when
-- a query needs it.

CREATE TABLE task_definitions (
    family        TEXT    NOT NULL,
    revision      INTEGER NOT NULL,
    status        TEXT    NOT NULL,
    registered_at TEXT    NOT NULL,
    body          TEXT    NOT NULL,
    PRIMARY KEY (family, revision)
);

CREATE TABLE tasks (
    id         TEXT PRIMARY KEY,
    family     TEXT NOT NULL,
    service    TEXT,
    status     TEXT NOT NULL,
    created_at TEXT NOT NULL,
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
    name TEXT PRIMARY KEY,
    body TEXT NOT NULL
);

CREATE TABLE service_events (
    id      INTEGER PRIMARY KEY AUTOINCREMENT,
    service TEXT NOT NULL,
    at      TEXT NOT NULL,
    message TEXT NOT NULL
);
CREATE INDEX service_events_by_service ON service_events (service, id);

CREATE TABLE secrets (
    name       TEXT PRIMARY KEY,
    value      TEXT NOT NULL,
    updated_at TEXT NOT NULL
);

CREATE TABLE tokens (
    id   TEXT PRIMARY KEY,
    hash TEXT NOT NULL UNIQUE,
    body TEXT NOT NULL
);

CREATE TABLE audit (
    id       INTEGER PRIMARY KEY AUTOINCREMENT,
    at       TEXT    NOT NULL,
    token_id TEXT    NOT NULL,
    actor    TEXT    NOT NULL,
    method   TEXT    NOT NULL,
    path     TEXT    NOT NULL,
    status   INTEGER NOT NULL
);
