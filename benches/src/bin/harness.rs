//! Load harness: start latency percentiles, executor throughput and fuel
//! overhead, printed as a Markdown table for `docs/PERFORMANCE.md`.
//!
//! Beside Wharf's starts, the raw-wasmtime arm (`wharf_bench::raw`): the
//! same sample on the very same engine with no Wharf code, interleaved
//! run by run with Wharf's (blocks of one, then the other, differ by more
//! than the effect on this VM), and the same burst through a plain tokio
//! `spawn` per task against Wharf's executor.
//!
//! `cargo run --release -p wharf-bench --bin harness [-- --json] [--raw-only]`

use std::time::{Duration, Instant};

use std::sync::Arc;

use wharf_bench::raw::Raw;
use wharf_bench::{artifact, executor_throughput, percentile, run_once, runtime};
use wharf_runtime::Executor;
use wharf_testkit::Target;

/// Tasks per latency measurement: enough for a stable p99.
const LATENCY_TASKS: usize = 20_000;
/// Tasks per throughput measurement, repeated `ROUNDS` times (median kept).
const THROUGHPUT_TASKS: usize = 50_000;
const ROUNDS: usize = 5;

/// The allocator `wharf` ships with, so both arms run on what a server runs.
#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    let json = std::env::args().any(|a| a == "--json");
    let current = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut rows: Vec<(String, String)> = Vec::new();
    let raw_only = std::env::args().any(|a| a == "--raw-only");

    raw_arm(&current, &mut rows);
    if raw_only {
        return print(rows, json);
    }

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

    print(rows, json);
}

fn print(rows: Vec<(String, String)>, json: bool) {
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

/// Wharf against raw wasmtime on one engine (pooling, fuel on): start
/// latency interleaved run by run (who goes first alternates), and burst
/// throughput on 2 workers, alternating bursts.
fn raw_arm(current: &tokio::runtime::Runtime, rows: &mut Vec<(String, String)>) {
    let rt = runtime(true, true);
    let multi = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let executor = Executor::new(rt.clone(), 256);
    for (target, name) in [(Target::P1, "p1"), (Target::P2, "p2")] {
        let hello = artifact(&rt, "hello", target);
        let raw = Arc::new(Raw::new(
            rt.engine(),
            &wharf_testkit::wasm_bytes("hello", target),
        ));
        let (mut w, mut r) = (
            Vec::with_capacity(LATENCY_TASKS),
            Vec::with_capacity(LATENCY_TASKS),
        );
        current.block_on(async {
            for _ in 0..1_000 {
                run_once(&rt, &hello, &[]).await;
                raw.run().await;
            }
            for i in 0..LATENCY_TASKS {
                for wharf_first in [i % 2 == 0, i % 2 != 0] {
                    let t = Instant::now();
                    if wharf_first {
                        run_once(&rt, &hello, &[]).await;
                        w.push(t.elapsed());
                    } else {
                        raw.run().await;
                        r.push(t.elapsed());
                    }
                }
            }
        });
        let (w50, w99) = (percentile(&mut w, 50.0), percentile(&mut w, 99.0));
        let (r50, r99) = (percentile(&mut r, 50.0), percentile(&mut r, 99.0));
        rows.push((
            format!("start hello, {name}, Wharf / raw wasmtime (same engine, interleaved)"),
            format!(
                "p50 {:.1} / {:.1} µs (ratio {:.2}), p99 {:.1} / {:.1} µs",
                us(w50),
                us(r50),
                w50.as_secs_f64() / r50.as_secs_f64(),
                us(w99),
                us(r99)
            ),
        ));
        multi.block_on(executor_throughput(&executor, &hello, 5_000));
        multi.block_on(raw_throughput(&raw, 5_000));
        let (mut wr, mut rr) = (Vec::new(), Vec::new());
        for _ in 0..ROUNDS {
            wr.push(multi.block_on(executor_throughput(&executor, &hello, THROUGHPUT_TASKS)));
            rr.push(multi.block_on(raw_throughput(&raw, THROUGHPUT_TASKS)));
        }
        wr.sort_by(f64::total_cmp);
        rr.sort_by(f64::total_cmp);
        let (wm, rm) = (wr[ROUNDS / 2], rr[ROUNDS / 2]);
        rows.push((
            format!("burst throughput, {name} hello, 2 workers, Wharf executor / raw wasmtime"),
            format!(
                "{wm:.0} / {rm:.0} tasks/s (ratio {:.2}, medians of {ROUNDS})",
                wm / rm
            ),
        ));
    }
}

/// The raw arm's burst: `n` runs as tokio tasks on the current runtime,
/// in waves of 256 (the Wharf executor's slot count here).
async fn raw_throughput(raw: &Arc<Raw>, n: usize) -> f64 {
    let start = Instant::now();
    let mut done = 0;
    while done < n {
        let wave = 256.min(n - done);
        let handles: Vec<_> = (0..wave)
            .map(|_| {
                let raw = raw.clone();
                tokio::spawn(async move { raw.run().await })
            })
            .collect();
        for h in handles {
            h.await.expect("a raw run");
        }
        done += wave;
    }
    n as f64 / start.elapsed().as_secs_f64()
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}
