"""interlock.compat.locks: the behaviour the original ``locks`` tests check,
interoperation with the real ``locks`` (flock), and the defects fixed.

The original's test suite (test_locks.py in its repository) is not in its
sdist, so these are our own tests of every public behaviour it checks:
the constructor's attributes (``_fd`` included), a second ``lock()`` being
a no-op, another ``Mutex`` with a timeout failing with
``BlockingIOError``/``EAGAIN`` (also when the first ``Mutex`` was dropped
while holding), the callback called once before waiting, ``release()`` and
``with`` removing the file (``remove=False`` keeps it), a child process failing
to take a held lock, a child's release, and two objects in one thread
excluding each other. (scripts/ancestor-tests.sh runs the original file
itself, given a copy of it.)
"""

import errno
import os
import pickle
import threading
import time

import pytest
from compat_support import DRIVER, need, voluntary_switches

from interlock.compat import locks
from interlock.compat.locks import Mutex


@pytest.fixture
def path(tmp_path):
    return str(tmp_path / "lock")


def child(spawn, path, lib):
    if lib == "real-locks":
        need("locks")
    c = spawn(DRIVER, lib, path)
    c.expect("ready")
    return c


def test_module_metadata():
    assert locks.__all__ == ["Mutex"]
    assert locks.__version__ == "0.1.1"
    assert locks.__title__ == "locks"


def test_constructor_keeps_its_arguments():
    m = Mutex("/tmp/x.lock")
    assert (m.path, m.timeout, m._callback) == ("/tmp/x.lock", None, None)
    cb = object()
    m = Mutex("/tmp/x.lock", 3.14, cb)
    assert (m.path, m.timeout, m._callback) == ("/tmp/x.lock", 3.14, cb)


def test_fd_is_none_unless_held(path):
    # The original's tests read the private _fd: None until lock(), and
    # None again after a lock() that failed.
    m = Mutex(path, timeout=0.1)
    assert m._fd is None
    m.lock()
    assert m._fd  # held: a true value, but no descriptor to misuse
    with pytest.raises(TypeError):
        os.close(m._fd)
    other = Mutex(path, timeout=0.1)
    e = in_thread(other.lock)
    assert isinstance(e, BlockingIOError) and other._fd is None
    m.release()
    assert m._fd is None


HOLD_AND_DROP = r"""
import gc, sys
from interlock.compat.locks import Mutex
m = Mutex(sys.argv[1])
m.lock()
if sys.argv[2] == "release":
    m.release()
del m
gc.collect()
print("dropped", flush=True)
sys.stdin.readline()
"""


@pytest.mark.parametrize("then", ["drop", "release"])
def test_a_dropped_mutex_keeps_its_lock_until_the_process_ends(spawn, path, then):
    # As the original's (whose descriptor stayed open): the object goes, the
    # lock stays. The "release" run is the control: the same probe sees the
    # lock free once it was released.
    c = spawn("-c", HOLD_AND_DROP, path, then)
    c.expect("dropped")
    probe = Mutex(path, timeout=0.1)
    if then == "drop":
        with pytest.raises(BlockingIOError):
            probe.lock()
        c.send()
        c.proc.wait(20)
        probe.lock()  # the process ended: the lock went with it
    else:
        probe.lock()
        c.send()
    probe.release()


def in_thread(f):
    """Runs f() in another thread; returns what it returned or raised."""
    out = []

    def run():
        try:
            out.append(f())
        except BaseException as e:  # handed to the test
            out.append(e)

    t = threading.Thread(target=run)
    t.start()
    t.join(20)
    assert out, "the thread did not finish"
    return out[0]


@pytest.mark.parametrize("timeout", [None, 1])
def test_lock_twice_is_a_noop_and_others_time_out(path, timeout):
    m = Mutex(path, timeout=timeout)
    m.lock()
    assert os.path.exists(path)
    m.lock()  # again in the holding thread: returns at once
    other = Mutex(path, timeout=0.2)
    t0 = time.monotonic()
    e = in_thread(other.lock)
    assert time.monotonic() - t0 >= 0.2
    assert isinstance(e, BlockingIOError) and e.errno == errno.EAGAIN
    e = in_thread(Mutex(path, timeout=0).lock)
    assert isinstance(e, BlockingIOError) and e.errno == errno.EAGAIN
    m.release()
    other.lock()
    other.release()


def test_two_objects_in_one_thread_exclude_each_other(path):
    a, b = Mutex(path, timeout=0.1), Mutex(path, timeout=0.1)
    a.lock()
    with pytest.raises(BlockingIOError) as e:
        b.lock()  # at once: waiting for ourselves would be in vain
    assert e.value.errno == errno.EAGAIN
    a.release()
    a.lock()
    with pytest.raises(BlockingIOError):
        b.lock()
    a.release()
    # Without a timeout the wait could never end: AlreadyHeld, at once.
    import interlock

    a.lock()
    with pytest.raises(interlock.AlreadyHeld):
        Mutex(path).lock()
    with pytest.raises(interlock.AlreadyHeld):
        Mutex(path, callback=lambda: None).lock()
    a.release()


def test_release_deletes_the_file_unless_asked_to_keep_it(path):
    # As the original, release() and the end of `with` delete the lock
    # file (safely: as the last act before unlocking; see the tests below);
    # remove=False keeps it.
    m = Mutex(path)
    m.lock()
    assert os.path.exists(path)
    m.release()
    assert not os.path.exists(path)
    with Mutex(path, timeout=0.5) as held:
        assert isinstance(held, Mutex)
        assert os.path.exists(path)
    assert not os.path.exists(path)
    m.lock()  # again after the deletion: a new file
    assert os.path.exists(path)
    m.release()
    assert not os.path.exists(path)
    m = Mutex(path, remove=False)
    m.lock()
    m.release()
    assert os.path.exists(path)
    with Mutex(path, timeout=0.5, remove=False):
        assert os.path.exists(path)
    assert os.path.exists(path)
    try:
        Mutex.remove_on_release = False
        with Mutex(path):
            pass
        assert os.path.exists(path)
    finally:
        Mutex.remove_on_release = True
    # Releasing what is not held does nothing (and deletes nothing).
    Mutex(path).release()
    assert os.path.exists(path)
    # A file removed from outside while held: the release still unlocks.
    m = Mutex(path)
    m.lock()
    os.unlink(path)
    m.release()
    assert not os.path.exists(path)
    Mutex(path, timeout=0).lock()


def test_callback_is_called_once_then_waits(spawn, path):
    holder = child(spawn, path, "compat-locks")
    holder.send("try ex")
    holder.expect("held")
    calls = []
    done = []

    def callback():
        calls.append(1)
        holder.send("release")  # let it go only once we have said we wait

    def waiter():
        with Mutex(path, callback=callback):
            done.append(True)

    t = threading.Thread(target=waiter)
    t.start()
    t.join(20)
    holder.expect("released")
    assert calls == [1] and done == [True]
    # With timeout and callback: tries for the timeout first, then calls.
    holder.send("try ex")
    holder.expect("held")
    calls.clear()
    t0 = time.monotonic()
    m = Mutex(path, timeout=0.2, callback=callback)
    m.lock()
    assert calls == [1] and time.monotonic() - t0 >= 0.2
    m.release()
    holder.expect("released")
    # Free lock: the callback is never called.
    with Mutex(path, callback=callback):
        pass
    assert calls == [1]


def test_a_forked_child_cannot_take_or_release_the_parents_lock(path):
    m = Mutex(path, timeout=0.2)
    m.lock()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = b"x"
        try:
            try:
                Mutex(path, timeout=0.1).lock()
                code = b"took"
            except BlockingIOError:
                m.release()  # the copy of the parent's Mutex: releases nothing
                code = b"ok" if os.path.exists(path) else b"deleted"
        finally:
            os.write(w, code)
            os._exit(0)
    os.close(w)
    try:
        got = os.read(r, 16)
    finally:
        os.close(r)
        os.waitpid(pid, 0)
    assert got == b"ok"
    with pytest.raises(BlockingIOError):
        Mutex(path, timeout=0).lock()
    m.release()


def test_pickle_copies_settings_not_the_hold(path):
    m = Mutex(path, timeout=0.5)
    m.lock()
    copy = pickle.loads(pickle.dumps(m))
    assert (copy.path, copy.timeout) == (path, 0.5)
    with pytest.raises(BlockingIOError):
        copy.lock()
    m.release()
    copy.lock()
    copy.release()


def test_bad_paths(tmp_path):
    with pytest.raises(FileNotFoundError):
        Mutex(str(tmp_path / "no" / "lock")).lock()
    with pytest.raises(IsADirectoryError):
        Mutex(str(tmp_path)).lock()


# ---- interoperation with the real locks (flock) ----


@pytest.mark.parametrize("lib", ["real-locks", "flock"])
def test_compat_mutex_excludes_real_locks(spawn, path, lib):
    c = child(spawn, path, lib)
    m = Mutex(path)
    m.lock()
    c.send("try ex")
    assert c.line() == "busy"
    m.release()
    c.send("try ex")
    c.expect("held")


@pytest.mark.parametrize("lib", ["real-locks", "flock"])
def test_real_locks_excludes_compat_mutex(spawn, path, lib):
    c = child(spawn, path, lib)
    c.send("try ex")
    c.expect("held")
    with pytest.raises(BlockingIOError):
        Mutex(path, timeout=0.05).lock()
    got = []
    t = threading.Thread(target=lambda: got.append(Mutex(path).lock()))
    t.start()
    c.send("release")
    c.expect("released")
    t.join(20)
    assert got == [None]


def test_control_a_wrong_lock_is_caught(spawn, path):
    # The same check with a lock of the other family (lockf): the child gets
    # in, so a compat Mutex that failed to exclude would be caught.
    import fcntl

    c = child(spawn, path, "real-locks")
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    fcntl.lockf(fd, fcntl.LOCK_EX)
    c.send("try ex")
    assert c.line() == "held"
    os.close(fd)


# ---- the defects of locks that the compat module does not have ----


def test_threads_sharing_a_mutex_exclude_each_other(path):
    m = Mutex(path, timeout=0.05)
    m.lock()
    got = []

    def other():
        try:
            m.lock()
            got.append("took")
        except BlockingIOError:
            got.append("refused")

    t = threading.Thread(target=other)
    t.start()
    t.join(10)
    assert got == ["refused"]
    m.release()


def test_control_real_locks_lets_a_second_thread_in(path):
    real = need("locks")
    m = real.Mutex(path, timeout=0.05)
    m.lock()
    got = []
    t = threading.Thread(target=lambda: got.append(m.lock()))
    t.start()
    t.join(10)
    assert got == [None]  # the defect: the other thread "holds" it too
    m.release()


@pytest.mark.parametrize("lib,polls", [("compat-locks", False), ("real-locks", True)])
def test_a_timed_waiter_does_not_poll(spawn, path, lib, polls):
    # The original retries every millisecond while a timeout is set; the
    # compat Mutex sleeps in the kernel until the release or the deadline.
    # The real library is the control. The wait runs in a thread (in the
    # main thread interlock also wakes every 50 ms to look for Ctrl-C).
    if lib == "real-locks":
        need("locks")
    m = Mutex(path)
    m.lock()
    imp = "from interlock.compat import locks" if lib == "compat-locks" else "import locks"
    code = (
        f"import sys, threading\n{imp}\n"
        "def wait():\n"
        "    print('tid', threading.get_native_id(), flush=True)\n"
        "    try:\n"
        "        locks.Mutex(sys.argv[1], timeout=1.0).lock()\n"
        "        print('held', flush=True)\n"
        "    except BlockingIOError:\n        print('busy', flush=True)\n"
        "t = threading.Thread(target=wait); t.start(); t.join()\n"
    )
    c = spawn("-c", code, path)
    word, tid = c.line().split()
    assert word == "tid"
    before = voluntary_switches(c.proc.pid, tid)
    time.sleep(0.5)
    woke = voluntary_switches(c.proc.pid, tid) - before
    c.expect("busy")
    m.release()
    if polls:
        assert woke > 50, f"the real locks woke only {woke} times in 0.5 s"
    else:
        assert woke <= 5, f"the compat waiter woke {woke} times in 0.5 s"


DELETE_WORKER = r"""
import os, sys
lib, path, marker, rounds = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
if lib == "compat":
    from interlock.compat import locks
else:
    import locks
print("ready", flush=True); sys.stdin.readline()
bad = 0
for _ in range(rounds):
    with locks.Mutex(path):
        try:
            fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            bad += 1
        else:
            os.close(fd); os.unlink(marker)
    if bad and lib == "real":
        break
print(bad, flush=True)
"""


def run_deleters(spawn, tmp_path, lib, rounds):
    path, marker = str(tmp_path / "lock"), str(tmp_path / "marker")
    kids = [spawn("-c", DELETE_WORKER, lib, path, marker, rounds) for _ in range(4)]
    for k in kids:
        k.expect("ready")
    for k in kids:
        k.send()
    return sum(int(k.line(60)) for k in kids)


def test_deleting_on_release_never_lets_two_holders_in(spawn, tmp_path):
    # release() deletes the lock file, as the original's did, but as its
    # last act before unlocking. Four processes x 300 rounds of lock -> O_EXCL
    # marker -> remove it -> release (deleting the lock file): never two in.
    assert run_deleters(spawn, tmp_path, "compat", 300) == 0


def test_control_the_original_lets_two_holders_in(spawn, tmp_path):
    # The original unlocks first and deletes second: a waiter on the old
    # file and a newcomer on a new one both hold it.
    need("locks")
    assert run_deleters(spawn, tmp_path, "real", 5000) > 0
