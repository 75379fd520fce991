"""Benchmark reporting: one table on stdout, the same rows plus machine facts in JSON."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any

from core.stores.atomic import atomic_write_text


def machine_info() -> dict[str, Any]:
    """The facts a timing needs to be read: CPU, cores, torch and its device."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
    }
    return info


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
