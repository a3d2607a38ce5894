-- Several replicas on one database (issue 12). Times are the database's
-- own clock (now()), so replicas' clocks never have to agree.

-- One row per live `wharf server` process, by replica name (which is also
-- the name of its local node, so a task's `node` says which replica runs
-- it). `id` is the process's random id: a restarted replica of the same
-- name takes the row over only once the old process's lease expired.
CREATE TABLE replicas (
    name        TEXT COLLATE "C" PRIMARY KEY,
    id          TEXT NOT NULL,
    api_url     TEXT NOT NULL,
    ingress_url TEXT,
    started_at  TIMESTAMPTZ NOT NULL,
    expires_at  TIMESTAMPTZ NOT NULL
);

-- Leases with fencing tokens: `control` is held by the replica that runs
-- the services' reconcilers, the autoscaler and the edge nodes. `fence`
-- grows by one at every change of holder.
CREATE TABLE leases (
    name       TEXT COLLATE "C" PRIMARY KEY,
    holder     TEXT NOT NULL,
    holder_id  TEXT NOT NULL,
    fence      BIGINT NOT NULL,
    expires_at TIMESTAMPTZ NOT NULL
);

-- Values every replica shares: `replica_key` authenticates requests one
-- replica forwards to another (the client's own address rides along).
CREATE TABLE cluster (
    key   TEXT COLLATE "C" PRIMARY KEY,
    value TEXT NOT NULL
);
INSERT INTO cluster (key, value)
VALUES ('replica_key', replace(gen_random_uuid()::text || gen_random_uuid()::text, '-', ''));
