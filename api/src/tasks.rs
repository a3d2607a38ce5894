//! The local node's tasks: each accepted task gets a record and a driver
//! that walks it through `PROVISIONING → PENDING → RUNNING → STOPPED` on
//! the runtime's [`Executor`], writing each step to the state store.
//!
//! Live tasks are kept in memory (their logs, stop handles and status
//! watchers live here); a stopped task's final record and retained output
//! are committed before anyone can see it stopped, and then it lives only
//! in the store.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use dashmap::DashMap;
use tokio::sync::{Notify, mpsc, watch};
use wharf_runtime::{Executor, LogBuffer, Outcome, StopCode, StopSignal, TaskPhase, TaskSpec};

use crate::artifacts::Artifacts;
use crate::db::{StateStore, Write};
use crate::error::{ApiError, Result};
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
    live: DashMap<String, Arc<TaskEntry>>,
    executor: Executor,
    artifacts: Arc<Artifacts>,
    writer: Writer,
    store: Arc<dyn StateStore>,
    metrics: Metrics,
    log_retention: usize,
    stopped: mpsc::UnboundedSender<Task>,
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
    node_labels: Mutex<BTreeMap<String, String>>,
}

/// Time between health checks of a starting HTTP task.
const HEALTH_CHECK_EVERY: Duration = Duration::from_millis(250);

/// The node name tasks of this server report.
pub(crate) const LOCAL_NODE: &str = "local";

/// A runtime log line as the API shows it.
pub(crate) fn convert_line(l: wharf_runtime::LogLine) -> LogEntry {
    LogEntry {
        seq: l.seq,
        at: model::timestamp(l.at),
        stream: match l.stream {
            wharf_runtime::Stream::Stdout => "stdout".into(),
            wharf_runtime::Stream::Stderr => "stderr".into(),
        },
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
        stopped: mpsc::UnboundedSender<Task>,
        service_changed: Arc<Notify>,
        deregistration_delay: Duration,
        health_check_grace: Duration,
        outbound_check: wharf_runtime::AddressCheck,
    ) -> Self {
        Tasks {
            live: DashMap::new(),
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
        }
    }

    /// Sets the local node's labels.
    pub(crate) fn set_node_labels(&self, labels: BTreeMap<String, String>) {
        *self.node_labels.lock().unwrap_or_else(|p| p.into_inner()) = labels;
    }

    /// The first placement constraint of `def` the local node does not
    /// meet, and the node's labels.
    fn unmet_constraint(&self, def: &TaskDefinition) -> Option<(String, String)> {
        if def.placement_constraints.is_empty() {
            return None;
        }
        let labels = self.node_labels.lock().unwrap_or_else(|p| p.into_inner());
        def.placement_constraints
            .iter()
            .find(|c| {
                crate::nodes::Constraint::parse(c).is_ok_and(|parsed| !parsed.matches(&labels))
            })
            .map(|c| {
                let shown: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
                (c.clone(), shown.join(","))
            })
    }

    /// The local node's status.
    pub(crate) fn node_status(&self) -> model::NodeStatus {
        *self.node_status.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sets the local node's status.
    pub(crate) fn set_node_status(&self, status: model::NodeStatus) {
        *self.node_status.lock().unwrap_or_else(|p| p.into_inner()) = status;
    }

    /// Tasks that have not stopped.
    pub(crate) fn live_count(&self) -> usize {
        self.live.len()
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
            id: uuid::Uuid::new_v4().simple().to_string(),
            task_definition: def.task_definition.clone(),
            family: def.family.clone(),
            service: launch.service.clone(),
            deployment_id: launch.deployment_id.clone(),
            node: LOCAL_NODE.into(),
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
        let status = self.node_status();
        if status != model::NodeStatus::Ready {
            let outcome = Outcome::not_started(
                StopCode::FailedToStart,
                format!(
                    "no READY node: {LOCAL_NODE} is {} (wharf node activate {LOCAL_NODE})",
                    serde_json::to_value(status)
                        .ok()
                        .and_then(|v| v.as_str().map(str::to_owned))
                        .unwrap_or_default()
                ),
            );
            return self.finish(&entry, outcome).await;
        }
        if let Some(missing) = def
            .requires_interfaces
            .iter()
            .find(|i| !crate::nodes::provides(wharf_runtime::PROVIDED_INTERFACES, i))
        {
            let outcome = Outcome::not_started(
                StopCode::FailedToStart,
                format!("no READY node provides {missing} (the artifact imports it)"),
            );
            return self.finish(&entry, outcome).await;
        }
        if let Some((constraint, labels)) = self.unmet_constraint(def) {
            let outcome = Outcome::not_started(
                StopCode::FailedToStart,
                format!(
                    "no READY node meets the constraint {constraint:?} ({LOCAL_NODE} has labels [{labels}])"
                ),
            );
            return self.finish(&entry, outcome).await;
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
            return self.serve_http(entry, launch, artifact, early).await;
        }
        let mut spec = TaskSpec::new(entry.logs.clone());
        spec.program = def.family.clone();
        spec.args = launch.args.clone();
        spec.env = launch.env.into_iter().collect();
        spec.limits = wharf_runtime::Limits {
            fuel: launch.limits.fuel,
            memory: launch.limits.memory_bytes,
            timeout: launch.limits.timeout_ms.map(Duration::from_millis),
        };
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
        let began = Instant::now();
        if let Some(path) = &settings.health_check {
            let deadline = began + self.health_check_grace;
            loop {
                let checked = tokio::select! {
                    biased;
                    () = stop.wait() => {
                        let outcome = Outcome::not_started(StopCode::UserStopped, "stopped before its health check passed");
                        return self.finish(&entry, outcome).await;
                    }
                    checked = slot.check_health(path) => checked,
                };
                match checked {
                    Ok(()) => break,
                    Err(why) if Instant::now() >= deadline => {
                        let outcome = Outcome::not_started(
                            StopCode::FailedToStart,
                            format!(
                                "its health check did not pass within {}: {why}",
                                humantime::format_duration(self.health_check_grace)
                            ),
                        );
                        return self.finish(&entry, outcome).await;
                    }
                    Err(_) => tokio::time::sleep(HEALTH_CHECK_EVERY).await,
                }
            }
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
        let left = slot.drain(self.deregistration_delay).await;
        if left > 0 {
            entry.logs.write(
                wharf_runtime::Stream::Stderr,
                format!(
                    "wharf: {left} requests were still in flight after the deregistration delay of {}s\n",
                    self.deregistration_delay.as_secs()
                )
                .as_bytes(),
            );
        }
        let (_, fuel) = slot.stats();
        let mut outcome = Outcome::not_started(StopCode::UserStopped, "");
        outcome.fuel_consumed = fuel;
        outcome.duration_ms = running.elapsed().as_secs_f64() * 1000.0;
        self.finish(&entry, outcome).await;
    }

    async fn finish(&self, entry: &Arc<TaskEntry>, mut outcome: Outcome) {
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
            let page = convert_page(entry.logs.read_from(0, usize::MAX));
            // Queued under the lock, after every earlier record of the task.
            let committed = self.writer.queue_acked(vec![
                Write::Task(Box::new(t.clone())),
                Write::TaskLogs(t.id.clone(), Box::new(page)),
            ]);
            (t, from, committed)
        };
        // The stopped record becomes visible only once it is durable.
        if let Err(e) = committed.wait().await {
            tracing::error!(task = %task.id, error = %e, "cannot record a stopped task");
        }
        entry.state.lock().expect("task lock").task = task.clone();
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
        self.live.remove(&task.id);
        entry.status.send_replace(TaskStatus::Stopped);
        let _ = self.stopped.send(task);
    }

    /// Asks a task to stop with `reason`. `Ok(None)`: no such task.
    pub(crate) async fn stop(&self, id: &str, reason: StopReason) -> Result<Option<Task>> {
        let Some(entry) = self.live.get(id).map(|e| e.clone()) else {
            return Ok(self.store.task(id).await?);
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
        Ok(self.store.task(id).await?)
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
        if self.store.task(id).await?.is_none() {
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

    /// Refuses new tasks, stops every live one with a recorded reason and
    /// waits (up to `grace`) for their records.
    pub(crate) async fn shutdown(&self, grace: Duration) {
        self.draining.store(true, Ordering::Release);
        let ids: Vec<String> = self.live.iter().map(|e| e.key().clone()).collect();
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
        while !self.live.is_empty() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Whether new tasks are refused.
    pub(crate) fn draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }
}
