"""The run-directory contract (core.stores.run): taken directories, --resume / --force,
weights-only checkpoints, and the one metrics.jsonl reader."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from core.cli import main
from core.errors import CoreError, StoreError
from core.learning.inference import load_run
from core.learning.model import ModelSpec
from core.learning.run_calibration import ensure_calibration, read_calibration
from core.physics.synthetic import synthetic_scene
from core.stores.run import (
    CALIBRATION,
    calibration_path,
    check_out_dir,
    is_taken,
    load_checkpoint,
    read_metrics,
    read_status,
    run_info,
    save_checkpoint,
    write_calibration,
)

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model.preset=tiny", "training.epochs=1", "training.batch_size=32", "training.num_threads=1"]


@pytest.fixture(scope="module")
def scene_sets(tmp_path_factory) -> list[str]:
    overrides = synthetic_scene(tmp_path_factory.mktemp("scene"), num_ues=80, height=16, width=16, cell=4.0,
                                reports=4, k=2)
    return [a for s in [f"{k}={v}" for k, v in overrides.items()] + TINY for a in ("--set", s)]


def train_cli(scene_sets: list[str], out: Path, *flags: str) -> int:
    return main(["train", "--config", "configs/model.yaml", *scene_sets, "--out", str(out), "--no-progress", *flags])


def shipped_like(tmp_path: Path) -> Path:
    """A run directory holding only a best.pt, like assets/default_run without its other files."""
    run_dir = tmp_path / "default_run"
    run_dir.mkdir()
    shutil.copy(ROOT / "assets" / "default_run" / "best.pt", run_dir / "best.pt")
    return run_dir


# -- taken directories --------------------------------------------------------------------
def test_train_refuses_a_directory_holding_only_best_pt(scene_sets, tmp_path, capsys):
    run_dir = shipped_like(tmp_path)
    before = (run_dir / "best.pt").read_bytes()
    assert train_cli(scene_sets, run_dir) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"error: run directory {run_dir}: already holds a run (best.pt); continue it with --resume, "
                   "replace it with --force, or pick another directory")
    assert train_cli(scene_sets, run_dir, "--resume") == 2  # nothing to resume from
    assert capsys.readouterr().err.strip() == (f"error: run directory {run_dir}: nothing to resume (no last.pt); "
                                               "replace it with --force or pick another directory")
    assert sorted(p.name for p in run_dir.iterdir()) == ["best.pt"] and (run_dir / "best.pt").read_bytes() == before


def test_train_refuses_a_finished_run_and_force_replaces_it(scene_sets, tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert train_cli(scene_sets, run_dir) == 0
    (run_dir / "notes.txt").write_text("from the first run")
    assert train_cli(scene_sets, run_dir) == 2
    assert "already holds a run (best.pt, calibration.json, config.yaml, last.pt, lineage.json, log.txt)" in \
        capsys.readouterr().err
    with pytest.raises(SystemExit) as usage:  # argparse: one or the other
        train_cli(scene_sets, run_dir, "--resume", "--force")
    assert usage.value.code == 2 and "--force: not allowed with argument --resume" in capsys.readouterr().err
    assert train_cli([*scene_sets, "--set", "training.epochs=2"], run_dir, "--force") == 2  # notes.txt is the user's
    assert "it also holds notes.txt, which this command did not make; nothing was deleted" in capsys.readouterr().err
    assert (run_dir / "notes.txt").exists() and read_status(run_dir)["state"] == "done"
    (run_dir / "notes.txt").unlink()
    (run_dir / "eval_test.json").write_text("{}")  # an evaluation is a run file
    assert train_cli([*scene_sets, "--set", "training.epochs=2"], run_dir, "--force") == 0
    assert not (run_dir / "eval_test.json").exists()  # a new directory, not the old one written over
    assert read_status(run_dir)["state"] == "done" and [r["epoch"] for r in read_metrics(run_dir)] == [1, 2]
    assert (run_dir / "log.txt").read_text().count(" train ") == 1
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_a_failed_forced_run_leaves_the_old_one(scene_sets, tmp_path, capsys):
    run_dir = shipped_like(tmp_path)
    sets = [*scene_sets, "--set", f"data.dataset={tmp_path / 'no_such_dataset'}"]
    assert train_cli(sets, run_dir, "--force") == 2
    assert "no_such_dataset: no such store" in capsys.readouterr().err
    assert sorted(p.name for p in run_dir.iterdir()) == ["best.pt"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_check_out_dir_rules(tmp_path):
    missing, empty = tmp_path / "missing", tmp_path / "empty"
    empty.mkdir()
    for path in (missing, empty):
        assert not is_taken(path)
        check_out_dir(path)
        check_out_dir(path, resume=True)  # nothing yet: starts from scratch
    (empty / ".hidden").write_text("")
    assert is_taken(empty)
    with pytest.raises(StoreError, match=r"already holds a run \(\.hidden\)"):
        check_out_dir(empty)
    with pytest.raises(CoreError, match=r"it also holds \.hidden, which this command did not make"):
        check_out_dir(empty, force=True)  # not a run file: --force never deletes it
    (empty / ".hidden").unlink()
    (empty / "best.pt").write_text("")
    (empty / ".best.pt.tmp-1-0123abcd").write_text("")  # a dead writer's temporary of a run file
    check_out_dir(empty, force=True)


# -- checkpoints ---------------------------------------------------------------------------------
class Payload:
    """Unpickling this runs ``_leave_mark``: a weights-only load must never do it."""

    def __init__(self, mark: str) -> None:
        self.mark = mark

    def __reduce__(self):
        return _leave_mark, (self.mark,)


def _leave_mark(path: str) -> None:
    Path(path).write_text("unpickled code ran")


def test_a_checkpoint_with_a_pickled_object_is_refused(tmp_path):
    mark = tmp_path / "mark.txt"
    evil = tmp_path / "evil.pt"
    torch.save({"model": {}, "spec": {}, "extra": Payload(str(mark))}, evil)
    with pytest.raises(StoreError) as info:
        load_checkpoint(evil)
    assert str(info.value) == (f"{evil}: refused: it holds a pickled Python object ({_leave_mark.__module__}."
                               "_leave_mark), and checkpoints load with weights_only (tensors and plain data only)")
    assert not mark.exists()
    # in a run directory too: loading the run refuses it
    run_dir = tmp_path / "run"
    shutil.copytree(ROOT / "assets" / "default_run", run_dir)
    shutil.copy(evil, run_dir / "best.pt")
    with pytest.raises(StoreError, match=r"best\.pt: refused: it holds a pickled Python object"):
        load_run(run_dir)
    assert not mark.exists()


def test_checkpoints_hold_only_tensors_and_plain_data(tmp_path):
    path = tmp_path / "ok.pt"
    payload = {"model": {"w": torch.ones(2)}, "spec": {"bounds": (0.0, 0.0, 1.0, 1.0)}, "epoch": 3,
               "optimizer": {"state": {0: {"step": torch.tensor(1.0)}}, "param_groups": [{"lr": 0.1, "fused": None}]}}
    save_checkpoint(path, payload)
    back = load_checkpoint(path)
    assert torch.equal(back["model"]["w"], torch.ones(2)) and back["optimizer"]["state"][0]["step"] == 1.0
    spec = ModelSpec(token_dim=4, num_site_embeddings=3, num_reports=2, map_channels=1, bounds=(0.0, 0.0, 1.0, 1.0))
    with pytest.raises(StoreError, match=r"\['spec'\] is a core\.learning\.model\.ModelSpec: checkpoints hold only"):
        save_checkpoint(tmp_path / "bad.pt", {"model": {}, "spec": spec})
    assert not (tmp_path / "bad.pt").exists()
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(StoreError, match=r"junk\.pt: corrupt checkpoint"):
        load_checkpoint(tmp_path / "junk.pt")


# -- metrics.jsonl --------------------------------------------------------------------------------
def test_metrics_reader_skips_every_line_that_is_not_a_json_object(tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(ROOT / "assets" / "default_run", run_dir)
    rows = [{"epoch": e, "val_median_m": 10.0 - e, "epoch_s": 1.5} for e in (1, 2, 3)]
    lines = [json.dumps(rows[0]), '{"epoch": 2, "val_med', "", "[1, 2]", json.dumps(rows[1]), "null",
             json.dumps(rows[2]), '{"epoch": 4, "val_median_m": 0.1']  # a torn last line
    (run_dir / "metrics.jsonl").write_text("\n".join(lines))
    assert read_metrics(run_dir) == rows
    os.remove(run_dir / "status.json")
    info = run_info(run_dir)
    assert info.epochs_done == 3 and info.best_val_median_m == 7.0 and info.last_epoch_s == 1.5
    assert list(load_run(run_dir).metrics["epoch"]) == [1, 2, 3]  # the app reads the same rows
    assert read_metrics(tmp_path / "nothing") == []


def test_calibration_is_stored_with_the_run_and_remade_for_other_stores(tmp_path, monkeypatch):
    import core.learning.run_calibration as calibration_module
    from core.stores.dataset import MeasurementDataset
    from core.stores.radio_map import RadioMap

    sets = synthetic_scene(tmp_path / "scene", num_ues=60, height=16, width=16, cell=4.0, reports=4, k=2)
    dataset = MeasurementDataset.load(sets["data.dataset"])
    radio_map = RadioMap.load(Path(sets["physics_loss.radio_maps_dir"]) / "analytic.zarr")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    assert read_calibration(run_dir) is None and calibration_path(run_dir) == run_dir / CALIBRATION
    cal = ensure_calibration(run_dir, dataset, radio_map)  # made and stored
    stored = read_calibration(run_dir)
    assert stored.to_dict() == cal.to_dict() and cal.meta["split"] == "train"
    assert cal.meta["dataset"]["id"] == dataset.ref.id and cal.meta["radio_map"]["id"] == radio_map.ref.id
    calls = []
    real = calibration_module.calibrate
    monkeypatch.setattr(calibration_module, "calibrate", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert ensure_calibration(run_dir, dataset, radio_map).to_dict() == cal.to_dict() and not calls  # read back
    # made from another save of the dataset: remade and replaced
    other = dict(cal.meta, dataset={**cal.meta["dataset"], "id": "0" * 32})
    write_calibration(run_dir, type(cal)(cal.site_names, cal.bias + 1, cal.scale, cal.count, cal.spread,
                                         cal.miss_rate, cal.cell, other))
    again = ensure_calibration(run_dir, dataset, radio_map)
    assert calls == [1] and again.to_dict() == cal.to_dict() and read_calibration(run_dir).to_dict() == cal.to_dict()
    # a corrupt file is a StoreError on read, and replaced by ensure_calibration
    calibration_path(run_dir).write_text("{not json")
    with pytest.raises(StoreError, match=CALIBRATION):
        read_calibration(run_dir)
    assert ensure_calibration(run_dir, dataset, radio_map).to_dict() == cal.to_dict()
    assert read_calibration(run_dir).to_dict() == cal.to_dict() and calls == [1, 1]


def test_workspace_lists_the_users_ablations_then_the_shipped_ones(tmp_path):
    from core.stores.workspace import Workspace

    ws = Workspace.from_env(tmp_path)
    for folder, name in ((ws.runs_dir, "mine"), (ws.assets_dir, "ablation_etoile"), (ws.assets_dir, "default_run")):
        (folder / name).mkdir(parents=True)
    (ws.runs_dir / "mine" / "table.csv").write_text("split\n")
    (ws.assets_dir / "ablation_etoile" / "cdf.json").write_text("{}")
    (ws.assets_dir / "default_run" / "table.csv").write_text("split\n")  # not an ablation folder name
    assert ws.ablations() == [ws.runs_dir / "mine", ws.assets_dir / "ablation_etoile"]
    # the shipped étoile ablation is found in the repository itself
    shipped = Workspace.from_env().ablations()
    assert any(p.name == "ablation_etoile" and (p / "table.md").is_file() for p in shipped)
