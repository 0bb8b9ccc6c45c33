"""Helpers for the compat tests: child Python processes driven over pipes.

(The ``spawn`` fixture that makes them is in conftest.py.)

A child is ``sys.executable -c CODE ARGS...``; it reports over stdout one
word per line (``held``, ``busy``, ...) and waits for a line on stdin
before it goes on, so the tests coordinate by handshakes, never by sleeps.
Every read is bounded, and children still running at the end of a test are
killed.
"""

import os
import subprocess
import sys
import time

import pytest
from childio import read_line

#: How long any single handshake may take before the test fails.
HANDSHAKE_S = 20.0

#: The child program the interoperation tests drive (see its docstring).
DRIVER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "lockdriver.py")


class Child:
    def __init__(self, argv, env=None, cwd=None):
        self.proc = subprocess.Popen(
            [sys.executable, *map(str, argv)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=cwd,
        )

    def line(self, timeout=HANDSHAKE_S):
        """The child's next stdout line (stripped); fails the test if none
        arrives in time or the child exits first."""
        deadline = time.monotonic() + timeout
        out = self.proc.stdout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                self.kill()
                pytest.fail(f"child gave no line within {timeout} s")
            text = read_line(out, left)
            if text is not None:
                if not text:
                    self.proc.wait(5)
                    pytest.fail(
                        f"child exited ({self.proc.returncode}) without a line: "
                        f"{self.proc.stderr.read()}"
                    )
                return text.strip()

    def expect(self, word, timeout=HANDSHAKE_S):
        got = self.line(timeout)
        assert got == word, f"child said {got!r}, expected {word!r}"
        return got

    def send(self, word="go"):
        self.proc.stdin.write(word + "\n")
        self.proc.stdin.flush()

    def finish(self, timeout=HANDSHAKE_S):
        """Waits for a clean exit; fails the test otherwise."""
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail("child did not exit in time")
        assert rc == 0, f"child failed ({rc}): {self.proc.stderr.read()}"

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


def need(module):
    """Imports a test dependency. Under CI a missing one is a failure,
    elsewhere the test is skipped."""
    try:
        return __import__(module)
    except ImportError:
        if os.environ.get("CI") == "true":
            raise
        pytest.skip(f"{module} is not installed (python/requirements-test.txt)")


def voluntary_switches(pid, tid=None):
    """How often the task went to sleep voluntarily (from /proc)."""
    path = f"/proc/{pid}/task/{tid}/status" if tid else f"/proc/{pid}/status"
    with open(path) as f:
        for line in f:
            if line.startswith("voluntary_ctxt_switches:"):
                return int(line.split()[1])
    raise AssertionError(f"no voluntary_ctxt_switches in {path}")
