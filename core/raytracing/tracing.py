"""Shared Sionna RT plumbing: radio settings, scene set-up and fast batched path tracing.

Everything that touches Mitsuba/Dr.Jit lives here so the rest of ``core`` stays numpy.

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
from dataclasses import asdict, dataclass
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
class TraceSettings:
    """PathSolver settings (recorded in the stores' attrs)."""

    max_depth: int = 2
    samples_per_src: int = 3_000
    batch_size: int = 16_384
    seed: int = 1


def trace_points(scene, xyz: np.ndarray, settings: TraceSettings = TraceSettings(), progress=None) -> dict[str, np.ndarray]:
    """Ray-trace paths from every site to points ``xyz [N, 3]`` with ``PathSolver``.

    Returns float32/bool arrays, ``S`` = number of sites (transmitters)::

        path_gain  [N, S]  10 log10(sum_paths |a|^2)                          [dB], -inf if no path
        toa        [N, S]  delay of the strongest path (max |a|^2)            [ns], NaN if no path
        aoa        [N, S]  azimuth of arrival of the strongest path, wrapped  [deg], NaN if no path
        los        [N, S]  a line-of-sight path exists

    ``progress(done, total)`` is called after each batch.
    """
    rt = import_sionna_rt()
    xyz = np.asarray(xyz, dtype=np.float32)
    n = len(xyz)
    n_tx = len(scene.transmitters)
    out = {
        "path_gain": np.full((n, n_tx), -np.inf, np.float32),
        "toa": np.full((n, n_tx), np.nan, np.float32),
        "aoa": np.full((n, n_tx), np.nan, np.float32),
        "los": np.zeros((n, n_tx), bool),
    }
    solver = rt.PathSolver()
    bs = max(1, min(settings.batch_size, n))
    for start in range(0, n, bs):
        chunk = xyz[start:start + bs]
        m = len(chunk)
        if m < bs and n > bs:  # keep one receiver count so Dr.Jit reuses its kernels
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], bs - m, axis=0)])
        _set_targets(scene, chunk)
        paths = solver(scene, max_depth=settings.max_depth, samples_per_src=settings.samples_per_src,
                       synthetic_array=True, los=True, specular_reflection=True, diffuse_reflection=False,
                       refraction=False, diffraction=False, seed=settings.seed)
        a_re, a_im = paths.a
        power = _rx_tx_paths(np.asarray(a_re) ** 2 + np.asarray(a_im) ** 2)
        valid = _rx_tx_paths(np.asarray(paths.valid))
        power = np.where(valid, power, 0.0)
        tau = _rx_tx_paths(np.asarray(paths.tau))
        phi = _rx_tx_paths(np.asarray(paths.phi_r))
        if power.shape[-1] == 0:
            continue
        inter = np.asarray(paths.interactions)  # [depth, rx, (rx_ant,) tx, (tx_ant,) P]
        first = _rx_tx_paths(inter[0]) if inter.ndim > 1 else np.zeros_like(valid, dtype=np.uint32)
        los = (valid & (first == rt.InteractionType.NONE)).any(axis=-1)
        total = power.sum(axis=-1)
        best = power.argmax(axis=-1)[..., None]
        has = total > 0
        with np.errstate(divide="ignore"):
            pg = np.where(has, 10 * np.log10(np.where(has, total, 1.0)), -np.inf)
        sl = slice(start, start + m)
        out["path_gain"][sl] = pg[:m]
        out["toa"][sl] = np.where(has, np.take_along_axis(tau, best, -1)[..., 0] * 1e9, np.nan)[:m]
        out["aoa"][sl] = np.where(has, _wrap(np.degrees(np.take_along_axis(phi, best, -1)[..., 0])), np.nan)[:m]
        out["los"][sl] = los[:m]
        if progress is not None:
            progress(min(start + bs, n), n)
    return out


def _rx_tx_paths(arr: np.ndarray) -> np.ndarray:
    """``[rx, rx_ant=1, tx, tx_ant=1, P]`` or ``[rx, tx, P]`` -> ``[rx, tx, P]``."""
    return arr[:, 0, :, 0, :] if arr.ndim == 5 else arr


def _wrap(deg: np.ndarray) -> np.ndarray:
    from core.features import wrap_degrees

    return wrap_degrees(deg)


def line_of_sight(scene, xyz: np.ndarray, target: np.ndarray) -> np.ndarray:
    """bool ``[N]``: nothing blocks the segment from points ``xyz [N, 3]`` to ``target [3]``."""
    import mitsuba as mi

    xyz = np.asarray(xyz, dtype=np.float64)
    d = np.asarray(target, dtype=np.float64)[None, :] - xyz
    length = np.linalg.norm(d, axis=1)
    d = (d / np.maximum(length, 1e-9)[:, None]).astype(np.float32)
    o = xyz.astype(np.float32)
    ray = mi.Ray3f(mi.Point3f(mi.Float(o[:, 0]), mi.Float(o[:, 1]), mi.Float(o[:, 2])),
                   mi.Vector3f(mi.Float(d[:, 0]), mi.Float(d[:, 1]), mi.Float(d[:, 2])))
    ray.maxt = mi.Float(np.maximum(length - 1e-2, 0.0).astype(np.float32))
    return ~np.asarray(scene.mi_scene.ray_test(ray), dtype=bool)
