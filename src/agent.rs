//! `wharf node join`: the edge node agent. It joins a server once with a
//! join token (the credential it gets is kept in its data directory, mode
//! 0600), then speaks the node protocol of [`wharf_api::fleet`]: one
//! long poll that is also the heartbeat, and a quick sync whenever one of
//! its tasks changes or writes output. Tasks run on this machine's own
//! executor; artifacts are pulled by digest from the server's registry,
//! verified, kept on disk, and compiled once (the compile cache survives
//! restarts). Outcomes wait in an outbox file until the server confirms
//! them, so a server that is away, or a restart of the node, loses none.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Args;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use tokio::sync::Notify;
use wharf_api::fleet::{
    Assignment, HttpAssignment, JoinRequest, JoinResponse, NodeInfo, Report, ReportedLine,
    SyncResponse, TaskReport,
};
use wharf_api::model::{self, TaskStatus};
use wharf_api::node_ingress::NodeIngress;
use wharf_runtime::{
    Executor, ExecutorConfig, LogBuffer, Outcome, Runtime, StopCode, StopSignal, TaskPhase,
    TaskSpec,
};

/// How long the agent keeps an idle connection to the server: less than
/// the server keeps one (30 s), so a request never goes out on a
/// connection the server is closing.
const POOL_IDLE: Duration = Duration::from_secs(20);

/// The largest Wasm layer a node pulls.
const MAX_WASM_BYTES: u64 = 256 << 20;

/// How long to wait before trying the server again after a failure.
const RETRY: Duration = Duration::from_secs(1);

/// The first delay before a node restarts a failed service task while the
/// server is out of reach; it doubles up to [`MAX_RESTART_BACKOFF`].
const RESTART_BACKOFF: Duration = Duration::from_secs(1);
const MAX_RESTART_BACKOFF: Duration = Duration::from_secs(60);

/// Output retained per task on the node until the server has it.
const LOG_RETENTION: usize = 256 << 10;

#[derive(Debug, Args)]
pub(crate) struct JoinArgs {
    /// This node's name in the cluster (default: the host name).
    #[arg(long, env = "WHARF_NODE_NAME")]
    name: Option<String>,
    /// Labels for placement: KEY=VALUE,... (the join token's win).
    #[arg(long, env = "WHARF_NODE_LABELS", default_value = "", value_parser = wharf_api::nodes::parse_labels)]
    labels: BTreeMap<String, String>,
    /// Concurrent tasks on this node (default and 0: 1000); above 1000
    /// the instance pool is sized for them.
    #[arg(long, env = "WHARF_SLOTS", value_parser = crate::server::parse_slots)]
    slots: Option<usize>,
    /// Memory this node's running tasks may reserve together (default:
    /// half of the machine's memory).
    #[arg(long, env = "WHARF_MEMORY_BUDGET", value_parser = crate::server::parse_size)]
    memory_budget: Option<u64>,
    /// Accept a plain-HTTP server that is not on loopback (credentials and
    /// secrets then cross the network in the clear).
    #[arg(long)]
    insecure: bool,
    /// Serve the HTTP services placed on this node on this address
    /// (IP:PORT); without it the node runs command tasks only.
    #[arg(long, env = "WHARF_INGRESS")]
    ingress: Option<std::net::SocketAddr>,
    /// The address the server forwards its share of requests to (default:
    /// --ingress, or, if that listens on every address, this machine's
    /// address towards the server). The server accepts only the address
    /// the node connects from.
    #[arg(long, env = "WHARF_ADVERTISE_INGRESS", requires = "ingress")]
    advertise_ingress: Option<std::net::SocketAddr>,
    /// Internal network (CIDR or address) that components' allowed
    /// outbound destinations may resolve to; loopback, private and
    /// link-local addresses are refused otherwise. Repeatable.
    #[arg(long = "allow-outbound-network", env = "WHARF_ALLOW_OUTBOUND_NETWORKS", value_delimiter = ',', value_parser = wharf_registry::remote::RemotePolicy::parse_network)]
    allow_outbound_networks: Vec<wharf_registry::remote::IpNet>,
}

/// A sync that did not reach a server able to answer it.
#[derive(Debug)]
struct Unreachable(String);

impl std::fmt::Display for Unreachable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Unreachable {}

/// What the node keeps of its membership (`node.json`, mode 0600).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Membership {
    server: String,
    name: String,
    credential: String,
    /// The SHA-256 of the server's CA (from the join token), if it has TLS.
    #[serde(default)]
    fingerprint: Option<String>,
}

/// A finished task waiting for the server's confirmation (`outbox.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Finished {
    id: String,
    outcome: Outcome,
    started_at: Option<String>,
    lines: Vec<ReportedLine>,
}

struct Local {
    status: TaskStatus,
    started_at: Option<String>,
    logs: Arc<LogBuffer>,
    /// The next log line to send.
    sent: u64,
    stop: Arc<StopSignal>,
    finished: Option<Finished>,
}

struct Agent {
    http: reqwest::Client,
    /// The server's URLs: several replicas of one cluster, tried in turn
    /// when the current one fails.
    servers: Vec<String>,
    /// Which of `servers` syncs go to.
    current: std::sync::atomic::AtomicUsize,
    credential: String,
    executor: Executor,
    runtime: Arc<Runtime>,
    blobs: PathBuf,
    outbox: PathBuf,
    tasks: Mutex<BTreeMap<String, Local>>,
    epoch: Mutex<String>,
    seen: AtomicU64,
    /// This process, and its reports' numbers.
    boot: String,
    report_seq: AtomicU64,
    heartbeat_ms: AtomicU64,
    changed: Notify,
    /// When the server last answered a sync.
    last_answer: Mutex<std::time::Instant>,
    /// Woken when the server answers again after a cut.
    reconnected: Notify,
    /// Woken when the server refuses the node's credential.
    removed: Notify,
    /// A task's status moved since the last push.
    moved: std::sync::atomic::AtomicBool,
    /// Pulls of one digest at a time.
    pulling: tokio::sync::Mutex<()>,
    /// The ingress serving this node's HTTP tasks, and the address the
    /// server is told to forward to.
    ingress: Option<(Arc<NodeIngress>, String)>,
}

/// The default data directory of a node: `$XDG_DATA_HOME/wharf-node`, else
/// `~/.local/share/wharf-node` (apart from a server's on the same machine).
fn default_data_dir() -> Result<PathBuf> {
    if let Some(xdg) = std::env::var_os("XDG_DATA_HOME").filter(|v| !v.is_empty()) {
        return Ok(PathBuf::from(xdg).join("wharf-node"));
    }
    let home = std::env::var_os("HOME")
        .context("cannot find a data directory: set --data-dir, WHARF_DATA_DIR or HOME")?;
    Ok(PathBuf::from(home).join(".local/share/wharf-node"))
}

/// Refuses a plain-HTTP server off loopback unless `insecure`.
fn check_transport(server: &str, insecure: bool) -> Result<()> {
    let url =
        url::Url::parse(server).with_context(|| format!("--server {server:?} is not a URL"))?;
    match url.scheme() {
        "https" => Ok(()),
        "http" => {
            let loopback = match url.host() {
                Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
                Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
                Some(url::Host::Domain(d)) => d == "localhost",
                None => false,
            };
            if loopback || insecure {
                Ok(())
            } else {
                bail!(
                    "{server} is plain HTTP off loopback: the node's credential and its tasks' secrets would cross the network in the clear (use https://, or --insecure to accept it)"
                )
            }
        }
        other => bail!("--server {server:?}: unsupported scheme {other}"),
    }
}

pub(crate) fn main(
    args: JoinArgs,
    server: &str,
    token: Option<String>,
    data_dir: Option<PathBuf>,
) -> Result<()> {
    let data_dir = match data_dir {
        Some(d) => d,
        None => default_data_dir()?,
    };
    std::fs::create_dir_all(&data_dir)
        .with_context(|| format!("failed to create {}", data_dir.display()))?;
    let _lock = crate::paths::lock_data_dir(&data_dir)?;
    // Several replicas of one cluster: `--server URL,URL,...`.
    let servers: Vec<String> = server
        .split(',')
        .map(|s| s.trim().trim_end_matches('/').to_owned())
        .filter(|s| !s.is_empty())
        .collect();
    for s in &servers {
        check_transport(s, args.insecure)?;
    }
    let server = servers.first().context("--server is empty")?.clone();
    let tokio = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("failed to start the async runtime")?;
    let membership_path = data_dir.join("node.json");
    let stored: Option<Membership> = match std::fs::read(&membership_path) {
        Ok(bytes) => Some(
            serde_json::from_slice(&bytes)
                .with_context(|| format!("{} is damaged", membership_path.display()))?,
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => {
            return Err(e).with_context(|| format!("failed to read {}", membership_path.display()));
        }
    };
    let (fingerprint, secret) = match &stored {
        Some(m) => (m.fingerprint.clone(), None),
        None => {
            let token = token.context(
                "this node has not joined yet: give the join token (--token, from wharf node token create)",
            )?;
            let (fingerprint, secret) = wharf_api::fleet::parse_join_token(&token)
                .context("--token is not a join token (WJ1.…, from wharf node token create)")?;
            (fingerprint, Some(secret))
        }
    };
    let http = match (server.starts_with("https://"), &fingerprint) {
        (true, Some(fp)) => tokio.block_on(pinned_client(&server, fp, &data_dir))?,
        (true, None) => bail!(
            "the join token pins no CA (the server had no TLS when it was made): make a new one on the server, which serves TLS now"
        ),
        (false, Some(_)) => {
            bail!("the join token pins the server's TLS CA: join it at https://, not {server}")
        }
        (false, None) => reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .pool_idle_timeout(POOL_IDLE)
            .build()
            .context("failed to build the HTTP client")?,
    };
    let membership = match (stored, secret) {
        (Some(m), _) => m,
        (None, secret) => {
            let secret = secret.expect("a join has a secret");
            let name = match args.name.clone() {
                Some(n) => n,
                None => hostname()?,
            };
            let joined = tokio.block_on(join(&http, &server, &secret, &name, &args.labels))?;
            let m = Membership {
                server: server.clone(),
                name: joined.name,
                credential: joined.credential,
                fingerprint,
            };
            crate::paths::write_private(&membership_path, &serde_json::to_vec_pretty(&m)?)?;
            eprintln!("wharf: joined {server} as node {}", m.name);
            m
        }
    };
    // 0 is the default, as if not given (also for the guest threads).
    let slots = args.slots.filter(|&n| n > 0);
    let runtime = Runtime::new(crate::server::runtime_config(&data_dir, slots))
        .context("failed to start the wasm runtime")?;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let executor = tokio
        .block_on(async {
            Executor::with_config(
                runtime.clone(),
                &ExecutorConfig {
                    slots: slots.unwrap_or(0),
                    memory_budget: args
                        .memory_budget
                        .or(crate::server::physical_memory().map(|m| m / 2)),
                    guest_threads: Some(cores.min(slots.unwrap_or(usize::MAX)).max(1)),
                },
            )
        })
        .context("failed to start the executor")?;
    let blobs = data_dir.join("cache").join("blobs");
    std::fs::create_dir_all(&blobs)?;
    let (shutdown_tx, shutdown_rx) = tokio::sync::watch::channel(false);
    let ingress = match args.ingress {
        None => None,
        Some(addr) => {
            let listener = tokio
                .block_on(tokio::net::TcpListener::bind(addr))
                .with_context(|| format!("failed to listen on {addr} for the ingress"))?;
            let local = listener.local_addr()?;
            let advertised = match args.advertise_ingress {
                Some(a) => a,
                None if local.ip().is_unspecified() => {
                    std::net::SocketAddr::new(tokio.block_on(ip_towards(&server))?, local.port())
                }
                None => local,
            };
            let policy = wharf_registry::remote::RemotePolicy {
                allow: args.allow_outbound_networks.clone(),
            };
            let ingress =
                NodeIngress::new(executor.clone(), Arc::new(move |ip| policy.permits(ip)));
            tokio.spawn(ingress.clone().serve(listener, shutdown_rx.clone()));
            // Scripts and tests wait for this line too.
            eprintln!("wharf: ingress on http://{local} (advertised as {advertised})");
            Some((ingress, advertised.to_string()))
        }
    };
    let agent = Arc::new(Agent {
        http,
        servers: servers.clone(),
        current: std::sync::atomic::AtomicUsize::new(0),
        credential: membership.credential.clone(),
        executor,
        runtime,
        blobs,
        outbox: data_dir.join("outbox.json"),
        tasks: Mutex::new(BTreeMap::new()),
        epoch: Mutex::new(String::new()),
        seen: AtomicU64::new(0),
        boot: uuid::Uuid::new_v4().simple().to_string(),
        report_seq: AtomicU64::new(0),
        heartbeat_ms: AtomicU64::new(2000),
        changed: Notify::new(),
        moved: std::sync::atomic::AtomicBool::new(false),
        last_answer: Mutex::new(std::time::Instant::now()),
        reconnected: Notify::new(),
        removed: Notify::new(),
        pulling: tokio::sync::Mutex::new(()),
        ingress,
    });
    agent.load_outbox()?;
    // Scripts and tests wait for this line.
    eprintln!(
        "wharf: node {} attached to {server} (data dir {})",
        membership.name,
        data_dir.display()
    );
    tokio.block_on(async move {
        let pusher = tokio::spawn(agent.clone().push_loop());
        let removed = tokio::select! {
            () = agent.clone().poll_loop() => false,
            () = crate::server::shutdown_signal() => {
                eprintln!("wharf: node stopping");
                false
            }
            () = agent.removed.notified() => true,
        };
        pusher.abort();
        agent.stop_all().await;
        let _ = shutdown_tx.send(true);
        if removed {
            // Exit status 3 tells systemd not to restart it
            // (RestartPreventExitStatus in the unit).
            eprintln!(
                "wharf: the server refuses this node's credential (removed with wharf node rm?): its tasks were stopped; delete {} and join again to come back",
                membership_path.display()
            );
            std::process::exit(3);
        }
        Ok(())
    })
}

/// A client that trusts only the server's CA, once it matches the join
/// token's fingerprint: fetched over an unverified connection at first
/// (the fingerprint is what makes it trustworthy), then kept in the data
/// directory and checked again at every start.
async fn pinned_client(
    server: &str,
    fingerprint: &str,
    data_dir: &Path,
) -> Result<reqwest::Client> {
    let path = data_dir.join("ca.pem");
    let pem = match std::fs::read_to_string(&path) {
        Ok(pem) => pem,
        Err(_) => {
            let probe = reqwest::Client::builder()
                .danger_accept_invalid_certs(true)
                .connect_timeout(Duration::from_secs(10))
                .timeout(Duration::from_secs(30))
                .build()?;
            probe
                .get(format!("{server}/v1/agent/ca"))
                .send()
                .await
                .with_context(|| format!("cannot reach {server}"))?
                .error_for_status()
                .context("the server did not give its CA")?
                .text()
                .await?
        }
    };
    let (der, got) = crate::tls::single_certificate(&pem).context("the server's CA")?;
    if got != fingerprint {
        bail!(
            "the server's CA (sha256 {got}) does not match the join token's ({fingerprint}): refusing to trust {server}"
        );
    }
    crate::paths::write_private(&path, pem.as_bytes())?;
    Ok(reqwest::Client::builder()
        .tls_built_in_root_certs(false)
        // Exactly the certificate whose fingerprint was checked.
        .add_root_certificate(reqwest::Certificate::from_der(&der).context("the server's CA")?)
        .connect_timeout(Duration::from_secs(5))
        .pool_idle_timeout(POOL_IDLE)
        .build()?)
}

/// A line of the node's log as the protocol sends it.
fn reported(l: wharf_runtime::LogLine) -> ReportedLine {
    ReportedLine {
        seq: l.seq,
        stream: l.stream.as_str().into(),
        text: l.text,
    }
}

/// This machine's address on the way to `server` (no packet is sent: a
/// UDP socket's connect only picks the route).
async fn ip_towards(server: &str) -> Result<std::net::IpAddr> {
    let url = reqwest::Url::parse(server).with_context(|| format!("{server} is not a URL"))?;
    let host = url.host_str().context("the server URL has no host")?;
    let port = url.port_or_known_default().unwrap_or(80);
    let target = tokio::net::lookup_host((host, port))
        .await
        .with_context(|| format!("cannot resolve {host}"))?
        .next()
        .with_context(|| format!("{host} has no address"))?;
    let bind: std::net::SocketAddr = if target.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let socket = tokio::net::UdpSocket::bind(bind).await?;
    socket.connect(target).await?;
    Ok(socket.local_addr()?.ip())
}

pub(crate) fn hostname() -> Result<String> {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .context("cannot find the host name: give --name")?;
    Ok(name.trim().to_lowercase())
}

async fn join(
    http: &reqwest::Client,
    server: &str,
    secret: &str,
    name: &str,
    labels: &BTreeMap<String, String>,
) -> Result<JoinResponse> {
    let response = http
        .post(format!("{server}/v1/agent/join"))
        .bearer_auth(secret)
        .json(&JoinRequest {
            name: name.to_owned(),
            labels: labels.clone(),
        })
        .send()
        .await
        .with_context(|| format!("cannot reach {server}"))?;
    let status = response.status();
    if !status.is_success() {
        let body: serde_json::Value = response.json().await.unwrap_or_default();
        bail!(
            "the server refused the join ({status}): {}",
            body["message"].as_str().unwrap_or("no reason given")
        );
    }
    Ok(response.json().await?)
}

impl Agent {
    fn info(&self) -> NodeInfo {
        let stats = self.executor.stats();
        let slots = self.executor.slots() as u64;
        let budget = self.executor.memory_budget();
        NodeInfo {
            slots,
            memory_bytes: budget,
            free_slots: slots.saturating_sub(stats.running as u64),
            free_memory_bytes: budget.map(|b| b.saturating_sub(stats.memory_reserved)),
            version: env!("CARGO_PKG_VERSION").into(),
            engine_version: wharf_runtime::ENGINE_VERSION.into(),
            compatibility_hash: self.runtime.compatibility_hash(),
            arch: std::env::consts::ARCH.into(),
            os: std::env::consts::OS.into(),
            wasi_interfaces: wharf_runtime::PROVIDED_INTERFACES
                .iter()
                .map(|s| (*s).to_owned())
                .collect(),
            ingress: self.ingress.as_ref().map(|(_, a)| a.clone()),
        }
    }

    fn load_outbox(&self) -> Result<()> {
        let finished: Vec<Finished> = match std::fs::read(&self.outbox) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .with_context(|| format!("{} is damaged", self.outbox.display()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(e.into()),
        };
        let mut tasks = self.tasks.lock().expect("tasks lock");
        for f in finished {
            tasks.insert(
                f.id.clone(),
                Local {
                    status: TaskStatus::Stopped,
                    started_at: f.started_at.clone(),
                    logs: LogBuffer::new(0),
                    sent: 0,
                    stop: StopSignal::new(),
                    finished: Some(f),
                },
            );
        }
        Ok(())
    }

    /// Writes the finished tasks not yet confirmed (called with the lock).
    fn save_outbox(&self, tasks: &BTreeMap<String, Local>) {
        let finished: Vec<&Finished> = tasks.values().filter_map(|t| t.finished.as_ref()).collect();
        let result = if finished.is_empty() {
            match std::fs::remove_file(&self.outbox) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e.into()),
                _ => Ok(()),
            }
        } else {
            serde_json::to_vec(&finished)
                .map_err(anyhow::Error::from)
                .and_then(|b| crate::paths::write_private(&self.outbox, &b))
        };
        if let Err(e) = result {
            tracing::error!(error = %e, "cannot write the outbox");
        }
    }

    /// The report of everything held, with up to the log budget of new
    /// output; also returns, per task, how far its output was included.
    fn report(&self, wait_ms: u64) -> (Report, Vec<(String, u64)>) {
        let tasks = self.tasks.lock().expect("tasks lock");
        let mut budget = wharf_api::fleet::MAX_REPORT_LOG_BYTES;
        let mut reports = Vec::with_capacity(tasks.len());
        let mut upto = Vec::new();
        // Finished tasks first: a chatty running task cannot hold back
        // another's outcome by using up the budget.
        let mut order: Vec<(&String, &Local)> = tasks.iter().collect();
        order.sort_by_key(|(_, t)| t.finished.is_none());
        for (id, t) in order {
            let mut lines = Vec::new();
            // Each line costs what it takes in the JSON (escapes included).
            let cost = |l: &ReportedLine| serde_json::to_vec(l).map_or(usize::MAX, |v| v.len());
            if let Some(f) = &t.finished {
                for l in &f.lines {
                    if budget < cost(l) {
                        break;
                    }
                    budget -= cost(l);
                    lines.push(l.clone());
                }
            } else {
                let page = t.logs.read_from(t.sent, 10_000);
                for l in page.lines {
                    let line = reported(l);
                    if budget < cost(&line) {
                        break;
                    }
                    budget -= cost(&line);
                    lines.push(line);
                }
            }
            if let Some(last) = lines.last() {
                upto.push((id.clone(), last.seq + 1));
            }
            // An outcome goes only with the rest of its output.
            let complete = t
                .finished
                .as_ref()
                .is_some_and(|f| f.lines.len() == lines.len());
            reports.push(TaskReport {
                id: id.clone(),
                status: t.status,
                started_at: t.started_at.clone(),
                logs: lines,
                outcome: complete
                    .then(|| t.finished.as_ref().map(|f| f.outcome.clone()))
                    .flatten(),
            });
        }
        let report = Report {
            epoch: self.epoch.lock().expect("epoch lock").clone(),
            seen: self.seen.load(Ordering::Acquire),
            boot: self.boot.clone(),
            report_seq: self.report_seq.fetch_add(1, Ordering::AcqRel) + 1,
            wait_ms,
            info: self.info(),
            tasks: reports,
        };
        (report, upto)
    }

    /// Whether there is anything the server has not heard yet.
    fn has_news(&self) -> bool {
        let tasks = self.tasks.lock().expect("tasks lock");
        tasks
            .values()
            .any(|t| t.finished.is_some() || !t.logs.read_from(t.sent, 1).lines.is_empty())
    }

    /// The server syncs go to now.
    fn base(&self) -> &str {
        &self.servers[self.current.load(Ordering::Acquire) % self.servers.len()]
    }

    /// After a failure: the next of several servers (replicas).
    fn next_server(&self) {
        if self.servers.len() > 1 {
            self.current.fetch_add(1, Ordering::AcqRel);
        }
    }

    /// One sync; applies the answer. A server that cannot be reached, or
    /// answers that it cannot serve now (503, 502), makes the next one
    /// (of several replicas) current.
    async fn sync(self: &Arc<Self>, wait_ms: u64) -> Result<()> {
        let result = self.sync_once(wait_ms).await;
        if let Err(e) = &result
            && e.downcast_ref::<Unreachable>().is_some()
        {
            self.next_server();
        }
        result
    }

    async fn sync_once(self: &Arc<Self>, wait_ms: u64) -> Result<()> {
        let (report, upto) = self.report(wait_ms);
        let response = self
            .http
            .post(format!("{}/v1/agent/sync", self.base()))
            .bearer_auth(&self.credential)
            // A poll answered into a cut link is given up soon, so the node
            // is back within a heartbeat or two of the link.
            .timeout(Duration::from_millis(wait_ms) + Duration::from_secs(5))
            .json(&report)
            .send()
            .await
            .map_err(|e| anyhow::Error::new(Unreachable(e.to_string())))?;
        let status = response.status();
        if matches!(
            status,
            reqwest::StatusCode::BAD_GATEWAY | reqwest::StatusCode::SERVICE_UNAVAILABLE
        ) {
            return Err(Unreachable(format!("the server answered {status}")).into());
        }
        if status == reqwest::StatusCode::UNAUTHORIZED || status == reqwest::StatusCode::FORBIDDEN {
            // Removed (wharf node rm): its tasks run elsewhere now.
            self.removed.notify_one();
        }
        if !status.is_success() {
            let body: serde_json::Value = response.json().await.unwrap_or_default();
            bail!(
                "the server answered {status}: {}",
                body["message"].as_str().unwrap_or("no reason given")
            );
        }
        let answer: SyncResponse = response.json().await?;
        let was_cut_off = self.cut_off();
        *self.last_answer.lock().expect("answer lock") = std::time::Instant::now();
        if was_cut_off {
            self.reconnected.notify_waiters();
        }
        self.apply(answer, upto);
        Ok(())
    }

    fn apply(self: &Arc<Self>, answer: SyncResponse, upto: Vec<(String, u64)>) {
        let mut tasks = self.tasks.lock().expect("tasks lock");
        for (id, next) in upto {
            if let Some(t) = tasks.get_mut(&id) {
                if let Some(f) = &mut t.finished {
                    f.lines.retain(|l| l.seq >= next);
                } else {
                    t.sent = t.sent.max(next);
                }
            }
        }
        let mut outbox_changed = false;
        for id in &answer.ack {
            if tasks.get(id).is_some_and(|t| t.finished.is_some()) {
                tasks.remove(id);
                outbox_changed = true;
            }
        }
        if outbox_changed {
            self.save_outbox(&tasks);
        }
        for id in &answer.stop {
            if let Some(t) = tasks.get(id) {
                t.stop.stop();
            }
        }
        let mut seen = self.seen.load(Ordering::Acquire);
        let same_epoch = *self.epoch.lock().expect("epoch lock") == answer.epoch;
        if !same_epoch {
            seen = 0;
        }
        for a in answer.assign {
            seen = seen.max(a.seq);
            if tasks.contains_key(&a.task_id) {
                continue;
            }
            let logs = LogBuffer::new(LOG_RETENTION);
            let stop = StopSignal::new();
            tasks.insert(
                a.task_id.clone(),
                Local {
                    status: TaskStatus::Provisioning,
                    started_at: None,
                    logs: logs.clone(),
                    sent: 0,
                    stop: stop.clone(),
                    finished: None,
                },
            );
            tokio::spawn(self.clone().run(a, logs, stop));
        }
        drop(tasks);
        if let Some((ingress, _)) = &self.ingress {
            ingress.set_routes(&answer.routes);
        }
        *self.epoch.lock().expect("epoch lock") = answer.epoch;
        self.seen.store(seen, Ordering::Release);
        self.heartbeat_ms
            .store(answer.heartbeat_ms.clamp(100, 30_000), Ordering::Release);
    }

    /// The long poll, which is also the heartbeat.
    async fn poll_loop(self: Arc<Self>) {
        let mut failing = false;
        loop {
            let wait = self.heartbeat_ms.load(Ordering::Acquire);
            match self.sync(wait).await {
                Ok(()) => {
                    if failing {
                        eprintln!("wharf: reconnected to {}", self.base());
                        failing = false;
                    }
                }
                Err(e) => {
                    if !failing {
                        eprintln!(
                            "wharf: cannot reach {} ({e:#}); tasks keep running, retrying",
                            self.base()
                        );
                        failing = true;
                    }
                    tokio::time::sleep(RETRY).await;
                }
            }
        }
    }

    /// Sends what changed (a status, output, an outcome) without waiting
    /// for the next heartbeat.
    async fn push_loop(self: Arc<Self>) {
        loop {
            tokio::select! {
                () = self.changed.notified() => {}
                () = tokio::time::sleep(Duration::from_millis(200)) => {}
            }
            let moved = self.moved.swap(false, Ordering::AcqRel);
            if !moved && !self.has_news() {
                continue;
            }
            if self.sync(0).await.is_err() {
                tokio::time::sleep(RETRY).await;
            }
        }
    }

    /// Whether the server is out of reach: no answer for two heartbeats
    /// and a second (a healthy node hears back at least every heartbeat).
    fn cut_off(&self) -> bool {
        let heartbeat = Duration::from_millis(self.heartbeat_ms.load(Ordering::Acquire));
        self.last_answer.lock().expect("answer lock").elapsed()
            > heartbeat * 2 + Duration::from_secs(1)
    }

    fn set_status(&self, id: &str, status: TaskStatus, started_at: Option<String>) {
        if let Some(t) = self.tasks.lock().expect("tasks lock").get_mut(id) {
            t.status = status;
            if started_at.is_some() {
                t.started_at = started_at;
            }
        }
        self.moved.store(true, Ordering::Release);
        self.changed.notify_one();
    }

    /// Runs one assignment to its end and puts its outcome in the outbox.
    async fn run(self: Arc<Self>, a: Assignment, logs: Arc<LogBuffer>, stop: Arc<StopSignal>) {
        // While the server is out of reach, a service task that fails is
        // restarted here, with backoff (the server would replace it, but
        // cannot be told); once the server answers, the outcome goes to it.
        let mut attempt = 0u32;
        let outcome = loop {
            let outcome = self.execute(&a, &logs, &stop).await;
            let failed = !matches!(
                outcome.stop_code,
                StopCode::Completed | StopCode::UserStopped
            );
            let reconnected = self.reconnected.notified();
            if !failed || a.service.is_none() || stop.is_stopped() || !self.cut_off() {
                break outcome;
            }
            attempt += 1;
            logs.reopen();
            let delay = RESTART_BACKOFF
                .saturating_mul(1 << (attempt - 1).min(6))
                .min(MAX_RESTART_BACKOFF);
            logs.write(
                wharf_runtime::Stream::Stderr,
                format!(
                    "wharf: {} ({}); the server is out of reach, restarting in {}s (attempt {attempt})\n",
                    outcome.stop_code,
                    outcome.message,
                    delay.as_secs()
                )
                .as_bytes(),
            );
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = reconnected => break outcome,
                () = stop.wait() => break outcome,
            }
        };
        let mut tasks = self.tasks.lock().expect("tasks lock");
        if let Some(t) = tasks.get_mut(&a.task_id) {
            let lines = logs
                .read_from(t.sent, usize::MAX)
                .lines
                .into_iter()
                .map(reported)
                .collect();
            t.status = TaskStatus::Stopped;
            t.finished = Some(Finished {
                id: a.task_id.clone(),
                outcome,
                started_at: t.started_at.clone(),
                lines,
            });
        }
        self.save_outbox(&tasks);
        drop(tasks);
        self.changed.notify_one();
    }

    async fn execute(
        &self,
        a: &Assignment,
        logs: &Arc<LogBuffer>,
        stop: &Arc<StopSignal>,
    ) -> Outcome {
        let artifact = tokio::select! {
            biased;
            () = stop.wait() => return Outcome::not_started(StopCode::UserStopped, "stopped before it started"),
            loaded = self.artifact(a) => loaded,
        };
        let artifact = match artifact {
            Ok(a) => a,
            Err(message) => return Outcome::not_started(StopCode::FailedToStart, message),
        };
        self.set_status(&a.task_id, TaskStatus::Pending, None);
        if let Some(http) = &a.http {
            return self.serve(a, http, artifact, logs, stop).await;
        }
        let mut spec = TaskSpec::new(logs.clone());
        spec.program = a.family.clone();
        spec.args = a.args.clone();
        spec.env = a.env.clone().into_iter().collect();
        spec.limits = wharf_runtime::Limits {
            fuel: a.limits.fuel,
            memory: a.limits.memory_bytes,
            timeout: a.limits.timeout_ms.map(Duration::from_millis),
        };
        if let Some(b) = a.bench {
            self.set_status(&a.task_id, TaskStatus::Running, Some(model::now()));
            return self
                .executor
                .bench(artifact, &spec, b.runs, b.warmup, stop, logs)
                .await;
        }
        let handle = self.executor.spawn(artifact, spec);
        let signal = handle.stop_signal();
        let forward = {
            let stop = stop.clone();
            tokio::spawn(async move {
                stop.wait().await;
                signal.stop();
            })
        };
        handle.started().await;
        if handle.phase() == TaskPhase::Running {
            self.set_status(&a.task_id, TaskStatus::Running, Some(model::now()));
        }
        let outcome = handle.wait().await;
        forward.abort();
        outcome
    }

    /// An HTTP task: serves the requests its service's routes bring to the
    /// node's ingress (and those the server forwards) until it is asked to
    /// stop, then drains.
    async fn serve(
        &self,
        a: &Assignment,
        http: &HttpAssignment,
        artifact: Arc<wharf_runtime::Artifact>,
        logs: &Arc<LogBuffer>,
        stop: &Arc<StopSignal>,
    ) -> Outcome {
        let Some((ingress, _)) = &self.ingress else {
            return Outcome::not_started(
                StopCode::FailedToStart,
                "this node has no ingress (wharf node join --ingress ADDR)",
            );
        };
        if artifact.kind() != wharf_runtime::ArtifactKind::HttpProxy {
            return Outcome::not_started(
                StopCode::FailedToStart,
                format!(
                    "kind \"http\" needs a component that exports wasi:http/incoming-handler; this artifact is a {:?}",
                    artifact.kind()
                ),
            );
        }
        let Some(service) = a.service.clone() else {
            return Outcome::not_started(StopCode::FailedToStart, "http tasks run in services");
        };
        let mut spec = TaskSpec::new(logs.clone());
        spec.program = a.family.clone();
        spec.env = a.env.clone().into_iter().collect();
        spec.limits = wharf_runtime::Limits {
            fuel: a.limits.fuel,
            memory: a.limits.memory_bytes,
            timeout: Some(Duration::from_millis(http.settings.request_timeout_ms)),
        };
        let task = ingress.task(
            a.task_id.clone(),
            service,
            artifact,
            spec,
            http.settings.clone(),
        );
        let grace = Duration::from_millis(http.health_check_grace_ms);
        if let Err(outcome) = task
            .become_healthy(http.settings.health_check.as_deref(), grace, stop)
            .await
        {
            return outcome;
        }
        self.set_status(&a.task_id, TaskStatus::Running, Some(model::now()));
        task.open();
        let running = std::time::Instant::now();
        stop.wait().await;
        let delay = Duration::from_millis(http.deregistration_delay_ms);
        task.wind_down(delay, running, logs).await
    }

    /// The compiled artifact of an assignment: from memory, else from the
    /// blob cache on disk, else pulled by digest from the server's
    /// registry and verified.
    async fn artifact(
        &self,
        a: &Assignment,
    ) -> std::result::Result<Arc<wharf_runtime::Artifact>, String> {
        if let Some(artifact) = self.runtime.cached(&a.wasm_digest) {
            return Ok(artifact);
        }
        let _one = self.pulling.lock().await;
        if let Some(artifact) = self.runtime.cached(&a.wasm_digest) {
            return Ok(artifact);
        }
        let hex = a
            .wasm_digest
            .strip_prefix("sha256:")
            .filter(|h| h.len() == 64 && h.chars().all(|c| c.is_ascii_hexdigit()))
            .ok_or_else(|| format!("unsupported digest {}", a.wasm_digest))?
            .to_owned();
        let path = self.blobs.join(&hex);
        let bytes = match tokio::fs::read(&path).await {
            Ok(bytes) if hex::encode(Sha256::digest(&bytes)) == hex => bytes,
            _ => {
                let bytes = self.pull(a, &hex).await?;
                let tmp = path.with_extension("tmp");
                let written = tokio::fs::write(&tmp, &bytes).await;
                if written.is_ok() {
                    let _ = tokio::fs::rename(&tmp, &path).await;
                }
                bytes
            }
        };
        let runtime = self.runtime.clone();
        let loaded = tokio::task::spawn_blocking(move || runtime.load(&bytes))
            .await
            .map_err(|e| format!("compiling failed: {e}"))?
            .map_err(|e| format!("cannot load the artifact: {e}"))?;
        Ok(loaded.artifact)
    }

    async fn pull(&self, a: &Assignment, hex: &str) -> std::result::Result<Vec<u8>, String> {
        let url = format!(
            "{}/v2/{}/blobs/{}",
            self.base(),
            a.repository,
            a.wasm_digest
        );
        let mut response = self
            .http
            .get(&url)
            .bearer_auth(&self.credential)
            .timeout(Duration::from_secs(600))
            .send()
            .await
            .map_err(|e| format!("cannot pull {}: {e}", a.wasm_digest))?;
        if !response.status().is_success() {
            return Err(format!(
                "cannot pull {} from {}: the server answered {}",
                a.wasm_digest,
                a.repository,
                response.status()
            ));
        }
        let mut bytes = Vec::new();
        let mut hasher = Sha256::new();
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|e| format!("pulling {} failed: {e}", a.wasm_digest))?
        {
            if bytes.len() as u64 + chunk.len() as u64 > MAX_WASM_BYTES {
                return Err(format!(
                    "{} is larger than {MAX_WASM_BYTES} bytes",
                    a.wasm_digest
                ));
            }
            hasher.update(&chunk);
            bytes.extend_from_slice(&chunk);
        }
        if hex::encode(hasher.finalize()) != hex {
            return Err(format!(
                "the pulled layer does not match its digest {}",
                a.wasm_digest
            ));
        }
        Ok(bytes)
    }

    /// Stops every task (the node is shutting down) and tells the server;
    /// outcomes it does not confirm stay in the outbox for the next start.
    async fn stop_all(self: &Arc<Self>) {
        let ids: Vec<String> = {
            let tasks = self.tasks.lock().expect("tasks lock");
            for t in tasks.values() {
                t.stop.stop();
            }
            tasks.keys().cloned().collect()
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::time::Instant::now() < deadline {
            let running = {
                let tasks = self.tasks.lock().expect("tasks lock");
                ids.iter()
                    .filter(|id| tasks.get(*id).is_some_and(|t| t.finished.is_none()))
                    .count()
            };
            if running == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let _ = tokio::time::timeout(Duration::from_secs(3), self.sync(0)).await;
    }
}

/// `wharf node install`: the systemd unit and environment file that run
/// `wharf node join` on this machine as a service.
#[derive(Debug, Args)]
pub(crate) struct InstallArgs {
    #[command(flatten)]
    join: JoinArgs,
    /// Where the unit goes.
    #[arg(long, default_value = "/etc/systemd/system")]
    unit_dir: PathBuf,
    /// The environment file the unit reads (mode 0600: it holds the join
    /// token until the node has joined).
    #[arg(long, default_value = "/etc/wharf/node.env")]
    env_file: PathBuf,
    /// The wharf binary the unit runs (default: this one).
    #[arg(long)]
    binary: Option<PathBuf>,
}

/// The node's data directory under systemd.
const SERVICE_DATA_DIR: &str = "/var/lib/wharf-node";

/// A value for a systemd environment file, quoted.
fn env_value(value: &str) -> Result<String> {
    if value.contains(['\n', '"', '\\']) {
        bail!("{value:?} cannot go into an environment file");
    }
    Ok(format!("\"{value}\""))
}

pub(crate) fn install(
    args: InstallArgs,
    server: &str,
    token: Option<String>,
    data_dir: Option<PathBuf>,
) -> Result<()> {
    let token = token.context("give the join token (--token, from wharf node token create)")?;
    wharf_api::fleet::parse_join_token(&token)
        .context("--token is not a join token (WJ1.…, from wharf node token create)")?;
    check_transport(server, args.join.insecure)?;
    let binary = match args.binary {
        Some(b) => b,
        None => std::env::current_exe().context("cannot find this binary")?,
    };
    let data_dir = data_dir.unwrap_or_else(|| PathBuf::from(SERVICE_DATA_DIR));
    let mut env = vec![
        format!("WHARF_SERVER={}", env_value(server)?),
        format!("WHARF_TOKEN={}", env_value(&token)?),
        format!(
            "WHARF_DATA_DIR={}",
            env_value(&data_dir.display().to_string())?
        ),
    ];
    if let Some(name) = &args.join.name {
        env.push(format!("WHARF_NODE_NAME={}", env_value(name)?));
    }
    if !args.join.labels.is_empty() {
        let labels: Vec<String> = args
            .join
            .labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        env.push(format!(
            "WHARF_NODE_LABELS={}",
            env_value(&labels.join(","))?
        ));
    }
    if let Some(slots) = args.join.slots {
        env.push(format!("WHARF_SLOTS={slots}"));
    }
    if let Some(budget) = args.join.memory_budget {
        env.push(format!("WHARF_MEMORY_BUDGET={budget}"));
    }
    if let Some(addr) = args.join.ingress {
        env.push(format!("WHARF_INGRESS={addr}"));
    }
    if let Some(addr) = args.join.advertise_ingress {
        env.push(format!("WHARF_ADVERTISE_INGRESS={addr}"));
    }
    if !args.join.allow_outbound_networks.is_empty() {
        let nets: Vec<String> = args
            .join
            .allow_outbound_networks
            .iter()
            .map(|n| n.to_string())
            .collect();
        env.push(format!("WHARF_ALLOW_OUTBOUND_NETWORKS={}", nets.join(",")));
    }
    let insecure = if args.join.insecure {
        " --insecure"
    } else {
        ""
    };
    let unit = format!(
        "[Unit]
Description=Wharf edge node (wharf node join)
Documentation=https://github.com/wharf/wharf#edge-nodes
Wants=network-online.target
After=network-online.target

[Service]
Type=exec
EnvironmentFile={env_file}
ExecStart={binary} node join{insecure}
Restart=always
RestartSec=2
# 3: the server refused the node's credential (removed); join again.
RestartPreventExitStatus=3
# The agent stops its tasks and reports their outcomes on SIGTERM.
KillSignal=SIGTERM
TimeoutStopSec=30
LimitNOFILE=65536
NoNewPrivileges=yes
ProtectSystem=strict
ProtectHome=yes
PrivateTmp=yes
PrivateDevices=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectControlGroups=yes
RestrictSUIDSGID=yes
ReadWritePaths={data_dir}

[Install]
WantedBy=multi-user.target
",
        env_file = args.env_file.display(),
        binary = binary.display(),
        data_dir = data_dir.display(),
    );
    if let Some(parent) = args.env_file.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("cannot create {}", parent.display()))?;
    }
    std::fs::create_dir_all(&data_dir)
        .with_context(|| format!("cannot create {}", data_dir.display()))?;
    crate::paths::write_private(&args.env_file, format!("{}\n", env.join("\n")).as_bytes())?;
    std::fs::create_dir_all(&args.unit_dir)
        .with_context(|| format!("cannot create {}", args.unit_dir.display()))?;
    let unit_path = args.unit_dir.join("wharf-node.service");
    std::fs::write(&unit_path, unit)
        .with_context(|| format!("cannot write {}", unit_path.display()))?;
    eprintln!(
        "wharf: wrote {} and {}",
        unit_path.display(),
        args.env_file.display()
    );
    println!("systemctl daemon-reload && systemctl enable --now wharf-node");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_http_is_for_loopback_unless_insecure() {
        assert!(check_transport("http://127.0.0.1:7070", false).is_ok());
        assert!(check_transport("http://localhost:7070", false).is_ok());
        assert!(check_transport("http://[::1]:7070", false).is_ok());
        assert!(check_transport("https://wharf.example:7070", false).is_ok());
        let e = check_transport("http://10.0.0.5:7070", false).unwrap_err();
        assert!(e.to_string().contains("--insecure"), "{e}");
        assert!(check_transport("http://10.0.0.5:7070", true).is_ok());
        assert!(check_transport("ftp://x", true).is_err());
    }
}
