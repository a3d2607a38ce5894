#!/bin/bash
# Profiles the wharf server during an api_load run and writes a flame graph.
#   benches/profile-api.sh OUT [PARTS]   (default PARTS=throughput)
# Needs perf and inferno (cargo install inferno). Env: WHARF_BIN (the
# server binary), DELAY (s before recording, default 3), SECS (recording
# length, default 4). Writes OUT.txt (api_load's summary), OUT.data,
# OUT.folded and OUT.svg.
set -euo pipefail
target=${CARGO_TARGET_DIR:-$(dirname "$0")/../target}
export WHARF_BIN=${WHARF_BIN:-$target/release/wharf}
out=$1
PARTS=${2:-throughput} "$target/release/api_load" >"$out.txt" 2>&1 &
bench=$!
sleep "${DELAY:-3}"
pid=$(pgrep -n -f "$WHARF_BIN server")
perf record -F 1999 -g --call-graph dwarf,16384 -p "$pid" -o "$out.data" -- sleep "${SECS:-4}" >/dev/null 2>&1
wait "$bench"
perf script -i "$out.data" 2>/dev/null | inferno-collapse-perf >"$out.folded"
inferno-flamegraph --minwidth 1.5 <"$out.folded" >"$out.svg"
