"""fasteners' own test suite, run against interlock.compat.fasteners.

Nothing of fasteners is copied into this repository: at test time the
sdist of the pinned release is fetched with ``pip download`` into a cache
(``$INTERLOCK_COMPAT_CACHE``, default ``.venv/compat-sdists`` at the
repository root), its ``tests/`` directory is unpacked into a temporary
directory, and pytest runs it in a child interpreter whose ``sys.path``
starts with a one-line ``fasteners.py`` shim
(``import interlock.compat; interlock.compat.install(__name__)``). So the
suite imports ``fasteners`` exactly as it is written to, and gets the
compat module even though the real fasteners is installed in the venv (for
the interoperation tests). A conftest added next to the unpacked tests
checks that this is so before any test runs.

Every test of fasteners 0.20 runs; none is deselected. (Two skip on their
own: ``test_eventlet_spawn_n_bug``, marked skip upstream, and a test for
Windows only.) The
eventlet test needs eventlet, listed in python/requirements-test.txt.
"""

import os
import subprocess
import sys
import tarfile

import pytest

FASTENERS = "fasteners==0.20"
SDIST = "fasteners-0.20.tar.gz"
ROOT = os.path.dirname(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
)

CHECK = """
import fasteners, fasteners.process_lock, fasteners.process_mechanism, fasteners._utils
assert fasteners.__name__ == "interlock.compat.fasteners", fasteners.__name__
assert fasteners.process_lock.__name__ == "interlock.compat.fasteners.process_lock"
"""


def sdist(tmp_path_factory):
    cache = os.environ.get("INTERLOCK_COMPAT_CACHE") or os.path.join(
        ROOT, ".venv", "compat-sdists"
    )
    path = os.path.join(cache, SDIST)
    if not os.path.exists(path):
        os.makedirs(cache, exist_ok=True)
        r = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "-q"]
            + ["--no-deps", "--no-binary", ":all:", "-d", cache, FASTENERS],
            capture_output=True,
            text=True,
            timeout=300,
        )
        if r.returncode != 0 or not os.path.exists(path):
            msg = f"pip download {FASTENERS} failed: {r.stderr.strip()[-500:]}"
            if os.environ.get("CI") == "true":
                pytest.fail(msg)
            pytest.skip(msg)
    return path


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    """The unpacked tests/ of fasteners' sdist, and a directory holding the
    shim."""
    base = tmp_path_factory.mktemp("fasteners-upstream")
    with tarfile.open(sdist(tmp_path_factory)) as tar:
        members = [m for m in tar.getmembers() if "/tests/" in m.name and m.isfile()]
        for m in members:
            m.name = "tests/" + m.name.split("/tests/", 1)[1]
        tar.extractall(base, members=members, filter="data")
    shim = base / "shim"
    shim.mkdir()
    (shim / "fasteners.py").write_text(
        "import interlock.compat; interlock.compat.install(__name__)\n"
    )
    (base / "tests" / "conftest.py").write_text(CHECK)
    return base


def run_upstream(suite, *args):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(suite / "shim"), env.get("PYTHONPATH", "")]).rstrip(
        os.pathsep
    )
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", *args],
        cwd=suite / "tests",
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_fasteners_own_suite_passes_against_the_compat_module(suite):
    import importlib.util

    for dep in ("diskcache", "more_itertools", "eventlet"):
        if importlib.util.find_spec(dep) is None:
            if os.environ.get("CI") == "true":
                pytest.fail(f"{dep} is not installed (python/requirements-test.txt)")
            pytest.skip(f"{dep} is not installed (python/requirements-test.txt)")
    # One run of the whole suite (about 35 s, 20 s of it four thread tests of
    # fasteners that run for 5 s each by design).
    r = run_upstream(suite, ".")
    tail = r.stdout[-4000:] + r.stderr[-2000:]
    assert r.returncode == 0, tail
    summary = r.stdout.strip().splitlines()[-1]
    assert " passed" in summary and "failed" not in summary and "error" not in summary, tail
