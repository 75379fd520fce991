"""The command line: help for every command, one-line errors, tracebacks only with --debug.

Most checks call ``core.cli.main`` in-process (fast); a few run ``python -m core`` in a
subprocess to check the real exit status and stderr of the entry point.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from core.cli import COMMANDS, build_parser, main
from core.errors import CoreError

REPO = Path(__file__).resolve().parents[1]


def run_core(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "core", *args], cwd=REPO, capture_output=True, text=True, timeout=timeout
    )


def test_top_level_help_lists_every_command():
    proc = run_core("--help")
    assert proc.returncode == 0, proc.stderr
    for name, (_, help_text) in COMMANDS.items():
        assert name in proc.stdout
        assert help_text.split()[0] in proc.stdout


def test_no_command_prints_help_and_fails(capsys):
    assert main([]) != 0
    assert "commands" in capsys.readouterr().out


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    out = capsys.readouterr()
    assert info.value.code == 0, out.err
    assert "usage: python -m core " + command in out.out
    assert "--debug" in out.out and "--device" in out.out


def test_bench_physics_help(capsys):
    with pytest.raises(SystemExit) as info:
        main(["bench", "physics", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "--batches" in out and "--repeats" in out


@pytest.mark.parametrize("command", ["generate-maps", "make-dataset", "consistency"])
def test_the_maps_folder_is_radio_maps_on_every_command(command, capsys):
    parser = build_parser(command)
    with pytest.raises(SystemExit):
        parser.parse_args([command, "--help"])
    assert "--radio-maps" in capsys.readouterr().out
    required = {"make-dataset": ["--scene", "s", "--num-ues", "1", "--reports", "1", "--out", "o"],
                "consistency": ["--dataset", "d"]}.get(command, [])
    assert parser.parse_args([command, *required, "--radio-maps", "M"]).radio_maps == "M"


def test_generate_maps_keeps_output_dir_as_a_hidden_old_name(capsys):
    parser = build_parser("generate-maps")
    assert parser.parse_args(["generate-maps", "--output-dir", "old"]).radio_maps == "old"
    assert parser.parse_args(["generate-maps"]).radio_maps == "radio_maps"
    with pytest.raises(SystemExit):
        parser.parse_args(["generate-maps", "--help"])
    assert "--output-dir" not in capsys.readouterr().out


def test_bad_argument_is_one_line_without_traceback():
    proc = run_core("bench", "physics", "--batches", "1,abc")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --batches"), proc.stderr
    assert "Traceback" not in proc.stderr


def test_debug_shows_the_traceback():
    proc = run_core("bench", "--debug", "physics", "--batches", "1,abc")
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr and "--batches" in proc.stderr
    with pytest.raises(CoreError, match="--batches"):  # in-process: --debug lets it propagate
        main(["bench", "--debug", "physics", "--batches", "1,abc"])


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["bench", "--device", "tpu", "physics", "--batches", "1"], "--device"),
        (["bench", "physics", "--repeats", "0"], "--repeats"),
        (["bench", "physics", "--batches", "0"], "--batches"),
    ],
)
def test_bad_values_name_the_option(argv, needle, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error:") and needle in err
    assert "Traceback" not in err


def test_unknown_choice_fails_without_traceback(capsys):
    with pytest.raises(SystemExit) as info:
        main(["bench", "no-such-benchmark"])
    assert info.value.code != 0
    err = capsys.readouterr().err
    assert "invalid choice" in err and "Traceback" not in err


def test_bench_physics_runs_small(tmp_path, capsys):
    out = tmp_path / "physics.json"
    assert main(["bench", "--out", str(out), "physics", "--batches", "1,64", "--size", "32", "--repeats", "1",
                 "--map-samples", "40"]) == 0
    assert "loss_fwdbwd_vs_bare_fwdbwd" in capsys.readouterr().out
    report = json.loads(out.read_text())
    assert [r["batch"] for r in report["rows"]] == [1, 64]
    summary = report["summary"]
    assert {"loss_fwdbwd_vs_bare_fwdbwd", "loss_ok", "map_ok"} <= set(summary)
    assert not any(k.startswith("refine") for k in summary)  # the legacy refinement is gone
    assert all(r["loss_fwdbwd_ms"] > 0 and r["loss_fwdbwd_peak_MiB"] >= 0 for r in report["rows"])
