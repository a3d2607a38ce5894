-- Fewer indexes on `tasks`: every index is pages each task's commits
-- rewrite (issue 13). `tasks_by_status` and `tasks_by_service` served no
-- query: the list query's optional filters (`?1 IS NULL OR …`) read
-- `tasks_by_created`, and the prunes do too (EXPLAIN QUERY PLAN). The
-- one read by status that matters — the unstopped tasks at a restart, a
-- scan of the whole table until now — gets a partial index that holds
-- only the live tasks: a task enters it when it is recorded and leaves
-- it when it stops, so it stays a page or two however many tasks are kept.
DROP INDEX tasks_by_status;
DROP INDEX tasks_by_service;
CREATE INDEX tasks_live ON tasks (created_at) WHERE status != 'STOPPED';
