//! Memory per long-running task, layer by layer, in one run: raw wasmtime
//! (`wharf_bench::raw`: the same engine, a WASI context, `Store` and
//! instance per task, output captured, no Wharf code) against Wharf's
//! executor (task spec, log buffer, limiter, epoch callback, supervision),
//! each holding `--tasks` heartbeat tasks in a process of its own (this
//! binary run again with `--arm`), the two arms alternated round by round.
//! What the server adds on top (the control plane's record, the task's
//! driver) is `api_load PARTS=service` with the same guest. Beside them,
//! the peer a user would otherwise run, `wasmtime run` (wasmtime-cli,
//! `WASMTIME` or on `PATH`; skipped without it): a process a task,
//! `--processes` of them (default 100), their summed Pss per process.
//!
//! Each arm: one short run first (the artifact compiled, one pool slot
//! warm), then two waves of `--tasks` tasks, each started, seen beating
//! once and held 10 s, sampled once a second; per task = (the second
//! wave's median − the first's) / tasks: the marginal cost of a task,
//! which the heap freed by compiling (megabytes the first tasks reuse)
//! does not flatter. `pss_from_baseline` is the older method's figure,
//! (second wave − before the first) / all tasks. Beside the totals, the
//! resident part of the 2 MiB fiber stacks the guests run on (wasmtime's
//! `async_stack_size`: one mapping a pool slot, counted by Pss in
//! /proc/self/smaps).
//!
//! `cargo run --release -p wharf-bench --bin task_memory -- [--tasks N]
//! [--rounds R] [--guest heartbeat|wat] [--beat-ms MS] [--processes P]
//! [--json]`: `heartbeat` is the Rust sample (`wasm32-wasip1`), `wat` is
//! `samples/wat/heartbeat.wat` (one page of linear memory, no allocator),
//! either beating every `--beat-ms` (default 1,000; 3,600,000 keeps the
//! logs still while they are measured). Method and results:
//! docs/PERFORMANCE.md, "Session 32: memory per task, layer by layer".

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use wharf_bench::raw::Raw;
use wharf_bench::{memory_kib, wasmtime_bin};
use wharf_runtime::{Executor, LogBuffer, Runtime, RuntimeConfig, TaskSpec};
use wharf_testkit::Target;

/// The allocator `wharf` ships with, so both arms run on what a server runs.
#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// How long each wave of tasks is held, sampled once a second.
const WAVE_SECONDS: usize = 10;
/// wasmtime's default `async_stack_size`: the fiber stack of a task.
const FIBER_STACK: u64 = 2 << 20;
/// Output kept per task, as a server keeps by default.
const RETAINED: usize = 64 << 10;
/// The longest the tasks may take to start and beat once.
const START_LIMIT: Duration = Duration::from_secs(120);

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn main() {
    let tasks: usize = arg("--tasks").map_or(1_000, |t| t.parse().expect("--tasks N"));
    let guest = arg("--guest").unwrap_or_else(|| "heartbeat".into());
    // A beat a second by default. A beat an hour (`--beat-ms 3600000`)
    // keeps every task's log still while it is measured: with a beat a
    // second, the first wave's logs grow while the second is sampled.
    let beat_ms: u64 = arg("--beat-ms").map_or(1_000, |b| b.parse().expect("--beat-ms MS"));
    assert!(
        guest == "heartbeat" || guest == "wat",
        "--guest heartbeat|wat"
    );
    if let Some(arm) = arg("--arm") {
        let row = hold(&arm, tasks, &guest, beat_ms);
        println!("{row}");
        // Exit without tearing thousands of tasks down.
        std::process::exit(0);
    }
    let rounds: usize = arg("--rounds").map_or(3, |r| r.parse().expect("--rounds R"));
    let processes: usize = arg("--processes").map_or(100, |p| p.parse().expect("--processes P"));
    let wasmtime = wasmtime_bin();
    let mut rows: BTreeMap<&str, Vec<Value>> = BTreeMap::new();
    for round in 0..rounds {
        if let Some(wasmtime) = &wasmtime {
            let row = processes_arm(wasmtime, processes, &guest, beat_ms);
            eprintln!("round {round}: {row}");
            rows.entry("wasmtime run").or_default().push(row);
        }
        let order = if round % 2 == 0 {
            ["raw", "executor"]
        } else {
            ["executor", "raw"]
        };
        for arm in order {
            let out = Command::new(std::env::current_exe().expect("own path"))
                .args([
                    "--arm",
                    arm,
                    "--tasks",
                    &tasks.to_string(),
                    "--guest",
                    &guest,
                    "--beat-ms",
                    &beat_ms.to_string(),
                ])
                .output()
                .expect("run an arm");
            assert!(
                out.status.success(),
                "arm {arm} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let row: Value = serde_json::from_slice(&out.stdout).expect("the arm's JSON row");
            eprintln!("round {round}: {row}");
            rows.entry(arm).or_default().push(row);
        }
    }
    report(&rows, tasks, &guest, beat_ms);
}

/// Median and range of `key` over an arm's rows.
fn stat(rows: &[Value], key: &str) -> (f64, f64, f64) {
    let mut v: Vec<f64> = rows.iter().map(|r| r[key].as_f64().unwrap()).collect();
    v.sort_by(f64::total_cmp);
    (v[v.len() / 2], v[0], v[v.len() - 1])
}

fn report(rows: &BTreeMap<&str, Vec<Value>>, tasks: usize, guest: &str, beat_ms: u64) {
    let fmt = |(m, lo, hi): (f64, f64, f64)| format!("{m:.1} ({lo:.1}–{hi:.1})");
    println!(
        "2 × {tasks} {guest} tasks, a beat every {beat_ms} ms, KiB per task, median (range) of {} rounds\n",
        rows["raw"].len()
    );
    println!("| | raw wasmtime | Wharf executor | executor − raw |");
    println!("|---|---|---|---|");
    for (key, name) in [
        ("pss", "PSS, marginal (second wave)"),
        ("vmrss", "VmRSS"),
        ("stacks_pss", "of which fiber stacks (PSS)"),
        ("rest_pss", "of which the rest (PSS)"),
        ("pss_from_baseline", "PSS from the baseline, both waves"),
    ] {
        let (r, w) = (stat(&rows["raw"], key), stat(&rows["executor"], key));
        println!("| {name} | {} | {} | {:+.1} |", fmt(r), fmt(w), w.0 - r.0);
    }
    match rows.get("wasmtime run") {
        Some(peer) => println!(
            "\n`wasmtime run`, a process a task ({} of them): PSS {} KiB per task",
            peer[0]["tasks"],
            fmt(stat(peer, "pss"))
        ),
        None => println!("\n`wasmtime run`: skipped (set WASMTIME or put it on PATH)"),
    }
    if std::env::args().any(|a| a == "--json") {
        println!(
            "{}",
            json!({ "tasks": tasks, "guest": guest, "rows": rows })
        );
    }
}

/// `/proc/self/smaps`: the Pss of the fiber stacks (anonymous rw
/// mappings of exactly `FIBER_STACK` bytes: the pool maps every slot's
/// stack up front, so only their Pss says how many are in use). Read
/// a line at a time: the whole file is megabytes with thousands of
/// tasks, which a sample must not add to what it measures.
fn stacks_pss_kib() -> u64 {
    let smaps = std::fs::File::open("/proc/self/smaps").expect("smaps");
    let (mut pss, mut stack) = (0, false);
    let mut reader = BufReader::new(smaps);
    let mut line = String::new();
    while reader.read_line(&mut line).expect("smaps is readable") > 0 {
        let mut fields = line.split_whitespace();
        let first = fields.next().unwrap_or_default();
        if let Some((lo, hi)) = first.split_once('-')
            && let (Ok(lo), Ok(hi)) = (u64::from_str_radix(lo, 16), u64::from_str_radix(hi, 16))
        {
            let perms = fields.next().unwrap_or_default();
            let named = fields.nth(3).is_some();
            stack = hi - lo == FIBER_STACK && perms == "rw-p" && !named;
        } else if stack && first == "Pss:" {
            pss += fields
                .next()
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0);
        }
        line.clear();
    }
    pss
}

/// A task as the server runs the benchmark's service: output captured,
/// 8 MiB of memory, 10^9 fuel.
fn task(log: &Arc<LogBuffer>, args: &[&str]) -> TaskSpec {
    let mut spec = TaskSpec::new(log.clone());
    spec.args = args.iter().map(|a| a.to_string()).collect();
    spec.limits.memory = Some(8 << 20);
    spec.limits.fuel = Some(1_000_000_000);
    spec
}

/// Peer processes, killed when dropped (also when a check panics).
struct Processes(Vec<std::process::Child>);

impl Drop for Processes {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The peer: `processes` runs of `wasmtime run` on the same guest, each
/// seen beating once, then left 10 s; their summed Pss (which shares the
/// binary's pages between them) per process, the median of 5 samples a
/// second apart.
fn processes_arm(wasmtime: &std::path::Path, processes: usize, guest: &str, beat_ms: u64) -> Value {
    let dir = tempfile::tempdir().expect("a directory for the module");
    let file = match guest {
        "wat" => {
            let file = dir.path().join("heartbeat.wasm");
            std::fs::write(&file, wharf_bench::wat_heartbeat(beat_ms)).expect("write it");
            file
        }
        _ => wharf_testkit::wasm("heartbeat", Target::P1),
    };
    let mut children = Processes(Vec::with_capacity(processes));
    children.0.extend((0..processes).map(|_| {
        Command::new(wasmtime)
            .arg("run")
            .arg(&file)
            .arg(beat_ms.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start wasmtime run")
    }));
    // Each has beaten once; the rest of its output is drained.
    for child in &mut children.0 {
        let mut lines = BufReader::new(child.stdout.take().expect("piped stdout")).lines();
        let first = lines.next().expect("a beat").expect("readable stdout");
        assert!(first.starts_with("heartbeat"), "{first}");
        std::thread::spawn(move || for _ in lines {});
    }
    std::thread::sleep(Duration::from_secs(WAVE_SECONDS as u64));
    let mut sums: Vec<u64> = (0..5)
        .map(|_| {
            std::thread::sleep(Duration::from_secs(1));
            for child in &mut children.0 {
                let ended = child.try_wait().expect("wait on wasmtime run");
                assert!(ended.is_none(), "a wasmtime run ended: {ended:?}");
            }
            children.0.iter().map(|c| memory_kib(c.id())["Pss"]).sum()
        })
        .collect();
    sums.sort_unstable();
    drop(children);
    json!({
        "arm": "wasmtime run",
        "guest": guest,
        "tasks": processes,
        "pss": sums[sums.len() / 2] as f64 / processes as f64,
    })
}

/// Pss, VmRSS, RssAnon and the fiber stacks' Pss of this process, in
/// KiB.
fn sample(pid: u32) -> [u64; 4] {
    // The totals first: reading smaps allocates a little.
    let m = memory_kib(pid);
    let stacks_pss = stacks_pss_kib();
    [m["Pss"], m["VmRSS"], m["RssAnon"], stacks_pss]
}

/// One arm in this process: `tasks` heartbeats held; its JSON row.
fn hold(arm: &str, tasks: usize, guest: &str, beat_ms: u64) -> Value {
    let rt = Runtime::new(RuntimeConfig {
        max_instances: u32::try_from((2 * tasks).max(1_000)).expect("tasks fit u32"),
        ..RuntimeConfig::default()
    })
    .expect("runtime");
    let bytes = match guest {
        "wat" => wharf_bench::wat_heartbeat(beat_ms),
        _ => wharf_testkit::wasm_bytes("heartbeat", Target::P1),
    };
    let guests = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio");
    // A beat every `beat_ms`, until stopped (the WAT guest's interval is
    // compiled in).
    let beat: Vec<String> = vec!["heartbeat".into(), beat_ms.to_string()];
    let pid = std::process::id();
    let warm = Duration::from_millis(300);
    let executor = Executor::new(rt.clone(), 2 * tasks);
    let artifact = rt.load(&bytes).expect("heartbeat loads").artifact;
    let raw = Arc::new(Raw::new(rt.engine(), &bytes));

    // One short run: two beats 1 ms apart, or (WAT) stopped after 300 ms.
    guests.block_on(async {
        match arm {
            "raw" => {
                let out = Raw::output();
                let run = raw.run_with(&["heartbeat", "1", "2"], &out);
                let _ = tokio::time::timeout(warm, run).await;
                assert!(!out.contents().is_empty(), "the short run beat");
            }
            _ => {
                let logs = LogBuffer::new(RETAINED);
                let mut spec = task(&logs, &["1", "2"]);
                spec.limits.timeout = Some(warm);
                executor.spawn(artifact.clone(), spec).wait().await;
                assert!(!logs.lines().is_empty(), "the short run beat");
            }
        }
    });
    std::thread::sleep(Duration::from_secs(1));
    let before = sample(pid);

    // Two equal waves: the second's growth is the marginal cost of a task,
    // free of heap the process freed before the baseline (compiling a
    // module frees megabytes the first tasks then reuse).
    let mut handles = Vec::with_capacity(2 * tasks);
    let mut steady = Vec::new();
    let mut started_ms = Vec::new();
    for _wave in 1..=2 {
        let started = Instant::now();
        guests.block_on(async {
            match arm {
                "raw" => {
                    let mut outs = Vec::with_capacity(tasks);
                    for _ in 0..tasks {
                        let (raw, out) = (raw.clone(), Raw::output());
                        outs.push(out.clone());
                        let args = beat.clone();
                        tokio::spawn(async move {
                            let args: Vec<&str> = args.iter().map(String::as_str).collect();
                            raw.run_with(&args, &out).await
                        });
                    }
                    while outs.iter().any(|o| o.contents().is_empty()) {
                        assert!(started.elapsed() < START_LIMIT, "raw tasks did not beat");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
                _ => {
                    let mut logs = Vec::with_capacity(tasks);
                    for _ in 0..tasks {
                        let log = LogBuffer::new(RETAINED);
                        handles.push(executor.spawn(artifact.clone(), task(&log, &[&beat[1]])));
                        logs.push(log);
                    }
                    // `wait_for` also returns once a log is closed: a task
                    // that ended must not pass for one that beats.
                    let beating = async {
                        for log in &logs {
                            log.wait_for(0).await;
                            assert!(!log.lines().is_empty(), "a task ended without a beat");
                        }
                    };
                    tokio::time::timeout(START_LIMIT, beating)
                        .await
                        .expect("executor tasks did not beat");
                }
            }
        });
        started_ms.push(started.elapsed().as_millis() as u64);
        let mut samples: Vec<[u64; 4]> = (0..WAVE_SECONDS)
            .map(|_| {
                std::thread::sleep(Duration::from_secs(1));
                sample(pid)
            })
            .collect();
        // The median of each figure.
        steady.push(std::array::from_fn::<u64, 4, _>(|i| {
            samples.sort_unstable_by_key(|s| s[i]);
            samples[samples.len() / 2][i]
        }));
    }
    let [first, second] = [steady[0], steady[1]];
    let per = |i: usize| (second[i] as f64 - first[i] as f64) / tasks as f64;
    let row = json!({
        "arm": arm,
        "guest": guest,
        "tasks": tasks,
        "pss": per(0),
        "vmrss": per(1),
        "anon": per(2),
        "stacks_pss": per(3),
        "rest_pss": per(0) - per(3),
        "pss_from_baseline": (second[0] as f64 - before[0] as f64) / (2 * tasks) as f64,
        "baseline_pss_kib": before[0],
        "started_ms": started_ms,
    });
    drop(handles);
    row
}
