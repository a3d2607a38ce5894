//! Test support shared by the crates' tests and the benchmarks: the guest
//! programs of `samples/`, built for both WASI targets by this crate's build
//! script, and where to find them.
//!
//! Also a real PostgreSQL server ([`postgres`]) and a real S3-compatible
//! object store ([`garage`]) for tests.
//!
//! Every sample must have a test; test crates enforce it at compile time
//! with [`for_each_sample!`].

use std::path::PathBuf;

mod daemon;
pub mod garage;
pub mod postgres;

include!(concat!(env!("OUT_DIR"), "/samples.rs"));

/// The WASI flavour a sample was built for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// A core module importing `wasi_snapshot_preview1`.
    P1,
    /// A `wasi:cli/command` component.
    P2,
}

impl Target {
    /// Both targets, for tests that run a sample under each.
    pub const ALL: [Target; 2] = [Target::P1, Target::P2];

    fn triple(self) -> &'static str {
        match self {
            Target::P1 => "wasm32-wasip1",
            Target::P2 => "wasm32-wasip2",
        }
    }
}

/// Path of the built sample `name` for `target`.
///
/// # Panics
///
/// If `name` is not a sample: a typo in a test should fail loudly.
pub fn wasm(name: &str, target: Target) -> PathBuf {
    assert!(SAMPLES.contains(&name), "no sample named {name:?}");
    PathBuf::from(SAMPLES_TARGET_DIR)
        .join(target.triple())
        .join("release")
        .join(format!("{name}.wasm"))
}

/// The bytes of the built sample `name` for `target`.
pub fn wasm_bytes(name: &str, target: Target) -> Vec<u8> {
    std::fs::read(wasm(name, target)).expect("built sample is readable")
}

/// Path of the hand-written sample `samples/wat/{name}.wat`.
pub fn wat(name: &str) -> PathBuf {
    let path = PathBuf::from(WAT_DIR).join(format!("{name}.wat"));
    assert!(path.is_file(), "no WAT sample named {name:?}");
    path
}
