//! The state store boundary ([`StateStore`]), its embedded SQLite
//! implementation ([`SqliteStore`]) and its PostgreSQL one ([`PgStore`]),
//! both through `sqlx` with migrations of their own, and the test suite
//! both pass.
//!
//! Every change is a transaction. High-rate changes (task records, their
//! logs, service events, audit entries) arrive as [`Write`]s in batches, so
//! one commit carries many of them; the rest are single statements.

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{QueryBuilder, Row, Sqlite};

use crate::model::{
    AuditEntry, LogPage, Secret, Service, ServiceEvent, Task, TaskDefinition, TaskDefinitionStatus,
    TaskStatus, Token,
};

mod postgres;
pub use postgres::{PgStore, redacted};

/// Errors of the state store.
pub type DbError = sqlx::Error;
type Result<T, E = DbError> = std::result::Result<T, E>;

/// A high-rate change, applied in batches.
#[derive(Debug, Clone)]
pub enum Write {
    /// Insert or replace a task record.
    Task(Box<Task>),
    /// A stopped task's retained output.
    TaskLogs(String, Box<LogPage>),
    /// A service event (its id is assigned by the store).
    Event {
        /// The service.
        service: String,
        /// When.
        at: String,
        /// What happened.
        message: String,
    },
    /// An audit entry (its id is assigned by the store).
    Audit(Box<AuditEntry>),
}

/// Writes batches synchronously, on the thread that calls it.
pub trait BatchWriter: Send {
    /// Applies `batch` in one transaction.
    fn write(&mut self, batch: &[Write]) -> std::result::Result<(), String>;

    /// Applies `batch` as [`write`](Self::write) does, but only if that
    /// needs no waiting for a lock (the caller may be a runtime's worker
    /// thread): `None`, having written nothing, if something else holds
    /// the connection, or if this writer writes only through the runtime.
    fn write_now(&mut self, batch: &[Write]) -> Option<std::result::Result<(), String>> {
        let _ = batch;
        None
    }
}

/// Which tasks to list.
#[derive(Debug, Clone, Default)]
pub struct TaskFilter {
    /// Of this family.
    pub family: Option<String>,
    /// Started by this service.
    pub service: Option<String>,
    /// In this status.
    pub status: Option<TaskStatus>,
    /// At most this many, newest first.
    pub limit: u32,
}

/// A replica's row: who it is and where other replicas reach it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replica {
    /// Its name, which is also its local node's.
    pub name: String,
    /// The process's random id.
    pub id: String,
    /// Where its API listens, for requests other replicas forward.
    pub api_url: String,
    /// Where its ingress listens, if it has one.
    pub ingress_url: Option<String>,
    /// Whether its lease has run out (by the database's clock).
    pub expired: bool,
    /// Whether it holds the `control` lease (and the lease is current).
    pub leader: bool,
}

/// Leases of several replicas on one database (PostgreSQL only; an
/// SQLite file has one server). Every time is the database's clock.
#[async_trait]
pub trait Replicas: Send + Sync {
    /// Takes the row of `me.name` for `ttl`, if nobody has it or its
    /// holder's lease ran out. `false`: another live process holds it.
    async fn claim(&self, me: &Replica, ttl: Duration) -> Result<bool>;
    /// Extends `me`'s row; `false`: it is no longer `me`'s.
    async fn renew(&self, me: &Replica, ttl: Duration) -> Result<bool>;
    /// Takes the `control` lease if it is free or ran out, or extends it
    /// if `me` holds it. `Some(fence)`: `me` holds it, under this fencing
    /// token (one more at every change of holder).
    async fn lead(&self, me: &Replica, ttl: Duration) -> Result<Option<i64>>;
    /// Every replica's row.
    async fn list(&self) -> Result<Vec<Replica>>;
    /// Gives up `me`'s row and, if `me` holds it, the `control` lease.
    async fn leave(&self, me: &Replica) -> Result<()>;
    /// Forgets the replica `name` if its row is still `id`'s and ran out,
    /// and marks its local node's unstopped tasks `NodeLost` in the same
    /// transaction. `None`: the row was renewed or taken over meanwhile.
    async fn forget(&self, name: &str, id: &str, at: &str) -> Result<Option<Vec<Task>>>;
    /// Marks the unstopped tasks of `nodes` `NodeLost` with `why` and
    /// returns them — but with `keep_started`, returns the started ones
    /// (`PENDING`, `RUNNING`) second, unchanged: what a starting replica
    /// loses of its own node, and what a new leader takes over of the
    /// edge nodes.
    async fn sweep_nodes(
        &self,
        at: &str,
        nodes: &std::collections::BTreeSet<String>,
        keep_started: bool,
        why: &str,
    ) -> Result<(Vec<Task>, Vec<Task>)>;
    /// Tells every replica's [`listen`](Self::listen)er `message`.
    async fn notify(&self, message: &str) -> Result<()>;
    /// The messages of [`notify`](Self::notify), from now on; `None` when
    /// some may have been missed (the connection was lost), so a
    /// listener must reload whatever it caches.
    async fn listen(&self) -> Result<tokio::sync::mpsc::Receiver<Option<String>>>;
    /// The value every replica must agree on for `key`: the first one
    /// given is kept and returned; later calls return it.
    async fn pin(&self, key: &str, value: &str) -> Result<String>;
    /// The secret replicas authenticate forwarded requests with.
    async fn replica_key(&self) -> Result<String>;
    /// How many times the task definitions have changed (registered,
    /// deregistered, imported), counted in commit order.
    async fn defs_generation(&self) -> Result<i64>;
    /// Records that `me` dropped every task definition it cached from
    /// before change `generation`.
    async fn ack_defs(&self, me: &Replica, generation: i64) -> Result<()>;
    /// The live replicas other than `me` that have not recorded
    /// `generation` yet.
    async fn defs_laggards(&self, me: &Replica, generation: i64) -> Result<Vec<String>>;
}

/// Where the control plane keeps its state.
#[async_trait]
pub trait StateStore: Send + Sync + 'static {
    /// Several replicas' leases, if this store can hold them.
    fn replicas(&self) -> Option<&dyn Replicas> {
        None
    }
    /// Applies a batch of writes in one transaction.
    async fn write(&self, batch: &[Write]) -> Result<()>;
    /// A synchronous writer of batches for the group-commit writer's own
    /// thread, if the store has one (SQLite: no hand-off per batch);
    /// otherwise the writer is a task calling [`write`](Self::write).
    fn batch_writer(&self) -> Option<Box<dyn BatchWriter>> {
        None
    }
    /// Marks every task that is not `STOPPED` as stopped with `NodeLost`
    /// (the node that ran it is gone) and returns them, except the tasks
    /// of `remote` nodes that had started (`PENDING` or `RUNNING`): those
    /// nodes run on without the server, and such tasks are returned
    /// second, unchanged.
    async fn recover_lost_tasks(
        &self,
        at: &str,
        remote: &std::collections::BTreeSet<String>,
    ) -> Result<(Vec<Task>, Vec<Task>)>;

    /// Stores a new revision, numbering it one past the family's last.
    async fn register_task_definition(&self, def: TaskDefinition) -> Result<TaskDefinition>;
    /// Revisions of one family or all, newest first per family.
    async fn task_definitions(&self, family: Option<&str>) -> Result<Vec<TaskDefinition>>;
    /// One revision; `None` revision: the latest `ACTIVE` one.
    async fn task_definition(
        &self,
        family: &str,
        revision: Option<u32>,
    ) -> Result<Option<TaskDefinition>>;
    /// Replaces a revision's record (status changes).
    async fn update_task_definition(&self, def: &TaskDefinition) -> Result<()>;
    /// Stores a revision with the number it has (`wharf migrate`).
    async fn import_task_definition(&self, def: &TaskDefinition) -> Result<()>;

    /// One task.
    async fn task(&self, id: &str) -> Result<Option<Task>>;
    /// Tasks matching `filter`, newest first.
    async fn tasks(&self, filter: &TaskFilter) -> Result<Vec<Task>>;
    /// A stopped task's retained output.
    async fn task_logs(&self, id: &str) -> Result<Option<LogPage>>;
    /// Deletes the oldest stopped tasks beyond `keep`; returns how many.
    async fn prune_tasks(&self, keep: u64) -> Result<u64>;
    /// Drops the retained output of the oldest stopped tasks beyond
    /// `keep_bytes` of output in all (the task records stay; their logs
    /// read as empty). Returns how many tasks lost their output.
    async fn prune_logs(&self, keep_bytes: u64) -> Result<u64>;

    /// Inserts or replaces a service.
    async fn put_service(&self, service: &Service) -> Result<()>;
    /// Removes a service.
    async fn delete_service(&self, name: &str) -> Result<()>;
    /// Every service.
    async fn services(&self) -> Result<Vec<Service>>;
    /// Inserts or replaces what an operator set on a node.
    async fn put_node(&self, node: &crate::model::NodeState) -> Result<()>;
    /// What operators set on nodes.
    async fn nodes(&self) -> Result<Vec<crate::model::NodeState>>;
    /// Forgets a node (`wharf node rm`).
    async fn delete_node(&self, name: &str) -> Result<()>;
    /// Stores a join token with the hash of its secret.
    async fn put_join_token(&self, token: &crate::model::JoinToken, hash: &str) -> Result<()>;
    /// The join token whose secret hashes to `hash`.
    async fn join_token(&self, hash: &str) -> Result<Option<crate::model::JoinToken>>;
    /// Every join token.
    async fn join_tokens(&self) -> Result<Vec<crate::model::JoinToken>>;
    /// Every join token with the hash of its secret (`wharf migrate`).
    async fn join_tokens_with_hashes(&self) -> Result<Vec<(crate::model::JoinToken, String)>>;
    /// Deletes a join token; false if there was none.
    async fn delete_join_token(&self, id: &str) -> Result<bool>;
    /// A service's latest events, newest first.
    async fn events(&self, service: &str, limit: u32) -> Result<Vec<ServiceEvent>>;
    /// Every service's events, oldest first (`wharf migrate`).
    async fn all_events(&self) -> Result<Vec<ServiceEvent>>;

    /// Creates or replaces a secret (`value` is its sealed form).
    async fn put_secret(
        &self,
        name: &str,
        value: &str,
        scope: Option<&str>,
        at: &str,
    ) -> Result<()>;
    /// Deletes a secret; false if there was none.
    async fn delete_secret(&self, name: &str) -> Result<bool>;
    /// Secret names.
    async fn secrets(&self) -> Result<Vec<Secret>>;
    /// A secret's stored (sealed) value and scope.
    async fn secret(&self, name: &str) -> Result<Option<(String, Option<String>)>>;

    /// Stores a token with the hash of its secret.
    async fn put_token(&self, token: &Token, hash: &str) -> Result<()>;
    /// Every token with its hash.
    async fn tokens(&self) -> Result<Vec<(Token, String)>>;

    /// The latest audit entries, newest first.
    async fn audit(&self, limit: u32) -> Result<Vec<AuditEntry>>;

    /// Deletes all but the newest `keep` audit entries; returns how many.
    async fn prune_audit(&self, keep: u64) -> Result<u64>;

    /// Copies the WAL into the database file and truncates it, so no
    /// earlier page version (a secret's old plain value) stays in either.
    async fn checkpoint(&self) -> Result<()>;

    /// Flushes and closes.
    async fn close(&self);
}

/// A task that was running when the server stopped, as recovery stores it.
fn mark_lost(task: &mut Task, at: &str) {
    mark_lost_why(
        task,
        at,
        "the server stopped while the task was running (node lost)",
    );
}

fn mark_lost_why(task: &mut Task, at: &str, message: &str) {
    task.status = TaskStatus::Stopped;
    task.desired_status = TaskStatus::Stopped;
    task.stop_code = Some("NodeLost".into());
    task.message = Some(message.to_owned());
    task.stopped_at = Some(at.to_owned());
}

/// A definition's status as the `status` column holds it.
fn definition_status(status: TaskDefinitionStatus) -> &'static str {
    match status {
        TaskDefinitionStatus::Active => "ACTIVE",
        TaskDefinitionStatus::Inactive => "INACTIVE",
    }
}

/// The embedded store: one SQLite file in WAL mode.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
    /// The batch writer's own connection, synchronous (rusqlite), used by
    /// one thread: the group-commit writer runs on it, so a batch costs no
    /// hand-off to a connection thread and back. Only it writes task
    /// records, so its page cache stays valid from one batch to the next
    /// (a pooled connection finds the WAL moved by another and drops its
    /// cache).
    writer: std::sync::Arc<std::sync::Mutex<rusqlite::Connection>>,
}

fn json<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_string(value).expect("state serializes")
}

fn parse<T: serde::de::DeserializeOwned>(text: &str) -> Result<T> {
    serde_json::from_str(text).map_err(|e| sqlx::Error::Decode(Box::new(e)))
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `path` and migrates it.
    pub async fn open(path: &Path) -> Result<Self> {
        // The database holds secret values: only the server's user may read
        // it. SQLite gives its -wal and -shm files the same mode.
        if !path.exists() {
            let mut options = std::fs::OpenOptions::new();
            options.write(true).create_new(true);
            #[cfg(unix)]
            std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
            match options.open(path) {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(e.into()),
            }
        }
        let options = SqliteConnectOptions::from_str(&format!("sqlite://{}", path.display()))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // In WAL mode NORMAL survives a process crash (kill -9) with
            // every committed transaction; only a power loss may drop the
            // last ones. FULL would fsync every commit.
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_secs(10))
            // Deleted and overwritten content is zeroed, so an old value
            // does not linger in free pages.
            .pragma("secure_delete", "on")
            // Checkpoints run beside the writer (`checkpoints`), not inside
            // the commit that crosses a threshold, where their fsyncs made
            // the tail of every write. This one is the backstop if they
            // fall behind: a commit checkpoints itself past 64 MiB of WAL.
            .pragma("wal_autocheckpoint", WAL_BACKSTOP_PAGES.to_string())
            .foreign_keys(true);
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            // The database is a local file: a ping before each use would
            // only add a round trip to the connection's thread.
            .test_before_acquire(false)
            .connect_with(options.clone())
            .await?;
        sqlx::migrate!("./migrations")
            .run(&pool)
            .await
            .map_err(|e| sqlx::Error::Migrate(Box::new(e)))?;
        let writer = open_writer(path).map_err(lite)?;
        tokio::spawn(checkpoints(pool.clone()));
        Ok(SqliteStore {
            pool,
            writer: std::sync::Arc::new(std::sync::Mutex::new(writer)),
        })
    }
}

/// How long the writer's connection waits for SQLite's write lock (the
/// pool's setting).
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// The writer's connection, with the pool's settings.
fn open_writer(path: &Path) -> rusqlite::Result<rusqlite::Connection> {
    use rusqlite::OpenFlags;
    let conn = rusqlite::Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    conn.pragma_update(None, "secure_delete", "on")?;
    conn.pragma_update(None, "foreign_keys", "on")?;
    conn.pragma_update(None, "wal_autocheckpoint", WAL_BACKSTOP_PAGES)?;
    Ok(conn)
}

/// A rusqlite error as the store's error type.
fn lite(e: rusqlite::Error) -> DbError {
    sqlx::Error::Io(std::io::Error::other(e))
}

const PUT_TASK: &str = "INSERT INTO tasks (id, family, service, status, created_at, body) \
     VALUES (?1, ?2, ?3, ?4, ?5, ?6) \
     ON CONFLICT (id) DO UPDATE SET status = excluded.status, body = excluded.body";

/// Applies a batch in one `IMMEDIATE` transaction, a cached prepared
/// statement per kind of write; nothing of it is kept if any part fails.
fn write_batch(conn: &mut rusqlite::Connection, batch: &[Write]) -> rusqlite::Result<()> {
    use rusqlite::params;
    if batch.is_empty() {
        return Ok(());
    }
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    for write in batch {
        match write {
            Write::Task(t) => {
                tx.prepare_cached(PUT_TASK)?.execute(params![
                    t.id,
                    t.family,
                    t.service,
                    t.status.as_str(),
                    t.created_at,
                    json(&**t)
                ])?;
            }
            Write::TaskLogs(id, page) => {
                tx.prepare_cached(
                    "INSERT OR REPLACE INTO task_logs (task_id, body) VALUES (?1, ?2)",
                )?
                .execute(params![id, json(&**page)])?;
            }
            Write::Event {
                service,
                at,
                message,
            } => {
                tx.prepare_cached(
                    "INSERT INTO service_events (service, at, message) VALUES (?1, ?2, ?3)",
                )?
                .execute(params![service, at, message])?;
            }
            Write::Audit(e) => {
                tx.prepare_cached(
                    "INSERT INTO audit (at, token_id, actor, method, path, status) \
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                )?
                .execute(params![
                    e.at, e.token_id, e.actor, e.method, e.path, e.status
                ])?;
            }
        }
    }
    tx.commit()
}

/// The group-commit writer's side of a [`SqliteStore`]: it writes on the
/// writer's own thread.
struct SqliteBatches(std::sync::Arc<std::sync::Mutex<rusqlite::Connection>>);

impl BatchWriter for SqliteBatches {
    fn write(&mut self, batch: &[Write]) -> Result<(), String> {
        let mut conn = self.0.lock().unwrap_or_else(|p| p.into_inner());
        write_batch(&mut conn, batch).map_err(|e| e.to_string())
    }

    fn write_now(&mut self, batch: &[Write]) -> Option<Result<(), String>> {
        let mut conn = match self.0.try_lock() {
            Ok(conn) => conn,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            // A prune's transaction holds it.
            Err(std::sync::TryLockError::WouldBlock) => return None,
        };
        // Another connection (the pool's: a service, a secret) may hold
        // SQLite's write lock: no sleeping in the busy handler on a
        // caller's thread; the writer's thread waits for it instead.
        conn.busy_timeout(Duration::ZERO).ok()?;
        let result = write_batch(&mut conn, batch);
        if let Err(e) = conn.busy_timeout(BUSY_TIMEOUT) {
            tracing::error!(error = %e, "cannot restore the writer's busy timeout");
        }
        match result {
            Err(rusqlite::Error::SqliteFailure(e, _))
                if matches!(
                    e.code,
                    rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked
                ) =>
            {
                None
            }
            result => Some(result.map_err(|e| e.to_string())),
        }
    }
}

/// WAL pages (4 KiB) past which a commit checkpoints by itself.
const WAL_BACKSTOP_PAGES: u32 = 16_384;
/// How often the background checkpointer runs.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(250);

/// Copies the WAL back into the database beside the writer: a `PASSIVE`
/// checkpoint every 250 ms (nothing to do, nothing done). It never waits
/// for the writer, nor the writer for it; the WAL starts over at the
/// writer's next commit after a checkpoint that caught up. Ends when the
/// pool closes.
async fn checkpoints(pool: SqlitePool) {
    let mut tick = tokio::time::interval(CHECKPOINT_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if pool.is_closed() {
            return;
        }
        if let Err(e) = sqlx::query("PRAGMA wal_checkpoint(PASSIVE)")
            .execute(&pool)
            .await
            && !pool.is_closed()
        {
            tracing::warn!(error = %e, "WAL checkpoint failed");
        }
    }
}

/// Rows per multi-row statement: 6 columns × 256 rows stays far below
/// SQLite's limit of 32,766 bound parameters.
const ROWS_PER_STATEMENT: usize = 256;

fn push_tasks<'a>(q: &mut QueryBuilder<'a, Sqlite>, tasks: &[&'a Task]) {
    q.push("INSERT INTO tasks (id, family, service, status, created_at, body) ");
    q.push_values(tasks, |mut row, task| {
        row.push_bind(&task.id)
            .push_bind(&task.family)
            .push_bind(&task.service)
            .push_bind(task.status.as_str())
            .push_bind(&task.created_at)
            .push_bind(json(task));
    });
    q.push(" ON CONFLICT (id) DO UPDATE SET status = excluded.status, body = excluded.body");
}

async fn put_tasks(conn: &mut sqlx::SqliteConnection, tasks: &[&Task]) -> Result<()> {
    let mut q = QueryBuilder::<Sqlite>::new("");
    push_tasks(&mut q, tasks);
    q.build().execute(conn).await?;
    Ok(())
}

/// Rows a prune deletes per transaction. Prunes delete on the writer's
/// own connection, taking turns with its batches: a transaction of this
/// many rows holds SQLite's write lock for a millisecond or two, so the
/// records of acknowledged runs never wait behind a whole prune (one
/// `DELETE` of 170,000 stopped tasks held it for seconds: wrk's POST p90
/// went from 2 ms to 400 ms), and the writer waits on a mutex that wakes
/// it, not in SQLite's busy handler, which sleeps.
const PRUNE_BATCH: usize = 256;
/// Keys a prune reads per pass (what it holds in memory at once).
const PRUNE_READ: i64 = 16_384;

impl SqliteStore {
    /// Finds what to prune with `select` (text keys; `?1` the bound to
    /// keep, `?2` at most this many keys, read on a pooled connection — a WAL reader
    /// the writer does not wait for), then runs `deletes` (`?1` a JSON
    /// array of keys) on the writer's connection, in one transaction per
    /// `PRUNE_BATCH` keys, until `select` finds nothing more. Returns
    /// the rows the last of `deletes` removed.
    async fn prune(
        &self,
        select: &str,
        keep: u64,
        deletes: &'static [&'static str],
    ) -> Result<u64> {
        let keep = i64::try_from(keep).unwrap_or(i64::MAX);
        let mut done = 0;
        loop {
            let keys: Vec<String> = sqlx::query_scalar(select)
                .bind(keep)
                .bind(PRUNE_READ)
                .fetch_all(&self.pool)
                .await?;
            let last_pass = keys.len() < PRUNE_READ as usize;
            let mut removed = 0;
            for chunk in keys.chunks(PRUNE_BATCH) {
                let list = json(&chunk);
                let writer = self.writer.clone();
                removed += tokio::task::spawn_blocking(move || {
                    let mut conn = writer.lock().unwrap_or_else(|p| p.into_inner());
                    let tx =
                        conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
                    let mut n = 0;
                    for sql in deletes {
                        n = tx.prepare_cached(sql)?.execute([&list])?;
                    }
                    tx.commit().map(|()| n as u64)
                })
                .await
                .map_err(|e| sqlx::Error::Io(std::io::Error::other(e)))?
                .map_err(lite)?;
            }
            done += removed;
            // Nothing removed: another prune got there first, or what the
            // read found is gone; reading again would find the same.
            if last_pass || removed == 0 {
                return Ok(done);
            }
        }
    }
}

#[async_trait]
impl StateStore for SqliteStore {
    async fn write(&self, batch: &[Write]) -> Result<()> {
        let writer = self.writer.clone();
        let batch = batch.to_vec();
        tokio::task::spawn_blocking(move || {
            let mut conn = writer.lock().unwrap_or_else(|p| p.into_inner());
            write_batch(&mut conn, &batch).map_err(lite)
        })
        .await
        .map_err(|e| sqlx::Error::Io(std::io::Error::other(e)))?
    }

    fn batch_writer(&self) -> Option<Box<dyn BatchWriter>> {
        Some(Box::new(SqliteBatches(self.writer.clone())))
    }

    async fn recover_lost_tasks(
        &self,
        at: &str,
        remote: &std::collections::BTreeSet<String>,
    ) -> Result<(Vec<Task>, Vec<Task>)> {
        let mut tx = self.pool.begin().await?;
        let rows = sqlx::query("SELECT body FROM tasks WHERE status != 'STOPPED'")
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
            mark_lost(&mut task, at);
            lost.push(task);
        }
        for chunk in lost.iter().collect::<Vec<_>>().chunks(ROWS_PER_STATEMENT) {
            put_tasks(&mut tx, chunk).await?;
        }
        tx.commit().await?;
        Ok((lost, kept))
    }

    async fn register_task_definition(&self, def: TaskDefinition) -> Result<TaskDefinition> {
        // One statement numbers and inserts the revision, so concurrent
        // registrations of a family serialize instead of colliding.
        let body: String = sqlx::query_scalar(
            "INSERT INTO task_definitions (family, revision, status, registered_at, body)
             SELECT ?1, r, 'ACTIVE', ?2, json_set(?3, '$.revision', r, '$.task_definition', ?1 || ':' || r)
             FROM (SELECT COALESCE(MAX(revision), 0) + 1 AS r FROM task_definitions WHERE family = ?1)
             RETURNING body",
        )
        .bind(&def.family)
        .bind(&def.registered_at)
        .bind(json(&def))
        .fetch_one(&self.pool)
        .await?;
        parse(&body)
    }

    async fn task_definitions(&self, family: Option<&str>) -> Result<Vec<TaskDefinition>> {
        let rows = sqlx::query(
            "SELECT body FROM task_definitions WHERE (?1 IS NULL OR family = ?1) ORDER BY family, revision DESC",
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
                sqlx::query("SELECT body FROM task_definitions WHERE family = ? AND revision = ?")
                    .bind(family)
                    .bind(rev)
                    .fetch_optional(&self.pool)
                    .await?
            }
            None => {
                sqlx::query(
                    "SELECT body FROM task_definitions WHERE family = ? AND status = 'ACTIVE' ORDER BY revision DESC LIMIT 1",
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
            "UPDATE task_definitions SET status = ?, body = ? WHERE family = ? AND revision = ?",
        )
        .bind(definition_status(def.status))
        .bind(json(def))
        .bind(&def.family)
        .bind(def.revision)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn import_task_definition(&self, def: &TaskDefinition) -> Result<()> {
        sqlx::query(
            "INSERT INTO task_definitions (family, revision, status, registered_at, body) VALUES (?, ?, ?, ?, ?)",
        )
        .bind(&def.family)
        .bind(def.revision)
        .bind(definition_status(def.status))
        .bind(&def.registered_at)
        .bind(json(def))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn task(&self, id: &str) -> Result<Option<Task>> {
        let row = sqlx::query("SELECT body FROM tasks WHERE id = ?")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| parse(r.get::<&str, _>(0))).transpose()
    }

    async fn tasks(&self, filter: &TaskFilter) -> Result<Vec<Task>> {
        let rows = sqlx::query(
            "SELECT body FROM tasks
             WHERE (?1 IS NULL OR family = ?1) AND (?2 IS NULL OR service = ?2) AND (?3 IS NULL OR status = ?3)
             ORDER BY created_at DESC, id LIMIT ?4",
        )
        .bind(&filter.family)
        .bind(&filter.service)
        .bind(filter.status.map(TaskStatus::as_str))
        .bind(filter.limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(|r| parse(r.get::<&str, _>(0))).collect()
    }

    async fn task_logs(&self, id: &str) -> Result<Option<LogPage>> {
        let row = sqlx::query("SELECT body FROM task_logs WHERE task_id = ?")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| parse(r.get::<&str, _>(0))).transpose()
    }

    async fn prune_logs(&self, keep_bytes: u64) -> Result<u64> {
        // Newest first, a running total of each stopped task's stored
        // output; whatever lies past the budget goes.
        self.prune(
            "SELECT task_id FROM (
                 SELECT l.task_id,
                        SUM(length(CAST(l.body AS BLOB)))
                            OVER (ORDER BY t.created_at DESC, t.id DESC) AS upto
                 FROM task_logs l JOIN tasks t ON t.id = l.task_id
                 WHERE t.status = 'STOPPED')
             WHERE upto > ?1 LIMIT ?2",
            keep_bytes,
            &["DELETE FROM task_logs WHERE task_id IN (SELECT value FROM json_each(?1))"],
        )
        .await
    }

    async fn prune_tasks(&self, keep: u64) -> Result<u64> {
        // A stopped task's output goes with it, in the same transaction.
        self.prune(
            "SELECT id FROM tasks WHERE status = 'STOPPED'
             ORDER BY created_at DESC, id DESC LIMIT ?2 OFFSET ?1",
            keep,
            &[
                "DELETE FROM task_logs WHERE task_id IN (SELECT value FROM json_each(?1))",
                "DELETE FROM tasks WHERE status = 'STOPPED' AND id IN (SELECT value FROM json_each(?1))",
            ],
        )
        .await
    }

    async fn put_service(&self, service: &Service) -> Result<()> {
        sqlx::query("INSERT OR REPLACE INTO services (name, body) VALUES (?, ?)")
            .bind(&service.name)
            .bind(json(service))
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn delete_service(&self, name: &str) -> Result<()> {
        sqlx::query("DELETE FROM services WHERE name = ?")
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

    async fn put_node(&self, node: &crate::model::NodeState) -> Result<()> {
        sqlx::query("INSERT OR REPLACE INTO nodes (name, body) VALUES (?, ?)")
            .bind(&node.name)
            .bind(json(node))
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn nodes(&self) -> Result<Vec<crate::model::NodeState>> {
        let rows = sqlx::query("SELECT body FROM nodes ORDER BY name")
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(|r| parse(r.get::<&str, _>(0))).collect()
    }

    async fn delete_node(&self, name: &str) -> Result<()> {
        sqlx::query("DELETE FROM nodes WHERE name = ?")
            .bind(name)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn put_join_token(&self, token: &crate::model::JoinToken, hash: &str) -> Result<()> {
        sqlx::query("INSERT INTO join_tokens (id, hash, body) VALUES (?, ?, ?)")
            .bind(&token.id)
            .bind(hash)
            .bind(json(token))
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn join_token(&self, hash: &str) -> Result<Option<crate::model::JoinToken>> {
        let row = sqlx::query("SELECT body FROM join_tokens WHERE hash = ?")
            .bind(hash)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| parse(r.get::<&str, _>(0))).transpose()
    }

    async fn join_tokens(&self) -> Result<Vec<crate::model::JoinToken>> {
        let rows = sqlx::query("SELECT body FROM join_tokens ORDER BY id")
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(|r| parse(r.get::<&str, _>(0))).collect()
    }

    async fn join_tokens_with_hashes(&self) -> Result<Vec<(crate::model::JoinToken, String)>> {
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
        let done = sqlx::query("DELETE FROM join_tokens WHERE id = ?")
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() > 0)
    }

    async fn events(&self, service: &str, limit: u32) -> Result<Vec<ServiceEvent>> {
        let rows = sqlx::query(
            "SELECT id, service, at, message FROM service_events WHERE service = ? ORDER BY id DESC LIMIT ?",
        )
        .bind(service)
        .bind(limit)
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
            "INSERT OR REPLACE INTO secrets (name, value, scope, updated_at) VALUES (?, ?, ?, ?)",
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
        let done = sqlx::query("DELETE FROM secrets WHERE name = ?")
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
        let row = sqlx::query("SELECT value, scope FROM secrets WHERE name = ?")
            .bind(name)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(|r| (r.get(0), r.get(1))))
    }

    async fn put_token(&self, token: &Token, hash: &str) -> Result<()> {
        sqlx::query("INSERT OR REPLACE INTO tokens (id, hash, body) VALUES (?, ?, ?)")
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

    async fn prune_audit(&self, keep: u64) -> Result<u64> {
        self.prune(
            "SELECT CAST(id AS TEXT) FROM audit ORDER BY id DESC LIMIT ?2 OFFSET ?1",
            keep,
            &["DELETE FROM audit WHERE id IN (SELECT CAST(value AS INTEGER) FROM json_each(?1))"],
        )
        .await
    }

    async fn checkpoint(&self) -> Result<()> {
        sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)")
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn audit(&self, limit: u32) -> Result<Vec<AuditEntry>> {
        let rows = sqlx::query(
            "SELECT id, at, token_id, actor, method, path, status FROM audit ORDER BY id DESC LIMIT ?",
        )
        .bind(limit)
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
                status: r.get::<u16, _>(6),
            })
            .collect())
    }

    async fn close(&self) {
        self.pool.close().await;
    }
}

#[cfg(test)]
pub(crate) mod tests {
    //! The shared suite: every test runs against SQLite and against a
    //! real PostgreSQL server (`wharf_testkit::postgres`).

    use std::sync::Arc;

    use super::*;
    use crate::model::{LogEntry, TaskLimits, TaskStatus};

    /// Where a test's state lives; `open` again after `close` is a restart.
    enum Place {
        Sqlite(tempfile::TempDir),
        Postgres(String),
    }

    impl Place {
        fn sqlite() -> Place {
            Place::Sqlite(tempfile::tempdir().unwrap())
        }

        fn postgres() -> Place {
            Place::Postgres(wharf_testkit::postgres::shared().database())
        }

        async fn open(&self) -> Arc<dyn StateStore> {
            match self {
                Place::Sqlite(dir) => Arc::new(
                    SqliteStore::open(&dir.path().join("state.db"))
                        .await
                        .unwrap(),
                ),
                Place::Postgres(url) => Arc::new(PgStore::open(url).await.unwrap()),
            }
        }
    }

    /// Each named test, once on SQLite and once on PostgreSQL.
    macro_rules! on_both_stores {
        ($($name:ident),* $(,)?) => {
            mod sqlite {
                $(
                    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                    async fn $name() {
                        super::$name(super::Place::sqlite()).await;
                    }
                )*
            }
            mod postgres {
                $(
                    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                    async fn $name() {
                        super::$name(super::Place::postgres()).await;
                    }
                )*
            }
        };
    }

    on_both_stores!(
        a_batch_commits_every_kind_and_a_restart_finds_lost_tasks,
        revisions_count_up_per_family,
        the_last_write_of_a_task_in_a_batch_wins,
        tasks_are_listed_newest_first_by_filter,
        services_nodes_secrets_and_tokens_round_trip,
        join_tokens_and_audit_round_trip_and_audit_is_pruned_oldest_first,
    );

    pub(crate) fn task(id: &str, status: TaskStatus) -> Task {
        Task {
            id: id.into(),
            task_definition: "f:1".into(),
            family: "f".into(),
            service: None,
            deployment_id: None,
            node: "local".into(),
            status,
            desired_status: TaskStatus::Running,
            stop_code: None,
            exit_code: None,
            fuel_consumed: None,
            peak_memory_bytes: None,
            duration_ms: None,
            message: None,
            args: Vec::new(),
            limits: TaskLimits::default(),
            created_at: format!("2026-01-01T00:00:00.{id}Z"),
            started_at: None,
            stopped_at: None,
            http: None,
            replica: None,
        }
    }

    fn def(family: &str) -> TaskDefinition {
        TaskDefinition {
            family: family.into(),
            revision: 0,
            task_definition: String::new(),
            status: TaskDefinitionStatus::Active,
            artifact: "a:1".into(),
            artifact_digest: "sha256:0".into(),
            wasm_digest: "sha256:1".into(),
            kind: crate::model::TaskKind::Command,
            args: Vec::new(),
            env: Default::default(),
            secrets: Default::default(),
            limits: TaskLimits::default(),
            http: None,
            placement_constraints: Vec::new(),
            placement_strategy: None,
            requires_interfaces: Vec::new(),
            labels: Default::default(),
            registered_at: "now".into(),
            deregistered_at: None,
        }
    }

    async fn a_batch_commits_every_kind_and_a_restart_finds_lost_tasks(place: Place) {
        let store = place.open().await;
        let page = LogPage {
            lines: Vec::new(),
            next_seq: 0,
            missed: 0,
            closed: true,
        };
        let mut batch = vec![
            Write::Task(Box::new(task("001", TaskStatus::Provisioning))),
            Write::Task(Box::new(task("002", TaskStatus::Stopped))),
            Write::TaskLogs("002".into(), Box::new(page.clone())),
            Write::Event {
                service: "s".into(),
                at: "now".into(),
                message: "hello".into(),
            },
        ];
        // More rows than one statement holds.
        for n in 0..600 {
            batch.push(Write::Task(Box::new(task(
                &format!("1{n:03}"),
                TaskStatus::Stopped,
            ))));
        }
        store.write(&batch).await.unwrap();
        // The same task again is an update, not a second row.
        store
            .write(&[Write::Task(Box::new(task("001", TaskStatus::Running)))])
            .await
            .unwrap();
        assert_eq!(
            store.task("001").await.unwrap().unwrap().status,
            TaskStatus::Running
        );
        assert_eq!(store.task_logs("002").await.unwrap(), Some(page));
        assert_eq!(store.events("s", 10).await.unwrap()[0].message, "hello");
        let all = TaskFilter {
            limit: 1000,
            ..TaskFilter::default()
        };
        assert_eq!(store.tasks(&all).await.unwrap().len(), 602);
        store.close().await;

        let store = place.open().await;
        // A started task of an edge node outlives the server's restart.
        let mut edge = task("edge-1", TaskStatus::Running);
        edge.node = "edge".into();
        store.write(&[Write::Task(Box::new(edge))]).await.unwrap();
        let remote: std::collections::BTreeSet<String> = ["edge".to_owned()].into();
        let (lost, kept) = store.recover_lost_tasks("later", &remote).await.unwrap();
        assert_eq!(lost.len(), 1);
        assert_eq!(kept.len(), 1);
        assert_eq!(kept[0].id, "edge-1");
        assert_eq!(
            store.task("edge-1").await.unwrap().unwrap().status,
            TaskStatus::Running
        );
        let t = store.task("001").await.unwrap().unwrap();
        assert_eq!(t.status, TaskStatus::Stopped);
        assert_eq!(t.stop_code.as_deref(), Some("NodeLost"));
        let (lost, _) = store.recover_lost_tasks("again", &remote).await.unwrap();
        assert!(lost.is_empty());
        let (lost, _) = store
            .recover_lost_tasks("gone", &Default::default())
            .await
            .unwrap();
        assert_eq!(lost.len(), 1, "the edge node was removed");
        // Pruning drops the oldest stopped tasks and their logs.
        assert_eq!(store.prune_tasks(601).await.unwrap(), 2);
        assert!(store.task("002").await.unwrap().is_none());
        assert!(store.task_logs("002").await.unwrap().is_none());
        assert!(store.task("1599").await.unwrap().is_some());
        // Output beyond the byte budget goes, oldest first; records stay.
        let logs = |id: &str| {
            Write::TaskLogs(
                id.into(),
                Box::new(LogPage {
                    lines: vec![LogEntry {
                        seq: 0,
                        at: "now".into(),
                        stream: "stdout".into(),
                        text: "x".repeat(1000),
                    }],
                    next_seq: 1,
                    missed: 0,
                    closed: true,
                }),
            )
        };
        store
            .write(&[logs("1597"), logs("1598"), logs("1599")])
            .await
            .unwrap();
        assert_eq!(store.prune_logs(2_500).await.unwrap(), 1);
        assert!(store.task_logs("1597").await.unwrap().is_none());
        assert!(store.task_logs("1598").await.unwrap().is_some());
        assert!(store.task_logs("1599").await.unwrap().is_some());
        assert!(store.task("1597").await.unwrap().is_some());
        store.close().await;
    }

    async fn revisions_count_up_per_family(place: Place) {
        let store = place.open().await;
        let a1 = store.register_task_definition(def("a")).await.unwrap();
        let a2 = store.register_task_definition(def("a")).await.unwrap();
        let b1 = store.register_task_definition(def("b")).await.unwrap();
        assert_eq!((a1.revision, a2.revision, b1.revision), (1, 2, 1));
        assert_eq!(a2.task_definition, "a:2");
        let mut inactive = a2.clone();
        inactive.status = TaskDefinitionStatus::Inactive;
        store.update_task_definition(&inactive).await.unwrap();
        let latest = store.task_definition("a", None).await.unwrap().unwrap();
        assert_eq!(latest.revision, 1, "the latest ACTIVE revision");
        let a2 = store.task_definition("a", Some(2)).await.unwrap().unwrap();
        assert_eq!(a2.status, TaskDefinitionStatus::Inactive);
        assert!(store.task_definition("a", Some(3)).await.unwrap().is_none());
        let listed: Vec<String> = store
            .task_definitions(None)
            .await
            .unwrap()
            .into_iter()
            .map(|d| d.task_definition)
            .collect();
        assert_eq!(listed, ["a:2", "a:1", "b:1"]);
        assert_eq!(store.task_definitions(Some("b")).await.unwrap().len(), 1);
        // Imported revisions keep their numbers, and registration goes on
        // after them.
        let mut imported = def("d");
        imported.revision = 7;
        imported.task_definition = "d:7".into();
        store.import_task_definition(&imported).await.unwrap();
        assert_eq!(
            store.task_definition("d", Some(7)).await.unwrap(),
            Some(imported)
        );
        let d8 = store.register_task_definition(def("d")).await.unwrap();
        assert_eq!(d8.task_definition, "d:8");
        // Concurrent registrations of one family get distinct revisions.
        let joins: Vec<_> = (0..20)
            .map(|_| {
                let (store, d) = (store.clone(), def("c"));
                tokio::spawn(
                    async move { store.register_task_definition(d).await.unwrap().revision },
                )
            })
            .collect();
        let mut revisions = Vec::new();
        for j in joins {
            revisions.push(j.await.unwrap());
        }
        revisions.sort_unstable();
        assert_eq!(revisions, (1..=20).collect::<Vec<u32>>());
        store.close().await;
    }

    async fn the_last_write_of_a_task_in_a_batch_wins(place: Place) {
        let store = place.open().await;
        let page = |text: &str| LogPage {
            lines: vec![LogEntry {
                seq: 0,
                at: "now".into(),
                stream: "stdout".into(),
                text: text.into(),
            }],
            next_seq: 1,
            missed: 0,
            closed: true,
        };
        store
            .write(&[
                Write::Task(Box::new(task("1", TaskStatus::Provisioning))),
                Write::Task(Box::new(task("1", TaskStatus::Running))),
                Write::TaskLogs("1".into(), Box::new(page("first"))),
                Write::Task(Box::new(task("1", TaskStatus::Stopped))),
                Write::TaskLogs("1".into(), Box::new(page("last"))),
            ])
            .await
            .unwrap();
        assert_eq!(
            store.task("1").await.unwrap().unwrap().status,
            TaskStatus::Stopped
        );
        assert_eq!(
            store.task_logs("1").await.unwrap().unwrap().lines[0].text,
            "last"
        );
        store.close().await;
    }

    async fn tasks_are_listed_newest_first_by_filter(place: Place) {
        let store = place.open().await;
        let mut writes = Vec::new();
        for (id, family, service, status) in [
            ("1", "a", None, TaskStatus::Stopped),
            ("2", "a", Some("web"), TaskStatus::Running),
            ("3", "b", Some("web"), TaskStatus::Stopped),
            ("4", "a", Some("web"), TaskStatus::Stopped),
        ] {
            let mut t = task(id, status);
            t.family = family.into();
            t.service = service.map(Into::into);
            writes.push(Write::Task(Box::new(t)));
        }
        store.write(&writes).await.unwrap();
        let ids = |filter: TaskFilter| {
            let store = store.clone();
            async move {
                store
                    .tasks(&filter)
                    .await
                    .unwrap()
                    .into_iter()
                    .map(|t| t.id)
                    .collect::<Vec<_>>()
            }
        };
        let filter = TaskFilter {
            limit: 10,
            ..TaskFilter::default()
        };
        assert_eq!(ids(filter.clone()).await, ["4", "3", "2", "1"]);
        let family = TaskFilter {
            family: Some("a".into()),
            ..filter.clone()
        };
        assert_eq!(ids(family).await, ["4", "2", "1"]);
        let service = TaskFilter {
            service: Some("web".into()),
            status: Some(TaskStatus::Stopped),
            ..filter.clone()
        };
        assert_eq!(ids(service).await, ["4", "3"]);
        let limited = TaskFilter { limit: 2, ..filter };
        assert_eq!(ids(limited).await, ["4", "3"]);
        store.close().await;
    }

    async fn services_nodes_secrets_and_tokens_round_trip(place: Place) {
        let store = place.open().await;
        // Secrets: replaced in place, scoped, deleted once.
        store.put_secret("db", "v1", None, "t1").await.unwrap();
        store
            .put_secret("db", "v2", Some("team-a/*"), "t2")
            .await
            .unwrap();
        store.put_secret("api", "k", None, "t3").await.unwrap();
        assert_eq!(
            store.secret("db").await.unwrap(),
            Some(("v2".into(), Some("team-a/*".into())))
        );
        let names: Vec<String> = store
            .secrets()
            .await
            .unwrap()
            .into_iter()
            .map(|s| s.name)
            .collect();
        assert_eq!(names, ["api", "db"]);
        store.checkpoint().await.unwrap();
        assert!(store.delete_secret("db").await.unwrap());
        assert!(!store.delete_secret("db").await.unwrap());
        assert_eq!(store.secret("db").await.unwrap(), None);
        // Nodes: replaced in place and forgotten.
        let node = crate::model::NodeState {
            name: "edge-1".into(),
            status: crate::model::NodeStatus::Draining,
            labels: [("zone".to_owned(), "a".to_owned())].into(),
            credential_hash: Some("h".into()),
            joined_at: None,
        };
        store.put_node(&node).await.unwrap();
        store.put_node(&node).await.unwrap();
        assert_eq!(store.nodes().await.unwrap(), [node]);
        store.delete_node("edge-1").await.unwrap();
        assert!(store.nodes().await.unwrap().is_empty());
        // Services.
        let service = Service {
            name: "web".into(),
            task_definition: "f:1".into(),
            status: crate::model::ServiceStatus::Active,
            desired_count: 2,
            running_count: 0,
            pending_count: 0,
            minimum_healthy_percent: 100,
            maximum_percent: 200,
            deployments: Vec::new(),
            routes: vec!["example.com/api".into()],
            autoscaling: None,
            placement: None,
            created_at: "now".into(),
        };
        store.put_service(&service).await.unwrap();
        let mut scaled = service.clone();
        scaled.desired_count = 5;
        store.put_service(&scaled).await.unwrap();
        let services = store.services().await.unwrap();
        assert_eq!(services, [scaled]);
        store.delete_service("web").await.unwrap();
        assert!(store.services().await.unwrap().is_empty());
        // Tokens keep their hash.
        let token = Token {
            id: "t-1".into(),
            name: "ci".into(),
            role: crate::model::Role::Deployer,
            repositories: vec!["team-a/*".into()],
            created_at: "now".into(),
            revoked_at: None,
        };
        store.put_token(&token, "hash-1").await.unwrap();
        let tokens = store.tokens().await.unwrap();
        assert_eq!(tokens, [(token, "hash-1".to_owned())]);
        store.close().await;
    }

    async fn join_tokens_and_audit_round_trip_and_audit_is_pruned_oldest_first(place: Place) {
        let store = place.open().await;
        let join = crate::model::JoinToken {
            id: "j-1".into(),
            labels: [("zone".to_owned(), "b".to_owned())].into(),
            created_at: "now".into(),
            expires_at: "later".into(),
        };
        store.put_join_token(&join, "secret-hash").await.unwrap();
        assert_eq!(
            store.join_token("secret-hash").await.unwrap(),
            Some(join.clone())
        );
        assert!(store.join_token("other").await.unwrap().is_none());
        assert_eq!(
            store.join_tokens_with_hashes().await.unwrap(),
            [(join.clone(), "secret-hash".to_owned())]
        );
        assert_eq!(store.join_tokens().await.unwrap().len(), 1);
        assert!(store.delete_join_token("j-1").await.unwrap());
        assert!(!store.delete_join_token("j-1").await.unwrap());
        let entry = |n: u16| {
            Write::Audit(Box::new(AuditEntry {
                id: 0,
                at: format!("t{n}"),
                token_id: "admin".into(),
                actor: "admin".into(),
                method: "POST".into(),
                path: format!("/v1/tasks/{n}"),
                status: 200 + n,
            }))
        };
        store
            .write(&(0..5).map(entry).collect::<Vec<_>>())
            .await
            .unwrap();
        let audit = store.audit(10).await.unwrap();
        assert_eq!(audit.len(), 5);
        assert_eq!(
            (audit[0].status, audit[4].status),
            (204, 200),
            "newest first"
        );
        assert!(audit[0].id > audit[4].id);
        assert_eq!(store.prune_audit(2).await.unwrap(), 3);
        let kept: Vec<u16> = store
            .audit(10)
            .await
            .unwrap()
            .into_iter()
            .map(|e| e.status)
            .collect();
        assert_eq!(kept, [204, 203]);
        // Events: newest first, per service, limited.
        let events: Vec<Write> = (0..4)
            .map(|n| Write::Event {
                service: if n == 2 { "other" } else { "web" }.into(),
                at: "now".into(),
                message: format!("e{n}"),
            })
            .collect();
        store.write(&events).await.unwrap();
        let seen: Vec<String> = store
            .events("web", 2)
            .await
            .unwrap()
            .into_iter()
            .map(|e| e.message)
            .collect();
        assert_eq!(seen, ["e3", "e1"]);
        let all: Vec<String> = store
            .all_events()
            .await
            .unwrap()
            .into_iter()
            .map(|e| e.message)
            .collect();
        assert_eq!(all, ["e0", "e1", "e2", "e3"], "every service, oldest first");
        store.close().await;
    }

    fn replica(name: &str, id: &str) -> Replica {
        Replica {
            name: name.into(),
            id: id.into(),
            api_url: format!("http://{name}"),
            ingress_url: None,
            expired: false,
            leader: false,
        }
    }

    /// The PostgreSQL writer's own connection dies (a restart of the
    /// database, a proxy timing out): the batch on it fails, so its
    /// waiters hear of it, and the next batch connects again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_postgres_writer_connects_again_after_its_connection_dies() {
        let store = PgStore::open(&wharf_testkit::postgres::shared().database())
            .await
            .unwrap();
        let sink = Arc::new(std::sync::Mutex::new(
            store.batch_writer().expect("a writer of its own"),
        ));
        let write = |id: &'static str| {
            let sink = sink.clone();
            async move {
                let batch = vec![Write::Task(Box::new(task(id, TaskStatus::Running)))];
                tokio::task::spawn_blocking(move || sink.lock().unwrap().write(&batch))
                    .await
                    .unwrap()
            }
        };
        write("1").await.unwrap();
        // Every other backend of this database: the writer's, and idle
        // ones of the pool (which opens new ones when it needs them).
        // (both on one connection, which is not among them)
        let mut conn = store.pool.acquire().await.unwrap();
        let killed: Vec<i32> = sqlx::query_scalar(
            "SELECT pid FROM pg_stat_activity
             WHERE datname = current_database() AND pid <> pg_backend_pid()",
        )
        .fetch_all(&mut *conn)
        .await
        .unwrap();
        assert!(!killed.is_empty(), "the writer's connection was open");
        sqlx::query("SELECT pg_terminate_backend(pid) FROM unnest($1::int4[]) AS pid")
            .bind(&killed)
            .execute(&mut *conn)
            .await
            .unwrap();
        drop(conn);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM pg_stat_activity WHERE pid = ANY($1)",
        )
        .bind(&killed)
        .fetch_one(&store.pool)
        .await
        .unwrap()
            > 0
        {
            assert!(std::time::Instant::now() < deadline, "backends still there");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(
            write("2").await.is_err(),
            "a batch on a dead connection fails"
        );
        write("3").await.unwrap();
        assert!(store.task("1").await.unwrap().is_some());
        assert!(store.task("2").await.unwrap().is_none());
        assert!(store.task("3").await.unwrap().is_some());
    }

    /// Replica rows and the `control` lease by the database's clock: a
    /// name is one process's until its lease runs out, the lease has one
    /// holder whose fencing token grows at every change of holder, and a
    /// replica that ran out is forgotten with its tasks lost — unless it
    /// came back first.
    #[tokio::test]
    async fn replicas_hold_names_and_one_lease_with_fencing() {
        let store = PgStore::open(&wharf_testkit::postgres::shared().database())
            .await
            .unwrap();
        let long = Duration::from_secs(30);
        let short = Duration::from_millis(300);
        let (a, a2, b) = (replica("a", "1"), replica("a", "2"), replica("b", "3"));
        assert!(store.claim(&a, short).await.unwrap());
        assert!(!store.claim(&a2, long).await.unwrap(), "a is taken");
        assert!(store.claim(&b, long).await.unwrap());
        assert_eq!(store.lead(&a, short).await.unwrap(), Some(1));
        assert_eq!(store.lead(&a, short).await.unwrap(), Some(1), "renewed");
        assert_eq!(store.lead(&b, long).await.unwrap(), None, "a holds it");
        let rows = store.list().await.unwrap();
        assert_eq!(
            rows.iter()
                .map(|r| (r.name.as_str(), r.leader))
                .collect::<Vec<_>>(),
            [("a", true), ("b", false)]
        );
        let mut on_a = task("t-a", TaskStatus::Running);
        on_a.node = "a".into();
        let mut on_b = task("t-b", TaskStatus::Running);
        on_b.node = "b".into();
        // Started but not placed yet: held by the replica that started it.
        let mut unplaced_a = task("u-a", TaskStatus::Provisioning);
        unplaced_a.node = String::new();
        unplaced_a.replica = Some("a".into());
        let mut unplaced_b = unplaced_a.clone();
        unplaced_b.id = "u-b".into();
        unplaced_b.replica = Some("b".into());
        store
            .write(&[on_a, on_b, unplaced_a, unplaced_b].map(|t| Write::Task(Box::new(t))))
            .await
            .unwrap();
        assert_eq!(store.forget("a", "1", "x").await.unwrap(), None, "alive");
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(store.lead(&b, long).await.unwrap(), Some(2), "taken over");
        assert_eq!(store.lead(&a, short).await.unwrap(), None, "fenced out");
        assert!(store.list().await.unwrap()[0].expired);
        assert_eq!(
            store.forget("a", "2", "x").await.unwrap(),
            None,
            "not its id"
        );
        let lost = store.forget("a", "1", "x").await.unwrap().unwrap();
        let mut ids: Vec<&str> = lost.iter().map(|t| t.id.as_str()).collect();
        ids.sort();
        assert_eq!(ids, ["t-a", "u-a"]);
        assert!(
            lost.iter()
                .all(|t| t.stop_code.as_deref() == Some("NodeLost"))
        );
        assert_eq!(
            store.task("u-b").await.unwrap().unwrap().status,
            TaskStatus::Provisioning
        );
        assert_eq!(
            store.task("t-b").await.unwrap().unwrap().status,
            TaskStatus::Running,
            "b's task is b's"
        );
        // The name is free again; a renewal of the forgotten process fails.
        assert!(!store.renew(&a, short).await.unwrap());
        assert!(store.claim(&a2, long).await.unwrap());
        // Messages reach listeners.
        let mut rx = store.listen().await.unwrap();
        store.notify("hello").await.unwrap();
        let got = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .unwrap();
        assert_eq!(got, Some(Some("hello".to_owned())));
        assert_eq!(store.replica_key().await.unwrap().len(), 64);
        store.close().await;
    }

    /// Every change of the task definitions counts one generation in its
    /// own transaction; a replica's record of the generation it is fresh
    /// for never goes back; the laggards are the live replicas other than
    /// the asker that have not recorded a generation yet.
    #[tokio::test]
    async fn task_definition_changes_count_generations_that_replicas_record() {
        let store = PgStore::open(&wharf_testkit::postgres::shared().database())
            .await
            .unwrap();
        let long = Duration::from_secs(30);
        let (a, b, c) = (replica("a", "1"), replica("b", "2"), replica("c", "3"));
        for r in [&a, &b, &c] {
            assert!(store.claim(r, long).await.unwrap());
        }
        assert_eq!(store.defs_generation().await.unwrap(), 0);
        let mut rx = store.listen().await.unwrap();
        let mut d = store.register_task_definition(def("f")).await.unwrap();
        assert_eq!(store.defs_generation().await.unwrap(), 1);
        let told = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .unwrap();
        assert_eq!(told, Some(Some(crate::cluster::DEFS_CHANGED.to_owned())));
        d.status = TaskDefinitionStatus::Inactive;
        store.update_task_definition(&d).await.unwrap();
        let mut imported = def("g");
        imported.revision = 4;
        imported.task_definition = "g:4".into();
        store.import_task_definition(&imported).await.unwrap();
        assert_eq!(store.defs_generation().await.unwrap(), 3);

        assert_eq!(store.defs_laggards(&a, 3).await.unwrap(), ["b", "c"]);
        store.ack_defs(&b, 3).await.unwrap();
        store.ack_defs(&b, 2).await.unwrap();
        assert_eq!(store.defs_laggards(&a, 3).await.unwrap(), ["c"]);
        assert_eq!(store.defs_laggards(&c, 3).await.unwrap(), ["a"]);
        store.leave(&c).await.unwrap();
        assert!(
            store.defs_laggards(&a, 3).await.unwrap().is_empty(),
            "only live replicas"
        );
        // Concurrent changes each count once.
        let all = futures_util::future::join_all(
            (0..8).map(|i| store.register_task_definition(def(&format!("h{i}")))),
        )
        .await;
        assert!(all.iter().all(|r| r.is_ok()));
        assert_eq!(store.defs_generation().await.unwrap(), 11);
        store.close().await;
    }

    #[test]
    fn a_database_url_is_shown_without_its_password() {
        assert_eq!(
            redacted("postgres://u:pw@h:5432/db"),
            "postgres://u:***@h:5432/db"
        );
        assert_eq!(
            redacted("postgres://h/db?user=u&password=pw&sslmode=require"),
            "postgres://h/db?user=u&password=***&sslmode=require"
        );
        assert_eq!(redacted("postgres://u@h/db"), "postgres://u@h/db");
    }
}

#[cfg(test)]
mod sqlite_writer_tests {
    use std::sync::Arc;

    use super::*;
    use crate::model::TaskStatus;

    /// `batches` batches of `per` stopped tasks through the writer, ids
    /// `BBNNN` (batch, then task).
    fn write_stopped(sink: &mut dyn BatchWriter, batches: usize, per: usize) {
        for n in 0..batches {
            let batch: Vec<Write> = (0..per)
                .map(|i| {
                    Write::Task(Box::new(tests::task(
                        &format!("{n:02}{i:03}"),
                        TaskStatus::Stopped,
                    )))
                })
                .collect();
            sink.write(&batch).unwrap();
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_wal_is_copied_back_beside_the_writer_without_a_commit_crossing_a_threshold() {
        // Far below the 64 MiB backstop at which a commit checkpoints by
        // itself: only the background checkpointer can move these pages
        // into the database file.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        let store = SqliteStore::open(&path).await.unwrap();
        let mut sink = store
            .batch_writer()
            .expect("SQLite writes on the writer's thread");
        let db_len = || std::fs::metadata(&path).unwrap().len();
        let before = db_len();
        write_stopped(&mut *sink, 20, 100);
        let wal = std::fs::metadata(dir.path().join("state.db-wal"))
            .unwrap()
            .len();
        assert!(wal > 100 << 10, "the batches are in the WAL ({wal} bytes)");
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while db_len() <= before + (100 << 10) {
            assert!(
                std::time::Instant::now() < deadline,
                "no checkpoint within 5 s: the database file is {} bytes, {before} before",
                db_len()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // What was copied back reads the same.
        assert_eq!(store.task("19099").await.unwrap().unwrap().id, "19099");
        store.close().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_prune_takes_turns_with_the_writer_instead_of_holding_the_lock_throughout() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(
            SqliteStore::open(&dir.path().join("state.db"))
                .await
                .unwrap(),
        );
        let mut sink = store.batch_writer().unwrap();
        // 20,000 stopped tasks: two reads, 79 transactions of deletes.
        write_stopped(&mut *sink, 40, 500);
        let count = || async {
            sqlx::query_scalar::<_, i64>("SELECT count(*) FROM tasks")
                .fetch_one(&store.pool)
                .await
                .unwrap()
        };
        let prune = tokio::spawn({
            let store = store.clone();
            async move { store.prune_tasks(0).await.unwrap() }
        });
        // Once its first deletes are committed, a new record goes in
        // while the prune is still going: it waited for one batch, not
        // for the whole prune.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while count().await == 20_000 {
            assert!(
                std::time::Instant::now() < deadline,
                "the prune deleted nothing"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        tokio::task::block_in_place(|| {
            sink.write(&[Write::Task(Box::new(tests::task(
                "99999",
                TaskStatus::Running,
            )))])
            .unwrap()
        });
        assert!(
            !prune.is_finished(),
            "the writer waited until the prune had finished"
        );
        assert!(count().await > 1, "a record went in between batches");
        assert_eq!(prune.await.unwrap(), 20_000);
        // The unstopped task is not pruned; nothing else is left.
        assert_eq!(count().await, 1);
        assert!(store.task("99999").await.unwrap().is_some());
        store.close().await;
    }
}
