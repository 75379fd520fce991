"""The model kinds a run can train (``model.kind``) and the one place that builds either from its spec.

* ``memorizing``: :class:`~core.learning.model.MapConditionedTransformer` (site-id embeddings, absolute cell
  positions: it learns where in its training city a report pattern occurs);
* ``agnostic``: :class:`~core.learning.agnostic.AgnosticTransformer` (per-site measured-minus-map residuals and
  relative geometry only: the same inputs mean the same in every city).

A checkpoint stores the spec (``ModelSpec`` as a dict, ``kind`` included; one without ``kind`` is memorizing),
so :func:`build_model` rebuilds the right class.
"""

from __future__ import annotations

import torch

from core.learning.agnostic import AgnosticTransformer
from core.learning.model import CellGrid, MapConditionedTransformer, ModelSpec

MODEL_KINDS = {"memorizing": MapConditionedTransformer, "agnostic": AgnosticTransformer}


def build_model(spec: ModelSpec | dict, seed: int = 0) -> CellGrid:
    """A freshly initialised model of ``spec`` (a :class:`ModelSpec` or its checkpoint dict), parameters drawn
    with ``seed``: the class of ``spec.kind`` (:data:`MODEL_KINDS`)."""
    if isinstance(spec, dict):
        spec = ModelSpec(**{**spec, "bounds": tuple(spec["bounds"])})
    if spec.kind not in MODEL_KINDS:
        raise ValueError(f"model kind {spec.kind!r}: expected one of {', '.join(MODEL_KINDS)}")
    torch.manual_seed(seed)
    return MODEL_KINDS[spec.kind](spec)
