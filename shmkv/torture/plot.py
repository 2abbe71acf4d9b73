"""The timeline of a run as a PNG: faults per node, throughput by outcome, latency per op.

matplotlib is optional (the ``bench`` extra): :func:`timeline` raises :class:`PlotUnavailable`
naming the install command when it is missing, and the runner then skips the plot.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from ..errors import Error
from .history import FAIL, OK, UNKNOWN, History

COLORS = {OK: "tab:green", FAIL: "tab:red", UNKNOWN: "tab:orange"}


class PlotUnavailable(Error):
    """matplotlib is not installed."""


def timeline(h: History, path: str | Path, bucket: float = 0.25) -> Path:
    """Write the timeline of ``h`` (ops and its fault log) to ``path``; return it."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise PlotUnavailable(
            "the timeline plot needs matplotlib: pip install 'shmkv[bench]'"
        ) from None
    ops = h.ops
    end = max([o.complete or o.invoke for o in ops] + [f.get("t1") or f["t0"] for f in h.faults] + [1.0])
    fig, (ax_f, ax_t, ax_l) = plt.subplots(
        3, 1, figsize=(11, 7), sharex=True, gridspec_kw={"height_ratios": [1, 2, 2]}
    )
    nodes = sorted({f["node"] for f in h.faults if f.get("node")})
    for f in h.faults:
        y = nodes.index(f["node"]) if f.get("node") in nodes else 0
        t1 = f.get("t1") or end
        ax_f.broken_barh([(f["t0"], t1 - f["t0"])], (y - 0.35, 0.7),
                         color={"kill": "tab:red", "pause": "tab:purple"}.get(f["kind"], "tab:gray"))
        ax_f.text(f["t0"], y, f["kind"], fontsize=7, va="center")
    ax_f.set_yticks(range(len(nodes)), nodes)
    ax_f.set_ylabel("faults")
    nb = int(end / bucket) + 1
    for outcome in (OK, UNKNOWN, FAIL):
        c = Counter(int((o.complete or o.invoke) / bucket) for o in ops if o.outcome == outcome)
        ax_t.plot([i * bucket for i in range(nb)], [c.get(i, 0) / bucket for i in range(nb)],
                  color=COLORS[outcome], label=outcome, lw=1)
    ax_t.set_ylabel("ops/s")
    ax_t.legend(loc="upper right", fontsize=8)
    for outcome in (OK, UNKNOWN, FAIL):
        pts = [(o.invoke, (o.complete - o.invoke) * 1e3) for o in ops
               if o.outcome == outcome and o.complete is not None and o.complete > o.invoke]
        if pts:
            ax_l.scatter([p[0] for p in pts], [p[1] for p in pts], s=3, color=COLORS[outcome], label=outcome)
    ax_l.set_yscale("log")
    ax_l.set_ylabel("latency (ms)")
    ax_l.set_xlabel("seconds since the run began")
    title = f"shmkv torture: {len(ops)} ops"
    if "seed" in h.meta:
        title += f", seed {h.meta['seed']}"
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
