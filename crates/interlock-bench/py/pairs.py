"""Uncontended acquire+release pairs of interlock's Python package beside the
Python peers, in one process, side by side.

Each case is the statement a program writes (compiled by timeit, so no
wrapper call is timed), and the cases run interleaved round by round: a
ratio compares two rows measured at the same moment. Each row is the best
round (noise on a shared machine only ever adds time). Prints a Markdown
table with the machine's load before and after.

Run in the harness's environment after `scripts/benchmarks.sh` (or any
`interlock-bench run` with Python rows) has installed everything there:

    .venv-bench/bin/python crates/interlock-bench/py/pairs.py [--rounds N]
"""

import argparse
import os
import shutil
import tempfile
import timeit

import fasteners
import filelock
import prwlock

import interlock

# (name, statement, number of pairs per round). The statements run with the
# names below in scope.
CASES = [
    ("interlock FileLock: g = lock.write(); g.release()", "g = fl.write(); g.release()", 2000),
    ("interlock FileLock: with lock:", "with fl: pass", 2000),
    ("interlock FileLock: acquire(); release()", "fl.acquire(); fl.release()", 2000),
    ("interlock FileLock(flock): with lock:", "with ff: pass", 2000),
    ("fasteners InterProcessLock: acquire(); release()", "fa.acquire(); fa.release()", 400),
    ("fasteners InterProcessLock: with lock:", "with fa: pass", 400),
    ("filelock FileLock: acquire(); release()", "fi.acquire(); fi.release()", 100),
    ("filelock FileLock: with lock:", "with fi: pass", 100),
    ("interlock ShmRwLock: g = rw.read(); g.release()", "g = rw.read(); g.release()", 5000),
    ("interlock ShmRwLock: g = rw.write(); g.release()", "g = rw.write(); g.release()", 5000),
    ("interlock ShmRwLock: with rw.read():", "with rw.read(): pass", 5000),
    ("interlock ShmRwLock: with rw:", "with rw: pass", 5000),
    ("interlock ShmRwLock: acquire(shared=True); release()", "rw.acquire(shared=True); rw.release()", 5000),
    ("interlock ShmRwLock: acquire(); release()", "rw.acquire(); rw.release()", 5000),
    ("prwlock: acquire_read(); release()", "p.acquire_read(); p.release()", 5000),
    ("prwlock: acquire_write(); release()", "p.acquire_write(); p.release()", 5000),
    ("prwlock: with p.reader_lock():", "with p.reader_lock(): pass", 5000),
    ("prwlock: with p.writer_lock():", "with p.writer_lock(): pass", 5000),
]

# (what, interlock row, peer row, goal): the ratios the issue asks for.
RATIOS = [
    ("FileLock vs fasteners, guard", 0, 4, 10),
    ("FileLock vs fasteners, with", 1, 5, 10),
    ("FileLock vs fasteners, acquire/release", 2, 4, 10),
    ("FileLock vs filelock, guard", 0, 6, 40),
    ("FileLock vs filelock, with", 1, 7, 40),
    ("FileLock vs filelock, acquire/release", 2, 6, 40),
    ("ShmRwLock read vs prwlock, guard", 8, 14, 5),
    ("ShmRwLock read vs prwlock, with", 10, 16, 5),
    ("ShmRwLock read vs prwlock, acquire/release", 12, 14, 5),
    ("ShmRwLock write vs prwlock, guard", 9, 15, 5),
    ("ShmRwLock write vs prwlock, with", 11, 17, 5),
    ("ShmRwLock write vs prwlock, acquire/release", 13, 15, 5),
]


def load() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=30)
    args = ap.parse_args()
    d = tempfile.mkdtemp()
    try:
        names = {
            "fl": interlock.FileLock(os.path.join(d, "a")),
            "ff": interlock.FileLock(os.path.join(d, "f"), flavor="flock"),
            "fa": fasteners.InterProcessLock(os.path.join(d, "b")),
            "fi": filelock.FileLock(os.path.join(d, "c")),
            "rw": interlock.ShmRwLock(os.path.join(d, "s.shm")),
            "p": prwlock.RWLock(),
        }
        timers = [timeit.Timer(stmt, globals=names) for _, stmt, _ in CASES]
        before = load()
        for t, (_, _, n) in zip(timers, CASES):
            t.timeit(max(n // 10, 10))  # warm up
        best = [float("inf")] * len(CASES)
        for _ in range(args.rounds):
            for i, (t, (_, _, n)) in enumerate(zip(timers, CASES)):
                best[i] = min(best[i], t.timeit(n) / n * 1e9)
        after = load()
    finally:
        shutil.rmtree(d, ignore_errors=True)
    print(f"load average before {before}, after {after}; best of {args.rounds} interleaved rounds\n")
    print("| pair (uncontended, one process) | ns |")
    print("|---|---:|")
    for (name, _, _), ns in zip(CASES, best):
        print(f"| {name} | {ns:,.0f} |")
    print("\n| ratio | interlock ns | peer ns | faster | goal |")
    print("|---|---:|---:|---:|---|")
    for what, i, j, goal in RATIOS:
        x = best[j] / best[i]
        met = "met" if x >= goal else "not met"
        print(f"| {what} | {best[i]:,.0f} | {best[j]:,.0f} | {x:.1f}x | {goal}x: {met} |")


if __name__ == "__main__":
    main()
