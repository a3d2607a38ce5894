//! `wharf bench compare` of HTTP benchmarks: their per-second timeline
//! is the sample set (answers per second, and each second's p50 and p99
//! latency), so a change gets a bootstrap interval as a command
//! benchmark's does. Throughput regresses when it falls; latency when it
//! rises. Failures rising is a regression whatever the rest says.

use super::compare::{Change, Verdict};
use super::http::{HttpBenchmark, Second};

/// The whole seconds of a run (the last one may be cut short).
fn seconds(b: &HttpBenchmark) -> &[Second] {
    let whole = (b.duration_s.floor() as usize).min(b.timeline.len());
    &b.timeline[..whole.max(1).min(b.timeline.len())]
}

/// The changes from `base` to `new` of one HTTP benchmark.
pub(crate) fn changes(base: &HttpBenchmark, new: &HttpBenchmark, threshold: f64) -> Vec<Change> {
    let mut out = Vec::new();
    let failures = |b: &HttpBenchmark| {
        let failed: u64 = b.errors.values().sum();
        failed as f64 / (failed + b.requests).max(1) as f64
    };
    let (fb, fnew) = (failures(base), failures(new));
    if fnew > fb {
        out.push(Change {
            benchmark: new.name.clone(),
            metric: "failed_requests".into(),
            base_mean: fb,
            new_mean: fnew,
            change: fnew - fb,
            ci95: [fnew - fb, fnew - fb],
            exact: true,
            verdict: Verdict::Regressed,
        });
    }
    type Pick = fn(&Second) -> f64;
    let metrics: [(&str, Pick, bool); 3] = [
        ("throughput", |s| s.requests as f64, true),
        ("p50_ms", |s| s.p50_ms, false),
        ("p99_ms", |s| s.p99_ms, false),
    ];
    for (metric, pick, higher_is_better) in metrics {
        let b: Vec<f64> = seconds(base).iter().map(pick).collect();
        let n: Vec<f64> = seconds(new).iter().map(pick).collect();
        let Some((change, ci)) = super::stats::change(&b, &n) else {
            continue;
        };
        // "Worse" is up for latency and down for throughput.
        let (worse, ci_worse) = if higher_is_better {
            (-change, [-ci[1], -ci[0]])
        } else {
            (change, ci)
        };
        let verdict = super::compare::verdict(worse, ci_worse, threshold);
        let mean = super::compare::mean;
        out.push(Change {
            benchmark: new.name.clone(),
            metric: metric.to_owned(),
            base_mean: mean(&b),
            new_mean: mean(&n),
            change,
            ci95: ci,
            exact: false,
            verdict,
        });
    }
    out
}
