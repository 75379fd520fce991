"""The job system with a real SQLite database and real subprocesses (no mocks).

Every job here is ``python -m core jobs selftest``, a real command that reports
progress through CORE_PROGRESS_FILE, prints to its log and can spawn a grandchild.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from waiting import gone as _gone
from waiting import wait_for as _wait_for

from core.errors import CoreError
from core.jobs.manager import (
    PRUNED_LOG,
    REPO_ROOT,
    JobConflictError,
    JobError,
    JobManager,
    JobSpec,
    generate_maps_spec,
    make_dataset_spec,
    merge_datasets_spec,
    selftest_spec,
    train_spec,
)


@pytest.fixture
def manager(tmp_path):
    jobs = JobManager(tmp_path / "jobs" / "jobs.sqlite", cwd=tmp_path)
    yield jobs
    for job in jobs.active():  # never leave processes behind
        jobs.cancel(job.id, grace_s=1.0)


def _under_way(manager: JobManager, job_id: int) -> None:
    _wait_for(lambda: "selftest step 0" in manager.log(job_id), what="the command's first step in its log")


def test_launch_progress_finish(manager, tmp_path):
    job = manager.submit(selftest_spec(seconds=4.0, out="result.json"))
    assert job.status in ("queued", "running")
    assert job.command == "python -m core jobs selftest --seconds 4 --exit-code 0 --out result.json"
    assert job.output == str((tmp_path / "result.json").resolve())
    # progress arrives while the job runs, strictly between 0 and 1
    seen = _wait_for(lambda: (j := manager.get(job.id)).status == "running" and 0 < j.fraction < 1 and j)
    assert seen.message.startswith("step ")
    done = manager.wait(job.id, timeout_s=90)
    assert done.status == "succeeded", manager.log(job.id)
    assert done.exit_code == 0 and done.fraction == 1.0 and done.error is None
    assert done.finished >= done.started >= done.created
    assert json.loads((tmp_path / "result.json").read_text())["ok"] is True
    log = manager.log(job.id)
    assert log.splitlines()[0] == "$ " + job.command and "selftest done" in log
    assert _gone(done.child_pid)  # the command ended before its status was recorded
    assert _wait_for(lambda: _gone(done.pid), timeout=10)  # the waiter exits right after recording it


def test_failing_command_is_failed_with_exit_status_and_log_tail(manager):
    job = manager.wait(manager.submit(selftest_spec(seconds=0.2, exit_code=3)).id, timeout_s=90)
    assert job.status == "failed" and job.exit_code == 3
    assert "exit status 3" in job.error and "selftest asked to fail" in job.error
    assert "selftest asked to fail with exit status 3" in manager.log(job.id)


def test_cancel_ends_the_whole_process_group(manager):
    job = manager.submit(selftest_spec(seconds=120, child=True))
    line = _wait_for(lambda: next((ln for ln in manager.log(job.id).splitlines() if ln.startswith("child pid")), None))
    grandchild = int(line.split()[-1])
    running = manager.get(job.id)
    assert running.status == "running" and psutil.pid_exists(grandchild)
    cancelled = manager.cancel(job.id, grace_s=3.0)
    assert cancelled.status == "cancelled"
    for pid in (running.pid, running.child_pid, grandchild):
        assert _wait_for(lambda pid=pid: _gone(pid), timeout=10), f"process {pid} survived cancel"
    assert manager.get(job.id).status == "cancelled"  # and stays so


def test_killed_command_is_failed_not_running(manager):
    job = manager.submit(selftest_spec(seconds=120))
    _under_way(manager, job.id)
    running = manager.get(job.id)
    assert running.status == "running"
    os.kill(running.child_pid, signal.SIGKILL)
    failed = manager.wait(job.id, timeout_s=30)
    assert failed.status == "failed" and failed.exit_code == -9
    assert "killed by signal 9" in failed.error
    assert "selftest step 0" in manager.log(job.id)


def test_killed_group_without_exit_status_is_failed(manager):
    """The waiter itself is killed (like a crash or a reboot): refresh must notice."""
    job = manager.submit(selftest_spec(seconds=120))
    _under_way(manager, job.id)
    running = manager.get(job.id)
    assert running.status == "running"
    os.killpg(running.pid, signal.SIGKILL)
    _wait_for(lambda: _gone(running.pid) and _gone(running.child_pid), timeout=10)
    failed = manager.get(job.id)
    assert failed.status == "failed" and failed.exit_code is None
    assert "without recording an exit status" in failed.error
    assert "selftest step 0" in manager.log(job.id)


def test_duplicate_output_refused(manager, tmp_path):
    first = manager.submit(selftest_spec(seconds=120, out="runs/a"))
    with pytest.raises(JobConflictError, match=f"job #{first.id}"):
        manager.submit(selftest_spec(seconds=1, out="runs/a"))
    with pytest.raises(JobConflictError):  # a path inside the other's output
        manager.submit(JobSpec("selftest", ("jobs", "selftest"), "runs/a/inner"))
    with pytest.raises(JobConflictError):  # the same path written differently
        manager.submit(selftest_spec(seconds=1, out=str(tmp_path / "runs" / "b" / ".." / "a")))
    other = manager.submit(selftest_spec(seconds=0.1, out="runs/b"))  # another output is fine
    manager.cancel(first.id, grace_s=1.0)
    again = manager.submit(selftest_spec(seconds=0.1, out="runs/a"))  # free once the first is over
    assert manager.wait(again.id, 90).status == "succeeded"
    assert manager.wait(other.id, 90).status == "succeeded"


def test_survives_a_fresh_manager(tmp_path):
    db = tmp_path / "jobs.sqlite"
    job = JobManager(db, cwd=tmp_path).submit(selftest_spec(seconds=3))
    fresh = JobManager(db, cwd=tmp_path)  # like an app restart: only the database is shared
    seen = fresh.get(job.id)
    assert seen.status in ("queued", "running") and seen.command == job.command
    assert fresh.wait(job.id, 90).status == "succeeded"
    assert JobManager(db).list()[0].status == "succeeded"


def test_reused_pid_is_not_mistaken_for_the_job(tmp_path):
    """A row pointing at a live pid that started at another time is a dead job."""
    manager = JobManager(tmp_path / "jobs.sqlite", cwd=tmp_path)
    with sqlite3.connect(manager.db_path) as db:
        db.execute(
            "INSERT INTO jobs (kind, args, command, cwd, status, pid, pid_created, log_path, progress_path, created)"
            " VALUES ('selftest', '[]', 'python -m core jobs selftest', ?, 'running', ?, 1.0, ?, ?, ?)",
            (str(tmp_path), os.getpid(), str(tmp_path / "log.txt"), str(tmp_path / "p.json"), time.time() - 10),
        )
    (job,) = manager.list()
    assert job.status == "failed" and "without recording an exit status" in job.error


def test_unknown_job_and_kind_are_clear_errors(manager):
    with pytest.raises(JobError, match="no job #999"):
        manager.get(999)
    with pytest.raises(JobError, match="unknown job kind 'shell'"):
        manager.submit(JobSpec("shell", ("rm", "-rf", "/")))


def test_spec_builders_make_plain_argument_lists():
    spec = generate_maps_spec("etoile", "radio_maps", 2.0, (128, 96), samples_per_tx=100000, max_depth=3)
    assert spec.args == ("generate-maps", "--scenes", "etoile", "--radio-maps", "radio_maps", "--resolution", "2",
                         "--map-size", "128", "96", "--samples-per-tx", "100000", "--max-depth", "3")
    assert spec.output == "radio_maps/etoile.zarr"
    assert generate_maps_spec("etoile", ray="local").args[-1] == "--ray"  # a local Ray
    assert generate_maps_spec("etoile", ray=" head:6379 ").args[-2:] == ("--ray", "head:6379")  # join that cluster
    assert make_dataset_spec("etoile", "datasets/etoile", ray="").args[-1] == "--ray"
    assert "--ray" not in make_dataset_spec("etoile", "datasets/etoile").args
    with pytest.raises(JobError, match="Ray address '--force'"):
        generate_maps_spec("etoile", ray="--force")
    spec = train_spec("configs/model.yaml", "runs/x", {"physics_loss.lambda_phys": 0.25, "training.epochs": 3})
    assert spec.args == ("train", "--config", "configs/model.yaml", "--set", "physics_loss.lambda_phys=0.25",
                         "--set", "training.epochs=3", "--out", "runs/x")
    assert make_dataset_spec("etoile", "d", seed=3).args[-2:] == ("--seed", "3")
    assert "--seed" not in make_dataset_spec("etoile", "d").args  # 0: the command's default
    spec = merge_datasets_spec(["datasets/a", "datasets/a_seed1"], "datasets/a_merged", force=True)
    assert spec.args == ("merge-datasets", "--datasets", "datasets/a", "datasets/a_seed1", "--out", "datasets/a_merged",
                         "--force") and spec.output == "datasets/a_merged" and spec.kind == "merge-datasets"
    for datasets, out in ((["datasets/a"], "m"), (["datasets/a", "datasets/a"], "m"), (["d/a", "d/b"], "d/b")):
        with pytest.raises(CoreError, match="merge-datasets"):
            merge_datasets_spec(datasets, out)


def test_cli_submit_wait_and_list(tmp_path):
    env = {**os.environ, "CORE_JOBS_DB": str(tmp_path / "cli.sqlite")}
    cmd = [sys.executable, "-m", "core", "jobs"]
    out = subprocess.run(cmd + ["submit", "--wait", "--", "jobs", "selftest", "--seconds", "0.3"], cwd=REPO_ROOT,
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "job #1: succeeded" in out.stdout
    listed = subprocess.run(cmd + ["list", "--json"], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                            timeout=60)
    (row,) = json.loads(listed.stdout)
    assert row["status"] == "succeeded" and row["kind"] == "selftest"
    missing = subprocess.run(cmd + ["show", "7"], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2 and "no job #7" in missing.stderr
    assert Path(row["log_path"]).is_file()


def test_jobs_beyond_the_limit_wait_queued(tmp_path):
    manager = JobManager(tmp_path / "jobs.sqlite", cwd=tmp_path, env={"CORE_JOBS_MAX_RUNNING": "1"})
    first = manager.submit(selftest_spec(seconds=120))
    second = manager.submit(selftest_spec(seconds=0.2))
    third = manager.submit(selftest_spec(seconds=0.2))
    _wait_for(lambda: manager.get(first.id).status == "running")
    waiting = _wait_for(lambda: (j := manager.get(second.id)).message.startswith("waiting") and j)
    assert waiting.status == "queued" and waiting.child_pid is None
    assert manager.cancel(third.id, grace_s=2.0).status == "cancelled"  # cancel while queued
    assert manager.get(first.id).status == "running" and manager.get(second.id).status == "queued"
    a = manager.cancel(first.id, grace_s=2.0)  # frees the slot
    b = manager.wait(second.id, 90)
    assert a.status == "cancelled" and b.status == "succeeded"
    assert b.started >= a.finished - 0.5  # it only started once the first had ended
    assert manager.get(third.id).status == "cancelled" and manager.get(third.id).child_pid is None


# -- the waiter dies: cancel and the exit status still work ------------------------------
def _kill_waiter(manager: JobManager, job_id: int):
    """SIGKILL only the waiter of a running job (as the OOM killer might); returns the job."""
    _under_way(manager, job_id)
    running = manager.get(job_id)
    assert running.status == "running" and running.child_pid
    os.kill(running.pid, signal.SIGKILL)
    _wait_for(lambda: _gone(running.pid), timeout=10, what="the waiter to die")
    assert not _gone(running.child_pid)  # the command runs on without it
    return running


def test_cancel_ends_the_whole_group_when_the_waiter_has_died(manager):
    job = manager.submit(selftest_spec(seconds=120, child=True))
    line = _wait_for(lambda: next((ln for ln in manager.log(job.id).splitlines() if ln.startswith("child pid")), None),
                     what="the grandchild's pid in the log")
    grandchild = int(line.split()[-1])
    running = _kill_waiter(manager, job.id)
    assert manager.get(job.id).status == "running"  # the command still runs
    cancelled = manager.cancel(job.id, grace_s=3.0)
    assert cancelled.status == "cancelled"
    for pid in (running.child_pid, grandchild):
        _wait_for(lambda pid=pid: _gone(pid), timeout=10, what=f"process {pid} to end after cancel")


@pytest.mark.parametrize("exit_code", [0, 3])
def test_the_exit_status_survives_the_waiters_death(manager, exit_code):
    job = manager.submit(selftest_spec(seconds=2.5, exit_code=exit_code, out=None))
    running = _kill_waiter(manager, job.id)
    _wait_for(lambda: _gone(running.child_pid), timeout=60, what="the command to finish")
    done = manager.get(job.id)
    assert done.exit_code == exit_code
    if exit_code == 0:
        assert done.status == "succeeded" and done.error is None
    else:
        assert done.status == "failed" and "exit status 3" in done.error and "selftest asked to fail" in done.error
    record = json.loads(Path(done.exit_path).read_text())
    assert record["exit_code"] == exit_code and record["pid"] == running.child_pid
    assert done.finished == pytest.approx(record["time"])


def test_a_terminated_command_records_its_signal(manager):
    job = manager.submit(selftest_spec(seconds=120))
    running = _kill_waiter(manager, job.id)
    os.kill(running.child_pid, signal.SIGTERM)  # not by cancel: some other process ended it
    _wait_for(lambda: _gone(running.child_pid), timeout=30, what="the command to die")
    failed = manager.get(job.id)
    assert failed.status == "failed" and failed.exit_code == -signal.SIGTERM
    assert "killed by signal 15" in failed.error


def test_a_sigkilled_command_with_a_dead_waiter_is_failed_not_running(manager):
    job = manager.submit(selftest_spec(seconds=120))
    running = _kill_waiter(manager, job.id)
    os.kill(running.child_pid, signal.SIGKILL)
    _wait_for(lambda: _gone(running.child_pid), timeout=30, what="the command to die")
    failed = manager.get(job.id)
    assert failed.status == "failed" and failed.exit_code is None
    assert "without recording an exit status" in failed.error and "SIGKILL" in failed.error
    assert not Path(failed.exit_path).exists()


# -- log retention ------------------------------------------------------------------------
def _finished_row(manager: JobManager, hours_ago: float) -> int:
    """A finished job as the waiter leaves it: a row and a folder with a log."""
    ended = time.time() - hours_ago * 3600
    with sqlite3.connect(manager.db_path) as db:
        cur = db.execute(
            "INSERT INTO jobs (kind, args, command, cwd, status, log_path, progress_path, created, started, finished,"
            " exit_code) VALUES ('selftest', '[]', 'python -m core jobs selftest', ?, 'succeeded', '', '', ?, ?, ?, 0)",
            (str(manager.cwd), ended - 5, ended - 4, ended))
        job_id = cur.lastrowid
        folder = manager.db_path.parent / str(job_id)
        db.execute("UPDATE jobs SET log_path = ?, progress_path = ? WHERE id = ?",
                   (str(folder / "log.txt"), str(folder / "progress.json"), job_id))
    folder.mkdir(parents=True)
    (folder / "log.txt").write_text(f"log of job {job_id}\n")
    return job_id


def test_old_logs_are_pruned_newest_and_recent_ones_kept(manager):
    running = manager.submit(selftest_spec(seconds=120))
    ids = {hours: _finished_row(manager, hours) for hours in (1, 2, 3, 24 * 40)}
    assert manager.prune_logs(keep=4, max_age_days=30) == [ids[24 * 40]]  # too old, though among the newest 4
    assert sorted(manager.prune_logs(keep=2, max_age_days=30)) == [ids[3]]  # beyond the newest 2
    for hours in (1, 2):
        assert manager.log(ids[hours]) == f"log of job {ids[hours]}"
    assert manager.log(ids[3]) == PRUNED_LOG and manager.get(ids[3]).status == "succeeded"  # still listed
    assert manager.prune_logs(keep=0, max_age_days=0) == [ids[1], ids[2]]
    assert Path(manager.get(running.id).log_path).is_file()  # an active job's folder is never touched
    assert manager.get(running.id).active


def test_submit_applies_the_retention_policy(tmp_path, monkeypatch):
    manager = JobManager(tmp_path / "jobs" / "jobs.sqlite", cwd=tmp_path)
    old = [_finished_row(manager, hours) for hours in (3, 2, 1)]
    monkeypatch.setenv("CORE_JOBS_KEEP_LOGS", "1")
    job = manager.submit(selftest_spec(seconds=0.2))
    folders = sorted(p.name for p in manager.db_path.parent.iterdir() if p.is_dir())
    assert folders == sorted([str(old[-1]), str(job.id)])  # the newest finished one, and the new job
    assert manager.wait(job.id, 90).status == "succeeded"
    env = {**os.environ, "CORE_JOBS_DB": str(manager.db_path), "CORE_JOBS_KEEP_LOGS": "50"}
    out = subprocess.run([sys.executable, "-m", "core", "jobs", "prune", "--keep", "1"], cwd=REPO_ROOT, env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"removed the logs of 1 job(s): #{old[-1]}"  # the new job is now the newest
