//! The compiled-artifact cache: in memory within a runtime, on disk across
//! runtimes (as across restarts), shown by counters rather than timings.

use wharf_runtime::{ArtifactSource, CacheStats, Runtime, RuntimeConfig};
use wharf_testkit::{Target, wasm_bytes};

fn with_disk(dir: &std::path::Path) -> std::sync::Arc<Runtime> {
    Runtime::new(RuntimeConfig {
        max_instances: 8,
        cache_dir: Some(dir.to_owned()),
        ..RuntimeConfig::default()
    })
    .unwrap()
}

#[test]
fn second_runtime_loads_precompiled_code_from_disk() {
    let dir = tempfile::tempdir().unwrap();
    for target in Target::ALL {
        let bytes = wasm_bytes("hello", target);
        let first = with_disk(dir.path());
        assert_eq!(first.load(&bytes).unwrap().source, ArtifactSource::Compiled);
        assert_eq!(
            first.load(&bytes).unwrap().source,
            ArtifactSource::MemoryCache
        );
        assert_eq!(
            first.cache_stats(),
            CacheStats {
                compiled: 1,
                disk_hits: 0,
                memory_hits: 1,
                disk_errors: 0
            }
        );
        drop(first);

        let second = with_disk(dir.path());
        let loaded = second.load(&bytes).unwrap();
        assert_eq!(loaded.source, ArtifactSource::DiskCache);
        assert_eq!(second.cache_stats().compiled, 0);
        assert_eq!(second.cache_stats().disk_hits, 1);
        assert!(second.cached(loaded.artifact.digest()).is_some());
    }
}

#[test]
fn no_temporary_files_are_left_behind() {
    let dir = tempfile::tempdir().unwrap();
    let rt = with_disk(dir.path());
    for sample in ["hello", "cpu", "echo"] {
        rt.load(&wasm_bytes(sample, Target::P1)).unwrap();
    }
    let mut names = Vec::new();
    for engine_dir in std::fs::read_dir(dir.path()).unwrap() {
        for file in std::fs::read_dir(engine_dir.unwrap().path()).unwrap() {
            names.push(file.unwrap().file_name().to_string_lossy().into_owned());
        }
    }
    assert_eq!(names.len(), 3, "{names:?}");
    assert!(
        names
            .iter()
            .all(|n| n.ends_with(".cwasm") && !n.starts_with(".tmp")),
        "{names:?}"
    );
}

#[test]
fn digest_is_the_oci_sha256() {
    assert_eq!(
        wharf_runtime::digest(b""),
        "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    );
}

#[tokio::test]
async fn engine_falls_back_to_on_demand_when_the_pool_cannot_be_reserved() {
    // Millions of slots of several GiB each cannot be reserved in a 47-bit
    // address space; the runtime must still come up and run tasks.
    let rt = Runtime::new(RuntimeConfig {
        max_instances: 50_000_000,
        ..RuntimeConfig::default()
    })
    .unwrap();
    assert_eq!(rt.allocator(), wharf_runtime::Allocator::OnDemand);
    let artifact = rt.load(&wasm_bytes("hello", Target::P1)).unwrap().artifact;
    let (spec, logs) = crate::spec(&[]);
    let outcome = rt.run(&artifact, &spec).await;
    assert_eq!(outcome.stop_code, wharf_runtime::StopCode::Completed);
    assert_eq!(logs.stdout_text(), "Hello, world!\n");
}

#[test]
fn default_runtime_uses_the_pool() {
    let rt = Runtime::new(RuntimeConfig {
        max_instances: 16,
        ..RuntimeConfig::default()
    })
    .unwrap();
    assert_eq!(rt.allocator(), wharf_runtime::Allocator::Pooling);
}
