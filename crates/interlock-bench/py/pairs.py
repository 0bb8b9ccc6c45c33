"""Uncontended acquire+release pairs of interlock's Python package and the
Python peers, side by side in one process (best of 5 rounds, ns per pair).

Run in the harness's environment after `scripts/benchmarks.sh` (or any
`interlock-bench run` with Python rows) has installed everything there:

    .venv-bench/bin/python crates/interlock-bench/py/pairs.py
"""

import os
import tempfile
import time

import fasteners
import filelock
import prwlock

import interlock


def bench(name, acq, rel, n=20000):
    for _ in range(200):
        acq()
        rel()
    best = None
    for _ in range(5):
        t0 = time.perf_counter_ns()
        for _ in range(n):
            acq()
            rel()
        dt = (time.perf_counter_ns() - t0) / n
        best = dt if best is None else min(best, dt)
    print(f"{name:44s} {best:10.0f} ns/pair", flush=True)
    return best


def main():
    d = tempfile.mkdtemp()
    g = [None]

    def guard(take):
        return lambda: g.__setitem__(0, take()), lambda: g[0].release()

    r = {}
    lk = interlock.FileLock(os.path.join(d, "a"))
    r["file"] = bench("interlock.FileLock write()+release()", *guard(lk.write))
    bench("interlock.FileLock read()+release()", *guard(lk.read))
    bench("interlock.FileLock acquire()+release()", lk.acquire, lk.release)
    fl = interlock.FileLock(os.path.join(d, "f"), flavor="flock")
    bench("interlock.FileLock(flock) write()+release()", *guard(fl.write))
    fa = fasteners.InterProcessLock(os.path.join(d, "b"))
    r["fasteners"] = bench("fasteners.InterProcessLock", fa.acquire, fa.release, 5000)
    fi = filelock.FileLock(os.path.join(d, "c"))
    r["filelock"] = bench("filelock.FileLock", fi.acquire, fi.release, 2000)
    rw = interlock.ShmRwLock(os.path.join(d, "s.shm"))
    r["shm_r"] = bench("interlock.ShmRwLock read()+release()", *guard(rw.read))
    r["shm_w"] = bench("interlock.ShmRwLock write()+release()", *guard(rw.write))
    bench("interlock.ShmRwLock acquire(shared=True)", lambda: rw.acquire(shared=True), rw.release)
    bench("interlock.ShmRwLock acquire()+release()", rw.acquire, rw.release)
    p = prwlock.RWLock()
    r["prw_r"] = bench("prwlock acquire_read()+release()", p.acquire_read, p.release)
    r["prw_w"] = bench("prwlock acquire_write()+release()", p.acquire_write, p.release)
    print(
        f"FileLock: {r['fasteners'] / r['file']:.1f}x fasteners, "
        f"{r['filelock'] / r['file']:.1f}x filelock; "
        f"ShmRwLock: read {r['prw_r'] / r['shm_r']:.1f}x, write {r['prw_w'] / r['shm_w']:.1f}x prwlock"
    )


if __name__ == "__main__":
    main()
