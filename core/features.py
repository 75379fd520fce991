"""The radio-map features: names, units and how each one must be treated.

Code never assumes a number or an order of features: a :class:`~core.radio_map.RadioMap`
carries its own feature list, and everything else looks features up here by name.

===========  ========  ===================================================  ======
name         unit      meaning                                              weight
===========  ========  ===================================================  ======
path_gain    dB        path gain of the serving (strongest) site            1.0
toa          ns        time of arrival of the strongest path                0.5
aoa          deg       azimuth of arrival of the strongest path, (-180,180] 0.3
snr          dB        serving-site received power / thermal noise          0.8
sinr         dB        serving power / (interference + noise)               0.8
throughput   Mbit/s    link-abstraction throughput at that SINR             0.2
bler         1         transport-block error rate at that SINR, [0, 1]      0.2
===========  ========  ===================================================  ======

Values in dB stay in dB everywhere; nothing converts them to linear and back.
Angles are in degrees and wrapped to (-180, 180]; they are averaged and interpolated
on the unit circle, never linearly.
"""

from __future__ import annotations

from dataclasses import dataclass

from core.errors import CoreError

#: THE report window [s]: the present reports within this time of the latest one are pooled per
#: site (:func:`core.physics.observation.site_observation`). One value for training
#: (``physics_loss.report_window_s``, whose default this is), MAP refinement, multilateration and the
#: app; each reads the run's config. Tuned on the etoile val split: 0 s -> 0.6 s -> 1.0 s moved the
#: MAP median 1.30 -> 0.88 -> 0.86 m.
REPORT_WINDOW_S = 1.0


@dataclass(frozen=True)
class FeatureSpec:
    name: str
    unit: str
    description: str
    default_weight: float
    angular: bool = False  # degrees on a circle: wrap residuals, interpolate cos/sin
    bounded: tuple[float, float] | None = None  # physical range, for validation


FEATURES: dict[str, FeatureSpec] = {
    spec.name: spec
    for spec in (
        FeatureSpec("path_gain", "dB", "Path gain of the serving site", 1.0),
        FeatureSpec("toa", "ns", "Time of arrival of the strongest path", 0.5),
        FeatureSpec("aoa", "deg", "Azimuth of arrival of the strongest path", 0.3, angular=True),
        FeatureSpec("snr", "dB", "Serving-site SNR (received power / thermal noise)", 0.8),
        FeatureSpec("sinr", "dB", "Serving-site SINR", 0.8),
        FeatureSpec("throughput", "Mbit/s", "Link-abstraction throughput", 0.2),
        FeatureSpec("bler", "1", "Transport-block error rate", 0.2, bounded=(0.0, 1.0)),
    )
}

#: The order in which map generation writes features. Readers use the stored order.
DEFAULT_FEATURE_ORDER: tuple[str, ...] = tuple(FEATURES)


def feature_spec(name: str) -> FeatureSpec:
    """The spec of feature ``name``; an unknown name is a :class:`CoreError`."""
    try:
        return FEATURES[name]
    except KeyError:
        known = ", ".join(FEATURES)
        raise CoreError(f"unknown feature {name!r} (known features: {known})") from None


def wrap_degrees(angle):
    """Wrap angles in degrees to (-180, 180]. Works on floats, numpy arrays and tensors."""
    wrapped = (angle + 180.0) % 360.0 - 180.0  # in [-180, 180)
    return wrapped + 360.0 * (wrapped == -180.0)
