"""Nothing a user made is destroyed, and one writer per output (core/stores/output.py, core/stores/lock.py).

Real commands (real processes, or the entry point's ``main`` in this process where only the refusal is
checked): ``--force`` replaces only the command's own output, the shipped assets and stores are read-only
to every command, two writers of one output are refused with the holder's pid, and a dead holder's lock
is taken over.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from waiting import gone, wait_for

from core import REPO_ROOT
from core.cli import main
from core.errors import CoreError
from core.jobs.manager import JobManager
from core.physics.synthetic import synthetic_scene
from core.stores.lock import OutputBusy, holder, lock_paths, output_lock
from core.stores.output import check_writable, is_shipped
from core.stores.run import evaluation_path, evaluations, read_config, read_metrics, read_status

TINY = ["model.preset=tiny", "training.batch_size=32", "training.num_threads=1"]
ENV = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}


def core(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "core", *args], cwd=REPO_ROOT, capture_output=True, text=True,
                          env=env or ENV, timeout=timeout)


def tree_digest(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (hidden ones too) with its content hash."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def git_changes(*paths: str) -> str:
    return subprocess.run(["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--ignored", "--", *paths],
                          capture_output=True, text=True, check=True).stdout


@pytest.fixture(scope="module")
def scene(tmp_path_factory) -> dict[str, str]:
    return synthetic_scene(tmp_path_factory.mktemp("scene"), num_ues=80, height=16, width=16, cell=4.0,
                           reports=4, k=2)


@pytest.fixture(scope="module")
def scene_sets(scene) -> list[str]:
    return [a for s in [f"{k}={v}" for k, v in scene.items()] + TINY for a in ("--set", s)]


# -- --force replaces only the command's own output ----------------------------------------------
def test_train_force_refuses_a_folder_of_the_users_and_leaves_it(tmp_path, monkeypatch, capsys):
    """The issue's command, exactly (its main, from the repository root): exit 2, one line listing what it would
    have deleted, both left."""
    d = tmp_path / "thesis"
    (d / "docs").mkdir(parents=True)
    (d / "thesis.tex").write_text("x\n")
    monkeypatch.chdir(REPO_ROOT)
    code = main(["train", "--config", "configs/model.yaml", "--set", "model.preset=tiny", "--set", "training.epochs=1",
                 "--out", str(d), "--force"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "it also holds docs, thesis.tex, which this command did not make; nothing was deleted" in err
    assert "(it would have deleted docs/, thesis.tex)" in err
    assert (d / "docs").is_dir() and (d / "thesis.tex").read_text() == "x\n"


def test_generate_maps_and_make_dataset_force_replace_only_a_store_of_their_kind(tmp_path, scene):
    maps = tmp_path / "maps"
    mine = maps / "simple_street_canyon.zarr"
    mine.mkdir(parents=True)
    (mine / "notes.txt").write_text("mine")
    proc = core("generate-maps", "--scenes", "simple_street_canyon", "--output-dir", str(maps), "--force",
                "--no-progress")
    assert proc.returncode == 2 and "--force replaces only a radio map store, but this is not one" in proc.stdout
    assert (mine / "notes.txt").read_text() == "mine"
    radio_map = Path(scene["physics_loss.radio_maps_dir"]) / "analytic.zarr"
    proc = core("make-dataset", "--scene", "simple_street_canyon", "--out", str(radio_map), "--force",
                "--num-ues", "10", "--no-progress")
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"error: --out {radio_map}: --force replaces only a measurement dataset store, "
                                  "but this is not one; nothing was deleted")
    assert (radio_map / "zarr.json").exists()


# -- shipped outputs are read-only ----------------------------------------------------------------
def test_the_shipped_paths(tmp_path, monkeypatch):
    for path in ("assets/default_run", "assets/ablation_etoile", "assets/new", "radio_maps/etoile.zarr",
                 "datasets/etoile", ".", "radio_maps"):
        assert is_shipped(REPO_ROOT / path), path
    for path in (tmp_path / "x", REPO_ROOT / "runs" / "x", REPO_ROOT / "radio_maps" / "new_scene.zarr",
                 REPO_ROOT / "datasets" / "etoile-hard"):
        assert not is_shipped(path), path
    with pytest.raises(CoreError, match="shipped with the project and read-only"):
        check_writable(REPO_ROOT / "datasets" / "etoile")
    monkeypatch.setenv("CORE_WRITE_SHIPPED", "1")  # the Makefile's default-data and scenes targets
    check_writable(REPO_ROOT / "datasets" / "etoile")


@pytest.mark.parametrize("argv", [
    ["train", "--config", "configs/model.yaml", "--out", "assets/default_run", "--force"],
    ["train", "--config", "configs/model.yaml", "--out", "assets/new_run"],
    ["ablate", "--quick", "--scene", "simple_street_canyon", "--seeds", "0", "--fractions", "1", "--splits", "random",
     "--lambdas", "0.1", "--out", "assets/ablation_etoile"],
    ["make-dataset", "--scene", "etoile", "--out", "datasets/etoile", "--force", "--num-ues", "10"],
])
def test_no_command_writes_the_shipped_assets(argv, capsys):
    before, status = tree_digest(REPO_ROOT / "assets"), git_changes("assets", "radio_maps", "datasets")
    assert main([*argv, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "shipped with the project and read-only" in err
    assert tree_digest(REPO_ROOT / "assets") == before  # not even a lock file beside them
    # nothing changed or appeared beside the shipped stores (a user's own datasets may be there already)
    assert git_changes("assets", "radio_maps", "datasets") == status


def test_evaluating_the_shipped_run_writes_its_own_place(tmp_path, monkeypatch):
    """The issue's command, exactly: the tracked eval_val_refine.json stays; the result goes to runs/evaluations."""
    before = tree_digest(REPO_ROOT / "assets")
    env = {**ENV, "CORE_RUNS_DIR": str(tmp_path / "runs")}
    proc = core("evaluate", "--run", "assets/default_run", "--split", "val", "--refine", "--threshold", "0",
                "--no-progress", env=env)
    assert proc.returncode == 0, proc.stderr
    assert "MAP refined 0 of" in proc.stdout
    result = tmp_path / "runs" / "evaluations" / "default_run" / "eval_val_refine.json"
    assert json.loads(result.read_text())["refinement"]["num_refined"] == 0
    assert tree_digest(REPO_ROOT / "assets") == before and not git_changes("assets")
    monkeypatch.setenv("CORE_RUNS_DIR", str(tmp_path / "runs"))
    assert evaluation_path(REPO_ROOT / "assets" / "default_run", "val", refine=True) == result
    names = {p.name: p for p in evaluations(REPO_ROOT / "assets" / "default_run")}
    assert names["eval_val_refine.json"] == result  # the new one, over the shipped one
    assert names["eval_test_refine.json"].parent == REPO_ROOT / "assets" / "default_run"


# -- one writer per output --------------------------------------------------------------------------
def test_a_second_train_into_the_same_out_is_refused_and_the_first_finishes(tmp_path, scene_sets, capsys):
    """The first writer is a real process; the second is the command's main in this process (the refusal is the
    same code and the same stderr line; an import of torch less)."""
    out = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", "core", "train", "--config", "configs/model.yaml", *scene_sets,
                              "--set", "training.epochs=3", "--set", "seed=1", "--out", str(out), "--no-progress"],
                             cwd=REPO_ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: holder(out).get("pid") == first.pid, timeout=120, what="the first train holds the lock")
        first.send_signal(signal.SIGSTOP)  # it holds the lock while the second tries, whatever the machine's speed
        capsys.readouterr()
        try:
            code = main(["train", "--config", str(REPO_ROOT / "configs" / "model.yaml"), *scene_sets, "--set",
                         "training.epochs=2", "--set", "seed=2", "--out", str(out), "--no-progress"])
        finally:
            first.send_signal(signal.SIGCONT)
        err = capsys.readouterr().err
        assert code == 2
        assert err.startswith(f"error: run directory {out}: being written by pid {first.pid} "
                              "(python -m core train --config configs/model.yaml")
        assert err.count("\n") == 1
        _, err = first.communicate(timeout=300)
        assert first.returncode == 0, err
    finally:
        if first.poll() is None:
            first.kill()
    assert read_config(out).seed == 1 and read_status(out)["state"] == "done"
    assert [r["epoch"] for r in read_metrics(out)] == [1, 2, 3]
    assert (out / "log.txt").read_text().count(" train ") == 1
    assert not any(p.exists() for p in lock_paths(out))  # the lock and the holder's record go with it


HOLD = "import sys; from core.stores.lock import output_lock\nwith output_lock(sys.argv[1]):\n    " \
       "print('held', flush=True); sys.stdin.read()"


def test_a_dead_writers_lock_is_taken_over(tmp_path):
    out = tmp_path / "store.zarr"
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], cwd=REPO_ROOT, env=ENV, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(OutputBusy, match=rf"output {out}: being written by pid {proc.pid} \(python -m core"):
            with output_lock(out):
                pass
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        wait_for(lambda: gone(proc.pid), what="the holder is gone")
        assert holder(out)["pid"] == proc.pid  # its record is left behind: the lock is stale
        with output_lock(out):
            assert holder(out)["pid"] == os.getpid()
    finally:
        proc.kill()
        proc.wait(timeout=30)


def test_jobs_submit_without_output_refuses_a_second_writer_of_the_same_out(tmp_path, capsys):
    db = str(tmp_path / "jobs" / "jobs.sqlite")
    manager = JobManager(db, cwd=REPO_ROOT)
    out = str(tmp_path / "result.json")
    try:
        assert main(["jobs", "--db", db, "submit", "--", "jobs", "selftest", "--seconds", "20", "--out", out]) == 0
        first = manager.list()[0]
        assert first.output == out
        assert main(["jobs", "--db", db, "submit", "--", "jobs", "selftest", "--seconds", "1", "--out", out]) == 2
        assert f"job #{first.id} (selftest, " in capsys.readouterr().err
        assert len(manager.list()) == 1
    finally:
        for job in manager.active():
            manager.cancel(job.id, grace_s=1.0)
