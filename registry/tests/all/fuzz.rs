//! Property-based fuzzing of everything that parses what a client sends:
//! `/v2/` paths, names, references and digests, Wasm scans, and manifest
//! validation. Each property runs a bounded number of cases in CI
//! (`PROPTEST_CASES` raises it for a longer local run); a failure proptest
//! finds is saved under `proptest-regressions/` and replayed first from
//! then on, so a crash found becomes a regression test.

use std::sync::Arc;

use proptest::prelude::*;
use serde_json::{Value, json};
use wharf_registry::digest::Digest;
use wharf_registry::path::{self, Name, Reference, Route};
use wharf_registry::storage::fs::FsStorage;
use wharf_registry::store::Store;

/// Path-like strings: mostly the segments the parser looks for.
fn v2_path() -> impl Strategy<Value = String> {
    let segment = prop_oneof![
        Just("blobs".to_owned()),
        Just("uploads".to_owned()),
        Just("manifests".to_owned()),
        Just("tags".to_owned()),
        Just("list".to_owned()),
        Just("referrers".to_owned()),
        Just("_catalog".to_owned()),
        Just(String::new()),
        Just("sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef".to_owned()),
        "[a-z0-9._-]{1,12}",
        "\\PC{0,16}",
    ];
    prop::collection::vec(segment, 0..8).prop_map(|s| format!("/v2/{}", s.join("/")))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2_000))]

    #[test]
    fn paths_parse_without_panicking_and_names_round_trip(p in v2_path()) {
        if let Some(Ok(route)) = path::parse(&p) {
            let name = match &route {
                Route::Tags(n) | Route::UploadStart(n) | Route::Upload(n, _) => Some(n),
                Route::Blob(n, _) | Route::Referrers(n, _) => Some(n),
                Route::Manifest(n, _) => Some(n),
                Route::Base | Route::Catalog => None,
            };
            if let Some(n) = name {
                let again = Name::parse(n.as_str()).unwrap();
                prop_assert_eq!(again.as_str(), n.as_str());
            }
        }
    }

    #[test]
    fn arbitrary_paths_never_panic(p in "\\PC{0,200}") {
        let _ = path::parse(&p);
        let _ = path::parse(&format!("/v2/{p}"));
    }

    #[test]
    fn digests_and_references_parse_or_refuse(s in "\\PC{0,80}", hex in "[0-9a-f]{64}") {
        if let Ok(d) = s.parse::<Digest>() {
            prop_assert_eq!(d.to_string().parse::<Digest>().unwrap(), d);
        }
        let d: Digest = format!("sha256:{hex}").parse().unwrap();
        prop_assert_eq!(d.hex(), hex.as_str());
        if let Ok(r) = Reference::parse(&s) {
            prop_assert_eq!(Reference::parse(&r.to_string()).unwrap().to_string(), r.to_string());
        }
        let _ = Name::parse(&s);
    }

    #[test]
    fn wasm_scans_never_panic(mut bytes in prop::collection::vec(any::<u8>(), 0..512), magic in any::<bool>()) {
        if magic {
            let mut with = b"\0asm\x01\0\0\0".to_vec();
            with.append(&mut bytes);
            bytes = with;
        }
        let _ = wharf_registry::wasm::scan(&bytes);
    }
}

/// Descriptors and manifests shaped like the real thing, with wrong parts.
fn descriptor() -> impl Strategy<Value = Value> {
    (
        prop_oneof![
            Just(json!("application/wasm")),
            Just(json!(
                "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
            )),
            Just(json!(7)),
            "\\PC{0,20}".prop_map(Value::from),
        ],
        prop_oneof![
            "[0-9a-f]{64}".prop_map(|h| json!(format!("sha256:{h}"))),
            "\\PC{0,20}".prop_map(Value::from),
            Just(Value::Null),
        ],
        prop_oneof![any::<i64>().prop_map(Value::from), Just(json!("big"))],
        prop_oneof![
            Just(Value::Null),
            Just(json!(["https://example.com/x"])),
            Just(json!(["file:///etc/passwd"])),
            Just(json!("not-a-list")),
        ],
    )
        .prop_map(|(media, digest, size, urls)| {
            let mut d = json!({"mediaType": media, "digest": digest, "size": size});
            if !urls.is_null() {
                d["urls"] = urls;
            }
            d
        })
}

fn manifest() -> impl Strategy<Value = Value> {
    (
        prop_oneof![
            Just(json!("application/vnd.oci.image.manifest.v1+json")),
            Just(json!("application/vnd.oci.image.index.v1+json")),
            "\\PC{0,30}".prop_map(Value::from),
        ],
        prop_oneof![Just(json!(2)), Just(json!(1)), Just(json!("2"))],
        descriptor(),
        prop::collection::vec(descriptor(), 0..4),
        prop::option::of(descriptor()),
    )
        .prop_map(|(media, version, config, layers, subject)| {
            let mut m = json!({
                "schemaVersion": version, "mediaType": media,
                "config": config, "layers": layers.clone(), "manifests": layers,
            });
            if let Some(s) = subject {
                m["subject"] = s;
            }
            m
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(500))]

    #[test]
    fn manifest_validation_refuses_with_a_client_error(
        m in manifest(),
        raw in prop::collection::vec(any::<u8>(), 0..256),
        content_type in prop::option::of("\\PC{0,40}"),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(Arc::new(FsStorage::open(dir.path()).unwrap()));
        let name = Name::parse("fuzz/app").unwrap();
        let tag = Reference::parse("v1").unwrap();
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        for body in [serde_json::to_vec(&m).unwrap(), raw] {
            let result = rt.block_on(store.put_manifest(&name, &tag, content_type.as_deref(), &body));
            if let Err(e) = result {
                prop_assert!(e.code().is_some(), "not a client error: {e:?} for {m}");
            }
        }
    }
}
