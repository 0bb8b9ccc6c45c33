"""Guard.remove_and_release(): a FileLock write guard deletes its lock file
as its last act before unlocking (the core's remove_and_unlock).

Across processes: the file is gone after the release, a waiter that had
the old file open gets the lock on a fresh file at the path, and newcomers
are excluded by it; workers that delete on every release never overlap,
while the control (deleting in the middle of the section) does.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from childio import read_line

import interlock

WAIT = 20.0  # seconds: a bound that only catches a hang


@pytest.mark.parametrize("flavor", ["flock", "fcntl"])
def test_the_next_holder_gets_a_fresh_file(child, tmp_path, flavor):
    path = str(tmp_path / "lock")
    fl = interlock.FileLock(path, flavor=flavor)
    g = fl.write()
    old = os.stat(path).st_ino
    waiter = child(f"interlock.FileLock({path!r}, flavor={flavor!r})", "lock.write(**kw)")
    waiter.send("acquire")  # it opened the old file and waits for it
    g.remove_and_release()
    assert waiter.read() == "held"
    assert not g.held
    with pytest.raises(RuntimeError):
        g.release()
    # The waiter holds a new file at the path (the old one is still open
    # here, so its inode number cannot be reused).
    assert os.stat(path).st_ino != old
    with pytest.raises(interlock.WouldBlock):
        interlock.FileLock(path, flavor=flavor).write(blocking=False)
    with pytest.raises(interlock.WouldBlock):
        fl.write(blocking=False)  # the old handle follows the path too
    assert waiter.ask("release") == "released"
    fl.write(blocking=False).release()


def test_only_an_exclusive_file_guard_removes(tmp_path):
    path = str(tmp_path / "lock")
    fl = interlock.FileLock(path)
    r = fl.read()
    with pytest.raises(ValueError):
        r.remove_and_release()
    assert r.held and os.path.exists(path)
    r.release()
    with pytest.raises(RuntimeError):
        r.remove_and_release()
    re = interlock.FileLock(path, reentrant=True)
    a = re.write()
    b = re.write()
    with pytest.raises(ValueError):
        a.remove_and_release()  # counted twice: b still relies on it
    b.release()
    a.remove_and_release()
    assert not os.path.exists(path)


WORKER = r"""
import os, sys, time, interlock
path, marker, rounds, how = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
fl = interlock.FileLock(path, flavor="flock")
print("ready", flush=True); sys.stdin.readline()
bad = 0
for _ in range(rounds):
    g = fl.write()
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        bad += 1
        fd = None
    if how == "safe":
        if fd is not None:
            os.close(fd); os.unlink(marker)
        g.remove_and_release()
    else:
        # The control: the file deleted in the middle of the section.
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        time.sleep(0.0005)
        if fd is not None:
            os.close(fd); os.unlink(marker)
        g.release()
print(bad, flush=True)
"""


def clashes(tmp_path, how, rounds):
    path, marker = str(tmp_path / "lock"), str(tmp_path / "marker")
    kids = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, path, marker, str(rounds), how],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    try:
        for k in kids:
            assert (read_line(k.stdout, WAIT) or "").strip() == "ready"
        for k in kids:
            k.stdin.write("go\n")
            k.stdin.flush()
        return sum(int(k.communicate(timeout=WAIT)[0]) for k in kids)
    finally:
        for k in kids:
            if k.poll() is None:
                k.kill()
            k.wait(WAIT)


def test_removing_on_every_release_never_lets_two_holders_in(tmp_path):
    assert clashes(tmp_path, "safe", 300) == 0


def test_control_removing_mid_section_lets_two_holders_in(tmp_path):
    assert clashes(tmp_path, "mid-section", 300) > 0
