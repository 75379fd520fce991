"""Radio-map generation with real Sionna RT on a tiny scene (no mocks)."""

from __future__ import annotations

import numpy as np
import pytest

from core.cli import main
from core.features import wrap_degrees
from core.raytracing.tracing import SPEED_OF_LIGHT, PropagationSettings, RadioConfig, line_of_sight, trace_points
from core.stores.radio_map import SITE_LAYERS, RadioMap

pytestmark = pytest.mark.sionna


def _grid(m):
    x, y = m.cell_centers()
    gx, gy = np.meshgrid(x, y)  # row i = y
    return np.stack([gx, gy, m.ground + RadioConfig().rx_height_m], axis=-1)  # the map follows the terrain


def _sites(m):
    return np.array([s["position"] for s in m.attrs["sites"]], dtype=np.float64)


def _off_node_cells(m, count, seed=0):
    """Random covered outdoor cells that are NOT PathSolver nodes (their values are reconstructed)."""
    f = m.attrs["generator"]["toa_decimation"]
    h, w = m.shape
    ii, jj = np.nonzero(m.valid)
    off = ((ii % f) != 0) & ((jj % f) != 0) & (ii < h - 1) & (jj < w - 1)
    pick = np.random.default_rng(seed).choice(np.flatnonzero(off), size=min(count, off.sum()), replace=False)
    return ii[pick], jj[pick]


def test_grid_is_centred_with_outer_edge_bounds(tiny_map, tiny_map_settings):
    x_min, y_min, x_max, y_max = tiny_map.bounds
    assert tiny_map.shape == (64, 64)
    assert x_max - x_min == pytest.approx(64 * 2.0) and y_max - y_min == pytest.approx(64 * 2.0)
    cx, cy = tiny_map.attrs["generator"]["center"]
    assert (x_min + x_max) / 2 == pytest.approx(cx) and (y_min + y_max) / 2 == pytest.approx(cy)
    assert tiny_map.valid.mean() > 0.3  # most of the street is covered
    assert tiny_map.attrs["generator"]["node_spacing_m"] == pytest.approx(8.0)
    assert tiny_map.attrs["generator"]["node_grid"] == [17, 17]  # rows 0, 4, ..., 60 and 63
    assert PropagationSettings.from_dict(tiny_map.attrs["propagation"]) == tiny_map_settings.propagation


def test_per_site_layer_contract(tiny_map):
    n_sites = len(tiny_map.attrs["sites"])
    assert set(tiny_map.layers) == set(SITE_LAYERS)
    pg, toa, aoa = (tiny_map.layers[name] for name in SITE_LAYERS)
    for layer in (pg, toa, aoa):
        assert layer.shape == (n_sites, 64, 64) and layer.dtype == np.float32
        np.testing.assert_array_equal(np.isnan(layer), np.isnan(pg))  # one NaN mask: no path to the cell
    assert not np.isfinite(pg[:, ~tiny_map.valid]).any()  # nothing where no site reaches or under roofs
    assert np.isfinite(pg[:, tiny_map.valid]).any(axis=0).all()
    a = aoa[np.isfinite(aoa)]
    assert (a > -180).all() and (a <= 180).all()
    assert (pg[np.isfinite(pg)] < -20).all()
    # every site covers part of the street, and not only where it serves
    assert (np.isfinite(pg).mean(axis=(1, 2)) > 0.1).all()


def test_serving_features_are_the_strongest_sites_layers(tiny_map):
    v = tiny_map.valid
    pg = np.nan_to_num(tiny_map.layers["site_path_gain"], nan=-np.inf)
    serving = pg.argmax(axis=0)
    for feature, layer in (("path_gain", "site_path_gain"), ("toa", "site_toa"), ("aoa", "site_aoa")):
        own = np.take_along_axis(tiny_map.layers[layer], serving[None], 0)[0]
        np.testing.assert_array_equal(tiny_map.feature(feature)[v], own[v])


def test_site_layers_match_pathsolver_off_the_nodes(tiny_map, tiny_scene):
    """Independent check: PathSolver traced afresh at cells the map only reconstructed."""
    ii, jj = _off_node_cells(tiny_map, 300)
    xyz = _grid(tiny_map)[ii, jj]
    traced = trace_points(tiny_scene, xyz, PropagationSettings.from_dict(tiny_map.attrs["propagation"]))
    sites = _sites(tiny_map)
    p, s = np.nonzero(np.isfinite(traced["path_gain"]))
    got = {name: tiny_map.layers[name][s, ii[p], jj[p]] for name in SITE_LAYERS}
    assert np.isfinite(got["site_toa"]).mean() > 0.95  # the map covers where PathSolver finds paths
    ok = np.isfinite(got["site_toa"])
    p, s = p[ok], s[ok]
    d_toa = got["site_toa"][ok] - traced["toa"][p, s]
    d_aoa = wrap_degrees(got["site_aoa"][ok] - traced["aoa"][p, s])
    d_pg = got["site_path_gain"][ok] - traced["path_gain"][p, s]
    # nodes 8 m apart here (2 m on the shipped map); with diffraction the strongest path
    # changes more often between nodes (about half the canyon's strongest paths are diffracted)
    assert np.median(np.abs(d_toa)) < 0.05 and np.mean(np.abs(d_toa) < 1.0) > 0.85
    assert np.median(np.abs(d_aoa)) < 0.05 and np.mean(np.abs(d_aoa) < 2.0) > 0.85
    # the total gain is interpolated between nodes 8 m apart here (2 m on the shipped map): looser
    assert np.median(np.abs(d_pg)) < 1.0 and np.mean(np.abs(d_pg) < 3.0) > 0.8
    # where PathSolver's strongest path is the direct one, the map's ToA is the distance / c
    direct = np.linalg.norm(traced["image"][p, s] - sites[s], axis=-1) < 0.1
    assert direct.sum() > 50
    dist_ns = np.linalg.norm(sites[s] - xyz[p], axis=-1) / SPEED_OF_LIGHT * 1e9
    assert np.mean(np.abs(got["site_toa"][ok][direct] - dist_ns[direct]) < 0.01) > 0.95
    assert np.mean(np.abs(traced["toa"][p, s][direct] - dist_ns[direct]) < 0.01) > 0.99


def _pattern_gain_db(theta, tilt_deg):
    """The site antenna's gain [dB] at zenith angle ``theta`` [rad] (tracing's docstring formula)."""
    t = np.linspace(0.0, np.pi, 20001)
    tilt = np.radians(tilt_deg)
    a = lambda th: -np.minimum(12.0 * ((th - np.pi / 2 - tilt) / np.radians(65.0)) ** 2, 30.0)  # noqa: E731
    norm = np.trapezoid(10 ** (a(t) / 10) * np.sin(t), t) * 2 * np.pi / (4 * np.pi)
    return a(theta) - 10 * np.log10(norm)


def test_path_gain_is_at_least_friis_where_the_site_is_seen(tiny_map, tiny_scene):
    """Independent check: the direct path alone gives Friis with the antenna pattern (numpy, no Sionna)."""
    radio = RadioConfig()
    lam = SPEED_OF_LIGHT / radio.frequency_hz
    xyz = _grid(tiny_map)
    for s, site in enumerate(_sites(tiny_map)):
        pg = tiny_map.layers["site_path_gain"][s]
        cov = np.isfinite(pg)
        pts = xyz[cov]
        los = line_of_sight(tiny_scene, pts, site)
        d = np.linalg.norm(site - pts, axis=-1)
        theta = np.arccos((pts[:, 2] - site[2]) / d)  # zenith angle of departure (down = > 90 deg)
        friis = 20 * np.log10(lam / (4 * np.pi * d)) + _pattern_gain_db(theta, radio.downtilt_deg)
        excess = pg[cov][los] - friis[los]
        assert los.sum() > 30
        # the other paths only add power; a depth-2 canyon adds a few dB at most
        assert np.quantile(excess, 0.05) > -0.5, s
        assert 0.0 < np.median(excess) < 6.0, s


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
            "--scenes-dir", str(scenes), "--radio-maps", str(out), "--resolution", "8", "--map-size", "16", "16",
            "--samples-per-tx", "20000", "--toa-decimation", "8"]
    rc = main(argv)
    text = capsys.readouterr().out
    assert rc == 2  # some scenes failed
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
                                          (["--resolution", "-1"], "--resolution"),
                                          (["--retry-samples-per-tx", "-5"], "--retry-samples-per-tx")])
def test_cli_refuses_bad_grid(tmp_path, capsys, bad, message):
    with pytest.raises(SystemExit) as exit_:  # argparse's exit, from the checked flag types (core.cli_types)
        main(["generate-maps", "--scenes", "simple_street_canyon", "--radio-maps", str(tmp_path)] + bad)
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err
    assert not any(tmp_path.iterdir())
