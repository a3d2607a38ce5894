//! Load harness: start latency percentiles, executor throughput and fuel
//! overhead, printed as a Markdown table for `docs/PERFORMANCE.md`.
//!
//! `cargo run --release -p wharf-bench --bin harness [-- --json]`

use std::time::{Duration, Instant};

use wharf_bench::{artifact, executor_throughput, percentile, run_once, runtime};
use wharf_runtime::Executor;
use wharf_testkit::Target;

/// Tasks per latency measurement: enough for a stable p99.
const LATENCY_TASKS: usize = 20_000;
/// Tasks per throughput measurement, repeated `ROUNDS` times (median kept).
const THROUGHPUT_TASKS: usize = 50_000;
const ROUNDS: usize = 5;

fn main() {
    let json = std::env::args().any(|a| a == "--json");
    let current = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut rows: Vec<(String, String)> = Vec::new();

    for (pooling, alloc) in [(true, "pooling"), (false, "on-demand")] {
        let rt = runtime(pooling, true);
        for (target, name) in [(Target::P1, "p1 module"), (Target::P2, "p2 command")] {
            let hello = artifact(&rt, "hello", target);
            let mut samples = Vec::with_capacity(LATENCY_TASKS);
            current.block_on(async {
                for _ in 0..1_000 {
                    run_once(&rt, &hello, &[]).await;
                }
                for _ in 0..LATENCY_TASKS {
                    let t = Instant::now();
                    run_once(&rt, &hello, &[]).await;
                    samples.push(t.elapsed());
                }
            });
            let p50 = percentile(&mut samples, 50.0);
            let p99 = percentile(&mut samples, 99.0);
            rows.push((
                format!("start hello, {name}, {alloc}"),
                format!("p50 {:.1} µs, p99 {:.1} µs", us(p50), us(p99)),
            ));
        }
    }

    let multi = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let rt = runtime(true, true);
    let executor = Executor::new(rt.clone(), 256);
    for (target, name) in [(Target::P1, "p1"), (Target::P2, "p2")] {
        let hello = artifact(&rt, "hello", target);
        multi.block_on(executor_throughput(&executor, &hello, 5_000));
        let mut rates: Vec<f64> = (0..ROUNDS)
            .map(|_| multi.block_on(executor_throughput(&executor, &hello, THROUGHPUT_TASKS)))
            .collect();
        rates.sort_by(f64::total_cmp);
        rows.push((
            format!("executor throughput, {name} hello, 2 workers"),
            format!("{:.0} tasks/s (median of {ROUNDS})", rates[ROUNDS / 2]),
        ));
    }

    let mut cpu_ms = Vec::new();
    for fuel in [true, false] {
        let rt = runtime(true, fuel);
        let cpu = artifact(&rt, "cpu", Target::P1);
        let mut samples: Vec<Duration> = (0..15)
            .map(|_| {
                let t = Instant::now();
                current.block_on(run_once(&rt, &cpu, &["20000000"]));
                t.elapsed()
            })
            .collect();
        cpu_ms.push(percentile(&mut samples, 50.0).as_secs_f64() * 1e3);
    }
    rows.push((
        "cpu sample 20M rounds, fuel on / off".into(),
        format!(
            "{:.1} ms / {:.1} ms, overhead {:.1}%",
            cpu_ms[0],
            cpu_ms[1],
            (cpu_ms[0] / cpu_ms[1] - 1.0) * 100.0
        ),
    ));

    if json {
        let map: serde_json::Map<String, serde_json::Value> =
            rows.into_iter().map(|(k, v)| (k, v.into())).collect();
        println!("{}", serde_json::Value::Object(map));
    } else {
        println!("| measurement | result |\n|---|---|");
        for (k, v) in rows {
            println!("| {k} | {v} |");
        }
    }
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}
