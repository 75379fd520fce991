"""The README's both-worlds tables from two ``scripts/seed_comparison.py --json`` files.

    PYTHONPATH=. .venv/bin/python scripts/worlds_table.py docs/results/seeds_oracle.json docs/results/seeds_realistic.json

Prints markdown: every method in the oracle and the realistic world (mean over seeds of the median,
its sd, P90, RMSE, the share beyond 20 m), the median per UE group (LOS / NLOS at the latest present
report, sites heard) in both worlds, and the paired two-level bootstrap CIs of the comparisons that
decide whether the network earns its place.
"""

import argparse
import json

NAMES = {"model": "network alone", "model_refined": "network + MAP", "model_walk": "network + whole-walk",
         "whole-walk": "whole-walk, no network", "exhaustive": "map matching, exhaustive (no network)",
         "multilateration": "multilateration (tuned, same window)", "ml": "ML map matching", "knn": "kNN fingerprinting"}
ORDER = ["model", "model_refined", "model_walk", "whole-walk", "exhaustive", "multilateration", "ml", "knn"]
GROUPS = [("los", "LOS"), ("nlos", "NLOS"), ("sites_1", "1 site"), ("sites_2", "2 sites"), ("sites_3", "3 sites"),
          ("sites_4+", "≥ 4 sites")]
DELTAS = [("model_refined", "exhaustive"), ("model_refined", "whole-walk"), ("model_walk", "whole-walk"),
          ("model_walk", "exhaustive"), ("model_refined", "multilateration")]


def _key(methods: dict, short: str) -> str | None:
    return short if short in methods else None


def _f(v: float) -> str:
    return f"{v:#.3g}" if abs(v) < 10 else f"{v:.0f}" if abs(v) >= 100 else f"{v:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("oracle")
    parser.add_argument("realistic")
    args = parser.parse_args()
    worlds = {"oracle": json.load(open(args.oracle)), "realistic": json.load(open(args.realistic))}
    print("| method | oracle: median m (± sd over seeds) | P90 m | RMSE m | > 20 m | realistic: median m | P90 m | RMSE m | > 20 m |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for short in ORDER:
        cells = []
        for res in worlds.values():
            key = _key(res["methods"], short)
            if key is None:
                cells += ["–"] * 4
                continue
            m = res["methods"][key]
            sd = f" ± {m['median_m_sd']:.2f}" if m.get("median_m_sd") else ""
            cells += [f"{_f(m['median_m'])}{sd}", _f(m["p90_m"]), _f(m["rmse_m"]), (f"{100 * m['beyond_20m']:.2f} %" if m["beyond_20m"] < 0.02 else f"{100 * m['beyond_20m']:.1f} %")]
        print(f"| {NAMES[short]} | " + " | ".join(cells) + " |")
    print()
    for world, res in worlds.items():
        counts = res["groups"]
        print(f"Median m by group, {world} world (UEs: " + ", ".join(f"{label} {counts[g]}" for g, label in GROUPS) + "):")
        print()
        print("| method | " + " | ".join(label for _, label in GROUPS) + " |")
        print("|---|" + "---:|" * len(GROUPS))
        for short in ORDER:
            key = _key(res["methods"], short)
            if key is None:
                continue
            g = res["methods"][key]["groups"]
            print(f"| {NAMES[short]} | " + " | ".join(_f(g[k]["median_m"]) for k, _ in GROUPS) + " |")
        print()
    print("| Δ median, paired two-level bootstrap 95 % CI (seeds, then UEs) | oracle: all | NLOS | 1 site "
          "| realistic: all | NLOS | 1 site |")
    print("|---|---|---|---|---|---|---|")
    for a, b in DELTAS:
        cells = []
        for res in worlds.values():
            ka, kb = _key(res["methods"], a), _key(res["methods"], b)
            for group in ("all", "nlos", "sites_1"):
                d = next((d for d in res["deltas"] if d["method"] == ka and d["other"] == kb and d["group"] == group
                          and d.get("metric", "median_m") == "median_m"), None)
                cells.append("–" if d is None else f"{d['delta']:+.2f} [{d['ci_low']:+.2f}, {d['ci_high']:+.2f}]")
        print(f"| {NAMES[a]} − {NAMES[b]} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
