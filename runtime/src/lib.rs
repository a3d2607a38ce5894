//! Wharf's execution core: everything that knows wasmtime.
//!
//! - [`Runtime`] owns the one [`wasmtime::Engine`] of the process (Cranelift,
//!   fuel, epoch interruption, the pooling allocator), the WASI linkers, and
//!   the compiled-artifact cache keyed by content digest (in memory as
//!   pre-instantiations, on disk as precompiled code).
//! - [`Runtime::run`] runs one task in a fresh sandbox with the limits of
//!   its [`TaskSpec`] and returns an [`Outcome`] with a [`StopCode`]; traps
//!   are classified by type, never by message.
//! - [`Executor`] runs many tasks concurrently with a bounded number of
//!   slots and lets callers stop them and read their logs while they run.
//!
//! This crate knows nothing of HTTP, OCI or the control plane, and reads no
//! environment variables: configuration arrives as a [`RuntimeConfig`].

mod artifact;
mod bench;
mod cache;
mod engine;
mod executor;
mod http;
mod limits;
mod logs;
mod outcome;
mod sandbox;

use std::path::Path;
use std::sync::Arc;

pub use artifact::{Artifact, ArtifactKind, Loaded};
pub use bench::{BENCH_LINE, BenchRun, MAX_BENCH_RUNS};
pub use cache::{ArtifactSource, CacheStats, digest};
pub use engine::{Allocator, RuntimeConfig};
pub use executor::{
    Admission, Busy, Executor, ExecutorConfig, ExecutorStats, Refused, TaskHandle, TaskPhase,
};
pub use http::{
    AddressCheck, GuestEnd, HttpOptions, OutboundRule, RequestOutcome, STOP_CODE_HEADER,
    text_response,
};
pub use limits::{Limits, parse_duration, parse_size};
pub use logs::{
    DEFAULT_RETAINED_BYTES, LINE_OVERHEAD_BYTES, LogBuffer, LogLine, LogPage, LogStream,
    MAX_LINE_BYTES, Stream,
};
pub use outcome::{Outcome, StopCode};
pub use sandbox::{DirGrant, Stdio, StopSignal, TaskSpec};
/// The error type request bodies given to an HTTP component convert into.
pub use wasmtime_wasi_http::Error as HttpError;
/// The wasmtime version this runtime is built on.
pub const ENGINE_VERSION: &str = "wasmtime 48.0.8";

/// The WASI interfaces (packages, and `wasi:http`'s interfaces) this
/// runtime links for guests: what a node advertises. Sockets are linked
/// but closed (no address is granted).
pub const PROVIDED_INTERFACES: &[&str] = &[
    "wasi_snapshot_preview1",
    "wasi:cli",
    "wasi:clocks",
    "wasi:filesystem",
    "wasi:io",
    "wasi:random",
    "wasi:sockets",
    "wasi:http/types",
    "wasi:http/outgoing-handler",
    "wasi:http/incoming-handler",
];

/// The response body of an HTTP component.
pub use wasmtime_wasi_http::p2::body::HyperOutgoingBody as HttpBody;

/// Errors of this crate. Guest behaviour is never an error: it is an
/// [`Outcome`]. These are about loading artifacts and building the engine.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The bytes are neither a Wasm binary nor Wasm text.
    #[error(
        "not a WebAssembly file: expected a module or component (the \\0asm magic number) or WebAssembly text"
    )]
    NotWasm,
    /// Wasm that does not validate or compile (truncated, malformed, ...).
    #[error("{0}")]
    Invalid(String),
    /// Valid Wasm that cannot run as a task here: unknown imports, not a
    /// command, an unsupported world.
    #[error("{0}")]
    Unsupported(String),
    /// A value given by a person or a config file is malformed.
    #[error("{0}")]
    InvalidInput(String),
    /// The engine could not be configured.
    #[error("cannot configure the wasm engine: {0}")]
    Engine(String),
    /// Reading an artifact failed.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
}

/// Result with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The engine, linkers and artifact cache of one process.
pub struct Runtime {
    engine: wasmtime::Engine,
    allocator: Allocator,
    linkers: artifact::Linkers,
    cache: cache::ArtifactCache,
    config: RuntimeConfig,
}

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runtime")
            .field("allocator", &self.allocator)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Runtime {
    /// Builds the engine (pooling, or on-demand if the pool cannot be
    /// reserved), the linkers and the cache, and starts the epoch ticker.
    pub fn new(config: RuntimeConfig) -> Result<Arc<Self>> {
        let (engine, allocator) = engine::build(&config)?;
        engine::start_epoch_ticker(&engine, config.epoch_tick);
        let linkers = artifact::Linkers::default();
        let cache = cache::ArtifactCache::new(&engine, config.cache_dir.as_deref());
        Ok(Arc::new(Runtime {
            engine,
            allocator,
            linkers,
            cache,
            config,
        }))
    }

    /// The wasmtime engine itself, for benchmarks that run the same code
    /// on the very same engine without Wharf (the raw-wasmtime arm).
    pub fn engine(&self) -> &wasmtime::Engine {
        &self.engine
    }

    /// The configuration the runtime was built with.
    pub fn config(&self) -> &RuntimeConfig {
        &self.config
    }

    /// The engine's compatibility hash (16 hex digits): runtimes with the
    /// same hash can share precompiled code. It names the compile cache's
    /// directory, and nodes advertise it.
    pub fn compatibility_hash(&self) -> String {
        use std::hash::{Hash, Hasher};
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        self.engine
            .precompile_compatibility_hash()
            .hash(&mut hasher);
        format!("{:016x}", hasher.finish())
    }

    /// The allocator in use.
    pub fn allocator(&self) -> Allocator {
        self.allocator
    }

    /// Compiles (or finds in the cache) and links Wasm bytes.
    pub fn load(&self, bytes: &[u8]) -> Result<Loaded> {
        artifact::load(&self.engine, &self.linkers, &self.cache, bytes)
    }

    /// Compiles and links Wasm bytes, touching no cache (neither finding
    /// nor keeping the result): what a benchmark's cold run times.
    pub fn compile_uncached(&self, bytes: &[u8]) -> Result<Arc<Artifact>> {
        let scratch = cache::ArtifactCache::new(&self.engine, None);
        artifact::load(&self.engine, &self.linkers, &scratch, bytes).map(|l| l.artifact)
    }

    /// Reads and loads a file.
    pub fn load_file(&self, path: &Path) -> Result<Loaded> {
        let bytes = std::fs::read(path).map_err(|source| Error::Io {
            path: path.display().to_string(),
            source,
        })?;
        self.load(&bytes)
    }

    /// An artifact already in memory, by digest.
    pub fn cached(&self, digest: &str) -> Option<Arc<Artifact>> {
        self.cache.get(digest)
    }

    /// Forgets the compiled artifact of `digest` in memory, and with
    /// `disk` its precompiled file too, so the next load reads the file
    /// (or compiles): benchmarks time those phases with it. Runs holding
    /// the artifact keep it.
    pub fn evict(&self, digest: &str, disk: bool) {
        self.cache.evict(digest, disk);
    }

    /// Where artifacts came from so far.
    pub fn cache_stats(&self) -> CacheStats {
        self.cache.stats()
    }

    /// Runs one task to its end in a fresh sandbox.
    pub async fn run(&self, artifact: &Artifact, spec: &TaskSpec) -> Outcome {
        self.run_with_stop(artifact, spec, &StopSignal::new()).await
    }

    /// Runs one task; firing `stop` ends it with `UserStopped`.
    pub async fn run_with_stop(
        &self,
        artifact: &Artifact,
        spec: &TaskSpec,
        stop: &Arc<StopSignal>,
    ) -> Outcome {
        sandbox::run(
            &self.engine,
            self.config.max_task_memory,
            artifact,
            spec,
            stop,
        )
        .await
    }
}
