"""The coarse physics term: the map likelihood's posterior over the coarse cells, its cross-entropy,
its gradient to the coarse head, the mode term for the fine head, and what unlabelled walks now teach."""

import pytest
import torch

from core.errors import ConfigError
from core.learning.coarse_physics import (
    attach_cell_posterior,
    cell_mode,
    cell_posterior,
    cell_subpoints,
    coarse_physics_term,
    mode_term,
)
from core.learning.config import load_config
from core.learning.losses import compute_losses
from core.learning.model import build_model
from core.learning.physics_terms import make_physics_term
from core.learning.scene_data import prepare, tensors
from core.physics.observation import SiteObservation

TINY = ["model.preset=tiny", "training.batch_size=32", "training.epochs=1", "training.warmup_epochs=0",
        "training.num_threads=1", "physics_loss.warmup_epochs=0", "physics_loss.ramp_epochs=0"]


def cfg(scene, *extra):
    return load_config("configs/model.yaml", scene + TINY + list(extra))


@pytest.fixture(scope="module")
def setup(scene):
    config = cfg(scene, "data.label_fraction=0.25", "physics_loss.lambda_phys=1.0")
    run = prepare(config)
    data = tensors(run, "train", config)
    physics = make_physics_term(config, run.radio_map, "cpu", run.dataset)
    return config, run, data, physics


def test_subpoints_lie_in_their_cell_in_the_models_order():
    bounds, g, s = (-10.0, 5.0, 30.0, 45.0), 4, 3
    pts = cell_subpoints(bounds, g, s)
    assert pts.shape == (g * g * s * s, 2)
    model = build_model(dict(token_dim=4, num_site_embeddings=2, num_reports=2, map_channels=1, bounds=bounds,
                             d_model=8, num_layers=1, num_heads=2, grid_size=g, map_size=8, patch_size=4,
                             dropout=0.0, mlp_ratio=1, geometry_hint=False))
    cell, offset = model.cell_of(pts.float())
    assert torch.equal(cell, torch.arange(g * g).repeat_interleave(s * s))
    assert float(offset.abs().max()) < 0.5


def test_posterior_peaks_at_the_true_cell(setup):
    config, run, data, physics = setup
    obs = SiteObservation(data.obs_site_ids, data.obs_site, data.obs_cell, data.obs_weight)
    cells, q = cell_posterior(physics.likelihood, obs, run.spec.bounds, run.spec.grid_size, subgrid=4, topk=8)
    assert cells.shape == q.shape == (len(data), 8)
    assert torch.allclose(q.sum(1), torch.ones(len(data))) and bool((q[:, :-1] >= q[:, 1:]).all())
    true_cell, _ = build_model(run.spec, 0).cell_of(data.target_xy)
    top1 = (cells[:, 0] == true_cell).float().mean()
    q_true = (q * (cells == true_cell[:, None])).sum(1)
    # the likelihood alone (no network) mostly puts the walk in its true cell
    assert float(top1) > 0.7 and float(q_true.mean()) > 0.6, (float(top1), float(q_true.mean()))


def test_posterior_goes_to_unlabelled_walks_only_unless_asked(setup, scene):
    config, run, data, physics = setup
    info = attach_cell_posterior(data, physics.likelihood, run.spec.bounds, run.spec.grid_size, config)
    has = data.phys_q.sum(1) > 0
    assert info["walks"] == int((~data.labeled).sum()) and torch.equal(has, ~data.labeled) and info["seconds"] >= 0
    every = cfg(scene, "data.label_fraction=0.25", "physics_loss.coarse_on_labelled=true")
    attach_cell_posterior(data, physics.likelihood, run.spec.bounds, run.spec.grid_size, every)
    assert bool((data.phys_q.sum(1) > 0).all())
    attach_cell_posterior(data, physics.likelihood, run.spec.bounds, run.spec.grid_size, config)


def test_cross_entropy_to_the_posterior():
    logits = torch.tensor([[0.0, 1.0, 2.0], [1.0, 1.0, 1.0]])
    cells = torch.tensor([[2, 0], [1, 0]])
    q = torch.tensor([[0.75, 0.25], [0.0, 0.0]])  # the second walk has no posterior: left out of the mean
    logp = torch.log_softmax(logits[0], -1)
    want = -(0.75 * logp[2] + 0.25 * logp[0])
    assert float(coarse_physics_term(logits, cells, q)) == pytest.approx(float(want))
    assert float(coarse_physics_term(logits, cells, torch.zeros_like(q))) == 0.0


def _coarse_grads(model, batch, run, config, physics, term):
    model.zero_grad()
    terms, _ = compute_losses(model, batch, run.map_image, config, physics)
    terms[term].backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}


def test_coarse_term_reaches_the_coarse_head_and_unlabelled_walks_change_it(setup, scene):
    config, run, data, physics = setup
    attach_cell_posterior(data, physics.likelihood, run.spec.bounds, run.spec.grid_size, config)
    unlabelled = torch.nonzero(~data.labeled).flatten()[:32]
    batch = data.batch(unlabelled)
    model = build_model(run.spec, 0)
    grads = _coarse_grads(model, batch, run, config, physics, "phys_coarse")
    assert "coarse_bias" in grads and any(n.startswith("coarse_query.") for n in grads)
    assert not any(n.startswith("fine.") for n in grads)  # the offset head is the offset term's
    # a batch of unlabelled walks now moves the coarse head through L_total ...
    total = _coarse_grads(model, batch, run, config, physics, "total")
    assert "coarse_bias" in total
    # ... and did not without the coarse term (only the offset head, as before)
    off = cfg(scene, "data.label_fraction=0.25", "physics_loss.lambda_phys=1.0", "physics_loss.coarse_weight=0",
              "physics_loss.mode_weight=0")
    before = _coarse_grads(model, batch, run, off, physics, "total")
    assert before and all(n.startswith("fine.") for n in before), sorted(before)
    with torch.no_grad():
        terms, _ = compute_losses(model, batch, run.map_image, config, physics)
        bare, _ = compute_losses(model, batch, run.map_image, off, physics)
    assert float(terms["phys"]) == pytest.approx(float(bare["phys"]) + float(terms["phys_coarse"])
                                                 + float(terms["phys_mode"]), rel=1e-5)


def test_mode_is_the_best_subgrid_point_of_the_cell_and_nearer_the_truth_than_its_centre(setup):
    config, run, data, physics = setup
    obs = SiteObservation(data.obs_site_ids, data.obs_site, data.obs_cell, data.obs_weight)
    model = build_model(run.spec, 0)
    true_cell, _ = model.cell_of(data.target_xy)
    m = 4
    mode = cell_mode(physics.likelihood, obs, true_cell, run.spec.bounds, run.spec.grid_size, subgrid=m, chunk=7)
    assert torch.equal(model.cell_of(mode)[0], true_cell)  # the mode stays in its cell
    # brute force: every sub-point of the true cell, one at a time
    pts = cell_subpoints(run.spec.bounds, run.spec.grid_size, m).view(-1, m * m, 2)[true_cell]  # [N, m*m, 2]
    nll = torch.stack([physics.likelihood(pts[:, k].float(), obs) for k in range(m * m)], 1)
    assert torch.allclose(mode, pts[torch.arange(len(pts)), nll.argmin(1)].float(), atol=1e-4)
    centre = model.cell_centre(true_cell)
    err_mode = (mode - data.target_xy).norm(dim=1).median()
    err_centre = (centre - data.target_xy).norm(dim=1).median()
    assert float(err_mode) < 0.6 * float(err_centre), (float(err_mode), float(err_centre))


def test_mode_term_is_the_weighted_gaussian_nll_and_reaches_the_fine_head_and_trunk(setup):
    offset, logvar = torch.tensor([[0.1, -0.2], [0.3, 0.0]]), torch.tensor([[0.0, 0.5], [-0.5, 0.0]])
    target, weight = torch.tensor([[0.2, 0.2], [0.0, 0.0]]), torch.tensor([0.5, 0.0])
    per0 = 0.5 * (logvar[0] + (target[0] - offset[0]) ** 2 * torch.exp(-logvar[0])).mean()
    assert float(mode_term(offset, logvar, target, weight)) == pytest.approx(float(0.5 * per0))
    config, run, data, physics = setup
    attach_cell_posterior(data, physics.likelihood, run.spec.bounds, run.spec.grid_size, config)
    assert data.phys_xy is not None and bool((data.phys_xy[~data.labeled] != 0).any(1).all())
    batch = data.batch(torch.nonzero(~data.labeled).flatten()[:32])
    grads = _coarse_grads(build_model(run.spec, 0), batch, run, config, physics, "phys_mode")
    assert any(n.startswith("fine.") for n in grads) and any(n.startswith("blocks.") for n in grads)


def test_one_epoch_trains_with_the_coarse_term_and_logs_its_cost(scene, tmp_path):
    from core.learning.training import train

    config = cfg(scene, "data.label_fraction=0.25", "physics_loss.lambda_phys=0.5")
    result = train(config, tmp_path / "run", show_progress=False)
    assert result["coarse_prior"]["walks"] > 0 and result["history"][0]["train_phys"] > 0
    assert "coarse term weight 1" in (tmp_path / "run" / "log.txt").read_text()


@pytest.mark.parametrize("key,value", [("coarse_weight", -1), ("coarse_subgrid", 0), ("coarse_temperature", 0),
                                       ("coarse_topk", 0), ("coarse_subgrid", 9),
                                       ("mode_weight", -1), ("mode_subgrid", 0)])
def test_coarse_keys_are_validated(key, value):
    with pytest.raises(ConfigError, match=f"physics_loss.{key}"):
        load_config(None, [f"physics_loss.{key}={value}"])
