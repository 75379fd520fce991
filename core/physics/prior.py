"""The network's position estimate as a prior: a Gaussian (or the network's heatmap, a mixture of
Gaussians over its likely cells: :func:`heatmap_prior`) with a uniform outlier floor.

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

__all__ = ["PositionPrior", "position_prior", "heatmap_prior"]


class PositionPrior(NamedTuple):
    """A mixture of ``J`` Gaussians and a uniform floor (``J = 1``: :func:`position_prior`; the network's
    heatmap: :func:`heatmap_prior`).

    mu ``[B, 2]``: the network's estimate (where the search's window is); means ``[B, J, 2]``;
    inv_sigma ``[B, J, 2]`` (1 / sigma); log_gauss ``[B, J]`` = log(weight_j / (2 pi sx sy)) with the
    weights summing to the Gaussians' share; log_floor ``[B]`` = log(floor share / A) (``-inf``: none).
    """

    mu: torch.Tensor
    means: torch.Tensor
    inv_sigma: torch.Tensor
    log_gauss: torch.Tensor
    log_floor: torch.Tensor

    def nll(self, xy: torch.Tensor) -> torch.Tensor:
        """``-log p`` at ``xy [B, 2]`` -> ``[B]`` or ``xy [B, P, 2]`` -> ``[B, P]`` (differentiable)."""
        single = xy.ndim == 2
        x = xy.unsqueeze(1) if single else xy  # [B, P, 2]
        d = (x.unsqueeze(2) - self.means.unsqueeze(1)) * self.inv_sigma.unsqueeze(1)  # [B, P, J, 2]
        gauss = self.log_gauss.unsqueeze(1) - 0.5 * d.square().sum(-1)  # [B, P, J]
        gauss = gauss.squeeze(-1) if gauss.shape[-1] == 1 else torch.logsumexp(gauss, -1)
        out = -torch.logaddexp(gauss, self.log_floor.unsqueeze(1).expand_as(gauss))
        return out.squeeze(1) if single else out

    def take(self, idx) -> PositionPrior:
        return PositionPrior(self.mu[idx], self.means[idx], self.inv_sigma[idx], self.log_gauss[idx],
                             self.log_floor[idx])


def _sigma(s, b: int, like: torch.Tensor, shape: tuple[int, ...], what: str) -> torch.Tensor:
    """``s`` (a number, ``[B]`` or ``shape``) as a tensor of ``shape``, checked finite and > 0."""
    s = torch.as_tensor(s, device=like.device).to(like.dtype)
    if s.ndim == 0:
        s = s.expand(b)
    if s.shape == (b,):
        s = s.view(b, *([1] * (len(shape) - 1))).expand(shape)
    if s.shape != shape:
        raise CoreError(f"prior: {what} must be a number, [B] or {list(shape)} metres, got {tuple(s.shape)}")
    if not bool(torch.isfinite(s).all() and (s > 0).all()):
        raise CoreError(f"prior: {what} must be finite and > 0")
    return s


def _checked(outlier_prob: float, area_m2: float) -> None:
    if not (0.0 <= outlier_prob < 1.0):
        raise CoreError(f"prior: outlier_prob must be in [0, 1), got {outlier_prob}")
    if not area_m2 > 0:
        raise CoreError(f"prior: area must be > 0 m^2, got {area_m2}")


def position_prior(mu: torch.Tensor, sigma, area_m2: float, outlier_prob: float = 0.05,
                   min_sigma: float = 1.0) -> PositionPrior:
    """The Gaussian-plus-floor prior of the module doc.

    Args:
        mu: ``[B, 2]`` the network's mean [m].
        sigma: a number, ``[B]`` or ``[B, 2]`` standard deviations [m].
        area_m2: the area a gross miss is spread over (the map's covered area).
        outlier_prob: ``eps`` in [0, 1).
        min_sigma: floor of ``sigma`` [m].
    """
    _checked(outlier_prob, area_m2)
    b = mu.shape[0]
    s = _sigma(sigma, b, mu, (b, 2), "sigma").clamp(min=min_sigma)
    log_gauss = math.log1p(-outlier_prob) - math.log(2 * math.pi) - s.log().sum(-1)
    log_floor = math.log(outlier_prob) - math.log(area_m2) if outlier_prob > 0 else -math.inf
    return PositionPrior(mu, mu.unsqueeze(1), (1.0 / s).unsqueeze(1), log_gauss.unsqueeze(1),
                         torch.full((b,), log_floor, dtype=mu.dtype, device=mu.device))


def heatmap_prior(mu: torch.Tensor, fine_sigma, centres: torch.Tensor, probs: torch.Tensor, cell_sigma,
                  area_m2: float, outlier_prob: float = 0.05, min_sigma: float = 1.0) -> PositionPrior:
    """The network's distribution over the map as the prior: its ``J`` most likely coarse cells::

        p(x) = (1 - eps) [ pi_0 N(x; mu, fine_sigma^2) + sum_{j>=1} pi_j N(x; c_j, cell_sigma^2) ]
               + (eps + (1 - eps)(1 - sum_j pi_j)) / A

    the chosen cell (``j = 0``) at the fine head's estimate with its own spread, the next cells at their
    centres with ``cell_sigma`` (about a cell's width / sqrt(12): the position inside is unknown), and the
    coarse mass outside the ``J`` cells spread over the map with the outlier floor. Unlike one Gaussian
    whose sigma must cover every likely cell (tens of metres when two streets compete), each basin keeps
    its own weight and width.

    Args:
        mu: ``[B, 2]`` the network's estimate [m]; fine_sigma: a number, ``[B]`` or ``[B, 2]`` [m].
        centres: ``[B, J - 1, 2]`` the next cells' centres [m]; probs: ``[B, J]`` the cells' coarse
            probabilities (the chosen cell first), summing to at most 1.
        cell_sigma: a number or ``[B]`` [m]. area_m2, outlier_prob, min_sigma: as :func:`position_prior`.
    """
    _checked(outlier_prob, area_m2)
    b, j = probs.shape
    if centres.shape != (b, j - 1, 2):
        raise CoreError(f"prior: centres must be [{b}, {j - 1}, 2] for {j} probabilities, got {tuple(centres.shape)}")
    pi = probs.to(mu.dtype)
    if not bool(torch.isfinite(pi).all() and (pi >= 0).all() and (pi.sum(-1) <= 1 + 1e-4).all()):
        raise CoreError("prior: probs must be finite, >= 0 and sum to at most 1")
    fine = _sigma(fine_sigma, b, mu, (b, 2), "fine_sigma").clamp(min=min_sigma)
    cell = _sigma(cell_sigma, b, mu, (b, 2), "cell_sigma").clamp(min=min_sigma)
    s = torch.cat([fine.unsqueeze(1), cell.unsqueeze(1).expand(b, j - 1, 2)], 1)  # [B, J, 2]
    means = torch.cat([mu.unsqueeze(1), centres.to(mu.dtype)], 1)
    log_gauss = math.log1p(-outlier_prob) + pi.clamp(min=1e-12).log() - math.log(2 * math.pi) - s.log().sum(-1)
    rest = (outlier_prob + (1 - outlier_prob) * (1 - pi.sum(-1))).clamp(min=0.0)
    return PositionPrior(mu, means, 1.0 / s, log_gauss, rest.log() - math.log(area_m2))
