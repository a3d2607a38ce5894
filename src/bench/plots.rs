//! SVG plots of results, drawn with plotters (its SVG backend; the
//! DejaVu Sans font is embedded only to measure labels — the browser
//! draws the text), and `--report DIR`: `results.json`, `results.md` and
//! a self-contained `report.html` with, per benchmark, a latency
//! histogram and CDF and a run-by-run (or second-by-second) timeline, and
//! for a comparison a side-by-side box plot.

use std::fmt::Write as _;
use std::path::Path;
use std::sync::Once;

use anyhow::{Context, Result};
use plotters::prelude::*;

use super::Results;
use super::http::HttpBenchmark;

const WIDTH: u32 = 560;
const HEIGHT: u32 = 320;
/// The plots' colours (the HTML test looks for them).
pub(crate) const BLUE: RGBColor = RGBColor(0x1f, 0x77, 0xb4);
pub(crate) const ORANGE: RGBColor = RGBColor(0xff, 0x7f, 0x0e);

fn fonts() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let _ = plotters::style::register_font(
            "sans-serif",
            FontStyle::Normal,
            dejavu::sans::regular(),
        );
    });
}

/// Draws on a fresh SVG canvas; a plot that cannot be drawn becomes a
/// note instead (a report is never lost to one plot).
fn svg(
    draw: impl FnOnce(&DrawingArea<SVGBackend<'_>, plotters::coord::Shift>) -> Result<(), String>,
) -> String {
    fonts();
    let mut out = String::new();
    let drawn = {
        let root = SVGBackend::with_string(&mut out, (WIDTH, HEIGHT)).into_drawing_area();
        root.fill(&WHITE)
            .map_err(|e| e.to_string())
            .and_then(|()| draw(&root))
            .and_then(|()| root.present().map_err(|e| e.to_string()))
    };
    match drawn {
        Ok(()) => out,
        Err(e) => format!("<p>(plot not drawn: {})</p>", html(&e)),
    }
}

/// `lo..hi` widened so a flat series still has room.
fn span(lo: f64, hi: f64) -> std::ops::Range<f64> {
    if hi > lo {
        let pad = (hi - lo) * 0.05;
        (lo - pad).max(0.0)..hi + pad
    } else {
        (lo * 0.9).max(0.0)..hi * 1.1 + 1e-9
    }
}

/// A histogram of samples (milliseconds).
pub(crate) fn histogram(title: &str, samples: &[f64]) -> String {
    svg(|root| {
        let (lo, hi) = min_max(samples);
        let bins = (samples.len() as f64).sqrt().clamp(5.0, 40.0) as usize;
        let width = ((hi - lo) / bins as f64).max(1e-9);
        let mut counts = vec![0u32; bins];
        for s in samples {
            let i = (((s - lo) / width) as usize).min(bins - 1);
            counts[i] += 1;
        }
        let top = counts.iter().copied().max().unwrap_or(1);
        let mut chart = ChartBuilder::on(root)
            .caption(title, ("sans-serif", 16))
            .margin(10)
            .x_label_area_size(35)
            .y_label_area_size(45)
            .build_cartesian_2d(lo..lo + width * bins as f64, 0u32..top + 1)
            .map_err(|e| e.to_string())?;
        chart
            .configure_mesh()
            .x_desc("ms")
            .y_desc("runs")
            .draw()
            .map_err(|e| e.to_string())?;
        chart
            .draw_series(counts.iter().enumerate().map(|(i, c)| {
                let x0 = lo + width * i as f64;
                Rectangle::new([(x0, 0), (x0 + width, *c)], BLUE.filled())
            }))
            .map_err(|e| e.to_string())?;
        Ok(())
    })
}

/// The cumulative distribution of samples (milliseconds).
pub(crate) fn cdf(title: &str, samples: &[f64]) -> String {
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len() as f64;
    let points: Vec<(f64, f64)> = sorted
        .iter()
        .enumerate()
        .map(|(i, s)| (*s, (i + 1) as f64 / n))
        .collect();
    line(title, "ms", "fraction", &[("", points)])
}

/// Lines (one per named series) on shared axes.
pub(crate) fn line(title: &str, x: &str, y: &str, series: &[(&str, Vec<(f64, f64)>)]) -> String {
    svg(|root| {
        let xs: Vec<f64> = series
            .iter()
            .flat_map(|(_, p)| p.iter().map(|q| q.0))
            .collect();
        let ys: Vec<f64> = series
            .iter()
            .flat_map(|(_, p)| p.iter().map(|q| q.1))
            .collect();
        let (x0, x1) = min_max(&xs);
        let (_, y1) = min_max(&ys);
        let mut chart = ChartBuilder::on(root)
            .caption(title, ("sans-serif", 16))
            .margin(10)
            .x_label_area_size(35)
            .y_label_area_size(55)
            .build_cartesian_2d(span(x0, x1), span(0.0, y1))
            .map_err(|e| e.to_string())?;
        chart
            .configure_mesh()
            .x_desc(x)
            .y_desc(y)
            .draw()
            .map_err(|e| e.to_string())?;
        for (i, (name, points)) in series.iter().enumerate() {
            let color = if i == 0 { BLUE } else { ORANGE };
            let drawn = chart
                .draw_series(LineSeries::new(
                    points.iter().copied(),
                    color.stroke_width(2),
                ))
                .map_err(|e| e.to_string())?;
            if !name.is_empty() {
                drawn
                    .label(*name)
                    .legend(move |(x, y)| PathElement::new([(x, y), (x + 16, y)], color));
            }
        }
        if series.iter().any(|(n, _)| !n.is_empty()) {
            chart
                .configure_series_labels()
                .border_style(BLACK)
                .background_style(WHITE.mix(0.8))
                .draw()
                .map_err(|e| e.to_string())?;
        }
        Ok(())
    })
}

/// Box plots side by side (quartiles, whiskers at 1.5 IQR).
pub(crate) fn boxes(title: &str, groups: &[(String, Vec<f64>)]) -> String {
    svg(|root| {
        let all: Vec<f64> = groups.iter().flat_map(|(_, s)| s.iter().copied()).collect();
        let (lo, hi) = min_max(&all);
        let labels: Vec<String> = groups.iter().map(|(l, _)| l.clone()).collect();
        let mut chart = ChartBuilder::on(root)
            .caption(title, ("sans-serif", 16))
            .margin(10)
            .x_label_area_size(35)
            .y_label_area_size(55)
            .build_cartesian_2d(labels.into_segmented(), {
                // Box plots are drawn in f32.
                let r = span(lo, hi);
                r.start as f32..r.end as f32
            })
            .map_err(|e| e.to_string())?;
        chart
            .configure_mesh()
            .y_desc("ms")
            .draw()
            .map_err(|e| e.to_string())?;
        for (i, (label, samples)) in groups.iter().enumerate() {
            if samples.is_empty() {
                continue;
            }
            let mut sorted = samples.clone();
            sorted.sort_by(f64::total_cmp);
            let q = Quartiles::new(&sorted);
            let color = if i == 0 { BLUE } else { ORANGE };
            chart
                .draw_series(std::iter::once(
                    Boxplot::new_vertical(SegmentValue::CenterOf(label), &q)
                        .width(40)
                        .style(color.stroke_width(2)),
                ))
                .map_err(|e| e.to_string())?;
        }
        Ok(())
    })
}

fn min_max(v: &[f64]) -> (f64, f64) {
    v.iter()
        .fold((f64::MAX, f64::MIN), |(lo, hi), x| (lo.min(*x), hi.max(*x)))
}

/// Text for HTML.
pub(crate) fn html(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// The HTTP benchmark's plots: latency histogram (HDR buckets), CDF and
/// timeline (per second).
fn http_plots(out: &mut String, b: &HttpBenchmark) {
    let mut cumulative = 0.0;
    let total: f64 = b.histogram.iter().map(|[_, c]| c).sum();
    let cdf_points: Vec<(f64, f64)> = b
        .histogram
        .iter()
        .map(|[ms, c]| {
            cumulative += c;
            (*ms, cumulative / total.max(1.0))
        })
        .collect();
    let bars: Vec<(f64, f64)> = b.histogram.iter().map(|[ms, c]| (*ms, *c)).collect();
    out.push_str(&line(
        "Latency histogram (HDR buckets)",
        "ms (bucket upper bound)",
        "requests",
        &[("", bars)],
    ));
    out.push_str(&line("Latency CDF", "ms", "fraction", &[("", cdf_points)]));
    let p50: Vec<(f64, f64)> = b.timeline.iter().map(|s| (s.t as f64, s.p50_ms)).collect();
    let p99: Vec<(f64, f64)> = b.timeline.iter().map(|s| (s.t as f64, s.p99_ms)).collect();
    out.push_str(&line(
        "Latency over time",
        "second",
        "ms",
        &[("p50", p50), ("p99", p99)],
    ));
}

/// The report page.
pub(crate) fn html_report(results: &Results, compare: Option<&(Results, Results)>) -> String {
    let mut out = String::from(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>wharf bench report</title>\n<style>body{font-family:sans-serif;margin:2em;max-width:1800px}.plots{display:flex;flex-wrap:wrap;gap:.5em}svg{border:1px solid #ddd}pre{background:#f6f6f6;padding:1em;overflow:auto}h2{margin-top:2em}</style></head><body>\n<h1>wharf bench report</h1>\n",
    );
    let m = &results.machine;
    let _ = writeln!(
        out,
        "<p>wharf {} ({}), {} {} × {}{}, {}</p>",
        html(&results.wharf_version),
        html(&results.engine_version),
        html(&m.os),
        html(&m.arch),
        m.cpus,
        m.cpu_model
            .as_deref()
            .map(|c| format!(" ({})", html(c)))
            .unwrap_or_default(),
        html(&results.started_at)
    );
    for b in &results.benchmarks {
        let _ = writeln!(out, "<h2>{}</h2>", html(&b.name));
        let totals = b.samples("total_ms");
        let Some(t) = b.stats.get("total_ms") else {
            out.push_str("<p>No run completed.</p>\n");
            continue;
        };
        let fuel = b
            .stats
            .get("fuel")
            .filter(|_| !b.process)
            .map(|f| {
                format!(
                    ", fuel {}{}",
                    super::report::count(f.median),
                    if b.fuel_identical { " (exact)" } else { "" }
                )
            })
            .unwrap_or_default();
        let _ = writeln!(
            out,
            "<p>median {}, mean {} (95% CI {} – {}), {} runs{}</p><div class=\"plots\">",
            super::report::time(t.median),
            super::report::time(t.mean),
            super::report::time(t.ci95[0]),
            super::report::time(t.ci95[1]),
            b.runs.len(),
            html(&fuel)
        );
        // Far outliers would squeeze every other run into one bar.
        let clipped: Vec<f64> = totals.iter().copied().filter(|v| *v <= t.p99).collect();
        if t.max > 2.0 * t.p99 && clipped.len() < totals.len() {
            let title = format!(
                "Time per run (total; {} above p99 not shown)",
                totals.len() - clipped.len()
            );
            out.push_str(&histogram(&title, &clipped));
        } else {
            out.push_str(&histogram("Time per run (total)", &totals));
        }
        out.push_str(&cdf("Time per run: CDF", &totals));
        let timeline: Vec<(f64, f64)> = b
            .runs
            .iter()
            .enumerate()
            .filter(|(_, r)| r.completed)
            .map(|(i, r)| ((i + 1) as f64, r.total_ms))
            .collect();
        let execute: Vec<(f64, f64)> = b
            .runs
            .iter()
            .enumerate()
            .filter(|(_, r)| r.completed)
            .map(|(i, r)| ((i + 1) as f64, r.execute_ms))
            .collect();
        out.push_str(&line(
            "Run by run",
            "run",
            "ms",
            &[("total", timeline), ("execute", execute)],
        ));
        out.push_str("</div>\n");
    }
    for b in &results.http {
        let _ = writeln!(out, "<h2>{}</h2><div class=\"plots\">", html(&b.name));
        if b.requests == 0 {
            out.push_str("<p>No request was answered.</p></div>\n");
            continue;
        }
        http_plots(&mut out, b);
        out.push_str("</div>\n");
    }
    if let Some((base, new)) = compare {
        out.push_str("<h2>Comparison</h2><div class=\"plots\">\n");
        for n in &new.benchmarks {
            let Some(b) = base.benchmarks.iter().find(|b| b.name == n.name) else {
                continue;
            };
            let groups = vec![
                ("base".to_owned(), b.samples("total_ms")),
                ("new".to_owned(), n.samples("total_ms")),
            ];
            out.push_str(&boxes(&format!("{}: total per run", n.name), &groups));
        }
        out.push_str("</div>\n");
    }
    let _ = writeln!(
        out,
        "<details><summary>The text summary</summary><pre>{}</pre></details>",
        html(&super::report::text(results))
    );
    out.push_str("</body></html>\n");
    out
}

/// Writes `results.json`, `results.md` and `report.html` into `dir`.
pub(crate) fn write_report(
    dir: &Path,
    results: &Results,
    compare: Option<&(Results, Results)>,
) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let write = |name: &str, bytes: &[u8]| {
        let path = dir.join(name);
        std::fs::write(&path, bytes).with_context(|| format!("cannot write {}", path.display()))
    };
    write("results.json", &serde_json::to_vec_pretty(results)?)?;
    write("results.md", super::report::markdown(results).as_bytes())?;
    write("report.html", html_report(results, compare).as_bytes())?;
    Ok(())
}
