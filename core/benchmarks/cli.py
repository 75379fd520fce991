"""``python -m core bench {physics,maps,train,localize,inference,world}``.

Each benchmark module provides ``add_arguments(parser)`` and ``run(args) -> int`` and
reports through :func:`core.benchmarks.report.write_report`.
"""

from __future__ import annotations

import argparse
import importlib

from core.cli_types import Parser

BENCHMARKS: dict[str, tuple[str, str]] = {
    "physics": ("core.benchmarks.physics", "lookup, physics loss, likelihood and MAP search vs bare grid_sample"),
    "maps": ("core.benchmarks.maps", "radio-map generation time, map fidelity and dataset time"),
    "train": ("core.benchmarks.train", "epoch time with and without the physics loss"),
    "localize": ("core.benchmarks.localize", "localize: time and peak memory against the report file's size"),
    "inference": ("core.benchmarks.inference", "network (or an ensemble) and MAP search: ms per sample on a run's walks"),
    "world": ("core.benchmarks.world", "make-dataset in the realistic world vs the oracle world, same walks, one run"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("benchmark", choices=list(BENCHMARKS), help="which benchmark to run")
    parser.add_argument("--out", default=None, help="JSON output path (default: bench_results/<name>.json)")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm bars (also after the benchmark's name)")
    parser.add_argument("bench_args", nargs=argparse.REMAINDER, help="options of that benchmark (see bench NAME -h)")


def run(args: argparse.Namespace) -> int:
    module = importlib.import_module(BENCHMARKS[args.benchmark][0])
    parser = Parser(prog=f"python -m core bench {args.benchmark}", description=BENCHMARKS[args.benchmark][1])
    module.add_arguments(parser)
    parser.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    sub_args = parser.parse_args(args.bench_args)
    sub_args.device = args.device
    sub_args.out = args.out or f"bench_results/{args.benchmark}.json"
    return int(module.run(sub_args) or 0)
