"""Analytic radio maps for tests and benchmarks (no ray tracing).

Free-space propagation from a few sites: exact, smooth and cheap, so lookups,
losses, refinement and baselines can be checked against known truth.

For a receiver at ``p = (x, y, rx_height)`` and site ``s`` at ``q_s``::

    d_s        = |p - q_s|                                   [m]
    path_gain  = -20 log10(4 pi d_s f / c)                   [dB]   (free space)
    toa        = d_s / c * 1e9                               [ns]
    aoa        = atan2(q_s,y - y, q_s,x - x)                 [deg]  (toward the site)
    snr        = P_tx + path_gain - N0                       [dB]
    sinr       = P_serv - 10 log10(sum_{s != serv} 10^(P_s/10) + 10^(N0/10))   [dB]
    throughput = B * log2(1 + 10^(sinr/10)) * 0.75 / 1e6     [Mbit/s]
    bler       = 1 / (1 + exp(sinr - 5))                     [1]

with the serving site the one of highest path gain.

Per-site layers (the map layout of :mod:`core.physics.site_lookup`): for EVERY site ``s``
the map also carries ``layers["site_path_gain" | "site_toa" | "site_aoa"]``, float32
``[S, H, W]`` in dB / ns / deg, from :func:`site_layers_at`::

    path_gain_s = -20 log10(4 pi d_s f / c)                  [dB]
    toa_s       = d_s / c * 1e9 + excess_s                   [ns]   (excess: a constant per site)
    aoa_s       = atan2(q_s,y - y, q_s,x - x)                [deg]  (bearing from the UE to the site)

NaN where ``d_s`` (horizontal) exceeds ``max_range_m`` (the site has no path there). The
datasets of :func:`synthetic_dataset` read their site slots from the same functions at
the exact UE positions, so a slot equals the map's layer at the truth up to bilinear
interpolation and the measurement noise.
"""

from __future__ import annotations

import numpy as np

from core.errors import CoreError
from core.features import DEFAULT_FEATURE_ORDER
from core.stores.radio_map import RadioMap

SPEED_OF_LIGHT = 299_792_458.0  # m/s


def analytic_features(
    xy: np.ndarray,
    sites: np.ndarray,
    frequency_hz: float = 3.5e9,
    tx_power_dbm: float = 43.0,
    noise_dbm: float = -174.0 + 10 * np.log10(20e6) + 7.0,
    bandwidth_hz: float = 20e6,
    rx_height: float = 1.5,
    features: tuple[str, ...] = DEFAULT_FEATURE_ORDER,
) -> np.ndarray:
    """float64 ``[N, F]`` features at points ``xy [N, 2]`` from sites ``[S, 3]`` (see module doc)."""
    xy = np.asarray(xy, dtype=np.float64)
    sites = np.asarray(sites, dtype=np.float64)
    p = np.concatenate([xy, np.full((len(xy), 1), rx_height)], axis=1)
    d = np.linalg.norm(p[:, None, :] - sites[None, :, :], axis=-1).clip(min=1.0)  # [N, S]
    gain = -20.0 * np.log10(4 * np.pi * d * frequency_hz / SPEED_OF_LIGHT)
    serving = gain.argmax(axis=1)
    rows = np.arange(len(xy))
    pg = gain[rows, serving]
    power = tx_power_dbm + gain
    interference = (10 ** (power / 10)).sum(axis=1) - 10 ** (power[rows, serving] / 10)
    sinr = power[rows, serving] - 10 * np.log10(interference + 10 ** (noise_dbm / 10))
    site = sites[serving]
    values = {
        "path_gain": pg,
        "toa": d[rows, serving] / SPEED_OF_LIGHT * 1e9,
        "aoa": np.degrees(np.arctan2(site[:, 1] - xy[:, 1], site[:, 0] - xy[:, 0])),
        "snr": power[rows, serving] - noise_dbm,
        "sinr": sinr,
        "throughput": bandwidth_hz * np.log2(1 + 10 ** (sinr / 10)) * 0.75 / 1e6,
        "bler": 1.0 / (1.0 + np.exp(sinr - 5.0)),
    }
    return np.stack([values[name] for name in features], axis=1)


def site_layers_at(
    xy: np.ndarray,
    sites: np.ndarray,
    frequency_hz: float = 3.5e9,
    rx_height: float = 1.5,
    excess_ns=0.0,
    max_range_m: float | None = None,
) -> dict[str, np.ndarray]:
    """Every site's ``path_gain`` [dB], ``toa`` [ns], ``aoa`` [deg] at points ``xy [N, 2]``: float64 ``[N, S]`` each.

    See the module doc for the formulas. ``excess_ns`` is a number or ``[S]`` (a constant
    extra delay per site, like a biased clock); beyond ``max_range_m`` (horizontal
    distance) a site has no path: NaN in all three.
    """
    xy = np.asarray(xy, dtype=np.float64)
    sites = np.asarray(sites, dtype=np.float64)
    p = np.concatenate([xy, np.full((len(xy), 1), rx_height)], axis=1)
    delta = sites[None, :, :] - p[:, None, :]  # [N, S, 3], UE -> site
    d = np.linalg.norm(delta, axis=-1).clip(min=1.0)
    out = {
        "path_gain": -20.0 * np.log10(4 * np.pi * d * frequency_hz / SPEED_OF_LIGHT),
        "toa": d / SPEED_OF_LIGHT * 1e9 + np.broadcast_to(np.asarray(excess_ns, dtype=np.float64), d.shape[1:]),
        "aoa": np.degrees(np.arctan2(delta[..., 1], delta[..., 0])),
    }
    if max_range_m is not None:
        far = np.hypot(delta[..., 0], delta[..., 1]) > max_range_m
        for v in out.values():
            v[far] = np.nan
    return out


def analytic_radio_map(
    height: int = 64,
    width: int = 96,
    bounds: tuple[float, float, float, float] = (-96.0, -64.0, 96.0, 64.0),
    sites: np.ndarray | None = None,
    features: tuple[str, ...] = DEFAULT_FEATURE_ORDER,
    excess_ns=0.0,
    max_range_m: float | None = None,
    **kwargs,
) -> RadioMap:
    """A :class:`RadioMap` of :func:`analytic_features` sampled at the cell centres.

    Default sites: three at 25 m height spread over the area. ``attrs["sites"]`` lists
    them in the same format as generated maps. The per-site layers ``site_path_gain``,
    ``site_toa``, ``site_aoa`` ``[S, H, W]`` come from :func:`site_layers_at` with
    ``excess_ns`` and ``max_range_m`` (recorded in ``attrs["generator"]``, so that
    :func:`synthetic_dataset` measures the same world). With ``max_range_m``, cells that
    no site reaches are uncovered (``valid`` false, serving values NaN).
    """
    if sites is None:
        x_min, y_min, x_max, y_max = bounds
        w, h = x_max - x_min, y_max - y_min
        sites = np.array(
            [
                [x_min + 0.2 * w, y_min + 0.25 * h, 25.0],
                [x_min + 0.75 * w, y_min + 0.3 * h, 25.0],
                [x_min + 0.5 * w, y_min + 0.8 * h, 25.0],
            ]
        )
    cell = (bounds[2] - bounds[0]) / width
    xs = bounds[0] + (np.arange(width) + 0.5) * cell
    ys = bounds[1] + (np.arange(height) + 0.5) * cell
    gx, gy = np.meshgrid(xs, ys)  # [H, W], row i = y
    xy = np.stack([gx.ravel(), gy.ravel()], axis=1)
    values = analytic_features(xy, sites, features=features, **kwargs)  # [H*W, F]
    values = values.T.reshape(len(features), height, width).astype(np.float32)
    per_site = site_layers_at(xy, sites, excess_ns=excess_ns, max_range_m=max_range_m,
                              **{k: v for k, v in kwargs.items() if k in ("frequency_hz", "rx_height")})
    layers = {f"site_{name}": v.T.reshape(len(sites), height, width).astype(np.float32) for name, v in per_site.items()}
    valid = np.isfinite(layers["site_path_gain"]).any(axis=0)
    values[:, ~valid] = np.nan
    excess = np.broadcast_to(np.asarray(excess_ns, dtype=np.float64), (len(sites),))
    attrs = {
        "scene": "analytic",
        "sites": [{"name": f"site{s}", "position": [float(v) for v in pos]} for s, pos in enumerate(sites)],
        "generator": {"kind": "analytic free space", "excess_ns": [float(e) for e in excess],
                      "max_range_m": None if max_range_m is None else float(max_range_m)},
    }
    return RadioMap(values, features, bounds, valid=valid, attrs=attrs, layers=layers)


def _walks(rng, n: int, t: np.ndarray, box, speed_mps) -> np.ndarray:
    """``[N, T, 2]`` straight walks at times ``t`` from uniform starts in ``box``, reflected at its edges."""
    x_lo, y_lo, x_hi, y_hi = box
    start = rng.uniform([x_lo, y_lo], [x_hi, y_hi], size=(n, 2))
    heading = rng.uniform(-np.pi, np.pi, size=n)
    speed = rng.uniform(*speed_mps, size=n)
    path = start[:, None, :] + (speed[:, None] * np.stack([np.cos(heading), np.sin(heading)], 1))[:, None, :] * t[None, :, None]
    lo, hi = np.array([x_lo, y_lo]), np.array([x_hi, y_hi])
    span = hi - lo
    folded = np.mod(path - lo, 2 * span)
    return lo + np.where(folded > span, 2 * span - folded, folded)


def _site_slots(xy: np.ndarray, sites: np.ndarray, k: int, excess_ns, max_range_m):
    """The ``k`` strongest heard sites at ``xy [M, 2]`` from :func:`site_layers_at`, strongest first.

    Returns ``site_ids`` int16 ``[M, k]`` (-1: none), features ``[M, k, 3]`` (NaN: none) and
    ``heard`` bool ``[M, min(k, S)]``.
    """
    from core.stores.dataset import SITE_FEATURES

    layers = site_layers_at(xy, sites, excess_ns=excess_ns, max_range_m=max_range_m)
    per_site = np.stack([layers[name] for name in SITE_FEATURES], axis=-1)  # [M, S, 3], NaN: no path
    gain = np.where(np.isfinite(per_site[..., 0]), per_site[..., 0], -np.inf)
    order = np.argsort(-gain, axis=1, kind="stable")[:, :k]
    kk = order.shape[1]
    heard = np.isfinite(np.take_along_axis(gain, order, axis=1))
    feats = np.full((len(xy), k, 3), np.nan)
    feats[:, :kk] = np.where(heard[..., None], np.take_along_axis(per_site, order[:, :, None], axis=1), np.nan)
    ids = np.full((len(xy), k), -1, dtype=np.int16)
    ids[:, :kk] = np.where(heard, order, -1)
    return ids, feats, heard


def _measurement_noise(rng, site_feat: np.ndarray, cell_feat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian measurement noise: path gain 2 dB, ToA 3 ns, AoA 5 deg (wrapped), SNR/SINR 1 dB,
    throughput 5 % (log-normal), BLER 0.02 (clipped to [0, 1])."""
    site_feat = site_feat + rng.normal(size=site_feat.shape) * np.array([2.0, 3.0, 5.0])
    site_feat[..., 2] = (site_feat[..., 2] + 180.0) % 360.0 - 180.0
    cell_feat = cell_feat + rng.normal(size=cell_feat.shape) * np.array([1.0, 1.0, 0.0, 0.02])
    cell_feat[:, 2] *= np.exp(0.05 * rng.normal(size=len(cell_feat)))
    cell_feat[:, 3] = cell_feat[:, 3].clip(0.0, 1.0)
    return site_feat, cell_feat


def _report_mask(rng, heard: np.ndarray, missing_prob: float) -> np.ndarray:
    """``[N, T]`` reports kept: each missing with ``missing_prob`` (at least one kept per
    walk), and never one that hears no site (``heard [N, T]``)."""
    n, t_len = heard.shape
    mask = rng.random((n, t_len)) >= missing_prob
    mask[~mask.any(axis=1), -1] = True
    mask &= heard
    if n and not mask.any(axis=1).all():
        raise CoreError("synthetic_dataset: some walks hear no site at all; raise the map's max_range_m")
    return mask


def _random_split(rng, n: int) -> np.ndarray:
    """``int8 [N]``: 80 % train (0), 10 % val (1), 10 % test (2), by a random permutation."""
    split = np.zeros(n, dtype=np.int8)
    perm = rng.permutation(n)
    split[perm[int(0.8 * n) : int(0.9 * n)]] = 1
    split[perm[int(0.9 * n) :]] = 2
    return split


def synthetic_dataset(
    radio_map: RadioMap,
    num_ues: int,
    reports: int = 8,
    k: int = 4,
    seed: int = 0,
    noise: bool = True,
    report_interval_s: float = 1.0,
    speed_mps: tuple[float, float] = (0.5, 2.0),
    missing_prob: float = 0.1,
    nlos_prob: float = 0.0,
    nlos_excess_ns: float = 80.0,
    nlos_aoa_deg: float = 30.0,
):
    """A :class:`~core.dataset.MeasurementDataset` of random walks on an analytic map.

    The map's ``attrs["sites"]`` are the transmitters. Each UE starts uniformly inside
    the map, walks straight at a random speed and heading (reflecting off the edges)
    and reports every ``report_interval_s`` seconds. Each report holds the ``k``
    strongest sites' ``(path_gain [dB], toa [ns], aoa [deg])`` and the serving cell's
    ``(snr, sinr, throughput, bler)``, all from :func:`analytic_features`, so the
    serving-site features equal the map at the UE position (up to bilinear
    interpolation). With ``noise`` the measurements get Gaussian noise
    (path gain 2 dB, ToA 3 ns, AoA 5 deg, SNR/SINR 1 dB, throughput 5 %, BLER 0.02),
    the noise-free values being kept as ``clean_*``. A report is missing with
    probability ``missing_prob`` (features NaN); every sample keeps at least one.
    Slots read the map's per-site model (:func:`site_layers_at` with the map's
    ``excess_ns`` and ``max_range_m``): a site out of range is never reported, and a
    report that hears no site is missing. With ``nlos_prob > 0`` each heard slot is, with
    that probability, non-line-of-sight: its ToA gets an extra exponential delay of mean
    ``nlos_excess_ns`` and its AoA a N(0, ``nlos_aoa_deg``) error (part of the world, so
    in ``clean_*`` too); ``los`` is then the serving slot's line-of-sight flag. Otherwise
    every report is line of sight. Split: 80 % train, 10 % val, 10 % test.
    When ``radio_map`` was saved or loaded, the dataset records it as the map it was made with.
    """
    from core.stores.dataset import CELL_FEATURES, MeasurementDataset

    rng = np.random.default_rng(seed)
    sites = np.array([s["position"] for s in radio_map.attrs["sites"]], dtype=np.float64)  # [S, 3]
    n, t_len = int(num_ues), int(reports)
    x_min, y_min, x_max, y_max = radio_map.bounds
    margin = radio_map.cell_size

    t = (np.arange(t_len) * report_interval_s).astype(np.float32)
    path = _walks(rng, n, t, (x_min + margin, y_min + margin, x_max - margin, y_max - margin), speed_mps)
    flat = path.reshape(-1, 2)
    gen = radio_map.attrs.get("generator", {})
    site_ids, site_feat, heard = _site_slots(flat, sites, k, gen.get("excess_ns", 0.0), gen.get("max_range_m"))
    kk = heard.shape[1]
    cell_feat = analytic_features(flat, sites, features=CELL_FEATURES)  # [N*T, 4]
    nlos = np.zeros((n * t_len, k), dtype=bool)
    if nlos_prob > 0:
        nlos[:, :kk] = heard & (rng.random(heard.shape) < nlos_prob)
        site_feat[..., 1] += np.where(nlos, rng.exponential(nlos_excess_ns, nlos.shape), 0.0)
        site_feat[..., 2] = (site_feat[..., 2] + np.where(nlos, rng.normal(0.0, nlos_aoa_deg, nlos.shape), 0.0)
                             + 180.0) % 360.0 - 180.0

    clean_site, clean_cell = site_feat.copy(), cell_feat.copy()
    if noise:
        site_feat, cell_feat = _measurement_noise(rng, site_feat, cell_feat)
    mask = _report_mask(rng, heard[:, 0].reshape(n, t_len), missing_prob)
    flat_mask = mask.reshape(-1)
    for arr in (site_feat, cell_feat, clean_site, clean_cell):
        arr[~flat_mask] = np.nan
    site_ids[~flat_mask] = -1
    split = _random_split(rng, n)
    ue_xyz = np.concatenate([path, np.full((n, t_len, 1), 1.5)], axis=-1).astype(np.float32)
    return MeasurementDataset(
        ue_xyz=ue_xyz,
        t=np.broadcast_to(t, (n, t_len)).copy(),
        report_mask=mask,
        site_ids=site_ids.reshape(n, t_len, k),
        site_features=site_feat.reshape(n, t_len, k, 3).astype(np.float32),
        cell_features=cell_feat.reshape(n, t_len, 4).astype(np.float32),
        los=mask & ~nlos[:, 0].reshape(n, t_len),
        split=split,
        attrs={"scene": radio_map.attrs.get("scene", "analytic"), "sites": radio_map.attrs.get("sites", []),
               "noise": bool(noise), "seed": int(seed), "generator": {"kind": "analytic random walks"}},
        clean_site_features=clean_site.reshape(n, t_len, k, 3).astype(np.float32),
        clean_cell_features=clean_cell.reshape(n, t_len, 4).astype(np.float32),
        radio_map_ref=radio_map.ref if radio_map.lineage else None,
    )


def synthetic_scene(root, num_ues: int = 200, height: int = 32, width: int = 32, cell: float = 4.0,
                    reports: int = 8, k: int = 3, seed: int = 0, noise: bool = True, scene: str = "analytic",
                    sites: np.ndarray | None = None) -> dict:
    """Write an analytic map and a :func:`synthetic_dataset` under ``root`` (tests, demos).

    Layout: ``root/radio_maps/<scene>.zarr`` and ``root/datasets/<scene>`` (which records
    that map). ``sites`` ``[S, 3]`` [m]: the transmitters (default: three spread over the area).
    Returns the config overrides that point a training config at them:
    ``{"data.dataset": ..., "physics_loss.radio_maps_dir": ...}``.
    """
    from pathlib import Path

    from core.stores.lineage import map_path

    root = Path(root)
    half_w, half_h = width * cell / 2, height * cell / 2
    radio_map = analytic_radio_map(height, width, (-half_w, -half_h, half_w, half_h), sites=sites)
    radio_map = RadioMap(radio_map.values, radio_map.features, radio_map.bounds, valid=radio_map.valid,
                         attrs={**radio_map.attrs, "scene": scene}, layers=radio_map.layers)
    radio_map.save(map_path(root / "radio_maps", scene))
    dataset = synthetic_dataset(radio_map, num_ues, reports=reports, k=k, seed=seed, noise=noise)
    dataset.save(root / "datasets" / scene)
    return {"data.dataset": str(root / "datasets" / scene), "physics_loss.radio_maps_dir": str(root / "radio_maps")}


def with_geometric_site_layers(radio_map: RadioMap, rx_height: float = 1.5) -> RadioMap:
    """A copy of ``radio_map`` whose per-site ToA and AoA layers are the straight-line ones.

    ``site_toa = |p - q_s| / c`` [ns] and ``site_aoa = azimuth(q_s - p)`` [deg] at every cell
    centre ``p`` (height ``rx_height``) for the sites of ``attrs["sites"]``; the existing
    ``site_path_gain`` layer (NaN where no ray arrived) is kept and sets where each site
    has a path, else free-space path gain everywhere. A stand-in for maps generated
    before the per-site ToA/AoA layers existed: a geometric (line-of-sight) model.
    """
    sites = np.array([q["position"] for q in radio_map.attrs["sites"]], dtype=np.float64)
    h, w = radio_map.shape
    xs, ys = radio_map.cell_centers()
    gx, gy = np.meshgrid(xs, ys)
    per_site = site_layers_at(np.stack([gx.ravel(), gy.ravel()], axis=1), sites, rx_height=rx_height)
    layers = {f"site_{name}": v.T.reshape(len(sites), h, w).astype(np.float32) for name, v in per_site.items()}
    if "site_path_gain" in radio_map.layers:
        pg = radio_map.layers["site_path_gain"]
        heard = np.isfinite(pg)
        layers["site_path_gain"] = pg.astype(np.float32)
        for name in ("site_toa", "site_aoa"):
            layers[name] = np.where(heard, layers[name], np.nan).astype(np.float32)
    merged = {**radio_map.layers, **layers}
    return RadioMap(radio_map.values, radio_map.features, radio_map.bounds, valid=radio_map.valid,
                    attrs=radio_map.attrs, layers=merged)

