#!/bin/bash
# usage: scripts/perf-worker.sh TARGET PROCS MIX [SECS]
# Runs one harness scenario (4 s phases) and, 1.2 s in, counts with perf
# (software events and syscall tracepoints; no PMU needed) the CPU time,
# context switches and lock-related system calls of workers 0 and 1 for
# SECS seconds. Needs perf and permission for tracepoints (root here).
t=$1; p=$2; m=$3; s=${4:-1.5}
cd "$(dirname "${BASH_SOURCE[0]}")/.."
${BIN:-./target/release/interlock-bench} run --targets $t --procs $p --holds 0 --mixes $m --phase-seconds 4 --no-python --no-plots --report ${TMPDIR:-/tmp}/perf-worker-pw.md >/dev/null 2>&1 &
par=$!
sleep 1.2
ws=$(pgrep -P $par -f "worker")
for i in 0 1; do
 w=$(for w in $ws; do if tr '\0' ' ' </proc/$w/cmdline | grep -q -- "--idx $i "; then echo $w; fi; done)
 [ -n "$w" ] && perf stat -x, -e task-clock,context-switches,syscalls:sys_enter_flock,syscalls:sys_enter_fcntl,syscalls:sys_enter_newfstatat,syscalls:sys_enter_statx,syscalls:sys_enter_futex,syscalls:sys_enter_sched_yield -p $w -o ${TMPDIR:-/tmp}/perf-worker-pw$i.txt -- sleep $s &
done
wait $par
for i in 0 1; do [ -f ${TMPDIR:-/tmp}/perf-worker-pw$i.txt ] && { echo "== $t p$p $m w$i: $(grep -v '^#' ${TMPDIR:-/tmp}/perf-worker-pw$i.txt | grep -v '^$' | awk -F, '{printf "%s=%s ", $3, $1}')"; rm ${TMPDIR:-/tmp}/perf-worker-pw$i.txt; }; done
