"""The σ ellipse of a position estimate: a covariance ``[N, 2, 2]`` and its semi-axes and orientation.

* network: its Gaussian, ``C = diag(sigma_x^2, sigma_y^2)`` (the fine head's per-axis std);
* MAP (network + map) and exhaustive map matching: the Laplace approximation at the estimate ``p``, the
  inverse of the Fisher information of the pooled observation there plus the prior's precision::

      F = sum_{slot k, feature f} n_kf / scale_{s_k,f}^2 * g_kf g_kf^T      g_kf = d map_{s_k,f} / d p
      C = (F + P)^-1          P = diag(1 / sigma_x^2, 1 / sigma_y^2) (network + MAP), 0 (no network)

  with ``n_kf`` the reports pooled into the slot, ``scale`` the run's calibrated per-site scales (dB, ns,
  deg; the robust likelihood's Gaussian core) and ``g`` the map's gradient where the site has a path
  (:func:`core.physics.bound.slot_gradients`). A singular ``F + P`` (one site, ToA only...) gives inf axes.

:func:`ellipse_axes` turns ``C`` into (semi-major, semi-minor) [m] = sqrt of its eigenvalues and the
major axis' angle [deg], counter-clockwise from +x in (-90, 90]: the 1σ ellipse (39 % of a 2-D Gaussian).
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["diagonal_covariance", "laplace_covariance", "ellipse_axes"]


def diagonal_covariance(sigma: np.ndarray) -> np.ndarray:
    """``[N, 2, 2]`` from per-axis std ``sigma [N, 2]`` [m]."""
    s = np.asarray(sigma, np.float64)
    cov = np.zeros((len(s), 2, 2))
    cov[:, 0, 0], cov[:, 1, 1] = s[:, 0] ** 2, s[:, 1] ** 2
    return cov


def laplace_covariance(likelihood, obs, xy: np.ndarray, prior_sigma: np.ndarray | None = None,
                       chunk: int = 8192) -> np.ndarray:
    """``[N, 2, 2]`` [m^2] (see the module doc) at ``xy [N, 2]`` for the SiteObservation ``obs`` under the
    calibrated ``likelihood`` (its maps and calibration); ``prior_sigma [N, 2]`` adds the network's prior."""
    from core.physics.bound import slot_gradients

    maps = likelihood.maps
    scale = np.asarray(likelihood.calibration.scale, np.float64)  # [S, 3]
    ids = obs.site_ids.numpy().astype(np.int64)
    site = obs.site.numpy()
    w = np.ones(site.shape) if obs.weight is None else obs.weight.numpy().astype(np.float64)
    present = np.isfinite(site) & (ids[..., None] >= 0)
    inv2 = 1.0 / np.square(np.maximum(scale[np.clip(ids, 0, len(scale) - 1)], 1e-9))  # [N, K, 3]
    info = np.where(present, w * inv2, 0.0)
    out = np.empty((len(ids), 2, 2))
    for s in range(0, len(ids), chunk):
        sl = slice(s, min(s + chunk, len(ids)))
        g, _ = slot_gradients(maps, torch.as_tensor(np.asarray(xy[sl], np.float64)), torch.as_tensor(ids[sl]))
        g = g.double().cpu().numpy()  # [n, K, 3, 2], 0 where uncovered
        fim = np.einsum("nkf,nkfp,nkfq->npq", info[sl], g, g)
        if prior_sigma is not None:
            ps = np.maximum(np.asarray(prior_sigma[sl], np.float64), 1e-6)
            fim[:, 0, 0] += 1.0 / ps[:, 0] ** 2
            fim[:, 1, 1] += 1.0 / ps[:, 1] ** 2
        det = fim[:, 0, 0] * fim[:, 1, 1] - fim[:, 0, 1] * fim[:, 1, 0]
        ok = det > 1e-12 * np.maximum(fim[:, 0, 0] * fim[:, 1, 1], 1e-300)
        inv = np.stack([np.stack([fim[:, 1, 1], -fim[:, 0, 1]], -1), np.stack([-fim[:, 1, 0], fim[:, 0, 0]], -1)], -2)
        with np.errstate(divide="ignore", invalid="ignore"):
            out[sl] = np.where(ok[:, None, None], inv / det[:, None, None], np.inf)
    return out


def ellipse_axes(cov: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(semi_major [N], semi_minor [N], angle_deg [N])`` of the 1σ ellipses of ``cov [N, 2, 2]``."""
    c = np.asarray(cov, np.float64)
    a, b, d = c[:, 0, 0], c[:, 0, 1], c[:, 1, 1]
    finite = np.isfinite(a) & np.isfinite(b) & np.isfinite(d)
    a, b, d = np.where(finite, a, 0), np.where(finite, b, 0), np.where(finite, d, 0)
    mid, half = (a + d) / 2, np.sqrt(((a - d) / 2) ** 2 + b**2)
    major = np.where(finite, np.sqrt(np.maximum(mid + half, 0)), np.inf)
    minor = np.where(finite, np.sqrt(np.maximum(mid - half, 0)), np.inf)
    angle = np.degrees(0.5 * np.arctan2(2 * b, a - d))  # the major axis, in (-90, 90]
    angle = np.where(angle <= -90, angle + 180, angle)
    return major, minor, np.where(finite, angle, 0.0)
