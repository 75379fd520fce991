"""Shared fixtures: one tiny ray-traced radio map for every Sionna test.

Dr.Jit compiles its kernels on first use (cached in ~/.drjit), so the map of
``simple_street_canyon`` is generated once per test session and shared.

A city scene left alive slows every later PathSolver call in the process about 100-fold
(Mitsuba dispatches its shape calls over every live shape: san_francisco's 4,735 objects
turned a 0.8 s trace of 64 canyon points into 79 s), so each Sionna module must release
the city scenes it loads; :func:`pytest_runtest_protocol` checks that.
"""

from __future__ import annotations

import gc
import sys

import pytest

TINY_SCENE = "simple_street_canyon"
CITY_OBJECTS = 100  # simple_street_canyon has 7 objects (15 with cars), etoile 565, the other cities thousands


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """After the last test of a ``sionna``-marked module (its fixtures released): no loaded scene of
    more than ``CITY_OBJECTS`` objects is alive. A leak fails the test session."""
    result = yield
    rt = sys.modules.get("sionna.rt")
    last_of_module = nextitem is None or nextitem.module is not item.module
    if rt is not None and last_of_module and item.get_closest_marker("sionna") is not None:
        gc.collect()
        alive = [len(o.objects) for o in gc.get_objects() if issubclass(type(o), rt.Scene) and len(o.objects) > CITY_OBJECTS]
        if alive:
            item.session.shouldfail = (f"{item.module.__name__} left {len(alive)} city scene(s) alive ({alive} "
                                       "objects): every later PathSolver call would be slowed about 100-fold")
    return result


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
def maps_dir(tiny_map, tmp_path_factory):
    """A radio-maps folder holding the tiny scene's map (the ``--radio-maps`` of make-dataset tests)."""
    maps = tmp_path_factory.mktemp("maps")
    tiny_map.save(maps / f"{TINY_SCENE}.zarr")
    return maps


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
