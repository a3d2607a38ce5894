//! Turning Wasm bytes into something a task can start from: detect what the
//! bytes are, compile (or load precompiled code), check that it is a WASI
//! command, and link it once into a pre-instantiation.

use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};

use wasmtime::component::Component;
use wasmtime::{Engine, ExternType, InstancePre, Module};
use wasmtime_wasi::p2::bindings::CommandPre;

use crate::cache::{ArtifactCache, ArtifactSource};
use crate::http::HttpState;
use crate::sandbox::{P1State, P2State};
use crate::{Error, Result};
use wasmtime_wasi_http::p2::bindings::ProxyPre;

/// What kind of program an artifact is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ArtifactKind {
    /// A core module importing WASI preview 1, started at `_start`.
    P1Module,
    /// A component exporting `wasi:cli/run` (WASI preview 2 command).
    P2Command,
    /// A component exporting `wasi:http/incoming-handler` (the
    /// `wasi:http/proxy` world), served one instance per request.
    HttpProxy,
}

pub(crate) enum Prepared {
    P1(InstancePre<P1State>),
    P2(CommandPre<P2State>),
    Http(ProxyPre<HttpState>),
}

/// A compiled and linked program, shared by every task that runs it.
pub struct Artifact {
    digest: String,
    kind: ArtifactKind,
    pub(crate) prepared: Prepared,
}

impl std::fmt::Debug for Artifact {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Artifact")
            .field("digest", &self.digest)
            .field("kind", &self.kind)
            .finish_non_exhaustive()
    }
}

impl Artifact {
    /// `sha256:<hex>` of the bytes it was loaded from.
    pub fn digest(&self) -> &str {
        &self.digest
    }

    /// Module or command component.
    pub fn kind(&self) -> ArtifactKind {
        self.kind
    }
}

/// An artifact and where it came from.
#[derive(Debug, Clone)]
pub struct Loaded {
    /// The ready-to-run artifact.
    pub artifact: Arc<Artifact>,
    /// Compiled now, read from disk, or already in memory.
    pub source: ArtifactSource,
}

/// The linkers every artifact is linked against, built once per runtime
/// and only for the kinds it meets: a one-shot `wharf run` of a module does
/// not pay for the several hundred WASI p2 host functions.
#[derive(Default)]
pub(crate) struct Linkers {
    p1: OnceLock<wasmtime::Linker<P1State>>,
    p2: OnceLock<wasmtime::component::Linker<P2State>>,
    http: OnceLock<wasmtime::component::Linker<HttpState>>,
}

fn engine_error(e: wasmtime::Error) -> Error {
    Error::Engine(format!("{e:#}"))
}

impl Linkers {
    fn p1(&self, engine: &Engine) -> Result<&wasmtime::Linker<P1State>> {
        if let Some(linker) = self.p1.get() {
            return Ok(linker);
        }
        let mut p1 = wasmtime::Linker::new(engine);
        wasmtime_wasi::p1::add_to_linker_async(&mut p1, |s: &mut P1State| &mut s.wasi)
            .map_err(engine_error)?;
        Ok(self.p1.get_or_init(|| p1))
    }

    fn http(&self, engine: &Engine) -> Result<&wasmtime::component::Linker<HttpState>> {
        if let Some(linker) = self.http.get() {
            return Ok(linker);
        }
        let mut http = wasmtime::component::Linker::new(engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut http).map_err(engine_error)?;
        wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut http).map_err(engine_error)?;
        Ok(self.http.get_or_init(|| http))
    }

    fn p2(&self, engine: &Engine) -> Result<&wasmtime::component::Linker<P2State>> {
        if let Some(linker) = self.p2.get() {
            return Ok(linker);
        }
        let mut p2 = wasmtime::component::Linker::new(engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut p2).map_err(engine_error)?;
        Ok(self.p2.get_or_init(|| p2))
    }
}

/// Accepts the binary format, or the text format for hand-written tests.
fn to_binary(bytes: &[u8]) -> Result<std::borrow::Cow<'_, [u8]>> {
    if bytes.starts_with(b"\0asm") {
        return Ok(bytes.into());
    }
    let looks_like_text = std::str::from_utf8(bytes)
        .map(|s| s.trim_start().starts_with('(') || s.trim_start().starts_with(";;"))
        .unwrap_or(false);
    if !looks_like_text {
        return Err(Error::NotWasm);
    }
    wat::parse_bytes(bytes).map_err(|e| Error::Invalid(format!("invalid WebAssembly text: {e}")))
}

pub(crate) fn load(
    engine: &Engine,
    linkers: &Linkers,
    cache: &ArtifactCache,
    bytes: &[u8],
) -> Result<Loaded> {
    let digest = crate::cache::digest(bytes);
    if let Some(artifact) = cache.get(&digest) {
        return Ok(Loaded {
            artifact,
            source: ArtifactSource::MemoryCache,
        });
    }
    let binary = to_binary(bytes)?;
    let (prepared, source) = if wasmparser::Parser::is_component(&binary) {
        let (component, source) = compile(
            cache,
            &digest,
            &binary,
            |b| Component::new(engine, b),
            |p| {
                #[allow(unsafe_code)]
                // SAFETY: the file is precompiled code that this module wrote
                // (temporary file, fsync, rename) into Wharf's own cache
                // directory under the engine's compatibility hash; wasmtime
                // checks the header and engine settings again. Whoever can
                // write there can already replace the Wharf binary.
                unsafe {
                    Component::deserialize_file(engine, p)
                }
            },
            Component::serialize,
        )?;
        let exports_http = component
            .component_type()
            .exports(engine)
            .any(|(name, _)| name.starts_with("wasi:http/incoming-handler@"));
        if exports_http {
            let pre = linkers
                .http(engine)?
                .instantiate_pre(&component)
                .map_err(|e| Error::Unsupported(format!("cannot link the component: {e:#}")))?;
            let proxy = ProxyPre::new(pre).map_err(|e| {
                Error::Unsupported(format!("not a wasi:http/proxy component: {e:#}"))
            })?;
            let artifact = cache.insert(Arc::new(Artifact {
                digest,
                kind: ArtifactKind::HttpProxy,
                prepared: Prepared::Http(proxy),
            }));
            return Ok(Loaded { artifact, source });
        }
        let pre = linkers
            .p2(engine)?
            .instantiate_pre(&component)
            .map_err(|e| Error::Unsupported(format!("cannot link the component: {e:#}")))?;
        let command = CommandPre::new(pre).map_err(|e| {
            Error::Unsupported(format!(
                "the component does not export wasi:cli/run, so it is not a command \
                 (only command components run as tasks): {e:#}"
            ))
        })?;
        (Prepared::P2(command), source)
    } else if wasmparser::Parser::is_core_wasm(&binary) {
        let (module, source) = compile(
            cache,
            &digest,
            &binary,
            |b| Module::new(engine, b),
            |p| {
                #[allow(unsafe_code)]
                // SAFETY: as for components above: our own cache file.
                unsafe {
                    Module::deserialize_file(engine, p)
                }
            },
            Module::serialize,
        )?;
        match module.get_export("_start") {
            Some(ExternType::Func(_)) => {}
            _ => {
                return Err(Error::Unsupported(
                    "the module exports no `_start` function, so it is not a WASI command \
                     (reactors and libraries cannot run as tasks)"
                        .into(),
                ));
            }
        }
        let pre = linkers
            .p1(engine)?
            .instantiate_pre(&module)
            .map_err(|e| Error::Unsupported(format!("cannot link the module: {e:#}")))?;
        (Prepared::P1(pre), source)
    } else {
        return Err(Error::NotWasm);
    };
    let kind = match prepared {
        Prepared::P1(_) => ArtifactKind::P1Module,
        Prepared::P2(_) => ArtifactKind::P2Command,
        Prepared::Http(_) => ArtifactKind::HttpProxy,
    };
    let artifact = cache.insert(Arc::new(Artifact {
        digest,
        kind,
        prepared,
    }));
    Ok(Loaded { artifact, source })
}

/// Loads precompiled code from the disk cache or compiles and stores it.
fn compile<T>(
    cache: &ArtifactCache,
    digest: &str,
    binary: &[u8],
    compile: impl FnOnce(&[u8]) -> wasmtime::Result<T>,
    deserialize: impl FnOnce(&std::path::Path) -> wasmtime::Result<T>,
    serialize: impl FnOnce(&T) -> wasmtime::Result<Vec<u8>>,
) -> Result<(T, ArtifactSource)> {
    let path = cache.disk_path(digest);
    if let Some(path) = path.as_ref().filter(|p| p.is_file()) {
        match deserialize(path) {
            Ok(code) => {
                cache.counters.disk_hits.fetch_add(1, Ordering::Relaxed);
                return Ok((code, ArtifactSource::DiskCache));
            }
            Err(error) => {
                cache.counters.disk_errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %format!("{error:#}"), path = %path.display(),
                    "unusable compiled artifact in the cache, recompiling");
            }
        }
    }
    let code =
        compile(binary).map_err(|e| Error::Invalid(format!("invalid WebAssembly: {e:#}")))?;
    cache.counters.compiled.fetch_add(1, Ordering::Relaxed);
    if path.is_some() {
        match serialize(&code) {
            Ok(bytes) => cache.store(digest, &bytes),
            Err(error) => {
                tracing::warn!(error = %format!("{error:#}"), "cannot serialize compiled artifact")
            }
        }
    }
    Ok((code, ArtifactSource::Compiled))
}
