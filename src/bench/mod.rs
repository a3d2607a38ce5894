//! `wharf bench`: benchmarks of Wasm workloads as a product feature.
//!
//! `wharf bench run` runs a command module or component in-process, many
//! times, and records each run's phases apart (compile — the first run
//! only, or every run with `--cold` —, load from the compiled cache,
//! instantiate, execute), its total, the fuel it consumed (an exact count
//! of the guest's work, the same on every run and machine), its peak
//! memory and how it ended. Each metric is summarized as hyperfine and
//! criterion do (see [`stats`]); runs that did not complete are counted
//! and shown, never dropped silently. `wharf bench compare` sets two saved
//! results side by side and exits non-zero on a regression.
//!
//! The results file (`--save`, `--output json`) is the schema documented
//! in the README: [`Results`].

mod cluster;
mod compare;
mod compare_http;
mod http;
mod plots;
mod process;
mod report;
mod run;
mod stats;
mod suite;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::{Args, Subcommand};
use serde::{Deserialize, Serialize};

pub(crate) use cluster::Api as ClusterApi;
pub(crate) use stats::Summary;

#[derive(Debug, Subcommand)]
pub(crate) enum BenchCommand {
    /// Run a command module or component many times in-process, with its
    /// phases, fuel and memory per run, and their statistics.
    Run(Box<run::RunArgs>),
    /// Compare two saved results: the change of each metric with its
    /// confidence interval and a verdict; exits 1 on a regression.
    Compare(compare::CompareArgs),
    /// HTTP load against a URL or a Wharf service: open loop at a fixed
    /// rate (latency from when each request was due) or closed loop, HDR
    /// percentiles, status codes, failures by kind.
    Http(Box<http::HttpArgs>),
    /// Run a suite file's benchmarks in order into one report.
    Suite(suite::SuiteArgs),
}

pub(crate) fn main(command: BenchCommand) -> Result<ExitCode> {
    match command {
        BenchCommand::Run(args) => run::main(*args),
        BenchCommand::Compare(args) => compare::main(args),
        BenchCommand::Http(args) => http::main(*args),
        BenchCommand::Suite(args) => suite::main(args),
    }
}

/// How results are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Output {
    Text,
    Json,
    Markdown,
}

/// The schema version of [`Results`].
pub(crate) const SCHEMA: &str = "wharf-bench/1";

/// A results file: the machine, then one entry per benchmark.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Results {
    /// `wharf-bench/1`.
    pub(crate) schema: String,
    pub(crate) wharf_version: String,
    pub(crate) engine_version: String,
    pub(crate) machine: Machine,
    /// When the run began (RFC 3339, UTC).
    pub(crate) started_at: String,
    pub(crate) benchmarks: Vec<Benchmark>,
    /// HTTP load benchmarks (`wharf bench http`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) http: Vec<http::HttpBenchmark>,
    /// What holds across benchmarks (the spread between nodes).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) notes: Vec<String>,
}

impl Results {
    /// Results measured on this machine by this wharf since `started_at`.
    pub(crate) fn new(
        started_at: String,
        benchmarks: Vec<Benchmark>,
        http: Vec<http::HttpBenchmark>,
        notes: Vec<String>,
    ) -> Results {
        Results {
            schema: SCHEMA.into(),
            wharf_version: env!("CARGO_PKG_VERSION").into(),
            engine_version: wharf_runtime::ENGINE_VERSION.into(),
            machine: Machine::this(),
            started_at,
            benchmarks,
            http,
            notes,
        }
    }
}

/// Where the numbers were measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Machine {
    pub(crate) os: String,
    pub(crate) arch: String,
    /// Logical CPUs.
    pub(crate) cpus: usize,
    /// The CPU model, when the OS says.
    pub(crate) cpu_model: Option<String>,
}

impl Machine {
    pub(crate) fn this() -> Machine {
        let cpu_model = std::fs::read_to_string("/proc/cpuinfo").ok().and_then(|c| {
            c.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, m)| m.trim().to_owned())
        });
        Machine {
            os: std::env::consts::OS.into(),
            arch: std::env::consts::ARCH.into(),
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
            cpu_model,
        }
    }
}

/// One benchmark: what ran, every run, and the statistics.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Benchmark {
    /// `--name` (default: the file's name), with the parameter values.
    pub(crate) name: String,
    /// The file or reference.
    pub(crate) artifact: String,
    pub(crate) digest: String,
    /// The guest's arguments, parameters substituted.
    pub(crate) args: Vec<String>,
    /// The parameter values of this benchmark (`--param`).
    pub(crate) params: BTreeMap<String, String>,
    pub(crate) concurrency: usize,
    pub(crate) cold: bool,
    pub(crate) warmup: usize,
    /// Fuel budget and memory limit per run.
    pub(crate) fuel_limit: Option<u64>,
    pub(crate) memory_limit: Option<u64>,
    /// Every measured run, in the order they started.
    pub(crate) runs: Vec<RunRecord>,
    /// Runs that did not complete, by stop code.
    pub(crate) failed: BTreeMap<String, usize>,
    /// The harness's own time per run, in microseconds: what the loop
    /// spent outside the runs' totals (kept out of every figure).
    pub(crate) harness_overhead_us: f64,
    /// Measured runs per second over the measured loop (all at once with
    /// `--concurrency`).
    #[serde(default)]
    pub(crate) throughput: f64,
    /// Per metric, over the runs that completed.
    pub(crate) stats: BTreeMap<String, Summary>,
    /// Whether every completed run consumed the same fuel.
    pub(crate) fuel_identical: bool,
    /// What a reader should know (outliers, a slow first run, failures).
    pub(crate) warnings: Vec<String>,
    /// Whole processes timed from outside (`--compare-with`): only
    /// `total_ms` is measured.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub(crate) process: bool,
}

/// One run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct RunRecord {
    /// Compiling the Wasm (the first run, or every run with `--cold`).
    pub(crate) compile_ms: Option<f64>,
    /// Loading the precompiled code from the compiled cache.
    pub(crate) load_ms: Option<f64>,
    /// Instantiating (`None` if it did not finish).
    pub(crate) instantiate_ms: Option<f64>,
    /// From instantiation's end to the guest's stop.
    pub(crate) execute_ms: f64,
    /// Load (or compile, with `--cold`) + instantiate + execute, on the
    /// harness's monotonic clock.
    pub(crate) total_ms: f64,
    pub(crate) fuel: u64,
    pub(crate) peak_memory_bytes: u64,
    pub(crate) stop_code: String,
    pub(crate) exit_code: Option<i32>,
    /// It ended by itself (`Completed` or `NonZeroExit`).
    pub(crate) completed: bool,
    /// Why a run that did not complete ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) message: Option<String>,
}

/// The metrics summarized, with their units.
pub(crate) const METRICS: [(&str, &str); 7] = [
    ("total_ms", "ms"),
    ("compile_ms", "ms"),
    ("load_ms", "ms"),
    ("instantiate_ms", "ms"),
    ("execute_ms", "ms"),
    ("fuel", "fuel"),
    ("peak_memory_bytes", "bytes"),
];

impl RunRecord {
    /// The value of a metric in this run, if it has one.
    pub(crate) fn metric(&self, name: &str) -> Option<f64> {
        match name {
            "total_ms" => Some(self.total_ms),
            "compile_ms" => self.compile_ms,
            "load_ms" => self.load_ms,
            "instantiate_ms" => self.instantiate_ms,
            "execute_ms" => Some(self.execute_ms),
            "fuel" => Some(self.fuel as f64),
            "peak_memory_bytes" => Some(self.peak_memory_bytes as f64),
            _ => None,
        }
    }
}

impl Benchmark {
    /// The samples of a metric over the completed runs.
    pub(crate) fn samples(&self, metric: &str) -> Vec<f64> {
        self.runs
            .iter()
            .filter(|r| r.completed)
            .filter_map(|r| r.metric(metric))
            .collect()
    }
}

/// Reads a results file.
pub(crate) fn load(path: &PathBuf) -> Result<Results> {
    use anyhow::Context;
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let results: Results = serde_json::from_slice(&bytes)
        .with_context(|| format!("{} is not a wharf bench results file", path.display()))?;
    if results.schema != SCHEMA {
        anyhow::bail!(
            "{} has schema {:?}; this wharf reads {SCHEMA}",
            path.display(),
            results.schema
        );
    }
    Ok(results)
}

/// Flags shared by the commands that print results.
#[derive(Debug, Args)]
pub(crate) struct OutputArgs {
    /// How to print the results.
    #[arg(long, value_enum, default_value_t = Output::Text)]
    pub(crate) output: Output,
    /// Also write results.json, results.md and a self-contained
    /// report.html with plots into this directory.
    #[arg(long, value_name = "DIR")]
    pub(crate) report: Option<PathBuf>,
}

/// Writes and prints results as `--save`, `--report` and `--output` ask.
pub(crate) fn emit(results: &Results, save: Option<&PathBuf>, output: &OutputArgs) -> Result<()> {
    use anyhow::Context;
    if let Some(path) = save {
        std::fs::write(path, serde_json::to_vec_pretty(results)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    if let Some(dir) = &output.report {
        plots::write_report(dir, results, None)?;
    }
    match output.output {
        Output::Text => print!("{}", report::text(results)),
        Output::Markdown => print!("{}", report::markdown(results)),
        Output::Json => println!("{}", serde_json::to_string_pretty(results)?),
    }
    Ok(())
}
