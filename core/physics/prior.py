"""The network's position estimate as a prior: a Gaussian with a uniform outlier floor.

The network outputs a mean ``mu`` and a standard deviation ``sigma`` (isotropic ``[B]`` or
per axis ``[B, 2]``, metres). Its errors are mostly Gaussian-like, but a few are gross
misses (the wrong street); a pure Gaussian would make those unrecoverable, since
``0.5 (d / sigma)^2`` grows without bound. The prior is the mixture::

    p(x) = (1 - eps) N(x; mu, diag(sigma^2)) + eps / A

with ``eps`` the probability of a gross miss and ``A`` the covered area of the map [m^2]
(a miss may land anywhere the map covers). Its negative log [nats]::

    -log p(x) = -logaddexp( log(1 - eps) - log(2 pi sx sy) - 0.5 |(x - mu) / sigma|^2,  log eps - log A )

near ``mu`` this is the Gaussian NLL; far away it levels off at ``log(A / eps)``, so a
candidate far from ``mu`` wins when its likelihood beats the one near ``mu`` by more than
that margin minus the Gaussian's. ``eps = 0`` gives the pure Gaussian. ``sigma`` is
floored at ``min_sigma`` (an overconfident network cannot pin the search).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from core.errors import CoreError

__all__ = ["PositionPrior", "position_prior"]


class PositionPrior(NamedTuple):
    """``mu [B, 2]``, ``inv_sigma [B, 2]`` (1 / sigma), ``log_gauss [B]`` = log((1 - eps) / (2 pi sx sy)),
    ``log_floor`` = log(eps / A) (``-inf`` for eps = 0)."""

    mu: torch.Tensor
    inv_sigma: torch.Tensor
    log_gauss: torch.Tensor
    log_floor: float

    def nll(self, xy: torch.Tensor) -> torch.Tensor:
        """``-log p`` at ``xy [B, 2]`` -> ``[B]`` or ``xy [B, P, 2]`` -> ``[B, P]`` (differentiable)."""
        single = xy.ndim == 2
        mu, inv, lg = (self.mu, self.inv_sigma, self.log_gauss) if single else (
            self.mu.unsqueeze(1), self.inv_sigma.unsqueeze(1), self.log_gauss.unsqueeze(1))
        gauss = lg - 0.5 * ((xy - mu) * inv).square().sum(-1)
        if self.log_floor == -math.inf:
            return -gauss
        return -torch.logaddexp(gauss, torch.full_like(gauss, self.log_floor))

    def take(self, idx) -> PositionPrior:
        return PositionPrior(self.mu[idx], self.inv_sigma[idx], self.log_gauss[idx], self.log_floor)


def position_prior(mu: torch.Tensor, sigma, area_m2: float, outlier_prob: float = 0.05,
                   min_sigma: float = 1.0) -> PositionPrior:
    """The mixture prior of the module doc.

    Args:
        mu: ``[B, 2]`` the network's mean [m].
        sigma: a number, ``[B]`` or ``[B, 2]`` standard deviations [m].
        area_m2: the area a gross miss is spread over (the map's covered area).
        outlier_prob: ``eps`` in [0, 1).
        min_sigma: floor of ``sigma`` [m].
    """
    if not (0.0 <= outlier_prob < 1.0):
        raise CoreError(f"prior: outlier_prob must be in [0, 1), got {outlier_prob}")
    if not area_m2 > 0:
        raise CoreError(f"prior: area must be > 0 m^2, got {area_m2}")
    b = mu.shape[0]
    s = torch.as_tensor(sigma, device=mu.device).to(mu.dtype)
    if s.ndim == 0:
        s = s.expand(b)
    if s.shape == (b,):
        s = s.unsqueeze(1).expand(b, 2)
    if s.shape != (b, 2):
        raise CoreError(f"prior: sigma must be a number, [B] or [B, 2] metres, got {tuple(s.shape)}")
    if not bool(torch.isfinite(s).all() and (s > 0).all()):
        raise CoreError("prior: sigma must be finite and > 0")
    s = s.clamp(min=min_sigma)
    log_gauss = math.log1p(-outlier_prob) - math.log(2 * math.pi) - s.log().sum(-1)
    log_floor = math.log(outlier_prob) - math.log(area_m2) if outlier_prob > 0 else -math.inf
    return PositionPrior(mu, 1.0 / s, log_gauss, log_floor)
