//! Every sample in `samples/` through `wharf run`, under both WASI targets,
//! with its expected output and stop code. A sample without a test here
//! fails to compile (see the bottom of this file).

use wharf_testkit::{Target, wasm};

use crate::support::Wharf;

macro_rules! assert_test_exists {
    ($name:ident) => {
        const _: fn() = $name;
    };
}
wharf_testkit::for_each_sample!(assert_test_exists);

#[test]
fn hello() {
    let wharf = Wharf::new();
    for target in Target::ALL {
        let r = wharf.run(&[], &wasm("hello", target), &[]);
        r.assert("Completed", 0);
        assert_eq!(r.stdout, "Hello, world!\n");
        assert_eq!(r.report["exit_code"], 0);
        assert!(
            r.report["peak_memory_bytes"].as_u64().unwrap() > 0,
            "{r:#?}"
        );
        assert!(r.report["fuel_consumed"].as_u64().unwrap() > 0, "{r:#?}");
        let kind = if target == Target::P1 {
            "p1_module"
        } else {
            "p2_command"
        };
        assert_eq!(r.report["kind"], kind);
    }
}

#[test]
fn http_hello() {
    // An HTTP component is served per request (`tests/all/serve.rs`), not
    // run as a command; built as a core module it has no `_start`.
    let wharf = Wharf::new();
    let r = wharf.run(&[], &wasm("http_hello", Target::P2), &[]);
    r.assert("FailedToStart", 126);
    assert!(r.message().contains("HTTP component"), "{r:#?}");
    assert_eq!(r.report["kind"], "http_proxy");
    let r = wharf.run(&[], &wasm("http_hello", Target::P1), &[]);
    r.assert("FailedToStart", 126);
}

#[test]
fn http_echo() {
    let s = crate::serve::serve_target(&[], wasm("http_echo", Target::P2).to_str().unwrap(), &[]);
    let r = crate::server::call(
        ureq::post(&format!("{}/a/b?c=d", s.base))
            .set("X-Test", "yes")
            .send_string("the body"),
    );
    assert_eq!(r.status, 200, "{r:?}");
    let v = r.json();
    assert_eq!(v["method"], "POST");
    assert_eq!(v["path"], "/a/b?c=d");
    assert_eq!(v["body"], "the body");
    assert!(
        v["headers"]
            .as_array()
            .unwrap()
            .iter()
            .any(|h| h[0] == "x-test" && h[1] == "yes"),
        "{v}"
    );
    assert_eq!(crate::serve::get(&s, "/healthz").body, b"ok\n");
    assert_eq!(crate::serve::get(&s, "/fail-health").status, 500);
}

#[test]
fn http_slow() {
    let s = crate::serve::serve_target(
        &["--timeout", "1s"],
        wasm("http_slow", Target::P2).to_str().unwrap(),
        &[],
    );
    let started = std::time::Instant::now();
    let r = crate::serve::get(&s, "/300");
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.body, b"waited 300 ms\n");
    assert!(started.elapsed() >= std::time::Duration::from_millis(300));
    // Blocked in a WASI clock past the timeout: 504.
    assert_eq!(crate::serve::get(&s, "/5000").status, 504);
}

#[test]
fn http_trap() {
    let s = crate::serve::serve_target(&[], wasm("http_trap", Target::P2).to_str().unwrap(), &[]);
    assert_eq!(crate::serve::get(&s, "/healthz").body, b"ok\n");
    let r = crate::serve::get(&s, "/anything");
    assert_eq!(r.status, 500, "{r:?}");
    assert_eq!(r.header("x-wharf-stop-code"), Some("Trap"));
    assert_eq!(crate::serve::get(&s, "/healthz").status, 200);
}

#[test]
fn http_spin() {
    let s = crate::serve::serve_target(
        &["--timeout", "300ms"],
        wasm("http_spin", Target::P2).to_str().unwrap(),
        &[],
    );
    let r = crate::serve::get(&s, "/forever");
    assert_eq!(r.status, 504, "{r:?}");
    assert_eq!(r.header("x-wharf-stop-code"), Some("Timeout"));
    let s = crate::serve::serve_target(
        &["--fuel", "1000000"],
        wasm("http_spin", Target::P2).to_str().unwrap(),
        &[],
    );
    let r = crate::serve::get(&s, "/forever");
    assert_eq!(r.status, 500, "{r:?}");
    assert_eq!(r.header("x-wharf-stop-code"), Some("OutOfFuel"));
    assert_eq!(crate::serve::get(&s, "/healthz").body, b"ok\n");
}

#[test]
fn http_fetch() {
    let hello =
        crate::serve::serve_target(&[], wasm("http_hello", Target::P2).to_str().unwrap(), &[]);
    let fetch = wasm("http_fetch", Target::P2);
    let open = crate::serve::serve_target(
        &["--allow-outbound", "http://127.0.0.1:*"],
        fetch.to_str().unwrap(),
        &[],
    );
    let closed = crate::serve::serve_target(&[], fetch.to_str().unwrap(), &[]);
    let url = format!("/?url={}/x", hello.base);
    let r = crate::serve::get(&open, &url);
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.body, b"fetched 200: hello from wharf: GET /x\n");
    let r = crate::serve::get(&closed, &url);
    assert_eq!(r.status, 502, "{r:?}");
    assert!(String::from_utf8_lossy(&r.body).contains("HttpRequestDenied"));
}

#[test]
fn echo() {
    let wharf = Wharf::new();
    for target in Target::ALL {
        let r = wharf.run(
            &["--env", "A=1", "--env", "B=two words"],
            &wasm("echo", target),
            &["x", "y z"],
        );
        r.assert("Completed", 0);
        assert_eq!(r.stdout, "args:\nx\ny z\nenv:\nA=1\nB=two words\n");
        // Closed by default: the host's environment (PATH, HOME, ...) is not
        // visible unless granted.
        let r = wharf.run(&[], &wasm("echo", target), &[]);
        assert_eq!(r.stdout, "args:\nenv:\n");
    }
}

/// The exit code a guest built by Rust's std reports for `exit(code)`:
/// on wasm32-wasip2 std calls `wasi:cli/exit.exit(err)`, which carries no
/// number, so every failure is 1 (the host honours `exit-with-code` when a
/// guest uses it).
fn std_exit_code(target: Target, code: i32) -> i32 {
    match target {
        Target::P1 => code,
        Target::P2 => 1,
    }
}

#[test]
fn exitcode() {
    let wharf = Wharf::new();
    for target in Target::ALL {
        let r = wharf.run(&[], &wasm("exitcode", target), &["7"]);
        let code = std_exit_code(target, 7);
        r.assert("NonZeroExit", code);
        assert_eq!(r.report["exit_code"], code);
        assert!(r.stderr.contains("exiting with 7"), "{r:#?}");
        wharf
            .run(&[], &wasm("exitcode", target), &["0"])
            .assert("Completed", 0);
    }
}

#[test]
fn cpu() {
    let wharf = Wharf::new();
    for target in Target::ALL {
        let r = wharf.run(&[], &wasm("cpu", target), &["1000"]);
        r.assert("Completed", 0);
        assert!(r.stdout.starts_with("cpu rounds=1000 hash="), "{r:#?}");
        let r = wharf.run(&["--fuel", "100_000"], &wasm("cpu", target), &[]);
        r.assert("OutOfFuel", 134);
        assert_eq!(r.report["fuel_consumed"], 100_000);
        assert!(r.message().contains("fuel"), "{r:#?}");
    }
}

#[test]
fn memhog() {
    let wharf = Wharf::new();
    for target in Target::ALL {
        let r = wharf.run(&["--memory", "64MiB"], &wasm("memhog", target), &[]);
        r.assert("MemoryLimit", 134);
        let peak = r.report["peak_memory_bytes"].as_u64().unwrap();
        assert!(peak <= 64 << 20 && peak > 32 << 20, "{r:#?}");
        assert!(r.stdout.contains("memhog at 32 MiB"), "{r:#?}");
        assert!(r.message().contains("memory limit"), "{r:#?}");
        let r = wharf.run(&["--memory", "64MiB"], &wasm("memhog", target), &["8"]);
        r.assert("Completed", 0);
        assert!(r.stdout.ends_with("memhog held 8 MiB\n"), "{r:#?}");
    }
}

#[test]
fn spin() {
    let wharf = Wharf::new();
    for target in Target::ALL {
        let r = wharf.run(&["--timeout", "300ms"], &wasm("spin", target), &[]);
        r.assert("Timeout", 124);
        assert_eq!(r.stdout, "spinning\n");
        let ms = r.report["duration_ms"].as_f64().unwrap();
        assert!((300.0..5_000.0).contains(&ms), "{r:#?}");
        assert!(r.message().contains("300ms timeout"), "{r:#?}");
    }
}

#[test]
fn recurse() {
    let wharf = Wharf::new();
    for target in Target::ALL {
        let r = wharf.run(&[], &wasm("recurse", target), &[]);
        r.assert("Trap", 134);
        assert!(r.message().contains("wasm trap"), "{r:#?}");
    }
}

#[test]
fn fileio() {
    let wharf = Wharf::new();
    for target in Target::ALL {
        let dir = tempfile::tempdir().unwrap();
        let grant = format!("{}:/data", dir.path().display());
        let r = wharf.run(
            &["--dir", &grant],
            &wasm("fileio", target),
            &["written by wasm"],
        );
        r.assert("Completed", 0);
        assert_eq!(r.stdout, "read back: written by wasm\nlisting: out.txt\n");
        assert_eq!(
            std::fs::read_to_string(dir.path().join("out.txt")).unwrap(),
            "written by wasm"
        );

        // Closed by default: no grant, no file system.
        let r = wharf.run(&[], &wasm("fileio", target), &[]);
        r.assert("NonZeroExit", std_exit_code(target, 2));
        assert!(r.stderr.contains("cannot write /data/out.txt"), "{r:#?}");

        // Read-only grants cannot be written.
        let ro = tempfile::tempdir().unwrap();
        let grant = format!("{}:/data:ro", ro.path().display());
        let r = wharf.run(&["--dir", &grant], &wasm("fileio", target), &[]);
        r.assert("NonZeroExit", std_exit_code(target, 2));
        assert!(!ro.path().join("out.txt").exists());
    }
}

#[test]
fn heartbeat() {
    let wharf = Wharf::new();
    for target in Target::ALL {
        let r = wharf.run(&[], &wasm("heartbeat", target), &["10", "3"]);
        r.assert("Completed", 0);
        assert_eq!(r.stdout, "heartbeat 0\nheartbeat 1\nheartbeat 2\n");
        // Blocked in a WASI sleep most of the time: the timeout still holds.
        let r = wharf.run(&["--timeout", "500ms"], &wasm("heartbeat", target), &["50"]);
        r.assert("Timeout", 124);
        let beats = r.stdout.lines().count();
        assert!((3..=12).contains(&beats), "{r:#?}");
    }
}

#[test]
fn flood() {
    let wharf = Wharf::new();
    for target in Target::ALL {
        let r = wharf.run(&[], &wasm("flood", target), &["256"]);
        r.assert("Completed", 0);
        assert_eq!(r.stdout.len(), 256 << 20);
        assert!(r.stderr.contains("flooded 256 MiB"), "{}", r.stderr);
        // The host streams the output instead of holding it.
        let rss = r.report["host_max_rss_bytes"]
            .as_u64()
            .expect("host_max_rss_bytes in report");
        assert!(
            rss < 128 << 20,
            "wharf held {rss} bytes while the guest wrote 256 MiB"
        );
    }
}

#[test]
fn cat() {
    let wharf = Wharf::new();
    for target in Target::ALL {
        let r = wharf.run_with_stdin(&[], &wasm("cat", target), &[], b"line one\nline two\n");
        r.assert("Completed", 0);
        assert_eq!(r.stdout, "line one\nline two\n");
        // Blocked in a WASI read on a stdin that never ends: the timeout holds.
        let r = wharf.run_with_open_stdin(&["--timeout", "300ms"], &wasm("cat", target), &[]);
        r.assert("Timeout", 124);
    }
}

#[test]
fn trap() {
    let wharf = Wharf::new();
    for target in Target::ALL {
        let r = wharf.run(&[], &wasm("trap", target), &[]);
        r.assert("Trap", 134);
        assert!(r.message().contains("unreachable"), "{r:#?}");
        let r = wharf.run(&[], &wasm("trap", target), &["panic"]);
        r.assert("Trap", 134);
        assert!(r.stderr.contains("the guest gave up"), "{r:#?}");
    }
}
