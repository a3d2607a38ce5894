//! The local node's tasks: each accepted task gets a record and a driver
//! that walks it through `PROVISIONING → PENDING → RUNNING → STOPPED` on
//! the runtime's [`Executor`], writing each step to the state store.
//!
//! Live tasks are kept in memory (their logs, stop handles and status
//! watchers live here); a stopped task's final record and retained output
//! are committed before anyone can see it stopped, and then it lives in
//! the store (and, for a few seconds, in [`Recent`]: a client waiting for
//! its task asks right after it stopped).

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use dashmap::DashMap;
use tokio::sync::{Notify, mpsc, watch};
use wharf_runtime::{Executor, LogBuffer, Outcome, StopCode, StopSignal, TaskPhase, TaskSpec};

use crate::artifacts::Artifacts;
use crate::db::{StateStore, Write};
use crate::error::{ApiError, Result};
use crate::fleet::{Assignment, Candidate, Fleet, RemoteNode, Update};
use crate::metrics::Metrics;
use crate::model::{
    self, LogEntry, LogPage, Task, TaskDefinition, TaskKind, TaskLimits, TaskStatus,
};
use crate::serving::{Backends, HttpTask};
use crate::writer::Writer;

/// What a new task runs with, after overrides and secrets.
#[derive(Debug, Clone)]
pub(crate) struct Launch {
    pub(crate) def: Arc<TaskDefinition>,
    pub(crate) args: Vec<String>,
    pub(crate) env: BTreeMap<String, String>,
    pub(crate) limits: TaskLimits,
    pub(crate) service: Option<String>,
    pub(crate) deployment_id: Option<String>,
    /// Only this node may run it.
    pub(crate) node: Option<String>,
    /// A benchmark instead of one run.
    pub(crate) bench: Option<model::BenchRequest>,
}

/// Why the control plane asked a task to stop.
#[derive(Debug, Clone)]
pub(crate) struct StopReason {
    pub(crate) code: StopCode,
    pub(crate) message: String,
}

struct EntryState {
    task: Task,
    stop: Option<Arc<StopSignal>>,
    reason: Option<StopReason>,
    /// The final record is queued and being committed: `task` still shows
    /// the last durable status, and no other record may be queued.
    finishing: bool,
}

/// A live task.
pub(crate) struct TaskEntry {
    state: Mutex<EntryState>,
    logs: Arc<LogBuffer>,
    status: watch::Sender<TaskStatus>,
    /// The server slot of an HTTP task, once it has one.
    http: OnceLock<Arc<HttpTask>>,
}

impl TaskEntry {
    fn snapshot(&self) -> Task {
        let mut task = self.state.lock().expect("task lock").task.clone();
        if let Some(slot) = self.http.get() {
            let (stats, fuel) = slot.stats();
            task.http = Some(stats);
            task.fuel_consumed = Some(fuel);
        }
        task
    }
}

/// The node's task manager.
pub(crate) struct Tasks {
    /// The local node's name: `local`, or the replica's.
    local_name: String,
    /// The replica's name, with several servers (tasks record it).
    replica: Option<String>,
    live: DashMap<String, Arc<TaskEntry>>,
    /// Tasks that stopped here lately, as committed.
    recent: Mutex<Recent>,
    /// Live tasks placed on the local node, by service (`None`: one-off),
    /// kept as they are placed and finish: placement reads counts, not a
    /// walk over every live task (which made a backlog quadratic).
    local_counts: Mutex<std::collections::HashMap<Option<String>, u64>>,
    executor: Executor,
    artifacts: Arc<Artifacts>,
    writer: Writer,
    store: Arc<dyn StateStore>,
    metrics: Metrics,
    log_retention: usize,
    stopped: mpsc::UnboundedSender<Arc<Task>>,
    /// Woken when a service's task starts running (its reconciler
    /// retires old tasks and notices a steady state at once).
    service_changed: Arc<Notify>,
    draining: AtomicBool,
    backends: Arc<Backends>,
    /// How long a stopping HTTP task finishes its requests in flight.
    deregistration_delay: Duration,
    /// How long a starting HTTP task's health check may keep failing.
    health_check_grace: Duration,
    /// Which addresses components' outbound requests may reach.
    outbound_check: wharf_runtime::AddressCheck,
    /// The node's status: a draining node starts no new task.
    node_status: Mutex<model::NodeStatus>,
    /// The node's labels, which placement constraints are checked against.
    node_labels: Mutex<Arc<BTreeMap<String, String>>>,
    /// The WASI interfaces the local runtime provides.
    local_interfaces: Arc<Vec<String>>,
    /// The edge nodes.
    fleet: Arc<Fleet>,
    /// The server runs no tasks itself (`--no-local-node`).
    no_local_node: bool,
    /// The memory a task without a limit is counted with in placement.
    default_memory: u64,
    /// Placements one at a time: each sees the tasks placed before it.
    placing: Mutex<()>,
    /// Forwards requests to the HTTP tasks on edge nodes.
    forwarder: Arc<crate::serving::Forwarder>,
}

/// How many stopped tasks [`Recent`] keeps, and for how long.
const RECENT_TASKS: usize = 1024;
const RECENT_FOR: Duration = Duration::from_secs(5);

/// The first wait before a failed final record is queued again; each
/// failure doubles it, up to [`FINAL_RETRY_MAX`].
const FINAL_RETRY_FIRST: Duration = Duration::from_millis(100);
const FINAL_RETRY_MAX: Duration = Duration::from_secs(2);

/// The final records of the tasks that stopped here lately, newest last,
/// so that a describe right after a stop (a client waiting for its task)
/// is answered without a database read. Entries are committed records,
/// put here after their commit; an entry outlives its row by at most
/// [`RECENT_FOR`] when a prune deletes it (the local janitor clears it
/// after each prune that deleted tasks, which shortens that mostly).
#[derive(Default)]
struct Recent {
    order: std::collections::VecDeque<(Instant, String)>,
    tasks: std::collections::HashMap<String, Arc<Task>>,
}

impl Recent {
    fn put(&mut self, task: Arc<Task>, now: Instant) {
        self.expire(now);
        if self.order.len() >= RECENT_TASKS
            && let Some((_, id)) = self.order.pop_front()
        {
            self.tasks.remove(&id);
        }
        self.order.push_back((now, task.id.clone()));
        self.tasks.insert(task.id.clone(), task);
    }

    fn get(&mut self, id: &str, now: Instant) -> Option<Task> {
        self.expire(now);
        self.tasks.get(id).map(|t| Task::clone(t))
    }

    fn expire(&mut self, now: Instant) {
        while let Some((at, _)) = self.order.front()
            && now.duration_since(*at) >= RECENT_FOR
        {
            let (_, id) = self.order.pop_front().expect("a front");
            self.tasks.remove(&id);
        }
    }
}

/// A placed task.
enum Placed {
    Local,
    Remote(Arc<RemoteNode>, mpsc::UnboundedReceiver<Update>),
}

/// Where placement put a task.
enum Target {
    Local,
    Remote(Arc<RemoteNode>),
}

/// How a task definition spreads its tasks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Strategy {
    /// Fewest tasks of the same service (then fewest tasks) per node, or
    /// per value of a label first.
    Spread(Option<String>),
    /// The node with the least free memory that still fits.
    Binpack,
}

impl Strategy {
    /// Parses `spread`, `spread(LABEL)` or `binpack`.
    pub(crate) fn parse(text: &str) -> std::result::Result<Strategy, String> {
        let text = text.trim();
        if text == "spread" {
            return Ok(Strategy::Spread(None));
        }
        if text == "binpack" {
            return Ok(Strategy::Binpack);
        }
        if let Some(label) = text
            .strip_prefix("spread(")
            .and_then(|l| l.strip_suffix(')'))
            .map(str::trim)
            .filter(|l| !l.is_empty() && l.len() <= 63)
        {
            return Ok(Strategy::Spread(Some(label.to_owned())));
        }
        Err(format!(
            "{text:?} is not a strategy: expected spread, spread(LABEL) or binpack"
        ))
    }
}

/// Picks a node among `candidates` (all READY and fitting) by `strategy`.
fn pick<'a>(
    candidates: &[&'a Candidate],
    strategy: &Strategy,
    memory: u64,
) -> Option<&'a Candidate> {
    let of_service = |c: &Candidate| c.service_tasks;
    match strategy {
        Strategy::Binpack => {
            let fits = |c: &&&Candidate| c.free_memory.is_none_or(|m| m >= memory);
            candidates
                .iter()
                .filter(fits)
                .min_by_key(|c| {
                    (
                        c.free_memory.unwrap_or(u64::MAX),
                        std::cmp::Reverse(c.tasks),
                        c.name.clone(),
                    )
                })
                .copied()
                .or_else(|| pick(candidates, &Strategy::Spread(None), memory))
        }
        Strategy::Spread(label) => {
            let group = |c: &Candidate| -> u64 {
                let Some(label) = label else { return 0 };
                let value = c.labels.get(label);
                candidates
                    .iter()
                    .filter(|o| o.labels.get(label) == value)
                    .map(|o| of_service(o))
                    .sum()
            };
            candidates
                .iter()
                .min_by_key(|c| {
                    (
                        group(c),
                        of_service(c),
                        c.free_slots == 0,
                        c.tasks,
                        c.name.clone(),
                    )
                })
                .copied()
        }
    }
}

/// The local node's name when the server is not one of several replicas.
pub const LOCAL_NODE: &str = "local";

/// A runtime log line as the API shows it.
pub(crate) fn convert_line(l: wharf_runtime::LogLine) -> LogEntry {
    LogEntry {
        seq: l.seq,
        at: model::timestamp(l.at),
        stream: l.stream.as_str().into(),
        text: l.text,
    }
}

fn convert_page(page: wharf_runtime::LogPage) -> LogPage {
    LogPage {
        lines: page.lines.into_iter().map(convert_line).collect(),
        next_seq: page.next_seq,
        missed: page.missed,
        closed: page.closed,
    }
}

impl Tasks {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        executor: Executor,
        artifacts: Arc<Artifacts>,
        writer: Writer,
        store: Arc<dyn StateStore>,
        metrics: Metrics,
        log_retention: usize,
        stopped: mpsc::UnboundedSender<Arc<Task>>,
        service_changed: Arc<Notify>,
        deregistration_delay: Duration,
        health_check_grace: Duration,
        outbound_check: wharf_runtime::AddressCheck,
        fleet: Arc<Fleet>,
        no_local_node: bool,
        default_memory: u64,
        local_name: String,
        replica: Option<String>,
    ) -> Self {
        Tasks {
            local_name,
            replica,
            live: DashMap::new(),
            recent: Mutex::default(),
            local_counts: Mutex::default(),
            executor,
            artifacts,
            writer,
            store,
            metrics,
            log_retention,
            stopped,
            service_changed,
            draining: AtomicBool::new(false),
            backends: Arc::default(),
            deregistration_delay,
            health_check_grace,
            outbound_check,
            node_status: Mutex::new(model::NodeStatus::Ready),
            node_labels: Mutex::default(),
            local_interfaces: Arc::new(
                wharf_runtime::PROVIDED_INTERFACES
                    .iter()
                    .map(|s| (*s).to_owned())
                    .collect(),
            ),
            fleet,
            no_local_node,
            default_memory,
            placing: Mutex::new(()),
            forwarder: Arc::new(crate::serving::Forwarder::new()),
        }
    }

    /// The local node's name.
    pub(crate) fn local_name(&self) -> &str {
        &self.local_name
    }

    /// Whether `id` is a live task of this server (on its own node or
    /// placed by it on an edge node).
    pub(crate) fn is_live(&self, id: &str) -> bool {
        self.live.contains_key(id)
    }

    /// The edge nodes.
    pub(crate) fn fleet(&self) -> &Arc<Fleet> {
        &self.fleet
    }

    /// The local node for placement; its tasks (all, and of `service`) are
    /// counted only when `count` (there are other nodes to compare it
    /// with): a single-node server's task start stays O(1).
    fn local_candidate(&self, service: Option<&str>, count: bool) -> Candidate {
        let stats = self.executor.stats();
        let slots = self.executor.slots() as u64;
        let (tasks, service_tasks) = if count {
            let counts = self.counts();
            let of_service = service
                .and_then(|s| counts.get(&Some(s.to_owned())))
                .copied()
                .unwrap_or(0);
            (counts.values().sum(), of_service)
        } else {
            (0, 0)
        };
        Candidate {
            name: self.local_name.clone(),
            status: self.node_status(),
            labels: self
                .node_labels
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
            interfaces: self.local_interfaces.clone(),
            free_slots: slots.saturating_sub(tasks),
            free_memory: self
                .executor
                .memory_budget()
                .map(|b| b.saturating_sub(stats.memory_reserved)),
            tasks,
            service_tasks,
            serves_http: true,
        }
    }

    /// Chooses the node for a task: READY, providing every interface the
    /// artifact imports, meeting every constraint, then by the
    /// definition's strategy. The error names what no node had.
    fn place(
        &self,
        def: &TaskDefinition,
        service: Option<&str>,
        memory: u64,
        only: Option<&str>,
    ) -> std::result::Result<Target, String> {
        let mut candidates = Vec::new();
        // Edge nodes run tasks of the built-in registry (other registries'
        // artifacts stay on the server), and HTTP tasks only with an
        // ingress the server accepted.
        let remote_ok = matches!(
            crate::artifacts::ArtifactRef::parse(&def.artifact),
            Ok(crate::artifacts::ArtifactRef::Local { .. })
        );
        let http = def.kind == TaskKind::Http;
        let mut remote = std::collections::HashMap::new();
        let mut no_ingress = 0;
        if remote_ok {
            for node in self.fleet.each() {
                if let Some(c) = node.candidate(service) {
                    if http && !c.serves_http {
                        no_ingress += 1;
                        continue;
                    }
                    remote.insert(c.name.clone(), node);
                    candidates.push(c);
                }
            }
        }
        if !self.no_local_node {
            candidates.insert(0, self.local_candidate(service, !remote.is_empty()));
        }
        if let Some(name) = only {
            candidates.retain(|c| c.name == name);
            if candidates.is_empty() {
                return Err(format!(
                    "no node {name} can run it (wharf node ls lists the nodes; edge nodes run artifacts of the built-in registry, HTTP tasks only with an ingress)"
                ));
            }
        }
        let status_name = |s: model::NodeStatus| {
            serde_json::to_value(s)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default()
        };
        if candidates.is_empty() {
            let joined = self.fleet.each().len();
            return Err(if no_ingress > 0 {
                format!(
                    "no node serves HTTP: {no_ingress} edge node(s) have no ingress the server can forward to (wharf node join --ingress ADDR; wharf node describe shows why one is refused), and the server runs no tasks (--no-local-node)"
                )
            } else if remote_ok && joined > 0 {
                format!(
                    "no node has reported yet: {joined} edge node(s) joined, and each reports within a heartbeat of (re)connecting"
                )
            } else if remote_ok {
                "no node: the server runs no tasks (--no-local-node) and no edge node has joined"
                    .into()
            } else {
                "no node can run it: edge nodes run tasks of the built-in registry, and the server runs no tasks (--no-local-node)".into()
            });
        }
        let ready: Vec<&Candidate> = candidates
            .iter()
            .filter(|c| c.status == model::NodeStatus::Ready)
            .collect();
        if ready.is_empty() {
            let states: Vec<String> = candidates
                .iter()
                .map(|c| format!("{} is {}", c.name, status_name(c.status)))
                .collect();
            let hint = match candidates.as_slice() {
                [only] if only.status == model::NodeStatus::Draining => {
                    format!(" (wharf node activate {})", only.name)
                }
                _ => String::new(),
            };
            return Err(format!("no READY node: {}{hint}", states.join(", ")));
        }
        let provided: Vec<&Candidate> = ready
            .iter()
            .copied()
            .filter(|c| {
                let have: Vec<&str> = c.interfaces.iter().map(String::as_str).collect();
                def.requires_interfaces
                    .iter()
                    .all(|i| crate::nodes::provides(&have, i))
            })
            .collect();
        if provided.is_empty() {
            let have: Vec<&str> = ready[0].interfaces.iter().map(String::as_str).collect();
            let missing = def
                .requires_interfaces
                .iter()
                .find(|i| !crate::nodes::provides(&have, i))
                .cloned()
                .unwrap_or_default();
            return Err(format!(
                "no READY node provides {missing} (the artifact imports it)"
            ));
        }
        let constraints: Vec<(String, crate::nodes::Constraint)> = def
            .placement_constraints
            .iter()
            .filter_map(|c| Some((c.clone(), crate::nodes::Constraint::parse(c).ok()?)))
            .collect();
        let fitting: Vec<&Candidate> = provided
            .iter()
            .copied()
            .filter(|c| constraints.iter().all(|(_, k)| k.matches(&c.labels)))
            .collect();
        if fitting.is_empty() {
            let first = &provided[0];
            let unmet = constraints
                .iter()
                .find(|(_, k)| !k.matches(&first.labels))
                .map(|(c, _)| c.clone())
                .unwrap_or_default();
            let shown: Vec<String> = provided
                .iter()
                .map(|c| {
                    let labels: Vec<String> =
                        c.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
                    format!("{} has labels [{}]", c.name, labels.join(","))
                })
                .collect();
            return Err(format!(
                "no READY node meets the constraint {unmet:?} ({})",
                shown.join("; ")
            ));
        }
        let strategy = def
            .placement_strategy
            .as_deref()
            .and_then(|s| Strategy::parse(s).ok())
            .unwrap_or(Strategy::Spread(None));
        // Nodes with room for it first; when none has, it waits on one
        // (PENDING) as a full node's tasks do.
        let roomy: Vec<&Candidate> = fitting
            .iter()
            .copied()
            .filter(|c| c.free_slots > 0 && c.free_memory.is_none_or(|m| m >= memory))
            .collect();
        let pool = if roomy.is_empty() { &fitting } else { &roomy };
        let chosen = pick(pool, &strategy, memory).unwrap_or(pool[0]);
        Ok(match remote.remove(&chosen.name) {
            Some(node) => Target::Remote(node),
            None => Target::Local,
        })
    }

    /// Sets the local node's labels.
    pub(crate) fn set_node_labels(&self, labels: BTreeMap<String, String>) {
        *self.node_labels.lock().unwrap_or_else(|p| p.into_inner()) = Arc::new(labels);
    }

    /// The local node's status.
    pub(crate) fn node_status(&self) -> model::NodeStatus {
        *self.node_status.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sets the local node's status.
    pub(crate) fn set_node_status(&self, status: model::NodeStatus) {
        *self.node_status.lock().unwrap_or_else(|p| p.into_inner()) = status;
    }

    /// Tasks of the local node that have not stopped.
    pub(crate) fn live_count(&self) -> usize {
        self.counts().values().sum::<u64>() as usize
    }

    fn counts(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<Option<String>, u64>> {
        self.local_counts.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The HTTP tasks that take traffic, per service.
    pub(crate) fn backends(&self) -> &Arc<Backends> {
        &self.backends
    }

    /// Accepts a task: records it `PROVISIONING` and starts its driver.
    /// The returned write is the record to commit (callers that answer a
    /// client commit it; the reconciler only queues it).
    pub(crate) fn launch(self: &Arc<Self>, launch: Launch) -> Result<Task> {
        if self.draining.load(Ordering::Acquire) {
            return Err(ApiError::conflict("the server is shutting down"));
        }
        let def = launch.def.clone();
        let task = Task {
            id: uuid::Uuid::now_v7().simple().to_string(),
            task_definition: def.task_definition.clone(),
            family: def.family.clone(),
            service: launch.service.clone(),
            deployment_id: launch.deployment_id.clone(),
            // Set when the task is placed.
            node: String::new(),
            status: TaskStatus::Provisioning,
            desired_status: TaskStatus::Running,
            stop_code: None,
            exit_code: None,
            fuel_consumed: None,
            peak_memory_bytes: None,
            duration_ms: None,
            message: None,
            args: launch.args.clone(),
            limits: launch.limits,
            created_at: model::now(),
            started_at: None,
            stopped_at: None,
            http: None,
            replica: self.replica.clone(),
        };
        let (status, _) = watch::channel(TaskStatus::Provisioning);
        let entry = Arc::new(TaskEntry {
            state: Mutex::new(EntryState {
                task: task.clone(),
                // Stops a task still fetching its artifact; replaced by the
                // executor's own signal once it runs.
                stop: Some(StopSignal::new()),
                reason: None,
                finishing: false,
            }),
            logs: LogBuffer::new(self.log_retention),
            status,
            http: OnceLock::new(),
        });
        self.live.insert(task.id.clone(), entry.clone());
        self.metrics
            .tasks
            .with_label_values(&["PROVISIONING"])
            .inc();
        self.writer.send(Write::Task(Box::new(task.clone())));
        // Beside the guests: the driver's hand-offs to the sandbox stay
        // within one runtime (it does no heavy work of its own).
        self.executor
            .spawn_beside(self.clone().drive(entry, launch, Instant::now()));
        Ok(task)
    }

    /// The node's executor.
    pub(crate) fn executor(&self) -> &Executor {
        &self.executor
    }

    /// Commits the writes queued so far (a launched task's record).
    pub(crate) async fn sync(&self) -> Result<()> {
        self.writer.commit(Vec::new()).await
    }

    fn transition(&self, entry: &TaskEntry, to: TaskStatus, edit: impl FnOnce(&mut Task)) {
        {
            let mut st = entry.state.lock().expect("task lock");
            let from = st.task.status;
            st.task.status = to;
            edit(&mut st.task);
            self.metrics.tasks.with_label_values(&[from.as_str()]).dec();
            self.metrics.tasks.with_label_values(&[to.as_str()]).inc();
            // Queued under the lock: the queue's order is the order of the
            // task's changes, so an older record never lands last.
            self.writer.send(Write::Task(Box::new(st.task.clone())));
        }
        entry.status.send_replace(to);
    }

    async fn drive(self: Arc<Self>, entry: Arc<TaskEntry>, launch: Launch, accepted: Instant) {
        let def = &launch.def;
        let memory = launch.limits.memory_bytes.unwrap_or(self.default_memory);
        // Placed and held under one lock, so the next placement counts it.
        let placed = {
            let _one = self.placing.lock().unwrap_or_else(|p| p.into_inner());
            match self.place(
                def,
                launch.service.as_deref(),
                memory,
                launch.node.as_deref(),
            ) {
                Ok(Target::Remote(node)) => {
                    match self.hold_remote(&entry, &launch, &node, memory) {
                        Some(rx) => Ok(Placed::Remote(node, rx)),
                        None => Err(node
                            .lost_reason()
                            .unwrap_or_else(|| format!("node {} was lost", node.name))),
                    }
                }
                Ok(Target::Local) => {
                    let mut st = entry.state.lock().expect("task lock");
                    st.task.node = self.local_name.clone();
                    *self.counts().entry(st.task.service.clone()).or_default() += 1;
                    self.writer.send(Write::Task(Box::new(st.task.clone())));
                    Ok(Placed::Local)
                }
                Err(why) => Err(why),
            }
        };
        if let Some(service) = &launch.service {
            let (id, node) = {
                let st = entry.state.lock().expect("task lock");
                (st.task.id.clone(), st.task.node.clone())
            };
            let message = match &placed {
                Ok(_) => format!("service {service} placed task {id} on node {node}"),
                Err(why) => format!("service {service} cannot place task {id}: {why}"),
            };
            self.writer.send(Write::Event {
                service: service.clone(),
                at: model::now(),
                message,
            });
        }
        match placed {
            Err(message) => {
                let outcome = Outcome::not_started(StopCode::FailedToStart, message);
                return self.finish(&entry, outcome).await;
            }
            Ok(Placed::Remote(node, rx)) => {
                let http = (def.kind == TaskKind::Http)
                    .then(|| def.http.clone())
                    .flatten();
                // Boxed, as are the HTTP and bench paths below: the driver
                // of every task, held for as long as it runs, is sized by
                // its largest state, and these are ~3 KiB it need not carry.
                return Box::pin(self.follow_remote(entry, node, rx, accepted, http)).await;
            }
            Ok(Placed::Local) => {}
        }
        let early = entry
            .state
            .lock()
            .expect("task lock")
            .stop
            .clone()
            .unwrap_or_default();
        // A registry that never answers must not keep the task, or a stop,
        // waiting: the fetch races the stop signal (and has its own timeouts).
        let loaded = tokio::select! {
            biased;
            () = early.wait() => {
                let outcome = Outcome::not_started(StopCode::UserStopped, "stopped before it started");
                return self.finish(&entry, outcome).await;
            }
            loaded = self.artifacts.load(&def.artifact, &def.artifact_digest, &def.wasm_digest) => loaded,
        };
        let artifact = match loaded {
            Ok(a) => a,
            Err(message) => {
                return self
                    .finish(
                        &entry,
                        Outcome::not_started(StopCode::FailedToStart, message),
                    )
                    .await;
            }
        };
        if entry.state.lock().expect("task lock").reason.is_some() {
            let outcome = Outcome::not_started(StopCode::UserStopped, "stopped before it started");
            return self.finish(&entry, outcome).await;
        }
        self.transition(&entry, TaskStatus::Pending, |_| {});
        if def.kind == TaskKind::Http {
            return Box::pin(self.serve_http(entry, launch, artifact, early)).await;
        }
        let bench = launch.bench;
        let mut spec = TaskSpec::new(entry.logs.clone());
        spec.program = def.family.clone();
        spec.args = launch.args.clone();
        spec.env = launch.env.into_iter().collect();
        spec.limits = wharf_runtime::Limits {
            fuel: launch.limits.fuel,
            memory: launch.limits.memory_bytes,
            timeout: launch.limits.timeout_ms.map(Duration::from_millis),
        };
        if let Some(b) = bench {
            let now = model::now();
            self.transition(&entry, TaskStatus::Running, |t| t.started_at = Some(now));
            let outcome = Box::pin(self.executor.bench(
                artifact,
                &spec,
                b.runs,
                b.warmup,
                &early,
                &entry.logs,
            ))
            .await;
            return self.finish(&entry, outcome).await;
        }
        let handle = self.executor.spawn(artifact, spec);
        {
            let mut st = entry.state.lock().expect("task lock");
            st.stop = Some(handle.stop_signal());
            if st.reason.is_some() {
                handle.stop();
            }
        }
        handle.started().await;
        self.metrics
            .task_start_latency
            .observe(accepted.elapsed().as_secs_f64());
        if handle.phase() != TaskPhase::Pending {
            self.metrics.task_starts.inc();
        }
        if handle.phase() == TaskPhase::Running {
            let now = model::now();
            self.transition(&entry, TaskStatus::Running, |t| t.started_at = Some(now));
            if launch.service.is_some() {
                self.service_changed.notify_one();
            }
        }
        let outcome = handle.wait().await;
        self.finish(&entry, outcome).await;
    }

    /// Hands a task placed on an edge node its assignment (the node runs
    /// it); `None` if the node was lost meanwhile. The driver then follows
    /// what the node reports (status, output, outcome), passes a stop on,
    /// and finishes the task `NodeLost` if the node is lost or removed.
    fn hold_remote(
        &self,
        entry: &TaskEntry,
        launch: &Launch,
        node: &RemoteNode,
        memory: u64,
    ) -> Option<mpsc::UnboundedReceiver<Update>> {
        let def = &launch.def;
        let repository = match crate::artifacts::ArtifactRef::parse(&def.artifact) {
            Ok(crate::artifacts::ArtifactRef::Local { name, .. }) => name.as_str().to_owned(),
            _ => String::new(),
        };
        let task_id = {
            let mut st = entry.state.lock().expect("task lock");
            st.task.node = node.name.clone();
            // Queued under the lock, in order with the task's other records.
            self.writer.send(Write::Task(Box::new(st.task.clone())));
            st.task.id.clone()
        };
        let assignment = Assignment {
            seq: 0,
            task_id: task_id.clone(),
            family: def.family.clone(),
            repository: repository.clone(),
            wasm_digest: def.wasm_digest.clone(),
            args: launch.args.clone(),
            env: launch.env.clone(),
            limits: launch.limits,
            service: launch.service.clone(),
            bench: launch.bench,
            http: (def.kind == TaskKind::Http)
                .then(|| def.http.clone())
                .flatten()
                .map(|settings| crate::fleet::HttpAssignment {
                    settings,
                    health_check_grace_ms: self.health_check_grace.as_millis() as u64,
                    deregistration_delay_ms: self.deregistration_delay.as_millis() as u64,
                }),
        };
        let (tx, rx) = mpsc::unbounded_channel();
        node.hold(
            &task_id,
            Some(assignment),
            memory,
            launch.service.clone(),
            repository,
            tx,
        )
        .then_some(rx)
    }

    async fn follow_remote(
        self: Arc<Self>,
        entry: Arc<TaskEntry>,
        node: Arc<RemoteNode>,
        mut rx: mpsc::UnboundedReceiver<Update>,
        accepted: Instant,
        http: Option<model::HttpSettings>,
    ) {
        let (task_id, service) = {
            let st = entry.state.lock().expect("task lock");
            (st.task.id.clone(), st.task.service.clone())
        };
        let stop = entry
            .state
            .lock()
            .expect("task lock")
            .stop
            .clone()
            .unwrap_or_default();
        if entry.state.lock().expect("task lock").reason.is_some() {
            node.order_stop(&task_id);
        }
        let mut stop_sent = false;
        // An HTTP task takes the server ingress's traffic (forwarded to
        // the node's ingress) while it runs and is not asked to stop.
        // Once the node's ingress is known (after a restart, its first sync
        // tells): every report of the task running tries again.
        let open = |entry: &TaskEntry| {
            let (Some(settings), Some(service), Some(addr)) = (&http, &service, node.ingress())
            else {
                return;
            };
            if entry.http.get().is_some() || entry.state.lock().expect("task lock").reason.is_some()
            {
                return;
            }
            let slot = HttpTask::remote(
                task_id.clone(),
                service.clone(),
                settings.clone(),
                node.clone(),
                addr,
                self.forwarder.clone(),
                self.metrics.clone(),
            );
            if entry.http.set(slot.clone()).is_ok() && !stop.is_stopped() {
                self.backends.add(slot);
            }
        };
        let close = |entry: &TaskEntry| {
            if let Some(slot) = entry.http.get() {
                self.backends.remove(slot);
            }
        };
        if *entry.status.borrow() == TaskStatus::Running {
            // Adopted after a restart, running already.
            open(&entry);
        }
        loop {
            tokio::select! {
                update = rx.recv() => match update {
                    Some(Update::Status(status, started_at)) => {
                        let current = *entry.status.borrow();
                        if current == TaskStatus::Provisioning {
                            self.transition(&entry, TaskStatus::Pending, |_| {});
                        }
                        if status == TaskStatus::Running && current != TaskStatus::Running {
                            let at = started_at.unwrap_or_else(model::now);
                            self.transition(&entry, TaskStatus::Running, |t| t.started_at = Some(at));
                            self.metrics
                                .task_start_latency
                                .observe(accepted.elapsed().as_secs_f64());
                            self.metrics.task_starts.inc();
                            if service.is_some() {
                                self.service_changed.notify_one();
                            }
                        }
                        if status == TaskStatus::Running {
                            open(&entry);
                        }
                    }
                    Some(Update::Finished(outcome, done)) => {
                        close(&entry);
                        let durable = self.finish_durably(&entry, outcome).await;
                        node.release(&task_id);
                        // Only a durable outcome is acknowledged: the node
                        // keeps the others in its outbox.
                        if durable {
                            let _ = done.send(());
                        }
                        return;
                    }
                    None => {
                        close(&entry);
                        let why = node
                            .lost_reason()
                            .unwrap_or_else(|| format!("node {} was lost", node.name));
                        let outcome = Outcome::not_started(StopCode::NodeLost, why);
                        return self.finish(&entry, outcome).await;
                    }
                },
                () = stop.wait(), if !stop_sent => {
                    stop_sent = true;
                    // Out of the backends first, then the node drains it.
                    close(&entry);
                    node.order_stop(&task_id);
                }
            }
        }
    }

    /// Takes back, after a restart, a task an edge node was running: its
    /// record is live again and follows what the node reports (or stops
    /// `NodeLost` if the node does not come back in time).
    pub(crate) fn adopt(
        self: &Arc<Self>,
        mut task: Task,
        memory: u64,
        logs: Option<LogPage>,
        http: Option<model::HttpSettings>,
    ) {
        let Some(node) = self.fleet.get(&task.node) else {
            return;
        };
        task.replica = self.replica.clone();
        let repository = String::new();
        let (status, _) = watch::channel(task.status);
        // A stop asked for before the restart is passed on.
        let reason = (task.desired_status == TaskStatus::Stopped).then(|| StopReason {
            code: StopCode::UserStopped,
            message: "stopped while the server restarted".into(),
        });
        let entry = Arc::new(TaskEntry {
            state: Mutex::new(EntryState {
                task: task.clone(),
                stop: Some(StopSignal::new()),
                reason,
                finishing: false,
            }),
            logs: LogBuffer::new(self.log_retention),
            status,
            http: OnceLock::new(),
        });
        // The output kept at the last shutdown comes first.
        for line in logs.map(|p| p.lines).unwrap_or_default() {
            let stream = wharf_runtime::Stream::named(&line.stream);
            entry
                .logs
                .write(stream, format!("{}\n", line.text).as_bytes());
        }
        self.live.insert(task.id.clone(), entry.clone());
        self.metrics
            .tasks
            .with_label_values(&[task.status.as_str()])
            .inc();
        let (tx, rx) = mpsc::unbounded_channel();
        node.hold(&task.id, None, memory, task.service.clone(), repository, tx);
        self.executor.spawn_beside(self.clone().follow_remote(
            entry,
            node,
            rx,
            Instant::now(),
            http,
        ));
    }

    /// An HTTP task: a server slot that holds the component's
    /// pre-instantiation and serves requests from the ingress until it is
    /// asked to stop, then drains (no new requests; those in flight may
    /// finish within the deregistration delay).
    async fn serve_http(
        self: Arc<Self>,
        entry: Arc<TaskEntry>,
        launch: Launch,
        artifact: Arc<wharf_runtime::Artifact>,
        stop: Arc<StopSignal>,
    ) {
        let def = &launch.def;
        if artifact.kind() != wharf_runtime::ArtifactKind::HttpProxy {
            let outcome = Outcome::not_started(
                StopCode::FailedToStart,
                format!(
                    "kind \"http\" needs a component that exports wasi:http/incoming-handler; this artifact is a {:?}",
                    artifact.kind()
                ),
            );
            return self.finish(&entry, outcome).await;
        }
        let Some(settings) = def.http.clone() else {
            let outcome = Outcome::not_started(StopCode::FailedToStart, "no http settings");
            return self.finish(&entry, outcome).await;
        };
        let Some(service) = launch.service.clone() else {
            let outcome =
                Outcome::not_started(StopCode::FailedToStart, "http tasks run in services");
            return self.finish(&entry, outcome).await;
        };
        let mut spec = TaskSpec::new(entry.logs.clone());
        spec.program = def.family.clone();
        spec.env = launch.env.into_iter().collect();
        spec.limits = wharf_runtime::Limits {
            fuel: launch.limits.fuel,
            memory: launch.limits.memory_bytes,
            timeout: Some(Duration::from_millis(settings.request_timeout_ms)),
        };
        let task_id = entry.state.lock().expect("task lock").task.id.clone();
        let slot = HttpTask::new(
            task_id,
            service,
            artifact,
            spec,
            settings.clone(),
            self.outbound_check.clone(),
            self.executor.clone(),
            self.metrics.clone(),
        );
        let _ = entry.http.set(slot.clone());
        if let Err(outcome) = slot
            .become_healthy(
                settings.health_check.as_deref(),
                self.health_check_grace,
                &stop,
            )
            .await
        {
            return self.finish(&entry, outcome).await;
        }
        let now = model::now();
        self.transition(&entry, TaskStatus::Running, |t| t.started_at = Some(now));
        self.metrics.task_starts.inc();
        self.backends.add(slot.clone());
        self.service_changed.notify_one();
        let running = Instant::now();
        stop.wait().await;
        // No new requests from here; those in flight may finish.
        self.backends.remove(&slot);
        let outcome = slot
            .wind_down(self.deregistration_delay, running, &entry.logs)
            .await;
        self.finish(&entry, outcome).await;
    }

    /// Records a task's outcome ([`finish_durably`](Self::finish_durably)
    /// without its answer).
    fn finish<'a>(
        &'a self,
        entry: &'a Arc<TaskEntry>,
        outcome: Outcome,
    ) -> impl Future<Output = ()> + Send + 'a {
        let durable = self.finish_durably(entry, outcome);
        async move {
            durable.await;
        }
    }

    /// Records a task's outcome; whether the final record was committed.
    /// Boxed: every task's driver or follower awaits it once, at its end,
    /// and inline its ~1,000 bytes would size that future for the task's
    /// whole life.
    fn finish_durably<'a>(
        &'a self,
        entry: &'a Arc<TaskEntry>,
        outcome: Outcome,
    ) -> Pin<Box<dyn Future<Output = bool> + Send + 'a>> {
        Box::pin(self.record_outcome(entry, outcome))
    }

    async fn record_outcome(&self, entry: &Arc<TaskEntry>, mut outcome: Outcome) -> bool {
        let now = SystemTime::now();
        let (task, from, committed) = {
            let mut st = entry.state.lock().expect("task lock");
            if let Some(reason) = &st.reason
                && matches!(outcome.stop_code, StopCode::UserStopped)
            {
                outcome.stop_code = reason.code;
                outcome.message = reason.message.clone();
            }
            let from = st.task.status;
            // The entry keeps showing the last durable status until the
            // final record is committed; the record is built aside.
            let mut t = st.task.clone();
            t.status = TaskStatus::Stopped;
            t.desired_status = TaskStatus::Stopped;
            t.stop_code = Some(outcome.stop_code.as_str().to_owned());
            t.exit_code = outcome.exit_code;
            t.fuel_consumed = Some(outcome.fuel_consumed);
            t.peak_memory_bytes = Some(outcome.peak_memory_bytes);
            t.duration_ms = Some(outcome.duration_ms);
            t.message = Some(outcome.message.clone());
            if t.started_at.is_none() && outcome.duration_ms > 0.0 {
                let ran = Duration::from_secs_f64(outcome.duration_ms / 1000.0);
                t.started_at = Some(model::timestamp(now - ran));
            }
            t.stopped_at = Some(model::timestamp(now));
            if let Some(slot) = entry.http.get() {
                t.http = Some(slot.stats().0);
            }
            st.finishing = true;
            // Queued under the lock, after every earlier record of the task.
            let committed = self.queue_final(entry, &t);
            (t, from, committed)
        };
        // The stopped record becomes visible only once it is durable. A
        // failed commit (a full disk, a database away) is retried: until
        // then the task shows its last durable status and stays live.
        let mut committed = committed;
        let mut backoff = FINAL_RETRY_FIRST;
        let durable = loop {
            match committed.wait().await {
                Ok(()) => break true,
                // Shutting down: the next start marks the task lost.
                Err(e) if self.draining() => {
                    tracing::error!(task = %task.id, error = %e, "cannot record a stopped task");
                    break false;
                }
                Err(e) => {
                    tracing::error!(
                        task = %task.id,
                        error = %e,
                        retry_in_ms = backoff.as_millis() as u64,
                        "cannot record a stopped task; retrying"
                    );
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(FINAL_RETRY_MAX);
                    // No lock needed: while `finishing`, nothing else
                    // queues a record of this task.
                    committed = self.queue_final(entry, &task);
                }
            }
        };
        entry.state.lock().expect("task lock").task = task.clone();
        // One record from here on, shared by `Recent` and the reconciler:
        // no copy per stop for either (the stop path runs 20,000 times a
        // second at 8 clients × 10 tasks).
        let task = Arc::new(task);
        if durable {
            self.recent().put(task.clone(), Instant::now());
        }
        self.metrics.tasks.with_label_values(&[from.as_str()]).dec();
        self.metrics
            .task_stops
            .with_label_values(&[outcome.stop_code.as_str()])
            .inc();
        self.metrics
            .task_duration
            .observe(outcome.duration_ms / 1000.0);
        self.metrics.fuel_consumed.inc_by(outcome.fuel_consumed);
        if let Some(ms) = outcome.instantiate_ms {
            self.metrics.instantiate.observe(ms / 1000.0);
        }
        if self.live.remove(&task.id).is_some() && task.node == self.local_name {
            let mut counts = self.counts();
            if let Some(n) = counts.get_mut(&task.service) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    counts.remove(&task.service);
                }
            }
        }
        // Ends the streams that follow it (the executor closes the buffer
        // of a task it ran; a task on a node, or one that never started,
        // ends here).
        entry.logs.close();
        entry.status.send_replace(TaskStatus::Stopped);
        let _ = self.stopped.send(task);
        durable
    }

    /// Queues a task's final record and its retained output, to wait for.
    fn queue_final(&self, entry: &TaskEntry, task: &Task) -> crate::writer::Committed {
        let page = convert_page(entry.logs.read_from(0, usize::MAX));
        self.writer.queue_acked(vec![
            Write::Task(Box::new(task.clone())),
            Write::TaskLogs(task.id.clone(), Box::new(page)),
        ])
    }

    /// Asks a task to stop with `reason`. `Ok(None)`: no such task.
    pub(crate) async fn stop(&self, id: &str, reason: StopReason) -> Result<Option<Task>> {
        let Some(entry) = self.live.get(id).map(|e| e.clone()) else {
            return self.stored(id).await;
        };
        let mut st = entry.state.lock().expect("task lock");
        if st.reason.is_none() && !st.finishing && st.task.status != TaskStatus::Stopped {
            st.reason = Some(reason);
            st.task.desired_status = TaskStatus::Stopped;
            if let Some(stop) = &st.stop {
                stop.stop();
            }
            // Queued under the lock, so a final record queued by the
            // task's driver cannot be overtaken by this older one.
            self.writer.send(Write::Task(Box::new(st.task.clone())));
        }
        Ok(Some(st.task.clone()))
    }

    /// One task, live or stored.
    pub(crate) async fn get(&self, id: &str) -> Result<Option<Task>> {
        if let Some(entry) = self.live.get(id).map(|e| e.clone()) {
            return Ok(Some(entry.snapshot()));
        }
        self.stored(id).await
    }

    /// A task that is not live: one that stopped here lately, or the
    /// store's record.
    async fn stored(&self, id: &str) -> Result<Option<Task>> {
        if let Some(task) = self.recent().get(id, Instant::now()) {
            return Ok(Some(task));
        }
        Ok(self.store.task(id).await?)
    }

    fn recent(&self) -> std::sync::MutexGuard<'_, Recent> {
        self.recent.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Forgets the tasks that stopped lately (stopped tasks were pruned
    /// from the store: a describe must not show one that is gone).
    pub(crate) fn forget_recent(&self) {
        *self.recent() = Recent::default();
    }

    /// Waits up to `timeout` for a live task to stop, then returns it.
    pub(crate) async fn wait_stopped(&self, id: &str, timeout: Duration) -> Result<Option<Task>> {
        if let Some(entry) = self.live.get(id).map(|e| e.clone()) {
            let mut rx = entry.status.subscribe();
            let _ = tokio::time::timeout(timeout, rx.wait_for(|s| *s == TaskStatus::Stopped)).await;
            // STOPPED is published after the final record is committed, and
            // the entry already holds that record.
            if *rx.borrow() == TaskStatus::Stopped {
                return Ok(Some(entry.snapshot()));
            }
        }
        self.get(id).await
    }

    /// Live tasks of a service.
    pub(crate) fn live_of_service(&self, service: &str) -> Vec<Task> {
        self.live_where(|t| t.service.as_deref() == Some(service))
    }

    /// Live tasks matching `keep`.
    pub(crate) fn live_where(&self, keep: impl Fn(&Task) -> bool) -> Vec<Task> {
        self.live
            .iter()
            .filter_map(|e| {
                let entry = e.value();
                if entry.http.get().is_some() {
                    let kept = keep(&entry.state.lock().expect("task lock").task);
                    return kept.then(|| entry.snapshot());
                }
                let st = entry.state.lock().expect("task lock");
                keep(&st.task).then(|| st.task.clone())
            })
            .collect()
    }

    /// A page of a task's output from `from`. `Ok(None)`: no such task.
    pub(crate) async fn logs(&self, id: &str, from: u64, max: usize) -> Result<Option<LogPage>> {
        if let Some(entry) = self.live.get(id).map(|e| e.clone()) {
            return Ok(Some(convert_page(entry.logs.read_from(from, max))));
        }
        if self.stored(id).await?.is_none() {
            return Ok(None);
        }
        let mut page = self.store.task_logs(id).await?.unwrap_or(LogPage {
            lines: Vec::new(),
            next_seq: 0,
            missed: 0,
            closed: true,
        });
        let first = page.lines.first().map_or(page.next_seq, |l| l.seq);
        page.missed = first.saturating_sub(from);
        page.lines.retain(|l| l.seq >= from);
        if page.lines.len() > max {
            page.lines.truncate(max);
            page.next_seq = page.lines.last().map_or(from, |l| l.seq + 1);
            page.closed = false;
        } else {
            page.next_seq = page.next_seq.max(from);
        }
        Ok(Some(page))
    }

    /// The live log buffer of a task, for following.
    pub(crate) fn log_buffer(&self, id: &str) -> Option<Arc<LogBuffer>> {
        self.live.get(id).map(|e| e.logs.clone())
    }

    /// A live task's output and its status: a follower of the output ends
    /// when the task is `STOPPED` (its final record durable), not when the
    /// buffer closes, which happens as the guest ends, a commit earlier.
    pub(crate) fn log_follow(
        &self,
        id: &str,
    ) -> Option<(Arc<LogBuffer>, watch::Receiver<TaskStatus>)> {
        self.live
            .get(id)
            .map(|e| (e.logs.clone(), e.status.subscribe()))
    }

    /// Whether a live task runs on this server (not on an edge node).
    fn is_local(&self, entry: &TaskEntry) -> bool {
        let node = &entry.state.lock().expect("task lock").task.node;
        *node == self.local_name || node.is_empty()
    }

    /// The nodes operators are draining: their service tasks move.
    pub(crate) fn draining_nodes(&self) -> std::collections::HashSet<String> {
        let mut nodes: std::collections::HashSet<String> = self
            .fleet
            .all()
            .iter()
            .map(|n| n.view())
            .filter(|n| n.status == model::NodeStatus::Draining)
            .map(|n| n.name)
            .collect();
        if self.node_status() == model::NodeStatus::Draining {
            nodes.insert(self.local_name.clone());
        }
        nodes
    }

    /// Refuses new tasks, stops every live task of the local node with a
    /// recorded reason and waits (up to `grace`) for their records. Tasks
    /// on edge nodes run on: their records stay as they are, and the next
    /// start takes them back.
    pub(crate) async fn shutdown(&self, grace: Duration) {
        self.draining.store(true, Ordering::Release);
        let ids: Vec<String> = self
            .live
            .iter()
            .filter(|e| self.is_local(e.value()))
            .map(|e| e.key().clone())
            .collect();
        for id in ids {
            let _ = self
                .stop(
                    &id,
                    StopReason {
                        code: StopCode::UserStopped,
                        message: "the server shut down".into(),
                    },
                )
                .await;
        }
        let deadline = Instant::now() + grace;
        while self.live.iter().any(|e| self.is_local(e.value())) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // The output the edge nodes' tasks have sent so far is kept for
        // the next start, which takes the tasks back.
        for e in &self.live {
            if self.is_local(e.value()) {
                continue;
            }
            let page = convert_page(e.logs.read_from(0, usize::MAX));
            self.writer
                .send(Write::TaskLogs(e.key().clone(), Box::new(page)));
        }
    }

    /// Whether new tasks are refused.
    pub(crate) fn draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::tests::task;

    #[test]
    fn recent_tasks_are_bounded_in_count_and_age() {
        let t0 = Instant::now();
        let mut recent = Recent::default();
        for i in 0..=RECENT_TASKS {
            recent.put(Arc::new(task(&format!("t{i}"), TaskStatus::Stopped)), t0);
        }
        // The oldest made room for the newest.
        assert_eq!(recent.get("t0", t0), None);
        assert_eq!(recent.tasks.len(), RECENT_TASKS);
        assert_eq!(recent.order.len(), RECENT_TASKS);
        let newest = format!("t{RECENT_TASKS}");
        assert_eq!(recent.get(&newest, t0).map(|t| t.id), Some(newest.clone()));
        // Kept until RECENT_FOR has passed, then gone, all of them.
        let late = t0 + RECENT_FOR - Duration::from_millis(1);
        assert!(recent.get(&newest, late).is_some());
        assert_eq!(recent.get(&newest, t0 + RECENT_FOR), None);
        assert!(recent.tasks.is_empty() && recent.order.is_empty());
    }
}
