#!/usr/bin/env bash
# `wharf run` beside `wasmtime run` on the same files, in one hyperfine run
# per sample: process start to guest exit, compile caches warm on both sides.
#
# Needs: hyperfine (Debian), wasmtime 48 (`cargo install wasmtime-cli
# --version 48.0.8 --locked`, or WASMTIME=/path/to/wasmtime), the WASI targets.
# Usage: benches/compare-wasmtime.sh [RESULTS_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-target/bench-results}
wasmtime=${WASMTIME:-wasmtime}
mkdir -p "$out"

cargo build --release -p wharf
cargo build --release --locked --manifest-path samples/Cargo.toml \
  --target wasm32-wasip1 --target wasm32-wasip2 --target-dir target/samples

data=$(mktemp -d)
trap 'rm -rf "$data"' EXIT
export WHARF_DATA_DIR=$data

"$wasmtime" --version
for target in wasip1 wasip2; do
  wasm=target/samples/wasm32-$target/release/hello.wasm
  "$wasmtime" compile "$wasm" -o "$data/hello-$target.cwasm"
  # Warm both compile caches (wasmtime's is on by default).
  target/release/wharf run "$wasm" >/dev/null
  "$wasmtime" run "$wasm" >/dev/null
  hyperfine -N --warmup 20 --runs 300 \
    --export-json "$out/run-hello-$target.json" --export-markdown "$out/run-hello-$target.md" \
    -n "wharf run ($target)" "target/release/wharf run $wasm" \
    -n "wasmtime run ($target)" "$wasmtime run $wasm" \
    -n "wasmtime run precompiled ($target)" "$wasmtime run --allow-precompiled $data/hello-$target.cwasm"
done
