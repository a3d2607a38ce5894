//! Control-plane load against a real `wharf server` on loopback, over HTTP
//! with ureq (keep-alive agents), in three parts:
//!
//! 1. **Run-task latency**: one client, one task at a time — `POST
//!    /v1/tasks` for `hello`, then `GET /v1/tasks/{id}?wait_stopped_ms=…`
//!    until it is `STOPPED` — with the artifact cache warm; p50/p90/p99.
//!    Beside it, the nearest peers on the same file: a process per run of
//!    `wasmtime run hello.wasm` and of `wharf run hello.wasm`.
//! 2. **Sustained task runs/s** with the state store in the loop: several
//!    clients submit runs (`count` 1, then 10, per request) for a fixed
//!    time; the figure is tasks that reached `STOPPED` (the server's
//!    `wharf_task_stops_total`) per second, from the first request until
//!    the last accepted task stopped.
//! 3. **A service of 1,000 long-running tasks** (`heartbeat`) on a fresh
//!    server: time to converge, 20 s of checks that it stays at 1,000, the
//!    server's RSS before and at steady state (memory per task), and the
//!    drain after deleting it.
//!
//! Server-side latencies come from the server's own histograms
//! (`/metrics`, differenced around each part) to show where time goes.
//!
//! `cargo build --release -p wharf && cargo run --release -p wharf-bench --bin api_load`
//! Env: `WHARF_BIN` (default target/release/wharf), `WASMTIME` (default
//! `wasmtime` on PATH; the peer is skipped with a note when absent),
//! `PARTS` (e.g. `latency,throughput,wrk,service`; `wrk` is the sustained
//! runs again with `wrk` as the client), `CLIENTS` (default 8), `LATENCY_RUNS` (default 2,000),
//! `SERVICE_TASKS` (default 1,000; above it the server gets `--slots` to
//! match), `BEAT_MS` (the service's beat interval, default 1,000: 10 fills
//! each task's 64 KiB of retained output within the hold), `SERVICE_GUEST`
//! (`heartbeat`, the Rust sample, by default; `wat` runs
//! `samples/wat/heartbeat.wat` with its interval set to `BEAT_MS`, the
//! guest that holds least beside the host's own memory), `SECOND_WAVE=1`
//! (after the hold, the service scales to twice its tasks and the memory
//! they add is reported too: the marginal cost of a task; the server gets
//! slots for both waves, so above 500 tasks it starts with `--slots`).
//! Prints a summary and writes `target/bench-results/api_load.json`.
//! Results and method: `docs/PERFORMANCE.md`, "Control plane".

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use wharf_bench::{find_on_path, memory_kib, percentile, spawn_server, wasmtime_bin, wharf_bin};
use wharf_testkit::{Target, wasm};

/// Sequential runs before the latency is timed (the first compiles and
/// loads the artifact; the rest warm the allocator, SQLite and sockets).
const LATENCY_WARMUP: usize = 200;
/// Timed sequential runs: enough for a stable p99 (`LATENCY_RUNS`
/// overrides it, e.g. to profile the path for longer).
const LATENCY_RUNS: usize = 2_000;
/// Process spawns per peer (each is milliseconds), after warm-ups that
/// also fill both compile caches.
const PEER_WARMUP: usize = 20;
const PEER_RUNS: usize = 200;
/// Concurrent clients of the throughput part, each on its own connection
/// (`CLIENTS` overrides it).
const CLIENTS: usize = 8;
/// How long the clients submit runs.
const SUBMIT_FOR: Duration = Duration::from_secs(10);
/// How long the wait for the last accepted task to stop may take before
/// the part counts as failed.
const DRAIN_LIMIT: Duration = Duration::from_secs(120);
/// Tasks of the long-running service (`SERVICE_TASKS` overrides it).
const SERVICE_TASKS: u64 = 1_000;
/// How long the converged service is watched, sampled once a second.
const HOLD_SECONDS: u64 = 20;
/// The longest convergence or drain may take before the part fails.
const SERVICE_LIMIT: Duration = Duration::from_secs(300);
/// Linux's USER_HZ: the unit of utime/stime in /proc/PID/stat (100 on
/// every mainstream architecture).
const CLOCK_TICKS: f64 = 100.0;

/// A `wharf server` in a fresh data directory, killed on drop.
struct Server {
    base: String,
    auth: String,
    child: Child,
    agent: ureq::Agent,
    _dir: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("benches/ is in the workspace")
        .to_owned()
}

fn agent() -> ureq::Agent {
    ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(60))
        .build()
}

impl Server {
    fn start() -> Server {
        Server::start_with(&[])
    }

    fn start_with(flags: &[&str]) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let (child, base, token) = spawn_server(&wharf_bin(), dir.path(), flags);
        Server {
            base,
            auth: format!("Bearer {token}"),
            child,
            agent: agent(),
            _dir: dir,
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn host(&self) -> &str {
        self.base.trim_start_matches("http://")
    }

    fn request(&self, agent: &ureq::Agent, method: &str, path: &str) -> ureq::Request {
        agent
            .request(method, &format!("{}{path}", self.base))
            .set("Authorization", &self.auth)
    }

    /// `method path` with an optional JSON body; the JSON answer, or a
    /// panic naming the status and the server's error body.
    fn call(&self, agent: &ureq::Agent, method: &str, path: &str, body: Option<&Value>) -> Value {
        let req = self.request(agent, method, path);
        let result = match body {
            Some(b) => req.send_json(b),
            None => req.call(),
        };
        match result {
            Ok(r) => r.into_json().expect("a JSON answer"),
            Err(ureq::Error::Status(code, r)) => panic!(
                "{method} {path}: {code} {}",
                r.into_string().unwrap_or_default()
            ),
            Err(e) => panic!("{method} {path}: {e}"),
        }
    }

    /// `GET path`, `None` on 404.
    fn get_opt(&self, path: &str) -> Option<Value> {
        match self.request(&self.agent, "GET", path).call() {
            Ok(r) => Some(r.into_json().expect("a JSON answer")),
            Err(ureq::Error::Status(404, _)) => None,
            Err(e) => panic!("GET {path}: {e}"),
        }
    }

    fn metrics(&self) -> String {
        self.agent
            .get(&format!("{}/metrics", self.base))
            .call()
            .expect("GET /metrics")
            .into_string()
            .unwrap()
    }

    /// Pushes a sample with `wharf push`, as `team/NAME:v1`.
    fn push(&self, sample: &str) -> String {
        self.push_file(sample, &wasm(sample, Target::P1))
    }

    /// Pushes the module at `path` as
    /// `team/NAME:v1`.
    fn push_file(&self, sample: &str, path: &Path) -> String {
        let reference = format!("team/{sample}:v1");
        let out = Command::new(wharf_bin())
            .arg("push")
            .arg(path)
            .arg(format!("{}/{reference}", self.host()))
            .env("WHARF_TOKEN", self.auth.trim_start_matches("Bearer "))
            .env("WHARF_SERVER", &self.base)
            .output()
            .expect("run wharf push");
        assert!(
            out.status.success(),
            "wharf push failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        reference
    }
}

// ----- /proc -----

/// User + system CPU seconds of a process so far.
fn cpu_seconds(pid: &str) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name, which is in parentheses and may hold
    // spaces: state is field 3, utime 14, stime 15.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    ticks as f64 / CLOCK_TICKS
}

/// The machine's CPU seconds so far from /proc/stat: (busy, idle + iowait,
/// steal). Steal is time the hypervisor gave to other guests.
fn machine_cpu() -> (f64, f64, f64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let f: Vec<f64> = stat
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let get = |i: usize| f.get(i).copied().unwrap_or(0.0) / CLOCK_TICKS;
    // user nice system idle iowait irq softirq steal
    let idle = get(3) + get(4);
    let steal = get(7);
    let busy = get(0) + get(1) + get(2) + get(5) + get(6);
    (busy, idle, steal)
}

/// CPU seconds of the server and of this client process.
fn cpu_pair(server: &Server) -> (f64, f64) {
    (cpu_seconds(&server.pid().to_string()), cpu_seconds("self"))
}

/// A process's threads grouped by name: (CPU seconds, context switches)
/// so far. Threads that exited are not counted; the server's tokio
/// workers and SQLite connection threads live as long as it does.
fn threads(pid: u32) -> BTreeMap<String, (f64, u64)> {
    let mut out: BTreeMap<String, (f64, u64)> = BTreeMap::new();
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for entry in dir.flatten() {
        let tid = entry.file_name().to_string_lossy().into_owned();
        let base = format!("{pid}/task/{tid}");
        let (Ok(comm), Ok(status)) = (
            std::fs::read_to_string(format!("/proc/{base}/comm")),
            std::fs::read_to_string(format!("/proc/{base}/status")),
        ) else {
            continue;
        };
        let switches: u64 = ["voluntary_ctxt_switches", "nonvoluntary_ctxt_switches"]
            .iter()
            .filter_map(|k| {
                status
                    .lines()
                    .find_map(|l| l.strip_prefix(k)?.strip_prefix(':'))
                    .and_then(|v| v.trim().parse::<u64>().ok())
            })
            .sum();
        let slot = out.entry(comm.trim().to_owned()).or_default();
        slot.0 += cpu_seconds(&base);
        slot.1 += switches;
    }
    out
}

/// Per thread name, CPU µs and context switches per `unit` between two
/// [`threads`] readings.
fn threads_delta(
    before: &BTreeMap<String, (f64, u64)>,
    after: &BTreeMap<String, (f64, u64)>,
    units: f64,
) -> BTreeMap<String, (f64, f64)> {
    after
        .iter()
        .map(|(name, &(cpu, sw))| {
            let (cpu0, sw0) = before.get(name).copied().unwrap_or_default();
            (
                name.clone(),
                (
                    round1((cpu - cpu0) / units * 1e6),
                    round1(sw.saturating_sub(sw0) as f64 / units),
                ),
            )
        })
        .filter(|(_, (cpu, sw))| *cpu > 0.0 || *sw > 0.0)
        .collect()
}

fn describe_threads(d: &BTreeMap<String, (f64, f64)>) -> String {
    d.iter()
        .map(|(name, (cpu, sw))| format!("{name} {cpu} µs CPU, {sw} switches"))
        .collect::<Vec<_>>()
        .join("; ")
}

fn threads_json(d: &BTreeMap<String, (f64, f64)>) -> Value {
    d.iter()
        .map(|(name, (cpu, sw))| {
            (
                name.clone(),
                json!({ "cpu_us": cpu, "context_switches": sw }),
            )
        })
        .collect::<serde_json::Map<_, _>>()
        .into()
}

// ----- Prometheus text -----

/// The sample lines of metric `name` (exactly) whose labels contain every
/// `filter` (`key="value"`): (labels, value).
fn series<'a>(text: &'a str, name: &str, filters: &[&str]) -> Vec<(&'a str, f64)> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (head, value) = l.rsplit_once(' ')?;
            let (metric, labels) = match head.split_once('{') {
                Some((m, rest)) => (m, rest.trim_end_matches('}')),
                None => (head, ""),
            };
            (metric == name && filters.iter().all(|f| labels.contains(f)))
                .then(|| (labels, value.parse().unwrap_or(0.0)))
        })
        .collect()
}

fn counter(text: &str, name: &str, filters: &[&str]) -> f64 {
    series(text, name, filters).iter().map(|(_, v)| v).sum()
}

/// Stopped tasks by stop code.
fn stops(text: &str) -> BTreeMap<String, f64> {
    series(text, "wharf_task_stops_total", &[])
        .into_iter()
        .map(|(labels, v)| {
            let code = labels
                .trim_start_matches("stop_code=\"")
                .trim_end_matches('"');
            (code.to_owned(), v)
        })
        .collect()
}

fn stops_delta(before: &str, after: &str) -> BTreeMap<String, u64> {
    let b = stops(before);
    stops(after)
        .into_iter()
        .map(|(code, v)| {
            let d = v - b.get(&code).copied().unwrap_or(0.0);
            (code, d.round() as u64)
        })
        .filter(|(_, d)| *d > 0)
        .collect()
}

/// A histogram (summed over the series that match), or the difference of
/// two readings of one.
#[derive(Debug, Default)]
struct Hist {
    count: f64,
    sum: f64,
    /// (upper bound, cumulative count), ascending.
    buckets: Vec<(f64, f64)>,
}

impl Hist {
    fn read(text: &str, name: &str, filters: &[&str]) -> Hist {
        let mut buckets: BTreeMap<u64, (f64, f64)> = BTreeMap::new();
        for (labels, v) in series(text, &format!("{name}_bucket"), filters) {
            let le = labels
                .split("le=\"")
                .nth(1)
                .and_then(|s| s.split('"').next())
                .map(|s| {
                    if s == "+Inf" {
                        f64::INFINITY
                    } else {
                        s.parse().unwrap()
                    }
                })
                .unwrap();
            buckets.entry(le.to_bits()).or_insert((le, 0.0)).1 += v;
        }
        let mut buckets: Vec<(f64, f64)> = buckets.into_values().collect();
        buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        Hist {
            count: counter(text, &format!("{name}_count"), filters),
            sum: counter(text, &format!("{name}_sum"), filters),
            buckets,
        }
    }

    fn delta(before: &str, after: &str, name: &str, filters: &[&str]) -> Hist {
        let (b, a) = (
            Hist::read(before, name, filters),
            Hist::read(after, name, filters),
        );
        Hist {
            count: a.count - b.count,
            sum: a.sum - b.sum,
            buckets: a
                .buckets
                .iter()
                .map(|&(le, n)| {
                    let old = b.buckets.iter().find(|x| x.0 == le).map_or(0.0, |x| x.1);
                    (le, n - old)
                })
                .collect(),
        }
    }

    fn mean_us(&self) -> f64 {
        if self.count > 0.0 {
            self.sum / self.count * 1e6
        } else {
            f64::NAN
        }
    }

    /// The upper bound of the bucket holding the `q`-quantile, in µs.
    fn quantile_le_us(&self, q: f64) -> f64 {
        let target = q * self.count;
        self.buckets
            .iter()
            .find(|(_, n)| *n >= target && *n > 0.0)
            .map_or(f64::NAN, |(le, _)| le * 1e6)
    }

    fn json(&self) -> Value {
        json!({
            "count": self.count,
            "mean_us": round1(self.mean_us()),
            "p50_bucket_le_us": self.quantile_le_us(0.5),
            "p99_bucket_le_us": self.quantile_le_us(0.99),
        })
    }

    fn describe(&self) -> String {
        format!(
            "n {:.0}, mean {:.1} µs, p50 ≤ {} µs, p99 ≤ {} µs",
            self.count,
            self.mean_us(),
            self.quantile_le_us(0.5),
            self.quantile_le_us(0.99)
        )
    }
}

// ----- figures -----

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

/// p50, p90, p99 of `samples` in µs.
fn pcts(samples: &mut [Duration]) -> [f64; 3] {
    [50.0, 90.0, 99.0].map(|p| round1(us(percentile(samples, p))))
}

fn pcts_json(p: [f64; 3]) -> Value {
    json!({ "p50_us": p[0], "p90_us": p[1], "p99_us": p[2] })
}

// ----- part 1: latency -----

/// Runs `hello` once over the API and waits for it to stop: the time of
/// the POST and of the wait.
fn run_and_wait(server: &Server, body: &Value) -> (Duration, Duration) {
    let t = Instant::now();
    let tasks = server.call(&server.agent, "POST", "/v1/tasks", Some(body));
    let posted = t.elapsed();
    let id = tasks[0]["id"].as_str().expect("a task id").to_owned();
    let task = server.call(
        &server.agent,
        "GET",
        &format!("/v1/tasks/{id}?wait_stopped_ms=5000"),
        None,
    );
    assert_eq!(task["status"], "STOPPED", "{task}");
    assert_eq!(task["stop_code"], "Completed", "{task}");
    (posted, t.elapsed() - posted)
}

/// Wall times of [`PEER_RUNS`] processes, each from spawn to its
/// successful exit, after [`PEER_WARMUP`] untimed ones.
fn time_process(program: &Path, args: &[std::ffi::OsString]) -> Vec<Duration> {
    let run = || {
        let t = Instant::now();
        let status = Command::new(program)
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("spawn the peer");
        assert!(status.success(), "peer failed: {status}");
        t.elapsed()
    };
    for _ in 0..PEER_WARMUP {
        run();
    }
    (0..PEER_RUNS).map(|_| run()).collect()
}

fn latency(server: &Server, summary: &mut Vec<String>) -> Value {
    let runs = env_or("LATENCY_RUNS", LATENCY_RUNS);
    let body = json!({ "task_definition": "hello" });
    for _ in 0..LATENCY_WARMUP {
        run_and_wait(server, &body);
    }
    let before = server.metrics();
    let cpu0 = cpu_pair(server);
    let threads0 = threads(server.pid());
    let mut total = Vec::with_capacity(runs);
    let mut post = Vec::with_capacity(runs);
    let mut wait = Vec::with_capacity(runs);
    let started = Instant::now();
    for _ in 0..runs {
        let (p, w) = run_and_wait(server, &body);
        total.push(p + w);
        post.push(p);
        wait.push(w);
    }
    let wall = started.elapsed().as_secs_f64();
    let cpu1 = cpu_pair(server);
    let per_thread = threads_delta(&threads0, &threads(server.pid()), runs as f64);
    let after = server.metrics();
    let (total_p, post_p, wait_p) = (pcts(&mut total), pcts(&mut post), pcts(&mut wait));
    let h_post = Hist::delta(
        &before,
        &after,
        "wharf_api_request_duration_seconds",
        &["method=\"POST\"", "route=\"/v1/tasks\""],
    );
    let h_get = Hist::delta(
        &before,
        &after,
        "wharf_api_request_duration_seconds",
        &["method=\"GET\"", "route=\"/v1/tasks/{id}\""],
    );
    let h_start = Hist::delta(&before, &after, "wharf_task_start_latency_seconds", &[]);
    let h_inst = Hist::delta(&before, &after, "wharf_task_instantiate_seconds", &[]);
    let h_run = Hist::delta(&before, &after, "wharf_task_duration_seconds", &[]);

    summary.push(format!(
        "## 1. run-task → STOPPED, hello (p1), one client, sequential, {runs} runs after {LATENCY_WARMUP} warm-ups\n\
         | | p50 µs | p90 µs | p99 µs |\n|---|---|---|---|\n\
         | POST + wait (end to end) | {} | {} | {} |\n\
         | POST /v1/tasks (answered when the record is durable) | {} | {} | {} |\n\
         | GET ?wait_stopped_ms until STOPPED | {} | {} | {} |\n\
         target p50 ≤ 1000 µs: {}\n\
         server-side, from its histograms:\n\
         - POST /v1/tasks: {}\n\
         - GET /v1/tasks/{{id}}: {}\n\
         - task accepted → slot: {}\n\
         - instantiation: {}\n\
         - task run time: {}\n\
         CPU per run: server {:.1} µs, client {:.1} µs (wall {:.1} µs)\n\
         server threads per run: {}",
        total_p[0],
        total_p[1],
        total_p[2],
        post_p[0],
        post_p[1],
        post_p[2],
        wait_p[0],
        wait_p[1],
        wait_p[2],
        if total_p[0] <= 1000.0 {
            "met"
        } else {
            "NOT met"
        },
        h_post.describe(),
        h_get.describe(),
        h_start.describe(),
        h_inst.describe(),
        h_run.describe(),
        (cpu1.0 - cpu0.0) / runs as f64 * 1e6,
        (cpu1.1 - cpu0.1) / runs as f64 * 1e6,
        wall / runs as f64 * 1e6,
        describe_threads(&per_thread),
    ));

    // The peers: a process per run of the same file.
    let hello = wasm("hello", Target::P1);
    let run_dir = tempfile::tempdir().unwrap();
    let mut peers = serde_json::Map::new();
    let mut peer_lines = Vec::new();
    let wasmtime = wasmtime_bin();
    // (name, program, arguments); a peer without a program is skipped.
    let candidates: [(&str, Option<PathBuf>, Vec<std::ffi::OsString>); 2] = [
        (
            "wasmtime run",
            wasmtime.clone(),
            vec!["run".into(), hello.clone().into()],
        ),
        (
            "wharf run",
            Some(wharf_bin()),
            vec![
                "run".into(),
                "--data-dir".into(),
                run_dir.path().into(),
                hello.clone().into(),
            ],
        ),
    ];
    for (name, program, args) in candidates {
        let Some(program) = program else {
            peer_lines.push(format!(
                "- {name}: skipped (no wasmtime: set WASMTIME or put it on PATH)"
            ));
            peers.insert(name.into(), Value::Null);
            continue;
        };
        let mut samples = time_process(&program, &args);
        let p = pcts(&mut samples);
        peer_lines.push(format!(
            "- {name}: p50 {} µs, p90 {} µs, p99 {} µs ({PEER_RUNS} runs after {PEER_WARMUP} warm-ups); API p50 / this p50 = {:.3}",
            p[0],
            p[1],
            p[2],
            total_p[0] / p[0]
        ));
        let mut entry = pcts_json(p);
        entry["runs"] = json!(PEER_RUNS);
        entry["api_p50_over_peer_p50"] = json!((total_p[0] / p[0] * 1000.0).round() / 1000.0);
        peers.insert(name.into(), entry);
    }
    let wasmtime_version = wasmtime.as_ref().and_then(|bin| {
        let out = Command::new(bin).arg("--version").output().ok()?;
        Some(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    });
    summary.push(format!(
        "peers, a process per run of the same hello.wasm ({}):\n{}",
        wasmtime_version.as_deref().unwrap_or("wasmtime absent"),
        peer_lines.join("\n")
    ));

    json!({
        "runs": runs,
        "warmup": LATENCY_WARMUP,
        "end_to_end": pcts_json(total_p),
        "post": pcts_json(post_p),
        "wait_stopped": pcts_json(wait_p),
        "target_p50_us": 1000,
        "target_met": total_p[0] <= 1000.0,
        "server": {
            "post_tasks": h_post.json(),
            "get_task": h_get.json(),
            "task_start_latency": h_start.json(),
            "task_instantiate": h_inst.json(),
            "task_duration": h_run.json(),
            "cpu_us_per_run": round1((cpu1.0 - cpu0.0) / runs as f64 * 1e6),
            "threads_per_run": threads_json(&per_thread),
        },
        "client_cpu_us_per_run": round1((cpu1.1 - cpu0.1) / runs as f64 * 1e6),
        "peers": peers,
        "wasmtime_version": wasmtime_version,
    })
}

// ----- part 2: throughput -----

fn clients() -> usize {
    env_or("CLIENTS", CLIENTS)
}

/// The number in the environment variable `name`, or `default`.
fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Waits until `accepted` tasks have stopped since the `before` metrics:
/// every accepted task counts once it has stopped, and the clock (from
/// `started`) runs until the last one has. Returns the metrics then and
/// the seconds since `started`; panics past the drain limit.
fn drain(server: &Server, before: &str, accepted: u64, started: Instant) -> (String, f64) {
    let stopped_now = |text: &str| stops_delta(before, text).values().sum::<u64>();
    loop {
        let m = server.metrics();
        if stopped_now(&m) >= accepted {
            return (m, started.elapsed().as_secs_f64());
        }
        assert!(
            started.elapsed() < SUBMIT_FOR + DRAIN_LIMIT,
            "{accepted} tasks accepted but only {} stopped",
            stopped_now(&m)
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn throughput(server: &Server, per_request: u32, summary: &mut Vec<String>) -> Value {
    let clients = clients();
    let before = server.metrics();
    let cpu0 = cpu_pair(server);
    let threads0 = threads(server.pid());
    let machine0 = machine_cpu();
    let started = Instant::now();
    let deadline = started + SUBMIT_FOR;
    let results: Vec<(u64, u64, Vec<Duration>)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..clients)
            .map(|_| {
                s.spawn(|| {
                    let agent = agent();
                    let body = json!({ "task_definition": "hello", "count": per_request });
                    let (mut requests, mut tasks, mut lat) = (0u64, 0u64, Vec::new());
                    while Instant::now() < deadline {
                        let t = Instant::now();
                        let answer = server.call(&agent, "POST", "/v1/tasks", Some(&body));
                        lat.push(t.elapsed());
                        let n = answer.as_array().expect("an array of tasks").len();
                        assert_eq!(n, per_request as usize);
                        requests += 1;
                        tasks += n as u64;
                    }
                    (requests, tasks, lat)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let submitted_secs = started.elapsed().as_secs_f64();
    let requests: u64 = results.iter().map(|r| r.0).sum();
    let accepted: u64 = results.iter().map(|r| r.1).sum();
    let mut lat: Vec<Duration> = results.into_iter().flat_map(|r| r.2).collect();
    let (after, total_secs) = drain(server, &before, accepted, started);
    let cpu1 = cpu_pair(server);
    let threads1 = threads(server.pid());
    let machine1 = machine_cpu();
    let codes = stops_delta(&before, &after);
    let completed = codes.get("Completed").copied().unwrap_or(0);
    let stopped: u64 = codes.values().sum();
    let runs_per_s = stopped as f64 / total_secs;
    let req_per_s = requests as f64 / submitted_secs;
    let lat_p = pcts(&mut lat);
    let h_post = Hist::delta(
        &before,
        &after,
        "wharf_api_request_duration_seconds",
        &["method=\"POST\"", "route=\"/v1/tasks\""],
    );
    let h_start = Hist::delta(&before, &after, "wharf_task_start_latency_seconds", &[]);
    let per_thread = threads_delta(&threads0, &threads1, stopped.max(1) as f64);
    let server_cpu = (cpu1.0 - cpu0.0) / total_secs;
    let client_cpu = (cpu1.1 - cpu0.1) / total_secs;
    let machine_busy = (machine1.0 - machine0.0) / total_secs;
    let machine_idle = (machine1.1 - machine0.1) / total_secs;
    let machine_steal = (machine1.2 - machine0.2) / total_secs;
    summary.push(format!(
        "## 2. sustained runs, {clients} clients, count={per_request} per request, {:.0} s of submitting\n\
         - tasks stopped: {stopped} ({completed} Completed; by code {codes:?}) of {accepted} accepted, \
           in {total_secs:.2} s (last stop {:.2} s after the last request)\n\
         - **{runs_per_s:.0} task runs/s** (target ≥ 5,000: {}); {req_per_s:.0} HTTP requests/s\n\
         - POST latency under load: p50 {} µs, p90 {} µs, p99 {} µs; server-side {}\n\
         - task accepted → slot: {}\n\
         - CPU: server {:.2} cores, client {:.2} cores; whole machine busy {:.2}, idle {:.2}, stolen {:.2} cores\n\
         - server threads per task: {}",
        SUBMIT_FOR.as_secs_f64(),
        total_secs - submitted_secs,
        if runs_per_s >= 5000.0 {
            "met"
        } else {
            "NOT met"
        },
        lat_p[0],
        lat_p[1],
        lat_p[2],
        h_post.describe(),
        h_start.describe(),
        server_cpu,
        client_cpu,
        machine_busy,
        machine_idle,
        machine_steal,
        describe_threads(&per_thread),
    ));
    json!({
        "clients": clients,
        "count_per_request": per_request,
        "submit_seconds": round1(submitted_secs),
        "total_seconds": (total_secs * 1000.0).round() / 1000.0,
        "requests": requests,
        "accepted": accepted,
        "stopped": stopped,
        "stop_codes": codes,
        "task_runs_per_s": runs_per_s.round(),
        "http_requests_per_s": req_per_s.round(),
        "target_runs_per_s": 5000,
        "target_met": runs_per_s >= 5000.0,
        "post_latency": pcts_json(lat_p),
        "server": {
            "post_tasks": h_post.json(),
            "task_start_latency": h_start.json(),
            "cpu_cores": (server_cpu * 100.0).round() / 100.0,
            "threads_per_task": threads_json(&per_thread),
        },
        "client_cpu_cores": (client_cpu * 100.0).round() / 100.0,
        "machine_cores": {
            "busy": (machine_busy * 100.0).round() / 100.0,
            "idle": (machine_idle * 100.0).round() / 100.0,
            "steal": (machine_steal * 100.0).round() / 100.0,
        },
    })
}

/// The same sustained runs with `wrk` as the client (C, epoll: it costs
/// the shared 2 cores far less than ureq's threads): `CLIENTS`
/// connections on 2 threads, each `POST /v1/tasks` for `hello` with
/// `count` 1, for `SUBMIT_FOR`; the figure is again tasks stopped per
/// second until the last accepted one stopped. Skipped with a note when
/// `wrk` is not on PATH.
fn wrk_runs(server: &Server, summary: &mut Vec<String>) -> Value {
    let Some(wrk) = find_on_path("wrk") else {
        summary.push("## 2b. sustained runs with wrk: skipped (no wrk on PATH)".into());
        return json!({ "skipped": "no wrk on PATH" });
    };
    let clients = clients();
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("post.lua");
    std::fs::write(
        &script,
        format!(
            "wrk.method = \"POST\"\n\
             wrk.body = '{{\"task_definition\":\"hello\"}}'\n\
             wrk.headers[\"Content-Type\"] = \"application/json\"\n\
             wrk.headers[\"Authorization\"] = \"{}\"\n",
            server.auth
        ),
    )
    .unwrap();
    let before = server.metrics();
    let cpu0 = cpu_pair(server);
    let machine0 = machine_cpu();
    let started = Instant::now();
    let out = Command::new(wrk)
        .args(["-t2", &format!("-c{clients}"), "--latency"])
        .arg(format!("-d{}s", SUBMIT_FOR.as_secs()))
        .arg("-s")
        .arg(&script)
        .arg(format!("{}/v1/tasks", server.base))
        .output()
        .expect("run wrk");
    let submitted_secs = started.elapsed().as_secs_f64();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "wrk failed: {text}");
    // "N requests in 10.00s", "Non-2xx or 3xx responses: M", and the
    // latency distribution's "50% 1.23ms" lines.
    let requests: u64 = text
        .lines()
        .find(|l| l.contains(" requests in "))
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .expect("wrk's request count");
    let refused: u64 = text
        .lines()
        .find(|l| l.contains("Non-2xx or 3xx responses:"))
        .and_then(|l| l.rsplit(':').next()?.trim().parse().ok())
        .unwrap_or(0);
    let accepted = requests - refused;
    let pct = |p: &str| -> f64 {
        text.lines()
            .map(str::trim)
            .find_map(|l| l.strip_prefix(p))
            .map(|v| {
                let v = v.trim();
                let (n, unit) = v.split_at(v.find(|c: char| c.is_alphabetic()).unwrap_or(v.len()));
                let n: f64 = n.parse().unwrap_or(f64::NAN);
                n * match unit {
                    "us" => 1.0,
                    "ms" => 1_000.0,
                    "s" => 1_000_000.0,
                    _ => f64::NAN,
                }
            })
            .unwrap_or(f64::NAN)
    };
    let (p50, p90, p99) = (pct("50% "), pct("90% "), pct("99% "));
    let (after, total_secs) = drain(server, &before, accepted, started);
    let cpu1 = cpu_pair(server);
    let machine1 = machine_cpu();
    let codes = stops_delta(&before, &after);
    let completed = codes.get("Completed").copied().unwrap_or(0);
    let stopped: u64 = codes.values().sum();
    let runs_per_s = stopped as f64 / total_secs;
    let server_cpu = (cpu1.0 - cpu0.0) / total_secs;
    let machine_busy = (machine1.0 - machine0.0) / total_secs;
    let machine_idle = (machine1.1 - machine0.1) / total_secs;
    summary.push(format!(
        "## 2b. sustained runs, wrk, {clients} connections, count=1 per request, {:.0} s\n\
         - tasks stopped: {stopped} ({completed} Completed) of {accepted} accepted ({refused} refused), \
           in {total_secs:.2} s (last stop {:.2} s after wrk ended)\n\
         - **{runs_per_s:.0} task runs/s** (target ≥ 10,000: {})\n\
         - POST latency (wrk): p50 {p50:.0} µs, p90 {p90:.0} µs, p99 {p99:.0} µs\n\
         - CPU: server {server_cpu:.2} cores; whole machine busy {machine_busy:.2}, idle {machine_idle:.2} cores",
        SUBMIT_FOR.as_secs_f64(),
        total_secs - submitted_secs,
        if runs_per_s >= 10_000.0 { "met" } else { "NOT met" },
    ));
    json!({
        "client": "wrk",
        "connections": clients,
        "requests": requests,
        "refused": refused,
        "stopped": stopped,
        "stop_codes": codes,
        "total_seconds": (total_secs * 1000.0).round() / 1000.0,
        "task_runs_per_s": runs_per_s.round(),
        "post_latency_us": { "p50": p50, "p90": p90, "p99": p99 },
        "server_cpu_cores": (server_cpu * 100.0).round() / 100.0,
        "machine_cores": {
            "busy": (machine_busy * 100.0).round() / 100.0,
            "idle": (machine_idle * 100.0).round() / 100.0,
        },
    })
}

// ----- part 3: a service of 1,000 long-running tasks -----

fn service(summary: &mut Vec<String>) -> Value {
    let service_tasks = env_or("SERVICE_TASKS", SERVICE_TASKS as usize).max(1) as u64;
    let beat_ms = env_or("BEAT_MS", 1_000);
    // The default pool holds 1,000 tasks; more need slots (and a pool)
    // of their size, and a memory budget for their 8 MiB limits (the
    // default, half of the machine, reserves ~1,500 of them).
    let second_wave = std::env::var("SECOND_WAVE").is_ok_and(|v| v == "1");
    let most = service_tasks * if second_wave { 2 } else { 1 };
    let slots = most.to_string();
    let budget = format!("{}MiB", most * 8);
    let server = if most > 1_000 {
        Server::start_with(&["--slots", &slots, "--memory-budget", &budget])
    } else {
        Server::start()
    };
    let pid = server.pid();
    let wat = std::env::var("SERVICE_GUEST").is_ok_and(|g| g == "wat");
    let artifact = if wat {
        // `wharf push` takes binary Wasm; the interval is compiled in.
        let wasm = server._dir.path().join("heartbeat-wat.wasm");
        let bytes = wharf_bench::wat_heartbeat(beat_ms as u64);
        std::fs::write(&wasm, bytes).expect("write the module");
        server.push_file("heartbeat-wat", &wasm)
    } else {
        server.push("heartbeat")
    };
    // One beat a second (`BEAT_MS`), no beat count: runs until stopped.
    server.call(
        &server.agent,
        "POST",
        "/v1/taskdefs",
        Some(&json!({
            "family": "beat",
            "artifact": artifact,
            "args": [beat_ms.to_string()],
            "limits": { "memory": "8MiB", "fuel": 1_000_000_000u64, "timeout": "30m" },
        })),
    );
    // Load the artifact (fetch, compile, pre-link) before the baseline:
    // one short run of the same definition, two beats 1 ms apart (the WAT
    // guest takes no arguments: it beats once and times out).
    let (overrides, ends) = if wat {
        (json!({ "limits": { "timeout": "300ms" } }), "Timeout")
    } else {
        (json!({ "args": ["1", "2"] }), "Completed")
    };
    let tasks = server.call(
        &server.agent,
        "POST",
        "/v1/tasks",
        Some(&json!({ "task_definition": "beat", "overrides": overrides })),
    );
    let id = tasks[0]["id"].as_str().unwrap();
    let task = server.call(
        &server.agent,
        "GET",
        &format!("/v1/tasks/{id}?wait_stopped_ms=30000"),
        None,
    );
    assert_eq!(task["stop_code"], ends, "{task}");
    std::thread::sleep(Duration::from_secs(1));
    let rss_before = memory_kib(pid);
    let before = server.metrics();

    let created = Instant::now();
    server.call(
        &server.agent,
        "POST",
        "/v1/services",
        Some(&json!({ "name": "s", "task_definition": "beat", "desired_count": service_tasks })),
    );
    let mut polls = 0u64;
    let converge = loop {
        let s = server.call(&server.agent, "GET", "/v1/services/s", None);
        polls += 1;
        if s["running_count"].as_u64() == Some(service_tasks) {
            break created.elapsed();
        }
        assert!(
            created.elapsed() < SERVICE_LIMIT,
            "not converged after {SERVICE_LIMIT:?}: {s}"
        );
        std::thread::sleep(Duration::from_millis(5));
    };

    let cpu0 = cpu_seconds(&pid.to_string());
    let hold_metrics_before = server.metrics();
    let mut running = Vec::new();
    let mut pending = Vec::new();
    let mut rss = Vec::new();
    for _ in 0..HOLD_SECONDS {
        std::thread::sleep(Duration::from_secs(1));
        let s = server.call(&server.agent, "GET", "/v1/services/s", None);
        running.push(s["running_count"].as_u64().unwrap());
        pending.push(s["pending_count"].as_u64().unwrap());
        rss.push(memory_kib(pid));
    }
    let server_cpu = (cpu_seconds(&pid.to_string()) - cpu0) / HOLD_SECONDS as f64;
    let hold_stops = stops_delta(&hold_metrics_before, &server.metrics());
    let stable = running.iter().all(|&r| r == service_tasks) && hold_stops.is_empty();
    let median = |key: &str| -> u64 {
        let mut v: Vec<u64> = rss.iter().map(|r| r[key]).collect();
        v.sort_unstable();
        v[v.len() / 2]
    };
    let (steady_rss, steady_anon, steady_pss) = (median("VmRSS"), median("RssAnon"), median("Pss"));
    let per_task =
        |steady: u64, key: &str| (steady as f64 - rss_before[key] as f64) / service_tasks as f64;
    let per_task_kib = per_task(steady_rss, "VmRSS");
    let per_task_anon_kib = per_task(steady_anon, "RssAnon");
    let per_task_pss_kib = per_task(steady_pss, "Pss");

    // `SECOND_WAVE=1`: as many tasks again; the growth they bring is the
    // marginal cost of a task, which heap the server freed before the
    // baseline (compiling the module, the first run) does not flatter.
    let marginal = second_wave.then(|| {
        server.call(
            &server.agent,
            "PATCH",
            "/v1/services/s",
            Some(&json!({ "desired_count": most })),
        );
        let scaled = Instant::now();
        loop {
            let s = server.call(&server.agent, "GET", "/v1/services/s", None);
            if s["running_count"].as_u64() == Some(most) {
                break;
            }
            assert!(
                scaled.elapsed() < SERVICE_LIMIT,
                "second wave not converged after {SERVICE_LIMIT:?}: {s}"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        let mut wave: Vec<BTreeMap<&str, u64>> = (0..HOLD_SECONDS / 2)
            .map(|_| {
                std::thread::sleep(Duration::from_secs(1));
                memory_kib(pid)
            })
            .collect();
        let mut per = |key: &str, steady: u64| {
            wave.sort_unstable_by_key(|m| m[key]);
            (wave[wave.len() / 2][key] as f64 - steady as f64) / service_tasks as f64
        };
        (per("VmRSS", steady_rss), per("Pss", steady_pss))
    });

    // Deleting drains: the service is removed, and every one of its tasks
    // stops. Both moments are timed; live tasks are the server's
    // `wharf_tasks` gauge (this server runs nothing else).
    let live_tasks = |m: &str| -> u64 {
        ["PROVISIONING", "PENDING", "RUNNING"]
            .iter()
            .map(|s| counter(m, "wharf_tasks", &[&format!("status=\"{s}\"")]))
            .sum::<f64>() as u64
    };
    let deleted = Instant::now();
    server.call(&server.agent, "DELETE", "/v1/services/s", None);
    let mut removed: Option<(Duration, u64)> = None;
    let (drained, after) = loop {
        if removed.is_none() && server.get_opt("/v1/services/s").is_none() {
            let at = deleted.elapsed();
            removed = Some((at, live_tasks(&server.metrics())));
        }
        let m = server.metrics();
        if removed.is_some() && live_tasks(&m) == 0 {
            break (deleted.elapsed(), m);
        }
        assert!(
            deleted.elapsed() < SERVICE_LIMIT,
            "not drained after {SERVICE_LIMIT:?}: removed {removed:?}, {} live tasks",
            live_tasks(&m)
        );
        std::thread::sleep(Duration::from_millis(5));
    };
    let (removed_at, live_at_removal) = removed.expect("removed before drained");
    let codes = stops_delta(&before, &after);
    std::thread::sleep(Duration::from_secs(1));
    let rss_after = memory_kib(pid);
    let h_start = Hist::delta(&before, &after, "wharf_task_start_latency_seconds", &[]);

    summary.push(format!(
        "## 3. service of {service_tasks} {} tasks (a beat every {beat_ms} ms, 8 MiB, fresh server{})\n\
         - converged (running_count = {service_tasks}) in {:.1} ms ({polls} polls of GET /v1/services/s); task accepted → slot {}\n\
         - held {HOLD_SECONDS} s, sampled each second: running {}–{}, pending {}–{}, stops during the hold {hold_stops:?}: {}\n\
         - server CPU while holding: {:.3} cores\n\
         - server RSS: before {} KiB (anon {}), steady median {} KiB (anon {}), after drain {} KiB\n\
         - **memory per task: {per_task_kib:.1} KiB** (anon {per_task_anon_kib:.1} KiB, PSS {per_task_pss_kib:.1} KiB){}\n\
         - deleted: service removed (GET 404) after {:.1} ms with {live_at_removal} tasks still live; \
           every task stopped after {:.1} ms; stops {codes:?}",
        if wat { "WAT heartbeat" } else { "heartbeat" },
        if second_wave {
            format!("; then {most}: the drain below is theirs")
        } else {
            String::new()
        },
        converge.as_secs_f64() * 1e3,
        h_start.describe(),
        running.iter().min().unwrap(),
        running.iter().max().unwrap(),
        pending.iter().min().unwrap(),
        pending.iter().max().unwrap(),
        if stable { "stable" } else { "NOT stable" },
        server_cpu,
        rss_before["VmRSS"],
        rss_before["RssAnon"],
        steady_rss,
        steady_anon,
        rss_after["VmRSS"],
        marginal.map_or(String::new(), |(rss, pss)| format!(
            "; a second wave of {service_tasks}: **{rss:.1} KiB** a task (PSS **{pss:.1} KiB**)"
        )),
        removed_at.as_secs_f64() * 1e3,
        drained.as_secs_f64() * 1e3,
    ));
    json!({
        "tasks": service_tasks,
        "converge_ms": round1(converge.as_secs_f64() * 1e3),
        "task_start_latency": h_start.json(),
        "hold_seconds": HOLD_SECONDS,
        "running_samples": running,
        "pending_samples": pending,
        "stops_during_hold": hold_stops,
        "stable": stable,
        "server_cpu_cores_holding": (server_cpu * 1000.0).round() / 1000.0,
        "rss_kib": {
            "before": rss_before,
            "steady_median_vmrss": steady_rss,
            "steady_median_anon": steady_anon,
            "steady_median_pss": steady_pss,
            "after_drain": rss_after,
        },
        "memory_per_task_kib": round1(per_task_kib),
        "memory_per_task_anon_kib": round1(per_task_anon_kib),
        "memory_per_task_pss_kib": round1(per_task_pss_kib),
        "second_wave_per_task_kib": marginal.map(|(rss, pss)| json!({ "vmrss": round1(rss), "pss": round1(pss) })),
        "beat_ms": beat_ms,
        "removed_ms": round1(removed_at.as_secs_f64() * 1e3),
        "live_tasks_at_removal": live_at_removal,
        "drained_ms": round1(drained.as_secs_f64() * 1e3),
        "stop_codes": codes,
    })
}

// ----- main -----

fn machine() -> Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name")?.split(':').nth(1))
        .unwrap_or("?")
        .trim()
        .to_owned();
    json!({
        "cpus": std::thread::available_parallelism().map_or(0, |n| n.get()),
        "cpu_model": model,
        "loadavg": std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim(),
    })
}

fn main() {
    let parts = std::env::var("PARTS").unwrap_or_else(|_| "latency,throughput,service".into());
    let want = |p: &str| parts.split(',').any(|x| x == p);
    let mut results = serde_json::Map::new();
    results.insert("machine_at_start".into(), machine());
    results.insert("wharf_bin".into(), json!(wharf_bin().display().to_string()));
    let mut summary = Vec::new();

    if want("latency") || want("throughput") || want("wrk") {
        let server = Server::start();
        let artifact = server.push("hello");
        server.call(
            &server.agent,
            "POST",
            "/v1/taskdefs",
            Some(&json!({ "family": "hello", "artifact": artifact })),
        );
        if want("latency") {
            results.insert("latency".into(), latency(&server, &mut summary));
            eprintln!("done: latency");
        }
        if want("throughput") {
            let runs: Vec<Value> = [1, 10]
                .into_iter()
                .map(|n| {
                    let r = throughput(&server, n, &mut summary);
                    eprintln!("done: throughput count={n}");
                    r
                })
                .collect();
            results.insert("throughput".into(), json!(runs));
        }
        if want("wrk") {
            results.insert("wrk".into(), wrk_runs(&server, &mut summary));
            eprintln!("done: wrk");
        }
    }
    if want("service") {
        results.insert("service".into(), service(&mut summary));
        eprintln!("done: service");
    }
    results.insert("machine_at_end".into(), machine());

    println!("{}", summary.join("\n\n"));
    let dir = workspace().join("target/bench-results");
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("api_load.json");
    std::fs::write(
        &file,
        serde_json::to_string_pretty(&Value::Object(results)).unwrap(),
    )
    .unwrap();
    println!("\nresults: {}", file.display());
}
