"""Helpers for the multi-process tests.

A child is the Python interpreter re-run (``sys.executable``) on a small
driver: it builds a lock from an expression, then obeys one command per line
on stdin (``acquire``, ``release``, ``exit``) and answers one line on stdout.
Every wait for an answer is bounded, and children are killed at teardown.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Callable, Iterator

import pytest
from childio import read_line

WAIT = 20.0  # seconds: a bound that only catches a hang


@pytest.fixture
def shm_name() -> Iterator[Callable[..., str]]:
    """``shm_name(prefix)`` gives a fresh bare shared-memory lock name. Its
    file in /dev/shm, and that of the name with any suffix a test appends,
    is removed after the test, passed or failed: the suite leaves nothing
    in /dev/shm."""
    names: list[str] = []

    def make(prefix: str = "pycore-test-") -> str:
        names.append(prefix + uuid.uuid4().hex)
        return names[-1]

    yield make
    for name in names:
        for entry in os.listdir("/dev/shm"):
            if entry.startswith("interlock-" + name):
                try:
                    os.unlink(os.path.join("/dev/shm", entry))
                except FileNotFoundError:
                    pass


DRIVER = textwrap.dedent(
    """
    import sys, interlock
    lock = eval(sys.argv[1])
    take = eval("lambda **kw: " + sys.argv[2])
    guard = None
    print("ready", flush=True)
    for line in sys.stdin:
        cmd = line.strip()
        try:
            if cmd == "acquire":
                guard = take()
                print("held", flush=True)
            elif cmd == "try":
                try:
                    guard = take(blocking=False)
                    print("held", flush=True)
                except interlock.WouldBlock:
                    print("busy", flush=True)
            elif cmd == "release":
                guard.release()
                guard = None
                print("released", flush=True)
            elif cmd == "exit":
                break
            else:
                print("unknown " + cmd, flush=True)
        except Exception as e:
            print("error %s: %s" % (type(e).__name__, e), flush=True)
    """
)


class Child:
    """A child interpreter holding a lock on command: ``make`` builds the
    lock (``lock``), ``take`` takes it, keyword arguments in ``kw``."""

    def __init__(self, make: str, take: str) -> None:
        env = dict(os.environ)
        env["PYTHONUNBUFFERED"] = "1"
        self.proc = subprocess.Popen(
            [sys.executable, "-c", DRIVER, make, take],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        assert self.read() == "ready"

    def read(self, timeout: float = WAIT) -> str:
        assert self.proc.stdout is not None
        line = read_line(self.proc.stdout, timeout)
        if line is None:
            raise AssertionError(f"child gave no answer within {timeout} s")
        if not line:
            raise AssertionError(f"child exited ({self.proc.wait(WAIT)})")
        return line.strip()

    def ask(self, cmd: str, timeout: float = WAIT) -> str:
        assert self.proc.stdin is not None
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        return self.read(timeout)

    def send(self, cmd: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(WAIT)
        for f in (self.proc.stdin, self.proc.stdout):
            if f is not None:
                f.close()


@pytest.fixture
def child() -> Iterator[type]:
    """``child(make, take)`` starts a Child; all are killed at teardown."""
    made: list[Child] = []

    def start(make: str, take: str) -> Child:
        c = Child(make, take)
        made.append(c)
        return c

    yield start  # type: ignore[misc]
    for c in made:
        c.kill()
