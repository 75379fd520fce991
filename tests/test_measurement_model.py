"""The measurement-model record: flags, one-line errors, the store's attrs, old stores, the job command.

No Sionna here: the knobs' effect on ray-traced data is checked in tests/test_measurements.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from core.cli import main
from core.errors import CoreError, StoreError
from core.jobs.manager import make_dataset_spec
from core.stores.dataset import MeasurementDataset, recorded_measurement_model
from core.stores.measurement_model import KNOBS, MeasurementModel

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("flag,value", [
    ("--noise-path-gain-db", "-1"), ("--noise-toa-ns", "abc"), ("--noise-aoa-deg", "nan"),
    ("--clock-offset-ns", "inf"), ("--clock-offset-ns", "-5"), ("--missing-rate", "1"), ("--missing-rate", "-0.1"),
    ("--sites-per-report", "0"), ("--sites-per-report", "2.5"), ("--sensitivity-dbm", "nan"),
    ("--sensitivity-dbm", "loud"), ("--motion-step-sigma", "-0.1"), ("--motion-step-sigma", "1.5"),
    ("--motion-heading-deg", "north"),
])
def test_a_bad_flag_is_one_line_naming_it(flag, value, tmp_path, capsys):
    argv = ["make-dataset", "--scene", "simple_street_canyon", "--out", str(tmp_path / "ds"), flag, value]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"error: {flag} ") and "Traceback" not in err, err
    assert not (tmp_path / "ds").exists()


def test_a_bad_flag_exits_2_from_the_entry_point(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "core", "make-dataset", "--scene", "etoile", "--out",
                           str(tmp_path / "ds"), "--missing-rate", "1.5"], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["error: --missing-rate must be a number in [0, 1), got 1.5"]


def test_flags_parse_and_write_back_the_same_model():
    model = MeasurementModel.from_flags({"toa_ns": "10", "missing_rate": "0.4", "sensitivity_dbm": "-120.5",
                                         "clock_offset_ns": "25", "sites_per_report": "3"})
    assert model == MeasurementModel(toa_ns=10.0, missing_rate=0.4, sensitivity_dbm=-120.5, clock_offset_ns=25.0,
                                     sites_per_report=3)
    args = model.cli_args()
    assert args[::2] == [knob.flag for knob in KNOBS.values()]
    assert MeasurementModel.from_flags(dict(zip(KNOBS, args[1::2], strict=True))) == model
    off = MeasurementModel.from_flags({"sensitivity_dbm": "off"})
    assert off.sensitivity_dbm is None and off.cli_args()[-2:] == ["--sensitivity-dbm", "off"]
    assert MeasurementModel.from_flags({}) == MeasurementModel()


def test_the_job_command_carries_every_knob():
    model = MeasurementModel(toa_ns=10.0, missing_rate=0.4, clock_offset_ns=5.0, sensitivity_dbm=None)
    spec = make_dataset_spec("etoile", "datasets/etoile", 500, 6, radio_maps="radio_maps", model=model, force=True)
    assert " ".join(spec.args) == (
        "make-dataset --scene etoile --num-ues 500 --reports 6 --out datasets/etoile --radio-maps radio_maps "
        "--noise-path-gain-db 2 --noise-toa-ns 10 --noise-aoa-deg 3 --clock-offset-ns 5 --missing-rate 0.4 "
        "--sites-per-report 4 --sensitivity-dbm off --force")
    assert make_dataset_spec("etoile", "d").args == ("make-dataset", "--scene", "etoile", "--num-ues", "20000",
                                                     "--reports", "8", "--out", "d")
    with pytest.raises(CoreError, match="--missing-rate"):
        make_dataset_spec("etoile", "d", model=MeasurementModel(missing_rate=1.0))


def test_the_shipped_dataset_records_the_default_model():
    path = REPO / "datasets" / "etoile"
    assert recorded_measurement_model(path) == MeasurementModel()
    assert MeasurementDataset.load(path).measurement_model == MeasurementModel()


def test_a_store_from_before_the_record_reads_as_its_noise_and_the_old_defaults(tmp_path):
    """A dataset written before attrs["measurement_model"]: its noise dict, K from its generator record, no
    clock offset, no sensitivity threshold."""
    ds = _analytic_dataset()
    ds.attrs.pop("measurement_model", None)
    path = ds.save(tmp_path / "old")
    meta = json.loads((path / "zarr.json").read_text())
    meta["attributes"]["attrs"]["noise"] = {"path_gain_db": 2.0, "toa_ns": 3.0, "aoa_deg": 3.0, "p_missing": 0.2}
    meta["attributes"]["attrs"]["generator"] = {"sites_per_report": 3}
    (path / "zarr.json").write_text(json.dumps(meta))
    old = MeasurementModel(path_gain_db=2.0, toa_ns=3.0, aoa_deg=3.0, clock_offset_ns=0.0, missing_rate=0.2,
                           sites_per_report=3, sensitivity_dbm=None)
    assert recorded_measurement_model(path) == old


def _analytic_dataset():
    from core.physics.synthetic import analytic_radio_map, synthetic_dataset

    return synthetic_dataset(analytic_radio_map(height=16, width=16, bounds=(0.0, 0.0, 64.0, 64.0)), 20, reports=3, k=3, seed=0)


def test_the_record_survives_save_and_load(tmp_path):
    ds = _analytic_dataset()
    assert ds.measurement_model is None  # an analytic dataset records none
    model = MeasurementModel(path_gain_db=1.0, toa_ns=0.0, clock_offset_ns=30.0, missing_rate=0.1,
                             sites_per_report=3, sensitivity_dbm=-110.0)
    ds.attrs["measurement_model"] = model.to_attrs()
    ds.save(tmp_path / "ds")
    assert MeasurementDataset.load(tmp_path / "ds").measurement_model == model
    assert recorded_measurement_model(tmp_path / "ds") == model


@pytest.mark.parametrize("record,needle", [
    ({"toa_ns": -1.0, "sites_per_report": 3}, "--noise-toa-ns"),
    ({"speed": 1.0, "sites_per_report": 3}, "unknown keys ['speed']"),
    ({"sites_per_report": 4}, "sites_per_report 4, but the arrays hold 3 site slots"),
])
def test_a_bad_record_is_a_store_error_naming_the_store(record, needle, tmp_path):
    ds = _analytic_dataset()
    ds.attrs["measurement_model"] = {"version": 1, **record}
    with pytest.raises(StoreError, match="dataset") as info:
        ds.validate()
    assert needle in str(info.value)
    ds.attrs.pop("measurement_model")
    path = ds.save(tmp_path / "ds")
    meta = json.loads((path / "zarr.json").read_text())  # written by another tool, or edited by hand
    meta["attributes"]["attrs"]["measurement_model"] = {"version": 1, **record}
    (path / "zarr.json").write_text(json.dumps(meta))
    with pytest.raises(StoreError, match=f"dataset {path}") as info:
        MeasurementDataset.load(path)
    assert needle in str(info.value)
    if "arrays" not in needle:  # the metadata-only reader checks the record, not the arrays
        with pytest.raises(StoreError, match=f"dataset {path}"):
            recorded_measurement_model(path)


# -- the device-motion channel (core/stores/motion_model.py) -----------------------------------
def _straight_walks(n=4000, t=8, seed=0):
    import numpy as np

    rng = np.random.default_rng(seed)
    v = rng.uniform(0.5, 1.5, n)[:, None] * np.stack([np.cos(h := rng.uniform(-np.pi, np.pi, n)), np.sin(h)], 1)
    times = 0.2 * np.arange(t)
    xyz = np.zeros((n, t, 3))
    xyz[..., :2] = rng.uniform(-50, 50, (n, 1, 2)) + times[None, :, None] * v[:, None, :]
    return xyz, np.broadcast_to(times, (n, t)), v


def test_device_motion_has_its_step_and_heading_errors_and_gives_the_velocity():
    """d̂ = (1 + ε) R(δ) d: the relative length error has σ S, the angle error σ H; noise-free motion
    gives the true velocity; the velocity's σ follows sqrt(S² + H²) / sqrt(T - 1)."""
    import numpy as np

    from core.stores.motion_model import MotionModel, velocity_measurement

    xyz, t, v = _straight_walks()
    model = MotionModel(step_sigma=0.1, heading_deg=10.0)
    motion = model.measure(xyz, seed=3)
    assert motion.dtype == np.float32 and motion.shape == (4000, 8, 2) and np.isnan(motion[:, 0]).all()
    true = np.diff(xyz[..., :2], axis=1)
    ratio = np.linalg.norm(motion[:, 1:], axis=-1) / np.linalg.norm(true, axis=-1)
    angle = np.angle((motion[:, 1:, 0] + 1j * motion[:, 1:, 1]) / (true[..., 0] + 1j * true[..., 1]), deg=True)
    assert (ratio - 1).std() == pytest.approx(0.1, rel=0.05) and angle.std() == pytest.approx(10.0, rel=0.05)
    np.testing.assert_array_equal(motion, model.measure(xyz, seed=3))  # its own seeded stream
    v_hat, sigma = velocity_measurement(MotionModel(1e-9, 0.0).measure(xyz, 0), t, MotionModel(1e-9, 0.0))
    np.testing.assert_allclose(v_hat, v, atol=1e-4)
    v_hat, sigma = velocity_measurement(motion, t, model)
    z = (v_hat - v) / sigma[:, None]
    assert z.std() == pytest.approx(1.0, abs=0.15)  # the stated σ is the error's


def test_the_motion_record_round_trips_and_is_absent_when_off(tmp_path):
    import numpy as np

    from core.stores.motion_model import MotionModel

    model = MeasurementModel(motion=MotionModel(0.05, 8.0))
    assert "motion" in model.to_attrs() and "motion" not in MeasurementModel().to_attrs()
    assert model.cli_args()[-4:] == ["--motion-step-sigma", "0.05", "--motion-heading-deg", "8"]
    assert "device motion: step σ 5 %, heading σ 8 deg" in model.summary()
    ds = _analytic_dataset()
    ds.attrs["measurement_model"] = model.in_world(model.world).to_attrs() | {"sites_per_report": ds.num_sites_per_report}
    with pytest.raises(StoreError, match="records device motion but the store has no 'motion' array"):
        ds.validate()
    xyz = ds.ue_xyz.astype(np.float64)
    ds.motion = MotionModel(0.05, 8.0).measure(xyz, 0)
    ds.validate()
    path = ds.save(tmp_path / "ds")
    back = MeasurementDataset.load(path)
    np.testing.assert_array_equal(back.motion, ds.motion)
    assert back.measurement_model.motion == MotionModel(0.05, 8.0)
    assert back.subset(np.arange(3)).motion.shape == (3,) + ds.motion.shape[1:]
