"""Coverage-driven site placement (``python -m core place-sites``), on real Sionna scenes."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import yaml

from core.raytracing.scenes import SITES_CONFIG_DIR
from core.raytracing.site_placement import greedy_max_coverage, line_of_sight, place_sites

REPO = Path(__file__).resolve().parents[1]


def test_greedy_is_exact_for_one_site_and_within_1_minus_1_over_e_of_the_best_set():
    rng = np.random.default_rng(0)
    for _ in range(20):
        visible = rng.random((12, 40)) < rng.uniform(0.1, 0.5)
        pos = np.c_[rng.uniform(0, 100, (12, 2)), rng.uniform(10, 30, 12)]
        (one,), _ = greedy_max_coverage(visible, pos, 1)
        assert visible[one].sum() == visible.sum(1).max()
        chosen, coverage = greedy_max_coverage(visible, pos, 3)
        best = max(visible[list(c)].any(0).sum() for c in itertools.combinations(range(12), 3))
        assert coverage[-1] * visible.shape[1] >= (1 - 1 / np.e) * best - 1e-9
        assert np.all(np.diff(coverage) >= 0) and len(set(chosen)) == 3
        assert np.isclose(coverage[-1], visible[chosen].any(0).mean())


def test_min_separation_keeps_sites_apart_while_it_can():
    visible = np.zeros((3, 10), bool)
    visible[0, :6] = visible[1, :5] = True  # candidate 1 sees almost what 0 sees, but stands 5 m from it
    visible[2, 6:8] = True
    pos = np.array([[0.0, 0, 20], [5.0, 0, 20], [200.0, 0, 20]])
    assert greedy_max_coverage(visible, pos, 2, min_separation=50.0)[0] == [0, 2]
    assert greedy_max_coverage(visible, pos, 3, min_separation=500.0)[0][:2] == [0, 2]  # then the rest


def test_line_of_sight_agrees_with_pathsolvers_direct_path(tiny_scene, tiny_map):
    """The exact visibility test against a reference: PathSolver's LOS flag at the same points."""
    from core.raytracing.tracing import PropagationSettings, trace_points

    rng = np.random.default_rng(3)
    ys, xs = np.nonzero(np.asarray(tiny_map.outdoor))
    pick = rng.choice(len(ys), 300, replace=False)
    gx, gy = tiny_map.cell_centers()
    ground = np.asarray(tiny_map.ground)[ys[pick], xs[pick]]
    points = np.c_[gx[xs[pick]], gy[ys[pick]], ground + 1.5]
    sites = np.array([s["position"] for s in tiny_map.attrs["sites"]], float)
    los = trace_points(tiny_scene, points, PropagationSettings.from_dict(tiny_map.attrs["propagation"]))["los"]
    visible = line_of_sight(tiny_scene, sites, points).T  # [N, S]
    assert visible.shape == los.shape
    assert 0.1 < los.mean() < 0.95  # both outcomes occur
    assert (visible == los).mean() >= 0.99


@pytest.fixture(scope="module")
def canyon():
    from core.raytracing.scenes import buildings_of, load_scene, resolve_scene, scene_bbox

    scene = load_scene(resolve_scene("simple_street_canyon"))
    return scene, buildings_of(scene), scene_bbox(scene)


def test_placement_sees_more_than_the_distance_layout(canyon):
    from core.raytracing.scenes import automatic_layout
    from core.raytracing.terrain import measurement_points
    from core.raytracing.tracing import indoor_mask

    scene, buildings, bbox = canyon
    area = (bbox[0], bbox[1], bbox[3], bbox[4])
    placed = place_sites(scene, buildings, area, 3, spacing=4.0)
    assert len(placed.sites) == 3 and placed.num_candidates > 3 and placed.num_targets > 100
    assert np.all(np.diff(placed.los_coverage) >= 0)
    xy = np.array([s["position"][:2] for s in placed.sites])
    side = min(area[2] - area[0], area[3] - area[1])
    assert min(np.hypot(*(a - b)) for a, b in itertools.combinations(xy, 2)) >= 0.5 * side / np.sqrt(3) - 1e-6
    gx, gy = np.meshgrid(np.arange(area[0] + 2, area[2], 4.0), np.arange(area[1] + 2, area[3], 4.0))
    xyz = measurement_points(scene, np.c_[gx.ravel(), gy.ravel()], 1.5)
    targets = xyz[~indoor_mask(scene, xyz)]
    auto = np.array([s["position"] for s in automatic_layout(buildings, bbox, 3, area)])
    seen_auto = line_of_sight(scene, auto, targets).any(0).mean()
    seen_placed = line_of_sight(scene, np.array([s["position"] for s in placed.sites]), targets).any(0).mean()
    assert np.isclose(seen_placed, placed.los_coverage[-1], atol=0.01)
    assert seen_placed > seen_auto


def test_cli_writes_a_yaml_the_layout_reads_and_refuses_to_overwrite(tmp_path, capsys):
    from core.cli import main
    from core.raytracing.scenes import sites_override

    out = tmp_path / "simple_street_canyon.yaml"
    args = ["place-sites", "--scene", "simple_street_canyon", "--num-sites", "2", "--map-size", "64", "64",
            "--resolution", "2", "--out", str(out)]
    assert main(args) == 0
    assert "2 sites see" in capsys.readouterr().out
    data = yaml.safe_load(out.read_text())
    assert len(data["sites"]) == 2 and "greedy line-of-sight" in data["description"]
    assert sites_override("simple_street_canyon", tmp_path) == data["sites"]
    before = out.read_text()
    assert main(args) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"error: --out {out} exists (use --force to replace it)"]
    assert out.read_text() == before and not list(tmp_path.glob(".*"))  # nothing half-written beside it
    shipped = SITES_CONFIG_DIR / "etoile.yaml"  # a shipped scene's sites, the default --out: read-only, even --force
    kept = shipped.read_bytes()
    assert main(["place-sites", "--scene", "etoile", "--force"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"error: --out {shipped}: shipped with the project and read-only")
    assert shipped.read_bytes() == kept and not list(SITES_CONFIG_DIR.glob(".*"))
    with pytest.raises(SystemExit) as info:  # a checked flag (core/cli_types.py): refused as argparse reads it
        main(args[:3] + ["--num-sites", "0", "--out", str(tmp_path / "x.yaml")])
    assert info.value.code == 2
    assert "error: argument --num-sites: must be an integer >= 1, got '0'" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["etoile", "florence"])
def test_the_shipped_layouts_are_what_place_sites_gives_and_what_the_maps_use(name):
    """configs/sites/<scene>.yaml can be remade by the command, and the shipped map was traced with it."""
    import zarr

    from core.raytracing.generation import MapSettings, map_area
    from core.raytracing.scenes import buildings_of, load_scene, resolve_scene, scene_bbox, sites_override

    shipped = sites_override(name)
    scene = load_scene(resolve_scene(name))
    _, _, area = map_area(MapSettings(), scene_bbox(scene))
    assert place_sites(scene, buildings_of(scene), area, len(shipped)).sites == shipped
    recorded = zarr.open_group(str(REPO / "radio_maps" / f"{name}.zarr"), mode="r").attrs["attrs"]["sites"]
    assert [s["position"] for s in recorded] == [s["position"] for s in shipped]
