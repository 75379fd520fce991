"""``python -m core bench inference``: what localizing one sample costs, network and MAP search, on a run's walks.

Issue 19 bounds the cost per sample, batched on the 2-core CPU: the network at most 1 ms, network + MAP at
most 2 ms. With several ``--runs`` the network is an ENSEMBLE (:mod:`core.learning.ensemble`: one pass per
member, their estimates pooled), as MAP's prior. Timed on the first ``--samples`` walks of ``--split`` of the
first run's dataset, as ``evaluate`` runs them:

* each member's :func:`~core.learning.inference.predict` (the whole call: its tensors, the network's passes,
  the outputs) at every batch size of ``--batch-sizes``;
* the MAP search (:func:`~core.learning.inference.refine_prediction`, the first run's likelihood and search
  with ``--scan-starts`` starts from the exact scan, the prior's scale and floor of ``--prior-sigma-scale`` and
  ``--prior-min-sigma``, as ``scripts/ensemble_prior.py`` chose them on val) after the pooled prediction,
  and after the first member's alone.

The stages run in turn, ``--repeats`` times, each figure the median over the repeats (after an untimed
warm-up: the calibration and the search's tables are made once per run). Reported per sample: wall time and
the process's CPU time (all threads; a loaded machine inflates wall time, not CPU time, so the targets are
judged on CPU time, and with one thread per run the two agree on an idle machine). Rows: every member, the
network (the members' sum), the MAP search and network + MAP, per batch size; summary: those at the default
batch size (:data:`~core.learning.inference.PREDICT_BATCH`) against the targets, and one network + MAP beside.

    python -m core bench inference --runs runs/A,runs/B,runs/C --samples 2000
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace

from core import cli_types

NETWORK_MS_TARGET = 1.0
NETWORK_MAP_MS_TARGET = 2.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--runs", default="assets/default_run",
                        help="run directories, comma-separated: several are an ensemble (default: %(default)s)")
    parser.add_argument("--split", default="test", choices=("train", "val", "test"))
    parser.add_argument("--samples", type=cli_types.count, default=2000, help="walks timed (the split's first)")
    parser.add_argument("--batch-sizes", type=cli_types.counts, default=[],
                        help="network batch sizes, comma-separated (default: the default batch size only)")
    parser.add_argument("--repeats", type=cli_types.count, default=3, help="times every stage is timed")
    parser.add_argument("--scan-starts", type=cli_types.integer(0, 64), default=None, metavar="N",
                        help="the MAP search's starts from the exact scan (as evaluate --scan-starts; default: the "
                             "first run's physics_loss.refinement.scan_starts)")
    parser.add_argument("--prior-sigma-scale", type=cli_types.positive, default=None, metavar="S",
                        help="the prior's sigma times S (default: the first run's refinement.prior_sigma_scale)")
    parser.add_argument("--prior-min-sigma", type=cli_types.positive, default=None, metavar="M",
                        help="the prior's sigma floor [m] (default: the first run's refinement.prior_min_sigma_m)")


def _timed(fn):
    """``(result, wall s, cpu s)`` of ``fn()``."""
    w0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w0, time.process_time() - c0


def run(args: argparse.Namespace) -> int:
    from core import resolve_path
    from core.benchmarks.report import write_report
    from core.errors import CoreError
    from core.learning.ensemble import check_members, pool
    from core.learning.inference import PREDICT_BATCH, load_run, map_search_config, predict, refine_prediction

    paths = [p for p in args.runs.split(",") if p]
    for p in paths:
        if not resolve_path(p).is_dir():
            raise CoreError(f"--runs: {p}: no such run directory")
    runs = [load_run(resolve_path(p)) for p in paths]
    check_members(runs)
    first = runs[0]
    default = PREDICT_BATCH.get(first.device.type, 1024)
    sizes = [default, *(b for b in args.batch_sizes if b != default)]
    idx = first.dataset.indices(args.split)[: args.samples]
    if len(idx) == 0:
        raise CoreError(f"bench inference: the {args.split} split of {first.dataset.path} is empty")
    n = len(idx)
    search = map_search_config(first.config)
    if args.scan_starts is not None:
        search = replace(search, scan_top=args.scan_starts)
    if args.prior_min_sigma is not None:
        search = replace(search, min_sigma_m=args.prior_min_sigma)
    scale = args.prior_sigma_scale

    for r in runs[1:]:  # warm-up, untimed: every network's first pass; the first run's calibration and tables
        predict(r, idx[:64])
    refine_prediction(first, predict(first, idx[:64]), search=search, sigma_scale=scale)
    times: dict[tuple, list[tuple[float, float]]] = {}
    for _ in range(args.repeats):
        preds = {}
        for bs in sizes:
            for m, r in enumerate(runs):
                preds[bs, m], wall, cpu = _timed(lambda r=r, bs=bs: predict(r, idx, batch_size=bs))
                times.setdefault(("member", bs, m), []).append((wall, cpu))
        ensemble = pool([preds[default, m] for m in range(len(runs))])
        for key, prediction in (("map_ensemble", ensemble), ("map_one", preds[default, 0])):
            _, wall, cpu = _timed(lambda p=prediction: refine_prediction(first, p, search=search, sigma_scale=scale))
            times.setdefault((key,), []).append((wall, cpu))

    def ms(key) -> tuple[float, float]:
        """Median wall and CPU ms per sample of ``key``."""
        rows = times[key]
        return (1000 * statistics.median(w for w, _ in rows) / n, 1000 * statistics.median(c for _, c in rows) / n)

    m_runs = len(runs)
    rows = []
    map_ens, map_one = ms(("map_ensemble",)), ms(("map_one",))
    for bs in sizes:
        members = [ms(("member", bs, m)) for m in range(m_runs)]
        net = (sum(w for w, _ in members), sum(c for _, c in members))
        for m, (w, c) in enumerate(members):
            rows.append({"batch_size": bs, "stage": f"member {m + 1} ({paths[m]})", "wall_ms": w, "cpu_ms": c})
        rows.append({"batch_size": bs, "stage": f"network ({m_runs} member{'s' * (m_runs > 1)})",
                     "wall_ms": net[0], "cpu_ms": net[1]})
        rows.append({"batch_size": bs, "stage": "network + MAP", "wall_ms": net[0] + map_ens[0],
                     "cpu_ms": net[1] + map_ens[1]})
    rows.append({"batch_size": None, "stage": "MAP search (the network's prior)", "wall_ms": map_ens[0],
                 "cpu_ms": map_ens[1]})
    if m_runs > 1:
        rows.append({"batch_size": None, "stage": "MAP search (member 1's prior)", "wall_ms": map_one[0],
                     "cpu_ms": map_one[1]})
    net_cpu = sum(ms(("member", default, m))[1] for m in range(m_runs))
    one_cpu = ms(("member", default, 0))[1]
    summary = {
        "runs": paths, "split": args.split, "scan_starts": search.scan_top,
        "prior_sigma_scale": scale or first.config.physics_loss.refinement.prior_sigma_scale,
        "prior_min_sigma_m": search.min_sigma_m, "samples": n, "repeats": args.repeats, "default_batch_size": default,
        "threads_per_run": [int(r.config.training.num_threads or 0) for r in runs], "device": str(first.device),
        "network_cpu_ms_per_sample": round(net_cpu, 4), "network_target_ms": NETWORK_MS_TARGET,
        "network_ok": bool(net_cpu <= NETWORK_MS_TARGET),
        "network_map_cpu_ms_per_sample": round(net_cpu + map_ens[1], 4), "network_map_target_ms": NETWORK_MAP_MS_TARGET,
        "network_map_ok": bool(net_cpu + map_ens[1] <= NETWORK_MAP_MS_TARGET),
    }
    if m_runs > 1:  # the ensemble against its first member alone, in the same run
        summary["one_network_map_cpu_ms_per_sample"] = round(one_cpu + map_one[1], 4)
        summary["ensemble_over_one_network_map"] = round((net_cpu + map_ens[1]) / max(one_cpu + map_one[1], 1e-12), 3)
    write_report("inference", rows, args.out, summary)
    return 0
