"""Radio-map store: Zarr round trip, validation of bad stores, atomic saves."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr

from core.errors import StoreError
from core.physics.synthetic import analytic_radio_map
from core.stores.radio_map import RadioMap

REPO = Path(__file__).resolve().parents[1]


def holey_map() -> RadioMap:
    rm = analytic_radio_map(height=10, width=14, bounds=(-14.0, 0.0, 14.0, 20.0))
    values = rm.values.copy()
    valid = np.ones(rm.shape, dtype=bool)
    valid[2:4, 5:9] = False
    values[:, ~valid] = np.nan
    values[0, 2, 5] = -np.inf
    layers = {"site_path_gain": np.random.default_rng(0).normal(size=(3, 10, 14)).astype(np.float32)}
    return RadioMap(values, rm.features, rm.bounds, valid=valid, attrs={**rm.attrs, "note": "test"}, layers=layers)


@pytest.fixture
def saved(tmp_path) -> tuple[RadioMap, Path]:
    rm = holey_map()
    return rm, rm.save(tmp_path / "scene.zarr")


def test_round_trip(saved):
    rm, path = saved
    back = RadioMap.load(path)
    np.testing.assert_array_equal(back.values, rm.values)  # NaN/-inf in holes survive too
    np.testing.assert_array_equal(back.valid, rm.valid)
    assert back.features == rm.features and back.bounds == rm.bounds
    assert back.attrs == rm.attrs and back.cell_size == rm.cell_size
    np.testing.assert_array_equal(back.layers["site_path_gain"], rm.layers["site_path_gain"])
    assert back.values.dtype == np.float32 and back.valid.dtype == np.bool_
    for name in rm.features:
        assert back.stats[name] == rm.stats[name]
    assert str(path) in back.source


def test_missing_store_names_the_path(tmp_path):
    path = tmp_path / "nowhere.zarr"
    with pytest.raises(StoreError, match="nowhere.zarr.*no such store"):
        RadioMap.load(path)


def test_garbage_in_a_chunk_file(saved):
    _, path = saved
    chunk = next(p for p in (path / "values" / "c").rglob("*") if p.is_file())
    chunk.write_bytes(b"\x00garbage, not zstd\xff" * 5)
    with pytest.raises(StoreError, match=f"{path.name}.*corrupt"):
        RadioMap.load(path)


def test_garbage_in_the_group_metadata(saved):
    _, path = saved
    (path / "zarr.json").write_text("{ this is not json")
    with pytest.raises(StoreError, match=f"{path.name}.*not a readable Zarr group"):
        RadioMap.load(path)


def test_garbage_in_an_array_metadata(saved):
    _, path = saved
    (path / "values" / "zarr.json").write_text("]]]")
    with pytest.raises(StoreError, match=path.name):
        RadioMap.load(path)


def _edit_attrs(path: Path, **changes) -> None:
    meta_file = path / "zarr.json"
    meta = json.loads(meta_file.read_text())
    for key, value in changes.items():
        if value is None:
            meta["attributes"].pop(key, None)
        else:
            meta["attributes"][key] = value
    meta_file.write_text(json.dumps(meta))


def _replace_array(path: Path, name: str, data: np.ndarray) -> None:
    group = zarr.open_group(store=str(path), mode="r+")
    group.create_array(name, data=data, overwrite=True)


@pytest.mark.parametrize(
    "change,message",
    [
        (dict(format_version=99), "format version 99"),
        (dict(kind="measurement_dataset"), "not a radio-map store"),
        (dict(bounds=None), "lack 'bounds'"),
        (dict(features=None), "lack 'features'"),
        (dict(bounds=[14.0, 0.0, -14.0, 20.0]), "x_max > x_min"),
        (dict(bounds=[-14.0, 0.0, 14.0, 99.0]), "square"),
        (dict(features=["path_gain", "toa", "aoa", "snr", "sinr", "throughput", "rsrp"]), "unknown feature 'rsrp'"),
        (dict(features=["path_gain", "toa"]), "2 feature names for 7 channels"),
    ],
)
def test_inconsistent_attributes(saved, change, message):
    _, path = saved
    _edit_attrs(path, **change)
    with pytest.raises(StoreError, match=message) as info:
        RadioMap.load(path)
    assert str(path) in str(info.value)


def test_inconsistent_arrays(saved):
    rm, path = saved
    cases = [
        ("values", rm.values.astype(np.float64), "float32"),
        ("values", rm.values[0], r"\[F, H, W\]"),
        ("valid", rm.valid.astype(np.uint8), "valid must be bool"),
        ("valid", rm.valid[:5], "valid must be bool"),
    ]
    for k, (name, data, message) in enumerate(cases):
        fresh = rm.save(path.parent / f"case{k}.zarr")
        _replace_array(fresh, name, data)
        with pytest.raises(StoreError, match=message) as info:
            RadioMap.load(fresh)
        assert str(fresh) in str(info.value)


def test_nan_inside_the_mask(saved):
    rm, path = saved
    values = rm.values.copy()
    values[3, 0, 0] = np.nan  # (0, 0) is covered
    _replace_array(path, "values", values)
    with pytest.raises(StoreError, match="NaN or inf inside the coverage mask in feature\\(s\\) snr") as info:
        RadioMap.load(path)
    assert str(path) in str(info.value)


def test_missing_array(saved):
    _, path = saved
    import shutil

    shutil.rmtree(path / "valid")
    with pytest.raises(StoreError, match=f"{path.name}.*missing array"):
        RadioMap.load(path)


def test_interrupted_save_keeps_the_old_map(saved, monkeypatch):
    old, path = saved
    new = analytic_radio_map(height=10, width=14, bounds=(0.0, 0.0, 28.0, 20.0))
    real = zarr.Group.create_array
    calls = []

    def failing(self, name, *args, **kwargs):
        calls.append(name)
        if name == "valid":  # after "values" was written: a half map on disk
            raise OSError("disk full (simulated)")
        return real(self, name, *args, **kwargs)

    monkeypatch.setattr(zarr.Group, "create_array", failing)
    with pytest.raises(OSError, match="disk full"):
        new.save(path)
    monkeypatch.undo()
    assert calls[:2] == ["values", "valid"]
    back = RadioMap.load(path)
    np.testing.assert_array_equal(back.values, old.values)
    assert back.bounds == old.bounds
    assert sorted(p.name for p in path.parent.iterdir()) == ["scene.zarr"]  # no temp dirs behind


def test_killed_save_keeps_the_old_map(saved):
    old, path = saved
    script = f"""
import os, signal, sys
sys.path.insert(0, {str(REPO)!r})
import zarr
from core.physics.synthetic import analytic_radio_map
real = zarr.Group.create_array
def killer(self, name, *a, **k):
    if name == "valid":
        os.kill(os.getpid(), signal.SIGKILL)
    return real(self, name, *a, **k)
zarr.Group.create_array = killer
analytic_radio_map(height=10, width=14, bounds=(0.0, 0.0, 28.0, 20.0)).save({str(path)!r})
"""
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert proc.wait(timeout=120) == -signal.SIGKILL
    back = RadioMap.load(path)
    np.testing.assert_array_equal(back.values, old.values)
    assert back.bounds == old.bounds
    leftovers = [p.name for p in path.parent.iterdir() if p.name != "scene.zarr"]
    # hidden (never mistaken for a map) and named after the dead writer
    assert leftovers and all(name.startswith(f".scene.zarr.tmp-{proc.pid}-") for name in leftovers)
    old.save(path)  # the next save removes the dead writer's temp
    assert sorted(os.listdir(path.parent)) == ["scene.zarr"]


def test_overwrite_replaces_the_map(saved):
    _, path = saved
    new = analytic_radio_map(height=10, width=14, bounds=(0.0, 0.0, 28.0, 20.0))
    new.save(path)
    assert RadioMap.load(path).bounds == (0.0, 0.0, 28.0, 20.0)
    assert sorted(os.listdir(path.parent)) == ["scene.zarr"]


def test_old_format_is_refused_with_the_command_that_remakes_it(saved):
    rm, path = saved
    _edit_attrs(path, format_version=1)
    with pytest.raises(StoreError) as info:
        RadioMap.load(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message and "format version 1 is older" in message
    h, w = rm.shape
    x_min, y_min, x_max, y_max = rm.bounds
    assert message.endswith(
        f"regenerate it with `python -m core generate-maps --scenes {rm.attrs['scene']} --radio-maps {path.parent} "
        f"--resolution {rm.cell_size:g} --map-size {h} {w} --center {(x_min + x_max) / 2:g} {(y_min + y_max) / 2:g} "
        "--force`")


def test_per_site_layers_must_have_one_plane_per_site(saved):
    rm, _ = saved
    layers = {"site_path_gain": np.zeros((3,) + rm.shape, np.float32), "site_toa": np.zeros((2,) + rm.shape, np.float32)}
    with pytest.raises(StoreError, match="disagree on the number of sites"):
        RadioMap(rm.values, rm.features, rm.bounds, valid=rm.valid, layers=layers)
    sites = [{"name": f"s{k}", "position": [0.0, 0.0, 10.0]} for k in range(2)]
    with pytest.raises(StoreError, match="one plane per site"):
        RadioMap(rm.values, rm.features, rm.bounds, valid=rm.valid, attrs={"sites": sites},
                 layers={"site_path_gain": layers["site_path_gain"]})


def test_outdoor_mask_and_ground_round_trip_and_outdoor_coverage(tmp_path):
    rm = holey_map()
    outdoor = np.ones(rm.shape, bool)
    outdoor[2:4, 5:8] = False  # under a roof: never covered
    ground = np.linspace(0.0, 5.0, rm.shape[0] * rm.shape[1], dtype=np.float32).reshape(rm.shape)
    terrain = RadioMap(rm.values, rm.features, rm.bounds, valid=rm.valid, attrs=rm.attrs, layers=rm.layers,
                       outdoor=outdoor, ground=ground)
    back = RadioMap.load(terrain.save(tmp_path / "t.zarr"))
    np.testing.assert_array_equal(back.outdoor, outdoor)
    np.testing.assert_array_equal(back.ground, ground)
    assert back.outdoor_coverage == pytest.approx(rm.valid.sum() / outdoor.sum())
    assert back.coverage_text().endswith("of outdoor cells")
    assert rm.outdoor_coverage is None and rm.coverage_text().endswith("of all cells")
    roofed = outdoor.copy()
    roofed[0, 0] = False  # a covered cell under a roof
    with pytest.raises(StoreError, match="outside the outdoor mask"):
        RadioMap(rm.values, rm.features, rm.bounds, valid=rm.valid, outdoor=roofed)


def test_format_2_store_still_loads_without_outdoor_mask(saved):
    rm, path = saved
    _edit_attrs(path, format_version=2)
    old = RadioMap.load(path)
    assert old.outdoor is None and old.ground is None
    np.testing.assert_array_equal(old.valid, rm.valid)
