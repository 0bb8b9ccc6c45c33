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
        for _ in range(3):
            await asyncio.sleep(0)  # deliveries run; a cancelled one releases

    asyncio.run(main())
    assert not taken_by_someone(probe)
