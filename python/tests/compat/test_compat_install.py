"""interlock.compat.install: a replacement under the original's name."""

import os
import subprocess
import sys

import pytest

import interlock.compat

SHIM = "import interlock.compat; interlock.compat.install(__name__)\n"


def run(code, shim_dir=None):
    env = dict(os.environ)
    if shim_dir is not None:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(shim_dir), env.get("PYTHONPATH")) if p)
    return subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    )


@pytest.mark.parametrize("name", ["fasteners", "locks"])
def test_a_one_line_module_named_after_the_original_is_enough(tmp_path, name):
    # The real library is installed in the test venv: the shim, first on
    # the path, wins, and submodules resolve to the compat package's.
    (tmp_path / f"{name}.py").write_text(SHIM)
    code = {
        "fasteners": (
            "import fasteners, fasteners.process_lock\n"
            "from fasteners import _utils, process_mechanism\n"
            "from fasteners.process_lock import InterProcessLock\n"
            "assert fasteners.__name__ == 'interlock.compat.fasteners'\n"
            "assert InterProcessLock.__module__ == 'interlock.compat.fasteners.process_lock'\n"
            "assert _utils.StopWatch and process_mechanism._interprocess_mechanism\n"
        ),
        "locks": (
            "import locks\nfrom locks import Mutex\n"
            "assert locks.__name__ == 'interlock.compat.locks' and Mutex is locks.Mutex\n"
        ),
    }[name]
    r = run(code + "print('ok')", tmp_path)
    assert r.stdout.strip() == "ok", r.stderr


def test_install_and_uninstall_in_process():
    saved = {
        k: v for k, v in sys.modules.items() if k == "fasteners" or k.startswith("fasteners.")
    }
    try:
        m = interlock.compat.install("fasteners")
        assert sys.modules["fasteners"] is m
        assert sys.modules["fasteners.process_lock"] is m.process_lock
        assert sys.modules["fasteners._utils"] is m._utils
        both = interlock.compat.install("fasteners", "locks")
        assert both[0] is m and both[1].__name__ == "interlock.compat.locks"
        interlock.compat.uninstall("fasteners", "locks")
        assert "fasteners" not in sys.modules and "fasteners.process_lock" not in sys.modules
        assert "locks" not in sys.modules
        interlock.compat.uninstall("fasteners")  # not installed: ignored
    finally:
        sys.modules.update(saved)


def test_unknown_names_are_refused():
    with pytest.raises(ValueError, match="no replacement for 'no_such_library'"):
        interlock.compat.install("no_such_library")
    with pytest.raises(ValueError):
        interlock.compat.install()
