"""asyncio: a cancelled acquisition ends its wait at once, so cancelled
acquisitions pile up no threads and no kernel waits, although the lock stays
held by another process the whole time.

The waiting side runs in a fresh interpreter (a child of the test), so that
its thread count is its own: the baseline is taken before its first
acquisition. For every family, N tasks wait on a lock a third process holds
(each task through a lock object of its own); once N waiter threads exist,
all are cancelled. Then ``threading.active_count()`` must be back to the
baseline at once and ``/proc/self/task`` within a bound (the core keeps at
most 8 idle waiter threads, each for 10 s: docs/design-async.md); the
holders release only after that, and a waiter that was started while the
lock was still held must then get it. The waits for a thread count are
bounded polls of /proc (a thread's exit has no handshake to wait for)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
from childio import read_line

N = 50
WAIT = 20.0
IDLE_WAITERS_KEPT = 8  # the core's pool (crates/interlock/src/aio/mod.rs, KEEP)

WAITER = textwrap.dedent(
    """
    import asyncio, json, os, sys, threading, time
    import interlock

    N, KEPT, WAIT = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
    families = json.loads(sys.argv[4])

    def tasks():
        return len(os.listdir("/proc/self/task"))

    def until(cond, what, bound=WAIT):
        end = time.monotonic() + bound
        while not cond():
            if time.monotonic() > end:
                raise SystemExit(f"timed out: {what} (threads: python "
                                 f"{threading.active_count()}, os {tasks()})")
            time.sleep(0.01)

    def say(*words):
        print(*words, flush=True)

    async def main():
        base_py, base_os = threading.active_count(), tasks()
        say("base", base_py, base_os)
        fresh = []
        for name, make, take in families:
            locks = [eval(make) for _ in range(N)]
            waiters = [asyncio.ensure_future(eval(take, globals(), {"lock": lk})) for lk in locks]
            await asyncio.sleep(0)  # each task starts its wait
            until(lambda: tasks() >= base_os + N, f"{name}: {N} waiter threads")
            for t in waiters:
                t.cancel()
            got = await asyncio.gather(*waiters, return_exceptions=True)
            bad = [g for g in got if not isinstance(g, asyncio.CancelledError)]
            if bad:
                raise SystemExit(f"{name}: a cancelled wait gave {bad[0]!r}")
            if threading.active_count() != base_py:
                raise SystemExit(
                    f"{name}: {threading.active_count() - base_py} Python threads "
                    f"left after {N} cancelled acquisitions")
            until(lambda: tasks() <= base_os + KEPT,
                  f"{name}: the cancelled waiters' threads end (at most {KEPT} idle)")
            say("cancelled", name, tasks() - base_os)
            lock = eval(make)
            fresh.append((name, asyncio.ensure_future(eval(take, globals(), {"lock": lock}))))
        await asyncio.sleep(0)
        say("fresh waiting")
        # The holders release now (the loop is held still meanwhile; the
        # waiters' threads take the locks and wake the loop after).
        if sys.stdin.readline().strip() != "released":
            raise SystemExit("no release from the test")
        for name, t in fresh:
            g = await asyncio.wait_for(t, WAIT)
            g.release()
            say("fresh got", name)
        # Idle waiter threads end after 10 s without work.
        until(lambda: tasks() == base_os, "the thread count back at its baseline",
              bound=WAIT + 10)
        say("threads back", threading.active_count() - base_py, tasks() - base_os)

    asyncio.run(main())
    """
)


def families(tmp_path, shm_name):
    """(name, lock expression, async acquisition, the holder's take)."""
    f = str(tmp_path / "f.lock")
    s = str(tmp_path / "set.lock")
    lease = str(tmp_path / "lease")
    fsem = str(tmp_path / "sem.lock")
    rw, mx, sem = shm_name("pyaio-rw-"), shm_name("pyaio-mx-"), shm_name("pyaio-sem-")
    return [
        ("FileLock", f"interlock.FileLock({f!r})", "lock.write_async()", "lock.write(**kw)"),
        (
            "LockSet",
            f"interlock.LockSet({s!r})",
            "lock.locked_async(range(2, 6))",
            "lock.locked(range(0, 4), **kw)",
        ),
        ("ShmRwLock", f"interlock.ShmRwLock({rw!r})", "lock.read_async()", "lock.write(**kw)"),
        ("ShmMutex", f"interlock.ShmMutex({mx!r})", "lock.lock_async()", "lock.lock(**kw)"),
        (
            "LeaseLock",
            f"interlock.LeaseLock({lease!r}, ttl=30)",
            "lock.lock_async()",
            "lock.lock(**kw)",
        ),
        (
            "Semaphore",
            f"interlock.Semaphore({sem!r}, 1)",
            "lock.acquire_async()",
            "lock.acquire(**kw)",
        ),
        (
            "FileSemaphore",
            f"interlock.FileSemaphore({fsem!r}, 1)",
            "lock.acquire_async()",
            "lock.acquire(**kw)",
        ),
    ]


def test_cancelled_acquisitions_leave_no_threads_and_the_lock_stays_usable(
    tmp_path, shm_name, child
):
    import json

    fams = families(tmp_path, shm_name)
    holders = []
    for _name, make, _take, hold in fams:
        c = child(make, hold)
        assert c.ask("acquire") == "held"
        holders.append(c)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    spec = json.dumps([(name, make, take) for name, make, take, _ in fams])
    p = subprocess.Popen(
        [sys.executable, "-c", WAITER, str(N), str(IDLE_WAITERS_KEPT), str(WAIT), spec],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        lines = []

        def expect(prefix):
            assert p.stdout is not None
            line = (read_line(p.stdout, 3 * WAIT) or "").strip()
            if not line.startswith(prefix):
                p.kill()
                _, err = p.communicate(timeout=WAIT)
                pytest.fail(f"waiter said {line!r} after {lines}, expected {prefix!r}:\n{err}")
            lines.append(line)

        expect("base")
        for name, *_ in fams:
            expect(f"cancelled {name}")
        expect("fresh waiting")
        # All this time the holders held: nothing above was freed by them.
        for c in holders:
            assert c.ask("release") == "released"
        assert p.stdin is not None
        p.stdin.write("released\n")
        p.stdin.flush()
        for name, *_ in fams:
            expect(f"fresh got {name}")
        expect("threads back 0 0")
        assert p.wait(WAIT) == 0
    finally:
        if p.poll() is None:
            p.kill()
        p.wait(WAIT)
