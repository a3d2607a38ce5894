//! `wharf run` on files that are not runnable commands, the compile cache
//! across processes, and the CLI's own output.

use wharf_testkit::{Target, wasm, wat};

use crate::support::Wharf;

#[test]
fn not_wasm_fails_to_start_with_a_clear_message() {
    let wharf = Wharf::new();
    let file = wharf.path().join("notes.txt");
    std::fs::write(&file, "just some text\n").unwrap();
    let r = wharf.run(&[], &file, &[]);
    r.assert("FailedToStart", 126);
    assert!(r.message().contains("not a WebAssembly file"), "{r:#?}");
    assert!(r.stderr.contains("FailedToStart"), "{r:#?}");
}

#[test]
fn truncated_wasm_fails_to_start() {
    let wharf = Wharf::new();
    for target in Target::ALL {
        let bytes = std::fs::read(wasm("hello", target)).unwrap();
        let file = wharf.path().join("truncated.wasm");
        std::fs::write(&file, &bytes[..bytes.len() / 2]).unwrap();
        let r = wharf.run(&[], &file, &[]);
        r.assert("FailedToStart", 126);
        assert!(r.message().contains("invalid WebAssembly"), "{r:#?}");
    }
}

#[test]
fn unknown_import_is_named() {
    let r = Wharf::new().run(&[], &wat("missing_import"), &[]);
    r.assert("FailedToStart", 126);
    assert!(r.message().contains("launch_rockets"), "{r:#?}");
}

#[test]
fn module_without_start_is_not_a_command() {
    let r = Wharf::new().run(&[], &wat("no_start"), &[]);
    r.assert("FailedToStart", 126);
    assert!(r.message().contains("_start"), "{r:#?}");
}

#[test]
fn component_without_run_is_an_unsupported_world() {
    let r = Wharf::new().run(&[], &wat("empty_component"), &[]);
    r.assert("FailedToStart", 126);
    assert!(r.message().contains("wasi:cli/run"), "{r:#?}");
}

#[test]
fn divide_by_zero_is_a_trap_with_its_kind() {
    let r = Wharf::new().run(&[], &wat("divzero"), &[]);
    r.assert("Trap", 134);
    assert!(r.message().contains("integer divide by zero"), "{r:#?}");
}

#[test]
fn missing_file_fails_to_start() {
    let wharf = Wharf::new();
    let r = wharf.run(&[], &wharf.path().join("nope.wasm"), &[]);
    r.assert("FailedToStart", 126);
    assert!(r.message().contains("cannot read"), "{r:#?}");
}

#[test]
fn large_memory_limit_sizes_the_engine() {
    // `wharf run` sizes its engine for what is asked, so a large limit works.
    let r = Wharf::new().run(&["--memory", "2GiB"], &wasm("hello", Target::P1), &[]);
    r.assert("Completed", 0);
}

#[test]
fn second_run_uses_the_disk_compile_cache() {
    let wharf = Wharf::new();
    for target in Target::ALL {
        let first = wharf.run(&[], &wasm("hello", target), &[]);
        first.assert("Completed", 0);
        assert_eq!(first.report["artifact_source"], "compiled", "{first:#?}");
        let second = wharf.run(&[], &wasm("hello", target), &[]);
        second.assert("Completed", 0);
        assert_eq!(
            second.report["artifact_source"], "disk_cache",
            "{second:#?}"
        );
        assert_eq!(first.report["digest"], second.report["digest"]);
    }
}

#[test]
fn corrupt_cache_entries_are_recompiled() {
    let wharf = Wharf::new();
    let file = wasm("hello", Target::P1);
    wharf.run(&[], &file, &[]).assert("Completed", 0);
    let mut corrupted = 0;
    for entry in walk(&wharf.path().join("data")) {
        if entry.extension().is_some_and(|e| e == "cwasm") {
            std::fs::write(&entry, b"garbage").unwrap();
            corrupted += 1;
        }
    }
    assert_eq!(corrupted, 1);
    let r = wharf.run(&[], &file, &[]);
    r.assert("Completed", 0);
    assert_eq!(r.report["artifact_source"], "compiled");
    assert_eq!(r.stdout, "Hello, world!\n");
}

#[test]
fn stats_prints_one_summary_line() {
    let r = Wharf::new().run(&["--stats"], &wasm("hello", Target::P1), &[]);
    r.assert("Completed", 0);
    let line = r
        .stderr
        .lines()
        .find(|l| l.starts_with("wharf: Completed"))
        .expect("stats line");
    assert!(
        line.contains("exit=0") && line.contains("fuel=") && line.contains("peak_memory="),
        "{line}"
    );
}

#[test]
fn report_has_the_contract_fields() {
    let r = Wharf::new().run(&[], &wasm("hello", Target::P2), &[]);
    for field in [
        "stop_code",
        "exit_code",
        "fuel_consumed",
        "duration_ms",
        "peak_memory_bytes",
        "message",
    ] {
        assert!(
            r.report.get(field).is_some(),
            "missing {field} in {:#}",
            r.report
        );
    }
}

#[test]
fn bad_flags_are_rejected_by_name() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_wharf"))
        .args(["run", "--memory", "lots", "x.wasm"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--memory") && stderr.contains("invalid size"),
        "{stderr}"
    );
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(walk(&path));
        } else {
            out.push(path);
        }
    }
    out
}

#[test]
fn wat_hello_runs_without_a_wasm_toolchain() {
    let r = Wharf::new().run(&[], &wat("hello"), &[]);
    r.assert("Completed", 0);
    assert_eq!(r.stdout, "Hello from Wharf!\n");
}
