"""``python -m core merge-datasets --datasets A B [...] --out C``: more walks of one world in one store.

Two datasets traced with the same scene, sites, radio map, propagation, measurement model and world
(``--world-seed``), but different walk seeds (``make-dataset --seed``), hold independent walks of the
same world. Merged, they are one training set of ``N_A + N_B + ...`` walks:

* **the first dataset's split is kept** and every walk of the others joins its train split, so the
  first's val and test walks stay the yardstick: figures on the merged store compare, UE for UE, with
  figures on the first one;
* the arrays are concatenated in the order given (``[N_A + N_B, ...]``; shapes as in
  :mod:`core.stores.dataset`); the attrs are the first's, plus ``attrs["merged_from"]``: each input's
  path, lineage id, digest, seed and walk count, and how the split was made;
* everything that makes two datasets the same world must match, or the command refuses with one line
  naming the first difference, before anything is written: every attr but the walk seed and the
  generator's record (so scene, sites, propagation, measurement model with its world and motion, walk
  settings), the radio map's lineage, reports and site slots per walk, and the arrays present. The walk
  seeds must differ (the same seed retraces the same walks).

The output is written atomically under its writer's lock; ``--force`` replaces only a dataset store.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from core.errors import CoreError
from core.stores.dataset import SPLITS, MeasurementDataset

#: the only attrs two datasets of one world may differ in (every other attr must be equal): the walk
#: seed, the generator's record (timings) and an earlier merge's record
MAY_DIFFER: tuple[str, ...] = ("seed", "generator", "merged_from")

#: the arrays concatenated (besides the optional ``clean_*`` and ``motion``)
_FIELDS: tuple[str, ...] = ("ue_xyz", "t", "report_mask", "site_ids", "site_features", "cell_features", "los")
_OPTIONAL: tuple[str, ...] = ("clean_site_features", "clean_cell_features", "motion")


def _check_same_world(first: MeasurementDataset, other: MeasurementDataset) -> None:
    a, b = first.attrs, other.attrs
    for key in sorted((set(a) | set(b)) - set(MAY_DIFFER)):
        if a.get(key) != b.get(key):
            raise CoreError(f"{other.source} and {first.source} differ in attrs[{key!r}]: not walks of one world")
    lineage = lambda ref: (ref.id, ref.digest) if ref else None  # noqa: E731
    if lineage(first.radio_map_ref) != lineage(other.radio_map_ref):
        raise CoreError(f"{other.source} and {first.source} were made with different radio maps (lineage)")
    if first.ue_xyz.shape[1:] != other.ue_xyz.shape[1:] or first.site_ids.shape[2:] != other.site_ids.shape[2:]:
        raise CoreError(f"{other.source} has {other.num_reports} reports x {other.num_sites_per_report} site slots "
                        f"per walk, {first.source} {first.num_reports} x {first.num_sites_per_report}")
    for name in _OPTIONAL:
        if (getattr(first, name) is None) != (getattr(other, name) is None):
            raise CoreError(f"{other.source} and {first.source} differ in whether they hold {name!r}")


def merge_datasets(datasets: list[MeasurementDataset]) -> MeasurementDataset:
    """One dataset of the walks of ``datasets`` (>= 2, walks of one world; see the module doc), in order:
    the first's split, every other walk in train, ``attrs["merged_from"]`` recording the inputs."""
    if len(datasets) < 2:
        raise CoreError("merge-datasets needs at least two datasets")
    first = datasets[0]
    seeds = set()
    for ds in datasets:
        if ds.attrs.get("seed") in seeds:
            raise CoreError(f"{ds.source}: walk seed {ds.attrs.get('seed')!r} is given twice: its walks repeat "
                            "(make it with another make-dataset --seed)")
        seeds.add(ds.attrs.get("seed"))
        if ds is not first:
            _check_same_world(first, ds)
    cat = {name: np.concatenate([getattr(ds, name) for ds in datasets]) for name in _FIELDS}
    for name in _OPTIONAL:
        cat[name] = None if getattr(first, name) is None else np.concatenate([getattr(ds, name) for ds in datasets])
    split = np.concatenate([first.split] + [np.full(ds.num_samples, SPLITS["train"], np.int8) for ds in datasets[1:]])
    attrs = dict(first.attrs)
    attrs["merged_from"] = {
        "split": "the first dataset's split; every walk of the others in train",
        "datasets": [{"path": ds.source, "id": ds.lineage.id if ds.lineage else None,
                      "digest": ds.lineage.digest if ds.lineage else None, "seed": ds.attrs.get("seed"),
                      "num_samples": ds.num_samples} for ds in datasets],
    }
    return MeasurementDataset(**{n: cat[n] for n in _FIELDS}, split=split, attrs=attrs,
                              clean_site_features=cat["clean_site_features"],
                              clean_cell_features=cat["clean_cell_features"], motion=cat["motion"],
                              radio_map_ref=first.radio_map_ref)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--datasets", nargs="+", required=True, metavar="DATASET",
                        help="two or more datasets of one world (same scene, map, measurement model and "
                             "--world-seed, different --seed); the first's val and test splits are kept")
    parser.add_argument("--out", required=True, help="the merged dataset store to write")
    parser.add_argument("--force", action="store_true", help="replace --out if it is a dataset store")


def run(args: argparse.Namespace) -> int:
    from core.stores.output import check_new, check_writable, writing_store

    out = Path(args.out)
    inputs = [Path(p) for p in args.datasets]
    if any(p.resolve() == out.resolve() for p in inputs):
        raise CoreError(f"--out {out} is one of --datasets: write the merge to a new store")
    check_writable(out, "--out")
    check_new(out, args.force)
    merged = merge_datasets([MeasurementDataset.load(p) for p in inputs])  # validated before any write
    with writing_store(out, "measurement_dataset", args.force):
        merged.save(out)
    counts = {name: int((merged.split == code).sum()) for name, code in SPLITS.items()}
    print(f"wrote {out}: {merged.num_samples} UEs x {merged.num_reports} reports from {len(inputs)} datasets; "
          + ", ".join(f"{name} {count}" for name, count in counts.items()))
    return 0
