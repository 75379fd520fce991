"""A batch of scenes: one per-scene function applied to every scene of a command, each failure kept to its scene.

``generate-maps`` and ``make-dataset`` take several scenes. For each, a per-scene function
(ray-trace the scene, write its store atomically) returns ``(status, detail)`` or raises.
Whatever runs the calls -- in turn (:func:`run_in_turn`), a local process pool
(:func:`run_in_pool`) or Ray tasks (:mod:`core.raytracing.distributed`) -- every call goes
through :func:`run_guarded`, so a scene that fails becomes a :class:`SceneResult` naming
its cause instead of stopping the others, and :func:`print_summary` ends the command with
one line per scene and its exit status (:data:`FAILED_EXIT` when any scene failed).
"""

from __future__ import annotations

import os
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from core.errors import CoreError

#: exit status of a command some of whose scenes failed
FAILED_EXIT = 2


class SceneResult(NamedTuple):
    """What became of one scene.

    Attributes:
        name: the scene as given on the command line.
        status: ``ok``, ``skipped`` (its output exists and was kept) or ``failed``.
        detail: one line: the output written, why it was skipped, or the cause of the failure.
    """

    name: str
    status: str
    detail: str


@dataclass(frozen=True)
class SceneCall:
    """One scene's work: ``function(name, *args)`` returns ``(status, detail)`` or raises.

    ``function`` must be a module-level function (a process pool or Ray ships it to a
    worker by name) and ``args`` picklable.
    """

    name: str
    function: Callable[..., tuple[str, str]]
    args: tuple = ()


def one_line(text: str) -> str:
    """``text`` with every run of whitespace, line breaks included, as one space."""
    return " ".join(str(text).split())


def run_guarded(function: Callable[..., tuple[str, str]], name: str, *args) -> SceneResult:
    """``function(name, *args)`` as a :class:`SceneResult`; an exception becomes a ``failed`` one.

    Never raises an :class:`Exception` (a scene that breaks the ray tracer must not stop the
    others); ``CORE_DEBUG=1`` prints the traceback of an unexpected one.
    """
    try:
        status, detail = function(name, *args)
        return SceneResult(name, status, one_line(detail))
    except CoreError as exc:
        return SceneResult(name, "failed", one_line(str(exc)))
    except Exception as exc:
        if os.environ.get("CORE_DEBUG"):
            traceback.print_exc()
        return SceneResult(name, "failed", one_line(f"{type(exc).__name__}: {exc}"))


def result_line(result: SceneResult) -> str:
    """``<scene>: <status>: <detail>``, the line printed as a scene finishes."""
    return f"{result.name}: {result.status}: {result.detail}"


def run_in_turn(calls: Sequence[SceneCall]) -> list[SceneResult]:
    """Run the calls one after the other in this process, printing a line as each finishes."""
    results = []
    for call in calls:
        results.append(run_guarded(call.function, call.name, *call.args))
        print(result_line(results[-1]), flush=True)
    return results


def run_in_pool(calls: Sequence[SceneCall], workers: int) -> list[SceneResult]:
    """Run the calls in ``workers`` local processes (spawned: Dr.Jit state must not be forked).

    Results come in the order of ``calls``; a line is printed for each as it is collected.
    """
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    results = []
    with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn")) as pool:
        futures = [pool.submit(run_guarded, call.function, call.name, *call.args) for call in calls]
        for future in futures:
            results.append(future.result())
            print(result_line(results[-1]), flush=True)
    return results


def print_summary(results: Sequence[SceneResult]) -> int:
    """Print one line per scene (the failed ones with their cause) and return the exit status:
    0, or :data:`FAILED_EXIT` when any scene failed."""
    print("\nsummary:")
    for name, status, detail in results:
        print(f"  {name:<24} {status:<8} {detail}")
    failed = [r for r in results if r.status == "failed"]
    if failed:
        print(f"{len(failed)} of {len(results)} scene(s) failed", flush=True)
        return FAILED_EXIT
    return 0
