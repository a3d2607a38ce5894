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
    let limits = Limits {
        fuel: Some(200_000_000),
        memory: Some(16 << 20),
        timeout: Some(Duration::from_millis(500)),
    };
    // (sample, args, stop code it must end with)
    let kinds: [(&str, &[&str], StopCode); 6] = [
        ("spin", &[], StopCode::Timeout),
        ("memhog", &[], StopCode::MemoryLimit),
        ("recurse", &[], StopCode::Trap),
        ("cpu", &["1000000000"], StopCode::OutOfFuel),
        ("heartbeat", &["20"], StopCode::Timeout),
        ("trap", &[], StopCode::Trap),
    ];
    let mut tasks = Vec::new();
    for i in 0..300 {
        let (sample, args, expected) = kinds[i % kinds.len()];
        let target = if i % 2 == 0 { Target::P1 } else { Target::P2 };
        let (mut spec, _) = spec(args);
        spec.limits = limits;
        tasks.push((sample, target, expected, executor.spawn(load(&rt, sample, target), spec)));
    }
    for (sample, target, expected, task) in tasks {
        let outcome = tokio::time::timeout(Duration::from_secs(120), task.wait()).await.expect("task ends");
        assert_eq!(outcome.stop_code, expected, "{sample} {target:?}: {outcome:?}");
        assert!(outcome.peak_memory_bytes <= 16 << 20, "{outcome:?}");
    }

    let stats = executor.stats();
    assert_eq!(stats.running, 0);
    assert_eq!(stats.started, 300);
    assert_eq!(stats.stopped.iter().sum::<u64>(), 300);

    // Still healthy: ordinary tasks run to completion on every slot.
    let hello = load(&rt, "hello", Target::P2);
    let again: Vec<_> = (0..128).map(|_| executor.spawn(hello.clone(), spec(&[]).0)).collect();
    for task in again {
        assert_eq!(task.wait().await.stop_code, StopCode::Completed);
    }
}
