-- Nodes as resources: what an operator set on a node (its status, e.g.
-- DRAINING) survives a restart. The live figures (capacity, free slots,
-- running tasks) are computed, never stored. A `NodeState` document.
CREATE TABLE nodes (
    name TEXT PRIMARY KEY,
    body TEXT NOT NULL
);
