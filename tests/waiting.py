"""Waiting for a condition with a deadline: the tests' only way to wait.

No test sleeps a fixed time and hopes: it names the condition it waits for, and fails
with that name when the deadline passes.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

import psutil

T = TypeVar("T")


def wait_for(predicate: Callable[[], T], timeout: float = 60.0, what: str = "condition") -> T:
    """Poll ``predicate`` (quickly at first, then every 0.2 s) until it returns a truthy
    value, which is returned; ``AssertionError`` naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    pause = 0.01
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what}: not met within {timeout:g} s")
        time.sleep(min(pause, max(0.0, deadline - time.monotonic())))
        pause = min(2 * pause, 0.2)


def gone(pid: int | None) -> bool:
    """True if process ``pid`` no longer runs (it does not exist, or is a zombie)."""
    if pid is None:
        return True
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def wait_gone(pid: int, timeout: float = 30.0) -> None:
    """Block until process ``pid`` has ended (``AssertionError`` after ``timeout``)."""
    wait_for(lambda: gone(pid), timeout, f"process {pid} to end")
