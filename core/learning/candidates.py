"""What the scene-agnostic model attends to, read from one :func:`~core.learning.inference.predict` output.

The agnostic model (:mod:`core.learning.agnostic`) has no map patches: its "map tokens" are ``n`` candidate
cells (the best cells of its coarse match ``base``), each with its own report tokens. This module turns
``predict(run, indices, return_attention=True, return_distribution=True)`` into what the Attention page
draws (numpy, metres; ``n`` candidates, ``H`` heads, ``T`` reports, ``G x G`` coarse cells):

* :func:`candidate_view`: one sample's candidates: centres, final probability, coarse-match score, the
  attention between candidates per layer and every candidate's temporal attention;
* :func:`report_labels`: a label per report token, ``r<t> <time before the last report> s: <sites heard>``
  (a report token sums its site slots, so it stands for one report and the sites it holds);
* :func:`site_attention`: the attention each site's reports receive (a key report's weight shared equally
  by the sites heard in it);
* :func:`mean_candidate_attention`, :func:`mean_cell_prob`: scene averages over many samples.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from core.errors import CoreError

#: the attention keys an agnostic prediction carries (``core.learning.agnostic.AgnosticTransformer.forward``)
AGNOSTIC_KEYS = ("candidates", "candidate_cells", "candidate_temporal", "candidate_base")


def is_agnostic(prediction) -> bool:
    """Whether ``prediction.attention`` is an agnostic model's (candidates, no map patches)."""
    return prediction.attention is not None and all(k in prediction.attention for k in AGNOSTIC_KEYS)


@dataclass
class CandidateView:
    """One sample's candidate cells (``n``, ordered by the coarse match, best first).

    cells ``[n]`` cell indices ``i * G + j``; xy ``[n, 2]`` their centres [m]; prob ``[n]`` the network's
    final probability of each cell (softmax over all ``G²`` cells, so the candidates' sum is at most 1);
    base ``[n]`` the coarse-match score (log units, relative: best = 0); chosen: the row of the cell the
    network picked (-1 when it picked a cell outside the candidates); attention: per candidate layer
    ``[H, n, n]`` (row: query candidate, column: key candidate; rows sum to 1); temporal ``[n, H, T, T]``
    each candidate's self-attention over the reports (row: query report, column: key report).
    """

    cells: np.ndarray
    xy: np.ndarray
    prob: np.ndarray
    base: np.ndarray
    chosen: int
    attention: list[np.ndarray]
    temporal: np.ndarray

    def labels(self) -> list[str]:
        """``c<rank> P=<prob>`` per candidate (rank 1 = best coarse match; * = the cell chosen)."""
        return [f"c{k + 1}{'*' if k == self.chosen else ''} P={p:.2f}" for k, p in enumerate(self.prob)]


def _need(prediction) -> None:
    if not is_agnostic(prediction):
        raise CoreError("no candidate attention: the prediction is not an agnostic model's with return_attention")
    if prediction.cell_prob is None or prediction.cell_bounds is None:
        raise CoreError("no cell distribution: predict(..., return_distribution=True)")


def cell_centres(cells: np.ndarray, grid: int, bounds) -> np.ndarray:
    """``[..., 2]`` centres [m] of cell indices ``i * grid + j`` (row ``i`` along +y) of a grid over ``bounds``."""
    x_min, y_min, x_max, y_max = (float(v) for v in bounds)
    cells = np.asarray(cells, dtype=np.int64)
    j, i = cells % grid, cells // grid
    return np.stack([x_min + (j + 0.5) * (x_max - x_min) / grid, y_min + (i + 0.5) * (y_max - y_min) / grid], -1)


def candidate_view(prediction, row: int) -> CandidateView:
    """The candidates of sample row ``row`` of an agnostic ``prediction`` (see :class:`CandidateView`)."""
    _need(prediction)
    att = prediction.attention
    cells = np.asarray(att["candidate_cells"][0][row], dtype=np.int64)
    prob_grid = np.asarray(prediction.cell_prob[row], dtype=np.float64)
    grid = prob_grid.shape[0]
    prob = prob_grid.ravel()[cells]
    base = np.asarray(att["candidate_base"][0][row], dtype=np.float64)
    picked = int(np.argmax(prob_grid))
    chosen = int(np.flatnonzero(cells == picked)[0]) if (cells == picked).any() else -1
    return CandidateView(cells, cell_centres(cells, grid, prediction.cell_bounds), prob, base - base.max(), chosen,
                         [np.asarray(layer[row], dtype=np.float64) for layer in att["candidates"]],
                         np.asarray(att["candidate_temporal"][0][row], dtype=np.float64))


def report_labels(dataset, index: int, site_names=()) -> list[str]:
    """One label per report of dataset sample ``index``: ``r<t> <t - t_last:+.1f> s: <sites heard>`` (the
    latest present report is 0 s), ``r<t> (missing)`` for a missing report."""
    present = np.asarray(dataset.report_mask[index], dtype=bool)
    t = np.asarray(dataset.t[index], dtype=np.float64)
    last = t[present].max() if present.any() else 0.0
    ids = np.asarray(dataset.site_ids[index])
    out = []
    for k in range(len(t)):
        if not present[k]:
            out.append(f"r{k} (missing)")
            continue
        sites = [site_names[s] if s < len(site_names) else f"site {s}" for s in ids[k] if s >= 0]
        out.append(f"r{k} {t[k] - last:+.1f} s: {', '.join(sites) or 'no site'}")
    return out


def site_attention(temporal: np.ndarray, dataset, index: int, site_names=()) -> dict[str, float]:
    """The attention each site's reports receive in one candidate's temporal attention ``[H, T, T]``: the
    key weights averaged over heads and present query reports, each key report's weight shared equally by
    the sites heard in it; ``{site name: share}`` (sums to 1 over the sites when every report holds a site)."""
    present = np.asarray(dataset.report_mask[index], dtype=bool)
    w = np.asarray(temporal, dtype=np.float64).mean(0)  # [T, T]
    key = w[present].mean(0) if present.any() else np.zeros(w.shape[1])
    ids = np.asarray(dataset.site_ids[index])
    out: dict[str, float] = {}
    for k in np.flatnonzero(present):
        sites = [s for s in ids[k] if s >= 0]
        for s in sites:
            name = site_names[s] if s < len(site_names) else f"site {s}"
            out[name] = out.get(name, 0.0) + float(key[k]) / len(sites)
    return dict(sorted(out.items()))


def mean_candidate_attention(prediction, layer: int = -1) -> np.ndarray:
    """``[n, n]`` the attention between candidates of ``layer``, averaged over heads and samples, candidates
    by their coarse-match rank (row: query rank, column: key rank; rows sum to 1)."""
    _need(prediction)
    return np.asarray(prediction.attention["candidates"][layer], dtype=np.float64).mean(axis=(0, 1))


def mean_cell_prob(prediction) -> np.ndarray:
    """``[G, G]`` the network's cell probabilities averaged over the samples (sums to 1): where it puts its
    probability over the scene (any model kind; needs ``return_distribution``)."""
    if prediction.cell_prob is None or not len(prediction.cell_prob):
        raise CoreError("no cell distribution: predict(..., return_distribution=True) on at least one sample")
    return np.asarray(prediction.cell_prob, dtype=np.float64).mean(0)
