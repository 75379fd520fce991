"""Benchmark reporting: one table on stdout, the same rows plus machine facts in JSON."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from core.device import machine_info
from core.stores.atomic import atomic_write_text


def write_report(name: str, rows: list[dict[str, Any]], out: str | os.PathLike, summary: dict[str, Any] | None = None) -> Path:
    """Print ``rows`` as a table (and ``summary`` below it) and write both to ``out`` as JSON."""
    import pandas as pd

    table = pd.DataFrame(rows)
    with pd.option_context("display.max_rows", None, "display.max_columns", None, "display.width", 200):
        print(table.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    if summary:
        print()
        for key, value in summary.items():
            print(f"{key}: {value}")
    payload = {"benchmark": name, "machine": machine_info(), "rows": rows, "summary": summary or {}}
    out = Path(out)
    atomic_write_text(out, json.dumps(payload, indent=2, default=float))
    print(f"\nwrote {out}")
    return out
