"""pydeck views of a scene: extruded buildings, sites and the coverage of a radio map.

The views work offline: ``pdk.Deck(map_provider=None)`` requests no basemap, and the
coverage image travels inline as a PNG data URL.

Scene coordinates are local metres. deck.gl's map view wants longitude/latitude, so
metres are placed around (0°, 0°) with the equirectangular approximation::

    lon = x / M_LON,   lat = y / M_LAT,   M_LON = 111 319.49 m/deg,  M_LAT = 110 574.3 m/deg

which at the equator is exact to better than 0.1 % over a few kilometres, so
buildings keep their shape and heights stay in metres.
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pydeck as pdk

from core.features import feature_spec
from core.stores.radio_map import RadioMap

M_LON = 111_319.49  # metres per degree of longitude at the equator
M_LAT = 110_574.3  # metres per degree of latitude near the equator


def to_lonlat(xy: np.ndarray) -> np.ndarray:
    """``[..., 2]`` scene metres -> ``[..., 2]`` (lon, lat) degrees."""
    xy = np.asarray(xy, dtype=np.float64)
    return np.stack([xy[..., 0] / M_LON, xy[..., 1] / M_LAT], axis=-1)


def _viridis(t: np.ndarray) -> np.ndarray:
    """``t`` in [0, 1] -> uint8 RGB ``[..., 3]`` (viridis)."""
    anchors = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], dtype=np.float64)
    pos = np.linspace(0, 1, len(anchors))
    t = np.clip(np.nan_to_num(t, nan=0.0, posinf=1.0, neginf=0.0), 0, 1)  # uncovered cells: alpha 0 anyway
    return np.stack([np.interp(t, pos, anchors[:, c]) for c in range(3)], axis=-1).astype(np.uint8)


def coverage_png(rm: RadioMap, feature: str, max_cells: int = 256, alpha: int = 190) -> tuple[str, float, float]:
    """The feature as a viridis PNG data URL (transparent outside coverage), and the
    value range ``(lo, hi)`` the colours span (2nd-98th percentile)."""
    from PIL import Image

    k = max(1, math.ceil(max(rm.shape) / max_cells))
    values = rm.feature(feature)[::k, ::k].astype(np.float64)
    valid = rm.valid[::k, ::k]
    covered = values[valid]
    lo, hi = (np.percentile(covered, [2, 98]) if covered.size else (0.0, 1.0))
    if hi <= lo:
        hi = lo + 1.0
    rgb = _viridis((values - lo) / (hi - lo))
    rgba = np.concatenate([rgb, np.where(valid, alpha, 0).astype(np.uint8)[..., None]], axis=-1)
    image = Image.fromarray(np.ascontiguousarray(rgba[::-1]), mode="RGBA")  # PNG row 0 is the top (max y)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode(), float(lo), float(hi)


def _buildings(geometry: Any) -> list[dict]:
    if geometry is None:
        return []
    items = geometry.get("buildings", []) if isinstance(geometry, Mapping) else getattr(geometry, "buildings", [])
    out = []
    for b in items:
        get = b.get if isinstance(b, Mapping) else (lambda key, default=None, b=b: getattr(b, key, default))
        fp = np.asarray(get("footprint"), dtype=np.float64)
        if fp.ndim != 2 or fp.shape[0] < 3:
            continue
        height = float(get("height", 0.0) or 0.0)
        base = float(get("base", 0.0) or 0.0)
        out.append({"polygon": to_lonlat(fp[:, :2]).tolist(), "height": round(height, 1), "base": round(base, 1),
                    "top": round(base + height, 1), "name": f"building, {height:.1f} m tall"})
    return out


def _bbox(geometry: Any, rm: RadioMap | None) -> tuple[float, float, float, float]:
    if geometry is not None:
        bbox = geometry.get("bbox") if isinstance(geometry, Mapping) else getattr(geometry, "bbox", None)
        if bbox is not None and len(bbox) == 6:
            return float(bbox[0]), float(bbox[1]), float(bbox[3]), float(bbox[4])
    if rm is not None:
        return rm.bounds
    return -100.0, -100.0, 100.0, 100.0


def scene_deck(geometry: Any = None, radio_map: RadioMap | None = None, feature: str = "path_gain",
               sites: Sequence[Mapping] | None = None, pitch: float = 45.0, bearing: float = 0.0,
               width_px: int = 800) -> pdk.Deck:
    """A 3D deck.gl view: buildings extruded from their footprints (height in m), sites
    as red columns with labels, and ``feature`` of ``radio_map`` as a ground overlay.

    ``pitch=0`` gives a top view. ``sites`` defaults to the map's (the layout it was
    generated with), then the geometry's.
    """
    layers = []
    x_min, y_min, x_max, y_max = _bbox(geometry, radio_map)
    if radio_map is not None:
        url, _, _ = coverage_png(radio_map, feature)
        bx0, by0, bx1, by1 = radio_map.bounds
        (lon0, lat0), (lon1, lat1) = to_lonlat(np.array([[bx0, by0], [bx1, by1]]))
        # pdk.types.String: a bare str would be read as an accessor expression
        layers.append(pdk.Layer("BitmapLayer", id="coverage", image=pdk.types.String(url), bounds=[lon0, lat0, lon1, lat1],
                                opacity=0.9, pickable=False))
    buildings = _buildings(geometry)
    if buildings:
        layers.append(pdk.Layer("PolygonLayer", id="buildings", data=buildings, get_polygon="polygon",
                                extruded=True, get_elevation="top", get_fill_color=[170, 170, 185, 235],
                                get_line_color=[60, 60, 60], wireframe=True, pickable=True, auto_highlight=True))
    if sites is None and radio_map is not None:  # the sites the map was generated with
        sites = radio_map.attrs.get("sites")
    if sites is None and geometry is not None:
        sites = geometry.get("sites") if isinstance(geometry, Mapping) else getattr(geometry, "sites", None)
    if sites:
        rows = []
        for i, s in enumerate(sites):
            pos = [float(v) for v in s["position"]] + [0.0] * (3 - len(s["position"]))
            lon, lat = to_lonlat(np.array(pos[:2]))
            rows.append({"position": [float(lon), float(lat)], "top": [float(lon), float(lat), pos[2] + 4.0],
                         "height": pos[2], "name": f"{s.get('name', f'site {i}')} ({pos[2]:.0f} m)"})
        layers.append(pdk.Layer("ColumnLayer", id="sites", data=rows, get_position="position", get_elevation="height",
                                radius=max(2.0, 0.006 * (x_max - x_min)), elevation_scale=1, extruded=True,
                                get_fill_color=[214, 39, 40, 255], pickable=True))
        layers.append(pdk.Layer("TextLayer", id="site-labels", data=rows, get_position="top", get_text="name",
                                get_size=12, get_color=[120, 0, 0, 255], font_family=pdk.types.String("sans-serif"), get_alignment_baseline="'bottom'",
                                billboard=True))
    (clon, clat) = to_lonlat(np.array([(x_min + x_max) / 2, (y_min + y_max) / 2]))
    extent = max(x_max - x_min, y_max - y_min, 1.0)
    zoom = math.log2(78_271.5 * width_px / extent) - 0.2  # deck.gl: 78 271.5 / 2^z m per pixel (512-px tiles)
    view = pdk.ViewState(longitude=float(clon), latitude=float(clat), zoom=zoom, pitch=pitch, bearing=bearing,
                         min_zoom=zoom - 4, max_zoom=zoom + 6)
    # map_provider=None with the default map_style: Streamlit then draws no basemap at all
    # (an explicit map_style=None would make it fall back to a remote Carto style)
    return pdk.Deck(layers=layers, initial_view_state=view, map_provider=None,
                    tooltip={"text": "{name}"})


def coverage_caption(radio_map: RadioMap, feature: str) -> str:
    """One line explaining the ground overlay's colours."""
    _, lo, hi = coverage_png(radio_map, feature, max_cells=64)
    unit = feature_spec(feature).unit
    return (f"Ground colour: {feature} from {lo:.3g} {unit} (dark purple) to {hi:.3g} {unit} (yellow), "
            "2nd–98th percentile; uncovered cells are transparent. Buildings: grey, extruded to their height; "
            "sites: red columns.")
