"""``python -m core bench world``: what tracing the UEs in a realistic world costs against the oracle world.

``make-dataset --world realistic`` traces every report in a perturbed copy of the scene (materials,
heights, removed buildings, vehicles, sites, tilt, diffuse scattering: :mod:`core.raytracing.world`)
while the oracle world traces in the map's own scene. Both are timed here in ONE process on the same
walks (same ``--seed``, same map), after an untimed warm-up of each world, in the order oracle, realistic, realistic, oracle (``--repeats``
times that pair of pairs), so a machine whose load drifts during the run weighs on both worlds
alike. Reported: wall time per world (mean over its runs, and each run), CPU time of the process
(all its threads: less sensitive than wall time to other work on the machine), reports per second,
and the ratios realistic / oracle, the figure issue 17 bounds (≤ 1.5×).

    python -m core bench world --scene etoile --ues 2000 --reports 8
"""

from __future__ import annotations

import argparse
import time

from core import cli_types


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--scene", default="etoile", help="scene whose map is in --radio-maps")
    parser.add_argument("--radio-maps", default="radio_maps", help="maps folder (the map is read, never written)")
    parser.add_argument("--ues", type=cli_types.count, default=2000, help="UE walks per timed dataset")
    parser.add_argument("--reports", type=cli_types.count, default=8, help="reports per walk")
    parser.add_argument("--seed", type=cli_types.seed, default=0, help="walks' seed (the same in both worlds)")
    parser.add_argument("--world-seed", type=cli_types.seed, default=0, help="the realistic world's seed")
    parser.add_argument("--repeats", type=cli_types.count, default=1,
                        help="times the order oracle, realistic, realistic, oracle is run")


def run(args: argparse.Namespace) -> int:
    from dataclasses import replace

    import numpy as np

    from core.benchmarks.report import write_report
    from core.raytracing.measurements import make_dataset
    from core.stores.measurement_model import MeasurementModel
    from core.stores.world_model import PRESETS

    worlds = {"oracle": PRESETS["oracle"], "realistic": replace(PRESETS["realistic"], seed=args.world_seed)}
    times: dict[str, list[float]] = {name: [] for name in worlds}
    cpu: dict[str, list[float]] = {name: [] for name in worlds}
    present: dict[str, float] = {}
    for world in worlds.values():  # untimed warm-up: scene loading and the tracer's first compilation
        make_dataset(args.scene, 2, 1, radio_maps=args.radio_maps, seed=args.seed, model=MeasurementModel(world=world))
    for name in ["oracle", "realistic", "realistic", "oracle"] * args.repeats:
        t0, c0 = time.perf_counter(), time.process_time()
        ds = make_dataset(args.scene, args.ues, args.reports, radio_maps=args.radio_maps, seed=args.seed,
                          model=MeasurementModel(world=worlds[name]))
        times[name].append(time.perf_counter() - t0)
        cpu[name].append(time.process_time() - c0)
        present[name] = float(ds.report_mask.mean())
    n = args.ues * args.reports
    rows = [{"world": name, "runs": len(t), "wall_s": float(np.mean(t)), "wall_s_min": float(np.min(t)),
             "wall_s_each": " / ".join(f"{x:.1f}" for x in t), "cpu_s": float(np.mean(cpu[name])),
             "reports_per_s": n / float(np.mean(t)), "reports_present": present[name]} for name, t in times.items()]
    ratio = rows[1]["wall_s"] / rows[0]["wall_s"]
    summary = {"scene": args.scene, "walks": args.ues, "reports_per_walk": args.reports,
               "realistic_over_oracle": ratio, "target": "<= 1.5",
               "realistic_over_oracle_cpu": rows[1]["cpu_s"] / rows[0]["cpu_s"],
               "world": worlds["realistic"].summary()}
    write_report("world", rows, args.out, summary)
    return 0
