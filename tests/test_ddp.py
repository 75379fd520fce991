"""DistributedDataParallel training with 2 CPU processes (gloo), through torchrun."""

import json
import subprocess
import sys
from pathlib import Path

import torch

from core.physics.synthetic import synthetic_scene

ROOT = Path(__file__).resolve().parents[1]


def test_two_process_ddp_on_cpu(tmp_path):
    overrides = synthetic_scene(tmp_path / "scene", num_ues=120, height=16, width=16, cell=4.0, reports=4, k=2)
    sets = [f"{k}={v}" for k, v in overrides.items()] + [
        "model.preset=tiny", "training.epochs=2", "training.batch_size=16", "training.num_threads=2",
        "physics_loss.lambda_phys=0.1"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "core", "train", "--device", "cpu", "--config", "configs/model.yaml", "--out", str(tmp_path / "run"),
           "--no-progress"]
    for s in sets:
        cmd += ["--set", s]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    log = (tmp_path / "run" / "log.txt").read_text()
    assert "world 2" in log  # really two processes
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]  # rank 0 alone writes the run directory
    assert all(r["train_phys"] is not None for r in rows)
    ckpt = torch.load(tmp_path / "run" / "last.pt", weights_only=False)
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())
    assert proc.stdout.count("best val median") == 1
