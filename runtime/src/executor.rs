//! Runs many tasks at once on tokio with a bounded number of slots and a
//! memory budget.
//!
//! A task holds a slot from instantiation to teardown. When every slot is
//! taken, [`Executor::spawn`] queues the task until one frees (the task is
//! `Pending` meanwhile) and [`Executor::try_spawn`] refuses at once with
//! [`Busy`]. Slots never exceed the instance pool, so a pool-exhausted
//! error cannot surface from load.
//!
//! A task also reserves its memory limit from the node's budget before it
//! starts: tasks wait `Pending` while the budget is spent, and a task whose
//! limit exceeds the whole budget fails at once with a message naming it.
//! The reservation is the limit, not what the guest touched, so a node can
//! never be pushed past its budget however its guests grow.
//!
//! With [`ExecutorConfig::guest_threads`] set, guest code runs on the
//! executor's own tokio runtime, so a busy guest never delays the caller's
//! runtime (the control plane's HTTP API); the kernel shares the cores
//! between the two sets of threads. Every finished task is counted by stop
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

/// Refusal from [`Executor::try_admit`]: the node cannot take one more
/// request now.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// Every slot (instance of the pool) is in use.
    #[error("all {0} instance slots on this node are in use")]
    Slots(usize),
    /// The memory budget has no room for the request's memory limit.
    #[error("the node's memory budget has no room for {0} more bytes")]
    Memory(u64),
}

/// One request's hold on the node: a slot and its memory reservation,
/// released when dropped.
#[derive(Debug)]
pub struct Admission {
    _memory: Option<Reservation>,
    _slot: OwnedSemaphorePermit,
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
    /// Bytes of the memory budget reserved by admitted tasks.
    pub memory_reserved: u64,
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

/// How an [`Executor`] admits and places tasks.
#[derive(Debug, Clone, Default)]
pub struct ExecutorConfig {
    /// Concurrent tasks, capped at the runtime's `max_instances`
    /// (0 means the cap).
    pub slots: usize,
    /// Bytes of linear memory the running tasks may reserve together: a
    /// task reserves its memory limit (or the runtime's `max_task_memory`
    /// when it sets none). `None`: no budget beyond the pool.
    pub memory_budget: Option<u64>,
    /// Threads of the executor's own runtime for guest code. `None`: tasks
    /// run on the runtime of whoever calls [`Executor::spawn`].
    pub guest_threads: Option<usize>,
}

/// The unit of memory reservations: a WebAssembly page. Budgets and limits
/// are rounded up to it, and a `u32` of pages covers 256 TiB.
const PAGE: u64 = 64 << 10;

fn pages(bytes: u64) -> u32 {
    u32::try_from(bytes.div_ceil(PAGE)).unwrap_or(u32::MAX)
}

#[derive(Debug)]
struct MemoryBudget {
    bytes: u64,
    pages: Arc<Semaphore>,
    /// Signalled whenever a reservation ends.
    freed: Arc<Notify>,
}

/// Pages of the budget held by one task; returned, and waiters woken,
/// when it is dropped.
#[derive(Debug)]
struct Reservation {
    permit: Option<OwnedSemaphorePermit>,
    freed: Arc<Notify>,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        drop(self.permit.take());
        self.freed.notify_waiters();
    }
}

impl MemoryBudget {
    /// Waits until `n` pages are free and takes them, or `None` once `stop`
    /// fires. Tasks are admitted as soon as they fit, not in arrival
    /// order: a large task waiting for room never holds back smaller ones
    /// that fit now (the tokio semaphore alone is first-come, first-served,
    /// so one large waiter would stall every start behind it).
    async fn reserve(&self, n: u32, stop: &StopSignal) -> Option<Reservation> {
        // The common case takes its pages at once, without registering on
        // `freed` (a lock on its waiter list to enter and one to leave).
        if let Some(r) = self.try_reserve(n) {
            return Some(r);
        }
        loop {
            let freed = self.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            if let Some(r) = self.try_reserve(n) {
                return Some(r);
            }
            tokio::select! {
                biased;
                () = stop.wait() => return None,
                () = freed => {}
            }
        }
    }

    /// Takes `n` pages if they are free now.
    fn try_reserve(&self, n: u32) -> Option<Reservation> {
        let permit = self.pages.clone().try_acquire_many_owned(n).ok()?;
        Some(Reservation {
            permit: Some(permit),
            freed: self.freed.clone(),
        })
    }
}

/// The executor's own runtime for guest code. Shut down in the background
/// when the last executor handle goes, which is allowed from async code
/// (dropping a runtime there would panic).
#[derive(Debug)]
struct GuestRuntime(Option<tokio::runtime::Runtime>);

impl GuestRuntime {
    fn handle(&self) -> &tokio::runtime::Handle {
        self.0.as_ref().expect("taken only on drop").handle()
    }
}

impl Drop for GuestRuntime {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

/// A per-node pool of task slots over a [`Runtime`].
#[derive(Debug, Clone)]
pub struct Executor {
    shared: Arc<Shared>,
    guests: Option<Arc<GuestRuntime>>,
}

/// What a task's future needs of its executor, behind one reference: a
/// task takes one reference count, not one per part (the parts' counts
/// are atomics every worker touches at every start and end).
#[derive(Debug)]
struct Shared {
    runtime: Arc<Runtime>,
    slots: Arc<Semaphore>,
    slot_count: usize,
    memory: Option<MemoryBudget>,
    counters: Counters,
}

/// A task's phase and the wake-up of those waiting on it, in one
/// allocation.
#[derive(Debug)]
struct Phase {
    state: AtomicU8,
    changed: Notify,
}

/// A running (or queued, or finished) task.
#[derive(Debug)]
pub struct TaskHandle {
    logs: Option<Arc<LogBuffer>>,
    stop: Arc<StopSignal>,
    phase: Arc<Phase>,
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
        match self.phase.state.load(Ordering::Acquire) {
            0 => TaskPhase::Pending,
            1 => TaskPhase::Running,
            _ => TaskPhase::Stopped,
        }
    }

    /// Resolves once the task has left `Pending` (it holds a slot, or it
    /// ended without one).
    pub async fn started(&self) {
        loop {
            let changed = self.phase.changed.notified();
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

impl Shared {
    async fn run_in_slot(
        &self,
        artifact: &Artifact,
        spec: &TaskSpec,
        stop: &Arc<StopSignal>,
        phase: &Phase,
        permit: Option<OwnedSemaphorePermit>,
    ) -> Outcome {
        let stopped = || Outcome::not_started(StopCode::UserStopped, "stopped before it started");
        // Memory first, then a slot: a task waiting for memory holds no
        // slot that a smaller task could use.
        let _memory = match &self.memory {
            None => None,
            Some(budget) => {
                let limit = spec
                    .limits
                    .memory
                    .unwrap_or(self.runtime.config().max_task_memory);
                if pages(limit) > pages(budget.bytes) {
                    return Outcome::not_started(
                        StopCode::FailedToStart,
                        format!(
                            "the task's memory limit of {limit} bytes exceeds this node's memory budget of {} bytes",
                            budget.bytes
                        ),
                    );
                }
                match budget.reserve(pages(limit), stop).await {
                    Some(r) => Some(r),
                    None => return stopped(),
                }
            }
        };
        // A slot taken by `try_spawn`, or one borrowed from the shared
        // semaphore (no reference count to take).
        let _taken = permit;
        // A free slot is taken at once; only a task that has to wait for
        // one listens for its stop signal meanwhile (registering that
        // listener locks the signal's waiter list, twice per task).
        let _slot = match &_taken {
            Some(_) => None,
            None => Some(match self.slots.try_acquire() {
                Ok(p) => p,
                Err(_) => tokio::select! {
                    biased;
                    () = stop.wait() => return stopped(),
                    p = self.slots.acquire() => p.expect("the slot semaphore is never closed"),
                },
            }),
        };
        // A stop that raced the waits above wins before any guest code runs.
        if stop.is_stopped() {
            return stopped();
        }
        phase.state.store(1, Ordering::Release);
        phase.changed.notify_waiters();
        self.counters.started.fetch_add(1, Ordering::Relaxed);
        self.runtime.run_with_stop(artifact, spec, stop).await
    }
}

impl Executor {
    /// An executor with `slots` concurrent tasks, capped at the runtime's
    /// `max_instances`, no memory budget, running guests on the caller's
    /// tokio runtime.
    pub fn new(runtime: Arc<Runtime>, slots: usize) -> Self {
        Self::with_config(
            runtime,
            &ExecutorConfig {
                slots,
                ..ExecutorConfig::default()
            },
        )
        .expect("no guest runtime to start")
    }

    /// An executor as `config` says; fails only if the guest threads
    /// cannot be started.
    pub fn with_config(runtime: Arc<Runtime>, config: &ExecutorConfig) -> crate::Result<Self> {
        let max = runtime.config().max_instances as usize;
        let slot_count = match config.slots {
            0 => max,
            n => n.clamp(1, max),
        };
        let guests = match config.guest_threads {
            Some(threads) => Some(Arc::new(GuestRuntime(Some(
                tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(threads.max(1))
                    .thread_name("wharf-guest")
                    .enable_all()
                    .build()
                    .map_err(|e| {
                        crate::Error::Engine(format!("cannot start guest threads: {e}"))
                    })?,
            )))),
            None => None,
        };
        Ok(Executor {
            shared: Arc::new(Shared {
                runtime,
                slots: Arc::new(Semaphore::new(slot_count)),
                slot_count,
                memory: config.memory_budget.map(|bytes| MemoryBudget {
                    bytes,
                    pages: Arc::new(Semaphore::new(pages(bytes) as usize)),
                    freed: Arc::new(Notify::new()),
                }),
                counters: Counters {
                    started: AtomicU64::new(0),
                    stopped: Default::default(),
                },
            }),
            guests,
        })
    }

    /// The runtime tasks run on.
    pub fn runtime(&self) -> &Arc<Runtime> {
        &self.shared.runtime
    }

    /// Starts `artifact` under `spec`; if no slot is free the task waits
    /// for one (phase `Pending`). Must be called within a tokio runtime.
    pub fn spawn(&self, artifact: Arc<Artifact>, spec: TaskSpec) -> TaskHandle {
        self.start(artifact, spec, None)
    }

    /// Like [`spawn`](Self::spawn) but refuses at once when every slot is
    /// in use (a task that does not fit the memory budget still waits).
    pub fn try_spawn(&self, artifact: Arc<Artifact>, spec: TaskSpec) -> Result<TaskHandle, Busy> {
        let permit = self
            .shared
            .slots
            .clone()
            .try_acquire_owned()
            .map_err(|_| Busy {
                slots: self.shared.slot_count,
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
        let phase = Arc::new(Phase {
            state: AtomicU8::new(0),
            changed: Notify::new(),
        });
        let logs = match &spec.stdio {
            Stdio::Capture(logs) => Some(logs.clone()),
            Stdio::Inherit => None,
        };
        let task = {
            // The task holds the shared state, not the guest runtime: the
            // last handle to that must not be dropped on one of its own
            // threads.
            let (shared, stop, phase) = (self.shared.clone(), stop.clone(), phase.clone());
            async move {
                let outcome = shared
                    .run_in_slot(&artifact, &spec, &stop, &phase, permit)
                    .await;
                if let Stdio::Capture(logs) = &spec.stdio {
                    logs.close();
                }
                shared.counters.stopped[outcome.stop_code as usize].fetch_add(1, Ordering::Relaxed);
                phase.state.store(2, Ordering::Release);
                phase.changed.notify_waiters();
                outcome
            }
        };
        let join = match &self.guests {
            Some(guests) => guests.handle().spawn(task),
            None => tokio::spawn(task),
        };
        TaskHandle {
            logs,
            stop,
            phase,
            join,
        }
    }

    /// Admits one short-lived instance (an HTTP request) at once, or
    /// refuses: it takes a slot, and its memory limit (`None`: the
    /// runtime's per-task maximum) from the budget. Nothing waits, so a
    /// burst is refused (503) instead of queueing without bound.
    pub fn try_admit(&self, memory: Option<u64>) -> Result<Admission, Refused> {
        let reservation = match &self.shared.memory {
            None => None,
            Some(budget) => {
                let limit = memory.unwrap_or(self.shared.runtime.config().max_task_memory);
                match budget.try_reserve(pages(limit)) {
                    Some(r) => Some(r),
                    None => return Err(Refused::Memory(limit)),
                }
            }
        };
        let slot = self
            .shared
            .slots
            .clone()
            .try_acquire_owned()
            .map_err(|_| Refused::Slots(self.shared.slot_count))?;
        Ok(Admission {
            _memory: reservation,
            _slot: slot,
        })
    }

    /// Runs `future` where this executor runs guests: on its guest
    /// threads if it has them, else on the caller's runtime. A task's
    /// driver runs there too, so handing it to its sandbox and hearing it
    /// end are wake-ups within one runtime, not across two.
    pub fn spawn_beside<F>(&self, future: F) -> JoinHandle<F::Output>
    where
        F: std::future::Future + Send + 'static,
        F::Output: Send + 'static,
    {
        match &self.guests {
            Some(guests) => guests.handle().spawn(future),
            None => tokio::spawn(future),
        }
    }

    /// The memory budget, if there is one.
    pub fn memory_budget(&self) -> Option<u64> {
        self.shared.memory.as_ref().map(|m| m.bytes)
    }

    /// Total slots.
    pub fn slots(&self) -> usize {
        self.shared.slot_count
    }

    /// What the executor has done so far.
    pub fn stats(&self) -> ExecutorStats {
        let mut stopped = [0; StopCode::ALL.len()];
        for (n, counter) in stopped.iter_mut().zip(&self.shared.counters.stopped) {
            *n = counter.load(Ordering::Relaxed);
        }
        ExecutorStats {
            started: self.shared.counters.started.load(Ordering::Relaxed),
            stopped,
            running: self.shared.slot_count - self.shared.slots.available_permits(),
            memory_reserved: self.shared.memory.as_ref().map_or(0, |m| {
                (pages(m.bytes) as usize - m.pages.available_permits()) as u64 * PAGE
            }),
        }
    }
}
