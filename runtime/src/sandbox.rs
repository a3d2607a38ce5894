//! One task in one sandbox: a fresh `Store` with its own WASI context that
//! grants only what the [`TaskSpec`] grants, a memory limiter, a fuel
//! budget and a wall-clock deadline; then the run, and the mapping of how
//! it ended to an [`Outcome`].

use std::convert::Infallible;
use std::future::Future;
use std::path::PathBuf;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rand::{TryCryptoRng, TryRng};
use tokio::sync::Notify;
use wasmtime::component::ResourceTable;
use wasmtime::{Engine, Store, Trap, UpdateDeadline};
use wasmtime_wasi::p1::WasiP1Ctx;
use wasmtime_wasi::{FsPerms, I32Exit, WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

use crate::artifact::{Artifact, Prepared};
use crate::limits::{Limits, MemoryLimiter};
use crate::logs::{LogBuffer, LogStream, Stream};
use crate::outcome::{Outcome, StopCode};

/// A host directory made visible to the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirGrant {
    /// The directory on the host.
    pub host: PathBuf,
    /// Where the guest sees it (an absolute guest path such as `/data`).
    pub guest: String,
    /// Whether the guest may only read.
    pub read_only: bool,
}

impl DirGrant {
    /// Parses the CLI form `HOST[:GUEST][:ro]`; the guest path defaults to
    /// the host path, as in `wasmtime run --dir`.
    pub fn parse(text: &str) -> crate::Result<DirGrant> {
        let (rest, read_only) = match text.strip_suffix(":ro") {
            Some(rest) => (rest, true),
            None => (text, false),
        };
        let (host, guest) = match rest.split_once(':') {
            Some((host, guest)) => (host, guest),
            None => (rest, rest),
        };
        if host.is_empty() || guest.is_empty() {
            return Err(crate::Error::InvalidInput(format!(
                "invalid directory grant {text:?}: expected HOST[:GUEST][:ro]"
            )));
        }
        Ok(DirGrant {
            host: host.into(),
            guest: guest.into(),
            read_only,
        })
    }
}

/// Where the guest's standard streams go.
#[derive(Debug, Clone)]
pub enum Stdio {
    /// Into a bounded, followable [`LogBuffer`]; stdin is empty.
    Capture(Arc<LogBuffer>),
    /// The host process's own stdin, stdout and stderr (for `wharf run`).
    Inherit,
}

/// Everything a task is granted and limited to. Nothing else reaches the
/// guest: no environment, no files, no network.
#[derive(Debug, Clone)]
pub struct TaskSpec {
    /// `argv[0]` as the guest sees it.
    pub program: String,
    /// Arguments after `argv[0]`.
    pub args: Vec<String>,
    /// Environment variables.
    pub env: Vec<(String, String)>,
    /// Pre-opened directories.
    pub dirs: Vec<DirGrant>,
    /// Fuel, memory and time limits.
    pub limits: Limits,
    /// Where output goes.
    pub stdio: Stdio,
}

impl TaskSpec {
    /// A spec that grants nothing and captures output into `logs`.
    pub fn new(logs: Arc<LogBuffer>) -> Self {
        TaskSpec {
            program: "main.wasm".into(),
            args: Vec::new(),
            env: Vec::new(),
            dirs: Vec::new(),
            limits: Limits::default(),
            stdio: Stdio::Capture(logs),
        }
    }
}

/// Asks a task to stop; the task ends with `UserStopped` (or another stop
/// code its owner chooses, such as `ScaledDown`).
#[derive(Debug, Default)]
pub struct StopSignal {
    stopped: AtomicBool,
    notify: Notify,
}

impl StopSignal {
    /// A signal that has not fired.
    pub fn new() -> Arc<Self> {
        Arc::default()
    }

    /// Fires the signal. Idempotent.
    pub fn stop(&self) {
        self.stopped.store(true, Ordering::Release);
        self.notify.notify_waiters();
    }

    /// Whether [`stop`](Self::stop) was called.
    pub fn is_stopped(&self) -> bool {
        self.stopped.load(Ordering::Acquire)
    }

    /// Resolves once the signal fires.
    pub async fn wait(&self) {
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.is_stopped() {
                return;
            }
            notified.await;
        }
    }
}

pub(crate) struct P1State {
    pub(crate) wasi: WasiP1Ctx,
    limiter: MemoryLimiter,
}

pub(crate) struct P2State {
    wasi: WasiCtx,
    table: ResourceTable,
    limiter: MemoryLimiter,
}

impl WasiView for P2State {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

pub(crate) trait HasLimiter: Send + 'static {
    fn limiter(&mut self) -> &mut MemoryLimiter;
}

impl HasLimiter for P1State {
    fn limiter(&mut self) -> &mut MemoryLimiter {
        &mut self.limiter
    }
}

impl HasLimiter for P2State {
    fn limiter(&mut self) -> &mut MemoryLimiter {
        &mut self.limiter
    }
}

/// WASI's secure randomness: the calling thread's generator (`rand`'s
/// ChaCha12, reseeded from the OS) through a stateless handle. The
/// default is a ChaCha12 of the context's own, 320 bytes a task holds for
/// as long as it runs. Not the OS generator itself (`SysRng`): WASI draws
/// a guest's bytes one at a time, which would be a system call per byte.
struct ThreadRandom;

impl TryRng for ThreadRandom {
    type Error = Infallible;

    fn try_next_u32(&mut self) -> Result<u32, Infallible> {
        rand::rng().try_next_u32()
    }

    fn try_next_u64(&mut self) -> Result<u64, Infallible> {
        rand::rng().try_next_u64()
    }

    fn try_fill_bytes(&mut self, dst: &mut [u8]) -> Result<(), Infallible> {
        rand::rng().try_fill_bytes(dst)
    }
}

impl TryCryptoRng for ThreadRandom {}

/// WASI's own cap on one call for random bytes (wasmtime-wasi's default).
const MAX_RANDOM_CALL: u64 = 64 << 20;

/// The WASI context of a task whose linear memory may grow to
/// `memory_limit` bytes.
pub(crate) fn wasi_builder(spec: &TaskSpec, memory_limit: u64) -> Result<WasiCtxBuilder, String> {
    let mut b = WasiCtxBuilder::new();
    b.arg(&spec.program).args(&spec.args).envs(&spec.env);
    b.secure_random(ThreadRandom);
    // The host fills a call's random bytes in a buffer of its own before
    // copying them into the guest, outside the guest's memory limit: no
    // call may ask for more than the guest could ever hold (larger traps).
    b.max_random_size(memory_limit.min(MAX_RANDOM_CALL));
    // Closed by default: no network, even if a later WASI default changes.
    b.allow_tcp(false)
        .allow_udp(false)
        .allow_ip_name_lookup(false);
    for dir in &spec.dirs {
        let perms = if dir.read_only {
            FsPerms::ReadOnly
        } else {
            FsPerms::ReadWrite
        };
        b.preopened_dir(&dir.host, &dir.guest, perms)
            .map_err(|e| format!("cannot grant directory {}: {e:#}", dir.host.display()))?;
    }
    match &spec.stdio {
        Stdio::Capture(logs) => {
            b.stdout(LogStream::new(logs.clone(), Stream::Stdout));
            b.stderr(LogStream::new(logs.clone(), Stream::Stderr));
        }
        Stdio::Inherit => {
            b.inherit_stdio();
        }
    }
    Ok(b)
}

/// Why the epoch callback ended a busy guest: an error type of our own,
/// so the outcome is found by downcasting, never by reading a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum Preempted {
    #[error("the task's deadline passed")]
    Deadline,
    #[error("the task was asked to stop")]
    Stopped,
}

pub(crate) fn new_store<T: HasLimiter>(
    engine: &Engine,
    state: T,
    fuel: Option<u64>,
    deadline: Option<Instant>,
    stop: &Arc<StopSignal>,
) -> Store<T> {
    let mut store = Store::new(engine, state);
    store.limiter(|s| s.limiter());
    if engine.get_consume_fuel() {
        store
            .set_fuel(fuel.unwrap_or(u64::MAX))
            .expect("fuel is enabled on this engine");
    }
    // At every epoch tick a busy guest checks its deadline and stop signal
    // itself, then yields to the scheduler. The check does not depend on
    // the scheduler polling the timer raced in `supervise` (which, with
    // every worker busy with guests, runs late); that race remains for
    // guests blocked in WASI calls, which run no code to notice.
    let stop = stop.clone();
    store.epoch_deadline_callback(move |_| {
        if stop.is_stopped() {
            return Err(Preempted::Stopped.into());
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            return Err(Preempted::Deadline.into());
        }
        Ok(UpdateDeadline::Yield(1))
    });
    store.set_epoch_deadline(1);
    store
}

/// How the supervised run ended.
enum Ended<T> {
    Finished(T),
    TimedOut,
    Stopped,
}

/// Races the guest's `run` against the stop signal and the timeout. The
/// caller pins `run` and lends it: moved in, the guest's future would be
/// kept twice in every task's future, as this one's argument and inside
/// its `select!`.
async fn supervise<F: Future<Output = Result<(), Failure>>>(
    run: Pin<&mut F>,
    timeout: Option<Duration>,
    stop: &StopSignal,
) -> Ended<F::Output> {
    let deadline = async {
        match timeout {
            Some(t) => tokio::time::sleep(t).await,
            None => std::future::pending().await,
        }
    };
    let ended = tokio::select! {
        biased;
        result = run => Ended::Finished(result),
        () = stop.wait() => Ended::Stopped,
        () = deadline => Ended::TimedOut,
    };
    // The epoch callback's own verdicts end the run the same way.
    if let Ended::Finished(Err(Failure::Run(e) | Failure::Start(e))) = &ended
        && let Some(preempted) = e.downcast_ref::<Preempted>()
    {
        return match preempted {
            Preempted::Stopped => Ended::Stopped,
            Preempted::Deadline => Ended::TimedOut,
        };
    }
    ended
}

/// A failure, and whether guest code had started running.
pub(crate) enum Failure {
    Start(wasmtime::Error),
    Run(wasmtime::Error),
}

impl Failure {
    pub(crate) fn error(&self) -> &wasmtime::Error {
        match self {
            Failure::Start(e) | Failure::Run(e) => e,
        }
    }
}

/// Runs one task to its end. Never panics on guest behaviour; every way a
/// task can end is an [`Outcome`].
pub(crate) async fn run(
    engine: &Engine,
    max_memory: u64,
    artifact: &Artifact,
    spec: &TaskSpec,
    stop: &Arc<StopSignal>,
) -> Outcome {
    let memory_limit = match spec.limits.memory {
        Some(m) if m > max_memory => {
            return Outcome::not_started(
                StopCode::FailedToStart,
                format!(
                    "memory limit of {m} bytes exceeds this node's maximum of {max_memory} bytes"
                ),
            );
        }
        Some(m) => m,
        None => max_memory,
    };
    // Each branch builds its WASI context in one statement: the builder
    // (and the fresh one `build` leaves in its place, with an RNG seeded
    // for nothing) is dropped before the first await instead of being kept
    // in the task's future for as long as the guest runs.
    let not_granted = |message| Outcome::not_started(StopCode::FailedToStart, message);
    let started = Instant::now();
    let deadline = spec.limits.timeout.and_then(|t| started.checked_add(t));
    // Nanoseconds from `started` to the end of instantiation; MAX: not
    // instantiated. An atomic because the run future must be Send.
    let instantiated = AtomicU64::new(u64::MAX);
    let mark = || {
        let ns = u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX - 1);
        instantiated.store(ns, Ordering::Relaxed);
    };
    let limiter = MemoryLimiter::new(memory_limit);
    let fuel = spec.limits.fuel;
    match &artifact.prepared {
        Prepared::Http(_) => Outcome::not_started(
            StopCode::FailedToStart,
            "the component exports wasi:http/incoming-handler: it is an HTTP component, served \
             per request (`wharf serve`), not run as a command",
        ),
        Prepared::P1(pre) => {
            let wasi = match wasi_builder(spec, memory_limit) {
                Ok(mut b) => b.build_p1(),
                Err(message) => return not_granted(message),
            };
            let state = P1State { wasi, limiter };
            let mut store = new_store(engine, state, fuel, deadline, stop);
            let ended = {
                let run = pin!(async {
                    // Boxed: instantiation's state (~1 KiB) is not kept in
                    // the task's future for as long as the guest runs.
                    let instance = Box::pin(pre.instantiate_async(&mut store))
                        .await
                        .map_err(Failure::Start)?;
                    mark();
                    let start = instance
                        .get_typed_func::<(), ()>(&mut store, "_start")
                        .map_err(Failure::Start)?;
                    start.call_async(&mut store, ()).await.map_err(Failure::Run)
                });
                supervise(run, spec.limits.timeout, stop).await
            };
            finish(
                ended,
                &mut store,
                fuel,
                started,
                &instantiated,
                spec.limits.timeout,
            )
        }
        Prepared::P2(pre) => {
            let wasi = match wasi_builder(spec, memory_limit) {
                Ok(mut b) => b.build(),
                Err(message) => return not_granted(message),
            };
            let state = P2State {
                wasi,
                table: ResourceTable::new(),
                limiter,
            };
            let mut store = new_store(engine, state, fuel, deadline, stop);
            let ended = {
                let run = pin!(async {
                    let command = Box::pin(pre.instantiate_async(&mut store))
                        .await
                        .map_err(Failure::Start)?;
                    mark();
                    match command.wasi_cli_run().call_run(&mut store).await {
                        Ok(Ok(())) => Ok(()),
                        // `run` returning `err` is how a component says
                        // "exit code 1" without the exit interface.
                        Ok(Err(())) => Err(Failure::Run(I32Exit(1).into())),
                        Err(e) => Err(Failure::Run(e)),
                    }
                });
                supervise(run, spec.limits.timeout, stop).await
            };
            finish(
                ended,
                &mut store,
                fuel,
                started,
                &instantiated,
                spec.limits.timeout,
            )
        }
    }
}

fn finish<T: HasLimiter>(
    ended: Ended<Result<(), Failure>>,
    store: &mut Store<T>,
    fuel: Option<u64>,
    started: Instant,
    instantiated: &AtomicU64,
    timeout: Option<Duration>,
) -> Outcome {
    let duration_ms = started.elapsed().as_secs_f64() * 1_000.0;
    let instantiate_ms = match instantiated.load(Ordering::Relaxed) {
        u64::MAX => None,
        ns => Some(ns as f64 / 1e6),
    };
    let limiter = store.data_mut().limiter();
    let (peak_memory_bytes, memory_denied) = (limiter.peak(), limiter.denied());
    let fuel_consumed = match store.get_fuel() {
        Ok(left) => fuel.unwrap_or(u64::MAX) - left,
        Err(_) => 0,
    };
    let (stop_code, exit_code, message) = match ended {
        Ended::Finished(Ok(())) => (StopCode::Completed, Some(0), String::new()),
        Ended::Finished(Err(failure)) => classify(failure, memory_denied),
        Ended::TimedOut => (
            StopCode::Timeout,
            None,
            format!(
                "stopped after the {} timeout",
                human_duration(timeout.unwrap_or_default())
            ),
        ),
        Ended::Stopped => (StopCode::UserStopped, None, "stopped on request".into()),
    };
    Outcome {
        stop_code,
        exit_code,
        fuel_consumed,
        duration_ms,
        instantiate_ms,
        peak_memory_bytes,
        message,
    }
}

fn human_duration(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", d.as_millis())
    }
}

const MEMORY_DENIED: &str = "a memory grow was denied: the task reached its memory limit";

/// Maps an error to a stop code by its type, never by its message.
pub(crate) fn classify(failure: Failure, memory_denied: bool) -> (StopCode, Option<i32>, String) {
    let (error, started) = match failure {
        Failure::Start(e) => (e, false),
        Failure::Run(e) => (e, true),
    };
    if let Some(I32Exit(code)) = error.downcast_ref::<I32Exit>() {
        return match (*code, memory_denied) {
            (0, _) => (StopCode::Completed, Some(0), String::new()),
            (code, true) => (
                StopCode::MemoryLimit,
                Some(code),
                format!("{MEMORY_DENIED}; then it exited with code {code}"),
            ),
            (code, false) => (
                StopCode::NonZeroExit,
                Some(code),
                format!("exited with code {code}"),
            ),
        };
    }
    let trap = error.downcast_ref::<Trap>().copied();
    if memory_denied {
        let then = match trap {
            Some(t) => format!("; then it stopped with {t}"),
            None => String::new(),
        };
        return (
            StopCode::MemoryLimit,
            None,
            format!("{MEMORY_DENIED}{then}"),
        );
    }
    match trap {
        Some(Trap::OutOfFuel) => (
            StopCode::OutOfFuel,
            None,
            "the task used up its fuel budget".into(),
        ),
        Some(Trap::Interrupt) => (StopCode::Timeout, None, "interrupted".into()),
        Some(trap) => {
            let place = error
                .downcast_ref::<wasmtime::WasmBacktrace>()
                .and_then(|bt| {
                    bt.frames()
                        .first()
                        .and_then(|f| f.func_name().map(str::to_owned))
                });
            let message = match place {
                Some(func) => format!("{trap} (in function `{func}`)"),
                None => trap.to_string(),
            };
            (StopCode::Trap, None, message)
        }
        None if !started => (
            StopCode::FailedToStart,
            None,
            format!("cannot instantiate: {error:#}"),
        ),
        None => (StopCode::Trap, None, format!("host error: {error:#}")),
    }
}
