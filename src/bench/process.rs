//! `--compare-with 'CMD {file}'`: a peer (such as `wasmtime run {file}`)
//! run as whole processes beside `wharf run` of the same file and
//! arguments, with the same statistics, so "Wharf vs wasmtime" is one
//! command. The command is split on spaces (no shell: neither side pays
//! for one); `{file}` becomes the artifact's path and the guest's
//! arguments follow.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{Context, Result, bail};

use super::{Benchmark, RunRecord};

/// Process runs: as many as the in-process runs, within these bounds.
const MIN_RUNS: usize = 10;
const MAX_RUNS: usize = 200;

/// Times `argv` `runs` times (after one warm-up run, which also fills
/// `wharf run`'s compile cache).
fn time_process(argv: &[String], runs: usize) -> Result<Vec<RunRecord>> {
    let (program, rest) = argv.split_first().context("an empty command")?;
    let once = || -> Result<RunRecord> {
        let began = Instant::now();
        let status = Command::new(program)
            .args(rest)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .with_context(|| format!("cannot run {program}"))?;
        let total_ms = began.elapsed().as_secs_f64() * 1000.0;
        Ok(RunRecord {
            compile_ms: None,
            load_ms: None,
            instantiate_ms: None,
            execute_ms: total_ms,
            total_ms,
            fuel: 0,
            peak_memory_bytes: 0,
            stop_code: if status.success() {
                "Completed".into()
            } else {
                "NonZeroExit".into()
            },
            exit_code: status.code(),
            completed: status.code().is_some(),
            message: status.code().is_none().then(|| format!("killed: {status}")),
        })
    };
    once()?;
    (0..runs).map(|_| once()).collect()
}

/// The process benchmark of one command.
fn process_benchmark(name: String, argv: Vec<String>, of: &Benchmark) -> Result<Benchmark> {
    let runs = of.runs.len().clamp(MIN_RUNS, MAX_RUNS);
    let records = time_process(&argv, runs)?;
    let mut failed = BTreeMap::new();
    for r in records.iter().filter(|r| !r.completed) {
        *failed.entry(r.stop_code.clone()).or_insert(0) += 1;
    }
    let mut b = Benchmark {
        name,
        artifact: argv.join(" "),
        digest: of.digest.clone(),
        args: of.args.clone(),
        params: of.params.clone(),
        concurrency: 1,
        cold: false,
        warmup: 1,
        fuel_limit: None,
        memory_limit: None,
        runs: records,
        failed,
        harness_overhead_us: 0.0,
        throughput: 0.0,
        stats: BTreeMap::new(),
        fuel_identical: false,
        warnings: Vec::new(),
        process: true,
    };
    if let Some(s) = super::stats::summarize(&b.samples("total_ms")) {
        b.stats.insert("total_ms".into(), s);
    }
    let exits: Vec<i32> = b.runs.iter().filter_map(|r| r.exit_code).collect();
    if exits.iter().any(|c| *c != 0) {
        b.warnings.push(format!(
            "Some runs exited non-zero (first: {}): is the command right?",
            exits.iter().find(|c| **c != 0).copied().unwrap_or_default()
        ));
    }
    Ok(b)
}

/// `wharf run` and the peer, as whole processes, for benchmark `of` of
/// `file`; and the ratio of their medians, as a warning line of `of`.
pub(crate) fn side_by_side(file: &Path, peer: &str, of: &mut Benchmark) -> Result<Vec<Benchmark>> {
    if !peer.contains("{file}") {
        bail!("--compare-with {peer:?} has no {{file}} for the artifact's path");
    }
    let path = file.display().to_string();
    let exe = std::env::current_exe().context("cannot find this wharf binary")?;
    let mut wharf = vec![exe.display().to_string(), "run".into(), path.clone()];
    let mut theirs: Vec<String> = peer
        .split_whitespace()
        .map(|w| w.replace("{file}", &path))
        .collect();
    if !of.args.is_empty() {
        wharf.push("--".into());
        wharf.extend(of.args.iter().cloned());
        theirs.extend(of.args.iter().cloned());
    }
    // `wasmtime run`, not the path it was found at.
    let label = peer
        .split_whitespace()
        .take(2)
        .enumerate()
        .map(|(i, w)| match i {
            0 => Path::new(w)
                .file_name()
                .map_or(w.to_owned(), |n| n.to_string_lossy().into_owned()),
            _ => w.replace("{file}", "FILE"),
        })
        .collect::<Vec<_>>()
        .join(" ");
    let ours = process_benchmark(format!("{} [wharf run, process]", of.name), wharf, of)?;
    let peer_b = process_benchmark(format!("{} [{label}, process]", of.name), theirs, of)?;
    // The same guest must end the same way under both, or the peer is not
    // running it (a wrong command line).
    let first = |b: &Benchmark| b.runs.first().and_then(|r| r.exit_code);
    if first(&ours) != first(&peer_b) {
        bail!(
            "{label} exited {:?} where wharf run exited {:?}: is --compare-with {peer:?} right?",
            first(&peer_b),
            first(&ours)
        );
    }
    if let (Some(a), Some(b)) = (ours.stats.get("total_ms"), peer_b.stats.get("total_ms")) {
        let ratio = b.median / a.median;
        of.warnings.push(format!(
            "Side by side as whole processes (median): wharf run {} vs {label} {}: wharf run takes {:.2}× the time of {label}.",
            super::report::time(a.median),
            super::report::time(b.median),
            1.0 / ratio
        ));
    }
    Ok(vec![ours, peer_b])
}
