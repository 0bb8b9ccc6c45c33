"""Uncontended acquire+release pairs of prwlock, pylocksfile and
lockbydir's protocol beside interlock's compat modules that replace them.

One process, no contention; the cases are interleaved round by round so
that each pair of rows is measured at the same moment, and each row is the
best of 60 rounds (the shared machine's noise only ever adds time). The
harness's contended rows (py-compat-*) are where handoffs show; this is the
pair cost, which the harness's per-iteration bookkeeping would drown.

    .venv-bench/bin/python crates/interlock-bench/py/compat_pairs.py

(.venv-bench is made by any harness run; it has the originals and a release
build of this checkout.) lockbydir itself is Python 2 only: its row is its
mechanism (stat, mkdir, rmdir) written here.
"""

import os
import shutil
import tempfile
import time

import prwlock as real_prw
import pylocksfile as real_plf

from interlock.compat import lockbydir as cldir
from interlock.compat import prwlock as cprw
from interlock.compat import pylocksfile as cplf

d = tempfile.mkdtemp(dir="/dev/shm")
r, c = real_prw.RWLock(), cprw.RWLock()
a, b = real_plf.pylocksfile(d + "/a.lock"), cplf.pylocksfile(d + "/b.lock")
proto = d + "/p.lockdir"


def lockbydir_protocol():
    try:
        os.path.getmtime(proto)
    except OSError:
        pass
    os.mkdir(proto)
    os.rmdir(proto)


dl = cldir.DLock(d + "/bed")
cases = {
    "prwlock read": lambda: (r.acquire_read(), r.release()),
    "compat prwlock read": lambda: (c.acquire_read(), c.release()),
    "prwlock write": lambda: (r.acquire_write(), r.release()),
    "compat prwlock write": lambda: (c.acquire_write(), c.release()),
    "pylocksfile write": lambda: (a.acquire(writeLock=True, lock_n=0), a.release(0)),
    "compat pylocksfile write": lambda: (b.acquire(writeLock=True, lock_n=0), b.release(0)),
    "pylocksfile read": lambda: (a.acquire(writeLock=False, lock_n=0), a.release(0)),
    "compat pylocksfile read": lambda: (b.acquire(writeLock=False, lock_n=0), b.release(0)),
    "lockbydir protocol (tmpfs)": lockbydir_protocol,
    "compat lockbydir (tmpfs)": lambda: (dl.locking(), dl.unlocking()),
}
best = {k: 1e9 for k in cases}
for _ in range(60):
    for k, f in cases.items():
        n = 50 if "lockbydir" in k else 1000
        t = time.perf_counter()
        for _ in range(n):
            f()
        best[k] = min(best[k], (time.perf_counter() - t) / n)
for k in cases:
    print(f"{k:30s} {best[k] * 1e6:8.2f} us")
shutil.rmtree(d)
