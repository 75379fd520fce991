"""``python -m core bench train``: the cost of the physics loss in a training epoch.

Two identical models (same seed, same batches) train side by side, one with
``lambda_phys = 0`` (no lookup at all) and one with ``lambda_phys > 0`` at full weight (after
its warm-up and ramp: routed to the position head, per-sample gradient clipping on). Their steps
are INTERLEAVED batch by batch, so a machine shared with other work slows both
equally; each variant's epoch time is the sum of its own step times (forward,
backward, optimizer step). Both wall time and process CPU time are recorded: on a
machine shared with other processes, CPU time is not inflated by waiting for a core,
so the overhead is computed from it, as ``median_i(cpu_phys,i / cpu_base,i) - 1`` over
the paired steps (robust to the odd step that another process disturbs); the
wall-clock ratio of the sums is reported next to it. On CUDA the host's CPU time does not
count the kernels, so the overhead there is the same median over synchronised wall-clock
steps (``overhead_clock``). Target: <= 5 %.

With ``--set data.label_fraction=F`` (< 1) the physics variant also has the coarse term
(:mod:`core.learning.coarse_physics`) on the unlabelled walks; its posterior is computed once
before the timed steps and reported separately (``coarse_prior_s``, not in any epoch time).

Data: the config's dataset (default: datasets/etoile); ``--synthetic N`` uses an
analytic scene with N UEs instead (no ray-traced data needed).

``--kinds``: instead of the physics overhead, the two MODEL KINDS (``model.kind`` memorizing and
agnostic, core/learning/kinds.py) at the config's λ, interleaved step by step on the same samples
(each kind its own tensors); reported: each kind's epoch time, the agnostic / memorizing ratio (median
paired CPU-time ratio, and of the wall sums) and each kind's batched inference time per sample
(one batch of ``predict``'s size, :data:`~core.learning.inference.PREDICT_BATCH`, no gradient), the issue-19
cost figures; ``python -m core bench inference`` times the whole prediction and the MAP search on a run's walks.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
import torch

from core import cli_types
from core.benchmarks.report import write_report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="configs/model.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--epochs", type=cli_types.count, default=1, help="epochs to time (default 1)")
    parser.add_argument("--max-steps", type=cli_types.count, default=None, help="time only this many batches per epoch")
    parser.add_argument("--lambda-phys", type=cli_types.non_negative, default=0.1, help="lambda_phys of the physics variant")
    parser.add_argument("--synthetic", type=cli_types.count, default=None, metavar="N", help="use an analytic scene with N UEs")
    parser.add_argument("--kinds", action="store_true",
                        help="time the memorizing and the agnostic model side by side (not the physics overhead)")


def _overhead(names: list[str], totals: dict[str, list[float]], steps: dict[str, list[float]],
              epochs: int, clock: str = "cpu") -> dict[str, float | bool | str]:
    """Epoch times of the two variants (``names``: baseline, physics) and the physics overhead.

    ``steps``: per-step times of ``clock`` ("cpu": process CPU time, the robust clock on a
    shared CPU; "wall": synchronised wall time, the only meaningful one on a GPU, where
    the host's CPU time does not count the kernels).
    """
    t_base, t_phys = float(np.sum(totals[names[0]])), float(np.sum(totals[names[1]]))
    ratios = np.array(steps[names[1]]) / np.maximum(np.array(steps[names[0]]), 1e-9)
    overhead = float(np.median(ratios)) - 1.0
    return {"epoch_s_lambda_0": t_base / epochs, "epoch_s_physics": t_phys / epochs, "physics_overhead": overhead,
            "overhead_clock": clock, "physics_overhead_wall": t_phys / t_base - 1.0, "overhead_target": 0.05,
            "within_target": bool(overhead <= 0.05)}


def _variants(configs, run_data, device) -> dict:
    """``{name: (config, model, physics term or None, optimiser)}``: same seed, same initial weights."""
    from core.learning.kinds import build_model
    from core.learning.physics_terms import make_physics_term

    variants = {}
    for name, cfg in configs.items():
        model = build_model(run_data.spec, cfg.seed).to(device)
        physics = make_physics_term(cfg, run_data.radio_map, device, run_data.dataset) if cfg.physics_active else None
        variants[name] = (cfg, model, physics, torch.optim.AdamW(model.parameters(), lr=cfg.training.learning_rate))
    return variants


def _coarse_prior(variants, data, run_data) -> dict:
    """Attach the coarse term's posterior for the physics variant (when it has one) to ``data``;
    returns its one-off cost (not part of any epoch time): ``coarse_prior_walks``, ``coarse_prior_s``."""
    from core.learning.coarse_physics import attach_cell_posterior
    from core.learning.physics_terms import SiteLikelihoodTerm

    for cfg, _, physics, _ in variants.values():
        if isinstance(physics, SiteLikelihoodTerm) and cfg.physics_loss.coarse_weight > 0:
            info = attach_cell_posterior(data, physics.likelihood, run_data.spec.bounds, run_data.spec.grid_size, cfg)
            return {"coarse_prior_walks": info["walks"], "coarse_prior_s": info["seconds"]}
    return {"coarse_prior_walks": 0, "coarse_prior_s": 0.0}


def _machine(device) -> str:
    """The machine in words, for the summary line: CPU (and GPU) and cores."""
    from core.device import machine_info

    m = machine_info()
    return m["cpu"] + (f", {m['cuda']}" if device.type == "cuda" else "") + f", {m['cores']} cores"


def _run_kinds(args: argparse.Namespace, device, overrides: list[str]) -> dict:
    """``--kinds``: epoch time and batched inference of the two model kinds (see the module doc)."""
    from core import resolve_path
    from core.learning.config import load_config
    from core.learning.kinds import build_model
    from core.learning.scene_data import prepare, tensors

    variants, rows = {}, []
    for kind in ("memorizing", "agnostic"):
        cfg = load_config(resolve_path(args.config), overrides + [f"model.kind={kind}"])
        if cfg.training.num_threads and device.type == "cpu":
            torch.set_num_threads(cfg.training.num_threads)
        run_data = prepare(cfg)
        data = tensors(run_data, "train", cfg)
        model = build_model(run_data.spec, cfg.seed).to(device)
        physics = None
        if cfg.physics_active:
            from core.learning.physics_terms import make_physics_term

            physics = make_physics_term(cfg, run_data.radio_map, device, run_data.dataset)
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.training.learning_rate)
        variants[kind] = (cfg, model, physics, opt, data, run_data.maps.to(device))

    def step(kind, idx):
        cfg, model, physics, opt, data, maps = variants[kind]
        return _timed_step(model, data.batch(idx, device), maps, cfg, physics, opt, device)

    n = min(len(v[4]) for v in variants.values())
    bs = variants["memorizing"][0].training.batch_size
    for kind in variants:
        for _ in range(2):
            step(kind, torch.arange(min(bs, n)))
    wall = {k: [] for k in variants}
    cpu = {k: [] for k in variants}
    for epoch in range(args.epochs):
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(epoch))
        for i, s in enumerate(list(range(0, n, bs))[: args.max_steps]):
            for kind in (list(variants) if i % 2 == 0 else list(reversed(variants))):
                w, c = step(kind, perm[s : s + bs])
                wall[kind].append(w)
                cpu[kind].append(c)
    from core.learning.inference import PREDICT_BATCH

    infer = {}
    for kind, (_, model, _, _, data, maps) in variants.items():
        model.eval()
        batch = data.batch(torch.arange(min(PREDICT_BATCH.get(device.type, 1024), len(data))), device)
        times = []
        with torch.no_grad():
            for _ in range(3):
                t0 = time.perf_counter()
                model(batch["feats"], batch["site_index"], batch["mask"], maps, scene_index=batch.get("scene_index"))
                times.append(time.perf_counter() - t0)
        infer[kind] = 1000 * min(times) / len(batch["feats"])
    steps_per_epoch = -(-n // bs)
    for kind in variants:
        rows.append({"variant": kind, "steps": len(wall[kind]), "batch_size": bs,
                     "parameters": sum(p.numel() for p in variants[kind][1].parameters()),
                     "ms_per_step": 1000 * float(np.median(wall[kind])), "cpu_ms_per_step": 1000 * float(np.median(cpu[kind])),
                     "epoch_s_extrapolated": steps_per_epoch * float(np.median(wall[kind])),
                     "inference_ms_per_sample": infer[kind]})
    ratio_cpu = float(np.median(np.array(cpu["agnostic"]) / np.maximum(np.array(cpu["memorizing"]), 1e-9)))
    return rows, {"machine": _machine(device), "dataset": variants["memorizing"][0].data.dataset, "train_samples": n,
                  "device": str(device), "lambda_phys": variants["memorizing"][0].physics_loss.lambda_phys,
                  "agnostic_over_memorizing_cpu": ratio_cpu,
                  "agnostic_over_memorizing_wall": float(np.sum(wall["agnostic"]) / np.sum(wall["memorizing"])),
                  "inference_ms_agnostic": infer["agnostic"], "inference_ms_memorizing": infer["memorizing"],
                  "inference_target_ms": 1.0}


def run(args: argparse.Namespace) -> int:
    from core import resolve_path
    from core.device import resolve_device
    from core.learning.config import load_config
    from core.learning.scene_data import prepare, tensors
    from core.physics.synthetic import synthetic_scene

    device = resolve_device(args.device)
    overrides = list(args.overrides)
    tmp = None
    if args.synthetic:
        tmp = tempfile.TemporaryDirectory()
        scene = synthetic_scene(tmp.name, num_ues=args.synthetic, height=128, width=128, cell=2.0, k=4)
        overrides += [f"{k}={v}" for k, v in scene.items()]
    if args.kinds:
        rows, summary = _run_kinds(args, device, overrides)
        write_report("train", rows, args.out, summary)
        if tmp is not None:
            tmp.cleanup()
        return 0
    base_cfg = load_config(resolve_path(args.config), overrides + ["physics_loss.lambda_phys=0"])
    phys_cfg = load_config(resolve_path(args.config), overrides + [f"physics_loss.lambda_phys={args.lambda_phys}"])
    if base_cfg.training.num_threads and device.type == "cpu":
        torch.set_num_threads(base_cfg.training.num_threads)
    run_data = prepare(base_cfg)
    data = tensors(run_data, "train", base_cfg)
    image = run_data.map_image.to(device)
    variants = _variants({"lambda_0": base_cfg, f"lambda_{args.lambda_phys:g}": phys_cfg}, run_data, device)
    prior = _coarse_prior(variants, data, run_data)

    def step(name, batch):
        cfg, model, physics, opt = variants[name]
        return _timed_step(model, batch, image, cfg, physics, opt, device)

    bs = base_cfg.training.batch_size
    warm = data.batch(torch.arange(min(bs, len(data))), device)
    for name in variants:
        for _ in range(2):
            step(name, warm)
    rows = []
    totals = {name: [] for name in variants}
    cpu_steps = {name: [] for name in variants}
    wall_steps = {name: [] for name in variants}
    for epoch in range(args.epochs):
        perm = torch.randperm(len(data), generator=torch.Generator().manual_seed(epoch))
        starts = list(range(0, len(perm), bs))[: args.max_steps]
        times = {name: 0.0 for name in variants}
        cpu = {name: 0.0 for name in variants}
        for i, s in enumerate(starts):
            batch = data.batch(perm[s : s + bs], device)
            order = list(variants) if i % 2 == 0 else list(reversed(variants))  # alternate who goes first
            for name in order:
                wall, c = step(name, batch)
                times[name] += wall
                cpu[name] += c
                cpu_steps[name].append(c)
                wall_steps[name].append(wall)
        for name, t in times.items():
            totals[name].append(t)
            rows.append({"epoch": epoch + 1, "variant": name, "steps": len(starts), "batch_size": bs,
                         "samples": min(len(perm), len(starts) * bs), "epoch_s": t, "epoch_cpu_s": cpu[name],
                         "ms_per_step": 1000 * t / max(len(starts), 1)})
    summary = {
        "machine": _machine(device),
        "dataset": base_cfg.data.dataset if not args.synthetic else f"synthetic ({args.synthetic} UEs)",
        "model_preset": base_cfg.model.preset, "train_samples": len(data), "device": str(device),
        **(_overhead(list(variants), totals, wall_steps, args.epochs, "wall") if device.type == "cuda"
           else _overhead(list(variants), totals, cpu_steps, args.epochs)),
        "label_fraction": base_cfg.data.label_fraction, **prior,
    }
    write_report("train", rows, args.out, summary)
    if tmp is not None:
        tmp.cleanup()
    return 0


def _timed_step(model, batch, maps, cfg, physics, opt, device) -> tuple[float, float]:
    """One optimiser step on ``batch``: ``(wall s, process CPU s)``, CUDA synchronised on both sides."""
    import torch

    from core.learning.losses import compute_losses

    if device.type == "cuda":
        torch.cuda.synchronize()
    t0, c0 = time.perf_counter(), time.process_time()
    terms, _ = compute_losses(model, batch, maps, cfg, physics)
    opt.zero_grad(set_to_none=True)
    terms["total"].backward()
    opt.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0, time.process_time() - c0
