"""Draws the overhead benchmark's chart: added latency against concurrency, one panel per scenario.

    bench/.work/plot-venv/bin/python bench/chart.py POINTS.json OUT.png

Run by bench/gateway_overhead.py with the python of a virtualenv holding matplotlib (which
is not a project dependency), so it imports nothing from the project. POINTS.json:
{"title": str, "points": [{"scenario", "concurrency", "target", "p50", "p99"}, ...]}.
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path
from typing import Any

STYLE = {
    "strata-http": ("tab:blue", "o"),
    "strata-grpc": ("tab:green", "s"),
    "strata-http+otel": ("tab:cyan", "o"),
    "strata-grpc+otel": ("tab:olive", "s"),
    "litellm-1w": ("tab:red", "^"),
    "litellm-2w": ("tab:orange", "v"),
}


def main(points_path: str, out_path: str) -> None:
    matplotlib: Any = importlib.import_module("matplotlib")
    matplotlib.use("Agg")
    plt: Any = importlib.import_module("matplotlib.pyplot")
    document = json.loads(Path(points_path).read_text())
    points = document["points"]
    scenarios = list(dict.fromkeys(p["scenario"] for p in points))
    columns = min(3, max(1, len(scenarios)))
    rows = -(-len(scenarios) // columns)
    figure, axes = plt.subplots(
        rows, columns, figsize=(5.2 * columns, 3.8 * rows), squeeze=False, sharex=True
    )
    for index, scenario in enumerate(scenarios):
        axis = axes[index // columns][index % columns]
        for target, (colour, marker) in STYLE.items():
            mine = sorted(
                (p for p in points if p["scenario"] == scenario and p["target"] == target),
                key=lambda p: p["concurrency"],
            )
            if not mine:
                continue
            xs = [p["concurrency"] for p in mine]
            axis.plot(
                xs, [p["p50"] for p in mine], color=colour, marker=marker, label=f"{target} p50"
            )
            axis.plot(
                xs, [p["p99"] for p in mine], color=colour, marker=marker, linestyle=":",
                alpha=0.6, label=f"{target} p99",
            )  # fmt: skip
        axis.set_title(scenario)
        axis.set_xscale("log", base=2)
        axis.set_xticks(sorted({p["concurrency"] for p in points}))
        axis.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        axis.axhline(0, color="grey", linewidth=0.8)
        axis.set_xlabel("concurrency")
        axis.set_ylabel("added latency, ms")
        axis.grid(True, alpha=0.3)
    for index in range(len(scenarios), rows * columns):
        axes[index // columns][index % columns].axis("off")
    handles, labels = axes[0][0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="lower center", ncol=4, fontsize="small")
    figure.suptitle(document["title"])
    figure.tight_layout(rect=(0, 0.1, 1, 0.96))
    figure.savefig(out_path, dpi=110)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
