"""Drop-in replacements for the Python lock libraries interlock grew out of.

Each module here offers one library's public API, built on interlock's own
lock families, with that library's known defects removed (each module's
docstring lists what differs):

======================================  =====================================
original                                replacement
======================================  =====================================
``fasteners`` (a package)               ``interlock.compat.fasteners``
``locks``                               ``interlock.compat.locks``
``prwlock``                             ``interlock.compat.prwlock``
``pylocksfile``                         ``interlock.compat.pylocksfile``
``lockbydir``                           ``interlock.compat.lockbydir``
``portalocker`` (its BoundedSemaphore)  ``interlock.compat.portalocker``
======================================  =====================================

Code written for the original can import the replacement directly
(``from interlock.compat import fasteners``), or run unchanged: call
``interlock.compat.install("fasteners")`` before anything imports
``fasteners``, or put a file named after the original (``fasteners.py``)
ahead of it on ``sys.path`` containing one line::

    import interlock.compat; interlock.compat.install(__name__)

``install`` puts the replacement, and every submodule of it (for fasteners:
``fasteners.process_lock``, ``fasteners.process_mechanism``,
``fasteners._utils``, ...), into ``sys.modules`` under the original's names,
so ``import fasteners.process_lock`` and ``from fasteners import _utils``
find them. A child process started with ``multiprocessing``'s spawn method
imports the shim file again (it inherits ``sys.path`` through the
environment only if the shim's directory is on ``PYTHONPATH``); forked
children inherit ``sys.modules`` as it is.
"""

import importlib
import pkgutil
import sys

__all__ = ["MODULES", "install", "uninstall"]

#: The originals this package replaces, and the module that replaces each.
MODULES = {
    "fasteners": "interlock.compat.fasteners",
    "locks": "interlock.compat.locks",
    "prwlock": "interlock.compat.prwlock",
    "pylocksfile": "interlock.compat.pylocksfile",
    "lockbydir": "interlock.compat.lockbydir",
    # the bounded semaphore only (see the module's docstring)
    "portalocker": "interlock.compat.portalocker",
    # lockbydir's OS helpers are a module of their own in the original
    "lockbydir_OS": "interlock.compat.lockbydir",
}

# name under the original's name -> the module object we put there
_installed = {}


def _with_submodules(module):
    """Yields (suffix, module) for module and, if it is a package, every
    module below it (imported here, so aliases exist before first use)."""
    yield "", module
    path = getattr(module, "__path__", None)
    if path is None:
        return
    for info in pkgutil.walk_packages(path, module.__name__ + "."):
        sub = importlib.import_module(info.name)
        yield info.name[len(module.__name__) :], sub


def install(*names):
    """Makes ``import NAME`` give interlock's replacement for each NAME.

    NAME is one of the keys of :data:`MODULES`. Submodules of a replacement
    package are aliased too (``NAME.sub``). Returns the replacement module
    (a tuple of them when given several names). A module of that name that
    was imported before (the original, or a shim file) is replaced in
    ``sys.modules``; references to it taken earlier keep pointing at it, so
    call ``install`` before the program imports the original.

    Raises ``ValueError`` for a name this package does not replace, and
    ``ImportError`` if the replacement cannot be imported.
    """
    if not names:
        raise ValueError(
            f"install() needs the name of at least one original: {', '.join(MODULES)}"
        )
    done = []
    for name in names:
        try:
            target = MODULES[name]
        except KeyError:
            raise ValueError(
                f"interlock.compat has no replacement for {name!r} (it has: {', '.join(MODULES)})"
            ) from None
        module = importlib.import_module(target)
        for suffix, sub in _with_submodules(module):
            alias = name + suffix
            sys.modules[alias] = sub
            _installed[alias] = sub
        done.append(module)
    return done[0] if len(done) == 1 else tuple(done)


def uninstall(*names):
    """Removes the aliases :func:`install` made for each NAME (and its
    submodules), so the next ``import NAME`` finds the original again.
    Names that were not installed are ignored."""
    for name in names:
        for alias in [a for a in _installed if a == name or a.startswith(name + ".")]:
            if sys.modules.get(alias) is _installed[alias]:
                del sys.modules[alias]
            del _installed[alias]
