//! `wharf bench compare BASE.json NEW.json`: per benchmark (matched by
//! name) and metric, the change of the mean with its 95 % bootstrap
//! interval and a verdict, as criterion reports against a baseline. A
//! timed metric regressed when it grew by more than the threshold and its
//! interval lies above zero (improved: the mirror image); fuel is exact,
//! so any change beyond the threshold is a verdict. Exits 1 if anything
//! regressed, for CI.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::Args;
use serde::Serialize;

use super::report::value;
use super::{Benchmark, Output};

#[derive(Debug, Args)]
pub(crate) struct CompareArgs {
    /// The baseline results (`wharf bench run --save`).
    base: PathBuf,
    /// The results to judge.
    new: PathBuf,
    /// The smallest change that counts, e.g. 5%.
    #[arg(long, default_value = "5%", value_parser = parse_percent)]
    threshold: f64,
    #[command(flatten)]
    output: super::OutputArgs,
}

/// `5%` or `0.05` → 0.05.
fn parse_percent(text: &str) -> Result<f64, String> {
    let t = text.trim();
    let v = match t.strip_suffix('%') {
        Some(p) => p.trim().parse::<f64>().map(|p| p / 100.0),
        None => t.parse::<f64>(),
    }
    .map_err(|_| format!("{text:?} is not a percentage like 5%"))?;
    if !t.ends_with('%') && v >= 1.0 {
        return Err(format!(
            "{text:?}: write {text}% (a bare number is a fraction: 0.05 is 5%)"
        ));
    }
    if !(0.0..10.0).contains(&v) {
        return Err(format!("{text:?}: between 0% and 1000%"));
    }
    Ok(v)
}

/// What a change means.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Verdict {
    Improved,
    Regressed,
    NoChange,
}

impl Verdict {
    fn as_str(self) -> &'static str {
        match self {
            Verdict::Improved => "improved",
            Verdict::Regressed => "regressed",
            Verdict::NoChange => "no change",
        }
    }
}

/// One metric of one benchmark, before and after.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Change {
    pub(crate) benchmark: String,
    pub(crate) metric: String,
    pub(crate) base_mean: f64,
    pub(crate) new_mean: f64,
    /// Relative change of the mean (0.05 = 5 % more).
    pub(crate) change: f64,
    /// Its 95 % interval; equal to `change` when exact (fuel).
    pub(crate) ci95: [f64; 2],
    pub(crate) exact: bool,
    pub(crate) verdict: Verdict,
}

/// The metrics compared (compile time is measured once per run of the
/// harness: no interval).
const COMPARED: [&str; 6] = [
    "total_ms",
    "load_ms",
    "instantiate_ms",
    "execute_ms",
    "fuel",
    "peak_memory_bytes",
];

/// The changes from `base` to `new` of one benchmark.
pub(crate) fn changes(base: &Benchmark, new: &Benchmark, threshold: f64) -> Vec<Change> {
    let mut out = Vec::new();
    // More runs failing is a regression whatever the timings say (and the
    // timings cover only the runs that completed).
    let failed =
        |b: &Benchmark| b.failed.values().sum::<usize>() as f64 / b.runs.len().max(1) as f64;
    let (fb, fnew) = (failed(base), failed(new));
    if fnew > fb || (new.runs.is_empty() && !base.runs.is_empty()) {
        out.push(Change {
            benchmark: new.name.clone(),
            metric: "failed_runs".into(),
            base_mean: fb,
            new_mean: fnew,
            change: fnew - fb,
            ci95: [fnew - fb, fnew - fb],
            exact: true,
            verdict: Verdict::Regressed,
        });
    }
    for metric in COMPARED {
        let (b, n) = (base.samples(metric), new.samples(metric));
        let Some((change, ci)) = super::stats::change(&b, &n) else {
            continue;
        };
        let exact = metric == "fuel" && base.fuel_identical && new.fuel_identical;
        let ci95 = if exact { [change, change] } else { ci };
        let verdict = verdict(change, ci95, threshold);
        out.push(Change {
            benchmark: new.name.clone(),
            metric: metric.to_owned(),
            base_mean: mean(&b),
            new_mean: mean(&n),
            change,
            ci95,
            exact,
            verdict,
        });
    }
    out
}

/// A change that makes things worse by `worse` (its interval `ci`):
/// regressed when past the threshold with the interval above zero,
/// improved in the mirror case.
pub(crate) fn verdict(worse: f64, ci: [f64; 2], threshold: f64) -> Verdict {
    if worse > threshold && ci[0] > 0.0 {
        Verdict::Regressed
    } else if worse < -threshold && ci[1] < 0.0 {
        Verdict::Improved
    } else {
        Verdict::NoChange
    }
}

pub(crate) fn mean(samples: &[f64]) -> f64 {
    samples.iter().sum::<f64>() / samples.len() as f64
}

fn percent(v: f64) -> String {
    format!("{:+.2} %", v * 100.0)
}

pub(crate) fn main(args: CompareArgs) -> Result<ExitCode> {
    let base = super::load(&args.base)?;
    let new = super::load(&args.new)?;
    let mut all = Vec::new();
    let mut unmatched = Vec::new();
    for n in &new.benchmarks {
        match base.benchmarks.iter().find(|b| b.name == n.name) {
            Some(b) => all.extend(changes(b, n, args.threshold)),
            None => unmatched.push(n.name.clone()),
        }
    }
    for n in &new.http {
        match base.http.iter().find(|b| b.name == n.name) {
            Some(b) => all.extend(super::compare_http::changes(b, n, args.threshold)),
            None => unmatched.push(n.name.clone()),
        }
    }
    // A benchmark that disappeared cannot be judged: it fails the check.
    let missing: Vec<String> = base
        .benchmarks
        .iter()
        .map(|b| &b.name)
        .filter(|name| !new.benchmarks.iter().any(|n| &n.name == *name))
        .chain(
            base.http
                .iter()
                .map(|b| &b.name)
                .filter(|name| !new.http.iter().any(|n| &n.name == *name)),
        )
        .cloned()
        .collect();
    let regressed = all.iter().any(|c| c.verdict == Verdict::Regressed) || !missing.is_empty();
    if let Some(dir) = &args.output.report {
        let pair = (base.clone(), new.clone());
        super::plots::write_report(dir, &new, Some(&pair))?;
    }
    match args.output.output {
        Output::Json => println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "threshold": args.threshold,
                "changes": all,
                "unmatched": unmatched,
                "missing": missing,
                "regressed": regressed,
            }))?
        ),
        Output::Markdown => {
            let mut out = String::from(
                "| Benchmark | Metric | Base | New | Change | 95% CI | Verdict |\n|:---|:---|---:|---:|---:|---:|:---|\n",
            );
            for c in &all {
                let _ = writeln!(
                    out,
                    "| {} | {} | {} | {} | {} | {} | {} |",
                    c.benchmark.replace('|', "\\|"),
                    c.metric,
                    value(&c.metric, c.base_mean),
                    value(&c.metric, c.new_mean),
                    percent(c.change),
                    if c.exact {
                        "exact".to_owned()
                    } else {
                        format!("[{}, {}]", percent(c.ci95[0]), percent(c.ci95[1]))
                    },
                    c.verdict.as_str()
                );
            }
            print!("{out}");
        }
        Output::Text => {
            let mut out = String::new();
            let mut current = "";
            for c in &all {
                if c.benchmark != current {
                    let _ = writeln!(out, "{}", c.benchmark);
                    current = &c.benchmark;
                }
                let ci = if c.exact {
                    "(exact)".to_owned()
                } else {
                    format!("[{}, {}]", percent(c.ci95[0]), percent(c.ci95[1]))
                };
                let _ = writeln!(
                    out,
                    "  {:<18} {:>14} → {:<14} {:>10} {:<24} {}",
                    c.metric,
                    value(&c.metric, c.base_mean),
                    value(&c.metric, c.new_mean),
                    percent(c.change),
                    ci,
                    c.verdict.as_str()
                );
            }
            for name in &unmatched {
                let _ = writeln!(out, "{name}: not in {}", args.base.display());
            }
            for name in &missing {
                let _ = writeln!(
                    out,
                    "{name}: missing from {} (a regression)",
                    args.new.display()
                );
            }
            let _ = writeln!(
                out,
                "threshold {}: {}",
                percent(args.threshold).trim_start_matches('+'),
                if regressed {
                    "a regression"
                } else {
                    "no regression"
                }
            );
            print!("{out}");
        }
    }
    Ok(if regressed {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thresholds_parse_as_percentages() {
        assert_eq!(parse_percent("5%").unwrap(), 0.05);
        assert_eq!(parse_percent("0.1").unwrap(), 0.1);
        assert!(parse_percent("five").is_err());
        assert!(parse_percent("5").is_err());
        assert_eq!(parse_percent("50%").unwrap(), 0.5);
        assert!(parse_percent("-5%").is_err());
    }
}
