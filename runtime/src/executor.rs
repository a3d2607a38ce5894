//! Runs many tasks at once on tokio with a bounded number of slots.
//!
//! A task holds a slot from instantiation to teardown. When every slot is
//! taken, [`Executor::spawn`] queues the task until one frees (the task is
//! `Pending` meanwhile) and [`Executor::try_spawn`] refuses at once with
//! [`Busy`]. Slots never exceed the instance pool, so a pool-exhausted
//! error cannot surface from load. Every finished task is counted by stop
//! code.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};

use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;

use crate::Runtime;
use crate::artifact::Artifact;
use crate::logs::LogBuffer;
use crate::outcome::{Outcome, StopCode};
use crate::sandbox::{Stdio, StopSignal, TaskSpec};

/// Where a task is in its life on this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskPhase {
    /// Waiting for a slot.
    Pending,
    /// Holding a slot: instantiating or running.
    Running,
    /// Finished; the outcome is ready.
    Stopped,
}

/// Refusal from [`Executor::try_spawn`]: every slot is in use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("all {slots} task slots on this node are in use")]
pub struct Busy {
    /// The executor's slot count.
    pub slots: usize,
}

/// Counters of an executor's work.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExecutorStats {
    /// Tasks that took a slot.
    pub started: u64,
    /// Finished tasks by stop code, in [`StopCode::ALL`] order.
    pub stopped: [u64; StopCode::ALL.len()],
    /// Slots currently held.
    pub running: usize,
}

impl ExecutorStats {
    /// Finished tasks with `code`.
    pub fn stopped_with(&self, code: StopCode) -> u64 {
        self.stopped[code as usize]
    }
}

#[derive(Debug)]
struct Counters {
    started: AtomicU64,
    stopped: [AtomicU64; StopCode::ALL.len()],
}

/// A per-node pool of task slots over a [`Runtime`].
#[derive(Debug, Clone)]
pub struct Executor {
    runtime: Arc<Runtime>,
    slots: Arc<Semaphore>,
    slot_count: usize,
    counters: Arc<Counters>,
}

/// A running (or queued, or finished) task.
#[derive(Debug)]
pub struct TaskHandle {
    logs: Option<Arc<LogBuffer>>,
    stop: Arc<StopSignal>,
    phase: Arc<AtomicU8>,
    phase_changed: Arc<Notify>,
    join: JoinHandle<Outcome>,
}

impl TaskHandle {
    /// The task's output, readable while it runs (`None` for inherited
    /// stdio).
    pub fn logs(&self) -> Option<&Arc<LogBuffer>> {
        self.logs.as_ref()
    }

    /// Asks the task to stop; it ends with `UserStopped`. A queued task
    /// ends without starting.
    pub fn stop(&self) {
        self.stop.stop();
    }

    /// A clonable stop handle, for stopping from elsewhere.
    pub fn stop_signal(&self) -> Arc<StopSignal> {
        self.stop.clone()
    }

    /// Where the task is now.
    pub fn phase(&self) -> TaskPhase {
        match self.phase.load(Ordering::Acquire) {
            0 => TaskPhase::Pending,
            1 => TaskPhase::Running,
            _ => TaskPhase::Stopped,
        }
    }

    /// Resolves once the task has left `Pending` (it holds a slot, or it
    /// ended without one).
    pub async fn started(&self) {
        loop {
            let changed = self.phase_changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if self.phase() != TaskPhase::Pending {
                return;
            }
            changed.await;
        }
    }

    /// Waits for the task's outcome.
    pub async fn wait(self) -> Outcome {
        match self.join.await {
            Ok(outcome) => outcome,
            // Tasks do not panic on guest behaviour; if the host code around
            // them did, report it as a trap instead of tearing down the caller.
            Err(error) => Outcome::not_started(StopCode::Trap, format!("internal error: {error}")),
        }
    }
}

impl Executor {
    /// An executor with `slots` concurrent tasks, capped at the runtime's
    /// `max_instances`.
    pub fn new(runtime: Arc<Runtime>, slots: usize) -> Self {
        let slot_count = slots.clamp(1, runtime.config().max_instances as usize);
        Executor {
            runtime,
            slots: Arc::new(Semaphore::new(slot_count)),
            slot_count,
            counters: Arc::new(Counters {
                started: AtomicU64::new(0),
                stopped: Default::default(),
            }),
        }
    }

    /// The runtime tasks run on.
    pub fn runtime(&self) -> &Arc<Runtime> {
        &self.runtime
    }

    /// Starts `artifact` under `spec`; if no slot is free the task waits
    /// for one (phase `Pending`). Must be called within a tokio runtime.
    pub fn spawn(&self, artifact: Arc<Artifact>, spec: TaskSpec) -> TaskHandle {
        self.start(artifact, spec, None)
    }

    /// Like [`spawn`](Self::spawn) but refuses instead of queueing.
    pub fn try_spawn(&self, artifact: Arc<Artifact>, spec: TaskSpec) -> Result<TaskHandle, Busy> {
        let permit = self.slots.clone().try_acquire_owned().map_err(|_| Busy {
            slots: self.slot_count,
        })?;
        Ok(self.start(artifact, spec, Some(permit)))
    }

    fn start(
        &self,
        artifact: Arc<Artifact>,
        spec: TaskSpec,
        permit: Option<OwnedSemaphorePermit>,
    ) -> TaskHandle {
        let stop = StopSignal::new();
        let phase = Arc::new(AtomicU8::new(0));
        let phase_changed = Arc::new(Notify::new());
        let logs = match &spec.stdio {
            Stdio::Capture(logs) => Some(logs.clone()),
            Stdio::Inherit => None,
        };
        let join = tokio::spawn({
            let (this, stop, phase, changed, logs) = (
                self.clone(),
                stop.clone(),
                phase.clone(),
                phase_changed.clone(),
                logs.clone(),
            );
            async move {
                let outcome = this
                    .run_in_slot(&artifact, &spec, &stop, &phase, &changed, permit)
                    .await;
                if let Some(logs) = logs {
                    logs.close();
                }
                this.counters.stopped[outcome.stop_code as usize].fetch_add(1, Ordering::Relaxed);
                phase.store(2, Ordering::Release);
                changed.notify_waiters();
                outcome
            }
        });
        TaskHandle {
            logs,
            stop,
            phase,
            phase_changed,
            join,
        }
    }

    async fn run_in_slot(
        &self,
        artifact: &Artifact,
        spec: &TaskSpec,
        stop: &StopSignal,
        phase: &AtomicU8,
        phase_changed: &Notify,
        permit: Option<OwnedSemaphorePermit>,
    ) -> Outcome {
        let _permit = match permit {
            Some(p) => p,
            None => tokio::select! {
                biased;
                p = self.slots.clone().acquire_owned() => p.expect("the slot semaphore is never closed"),
                () = stop.wait() => {
                    return Outcome::not_started(StopCode::UserStopped, "stopped before it started");
                }
            },
        };
        phase.store(1, Ordering::Release);
        phase_changed.notify_waiters();
        self.counters.started.fetch_add(1, Ordering::Relaxed);
        self.runtime.run_with_stop(artifact, spec, stop).await
    }

    /// Total slots.
    pub fn slots(&self) -> usize {
        self.slot_count
    }

    /// What the executor has done so far.
    pub fn stats(&self) -> ExecutorStats {
        let mut stopped = [0; StopCode::ALL.len()];
        for (n, counter) in stopped.iter_mut().zip(&self.counters.stopped) {
            *n = counter.load(Ordering::Relaxed);
        }
        ExecutorStats {
            started: self.counters.started.load(Ordering::Relaxed),
            stopped,
            running: self.slot_count - self.slots.available_permits(),
        }
    }
}
