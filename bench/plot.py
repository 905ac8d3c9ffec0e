"""Plot bench JSON: req/s and p99 per contender and scenario, on linear
axes, each bar the median of the rounds and its whisker their spread (the
lowest and highest round).

python bench/plot.py bench/results/latest.json docs/performance.png
"""

from __future__ import annotations

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

CONTENDERS = ["direct", "nginx", "minimal", "authproxy", "authproxy_log", "authproxy_1worker"]
COLOURS = {"direct": "#999999", "nginx": "#2ca02c", "minimal": "#1f77b4", "authproxy": "#d62728",
           "authproxy_log": "#ff7f0e", "authproxy_1worker": "#ff9896"}  # fmt: skip
SCENARIOS = ("get", "post_16k", "c1000", "paced", "workers_2")


def spread(median: float, rounds: list[float | None]) -> tuple[float, float]:
    values = [v for v in rounds if v is not None] or [median]
    return median - min(values), max(values) - median


def main(source: str, target: str) -> None:
    data = json.load(open(source))
    scenarios = [s for s in SCENARIOS if s in data["scenarios"]]
    fig, (rps_ax, p99_ax) = plt.subplots(2, 1, figsize=(12, 8))
    width = 0.14
    for i, contender in enumerate(CONTENDERS):
        xs, rps, p99, rps_err, p99_err = [], [], [], [[], []], [[], []]
        for j, scenario in enumerate(scenarios):
            entry = data["scenarios"][scenario].get(contender)
            if isinstance(entry, dict) and entry.get("rps"):
                xs.append(j + (i - 2.5) * width)
                rps.append(entry["rps"])
                p99.append(entry["p99_ms"] or 0)
                for errors, (low, high) in (
                    (rps_err, spread(entry["rps"], entry.get("rounds_rps", []))),
                    (p99_err, spread(entry["p99_ms"] or 0, entry.get("rounds_p99_ms", []))),
                ):
                    errors[0].append(low)
                    errors[1].append(high)
        if xs:
            colour = COLOURS[contender]
            rps_ax.bar(xs, rps, width, yerr=rps_err, capsize=2, label=contender, color=colour)
            p99_ax.bar(xs, p99, width, yerr=p99_err, capsize=2, label=contender, color=colour)
    for ax, title in ((rps_ax, "requests/s (median of rounds; whiskers: lowest and highest)"),
                      (p99_ax, "p99 latency, ms (median of rounds; whiskers: lowest and highest)")):  # fmt: skip
        ax.set_xticks(range(len(scenarios)), scenarios)
        ax.set_title(title, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    rps_ax.legend(fontsize=8)
    fig.suptitle(f"authproxy bench, {data['date']}, {data['machine']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(target, dpi=110)
    print(f"wrote {target}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
