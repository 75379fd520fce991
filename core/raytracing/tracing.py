"""Shared Sionna RT plumbing: radio settings, scene set-up and fast batched path tracing.

Everything that touches Mitsuba/Dr.Jit lives here so the rest of ``core`` stays numpy.

Propagation (:class:`PropagationSettings`): the one definition of what PathSolver
traces (depth, rays, interaction types, seed, receivers per call) and of the radio
(:class:`RadioConfig`), shared by the radio map and the measurement dataset.

Radio settings (:class:`RadioConfig`, documented in ``docs/maps.md``): carrier
3.5 GHz, 20 MHz NR carrier (30 kHz SCS, 51 PRBs), 43 dBm per site, UE noise figure
7 dB at 290 K, UE antenna isotropic at 1.5 m, site antenna :data:`SITE_PATTERN`.

Site antenna ``tr38901_omni``: the TR 38.901 (Table 7.3-1) element pattern's vertical
cut, omnidirectional in azimuth (unsectorised sites)::

    A(theta) = -min(12 ((theta - 90 deg - tilt) / 65 deg)^2, 30)   [dB]

scaled so that its gain integrates to 1 over the sphere, with a conical electrical
down-tilt of ``downtilt_deg`` (6 degrees) built into the pattern (rotating an omni
pattern would tilt it up on one side).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np

from core.raytracing.sionna_rt import import_sionna_rt  # noqa: F401  (re-exported)

SPEED_OF_LIGHT = 299_792_458.0  # m/s
BOLTZMANN = 1.380649e-23  # J/K
SITE_PATTERN = "tr38901_omni"

def _omni_tr38901_gain_db(tilt: float) -> float:
    """Gain [dB] that makes the omni TR 38.901 vertical cut integrate to 1 over the sphere."""
    theta = np.linspace(0.0, np.pi, 20001)
    a_db = -np.minimum(12.0 * ((theta - np.pi / 2 - tilt) / np.deg2rad(65.0)) ** 2, 30.0)
    integral = np.trapezoid(10 ** (a_db / 10) * np.sin(theta), theta) * 2 * np.pi
    return float(-10 * np.log10(integral / (4 * np.pi)))


def site_pattern_name(downtilt_deg: float) -> str:
    """Register (once) and name the omni TR 38.901 pattern with this down-tilt."""
    import drjit as dr
    import mitsuba as mi
    from sionna.rt.antenna_pattern import PolarizedAntennaPattern, antenna_pattern_registry, register_antenna_pattern

    name = f"{SITE_PATTERN}_tilt{downtilt_deg:g}"
    try:
        antenna_pattern_registry.get(name)
        return name
    except Exception:
        pass
    tilt = math.radians(downtilt_deg)
    g_max = _omni_tr38901_gain_db(tilt)
    theta_3db = math.radians(65.0)

    def v_pattern(theta, phi):
        a_db = -dr.minimum(12.0 * ((theta - dr.pi / 2.0 - tilt) / theta_3db) ** 2, 30.0) + g_max
        return mi.Complex2f(dr.sqrt(dr.power(10.0, a_db / 10.0)), 0)

    def factory(*, polarization="V", polarization_model="tr38901_2"):
        return PolarizedAntennaPattern(v_pattern=v_pattern, polarization=polarization,
                                       polarization_model=polarization_model)

    register_antenna_pattern(name, factory)
    return name


@dataclass(frozen=True)
class RadioConfig:
    """Radio settings shared by map generation and the measurement dataset.

    Attributes:
        frequency_hz: carrier frequency [Hz].
        bandwidth_hz: channel bandwidth [Hz] (thermal noise and throughput).
        tx_power_dbm: transmit power of each site [dBm].
        noise_figure_db: UE noise figure [dB].
        temperature_k: noise temperature [K].
        rx_height_m: UE antenna height above the ground [m].
        downtilt_deg: electrical down-tilt of the site antennas [deg].
    """

    frequency_hz: float = 3.5e9
    bandwidth_hz: float = 20e6
    tx_power_dbm: float = 43.0
    noise_figure_db: float = 7.0
    temperature_k: float = 290.0
    rx_height_m: float = 1.5
    downtilt_deg: float = 6.0

    @property
    def noise_dbm(self) -> float:
        """Thermal noise power ``10 log10(k T B) + 30 + NF`` [dBm]."""
        return 10 * math.log10(BOLTZMANN * self.temperature_k * self.bandwidth_hz) + 30.0 + self.noise_figure_db

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(noise_dbm=self.noise_dbm, site_antenna=SITE_PATTERN, ue_antenna="iso",
                 polarization="V")
        return d


def build_scene(info, sites: list[dict[str, Any]], radio: RadioConfig):
    """Load ``info``'s scene and add one transmitter per site (name, position)."""
    import mitsuba as mi

    from core.raytracing.scenes import load_scene

    rt = import_sionna_rt()
    scene = load_scene(info)
    scene.frequency = radio.frequency_hz
    scene.bandwidth = radio.bandwidth_hz
    scene.temperature = radio.temperature_k
    pattern = site_pattern_name(radio.downtilt_deg)
    scene.tx_array = rt.PlanarArray(num_rows=1, num_cols=1, pattern=pattern, polarization="V")
    scene.rx_array = rt.PlanarArray(num_rows=1, num_cols=1, pattern="iso", polarization="V")
    for site in sites:
        x, y, z = (float(v) for v in site["position"])
        scene.add(rt.Transmitter(site["name"], position=mi.Point3f(x, y, z),
                                 orientation=mi.Point3f(0.0, 0.0, 0.0), power_dbm=radio.tx_power_dbm))
    return scene


def indoor_mask(scene, xyz: np.ndarray) -> np.ndarray:
    """bool ``[N]``: points ``xyz [N, 3]`` under a roof (an upward ray hits geometry).

    True inside buildings and under overhangs; these points get no coverage.
    """
    import drjit as dr
    import mitsuba as mi

    xyz = np.asarray(xyz, dtype=np.float32)
    o = mi.Point3f(mi.Float(xyz[:, 0]), mi.Float(xyz[:, 1]), mi.Float(xyz[:, 2]))
    d = mi.Vector3f(0.0, 0.0, 1.0)
    ray = mi.Ray3f(o, dr.zeros(mi.Vector3f, len(xyz)) + d)
    hit = scene.mi_scene.ray_test(ray)
    return np.asarray(hit, dtype=bool)


def _set_targets(scene, xyz: np.ndarray) -> None:
    """Make the scene's receivers sit at ``xyz [N, 3]``, fast.

    Sionna's ``Scene.targets`` gathers receiver positions with one Dr.Jit scatter per
    receiver, which makes the traced kernel grow with the receiver count (minutes
    for 10k receivers). We keep ``N`` placeholder receivers (``Paths`` counts them)
    and give the solver the positions as one array instead. Valid because every
    receiver here has one isotropic antenna at its centre, no rotation, no velocity.
    """
    import drjit as dr
    import mitsuba as mi

    rt = import_sionna_rt()
    n = len(xyz)
    current = list(scene.receivers)
    for name in current[n:]:
        scene.remove(name)
    for k in range(len(current), n):
        scene.add(rt.Receiver(f"ue{k}", position=mi.Point3f(0.0, 0.0, 0.0)))
    pos = mi.Point3f(mi.Float(xyz[:, 0]), mi.Float(xyz[:, 1]), mi.Float(xyz[:, 2]))

    def targets(synthetic_array: bool, return_velocities: bool):
        zeros = dr.zeros(mi.Point3f, n)
        return pos, zeros, dr.zeros(mi.Point3f, n), dr.zeros(mi.Vector3f, n) if return_velocities else None

    scene.targets = targets  # instance attribute shadows the method


@dataclass(frozen=True)
class PropagationSettings:
    """The propagation physics, in ONE place for the radio map and the measurement dataset.

    Map generation traces its grid with these settings and records them in
    ``attrs["propagation"]`` (:meth:`to_dict`); ``make-dataset`` reads them back from
    the map (:meth:`from_dict`) and traces the UEs with exactly the same ones, so a
    report and the map at its position are two evaluations of one function.

    Attributes:
        max_depth: PathSolver's maximum number of interactions per path.
        samples_per_src: rays shot per site (Fibonacci lattice) to find candidate paths.
        los, specular_reflection, diffuse_reflection, refraction, diffraction,
        edge_diffraction, diffraction_lit_region: interaction types (PathSolver flags).
            Diffraction (first order, on wedges and on free edges) is on: without it a
            street corner's shadow gets no path at all (etoile: 74 % of the outdoor
            cells covered at depth 2 without, 92 % with it).
        seed: PathSolver seed.
        retry_samples_per_src: rays per site of a second PathSolver pass over the points
            the first pass found NO path to from any site (0 = no second pass). Sionna
            finds diffracted paths from rays that happen to hit near a wedge, so at 10,000
            rays per site (one ray every ~18 m at 512 m) a courtyard reached only over a
            roof edge is missed; 100,000 rays find a path to about half of those points.
            Only the uncovered points pay (about 5 % of etoile's), and the rule depends on
            the point alone, so map and dataset stay two evaluations of one function.
        receivers_per_call: receivers traced per PathSolver call.
        max_num_paths_per_src: PathSolver's candidate budget per site and call.
        radio: carrier, power, noise and antennas (site antenna pattern and tilt).

    ``receivers_per_call`` and ``max_num_paths_per_src`` change which paths are found,
    so they are physics here, not tuning: Sionna's candidate generator stores at most
    ``max_num_paths_per_src`` (chain, receiver) candidates per site and call, and
    de-duplicates them in a hash table of ``max(max_num_paths_per_src, 1e6)`` slots, so
    too many receivers per call silently drop paths (16384 receivers per call with the
    default 1e6 lost 35 % of etoile's paths; 1024 with 2e6 loses under 1 %).
    """

    max_depth: int = 2
    samples_per_src: int = 10_000
    los: bool = True
    specular_reflection: bool = True
    diffuse_reflection: bool = False
    refraction: bool = False
    diffraction: bool = True
    edge_diffraction: bool = True
    diffraction_lit_region: bool = True
    seed: int = 42
    retry_samples_per_src: int = 100_000
    receivers_per_call: int = 1_024
    max_num_paths_per_src: int = 2_000_000
    radio: RadioConfig = field(default_factory=RadioConfig)

    def validate(self) -> None:
        """Raise :class:`~core.errors.CoreError` on a value PathSolver would refuse."""
        from core.errors import CoreError

        checks = {"max_depth": self.max_depth >= 0, "samples_per_src": 1 <= self.samples_per_src <= MAX_SAMPLES_PER_SRC,
                  "retry_samples_per_src": 0 <= self.retry_samples_per_src <= MAX_SAMPLES_PER_SRC,
                  "seed": self.seed >= 0, "receivers_per_call": self.receivers_per_call >= 1,
                  "max_num_paths_per_src": self.max_num_paths_per_src >= 1}
        for name, ok in checks.items():
            if not ok:
                raise CoreError(f"propagation setting {name}={getattr(self, name)} is out of range"
                                + (f" (at most {MAX_SAMPLES_PER_SRC} rays per site)" if "samples" in name else ""))

    def solver_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``sionna.rt.PathSolver.__call__``."""
        keys = ("max_depth", "samples_per_src", "max_num_paths_per_src", "los", "specular_reflection",
                "diffuse_reflection", "refraction", "diffraction", "edge_diffraction", "diffraction_lit_region",
                "seed")
        return {k: getattr(self, k) for k in keys} | {"synthetic_array": True}

    def to_dict(self) -> dict[str, Any]:
        """JSON form (``radio`` as :meth:`RadioConfig.to_dict`), inverted by :meth:`from_dict`."""
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "radio"}
        return d | {"radio": self.radio.to_dict(), "solver": "sionna.rt.PathSolver"}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PropagationSettings:
        """Settings from :meth:`to_dict`'s output; derived keys (noise_dbm, ...) are ignored.

        A record without ``retry_samples_per_src`` (a map made before the second pass) had
        none: it reads as 0, so a dataset made from such a map traces as its map did.
        """
        radio_keys = {f.name for f in fields(RadioConfig)}
        radio = RadioConfig(**{k: v for k, v in (d.get("radio") or {}).items() if k in radio_keys})
        own = {f.name for f in fields(cls)} - {"radio"}
        return cls(**({"retry_samples_per_src": 0} | {k: v for k, v in d.items() if k in own}), radio=radio)


MAX_SAMPLES_PER_SRC = 200_000  # PathSolver tests every ray against every receiver: cost ~ rays x receivers


def trace_points(scene, xyz: np.ndarray, settings: PropagationSettings | None = None,
                 progress=None, paths: int = 1) -> dict[str, np.ndarray]:
    """Ray-trace paths from every site to points ``xyz [N, 3]`` with ``PathSolver``.

    Returns float32/bool arrays, ``S`` = number of sites (transmitters)::

        path_gain  [N, S]     10 log10(sum_paths |a|^2)                            [dB], -inf if no path
        toa        [N, S]     delay tau of the strongest path (max |a|^2)          [ns], NaN if no path
        aoa        [N, S]     azimuth of arrival phi_r of that path, wrapped       [deg], NaN if no path
        los        [N, S]     a line-of-sight path exists
        image      [N, S, 3]  the strongest path's anchor q                        [m], NaN if no path
        offset     [N, S]     its length before the anchor L0                      [m], NaN if no path

    The strongest path, unfolded, is a straight line of length ``L0 + |q - p|`` from its
    anchor ``q`` to the point ``p``, arriving from ``u = (sin theta_r cos phi_r,
    sin theta_r sin phi_r, cos theta_r)``:
    ``q = p + (c tau - L0) u`` (see :func:`path_anchor`). For a path of specular
    reflections ``L0 = 0`` and ``q`` is the virtual source (the site mirrored in the
    reflecting planes; the site itself for the direct path). For a diffracted path ``q``
    is the diffraction point (mirrored in the planes that reflect the path after it) and
    ``L0`` the length from the site to it. At a nearby point ``p'`` the same path has
    delay ``(L0 + |q - p'|) / c`` and azimuth ``azimuth(q - p')``: exactly for specular
    paths, and to second order in the displacement for diffracted ones (the diffraction
    point moves along its edge, but the path length is stationary there: Keller's law).
    With ``paths = k > 1`` it also returns the NEXT ``k - 1`` paths by power (ranks
    ``j = 1 .. k-1``, strongest first; NaN where the site has fewer paths), for the k-path
    layers of :mod:`core.raytracing.generation`::

        alt_power  [N, S, k-1]     10 log10 |a_j|^2 of path j                      [dB]
        alt_toa    [N, S, k-1]     its delay                                       [ns]
        alt_aoa    [N, S, k-1]     its azimuth of arrival                          [deg]
        alt_image  [N, S, k-1, 3]  its anchor q_j, alt_offset [N, S, k-1] its L0    [m]
        power      [N, S]          10 log10 |a_0|^2 of the strongest path          [dB]

    The arrays of ``paths = 1`` are computed exactly as before (the same argmax).
    Points go ``settings.receivers_per_call`` at a time, a shorter last call padded to the
    next power of two (at least 64: few distinct sizes, so Dr.Jit reuses its kernels, and
    a call costs about rays x receivers, so 100 points do not pay for 1024);
    ``progress(done, total)`` after each call.
    Points with no path to any site are traced again with
    ``settings.retry_samples_per_src`` rays per site (when > 0), and take that result.
    """
    settings = settings or PropagationSettings()
    xyz = np.asarray(xyz, dtype=np.float32)
    if int(paths) < 1:
        raise ValueError(f"trace_points: paths must be >= 1, got {paths}")
    out = _trace_once(scene, xyz, settings, settings.samples_per_src, progress, int(paths))
    if settings.retry_samples_per_src > 0:
        missed = np.flatnonzero(~np.isfinite(out["path_gain"]).any(axis=1))
        if len(missed):
            again = _trace_once(scene, xyz[missed], settings, settings.retry_samples_per_src,
                                None if progress is None else lambda done, total: progress(len(xyz) + done,
                                                                                           len(xyz) + total),
                                int(paths))
            for key, arr in again.items():
                out[key][missed] = arr
    return out


def _trace_once(scene, xyz: np.ndarray, settings: PropagationSettings, samples_per_src: int,
                progress=None, paths: int = 1) -> dict[str, np.ndarray]:
    """One PathSolver pass of :func:`trace_points` with ``samples_per_src`` rays per site."""
    rt = import_sionna_rt()
    n, n_tx = len(xyz), len(scene.transmitters)
    out = {"path_gain": np.full((n, n_tx), -np.inf, np.float32), "toa": np.full((n, n_tx), np.nan, np.float32),
           "aoa": np.full((n, n_tx), np.nan, np.float32), "los": np.zeros((n, n_tx), bool),
           "image": np.full((n, n_tx, 3), np.nan, np.float32), "offset": np.full((n, n_tx), np.nan, np.float32)}
    if paths > 1:
        j = paths - 1
        out |= {"power": np.full((n, n_tx), np.nan, np.float32),
                "alt_power": np.full((n, n_tx, j), np.nan, np.float32),
                "alt_toa": np.full((n, n_tx, j), np.nan, np.float32),
                "alt_aoa": np.full((n, n_tx, j), np.nan, np.float32),
                "alt_image": np.full((n, n_tx, j, 3), np.nan, np.float32),
                "alt_offset": np.full((n, n_tx, j), np.nan, np.float32)}
    solver = rt.PathSolver()
    bs = max(1, min(settings.receivers_per_call, n))
    for start in range(0, n, bs):
        chunk = xyz[start:start + bs]
        m = len(chunk)
        size = min(bs, 1 << max(6, (m - 1).bit_length()))  # a short last call: the next power of two
        if m < size:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], size - m, axis=0)])
        _set_targets(scene, chunk)
        result = solver(scene, **(settings.solver_kwargs() | {"samples_per_src": samples_per_src}))
        for key, arr in _strongest_paths(result, chunk, rt, paths).items():
            out[key][start:start + m] = arr[:m]
        if progress is not None:
            progress(min(start + bs, n), n)
    return out


def _strongest_paths(paths, xyz: np.ndarray, rt, k: int = 1) -> dict[str, np.ndarray]:
    """Per (receiver, site) summary of one PathSolver result (see :func:`trace_points`; ``k`` its ``paths``)."""
    a_re, a_im = paths.a
    valid = _rx_tx_paths(np.asarray(paths.valid))
    power = np.where(valid, _rx_tx_paths(np.asarray(a_re) ** 2 + np.asarray(a_im) ** 2), 0.0)  # [rx, tx, P]
    rx, tx = power.shape[:2]
    if power.shape[-1] == 0:
        return {"path_gain": np.full((rx, tx), -np.inf), "toa": np.full((rx, tx), np.nan),
                "aoa": np.full((rx, tx), np.nan), "los": np.zeros((rx, tx), bool),
                "image": np.full((rx, tx, 3), np.nan), "offset": np.full((rx, tx), np.nan)}  # alt_*: stay NaN
    best = power.argmax(axis=-1)[..., None]

    def strongest(arr):
        return np.take_along_axis(_rx_tx_paths(np.asarray(arr)), best, -1)[..., 0].astype(np.float64)

    tau, phi, theta = strongest(paths.tau), strongest(paths.phi_r), strongest(paths.theta_r)
    inter = np.asarray(paths.interactions)  # [depth, rx, (rx_ant,) tx, (tx_ant,) P]
    if inter.ndim > 1:
        types = np.stack([strongest(t) for t in inter]).astype(np.uint32)  # [depth, rx, tx]
        verts = np.asarray(paths.vertices)  # [depth, rx, (rx_ant,) tx, (tx_ant,) P, 3]
        vertices = np.stack([np.stack([strongest(v[..., c]) for c in range(3)], -1) for v in verts])
        first = _rx_tx_paths(inter[0])
    else:
        types, vertices = np.zeros((0, rx, tx), np.uint32), np.zeros((0, rx, tx, 3))
        first = np.zeros_like(valid, dtype=np.uint32)
    total = power.sum(axis=-1)
    has = total > 0
    unit = np.stack([np.sin(theta) * np.cos(phi), np.sin(theta) * np.sin(phi), np.cos(theta)], -1)
    image, offset = path_anchor(xyz.astype(np.float64), SPEED_OF_LIGHT * tau, unit, types, vertices,
                                int(rt.InteractionType.DIFFRACTION))
    with np.errstate(divide="ignore"):
        pg = np.where(has, 10 * np.log10(np.where(has, total, 1.0)), -np.inf)
    out = {"path_gain": pg, "toa": np.where(has, tau * 1e9, np.nan),
           "aoa": np.where(has, _wrap(np.degrees(phi)), np.nan),
           "los": (valid & (first == rt.InteractionType.NONE)).any(axis=-1),
           "image": np.where(has[..., None], image, np.nan), "offset": np.where(has, offset, np.nan)}
    if k > 1:
        out |= _next_paths(paths, xyz, rt, power, k)
    return out


def _next_paths(paths, xyz: np.ndarray, rt, power: np.ndarray, k: int) -> dict[str, np.ndarray]:
    """The strongest path's own power and paths ``1 .. k-1`` by power (the ``alt_*`` keys of
    :func:`trace_points`), from one PathSolver result; ``power [rx, tx, P]`` is ``|a|^2`` (0: invalid)."""
    order = np.argsort(-power, axis=-1, kind="stable")  # rank 0 = argmax (ties: the first, like argmax)
    inter = np.asarray(paths.interactions)
    verts = np.asarray(paths.vertices) if inter.ndim > 1 else None
    rx, tx = power.shape[:2]

    def ranked(arr, j):
        return np.take_along_axis(_rx_tx_paths(np.asarray(arr)), order[..., j:j + 1], -1)[..., 0].astype(np.float64)

    with np.errstate(divide="ignore"):
        p0 = ranked(power, 0)
        out = {"power": np.where(p0 > 0, 10 * np.log10(np.where(p0 > 0, p0, 1.0)), np.nan)}
    cols: dict[str, list] = {key: [] for key in ("alt_power", "alt_toa", "alt_aoa", "alt_image", "alt_offset")}
    for j in range(1, k):
        if j >= power.shape[-1]:
            pj = np.zeros((rx, tx))
            tau = phi = theta = np.zeros((rx, tx))
        else:
            pj = ranked(power, j)
            tau, phi, theta = ranked(paths.tau, j), ranked(paths.phi_r, j), ranked(paths.theta_r, j)
        has = pj > 0
        if verts is not None and j < power.shape[-1]:
            types = np.stack([ranked(t, j) for t in inter]).astype(np.uint32)
            vertices = np.stack([np.stack([ranked(v[..., c], j) for c in range(3)], -1) for v in verts])
        else:
            types, vertices = np.zeros((0, rx, tx), np.uint32), np.zeros((0, rx, tx, 3))
        unit = np.stack([np.sin(theta) * np.cos(phi), np.sin(theta) * np.sin(phi), np.cos(theta)], -1)
        image, offset = path_anchor(xyz.astype(np.float64), SPEED_OF_LIGHT * tau, unit, types, vertices,
                                    int(rt.InteractionType.DIFFRACTION))
        with np.errstate(divide="ignore"):
            cols["alt_power"].append(np.where(has, 10 * np.log10(np.where(has, pj, 1.0)), np.nan))
        cols["alt_toa"].append(np.where(has, tau * 1e9, np.nan))
        cols["alt_aoa"].append(np.where(has, _wrap(np.degrees(phi)), np.nan))
        cols["alt_image"].append(np.where(has[..., None], image, np.nan))
        cols["alt_offset"].append(np.where(has, offset, np.nan))
    return out | {key: np.stack(v, axis=2) for key, v in cols.items()}


def path_anchor(xyz: np.ndarray, length: np.ndarray, unit: np.ndarray, types: np.ndarray, vertices: np.ndarray,
                diffraction_type: int) -> tuple[np.ndarray, np.ndarray]:
    """Anchor ``q [R, S, 3]`` and length before it ``L0 [R, S]`` [m] of one path per (receiver, site).

    Args:
        xyz: receivers ``p [R, 3]``.
        length: unfolded path length ``c tau`` ``[R, S]`` [m].
        unit: arrival direction ``u [R, S, 3]`` (from ``p`` towards the last interaction).
        types: interaction types ``[D, R, S]`` (0 = none; the path's ``n`` interactions first).
        vertices: interaction points ``v_0 .. v_{n-1}`` ``[D, R, S, 3]``.
        diffraction_type: the type value of a diffraction.

    With ``k`` the last diffraction (if any), the length after it is
    ``L_k = sum_{j=k}^{n-2} |v_{j+1} - v_j| + |p - v_{n-1}|``; then ``L0 = c tau - L_k``
    and ``q = p + L_k u``. Without a diffraction ``L0 = 0`` and ``q = p + c tau u``.
    """
    n_depth = types.shape[0]
    if n_depth == 0:
        return xyz[:, None, :] + length[..., None] * unit, np.zeros_like(length)
    present = types != 0
    n_int = present.sum(0)  # [R, S]
    p = np.broadcast_to(xyz[:, None, :], vertices.shape[1:])
    # to_rx[j]: distance along the path from vertex j to the receiver
    nxt = np.concatenate([vertices[1:], p[None]], 0)  # vertex j+1 (or p past the last slot)
    is_last = np.arange(n_depth)[:, None, None] == (n_int - 1)[None]
    nxt = np.where(is_last[..., None], p[None], nxt)
    seg = np.where(present, np.linalg.norm(nxt - vertices, axis=-1), 0.0)
    to_rx = np.cumsum(seg[::-1], axis=0)[::-1]
    diff = present & ((types & diffraction_type) != 0)
    k = np.where(diff.any(0), n_depth - 1 - np.argmax(diff[::-1], axis=0), -1)
    after = np.where(k >= 0, np.take_along_axis(to_rx, np.maximum(k, 0)[None], 0)[0], length)
    return xyz[:, None, :] + after[..., None] * unit, length - after


def _rx_tx_paths(arr: np.ndarray) -> np.ndarray:
    """``[rx, rx_ant=1, tx, tx_ant=1, P]`` or ``[rx, tx, P]`` -> ``[rx, tx, P]``."""
    return arr[:, 0, :, 0, :] if arr.ndim == 5 else arr


def _wrap(deg: np.ndarray) -> np.ndarray:
    from core.features import wrap_degrees

    return wrap_degrees(deg)


def segments_clear(scene, a: np.ndarray, b: np.ndarray, stop_short_m: float = 0.0,
                   min_length_m: float = 0.0) -> np.ndarray:
    """bool ``[N]``: no geometry on the segments from ``a [N, 3]`` towards ``b [N, 3]`` (one Mitsuba ray test each).

    The ray runs ``max(|b - a| - stop_short_m, min_length_m)`` metres from ``a``.
    """
    import mitsuba as mi

    a = np.asarray(a, dtype=np.float64)
    d = np.asarray(b, dtype=np.float64) - a
    length = np.linalg.norm(d, axis=1)
    d = (d / np.maximum(length, 1e-9)[:, None]).astype(np.float32)
    o = a.astype(np.float32)
    ray = mi.Ray3f(mi.Point3f(mi.Float(o[:, 0]), mi.Float(o[:, 1]), mi.Float(o[:, 2])),
                   mi.Vector3f(mi.Float(d[:, 0]), mi.Float(d[:, 1]), mi.Float(d[:, 2])))
    ray.maxt = mi.Float(np.maximum(length - stop_short_m, min_length_m).astype(np.float32))
    return ~np.asarray(scene.mi_scene.ray_test(ray), dtype=bool)


def line_of_sight(scene, xyz: np.ndarray, target: np.ndarray) -> np.ndarray:
    """bool ``[N]``: nothing blocks the segment from points ``xyz [N, 3]`` to ``target [3]``
    (the ray stops 1 cm short of the target, which may sit on a surface)."""
    xyz = np.asarray(xyz, dtype=np.float64)
    return segments_clear(scene, xyz, np.broadcast_to(np.asarray(target, dtype=np.float64), xyz.shape),
                          stop_short_m=1e-2)
