//! The soak benchmark: a real `wharf server` under pushes, task runs,
//! service scale changes, log follows and hostile guests at once for
//! `SOAK_SECS` (default 600), sampled every `SAMPLE_SECS` (default 30) for
//! RSS, open fds, state store size, registry size and API p99.
//!
//! `cargo build --release -p wharf && cargo run --release -p wharf-bench --bin soak`
//! Env: `WHARF_BIN` (default target/release/wharf). Prints a Markdown
//! table and writes `target/bench-results/soak.json`. Results and method:
//! `docs/PERFORMANCE.md`, "Soak". A 60-second version runs in the e2e
//! suite (`tests/all/soak.rs`) with bounds checked.

use std::time::Duration;

use wharf_bench::soak::{self, SoakConfig, SoakServer};
use wharf_bench::wharf_bin;

fn env_secs(name: &str, default: u64) -> Duration {
    Duration::from_secs(
        std::env::var(name)
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(default),
    )
}

fn main() {
    let dir = tempfile::tempdir().unwrap();
    let server = SoakServer::start(&wharf_bin(), dir.path(), &[]);
    let config = SoakConfig {
        duration: env_secs("SOAK_SECS", 600),
        sample_every: env_secs("SAMPLE_SECS", 30),
    };
    let samples = soak::run(&server, &config);
    println!(
        "| t (s) | RSS (MiB) | fds | state.db (KiB) | registry (KiB) | API p99 / max (ms) | tasks submitted | errors |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for s in &samples {
        println!(
            "| {:.0} | {:.1} | {} | {} | {} | {:.1} / {:.1} | {} | {} |",
            s.at_s,
            s.rss_kib as f64 / 1024.0,
            s.fds,
            s.state_bytes / 1024,
            s.registry_bytes / 1024,
            s.api_p99_ms,
            s.api_max_ms,
            s.tasks_submitted,
            s.errors
        );
    }
    let out = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench-results");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(
        out.join("soak.json"),
        serde_json::to_string_pretty(&samples).unwrap(),
    )
    .unwrap();
}
