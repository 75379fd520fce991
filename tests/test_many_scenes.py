"""Many scenes in one model: config, per-sample scene maps and physics, single-scene equivalence,
held-out evaluation (docs/model.md, "Many scenes"). Tiny analytic scenes, no Sionna."""

import json

import numpy as np
import pytest
import torch

from core.errors import ConfigError, CoreError, StoreError
from core.learning.config import load_config
from core.learning.losses import compute_losses
from core.learning.model import SceneMaps, build_model
from core.learning.physics_terms import make_scene_physics
from core.learning.scene_data import prepare, tensors
from core.learning.training import train

TINY = ["model.preset=tiny", "training.batch_size=32", "training.epochs=1", "training.warmup_epochs=0",
        "training.learning_rate=0.005", "training.num_threads=1", "physics_loss.warmup_epochs=0",
        "physics_loss.ramp_epochs=0", "physics_loss.lambda_phys=0.5", "physics_loss.coarse_subgrid=2",
        "physics_loss.mode_subgrid=2", "data.label_fraction=0.5"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Three analytic scenes of different sizes and site layouts: alpha and beta to train on, gamma held out."""
    from core.physics.synthetic import synthetic_scene

    root = tmp_path_factory.mktemp("world")
    synthetic_scene(root, num_ues=120, height=24, width=24, cell=4.0, reports=6, k=3, seed=0, scene="alpha")
    beta_sites = np.array([[-50.0, 30.0, 20.0], [40.0, 35.0, 30.0], [0.0, -30.0, 25.0], [55.0, -35.0, 15.0]])
    synthetic_scene(root, num_ues=120, height=20, width=30, cell=4.0, reports=6, k=3, seed=1, scene="beta",
                    sites=beta_sites)
    gamma_sites = np.array([[-30.0, -30.0, 25.0], [30.0, 10.0, 25.0], [-5.0, 35.0, 20.0]])
    synthetic_scene(root, num_ues=120, height=22, width=22, cell=4.0, reports=6, k=3, seed=2, scene="gamma",
                    sites=gamma_sites)
    return root


def cfg(world, *extra, datasets=("alpha", "beta")):
    sets = "[" + ", ".join(str(world / "datasets" / d) for d in datasets) + "]"
    return load_config("configs/model.yaml", [f"data.datasets={sets}",
                                              f"physics_loss.radio_maps_dir={world / 'radio_maps'}", *TINY, *extra])


def test_each_sample_reads_its_own_scene(world):
    config = cfg(world)
    run = prepare(config)
    assert run.scene_names == ["alpha", "beta"]
    assert run.maps.images.shape[0] == 2 and not torch.equal(run.maps.bounds[0], run.maps.bounds[1])
    data = tensors(run, "val", config)
    assert set(data.scene_index.tolist()) == {0, 1}
    model = build_model(run.spec, 0).eval()
    b = data.batch(torch.arange(len(data)))
    mixed = model(b["feats"], b["site_index"], b["mask"], run.maps, scene_index=b["scene_index"])
    for m, scene in enumerate(run.scenes):  # the same samples with only their scene's map: the same outputs
        sel = b["scene_index"] == m
        alone = model(b["feats"][sel], b["site_index"][sel], b["mask"][sel],
                      SceneMaps.stack([scene.map_image], [scene.radio_map.bounds]))
        assert torch.allclose(mixed.xy[sel], alone.xy, atol=1e-4)
        assert torch.allclose(mixed.logits[sel], alone.logits, atol=1e-5)
        x0, y0, x1, y1 = scene.radio_map.bounds  # positions lie in the sample's own map
        assert ((alone.xy[:, 0] >= x0) & (alone.xy[:, 0] <= x1) & (alone.xy[:, 1] >= y0) & (alone.xy[:, 1] <= y1)).all()

    physics = make_scene_physics(config, run, "cpu")
    xy = b["target_xy"]
    per = physics(xy, b)
    for m, term in enumerate(physics.terms):  # each sample's lookup is its own scene's likelihood
        sel = b["scene_index"] == m
        assert torch.allclose(per[sel], term(xy[sel], {k: v[sel] for k, v in b.items()}), atol=1e-5)
    alpha = b["scene_index"] == 0  # alpha's walks read against beta's map (alpha's 3 site ids exist there too)
    swapped = dict(b, scene_index=torch.ones_like(b["scene_index"]))
    wrong = physics(xy, swapped)
    assert float(wrong[alpha].mean()) > float(per[alpha].mean()) + 1.0  # the wrong map explains the reports worse
    swapped = {k: v[alpha] for k, v in swapped.items()}
    b = {k: v[alpha] for k, v in b.items()}
    terms, _ = compute_losses(model, swapped, run.maps, config, physics)
    right, _ = compute_losses(model, b, run.maps, config, physics)
    assert float(terms["phys"].detach()) != pytest.approx(float(right["phys"].detach()))


def test_one_model_trains_on_two_scenes(world, tmp_path):
    out = tmp_path / "run"
    result = train(cfg(world, "data.holdout_scene=gamma"), out, show_progress=False)
    row = result["history"][0]
    assert np.isfinite(row["train_total"]) and np.isfinite(row["val_median_m"]) and row["train_phys"] > 0
    lineage = json.loads((out / "lineage.json").read_text())
    assert [s["scene"] for s in lineage["scenes"]] == ["alpha", "beta"] and lineage["holdout_scene"] == "gamma"
    assert (out / "calibration.json").exists() and (out / "calibration_beta.json").exists()
    assert json.loads((out / "calibration_beta.json").read_text())["meta"]["scene"] == "beta"
    assert "2 scenes: alpha" in (out / "log.txt").read_text()


def test_single_scene_is_unchanged(world, tmp_path):
    """``data.datasets: [X]`` trains exactly like ``data.dataset: X``, and the model's one-scene path
    (a SceneMaps of one map) gives the same numbers as the bare map tensor."""
    single = cfg(world, datasets=("alpha",))
    legacy = load_config("configs/model.yaml", [f"data.dataset={world / 'datasets' / 'alpha'}",
                                                f"physics_loss.radio_maps_dir={world / 'radio_maps'}", *TINY])
    a = train(single, tmp_path / "a", show_progress=False)["history"]
    b = train(legacy, tmp_path / "b", show_progress=False)["history"]
    keys = ("train_total", "train_phys", "val_total", "val_median_m")
    assert [[r[k] for k in keys] for r in a] == [[r[k] for k in keys] for r in b]

    run = prepare(legacy)
    data = tensors(run, "train", legacy)
    physics = make_scene_physics(legacy, run, "cpu")
    batch = data.batch(torch.arange(32))
    model = build_model(run.spec, 0)
    old, out_old = compute_losses(model, batch, run.map_image, legacy, physics)  # the bare map: the old path
    new, out_new = compute_losses(model, batch, run.maps, legacy, physics)
    assert all(float(old[k].detach()) == float(new[k].detach()) for k in ("total", "coarse", "fine", "phys"))
    assert torch.equal(out_old.xy, out_new.xy) and torch.equal(out_old.sigma, out_new.sigma)


def test_heldout_evaluation_end_to_end(world, tmp_path):
    from core.learning.evaluation import evaluate_scene
    from core.learning.inference import calibrate_run, load_run, predict, refine_prediction

    out = tmp_path / "run"
    train(cfg(world, "data.holdout_scene=gamma", "training.epochs=2"), out, show_progress=False)
    held = load_run(out, scene="gamma")
    assert held.held_out and held.trained_scenes == ("alpha", "beta") and held.calibration is None  # not yet made
    assert calibrate_run(held) is held.calibration and held.calibration.meta["transferred_from"] == ["alpha", "beta"]
    assert held.likelihood.maps.bounds == tuple(held.radio_map.bounds) == (-44.0, -44.0, 44.0, 44.0)  # gamma's map
    beta = load_run(out, scene="beta")
    with pytest.raises(CoreError, match="calibrate_run"):  # a getter never calibrates behind the caller's back
        _ = beta.likelihood
    calibrate_run(beta)
    assert beta.scene_index == 1 and beta.likelihood.maps.num_sites == 4  # refinement reads beta's own map
    assert beta.likelihood.maps.bounds == (-60.0, -40.0, 60.0, 40.0)
    idx = held.dataset.indices("test")[:8]
    refined = refine_prediction(held, predict(held, idx))
    x0, y0, x1, y1 = held.radio_map.bounds
    assert ((refined.xy[:, 0] >= x0 - 1) & (refined.xy[:, 0] <= x1 + 1)).all()

    result = evaluate_scene(out, "gamma", "test", refine=True)
    assert [(r["scene"], r["role"]) for r in result["scenes"]] == [("alpha", "trained"), ("beta", "trained"),
                                                                   ("gamma", "held-out")]
    for row in result["scenes"]:
        assert row["count"] > 0 and np.isfinite(row["median_m"]) and np.isfinite(row["refined_median_m"])
    assert result["held_out"] and (out / "eval_test_gamma_refine.json").exists()


def test_heldout_cli(world, tmp_path, capsys):
    from core.cli import main

    out = tmp_path / "run"
    train(cfg(world), out, show_progress=False)
    assert main(["evaluate", "--run", str(out), "--scene", "gamma", "--no-progress", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["scene"] == "gamma" and result["scenes"][-1]["role"] == "held-out"


def test_bad_configs_are_one_line_errors(world):
    with pytest.raises(StoreError, match=r"^data\.datasets\[1\]: dataset .*nowhere: no such store \(make it with `python -m core make-dataset`\)$"):
        prepare(cfg(world, datasets=("alpha", "nowhere")))
    with pytest.raises(ConfigError, match=r"^data\.holdout_scene: 'beta' is also a training scene"):
        prepare(cfg(world, "data.holdout_scene=beta"))
    with pytest.raises(ConfigError, match=r"data\.datasets: .*listed twice"):
        cfg(world, datasets=("alpha", "alpha"))
    with pytest.raises(ConfigError, match=r"^data\.scene: pins the one scene of data\.dataset"):
        prepare(cfg(world, "data.scene=alpha"))
    _scene_without(world, "delta", "bler")
    with pytest.raises(ConfigError, match=r"^data\.datasets\[1\]: radio map .* every scene needs the same feature set$"):
        prepare(cfg(world, datasets=("alpha", "delta")))


def test_transferred_calibration_uses_no_labels_of_the_new_scene(world):
    from core.physics.calibration import calibrate, transfer_calibration
    from core.stores.dataset import MeasurementDataset
    from core.stores.radio_map import RadioMap

    def scene(name):
        return MeasurementDataset.load(world / "datasets" / name), RadioMap.load(world / "radio_maps" / f"{name}.zarr")

    sources = [calibrate(*scene(name)) for name in ("alpha", "beta")]
    gamma = scene("gamma")[1]
    cal = transfer_calibration(sources, gamma)
    assert cal.num_sites == 3 and (cal.count == 0).all()
    for f in range(3):
        fitted = np.concatenate([c.scale[:, f][c.count[:, f] > 0] for c in sources])
        assert np.allclose(cal.scale[:, f], np.median(fitted))
    assert [c["count"] for c in cal.cell.values()] == [0] * len(cal.cell)


def _scene_without(root, scene: str, feature: str) -> None:
    """A copy of the analytic scene whose map lacks ``feature``."""
    from core.physics.synthetic import analytic_radio_map, synthetic_dataset
    from core.stores.radio_map import RadioMap

    full = analytic_radio_map(24, 24, (-48.0, -48.0, 48.0, 48.0))
    keep = [f for f in full.features if f != feature]
    values = np.stack([full.values[full.index(f)] for f in keep])
    radio_map = RadioMap(values, tuple(keep), full.bounds, valid=full.valid, attrs={**full.attrs, "scene": scene},
                         layers=full.layers)
    radio_map.save(root / "radio_maps" / f"{scene}.zarr")
    saved = RadioMap.load(root / "radio_maps" / f"{scene}.zarr")
    synthetic_dataset(saved, 60, reports=6, k=3).save(root / "datasets" / scene, radio_map=saved.ref)


def test_a_resumed_many_scene_run_equals_an_uninterrupted_one(world, tmp_path):
    config = cfg(world, "training.epochs=2")
    whole = train(config, tmp_path / "whole", show_progress=False)["history"]
    train(config, tmp_path / "split", show_progress=False, max_epochs=1)
    resumed = train(config, tmp_path / "split", resume=True, show_progress=False)["history"]
    keys = ("train_total", "val_total", "val_median_m")
    assert [[r[k] for k in keys] for r in resumed] == [[r[k] for k in keys] for r in whole]
