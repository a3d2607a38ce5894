//! Edge nodes as the server sees them, and the protocol they speak.
//!
//! A node opens every connection (it may sit behind NAT; the server never
//! dials it). It joins once with a join token and gets a credential; from
//! then on it long-polls `POST /v1/agent/sync` with a [`Report`] — its
//! capacity, engine, labels, and every task it holds (status, new log
//! lines, outcome) — and the server answers at once when it has something
//! for the node, or after the node's `wait_ms` otherwise, with a
//! [`SyncResponse`]: new [`Assignment`]s, tasks to stop, and the finished
//! tasks whose outcomes are durable (the node forgets them then). Each
//! sync is a heartbeat; a node silent for the heartbeat timeout is
//! `LOST` and its tasks stop `NodeLost`.
//!
//! The exchange is level-triggered, so a lost answer, a restart of either
//! side, or a partition converge by the next sync: a task the node reports
//! that the server does not hold for it is stopped; a task the server
//! holds that the node acknowledged (or was sent under this server
//! process) and no longer reports stops `NodeLost`; assignments the node
//! has not confirmed are sent again.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, mpsc, oneshot};
use wharf_runtime::Outcome;

use crate::model::{self, NodeStatus, TaskLimits, TaskStatus};

/// The prefix of join tokens (`WJ1.<CA fingerprint or none>.<secret>`).
pub const JOIN_TOKEN_PREFIX: &str = "WJ1";

/// The longest a sync may be held open by the server.
pub const MAX_WAIT: Duration = Duration::from_secs(30);

/// The most log bytes a node sends in one report (a chatty guest cannot
/// make one request, or the server's memory for it, grow without bound).
pub const MAX_REPORT_LOG_BYTES: usize = 256 << 10;

/// Splits a join token into the CA fingerprint it pins (`None`: the server
/// had no TLS) and the secret.
pub fn parse_join_token(token: &str) -> Option<(Option<String>, String)> {
    let mut parts = token.trim().splitn(3, '.');
    let (prefix, fp, secret) = (parts.next()?, parts.next()?, parts.next()?);
    if prefix != JOIN_TOKEN_PREFIX || secret.is_empty() {
        return None;
    }
    let fp = (fp != "none").then(|| fp.to_owned());
    Some((fp, secret.to_owned()))
}

/// `POST /v1/agent/join`: the node's name and labels (the join token is
/// the bearer credential).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JoinRequest {
    /// The name it asks for (unique in the cluster).
    pub name: String,
    /// Its own labels (the join token's win).
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

/// The answer to a join: the node's credential, shown once.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JoinResponse {
    /// The node's name.
    pub name: String,
    /// Its credential for every later call.
    pub credential: String,
    /// Its labels as the server keeps them.
    pub labels: BTreeMap<String, String>,
}

/// What a node says about itself in every report.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    /// Task slots.
    pub slots: u64,
    /// Its memory budget for tasks (absent: none).
    pub memory_bytes: Option<u64>,
    /// Slots free now.
    pub free_slots: u64,
    /// Budget free now.
    pub free_memory_bytes: Option<u64>,
    /// Wharf's version.
    pub version: String,
    /// The engine's version.
    pub engine_version: String,
    /// Its engine's compatibility hash.
    pub compatibility_hash: String,
    /// CPU architecture.
    pub arch: String,
    /// Operating system.
    pub os: String,
    /// The WASI interfaces its runtime provides.
    pub wasi_interfaces: Vec<String>,
    /// Where its ingress takes requests (`IP:PORT`), if it has one
    /// (`wharf node join --ingress`): the server forwards its share of the
    /// HTTP services' traffic there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ingress: Option<String>,
}

/// One line of a task's output, numbered by the node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReportedLine {
    /// The node's sequence number of the line.
    pub seq: u64,
    /// `stdout` or `stderr`.
    pub stream: String,
    /// The line, without its newline.
    pub text: String,
}

/// A task as its node reports it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskReport {
    /// The task's id.
    pub id: String,
    /// `PROVISIONING` (fetching), `PENDING`, `RUNNING` or `STOPPED`.
    pub status: TaskStatus,
    /// When its guest started.
    #[serde(default)]
    pub started_at: Option<String>,
    /// Output lines not yet confirmed by the server.
    #[serde(default)]
    pub logs: Vec<ReportedLine>,
    /// How it ended, once it has.
    #[serde(default)]
    pub outcome: Option<Outcome>,
}

/// `POST /v1/agent/sync`: a heartbeat and a long poll.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    /// The server process the node last heard from (its `epoch`), empty at
    /// first: sequence numbers are that process's.
    #[serde(default)]
    pub epoch: String,
    /// The highest assignment sequence number the node has applied.
    #[serde(default)]
    pub seen: u64,
    /// The node process (random per start): a new one holds none of the
    /// tasks of the one before.
    #[serde(default)]
    pub boot: String,
    /// The report's number within its boot: an older report overtaken by
    /// a newer one proves no task gone.
    #[serde(default)]
    pub report_seq: u64,
    /// How long the server may hold the answer when it has nothing new
    /// (capped at [`MAX_WAIT`]; 0: answer at once).
    #[serde(default)]
    pub wait_ms: u64,
    /// The node.
    pub info: NodeInfo,
    /// Every task the node holds: running, or finished and not yet
    /// confirmed.
    #[serde(default)]
    pub tasks: Vec<TaskReport>,
}

/// What the server wants of a node.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SyncResponse {
    /// The server process's epoch, to send back.
    pub epoch: String,
    /// Tasks to start.
    pub assign: Vec<Assignment>,
    /// Tasks to stop (also those the server no longer holds for the node).
    pub stop: Vec<String>,
    /// Finished tasks whose outcomes are durable: forget them.
    pub ack: Vec<String>,
    /// How often to sync when nothing happens, in milliseconds.
    pub heartbeat_ms: u64,
    /// The routes of the HTTP services with tasks on the node, by
    /// service: its ingress routes by them.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub routes: BTreeMap<String, Vec<String>>,
}

/// A task placed on a node: everything it needs to run it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Assignment {
    /// The sequence number (per server process and node).
    pub seq: u64,
    /// The task's id.
    pub task_id: String,
    /// The program name (`argv[0]`).
    pub family: String,
    /// The repository of the server's registry holding the artifact.
    pub repository: String,
    /// The digest of the Wasm layer, pulled by digest and verified.
    pub wasm_digest: String,
    /// Arguments after the program name.
    pub args: Vec<String>,
    /// Environment, with the values of its secrets.
    pub env: BTreeMap<String, String>,
    /// Limits.
    pub limits: TaskLimits,
    /// The service it belongs to.
    pub service: Option<String>,
    /// For a task of an HTTP service: how it serves.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpAssignment>,
    /// A benchmark: run it this many times, each run a line of output.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bench: Option<model::BenchRequest>,
}

/// How a node serves an HTTP task: its definition's settings and the
/// server's health check and drain timing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HttpAssignment {
    /// The task definition's `[http]` settings.
    pub settings: model::HttpSettings,
    /// How long its health check may take to pass, in milliseconds.
    pub health_check_grace_ms: u64,
    /// How long requests in flight may finish after a stop, in ms.
    pub deregistration_delay_ms: u64,
}

/// What the node said about a task, for the task's driver.
#[derive(Debug)]
pub(crate) enum Update {
    /// It reached `PENDING` or `RUNNING` (with the guest's start time).
    Status(TaskStatus, Option<String>),
    /// It ended; the sender is told once the record is durable.
    Finished(Outcome, oneshot::Sender<()>),
}

/// A task the server holds for a node.
struct Held {
    seq: u64,
    /// `None` for a task adopted after a restart (the node has it).
    assignment: Option<Assignment>,
    stop: bool,
    /// The node has reported it at least once.
    acknowledged: bool,
    /// The next node log sequence number to accept.
    log_next: u64,
    memory: u64,
    service: Option<String>,
    repository: String,
    updates: mpsc::UnboundedSender<Update>,
    /// Its outcome was handed to its follower, whose commit may still be
    /// running (or retrying): not handed again.
    finishing: bool,
}

struct NodeBook {
    status: NodeStatus,
    lost: Option<String>,
    labels: Arc<BTreeMap<String, String>>,
    info: Option<NodeInfo>,
    /// The interfaces of `info`, shared with placement.
    interfaces: Arc<Vec<String>>,
    /// Memory reserved by the tasks held, and their count per service
    /// (kept as tasks come and go: placement reads them per node).
    reserved: u64,
    by_service: HashMap<String, u64>,
    last_seen: Instant,
    last_heartbeat: Option<String>,
    seq: u64,
    held: HashMap<String, Held>,
    /// The node process last heard from, and its newest report.
    boot: Option<String>,
    report_seq: u64,
    /// Its ingress as the server accepted it, or why it did not.
    ingress: Option<std::result::Result<std::net::SocketAddr, String>>,
}

impl NodeBook {
    fn insert(&mut self, id: String, held: Held) {
        self.reserved += held.memory;
        if let Some(s) = &held.service {
            *self.by_service.entry(s.clone()).or_insert(0) += 1;
        }
        if let Some(old) = self.held.insert(id, held) {
            self.forget(&old);
        }
    }

    fn take(&mut self, id: &str) -> Option<Held> {
        let held = self.held.remove(id)?;
        self.forget(&held);
        Some(held)
    }

    fn forget(&mut self, held: &Held) {
        self.reserved = self.reserved.saturating_sub(held.memory);
        if let Some(s) = &held.service
            && let Some(n) = self.by_service.get_mut(s)
        {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.by_service.remove(s);
            }
        }
    }

    fn clear(&mut self) -> HashMap<String, Held> {
        self.reserved = 0;
        self.by_service.clear();
        std::mem::take(&mut self.held)
    }
}

/// An edge node as the server sees it.
pub(crate) struct RemoteNode {
    pub(crate) name: String,
    book: Mutex<NodeBook>,
    /// Woken when there is something new for the node.
    changed: Notify,
    /// Long polls begun: a new one ends the one before, so a node (or a
    /// stolen credential) holds one at a time.
    polls: std::sync::atomic::AtomicU64,
}

/// What placement needs to know of a node.
#[derive(Debug, Clone)]
pub(crate) struct Candidate {
    pub(crate) name: String,
    pub(crate) status: NodeStatus,
    pub(crate) labels: Arc<BTreeMap<String, String>>,
    pub(crate) interfaces: Arc<Vec<String>>,
    pub(crate) free_slots: u64,
    /// Memory not reserved by tasks placed on it (`None`: no budget).
    pub(crate) free_memory: Option<u64>,
    pub(crate) tasks: u64,
    /// Tasks of the service being placed.
    pub(crate) service_tasks: u64,
    /// Whether it serves HTTP tasks (it has an ingress).
    pub(crate) serves_http: bool,
}

impl RemoteNode {
    fn lock(&self) -> std::sync::MutexGuard<'_, NodeBook> {
        self.book.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Holds a task for the node and wakes its poll. `None` assignment: a
    /// task adopted after the server restarted (acknowledged already).
    pub(crate) fn hold(
        &self,
        task_id: &str,
        assignment: Option<Assignment>,
        memory: u64,
        service: Option<String>,
        repository: String,
        updates: mpsc::UnboundedSender<Update>,
    ) -> bool {
        let mut book = self.lock();
        if book.lost.is_some() {
            return false;
        }
        book.seq += 1;
        let seq = book.seq;
        let acknowledged = assignment.is_none();
        book.insert(
            task_id.to_owned(),
            Held {
                seq,
                assignment: assignment.map(|a| Assignment { seq, ..a }),
                stop: false,
                acknowledged,
                log_next: 0,
                memory,
                service,
                repository,
                updates,
                finishing: false,
            },
        );
        drop(book);
        self.changed.notify_waiters();
        true
    }

    /// Asks the node to stop a task. One the node never acknowledged ends
    /// here (`UserStopped`): should the assignment reach it anyway, the
    /// node reports a task it is not held for and is told to stop it.
    pub(crate) fn order_stop(&self, task_id: &str) {
        let mut book = self.lock();
        let undelivered = book.held.get(task_id).is_some_and(|h| !h.acknowledged);
        if undelivered {
            if let Some(h) = book.take(task_id) {
                let outcome = Outcome::not_started(
                    wharf_runtime::StopCode::UserStopped,
                    "stopped before its node started it",
                );
                let (tx, _rx) = oneshot::channel();
                let _ = h.updates.send(Update::Finished(outcome, tx));
            }
        } else if let Some(h) = book.held.get_mut(task_id) {
            h.stop = true;
        }
        drop(book);
        self.changed.notify_waiters();
    }

    /// Forgets a task (its driver finished it).
    pub(crate) fn release(&self, task_id: &str) {
        self.lock().take(task_id);
    }

    /// Counts as a heartbeat (a poll the server held is answered).
    pub(crate) fn touch(&self) {
        self.lock().last_seen = Instant::now();
    }

    /// Why the node was lost, if it was.
    pub(crate) fn lost_reason(&self) -> Option<String> {
        self.lock().lost.clone()
    }

    /// Whether the node may pull from `repository` (it holds a task whose
    /// artifact is there).
    pub(crate) fn may_pull(&self, repository: &str) -> bool {
        self.lock()
            .held
            .values()
            .any(|h| !h.stop && h.repository == repository)
    }

    /// The node as the API shows it.
    pub(crate) fn view(&self) -> model::Node {
        let book = self.lock();
        let info = book.info.clone().unwrap_or_default();
        let reserved = book.reserved;
        model::Node {
            name: self.name.clone(),
            status: if book.lost.is_some() {
                NodeStatus::Lost
            } else {
                book.status
            },
            local: false,
            labels: (*book.labels).clone(),
            capacity: model::NodeResources {
                slots: info.slots,
                memory_bytes: info.memory_bytes,
            },
            // What the node reports free, less what was placed on it and
            // has not started yet.
            free: model::NodeResources {
                slots: info
                    .free_slots
                    .min(info.slots.saturating_sub(book.held.len() as u64)),
                memory_bytes: info.memory_bytes.map(|m| m.saturating_sub(reserved)),
            },
            running_tasks: book.held.len() as u64,
            last_heartbeat: book.last_heartbeat.clone().unwrap_or_default(),
            version: info.version,
            engine_version: info.engine_version,
            compatibility_hash: info.compatibility_hash,
            arch: info.arch,
            os: info.os,
            wasi_interfaces: info.wasi_interfaces,
            ingress: match &book.ingress {
                Some(Ok(a)) => Some(a.to_string()),
                _ => None,
            },
            ingress_refused: match &book.ingress {
                Some(Err(why)) => Some(why.clone()),
                _ => None,
            },
        }
    }

    /// The node for placement (counting the tasks of `service`), `None`
    /// before its first report.
    pub(crate) fn candidate(&self, service: Option<&str>) -> Option<Candidate> {
        let book = self.lock();
        let info = book.info.as_ref()?;
        Some(Candidate {
            name: self.name.clone(),
            status: if book.lost.is_some() {
                NodeStatus::Lost
            } else {
                book.status
            },
            labels: book.labels.clone(),
            interfaces: book.interfaces.clone(),
            free_slots: info.slots.saturating_sub(book.held.len() as u64),
            free_memory: info.memory_bytes.map(|m| m.saturating_sub(book.reserved)),
            tasks: book.held.len() as u64,
            service_tasks: service.map_or(0, |s| book.by_service.get(s).copied().unwrap_or(0)),
            serves_http: matches!(book.ingress, Some(Ok(_))),
        })
    }

    /// Records the ingress the node advertised, as the server checked it.
    pub(crate) fn set_ingress(
        &self,
        ingress: Option<std::result::Result<std::net::SocketAddr, String>>,
    ) {
        self.lock().ingress = ingress;
    }

    /// The node's accepted ingress address.
    pub(crate) fn ingress(&self) -> Option<std::net::SocketAddr> {
        match self.lock().ingress {
            Some(Ok(a)) => Some(a),
            _ => None,
        }
    }

    /// The services the node holds tasks of.
    pub(crate) fn services(&self) -> Vec<String> {
        self.lock().by_service.keys().cloned().collect()
    }

    /// Sets the operator's status.
    pub(crate) fn set_status(&self, status: NodeStatus) {
        self.lock().status = status;
    }

    /// Marks the node lost with `why`: every task it held stops `NodeLost`
    /// (their drivers see their channels close).
    pub(crate) fn lose(&self, why: String) -> usize {
        self.lose_if(why, |_| true).unwrap_or(0)
    }

    /// [`lose`](Self::lose) if `silent(last heartbeat)` holds, checked
    /// under the same lock; `None` if it did not (or it was lost already).
    fn lose_if(&self, why: String, silent: impl Fn(Instant) -> bool) -> Option<usize> {
        let mut book = self.lock();
        if book.lost.is_some() || !silent(book.last_seen) {
            return None;
        }
        Some(Self::lose_locked(&mut book, why))
    }

    fn lose_locked(book: &mut NodeBook, why: String) -> usize {
        book.lost = Some(why);
        book.clear().len()
    }

    /// Processes a report: the heartbeat, statuses, log lines, outcomes.
    /// Returns the finished tasks' acknowledgements to wait for, and the
    /// ids to acknowledge at once.
    pub(crate) fn receive(
        &self,
        report: &Report,
        epoch: &str,
        logs: &dyn Fn(&str) -> Option<Arc<wharf_runtime::LogBuffer>>,
    ) -> Received {
        let mut book = self.lock();
        book.last_seen = Instant::now();
        book.last_heartbeat = Some(model::now());
        if *book.interfaces != report.info.wasi_interfaces {
            book.interfaces = Arc::new(report.info.wasi_interfaces.clone());
        }
        book.info = Some(report.info.clone());
        if let Some(why) = book.lost.take() {
            tracing::warn!(node = %self.name, was = %why, "a lost node is back");
        }
        let same_epoch = report.epoch == epoch;
        let restarted = book.boot.as_deref().is_some_and(|b| b != report.boot);
        if restarted || book.boot.is_none() {
            book.boot = Some(report.boot.clone());
            book.report_seq = 0;
        }
        let stale = !restarted && report.report_seq < book.report_seq;
        book.report_seq = book.report_seq.max(report.report_seq);
        let mut out = Received::default();
        let mut reported = HashSet::with_capacity(report.tasks.len());
        for t in &report.tasks {
            reported.insert(t.id.as_str());
            let Some(h) = book.held.get_mut(&t.id) else {
                // Not (or no longer) the node's: replaced while it was
                // away, or stopped. Its outcome has nowhere to go.
                if t.outcome.is_some() {
                    out.ack.push(t.id.clone());
                } else {
                    out.stop.push(t.id.clone());
                }
                continue;
            };
            h.acknowledged = true;
            if let Some(buffer) = logs(&t.id) {
                let from = h.log_next;
                for line in t.logs.iter().filter(|l| l.seq >= from) {
                    let stream = wharf_runtime::Stream::named(&line.stream);
                    let mut text = line.text.clone();
                    text.push('\n');
                    buffer.write(stream, text.as_bytes());
                    h.log_next = line.seq + 1;
                }
            }
            match &t.outcome {
                // Being recorded: acknowledged in a later report, once done.
                Some(_) if h.finishing => {}
                Some(outcome) => {
                    let (tx, rx) = oneshot::channel();
                    if h.updates
                        .send(Update::Finished(outcome.clone(), tx))
                        .is_ok()
                    {
                        h.finishing = true;
                        out.finished.push((t.id.clone(), rx));
                    } else {
                        out.ack.push(t.id.clone());
                    }
                }
                None => {
                    if matches!(t.status, TaskStatus::Pending | TaskStatus::Running) {
                        let _ = h
                            .updates
                            .send(Update::Status(t.status, t.started_at.clone()));
                    }
                }
            }
        }
        // Tasks the node had and no longer reports: it restarted. Only a
        // report that is the newest, and made after the node applied the
        // assignment (or from a new node process, or about a task taken
        // back after a server restart), proves it.
        let gone: Vec<String> = book
            .held
            .iter()
            .filter(|(id, h)| {
                !reported.contains(id.as_str())
                    && !stale
                    && (restarted
                        || (h.assignment.is_none() && h.acknowledged)
                        || (same_epoch && report.seen >= h.seq))
            })
            .map(|(id, _)| id.clone())
            .collect();
        for id in gone {
            if let Some(h) = book.take(&id) {
                let mut outcome = Outcome::not_started(
                    wharf_runtime::StopCode::NodeLost,
                    format!("node {} no longer runs it (the node restarted)", self.name),
                );
                outcome.duration_ms = 0.0;
                let (tx, _rx) = oneshot::channel();
                let _ = h.updates.send(Update::Finished(outcome, tx));
            }
        }
        out
    }

    /// What to send the node: assignments past `seen` (all of them when
    /// the node knows another epoch) and stop orders.
    pub(crate) fn pending(&self, report: &Report, epoch: &str) -> (Vec<Assignment>, Vec<String>) {
        let book = self.lock();
        let same_epoch = report.epoch == epoch;
        let mut assign: Vec<Assignment> = book
            .held
            .values()
            .filter(|h| !h.stop && (!same_epoch || h.seq > report.seen))
            .filter_map(|h| h.assignment.clone())
            .collect();
        assign.sort_by_key(|a| a.seq);
        let stop = book
            .held
            .iter()
            .filter(|(_, h)| h.stop)
            .map(|(id, _)| id.clone())
            .collect();
        (assign, stop)
    }

    /// Waits until something changes for the node or `wait` passes.
    pub(crate) async fn wait_for_change(&self, wait: Duration, report: &Report, epoch: &str) {
        use std::sync::atomic::Ordering;
        let mine = self.polls.fetch_add(1, Ordering::AcqRel) + 1;
        // The poll before this one answers now.
        self.changed.notify_waiters();
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.polls.load(Ordering::Acquire) != mine {
                return;
            }
            let (assign, stop) = self.pending(report, epoch);
            if !assign.is_empty() || !stop.is_empty() {
                return;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return;
            }
        }
    }
}

/// What a report gave back.
#[derive(Debug, Default)]
pub(crate) struct Received {
    /// Finished tasks, acknowledged once their records are durable.
    pub(crate) finished: Vec<(String, oneshot::Receiver<()>)>,
    /// Ids to acknowledge at once.
    pub(crate) ack: Vec<String>,
    /// Tasks the node holds and should not.
    pub(crate) stop: Vec<String>,
}

/// Every edge node.
pub(crate) struct Fleet {
    nodes: DashMap<String, Arc<RemoteNode>>,
    /// This server process: assignment numbers are its own.
    pub(crate) epoch: String,
    /// How often nodes sync when nothing happens.
    pub(crate) heartbeat: Duration,
    /// A node silent this long is lost.
    pub(crate) timeout: Duration,
}

impl Fleet {
    pub(crate) fn new(heartbeat: Duration, timeout: Duration) -> Self {
        Fleet {
            nodes: DashMap::new(),
            epoch: uuid::Uuid::new_v4().simple().to_string(),
            heartbeat,
            timeout,
        }
    }

    /// Adds a node (at join, or from the store at start: its heartbeat
    /// clock starts now, so nodes have a timeout's time to come back).
    pub(crate) fn add(
        &self,
        name: &str,
        status: NodeStatus,
        labels: BTreeMap<String, String>,
    ) -> Arc<RemoteNode> {
        let node = Arc::new(RemoteNode {
            name: name.to_owned(),
            book: Mutex::new(NodeBook {
                status,
                lost: None,
                labels: Arc::new(labels),
                info: None,
                interfaces: Arc::default(),
                reserved: 0,
                by_service: HashMap::new(),
                last_seen: Instant::now(),
                last_heartbeat: None,
                seq: 0,
                held: HashMap::new(),
                boot: None,
                report_seq: 0,
                ingress: None,
            }),
            changed: Notify::new(),
            polls: std::sync::atomic::AtomicU64::new(0),
        });
        self.nodes.insert(name.to_owned(), node.clone());
        node
    }

    /// Removes a node; its tasks stop `NodeLost`.
    pub(crate) fn remove(&self, name: &str) -> Option<Arc<RemoteNode>> {
        let (_, node) = self.nodes.remove(name)?;
        node.lose(format!("node {name} was removed"));
        node.changed.notify_waiters();
        Some(node)
    }

    pub(crate) fn get(&self, name: &str) -> Option<Arc<RemoteNode>> {
        self.nodes.get(name).map(|n| n.clone())
    }

    /// Every node, in no order (placement's view).
    pub(crate) fn each(&self) -> Vec<Arc<RemoteNode>> {
        self.nodes.iter().map(|n| n.value().clone()).collect()
    }

    /// Every node, by name.
    pub(crate) fn all(&self) -> Vec<Arc<RemoteNode>> {
        let mut nodes: Vec<_> = self.nodes.iter().map(|n| n.value().clone()).collect();
        nodes.sort_by(|a, b| a.name.cmp(&b.name));
        nodes
    }

    /// Marks nodes silent for longer than the timeout lost; returns their
    /// names with how many tasks each held.
    pub(crate) fn sweep(&self) -> Vec<(String, usize)> {
        let mut lost = Vec::new();
        for node in self.nodes.iter() {
            let why = format!(
                "node {} sent no heartbeat for {}s",
                node.name,
                self.timeout.as_secs()
            );
            if let Some(n) = node.lose_if(why, |seen| seen.elapsed() > self.timeout) {
                lost.push((node.name.clone(), n));
            }
        }
        lost
    }

    /// Whether `node` may pull from `repository`.
    pub(crate) fn may_pull(&self, node: &str, repository: &str) -> bool {
        self.get(node).is_some_and(|n| n.may_pull(repository))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn join_tokens_parse() {
        assert_eq!(
            parse_join_token("WJ1.none.wharf_abc"),
            Some((None, "wharf_abc".into()))
        );
        assert_eq!(
            parse_join_token(" WJ1.ab12.s "),
            Some((Some("ab12".into()), "s".into()))
        );
        for bad in ["", "WJ1.none.", "WJ2.none.s", "wharf_abc", "WJ1.none"] {
            assert_eq!(parse_join_token(bad), None, "{bad:?}");
        }
    }

    fn report(epoch: &str, seen: u64, tasks: Vec<TaskReport>) -> Report {
        Report {
            epoch: epoch.into(),
            seen,
            boot: "first".into(),
            report_seq: 0,
            wait_ms: 0,
            info: NodeInfo::default(),
            tasks,
        }
    }

    fn running(id: &str) -> TaskReport {
        TaskReport {
            id: id.into(),
            status: TaskStatus::Running,
            started_at: None,
            logs: Vec::new(),
            outcome: None,
        }
    }

    fn assignment(id: &str) -> Assignment {
        Assignment {
            seq: 0,
            task_id: id.into(),
            family: "f".into(),
            repository: "r".into(),
            wasm_digest: "sha256:00".into(),
            args: Vec::new(),
            env: BTreeMap::new(),
            limits: TaskLimits::default(),
            service: None,
            http: None,
            bench: None,
        }
    }

    #[test]
    fn a_sync_converges_assignments_stops_and_restarts() {
        let fleet = Fleet::new(Duration::from_secs(2), Duration::from_secs(10));
        let node = fleet.add("edge", NodeStatus::Ready, BTreeMap::new());
        let epoch = fleet.epoch.clone();
        let none = |_: &str| None;
        let (tx, mut rx) = mpsc::unbounded_channel();
        assert!(node.hold("t1", Some(assignment("t1")), 0, None, "r".into(), tx));
        // A node that knows another epoch gets everything again.
        let (assign, _) = node.pending(&report("old", 99, vec![]), &epoch);
        assert_eq!(assign.len(), 1);
        // A report made before the node saw t1 does not lose it...
        node.receive(&report(&epoch, 0, vec![]), &epoch, &none);
        assert!(rx.try_recv().is_err());
        // ...and once it reports t1 running, the driver hears of it.
        node.receive(&report(&epoch, 1, vec![running("t1")]), &epoch, &none);
        assert!(matches!(
            rx.try_recv(),
            Ok(Update::Status(TaskStatus::Running, _))
        ));
        let (assign, _) = node.pending(&report(&epoch, 1, vec![]), &epoch);
        assert!(assign.is_empty(), "seen assignments are not sent again");
        // A task the node runs that the server does not hold is stopped.
        let got = node.receive(
            &report(&epoch, 1, vec![running("t1"), running("stray")]),
            &epoch,
            &none,
        );
        assert_eq!(got.stop, ["stray"]);
        assert!(matches!(rx.try_recv(), Ok(Update::Status(..))));
        // A newer report, then an older one overtaking it without t1: the
        // older one proves nothing.
        let mut newer = report(&epoch, 1, vec![running("t1")]);
        newer.report_seq = 5;
        node.receive(&newer, &epoch, &none);
        assert!(matches!(rx.try_recv(), Ok(Update::Status(..))));
        let mut older = report(&epoch, 1, vec![]);
        older.report_seq = 3;
        node.receive(&older, &epoch, &none);
        assert!(rx.try_recv().is_err(), "a stale report loses no task");
        // The node restarted: t1 is gone from its report.
        let mut restarted = report("", 0, vec![]);
        restarted.boot = "second".into();
        node.receive(&restarted, &epoch, &none);
        match rx.try_recv() {
            Ok(Update::Finished(o, _)) => {
                assert_eq!(o.stop_code, wharf_runtime::StopCode::NodeLost)
            }
            other => panic!("{other:?}"),
        }
        assert!(node.pending(&report("", 0, vec![]), &epoch).0.is_empty());
    }

    #[tokio::test]
    async fn a_new_long_poll_ends_the_one_before() {
        let fleet = Arc::new(Fleet::new(Duration::from_secs(2), Duration::from_secs(10)));
        let node = fleet.add("edge", NodeStatus::Ready, BTreeMap::new());
        let epoch = fleet.epoch.clone();
        let first = tokio::spawn({
            let node = node.clone();
            let epoch = epoch.clone();
            async move {
                let began = std::time::Instant::now();
                let quiet = report(&epoch, 0, vec![]);
                node.wait_for_change(Duration::from_secs(20), &quiet, &epoch)
                    .await;
                began.elapsed()
            }
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        let quiet = report(&epoch, 0, vec![]);
        node.wait_for_change(Duration::from_millis(200), &quiet, &epoch)
            .await;
        let held = first.await.unwrap();
        assert!(held < Duration::from_secs(5), "{held:?}");
    }

    #[test]
    fn a_silent_node_is_lost_and_its_tasks_channels_close() {
        let fleet = Fleet::new(Duration::from_millis(10), Duration::from_millis(0));
        let node = fleet.add("edge", NodeStatus::Ready, BTreeMap::new());
        let (tx, mut rx) = mpsc::unbounded_channel();
        node.hold("t1", Some(assignment("t1")), 0, None, "r".into(), tx);
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(fleet.sweep(), [("edge".to_owned(), 1)]);
        assert!(matches!(
            rx.try_recv(),
            Err(mpsc::error::TryRecvError::Disconnected)
        ));
        assert_eq!(node.view().status, NodeStatus::Lost);
        assert!(fleet.sweep().is_empty(), "lost once");
    }
}
