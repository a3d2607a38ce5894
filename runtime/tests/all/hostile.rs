//! A few hundred hostile tasks at once under limits: each ends with the
//! stop code its behaviour earns, and the executor is healthy afterwards.

use std::time::Duration;

use wharf_runtime::{Executor, Limits, StopCode};
use wharf_testkit::Target;

use crate::{load, runtime, spec};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_tasks_get_the_right_stop_codes_and_the_executor_survives() {
    let rt = runtime();
    let executor = Executor::new(rt.clone(), 128);
    // Every task has a memory limit and a timeout: a short one for the
    // tasks that must time out, a long one (the 2 cores are shared by 128
    // slots) for the others; the CPU kernel also has a fuel budget far
    // below what its rounds need.
    let (short, long) = (
        Some(Duration::from_millis(500)),
        Some(Duration::from_secs(60)),
    );
    let fuel = Some(20_000_000);
    // (sample, args, fuel, timeout, stop code it must end with)
    type Kind = (
        &'static str,
        &'static [&'static str],
        Option<u64>,
        Option<Duration>,
        StopCode,
    );
    let kinds: [Kind; 6] = [
        ("spin", &[], None, short, StopCode::Timeout),
        ("memhog", &[], None, long, StopCode::MemoryLimit),
        ("recurse", &[], None, long, StopCode::Trap),
        ("cpu", &["1000000000"], fuel, long, StopCode::OutOfFuel),
        ("heartbeat", &["20"], None, short, StopCode::Timeout),
        ("trap", &[], None, long, StopCode::Trap),
    ];
    let mut tasks = Vec::new();
    for i in 0..300 {
        let (sample, args, fuel, timeout, expected) = kinds[i % kinds.len()];
        let target = if i % 2 == 0 { Target::P1 } else { Target::P2 };
        let (mut spec, _) = spec(args);
        spec.limits = Limits {
            fuel,
            memory: Some(16 << 20),
            timeout,
        };
        tasks.push((
            sample,
            target,
            expected,
            executor.spawn(load(&rt, sample, target), spec),
        ));
    }
    for (sample, target, expected, task) in tasks {
        let outcome = tokio::time::timeout(Duration::from_secs(120), task.wait())
            .await
            .expect("task ends");
        assert_eq!(
            outcome.stop_code, expected,
            "{sample} {target:?}: {outcome:?}"
        );
        assert!(outcome.peak_memory_bytes <= 16 << 20, "{outcome:?}");
    }

    let stats = executor.stats();
    assert_eq!(stats.running, 0);
    assert_eq!(stats.started, 300);
    assert_eq!(stats.stopped.iter().sum::<u64>(), 300);

    // Still healthy: ordinary tasks run to completion on every slot.
    let hello = load(&rt, "hello", Target::P2);
    let again: Vec<_> = (0..128)
        .map(|_| executor.spawn(hello.clone(), spec(&[]).0))
        .collect();
    for task in again {
        assert_eq!(task.wait().await.stop_code, StopCode::Completed);
    }
}
