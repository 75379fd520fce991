"""Classical and map-only localization baselines, on the same reports as the model and MAP.

Every baseline reads the reports of the ONE report window (the run's
``physics_loss.report_window_s``, default :data:`core.features.REPORT_WINDOW_S`): the present
reports within that time of the sample's latest present one.

kNN and ML map matching compare a sample's observation ``o[F]`` (serving-site features averaged
over the window, circular for AoA, in map order; see
:func:`core.learning.data_loading.physics_observation`) with every COVERED
cell ``c`` of the radio map, whose value ``v_c[F]`` is the cell average at its centre.
Residuals are normalised by the map's statistics (``sigma_f``; AoA residuals wrapped to
(-180, 180]); masked (missing) features are skipped.

* kNN fingerprinting: ``d_c^2 = sum_f ((o_f - v_{c,f}) / sigma_f)^2``; the estimate is
  the mean centre of the ``k`` cells with the smallest ``d_c``.
* Maximum-likelihood map matching: the covered cell centre that minimises the physics
  loss ``sum_f w_f rho((o_f - v_{c,f}) / sigma_f)`` (the run's weights, MSE or Huber),
  found exhaustively.

Both run batched: ``[B, M]`` distance blocks accumulated feature by feature, so memory
is ``O(B * M)`` for ``M`` covered cells.

* Multilateration (:mod:`core.physics.multilateration`): no map at all -- multi-start robust
  ToA + AoA positioning from the reported sites' known positions (``attrs["sites"]``), the
  reports pooled per site over the window, kept inside the map's bounds.
* Exhaustive map matching (:mod:`core.physics.exhaustive`): the strongest map-only baseline --
  the calibrated per-site likelihood MAP refinement uses (calibrated on the train split, or the
  run's), searched over the whole map coarse to fine with no network and no prior.

:func:`run_baselines` also records each method's cost (seconds per sample) when asked.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from core.features import REPORT_WINDOW_S, feature_spec
from core.physics.physics_loss import guarded_sigma, resolve_weights
from core.stores.radio_map import RadioMap


def covered_cells(radio_map: RadioMap) -> tuple[np.ndarray, np.ndarray]:
    """``(centres [M, 2] m, values [M, F])`` of the covered cells."""
    xs, ys = radio_map.cell_centers()
    i, j = np.nonzero(radio_map.valid)
    return np.stack([xs[j], ys[i]], 1), radio_map.values[:, i, j].T


def _scores(radio_map: RadioMap, observed, mask, rho: str, weights, batch_size: int, reduce, huber_delta=1.0):
    """Run ``reduce(score [B, M], centres)`` over batches; ``score = sum_f weights_f rho(z_f)``.

    The ``[B, M]`` work buffers are allocated once and reused with in-place ops: fresh
    multi-megabyte temporaries per feature cost more in page faults than in arithmetic.
    """
    centres, values = covered_cells(radio_map)
    # the physics loss's normalisation: map statistics, guarded against 0/inf
    sigma = [guarded_sigma(radio_map.stats[n].mean, radio_map.stats[n].std, feature_spec(n).angular)
             for n in radio_map.features]
    cent = torch.from_numpy(centres)
    vals = torch.from_numpy(np.ascontiguousarray(values.T.astype(np.float32)))  # [F, M]
    obs = torch.as_tensor(np.asarray(observed), dtype=torch.float32)
    msk = torch.ones_like(obs, dtype=torch.bool) if mask is None else torch.as_tensor(np.asarray(mask)).bool()
    obs = torch.where(msk, obs, torch.zeros(()))
    angular = [feature_spec(n).angular for n in radio_map.features]
    m_cells = vals.shape[1]
    score_buf = torch.empty(batch_size, m_cells)
    r_buf = torch.empty(batch_size, m_cells)
    q_buf = torch.empty(batch_size, m_cells)
    out = []
    for s in range(0, len(obs), batch_size):
        o, m = obs[s : s + batch_size], msk[s : s + batch_size]
        b = len(o)
        score, r, q = score_buf[:b].zero_(), r_buf[:b], q_buf[:b]
        for f in range(vals.shape[0]):
            if weights[f] == 0:
                continue
            torch.sub(o[:, f : f + 1], vals[f][None, :], out=r)  # residual o - v
            if angular[f]:  # wrap to [-180, 180): ((r + 180) mod 360) - 180
                r.add_(180.0).remainder_(360.0).sub_(180.0)
            r.abs_().mul_(1.0 / float(sigma[f]))  # |z|
            if rho == "mse":
                r.mul_(r)
            else:  # Huber: q (|z| - q / 2) with q = min(|z|, delta)
                torch.clamp(r, max=huber_delta, out=q)
                r.sub_(q, alpha=0.5).mul_(q)
            r.mul_((float(weights[f]) * m[:, f : f + 1]).to(r.dtype))
            score.add_(r)
        out.append(reduce(score, cent))
    return np.concatenate(out) if out else np.zeros((0, 2))


def knn_fingerprint(radio_map: RadioMap, observed, mask=None, k: int = 5, batch_size: int = 16) -> np.ndarray:
    """``[N, 2]`` estimates: mean centre of the ``k`` nearest covered cells in normalised feature space."""

    def reduce(score, cent):
        idx = torch.topk(score, min(k, score.shape[1]), dim=1, largest=False).indices
        return cent[idx].mean(1).numpy()

    return _scores(radio_map, observed, mask, "mse", [1.0] * len(radio_map.features), batch_size, reduce)


def ml_map_matching(radio_map: RadioMap, observed, mask=None, weights: dict[str, float] | None = None,
                    loss: str = "huber", huber_delta: float = 1.0, batch_size: int = 16) -> np.ndarray:
    """``[N, 2]`` estimates: the covered cell centre minimising the physics loss (exhaustive)."""
    w = resolve_weights(radio_map.features, weights)

    def reduce(score, cent):
        return cent[score.argmin(1)].numpy()

    return _scores(radio_map, observed, mask, loss, w, batch_size, reduce, huber_delta)


def multilateration(dataset, radio_map: RadioMap, indices, window_s: float = REPORT_WINDOW_S) -> np.ndarray | None:
    """``[N, 2]`` multilateration estimates (reports pooled over ``window_s``), or None when the site
    positions are unknown."""
    from core.physics.multilateration import MultilaterationConfig, multilaterate_dataset

    sites = dataset.attrs.get("sites") or radio_map.attrs.get("sites") or []
    if not sites:
        return None
    xyz = np.array([s["position"] for s in sites], dtype=np.float64)
    return multilaterate_dataset(dataset, indices, site_xyz=xyz, bounds=radio_map.bounds,
                                 config=MultilaterationConfig(window_s=window_s))


def has_site_layers(radio_map: RadioMap) -> bool:
    """Whether the map has the per-site layers the likelihood reads."""
    from core.stores.radio_map import SITE_LAYERS

    return all(layer in radio_map.layers for layer in SITE_LAYERS)


def calibrated_likelihood(dataset, radio_map: RadioMap, config=None, device="cpu"):
    """The :class:`~core.physics.likelihood.RobustLikelihood` a run would use: calibrated on the dataset's
    train split (every present report at its true position), the config's likelihood settings."""
    from core.learning.physics_terms import likelihood_config
    from core.physics.calibration import calibrate
    from core.physics.likelihood import LikelihoodConfig, RobustLikelihood

    cal = calibrate(dataset, radio_map, split="train")
    cfg = likelihood_config(config.physics_loss) if config is not None else LikelihoodConfig()
    return RobustLikelihood(radio_map, cal, cfg, device=device)


def exhaustive_map_matching(dataset, likelihood, indices, window_s: float = REPORT_WINDOW_S) -> np.ndarray:
    """``[N, 2]``: the calibrated likelihood of the reports pooled over ``window_s`` searched over the whole
    map (:class:`~core.physics.exhaustive.ExhaustiveMatcher`)."""
    from core.physics.exhaustive import ExhaustiveMatcher
    from core.physics.observation import site_observation

    obs = site_observation(dataset, np.asarray(indices), window_s=window_s)
    return ExhaustiveMatcher(likelihood)(obs).xy.detach().cpu().numpy().astype(np.float64)


def run_baselines(dataset, radio_map: RadioMap, indices, config=None, k: int = 5, likelihood=None,
                  timings: dict[str, float] | None = None) -> dict[str, np.ndarray]:
    """``{"knn", "ml", "multilateration", "exhaustive": xy [N, 2]}`` for samples ``indices`` of ``dataset``
    (multilateration only when the sites' positions are known, exhaustive map matching only with a
    ``likelihood`` or a map with per-site layers), every one on the reports of the config's
    ``physics_loss.report_window_s`` (default :data:`~core.features.REPORT_WINDOW_S`).

    ``likelihood``: the calibrated likelihood of exhaustive map matching (a run's: ``LoadedRun.likelihood``);
    None calibrates one on the dataset's train split (:func:`calibrated_likelihood`). ``timings``: filled
    with ``{method: seconds per sample}``."""
    from core.learning.data_loading import physics_observation

    idx = np.asarray(indices)
    window = config.physics_loss.report_window_s if config is not None else REPORT_WINDOW_S
    p = config.physics_loss if config else None
    if p is not None and p.feature_weights == "auto":
        from core.learning.physics_terms import resolve_config

        p = resolve_config(config, dataset, radio_map).physics_loss
    clock = {} if timings is None else timings

    def timed(name, fn):
        t0 = time.perf_counter()
        out = fn()
        clock[name] = (time.perf_counter() - t0) / max(len(idx), 1)
        return out

    obs = physics_observation(dataset.subset(idx), radio_map.features, p.observation if p else "latest",
                              window_s=window)
    mask = np.isfinite(obs)
    out = {
        "knn": timed("knn", lambda: knn_fingerprint(radio_map, obs, mask, k=k)),
        "ml": timed("ml", lambda: ml_map_matching(radio_map, obs, mask, weights=p.feature_weights if p else None,
                                                  loss=p.loss if p else "huber",
                                                  huber_delta=p.huber_delta if p else 1.0)),
    }
    mlat = timed("multilateration", lambda: multilateration(dataset, radio_map, idx, window))
    if mlat is not None:
        out["multilateration"] = mlat
    else:
        clock.pop("multilateration")
    if likelihood is None and not has_site_layers(radio_map):
        return out  # a map without per-site layers has no per-site likelihood
    lik = likelihood if likelihood is not None else calibrated_likelihood(dataset, radio_map, config)
    out["exhaustive"] = timed("exhaustive", lambda: exhaustive_map_matching(dataset, lik, idx, window))
    return out
