"""Scene catalogue, name/path validation, geometry for drawing and site layouts."""

from __future__ import annotations

import numpy as np
import pytest

from core.errors import ConfigError, CoreError
from core.raytracing.scenes import (
    SceneGeometry,
    automatic_layout,
    list_scenes,
    resolve_scene,
    scene_geometry,
    sites_override,
)


def test_catalogue_has_builtin_and_user_scenes(tmp_path):
    (tmp_path / "my_town.xml").write_text("<scene version='2.1.0'/>")
    (tmp_path / "nested").mkdir()
    (tmp_path / "nested" / "nested.xml").write_text("<scene version='2.1.0'/>")
    scenes = {s.name: s for s in list_scenes(tmp_path)}
    assert scenes["etoile"].source == "builtin" and scenes["etoile"].path.is_file()
    assert scenes["simple_street_canyon"].source == "builtin"
    assert scenes["my_town"].source == "user" and scenes["nested"].source == "user"


def test_names_and_paths_are_validated(tmp_path):
    with pytest.raises(CoreError, match=r"unknown scene 'atlantis' \(known scenes: .*etoile"):
        resolve_scene("atlantis", tmp_path)
    outside = tmp_path.parent / "evil.xml"
    outside.write_text("<scene/>")
    with pytest.raises(CoreError, match="outside the scenes folder"):
        resolve_scene(str(outside), tmp_path)
    with pytest.raises(CoreError, match="outside the scenes folder"):
        resolve_scene("../evil.xml", tmp_path)
    with pytest.raises(CoreError, match="invalid name"):
        resolve_scene("bad name!", tmp_path)
    (tmp_path / "ok.xml").write_text("<scene/>")
    assert resolve_scene("ok.xml", tmp_path).source == "user"


@pytest.mark.sionna
def test_geometry_for_drawing_round_trips():
    geo = scene_geometry("simple_street_canyon")
    assert len(geo.buildings) >= 4
    x0, y0, z0, x1, y1, z1 = geo.bbox
    for b in geo.buildings:
        assert b.footprint.ndim == 2 and b.footprint.shape[1] == 2 and len(b.footprint) >= 3
        assert b.height > b.base
        assert (b.footprint[:, 0] >= x0 - 1e-3).all() and (b.footprint[:, 0] <= x1 + 1e-3).all()
    assert 3 <= len(geo.sites) <= 6
    for s in geo.sites:
        x, y, z = s["position"]
        assert x0 - 2 <= x <= x1 + 2 and y0 - 2 <= y <= y1 + 2 and z > 0
    back = SceneGeometry.from_dict(geo.to_dict())
    assert back.name == geo.name and back.bbox == geo.bbox and back.sites == geo.sites
    np.testing.assert_allclose(back.buildings[0].footprint, geo.buildings[0].footprint)


def test_automatic_layout_spreads_sites_on_high_roofs():
    from core.raytracing.scenes import Building

    rng = np.random.default_rng(0)
    buildings = []
    for k in range(40):
        c = rng.uniform(-200, 200, 2)
        square = c + np.array([[-5, -5], [5, -5], [5, 5], [-5, 5]])
        buildings.append(Building(f"b{k}", square, float(rng.uniform(10, 40)), 0.0))
    sites = automatic_layout(buildings, (-210, -210, 0, 210, 210, 40), num_sites=5)
    assert len(sites) == 5
    pos = np.array([s["position"] for s in sites])
    d = np.linalg.norm(pos[:, None, :2] - pos[None, :, :2], axis=-1) + np.eye(5) * 1e9
    assert d.min() > 60  # spread out
    heights = sorted(b.height for b in buildings)
    assert (pos[:, 2] >= np.median(heights)).all()  # on the taller half of the roofs
    assert sites == automatic_layout(buildings, (-210, -210, 0, 210, 210, 40), num_sites=5)  # deterministic


def test_yaml_override(tmp_path):
    (tmp_path / "town.yaml").write_text("sites:\n  - {name: a, position: [0, 0, 30]}\n  - {position: [10, 5, 25]}\n")
    assert sites_override("town", tmp_path) == [{"name": "a", "position": [0.0, 0.0, 30.0]},
                                                {"name": "site1", "position": [10.0, 5.0, 25.0]}]
    assert sites_override("other", tmp_path) is None
    (tmp_path / "bad.yaml").write_text("sites:\n  - {name: a, position: [0, 0]}\n")
    with pytest.raises(ConfigError, match="bad.yaml.*position"):
        sites_override("bad", tmp_path)
