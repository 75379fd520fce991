"""Ray as the distributed engine of generate-maps and make-dataset: real Ray, real Sionna, no mocks.

A local Ray with 2 CPUs (the fixture, shut down after the module) runs two scenes at once,
one of which fails; the good store must be complete and load, the failure line must name
the bad scene, and the command must exit 2.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest

from core import REPO_ROOT, progress
from core.cli import main
from core.stores.dataset import MeasurementDataset
from core.stores.radio_map import RadioMap

pytestmark = pytest.mark.sionna

TINY = ["--resolution", "8", "--map-size", "16", "16", "--samples-per-tx", "20000", "--retry-samples-per-tx", "0",
        "--toa-decimation", "8"]


def _core(*args: str, timeout: float = 240, **env_vars: str) -> subprocess.CompletedProcess:
    """``python -m core ARGS`` from the repository root, with bars off (Ray's RAY_AUTH_* settings are kept)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CORE_PROGRESS", "CORE_JOB"))} | env_vars
    return subprocess.run([sys.executable, "-m", "core", *args, "--no-progress"], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _failed_lines(out: str) -> list[str]:
    assert "summary:" in out, out
    summary = out.split("summary:")[1]
    return [line for line in summary.splitlines() if " failed " in line]


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray with 2 CPUs for the module; yields its address (``HOST:PORT``), shuts it down after."""
    import ray

    environ = dict(os.environ)  # ray.init sets RAY_AUTH_MODE, PYTHONBREAKPOINT...: restored after
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level=logging.ERROR,
             log_to_driver=False, runtime_env={"env_vars": {"TQDM_DISABLE": "1"}})
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()
        os.environ.clear()
        os.environ.update(environ)


def test_local_ray_reports_an_unknown_scene_and_exits_2(tmp_path):
    """``--ray`` alone starts (and stops) a Ray of its own."""
    out = _core("make-dataset", "--scene", "no_such_scene", "--out", str(tmp_path / "ds"), "--num-ues", "4",
                "--reports", "2", "--ray")
    assert out.returncode == 2, out.stderr
    (line,) = _failed_lines(out.stdout)
    assert line.split()[0] == "no_such_scene" and "unknown scene 'no_such_scene'" in line
    assert not tmp_path.joinpath("ds").exists()


def test_two_scenes_in_parallel_one_broken(ray_cluster, tmp_path):
    """A command joins the cluster by its address; the broken scene fails alone."""
    scenes = tmp_path / "scenes"
    scenes.mkdir()
    (scenes / "broken.xml").write_text("<scene version='2.1.0'><shape type='ply'>")
    maps = tmp_path / "maps"
    progress_file = tmp_path / "progress.json"
    out = _core("generate-maps", "--scenes", "simple_street_canyon", "broken", "--scenes-dir", str(scenes),
                "--radio-maps", str(maps), *TINY, "--ray", ray_cluster, CORE_PROGRESS_FILE=str(progress_file))
    assert out.returncode == 2, out.stdout + out.stderr
    (line,) = _failed_lines(out.stdout)
    assert line.split()[0] == "broken" and "cannot load" in line
    assert "simple_street_canyon: ok:" in out.stdout
    assert sorted(p.name for p in maps.iterdir()) == ["simple_street_canyon.zarr"]  # no temporary left
    m = RadioMap.load(maps / "simple_street_canyon.zarr")
    assert m.shape == (16, 16) and m.valid.any()
    assert m.attrs["scene"] == "simple_street_canyon"
    record = progress.read(progress_file)  # the app's job sees the scenes finish
    assert record["fraction"] == 1.0 and "(2 of 2 scenes)" in record["message"]


def test_make_dataset_of_several_scenes_on_ray(ray_cluster, tmp_path, capsys):
    """Several scenes: ``--out`` is a folder of ``<scene>`` stores; a Ray already running here is reused."""
    import ray

    folder = tmp_path / "datasets"
    rc = main(["make-dataset", "--scene", "simple_street_canyon", "no_such_scene", "--out", str(folder),
               "--num-ues", "6", "--reports", "2", "--no-map", "--ray", "--no-progress"])
    text = capsys.readouterr().out
    assert rc == 2, text
    (line,) = _failed_lines(text)
    assert line.split()[0] == "no_such_scene"
    assert ray.is_initialized()  # the fixture's Ray, left running
    assert sorted(p.name for p in folder.iterdir()) == ["simple_street_canyon"]
    ds = MeasurementDataset.load(folder / "simple_street_canyon")
    assert (ds.num_samples, ds.num_reports) == (6, 2) and ds.attrs["scene"] == "simple_street_canyon"


def test_a_dataset_made_on_ray_records_the_map_path_as_given(ray_cluster, tmp_path, monkeypatch, capsys):
    """Ray workers get absolute paths; the dataset still records ``--radio-maps`` as the user typed it."""
    from core.raytracing.measurements import recorded_path

    assert recorded_path("/a/b/maps/x.zarr", "/a/b") == "maps/x.zarr"
    assert recorded_path("/elsewhere/x.zarr", "/a/b") == "/elsewhere/x.zarr"
    assert main(["generate-maps", "--scenes", "simple_street_canyon", "--radio-maps", str(tmp_path / "maps"), *TINY,
                 "--no-progress"]) == 0
    monkeypatch.chdir(tmp_path)
    rc = main(["make-dataset", "--scene", "simple_street_canyon", "--out", "ds", "--num-ues", "6", "--reports", "2",
               "--radio-maps", "maps", "--ray", "--no-progress"])
    assert rc == 0, capsys.readouterr().out
    ds = MeasurementDataset.load(tmp_path / "ds")
    assert ds.attrs["radio_map"] == "maps/simple_street_canyon.zarr"
    assert ds.radio_map_ref.path == "maps/simple_street_canyon.zarr"


def test_a_city_corpus_on_ray_isolates_a_failing_city_and_resumes(ray_cluster, tmp_path, capsys):
    """make-corpus: one Ray task per city; a city that cannot be written fails with its cause, the
    other completes, the manifest names both, and a rerun skips the finished one. Cities only (their
    maps: tests/test_city.py), so the Ray workers need not compile Dr.Jit's kernels."""
    import json

    out = tmp_path / "corpus"
    (out / "scenes" / "city_1").mkdir(parents=True)
    (out / "scenes" / "city_1" / "notes.txt").write_text("not a city's file")  # city_1 must not replace it
    args = ["make-corpus", "--count", "2", "--out", str(out), "--size-m", "64", "--sites", "0", "--no-map",
            "--no-progress"]
    assert main(args + ["--ray", ray_cluster]) == 2
    text = capsys.readouterr().out
    manifest = json.loads((out / "manifest.json").read_text())
    assert [c["name"] for c in manifest["cities"]] == ["city_0"] and manifest["complete"] == 1
    assert manifest["failed"][0]["name"] == "city_1" and "notes.txt" in manifest["failed"][0]["cause"]
    assert "city_1: failed" in text and (out / "scenes" / "city_0" / "city_0.xml").is_file()
    (out / "scenes" / "city_1" / "notes.txt").unlink()
    (out / "scenes" / "city_1").rmdir()
    assert main(args) == 0  # in turn this time
    text = capsys.readouterr().out
    assert "city_0: skipped" in text and "city_1: ok" in text
    assert json.loads((out / "manifest.json").read_text())["complete"] == 2


def _killed_worker(name, *args):
    """A city whose worker dies mid-task (killed, out of memory): SIGKILL to its own process."""
    import signal

    os.kill(os.getpid(), signal.SIGKILL)


def test_a_city_whose_worker_is_killed_is_reported_and_the_other_completes(ray_cluster, tmp_path):
    """The corpus' Ray path (make-corpus --ray runs exactly this): a killed worker and a city of broken parameters
    fail with their cause, the other city completes."""
    from ray import cloudpickle

    from core.raytracing.city import CityParams
    from core.raytracing.corpus import corpus_city, corpus_params, write_manifest
    from core.raytracing.distributed import run_on_ray
    from core.raytracing.scene_batch import SceneCall

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import this test module
    base = CityParams(size_m=64.0, block_m=32.0).model_dump()
    broken = {**corpus_params(2, base, False), "density": 7.0}  # parameters the command would have refused
    calls = [SceneCall("city_0", corpus_city, (corpus_params(0, base, False), str(tmp_path), None, 0)),
             SceneCall("city_1", _killed_worker, ()),
             SceneCall("city_2", corpus_city, (broken, str(tmp_path), None, 0))]
    try:
        results = run_on_ray(calls, ray_cluster, "make-corpus")
    finally:
        cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    assert [r.status for r in results] == ["ok", "failed", "failed"] and "worker died" in results[1].detail
    assert "density" in results[2].detail and not (tmp_path / "scenes" / "city_2").exists()
    manifest = write_manifest(tmp_path, ["city_0", "city_1", "city_2"], results, {})
    assert manifest["complete"] == 1 and [f["name"] for f in manifest["failed"]] == ["city_1", "city_2"]
    assert manifest["failed"][0]["cause"] == results[1].detail
