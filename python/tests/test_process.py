"""Ctrl-C, fork, multiprocessing, a dead writer, asyncio cancellation."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest
from childio import read_line

import interlock
from interlock import OwnerDied, WouldBlock

WAIT = 20.0


def free_now(take):
    """Whether another thread can take the lock at once."""
    out = []

    def probe():
        try:
            take(blocking=False).release()
            out.append(True)
        except WouldBlock:
            out.append(False)

    t = threading.Thread(target=probe)
    t.start()
    t.join(WAIT)
    return out[0]


def spawn(code: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )


def readline(p: subprocess.Popen, timeout: float = WAIT) -> str:
    line = read_line(p.stdout, timeout)
    assert line is not None, "child gave no answer in time"
    return line.strip()


@pytest.fixture
def procs():
    made: list[subprocess.Popen] = []
    yield made
    for p in made:
        if p.poll() is None:
            p.kill()
        p.wait(WAIT)
        for f in (p.stdin, p.stdout):
            if f:
                f.close()


CTRL_C = """
import os, signal, sys, time, interlock
# A shell runs background jobs with SIGINT ignored, and Python then installs
# no KeyboardInterrupt handler: put back the one an interactive program has.
signal.signal(signal.SIGINT, signal.default_int_handler)
kind, path = sys.argv[1], sys.argv[2]
lock = {
    "file": lambda: interlock.FileLock(path),
    "flock": lambda: interlock.FileLock(path, flavor="flock"),
    "shm": lambda: interlock.ShmRwLock(path),
    "mutex": lambda: interlock.ShmMutex(path),
    "set": lambda: interlock.LockSet(path),
    "lease": lambda: interlock.LeaseLock(path, ttl=30),
}[kind]()
take = {
    "file": lambda: lock.write(), "flock": lambda: lock.write(), "shm": lambda: lock.write(),
    "mutex": lambda: lock.lock(), "set": lambda: lock.locked(range(0, 4)),
    "lease": lambda: lock.lock(),
}[kind]
print("waiting", flush=True)
try:
    take()
    print("took it", flush=True)
except KeyboardInterrupt:
    held = bool(lock.held()) if kind == "set" else lock.locked()
    print("interrupted", held, flush=True)
sys.stdin.readline()
"""


@pytest.mark.parametrize("kind", ["file", "flock", "shm", "mutex", "set", "lease"])
def test_ctrl_c_interrupts_a_blocked_acquire(procs, tmp_path, kind, shm_name):
    if kind in ("shm", "mutex"):
        path = shm_name()
    elif kind == "lease":
        path = str(tmp_path / "lease")
    else:
        path = str(tmp_path / "x.lock")
    here = {
        "file": lambda: interlock.FileLock(path).write(),
        "flock": lambda: interlock.FileLock(path, flavor="flock").write(),
        "shm": lambda: interlock.ShmRwLock(path).write(),
        "mutex": lambda: interlock.ShmMutex(path).lock(),
        "set": lambda: interlock.LockSet(path).locked(range(2, 3)),
        "lease": lambda: interlock.LeaseLock(path, ttl=30).lock(),
    }
    g = here[kind]()
    p = spawn(CTRL_C, kind, path)
    procs.append(p)
    assert readline(p) == "waiting"
    time.sleep(0.23)  # let it block, mid-slice (a signal before the wait is also fine)
    t0 = time.monotonic()
    p.send_signal(signal.SIGINT)
    line = readline(p)
    elapsed = time.monotonic() - t0
    assert line == "interrupted False", line
    print(f"{kind}: KeyboardInterrupt {elapsed * 1000:.1f} ms after SIGINT")
    # Nothing held by the child: once we let go, a third party gets it.
    g.release()
    again = here[kind]()
    again.release()
    p.stdin.write("\n")
    p.stdin.flush()
    assert p.wait(WAIT) == 0
    if kind in ("shm", "mutex"):
        os.unlink("/dev/shm/interlock-" + path)


def wait_child(pid: int) -> int:
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    raise AssertionError("forked child hung")


def fork_check(lock, guard, take_in_child, probe):
    """Forks while `guard` is held: the child drops and releases its copy,
    must find the lock still held (by the parent), and exits; the parent
    must still hold it."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            assert not guard.held
            guard.release()  # releases nothing of the parent's
            del guard
            try:
                take_in_child(lock)
                code = 2  # it got the parent's lock
            except WouldBlock:
                code = 0
        finally:
            os._exit(code)
    assert wait_child(pid) == 0
    assert guard.held
    assert not free_now(probe)
    guard.release()
    assert free_now(probe)


@pytest.mark.parametrize("flavor", ["fcntl", "flock"])
def test_fork_child_never_releases_the_parents_file_lock(tmp_path, flavor):
    path = str(tmp_path / "x.lock")
    lock = interlock.FileLock(path, flavor=flavor)
    probe = interlock.FileLock(path, flavor=flavor)
    fork_check(lock, lock.write(), lambda lk: lk.write(blocking=False), probe.read)
    # The child's inherited acquire() hold, and closing the object there.
    lock.acquire()
    pid = os.fork()
    if pid == 0:
        try:
            lock.close()
            code = 0 if not lock.locked() else 1
        finally:
            os._exit(code)
    assert wait_child(pid) == 0
    assert not free_now(probe.read)
    lock.release()


def test_fork_child_never_releases_the_parents_other_locks(tmp_path):
    rw = interlock.ShmRwLock()
    fork_check(rw, rw.write(), lambda lk: lk.read(blocking=False), rw.read)
    m = interlock.ShmMutex()
    fork_check(m, m.lock(), lambda lk: lk.lock(blocking=False), m.lock)
    s = interlock.LockSet(str(tmp_path / "s"))
    s2 = interlock.LockSet(str(tmp_path / "s"))
    fork_check(
        s,
        s.locked(range(0, 8)),
        lambda lk: lk.locked(3, blocking=False),
        lambda **kw: s2.locked(4, **kw),
    )
    lease = interlock.LeaseLock(str(tmp_path / "lease"), ttl=30)
    other = interlock.LeaseLock(str(tmp_path / "lease"), ttl=30)
    fork_check(lease, lease.lock(), lambda lk: lk.lock(blocking=False), other.lock)


def _mp_child(rw, q, go):
    try:
        rw.write(blocking=False)
        q.put("got it while the parent held it")
    except WouldBlock:
        q.put("busy")
    go.wait(WAIT)
    g = rw.write(timeout=WAIT)
    q.put("got")
    g.release()


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_multiprocessing_children_share_shm_locks(method, shm_name):
    ctx = multiprocessing.get_context(method)
    rw = interlock.ShmRwLock() if method == "fork" else interlock.ShmRwLock(shm_name())
    q, go = ctx.Queue(), ctx.Event()
    g = rw.write()
    p = ctx.Process(target=_mp_child, args=(rw, q, go))
    p.start()
    try:
        assert q.get(timeout=WAIT) == "busy"
        g.release()
        go.set()
        assert q.get(timeout=WAIT) == "got"
        p.join(WAIT)
        assert p.exitcode == 0
    finally:
        if p.is_alive():
            p.kill()
            p.join(WAIT)
    if rw.name:
        os.unlink(rw.path)


DIE = """
import os, signal, sys, interlock
kind, name = sys.argv[1], sys.argv[2]
lock = interlock.ShmRwLock(name) if kind == "rw" else interlock.ShmMutex(name)
g = lock.write() if kind == "rw" else lock.lock()
print("held", flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.parametrize("kind", ["rw", "mutex"])
def test_a_dead_writer_shows_as_owner_died_with_a_usable_guard(procs, kind, shm_name):
    name = shm_name()
    lock = interlock.ShmRwLock(name) if kind == "rw" else interlock.ShmMutex(name)
    take = lock.write if kind == "rw" else lock.lock
    p = spawn(DIE, kind, name)
    procs.append(p)
    assert readline(p) == "held"
    p.wait(WAIT)
    with pytest.raises(OwnerDied) as e:
        take(timeout=WAIT)
    g = e.value.guard
    assert g.held and g.poisoned and lock.poisoned
    assert name in str(e.value)
    g.clear_poison()
    assert not lock.poisoned
    g.release()
    take(blocking=False).release()
    os.unlink(lock.path)


@pytest.mark.parametrize("point", range(6))
def test_async_cancel_at_every_point_leaves_nothing_held(tmp_path, point):
    """Cancel (0) before the task runs, (1) while it waits, (2) as the
    holder releases, (3) after a short yield past the release, (4) inside
    the async with, (5) on an uncontended acquisition in flight."""
    path = str(tmp_path / "x.lock")
    probe = interlock.FileLock(path)

    async def main():
        lock = interlock.FileLock(path)
        holder = interlock.FileLock(path)
        inside = asyncio.Event()
        h = None if point == 5 else await asyncio.to_thread(holder.write)

        async def user():
            async with lock.write_async(timeout=WAIT):
                inside.set()
                await asyncio.sleep(WAIT)

        task = asyncio.ensure_future(user())
        if point == 0:
            task.cancel()
        elif point == 1:
            await asyncio.sleep(0.05)
            task.cancel()
        elif point == 2:
            await asyncio.sleep(0.05)
            await asyncio.to_thread(h.release)
            task.cancel()
        elif point == 3:
            await asyncio.sleep(0.05)
            await asyncio.to_thread(h.release)
            await asyncio.sleep(0)
            task.cancel()
        elif point == 4:
            await asyncio.sleep(0.05)
            await asyncio.to_thread(h.release)
            await asyncio.wait_for(inside.wait(), WAIT)
            task.cancel()
        else:
            await asyncio.sleep(0)
            task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        if h is not None and h.held:
            await asyncio.to_thread(h.release)

    asyncio.run(main())
    # A grant that raced the cancel is released by the waiter thread as its
    # acquisition returns: once no waiter is busy (a bounded poll of the
    # core's counter), the lock must be free at once.
    end = time.monotonic() + WAIT
    while interlock._native._busy_waiters():
        assert time.monotonic() < end, "a waiter thread never returned"
        time.sleep(0.001)
    assert free_now(probe.write)


def test_async_forms_of_every_family_and_tasks_as_holders(tmp_path):
    async def main():
        rw = interlock.ShmRwLock()
        m = interlock.ShmMutex()
        s = interlock.LockSet(str(tmp_path / "s"))
        lease = interlock.LeaseLock(str(tmp_path / "lease"), ttl=10)
        f = interlock.FileLock(str(tmp_path / "f"))
        async with rw.read_async():
            # The same task asking again would wait for itself: refused.
            with pytest.raises(interlock.AlreadyHeld):
                await rw.read_async()

            async def reader():
                async with rw.read_async():  # another task shares
                    return True

            assert await asyncio.create_task(reader())
        async with m.lock_async() as g:
            assert g.held
            with pytest.raises(interlock.AlreadyHeld):
                await m.lock_async()
        async with s.locked_async(range(0, 3)):
            assert s.held() == [(range(0, 3), "exclusive")]
        async with lease.lock_async() as g:
            assert g.token >= 1
        # Two tasks: the second waits for the first (no AlreadyHeld).
        order = []

        async def one(n):
            async with f.write_async(timeout=WAIT):
                order.append(n)
                await asyncio.sleep(0.02)

        await asyncio.gather(one(1), one(2))
        assert sorted(order) == [1, 2]
        g = await f.read_async()
        g.release()

    asyncio.run(main())
