"""scripts/ensemble_prior.py pools networks' Gaussians as one mixture's first two moments."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("ensemble_prior", ROOT / "scripts" / "ensemble_prior.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@dataclass
class _Pred:  # the fields pooled() reads and keeps
    xy: np.ndarray
    sigma: np.ndarray
    coarse_xy: np.ndarray


def test_pooled_is_the_mixture_mean_and_std_and_keeps_the_first_members_starts():
    rng = np.random.default_rng(0)
    members = [_Pred(rng.normal(0, 5, (4, 2)), rng.uniform(0.5, 3, (4, 2)), np.full((4, 3, 2), float(m)))
               for m in range(3)]
    out = _script().pooled(members)
    # reference: draw from the equal-weight mixture of the members' Gaussians, per UE and axis
    draws = np.concatenate([m.xy[None] + m.sigma[None] * rng.standard_normal((200_000, 4, 2)) for m in members])
    assert np.allclose(out.xy, draws.mean(0), atol=0.05)
    assert np.allclose(out.sigma, draws.std(0), rtol=0.01)
    assert np.array_equal(out.coarse_xy, members[0].coarse_xy)  # the search starts: the first member's
