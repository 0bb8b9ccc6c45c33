"""interlock.compat.install() for prwlock, pylocksfile and lockbydir: the
original's import paths find the compat modules, in a fresh interpreter (so
the real originals installed in the test venv are not in the way)."""

import subprocess
import sys

SCRIPT = r"""
import interlock.compat
interlock.compat.install("prwlock", "pylocksfile", "lockbydir", "lockbydir_OS")
import prwlock
from prwlock import RWLock
from prwlock.prwlock import RWLockPosix
from pylocksfile import pylocksfile
from lockbydir import DLock, TIMEOUT
from lockbydir_OS import LOCKDIREXTENSION, pathExists, mkdir_ReturnWhetherSuccessful
assert RWLock is RWLockPosix and "interlock" in prwlock.__file__
assert pylocksfile.__module__ == "interlock.compat.pylocksfile"
assert DLock.__module__ == "interlock.compat.lockbydir" and TIMEOUT == 10
assert LOCKDIREXTENSION == ".lockdir" and pathExists("/")
r = RWLock()
assert r.acquire_write() and r.release() is None
print("ok")
"""


def test_install_aliases_the_original_import_paths():
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
