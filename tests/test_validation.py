"""Validation before work (issue 16): every number of a config and of every command line is finite and in
range, outputs that cannot be written and empty datasets are refused up front, in one line with exit
status 2, and nothing is left behind. Analytic stores only (no Sionna)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import typing
from pathlib import Path

import pytest
from pydantic import BaseModel

from core import REPO_ROOT
from core.cli import main
from core.errors import ConfigError
from core.learning.config import Config, load_config
from core.physics.synthetic import synthetic_scene

TINY = ["model.preset=tiny", "training.epochs=1", "training.batch_size=32", "training.num_threads=1"]


def _sets(overrides) -> list[str]:
    return [a for s in overrides for a in ("--set", s)]


@pytest.fixture(scope="module")
def scene(tmp_path_factory) -> dict[str, str]:
    """An analytic map and dataset: ``{"data.dataset": ..., "physics_loss.radio_maps_dir": ...}``."""
    root = tmp_path_factory.mktemp("scene")
    return synthetic_scene(root, num_ues=80, height=16, width=16, cell=4.0, reports=4, k=2, seed=0)


def _scene_sets(scene: dict[str, str]) -> list[str]:
    return _sets([f"{k}={v}" for k, v in scene.items()] + TINY)


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: ") and "Traceback" not in err
    return lines[0]


def _refused(argv: list[str], capsys) -> str:
    """Run ``python -m core ARGV`` in-process; it must exit 2 (returned or argparse's SystemExit) with one line."""
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    assert code == 2, capsys.readouterr()
    return _one_line(capsys.readouterr().err)


@contextlib.contextmanager
def read_only(folder: Path):
    """``folder`` made read-only for this process: chmod for a user, the immutable flag for root (whom
    permission bits do not stop)."""
    folder.mkdir(parents=True, exist_ok=True)
    root = os.geteuid() == 0
    if root:
        subprocess.run(["chattr", "+i", str(folder)], check=True)
    else:
        folder.chmod(0o555)
    try:
        with pytest.raises(OSError):
            (folder / "probe").write_text("x")  # really read-only
        yield folder
    finally:
        if root:
            subprocess.run(["chattr", "-i", str(folder)], check=True)
        else:
            folder.chmod(0o755)


# -- the config: every number finite, and in range ----------------------------------------------
def _float_fields(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Dotted paths of every float field of the config sections (the model-wide rule must cover all)."""
    out = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out += _float_fields(ann, f"{prefix}{name}.")
        elif ann is float or float in typing.get_args(ann):
            out.append(prefix + name)
    return out


FLOAT_FIELDS = _float_fields(Config)


def test_the_config_has_the_float_fields_this_test_walks():
    assert {"training.learning_rate", "physics_loss.lambda_phys", "physics_loss.warmup_epochs",
            "data.label_fraction", "physics_loss.refinement.min_confidence_threshold"} <= set(FLOAT_FIELDS)


@pytest.mark.parametrize("key", FLOAT_FIELDS)
@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf"])
def test_every_float_of_the_config_refuses_nan_and_inf(key, value):
    with pytest.raises(ConfigError, match=rf"^config \(with --set\): {key}: Input should be a finite number"):
        load_config(None, [f"{key}={value}"])


@pytest.mark.parametrize("override,key", [
    ("physics_loss.feature_weights={toa: .nan}", "physics_loss.feature_weights.toa"),
    ("training.learning_rate=5", "training.learning_rate"), ("physics_loss.lambda_phys=1e30", "physics_loss.lambda_phys"),
    ("seed=-1", "seed"), ("training.epochs=10000000", "training.epochs"),
])
def test_config_ranges(override, key):
    with pytest.raises(ConfigError, match=rf"^config \(with --set\): {key}: "):
        load_config(None, [override])


def test_train_with_an_infinite_learning_rate_exits_2_in_one_line(tmp_path):
    """The issue's command: exit 0 with NaN losses and status done before."""
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "core", "train", "--config", "configs/model.yaml",
                           "--set", "training.learning_rate=.inf", "--set", "model.preset=tiny",
                           "--set", "training.epochs=1", "--out", str(out)],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert _one_line(proc.stderr) == ("error: configs/model.yaml (with --set): training.learning_rate: "
                                      "Input should be a finite number")
    assert not out.exists()


def test_infinite_lambda_without_warmup_leaves_nothing_behind(scene, tmp_path, capsys):
    """The issue's command: an IndexError before, with config, lineage, log and calibration left behind."""
    out = tmp_path / "run"
    line = _refused(["train", "--config", "configs/model.yaml", *_scene_sets(scene),
                     "--set", "physics_loss.lambda_phys=.inf", "--set", "physics_loss.warmup_epochs=0",
                     "--out", str(out), "--no-progress"], capsys)
    assert "physics_loss.lambda_phys: Input should be a finite number" in line
    assert list(tmp_path.iterdir()) == []


# -- command-line numbers ---------------------------------------------------------------------------
@pytest.mark.parametrize("argv,flag", [
    (["evaluate", "--run", "assets/default_run", "--threshold", "nan"], "--threshold"),
    (["evaluate", "--run", "assets/default_run", "--threshold", "1.5"], "--threshold"),
    (["evaluate", "--run", "assets/default_run", "--top-k", "-1"], "--top-k"),
    (["evaluate", "--run", "assets/default_run", "--window", "inf"], "--window"),
    (["generate-maps", "--scenes", "simple_street_canyon", "--center", "nan", "0"], "--center"),
    (["generate-maps", "--scenes", "simple_street_canyon", "--resolution", "inf"], "--resolution"),
    (["generate-maps", "--scenes", "simple_street_canyon", "--samples-per-tx", "0"], "--samples-per-tx"),
    (["generate-maps", "--scenes", "simple_street_canyon", "--map-size", "0", "8"], "--map-size"),
    (["generate-maps", "--scenes", "simple_street_canyon", "--seed", "-3"], "--seed"),
    (["make-dataset", "--scene", "simple_street_canyon", "--out", "x", "--num-ues", "0"], "--num-ues"),
    (["make-dataset", "--scene", "simple_street_canyon", "--out", "x", "--reports", "-2"], "--reports"),
    (["make-dataset", "--scene", "simple_street_canyon", "--out", "x", "--seed", "-1"], "--seed"),
    (["place-sites", "--scene", "simple_street_canyon", "--spacing", "nan"], "--spacing"),
    (["place-sites", "--scene", "simple_street_canyon", "--num-sites", "0"], "--num-sites"),
    (["ablate", "--fractions", "0"], "--fractions"), (["ablate", "--lambdas", "nan"], "--lambdas"),
    (["ablate", "--n-boot", "0"], "--n-boot"), (["ablate", "--seeds", "-1"], "--seeds"),
    (["bench", "maps", "--resolution", "nan"], "--resolution"),
    (["bench", "train", "--lambda-phys", "inf"], "--lambda-phys"),
    (["jobs", "list", "--limit", "0"], "--limit"),
])
def test_every_numeric_flag_is_checked_when_read(argv, flag, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing may be written, and nothing is: the folder stays empty
    line = _refused(argv, capsys)
    assert line.startswith(f"error: argument {flag}: must be "), line
    assert list(tmp_path.iterdir()) == []


def test_jobs_prune_refuses_a_negative_keep(tmp_path, capsys):
    """The issue's command deleted every log before."""
    from core.jobs.manager import JobError, JobManager

    db = tmp_path / "jobs.sqlite"
    assert _refused(["jobs", "--db", str(db), "prune", "--keep", "-1"], capsys) == (
        "error: argument --keep: must be an integer >= 0, got '-1' (see python -m core jobs prune --help)")
    assert not db.exists()
    with pytest.raises(JobError, match="keep must be >= 0"):
        JobManager(db).prune_logs(keep=-1)


# -- outputs that cannot be written, and empty datasets ------------------------------------------------
def test_read_only_outputs_are_refused_before_any_work(scene, tmp_path, capsys):
    with read_only(tmp_path / "ro") as ro:
        line = _refused(["generate-maps", "--scenes", "simple_street_canyon", "--radio-maps", str(ro / "maps")], capsys)
        assert line.startswith(f"error: --radio-maps {ro / 'maps' / 'simple_street_canyon.zarr'}: cannot write in {ro} (")
        line = _refused(["make-dataset", "--scene", "simple_street_canyon", "--out", str(ro / "ds"),
                         "--radio-maps", scene["physics_loss.radio_maps_dir"]], capsys)
        assert line.startswith(f"error: --out {ro / 'ds'}: cannot write in {ro} (")
        line = _refused(["train", "--config", "configs/model.yaml", *_scene_sets(scene), "--out", str(ro / "run"),
                         "--no-progress"], capsys)
        assert line.startswith(f"error: --out {ro / 'run'}: cannot write in {ro} (")
        line = _refused(["ablate", "--quick", "--out", str(ro / "ablation"), "--no-progress"], capsys)
        assert line.startswith(f"error: --out {ro / 'ablation'}: cannot write in {ro} (")
        assert list(ro.iterdir()) == []


def test_evaluating_a_run_in_a_read_only_folder_is_refused_up_front(scene, tmp_path, capsys):
    from core.learning.training import train

    run_dir = tmp_path / "run"
    train(load_config(None, [f"{k}={v}" for k, v in scene.items()] + TINY), run_dir, device="cpu",
          show_progress=False)
    before = sorted(p.name for p in run_dir.iterdir())
    with read_only(run_dir):
        line = _refused(["evaluate", "--run", str(run_dir), "--split", "val"], capsys)
    assert line.startswith(f"error: --run {run_dir / 'eval_val.json'}: cannot write in {run_dir} (")
    assert sorted(p.name for p in run_dir.iterdir()) == before


def test_an_empty_dataset_is_one_clear_line(scene, tmp_path, capsys):
    import numpy as np

    from core.stores.dataset import MeasurementDataset

    empty = tmp_path / "empty"
    MeasurementDataset.load(scene["data.dataset"]).subset(np.arange(0)).save(empty)
    sets = _sets([f"data.dataset={empty}", f"physics_loss.radio_maps_dir={scene['physics_loss.radio_maps_dir']}",
                  *TINY])
    line = _refused(["train", "--config", "configs/model.yaml", *sets, "--out", str(tmp_path / "run"),
                     "--no-progress"], capsys)
    assert line == (f"error: dataset {empty}: holds no samples (0 UE walks); make it again with "
                    "`python -m core make-dataset --num-ues N`")
    line = _refused(["consistency", "--dataset", str(empty), "--radio-maps", scene["physics_loss.radio_maps_dir"]],
                    capsys)
    assert "holds no samples" in line
    assert not (tmp_path / "run").exists()
