"""``python -m core <command>``: the command line shared by users and the app's jobs.

Each command lives in its own module, which provides::

    def add_arguments(parser: argparse.ArgumentParser) -> None
    def run(args: argparse.Namespace) -> int      # exit status

Modules are imported only when their command runs, so ``--help`` stays fast and a
command does not pay for Sionna or the model unless it needs them.

Errors: a :class:`~core.errors.CoreError` prints one line naming the bad file or
argument and exits 2, and so does a bad flag (:class:`core.cli_types.Parser`: every numeric
flag is a checked type, finite and in range, read before any work starts); a full disk (``ENOSPC``)
prints "disk full" and exits 2; any other exception prints one line and exits 1. ``--debug``
shows the traceback instead. Before returning, :func:`main` lets Zarr's background I/O
settle (see :mod:`core.stores.zarr_group`), so nothing but that line reaches stderr.

``--no-progress`` (train, generate-maps, make-dataset, evaluate, ablate, bench) turns
the tqdm bars off. As a job (see :mod:`core.jobs.manager`) the process records its own
exit status (:func:`run_process`).
"""

from __future__ import annotations

import argparse
import errno
import importlib
import sys

from core import progress
from core.cli_types import Parser
from core.device import DEVICE_CHOICES
from core.errors import CoreError
from core.stores.zarr_group import settle_zarr

#: command -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "generate-maps": ("core.raytracing.generation", "ray-trace radio maps of scenes with Sionna RT into Zarr stores"),
    "place-sites": ("core.raytracing.site_placement",
                    "place rooftop sites for line-of-sight coverage; writes configs/sites/<scene>.yaml"),
    "make-city": ("core.raytracing.city",
                  "generate a seeded procedural city as a Sionna RT scene (+ rooftop sites) in a scenes folder"),
    "city-stats": ("core.raytracing.city_stats",
                   "realism statistics of scenes: footprint share, heights, street widths, line of sight"),
    "make-corpus": ("core.raytracing.corpus",
                    "build N procedural cities and their radio maps, one (Ray) task per city, resuming; a manifest"),
    "make-dataset": ("core.raytracing.measurements", "ray-trace a UE measurement dataset along random walks"),
    "merge-datasets": ("core.stores.dataset_merge",
                       "merge datasets of one world traced with different walk seeds: more train walks, same val/test"),
    "consistency": ("core.raytracing.consistency",
                    "measured features minus the radio map at the true positions (residual statistics)"),
    "correct-map": ("core.physics.twin_correction",
                    "fit what the twin gets wrong to a world's labelled walks: a corrected copy of the radio map"),
    "train": ("core.learning.training", "train the map-conditioned transformer from a YAML config"),
    "evaluate": ("core.learning.evaluation", "evaluate a training run (optionally with gradient refinement)"),
    "ablate": ("core.learning.ablation", "train and evaluate baseline vs physics-regularized models"),
    "export-reports": ("core.reports.export", "write a dataset split as a measurement-report file (CSV or Parquet)"),
    "localize": ("core.reports.localize",
                 "localize a measurement-report file with a run: positions, σ ellipses, errors when truth is given"),
    "tune-baselines": ("core.learning.baseline_tuning",
                       "tune multilateration and exhaustive map matching on the val split (prints the sweep)"),
    "bench": ("core.benchmarks.cli", "run a benchmark (physics, maps, train, localize, inference, world); prints a table, writes JSON"),
    "jobs": ("core.jobs.manager", "list, follow, submit and cancel the background jobs the app also uses"),
}


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--debug", action="store_true", help="show the full traceback on error")
    parser.add_argument(
        "--device", default="auto", help=f"torch device: {', '.join(DEVICE_CHOICES)} or cuda:N (default: auto)"
    )


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The top-level parser; only ``command``'s module is imported to add its arguments."""
    parser = Parser(
        prog="python -m core",
        description="Physics-regularized UE localization: radio maps, datasets, training, evaluation.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    for name, (module_name, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:
            module = importlib.import_module(module_name)
            module.add_arguments(p)
            p.set_defaults(_run=module.run)
        _add_common(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # before the command's module is imported: tqdm reads its settings on import (torch imports it)
    with progress.bars_disabled("--no-progress" in argv):
        try:
            return _run_command(argv)
        finally:
            settle_zarr(cancel=True)  # no "Task was destroyed but it is pending!" at exit


def _run_command(argv: list[str]) -> int:
    command = next((a for a in argv if not a.startswith("-")), None)
    debug = "--debug" in argv
    try:
        parser = build_parser(command if command in COMMANDS else None)
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return 2
        return int(args._run(args) or 0)
    except CoreError as exc:
        if debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug, not bad input: one line unless --debug
        if debug:
            raise
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:  # the machine, not a bug: say so
            where = f" writing {exc.filename}" if exc.filename else ""
            print(f"error: disk full (no space left on the device{where})", file=sys.stderr)
            return 2
        print(f"error: {type(exc).__name__}: {exc} (run again with --debug for the traceback)", file=sys.stderr)
        return 1


def run_process(argv: list[str] | None = None) -> int:
    """``python -m core``: :func:`main`, and inside a job also the exit record.

    A job's command writes its exit status to ``$CORE_JOB_EXIT_FILE`` as it ends, also on
    SIGTERM or SIGHUP (see :func:`core.progress.claim_exit_file`).
    """
    exit_file = progress.claim_exit_file()
    code = 1  # an exception that escapes (with --debug) ends the interpreter with 1
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse: --help, bad arguments
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        raise
    finally:
        if exit_file:
            progress.record_exit(exit_file, code)
    return code
