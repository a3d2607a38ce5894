//! The fleet benchmark: `NODES` (default 1,000) lightweight agents in one
//! process speak the real node protocol — each joins with the join token,
//! holds its own credential and its own HTTP connection, and long-polls
//! `/v1/agent/sync` at the server's heartbeat — against a real `wharf
//! server --no-local-node`. The agents run no Wasm: an assignment is
//! reported `RUNNING` at once, so the figures are the control plane's.
//!
//! It reports: the server's CPU (% of one core) and resident memory per
//! node while the fleet only heartbeats (`STEADY_SECS`, default 30), the
//! time to place `TASKS` (default 10,000) service tasks across the fleet
//! (service created → every task `RUNNING`), the CPU during that, and the
//! time from one node going silent (its agent stops) until its tasks run
//! on other nodes, with the node timeout it includes.
//!
//! `cargo build --release -p wharf -p wharf-bench --bins && target/release/fleet`
//! Env: `WHARF_BIN` (default target/release/wharf), `NODES`, `TASKS`,
//! `HEARTBEAT` (default `2s`), `NODE_TIMEOUT` (default `10s`),
//! `STEADY_SECS`. Results and method: `docs/PERFORMANCE.md`, "Edge nodes".

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use wharf_api::fleet::{JoinRequest, JoinResponse, NodeInfo, Report, SyncResponse, TaskReport};
use wharf_api::model::TaskStatus;
use wharf_bench::{spawn_server, wharf_bin};
use wharf_testkit::{Target, wasm};

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// utime + stime of a process, in clock ticks (100 per second here).
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("/proc/PID/stat");
    // Fields after the command name, which is in parentheses.
    let rest = &stat[stat.rfind(')').expect("comm") + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS")
}

/// One fake node.
struct Agent {
    name: String,
    credential: String,
    http: reqwest::Client,
    /// Tasks it holds, reported RUNNING.
    tasks: Mutex<BTreeMap<String, ()>>,
    epoch: Mutex<String>,
    seen: AtomicU64,
    reports: AtomicU64,
    silent: AtomicBool,
}

fn info() -> NodeInfo {
    NodeInfo {
        slots: 100,
        memory_bytes: Some(8 << 30),
        free_slots: 100,
        free_memory_bytes: Some(8 << 30),
        version: "fleet".into(),
        engine_version: wharf_runtime::ENGINE_VERSION.into(),
        compatibility_hash: "0".into(),
        arch: std::env::consts::ARCH.into(),
        os: std::env::consts::OS.into(),
        wasi_interfaces: wharf_runtime::PROVIDED_INTERFACES
            .iter()
            .map(|s| (*s).to_owned())
            .collect(),
        ingress: None,
    }
}

impl Agent {
    /// One sync; `Ok(true)` when it brought new tasks (to report at once).
    async fn sync(&self, base: &str, wait_ms: u64) -> Result<bool, String> {
        let report = Report {
            epoch: self.epoch.lock().unwrap().clone(),
            seen: self.seen.load(Ordering::Acquire),
            boot: self.name.clone(),
            report_seq: self.reports.fetch_add(1, Ordering::AcqRel) + 1,
            wait_ms,
            info: info(),
            tasks: self
                .tasks
                .lock()
                .unwrap()
                .keys()
                .map(|id| TaskReport {
                    id: id.clone(),
                    status: TaskStatus::Running,
                    started_at: None,
                    logs: Vec::new(),
                    outcome: None,
                })
                .collect(),
        };
        let answer: SyncResponse = self
            .http
            .post(format!("{base}/v1/agent/sync"))
            .bearer_auth(&self.credential)
            .json(&report)
            .send()
            .await
            .map_err(|e| e.to_string())?
            .error_for_status()
            .map_err(|e| e.to_string())?
            .json()
            .await
            .map_err(|e| e.to_string())?;
        let same_epoch = *self.epoch.lock().unwrap() == answer.epoch;
        let fresh = {
            let mut tasks = self.tasks.lock().unwrap();
            for id in &answer.stop {
                tasks.remove(id);
            }
            let mut seen = if same_epoch {
                self.seen.load(Ordering::Acquire)
            } else {
                0
            };
            let fresh = !answer.assign.is_empty();
            for a in answer.assign {
                seen = seen.max(a.seq);
                tasks.insert(a.task_id, ());
            }
            self.seen.store(seen, Ordering::Release);
            fresh
        };
        *self.epoch.lock().unwrap() = answer.epoch;
        Ok(fresh)
    }

    async fn run(self: Arc<Self>, base: String, heartbeat_ms: u64) {
        loop {
            if self.silent.load(Ordering::Acquire) {
                return;
            }
            let mut wait = heartbeat_ms;
            loop {
                match self.sync(&base, wait).await {
                    // New tasks are reported RUNNING at once, as a real
                    // node does.
                    Ok(true) => wait = 0,
                    Ok(false) => break,
                    Err(_) => {
                        tokio::time::sleep(Duration::from_millis(500)).await;
                        break;
                    }
                }
            }
        }
    }
}

fn api(
    base: &str,
    token: &str,
    method: &str,
    path: &str,
    body: Option<serde_json::Value>,
) -> serde_json::Value {
    let req = ureq::request(method, &format!("{base}{path}"))
        .set("Authorization", &format!("Bearer {token}"));
    let r = match body {
        Some(b) => req.send_json(b),
        None => req.call(),
    };
    match r {
        Ok(r) => r.into_json().unwrap_or_default(),
        Err(ureq::Error::Status(code, r)) => {
            panic!(
                "{method} {path}: {code} {}",
                r.into_string().unwrap_or_default()
            )
        }
        Err(e) => panic!("{method} {path}: {e}"),
    }
}

fn main() {
    let nodes: usize = env_or("NODES", 1000);
    let tasks: u32 = env_or("TASKS", 10_000);
    let steady: u64 = env_or("STEADY_SECS", 30);
    let heartbeat = std::env::var("HEARTBEAT").unwrap_or_else(|_| "2s".into());
    let timeout = std::env::var("NODE_TIMEOUT").unwrap_or_else(|_| "10s".into());
    let heartbeat_ms = wharf_runtime::parse_duration(&heartbeat)
        .unwrap()
        .as_millis() as u64;
    let dir = tempfile::tempdir().unwrap();
    let (mut child, base, token) = spawn_server(
        &wharf_bin(),
        &dir.path().join("server"),
        &[
            "--no-local-node",
            "--ingress",
            "off",
            "--heartbeat",
            &heartbeat,
            "--node-timeout",
            &timeout,
        ],
    );
    let pid = child.id();
    let host = base.trim_start_matches("http://").to_owned();
    let pushed = std::process::Command::new(wharf_bin())
        .arg("push")
        .arg(wasm("heartbeat", Target::P1))
        .arg(format!("{host}/bench/beat:v1"))
        .env("WHARF_TOKEN", &token)
        .env("WHARF_SERVER", &base)
        .output()
        .expect("wharf push");
    assert!(
        pushed.status.success(),
        "{}",
        String::from_utf8_lossy(&pushed.stderr)
    );
    api(
        &base,
        &token,
        "POST",
        "/v1/taskdefs",
        Some(serde_json::json!({"family": "beat", "artifact": "bench/beat:v1", "args": ["1000"]})),
    );
    let join_token = api(
        &base,
        &token,
        "POST",
        "/v1/join-tokens",
        Some(serde_json::json!({})),
    )["token"]
        .as_str()
        .unwrap()
        .to_owned();
    let secret = wharf_api::fleet::parse_join_token(&join_token).unwrap().1;
    let rss_empty = rss_kib(pid);
    println!(
        "machine: {} cores; server {base}; {nodes} nodes, heartbeat {heartbeat}, node timeout {timeout}",
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let agents: Vec<Arc<Agent>> = rt.block_on(async {
        let started = Instant::now();
        let mut agents = Vec::with_capacity(nodes);
        for i in 0..nodes {
            let http = reqwest::Client::builder()
                .pool_max_idle_per_host(1)
                .build()
                .unwrap();
            let joined: JoinResponse = http
                .post(format!("{base}/v1/agent/join"))
                .bearer_auth(&secret)
                .json(&JoinRequest {
                    name: format!("fleet-{i:05}"),
                    labels: BTreeMap::new(),
                })
                .send()
                .await
                .unwrap()
                .error_for_status()
                .unwrap()
                .json()
                .await
                .unwrap();
            agents.push(Arc::new(Agent {
                name: joined.name,
                credential: joined.credential,
                http,
                tasks: Mutex::new(BTreeMap::new()),
                epoch: Mutex::new(String::new()),
                seen: AtomicU64::new(0),
                reports: AtomicU64::new(0),
                silent: AtomicBool::new(false),
            }));
        }
        println!(
            "joins: {nodes} in {:.2}s ({:.0}/s)",
            started.elapsed().as_secs_f64(),
            nodes as f64 / started.elapsed().as_secs_f64()
        );
        for a in &agents {
            rt_spawn(a.clone().run(base.clone(), heartbeat_ms));
        }
        agents
    });
    // Every node has reported.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let listed = api(&base, &token, "GET", "/v1/nodes", None);
        let ready = listed
            .as_array()
            .unwrap()
            .iter()
            .filter(|n| n["capacity"]["slots"].as_u64() > Some(0))
            .count();
        if ready == nodes {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "only {ready} of {nodes} nodes reported"
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    // Steady heartbeats.
    std::thread::sleep(Duration::from_secs(2));
    let (t0, c0) = (Instant::now(), cpu_ticks(pid));
    std::thread::sleep(Duration::from_secs(steady));
    let cpu = (cpu_ticks(pid) - c0) as f64 / 100.0 / t0.elapsed().as_secs_f64() * 100.0;
    let rss = rss_kib(pid);
    println!(
        "heartbeats: server CPU {cpu:.1}% of one core over {steady}s ({:.0} syncs/s expected)",
        nodes as f64 / (heartbeat_ms as f64 / 1000.0)
    );
    println!(
        "memory: server RSS {} MiB with the fleet, {} MiB before it: {:.1} KiB per node",
        rss / 1024,
        rss_empty / 1024,
        (rss.saturating_sub(rss_empty)) as f64 / nodes as f64
    );

    // Placing TASKS tasks.
    let (t0, c0) = (Instant::now(), cpu_ticks(pid));
    api(
        &base,
        &token,
        "POST",
        "/v1/services",
        Some(
            serde_json::json!({"name": "beat", "task_definition": "beat", "desired_count": tasks}),
        ),
    );
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let svc = api(&base, &token, "GET", "/v1/services/beat", None);
        if svc["running_count"].as_u64() == Some(tasks as u64) {
            break;
        }
        assert!(Instant::now() < deadline, "placing stalled: {svc}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let placed = t0.elapsed();
    let cpu = (cpu_ticks(pid) - c0) as f64 / 100.0 / placed.as_secs_f64() * 100.0;
    let per_node: Vec<usize> = agents
        .iter()
        .map(|a| a.tasks.lock().unwrap().len())
        .collect();
    println!(
        "placement: {tasks} tasks RUNNING on {nodes} nodes in {:.2}s ({:.0} tasks/s; server CPU {cpu:.0}% of one core); per node min {} max {}",
        placed.as_secs_f64(),
        tasks as f64 / placed.as_secs_f64(),
        per_node.iter().min().unwrap(),
        per_node.iter().max().unwrap()
    );
    println!(
        "memory: server RSS {} MiB with {tasks} tasks",
        rss_kib(pid) / 1024
    );

    // One node goes silent.
    let victim = agents[0].clone();
    let held: HashSet<String> = victim.tasks.lock().unwrap().keys().cloned().collect();
    victim.silent.store(true, Ordering::Release);
    let t0 = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let node = api(
            &base,
            &token,
            "GET",
            &format!("/v1/nodes/{}", victim.name),
            None,
        );
        let svc = api(&base, &token, "GET", "/v1/services/beat", None);
        if node["status"] == "LOST" && svc["running_count"].as_u64() == Some(tasks as u64) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the lost node's tasks were not replaced"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    println!(
        "loss: {} tasks of a silent node RUNNING elsewhere {:.2}s after its agent stopped (node timeout {timeout}; its last heartbeat was up to one heartbeat earlier)",
        held.len(),
        t0.elapsed().as_secs_f64()
    );
    let _ = child.kill();
    let _ = child.wait();
}

fn rt_spawn<F: std::future::Future<Output = ()> + Send + 'static>(f: F) {
    tokio::spawn(f);
}
