"""Semaphores from Python: the uncontended acquire+release pair of
portalocker's BoundedSemaphore beside interlock.compat.portalocker's (the
same slot files) and interlock's Semaphore / FileSemaphore; then how long a
waiter takes to get a slot freed by another thread (portalocker sweeps every
check_interval, 0.25 s; the compat waits in the kernel on every slot).

One process; pair rows interleaved round by round, each the best of 40
rounds (noise only adds time); handoff rows: median and max of 20 trials.

    .venv-bench/bin/python crates/interlock-bench/py/sem_pairs.py

(any venv with portalocker and a release build of this checkout's package)
"""

import os
import shutil
import statistics
import tempfile
import threading
import time

import portalocker

import interlock
from interlock.compat import portalocker as compat

d = tempfile.mkdtemp(dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
real = portalocker.BoundedSemaphore(2, name="real", directory=d)
mine = compat.BoundedSemaphore(2, name="mine", directory=d)
shm = interlock.Semaphore(d + "/shm", 2)
fsem = interlock.FileSemaphore(d + "/fsem", 2)


def pair(s):
    s.acquire()
    s.release()


cases = {
    "portalocker BoundedSemaphore": lambda: pair(real),
    "compat BoundedSemaphore": lambda: pair(mine),
    "interlock.Semaphore": lambda: shm.acquire().release(),
    "interlock.FileSemaphore": lambda: fsem.acquire().release(),
}
best = {k: 1e9 for k in cases}
for _ in range(40):
    for k, f in cases.items():
        n = 200
        t = time.perf_counter()
        for _ in range(n):
            f()
        best[k] = min(best[k], (time.perf_counter() - t) / n)
print(f"Load average {os.getloadavg()[0]:.2f} when the pairs were measured.\n")
print("| semaphore (2 permits, uncontended) | µs per acquire+release pair |")
print("|---|---:|")
for k in cases:
    print(f"| {k} | {best[k] * 1e6:.2f} |")


def handoff(make):
    """Seconds from the release of the one slot to the waiter holding it."""
    holder, waiter = make(), make()
    out = []
    for _ in range(20):
        holder.acquire()
        got = threading.Event()
        at = []

        def wait(got=got, at=at):
            waiter.acquire(timeout=5)
            at.append(time.perf_counter())
            got.set()

        t = threading.Thread(target=wait)
        t.start()
        time.sleep(0.02)  # let it start waiting
        t0 = time.perf_counter()
        holder.release()
        got.wait(10)
        t.join(10)
        out.append(at[0] - t0)
        waiter.release()
    return out


print()
print("| semaphore (1 slot), 20 trials | release to a waiting thread: median | max |")
print("|---|---:|---:|")
for label, make in [
    (
        "portalocker BoundedSemaphore",
        lambda: portalocker.BoundedSemaphore(1, name="r1", directory=d),
    ),
    ("compat BoundedSemaphore", lambda: compat.BoundedSemaphore(1, name="m1", directory=d)),
]:
    v = handoff(make)
    print(f"| {label} | {statistics.median(v) * 1e3:.3f} ms | {max(v) * 1e3:.3f} ms |")
shutil.rmtree(d)
