#!/usr/bin/env bash
# The quick-start example: build the `interlock` CLI, then
#  0. four jobs each add 1 to a counter file five times, with no lock: updates
#     are lost (the counter ends below 20);
#  1. the same, each read-modify-write under `interlock run`; no update is
#     lost (the counter ends at 20);
#  2. one job holds the lock while `interlock status` shows it, a second job
#     waits (and says whom it waits for), and a third gives up at once (-n).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
echo "building the interlock CLI (cargo build --release; about 30 s the first time)..."
cargo build --release --quiet -p interlock-cli
target=${CARGO_TARGET_DIR:-$PWD/target}
case $target in /*) ;; *) target=$PWD/$target ;; esac
bin=$target/release/interlock
[ -x "$bin" ] || { echo "demo: $bin was not built" >&2; exit 1; }
if [ -n "${INTERLOCK_DEMO_DIR:-}" ]; then
  dir=$INTERLOCK_DEMO_DIR
else
  dir=$(mktemp -d)
  trap 'rm -rf "$dir"' EXIT
fi
lock=$dir/counter.lock
counter=$dir/counter
increment='n=$(cat "$1"); sleep 0.01; echo $((n + 1)) >"$1"'

# Four jobs, five increments each; "$@" runs before each increment.
jobs() {
  echo 0 >"$counter"
  for job in 1 2 3 4; do
    (
      for _ in 1 2 3 4 5; do
        "$@" sh -c "$increment" sh "$counter"
      done
    ) &
  done
  wait
}

echo "0. four jobs, five increments each, no lock"
jobs env
echo "   counter = $(cat "$counter") (20 increments ran: the others were lost)"

echo "1. the same, each increment under the lock ($lock)"
jobs "$bin" run -q "$lock" --
total=$(cat "$counter")
echo "   counter = $total (expected 20)"
[ "$total" = 20 ] || { echo "   lost updates!" >&2; exit 1; }

echo "2. who holds it, who waits"
fifo=$dir/held
mkfifo "$fifo"
"$bin" run "$lock" -- sh -c 'echo held >"$1"; exec sleep 1' sh "$fifo" &
holder=$!
read -r _ <"$fifo"
"$bin" status "$lock" | sed 's/^/   status: /'
"$bin" run -n "$lock" -- true || echo "   (-n gave up at once, exit status $?)"
"$bin" run -w 10 "$lock" -- echo "   a waiting job got the lock once the holder finished"
wait "$holder"
