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
pub mod client;
pub mod digest;
pub mod error;
pub mod gc;
pub mod http;
pub mod path;
pub mod remote;
pub mod storage;
pub mod store;
pub mod wasm;

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
    /// Manifest pushes to a tag hold the tag's stripe, so checking an
    /// immutable tag and writing it is one step: of concurrent pushes to
    /// one tag, exactly one wins.
    tag_stripes: Vec<tokio::sync::Mutex<()>>,
    /// Push-time scans in flight: each reads a Wasm layer of up to
    /// [`MAX_SCANNED_WASM_BYTES`] (mapped from its file, or into memory
    /// from S3) and validates it on a blocking thread, so at most
    /// [`SCAN_CONCURRENCY`] run at once: the CPU and memory they take are
    /// bounded.
    scans: tokio::sync::Semaphore,
}

/// Stripes of the tag lock; pushes to different tags rarely share one.
const TAG_STRIPES: usize = 64;

/// Push-time scans that may run at once (see [`Registry::scans`]): 2 ×
/// 256 MiB at most, whatever the number of concurrent pushes.
pub const SCAN_CONCURRENCY: usize = 2;

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
            tag_stripes: (0..TAG_STRIPES)
                .map(|_| tokio::sync::Mutex::new(()))
                .collect(),
            scans: tokio::sync::Semaphore::new(SCAN_CONCURRENCY),
        })
    }

    /// Says other servers (replicas) write to the same storage: upload
    /// sessions are checked against the stored bytes at every request.
    pub fn set_shared(&self) {
        self.store.set_shared();
    }

    /// Signs upload session ids with a key derived from `secret` (the
    /// server's `secrets.key`, which replicas share): a session is then
    /// known by its id on every replica and after a restart, with nothing
    /// stored for it until its first byte.
    pub fn set_session_key(&self, secret: &[u8]) {
        self.store.set_session_key(secret);
    }

    /// Holds `name:tag`'s stripe of the tag lock (see `tag_stripes`).
    pub(crate) async fn lock_tag(
        &self,
        name: &path::Name,
        tag: &str,
    ) -> tokio::sync::MutexGuard<'_, ()> {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        (name.as_str(), tag).hash(&mut h);
        self.tag_stripes[(h.finish() as usize) % TAG_STRIPES]
            .lock()
            .await
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

    /// If `manifest` is a Wasm artifact, validates its Wasm layer and returns
    /// the scan; an invalid layer refuses the push before anything is stored.
    pub(crate) async fn scan_wasm(
        &self,
        name: &path::Name,
        manifest: &[u8],
    ) -> Result<Option<wasm::Scan>> {
        let Ok(json) = serde_json::from_slice::<serde_json::Value>(manifest) else {
            return Ok(None);
        };
        let Some(layers) = json.get("layers").and_then(|l| l.as_array()) else {
            return Ok(None);
        };
        let is_wasm_config = json.pointer("/config/mediaType").and_then(|m| m.as_str())
            == Some(wasm::CONFIG_MEDIA_TYPE);
        let layer = layers.iter().find(|l| {
            l.get("mediaType")
                .and_then(|m| m.as_str())
                .is_some_and(|m| wasm::ACCEPTED_LAYER_MEDIA_TYPES.contains(&m))
        });
        let Some(layer) = layer else {
            if is_wasm_config {
                return Err(RegistryError::new(
                    ErrorCode::ManifestInvalid,
                    "a Wasm artifact needs an application/wasm layer",
                ));
            }
            return Ok(None);
        };
        let Some(digest) = layer
            .get("digest")
            .and_then(|d| d.as_str())
            .and_then(|d| d.parse::<digest::Digest>().ok())
        else {
            return Ok(None); // put_manifest reports the bad descriptor
        };
        let _permit = self
            .scans
            .acquire()
            .await
            .map_err(|_| RegistryError::Internal("the scan semaphore closed".into()))?;
        let Some(bytes) = self
            .store
            .read_blob(name, &digest, MAX_SCANNED_WASM_BYTES)
            .await?
        else {
            return Ok(None); // unknown blob: put_manifest reports it; too large: not scanned
        };
        // Validating up to 256 MiB is CPU work: off the async workers.
        let scanned = tokio::task::spawn_blocking(move || wasm::scan(&bytes))
            .await
            .map_err(|e| RegistryError::Internal(format!("the scan failed: {e}")))?;
        scanned.map(Some).map_err(|e| {
            RegistryError::new(
                ErrorCode::ManifestInvalid,
                format!("the Wasm layer {digest} is not valid: {e}"),
            )
        })
    }

    /// The scan stored at push for manifest `subject` of `name`, if any
    /// (layers above [`MAX_SCANNED_WASM_BYTES`] have none). Reads the small
    /// referrer and its scan blob, never the Wasm layer.
    pub async fn stored_scan(
        &self,
        name: &path::Name,
        subject: &digest::Digest,
    ) -> Result<Option<wasm::Scan>> {
        /// A scan document is a few KiB; anything larger is not ours.
        const MAX_SCAN_BYTES: u64 = 1 << 20;
        for referrer in self
            .store
            .referrers(name, subject, Some(wasm::SCAN_ARTIFACT_TYPE))
            .await?
        {
            let Some(digest) = referrer
                .get("digest")
                .and_then(|d| d.as_str())
                .and_then(|d| d.parse::<digest::Digest>().ok())
            else {
                continue;
            };
            let manifest = self
                .store
                .manifest(name, &path::Reference::Digest(digest))
                .await?;
            let json: serde_json::Value = serde_json::from_slice(&manifest.bytes)
                .map_err(|e| RegistryError::Internal(format!("a stored scan manifest: {e}")))?;
            let Some(layer) = json
                .pointer("/layers/0/digest")
                .and_then(|d| d.as_str())
                .and_then(|d| d.parse::<digest::Digest>().ok())
            else {
                continue;
            };
            if let Some(bytes) = self.store.read_blob(name, &layer, MAX_SCAN_BYTES).await?
                && let Ok(scan) = serde_json::from_slice(&bytes)
            {
                return Ok(Some(scan));
            }
        }
        Ok(None)
    }

    /// Records a scan as a referrer of the manifest it describes, so any OCI
    /// client can find it with the referrers API.
    pub(crate) async fn attach_scan(
        &self,
        name: &path::Name,
        subject: &digest::Digest,
        subject_size: usize,
        subject_type: &str,
        scan: &wasm::Scan,
    ) -> Result<()> {
        let scan_bytes = serde_json::to_vec(scan).expect("scan serializes");
        let scan_digest = self.store.put_small_blob(name, &scan_bytes).await?;
        let empty = self.store.put_small_blob(name, b"{}").await?;
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": store::media::OCI_MANIFEST,
            "artifactType": wasm::SCAN_ARTIFACT_TYPE,
            "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": empty.as_str(), "size": 2},
            "layers": [{"mediaType": wasm::SCAN_ARTIFACT_TYPE, "digest": scan_digest.as_str(), "size": scan_bytes.len()}],
            "subject": {"mediaType": subject_type, "digest": subject.as_str(), "size": subject_size},
        });
        let bytes = serde_json::to_vec(&manifest).expect("manifest serializes");
        let reference = path::Reference::Digest(digest::Digest::sha256_of(&bytes));
        self.store
            .put_manifest(name, &reference, Some(store::media::OCI_MANIFEST), &bytes)
            .await?;
        Ok(())
    }
}

/// Wasm layers up to this size are validated and scanned on push (they are
/// read into memory to do it); larger ones are stored unscanned.
pub const MAX_SCANNED_WASM_BYTES: u64 = 256 << 20;
