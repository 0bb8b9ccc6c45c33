"""interlock.compat.lockbydir: lockbydir's DLock over LeaseLock, and the
defects it drops (a live holder's lock broken after TIMEOUT; a holder that
loses its lock without being told).

The real lockbydir is Python 2 only and not on PyPI, so it cannot run here;
where its mechanism matters, a few lines below follow its documented rule
(a lock is a directory, stale once its modification time is TIMEOUT
seconds old) to show what it would do. Other processes are fresh
interpreters driven over pipes with bounded waits, killed when a test ends.
"""

import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
import warnings

import pytest

import interlock
from interlock.compat import lockbydir
from interlock.compat.lockbydir import DLock, LeaseLostWarning

WAIT = 15.0

CHILD = r"""
import os, sys, time, warnings
from interlock.compat.lockbydir import DLock
name, timeout, patience = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
lock = DLock(name)
lock.TIMEOUT, lock.PATIENCE = timeout, patience
lost = []
lock.onLost = lost.append
warnings.simplefilter("ignore")
print("ready", os.getpid(), flush=True)
for line in sys.stdin:
    cmd = line.split()
    if cmd[0] == "lock":
        print(lock.LoopWhileLocked_ThenLocking(), flush=True)
    elif cmd[0] == "try":
        print(lock.locking(), flush=True)
    elif cmd[0] == "unlock":
        print(lock.unlocking(), lock.lost, len(lost), flush=True)
    elif cmd[0] == "break":
        print(lock.breakLock(), flush=True)
    elif cmd[0] == "raw":  # a lease that is not renewed: the control
        import interlock
        g = interlock.LeaseLock(os.path.abspath(lock.dirname()), ttl=timeout,
                                keep_alive=False).lock(timeout=patience)
        print(True, flush=True)
    elif cmd[0] == "quit":
        break
"""


class Child:
    def __init__(self, name, timeout=10.0, patience=30.0):
        self.p = subprocess.Popen(
            [sys.executable, "-c", CHILD, name, str(timeout), str(patience)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.lines = queue.Queue()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        first = self.answer().split()
        assert first[0] == "ready"
        self.pid = int(first[1])

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

    def kill(self):
        if self.p.poll() is None:
            os.kill(self.p.pid, signal.SIGCONT)
            self.p.kill()
        self.p.wait(WAIT)
        self.reader.join(WAIT)
        self.p.stdin.close()
        self.p.stdout.close()


@pytest.fixture
def children():
    started = []

    def make(*args, **kw):
        c = Child(*args, **kw)
        started.append(c)
        return c

    yield make
    for c in started:
        c.kill()


@pytest.fixture
def name(tmp_path):
    return str(tmp_path / "bed")


def quick(name, timeout=10, patience=2):
    lock = DLock(name)
    lock.TIMEOUT, lock.PATIENCE = timeout, patience
    return lock


# -- the API ---------------------------------------------------------------


def test_defaults_and_names(name):
    assert (lockbydir.TIMEOUT, lockbydir.PATIENCE, lockbydir.CHECKEVERYXSECONDS) == (10, 30, 0.03)
    assert lockbydir.REMOVETIMEDOUT is True and lockbydir.LOCKDIREXTENSION == ".lockdir"
    lock = DLock(name)
    assert (lock.TIMEOUT, lock.PATIENCE, lock.CHECKEVERYXSECONDS) == (10, 30, 0.03)
    assert lock.dirname() == name + ".lockdir"
    assert lock.lockingTime is None and lock.startedWaitingTime is None


def test_lock_unlock_cycle(name):
    lock = quick(name)
    assert not lock.exists() and not lock.isLocked() and lock.age() == lockbydir.ERROR
    assert lock.LoopWhileLocked_ThenLocking() is True
    assert lock.lockingTime is not None and lock.startedWaitingTime is None
    assert lock.exists() and lock.isLocked() and not lock.timedOut()
    assert 0 <= lock.age() < 5
    assert isinstance(lock.token, int)
    assert lock.unlocking() is True
    assert lock.lockingTime is None
    assert not lock.exists() and not lock.isLocked()
    assert lock.unlocking() is False  # not held any more


def in_thread(f):
    out = []
    t = threading.Thread(target=lambda: out.append(f()))
    t.start()
    t.join(WAIT)
    assert out, "the thread did not finish"
    return out[0]


def test_same_name_shares_the_lock_and_relocking_is_refused_at_once(name):
    a, b = quick(name), quick(name, patience=0.3)
    assert a.locking() is True
    t0 = time.monotonic()
    assert a.locking() is False
    assert a.LoopWhileLocked_ThenLocking() is False  # its own: refused, no wait
    assert b.LoopWhileLocked_ThenLocking() is False  # same thread, other instance
    assert time.monotonic() - t0 < 0.25
    assert in_thread(b.locking) is False
    assert b.isLocked()
    t0 = time.monotonic()
    assert in_thread(b.LoopWhileLocked_ThenLocking) is False  # waited out its patience
    assert 0.29 <= time.monotonic() - t0 < 5
    assert in_thread(b.breakLock) is False  # a live holder's lock is not broken
    assert b.unlocking() is False
    assert a.unlocking() is True
    assert b.locking() is True
    assert b.breakLock() is True  # its own: released
    assert not b.exists()


def test_no_patience_means_no_attempt(name):
    lock = quick(name, patience=0)
    assert lock.LoopWhileLocked_ThenLocking() is False
    assert not lock.exists()


def test_subclass_changes_defaults(name):
    class FastDLock(DLock):
        def __init__(self, n):
            DLock.__init__(self, n)
            self.CHECKEVERYXSECONDS = 0.005
            self.PATIENCE = 0.2

    a, b = FastDLock(name), FastDLock(name)
    assert a.LoopWhileLocked_ThenLocking() is True
    assert b.LoopWhileLocked_ThenLocking() is False
    assert a.unlocking() is True


def test_threads_hammering_one_bed_never_overlap(name):
    """The original's example 2, small: threads with their own DLock each."""
    inside, overlaps, slept = [], [], []

    def sleeper():
        lock = quick(name, patience=WAIT)
        if lock.LoopWhileLocked_ThenLocking():
            inside.append(1)
            if len(inside) > 1:
                overlaps.append(1)
            time.sleep(0.002)
            inside.pop()
            slept.append(1)
            assert lock.unlocking() is True

    ts = [threading.Thread(target=sleeper) for _ in range(12)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(WAIT)
    assert not overlaps and len(slept) == 12


def test_loop_while_locked_helper_polls_until_free(name):
    a, b = quick(name), quick(name, patience=WAIT)
    assert b.loopWhileLocked() is False
    a.locking()
    threading.Timer(0.2, a.unlocking).start()
    assert b.loopWhileLocked() is True
    assert not b.isLocked()


def test_os_helpers(tmp_path):
    d = str(tmp_path / "d")
    assert lockbydir.mkdir_ReturnWhetherSuccessful(d) is True
    assert lockbydir.mkdir_ReturnWhetherSuccessful(d) is False
    assert lockbydir.pathExists(d)
    assert 0 <= lockbydir.pathAgeInSeconds(d) < 5
    assert lockbydir.rmdir_ReturnWhetherSuccessfullyRemoved(d) is True
    assert lockbydir.rmdir_ReturnWhetherSuccessfullyRemoved(d) is False
    assert lockbydir.pathAgeInSeconds(d) == lockbydir.ERROR


def test_the_os_modules_own_checks(tmp_path, monkeypatch, capsys):
    # lockbydir_OS ran tests() as its self-test: mkdir/mkdir/rmdir/rmdir of
    # "testing" in the current directory, then ten threads doing both.
    monkeypatch.chdir(tmp_path)
    lockbydir.tests()
    out = capsys.readouterr().out
    results = [line.rsplit("= ", 1)[1] for line in out.splitlines() if "attempt" in line]
    assert results == ["True", "False", "True", "False"]
    q = lockbydir.test_mkdirRmdirConcurrent(10)
    assert len(q) == 10 and all(r in (True, False) for pair in q for r in pair)
    assert not os.path.exists("testing")
    q = []
    lockbydir.mkdirRmdir(str(tmp_path / "no" / "such" / "dir"), q)
    assert q[0][0][0] == 2 and q[0][1] is False  # ENOENT reported, not raised


def test_info_logger(capsys):
    log = lockbydir.getInfoLogger("[me]")
    log("hello %s", "there")
    assert "[me] hello there" in capsys.readouterr().err


# -- across processes ------------------------------------------------------------


def test_processes_exclude_and_a_waiter_wakes_on_release(name, children):
    a, b = children(name), children(name, patience=WAIT)
    assert a.ask("lock") == "True"
    assert b.ask("try") == "False"
    b.send("lock")
    with pytest.raises(AssertionError, match="did not answer"):
        b.answer(timeout=0.3)
    t0 = time.monotonic()
    assert a.ask("unlock") == "True False 0"
    assert b.answer() == "True"
    assert time.monotonic() - t0 < 2  # woken, not a 30 ms poll loop's luck
    assert a.ask("try") == "False"


def test_dead_holder_is_taken_over_at_once(name, children):
    a = children(name, timeout=3600)
    assert a.ask("lock") == "True"
    a.kill()
    lock = quick(name, patience=5)
    t0 = time.monotonic()
    assert lock.LoopWhileLocked_ThenLocking() is True
    assert time.monotonic() - t0 < 3  # not after TIMEOUT (an hour)
    assert lock.unlocking() is True


# -- the defects it drops -----------------------------------------------------


def original_rule_says_free(lock):
    """lockbydir's rule: free if the directory is missing or older than TIMEOUT."""
    path = lock.dirname()
    return not os.path.exists(path) or time.time() - os.path.getmtime(path) > lock.TIMEOUT


def test_live_holder_is_never_broken(name, children):
    holder = children(name, timeout=0.75)
    assert holder.ask("lock") == "True"
    lock = quick(name, timeout=0.75, patience=3)  # four TIMEOUTs of waiting
    t0 = time.monotonic()
    assert lock.LoopWhileLocked_ThenLocking() is False
    assert time.monotonic() - t0 >= 2.9
    assert lock.isLocked() and not lock.timedOut()
    assert lock.breakLock() is False
    assert not original_rule_says_free(lock)  # the original would wait too
    assert holder.ask("unlock") == "True False 0"  # still held, never lost


def test_the_originals_lock_directory_is_respected_until_removed(name):
    """A directory made as the original makes it (an empty NAME.lockdir)."""
    os.mkdir(name + ".lockdir")
    lock = quick(name, patience=0.3)
    assert lock.locking() is False
    assert lock.isLocked() and not lock.timedOut()
    assert lock.LoopWhileLocked_ThenLocking() is False
    assert lock.breakLock() is False
    lock.PATIENCE = WAIT
    threading.Timer(0.2, os.rmdir, (name + ".lockdir",)).start()  # the original unlocks
    assert lock.LoopWhileLocked_ThenLocking() is True
    assert original_rule_says_free(lock) is False
    with pytest.raises(OSError):  # the original's unlocking/breakLock: rmdir
        os.rmdir(lock.dirname())
    assert lock.unlocking() is True


def test_the_originals_stale_directory_is_removed_by_its_rule(name):
    os.mkdir(name + ".lockdir")
    old = time.time() - 60
    os.utime(name + ".lockdir", (old, old))
    lock = quick(name, timeout=10)
    assert lock.timedOut() and not lock.isLocked()
    assert lock.locking() is True
    assert lock.unlocking() is True


def test_control_a_lease_that_is_not_renewed_is_taken(name, children):
    """The check above catches a lock that lapses while its holder lives."""
    holder = children(name, timeout=0.5)
    assert holder.ask("raw") == "True"  # held, alive, not renewed
    lock = quick(name, timeout=0.5, patience=5)
    assert lock.LoopWhileLocked_ThenLocking() is True  # the check would fail here
    lock.unlocking()


def test_a_stopped_holder_is_told_it_lost_the_lock(name, children):
    holder = children(name, timeout=0.3)
    assert holder.ask("lock") == "True"
    os.kill(holder.pid, signal.SIGSTOP)
    try:
        lock = quick(name, timeout=10, patience=WAIT)
        assert lock.LoopWhileLocked_ThenLocking() is True  # after the lease + skew
    finally:
        os.kill(holder.pid, signal.SIGCONT)
    unlocked, lost, calls = holder.ask("unlock").split()
    assert (unlocked, lost, calls) == ("False", "True", "1")  # told, once
    assert lock.isLocked()  # and the late unlock did not touch the new holder
    assert lock.unlocking() is True


def test_lost_lease_warns_and_calls_back_in_process(name):
    lock = quick(name, timeout=5)
    calls = []
    lock.onLost = calls.append
    assert lock.locking()
    shutil.rmtree(lock.dirname())  # removed behind the holder's back
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        assert lock.unlocking() is False
    assert lock.lost is True and len(calls) == 1
    assert isinstance(calls[0], interlock.LeaseLost)
    assert any(x.category is LeaseLostWarning for x in w)


def test_breaklock_removes_a_stale_lock(name, children):
    """A lock whose holder died: stale, and breakLock removes it."""
    holder = children(name, timeout=0.3)
    assert holder.ask("raw") == "True"
    holder.kill()
    lock = quick(name)
    assert lock.exists() and lock.timedOut()
    assert lock.breakLock() is True
    assert not lock.exists()
    assert holder.p.returncode is not None
