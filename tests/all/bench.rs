//! `wharf bench` on real samples: phases and exact fuel per run, the
//! statistics, parameter sweeps, runs that fail counted (and failing the
//! command), and `compare` catching an injected regression.

use std::path::Path;
use std::process::{Command, Output};

use serde_json::Value;
use wharf_testkit::{Target, wasm};

/// `wharf bench ARGS` in `dir` (its data directory).
fn bench(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_wharf"))
        .arg("bench")
        .args(args)
        .env("WHARF_DATA_DIR", dir)
        .env_remove("RUST_LOG")
        .output()
        .unwrap()
}

/// `wharf bench run … --output json`, which must succeed.
fn run_json(dir: &Path, args: &[&str]) -> Value {
    let mut all = vec!["run", "--output", "json"];
    all.extend_from_slice(args);
    let out = bench(dir, &all);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn fuel_of(bench: &Value) -> Vec<u64> {
    bench["runs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["fuel"].as_u64().unwrap())
        .collect()
}

#[test]
fn bench_run_times_each_phase_and_counts_the_same_fuel_in_every_run_and_at_any_concurrency() {
    let dir = tempfile::tempdir().unwrap();
    let cpu = wasm("cpu", Target::P1);
    let cpu = cpu.to_str().unwrap();
    let one = run_json(dir.path(), &["--runs", "12", cpu, "--", "50000"]);
    assert_eq!(one["schema"], "wharf-bench/1");
    assert!(one["machine"]["cpus"].as_u64().unwrap() >= 1);
    let b = &one["benchmarks"][0];
    assert_eq!(b["name"], "cpu.wasm");
    assert!(b["digest"].as_str().unwrap().starts_with("sha256:"));
    let runs = b["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 12);
    // Compiled once, before the first run; every other run loads the
    // precompiled code; each run instantiates and executes.
    assert!(runs[0]["compile_ms"].as_f64().unwrap() > 0.0);
    assert!(runs[1..].iter().all(|r| r["compile_ms"].is_null()));
    for r in runs {
        assert_eq!(r["stop_code"], "Completed", "{r}");
        assert!(r["instantiate_ms"].as_f64().unwrap() > 0.0);
        assert!(r["execute_ms"].as_f64().unwrap() > 0.0);
        let phases = r["load_ms"].as_f64().unwrap()
            + r["instantiate_ms"].as_f64().unwrap()
            + r["execute_ms"].as_f64().unwrap();
        assert!(r["total_ms"].as_f64().unwrap() >= phases, "{r}");
    }
    // Fuel is an exact count of the guest's work: the same in every run.
    let fuel = fuel_of(b);
    assert!(fuel[0] > 50_000, "{fuel:?}");
    assert!(fuel.iter().all(|f| *f == fuel[0]), "{fuel:?}");
    assert_eq!(b["fuel_identical"], true);
    let total = &b["stats"]["total_ms"];
    assert_eq!(total["n"], 12);
    let (lo, hi) = (
        total["ci95"][0].as_f64().unwrap(),
        total["ci95"][1].as_f64().unwrap(),
    );
    let mean = total["mean"].as_f64().unwrap();
    assert!(lo <= mean && mean <= hi, "{total}");
    assert!(total["min"].as_f64().unwrap() <= total["median"].as_f64().unwrap());
    assert!(b["harness_overhead_us"].as_f64().unwrap() >= 0.0);
    // … and at another concurrency.
    let three = run_json(
        dir.path(),
        &["--runs", "9", "--concurrency", "3", cpu, "--", "50000"],
    );
    let b3 = &three["benchmarks"][0];
    assert_eq!(b3["concurrency"], 3);
    assert!(fuel_of(b3).iter().all(|f| *f == fuel[0]), "{b3}");
    // A sweep: one benchmark per value, `{n}` replaced; more rounds, more fuel.
    let sweep = run_json(
        dir.path(),
        &[
            "--runs",
            "3",
            "--name",
            "cpu",
            "--param",
            "n=1000,100000",
            cpu,
            "--",
            "{n}",
        ],
    );
    let benches = sweep["benchmarks"].as_array().unwrap();
    let names: Vec<&str> = benches
        .iter()
        .map(|b| b["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["cpu (n=1000)", "cpu (n=100000)"]);
    assert_eq!(benches[1]["args"][0], "100000");
    assert!(fuel_of(&benches[1])[0] > 10 * fuel_of(&benches[0])[0]);
    // A component, as text and Markdown.
    let hello = wasm("hello", Target::P2);
    let out = bench(dir.path(), &["run", "--runs", "5", hello.to_str().unwrap()]);
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8(out.stdout).unwrap();
    for part in [
        "Benchmark 1: hello.wasm",
        "Time (mean ± σ)",
        "95% CI",
        "Phases (median):",
        "instantiate",
        "(identical in every run)",
        "Harness overhead:",
    ] {
        assert!(text.contains(part), "{part}: {text}");
    }
    let out = bench(
        dir.path(),
        &[
            "run",
            "--runs",
            "3",
            "--output",
            "markdown",
            hello.to_str().unwrap(),
        ],
    );
    let md = String::from_utf8(out.stdout).unwrap();
    assert!(md.starts_with("| Benchmark | Median |"), "{md}");
    assert!(md.contains("| hello.wasm |"), "{md}");
}

#[test]
fn runs_that_do_not_complete_are_counted_shown_and_fail_the_command() {
    let dir = tempfile::tempdir().unwrap();
    let cpu = wasm("cpu", Target::P1);
    let out = bench(
        dir.path(),
        &[
            "run",
            "--runs",
            "4",
            "--fuel",
            "5000",
            "--output",
            "json",
            cpu.to_str().unwrap(),
            "--",
            "1000000",
        ],
    );
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let results: Value = serde_json::from_slice(&out.stdout).unwrap();
    let b = &results["benchmarks"][0];
    assert_eq!(b["runs"].as_array().unwrap().len(), 4);
    assert_eq!(b["failed"]["OutOfFuel"], 4);
    assert!(b["stats"].get("total_ms").is_none(), "{b}");
    let warning = b["warnings"][0].as_str().unwrap();
    assert!(
        warning.contains("4 of 4 runs did not complete (OutOfFuel ×4)"),
        "{warning}"
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("4 runs did not complete"));
    // Bad flags are named.
    let out = bench(dir.path(), &["run", "--param", "n", cpu.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("NAME=V1,V2"));
}

#[test]
fn compare_reports_an_injected_regression_and_exits_non_zero() {
    let dir = tempfile::tempdir().unwrap();
    let cpu = wasm("cpu", Target::P1);
    let cpu = cpu.to_str().unwrap();
    let base = dir.path().join("base.json");
    let new = dir.path().join("new.json");
    let save = |file: &Path, rounds: &str| {
        let out = bench(
            dir.path(),
            &[
                "run",
                "--runs",
                "15",
                "--name",
                "cpu",
                "--save",
                file.to_str().unwrap(),
                cpu,
                "--",
                rounds,
            ],
        );
        assert!(out.status.success(), "{out:?}");
    };
    save(&base, "300000");
    // The regression: the same benchmark doing four times the work.
    save(&new, "1200000");
    let out = bench(
        dir.path(),
        &[
            "compare",
            base.to_str().unwrap(),
            new.to_str().unwrap(),
            "--output",
            "json",
        ],
    );
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["regressed"], true);
    let changes = report["changes"].as_array().unwrap();
    let of = |metric: &str| {
        changes
            .iter()
            .find(|c| c["metric"] == metric)
            .unwrap_or_else(|| panic!("no {metric} in {report}"))
            .clone()
    };
    let fuel = of("fuel");
    assert_eq!(fuel["exact"], true);
    assert_eq!(fuel["verdict"], "regressed");
    assert!(fuel["change"].as_f64().unwrap() > 2.5, "{fuel}");
    let execute = of("execute_ms");
    assert_eq!(execute["verdict"], "regressed", "{execute}");
    assert!(execute["ci95"][0].as_f64().unwrap() > 0.0, "{execute}");
    // Against itself: nothing changed, exit 0; the text says so.
    let out = bench(
        dir.path(),
        &["compare", base.to_str().unwrap(), base.to_str().unwrap()],
    );
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("(exact)"), "{text}");
    assert!(text.contains("no regression"), "{text}");
    assert!(!text.contains("regressed"), "{text}");
    // Every run failing is a regression, whatever the timings say; so is
    // a benchmark that disappeared.
    let broken = dir.path().join("broken.json");
    let out = bench(
        dir.path(),
        &[
            "run",
            "--runs",
            "5",
            "--name",
            "cpu",
            "--fuel",
            "1000",
            "--save",
            broken.to_str().unwrap(),
            cpu,
            "--",
            "300000",
        ],
    );
    assert_eq!(out.status.code(), Some(1));
    let out = bench(
        dir.path(),
        &[
            "compare",
            base.to_str().unwrap(),
            broken.to_str().unwrap(),
            "--output",
            "json",
        ],
    );
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["changes"][0]["metric"], "failed_runs", "{report}");
    assert_eq!(report["changes"][0]["verdict"], "regressed");
    let renamed = dir.path().join("renamed.json");
    let mut other: Value = serde_json::from_slice(&std::fs::read(&base).unwrap()).unwrap();
    other["benchmarks"][0]["name"] = "cpu2".into();
    std::fs::write(&renamed, other.to_string()).unwrap();
    let out = bench(
        dir.path(),
        &["compare", base.to_str().unwrap(), renamed.to_str().unwrap()],
    );
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("cpu: missing from"));
    // A file that is not results is refused by name.
    std::fs::write(dir.path().join("junk.json"), "{}").unwrap();
    let junk = dir.path().join("junk.json");
    let out = bench(
        dir.path(),
        &["compare", junk.to_str().unwrap(), base.to_str().unwrap()],
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a wharf bench results file"));
}

/// `wharf bench http … --output json`; its one HTTP benchmark and the
/// exit code.
fn http_json(dir: &Path, args: &[&str]) -> (Value, Option<i32>) {
    let mut all = vec!["http", "--output", "json"];
    all.extend_from_slice(args);
    let out = bench(dir, &all);
    let results: Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {out:?}"));
    (results["http"][0].clone(), out.status.code())
}

#[test]
fn bench_http_reports_a_known_delay_and_counts_a_stall_in_the_open_loop() {
    let dir = tempfile::tempdir().unwrap();
    let slow = wasm("http_slow", Target::P2);
    let serve = crate::serve::serve_target(&[], slow.to_str().unwrap(), &[]);
    // Closed loop: every request waits 40 ms in the component.
    let (b, code) = http_json(
        dir.path(),
        &[
            &format!("{}/40", serve.base),
            "--connections",
            "4",
            "--duration",
            "2s",
        ],
    );
    assert_eq!(code, Some(0), "{b}");
    assert_eq!(b["mode"], "closed");
    assert_eq!(b["status"]["200"], b["requests"]);
    let p50 = b["latency_ms"]["p50"].as_f64().unwrap();
    assert!((40.0..90.0).contains(&p50), "{b}");
    let requests = b["requests"].as_u64().unwrap();
    // Four connections of ~40 ms each: about 100 answers/s.
    assert!((60..=220).contains(&requests), "{requests}");
    assert!(!b["histogram"].as_array().unwrap().is_empty());
    assert!(b["timeline"].as_array().unwrap().len() >= 2);
    // Open loop at 50/s over ONE connection of 40 ms a request (at most
    // 25/s): requests fall behind their schedule, and their latency, from
    // when each was due, grows — a closed loop would still say 40 ms.
    let (b, _) = http_json(
        dir.path(),
        &[
            &format!("{}/40", serve.base),
            "--rate",
            "50",
            "--connections",
            "1",
            "--duration",
            "3s",
        ],
    );
    assert_eq!(b["mode"], "open");
    let p99 = b["latency_ms"]["p99"].as_f64().unwrap();
    assert!(p99 > 600.0, "the stall is hidden: {b}");
    let warning = b["warnings"].to_string();
    assert!(
        warning.contains("target rate of 50/s was not reached"),
        "{b}"
    );
    // At a rate it can serve, the open loop reports the delay itself.
    let (b, _) = http_json(
        dir.path(),
        &[
            &format!("{}/40", serve.base),
            "--rate",
            "20",
            "--connections",
            "4",
            "--duration",
            "2s",
        ],
    );
    let p50 = b["latency_ms"]["p50"].as_f64().unwrap();
    assert!((40.0..90.0).contains(&p50), "{b}");
    assert!(b["warnings"].as_array().unwrap().is_empty(), "{b}");
    // Nothing listening: failures by kind, and exit 1.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let (b, code) = http_json(
        dir.path(),
        &[&format!("http://127.0.0.1:{port}/"), "--duration", "500ms"],
    );
    assert_eq!(code, Some(1));
    assert!(b["errors"]["connect"].as_u64().unwrap() > 0, "{b}");
    assert_eq!(b["requests"], 0);
}

#[test]
fn bench_http_loads_a_wharf_service_by_name_through_the_ingress() {
    let s = crate::server::Server::start();
    s.push_sample("http_hello", Target::P2, "team/web:v1");
    crate::server::register(
        &s,
        serde_json::json!({"family": "web", "artifact": "team/web:v1", "kind": "http"}),
    );
    let r = s.api(
        "POST",
        "/v1/services",
        Some(
            serde_json::json!({"name": "web", "task_definition": "web", "desired_count": 1,
                                "routes": ["/hello"]}),
        ),
    );
    assert_eq!(r.status, 201, "{r:?}");
    crate::server::converged(&s, "web", 1);
    let out = Command::new(env!("CARGO_BIN_EXE_wharf"))
        .args([
            "bench",
            "http",
            "--service",
            "web",
            "--duration",
            "1s",
            "--connections",
            "2",
            "--output",
            "json",
        ])
        .env("WHARF_SERVER", &s.base)
        .env("WHARF_TOKEN", &s.token)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let results: Value = serde_json::from_slice(&out.stdout).unwrap();
    let b = &results["http"][0];
    let ingress = s.ingress.clone().unwrap();
    assert_eq!(b["url"], format!("{ingress}/hello"));
    assert!(b["status"]["200"].as_u64().unwrap() > 10, "{b}");
    // A service with no route is named in the error.
    let out = Command::new(env!("CARGO_BIN_EXE_wharf"))
        .args(["bench", "http", "--service", "nope", "--duration", "1s"])
        .env("WHARF_SERVER", &s.base)
        .env("WHARF_TOKEN", &s.token)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("404"),
        "{out:?}"
    );
}

/// Pixels of exactly `rgb` in a PNG.
fn pixels_of(png_file: &Path, rgb: [u8; 3]) -> usize {
    let decoder = png::Decoder::new(std::io::BufReader::new(
        std::fs::File::open(png_file).unwrap(),
    ));
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut buf).unwrap();
    let step = info.color_type.samples();
    buf[..info.buffer_size()]
        .chunks(step)
        .filter(|p| p[..3] == rgb)
        .count()
}

#[test]
fn a_report_writes_results_and_an_html_page_whose_plots_chromium_renders() {
    let dir = tempfile::tempdir().unwrap();
    let cpu = wasm("cpu", Target::P1);
    let cpu = cpu.to_str().unwrap();
    let report = dir.path().join("report");
    let base = dir.path().join("base.json");
    let out = bench(
        dir.path(),
        &[
            "run",
            "--runs",
            "25",
            "--name",
            "cpu",
            "--save",
            base.to_str().unwrap(),
            "--report",
            report.to_str().unwrap(),
            cpu,
            "--",
            "100000",
        ],
    );
    assert!(out.status.success(), "{out:?}");
    let saved: Value =
        serde_json::from_slice(&std::fs::read(report.join("results.json")).unwrap()).unwrap();
    assert_eq!(saved["benchmarks"][0]["runs"].as_array().unwrap().len(), 25);
    let md = std::fs::read_to_string(report.join("results.md")).unwrap();
    assert!(md.contains("| cpu |"), "{md}");
    let page = std::fs::read_to_string(report.join("report.html")).unwrap();
    // Self-contained: inline SVG, nothing fetched.
    assert_eq!(page.matches("<svg").count(), 3, "histogram, CDF, timeline");
    assert!(!page.contains("src=\"http") && !page.contains("href=\"http"));
    for title in ["Time per run (total", "Time per run: CDF", "Run by run"] {
        assert!(page.contains(title), "{title}");
    }
    // A comparison adds the side-by-side box plot.
    let compared = dir.path().join("compared");
    let out = bench(
        dir.path(),
        &[
            "compare",
            base.to_str().unwrap(),
            base.to_str().unwrap(),
            "--report",
            compared.to_str().unwrap(),
        ],
    );
    assert!(out.status.success(), "{out:?}");
    let page = std::fs::read_to_string(compared.join("report.html")).unwrap();
    assert!(page.contains("<h2>Comparison</h2>"));
    assert!(page.contains("cpu: total per run"));
    // Chromium renders the plots: the bars and lines are on the screen.
    for (html, shot) in [
        (report.join("report.html"), dir.path().join("run.png")),
        (compared.join("report.html"), dir.path().join("compare.png")),
    ] {
        let out = Command::new("chromium")
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--hide-scrollbars",
                "--window-size=1300,2400",
            ])
            .arg(format!("--screenshot={}", shot.display()))
            .arg(format!("file://{}", html.display()))
            .output()
            .expect("chromium is installed (.ci/run installs it)");
        assert!(shot.is_file(), "no screenshot: {out:?}");
        let blue = pixels_of(&shot, [0x1f, 0x77, 0xb4]);
        let orange = pixels_of(&shot, [0xff, 0x7f, 0x0e]);
        assert!(blue > 2_000, "{}: {blue} blue pixels", html.display());
        assert!(orange > 50, "{}: {orange} orange pixels", html.display());
    }
}

#[test]
fn the_shipped_suite_runs_every_entry_into_one_report() {
    let dir = tempfile::tempdir().unwrap();
    // The testkit builds the samples where the suite's relative paths
    // expect them under --artifacts.
    let hello = wasm("hello", Target::P1);
    let artifacts = hello.ancestors().nth(3).unwrap();
    let suite = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/suite.toml");
    let report = dir.path().join("report");
    let out = bench(
        dir.path(),
        &[
            "suite",
            suite.to_str().unwrap(),
            "--artifacts",
            artifacts.to_str().unwrap(),
            "--output",
            "json",
            "--report",
            report.to_str().unwrap(),
        ],
    );
    assert!(out.status.success(), "{out:?}");
    let results: Value = serde_json::from_slice(&out.stdout).unwrap();
    let names: Vec<&str> = results["benchmarks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "start: hello, p1 module",
            "start: hello, p2 component",
            "start from the disk cache: hello, p2 component",
            "cpu (rounds=1000000)",
            "cpu (rounds=10000000)",
            "memory growth (mib=16)",
            "memory growth (mib=64)",
            "throughput: hello, p1 module, 2 at once",
        ]
    );
    // Two at once: many runs, counted per second.
    let tp = &results["benchmarks"][7];
    assert_eq!(tp["concurrency"], 2);
    assert!(
        tp["runs"].as_array().unwrap().len() > 200,
        "{}",
        tp["runs"].as_array().unwrap().len()
    );
    assert!(
        tp["throughput"].as_f64().unwrap() > 100.0,
        "{}",
        tp["throughput"]
    );
    // From memory, a run does not read the disk cache: loading is far
    // cheaper than reading it again.
    let load = |i: usize| {
        results["benchmarks"][i]["stats"]["load_ms"]["median"]
            .as_f64()
            .unwrap()
    };
    assert!(load(1) * 5.0 < load(2), "{} vs {}", load(1), load(2));
    // Memory growth shows in the peak.
    let peak = |i: usize| {
        results["benchmarks"][i]["stats"]["peak_memory_bytes"]["max"]
            .as_f64()
            .unwrap()
    };
    assert!(peak(5) >= 16.0 * 1048576.0 && peak(6) >= 64.0 * 1048576.0);
    let http = &results["http"][0];
    assert_eq!(http["name"], "http hello (wharf serve, 4 connections)");
    assert!(http["status"]["200"].as_u64().unwrap() > 100, "{http}");
    let page = std::fs::read_to_string(report.join("report.html")).unwrap();
    assert_eq!(page.matches("<svg").count(), 8 * 3 + 3);
}

#[test]
fn compare_with_runs_a_peer_side_by_side_as_whole_processes() {
    let dir = tempfile::tempdir().unwrap();
    let hello = wasm("hello", Target::P1);
    // The peer here is this same wharf, so both sides exist on any machine.
    let peer = format!("{} run {{file}}", env!("CARGO_BIN_EXE_wharf"));
    let results = run_json(
        dir.path(),
        &[
            "--runs",
            "10",
            "--compare-with",
            &peer,
            hello.to_str().unwrap(),
        ],
    );
    let benches = results["benchmarks"].as_array().unwrap();
    assert_eq!(benches.len(), 3);
    assert_eq!(benches[1]["name"], "hello.wasm [wharf run, process]");
    assert!(
        benches[2]["name"]
            .as_str()
            .unwrap()
            .ends_with(" run, process]")
    );
    for b in &benches[1..] {
        assert_eq!(b["process"], true);
        assert_eq!(b["runs"].as_array().unwrap().len(), 10);
        assert_eq!(b["failed"], serde_json::json!({}));
        // A whole process is slower than a run in-process.
        assert!(
            b["stats"]["total_ms"]["median"].as_f64().unwrap()
                > benches[0]["stats"]["total_ms"]["median"].as_f64().unwrap()
        );
    }
    assert!(
        benches[0]["warnings"]
            .to_string()
            .contains("Side by side as whole processes"),
        "{}",
        benches[0]
    );
    let out = bench(
        dir.path(),
        &[
            "run",
            "--compare-with",
            "wasmtime run",
            hello.to_str().unwrap(),
        ],
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("{file}"));
}

#[test]
fn a_suite_serves_an_http_entry_with_a_peer_command_and_names_bad_entries() {
    let dir = tempfile::tempdir().unwrap();
    let hello = wasm("hello", Target::P1);
    let http = wasm("http_hello", Target::P2);
    let exe = env!("CARGO_BIN_EXE_wharf");
    let suite = dir.path().join("suite.toml");
    std::fs::write(
        &suite,
        format!(
            r#"[defaults]
runs = 5

[[bench]]
name = "hello"
artifact = "{}"

[[http]]
name = "peer"
serve = "{}"
command = "{exe} serve --listen {{addr}} {{file}}"
path = "/x"
connections = 2
duration = "1s"
"#,
            hello.display(),
            http.display()
        ),
    )
    .unwrap();
    let out = bench(
        dir.path(),
        &["suite", suite.to_str().unwrap(), "--output", "json"],
    );
    assert!(out.status.success(), "{out:?}");
    let results: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        results["benchmarks"][0]["runs"].as_array().unwrap().len(),
        5
    );
    let peer = &results["http"][0];
    assert!(peer["url"].as_str().unwrap().ends_with("/x"), "{peer}");
    assert!(peer["status"]["200"].as_u64().unwrap() > 10, "{peer}");
    // Mistakes are named: an unknown field, a command that never listens.
    std::fs::write(&suite, "[[bench]]\nname = \"x\"\nartefact = \"a.wasm\"\n").unwrap();
    let out = bench(dir.path(), &["suite", suite.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("artefact"),
        "{out:?}"
    );
    std::fs::write(
        &suite,
        format!(
            "[[http]]\nname = \"x\"\nserve = \"{}\"\ncommand = \"false {{addr}}\"\n",
            http.display()
        ),
    )
    .unwrap();
    let out = bench(dir.path(), &["suite", suite.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("exited"),
        "{out:?}"
    );
}

#[test]
fn cold_runs_each_compile_even_several_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let hello = wasm("hello", Target::P2);
    let results = run_json(
        dir.path(),
        &[
            "--runs",
            "4",
            "--cold",
            "--concurrency",
            "2",
            hello.to_str().unwrap(),
        ],
    );
    let b = &results["benchmarks"][0];
    assert_eq!(b["cold"], true);
    let warm = run_json(dir.path(), &["--runs", "4", hello.to_str().unwrap()]);
    let load = warm["benchmarks"][0]["stats"]["load_ms"]["median"]
        .as_f64()
        .unwrap();
    for r in b["runs"].as_array().unwrap() {
        assert!(r["load_ms"].is_null(), "{r}");
        // A real compile of a component, every time: far more than
        // finding it in memory.
        let compile = r["compile_ms"].as_f64().unwrap();
        assert!(compile > 100.0 * load, "{compile} vs {load}");
        assert!(r["total_ms"].as_f64().unwrap() >= compile);
    }
}

#[test]
fn compare_judges_http_results_by_their_seconds() {
    let dir = tempfile::tempdir().unwrap();
    let slow = wasm("http_slow", Target::P2);
    let serve = crate::serve::serve_target(&[], slow.to_str().unwrap(), &[]);
    let save = |file: &Path, delay: &str| {
        let out = bench(
            dir.path(),
            &[
                "http",
                &format!("{}/{delay}", serve.base),
                "--name",
                "slow",
                "--connections",
                "2",
                "--duration",
                "3s",
                "--save",
                file.to_str().unwrap(),
            ],
        );
        assert!(out.status.success(), "{out:?}");
    };
    let (base, new) = (dir.path().join("base.json"), dir.path().join("new.json"));
    save(&base, "10");
    // The regression: every answer waits three times as long.
    save(&new, "30");
    let out = bench(
        dir.path(),
        &[
            "compare",
            base.to_str().unwrap(),
            new.to_str().unwrap(),
            "--output",
            "json",
        ],
    );
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    let verdict = |metric: &str| {
        report["changes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["metric"] == metric)
            .map(|c| c["verdict"].clone())
            .unwrap_or_else(|| panic!("no {metric} in {report}"))
    };
    assert_eq!(verdict("p50_ms"), "regressed", "{report}");
    assert_eq!(verdict("throughput"), "regressed", "{report}");
    // The other way round it is an improvement, and exits 0.
    let out = bench(
        dir.path(),
        &["compare", new.to_str().unwrap(), base.to_str().unwrap()],
    );
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("improved"), "{text}");
}
