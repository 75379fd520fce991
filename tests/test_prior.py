"""The network's prior: a Gaussian with an outlier floor, or its heatmap as a mixture (core.physics.prior)."""

from __future__ import annotations

import math

import pytest
import torch

from core.errors import CoreError
from core.physics.prior import heatmap_prior, position_prior


def test_one_sure_cell_is_the_gaussian_and_the_mixture_is_a_density():
    mu = torch.tensor([[3.0, -2.0], [0.0, 0.0]], dtype=torch.float64)
    fine = torch.tensor([[2.0, 1.5], [1.0, 3.0]], dtype=torch.float64)
    xy = torch.randn(2, 7, 2, dtype=torch.float64) * 4
    one = heatmap_prior(mu, fine, torch.zeros(2, 0, 2, dtype=torch.float64), torch.ones(2, 1, dtype=torch.float64),
                        4.0, area_m2=1e4, outlier_prob=0.05)
    torch.testing.assert_close(one.nll(xy), position_prior(mu, fine, 1e4, 0.05).nll(xy))
    # two cells and a floor: it integrates to 1 over a box holding the Gaussians (the floor: its share of the box)
    centres = torch.tensor([[[20.0, 10.0]], [[-15.0, 5.0]]], dtype=torch.float64)
    probs = torch.tensor([[0.6, 0.3], [0.5, 0.5]], dtype=torch.float64)
    area = 100.0 * 100.0
    pri = heatmap_prior(mu, fine, centres, probs, 4.0, area_m2=area, outlier_prob=0.05)
    g = torch.linspace(-50, 50, 401, dtype=torch.float64)
    grid = torch.stack(torch.meshgrid(g, g, indexing="xy"), -1).reshape(1, -1, 2).expand(2, -1, -1)
    mass = (-pri.nll(grid)).exp().sum(1) * (100.0 / 400) ** 2
    torch.testing.assert_close(mass, torch.ones(2, dtype=torch.float64), atol=2e-3, rtol=0)
    # far from every cell: the floor, which holds eps and the coarse mass outside the cells
    far = pri.nll(torch.tensor([[400.0, 400.0], [400.0, 400.0]], dtype=torch.float64))
    rest = torch.tensor([0.05 + 0.95 * 0.1, 0.05], dtype=torch.float64)
    torch.testing.assert_close(far, -(rest.log() - math.log(area)))
    # slicing keeps every part
    torch.testing.assert_close(pri.take(slice(1, 2)).nll(xy[1:]), pri.nll(xy)[1:])


def test_heatmap_prior_checks_its_inputs():
    mu = torch.zeros(1, 2)
    with pytest.raises(CoreError, match="centres"):
        heatmap_prior(mu, 1.0, torch.zeros(1, 2, 2), torch.tensor([[0.5, 0.5]]), 4.0, 1e4)
    with pytest.raises(CoreError, match="sum to at most 1"):
        heatmap_prior(mu, 1.0, torch.zeros(1, 1, 2), torch.tensor([[0.9, 0.5]]), 4.0, 1e4)
    with pytest.raises(CoreError, match="cell_sigma"):
        heatmap_prior(mu, 1.0, torch.zeros(1, 1, 2), torch.tensor([[0.5, 0.5]]), -4.0, 1e4)
