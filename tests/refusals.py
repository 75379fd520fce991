"""A command that must refuse: exit status 2, one line on stderr, and nothing written where it was told to write."""

from __future__ import annotations

from pathlib import Path


def refused_train(capsys, out: Path, *sets: str, config: str = "configs/agnostic.yaml") -> str:
    """Run ``python -m core train --config config --set ... --out out`` in process; assert that it refused in
    one line before writing ``out``; return that line."""
    from core.cli import main

    code = main(["train", "--config", config, *(a for kv in sets for a in ("--set", kv)), "--out", str(out),
                 "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and not out.exists(), (code, err)
    return err
