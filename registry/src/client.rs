//! The client side of Wasm artifacts, on `oci-client`: push a `.wasm` as
//! the CNCF artifact, pull it back (verifying the digest while streaming),
//! and inspect the scan the registry attached. Works with any OCI registry;
//! plain HTTP is used only for loopback hosts.

use std::path::Path;

use futures_util::StreamExt;
use oci_client::client::{ClientConfig, ClientProtocol, Config, ImageLayer};
use oci_client::manifest::{OciImageManifest, OciManifest};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use tokio::io::AsyncWriteExt;

use crate::digest::{Algorithm, Digest, Hasher};
use crate::wasm::{self, Scan};

/// Errors of the client side, worded for the CLI.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The reference does not parse.
    #[error("invalid reference {0:?}: expected HOST[:PORT]/REPOSITORY[:TAG|@DIGEST]")]
    Reference(String),
    /// The file is not Wasm (or not valid Wasm).
    #[error("{0}")]
    NotWasm(String),
    /// The registry answered with an error or could not be reached.
    #[error("registry: {0}")]
    Registry(#[from] oci_client::errors::OciDistributionError),
    /// The artifact has no Wasm layer.
    #[error("{0} is not a Wasm artifact: no layer of type {1}")]
    NoWasmLayer(String, String),
    /// Downloaded bytes do not match the digest.
    #[error("downloaded layer has digest {actual}, expected {expected}")]
    DigestMismatch {
        /// The manifest's digest.
        expected: String,
        /// What arrived.
        actual: String,
    },
    /// Local file trouble.
    #[error("{0}")]
    Io(String),
}

/// What a push did.
#[derive(Debug, Clone)]
pub struct Pushed {
    /// The manifest digest.
    pub digest: String,
    /// The scan of the pushed file.
    pub scan: Scan,
}

/// What `inspect` found.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Inspected {
    /// The reference asked for.
    pub reference: String,
    /// The manifest digest.
    pub digest: String,
    /// The artifact config.
    pub config: serde_json::Value,
    /// The layers: media type, digest, size.
    pub layers: Vec<serde_json::Value>,
    /// The registry's scan, if it attached one.
    pub scan: Option<Scan>,
}

/// A registry client with one set of credentials.
pub struct RegistryClient {
    client: Client,
    auth: RegistryAuth,
}

fn is_loopback(registry: &str) -> bool {
    crate::remote::is_loopback_host(registry)
}

/// The registry a reference will be sent to, as `oci-client` resolves it
/// (`team/app` and `127.0.0.1:7070` with no repository go to Docker Hub),
/// and whether the reference names that registry itself.
pub fn registry_of(reference: &str) -> Result<(String, bool), ClientError> {
    let parsed = parse(reference)?;
    let named = parsed.registry().to_owned();
    let explicit = reference.starts_with(&format!("{named}/"));
    Ok((parsed.resolve_registry().to_owned(), explicit))
}

fn parse(reference: &str) -> Result<Reference, ClientError> {
    reference
        .parse()
        .map_err(|_| ClientError::Reference(reference.to_owned()))
}

/// How a client reaches a registry over TLS.
#[derive(Debug, Clone, Default)]
pub struct ClientTls {
    /// HTTPS even on loopback (a Wharf server with `--tls`); otherwise a
    /// loopback registry is spoken to in plain HTTP, any other in HTTPS.
    pub https: bool,
    /// A CA certificate (PEM) to trust besides the usual roots.
    pub ca_pem: Option<Vec<u8>>,
}

impl RegistryClient {
    /// A client for `reference`'s registry with `credentials` (user name
    /// and password, as HTTP Basic, which every registry speaks; a Wharf
    /// token is the password), or anonymous.
    pub fn new(
        reference: &str,
        credentials: Option<(String, String)>,
    ) -> Result<Self, ClientError> {
        Self::with_tls(reference, credentials, &ClientTls::default())
    }

    /// [`new`](Self::new) with TLS settings.
    pub fn with_tls(
        reference: &str,
        credentials: Option<(String, String)>,
        tls: &ClientTls,
    ) -> Result<Self, ClientError> {
        let registry = parse(reference)?.resolve_registry().to_owned();
        let protocol = if is_loopback(&registry) && !tls.https {
            ClientProtocol::HttpsExcept(vec![registry])
        } else {
            ClientProtocol::Https
        };
        let client = Client::new(ClientConfig {
            protocol,
            extra_root_certificates: tls
                .ca_pem
                .iter()
                .map(|pem| oci_client::client::Certificate {
                    encoding: oci_client::client::CertificateEncoding::Pem,
                    data: pem.clone(),
                })
                .collect(),
            ..ClientConfig::default()
        });
        let auth = match credentials {
            Some((user, password)) => RegistryAuth::Basic(user, password),
            None => RegistryAuth::Anonymous,
        };
        Ok(RegistryClient { client, auth })
    }

    /// Pushes a Wasm file as the CNCF artifact. `progress(done, total)` is
    /// called as blobs complete.
    pub async fn push_wasm(
        &self,
        bytes: Vec<u8>,
        reference: &str,
        progress: impl Fn(u64, u64),
    ) -> Result<Pushed, ClientError> {
        let reference_parsed = parse(reference)?;
        let scan = wasm::scan(&bytes).map_err(ClientError::NotWasm)?;
        let layer_digest = Digest::sha256_of(&bytes);
        let config = serde_json::to_vec(&wasm::config(&scan, layer_digest.as_str()))
            .expect("config serializes");
        let total = (bytes.len() + config.len()) as u64;
        progress(0, total);
        let layer_len = bytes.len() as u64;
        let config_len = config.len() as u64;
        let layers = [ImageLayer::new(bytes, wasm::LAYER_MEDIA_TYPE.into(), None)];
        let config = Config::new(config, wasm::CONFIG_MEDIA_TYPE.into(), None);
        let manifest = OciImageManifest::build(&layers, &config, None);
        self.client
            .store_auth_if_needed(reference_parsed.resolve_registry(), &self.auth)
            .await;
        // Blobs first, then the manifest that refers to them.
        self.client
            .push_blob(&reference_parsed, &layers[0].data, layer_digest.as_str())
            .await?;
        progress(layer_len, total);
        self.client
            .push_blob(&reference_parsed, &config.data, &manifest.config.digest)
            .await?;
        progress(layer_len + config_len, total);
        self.client
            .push_manifest(&reference_parsed, &manifest.into())
            .await?;
        let digest = self
            .client
            .fetch_manifest_digest(&reference_parsed, &self.auth)
            .await?;
        Ok(Pushed { digest, scan })
    }

    /// Pulls the Wasm layer of `reference` into `out`, verifying its digest
    /// while streaming; the file appears only when complete.
    /// `progress(done, total)` is called per received chunk.
    pub async fn pull_wasm(
        &self,
        reference: &str,
        out: &Path,
        progress: impl Fn(u64, u64),
    ) -> Result<String, ClientError> {
        let reference_parsed = parse(reference)?;
        let (manifest, _digest) = self
            .client
            .pull_manifest(&reference_parsed, &self.auth)
            .await?;
        let OciManifest::Image(manifest) = manifest else {
            return Err(ClientError::NoWasmLayer(
                reference.into(),
                wasm::LAYER_MEDIA_TYPE.into(),
            ));
        };
        let layer = manifest
            .layers
            .iter()
            .find(|l| wasm::ACCEPTED_LAYER_MEDIA_TYPES.contains(&l.media_type.as_str()))
            .ok_or_else(|| {
                ClientError::NoWasmLayer(reference.into(), wasm::LAYER_MEDIA_TYPE.into())
            })?
            .clone();
        let expected: Digest = layer
            .digest
            .parse()
            .map_err(|_| ClientError::Io(format!("bad layer digest {}", layer.digest)))?;
        let total = layer.size.max(0) as u64;
        let io =
            |e: std::io::Error| ClientError::Io(format!("cannot write {}: {e}", out.display()));
        let dir = out
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let tmp = tempfile::NamedTempFile::new_in(dir).map_err(io)?;
        let mut file = tokio::fs::File::from_std(tmp.reopen().map_err(io)?);
        let mut hasher = Hasher::new(match expected.algorithm() {
            Algorithm::Sha256 => Algorithm::Sha256,
            Algorithm::Sha512 => Algorithm::Sha512,
        });
        let mut stream = self
            .client
            .pull_blob_stream(&reference_parsed, &layer)
            .await?
            .stream;
        let mut done = 0u64;
        progress(0, total);
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| ClientError::Io(format!("download failed: {e}")))?;
            hasher.update(&chunk);
            file.write_all(&chunk).await.map_err(io)?;
            done += chunk.len() as u64;
            progress(done, total);
        }
        file.sync_all().await.map_err(io)?;
        let actual = hasher.finish();
        if actual != expected {
            return Err(ClientError::DigestMismatch {
                expected: expected.to_string(),
                actual: actual.to_string(),
            });
        }
        tmp.persist(out).map_err(|e| io(e.error))?;
        Ok(expected.to_string())
    }

    /// The digest of `reference`'s manifest: the one in the reference if
    /// it names one (no request), else the registry's answer for the tag.
    pub async fn manifest_digest(&self, reference: &str) -> Result<String, ClientError> {
        let reference_parsed = parse(reference)?;
        if let Some(digest) = reference_parsed.digest() {
            return Ok(digest.to_owned());
        }
        Ok(self
            .client
            .fetch_manifest_digest(&reference_parsed, &self.auth)
            .await?)
    }

    /// The manifest, config and scan of `reference`.
    pub async fn inspect(&self, reference: &str) -> Result<Inspected, ClientError> {
        let reference_parsed = parse(reference)?;
        let (manifest, digest, config) = self
            .client
            .pull_manifest_and_config(&reference_parsed, &self.auth)
            .await?;
        let config: serde_json::Value =
            serde_json::from_str(&config).unwrap_or(serde_json::Value::Null);
        let layers = manifest
            .layers
            .iter()
            .map(|l| serde_json::json!({"mediaType": l.media_type, "digest": l.digest, "size": l.size}))
            .collect();
        let subject = Reference::with_digest(
            reference_parsed.registry().to_owned(),
            reference_parsed.repository().to_owned(),
            digest.clone(),
        );
        let referrers = self
            .client
            .pull_referrers(&subject, Some(wasm::SCAN_ARTIFACT_TYPE))
            .await?;
        let mut scan = None;
        if let Some(found) = referrers.manifests.first() {
            let scan_ref = Reference::with_digest(
                reference_parsed.registry().to_owned(),
                reference_parsed.repository().to_owned(),
                found.digest.clone(),
            );
            let (scan_manifest, _) = self
                .client
                .pull_image_manifest(&scan_ref, &self.auth)
                .await?;
            if let Some(layer) = scan_manifest.layers.first() {
                let mut bytes = Vec::new();
                self.client.pull_blob(&scan_ref, layer, &mut bytes).await?;
                scan = serde_json::from_slice(&bytes).ok();
            }
        }
        Ok(Inspected {
            reference: reference.to_owned(),
            digest,
            config,
            layers,
            scan,
        })
    }
}
