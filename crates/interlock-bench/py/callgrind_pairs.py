"""Instructions per uncontended pair of interlock's ShmRwLock beside prwlock,
counted by callgrind (load-independent, unlike times on a shared machine).

Each case is the statement of pairs.py, run by timeit N times in a fresh
interpreter under `valgrind --tool=callgrind`; the count of a run with N = 0
is subtracted (interpreter start, imports, set-up), so what is left is N
pairs. Prints a Markdown table with the ratios to prwlock's pair.

    python crates/interlock-bench/py/callgrind_pairs.py [--n N] [CASE ...]

(`python` an interpreter with interlock and prwlock installed, a release
build of the binding; valgrind on PATH.)
"""

import argparse
import os
import re
import subprocess
import sys
import tempfile
import timeit

# (name, statement, the prwlock case it is compared with)
CASES = {
    "read": ("g = rw.read(); g.release()", "p_read"),
    "read_with": ("with rw.read(): pass", "p_read_with"),
    "acquire_shared": ("rw.acquire(shared=True); rw.release()", "p_read"),
    "write": ("g = rw.write(); g.release()", "p_write"),
    "write_with": ("with rw: pass", "p_write_with"),
    "acquire": ("rw.acquire(); rw.release()", "p_write"),
    "p_read": ("p.acquire_read(); p.release()", None),
    "p_write": ("p.acquire_write(); p.release()", None),
    "p_read_with": ("with p.reader_lock(): pass", None),
    "p_write_with": ("with p.writer_lock(): pass", None),
}


def child(case: str, n: int) -> None:
    import prwlock

    import interlock

    d = tempfile.mkdtemp()
    names = {"rw": interlock.ShmRwLock(os.path.join(d, "s.shm")), "p": prwlock.RWLock()}
    t = timeit.Timer(CASES[case][0], globals=names)
    t.timeit(100)  # warm up (first-call caches)
    t.timeit(n)
    os.unlink(os.path.join(d, "s.shm"))
    os.rmdir(d)


def count(case: str, n: int) -> int:
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "cg.out")
        subprocess.run(
            [
                "valgrind",
                "--tool=callgrind",
                f"--callgrind-out-file={out}",
                sys.executable,
                __file__,
                "--child",
                case,
                str(n),
            ],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        with open(out) as f:
            for line in f:
                m = re.match(r"(?:summary|totals): (\d+)", line)
                if m:
                    return int(m.group(1))
    raise RuntimeError("no totals in the callgrind output")


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        child(sys.argv[2], int(sys.argv[3]))
        return
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("cases", nargs="*", default=list(CASES))
    args = ap.parse_args()
    want = list(args.cases)
    for c in args.cases:
        peer = CASES[c][1]
        if peer and peer not in want:
            want.append(peer)
    per = {}
    for c in want:
        per[c] = (count(c, args.n) - count(c, 0)) / args.n
    print(f"instructions per pair (callgrind, N = {args.n} minus N = 0)\n")
    print("| pair | interlock | prwlock | ratio |")
    print("|---|---:|---:|---:|")
    for c in args.cases:
        peer = CASES[c][1]
        if peer is None:
            continue
        print(
            f"| `{CASES[c][0]}` vs `{CASES[peer][0]}` | {per[c]:,.0f} | {per[peer]:,.0f} "
            f"| {per[peer] / per[c]:.1f}x |"
        )


if __name__ == "__main__":
    main()
