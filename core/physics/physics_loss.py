"""The physics loss: how far measured radio features are from what the map predicts.

For a predicted position ``p_n`` and observed features ``o_{n,f}``::

    r_{n,f}   = o_{n,f} - map_f(p_n)                 raw residual, feature unit
                (AoA: wrapped to (-180, 180] deg; the map's AoA is read on the circle)
    z_{n,f}   = r_{n,f} / sigma_f                    normalised residual
    L_n       = c_n * sum_f  m_{n,f} * w_f * rho(z_{n,f})            per_sample [N]
    total     = sum_n L_n / max(1, #{n : any_f m_{n,f}})             scalar
    per_feature[f] = sum_n c_n m_{n,f} rho(z_{n,f}) / max(1, sum_n m_{n,f})   (unweighted)

* ``rho`` is ``z^2`` (``loss="mse"``) or the Huber function
  ``0.5 z^2`` for ``|z| <= delta``, ``delta (|z| - 0.5 delta)`` beyond (``loss="huber"``).
* ``sigma_f`` is the feature's standard deviation over the map's covered cells
  (:attr:`RadioMap.stats`; circular std for AoA; pooled over scenes), guarded against
  tiny/undefined values -- never a batch statistic, so a batch of one is fine.
  ``normalize=False`` uses ``sigma_f = 1`` (raw units).
* ``m_{n,f}`` is the observation mask (``[N, F]`` bool; if omitted, true wherever the
  observation is finite). Masked entries contribute exactly 0 and may hold NaN. A sample with no valid entry has
  ``L_n = 0`` and is left out of the ``total``'s denominator.
* ``c_n`` is the map's coverage at ``p_n``: 1 if the cell under ``p_n`` is covered, 0
  if it is a hole (no gradient). Holes hold their nearest covered cell's values (see
  :class:`~core.lookup.PreparedMaps`), so nothing there is NaN, but a point in a hole
  is not scored against filler values. It is 1 everywhere for maps without holes.
* ``w_f`` are the feature weights, defaulting to ``FeatureSpec.default_weight``
  (path_gain 1.0, toa 0.5, aoa 0.3, snr 0.8, sinr 0.8, throughput 0.2, bler 0.2).

``observed`` is in the maps' feature order (``PhysicsLoss.features``); for a dataset use
``MeasurementDataset.map_features(loss.features)`` and :func:`aggregate_reports`.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from core.errors import ConfigError, CoreError
from core.features import DEFAULT_FEATURE_ORDER, FEATURES, feature_spec
from core.physics.lookup import PreparedMaps, angle_from_cos_sin, prepare_maps

__all__ = ["PhysicsLoss", "PhysicsLossResult", "LossInputs", "aggregate_reports", "resolve_weights", "guarded_sigma"]

LOSSES = ("mse", "huber")


def guarded_sigma(mean: float, std: float, angular: bool) -> float:
    """A usable normalisation scale from stored statistics: never zero, NaN or inf.

    A constant feature (``std = 0``) gets ``1e-3 * max(1, |mean|)``; an undefined one
    (no covered cells) 1; an angle with no preferred direction (circular std = inf) the
    std of a uniform angle, ``360 / sqrt(12)`` deg.
    """
    if angular and not math.isfinite(std) and not math.isnan(std):
        return 360.0 / math.sqrt(12.0)
    if not math.isfinite(std):
        return 1.0
    floor = 1e-3 * max(1.0, abs(mean)) if math.isfinite(mean) else 1e-3
    return max(std, floor)


def resolve_weights(features: tuple[str, ...], weights: dict[str, float] | None) -> list[float]:
    """Per-channel weights: ``weights`` overriding the feature defaults.

    An unknown feature name or a negative/non-finite weight is a
    :class:`~core.errors.ConfigError` naming the key. Known features that the map lacks are ignored.
    """
    weights = dict(weights or {})
    for key, value in weights.items():
        if key not in FEATURES:
            raise ConfigError(f"physics-loss weights: unknown feature {key!r} (known: {', '.join(FEATURES)})")
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"physics-loss weights: {key!r} must be a number, got {value!r}") from None
        if not math.isfinite(value) or value < 0:
            raise ConfigError(f"physics-loss weights: {key!r} must be a finite number >= 0, got {value}")
        weights[key] = value
    return [weights.get(name, feature_spec(name).default_weight) for name in features]


class LossInputs(NamedTuple):
    """Inputs of :meth:`PhysicsLoss.evaluate`, validated and split once (see ``prepare_inputs``).

    Feature-major like the table's samples: ``obs_lin [L, N]``: observed linear features,
    ``obs_ang [A, N]``: observed angles [deg] (both 0 where masked); ``m_lin [L, N]``,
    ``m_ang [A, N]``: float masks or None. ``mask [N, F]`` bool or None;
    ``n_active``: samples with at least one valid observation (int or 0-d tensor, >= 1).
    """

    xy: torch.Tensor
    obs_lin: torch.Tensor
    obs_ang: torch.Tensor
    m_lin: torch.Tensor | None
    m_ang: torch.Tensor | None
    mask: torch.Tensor | None
    scene_index: torch.Tensor | None
    n_active: int | torch.Tensor

    def take(self, idx: torch.Tensor) -> LossInputs:
        """The same inputs for samples ``idx`` only."""
        rows = lambda v: None if v is None else v[idx]  # noqa: E731
        cols = lambda v: None if v is None else v[:, idx]  # noqa: E731
        n_active = max(idx.numel(), 1) if self.mask is None else self.mask[idx].any(dim=1).sum().clamp(min=1)
        return LossInputs(
            rows(self.xy), cols(self.obs_lin), cols(self.obs_ang), cols(self.m_lin), cols(self.m_ang),
            rows(self.mask), rows(self.scene_index), n_active,
        )


class Evaluation(NamedTuple):
    """Output of :meth:`PhysicsLoss.evaluate`: ``per_sample [N]`` (with grad), raw residuals
    ``r_lin [L, N]`` / ``r_ang [A, N]`` (obs - map, AoA in degrees; with grad; feature-major),
    and the coverage ``[N]`` (None when the maps have no holes)."""

    per_sample: torch.Tensor
    r_lin: torch.Tensor
    r_ang: torch.Tensor
    coverage: torch.Tensor | None


@dataclass
class PhysicsLossResult:
    """What :class:`PhysicsLoss` returns.

    Attributes:
        total: scalar, differentiable (see the module doc for the averaging).
        per_sample: ``[N]`` weighted loss of each sample, differentiable.
        per_feature_tensor: (property, computed on first access) ``[F]`` mean unweighted
            ``rho`` per feature over valid entries (detached); :attr:`per_feature` is the
            same as a dict.
        coverage: ``[N]`` 1 where the point's cell is covered, else 0.
        features: feature names, in map order.
        residual: (property) ``[N, F]`` raw residual ``observed - map(p)`` in feature
            units, AoA wrapped to (-180, 180], 0 where masked (detached; built on access).
    """

    total: torch.Tensor
    per_sample: torch.Tensor
    coverage: torch.Tensor
    features: tuple[str, ...]
    _loss: PhysicsLoss = field(repr=False)
    _evaluation: Evaluation = field(repr=False)  # detached: holding a result keeps no graph alive
    _inputs: LossInputs = field(repr=False)

    @functools.cached_property
    def per_feature_tensor(self) -> torch.Tensor:
        return self._loss.per_feature_from(self._evaluation, self._inputs)

    @property
    def per_feature(self) -> dict[str, torch.Tensor]:
        return dict(zip(self.features, self.per_feature_tensor.unbind(0)))

    @property
    def residual(self) -> torch.Tensor:
        return residual_in_feature_order(self._loss.maps, self._evaluation.r_lin, self._evaluation.r_ang)


def residual_in_feature_order(maps: PreparedMaps, r_lin: torch.Tensor, r_ang: torch.Tensor) -> torch.Tensor:
    """Detached ``[N, F]`` residual in map order from its parts ``r_lin [L, N]``, ``r_ang [A, N]``."""
    with torch.no_grad():
        r_ang = torch.where(r_ang <= -180.0, r_ang + 360.0, r_ang)
        return maps.to_feature_order(r_lin.detach().t(), r_ang.detach().t()).contiguous().clone()


class PhysicsLoss(torch.nn.Module):
    """``L_phys`` of predicted positions against observed features (see the module doc).

    Args:
        radio_map_or_maps: a RadioMap, a list of RadioMaps (several scenes, same
            features and grid shape), or a :class:`~core.lookup.PreparedMaps` (shared,
            not copied). Preparation happens once, here.
        weights: ``{feature: weight}`` overriding the defaults; unknown names are an error.
        loss: ``"mse"`` or ``"huber"``.
        huber_delta: Huber threshold on the normalised residual.
        normalize: divide residuals by the map's per-feature std (else raw units).
        device: where to put the prepared maps (default: the CPU, or wherever the
            PreparedMaps already is). A call with ``pred_xy`` on another device moves them.

    Call ``loss(pred_xy [N, 2], observed [N, F], mask=None [N, F] bool,
    scene_index=None [N] long)`` -> :class:`PhysicsLossResult`. ``observed`` must be
    finite where ``mask`` is true; without a mask, non-finite entries count as missing.
    """

    def __init__(
        self,
        radio_map_or_maps,
        weights: dict[str, float] | None = None,
        loss: str = "mse",
        huber_delta: float = 1.0,
        normalize: bool = True,
        device=None,
    ) -> None:
        super().__init__()
        if loss not in LOSSES:
            raise CoreError(f"physics loss: unknown loss {loss!r} (use {' or '.join(LOSSES)})")
        if not (huber_delta > 0 and math.isfinite(huber_delta)):
            raise CoreError(f"physics loss: huber_delta must be > 0, got {huber_delta}")
        self.maps: PreparedMaps = prepare_maps(radio_map_or_maps, device=device)
        self.loss = loss
        self.huber_delta = float(huber_delta)
        self.normalize = bool(normalize)
        maps = self.maps
        w = resolve_weights(maps.features, weights)
        sig = [
            guarded_sigma(float(m), float(s), f in maps.angular) if normalize else 1.0
            for f, (m, s) in enumerate(zip(maps.mean.tolist(), maps.std.tolist()))
        ]
        self.sigma_by_feature = dict(zip(maps.features, sig))
        self.weight_by_feature = dict(zip(maps.features, w))
        dtype, device = maps.dtype, maps.device
        for part, idx in (("lin", maps.linear), ("ang", maps.angular)):
            wt = torch.tensor([w[f] for f in idx], dtype=dtype, device=device)
            inv = torch.tensor([1.0 / sig[f] for f in idx], dtype=dtype, device=device)
            self.register_buffer(f"w_{part}", wt, persistent=False)
            self.register_buffer(f"inv_sigma_{part}", inv, persistent=False)
            self.register_buffer(f"coef_{part}", wt * inv * inv, persistent=False)  # w / sigma^2 (MSE)

    @property
    def features(self) -> tuple[str, ...]:
        return self.maps.features

    @property
    def weights(self) -> dict[str, float]:
        return dict(self.weight_by_feature)

    def extra_repr(self) -> str:
        return f"loss={self.loss}, delta={self.huber_delta}, normalize={self.normalize}, weights={self.weights}"

    # -- pieces reused by the refinement ------------------------------------------------
    def prepare_inputs(self, pred_xy, observed, mask=None, scene_index=None) -> LossInputs:
        """Validate, move and split the inputs once (see :class:`LossInputs`).

        Masked observations are zeroed here, so NaN there cannot leak anywhere. Without
        a mask, non-finite observations are treated as missing.
        """
        if not isinstance(pred_xy, torch.Tensor) or pred_xy.ndim != 2 or pred_xy.shape[1] != 2:
            got = tuple(pred_xy.shape) if isinstance(pred_xy, torch.Tensor) else type(pred_xy).__name__
            raise CoreError(f"physics loss: pred_xy must be a tensor [N, 2], got {got}")
        maps = self.maps
        n, nf = pred_xy.shape[0], maps.num_features
        if pred_xy.device != maps.device:
            self.to(pred_xy.device)
        dtype, device = maps.dtype, maps.device
        observed = torch.as_tensor(observed, device=device).to(dtype)
        if observed.shape != (n, nf):
            raise CoreError(
                f"physics loss: observed must be [{n}, {nf}] (features {list(self.features)}), got {tuple(observed.shape)}"
            )
        m_lin = m_ang = None
        n_active: int | torch.Tensor = max(n, 1)
        if mask is None:
            finite = torch.isfinite(observed)
            if not bool(finite.all()):  # NaN marks a missing observation (see core.stores.dataset)
                mask = finite
        if mask is not None:
            mask = torch.as_tensor(mask, device=device)
            if mask.shape != (n, nf) or mask.dtype != torch.bool:
                raise CoreError(f"physics loss: mask must be bool [{n}, {nf}], got {mask.dtype} {tuple(mask.shape)}")
            observed = torch.where(mask, observed, torch.zeros((), dtype=dtype, device=device))
            m = mask.to(dtype)  # index the contiguous [N, F] along dim 1, then view feature-major
            m_lin, m_ang = m.index_select(1, maps.linear_index).t(), m.index_select(1, maps.angular_index).t()
            n_active = mask.any(dim=1).sum().clamp(min=1)
        obs_lin = observed.index_select(1, maps.linear_index).t()
        obs_ang = observed.index_select(1, maps.angular_index).t()
        scene_index = maps.check_scene_index(scene_index, n)
        return LossInputs(pred_xy.to(dtype), obs_lin, obs_ang, m_lin, m_ang, mask, scene_index, n_active)

    def _rho_sum(self, r: torch.Tensor, coef: torch.Tensor, w: torch.Tensor, inv_sigma: torch.Tensor) -> torch.Tensor:
        """``sum_f w_f rho(r_f / sigma_f)`` over the rows of ``r [K, N]`` -> ``[N]``."""
        if self.loss == "mse":
            return coef @ (r * r)  # w (r / sigma)^2 = (w / sigma^2) r^2
        z = r * inv_sigma[:, None] if self.normalize else r
        a = z.abs()
        q = a.clamp(max=self.huber_delta)
        return w @ (q * (a - 0.5 * q))  # 0.5 z^2 inside delta, delta (|z| - delta/2) beyond

    def evaluate(self, xy: torch.Tensor, inputs: LossInputs) -> Evaluation:
        """Per-sample loss at positions ``xy [N, 2]`` (one ``grid_sample``); see :class:`Evaluation`."""
        maps = self.maps
        lin, c, s = maps.split(maps.sample(xy, inputs.scene_index))
        r_lin = inputs.obs_lin - lin
        # the map's angle comes from its interpolated direction (c, s), never from a linear
        # interpolation of degrees; the residual is wrapped to [-180, 180)
        r_ang = torch.remainder(inputs.obs_ang - angle_from_cos_sin(c, s, wrap=False) + 180.0, 360.0) - 180.0
        if inputs.m_lin is not None:
            r_lin = r_lin * inputs.m_lin
            r_ang = r_ang * inputs.m_ang
        per_sample = self._rho_sum(r_lin, self.coef_lin, self.w_lin, self.inv_sigma_lin)
        if maps.angular:
            per_sample = per_sample + self._rho_sum(r_ang, self.coef_ang, self.w_ang, self.inv_sigma_ang)
        coverage = None
        if maps.has_holes:
            coverage = maps.coverage(xy, inputs.scene_index)
            per_sample = per_sample * coverage
        return Evaluation(per_sample, r_lin, r_ang, coverage)

    @torch.no_grad()
    def per_feature_from(self, ev: Evaluation, inputs: LossInputs) -> torch.Tensor:
        """``[F]`` mean unweighted ``rho`` per feature over valid (and covered) entries, map order."""
        parts = []
        for r, inv in ((ev.r_lin, self.inv_sigma_lin), (ev.r_ang, self.inv_sigma_ang)):
            z = r * inv[:, None] if self.normalize else r
            if self.loss == "mse":
                rho = z * z
            else:
                a = z.abs()
                q = a.clamp(max=self.huber_delta)
                rho = q * (a - 0.5 * q)
            if ev.coverage is not None:
                rho = rho * ev.coverage
            parts.append(rho.sum(dim=1))
        sums = torch.cat(parts)
        n = ev.r_lin.shape[1]
        if inputs.mask is None:
            counts = torch.full_like(sums, max(n, 1))
        else:
            m = inputs.mask.index_select(1, self.maps.order).sum(dim=0)
            counts = m.clamp(min=1).to(sums.dtype)
        return (sums / counts).index_select(0, self.maps.inverse_order)

    def forward(self, pred_xy, observed, mask=None, scene_index=None) -> PhysicsLossResult:
        inputs = self.prepare_inputs(pred_xy, observed, mask, scene_index)
        ev = self.evaluate(inputs.xy, inputs)
        total = ev.per_sample.sum() / inputs.n_active
        coverage = ev.coverage if ev.coverage is not None else torch.ones_like(ev.per_sample.detach())
        detached = ev._replace(per_sample=ev.per_sample.detach(), r_lin=ev.r_lin.detach(), r_ang=ev.r_ang.detach())
        return PhysicsLossResult(total, ev.per_sample, coverage, self.features, self, detached, inputs)


def aggregate_reports(
    observed: torch.Tensor,
    mask: torch.Tensor | None = None,
    features: tuple[str, ...] | list[str] = DEFAULT_FEATURE_ORDER,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Aggregate temporal reports ``[N, T, F]`` into one observation per sample.

    Args:
        observed: ``[N, T, F]`` features per report, in ``features`` order; NaN where missing.
        mask: bool ``[N, T]`` (report present) or ``[N, T, F]`` (entry present); entries
            that are not finite are treated as missing too.
        features: the channel names (angular ones are averaged on the circle).

    Returns:
        ``(aggregated [N, F], valid [N, F] bool)``: the masked mean over reports
        (``sum_t m x / sum_t m``); for angles the circular mean
        ``atan2(sum_t m sin x, sum_t m cos x)`` in degrees, (-180, 180]. Where no
        report is valid the value is 0 and ``valid`` is False.
    """
    observed = torch.as_tensor(observed)
    if observed.ndim != 3 or observed.shape[2] != len(features):
        raise CoreError(f"aggregate_reports: observed must be [N, T, {len(features)}], got {tuple(observed.shape)}")
    finite = torch.isfinite(observed)
    if mask is None:
        m = finite
    else:
        mask = torch.as_tensor(mask, device=observed.device).bool()
        if mask.shape == observed.shape[:2]:
            mask = mask.unsqueeze(-1)
        elif mask.shape != observed.shape:
            raise CoreError(f"aggregate_reports: mask must be [N, T] or [N, T, F], got {tuple(mask.shape)}")
        m = mask & finite
    x = torch.where(m, observed, torch.zeros((), dtype=observed.dtype, device=observed.device))
    w = m.to(observed.dtype)
    count = w.sum(dim=1)  # [N, F]
    out = (x * w).sum(dim=1) / count.clamp(min=1)
    for f, name in enumerate(features):
        if feature_spec(name).angular:
            rad = torch.deg2rad(x[..., f])
            c = (torch.cos(rad) * w[..., f]).sum(dim=1)
            s = (torch.sin(rad) * w[..., f]).sum(dim=1)
            out[:, f] = angle_from_cos_sin(c, s)
    valid = count > 0
    out = torch.where(valid, out, torch.zeros((), dtype=out.dtype, device=out.device))
    return out, valid
