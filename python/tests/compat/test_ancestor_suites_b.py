"""The ancestors' own test suites, run against interlock's compat modules.

Nothing of the originals is copied here: the test files are read from the
pinned original distributions installed in the test venv
(python/requirements-test.txt: prwlock ships ``prwlock/tests/``, pylocksfile
ships ``tests/tests.py``) and executed with the original's import name
pointing at the compat module. A missing distribution skips locally and
fails in CI (``CI=true``).

- prwlock's ``test_prwlock.py`` (unittest): every test runs and passes (the
  two that compare or close the private ``_fd`` get the compat's stand-in
  descriptor).
- pylocksfile's ``tests/tests.py`` (a script): its two scenarios run in a
  child interpreter with a time limit: ``testReadWriteLocks`` (two
  processes stepping through overlapping ranges, conversions and a
  deadlock the lock must detect, else it hangs) and ``testRace`` (processes
  racing hand over hand round a ring of locks; it prints whether the
  recorded order was correct). Its unused ``import numpy`` gets an empty
  stand-in.
- lockbydir has no test suite (its ``testDLock`` and concurrent examples
  are demonstrations that print, Python 2 only, and not on PyPI);
  test_lockbydir_compat.py checks each behaviour they demonstrate.
"""

import importlib.metadata
import os
import subprocess
import sys
import types
import unittest

import pytest


def _original_file(dist, relpath):
    try:
        d = importlib.metadata.distribution(dist)
    except importlib.metadata.PackageNotFoundError:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{dist} is not installed in the test venv (python/requirements-test.txt)")
        pytest.skip(f"{dist} is not installed")
    path = str(d.locate_file(relpath))
    if not os.path.exists(path):
        pytest.fail(f"{dist} has no {relpath}")
    return path


def _load_suite(path, modname, aliases):
    """Executes the test file at path as module modname, with each alias
    (original name -> module) in sys.modules while it imports."""
    with open(path) as f:
        code = compile(f.read(), path, "exec")
    mod = types.ModuleType(modname)
    mod.__file__ = path
    saved = {name: sys.modules.get(name) for name in aliases}
    sys.modules.update(aliases)
    sys.modules[modname] = mod  # so multiprocessing can pickle its functions
    try:
        exec(code, mod.__dict__)
    finally:
        for name, old in saved.items():
            if old is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = old
    return mod


# -- prwlock ----------------------------------------------------------------

#: prwlock tests expected to fail against the compat, and why (none now).
_PRIVATE: dict[str, str] = {}


def _prwlock_cases():
    from interlock.compat import prwlock

    path = _original_file("prwlock", "prwlock/tests/test_prwlock.py")
    suite = _load_suite(path, "_prwlock_own_tests", {"prwlock": prwlock})
    return suite.RWLockTestCase


def _prwlock_names():
    try:
        case = _prwlock_cases()
    except BaseException:  # reported by test_prwlock_suite_is_there
        return []
    return sorted(n for n in dir(case) if n.startswith("test"))


def test_prwlock_suite_is_there():
    assert len(_prwlock_cases().__dict__) > 0


@pytest.mark.parametrize("test_name", _prwlock_names())
def test_prwlock_own_suite(test_name):
    case = _prwlock_cases()
    result = unittest.TestResult()
    case(test_name).run(result)
    problems = [t for _, t in result.errors + result.failures]
    if test_name in _PRIVATE:
        assert problems, "now passes: drop it from _PRIVATE"
        pytest.xfail(_PRIVATE[test_name])
    assert not problems, "\n".join(problems)
    assert result.testsRun == 1 and not result.skipped


# -- pylocksfile ------------------------------------------------------------

_PYLOCKSFILE_RUNNER = r"""
import sys, types
from interlock.compat import pylocksfile
path, suite_file, scenario = sys.argv[1], sys.argv[2], sys.argv[3]
sys.modules["pylocksfile"] = pylocksfile
sys.modules.setdefault("numpy", types.ModuleType("numpy"))  # imported, never used
mod = types.ModuleType("_pylocksfile_own_tests")
mod.__file__ = suite_file
sys.modules[mod.__name__] = mod
exec(compile(open(suite_file).read(), suite_file, "exec"), mod.__dict__)
if scenario == "ranges":
    mod.testReadWriteLocks(locksfile_path=path)
    print("RANGES DONE")
else:
    mod.testRace(locksfile_path=path, n_process=3, n_tracks=8, n_races=15)
"""


def _run_pylocksfile(tmp_path, scenario):
    suite_file = _original_file("pylocksfile", "tests/tests.py")
    lock = str(tmp_path / "testlock.lock")
    try:
        out = subprocess.run(
            [sys.executable, "-c", _PYLOCKSFILE_RUNNER, lock, suite_file, scenario],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=str(tmp_path),
        )
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"pylocksfile's {scenario} hung (deadlock not detected?): {e.stdout}")
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


def test_pylocksfile_own_ranges_scenario(tmp_path):
    out = _run_pylocksfile(tmp_path, "ranges")
    assert "RANGES DONE" in out
    # both processes went through their steps
    assert "- One -" in out and "- Two -" in out


def test_pylocksfile_own_race_scenario(tmp_path):
    out = _run_pylocksfile(tmp_path, "race")
    assert "pylocksfile correct." in out, out
    assert "pylocksfile incorrect" not in out
