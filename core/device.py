"""Choosing the torch device: CUDA when it is there, the CPU otherwise."""

from __future__ import annotations

from typing import TYPE_CHECKING

from core.errors import CoreError

if TYPE_CHECKING:  # torch is imported lazily so `python -m core --help` stays fast
    import torch

DEVICE_CHOICES = ("auto", "cpu", "cuda")


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
