"""The Cramér–Rao bound of a UE's position: how well ANY unbiased estimator could do.

Each present slot of a report ``r`` measures site ``s``'s feature ``f`` (path gain [dB],
ToA [ns], AoA [deg]) at the UE's position ``p_r``::

    z_{r,s,f} = h_{s,f}(p_r) + n_{r,s,f},        n ~ N(0, sigma_f^2), independent

with ``h`` the map's per-site layer, looked up exactly as the likelihood does
(:class:`~core.physics.site_lookup.SiteMaps`: cell-centred bilinear, AoA on the circle).
Its gradient ``g_{r,s,f} = d h_{s,f} / d p`` [unit/m] at the TRUE position is the
bilinear interpolant's (autograd through ``grid_sample``). The parameters ``theta`` of a
walk and each row's derivative ``a = d z / d theta``:

* ``latest``: the latest present report alone; ``theta = p`` (2), ``a = g``.
* ``window``: the reports within ``window_s`` of the latest present one, each at its own
  true position (displacements known); ``theta = p`` (a common translation), ``a = g``.
* ``walk``: every present report of the walk, displacements known; ``a = g``.
* ``walk_velocity``: every present report, constant velocity unknown (a nuisance):
  ``p_r = p + v (t_r - t_T)``, ``theta = (p, v)`` (4), ``a = (g, (t_r - t_T) g)``, ``p`` the
  position at the walk's last report ``T`` (the label's, present or not).

With a per-walk clock offset (``clock_offset_ns > 0``, one ``b ~ N(0, sigma_b^2)`` added to
every ToA of the walk) ``b`` is one more nuisance: ``a_b = 1`` for ToA rows, prior
information ``1 / sigma_b^2``. The Fisher information [1/m^2 for the position block]::

    FIM = sum_{r,s,f} a a^T / sigma_f^2  (+ the clock prior)        [P, P]
    cov = (FIM^-1)[:2, :2]        rms = sqrt(trace cov)  [m]

``rms`` is the RMS position error of an efficient estimator: a LOCAL bound (it says
nothing about wrong-basin errors) of the oracle world in which the map is exact. Slots
whose site does not cover the cell under the truth carry no gradient and are skipped;
a singular FIM gives ``inf``. The serving-cell features (SNR, SINR, throughput, BLER)
are functions of the same noisy path gains, so they add nothing and are not counted.

**k-path maps.** The likelihood reads a k-path map's ToA and AoA as a mixture over the site's
paths (:mod:`core.physics.likelihood`). The bound then takes, per slot, the gradient of the ONE
path that explains the report at the truth: of the paths of the stencil cells with weight > 0
(each evaluated at the truth from its anchor, :meth:`SiteMaps.path_components`), the one nearest
the measured ``(toa, aoa)`` in ``(r_toa / sigma_toa)^2 + (r_aoa / sigma_aoa)^2``
(:func:`slot_gradients` with ``observed``).
That is the mixture's Fisher information when its paths are apart by many sigmas (the other
paths' responsibilities vanish near the truth); where two paths coincide within the noise the
mixture carries a little less information, so the bound is then slightly optimistic. With
``k = 1`` it is path 0's gradient, as before.

The noise ``sigma_f``: the dataset's measurement model (``attrs["measurement_model"]``,
:class:`~core.stores.measurement_model.MeasurementModel`) -- the noise the data were made
with, so the bound is the one of the measurement; the calibrated scales
(:class:`~core.physics.calibration.Calibration`, median over sites) also hold the map's
own errors at the truth (strongest-path switches, diffraction), which are not noise an
estimator could average away. They are the fallback when a dataset records no model.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from core.errors import CoreError
from core.physics.site_lookup import SiteMaps

__all__ = ["NoiseModel", "PositionBound", "BOUND_KINDS", "noise_model", "slot_gradients", "fisher_information",
           "position_bound", "position_bounds", "walk_reports"]

#: the bounds :func:`position_bounds` returns, in order
BOUND_KINDS: tuple[str, ...] = ("latest", "window", "walk", "walk_velocity")
_TOA = 1


class NoiseModel(NamedTuple):
    """``sigma (path_gain [dB], toa [ns], aoa [deg])``, ``clock_ns`` (per-walk ToA offset sigma, 0 = none),
    ``source`` ("measurement model" or "calibration")."""

    sigma: tuple[float, float, float]
    clock_ns: float
    source: str


class PositionBound(NamedTuple):
    """``cov [N, 2, 2]`` [m^2] and ``rms [N]`` = sqrt(trace cov) [m] (inf where the FIM is singular)."""

    cov: torch.Tensor
    rms: torch.Tensor


def noise_model(dataset, calibration=None) -> NoiseModel:
    """The noise of ``dataset``: its measurement model, else ``calibration``'s scales (median over sites)."""
    model = dataset.measurement_model
    if model is not None:
        return NoiseModel((model.path_gain_db, model.toa_ns, model.aoa_deg), model.clock_offset_ns, "measurement model")
    if calibration is None:
        raise CoreError("bound: the dataset records no measurement model and no calibration was given")
    med = np.median(calibration.scale, axis=0)
    return NoiseModel((float(med[0]), float(med[1]), float(med[2])), 0.0, "calibration")


def slot_gradients(maps: SiteMaps, xy: torch.Tensor, site_ids, observed=None,
                   sigma: tuple[float, float, float] = (1.0, 1.0, 1.0)) -> tuple[torch.Tensor, torch.Tensor]:
    """``(g [M, K, 3, 2], covered [M, K])``: each slot's map gradient at ``xy [M, 2]`` [m].

    ``g[m, k, f]`` = d h_{s,f} / d (x, y) for ``s = site_ids[m, k]`` (dB/m, ns/m, deg/m), 0 in
    empty or uncovered slots. One lookup, then one backward pass per (slot, feature).
    With a k-path ``maps`` and ``observed [M, K, 3]`` (measured values), ToA and AoA take the
    gradient of the path nearest the observation (module doc; ``sigma`` the noise that scales
    the distance).
    """
    if observed is not None and maps.paths > 1:
        return _nearest_path_gradients(maps, xy, site_ids, observed, sigma)
    ids = maps.check_site_ids(site_ids, xy.shape[0])
    with torch.enable_grad():
        q = xy.detach().to(device=maps.device, dtype=maps.dtype).requires_grad_(True)
        out = maps.lookup(q, ids)
        k = ids.shape[1]
        grads = torch.zeros(q.shape[0], k, 3, 2, dtype=maps.dtype, device=maps.device)
        for slot in range(k):
            for f in range(3):
                (g,) = torch.autograd.grad(out.values[:, slot, f].sum(), q, retain_graph=True)
                grads[:, slot, f] = g
    covered = out.covered.detach()
    grads = torch.where(covered[..., None, None] & torch.isfinite(grads), grads, 0.0)
    return grads, covered


def _nearest_path_gradients(maps: SiteMaps, xy: torch.Tensor, site_ids, observed, sigma):
    """:func:`slot_gradients` of a k-path map: path gain as always, ToA/AoA of the nearest path."""
    g, covered = slot_gradients(maps, xy, site_ids)
    ids = maps.check_site_ids(site_ids, xy.shape[0])
    k_paths = maps.components
    with torch.enable_grad():
        q = xy.detach().to(device=maps.device, dtype=maps.dtype).requires_grad_(True)
        paths, weight = maps.path_lookup(q, ids)  # [M, K, C, 2], [M, C]: every path of the stencil cells
        obs = torch.as_tensor(observed, device=maps.device).to(maps.dtype)
        rt = (obs[..., 1:2] - paths[..., 0].detach()) / sigma[1]
        ra = torch.remainder(obs[..., 2:3] - paths[..., 1].detach() + 180.0, 360.0).sub_(180.0) / sigma[2]
        d = torch.nan_to_num(rt.square() + ra.square(), nan=float("inf"))
        d = torch.where(weight.detach()[:, None] > 0, d, float("inf"))  # only cells of the stencil with weight
        best = d.argmin(-1)  # [M, K]
        k = ids.shape[1]
        for slot in range(k):
            for f in range(2):
                grads = []
                for j in range(k_paths):
                    (gj,) = torch.autograd.grad(paths[:, slot, j, f].sum(), q, retain_graph=True)
                    grads.append(gj)
                pick = torch.stack(grads, 1).gather(1, best[:, slot].view(-1, 1, 1).expand(-1, 1, 2))[:, 0]
                has = torch.isfinite(obs[:, slot, 1:3]).all(-1, keepdim=True)
                g[:, slot, 1 + f] = torch.where(has & covered[:, slot, None] & torch.isfinite(pick), pick,
                                                g[:, slot, 1 + f])
    return g, covered


def fisher_information(grads: torch.Tensor, weight: torch.Tensor, dt: torch.Tensor | None = None,
                       clock_ns: float = 0.0) -> torch.Tensor:
    """The FIM ``[N, P, P]`` of one walk per row from its rows' gradients.

    Args:
        grads: ``[N, T, K, 3, 2]`` slot gradients at the reports' true positions.
        weight: ``[N, T, K, 3]`` ``1 / sigma_f^2`` where the value is present and used, else 0.
        dt: ``[N, T]`` ``t_r - t_last`` [s] to estimate a velocity too (``P = 4``), or None (``P = 2``).
        clock_ns: sigma of a per-walk ToA offset (a nuisance, ``P + 1``); 0 = none.
    """
    cols = [grads]
    if dt is not None:
        cols.append(grads * dt[:, :, None, None, None])
    if clock_ns > 0:
        c = torch.zeros(grads.shape[:-1] + (1,), dtype=grads.dtype, device=grads.device)
        c[..., _TOA, 0] = 1.0
        cols.append(c)
    a = torch.cat(cols, dim=-1)  # [N, T, K, 3, P]
    fim = torch.einsum("ntkf,ntkfp,ntkfq->npq", weight, a, a)
    if clock_ns > 0:
        fim[:, -1, -1] += 1.0 / clock_ns**2
    return fim


def position_bound(fim: torch.Tensor, rcond: float = 1e-10) -> PositionBound:
    """The position block of ``FIM^-1`` and its RMS (see the module doc).

    The FIM is Jacobi-scaled (``D F D``, ``D = diag(F)^-1/2``) before inverting; where the
    scaled matrix's smallest eigenvalue is below ``rcond`` times its largest (a direction
    the data do not observe) the bound is ``inf``.
    """
    f64 = fim.to(torch.float64)
    diag = torch.diagonal(f64, dim1=-2, dim2=-1)
    scale = diag.clamp(min=1e-300).rsqrt()
    scaled = f64 * scale[:, :, None] * scale[:, None, :]
    eig = torch.linalg.eigvalsh(scaled)
    bad = (diag <= 0).any(1) | ~torch.isfinite(eig).all(1) | (eig[:, 0] <= rcond * eig[:, -1].clamp(min=1e-300))
    eye = torch.eye(f64.shape[-1], dtype=f64.dtype, device=f64.device)
    inv = torch.linalg.inv(torch.where(bad[:, None, None], eye, scaled)) * scale[:, :, None] * scale[:, None, :]
    cov = torch.where(bad[:, None, None], torch.full_like(inv[:, :2, :2], float("inf")), inv[:, :2, :2])
    rms = torch.diagonal(cov, dim1=-2, dim2=-1).sum(-1).sqrt()
    return PositionBound(cov, rms)


def walk_reports(dataset, indices) -> tuple[np.ndarray, ...]:
    """``(xy [N, T, 2], t [N, T], present [N, T], site_ids [N, T, K], site [N, T, K, 3])`` of
    ``dataset[indices]``: the true positions, times, present reports (with a site), their slots."""
    idx = np.asarray(indices, dtype=np.int64)
    ids = np.asarray(dataset.site_ids[idx]).astype(np.int64)
    present = np.asarray(dataset.report_mask[idx]) & (ids[..., 0] >= 0)
    ids = np.where(present[..., None], ids, -1)
    site = np.where(present[..., None, None], dataset.site_features[idx], np.nan)
    return (np.asarray(dataset.ue_xyz[idx][..., :2], np.float64), np.asarray(dataset.t[idx], np.float64), present,
            ids, site)


def position_bounds(maps: SiteMaps, dataset, indices, noise: NoiseModel, window_s: float,
                    features=("path_gain", "toa", "aoa"), chunk: int = 4096) -> dict[str, PositionBound]:
    """``{kind: PositionBound [N]}`` for every kind of :data:`BOUND_KINDS` (see the module doc).

    ``maps``: the scene's SiteMaps; ``indices``: samples of ``dataset``; ``noise``: from
    :func:`noise_model`; ``window_s`` [s]: the pooled window (the run's ``report_window_s``);
    ``features``: the per-site features counted.
    """
    from core.physics.calibration import SITE_FEATURES

    unknown = [f for f in features if f not in SITE_FEATURES]
    if unknown:
        raise CoreError(f"bound: unknown feature(s) {unknown} (known: {list(SITE_FEATURES)})")
    if not (window_s >= 0):
        raise CoreError(f"bound: window_s must be >= 0 s, got {window_s}")
    xy, t, present, ids, site = walk_reports(dataset, indices)
    n, t_len, k = ids.shape
    use = np.array([f in features for f in SITE_FEATURES])
    inv2 = np.where(use, 1.0 / np.square(np.maximum(noise.sigma, 1e-9)), 0.0)
    parts: dict[str, list] = {kind: [] for kind in BOUND_KINDS}
    latest = t_len - 1 - np.argmax(present[:, ::-1], axis=1)
    for s in range(0, n, chunk):
        sl = slice(s, min(s + chunk, n))
        m = sl.stop - sl.start
        g, covered = slot_gradients(maps, torch.as_tensor(xy[sl].reshape(-1, 2)), torch.as_tensor(ids[sl].reshape(-1, k)),
                                    site[sl].reshape(-1, k, 3), noise.sigma)
        g = g.double().view(m, t_len, k, 3, 2)
        ok = torch.as_tensor(np.isfinite(site[sl])) & covered.view(m, t_len, k, 1).cpu()
        w = ok.double() * torch.as_tensor(inv2)
        tt = torch.as_tensor(t[sl])
        last = torch.as_tensor(latest[sl])
        t_last = tt.gather(1, last[:, None])
        steps = torch.arange(t_len)[None]
        sel = {"latest": steps == last[:, None],
               "window": (tt <= t_last + 1e-9) & (tt >= t_last - window_s - 1e-9),
               "walk": torch.ones(m, t_len, dtype=torch.bool)}
        for kind in BOUND_KINDS:
            mask = sel["walk" if kind == "walk_velocity" else kind].double()[:, :, None, None]
            dt = (tt - tt[:, -1:]) if kind == "walk_velocity" else None  # p: the label's position
            fim = fisher_information(g, w * mask, dt, noise.clock_ns)
            parts[kind].append(position_bound(fim))
    return {kind: PositionBound(*(torch.cat([p[i] for p in v]) if v else torch.zeros(0) for i in range(2)))
            for kind, v in parts.items()}
