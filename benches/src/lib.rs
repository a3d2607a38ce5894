//! Shared set-up for Wharf's benchmarks: runtimes configured the ways the
//! benchmarks compare, the hello task as the unit of start-up cost, and
//! percentile arithmetic. Criterion benches (`benches/`) report medians;
//! the `harness` binary reports p50/p99 and throughput for
//! `docs/PERFORMANCE.md`.

pub mod raw;
pub mod soak;

use std::collections::BTreeMap;
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

/// The process's resident memory in KiB: `VmRSS` and its parts from
/// /proc/PID/status, and `Pss` from /proc/PID/smaps_rollup — which counts
/// a page mapped many times once (the pool maps each task's copy of a
/// module's data segments from one shared image, and VmRSS counts those
/// pages once per task).
pub fn memory_kib(pid: u32) -> BTreeMap<&'static str, u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    // Read or fail: a process that is gone must not count as 0 KiB.
    let rollup =
        std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).expect("smaps_rollup");
    let field = |text: &str, key: &str| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    };
    let mut out = BTreeMap::new();
    for key in ["VmRSS", "RssAnon", "RssFile"] {
        out.insert(key, field(&status, key));
    }
    out.insert("Pss", field(&rollup, "Pss"));
    out
}

/// `samples/wat/heartbeat.wat` compiled with its beat every
/// `interval_ms` instead of every second: the module's one clock
/// subscription is data, its timeout the 8 bytes after the clock id.
pub fn wat_heartbeat(interval_ms: u64) -> Vec<u8> {
    let path = wharf_testkit::wat("heartbeat");
    let text = std::fs::read_to_string(&path).expect("heartbeat.wat");
    let second = r"\01\00\00\00\00\00\00\00\00\ca\9a\3b\00\00\00\00";
    assert!(text.contains(second), "heartbeat.wat's subscription moved");
    let ns = interval_ms.saturating_mul(1_000_000);
    let timeout: String = ns
        .to_le_bytes()
        .iter()
        .map(|b| format!("\\{b:02x}"))
        .collect();
    let text = text.replace(second, &format!(r"\01\00\00\00\00\00\00\00{timeout}"));
    wat::parse_str(&text).expect("heartbeat.wat compiles")
}

/// `name` in a directory of `PATH`.
pub fn find_on_path(name: &str) -> Option<std::path::PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// The peer `wasmtime` (wasmtime-cli): `WASMTIME`, else `wasmtime` on
/// `PATH`; `None` when there is none (its rows are skipped).
pub fn wasmtime_bin() -> Option<std::path::PathBuf> {
    std::env::var_os("WASMTIME")
        .map(std::path::PathBuf::from)
        .or_else(|| find_on_path("wasmtime"))
}

/// The `wharf` binary the end-to-end harnesses drive: `WHARF_BIN`, else
/// the workspace's release build.
pub fn wharf_bin() -> std::path::PathBuf {
    std::env::var_os("WHARF_BIN")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .parent()
                .expect("benches/ is in the workspace")
                .join("target/release/wharf")
        })
}

/// A `wharf server` on a loopback port over `dir`: the process, its base
/// URL and its admin token.
pub fn spawn_wharf_server(dir: &std::path::Path) -> (std::process::Child, String, String) {
    spawn_server(&wharf_bin(), dir, &[])
}

/// `bin server` on a loopback port over `dir` with extra `flags`.
pub fn spawn_server(
    bin: &std::path::Path,
    dir: &std::path::Path,
    flags: &[&str],
) -> (std::process::Child, String, String) {
    use std::io::{BufRead, BufReader};
    // Side by side with other servers: the ingress gets a free port too.
    let ingress: &[&str] = if flags.contains(&"--ingress") {
        &[]
    } else {
        &["--ingress", "127.0.0.1:0"]
    };
    let mut child = std::process::Command::new(bin)
        .args(["server", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir)
        .args(ingress)
        .args(flags)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start wharf server (build it with cargo build --release -p wharf)");
    let mut lines = BufReader::new(child.stderr.take().expect("piped stderr")).lines();
    let base = loop {
        let line = lines
            .next()
            .expect("wharf printed its address")
            .expect("stderr is readable");
        if let Some(rest) = line.strip_prefix("wharf: listening on ") {
            break rest
                .split_whitespace()
                .next()
                .unwrap_or_default()
                .to_owned();
        }
    };
    // Keep draining stderr so the server never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    let token = std::fs::read_to_string(dir.join("admin.token")).expect("admin token");
    (child, base, token.trim().to_owned())
}
