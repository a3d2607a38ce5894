//! Several servers (issue 12), measured with real processes: task runs
//! through one `wharf server` on SQLite, one replica on PostgreSQL and
//! three replicas on the same PostgreSQL (the registry on a shared
//! `file://` path), with the same clients; and failover: the time from a
//! `kill -9` of the leader, during a service scale-up, until another
//! replica starts the service's tasks and until they all run.
//!
//! - **Latency**: one client, run-task → `STOPPED` (`POST /v1/tasks`, then
//!   `GET /v1/tasks/{id}?wait_stopped_ms=…`), each run on the next
//!   replica in turn; p50/p99 of 2,000 runs after 200 warm-ups.
//! - **Throughput**: `CLIENTS` clients (default 8), client `i` on replica
//!   `i mod n`, one task per request for 10 s; tasks that reached
//!   `STOPPED` (every replica's `wharf_task_stops_total`) per second, from
//!   the first request until the last accepted task stopped.
//! - **Failover** (three replicas): a service of 10 `heartbeat` tasks,
//!   scaled to 20 through a follower, and the leader killed at once;
//!   watched through a survivor every 20 ms.
//!
//! PostgreSQL: with `BENCH_PG=HOST:PORT:USER`, a running server (such as
//! Debian's cluster, `initdb` defaults: `fsync` and `synchronous_commit`
//! on), a fresh database per configuration and round made with its
//! `createdb`; without it, the testkit's (which runs with `fsync=off`,
//! for tests: the summary says so).
//!
//! `cargo build --release -p wharf && cargo run --release -p wharf-bench --bin replicas`
//! Env: `WHARF_BIN` (default target/release/wharf), `ROUNDS` (default 3),
//! `CLIENTS` (default 8), `BENCH_PG`. Prints a summary and writes
//! `target/bench-results/replicas.json`. Results: `docs/PERFORMANCE.md`,
//! "Several servers".

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use wharf_bench::{percentile, spawn_server, wharf_bin};
use wharf_testkit::{Target, wasm};

const LATENCY_WARMUP: usize = 200;
const LATENCY_RUNS: usize = 2_000;
const SUBMIT_FOR: Duration = Duration::from_secs(10);
const DRAIN_LIMIT: Duration = Duration::from_secs(120);
const SERVICE_TASKS: u64 = 10;

/// One `wharf server` process, killed on drop.
struct Replica {
    name: String,
    base: String,
    auth: String,
    data: PathBuf,
    child: Option<Child>,
}

impl Drop for Replica {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn agent() -> ureq::Agent {
    ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(60))
        .build()
}

impl Replica {
    fn call(&self, agent: &ureq::Agent, method: &str, path: &str, body: Option<&Value>) -> Value {
        let req = agent
            .request(method, &format!("{}{path}", self.base))
            .set("Authorization", &self.auth);
        let result = match body {
            Some(b) => req.send_json(b),
            None => req.call(),
        };
        match result {
            Ok(r) => r.into_json().expect("a JSON answer"),
            Err(ureq::Error::Status(code, r)) => panic!(
                "{} {method} {path}: {code} {}",
                self.name,
                r.into_string().unwrap_or_default()
            ),
            Err(e) => panic!("{} {method} {path}: {e}", self.name),
        }
    }

    /// Tasks stopped so far, by this replica's metrics.
    fn stops(&self, agent: &ureq::Agent) -> u64 {
        let text = agent
            .get(&format!("{}/metrics", self.base))
            .call()
            .expect("GET /metrics")
            .into_string()
            .unwrap();
        text.lines()
            .filter(|l| l.starts_with("wharf_task_stops_total"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>() as u64
    }

    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }
}

/// A configuration under test: `n` servers on `state` (`None`: SQLite).
struct Cluster {
    replicas: Vec<Replica>,
    state: Option<String>,
    blobs: String,
    _dir: tempfile::TempDir,
}

fn start(data: &Path, name: &str, state: Option<&str>, blobs: &str) -> Replica {
    let mut flags = vec!["--ingress", "off", "--blobs", blobs];
    if let Some(url) = state {
        flags.extend(["--state", url, "--replica", name]);
    }
    let (child, base, token) = spawn_server(&wharf_bin(), data, &flags);
    Replica {
        name: name.to_owned(),
        base,
        auth: format!("Bearer {token}"),
        data: data.to_owned(),
        child: Some(child),
    }
}

impl Cluster {
    fn new(n: usize, state: Option<String>) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let blobs = format!("file://{}", dir.path().join("shared").display());
        let mut replicas: Vec<Replica> = Vec::new();
        for i in 0..n {
            let data = dir.path().join(format!("r{i}"));
            if let Some(first) = replicas.first() {
                // Replicas share the admin token and the secrets key.
                std::fs::create_dir_all(&data).unwrap();
                for f in ["admin.token", "secrets.key"] {
                    std::fs::copy(first.data.join(f), data.join(f)).unwrap();
                }
            }
            replicas.push(start(&data, &format!("r{i}"), state.as_deref(), &blobs));
        }
        let c = Cluster {
            replicas,
            state,
            blobs,
            _dir: dir,
        };
        let first = &c.replicas[0];
        for (sample, family, args) in [
            ("hello", "hello", json!([])),
            ("heartbeat", "beat", json!(["100"])),
        ] {
            let reference = format!("team/{sample}:v1");
            let out = Command::new(wharf_bin())
                .arg("push")
                .arg(wasm(sample, Target::P1))
                .arg(format!(
                    "{}/{reference}",
                    first.base.trim_start_matches("http://")
                ))
                .env("WHARF_TOKEN", first.auth.trim_start_matches("Bearer "))
                .env("WHARF_SERVER", &first.base)
                .output()
                .expect("wharf push");
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            first.call(
                &agent(),
                "POST",
                "/v1/taskdefs",
                Some(&json!({"family": family, "artifact": reference, "args": args})),
            );
        }
        c
    }

    /// The replica that leads (the `/v1/nodes` listing is the leader's
    /// and names its own node).
    fn leader(&self, via: &Replica) -> String {
        let nodes = via.call(&agent(), "GET", "/v1/nodes", None);
        nodes
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["local"] == true)
            .and_then(|n| n["name"].as_str())
            .expect("a local node")
            .to_owned()
    }
}

fn pcts(samples: &mut [Duration]) -> [f64; 3] {
    [50.0, 90.0, 99.0].map(|q| percentile(samples, q).as_secs_f64() * 1e6)
}

fn latency(c: &Cluster) -> Value {
    let agents: Vec<ureq::Agent> = c.replicas.iter().map(|_| agent()).collect();
    let body = json!({"task_definition": "hello"});
    let mut samples = Vec::with_capacity(LATENCY_RUNS);
    for i in 0..LATENCY_WARMUP + LATENCY_RUNS {
        let k = i % c.replicas.len();
        let (r, a) = (&c.replicas[k], &agents[k]);
        let t = Instant::now();
        let run = r.call(a, "POST", "/v1/tasks", Some(&body));
        let id = run[0]["id"].as_str().unwrap().to_owned();
        let done = r.call(
            a,
            "GET",
            &format!("/v1/tasks/{id}?wait_stopped_ms=10000"),
            None,
        );
        let took = t.elapsed();
        assert_eq!(done["stop_code"], "Completed", "{done}");
        if i >= LATENCY_WARMUP {
            samples.push(took);
        }
    }
    let p = pcts(&mut samples);
    json!({"runs": LATENCY_RUNS, "p50_us": p[0].round(), "p90_us": p[1].round(), "p99_us": p[2].round()})
}

fn throughput(c: &Cluster) -> Value {
    let clients: usize = std::env::var("CLIENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(8);
    let metrics_agent = agent();
    let stops = || -> u64 { c.replicas.iter().map(|r| r.stops(&metrics_agent)).sum() };
    let before = stops();
    let started = Instant::now();
    let deadline = started + SUBMIT_FOR;
    let accepted: u64 = std::thread::scope(|s| {
        let handles: Vec<_> = (0..clients)
            .map(|i| {
                let r = &c.replicas[i % c.replicas.len()];
                s.spawn(move || {
                    let a = agent();
                    let body = json!({"task_definition": "hello"});
                    let mut n = 0u64;
                    while Instant::now() < deadline {
                        let answer = r.call(&a, "POST", "/v1/tasks", Some(&body));
                        n += answer.as_array().expect("tasks").len() as u64;
                    }
                    n
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).sum()
    });
    let submitted = started.elapsed().as_secs_f64();
    loop {
        if stops() - before >= accepted {
            break;
        }
        assert!(
            started.elapsed() < SUBMIT_FOR + DRAIN_LIMIT,
            "{accepted} accepted, {} stopped",
            stops() - before
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    let total = started.elapsed().as_secs_f64();
    json!({
        "clients": clients,
        "accepted": accepted,
        "task_runs_per_s": (accepted as f64 / total).round(),
        "submit_seconds": (submitted * 10.0).round() / 10.0,
        "total_seconds": (total * 1000.0).round() / 1000.0,
    })
}

/// Tasks of `service` as `via` lists them (`None`: it could not answer,
/// as while no replica leads).
fn try_tasks_of(via: &Replica, a: &ureq::Agent, service: &str) -> Option<Vec<Value>> {
    let answer = a
        .get(&format!(
            "{}/v1/tasks?service={service}&limit=1000",
            via.base
        ))
        .set("Authorization", &via.auth)
        .call()
        .ok()?;
    answer.into_json::<Value>().ok()?.as_array().cloned()
}

fn tasks_of(via: &Replica, a: &ureq::Agent, service: &str) -> Vec<Value> {
    try_tasks_of(via, a, service).expect("the tasks")
}

fn failover(c: &mut Cluster, round: usize) -> Value {
    let a = agent();
    let leader = c.leader(&c.replicas[1]);
    let dead = c.replicas.iter().position(|r| r.name == leader).unwrap();
    let via = (dead + 1) % c.replicas.len();
    let name = format!("web{round}");
    c.replicas[via].call(
        &a,
        "POST",
        "/v1/services",
        Some(&json!({"name": name, "task_definition": "beat", "desired_count": SERVICE_TASKS})),
    );
    let running_on = |tasks: &[Value], not: &str| {
        tasks
            .iter()
            .filter(|t| t["status"] == "RUNNING" && t["node"] != not)
            .count() as u64
    };
    let t0 = Instant::now();
    while running_on(&tasks_of(&c.replicas[via], &a, &name), "") < SERVICE_TASKS {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "the service did not start"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    c.replicas[via].call(
        &a,
        "PATCH",
        &format!("/v1/services/{name}"),
        Some(&json!({"desired_count": SERVICE_TASKS * 2})),
    );
    c.replicas[dead].kill9();
    let killed = Instant::now();
    let mut first = None;
    let all = loop {
        if let Some(tasks) = try_tasks_of(&c.replicas[via], &a, &name) {
            let live = tasks
                .iter()
                .filter(|t| t["status"] != "STOPPED" && t["node"] != leader.as_str())
                .count();
            if live > 0 && first.is_none() {
                first = Some(killed.elapsed());
            }
            if running_on(&tasks, &leader) == SERVICE_TASKS * 2 {
                assert_eq!(live as u64, SERVICE_TASKS * 2, "a slot was filled twice");
                break killed.elapsed();
            }
        }
        assert!(killed.elapsed() < Duration::from_secs(60), "no failover");
        std::thread::sleep(Duration::from_millis(20));
    };
    let acted = first.expect("a task started");
    c.replicas[via].call(&a, "DELETE", &format!("/v1/services/{name}"), None);
    // The dead replica comes back under its name for the next round.
    let data = c.replicas[dead].data.clone();
    c.replicas[dead] = start(&data, &leader, c.state.as_deref(), &c.blobs);
    json!({
        "killed": leader,
        "first_task_ms": acted.as_millis() as u64,
        "all_running_ms": all.as_millis() as u64,
    })
}

/// Debian's `createdb`, of the newest PostgreSQL installed.
fn createdb() -> PathBuf {
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL's binaries in /usr/lib/postgresql")
        .filter_map(|e| Some(e.ok()?.path().join("bin/createdb")))
        .filter(|p| p.exists())
        .collect();
    versions.sort();
    versions.pop().expect("createdb")
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let rounds: usize = std::env::var("ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let external = std::env::var("BENCH_PG").ok();
    let made = std::sync::atomic::AtomicUsize::new(0);
    let database = || -> String {
        match &external {
            Some(spec) => {
                let mut it = spec.splitn(3, ':');
                let (host, port, user) = (
                    it.next().unwrap_or("127.0.0.1"),
                    it.next().unwrap_or("5432"),
                    it.next().unwrap_or("postgres"),
                );
                let name = format!(
                    "bench_{}_{}",
                    std::process::id(),
                    made.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                );
                let out = Command::new(createdb())
                    .args(["-h", host, "-p", port, "-U", user, &name])
                    .output()
                    .expect("createdb");
                assert!(
                    out.status.success(),
                    "{}",
                    String::from_utf8_lossy(&out.stderr)
                );
                format!("postgres://{user}@{host}:{port}/{name}")
            }
            None => wharf_testkit::postgres::shared().database(),
        }
    };
    let configs: [(&str, usize, bool); 3] = [
        ("SQLite, 1 server", 1, false),
        ("PostgreSQL, 1 replica", 1, true),
        ("PostgreSQL, 3 replicas", 3, true),
    ];
    let mut results: Vec<Vec<Value>> = vec![Vec::new(); configs.len()];
    let mut failovers = Vec::new();
    for round in 0..rounds {
        for (k, (name, n, on_pg)) in configs.iter().enumerate() {
            let mut c = Cluster::new(*n, on_pg.then(&database));
            let l = latency(&c);
            let t = throughput(&c);
            eprintln!("round {round} {name}: {l} {t}");
            if *n == 3 {
                let f = failover(&mut c, round);
                eprintln!("round {round} failover: {f}");
                failovers.push(f);
            }
            results[k].push(json!({"latency": l, "throughput": t}));
        }
    }
    let mut summary = vec![
        match &external {
            Some(spec) => format!("PostgreSQL: {spec} (its own settings)"),
            None => {
                "PostgreSQL: the testkit's, with fsync=off (give BENCH_PG for a durable one)".into()
            }
        },
        "| configuration | run → STOPPED p50 | p99 | task runs/s, 8 clients |".to_owned(),
        "|---|---|---|---|".to_owned(),
    ];
    let mut table = serde_json::Map::new();
    for ((name, _, _), rs) in configs.iter().zip(&results) {
        let pick = |f: &dyn Fn(&Value) -> f64| -> (f64, f64, f64) {
            let mut v: Vec<f64> = rs.iter().map(f).collect();
            let m = median(&mut v);
            (m, v[0], v[v.len() - 1])
        };
        let p50 = pick(&|r| r["latency"]["p50_us"].as_f64().unwrap() / 1000.0);
        let p99 = pick(&|r| r["latency"]["p99_us"].as_f64().unwrap() / 1000.0);
        let runs = pick(&|r| r["throughput"]["task_runs_per_s"].as_f64().unwrap());
        summary.push(format!(
            "| {name} | {:.2} ms ({:.2}–{:.2}) | {:.1} ms ({:.1}–{:.1}) | {:.0} ({:.0}–{:.0}) |",
            p50.0, p50.1, p50.2, p99.0, p99.1, p99.2, runs.0, runs.1, runs.2
        ));
        table.insert((*name).to_owned(), json!(rs));
    }
    let mut first: Vec<f64> = failovers
        .iter()
        .map(|f| f["first_task_ms"].as_f64().unwrap())
        .collect();
    let mut all: Vec<f64> = failovers
        .iter()
        .map(|f| f["all_running_ms"].as_f64().unwrap())
        .collect();
    summary.push(format!(
        "\nfailover after kill -9 of the leader (3 replicas, {SERVICE_TASKS} → {} tasks): first new task {:.0} ms (median; {:?}), all running {:.0} ms (median; {:?})",
        SERVICE_TASKS * 2,
        median(&mut first),
        first,
        median(&mut all),
        all
    ));
    println!("{}", summary.join("\n"));
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace")
        .join("target/bench-results");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("replicas.json"),
        serde_json::to_string_pretty(&json!({"runs": table, "failover": failovers})).unwrap(),
    )
    .unwrap();
}
