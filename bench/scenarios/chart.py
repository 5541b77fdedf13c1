"""PNG chart of one scenario report: upstream requests/min and DB queries/min over
scenario time, direct vs gateway (matplotlib, Agg backend; imported only when a chart is
asked for, so the runner works without matplotlib). S2's phases and S3's surge are
shaded so the curves can be read against what happened."""

from __future__ import annotations

from pathlib import Path
from typing import Any

COLORS = {"direct": "#c0392b", "gateway": "#2471a3", "gateway_join_forward": "#7d3c98"}
LABELS = {"gateway_join_forward": "gateway, joins forwarded"}
PHASE_COLORS = {
    "realtime_down": "#fdebd0",
    "app_slow": "#fad7a0",
    "app_failing": "#f5b7b1",
    "recovered": "#d5f5e3",
}


def _neighbour_panel(ax: Any, rep: dict[str, Any]) -> None:
    """S3: the other webinar's viewer p95 over time (log scale), errors marked."""
    other = rep["webinars"][0]
    for side in [s for s in COLORS if s in rep and "neighbour_timeline" in rep[s]]:
        tl = rep[side]["neighbour_timeline"]
        ax.plot(
            [p["t_min"] for p in tl],
            [p["p95_ms"] for p in tl],
            label=f"{LABELS.get(side, side)}: {other} viewer p95",
            color=COLORS[side],
            linewidth=1.6,
        )
        bad = [p for p in tl if p["error_rate"]]
        if bad:
            ax.scatter(
                [p["t_min"] for p in bad],
                [p["p95_ms"] for p in bad],
                color=COLORS[side],
                marker="x",
                label=f"{LABELS.get(side, side)}: errors in the bucket",
            )
    a, b = rep["surge_window_min"]
    ax.axvspan(a, b, color="#f9e79f", alpha=0.7, lw=0)
    ax.set_yscale("log")
    ax.set_ylabel(f"{other} p95 ms (log)")
    ax.grid(True, alpha=0.3, which="both")
    ax.legend(loc="best", fontsize=9, framealpha=0.9)


def render(rep: dict[str, Any], path: Path) -> bool:
    """Write the chart; False (and a note on stderr) when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        import sys

        print(
            "matplotlib not installed: chart skipped (pip install -e '.[bench]')", file=sys.stderr
        )
        return False

    neighbour = "neighbour_timeline" in rep["direct"]
    rows = 3 if neighbour else 2
    fig, axes = plt.subplots(
        rows, 1, figsize=(10, 3.2 * rows), sharex=True, constrained_layout=True
    )
    panels = [
        ("upstream_requests_per_min", "upstream requests / min"),
        ("db_queries_per_min", "DB queries / min"),
    ]
    if neighbour:
        _neighbour_panel(axes[2], rep)
    for ax, (key, label) in zip(axes, panels, strict=False):
        for side in [s for s in COLORS if s in rep]:
            tl = rep[side]["timeline"]
            ax.plot(
                [p["t_min"] for p in tl],
                [p[key] for p in tl],
                label=f"{LABELS.get(side, side)} (mean {rep[side][key]:,.0f}/min)",
                color=COLORS[side],
                linewidth=1.6,
            )
        for ph in rep.get("phases", []):
            color = PHASE_COLORS.get(ph["name"])
            if color:
                ax.axvspan(ph["start_min"], ph["end_min"], color=color, alpha=0.6, lw=0)
        if rep.get("surge_window_min"):
            a, b = rep["surge_window_min"]
            ax.axvspan(a, b, color="#f9e79f", alpha=0.7, lw=0)
        ax.set_ylabel(label)
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
        ax.legend(loc="best", fontsize=9, framealpha=0.9)
    top = axes[0]
    for ph in rep.get("phases", []):
        if ph["name"] in PHASE_COLORS:
            # Above the plot area (x in data, y in axes units): never under a legend.
            top.text(
                (ph["start_min"] + ph["end_min"]) / 2,
                1.01,
                ph["name"].replace("_", " "),
                ha="center",
                va="bottom",
                fontsize=8,
                color="#555",
                transform=top.get_xaxis_transform(),
            )
    if rep.get("surge_window_min"):
        top.text(
            rep["surge_window_min"][0],
            1.01,
            f"surge +{rep['surge_viewers']} ({rep['webinars'][-1]})",
            ha="left",
            va="bottom",
            fontsize=8,
            color="#555",
            transform=top.get_xaxis_transform(),
        )
    axes[-1].set_xlabel(
        f"scenario minutes (time scale {rep['time_scale']:g}: 1 wall s = {rep['time_scale']:g} s)"
    )
    title = (
        f"{rep['scenario'].upper()}: {rep['viewers']:,} viewers"
        + (f" + {rep['surge_viewers']} surge" if rep.get("surge_viewers") else "")
        + (" (quick)" if rep["quick"] else "")
        + " — direct vs through EventLive Edge"
    )
    track = rep.get("gateway_access_track_forward_s", 900.0)
    if track != 900.0:
        title += f" (access_track window {track:g} s)"
    fig.suptitle(title, fontsize=12)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
