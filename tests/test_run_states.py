"""Run states that tell the truth, and --resume that means the same run (core/stores/run.py).

A real training process killed with SIGKILL reads as failed; a full disk (a real ENOSPC from
/dev/full, through torch's writer) is named as such; a run that ended before its last epoch is
never done; a resume with another config or model shape is one line naming what differs.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from waiting import gone, wait_for

from core import REPO_ROOT
from core.cli import main
from core.jobs.manager import JobManager, selftest_spec, train_spec
from core.learning.config import load_config
from core.learning.training import train
from core.physics.synthetic import synthetic_scene
from core.stores.run import (
    CONFIG,
    failure_cause,
    list_runs,
    load_checkpoint,
    read_status,
    run_info,
    run_state,
    save_checkpoint,
)
from core.stores.workspace import Workspace

TINY = ["model.preset=tiny", "training.batch_size=32", "training.num_threads=1"]
ENV = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}


@pytest.fixture(scope="module")
def scene(tmp_path_factory) -> list[str]:
    overrides = synthetic_scene(tmp_path_factory.mktemp("scene"), num_ues=80, height=16, width=16, cell=4.0,
                                reports=4, k=2)
    return [f"{k}={v}" for k, v in overrides.items()] + TINY


def sets(overrides: list[str]) -> list[str]:
    return [a for s in overrides for a in ("--set", s)]


def train_argv(scene: list[str], out: Path, *extra: str) -> list[str]:
    return ["train", "--config", "configs/model.yaml", *sets(scene), *sets(list(extra)), "--out", str(out),
            "--no-progress"]


# -- kill -9 --------------------------------------------------------------------------------------
def test_a_killed_training_reads_as_failed_in_the_runs_and_the_jobs(scene, tmp_path):
    """kill -9 of the training command of a real job: the run and the job both say failed, never running."""
    runs = tmp_path / "runs"
    manager = JobManager(tmp_path / "jobs" / "jobs.sqlite", cwd=REPO_ROOT)
    spec = train_spec("configs/model.yaml", str(runs / "killed"),
                      dict(s.split("=", 1) for s in [*scene, "training.epochs=500"]))
    job = manager.submit(spec)
    try:
        out = runs / "killed"
        wait_for(lambda: read_status(out).get("state") == "running", timeout=120, what="status.json says running")
        assert run_info(out).state == "running"
        child = wait_for(lambda: manager.get(job.id).child_pid, what="the job's command started")
        os.kill(child, signal.SIGKILL)
        wait_for(lambda: gone(child), what="the command is gone")
        assert read_status(out)["state"] == "running"  # what the dead writer left ...
        info = run_info(out)  # ... and what it truly is
        assert info.state == "failed" and info.cause == f"process died (pid {child} ended without finishing the run)"
        assert [r.state for r in list_runs(runs)] == ["failed"]
        assert [r.state for r in Workspace.from_env(tmp_path).runs() if r.name == "runs/killed"] == ["failed"]
        final = wait_for(lambda: (j := manager.get(job.id)).status in ("failed", "succeeded") and j,
                         what="the job is final")
        assert final.status == "failed" and "killed by signal 9" in final.error
        listed = subprocess.run([sys.executable, "-m", "core", "jobs", "--db", str(manager.db_path), "list"],
                                cwd=REPO_ROOT, env=ENV, capture_output=True, text=True, check=True).stdout
        assert f"{job.id:>4}  {'train':<14} {'failed':<10}" in listed
    finally:
        for active in manager.active():
            manager.cancel(active.id, grace_s=1.0)


def test_a_run_that_ended_before_its_last_epoch_is_not_done(scene, tmp_path):
    """Written before runs recorded their writer: no status.json, a best.pt, no finished epoch."""
    out = tmp_path / "run"
    train(load_config(REPO_ROOT / "configs" / "model.yaml", [*scene, "training.epochs=3"]), out, show_progress=False,
          max_epochs=1)
    (out / "status.json").unlink()
    (out / "metrics.jsonl").write_text("")
    info = run_info(out)
    assert info.has_checkpoint and info.state == "failed" and info.cause == "ended after 0 of 3 epochs (no status.json)"
    assert run_state(out, {"state": "running", "pid": os.getpid(), "host": "elsewhere",
                           "heartbeat": time.time() - 3600})[0] == "failed"  # another host: its heartbeat stopped


def test_a_full_disk_is_named_and_the_run_reads_failed(scene, tmp_path, capsys):
    """A real ENOSPC: best.pt is /dev/full when epoch 2 improves on epoch 1 (torch used to say
    'enforce fail at inline_container.cc')."""
    out = tmp_path / "run"
    config = load_config(REPO_ROOT / "configs" / "model.yaml", [*scene, "training.epochs=2"])
    train(config, out, show_progress=False, max_epochs=1)
    last = load_checkpoint(out / "last.pt")
    save_checkpoint(out / "last.pt", {**last, "best_val_median_m": float("inf")})  # epoch 2 surely improves
    (out / "best.pt").unlink()
    (out / "best.pt").symlink_to("/dev/full")
    assert main(train_argv(scene, out, "training.epochs=2") + ["--resume"]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {out / 'best.pt'}: disk full (no space left on the device) while writing the checkpoint\n"
    info = run_info(out)
    assert info.state == "failed" and "disk full" in info.cause
    assert failure_cause(OSError(28, "No space left on device", "x.json")).startswith("disk full")


def test_any_command_names_a_full_disk(capsys):
    """A real ENOSPC outside a checkpoint (here a JSON result written to /dev/full): one line, exit 2."""
    assert main(["jobs", "selftest", "--seconds", "0", "--out", "/dev/full"]) == 2
    assert capsys.readouterr().err.endswith("error: disk full (no space left on the device)\n")


# -- resume means the same run ----------------------------------------------------------------
def test_resume_refuses_a_changed_config_and_names_the_keys(scene, tmp_path, capsys):
    out = tmp_path / "run"
    config = load_config(REPO_ROOT / "configs" / "model.yaml", [*scene, "training.epochs=2"])
    train(config, out, show_progress=False, max_epochs=1)
    before = (out / CONFIG).read_text()
    assert main(train_argv(scene, out, "training.epochs=2", "physics_loss.lambda_phys=0.5") + ["--resume"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "physics_loss.lambda_phys: 0.1 → 0.5" in err and "--resume continues" in err
    assert main(train_argv(scene, out, "training.epochs=2", "model.preset=small") + ["--resume"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "model.preset: tiny → small" in err  # one line, no state_dict errors
    assert (out / CONFIG).read_text() == before and read_status(out)["state"] == "stopped"
    assert main(train_argv(scene, out, "training.epochs=2", "training.num_threads=2") + ["--resume"]) == 0
    assert read_status(out)["state"] == "done"


# -- jobs -------------------------------------------------------------------------------------------
def test_a_job_whose_waiter_was_killed_ends_at_its_commands_fraction(tmp_path):
    manager = JobManager(tmp_path / "jobs" / "jobs.sqlite", cwd=tmp_path)
    job = manager.submit(selftest_spec(seconds=4.0))
    try:
        wait_for(lambda: 0 < manager.get(job.id).fraction < 0.6, what="the job is under way")
        os.kill(job.pid, signal.SIGKILL)  # the waiter alone: its command runs on and records its exit
        done = wait_for(lambda: (j := manager.get(job.id)).status != "running" and j, timeout=60, what="job final")
        assert done.status == "succeeded" and done.fraction == 1.0  # never "succeeded 26 %"
        record = json.loads(Path(done.exit_path).read_text())
        assert record["exit_code"] == 0
    finally:
        for active in manager.active():
            manager.cancel(active.id, grace_s=1.0)
