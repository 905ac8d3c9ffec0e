"""Markdown tables from a bench result, for docs/performance.md.

python bench/report.py bench/results/latest.json
"""

from __future__ import annotations

import json
import sys
from typing import Any

RATE_SCENARIOS = ("get", "post_16k", "c1000", "paced", "workers_2")
NOT_CONTENDERS = ("authproxy_over", "authproxy_log_over", "scaling", "machine_scaling")


def fmt(value: Any) -> str:
    return "—" if value is None else str(value)


def main(path: str) -> None:
    results = json.loads(open(path, encoding="utf-8").read())
    scenarios = results["scenarios"]
    print(f"{results['date']}, {results['machine']}; {results['rounds']} rounds of "
          f"{results['duration_s']:g} s.\n")  # fmt: skip
    print("| scenario | contender | req/s | p50 ms | p99 ms | CPU µs/req | RSS MiB | errors |")
    print("|---|---|---|---|---|---|---|---|")
    for name in RATE_SCENARIOS:
        for contender, row in scenarios.get(name, {}).items():
            if contender.startswith(NOT_CONTENDERS) or not isinstance(row, dict) or "rps" not in row:
                continue
            print(f"| {name} | {contender} | {round(row['rps'])} | {fmt(row['p50_ms'])} | "
                  f"{fmt(row['p99_ms'])} | {fmt(row['cpu_us_per_req'])} | {fmt(row['rss_mib'])} | "
                  f"{row['errors']} |")  # fmt: skip
    print("\n| scenario | authproxy / nginx | authproxy / minimal | authproxy / direct |")
    print("|---|---|---|---|")
    for name in RATE_SCENARIOS:
        summary = scenarios.get(name)
        if not summary:
            continue
        cells = []
        for other in ("nginx", "minimal", "direct"):
            ratio = summary.get(f"authproxy_over_{other}")
            cells.append(
                f"**{ratio['median']}** ({', '.join(map(str, ratio['per_round']))})"
                if ratio
                else "—"
            )
        print(f"| {name} | " + " | ".join(cells) + " |")
    print("\n| transfer, 512 MiB, one connection | contender | MiB/s | bytes arrived | "
          "peak RSS MiB (VmHWM) |")  # fmt: skip
    print("|---|---|---|---|---|")
    for name in ("download_512mib", "upload_512mib"):
        for contender, row in scenarios.get(name, {}).items():
            print(f"| {name} | {contender} | {row['mib_per_s']} | {row['bytes']} | "
                  f"{fmt(row.get('peak_rss_mib'))} |")  # fmt: skip
    storm = scenarios.get("expiry_storm", {}).get("authproxy")
    if storm:
        print(f"\nExpiry storm: {storm['requests']} requests, {storm['errors']} errors, "
              f"**{storm['mints']} mints** (the first token, and one after it was declared expired).")  # fmt: skip
    workers = scenarios.get("workers_2")
    if workers:
        print(f"Two workers over one: **{workers['scaling_2_over_1']}×**; the machine's own two-process "
              f"scaling (a CPU-bound loop, same moment): {workers.get('machine_scaling_2_over_1')}×.")  # fmt: skip
    flat = results.get("rss_flat")
    if flat:
        print(f"RSS after GET at 64 connections {flat['after_get_c64_mib']} MiB, after 1,000 "
              f"connections {flat['after_c1000_mib']} MiB. Mints over the whole run: "
              f"{results.get('mints_total')}.")  # fmt: skip


if __name__ == "__main__":
    main(sys.argv[1])
