"""Worker for interlock-bench's Python peers.

The harness starts one of these per worker process, exactly as it starts
its own Rust workers, and this file follows the same protocol (see
crates/interlock-bench/src/contention.rs): attach to the shared page, mark
the slot ready, wait for the phase word, run an untimed loop (throughput)
then a timed loop (latency), and write a result file in the same text
form, with histograms bucketed by the same function as src/hist.rs.

Each library is used the way its documentation shows, with its defaults
(so filelock and fasteners poll, as they do for their users).

`python driver.py probe` prints which libraries import.
"""

import argparse
import mmap
import os
import struct
import sys
import time

MAGIC = 0x494C42454E434801
PHASE = 64
LAST_OWNER = 128
LAST_RELEASE = 136
SLOTS = 8192
SLOT_LEN = 64
S_ACK = 32
S_PID = 40

THROUGHPUT, PAUSE, LATENCY, STOP = 1, 2, 3, 4

now = time.monotonic_ns  # CLOCK_MONOTONIC, the clock the Rust side reads


def bucket(v):
    if v < 16:
        return v
    e = v.bit_length() - 1
    return (e - 3) * 16 + ((v >> (e - 4)) & 15)


class Hist:
    def __init__(self):
        self.counts = {}
        self.n = 0
        self.max = 0

    def record(self, v):
        b = bucket(v)
        self.counts[b] = self.counts.get(b, 0) + 1
        self.n += 1
        if v > self.max:
            self.max = v

    def encode(self):
        body = ",".join("%d:%d" % (i, self.counts[i]) for i in sorted(self.counts))
        return "%d %d %s" % (self.n, self.max, body)


class Fasteners:
    def __init__(self, d, fasteners=None):
        if fasteners is None:
            import fasteners

        self.l = fasteners.InterProcessReaderWriterLock(os.path.join(d, "lock"))

    def acquire(self, ex):
        if ex:
            self.l.acquire_write_lock()
        else:
            self.l.acquire_read_lock()

    def release(self, ex):
        if ex:
            self.l.release_write_lock()
        else:
            self.l.release_read_lock()


class CompatFasteners(Fasteners):
    """interlock's drop-in fasteners, used exactly as fasteners is above."""

    def __init__(self, d):
        from interlock.compat import fasteners

        super().__init__(d, fasteners)


class Locks:
    def __init__(self, d, locks=None):
        if locks is None:
            import locks

        self.m = locks.Mutex(os.path.join(d, "lock"))

    def acquire(self, ex):
        self.m.lock()

    def release(self, ex):
        self.m.release()


class CompatLocks(Locks):
    """interlock's drop-in locks, used exactly as locks is above."""

    def __init__(self, d):
        from interlock.compat import locks

        super().__init__(d, locks)


class FileLock:
    def __init__(self, d):
        import filelock

        self.l = filelock.FileLock(os.path.join(d, "lock"))

    def acquire(self, ex):
        self.l.acquire()

    def release(self, ex):
        self.l.release()


class Portalocker:
    def __init__(self, d):
        import portalocker

        self.p = portalocker
        self.f = open(os.path.join(d, "lock"), "a+")

    def acquire(self, ex):
        flags = self.p.LockFlags.EXCLUSIVE if ex else self.p.LockFlags.SHARED
        self.p.lock(self.f, flags)

    def release(self, ex):
        self.p.unlock(self.f)


class Prwlock:
    def __init__(self, d):
        import prwlock

        # prwlock shares a lock between processes by pickling its backing
        # file descriptor; unpickling maps that file. The harness initialised
        # a process-shared pthread rwlock at offset 0 of prwlock.page.
        fd = os.open(os.path.join(d, "prwlock.page"), os.O_RDWR)
        self.l = prwlock.RWLock.__new__(prwlock.RWLock)
        self.l.__setstate__({"_fd": fd, "pid": -1, "nlocks": 0})

    def acquire(self, ex):
        if ex:
            self.l.acquire_write()
        else:
            self.l.acquire_read()

    def release(self, ex):
        self.l.release()


class CompatPrwlock:
    """interlock.compat.prwlock, used as prwlock is. Its RWLock() reaches
    only processes forked from its creator, and the harness starts each
    worker itself, so the workers wrap one named ShmRwLock instead."""

    def __init__(self, d):
        import interlock
        from interlock.compat import prwlock

        self.l = prwlock.prwlock._adopt(interlock.ShmRwLock(os.path.join(d, "compat-prwlock.shm")))

    def acquire(self, ex):
        if ex:
            self.l.acquire_write()
        else:
            self.l.acquire_read()

    def release(self, ex):
        self.l.release()


class Pylocksfile:
    """pylocksfile, or (compat=True) interlock.compat.pylocksfile: lock 0."""

    def __init__(self, d, compat=False):
        if compat:
            from interlock.compat.pylocksfile import pylocksfile
        else:
            from pylocksfile import pylocksfile

        self.l = pylocksfile(os.path.join(d, "lock"))

    def acquire(self, ex):
        self.l.acquire(writeLock=ex, lock_n=0)

    def release(self, ex):
        self.l.release(lock_n=0)


def _lease_dir(d):
    # Lock directories live on tmpfs, as the Rust lease rows' do (ext4's
    # journal makes directory operations noisy on the shared machine): the
    # scenario's directory in /dev/shm, which the harness passes for
    # LockSet's registry and removes afterwards.
    return os.environ.get("INTERLOCK_WAIT_DIR", d)


class CompatLockbydir:
    """interlock.compat.lockbydir's DLock, used as lockbydir's README shows."""

    def __init__(self, d):
        from interlock.compat.lockbydir import DLock

        self.l = DLock(os.path.join(_lease_dir(d), "bed"))
        self.l.PATIENCE = 3600

    def acquire(self, ex):
        if not self.l.LoopWhileLocked_ThenLocking():
            raise RuntimeError("DLock: no lock within PATIENCE")

    def release(self, ex):
        if not self.l.unlocking():
            raise RuntimeError("DLock: lock lost")


class LockbydirProtocol:
    """lockbydir's mechanism, written here from its documentation because
    the original is Python 2 only: the lock is the directory NAME.lockdir,
    free when missing or older than TIMEOUT (10 s); a waiter checks, sleeps
    CHECKEVERYXSECONDS (30 ms) and tries mkdir again; unlocking is rmdir."""

    def __init__(self, d):
        self.path = os.path.join(_lease_dir(d), "bed.lockdir")

    def acquire(self, ex):
        while True:
            try:
                age = time.time() - os.path.getmtime(self.path)
            except OSError:
                age = None
            if age is not None and age > 10:
                try:
                    os.rmdir(self.path)
                except OSError:
                    pass
                age = None
            if age is None:
                try:
                    os.mkdir(self.path)
                    return
                except FileExistsError:
                    pass
            time.sleep(0.03)

    def release(self, ex):
        os.rmdir(self.path)


class Interlock:
    """interlock's own Python package, used as its README shows."""

    def __init__(self, lock):
        self.l = lock
        self.g = None

    def acquire(self, ex):
        self.g = self.l.write() if ex else self.l.read()

    def release(self, ex):
        self.g.release()


def interlock_file(d):
    import interlock

    return Interlock(interlock.FileLock(os.path.join(d, "interlock.lock")))


def interlock_flock(d):
    import interlock

    return Interlock(interlock.FileLock(os.path.join(d, "interlock.lock"), flavor="flock"))


def interlock_shm(d):
    import interlock

    return Interlock(interlock.ShmRwLock(os.path.join(d, "interlock.shm")))


LIBS = {
    "interlock-file": interlock_file,
    "interlock-flock": interlock_flock,
    "interlock-shm": interlock_shm,
    "fasteners": Fasteners,
    "compat-fasteners": CompatFasteners,
    "locks": Locks,
    "compat-locks": CompatLocks,
    "filelock": FileLock,
    "portalocker": Portalocker,
    "prwlock": Prwlock,
    "pylocksfile": Pylocksfile,
    "compat-prwlock": CompatPrwlock,
    "compat-pylocksfile": lambda d: Pylocksfile(d, compat=True),
    "compat-lockbydir": CompatLockbydir,
    "lockbydir-protocol": LockbydirProtocol,
}

# What `probe` imports for each library (the compat rows need interlock).
PROBE = {
    "compat-prwlock": "interlock.compat.prwlock",
    "compat-pylocksfile": "interlock.compat.pylocksfile",
    "compat-lockbydir": "interlock.compat.lockbydir",
    "lockbydir-protocol": "os",
    "compat-fasteners": "interlock.compat.fasteners",
    "compat-locks": "interlock.compat.locks",
    "interlock-file": "interlock",
    "interlock-flock": "interlock",
    "interlock-shm": "interlock",
}


class Rng:
    def __init__(self, seed):
        self.x = ((seed * 0x9E3779B97F4A7C15) | 1) & 0xFFFFFFFFFFFFFFFF

    def next(self):
        x = self.x
        x ^= (x << 13) & 0xFFFFFFFFFFFFFFFF
        x ^= x >> 7
        x ^= (x << 17) & 0xFFFFFFFFFFFFFFFF
        self.x = x
        return x


def worker(a):
    fd = os.open(a.page, os.O_RDWR)
    mm = mmap.mmap(fd, os.fstat(fd).st_size, mmap.MAP_SHARED)
    (magic,) = struct.unpack_from("<Q", mm, 0)
    if magic != MAGIC:
        sys.exit("shared page has the wrong magic")
    lock = LIBS[a.lib](a.dir)
    me = a.idx + 1
    rng = Rng(a.idx + 1)
    slot = SLOTS + a.idx * SLOT_LEN
    hold = a.hold_ns
    unpack, pack = struct.unpack_from, struct.pack_into

    def phase():
        return unpack("<I", mm, PHASE)[0]

    def pick():
        if a.mix == "writers":
            return True
        if a.mix == "read90":
            return rng.next() % 10 == 0
        return a.idx == 0

    def spin():
        if hold:
            end = now() + hold
            while now() < end:
                pass

    def wait_for(p):
        while phase() < p:
            time.sleep(0.0002)

    pack("<Q", mm, slot + S_PID, os.getpid())
    pack("<Q", mm, slot + S_ACK, 1)
    wait_for(THROUGHPUT)
    tp_ex = tp_sh = tp_changes = 0
    while phase() == THROUGHPUT:
        ex = pick()
        lock.acquire(ex)
        if ex:
            prev = unpack("<Q", mm, LAST_OWNER)[0]
            if prev != me:
                pack("<Q", mm, LAST_OWNER, me)
                if prev != 0:
                    tp_changes += 1
        spin()
        lock.release(ex)
        if ex:
            tp_ex += 1
        else:
            tp_sh += 1
    pack("<Q", mm, slot + S_ACK, 2)
    wait_for(LATENCY)
    wait_ex, wait_sh, handoff = Hist(), Hist(), Hist()
    lat = 0
    while phase() == LATENCY:
        ex = pick()
        t0 = now()
        lock.acquire(ex)
        t1 = now()
        if ex:
            prev = unpack("<Q", mm, LAST_OWNER)[0]
            if prev != me:
                rel = unpack("<Q", mm, LAST_RELEASE)[0]
                # t1 < rel: we got the lock before the last holder let go
                # (locks' release deletes the file, so two can hold it at
                # once); no handoff to measure.
                if prev != 0 and rel > t0 and t1 >= rel:
                    handoff.record(t1 - rel)
                pack("<Q", mm, LAST_OWNER, me)
        spin()
        if ex:
            pack("<Q", mm, LAST_RELEASE, now())
        lock.release(ex)
        lat += 1
        (wait_ex if ex else wait_sh).record(max(0, t1 - t0))
    with open(a.out, "w") as f:
        f.write("tp_ex %d\ntp_sh %d\ntp_changes %d\nlat_acq %d\nowner_died 0\n" % (tp_ex, tp_sh, tp_changes, lat))
        f.write("hist wait_ex %s\nhist wait_sh %s\nhist handoff %s\n" % (wait_ex.encode(), wait_sh.encode(), handoff.encode()))
    pack("<Q", mm, slot + S_ACK, 3)


def probe():
    import importlib

    for name in LIBS:
        try:
            m = importlib.import_module(PROBE.get(name, name))
            if name.startswith("compat-"):
                m = importlib.import_module("interlock")
            print("%s ok %s" % (name, getattr(m, "__version__", "?")))
        except Exception as e:  # report, never fail the probe
            print("%s missing %s" % (name, str(e).replace("\n", " ")))


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("worker")
    w.add_argument("--lib", required=True, choices=sorted(LIBS))
    w.add_argument("--page", required=True)
    w.add_argument("--dir", required=True)
    w.add_argument("--idx", type=int, required=True)
    w.add_argument("--mix", required=True)
    w.add_argument("--hold-ns", dest="hold_ns", type=int, required=True)
    w.add_argument("--out", required=True)
    sub.add_parser("probe")
    a = ap.parse_args()
    if a.cmd == "worker":
        worker(a)
    else:
        probe()


if __name__ == "__main__":
    main()
