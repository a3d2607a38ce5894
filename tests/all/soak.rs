//! Sixty seconds of everything at once against one server — pushes, task
//! runs, scale changes, log follows, endless loops, memory bombs, output
//! floods, endless recursion — and nothing grows without bound: memory,
//! file descriptors and the state store level off, and the API keeps
//! answering. The long version with its figures is the `soak` benchmark.

use std::time::Duration;

use wharf_bench::soak::{self, SoakConfig, SoakServer};

#[test]
fn a_minute_of_mixed_and_hostile_load_grows_nothing_without_bound() {
    let dir = tempfile::tempdir().unwrap();
    let server = SoakServer::start(
        std::path::Path::new(env!("CARGO_BIN_EXE_wharf")),
        dir.path(),
        // A small output budget, so that pruning happens within the minute.
        &["--keep-task-output", "16MiB"],
    );
    let samples = soak::run(
        &server,
        &SoakConfig {
            duration: Duration::from_secs(60),
            sample_every: Duration::from_secs(5),
        },
    );
    let report = format!("{samples:#?}");
    assert!(samples.len() >= 10, "{report}");
    let last = samples.last().unwrap();
    assert!(last.tasks_submitted >= 30, "too little load ran: {report}");
    assert_eq!(last.errors, 0, "API calls failed under load: {report}");
    // After the first third the footprint levels off: the rest may not
    // run away from it (an unbounded log kept 980 MB before it was fixed).
    let warm = &samples[samples.len() / 3];
    let rss_cap = warm.rss_kib * 2 + (64 << 10);
    let fd_cap = warm.fds + 64;
    for s in &samples[samples.len() / 3..] {
        assert!(
            s.rss_kib <= rss_cap,
            "RSS grew past {rss_cap} KiB: {report}"
        );
        assert!(s.fds <= fd_cap, "open fds grew past {fd_cap}: {report}");
        // 16 MiB of output, the task records and the WAL between
        // checkpoints; without pruning a minute of floods stores more.
        assert!(s.state_bytes < 64 << 20, "the state store grew: {report}");
        assert!(s.api_max_ms < 5_000.0, "the API stalled: {report}");
    }
}
