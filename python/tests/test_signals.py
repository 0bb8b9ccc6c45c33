"""A signal whose handler raises nothing does not end a main-thread wait: the
wait goes on, its deadline kept (Ctrl-C itself: test_process.py)."""

from __future__ import annotations

import os
import signal
import threading
import time

import interlock

WAIT = 20.0


def until_waiting(path: str) -> None:
    deadline = time.monotonic() + WAIT
    while not any(h.waiting for h in interlock.holders(path)):
        assert time.monotonic() < deadline, "the main thread never showed as waiting"
        time.sleep(0.005)


def taken_elsewhere(path: str):
    """A write guard of path taken by another thread (this one would be
    AlreadyHeld)."""
    out: list = []
    t = threading.Thread(target=lambda: out.append(interlock.FileLock(path).write()))
    t.start()
    t.join(WAIT)
    return out[0]


def test_a_quiet_signal_does_not_end_the_wait(tmp_path):
    assert threading.current_thread() is threading.main_thread()
    path = str(tmp_path / "x.lock")
    holder = taken_elsewhere(path)
    seen: list = []
    old = signal.signal(signal.SIGUSR1, lambda *a: seen.append(True))
    try:

        def poke_then_release():
            until_waiting(path)
            os.kill(os.getpid(), signal.SIGUSR1)
            deadline = time.monotonic() + WAIT
            while not seen and time.monotonic() < deadline:
                time.sleep(0.005)
            holder.release()

        t = threading.Thread(target=poke_then_release)
        t.start()
        g = interlock.FileLock(path).write(timeout=WAIT)  # ends with the lock
        t.join(WAIT)
        assert seen == [True]
        g.release()

        # A timed wait keeps its deadline across the signal.
        holder = taken_elsewhere(path)
        seen.clear()
        t = threading.Thread(
            target=lambda: (until_waiting(path), os.kill(os.getpid(), signal.SIGUSR1))
        )
        t.start()
        t0 = time.monotonic()
        try:
            interlock.FileLock(path).write(timeout=0.5)
            raise AssertionError("took a held lock")
        except interlock.Timeout:
            pass
        took = time.monotonic() - t0
        t.join(WAIT)
        assert seen == [True]
        assert 0.45 <= took < WAIT, took
        holder.release()
    finally:
        signal.signal(signal.SIGUSR1, old)
