"""Training: loss terms, the physics switch, learning, resume, run directory."""

import json

import pytest
import torch

from core.learning.config import load_config
from core.learning.model import build_model
from core.learning.training import predict_tensors, prepare, tensors, train
from core.physics.synthetic import synthetic_scene
from core.stores.run import load_checkpoint, read_lineage

TINY = ["model.preset=tiny", "training.batch_size=32", "training.epochs=2", "training.warmup_epochs=0",
        "training.learning_rate=0.005", "training.num_threads=1"]


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    root = tmp_path_factory.mktemp("scene")
    overrides = synthetic_scene(root, num_ues=160, height=24, width=24, cell=4.0, reports=6, k=3, seed=0)
    return [f"{k}={v}" for k, v in overrides.items()]


def cfg(scene, *extra):
    return load_config("configs/model.yaml", scene + TINY + list(extra))


def test_physics_off_when_lambda_is_zero(scene, tmp_path, monkeypatch):
    import core.learning.training
    import core.physics.lookup
    import core.physics.physics_loss

    def forbidden(*a, **k):
        raise AssertionError("a radio-map lookup ran although lambda_phys = 0")

    monkeypatch.setattr(core.physics.lookup.PreparedMaps, "sample", forbidden)
    monkeypatch.setattr(core.physics.physics_loss.PhysicsLoss, "forward", forbidden)
    monkeypatch.setattr(core.learning.training, "make_physics_loss", forbidden)
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
    keys = {"epoch", "lr", "train_total", "train_coarse", "train_fine", "train_phys", "val_total", "val_coarse",
            "val_fine", "val_phys", "val_median_m", "val_p90_m", "epoch_s"}
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
    from core.learning.training import calibrated_weights
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
