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

/// Writes 32 bytes from `random_get` as hex and a newline.
const RANDOM_HEX: &str = r#"(module
  (import "wasi_snapshot_preview1" "random_get" (func $random_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 64) "0123456789abcdef")
  (func (export "_start") (local $i i32) (local $b i32)
    (if (i32.ne (call $random_get (i32.const 0) (i32.const 32)) (i32.const 0)) (then unreachable))
    (loop $l
      (local.set $b (i32.load8_u (local.get $i)))
      (i32.store8 (i32.add (i32.const 128) (i32.shl (local.get $i) (i32.const 1)))
        (i32.load8_u (i32.add (i32.const 64) (i32.shr_u (local.get $b) (i32.const 4)))))
      (i32.store8 (i32.add (i32.const 129) (i32.shl (local.get $i) (i32.const 1)))
        (i32.load8_u (i32.add (i32.const 64) (i32.and (local.get $b) (i32.const 15)))))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br_if $l (i32.lt_u (local.get $i) (i32.const 32))))
    (i32.store8 (i32.const 192) (i32.const 10))
    (i32.store (i32.const 256) (i32.const 128))
    (i32.store (i32.const 260) (i32.const 65))
    (drop (call $fd_write (i32.const 1) (i32.const 256) (i32.const 1) (i32.const 300)))))"#;

#[tokio::test]
async fn each_task_gets_its_own_secure_random_bytes() {
    let rt = runtime();
    let artifact = rt.load(RANDOM_HEX.as_bytes()).unwrap().artifact;
    let mut seen = std::collections::HashSet::new();
    for _ in 0..8 {
        let (spec, logs) = spec(&[]);
        let outcome = rt.run(&artifact, &spec).await;
        assert_eq!(outcome.stop_code, StopCode::Completed, "{outcome:?}");
        let text = logs.stdout_text();
        let hex = text.trim_end();
        assert_eq!(hex.len(), 64, "{text:?}");
        assert_ne!(hex, "0".repeat(64));
        assert!(
            seen.insert(hex.to_string()),
            "a task saw another's bytes: {hex}"
        );
    }
}

/// Asks `random_get` for 2 MiB into a one-page memory; exits 3 if WASI
/// answers with an error instead of trapping.
const RANDOM_TOO_MUCH: &str = r#"(module
  (import "wasi_snapshot_preview1" "random_get" (func $random_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "proc_exit" (func $proc_exit (param i32)))
  (memory (export "memory") 1)
  (func (export "_start")
    (if (i32.ne (call $random_get (i32.const 0) (i32.const 0x200000)) (i32.const 0))
      (then (call $proc_exit (i32.const 3))))))"#;

#[tokio::test]
async fn random_bytes_beyond_the_memory_limit_trap_before_the_host_makes_them() {
    // The host would fill the whole buffer in memory of its own, outside
    // the guest's limit, before finding it does not fit the guest.
    let rt = runtime();
    let artifact = rt.load(RANDOM_TOO_MUCH.as_bytes()).unwrap().artifact;
    let (mut too_much, _) = spec(&[]);
    too_much.limits.memory = Some(1 << 20);
    let outcome = rt.run(&artifact, &too_much).await;
    assert_eq!(outcome.stop_code, StopCode::Trap, "{outcome:?}");
    assert!(
        outcome.message.contains("exceeds limit 1048576"),
        "{outcome:?}"
    );
    // Within the limit, the same call is served.
    let artifact = rt.load(RANDOM_HEX.as_bytes()).unwrap().artifact;
    let (mut spec, logs) = spec(&[]);
    spec.limits.memory = Some(1 << 20);
    let outcome = rt.run(&artifact, &spec).await;
    assert_eq!(outcome.stop_code, StopCode::Completed, "{outcome:?}");
    assert_eq!(logs.stdout_text().trim_end().len(), 64);
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
