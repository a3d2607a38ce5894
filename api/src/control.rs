//! The control plane's operations, one method per API action: task
//! definitions, tasks, secrets and tokens here; services in
//! [`crate::services`]. HTTP handlers are thin wrappers over these.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dashmap::DashMap;
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;
use utoipa::ToSchema;
use wharf_registry::Registry;

use crate::ApiConfig;
use crate::artifacts::Artifacts;
use crate::auth::{self, Tokens};
use crate::db::{StateStore, TaskFilter};
use crate::error::{ApiError, ErrorCode, Result};
use crate::metrics::Metrics;
use crate::model::{
    self, Role, Secret, Task, TaskDefinition, TaskDefinitionStatus, TaskKind, Token,
};
use crate::secrets::{self, SecretBox};
use crate::services::ServiceState;
use crate::taskdef::{Overrides, TaskDefinitionInput, check_name};
use crate::tasks::{Launch, StopReason, Tasks};
use crate::writer::Writer;

/// The most tasks one run request may start.
pub const MAX_RUN_COUNT: u32 = 100;

/// `POST /v1/tasks`.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RunTaskRequest {
    /// `family` (latest active revision) or `family:revision`.
    pub task_definition: String,
    /// How many tasks to start (1 to 100; default 1).
    #[serde(default)]
    pub count: Option<u32>,
    /// Changes for these runs.
    #[serde(default)]
    pub overrides: Option<Overrides>,
    /// Run on this node only (it must be READY and provide what the
    /// artifact imports), as ECS's StartTask on a container instance.
    #[serde(default)]
    pub node: Option<String>,
    /// Run the artifact many times as a benchmark (`wharf bench run
    /// --nodes`) instead of once: each run's phases are a line of output.
    #[serde(default)]
    pub bench: Option<model::BenchRequest>,
}

/// `POST /v1/secrets`.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateSecretRequest {
    /// The secret's name.
    pub name: String,
    /// Its value (never returned).
    pub value: String,
    /// The repositories whose task definitions may use it (`team/*` or an
    /// exact name), within the caller's own scopes; absent: global, which
    /// only an admin may create and use.
    #[serde(default)]
    pub scope: Option<String>,
}

/// `POST /v1/tokens`.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateTokenRequest {
    /// A name for people.
    pub name: String,
    /// `admin`, `deployer` or `reader`.
    pub role: Role,
    /// Registry repositories it may reach (`team/*` for a prefix); empty
    /// or absent: all.
    #[serde(default)]
    pub repositories: Vec<String>,
}

/// A new token, with its secret (shown once).
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
pub struct CreatedToken {
    /// The token's record.
    pub token: Token,
    /// The secret to send as `Authorization: Bearer …`.
    pub secret: String,
}

/// Everything the control plane owns.
pub struct Control {
    pub(crate) config: ApiConfig,
    pub(crate) store: Arc<dyn StateStore>,
    pub(crate) writer: Writer,
    pub(crate) tasks: Arc<Tasks>,
    pub(crate) artifacts: Arc<Artifacts>,
    pub(crate) registry: Arc<Registry>,
    pub(crate) tokens: Arc<Tokens>,
    pub(crate) metrics: Metrics,
    pub(crate) secret_box: Arc<SecretBox>,
    /// Registered revisions by `family:revision` (immutable but for status).
    defs: DashMap<String, Arc<TaskDefinition>>,
    /// The latest active revision per family.
    latest: DashMap<String, u32>,
    /// Counts the times the two caches above were dropped; a read from
    /// the database fills them only if none happened since it started
    /// (so a drop never loses to a read of what it dropped). Held while
    /// dropping and while filling.
    defs_epoch: std::sync::Mutex<u64>,
    /// With replicas: the change of the task definitions (see
    /// [`Replicas::defs_generation`]) the caches are fresh for, or -1.
    defs_seen: std::sync::atomic::AtomicI64,
    /// With replicas: until when (ms after `defs_base`) the caches may be
    /// used — a TTL after the start of the last catch-up that succeeded.
    /// Past it (the listener stopped in a drain, the database is out of
    /// reach), reads go to the database: a replica that made a change
    /// waits at most a TTL and a third for the others' records.
    defs_fresh_until: std::sync::atomic::AtomicU64,
    defs_base: Instant,
    pub(crate) services: tokio::sync::Mutex<BTreeMap<String, ServiceState>>,
    pub(crate) wake: Arc<Notify>,
    /// The ingress's routes, rebuilt whenever a service's routes change.
    routes: std::sync::RwLock<Arc<crate::ingress::RouteTable>>,
    /// What the ingress saw per service, for the autoscaler.
    pub(crate) traffic: crate::autoscale::TrafficBook,
    /// The autoscaler's memory per service.
    pub(crate) scalers: DashMap<String, crate::autoscale::ScalerState>,
    /// Joins one at a time (a name is checked and taken together).
    pub(crate) join_lock: tokio::sync::Mutex<()>,
    /// The server's own listeners (API and ingress): no node's ingress
    /// may be one of them.
    pub(crate) own_addrs: std::sync::Mutex<Vec<std::net::SocketAddr>>,
    /// The ingress's address, once it listens.
    pub(crate) ingress_addr: std::sync::OnceLock<std::net::SocketAddr>,
    /// This server as one of several replicas (PostgreSQL state).
    pub(crate) cluster: Option<Arc<crate::cluster::Cluster>>,
}

impl std::fmt::Debug for Control {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Control").finish_non_exhaustive()
    }
}

/// Splits `family[:revision]`.
pub fn parse_def_name(text: &str) -> Result<(String, Option<u32>)> {
    let field = "task_definition";
    let (family, revision) = match text.split_once(':') {
        Some((f, r)) => {
            let r: u32 = r.parse().map_err(|_| {
                ApiError::invalid(field, format!("{text:?}: the revision must be a number"))
            })?;
            (f, Some(r))
        }
        None => (text, None),
    };
    check_name(field, family)?;
    Ok((family.to_owned(), revision))
}

/// The longest secret value: secrets are environment variables, not files.
pub const MAX_SECRET_BYTES: usize = 64 << 10;

/// A repository name or a prefix ending in `*`.
fn check_pattern(field: &str, pattern: &str) -> Result<()> {
    let bare = pattern.strip_suffix('*').unwrap_or(pattern);
    let ok = bare.is_empty()
        || bare
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "._-/:".contains(c));
    if ok && !pattern.is_empty() {
        Ok(())
    } else {
        Err(ApiError::invalid(
            field,
            format!("{pattern:?} is not a repository name or a prefix ending in *"),
        ))
    }
}

/// Whether `who` may see `def`: its artifact's repository is in scope.
fn sees_def(who: &auth::Principal, def: &TaskDefinition) -> bool {
    who.repositories.is_empty()
        || crate::artifacts::artifact_repository(&def.artifact).is_ok_and(|r| who.may_reach(&r))
}

/// Refuses a secret for a task of `repository` unless its scope matches
/// the repository and (when a caller is known) the caller may use it.
fn check_secret_use(
    who: Option<&auth::Principal>,
    secret: &str,
    scope: Option<&str>,
    repository: &str,
) -> Result<()> {
    let denied = |m: String| Err(ApiError::new(ErrorCode::AccessDenied, m));
    match scope {
        Some(scope) if !secrets::pattern_matches(scope, repository) => denied(format!(
            "secret {secret} belongs to {scope}, not to repository {repository}"
        )),
        _ if who.is_some_and(|w| !secrets::may_use_scope(w, scope)) => denied(match scope {
            None => format!("secret {secret} is global: only an admin may use it"),
            Some(scope) => format!("this token may not use secrets of {scope}"),
        }),
        _ => Ok(()),
    }
}

/// Refuses a definition whose kind its artifact cannot be: an `http` task
/// needs a component exporting `wasi:http/incoming-handler`; a `command`
/// needs `_start` or `wasi:cli/run`. The message names what it exports.
fn check_kind(kind: TaskKind, artifact: &str, scan: &wharf_registry::wasm::Scan) -> Result<()> {
    let exports = |prefix: &str| scan.exports.iter().any(|e| e.starts_with(prefix));
    let is_http = exports("wasi:http/incoming-handler");
    let what = || {
        let shown: Vec<&str> = scan.exports.iter().take(8).map(String::as_str).collect();
        if shown.is_empty() {
            "nothing".to_owned()
        } else {
            shown.join(", ")
        }
    };
    match kind {
        TaskKind::Http if !is_http => Err(ApiError::invalid(
            "kind",
            format!(
                "\"http\" needs a component that exports wasi:http/incoming-handler (the wasi:http/proxy world); {artifact} is a {} {} that exports {}",
                scan.os,
                if scan.kind == wharf_registry::wasm::Kind::Module {
                    "module"
                } else {
                    "component"
                },
                what()
            ),
        )),
        // The runtime serves a component that exports the HTTP handler as
        // HTTP, even if a toolchain's adapter also added `wasi:cli/run`.
        TaskKind::Command if is_http => Err(ApiError::invalid(
            "kind",
            format!(
                "{artifact} is an HTTP component (it exports {}): register it with kind = \"http\" and run it as a service",
                what()
            ),
        )),
        _ => Ok(()),
    }
}

impl Control {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        config: ApiConfig,
        store: Arc<dyn StateStore>,
        writer: Writer,
        tasks: Arc<Tasks>,
        artifacts: Arc<Artifacts>,
        registry: Arc<Registry>,
        tokens: Arc<Tokens>,
        metrics: Metrics,
        wake: Arc<Notify>,
        secret_box: Arc<SecretBox>,
        cluster: Option<Arc<crate::cluster::Cluster>>,
    ) -> Self {
        Control {
            cluster,
            secret_box,
            config,
            store,
            writer,
            tasks,
            artifacts,
            registry,
            tokens,
            metrics,
            defs: DashMap::new(),
            latest: DashMap::new(),
            defs_epoch: std::sync::Mutex::new(0),
            defs_seen: std::sync::atomic::AtomicI64::new(-1),
            defs_fresh_until: std::sync::atomic::AtomicU64::new(0),
            defs_base: Instant::now(),
            services: tokio::sync::Mutex::new(BTreeMap::new()),
            wake,
            routes: Default::default(),
            traffic: Default::default(),
            scalers: DashMap::new(),
            join_lock: tokio::sync::Mutex::new(()),
            own_addrs: Default::default(),
            ingress_addr: Default::default(),
        }
    }

    /// The ingress's current routes.
    pub(crate) fn routes(&self) -> Arc<crate::ingress::RouteTable> {
        self.routes
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Rebuilds the routes from the services (called with their lock held,
    /// so tables are built in the order the services changed).
    pub(crate) fn rebuild_routes(&self, services: &BTreeMap<String, ServiceState>) {
        let routes = services
            .values()
            .flat_map(|s| {
                let name = &s.service().name;
                s.service()
                    .routes
                    .iter()
                    .filter_map(|r| crate::ingress::Route::parse(r).ok())
                    .map(|r| (r, name.clone()))
                    .collect::<Vec<_>>()
            })
            .collect();
        *self.routes.write().unwrap_or_else(|p| p.into_inner()) =
            Arc::new(crate::ingress::RouteTable::new(routes));
    }

    // ----- task definitions -----

    /// Validates, resolves the artifact's tag to a digest and stores a new
    /// revision.
    pub async fn register(
        &self,
        input: TaskDefinitionInput,
        who: &auth::Principal,
    ) -> Result<TaskDefinition> {
        let checked = input.check(self.config.max_task_memory)?;
        // A token scoped to some repositories may not run code from others,
        // nor hand it secrets that are not its own.
        let repository = crate::artifacts::artifact_repository(&checked.artifact)?;
        self.check_repository(who, &repository)?;
        for (var, secret) in &checked.secrets {
            let Some((_, scope)) = self.store.secret(secret).await? else {
                return Err(ApiError::invalid(
                    &format!("secrets.{var}"),
                    format!("there is no secret named {secret:?}: create it first"),
                ));
            };
            check_secret_use(Some(who), secret, scope.as_deref(), &repository)?;
        }
        let resolved = self.artifacts.resolve(&checked.artifact).await?;
        let mut requires_interfaces = Vec::new();
        if let Some(scan) = self.artifacts.scan(&checked.artifact, &resolved).await? {
            check_kind(checked.kind, &checked.artifact, &scan)?;
            requires_interfaces = crate::nodes::required_interfaces(&scan.imports);
        }
        let def = TaskDefinition {
            family: checked.family,
            revision: 0,
            task_definition: String::new(),
            status: TaskDefinitionStatus::Active,
            artifact: checked.artifact,
            artifact_digest: resolved.manifest,
            wasm_digest: resolved.wasm,
            kind: checked.kind,
            args: checked.args,
            env: checked.env,
            secrets: checked.secrets,
            limits: checked.limits,
            http: checked.http,
            placement_constraints: checked.constraints,
            placement_strategy: checked.strategy,
            requires_interfaces,
            labels: checked.labels,
            registered_at: model::now(),
            deregistered_at: None,
        };
        let def = self.store.register_task_definition(def).await?;
        self.forget_def(&def);
        self.defs_changed().await;
        Ok(def)
    }

    /// Task definitions of one family or all, as far as `who` may see them.
    pub async fn task_definitions(
        &self,
        family: Option<&str>,
        who: &auth::Principal,
    ) -> Result<Vec<TaskDefinition>> {
        let mut defs = self.store.task_definitions(family).await?;
        defs.retain(|d| sees_def(who, d));
        Ok(defs)
    }

    /// Refuses unless `who`'s repository scopes reach `repository`.
    fn check_repository(&self, who: &auth::Principal, repository: &str) -> Result<()> {
        if who.may_reach(repository) {
            Ok(())
        } else {
            Err(ApiError::new(
                ErrorCode::AccessDenied,
                format!("token {:?} may not use repository {repository}", who.name),
            ))
        }
    }

    /// A task definition by name, if `who` may see it (others are "not
    /// found": their existence is not told).
    pub async fn task_definition_for(
        &self,
        name: &str,
        who: &auth::Principal,
    ) -> Result<Arc<TaskDefinition>> {
        let def = self.task_definition(name).await?;
        if sees_def(who, &def) {
            Ok(def)
        } else {
            Err(ApiError::not_found(format!(
                "task definition {name} does not exist"
            )))
        }
    }

    /// Refuses unless `who` may start tasks of `def`: its artifact is in
    /// the token's scopes and every secret it names is one `who` may use.
    pub(crate) async fn authorize_run(
        &self,
        def: &TaskDefinition,
        who: &auth::Principal,
    ) -> Result<()> {
        let repository = crate::artifacts::artifact_repository(&def.artifact)?;
        self.check_repository(who, &repository)?;
        for secret in def.secrets.values() {
            if let Some((_, scope)) = self.store.secret(secret).await? {
                check_secret_use(Some(who), secret, scope.as_deref(), &repository)?;
            }
        }
        Ok(())
    }

    /// Whether `who` may see the task with this task definition name.
    pub(crate) async fn sees_task(&self, task: &Task, who: &auth::Principal) -> bool {
        if who.repositories.is_empty() {
            return true;
        }
        match self.task_definition(&task.task_definition).await {
            Ok(def) => sees_def(who, &def),
            Err(_) => false,
        }
    }

    /// A task, if `who` may see it.
    pub async fn task_for(&self, id: &str, who: &auth::Principal) -> Result<Task> {
        let task = self.task(id).await?;
        if self.sees_task(&task, who).await {
            Ok(task)
        } else {
            Err(ApiError::not_found(format!("task {id} does not exist")))
        }
    }

    /// `family` (latest active revision) or `family:revision`. Served
    /// from the caches; with replicas they are dropped whenever another
    /// replica changes a task definition, before that change is
    /// acknowledged to its client (see [`Control::defs_changed`]).
    pub async fn task_definition(&self, name: &str) -> Result<Arc<TaskDefinition>> {
        let (family, revision) = parse_def_name(name)?;
        if self.cluster.is_some() && !self.defs_fresh() {
            let not_found = || match revision {
                Some(r) => format!("task definition {family}:{r} does not exist"),
                None => format!("task definition family {family} has no active revision"),
            };
            return Ok(Arc::new(
                self.store
                    .task_definition(&family, revision)
                    .await?
                    .ok_or_else(|| ApiError::not_found(not_found()))?,
            ));
        }
        let revision = match revision.or_else(|| self.latest.get(&family).map(|r| *r)) {
            Some(r) => r,
            None => {
                let epoch = self.defs_epoch();
                let def = self
                    .store
                    .task_definition(&family, None)
                    .await?
                    .ok_or_else(|| {
                        ApiError::not_found(format!(
                            "task definition family {family} has no active revision"
                        ))
                    })?;
                // Only if still unknown: a concurrent register or
                // deregister knows better than this read.
                self.fill_defs(epoch, || {
                    self.latest.entry(family.clone()).or_insert(def.revision);
                });
                def.revision
            }
        };
        let key = format!("{family}:{revision}");
        if let Some(def) = self.defs.get(&key) {
            return Ok(def.clone());
        }
        let epoch = self.defs_epoch();
        let def = Arc::new(
            self.store
                .task_definition(&family, Some(revision))
                .await?
                .ok_or_else(|| {
                    ApiError::not_found(format!("task definition {key} does not exist"))
                })?,
        );
        self.fill_defs(epoch, || {
            self.defs.entry(key).or_insert(def.clone());
        });
        Ok(def)
    }

    fn defs_epoch(&self) -> u64 {
        *self.defs_epoch.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `fill` on the caches unless they were dropped since `epoch`.
    fn fill_defs(&self, epoch: u64, fill: impl FnOnce()) {
        let now = self.defs_epoch.lock().unwrap_or_else(|p| p.into_inner());
        if *now == epoch {
            fill();
        }
    }

    /// Forgets what the caches hold of `def`'s family and revision after
    /// this replica changed it (the next read fetches it), and keeps
    /// reads that started before from filling them with what they saw. A
    /// write of `def` itself could land after a drop for a later change
    /// and outlive it.
    fn forget_def(&self, def: &TaskDefinition) {
        let mut epoch = self.defs_epoch.lock().unwrap_or_else(|p| p.into_inner());
        *epoch += 1;
        self.latest.remove(&def.family);
        self.defs.remove(&def.task_definition);
    }

    fn defs_millis(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.defs_base).as_millis()).unwrap_or(u64::MAX)
    }

    fn defs_fresh(&self) -> bool {
        self.defs_millis(Instant::now())
            < self
                .defs_fresh_until
                .load(std::sync::atomic::Ordering::Acquire)
    }

    /// Drops every cached task definition.
    fn drop_defs(&self) {
        let mut epoch = self.defs_epoch.lock().unwrap_or_else(|p| p.into_inner());
        *epoch += 1;
        self.defs.clear();
        self.latest.clear();
    }

    /// With replicas: if the task definitions changed since the caches
    /// were last dropped, drops them, then records the change this
    /// replica is fresh for. Called when another replica says so, when
    /// that channel was lost, and every TTL/6.
    pub(crate) async fn catch_up_defs(&self) {
        let (Some(cluster), Some(replicas)) = (&self.cluster, self.store.replicas()) else {
            return;
        };
        let started = Instant::now();
        let generation = match replicas.defs_generation().await {
            Ok(g) => g,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the task definitions' generation");
                return;
            }
        };
        let seen = &self.defs_seen;
        if seen.load(std::sync::atomic::Ordering::Acquire) != generation {
            self.drop_defs();
            if let Err(e) = replicas.ack_defs(&cluster.me, generation).await {
                tracing::warn!(error = %e, "cannot record the task definitions' generation");
                return;
            }
            seen.store(generation, std::sync::atomic::Ordering::Release);
        }
        self.defs_fresh_until.store(
            self.defs_millis(started + cluster.ttl),
            std::sync::atomic::Ordering::Release,
        );
    }

    /// With replicas, after this replica changed a task definition: waits
    /// until every other live replica has dropped what it cached from
    /// before (they are told at once, and look every TTL/6 anyway), so
    /// that a client told of the change finds it on any replica. The wait
    /// ends after a TTL and a third all the same: by then a replica that
    /// has not recorded the change no longer uses its cache, which it does
    /// only within a TTL of its last catch-up (`defs_fresh_until`).
    async fn defs_changed(&self) {
        let (Some(cluster), Some(replicas)) = (&self.cluster, self.store.replicas()) else {
            return;
        };
        let deadline = Instant::now() + cluster.ttl + cluster.ttl / 3;
        let generation = loop {
            match replicas.defs_generation().await {
                Ok(g) => break g,
                Err(e) if Instant::now() >= deadline => {
                    tracing::warn!(error = %e, "cannot read the task definitions' generation");
                    return;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        };
        loop {
            match replicas.defs_laggards(&cluster.me, generation).await {
                Ok(late) if late.is_empty() => return,
                Ok(late) if Instant::now() >= deadline => {
                    tracing::warn!(replicas = ?late, generation, "replicas did not record a task definition change in time");
                    return;
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "cannot check the other replicas"),
            }
            if Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Marks a revision `INACTIVE`; its running tasks carry on.
    pub async fn deregister(&self, name: &str) -> Result<TaskDefinition> {
        let (_, revision) = parse_def_name(name)?;
        if revision.is_none() {
            return Err(ApiError::invalid(
                "task_definition",
                "deregister needs family:revision",
            ));
        }
        let mut def = (*self.task_definition(name).await?).clone();
        if def.status == TaskDefinitionStatus::Active {
            def.status = TaskDefinitionStatus::Inactive;
            def.deregistered_at = Some(model::now());
            self.store.update_task_definition(&def).await?;
            self.forget_def(&def);
            self.defs_changed().await;
        }
        Ok(def)
    }

    // ----- tasks -----

    /// What a task of `def` runs with: the definition's values, the
    /// overrides, and secret values in its environment.
    pub(crate) async fn prepare(
        &self,
        def: Arc<TaskDefinition>,
        overrides: Option<&Overrides>,
        service: Option<(&str, &str)>,
    ) -> Result<Launch> {
        let mut args = def.args.clone();
        let mut env = def.env.clone();
        let mut limits = def.limits;
        if let Some(o) = overrides {
            o.apply(
                &mut args,
                &mut env,
                &mut limits,
                self.config.max_task_memory,
            )?;
        }
        // The server's defaults fill what neither the definition nor the
        // overrides set; the task's record shows the limits it ran with.
        if limits.memory_bytes.is_none() {
            limits.memory_bytes = self.config.default_memory;
        }
        if limits.timeout_ms.is_none() {
            limits.timeout_ms = self
                .config
                .default_timeout
                .map(|t| u64::try_from(t.as_millis()).unwrap_or(u64::MAX));
        }
        let repository = crate::artifacts::artifact_repository(&def.artifact)?;
        for (var, secret) in &def.secrets {
            let (stored, scope) = self.store.secret(secret).await?.ok_or_else(|| {
                ApiError::invalid(
                    &format!("secrets.{var}"),
                    format!("the secret {secret:?} no longer exists"),
                )
            })?;
            // The scope may have changed since registration.
            check_secret_use(None, secret, scope.as_deref(), &repository)?;
            let value = self.secret_box.open(secret, &stored).map_err(|e| {
                tracing::error!(secret = %secret, error = %e, "cannot open a secret");
                ApiError::new(ErrorCode::Internal, "internal error")
            })?;
            env.insert(var.clone(), value);
        }
        Ok(Launch {
            def,
            args,
            env,
            limits,
            service: service.map(|(s, _)| s.to_owned()),
            deployment_id: service.map(|(_, d)| d.to_owned()),
            node: None,
            bench: None,
        })
    }

    /// Starts `count` tasks; answers once their records are durable.
    pub async fn run_task(
        &self,
        request: RunTaskRequest,
        who: &auth::Principal,
    ) -> Result<Vec<Task>> {
        let count = request.count.unwrap_or(1);
        if !(1..=MAX_RUN_COUNT).contains(&count) {
            return Err(ApiError::invalid(
                "count",
                format!("must be between 1 and {MAX_RUN_COUNT}"),
            ));
        }
        let def = self
            .task_definition_for(&request.task_definition, who)
            .await?;
        self.authorize_run(&def, who).await?;
        if def.status == TaskDefinitionStatus::Inactive {
            return Err(ApiError::conflict(format!(
                "task definition {} is INACTIVE: register a new revision",
                def.task_definition
            )));
        }
        if def.kind == TaskKind::Http {
            return Err(ApiError::conflict(format!(
                "task definition {} is kind \"http\": its tasks serve requests behind the ingress, so they run in a service (wharf service create NAME --taskdef {} --desired N --route ...), not as one-off tasks",
                def.task_definition, def.family
            )));
        }
        let mut launch = self.prepare(def, request.overrides.as_ref(), None).await?;
        if let Some(b) = &request.bench {
            let max = wharf_runtime::MAX_BENCH_RUNS;
            if !(1..=max).contains(&b.runs) || b.warmup > max {
                return Err(ApiError::invalid(
                    "bench",
                    format!("runs must be 1 to {max}, and warmup at most {max}"),
                ));
            }
        }
        if request
            .node
            .as_ref()
            .is_some_and(|n| n.is_empty() || n.len() > 63)
        {
            return Err(ApiError::invalid(
                "node",
                "a node name is 1 to 63 characters",
            ));
        }
        launch.node = request.node.clone();
        launch.bench = request.bench;
        let mut tasks = Vec::with_capacity(count as usize);
        for _ in 0..count {
            tasks.push(self.tasks.launch(launch.clone())?);
        }
        self.tasks.sync().await?;
        Ok(tasks)
    }

    /// Tasks, newest first. Live tasks come from memory (their records in
    /// the store may be a batch behind); stopped ones from the store.
    pub async fn list_tasks(&self, filter: TaskFilter) -> Result<Vec<Task>> {
        let live = self.tasks.live_where(|t| {
            filter.family.as_ref().is_none_or(|f| &t.family == f)
                && filter
                    .service
                    .as_ref()
                    .is_none_or(|s| t.service.as_ref() == Some(s))
                && filter.status.is_none_or(|s| t.status == s)
        });
        let mut tasks = match filter.status {
            Some(model::TaskStatus::Stopped) => self.store.tasks(&filter).await?,
            Some(_) => Vec::new(),
            None => {
                let ids: std::collections::HashSet<&str> =
                    live.iter().map(|t| t.id.as_str()).collect();
                let mut stored = self.store.tasks(&filter).await?;
                // A record that was live in the store but is gone from
                // memory has stopped meanwhile: read it again.
                for t in &mut stored {
                    if t.status != model::TaskStatus::Stopped
                        && !ids.contains(t.id.as_str())
                        && let Some(fresh) = self.tasks.get(&t.id).await?
                    {
                        *t = fresh;
                    }
                }
                stored.retain(|t| !ids.contains(t.id.as_str()));
                stored
            }
        };
        if filter.status != Some(model::TaskStatus::Stopped) {
            tasks.extend(live);
        }
        tasks.sort_by(|a, b| {
            b.created_at
                .cmp(&a.created_at)
                .then_with(|| a.id.cmp(&b.id))
        });
        tasks.truncate(filter.limit as usize);
        Ok(tasks)
    }

    /// One task.
    pub async fn task(&self, id: &str) -> Result<Task> {
        self.tasks
            .get(id)
            .await?
            .ok_or_else(|| ApiError::not_found(format!("task {id} does not exist")))
    }

    /// Stops a task (`UserStopped`).
    pub async fn stop_task(&self, id: &str, reason: Option<String>) -> Result<Task> {
        let reason = StopReason {
            code: wharf_runtime::StopCode::UserStopped,
            message: reason.unwrap_or_else(|| "stopped by the user".into()),
        };
        self.tasks
            .stop(id, reason)
            .await?
            .ok_or_else(|| ApiError::not_found(format!("task {id} does not exist")))
    }

    // ----- secrets -----

    /// Creates or replaces a secret. Its value is sealed before it is
    /// stored; a scoped token may only create secrets within its scopes,
    /// and replace only those.
    pub async fn put_secret(
        &self,
        request: CreateSecretRequest,
        who: &auth::Principal,
    ) -> Result<Secret> {
        check_name("name", &request.name)?;
        if request.value.contains('\0') {
            return Err(ApiError::invalid("value", "must not contain NUL"));
        }
        if request.value.len() > MAX_SECRET_BYTES {
            return Err(ApiError::invalid(
                "value",
                format!("must be at most {MAX_SECRET_BYTES} bytes"),
            ));
        }
        if let Some(scope) = &request.scope {
            check_pattern("scope", scope)?;
        }
        self.check_secret_manage(who, &request.name, request.scope.as_deref())?;
        if let Some((_, existing)) = self.store.secret(&request.name).await? {
            self.check_secret_manage(who, &request.name, existing.as_deref())?;
        }
        let at = model::now();
        let sealed = self.secret_box.seal(&request.name, &request.value);
        self.store
            .put_secret(&request.name, &sealed, request.scope.as_deref(), &at)
            .await?;
        Ok(Secret {
            name: request.name,
            updated_at: at,
            scope: request.scope,
        })
    }

    fn check_secret_manage(
        &self,
        who: &auth::Principal,
        name: &str,
        scope: Option<&str>,
    ) -> Result<()> {
        if secrets::may_use_scope(who, scope) {
            return Ok(());
        }
        Err(ApiError::new(
            ErrorCode::AccessDenied,
            match scope {
                None => format!(
                    "secret {name} is global: only an admin may manage it (give it a scope within the token's repositories)"
                ),
                Some(scope) => format!("token {:?} may not manage secrets of {scope}", who.name),
            },
        ))
    }

    /// The secrets `who` may manage (names and scopes, never values).
    pub async fn list_secrets(&self, who: &auth::Principal) -> Result<Vec<Secret>> {
        let mut all = self.store.secrets().await?;
        all.retain(|s| secrets::may_use_scope(who, s.scope.as_deref()));
        Ok(all)
    }

    /// Deletes a secret.
    pub async fn delete_secret(&self, name: &str, who: &auth::Principal) -> Result<()> {
        let not_found = || ApiError::not_found(format!("secret {name} does not exist"));
        let (_, scope) = self.store.secret(name).await?.ok_or_else(not_found)?;
        if !secrets::may_use_scope(who, scope.as_deref()) {
            return Err(not_found());
        }
        if self.store.delete_secret(name).await? {
            Ok(())
        } else {
            Err(not_found())
        }
    }

    /// Seals values that older versions stored in plain text.
    pub(crate) async fn seal_plain_secrets(&self) -> Result<usize> {
        let mut sealed = 0;
        for secret in self.store.secrets().await? {
            if let Some((stored, scope)) = self.store.secret(&secret.name).await?
                && !SecretBox::is_sealed(&stored)
            {
                let value = self.secret_box.seal(&secret.name, &stored);
                self.store
                    .put_secret(&secret.name, &value, scope.as_deref(), &secret.updated_at)
                    .await?;
                sealed += 1;
            }
        }
        if sealed > 0 {
            self.store.checkpoint().await?;
        }
        Ok(sealed)
    }

    // ----- tokens -----

    /// Creates a token.
    pub async fn create_token(&self, request: CreateTokenRequest) -> Result<CreatedToken> {
        if request.name.trim().is_empty() || request.name.len() > 255 {
            return Err(ApiError::invalid("name", "must be 1 to 255 characters"));
        }
        for pattern in &request.repositories {
            check_pattern("repositories", pattern)?;
        }
        let secret = auth::new_secret();
        let token = Token {
            id: uuid::Uuid::new_v4().simple().to_string()[..12].to_owned(),
            name: request.name,
            role: request.role,
            repositories: request.repositories,
            created_at: model::now(),
            revoked_at: None,
        };
        let hash = auth::hash(&secret);
        self.store.put_token(&token, &hash).await?;
        self.tokens.load(&token, &hash);
        self.tell_replicas(crate::cluster::TOKENS_CHANGED).await;
        Ok(CreatedToken { token, secret })
    }

    /// Every token (without secrets).
    pub async fn list_tokens(&self) -> Result<Vec<Token>> {
        Ok(self
            .store
            .tokens()
            .await?
            .into_iter()
            .map(|(t, _)| t)
            .collect())
    }

    /// Revokes a token: it stops working at once.
    pub async fn revoke_token(&self, id: &str) -> Result<Token> {
        let (mut token, hash) = self
            .store
            .tokens()
            .await?
            .into_iter()
            .find(|(t, _)| t.id == id)
            .ok_or_else(|| ApiError::not_found(format!("token {id} does not exist")))?;
        if token.revoked_at.is_none() {
            token.revoked_at = Some(model::now());
            self.store.put_token(&token, &hash).await?;
            self.tokens.load(&token, &hash);
            self.tell_replicas(crate::cluster::TOKENS_CHANGED).await;
        }
        Ok(token)
    }

    /// Tells the other replicas (if any) that what `message` names changed.
    async fn tell_replicas(&self, message: &str) {
        if self.cluster.is_some()
            && let Some(r) = self.store.replicas()
            && let Err(e) = r.notify(message).await
        {
            // They also reload whenever their channel was lost, but not
            // otherwise: say so.
            tracing::error!(error = %e, "cannot tell the other replicas about a change");
        }
    }
}
