"""``--no-progress`` on every long command: it parses everywhere and really hides the bars."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from core import REPO_ROOT
from core.benchmarks.cli import BENCHMARKS
from core.cli import build_parser, main

LONG_COMMANDS = ["generate-maps", "make-dataset", "train", "evaluate", "ablate", "bench"]


@pytest.mark.parametrize("argv", [[c, "--help"] for c in LONG_COMMANDS] + [["bench", b, "--help"] for b in BENCHMARKS])
def test_every_long_command_offers_no_progress(argv, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 0
    assert "--no-progress" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [
    ["generate-maps", "--scenes", "etoile", "--no-progress"],
    ["make-dataset", "--scene", "etoile", "--out", "x", "--no-progress"],
    ["train", "--out", "x", "--no-progress"],
    ["evaluate", "--run", "x", "--no-progress"],
    ["ablate", "--no-progress"],
    ["bench", "--no-progress", "physics"],
])
def test_no_progress_parses(argv):
    assert build_parser(argv[0]).parse_args(argv).no_progress is True


def _bench_physics(out, *extra: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TQDM_DISABLE"}
    return subprocess.run([sys.executable, "-m", "core", "bench", "--out", str(out), "physics", "--batches", "1",
                           "--size", "32", "--repeats", "1", "--map-samples", "8", "--walks", "4", *extra], cwd=REPO_ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


def test_no_progress_hides_the_bar_after_torch_imported_tqdm(tmp_path):
    """torch imports tqdm before any command runs: the flag must act before that."""
    shown = _bench_physics(tmp_path / "shown.json")
    assert shown.returncode == 0, shown.stderr
    assert "bench physics:" in shown.stderr and "batch/s" in shown.stderr  # the tqdm bar
    hidden = _bench_physics(tmp_path / "hidden.json", "--no-progress")
    assert hidden.returncode == 0, hidden.stderr
    assert "bench physics:" not in hidden.stderr and "batch/s" not in hidden.stderr
    assert hidden.stdout.strip() and "loss_fwdbwd_vs_bare_fwdbwd" in hidden.stdout  # the table still prints


def test_in_process_main_leaves_the_environment_as_it_was(monkeypatch, capsys, tmp_path):
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    assert main(["bench", "--out", str(tmp_path / "bench.json"), "physics", "--batches", "1", "--size", "16", "--repeats", "1",
                 "--map-samples", "8", "--no-progress"]) == 0
    assert "TQDM_DISABLE" not in os.environ
    capsys.readouterr()
