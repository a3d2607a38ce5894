//! HTTP serving, side by side: `wharf serve` and `wasmtime serve` on the
//! same `http_hello` component, each loaded with `wrk -t2 -c32 --latency`
//! for `DURATION_SECS` (default 20) after a 3 s warm-up. Client and server
//! share the machine's cores, as the issue asks to report.
//!
//! `cargo build --release -p wharf -p wharf-bench --bins && target/release/serve_load`
//! Env: `WHARF_BIN` (default target/release/wharf), `WASMTIME` (default
//! `wasmtime` on PATH; skipped with a note when absent), `WRK` (default
//! `wrk`), `RUNS` (default 3; the table shows the median and range).
//! Results and method: `docs/PERFORMANCE.md`, "HTTP serving".

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
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
        .args(["serve", "--addr", &addr])
        .arg(component)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start wasmtime serve");
    wait_until_up(&addr);
    (Running(child), addr)
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
    let wasmtime: Option<PathBuf> = std::env::var_os("WASMTIME").map(PathBuf::from).or_else(|| {
        Command::new("wasmtime")
            .arg("--version")
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|_| PathBuf::from("wasmtime"))
    });
    let data = tempfile::tempdir().unwrap();
    let mut rows: Vec<(&str, Vec<Sample>)> = vec![("wharf serve", Vec::new())];
    if wasmtime.is_some() {
        rows.push(("wasmtime serve", Vec::new()));
    } else {
        eprintln!("note: wasmtime not found (set WASMTIME); its row is skipped");
    }
    for _ in 0..runs {
        for (name, results) in rows.iter_mut() {
            let (_server, addr) = if *name == "wharf serve" {
                start_wharf(&component, data.path())
            } else {
                start_wasmtime(wasmtime.as_deref().unwrap(), &component)
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
    if rows.len() == 2 {
        let med = |v: &[Sample]| {
            let mut r: Vec<f64> = v.iter().map(|x| x.0).collect();
            r.sort_by(|a, b| a.total_cmp(b));
            r[r.len() / 2]
        };
        println!(
            "\nwharf serve / wasmtime serve requests/s (medians): {:.2}",
            med(&rows[0].1) / med(&rows[1].1)
        );
    }
}
