"""interlock.compat.prwlock: prwlock's API over ShmRwLock, and the defect it drops.

Multi-process checks fork children with multiprocessing (the lock reaches
them by pickling, as prwlock's users pass it), coordinate with queues and
events, bound every wait, and kill what they started. Where a check is about
a lock excluding someone, a control shows the same check failing on a lock
that does not (or on the real prwlock, for its known defect).
"""

import multiprocessing as mp
import os
import pickle
import signal
import threading
import time
import warnings

import pytest

from interlock.compat import prwlock
from interlock.compat.prwlock import OwnerDiedWarning, RWLock

CTX = mp.get_context("fork")
WAIT = 10.0  # bound on every handshake


@pytest.fixture
def procs():
    started = []
    yield started
    for p in started:
        if p.is_alive():
            p.kill()
        p.join(WAIT)


def start(procs, target, *args):
    p = CTX.Process(target=target, args=args, daemon=True)
    p.start()
    procs.append(p)
    return p


# -- the API, in one process ----------------------------------------------------


def test_import_paths_and_names():
    assert prwlock.RWLock is prwlock.prwlock.RWLockPosix is prwlock.prwlock.RWLockOSX
    assert set(prwlock.__all__) == {
        "GenericLockContextManager",
        "RWLock",
        "get_pthread_process_shared",
        "set_pthread_process_shared",
    }
    assert prwlock.__version__ == "0.4.1"


def test_acquire_release_return_values():
    rw = RWLock()
    assert rw.acquire_read() is True
    assert rw.nlocks == 1
    rw.release()
    assert rw.acquire_write() is True
    rw.release()
    assert rw.acquire_read(timeout=0.5) is True
    rw.release()
    assert rw.acquire_write(timeout=0.5) is True
    rw.release()
    assert rw.try_acquire_read() is True
    rw.release()
    assert rw.try_acquire_write() is True
    rw.release()
    assert rw.nlocks == 0


def test_release_of_nothing_is_value_error():
    rw = RWLock()
    with pytest.raises(ValueError, match="Tried to release a released lock"):
        rw.release()
    rw.acquire_read()
    rw.release()
    with pytest.raises(ValueError):
        rw.release()


def test_write_twice_is_edeadlk_not_a_hang():
    rw = RWLock()
    rw.acquire_write()
    with pytest.raises(OSError) as e:
        rw.acquire_write()
    assert e.value.errno == __import__("errno").EDEADLK
    assert rw.acquire_write(timeout=0.2) is False  # bounded: False at once
    assert rw.try_acquire_write() is False
    assert rw.try_acquire_read() is False  # read after write would wait for itself
    with pytest.raises(OSError):
        rw.acquire_read()
    rw.release()
    assert rw.nlocks == 0


def test_read_then_write_by_one_thread_fails_at_once():
    rw = RWLock()
    rw.acquire_read()
    t0 = time.monotonic()
    assert rw.acquire_write(timeout=5) is False
    assert time.monotonic() - t0 < 1.0
    with pytest.raises(OSError):
        rw.acquire_write()
    rw.release()


def in_thread(f):
    """Runs f in another thread (bounded) and returns its result."""
    out = []
    t = threading.Thread(target=lambda: out.append(f()))
    t.start()
    t.join(WAIT)
    assert out, "the thread did not finish"
    return out[0]


def try_write_elsewhere(rw):
    def attempt():
        ok = rw.try_acquire_write()
        if ok:
            rw.release()
        return ok

    return in_thread(attempt)


def test_nested_reads_are_counted():
    rw = RWLock()
    assert rw.acquire_read() and rw.acquire_read()
    assert rw.nlocks == 2
    rw.release()
    assert try_write_elsewhere(rw) is False  # still read-held
    rw.release()
    assert try_write_elsewhere(rw) is True


def test_another_handle_in_the_same_thread_does_not_wait_for_itself():
    rw = RWLock()
    other = pickle.loads(pickle.dumps(rw))  # same lock, a handle that holds nothing
    assert other.nlocks == 0
    rw.acquire_write()
    t0 = time.monotonic()
    assert other.acquire_read(timeout=5) is False
    assert other.try_acquire_write() is False
    with pytest.raises(OSError):
        other.acquire_write()
    assert time.monotonic() - t0 < 1
    rw.release()
    assert other.try_acquire_write() is True
    other.release()


def test_context_managers():
    rw = RWLock()
    with rw.reader_lock(timeout=1):
        assert rw.nlocks == 1
    with rw.writer_lock(timeout=1):
        assert rw.nlocks == 1
    with rw.writer_lock():
        pass
    assert rw.nlocks == 0
    entered = False
    with pytest.raises(ValueError, match="Unable to acquire lock in context manager"):
        with rw.reader_lock(timeout=0.1):
            with rw.writer_lock(timeout=0.1):
                entered = True
    assert not entered
    assert rw.nlocks == 0
    with pytest.raises(ValueError):
        prwlock.GenericLockContextManager(rw, "upgrade")


def test_pthread_process_shared_constant():
    old = prwlock.get_pthread_process_shared()
    assert old == 1
    try:
        prwlock.set_pthread_process_shared(0xBEEF)
        with pytest.raises(OSError):
            RWLock()
        prwlock.set_pthread_process_shared(0)
        RWLock()
    finally:
        prwlock.set_pthread_process_shared(old)


def test_threads_exclude_and_any_thread_may_release():
    rw = RWLock()
    rw.acquire_write()
    got = []
    t = threading.Thread(target=lambda: got.append(rw.acquire_read(timeout=0.2)))
    t.start()
    t.join(WAIT)
    assert got == [False]
    # another thread releases the write lock this thread took
    t = threading.Thread(target=rw.release)
    t.start()
    t.join(WAIT)
    assert rw.nlocks == 0
    assert rw.try_acquire_write()
    rw.release()


def test_timeout_is_exact_not_whole_seconds():
    rw = RWLock()
    held, done = threading.Event(), threading.Event()

    def holder():
        rw.acquire_write()
        held.set()
        done.wait(WAIT)
        rw.release()

    t = threading.Thread(target=holder)
    t.start()
    assert held.wait(WAIT)
    t0 = time.monotonic()
    assert rw.acquire_read(timeout=0.3) is False
    waited = time.monotonic() - t0
    done.set()
    t.join(WAIT)
    assert 0.29 <= waited < 5.0


# -- across processes (forked, the lock pickled as prwlock users pass it) ---


def _child_try(rw, write, q):
    ok = rw.try_acquire_write() if write else rw.try_acquire_read()
    q.put(ok)
    if ok:
        rw.release()


def _child_timed(rw, write, q):
    ok = rw.acquire_write(0.3) if write else rw.acquire_read(0.3)
    q.put(ok)
    if ok:
        rw.release()


@pytest.mark.parametrize("child", [_child_try, _child_timed])
def test_processes_exclude_each_other(procs, child):
    rw = RWLock()
    q = CTX.Queue()
    rw.acquire_write()
    for write in (True, False):
        start(procs, child, rw, write, q)
        assert q.get(timeout=WAIT) is False
    rw.release()
    rw.acquire_read()
    start(procs, child, rw, False, q)
    assert q.get(timeout=WAIT) is True  # readers share
    start(procs, child, rw, True, q)
    assert q.get(timeout=WAIT) is False
    rw.release()
    for write in (True, False):
        start(procs, child, rw, write, q)
        assert q.get(timeout=WAIT) is True


def _hold(rw, write, q, go):
    (rw.acquire_write if write else rw.acquire_read)()
    q.put("held")
    go.wait(WAIT)
    rw.release()
    q.put("released")


def test_blocked_waiter_gets_it_when_the_holder_in_another_process_releases(procs):
    rw = RWLock()
    q, go = CTX.Queue(), CTX.Event()
    start(procs, _hold, rw, True, q, go)
    assert q.get(timeout=WAIT) == "held"
    assert rw.try_acquire_read() is False
    done = []
    t = threading.Thread(target=lambda: done.append(rw.acquire_write(timeout=WAIT)))
    t.start()
    time.sleep(0.05)
    assert not done  # still waiting
    go.set()
    t.join(WAIT)
    assert done == [True]
    assert q.get(timeout=WAIT) == "released"
    rw.release()


def test_pickle_round_trip_and_pool_children_share_it():
    rw = RWLock()
    rw.acquire_write()
    with CTX.Pool(2) as pool:
        res = pool.apply_async(_pool_try_read, (rw,))
        assert res.get(WAIT) is False
        rw.release()
        assert pool.apply_async(_pool_try_read, (rw,)).get(WAIT) is True


def _pool_try_read(rw):
    ok = rw.try_acquire_read()
    if ok:
        rw.release()
    return ok


def test_fork_child_holds_nothing_of_the_parents(procs):
    rw = RWLock()
    rw.acquire_write()
    q = CTX.Queue()
    start(procs, _child_release_inherited, rw, q)
    assert q.get(timeout=WAIT) == ("ValueError", 0)
    assert rw.nlocks == 1 and rw.try_acquire_read() is False  # still ours
    rw.release()


def _child_release_inherited(rw, q):
    try:
        rw.release()
        q.put(("released", rw.nlocks))
    except ValueError:
        q.put(("ValueError", rw.nlocks))


# -- the defect: a killed holder does not wedge the lock ------------------------


def _hold_forever(rw, write, q):
    (rw.acquire_write if write else rw.acquire_read)()
    q.put(os.getpid())
    time.sleep(3600)


def _killed_holder(procs, rw, write):
    q = CTX.Queue()
    p = start(procs, _hold_forever, rw, write, q)
    assert q.get(timeout=WAIT) == p.pid
    os.kill(p.pid, signal.SIGKILL)
    p.join(WAIT)
    assert p.exitcode == -signal.SIGKILL


def test_sigkilled_writer_does_not_wedge_others(procs):
    rw = RWLock()
    _killed_holder(procs, rw, True)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        t0 = time.monotonic()
        assert rw.acquire_write(timeout=5) is True
        assert time.monotonic() - t0 < 5
    assert [x.category for x in w] == [OwnerDiedWarning]
    rw.release()
    # repaired by the write acquisition: no more warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert rw.acquire_read(timeout=1) is True
        rw.release()
        assert rw.acquire_write(timeout=1) is True
        rw.release()


def test_sigkilled_writer_releases_blocked_waiters(procs):
    rw = RWLock()
    q = CTX.Queue()
    p = start(procs, _hold_forever, rw, True, q)
    q.get(timeout=WAIT)
    got = []

    def wait_read():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", OwnerDiedWarning)
            got.append(rw.acquire_read(timeout=WAIT))

    t = threading.Thread(target=wait_read)
    t.start()
    time.sleep(0.05)
    assert not got
    os.kill(p.pid, signal.SIGKILL)
    t.join(WAIT + 1)
    assert got == [True]
    rw.release()


def test_sigkilled_reader_does_not_keep_writers_out(procs):
    rw = RWLock()
    _killed_holder(procs, rw, False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a dead reader is reclaimed silently
        assert rw.acquire_write(timeout=5) is True
    rw.release()


def test_control_real_prwlock_is_wedged_by_a_killed_writer(procs):
    """The same check on the real prwlock: the dead writer wedges it."""
    real = pytest.importorskip("prwlock")
    if real.RWLock is RWLock:
        pytest.skip("prwlock is aliased to the compat module here")
    rw = real.RWLock()
    _killed_holder(procs, rw, True)
    assert rw.acquire_write(timeout=1) is False
    assert rw.try_acquire_read() is False
