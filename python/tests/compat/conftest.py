"""Fixtures of the compat tests (helpers are in compat_support.py)."""

import pytest
from compat_support import Child


@pytest.fixture
def spawn():
    """spawn(*argv, env=None, cwd=None) -> Child running ``python *argv``
    (e.g. ``spawn(DRIVER, "real-fasteners", path)``); children still running
    at teardown are killed."""
    children = []

    def make(*argv, **kw):
        c = Child(argv, **kw)
        children.append(c)
        return c

    yield make
    for c in children:
        c.kill()
        for f in (c.proc.stdin, c.proc.stdout, c.proc.stderr):
            f.close()
