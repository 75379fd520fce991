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

from core.jobs.manager import (
    REPO_ROOT,
    JobConflictError,
    JobError,
    JobManager,
    JobSpec,
    generate_maps_spec,
    selftest_spec,
    train_spec,
)


@pytest.fixture
def manager(tmp_path):
    jobs = JobManager(tmp_path / "jobs" / "jobs.sqlite", cwd=tmp_path)
    yield jobs
    for job in jobs.active():  # never leave processes behind
        jobs.cancel(job.id, grace_s=1.0)


def _wait_for(predicate, timeout=60.0, poll=0.1):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError("condition not met within the timeout")


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


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
    _wait_for(lambda: "selftest step 0" in manager.log(job.id))  # the command is under way
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
    _wait_for(lambda: "selftest step 0" in manager.log(job.id))  # the command is under way
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
    assert spec.args == ("generate-maps", "--scenes", "etoile", "--output-dir", "radio_maps", "--resolution", "2",
                         "--map-size", "128", "96", "--samples-per-tx", "100000", "--max-depth", "3")
    assert spec.output == "radio_maps/etoile.zarr"
    spec = train_spec("configs/model.yaml", "runs/x", {"physics_loss.lambda_phys": 0.25, "training.epochs": 3})
    assert spec.args == ("train", "--config", "configs/model.yaml", "--set", "physics_loss.lambda_phys=0.25",
                         "--set", "training.epochs=3", "--out", "runs/x")


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
