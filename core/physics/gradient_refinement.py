"""Gradient refinement on the serving-map physics loss (the original test-time refinement).

Kept for the run's ``--refine`` path (:func:`core.learning.inference.refine_prediction`)
until it moves to the MAP search of :mod:`core.physics.refinement`, which re-exports
:func:`refine` and :class:`RefinementResult` from here.

For each selected sample ``n`` (confidence below the threshold) it minimises::

    J_n(p) = L_n(p) + sum_d ((p_d - p0_{n,d}) / s_{n,d})^2        (prior term optional)

with ``L_n`` the per-sample physics loss (:class:`~core.physics_loss.PhysicsLoss`),
``p0_n`` the network's prediction and ``s_n`` its predicted standard deviation [m].
With the MSE loss both terms are squared normalised residuals (twice a Gaussian
negative log-likelihood), so the minimiser is the MAP estimate under a Gaussian prior
``N(p0, s^2)``; the prior keeps refinement from drifting on flat or ambiguous maps.

Optimisation: Adam (Kingma & Ba; beta1 0.9, beta2 0.999, eps 1e-8) with step ``lr``
metres, on ONE ``[M, 2]`` tensor holding all selected samples. Adam is elementwise and
``sum_n J_n`` separates over samples, so every sample gets exactly its own Adam run.
After each step positions are clamped to their scene's outer bounds. Unselected
samples are never touched: they come back bit-identical.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from core.errors import CoreError
from core.physics.physics_loss import PhysicsLoss, residual_in_feature_order

__all__ = ["refine", "RefinementResult"]

_BETA1, _BETA2, _EPS = 0.9, 0.999, 1e-8


@dataclass
class RefinementResult:
    """What :func:`refine` returns (all detached, on the input's device).

    Attributes:
        xy: ``[N, 2]`` refined positions [m] (the input, bit-identical, where not refined).
        path: ``[steps + 1, N, 2]`` positions after each step, the start included.
        loss: ``[steps + 1, N]`` objective ``J_n`` (physics + prior) at each path point.
        physics: ``[steps + 1, N]`` physics part ``L_n`` at each path point.
        refined: bool ``[N]``, the samples that were optimised.
        residual_start, residual_end: ``[N, F]`` raw residuals ``observed - map(p)``
            (feature units, AoA wrapped, 0 where masked) at the start and the end.
        features: feature names of the residual columns.
    """

    xy: torch.Tensor
    path: torch.Tensor
    loss: torch.Tensor
    physics: torch.Tensor
    refined: torch.Tensor
    residual_start: torch.Tensor
    residual_end: torch.Tensor
    features: tuple[str, ...]


def _as_loss(radio_map) -> PhysicsLoss:
    if isinstance(radio_map, PhysicsLoss):
        return radio_map
    return PhysicsLoss(radio_map)  # RadioMap, list of RadioMaps or PreparedMaps (shared)


def _prior_scale(prior_sigma, n: int, device, dtype) -> torch.Tensor | None:
    """``1 / s`` as ``[N, 2]`` (or None)."""
    if prior_sigma is None:
        return None
    s = torch.as_tensor(prior_sigma, device=device).to(dtype)
    if s.ndim == 0:
        s = s.expand(n)
    if s.shape == (n,):
        s = s.unsqueeze(1).expand(n, 2)
    if s.shape != (n, 2):
        raise CoreError(f"refine: prior_sigma must be a number, [N] or [N, 2] metres, got {tuple(s.shape)}")
    if not bool((s > 0).all()):
        raise CoreError("refine: prior_sigma must be > 0 everywhere")
    return 1.0 / s


def refine(
    pred_xy: torch.Tensor,
    observed: torch.Tensor,
    radio_map,
    steps: int = 5,
    lr: float = 0.5,
    confidence: torch.Tensor | None = None,
    threshold: float = 0.5,
    prior_sigma=None,
    mask: torch.Tensor | None = None,
    scene_index: torch.Tensor | None = None,
) -> RefinementResult:
    """Refine predicted positions by gradient descent on the physics loss.

    Args:
        pred_xy: ``[N, 2]`` predicted positions [m].
        observed: ``[N, F]`` observed features in the map's feature order.
        radio_map: a :class:`PhysicsLoss` (its weights, loss and prepared maps are used;
            the cheap way when called repeatedly), a PreparedMaps, a RadioMap or a list
            of RadioMaps (prepared on every call, with default weights).
        steps: Adam steps (>= 0).
        lr: Adam step size [m].
        confidence: ``[N]``; only samples with ``confidence < threshold`` move. All move
            when omitted.
        threshold: the confidence gate.
        prior_sigma: the prediction's std [m], a number, ``[N]`` or ``[N, 2]``; adds the
            Gaussian prior term (MAP estimate). No prior when omitted.
        mask: bool ``[N, F]``, valid observations.
        scene_index: long ``[N]`` for multi-scene maps.

    Works when the caller is under ``torch.no_grad()``; runs on the device of ``pred_xy``.
    """
    loss_fn = _as_loss(radio_map)
    if int(steps) != steps or steps < 0:
        raise CoreError(f"refine: steps must be an integer >= 0, got {steps}")
    if not lr > 0:
        raise CoreError(f"refine: lr must be > 0, got {lr}")
    steps = int(steps)
    pred_xy = pred_xy.detach()
    inputs = loss_fn.prepare_inputs(pred_xy, observed, mask, scene_index)
    xy = inputs.xy
    n = xy.shape[0]
    device, dtype = xy.device, xy.dtype
    inv_s = _prior_scale(prior_sigma, n, device, dtype)

    if confidence is None:
        refined = torch.ones(n, dtype=torch.bool, device=device)
    else:
        confidence = torch.as_tensor(confidence, device=device)
        if confidence.shape != (n,):
            raise CoreError(f"refine: confidence must be [{n}], got {tuple(confidence.shape)}")
        refined = confidence < threshold
    idx = refined.nonzero().squeeze(1)
    m = idx.numel()
    everyone = m == n
    features = loss_fn.maps.num_features

    with torch.no_grad():
        path = pred_xy.unsqueeze(0).repeat(steps + 1, 1, 1)
        out_xy = pred_xy.clone()
        physics = torch.empty(steps + 1, n, dtype=dtype, device=device)
        if everyone and steps:  # the first step's evaluation gives the start
            residual_start = torch.empty(n, features, dtype=dtype, device=device)
        else:  # the start, for every sample (unrefined ones keep this loss throughout)
            ev0 = loss_fn.evaluate(xy, inputs)
            physics[:] = ev0.per_sample
            residual_start = residual_in_feature_order(loss_fn.maps, ev0.r_lin, ev0.r_ang)
        residual_end = residual_start.clone()

    if m and steps:
        sub = inputs if everyone else inputs.take(idx)
        p0 = sub.xy
        inv = inv_s if (inv_s is None or everyone) else inv_s[idx]
        lo, hi = loss_fn.maps.box(sub.scene_index)
        p = p0.clone()
        m1 = torch.zeros_like(p)
        m2 = torch.zeros_like(p)
        for k in range(steps + 1):
            last = k == steps
            with torch.enable_grad():
                q = p.detach().requires_grad_(not last)
                ev = loss_fn.evaluate(q, sub)
                if not last:
                    objective = ev.per_sample if inv is None else ev.per_sample + ((q - p0) * inv).square().sum(1)
                    (grad,) = torch.autograd.grad(objective.sum(), q)
            with torch.no_grad():
                if everyone:
                    physics[k] = ev.per_sample
                    if k == 0:
                        residual_start = residual_in_feature_order(loss_fn.maps, ev.r_lin, ev.r_ang)
                elif k:
                    physics[k, idx] = ev.per_sample
                if last:
                    res = residual_in_feature_order(loss_fn.maps, ev.r_lin, ev.r_ang)
                    if everyone:
                        residual_end = res
                    else:
                        residual_end[idx] = res
                    break
                # Adam, elementwise and bias-corrected: each sample runs its own
                m1.mul_(_BETA1).add_(grad, alpha=1 - _BETA1)
                m2.mul_(_BETA2).addcmul_(grad, grad, value=1 - _BETA2)
                c1, c2 = 1 - _BETA1 ** (k + 1), 1 - _BETA2 ** (k + 1)
                denom = m2.div(c2).sqrt_().add_(_EPS)
                p = torch.clamp(p.addcdiv(m1, denom, value=-lr / c1), min=lo, max=hi)
                if everyone:
                    path[k + 1] = p
                else:
                    path[k + 1, idx] = p.to(path.dtype)
        with torch.no_grad():
            if everyone:
                out_xy = path[steps].clone()
            else:
                out_xy[idx] = p.to(out_xy.dtype)  # the others were never written: bit-identical

    with torch.no_grad():
        loss = physics
        if inv_s is not None and m:
            prior = ((path.to(dtype) - xy.unsqueeze(0)) * inv_s.unsqueeze(0)).square().sum(-1)
            loss = physics + prior * refined.unsqueeze(0)
    return RefinementResult(
        xy=out_xy,
        path=path,
        loss=loss,
        physics=physics,
        refined=refined,
        residual_start=residual_start,
        residual_end=residual_end,
        features=loss_fn.features,
    )
