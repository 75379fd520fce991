"""How many labelled walks in the world does calibration need? (issue 17, item 5; docs/world.md)

    PYTHONPATH=. .venv/bin/python scripts/calibration_walks.py --dataset /tmp/etoile-realistic \
        --oracle /tmp/etoile-oracle --walks 10 30 100 300 --test 50

The likelihood's per site x feature bias and scale (core/physics/calibration.py) are calibrated
at the truth from labelled walks of the dataset's train split. For each ``--walks N`` (walks
drawn without replacement, seed 0; ``all``: the whole train split) this calibrates on N walks of
``--dataset`` and prints, per site feature, the median over sites of |bias_N - bias_ref| and of
scale_N / scale_ref, with ``ref`` the calibration on every HELD-OUT walk (val and test: the
world's mismatch as unseen UEs see it), and the held-out median / P90 of exhaustive map matching
(core/physics/exhaustive.py) with that calibration. ``--oracle DATASET`` adds the row "0 (oracle
world)": the calibration of a dataset traced in the map itself, i.e. what one has without a
single labelled walk in the world; and the row "oracle world, own calibration": that dataset's
own held-out UEs with it (what the same method reaches when the world is the map).
"""

import argparse

import numpy as np

from core.learning.baselines import exhaustive_map_matching
from core.physics.calibration import SITE_FEATURES, calibrate
from core.physics.likelihood import RobustLikelihood
from core.stores.dataset import MeasurementDataset
from core.stores.lineage import map_path
from core.stores.radio_map import RadioMap


def held_out(ds) -> np.ndarray:
    return np.sort(np.concatenate([ds.indices("val"), ds.indices("test")]))


def row(label, cal, ref, ds, rmap, test) -> dict:
    lik = RobustLikelihood(rmap, cal, device="cpu")
    xy = exhaustive_map_matching(ds, lik, test)
    err = np.linalg.norm(xy - ds.ue_xyz[test, -1, :2], axis=1)
    out = {"walks": label, "median_m": float(np.median(err)), "p90_m": float(np.quantile(err, 0.9))}
    for f, name in enumerate(SITE_FEATURES):
        ok = (cal.count[:, f] > 0) & (ref.count[:, f] > 0)
        db = np.abs(cal.bias[ok, f] - ref.bias[ok, f])
        if name == "aoa":
            db = np.abs((db + 180.0) % 360.0 - 180.0)
        out[f"{name}_bias_err"] = float(np.median(db)) if ok.any() else float("nan")
        out[f"{name}_scale_ratio"] = float(np.median(cal.scale[ok, f] / ref.scale[ok, f])) if ok.any() else float("nan")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", required=True, help="a dataset traced in a world other than the map")
    parser.add_argument("--oracle", default=None, help="the same scene's dataset in the oracle world (row 0)")
    parser.add_argument("--radio-maps", default="radio_maps")
    parser.add_argument("--walks", nargs="+", default=["10", "30", "100", "300", "all"])
    parser.add_argument("--test", type=int, default=100, help="held-out UEs localized per row (the first N)")
    args = parser.parse_args()
    ds = MeasurementDataset.load(args.dataset)
    rmap = RadioMap.load(map_path(args.radio_maps, ds.attrs["scene"]))
    test = held_out(ds)
    ref = calibrate(ds.subset(test), rmap, split=None)
    test = test[: args.test]
    rows = []
    if args.oracle:
        oracle = MeasurementDataset.load(args.oracle)
        own = calibrate(oracle, rmap, split="train")
        rows.append(row("oracle world, own calibration", own, calibrate(oracle.subset(held_out(oracle)), rmap,
                                                                        split=None), oracle, rmap,
                        held_out(oracle)[: args.test]))
        rows.append(row("0 (oracle world)", own, ref, ds, rmap, test))
    n_train = len(ds.indices("train"))
    for w in args.walks:
        n = n_train if w == "all" else min(int(w), n_train)
        rows.append(row(f"{n}" + (" (all)" if n == n_train else ""), calibrate(ds, rmap, split="train", walks=n),
                        ref, ds, rmap, test))
    print(f"dataset {args.dataset}: {ds.measurement_model.world.summary() if ds.measurement_model else 'no record'}")
    print(f"reference: the calibration on all {len(held_out(ds))} held-out walks (val + test); localized: "
          f"{len(test)} of them")
    head = ["walks", "median_m", "p90_m"] + [f"{n}_{k}" for n in SITE_FEATURES for k in ("bias_err", "scale_ratio")]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        print("| " + " | ".join(str(r[k]) if k == "walks" else f"{r[k]:.3g}" for k in head) + " |")


if __name__ == "__main__":
    main()
