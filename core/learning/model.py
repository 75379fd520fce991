"""The map-conditioned transformer: UE position from a sequence of measurement reports.

Shapes: ``B`` samples, ``T`` reports, ``K`` site slots, ``D`` token inputs, ``d`` model
width, ``H`` heads, ``P`` map patches, ``G`` coarse grid size (``G x G`` cells).

1. Measurement tokens  ``x[B, T, d] = W feats + sum_k E[site_index_k] + pos[t] (+ e_missing)``
2. Map tokens          ``m[M, P, d]``: a strided conv over each scene's resampled map (all
   features, AoA as cos/sin, coverage channel; see :func:`core.data_loading.map_input`) + a
   learned patch position, then one self-attention block. Computed once per forward for
   each of the ``M`` scenes of the batch; every sample reads its own scene's tokens.
3. ``num_layers`` blocks, each: temporal self-attention over the valid reports,
   cross-attention from the reports to the map tokens, MLP (pre-LN, residual).
4. Pooling: the mean of valid report tokens concatenated with the last valid one.
5. Heads
   * coarse: ``logits[B, G*G] = q(pooled) . key_c / sqrt(d)`` over the map's grid cells
     (cell ``c = i*G + j``, row i = y), where ``key_c = MLP(Fourier(centre_c), map_c)``
     mixes the cell's position and the map's (pooled) features there: the model scores
     how well the measurements match each cell, like map matching, and nearby cells
     share statistics;
   * fine: conditioned on a cell ``c`` (the true one in training, the argmax in
     inference): ``offset[B, 2]`` in cell units, ``tanh``-bounded to ±1 cell, and its
     ``logvar[B, 2]`` (natural log of the variance in cell units²).
6. Outputs: ``xy = centre(c) + offset * cell`` [m];
   ``sigma^2 = exp(logvar) * cell^2 + sum_c' p_c' (centre_c' - centre_c)^2`` [m^2] per axis
   (the fine head's variance plus the coarse distribution's spread around the chosen
   cell, so a split coarse vote shows up as a large sigma);
   ``confidence = P(3x3 cells around c) * exp(-sigma_fine_rms / cell)`` in [0, 1];
   with ``head_xy=True`` also ``head_xy``: the same position, but its gradient reaches only the
   position (fine) head: the pooled features and cell keys enter it detached. The physics term
   is evaluated there (docs/model.md, "Gradient routing").

Many scenes (docs/model.md, "Many scenes"): the map argument is a :class:`SceneMaps` (``M``
maps and their bounds) and ``scene_index[B]`` says which one each sample belongs to. Every
position is relative to its own scene's map: the ``G x G`` cells divide each scene's bounds,
so a cell is the same fraction of every map and ``cell_wh`` [m] differs per scene
(:meth:`MapConditionedTransformer.frame`). A bare ``map_image[C, S, S]`` is one scene with the
bounds of :attr:`ModelSpec.bounds` (the single-scene path; ``M = 1`` gives the same numbers).

Attention weights are computed explicitly (``softmax(QK^T / sqrt(d_h))``) when
``return_attention=True`` and on the CPU (measured faster there than the fused kernel at
T = 8); otherwise (CUDA) :func:`torch.nn.functional.scaled_dot_product_attention`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

#: spatial frequencies (cycles per half map) of the Fourier features of the grid cells
FOURIER_FREQS = (0.5, 1.0, 2.0, 4.0, 8.0)


@dataclass
class ModelSpec:
    """Everything needed to rebuild a model (stored in checkpoints)."""

    token_dim: int
    num_site_embeddings: int  # K * (S + 1) + 1
    num_reports: int  # T
    map_channels: int
    bounds: tuple[float, float, float, float]  # map outer edges [m]
    d_model: int = 96
    num_layers: int = 2
    num_heads: int = 4
    grid_size: int = 32
    map_size: int = 128
    patch_size: int = 16
    dropout: float = 0.0
    mlp_ratio: int = 4
    geometry_hint: bool = True
    #: "memorizing" (this module's model) or "agnostic" (:mod:`core.learning.agnostic`, scene-agnostic inputs)
    kind: str = "memorizing"
    #: agnostic only: candidate cells (map tokens) the transformer attends over, sub-grid of the fine head,
    #: width of the per-candidate report tokens, and the report window [s] the per-site observation pools over
    num_candidates: int = 8
    fine_subgrid: int = 6
    d_report: int = 32
    report_window_s: float = 1.0

    @property
    def patch_grid(self) -> tuple[int, int]:
        n = self.map_size // self.patch_size
        return n, n


@dataclass
class SceneMaps:
    """The maps of ``M`` scenes as the model reads them.

    images  float32 [M, C, S, S]   each scene's :func:`~core.learning.data_loading.map_input`
    bounds  float64 [M, 4]         each map's outer edges (x_min, y_min, x_max, y_max) [m]
    """

    images: torch.Tensor
    bounds: torch.Tensor

    def __len__(self) -> int:
        return self.bounds.shape[0]

    def to(self, device) -> SceneMaps:
        return SceneMaps(self.images.to(device), self.bounds.to(device))

    @classmethod
    def stack(cls, images: list, bounds: list) -> SceneMaps:
        """From per-scene ``[C, S, S]`` images (or the agnostic model's per-scene
        :class:`~core.learning.agnostic.SceneTable`) and ``(x_min, y_min, x_max, y_max)`` bounds."""
        b = torch.tensor([[float(v) for v in bb] for bb in bounds], dtype=torch.float64)
        if isinstance(images[0], torch.Tensor):
            return cls(torch.stack(images), b)
        return cls(type(images[0]).stack(images), b)


class Frame(NamedTuple):
    """Where the cells of a batch lie: ``origin`` and ``cell_wh`` ``[B or 1, 2]`` [m] (the map's
    lower-left corner and the cell size of each sample's scene), ``scene [B]`` (None: one map)."""

    origin: torch.Tensor
    cell_wh: torch.Tensor
    scene: torch.Tensor | None = None


@dataclass
class ModelOutput:
    """See the module doc. ``attention`` = {"temporal": [[B,H,T,T]] * L, "cross": [[B,H,T,P]] * L}."""

    logits: torch.Tensor  # [B, G*G]
    cell: torch.Tensor  # [B] long, the cell the position is built from (argmax)
    offset: torch.Tensor  # [B, 2] in cell units
    logvar: torch.Tensor  # [B, 2]
    xy: torch.Tensor  # [B, 2] metres
    sigma: torch.Tensor  # [B, 2] metres
    confidence: torch.Tensor  # [B]
    target_offset_pred: torch.Tensor | None = None  # [B, 2] fine head at the TRUE cell (training)
    target_logvar: torch.Tensor | None = None  # [B, 2]
    head_xy: torch.Tensor | None = None  # [B, 2] = xy, gradient into the fine head only
    attention: dict[str, list[torch.Tensor]] | None = field(default=None)


class Attention(nn.Module):
    """Multi-head attention of queries ``q[B, Tq, d]`` over keys/values ``kv[B, Tk, d]``."""

    def __init__(self, d: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.q = nn.Linear(d, d)
        self.kv = nn.Linear(d, 2 * d)
        self.out = nn.Linear(d, d)

    def forward(self, q, kv, key_mask=None, return_attention=False, kv_index=None):
        """``key_mask[B, Tk]`` True = attend. ``kv[B or M, Tk, d]``: with ``M`` key sets (one per scene)
        ``kv_index[B]`` picks each query's set (None: one set shared by all). Returns
        ``(out[B, Tq, d], weights[B, H, Tq, Tk] | None)``."""
        b, tq, d = q.shape
        tk = kv.shape[1]
        h, dh = self.heads, d // self.heads
        q = self.q(q).view(b, tq, h, dh).transpose(1, 2)
        k, v = self.kv(kv).view(kv.shape[0], tk, 2, h, dh).permute(2, 0, 3, 1, 4)
        if kv_index is None:
            k, v = k.expand(b, -1, -1, -1), v.expand(b, -1, -1, -1)
        else:  # projected once per scene, then gathered per sample
            k, v = k[kv_index], v[kv_index]
        mask = None if key_mask is None else key_mask[:, None, None, :]
        p = self.dropout if self.training else 0.0
        if return_attention or not q.is_cuda:  # explicit is faster than the CPU SDPA kernels at these sizes
            scores = q @ k.transpose(-1, -2) / math.sqrt(dh)
            if mask is not None:
                scores = scores.masked_fill(~mask, float("-inf"))
            weights = scores.softmax(-1)
            y = F.dropout(weights, p, self.training) @ v
            weights = weights if return_attention else None
        else:
            weights = None
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        return self.out(y.transpose(1, 2).reshape(b, tq, d)), weights


class MLP(nn.Sequential):
    def __init__(self, d: int, ratio: int, dropout: float) -> None:
        super().__init__(nn.Linear(d, ratio * d), nn.GELU(), nn.Linear(ratio * d, d), nn.Dropout(dropout))


class Block(nn.Module):
    """Temporal self-attention, cross-attention to the map, MLP; pre-LN residuals."""

    def __init__(self, d: int, heads: int, ratio: int, dropout: float) -> None:
        super().__init__()
        self.ln1, self.ln2, self.ln3 = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.self_attn = Attention(d, heads, dropout)
        self.cross_attn = Attention(d, heads, dropout)
        self.mlp = MLP(d, ratio, dropout)

    def forward(self, x, mask, map_tokens, return_attention=False, scene=None):
        """``map_tokens[M, P, d]``; ``scene[B]``: each sample's scene (None: ``M = 1``)."""
        h = self.ln1(x)
        a, w_self = self.self_attn(h, h, mask, return_attention)
        x = x + a
        a, w_cross = self.cross_attn(self.ln2(x), map_tokens, None, return_attention, scene)
        x = x + a
        x = x + self.mlp(self.ln3(x))
        return x, w_self, w_cross


class MapEncoder(nn.Module):
    """``maps[M, C, S, S]`` -> map tokens ``[M, P, d]`` (strided-conv patches + position + one attention block)."""

    def __init__(self, channels: int, d: int, patch: int, num_patches: int, heads: int, ratio: int, dropout: float):
        super().__init__()
        self.patch = nn.Conv2d(channels, d, kernel_size=patch, stride=patch)
        self.pos = nn.Parameter(torch.zeros(1, num_patches, d))
        self.ln1, self.ln2, self.ln_out = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = Attention(d, heads, dropout)
        self.mlp = MLP(d, ratio, dropout)
        nn.init.normal_(self.pos, std=0.02)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patch(images).flatten(2).transpose(1, 2) + self.pos  # [M, P, d], row-major, row = y
        h = self.ln1(x)
        x = x + self.attn(h, h)[0]
        x = x + self.mlp(self.ln2(x))
        return self.ln_out(x)


class CellGrid(nn.Module):
    """The ``G x G`` coarse cells of a model: the spec's bounds (buffers ``origin``, ``cell_wh``) and each
    scene's frame. Shared by both model kinds."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.spec = spec
        g = spec.grid_size
        x_min, y_min, x_max, y_max = spec.bounds
        self.register_buffer("cell_wh", torch.tensor([(x_max - x_min) / g, (y_max - y_min) / g]), persistent=False)
        self.register_buffer("origin", torch.tensor([x_min, y_min]), persistent=False)

    # -- geometry -------------------------------------------------------------------------
    def frame(self, maps=None, scene_index: torch.Tensor | None = None) -> Frame:
        """The cell geometry of a batch: from :attr:`ModelSpec.bounds` for a bare map tensor (or
        None), else from each sample's scene's bounds in ``maps`` (a :class:`SceneMaps`)."""
        if not isinstance(maps, SceneMaps):
            return Frame(self.origin[None], self.cell_wh[None])
        b = maps.bounds.to(self.origin.device, torch.float64)
        origin = b[:, :2].to(self.origin.dtype)
        cell_wh = ((b[:, 2:] - b[:, :2]) / self.spec.grid_size).to(self.cell_wh.dtype)  # as in __init__, in float64
        if len(maps) == 1:
            return Frame(origin, cell_wh)
        if scene_index is None:
            raise ValueError("several scene maps need scene_index [B]")
        scene = scene_index.to(self.origin.device)
        return Frame(origin[scene], cell_wh[scene], scene)

    def position(self, logits, cell, offset, logvar, frame: Frame):
        """``(centre, xy, sigma, confidence)`` of the chosen ``cell [B]`` (see the module doc, item 6)."""
        centre = self.cell_centre(cell, frame)
        xy = centre + offset * frame.cell_wh
        # sigma^2 = fine variance + spread of the coarse distribution around the chosen centre
        prob_flat = logits.softmax(-1)
        cells = torch.arange(logits.shape[1], device=logits.device)
        all_centres = self.cell_centre(cells, Frame(frame.origin[:, None], frame.cell_wh[:, None]))  # [B or 1, G*G, 2]
        coarse_var = torch.einsum("bc,bcd->bd", prob_flat, (all_centres - centre[:, None]).pow(2))
        sigma = (torch.exp(logvar) * frame.cell_wh.pow(2) + coarse_var).sqrt()
        p_near = _near_mass(prob_flat, cell, self.spec.grid_size)
        sigma_rms = torch.exp(0.5 * logvar).pow(2).mean(-1).sqrt()
        confidence = p_near * torch.exp(-sigma_rms)

        return centre, xy, sigma, confidence

    def cell_centre(self, cell: torch.Tensor, frame: Frame | None = None) -> torch.Tensor:
        """``[B]`` cell indices -> ``[B, 2]`` centres [m] (``frame``: each sample's scene; default the spec's map)."""
        origin, cell_wh, _ = frame or self.frame()
        g = self.spec.grid_size
        ij = torch.stack([cell % g, cell // g], -1).to(cell_wh.dtype)  # (j, i) = (x, y)
        return origin + (ij + 0.5) * cell_wh

    def cell_of(self, xy: torch.Tensor, frame: Frame | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``xy[B, 2]`` -> (cell ``[B]`` long, offset from its centre in cell units ``[B, 2]``)."""
        origin, cell_wh, _ = frame or self.frame()
        g = self.spec.grid_size
        u = (xy - origin) / cell_wh
        ij = u.floor().clamp(0, g - 1)
        offset = u - (ij + 0.5)
        return (ij[:, 1] * g + ij[:, 0]).long(), offset


def _near_mass(prob: torch.Tensor, cell: torch.Tensor, g: int) -> torch.Tensor:
    """``[B]``: the probability mass ``prob[B, G*G]`` puts on the 3 x 3 cells around ``cell[B]`` (within the
    grid), clamped to [0, 1]. (A gather of 9 cells: a 3 x 3 average pool over the whole grid costs ~40x more.)"""
    d = torch.tensor([-1, 0, 1], device=cell.device)
    i = (cell // g)[:, None, None] + d[None, :, None]
    j = (cell % g)[:, None, None] + d[None, None, :]
    inside = ((i >= 0) & (i < g) & (j >= 0) & (j < g)).reshape(len(cell), 9)
    idx = (i.clamp(0, g - 1) * g + j.clamp(0, g - 1)).reshape(len(cell), 9)
    return (prob.gather(1, idx) * inside).sum(1).clamp(0.0, 1.0)


class MapConditionedTransformer(CellGrid):
    def __init__(self, spec: ModelSpec) -> None:
        super().__init__(spec)
        d, g = spec.d_model, spec.grid_size
        self.token_in = nn.Linear(spec.token_dim, d)
        self.site_embed = nn.Embedding(spec.num_site_embeddings, d, padding_idx=0)
        self.report_pos = nn.Parameter(torch.zeros(1, spec.num_reports, d))
        self.missing = nn.Parameter(torch.zeros(d))
        n_patch = spec.patch_grid[0] * spec.patch_grid[1]
        self.map_encoder = MapEncoder(spec.map_channels, d, spec.patch_size, n_patch, spec.num_heads,
                                      spec.mlp_ratio, spec.dropout)
        self.blocks = nn.ModuleList(
            Block(d, spec.num_heads, spec.mlp_ratio, spec.dropout) for _ in range(spec.num_layers)
        )
        self.ln_f = nn.LayerNorm(d)
        self.pool = nn.Linear(2 * d, d)
        self.coarse_query = nn.Sequential(nn.GELU(), nn.Linear(d, d))
        self.coarse_bias = nn.Parameter(torch.zeros(g * g))
        self.cell_key = nn.Sequential(nn.Linear(4 * len(FOURIER_FREQS) + spec.map_channels, d), nn.GELU(), nn.Linear(d, d))
        self.fine = nn.Sequential(nn.Linear(2 * d, d), nn.GELU(), nn.Linear(d, 4))
        nn.init.normal_(self.report_pos, std=0.02)
        # Fourier features of the cell centres in [-1, 1]: [G*G, 4 * len(FOURIER_FREQS)]
        u = (torch.arange(g) + 0.5) / g * 2 - 1
        vv, uu = torch.meshgrid(u, u, indexing="ij")  # row i = y
        ang = torch.stack([uu.ravel(), vv.ravel()], -1)[:, :, None] * torch.tensor(FOURIER_FREQS) * math.pi
        self.register_buffer("cell_fourier", torch.cat([ang.sin(), ang.cos()], -1).flatten(1), persistent=False)

    def cell_keys(self, images: torch.Tensor) -> torch.Tensor:
        """``images[M, C, S, S]`` -> ``[M, G*G, d]``: one key per grid cell of each scene from its
        position (Fourier, map-relative) and the scene's map features there."""
        g = self.spec.grid_size
        local = F.adaptive_avg_pool2d(images, g).flatten(2).transpose(1, 2)  # [M, G*G, C], row-major, row = y
        return self.cell_key(torch.cat([self.cell_fourier.expand(len(images), -1, -1), local], -1))

    def _fine(self, pooled, keys, cell, scene=None):
        """Fine head at ``cell[B]`` with ``keys[M, G*G, d]`` of each sample's ``scene[B]`` (None: ``M = 1``)."""
        key = keys[0][cell] if scene is None else keys[scene, cell]
        raw = self.fine(torch.cat([pooled, key], -1))
        return torch.tanh(raw[:, :2]), raw[:, 2:].clamp(-8.0, 4.0)

    def _logits(self, pooled, keys, scene=None):
        """``[B, G*G]`` coarse logits: the query against the cell keys of each sample's scene."""
        query = self.coarse_query(pooled)
        if scene is None:
            scores = query @ keys[0].t()
        else:  # every scene's keys (M small), then each sample's row: no [B, G*G, d] gather
            scores = torch.matmul(query, keys.transpose(1, 2))[scene, torch.arange(len(scene), device=scene.device)]
        return scores / math.sqrt(keys.shape[-1]) + self.coarse_bias

    # -- forward --------------------------------------------------------------------------
    def forward(self, feats, site_index, mask, map_image, target_cell=None, return_attention=False,
                head_xy=False, scene_index=None) -> ModelOutput:
        """``feats[B,T,D]``, ``site_index[B,T,K]`` long, ``mask[B,T]`` bool; ``map_image``: one map
        ``[C,S,S]`` (the spec's bounds) or a :class:`SceneMaps` of ``M`` scenes with ``scene_index[B]``
        (needed when ``M > 1``). ``target_cell[B]`` (training) also evaluates the fine head at the true
        cell; ``head_xy`` also returns the position routed to the fine head only."""
        frame = self.frame(map_image, scene_index)
        images = map_image.images if isinstance(map_image, SceneMaps) else map_image[None]  # [M, C, S, S]
        scene = frame.scene
        x = self.token_in(feats) + self.site_embed(site_index).sum(2) + self.report_pos[:, : feats.shape[1]]
        x = torch.where(mask[..., None], x, x + self.missing)
        map_tokens = self.map_encoder(images)  # [M, P, d]: once per scene
        temporal, cross = [], []
        for block in self.blocks:
            x, w_self, w_cross = block(x, mask, map_tokens, return_attention, scene)
            if return_attention:
                temporal.append(w_self)
                cross.append(w_cross)
        h = self.ln_f(x)
        m = mask[..., None].to(h.dtype)
        mean = (h * m).sum(1) / m.sum(1).clamp_min(1.0)
        last_idx = (mask.long() * torch.arange(mask.shape[1], device=mask.device)).argmax(1)  # last valid report
        last = h[torch.arange(h.shape[0], device=h.device), last_idx]
        pooled = self.pool(torch.cat([mean, last], -1))

        keys = self.cell_keys(images)  # [M, G*G, d]
        logits = self._logits(pooled, keys, scene)
        cell = logits.argmax(-1)
        offset, logvar = self._fine(pooled, keys, cell, scene)
        centre, xy, sigma, confidence = self.position(logits, cell, offset, logvar, frame)
        out = ModelOutput(logits, cell, offset, logvar, xy, sigma, confidence)
        if target_cell is not None:
            out.target_offset_pred, out.target_logvar = self._fine(pooled, keys, target_cell, scene)
        if head_xy:
            out.head_xy = centre + self._fine(pooled.detach(), keys.detach(), cell, scene)[0] * frame.cell_wh
        if return_attention:
            out.attention = {"temporal": temporal, "cross": cross}
        return out


def coarse_loss(logits: torch.Tensor, target_cell: torch.Tensor) -> torch.Tensor:
    """``L_coarse = mean_b -log softmax(logits_b)[c_b]`` (cross-entropy, nats)."""
    return F.cross_entropy(logits, target_cell)


def fine_loss(offset: torch.Tensor, logvar: torch.Tensor, target_offset: torch.Tensor) -> torch.Tensor:
    """Gaussian NLL without the constant: ``mean 0.5 * (logvar + (target - offset)^2 / exp(logvar))`` over B and (x, y)."""
    return (0.5 * (logvar + (target_offset - offset).pow(2) * torch.exp(-logvar))).mean()


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def build_model(spec: ModelSpec | dict, seed: int = 0) -> MapConditionedTransformer:
    """A freshly initialised memorizing model of ``spec`` (a :class:`ModelSpec` or its dict form, as
    checkpoints store it), parameters drawn with ``seed``. Any kind: :func:`core.learning.kinds.build_model`."""
    if isinstance(spec, dict):
        spec = ModelSpec(**{**spec, "bounds": tuple(spec["bounds"])})
    if spec.kind != "memorizing":
        raise ValueError(f"model kind {spec.kind!r}: build it with core.learning.kinds.build_model")
    torch.manual_seed(seed)
    return MapConditionedTransformer(spec)
