"""merge-datasets: walks of one world traced with different seeds become one store whose val and test
splits are the first dataset's (core/stores/dataset_merge.py)."""

from __future__ import annotations

import numpy as np
import pytest

from core.cli import main
from core.physics.synthetic import analytic_radio_map, synthetic_dataset
from core.stores.dataset import SPLITS, MeasurementDataset
from core.stores.lineage import map_path
from core.stores.radio_map import RadioMap


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """An analytic map and three datasets made with it: seeds 0 and 1 (one world), and seed 2 with
    another noise setting (another measurement model)."""
    root = tmp_path_factory.mktemp("merge")
    radio_map = analytic_radio_map(16, 16, (-32.0, -32.0, 32.0, 32.0))
    radio_map = RadioMap(radio_map.values, radio_map.features, radio_map.bounds, valid=radio_map.valid,
                         attrs={**radio_map.attrs, "scene": "analytic"}, layers=radio_map.layers)
    radio_map.save(map_path(root / "radio_maps", "analytic"))
    paths = {}
    for name, seed, noise in (("a", 0, True), ("b", 1, True), ("quiet", 2, False)):
        paths[name] = root / "datasets" / name
        synthetic_dataset(radio_map, 60 + 10 * seed, reports=4, k=2, seed=seed, noise=noise).save(paths[name])
    return root, paths


def one_line_error(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_the_merge_keeps_the_first_split_and_adds_every_other_walk_to_train(world, tmp_path, capsys):
    _, paths = world
    out = tmp_path / "ab"
    assert main(["merge-datasets", "--datasets", str(paths["a"]), str(paths["b"]), "--out", str(out)]) == 0
    a, b, merged = (MeasurementDataset.load(p) for p in (paths["a"], paths["b"], out))
    assert merged.num_samples == a.num_samples + b.num_samples == 130
    np.testing.assert_array_equal(merged.ue_xyz, np.concatenate([a.ue_xyz, b.ue_xyz]))
    np.testing.assert_array_equal(merged.site_features, np.concatenate([a.site_features, b.site_features]))
    np.testing.assert_array_equal(merged.clean_cell_features,
                                  np.concatenate([a.clean_cell_features, b.clean_cell_features]))
    for split in ("val", "test"):  # the yardstick is the first dataset's, UE for UE
        np.testing.assert_array_equal(merged.indices(split), a.indices(split))
    assert (merged.split[a.num_samples:] == SPLITS["train"]).all()
    assert len(merged.indices("train")) == len(a.indices("train")) + b.num_samples
    record = merged.attrs["merged_from"]
    assert [d["seed"] for d in record["datasets"]] == [0, 1]
    assert [d["id"] for d in record["datasets"]] == [a.lineage.id, b.lineage.id]
    assert merged.radio_map_ref == a.radio_map_ref
    assert capsys.readouterr().out.strip().endswith(f"train {len(merged.indices('train'))}, val "
                                                    f"{len(a.indices('val'))}, test {len(a.indices('test'))}")


def test_walks_of_another_world_or_the_same_seed_are_refused_and_nothing_is_written(world, tmp_path, capsys):
    _, paths = world
    out = tmp_path / "bad"
    assert main(["merge-datasets", "--datasets", str(paths["a"]), str(paths["quiet"]), "--out", str(out)]) == 2
    assert one_line_error(capsys) == (f"error: {paths['quiet']} and {paths['a']} differ in attrs['noise']: "
                                      "not walks of one world")
    assert main(["merge-datasets", "--datasets", str(paths["a"]), str(paths["a"]), "--out", str(out)]) == 2
    assert "walk seed 0 is given twice" in one_line_error(capsys)
    assert main(["merge-datasets", "--datasets", str(paths["a"]), "--out", str(out)]) == 2
    assert one_line_error(capsys) == "error: merge-datasets needs at least two datasets"
    assert not out.exists()


def test_force_replaces_only_a_dataset_and_never_an_input(world, tmp_path, capsys):
    _, paths = world
    args = ["merge-datasets", "--datasets", str(paths["a"]), str(paths["b"])]
    assert main([*args, "--out", str(paths["b"]), "--force"]) == 2
    assert "is one of --datasets" in one_line_error(capsys)
    keep = tmp_path / "notes"
    keep.mkdir()
    (keep / "mine.txt").write_text("a user's file")
    assert main([*args, "--out", str(keep)]) == 2
    assert "exists (use --force" in one_line_error(capsys)
    assert main([*args, "--out", str(keep), "--force"]) == 2
    one_line_error(capsys)
    assert (keep / "mine.txt").read_text() == "a user's file"
    MeasurementDataset.load(paths["b"])  # the inputs are untouched (digest checked)
