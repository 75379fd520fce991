"""The learning and physics path on CUDA, against the same path on the CPU.

Skipped without a GPU (CI has none); run on a lent GPU machine with
``python -m pytest tests/test_cuda.py``. No Sionna: an analytic map and its dataset.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from core.learning.config import load_config
from core.learning.evaluation import evaluate_run
from core.learning.training import train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

TINY = ["model.preset=tiny", "training.batch_size=32", "training.epochs=2", "training.warmup_epochs=0",
        "training.num_threads=1", "physics_loss.lambda_phys=1.0", "physics_loss.warmup_epochs=0",
        "physics_loss.ramp_epochs=0"]


def test_bilinear_lookup_on_cuda_equals_the_cpu():
    from core.physics.lookup import lookup

    rng = np.random.default_rng(0)
    maps = torch.tensor(rng.normal(size=(3, 7, 24, 32)), dtype=torch.float32)  # 3 scenes
    xy = torch.tensor(rng.uniform([0, 0], [64, 48], size=(500, 2)), dtype=torch.float32, requires_grad=True)
    scene_index = torch.tensor(rng.integers(0, 3, 500))
    cpu = lookup(maps, xy, (0.0, 0.0, 64.0, 48.0), scene_index)
    (grad_cpu,) = torch.autograd.grad(cpu.sum(), xy)
    xy_gpu = xy.detach().cuda().requires_grad_(True)
    gpu = lookup(maps.cuda(), xy_gpu, (0.0, 0.0, 64.0, 48.0), scene_index.cuda())
    (grad_gpu,) = torch.autograd.grad(gpu.sum(), xy_gpu)
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_gpu.cpu(), grad_cpu, rtol=1e-4, atol=1e-4)


def test_training_and_map_refinement_on_cuda_match_the_cpu(scene, tmp_path):
    """Same seed and data: the CUDA run's loss curve and refined errors track the CPU run's."""
    results = {}
    for device in ("cpu", "cuda"):
        config = load_config("configs/model.yaml", scene + TINY)
        out = tmp_path / device
        history = train(config, out, device=device, show_progress=False)["history"]
        results[device] = (history, evaluate_run(out, "test", refine=True, device=device, write=False))
    (h_cpu, e_cpu), (h_gpu, e_gpu) = results["cpu"], results["cuda"]
    for a, b in zip(h_cpu, h_gpu, strict=True):
        for key in ("train_coarse", "train_fine", "train_phys", "val_total"):
            assert b[key] == pytest.approx(a[key], rel=0.05, abs=1e-3), key
    assert e_gpu["count"] == e_cpu["count"] > 0
    assert e_gpu["median_m"] == pytest.approx(e_cpu["median_m"], rel=0.1)
    after_cpu, after_gpu = e_cpu["refinement"]["after"], e_gpu["refinement"]["after"]
    assert np.isfinite(after_gpu["median_m"])
    assert after_gpu["median_m"] == pytest.approx(after_cpu["median_m"], rel=0.15, abs=0.5)


def test_the_cli_trains_and_evaluates_on_cuda(scene, tmp_path, capsys):
    from core.cli import main

    sets = [a for s in scene + TINY for a in ("--set", s)]
    run = tmp_path / "run"
    assert main(["train", "--config", "configs/model.yaml", *sets, "--out", str(run), "--device", "cuda",
                 "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["evaluate", "--run", str(run), "--refine", "--json", "--device", "cuda", "--no-progress"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert np.isfinite(result["median_m"]) and np.isfinite(result["refinement"]["after"]["median_m"])
