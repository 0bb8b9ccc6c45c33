#!/usr/bin/env bash
# The quick-start example: build the `interlock` CLI, then
#  1. four jobs each add 1 to a counter file five times, each read-modify-write
#     under `interlock run`; no update is lost (the counter ends at 20);
#  2. one job holds the lock while `interlock status` shows it, a second job
#     waits (and says whom it waits for), and a third gives up at once (-n).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
cargo build --release --quiet -p interlock-cli
target=${CARGO_TARGET_DIR:-$PWD/target}
case $target in /*) ;; *) target=$PWD/$target ;; esac
bin=$target/release/interlock
[ -x "$bin" ] || { echo "demo: $bin was not built" >&2; exit 1; }
dir=${INTERLOCK_DEMO_DIR:-$(mktemp -d)}
lock=$dir/counter.lock
counter=$dir/counter

echo "1. four jobs, five increments each, one lock ($lock)"
echo 0 >"$counter"
for job in 1 2 3 4; do
  (
    for _ in 1 2 3 4 5; do
      "$bin" run -q "$lock" -- sh -c 'n=$(cat "$1"); sleep 0.01; echo $((n + 1)) >"$1"' sh "$counter"
    done
  ) &
done
wait
total=$(cat "$counter")
echo "   counter = $total (expected 20)"
[ "$total" = 20 ] || { echo "   lost updates!" >&2; exit 1; }

echo "2. who holds it, who waits"
fifo=$dir/held
mkfifo "$fifo"
"$bin" run "$lock" -- sh -c 'echo held >"$1"; sleep 1' sh "$fifo" &
holder=$!
read -r _ <"$fifo"
"$bin" status "$lock" | sed 's/^/   status: /'
"$bin" run -n "$lock" -- true || echo "   (-n gave up at once, exit status $?)"
"$bin" run -w 10 "$lock" -- echo "   a waiting job got the lock once the holder finished"
wait "$holder"
