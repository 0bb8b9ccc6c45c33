"""The tests' line reader (childio.read_line) against the defect it
replaces: select() then a buffered readline() loses sight of a second line
that arrived in the same read."""

from __future__ import annotations

import select
import subprocess
import sys

from childio import read_line

WAIT = 20.0
TWO_LINES = "import sys; sys.stdout.write('one\\ntwo\\n'); sys.stdout.flush(); sys.stdin.read()"


def _child() -> subprocess.Popen:
    p = subprocess.Popen(
        [sys.executable, "-c", TWO_LINES],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    # One write of 8 bytes (under PIPE_BUF): once the pipe is readable,
    # both lines are in it.
    ready, _, _ = select.select([p.stdout], [], [], WAIT)
    assert ready
    return p


def _end(p: subprocess.Popen) -> None:
    p.kill()
    p.wait(WAIT)
    for f in (p.stdin, p.stdout):
        if f is not None:
            f.close()


def test_two_lines_of_one_write_are_both_read():
    p = _child()
    try:
        assert read_line(p.stdout, WAIT) == "one\n"
        assert read_line(p.stdout, WAIT) == "two\n"
        assert read_line(p.stdout, 0.05) is None  # nothing more: a bounded wait
    finally:
        _end(p)


def test_control_select_then_readline_loses_the_second_line():
    """The pattern the tests used before: the second line sits in the
    stream's buffer, and select() waits on the empty pipe."""
    p = _child()
    try:
        assert p.stdout is not None
        assert p.stdout.readline() == "one\n"
        ready, _, _ = select.select([p.stdout], [], [], 0.2)
        assert not ready
        assert p.stdout.readline() == "two\n"  # it was there all along
    finally:
        _end(p)
