"""Every public name of each original module (as installed in the test venv)
exists in its compat module, and the classes have the original's methods.

A program or test that imports a name from the original (``from
fasteners.process_lock import _interprocess_mechanism``, ``from prwlock
import reader_lock``) must find it in the replacement. Left out on purpose,
each with its reason below: modules the originals merely imported, ctypes
and Windows internals, and private helpers of an implementation the compat
module does not have.
"""

import importlib
import inspect

import pytest
from compat_support import need

PAIRS = [
    ("fasteners", "interlock.compat.fasteners"),
    ("fasteners.process_lock", "interlock.compat.fasteners.process_lock"),
    ("fasteners.lock", "interlock.compat.fasteners.lock"),
    ("fasteners.process_mechanism", "interlock.compat.fasteners.process_mechanism"),
    ("fasteners._utils", "interlock.compat.fasteners._utils"),
    ("fasteners.version", "interlock.compat.fasteners.version"),
    ("prwlock", "interlock.compat.prwlock"),
    ("prwlock.prwlock", "interlock.compat.prwlock.prwlock"),
    ("pylocksfile", "interlock.compat.pylocksfile"),
    ("locks", "interlock.compat.locks"),
]

#: Names of the original not offered, and why.
NOT_OFFERED = {
    # names the originals imported for their own use
    "absolute_import": "a __future__ import",
    "contextmanager": "contextlib's, imported by fasteners.process_lock",
    "LOCK_EX": "fcntl's, imported by locks",
    "LOCK_NB": "fcntl's, imported by locks",
    "LOCK_UN": "fcntl's, imported by locks",
    "flock": "fcntl's, imported by locks",
    "monotonic": "the monotonic package's, imported by locks",
    "find_library": "ctypes.util's, imported by prwlock",
    "sleep": "time's, imported by prwlock",
    # Windows
    "_WindowsInterProcessMechanism": "fasteners on Windows only",
    "_WindowsInterProcessReaderWriterLockMechanism": "fasteners on Windows only",
}
#: prwlock.prwlock's ctypes binding of pthread: the compat lock has none.
PRWLOCK_CTYPES = {
    "API",
    "SHORT_SLEEP",
    "TimeSpec",
    "argtypes",
    "augment_function",
    "default_error_check",
    "error_check",
    "function",
    "get_timespec",
    "librt",
    "pthread_rwlock_t",
    "pthread_rwlock_t_p",
    "pthread_rwlockattr_t",
    "pthread_rwlockattr_t_p",
    "time_t",
    "timespec_t_p",
}
#: Private methods of the originals' implementations (file handling, pthread
#: calls, polling loops) that the compat classes do without.
PRIVATE_METHODS = {
    "_do_open",
    "_do_close",
    "_try_acquire",
    "_acquire",
    "_acquire_read_lock",
    "_acquire_write_lock",
    "_release_read_lock",
    "_release_write_lock",
    "_RWLockPosix__setup",
    "_del_buf",
    "_del_lock",
    "_del_lockattr",
    "_loop_timedrdlock",
    "_loop_timedwrlock",
    "_pthread_timedrdlock",
    "_pthread_timedwrlock",
    "_close_fd",
}


@pytest.mark.parametrize("original,compat", PAIRS, ids=[p[0] for p in PAIRS])
def test_every_name_of_the_original_is_there(original, compat):
    need(original.split(".")[0])
    om, cm = importlib.import_module(original), importlib.import_module(compat)
    assert om.__name__ == original and cm.__name__ == compat
    missing = []
    for name in dir(om):
        if name.startswith("__") or inspect.ismodule(getattr(om, name)):
            continue
        if name in NOT_OFFERED or (original == "prwlock.prwlock" and name in PRWLOCK_CTYPES):
            continue
        if not hasattr(cm, name):
            missing.append(name)
            continue
        a, b = getattr(om, name), getattr(cm, name)
        if inspect.isclass(a):
            assert inspect.isclass(b), f"{name} is a class in {original}"
            lacks = [
                m
                for m in dir(a)
                if not m.startswith("__") and m not in PRIVATE_METHODS and not hasattr(b, m)
            ]
            assert not lacks, f"{compat}.{name} lacks {lacks}"
    assert not missing, f"{compat} lacks {missing}"


def test_the_names_added_for_import_paths_work():
    # The mechanisms fasteners.process_lock imports, and prwlock's
    # module-level context manager makers.
    from interlock.compat import prwlock
    from interlock.compat.fasteners import process_lock, process_mechanism

    assert process_lock._interprocess_mechanism is process_mechanism._interprocess_mechanism
    assert isinstance(
        process_mechanism._interprocess_mechanism,
        process_mechanism._FcntlInterProcessMechanism,
    )
    lock = prwlock.RWLock()
    with prwlock.reader_lock(lock, timeout=1):
        assert not lock.try_acquire_write()
    with prwlock.writer_lock(lock):
        assert lock.nlocks == 1
    assert lock.nlocks == 0
