"""A child process that takes and gives back one kind of lock on command.

Usage: ``python lockdriver.py LIB PATH``. LIB is one of

- ``real-fasteners`` / ``compat-fasteners``: fasteners' ``InterProcessLock``
  (mode ``ex``) and ``InterProcessReaderWriterLock`` (modes ``w``, ``r``),
  from the installed fasteners or from ``interlock.compat.fasteners``;
- ``real-locks`` / ``compat-locks``: ``locks.Mutex`` (mode ``ex``);
- ``flock`` / ``lockf``: the raw kernel calls (``fcntl.flock`` /
  ``fcntl.lockf`` of the whole file), used as deliberately wrong locks in
  the control runs.

It prints ``ready``, then reads commands, one a line, answering each:
``try MODE`` -> ``held`` or ``busy`` (a try that does not wait),
``wait MODE`` -> ``held`` (waits as long as it takes), ``twait MODE`` ->
``tid N`` then ``held`` (the same wait in a new thread, whose kernel task
id N lets the parent read its context switches), ``release`` ->
``released``, ``ctxt`` -> its voluntary context switches so far, ``quit``.
"""

import fcntl
import os
import sys
import threading


def open_lock(lib, path):
    if lib in ("real-fasteners", "compat-fasteners"):
        if lib == "real-fasteners":
            import fasteners
        else:
            from interlock.compat import fasteners

        def take(mode, wait):
            if mode == "ex":
                lock = fasteners.InterProcessLock(path)
                ok = lock.acquire(blocking=wait)
                return ok, lock.release
            lock = fasteners.InterProcessReaderWriterLock(path)
            if mode == "w":
                ok = lock.acquire_write_lock(blocking=wait)
                return ok, lock.release_write_lock
            ok = lock.acquire_read_lock(blocking=wait)
            return ok, lock.release_read_lock

        return take
    if lib in ("real-locks", "compat-locks"):
        if lib == "real-locks":
            import locks
        else:
            from interlock.compat import locks

        def take(mode, wait):
            m = locks.Mutex(path) if wait else locks.Mutex(path, timeout=0)
            try:
                m.lock()
            except BlockingIOError:
                return False, None
            return True, m.release

        return take
    if lib in ("flock", "lockf"):

        def take(mode, wait):
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            shared = mode == "r"
            op = (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | (0 if wait else fcntl.LOCK_NB)
            call = fcntl.flock if lib == "flock" else fcntl.lockf
            try:
                call(fd, op)
            except OSError:
                os.close(fd)
                return False, None
            return True, lambda: os.close(fd)

        return take
    raise SystemExit(f"unknown lib {lib}")


def switches():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("voluntary_ctxt_switches:"):
                return int(line.split()[1])
    return -1


def main():
    lib, path = sys.argv[1], sys.argv[2]
    take = open_lock(lib, path)
    release = None
    print("ready", flush=True)
    for line in sys.stdin:
        cmd = line.split()
        if not cmd:
            continue
        if cmd[0] in ("try", "wait"):
            ok, release = take(cmd[1], cmd[0] == "wait")
            print("held" if ok else "busy", flush=True)
        elif cmd[0] == "twait":
            got = []

            def wait(mode=cmd[1], got=got):
                print("tid", threading.get_native_id(), flush=True)
                got.append(take(mode, True))

            t = threading.Thread(target=wait)
            t.start()
            t.join()
            ok, release = got[0]
            print("held" if ok else "busy", flush=True)
        elif cmd[0] == "release":
            release()
            release = None
            print("released", flush=True)
        elif cmd[0] == "ctxt":
            print(switches(), flush=True)
        elif cmd[0] == "quit":
            return


if __name__ == "__main__":
    main()
