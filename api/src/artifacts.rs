//! From a task definition's artifact reference to a compiled artifact:
//! tags resolve to digests once, at registration; runs fetch the Wasm
//! layer by digest (from the built-in registry's store, or over OCI from
//! another registry) and compile it once per digest.

use std::path::PathBuf;
use std::sync::Arc;

use dashmap::DashMap;
use wharf_registry::Registry;
use wharf_registry::digest::Digest;
use wharf_registry::path::{Name, Reference};
use wharf_registry::remote::Remote;
use wharf_registry::wasm;
use wharf_runtime::{Artifact, Runtime};

use crate::error::{ApiError, Result};

/// Wasm layers larger than this are refused: the layer is read into
/// memory to compile it, and no real task is near this size.
pub const MAX_WASM_BYTES: u64 = 256 << 20;

/// The longest a remote layer download may take in all (connects and
/// silences have their own, shorter timeouts in [`Remote`]).
pub const REMOTE_FETCH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(600);

/// Where an artifact lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ArtifactRef {
    /// A repository of the built-in registry.
    Local {
        /// The repository.
        name: Name,
        /// Tag or digest.
        reference: Reference,
    },
    /// `host[:port]/repo:tag` of another registry.
    Remote(String),
}

impl ArtifactRef {
    /// Parses `repo:tag`, `repo@digest` (built-in) or `host/repo:tag`
    /// (remote: the first part has a `.` or `:` or is `localhost`).
    pub fn parse(text: &str) -> Result<ArtifactRef> {
        let text = text.trim();
        let first = text.split('/').next().unwrap_or_default();
        if text.contains('/') && (first.contains(['.', ':']) || first == "localhost") {
            return Ok(ArtifactRef::Remote(text.to_owned()));
        }
        let (repo, reference) = if let Some((repo, digest)) = text.split_once('@') {
            (repo, digest)
        } else {
            match text.rsplit_once(':') {
                Some((repo, tag)) if !tag.contains('/') => (repo, tag),
                _ => (text, "latest"),
            }
        };
        let name = Name::parse(repo).map_err(|e| ApiError::invalid("artifact", e))?;
        let reference =
            Reference::parse(reference).map_err(|e| ApiError::invalid("artifact", e))?;
        Ok(ArtifactRef::Local { name, reference })
    }
}

/// The repository an artifact reference names, which token scopes and
/// secret scopes are matched against: the built-in registry's repository
/// name, or `host/repository` of another registry (tag and digest cut).
pub fn artifact_repository(artifact: &str) -> Result<String> {
    Ok(match ArtifactRef::parse(artifact)? {
        ArtifactRef::Local { name, .. } => name.as_str().to_owned(),
        ArtifactRef::Remote(reference) => {
            let repo = reference
                .split_once('@')
                .map_or(reference.as_str(), |(r, _)| r);
            match repo.rsplit_once(':') {
                Some((r, tag)) if !tag.contains('/') => r.to_owned(),
                _ => repo.to_owned(),
            }
        }
    })
}

/// The digest of the first layer with a Wasm media type.
fn wasm_layer<'a>(mut layers: impl Iterator<Item = &'a serde_json::Value>) -> Option<&'a str> {
    layers
        .find(|l| {
            l.get("mediaType")
                .and_then(|m| m.as_str())
                .is_some_and(|m| wasm::ACCEPTED_LAYER_MEDIA_TYPES.contains(&m))
        })
        .and_then(|l| l.get("digest"))
        .and_then(|d| d.as_str())
}

/// A reference resolved to what runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    /// The manifest digest.
    pub manifest: String,
    /// The Wasm layer's digest.
    pub wasm: String,
}

/// Fetches and compiles artifacts, once per digest.
pub(crate) struct Artifacts {
    registry: Arc<Registry>,
    runtime: Arc<Runtime>,
    remote: Remote,
    scratch: PathBuf,
    loading: DashMap<String, Arc<tokio::sync::Mutex<()>>>,
}

impl Artifacts {
    pub(crate) fn new(
        registry: Arc<Registry>,
        runtime: Arc<Runtime>,
        remote: Remote,
        scratch: PathBuf,
    ) -> Self {
        Artifacts {
            registry,
            runtime,
            remote,
            scratch,
            loading: DashMap::new(),
        }
    }

    /// Resolves a reference to its manifest and Wasm layer digests.
    pub(crate) async fn resolve(&self, artifact: &str) -> Result<Resolved> {
        match ArtifactRef::parse(artifact)? {
            ArtifactRef::Local { name, reference } => {
                let manifest = self
                    .registry
                    .store
                    .manifest(&name, &reference)
                    .await
                    .map_err(|e| ApiError::invalid("artifact", e))?;
                let json: serde_json::Value = serde_json::from_slice(&manifest.bytes)
                    .map_err(|e| ApiError::invalid("artifact", e))?;
                let layers = json.get("layers").and_then(|l| l.as_array());
                let layer = wasm_layer(layers.into_iter().flatten()).ok_or_else(|| {
                    ApiError::invalid(
                        "artifact",
                        format!(
                            "{artifact} is not a Wasm artifact (no {} layer)",
                            wasm::LAYER_MEDIA_TYPE
                        ),
                    )
                })?;
                Ok(Resolved {
                    manifest: manifest.digest.to_string(),
                    wasm: layer.to_owned(),
                })
            }
            ArtifactRef::Remote(reference) => {
                // Through the guarded client: no internal destinations, no
                // upstream body in the error.
                let manifest = self
                    .remote
                    .manifest(&reference)
                    .await
                    .map_err(|e| ApiError::invalid("artifact", e))?;
                let layer = wasm_layer(manifest.layers.iter()).ok_or_else(|| {
                    ApiError::invalid("artifact", format!("{reference} has no Wasm layer"))
                })?;
                Ok(Resolved {
                    manifest: manifest.digest,
                    wasm: layer.to_owned(),
                })
            }
        }
    }

    /// What a built-in artifact imports and exports: the scan the
    /// registry stored when it was pushed. `None` for another registry's
    /// artifact, or a layer too large to have been scanned (checked when
    /// its tasks start instead).
    pub(crate) async fn scan(
        &self,
        artifact: &str,
        resolved: &Resolved,
    ) -> Result<Option<wasm::Scan>> {
        let ArtifactRef::Local { name, .. } = ArtifactRef::parse(artifact)? else {
            return Ok(None);
        };
        let manifest: Digest = resolved.manifest.parse().map_err(|_| {
            ApiError::invalid("artifact", format!("bad digest {}", resolved.manifest))
        })?;
        self.registry
            .stored_scan(&name, &manifest)
            .await
            .map_err(|e| ApiError::invalid("artifact", e))
    }

    /// The compiled artifact for a task definition's pinned Wasm layer.
    /// Concurrent first runs of one digest compile it once. The fetch and
    /// compile run in a task of their own: a waiter that gives up (its task
    /// was stopped) does not cancel them, so the next run finds the result
    /// instead of starting over beside an orphaned compile.
    pub(crate) async fn load(
        self: &Arc<Self>,
        artifact: &str,
        manifest_digest: &str,
        wasm_digest: &str,
    ) -> std::result::Result<Arc<Artifact>, String> {
        if let Some(a) = self.runtime.cached(wasm_digest) {
            return Ok(a);
        }
        let this = self.clone();
        let (artifact, manifest_digest, wasm_digest) = (
            artifact.to_owned(),
            manifest_digest.to_owned(),
            wasm_digest.to_owned(),
        );
        tokio::spawn(async move {
            this.load_once(&artifact, &manifest_digest, &wasm_digest)
                .await
        })
        .await
        .map_err(|e| format!("loading the artifact failed: {e}"))?
    }

    /// One fetch and compile per digest at a time; later callers wait for
    /// it and find the result in the cache.
    async fn load_once(
        &self,
        artifact: &str,
        manifest_digest: &str,
        wasm_digest: &str,
    ) -> std::result::Result<Arc<Artifact>, String> {
        let lock = self
            .loading
            .entry(wasm_digest.to_owned())
            .or_default()
            .clone();
        let _guard = lock.lock().await;
        if let Some(a) = self.runtime.cached(wasm_digest) {
            return Ok(a);
        }
        let result = self
            .fetch_and_compile(artifact, manifest_digest, wasm_digest)
            .await;
        self.loading.remove(wasm_digest);
        result
    }

    async fn fetch_and_compile(
        &self,
        artifact: &str,
        manifest_digest: &str,
        wasm_digest: &str,
    ) -> std::result::Result<Arc<Artifact>, String> {
        let fetched = self.fetch(artifact, manifest_digest, wasm_digest).await?;
        let runtime = self.runtime.clone();
        // Hashing a stored layer, reading a downloaded file and compiling
        // are blocking work.
        let loaded = tokio::task::spawn_blocking(move || match fetched {
            Fetched::Stored(bytes, digest) => {
                if digest.same_algorithm_of(&bytes) != digest {
                    return Err(format!("the stored layer {digest} is corrupt"));
                }
                runtime
                    .load(&bytes)
                    .map_err(|e| format!("cannot load the artifact: {e}"))
            }
            Fetched::File(path) => {
                let loaded = runtime.load_file(&path);
                let _ = std::fs::remove_file(&path);
                loaded.map_err(|e| format!("cannot load the artifact: {e}"))
            }
        })
        .await
        .map_err(|e| format!("compiling failed: {e}"))??;
        Ok(loaded.artifact)
    }

    async fn fetch(
        &self,
        artifact: &str,
        manifest_digest: &str,
        wasm_digest: &str,
    ) -> std::result::Result<Fetched, String> {
        let digest: Digest = wasm_digest
            .parse()
            .map_err(|_| format!("bad digest {wasm_digest}"))?;
        match ArtifactRef::parse(artifact).map_err(|e| e.message)? {
            ArtifactRef::Local { name, .. } => {
                let bytes = self
                    .registry
                    .store
                    .read_blob(&name, &digest, MAX_WASM_BYTES)
                    .await
                    .map_err(|e| format!("cannot read {wasm_digest} from {name}: {e}"))?
                    .ok_or_else(|| {
                        format!(
                            "the Wasm layer {wasm_digest} is no longer in {name} (deleted or larger than {MAX_WASM_BYTES} bytes)"
                        )
                    })?;
                Ok(Fetched::Stored(bytes, digest))
            }
            ArtifactRef::Remote(reference) => {
                let repo = reference
                    .rsplit_once('@')
                    .map(|(r, _)| r)
                    .unwrap_or(&reference);
                let repo = match repo.rsplit_once(':') {
                    Some((r, tag)) if !tag.contains('/') => r,
                    _ => repo,
                };
                let pinned = format!("{repo}@{manifest_digest}");
                tokio::fs::create_dir_all(&self.scratch)
                    .await
                    .map_err(|e| e.to_string())?;
                let file = self.scratch.join(format!("{}.wasm", digest.hex()));
                // The pinned manifest still names this layer (a registry
                // may not serve a blob its manifests do not reference).
                let manifest = self
                    .remote
                    .manifest(&pinned)
                    .await
                    .map_err(|e| format!("cannot pull {pinned}: {e}"))?;
                if wasm_layer(manifest.layers.iter()) != Some(wasm_digest) {
                    return Err(format!(
                        "{pinned} no longer has the registered layer {wasm_digest}"
                    ));
                }
                // A declared size above the cap is refused before asking.
                let declared = manifest
                    .layers
                    .iter()
                    .find(|l| l.get("digest").and_then(|d| d.as_str()) == Some(wasm_digest))
                    .and_then(|l| l.get("size"))
                    .and_then(|s| s.as_u64())
                    .unwrap_or(0);
                if declared > MAX_WASM_BYTES {
                    return Err(format!(
                        "the layer {wasm_digest} is {declared} bytes, above the limit of {MAX_WASM_BYTES}"
                    ));
                }
                let download = self
                    .remote
                    .blob_to_file(&pinned, &digest, MAX_WASM_BYTES, &file);
                match tokio::time::timeout(REMOTE_FETCH_TIMEOUT, download).await {
                    Ok(Ok(_)) => Ok(Fetched::File(file)),
                    Ok(Err(e)) => Err(format!("cannot pull {pinned}: {e}")),
                    Err(_) => Err(format!(
                        "cannot pull {pinned}: the download took longer than {}s",
                        REMOTE_FETCH_TIMEOUT.as_secs()
                    )),
                }
            }
        }
    }
}

/// A fetched Wasm layer: in memory (from the built-in store) or in a
/// verified scratch file (from another registry).
enum Fetched {
    /// A layer of this registry (mapped from its file where it has one),
    /// to check against its digest before it is compiled.
    Stored(wharf_registry::storage::Whole, Digest),
    File(PathBuf),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references() {
        let local = |t: &str, n: &str, r: &str| match ArtifactRef::parse(t).unwrap() {
            ArtifactRef::Local { name, reference } => {
                assert_eq!(name.as_str(), n);
                assert_eq!(reference.to_string(), r);
            }
            other => panic!("{t}: {other:?}"),
        };
        local("team/hello:v1", "team/hello", "v1");
        local("hello", "hello", "latest");
        local(
            "a/b@sha256:0000000000000000000000000000000000000000000000000000000000000000",
            "a/b",
            "sha256:0000000000000000000000000000000000000000000000000000000000000000",
        );
        for remote in ["ghcr.io/x/y:1", "localhost:5000/x:1", "localhost/x"] {
            assert_eq!(
                ArtifactRef::parse(remote).unwrap(),
                ArtifactRef::Remote(remote.into())
            );
        }
        assert!(ArtifactRef::parse("Team/X:1").is_err());
        assert!(ArtifactRef::parse("a:b c").is_err());
    }
}
