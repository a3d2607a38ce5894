//! Criterion micro-benchmarks of the runtime crate. Medians go into
//! `docs/PERFORMANCE.md`; percentiles and throughput come from the harness.
//!
//! `cargo bench -p wharf-bench --bench runtime`

use std::time::{Duration, Instant};

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use wharf_bench::{artifact, executor_throughput, run_once, runtime};
use wharf_runtime::{Executor, Runtime, RuntimeConfig};
use wharf_testkit::{Target, wasm_bytes};

fn current_thread() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// New store + instantiate + run hello from a warm cache.
fn start(c: &mut Criterion) {
    let tokio = current_thread();
    let mut group = c.benchmark_group("start_hello");
    for (pooling, alloc) in [(true, "pooling"), (false, "on_demand")] {
        let rt = runtime(pooling, true);
        for (target, name) in [(Target::P1, "p1"), (Target::P2, "p2")] {
            let hello = artifact(&rt, "hello", target);
            group.bench_function(format!("{name}/{alloc}"), |b| {
                b.iter(|| tokio.block_on(run_once(&rt, &hello, &[])))
            });
        }
    }
    group.finish();
}

/// Loading precompiled code from the disk cache into a fresh runtime (as
/// after a restart), versus compiling.
fn load(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let config = || RuntimeConfig {
        max_instances: 4,
        cache_dir: Some(dir.path().to_owned()),
        ..RuntimeConfig::default()
    };
    let mut group = c.benchmark_group("load_hello");
    group.sample_size(20);
    for (target, name) in [(Target::P1, "p1"), (Target::P2, "p2")] {
        let bytes = wasm_bytes("hello", target);
        Runtime::new(config()).unwrap().load(&bytes).unwrap();
        group.bench_function(format!("{name}/disk_cache"), |b| {
            b.iter_batched(
                || Runtime::new(config()).unwrap(),
                |rt| {
                    let loaded = rt.load(&bytes).unwrap();
                    assert_eq!(loaded.source, wharf_runtime::ArtifactSource::DiskCache);
                    rt
                },
                BatchSize::PerIteration,
            )
        });
        group.bench_function(format!("{name}/compile"), |b| {
            b.iter_batched(
                || {
                    Runtime::new(RuntimeConfig {
                        max_instances: 4,
                        ..RuntimeConfig::default()
                    })
                    .unwrap()
                },
                |rt| {
                    rt.load(&bytes).unwrap();
                    rt
                },
                BatchSize::PerIteration,
            )
        });
    }
    group.finish();
}

/// The CPU-bound sample with fuel metering on and off.
fn fuel(c: &mut Criterion) {
    let tokio = current_thread();
    let mut group = c.benchmark_group("cpu_2m_rounds");
    group.sample_size(20);
    for (fuel, name) in [(true, "fuel_on"), (false, "fuel_off")] {
        let rt = runtime(true, fuel);
        let cpu = artifact(&rt, "cpu", Target::P1);
        group.bench_function(name, |b| {
            b.iter(|| tokio.block_on(run_once(&rt, &cpu, &["2000000"])))
        });
    }
    group.finish();
}

/// Hello tasks through the executor on a 2-worker tokio runtime.
fn executor(c: &mut Criterion) {
    let tokio = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut group = c.benchmark_group("executor_2_workers");
    const TASKS: usize = 10_000;
    group.throughput(Throughput::Elements(TASKS as u64));
    group.sample_size(10);
    let rt = runtime(true, true);
    let executor = Executor::new(rt.clone(), 256);
    for (target, name) in [(Target::P1, "p1_hello"), (Target::P2, "p2_hello")] {
        let hello = artifact(&rt, "hello", target);
        group.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let start = Instant::now();
                for _ in 0..iters {
                    tokio.block_on(executor_throughput(&executor, &hello, TASKS));
                }
                start.elapsed()
            })
        });
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(5)).warm_up_time(Duration::from_secs(1));
    targets = start, load, fuel, executor
}
criterion_main!(benches);
