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
from core.radio_map import RadioMap

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
