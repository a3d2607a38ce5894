//! HTTP serving, side by side: `wharf serve`, `wasmtime serve` and a
//! `wharf server`'s ingress in front of a service of two tasks, on the
//! same `http_hello` component, each loaded with `wrk -t2 -c32 --latency`
//! for `DURATION_SECS` (default 20) after a 3 s warm-up. Client and server
//! share the machine's cores, as the issue asks to report. Then, on the
//! ingress: the latency a request to a service scaled to zero adds over a
//! warm one (`COLD_SAMPLES`, default 20), and how long the autoscaler takes
//! to follow a load step.
//!
//! `cargo build --release -p wharf -p wharf-bench --bins && target/release/serve_load`
//! Env: `WHARF_BIN` (default target/release/wharf), `WASMTIME` (default
//! `wasmtime` on PATH; skipped with a note when absent), `WRK` (default
//! `wrk`), `RUNS` (default 3; the table shows the median and range).
//! Results and method: `docs/PERFORMANCE.md`, "HTTP serving".

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use wharf_bench::wharf_bin;
use wharf_testkit::{Target, wasm};

/// Requests/s, p50 ms and p99 ms of one wrk run.
type Sample = (f64, f64, f64);

/// A server process, killed on drop.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn wait_until_up(addr: &str) {
    for _ in 0..500 {
        if ureq::get(&format!("http://{addr}/up")).call().is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("nothing answered on {addr}");
}

fn start_wharf(component: &Path, data: &Path) -> (Running, String) {
    let mut child = Command::new(wharf_bin())
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--max-concurrency",
            "256",
            "--data-dir",
        ])
        .arg(data)
        .arg(component)
        .stderr(Stdio::piped())
        .spawn()
        .expect("start wharf serve (cargo build --release -p wharf)");
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let addr = loop {
        let line = lines
            .next()
            .expect("wharf serve printed its address")
            .unwrap();
        if let Some(rest) = line.strip_prefix("wharf: serving http://") {
            break rest.trim().to_owned();
        }
    };
    std::thread::spawn(move || for _ in lines {});
    wait_until_up(&addr);
    (Running(child), addr)
}

fn start_wasmtime(wasmtime: &Path, component: &Path) -> (Running, String) {
    let addr = format!("127.0.0.1:{}", free_port());
    let child = Command::new(wasmtime)
        // `-Scli`: the component reads its environment (wasi:cli), which
        // `wasmtime serve` links only when asked; Wharf links it always.
        .args(["serve", "-Scli", "--addr", &addr])
        .arg(component)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start wasmtime serve");
    wait_until_up(&addr);
    (Running(child), addr)
}

/// A `wharf server` with its ingress on a free port, `http_hello` pushed
/// and registered as `kind = "http"`, and a service `hello` of `tasks`
/// tasks routed at `/`. Returns the process, the API base, the token and
/// the ingress address.
fn start_ingress(component: &Path, data: &Path, tasks: u32) -> (Running, String, String, String) {
    deploy(
        component,
        data,
        serde_json::json!({"max_concurrency": 256}),
        tasks,
    )
}

/// A `wharf server` with its ingress on a free port, `component` pushed
/// and registered as `kind = "http"` with `http` settings, and a service
/// `hello` of `tasks` tasks routed at `/`.
fn deploy(
    component: &Path,
    data: &Path,
    http: serde_json::Value,
    tasks: u32,
) -> (Running, String, String, String) {
    let ingress = format!("127.0.0.1:{}", free_port());
    let (child, base, token) =
        wharf_bench::spawn_server(&wharf_bin(), data, &["--ingress", &ingress]);
    let running = Running(child);
    let host = base.trim_start_matches("http://").to_owned();
    let pushed = Command::new(wharf_bin())
        .arg("push")
        .arg(component)
        .arg(format!("{host}/bench/hello:v1"))
        .env("WHARF_TOKEN", &token)
        .env("WHARF_SERVER", &base)
        .output()
        .expect("wharf push");
    assert!(pushed.status.success(), "{pushed:?}");
    let api = |method: &str, path: &str, body: serde_json::Value| {
        ureq::request(method, &format!("{base}{path}"))
            .set("Authorization", &format!("Bearer {token}"))
            .send_json(body)
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
    };
    api(
        "POST",
        "/v1/taskdefs",
        serde_json::json!({"family": "hello", "artifact": "bench/hello:v1", "kind": "http",
                           "http": http}),
    );
    api(
        "POST",
        "/v1/services",
        serde_json::json!({"name": "hello", "task_definition": "hello",
                           "desired_count": tasks, "routes": ["/"]}),
    );
    wait_running(&base, &token, tasks);
    (running, base, token, ingress)
}

/// Service `hello` as the API describes it.
fn hello_service(base: &str, token: &str) -> serde_json::Value {
    ureq::get(&format!("{base}/v1/services/hello"))
        .set("Authorization", &format!("Bearer {token}"))
        .call()
        .unwrap()
        .into_json()
        .unwrap()
}

/// Waits until service `hello` runs `n` tasks.
fn wait_running(base: &str, token: &str, n: u32) {
    for _ in 0..3000 {
        let svc = hello_service(base, token);
        if svc["running_count"] == n && svc["pending_count"] == 0 {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("service hello did not reach {n} running tasks");
}

/// The latency a request to a service at zero adds over a warm one, in
/// ms: `samples` cycles of waiting for zero, one timed request (held
/// while a task starts), one timed warm request.
fn cold_starts(component: &Path, samples: usize) -> (Vec<f64>, Vec<f64>) {
    let data = tempfile::tempdir().unwrap();
    let (_server, base, token, ingress) = start_ingress(component, data.path(), 1);
    ureq::request("PATCH", &format!("{base}/v1/services/hello"))
        .set("Authorization", &format!("Bearer {token}"))
        .send_json(
            serde_json::json!({"autoscaling": {"min": 0, "max": 1, "target_inflight": 8.0,
            "scale_in_cooldown_ms": 0, "idle_to_zero_ms": 1}}),
        )
        .unwrap();
    let agent = ureq::AgentBuilder::new().build();
    let url = format!("http://{ingress}/hello");
    let (mut cold, mut warm) = (Vec::new(), Vec::new());
    for _ in 0..samples {
        wait_running(&base, &token, 0);
        let t = std::time::Instant::now();
        let r = agent.get(&url).call().expect("the held request is served");
        assert_eq!(r.status(), 200);
        let _ = r.into_string();
        cold.push(t.elapsed().as_secs_f64() * 1e3);
        let t = std::time::Instant::now();
        let _ = agent.get(&url).call().unwrap().into_string();
        warm.push(t.elapsed().as_secs_f64() * 1e3);
    }
    (cold, warm)
}

/// A load step on a service of `http_slow` (`/200`: 200 ms blocked in a
/// clock) autoscaled at 4 in flight per task from 1 to 8 tasks: 32
/// connections of wrk; returns the seconds until the desired count and
/// then the running count reached 8.
fn autoscale_step() -> (f64, f64) {
    let data = tempfile::tempdir().unwrap();
    let (_running, base, token, ingress) = deploy(
        &wasm("http_slow", Target::P2),
        data.path(),
        serde_json::json!({}),
        1,
    );
    ureq::request("PATCH", &format!("{base}/v1/services/hello"))
        .set("Authorization", &format!("Bearer {token}"))
        .send_json(serde_json::json!({"autoscaling": {"min": 1, "max": 8, "target_inflight": 4.0}}))
        .expect("autoscaling");
    let wrk = std::env::var("WRK").unwrap_or_else(|_| "wrk".into());
    let start = std::time::Instant::now();
    let mut load = Command::new(wrk)
        .args(["-t2", "-c32", "-d20s"])
        .arg(format!("http://{ingress}/200"))
        .stdout(Stdio::null())
        .spawn()
        .expect("wrk");
    let (mut desired_at, mut running_at) = (None, None);
    while running_at.is_none() && start.elapsed() < Duration::from_secs(20) {
        let svc = hello_service(&base, &token);
        if desired_at.is_none() && svc["desired_count"] == 8 {
            desired_at = Some(start.elapsed().as_secs_f64());
        }
        if svc["running_count"] == 8 {
            running_at = Some(start.elapsed().as_secs_f64());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = load.kill();
    let _ = load.wait();
    (
        desired_at.unwrap_or(f64::NAN),
        running_at.unwrap_or(f64::NAN),
    )
}

fn pct(v: &[f64], p: f64) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() as f64 * p).ceil() as usize).clamp(1, v.len()) - 1]
}

/// Requests/s and the p50/p99 latency (ms) `wrk --latency` reported.
fn wrk(addr: &str, seconds: u64) -> Sample {
    let wrk = std::env::var("WRK").unwrap_or_else(|_| "wrk".into());
    let out = Command::new(wrk)
        .args(["-t2", "-c32", "--latency", &format!("-d{seconds}s")])
        .arg(format!("http://{addr}/hello"))
        .output()
        .expect("run wrk (apt-get install wrk)");
    let text = String::from_utf8_lossy(&out.stdout);
    let rps = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no Requests/sec in {text}"));
    let pct = |p: &str| {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(p))
            .map(|v| to_ms(v.trim()))
            .unwrap_or(f64::NAN)
    };
    if text.contains("Non-2xx") {
        panic!("errors under load: {text}");
    }
    (rps, pct("50%"), pct("99%"))
}

fn to_ms(v: &str) -> f64 {
    let (n, unit) = v.split_at(v.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(v.len()));
    let n: f64 = n.parse().unwrap_or(f64::NAN);
    match unit {
        "us" => n / 1e3,
        "ms" => n,
        "s" => n * 1e3,
        _ => f64::NAN,
    }
}

fn median_range(mut v: Vec<f64>) -> String {
    v.sort_by(|a, b| a.total_cmp(b));
    format!("{:.1} ({:.1}–{:.1})", v[v.len() / 2], v[0], v[v.len() - 1])
}

fn main() {
    let seconds: u64 = std::env::var("DURATION_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    let runs: usize = std::env::var("RUNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let component = wasm("http_hello", Target::P2);
    let wasmtime = wharf_bench::wasmtime_bin();
    let data = tempfile::tempdir().unwrap();
    const INGRESS: &str = "wharf server ingress, 2 tasks";
    let mut rows: Vec<(&str, Vec<Sample>)> = vec![("wharf serve", Vec::new())];
    if wasmtime.is_some() {
        rows.push(("wasmtime serve", Vec::new()));
    } else {
        eprintln!("note: wasmtime not found (set WASMTIME); its row is skipped");
    }
    rows.push((INGRESS, Vec::new()));
    // `ONLY=wharf` keeps the rows whose name contains it (for quick looks;
    // the published table runs them all).
    if let Ok(only) = std::env::var("ONLY") {
        rows.retain(|(name, _)| name.contains(only.as_str()));
    }
    for _ in 0..runs {
        for (name, results) in rows.iter_mut() {
            let server_data = tempfile::tempdir().unwrap();
            let (_server, addr) = match *name {
                "wharf serve" => start_wharf(&component, data.path()),
                INGRESS => {
                    let (s, _, _, addr) = start_ingress(&component, server_data.path(), 2);
                    (s, addr)
                }
                _ => start_wasmtime(wasmtime.as_deref().unwrap(), &component),
            };
            wrk(&addr, 3);
            results.push(wrk(&addr, seconds));
        }
    }
    println!(
        "## HTTP serving: http_hello, wrk -t2 -c32, {seconds} s × {runs} runs (median, range)\n"
    );
    println!("| server | requests/s | p50 ms | p99 ms |");
    println!("|---|---|---|---|");
    for (name, results) in &rows {
        println!(
            "| {name} | {} | {} | {} |",
            median_range(results.iter().map(|r| r.0).collect()),
            median_range(results.iter().map(|r| r.1).collect()),
            median_range(results.iter().map(|r| r.2).collect()),
        );
    }
    let med = |v: &[Sample]| {
        let mut r: Vec<f64> = v.iter().map(|x| x.0).collect();
        r.sort_by(|a, b| a.total_cmp(b));
        r[r.len() / 2]
    };
    if let Some((_, peer)) = rows.iter().find(|(n, _)| *n == "wasmtime serve") {
        for (name, results) in rows.iter().filter(|(n, _)| *n != "wasmtime serve") {
            println!(
                "\n{name} / wasmtime serve requests/s (medians): {:.2}",
                med(results) / med(peer)
            );
        }
    }
    let samples: usize = std::env::var("COLD_SAMPLES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    if samples == 0 {
        return;
    }
    let (cold, warm) = cold_starts(&component, samples);
    let added: Vec<f64> = cold.iter().zip(&warm).map(|(c, w)| c - w).collect();
    println!("\n## Scale from zero: {samples} requests to a service at zero (ms)\n");
    println!("| | p50 | p99 | max |");
    println!("|---|---|---|---|");
    for (name, v) in [
        ("first request", &cold),
        ("warm request after it", &warm),
        ("added by the cold start", &added),
    ] {
        println!(
            "| {name} | {:.2} | {:.2} | {:.2} |",
            pct(v, 0.5),
            pct(v, 0.99),
            pct(v, 1.0)
        );
    }
    let (desired, running) = autoscale_step();
    println!(
        "\n## Autoscaling reaction: a step to 32 connections of 200 ms requests, target 4 in flight per task, 1 → 8 tasks\n"
    );
    println!("| desired count at 8 | running count at 8 |");
    println!("|---|---|");
    println!("| {desired:.2} s | {running:.2} s |");
}
