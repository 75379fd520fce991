"""The procedural city (core/raytracing/city.py): deterministic files, parameters that do what they say,
a scene Sionna RT loads and maps, and the command's error policy."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from core import REPO_ROOT
from core.cli import main
from core.raytracing.city import CityParams, generate_city, is_valid_city, params_from, polygon_area


def _tree(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_the_same_seed_gives_the_same_files_byte_for_byte_and_another_seed_another_city(tmp_path, capsys):
    args = ["make-city", "--seed", "3", "--size-m", "128", "--vehicles", "4", "--sites", "0", "--layout", "irregular"]
    assert main(args + ["--out", str(tmp_path / "a")]) == 0
    assert main(args + ["--out", str(tmp_path / "b")]) == 0
    a, b = _tree(tmp_path / "a" / "city_3"), _tree(tmp_path / "b" / "city_3")
    assert a == b and "city_3.xml" in a and "city.json" in a and "meshes/vehicle_003.ply" in a
    assert is_valid_city(tmp_path / "a" / "city_3")
    assert main(["make-city", "--seed", "4", "--size-m", "128", "--sites", "0", "--out", str(tmp_path / "a")]) == 0
    other = json.loads((tmp_path / "a" / "city_4" / "city.json").read_text())
    assert other["digest"] != json.loads((tmp_path / "a" / "city_3" / "city.json").read_text())["digest"]
    (tmp_path / "a" / "city_4" / "meshes" / "building_000.ply").write_bytes(b"broken")
    assert not is_valid_city(tmp_path / "a" / "city_4")  # the manifest's digests catch a changed file


@pytest.mark.parametrize("layout", ["grid", "perturbed", "irregular"])
def test_parameters_change_the_city_as_they_say(layout):
    def city(**kw):
        return generate_city(params_from({"seed": 11, "layout": layout, **kw}))

    sparse, dense = city(density=0.3).statistics(), city(density=1.0).statistics()
    assert sparse["buildings"] < dense["buildings"]
    assert sparse["footprint_share"] < dense["footprint_share"] <= 1.0
    low, high = city(height_mean_m=10.0).statistics(), city(height_mean_m=40.0).statistics()
    assert abs(low["height_m"]["mean"] - 10.0) < 2.0 and abs(high["height_m"]["mean"] - 40.0) < 6.0
    flat = city(height_sd_m=0.0).statistics()["height_m"]
    assert flat["sd"] == 0.0 and flat["mean"] == 15.0
    wide, narrow = city(street_width_m=30.0).statistics(), city(street_width_m=6.0).statistics()
    assert wide["footprint_share"] < narrow["footprint_share"]
    c = city(vehicles=6)
    half = c.params.size_m / 2
    for foot in c.footprints:  # convex, counter-clockwise, inside the square
        assert polygon_area(foot) >= 9.0 and np.all(np.abs(foot) <= half + 1e-6)
    assert len(c.vehicles) == 6 and sum(polygon_area(f) for f in c.footprints) < (2 * half) ** 2


def _exit_status(argv: list[str]) -> int:
    """``main(argv)``'s exit status, also when argparse exits (a flag of the wrong type or range)."""
    try:
        return main(argv)
    except SystemExit as exc:
        return int(exc.code)


def test_a_bad_parameter_is_one_line_exit_2_and_nothing_written(tmp_path, capsys):
    out = tmp_path / "scenes"
    for bad in (["--density", "1.5"], ["--street-width-m", "60"], ["--materials", "concrete=1,cheese=2"],
                ["--size-m", "4096"], ["--layout", "spiral"], ["--name", "../x"], ["--setback-m", "nan"]):
        capsys.readouterr()
        assert _exit_status(["make-city", "--seed", "1", "--out", str(out), *bad]) == 2, bad
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1, (bad, err)
        assert not out.exists(), bad
    assert main(["make-city", "--seed", "1", "--out", str(REPO_ROOT / "assets" / "cities"), "--sites", "0"]) == 2
    assert "read-only" in capsys.readouterr().err and not (REPO_ROOT / "assets" / "cities").exists()


def test_an_existing_city_is_kept_without_force_and_replaced_with_it(tmp_path, capsys):
    args = ["make-city", "--seed", "5", "--size-m", "64", "--block-m", "32", "--sites", "0", "--out", str(tmp_path)]
    assert main(args) == 0
    assert main(args) == 2 and "--force" in capsys.readouterr().err
    assert main(args + ["--force", "--density", "0.5"]) == 0
    assert json.loads((tmp_path / "city_5" / "city.json").read_text())["params"]["density"] == 0.5
    (tmp_path / "city_5" / "notes.txt").write_text("mine")
    assert main(args + ["--force"]) == 2 and "notes.txt" in capsys.readouterr().err


@pytest.mark.sionna
def test_a_city_loads_in_sionna_gets_its_sites_and_a_map_that_covers_it(tmp_path, capsys):
    from core.raytracing.city_stats import scene_statistics, sites_heard
    from core.raytracing.generation import MapSettings, generate_map
    from core.raytracing.scenes import buildings_of, load_scene, resolve_scene, site_layout
    from core.raytracing.terrain import ground_height
    from core.raytracing.tracing import PropagationSettings

    assert main(["make-city", "--seed", "2", "--size-m", "128", "--vehicles", "3", "--out", str(tmp_path)]) == 0
    record = json.loads((tmp_path / "city_2" / "city.json").read_text())
    info = resolve_scene("city_2", tmp_path)
    scene = load_scene(info)
    assert len(scene.objects) == 1 + record["buildings"] + 3
    tall = [b for b in buildings_of(scene) if b.name.startswith("building_")]
    assert len(tall) == record["buildings"] and abs(np.mean([b.height for b in tall]) - record["height_m"]["mean"]) < 0.05
    del scene
    assert main(["make-city", "--seed", "9", "--size-m", "64", "--block-m", "32", "--terrain-m", "3", "--sites", "0",
                 "--out", str(tmp_path)]) == 0
    hilly = load_scene(resolve_scene("city_9", tmp_path))
    xy = np.random.default_rng(0).uniform(-30, 30, (200, 2))
    ground = ground_height(hilly, xy)
    assert 1.0 < np.ptp(ground) <= 6.0  # the hills are there, within ± 3 m, also under the buildings
    del hilly
    sites = site_layout("city_2", tmp_path)  # the city's own <name>.sites.yaml, from place-sites
    assert len(sites) == 5 and sites == record_sites(tmp_path / "city_2" / "city_2.sites.yaml")
    settings = MapSettings(resolution=4.0, map_size=(32, 32), toa_decimation=4,
                           propagation=PropagationSettings(max_depth=2, samples_per_src=3_000, seed=7))
    stats = scene_statistics("city_2", str(tmp_path), resolution=2.0)  # the raster agrees with the polygons
    assert abs(stats["footprint_share"] - record["footprint_share"]) < 0.03
    assert stats["buildings"] == record["buildings"] and abs(stats["height_mean_m"] - record["height_m"]["mean"]) < 0.05
    assert stats["los_share"] > 0.6 and stats["street_width_median_m"] > 5
    radio_map = generate_map(info, settings)
    assert radio_map.attrs["sites"] == sites
    assert radio_map.outdoor_coverage > 0.9
    heard = sites_heard(radio_map)
    assert heard["heard_share"] > 0.9 and 1.0 <= heard["sites_heard_mean"] <= 5.0
    assert 0.4 < float(radio_map.outdoor.mean()) < 0.9  # streets and buildings both there


def test_street_width_is_the_width_of_the_open_space():
    from core.raytracing.city_stats import street_widths

    outdoor = np.zeros((60, 60), bool)
    outdoor[20:31] = True  # an 11-cell street across the area
    outdoor[40:45, 10:50] = True  # a 5-cell lane
    widths = street_widths(outdoor, resolution=2.0)
    assert np.median(widths) == pytest.approx(22.0) and widths.min() == pytest.approx(10.0)
    assert len(street_widths(np.ones((8, 8), bool), 1.0)) == 0


def record_sites(path: Path):
    import yaml

    return yaml.safe_load(path.read_text())["sites"]


def test_the_default_parameters_are_the_documented_ones():
    p = CityParams()
    assert (p.size_m, p.layout, p.density) == (256.0, "perturbed", 0.85)
    assert abs(sum(p.materials.values()) - 1.0) < 1e-9


def test_the_scenes_page_makes_a_city_and_lists_the_corpus(tmp_path, monkeypatch, capsys):
    """The Scenes page: the corpus manifest as a table, and a form whose button runs make-city as a job."""
    from streamlit.testing.v1 import AppTest

    from core.jobs.manager import JobManager

    db = tmp_path / ".jobs" / "jobs.sqlite"
    monkeypatch.setenv("CORE_WORKSPACE", str(tmp_path))
    monkeypatch.setenv("CORE_JOBS_DB", str(db))
    monkeypatch.delenv("CORE_SCENES_DIR", raising=False)
    geometry = tmp_path / ".jobs" / "geometry"
    geometry.mkdir(parents=True)  # etoile drawn from a cached box, no Sionna in the page
    (geometry / "etoile.json").write_text(json.dumps({"name": "etoile", "bbox": [-50, -50, 0, 50, 50, 20], "sites": [],
                                                     "buildings": [{"name": "b", "height": 20.0, "base": 0.0,
                                                                    "footprint": [[0, 0], [9, 0], [9, 9], [0, 9]]}]}))
    assert main(["make-corpus", "--count", "1", "--no-map", "--size-m", "64", "--sites", "0",
                 "--out", str(tmp_path / "corpus"), "--no-progress"]) == 0
    at = AppTest.from_file(str(REPO_ROOT / "app.py"), default_timeout=120).run()
    assert not at.exception, [e.value for e in at.exception]
    assert any("1 of 1 cities complete" in str(c.value) for c in at.caption)
    at.number_input(key="make_city_seed").set_value(5)
    at.number_input(key="make_city_size").set_value(64)
    next(b for b in at.button if b.label == "Make the city").click().run()
    assert not at.exception, [e.value for e in at.exception]
    manager = JobManager(db, cwd=tmp_path)
    job = next(j for j in manager.list() if j.kind == "make-city")
    assert job.command.startswith("python -m core make-city --seed 5 --out scenes --layout perturbed --size-m 64")
    job = manager.wait(job.id, timeout_s=120)
    assert job.status == "succeeded", manager.log_tail(job.id) if hasattr(manager, "log_tail") else job
    assert (tmp_path / "scenes" / "city_5" / "city_5.xml").is_file()


SMALL_CITIES = ("small_grid", "small_irregular", "small_hills")


def test_the_shipped_small_cities_are_complete_and_read_only(capsys):
    """The three small cities ship with their sites, maps and datasets (a fresh clone uses them as they are), and
    every command refuses to write them."""
    from core.raytracing.scenes import list_scenes, site_layout
    from core.stores.lineage import check_scene_stores
    from core.stores.radio_map import RadioMap

    listed = {info.name for info in list_scenes(REPO_ROOT / "scenes")}
    for name in SMALL_CITIES:
        folder = REPO_ROOT / "scenes" / name
        assert name in listed and is_valid_city(folder)
        assert json.loads((folder / "city.json").read_text())["params"]["size_m"] == 128.0
        radio_map = RadioMap.load(REPO_ROOT / "radio_maps" / f"{name}.zarr")
        assert radio_map.attrs["sites"] == site_layout(name, REPO_ROOT / "scenes") and len(radio_map.attrs["sites"]) == 3
        assert radio_map.outdoor_coverage >= 0.95
        check_scene_stores(REPO_ROOT / "datasets" / name, REPO_ROOT / "radio_maps" / f"{name}.zarr")
    for argv in (["make-city", "--seed", "101", "--size-m", "128", "--name", "small_grid", "--out",
                  str(REPO_ROOT / "scenes"), "--force"],
                 ["generate-maps", "--scenes", "small_grid", "--scenes-dir", str(REPO_ROOT / "scenes"), "--radio-maps",
                  str(REPO_ROOT / "radio_maps"), "--force"],
                 ["make-dataset", "--scene", "small_hills", "--scenes-dir", str(REPO_ROOT / "scenes"), "--radio-maps",
                  str(REPO_ROOT / "radio_maps"), "--out", str(REPO_ROOT / "datasets" / "small_hills"), "--force"]):
        capsys.readouterr()
        assert main(argv) == 2 and "read-only" in capsys.readouterr().err, argv


def test_make_corpus_refuses_bad_input_before_any_work(tmp_path, capsys):
    """Every city's parameters and the engine are checked first: one line, exit 2, nothing written."""
    out = tmp_path / "corpus"
    for bad in (["--fixed", "--street-width-m", "60"], ["--num-cpus", "1"], ["--num-cpus", "1", "--ray", "auto"],
                ["--samples-per-tx", "0"]):
        capsys.readouterr()
        assert _exit_status(["make-corpus", "--count", "2", "--out", str(out), "--no-map", *bad]) == 2, bad
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1, (bad, err)
        assert not out.exists(), bad


@pytest.mark.sionna
def test_a_corpus_city_gets_its_map_and_dataset_and_a_rerun_skips_them(tmp_path, capsys):
    """make-corpus with maps and datasets: the record (coverage, digests, wall and CPU seconds per stage, peak
    memory); a rerun skips everything; another dataset size rebuilds only the dataset, other propagation
    settings the map and the dataset."""
    from core.stores.dataset import MeasurementDataset
    from core.stores.radio_map import RadioMap

    out = tmp_path / "corpus"
    args = ["make-corpus", "--count", "1", "--fixed", "--size-m", "64", "--block-m", "32", "--sites", "2",
            "--resolution", "4", "--samples-per-tx", "3000", "--retry-samples-per-tx", "0", "--walks", "12",
            "--reports", "2", "--out", str(out), "--no-progress"]
    assert main(args) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    record = manifest["cities"][0]
    assert manifest["complete"] == 1 and manifest["last_run"]["ok"] == 1 and record["outdoor_coverage"] >= 0.9
    assert set(record["seconds"]) == set(record["cpu_seconds"]) == {"city_s", "map_s", "dataset_s"}
    assert record["peak_rss_mb"] > 100 and manifest["settings"]["map"]["propagation"]["receivers_per_call"] == 2048
    map_file, ds_file = out / "radio_maps" / "city_0.zarr", out / "datasets" / "city_0"
    digest = RadioMap.load(map_file).lineage.digest
    assert MeasurementDataset.load(ds_file).radio_map_ref.digest == digest == record["map_digest"]
    capsys.readouterr()
    assert main(args) == 0
    assert "city_0: skipped" in capsys.readouterr().out
    assert json.loads((out / "manifest.json").read_text())["last_run"]["skipped"] == 1
    assert main([a if a != "12" else "16" for a in args]) == 0  # 16 walks: the dataset only
    assert RadioMap.load(map_file).lineage.digest == digest and MeasurementDataset.load(ds_file).num_samples == 16
    assert main([a if a != "0" else "20000" for a in args]) == 0  # another second pass: map and dataset again
    remade = RadioMap.load(map_file)
    assert remade.attrs["propagation"]["retry_samples_per_src"] == 20000
    assert MeasurementDataset.load(ds_file).radio_map_ref.digest == remade.lineage.digest != digest


def test_a_city_a_check_refused_is_not_traced_again_unless_asked(tmp_path, capsys):
    """A deterministic failure (the map covers too little) is remembered with what it depended on: a rerun reports
    its cause at once, --retry-failed traces it again, other settings build it (and forget the failure)."""
    out = tmp_path / "corpus"
    args = ["make-corpus", "--count", "1", "--fixed", "--size-m", "64", "--block-m", "32", "--sites", "1",
            "--resolution", "4", "--samples-per-tx", "3000", "--retry-samples-per-tx", "0", "--max-depth", "0",
            "--min-coverage", "1.0", "--walks", "12", "--reports", "2", "--out", str(out), "--no-progress"]
    assert main(args) == 2
    failed = out / "records" / "city_0.failed.json"
    cause = json.loads(failed.read_text())["cause"]
    assert "below --min-coverage 100%" in cause and not (out / "radio_maps" / "city_0.zarr").exists()
    capsys.readouterr()
    assert main(args) == 2
    text = capsys.readouterr().out
    assert "failed before with the same parameters and settings" in text and cause in text
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["last_run"]["failed"] == 1 and manifest["last_run"]["wall_s"] < 5  # nothing traced
    assert main([*args, "--retry-failed"]) == 2
    assert "failed before" not in capsys.readouterr().out and failed.exists()  # traced again, refused again
    assert main([a if a != "1.0" else "0.5" for a in args]) == 0  # another threshold: built, the failure forgotten
    assert not failed.exists() and (out / "radio_maps" / "city_0.zarr").exists()
