"""Classical map-based localization baselines, on the same observations as the model.

Both compare a sample's observation ``o[F]`` (serving-site features of its last report,
in map order; see :func:`core.data_loading.physics_observation`) with every COVERED
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

* Multilateration (:mod:`core.physics.multilateration`): no map at all -- robust ToA +
  AoA positioning from the reported sites' known positions (``attrs["sites"]``), kept
  inside the map's bounds.
"""

from __future__ import annotations

import numpy as np
import torch

from core.features import feature_spec
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


def multilateration(dataset, radio_map: RadioMap, indices) -> np.ndarray | None:
    """``[N, 2]`` multilateration estimates, or None when the site positions are unknown."""
    from core.physics.multilateration import multilaterate_dataset

    sites = dataset.attrs.get("sites") or radio_map.attrs.get("sites") or []
    if not sites:
        return None
    xyz = np.array([s["position"] for s in sites], dtype=np.float64)
    return multilaterate_dataset(dataset, indices, site_xyz=xyz, bounds=radio_map.bounds)


def run_baselines(dataset, radio_map: RadioMap, indices, config=None, k: int = 5) -> dict[str, np.ndarray]:
    """``{"knn": xy [N, 2], "ml": xy [N, 2], "multilateration": xy [N, 2]}`` for samples
    ``indices`` of ``dataset`` (multilateration only when the sites' positions are known)."""
    from core.learning.data_loading import physics_observation

    obs = physics_observation(dataset.subset(np.asarray(indices)), radio_map.features,
                              config.physics_loss.observation if config else "latest")
    mask = np.isfinite(obs)
    p = config.physics_loss if config else None
    if p is not None and p.feature_weights == "auto":
        from core.learning.physics_terms import resolve_config

        p = resolve_config(config, dataset, radio_map).physics_loss
    out = {
        "knn": knn_fingerprint(radio_map, obs, mask, k=k),
        "ml": ml_map_matching(radio_map, obs, mask, weights=p.feature_weights if p else None,
                              loss=p.loss if p else "huber", huber_delta=p.huber_delta if p else 1.0),
    }
    mlat = multilateration(dataset, radio_map, np.asarray(indices))
    if mlat is not None:
        out["multilateration"] = mlat
    return out
