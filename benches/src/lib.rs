//! Shared set-up for Wharf's benchmarks: runtimes configured the ways the
//! benchmarks compare, the hello task as the unit of start-up cost, and
//! percentile arithmetic. Criterion benches (`benches/`) report medians;
//! the `harness` binary reports p50/p99 and throughput for
//! `docs/PERFORMANCE.md`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use wharf_runtime::{
    Artifact, Executor, LogBuffer, Outcome, Runtime, RuntimeConfig, StopCode, TaskSpec,
};
use wharf_testkit::{Target, wasm_bytes};

/// Log retention for benchmark tasks: enough for hello, small like a real node's.
const RETAINED: usize = 64 << 10;

/// A runtime for benchmarks: pooling or on-demand, fuel metering on or off,
/// task memory capped at 64 MiB (the pool's slot size).
pub fn runtime(pooling: bool, fuel: bool) -> Arc<Runtime> {
    let rt = Runtime::new(RuntimeConfig {
        pooling,
        fuel,
        max_task_memory: 64 << 20,
        max_instances: 1_000,
        ..RuntimeConfig::default()
    })
    .expect("runtime");
    assert_eq!(
        rt.allocator() == wharf_runtime::Allocator::Pooling,
        pooling,
        "allocator as configured"
    );
    rt
}

/// The sample compiled and cached in `rt`.
pub fn artifact(rt: &Runtime, sample: &str, target: Target) -> Arc<Artifact> {
    rt.load(&wasm_bytes(sample, target))
        .expect("sample loads")
        .artifact
}

/// A task spec capturing output, with the sample's arguments.
pub fn spec(args: &[&str]) -> TaskSpec {
    let mut spec = TaskSpec::new(LogBuffer::new(RETAINED));
    spec.args = args.iter().map(|a| a.to_string()).collect();
    spec
}

/// One complete task: fresh log buffer, store, WASI context; instantiate;
/// run to the end; outcome.
pub async fn run_once(rt: &Runtime, artifact: &Artifact, args: &[&str]) -> Outcome {
    let outcome = rt.run(artifact, &spec(args)).await;
    debug_assert_eq!(outcome.stop_code, StopCode::Completed);
    outcome
}

/// Runs `n` hello tasks through an executor and returns tasks per second.
/// Every task captures its log and its outcome is awaited and checked.
pub async fn executor_throughput(executor: &Executor, artifact: &Arc<Artifact>, n: usize) -> f64 {
    let start = Instant::now();
    // Submit in waves no larger than the slot count so submission itself
    // does not build an unbounded queue.
    let wave = executor.slots();
    let mut done = 0;
    while done < n {
        let batch = wave.min(n - done);
        let handles: Vec<_> = (0..batch)
            .map(|_| executor.spawn(artifact.clone(), spec(&[])))
            .collect();
        for h in handles {
            let outcome = h.wait().await;
            assert_eq!(outcome.stop_code, StopCode::Completed, "{outcome:?}");
        }
        done += batch;
    }
    n as f64 / start.elapsed().as_secs_f64()
}

/// The `p`-th percentile (0–100) of `samples`, which it sorts.
pub fn percentile(samples: &mut [Duration], p: f64) -> Duration {
    samples.sort_unstable();
    let rank = ((p / 100.0) * (samples.len() - 1) as f64).round() as usize;
    samples[rank]
}
