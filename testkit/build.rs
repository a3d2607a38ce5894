//! Builds every guest program in `samples/` for wasm32-wasip1 and
//! wasm32-wasip2 with a nested `cargo build`, and generates the list of
//! sample names that tests use to prove every sample has a test.

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    let manifest_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let samples = manifest_dir.parent().unwrap().join("samples");
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").unwrap());
    let target_dir = out_dir.join("samples-target");

    let names = sample_names(&samples);
    println!(
        "cargo:rerun-if-changed={}",
        samples.join("Cargo.toml").display()
    );
    println!("cargo:rerun-if-changed={}", samples.join("wat").display());
    for name in &names {
        println!("cargo:rerun-if-changed={}", samples.join(name).display());
    }

    // The nested cargo must not inherit the outer build's configuration
    // (target dir, flags, jobserver, profile): it builds another workspace
    // for other targets.
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    for (key, _) in std::env::vars_os() {
        let key = key.to_string_lossy();
        if (key.starts_with("CARGO") && key != "CARGO_HOME")
            || key.starts_with("RUSTC")
            || key.starts_with("RUSTFLAGS")
            || key == "RUSTDOCFLAGS"
            || key == "MAKEFLAGS"
            || key == "MFLAGS"
        {
            cmd.env_remove(&*key);
        }
    }
    let status = cmd
        .current_dir(&samples)
        .args(["build", "--release", "--locked", "--quiet"])
        .args(["--target", "wasm32-wasip1", "--target", "wasm32-wasip2"])
        .arg("--target-dir")
        .arg(&target_dir)
        .status()
        .expect("failed to run cargo for samples/");
    if !status.success() {
        panic!(
            "building samples/ failed; the targets are installed with \
             `rustup target add wasm32-wasip1 wasm32-wasip2`"
        );
    }

    let mut generated = String::new();
    generated.push_str(&format!(
        "/// Directory holding `wasm32-wasip1/release/*.wasm` and `wasm32-wasip2/release/*.wasm`.\n\
         pub const SAMPLES_TARGET_DIR: &str = {:?};\n",
        target_dir.display().to_string()
    ));
    generated.push_str(&format!(
        "/// Directory of the hand-written WAT samples.\npub const WAT_DIR: &str = {:?};\n",
        samples.join("wat").display().to_string()
    ));
    generated.push_str(&format!(
        "/// Every Rust sample in `samples/`, by name.\npub const SAMPLES: &[&str] = &{names:?};\n"
    ));
    // `for_each_sample!(m)` expands to `m!(hello); m!(cpu); ...`, so a test
    // crate can refer to one test per sample and fail to compile when one is
    // missing (wasmtime's `assert_test_exists` idea).
    generated.push_str("#[macro_export]\nmacro_rules! for_each_sample {\n    ($m:ident) => {\n");
    for name in &names {
        generated.push_str(&format!("        $m!({name});\n"));
    }
    generated.push_str("    };\n}\n");
    std::fs::write(out_dir.join("samples.rs"), generated).unwrap();
}

/// The members of the samples workspace: every directory with a Cargo.toml.
fn sample_names(samples: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(samples)
        .expect("samples/ exists next to testkit/")
        .filter_map(|e| e.ok())
        .filter(|e| e.path().join("Cargo.toml").is_file())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}
