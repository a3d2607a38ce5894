//! The one wasmtime [`Engine`] per process and the configuration it is
//! built from.
//!
//! Settings that matter for task start-up were measured (see
//! `shared/notes/wasmtime-start-latency.md` and `docs/PERFORMANCE.md`):
//! the pooling allocator with memories and tables kept resident makes a task
//! start a few microseconds without memory syscalls; the on-demand
//! allocator maps and unmaps a multi-GiB reservation per task and is used
//! only when the pool's address-space reservation fails.

use std::path::PathBuf;
use std::thread;
use std::time::Duration;

use wasmtime::{
    Config, Enabled, Engine, EngineWeak, InstanceAllocationStrategy, OptLevel,
    PoolingAllocationConfig, WasmBacktraceDetails,
};

use crate::Result;

/// Validated settings for a [`crate::Runtime`]. Every default is
/// documented on its field.
#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    /// Tasks that may hold an instance at the same time; sizes the pool and
    /// the executor. Default 1,000 (a service of a thousand tasks fits).
    pub max_instances: u32,
    /// The largest memory limit a task may ask for, and the limit of tasks
    /// that name none. Default 1 GiB.
    pub max_task_memory: u64,
    /// Meter fuel so tasks can have a fuel budget. Default on; off only for
    /// measuring what metering costs.
    pub fuel: bool,
    /// Try the pooling allocator first. Default on.
    pub pooling: bool,
    /// Where compiled artifacts are kept across restarts; `None` keeps them
    /// in memory only. Default `None` (the binary passes its data dir).
    pub cache_dir: Option<PathBuf>,
    /// How often the epoch advances: the granularity at which a busy task
    /// yields to the scheduler and notices a timeout or stop. Default 10 ms.
    pub epoch_tick: Duration,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        RuntimeConfig {
            max_instances: 1_000,
            max_task_memory: 1 << 30,
            fuel: true,
            pooling: true,
            cache_dir: None,
            epoch_tick: Duration::from_millis(10),
        }
    }
}

/// Which instance allocator the engine ended up with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Allocator {
    /// Pre-reserved slots, reused between tasks.
    Pooling,
    /// Memory mapped per instance (the fallback).
    OnDemand,
}

/// Upper bounds per task, used to size the pool from `max_instances`.
/// A Rust `wasm32-wasip2` command component has 3–4 core instances (the
/// program, the WASI adapter, shims) and 1–2 memories; leave headroom.
const CORE_INSTANCES_PER_TASK: u32 = 6;
const MEMORIES_PER_TASK: u32 = 2;
const TABLES_PER_TASK: u32 = 6;

/// Memory and tables kept resident in a pool slot between tasks: resetting
/// them with `memset` is cheaper than `madvise` + page faults for small
/// tasks (measured: 150k+ tasks/s instead of 21k/s on 2 cores).
const MEMORY_KEEP_RESIDENT: usize = 2 << 20;
const TABLE_KEEP_RESIDENT: usize = 64 << 10;

fn base_config(config: &RuntimeConfig) -> Config {
    let mut c = Config::new();
    c.cranelift_opt_level(OptLevel::Speed)
        .consume_fuel(config.fuel)
        .epoch_interruption(true)
        .wasm_component_model(true)
        .parallel_compilation(true)
        // Do not let an environment variable change what a library does.
        .wasm_backtrace_details(WasmBacktraceDetails::Disable);
    c
}

fn pooling(config: &RuntimeConfig) -> PoolingAllocationConfig {
    let n = config.max_instances.max(1);
    let mut pool = PoolingAllocationConfig::new();
    pool.total_component_instances(n)
        .total_core_instances(n.saturating_mul(CORE_INSTANCES_PER_TASK))
        .total_memories(n.saturating_mul(MEMORIES_PER_TASK))
        .total_tables(n.saturating_mul(TABLES_PER_TASK))
        .total_stacks(n)
        .max_memory_size(usize::try_from(config.max_task_memory).unwrap_or(usize::MAX))
        .max_core_instances_per_component(CORE_INSTANCES_PER_TASK * 4)
        .max_memories_per_component(MEMORIES_PER_TASK * 2)
        .max_tables_per_component(TABLES_PER_TASK * 2)
        .linear_memory_keep_resident(MEMORY_KEEP_RESIDENT)
        .table_keep_resident(TABLE_KEEP_RESIDENT)
        .async_stack_keep_resident(64 << 10)
        .pagemap_scan(Enabled::Auto);
    pool
}

/// Builds the engine: pooling if asked for and the reservation succeeds,
/// on-demand otherwise.
pub(crate) fn build(config: &RuntimeConfig) -> Result<(Engine, Allocator)> {
    if config.pooling {
        let mut c = base_config(config);
        c.allocation_strategy(InstanceAllocationStrategy::Pooling(pooling(config)));
        match Engine::new(&c) {
            Ok(engine) => return Ok((engine, Allocator::Pooling)),
            Err(error) => tracing::warn!(
                error = %format!("{error:#}"),
                "pooling allocator unavailable, falling back to on-demand allocation"
            ),
        }
    }
    let engine =
        Engine::new(&base_config(config)).map_err(|e| crate::Error::Engine(format!("{e:#}")))?;
    Ok((engine, Allocator::OnDemand))
}

/// Starts the thread that advances the engine's epoch every `tick`. It
/// holds only a weak reference, so it ends when the last engine handle is
/// dropped.
pub(crate) fn start_epoch_ticker(engine: &Engine, tick: Duration) {
    let weak: EngineWeak = engine.weak();
    thread::Builder::new()
        .name("wharf-epoch".into())
        .spawn(move || {
            loop {
                thread::sleep(tick);
                match weak.upgrade() {
                    Some(engine) => engine.increment_epoch(),
                    None => break,
                }
            }
        })
        .expect("failed to spawn the epoch ticker thread");
}
