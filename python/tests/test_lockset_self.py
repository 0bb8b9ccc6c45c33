"""LockSet and AlreadyHeld: a thread that waits, through a second set of the
same file, for indices it locked through a first set is refused at once."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

import interlock
from interlock import AlreadyHeld, Timeout, WouldBlock

WAIT = 20.0


def bounded(fn, *args, **kwargs):
    """Runs fn in a thread; its result or exception, or a failure if it
    hangs (the wait it would do is for the calling thread itself)."""
    out: list = []

    def run():
        try:
            out.append(("ok", fn(*args, **kwargs)))
        except BaseException as e:  # noqa: BLE001 - handed back to the test
            out.append(("err", e))

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(WAIT)
    assert out, "the call hung"
    return out[0]


def test_waiting_through_a_second_set_for_own_indices_is_already_held(tmp_path):
    p = tmp_path / "s.lock"
    a, b = interlock.LockSet(p), interlock.LockSet(p)

    def scenario():
        a.lock(range(0, 4))
        t0 = time.monotonic()
        for call in (
            lambda: b.lock(2),
            lambda: b.lock(range(3, 9), shared=True),
            lambda: b.lock(2, timeout=WAIT),
            lambda: b.locked(range(1, 2)),
        ):
            with pytest.raises(AlreadyHeld, match="another LockSet") as e:
                call()
            assert str(p) in str(e.value)
        took = time.monotonic() - t0
        # A try is answered as before: it would block.
        with pytest.raises(WouldBlock):
            b.lock(2, blocking=False)
        # Indices the first set does not hold are free through the second.
        b.lock(range(4, 6))
        assert b.held() == [(range(4, 6), "exclusive")]
        b.unlock_all()
        # Shared through both: no conflict.
        a.lock(range(0, 4), shared=True)
        b.lock(range(0, 4), shared=True)
        b.unlock_all()
        a.unlock_all()
        # Once the first set let go, the second takes them.
        b.lock(range(0, 4))
        b.unlock_all()
        return took

    kind, took = bounded(scenario)
    assert kind == "ok", took
    assert took < WAIT


def test_other_threads_still_wait_and_unlock_by_anyone_is_seen(tmp_path):
    p = tmp_path / "s.lock"
    a, b = interlock.LockSet(p), interlock.LockSet(p)
    a.lock(0)
    # Another thread is not the holder: it waits (here until its timeout).
    kind, e = bounded(lambda: b.lock(0, timeout=0.2))
    assert kind == "err" and isinstance(e, Timeout), e
    # This thread is refused ...
    with pytest.raises(AlreadyHeld):
        b.lock(0)
    # ... until the first set lets go, by whichever thread.
    assert bounded(a.unlock, 0)[0] == "ok"
    b.lock(0)
    b.unlock_all()
    # A scope that ends gives the indices back, and the record sees it.
    with a.locked(range(0, 2)):
        with pytest.raises(AlreadyHeld):
            b.lock(1)
    b.lock(1)
    b.unlock_all()
    a.close()
    b.close()


def test_the_control_two_sets_without_the_rule_would_wait(tmp_path):
    """Control: the same request from a thread that did not lock the
    indices waits, so the refusal above is the rule, not a conflict check
    that answers every request at once."""
    p = tmp_path / "s.lock"
    a, b = interlock.LockSet(p), interlock.LockSet(p)
    a.lock(0)
    started = threading.Event()
    got: list = []

    def waiter():
        started.set()
        b.lock(0)  # waits until a lets go
        got.append(True)
        b.unlock_all()

    t = threading.Thread(target=waiter, daemon=True)
    t.start()
    started.wait(WAIT)
    time.sleep(0.1)
    assert not got
    a.unlock_all()
    t.join(WAIT)
    assert got == [True]


def test_async_tasks_are_holders_too(tmp_path):
    p = tmp_path / "s.lock"

    async def main():
        a, b = interlock.LockSet(p), interlock.LockSet(p)
        async with a.locked_async(range(0, 2)):
            with pytest.raises(AlreadyHeld):
                await b.locked_async(range(0, 2), timeout=WAIT)

    asyncio.run(asyncio.wait_for(main(), WAIT))
