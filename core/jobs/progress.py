"""Progress reporting shared by the command line and the app's jobs.

On the command line long work shows a tqdm bar. When the app launches a command as a
job (see ``core.jobs.manager``) it sets ``CORE_PROGRESS_FILE``; :func:`report` then also writes
``{"fraction", "message", "time"}`` there, atomically, so the app can show live progress.
"""

from __future__ import annotations

import json
import os
import time

from core.stores.atomic import atomic_write_text

PROGRESS_ENV = "CORE_PROGRESS_FILE"
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
