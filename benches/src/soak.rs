//! The soak: one real `wharf server` under everything at once for a while
//! — pushes, task runs, service scale changes, log follows, and hostile
//! guests (endless loops, memory bombs, output floods, endless recursion)
//! — sampled over time for what could grow without bound: the server's
//! RSS, its open file descriptors, the state store's size on disk, and the
//! API's p99 latency. The `soak` binary runs it for minutes and prints the
//! series for `docs/PERFORMANCE.md`; the e2e suite runs a 60-second
//! version in CI and checks the bounds.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use wharf_testkit::{Target, wasm};

/// One sample of the server's footprint.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Sample {
    /// Seconds since the soak began.
    pub at_s: f64,
    /// Resident set size, KiB.
    pub rss_kib: u64,
    /// Open file descriptors.
    pub fds: u64,
    /// `state.db` plus its WAL, bytes.
    pub state_bytes: u64,
    /// The registry's files, bytes.
    pub registry_bytes: u64,
    /// p99 of the probes' API calls in the window, milliseconds.
    pub api_p99_ms: f64,
    /// The slowest probe in the window, milliseconds.
    pub api_max_ms: f64,
    /// Tasks submitted so far.
    pub tasks_submitted: u64,
    /// API calls that failed (not a 2xx/expected answer) so far.
    pub errors: u64,
}

/// A server for the soak, killed on drop.
pub struct SoakServer {
    child: Child,
    base: String,
    token: String,
    bin: PathBuf,
    data: PathBuf,
}

impl Drop for SoakServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl SoakServer {
    /// Starts `bin server` on `data` with extra `flags`.
    pub fn start(bin: &Path, data: &Path, flags: &[&str]) -> SoakServer {
        let (child, base, token) = crate::spawn_server(bin, data, flags);
        SoakServer {
            child,
            base,
            token,
            bin: bin.to_owned(),
            data: data.to_owned(),
        }
    }

    fn agent() -> ureq::Agent {
        ureq::AgentBuilder::new()
            .timeout(Duration::from_secs(60))
            .build()
    }

    fn call(
        &self,
        agent: &ureq::Agent,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, String> {
        let req = agent
            .request(method, &format!("{}{path}", self.base))
            .set("Authorization", &format!("Bearer {}", self.token));
        let r = match body {
            Some(b) => req.send_json(b),
            None => req.call(),
        };
        match r {
            Ok(r) => Ok(r.into_json().unwrap_or(Value::Null)),
            Err(ureq::Error::Status(code, r)) => Err(format!(
                "{method} {path}: {code} {}",
                r.into_string().unwrap_or_default()
            )),
            Err(e) => Err(format!("{method} {path}: {e}")),
        }
    }

    fn push(&self, sample: &str, repo_tag: &str) -> Result<(), String> {
        let out = Command::new(&self.bin)
            .arg("push")
            .arg(wasm(sample, Target::P1))
            .arg(format!(
                "{}/{repo_tag}",
                self.base.trim_start_matches("http://")
            ))
            .env("WHARF_TOKEN", &self.token)
            .env("WHARF_SERVER", &self.base)
            .output()
            .map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    /// The server's footprint now.
    fn footprint(&self) -> (u64, u64, u64, u64) {
        let pid = self.child.id();
        let rss = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("VmRSS:"))
                    .and_then(|l| l.split_whitespace().nth(1))
                    .and_then(|n| n.parse().ok())
            })
            .unwrap_or(0);
        let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count() as u64);
        let size = |p: &str| std::fs::metadata(self.data.join(p)).map_or(0, |m| m.len());
        let state = size("state.db") + size("state.db-wal");
        (rss, fds, state, dir_size(&self.data.join("registry")))
    }
}

fn dir_size(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_size(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

/// What the soak drives and how long.
#[derive(Debug, Clone)]
pub struct SoakConfig {
    /// How long the load runs.
    pub duration: Duration,
    /// How often the footprint is sampled.
    pub sample_every: Duration,
}

/// The task definitions the soak runs: (family, sample, args, limits).
const FAMILIES: &[(&str, &str, &[&str], &str)] = &[
    (
        "hello",
        "hello",
        &[],
        r#"{"memory": "16MiB", "timeout": "10s"}"#,
    ),
    (
        "loop",
        "spin",
        &[],
        r#"{"memory": "16MiB", "timeout": "500ms"}"#,
    ),
    (
        "bomb",
        "memhog",
        &[],
        r#"{"memory": "32MiB", "timeout": "10s"}"#,
    ),
    (
        "flood",
        "flood",
        &["4"],
        r#"{"memory": "16MiB", "timeout": "10s"}"#,
    ),
    (
        "newlines",
        "flood",
        &["2", "empty"],
        r#"{"memory": "16MiB", "timeout": "10s"}"#,
    ),
    (
        "recurse",
        "recurse",
        &[],
        r#"{"memory": "16MiB", "timeout": "10s"}"#,
    ),
    ("beat", "heartbeat", &["50"], r#"{"memory": "16MiB"}"#),
];

/// Runs the soak against `server` and returns the samples, oldest first.
pub fn run(server: &SoakServer, config: &SoakConfig) -> Vec<Sample> {
    let agent = SoakServer::agent();
    for (family, sample, args, limits) in FAMILIES {
        server
            .push(sample, &format!("soak/{sample}:v1"))
            .expect("push the soak's samples");
        let limits: Value = serde_json::from_str(limits).unwrap();
        server
            .call(
                &agent,
                "POST",
                "/v1/taskdefs",
                Some(json!({"family": family, "artifact": format!("soak/{sample}:v1"), "args": args, "limits": limits})),
            )
            .expect("register the soak's task definitions");
    }
    server
        .call(
            &agent,
            "POST",
            "/v1/services",
            Some(json!({"name": "beat", "task_definition": "beat", "desired_count": 2})),
        )
        .expect("create the soak's service");

    let stop = Arc::new(AtomicBool::new(false));
    let submitted = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let latencies = Arc::new(Mutex::new(Vec::<f64>::new()));
    let started = Instant::now();
    std::thread::scope(|scope| {
        let fail = |e: String| {
            errors.fetch_add(1, Ordering::Relaxed);
            eprintln!("soak: {e}");
        };
        // Task runs: the well-behaved and the hostile, in turn.
        for worker in 0..3 {
            let (stop, submitted) = (stop.clone(), submitted.clone());
            scope.spawn(move || {
                let agent = SoakServer::agent();
                let runnable: Vec<&str> = FAMILIES
                    .iter()
                    .map(|f| f.0)
                    .filter(|f| *f != "beat")
                    .collect();
                let mut i = worker;
                while !stop.load(Ordering::Relaxed) {
                    let family = runnable[i % runnable.len()];
                    i += 1;
                    match server.call(
                        &agent,
                        "POST",
                        "/v1/tasks",
                        Some(json!({"task_definition": family, "count": 3})),
                    ) {
                        Ok(tasks) => {
                            submitted.fetch_add(3, Ordering::Relaxed);
                            for t in tasks.as_array().into_iter().flatten() {
                                let id = t["id"].as_str().unwrap_or_default();
                                if let Err(e) = server.call(
                                    &agent,
                                    "GET",
                                    &format!("/v1/tasks/{id}?wait_stopped_ms=30000"),
                                    None,
                                ) {
                                    fail(e);
                                }
                            }
                        }
                        Err(e) => fail(e),
                    }
                }
            });
        }
        // Pushes to rotating tags.
        {
            let stop = stop.clone();
            scope.spawn(move || {
                let mut i = 0;
                while !stop.load(Ordering::Relaxed) {
                    if let Err(e) = server.push(
                        if i % 2 == 0 { "hello" } else { "cpu" },
                        &format!("soak/pushed:t{}", i % 4),
                    ) {
                        fail(e);
                    }
                    i += 1;
                    std::thread::sleep(Duration::from_millis(300));
                }
            });
        }
        // Scale changes.
        {
            let stop = stop.clone();
            scope.spawn(move || {
                let agent = SoakServer::agent();
                let mut i = 0u32;
                while !stop.load(Ordering::Relaxed) {
                    let desired = 1 + i % 4;
                    if let Err(e) = server.call(
                        &agent,
                        "PATCH",
                        "/v1/services/beat",
                        Some(json!({"desired_count": desired})),
                    ) {
                        fail(e);
                    }
                    i += 1;
                    std::thread::sleep(Duration::from_secs(1));
                }
            });
        }
        // Log follows of the service's tasks, cut off and resumed.
        {
            let stop = stop.clone();
            scope.spawn(move || {
                let agent = ureq::AgentBuilder::new()
                    .timeout_read(Duration::from_millis(700))
                    .build();
                while !stop.load(Ordering::Relaxed) {
                    let tasks = server
                        .call(&agent, "GET", "/v1/tasks?service=beat&status=RUNNING", None)
                        .unwrap_or(Value::Null);
                    if let Some(id) = tasks
                        .as_array()
                        .and_then(|t| t.first())
                        .and_then(|t| t["id"].as_str())
                    {
                        let r = agent
                            .get(&format!("{}/v1/tasks/{id}/logs?follow=true", server.base))
                            .set("Authorization", &format!("Bearer {}", server.token))
                            .call();
                        if let Ok(r) = r {
                            // Follow for a while, then hang up and start over.
                            let mut reader = r.into_reader();
                            let mut buf = [0u8; 4096];
                            let until = Instant::now() + Duration::from_secs(2);
                            while Instant::now() < until && !stop.load(Ordering::Relaxed) {
                                match std::io::Read::read(&mut reader, &mut buf) {
                                    Ok(0) | Err(_) => break,
                                    Ok(_) => {}
                                }
                            }
                        }
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            });
        }
        // Probes: the API's latency as a client sees it.
        {
            let (stop, latencies) = (stop.clone(), latencies.clone());
            scope.spawn(move || {
                let agent = SoakServer::agent();
                let mut i = 0;
                while !stop.load(Ordering::Relaxed) {
                    let path = if i % 2 == 0 {
                        "/healthz"
                    } else {
                        "/v1/tasks?limit=20"
                    };
                    i += 1;
                    let t = Instant::now();
                    let ok = agent
                        .get(&format!("{}{path}", server.base))
                        .set("Authorization", &format!("Bearer {}", server.token))
                        .call()
                        .map(|r| r.into_string().is_ok())
                        .unwrap_or(false);
                    if !ok {
                        fail(format!("probe {path} failed"));
                    }
                    latencies
                        .lock()
                        .unwrap()
                        .push(t.elapsed().as_secs_f64() * 1e3);
                    std::thread::sleep(Duration::from_millis(20));
                }
            });
        }
        // Samples until the end.
        let mut samples = Vec::new();
        while started.elapsed() < config.duration {
            std::thread::sleep(config.sample_every);
            let mut window: Vec<f64> = std::mem::take(&mut *latencies.lock().unwrap());
            window.sort_by(|a, b| a.total_cmp(b));
            let at = |p: f64| {
                if window.is_empty() {
                    0.0
                } else {
                    window[((p / 100.0) * (window.len() - 1) as f64).round() as usize]
                }
            };
            let (rss_kib, fds, state_bytes, registry_bytes) = server.footprint();
            samples.push(Sample {
                at_s: started.elapsed().as_secs_f64(),
                rss_kib,
                fds,
                state_bytes,
                registry_bytes,
                api_p99_ms: at(99.0),
                api_max_ms: window.last().copied().unwrap_or(0.0),
                tasks_submitted: submitted.load(Ordering::Relaxed),
                errors: errors.load(Ordering::Relaxed),
            });
        }
        stop.store(true, Ordering::Relaxed);
        samples
    })
}
