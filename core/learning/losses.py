"""The training loss of one batch, its gradient balance, and a model's outputs and mean losses over a split.

::

    L_total = L_coarse + lambda_fine * L_fine + lambda_phys(t) * L_phys

``L_coarse`` / ``L_fine``: the supervised terms over the LABELLED walks of the batch
(:func:`core.learning.model.coarse_loss`, :func:`core.learning.model.fine_loss` at the TRUE cell);
``L_phys``: :func:`core.learning.physics_terms.physics_term` at the position-head output, plus
``coarse_weight * L_coarse_phys`` and ``mode_weight * L_mode`` (:mod:`core.learning.coarse_physics`)
where the batch carries the one-off posterior; ``+ distill_weight * L_distill`` where the batch carries an
ensemble's targets (:mod:`core.learning.distill`). See :mod:`core.learning.training` for the schedule.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from core.learning.coarse_physics import coarse_physics_term, mode_term
from core.learning.config import Config
from core.learning.data_loading import TensorData
from core.learning.distill import distill_term
from core.learning.model import SceneMaps, coarse_loss, fine_loss
from core.learning.physics_terms import physics_term

LOSS_TERMS = ("total", "coarse", "fine", "phys")


def _supervised(out, target_cell: torch.Tensor, target_offset: torch.Tensor, labeled: torch.Tensor):
    """``(L_coarse, L_fine)`` over the labelled samples (0, still in the graph, when there are none)."""
    if bool(labeled.all()):
        return (coarse_loss(out.logits, target_cell),
                fine_loss(out.target_offset_pred, out.target_logvar, target_offset))
    if not bool(labeled.any()):
        zero = 0.0 * (out.logits.sum() + out.target_offset_pred.sum() + out.target_logvar.sum())
        return zero, zero
    return (coarse_loss(out.logits[labeled], target_cell[labeled]),
            fine_loss(out.target_offset_pred[labeled], out.target_logvar[labeled], target_offset[labeled]))


def _mode_targets(net, batch: dict[str, torch.Tensor], labeled: torch.Tensor, config: Config, frame):
    """``(cell [B], offset [B, 2], weight [B])`` of the mode term for the UNLABELLED walks of the batch
    with a posterior (weight ``q(c*)``, 0 elsewhere), or None when the term is off or absent."""
    if config.physics_loss.mode_weight <= 0 or "phys_xy" not in batch:
        return None
    cell, offset = net.cell_of(batch["phys_xy"], frame)
    weight = torch.where(labeled, 0.0, batch["phys_q"][:, 0])
    return cell, offset, weight


def compute_losses(model, batch: dict[str, torch.Tensor], map_image: torch.Tensor, config: Config, physics=None,
                   lambda_phys: float | None = None):
    """Loss terms of one batch: ``(dict name -> scalar tensor, ModelOutput)``; ``phys`` is None when off.

    ``map_image``: one map ``[C, S, S]`` or the run's :class:`SceneMaps` (each sample reads the map of
    its ``batch["scene_index"]``; cells and offsets are in its scene's frame).
    ``lambda_phys``: the weight applied to ``phys`` in ``total`` (default: the config's, fully ramped).
    """
    net = model.module if hasattr(model, "module") else model
    scene = batch.get("scene_index")
    frame = net.frame(map_image, scene)
    target_cell, target_offset = net.cell_of(batch["target_xy"], frame)
    use_physics = physics is not None and config.physics_active
    labeled = batch.get("labeled", torch.ones_like(target_cell, dtype=torch.bool))
    mode = _mode_targets(net, batch, labeled, config, frame) if use_physics else None
    fine_cell = target_cell if mode is None else torch.where(mode[2] > 0, mode[0], target_cell)
    out = model(batch["feats"], batch["site_index"], batch["mask"], map_image, target_cell=fine_cell,
                head_xy=use_physics, scene_index=scene)
    coarse, fine = _supervised(out, target_cell, target_offset, labeled)
    terms: dict[str, Any] = {"coarse": coarse, "fine": fine, "phys": None}
    total = coarse + config.training.loss.lambda_fine * fine
    if "teach_q" in batch and config.training.distill_weight > 0:
        terms["distill"] = distill_term(net, out, batch, target_cell, labeled & (fine_cell == target_cell), frame,
                                        config.training.loss.lambda_fine)
        total = total + config.training.distill_weight * terms["distill"]
    if use_physics:
        terms["phys"] = physics_term(physics, out.head_xy, batch, config.physics_loss.per_sample_grad_clip)
        cw = config.physics_loss.coarse_weight
        if cw > 0 and "phys_q" in batch:  # the coarse term (train walks with a precomputed posterior)
            terms["phys_coarse"] = coarse_physics_term(out.logits, batch["phys_cells"], batch["phys_q"])
            terms["phys"] = terms["phys"] + cw * terms["phys_coarse"]
        if mode is not None:  # the mode term: the fine head at the posterior's best cell, to its best point
            terms["phys_mode"] = mode_term(out.target_offset_pred, out.target_logvar, mode[1], mode[2])
            terms["phys"] = terms["phys"] + config.physics_loss.mode_weight * terms["phys_mode"]
        lam = config.physics_loss.lambda_phys if lambda_phys is None else lambda_phys
        if lam > 0:
            total = total + lam * terms["phys"]
    terms["total"] = total
    return terms, out


def gradient_balance(model, batch: dict[str, torch.Tensor], map_image: torch.Tensor, config: Config,
                     physics=None) -> dict[str, float | None]:
    """Gradient norms of the terms as they enter ``L_total`` at full weight (``coarse``,
    ``lambda_fine * fine``, ``lambda_phys * phys``) w.r.t. all model parameters, of the supervised
    sum, and the cosine between the supervised and the physics gradient (None when off).
    The RNG state is left as it was (a resumed run stays identical)."""
    params = [p for p in model.parameters() if p.requires_grad]
    image = map_image.images if isinstance(map_image, SceneMaps) else map_image
    devices = [image.device] if image.device.type == "cuda" else []
    weights = {"coarse": 1.0, "fine": config.training.loss.lambda_fine, "phys": config.physics_loss.lambda_phys}
    flat: dict[str, torch.Tensor] = {}
    with torch.random.fork_rng(devices=devices):
        terms, _ = compute_losses(model, batch, map_image, config, physics)
        for name, weight in weights.items():
            if terms[name] is None:
                continue
            grads = torch.autograd.grad(weight * terms[name], params, retain_graph=True, allow_unused=True)
            flat[name] = torch.cat([(g if g is not None else torch.zeros_like(p)).flatten() for g, p in zip(grads, params)])
    sup = flat["coarse"] + flat["fine"]
    row: dict[str, float | None] = {f"grad_norm_{k}": float(flat[k].norm()) if k in flat else None
                                    for k in ("coarse", "fine", "phys")}
    row["grad_norm_sup"] = float(sup.norm())
    phys = flat.get("phys")
    ok = phys is not None and float(phys.norm()) > 0 and float(sup.norm()) > 0
    row["grad_cos_sup_phys"] = float(F.cosine_similarity(sup, phys, dim=0)) if ok else None
    return row


@torch.no_grad()
def predict_tensors(model, data: TensorData, map_image: torch.Tensor, device, batch_size: int = 1024,
                    config: Config | None = None, physics=None, lambda_phys: float | None = None) -> dict[str, Any]:
    """Model outputs over ``data`` (eval mode): numpy ``xy, sigma, confidence``
    plus mean loss terms when ``config`` is given (``total`` with ``lambda_phys`` applied)."""
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
            terms, out = compute_losses(net, batch, map_image, config, physics, lambda_phys)
            for k in LOSS_TERMS:
                if terms[k] is not None:
                    sums[k] += float(terms[k]) * len(idx)
        else:
            out = net(batch["feats"], batch["site_index"], batch["mask"], map_image,
                      scene_index=batch.get("scene_index"))
        for k in keys:
            outs[k].append(getattr(out, k).float().cpu())
    net.train(was_training)
    result = {k: torch.cat(v).numpy() for k, v in outs.items()}
    if config is not None:
        result["losses"] = {k: (sums[k] / len(data) if (k != "phys" or physics is not None) else None) for k in LOSS_TERMS}
    return result
