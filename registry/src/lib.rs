//! Wharf's built-in OCI Distribution v1.1 registry — the ECR half.
//!
//! - [`http::router`] serves `/v2/`: pull, push (monolithic, chunked,
//!   cross-repository mount), tags and catalog with pagination, referrers,
//!   deletes, errors in the spec's format with the spec's codes.
//! - [`store::Store`] is the OCI layer (content-addressed blobs shared
//!   across repositories, per-repository links, tags, manifests, referrers,
//!   upload sessions that survive restarts) over a small [`storage::Storage`]
//!   trait of primitives; [`storage::fs::FsStorage`] implements it on a
//!   local directory with write-fsync-rename.
//! - [`auth::Authorizer`] decides every request from its token.
//!
//! This crate knows nothing of wasmtime and reads no environment variables.

pub mod auth;
pub mod digest;
pub mod error;
pub mod http;
pub mod path;
pub mod storage;
pub mod store;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

pub use error::{ErrorCode, RegistryError, Result};

/// Byte counters for metrics.
#[derive(Debug, Default)]
pub struct RegistryMetrics {
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
}

impl RegistryMetrics {
    pub(crate) fn bytes_in(&self, n: u64) {
        self.bytes_in.fetch_add(n, Ordering::Relaxed);
    }

    pub(crate) fn bytes_out(&self, n: u64) {
        self.bytes_out.fetch_add(n, Ordering::Relaxed);
    }

    /// Bytes received (blobs and manifests) and sent (blobs).
    pub fn totals(&self) -> (u64, u64) {
        (
            self.bytes_in.load(Ordering::Relaxed),
            self.bytes_out.load(Ordering::Relaxed),
        )
    }
}

/// The registry: storage, authorization and counters.
pub struct Registry {
    /// The OCI layer.
    pub store: store::Store,
    auth: Arc<dyn auth::Authorizer>,
    /// Byte counters.
    pub metrics: RegistryMetrics,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry").finish_non_exhaustive()
    }
}

impl Registry {
    /// A registry over `storage`, deciding requests with `auth`.
    pub fn new(storage: Arc<dyn storage::Storage>, auth: Arc<dyn auth::Authorizer>) -> Arc<Self> {
        Arc::new(Registry {
            store: store::Store::new(storage),
            auth,
            metrics: RegistryMetrics::default(),
        })
    }

    /// Refuses to move an immutable tag (repository setting, as in ECR).
    pub(crate) async fn check_tag_push(
        &self,
        name: &path::Name,
        reference: &path::Reference,
    ) -> Result<()> {
        let path::Reference::Tag(tag) = reference else {
            return Ok(());
        };
        if !self.store.settings(name).await?.tag_immutability {
            return Ok(());
        }
        if self.store.resolve(name, reference).await?.is_some() {
            return Err(RegistryError::with_status(
                ErrorCode::Denied,
                axum::http::StatusCode::CONFLICT,
                format!(
                    "tag {tag} in {name} is immutable and already exists: push a new tag instead"
                ),
            ));
        }
        Ok(())
    }
}
