"""Ray as the distributed engine of ``generate-maps`` and ``make-dataset``: one Ray task per scene.

``--ray`` (no address, or ``local``) starts a local Ray for the command's lifetime, with
one CPU slot per core of this machine, no dashboard and no worker logs forwarded.
``--ray ADDRESS`` joins a running cluster (``ray start --head`` on one machine,
``ray start --address HEAD:6379`` on the others; ADDRESS as ``ray.init`` takes it:
``HEAD:6379`` or ``auto``). A Ray already started in the calling process (a test, a
notebook) is used as it is and left running.

Each scene is one task that runs :func:`~core.raytracing.scene_batch.run_guarded` on the
very per-scene function the serial path runs. A task asks for one GPU when the cluster
has GPUs, else for one CPU. It writes its store atomically (:mod:`core.stores.atomic`), so
a worker killed mid-write leaves no store, only a hidden temporary that the next write
to that path removes. A task is never retried: one whose worker dies (killed, out of
memory, its node lost) is a failed scene; the other scenes go on.

Progress: the driver shows a tqdm bar over finished scenes, prints a line per scene as it
finishes and reports ``finished / total`` to the app's job (:func:`core.progress.report`).
Workers show no bars and write no job progress (they may run on other machines).

On a cluster every node runs the same checkout at the same path with the same packages
(workers import ``core`` through the driver's ``sys.path``), and every path (outputs,
``--scenes-dir``, ``--radio-maps``) lies on a file system all nodes share; the commands
hand the workers absolute paths.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import socket
import sys
from collections.abc import Iterator, Sequence

from core.device import RAY_LOCAL
from core.errors import CoreError
from core.progress import PROGRESS_ENV, TQDM_DISABLE_ENV, report
from core.raytracing.scene_batch import SceneCall, SceneResult, one_line, result_line, run_guarded

#: set in every worker: no tqdm bars, no writes to the job's progress file
WORKER_ENV = {TQDM_DISABLE_ENV: "1", PROGRESS_ENV: ""}
_CONNECT_TIMEOUT_S = 5.0


def add_ray_argument(parser: argparse.ArgumentParser) -> None:
    """``--ray [ADDRESS]``: ``args.ray`` is None (no Ray), :data:`RAY_LOCAL` or the address."""
    parser.add_argument("--ray", nargs="?", const=RAY_LOCAL, default=None, metavar="ADDRESS",
                        help="one Ray task per scene: alone, on a local Ray using every core; with ADDRESS "
                             "(HOST:PORT or auto), on that Ray cluster, whose nodes share this checkout and "
                             "the output file system")


def local_cores() -> int:
    """CPU cores this process may run on."""
    with contextlib.suppress(AttributeError):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _check_reachable(address: str) -> None:
    """A ``HOST:PORT`` address must accept a TCP connection (Ray itself retries for minutes)."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or "://" in address:
        return  # "auto", "ray://...": left to Ray
    try:
        socket.create_connection((host, int(port)), timeout=_CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        raise CoreError(f"--ray {address}: no Ray cluster answers there ({exc.strerror or exc})") from None


@contextlib.contextmanager
def ray_session(address: str, num_cpus: int | None = None) -> Iterator[None]:
    """Ray initialised for the block: a new local one (:data:`RAY_LOCAL`, with ``num_cpus`` CPUs, by
    default every core) or the cluster at ``address``.

    Shut down after the block unless it was already running in this process.
    """
    import ray

    if ray.is_initialized():
        yield
        return
    options = {"include_dashboard": False, "logging_level": logging.ERROR,
               "log_to_driver": bool(os.environ.get("CORE_DEBUG")), "runtime_env": {"env_vars": WORKER_ENV}}
    if address == RAY_LOCAL:
        ray.init(address=RAY_LOCAL, num_cpus=num_cpus or local_cores(), **options)
    else:
        _check_reachable(address)
        try:
            ray.init(address=address, **options)
        except (ConnectionError, ValueError, RuntimeError) as exc:
            raise CoreError(f"--ray {address}: cannot join a Ray cluster there ({one_line(exc)[:300]})") from None
    try:
        yield
    finally:
        ray.shutdown()


def task_options() -> dict:
    """Resources of one scene's task: one GPU where the cluster has GPUs, else one CPU; never retried."""
    import ray

    gpus = ray.cluster_resources().get("GPU", 0)
    resources = {"num_gpus": 1} if gpus >= 1 else {"num_cpus": 1}
    return {**resources, "max_retries": 0, "retry_exceptions": False}


def _task_result(ref, name: str) -> SceneResult:
    """The task's :class:`SceneResult`, or a ``failed`` one naming why Ray could not run it."""
    import ray

    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as exc:  # raised before run_guarded ran (e.g. it could not be imported)
        cause = exc.cause if isinstance(exc.cause, BaseException) else exc
        return SceneResult(name, "failed", one_line(f"{type(cause).__name__}: {cause}")[:500])
    except (ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError, ray.exceptions.OutOfMemoryError,
            ray.exceptions.LocalRayletDiedError) as exc:
        return SceneResult(name, "failed", f"the Ray worker died before the scene finished ({type(exc).__name__}: "
                                           "killed, out of memory or its node lost); no store was written")
    except ray.exceptions.RayError as exc:
        first = next(iter(str(exc).strip().splitlines()), "")
        return SceneResult(name, "failed", one_line(f"Ray: {type(exc).__name__}: {first}")[:500])


def run_on_ray(calls: Sequence[SceneCall], address: str, label: str, num_cpus: int | None = None) -> list[SceneResult]:
    """Run every call as one Ray task (module docstring); results in the order of ``calls``.

    ``label`` names the work in the bar, the task names and the job's progress messages;
    ``num_cpus``: the CPUs of a new local Ray (default: every core).
    """
    import ray
    from tqdm import tqdm

    total = len(calls)
    results: list[SceneResult | None] = [None] * total
    with ray_session(address, num_cpus):
        remote, options = ray.remote(run_guarded), task_options()
        where = "a local Ray" if address == RAY_LOCAL else f"the Ray cluster at {address}"
        report(0.0, f"{label}: {total} scene(s) on {where}", force=True)
        pending = {remote.options(name=f"{label} {call.name}", **options).remote(call.function, call.name, *call.args): k
                   for k, call in enumerate(calls)}
        bar = tqdm(total=total, desc=f"{label} on Ray", unit="scene", dynamic_ncols=True)
        try:
            while pending:
                (ref,), _ = ray.wait(list(pending), num_returns=1)
                k = pending.pop(ref)
                results[k] = _task_result(ref, calls[k].name)
                bar.update(1)
                tqdm.write(result_line(results[k]))
                sys.stdout.flush()
                done = total - len(pending)
                report(done / total, f"{calls[k].name}: {results[k].status} ({done} of {total} scenes)", force=True)
        finally:
            bar.close()
            for ref in pending:  # interrupted: stop what is still running
                ray.cancel(ref, force=True)
    return results
