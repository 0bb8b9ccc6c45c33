#!/usr/bin/env bash
# Regenerates BENCHMARKS.md and docs/bench/ in one go: first the criterion
# benches (one lock+unlock pair, no contention, each lock beside its floor
# and its peers), then the multi-process harness (contention, Python peers,
# plots), whose report includes the criterion tables.
# Arguments go to the harness, e.g. `scripts/benchmarks.sh --quick`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
cargo bench -p interlock --bench file --bench set --bench shm --bench shm_handoff --bench lease
INTERLOCK_BENCH_COMMAND="scripts/benchmarks.sh $*" cargo run --release -p interlock-bench -- "$@"
