//! Wharf's control plane — the ECS half: task definitions, tasks,
//! services with rolling deployments, secrets, tokens with roles, an audit
//! log and metrics, over an axum API at `/v1/`, with state in SQLite.
//!
//! - [`Api::open`] recovers state (tasks that were running when the server
//!   died are `STOPPED` with `NodeLost`; services come back and the
//!   reconciler restores their desired counts), builds the registry with
//!   token scopes, and starts the reconciler.
//! - [`control::Control`] holds every operation; [`http`] maps routes onto
//!   it and serves the OpenAPI document; [`services`] holds the reconciler.
//! - [`tasks`] drives each task on the local node's
//!   [`wharf_runtime::Executor`]; artifacts come from the registry by
//!   digest ([`artifacts`]) and compile once.
//! - [`db::StateStore`] is the state boundary; [`db::SqliteStore`] its
//!   embedded implementation. High-rate writes go through a group-commit
//!   [`writer`].
//!
//! This crate glues the registry and the runtime; it reads no environment
//! variables and installs no tracing subscriber.

pub mod artifacts;
pub mod auth;
pub mod autoscale;
pub mod cluster;
pub mod conn;
pub mod control;
pub mod db;
pub mod error;
pub mod fleet;
pub mod http;
pub mod ingress;
pub mod metrics;
pub mod model;
pub mod node_ingress;
pub mod nodes;
pub mod secrets;
pub mod services;
mod serving;
pub mod taskdef;
mod tasks;
mod writer;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::routing::get;
use tokio::sync::{mpsc, watch};
use wharf_registry::Registry;
use wharf_registry::storage::Storage;
use wharf_runtime::{Executor, ExecutorConfig, Runtime};

pub use error::{ApiError, ErrorCode};

use crate::control::Control;
use crate::db::{PgStore, SqliteStore, StateStore};
use crate::metrics::Metrics;
use crate::tasks::Tasks;
use crate::writer::Writer;

/// How the control plane runs. Every default is the one documented here.
#[derive(Debug, Clone)]
pub struct ApiConfig {
    /// Holds `state.db` (SQLite, unless `state` names a database) and
    /// scratch files.
    pub data_dir: PathBuf,
    /// A PostgreSQL database for the state (`postgres://...`) instead of
    /// `state.db` in the data directory (default `None`).
    pub state: Option<String>,
    /// The data directory's admin token.
    pub admin_token: String,
    /// Concurrent tasks on the local node (default: the runtime's
    /// instance pool size).
    pub slots: Option<usize>,
    /// Output retained per task, both streams (default 64 KiB: a long run
    /// of diagnostics, small enough for thousands of tasks).
    pub log_retention_bytes: usize,
    /// Stopped tasks kept in the store, newest first (default 100,000).
    pub keep_stopped_tasks: u64,
    /// Retained output of stopped tasks kept in the store, newest first,
    /// in bytes (default 256 MiB: the 100,000 task records alone may hold
    /// 64 KiB each, 6 GiB, which a soak filled at 1 MiB/s).
    pub keep_log_bytes: u64,
    /// Audit entries kept in the store, newest first (default 100,000).
    pub keep_audit_entries: u64,
    /// First delay before restarting a service's failing task (default
    /// 1 s); doubles with every consecutive failure.
    pub restart_backoff: Duration,
    /// The longest restart delay (default 60 s).
    pub max_restart_backoff: Duration,
    /// How long shutdown waits for stopped tasks' records (default 10 s).
    pub shutdown_grace: Duration,
    /// The node's per-task memory maximum (set from the runtime).
    pub max_task_memory: u64,
    /// Bytes of linear memory the local node's running tasks may reserve
    /// together; each reserves its memory limit (default `None`: no budget;
    /// `wharf server` passes half of the machine's memory).
    pub memory_budget: Option<u64>,
    /// Threads that run guest code, apart from the API's own (default
    /// `None`: guests share the caller's runtime; `wharf server` passes
    /// the number of cores, at most the slots).
    pub guest_threads: Option<usize>,
    /// The memory limit of tasks whose definition and overrides set none
    /// (default `None`: the node's per-task maximum).
    pub default_memory: Option<u64>,
    /// Which internal networks task definitions may name registries in
    /// (default: none; loopback, private and link-local destinations are
    /// refused).
    pub remote_policy: wharf_registry::remote::RemotePolicy,
    /// The timeout of tasks whose definition and overrides set none
    /// (default `None`: no timeout, as long-running service tasks need).
    pub default_timeout: Option<Duration>,
    /// How long a stopping HTTP task may finish the requests it has in
    /// flight, after it takes no new ones (default 10 s, as an ALB's
    /// deregistration delay).
    pub deregistration_delay: Duration,
    /// How long a starting HTTP task's health check may keep failing
    /// before the task fails to start (default 30 s).
    pub health_check_grace: Duration,
    /// Which internal networks components' allowed outbound destinations
    /// may resolve to (default: none; loopback, private and link-local
    /// addresses are refused even when a definition names them).
    pub outbound_policy: wharf_registry::remote::RemotePolicy,
    /// The server's own node: its labels.
    pub local_node: nodes::LocalNodeConfig,
    /// How often edge nodes sync when nothing happens (default 2 s).
    pub heartbeat: Duration,
    /// An edge node silent this long is `LOST` and its tasks stop
    /// `NodeLost` (default 10 s).
    pub node_timeout: Duration,
    /// The SHA-256 of the server's CA certificate (DER, hex), which join
    /// tokens carry so nodes can pin the server (`None`: no TLS).
    pub ca_fingerprint: Option<String>,
    /// The server's CA certificate (PEM), which nodes fetch at join and
    /// check against their token's fingerprint (`None`: no TLS).
    pub ca_pem: Option<String>,
    /// Where other replicas reach this server's API (`http://HOST:PORT`),
    /// with PostgreSQL state (default `None`: `http://127.0.0.1:7070`).
    pub advertise: Option<String>,
    /// The TLS client configuration replicas forward to each other with
    /// (`https://` addresses; it trusts the server's CA, which replicas
    /// share), or `None`: plain HTTP.
    pub replica_tls: Option<std::sync::Arc<rustls::ClientConfig>>,
    /// Where other replicas relay HTTP services' requests to this one's
    /// ingress (`http://HOST:PORT`; default `None`: it has none).
    pub advertise_ingress: Option<String>,
    /// How long a replica's lease lasts unrenewed (default 3 s): a dead
    /// replica's tasks are lost, and a dead leader's duties move, after
    /// about this long.
    pub lease_ttl: Duration,
}

impl ApiConfig {
    /// The defaults, for `data_dir` and `admin_token`.
    pub fn new(data_dir: PathBuf, admin_token: String) -> Self {
        ApiConfig {
            data_dir,
            state: None,
            admin_token,
            slots: None,
            log_retention_bytes: 64 << 10,
            keep_stopped_tasks: 100_000,
            keep_log_bytes: 256 << 20,
            keep_audit_entries: 100_000,
            restart_backoff: Duration::from_secs(1),
            max_restart_backoff: Duration::from_secs(60),
            shutdown_grace: Duration::from_secs(10),
            max_task_memory: 0,
            memory_budget: None,
            guest_threads: None,
            default_memory: None,
            default_timeout: None,
            remote_policy: Default::default(),
            deregistration_delay: Duration::from_secs(10),
            health_check_grace: Duration::from_secs(30),
            outbound_policy: Default::default(),
            local_node: Default::default(),
            heartbeat: Duration::from_secs(2),
            node_timeout: Duration::from_secs(10),
            ca_fingerprint: None,
            ca_pem: None,
            advertise: None,
            advertise_ingress: None,
            replica_tls: None,
            lease_ttl: cluster::DEFAULT_LEASE_TTL,
        }
    }
}

/// The running control plane.
pub struct Api {
    control: Arc<Control>,
    shutdown: Arc<watch::Sender<bool>>,
    background: Vec<tokio::task::JoinHandle<()>>,
}

impl std::fmt::Debug for Api {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Api").finish_non_exhaustive()
    }
}

/// How often stopped tasks, their output and audit entries beyond the
/// retention are pruned: often enough that a busy node overshoots its
/// output budget by seconds of output, not minutes.
const PRUNE_EVERY: Duration = Duration::from_secs(15);

/// How often edge nodes' heartbeats are checked.
const SWEEP_EVERY: Duration = Duration::from_millis(250);

/// How often the autoscaler looks at the ingress's traffic.
const AUTOSCALE_EVERY: Duration = Duration::from_secs(1);

impl Api {
    /// Opens the state store, recovers, and starts the reconciler. Must be
    /// called within a tokio runtime.
    pub async fn open(
        mut config: ApiConfig,
        runtime: Arc<Runtime>,
        registry_storage: Arc<dyn Storage>,
    ) -> Result<Api, db::DbError> {
        config.max_task_memory = runtime.config().max_task_memory;
        std::fs::create_dir_all(&config.data_dir)?;
        let store: Arc<dyn StateStore> = match &config.state {
            Some(url) => Arc::new(PgStore::open(url).await?),
            None => Arc::new(SqliteStore::open(&config.data_dir.join("state.db")).await?),
        };
        let at = model::now();
        let (cluster, lost, kept) = if store.replicas().is_some() {
            let me = db::Replica {
                name: config.local_node.name().to_owned(),
                id: uuid::Uuid::new_v4().simple().to_string(),
                api_url: config
                    .advertise
                    .clone()
                    .unwrap_or_else(|| "http://127.0.0.1:7070".into()),
                ingress_url: config.advertise_ingress.clone(),
                expired: false,
                leader: false,
            };
            let cluster =
                cluster::Cluster::join(&*store, me, config.lease_ttl, config.replica_tls.clone())
                    .await?;
            // This replica's own node: what a previous process of it ran
            // is lost. Edge nodes are the leader's business.
            let own = std::iter::once(cluster.me.name.clone()).collect();
            let (lost, _) = store
                .replicas()
                .expect("replicas")
                .sweep_nodes(
                    &at,
                    &own,
                    false,
                    "the server stopped while the task was running (node lost)",
                )
                .await?;
            (Some(cluster), lost, Vec::new())
        } else {
            // Edge nodes run on while the server is down: their started
            // tasks are taken back below, the rest (the local node's) are
            // lost.
            let remote = edge_nodes(&*store).await?;
            let (lost, kept) = store.recover_lost_tasks(&at, &remote).await?;
            (None, lost, kept)
        };
        if !lost.is_empty() {
            tracing::warn!(
                tasks = lost.len(),
                "tasks were running when the server stopped: NodeLost"
            );
        }
        let writer = Writer::start(store.clone())?;
        let fleet = Arc::new(fleet::Fleet::new(config.heartbeat, config.node_timeout));
        let tokens = Arc::new(auth::Tokens::with_admin(&config.admin_token));
        for (token, hash) in store.tokens().await? {
            tokens.load(&token, &hash);
        }
        let registry = Registry::new(
            registry_storage,
            Arc::new(auth::RegistryAuthorizer(tokens.clone(), fleet.clone())),
        );
        if cluster.is_some() {
            registry.set_shared();
        }
        let remote = wharf_registry::remote::Remote::new(config.remote_policy.clone())
            .map_err(|e| sqlx::Error::Protocol(e.to_string()))?;
        let artifacts = Arc::new(artifacts::Artifacts::new(
            registry.clone(),
            runtime.clone(),
            remote,
            config.data_dir.join("tmp"),
        ));
        let executor = Executor::with_config(
            runtime,
            &ExecutorConfig {
                slots: config.slots.unwrap_or(0),
                memory_budget: config.memory_budget,
                guest_threads: config.guest_threads,
            },
        )
        .map_err(|e| sqlx::Error::Protocol(e.to_string()))?;
        let metrics = Metrics::new();
        let (stopped_tx, stopped_rx) = mpsc::unbounded_channel();
        let wake = Arc::new(tokio::sync::Notify::new());
        let tasks = Arc::new(Tasks::new(
            executor,
            artifacts.clone(),
            writer.clone(),
            store.clone(),
            metrics.clone(),
            config.log_retention_bytes,
            stopped_tx,
            wake.clone(),
            config.deregistration_delay,
            config.health_check_grace,
            {
                let policy = config.outbound_policy.clone();
                Arc::new(move |ip| policy.permits(ip))
            },
            fleet.clone(),
            config.local_node.disabled,
            config.default_memory.unwrap_or(config.max_task_memory),
            config.local_node.name().to_owned(),
            cluster.as_ref().map(|c| c.me.name.clone()),
        ));
        tasks.set_node_labels(config.local_node.labels.clone());
        // The key lives beside state.db, never in it.
        let key_path = config.data_dir.join("secrets.key");
        let secret_box = Arc::new(secrets::SecretBox::open_or_create(&key_path)?);
        let key_bytes = std::fs::read(&key_path)?;
        registry.set_session_key(&key_bytes);
        if let Some(replicas) = store.replicas() {
            // Every replica opens the others' secrets and takes their
            // admin token: they must have the same files.
            let key = auth::hash(&hex::encode(&key_bytes));
            for (what, file, mine) in [
                ("secrets_key_sha256", "secrets.key", key),
                (
                    "admin_token_sha256",
                    "admin.token",
                    auth::hash(&config.admin_token),
                ),
            ] {
                if replicas.pin(what, &mine).await? != mine {
                    return Err(sqlx::Error::Configuration(
                        format!(
                            "this data directory's {file} is not the one the other replicas on this database use: copy {file} from another replica's data directory (replicas share it, as they share the database)"
                        )
                        .into(),
                    ));
                }
            }
        }
        let control = Arc::new(Control::new(
            config,
            store.clone(),
            writer,
            tasks,
            artifacts,
            registry,
            tokens,
            metrics,
            wake,
            secret_box,
            cluster.clone(),
        ));
        match control.seal_plain_secrets().await {
            Ok(0) => {}
            Ok(n) => tracing::info!(secrets = n, "sealed secrets stored in plain text"),
            Err(e) => return Err(sqlx::Error::Protocol(e.message)),
        }
        lost_events(&control, &lost, "the server restarted");
        let (shutdown, shutdown_rx) = watch::channel(false);
        let mut background = Vec::new();
        match &cluster {
            None => {
                take_over(&control, kept).await?;
                background.extend(lead(control.clone(), stopped_rx, &shutdown_rx));
            }
            Some(cluster) => {
                background.extend(
                    replicate(control.clone(), cluster.clone(), stopped_rx, &shutdown_rx).await?,
                );
            }
        }
        Ok(Api {
            control,
            shutdown: Arc::new(shutdown),
            background,
        })
    }

    /// Everything the server answers: `/v1/`, `/v2/`, `/metrics`,
    /// `/healthz`.
    pub fn router(&self) -> Router {
        let control = self.control.clone();
        Router::new()
            .route("/healthz", get(|| async { "ok\n" }))
            .route("/metrics", get(render_metrics).with_state(control.clone()))
            .merge(http::join_router(control.clone()))
            .merge(http::router(control.clone()))
            .merge(wharf_registry::http::router(control.registry.clone()))
            .layer(axum::middleware::from_fn_with_state(
                control.clone(),
                http::observe,
            ))
            .layer(axum::middleware::from_fn_with_state(
                control,
                cluster::route,
            ))
    }

    /// Resolves with the reason once this replica must stop at once (its
    /// lease ran out: other replicas count its tasks as lost); never
    /// without several replicas.
    pub fn fenced(&self) -> impl std::future::Future<Output = String> + Send + 'static {
        let fenced = self.control.cluster.as_ref().map(|c| c.fenced());
        async move {
            match fenced {
                Some(f) => f.await,
                None => std::future::pending().await,
            }
        }
    }

    /// Serves the ingress (the data plane for HTTP services) on
    /// `listener` until shutdown begins.
    pub fn serve_ingress(&self, listener: tokio::net::TcpListener) -> tokio::task::JoinHandle<()> {
        if let Ok(addr) = listener.local_addr() {
            let _ = self.control.ingress_addr.set(addr);
            self.listening_on(addr);
        }
        tokio::spawn(ingress::serve(
            self.control.clone(),
            listener,
            self.shutdown.subscribe(),
        ))
    }

    /// Records one of the server's own listening addresses: edge nodes
    /// may not advertise it as their ingress (the server would forward
    /// requests to itself).
    pub fn listening_on(&self, addr: std::net::SocketAddr) {
        self.control
            .own_addrs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(addr);
    }

    /// A handle that drains the node: the reconciler stops, no new task is
    /// accepted, every live task is stopped with a recorded reason (which
    /// also ends log streams that follow them). Run it when shutdown
    /// begins, so in-flight requests can finish.
    pub fn drainer(&self) -> Drainer {
        Drainer {
            control: self.control.clone(),
            shutdown: self.shutdown.clone(),
        }
    }

    /// Graceful stop: drains (if not done yet), waits for the background
    /// jobs, writes queued state and closes the store.
    pub async fn shutdown(self) {
        self.drainer().drain().await;
        for job in self.background {
            let _ = job.await;
        }
        let _ = self.control.writer.commit(Vec::new()).await;
        if let Some(cluster) = &self.control.cluster {
            cluster.leave(&*self.control.store).await;
        }
        self.control.store.close().await;
        drop(self.control);
    }
}

/// The edge nodes the store knows (those with a credential).
async fn edge_nodes(
    store: &dyn StateStore,
) -> Result<std::collections::BTreeSet<String>, db::DbError> {
    Ok(store
        .nodes()
        .await?
        .into_iter()
        .filter(|n| n.credential_hash.is_some())
        .map(|n| n.name)
        .collect())
}

/// A service event for each lost service task.
fn lost_events(control: &Control, lost: &[model::Task], why: &str) {
    for task in lost.iter().filter(|t| t.service.is_some()) {
        control.writer.send(db::Write::Event {
            service: task.service.clone().unwrap_or_default(),
            at: model::now(),
            message: format!(
                "service {} task {} stopped: NodeLost ({why})",
                task.service.as_deref().unwrap_or_default(),
                task.id
            ),
        });
    }
}

fn protocol(e: ApiError) -> db::DbError {
    sqlx::Error::Protocol(e.message)
}

/// What the server that runs the reconcilers loads first: the edge
/// nodes, their started tasks `kept` (they run on, and follow the nodes'
/// reports), and the services.
async fn take_over(control: &Arc<Control>, kept: Vec<model::Task>) -> Result<(), db::DbError> {
    control.load_nodes().await.map_err(protocol)?;
    for task in kept {
        let memory = task.limits.memory_bytes.unwrap_or(
            control
                .config
                .default_memory
                .unwrap_or(control.config.max_task_memory),
        );
        let logs = control.store.task_logs(&task.id).await?;
        // An HTTP task takes the ingress's traffic again.
        let http = match control.task_definition(&task.task_definition).await {
            Ok(def) if def.kind == model::TaskKind::Http => def.http.clone(),
            _ => None,
        };
        control.tasks.adopt(task, memory, logs, http);
    }
    control.load_services().await.map_err(protocol)
}

/// Starts the leader's duties: the reconciler, the autoscaler, the edge
/// nodes' sweep and the janitor.
fn lead(
    control: Arc<Control>,
    stopped_rx: mpsc::UnboundedReceiver<Arc<model::Task>>,
    shutdown_rx: &watch::Receiver<bool>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let reconciler = tokio::spawn(services::reconciler(
        control.clone(),
        stopped_rx,
        shutdown_rx.clone(),
    ));
    let autoscaler = tokio::spawn({
        let control = control.clone();
        let mut shutdown = shutdown_rx.clone();
        async move {
            loop {
                tokio::select! {
                    _ = shutdown.changed() => return,
                    () = tokio::time::sleep(AUTOSCALE_EVERY) => {}
                }
                control.autoscale().await;
            }
        }
    });
    let sweeper = tokio::spawn({
        let fleet = control.tasks.fleet().clone();
        let mut shutdown = shutdown_rx.clone();
        async move {
            loop {
                tokio::select! {
                    _ = shutdown.changed() => return,
                    () = tokio::time::sleep(SWEEP_EVERY) => {}
                }
                for (node, tasks) in fleet.sweep() {
                    tracing::warn!(%node, tasks, "node lost: no heartbeat within the timeout");
                }
            }
        }
    });
    let janitor = tokio::spawn({
        let store = control.store.clone();
        let tasks = control.tasks.clone();
        let keep = control.config.keep_stopped_tasks;
        let keep_audit = control.config.keep_audit_entries;
        let keep_log_bytes = control.config.keep_log_bytes;
        let mut shutdown = shutdown_rx.clone();
        async move {
            loop {
                tokio::select! {
                    _ = shutdown.changed() => return,
                    () = tokio::time::sleep(PRUNE_EVERY) => {}
                }
                match store.prune_tasks(keep).await {
                    Ok(0) => {}
                    Ok(n) => {
                        tasks.forget_recent();
                        tracing::info!(tasks = n, "pruned stopped tasks");
                    }
                    Err(e) => tracing::error!(error = %e, "cannot prune stopped tasks"),
                }
                match store.prune_logs(keep_log_bytes).await {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(tasks = n, "pruned the output of stopped tasks"),
                    Err(e) => tracing::error!(error = %e, "cannot prune task output"),
                }
                match store.prune_audit(keep_audit).await {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(entries = n, "pruned the audit log"),
                    Err(e) => tracing::error!(error = %e, "cannot prune the audit log"),
                }
            }
        }
    });
    vec![reconciler, autoscaler, sweeper, janitor]
}

/// A replica's background: the lease keeper, the notification listener,
/// and a standby that takes the leader's duties once the lease is this
/// replica's.
async fn replicate(
    control: Arc<Control>,
    cluster: Arc<cluster::Cluster>,
    mut stopped_rx: mpsc::UnboundedReceiver<Arc<model::Task>>,
    shutdown_rx: &watch::Receiver<bool>,
) -> Result<Vec<tokio::task::JoinHandle<()>>, db::DbError> {
    // Alone on the database (or the first of several): lead before the
    // first request, as a single server does.
    let leads = cluster.lead_at_start(&*control.store).await?;
    let (lead_tx, mut lead_rx) = tokio::sync::oneshot::channel();
    // The keeper runs from now on: a takeover may wait for seconds, and
    // the lease must not lapse meanwhile.
    let keeper = tokio::spawn(cluster.clone().keep(
        control.store.clone(),
        Some(lead_tx),
        shutdown_rx.clone(),
        {
            let control = control.clone();
            move |lost| lost_events(&control, &lost, "its replica stopped")
        },
    ));
    if leads {
        become_leader(&control, &cluster).await?;
        cluster.set_ready();
    }
    let listener = tokio::spawn({
        let control = control.clone();
        let mut shutdown = shutdown_rx.clone();
        let ttl = cluster.ttl;
        async move {
            let Some(replicas) = control.store.replicas() else {
                return;
            };
            let mut rx = loop {
                match replicas.listen().await {
                    Ok(rx) => break rx,
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot listen to the other replicas");
                        tokio::select! {
                            _ = shutdown.changed() => return,
                            () = tokio::time::sleep(Duration::from_secs(1)) => {}
                        }
                    }
                }
            };
            control.catch_up_defs().await;
            let mut look = tokio::time::interval(ttl / 6);
            loop {
                let message = tokio::select! {
                    _ = shutdown.changed() => return,
                    m = rx.recv() => m,
                    _ = look.tick() => {
                        control.catch_up_defs().await;
                        continue;
                    }
                };
                if !matches!(&message, Some(Some(m)) if m == cluster::TOKENS_CHANGED) {
                    control.catch_up_defs().await;
                }
                match message {
                    None => return,
                    // Tokens changed, or messages may have been missed.
                    Some(Some(m)) if m != cluster::TOKENS_CHANGED => {}
                    Some(_) => match control.store.tokens().await {
                        Ok(all) => {
                            for (token, hash) in all {
                                control.tokens.load(&token, &hash);
                            }
                        }
                        Err(e) => tracing::warn!(error = %e, "cannot reload the tokens"),
                    },
                }
            }
        }
    });
    if leads {
        let mut jobs = vec![keeper, listener];
        jobs.extend(lead(control, stopped_rx, shutdown_rx));
        return Ok(jobs);
    }
    let standby = tokio::spawn({
        let mut shutdown = shutdown_rx.clone();
        let shutdown_rx = shutdown_rx.clone();
        async move {
            // The local node's stops matter to no reconciler until this
            // replica leads.
            loop {
                tokio::select! {
                    _ = shutdown.changed() => return,
                    // Dropped unsent: the keeper ended (shutdown, or
                    // fenced) without this replica ever leading.
                    led = &mut lead_rx => match led {
                        Ok(()) => break,
                        Err(_) => return,
                    },
                    _ = stopped_rx.recv() => {}
                }
            }
            if !cluster.is_leader() {
                return;
            }
            if let Err(e) = become_leader(&control, &cluster).await {
                // Leading with nothing loaded would serve nobody: let
                // another replica take over.
                cluster.fence_off(format!("cannot take over as the leader: {e}"));
                return;
            }
            cluster.set_ready();
            for job in lead(control, stopped_rx, &shutdown_rx) {
                let _ = job.await;
            }
        }
    });
    Ok(vec![keeper, listener, standby])
}

/// What a replica does when it takes the `control` lease, before its
/// duties start: the dead replicas' tasks lost ([`settle`]), the edge
/// nodes' unstarted tasks lost and their running ones and the services
/// taken over.
async fn become_leader(
    control: &Arc<Control>,
    cluster: &cluster::Cluster,
) -> Result<(), db::DbError> {
    let started = std::time::Instant::now();
    let lost = settle(control, cluster).await;
    lost_events(control, &lost, "its replica stopped");
    let edge = edge_nodes(&*control.store).await?;
    let (lost, kept) = control
        .store
        .replicas()
        .expect("replicas")
        .sweep_nodes(
            &model::now(),
            &edge,
            true,
            "the replica that placed it stopped before the node started it (node lost)",
        )
        .await?;
    lost_events(control, &lost, "the leader changed");
    take_over(control, kept).await?;
    tracing::info!(
        replica = %cluster.me.name,
        fence = cluster.fence(),
        took_ms = started.elapsed().as_millis() as u64,
        "took over the services and the edge nodes"
    );
    Ok(())
}

/// Before a new leader starts anything: the replicas whose lease ran out
/// are forgotten (their tasks lost), and it waits — at most two lease
/// lengths — until no other replica holds an unstopped service task (the
/// previous leader's, once its lease ran out too), so no desired slot is
/// ever filled twice.
async fn settle(control: &Control, cluster: &cluster::Cluster) -> Vec<model::Task> {
    let deadline = std::time::Instant::now() + cluster.ttl * 2;
    let mut lost = Vec::new();
    loop {
        let all = match control.store.replicas() {
            Some(r) => r.list().await.unwrap_or_default(),
            None => Vec::new(),
        };
        let others: std::collections::BTreeSet<String> = all
            .iter()
            .filter(|r| r.id != cluster.me.id)
            .map(|r| r.name.clone())
            .collect();
        lost.extend(cluster::forget_expired(&*control.store, &cluster.me, all).await);
        let mut held = 0;
        for status in [
            model::TaskStatus::Provisioning,
            model::TaskStatus::Pending,
            model::TaskStatus::Running,
        ] {
            let filter = db::TaskFilter {
                status: Some(status),
                limit: u32::MAX,
                ..Default::default()
            };
            held += control
                .store
                .tasks(&filter)
                .await
                .unwrap_or_default()
                .iter()
                .filter(|t| t.service.is_some() && held_by(t, &others))
                .count();
        }
        if held == 0 {
            return lost;
        }
        if std::time::Instant::now() >= deadline {
            tracing::warn!(
                tasks = held,
                "other replicas still hold service tasks: taking over anyway"
            );
            return lost;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Whether a task is held by one of `replicas`: it runs on one's own
/// node, or one started it and has not placed it yet.
fn held_by(task: &model::Task, replicas: &std::collections::BTreeSet<String>) -> bool {
    replicas.contains(&task.node)
        || (task.node.is_empty() && task.replica.as_ref().is_some_and(|r| replicas.contains(r)))
}

/// Drains the node; see [`Api::drainer`].
#[derive(Debug, Clone)]
pub struct Drainer {
    control: Arc<Control>,
    shutdown: Arc<watch::Sender<bool>>,
}

impl Drainer {
    /// Stops the reconciler and every live task.
    pub async fn drain(self) {
        let _ = self.shutdown.send(true);
        self.control
            .tasks
            .shutdown(self.control.config.shutdown_grace)
            .await;
    }
}

async fn render_metrics(State(control): State<Arc<Control>>) -> String {
    control.refresh_service_metrics().await;
    let executor = control.tasks.executor();
    control
        .metrics
        .memory_reserved
        .set(i64::try_from(executor.stats().memory_reserved).unwrap_or(i64::MAX));
    control
        .metrics
        .memory_budget
        .set(i64::try_from(executor.memory_budget().unwrap_or(0)).unwrap_or(i64::MAX));
    let (bytes_in, bytes_out) = control.registry.metrics.totals();
    Metrics::mirror(
        &control.metrics.registry_bytes.with_label_values(&["in"]),
        bytes_in,
    );
    Metrics::mirror(
        &control.metrics.registry_bytes.with_label_values(&["out"]),
        bytes_out,
    );
    control.metrics.render()
}
