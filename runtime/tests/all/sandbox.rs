//! One task at a time through `Runtime::run`.

use std::time::Duration;

use wharf_runtime::{ArtifactKind, Error, Limits, StopCode};
use wharf_testkit::Target;

use crate::{load, runtime, spec};

#[tokio::test]
async fn captures_output_and_reports_figures() {
    let rt = runtime();
    for target in Target::ALL {
        let artifact = load(&rt, "hello", target);
        let kind = if target == Target::P1 {
            ArtifactKind::P1Module
        } else {
            ArtifactKind::P2Command
        };
        assert_eq!(artifact.kind(), kind);
        let (spec, logs) = spec(&[]);
        let outcome = rt.run(&artifact, &spec).await;
        assert_eq!(outcome.stop_code, StopCode::Completed, "{outcome:?}");
        assert_eq!(outcome.exit_code, Some(0));
        assert!(outcome.fuel_consumed > 0);
        assert!(outcome.peak_memory_bytes > 0);
        assert_eq!(logs.stdout_text(), "Hello, world!\n");
    }
}

#[tokio::test]
async fn memory_limit_above_the_node_maximum_fails_to_start() {
    let rt = runtime();
    let artifact = load(&rt, "hello", Target::P1);
    let (mut spec, _) = spec(&[]);
    spec.limits.memory = Some(1 << 40);
    let outcome = rt.run(&artifact, &spec).await;
    assert_eq!(outcome.stop_code, StopCode::FailedToStart);
    assert!(
        outcome.message.contains("exceeds this node's maximum"),
        "{outcome:?}"
    );
}

#[tokio::test]
async fn ungrantable_directory_fails_to_start() {
    let rt = runtime();
    let artifact = load(&rt, "fileio", Target::P2);
    let (mut spec, _) = spec(&[]);
    spec.dirs
        .push(wharf_runtime::DirGrant::parse("/no/such/dir:/data").unwrap());
    let outcome = rt.run(&artifact, &spec).await;
    assert_eq!(outcome.stop_code, StopCode::FailedToStart);
    assert!(outcome.message.contains("/no/such/dir"), "{outcome:?}");
}

#[tokio::test]
async fn limits_map_to_their_stop_codes() {
    let rt = runtime();
    let cases: [(&str, &[&str], Limits, StopCode); 5] = [
        (
            "cpu",
            &[],
            Limits {
                fuel: Some(50_000),
                ..Limits::default()
            },
            StopCode::OutOfFuel,
        ),
        (
            "memhog",
            &[],
            Limits {
                memory: Some(32 << 20),
                ..Limits::default()
            },
            StopCode::MemoryLimit,
        ),
        (
            "spin",
            &[],
            Limits {
                timeout: Some(Duration::from_millis(100)),
                ..Limits::default()
            },
            StopCode::Timeout,
        ),
        ("recurse", &[], Limits::default(), StopCode::Trap),
        ("exitcode", &["9"], Limits::default(), StopCode::NonZeroExit),
    ];
    for target in Target::ALL {
        for (sample, args, limits, expected) in &cases {
            let artifact = load(&rt, sample, target);
            let (mut spec, _) = spec(args);
            spec.limits = *limits;
            let outcome = rt.run(&artifact, &spec).await;
            assert_eq!(
                outcome.stop_code, *expected,
                "{sample} {target:?}: {outcome:?}"
            );
        }
    }
}

#[test]
fn bad_bytes_are_load_errors_not_panics() {
    let rt = runtime();
    assert!(matches!(rt.load(b"hello"), Err(Error::NotWasm)));
    assert!(matches!(rt.load(b""), Err(Error::NotWasm)));
    assert!(matches!(
        rt.load(b"\0asm\x01\0\0\0\x01"),
        Err(Error::Invalid(_))
    ));
    assert!(matches!(
        rt.load(b"(module (func $x (i32.add)))"),
        Err(Error::Invalid(_))
    ));
    let err = rt
        .load(b"(module (import \"env\" \"f\" (func)) (func (export \"_start\")))")
        .unwrap_err();
    assert!(matches!(err, Error::Unsupported(_)), "{err:?}");
    assert!(err.to_string().contains("env::f"), "{err}");
}

#[test]
fn parsing_grants() {
    use wharf_runtime::DirGrant;
    let g = DirGrant::parse("/tmp/x:/data:ro").unwrap();
    assert_eq!(
        (g.host.to_str().unwrap(), g.guest.as_str(), g.read_only),
        ("/tmp/x", "/data", true)
    );
    let g = DirGrant::parse("/tmp/x").unwrap();
    assert_eq!(
        (g.host.to_str().unwrap(), g.guest.as_str(), g.read_only),
        ("/tmp/x", "/tmp/x", false)
    );
    assert!(DirGrant::parse(":/data").is_err());
    assert!(DirGrant::parse("/x:").is_err());
}
