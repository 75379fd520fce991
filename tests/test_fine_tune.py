"""Fine-tuning from another run (``training.init_from``) and training a new city with no label at all
(``data.label_fraction: 0``): docs/model.md, "Adapting to a new city". Tiny analytic scenes, no Sionna."""

import dataclasses
import json

import numpy as np
import pytest
import torch
from refusals import refused_train

from core.errors import ConfigError
from core.learning.config import load_config
from core.learning.scene_data import RunData, SceneData, prepare
from core.learning.training import _build_loop, train
from core.stores import run as run_store

TINY = ["model.preset=tiny", "training.batch_size=32", "training.epochs=1", "training.warmup_epochs=0",
        "training.learning_rate=0.005", "training.num_threads=1", "physics_loss.warmup_epochs=0",
        "physics_loss.ramp_epochs=0", "physics_loss.lambda_phys=0.5", "physics_loss.coarse_subgrid=2",
        "physics_loss.mode_subgrid=2", "model.num_candidates=6", "model.fine_subgrid=3", "model.d_report=16"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Two analytic cities: ``alpha`` (the source run trains there) and ``gamma`` (the new city), and the
    source run (agnostic, tiny, 1 epoch on alpha, all labels)."""
    from core.physics.synthetic import synthetic_scene

    root = tmp_path_factory.mktemp("fine_tune")
    synthetic_scene(root, num_ues=120, height=24, width=24, cell=4.0, reports=6, k=3, seed=0, scene="alpha")
    gamma_sites = np.array([[-30.0, -30.0, 25.0], [30.0, 10.0, 25.0], [-5.0, 35.0, 20.0]])
    synthetic_scene(root, num_ues=120, height=22, width=22, cell=4.0, reports=6, k=3, seed=2, scene="gamma",
                    sites=gamma_sites)
    train(cfg(root, "alpha"), root / "source", show_progress=False)
    return root


def cfg(root, scene, *extra):
    return load_config("configs/agnostic.yaml", [f"data.dataset={root / 'datasets' / scene}",
                                                 f"physics_loss.radio_maps_dir={root / 'radio_maps'}", *TINY, *extra])


def test_init_from_loads_the_weights_and_records_them(world, tmp_path):
    config = cfg(world, "gamma", f"training.init_from={world / 'source'}")
    from core.learning.fine_tune import check_init_from

    init = check_init_from(config)
    loop = _build_loop(config, prepare(config), torch.device("cpu"), 0, 1, init)
    source = run_store.load_checkpoint(run_store.checkpoint_path(world / "source"))["model"]
    assert all(torch.equal(v, source[k]) for k, v in loop.model.state_dict().items())
    fresh = _build_loop(cfg(world, "gamma"), prepare(config), torch.device("cpu"), 0, 1).model.state_dict()
    assert not all(torch.equal(v, source[k]) for k, v in fresh.items())  # the test could fail

    out = tmp_path / "tuned"
    train(config, out, show_progress=False)
    lineage = run_store.read_lineage(out)
    assert lineage.init_from["run"] == str(world / "source") and lineage.init_from["checkpoint"] == "best.pt"
    assert lineage.init_from["sha256"].startswith("sha256:") and lineage.init_from["scenes"] == ["alpha"]
    assert lineage.scene_names == ["gamma"] and "weights from" in (out / "log.txt").read_text()


def _scrambled(run: RunData, seed: int) -> RunData:
    """``run`` with every walk's positions (the labels) replaced by other, random ones."""
    scenes = []
    for s in run.scenes:
        rng = np.random.default_rng(seed)
        xyz = s.dataset.ue_xyz.copy()
        x0, y0, x1, y1 = s.radio_map.bounds
        xyz[..., 0] = rng.uniform(x0, x1, xyz.shape[:2])
        xyz[..., 1] = rng.uniform(y0, y1, xyz.shape[:2])
        scenes.append(SceneData(dataclasses.replace(s.dataset, ue_xyz=xyz.astype(s.dataset.ue_xyz.dtype)),
                                s.radio_map, s.map_image))
    return RunData(scenes, run.spec)


def _weights(out):
    return run_store.load_checkpoint(out / "best.pt")["model"]


def test_label_fraction_zero_trains_on_physics_alone_and_reads_no_label(world, tmp_path):
    """Scrambling every position of the new city (train AND val walks) changes nothing at label_fraction 0:
    not the weights, not the calibration; at 0.5 it does (so the check could fail)."""
    init = f"training.init_from={world / 'source'}"
    for fraction, same in ((0, True), (0.5, False)):
        config = cfg(world, "gamma", init, f"data.label_fraction={fraction}", "training.model_selection=last",
                     "training.epochs=2")
        a, b = tmp_path / f"a{fraction}", tmp_path / f"b{fraction}"
        history = train(config, a, show_progress=False)["history"]
        train(config, b, run_data=_scrambled(prepare(config), 1), show_progress=False)
        wa, wb = _weights(a), _weights(b)
        assert all(torch.equal(wa[k], wb[k]) for k in wa) is same
        assert ((a / "calibration.json").read_text() == (b / "calibration.json").read_text()) is same
        assert all(r["val_median_m"] is None for r in history)  # no labelled validation: val never read
        if fraction == 0:
            assert all(r["train_coarse"] == 0 and r["train_fine"] == 0 and r["train_phys"] > 0 for r in history)
            cal = json.loads((a / "calibration.json").read_text())
            assert cal["meta"]["label_fraction"] == 0 and cal["meta"]["transferred_from_run"] == str(world / "source")
    # evaluation reads the transferred calibration back (made from these stores): no labels there either
    from core.learning.inference import calibrate_run, load_run

    run = load_run(tmp_path / "a0")
    assert calibrate_run(run).meta.get("transferred_from_run") == str(world / "source")
    (tmp_path / "a0" / "calibration.json").unlink()  # gone: transferred again, not calibrated on the train labels
    assert calibrate_run(load_run(tmp_path / "a0")).meta.get("transferred_from_run") == str(world / "source")


def test_bad_init_from_is_one_line(world, tmp_path, capsys):
    def train_cli(*sets):
        return refused_train(capsys, tmp_path / "x", *TINY, f"data.dataset={world / 'datasets' / 'gamma'}",
                             f"physics_loss.radio_maps_dir={world / 'radio_maps'}", *sets)

    assert train_cli(f"training.init_from={tmp_path / 'nowhere'}").endswith(
        f"training.init_from: {tmp_path / 'nowhere'}: no such run directory")
    assert "training.init_from: " in train_cli(f"training.init_from={world / 'datasets'}")  # a folder, no run
    err = train_cli(f"training.init_from={world / 'source'}", "model.d_model=64")
    assert f"training.init_from: {world / 'source'} holds another model: d_model 32 (this config: 64)" in err
    assert "holds another model: kind agnostic (this config: memorizing)" in train_cli(
        f"training.init_from={world / 'source'}", "model.kind=memorizing")
    assert "needs training.init_from" in train_cli("data.label_fraction=0")
    with pytest.raises(ConfigError, match="needs training.model_selection: last"):
        cfg(world, "gamma", f"training.init_from={world / 'source'}", "data.label_fraction=0",
            "training.model_selection=val")
