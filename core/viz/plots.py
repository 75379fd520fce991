"""Plotly figures of the workbench: radio maps, training curves, attention, refinement.

Every builder returns a ``plotly.graph_objects.Figure`` with a title, axis labels with
units and colour bars, so a figure reads without the code. Scene coordinates are
metres (x east, y north); heatmaps are drawn at cell centres (see
:mod:`core.stores.radio_map`), with ``y`` growing upwards.

Large maps are shown every ``k``-th cell (nearest, never averaged: averaging would
mix angles through ±180° and dB with linear) so the browser gets at most
``max_cells`` cells per side; hover shows the exact stored value.

``geometry`` arguments take a ``core.scenes.SceneGeometry`` (or its ``to_dict()``)
and draw building footprints; ``sites`` is a list of ``{"name", "position": [x, y, z]}``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from core.errors import CoreError
from core.features import feature_spec, wrap_degrees
from core.stores.radio_map import RadioMap

#: colour scales per feature; angles use a cyclic one so -180 and 180 look the same
COLORSCALES = {"aoa": "Twilight", "bler": "Reds", "toa": "Viridis_r"}
BUILDING_FILL = "rgba(70, 70, 70, 0.45)"
BUILDING_LINE = "rgba(20, 20, 20, 0.9)"
SITE_COLOR = "#d62728"


def _feature_label(name: str) -> str:
    spec = feature_spec(name)
    return f"{spec.description} [{spec.unit}]"


def _short_label(name: str) -> str:
    spec = feature_spec(name)
    return f"{name} [{spec.unit}]"


def _ordinal(k: int) -> str:
    return f"{k}{'th' if 10 <= k % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(k % 10, 'th')}"


def _stride(shape: tuple[int, int], max_cells: int) -> int:
    return max(1, math.ceil(max(shape) / max_cells))


def _map_grid(rm: RadioMap, values: np.ndarray, max_cells: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Cell-centre axes and the values shown, every ``k``-th cell, NaN outside coverage."""
    k = _stride(rm.shape, max_cells)
    xs, ys = rm.cell_centers()
    z = np.where(rm.valid, values, np.nan).astype(np.float64)
    return xs[::k], ys[::k], z[::k, ::k], k


def _footprints(geometry: Any) -> list[tuple[np.ndarray, float]]:
    """``[(footprint [P, 2] m, height m)]`` from a SceneGeometry, its dict, or None."""
    if geometry is None:
        return []
    buildings = geometry.get("buildings", []) if isinstance(geometry, Mapping) else getattr(geometry, "buildings", [])
    out = []
    for b in buildings:
        fp = b.get("footprint") if isinstance(b, Mapping) else getattr(b, "footprint", None)
        h = b.get("height", 0.0) if isinstance(b, Mapping) else getattr(b, "height", 0.0)
        if fp is None:
            continue
        fp = np.asarray(fp, dtype=np.float64)
        if fp.ndim == 2 and fp.shape[0] >= 3 and fp.shape[1] >= 2:
            out.append((fp[:, :2], float(h)))
    return out


def add_buildings(fig: go.Figure, geometry: Any, row: int | None = None, col: int | None = None,
                  showlegend: bool = True) -> None:
    """Overlay building footprints (filled grey outlines) on an x/y [m] figure."""
    xs: list[float | None] = []
    ys: list[float | None] = []
    for fp, _ in _footprints(geometry):
        xs += fp[:, 0].tolist() + [fp[0, 0], None]
        ys += fp[:, 1].tolist() + [fp[0, 1], None]
    if not xs:
        return
    trace = go.Scatter(x=xs, y=ys, mode="lines", fill="toself", fillcolor=BUILDING_FILL,
                       line=dict(color=BUILDING_LINE, width=0.6), name="buildings", hoverinfo="skip",
                       showlegend=showlegend)
    fig.add_trace(trace, row=row, col=col)


def add_sites(fig: go.Figure, sites: Sequence[Mapping] | None, row: int | None = None, col: int | None = None,
              showlegend: bool = True) -> None:
    """Overlay base-station sites as labelled markers."""
    if not sites:
        return
    pos = np.array([s["position"] for s in sites], dtype=np.float64)
    names = [str(s.get("name", i)) for i, s in enumerate(sites)]
    fig.add_trace(
        go.Scatter(
            x=pos[:, 0], y=pos[:, 1], mode="markers+text", text=names, textposition="top center",
            marker=dict(symbol="triangle-up", size=13, color=SITE_COLOR, line=dict(color="white", width=1.5)),
            textfont=dict(color=SITE_COLOR), name="sites",
            customdata=pos[:, 2:3] if pos.shape[1] > 2 else None,
            hovertemplate="site %{text}<br>x=%{x:.1f} m, y=%{y:.1f} m" + (
                "<br>height %{customdata[0]:.1f} m" if pos.shape[1] > 2 else "") + "<extra></extra>",
            showlegend=showlegend,
        ),
        row=row, col=col,
    )


def equal_axes(fig: go.Figure, bounds: Sequence[float], row: int | None = None, col: int | None = None) -> None:
    x_min, y_min, x_max, y_max = bounds
    fig.update_xaxes(title_text="x [m]", range=[x_min, x_max], constrain="domain", row=row, col=col)
    fig.update_yaxes(title_text="y [m]", range=[y_min, y_max], scaleanchor="x" if row is None else None,
                     constrain="domain", row=row, col=col)


def _heatmap(rm: RadioMap, name: str, values: np.ndarray, max_cells: int, colorscale: str | None = None,
             colorbar_title: str | None = None, zmid: float | None = None, **kwargs) -> tuple[go.Heatmap, int]:
    xs, ys, z, k = _map_grid(rm, values, max_cells)
    unit = feature_spec(name).unit if name in _known_features() else ""
    trace = go.Heatmap(
        x=xs, y=ys, z=z, colorscale=colorscale or COLORSCALES.get(name, "Viridis"), zmid=zmid,
        colorbar=dict(title=dict(text=colorbar_title or _short_label(name), side="right")),
        hovertemplate=f"x=%{{x:.1f}} m<br>y=%{{y:.1f}} m<br>{name}=%{{z:.4g}} {unit}<extra></extra>",
        name=name, **kwargs,
    )
    return trace, k


def _known_features() -> set[str]:
    from core.features import FEATURES

    return set(FEATURES)


def feature_heatmap(rm: RadioMap, feature: str, geometry: Any = None, sites: Sequence[Mapping] | None = None,
                    max_cells: int = 256, title: str | None = None, height: int = 560) -> go.Figure:
    """Heatmap of one feature of ``rm`` in its unit, with buildings, sites and hover values.

    Cells outside the coverage mask are blank. ``sites`` defaults to ``rm.attrs["sites"]``.
    """
    sites = rm.attrs.get("sites") if sites is None else sites
    # colours span the 1st-99th percentile so a few extreme cells do not wash out the map;
    # hover still shows every cell's exact value
    covered = rm.feature(feature)[rm.valid]
    zmin = zmax = None
    if covered.size and not feature_spec(feature).angular:
        zmin, zmax = (float(v) for v in np.percentile(covered, [1, 99]))
        if zmax <= zmin:
            zmin = zmax = None
    trace, k = _heatmap(rm, feature, rm.feature(feature), max_cells, zmin=zmin, zmax=zmax)
    fig = go.Figure(trace)
    add_buildings(fig, geometry)
    add_sites(fig, sites)
    note = f" (every {_ordinal(k)} cell shown)" if k > 1 else ""
    scene = rm.attrs.get("scene", "")
    fig.update_layout(
        title=title or f"{_feature_label(feature)} — {scene}, {rm.shape[0]}×{rm.shape[1]} cells of "
                       f"{rm.cell_size:g} m{note}",
        height=height, margin=dict(l=60, r=20, t=60, b=50), legend=dict(orientation="h", y=-0.12),
    )
    equal_axes(fig, rm.bounds)
    return fig


def feature_histogram(rm: RadioMap, feature: str, bins: int = 60) -> go.Figure:
    """Histogram of one feature over the covered cells."""
    values = rm.feature(feature)[rm.valid]
    fig = go.Figure(go.Histogram(x=values, nbinsx=bins, marker_color="#1f77b4", name=feature,
                                 hovertemplate=f"{feature} %{{x}}<br>%{{y}} cells<extra></extra>"))
    stats = rm.stats[feature]
    kind = "circular mean" if feature_spec(feature).angular else "mean"
    fig.update_layout(
        title=f"Distribution of {feature} over {values.size:,} covered cells ({kind} {stats.mean:.3g}, "
              f"std {stats.std:.3g} {feature_spec(feature).unit})",
        xaxis_title=_short_label(feature), yaxis_title="number of cells", height=360, bargap=0.02,
        margin=dict(l=60, r=20, t=60, b=50),
    )
    return fig


def difference(rm_a: RadioMap, rm_b: RadioMap, feature: str) -> np.ndarray:
    """``a - b`` of one feature, ``[H, W]``; angles wrapped to (-180, 180]; NaN where
    either map has no coverage. The maps must share their grid."""
    if rm_a.shape != rm_b.shape or not np.allclose(rm_a.bounds, rm_b.bounds):
        raise CoreError(
            f"maps {rm_a.source or 'A'} and {rm_b.source or 'B'} are on different grids "
            f"({rm_a.shape[0]}×{rm_a.shape[1]} in {rm_a.bounds} vs {rm_b.shape[0]}×{rm_b.shape[1]} in {rm_b.bounds}); "
            "a difference needs the same grid"
        )
    diff = rm_a.feature(feature).astype(np.float64) - rm_b.feature(feature).astype(np.float64)
    if feature_spec(feature).angular:
        diff = wrap_degrees(diff)
    return np.where(rm_a.valid & rm_b.valid, diff, np.nan)


def difference_heatmap(rm_a: RadioMap, rm_b: RadioMap, feature: str, label_a: str = "A", label_b: str = "B",
                       geometry: Any = None, max_cells: int = 256) -> go.Figure:
    """Heatmap of ``a - b`` of one feature, with a diverging colour scale centred on 0."""
    diff = difference(rm_a, rm_b, feature)
    unit = feature_spec(feature).unit
    both = RadioMap(np.nan_to_num(diff, nan=0.0)[None].astype(np.float32), [feature], rm_a.bounds,
                    valid=np.isfinite(diff))
    trace, k = _heatmap(both, feature, both.feature(feature), max_cells, colorscale="RdBu_r",
                        colorbar_title=f"Δ {feature} [{unit}]", zmid=0.0)
    fig = go.Figure(trace)
    add_buildings(fig, geometry)
    finite = diff[np.isfinite(diff)]
    med = float(np.median(np.abs(finite))) if finite.size else float("nan")
    fig.update_layout(title=f"Difference of {feature}: {label_a} − {label_b} (median |Δ| {med:.3g} {unit})",
                      height=560, margin=dict(l=60, r=20, t=60, b=50), legend=dict(orientation="h", y=-0.12))
    equal_axes(fig, rm_a.bounds)
    return fig


def site_layer_heatmap(rm: RadioMap, values: np.ndarray, feature: str, site: int, view: str, geometry: Any = None,
                       max_cells: int = 256, height: int = 560) -> go.Figure:
    """Heatmap of one site's per-site layer ``values [H, W]`` of ``feature`` (path_gain dB, toa ns, aoa deg) on
    ``rm``'s grid, with that site marked: ``view`` ``twin`` or ``corrected`` in the feature's colours, or
    ``correction`` (corrected - twin, :func:`core.physics.twin_correction.site_layer`) diverging around 0."""
    unit = feature_spec(feature).unit
    sites = rm.attrs.get("sites") or []
    name = str(sites[site].get("name", site)) if 0 <= site < len(sites) else str(site)
    finite = values[np.isfinite(values) & rm.valid]
    if view == "correction":
        trace, k = _heatmap(rm, feature, values, max_cells, colorscale="RdBu_r", zmid=0.0,
                            colorbar_title=f"Δ {feature} [{unit}]")
        med = float(np.median(np.abs(finite))) if finite.size else float("nan")
        what = f"correction (corrected − twin{'; wrapped to ±180°' if feature_spec(feature).angular else ''}), " \
               f"median |Δ| {med:.3g} {unit}"
    else:
        zmin = zmax = None
        if finite.size and not feature_spec(feature).angular:
            zmin, zmax = (float(v) for v in np.percentile(finite, [1, 99]))
            zmin, zmax = (zmin, zmax) if zmax > zmin else (None, None)
        trace, k = _heatmap(rm, feature, values, max_cells, zmin=zmin, zmax=zmax)
        what = view
    fig = go.Figure(trace)
    add_buildings(fig, geometry)
    add_sites(fig, [sites[site]] if 0 <= site < len(sites) else None)
    note = f" (every {_ordinal(k)} cell shown)" if k > 1 else ""
    fig.update_layout(title=f"{feature} [{unit}] of site {name}: {what}{note}", height=height,
                      margin=dict(l=60, r=20, t=60, b=50), legend=dict(orientation="h", y=-0.12))
    equal_axes(fig, rm.bounds)
    return fig


# -- training ---------------------------------------------------------------------------
def loss_curves(metrics: Sequence[Mapping], title: str = "Training curves") -> go.Figure:
    """Every loss term per epoch (train solid, val dashed) and the val errors [m].

    ``metrics`` are the rows of a run's ``metrics.jsonl``: numeric keys such as
    ``train_total``, ``val_phys``, ``val_median_m``, ``val_p90_m``.
    """
    fig = make_subplots(rows=1, cols=2, subplot_titles=("Loss terms", "Validation error"),
                        horizontal_spacing=0.1)
    if not metrics:
        fig.update_layout(title=f"{title} — no epoch finished yet", height=380)
        return fig
    epochs = [r.get("epoch", i + 1) for i, r in enumerate(metrics)]
    keys = sorted({k for r in metrics for k, v in r.items() if isinstance(v, (int, float))})
    loss_keys = [k for k in keys if k.startswith(("train_", "val_")) and not k.endswith("_m")]
    palette = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2"]
    terms = sorted({k.split("_", 1)[1] for k in loss_keys})
    for key in loss_keys:
        split, term = key.split("_", 1)
        ys = [r.get(key) for r in metrics]
        fig.add_trace(go.Scatter(x=epochs, y=ys, mode="lines+markers", name=key,
                                 line=dict(color=palette[terms.index(term) % len(palette)],
                                           dash="solid" if split == "train" else "dash")), row=1, col=1)
    for key, color in (("val_median_m", "#1f77b4"), ("val_p90_m", "#d62728")):
        if key in keys:
            fig.add_trace(go.Scatter(x=epochs, y=[r.get(key) for r in metrics], mode="lines+markers",
                                     name=key.replace("val_", "val ").replace("_m", " [m]"),
                                     line=dict(color=color)), row=1, col=2)
    fig.update_xaxes(title_text="epoch")
    fig.update_yaxes(title_text="loss (dimensionless)", row=1, col=1)
    fig.update_yaxes(title_text="localization error [m]", row=1, col=2)
    fig.update_layout(title=title, height=420, margin=dict(l=60, r=20, t=70, b=50))
    return fig


GRADIENT_TERMS = (("grad_norm_coarse", "coarse", "#1f77b4"), ("grad_norm_fine", "λ_fine·fine", "#ff7f0e"),
                  ("grad_norm_sup", "supervised (sum)", "#7f7f7f"), ("grad_norm_phys", "λ_phys·phys", "#2ca02c"))


def gradient_balance(metrics: Sequence[Mapping], title: str = "Gradient balance") -> go.Figure:
    """Per epoch (rows of metrics.jsonl): the gradient norm of each loss term at full weight, and the
    cosine between the supervised and the physics gradients with the λ_phys applied."""
    fig = make_subplots(rows=1, cols=2, horizontal_spacing=0.12, specs=[[{}, {"secondary_y": True}]],
                        subplot_titles=("Gradient norm per term (one fixed batch)",
                                        "cos(supervised, physics) and λ_phys applied"))
    rows = [r for r in metrics if isinstance(r.get("grad_norm_coarse"), (int, float))]
    if not rows:
        fig.update_layout(title=f"{title} — not recorded for this run", height=380)
        return fig
    epochs = [r.get("epoch", i + 1) for i, r in enumerate(rows)]
    for key, name, color in GRADIENT_TERMS:
        ys = [r.get(key) for r in rows]
        if any(isinstance(y, (int, float)) for y in ys):
            fig.add_trace(go.Scatter(x=epochs, y=ys, mode="lines+markers", name=name, line=dict(color=color)),
                          row=1, col=1)
    cos = [r.get("grad_cos_sup_phys") for r in rows]
    if any(isinstance(c, (int, float)) for c in cos):
        fig.add_trace(go.Scatter(x=epochs, y=cos, mode="lines+markers", name="cosine", line=dict(color="#9467bd")),
                      row=1, col=2)
    fig.add_trace(go.Scatter(x=epochs, y=[r.get("lambda_phys") for r in rows], mode="lines", name="λ_phys applied",
                             line=dict(color="#2ca02c", dash="dot")), row=1, col=2, secondary_y=True)
    fig.update_xaxes(title_text="epoch")
    fig.update_yaxes(title_text="gradient norm", type="log", row=1, col=1)
    fig.update_yaxes(title_text="cosine", range=[-1, 1], row=1, col=2, secondary_y=False)
    fig.update_yaxes(title_text="λ_phys", row=1, col=2, secondary_y=True)
    fig.update_layout(title=title, height=420, margin=dict(l=60, r=60, t=70, b=50))
    return fig


def fraction_curves(rows: Sequence[Mapping], title: str = "Median error vs label fraction") -> go.Figure:
    """Test median vs label fraction with its 95 % CI band, one line per (arm, refinement): the rows of
    an ablation's ``curve.csv`` for one split."""
    fig = go.Figure()
    palette = ["#1f77b4", "#2ca02c", "#ff7f0e", "#d62728", "#9467bd", "#8c564b"]
    keys = list(dict.fromkeys((r["arm"], r["refinement"]) for r in rows))
    for i, (arm, refine) in enumerate(keys):
        part = sorted((r for r in rows if (r["arm"], r["refinement"]) == (arm, refine)), key=lambda r: r["label_fraction"])
        x = [100 * r["label_fraction"] for r in part]
        color = palette[i % len(palette)]
        name = arm + (" + refine" if refine == "on" else "")
        fig.add_trace(go.Scatter(x=x + x[::-1], y=[r["median_m_hi"] for r in part] + [r["median_m_lo"] for r in part][::-1],
                                 fill="toself", fillcolor=color, opacity=0.15, line=dict(width=0), hoverinfo="skip",
                                 showlegend=False, name=f"{name} CI"))
        fig.add_trace(go.Scatter(x=x, y=[r["median_m"] for r in part], mode="lines+markers", name=name,
                                 line=dict(color=color, dash="dot" if refine == "on" else "solid"),
                                 hovertemplate="%{x:g} % labels<br>median %{y:.2f} m<extra>" + name + "</extra>"))
    fig.update_layout(title=title, xaxis_title="labelled train walks [%]", yaxis_title="test median error [m]",
                      xaxis_type="log", height=440, margin=dict(l=60, r=20, t=60, b=50))
    return fig


def error_cdf(errors: Mapping[str, np.ndarray], title: str = "Error CDF", max_m: float | None = None) -> go.Figure:
    """Empirical CDF of localization errors [m], one curve per name."""
    fig = go.Figure()
    for name, err in errors.items():
        err = np.sort(np.asarray(err, dtype=np.float64)[np.isfinite(err)])
        if err.size == 0:
            continue
        cdf = np.arange(1, err.size + 1) / err.size
        fig.add_trace(go.Scatter(x=err, y=cdf, mode="lines", name=f"{name} (median {np.median(err):.2f} m)",
                                 hovertemplate="error %{x:.2f} m<br>fraction %{y:.3f}<extra>" + name + "</extra>"))
    fig.update_layout(title=title, xaxis_title="localization error [m]", yaxis_title="fraction of samples ≤ error",
                      yaxis_range=[0, 1.01], height=420, margin=dict(l=60, r=20, t=60, b=50))
    if max_m:
        fig.update_xaxes(range=[0, max_m])
    return fig


def cdf_curves(curves: Mapping[str, Mapping[str, Sequence[float]]], title: str = "Error CDF") -> go.Figure:
    """Pre-computed CDF curves ``{name: {"error_m": [...], "fraction": [...]}}`` (the
    ablation's ``cdf.json``), one line per method."""
    fig = go.Figure()
    for name, curve in curves.items():
        x = np.asarray(curve.get("error_m", []), dtype=np.float64)
        y = np.asarray(curve.get("fraction", []), dtype=np.float64)
        if x.size == 0:
            continue
        med = float(np.interp(0.5, y, x)) if y[-1] >= 0.5 and np.all(np.diff(y) >= 0) else float("nan")
        fig.add_trace(go.Scatter(x=x, y=y, mode="lines", name=f"{name} (median {med:.2f} m)",
                                 line=dict(dash="dot" if "refine" in name else "solid"),
                                 hovertemplate="error %{x:.2f} m<br>fraction %{y:.3f}<extra>" + name + "</extra>"))
    fig.update_layout(title=title, xaxis_title="localization error [m]", yaxis_title="fraction of samples ≤ error",
                      yaxis_range=[0, 1.01], height=460, margin=dict(l=60, r=20, t=60, b=50))
    return fig


# -- attention ---------------------------------------------------------------------------
def temporal_attention(layers: Sequence[np.ndarray], report_mask: np.ndarray | None = None,
                       title: str = "Temporal self-attention", labels: Sequence[str] | None = None) -> go.Figure:
    """One heatmap per layer (rows) and head (columns) of a sample's self-attention.

    Args:
        layers: ``L`` arrays ``[heads, T, T]``: weight of key report ``k`` (column) for
            query report ``q`` (row); each row sums to 1 over present reports.
        report_mask: bool ``[T]``, missing reports are marked in the axis labels.
        labels: ``T`` token labels (e.g. time and sites heard:
            :func:`core.learning.candidates.report_labels`) instead of ``r<t>``.
    """
    n_layers = len(layers)
    heads = int(np.asarray(layers[0]).shape[0]) if n_layers else 0
    if n_layers == 0 or heads == 0:
        raise CoreError("no temporal attention to draw (the model returned none)")
    t = np.asarray(layers[0]).shape[-1]
    if labels is None or len(labels) != t:
        labels = [f"r{i}" + ("" if report_mask is None or report_mask[i] else " (missing)") for i in range(t)]
    long = max(len(str(x)) for x in labels) > 12
    fig = make_subplots(rows=n_layers, cols=heads, subplot_titles=[f"layer {layer + 1}, head {h + 1}"
                                                                    for layer in range(n_layers) for h in range(heads)],
                        horizontal_spacing=0.03, vertical_spacing=min(0.12, 0.3 / n_layers))
    for layer, attn in enumerate(layers):
        attn = np.asarray(attn, dtype=np.float64)
        for h in range(heads):
            fig.add_trace(go.Heatmap(z=attn[h], x=labels, y=labels, coloraxis="coloraxis",
                                     hovertemplate="query %{y} → key %{x}<br>weight %{z:.3f}<extra></extra>"),
                          row=layer + 1, col=h + 1)
    fig.update_yaxes(autorange="reversed", showticklabels=False)
    fig.update_yaxes(title_text="query report", showticklabels=True, col=1)
    fig.update_xaxes(showticklabels=False)
    fig.update_xaxes(title_text="key report", showticklabels=True, row=n_layers)
    fig.update_layout(title=title, coloraxis=dict(colorscale="Blues", cmin=0, colorbar=dict(title="weight")),
                      height=max(320, 250 * n_layers + 80) + (120 if long else 0),
                      margin=dict(l=190 if long else 70, r=20, t=80, b=170 if long else 50))
    return fig


def patch_attention_map(weights: np.ndarray, patch_bounds: Sequence[float], geometry: Any = None,
                        sites: Sequence[Mapping] | None = None, true_xy: Sequence[float] | None = None,
                        pred_xy: Sequence[float] | None = None, title: str = "Cross-attention over map patches",
                        colorbar_title: str = "attention weight") -> go.Figure:
    """Attention weights over a ``[gh, gw]`` grid of map patches, drawn over the scene.

    Args:
        weights: ``[gh, gw]``; patch ``(i, j)`` covers the cell-centred block ``i`` (along
            +y) and ``j`` (along +x) of ``patch_bounds = (x_min, y_min, x_max, y_max)`` [m].
    """
    weights = np.asarray(weights, dtype=np.float64)
    gh, gw = weights.shape
    x_min, y_min, x_max, y_max = patch_bounds
    xs = x_min + (np.arange(gw) + 0.5) * (x_max - x_min) / gw
    ys = y_min + (np.arange(gh) + 0.5) * (y_max - y_min) / gh
    fig = go.Figure(go.Heatmap(x=xs, y=ys, z=weights, colorscale="Hot_r", opacity=0.85,
                               colorbar=dict(title=dict(text=colorbar_title, side="right")),
                               hovertemplate="patch centre x=%{x:.0f} m, y=%{y:.0f} m<br>weight %{z:.4f}<extra></extra>",
                               name="attention"))
    add_buildings(fig, geometry)
    add_sites(fig, sites)
    _add_points(fig, true_xy, pred_xy)
    fig.update_layout(title=title, height=560, margin=dict(l=60, r=20, t=60, b=50), legend=dict(orientation="h", y=-0.12))
    equal_axes(fig, patch_bounds)
    return fig


def _add_points(fig: go.Figure, true_xy, pred_xy) -> None:
    if true_xy is not None:
        fig.add_trace(go.Scatter(x=[true_xy[0]], y=[true_xy[1]], mode="markers", name="ground truth",
                                 marker=dict(symbol="star", size=16, color="#2ca02c", line=dict(color="black", width=1)),
                                 hovertemplate="truth x=%{x:.1f} m, y=%{y:.1f} m<extra></extra>"))
    if pred_xy is not None:
        fig.add_trace(go.Scatter(x=[pred_xy[0]], y=[pred_xy[1]], mode="markers", name="prediction",
                                 marker=dict(symbol="x", size=13, color="#1f77b4", line=dict(color="white", width=1)),
                                 hovertemplate="prediction x=%{x:.1f} m, y=%{y:.1f} m<extra></extra>"))


# -- refinement --------------------------------------------------------------------------
def ellipse_points(center: Sequence[float], sigma: Any, n_sigma: float = 1.0, n: int = 64) -> np.ndarray:
    """``[n+1, 2]`` outline of the ``n_sigma`` uncertainty ellipse at ``center`` [m].

    ``sigma`` is a scalar σ (circle), ``(σx, σy)`` (axis-aligned) or a 2×2 covariance [m²].
    """
    s = np.asarray(sigma, dtype=np.float64)
    theta = np.linspace(0, 2 * np.pi, n + 1)
    circle = np.stack([np.cos(theta), np.sin(theta)], axis=1)
    if s.ndim == 0:
        pts = circle * float(s)
    elif s.shape == (2,):
        pts = circle * s[None, :]
    elif s.shape == (2, 2):
        vals, vecs = np.linalg.eigh(s)
        pts = circle * np.sqrt(np.clip(vals, 0, None))[None, :] @ vecs.T
    else:
        raise CoreError(f"sigma of shape {s.shape}: expected a scalar, (σx, σy) or a 2×2 covariance")
    return np.asarray(center, dtype=np.float64)[None, :2] + n_sigma * pts


def sample_map(rm: RadioMap, feature: str, true_xy: Sequence[float], pred_xy: Sequence[float], sigma: Any = None,
               path: np.ndarray | None = None, step: int | None = None, geometry: Any = None,
               window_m: float | None = 120.0, title: str | None = None, max_cells: int = 256,
               end_name: str | None = None) -> go.Figure:
    """The ``feature`` map around one sample: ground truth, prediction with its 1σ/2σ
    ellipses, and the MAP path up to point ``step`` (``path [P, 2]`` m, point 0 = the
    network's prediction; None: all of it); ``end_name`` names its last point's marker
    (default "path point <step>")."""
    fig = feature_heatmap(rm, feature, geometry=geometry, max_cells=max_cells)
    if sigma is not None:
        for k, dash in ((1.0, "solid"), (2.0, "dot")):
            pts = ellipse_points(pred_xy, sigma, k)
            fig.add_trace(go.Scatter(x=pts[:, 0], y=pts[:, 1], mode="lines", name=f"{k:g}σ uncertainty",
                                     line=dict(color="#1f77b4", width=2, dash=dash), hoverinfo="skip"))
    if path is not None and len(path) > 1:
        path = np.asarray(path, dtype=np.float64)
        upto = len(path) - 1 if step is None else int(np.clip(step, 0, len(path) - 1))
        shown = path[: upto + 1]
        fig.add_trace(go.Scatter(x=shown[:, 0], y=shown[:, 1], mode="lines+markers", name="MAP path",
                                 text=[f"step {i}" for i in range(len(shown))],
                                 line=dict(color="#ff7f0e", width=2), marker=dict(size=7),
                                 hovertemplate="%{text}<br>x=%{x:.1f} m, y=%{y:.1f} m<extra></extra>"))
        fig.add_trace(go.Scatter(x=[shown[-1, 0]], y=[shown[-1, 1]], mode="markers", name=end_name or f"path point {upto}",
                                 marker=dict(symbol="diamond", size=12, color="#ff7f0e", line=dict(color="black", width=1)),
                                 hovertemplate="step " + str(upto) + "<br>x=%{x:.1f} m, y=%{y:.1f} m<extra></extra>"))
    _add_points(fig, true_xy, pred_xy)
    if window_m:
        cx = (true_xy[0] + pred_xy[0]) / 2
        cy = (true_xy[1] + pred_xy[1]) / 2
        half = max(window_m / 2, 0.6 * math.hypot(true_xy[0] - pred_xy[0], true_xy[1] - pred_xy[1]) + 10)
        fig.update_xaxes(range=[cx - half, cx + half])
        fig.update_yaxes(range=[cy - half, cy + half])
    fig.update_layout(title=title or f"{_feature_label(feature)} around the sample", height=600)
    return fig


#: colours of the refinement figures
NETWORK_COLOR, MAP_COLOR, TRUTH_COLOR, START_COLOR = "#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd"


def surface_layers(surface, site_names: Sequence[str] = ()) -> dict[str, np.ndarray]:
    """The layers of a :class:`~core.physics.surface.LikelihoodSurface` to draw, by label:
    posterior, likelihood (all terms), prior, then one per reported site (slot order), the
    serving cell's features when they weigh anything, and "silent sites" (what the sites the sample
    did not hear add: the silence term) when the likelihood has one. Values ``[H, W]`` in nats."""
    layers = {"posterior (likelihood + prior)": surface.posterior, "likelihood (all sites)": surface.nll,
              "prior (network)": surface.prior}
    for k, s in enumerate(np.asarray(surface.site_ids)):
        if s >= 0:
            layers[f"site {site_names[s] if s < len(site_names) else s}"] = surface.site[k]
    cell = np.asarray(surface.cell)[np.isfinite(surface.cell)]
    if cell.size and np.ptp(cell) > 0:
        layers["serving cell features"] = surface.cell
    if surface.silence is not None:
        layers["silent sites"] = surface.silence
    return layers


def point_marker(fig: go.Figure, xy, name: str, symbol: str, color: str, size: int = 14) -> None:
    fig.add_trace(go.Scatter(x=[xy[0]], y=[xy[1]], mode="markers", name=name,
                             marker=dict(symbol=symbol, size=size, color=color, line=dict(color="black", width=1)),
                             hovertemplate=name + " x=%{x:.2f} m, y=%{y:.2f} m<extra></extra>"))


def likelihood_surface(surface, layer: str, true_xy=None, network_xy=None, sigma=None, map_xy=None,
                       path: np.ndarray | None = None, path_labels: Sequence[str] = (), starts: np.ndarray | None = None,
                       start_labels: Sequence[str] = (), site_names: Sequence[str] = (), title: str | None = None,
                       max_delta: float = 30.0, bound_cov=None) -> go.Figure:
    """One layer of a likelihood surface as a heatmap of ``value - min`` [nats] (capped at
    ``max_delta``), with the truth, the network's estimate and its 1σ / 2σ ellipses
    (``sigma`` = (σx, σy) m), the MAP estimate, its path ``[P, 2]`` (labels per point) and
    the search's starts ``[M, 2]``. ``layer`` is a key of :func:`surface_layers`.
    ``bound_cov`` ``[2, 2]`` [m^2]: the Cramér–Rao bound's covariance at the truth
    (:mod:`core.physics.bound`), drawn as its 1σ / 2σ ellipses around ``true_xy``: where an
    efficient estimator's errors would lie."""
    layers = surface_layers(surface, site_names)
    if layer not in layers:
        raise CoreError(f"likelihood surface: no layer {layer!r} (have {', '.join(layers)})")
    z = np.asarray(layers[layer], dtype=np.float64)
    finite = z[np.isfinite(z)]
    dz = z - (finite.min() if finite.size else 0.0)  # NaN (outside the map) stays NaN
    fig = go.Figure(go.Heatmap(
        x=surface.xs, y=surface.ys, z=np.minimum(dz, max_delta), zmin=0.0,
        zmax=max(min(float(finite.max() - finite.min()) if finite.size else 0.0, max_delta), 1e-6),
        colorscale="Viridis_r", name=layer, customdata=dz,
        colorbar=dict(title=dict(text="Δ NLL [nats]<br>(0 = best in view)")),
        hovertemplate="x=%{x:.2f} m, y=%{y:.2f} m<br>Δ=%{customdata:.2f} nats<extra>" + layer + "</extra>"))
    if sigma is not None and network_xy is not None:
        for k, dash in ((1.0, "solid"), (2.0, "dot")):
            pts = ellipse_points(network_xy, sigma, k)
            fig.add_trace(go.Scatter(x=pts[:, 0], y=pts[:, 1], mode="lines", name=f"{k:g}σ network",
                                     line=dict(color=NETWORK_COLOR, width=2, dash=dash), hoverinfo="skip"))
    if bound_cov is not None and true_xy is not None and np.isfinite(np.asarray(bound_cov, dtype=np.float64)).all():
        for k, dash in ((1.0, "solid"), (2.0, "dot")):
            pts = ellipse_points(true_xy, bound_cov, k)
            fig.add_trace(go.Scatter(x=pts[:, 0], y=pts[:, 1], mode="lines", name=f"{k:g}σ Cramér–Rao bound",
                                     line=dict(color=TRUTH_COLOR, width=2, dash=dash), hoverinfo="skip"))
    if starts is not None and len(starts):
        st = np.asarray(starts, dtype=np.float64)
        fig.add_trace(go.Scatter(x=st[:, 0], y=st[:, 1], mode="markers", name="search starts",
                                 text=list(start_labels) or None,
                                 marker=dict(symbol="circle-open", size=10, color=START_COLOR, line=dict(width=2)),
                                 hovertemplate="%{text}<br>x=%{x:.2f} m, y=%{y:.2f} m<extra>start</extra>"))
    if path is not None and len(path):
        pa = np.asarray(path, dtype=np.float64)
        fig.add_trace(go.Scatter(x=pa[:, 0], y=pa[:, 1], mode="lines+markers", name="MAP path",
                                 text=list(path_labels) or None, line=dict(color=MAP_COLOR, width=2), marker=dict(size=6),
                                 hovertemplate="%{text}<br>x=%{x:.2f} m, y=%{y:.2f} m<extra>path</extra>"))
    if true_xy is not None:
        point_marker(fig, true_xy, "ground truth", "star", TRUTH_COLOR, 16)
    if network_xy is not None:
        point_marker(fig, network_xy, "network estimate", "x", NETWORK_COLOR)
    if map_xy is not None:
        point_marker(fig, map_xy, "MAP estimate", "diamond", MAP_COLOR)
    x0, x1 = float(surface.xs[0]), float(surface.xs[-1])
    y0, y1 = float(surface.ys[0]), float(surface.ys[-1])
    pad = 0.5 * float(surface.step)
    fig.update_xaxes(range=[x0 - pad, x1 + pad], title_text="x [m]", constrain="domain")
    fig.update_yaxes(range=[y0 - pad, y1 + pad], title_text="y [m]", scaleanchor="x", scaleratio=1)
    fig.update_layout(title=title or f"Likelihood surface: {layer}", height=620, legend=dict(orientation="h", y=-0.12),
                      margin=dict(l=60, r=20, t=60, b=40))
    return fig


def posterior_along_path(posterior: np.ndarray, labels: Sequence[str],
                         title: str = "Posterior along the MAP path") -> go.Figure:
    """``J = NLL + prior`` [nats] at each point of the MAP path (network estimate, best start,
    pattern search, polish steps)."""
    j = np.asarray(posterior, dtype=np.float64)
    fig = go.Figure(go.Scatter(x=list(labels), y=j, mode="lines+markers", name="posterior",
                               line=dict(color=MAP_COLOR), hovertemplate="%{x}<br>J=%{y:.3f} nats<extra></extra>"))
    fig.update_layout(title=title, xaxis_title="stage of the search", yaxis_title="posterior −log p [nats]",
                      height=340, margin=dict(l=60, r=20, t=60, b=50))
    return fig


def refinement_summary(err_before: np.ndarray, err_after: np.ndarray, refined: np.ndarray | None = None,
                       before: str = "network", after: str = "network + MAP") -> go.Figure:
    """Error before vs after refinement per sample [m] (left) and both CDFs (right)."""
    b = np.asarray(err_before, dtype=np.float64)
    a = np.asarray(err_after, dtype=np.float64)
    fig = make_subplots(rows=1, cols=2, subplot_titles=("Per sample", "Error CDF"), horizontal_spacing=0.12)
    colors = None if refined is None else np.where(np.asarray(refined), MAP_COLOR, "#7f7f7f")
    fig.add_trace(go.Scatter(x=b, y=a, mode="markers", marker=dict(size=5, color=colors, opacity=0.7),
                             name="samples (orange: refined)",
                             hovertemplate=before + " %{x:.2f} m<br>" + after + " %{y:.2f} m<extra></extra>"),
                  row=1, col=1)
    top = float(np.nanmax(np.concatenate([b, a]))) if b.size else 1.0
    fig.add_trace(go.Scatter(x=[0, top], y=[0, top], mode="lines", line=dict(color="black", dash="dash"),
                             name="no change", hoverinfo="skip"), row=1, col=1)
    for name, err, color in ((before, b, NETWORK_COLOR), (after, a, MAP_COLOR)):
        e = np.sort(err[np.isfinite(err)])
        if e.size:
            fig.add_trace(go.Scatter(x=e, y=np.arange(1, e.size + 1) / e.size, mode="lines", line=dict(color=color),
                                     name=f"{name} (median {np.median(e):.2f} m)"), row=1, col=2)
    fig.update_xaxes(title_text=f"error, {before} [m]", type="log", row=1, col=1)
    fig.update_yaxes(title_text=f"error, {after} [m]", type="log", row=1, col=1)
    fig.update_xaxes(title_text="localization error [m]", type="log", row=1, col=2)
    fig.update_yaxes(title_text="fraction of samples ≤ error", range=[0, 1.01], row=1, col=2)
    fig.update_layout(title=f"Batch summary: {before} vs {after}", height=430, margin=dict(l=60, r=20, t=80, b=50))
    return fig


# -- localized report files --------------------------------------------------------------
def ellipse_covariance(major: float, minor: float, angle_deg: float) -> np.ndarray:
    """The 2×2 covariance [m²] of a 1σ ellipse: semi-axes ``major``, ``minor`` [m], major axis at ``angle_deg``
    counter-clockwise from +x (:mod:`core.reports.ellipse`)."""
    a = math.radians(angle_deg)
    rot = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    return rot @ np.diag([major**2, minor**2]) @ rot.T


def report_tracks(rm: RadioMap, positions: Mapping[str, Any], geometry: Any = None, highlight: str | None = None,
                  max_points: int = 20_000, title: str | None = None) -> go.Figure:
    """Localized tracks over the scene: the path-gain map (grey) with buildings and sites, one line per walk,
    the positions coloured by their error [m] when ``positions`` has ``error_m`` (else by walk), and for the
    ``highlight`` walk its 1σ ellipses and its true track.

    ``positions``: columns of the localize result (:mod:`core.reports.positions`: ``walk_id``, ``time_s``,
    ``x_m``, ``y_m``, ``sigma_major_m``, ``sigma_minor_m``, ``sigma_angle_deg``, optionally ``true_x_m``,
    ``true_y_m``, ``error_m``); at most ``max_points`` are drawn (whole walks, in file order)."""
    fig = feature_heatmap(rm, "path_gain", geometry=geometry, title=title or "Localized tracks")
    fig.data[0].update(colorscale="Greys", showscale=False, opacity=0.45)
    walk = np.asarray(positions["walk_id"]).astype(str)
    x, y = np.asarray(positions["x_m"], float), np.asarray(positions["y_m"], float)
    t = np.asarray(positions["time_s"], float)
    keep = np.arange(len(walk)) < max_points
    if highlight is not None:
        keep |= walk == highlight
    walk, x, y, t = walk[keep], x[keep], y[keep], t[keep]
    brk = np.flatnonzero(walk[1:] != walk[:-1]) + 1
    lx, ly = np.insert(x, brk, np.nan), np.insert(y, brk, np.nan)
    fig.add_trace(go.Scattergl(x=lx, y=ly, mode="lines", name="tracks", line=dict(color="#555", width=1),
                               hoverinfo="skip"))
    err = np.asarray(positions["error_m"], float)[keep] if "error_m" in positions else None
    if err is not None and np.isfinite(err).any():
        top = float(np.nanpercentile(err, 95)) or 1.0
        marker = dict(size=5, color=err, colorscale="Turbo", cmin=0.0, cmax=top,
                      colorbar=dict(title="error m", x=1.02))
        hover = "walk %{customdata[0]} t=%{customdata[1]:.2f} s<br>x=%{x:.1f} y=%{y:.1f} m, error %{marker.color:.1f} m"
    else:
        _, codes = np.unique(walk, return_inverse=True)
        marker = dict(size=5, color=codes % 10, colorscale="Plotly3", showscale=False)
        hover = "walk %{customdata[0]} t=%{customdata[1]:.2f} s<br>x=%{x:.1f} y=%{y:.1f} m"
    fig.add_trace(go.Scattergl(x=x, y=y, mode="markers", name="positions", marker=marker,
                               customdata=np.stack([walk, t], 1), hovertemplate=hover + "<extra></extra>"))
    if highlight is not None and (walk == highlight).any():
        sel = np.flatnonzero(np.asarray(positions["walk_id"]).astype(str) == highlight)
        cols = {k: np.asarray(positions[k], float)[sel] for k in ("x_m", "y_m", "sigma_major_m", "sigma_minor_m",
                                                                   "sigma_angle_deg")}
        ex, ey = [], []
        for i in range(len(sel)):
            if not (np.isfinite(cols["sigma_major_m"][i]) and np.isfinite(cols["sigma_minor_m"][i])):
                continue
            cov = ellipse_covariance(cols["sigma_major_m"][i], cols["sigma_minor_m"][i], cols["sigma_angle_deg"][i])
            pts = ellipse_points((cols["x_m"][i], cols["y_m"][i]), cov, 1.0, 32)
            ex += [*pts[:, 0], None]
            ey += [*pts[:, 1], None]
        fig.add_trace(go.Scatter(x=ex, y=ey, mode="lines", name=f"1σ ellipses (walk {highlight})",
                                 line=dict(color="#1f77b4", width=1.5), hoverinfo="skip"))
        if "true_x_m" in positions:
            fig.add_trace(go.Scatter(x=np.asarray(positions["true_x_m"], float)[sel],
                                     y=np.asarray(positions["true_y_m"], float)[sel], mode="lines+markers",
                                     name=f"truth (walk {highlight})", line=dict(color="#2ca02c", width=2),
                                     marker=dict(size=5, symbol="star")))
    return fig
