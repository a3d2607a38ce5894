#!/bin/bash
# Profiles the wharf server through a registry_load run (its pushes and
# pulls; distribution's turn leaves it idle) and writes a flame graph.
#   benches/profile-registry.sh OUT   (default SIZES=512M STREAMS=1)
# Needs perf and inferno (cargo install inferno). Env: WHARF_BIN (the
# server binary), SIZES, STREAMS (registry_load's). Writes OUT.txt
# (registry_load's table), OUT.data, OUT.folded and OUT.svg.
set -euo pipefail
target=${CARGO_TARGET_DIR:-$(dirname "$0")/../target}
export WHARF_BIN=${WHARF_BIN:-$target/release/wharf}
out=$1
SIZES=${SIZES:-512M} STREAMS=${STREAMS:-1} "$target/release/registry_load" >"$out.txt" 2>&1 &
bench=$!
# perf follows the threads that exist when it attaches: wait for the
# server's runtime workers (up before it prints its address).
pid=""
for _ in $(seq 200); do
  pid=$(pgrep -n -f "$WHARF_BIN server") && grep -qs tokio-rt-worker /proc/"$pid"/task/*/comm && break
  sleep 0.05
done
# Ends when the server does, at the end of the run.
perf record -F 999 -g --call-graph dwarf,16384 -p "$pid" -o "$out.data" >/dev/null 2>&1 &
recorder=$!
wait "$bench"
wait "$recorder" || true
perf script -i "$out.data" 2>/dev/null | inferno-collapse-perf >"$out.folded"
inferno-flamegraph --minwidth 1.5 <"$out.folded" >"$out.svg"
