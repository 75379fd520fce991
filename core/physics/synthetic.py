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
"""

from __future__ import annotations

import numpy as np

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


def analytic_radio_map(
    height: int = 64,
    width: int = 96,
    bounds: tuple[float, float, float, float] = (-96.0, -64.0, 96.0, 64.0),
    sites: np.ndarray | None = None,
    features: tuple[str, ...] = DEFAULT_FEATURE_ORDER,
    **kwargs,
) -> RadioMap:
    """A :class:`RadioMap` of :func:`analytic_features` sampled at the cell centres.

    Default sites: three at 25 m height spread over the area. ``attrs["sites"]`` lists
    them in the same format as generated maps.
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
    attrs = {
        "scene": "analytic",
        "sites": [{"name": f"site{s}", "position": [float(v) for v in pos]} for s, pos in enumerate(sites)],
        "generator": {"kind": "analytic free space"},
    }
    return RadioMap(values, features, bounds, attrs=attrs)


def _reflected_walks(rng, radio_map: RadioMap, n: int, t: np.ndarray, speed_mps: tuple[float, float]) -> np.ndarray:
    """``[N, T, 2]`` straight walks at times ``t [T]`` [s], reflected at the map's edges (one cell in)."""
    x_min, y_min, x_max, y_max = radio_map.bounds
    margin = radio_map.cell_size
    start = rng.uniform([x_min + margin, y_min + margin], [x_max - margin, y_max - margin], size=(n, 2))
    heading = rng.uniform(-np.pi, np.pi, size=n)
    speed = rng.uniform(*speed_mps, size=n)
    path = start[:, None, :] + (speed[:, None] * np.stack([np.cos(heading), np.sin(heading)], 1))[:, None, :] * t[None, :, None]
    lo, hi = np.array([x_min + margin, y_min + margin]), np.array([x_max - margin, y_max - margin])
    span = hi - lo
    folded = np.mod(path - lo, 2 * span)
    return lo + np.where(folded > span, 2 * span - folded, folded)


def _strongest_sites(xy: np.ndarray, sites: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """``(features [M, k, 3], ids int16 [M, k])`` of the ``k`` strongest sites at points ``xy [M, 2]``."""
    from core.stores.dataset import SITE_FEATURES

    # with one site, analytic_features' serving site is that site
    per_site = np.stack(
        [analytic_features(xy, sites[s : s + 1], features=SITE_FEATURES) for s in range(len(sites))], axis=1
    )  # [M, S, 3]
    order = np.argsort(-per_site[:, :, 0], axis=1)[:, :k]  # strongest first
    kk = order.shape[1]
    site_feat = np.full((len(xy), k, 3), np.nan)
    site_feat[:, :kk] = np.take_along_axis(per_site, order[:, :, None], axis=1)
    site_ids = np.full((len(xy), k), -1, dtype=np.int16)
    site_ids[:, :kk] = order
    return site_feat, site_ids


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
    Free space, so every report is line of sight. Split: 80 % train, 10 % val, 10 % test.
    When ``radio_map`` was saved or loaded, the dataset records it as the map it was made with.
    """
    from core.stores.dataset import CELL_FEATURES, MeasurementDataset

    rng = np.random.default_rng(seed)
    sites = np.array([s["position"] for s in radio_map.attrs["sites"]], dtype=np.float64)  # [S, 3]
    n, t_len = int(num_ues), int(reports)
    t = (np.arange(t_len) * report_interval_s).astype(np.float32)
    path = _reflected_walks(rng, radio_map, n, t, speed_mps)
    flat = path.reshape(-1, 2)
    site_feat, site_ids = _strongest_sites(flat, sites, k)
    cell_feat = analytic_features(flat, sites, features=CELL_FEATURES)  # [N*T, 4]

    clean_site, clean_cell = site_feat.copy(), cell_feat.copy()
    if noise:
        site_feat = site_feat + rng.normal(size=site_feat.shape) * np.array([2.0, 3.0, 5.0])
        site_feat[..., 2] = (site_feat[..., 2] + 180.0) % 360.0 - 180.0
        cell_feat = cell_feat + rng.normal(size=cell_feat.shape) * np.array([1.0, 1.0, 0.0, 0.02])
        cell_feat[:, 2] *= np.exp(0.05 * rng.normal(size=len(cell_feat)))
        cell_feat[:, 3] = cell_feat[:, 3].clip(0.0, 1.0)

    mask = rng.random((n, t_len)) >= missing_prob
    mask[~mask.any(axis=1), -1] = True
    flat_mask = mask.reshape(-1)
    for arr in (site_feat, cell_feat, clean_site, clean_cell):
        arr[~flat_mask] = np.nan
    site_ids[~flat_mask] = -1

    split = np.zeros(n, dtype=np.int8)
    perm = rng.permutation(n)
    split[perm[int(0.8 * n) : int(0.9 * n)]] = 1
    split[perm[int(0.9 * n) :]] = 2
    ue_xyz = np.concatenate([path, np.full((n, t_len, 1), 1.5)], axis=-1).astype(np.float32)
    return MeasurementDataset(
        ue_xyz=ue_xyz,
        t=np.broadcast_to(t, (n, t_len)).copy(),
        report_mask=mask,
        site_ids=site_ids.reshape(n, t_len, k),
        site_features=site_feat.reshape(n, t_len, k, 3).astype(np.float32),
        cell_features=cell_feat.reshape(n, t_len, 4).astype(np.float32),
        los=mask.copy(),
        split=split,
        attrs={"scene": radio_map.attrs.get("scene", "analytic"), "sites": radio_map.attrs.get("sites", []),
               "noise": bool(noise), "seed": int(seed), "generator": {"kind": "analytic random walks"}},
        clean_site_features=clean_site.reshape(n, t_len, k, 3).astype(np.float32),
        clean_cell_features=clean_cell.reshape(n, t_len, 4).astype(np.float32),
        radio_map_ref=radio_map.ref if radio_map.lineage else None,
    )


def synthetic_scene(root, num_ues: int = 200, height: int = 32, width: int = 32, cell: float = 4.0,
                    reports: int = 8, k: int = 3, seed: int = 0, noise: bool = True, scene: str = "analytic") -> dict:
    """Write an analytic map and a :func:`synthetic_dataset` under ``root`` (tests, demos).

    Layout: ``root/radio_maps/<scene>.zarr`` and ``root/datasets/<scene>`` (which records
    that map). Returns the config overrides that point a training config at them:
    ``{"data.dataset": ..., "physics_loss.radio_maps_dir": ...}``.
    """
    from pathlib import Path

    root = Path(root)
    half_w, half_h = width * cell / 2, height * cell / 2
    radio_map = analytic_radio_map(height, width, (-half_w, -half_h, half_w, half_h))
    radio_map = RadioMap(radio_map.values, radio_map.features, radio_map.bounds, attrs={**radio_map.attrs, "scene": scene})
    radio_map.save(root / "radio_maps" / f"{scene}.zarr")
    dataset = synthetic_dataset(radio_map, num_ues, reports=reports, k=k, seed=seed, noise=noise)
    dataset.save(root / "datasets" / scene)
    return {"data.dataset": str(root / "datasets" / scene), "physics_loss.radio_maps_dir": str(root / "radio_maps")}
