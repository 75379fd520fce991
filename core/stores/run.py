"""The run-directory contract: what ``python -m core train`` writes and how it is read back.

Layout::

    <run>/
        config.yaml     the resolved, validated config (``feature_weights: auto`` as numbers)
        metrics.jsonl   one JSON object per finished epoch: epoch, lr, lambda_phys (applied at the
                        epoch's end), train_/val_ + total, coarse, fine, phys (loss units; phys null
                        when off), val_median_m, val_p90_m [m], epoch_s [s], grad_norm_coarse,
                        grad_norm_fine, grad_norm_phys, grad_norm_sup, grad_cos_sup_phys (gradient
                        balance on one fixed train batch; phys entries null when off); rewritten atomically
        best.pt         checkpoint of the best val median: model, spec, config, epoch, val
        last.pt         everything to resume: + optimizer, scheduler, rng, best_val_median_m, bad_epochs
        log.txt         human-readable log, appended
        status.json     {"state": running|done|stopped|failed, "epoch", "epochs", "best_val_median_m" [m],
                        "pid", "host", "pid_started", "heartbeat" [Unix s], "cause" (why failed/stopped)}
        lineage.json    {"dataset": StoreRef, "radio_map": StoreRef}: the stores it was trained on (the first
                        scene's), "scenes": [{"scene", "dataset", "radio_map"}] every training scene in
                        scene-index order, "holdout_scene": the scene kept out of training (or null)
        calibration.json  the likelihood's per-site bias and scale (:class:`~core.physics.calibration.Calibration`),
                        calibrated on the train split at the true positions; ``meta`` records the
                        dataset and radio map (StoreRef dicts) it was made from. A run on several
                        scenes: the first scene's; ``calibration_<scene>.json`` each other scene's

Checkpoints hold only tensors and plain data (dict, list, tuple, str, int, float, bool,
None; ``spec`` and ``config`` as dicts): :func:`save_checkpoint` refuses anything else and
:func:`load_checkpoint` reads with ``torch.load(weights_only=True)``, so loading a
checkpoint never runs pickled code.

metrics.jsonl has one rule for a broken line: every line holding a JSON object is a row;
any other non-blank line (a torn write, a stray edit) is skipped (:func:`read_metrics`).

``calibration.json`` is derived data, read and made by :mod:`core.learning.run_calibration`
(this module names the file: :func:`calibration_path`; :func:`write_calibration` stores it).

A directory that holds anything is taken (:func:`is_taken`): training refuses it unless it
resumes it (``last.pt`` needed, and the same config: :func:`check_resume_config`) or replaces it
(:func:`check_out_dir`); ``--force`` replaces only a directory of run files (:func:`is_run_file`),
never a folder holding anything else, and a shipped run (``assets/``) is never written.

Run states (:func:`run_state`): ``status.json`` records the writer's ``pid``, ``host``, process start
time and a ``heartbeat`` (refreshed every :data:`HEARTBEAT_S` by :class:`StatusWriter`). A run reads
as ``running`` only while that process lives (same host) or its heartbeat is fresh (another host);
else ``failed`` with the cause "process died". A crash records ``failed`` and its cause (a full
disk as "disk full"); ``done`` is written only after the last epoch (or an early stop).

Evaluations of a shipped run go to ``<runs>/evaluations/<run name>/`` (:func:`evaluations_dir`), and
:func:`evaluations` lists a run's results from both places.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import re
import socket
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core import REPO_ROOT, resolve_path
from core.errors import CoreError, StoreError
from core.learning.config import Config, load_config
from core.stores.atomic import atomic_path, atomic_write_text
from core.stores.lineage import StoreRef, map_path_for, store_ref
from core.stores.output import check_replaceable, check_writable, is_shipped

CONFIG, METRICS, BEST, LAST = "config.yaml", "metrics.jsonl", "best.pt", "last.pt"
LOG, STATUS, LINEAGE, CALIBRATION = "log.txt", "status.json", "lineage.json", "calibration.json"
FILES = (CONFIG, METRICS, BEST, LAST, LOG, STATUS, LINEAGE, CALIBRATION)
#: the ablation's cache of a run's test errors (core.learning.ablation)
ABLATION_TEST = "ablation_test.npz"
#: eval_<split>[_<scene>][_refine].json, calibration_<scene>.json
_OTHER_RUN_FILE = re.compile(r"(eval_[\w.-]+|calibration_[\w.-]+)\.json")
#: .<run file>.tmp-<pid>-<token> (atomic writes), .<run file>.lock and .lock.json (core.stores.lock)
_HIDDEN_SIBLING = re.compile(r"\.(.+?)\.(?:(?:tmp|old)-\d+-[0-9a-f]+|lock|lock\.json)")


# -- the directory ---------------------------------------------------------------------------
def is_run_file(name: str) -> bool:
    """Whether ``name`` is a file a run directory holds (what ``--force`` may replace): :data:`FILES`,
    evaluations, other scenes' calibrations, the ablation's cache, and their temporaries and locks."""
    hidden = _HIDDEN_SIBLING.fullmatch(name)
    if hidden:
        return is_run_file(hidden.group(1))
    return name in FILES or name == ABLATION_TEST or bool(_OTHER_RUN_FILE.fullmatch(name))


def is_taken(run_dir: str | os.PathLike) -> bool:
    """Whether ``run_dir`` exists and holds anything (a file that is not a directory counts)."""
    path = Path(run_dir)
    if path.is_dir():
        return any(path.iterdir())
    return path.exists()


def check_out_dir(run_dir: str | os.PathLike, resume: bool = False, force: bool = False) -> None:
    """Refuse to train into a shipped ``run_dir`` (:func:`~core.stores.output.check_writable`), or a taken
    one unless resuming it (needs ``last.pt``) or replacing it (``force``: only a directory of run files,
    :func:`is_run_file`). A missing or empty directory is always fine."""
    path = Path(run_dir)
    if resume and force:
        raise CoreError("--resume and --force exclude each other: continue the run or replace it")
    check_writable(path, "run directory")
    if not is_taken(path):
        return
    if not path.is_dir():
        raise StoreError(f"run directory {path}: exists and is not a directory")
    if force:
        check_replaceable(path, is_run_file, "a run directory (run files only)", "run directory")
        return
    if resume and not (path / LAST).exists():
        raise StoreError(f"run directory {path}: nothing to resume (no {LAST}); replace it with --force "
                         "or pick another directory")
    if not resume:
        held = ", ".join(sorted(p.name for p in path.iterdir())[:6])
        raise StoreError(f"run directory {path}: already holds a run ({held}); continue it with --resume, "
                         "replace it with --force, or pick another directory")


#: keys a resumed run may change: they do not change what it learns
RESUME_FREE = ("training.num_threads",)
_PATH_KEYS = ("data.dataset", "data.datasets", "physics_loss.radio_maps_dir")


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, Mapping):
        return {k: v for key, item in value.items() for k, v in _flat(item, f"{prefix}{key}.").items()}
    return {prefix[:-1]: value}


def _same_path(a: Any, b: Any) -> bool:
    paths = lambda v: [resolve_path(x).resolve() for x in (v if isinstance(v, list) else [v])]  # noqa: E731
    return a is not None and b is not None and paths(a) == paths(b)


def check_resume_config(run_dir: str | os.PathLike, config: Config) -> None:
    """Refuse to resume ``run_dir`` with another ``config`` than it was trained with: one line naming
    every key that differs (``physics_loss.lambda_phys: 0.1 → 0.5``). Paths compare as the stores they
    lead to; ``feature_weights: auto`` matches the numbers it was resolved to; :data:`RESUME_FREE` may differ."""
    was, now = _flat(read_config(run_dir).to_dict()), _flat(config.to_dict())
    if now.get("physics_loss.feature_weights") == "auto":
        was = {k: v for k, v in was.items() if not k.startswith("physics_loss.feature_weights")}
        now.pop("physics_loss.feature_weights")
    changed = [f"{k}: {was.get(k, '(unset)')} → {now.get(k, '(unset)')}" for k in sorted(set(was) | set(now))
               if was.get(k) != now.get(k) and k not in RESUME_FREE
               and not (k in _PATH_KEYS and _same_path(was.get(k), now.get(k)))]
    if changed:
        raise StoreError(f"run directory {run_dir}: --resume continues the same run, but the config differs from "
                         f"its {CONFIG} ({'; '.join(changed)}); train a new run (another --out) for a new config")


def read_config(run_dir: str | os.PathLike) -> Config:
    """The run's validated config; a :class:`StoreError` names ``config.yaml`` otherwise."""
    path = Path(run_dir) / CONFIG
    if not path.exists():
        raise StoreError(f"{path}: missing (not a run directory?)")
    try:
        return load_config(path)
    except CoreError as exc:
        raise StoreError(f"{path}: {exc}") from None


def checkpoint_path(run_dir: str | os.PathLike) -> Path:
    """``best.pt``, else ``last.pt``; a :class:`StoreError` when neither exists."""
    run_dir = Path(run_dir)
    for name in (BEST, LAST):
        if (run_dir / name).exists():
            return run_dir / name
    raise StoreError(f"{run_dir / BEST}: missing (no checkpoint in the run directory)")


def input_stores(run_dir: str | os.PathLike) -> tuple[Path, Path] | None:
    """``(dataset, radio map)`` paths that the run's config leads to, from metadata only
    (None when the config or the dataset cannot be read)."""
    try:
        config = read_config(run_dir)
        dataset = resolve_path(config.data.dataset)
        return dataset, map_path_for(store_ref(dataset, "dataset"), resolve_path(config.physics_loss.radio_maps_dir))
    except CoreError:
        return None


# -- metrics, status, log ------------------------------------------------------------------------
def read_metrics(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The rows of ``metrics.jsonl`` in file order ([] when absent); a line that is not a
    JSON object is skipped."""
    try:
        text = (Path(run_dir) / METRICS).read_text()
    except OSError:
        return []
    rows = []
    for line in text.splitlines():
        try:
            row = json.loads(line) if line.strip() else None
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def write_metrics(run_dir: str | os.PathLike, rows: Iterable[Mapping[str, Any]]) -> None:
    atomic_write_text(Path(run_dir) / METRICS, "".join(json.dumps(dict(row)) + "\n" for row in rows))


def read_status(run_dir: str | os.PathLike) -> dict[str, Any]:
    """``status.json`` as a dict ({} when absent or unreadable)."""
    try:
        status = json.loads((Path(run_dir) / STATUS).read_text())
    except (OSError, ValueError):
        return {}
    return status if isinstance(status, dict) else {}


def write_status(run_dir: str | os.PathLike, state: str, epoch: int, epochs: int, best_val_median_m: float,
                 **extra: Any) -> None:
    """Write ``status.json`` atomically; ``extra``: the writer's ``pid``, ``host``, ``pid_started``,
    ``heartbeat``, and the ``cause`` of a failed or stopped run."""
    best = best_val_median_m if math.isfinite(best_val_median_m) else None
    atomic_write_text(Path(run_dir) / STATUS, json.dumps(
        {"state": state, "epoch": epoch, "epochs": epochs, "best_val_median_m": best, **extra}))


#: seconds between heartbeats of a running run; one whose heartbeat is older than STALE_S
#: (written on another host, where its pid cannot be checked) reads as failed
HEARTBEAT_S, STALE_S = 30.0, 300.0


class StatusWriter:
    """``status.json`` of the run being written by this process (rank 0).

    :meth:`update` records the state with this process's pid, host and start time; a daemon
    thread refreshes ``heartbeat`` every :data:`HEARTBEAT_S`; :meth:`fail` records ``failed``
    (or ``stopped`` for an interruption) with the cause (:func:`failure_cause`). Writes never raise
    from the heartbeat, and :meth:`fail` never hides the original error.
    """

    def __init__(self, run_dir: str | os.PathLike, epochs: int) -> None:
        import psutil

        self.run_dir, self.epochs = Path(run_dir), epochs
        self.fields: dict[str, Any] = {"state": "running", "epoch": 0, "best": math.inf}
        self.owner = {"pid": os.getpid(), "host": socket.gethostname(),
                      "pid_started": psutil.Process().create_time()}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="run-heartbeat", daemon=True)

    def _write(self) -> None:
        f = self.fields
        extra = {**self.owner, "heartbeat": time.time(), **({"cause": f["cause"]} if f.get("cause") else {})}
        write_status(self.run_dir, f["state"], f["epoch"], self.epochs, f["best"], **extra)

    def update(self, state: str, epoch: int, best_val_median_m: float, cause: str = "") -> None:
        with self._lock:
            self.fields = {"state": state, "epoch": epoch, "best": best_val_median_m, "cause": cause}
            self._write()
        if state == "running" and not self._thread.is_alive() and not self._stop.is_set():
            self._thread.start()
        elif state != "running":
            self._stop.set()

    def fail(self, exc: BaseException) -> None:
        """Record how the run ended on ``exc`` (best effort: a full disk may refuse this write too)."""
        interrupted = isinstance(exc, (KeyboardInterrupt, SystemExit))
        with contextlib.suppress(Exception):
            self.update("stopped" if interrupted else "failed", self.fields["epoch"], self.fields["best"],
                        failure_cause(exc))

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            with self._lock, contextlib.suppress(Exception):
                if self.fields["state"] == "running":
                    self._write()


def failure_cause(exc: BaseException) -> str:
    """One line saying why a run ended on ``exc``: a full disk as "disk full", an interruption as such."""
    if isinstance(exc, (KeyboardInterrupt, SystemExit)):
        return "interrupted"
    text = str(exc).splitlines()[0] if str(exc) else ""
    if isinstance(exc, CoreError):
        return text
    chain = [exc, exc.__cause__, exc.__context__]
    if any(isinstance(e, OSError) and e.errno == errno.ENOSPC for e in chain):
        where = next((e.filename for e in chain if isinstance(e, OSError) and e.filename), None)
        return f"disk full (no space left on the device{f' writing {where}' if where else ''})"
    return f"{type(exc).__name__}: {text}"


def _process_alive(pid: Any, started: Any) -> bool:
    """Whether process ``pid`` (of this host) lives and started at ``started`` (psutil create time)."""
    import psutil

    try:
        proc = psutil.Process(int(pid))
        same = started is None or abs(proc.create_time() - float(started)) < 1.0
        return same and proc.status() != psutil.STATUS_ZOMBIE
    except (psutil.NoSuchProcess, ValueError, TypeError):
        return False
    except psutil.Error:
        return True  # exists, but we may not look at it


def run_state(run_dir: str | os.PathLike, status: Mapping[str, Any] | None = None,
              epochs_done: int | None = None, epochs: int | None = None) -> tuple[str, str]:
    """``(state, cause)`` of the run in ``run_dir`` as it truly is (see the module doc).

    ``running`` in ``status.json`` is believed only while its writer lives: the pid (same host) or a
    heartbeat younger than :data:`STALE_S` (another host); else ``failed``, "process died". A run
    without ``status.json`` (written before runs recorded it) is ``done`` when its checkpoint has
    all ``epochs`` of metrics, ``failed`` when it has fewer, ``no-checkpoint`` without one.
    """
    path = Path(run_dir)
    status = read_status(path) if status is None else status
    state, cause = str(status.get("state") or ""), str(status.get("cause") or "")
    if state == "running":
        pid, host = status.get("pid"), status.get("host")
        if pid is not None and host in (None, socket.gethostname()):
            if _process_alive(pid, status.get("pid_started")):
                return "running", ""
            return "failed", f"process died (pid {pid} ended without finishing the run)"
        if time.time() - (_number(status.get("heartbeat")) or 0.0) <= STALE_S:
            return "running", ""
        return "failed", f"process died (no heartbeat{f' from {host}' if host else ''} for over {STALE_S:g} s)"
    if state:
        return state, cause
    if not ((path / BEST).exists() or (path / LAST).exists()):
        return "no-checkpoint", ""
    if epochs is not None and epochs_done is not None and epochs_done < epochs:
        return "failed", f"ended after {epochs_done} of {epochs} epochs (no {STATUS})"
    return "done", ""


def append_log(run_dir: str | os.PathLike, line: str) -> None:
    with open(Path(run_dir) / LOG, "a") as fh:
        fh.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line}\n")


# -- lineage --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RunLineage:
    """The dataset and radio map a run was trained on (either None when not recorded); ``scenes``: the
    ``(dataset, radio map)`` of every training scene in scene-index order (the first is ``dataset``,
    ``radio_map``); ``holdout_scene``: the scene its config keeps out of training."""

    dataset: StoreRef | None
    radio_map: StoreRef | None
    scenes: tuple[tuple[StoreRef | None, StoreRef | None], ...] = ()
    holdout_scene: str | None = None
    #: the run whose weights this one started from (``training.init_from``): run, checkpoint, epoch, digest
    init_from: dict[str, Any] | None = None

    @property
    def scene_names(self) -> list[str]:
        """The training scenes' names, in scene-index order."""
        return [d.scene for d, _ in self.scenes if d is not None and d.scene]


def write_lineage(run_dir: str | os.PathLike, dataset: StoreRef, radio_map: StoreRef,
                  scenes: Iterable[tuple[StoreRef, StoreRef]] = (), holdout_scene: str | None = None,
                  init_from: Mapping[str, Any] | None = None) -> None:
    """Record the stores a run trains on: the first scene's ``dataset`` and ``radio_map``, and every
    training scene's (``scenes``; default the first alone); ``init_from``: the run whose weights it started
    from (:func:`core.learning.fine_tune.lineage_record`), written only when given."""
    scenes = list(scenes) or [(dataset, radio_map)]
    record = {"dataset": dataset.to_dict(), "radio_map": radio_map.to_dict(),
              "scenes": [{"scene": d.scene, "dataset": d.to_dict(), "radio_map": r.to_dict()} for d, r in scenes],
              "holdout_scene": holdout_scene}
    if init_from is not None:
        record["init_from"] = dict(init_from)
    atomic_write_text(Path(run_dir) / LINEAGE, json.dumps(record, indent=2) + "\n")


def read_lineage(run_dir: str | os.PathLike) -> RunLineage | None:
    """``lineage.json``; None for a run written before runs recorded it."""
    path = Path(run_dir) / LINEAGE
    if not path.exists():
        return None
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise StoreError(f"{path}: unreadable ({type(exc).__name__})") from None
    if not isinstance(raw, dict):
        raise StoreError(f"{path}: not a JSON object")
    first = (StoreRef.from_dict(raw.get("dataset")), StoreRef.from_dict(raw.get("radio_map")))
    scenes = raw.get("scenes")
    scenes = tuple((StoreRef.from_dict(s.get("dataset")), StoreRef.from_dict(s.get("radio_map")))
                   for s in scenes if isinstance(s, dict)) if isinstance(scenes, list) else ()
    held, init = raw.get("holdout_scene"), raw.get("init_from")
    return RunLineage(*first, scenes or (first,), held if isinstance(held, str) else None,
                      init if isinstance(init, dict) else None)


def check_lineage(run_dir: str | os.PathLike, dataset: StoreRef | None, radio_map: StoreRef, index: int = 0) -> None:
    """Refuse ``dataset`` or ``radio_map`` when the run recorded another save of it (of training scene ``index``;
    ``dataset`` None: the map alone, for another dataset of that scene)."""
    recorded = read_lineage(run_dir)
    if recorded is None or index >= len(recorded.scenes):
        return
    was_dataset, was_map = recorded.scenes[index]
    for label, was, now in (("dataset", was_dataset, dataset), ("radio map", was_map, radio_map)):
        if now is not None and was is not None and was.id and was.id != now.id:
            raise StoreError(f"run {run_dir} was trained on {label} {was.describe()}, but its config now leads to "
                             f"{label} {now.describe()}: train it again on these stores, or restore that one")


# -- evaluations ----------------------------------------------------------------------------------
def evaluations_dir(run_dir: str | os.PathLike) -> Path:
    """Where ``evaluate`` writes ``run_dir``'s results: the run directory itself, or for a shipped run
    (read-only, :func:`~core.stores.output.is_shipped`) ``<runs>/evaluations/<run name>/``, with
    ``<runs>`` = ``$CORE_RUNS_DIR``, else ``$CORE_WORKSPACE/runs``, else ``<repo>/runs``."""
    run_dir = Path(run_dir)
    if not is_shipped(run_dir):
        return run_dir
    runs = os.environ.get("CORE_RUNS_DIR") or Path(os.environ.get("CORE_WORKSPACE") or REPO_ROOT) / "runs"
    return Path(runs) / "evaluations" / run_dir.resolve().name


def evaluation_path(run_dir: str | os.PathLike, split: str, scene: str | None = None, refine: bool = False,
                    dataset: str | os.PathLike | None = None, silence: bool = False,
                    radio_map: str | os.PathLike | None = None, prior_sigma_scale: float | str | None = None,
                    scan_starts: int | None = None, walk_basins: int | None = None,
                    ensemble: list[str] | None = None) -> Path:
    """``<evaluations_dir>/eval_<split>[_<scene>[-<dataset>]][_refine][_silence][_scan-<n>][_prior-<s>][_basins-<k>][_ens-<m>-<id>].json``:
    what ``evaluate``
    writes (``scene``: ``--scene``; ``dataset``: ``--dataset``, named only when its folder is not the scene's own, e.g.
    ``eval_test_etoile-etoile_realistic_refine.json``, so two worlds never share a file; ``silence``:
    ``--silence``, the likelihood with the silence term; ``radio_map``: ``--radio-map``, in place of a scene,
    named by the map's folder: ``eval_test_map-corrected_refine.json``; ``prior_sigma_scale``:
    ``--prior-sigma-scale``, ``_prior-auto`` or ``_prior-0.125``; ``scan_starts``: ``--scan-starts``, ``_scan-6``;
    ``walk_basins``: ``--walk-basins``, ``_basins-2``; ``ensemble``: ``--ensemble``'s other runs, ``_ens-3-<id>`` for
    three members in all, ``id`` 8 hex digits of a hash of their paths as given, normalised)."""
    label = scene
    if radio_map is not None:
        label = f"map-{Path(radio_map).resolve().parent.name}"
    elif scene and dataset is not None and Path(dataset).name != scene:
        label = f"{scene}-{Path(dataset).name}"
    scale = prior_sigma_scale
    prior = "" if scale is None else f"_prior-{scale if isinstance(scale, str) else f'{scale:g}'}"
    scan = "" if scan_starts is None else f"_scan-{int(scan_starts)}"
    basins = "" if walk_basins is None else f"_basins-{int(walk_basins)}"
    ens = ""
    if ensemble:
        digest = hashlib.sha256("\n".join(os.path.normpath(p) for p in ensemble).encode()).hexdigest()[:8]
        ens = f"_ens-{len(ensemble) + 1}-{digest}"
    name = (f"eval_{split}{f'_{label}' if label else ''}{'_refine' if refine else ''}{'_silence' if silence else ''}"
            f"{scan}{prior}{basins}{ens}.json")
    return evaluations_dir(run_dir) / name


def evaluations(run_dir: str | os.PathLike) -> list[Path]:
    """Every evaluation result of ``run_dir``, sorted by name: those in the run directory (a shipped run's
    shipped results) and those in :func:`evaluations_dir`; a name in both is the latter's (the newer)."""
    found = {p.name: p for p in Path(run_dir).glob("eval_*.json")}
    found.update({p.name: p for p in evaluations_dir(run_dir).glob("eval_*.json")})
    return [found[name] for name in sorted(found)]


# -- calibration ----------------------------------------------------------------------------------
def calibration_path(run_dir: str | os.PathLike, scene: str | None = None) -> Path:
    """``<run>/calibration.json`` (the first scene's), or ``<run>/calibration_<scene>.json`` for another scene."""
    return Path(run_dir) / (CALIBRATION if scene is None else f"calibration_{scene}.json")


def write_calibration(run_dir: str | os.PathLike, calibration, scene: str | None = None) -> Path:
    """Write ``calibration`` to :func:`calibration_path` atomically; returns the path."""
    return calibration.save(calibration_path(run_dir, scene))


# -- checkpoints ----------------------------------------------------------------------------------
_PLAIN = (str, int, float, bool, type(None))


def _check_plain(value: Any, where: str) -> None:
    import torch

    if isinstance(value, (torch.Tensor, *_PLAIN)):
        return
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, (str, int)):
                raise StoreError(f"{where}: key {key!r} is a {type(key).__name__}, not a str or int")
            _check_plain(item, f"{where}[{key!r}]")
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_plain(item, f"{where}[{i}]")
    else:
        raise StoreError(f"{where} is a {type(value).__module__}.{type(value).__name__}: checkpoints hold only "
                         "tensors and plain data")


def save_checkpoint(path: str | os.PathLike, payload: Mapping[str, Any]) -> None:
    """Write ``payload`` (tensors and plain data only) to ``path`` atomically."""
    import torch

    _check_plain(payload, f"checkpoint {path}")
    try:
        with atomic_path(path) as tmp, open(tmp, "wb") as fh:  # a file object: a full disk raises ENOSPC,
            torch.save(dict(payload), fh)                        # not torch's "enforce fail at inline_container"
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise StoreError(f"{path}: disk full (no space left on the device) while writing the checkpoint") from exc
        raise


def load_checkpoint(path: str | os.PathLike, device: Any = "cpu") -> dict[str, Any]:
    """A checkpoint of this project (a dict with ``model`` and ``spec``), tensors on ``device``.

    Read with ``weights_only=True``: a file holding any other pickled object is refused with a
    :class:`StoreError` that names the object's class; unreadable files are reported as corrupt.
    """
    import pickle

    import torch

    path = Path(path)
    if not path.exists():
        raise StoreError(f"{path}: no such checkpoint")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        if found:
            raise StoreError(f"{path}: refused: it holds a pickled Python object ({found.group(1)}), and checkpoints "
                             "load with weights_only (tensors and plain data only)") from None
        raise StoreError(f"{path}: corrupt checkpoint (not a torch file of tensors and plain data)") from None
    except Exception as exc:
        raise StoreError(f"{path}: corrupt checkpoint ({type(exc).__name__}: {str(exc).splitlines()[0]})") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "spec" not in ckpt:
        raise StoreError(f"{path}: not a checkpoint of this project (no model/spec)")
    return ckpt


# -- listing ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RunInfo:
    """What the app lists about a run; numbers come from the validated config.

    ``state``: running | done | stopped | failed | no-checkpoint (:func:`run_state`, which checks that a
    running run's writer lives); ``cause``: why a run failed or stopped ("process died", "disk full", …).
    ``lambda_phys``: the λ_phys applied once ramped in (0 = the physics term was off; None when the
    config is invalid, and ``problem`` says why). ``label_fraction`` and ``split``: the data it
    was trained on. ``epochs``: planned epochs. ``scene``: the (first) training scene; ``scenes``: every
    training scene; ``holdout_scene``: the scene its config keeps out of training (None: none).
    """

    name: str
    path: Path
    scene: str | None
    dataset: str | None
    state: str
    epochs_done: int
    epochs: int | None
    best_val_median_m: float | None
    lambda_phys: float | None
    has_checkpoint: bool
    label_fraction: float | None = None
    split: str | None = None
    last_epoch_s: float | None = None
    config: Config | None = field(default=None, repr=False)
    problem: str = ""
    scenes: tuple[str, ...] = ()
    holdout_scene: str | None = None
    cause: str = ""


def _run_scene(run_dir: Path, config: Config | None) -> str | None:
    """The scene of the run's dataset: recorded in lineage.json, else read from the dataset."""
    try:
        lineage = read_lineage(run_dir)
    except StoreError:
        lineage = None
    if lineage is not None and lineage.dataset is not None and lineage.dataset.scene:
        return lineage.dataset.scene
    if config is None:
        return None
    try:
        return store_ref(resolve_path(config.data.dataset), "dataset").scene or config.data.scene
    except StoreError:
        return config.data.scene


def _run_scenes(run_dir: Path, config: Config | None, first: str | None) -> tuple[str, ...]:
    """Every training scene of the run: recorded in lineage.json, else the first one alone."""
    try:
        lineage = read_lineage(run_dir)
    except StoreError:
        lineage = None
    if lineage is not None and lineage.scene_names:
        return tuple(lineage.scene_names)
    return (first,) if first else ()


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def run_info(run_dir: str | os.PathLike, name: str | None = None) -> RunInfo:
    """Summarise ``run_dir`` (never raises for a half-written or broken run)."""
    path = Path(run_dir)
    try:
        config, problem = read_config(path), ""
    except StoreError as exc:
        config, problem = None, str(exc)
    status, metrics = read_status(path), read_metrics(path)
    medians = [m for m in (_number(r.get("val_median_m")) for r in metrics) if m is not None]
    best = _number(status.get("best_val_median_m"))
    has_ckpt = (path / BEST).exists() or (path / LAST).exists()
    lam = config.physics_loss.lambda_phys if config is not None else None
    scene = _run_scene(path, config)
    state, cause = run_state(path, status, len(metrics), config.training.epochs if config else None)
    return RunInfo(
        name=name or path.name, path=path, scene=scene,
        dataset=config.data.dataset if config else None, state=state, cause=cause,
        epochs_done=len(metrics), epochs=config.training.epochs if config else None,
        best_val_median_m=best if best is not None else (min(medians) if medians else None),
        lambda_phys=lam, has_checkpoint=has_ckpt, label_fraction=config.data.label_fraction if config else None,
        split=config.data.split if config else None,
        last_epoch_s=_number(metrics[-1].get("epoch_s")) if metrics else None, config=config, problem=problem,
        scenes=_run_scenes(path, config, scene), holdout_scene=config.data.holdout_scene if config else None,
    )


def _run_dirs(runs_dir: Path) -> list[Path]:
    """Folders of ``runs_dir`` with a config (newest first), each followed by its sub-runs."""
    if not runs_dir.is_dir():
        return []
    found = []
    dirs = [p for p in runs_dir.iterdir() if p.is_dir() and not p.name.startswith(".")]
    for d in sorted(dirs, key=lambda p: p.stat().st_mtime, reverse=True):
        if (d / CONFIG).exists():
            found.append(d)
        found += sorted(p for p in d.iterdir() if p.is_dir() and not p.name.startswith(".") and (p / CONFIG).exists())
    return found


def list_runs(runs_dir: str | os.PathLike, extra: Iterable[str | os.PathLike] = (),
              relative_to: str | os.PathLike | None = None) -> list[RunInfo]:
    """Every run directory (a folder with ``config.yaml``) in ``runs_dir``, and one level
    deeper (the variants of an ablation), newest first; then each of ``extra`` that is a run.

    A run is named by its path relative to ``relative_to`` (default ``runs_dir``) when inside
    it, else by the path as given.
    """
    runs_dir = Path(runs_dir)
    base = Path(relative_to) if relative_to is not None else runs_dir
    candidates = _run_dirs(runs_dir) + [Path(e) for e in extra if (Path(e) / CONFIG).exists()]
    infos, seen = [], set()
    for path in candidates:
        if path.resolve() in seen:
            continue
        seen.add(path.resolve())
        try:
            name = str(path.resolve().relative_to(base.resolve()))
        except ValueError:
            name = str(path)
        infos.append(run_info(path, name))
    return infos
