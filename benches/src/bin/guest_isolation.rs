//! Guest isolation: how the control plane answers while guests keep every
//! core busy, and how closely their timeouts hold.
//!
//! Against a real `wharf server` on loopback, for 0, `cores` and
//! `2 × cores` busy guests (each `memory.fill`s 64 MiB in a loop: one long
//! instruction, the worst case for a scheduler that waits for guests to
//! yield), a client times `GET /healthz` and `GET /v1/tasks/{id}` every
//! 10 ms for `HOLD`; then every guest's `Timeout` is compared with its
//! limit. Reports p50/p99/max per call and the timeout overshoot.
//!
//! `cargo build --release -p wharf && cargo run --release -p wharf-bench --bin guest_isolation`
//! Env: `WHARF_BIN` (default target/release/wharf), `HOLD_SECS` (default 10).
//! Results and method: `docs/PERFORMANCE.md`, "Guest isolation".

use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use wharf_bench::{spawn_wharf_server, wharf_bin};

struct Server {
    base: String,
    auth: String,
    agent: ureq::Agent,
    child: std::process::Child,
    _dir: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    fn call(&self, method: &str, path: &str, body: Option<&Value>) -> Value {
        let req = self
            .agent
            .request(method, &format!("{}{path}", self.base))
            .set("Authorization", &self.auth);
        let r = match body {
            Some(b) => req.send_json(b),
            None => req.call(),
        };
        match r {
            Ok(r) => r.into_json().unwrap_or(Value::Null),
            Err(e) => panic!("{method} {path}: {e}"),
        }
    }

    fn timed(&self, path: &str) -> Duration {
        let started = Instant::now();
        let r = self
            .agent
            .get(&format!("{}{path}", self.base))
            .set("Authorization", &self.auth)
            .call()
            .expect("answered");
        let _ = r.into_string();
        started.elapsed()
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn main() {
    let hold = Duration::from_secs(
        std::env::var("HOLD_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(10),
    );
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let dir = tempfile::tempdir().unwrap();
    let (child, base, token) = spawn_wharf_server(dir.path());
    let server = Server {
        base,
        auth: format!("Bearer {token}"),
        agent: ureq::AgentBuilder::new()
            .timeout(Duration::from_secs(120))
            .build(),
        child,
        _dir: dir,
    };
    let file = server._dir.path().join("fill.wasm");
    std::fs::write(&file, wat::parse_file(wharf_testkit::wat("fill")).unwrap()).unwrap();
    let out = Command::new(wharf_bin())
        .arg("push")
        .arg(&file)
        .arg(format!(
            "{}/bench/fill:v1",
            server.base.trim_start_matches("http://")
        ))
        .env("WHARF_TOKEN", &token)
        .env("WHARF_SERVER", &server.base)
        .output()
        .expect("wharf push");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let timeout = hold + Duration::from_secs(2);
    server.call(
        "POST",
        "/v1/taskdefs",
        Some(&json!({
            "family": "fill",
            "artifact": "bench/fill:v1",
            "limits": {"memory": "80MiB", "timeout": format!("{}ms", timeout.as_millis())}
        })),
    );
    println!(
        "## Guest isolation ({cores} cores, {}s per row, timeout {}s)\n",
        hold.as_secs(),
        timeout.as_secs()
    );
    println!(
        "| busy guests | /healthz p50 / p99 / max ms | GET task p50 / p99 / max ms | timeout overshoot median / max |"
    );
    println!("|---|---|---|---|");
    let mut results = Vec::new();
    for guests in [0, cores, 2 * cores] {
        let ids: Vec<String> = if guests == 0 {
            Vec::new()
        } else {
            let r = server.call(
                "POST",
                "/v1/tasks",
                Some(&json!({"task_definition": "fill", "count": guests})),
            );
            r.as_array()
                .unwrap()
                .iter()
                .map(|t| t["id"].as_str().unwrap().to_owned())
                .collect()
        };
        // Until every guest runs.
        let deadline = Instant::now() + Duration::from_secs(30);
        while ids
            .iter()
            .any(|id| server.call("GET", &format!("/v1/tasks/{id}"), None)["status"] != "RUNNING")
        {
            assert!(Instant::now() < deadline, "guests never ran");
            std::thread::sleep(Duration::from_millis(10));
        }
        let probe = ids.first().cloned().unwrap_or_default();
        let (mut health, mut get) = (Vec::new(), Vec::new());
        let until = Instant::now() + hold;
        while Instant::now() < until {
            health.push(ms(server.timed("/healthz")));
            if !probe.is_empty() {
                get.push(ms(server.timed(&format!("/v1/tasks/{probe}"))));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let mut overshoot = Vec::new();
        for id in &ids {
            let t = server.call(
                "GET",
                &format!("/v1/tasks/{id}?wait_stopped_ms=60000"),
                None,
            );
            assert_eq!(t["stop_code"], "Timeout", "{t}");
            let ran = t["duration_ms"].as_f64().unwrap();
            overshoot.push((ran / ms(timeout) - 1.0) * 100.0);
        }
        let stats = |v: &mut Vec<f64>| -> (f64, f64, f64) {
            if v.is_empty() {
                return (f64::NAN, f64::NAN, f64::NAN);
            }
            v.sort_by(|a, b| a.total_cmp(b));
            let at = |p: f64| v[((p / 100.0) * (v.len() - 1) as f64).round() as usize];
            (at(50.0), at(99.0), v[v.len() - 1])
        };
        let h = stats(&mut health);
        let g = stats(&mut get);
        let o = stats(&mut overshoot);
        let get_cell = if get.is_empty() {
            "—".to_owned()
        } else {
            format!("{:.2} / {:.2} / {:.2}", g.0, g.1, g.2)
        };
        let over_cell = if overshoot.is_empty() {
            "—".to_owned()
        } else {
            format!("{:+.2} % / {:+.2} %", o.0, o.2)
        };
        println!(
            "| {guests} | {:.2} / {:.2} / {:.2} | {get_cell} | {over_cell} |",
            h.0, h.1, h.2
        );
        results.push(json!({
            "guests": guests, "healthz_ms": [h.0, h.1, h.2],
            "get_task_ms": [g.0, g.1, g.2], "timeout_overshoot_pct": [o.0, o.2],
            "samples": health.len(),
        }));
    }
    let out = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench-results");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(
        out.join("guest_isolation.json"),
        serde_json::to_string_pretty(&json!({"cores": cores, "rows": results})).unwrap(),
    )
    .unwrap();
}
