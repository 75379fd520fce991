"""An ensemble of trained networks as one prediction: MAP's prior from ``M`` independently trained runs.

Each member ``m`` gives a Gaussian estimate ``N(mu_m, sigma_m^2)`` per axis; the ensemble is their equal-weight
mixture, summarised by its first two moments::

    mu      = mean_m mu_m                                   [N, 2] m
    sigma^2 = mean_m sigma_m^2 + mean_m (mu_m - mu)^2       [N, 2] m^2   (within + between the members)

The rest of the prediction (the search starts ``coarse_xy``, groups, truth) is the FIRST member's. Members must
read the same dataset and map (so their samples, truth and likelihood are the same). Cost: one network pass per
member. Measured (realistic etoile, three 60-epoch agnostic runs as the prior of the MAP search): docs/world.md;
its cost per sample: ``python -m core bench inference``.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from core.errors import CoreError
from core.learning.metrics import position_errors


def check_members(runs: list) -> None:
    """A :class:`CoreError` of one line unless ``runs`` (LoadedRun) are at least one, and all read the first's
    dataset and radio map (their store ids)."""
    if not runs:
        raise CoreError("ensemble: give at least one run")
    first = runs[0]
    for r in runs[1:]:
        for what, ours, theirs in (("dataset", first.dataset.ref, r.dataset.ref),
                                   ("radio map", first.radio_map.ref, r.radio_map.ref)):
            if ours.id != theirs.id:
                raise CoreError(f"ensemble: {r.run_dir} reads {what} {theirs.describe()}, {first.run_dir} reads "
                                f"{ours.describe()}: an ensemble's members must read the same {what}")


def pool(predictions: list):
    """One :class:`~core.learning.inference.Prediction` from the members' predictions of the same samples:
    ``xy`` and ``sigma`` as in the module doc, the rest the first member's."""
    if len({len(p.indices) for p in predictions}) != 1 or not all(
            np.array_equal(p.indices, predictions[0].indices) for p in predictions):
        raise CoreError("ensemble: the members' predictions are of different samples")
    xy = np.stack([p.xy for p in predictions])  # [M, N, 2]
    var = np.mean(np.stack([p.sigma**2 for p in predictions]), axis=0) + xy.var(axis=0)
    mu = xy.mean(axis=0)
    first = predictions[0]
    return replace(first, xy=mu, sigma=np.sqrt(var), error_m=position_errors(mu, first.true_xy))


def load_peer(path: str, dataset, radio_map, data, option: str, device="cpu", radio_map_override=None):
    """The run at ``path`` loaded on ``dataset`` and ``radio_map`` (:func:`~core.learning.inference.load_run`
    with these stores), trained on that dataset with the split and sample cap of ``data`` (a run's
    ``config.data``): so it never trained on the walks scored here. ``radio_map_override``: a map store path
    read INSTEAD of ``radio_map`` (the dataset's own map; ``load_run(radio_map_override=)``). A
    :class:`CoreError` of one line naming ``option``: no such run, another dataset, another split or sample cap,
    or stores it does not fit."""
    from core import resolve_path
    from core.learning.inference import load_run
    from core.stores import run as run_store

    run_dir = resolve_path(path)
    if not run_dir.is_dir():
        raise CoreError(f"{option}: {path}: no such run directory")
    try:
        lineage = run_store.read_lineage(run_dir)
    except CoreError as exc:
        raise CoreError(f"{option}: {path}: {exc}") from None
    if lineage is not None and lineage.dataset is not None and lineage.dataset.id != dataset.ref.id:
        raise CoreError(f"{option}: {path} was trained on dataset {lineage.dataset.describe()}, not on "
                        f"{dataset.ref.describe()}: it must read the same dataset")
    try:
        peer = load_run(run_dir, device=device, stores=(dataset, radio_map), radio_map_override=radio_map_override)
    except CoreError as exc:
        raise CoreError(f"{option}: {path}: {exc}") from None
    theirs = peer.config.data
    if (theirs.split, theirs.spatial_blocks, theirs.max_samples) != (data.split, data.spatial_blocks, data.max_samples):
        raise CoreError(f"{option}: {path} was trained on another split or sample cap (split {theirs.split}, "
                        f"max_samples {theirs.max_samples}; here: {data.split}, {data.max_samples}): it may have "
                        "trained on the walks scored here")
    return peer


def load_members(run, paths: list[str], device="cpu", option: str = "--ensemble") -> list:
    """The runs ``paths`` loaded as :func:`load_peer` loads them on ``run``'s dataset, map and data settings: the
    other members of an ensemble whose first is ``run``. Where ``run`` reads another map than its dataset's
    (``run.map_override``, ``evaluate --radio-map``), every member reads that map too. A :class:`CoreError` of
    one line naming ``option`` as there, or for a run given twice."""
    from core import resolve_path
    from core.stores.radio_map import RadioMap

    recorded, override = run.radio_map, None
    if paths and run.map_override is not None:
        recorded = RadioMap.load(resolve_path(run.map_override["recorded"]["path"]))
        override = run.map_override["used"]["path"]
    members = []
    for p in paths:
        path = resolve_path(p).resolve()
        if path == Path(run.run_dir).resolve() or any(path == Path(m.run_dir).resolve() for m in members):
            raise CoreError(f"{option}: {p} is given twice (--run is the first member)")
        members.append(load_peer(p, run.dataset, recorded, run.config.data, option, device, override))
    check_members([run, *members])
    return members


def predict_ensemble(runs: list, indices, batch_size: int | None = None):
    """:func:`pool` of every member's :func:`~core.learning.inference.predict` of ``indices``."""
    from core.learning.inference import predict

    check_members(runs)
    kw = {} if batch_size is None else {"batch_size": batch_size}
    return pool([predict(r, indices, **kw) for r in runs])


__all__ = ["check_members", "load_members", "load_peer", "pool", "predict_ensemble"]
