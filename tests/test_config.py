"""Training configuration: the shipped configs, overrides and clear errors."""

from pathlib import Path

import pytest

from core.cli import main
from core.errors import ConfigError
from core.learning.config import Config, apply_override, config_from_dict, load_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name, lam, active", [("baseline", 0.0, False), ("model", 0.1, True), ("strong_physics", 0.5, True)])
def test_shipped_configs(name, lam, active):
    cfg = load_config(ROOT / "configs" / f"{name}.yaml")
    assert cfg.physics_loss.lambda_phys == lam
    assert cfg.physics_active is active
    assert cfg.data.dataset == "datasets/etoile"
    assert cfg.physics_loss.radio_maps_dir == "radio_maps"
    # the three differ only in the physics term
    base = load_config(ROOT / "configs" / "model.yaml").to_dict()
    mine = cfg.to_dict()
    for section in ("data", "model", "training"):
        assert mine[section] == base[section]
    for key in ("warmup_epochs", "ramp_epochs", "per_sample_grad_clip", "feature_weights", "loss"):
        assert mine["physics_loss"][key] == base["physics_loss"][key]


def test_overrides_are_yaml_typed():
    cfg = load_config(ROOT / "configs" / "model.yaml", ["training.epochs=3", "physics_loss.lambda_phys=0.25",
                                                       "physics_loss.refinement.enabled=false",
                                                       "physics_loss.feature_weights={toa: 2.0}"])
    assert cfg.training.epochs == 3 and cfg.physics_loss.lambda_phys == 0.25
    assert cfg.physics_loss.refinement.enabled is False
    assert cfg.physics_loss.feature_weights == {"toa": 2.0}
    data = {}
    apply_override(data, "model.d_model=48")
    assert data == {"model": {"d_model": 48}}


@pytest.mark.parametrize("override, key", [
    ("physics_loss.lambda_phys=-0.1", "physics_loss.lambda_phys"),
    ("training.epochs=0", "training.epochs"),
    ("training.batchsize=4", "training.batchsize"),
    ("physics_loss.refinement.num_step=3", "physics_loss.refinement.num_step"),
    ("physics_loss.refinement.min_confidence_threshold=2", "physics_loss.refinement.min_confidence_threshold"),
    ("model.preset=huge", "model.preset"),
    ("physics_loss.feature_weights={rsrp: 1.0}", "physics_loss.feature_weights"),
    ("physics_loss.loss=l1", "physics_loss.loss"),
])
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError) as info:
        load_config(ROOT / "configs" / "model.yaml", [override])
    assert key in str(info.value)


def test_inconsistent_sizes_and_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="model.d_model"):
        config_from_dict({"model": {"d_model": 30, "num_heads": 4}})
    with pytest.raises(ConfigError, match="no such config"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("training: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(bad)
    with pytest.raises(ConfigError, match="expected section.key=value"):
        load_config(None, ["training.epochs"])
    assert isinstance(load_config(None), Config)


def test_cli_reports_bad_config_in_one_line(tmp_path, capsys):
    """The command's main in-process (a real ``python -m core train`` refusing a config:
    tests/test_validation.py)."""
    code = main(["train", "--config", str(ROOT / "configs" / "model.yaml"), "--set", "physics_loss.lambda_phys=-1",
                 "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2
    assert "physics_loss.lambda_phys" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("override, key", [
    ("training.loss.use_physics_loss=true", "training.loss.use_physics_loss"),
    ("physics_loss.enabled=false", "physics_loss.enabled"),
])
def test_removed_physics_switches_say_what_replaced_them(override, key, tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(ROOT / "configs" / "model.yaml", [override])
    message = str(info.value)
    assert key in message and "removed" in message and "physics_loss.lambda_phys" in message
    assert "\n" not in message
    old = tmp_path / "old.yaml"
    old.write_text("physics_loss:\n  enabled: true\n  lambda_phys: 0.1\n")
    with pytest.raises(ConfigError, match=r"old.yaml: physics_loss.enabled: removed; physics_loss.lambda_phys"):
        load_config(old)


def test_new_data_and_physics_keys_are_validated():
    cfg = load_config(ROOT / "configs" / "model.yaml", ["data.label_fraction=0.05", "data.split=spatial",
                                                       "physics_loss.ramp_epochs=0"])
    assert cfg.data.label_fraction == 0.05 and cfg.data.split == "spatial"
    assert cfg.lambda_at(cfg.physics_loss.warmup_epochs) == cfg.physics_loss.lambda_phys
    for bad, key in (("data.label_fraction=0", "data.label_fraction"), ("data.label_fraction=1.5", "data.label_fraction"),
                     ("data.split=blocks", "data.split"), ("physics_loss.warmup_epochs=-1", "physics_loss.warmup_epochs"),
                     ("physics_loss.per_sample_grad_clip=-0.1", "physics_loss.per_sample_grad_clip")):
        with pytest.raises(ConfigError, match=key):
            load_config(ROOT / "configs" / "model.yaml", [bad])


def test_serving_features_are_off_by_default_and_the_shipped_auto_still_loads():
    from core import REPO_ROOT
    from core.learning.physics_terms import likelihood_config
    from core.physics.calibration import Calibration
    from core.stores.run import read_config

    assert Config().physics_loss.cell_features == []
    assert likelihood_config(Config().physics_loss).cell_features == ()
    shipped = read_config(REPO_ROOT / "assets/default_run")
    assert shipped.physics_loss.cell_features == "auto"
    # its calibration predates the independence record: auto picks no serving feature from it
    cal = Calibration.load(REPO_ROOT / "assets/default_run/calibration.json")
    assert all("independent" not in entry for entry in cal.cell.values())
    assert cal.informative_cell_features == ()
