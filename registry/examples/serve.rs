//! The registry alone on loopback, without the control plane or wasmtime:
//! a quick build for profiling the registry's own paths (`perf record -p`).
//! `wharf server` is what the benchmarks in `benches/` measure.
//!
//! `cargo run --release -p wharf-registry --example serve -- DIR PORT TOKEN`

use std::sync::Arc;

use wharf_registry::Registry;
use wharf_registry::auth::StaticTokens;
use wharf_registry::storage::fs::FsStorage;

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [dir, port, token] = args.as_slice() else {
        eprintln!("usage: serve DIR PORT TOKEN");
        std::process::exit(2);
    };
    let storage = FsStorage::open(dir).expect("open the storage directory");
    let registry = Registry::new(
        Arc::new(storage),
        Arc::new(StaticTokens::new([token.clone()])),
    );
    let listener = tokio::net::TcpListener::bind(format!("127.0.0.1:{port}"))
        .await
        .expect("bind");
    axum::serve(listener, wharf_registry::http::router(registry))
        .await
        .expect("serve");
}
