"""Radio-map generation with real Sionna RT on a tiny scene (no mocks)."""

from __future__ import annotations

import numpy as np
import pytest

from core.cli import main
from core.features import wrap_degrees
from core.raytracing.tracing import SPEED_OF_LIGHT, RadioConfig, line_of_sight
from core.stores.radio_map import RadioMap

pytestmark = pytest.mark.sionna


def _grid(m):
    x, y = m.cell_centers()
    gx, gy = np.meshgrid(x, y)  # row i = y
    return np.stack([gx, gy, np.full_like(gx, RadioConfig().rx_height_m)], axis=-1)


def _serving_site(m):
    sites = np.array([s["position"] for s in m.attrs["sites"]])
    layer = np.nan_to_num(m.layers["site_path_gain"], nan=-np.inf)
    return sites[layer.argmax(axis=0)]  # [H, W, 3]


def test_grid_is_centred_with_outer_edge_bounds(tiny_map, tiny_map_settings):
    x_min, y_min, x_max, y_max = tiny_map.bounds
    assert tiny_map.shape == (64, 64)
    assert x_max - x_min == pytest.approx(64 * 2.0) and y_max - y_min == pytest.approx(64 * 2.0)
    cx, cy = tiny_map.attrs["generator"]["center"]
    assert (x_min + x_max) / 2 == pytest.approx(cx) and (y_min + y_max) / 2 == pytest.approx(cy)
    assert tiny_map.valid.mean() > 0.3  # most of the street is covered
    assert tiny_map.attrs["generator"]["toa_aoa_resolution_m"] == pytest.approx(8.0)
    assert set(tiny_map.layers) == {"site_path_gain"}
    assert tiny_map.layers["site_path_gain"].shape == (len(tiny_map.attrs["sites"]), 64, 64)


def test_path_gain_range_where_covered(tiny_map):
    pg = tiny_map.feature("path_gain")[tiny_map.valid]
    assert np.isfinite(pg).all()
    assert pg.min() >= -250 and pg.max() <= -20


def test_serving_is_strongest_site_layer(tiny_map):
    layer = np.nan_to_num(tiny_map.layers["site_path_gain"], nan=-np.inf).max(axis=0)
    v = tiny_map.valid
    np.testing.assert_allclose(tiny_map.feature("path_gain")[v], layer[v], atol=1e-3)


def test_toa_not_shorter_than_distance(tiny_map):
    v = tiny_map.valid
    d = np.linalg.norm(_serving_site(tiny_map) - _grid(tiny_map), axis=-1)
    toa_m = tiny_map.feature("toa") * 1e-9 * SPEED_OF_LIGHT
    assert (toa_m[v] >= d[v] - tiny_map.cell_size).all()


def test_aoa_points_back_to_serving_site_in_los(tiny_map, tiny_scene):
    xyz = _grid(tiny_map)
    site = _serving_site(tiny_map)
    v = tiny_map.valid
    pts, tgt = xyz[v], site[v]
    los = np.zeros(len(pts), bool)
    for s in np.unique(tgt, axis=0):  # one LOS test per site
        sel = (tgt == s).all(1)
        los[sel] = line_of_sight(tiny_scene, pts[sel], s)
    assert los.sum() > 50
    expected = np.degrees(np.arctan2(tgt[:, 1] - pts[:, 1], tgt[:, 0] - pts[:, 0]))
    err = np.abs(wrap_degrees(tiny_map.feature("aoa")[v] - expected))[los]
    assert np.median(err) < 1.0
    assert np.mean(err <= 10.0) >= 0.95


def test_sinr_bler_throughput(tiny_map):
    v = tiny_map.valid
    snr, sinr = tiny_map.feature("snr")[v], tiny_map.feature("sinr")[v]
    assert (sinr <= snr + 1e-4).all()
    bler = tiny_map.feature("bler")[v]
    assert (bler >= 0).all() and (bler <= 1).all()
    thr = tiny_map.feature("throughput")[v]
    assert (thr >= 0).all()
    # throughput rises with SINR: mean throughput per 5-dB SINR bin never drops
    order = np.argsort(sinr)
    bins = np.array_split(order, 8)
    means = [thr[b].mean() for b in bins]
    assert all(b >= a - 1e-3 for a, b in zip(means, means[1:]))
    assert means[-1] > means[0]
    aoa = tiny_map.feature("aoa")[v]
    assert (aoa > -180).all() and (aoa <= 180).all()


def test_cli_reports_bad_scenes_and_still_generates_good_ones(tmp_path, capsys):
    scenes = tmp_path / "scenes"
    scenes.mkdir()
    (scenes / "broken.xml").write_text("<scene version='2.1.0'><shape type='ply'>")
    outside = tmp_path / "outside.xml"
    outside.write_text("<scene version='2.1.0'/>")
    out = tmp_path / "maps"
    argv = ["generate-maps", "--scenes", "simple_street_canyon", "no_such_scene", "broken", str(outside),
            "--scenes-dir", str(scenes), "--output-dir", str(out), "--resolution", "8", "--map-size", "16", "16",
            "--samples-per-tx", "20000", "--toa-decimation", "8"]
    rc = main(argv)
    text = capsys.readouterr().out
    assert rc == 1
    assert (out / "simple_street_canyon.zarr").exists()
    m = RadioMap.load(out / "simple_street_canyon.zarr")
    assert m.shape == (16, 16)
    summary = text.split("summary:")[1]
    assert "unknown scene 'no_such_scene'" in summary and "simple_street_canyon" in summary
    assert "broken" in summary and "cannot load" in summary
    assert "outside the scenes folder" in summary
    assert "3 of 4 scene(s) failed" in text
    assert sorted(p.name for p in out.iterdir()) == ["simple_street_canyon.zarr"]  # atomic: no temp dirs left

    # existing maps are skipped unless --force
    stamp = (out / "simple_street_canyon.zarr" / "zarr.json").stat().st_mtime_ns
    assert main(argv[:3] + argv[6:]) == 0
    assert "skipped" in capsys.readouterr().out
    assert (out / "simple_street_canyon.zarr" / "zarr.json").stat().st_mtime_ns == stamp


@pytest.mark.parametrize("bad, message", [(["--map-size", "0", "16"], "--map-size"),
                                          (["--resolution", "-1"], "--resolution")])
def test_cli_refuses_bad_grid(tmp_path, capsys, bad, message):
    rc = main(["generate-maps", "--scenes", "simple_street_canyon", "--output-dir", str(tmp_path)] + bad)
    assert rc == 2
    assert message in capsys.readouterr().err
    assert not any(tmp_path.iterdir())
