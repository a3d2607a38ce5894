//! The [`StateStore`] on PostgreSQL (`wharf server --state
//! postgres://...`): the same tables and JSON documents as the SQLite
//! store, its own migrations (`api/migrations-postgres/`), and the same
//! shared test suite.
//!
//! Until several replicas share one database, a server holds a session
//! advisory lock on it for its whole life, and a second server pointed
//! at the same database refuses to start instead of taking the first
//! one's tasks for lost.

use std::collections::{BTreeSet, HashSet};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::{Connection, PgConnection, Postgres, QueryBuilder, Row};
use tokio::sync::Mutex;

use super::{Result, StateStore, TaskFilter, Write, json, parse};
use crate::model::{
    AuditEntry, JoinToken, LogPage, NodeState, Secret, Service, ServiceEvent, Task, TaskDefinition,
    TaskDefinitionStatus, TaskStatus, Token,
};

/// The advisory lock a server holds on its database ("WHARF" in ASCII).
const SERVER_LOCK: i64 = 0x0057_4841_5246;

/// How long a starting server waits for the lock: a server killed just
/// before lets go of it within milliseconds.
const LEASE_WAIT: Duration = Duration::from_secs(5);

/// Rows per multi-row statement: 6 columns × 256 rows stays far below
/// PostgreSQL's 65,535 bound parameters.
const ROWS_PER_STATEMENT: usize = 256;

/// The state in a PostgreSQL database.
#[derive(Debug)]
pub struct PgStore {
    pool: PgPool,
    /// The connection that holds [`SERVER_LOCK`] (closed by `close`).
    lease: Mutex<Option<PgConnection>>,
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

impl PgStore {
    /// Connects to `url` (`postgres://USER[:PASSWORD]@HOST[:PORT]/DB`,
    /// with libpq's parameters such as `?host=/run/postgresql` or
    /// `sslmode=require`), takes the server lock and migrates.
    pub async fn open(url: &str) -> Result<Self> {
        Self::open_waiting(url, LEASE_WAIT).await
    }

    /// [`open`](Self::open), waiting at most `wait` for another server's
    /// lock to go.
    pub async fn open_waiting(url: &str, wait: Duration) -> Result<Self> {
        let options: PgConnectOptions = url.parse()?;
        let options = options.application_name("wharf");
        let mut lease = PgConnection::connect_with(&options).await?;
        // A server whose machine vanished holds its lock until PostgreSQL
        // notices the connection is dead: tens of seconds, not TCP's
        // default two hours.
        sqlx::raw_sql(
            "SET tcp_keepalives_idle = 10; SET tcp_keepalives_interval = 5;
             SET tcp_keepalives_count = 3; SET tcp_user_timeout = 25000",
        )
        .execute(&mut lease)
        .await?;
        let deadline = Instant::now() + wait;
        loop {
            let held: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
                .bind(SERVER_LOCK)
                .fetch_one(&mut lease)
                .await?;
            if held {
                break;
            }
            if Instant::now() >= deadline {
                let _ = lease.close().await;
                return Err(sqlx::Error::Configuration(
                    format!(
                        "another wharf server is using the database {} (several servers on one database are not supported yet): stop it, or give this server a database of its own",
                        redacted(url)
                    )
                    .into(),
                ));
            }
            // A server killed a moment ago: its session ends as soon as
            // PostgreSQL reads the closed connection.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let pool = PgPoolOptions::new()
            .max_connections(8)
            .connect_with(options)
            .await?;
        // sqlx takes its own advisory lock while migrating.
        sqlx::migrate!("./migrations-postgres")
            .run(&pool)
            .await
            .map_err(|e| sqlx::Error::Migrate(Box::new(e)))?;
        Ok(PgStore {
            pool,
            lease: Mutex::new(Some(lease)),
        })
    }
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

async fn put_tasks(conn: &mut PgConnection, tasks: &[&Task]) -> Result<()> {
    let mut q = QueryBuilder::<Postgres>::new(
        "INSERT INTO tasks (id, family, service, status, created_at, body) ",
    );
    q.push_values(tasks, |mut row, task| {
        row.push_bind(&task.id)
            .push_bind(&task.family)
            .push_bind(&task.service)
            .push_bind(task.status.as_str())
            .push_bind(&task.created_at)
            .push_bind(json(task));
    });
    q.push(" ON CONFLICT (id) DO UPDATE SET status = excluded.status, body = excluded.body");
    q.build().execute(conn).await?;
    Ok(())
}

fn int(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

#[async_trait]
impl StateStore for PgStore {
    async fn write(&self, batch: &[Write]) -> Result<()> {
        let mut tasks = Vec::new();
        let mut logs = Vec::new();
        let mut events = Vec::new();
        let mut audit = Vec::new();
        for write in batch {
            match write {
                Write::Task(t) => tasks.push((t.id.as_str(), &**t)),
                Write::TaskLogs(id, page) => logs.push((id.as_str(), &**page)),
                Write::Event {
                    service,
                    at,
                    message,
                } => events.push((service, at, message)),
                Write::Audit(e) => audit.push(&**e),
            }
        }
        if tasks.is_empty() && logs.is_empty() && events.is_empty() && audit.is_empty() {
            return Ok(());
        }
        let tasks: Vec<&Task> = last_per_id(tasks).into_iter().map(|(_, t)| t).collect();
        let logs = last_per_id(logs);
        let mut tx = self.pool.begin().await?;
        for chunk in tasks.chunks(ROWS_PER_STATEMENT) {
            put_tasks(&mut tx, chunk).await?;
        }
        for chunk in logs.chunks(ROWS_PER_STATEMENT) {
            let mut q = QueryBuilder::<Postgres>::new("INSERT INTO task_logs (task_id, body) ");
            q.push_values(chunk, |mut row, (id, page)| {
                row.push_bind(*id).push_bind(json(page));
            });
            q.push(" ON CONFLICT (task_id) DO UPDATE SET body = excluded.body");
            q.build().execute(&mut *tx).await?;
        }
        for chunk in events.chunks(ROWS_PER_STATEMENT) {
            let mut q =
                QueryBuilder::<Postgres>::new("INSERT INTO service_events (service, at, message) ");
            q.push_values(chunk, |mut row, (service, at, message)| {
                row.push_bind(*service).push_bind(*at).push_bind(*message);
            });
            q.build().execute(&mut *tx).await?;
        }
        for chunk in audit.chunks(ROWS_PER_STATEMENT) {
            let mut q = QueryBuilder::<Postgres>::new(
                "INSERT INTO audit (at, token_id, actor, method, path, status) ",
            );
            q.push_values(chunk, |mut row, e| {
                row.push_bind(&e.at)
                    .push_bind(&e.token_id)
                    .push_bind(&e.actor)
                    .push_bind(&e.method)
                    .push_bind(&e.path)
                    .push_bind(i32::from(e.status));
            });
            q.build().execute(&mut *tx).await?;
        }
        tx.commit().await
    }

    async fn recover_lost_tasks(
        &self,
        at: &str,
        remote: &BTreeSet<String>,
    ) -> Result<(Vec<Task>, Vec<Task>)> {
        let mut tx = self.pool.begin().await?;
        let rows = sqlx::query("SELECT body FROM tasks WHERE status != 'STOPPED' FOR UPDATE")
            .fetch_all(&mut *tx)
            .await?;
        let mut lost = Vec::with_capacity(rows.len());
        let mut kept = Vec::new();
        for row in rows {
            let mut task: Task = parse(row.get::<&str, _>(0))?;
            if remote.contains(&task.node)
                && matches!(task.status, TaskStatus::Pending | TaskStatus::Running)
            {
                kept.push(task);
                continue;
            }
            super::mark_lost(&mut task, at);
            lost.push(task);
        }
        for chunk in lost.iter().collect::<Vec<_>>().chunks(ROWS_PER_STATEMENT) {
            put_tasks(&mut tx, chunk).await?;
        }
        tx.commit().await?;
        Ok((lost, kept))
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
        sqlx::query(
            "UPDATE task_definitions SET status = $1, body = $2 WHERE family = $3 AND revision = $4",
        )
        .bind(super::definition_status(def.status))
        .bind(json(def))
        .bind(&def.family)
        .bind(i64::from(def.revision))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn import_task_definition(&self, def: &TaskDefinition) -> Result<()> {
        sqlx::query(
            "INSERT INTO task_definitions (family, revision, status, registered_at, body)
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(&def.family)
        .bind(i64::from(def.revision))
        .bind(super::definition_status(def.status))
        .bind(&def.registered_at)
        .bind(json(def))
        .execute(&self.pool)
        .await?;
        Ok(())
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
        if let Some(lease) = self.lease.lock().await.take() {
            let _ = lease.close().await;
        }
    }
}
