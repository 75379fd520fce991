"""Diffraction and outdoor coverage, with real Sionna RT on small scenes (no mocks; terrain: test_terrain.py)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from core.cli import main
from core.errors import CoreError
from core.raytracing.coverage import check_coverage, outdoor_coverage
from core.raytracing.scenes import resolve_scene, scene_geometry
from core.raytracing.tracing import PropagationSettings

pytestmark = pytest.mark.sionna


def test_diffraction_is_the_default_and_recorded(tiny_map):
    p = PropagationSettings.from_dict(tiny_map.attrs["propagation"])
    assert p.diffraction and p.edge_diffraction and p.diffraction_lit_region
    assert p.solver_kwargs()["diffraction"] is True


def test_diffraction_covers_the_shadowed_street_corners(tiny_map, tiny_map_settings):
    """Without diffraction the canyon's corners behind buildings get no path at all."""
    from core.raytracing.generation import generate_map

    off = replace(tiny_map_settings, min_coverage=0.0,
                  propagation=replace(tiny_map_settings.propagation, diffraction=False, edge_diffraction=False))
    dark = generate_map(resolve_scene("simple_street_canyon"), off)
    np.testing.assert_array_equal(dark.outdoor, tiny_map.outdoor)  # the same cells, only the physics differs
    assert dark.outdoor_coverage < 0.9
    assert tiny_map.outdoor_coverage > 0.97
    assert tiny_map.outdoor_coverage > dark.outdoor_coverage + 0.1
    assert not (dark.valid & ~tiny_map.valid).any()  # diffraction only adds paths
    assert tiny_map.attrs["coverage"] == pytest.approx(tiny_map.outdoor_coverage)
    assert tiny_map.attrs["coverage_of"] == "outdoor cells"


def test_outdoor_mask_excludes_building_interiors(tiny_map):
    outdoor = tiny_map.outdoor
    assert outdoor is not None and not (tiny_map.valid & ~outdoor).any()
    buildings = [b for b in scene_geometry("simple_street_canyon").buildings if b.height > 3.0]
    assert len(buildings) >= 4
    inside = np.array([b.footprint.mean(axis=0) for b in buildings])  # box buildings: the centroid is inside
    inside = inside[tiny_map.contains(inside)]
    i, j = tiny_map.cell_of(inside)
    assert len(i) >= 4 and not outdoor[i, j].any()
    assert 0.4 < outdoor.mean() < 0.9  # streets and squares are outdoor, the blocks are not
    assert np.isnan(tiny_map.layers["site_path_gain"][:, ~outdoor]).all()


def test_coverage_below_the_threshold_is_an_error_naming_the_scene(tmp_path, capsys):
    out = tmp_path / "maps"
    rc = main(["generate-maps", "--scenes", "simple_street_canyon", "--output-dir", str(out), "--resolution", "8",
               "--map-size", "16", "16", "--samples-per-tx", "2000", "--toa-decimation", "8",
               "--min-coverage", "1.0", "--max-depth", "0"])
    text = capsys.readouterr().out
    assert rc == 2  # a failed scene: exit status 2, as every failed command
    line = next(t for t in text.splitlines() if t.startswith("simple_street_canyon: failed"))
    assert "simple_street_canyon: radio map covers" in line and "below --min-coverage 100%" in line
    assert "likely cause" in line and "not written" in line
    assert not out.exists() or not any(out.iterdir())  # nothing a loader could pick up


def test_coverage_check_names_the_likely_cause():
    h = w = 20
    buried = np.zeros((h, w), bool)
    buried[0, 0] = True  # 1 outdoor cell of 400: the plane is under the ground
    with pytest.raises(CoreError, match="hill: .*under the terrain"):
        check_coverage("hill", np.zeros((h, w), bool), buried, np.zeros((2, h, w), bool), 0.5)
    outdoor = np.ones((h, w), bool)
    with pytest.raises(CoreError, match="far: .*no site reaches the area"):
        check_coverage("far", np.zeros((h, w), bool), outdoor, np.zeros((2, h, w), bool), 0.5)
    valid = np.zeros((h, w), bool)
    valid[:4] = True
    with pytest.raises(CoreError, match=r"dim: radio map covers 20.0% .*per site 20%, 0%"):
        check_coverage("dim", valid, outdoor, np.stack([valid, np.zeros_like(valid)]), 0.5)
    assert check_coverage("ok", valid, outdoor, np.stack([valid, valid]), 0.2) == pytest.approx(0.2)
    assert outdoor_coverage(valid, np.zeros_like(valid)) == 0.0


def test_map_fidelity_off_the_grid_los_nlos_and_diffracted(tiny_map, tiny_scene):
    """``bench maps``' fidelity on the tiny map: PathSolver at off-grid points against the map there."""
    from core.benchmarks.maps import fidelity

    f = fidelity(tiny_map, tiny_scene, 300, seed=0)
    for group in ("LOS", "NLOS", "NLOS diffracted"):
        e = f[f"toa site {group}"]
        assert e["n"] > 30, group
        assert e["median"] < 0.5 and e["gross"] < 0.2, (group, e)
        assert f[f"aoa site {group}"]["median"] < 1.0, group
    assert f["path_gain serving"]["median"] < 1.0


def test_a_diffracted_paths_anchor_gives_its_delay_and_azimuth_nearby(tiny_map, tiny_scene):
    """``(L0 + |q - p'|) / c`` and ``azimuth(q - p')`` at points 0.5 m away (Keller: second order)."""
    from core.features import wrap_degrees
    from core.raytracing.generation import geometric_toa_aoa
    from core.raytracing.tracing import SPEED_OF_LIGHT, trace_points

    settings = PropagationSettings.from_dict(tiny_map.attrs["propagation"])
    x, y = tiny_map.cell_centers()
    ii, jj = np.nonzero(tiny_map.valid)
    rng = np.random.default_rng(2)
    k = rng.choice(len(ii), 300, replace=False)
    p = np.stack([x[jj[k]], y[ii[k]], tiny_map.ground[ii[k], jj[k]] + 1.5], 1)
    heading = rng.uniform(-np.pi, np.pi, len(p))
    q = p + 0.5 * np.stack([np.cos(heading), np.sin(heading), np.zeros(len(p))], 1)
    at_p, at_q = trace_points(tiny_scene, p, settings), trace_points(tiny_scene, q, settings)
    has = np.isfinite(at_p["toa"])
    # at the traced point itself the unfolded length is exact: L0 + |anchor - p| = c tau
    length = at_p["offset"] + np.linalg.norm(at_p["image"] - p[:, None, :], axis=-1)
    np.testing.assert_allclose(length[has], SPEED_OF_LIGHT * at_p["toa"][has] * 1e-9, rtol=1e-4, atol=0.01)
    diffracted = has & np.isfinite(at_q["toa"]) & (at_p["offset"] > 0.5)
    assert diffracted.sum() > 50  # the canyon's shadowed corners are lit by diffraction
    toa, aoa = geometric_toa_aoa(q[:, None, :], at_p["image"], at_p["offset"])
    d_toa = np.abs(toa - at_q["toa"])[diffracted]
    d_aoa = np.abs(wrap_degrees(aoa - at_q["aoa"]))[diffracted]
    same = d_toa < 1.0  # the same path is still the strongest 0.5 m away (most of the time)
    assert same.mean() > 0.8
    assert np.median(d_toa[same]) < 0.01 and np.quantile(d_toa[same], 0.9) < 0.1
    assert np.median(d_aoa[same]) < 0.05


def test_the_second_pass_traces_only_the_missed_points_and_finds_paths(tiny_scene, tiny_map):
    """Points with no path at all get a second PathSolver pass with more rays; the others are untouched."""
    from core.raytracing.tracing import trace_points

    rng = np.random.default_rng(5)
    ys, xs = np.nonzero(np.asarray(tiny_map.outdoor))
    pick = rng.choice(len(ys), 400, replace=False)
    gx, gy = tiny_map.cell_centers()
    points = np.c_[gx[xs[pick]], gy[ys[pick]], np.asarray(tiny_map.ground)[ys[pick], xs[pick]] + 1.5]
    # no direct path, 10 rays per site: the reflections and diffractions of many points are missed
    base = replace(PropagationSettings.from_dict(tiny_map.attrs["propagation"]), samples_per_src=10, los=False,
                   retry_samples_per_src=0, receivers_per_call=128)
    once = trace_points(tiny_scene, points, base)
    missed = ~np.isfinite(once["path_gain"]).any(axis=1)
    assert missed.sum() >= 5
    calls = []
    twice = trace_points(tiny_scene, points, replace(base, retry_samples_per_src=3000),
                         progress=lambda done, total: calls.append((done, total)))
    np.testing.assert_array_equal(twice["path_gain"][~missed], once["path_gain"][~missed])
    found = np.isfinite(twice["path_gain"][missed]).any(axis=1)
    assert found.mean() > 0.5
    assert calls[-1] == (400 + missed.sum(),) * 2  # progress counts the second pass too
    alone = trace_points(tiny_scene, points[missed], replace(base, samples_per_src=3000))
    same = np.isclose(alone["path_gain"], twice["path_gain"][missed], atol=0.05) | (
        ~np.isfinite(alone["path_gain"]) & ~np.isfinite(twice["path_gain"][missed]))
    assert same.mean() > 0.9  # the rule depends on the point: the dataset gets what the map got


def test_a_record_without_the_second_pass_reads_as_none():
    p = PropagationSettings()
    assert p.retry_samples_per_src > 0 and PropagationSettings.from_dict(p.to_dict()) == p
    old = {k: v for k, v in p.to_dict().items() if k != "retry_samples_per_src"}
    assert PropagationSettings.from_dict(old).retry_samples_per_src == 0  # maps made before it had none
    with pytest.raises(CoreError, match="retry_samples_per_src"):
        replace(p, retry_samples_per_src=-1).validate()


def test_the_default_map_fits_the_scene():
    from core.raytracing.generation import MAX_DEFAULT_CELLS, fitted_map_size

    assert fitted_map_size((-64.0, -96.0, 0.0, 64.0, 96.0, 30.0), 1.0) == (192, 128)
    assert fitted_map_size((-64.0, -96.0, 0.0, 64.0, 96.0, 30.0), 2.5) == (77, 52)
    assert fitted_map_size((-900.0, -700.0, 0.0, 900.0, 700.0, 80.0), 1.0) == (MAX_DEFAULT_CELLS,) * 2
    assert fitted_map_size((0.0, 0.0, 0.0, 100.0, 50.0, 10.0), 1.0, center=(25.0, 25.0)) == (50, 150)


def test_narrow_streets_between_indoor_nodes_are_traced_at_their_cells(tiny_map_settings):
    """With nodes every 8 cells most street cells have their stencil inside buildings; they are traced directly."""
    from core.raytracing.generation import _scene_grid, generate_map, node_indices, starved_cells
    from core.raytracing.tracing import trace_points

    coarse = replace(tiny_map_settings, toa_decimation=8, min_coverage=0.0)
    info = resolve_scene("simple_street_canyon")
    rm = generate_map(info, coarse)
    _, scene, _, _, _, xyz, indoor, _ = _scene_grid(info, coarse, rm.attrs["sites"])
    nodes = {"rows": node_indices(64, 8), "cols": node_indices(64, 8)}
    starved = starved_cells(indoor, nodes)
    assert starved.sum() >= 50 and not (starved & indoor).any()
    assert rm.attrs["generator"]["starved_cells_traced"] == int(starved.sum())
    assert rm.valid[starved].mean() > 0.9  # covered although no stencil could cover them
    direct = trace_points(scene, xyz[starved], coarse.propagation)
    pg = rm.layers["site_path_gain"][:, starved].T
    both = np.isfinite(pg) & np.isfinite(direct["path_gain"])
    assert both.mean() > 0.8
    # the map traces them in one PathSolver pass with the nodes, this trace alone: a point's candidate
    # paths may (rarely) collide in Sionna's hash table with another point's of the same call
    assert np.isclose(pg[both], direct["path_gain"][both], atol=0.05).mean() > 0.99
    assert np.isclose(rm.layers["site_toa"][:, starved].T[both], direct["toa"][both], atol=0.01).mean() > 0.99
