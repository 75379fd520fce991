"""Background jobs: ``python -m core ...`` commands run detached and tracked in SQLite.

The app and the command line (``python -m core jobs ...``) share this module. A job is
one ``python -m core <command> <args...>`` process, started from an argument list
(never a shell string), writing its output to one path.

How a job runs
--------------
::

    JobManager.submit()                       (app or CLI process)
      └─ python -m core.jobs.manager --db DB --run ID (the *waiter*; new session = process group)
           └─ python -m core <args...>        (the command; same process group)

* The waiter starts the command with ``CORE_PROGRESS_FILE`` and ``CORE_JOB_EXIT_FILE``
  set (see :mod:`core.progress`), stdout and stderr appended to the job's log file,
  copies the progress record into the database every 0.5 s, and records the exit status,
  so a job's result is known even when the app that launched it has gone.
* The command also records its own exit status, in ``exit.json``, as it ends (also on
  SIGTERM or SIGHUP). So when the waiter dies (killed, OOM) while the command runs on,
  the job's result is still known: :meth:`JobManager.refresh` reads it from there.
* The database is the truth. :meth:`JobManager.refresh` checks that the recorded
  processes still exist, comparing each pid's start time (psutil) so a reused pid is
  not mistaken for the job. A job whose processes have all gone without an exit
  status anywhere (SIGKILL, machine rebooted) is marked ``failed``; it never stays
  ``running``.
* :meth:`JobManager.cancel` sends SIGTERM to the whole process group, then SIGKILL
  after a grace period; also when the waiter (the group's leader) has died, as long as
  any process of the group is left.
* Two active jobs whose outputs are the same path (or one inside the other) are
  refused with :class:`JobConflictError`.

Files: the database defaults to ``<repo>/.jobs/jobs.sqlite`` (``CORE_JOBS_DB``
overrides it); each job gets a folder ``<db dir>/<id>/`` with ``log.txt``,
``progress.json`` and ``exit.json``.

Log retention (:meth:`JobManager.prune_logs`, run at every submit and by
``python -m core jobs prune``): a finished job's folder is kept while the job is among
the newest ``CORE_JOBS_KEEP_LOGS`` (default 50) finished jobs *and* finished less than
``CORE_JOBS_LOG_DAYS`` (default 30) days ago; otherwise it is deleted. Its row stays in
the database (the job list keeps its history); its log then reads as removed. Active
jobs' folders are never touched.

Statuses: ``queued`` (registered; waiting for the waiter to start, or for a free slot:
at most ``CORE_JOBS_MAX_RUNNING`` jobs, default 2, run at once) → ``running`` →
``succeeded`` | ``failed`` | ``cancelled``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shlex
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil

from core import REPO_ROOT, cli_types, progress
from core.device import RAY_LOCAL
from core.errors import CoreError
from core.stores.lineage import corrected_map_path, map_path
from core.stores.measurement_model import MeasurementModel

DB_ENV = "CORE_JOBS_DB"
DEFAULT_DB = REPO_ROOT / ".jobs" / "jobs.sqlite"

ACTIVE = ("queued", "running")
FINAL = ("succeeded", "failed", "cancelled")
STATUSES = ACTIVE + FINAL

#: the kinds of job, keyed by the ``python -m core`` command they run
KINDS = {
    "generate-maps": "map generation",
    "make-dataset": "dataset generation",
    "merge-datasets": "merging datasets",
    "train": "training",
    "ablate": "ablation",
    "evaluate": "evaluation",
    "correct-map": "twin correction",
    "localize": "localizing a report file",
    "make-city": "procedural city",
    "make-corpus": "city corpus",
    "selftest": "job-system self test",
}

MAX_RUNNING_ENV = "CORE_JOBS_MAX_RUNNING"
DEFAULT_MAX_RUNNING = 2  # jobs that run at once; later ones wait as "queued" (a 2-core machine)

KEEP_LOGS_ENV = "CORE_JOBS_KEEP_LOGS"
DEFAULT_KEEP_LOGS = 50  # finished jobs whose folder (log, progress, exit record) is kept
LOG_DAYS_ENV = "CORE_JOBS_LOG_DAYS"
DEFAULT_LOG_DAYS = 30.0  # and only while they finished less than this many days ago
PRUNED_LOG = "(log removed by the log retention policy: see `python -m core jobs prune --help`)"

_POLL_S = 0.5
_QUEUED_TIMEOUT_S = 60.0  # a waiter that has not started by then never will

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id               INTEGER PRIMARY KEY AUTOINCREMENT,
    kind             TEXT    NOT NULL,
    args             TEXT    NOT NULL,   -- JSON list: the arguments after `python -m core`
    command          TEXT    NOT NULL,   -- the same command as a user would type it
    output           TEXT,               -- absolute path the job writes (conflict checks)
    cwd              TEXT    NOT NULL,
    status           TEXT    NOT NULL,
    fraction         REAL    NOT NULL DEFAULT 0,
    message          TEXT    NOT NULL DEFAULT '',
    pid              INTEGER,            -- the waiter = process-group id
    pid_created      REAL,               -- its start time (psutil), against pid reuse
    child_pid        INTEGER,            -- the command itself
    child_created    REAL,
    log_path         TEXT    NOT NULL,
    progress_path    TEXT    NOT NULL,
    created          REAL    NOT NULL,
    started          REAL,
    finished         REAL,
    exit_code        INTEGER,
    error            TEXT,
    cancel_requested INTEGER NOT NULL DEFAULT 0
);
"""


class JobError(CoreError):
    """A job cannot be found, started or changed."""


class JobConflictError(JobError):
    """Another active job already writes the same output."""


@dataclass(frozen=True)
class JobSpec:
    """What to run: ``python -m core <args...>`` writing ``output``.

    Attributes:
        kind: one of :data:`KINDS`.
        args: the command-line arguments after ``python -m core``.
        output: the file or directory the command writes (relative paths are taken
            from the job's working directory), or ``None`` if it writes nothing.
    """

    kind: str
    args: tuple[str, ...]
    output: str | None = None


@dataclass
class Job:
    """One row of the jobs table; times are Unix seconds."""

    id: int
    kind: str
    args: list[str]
    command: str
    output: str | None
    cwd: str
    status: str
    fraction: float
    message: str
    pid: int | None
    pid_created: float | None
    child_pid: int | None
    child_created: float | None
    log_path: str
    progress_path: str
    created: float
    started: float | None
    finished: float | None
    exit_code: int | None
    error: str | None
    cancel_requested: bool

    @property
    def active(self) -> bool:
        return self.status in ACTIVE

    @property
    def duration_s(self) -> float | None:
        if self.started is None:
            return None
        return (self.finished or time.time()) - self.started

    @property
    def exit_path(self) -> str:
        """Where the command records its own exit status (next to its log)."""
        return str(Path(self.log_path).parent / "exit.json")

    def to_dict(self) -> dict:
        return asdict(self)


# -- spec builders: one per kind, so the app and the CLI build the same commands ----------
def _num(value: float) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _ray_args(ray: str | None) -> list[str]:
    """``--ray [ADDRESS]`` for a generation job: None = no Ray, :data:`~core.device.RAY_LOCAL`
    (or blank) = a local Ray, else the address of the Ray cluster to join."""
    if ray is None:
        return []
    address = ray.strip()
    if address in ("", RAY_LOCAL):
        return ["--ray"]
    if address.startswith("-") or any(c.isspace() for c in address):
        raise JobError(f"Ray address {ray!r}: give HOST:PORT or auto")
    return ["--ray", address]


def generate_maps_spec(
    scene: str,
    radio_maps: str = "radio_maps",
    resolution: float = 1.0,
    map_size: tuple[int, int] | None = None,
    samples_per_tx: int | None = None,
    max_depth: int | None = None,
    force: bool = False,
    ray: str | None = None,
    min_coverage: float | None = None,
    toa_decimation: int | None = None,
) -> JobSpec:
    """Ray-trace the radio map of ``scene`` into ``<radio_maps>/<scene>.zarr`` (``ray``: see :func:`_ray_args`).

    ``min_coverage``: the smallest acceptable fraction of covered outdoor cells, in [0, 1]
    (checked here, so a bad value is refused before a job starts); ``toa_decimation``:
    PathSolver node spacing in cells. ``None``: the command's defaults.
    """
    if min_coverage is not None and not 0.0 <= float(min_coverage) <= 1.0:
        raise CoreError(f"--min-coverage must be a fraction in [0, 1], got {min_coverage}")
    if toa_decimation is not None and int(toa_decimation) < 1:
        raise CoreError(f"--toa-decimation must be >= 1, got {toa_decimation}")
    args = ["generate-maps", "--scenes", scene, "--radio-maps", radio_maps, "--resolution", _num(float(resolution))]
    if map_size is not None:  # None: the command's default (fit the scene)
        args += ["--map-size", str(int(map_size[0])), str(int(map_size[1]))]
    if samples_per_tx is not None:
        args += ["--samples-per-tx", str(int(samples_per_tx))]
    if max_depth is not None:
        args += ["--max-depth", str(int(max_depth))]
    if toa_decimation is not None:
        args += ["--toa-decimation", str(int(toa_decimation))]
    if min_coverage is not None:
        args += ["--min-coverage", _num(float(min_coverage))]
    if force:
        args.append("--force")
    args += _ray_args(ray)
    return JobSpec("generate-maps", tuple(args), str(map_path(radio_maps, scene)))


def make_dataset_spec(scene: str, out: str, num_ues: int = 20000, reports: int = 8,
                      radio_maps: str | None = None, model: MeasurementModel | None = None,
                      force: bool = False, ray: str | None = None, seed: int = 0) -> JobSpec:
    """Ray-trace a measurement dataset of ``scene`` into ``out``.

    ``model``: the measurement model, written out as every one of its flags
    (``--noise-path-gain-db ... --sensitivity-dbm``); checked here, so a bad value is refused
    before a job starts. ``None``: the command's defaults. ``ray``: see :func:`_ray_args`.
    ``seed``: the walks' seed (``--seed``; 0, the command's default, is not written).
    """
    if int(seed) < 0:
        raise CoreError(f"--seed must be >= 0, got {seed}")
    args = ["make-dataset", "--scene", scene, "--num-ues", str(int(num_ues)), "--reports", str(int(reports)),
            "--out", out]
    if int(seed):
        args += ["--seed", str(int(seed))]
    if radio_maps is not None:
        args += ["--radio-maps", radio_maps]
    if model is not None:
        model.check()
        args += model.cli_args()
    if force:
        args.append("--force")
    args += _ray_args(ray)
    return JobSpec("make-dataset", tuple(args), out)


def merge_datasets_spec(datasets: Sequence[str], out: str, force: bool = False) -> JobSpec:
    """Merge ``datasets`` (walks of one world traced with different seeds; the first's val and test kept) into
    ``out``: ``python -m core merge-datasets`` (:mod:`core.stores.dataset_merge`, which checks that they are one
    world before it writes). ``force``: replace a dataset already at ``out``."""
    datasets = [str(d) for d in datasets]
    if len(datasets) < 2:
        raise CoreError(f"merge-datasets needs at least two datasets, got {len(datasets)}")
    if len(set(datasets)) < len(datasets) or out in datasets:
        raise CoreError("merge-datasets: every dataset once, and --out none of them")
    args = ["merge-datasets", "--datasets", *datasets, "--out", out]
    if force:
        args.append("--force")
    return JobSpec("merge-datasets", tuple(args), out)


def make_city_spec(seed: int, scenes_dir: str, params: dict[str, object] | None = None, name: str | None = None,
                   force: bool = False) -> JobSpec:
    """Generate procedural city ``seed`` into the scenes folder ``scenes_dir`` (``<scenes_dir>/<name>``,
    name ``city_<seed>`` by default); ``params``: generator flags by their field name (``density``: ``--density``)."""
    args = ["make-city", "--seed", str(int(seed)), "--out", scenes_dir]
    if name:
        args += ["--name", name]
    for key, value in (params or {}).items():
        args += [f"--{key.replace('_', '-')}", _num(value) if isinstance(value, (int, float)) else str(value)]
    if force:
        args.append("--force")
    return JobSpec("make-city", tuple(args), str(Path(scenes_dir) / (name or f"city_{int(seed)}")))


def make_corpus_spec(count: int, out: str, ray: str | None = None, extra: Sequence[str] = ()) -> JobSpec:
    """Build (or resume) a corpus of ``count`` cities with their maps and datasets in ``out``."""
    return JobSpec("make-corpus", ("make-corpus", "--count", str(int(count)), "--out", out, *extra, *_ray_args(ray)), out)


def train_spec(config: str, out: str, overrides: dict[str, object] | None = None) -> JobSpec:
    """Train from the YAML ``config`` into run directory ``out``; ``overrides`` become ``--set k=v``."""
    args = ["train", "--config", config]
    for key, value in (overrides or {}).items():
        if isinstance(value, bool):
            value = "true" if value else "false"
        args += ["--set", f"{key}={_num(value) if isinstance(value, float) else value}"]
    args += ["--out", out]
    return JobSpec("train", tuple(args), out)


def evaluate_spec(run: str, scene: str | None = None, split: str = "test", refine: bool = True,
                  baselines: bool = False, dataset: str | None = None, radio_map: str | None = None,
                  prior_sigma_scale: float | str | None = None, scan_starts: int | None = None,
                  walk_basins: int | None = None, ensemble: list[str] | None = None) -> JobSpec:
    """Evaluate run directory ``run`` on ``split`` (``scene``: a training scene or a held-out one, with the
    in-scene vs held-out table; ``refine``: with test-time MAP on that scene's map; ``dataset``: another dataset
    of ``scene``, e.g. its realistic world; ``radio_map``: the run's own scene read against this map store in
    place of the one its dataset records, e.g. the corrected map :func:`correct_map_spec` writes; it goes without
    a scene; ``prior_sigma_scale``: with ``refine``, the network prior's sigma over the network's in the searches,
    a number or "auto", chosen on the val split; ``scan_starts``: with ``refine``, the MAP search's starts from the
    exact scan; ``walk_basins``: with ``refine`` or ``baselines``, the runner-up basins every whole walk also starts
    from; ``ensemble``: other runs of the run's dataset whose networks are pooled with its own, on its own scene:
    no scene, dataset or map with it). Writes ``<run>/eval_<split>[_<scene>][_refine].json`` (:func:`~core.stores.run.evaluation_path`; named per
    dataset with ``dataset``, per map folder with ``radio_map``, ``_prior-<s>``, ``_scan-<n>``, ``_basins-<k>`` with
    those options)."""
    from core.stores.run import evaluation_path

    if split not in ("train", "val", "test"):
        raise CoreError(f"--split must be train, val or test, got {split!r}")
    if radio_map and (scene or dataset):
        raise CoreError("--radio-map reads the run's own scene and dataset against another map: give no scene or "
                        "dataset with it")
    if ensemble and (scene or dataset or radio_map):
        raise CoreError("an ensemble is evaluated on its first run's own scene, dataset and map: give no scene, "
                        "dataset or map with it")
    args = ["evaluate", "--run", run, "--split", split]
    if ensemble:
        args += ["--ensemble", ",".join(ensemble)]
    if scene:
        args += ["--scene", scene]
    if refine:
        args.append("--refine")
    if baselines:
        args.append("--baselines")
    if dataset:
        if not scene:
            raise CoreError("evaluating another dataset needs its scene (--scene)")
        args += ["--dataset", dataset]
    if radio_map:
        args += ["--radio-map", radio_map]
    scale = prior_sigma_scale
    if scale is not None:
        if not refine:
            raise CoreError("a prior sigma scale shapes the network's prior in the MAP searches: evaluate with refinement")
        if scale == "auto":
            from core.learning.prior_scale import check_scored_split

            check_scored_split(split)  # the scale is chosen on val: refused on val itself
        args += ["--prior-sigma-scale", scale if scale == "auto" else f"{float(scale):g}"]
    if scan_starts is not None:
        if not refine:
            raise CoreError("scan starts are starts of the MAP search: evaluate with refinement")
        args += ["--scan-starts", str(int(scan_starts))]
    if walk_basins is not None:
        if not (refine or baselines):
            raise CoreError("whole-walk basins are starts of the whole walks: evaluate with refinement or baselines")
        args += ["--walk-basins", str(int(walk_basins))]
    return JobSpec("evaluate", tuple(args), str(evaluation_path(run, split, scene, refine, dataset=dataset,
                                                                radio_map=radio_map or None, prior_sigma_scale=scale,
                                                                scan_starts=scan_starts, walk_basins=walk_basins,
                                                                ensemble=ensemble or None)))


def correct_map_spec(dataset: str, scene: str, radio_maps: str = "radio_maps", split: str = "train",
                     force: bool = False) -> JobSpec:
    """Fit what the twin ``<radio_maps>/<scene>.zarr`` gets wrong to the labelled walks of ``dataset`` (a dataset
    of ``scene``, e.g. ``datasets/etoile_realistic``) and write the corrected copy to
    ``<radio_maps>/corrected/<scene>.zarr`` (:func:`~core.stores.lineage.corrected_map_path`; ``python -m core
    correct-map``, :mod:`core.physics.twin_correction`). ``split``: the labelled walks fitted (train | test; the
    kernel is chosen on val); ``force``: replace an existing corrected map."""
    if split not in ("train", "test"):
        raise CoreError(f"--split must be train or test (the kernel is chosen on val), got {split!r}")
    args = ["correct-map", "--dataset", dataset, "--radio-maps", radio_maps]
    if split != "train":
        args += ["--split", split]
    if force:
        args.append("--force")
    return JobSpec("correct-map", tuple(args), str(corrected_map_path(radio_maps, scene)))


def localize_spec(run: str, reports: str, out: str, method: str = "map", ensemble: Sequence[str] = (),
                  sigma_scale: float | str | None = None, scan_starts: int | None = None) -> JobSpec:
    """Localize the report file ``reports`` with run ``run`` by ``method`` (network | map | exhaustive) into
    ``out`` (csv | parquet | geojson): ``python -m core localize`` (:mod:`core.reports.localize`); ``ensemble``:
    other runs of ``run``'s dataset pooled with it as the network (network and map only); ``sigma_scale`` (a
    number or "auto") and ``scan_starts``: MAP's prior scale and scan starts (map only; None: the run's)."""
    if method not in ("network", "map", "exhaustive"):
        raise CoreError(f"--method must be network, map or exhaustive, got {method!r}")
    if ensemble and method == "exhaustive":
        raise CoreError("an ensemble pools networks: localize with the network or network + MAP")
    if (sigma_scale is not None or scan_starts is not None) and method != "map":
        raise CoreError("the prior's scale and the scan starts are MAP's: localize with network + MAP")
    extra = ("--ensemble", ",".join(ensemble)) if ensemble else ()
    if sigma_scale is not None:
        extra += ("--prior-sigma-scale", sigma_scale if sigma_scale == "auto" else _num(float(sigma_scale)))
    if scan_starts is not None:
        extra += ("--scan-starts", str(int(scan_starts)))
    return JobSpec("localize", ("localize", "--run", run, "--reports", reports, "--method", method, *extra,
                                "--out", out), out)


def ablate_spec(scene: str, out: str, extra: Sequence[str] = ()) -> JobSpec:
    """Train and evaluate the ablation of ``scene`` into ``out`` (λ_phys ∈ {0, λ*} × refinement × label
    fractions × splits × seeds; ``extra``: e.g. ``["--quick"]``)."""
    return JobSpec("ablate", ("ablate", "--scene", scene, "--out", out, *extra), out)


def selftest_spec(seconds: float = 2.0, exit_code: int = 0, out: str | None = None, child: bool = False) -> JobSpec:
    """A tiny job that reports progress for ``seconds`` (checks the job system end to end)."""
    args = ["jobs", "selftest", "--seconds", _num(float(seconds)), "--exit-code", str(int(exit_code))]
    if out is not None:
        args += ["--out", out]
    if child:
        args.append("--child")
    return JobSpec("selftest", tuple(args), out)


# -- processes ----------------------------------------------------------------------------
def _create_time(pid: int) -> float | None:
    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError):
        return None


def _reap(pid: int) -> None:
    """Collect ``pid``'s exit status if it is our own child (so it is no zombie)."""
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def _alive(pid: int | None, created: float | None) -> bool:
    """True if process ``pid`` exists, is not a zombie, and started at ``created``."""
    if pid is None:
        return False
    _reap(pid)
    try:
        proc = psutil.Process(pid)
        if created is not None and abs(proc.create_time() - created) > 0.05:
            return False  # the pid was reused by another process
        return proc.status() != psutil.STATUS_ZOMBIE
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def _group_alive(pgid: int) -> bool:
    """True while any non-zombie process is left in process group ``pgid``."""
    _reap(pgid)
    for proc in psutil.process_iter(["pid", "status"]):
        try:
            if os.getpgid(proc.info["pid"]) == pgid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                return True
        except (ProcessLookupError, PermissionError, OSError):
            continue
    return False


def _job_group(pid: int | None, created: float | None) -> int | None:
    """The job's process group id (= its waiter's pid) while any process of it is left.

    The waiter may be gone while its command (and the command's children) run on. Linux
    does not hand out a pid while a process group of that number has members, so a live
    process with that pid but another start time means the job's group has ended (the
    pid now belongs to someone else): then ``None``.
    """
    if pid is None:
        return None
    if _alive(pid, created):
        return pid
    try:
        if created is not None and abs(psutil.Process(pid).create_time() - created) > 0.05:
            return None  # reused
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        pass
    return pid if _group_alive(pid) else None


def _signal_group(pgid: int, sig: int, wait_s: float) -> bool:
    """Send ``sig`` to group ``pgid``; True once the group is gone (waits up to ``wait_s``)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)
    deadline = time.time() + wait_s
    while _group_alive(pgid):
        if time.time() >= deadline:
            return False
        time.sleep(0.1)
    return True


def _outcome(code: int, cancelled: bool, log_path: str) -> tuple[str, str | None]:
    """``(status, error)`` of a job whose command ended with exit status ``code``."""
    if cancelled:
        return "cancelled", "cancelled by the user"
    if code == 0:
        return "succeeded", None
    why = f"killed by signal {-code}" if code < 0 else f"exit status {code}"
    last_line = next((ln for ln in reversed(tail(log_path, 20).splitlines()) if ln.strip()), "")
    return "failed", f"{why}: {last_line}" if last_line else why


def _env_number(name: str, default: float, minimum: float) -> float:
    """``$name`` as a number of at least ``minimum``; ``default`` when unset, not a number or not finite."""
    try:
        value = float(os.environ.get(name, default))
    except ValueError:
        return default
    return max(minimum, value) if math.isfinite(value) else default


def tail(path: str | os.PathLike, lines: int = 30, max_bytes: int = 65536) -> str:
    """The last ``lines`` lines of text file ``path`` ('' if it does not exist)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - max_bytes))
            data = fh.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    # tqdm rewrites its bar with carriage returns: keep the last state of each line
    rows = [row.rsplit("\r", 1)[-1] for row in data.replace("\r\n", "\n").split("\n")]
    return "\n".join(rows[-lines:]).strip("\n")


# -- the manager --------------------------------------------------------------------------
class JobManager:
    """Submit, list, refresh and cancel jobs registered in one SQLite database.

    Args:
        db_path: the database file; default ``$CORE_JOBS_DB`` or ``<repo>/.jobs/jobs.sqlite``.
        cwd: working directory of the jobs (relative outputs resolve against it);
            default the repository root.
        env: extra environment variables for the jobs.
    """

    def __init__(self, db_path: str | os.PathLike | None = None, cwd: str | os.PathLike | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.db_path = Path(db_path or os.environ.get(DB_ENV) or DEFAULT_DB).resolve()
        self.cwd = Path(cwd or REPO_ROOT).resolve()
        self.env = dict(env or {})
        try:
            self.db_path.parent.mkdir(parents=True, exist_ok=True)
            with self._connect() as db:
                db.executescript(_SCHEMA)
        except (OSError, sqlite3.Error) as exc:
            raise JobError(f"jobs database {self.db_path}: cannot open ({exc})") from None

    @contextlib.contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.db_path, timeout=30.0, isolation_level=None)
        db.row_factory = sqlite3.Row
        try:
            db.execute("PRAGMA journal_mode=WAL")
            yield db
        finally:
            db.close()

    def _claim_slot(self, job_id: int, max_running: int) -> bool | None:
        """Atomically move job ``job_id`` from queued to running if fewer than
        ``max_running`` jobs run and no earlier job still waits (first come, first
        served). ``None`` if the job is no longer queued (cancelled)."""
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                row = db.execute("SELECT status, cancel_requested FROM jobs WHERE id = ?", (job_id,)).fetchone()
                if row is None or row["status"] != "queued" or row["cancel_requested"]:
                    return None
                running = db.execute("SELECT COUNT(*) FROM jobs WHERE status = 'running' AND id != ?",
                                     (job_id,)).fetchone()[0]
                earlier = db.execute("SELECT COUNT(*) FROM jobs WHERE status = 'queued' AND id < ? "
                                     "AND cancel_requested = 0", (job_id,)).fetchone()[0]
                if running + earlier >= max_running:
                    return False
                db.execute("UPDATE jobs SET status = 'running', started = ?, message = '' WHERE id = ?",
                           (time.time(), job_id))
                return True
            finally:
                db.execute("COMMIT")

    def _update(self, job_id: int, **fields) -> None:
        cols = ", ".join(f"{k} = ?" for k in fields)
        with self._connect() as db:
            db.execute(f"UPDATE jobs SET {cols} WHERE id = ?", (*fields.values(), job_id))

    @staticmethod
    def _row(row: sqlite3.Row) -> Job:
        d = dict(row)
        d["args"] = json.loads(d["args"])
        d["cancel_requested"] = bool(d["cancel_requested"])
        return Job(**d)

    def _get(self, job_id: int) -> Job:
        with self._connect() as db:
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (int(job_id),)).fetchone()
        if row is None:
            raise JobError(f"no job #{job_id} in {self.db_path}")
        return self._row(row)

    # -- public API ------------------------------------------------------------------------
    def get(self, job_id: int) -> Job:
        """Job ``job_id``, its status refreshed."""
        return self.refresh(self._get(job_id))

    def list(self, kind: str | None = None, status: str | None = None, limit: int = 100) -> list[Job]:
        """Jobs, newest first, statuses refreshed."""
        query, params = "SELECT * FROM jobs", []
        where = []
        if kind:
            where.append("kind = ?")
            params.append(kind)
        if where:
            query += " WHERE " + " AND ".join(where)
        query += " ORDER BY id DESC LIMIT ?"
        params.append(int(limit))
        with self._connect() as db:
            rows = db.execute(query, params).fetchall()
        jobs = [self.refresh(self._row(r)) for r in rows]
        return [j for j in jobs if status is None or j.status == status]

    def active(self) -> list[Job]:
        """Jobs that are queued or running."""
        with self._connect() as db:
            rows = db.execute("SELECT * FROM jobs WHERE status IN (?, ?) ORDER BY id", ACTIVE).fetchall()
        return [j for j in (self.refresh(self._row(r)) for r in rows) if j.active]

    def _resolve_output(self, output: str | None) -> str | None:
        if output is None:
            return None
        path = Path(output)
        return str((path if path.is_absolute() else self.cwd / path).resolve())

    def submit(self, spec: JobSpec) -> Job:
        """Register ``spec`` and start it in the background; returns the new job.

        Raises :class:`JobConflictError` if an active job writes the same output (or a
        path inside it, or a parent of it).
        """
        if spec.kind not in KINDS:
            raise JobError(f"unknown job kind {spec.kind!r} (known: {', '.join(KINDS)})")
        args = [str(a) for a in spec.args]
        output = self._resolve_output(spec.output)
        self.prune_logs()
        for job in self.active():  # refresh first, so a dead job does not block
            if output and job.output and (
                Path(output).is_relative_to(job.output) or Path(job.output).is_relative_to(output)
            ):
                raise JobConflictError(
                    f"job #{job.id} ({job.kind}, {job.status}) already writes {job.output}; "
                    f"wait for it to finish or cancel it before starting another job that writes {output}"
                )
        command = "python -m core " + shlex.join(args)
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")  # the conflict check and the insert are one step
            if output:
                for row in db.execute("SELECT id, output FROM jobs WHERE status IN (?, ?) AND output IS NOT NULL",
                                      ACTIVE):
                    if Path(output).is_relative_to(row["output"]) or Path(row["output"]).is_relative_to(output):
                        db.execute("ROLLBACK")
                        raise JobConflictError(f"job #{row['id']} already writes {row['output']}")
            cur = db.execute(
                "INSERT INTO jobs (kind, args, command, output, cwd, status, log_path, progress_path, created) "
                "VALUES (?, ?, ?, ?, ?, 'queued', '', '', ?)",
                (spec.kind, json.dumps(args), command, output, str(self.cwd), time.time()),
            )
            job_id = cur.lastrowid
            job_dir = self.db_path.parent / str(job_id)
            db.execute("UPDATE jobs SET log_path = ?, progress_path = ? WHERE id = ?",
                       (str(job_dir / "log.txt"), str(job_dir / "progress.json"), job_id))
            db.execute("COMMIT")
        job_dir.mkdir(parents=True, exist_ok=True)
        log_path = job_dir / "log.txt"
        env = {**os.environ, **self.env}
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
        try:
            with open(log_path, "ab") as log:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "core.jobs.manager", "--db", str(self.db_path), "--run", str(job_id)],
                    cwd=self.cwd, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                    start_new_session=True,  # own process group: cancel ends it all
                )
        except OSError as exc:
            self._update(job_id, status="failed", finished=time.time(), error=f"could not start: {exc}")
            raise JobError(f"job #{job_id}: could not start {command} ({exc})") from None
        self._update(job_id, pid=proc.pid, pid_created=_create_time(proc.pid))
        _PROCS[proc.pid] = proc  # keep the Popen, so Python reaps it without a ResourceWarning
        return self._get(job_id)

    def refresh(self, job: Job) -> Job:
        """Re-check an active job's processes; a job whose processes are all gone
        without a recorded exit status becomes ``failed`` (or ``cancelled``)."""
        if not job.active:
            return job
        if _alive(job.pid, job.pid_created) or _alive(job.child_pid, job.child_created):
            return self._with_progress(job)
        if job.pid is None and time.time() - job.created < _QUEUED_TIMEOUT_S:
            return job  # being started right now
        job = self._get(job.id)  # the waiter may have just written its result
        if not job.active:
            return job
        record = progress.read_exit(job.exit_path) if job.child_pid is not None else None
        if record is not None and record.get("pid") not in (None, job.child_pid):
            record = None  # not written by this job's command
        code = record["exit_code"] if record else None
        if code is not None:  # the waiter died, but the command recorded how it ended
            status, error = _outcome(code, job.cancel_requested, job.log_path)
        elif job.cancel_requested:
            status, error = "cancelled", "cancelled by the user"
        elif job.pid is None:
            status, error = "failed", "the job never started"
        else:
            status, error = "failed", ("the job's processes ended without recording an exit status "
                                       "(killed by SIGKILL, out of memory, or the machine stopped)")
        finished = record["time"] if record else time.time()
        # the fraction the command reached (its progress file), never the waiter's last copy of it
        fraction = 1.0 if status == "succeeded" else float((progress.read(job.progress_path) or {}).get(
            "fraction", job.fraction))
        with self._connect() as db:  # only if nobody finished it meanwhile
            db.execute("UPDATE jobs SET status = ?, error = ?, finished = ?, exit_code = ?, fraction = ? "
                       "WHERE id = ? AND status IN (?, ?)", (status, error, finished, code, fraction, job.id, *ACTIVE))
        return self._get(job.id)

    def _with_progress(self, job: Job) -> Job:
        record = progress.read(job.progress_path)
        if record:
            job.fraction = float(record.get("fraction", job.fraction))
            job.message = str(record.get("message", job.message))
        return job

    def cancel(self, job_id: int, grace_s: float = 5.0) -> Job:
        """End job ``job_id``'s whole process group: SIGTERM, then SIGKILL after ``grace_s``.

        Works also when the waiter (the group's leader) has died: every process left in
        the group, the command and its children, is ended.
        """
        job = self._get(job_id)
        if not job.active:
            return job
        self._update(job.id, cancel_requested=1)
        pgid = _job_group(job.pid, job.pid_created)
        if pgid is not None and not _signal_group(pgid, signal.SIGTERM, grace_s):
            _signal_group(pgid, signal.SIGKILL, 5.0)
        if _alive(job.child_pid, job.child_created):  # never outside the group, but be sure
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(job.child_pid, signal.SIGKILL)
        # give the waiter a moment to write "cancelled" with the exit code itself
        deadline = time.time() + 2.0
        while self._get(job.id).active and time.time() < deadline and _alive(job.pid, job.pid_created):
            time.sleep(0.05)
        return self.refresh(self._get(job.id))

    def log(self, job_id: int, lines: int = 40) -> str:
        """The last ``lines`` lines of job ``job_id``'s log (a note if the log was pruned)."""
        job = self._get(job_id)
        if not job.active and not Path(job.log_path).parent.exists():
            return PRUNED_LOG
        return tail(job.log_path, lines)

    def wait(self, job_id: int, timeout_s: float = 60.0, poll_s: float = 0.2) -> Job:
        """Block until job ``job_id`` is final or ``timeout_s`` passes; returns it."""
        deadline = time.time() + timeout_s
        job = self.get(job_id)
        while job.active and time.time() < deadline:
            time.sleep(poll_s)
            job = self.get(job_id)
        return job

    def prune_logs(self, keep: int | None = None, max_age_days: float | None = None) -> list[int]:
        """Apply the log retention policy (see the module docstring); returns the pruned ids.

        ``keep`` and ``max_age_days`` default to ``$CORE_JOBS_KEEP_LOGS`` (50) and
        ``$CORE_JOBS_LOG_DAYS`` (30). Only ``<db dir>/<id>/`` folders of finished jobs
        in this database are deleted.
        """
        keep = int(_env_number(KEEP_LOGS_ENV, DEFAULT_KEEP_LOGS, 0) if keep is None else keep)
        days = _env_number(LOG_DAYS_ENV, DEFAULT_LOG_DAYS, 0.0) if max_age_days is None else max_age_days
        if keep < 0 or not math.isfinite(days) or days < 0:  # a negative keep would delete every log
            raise JobError(f"prune: keep must be >= 0 jobs and days a finite number >= 0, got {keep} and {days}")
        cutoff = time.time() - days * 86400.0
        with self._connect() as db:
            rows = db.execute("SELECT id, log_path, COALESCE(finished, created) AS ended FROM jobs "
                              "WHERE status IN (?, ?, ?) ORDER BY ended DESC, id DESC", FINAL).fetchall()
        pruned = []
        for rank, row in enumerate(rows):
            if rank < keep and row["ended"] >= cutoff:
                continue
            folder = Path(row["log_path"]).parent
            if folder != self.db_path.parent / str(row["id"]) or not folder.is_dir():
                continue  # not a folder this manager made, or already gone
            shutil.rmtree(folder, ignore_errors=True)
            pruned.append(row["id"])
        return pruned

    def delete(self, job_id: int) -> None:
        """Forget a finished job (its files stay)."""
        job = self.get(job_id)
        if job.active:
            raise JobError(f"job #{job_id} is {job.status}; cancel it before deleting it")
        with self._connect() as db:
            db.execute("DELETE FROM jobs WHERE id = ?", (job.id,))


_PROCS: dict[int, subprocess.Popen] = {}


# -- the waiter: `python -m core.jobs.manager --db DB --run ID` -----------------------------------
def _queue(manager: JobManager, job_id: int, stop: dict) -> bool:
    """Wait in the queue for a free slot; False if the job was cancelled meanwhile."""
    try:
        max_running = max(1, int(os.environ.get(MAX_RUNNING_ENV, DEFAULT_MAX_RUNNING)))
    except ValueError:
        max_running = DEFAULT_MAX_RUNNING
    waiting = False
    while True:
        claimed = manager._claim_slot(job_id, max_running) if stop["signal"] is None else None
        if claimed:
            return True
        if claimed is None:  # cancelled while queued
            manager._update(job_id, status="cancelled", finished=time.time(), error="cancelled before it started")
            return False
        if not waiting:
            waiting = True
            manager._update(job_id, message=f"waiting: {max_running} job(s) already running or queued first")
        time.sleep(_POLL_S)
        manager.active()  # marks dead jobs failed, so they free their slot


def _run_command(manager: JobManager, job: Job) -> int | None:
    """Run the job's command, copying its progress into the database; its exit status
    (``None`` if it could not start)."""
    env = dict(os.environ)
    env[progress.PROGRESS_ENV] = job.progress_path
    env[progress.EXIT_ENV] = job.exit_path
    env["PYTHONUNBUFFERED"] = "1"
    Path(job.exit_path).unlink(missing_ok=True)
    with open(job.log_path, "ab", buffering=0) as log:
        log.write(f"$ {job.command}\n".encode())
        try:
            proc = subprocess.Popen([sys.executable, "-m", "core", *job.args], cwd=job.cwd, env=env,
                                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        except OSError as exc:
            manager._update(job.id, status="failed", finished=time.time(), error=f"could not start: {exc}")
            return None
        manager._update(job.id, child_pid=proc.pid, child_created=_create_time(proc.pid))
        last = None
        while True:
            try:
                return proc.wait(timeout=_POLL_S)
            except subprocess.TimeoutExpired:
                pass
            record = progress.read(job.progress_path)
            if record and record != last:
                last = record
                manager._update(job.id, fraction=float(record.get("fraction", 0.0)),
                                message=str(record.get("message", ""))[:500])


def _wait_job(db_path: str, job_id: int) -> int:
    manager = JobManager(db_path)
    job = manager._get(job_id)
    stop = {"signal": None}

    def on_signal(signum, _frame):  # keep waiting: the command gets the same signal
        stop["signal"] = signum

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, on_signal)
    if not _queue(manager, job_id, stop):
        return 0
    code = _run_command(manager, job)
    if code is None:
        return 1
    record = progress.read(job.progress_path) or {}
    cancelled = manager._get(job_id).cancel_requested
    status, error = _outcome(code, cancelled, job.log_path)
    manager._update(
        job_id, status=status, exit_code=code, error=error, finished=time.time(),
        fraction=1.0 if code == 0 and not cancelled else float(record.get("fraction", 0.0)),
        message=str(record.get("message", ""))[:500],
    )
    return 0


# -- `python -m core jobs ...` ------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--db", default=None, help=f"jobs database (default: ${DB_ENV} or .jobs/jobs.sqlite)")
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = sub.add_parser("list", help="list jobs, newest first")
    p.add_argument("--kind", choices=list(KINDS), default=None)
    p.add_argument("--limit", type=cli_types.count, default=20)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p = sub.add_parser("show", help="one job's record and the tail of its log")
    p.add_argument("id", type=cli_types.count)
    p.add_argument("--lines", type=cli_types.non_negative_int, default=30)
    p = sub.add_parser("log", help="the tail of a job's log")
    p.add_argument("id", type=cli_types.count)
    p.add_argument("--lines", type=cli_types.non_negative_int, default=40)
    p = sub.add_parser("cancel", help="end a job's whole process group")
    p.add_argument("id", type=cli_types.count)
    p = sub.add_parser("prune", help="delete old jobs' log folders (the log retention policy)",
                       description=f"Delete the folder (log, progress, exit record) of every finished job that is "
                                   f"not among the newest KEEP finished jobs or finished more than DAYS days ago. "
                                   f"Defaults: ${KEEP_LOGS_ENV} or {DEFAULT_KEEP_LOGS}, ${LOG_DAYS_ENV} or "
                                   f"{DEFAULT_LOG_DAYS:g}. Also done at every submit. The jobs stay listed.")
    p.add_argument("--keep", type=cli_types.non_negative_int, default=None, help="finished jobs whose logs are kept")
    p.add_argument("--days", type=cli_types.non_negative, default=None, help="delete logs of jobs finished longer ago than this")
    p = sub.add_parser("submit", help="run `python -m core ARGS...` as a background job")
    p.add_argument("--kind", choices=list(KINDS), default=None, help="default: the first of ARGS")
    p.add_argument("--output", default=None,
                   help="the path the command writes (refuses a second writer; default: the command's --out)")
    p.add_argument("--wait", action="store_true", help="block until it finishes; exit with its status")
    p.add_argument("command_args", nargs=argparse.REMAINDER, help="the command, e.g. -- train --config ...")
    for action in sub.choices.values():  # `jobs list --db X` works as well as `jobs --db X list`
        action.add_argument("--db", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    p = sub.add_parser("selftest", help="a tiny job: reports progress for a few seconds (used by tests)")
    p.add_argument("--seconds", type=cli_types.non_negative, default=2.0)
    p.add_argument("--exit-code", type=cli_types.integer(0, 255), default=0)
    p.add_argument("--out", default=None, help="write a small JSON file here when done")
    p.add_argument("--child", action="store_true", help="also start a sleeping child process")


def _selftest(args: argparse.Namespace) -> int:
    child = None
    if args.child:  # a grandchild in the same process group, to check cancel ends the group
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        print(f"child pid {child.pid}", flush=True)
    steps = max(1, int(args.seconds / 0.1))
    for step in range(steps + 1):
        progress.report(step / steps, f"step {step}/{steps}", force=True)
        if step % 5 == 0:
            print(f"selftest step {step}/{steps}", flush=True)
        time.sleep(args.seconds / steps)
    if child is not None:
        child.kill()
        child.wait()
    if args.exit_code:
        print(f"error: selftest asked to fail with exit status {args.exit_code}", file=sys.stderr, flush=True)
        return args.exit_code
    if args.out:
        from core.stores.atomic import atomic_write_text

        atomic_write_text(args.out, json.dumps({"ok": True, "seconds": args.seconds}))
    print("selftest done", flush=True)
    return 0


def _out_argument(command: Sequence[str]) -> str | None:
    """The value of ``--out`` (``--out X`` or ``--out=X``) in ``command``, or None."""
    for k, arg in enumerate(command):
        if arg == "--out" and k + 1 < len(command):
            return command[k + 1]
        if arg.startswith("--out="):
            return arg.split("=", 1)[1]
    return None


def _fmt_time(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else "-"


def run(args: argparse.Namespace) -> int:
    if args.action == "selftest":
        return _selftest(args)
    manager = JobManager(args.db)
    if args.action == "list":
        jobs = manager.list(kind=args.kind, limit=args.limit)
        if args.json:
            print(json.dumps([j.to_dict() for j in jobs], indent=1))
            return 0
        print(f"{'id':>4}  {'kind':<14} {'status':<10} {'progress':>8}  {'created':<19}  command")
        for j in jobs:
            print(f"{j.id:>4}  {j.kind:<14} {j.status:<10} {j.fraction:>7.0%}  {_fmt_time(j.created):<19}  {j.command}")
        return 0
    if args.action in ("show", "log"):
        job = manager.get(args.id)
        if args.action == "show":
            for key, value in job.to_dict().items():
                if key in ("created", "started", "finished"):
                    value = _fmt_time(value)
                print(f"{key:>16}: {value}")
            print("--- log tail ---")
        print(manager.log(job.id, args.lines))
        return 0
    if args.action == "cancel":
        job = manager.cancel(args.id)
        print(f"job #{job.id}: {job.status}")
        return 0
    if args.action == "prune":
        pruned = manager.prune_logs(args.keep, args.days)
        print(f"removed the logs of {len(pruned)} job(s)" + (f": {', '.join(f'#{i}' for i in pruned)}" if pruned else ""))
        return 0
    if args.action == "submit":
        command = args.command_args[1:] if args.command_args[:1] == ["--"] else args.command_args
        if not command:
            raise JobError("jobs submit: give the command after --, e.g. `jobs submit -- train --config ...`")
        kind = args.kind or ("selftest" if command[:2] == ["jobs", "selftest"] else command[0])
        output = args.output or _out_argument(command)  # without --output: the command's own --out
        job = manager.submit(JobSpec(kind, tuple(command), output))
        print(f"job #{job.id} started: {job.command}\nlog: {job.log_path}")
        if args.wait:
            job = manager.wait(job.id, timeout_s=7 * 24 * 3600)
            print(f"job #{job.id}: {job.status}" + (f" ({job.error})" if job.error else ""))
            return 0 if job.status == "succeeded" else 1
        return 0
    raise JobError(f"unknown jobs action {args.action!r}")


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m core.jobs.manager", description="the waiter of one job (internal)")
    parser.add_argument("--db", required=True)
    parser.add_argument("--run", type=int, required=True)
    ns = parser.parse_args(argv)
    return _wait_job(ns.db, ns.run)


if __name__ == "__main__":
    sys.exit(_main())
