"""interlock.compat.pylocksfile: pylocksfile's API over LockSet, interoperation
with the real pylocksfile, and the defects it drops.

Other processes are fresh interpreters (``sys.executable``) driven line by
line over pipes: every answer is awaited with a bound, and the children are
killed when a test ends. Each exclusion check has a control that shows the
check failing where the locks do not conflict.
"""

import fcntl
import os
import queue
import subprocess
import sys
import threading
import time

import pytest

import interlock
from interlock.compat import pylocksfile as compat
from interlock.compat.pylocksfile import IllegalArgumentError, pylocksfile

WAIT = 10.0

# A child that takes and releases locks on command: "acquire W FIRST COUNT
# BLOCKING", "release FIRST COUNT" (or "release"), "quit". It answers every
# command with one line. KIND picks what it locks with.
CHILD = r"""
import fcntl, os, sys
kind, path = sys.argv[1], sys.argv[2]
if kind == "real":
    import pylocksfile as m
    assert "interlock" not in m.__file__, m.__file__
    locks = m.pylocksfile(path)
elif kind == "compat":
    from interlock.compat import pylocksfile as m
    locks = m.pylocksfile(path)
elif kind == "flock":
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
print("ready", flush=True)
for line in sys.stdin:
    cmd = line.split()
    if cmd[0] == "quit":
        break
    if kind == "flock":
        if cmd[0] == "acquire":
            op = fcntl.LOCK_EX if cmd[1] == "1" else fcntl.LOCK_SH
            try:
                fcntl.flock(fd, op | (0 if cmd[4] == "1" else fcntl.LOCK_NB))
                print(True, flush=True)
            except BlockingIOError:
                print(False, flush=True)
        else:
            fcntl.flock(fd, fcntl.LOCK_UN)
            print("released", flush=True)
        continue
    if cmd[0] == "acquire":
        ok = locks.acquire(writeLock=cmd[1] == "1", lock_n=(int(cmd[2]), int(cmd[3])),
                           blocking=cmd[4] == "1")
        print(ok, flush=True)
    elif cmd[0] == "release":
        locks.release(None if len(cmd) == 1 else (int(cmd[1]), int(cmd[2])))
        print("released", flush=True)
    elif cmd[0] == "closeother":
        os.close(os.open(path, os.O_RDONLY))
        print("closed", flush=True)
"""


class Child:
    def __init__(self, kind, path):
        self.p = subprocess.Popen(
            [sys.executable, "-c", CHILD, kind, path],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.lines = queue.Queue()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        assert self.answer() == "ready"

    def _read(self):
        for line in self.p.stdout:
            self.lines.put(line.strip())
        self.lines.put(None)

    def send(self, cmd):
        self.p.stdin.write(cmd + "\n")
        self.p.stdin.flush()

    def answer(self, timeout=WAIT):
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"the child did not answer within {timeout:.1f} s") from None
        assert line is not None, "the child exited"
        return line

    def ask(self, cmd, timeout=WAIT):
        self.send(cmd)
        return self.answer(timeout)

    def acquire(self, write, first, count=1, blocking=False):
        return self.ask(f"acquire {write:d} {first:d} {count:d} {blocking:d}") == "True"

    def kill(self):
        if self.p.poll() is None:
            self.p.kill()
        self.p.wait(WAIT)
        self.reader.join(WAIT)
        self.p.stdin.close()
        self.p.stdout.close()


@pytest.fixture
def children():
    started = []

    def make(kind, path):
        c = Child(kind, path)
        started.append(c)
        return c

    yield make
    for c in started:
        c.kill()


@pytest.fixture
def path(tmp_path):
    return str(tmp_path / "locks.lock")


def real_pylocksfile():
    real = pytest.importorskip("pylocksfile")
    if "interlock" in real.__file__:
        pytest.skip("pylocksfile is aliased to the compat module here")
    return real


# -- the API ---------------------------------------------------------------


def test_names_and_properties(path):
    assert compat.__all__ == ["pylocksfile"]
    assert issubclass(IllegalArgumentError, ValueError)
    assert issubclass(compat.IllegalWithStatement, ValueError)
    lf = pylocksfile(locksfile_path=path, verbose=False, l_id="one")
    assert lf.locksfile_path == os.path.abspath(path)
    assert lf.l_id == "one"
    assert lf.verbose is False
    lf.verbose = True
    assert lf.verbose is True
    assert pylocksfile(path).l_id == str(os.getpid())


def test_default_path_is_a_new_file_in_tmp():
    a, b = pylocksfile(), pylocksfile()
    try:
        assert os.path.dirname(a.locksfile_path) == "/tmp"
        assert a.locksfile_path != b.locksfile_path
        assert a.acquire(writeLock=True, lock_n=0) and b.acquire(writeLock=True, lock_n=0)
    finally:
        for lf in (a, b):
            lf.release()
            os.unlink(lf.locksfile_path)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(locksfile_path="/nonexistent-dir-for-test/x.lock"),
        dict(verbose="yes"),
    ],
)
def test_bad_constructor_arguments(path, kwargs):
    kwargs.setdefault("locksfile_path", path)
    with pytest.raises(IllegalArgumentError):
        pylocksfile(**kwargs)


@pytest.mark.parametrize("lock_n", [-1, (1, 0), (-1, 2), (1, 2, 3), [1], "3", 1.5, None, (1.0, 2)])
def test_bad_intervals(path, lock_n):
    lf = pylocksfile(path)
    with pytest.raises(IllegalArgumentError):
        lf.acquire(lock_n=lock_n)
    if lock_n is not None:
        with pytest.raises(IllegalArgumentError):
            lf.release(lock_n)


def test_bad_flags(path):
    lf = pylocksfile(path)
    with pytest.raises(IllegalArgumentError):
        lf.acquire(writeLock=1)
    with pytest.raises(IllegalArgumentError):
        lf.acquire(blocking=None)


def test_intervals_conversion_and_partial_release(path):
    a, b = pylocksfile(path), pylocksfile(path)
    assert a.acquire(writeLock=True, lock_n=(0, 3)) is True  # 0, 1, 2 exclusive
    assert b.acquire(writeLock=False, lock_n=1, blocking=False) is False
    assert a.acquire(writeLock=False, lock_n=(1, 1)) is True  # 1 converted to shared
    assert b.acquire(writeLock=False, lock_n=1, blocking=False) is True
    assert b.acquire(writeLock=True, lock_n=1, blocking=False) is False
    assert b.acquire(writeLock=False, lock_n=2, blocking=False) is False
    a.release(1)
    assert b.acquire(writeLock=True, lock_n=1, blocking=False) is True  # b upgraded
    a.release((2, 1))
    assert b.acquire(writeLock=True, lock_n=(2, 3), blocking=False) is True
    assert a.acquire(writeLock=False, lock_n=0, blocking=False) is True  # a: 0 ex -> sh
    a.release((3, 997))  # not held: ignored
    a.release()
    assert b.acquire(writeLock=True, lock_n=(0, 5), blocking=False) is True
    b.release()
    assert a.acquire(writeLock=True, lock_n=(0, 10), blocking=False) is True


def test_with_statement_releases_what_it_took(path):
    a, b = pylocksfile(path), pylocksfile(path)
    a.acquire(writeLock=True, lock_n=(1, 3))
    with a(writeLock=False, lock_n=(2, 1)):  # 2 becomes shared for the block
        assert b.acquire(lock_n=2, blocking=False) is True
        b.release(2)
        with a(writeLock=True, lock_n=7):
            assert b.acquire(lock_n=7, blocking=False) is False
        assert b.acquire(lock_n=7, blocking=False) is True  # inner block released 7
        b.release(7)
        assert b.acquire(lock_n=1, blocking=False) is False  # 1 and 3 still a's
    assert b.acquire(lock_n=2, blocking=False) is True  # the block released 2
    assert b.acquire(lock_n=3, blocking=False) is False


def test_with_that_would_deadlock_raises(path):
    a, b = pylocksfile(path), pylocksfile(path)
    a.acquire(writeLock=True, lock_n=0)
    b.acquire(writeLock=True, lock_n=1)
    t = threading.Thread(target=lambda: a.acquire(writeLock=True, lock_n=1))
    t.start()
    deadline = time.monotonic() + WAIT
    while not any(h.waiting for h in interlock.holders(path)):  # until a waits for b
        if time.monotonic() > deadline:
            b.release()
            t.join(WAIT)
            pytest.fail("the waiting thread never showed as waiting")
        time.sleep(0.01)
    with pytest.raises(interlock.Deadlock):
        with b(writeLock=True, lock_n=0):
            pytest.fail("ran without the lock")
    assert b.acquire(writeLock=True, lock_n=0) is False  # acquire says False
    b.release(1)
    t.join(WAIT)
    assert not t.is_alive()


def test_waiting_for_itself_through_two_objects_is_false_at_once(path):
    # One thread, two objects of one file: the second would wait for the
    # first, held by the same thread, for ever. acquire() says False at once
    # (as for any deadlock); `with` raises; another thread does wait.
    a, b = pylocksfile(path), pylocksfile(path)
    assert a.acquire(writeLock=True, lock_n=(0, 2)) is True
    assert b.acquire(writeLock=False, lock_n=1) is False
    with pytest.raises(interlock.Deadlock):
        with b(writeLock=True, lock_n=0):
            pytest.fail("ran without the lock")
    got = queue.Queue()
    t = threading.Thread(target=lambda: got.put(b.acquire(writeLock=True, lock_n=1)))
    t.start()
    with pytest.raises(queue.Empty):
        got.get(timeout=0.2)  # the control: another thread waits, it is no error
    a.release()
    assert got.get(timeout=WAIT) is True
    t.join(WAIT)
    b.release()


def test_verbose_prints(path, capsys):
    lf = pylocksfile(path, verbose=True, l_id="me")
    lf.acquire(writeLock=True, lock_n=(0, 2))
    lf.release()
    out = capsys.readouterr().out
    assert "- me -" in out and "Write lock acquired" in out and "Releasing" in out


def test_lock_interval_class():
    li = compat.lockInterval()
    li.insertInterval((0, 3))
    li.insertInterval(5)
    li.insertInterval((3, 2))
    assert [tuple(r) for r in li] == [(0, 6)]
    li.removeInterval((2, 2))
    assert [tuple(r) for r in li.intervals] == [(0, 2), (4, 2)]
    assert li.inBound(5) and not li.inBound(3)
    li.reset()
    assert li.intervals == []


def test_dropping_an_object_releases_its_locks(path, children):
    lf = pylocksfile(path)
    lf.acquire(writeLock=True, lock_n=4)
    other = children("compat", path)
    assert other.acquire(True, 4) is False
    del lf
    assert other.acquire(True, 4) is True


# -- interoperation with the real pylocksfile --------------------------------


def test_real_pylocksfile_and_compat_exclude_each_other(path, children):
    real_pylocksfile()
    real = children("real", path)
    assert real.acquire(True, 5, 1)  # the real one holds 5 exclusive
    mine = pylocksfile(path)
    assert mine.acquire(writeLock=True, lock_n=5, blocking=False) is False
    assert mine.acquire(writeLock=False, lock_n=(4, 2), blocking=False) is False
    assert mine.acquire(writeLock=True, lock_n=(6, 3), blocking=False) is True  # other indices
    assert real.acquire(True, 6) is False
    assert real.acquire(False, 7) is False
    real.ask("release 5 1")
    assert mine.acquire(writeLock=False, lock_n=5, blocking=False) is True
    assert real.acquire(False, 5) is True  # shared with shared
    assert real.acquire(True, 5) is False
    mine.release()
    assert real.acquire(True, 5) is True  # upgraded once we left


def test_real_pylocksfile_waits_for_compat_and_vice_versa(path, children):
    real_pylocksfile()
    real = children("real", path)
    mine = pylocksfile(path)
    mine.acquire(writeLock=True, lock_n=(0, 4))
    real.send("acquire 1 2 1 1")  # blocking
    with pytest.raises(AssertionError, match="did not answer"):
        real.answer(timeout=0.3)
    mine.release((2, 1))
    assert real.answer() == "True"
    got = []
    t = threading.Thread(target=lambda: got.append(mine.acquire(writeLock=False, lock_n=2)))
    t.start()
    t.join(0.3)
    assert got == []
    real.ask("release")
    t.join(WAIT)
    assert got == [True]


def test_control_flock_does_not_exclude_the_real_pylocksfile(path, children):
    """The check above fails for a lock that does not conflict (flock)."""
    real_pylocksfile()
    fl = children("flock", path)
    assert fl.acquire(True, 0)
    real = children("real", path)
    assert real.acquire(True, 0) is True  # both "hold": the check would catch this


# -- the defects it drops -------------------------------------------------------


def test_lock_file_is_not_truncated(path):
    with open(path, "w") as f:
        f.write("precious")
    lf = pylocksfile(path)
    lf.acquire(writeLock=True, lock_n=(0, 100))
    lf.release()
    with open(path) as f:
        assert f.read() == "precious"


def test_control_real_pylocksfile_truncates(path):
    real = real_pylocksfile()
    with open(path, "w") as f:
        f.write("precious")
    real.pylocksfile(path)
    assert os.path.getsize(path) == 0


def _race_two_threads(make):
    """Two objects on one file, in two threads: does the second get lock 3?"""
    a, b = make(), make()
    held, result = threading.Event(), []

    def holder():
        a.acquire(writeLock=True, lock_n=3)
        held.set()

    t = threading.Thread(target=holder)
    t.start()
    assert held.wait(WAIT)
    t2 = threading.Thread(
        target=lambda: result.append(b.acquire(writeLock=True, lock_n=3, blocking=False))
    )
    t2.start()
    t2.join(WAIT)
    t.join(WAIT)
    a.release()
    b.release()
    return result


def test_threads_exclude_each_other(path):
    assert _race_two_threads(lambda: pylocksfile(path)) == [False]


def test_control_real_pylocksfile_threads_do_not_exclude(path):
    real = real_pylocksfile()
    assert _race_two_threads(lambda: real.pylocksfile(path)) == [True]


def test_closing_another_descriptor_keeps_the_lock(path, children):
    lf = pylocksfile(path)
    lf.acquire(writeLock=True, lock_n=9)
    os.close(os.open(path, os.O_RDONLY))
    other = pylocksfile(path)  # another object of the same file, then collected
    del other
    probe = children("compat", path)
    assert probe.acquire(True, 9) is False
    with open(path) as f:
        fcntl.lockf(f, fcntl.LOCK_SH | fcntl.LOCK_NB, 1, 50)  # classic lock on another byte
    assert probe.acquire(True, 9) is False


def test_control_real_pylocksfile_loses_its_lock_when_another_fd_closes(path, children):
    real_pylocksfile()
    real = children("real", path)
    assert real.acquire(True, 9)
    probe = children("compat", path)
    assert probe.acquire(True, 9) is False
    real.ask("closeother")
    assert probe.acquire(True, 9) is True  # the real one's lock is gone


def test_processes_exclude_with_a_handoff(path, children):
    a = children("compat", path)
    b = children("compat", path)
    assert a.acquire(True, 0, 10)
    b.send("acquire 1 5 1 1")
    with pytest.raises(AssertionError, match="did not answer"):
        b.answer(timeout=0.3)
    a.ask("release 5 1")
    assert b.answer() == "True"
    assert a.acquire(True, 5) is False
