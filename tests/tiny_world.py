"""Tiny analytic cities (no Sionna) and tiny agnostic runs trained on them, for tests that need a trained run."""

from __future__ import annotations

from pathlib import Path

#: a run of seconds: the tiny preset, one epoch, small candidate and fine grids
TINY_AGNOSTIC = ["model.preset=tiny", "training.batch_size=32", "training.epochs=1", "training.warmup_epochs=0",
                 "training.num_threads=1", "physics_loss.warmup_epochs=0", "physics_loss.ramp_epochs=0",
                 "physics_loss.coarse_subgrid=2", "physics_loss.mode_subgrid=2", "model.num_candidates=6",
                 "model.fine_subgrid=3", "model.d_report=16"]


def city(root: Path, scene: str, seed: int, num_ues: int = 120, cells: int = 24) -> None:
    """An analytic city ``scene`` of ``cells x cells`` 4 m cells under ``root`` (datasets/, radio_maps/)."""
    from core.physics.synthetic import synthetic_scene

    synthetic_scene(root, num_ues=num_ues, height=cells, width=cells, cell=4.0, reports=6, k=3, seed=seed, scene=scene)


def tiny_run(root: Path, name: str, scene: str, seed: int, *extra: str) -> Path:
    """``root / name``: the agnostic config trained for :data:`TINY_AGNOSTIC` on ``scene`` of ``root``."""
    from core.learning.config import load_config
    from core.learning.training import train

    config = load_config("configs/agnostic.yaml", [f"data.dataset={root / 'datasets' / scene}",
                                                   f"physics_loss.radio_maps_dir={root / 'radio_maps'}",
                                                   *TINY_AGNOSTIC, f"seed={seed}", *extra])
    train(config, root / name, show_progress=False)
    return root / name
