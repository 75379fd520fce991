"""Checked numbers for the command line: every numeric flag of every command is finite and in range
when argparse reads it, so bad input is refused before any tracing, training or deleting starts.

``parser.add_argument("--threshold", type=number(0.0, 1.0), ...)`` accepts a finite float in
``[0, 1]``; ``type=integer(0)`` an integer ``>= 0``. A value outside its range (or NaN, ``inf``,
text) is one line and exit status 2, naming the flag::

    error: argument --threshold: must be a finite number in [0, 1], got 'nan' (see python -m core evaluate --help)

:class:`Parser` is the :class:`argparse.ArgumentParser` of ``python -m core``: its errors (bad
values, unknown options, missing arguments) are that one line, without the usage block.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable


class Parser(argparse.ArgumentParser):
    """An :class:`argparse.ArgumentParser` whose errors are one line on stderr and exit status 2."""

    def error(self, message: str):  # argparse's hook for every parse error
        print(f"error: {' '.join(message.split())} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def _range_text(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    """``" in [0, 1)"``, ``" > 0"``, ``" >= 1"``, ``""`` (no bound)."""
    fmt = lambda v: f"{v:g}"  # noqa: E731
    if low is not None and high is not None:
        return f" in {'(' if low_open else '['}{fmt(low)}, {fmt(high)}{')' if high_open else ']'}"
    if low is not None:
        return f" {'>' if low_open else '>='} {fmt(low)}"
    if high is not None:
        return f" {'<' if high_open else '<='} {fmt(high)}"
    return ""


def _in_range(value: float, low, high, low_open: bool, high_open: bool) -> bool:
    if low is not None and (value < low or (low_open and value == low)):
        return False
    return not (high is not None and (value > high or (high_open and value == high)))


def _checked(convert: Callable[[str], float], what: str, low, high, low_open: bool = False,
             high_open: bool = False) -> Callable[[str], float]:
    """An argparse ``type``: ``convert(text)``, refused unless finite and in the range."""
    need = f"{what}{_range_text(low, high, low_open, high_open)}"

    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {need}, got {text!r}") from None
        if not math.isfinite(value) or not _in_range(value, low, high, low_open, high_open):
            raise argparse.ArgumentTypeError(f"must be {need}, got {text!r}")
        return value

    parse.__name__ = convert.__name__
    return parse


def number(low: float | None = None, high: float | None = None, *, low_open: bool = False,
           high_open: bool = False) -> Callable[[str], float]:
    """An argparse ``type``: a FINITE float in the range (``low``/``high`` inclusive unless ``*_open``)."""
    return _checked(float, "a finite number", low, high, low_open, high_open)


def integer(low: int | None = None, high: int | None = None) -> Callable[[str], int]:
    """An argparse ``type``: an integer in ``[low, high]`` (either bound optional)."""
    return _checked(int, "an integer", low, high)


def counts(text: str) -> list[int]:
    """An argparse ``type``: positive integers separated by commas (``256,1024``), at least one."""
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"must be positive integers separated by commas, e.g. 256,1024; got {text!r}")
    return values


#: the common cases
positive = number(0.0, low_open=True)
non_negative = number(0.0)
fraction = number(0.0, 1.0)
count = integer(1)
non_negative_int = integer(0)
seed = integer(0, 2**32 - 1)
coordinate = number()
