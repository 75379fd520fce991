"""Training: ``python -m core train --config configs/model.yaml [--set k=v ...] --out runs/NAME [--resume]``.

This module holds the loop, its checkpoints and the CLI. A run's data comes from
:mod:`core.learning.scene_data`, the physics term from :mod:`core.learning.physics_terms`, the loss of a
batch from :mod:`core.learning.losses`.

Loss per batch::

    L_total = L_coarse + lambda_fine * L_fine + lambda_phys(t) * L_phys

* ``L_coarse``: cross-entropy of the coarse logits against the cell of the true
  position (:func:`core.model.coarse_loss`), over the LABELLED walks of the batch;
* ``L_fine``: Gaussian NLL of the true in-cell offset under the fine head evaluated at
  the TRUE cell (:func:`core.model.fine_loss`), over the labelled walks;
* ``L_phys``: the physics term, an injected callable ``physics(xy [B, 2], batch) -> [B]``
  per-sample loss (:func:`~core.learning.physics_terms.make_physics_term`: by default
  :class:`~core.learning.physics_terms.SiteLikelihoodTerm`, the
  calibrated per-site robust NLL of the pooled reports), evaluated at the predicted position
  routed to the position head only (``ModelOutput.head_xy``), averaged over the samples with
  an observation, labelled or not. Each sample's gradient w.r.t. its position is clipped to
  ``physics_loss.per_sample_grad_clip`` (:func:`~core.learning.physics_terms.physics_term`). Computed only when
  ``physics_loss.lambda_phys > 0`` (no lookup at all otherwise).
  With ``physics_loss.coarse_weight > 0`` (site likelihood), ``L_phys`` also holds
  ``coarse_weight * L_coarse_phys``: the cross-entropy of the coarse logits to the map likelihood's
  posterior over the cells, computed once before training for the unlabelled train walks (all with
  ``coarse_on_labelled``) and averaged over them (:mod:`core.learning.coarse_physics`). It reaches
  the coarse head and the trunk, like ``L_coarse`` with a soft label; the one-off cost is logged.
  With ``physics_loss.mode_weight > 0`` it also holds ``mode_weight * L_mode``: on those unlabelled
  walks the fine head, evaluated at the posterior's most likely cell, regresses to the likelihood's
  best point in that cell (weighted by its q) -- the fine counterpart of the coarse term.
* ``lambda_phys(t)`` (:meth:`Config.lambda_at`): 0 for ``physics_loss.warmup_epochs``, then a
  linear ramp (per step) over ``physics_loss.ramp_epochs`` to ``lambda_phys``.

``data.label_fraction < 1`` keeps the labels of only that fraction of the train walks (drawn
with ``seed``); the others contribute the physics term alone. ``training.init_from: RUN`` starts from
that run's weights (:mod:`core.learning.fine_tune`; fresh optimiser and schedule, recorded in lineage.json);
with ``data.label_fraction: 0`` the likelihood's calibration is transferred from it and no label is read.
``training.distill_from: [RUN, ...]`` adds ``distill_weight * L_distill``: the network also learns those runs'
pooled predictions (an ensemble), computed once before training (:mod:`core.learning.distill`).
``training.model_selection: last`` (forced with no label) keeps the last epoch in best.pt, never reads the
val split and never stops early (its metrics rows have ``val_*`` None). ``data.split: spatial`` holds out
whole map blocks for val and test (applied at load time). With the physics term off, unlabelled
walks are left out of the forward pass (they would contribute nothing).

Each epoch also measures, on one fixed train batch, the gradient norm of each term as it enters
``L_total`` at full weight (w.r.t. all model parameters) and the cosine between the supervised
(coarse + fine) and physics gradients (:func:`~core.learning.losses.gradient_balance`), written to metrics.jsonl.

Run directory: :mod:`core.stores.run` (config.yaml, metrics.jsonl, best.pt, last.pt,
log.txt, status.json, lineage.json). A taken directory is refused unless ``--resume``
continues it or ``--force`` replaces it; with ``--force`` the new run is written beside
the old one and takes its place only when training ends (a failed run leaves the old one).

Data: the scene is the dataset's; its radio map is ``<physics_loss.radio_maps_dir>/<scene>.zarr``
and must be the map the dataset was made with (:mod:`core.stores.lineage`). With ``data.datasets``
one model trains on several scenes (docs/model.md, "Many scenes"): each sample carries its
``scene_index``, the model reads that scene's map (:class:`~core.learning.model.SceneMaps`, cells in
the scene's own bounds) and the physics term that scene's calibrated likelihood
(:class:`~core.learning.physics_terms.SceneTerms`).

Seeded: parameters from ``seed``, batch order from ``(seed, epoch)``, and the torch
RNG state is checkpointed, so a resumed run equals an uninterrupted one.
Distributed: under ``torchrun --nproc_per_node N`` each rank takes every N-th sample of
the epoch's permutation; gradients are averaged by DistributedDataParallel (gloo on
CPU, nccl on CUDA). Every rank evaluates the whole val set, so early stopping agrees;
rank 0 writes the run directory.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from core import progress, resolve_path
from core.device import resolve_device
from core.errors import StoreError
from core.learning import fine_tune
from core.learning.coarse_physics import attach_cell_posterior
from core.learning.config import Config, load_config
from core.learning.data_loading import TensorData, concat_tensors
from core.learning.distill import attach_teacher_targets, check_teachers
from core.learning.fine_tune import InitRun, check_init_from, init_feature_weights, lineage_record, load_weights
from core.learning.kinds import build_model
from core.learning.losses import LOSS_TERMS, compute_losses, gradient_balance, predict_tensors
from core.learning.metrics import error_metrics, position_errors
from core.learning.model import MapConditionedTransformer, SceneMaps
from core.learning.physics_terms import SiteLikelihoodTerm, make_scene_physics, resolve_config, scene_terms
from core.learning.scene_data import RunData, prepare, scene_tensors, tensors
from core.stores import run as run_store
from core.stores.atomic import atomic_path, atomic_write_text
from core.stores.lock import output_lock
from core.stores.output import check_writable


# -- schedule -------------------------------------------------------------------
def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up over ``warmup`` steps then cosine decay to 0.02 at ``total``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress_ = min(max((step - warmup) / max(total - warmup, 1), 0.0), 1.0)
    return 0.02 + 0.98 * 0.5 * (1.0 + math.cos(math.pi * progress_))


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
@dataclass
class _Loop:
    """One training loop: model (``net`` is its DDP wrapper when distributed), optimiser,
    data, and the progress so far (``best`` val median [m], epochs without improvement)."""

    config: Config
    run: RunData
    device: torch.device
    rank: int
    world: int
    model: MapConditionedTransformer
    optimizer: torch.optim.Optimizer
    scheduler: Any
    physics: Any
    train_data: TensorData
    val_data: TensorData
    maps: SceneMaps  # every scene's map [M, C, S, S] and bounds [M, 4], on the device
    steps_per_epoch: int
    diag_batch: dict[str, torch.Tensor]  # the fixed train batch the gradient balance is measured on
    coarse_prior: dict[str, float] | None = None  # the coarse term's one-off posterior: walks, seconds
    net: Any = None
    start_epoch: int = 0
    best: float = math.inf
    bad_epochs: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    status: run_store.StatusWriter | None = None  # status.json of the run being written (rank 0)
    init: InitRun | None = None  # the run whose weights this one started from (training.init_from)
    taught: dict[str, Any] | None = None  # the teachers' one-off targets (training.distill_from): walks, seconds

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _build_loop(config: Config, run: RunData, device: torch.device, rank: int, world: int,
                init: InitRun | None = None, teachers: list | None = None) -> _Loop:
    t = config.training
    parts = [scene_tensors(run, m, "train", config) for m in range(len(run.scenes))]
    val_data = tensors(run, "val", config)
    model = build_model(run.spec, config.seed)
    if init is not None:  # fine-tuning: the init run's weights, a fresh optimiser and schedule
        load_weights(model, init)
    model = model.to(device)
    # no labelled walk: the likelihood's calibration is the init run's, transferred (never this scene's labels)
    calibrations = None
    if config.data.label_fraction == 0:
        calibrations = fine_tune.transferred_calibrations(init, [(s.dataset, s.radio_map) for s in run.scenes])
    physics = make_scene_physics(config, run, device, calibrations) if config.physics_active else None
    prior = _attach_posteriors(run, parts, physics, config)
    taught = attach_teacher_targets(parts[0], teachers, model, model.frame(run.maps.to(device))) if teachers else None
    train_data = concat_tensors(parts)
    per_rank = len(train_data) // world
    steps_per_epoch = max(1, per_rank // t.batch_size + int(per_rank % t.batch_size > 0))
    total_steps, warmup = steps_per_epoch * t.epochs, steps_per_epoch * t.warmup_epochs
    optimizer = torch.optim.AdamW(model.parameters(), lr=t.learning_rate, weight_decay=t.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total_steps, warmup))
    diag_batch = train_data.batch(torch.arange(min(t.batch_size, len(train_data))), device)
    return _Loop(config, run, device, rank, world, model, optimizer, scheduler, physics, train_data, val_data,
                 run.maps.to(device), steps_per_epoch, diag_batch, coarse_prior=prior, init=init, taught=taught)


def _attach_posteriors(run: RunData, parts: list[TensorData], physics, config: Config) -> dict[str, float] | None:
    """The coarse term's one-off posterior (:func:`attach_cell_posterior`) into each scene's train tensors
    ``parts``, with that scene's likelihood and bounds; None when the term is off, else ``{"walks", "seconds"}``."""
    terms = scene_terms(physics) if physics is not None else []
    if not (terms and isinstance(terms[0], SiteLikelihoodTerm) and config.physics_loss.coarse_weight > 0):
        return None
    total = {"walks": 0, "seconds": 0.0}
    for scene, term, part in zip(run.scenes, terms, parts):
        info = attach_cell_posterior(part, term.likelihood, tuple(scene.radio_map.bounds), run.spec.grid_size, config)
        total = {k: total[k] + info[k] for k in total}
    return total


def _restore(loop: _Loop, out: Path) -> None:
    """Continue from ``out/last.pt``: weights, optimiser, schedule, RNG and the metrics so far."""
    ckpt = run_store.load_checkpoint(out / run_store.LAST, loop.device)
    spec = asdict(loop.run.spec)
    changed = [f"{k}: {ckpt['spec'].get(k)} → {v}" for k, v in spec.items() if ckpt["spec"].get(k) != v]
    if changed:
        raise StoreError(f"{out / run_store.LAST}: holds a model of another shape than this config builds "
                         f"({'; '.join(changed)}); resume with the run's own config or train a new run")
    loop.model.load_state_dict(ckpt["model"])
    loop.optimizer.load_state_dict(ckpt["optimizer"])
    loop.scheduler.load_state_dict(ckpt["scheduler"])
    torch.set_rng_state(ckpt["rng"])
    loop.start_epoch, loop.best, loop.bad_epochs = ckpt["epoch"], ckpt["best_val_median_m"], ckpt["bad_epochs"]
    loop.history = [row for row in run_store.read_metrics(out) if row.get("epoch", 0) <= loop.start_epoch]


def _wrap_distributed(loop: _Loop) -> None:
    loop.net = loop.model
    if loop.world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        loop.net = DDP(loop.model, device_ids=[loop.device.index] if loop.device.type == "cuda" else None)


def _start_run_dir(loop: _Loop, out: Path) -> None:
    """Write the run's config, lineage and first log line (rank 0)."""
    config, physics, scenes = loop.config, loop.physics, loop.run.scenes
    init = lineage_record(loop.init, config.training.init_from) if loop.init is not None else None
    run_store.write_lineage(out, loop.run.dataset.ref, loop.run.radio_map.ref,
                            [(s.dataset.ref, s.radio_map.ref) for s in scenes], config.data.holdout_scene, init)
    for m, term in enumerate(scene_terms(physics) if physics is not None else []):
        if term.calibration is not None:  # the first scene's is calibration.json, as for one scene
            run_store.write_calibration(out, term.calibration, None if m == 0 else scenes[m].name)
    atomic_write_text(out / run_store.CONFIG, config.to_yaml())
    params = sum(p.numel() for p in loop.model.parameters())
    p, labeled = config.physics_loss, int(loop.train_data.labeled.sum())
    phys = (f"on (lambda={p.lambda_phys:g} after {p.warmup_epochs:g} warm-up + {p.ramp_epochs:g} ramp epochs, "
            f"per-sample gradient clip {p.per_sample_grad_clip:g})" if physics else "off")
    if loop.coarse_prior is not None:
        phys += (f"; coarse term weight {p.coarse_weight:g}, mode term weight {p.mode_weight:g}: posterior over the cells of "
                 f"{loop.coarse_prior['walks']} walks in {loop.coarse_prior['seconds']:.1f} s (once)")
    run_store.append_log(out, f"train {len(loop.train_data)} ({labeled} labelled) val {len(loop.val_data)} samples, "
                              f"split {config.data.split}, {params} parameters, physics {phys}, "
                              f"{_describe_scenes(loop.run)}, "
                              f"device {loop.device}, world {loop.world}, epochs {loop.start_epoch}->{config.training.epochs}, "
                              f"model selection {config.selection}"
                              + (f", weights from {init['run']}/{init['checkpoint']} (epoch {init['epoch']})" if init else "")
                              + (f", distilled from {', '.join(config.training.distill_from)} (weight "
                                 f"{config.training.distill_weight:g}; their targets for {loop.taught['walks']} walks "
                                 f"in {loop.taught['seconds']:.1f} s, once)" if loop.taught else ""))


def _describe_scenes(run: RunData) -> str:
    """``dataset …, map …`` of the one scene, or ``N scenes: name (dataset …, map …), …``."""
    parts = [f"dataset {s.dataset.ref.describe()}, map {s.radio_map.ref.describe()}" for s in run.scenes]
    if len(parts) == 1:
        return parts[0]
    return f"{len(parts)} scenes: " + "; ".join(f"{s.name} ({p})" for s, p in zip(run.scenes, parts))


def _train_epoch(loop: _Loop, epoch: int) -> tuple[dict[str, float], int]:
    """One pass over this rank's share of the train split: ``(summed loss terms, samples seen)``; λ_phys
    follows :meth:`Config.lambda_at` step by step."""
    t = loop.config.training
    loop.net.train()
    gen = torch.Generator().manual_seed(loop.config.seed * 100_003 + epoch)
    perm = torch.randperm(len(loop.train_data), generator=gen)
    per_rank = len(perm) // loop.world
    perm = perm[loop.rank * per_rank : (loop.rank + 1) * per_rank] if loop.world > 1 else perm
    sums, seen = {k: 0.0 for k in LOSS_TERMS}, 0
    labeled = loop.train_data.labeled
    skip_unlabeled = loop.physics is None and not bool(labeled.all())  # they would contribute nothing
    for step, s in enumerate(range(0, len(perm), t.batch_size)):
        idx = perm[s : s + t.batch_size]
        if skip_unlabeled and bool(labeled[idx].any()):
            idx = idx[labeled[idx]]
        batch = loop.train_data.batch(idx, loop.device)
        lam = loop.config.lambda_at(epoch + step / loop.steps_per_epoch)
        terms, _ = compute_losses(loop.net, batch, loop.maps, loop.config, loop.physics, lam)
        loop.optimizer.zero_grad(set_to_none=True)
        terms["total"].backward()
        if t.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(loop.model.parameters(), t.grad_clip)
        loop.optimizer.step()
        loop.scheduler.step()
        for k in (*LOSS_TERMS, "distill"):
            if terms.get(k) is not None:
                sums[k] = sums.get(k, 0.0) + float(terms[k].detach()) * len(idx)
        seen += len(idx)
        if loop.is_main:
            progress.report((epoch + (step + 1) / loop.steps_per_epoch) / t.epochs, f"epoch {epoch + 1}/{t.epochs}")
    return sums, max(seen, 1)


def _validate(loop: _Loop, lambda_phys: float) -> tuple[dict[str, float | None], dict[str, float | None]]:
    """``(mean val loss terms, val error metrics)`` of the current model (``total`` with ``lambda_phys``);
    with ``model_selection: last`` the val split is not read at all (every value None)."""
    if loop.config.selection == "last":
        return {k: None for k in LOSS_TERMS}, {"median_m": None, "p90_m": None}
    val = predict_tensors(loop.net, loop.val_data, loop.maps, loop.device, config=loop.config,
                          physics=loop.physics, lambda_phys=lambda_phys)
    return val["losses"], error_metrics(position_errors(val["xy"], loop.val_data.target_xy.numpy()))


def _epoch_row(loop: _Loop, epoch: int, sums: dict[str, float], n_seen: int, val_losses: dict[str, float | None],
               val: dict[str, float], epoch_s: float, grads: dict[str, float | None]) -> dict[str, Any]:
    """The epoch's metrics row (see :mod:`core.stores.run`)."""
    row: dict[str, Any] = {"epoch": epoch + 1, "lr": loop.optimizer.param_groups[0]["lr"],
                           "lambda_phys": loop.config.lambda_at(epoch + 1) if loop.physics is not None else 0.0}
    for k in LOSS_TERMS:
        row[f"train_{k}"] = sums[k] / n_seen if (k != "phys" or loop.physics is not None) else None
    if "distill" in sums:
        row["train_distill"] = sums["distill"] / n_seen
    for k in LOSS_TERMS:
        row[f"val_{k}"] = val_losses[k]
    row.update(val_median_m=val["median_m"], val_p90_m=val["p90_m"], epoch_s=epoch_s, **grads)
    return row


def _save_epoch(loop: _Loop, out: Path, row: dict[str, Any], improved: bool, val: dict[str, Any]) -> None:
    """Checkpoints, metrics, log line and status after an epoch (rank 0)."""
    meta = {"spec": asdict(loop.run.spec), "config": loop.config.to_dict(), "epoch": row["epoch"]}
    if improved:
        run_store.save_checkpoint(out / run_store.BEST, {**meta, "model": loop.model.state_dict(), "val": val})
    run_store.save_checkpoint(out / run_store.LAST, {
        **meta, "model": loop.model.state_dict(), "optimizer": loop.optimizer.state_dict(),
        "scheduler": loop.scheduler.state_dict(), "rng": torch.get_rng_state(),
        "best_val_median_m": loop.best, "bad_epochs": loop.bad_epochs})
    run_store.write_metrics(out, loop.history)
    run_store.append_log(out, f"epoch {row['epoch']}: " + ", ".join(
        f"{k}={v:.4g}" for k, v in row.items() if isinstance(v, float) and k != "epoch"))
    loop.status.update("running", row["epoch"], loop.best)


def _run_epochs(loop: _Loop, out: Path, max_epochs: int | None, bar) -> bool:
    """Train from ``loop.start_epoch``; returns whether early stopping ended the run."""
    t = loop.config.training
    for epochs_this_call, epoch in enumerate(range(loop.start_epoch, t.epochs)):
        if max_epochs is not None and epochs_this_call >= max_epochs:
            break
        t0 = time.perf_counter()
        grads = gradient_balance(loop.model, loop.diag_batch, loop.maps, loop.config, loop.physics)
        sums, n_seen = _train_epoch(loop, epoch)
        val_losses, val = _validate(loop, loop.config.lambda_at(epoch + 1))
        row = _epoch_row(loop, epoch, sums, n_seen, val_losses, val, time.perf_counter() - t0, grads)
        loop.history.append(row)
        if loop.config.selection == "last":  # best.pt holds the last epoch's weights; no early stopping
            improved = True
        else:
            improved = val["median_m"] < loop.best
            loop.best, loop.bad_epochs = (val["median_m"], 0) if improved else (loop.best, loop.bad_epochs + 1)
        if loop.is_main:
            _save_epoch(loop, out, row, improved, val)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{row['train_total']:.3f}",
                                **({"val_med": f"{val['median_m']:.2f}m"} if val["median_m"] is not None else {}))
        if t.early_stopping_patience > 0 and loop.bad_epochs >= t.early_stopping_patience:
            if loop.is_main:
                run_store.append_log(out, f"early stop: val median has not improved for {loop.bad_epochs} epochs")
            return True
    return False


def train(config: Config, out_dir: str | os.PathLike, resume: bool = False, device: str | torch.device = "auto",
          run_data: RunData | None = None, show_progress: bool = True, max_epochs: int | None = None) -> dict[str, Any]:
    """Train ``config`` into ``out_dir``; returns ``{"best_val_median_m", "epochs_run", "stopped_early", ...}``.

    A taken ``out_dir`` is refused unless ``resume`` (then ``last.pt`` must be there, and the
    run's recorded dataset and map must be the ones ``config`` leads to).
    ``max_epochs`` stops after that many epochs in this call (tests interrupt a run with it).
    """
    rank, world, device = _dist_setup(resolve_device(device))
    out = Path(out_dir)
    if rank == 0:
        run_store.check_out_dir(out, resume=resume)
    if resume and (out / run_store.LAST).exists():  # before any work: the same run, or a one-line refusal
        run_store.check_resume_config(out, config)
    init = check_init_from(config)  # before any work: a run of this model's kind and size, or one line
    if config.training.num_threads and device.type == "cpu":
        torch.set_num_threads(max(1, config.training.num_threads // world))
    run = run_data or prepare(config)
    teachers = check_teachers(config, run)  # before any training: one line naming the key
    if config.physics_active:  # calibrate "auto" weights now, so the run's config.yaml holds the numbers
        config = init_feature_weights(config, init)  # no labelled walk: the init run's numbers
        config = resolve_config(config, run.dataset, run.radio_map)
    loop = _build_loop(config, run, device, rank, world, init, teachers)
    if resume and (out / run_store.LAST).exists():
        for m, scene in enumerate(run.scenes):
            run_store.check_lineage(out, scene.dataset.ref, scene.radio_map.ref, m)
        _restore(loop, out)
    _wrap_distributed(loop)
    if loop.is_main:
        out.mkdir(parents=True, exist_ok=True)
        if resume and loop.start_epoch == 0:
            run_store.append_log(out, f"--resume: no {out / run_store.LAST}, starting from scratch")
        _start_run_dir(loop, out)
        loop.status = run_store.StatusWriter(out, config.training.epochs)
        loop.status.update("running", loop.start_epoch, loop.best)
    bar = None
    if show_progress and loop.is_main:
        from tqdm import tqdm

        bar = tqdm(total=config.training.epochs, initial=loop.start_epoch, desc="train", unit="epoch")
    try:
        stopped_early = _run_epochs(loop, out, max_epochs, bar)
        _finish(loop, out, stopped_early)
    except BaseException as exc:
        if loop.status is not None:
            loop.status.fail(exc)  # failed (or stopped) with its cause, never "running" after its writer
        raise
    finally:
        if bar is not None:
            bar.close()
    return {"best_val_median_m": loop.best, "epochs_run": len(loop.history), "stopped_early": stopped_early,
            "history": loop.history, "rank": rank, "world": world, "coarse_prior": loop.coarse_prior}


def _finish(loop: _Loop, out: Path, stopped_early: bool) -> None:
    epochs, history = loop.config.training.epochs, loop.history
    done_epochs = history[-1]["epoch"] if history else 0
    finished = stopped_early or done_epochs >= epochs
    if loop.is_main:
        loop.status.update("done" if finished else "stopped", done_epochs, loop.best)
        progress.report(1.0 if finished else done_epochs / epochs, "training done")
    if loop.world > 1:
        import torch.distributed as dist

        dist.barrier()

# -- CLI ----------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="configs/model.yaml", help="YAML config (default: configs/model.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a config key (YAML value); repeatable")
    parser.add_argument("--out", required=True, help="run directory, e.g. runs/NAME")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true", help="continue the run in OUT from its last.pt")
    mode.add_argument("--force", action="store_true",
                      help="replace the run in OUT: the new run takes its place when training ends")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm bar")


def run(args: argparse.Namespace) -> int:
    config = load_config(resolve_path(args.config), args.overrides)
    out = Path(args.out)
    rank0 = int(os.environ.get("RANK", "0")) == 0
    check_writable(out / run_store.STATUS if args.resume else out, "--out")  # a shipped path gets no lock file beside it either
    # one writer per run directory (rank 0 writes it): held until the run is in place
    with output_lock(out, "run directory") if rank0 else contextlib.nullcontext():
        run_store.check_out_dir(out, resume=args.resume, force=args.force)
        # --force: rank 0 writes the new run beside the old one; it replaces the old one when training ends
        target = atomic_path(out) if args.force and rank0 else contextlib.nullcontext(out)
        with target as out_dir:
            result = train(config, out_dir, resume=args.resume, device=args.device,
                           show_progress=not args.no_progress)
    if result["rank"] == 0 and math.isfinite(result["best_val_median_m"]):
        print(f"best val median {result['best_val_median_m']:.2f} m after {result['epochs_run']} epochs -> {out}")
    elif result["rank"] == 0:
        print(f"{result['epochs_run']} epochs, the last kept (model selection: last, no validation) -> {out}")
    return 0


__all__ = ["train", "add_arguments", "run"]
