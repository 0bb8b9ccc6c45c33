"""The Python idioms of every family, bad inputs, threads, reentrancy."""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import pickle
import threading

import pytest

import interlock
from interlock import AlreadyHeld, LockError, Timeout, WouldBlock


@pytest.fixture
def path(tmp_path):
    return str(tmp_path / "x.lock")


def other_thread(fn, *args):
    """Runs fn in another thread; returns its result or raises its error."""
    with concurrent.futures.ThreadPoolExecutor(1) as ex:
        return ex.submit(fn, *args).result(timeout=20)


def is_free(make):
    """Whether another thread can take the lock at once."""

    def probe():
        try:
            g = make(blocking=False)
        except WouldBlock:
            return False
        g.release()
        return True

    return other_thread(probe)


@pytest.mark.parametrize("flavor", ["fcntl", "flock"])
def test_file_lock_guards_and_threading_style(path, flavor):
    lock = interlock.FileLock(path, flavor=flavor)
    other = interlock.FileLock(path, flavor=flavor)
    assert lock.path == path and lock.flavor == flavor
    with lock.write(timeout=0.5) as g:
        assert g.held and g.mode == "write"
        assert not is_free(other.read)
    assert not g.held
    with pytest.raises(RuntimeError):
        g.release()
    with lock.read():
        assert is_free(other.read)
        assert not is_free(other.write)
    assert lock.acquire() is True
    assert lock.locked()
    assert other_thread(lambda: other.acquire(blocking=False)) is False
    assert other_thread(lambda: other.acquire(timeout=0.05)) is False
    lock.release()
    assert not lock.locked()
    with pytest.raises(RuntimeError):
        lock.release()
    with lock:
        assert lock.locked()
    assert lock.acquire(shared=True)
    assert is_free(other.read) and not is_free(other.write)
    other_thread(lock.release)  # any thread may release
    assert is_free(other.write)


def test_upgrade(path):
    lock = interlock.FileLock(path)
    other = interlock.FileLock(path)
    u = lock.upgradable_read()
    r = other_thread(lambda: other.read(blocking=False))
    assert not u.try_upgrade()  # a reader is in
    assert u.mode == "upgradable_read"
    with pytest.raises(Timeout):
        u.upgrade(timeout=0.05)
    assert u.held and u.mode == "upgradable_read"
    other_thread(r.release)
    u.upgrade(timeout=5)
    assert u.mode == "write"
    assert not is_free(other.read)
    u.release()
    with pytest.raises(ValueError):
        lock.read().upgrade()


def test_decorators(path, tmp_path):
    lock = interlock.FileLock(path)
    probe = interlock.FileLock(path)

    @lock
    def f(x):
        assert not is_free(probe.read)
        return x * 2

    assert f(21) == 42 and f.__name__ == "f"

    rw = interlock.ShmRwLock()

    @rw
    async def g():
        assert not is_free(rw.read)
        return 7

    assert asyncio.run(g()) == 7
    m = interlock.ShmMutex()

    @m
    def h():
        return m.locked()

    assert h() is True and not m.locked()
    lease = interlock.LeaseLock(str(tmp_path / "lease"), ttl=10)

    @lease
    def k():
        return lease.locked()

    assert k()


def test_timeouts_and_bad_arguments(path):
    lock = interlock.FileLock(path)
    with pytest.raises(ValueError):
        lock.write(blocking=False, timeout=1)
    with pytest.raises(ValueError):
        lock.write(timeout=-1)
    with pytest.raises(ValueError):
        lock.write(timeout=float("nan"))
    with pytest.raises(ValueError):
        lock.acquire(blocking=False, timeout=1)
    with pytest.raises(ValueError):
        interlock.FileLock(path, flavor="posix")
    with pytest.raises(ValueError):
        interlock.FileLock("")
    with pytest.raises(ValueError):
        interlock.LeaseLock(path + ".d", ttl=0)
    with pytest.raises(TypeError):
        interlock.FileLock(42)


def test_messages_name_the_path_and_exceptions_are_builtins(path, tmp_path):
    lock = interlock.FileLock(path)
    g = lock.write()
    other = interlock.FileLock(path)

    def busy():
        with pytest.raises(WouldBlock) as e:
            other.write(blocking=False)
        assert isinstance(e.value, BlockingIOError) and isinstance(e.value, LockError)
        assert path in str(e.value) and e.value.path == path
        with pytest.raises(Timeout) as e:
            other.write(timeout=0.05)
        assert isinstance(e.value, TimeoutError) and path in str(e.value)

    other_thread(busy)
    g.release()
    missing = str(tmp_path / "no" / "such.lock")
    with pytest.raises(FileNotFoundError) as e:
        interlock.FileLock(missing)
    assert missing in str(e.value)
    with pytest.raises(IsADirectoryError) as e:
        interlock.FileLock(str(tmp_path))
    assert str(tmp_path) in str(e.value)
    f = tmp_path / "file"
    f.write_text("")
    with pytest.raises(NotADirectoryError):
        interlock.FileLock(str(f / "x.lock"))
    if os.geteuid() != 0:
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        with pytest.raises(PermissionError):
            interlock.FileLock(str(ro / "x.lock"))
    with pytest.raises(FileNotFoundError):
        interlock.LockSet(missing)
    with pytest.raises(FileNotFoundError):
        interlock.holders(missing)


def test_reentrancy_is_defined(path):
    lock = interlock.FileLock(path)
    g = lock.write()
    with pytest.raises(AlreadyHeld) as e:
        lock.write(timeout=5)
    assert isinstance(e.value, RuntimeError) and path in str(e.value)
    with pytest.raises(AlreadyHeld):
        lock.read()
    # A second object on the same file would wait for this thread: refused.
    with pytest.raises(AlreadyHeld):
        interlock.FileLock(path).write()
    # Another thread simply finds it held.
    assert not is_free(interlock.FileLock(path).write)
    g.release()
    r = interlock.FileLock(path, reentrant=True)
    a = r.write()
    b = r.write()
    c = r.read()  # covered by the exclusive hold
    a.release()
    b.release()
    assert not is_free(interlock.FileLock(path).read)
    c.release()
    assert is_free(interlock.FileLock(path).write)
    s = r.read()
    with pytest.raises(AlreadyHeld):
        r.write()  # shared does not cover exclusive
    s.release()
    rw = interlock.ShmRwLock()
    w = rw.write()
    with pytest.raises(AlreadyHeld):
        rw.read()
    w.release()
    m = interlock.ShmMutex()
    with m:
        with pytest.raises(AlreadyHeld):
            m.lock()


def test_guards_released_from_other_threads_and_executors(path):
    lock = interlock.FileLock(path)
    probe = interlock.FileLock(path)
    g = lock.write()
    threading.Thread(target=g.release).start()
    probe.write(timeout=10).release()

    async def main():
        g = lock.write()
        await asyncio.to_thread(g.release)
        assert not g.held
        rw = interlock.ShmRwLock()
        h = rw.write()
        await asyncio.to_thread(h.release)
        h2 = rw.write(blocking=False)
        h2.release()

    asyncio.run(main())
    for family in (interlock.ShmRwLock(), interlock.ShmMutex()):
        take = family.write if hasattr(family, "write") else family.lock
        gs = [take()]
        with concurrent.futures.ThreadPoolExecutor(2) as ex:
            ex.submit(gs[0].release).result(10)
        take(blocking=False).release()


def test_shm_guard_objects_reused_only_when_nobody_refers_to_them():
    """A released guard object is reused for a later acquisition of the
    same lock only once nothing refers to it: a guard the program
    keeps stays released, and dropping a live guard still releases at once."""
    for lock in (interlock.ShmRwLock(), interlock.ShmMutex()):
        take = lock.read if hasattr(lock, "read") else lock.lock
        excl = lock.write if hasattr(lock, "write") else lock.lock
        kept = take()
        kept.release()
        g = take()
        assert g is not kept and g.held and not kept.held
        with pytest.raises(RuntimeError):
            kept.release()
        assert g.held
        g.release()
        ids = set()
        for _ in range(6):
            g = take()
            assert g.held
            ids.add(id(g))
            g.release()
            assert not g.held
        assert len(ids) <= 3  # reused (two spare slots)
        del g
        with take():
            pass
        # A live guard dropped: released at once, not parked held.
        h = excl()
        del h
        assert is_free(excl)
        h = excl()
        assert not is_free(excl)
        h.release()
        assert is_free(excl)
    # The lock object gone, a parked guard the program kept still answers.
    rw = interlock.ShmRwLock()
    g = rw.read()
    g.release()
    del rw
    assert not g.held
    with pytest.raises(RuntimeError):
        g.release()


def test_shm_parked_guards_serve_every_lock_object_of_the_lock(path):
    """A guard object parked by a release through one lock object may be
    reused by an acquisition through another lock object of the same lock
    (guards park in the lock's per-process record): the hold it then
    carries is that object's (locked() and close() see it), and the end of
    the object that parked it releases nothing. A guard released by another
    thread parks and is reused the same way."""
    name = path + ".shm"
    for kind in ("rw", "mutex"):
        make = interlock.ShmRwLock if kind == "rw" else interlock.ShmMutex
        a, b = make(name + kind), make(name + kind)
        take_a = a.write if kind == "rw" else a.lock
        take_b = b.write if kind == "rw" else b.lock
        parked = set()
        for _ in range(3):
            g = take_a()
            parked.add(id(g))
            g.release()
        del g
        ids = set()
        for _ in range(3):
            h = take_b()
            ids.add(id(h))
            assert b.locked() and not a.locked() and not is_free(take_a)
            h.release()
            assert is_free(take_a)
        assert ids & parked  # a's guard objects served b
        h = take_b()
        del a, take_a
        assert h.held and b.locked()
        assert not is_free(make(name + kind).write if kind == "rw" else make(name + kind).lock)
        b.close()
        assert not b.locked()
        assert is_free(take_b)
        del h
        # Released by another thread: parked, reused, still one holder.
        g = take_b()
        with concurrent.futures.ThreadPoolExecutor(1) as ex:
            ex.submit(g.release).result(10)
        del g
        g = take_b()
        assert g.held
        with pytest.raises(AlreadyHeld):
            take_b(blocking=False)
        g.release()
        assert is_free(take_b)
        del b, take_b, g


def test_reused_holds_keep_reentrancy_and_close(path):
    """A hold's record reuses released holds: reentrancy, AlreadyHeld and
    close() stay as they were, through several lock objects of one lock."""
    name = path + ".shm"
    for _ in range(3):
        a = interlock.ShmRwLock(name, reentrant=True)
        b = interlock.ShmRwLock(name)
        for _ in range(3):
            g = a.write()
            h = a.write()  # counted
            with pytest.raises(AlreadyHeld):
                b.read(blocking=False)
            g.release()
            assert not is_free(b.write)
            h.release()
            assert is_free(b.write)
            assert b.acquire(shared=True)
            with pytest.raises(AlreadyHeld):
                a.read()
            b.release()
        a.acquire()
        a.read().release()
        a.close()
        assert is_free(b.write)
        del a, b, g, h


def test_waits_release_the_gil(path):
    """While one thread waits for the lock, another runs Python code."""
    lock = interlock.FileLock(path)
    g = lock.write()
    started = threading.Event()
    got = []

    def waiter():
        started.set()
        got.append(interlock.FileLock(path).write(timeout=20))

    t = threading.Thread(target=waiter)
    t.start()
    started.wait(10)
    n = 0
    for _ in range(100000):  # Python bytecode runs meanwhile
        n += 1
    assert t.is_alive()
    g.release()
    t.join(20)
    assert got and got[0].held
    got[0].release()


def test_lock_set(tmp_path):
    p = str(tmp_path / "set.lock")
    s = interlock.LockSet(p)
    other = interlock.LockSet(p)
    s.lock(range(3, 7), shared=True)
    assert s.held() == [(range(3, 7), "shared")]
    s.lock(5)
    assert s.held() == [
        (range(3, 5), "shared"),
        (range(5, 6), "exclusive"),
        (range(6, 7), "shared"),
    ]
    assert s.mode_of(5) == "exclusive" and s.mode_of(0) is None
    s.unlock(slice(3, 5))
    s.unlock((6, 7))
    assert s.held() == [(range(5, 6), "exclusive")]

    def refused():
        with pytest.raises(WouldBlock):
            other.lock(5, shared=True, blocking=False)
        other.lock(range(0, 5), blocking=False)
        other.unlock_all()

    other_thread(refused)
    with s.locked(range(0, 10), shared=True) as g:
        assert g.mode == "scope"
        assert s.held() == [(range(0, 10), "shared")]
    assert s.held() == [(range(5, 6), "exclusive")]
    s.unlock_all()
    assert s.held() == []
    s.lock(range(2, 4))
    s.lock(8, shared=True)
    s.unlock()  # no argument: total release
    assert s.held() == []
    other.lock(range(0, 10), blocking=False)
    other.unlock()
    for bad in (range(5, 5), range(0, 10, 2), -1, (3, 2), "x", 1.5, True):
        with pytest.raises((ValueError, TypeError)):
            s.lock(bad)


def test_shm_pickles_by_name_and_reports_holder(shm_name):
    name = shm_name()
    rw = interlock.ShmRwLock(name)
    rw2 = pickle.loads(pickle.dumps(rw))
    assert isinstance(rw2, interlock.ShmRwLock) and rw2.name == name
    with rw.write():
        assert not is_free(rw2.read)
        assert rw.holder() == os.getpid()
    with pytest.raises(TypeError):
        pickle.dumps(interlock.ShmRwLock())
    with pytest.raises(TypeError):
        pickle.dumps(interlock.ShmMutex())
    os.unlink(rw.path)


def test_lease_token_and_holder(tmp_path):
    lease = interlock.LeaseLock(str(tmp_path / "lease"), ttl=10)
    with lease.lock() as g:
        t1 = g.token
        h = lease.holder()
        assert h["pid"] == os.getpid() and h["token"] == t1
    assert lease.holder() is None
    with lease.lock() as g:
        assert g.token > t1
    assert lease.last_token() == g.token
    # The object's own token: its latest `with lease:` / acquire() hold.
    assert lease.token is None
    with lease:
        t2 = lease.token
        assert t2 is not None and t2 > g.token
    assert lease.token is None
    assert lease.acquire() is True
    assert lease.token > t2
    lease.release()
    assert lease.token is None


def test_holders(path):
    lock = interlock.FileLock(path)
    with lock.write():
        hs = interlock.holders(path)
        assert any(h.pid == os.getpid() and h.mode == "exclusive" for h in hs), hs


def test_close_releases_everything(path):
    lock = interlock.FileLock(path)
    lock.read()
    lock.acquire(shared=True)
    assert lock.locked()
    lock.close()
    assert not lock.locked()
    assert is_free(interlock.FileLock(path).write)
    lock.write().release()  # reopens


def test_shm_rwlock_readers_turn(shm_name):
    name = shm_name()
    assert interlock.ShmRwLock(name).readers_turn == pytest.approx(0.001)
    assert interlock.ShmRwLock(readers_turn=0).readers_turn == 0
    assert interlock.ShmRwLock(name, readers_turn=0.25).readers_turn == pytest.approx(0.25)
    for bad in (-1, float("nan")):
        with pytest.raises(ValueError, match="readers_turn"):
            interlock.ShmRwLock(name, readers_turn=bad)
    with pytest.raises(TypeError):
        interlock.ShmRwLock(name, readers_turn="1ms")
    lock = interlock.ShmRwLock(name, readers_turn=1e300)  # taken as 60 s
    assert lock.readers_turn == 60
    with lock.write(timeout=1):
        pass
    with lock.read(timeout=1):
        pass


def test_file_lock_writer_patience(path):
    assert interlock.FileLock(path).writer_patience == pytest.approx(0.001)
    assert interlock.FileLock(path, writer_patience=0).writer_patience == 0
    assert interlock.FileLock(path, writer_patience=0.25).writer_patience == pytest.approx(0.25)
    for bad in (-1, float("nan")):
        with pytest.raises(ValueError, match="writer_patience"):
            interlock.FileLock(path, writer_patience=bad)
    with pytest.raises(TypeError):
        interlock.FileLock(path, writer_patience="1ms")
    lock = interlock.FileLock(path, writer_patience=1e300)  # never shuts the gate
    with lock.write(timeout=1):
        pass
