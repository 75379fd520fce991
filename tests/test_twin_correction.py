"""correct-map: per-site residual fields fitted to labelled walks (core.physics.twin_correction).

The world is an analytic twin with known errors added to the dataset's per-site slots: site 0's ToA
+20 ns, site 1's path gain +5 dB, site 2's AoA +179 deg (its residuals straddle the +-180 seam, where a
linear mean would land near 0). The fitted fields must recover them where walks went, and leave the
other (site, feature) pairs near 0.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from core import REPO_ROOT
from core.features import wrap_degrees

BIAS = {(0, 1): 20.0, (1, 0): 5.0, (2, 2): 179.0}  # (site, feature) -> the world's offset from the twin


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """``(twin map, dataset)`` saved under a temp root: the dataset records the twin, its slots carry BIAS."""
    from core.physics.synthetic import analytic_radio_map, synthetic_dataset
    from core.stores.radio_map import RadioMap

    root = tmp_path_factory.mktemp("twin")
    twin = analytic_radio_map(32, 32, (-64.0, -64.0, 64.0, 64.0))
    twin = RadioMap(twin.values, twin.features, twin.bounds, valid=twin.valid, attrs={**twin.attrs, "scene": "twin"},
                    layers=twin.layers)
    twin.save(root / "radio_maps" / "twin.zarr")
    ds = synthetic_dataset(twin, 500, reports=8, k=3, seed=1)
    for (site, f), offset in BIAS.items():
        for arr in (ds.site_features, ds.clean_site_features):
            sel = ds.site_ids == site
            arr[..., f][sel] += offset
            if f == 2:
                arr[..., f][sel] = wrap_degrees(arr[..., f][sel])
    ds.save(root / "datasets" / "twin")
    return root, twin, ds


def test_fields_recover_the_worlds_offsets_and_the_circle(world):
    from core.physics.twin_correction import correct_map, fit_corrections

    _, twin, ds = world
    corr = fit_corrections(ds, twin)
    assert corr.fields.shape == (3, 3, 32, 32) and corr.fit_reports > 2000
    dense = corr.counts >= 3  # [S, H, W] cells where walks went
    for site in range(3):
        for f in range(3):
            got = corr.fields[f, site][dense[site]]
            want = BIAS.get((site, f), 0.0)
            diff = wrap_degrees(got - want) if f == 2 else got - want
            tol = {0: 1.5, 1: 3.0, 2: 4.0}[f]  # noise 2 dB, 3 ns, 5 deg over a few reports
            assert abs(float(np.median(diff))) < tol, (site, f, float(np.median(got)))
    for name in ("toa", "path_gain", "aoa"):
        c = corr.choices[name]
        assert c.val_loss_corrected < c.val_loss_twin and c.bandwidth_m > 0  # chosen on val, and it helps there
    few = fit_corrections(ds, twin, walks=50, walks_seed=1)
    assert few.fit_walks == 50 and few.walks_seed == 1 and few.fit_reports < corr.fit_reports / 5
    assert few.record({}, {})["fit_walks"] == 50 and corr.record({}, {})["walks_seed"] is None
    assert 0 < few.reach < corr.reach <= 1  # fewer walks come near fewer cells
    fixed = correct_map(twin, corr, {"note": "test"})
    assert fixed.attrs["twin_correction"] == {"note": "test"} and fixed.attrs["sites"] == twin.attrs["sites"]
    np.testing.assert_array_equal(fixed.values, twin.values)  # the serving channels stay the twin's
    for name in ("site_path_gain", "site_toa", "site_aoa"):
        np.testing.assert_array_equal(np.isnan(fixed.layers[name]), np.isnan(twin.layers[name]))
    aoa = fixed.layers["site_aoa"]
    assert np.nanmax(np.abs(aoa)) <= 180.0


def test_command_writes_a_map_the_dataset_accepts_and_guards_its_output(world, tmp_path, capsys):
    from core.stores.lineage import check_map_override
    from core.stores.radio_map import RadioMap

    root, _, ds = world
    out = root / "radio_maps" / "corrected" / "twin.zarr"  # the default: a maps folder of its own
    base = [sys.executable, "-m", "core", "correct-map", "--dataset", str(root / "datasets" / "twin"),
            "--radio-maps", str(root / "radio_maps")]
    done = subprocess.run(base, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "val robust std" in done.stdout and "| toa [ns] |" in done.stdout
    fixed = RadioMap.load(out)
    record = fixed.attrs["twin_correction"]
    assert record["dataset"]["id"] == ds.lineage.id and record["fit_split"] == "train"
    from core.physics.twin_correction import check_lines

    worse = {"walks": 9, "twin": {"median_m": 1.0, "p90_m": 2.0, "beyond_20m": 0.0},
             "corrected": {"median_m": 1.5, "p90_m": 2.0, "beyond_20m": 0.0}}
    assert [ln.split(":")[0] for ln in check_lines({"localization_check": worse})][1] == "warning"
    assert len(check_lines(record)) == 1 and check_lines({}) == []
    check = record["localization_check"]  # the val walks localized against both maps, printed and recorded
    assert check["walks"] == len(ds.indices("val")) and "exhaustive map matching of" in done.stdout
    assert check["corrected"]["median_m"] < check["twin"]["median_m"]  # the world's offsets are worth metres
    check_map_override(ds.ref, fixed.ref)  # evaluate / consistency --radio-map take it for this dataset
    from core.cli import main

    def refused(args, capsys) -> str:
        assert main(base[3:] + args) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1, err
        return err

    assert "exists (use --force" in refused(["--out", str(out)], capsys)
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep")
    assert "nothing was deleted" in refused(["--out", str(foreign), "--force"], capsys)
    assert (foreign / "notes.txt").read_text() == "keep"
    assert "read-only" in refused(["--out", "radio_maps/etoile.zarr", "--force"], capsys)
    plain = tmp_path / "plain.zarr"  # a radio map correct-map did not make (generate-maps' kind): --force keeps it
    saved = RadioMap.load(root / "radio_maps" / "twin.zarr")  # a copy: the module's twin keeps its own lineage
    saved.save(plain)
    assert "nothing was deleted" in refused(["--out", str(plain), "--force"], capsys)
    assert RadioMap.load(plain).lineage.id == saved.lineage.id
    assert main(base[3:] + ["--out", str(out), "--force", "--check-walks", "0"]) == 0  # its own output: replaced
    capsys.readouterr()


def test_a_corrected_map_stands_in_for_its_twin_only(world, tmp_path):
    """``radio_maps_dir: <maps>/corrected`` trains and evaluates against the correction of the dataset's own map;
    a correction of another save is refused, and so is a spatial split of the dataset the map was fitted to."""
    from core.errors import ConfigError, StoreError
    from core.learning.config import Config
    from core.learning.scene_data import apply_data_config, load_stores
    from core.physics.twin_correction import correct_map, fit_corrections
    from core.stores.lineage import map_path

    root, twin, ds = world
    corr = fit_corrections(ds, twin)
    fixed = correct_map(twin, corr, corr.record(ds.ref.to_dict(), twin.ref.to_dict()))
    fixed.save(map_path(tmp_path / "corrected", "twin"))
    loaded_ds, loaded_map = load_stores(root / "datasets" / "twin", tmp_path / "corrected")
    assert loaded_map.attrs["twin_correction"]["twin"]["id"] == twin.lineage.id
    config = Config()
    assert apply_data_config(config, loaded_ds, loaded_map).num_samples == ds.num_samples  # random split: fine
    config.data.split = "spatial"
    with pytest.raises(ConfigError, match="fitted to the stored 'train' split of this dataset"):
        apply_data_config(config, loaded_ds, loaded_map)
    other = correct_map(twin, corr, corr.record(ds.ref.to_dict(), {"path": "elsewhere", "id": "0" * 32}))
    other.save(map_path(tmp_path / "other", "twin"))
    with pytest.raises(StoreError, match="is not the map dataset"):
        load_stores(root / "datasets" / "twin", tmp_path / "other")
    from core.stores.lineage import check_map_override
    from core.stores.radio_map import RadioMap

    for value, ok in ((0, True), (2, False)):  # a setting added later reads as off where it is absent
        later = RadioMap(fixed.values, fixed.features, fixed.bounds, valid=fixed.valid, layers=fixed.layers,
                         attrs={**fixed.attrs, "propagation": {"retry_samples_per_src": value}})
        later.save(tmp_path / f"later{value}" / "twin.zarr")
        if ok:
            check_map_override(ds.ref, later.ref)
        else:
            with pytest.raises(StoreError, match="other propagation"):
                check_map_override(ds.ref, later.ref)
