"""The map-conditioned transformer: loss terms by hand, geometry, attention weights, gradients."""

import math

import numpy as np
import pytest
import torch

from core.learning.data_loading import (
    Normalizer,
    build_tensors,
    map_channels,
    map_input,
    num_site_embeddings,
    token_dim,
)
from core.learning.model import MapConditionedTransformer, ModelSpec, coarse_loss, fine_loss
from core.physics.physics_loss import PhysicsLoss
from core.physics.synthetic import analytic_radio_map, synthetic_dataset


@pytest.fixture(scope="module")
def scene():
    torch.manual_seed(0)
    m = analytic_radio_map(height=32, width=48, bounds=(-96.0, -64.0, 96.0, 64.0))
    ds = synthetic_dataset(m, 48, reports=6, k=3, seed=3, missing_prob=0.3)
    data = build_tensors(ds, m)
    spec = ModelSpec(token_dim=token_dim(3, True), num_site_embeddings=3 * (num_site_embeddings(ds) + 1) + 1,
                     num_reports=6, map_channels=map_channels(m), bounds=m.bounds, d_model=32, num_layers=2,
                     num_heads=4, grid_size=8, map_size=32, patch_size=8)
    return m, ds, data, MapConditionedTransformer(spec), map_input(m, 32)


def test_cross_entropy_by_hand():
    logits = torch.tensor([[1.0, 2.0, 0.5], [0.0, 0.0, 3.0]])
    target = torch.tensor([1, 0])
    expected = -(math.log(math.exp(2) / (math.exp(1) + math.exp(2) + math.exp(0.5)))
                 + math.log(1 / (2 + math.exp(3)))) / 2
    assert math.isclose(coarse_loss(logits, target).item(), expected, rel_tol=1e-6)


def test_gaussian_nll_by_hand():
    mu = torch.tensor([[0.1, -0.2]])
    logvar = torch.tensor([[math.log(0.25), 0.0]])
    target = torch.tensor([[0.6, 0.3]])
    # 0.5 * (log s2 + r^2 / s2) per coordinate, averaged
    expected = 0.5 * ((math.log(0.25) + 0.25 / 0.25) + (0.0 + 0.25 / 1.0)) / 2
    assert math.isclose(fine_loss(mu, logvar, target).item(), expected, rel_tol=1e-6)


def test_cell_geometry_round_trip(scene):
    m, _, _, model, _ = scene
    xy = torch.tensor([[-95.0, -63.0], [0.1, 0.1], [95.9, 63.9], [-12.0, 40.0]])
    cell, offset = model.cell_of(xy)
    assert torch.allclose(model.cell_centre(cell) + offset * model.cell_wh, xy, atol=1e-4)
    assert (offset.abs() <= 0.5 + 1e-6).all()
    # cell 0 is the lower-left cell (row i = y); its centre is half a cell in from the corner
    assert torch.allclose(model.cell_centre(torch.tensor([0])), torch.tensor([[-96 + 12.0, -64 + 8.0]]))


def test_attention_shapes_and_rows_sum_to_one(scene):
    _, ds, data, model, image = scene
    model.eval()
    b = data.batch(torch.arange(len(data)))
    out = model(b["feats"], b["site_index"], b["mask"], image, return_attention=True)
    n, t = b["mask"].shape
    heads, p = model.spec.num_heads, 16
    assert len(out.attention["temporal"]) == len(out.attention["cross"]) == model.spec.num_layers
    for w in out.attention["temporal"]:
        assert w.shape == (n, heads, t, t)
        assert torch.allclose(w.sum(-1), torch.ones(n, heads, t), atol=1e-5)
        # no weight on missing reports
        assert (w * (~b["mask"])[:, None, None, :]).abs().max() == 0
    for w in out.attention["cross"]:
        assert w.shape == (n, heads, t, p)
        assert torch.allclose(w.sum(-1), torch.ones(n, heads, t), atol=1e-5)
    assert not b["mask"].all()  # the test covers missing reports
    # same outputs with and without returning attention
    plain = model(b["feats"], b["site_index"], b["mask"], image)
    assert torch.allclose(plain.xy, out.xy, atol=1e-4)
    assert ((out.confidence >= 0) & (out.confidence <= 1)).all() and (out.sigma > 0).all()


def test_batch_of_one_equals_batch(scene):
    _, ds, data, model, image = scene
    model.eval()
    b = data.batch(torch.arange(len(data)))
    full = model(b["feats"], b["site_index"], b["mask"], image)
    one = data.batch(torch.tensor([5]))
    single = model(one["feats"], one["site_index"], one["mask"], image)
    assert torch.allclose(single.xy, full.xy[5:6], atol=1e-4)
    # tensors built from one sample equal that sample's row: map statistics, not batch ones
    alone = build_tensors(ds, scene[0], np.array([5]))
    assert torch.equal(alone.feats[0], data.feats[5])


def test_physics_gradient_reaches_predicted_positions(scene):
    m, _, data, model, image = scene
    model.train()
    b = data.batch(torch.arange(len(data)))
    out = model(b["feats"], b["site_index"], b["mask"], image)
    out.xy.retain_grad()
    loss = PhysicsLoss(m)(out.xy, b["observed"], mask=b["obs_mask"]).total
    model.zero_grad()
    loss.backward()
    assert torch.isfinite(out.xy.grad).all() and out.xy.grad.abs().sum() > 0
    assert model.fine[-1].weight.grad.abs().sum() > 0  # through the offset into the fine head
    assert model.token_in.weight.grad.abs().sum() > 0  # and into the shared trunk


def test_map_input_fills_holes_and_uses_map_stats():
    m = analytic_radio_map(height=16, width=16, bounds=(0.0, 0.0, 64.0, 64.0))
    values = m.values.copy()
    valid = np.ones((16, 16), bool)
    valid[:8, :8] = False
    values[:, ~valid] = -np.inf
    from core.stores.radio_map import RadioMap

    holed = RadioMap(values, m.features, m.bounds, valid=valid, attrs=m.attrs)
    img = map_input(holed, 8)
    assert img.shape == (map_channels(holed), 8, 8) and torch.isfinite(img).all()
    assert torch.equal(img[-1, :4, :4], torch.zeros(4, 4)) and torch.equal(img[-1, 4:, 4:], torch.ones(4, 4))
    norm = Normalizer.from_map(holed)
    s = holed.stats["path_gain"]
    assert norm.mean["path_gain"] == pytest.approx(s.mean) and norm.std["path_gain"] == pytest.approx(s.std)
