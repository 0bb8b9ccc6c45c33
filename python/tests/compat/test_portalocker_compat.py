"""interlock.compat.portalocker: the BoundedSemaphore shape, and
interoperation with the real portalocker on the same slot files (both take
an exclusive flock on each slot file), with a control."""

import threading
import time
import warnings

import pytest
from compat_support import need

import interlock.compat
from interlock.compat import portalocker as compat

WAIT = 20.0

#: A child holding slots of a semaphore through the real portalocker or the
#: compat module: ``take`` (a new instance, no waiting: "held"/"busy"),
#: ``drop`` (releases the latest), ``exit``.
CHILD = """
import sys, warnings
impl, maximum, name, directory = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
if impl == "real":
    import portalocker as pl
else:
    from interlock.compat import portalocker as pl
held = []
print("ready", flush=True)
for line in sys.stdin:
    cmd = line.strip()
    if cmd == "take":
        s = pl.BoundedSemaphore(maximum, name=name, directory=directory, timeout=0)
        try:
            s.acquire()
            held.append(s)
            print("held", flush=True)
        except pl.AlreadyLocked:
            print("busy", flush=True)
    elif cmd == "drop":
        held.pop().release()
        print("dropped", flush=True)
    elif cmd == "exit":
        break
"""


def sem(tmp_path, maximum=2, **kw):
    kw.setdefault("name", "jobs")
    return compat.BoundedSemaphore(maximum, directory=str(tmp_path), **kw)


def test_shape_and_file_names_match_the_original(tmp_path):
    real = need("portalocker")
    mine = sem(tmp_path, 3, timeout=1.5, check_interval=0.1, fail_when_locked=False)
    theirs = real.BoundedSemaphore(3, name="jobs", directory=str(tmp_path))
    assert [str(p) for p in mine.get_filenames()] == [str(p) for p in theirs.get_filenames()]
    assert sorted(map(str, mine.get_random_filenames())) == sorted(
        map(str, theirs.get_filenames())
    )
    assert str(mine.get_filename(1)) == str(theirs.get_filename(1))
    assert (mine.maximum, mine.name, mine.timeout, mine.check_interval) == (3, "jobs", 1.5, 0.1)
    assert mine.fail_when_locked is False and mine.lock is None
    assert issubclass(compat.AlreadyLocked, compat.LockException)
    assert issubclass(compat.LockException, compat.BaseLockException)
    assert compat.exceptions.AlreadyLocked is compat.AlreadyLocked
    with pytest.warns(DeprecationWarning):
        compat.BoundedSemaphore(2, directory=str(tmp_path))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        n = compat.NamedBoundedSemaphore(2, directory=str(tmp_path))
    assert n.name.startswith("bounded_semaphore.")
    with pytest.raises(ValueError):
        compat.BoundedSemaphore(0, name="x")
    with pytest.raises(TypeError):
        compat.BoundedSemaphore("2", name="x")
    with pytest.raises(AttributeError, match="BoundedSemaphore"):
        compat.Lock  # noqa: B018 - not offered


def test_acquire_release_timeout_and_already_locked(tmp_path):
    a, b, c = sem(tmp_path), sem(tmp_path), sem(tmp_path, timeout=0.05)
    slot = a.acquire()
    assert slot is a.lock and slot.held and slot.filename.endswith("jobs.00.lock")
    with pytest.raises(compat.LockException, match="Already locked"):
        a.acquire()
    with b as slot_b:
        assert slot_b.filename.endswith("jobs.01.lock")
        t = time.monotonic()
        with pytest.raises(compat.AlreadyLocked):
            c.acquire()
        assert time.monotonic() - t >= 0.04, "gave up before the timeout"
        assert c.acquire(timeout=0, fail_when_locked=False) is None
        assert c.lock is None
    assert b.lock is None
    assert c.acquire(timeout=0).filename.endswith("jobs.01.lock")
    a.release()
    a.release()  # a no-op when nothing is held
    c.release()
    with pytest.raises(FileNotFoundError):
        compat.BoundedSemaphore(1, name="x", directory=str(tmp_path / "missing")).acquire()


def test_a_waiter_takes_whichever_slot_is_freed(tmp_path):
    holders = [sem(tmp_path), sem(tmp_path)]
    for h in holders:
        h.acquire()
    waiter = sem(tmp_path, timeout=WAIT)
    got = []
    t = threading.Thread(target=lambda: got.append(waiter.acquire()))
    t.start()
    holders[1].release()  # the second slot: a polling-free waiter sees it too
    t.join(WAIT)
    assert got and got[0].filename.endswith("jobs.01.lock")
    waiter.release()
    holders[0].release()
    # No helper thread outlives its acquisition by more than a slice.
    for th in threading.enumerate():
        if th.name == "interlock-portalocker-wait":
            th.join(WAIT)
            assert not th.is_alive()


def interop(spawn, tmp_path, child_impl, child_dir, here_dir):
    """A child (real or compat portalocker) takes both slots; here a compat
    semaphore must be refused, and get the slot the child frees."""
    c = spawn("-c", CHILD, child_impl, 2, "jobs", str(child_dir))
    c.expect("ready")
    for _ in range(2):
        c.send("take")
        c.expect("held")
    here = compat.BoundedSemaphore(2, name="jobs", directory=str(here_dir), timeout=0)
    with pytest.raises(compat.AlreadyLocked):
        here.acquire()
    c.send("drop")
    c.expect("dropped")
    assert here.acquire(timeout=WAIT).held
    c.send("take")
    assert c.line() == "busy", "the child took a slot the compat semaphore holds"
    here.release()
    c.send("take")
    c.expect("held")
    c.send("exit")
    c.finish()


@pytest.mark.parametrize("impl", ["real", "compat"])
def test_excludes_the_real_portalocker_across_processes(spawn, tmp_path, impl):
    if impl == "real":
        need("portalocker")
    interop(spawn, tmp_path, impl, tmp_path, tmp_path)


def test_control_semaphores_on_other_files_fail_the_check(spawn, tmp_path):
    need("portalocker")
    other = tmp_path / "other"
    other.mkdir()
    with pytest.raises((AssertionError, pytest.fail.Exception)):
        interop(spawn, tmp_path, "real", other, tmp_path)


def test_real_portalocker_is_refused_while_compat_holds_every_slot(spawn, tmp_path):
    need("portalocker")
    mine = [sem(tmp_path), sem(tmp_path)]
    for m in mine:
        m.acquire()
    c = spawn("-c", CHILD, "real", 2, "jobs", str(tmp_path))
    c.expect("ready")
    c.send("take")
    assert c.line() == "busy"
    mine[0].release()
    c.send("take")
    c.expect("held")
    c.send("exit")
    c.finish()
    mine[1].release()


def test_install_makes_import_portalocker_the_compat_module():
    try:
        mod = interlock.compat.install("portalocker")
        import portalocker

        assert portalocker is mod is compat
        import portalocker.exceptions

        assert portalocker.exceptions.AlreadyLocked is compat.AlreadyLocked
    finally:
        interlock.compat.uninstall("portalocker")
    assert need("portalocker") is not compat  # the original again
