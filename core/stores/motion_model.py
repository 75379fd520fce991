"""The device-motion channel of a dataset: what a phone's own sensors say about its displacement.

Phones know their own motion: pedestrian dead reckoning (PDR) counts steps and reads the heading
from the inertial sensors and the magnetometer. ``make-dataset --motion-step-sigma S
--motion-heading-deg H`` records, per report, the displacement the device measured since its
previous report::

    d_t      = p_t − p_{t−1}                                   true displacement [m], t = 1 .. T−1
    d̂_t      = (1 + ε_t) · R(δ_t) · d_t                        measured displacement [m]
    ε_t ~ N(0, S²)   relative step-length error   (--motion-step-sigma, 1)
    δ_t ~ N(0, H²)   heading error                (--motion-heading-deg, deg; R(δ) rotates by δ)
    d̂_0      = NaN                                             (no previous report)

Errors are independent per report (the step detector and the heading are re-read every report);
a report whose radio measurement is missing still has its motion (the sensors do not depend on the
radio). The channel is drawn from its own random stream (``[seed, MOTION_STREAM]``), so turning it on
leaves every radio measurement of the same ``--seed`` bit-identical: a paired comparison.

Typical PDR quality: step length within about 5–10 % and heading within about 10° over short
walks (consumer phones, after calibration; worse with magnetic disturbance). Defaults are 0 = off:
no channel, no array.

Stored in ``attrs["measurement_model"]["motion"]`` (left out when off) and as the dataset array
``motion float32 [N, T, 2]`` (:mod:`core.stores.dataset`). The whole-walk estimator
(:mod:`core.physics.trajectory`) turns it into a velocity measurement per walk,
:func:`velocity_measurement`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from core.errors import CoreError

#: the second word of the motion channel's random stream, ``np.random.default_rng([seed, MOTION_STREAM])``
MOTION_STREAM = 0x6D6F74
#: the velocity measurement's floor [m/s] (a perfect channel still has quantized steps)
VELOCITY_SIGMA_FLOOR = 0.02

FLAGS = {"step_sigma": "--motion-step-sigma", "heading_deg": "--motion-heading-deg"}


@dataclass(frozen=True)
class MotionModel:
    """The device-motion channel's noise: relative step-length σ [1] and heading σ [deg]; both 0 = off."""

    step_sigma: float = 0.0
    heading_deg: float = 0.0

    @property
    def enabled(self) -> bool:
        return bool(self.step_sigma or self.heading_deg)

    def check(self) -> None:
        for name, flag in FLAGS.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
                raise CoreError(f"{flag} must be a finite number >= 0, got {value!r}")
        if self.step_sigma >= 1.0:
            raise CoreError(f"--motion-step-sigma must be below 1 (a relative error), got {self.step_sigma!r}")

    @classmethod
    def from_flags(cls, step_sigma, heading_deg) -> MotionModel:
        values = {}
        for name, raw in (("step_sigma", step_sigma), ("heading_deg", heading_deg)):
            if raw is None:
                continue
            try:
                values[name] = float(raw)
            except (TypeError, ValueError):
                raise CoreError(f"{FLAGS[name]} must be a number, got {raw!r}") from None
        model = cls(**values)
        model.check()
        return model

    def cli_args(self) -> list[str]:
        return [] if not self.enabled else [FLAGS["step_sigma"], f"{self.step_sigma:.12g}",
                                            FLAGS["heading_deg"], f"{self.heading_deg:.12g}"]

    def to_attrs(self) -> dict[str, float]:
        return asdict(self)

    @classmethod
    def from_attrs(cls, record: Mapping[str, Any] | None) -> MotionModel:
        if record is None:
            return cls()
        if not isinstance(record, Mapping) or set(record) - set(FLAGS):
            raise CoreError(f"motion record must be a mapping with keys {sorted(FLAGS)}, got {record!r}")
        model = cls(**record)
        model.check()
        return model

    def summary(self) -> str:
        return (f"device motion: step σ {100 * self.step_sigma:g} %, heading σ {self.heading_deg:g} deg"
                if self.enabled else "no device motion")

    def measure(self, xyz: np.ndarray, seed: int) -> np.ndarray:
        """float32 ``[N, T, 2]``: the measured displacement [m] since the previous report (module doc);
        row 0 NaN. ``xyz [N, T, 3]``: the true positions [m]."""
        rng = np.random.default_rng([int(seed), MOTION_STREAM])
        d = np.diff(np.asarray(xyz, dtype=np.float64)[..., :2], axis=1)  # [N, T-1, 2]
        eps = rng.normal(0.0, self.step_sigma, d.shape[:2]) if self.step_sigma else np.zeros(d.shape[:2])
        delta = np.deg2rad(rng.normal(0.0, self.heading_deg, d.shape[:2])) if self.heading_deg else np.zeros(d.shape[:2])
        c, s = np.cos(delta), np.sin(delta)
        rotated = np.stack([c * d[..., 0] - s * d[..., 1], s * d[..., 0] + c * d[..., 1]], -1)
        out = np.full(xyz.shape[:2] + (2,), np.nan, dtype=np.float32)
        out[:, 1:] = (1.0 + eps)[..., None] * rotated
        return out


def velocity_measurement(motion: np.ndarray, t: np.ndarray, model: MotionModel) -> tuple[np.ndarray, np.ndarray]:
    """``(v [N, 2] m/s, sigma [N] m/s)``: a walk's velocity from its measured displacements.

    For the straight, constant-velocity walks of ``make-dataset``, ``v = Σ_t d̂_t / (t_{T−1} − t_0)``.
    Each d̂_t errs by ``|d_t| ε_t`` along the track and ``|d_t| δ_t`` across it (H in rad, small
    angles), independently per report; summed over the ``T − 1`` steps and divided by the span, the
    velocity errs by ``|v| S / sqrt(T − 1)`` along and ``|v| H / sqrt(T − 1)`` across the track. The
    isotropic per-axis σ with the same total variance is ``sigma = |v| · sqrt((S² + H²) / 2) / sqrt(T − 1)``,
    floored at :data:`VELOCITY_SIGMA_FLOOR`. ``motion [N, T, 2]`` (row 0 NaN), ``t [N, T]`` s.
    """
    steps = np.asarray(motion, dtype=np.float64)[:, 1:]
    span = np.asarray(t, dtype=np.float64)[:, -1] - np.asarray(t, dtype=np.float64)[:, 0]
    if steps.shape[1] == 0 or not np.all(span > 0):
        raise CoreError("device motion needs at least two reports per walk, spread in time")
    v = np.nansum(steps, axis=1) / span[:, None]
    rel = math.hypot(model.step_sigma, math.radians(model.heading_deg)) / math.sqrt(2.0)
    sigma = np.maximum(np.linalg.norm(v, axis=1) * rel / math.sqrt(steps.shape[1]), VELOCITY_SIGMA_FLOOR)
    return v.astype(np.float32), sigma.astype(np.float32)
