"""Shared fixtures: one tiny ray-traced radio map for every Sionna test.

Dr.Jit compiles its kernels on first use (cached in ~/.drjit), so the map of
``simple_street_canyon`` is generated once per test session and shared.
"""

from __future__ import annotations

import pytest

TINY_SCENE = "simple_street_canyon"


@pytest.fixture(scope="session")
def tiny_map_settings():
    from core.raytracing.generation import MapSettings
    from core.raytracing.tracing import PropagationSettings

    # 64 x 64 cells of 2 m cover the whole street canyon; PathSolver every 4th row and column
    return MapSettings(resolution=2.0, map_size=(64, 64), toa_decimation=4,
                       propagation=PropagationSettings(max_depth=2, samples_per_src=3_000, seed=7))


@pytest.fixture(scope="session")
def tiny_map(tiny_map_settings):
    """The generated :class:`~core.stores.radio_map.RadioMap` of the tiny scene."""
    from core.raytracing.generation import generate_map
    from core.raytracing.scenes import resolve_scene

    return generate_map(resolve_scene(TINY_SCENE), tiny_map_settings)


@pytest.fixture(scope="session")
def tiny_scene(tiny_map):
    """The tiny scene loaded with the map's sites as transmitters."""
    from core.raytracing.scenes import resolve_scene
    from core.raytracing.tracing import PropagationSettings, build_scene

    radio = PropagationSettings.from_dict(tiny_map.attrs["propagation"]).radio
    return build_scene(resolve_scene(TINY_SCENE), tiny_map.attrs["sites"], radio)


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    """Config overrides (``["key=value", ...]``) pointing at an analytic map and dataset (no Sionna)."""
    from core.physics.synthetic import synthetic_scene

    root = tmp_path_factory.mktemp("scene")
    overrides = synthetic_scene(root, num_ues=160, height=24, width=24, cell=4.0, reports=6, k=3, seed=0)
    return [f"{k}={v}" for k, v in overrides.items()]
