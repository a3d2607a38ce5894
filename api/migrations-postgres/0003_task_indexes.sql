-- The unstopped tasks (a restart's or a failover's sweep, `FOR UPDATE`)
-- are read through a partial index that holds only the live tasks, in
-- place of `tasks_by_status` over every kept task, which each status
-- change rewrote (issue 13); a list of the tasks in one live status uses it
-- too (PostgreSQL proves `status = 'RUNNING'` implies the predicate).
-- `tasks_by_service` stays here: PostgreSQL's custom plans see a list's
-- parameter values and use it for a service's tasks (EXPLAIN EXECUTE).
DROP INDEX tasks_by_status;
CREATE INDEX tasks_live ON tasks (created_at) WHERE status <> 'STOPPED';
