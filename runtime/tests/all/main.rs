//! Integration tests of the runtime crate through its public API.

mod cache;
mod executor;
mod fuzz;
mod hostile;
mod sandbox;

use std::sync::Arc;

use wharf_runtime::{Artifact, LogBuffer, Runtime, RuntimeConfig, TaskSpec};
use wharf_testkit::{Target, wasm_bytes};

/// A runtime with the defaults, a small pool, and no disk cache.
pub(crate) fn runtime() -> Arc<Runtime> {
    Runtime::new(RuntimeConfig {
        max_instances: 400,
        max_task_memory: 256 << 20,
        ..RuntimeConfig::default()
    })
    .unwrap()
}

pub(crate) fn load(runtime: &Runtime, sample: &str, target: Target) -> Arc<Artifact> {
    runtime.load(&wasm_bytes(sample, target)).unwrap().artifact
}

/// A spec capturing output, with `args`.
pub(crate) fn spec(args: &[&str]) -> (TaskSpec, Arc<LogBuffer>) {
    let logs = LogBuffer::new(wharf_runtime::DEFAULT_RETAINED_BYTES);
    let mut spec = TaskSpec::new(logs.clone());
    spec.args = args.iter().map(|s| s.to_string()).collect();
    (spec, logs)
}
