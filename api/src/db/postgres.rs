//! The [`StateStore`] on PostgreSQL (`wharf server --state
//! postgres://...`): the same tables and JSON documents as the SQLite
//! store, its own migrations (`api/migrations-postgres/`), and the same
//! shared test suite.
//!
//! Several servers share one database as replicas ([`Replicas`]): each
//! holds a row with a lease by the database's clock, and the holder of
//! the `control` lease runs the reconcilers (see `crate::cluster`).

use std::collections::{BTreeSet, HashSet};
use std::time::Duration;

use async_trait::async_trait;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::{Connection, PgConnection, Row};

use super::{BatchWriter, Replica, Replicas, Result, StateStore, TaskFilter, Write, json, parse};
use crate::model::{
    AuditEntry, JoinToken, LogPage, NodeState, Secret, Service, ServiceEvent, Task, TaskDefinition,
    TaskDefinitionStatus, TaskStatus, Token,
};

/// The state in a PostgreSQL database.
#[derive(Debug)]
pub struct PgStore {
    pub(crate) pool: PgPool,
    /// How to open the group-commit writer's own connection.
    options: PgConnectOptions,
}

/// A database URL with its password hidden, for messages and logs.
pub fn redacted(url: &str) -> String {
    let mut shown = url.to_owned();
    if let Some((scheme, rest)) = url.split_once("://")
        && let Some((credentials, host)) = rest.split_once('@')
        && let Some((user, _)) = credentials.split_once(':')
    {
        shown = format!("{scheme}://{user}:***@{host}");
    }
    if let Some(at) = shown.find("password=") {
        let end = shown[at..].find('&').map_or(shown.len(), |e| at + e);
        shown.replace_range(at + "password=".len()..end, "***");
    }
    shown
}

/// How long a pooled connection counts as alive after its last use (see
/// [`PgStore::open`]).
const FRESH: Duration = Duration::from_secs(1);

impl PgStore {
    /// Connects to `url` (`postgres://USER[:PASSWORD]@HOST[:PORT]/DB`,
    /// with libpq's parameters such as `?host=/run/postgresql` or
    /// `sslmode=require`) and migrates. Several servers may share the
    /// database as replicas ([`Replicas`]).
    pub async fn open(url: &str) -> Result<Self> {
        let options: PgConnectOptions = url.parse()?;
        let options = options.application_name("wharf");
        let pool = PgPoolOptions::new()
            .max_connections(8)
            // A lease renewal must not wait behind a dead connection.
            .acquire_timeout(Duration::from_secs(2))
            // sqlx pings a connection when it goes back to the pool, and
            // by default again when it is taken out: two round trips
            // beside each query's one. A connection back for less than
            // `FRESH` was found alive a moment ago and is not pinged
            // again; one idle longer (the database may have restarted
            // meanwhile) still is, and if dead is replaced unseen. The
            // price: after a restart of the database, a connection used
            // within the last second fails the one query it is given.
            .test_before_acquire(false)
            .before_acquire(|conn, meta| {
                Box::pin(async move {
                    if meta.idle_for >= FRESH {
                        sqlx::Connection::ping(conn).await?;
                    }
                    Ok(true)
                })
            })
            .connect_with(options.clone())
            .await?;
        // sqlx takes its own advisory lock while migrating, so replicas
        // starting together migrate one at a time.
        sqlx::migrate!("./migrations-postgres")
            .run(&pool)
            .await
            .map_err(|e| sqlx::Error::Migrate(Box::new(e)))?;
        Ok(PgStore { pool, options })
    }
}

#[async_trait]
impl Replicas for PgStore {
    async fn claim(&self, me: &Replica, ttl: Duration) -> Result<bool> {
        let taken = sqlx::query(
            "INSERT INTO replicas (name, id, api_url, ingress_url, started_at, expires_at)
             VALUES ($1, $2, $3, $4, now(), now() + $5 * interval '1 millisecond')
             ON CONFLICT (name) DO UPDATE SET id = excluded.id, api_url = excluded.api_url,
                 ingress_url = excluded.ingress_url, started_at = excluded.started_at,
                 expires_at = excluded.expires_at
             WHERE replicas.expires_at < now() OR replicas.id = excluded.id
             RETURNING id",
        )
        .bind(&me.name)
        .bind(&me.id)
        .bind(&me.api_url)
        .bind(&me.ingress_url)
        .bind(millis(ttl))
        .fetch_optional(&self.pool)
        .await?;
        Ok(taken.is_some())
    }

    async fn renew(&self, me: &Replica, ttl: Duration) -> Result<bool> {
        let done = sqlx::query(
            "UPDATE replicas SET expires_at = now() + $3 * interval '1 millisecond'
             WHERE name = $1 AND id = $2",
        )
        .bind(&me.name)
        .bind(&me.id)
        .bind(millis(ttl))
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn lead(&self, me: &Replica, ttl: Duration) -> Result<Option<i64>> {
        sqlx::query_scalar(
            "INSERT INTO leases (name, holder, holder_id, fence, expires_at)
             VALUES ('control', $1, $2, 1, now() + $3 * interval '1 millisecond')
             ON CONFLICT (name) DO UPDATE SET holder = excluded.holder,
                 holder_id = excluded.holder_id,
                 fence = CASE WHEN leases.holder_id = excluded.holder_id
                              THEN leases.fence ELSE leases.fence + 1 END,
                 expires_at = excluded.expires_at
             WHERE leases.holder_id = excluded.holder_id OR leases.expires_at < now()
             RETURNING fence",
        )
        .bind(&me.name)
        .bind(&me.id)
        .bind(millis(ttl))
        .fetch_optional(&self.pool)
        .await
    }

    async fn list(&self) -> Result<Vec<Replica>> {
        let rows = sqlx::query(
            "SELECT r.name, r.id, r.api_url, r.ingress_url, r.expires_at < now(),
                    l.holder_id IS NOT NULL
             FROM replicas r
             LEFT JOIN leases l ON l.name = 'control' AND l.holder_id = r.id
                 AND l.expires_at >= now()
             ORDER BY r.name",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|r| Replica {
                name: r.get(0),
                id: r.get(1),
                api_url: r.get(2),
                ingress_url: r.get(3),
                expired: r.get(4),
                leader: r.get(5),
            })
            .collect())
    }

    async fn leave(&self, me: &Replica) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "UPDATE leases SET expires_at = now() - interval '1 second' WHERE holder_id = $1",
        )
        .bind(&me.id)
        .execute(&mut *tx)
        .await?;
        sqlx::query("DELETE FROM replicas WHERE name = $1 AND id = $2")
            .bind(&me.name)
            .bind(&me.id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await
    }

    async fn forget(&self, name: &str, id: &str, at: &str) -> Result<Option<Vec<Task>>> {
        let mut tx = self.pool.begin().await?;
        let gone = sqlx::query(
            "DELETE FROM replicas WHERE name = $1 AND id = $2 AND expires_at < now() RETURNING id",
        )
        .bind(name)
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?;
        if gone.is_none() {
            return Ok(None);
        }
        let why = format!("replica {name} stopped while the task was running (node lost)");
        // Its own node's tasks, and those it started but never placed.
        let (lost, _) = sweep_unstopped(&mut tx, at, |t| {
            let held = t.node == name || (t.node.is_empty() && t.replica.as_deref() == Some(name));
            held.then_some(Some(why.as_str()))
        })
        .await?;
        tx.commit().await?;
        Ok(Some(lost))
    }

    async fn sweep_nodes(
        &self,
        at: &str,
        nodes: &BTreeSet<String>,
        keep_started: bool,
        why: &str,
    ) -> Result<(Vec<Task>, Vec<Task>)> {
        let mut tx = self.pool.begin().await?;
        let found = sweep_unstopped(&mut tx, at, |t| {
            let unplaced_of = |t: &Task| {
                t.node.is_empty() && t.replica.as_ref().is_some_and(|r| nodes.contains(r))
            };
            if !nodes.contains(&t.node) && !unplaced_of(t) {
                None
            } else if keep_started && matches!(t.status, TaskStatus::Pending | TaskStatus::Running)
            {
                Some(None)
            } else {
                Some(Some(why))
            }
        })
        .await?;
        tx.commit().await?;
        Ok(found)
    }

    async fn notify(&self, message: &str) -> Result<()> {
        sqlx::query("SELECT pg_notify('wharf', $1)")
            .bind(message)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn listen(&self) -> Result<tokio::sync::mpsc::Receiver<Option<String>>> {
        let mut listener = sqlx::postgres::PgListener::connect_with(&self.pool).await?;
        listener.listen("wharf").await?;
        let (tx, rx) = tokio::sync::mpsc::channel(1024);
        tokio::spawn(async move {
            loop {
                let message = match listener.try_recv().await {
                    Ok(Some(n)) => Some(n.payload().to_owned()),
                    // The connection was lost and is made again at the
                    // next call: what was sent meanwhile is gone.
                    Ok(None) => None,
                    Err(e) => {
                        tracing::warn!(error = %e, "lost the replicas' notification channel");
                        tokio::time::sleep(Duration::from_millis(250)).await;
                        None
                    }
                };
                // A full queue drops the message but says so: the
                // listener reloads.
                let sent = match tx.try_send(message) {
                    Err(tokio::sync::mpsc::error::TrySendError::Full(_)) => {
                        tx.send(None).await.is_ok()
                    }
                    Err(tokio::sync::mpsc::error::TrySendError::Closed(_)) => false,
                    Ok(()) => true,
                };
                if !sent {
                    return;
                }
            }
        });
        Ok(rx)
    }

    async fn pin(&self, key: &str, value: &str) -> Result<String> {
        sqlx::query(
            "INSERT INTO cluster (key, value) VALUES ($1, $2) ON CONFLICT (key) DO NOTHING",
        )
        .bind(key)
        .bind(value)
        .execute(&self.pool)
        .await?;
        sqlx::query_scalar("SELECT value FROM cluster WHERE key = $1")
            .bind(key)
            .fetch_one(&self.pool)
            .await
    }

    async fn replica_key(&self) -> Result<String> {
        sqlx::query_scalar("SELECT value FROM cluster WHERE key = 'replica_key'")
            .fetch_one(&self.pool)
            .await
    }

    async fn defs_generation(&self) -> Result<i64> {
        let value: Option<String> =
            sqlx::query_scalar("SELECT value FROM cluster WHERE key = 'taskdefs'")
                .fetch_optional(&self.pool)
                .await?;
        Ok(value.and_then(|v| v.parse().ok()).unwrap_or(0))
    }

    async fn ack_defs(&self, me: &Replica, generation: i64) -> Result<()> {
        sqlx::query(
            "INSERT INTO cluster (key, value) VALUES ('taskdefs/' || $1, $2::bigint::text)
             ON CONFLICT (key) DO UPDATE
             SET value = GREATEST(cluster.value::bigint, excluded.value::bigint)::text",
        )
        .bind(&me.name)
        .bind(generation)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn defs_laggards(&self, me: &Replica, generation: i64) -> Result<Vec<String>> {
        sqlx::query_scalar(
            "SELECT r.name FROM replicas r
             LEFT JOIN cluster c ON c.key = 'taskdefs/' || r.name
             WHERE r.expires_at > now() AND r.name <> $1
               AND COALESCE(c.value::bigint, 0) < $2
             ORDER BY r.name",
        )
        .bind(&me.name)
        .bind(generation)
        .fetch_all(&self.pool)
        .await
    }
}

/// Counts a change of the task definitions in `tx`, and tells the other
/// replicas when it commits. The count is a row, so concurrent changes
/// take their numbers in the order they commit (the second waits for the
/// first's lock): a replica that has seen number N has seen every change
/// up to N.
async fn count_defs_change(tx: &mut PgConnection) -> Result<()> {
    sqlx::query(
        "INSERT INTO cluster (key, value) VALUES ('taskdefs', '1')
         ON CONFLICT (key) DO UPDATE SET value = (cluster.value::bigint + 1)::text",
    )
    .execute(&mut *tx)
    .await?;
    sqlx::query("SELECT pg_notify('wharf', $1)")
        .bind(crate::cluster::DEFS_CHANGED)
        .execute(&mut *tx)
        .await?;
    Ok(())
}

/// The last write of each id wins: one multi-row upsert may not touch a
/// row twice.
fn last_per_id<T>(items: Vec<(&str, T)>) -> Vec<(&str, T)> {
    let mut seen = HashSet::new();
    let mut kept: Vec<(&str, T)> = items
        .into_iter()
        .rev()
        .filter(|(id, _)| seen.insert(*id))
        .collect();
    kept.reverse();
    kept
}

/// A batch as one statement: each kind of write is a data-modifying
/// `WITH` over arrays, so the text never changes (one prepared statement)
/// and a batch costs one round trip and its commit — not a `BEGIN`, a
/// statement per kind of write and a `COMMIT`, each a round trip. A
/// single statement is one transaction: all of it or nothing. Events and
/// audit entries get their ids in the batch's order.
const WRITE_BATCH: &str = "WITH t AS (
        INSERT INTO tasks (id, family, service, status, created_at, body)
        SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[])
        ON CONFLICT (id) DO UPDATE SET status = excluded.status, body = excluded.body
    ), l AS (
        INSERT INTO task_logs (task_id, body)
        SELECT * FROM unnest($7::text[], $8::text[])
        ON CONFLICT (task_id) DO UPDATE SET body = excluded.body
    ), e AS (
        INSERT INTO service_events (service, at, message)
        SELECT s, a, m FROM unnest($9::text[], $10::text[], $11::text[])
            WITH ORDINALITY AS x(s, a, m, n) ORDER BY n
    )
    INSERT INTO audit (at, token_id, actor, method, path, status)
    SELECT a, t, c, m, p, st FROM unnest($12::text[], $13::text[], $14::text[], $15::text[], $16::text[], $17::int4[])
        WITH ORDINALITY AS x(a, t, c, m, p, st, n) ORDER BY n";

/// Applies `batch` with [`WRITE_BATCH`] (a task's or a log page's last
/// write in the batch wins, as in a transaction of one statement each).
async fn write_batch(conn: &mut PgConnection, batch: &[Write]) -> Result<()> {
    let mut tasks = Vec::new();
    let mut logs = Vec::new();
    let (mut ev_service, mut ev_at, mut ev_message) = (Vec::new(), Vec::new(), Vec::new());
    let mut audit: [Vec<&str>; 5] = Default::default();
    let mut audit_status = Vec::new();
    for write in batch {
        match write {
            Write::Task(t) => tasks.push((t.id.as_str(), &**t)),
            Write::TaskLogs(id, page) => logs.push((id.as_str(), &**page)),
            Write::Event {
                service,
                at,
                message,
            } => {
                ev_service.push(service.as_str());
                ev_at.push(at.as_str());
                ev_message.push(message.as_str());
            }
            Write::Audit(e) => {
                for (column, value) in
                    audit
                        .iter_mut()
                        .zip([&e.at, &e.token_id, &e.actor, &e.method, &e.path])
                {
                    column.push(value.as_str());
                }
                audit_status.push(i32::from(e.status));
            }
        }
    }
    if tasks.is_empty() && logs.is_empty() && ev_at.is_empty() && audit_status.is_empty() {
        return Ok(());
    }
    let tasks = last_per_id(tasks);
    let logs = last_per_id(logs);
    let column = |f: fn(&Task) -> &str| tasks.iter().map(|(_, t)| f(t)).collect::<Vec<_>>();
    let [at, token_id, actor, method, path] = audit;
    sqlx::query(WRITE_BATCH)
        .bind(column(|t| &t.id))
        .bind(column(|t| &t.family))
        .bind(
            tasks
                .iter()
                .map(|(_, t)| t.service.as_deref())
                .collect::<Vec<_>>(),
        )
        .bind(column(|t| t.status.as_str()))
        .bind(column(|t| &t.created_at))
        .bind(tasks.iter().map(|(_, t)| json(t)).collect::<Vec<_>>())
        .bind(logs.iter().map(|(id, _)| *id).collect::<Vec<_>>())
        .bind(logs.iter().map(|(_, page)| json(page)).collect::<Vec<_>>())
        .bind(ev_service)
        .bind(ev_at)
        .bind(ev_message)
        .bind(at)
        .bind(token_id)
        .bind(actor)
        .bind(method)
        .bind(path)
        .bind(audit_status)
        .execute(conn)
        .await?;
    Ok(())
}

/// The group-commit writer's side of a [`PgStore`]: a connection of its
/// own, driven from the writer's thread (no pool to acquire from, no
/// ping before each batch). A batch that fails drops it; the next batch
/// connects again.
struct PgBatches {
    options: PgConnectOptions,
    conn: Option<PgConnection>,
    runtime: tokio::runtime::Handle,
}

impl BatchWriter for PgBatches {
    fn write(&mut self, batch: &[Write]) -> std::result::Result<(), String> {
        self.runtime
            .block_on(async {
                let conn = match &mut self.conn {
                    Some(conn) => conn,
                    None => self
                        .conn
                        .insert(PgConnection::connect_with(&self.options).await?),
                };
                let done = write_batch(conn, batch).await;
                if done.is_err() {
                    self.conn = None;
                }
                done
            })
            .map_err(|e| e.to_string())
    }
}

/// Goes over the unstopped tasks (locked for the transaction): `choose`
/// skips one (`None`), keeps it (`Some(None)`) or marks it `NodeLost`
/// with a message (`Some(Some(why))`). Returns the lost and the kept.
async fn sweep_unstopped<'m>(
    tx: &mut PgConnection,
    at: &str,
    choose: impl Fn(&Task) -> Option<Option<&'m str>>,
) -> Result<(Vec<Task>, Vec<Task>)> {
    let rows = sqlx::query("SELECT body FROM tasks WHERE status != 'STOPPED' FOR UPDATE")
        .fetch_all(&mut *tx)
        .await?;
    let mut lost = Vec::new();
    let mut kept = Vec::new();
    for row in rows {
        let mut task: Task = parse(row.get::<&str, _>(0))?;
        match choose(&task) {
            None => {}
            Some(None) => kept.push(task),
            Some(Some(why)) => {
                super::mark_lost_why(&mut task, at, why);
                lost.push(task);
            }
        }
    }
    let marked: Vec<Write> = lost
        .iter()
        .cloned()
        .map(|t| Write::Task(Box::new(t)))
        .collect();
    write_batch(tx, &marked).await?;
    Ok((lost, kept))
}

fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn int(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

#[async_trait]
impl StateStore for PgStore {
    fn replicas(&self) -> Option<&dyn Replicas> {
        Some(self)
    }

    async fn write(&self, batch: &[Write]) -> Result<()> {
        write_batch(&mut *self.pool.acquire().await?, batch).await
    }

    fn batch_writer(&self) -> Option<Box<dyn BatchWriter>> {
        Some(Box::new(PgBatches {
            options: self.options.clone(),
            conn: None,
            runtime: tokio::runtime::Handle::current(),
        }))
    }

    async fn recover_lost_tasks(
        &self,
        at: &str,
        remote: &BTreeSet<String>,
    ) -> Result<(Vec<Task>, Vec<Task>)> {
        let mut tx = self.pool.begin().await?;
        let found = sweep_unstopped(&mut tx, at, |task| {
            if remote.contains(&task.node)
                && matches!(task.status, TaskStatus::Pending | TaskStatus::Running)
            {
                Some(None)
            } else {
                Some(Some(
                    "the server stopped while the task was running (node lost)",
                ))
            }
        })
        .await?;
        tx.commit().await?;
        Ok(found)
    }

    async fn register_task_definition(&self, mut def: TaskDefinition) -> Result<TaskDefinition> {
        // Registrations are rare: one at a time numbers the revisions.
        let mut tx = self.pool.begin().await?;
        sqlx::query("LOCK TABLE task_definitions IN SHARE ROW EXCLUSIVE MODE")
            .execute(&mut *tx)
            .await?;
        let last: i64 = sqlx::query_scalar(
            "SELECT COALESCE(MAX(revision), 0) FROM task_definitions WHERE family = $1",
        )
        .bind(&def.family)
        .fetch_one(&mut *tx)
        .await?;
        def.revision = u32::try_from(last + 1)
            .map_err(|_| sqlx::Error::Protocol("task definition revisions exhausted".into()))?;
        def.task_definition = format!("{}:{}", def.family, def.revision);
        def.status = TaskDefinitionStatus::Active;
        sqlx::query(
            "INSERT INTO task_definitions (family, revision, status, registered_at, body)
             VALUES ($1, $2, 'ACTIVE', $3, $4)",
        )
        .bind(&def.family)
        .bind(i64::from(def.revision))
        .bind(&def.registered_at)
        .bind(json(&def))
        .execute(&mut *tx)
        .await?;
        count_defs_change(&mut tx).await?;
        tx.commit().await?;
        Ok(def)
    }

    async fn task_definitions(&self, family: Option<&str>) -> Result<Vec<TaskDefinition>> {
        let rows = sqlx::query(
            "SELECT body FROM task_definitions WHERE ($1::text IS NULL OR family = $1) ORDER BY family, revision DESC",
        )
        .bind(family)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(|r| parse(r.get::<&str, _>(0))).collect()
    }

    async fn task_definition(
        &self,
        family: &str,
        revision: Option<u32>,
    ) -> Result<Option<TaskDefinition>> {
        let row = match revision {
            Some(rev) => {
                sqlx::query("SELECT body FROM task_definitions WHERE family = $1 AND revision = $2")
                    .bind(family)
                    .bind(i64::from(rev))
                    .fetch_optional(&self.pool)
                    .await?
            }
            None => {
                sqlx::query(
                    "SELECT body FROM task_definitions WHERE family = $1 AND status = 'ACTIVE' ORDER BY revision DESC LIMIT 1",
                )
                .bind(family)
                .fetch_optional(&self.pool)
                .await?
            }
        };
        row.map(|r| parse(r.get::<&str, _>(0))).transpose()
    }

    async fn update_task_definition(&self, def: &TaskDefinition) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "UPDATE task_definitions SET status = $1, body = $2 WHERE family = $3 AND revision = $4",
        )
        .bind(super::definition_status(def.status))
        .bind(json(def))
        .bind(&def.family)
        .bind(i64::from(def.revision))
        .execute(&mut *tx)
        .await?;
        count_defs_change(&mut tx).await?;
        tx.commit().await
    }

    async fn import_task_definition(&self, def: &TaskDefinition) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO task_definitions (family, revision, status, registered_at, body)
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(&def.family)
        .bind(i64::from(def.revision))
        .bind(super::definition_status(def.status))
        .bind(&def.registered_at)
        .bind(json(def))
        .execute(&mut *tx)
        .await?;
        count_defs_change(&mut tx).await?;
        tx.commit().await
    }

    async fn task(&self, id: &str) -> Result<Option<Task>> {
        let row = sqlx::query("SELECT body FROM tasks WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| parse(r.get::<&str, _>(0))).transpose()
    }

    async fn tasks(&self, filter: &TaskFilter) -> Result<Vec<Task>> {
        let rows = sqlx::query(
            "SELECT body FROM tasks
             WHERE ($1::text IS NULL OR family = $1) AND ($2::text IS NULL OR service = $2)
               AND ($3::text IS NULL OR status = $3)
             ORDER BY created_at DESC, id LIMIT $4",
        )
        .bind(&filter.family)
        .bind(&filter.service)
        .bind(filter.status.map(TaskStatus::as_str))
        .bind(i64::from(filter.limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(|r| parse(r.get::<&str, _>(0))).collect()
    }

    async fn task_logs(&self, id: &str) -> Result<Option<LogPage>> {
        let row = sqlx::query("SELECT body FROM task_logs WHERE task_id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| parse(r.get::<&str, _>(0))).transpose()
    }

    async fn prune_logs(&self, keep_bytes: u64) -> Result<u64> {
        // Newest first, a running total of each stopped task's stored
        // output; whatever lies past the budget goes.
        let done = sqlx::query(
            "DELETE FROM task_logs WHERE task_id IN (
                 SELECT task_id FROM (
                     SELECT l.task_id,
                            SUM(octet_length(l.body))
                                OVER (ORDER BY t.created_at DESC, t.id DESC) AS upto
                     FROM task_logs l JOIN tasks t ON t.id = l.task_id
                     WHERE t.status = 'STOPPED') AS running
                 WHERE upto > $1)",
        )
        .bind(int(keep_bytes))
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(done)
    }

    async fn prune_tasks(&self, keep: u64) -> Result<u64> {
        let mut tx = self.pool.begin().await?;
        let done = sqlx::query(
            "DELETE FROM tasks WHERE id IN (
                 SELECT id FROM tasks WHERE status = 'STOPPED' ORDER BY created_at DESC OFFSET $1)",
        )
        .bind(int(keep))
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if done > 0 {
            sqlx::query(
                "DELETE FROM task_logs l WHERE NOT EXISTS (SELECT 1 FROM tasks t WHERE t.id = l.task_id)",
            )
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(done)
    }

    async fn put_service(&self, service: &Service) -> Result<()> {
        sqlx::query(
            "INSERT INTO services (name, body) VALUES ($1, $2)
             ON CONFLICT (name) DO UPDATE SET body = excluded.body",
        )
        .bind(&service.name)
        .bind(json(service))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn delete_service(&self, name: &str) -> Result<()> {
        sqlx::query("DELETE FROM services WHERE name = $1")
            .bind(name)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn services(&self) -> Result<Vec<Service>> {
        let rows = sqlx::query("SELECT body FROM services ORDER BY name")
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(|r| parse(r.get::<&str, _>(0))).collect()
    }

    async fn put_node(&self, node: &NodeState) -> Result<()> {
        sqlx::query(
            "INSERT INTO nodes (name, body) VALUES ($1, $2)
             ON CONFLICT (name) DO UPDATE SET body = excluded.body",
        )
        .bind(&node.name)
        .bind(json(node))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn nodes(&self) -> Result<Vec<NodeState>> {
        let rows = sqlx::query("SELECT body FROM nodes ORDER BY name")
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(|r| parse(r.get::<&str, _>(0))).collect()
    }

    async fn delete_node(&self, name: &str) -> Result<()> {
        sqlx::query("DELETE FROM nodes WHERE name = $1")
            .bind(name)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn put_join_token(&self, token: &JoinToken, hash: &str) -> Result<()> {
        sqlx::query("INSERT INTO join_tokens (id, hash, body) VALUES ($1, $2, $3)")
            .bind(&token.id)
            .bind(hash)
            .bind(json(token))
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn join_token(&self, hash: &str) -> Result<Option<JoinToken>> {
        let row = sqlx::query("SELECT body FROM join_tokens WHERE hash = $1")
            .bind(hash)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| parse(r.get::<&str, _>(0))).transpose()
    }

    async fn join_tokens(&self) -> Result<Vec<JoinToken>> {
        let rows = sqlx::query("SELECT body FROM join_tokens ORDER BY id")
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(|r| parse(r.get::<&str, _>(0))).collect()
    }

    async fn join_tokens_with_hashes(&self) -> Result<Vec<(JoinToken, String)>> {
        let rows = sqlx::query("SELECT body, hash FROM join_tokens ORDER BY id")
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| Ok((parse(r.get::<&str, _>(0))?, r.get::<String, _>(1))))
            .collect()
    }

    async fn all_events(&self) -> Result<Vec<ServiceEvent>> {
        let rows = sqlx::query("SELECT id, service, at, message FROM service_events ORDER BY id")
            .fetch_all(&self.pool)
            .await?;
        Ok(rows
            .iter()
            .map(|r| ServiceEvent {
                id: r.get(0),
                service: r.get(1),
                at: r.get(2),
                message: r.get(3),
            })
            .collect())
    }

    async fn delete_join_token(&self, id: &str) -> Result<bool> {
        let done = sqlx::query("DELETE FROM join_tokens WHERE id = $1")
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() > 0)
    }

    async fn events(&self, service: &str, limit: u32) -> Result<Vec<ServiceEvent>> {
        let rows = sqlx::query(
            "SELECT id, service, at, message FROM service_events WHERE service = $1 ORDER BY id DESC LIMIT $2",
        )
        .bind(service)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .iter()
            .map(|r| ServiceEvent {
                id: r.get(0),
                service: r.get(1),
                at: r.get(2),
                message: r.get(3),
            })
            .collect())
    }

    async fn put_secret(
        &self,
        name: &str,
        value: &str,
        scope: Option<&str>,
        at: &str,
    ) -> Result<()> {
        sqlx::query(
            "INSERT INTO secrets (name, value, scope, updated_at) VALUES ($1, $2, $3, $4)
             ON CONFLICT (name) DO UPDATE
             SET value = excluded.value, scope = excluded.scope, updated_at = excluded.updated_at",
        )
        .bind(name)
        .bind(value)
        .bind(scope)
        .bind(at)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn delete_secret(&self, name: &str) -> Result<bool> {
        let done = sqlx::query("DELETE FROM secrets WHERE name = $1")
            .bind(name)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() > 0)
    }

    async fn secrets(&self) -> Result<Vec<Secret>> {
        let rows = sqlx::query("SELECT name, updated_at, scope FROM secrets ORDER BY name")
            .fetch_all(&self.pool)
            .await?;
        Ok(rows
            .iter()
            .map(|r| Secret {
                name: r.get(0),
                updated_at: r.get(1),
                scope: r.get(2),
            })
            .collect())
    }

    async fn secret(&self, name: &str) -> Result<Option<(String, Option<String>)>> {
        let row = sqlx::query("SELECT value, scope FROM secrets WHERE name = $1")
            .bind(name)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(|r| (r.get(0), r.get(1))))
    }

    async fn put_token(&self, token: &Token, hash: &str) -> Result<()> {
        sqlx::query(
            "INSERT INTO tokens (id, hash, body) VALUES ($1, $2, $3)
             ON CONFLICT (id) DO UPDATE SET hash = excluded.hash, body = excluded.body",
        )
        .bind(&token.id)
        .bind(hash)
        .bind(json(token))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn tokens(&self) -> Result<Vec<(Token, String)>> {
        let rows = sqlx::query("SELECT body, hash FROM tokens ORDER BY id")
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| Ok((parse(r.get::<&str, _>(0))?, r.get::<String, _>(1))))
            .collect()
    }

    async fn audit(&self, limit: u32) -> Result<Vec<AuditEntry>> {
        let rows = sqlx::query(
            "SELECT id, at, token_id, actor, method, path, status FROM audit ORDER BY id DESC LIMIT $1",
        )
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .iter()
            .map(|r| AuditEntry {
                id: r.get(0),
                at: r.get(1),
                token_id: r.get(2),
                actor: r.get(3),
                method: r.get(4),
                path: r.get(5),
                status: u16::try_from(r.get::<i32, _>(6)).unwrap_or(0),
            })
            .collect())
    }

    async fn prune_audit(&self, keep: u64) -> Result<u64> {
        let done = sqlx::query(
            "DELETE FROM audit WHERE id <= (SELECT id FROM audit ORDER BY id DESC LIMIT 1 OFFSET $1)",
        )
        .bind(int(keep))
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(done)
    }

    async fn checkpoint(&self) -> Result<()> {
        // Rewrites the (small) secrets table into a new file, so an old
        // value's dead row version is not left in the table's pages. The
        // server's WAL keeps it until PostgreSQL recycles the segment (and
        // a WAL archive or a replica keeps it): the README says so.
        sqlx::query("VACUUM FULL secrets")
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn close(&self) {
        self.pool.close().await;
    }
}
