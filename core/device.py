"""The machine a command runs on: the torch device (CUDA when it is there, the CPU otherwise), Ray's name for
a new local instance, and the machine in words for a timing (:func:`machine_info`)."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import TYPE_CHECKING, Any

from core.errors import CoreError

if TYPE_CHECKING:  # torch is imported lazily so `python -m core --help` stays fast
    import torch

DEVICE_CHOICES = ("auto", "cpu", "cuda")
#: ``--ray`` without an address (and ``ray.init``'s own name for a new local instance)
RAY_LOCAL = "local"


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """Map ``"auto" | "cpu" | "cuda" | "cuda:N"`` to a :class:`torch.device`.

    ``"auto"`` (or ``None``) picks ``cuda`` when available, else ``cpu``. Asking for
    CUDA on a machine without it is an error, not a silent fallback.
    """
    import torch

    if isinstance(name, torch.device):
        return name
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as exc:
        raise CoreError(f"--device: unknown device {name!r} (use auto, cpu or cuda)") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CoreError(f"--device: {name!r} was asked for but CUDA is not available on this machine")
    if device.type not in ("cpu", "cuda"):
        raise CoreError(f"--device: unsupported device type {device.type!r} (use auto, cpu or cuda)")
    return device


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
