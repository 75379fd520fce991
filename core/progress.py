"""The job side of a command: progress reports, progress bars and the exit record.

On the command line long work shows a tqdm bar; ``--no-progress`` (every long command
takes it) turns bars off through :func:`bars_disabled`. When the app launches a command
as a job (see ``core.jobs.manager``) it sets ``CORE_PROGRESS_FILE``; :func:`report` then
also writes ``{"fraction", "message", "time"}`` there, atomically, so the app can show
live progress.

The job also sets ``CORE_JOB_EXIT_FILE``: the command records its own exit status there
as it ends (:func:`claim_exit_file`, :func:`record_exit`), so the status is known even
when the process that watches the job (the waiter) has died.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from collections.abc import Iterator

from core.stores.atomic import atomic_write_text

PROGRESS_ENV = "CORE_PROGRESS_FILE"
EXIT_ENV = "CORE_JOB_EXIT_FILE"
TQDM_DISABLE_ENV = "TQDM_DISABLE"
_MIN_INTERVAL_S = 0.5
_last_write = 0.0


def report(fraction: float, message: str = "", force: bool = False) -> None:
    """Record overall progress ``fraction`` in [0, 1] with a short ``message``.

    Cheap to call often: writes at most every 0.5 s unless ``force`` (or at 0 and 1).
    Does nothing when no job set ``CORE_PROGRESS_FILE``.
    """
    global _last_write
    path = os.environ.get(PROGRESS_ENV)
    if not path:
        return
    now = time.time()
    fraction = min(max(float(fraction), 0.0), 1.0)
    if not force and fraction not in (0.0, 1.0) and now - _last_write < _MIN_INTERVAL_S:
        return
    _last_write = now
    atomic_write_text(path, json.dumps({"fraction": fraction, "message": message, "time": now}))


def read(path: str | os.PathLike) -> dict | None:
    """The last progress record in ``path``, or ``None`` if there is none yet."""
    try:
        with open(path) as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return None


@contextlib.contextmanager
def bars_disabled(disable: bool = True) -> Iterator[None]:
    """``--no-progress``: no tqdm bar in this process or the processes it starts, inside
    the block (the environment is restored after it).

    Sets ``TQDM_DISABLE=1``, which tqdm reads when it is first imported: so this must
    start before anything imports tqdm (torch does), as :func:`core.cli.main` does it.
    """
    if not disable:
        yield
        return
    old = os.environ.get(TQDM_DISABLE_ENV)
    os.environ[TQDM_DISABLE_ENV] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(TQDM_DISABLE_ENV, None)
        else:
            os.environ[TQDM_DISABLE_ENV] = old


# -- the exit record ----------------------------------------------------------------------
def claim_exit_file() -> str | None:
    """Take ``CORE_JOB_EXIT_FILE`` out of the environment (so commands this one starts do
    not write it) and arrange that SIGTERM or SIGHUP still records the exit status.

    Returns the path to pass to :func:`record_exit`, or ``None`` outside a job.
    """
    path = os.environ.pop(EXIT_ENV, None)
    if not path:
        return None
    owner = os.getpid()

    def on_signal(signum, _frame):
        if os.getpid() == owner:  # not in a forked child that inherited the handler
            record_exit(path, -signum)
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)  # die of the signal, as the waiter expects

    for sig in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(sig) == signal.SIG_DFL:
            signal.signal(sig, on_signal)
    return path


def record_exit(path: str | os.PathLike, code: int) -> None:
    """Write ``{"exit_code", "pid", "time"}`` to ``path`` (negative code: killed by that signal)."""
    atomic_write_text(path, json.dumps({"exit_code": int(code), "pid": os.getpid(), "time": time.time()}))


def read_exit(path: str | os.PathLike) -> dict | None:
    """The exit record in ``path``, or ``None`` if the command recorded none."""
    record = read(path)
    if not isinstance(record, dict) or not isinstance(record.get("exit_code"), int):
        return None
    return record
