"""Atomic writes (core.stores.atomic): durable, gapless, and no leftovers after a SIGKILL.

Writers here are real subprocesses killed with SIGKILL, or threads that pause at a
chosen step; every wait is for a condition, with a deadline.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from waiting import wait_for

from core import REPO_ROOT
from core.physics.synthetic import analytic_radio_map
from core.stores import atomic
from core.stores.atomic import atomic_path, atomic_write_text, remove_stale_temps
from core.stores.radio_map import RadioMap


def _temps(path: Path) -> list[Path]:
    return sorted(p for p in path.parent.iterdir() if p.name.startswith(f".{path.name}."))


def _python(script: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(REPO_ROOT)!r})\n{script}"],
                            **kwargs)


# -- a writer killed mid-write ------------------------------------------------------------
@pytest.mark.parametrize("kind", ["file", "directory"])
def test_sigkilled_writer_keeps_the_old_content_and_its_temp_is_removed_next_time(tmp_path, kind):
    path = tmp_path / ("out.json" if kind == "file" else "store")
    if kind == "file":
        atomic_write_text(path, "old")
        body = "(tmp).write_text('half of the new cont')"
    else:
        with atomic_path(path) as tmp:
            tmp.mkdir()
            (tmp / "a").write_text("old")
        body = "(tmp.mkdir(), (tmp / 'a').write_text('half'))"
    proc = _python(
        "import os, signal\nfrom core.stores.atomic import atomic_path\n"
        f"with atomic_path({str(path)!r}) as tmp:\n"
        f"    {body}\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    assert proc.wait(timeout=60) == -signal.SIGKILL
    old = path.read_text() if kind == "file" else (path / "a").read_text()
    assert old == "old"  # the old content is intact
    (stale,) = _temps(path)  # the dead writer's temp, named after it
    assert stale.name.startswith(f".{path.name}.tmp-{proc.pid}-")
    if kind == "file":
        atomic_write_text(path, "new")
    else:
        with atomic_path(path) as tmp:
            tmp.mkdir()
            (tmp / "a").write_text("new")
    assert not stale.exists() and _temps(path) == []  # cleaned up by the next write
    assert (path.read_text() if kind == "file" else (path / "a").read_text()) == "new"


def test_a_live_writers_temp_is_left_alone(tmp_path):
    path = tmp_path / "out.txt"
    proc = _python(
        "from core.stores.atomic import atomic_path\n"
        f"with atomic_path({str(path)!r}) as tmp:\n"
        "    tmp.write_text('slow writer')\n"
        "    print('ready', flush=True)\n"
        "    sys.stdin.readline()\n",
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert proc.stdout.readline().strip() == "ready"
        (theirs,) = _temps(path)
        atomic_write_text(path, "mine")
        assert remove_stale_temps(path) == [] and theirs.exists()  # its writer is alive
        proc.stdin.write("\n")
        proc.stdin.flush()
        assert proc.wait(timeout=60) == 0
    finally:
        proc.kill()
        proc.wait()
    assert path.read_text() == "slow writer" and _temps(path) == []


def test_a_special_file_is_written_in_place_never_replaced(tmp_path):
    """``--out /dev/null`` must not turn /dev/null into a regular file: shown on a FIFO."""
    import stat

    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    received: list[str] = []
    reader = threading.Thread(target=lambda: received.append(fifo.read_text()), daemon=True)
    reader.start()
    atomic_write_text(fifo, "through the pipe")
    reader.join(timeout=30)
    assert received == ["through the pipe"]
    assert stat.S_ISFIFO(os.stat(fifo).st_mode) and _temps(fifo) == []


# -- durability ---------------------------------------------------------------------------
def test_contents_and_the_parent_are_fsynced_after_the_rename(tmp_path, monkeypatch):
    real = os.fsync
    synced: list[tuple[str, bool]] = []  # (path, does the final path hold the new store yet)
    path = tmp_path / "store"

    def recording(fd):
        synced.append((os.readlink(f"/proc/self/fd/{fd}"), (path / "sub" / "b").exists()))
        return real(fd)

    monkeypatch.setattr(os, "fsync", recording)
    with atomic_path(path) as tmp:
        (tmp / "sub").mkdir(parents=True)
        (tmp / "a").write_text("1")
        (tmp / "sub" / "b").write_text("2")
    before = [Path(p).relative_to(tmp_path).parts for p, done in synced if not done]
    assert all(parts[0].startswith(".store.tmp-") for parts in before)  # the new store, in its temp place
    assert {parts[1:] for parts in before} == {("a",), ("sub", "b"), ("sub",), ()}  # each file and directory
    assert synced[-1] == (str(tmp_path), True)  # then the parent, after the rename


# -- readers during a replacement ---------------------------------------------------------
def _map(version: float) -> RadioMap:
    rm = analytic_radio_map(height=16, width=16, bounds=(0.0, 0.0, 32.0, 32.0))
    values = np.full_like(rm.values, version)
    return RadioMap(values, rm.features, rm.bounds, valid=np.ones(rm.shape, bool), attrs={"version": version})


def test_a_reader_never_finds_the_path_missing_during_replacements(tmp_path):
    """A writer process replaces a directory store again and again; a reader spinning on
    ``exists()`` and on loading never sees it missing, nor a mix of two versions."""
    path = tmp_path / "scene.zarr"
    _map(0.0).save(path)
    writer = _python(
        "import numpy as np\nfrom core.stores.atomic import atomic_path\n"
        "from pathlib import Path\n"
        f"path = Path({str(path)!r})\n"
        "for i in range(1, 200):\n"
        "    with atomic_path(path) as tmp:\n"
        "        tmp.mkdir()\n"
        "        for k in range(2):\n"
        "            (tmp / f'part{k}').write_text(str(i))\n"
        "print('done', flush=True)\n",
        stdout=subprocess.PIPE, text=True,
    )
    checks = missing = 0
    try:
        while writer.poll() is None:
            checks += 1
            missing += not os.path.exists(path)
        assert writer.wait(timeout=120) == 0 and writer.stdout.read().strip() == "done"
    finally:
        writer.kill()
        writer.wait()
    assert checks > 100 and missing == 0, f"{missing} of {checks} checks found no {path.name}"
    assert _temps(path) == []


def test_load_racing_saves_always_returns_one_whole_version(tmp_path):
    path = tmp_path / "scene.zarr"
    _map(0.0).save(path)
    stop = threading.Event()
    errors: list[BaseException] = []

    def writer():
        try:
            for i in range(1, 10_000):
                if stop.is_set():
                    return
                _map(float(i)).save(path)
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    thread = threading.Thread(target=writer)
    thread.start()
    seen = set()
    deadline = time.monotonic() + 120
    try:
        while len(seen) < 5 and time.monotonic() < deadline and thread.is_alive():
            rm = RadioMap.load(path)
            version = rm.attrs["version"]
            assert (rm.values == version).all()  # not a mix of two saves
            seen.add(version)
    finally:
        stop.set()
        thread.join(timeout=60)
    assert not errors, errors
    assert len(seen) >= 5  # the reads really overlapped the saves


def test_without_a_gapless_swap_a_reader_waits_out_the_gap(tmp_path, monkeypatch):
    """Where renameat2 is missing the old store is renamed aside first: a load that runs
    in that moment finds no path and must wait for the new one, not fail."""
    path = tmp_path / "scene.zarr"
    _map(1.0).save(path)
    monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    in_gap, resume = threading.Event(), threading.Event()
    real_replace = os.replace

    def pausing_replace(src, dst):
        real_replace(src, dst)
        if Path(src) == path:  # the old store is aside, the new one not yet in
            in_gap.set()
            resume.wait(timeout=60)

    monkeypatch.setattr(atomic.os, "replace", pausing_replace)
    attempts = []
    real_read = RadioMap._read.__func__
    monkeypatch.setattr(RadioMap, "_read", classmethod(lambda cls, p: attempts.append(p) or real_read(cls, p)))
    saver = threading.Thread(target=lambda: _map(2.0).save(path))
    saver.start()
    try:
        assert in_gap.wait(timeout=60) and not path.exists()
        result: list = []
        reader = threading.Thread(target=lambda: result.append(RadioMap.load(path)))
        reader.start()
        wait_for(lambda: attempts, timeout=30, what="the reader tried during the gap")
        resume.set()
        reader.join(timeout=60)
    finally:
        resume.set()
        saver.join(timeout=60)
    (loaded,) = result
    assert loaded.attrs["version"] == 2.0 and len(attempts) >= 2


def test_a_missing_store_fails_at_once_even_while_a_first_write_is_building_it(tmp_path):
    """A first map generation takes minutes: a reader must not wait for it, the path is
    plainly missing (only a swap, where the old store is aside, is waited out)."""
    from core.errors import StoreError

    path = tmp_path / "scene.zarr"
    with atomic_path(path) as tmp:  # this live process is building it
        tmp.mkdir()
        started = time.monotonic()
        with pytest.raises(StoreError, match="no such store"):
            RadioMap.load(path)
        assert time.monotonic() - started < 2.0
        (tmp / "zarr.json").write_text("{}")
