"""Plots for interlock-bench: reads results.csv and latency.csv from the
directory given as the only argument, writes PNGs there, and prints one
`wrote PATH` line per file.
"""

import csv
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

STYLE = {"interlock": ("-", 2.4), "peer": ("--", 1.3), "floor": (":", 1.8)}


COLORS = {}


def color(target):
    """A stable colour per target across every plot (tab20 has 20)."""
    if target not in COLORS:
        COLORS[target] = plt.get_cmap("tab20")(len(COLORS) % 20)
    return COLORS[target]


def hold_title(ns):
    return "no hold" if ns == 0 else "hold %s" % fmt_ns(ns)


def load(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def fmt_ns(v, _pos=None):
    for unit, div in (("s", 1e9), ("ms", 1e6), ("µs", 1e3)):
        if v >= div:
            return "%g %s" % (v / div, unit)
    return "%g ns" % v


def throughput(rows, out, cls):
    sel = [r for r in rows if r["class"] == cls and r["mix"] == "writers" and not r["error"]]
    if not sel:
        return None
    holds = sorted({int(r["hold_ns"]) for r in sel})
    fig, axes = plt.subplots(1, len(holds), figsize=(5 * len(holds), 5.2), sharey=True, squeeze=False)
    axes = axes[0]
    for ax, hold in zip(axes, holds):
        title = hold_title(hold)
        targets = []
        for r in sel:
            if int(r["hold_ns"]) == hold and r["target"] not in targets:
                targets.append(r["target"])
        for t in targets:
            pts = sorted(
                (int(r["procs"]), float(r["acq_per_s"]), r["group"])
                for r in sel
                if r["target"] == t and int(r["hold_ns"]) == hold and float(r["acq_per_s"]) > 0
            )
            if not pts:
                continue
            ls, lw = STYLE.get(pts[0][2], ("-", 1))
            ax.plot([p[0] for p in pts], [p[1] for p in pts], ls, lw=lw, marker="o", ms=3, label=t, color=color(t))
        ax.set_title(title)
        ax.set_xscale("log", base=2)
        ax.set_xticks([1, 2, 4, 8])
        ax.set_xticklabels(["1", "2", "4", "8"])
        ax.set_yscale("log")
        ax.set_xlabel("processes (2 CPUs)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("acquisitions / s")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)
    fig.suptitle("Throughput, all writers (%s locks)" % cls)
    fig.tight_layout()
    path = os.path.join(out, "throughput-%s.png" % cls)
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)
    return path


def latency(lat, out, cls):
    sel = [r for r in lat if r["class"] == cls]
    if not sel:
        return None
    kinds = [
        ("handoff", "release-to-waiter latency (CDF)"),
        ("wait_ex", "writers' wait (share of waits longer than x)"),
    ]
    fig, axes = plt.subplots(1, 2, figsize=(14, 5.2))
    scen = None
    for ax, (kind, title) in zip(axes, kinds):
        by = {}
        for r in sel:
            if r["kind"] != kind:
                continue
            scen = (r["mix"], r["hold_ns"], r["procs"])
            by.setdefault((r["target"], r["group"]), []).append((int(r["bucket_ns"]), int(r["count"])))
        for (t, g), pts in by.items():
            pts.sort()
            total = float(sum(c for _, c in pts))
            acc, xs, ys = 0, [], []
            for b, c in pts:
                acc += c
                xs.append(max(b, 1))
                # CDF for the handoff; the tail (1 - CDF) for waits, whose
                # bulk is uncontended re-acquisitions.
                ys.append(acc / total if kind == "handoff" else max(1.0 - acc / total, 0.5 / total))
            ls, lw = STYLE.get(g, ("-", 1))
            ax.step(xs, ys, ls, lw=lw, where="post", label=t, color=color(t))
        ax.set_xscale("log")
        if kind != "handoff":
            ax.set_yscale("log")
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(fmt_ns))
        ax.set_title(title)
        ax.set_xlabel("time (log)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("fraction of handoffs ≤ x")
    axes[1].set_ylabel("fraction of waits > x")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)
    if scen:
        fig.suptitle("Latency distributions (%s locks): %s, hold %s ns, %s processes" % (cls, scen[0], scen[1], scen[2]))
    fig.tight_layout()
    path = os.path.join(out, "latency-%s.png" % cls)
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)
    return path


def writer_wait(rows, out):
    sel = [r for r in rows if r["mix"] == "1writer" and not r["error"] and r["writer_p99_wait_ns"]]
    if not sel:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(14, 5.2))
    for ax, cls in zip(axes, ["file", "shm"]):
        hold = min(int(r["hold_ns"]) for r in sel)
        targets = []
        for r in sel:
            if r["class"] == cls and int(r["hold_ns"]) == hold and r["target"] not in targets:
                targets.append(r["target"])
        for t in targets:
            pts = sorted(
                (int(r["procs"]), float(r["writer_p99_wait_ns"]), r["group"])
                for r in sel
                if r["target"] == t and int(r["hold_ns"]) == hold
            )
            ls, lw = STYLE.get(pts[0][2], ("-", 1))
            ax.plot([p[0] for p in pts], [p[1] for p in pts], ls, lw=lw, marker="o", ms=3, label=t, color=color(t))
        ax.set_yscale("log")
        ax.set_xscale("log", base=2)
        ax.set_xticks([2, 4, 8])
        ax.set_xticklabels(["2", "4", "8"])
        ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(fmt_ns))
        ax.set_title("%s locks, %s" % (cls, hold_title(hold)))
        ax.set_xlabel("processes (1 writer, the rest readers; 2 CPUs)")
        ax.grid(True, which="both", alpha=0.3)
        if targets:
            ax.legend(fontsize=7)
    axes[0].set_ylabel("writer's p99 wait")
    fig.suptitle("Writer starvation: the one writer's p99 wait among readers")
    fig.tight_layout()
    path = os.path.join(out, "writer-wait.png")
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)
    return path


def main():
    out = sys.argv[1]
    rows = load(os.path.join(out, "results.csv"))
    for r in rows:
        color(r["target"])
    lat = load(os.path.join(out, "latency.csv"))
    for p in (
        throughput(rows, out, "file"),
        throughput(rows, out, "shm"),
        latency(lat, out, "file"),
        latency(lat, out, "shm"),
        writer_wait(rows, out),
    ):
        if p:
            print("wrote %s" % p)


if __name__ == "__main__":
    main()
