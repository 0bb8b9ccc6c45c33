"""interlock.Semaphore (shared memory) and interlock.FileSemaphore: counts,
typed errors, threads, processes (never more than N inside, with a control),
a SIGKILLed holder's permits, fork, pickling, asyncio cancellation."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import pickle
import signal
import subprocess
import sys
import threading
import time

import pytest
from childio import read_line

import interlock
from interlock import Timeout, WouldBlock

WAIT = 20.0


@pytest.fixture(params=["shm", "file"])
def make(request, tmp_path, shm_name):
    """``make(permits)`` opens one semaphore (every call the same one)."""
    name = shm_name("pysem-test-")
    path = str(tmp_path / "sem")
    made = []

    def open_(permits: int = 2):
        s = (
            interlock.Semaphore(name, permits)
            if request.param == "shm"
            else interlock.FileSemaphore(path, permits)
        )
        made.append(s)
        return s

    open_.kind = request.param
    yield open_
    if request.param == "shm" and made:
        try:
            os.unlink(made[0].path)
        except FileNotFoundError:
            pass


def test_counts_try_timeout_and_release(make):
    s = make(2)
    assert s.permits == 2 and s.available == 2
    a = s.acquire()
    b = s.acquire(blocking=False)
    assert a.held and b.held and a.mode == "permits"
    assert s.available == 0
    with pytest.raises(WouldBlock) as e:
        s.acquire(blocking=False)
    assert s.path in str(e.value)
    t = time.monotonic()
    with pytest.raises(Timeout):
        s.acquire(timeout=0.05)
    assert time.monotonic() - t >= 0.04
    a.release()
    assert s.available == 1
    with pytest.raises(RuntimeError):
        a.release()
    b.release()
    assert s.available == 2


def test_many_all_or_none_and_the_release_method(make):
    s = make(3)
    g = s.acquire(2)
    assert s.available == 1
    with pytest.raises(WouldBlock):
        s.acquire_many(2, blocking=False)
    assert s.available == 1, "a refused acquire_many kept some permits"
    g.release()
    s.acquire_many(3)
    assert s.available == 0
    s.release()  # the latest acquire()
    assert s.available == 3
    with pytest.raises(RuntimeError):
        s.release()


def test_with_and_guard_context(make):
    s = make(2)
    with s:
        assert s.available == 1
        with s.acquire(1):
            assert s.available == 0
        assert s.available == 1
    assert s.available == 2


def test_bad_inputs(make, tmp_path, shm_name):
    s = make(2)
    for n in (0, -1, 3):
        with pytest.raises(ValueError):
            s.acquire(n)
    with pytest.raises(ValueError):
        s.acquire(blocking=False, timeout=1)
    with pytest.raises(ValueError):
        s.acquire(timeout=-1)
    with pytest.raises(TypeError):
        s.acquire("two")
    with pytest.raises(ValueError, match="permits"):
        make(3)  # the same semaphore with another count
    for bad in (0, -2, 2**40):
        with pytest.raises(ValueError):
            interlock.Semaphore(shm_name("pysem-test-"), bad)
        with pytest.raises(ValueError):
            interlock.FileSemaphore(str(tmp_path / "bad"), bad)
    with pytest.raises(ValueError):
        interlock.Semaphore(shm_name("pysem-test-"), 100_000)
    with pytest.raises(ValueError):
        interlock.FileSemaphore(str(tmp_path / "bad"), 100_000)
    with pytest.raises(ValueError):
        interlock.FileSemaphore("", 2)
    with pytest.raises(IsADirectoryError):
        interlock.FileSemaphore(str(tmp_path), 2)
    with pytest.raises(FileNotFoundError):
        interlock.FileSemaphore(str(tmp_path / "no" / "such"), 2)


def test_another_thread_releases_and_wakes_a_waiter(make):
    s = make(1)
    g = s.acquire()
    got = []

    def waiter():
        got.append(s.acquire(timeout=WAIT))

    t = threading.Thread(target=waiter)
    t.start()
    r = threading.Thread(target=g.release)
    r.start()
    r.join(WAIT)
    t.join(WAIT)
    assert got and got[0].held and not g.held
    got[0].release()
    assert s.available == 1


# --------------------------------------------------------------- processes


def _inside(make_args, n_check, inside, peak, rounds, go):
    kind, where, permits = make_args
    s = (
        interlock.Semaphore(where, permits)
        if kind == "shm"
        else interlock.FileSemaphore(where, permits)
    )
    go.wait(WAIT)
    for _ in range(rounds):
        with s:
            with inside.get_lock():
                inside.value += 1
                now = inside.value
                peak.value = max(peak.value, now)
            # Stay inside until one more than N are in, or 0.1 s passed:
            # a semaphore that lets N + 1 in is caught at once.
            end = time.monotonic() + 0.1
            while time.monotonic() < end and inside.value <= n_check:
                time.sleep(0.001)
            with inside.get_lock():
                inside.value -= 1


def occupancy(kind, where, permits, n_check, procs=4, rounds=3):
    """The most processes seen inside at once."""
    ctx = multiprocessing.get_context("fork")
    inside, peak, go = ctx.Value("i", 0), ctx.Value("i", 0), ctx.Event()
    ps = [
        ctx.Process(
            target=_inside, args=((kind, where, permits), n_check, inside, peak, rounds, go)
        )
        for _ in range(procs)
    ]
    for p in ps:
        p.start()
    go.set()
    try:
        for p in ps:
            p.join(WAIT)
            assert p.exitcode == 0
    finally:
        for p in ps:
            if p.is_alive():
                p.kill()
                p.join(WAIT)
    return peak.value


@pytest.mark.parametrize("kind", ["shm", "file"])
def test_processes_never_more_than_n_inside(tmp_path, kind, shm_name):
    where = shm_name("pysem-test-") if kind == "shm" else str(tmp_path / "sem")
    peak = occupancy(kind, where, 2, 2)
    assert peak == 2, f"{peak} processes inside a semaphore of 2 permits"
    if kind == "shm":
        os.unlink(interlock.Semaphore(where, 2).path)


@pytest.mark.parametrize("kind", ["shm", "file"])
def test_control_a_semaphore_of_too_many_permits_fails_the_check(tmp_path, kind, shm_name):
    """Control: 3 permits checked as 2: the check must see 3 inside."""
    where = shm_name("pysem-test-") if kind == "shm" else str(tmp_path / "sem")
    assert occupancy(kind, where, 3, 2) == 3
    if kind == "shm":
        os.unlink(interlock.Semaphore(where, 3).path)


def readline(p):
    """The child's next line, or a failure after WAIT seconds."""
    line = read_line(p.stdout, WAIT)
    assert line is not None, f"the child said nothing within {WAIT} s"
    return line.strip()


DIE = """
import os, signal, sys, interlock
kind, where = sys.argv[1], sys.argv[2]
s = interlock.Semaphore(where, 2) if kind == "shm" else interlock.FileSemaphore(where, 2)
g = s.acquire(2)
print("held", flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def _die_holding(kind, where):
    p = subprocess.Popen(
        [sys.executable, "-c", DIE, kind, where], stdout=subprocess.PIPE, text=True
    )
    try:
        assert readline(p) == "held"
        assert p.wait(WAIT) == -signal.SIGKILL
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(WAIT)
        p.stdout.close()
    return p.pid


@pytest.mark.parametrize("kind", ["shm", "file"])
def test_a_sigkilled_holders_permits_return_to_a_waiter(tmp_path, kind, shm_name):
    where = shm_name("pysem-test-") if kind == "shm" else str(tmp_path / "sem")
    s = interlock.Semaphore(where, 2) if kind == "shm" else interlock.FileSemaphore(where, 2)
    _die_holding(kind, where)
    g = s.acquire(2, timeout=WAIT)
    assert g.held
    g.release()
    assert s.available == 2
    if kind == "shm":
        os.unlink(s.path)


def test_a_dead_holder_is_visible_then_reclaimed(shm_name):
    name = shm_name("pysem-test-")
    s = interlock.Semaphore(name, 2)
    pid = _die_holding("shm", name)
    assert s.holders() == [pid, pid]
    assert s.available == 0
    assert s.reclaim_dead() == 2
    assert s.holders() == [] and s.available == 2
    os.unlink(s.path)


# -------------------------------------------------------------------- fork


def _wait_child(pid):
    end = time.monotonic() + WAIT
    while time.monotonic() < end:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    raise AssertionError("the forked child did not finish")


@pytest.mark.parametrize("kind", ["anonymous", "file"])
def test_fork_child_takes_its_own_permits_and_never_releases_the_parents(tmp_path, kind):
    s = (
        interlock.Semaphore(None, 2)
        if kind == "anonymous"
        else interlock.FileSemaphore(str(tmp_path / "sem"), 2)
    )
    g = s.acquire()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            g.release()  # inherited: releases nothing of the parent's
            assert not g.held
            mine = s.acquire(blocking=False)
            try:
                s.acquire(blocking=False)
                code = 2  # a third permit of two
            except WouldBlock:
                code = 0
            mine.release()
        finally:
            os._exit(code)
    assert _wait_child(pid) == 0
    assert g.held and s.available == 1
    g.release()
    assert s.available == 2


def _spawned(s, q):
    try:
        s.acquire(blocking=False)
        q.put("got one while the parent held both")
    except WouldBlock:
        q.put("busy")


def test_pickles_by_name_for_multiprocessing(shm_name):
    name = shm_name("pysem-test-")
    s = interlock.Semaphore(name, 2)
    again = pickle.loads(pickle.dumps(s))
    assert isinstance(again, interlock.Semaphore)
    assert again.path == s.path and again.permits == 2
    with pytest.raises(TypeError):
        pickle.dumps(interlock.Semaphore(None, 2))
    g = s.acquire(2)
    ctx = multiprocessing.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_spawned, args=(s, q))
    p.start()
    try:
        assert q.get(timeout=WAIT * 2) == "busy"
        p.join(WAIT)
        assert p.exitcode == 0
    finally:
        if p.is_alive():
            p.kill()
            p.join(WAIT)
    g.release()
    os.unlink(s.path)


# ----------------------------------------------------------------- asyncio


def _helpers_done():
    for t in threading.enumerate():
        if t.name == "interlock-async-wait":
            t.join(WAIT)
            assert not t.is_alive()


def test_async_with_waits_without_blocking_the_loop(make):
    s = make(1)

    async def main():
        holder = await asyncio.to_thread(s.acquire)
        ticks = 0
        entered = asyncio.Event()

        async def user():
            async with s:
                entered.set()
            async with s.acquire_async(timeout=WAIT) as g:
                assert g.held

        task = asyncio.ensure_future(user())
        for _ in range(5):
            await asyncio.sleep(0.01)
            ticks += 1
        assert not entered.is_set() and ticks == 5
        await asyncio.to_thread(holder.release)
        await asyncio.wait_for(task, WAIT)

    asyncio.run(main())
    assert s.available == 1


@pytest.mark.parametrize("point", range(5))
def test_async_cancel_at_every_point_leaves_no_permit_held(make, point):
    """Cancel (0) before the task runs, (1) while it waits, (2) as the
    holder releases, (3) just after, (4) inside the async with."""
    s = make(2)

    async def main():
        inside = asyncio.Event()
        h = await asyncio.to_thread(s.acquire, 2)

        async def user():
            async with s:
                inside.set()
                await asyncio.sleep(WAIT)

        task = asyncio.ensure_future(user())
        if point == 0:
            task.cancel()
        else:
            await asyncio.sleep(0.05)
            if point >= 2:
                await asyncio.to_thread(h.release)
            if point == 3:
                await asyncio.sleep(0)
            if point == 4:
                await asyncio.wait_for(inside.wait(), WAIT)
            task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        if h.held:
            await asyncio.to_thread(h.release)
        await asyncio.to_thread(_helpers_done)
        for _ in range(3):
            await asyncio.sleep(0)

    asyncio.run(main())
    assert s.available == 2


def test_decorator_holds_one_permit(make):
    s = make(2)

    @s
    def work():
        return s.available

    assert work() == 1 and s.available == 2

    @s
    async def awork():
        return s.available

    assert asyncio.run(awork()) == 1 and s.available == 2


CTRL_C = """
import signal, sys, interlock
# Background shells start Python with SIGINT ignored: put the handler back.
signal.signal(signal.SIGINT, signal.default_int_handler)
kind, where = sys.argv[1], sys.argv[2]
s = interlock.Semaphore(where, 2) if kind == "shm" else interlock.FileSemaphore(where, 2)
print("waiting", flush=True)
try:
    s.acquire(2)
    print("took them", flush=True)
except KeyboardInterrupt:
    print("interrupted", flush=True)
sys.stdin.readline()
"""


@pytest.mark.parametrize("kind", ["shm", "file"])
def test_ctrl_c_interrupts_a_blocked_acquire_holding_nothing(tmp_path, kind, shm_name):
    where = shm_name("pysem-test-") if kind == "shm" else str(tmp_path / "sem")
    s = interlock.Semaphore(where, 2) if kind == "shm" else interlock.FileSemaphore(where, 2)
    g = s.acquire()  # one of two: the child's acquire(2) must wait
    p = subprocess.Popen(
        [sys.executable, "-c", CTRL_C, kind, where],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert readline(p) == "waiting"
        time.sleep(0.12)  # let it block (a signal before the wait is fine too)
        p.send_signal(signal.SIGINT)
        assert readline(p) == "interrupted"
        assert s.available == 1, "the interrupted acquire kept a permit"
        g.release()
        s.acquire(2, timeout=WAIT).release()
        p.stdin.write("\n")
        p.stdin.flush()
        assert p.wait(WAIT) == 0
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(WAIT)
        p.stdin.close()
        p.stdout.close()
    if kind == "shm":
        os.unlink(s.path)
