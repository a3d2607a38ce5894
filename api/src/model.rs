//! The resources of the `/v1/` API as they travel over the wire (JSON,
//! snake_case) and live in the state store. ECS's words, Wasm meanings.

use std::collections::BTreeMap;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Formats a point in time as RFC 3339 in UTC with milliseconds.
pub fn timestamp(at: SystemTime) -> String {
    humantime::format_rfc3339_millis(at).to_string()
}

/// Now, as [`timestamp`] formats it.
pub fn now() -> String {
    timestamp(SystemTime::now())
}

/// Whether a task definition revision may start new tasks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "UPPERCASE")]
pub enum TaskDefinitionStatus {
    /// Registered and usable.
    Active,
    /// Deregistered: running tasks continue, no new ones start.
    Inactive,
}

/// What kind of program a task definition runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema, Default)]
#[serde(rename_all = "lowercase")]
pub enum TaskKind {
    /// Runs to completion: a wasip1 module or a wasip2 command component.
    #[default]
    Command,
    /// Serves requests: a `wasi:http/proxy` component, one instance per
    /// request, behind the ingress.
    Http,
}

impl TaskKind {
    /// The spelling used in task definitions.
    pub fn as_str(self) -> &'static str {
        match self {
            TaskKind::Command => "command",
            TaskKind::Http => "http",
        }
    }
}

/// A benchmark task: the artifact run `warmup` times, then `runs` times
/// measured (each at most [`wharf_runtime::MAX_BENCH_RUNS`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BenchRequest {
    pub runs: u32,
    #[serde(default)]
    pub warmup: u32,
}

/// How the tasks of an `http` task definition serve requests.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct HttpSettings {
    /// Requests one task serves at once; more go to other tasks or get 503.
    pub max_concurrency: u32,
    /// Milliseconds a request may take before it is a 504.
    pub request_timeout_ms: u64,
    /// The largest request body in bytes; larger ones get 413.
    pub max_request_body: u64,
    /// A path the task must answer `GET` with 2xx before it takes traffic.
    pub health_check: Option<String>,
    /// Outbound destinations (`SCHEME://HOST[:PORT]`, `*` ports and
    /// `*.` hosts allowed); empty: none.
    pub allowed_outbound_hosts: Vec<String>,
}

/// What a task of an HTTP service has served.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct HttpStats {
    /// Requests answered, by status class (`2xx`, `3xx`, `4xx`, `5xx`).
    pub responses: BTreeMap<String, u64>,
    /// Requests in flight now.
    pub in_flight: u64,
    /// Requests refused because the task was at `max_concurrency`.
    pub refused: u64,
    /// Outbound requests the component made that were denied.
    pub outbound_denied: u64,
    /// Median time to the response head, in milliseconds.
    pub latency_p50_ms: Option<f64>,
    /// 99th percentile time to the response head, in milliseconds.
    pub latency_p99_ms: Option<f64>,
}

/// Per-task limits of a task definition (absent: the node's defaults).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct TaskLimits {
    /// Fuel units before `OutOfFuel`.
    pub fuel: Option<u64>,
    /// Bytes of linear memory before `MemoryLimit`.
    pub memory_bytes: Option<u64>,
    /// Milliseconds of wall-clock time before `Timeout`.
    pub timeout_ms: Option<u64>,
}

/// A registered, immutable revision of a task definition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct TaskDefinition {
    /// The family the revision belongs to.
    pub family: String,
    /// The revision number, from 1.
    pub revision: u32,
    /// `family:revision`.
    pub task_definition: String,
    /// `ACTIVE` or `INACTIVE`.
    pub status: TaskDefinitionStatus,
    /// The artifact reference as registered (`team/app:v1`, or
    /// `host/repo:tag` of another registry).
    pub artifact: String,
    /// The manifest digest the reference resolved to at registration.
    pub artifact_digest: String,
    /// The digest of the Wasm layer that runs.
    pub wasm_digest: String,
    /// The program's kind.
    pub kind: TaskKind,
    /// Arguments after the program name.
    pub args: Vec<String>,
    /// Environment variables.
    pub env: BTreeMap<String, String>,
    /// Environment variables whose values come from the secret store:
    /// variable name → secret name.
    pub secrets: BTreeMap<String, String>,
    /// Limits (for `http`: per request).
    pub limits: TaskLimits,
    /// How `http` tasks serve (absent for `command`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpSettings>,
    /// Constraints on node labels its tasks must meet.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub placement_constraints: Vec<String>,
    /// How its tasks spread over nodes: `spread` (the default),
    /// `spread(LABEL)` or `binpack`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub placement_strategy: Option<String>,
    /// What the artifact imports (WASI interfaces without their version,
    /// or core module names): a node must provide all of them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub requires_interfaces: Vec<String>,
    /// Free-form labels.
    pub labels: BTreeMap<String, String>,
    /// When it was registered.
    pub registered_at: String,
    /// When it was deregistered.
    pub deregistered_at: Option<String>,
}

/// Where a task is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "UPPERCASE")]
pub enum TaskStatus {
    /// Accepted; its artifact is being fetched and compiled.
    Provisioning,
    /// Ready; waiting for a task slot on the node.
    Pending,
    /// Holding a slot: running guest code.
    Running,
    /// Ended; `stop_code` says why.
    Stopped,
}

impl TaskStatus {
    /// The spelling used in the API and the store.
    pub fn as_str(self) -> &'static str {
        match self {
            TaskStatus::Provisioning => "PROVISIONING",
            TaskStatus::Pending => "PENDING",
            TaskStatus::Running => "RUNNING",
            TaskStatus::Stopped => "STOPPED",
        }
    }

    /// Parses [`as_str`](Self::as_str)'s spelling.
    pub fn parse(text: &str) -> Option<Self> {
        [
            TaskStatus::Provisioning,
            TaskStatus::Pending,
            TaskStatus::Running,
            TaskStatus::Stopped,
        ]
        .into_iter()
        .find(|s| s.as_str().eq_ignore_ascii_case(text))
    }
}

/// One run of a task definition on a node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Task {
    /// The task's id (32 hex digits).
    pub id: String,
    /// `family:revision` it runs.
    pub task_definition: String,
    /// The task definition's family.
    pub family: String,
    /// The service that started it, if any.
    pub service: Option<String>,
    /// The service deployment that started it, if any.
    pub deployment_id: Option<String>,
    /// The node it runs on.
    pub node: String,
    /// Where it is now.
    pub status: TaskStatus,
    /// Where it is meant to go: `RUNNING`, or `STOPPED` once asked to stop.
    pub desired_status: TaskStatus,
    /// Why it stopped: `Completed`, `NonZeroExit`, `OutOfFuel`,
    /// `MemoryLimit`, `Timeout`, `Trap`, `UserStopped`, `ScaledDown`,
    /// `NodeLost` or `FailedToStart`.
    pub stop_code: Option<String>,
    /// The guest's exit code, when it exited by itself.
    pub exit_code: Option<i32>,
    /// Fuel consumed (an HTTP task: by all its requests so far).
    pub fuel_consumed: Option<u64>,
    /// The most linear memory it held, in bytes.
    pub peak_memory_bytes: Option<u64>,
    /// Run time in milliseconds, from instantiation to the stop.
    pub duration_ms: Option<f64>,
    /// What happened, for a person (empty when it completed).
    pub message: Option<String>,
    /// Arguments it ran with.
    pub args: Vec<String>,
    /// Limits it ran with.
    pub limits: TaskLimits,
    /// When it was accepted.
    pub created_at: String,
    /// When it took a slot.
    pub started_at: Option<String>,
    /// When it stopped.
    pub stopped_at: Option<String>,
    /// What a task of an HTTP service has served.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpStats>,
    /// With several servers: the replica that holds it (started it, or
    /// follows it on an edge node).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replica: Option<String>,
}

/// A line of a task's output.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct LogEntry {
    /// Position in the task's log, from 0.
    pub seq: u64,
    /// When the line was written.
    pub at: String,
    /// `stdout` or `stderr`.
    pub stream: String,
    /// The text, without its newline.
    pub text: String,
}

/// A page of a task's output.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct LogPage {
    /// The lines, oldest first.
    pub lines: Vec<LogEntry>,
    /// The `from` to ask for next.
    pub next_seq: u64,
    /// Lines evicted (retention is bounded) before they could be read.
    pub missed: u64,
    /// The task has stopped; no line follows `next_seq`.
    pub closed: bool,
}

/// A deployment's role in its service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "UPPERCASE")]
pub enum DeploymentStatus {
    /// The deployment the service is moving to (or at).
    Primary,
    /// An older deployment whose tasks are being replaced.
    Active,
    /// Finished: no tasks left.
    Inactive,
}

/// How far a deployment's rollout is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum RolloutState {
    /// Tasks are being started or replaced.
    InProgress,
    /// Every desired task of the deployment runs and older ones are gone.
    Completed,
    /// The circuit breaker stopped it and rolled back.
    Failed,
}

/// One task definition revision being rolled out in a service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Deployment {
    /// The deployment's id.
    pub id: String,
    /// `PRIMARY`, `ACTIVE` or `INACTIVE`.
    pub status: DeploymentStatus,
    /// The task definition it runs.
    pub task_definition: String,
    /// Tasks of this deployment that are running.
    pub running_count: u32,
    /// Tasks of this deployment that are provisioning or pending.
    pub pending_count: u32,
    /// Its rollout.
    pub rollout_state: RolloutState,
    /// Why the rollout is in that state.
    pub rollout_state_reason: String,
    /// Consecutive failed tasks (the circuit breaker's count).
    pub failed_tasks: u32,
    /// When it was created.
    pub created_at: String,
    /// When it last changed.
    pub updated_at: String,
}

/// A service's life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "UPPERCASE")]
pub enum ServiceStatus {
    /// Keeping its desired count.
    Active,
    /// Being deleted: scaling to zero, then removed.
    Draining,
}

/// A service: keeps `desired_count` tasks of a task definition running.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Service {
    /// The service's name.
    pub name: String,
    /// The task definition of the primary deployment.
    pub task_definition: String,
    /// `ACTIVE` or `DRAINING`.
    pub status: ServiceStatus,
    /// Tasks it keeps running.
    pub desired_count: u32,
    /// Tasks running now.
    pub running_count: u32,
    /// Tasks provisioning or pending now.
    pub pending_count: u32,
    /// A rolling deployment keeps at least this percentage of
    /// `desired_count` running.
    pub minimum_healthy_percent: u32,
    /// A rolling deployment runs at most this percentage of `desired_count`.
    pub maximum_percent: u32,
    /// The primary deployment first, then older active ones.
    pub deployments: Vec<Deployment>,
    /// Where the ingress sends requests to it (`HOST`, `HOST/PATH` or
    /// `/PATH`); HTTP services only.
    #[serde(default)]
    pub routes: Vec<String>,
    /// Target tracking on in-flight requests per task (HTTP services).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscaling: Option<crate::autoscale::Autoscaling>,
    /// Placement replacing the task definition's (constraints, strategy).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub placement: Option<crate::taskdef::PlacementInput>,
    /// When it was created.
    pub created_at: String,
}

/// Something that happened to a service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ServiceEvent {
    /// Increasing id.
    pub id: i64,
    /// The service.
    pub service: String,
    /// When.
    pub at: String,
    /// What happened.
    pub message: String,
}

/// A secret's name (its value is never returned).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Secret {
    /// The name task definitions refer to.
    pub name: String,
    /// When it was created or last set.
    pub updated_at: String,
    /// The repositories whose task definitions may use it (`team/*`, or an
    /// exact name); absent: global, for admins only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<String>,
}

/// What a token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Read anything.
    Reader,
    /// Read; register, run, scale and delete workloads; push images;
    /// manage secrets.
    Deployer,
    /// Everything, including tokens and the audit log.
    Admin,
}

impl Role {
    /// The spelling used in the API and the store.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Reader => "reader",
            Role::Deployer => "deployer",
            Role::Admin => "admin",
        }
    }

    /// Parses [`as_str`](Self::as_str)'s spelling.
    pub fn parse(text: &str) -> Option<Self> {
        [Role::Reader, Role::Deployer, Role::Admin]
            .into_iter()
            .find(|r| r.as_str() == text)
    }
}

/// An API token (its secret part is shown once, at creation).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Token {
    /// The token's id.
    pub id: String,
    /// A name for people.
    pub name: String,
    /// Its role.
    pub role: Role,
    /// Registry repositories it may reach (`team/*` matches below `team/`);
    /// empty: all.
    pub repositories: Vec<String>,
    /// When it was created.
    pub created_at: String,
    /// When it was revoked.
    pub revoked_at: Option<String>,
}

/// One mutating call, as the audit log keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct AuditEntry {
    /// Increasing id.
    pub id: i64,
    /// When.
    pub at: String,
    /// The token's id (`admin` for the data directory's admin token).
    pub token_id: String,
    /// The token's name.
    pub actor: String,
    /// HTTP method.
    pub method: String,
    /// Request path.
    pub path: String,
    /// The answer's status code.
    pub status: u16,
}

/// Whether a node takes new tasks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema, Default)]
#[serde(rename_all = "UPPERCASE")]
pub enum NodeStatus {
    /// Takes new tasks.
    #[default]
    Ready,
    /// Takes no new tasks; those running go on (`wharf node drain`).
    Draining,
    /// Stopped sending heartbeats; its tasks are `NodeLost`.
    Lost,
}

/// What is stored of a node: what an operator set on it and, for an edge
/// node, what it joined with.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeState {
    /// The node's name.
    pub name: String,
    /// `READY` or `DRAINING`.
    pub status: NodeStatus,
    /// Labels it joined with (the join token's, then its own).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// The SHA-256 of its credential (edge nodes only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential_hash: Option<String>,
    /// When it joined (edge nodes only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub joined_at: Option<String>,
}

/// A join token as stored and listed (its secret is shown once, at
/// creation, and only its hash is kept).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct JoinToken {
    /// Its id.
    pub id: String,
    /// Labels every node joining with it gets (they win over the node's own).
    pub labels: BTreeMap<String, String>,
    /// When it was made.
    pub created_at: String,
    /// When it stops being accepted.
    pub expires_at: String,
}

/// Slots and memory of a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct NodeResources {
    /// Task slots (instances of the pool).
    pub slots: u64,
    /// Bytes of the memory budget (absent: no budget).
    pub memory_bytes: Option<u64>,
}

/// One of several `wharf server` replicas on one database.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ReplicaInfo {
    /// Its name, which is also its own node's.
    pub name: String,
    /// Whether it holds the `control` lease: it runs the services and the
    /// edge nodes.
    pub leader: bool,
    /// Whether its lease ran out (it is gone, or cannot reach the
    /// database); the leader forgets it and its tasks are lost.
    pub expired: bool,
    /// Where other replicas forward requests to it.
    pub api_url: String,
    /// Where other replicas relay HTTP services' requests to it, if it
    /// has an ingress.
    pub ingress_url: Option<String>,
}

/// A node: a machine that runs tasks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Node {
    /// Its name (`local` for the server's own node).
    pub name: String,
    /// `READY`, `DRAINING` or `LOST`.
    pub status: NodeStatus,
    /// Whether it is the server's own node.
    pub local: bool,
    /// Labels for placement.
    pub labels: BTreeMap<String, String>,
    /// What it has.
    pub capacity: NodeResources,
    /// What is free now.
    pub free: NodeResources,
    /// Tasks on it that have not stopped.
    pub running_tasks: u64,
    /// Its last heartbeat (the local node's is now).
    pub last_heartbeat: String,
    /// Wharf's version on it.
    pub version: String,
    /// The engine it runs.
    pub engine_version: String,
    /// Runtimes with the same hash share precompiled code.
    pub compatibility_hash: String,
    /// CPU architecture (`x86_64`, `aarch64`).
    pub arch: String,
    /// Operating system.
    pub os: String,
    /// The WASI interfaces its runtime provides to guests.
    pub wasi_interfaces: Vec<String>,
    /// Where it takes HTTP requests for its services' tasks (the server's
    /// ingress for the local node; an edge node's `--ingress`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ingress: Option<String>,
    /// Why the server does not use the ingress the node advertised.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ingress_refused: Option<String>,
}
