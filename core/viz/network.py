"""Figures of what the network believes: its distribution over coarse cells (any model kind) and the
scene-agnostic model's candidate cells with the attention between them.

Arrays in, ``plotly`` figures out (no streamlit; the data come from
:func:`core.learning.inference.predict` with ``return_distribution=True`` and from
:mod:`core.learning.candidates`). Positions in scene metres (x east, y north); a ``G x G`` grid of
cells divides ``bounds = (x_min, y_min, x_max, y_max)``, row ``i`` along +y. Probabilities are drawn
as ``log10 P`` (floored at ``floor``): a trained network puts most of its mass on a few cells.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import plotly.graph_objects as go

from core.viz import plots

CANDIDATE_COLOR = "#17becf"
#: the fine head's sub-point weights: transparent at 0, so the coarse cell shows through
SUBPOINT_SCALE = [[0.0, "rgba(0, 109, 44, 0)"], [0.15, "rgba(116, 196, 118, 0.55)"], [1.0, "rgba(0, 68, 27, 0.95)"]]
#: the smallest probability drawn (log10 -6)
FLOOR = 1e-6


def _grid_axes(shape: tuple[int, int], bounds: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    g_y, g_x = shape
    x_min, y_min, x_max, y_max = (float(v) for v in bounds)
    return (x_min + (np.arange(g_x) + 0.5) * (x_max - x_min) / g_x,
            y_min + (np.arange(g_y) + 0.5) * (y_max - y_min) / g_y)


def _log_prob_heatmap(cell_prob: np.ndarray, bounds, floor: float, name: str, colorbar_x: float | None = None,
                      colorscale: str = "Magma_r", opacity: float = 0.8) -> go.Heatmap:
    p = np.asarray(cell_prob, dtype=np.float64)
    xs, ys = _grid_axes(p.shape, bounds)
    return go.Heatmap(x=xs, y=ys, z=np.log10(np.maximum(p, floor)), zmin=np.log10(floor), zmax=0.0,
                      customdata=p, colorscale=colorscale, opacity=opacity, name=name,
                      colorbar=dict(title=dict(text=f"log10 P<br>({name})", side="right"), x=colorbar_x),
                      hovertemplate="cell centre x=%{x:.1f} m, y=%{y:.1f} m<br>P=%{customdata:.3g}<extra>"
                                    + name + "</extra>")


def candidate_map(cell_prob: np.ndarray, bounds: Sequence[float], cand_xy: np.ndarray, cand_prob: np.ndarray,
                  attention: np.ndarray | None = None, query: int | None = None, labels: Sequence[str] = (),
                  geometry: Any = None, sites: Sequence[Mapping] | None = None, true_xy=None, pred_xy=None,
                  title: str = "Candidate cells and the attention between them", floor: float = FLOOR) -> go.Figure:
    """The network's cell distribution ``cell_prob [G, G]`` over the scene, its ``n`` candidate cells
    ``cand_xy [n, 2]`` (marker size by their probability ``cand_prob [n]``, text ``labels``) and the
    attention between them (``attention [n, n]``, row: query, column: key): lines from candidate ``query``
    to every candidate, width and opacity by the weight it gives it; ``query`` None: every candidate's
    marker is coloured by the mean weight it receives."""
    cand_xy = np.asarray(cand_xy, dtype=np.float64)
    cand_prob = np.asarray(cand_prob, dtype=np.float64)
    n = len(cand_xy)
    labels = list(labels) or [f"c{k + 1}" for k in range(n)]
    fig = go.Figure(_log_prob_heatmap(cell_prob, bounds, floor, "network"))
    plots.add_buildings(fig, geometry)
    plots.add_sites(fig, sites)
    color = CANDIDATE_COLOR
    if attention is not None:
        a = np.asarray(attention, dtype=np.float64)
        if query is not None:
            for k in range(n):
                w = float(a[query, k])
                fig.add_trace(go.Scatter(
                    x=[cand_xy[query, 0], cand_xy[k, 0]], y=[cand_xy[query, 1], cand_xy[k, 1]], mode="lines",
                    line=dict(color=f"rgba(23, 190, 207, {0.25 + 0.75 * min(w * n / 2, 1.0):.2f})",
                              width=1 + 12 * w), showlegend=k == 0, legendgroup="attention",
                    name=f"attention of {labels[query]} (width: weight)",
                    hovertemplate=f"{labels[query]} → {labels[k]}: weight {w:.3f}<extra></extra>"))
            color = a[query]
        else:
            color = a.mean(0)
    scale = None if isinstance(color, str) else dict(colorscale="Blues", cmin=0.0, showscale=False)
    fig.add_trace(go.Scatter(
        x=cand_xy[:, 0], y=cand_xy[:, 1], mode="markers+text", text=labels, textposition="bottom center",
        name="candidate cells", customdata=cand_prob,
        marker=dict(size=9 + 30 * np.sqrt(np.clip(cand_prob, 0, 1)), color=color, symbol="square",
                    line=dict(color="black", width=1), **(scale or {})),
        hovertemplate="%{text}<br>x=%{x:.1f} m, y=%{y:.1f} m<br>P=%{customdata:.3f}<extra>candidate</extra>"))
    if true_xy is not None:
        plots.point_marker(fig, true_xy, "ground truth", "star", plots.TRUTH_COLOR, 16)
    if pred_xy is not None:
        plots.point_marker(fig, pred_xy, "network estimate", "x", plots.NETWORK_COLOR)
    fig.update_layout(title=title, height=600, margin=dict(l=60, r=20, t=60, b=50), legend=dict(orientation="h", y=-0.12))
    plots.equal_axes(fig, bounds)
    return fig


def candidate_matrix(attention: np.ndarray, labels: Sequence[str] = (),
                     title: str = "Attention between the candidate cells") -> go.Figure:
    """``attention [n, n]`` as a heatmap (row: query candidate, column: key candidate; rows sum to 1)."""
    a = np.asarray(attention, dtype=np.float64)
    labels = list(labels) or [f"c{k + 1}" for k in range(a.shape[0])]
    fig = go.Figure(go.Heatmap(z=a, x=labels, y=labels, colorscale="Blues", zmin=0.0,
                               colorbar=dict(title="weight"),
                               hovertemplate="query %{y} → key %{x}<br>weight %{z:.3f}<extra></extra>"))
    fig.update_yaxes(autorange="reversed", title_text="query candidate")
    fig.update_xaxes(title_text="key candidate")
    fig.update_layout(title=title, height=420, margin=dict(l=90, r=20, t=60, b=80))
    return fig


def site_shares(shares: Mapping[str, float], title: str = "Attention received per site") -> go.Figure:
    """A bar per site: the share of the temporal attention its reports receive
    (:func:`core.learning.candidates.site_attention`)."""
    names = list(shares)
    fig = go.Figure(go.Bar(x=names, y=[shares[k] for k in names], marker_color=CANDIDATE_COLOR,
                           hovertemplate="%{x}: %{y:.3f}<extra></extra>", name="share"))
    fig.update_layout(title=title, xaxis_title="site", yaxis_title="attention share", height=320,
                      yaxis=dict(range=[0, 1]), margin=dict(l=60, r=20, t=60, b=50))
    return fig


def network_heatmap(cell_prob: np.ndarray, bounds: Sequence[float], true_xy=None, network_xy=None, map_xy=None,
                    sigma=None, cand_xy: np.ndarray | None = None, sub_xy: np.ndarray | None = None,
                    sub_prob: np.ndarray | None = None, window: tuple[float, float, float] | None = None,
                    geometry: Any = None, sites: Sequence[Mapping] | None = None, title: str | None = None,
                    floor: float = FLOOR) -> go.Figure:
    """The network's distribution from coarse to fine: ``log10 P`` of each coarse cell (``cell_prob [G, G]``
    over ``bounds``), the agnostic model's candidate cells ``cand_xy [n, 2]`` and the fine head's sub-point
    weights ``sub_prob [s, s]`` at ``sub_xy [s, s, 2]`` in the chosen cell (a second heatmap), the network's
    1σ / 2σ ellipses (``sigma`` (σx, σy) m), the truth, the network and the MAP estimate. ``window``
    ``(cx, cy, half)`` [m]: the view (default the whole map)."""
    fig = go.Figure(_log_prob_heatmap(cell_prob, bounds, floor, "coarse cells", colorbar_x=1.0))
    plots.add_buildings(fig, geometry)
    plots.add_sites(fig, sites)
    if sub_xy is not None and sub_prob is not None:
        sxy = np.asarray(sub_xy, dtype=np.float64)
        sp = np.asarray(sub_prob, dtype=np.float64)
        fig.add_trace(go.Heatmap(x=sxy[0, :, 0], y=sxy[:, 0, 1], z=sp, customdata=sp, colorscale=SUBPOINT_SCALE,
                                 zmin=0.0, name="fine sub-points",
                                 colorbar=dict(title=dict(text="sub-point<br>weight", side="right"), x=1.16),
                                 hovertemplate="sub-point x=%{x:.2f} m, y=%{y:.2f} m<br>weight %{z:.3f}"
                                               "<extra>fine head</extra>"))
    if cand_xy is not None and len(cand_xy):
        c = np.asarray(cand_xy, dtype=np.float64)
        fig.add_trace(go.Scatter(x=c[:, 0], y=c[:, 1], mode="markers", name="candidate cells",
                                 text=[f"c{k + 1}" for k in range(len(c))],
                                 marker=dict(symbol="square-open", size=14, color=CANDIDATE_COLOR, line=dict(width=2)),
                                 hovertemplate="%{text}<br>x=%{x:.1f} m, y=%{y:.1f} m<extra>candidate</extra>"))
    if sigma is not None and network_xy is not None:
        for k, dash in ((1.0, "solid"), (2.0, "dot")):
            pts = plots.ellipse_points(network_xy, sigma, k)
            fig.add_trace(go.Scatter(x=pts[:, 0], y=pts[:, 1], mode="lines", name=f"{k:g}σ network",
                                     line=dict(color=plots.NETWORK_COLOR, width=2, dash=dash), hoverinfo="skip"))
    if true_xy is not None:
        plots.point_marker(fig, true_xy, "ground truth", "star", plots.TRUTH_COLOR, 16)
    if network_xy is not None:
        plots.point_marker(fig, network_xy, "network estimate", "x", plots.NETWORK_COLOR)
    if map_xy is not None:
        plots.point_marker(fig, map_xy, "MAP estimate", "diamond", plots.MAP_COLOR)
    if window is None:
        plots.equal_axes(fig, bounds)
    else:
        cx, cy, half = (float(v) for v in window)
        fig.update_xaxes(range=[cx - half, cx + half], title_text="x [m]", constrain="domain")
        fig.update_yaxes(range=[cy - half, cy + half], title_text="y [m]", scaleanchor="x", scaleratio=1)
    fig.update_layout(title=title or "The network's distribution: coarse cells and fine sub-points", height=620,
                      legend=dict(orientation="h", y=-0.12), margin=dict(l=60, r=90, t=60, b=40))
    return fig
