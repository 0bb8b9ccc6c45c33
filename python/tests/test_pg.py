"""interlock.PgLock / PgMutex against a real PostgreSQL server.

The ``pg`` fixture starts a throwaway cluster for this module: ``initdb`` in
a temporary directory and ``pg_ctl start`` on a unix socket there (no TCP),
as the ``postgres`` user when the tests run as root (the server refuses to
run as root); it is stopped and removed afterwards. Where no server is
installed the tests are skipped loudly, except in CI (``CI=true``), where
that is a failure (.ci/run installs the server).
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Iterator
from typing import Any, Callable, Optional

import pytest
from childio import read_line

import interlock

WAIT = 20.0  # seconds: a bound that only catches a hang


def _bin_dir() -> Optional[str]:
    d = os.environ.get("INTERLOCK_PG_BIN")
    if d:
        return d if os.path.exists(os.path.join(d, "initdb")) else None
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda p: int(p.split("/")[4]) if p.split("/")[4].isdigit() else 0,
    )
    if found:
        return os.path.dirname(found[-1])
    initdb = shutil.which("initdb")
    return os.path.dirname(initdb) if initdb else None


def _missing(why: str) -> None:
    if os.environ.get("CI") in ("true", "1"):
        pytest.fail(f"PostgreSQL server unusable in CI ({why}); .ci/run installs it")
    msg = (
        f"*** SKIPPED: PostgreSQL tests need a server ({why}); run scripts/ensure-postgres.sh ***"
    )
    print("\n" + msg, file=sys.stderr)
    pytest.skip(msg)


class Cluster:
    def __init__(self, bin_dir: str, d: str, user: Optional[str]) -> None:
        self.bin = bin_dir
        self.dir = d
        self.user = user
        self.port = 5432
        self.url = f"host={d} port={self.port} user=postgres dbname=postgres"

    def run(self, prog: str, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [os.path.join(self.bin, prog), *args],
            cwd=self.dir,
            user=self.user,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    def psql(self, sql: str) -> str:
        r = subprocess.run(
            [os.path.join(self.bin, "psql"), "-X", "-A", "-t", "-q", "-d", self.url, "-c", sql],
            capture_output=True,
            text=True,
            timeout=WAIT,
            check=True,
        )
        return r.stdout.strip()


@pytest.fixture(scope="module")
def pg() -> Iterator[Cluster]:
    bin_dir = _bin_dir()
    if bin_dir is None:
        _missing("no initdb under /usr/lib/postgresql/*/bin or on PATH")
    user = None
    if os.geteuid() == 0:
        import pwd

        try:
            pw = pwd.getpwnam("postgres")
        except KeyError:
            _missing("running as root and no `postgres` user to run the server as")
        user = "postgres"
    d = tempfile.mkdtemp(prefix="interlock-pytest-pg-")
    if user is not None:
        os.chown(d, pw.pw_uid, pw.pw_gid)
    c = Cluster(bin_dir, d, user)  # type: ignore[arg-type]
    data = os.path.join(d, "data")
    try:
        r = c.run("initdb", "-A", "trust", "--no-sync", "-U", "postgres", "-E", "UTF8", "-D", data)
        assert r.returncode == 0, r.stdout + r.stderr
        with open(os.path.join(data, "postgresql.conf"), "a") as f:
            f.write(
                f"listen_addresses = ''\nunix_socket_directories = '{d}'\n"
                "fsync = off\nfull_page_writes = off\nlogging_collector = off\n"
            )
        log = os.path.join(d, "log")
        r = c.run("pg_ctl", "-w", "-t", "30", "-D", data, "-l", log, "-o", f"-p {c.port}", "start")
        assert r.returncode == 0, r.stdout + r.stderr + open(log).read()
        yield c
    finally:
        c.run("pg_ctl", "-w", "-t", "30", "-D", data, "-m", "immediate", "stop")
        shutil.rmtree(d, ignore_errors=True)


_n = iter(range(1_000_000))


def _name(tag: str) -> str:
    return f"pytest:{tag}:{os.getpid()}:{next(_n)}"


def _in_thread(fn: Callable[[], Any]) -> Any:
    """``fn()`` run on another thread (a thread asking for a PostgreSQL lock
    it holds is refused at once): its result, or the exception it raised."""
    out: list[Any] = []

    def run() -> None:
        try:
            out.append(fn())
        except BaseException as e:  # noqa: BLE001 - handed back
            out.append(e)

    t = threading.Thread(target=run)
    t.start()
    t.join(WAIT)
    assert out, "the thread hung"
    return out[0]


def test_tokens_modes_and_the_try_and_timeout_forms(pg: Cluster) -> None:
    name = _name("basic")
    a = interlock.PgLock(name, pg.url)
    b = interlock.PgLock(name, pg.url)
    with a.write() as g:
        assert g.mode == "write" and g.token >= 1
        first = g.token
        e = _in_thread(lambda: b.write(blocking=False))
        assert isinstance(e, interlock.WouldBlock) and isinstance(e, BlockingIOError)
        assert name in str(e)

        def timed() -> Any:
            t = time.monotonic()
            try:
                b.read(timeout=0.2)
            except interlock.Timeout as e:
                return e, time.monotonic() - t

        e, took = _in_thread(timed)
        assert isinstance(e, TimeoutError) and took >= 0.2
        assert _in_thread(lambda: b.acquire(blocking=False)) is False
    # Readers coexist (each its own token); a writer is refused meanwhile.
    r1 = a.read()
    r2 = _in_thread(b.read)
    assert r1.mode == "read" and r2.token > r1.token > first
    assert isinstance(_in_thread(lambda: b.write(blocking=False)), interlock.WouldBlock)
    r1.release()
    r2.release()  # taken by another thread, released by this one
    with pytest.raises(RuntimeError):
        r2.release()
    # threading.Lock style and `with lock:`.
    assert b.acquire(timeout=1.0) is True
    assert b.locked()
    b.release()
    assert b.token is None
    with a:
        assert a.locked()
        assert a.token is not None and a.token > r2.token
    assert a.token is None
    assert a.last_token() is not None and a.last_token() > r2.token


def test_a_thread_asking_again_is_refused_at_once(pg: Cluster) -> None:
    name = _name("again")
    a = interlock.PgLock(name, pg.url)
    with a.write():
        with pytest.raises(interlock.AlreadyHeld):
            a.write()
        with pytest.raises(interlock.AlreadyHeld):
            interlock.PgLock(name, pg.url).read()
        # Another thread waits like anyone else.
        got: list[BaseException] = []

        def other() -> None:
            try:
                a.write(timeout=0.1)
            except BaseException as e:  # noqa: BLE001 - checked below
                got.append(e)

        t = threading.Thread(target=other)
        t.start()
        t.join(WAIT)
        assert isinstance(got[0], interlock.Timeout)


def test_keys_mutex_and_holders(pg: Cluster) -> None:
    key = 0x1234_5678_9ABC
    m = interlock.PgMutex(key, pg.url)
    assert m.key == key and m.name is None
    g = m.lock()
    assert pg.psql(f"SELECT pg_try_advisory_lock({key})") == "f"
    hs = m.holders()
    assert len(hs) == 1 and hs[0]["mode"] == "exclusive" and not hs[0]["waiting"]
    assert hs[0]["application_name"] == "interlock" and hs[0]["since"] > 0
    g.release()
    pair = interlock.PgLock((7, -3), pg.url)
    assert pair.key == (7, -3)
    with pair.read() as r:
        assert pair.holders()[0]["mode"] == "shared" and r.token >= 1
    assert interlock.PgLock("a", pg.url).key == -5808556873153909620
    with pytest.raises(ValueError):
        interlock.PgLock("", pg.url)
    with pytest.raises(TypeError):
        interlock.PgLock(True, pg.url)
    with pytest.raises(ValueError):
        interlock.PgLock(2**64, pg.url)
    with pytest.raises(ValueError):
        interlock.PgLock("x", pg.url, lease=0)
    with pytest.raises(ValueError):
        interlock.PgLock("x", "postgres://u@h:notaport/db")
    with pytest.raises(interlock.LockError):
        interlock.PgLock("x", f"host={pg.dir} port=1 user=postgres connect_timeout=2")


CHILD = textwrap.dedent(
    """
    import sys, interlock
    g = interlock.PgLock(sys.argv[1], sys.argv[2]).write()
    print("held", g.token, flush=True)
    sys.stdin.readline()
    """
)


def test_processes_exclude_each_other_and_a_killed_holder_releases(pg: Cluster) -> None:
    name = _name("procs")
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, name, pg.url],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        line = read_line(child.stdout, WAIT)
        assert line is not None and line.startswith("held"), line
        tok = int(line.split()[1])
        lock = interlock.PgLock(name, pg.url)
        with pytest.raises(interlock.WouldBlock):
            lock.write(blocking=False)
        child.kill()
        child.wait(WAIT)
        with lock.write(timeout=WAIT) as g:
            assert g.token > tok
    finally:
        child.kill()
        child.wait(WAIT)


def test_a_terminated_session_is_lease_lost(pg: Cluster) -> None:
    name = _name("lost")
    told = threading.Event()
    seen: list[BaseException] = []

    def on_lost(e: BaseException) -> None:
        seen.append(e)
        with pytest.raises(interlock.LeaseLost):
            g.release()  # the callback may release the lost guard
        told.set()

    lock = interlock.PgLock(name, pg.url, lease=0.4, on_lost=on_lost)
    g = lock.write()
    g.check()
    pid = lock.holders()[0]["pid"]
    assert pg.psql(f"SELECT pg_terminate_backend({pid})") == "t"
    assert told.wait(WAIT), "holder never told"
    assert isinstance(seen[0], interlock.LeaseLost)
    with pytest.raises(RuntimeError):
        g.release()  # released by the callback already
    assert isinstance(seen[0], interlock.LockError)
    # Nothing re-acquired behind the user's back; a new acquisition works.
    with lock.write() as g2:
        assert g2.token > g.token


def test_ctrl_c_ends_a_blocked_wait_with_nothing_held(pg: Cluster) -> None:
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("needs the main thread")
    name = _name("sigint")
    holder = interlock.PgLock(name, pg.url)
    waiter = interlock.PgLock(name, pg.url)
    g = _in_thread(holder.write)  # held on behalf of another thread
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    timer = threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT))
    try:
        timer.start()
        t = time.monotonic()
        with pytest.raises(KeyboardInterrupt):
            waiter.write(timeout=WAIT)
        took = time.monotonic() - t
    finally:
        timer.cancel()
        signal.signal(signal.SIGINT, old)
    assert took < WAIT / 2
    # The cancelled waiter leaves the queue (a cancel request) and holds
    # nothing.
    end = time.monotonic() + WAIT
    while len(hs := holder.holders()) > 1:
        assert time.monotonic() < end, hs
        time.sleep(0.01)
    assert [h["waiting"] for h in hs] == [False], hs
    assert not waiter.locked()
    g.release()
    with waiter.write(blocking=False):
        pass


def test_async_forms(pg: Cluster) -> None:
    import asyncio

    name = _name("aio")
    lock = interlock.PgLock(name, pg.url)

    async def main() -> int:
        async with lock.write_async() as g:
            tok = g.token
        g2 = await lock.read_async(timeout=1.0)
        g2.release()
        return tok

    assert asyncio.run(main()) >= 1


def test_a_forked_child_never_uses_or_releases_the_parents_session(pg: Cluster) -> None:
    name = _name("fork")
    lock = interlock.PgLock(name, pg.url)
    idle = interlock.PgLock(name + ":idle", pg.url)  # a pooled session, inherited
    with idle.write():
        parents = idle.holders()[0]["pid"]  # the server process of the pooled session
    g = lock.write()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report, then leave without cleanup
        code = 1
        try:
            g.release()  # inherited: releases nothing of the parent's
            try:
                lock.write(blocking=False)
                out = b"got it"
            except interlock.WouldBlock:
                out = b"refused"
            with idle.write(blocking=False):  # a session of its own
                out += b" own %d" % idle.holders()[0]["pid"]
            os.write(w, out)
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        out = f.read()
    _, status = os.waitpid(pid, 0)
    assert status == 0 and out.startswith(b"refused own "), out
    assert int(out.split()[-1]) != parents, out
    g.check()
    hs = lock.holders()
    assert len(hs) == 1 and not hs[0]["waiting"]
    g.release()
    with idle.write(blocking=False):
        pass


def test_a_cancelled_async_wait_leaves_the_queue_and_holds_nothing(pg: Cluster) -> None:
    """The async forms drive the crate's future: cancelling the task sends
    the server a cancel request, so the waiter leaves the server's queue at
    once while the lock stays held, and a grant is never kept."""
    import asyncio

    name = _name("aio-cancel")
    holder = interlock.PgLock(name, pg.url)
    waiter = interlock.PgLock(name, pg.url)
    g = _in_thread(holder.write)  # held on behalf of another thread

    def queue() -> list:
        return [h["waiting"] for h in holder.holders()]

    async def main() -> None:
        # No timeout: only the cancel can end these waits.
        tasks = [asyncio.ensure_future(waiter.write_async()) for _ in range(3)]
        # Bounded polls of the server's view: a statement's start has no
        # handshake to wait for.
        end = time.monotonic() + WAIT
        while queue().count(True) < 1:
            assert time.monotonic() < end, queue()
            await asyncio.sleep(0.01)
        for t in tasks:
            t.cancel()
        for t in tasks:
            with pytest.raises(asyncio.CancelledError):
                await t
        end = time.monotonic() + WAIT
        while queue() != [False]:
            assert time.monotonic() < end, queue()
            await asyncio.sleep(0.01)

    asyncio.run(main())
    assert not waiter.locked()
    g.release()
    # A cancelled waiter whose statement had not reached the server yet
    # (still connecting under load) may be granted once the holder lets go;
    # its waiter thread then releases that grant as its acquisition
    # returns (docs/design-async.md). Once no waiter thread is busy, the
    # lock must be free.
    end = time.monotonic() + WAIT
    while interlock._native._busy_waiters():
        assert time.monotonic() < end, "a waiter thread never returned"
        time.sleep(0.001)
    with waiter.write(blocking=False):
        pass
