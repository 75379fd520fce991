"""Training: ``python -m core train --config configs/model.yaml [--set k=v ...] --out runs/NAME [--resume]``.

Loss per batch::

    L_total = L_coarse + lambda_fine * L_fine + lambda_phys * L_phys

* ``L_coarse``: cross-entropy of the coarse logits against the cell of the true
  position (:func:`core.model.coarse_loss`);
* ``L_fine``: Gaussian NLL of the true in-cell offset under the fine head evaluated at
  the TRUE cell (:func:`core.model.fine_loss`);
* ``L_phys``: :class:`core.physics_loss.PhysicsLoss` at the model's predicted position
  ``xy`` (argmax cell + offset, differentiable through the offset) against the serving-site
  features of the sample's LAST report, where the label is
  (``physics_loss.observation: last``; ``mean`` uses the temporal aggregate instead).
  Computed only when :attr:`Config.physics_active` (no lookup at all otherwise).

Run directory::

    config.yaml     the resolved config
    metrics.jsonl   one JSON object per epoch: epoch, lr, train_/val_ + total, coarse,
                    fine, phys, val_median_m, val_p90_m, epoch_s (rewritten atomically)
    best.pt         best val median (model, spec, config)       (atomic)
    last.pt         everything needed to resume                 (atomic)
    log.txt         human-readable log
    status.json     {"state": running|done|stopped, "epoch", "epochs", "best_val_median_m"}

Seeded: parameters from ``seed``, batch order from ``(seed, epoch)``, and the torch
RNG state is checkpointed, so a resumed run equals an uninterrupted one.
Distributed: under ``torchrun --nproc_per_node N`` each rank takes every N-th sample of
the epoch's permutation; gradients are averaged by DistributedDataParallel (gloo on
CPU, nccl on CUDA). Every rank evaluates the whole val set, so early stopping agrees;
rank 0 writes the run directory.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core import REPO_ROOT
from core.device import resolve_device
from core.errors import ConfigError, StoreError
from core.jobs import progress
from core.learning.config import Config, config_from_dict, load_config
from core.learning.data_loading import (
    TensorData,
    build_tensors,
    map_channels,
    map_input,
    num_site_embeddings,
    token_dim,
)
from core.learning.metrics import error_metrics, position_errors
from core.learning.model import MapConditionedTransformer, ModelSpec, coarse_loss, fine_loss
from core.stores.atomic import atomic_path, atomic_write_text
from core.stores.dataset import MeasurementDataset
from core.stores.radio_map import RadioMap

LOSS_TERMS = ("total", "coarse", "fine", "phys")


def resolve_path(path: str | os.PathLike) -> Path:
    """A repo-relative path (``datasets/etoile``) works from any working directory."""
    p = Path(path)
    if p.is_absolute() or p.exists():
        return p
    return REPO_ROOT / p if (REPO_ROOT / p).exists() else p


# -- data ---------------------------------------------------------------------------------
@dataclass
class RunData:
    dataset: MeasurementDataset
    radio_map: RadioMap
    map_image: torch.Tensor  # [C, S, S]
    spec: ModelSpec


def load_scene(config: Config) -> tuple[MeasurementDataset, RadioMap]:
    """The dataset and its scene's radio map named by ``config``."""
    dataset = MeasurementDataset.load(resolve_path(config.data.dataset))
    if config.data.max_samples is not None and config.data.max_samples < dataset.num_samples:
        dataset = dataset.subset(np.arange(config.data.max_samples))
    scene = config.data.scene or dataset.attrs.get("scene")
    if not scene:
        raise ConfigError(f"data.scene: not set and dataset {config.data.dataset} names no scene in its attrs")
    map_path = resolve_path(Path(config.physics_loss.radio_maps_dir) / f"{scene}.zarr")
    return dataset, RadioMap.load(map_path)


def model_spec(config: Config, dataset: MeasurementDataset, radio_map: RadioMap) -> ModelSpec:
    sizes = config.model.resolved()
    k = dataset.num_sites_per_report
    return ModelSpec(
        token_dim=token_dim(k, sizes["geometry_hint"]),
        num_site_embeddings=k * (num_site_embeddings(dataset) + 1) + 1,
        num_reports=dataset.num_reports,
        map_channels=map_channels(radio_map),
        bounds=tuple(radio_map.bounds),
        **sizes,
    )


def prepare(config: Config, dataset: MeasurementDataset | None = None, radio_map: RadioMap | None = None) -> RunData:
    if dataset is None or radio_map is None:
        dataset, radio_map = load_scene(config)
    spec = model_spec(config, dataset, radio_map)
    return RunData(dataset, radio_map, map_input(radio_map, spec.map_size), spec)


def tensors(run: RunData, split: str, config: Config) -> TensorData:
    idx = run.dataset.indices(split)
    if len(idx) == 0:
        raise StoreError(f"dataset {run.dataset.source or ''}: split {split!r} is empty")
    return build_tensors(run.dataset, run.radio_map, idx, run.spec.geometry_hint, config.physics_loss.observation)


def calibrated_weights(dataset: MeasurementDataset, radio_map: RadioMap, observation: str = "latest") -> dict[str, float]:
    """``feature_weights: auto``: ``w_f ∝ (sigma_map,f / s_f)^2`` from the TRAIN split.

    ``s_f = 1.4826 * median |r_f - median r_f|`` (a robust std) of the residual
    ``r = observed - map(true position)`` (AoA wrapped), so the physics loss's
    ``w_f (r_f / sigma_map,f)^2 = (r_f / s_f)^2``: each feature counts by how well the
    map predicts it, like a Gaussian likelihood with the measured spread. The weights are
    then scaled to the same sum as the default weights.
    """
    from core.features import feature_spec
    from core.learning.data_loading import physics_observation
    from core.physics.physics_loss import PhysicsLoss, guarded_sigma, resolve_weights

    idx = dataset.indices("train")
    sub = dataset.subset(idx)
    obs = physics_observation(sub, radio_map.features, observation)
    mask = np.isfinite(obs)
    loss = PhysicsLoss(radio_map, loss="mse")
    with torch.no_grad():
        res = loss(torch.from_numpy(sub.labels.astype(np.float32)), torch.from_numpy(np.where(mask, obs, 0.0)),
                   mask=torch.from_numpy(mask)).residual.double().numpy()
    weights = {}
    for f, name in enumerate(radio_map.features):
        r = res[mask[:, f], f]
        st = radio_map.stats[name]
        sigma_map = guarded_sigma(st.mean, st.std, feature_spec(name).angular)
        spread = 1.4826 * float(np.median(np.abs(r - np.median(r)))) if r.size else float("inf")
        spread = max(spread, 1e-3 * sigma_map)
        weights[name] = float(min((sigma_map / spread) ** 2, 1e6)) if np.isfinite(spread) else 0.0
    # Same total as the default weights: the relative weights carry the noise model, while
    # the loss keeps the magnitude that lambda_phys was chosen for.
    scale = sum(resolve_weights(radio_map.features, None)) / max(sum(weights.values()), 1e-12)
    return {name: w * scale for name, w in weights.items()}


def resolve_config(config: Config, dataset: MeasurementDataset, radio_map: RadioMap) -> Config:
    """``config`` with ``feature_weights: auto`` replaced by the calibrated numbers."""
    if config.physics_loss.feature_weights != "auto":
        return config
    data = config.to_dict()
    data["physics_loss"]["feature_weights"] = calibrated_weights(dataset, radio_map, config.physics_loss.observation)
    return config_from_dict(data, "resolved config")


def make_physics_loss(config: Config, radio_map: RadioMap, device: torch.device, dataset=None):
    from core.physics.physics_loss import PhysicsLoss

    if config.physics_loss.feature_weights == "auto":
        if dataset is None:
            raise ConfigError("physics_loss.feature_weights: 'auto' needs the dataset to calibrate on")
        config = resolve_config(config, dataset, radio_map)
    p = config.physics_loss
    return PhysicsLoss(radio_map, weights=p.feature_weights, loss=p.loss, huber_delta=p.huber_delta).to(device)


# -- losses -------------------------------------------------------------------------------
def compute_losses(model, batch: dict[str, torch.Tensor], map_image: torch.Tensor, config: Config, physics=None):
    """Loss terms of one batch: ``(dict name -> scalar tensor, ModelOutput)``; ``phys`` is None when off."""
    net = model.module if hasattr(model, "module") else model
    target_cell, target_offset = net.cell_of(batch["target_xy"])
    out = model(batch["feats"], batch["site_index"], batch["mask"], map_image, target_cell=target_cell)
    terms: dict[str, Any] = {
        "coarse": coarse_loss(out.logits, target_cell),
        "fine": fine_loss(out.target_offset_pred, out.target_logvar, target_offset),
        "phys": None,
    }
    total = terms["coarse"] + config.training.loss.lambda_fine * terms["fine"]
    if physics is not None and config.physics_active:
        terms["phys"] = physics(out.xy, batch["observed"], mask=batch["obs_mask"]).total
        total = total + config.physics_loss.lambda_phys * terms["phys"]
    terms["total"] = total
    return terms, out


@torch.no_grad()
def predict_tensors(model, data: TensorData, map_image: torch.Tensor, device, batch_size: int = 1024,
                    config: Config | None = None, physics=None) -> dict[str, Any]:
    """Model outputs over ``data`` (eval mode): numpy ``xy, sigma, confidence, offset, logvar, cell``
    plus mean loss terms when ``config`` is given."""
    net = model.module if hasattr(model, "module") else model
    was_training = net.training
    net.eval()
    keys = ("xy", "sigma", "confidence")
    outs: dict[str, list] = {k: [] for k in keys}
    sums = {k: 0.0 for k in LOSS_TERMS}
    for start in range(0, len(data), batch_size):
        idx = torch.arange(start, min(start + batch_size, len(data)))
        batch = data.batch(idx, device)
        if config is not None:
            terms, out = compute_losses(net, batch, map_image, config, physics)
            for k in LOSS_TERMS:
                if terms[k] is not None:
                    sums[k] += float(terms[k]) * len(idx)
        else:
            out = net(batch["feats"], batch["site_index"], batch["mask"], map_image)
        for k in keys:
            outs[k].append(getattr(out, k).float().cpu())
    net.train(was_training)
    result = {k: torch.cat(v).numpy() for k, v in outs.items()}
    if config is not None:
        result["losses"] = {k: (sums[k] / len(data) if (k != "phys" or physics is not None) else None) for k in LOSS_TERMS}
    return result


# -- schedule, checkpoints ----------------------------------------------------------------
def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up over ``warmup`` steps then cosine decay to 0.02 at ``total``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress_ = min(max((step - warmup) / max(total - warmup, 1), 0.0), 1.0)
    return 0.02 + 0.98 * 0.5 * (1.0 + math.cos(math.pi * progress_))


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load_checkpoint(path: Path, device="cpu") -> dict[str, Any]:
    if not path.exists():
        raise StoreError(f"{path}: no such checkpoint")
    try:
        return torch.load(path, map_location=device, weights_only=False)
    except Exception as exc:
        raise StoreError(f"{path}: corrupt checkpoint ({type(exc).__name__}: {exc})") from None


def build_model(spec: ModelSpec | dict, seed: int = 0) -> MapConditionedTransformer:
    if isinstance(spec, dict):
        spec = ModelSpec(**{**spec, "bounds": tuple(spec["bounds"])})
    torch.manual_seed(seed)
    return MapConditionedTransformer(spec)


# -- distributed ----------------------------------------------------------------------------
def _dist_setup(device: torch.device) -> tuple[int, int, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, device
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank = dist.get_rank()
    if device.type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    return rank, world, device


# -- the loop ---------------------------------------------------------------------------------
def train(config: Config, out_dir: str | os.PathLike, resume: bool = False, device: str | torch.device = "auto",
          run_data: RunData | None = None, show_progress: bool = True, max_epochs: int | None = None) -> dict[str, Any]:
    """Train ``config`` into ``out_dir``; returns ``{"best_val_median_m", "epochs_run", "stopped_early", ...}``.

    ``max_epochs`` stops after that many epochs in this call (tests interrupt a run with it).
    """
    device = resolve_device(device)
    rank, world, device = _dist_setup(device)
    is_main = rank == 0
    t = config.training
    if t.num_threads and device.type == "cpu":
        torch.set_num_threads(max(1, t.num_threads // world))
    out = Path(out_dir)
    if is_main:
        out.mkdir(parents=True, exist_ok=True)

    run = run_data or prepare(config)
    if config.physics_active:  # calibrate "auto" weights now, so the run's config.yaml holds the numbers
        config = resolve_config(config, run.dataset, run.radio_map)
    train_data, val_data = tensors(run, "train", config), tensors(run, "val", config)
    map_image = run.map_image.to(device)
    model = build_model(run.spec, config.seed).to(device)
    physics = make_physics_loss(config, run.radio_map, device) if config.physics_active else None

    steps_per_epoch = max(1, (len(train_data) // world) // t.batch_size + int((len(train_data) // world) % t.batch_size > 0))
    total_steps = steps_per_epoch * t.epochs
    warmup = steps_per_epoch * t.warmup_epochs
    optimizer = torch.optim.AdamW(model.parameters(), lr=t.learning_rate, weight_decay=t.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total_steps, warmup))

    start_epoch, best, bad_epochs, history = 0, float("inf"), 0, []
    last_path, best_path = out / "last.pt", out / "best.pt"
    if resume and last_path.exists():
        ckpt = load_checkpoint(last_path, device)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        torch.set_rng_state(ckpt["rng"])
        start_epoch, best, bad_epochs = ckpt["epoch"], ckpt["best_val_median_m"], ckpt["bad_epochs"]
        history = [row for row in _read_metrics(out) if row.get("epoch", 0) <= start_epoch]
    elif resume and is_main:
        _log(out, f"--resume: no {last_path}, starting from scratch")

    net = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        net = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)

    if is_main:
        atomic_write_text(out / "config.yaml", config.to_yaml())
        _log(out, f"train {len(train_data)} val {len(val_data)} samples, {sum(p.numel() for p in model.parameters())} "
                  f"parameters, physics {f'on (lambda={config.physics_loss.lambda_phys:g})' if physics else 'off'}, "
                  f"device {device}, world {world}, epochs {start_epoch}->{t.epochs}")
    bar = None
    if show_progress and is_main:
        from tqdm import tqdm

        bar = tqdm(total=t.epochs, initial=start_epoch, desc="train", unit="epoch")

    stopped_early = False
    epochs_this_call = 0
    for epoch in range(start_epoch, t.epochs):
        if max_epochs is not None and epochs_this_call >= max_epochs:
            break
        t0 = time.perf_counter()
        net.train()
        gen = torch.Generator().manual_seed(config.seed * 100_003 + epoch)
        perm = torch.randperm(len(train_data), generator=gen)
        per_rank = len(perm) // world
        perm = perm[rank * per_rank : (rank + 1) * per_rank] if world > 1 else perm
        sums = {k: 0.0 for k in LOSS_TERMS}
        for step, s in enumerate(range(0, len(perm), t.batch_size)):
            batch = train_data.batch(perm[s : s + t.batch_size], device)
            terms, _ = compute_losses(net, batch, map_image, config, physics)
            optimizer.zero_grad(set_to_none=True)
            terms["total"].backward()
            if t.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
            optimizer.step()
            scheduler.step()
            for k in LOSS_TERMS:
                if terms[k] is not None:
                    sums[k] += float(terms[k].detach()) * len(batch["feats"])
            if is_main:
                frac = (epoch + (step + 1) / steps_per_epoch) / t.epochs
                progress.report(frac, f"epoch {epoch + 1}/{t.epochs}")
        n_seen = max(len(perm), 1)
        val = predict_tensors(net, val_data, map_image, device, config=config, physics=physics)
        err = position_errors(val["xy"], val_data.target_xy.numpy())
        vm = error_metrics(err)
        epoch_s = time.perf_counter() - t0
        row = {"epoch": epoch + 1, "lr": optimizer.param_groups[0]["lr"]}
        for k in LOSS_TERMS:
            row[f"train_{k}"] = sums[k] / n_seen if (k != "phys" or physics is not None) else None
        for k in LOSS_TERMS:
            row[f"val_{k}"] = val["losses"][k]
        row.update(val_median_m=vm["median_m"], val_p90_m=vm["p90_m"], epoch_s=epoch_s)
        history.append(row)
        epochs_this_call += 1

        improved = vm["median_m"] < best
        if improved:
            best, bad_epochs = vm["median_m"], 0
        else:
            bad_epochs += 1
        stop = t.early_stopping_patience > 0 and bad_epochs >= t.early_stopping_patience
        if is_main:
            meta = {"spec": asdict(run.spec), "config": config.to_dict(), "epoch": epoch + 1}
            if improved:
                save_checkpoint(best_path, {**meta, "model": model.state_dict(), "val": vm})
            save_checkpoint(last_path, {**meta, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                        "scheduler": scheduler.state_dict(), "rng": torch.get_rng_state(),
                                        "best_val_median_m": best, "bad_epochs": bad_epochs})
            _write_metrics(out, history)
            _log(out, f"epoch {epoch + 1}: " + ", ".join(f"{k}={v:.4g}" for k, v in row.items()
                                                       if isinstance(v, float) and k != "epoch"))
            _write_status(out, "running", epoch + 1, t.epochs, best)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{row['train_total']:.3f}", val_med=f"{vm['median_m']:.2f}m")
        if stop:
            stopped_early = True
            if is_main:
                _log(out, f"early stop: val median has not improved for {bad_epochs} epochs")
            break
    if bar is not None:
        bar.close()
    finished = stopped_early or (history and history[-1]["epoch"] >= t.epochs)
    if is_main:
        _write_status(out, "done" if finished else "stopped", history[-1]["epoch"] if history else 0, t.epochs, best)
        progress.report(1.0 if finished else (history[-1]["epoch"] / t.epochs if history else 0.0), "training done")
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
    return {"best_val_median_m": best, "epochs_run": len(history), "stopped_early": stopped_early,
            "history": history, "rank": rank, "world": world}


def _log(out: Path, line: str) -> None:
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    with open(out / "log.txt", "a") as fh:
        fh.write(f"{stamp} {line}\n")


def _read_metrics(out: Path) -> list[dict]:
    path = Path(out) / "metrics.jsonl"
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line:
            try:
                rows.append(json.loads(line))
            except ValueError:
                break  # a torn last line: keep what came before
    return rows


def _write_metrics(out: Path, history: list[dict]) -> None:
    atomic_write_text(out / "metrics.jsonl", "".join(json.dumps(row) + "\n" for row in history))


def _write_status(out: Path, state: str, epoch: int, epochs: int, best: float) -> None:
    atomic_write_text(out / "status.json", json.dumps(
        {"state": state, "epoch": epoch, "epochs": epochs,
         "best_val_median_m": best if math.isfinite(best) else None}))


# -- CLI ----------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="configs/model.yaml", help="YAML config (default: configs/model.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a config key (YAML value); repeatable")
    parser.add_argument("--out", required=True, help="run directory, e.g. runs/NAME")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm bar")


def run(args: argparse.Namespace) -> int:
    config = load_config(resolve_path(args.config), args.overrides)
    out = Path(args.out)
    if not args.resume and (out / "last.pt").exists():
        raise ConfigError(f"--out {out}: already holds a run (use --resume, or another directory)")
    result = train(config, out, resume=args.resume, device=args.device, show_progress=not args.no_progress)
    if result["rank"] == 0:
        print(f"best val median {result['best_val_median_m']:.2f} m after {result['epochs_run']} epochs -> {out}")
    return 0


def config_of_run(run_dir: str | os.PathLike) -> Config:
    path = Path(run_dir) / "config.yaml"
    if not path.exists():
        raise StoreError(f"{path}: no such file (not a run directory?)")
    return load_config(path)


__all__ = ["train", "compute_losses", "predict_tensors", "prepare", "load_scene", "resolve_path", "config_from_dict"]
