//! The executor: logs while a task runs, stopping, back-pressure.

use std::sync::Arc;
use std::time::Duration;

use wharf_runtime::{Executor, StopCode, TaskHandle, TaskPhase};
use wharf_testkit::Target;

use crate::{load, runtime, spec};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_are_readable_while_running_and_stop_ends_the_task() {
    let rt = runtime();
    let executor = Executor::new(rt.clone(), 4);
    for target in Target::ALL {
        let artifact = load(&rt, "heartbeat", target);
        let (spec, logs) = spec(&["10"]);
        let task = executor.spawn(artifact, spec);
        // Follow the log until three beats arrived, while the task runs.
        let mut next = 0;
        let mut seen = Vec::new();
        while seen.len() < 3 {
            tokio::time::timeout(Duration::from_secs(10), logs.wait_for(next))
                .await
                .expect("a heartbeat within 10s");
            let page = logs.read_from(next, 100);
            next = page.next_seq;
            seen.extend(page.lines.into_iter().map(|l| l.text));
        }
        assert_eq!(&seen[..3], ["heartbeat 0", "heartbeat 1", "heartbeat 2"]);
        stop_a_running_task(task).await;
        // The log is closed once the outcome is known: followers end.
        assert!(logs.read_from(next, usize::MAX).closed);
    }
}

/// `samples/wat/heartbeat.wat`, the guest the memory benchmark holds by
/// the thousand: it beats at once, is blocked in `poll_oneoff` a second
/// between beats, and ends only when stopped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_wat_heartbeat_beats_once_a_second_until_stopped() {
    let rt = runtime();
    let executor = Executor::new(rt.clone(), 4);
    let artifact = rt
        .load_file(&wharf_testkit::wat("heartbeat"))
        .unwrap()
        .artifact;
    let (spec, logs) = spec(&[]);
    let started = std::time::Instant::now();
    let task = executor.spawn(artifact, spec);
    tokio::time::timeout(Duration::from_secs(10), logs.wait_for(1))
        .await
        .expect("a second beat within 10s");
    let between = started.elapsed();
    assert!(between >= Duration::from_millis(900), "{between:?}");
    let lines: Vec<String> = logs.lines().into_iter().map(|l| l.text).collect();
    assert_eq!(&lines[..2], ["heartbeat", "heartbeat"]);
    stop_a_running_task(task).await;
}

/// Asserts `task` is running, stops it, and asserts it ended
/// `UserStopped` within 10 s.
async fn stop_a_running_task(task: TaskHandle) {
    assert_eq!(task.phase(), TaskPhase::Running);
    task.stop();
    let outcome = tokio::time::timeout(Duration::from_secs(10), task.wait())
        .await
        .unwrap();
    assert_eq!(outcome.stop_code, StopCode::UserStopped, "{outcome:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_interrupts_a_busy_loop() {
    let rt = runtime();
    let executor = Executor::new(rt.clone(), 4);
    let (spec, logs) = spec(&[]);
    let task = executor.spawn(load(&rt, "spin", Target::P1), spec);
    tokio::time::timeout(Duration::from_secs(10), logs.wait_for(0))
        .await
        .unwrap();
    task.stop();
    let outcome = tokio::time::timeout(Duration::from_secs(10), task.wait())
        .await
        .unwrap();
    assert_eq!(outcome.stop_code, StopCode::UserStopped);
    assert_eq!(executor.stats().running, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_executor_queues_or_refuses() {
    let rt = runtime();
    let executor = Executor::new(rt.clone(), 2);
    let heartbeat = load(&rt, "heartbeat", Target::P1);
    let running: Vec<_> = (0..2)
        .map(|_| executor.spawn(heartbeat.clone(), spec(&["10"]).0))
        .collect();
    // Wait until both hold their slots.
    while executor.stats().running < 2 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let refused = executor
        .try_spawn(heartbeat.clone(), spec(&["10"]).0)
        .unwrap_err();
    assert_eq!(refused.slots, 2);
    assert!(refused.to_string().contains("all 2 task slots"));

    let hello = load(&rt, "hello", Target::P1);
    let (queued_spec, queued_logs) = spec(&[]);
    let queued = executor.spawn(hello.clone(), queued_spec);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(queued.phase(), TaskPhase::Pending);

    // A queued task can be stopped before it ever starts.
    let doomed = executor.spawn(hello, spec(&[]).0);
    doomed.stop();
    let outcome = doomed.wait().await;
    assert_eq!(outcome.stop_code, StopCode::UserStopped);
    assert_eq!(outcome.message, "stopped before it started");

    running[0].stop();
    let outcome = tokio::time::timeout(Duration::from_secs(10), queued.wait())
        .await
        .unwrap();
    assert_eq!(outcome.stop_code, StopCode::Completed);
    assert_eq!(queued_logs.stdout_text(), "Hello, world!\n");
    for task in running {
        task.stop();
        task.wait().await;
    }
    let stats = executor.stats();
    assert_eq!(stats.running, 0);
    assert_eq!(stats.stopped_with(StopCode::UserStopped), 3);
    assert_eq!(stats.stopped_with(StopCode::Completed), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_retention_is_bounded_for_a_flood() {
    let rt = runtime();
    let executor = Executor::new(rt.clone(), 1);
    let logs = wharf_runtime::LogBuffer::new(64 << 10);
    let mut spec = wharf_runtime::TaskSpec::new(logs.clone());
    spec.args = vec!["32".into()];
    let outcome = executor
        .spawn(load(&rt, "flood", Target::P2), spec)
        .wait()
        .await;
    assert_eq!(outcome.stop_code, StopCode::Completed, "{outcome:?}");
    let page = logs.read_from(0, usize::MAX);
    let retained: usize = page.lines.iter().map(|l| l.text.len()).sum();
    assert!(retained <= 64 << 10, "retained {retained} bytes");
    assert!(
        page.missed > 400_000,
        "evicted lines are counted: {}",
        page.missed
    );
    assert_eq!(page.lines.last().unwrap().text, "flooded 32 MiB");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_short_tasks_share_one_artifact() {
    let rt = runtime();
    let executor = Executor::new(rt.clone(), 64);
    let artifact: Arc<_> = load(&rt, "hello", Target::P2);
    let tasks: Vec<_> = (0..500)
        .map(|_| {
            let (spec, logs) = spec(&[]);
            (executor.spawn(artifact.clone(), spec), logs)
        })
        .collect();
    for (task, logs) in tasks {
        assert_eq!(task.wait().await.stop_code, StopCode::Completed);
        assert_eq!(logs.stdout_text(), "Hello, world!\n");
    }
    assert_eq!(executor.stats().stopped_with(StopCode::Completed), 500);
    assert_eq!(rt.cache_stats().compiled, 1);
}
