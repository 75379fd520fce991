"""The ray-traced UE measurement dataset (schema: :mod:`core.stores.dataset`).

``python -m core make-dataset --scene etoile --num-ues 20000 --reports 8
--out datasets/etoile [--radio-maps radio_maps --seed 0 --split random|spatial]
[--noise-path-gain-db 2 --noise-toa-ns 3 --noise-aoa-deg 3 --clock-offset-ns 0
--missing-rate 0.2 --sites-per-report 4 --sensitivity-dbm -100|off]
[--world oracle|realistic --world-seed 0 --world-materials 0.3 ...] [--ray [ADDRESS]]``

One scene: ``--out`` is its store, and a failure is the command's one-line error. Several
scenes (``--scene etoile munich --out datasets``): ``--out`` is a folder that gets one
``<scene>`` store each; the scenes run in turn, or with ``--ray [ADDRESS]`` as one Ray task
each (:mod:`core.raytracing.distributed`; also for one scene), every engine running
:func:`dataset_of_scene`. A scene that fails does not stop the others: the summary names
it and its cause, and the exit status is 2 (:mod:`core.raytracing.scene_batch`).

Walks. Each UE starts at a uniform random point of a covered outdoor cell of the
scene's radio map (``<radio-maps>/<scene>.zarr``, which must be there and be of that scene;
with ``--no-map``, of the scene-centred 512 m square, and the dataset records that it has no
map: see :mod:`core.stores.lineage`), never under a roof, and walks in a straight line at a uniform random
speed in [0.5, 1.5] m/s and heading, one report every 0.2 s (``t = 0, 0.2, ...``).
Positions sit ``rx_height_m`` above the terrain under them
(:func:`~core.raytracing.terrain.measurement_points`, as the map's cell centres).
A walk that would cross a wall (a straight segment between consecutive positions hits geometry),
leave the map or reach an uncovered point is redrawn; so is a walk that leaves
coverage: at some report no site is received (below, the serving site below the
sensitivity). The label is the position at the last report; all positions are stored.

Measurements are ray-traced by ``PathSolver`` at the exact UE positions from every
site (never read from the radio map, which would make a map-based physics loss
circular), with the radio map's own propagation settings
(:class:`~core.raytracing.tracing.PropagationSettings` from its ``attrs["propagation"]``;
the defaults without a map), recorded in ``attrs["propagation"]``: the map at a UE's
position and the UE's report are two evaluations of the same function. For every
report, with ``G_s`` the clean path gain [dB] of site ``s`` (sum of the paths'
``|a|^2``; -inf without a path), ``P`` the transmit power [dBm] and ``N`` the thermal
noise [dBm] of the radio settings:

* detection: site ``s`` is received when ``P + G_s >= S``, the sensitivity
  ``--sensitivity-dbm`` (default -100 dBm = ``N`` - 6 dB for the default radio; ``off``:
  every site with a path). Detection is decided on the true received power; the noise
  below is the error of the UE's measurement of a received site;
* site slots ``k = 0..K-1`` (``--sites-per-report``) hold the K strongest received sites
  (slot 0 = serving) with their ``(path_gain [dB], toa [ns], aoa [deg])``, ToA/AoA of the
  site's strongest path -- what the map's per-site layers
  ``site_path_gain / site_toa / site_aoa [S, H, W]`` hold. Fewer than K received sites:
  the other slots hold site id -1 and NaN features. The serving site is always received
  (walks out of coverage are redrawn, above), so slot 0 and the cell features are never
  empty in a present report;
* ``snr = P + G_serv - N``, ``sinr = P + G_serv - 10 log10(sum_{s != serv} 10^((P + G_s)/10) + 10^(N/10))``:
  all sites interfere, received or not (a site below the sensitivity still transmits);
  ``throughput`` and ``bler`` from :mod:`core.raytracing.link_abstraction`;
* ``los``: the serving site has a line-of-sight path.

Measurement model (``attrs["measurement_model"]``, :class:`~core.stores.measurement_model.MeasurementModel`,
seeded by ``--seed``), for UE walk ``n``, report ``t``, site ``s``, slot ``k``::

    G~_nts = G_nts + e_G,    e_G ~ N(0, sigma_G^2)   every site, independently  (--noise-path-gain-db)
    toa~_ntk = toa_ntk + e_T + c_n,  e_T ~ N(0, sigma_T^2) per slot             (--noise-toa-ns)
                                     c_n ~ N(0, sigma_c^2) once per walk        (--clock-offset-ns)
    aoa~_ntk = wrap(aoa_ntk + e_A),  e_A ~ N(0, sigma_A^2), wrap to (-180, 180] (--noise-aoa-deg)

The clock offset ``c_n`` (the UE's clock against the network's, default sigma 0 = off)
is the same for every ToA of the walk and is not stored: a model never sees it. SNR and
SINR are recomputed from the noisy gains and throughput/BLER from the noisy SINR; the
slot order and the detection stay the clean ones. Reports go missing independently with
probability ``--missing-rate`` (default 0.2; then NaN features, site id -1, los False),
keeping at least one per UE. ``clean/*`` holds every report's K strongest sites with a
path before detection, noise and dropping (a slot whose site was not received keeps its
clean features there; its ``site_ids`` entry is -1).

World (``--world oracle|realistic`` and its ``--world-*`` flags, ``--world-seed``;
:mod:`core.stores.world_model`, recorded in ``attrs["measurement_model"]["world"]``, and what
its seed drew in ``attrs["world_realisation"]``): the walks are drawn and traced in the
world's scene, a perturbed COPY of the map's (:func:`core.raytracing.world.world_scene`:
sites, antenna tilt, building heights, removed buildings, vehicles, materials, diffuse
scattering), with the world's PathSolver settings, and ``G_s`` above includes the world's
shadow fading (:class:`core.raytracing.world.ShadowField`): the world's "clean" truth.
``attrs["propagation"]`` stays the map's. The oracle world (the default) is the map itself
and draws nothing: the dataset is the one made before worlds existed. With
``detect_on_noisy`` the detection and the slot order are decided on the NOISY gains
``G~`` instead (:func:`_noisy_detection`): site ``s`` is heard when ``P + G~_s >= S``, the
slots hold the heard sites by decreasing ``G~``, and a report that hears no site is not
sent (it counts as missing; ``clean/site_features`` then holds the clean features of the sites
in the noisy slots, aligned with ``site_ids``; a UE that heard nothing in any report, which needs the noise to
push every report below the sensitivity, keeps the strongest noisy site of its best report).

Split by UE, seeded: 80 % train, 10 % val, 10 % test (``--split random``), or with
``--split spatial`` the test set is the UEs whose label lies in the 10 % of the area
with the largest x (and val the next 10 %), a region the model never saw.
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from core import cli_types
from core.errors import CoreError
from core.features import wrap_degrees
from core.progress import report
from core.raytracing.distributed import add_ray_argument
from core.stores.lineage import WITHOUT_MAP, check_map_of_scene, map_path
from core.stores.measurement_model import KNOBS, SENSITIVITY_OFF, MeasurementModel
from core.stores.motion_model import MotionModel
from core.stores.output import check_new, check_writable, writing_store
from core.stores.world_model import PRESETS as WORLD_PRESETS
from core.stores.world_model import WORLD_KNOBS, WorldModel


@dataclass(frozen=True)
class WalkConfig:
    """UE motion: straight walks at a uniform random speed and heading."""

    speed_min_mps: float = 0.5
    speed_max_mps: float = 1.5
    report_interval_s: float = 0.2


def _sites_and_area(scene_name, radio_maps, scenes_dir):
    """``(info, sites, bounds, valid [H, W] or None, map StoreRef or None, map propagation or None)`` for the scene.

    ``radio_maps``: the maps folder, whose ``<scene>.zarr`` must be there and be of the scene; None: no map.
    """
    from core.raytracing.scenes import DEFAULT_AREA_SIZE_M, load_scene, resolve_scene, scene_bbox, site_layout
    from core.raytracing.tracing import PropagationSettings
    from core.stores.radio_map import RadioMap

    info = resolve_scene(scene_name, scenes_dir)
    if radio_maps is not None:
        path = map_path(radio_maps, info.name)
        if not path.exists():
            raise CoreError(f"radio map {path}: no such store; make it first (python -m core generate-maps --scenes "
                            f"{info.name} --output-dir {radio_maps}), or ask for a dataset without a map (--no-map)")
        rmap = RadioMap.load(path)
        check_map_of_scene(rmap.ref, info.name)
        propagation = PropagationSettings.from_dict(rmap.attrs["propagation"])
        return info, rmap.attrs["sites"], rmap.bounds, rmap.valid, rmap.ref, propagation
    scene = load_scene(info)
    bb = scene_bbox(scene)
    cx, cy, half = 0.5 * (bb[0] + bb[3]), 0.5 * (bb[1] + bb[4]), 0.5 * DEFAULT_AREA_SIZE_M
    bounds = (max(bb[0], cx - half), max(bb[1], cy - half), min(bb[3], cx + half), min(bb[4], cy + half))
    return info, site_layout(info.name, scenes_dir, area=bounds), bounds, None, None, None


def _draw_walks(rng, scene, n, t_steps, bounds, valid, walk: WalkConfig, rx_height):
    """Draw ``n`` outdoor straight walks: positions ``[n, T, 3]`` (``rx_height`` above the terrain) and times ``[T]``."""
    from core.raytracing.terrain import measurement_points
    from core.raytracing.tracing import indoor_mask

    x_min, y_min, x_max, y_max = bounds
    times = np.arange(t_steps) * walk.report_interval_s
    out = np.empty((0, t_steps, 3))
    if valid is not None:
        h, w = valid.shape
        cells = np.flatnonzero(valid)
        if len(cells) == 0:
            raise CoreError("the radio map has no covered cell to place UEs in")
        cell = (x_max - x_min) / w
    for _ in range(200):
        need = n - len(out)
        if need <= 0:
            break
        m = int(need * 1.3) + 16
        if valid is not None:
            pick = rng.choice(cells, m)
            i, j = np.divmod(pick, w)
            p0 = np.stack([x_min + (j + rng.random(m)) * cell, y_min + (i + rng.random(m)) * cell], 1)
        else:
            p0 = np.stack([rng.uniform(x_min, x_max, m), rng.uniform(y_min, y_max, m)], 1)
        speed = rng.uniform(walk.speed_min_mps, walk.speed_max_mps, m)
        heading = rng.uniform(-np.pi, np.pi, m)
        step = np.stack([np.cos(heading), np.sin(heading)], 1) * speed[:, None]
        xy = p0[:, None, :] + times[None, :, None] * step[:, None, :]  # [m, T, 2]
        ok = ((xy[..., 0] > x_min) & (xy[..., 0] < x_max) & (xy[..., 1] > y_min) & (xy[..., 1] < y_max)).all(1)
        if valid is not None:
            jj = np.clip(((xy[..., 0] - x_min) / cell).astype(int), 0, w - 1)
            ii = np.clip(((xy[..., 1] - y_min) / cell).astype(int), 0, h - 1)
            ok &= valid[ii, jj].all(1)
        xyz = measurement_points(scene, xy.reshape(-1, 2), rx_height).reshape(m, t_steps, 3)  # on the terrain
        ok &= ~indoor_mask(scene, xyz.reshape(-1, 3)).reshape(m, t_steps).any(1)
        # no wall between consecutive positions (straight segments; they follow the terrain)
        ok &= _clear_steps(scene, xyz)
        out = np.concatenate([out, xyz[ok]])[:n]
    if len(out) < n:
        raise CoreError(f"could only place {len(out)} of {n} UEs on outdoor covered walks")
    return out, times


def _clear_steps(scene, xyz: np.ndarray) -> np.ndarray:
    """bool ``[m]``: no geometry between consecutive positions of each walk ``xyz [m, T, 3]``."""
    from core.raytracing.tracing import segments_clear

    m, t_steps = xyz.shape[:2]
    if t_steps < 2:
        return np.ones(m, bool)
    clear = segments_clear(scene, xyz[:, :-1].reshape(-1, 3), xyz[:, 1:].reshape(-1, 3), min_length_m=1e-3)
    return clear.reshape(m, t_steps - 1).all(1)


def measure(traced: dict[str, np.ndarray], k_sites: int, radio, link) -> dict[str, np.ndarray]:
    """Clean per-report measurements from per-site traces of ``M`` points.

    Args:
        traced: :func:`core.raytracing.trace_points` output, ``[M, S]`` arrays.
        k_sites: site slots K.

    Returns ``site_ids [M, K]`` int16, ``site_features [M, K, 3]``, ``cell_features [M, 4]``,
    ``los [M]`` and ``order [M, S]`` (sites strongest first).
    """
    pg = traced["path_gain"].astype(np.float64)  # [M, S], -inf where no path
    m, s = pg.shape
    order = np.argsort(-pg, axis=1, kind="stable")
    k = min(k_sites, s)
    top = order[:, :k]
    rows = np.arange(m)[:, None]
    has = np.isfinite(pg[rows, top])
    site_ids = np.full((m, k_sites), -1, np.int16)
    site_ids[:, :k] = np.where(has, top, -1)
    feats = np.full((m, k_sites, 3), np.nan, np.float32)
    for f, name in enumerate(("path_gain", "toa", "aoa")):
        feats[:, :k, f] = np.where(has, traced[name][rows, top], np.nan)
    cell = cell_measurements(pg, radio, link)
    los = traced["los"][np.arange(m), order[:, 0]] & has[:, 0]
    return {"site_ids": site_ids, "site_features": feats, "cell_features": cell, "los": los, "order": order}


def cell_measurements(pg_db: np.ndarray, radio, link) -> np.ndarray:
    """``[M, 4]`` (snr, sinr, throughput, bler) from every site's path gain ``[M, S]`` [dB]."""
    serv = np.max(pg_db, axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        p_mw = 10 ** ((radio.tx_power_dbm + pg_db) / 10)  # -inf dB -> 0 mW
        interference = np.maximum(p_mw.sum(1) - 10 ** ((radio.tx_power_dbm + serv) / 10), 0.0)
        snr = radio.tx_power_dbm + serv - radio.noise_dbm
        sinr = radio.tx_power_dbm + serv - 10 * np.log10(interference + 10 ** (radio.noise_dbm / 10))
    thr, bler, _ = link(sinr)
    return np.stack([snr, sinr, thr, bler], axis=1).astype(np.float32)


def make_dataset(scene_name: str, num_ues: int, reports: int, radio_maps: str | None = None, seed: int = 0,
                 split: str = "random", scenes_dir: str | None = None,
                 model: MeasurementModel = MeasurementModel(), walk: WalkConfig = WalkConfig(),
                 propagation=None, record_relative_to: str | None = None):
    """Build a :class:`~core.stores.dataset.MeasurementDataset` (see the module docstring).

    ``model`` is the measurement model (noise, clock offset, missing rate, site slots K,
    sensitivity), recorded in ``attrs["measurement_model"]``.

    ``radio_maps``: the maps folder; ``<radio_maps>/<scene>.zarr`` must be there and be of the scene
    (else a :class:`CoreError`), and the dataset records it (path, scene, lineage id and digest) as the
    map it was made with. None: a dataset without a map (attrs ``without_radio_map: true``).

    ``propagation`` (:class:`~core.raytracing.tracing.PropagationSettings`): by default the
    radio map's own (``attrs["propagation"]``), else the defaults when there is no map;
    one that differs from the map's is refused.

    ``record_relative_to``: record the map's path relative to this folder when it lies inside it
    (a Ray worker loads absolute paths; the store keeps the one the user gave).
    """
    from core.raytracing.link_abstraction import LinkConfig, link_abstraction
    from core.raytracing.world import ShadowField, world_propagation, world_scene
    from core.stores.dataset import MeasurementDataset

    _check_arguments(num_ues, reports, split, model)
    t_start = time.perf_counter()
    rng = np.random.default_rng(seed)
    report(0.0, f"{scene_name}: loading")
    info, sites, bounds, valid, map_ref, map_propagation = _sites_and_area(scene_name, radio_maps, scenes_dir)
    if map_ref is not None and record_relative_to:
        map_ref = replace(map_ref, path=recorded_path(map_ref.path, record_relative_to))
    propagation = _propagation_for(propagation, map_propagation, map_ref.path if map_ref else None)
    radio = propagation.radio
    world = model.world
    scene, realisation = world_scene(info, sites, radio, world, bounds)  # the map's scene in the oracle world
    field = ShadowField(world, len(sites)) if world.shadowing else None
    link = link_abstraction(LinkConfig())
    xyz, times, c, t_trace = _trace_walks(rng, scene, info.name, num_ues, reports, bounds, valid, walk, model,
                                          world_propagation(propagation, world), link, field)
    if world.detect_on_noisy:
        detected, noisy, heard_los = _noisy_detection(rng, c, model, radio, link)
        c["site_features"] = noisy.pop("clean_site_features")  # clean/* follows the noisy slot order
        present, site_ids, los = _drop_reports(rng, noisy, {"los": heard_los}, detected, model.missing_rate,
                                               heard=detected[..., 0] >= 0)
    else:
        detected = detected_sites(c["site_ids"], c["site_features"][..., 0], model.sensitivity_dbm, radio.tx_power_dbm)
        noisy = _add_noise(rng, c, detected, model, radio, link)
        present, site_ids, los = _drop_reports(rng, noisy, c, detected, model.missing_rate)
    split_arr = _split_samples(rng, xyz[:, -1, :2], split)
    attrs: dict[str, Any] = {
        "scene": info.name,
        "sites": [{"name": s["name"], "position": [float(v) for v in s["position"]]} for s in sites],
        "bounds": [float(b) for b in bounds],
        "radio_map": map_ref.path if map_ref else None,
        WITHOUT_MAP: map_ref is None,
        "measurement_model": model.to_attrs(),
        "seed": int(seed),
        "split": {"kind": split, "fractions": {"train": 0.8, "val": 0.1, "test": 0.1},
                  "spatial_rule": "test: label x >= 90th percentile, val: 80th-90th" if split == "spatial" else None},
        "walk": asdict(walk),
        "propagation": propagation.to_dict(),  # the map's; the world's differences: measurement_model.world
        "generator": {"sites_per_report": model.sites_per_report,
                      "source": "PathSolver at the exact UE positions (attrs.propagation)",
                      "timings": {"total_s": time.perf_counter() - t_start, "ray_tracing_s": t_trace}},
        "radio": radio.to_dict(),
        "link_abstraction": link.config.to_dict(),
    }
    if not world.is_oracle:
        attrs["world_realisation"] = realisation  # what --world-seed drew: site offsets, removed buildings, ...
    report(1.0, f"{info.name}: done")
    n, t = xyz.shape[:2]
    return MeasurementDataset(
        ue_xyz=xyz.astype(np.float32), t=np.broadcast_to(times.astype(np.float32), (n, t)).copy(),
        report_mask=present, site_ids=site_ids, site_features=noisy["site_features"],
        cell_features=noisy["cell_features"], los=los, split=split_arr, attrs=attrs,
        clean_site_features=c["site_features"].astype(np.float32),
        clean_cell_features=c["cell_features"].astype(np.float32), radio_map_ref=map_ref,
        motion=model.motion.measure(xyz, seed) if model.motion.enabled else None,  # its own random stream
    )


def _check_arguments(num_ues: int, reports: int, split: str, model: MeasurementModel) -> None:
    if num_ues < 1:
        raise CoreError(f"--num-ues must be >= 1, got {num_ues}")
    if reports < 1:
        raise CoreError(f"--reports must be >= 1, got {reports}")
    if split not in ("random", "spatial"):
        raise CoreError(f"--split must be random or spatial, got {split!r}")
    model.check()


def _propagation_for(given, from_map, map_path):
    """The propagation settings to trace with: the map's, unless there is no map."""
    from core.raytracing.tracing import PropagationSettings

    if from_map is None:
        return given or PropagationSettings()
    if given is not None and given != from_map:
        raise CoreError(f"radio map {map_path} was traced with other propagation settings than asked for: "
                        f"a dataset must use the map's (attrs propagation) to be comparable with it")
    return from_map


def _trace_walks(rng, scene, name, num_ues, reports, bounds, valid, walk, model, propagation, link, field=None):
    """Draw walks and ray-trace them (in the world's ``scene`` with the world's ``propagation``, the
    shadow fading ``field`` added: :mod:`core.raytracing.world`); walks that leave coverage somewhere
    (no site received at or above the sensitivity, :func:`in_coverage`) are replaced by spares.

    Returns ``(xyz [N, T, 3], times [T], clean, ray_tracing_s)`` with ``clean`` the
    :func:`measure` arrays ``[N, T, ...]`` plus ``pg_all [N, T, S]`` (every site's gain) and, when
    the world detects on the noisy power, ``toa_all``, ``aoa_all`` and ``los_all`` ``[N, T, S]``.
    """
    from tqdm import tqdm

    from core.raytracing.tracing import trace_points
    from core.raytracing.world import shadowed

    every_site = ("toa", "aoa", "los") if model.world.detect_on_noisy else ()

    xyz = np.empty((0, reports, 3))
    clean: dict[str, list[np.ndarray]] = {}
    total = num_ues * reports
    bar = tqdm(total=total, desc=f"{name}: ray tracing UE positions", unit="pos", dynamic_ncols=True)
    t_trace = 0.0
    for _ in range(20):
        need = num_ues - len(xyz)
        if need <= 0:
            break
        walks, times = _draw_walks(rng, scene, need + max(8, need // 20), reports, bounds, valid, walk,
                                   propagation.radio.rx_height_m)
        t0 = time.perf_counter()
        done0 = bar.n
        traced = trace_points(scene, walks.reshape(-1, 3), propagation,
                              progress=lambda d, n: (bar.update(min(done0 + d, total) - bar.n),
                                                     report(0.9 * bar.n / total, "ray tracing")))
        t_trace += time.perf_counter() - t0
        traced = shadowed(traced, walks.reshape(-1, 3), field)
        covered = in_coverage(traced["path_gain"], model.sensitivity_dbm, propagation.radio.tx_power_dbm)
        covered = covered.reshape(len(walks), reports).all(1)
        meas = measure(traced, model.sites_per_report, propagation.radio, link)
        keep = np.flatnonzero(covered)[:need]
        xyz = np.concatenate([xyz, walks[keep]])
        for key, arr in meas.items():
            if key != "order":
                clean.setdefault(key, []).append(arr.reshape((len(walks), reports) + arr.shape[1:])[keep])
        clean.setdefault("pg_all", []).append(traced["path_gain"].reshape(len(walks), reports, -1)[keep])
        for key in every_site:
            clean.setdefault(f"{key}_all", []).append(traced[key].reshape(len(walks), reports, -1)[keep])
    bar.close()
    if len(xyz) < num_ues:
        sensitivity = model.sensitivity_dbm
        why = "" if sensitivity is None else \
            f" (a site received at or above {KNOBS['sensitivity_dbm'].flag} {sensitivity:g} dBm at every report)"
        raise CoreError(f"could only place {len(xyz)} of {num_ues} UEs on fully covered walks{why}")
    return xyz, times, {k: np.concatenate(v) for k, v in clean.items()}, t_trace


def in_coverage(pg_db: np.ndarray, sensitivity_dbm: float | None, tx_power_dbm: float) -> np.ndarray:
    """bool ``[M]``: the strongest of the sites' path gains ``pg_db [M, S]`` [dB] is received,
    ``P_tx + max_s G_s >= sensitivity`` (any path at all when the sensitivity is ``None``)."""
    with np.errstate(invalid="ignore"):
        serving = np.max(pg_db, axis=1)
    if sensitivity_dbm is None:
        return np.isfinite(serving)
    return np.isfinite(serving) & (tx_power_dbm + serving >= sensitivity_dbm)


def detected_sites(site_ids: np.ndarray, path_gain_db: np.ndarray, sensitivity_dbm: float | None,
                   tx_power_dbm: float) -> np.ndarray:
    """int16 ``[..., K]``: ``site_ids`` where the slot's site is received, ``P_tx + G >= sensitivity``
    (``path_gain_db [..., K]`` [dB], the clean gains), else -1. Slots are strongest first, so the
    received sites stay a prefix of the slots."""
    has = site_ids >= 0
    if sensitivity_dbm is not None:
        with np.errstate(invalid="ignore"):
            has &= np.nan_to_num(tx_power_dbm + path_gain_db, nan=-np.inf) >= sensitivity_dbm
    return np.where(has, site_ids, -1).astype(np.int16)


def _add_noise(rng, c: dict[str, np.ndarray], detected: np.ndarray, model: MeasurementModel, radio,
               link) -> dict[str, np.ndarray]:
    """Noisy ``site_features [N, T, K, 3]`` (NaN in slots without a received site) and
    ``cell_features [N, T, 4]`` (module docstring). ``detected [N, T, K]``: the received
    sites' ids (:func:`detected_sites`), -1 elsewhere."""
    pg_all = c["pg_all"] + rng.normal(0.0, model.path_gain_db, c["pg_all"].shape)  # -inf stays -inf
    site_f = c["site_features"].copy()
    has = detected >= 0
    slot_pg = np.take_along_axis(pg_all, np.where(c["site_ids"] >= 0, c["site_ids"], 0).astype(np.int64), axis=2)
    site_f[..., 0] = np.where(has, slot_pg, np.nan)
    site_f[..., 1] = np.where(has, site_f[..., 1] + rng.normal(0.0, model.toa_ns, has.shape), np.nan)
    site_f[..., 2] = np.where(has, wrap_degrees(site_f[..., 2] + rng.normal(0.0, model.aoa_deg, has.shape)), np.nan)
    if model.clock_offset_ns > 0:  # drawn only when on: the default dataset's draws stay the same
        offset = rng.normal(0.0, model.clock_offset_ns, len(site_f))  # one per UE walk [N]
        site_f[..., 1] += offset[:, None, None]
    serv = slot_pg[..., 0]
    with np.errstate(divide="ignore", invalid="ignore"):
        p_mw = 10 ** ((radio.tx_power_dbm + pg_all) / 10)
        interf = np.maximum(p_mw.sum(-1) - 10 ** ((radio.tx_power_dbm + serv) / 10), 0.0)
        snr = radio.tx_power_dbm + serv - radio.noise_dbm
        sinr = radio.tx_power_dbm + serv - 10 * np.log10(interf + 10 ** (radio.noise_dbm / 10))
    thr, bler, _ = link(sinr)
    return {"site_features": site_f.astype(np.float32),
            "cell_features": np.stack([snr, sinr, thr, bler], -1).astype(np.float32)}


def _noisy_detection(rng, c: dict[str, np.ndarray], model: MeasurementModel, radio, link):
    """Measurement noise, then detection and slots on the NOISY power (the world's ``detect_on_noisy``).

    With ``G~_nts = G_nts + e_G`` (every site, as :func:`_add_noise`), site ``s`` is heard when
    ``P + G~_nts >= sensitivity`` (any finite gain without one), and the K slots hold the heard
    sites by decreasing ``G~``, with ``(G~, toa + e_T (+ c_n), wrap(aoa + e_A))`` of that site's
    strongest path; the cell features and ``los`` are those of slot 0 (the serving site).

    Returns ``(detected [N, T, K] int16, {"site_features", "cell_features", "clean_site_features"},
    los [N, T])``; ``clean_site_features [N, T, K, 3]``: the clean ``(G, toa, aoa)`` of the site in
    each slot (of the site next by noisy power where no site was heard; NaN without a path), so
    ``clean/*`` stays aligned with ``site_ids`` as in the clean-detection case.
    """
    pg = c["pg_all"] + rng.normal(0.0, model.path_gain_db, c["pg_all"].shape)  # [N, T, S], -inf stays -inf
    n, t, s_n = pg.shape
    k_n = model.sites_per_report
    heard_all = np.isfinite(pg)
    if model.sensitivity_dbm is not None:
        heard_all &= radio.tx_power_dbm + np.where(heard_all, pg, -np.inf) >= model.sensitivity_dbm
        deaf = np.flatnonzero(~heard_all.any(axis=(1, 2)))  # UEs that heard nothing in any report (rare)
        if len(deaf):  # keep them: the strongest noisy site of their best report counts as heard
            best = np.where(np.isfinite(pg[deaf]), pg[deaf], -np.inf).reshape(len(deaf), -1).argmax(1)
            heard_all[deaf, best // s_n, best % s_n] = True
    score = np.where(heard_all, pg, -np.inf)
    order = np.argsort(-score, axis=-1, kind="stable")[..., :k_n]  # [N, T, k] (k = min(K, S))
    k = order.shape[-1]
    ok = np.take_along_axis(heard_all, order, -1)
    detected = np.full((n, t, k_n), -1, np.int16)
    detected[..., :k] = np.where(ok, order, -1)
    feats = np.full((n, t, k_n, 3), np.nan, np.float64)
    feats[..., :k, 0] = np.where(ok, np.take_along_axis(pg, order, -1), np.nan)
    toa = np.take_along_axis(c["toa_all"].astype(np.float64), order, -1) + rng.normal(0.0, model.toa_ns, (n, t, k))
    aoa = wrap_degrees(np.take_along_axis(c["aoa_all"].astype(np.float64), order, -1)
                       + rng.normal(0.0, model.aoa_deg, (n, t, k)))
    if model.clock_offset_ns > 0:
        toa = toa + rng.normal(0.0, model.clock_offset_ns, n)[:, None, None]
    feats[..., :k, 1] = np.where(ok, toa, np.nan)
    feats[..., :k, 2] = np.where(ok, aoa, np.nan)
    serv = feats[..., 0, 0]
    with np.errstate(divide="ignore", invalid="ignore"):
        p_mw = 10 ** ((radio.tx_power_dbm + pg) / 10)
        interf = np.maximum(p_mw.sum(-1) - 10 ** ((radio.tx_power_dbm + serv) / 10), 0.0)
        snr = radio.tx_power_dbm + serv - radio.noise_dbm
        sinr = radio.tx_power_dbm + serv - 10 * np.log10(interf + 10 ** (radio.noise_dbm / 10))
    thr, bler, _ = link(np.nan_to_num(sinr, nan=-np.inf))
    cell = np.stack([snr, sinr, thr, bler], -1)
    cell[~ok[..., 0]] = np.nan
    los = np.take_along_axis(c["los_all"], order[..., :1], -1)[..., 0] & ok[..., 0]
    finite = np.isfinite(np.take_along_axis(c["pg_all"], order, -1))
    clean = np.full((n, t, k_n, 3), np.nan, np.float64)
    for f, key in enumerate(("pg_all", "toa_all", "aoa_all")):
        clean[..., :k, f] = np.where(finite, np.take_along_axis(c[key].astype(np.float64), order, -1), np.nan)
    return detected, {"site_features": feats.astype(np.float32), "cell_features": cell.astype(np.float32),
                      "clean_site_features": clean.astype(np.float32)}, los


def _drop_reports(rng, noisy: dict[str, np.ndarray], c: dict[str, np.ndarray], detected: np.ndarray,
                  missing_rate: float, heard: np.ndarray | None = None):
    """Drop reports at random with probability ``missing_rate`` (at least one kept per UE),
    in place in ``noisy``.

    ``heard [N, T]`` (detection on the noisy power): a report that hears no site is not sent,
    and the report kept for a UE whose reports all dropped is one it heard something in
    (:func:`_noisy_detection` makes every UE hear something somewhere).

    Returns ``(present [N, T], site_ids [N, T, K] int16, los [N, T])``.
    """
    n, t = detected.shape[:2]
    present = rng.random((n, t)) >= missing_rate
    if heard is not None:
        present &= heard
        none = np.flatnonzero(~present.any(1))
        pick = rng.random((len(none), t)) + heard[none]  # a heard report scores above every unheard one
        present[none, np.argmax(pick, axis=1)] = True
        noisy["site_features"][~present] = np.nan
        noisy["cell_features"][~present] = np.nan
        site_ids = np.where(present[..., None], detected, -1).astype(np.int16)
        return present, site_ids, c["los"] & present
    none = ~present.any(1)
    present[np.flatnonzero(none), rng.integers(0, t, none.sum())] = True
    noisy["site_features"][~present] = np.nan
    noisy["cell_features"][~present] = np.nan
    site_ids = np.where(present[..., None], detected, -1).astype(np.int16)
    return present, site_ids, c["los"] & present


def _split_samples(rng, labels: np.ndarray, split: str) -> np.ndarray:
    """int8 ``[N]`` split by UE: random 80/10/10, or spatial by the label's x (module docstring)."""
    from core.stores.dataset import SPLITS

    n = len(labels)
    if split == "random":
        perm = rng.permutation(n)
        split_arr = np.zeros(n, np.int8)
        split_arr[perm[int(0.8 * n):int(0.9 * n)]] = SPLITS["val"]
        split_arr[perm[int(0.9 * n):]] = SPLITS["test"]
        return split_arr
    x_hi, x_mid = np.quantile(labels[:, 0], [0.9, 0.8])
    return np.where(labels[:, 0] >= x_hi, SPLITS["test"],
                    np.where(labels[:, 0] >= x_mid, SPLITS["val"], SPLITS["train"])).astype(np.int8)


# -- command line ------------------------------------------------------------------------
_MODEL_HELP = {
    "path_gain_db": "sigma of the Gaussian noise on every site's path gain [dB]",
    "toa_ns": "sigma of the Gaussian noise on every ToA [ns]",
    "aoa_deg": "sigma of the Gaussian noise on every AoA [deg], wrapped",
    "clock_offset_ns": "sigma of a clock offset [ns] drawn once per UE walk and added to all its ToAs, "
                       "unknown to the model; 0 = off",
    "missing_rate": "probability that a report is missing, in [0, 1)",
    "sites_per_report": "K strongest received sites per report",
    "sensitivity_dbm": "a site is reported only when its received power P_tx + G_s >= this [dBm]; "
                       f"{SENSITIVITY_OFF!r}: every site with a path; the default is the default radio's "
                       "thermal noise - 6 dB",
}


_WORLD_METAVAR = {"material_spread": "A", "height_sigma_m": "SIGMA", "remove_fraction": "F",
                  "vehicle_density_per_km2": "PER_KM2", "site_position_sigma_m": "SIGMA",
                  "site_orientation_sigma_deg": "SIGMA", "downtilt_error_deg": "DEG", "scattering_coefficient": "S",
                  "shadowing_los_db": "SIGMA", "shadowing_nlos_db": "SIGMA", "shadowing_decorrelation_m": "M",
                  "detect_on_noisy": "BOOL"}
_WORLD_HELP = {
    "material_spread": "each material's permittivity and conductivity times U[1-a, 1+a] (a in [0, 0.9])",
    "height_sigma_m": "sigma of each building's height error [m]",
    "remove_fraction": "fraction of buildings missing from the world, in [0, 1)",
    "vehicle_density_per_km2": "metal cars per km^2 of the map's area, on outdoor ground",
    "site_position_sigma_m": "sigma of each site's x and y error between map and world [m]",
    "site_orientation_sigma_deg": "sigma of each site antenna's mechanical tilt and azimuth error [deg]",
    "downtilt_error_deg": "the world's electrical down-tilt minus the map's (6 deg) [deg]",
    "scattering_coefficient": "diffuse scattering coefficient S of every material in the world (the map: 0), "
                              "traced with PathSolver diffuse_reflection",
    "shadowing_los_db": "shadow-fading sigma on line-of-sight links [dB] (Gudmundson, spatially correlated)",
    "shadowing_nlos_db": "shadow-fading sigma on non-line-of-sight links [dB]",
    "shadowing_decorrelation_m": "shadow fading's decorrelation distance [m] (default 10)",
    "detect_on_noisy": "true: which sites are heard, and their slot order, by the noisy power (else the clean one)",
}


def _model_help(name: str) -> str:
    default = getattr(MeasurementModel(), name)
    return f"{_MODEL_HELP[name]} (default: {SENSITIVITY_OFF if default is None else f'{default:g}'})"


@dataclass(frozen=True)
class DatasetOptions:
    """The ``make-dataset`` options every scene of one command shares (see :func:`make_dataset`)."""

    num_ues: int
    reports: int
    radio_maps: str | None
    seed: int
    split: str
    scenes_dir: str | None
    model: MeasurementModel
    #: the caller's working directory: a Ray worker gets absolute paths, the dataset still records the
    #: map's path as the user gave it (relative to this folder when inside it)
    record_relative_to: str | None = None


def recorded_path(path: str, root: str) -> str:
    """``path`` relative to ``root`` when it lies inside it, else unchanged."""
    rel = os.path.relpath(os.path.abspath(path), os.path.abspath(root))
    return path if rel == os.pardir or rel.startswith(os.pardir + os.sep) else rel


def dataset_of_scene(scene: str, out: str, options: DatasetOptions, force: bool,
                     into_folder: bool = False) -> tuple[str, str]:
    """Make ``scene``'s dataset and save it atomically at ``out`` (``into_folder``: at ``<out>/<scene>``).

    Returns ``("ok", "wrote ...")``; raises when the output exists (unless ``force``) or the
    scene fails (:func:`~core.raytracing.scene_batch.run_guarded` turns that into the scene's failure).
    """
    if into_folder:
        from core.raytracing.scenes import resolve_scene

        out = str(Path(out) / resolve_scene(scene, options.scenes_dir).name)
    path = Path(out)
    check_new(path, force)
    with writing_store(path, "measurement_dataset", force):  # not shipped, one writer, --force only on a dataset
        ds = make_dataset(scene, options.num_ues, options.reports, radio_maps=options.radio_maps, seed=options.seed,
                          split=options.split, scenes_dir=options.scenes_dir, model=options.model,
                          record_relative_to=options.record_relative_to)
        ds.save(path)
    timings = ds.attrs["generator"]["timings"]
    return "ok", (f"wrote {path}: {ds.num_samples} UEs x {ds.num_reports} reports, "
                  f"{ds.report_mask.mean():.1%} reports present, {timings['total_s']:.1f} s; {options.model.summary()}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--scene", "--scenes", dest="scene", nargs="+", required=True, metavar="SCENE",
                        help="scene name(s) (see core.scenes.list_scenes); with several, --out is a folder")
    parser.add_argument("--num-ues", type=cli_types.count, default=20_000, help="number of UE walks (samples)")
    parser.add_argument("--reports", type=cli_types.count, default=8, help="reports per walk, T (default: 8)")
    parser.add_argument("--out", required=True,
                        help="output Zarr store, e.g. datasets/etoile; with several scenes, the folder that gets "
                             "one <scene> store each")
    parser.add_argument("--radio-maps", default="radio_maps",
                        help="folder with <scene>.zarr: its sites, bounds and coverage are used (default: radio_maps)")
    parser.add_argument("--no-map", action="store_true",
                        help="a dataset WITHOUT a radio map: walks over the scene's 512 m square, the automatic "
                             "sites; recorded as such, and only a map with its very sites and propagation is "
                             "accepted for it later (--radio-maps is then not read)")
    parser.add_argument("--scenes-dir", default=None, help="folder of user scenes")
    parser.add_argument("--seed", type=cli_types.seed, default=0, help="seed of walks, noise and split (default: 0)")
    parser.add_argument("--split", choices=["random", "spatial"], default="random", help="train/val/test split by UE")
    model = parser.add_argument_group("measurement model (recorded in the store's attrs measurement_model)")
    for name in _MODEL_HELP:
        # parsed by MeasurementModel.from_flags: a bad value is one error line naming the flag
        model.add_argument(KNOBS[name].flag, dest=name, default=None, metavar=KNOBS[name].metavar,
                           help=_model_help(name))
    world = parser.add_argument_group(
        "world (how the world the UEs measure in differs from the radio map; recorded in measurement_model.world; "
        "docs/world.md)")
    world.add_argument("--world", default=None, metavar="PRESET",
                       help="oracle (default: the world is the map, as before) or realistic (every perturbation "
                            "below at its documented value); a flag below overrides that one value")
    world.add_argument("--world-seed", type=cli_types.seed, default=None, metavar="SEED",
                       help="seed of the world's perturbations (default: 0), independent of --seed")
    realistic = WORLD_PRESETS["realistic"]
    for name, knob in WORLD_KNOBS.items():
        value = getattr(realistic, name)
        shown = str(value).lower() if isinstance(value, bool) else f"{value:g}"
        world.add_argument(knob.flag, dest=f"world_{name}", default=None, metavar=_WORLD_METAVAR.get(name, "X"),
                           help=f"{_WORLD_HELP[name]} (realistic: {shown})")
    motion = parser.add_argument_group(
        "device motion (pedestrian dead reckoning: the phone's measured displacement per report; recorded in "
        "measurement_model.motion and the 'motion' array; core/stores/motion_model.py)")
    motion.add_argument("--motion-step-sigma", default=None, metavar="S",
                        help="relative step-length error σ, e.g. 0.1 (default 0: no motion channel)")
    motion.add_argument("--motion-heading-deg", default=None, metavar="DEG",
                        help="heading error σ [deg], e.g. 10 (default 0)")
    parser.add_argument("--force", action="store_true", help="overwrite an existing dataset")
    add_ray_argument(parser)
    parser.add_argument("--no-progress", action="store_true", help="no tqdm bar")


def run(args: argparse.Namespace) -> int:
    from core.raytracing.scene_batch import SceneCall, print_summary, run_in_turn

    scenes = list(args.scene)
    repeated = sorted({s for s in scenes if scenes.count(s) > 1})
    if repeated:
        raise CoreError(f"--scene {repeated[0]} is given more than once")
    world = WorldModel.from_flags(args.world, args.world_seed, {n: getattr(args, f"world_{n}") for n in WORLD_KNOBS})
    motion = MotionModel.from_flags(args.motion_step_sigma, args.motion_heading_deg)
    model = MeasurementModel.from_flags({name: getattr(args, name) for name in _MODEL_HELP}, world=world, motion=motion)
    _check_arguments(args.num_ues, args.reports, args.split, model)
    radio_maps = None if args.no_map else args.radio_maps
    if radio_maps is not None and not Path(radio_maps).is_dir():
        raise CoreError(f"--radio-maps {radio_maps}: no such folder; generate the maps there first "
                        f"(python -m core generate-maps --output-dir {radio_maps}), or ask for a dataset without "
                        f"a map (--no-map)")
    options = DatasetOptions(args.num_ues, args.reports, radio_maps, args.seed, args.split, args.scenes_dir, model)
    check_writable(Path(args.out) / scenes[0] if len(scenes) > 1 else args.out, "--out")  # before any trace
    if len(scenes) == 1 and args.ray is None:  # one scene: --out is the store, a failure is the command's error
        print(dataset_of_scene(scenes[0], args.out, options, args.force)[1])
        return 0
    into_folder = len(scenes) > 1
    if args.ray is None:
        common = (args.out, options, args.force, into_folder)
        return print_summary(run_in_turn([SceneCall(s, dataset_of_scene, common) for s in scenes]))
    from core.raytracing.distributed import run_on_ray

    absolute = replace(options, radio_maps=_absolute(options.radio_maps), scenes_dir=_absolute(options.scenes_dir),
                       record_relative_to=os.getcwd())
    common = (os.path.abspath(args.out), absolute, args.force, into_folder)
    return print_summary(run_on_ray([SceneCall(s, dataset_of_scene, common) for s in scenes], args.ray, "make-dataset"))


def _absolute(path: str | None) -> str | None:
    return os.path.abspath(path) if path else None
