"""Plot bench JSON: req/s and p99 per contender and scenario.

python bench/plot.py bench/results/latest.json docs/performance.png
"""

from __future__ import annotations

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

CONTENDERS = ["direct", "nginx", "minimal", "authproxy", "authproxy_aiohttp", "authproxy_1worker"]
COLOURS = {"direct": "#999999", "nginx": "#2ca02c", "minimal": "#1f77b4", "authproxy": "#d62728",
           "authproxy_aiohttp": "#9467bd", "authproxy_1worker": "#ff9896"}  # fmt: skip


def main(source: str, target: str) -> None:
    data = json.load(open(source))
    scenarios = [s for s in ("get", "post_16k", "c1000", "workers_2") if s in data["scenarios"]]
    fig, (rps_ax, p99_ax) = plt.subplots(1, 2, figsize=(13, 4.8))
    width = 0.14
    for i, contender in enumerate(CONTENDERS):
        xs, rps, p99 = [], [], []
        for j, scenario in enumerate(scenarios):
            entry = data["scenarios"][scenario].get(contender)
            if isinstance(entry, dict) and entry.get("rps"):
                xs.append(j + (i - 2.5) * width)
                rps.append(entry["rps"])
                p99.append(entry["p99_ms"] or 0)
        if xs:
            rps_ax.bar(xs, rps, width, label=contender, color=COLOURS[contender])
            p99_ax.bar(xs, p99, width, label=contender, color=COLOURS[contender])
    for ax, title in ((rps_ax, "requests/s (median of rounds)"), (p99_ax, "p99 latency, ms (log)")):
        ax.set_xticks(range(len(scenarios)), scenarios)
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
    rps_ax.set_yscale("log")
    p99_ax.set_yscale("log")
    rps_ax.legend(fontsize=8)
    fig.suptitle(f"authproxy bench, {data['date']}, {data['machine']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(target, dpi=110)
    print(f"wrote {target}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
