"""The timeline of a run as a PNG: faults per node, throughput by outcome, latency per op.

matplotlib is optional (the ``bench`` extra): :func:`timeline` raises :class:`PlotUnavailable`
naming the install command when it is missing, and the runner then skips the plot.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from ..errors import Error
from .history import FAIL, OK, UNKNOWN, History

COLORS = {OK: "tab:green", FAIL: "tab:red", UNKNOWN: "tab:orange"}


class PlotUnavailable(Error):
    """matplotlib is not installed."""


#: the three panels, top to bottom, by their y labels
PANELS = ("faults", "ops/s", "latency (ms)")


def timeline(h: History, path: str | Path, bucket: float = 0.25) -> Path:
    """Write the timeline of ``h`` (ops and its fault log) to ``path``; return it."""
    fig = figure(h, bucket)  # raises PlotUnavailable before anything imports pyplot
    import matplotlib.pyplot as plt

    path = Path(path)
    try:
        fig.savefig(path, dpi=110)
    finally:
        plt.close(fig)
    return path


def figure(h: History, bucket: float = 0.25) -> Any:
    """The timeline's matplotlib Figure: three panels sharing the time axis (:data:`PANELS`) --
    a bar per fault on its node's row, ops/s per outcome, each op's latency. The caller saves
    and closes it (:func:`timeline` does)."""
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
                         color={"kill": "tab:red", "pause": "tab:purple", "scale": "tab:blue"}.get(f["kind"], "tab:gray"))
        ax_f.text(f["t0"], y, f["kind"], fontsize=7, va="center")
    ax_f.set_yticks(range(len(nodes)), nodes)
    ax_f.set_ylabel(PANELS[0])
    nb = int(end / bucket) + 1
    for outcome in (OK, UNKNOWN, FAIL):
        c = Counter(int((o.complete or o.invoke) / bucket) for o in ops if o.outcome == outcome)
        ax_t.plot([i * bucket for i in range(nb)], [c.get(i, 0) / bucket for i in range(nb)],
                  color=COLORS[outcome], label=outcome, lw=1)
    ax_t.set_ylabel(PANELS[1])
    ax_t.legend(loc="upper right", fontsize=8)
    for outcome in (OK, UNKNOWN, FAIL):
        pts = [(o.invoke, (o.complete - o.invoke) * 1e3) for o in ops
               if o.outcome == outcome and o.complete is not None and o.complete > o.invoke]
        if pts:
            ax_l.scatter([p[0] for p in pts], [p[1] for p in pts], s=3, color=COLORS[outcome], label=outcome)
    ax_l.set_yscale("log")
    ax_l.set_ylabel(PANELS[2])
    ax_l.set_xlabel("seconds since the run began")
    title = f"shmkv torture: {len(ops)} ops"
    if "seed" in h.meta:
        title += f", seed {h.meta['seed']}"
    fig.suptitle(title)
    fig.tight_layout()
    return fig
