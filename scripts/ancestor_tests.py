"""Runs the ancestors' own test suites against interlock.compat (see
scripts/ancestor-tests.sh, which calls this with the venv's Python).

Nothing of the originals is kept in the repository: each suite is taken
from the pinned release's sdist (``pip download --no-binary :all:``, cached
in $INTERLOCK_COMPAT_CACHE, default .venv/compat-sdists), unpacked into a
temporary directory away from the original's package (so the tests cannot
import the original by accident), and run with the original's import name
pointing at the compat module: a directory on PYTHONPATH holds one-line
shims (``import interlock.compat; interlock.compat.install(__name__)``),
and a check before the first test fails the suite if ``import NAME`` gives
anything but ``interlock.compat.NAME``.

Suites:

- fasteners 0.20: ``tests/`` of the sdist (pytest; needs diskcache,
  more-itertools and eventlet, as in python/requirements-test.txt).
- prwlock 0.4.1: ``prwlock/tests/test_prwlock.py`` (pytest runs its
  unittest cases; ``test_wrwlock.py`` is for Windows only).
- pylocksfile 0.0.6: ``tests/tests.py``, a script: its ``main()`` runs
  testReadWriteLocks and testRace; it passes if it exits 0 within the time
  limit and prints "pylocksfile correct." (an unused ``import numpy`` gets
  an empty stand-in).
- locks 0.1.1: the sdist has no tests; its repository's ``test_locks.py``
  is run when given (``--locks-tests FILE``), else the suite is reported as
  not run. (``from mock import Mock`` gets ``unittest.mock``.)
- lockbydir: not on PyPI, Python 2 only; its self-checks are demonstration
  functions, not a suite: reported as not run (python/tests/compat/
  test_lockbydir_compat.py covers what they show).

Each test that fails against the compat module because the original's test
checks a defect the compat module drops, or a private attribute it does
not have, is listed in KNOWN with the reason; the exit status is 0 when
every other test passed, 1 otherwise. One line per suite:
``SUITE: N run, N passed, N failed (N known: ...)``, then the plain total.
"""

import argparse
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import xml.etree.ElementTree as ET

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PINS = {
    "fasteners": "0.20",
    "prwlock": "0.4.1",
    "pylocksfile": "0.0.6",
    "locks": "0.1.1",
}

#: Tests expected to fail against the compat module, and why (docs/python.md,
#: "Compatibility modules", says more).
KNOWN: dict[str, dict[str, str]] = {}

SHIM = "import interlock.compat; interlock.compat.install(__name__)\n"

GUARD = """
import importlib
import interlock.compat
for name in {names!r}:
    mod = importlib.import_module(name)
    assert mod.__name__ == interlock.compat.MODULES[name], (
        f"import {{name}} gave {{mod.__file__}}, not interlock.compat's module"
    )
"""


def sdist(name, cache):
    """The path of NAME's pinned sdist, downloaded into cache if missing."""
    version = PINS[name]
    for f in os.listdir(cache) if os.path.isdir(cache) else []:
        if f.lower().startswith(f"{name}-{version}.") and f.endswith((".tar.gz", ".zip")):
            return os.path.join(cache, f)
    os.makedirs(cache, exist_ok=True)
    r = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "-q"]
        + ["--no-deps", "--no-binary", ":all:", "-d", cache, f"{name}=={version}"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if r.returncode != 0:
        raise RuntimeError(f"pip download {name}=={version} failed: {r.stderr.strip()[-400:]}")
    return sdist(name, cache)


def unpack(archive, inner, dest):
    """Extracts the files under INNER/ (a directory of the sdist, e.g.
    "tests") into dest; returns dest."""
    with tarfile.open(archive) as tar:
        members = []
        for m in tar.getmembers():
            rel = m.name.split("/", 1)[1] if "/" in m.name else ""
            if m.isfile() and rel.startswith(inner + "/"):
                m.name = rel[len(inner) + 1 :]
                members.append(m)
        tar.extractall(dest, members=members, filter="data")
    return dest


def environment(shims):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([shims] + [p for p in [env.get("PYTHONPATH")] if p])
    env.pop("PYTHONSAFEPATH", None)
    return env


def run_pytest(suite, directory, shims, names, args=(), timeout=900):
    """pytest in directory; returns {test name: outcome} and the output."""
    with open(os.path.join(directory, "conftest.py"), "w") as f:
        f.write(GUARD.format(names=names))
    xml = os.path.join(directory, "report.xml")
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly"]
        + [f"--junitxml={xml}", "-o", "junit_family=xunit1", *args, "."],
        cwd=directory,
        env=environment(shims),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    outcomes = {}
    if os.path.exists(xml):
        for case in ET.parse(xml).getroot().iter("testcase"):
            # module::test (test_lock.py and test_reader_writer_lock.py of
            # fasteners share test names)
            name = case.get("classname", "").split(".")[0] + "::" + case.get("name")
            kinds = {child.tag for child in case}
            if "skipped" in kinds:
                outcomes[name] = "skipped"
            elif kinds & {"failure", "error"}:
                outcomes[name] = "failed"
            else:
                outcomes[name] = "passed"
    if not outcomes:
        outcomes["<collection>"] = "failed"
    return outcomes, r.stdout + r.stderr


def suite_fasteners(work, shims, cache, opts):
    d = unpack(sdist("fasteners", cache), "tests", os.path.join(work, "fasteners"))
    return run_pytest("fasteners", d, shims, ["fasteners"])


def suite_prwlock(work, shims, cache, opts):
    d = unpack(sdist("prwlock", cache), "prwlock/tests", os.path.join(work, "prwlock"))
    os.remove(os.path.join(d, "test_wrwlock.py"))  # RWLockWindows: Windows only
    os.remove(os.path.join(d, "__init__.py"))  # no package: keep the sdist's away
    return run_pytest("prwlock", d, shims, ["prwlock"])


RUN_PYLOCKSFILE = r"""
import runpy, sys, types
import pylocksfile
assert pylocksfile.__name__ == "interlock.compat.pylocksfile", pylocksfile.__file__
sys.modules.setdefault("numpy", types.ModuleType("numpy"))  # imported, never used
runpy.run_path("tests.py", run_name="__main__")
"""


def suite_pylocksfile(work, shims, cache, opts):
    d = unpack(sdist("pylocksfile", cache), "tests", os.path.join(work, "pylocksfile"))
    try:
        r = subprocess.run(
            [sys.executable, "-c", RUN_PYLOCKSFILE],
            cwd=d,
            env=environment(shims),
            capture_output=True,
            text=True,
            timeout=180,
        )
        out = r.stdout + r.stderr
        ok_ranges = r.returncode == 0 and "- Two -" in r.stdout
        ok_race = r.returncode == 0 and "pylocksfile correct." in r.stdout
    except subprocess.TimeoutExpired as e:
        out = f"timed out after {e.timeout} s (a deadlock not detected?)\n{e.stdout or ''}"
        ok_ranges = ok_race = False
    outcomes = {
        "testReadWriteLocks": "passed" if ok_ranges else "failed",
        "testRace": "passed" if ok_race else "failed",
    }
    return outcomes, out


def suite_locks(work, shims, cache, opts):
    if not opts.locks_tests:
        return None, "no tests in its sdist (give --locks-tests FILE: its repo's test_locks.py)"
    d = os.path.join(work, "locks")
    os.makedirs(d)
    with open(opts.locks_tests) as src, open(os.path.join(d, "test_locks.py"), "w") as dst:
        dst.write(src.read())
    with open(os.path.join(shims, "mock.py"), "w") as f:
        f.write("from unittest.mock import *  # noqa: F403 (the mock backport's API)\n")
    return run_pytest("locks", d, shims, ["locks"])


def suite_lockbydir(work, shims, cache, opts):
    return None, "not on PyPI, Python 2 only; its self-checks are demonstrations that print"


SUITES = {
    "fasteners": suite_fasteners,
    "prwlock": suite_prwlock,
    "pylocksfile": suite_pylocksfile,
    "locks": suite_locks,
    "lockbydir": suite_lockbydir,
}


def _bare(test):
    """module::Class::name[param] -> name"""
    return re.sub(r"\[.*\]$", "", test.split("::")[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("suites", nargs="*", help=f"some of {', '.join(SUITES)} (default: all)")
    ap.add_argument("--locks-tests", metavar="FILE", help="test_locks.py of rossmacarthur/locks")
    ap.add_argument("--verbose", "-v", action="store_true", help="print each suite's output")
    opts = ap.parse_args()
    unknown = [s for s in opts.suites if s not in SUITES]
    if unknown:
        ap.error(f"no suite {', '.join(unknown)} (there are: {', '.join(SUITES)})")
    cache = os.environ.get("INTERLOCK_COMPAT_CACHE")
    cache = cache or os.path.join(ROOT, ".venv", "compat-sdists")
    total_pass = total_fail = 0
    unexpected = False
    with tempfile.TemporaryDirectory(prefix="interlock-ancestors-") as work:
        shims = os.path.join(work, "shims")
        os.makedirs(shims)
        for name in ("fasteners", "locks", "prwlock", "pylocksfile", "lockbydir", "lockbydir_OS"):
            with open(os.path.join(shims, name + ".py"), "w") as f:
                f.write(SHIM)
        for name in opts.suites or SUITES:
            try:
                outcomes, out = SUITES[name](work, shims, cache, opts)
            except Exception as e:  # a download or unpack that failed
                outcomes, out = {"<setup>": "failed"}, f"{type(e).__name__}: {e}"
            if outcomes is None:
                print(f"{name}: not run ({out})")
                continue
            known = KNOWN.get(name, {})
            failed = sorted(t for t, o in outcomes.items() if o == "failed")
            passed = sum(o == "passed" for o in outcomes.values())
            skipped = sum(o == "skipped" for o in outcomes.values())
            expected = [t for t in failed if _bare(t) in known]
            surprises = [t for t in failed if t not in expected]
            fixed = [t for t, o in outcomes.items() if o == "passed" and _bare(t) in known]
            run = passed + len(failed)
            line = f"{name}: {run} run, {passed} passed, {len(failed)} failed"
            if skipped:
                line += f", {skipped} skipped"
            if expected:
                line += f" ({len(expected)} known: {', '.join(expected)})"
            print(line)
            for t in surprises:
                print(f"  FAILED {t}")
            for t in expected:
                print(f"  known {t}: {known[_bare(t)]}")
            for t in fixed:
                print(f"  {t} now passes: drop it from KNOWN in {__file__}")
            if surprises or opts.verbose:
                print("  " + "\n  ".join(out.strip().splitlines()[-40:]))
            unexpected |= bool(surprises)
            total_pass += passed
            total_fail += len(failed)
    print(f"{total_pass} passed, {total_fail} failed")
    return 1 if unexpected else 0


if __name__ == "__main__":
    sys.exit(main())
