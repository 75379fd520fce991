"""Learning from an ensemble (``training.distill_from``): one network taught by several trained ones.

An ensemble of ``M`` networks as MAP's prior beats one network (realistic etoile: 1.032 against 1.076 m, 0.82x
against 0.85x exhaustive search; docs/world.md) but costs ``M`` network passes. Distillation tries to keep the
gain at the cost of one: before training, the TEACHERS (the run directories ``training.distill_from`` names,
trained on the same dataset, map and grid) predict every train walk once, and their predictions are pooled::

    q_T(c)  = mean_m softmax(logits_m)(c)          over the G x G coarse cells, its k largest kept (renormalised)
    mu_T    = mean_m xy_m                          [m], the members' mean position

(``mu_T`` as :func:`core.learning.ensemble.pool` pools positions). Training then adds to ``L_total``, per labelled walk::

    L_distill = - sum_c q_T(c) log softmax(logits)(c)
                + lambda_fine * 0.5 * mean_xy(logvar + (off(mu_T) - offset)^2 / exp(logvar))   [mu_T in the true cell]

weighted by ``training.distill_weight``: the coarse head learns the ensemble's distribution over cells beside
the one-hot label, and the fine head (at the true cell, the same pass as ``L_fine``) the ensemble's position
beside the label's, where the ensemble's position lies in the true cell. The label terms stay as they are.
Memory: ``O(N k)``; time: one network pass per teacher over the train walks, once.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch

from core.errors import ConfigError
from core.learning.coarse_physics import coarse_physics_term
from core.learning.model import fine_loss

KEY = "training.distill_from"

#: cells of each teacher's and of the pooled distribution kept per walk
TOPK = 32


def check_teachers(config, run) -> list:
    """The teacher runs, loaded for inference (:func:`core.learning.inference.load_run`), or a
    :class:`ConfigError` of one line naming the key: no such run, another dataset or map than this run's (one
    scene only), another split or sample cap (its train walks must be this run's), or another coarse grid."""
    from core.errors import CoreError
    from core.learning.ensemble import load_peer

    given = list(config.training.distill_from)
    if not given:
        return []
    if len(run.scenes) != 1:
        raise ConfigError(f"{KEY}: distillation needs one training scene (this config has {len(run.scenes)})")
    teachers = []
    for path in given:
        try:  # this run's dataset, map, split and sample cap: its train walks are the teacher's
            teacher = load_peer(path, run.dataset, run.radio_map, config.data, KEY)
        except CoreError as exc:
            raise ConfigError(str(exc)) from None
        if teacher.model.spec.grid_size != run.spec.grid_size:
            raise ConfigError(f"{KEY}: {path} has a {teacher.model.spec.grid_size}-cell grid, this model "
                              f"{run.spec.grid_size}")
        teachers.append(teacher)
    return teachers


def pool_teachers(predictions: list, cell_of: Callable[[np.ndarray], np.ndarray], k: int = TOPK
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(cells long [N, k], q float32 [N, k], mu float32 [N, 2])`` from the teachers' predictions of the same
    ``N`` walks (:class:`~core.learning.inference.Prediction` with ``coarse_xy``/``coarse_prob`` of their top
    cells); ``cell_of`` maps positions ``[..., 2]`` [m] to the coarse cell each lies in ``[...]``. ``q`` the mean of their cell probabilities (a cell outside a teacher's top cells counts 0 for it), its
    ``k`` largest entries renormalised; ``mu`` the mean of their positions."""
    n, m = len(predictions[0].xy), len(predictions)
    cells = np.concatenate([cell_of(p.coarse_xy) for p in predictions], 1)  # [N, M k']
    probs = np.concatenate([p.coarse_prob for p in predictions], 1) / m
    order = np.argsort(cells, axis=1, kind="stable")
    cells, probs = np.take_along_axis(cells, order, 1), np.take_along_axis(probs, order, 1)
    first = np.ones_like(cells, dtype=bool)
    first[:, 1:] = cells[:, 1:] != cells[:, :-1]
    group = np.cumsum(first, axis=1) - 1  # each distinct cell's slot, per row
    summed = np.zeros_like(probs)
    np.add.at(summed, (np.arange(n)[:, None].repeat(cells.shape[1], 1), group), probs)
    uniq = np.zeros_like(cells)
    np.put_along_axis(uniq, group, cells, 1)
    k = min(k, cells.shape[1])
    top = np.argsort(-summed, axis=1, kind="stable")[:, :k]
    q = np.take_along_axis(summed, top, 1)
    q = q / np.maximum(q.sum(1, keepdims=True), 1e-12)
    mu = np.mean(np.stack([p.xy for p in predictions]), 0)  # the ensemble's mean (core.learning.ensemble.pool)
    return (torch.from_numpy(np.take_along_axis(uniq, top, 1)), torch.from_numpy(q.astype(np.float32)),
            torch.from_numpy(mu.astype(np.float32)))


def attach_teacher_targets(data, teachers: list, net, frame) -> dict[str, float]:
    """Store the pooled targets of the walks of ``data`` (a TensorData of the one scene) as ``data.teach_cells``,
    ``data.teach_q`` and ``data.teach_xy``, in the cells of the student ``net`` (its ``cell_of`` in ``frame``);
    returns ``{"walks", "seconds"}`` (the one-off cost)."""
    from core.learning.inference import predict

    def cell_of(xy: np.ndarray) -> np.ndarray:
        flat = torch.as_tensor(xy.reshape(-1, 2), dtype=frame.origin.dtype, device=frame.origin.device)
        return net.cell_of(flat, frame)[0].cpu().numpy().reshape(xy.shape[:-1])

    t0 = time.perf_counter()
    idx = data.indices.numpy()
    preds = [predict(t, idx, top_k=TOPK) for t in teachers]
    data.teach_cells, data.teach_q, data.teach_xy = pool_teachers(preds, cell_of)
    return {"walks": len(idx), "seconds": time.perf_counter() - t0}


def distill_term(net, out, batch: dict[str, torch.Tensor], target_cell: torch.Tensor, labeled: torch.Tensor,
                 frame, lambda_fine: float) -> torch.Tensor:
    """``L_distill`` of the module doc over the batch's labelled walks; ``out`` holds the fine head at the true
    cell (``target_offset_pred``, ``target_logvar``). 0, still in the graph, when no walk qualifies."""
    q = torch.where(labeled[:, None], batch["teach_q"], 0.0)
    coarse = coarse_physics_term(out.logits, batch["teach_cells"], q)
    cell, offset = net.cell_of(batch["teach_xy"], frame)
    same = labeled & (cell == target_cell)
    if not bool(same.any()):
        return coarse + 0.0 * out.target_offset_pred.sum()
    return coarse + lambda_fine * fine_loss(out.target_offset_pred[same], out.target_logvar[same], offset[same])


__all__ = ["KEY", "TOPK", "attach_teacher_targets", "check_teachers", "distill_term", "pool_teachers"]
