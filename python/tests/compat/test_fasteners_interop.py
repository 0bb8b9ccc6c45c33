"""interlock.compat.fasteners against the real fasteners, and the defects fixed.

Interoperation: a process using the real fasteners (installed in the test
venv, python/requirements-test.txt) and this process using the compat
module lock the same file and exclude each other, both ways, for the
exclusive lock and for the reader-writer lock. Each exclusion check is also
run once with a deliberately wrong lock (``flock``, which fcntl-family
locks ignore) to show that the check catches a lock that does not exclude.
"""

import os
import threading
import time

import pytest
from compat_support import DRIVER, need, voluntary_switches

from interlock.compat import fasteners as compat


@pytest.fixture
def lock_path(tmp_path):
    return str(tmp_path / "lock")


def real_child(spawn, path, lib="real-fasteners"):
    need("fasteners")
    c = spawn(DRIVER, lib, path)
    c.expect("ready")
    return c


def excluded_by_child(spawn, path, hold, child_mode, lib="real-fasteners"):
    """Holds ``hold()`` here and asks a child running ``lib`` for
    ``child_mode`` without waiting: True if the child was refused (and it
    gets the lock once we release)."""
    c = real_child(spawn, path, lib)
    release = hold()
    c.send(f"try {child_mode}")
    refused = c.line() == "busy"
    release()
    c.send(f"try {child_mode}")
    c.expect("held")
    c.send("quit")
    c.finish()
    return refused


def hold_compat_ex(path):
    def hold():
        lock = compat.InterProcessLock(path)
        assert lock.acquire(blocking=False)
        return lock.release

    return hold


def hold_compat_rw(path, write):
    def hold():
        lock = compat.InterProcessReaderWriterLock(path)
        if write:
            assert lock.acquire_write_lock(blocking=False)
            return lock.release_write_lock
        assert lock.acquire_read_lock(blocking=False)
        return lock.release_read_lock

    return hold


def hold_flock(path):
    # The control: a lock of the other kernel family.
    import fcntl

    def hold():
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX)
        return lambda: os.close(fd)

    return hold


def test_compat_lock_excludes_real_fasteners(spawn, lock_path):
    assert excluded_by_child(spawn, lock_path, hold_compat_ex(lock_path), "ex")
    assert excluded_by_child(spawn, lock_path, hold_compat_rw(lock_path, True), "ex")
    assert excluded_by_child(spawn, lock_path, hold_compat_rw(lock_path, True), "r")
    assert excluded_by_child(spawn, lock_path, hold_compat_rw(lock_path, False), "w")


def test_compat_read_lock_shares_with_real_readers(spawn, lock_path):
    assert not excluded_by_child(spawn, lock_path, hold_compat_rw(lock_path, False), "r")


def test_control_a_wrong_lock_is_caught(spawn, lock_path):
    # The same check, with a lock the real fasteners does not see: it says
    # "not excluded", so a compat lock that failed to exclude would be caught.
    assert not excluded_by_child(spawn, lock_path, hold_flock(lock_path), "ex")
    assert not excluded_by_child(spawn, lock_path, hold_flock(lock_path), "w")


@pytest.mark.parametrize("mode", ["ex", "w"])
def test_real_fasteners_excludes_compat(spawn, lock_path, mode):
    c = real_child(spawn, lock_path)
    c.send(f"try {mode}")
    c.expect("held")
    assert not compat.InterProcessLock(lock_path).acquire(blocking=False)
    rw = compat.InterProcessReaderWriterLock(lock_path)
    assert not rw.acquire_write_lock(blocking=False)
    assert not rw.acquire_read_lock(blocking=False)
    assert not rw.acquire_read_lock(timeout=0.05)
    c.send("release")
    c.expect("released")
    lock = compat.InterProcessLock(lock_path)
    assert lock.acquire(timeout=5)
    lock.release()
    c.send("quit")
    c.finish()


def test_real_reader_blocks_compat_writer_not_reader(spawn, lock_path):
    c = real_child(spawn, lock_path)
    c.send("try r")
    c.expect("held")
    rw = compat.InterProcessReaderWriterLock(lock_path)
    assert not rw.acquire_write_lock(blocking=False)
    assert rw.acquire_read_lock(blocking=False)
    rw.release_read_lock()
    c.send("release")
    c.expect("released")
    assert rw.acquire_write_lock(blocking=False)
    rw.release_write_lock()


def test_compat_waiter_gets_the_lock_when_real_fasteners_releases(spawn, lock_path):
    c = real_child(spawn, lock_path)
    c.send("try ex")
    c.expect("held")
    got = []
    lock = compat.InterProcessLock(lock_path)
    t = threading.Thread(target=lambda: got.append(lock.acquire(timeout=20)))
    t.start()
    c.send("release")
    c.expect("released")
    t.join(20)
    assert got == [True]
    lock.release()


MIXED_WORKER = r"""
import os, sys, time
lib, path, marker, rounds = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
if lib == "real":
    import fasteners
    lock = fasteners.InterProcessLock(path)
    take = lambda: lock.acquire(delay=0.001, max_delay=0.005)
    give = lock.release
elif lib == "compat":
    from interlock.compat import fasteners
    lock = fasteners.InterProcessLock(path)
    take, give = lock.acquire, lock.release
else:  # "off": the control, no lock at all
    take, give = (lambda: True), (lambda: None)
print("ready", flush=True)
sys.stdin.readline()
overlaps = 0
for i in range(rounds):
    assert take()
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        overlaps += 1
    else:
        time.sleep(0.0005)
        os.close(fd)
        os.unlink(marker)
    give()
    if lib == "off" and overlaps:
        break
print(overlaps, flush=True)
"""


def run_mixed(spawn, tmp_path, libs, rounds):
    need("fasteners")
    path, marker = str(tmp_path / "lock"), str(tmp_path / "marker")
    kids = [spawn("-c", MIXED_WORKER, lib, path, marker, rounds) for lib in libs]
    for k in kids:
        k.expect("ready")
    for k in kids:
        k.send()
    overlaps = [int(k.line(60)) for k in kids]
    for k in kids:
        k.finish()
    return sum(overlaps)


def test_mixed_processes_never_overlap(spawn, tmp_path):
    # Two processes on the real fasteners, two on the compat module: an
    # O_EXCL marker created inside the lock never finds another one there.
    assert run_mixed(spawn, tmp_path, ["real", "compat", "real", "compat"], 100) == 0


def test_control_mixed_processes_without_the_lock_overlap(spawn, tmp_path):
    # The control: with two of the four not locking, the check sees overlaps.
    assert run_mixed(spawn, tmp_path, ["real", "off", "compat", "off"], 300) > 0


# ---- the defects of fasteners that the compat module does not have ----


def test_threads_of_one_process_exclude_each_other(lock_path):
    # fasteners: two threads (two objects, or one shared object) both held
    # the InterProcessLock at once.
    a, b = compat.InterProcessLock(lock_path), compat.InterProcessLock(lock_path)
    assert a.acquire()
    results = []

    def other(lock):
        results.append(lock.acquire(blocking=False))
        results.append(lock.acquire(timeout=0.05))

    for lock in (b, a):
        t = threading.Thread(target=other, args=(lock,))
        t.start()
        t.join(10)
    assert results == [False, False, False, False]
    a.release()
    t = threading.Thread(target=other, args=(b,))
    t.start()
    t.join(10)
    assert results[-2] is True
    b.release()
    b.release()


def test_control_real_fasteners_lets_two_threads_in(lock_path):
    # The defect, shown on the real library: the same check fails there.
    fasteners = need("fasteners")
    a, b = fasteners.InterProcessLock(lock_path), fasteners.InterProcessLock(lock_path)
    assert a.acquire()
    got = []
    t = threading.Thread(target=lambda: got.append(b.acquire(blocking=False)))
    t.start()
    t.join(10)
    assert got == [True]
    b.release()
    a.release()


def test_a_waiting_writer_stops_new_readers(spawn, lock_path):
    # fasteners' reader-writer lock let a stream of readers keep a writer out.
    holder = real_child(spawn, lock_path, "compat-fasteners")
    holder.send("try r")
    holder.expect("held")
    order = []

    def writer():
        rw = compat.InterProcessReaderWriterLock(lock_path)
        assert rw.acquire_write_lock(timeout=20)
        order.append("w")
        rw.release_write_lock()

    t = threading.Thread(target=writer)
    t.start()
    # A reader in a third process is let in until the writer waits in the
    # kernel, and refused from then on.
    c = real_child(spawn, lock_path, "compat-fasteners")
    deadline = time.monotonic() + 10
    while True:
        c.send("try r")
        if c.line() == "busy":
            break
        c.send("release")
        c.expect("released")
        assert time.monotonic() < deadline, "a waiting writer never stopped new readers"
        time.sleep(0.001)
    assert order == []
    holder.send("release")
    holder.expect("released")
    t.join(20)
    assert order == ["w"]
    c.send("wait r")
    c.expect("held")


def test_control_real_fasteners_readers_overtake_a_waiting_writer(spawn, lock_path):
    fasteners = need("fasteners")
    rw1 = fasteners.InterProcessReaderWriterLock(lock_path)
    assert rw1.acquire_read_lock()
    t = threading.Thread(
        target=lambda: fasteners.InterProcessReaderWriterLock(lock_path).acquire_write_lock(
            timeout=0.5
        )
    )
    t.start()
    c = real_child(spawn, lock_path)
    time.sleep(0.1)  # the writer is polling by now; readers still get in
    c.send("try r")
    c.expect("held")
    t.join(10)
    rw1.release_read_lock()


def test_reentrancy_is_counted_and_upgrade_fails_at_once(lock_path):
    lock = compat.InterProcessLock(lock_path)
    assert lock.acquire() and lock.acquire(blocking=False)
    # Another object in the same thread also counts instead of hanging.
    other = compat.InterProcessLock(lock_path)
    assert other.acquire(timeout=1)
    other.release()
    lock.release()
    assert lock.acquired
    got = []
    t = threading.Thread(
        target=lambda: got.append(compat.InterProcessLock(lock_path).acquire(blocking=False))
    )
    t.start()
    t.join(10)
    assert got == [False]
    lock.release()
    assert not lock.acquired
    with pytest.raises(threading.ThreadError):
        lock.release()

    rw = compat.InterProcessReaderWriterLock(lock_path)
    with rw.write_lock():
        with rw.read_lock():
            with rw.write_lock():
                pass
    with rw.read_lock():
        with rw.read_lock():
            pass
        with pytest.raises(RuntimeError):
            rw.acquire_write_lock(timeout=5)
    with pytest.raises(threading.ThreadError):
        rw.release_read_lock()


def switches_while_waiting(spawn, lock_path, lib, seconds=1.0):
    """Holds the lock here while a thread of a child running ``lib`` waits
    for it for ``seconds``: how often that thread woke meanwhile."""
    lock = compat.InterProcessLock(lock_path)
    assert lock.acquire()
    c = real_child(spawn, lock_path, lib)
    c.send("twait ex")
    word, tid = c.line().split()
    assert word == "tid"
    before = voluntary_switches(c.proc.pid, tid)
    time.sleep(seconds)
    woke = voluntary_switches(c.proc.pid, tid) - before
    lock.release()
    c.expect("held")
    return woke


def test_a_waiter_sleeps_in_the_kernel_instead_of_polling(spawn, lock_path):
    # A polling waiter (fasteners sleeps 10 ms, growing to 100 ms, between
    # tries) wakes ~14 times in 1 s; one blocked in the kernel about once.
    # (In the main thread, interlock also wakes every 50 ms to look for
    # Ctrl-C; this waits in another thread to see the lock's own waiting.)
    woke = switches_while_waiting(spawn, lock_path, "compat-fasteners")
    assert woke <= 5, f"the waiting thread woke {woke} times in 1 s"


def test_control_real_fasteners_polls(spawn, lock_path):
    woke = switches_while_waiting(spawn, lock_path, "real-fasteners")
    assert woke > 5, f"the polling thread woke only {woke} times in 1 s"


def test_pickle_copies_settings_not_holds(lock_path):
    import pickle

    lock = compat.InterProcessLock(lock_path)
    assert lock.acquire()
    copy = pickle.loads(pickle.dumps(lock))
    assert copy.path == lock.path and not copy.acquired
    lock.release()
    rw = pickle.loads(pickle.dumps(compat.InterProcessReaderWriterLock(lock_path)))
    with rw.write_lock():
        pass


def test_fork_child_does_not_hold_or_release_the_parents_lock(lock_path):
    lock = compat.InterProcessLock(lock_path)
    assert lock.acquire()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report, never return into pytest
        code = 1
        try:
            lock.release()  # releases nothing of the parent's
            other = compat.InterProcessLock(lock_path)
            code = 0 if not other.acquire(blocking=False) else 2
        finally:
            os.write(w, b"%d" % code)
            os._exit(0)
    os.close(w)
    try:
        got = os.read(r, 8)
    finally:
        os.close(r)
        os.waitpid(pid, 0)
    assert got == b"0"
    assert lock.acquired
    lock.release()


def test_bad_arguments(lock_path, tmp_path):
    lock = compat.InterProcessLock(lock_path)
    with pytest.raises(ValueError):
        lock.acquire(delay=-1)
    with pytest.raises(ValueError):
        lock.acquire(timeout=-1)
    with pytest.raises(threading.ThreadError):
        compat.InterProcessLock(str(tmp_path)).acquire(blocking=False)
