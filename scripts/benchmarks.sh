#!/usr/bin/env bash
# Regenerates BENCHMARKS.md and docs/bench/ in one go: first the criterion
# benches (one lock+unlock pair, no contention, each lock beside its floor
# and its peers), then the multi-process harness (contention, Python peers,
# plots), whose report starts with a "how fast is interlock" summary, records
# the machine's load before and after, and includes the criterion tables.
#
#   scripts/benchmarks.sh                 # everything (3 rounds per scenario; ~30 min on 2 CPUs with --procs 1,2,4,8 --holds 0,100000)
#   scripts/benchmarks.sh --no-criterion  # keep the criterion results in target/criterion
#   scripts/benchmarks.sh --quick         # harness smoke run (~1 min); the report says so
#   scripts/benchmarks.sh --procs 2,8 --holds 0 --no-python   # narrower harness scope
#
# Every argument except --no-criterion goes to `interlock-bench run` (see
# `cargo run --release -p interlock-bench -- run --help`); the command line
# is written into the report. After the harness, the Python pair tables
# (crates/interlock-bench/py/pairs.py: uncontended acquire+release of
# interlock's Python package beside fasteners, filelock and prwlock, in one
# process) are appended to the report, when the harness's .venv-bench has
# them.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
criterion=1
args=()
report=BENCHMARKS.md
prev=
for a in "$@"; do
  if [[ "$a" == --no-criterion ]]; then criterion=0; else args+=("$a"); fi
  if [[ "$prev" == --report ]]; then report=$a; fi
  prev=$a
done
echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
# PgLock's rows (the pg criterion bench, the harness's pg and floor-pg
# targets) need a PostgreSQL server: INTERLOCK_PG_URL, or the server's
# binaries, with which the bench and the harness start a throwaway cluster.
pg_server() {
  [[ -n "${INTERLOCK_PG_URL:-}" ]] && return 0
  [[ -n "${INTERLOCK_PG_BIN:-}" && -x "${INTERLOCK_PG_BIN}/initdb" ]] && return 0
  compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null && return 0
  command -v initdb >/dev/null
}
pg=0
if pg_server; then
  pg=1
else
  echo "*** NO POSTGRESQL SERVER (no INTERLOCK_PG_URL, no initdb under /usr/lib/postgresql/*/bin or on PATH):" >&2
  echo "*** the PgLock rows are ABSENT from this report (the pg bench is not run; the harness's pg" >&2
  echo "*** and floor-pg targets fail with that reason). Install one: scripts/ensure-postgres.sh" >&2
fi
if [[ $criterion == 1 ]]; then
  cargo bench -p interlock --bench file --bench set --bench shm --bench shm_handoff --bench async_handoff --bench lease --bench sem
  if [[ $pg == 1 ]]; then
    # The uncontended pair beside its floor (criterion, and interleaved),
    # and the SIGKILLed holder's handoff distribution (target/criterion/pg.notes.md).
    cargo bench -p interlock --features postgres --bench pg
    # sqlx 0.8's PgAdvisoryLock beside PgLock and its floor, interleaved,
    # unix socket and loopback TCP (target/criterion/pg-sqlx.notes.md): a
    # crate outside the workspace, so sqlx stays out of its build and lock.
    rm -f target/criterion/pg-sqlx.notes.md
    if ! cargo run --release --target-dir target/sqlx-pg \
      --manifest-path crates/interlock-bench/peers/sqlx-pg/Cargo.toml; then
      echo "*** the sqlx peer (crates/interlock-bench/peers/sqlx-pg) failed: its row is ABSENT" >&2
    fi
  else
    rm -f target/criterion/pg.notes.md target/criterion/pg-sqlx.notes.md
  fi
fi
INTERLOCK_BENCH_COMMAND="scripts/benchmarks.sh $*" cargo run --release -p interlock-bench -- "${args[@]}"
py=.venv-bench/bin/python
if [[ -x $py ]] && "$py" -c "import interlock, fasteners, filelock, prwlock" 2>/dev/null; then
  {
    printf '\n## Python: uncontended acquire+release pairs, side by side\n\n'
    printf '`%s crates/interlock-bench/py/pairs.py` (statements as a program writes them, interleaved rounds, best round).\n\n' "$py"
    "$py" crates/interlock-bench/py/pairs.py
  } >>"$report"
else
  echo "no .venv-bench with interlock and the peers: the Python pair table is left out" >&2
fi
if [[ -x $py ]] && "$py" -c "import portalocker, interlock.compat.portalocker" 2>/dev/null; then
  {
    printf '\n## Python: semaphores, side by side\n\n'
    printf '`%s crates/interlock-bench/py/sem_pairs.py` (portalocker'"'"'s BoundedSemaphore, interlock.compat.portalocker'"'"'s on the same kind of slot files, interlock.Semaphore and FileSemaphore).\n\n' "$py"
    "$py" crates/interlock-bench/py/sem_pairs.py
  } >>"$report"
else
  echo "no .venv-bench with portalocker and interlock.compat.portalocker: the Python semaphore table is left out" >&2
fi
