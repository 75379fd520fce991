"""Data lineage: ids and digests of stores, the map a dataset was made with, and the
refusal of a radio map that is not the dataset's (train, evaluate, the shipped stores)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import zarr

from core.cli import main
from core.errors import ConfigError, StoreError
from core.learning.config import load_config
from core.learning.scene_data import load_scene
from core.learning.training import train
from core.physics.synthetic import synthetic_scene
from core.stores.dataset import MeasurementDataset
from core.stores.lineage import check_scene_stores, recorded_map, store_ref
from core.stores.radio_map import RadioMap
from core.stores.run import read_lineage

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model.preset=tiny", "training.epochs=1", "training.batch_size=32", "training.num_threads=1"]


def two_scenes(root: Path) -> Path:
    """``root/radio_maps/{alpha,beta}.zarr`` and ``root/datasets/{alpha,beta}``, each made with its map."""
    synthetic_scene(root, num_ues=80, height=16, width=16, cell=4.0, reports=4, k=2, seed=0, scene="alpha")
    synthetic_scene(root, num_ues=80, height=16, width=20, cell=4.0, reports=4, k=2, seed=1, scene="beta")
    return root


def alpha_overrides(root: Path, *extra: str) -> list[str]:
    """Config overrides: train on ``root``'s alpha dataset with its maps folder, tiny and quick."""
    return [f"data.dataset={root / 'datasets' / 'alpha'}", f"physics_loss.radio_maps_dir={root / 'radio_maps'}",
            *TINY, *extra]


def train_args(root: Path, out: Path, *extra: str) -> list[str]:
    sets = [a for s in alpha_overrides(root, *extra) for a in ("--set", s)]
    return ["train", "--config", "configs/model.yaml", *sets, "--out", str(out), "--no-progress"]


def one_line_error(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


# -- the stores ----------------------------------------------------------------------------
def test_save_stamps_id_and_digest_readable_without_the_arrays(tmp_path):
    two_scenes(tmp_path)
    path = tmp_path / "radio_maps" / "alpha.zarr"
    radio_map = RadioMap.load(path)
    ref = store_ref(path)
    assert ref.scene == "alpha" and len(ref.id) == 32 and ref.digest == radio_map.digest() == radio_map.lineage.digest
    radio_map.save(tmp_path / "copy.zarr")  # same content, another save: same digest, new id
    copy = store_ref(tmp_path / "copy.zarr")
    assert copy.digest == ref.digest and copy.id != ref.id and radio_map.lineage.id == copy.id
    shutil.rmtree(path / "values")  # the cheap read never opens an array
    assert store_ref(path) == ref
    # the dataset records the map it was made with
    dataset = MeasurementDataset.load(tmp_path / "datasets" / "alpha")
    assert recorded_map(tmp_path / "datasets" / "alpha") == dataset.radio_map_ref
    assert dataset.radio_map_ref.id == ref.id and dataset.radio_map_ref.scene == "alpha"
    assert dataset.lineage.digest == dataset.digest()


def test_a_store_edited_after_saving_fails_its_digest(tmp_path):
    two_scenes(tmp_path)
    path = tmp_path / "radio_maps" / "alpha.zarr"
    values = zarr.open_array(store=str(path / "values"), mode="r+")
    values[0, 0, 0] = values[0, 0, 0] + 1.0
    with pytest.raises(StoreError, match=r"alpha\.zarr: content does not match the digest written at save"):
        RadioMap.load(path)
    ds_path = tmp_path / "datasets" / "beta"
    split = zarr.open_array(store=str(ds_path / "split"), mode="r+")
    split[0] = (int(split[0]) + 1) % 3
    with pytest.raises(StoreError, match=r"beta: content does not match the digest"):
        MeasurementDataset.load(ds_path)


def test_shipped_stores_and_run_carry_matching_lineage():
    """Metadata only: the shipped dataset records the shipped map, and the shipped run both."""
    dataset, radio_map = ROOT / "datasets" / "etoile", ROOT / "radio_maps" / "etoile.zarr"
    check_scene_stores(dataset, radio_map)
    run = read_lineage(ROOT / "assets" / "default_run")
    assert run.dataset.id == store_ref(dataset).id and run.radio_map.id == store_ref(radio_map).id
    assert recorded_map(dataset).id == run.radio_map.id


# -- train refuses a map that is not the dataset's --------------------------------------------
def test_scene_comes_from_the_dataset_and_a_pin_to_another_scene_is_refused(tmp_path, capsys):
    """The observed bug: a config pinning one scene, the dataset of another, both maps present."""
    root = two_scenes(tmp_path)
    config = load_config(ROOT / "configs" / "model.yaml", [f"data.dataset={root / 'datasets' / 'beta'}",
                                                           f"physics_loss.radio_maps_dir={root / 'radio_maps'}"])
    assert config.data.scene is None  # the presets pin no scene
    dataset, radio_map = load_scene(config)
    assert radio_map.attrs["scene"] == "beta" and radio_map.lineage.id == dataset.radio_map_ref.id
    out = tmp_path / "run"
    assert main(train_args(root, out, "data.scene=beta")) == 2
    line = one_line_error(capsys)
    assert line.startswith("error: data.scene 'beta' selects radio map ")
    assert f"{root / 'radio_maps' / 'beta.zarr'} (scene beta, id " in line
    assert f"dataset {root / 'datasets' / 'alpha'} (scene alpha, id " in line
    assert not out.exists()


def test_train_refuses_a_map_of_another_scene_at_the_scenes_path(tmp_path, capsys):
    root = two_scenes(tmp_path)
    alpha_map = root / "radio_maps" / "alpha.zarr"
    shutil.rmtree(alpha_map)
    shutil.copytree(root / "radio_maps" / "beta.zarr", alpha_map)
    beta_id = store_ref(alpha_map).id
    assert main(train_args(root, tmp_path / "run")) == 2
    line = one_line_error(capsys)
    assert line == (f"error: radio map {alpha_map} (scene beta, id {beta_id[:8]}) is not of the scene of dataset "
                    f"{root / 'datasets' / 'alpha'} (scene alpha, id {store_ref(root / 'datasets' / 'alpha').id[:8]})")
    assert not (tmp_path / "run").exists()


def test_train_refuses_another_save_of_the_scenes_map(tmp_path, capsys):
    root = two_scenes(tmp_path)
    alpha_map = root / "radio_maps" / "alpha.zarr"
    made_with = store_ref(alpha_map)
    RadioMap.load(alpha_map).save(alpha_map)  # e.g. regenerated: same scene, new id
    now = store_ref(alpha_map)
    with pytest.raises(StoreError) as info:
        load_scene(load_config(None, alpha_overrides(root)))
    assert str(info.value) == (
        f"radio map {alpha_map} (scene alpha, id {now.id[:8]}) is not the map dataset {root / 'datasets' / 'alpha'} "
        f"(scene alpha, id {store_ref(root / 'datasets' / 'alpha').id[:8]}) was made with ({alpha_map} "
        f"(scene alpha, id {made_with.id[:8]})): make the dataset again, or restore that map")
    assert main(train_args(root, tmp_path / "run")) == 2
    assert "is not the map dataset" in one_line_error(capsys)


# -- evaluate refuses a run whose stores changed ------------------------------------------------
def trained_run(root: Path) -> Path:
    two_scenes(root)
    run_dir = root / "runs" / "alpha"
    train(load_config(ROOT / "configs" / "model.yaml", alpha_overrides(root)), run_dir,
          device="cpu", show_progress=False)
    return run_dir


def evaluate(run_dir: Path, capsys) -> subprocess.CompletedProcess:
    """``python -m core evaluate --run RUN --json`` through the entry point's ``main``, in this process (the
    real process's exit status and stderr: tests/test_inference.py and tests/test_outputs.py)."""
    argv = ["evaluate", "--run", str(run_dir), "--json"]
    capsys.readouterr()
    code = main(argv)
    out = capsys.readouterr()
    return subprocess.CompletedProcess(argv, code, out.out, out.err)


def test_evaluate_refuses_a_map_of_another_scene(tmp_path, capsys):
    run_dir = trained_run(tmp_path)
    alpha_map = tmp_path / "radio_maps" / "alpha.zarr"
    assert json.loads(evaluate(run_dir, capsys).stdout)["count"] > 0
    shutil.rmtree(alpha_map)
    shutil.copytree(tmp_path / "radio_maps" / "beta.zarr", alpha_map)
    proc = evaluate(run_dir, capsys)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert proc.stderr.startswith(f"error: radio map {alpha_map} (scene beta, id ")
    assert f"is not of the scene of dataset {tmp_path / 'datasets' / 'alpha'} (scene alpha, id " in proc.stderr


def test_evaluate_refuses_a_dataset_the_run_was_not_trained_on(tmp_path, capsys):
    run_dir = trained_run(tmp_path)
    ds_path = tmp_path / "datasets" / "alpha"
    trained_on = store_ref(ds_path)
    dataset = MeasurementDataset.load(ds_path)
    dataset.split[:] = np.int8(0)  # another split of the same walks, saved in place (new id)
    dataset.split[:10] = np.int8(1)
    dataset.split[10:20] = np.int8(2)
    dataset.save(ds_path)
    proc = evaluate(run_dir, capsys)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == (
        f"error: run {run_dir} was trained on dataset {ds_path} (scene alpha, id {trained_on.id[:8]}), but its "
        f"config now leads to dataset {ds_path} (scene alpha, id {store_ref(ds_path).id[:8]}): train it again on "
        "these stores, or restore that one")


def test_a_pin_that_agrees_with_the_dataset_is_accepted(tmp_path):
    root = two_scenes(tmp_path)
    config = load_config(None, alpha_overrides(root, "data.scene=alpha"))
    assert load_scene(config)[1].attrs["scene"] == "alpha"
    with pytest.raises(ConfigError, match="drop data.scene or set it to 'alpha'"):
        load_scene(load_config(None, alpha_overrides(root, "data.scene=gamma")))


# -- make-dataset: the map must be there and be of the scene (issue 16, item 6) ------------------------------
def make_dataset_args(maps: Path | None, out: Path, *extra: str) -> list[str]:
    """make-dataset of the tiny scene; it is refused before any trace, so no Sionna runs."""
    where = ["--radio-maps", str(maps)] if maps is not None else []
    return ["make-dataset", "--scene", "simple_street_canyon", *where, "--out", str(out), "--num-ues", "4",
            "--reports", "2", "--no-progress", *extra]


def test_make_dataset_refuses_another_scenes_map_at_the_scenes_path(tmp_path, capsys):
    """The issue: DIR/simple_street_canyon.zarr really munich's map was used, with munich's bounds."""
    synthetic_scene(tmp_path, num_ues=20, height=8, width=8, reports=2, k=2, scene="munich")
    maps = tmp_path / "radio_maps"
    (maps / "munich.zarr").rename(maps / "simple_street_canyon.zarr")
    munich_id = store_ref(maps / "simple_street_canyon.zarr").id
    assert main(make_dataset_args(maps, tmp_path / "ds")) == 2
    assert one_line_error(capsys) == (
        f"error: radio map {maps / 'simple_street_canyon.zarr'} (scene munich, id {munich_id[:8]}) is not a map of "
        f"scene 'simple_street_canyon' (--scene simple_street_canyon): its attrs name scene 'munich'; generate the "
        f"map of simple_street_canyon there")
    assert not (tmp_path / "ds").exists()


def test_make_dataset_refuses_a_missing_maps_folder_or_map_unless_asked_for_no_map(tmp_path, capsys):
    """The issue: a missing --radio-maps folder exited 0 and recorded no map."""
    assert main(make_dataset_args(tmp_path / "nowhere", tmp_path / "ds")) == 2
    assert one_line_error(capsys) == (
        f"error: --radio-maps {tmp_path / 'nowhere'}: no such folder; generate the maps there first (python -m core "
        f"generate-maps --output-dir {tmp_path / 'nowhere'}), or ask for a dataset without a map (--no-map)")
    (tmp_path / "empty").mkdir()
    assert main(make_dataset_args(tmp_path / "empty", tmp_path / "ds")) == 2
    line = one_line_error(capsys)
    assert line.startswith(f"error: radio map {tmp_path / 'empty' / 'simple_street_canyon.zarr'}: no such store; ")
    assert line.endswith("or ask for a dataset without a map (--no-map)")
    assert not (tmp_path / "ds").exists()


def mapless_dataset(root: Path, sites=None) -> tuple[Path, Path]:
    """A dataset marked as made without a map (no map recorded) and a map at its scene's path, whose sites
    are the dataset's (default) or ``sites``."""
    from core.physics.synthetic import analytic_radio_map, synthetic_dataset
    from core.stores.lineage import WITHOUT_MAP

    rm = analytic_radio_map(16, 16, (-32.0, -32.0, 32.0, 32.0))
    rm._attrs["scene"] = "alpha"
    ds = synthetic_dataset(rm, 80, reports=4, k=2, seed=0)
    ds.attrs.update(scene="alpha", **{WITHOUT_MAP: True})
    ds.save(root / "datasets" / "alpha")
    if sites is not None:
        rm = analytic_radio_map(16, 16, (-32.0, -32.0, 32.0, 32.0), sites=sites)
        rm._attrs["scene"] = "alpha"
    rm.save(root / "radio_maps" / "alpha.zarr")
    return root / "datasets" / "alpha", root / "radio_maps" / "alpha.zarr"


def test_a_dataset_made_without_a_map_trains_only_with_a_map_of_its_sites(tmp_path, capsys):
    """The issue: a dataset that records no map trained against any map of the same scene."""
    ds_path, map_path = mapless_dataset(tmp_path / "same")
    assert recorded_map(ds_path) is None
    dataset, radio_map = load_scene(load_config(None, alpha_overrides(tmp_path / "same")))  # same sites: accepted
    assert radio_map.source == str(map_path)
    other = np.array([[-20.0, -20.0, 25.0], [20.0, -10.0, 25.0], [0.0, 25.0, 25.0]])
    ds_path, map_path = mapless_dataset(tmp_path / "other", sites=other)
    out = tmp_path / "run"
    assert main(train_args(tmp_path / "other", out)) == 2
    line = one_line_error(capsys)
    assert line.startswith(f"error: dataset {ds_path} (scene alpha, id ")
    assert (f"was made without a radio map (make-dataset --no-map), and radio map {map_path} (scene alpha, id "
            in line and "has other sites (names or positions) than it was traced with" in line)
    assert not out.exists()


def test_evaluate_a_held_out_scene_reads_the_map_its_dataset_records(tmp_path, capsys):
    """The issue: evaluate --scene S --dataset D looked only in the run's maps folder for S's map."""
    run_dir = trained_run(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    synthetic_scene(elsewhere, num_ues=80, height=16, width=16, cell=4.0, reports=4, k=2, seed=2, scene="gamma")
    dataset = elsewhere / "datasets" / "gamma"
    assert not (tmp_path / "radio_maps" / "gamma.zarr").exists()  # not in the run's maps folder
    assert recorded_map(dataset).path == str(elsewhere / "radio_maps" / "gamma.zarr")
    assert main(["evaluate", "--run", str(run_dir), "--scene", "gamma", "--dataset", str(dataset), "--split", "val",
                 "--json", "--no-progress"]) == 0, capsys.readouterr().err
    result = json.loads(capsys.readouterr().out)
    assert result["scene"] == "gamma" and result["held_out"] and result["count"] > 0
    assert [row["role"] for row in result["scenes"]] == ["trained", "held-out"]
