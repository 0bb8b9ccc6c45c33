"""asyncio: a cancel that lands just after the helper thread was granted the
lock, before the loop has handed it to the task, leaves nothing held.

test_process.py cancels before the task runs, while it waits, around the
release and inside the block; there the moment of the grant is a race. Here
the loop itself is held still (a blocking wait on the loop's thread) until
the helper shows as the holder, so the cancel is certain to fall between the
grant and its delivery."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

import interlock
from interlock import WouldBlock

WAIT = 20.0


def taken_by_someone(lock) -> bool:
    """Whether another thread finds the lock taken (it tries at once)."""
    out: list = []

    def probe():
        try:
            lock.write(blocking=False).release()
            out.append(False)
        except WouldBlock:
            out.append(True)

    t = threading.Thread(target=probe)
    t.start()
    t.join(WAIT)
    return out[0]


def waiters_done() -> None:
    """Until none of the core's waiter threads is inside an acquisition (or
    releasing a cancelled one's grant): a bounded poll of its counter, since
    a thread's return has no handshake."""
    end = time.monotonic() + WAIT
    while interlock._native._busy_waiters():
        assert time.monotonic() < end, "a waiter thread never returned"
        time.sleep(0.001)


@pytest.mark.parametrize("family", ["file", "shm"])
def test_cancel_between_grant_and_delivery_leaves_nothing_held(tmp_path, family):
    if family == "file":
        path = str(tmp_path / "x.lock")

        def make():
            return interlock.FileLock(path)
    else:
        path = str(tmp_path / "x.shm")

        def make():
            return interlock.ShmRwLock(path)

    probe = make()

    async def main():
        lock, holder = make(), make()
        h = await asyncio.to_thread(holder.write)

        async def user():
            async with lock.write_async(timeout=WAIT):
                await asyncio.sleep(WAIT)

        task = asyncio.ensure_future(user())
        await asyncio.sleep(0.05)  # the task is waiting on its helper thread
        # From here until the cancel the loop is held still (no await): the
        # helper is granted the lock and queues its delivery, which has not
        # run when the cancel comes.
        h.release()
        deadline = time.monotonic() + WAIT
        while not taken_by_someone(probe):
            assert time.monotonic() < deadline, "the helper never took the lock"
            time.sleep(0.001)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    waiters_done()
    assert not taken_by_someone(probe)


# ----- across processes, every family ---------------------------------------

from interlock import _aio  # noqa: E402 - the second half's hook

FAMILIES = [
    # name, lock expression ({P}: a path, {S}: a shm name), async acquisition,
    # the holder's take, a try that takes it without waiting
    ("FileLock", "interlock.FileLock({P})", "write_async", "lock.write(**kw)", "write"),
    ("LockSet", "interlock.LockSet({P})", None, "lock.locked(range(0, 4), **kw)", None),
    ("ShmRwLock", "interlock.ShmRwLock({S})", "read_async", "lock.write(**kw)", "write"),
    ("ShmMutex", "interlock.ShmMutex({S})", "lock_async", "lock.lock(**kw)", "lock"),
    ("LeaseLock", "interlock.LeaseLock({P}, ttl=30)", "lock_async", "lock.lock(**kw)", "lock"),
    ("Semaphore", "interlock.Semaphore({S}, 1)", "acquire_async", "lock.acquire(**kw)", "_take"),
    (
        "FileSemaphore",
        "interlock.FileSemaphore({P}, 1)",
        "acquire_async",
        "lock.acquire(**kw)",
        "_take",
    ),
]


def _family(name, tmp_path, shm_name):
    _, expr, aname, hold, tname = next(f for f in FAMILIES if f[0] == name)
    expr = expr.format(P=repr(str(tmp_path / "x.lock")), S=repr(shm_name("pyaio-granted-")))

    def make():
        return eval(expr)

    if name == "LockSet":

        def acquire_async(lock):
            return lock.locked_async(range(2, 6), timeout=WAIT)

        def take_now(lock):
            return lock.locked(range(2, 6), blocking=False)
    else:

        def acquire_async(lock):
            return getattr(lock, aname)(timeout=WAIT)

        def take_now(lock):
            return getattr(lock, tname)(blocking=False)

    return expr, hold, make, acquire_async, take_now


def _taken(probe, take_now) -> bool:
    """Whether another thread finds the lock taken (it tries at once)."""
    out: list = []

    def run():
        try:
            take_now(probe).release()
            out.append(False)
        except WouldBlock:
            out.append(True)

    t = threading.Thread(target=run)
    t.start()
    t.join(WAIT)
    return out[0]


@pytest.mark.parametrize("when", ["before-delivery", "with-delivery"])
@pytest.mark.parametrize("name", [f[0] for f in FAMILIES])
def test_cancel_in_the_iteration_of_the_grant_releases_it(
    tmp_path, shm_name, child, monkeypatch, name, when
):
    """A child process holds the lock; a task waits for it. The child
    releases while the loop is held still, the task's waiter is granted the
    lock, and the task is cancelled before it resumes: ``before-delivery``
    from the loop's thread before the loop has seen the waker (the grant
    waits, unseen, in the core's future), ``with-delivery`` in the very
    callback that delivers the wake-up (the task is scheduled to resume with
    the grant). Either way the lock must be free after, and the child can
    take it again."""
    expr, hold, make, acquire_async, take_now = _family(name, tmp_path, shm_name)
    c = child(expr, hold)
    assert c.ask("acquire") == "held"
    probe = make()
    cancel_on_wake: list = []

    if when == "with-delivery":

        async def readable(fd: int) -> None:
            loop = asyncio.get_running_loop()
            fut = loop.create_future()

            def ready() -> None:
                loop.remove_reader(fd)
                if not fut.done():
                    fut.set_result(None)
                for t in cancel_on_wake:
                    t.cancel()  # the same callback, the same iteration

            loop.add_reader(fd, ready)
            try:
                await fut
            finally:
                loop.remove_reader(fd)

        monkeypatch.setattr(_aio, "_readable", readable)

    async def main():
        lock = make()

        async def user():
            async with acquire_async(lock):
                await asyncio.sleep(WAIT)

        task = asyncio.ensure_future(user())
        for _ in range(3):
            await asyncio.sleep(0)  # the task starts its wait
        assert not task.done()
        if when == "with-delivery":
            cancel_on_wake.append(task)
            assert c.ask("release") == "released"
        else:
            # From here until the cancel the loop is held still (no await).
            assert c.ask("release") == "released"
            deadline = time.monotonic() + WAIT
            while not _taken(probe, take_now):
                assert time.monotonic() < deadline, "the waiter never took the lock"
                time.sleep(0.001)
            task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, WAIT)

    asyncio.run(main())
    # A grant that raced the cancel may be released by the waiter thread
    # (not the canceller) as its acquisition returns: once no waiter is
    # busy, the lock must be free at once.
    waiters_done()
    assert not _taken(probe, take_now), "a cancelled acquisition left the lock held"
    assert c.ask("try") == "held"
