//! Compiled artifacts, cached by content digest: in memory as ready-to-
//! instantiate pre-instantiations, and on disk as precompiled code so that a
//! restart or a second `wharf run` of the same bytes does not recompile.
//!
//! On-disk layout (one directory per engine configuration, because
//! precompiled code is only valid for the engine that made it):
//!
//! ```text
//! <cache_dir>/
//! └── <engine compatibility hash, 16 hex digits>/
//!     ├── <sha256 of the Wasm bytes>.cwasm     complete artifacts only
//!     └── .tmp-XXXXXX                          in-flight writes, renamed when done
//! ```

use std::hash::{DefaultHasher, Hash, Hasher};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use dashmap::DashMap;
use sha2::{Digest, Sha256};
use wasmtime::Engine;

use crate::artifact::Artifact;

/// Counters that show where artifacts came from; tests use them to prove
/// the disk cache is used, operators to see compile churn.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) compiled: AtomicU64,
    pub(crate) disk_hits: AtomicU64,
    pub(crate) memory_hits: AtomicU64,
    pub(crate) disk_errors: AtomicU64,
}

/// A snapshot of [`Counters`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct CacheStats {
    /// Artifacts compiled from Wasm.
    pub compiled: u64,
    /// Artifacts loaded from precompiled code on disk.
    pub disk_hits: u64,
    /// Loads answered from memory.
    pub memory_hits: u64,
    /// Disk cache files that could not be read or written (then recompiled).
    pub disk_errors: u64,
}

/// Where a loaded artifact came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ArtifactSource {
    /// Compiled now.
    Compiled,
    /// Precompiled code read from the disk cache.
    DiskCache,
    /// Already in memory.
    MemoryCache,
}

/// The content digest of Wasm bytes, `sha256:<hex>` as OCI spells it.
pub fn digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

pub(crate) struct ArtifactCache {
    memory: DashMap<String, Arc<Artifact>>,
    disk: Option<PathBuf>,
    pub(crate) counters: Counters,
}

impl ArtifactCache {
    pub(crate) fn new(engine: &Engine, cache_dir: Option<&Path>) -> Self {
        let disk = cache_dir.map(|dir| {
            let mut hasher = DefaultHasher::new();
            engine.precompile_compatibility_hash().hash(&mut hasher);
            dir.join(format!("{:016x}", hasher.finish()))
        });
        ArtifactCache {
            memory: DashMap::new(),
            disk,
            counters: Counters::default(),
        }
    }

    pub(crate) fn get(&self, digest: &str) -> Option<Arc<Artifact>> {
        let found = self.memory.get(digest).map(|a| a.clone());
        if found.is_some() {
            self.counters.memory_hits.fetch_add(1, Ordering::Relaxed);
        }
        found
    }

    pub(crate) fn insert(&self, artifact: Arc<Artifact>) -> Arc<Artifact> {
        // Two loads of the same bytes may race; the first one in wins so
        // every caller shares one pre-instantiation.
        self.memory
            .entry(artifact.digest().to_owned())
            .or_insert(artifact)
            .clone()
    }

    pub(crate) fn evict(&self, digest: &str, disk: bool) {
        self.memory.remove(digest);
        if disk && let Some(path) = self.disk_path(digest) {
            let _ = std::fs::remove_file(path);
        }
    }

    /// Path of the precompiled file for `digest`, if a disk cache is set.
    pub(crate) fn disk_path(&self, digest: &str) -> Option<PathBuf> {
        let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
        self.disk.as_ref().map(|d| d.join(format!("{hex}.cwasm")))
    }

    /// Writes precompiled code so that readers only ever see whole files:
    /// temporary file, fsync, rename.
    pub(crate) fn store(&self, digest: &str, code: &[u8]) {
        let Some(path) = self.disk_path(digest) else {
            return;
        };
        let result = (|| -> std::io::Result<()> {
            let dir = path.parent().expect("cache path has a parent");
            std::fs::create_dir_all(dir)?;
            let mut tmp = tempfile::Builder::new().prefix(".tmp-").tempfile_in(dir)?;
            tmp.write_all(code)?;
            tmp.as_file().sync_all()?;
            tmp.persist(&path).map_err(|e| e.error)?;
            Ok(())
        })();
        if let Err(error) = result {
            self.counters.disk_errors.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(%error, path = %path.display(), "failed to write compiled artifact to the cache");
        }
    }

    pub(crate) fn stats(&self) -> CacheStats {
        let c = &self.counters;
        CacheStats {
            compiled: c.compiled.load(Ordering::Relaxed),
            disk_hits: c.disk_hits.load(Ordering::Relaxed),
            memory_hits: c.memory_hits.load(Ordering::Relaxed),
            disk_errors: c.disk_errors.load(Ordering::Relaxed),
        }
    }
}
