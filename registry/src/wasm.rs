//! Wasm artifacts in OCI, as the CNCF TAG Runtime "Wasm OCI Artifact"
//! layout has them — config `application/vnd.wasm.config.v0+json`, one
//! `application/wasm` layer — and the scan the registry records on push:
//! module or component, imports, exports, WASI world.

use serde::{Deserialize, Serialize};
use wasmparser::{Parser, Payload, Validator, WasmFeatures};

/// The config media type of a Wasm artifact.
pub const CONFIG_MEDIA_TYPE: &str = "application/vnd.wasm.config.v0+json";
/// The layer media type Wharf pushes.
pub const LAYER_MEDIA_TYPE: &str = "application/wasm";
/// Layer media types accepted on pull: ours, Spin's and runwasi's.
pub const ACCEPTED_LAYER_MEDIA_TYPES: [&str; 3] = [
    LAYER_MEDIA_TYPE,
    "application/vnd.wasm.content.layer.v1+wasm",
    "application/vnd.bytecodealliance.wasm.component.layer.v0+wasm",
];
/// The artifact type of the scan the registry attaches as a referrer.
pub const SCAN_ARTIFACT_TYPE: &str = "application/vnd.wharf.scan.v1+json";

/// What kind of Wasm binary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// A core module.
    Module,
    /// A component.
    Component,
}

/// The result of scanning a Wasm binary.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Scan {
    /// Module or component.
    pub kind: Kind,
    /// `wasip1` for modules, `wasip2` for components (the `os` of the config).
    pub os: String,
    /// The WASI world it fits: `wasi:cli/command`, `wasi:http/proxy`,
    /// `wasip1 command`, `wasip1 reactor`, or `custom`.
    pub world: String,
    /// Imports: `module::name` for modules, interface names for components.
    pub imports: Vec<String>,
    /// Exports.
    pub exports: Vec<String>,
}

/// Validates and scans a Wasm binary. The error says why it is not valid.
pub fn scan(bytes: &[u8]) -> Result<Scan, String> {
    let kind = if Parser::is_component(bytes) {
        Kind::Component
    } else if Parser::is_core_wasm(bytes) {
        Kind::Module
    } else {
        return Err("not a WebAssembly module or component".into());
    };
    Validator::new_with_features(WasmFeatures::all())
        .validate_all(bytes)
        .map_err(|e| format!("invalid WebAssembly: {e}"))?;
    let (mut imports, mut exports) = (Vec::new(), Vec::new());
    let mut depth = 0usize;
    for payload in Parser::new(0).parse_all(bytes) {
        let payload = payload.map_err(|e| format!("invalid WebAssembly: {e}"))?;
        match payload {
            Payload::Version { .. } => depth += 1,
            Payload::End(_) => depth = depth.saturating_sub(1),
            Payload::ImportSection(section) if depth == 1 => {
                for import in section.into_imports() {
                    let import = import.map_err(|e| e.to_string())?;
                    imports.push(format!("{}::{}", import.module, import.name));
                }
            }
            Payload::ExportSection(section) if depth == 1 => {
                for export in section {
                    exports.push(export.map_err(|e| e.to_string())?.name.to_owned());
                }
            }
            Payload::ComponentImportSection(section) if depth == 1 => {
                for import in section {
                    imports.push(import.map_err(|e| e.to_string())?.name.name.to_owned());
                }
            }
            Payload::ComponentExportSection(section) if depth == 1 => {
                for export in section {
                    exports.push(export.map_err(|e| e.to_string())?.name.name.to_owned());
                }
            }
            _ => {}
        }
    }
    let exports_prefix = |p: &str| exports.iter().any(|e| e.starts_with(p));
    let world = match kind {
        Kind::Component if exports_prefix("wasi:http/incoming-handler") => "wasi:http/proxy",
        Kind::Component if exports_prefix("wasi:cli/run") => "wasi:cli/command",
        Kind::Module if exports.iter().any(|e| e == "_start") => "wasip1 command",
        Kind::Module if exports.iter().any(|e| e == "_initialize") => "wasip1 reactor",
        _ => "custom",
    }
    .to_owned();
    Ok(Scan {
        kind,
        os: match kind {
            Kind::Module => "wasip1",
            Kind::Component => "wasip2",
        }
        .into(),
        world,
        imports,
        exports,
    })
}

/// The artifact config for a scanned binary.
pub fn config(scan: &Scan, layer_digest: &str) -> serde_json::Value {
    let mut config = serde_json::json!({
        "architecture": "wasm",
        "os": scan.os,
        "layerDigests": [layer_digest],
    });
    if scan.kind == Kind::Component {
        config["component"] = serde_json::json!({
            "imports": scan.imports,
            "exports": scan.exports,
            "target": scan.world,
        });
    }
    config
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scans_a_module_and_rejects_junk() {
        let wasm = wat::parse_str(
            r#"(module (import "wasi_snapshot_preview1" "fd_write" (func (param i32 i32 i32 i32) (result i32)))
                       (memory (export "memory") 1) (func (export "_start")))"#,
        )
        .unwrap();
        let scan = scan(&wasm).unwrap();
        assert_eq!(scan.kind, Kind::Module);
        assert_eq!(scan.world, "wasip1 command");
        assert_eq!(scan.imports, ["wasi_snapshot_preview1::fd_write"]);
        assert_eq!(scan.exports, ["memory", "_start"]);
        assert!(
            super::scan(b"hello")
                .unwrap_err()
                .contains("not a WebAssembly")
        );
        assert!(
            super::scan(&wasm[..wasm.len() - 3])
                .unwrap_err()
                .contains("invalid")
        );
    }

    #[test]
    fn scans_a_component() {
        let wasm =
            wat::parse_str(r#"(component (import "wasi:cli/stdout@0.2.0" (instance)) )"#).unwrap();
        let scan = scan(&wasm).unwrap();
        assert_eq!(
            (scan.kind, scan.os.as_str(), scan.world.as_str()),
            (Kind::Component, "wasip2", "custom")
        );
        assert_eq!(scan.imports, ["wasi:cli/stdout@0.2.0"]);
    }
}
