"""Exclusion across processes, for every family, with a control that shows
the check catches a lock that does not exclude."""

from __future__ import annotations

import os

import pytest

import interlock
from interlock import WouldBlock

WAIT = 20.0


def families(tmp, shm_name):
    """(name, expression building the lock in a child, how to take it
    exclusively there, the same lock here, how to take it here)."""
    f = os.path.join(tmp, "f.lock")
    shm = shm_name()
    lease = os.path.join(tmp, "lease")
    s = os.path.join(tmp, "set.lock")
    return [
        (
            "fcntl",
            f"interlock.FileLock({f!r})",
            "lock.write(**kw)",
            lambda: interlock.FileLock(f),
            lambda lk, **kw: lk.write(**kw),
        ),
        (
            "flock",
            f"interlock.FileLock({f!r}, flavor='flock')",
            "lock.write(**kw)",
            lambda: interlock.FileLock(f, flavor="flock"),
            lambda lk, **kw: lk.write(**kw),
        ),
        (
            "shm-rw",
            f"interlock.ShmRwLock({shm!r})",
            "lock.write(**kw)",
            lambda: interlock.ShmRwLock(shm),
            lambda lk, **kw: lk.read(**kw),
        ),
        (
            "shm-mutex",
            f"interlock.ShmMutex({shm + 'm'!r})",
            "lock.lock(**kw)",
            lambda: interlock.ShmMutex(shm + "m"),
            lambda lk, **kw: lk.lock(**kw),
        ),
        (
            "lease",
            f"interlock.LeaseLock({lease!r}, ttl=30)",
            "lock.lock(**kw)",
            lambda: interlock.LeaseLock(lease, ttl=30),
            lambda lk, **kw: lk.lock(**kw),
        ),
        (
            "lockset",
            f"interlock.LockSet({s!r})",
            "lock.locked(range(3, 7), **kw)",
            lambda: interlock.LockSet(s),
            lambda lk, **kw: lk.locked(5, shared=True, **kw),
        ),
    ]


def check_excludes(child, make_child, take_child, make_here, take_here):
    """The child holds the lock: a try here must be refused, a wait must end
    when the child releases."""
    c = child(make_child, take_child)
    assert c.ask("acquire") == "held"
    here = make_here()
    with pytest.raises(WouldBlock):
        take_here(here, blocking=False)
    # A waiting acquisition gets it once the child lets go.
    c.send("release")
    g = take_here(here, timeout=WAIT)
    assert g.held
    assert c.read() == "released"
    assert c.ask("try") == "busy", "the child got the lock while we held it"
    g.release()
    assert c.ask("try") == "held"


@pytest.mark.parametrize("i", range(6), ids=[n for n, *_ in families("/x", str)])
def test_processes_exclude_each_other(child, tmp_path, i, shm_name):
    name, make_child, take_child, make_here, take_here = families(str(tmp_path), shm_name)[i]
    check_excludes(child, make_child, take_child, make_here, take_here)


def test_control_a_lock_that_does_not_exclude_fails_the_check(child, tmp_path):
    """Control: the child locks another file (a lock that excludes nobody):
    the check must fail."""
    other = os.path.join(tmp_path, "other.lock")
    mine = os.path.join(tmp_path, "mine.lock")
    with pytest.raises((AssertionError, pytest.fail.Exception)):
        check_excludes(
            child,
            f"interlock.FileLock({other!r})",
            "lock.write(**kw)",
            lambda: interlock.FileLock(mine),
            lambda lk, **kw: lk.write(**kw),
        )


def test_shm_writer_excludes_readers_of_a_child(child, shm_name):
    name = shm_name()
    c = child(f"interlock.ShmRwLock({name!r})", "lock.read(**kw)")
    rw = interlock.ShmRwLock(name)
    with rw.write():
        assert c.ask("try") == "busy"
    assert c.ask("try") == "held"
    with pytest.raises(WouldBlock):
        rw.write(blocking=False)
    r = rw.read(blocking=False)  # readers share
    r.release()
