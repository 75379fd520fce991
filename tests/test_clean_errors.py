"""A corrupt or missing store: one line on stderr naming the file, exit status 2, nothing else.

Zarr v3 reads chunks as asyncio tasks on a background loop; a corrupt chunk used to leave
the other chunk tasks pending at exit, and about 2 runs in 3 then printed dozens of
"Task was destroyed but it is pending!" lines after the error. Each case runs the real
``python -m core`` several times, since the noise was a race.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from core import REPO_ROOT

RUNS = 5


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "core", *args], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=300)


def _first_chunk(store: Path, array: str) -> Path:
    chunks = sorted(p for p in (store / array / "c").rglob("*") if p.is_file())
    assert len(chunks) > 1, f"{store / array} should have several chunks"
    return chunks[0]


def _assert_one_clean_line(proc: subprocess.CompletedProcess, needle: str) -> None:
    lines = proc.stderr.splitlines()
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(lines) == 1, f"{len(lines)} lines on stderr:\n" + "\n".join(lines[:8])
    assert lines[0].startswith("error: ") and needle in lines[0], lines[0]


@pytest.fixture(scope="module")
def corrupt_map(tmp_path_factory) -> Path:
    """A copy of the shipped radio map whose first chunk of ``values`` is garbage."""
    maps = tmp_path_factory.mktemp("maps")
    store = maps / "etoile.zarr"
    shutil.copytree(REPO_ROOT / "radio_maps" / "etoile.zarr", store)
    chunk = _first_chunk(store, "values")
    chunk.write_bytes(b"\x00garbage\xff" * 7)
    return store


@pytest.fixture(scope="module")
def corrupt_dataset(tmp_path_factory) -> Path:
    """A copy of the shipped dataset whose first chunk of ``site_features`` (its largest
    array: the other chunk tasks are still running when that one fails) is garbage."""
    store = tmp_path_factory.mktemp("data") / "etoile"
    shutil.copytree(REPO_ROOT / "datasets" / "etoile", store)
    _first_chunk(store, "site_features").write_bytes(b"\x00garbage\xff" * 7)
    return store


def test_corrupt_radio_map_chunk_is_one_line_every_time(corrupt_map, tmp_path):
    for _ in range(RUNS):
        proc = _run("make-dataset", "--scene", "etoile", "--radio-maps", str(corrupt_map.parent),
                    "--out", str(tmp_path / "ds"), "--num-ues", "10")
        _assert_one_clean_line(proc, f"radio map {corrupt_map}: corrupt array data")
    assert not (tmp_path / "ds").exists()


def test_corrupt_dataset_chunk_is_one_line_every_time(corrupt_dataset, tmp_path):
    for _ in range(RUNS):
        proc = _run("train", "--config", "configs/model.yaml", "--set", f"data.dataset={corrupt_dataset}",
                    "--out", str(tmp_path / "run"), "--no-progress")
        _assert_one_clean_line(proc, f"dataset {corrupt_dataset}: corrupt array data")


def test_truncated_group_metadata_is_one_line(corrupt_map, tmp_path):
    store = tmp_path / "maps" / "etoile.zarr"
    shutil.copytree(corrupt_map, store)
    meta = store / "zarr.json"
    meta.write_bytes(meta.read_bytes()[:100])
    for _ in range(2):
        proc = _run("make-dataset", "--scene", "etoile", "--radio-maps", str(store.parent),
                    "--out", str(tmp_path / "ds"))
        _assert_one_clean_line(proc, f"radio map {store}: not a readable Zarr group")


def test_missing_dataset_is_one_line(tmp_path):
    missing = tmp_path / "nowhere"
    proc = _run("train", "--config", "configs/model.yaml", "--set", f"data.dataset={missing}",
                "--out", str(tmp_path / "run"), "--no-progress")
    _assert_one_clean_line(proc, f"dataset {missing}: no such store")


def test_settle_zarr_waits_for_the_chunks_left_behind(corrupt_map):
    """In-process: after the failed read no zarr task is left pending."""
    import asyncio

    from core.errors import StoreError
    from core.stores.radio_map import RadioMap
    from core.stores.zarr_group import settle_zarr

    with pytest.raises(StoreError, match="corrupt array data"):
        RadioMap.load(corrupt_map)
    from zarr.core import sync

    loop = sync.loop[0]
    pending = asyncio.run_coroutine_threadsafe(_count_tasks(), loop).result(10)
    assert pending == 0
    assert settle_zarr() == 0


async def _count_tasks() -> int:
    import asyncio

    me = asyncio.current_task()
    return sum(1 for t in asyncio.all_tasks() if t is not me and not t.done())
