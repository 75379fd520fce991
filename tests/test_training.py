"""Training: loss terms, the physics switch and schedule, gradient routing and clipping, labels, splits,
learning, resume, run directory."""

import json

import numpy as np
import pytest
import torch

from core.learning.config import load_config
from core.learning.losses import predict_tensors
from core.learning.model import build_model
from core.learning.scene_data import prepare, tensors
from core.learning.training import train
from core.stores.run import load_checkpoint, read_lineage

TINY = ["model.preset=tiny", "training.batch_size=32", "training.epochs=2", "training.warmup_epochs=0",
        "training.learning_rate=0.005", "training.num_threads=1", "physics_loss.warmup_epochs=0",
        "physics_loss.ramp_epochs=0"]


def cfg(scene, *extra):
    return load_config("configs/model.yaml", scene + TINY + list(extra))


def test_physics_off_when_lambda_is_zero(scene, tmp_path, monkeypatch):
    import core.learning.physics_terms
    import core.physics.lookup
    import core.physics.physics_loss

    def forbidden(*a, **k):
        raise AssertionError("a radio-map lookup ran although lambda_phys = 0")

    monkeypatch.setattr(core.physics.lookup.PreparedMaps, "sample", forbidden)
    monkeypatch.setattr(core.physics.physics_loss.PhysicsLoss, "forward", forbidden)
    monkeypatch.setattr(core.learning.physics_terms, "make_physics_loss", forbidden)
    config = cfg(scene, "physics_loss.lambda_phys=0", "training.epochs=1")
    assert not config.physics_active
    result = train(config, tmp_path / "run", show_progress=False)
    row = result["history"][0]
    assert row["train_phys"] is None and row["val_phys"] is None
    assert row["train_total"] == pytest.approx(row["train_coarse"] + row["train_fine"], rel=1e-5)


def test_physics_on_adds_its_term(scene, tmp_path):
    config = cfg(scene, "physics_loss.lambda_phys=0.5", "training.epochs=1")
    row = train(config, tmp_path / "run", show_progress=False)["history"][0]
    assert row["train_phys"] is not None and row["train_phys"] > 0
    # validation terms are exact means over the val set (no dropout, eval mode)
    assert row["val_total"] == pytest.approx(row["val_coarse"] + row["val_fine"] + 0.5 * row["val_phys"], rel=1e-4)


def test_one_epoch_lowers_the_loss(scene, tmp_path):
    config = cfg(scene, "training.epochs=1", "physics_loss.lambda_phys=0.1")
    run = prepare(config)
    data = tensors(run, "train", config)
    before = predict_tensors(build_model(run.spec, config.seed), data, run.map_image, "cpu", config=config)
    train(config, tmp_path / "run", run_data=run, show_progress=False)
    model = build_model(run.spec)
    model.load_state_dict(load_checkpoint(tmp_path / "run" / "last.pt")["model"])
    after = predict_tensors(model, data, run.map_image, "cpu", config=config)
    assert after["losses"]["total"] < before["losses"]["total"] - 0.05


def test_resumed_run_equals_uninterrupted(scene, tmp_path):
    config = cfg(scene, "training.epochs=3", "physics_loss.lambda_phys=0.1")
    full = train(config, tmp_path / "full", show_progress=False)
    part = train(config, tmp_path / "resumed", show_progress=False, max_epochs=1)
    assert part["epochs_run"] == 1
    status = json.loads((tmp_path / "resumed" / "status.json").read_text())
    assert status["state"] == "stopped" and status["epoch"] == 1
    rest = train(config, tmp_path / "resumed", resume=True, show_progress=False)
    a = load_checkpoint(tmp_path / "full" / "last.pt")
    b = load_checkpoint(tmp_path / "resumed" / "last.pt")
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    strip = lambda rows: [{k: v for k, v in r.items() if k != "epoch_s"} for r in rows]  # noqa: E731
    assert strip(full["history"]) == strip(rest["history"])
    lines = (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [1, 2, 3]


def test_run_directory_contents(scene, tmp_path):
    config = cfg(scene, "training.epochs=2")
    train(config, tmp_path / "run", show_progress=False)
    run_dir = tmp_path / "run"
    for name in ("config.yaml", "metrics.jsonl", "best.pt", "last.pt", "log.txt", "status.json", "lineage.json"):
        assert (run_dir / name).exists(), name
    lineage = read_lineage(run_dir)
    data = prepare(config)
    assert lineage.dataset.id == data.dataset.lineage.id and lineage.radio_map.id == data.radio_map.lineage.id
    last = load_checkpoint(run_dir / "last.pt")  # weights only: tensors and plain data
    assert isinstance(last["spec"], dict) and isinstance(last["config"], dict) and last["epoch"] == 2
    assert not list(run_dir.glob(".*tmp*"))  # atomic writes leave nothing behind
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    keys = {"epoch", "lr", "lambda_phys", "train_total", "train_coarse", "train_fine", "train_phys", "val_total",
            "val_coarse", "val_fine", "val_phys", "val_median_m", "val_p90_m", "epoch_s", "grad_norm_coarse",
            "grad_norm_fine", "grad_norm_phys", "grad_norm_sup", "grad_cos_sup_phys"}
    assert [r["epoch"] for r in rows] == [1, 2] and all(keys <= set(r) for r in rows)
    written = load_config(run_dir / "config.yaml").to_dict()
    expected = config.to_dict()
    assert isinstance(written["physics_loss"].pop("feature_weights"), dict)  # "auto" resolved to numbers
    expected["physics_loss"].pop("feature_weights")
    assert written == expected
    assert json.loads((run_dir / "status.json").read_text())["state"] == "done"


def test_early_stopping(scene, tmp_path):
    # a learning rate of ~0 cannot improve the val median: patience 1 stops after epoch 2
    config = cfg(scene, "training.epochs=6", "training.learning_rate=1e-12", "training.early_stopping_patience=1")
    result = train(config, tmp_path / "run", show_progress=False)
    assert result["stopped_early"] and result["epochs_run"] < 6


def test_auto_feature_weights_are_calibrated_and_written(scene, tmp_path):
    from core.learning.physics_terms import calibrated_weights
    from core.physics.physics_loss import resolve_weights

    config = cfg(scene, "training.epochs=1", "physics_loss.feature_weights=auto")
    run = prepare(config)
    w = calibrated_weights(run.dataset, run.radio_map)
    assert sum(w.values()) == pytest.approx(sum(resolve_weights(run.radio_map.features, None)))
    # synthetic noise: ToA 3 ns on a map whose ToA spread is ~100 ns, path gain 2 dB on a few-dB
    # spread: ToA must count for much more than path gain
    assert w["toa"] > 10 * w["path_gain"]
    train(config, tmp_path / "run", run_data=run, show_progress=False)
    written = load_config(tmp_path / "run" / "config.yaml").physics_loss.feature_weights
    assert written == pytest.approx(w)


# -- the physics term: schedule, routing, clipping -----------------------------------------------
def test_lambda_warms_up_then_ramps(scene, tmp_path):
    config = cfg(scene, "training.epochs=3", "physics_loss.lambda_phys=0.4", "physics_loss.warmup_epochs=1",
                 "physics_loss.ramp_epochs=2")
    assert [config.lambda_at(e) for e in (0.0, 0.99, 1.0, 2.0, 3.0, 9.0)] == pytest.approx([0, 0, 0, 0.2, 0.4, 0.4])
    rows = train(config, tmp_path / "run", show_progress=False)["history"]
    assert [r["lambda_phys"] for r in rows] == pytest.approx([0.0, 0.2, 0.4])
    # warm-up epoch: the physics term is measured but not in the total
    assert rows[0]["train_phys"] > 0
    assert rows[0]["train_total"] == pytest.approx(rows[0]["train_coarse"] + rows[0]["train_fine"], rel=1e-5)
    assert rows[1]["train_total"] > rows[1]["train_coarse"] + rows[1]["train_fine"]
    # every epoch: gradient norms of each term and the supervised/physics cosine
    for r in rows:
        assert r["grad_norm_coarse"] > 0 and r["grad_norm_fine"] > 0 and r["grad_norm_phys"] > 0
        assert -1.0 <= r["grad_cos_sup_phys"] <= 1.0


def test_physics_gradient_reaches_only_the_position_head(scene):
    from core.learning.losses import compute_losses
    from core.learning.physics_terms import make_physics_term

    config = cfg(scene, "physics_loss.lambda_phys=1.0", "physics_loss.per_sample_grad_clip=0")
    run = prepare(config)
    data = tensors(run, "train", config)
    model = build_model(run.spec, 0)
    physics = make_physics_term(config, run.radio_map, "cpu", run.dataset)
    terms, out = compute_losses(model, data.batch(torch.arange(64)), run.map_image, config, physics)
    assert torch.allclose(out.head_xy, out.xy)
    terms["phys"].backward()
    touched = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert touched and all(n.startswith("fine.") for n in touched), touched
    assert any(n.startswith("fine.") for n in touched)


def test_per_sample_gradient_clipping():
    from core.learning.physics_terms import physics_term

    xy = torch.tensor([[0.01, 0.0], [3.0, 4.0], [0.0, 0.0]], requires_grad=True)
    batch = {"obs_mask": torch.tensor([[True], [True], [False]])}

    class Physics:  # L_n = |p_n|^2 on samples with an observation: dL/dp = 2 p
        def __call__(self, p, b):
            return (p * p).sum(1)

        def active(self, b):
            return b["obs_mask"][:, 0]

    physics = Physics()
    value = physics_term(physics, xy, batch, clip=1.0)
    assert float(value.detach()) == pytest.approx((0.01**2 + 25.0) / 2)  # mean over the 2 samples with an observation
    value.backward()
    g = xy.grad * 2  # undo the mean
    assert torch.allclose(g[0], torch.tensor([0.02, 0.0]))  # under the clip: exact
    assert float(g[1].norm()) == pytest.approx(1.0) and torch.allclose(g[1] / g[1].norm(), torch.tensor([0.6, 0.8]))
    assert torch.equal(g[2], torch.zeros(2))
    with torch.no_grad():
        assert float(physics_term(physics, xy, batch, clip=1.0)) == pytest.approx(float(value))


# -- labels and splits ------------------------------------------------------------------------------
def test_label_fraction_masks_supervision_of_the_other_walks(scene):
    from core.learning.data_loading import labeled_mask
    from core.learning.losses import compute_losses

    a, b = labeled_mask(1000, 0.05, seed=3), labeled_mask(1000, 0.2, seed=3)
    assert a.sum() == 50 and b.sum() == 200 and not (a & ~b).any()  # nested for one seed
    assert np.array_equal(a, labeled_mask(1000, 0.05, seed=3)) and not np.array_equal(a, labeled_mask(1000, 0.05, 4))
    config = cfg(scene, "data.label_fraction=0.25", "physics_loss.lambda_phys=0")
    run = prepare(config)
    data = tensors(run, "train", config)
    assert int(data.labeled.sum()) == round(0.25 * len(data)) and tensors(run, "val", config).labeled.all()
    model = build_model(run.spec, 0)
    batch = data.batch(torch.arange(len(data)))
    moved = {**batch, "target_xy": torch.where(batch["labeled"][:, None], batch["target_xy"], -batch["target_xy"])}
    grads = []
    for b in (batch, moved):
        model.zero_grad()
        compute_losses(model, b, run.map_image, config)[0]["total"].backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert torch.equal(grads[0], grads[1])  # the labels of unlabelled walks are never used
    lab = batch["labeled"]
    only = {k: v[lab] for k, v in batch.items()}
    with torch.no_grad():
        full_coarse = float(compute_losses(model, batch, run.map_image, config)[0]["coarse"])
        only_coarse = float(compute_losses(model, only, run.map_image, config)[0]["coarse"])
    assert full_coarse == pytest.approx(only_coarse, rel=1e-5)


def test_unlabelled_walks_train_through_the_physics_term(scene, tmp_path):
    from core.learning.physics_terms import resolve_config
    from core.learning.scene_data import labeled_train_indices

    config = cfg(scene, "data.label_fraction=0.1", "physics_loss.lambda_phys=0.5", "training.epochs=1")
    run = prepare(config)
    # "auto" weights are calibrated on the labelled walks only
    from core.learning.physics_terms import calibrated_weights

    assert resolve_config(config, run.dataset, run.radio_map).physics_loss.feature_weights == pytest.approx(
        calibrated_weights(run.dataset, run.radio_map, "latest", labeled_train_indices(run.dataset, config)))
    row = train(config, tmp_path / "phys", run_data=run, show_progress=False)["history"][0]
    assert row["train_phys"] > 0 and np.isfinite(row["val_median_m"])
    off = train(cfg(scene, "data.label_fraction=0.1", "physics_loss.lambda_phys=0", "training.epochs=1"),
                tmp_path / "off", run_data=run, show_progress=False)["history"][0]
    assert off["train_phys"] is None and off["grad_norm_phys"] is None and np.isfinite(off["val_median_m"])


def test_spatial_split_holds_out_whole_blocks(scene):
    from core.learning.data_loading import spatial_split
    from core.learning.scene_data import load_scene

    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 100, size=(4000, 2))
    split = spatial_split(xy, (0, 0, 100, 100), blocks=4)
    assert np.array_equal(split, spatial_split(xy, (0, 0, 100, 100), blocks=4))
    block = (xy[:, 1] // 25).astype(int) * 4 + (xy[:, 0] // 25).astype(int)
    for b in np.unique(block):  # every block lies in exactly one split
        assert len(np.unique(split[block == b])) == 1
    for s in (1, 2):
        assert 0.1 <= np.mean(split == s) <= 0.2
    config = cfg(scene, "data.split=spatial")
    dataset, radio_map = load_scene(config)
    assert np.array_equal(dataset.split, spatial_split(dataset.labels, radio_map.bounds, 4))
    random_split = load_scene(cfg(scene))[0].split
    assert not np.array_equal(dataset.split, random_split)


def test_the_physics_term_is_the_calibrated_site_likelihood_and_its_calibration_is_stored(scene, tmp_path):
    from core.learning.physics_terms import SiteLikelihoodTerm, make_physics_term
    from core.learning.run_calibration import read_calibration
    from core.learning.scene_data import labeled_train_indices
    from core.physics.calibration import Calibration, calibrate

    config = cfg(scene, "data.label_fraction=0.5", "physics_loss.lambda_phys=0.5", "training.epochs=1")
    run = prepare(config)
    physics = make_physics_term(config, run.radio_map, "cpu", run.dataset)
    assert isinstance(physics, SiteLikelihoodTerm)
    # calibrated on the labelled walks only: the unlabelled ones' true positions are never used
    labelled = calibrate(run.dataset.subset(labeled_train_indices(run.dataset, config)), run.radio_map, split=None)
    assert np.allclose(physics.calibration.scale, labelled.scale) and np.allclose(physics.calibration.bias, labelled.bias)
    data = tensors(run, "val", config)
    batch = data.batch(torch.arange(len(data)))
    at_truth = physics(batch["target_xy"], batch)
    shifted = physics(batch["target_xy"] + torch.tensor([12.0, -9.0]), batch)
    assert float(at_truth.median()) < float(shifted.median())  # the map agrees with the truth
    train(config, tmp_path / "run", run_data=run, show_progress=False)
    stored = read_calibration(tmp_path / "run")
    assert isinstance(stored, Calibration) and np.allclose(stored.scale, physics.calibration.scale)
    assert stored.meta["label_fraction"] == 0.5


def test_the_site_likelihood_needs_per_site_layers(scene):
    from core.errors import ConfigError
    from core.learning.physics_terms import make_physics_term
    from core.stores.radio_map import RadioMap

    config = cfg(scene, "physics_loss.lambda_phys=0.5")
    run = prepare(config)
    bare = RadioMap(run.radio_map.values, run.radio_map.features, run.radio_map.bounds, attrs=run.radio_map.attrs)
    with pytest.raises(ConfigError, match="per-site layers"):
        make_physics_term(config, bare, "cpu", run.dataset)
    legacy = make_physics_term(cfg(scene, "physics_loss.lambda_phys=0.5", "physics_loss.likelihood=serving"),
                               bare, "cpu", run.dataset)
    assert legacy.calibration is None


def test_the_likelihood_features_are_chosen_in_the_config(scene):
    from core.errors import ConfigError
    from core.learning.physics_terms import make_physics_term

    config = cfg(scene, "physics_loss.lambda_phys=0.5", "physics_loss.site_features=[toa, aoa]",
                 "physics_loss.cell_features=[]", "physics_loss.penalty=huber")
    run = prepare(config)
    lik = make_physics_term(config, run.radio_map, "cpu", run.dataset).likelihood
    assert lik.config.site_features == ("toa", "aoa") and lik.config.penalty == "huber"
    assert list(lik.cell_features) == []
    with pytest.raises(ConfigError, match="physics_loss.site_features"):
        cfg(scene, "physics_loss.site_features=[rsrp]")
