//! Printing results: text (as hyperfine prints, with the phases, fuel
//! and memory under each benchmark) and a Markdown table.

use std::fmt::Write as _;

use super::{Benchmark, Results, Summary};

/// Now, RFC 3339 UTC.
pub(crate) fn now() -> String {
    wharf_api::model::now()
}

/// Milliseconds in the unit that reads best.
pub(crate) fn time(ms: f64) -> String {
    if ms >= 1000.0 {
        format!("{:.3} s", ms / 1000.0)
    } else if ms >= 1.0 {
        format!("{ms:.3} ms")
    } else {
        format!("{:.1} µs", ms * 1000.0)
    }
}

/// Bytes in binary units.
pub(crate) fn bytes(n: f64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut v = n;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{v:.0} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

/// A whole number with thousands separators.
pub(crate) fn count(n: f64) -> String {
    let digits = format!("{:.0}", n.round());
    let (sign, digits) = match digits.strip_prefix('-') {
        Some(d) => ("-", d.to_owned()),
        None => ("", digits),
    };
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    format!("{sign}{out}")
}

/// A metric's value in its unit.
pub(crate) fn value(metric: &str, v: f64) -> String {
    match metric {
        "fuel" => count(v),
        "failed_runs" | "failed_requests" => format!("{:.1} %", v * 100.0),
        "throughput" => format!("{v:.0}/s"),
        "peak_memory_bytes" => bytes(v),
        _ => time(v),
    }
}

fn median(b: &Benchmark, metric: &str) -> Option<f64> {
    b.stats.get(metric).map(|s| s.median)
}

/// The text report.
pub(crate) fn text(results: &Results) -> String {
    let mut out = String::new();
    for (i, b) in results.benchmarks.iter().enumerate() {
        let _ = writeln!(out, "Benchmark {}: {}", i + 1, b.name);
        if b.process {
            let _ = writeln!(out, "  Command:             {}", b.artifact);
        }
        let ran = b.runs.len();
        let failed: usize = b.failed.values().sum();
        match b.stats.get("total_ms") {
            Some(Summary {
                mean,
                stddev,
                median,
                p90,
                p99,
                min,
                max,
                ci95,
                ..
            }) => {
                let _ = writeln!(
                    out,
                    "  Time (mean ± σ):     {} ± {}    95% CI [{}, {}]",
                    time(*mean),
                    time(*stddev),
                    time(ci95[0]),
                    time(ci95[1])
                );
                let _ = writeln!(
                    out,
                    "  Time (median):       {}    p90 {}    p99 {}",
                    time(*median),
                    time(*p90),
                    time(*p99)
                );
                let _ = writeln!(
                    out,
                    "  Range (min … max):   {} … {}    {ran} runs ({failed} failed){}",
                    time(*min),
                    time(*max),
                    if b.concurrency > 1 {
                        format!(", {} at once", b.concurrency)
                    } else {
                        String::new()
                    }
                );
            }
            None => {
                let _ = writeln!(out, "  No run completed ({ran} runs, {failed} failed).");
            }
        }
        let mut phases = Vec::new();
        if let Some(c) = b.stats.get("compile_ms") {
            phases.push(if b.cold {
                format!("compile {}", time(c.median))
            } else {
                format!("compile {} (once)", time(c.median))
            });
        }
        for (metric, label) in [
            ("load_ms", "load"),
            ("instantiate_ms", "instantiate"),
            ("execute_ms", "execute"),
        ] {
            if let Some(m) = median(b, metric) {
                phases.push(format!("{label} {}", time(m)));
            }
        }
        if !phases.is_empty() {
            let _ = writeln!(out, "  Phases (median):     {}", phases.join(" · "));
        }
        if let Some(f) = b.stats.get("fuel") {
            let fuel = if b.fuel_identical {
                format!("{} (identical in every run)", count(f.median))
            } else {
                format!(
                    "median {} (min {}, max {})",
                    count(f.median),
                    count(f.min),
                    count(f.max)
                )
            };
            let _ = writeln!(out, "  Fuel:                {fuel}");
        }
        if let Some(m) = b.stats.get("peak_memory_bytes") {
            let _ = writeln!(out, "  Peak memory:         {}", bytes(m.max));
        }
        if b.throughput > 0.0 {
            let _ = writeln!(
                out,
                "  Throughput:          {} runs/s{}",
                count(b.throughput),
                if b.concurrency > 1 {
                    format!(" ({} at once)", b.concurrency)
                } else {
                    String::new()
                }
            );
        }
        if !b.process {
            let _ = writeln!(
                out,
                "  Harness overhead:    {:.1} µs per run (outside the figures above)",
                b.harness_overhead_us
            );
        }
        for w in &b.warnings {
            let _ = writeln!(out, "  Warning: {w}");
        }
        out.push('\n');
    }
    http_text(&mut out, results);
    for note in &results.notes {
        let _ = writeln!(out, "{note}");
    }
    out
}

/// The text of HTTP benchmarks.
fn http_text(out: &mut String, results: &Results) {
    for (i, b) in results.http.iter().enumerate() {
        let _ = writeln!(out, "HTTP benchmark {}: {}", i + 1, b.name);
        let mode = match b.rate {
            Some(r) => format!("open loop at {r}/s (latency from when each request was due)"),
            None => "closed loop".to_owned(),
        };
        let _ = writeln!(
            out,
            "  {} {}    {mode}, {} connections, {:.0} s",
            b.method, b.url, b.connections, b.duration_s
        );
        let _ = writeln!(
            out,
            "  Throughput:          {:.1} answers/s ({} answers)",
            b.throughput,
            count(b.requests as f64)
        );
        let l = &b.latency_ms;
        let _ = writeln!(
            out,
            "  Latency:             p50 {}    p90 {}    p99 {}    p99.9 {}    max {}",
            time(l.p50),
            time(l.p90),
            time(l.p99),
            time(l.p999),
            time(l.max)
        );
        let _ = writeln!(
            out,
            "  Latency (mean ± σ):  {} ± {}",
            time(l.mean),
            time(l.stddev)
        );
        let status: Vec<String> = b.status.iter().map(|(k, n)| format!("{k} ×{n}")).collect();
        let _ = writeln!(out, "  Status:              {}", or_none(&status));
        let errors: Vec<String> = b.errors.iter().map(|(k, n)| format!("{k} ×{n}")).collect();
        let _ = writeln!(out, "  Failures:            {}", or_none(&errors));
        for w in &b.warnings {
            let _ = writeln!(out, "  Warning: {w}");
        }
        out.push('\n');
    }
}

fn or_none(items: &[String]) -> String {
    if items.is_empty() {
        "none".into()
    } else {
        items.join(", ")
    }
}

/// The Markdown table.
pub(crate) fn markdown(results: &Results) -> String {
    let mut out = String::new();
    if !results.benchmarks.is_empty() {
        out.push_str(
            "| Benchmark | Median | Mean ± σ | 95% CI of the mean | Instantiate | Execute | Fuel | Peak memory | Runs (failed) |\n|:---|---:|---:|---:|---:|---:|---:|---:|---:|\n",
        );
    }
    for b in &results.benchmarks {
        let failed: usize = b.failed.values().sum();
        let dash = || "–".to_owned();
        let total = b.stats.get("total_ms");
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} | {}{} | {} | {} ({failed}) |",
            b.name.replace('|', "\\|"),
            total.map_or_else(dash, |s| time(s.median)),
            total.map_or_else(dash, |s| format!("{} ± {}", time(s.mean), time(s.stddev))),
            total.map_or_else(dash, |s| format!(
                "[{}, {}]",
                time(s.ci95[0]),
                time(s.ci95[1])
            )),
            median(b, "instantiate_ms").map_or_else(dash, time),
            median(b, "execute_ms").map_or_else(dash, time),
            median(b, "fuel").map_or_else(dash, count),
            if b.fuel_identical { " (exact)" } else { "" },
            b.stats
                .get("peak_memory_bytes")
                .map_or_else(dash, |s| bytes(s.max)),
            b.runs.len(),
        );
    }
    if !results.http.is_empty() {
        if !out.is_empty() {
            out.push('\n');
        }
        out.push_str(
            "| HTTP benchmark | Mode | Throughput | p50 | p90 | p99 | p99.9 | Max | Failures |\n|:---|:---|---:|---:|---:|---:|---:|---:|---:|\n",
        );
        for b in &results.http {
            let l = &b.latency_ms;
            let _ = writeln!(
                out,
                "| {} | {} | {:.1}/s | {} | {} | {} | {} | {} | {} |",
                b.name.replace('|', "\\|"),
                match b.rate {
                    Some(r) => format!("open, {r}/s, {} conn.", b.connections),
                    None => format!("closed, {} conn.", b.connections),
                },
                b.throughput,
                time(l.p50),
                time(l.p90),
                time(l.p99),
                time(l.p999),
                time(l.max),
                b.errors.values().sum::<u64>()
            );
        }
    }
    for note in &results.notes {
        let _ = writeln!(out, "\n{note}");
    }
    let m = &results.machine;
    let _ = writeln!(
        out,
        "\nwharf {} ({}), {} {} × {}{}, {}.",
        results.wharf_version,
        results.engine_version,
        m.os,
        m.arch,
        m.cpus,
        m.cpu_model
            .as_ref()
            .map(|c| format!(" ({c})"))
            .unwrap_or_default(),
        results.started_at
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_read_well() {
        assert_eq!(time(0.0123), "12.3 µs");
        assert_eq!(time(12.3456), "12.346 ms");
        assert_eq!(time(1234.5), "1.234 s");
        assert_eq!(bytes(512.0), "512 B");
        assert_eq!(bytes(1536.0), "1.5 KiB");
        assert_eq!(count(1234567.0), "1,234,567");
        assert_eq!(count(-1000.0), "-1,000");
        assert_eq!(count(12.0), "12");
    }
}
