"""scripts/paired_errors.py pairs two seed_comparison --errors files on the same UEs, and refuses a mismatch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "paired_errors.py"), *args], cwd=ROOT,
                          capture_output=True, text=True, env={"PYTHONPATH": str(ROOT)}, timeout=120)


def test_a_known_shift_is_found_with_its_ci_and_a_mismatch_is_one_line(tmp_path):
    rng = np.random.default_rng(0)
    base = rng.exponential(1.0, size=(3, 400))
    far = np.zeros(400, bool)
    far[:8] = True
    one_site = np.arange(400) < 100
    np.savez(tmp_path / "a.npz", walk=base * 0.8, **{"group:all": np.ones(400, bool), "group:sites_1": one_site})
    np.savez(tmp_path / "b.npz", walk=np.where(far, 50.0, base), short=base[:, :10],
             **{"group:all": np.ones(400, bool), "group:sites_1": one_site})
    out = tmp_path / "d.json"
    done = _run(f"{tmp_path}/a.npz:walk", f"{tmp_path}/b.npz:walk", "--n-boot", "200", "--json", str(out))
    assert done.returncode == 0, done.stderr
    res = json.loads(out.read_text())
    d = res["groups"]["all"]
    assert d["beyond_20m"]["delta"] == -0.02 and d["median_m"]["ci_high"] < 0 < -d["median_m"]["ci_low"]
    assert res["groups"]["sites_1"]["count"] == 100 and res["seeds"] == 3
    m = d["median_m"]  # the ratio (arm / reference) is printed with its CI, from the same replicates
    assert 0.75 < m["ratio"] < 0.85 and m["ratio_ci_low"] < m["ratio"] < m["ratio_ci_high"] < 1
    line = next(row for row in done.stdout.splitlines() if row.startswith("[all 400] median_m"))
    assert f"ratio {m['ratio']:.3f}× [{m['ratio_ci_low']:.3f}, {m['ratio_ci_high']:.3f}]" in line
    bad = _run(f"{tmp_path}/a.npz:walk", f"{tmp_path}/b.npz:short")
    assert bad.returncode != 0 and "differ in seeds or UEs" in bad.stderr and "Traceback" not in bad.stderr
    unknown = _run(f"{tmp_path}/a.npz:nope", f"{tmp_path}/b.npz:walk")
    assert "no method 'nope'" in unknown.stderr and "Traceback" not in unknown.stderr
