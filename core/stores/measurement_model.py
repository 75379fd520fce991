"""The measurement model of a dataset: how ray-traced truth becomes a UE's reports.

One record, :class:`MeasurementModel`, holds every knob of ``python -m core make-dataset``
that shapes what a UE reports (the formulas: :mod:`core.raytracing.measurements`)::

    field              flag                    unit   default   meaning
    path_gain_db       --noise-path-gain-db    dB     2.0       sigma of the Gaussian noise on every site's path gain
    toa_ns             --noise-toa-ns          ns     3.0       sigma of the Gaussian noise on every ToA
    aoa_deg            --noise-aoa-deg         deg    3.0       sigma of the Gaussian noise on every AoA (wrapped)
    clock_offset_ns    --clock-offset-ns       ns     0.0       sigma of one offset per UE walk added to all its ToAs
    missing_rate       --missing-rate          1      0.2       probability that a report is missing
    sites_per_report   --sites-per-report      1      4         site slots K per report
    sensitivity_dbm    --sensitivity-dbm       dBm    -100.0    a site is reported when P_tx + G_s >= this; None = off

The default sensitivity, -100 dBm, is the thermal noise of the default radio (kTB over
20 MHz at 290 K + 7 dB noise figure = -93.96 dBm) minus 6 dB: about the lowest SNR at
which a UE still detects a cell's synchronisation signals and measures it (NR's
measurement requirements go down to an SS-SINR of -6 dB).

Stored in a dataset's ``attrs["measurement_model"]`` (:meth:`MeasurementModel.to_attrs`,
with ``version``). A dataset written before the record existed has ``attrs["noise"] =
{path_gain_db, toa_ns, aoa_deg, p_missing}`` only: it reads as those values, no clock
offset, ``generator.sites_per_report`` slots and no sensitivity threshold (every site
PathSolver found a path to was reported), which is what made it.

The record also holds the WORLD the reports were traced in, ``world``
(:class:`~core.stores.world_model.WorldModel`: how the world differs from the radio map,
``--world oracle|realistic`` and its flags); a record without it is of the oracle world.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

from core.errors import CoreError
from core.stores.motion_model import MotionModel
from core.stores.world_model import ORACLE, WorldModel

RECORD_KEY = "measurement_model"
RECORD_VERSION = 1
SENSITIVITY_OFF = "off"


@dataclass(frozen=True)
class Knob:
    """One field's command-line flag (and its metavar), unit and meaning (for help texts, errors and the app)."""

    flag: str
    unit: str
    label: str
    metavar: str


KNOBS: dict[str, Knob] = {
    "path_gain_db": Knob("--noise-path-gain-db", "dB", "path-gain noise σ", "SIGMA"),
    "toa_ns": Knob("--noise-toa-ns", "ns", "ToA noise σ", "SIGMA"),
    "aoa_deg": Knob("--noise-aoa-deg", "deg", "AoA noise σ", "SIGMA"),
    "clock_offset_ns": Knob("--clock-offset-ns", "ns", "per-walk clock offset σ (0 = off)", "SIGMA"),
    "missing_rate": Knob("--missing-rate", "", "missing-report rate", "P"),
    "sites_per_report": Knob("--sites-per-report", "", "site slots per report K", "K"),
    "sensitivity_dbm": Knob("--sensitivity-dbm", "dBm", "sensitivity: reported when P_tx + G_s ≥", "DBM"),
}


@dataclass(frozen=True)
class MeasurementModel:
    """Every knob of the measurement model (see the module docstring for units and flags)."""

    path_gain_db: float = 2.0
    toa_ns: float = 3.0
    aoa_deg: float = 3.0
    clock_offset_ns: float = 0.0
    missing_rate: float = 0.2
    sites_per_report: int = 4
    sensitivity_dbm: float | None = -100.0
    #: how the world the UEs measure in differs from the map (:mod:`core.stores.world_model`; oracle: not at all)
    world: WorldModel = ORACLE
    #: the device's own motion channel (:mod:`core.stores.motion_model`; default off: no channel)
    motion: MotionModel = MotionModel()

    def knobs(self) -> dict[str, Any]:
        """``{field: value}`` of the measurement knobs (every field but ``world`` and ``motion``)."""
        return {name: getattr(self, name) for name in KNOBS}

    def check(self) -> None:
        """Raise :class:`CoreError` naming the flag of the first bad value."""
        if not isinstance(self.world, WorldModel):
            raise CoreError(f"the world must be a WorldModel, got {type(self.world).__name__}")
        self.world.check()
        if not isinstance(self.motion, MotionModel):
            raise CoreError(f"the device motion must be a MotionModel, got {type(self.motion).__name__}")
        self.motion.check()
        for name in ("path_gain_db", "toa_ns", "aoa_deg", "clock_offset_ns"):
            value = getattr(self, name)
            if not _is_number(value) or not math.isfinite(value) or value < 0:
                raise CoreError(f"{KNOBS[name].flag} must be a finite number >= 0 [{KNOBS[name].unit}], got {value!r}")
        if not _is_number(self.missing_rate) or not 0.0 <= self.missing_rate < 1.0:
            raise CoreError(f"{KNOBS['missing_rate'].flag} must be a number in [0, 1), got {self.missing_rate!r}")
        if isinstance(self.sites_per_report, bool) or not isinstance(self.sites_per_report, int) \
                or self.sites_per_report < 1:
            raise CoreError(f"{KNOBS['sites_per_report'].flag} must be an integer >= 1, got {self.sites_per_report!r}")
        s = self.sensitivity_dbm
        if s is not None and (not _is_number(s) or not math.isfinite(s)):
            raise CoreError(f"{KNOBS['sensitivity_dbm'].flag} must be a finite number [dBm] or "
                            f"{SENSITIVITY_OFF!r}, got {s!r}")

    # -- the command line ------------------------------------------------------------------
    @classmethod
    def from_flags(cls, values: Mapping[str, str | int | float | None], world: WorldModel = ORACLE,
                   motion: MotionModel = MotionModel()) -> MeasurementModel:
        """Parse and check the flags' raw values (``{field: text}``; a missing field keeps
        its default) in ``world``. A value that is no number raises :class:`CoreError` naming its flag."""
        parsed: dict[str, Any] = {}
        for name, raw in values.items():
            if raw is None:
                continue
            if name == "sensitivity_dbm" and str(raw).strip().lower() in (SENSITIVITY_OFF, "none"):
                parsed[name] = None
                continue
            try:
                parsed[name] = int(raw) if name == "sites_per_report" else float(raw)
            except (TypeError, ValueError):
                kind = "an integer" if name == "sites_per_report" else "a number"
                raise CoreError(f"{KNOBS[name].flag} must be {kind}, got {raw!r}") from None
        model = cls(**parsed, world=world, motion=motion)
        model.check()
        return model

    def cli_args(self) -> list[str]:
        """The flags that make this model: ``["--noise-path-gain-db", "2", ...]`` (then the world's
        flags, :meth:`WorldModel.cli_args`, unless it is the oracle world)."""
        args: list[str] = []
        for name, value in self.knobs().items():
            text = SENSITIVITY_OFF if value is None else (f"{value:.12g}" if isinstance(value, float) else str(value))
            args += [KNOBS[name].flag, text]
        return args + ([] if self.world.is_oracle else self.world.cli_args()) + self.motion.cli_args()

    # -- the store -------------------------------------------------------------------------
    def to_attrs(self) -> dict[str, Any]:
        """The record written to ``attrs["measurement_model"]`` (JSON: None = no threshold; ``world``:
        :meth:`WorldModel.to_attrs`, left out for the oracle world, so an oracle dataset's record is
        exactly the one written before worlds existed)."""
        record = {"version": RECORD_VERSION, **self.knobs()}
        if not self.world.is_oracle:
            record["world"] = self.world.to_attrs()
        if self.motion.enabled:  # left out when off, like the oracle world: older records read the same
            record["motion"] = self.motion.to_attrs()
        return record

    @classmethod
    def from_attrs(cls, attrs: Mapping[str, Any]) -> MeasurementModel | None:
        """The model a dataset's ``attrs`` record; the old defaults for a store written before
        the record existed; ``None`` when it records none (e.g. an analytic test dataset).
        A record without ``world`` (made before worlds existed) is of the oracle world.
        A malformed record raises :class:`CoreError`."""
        record = attrs.get(RECORD_KEY)
        if record is None:
            return _legacy(attrs)
        if not isinstance(record, Mapping):
            raise CoreError(f"attrs {RECORD_KEY} must be a mapping, got {type(record).__name__}")
        known = {f.name for f in fields(cls)} - {"world", "motion"}
        unknown = sorted(set(record) - known - {"version", "world", "motion"})
        if unknown:
            raise CoreError(f"attrs {RECORD_KEY}: unknown keys {unknown}")
        try:
            model = cls(**{k: v for k, v in record.items() if k in known},
                        world=WorldModel.from_attrs(record.get("world")),
                        motion=MotionModel.from_attrs(record.get("motion")))
            model.check()
        except CoreError as exc:
            raise CoreError(f"attrs {RECORD_KEY} holds a bad value ({exc})") from None
        return model

    def describe(self) -> list[dict[str, str]]:
        """One row per knob for a table: ``{"knob", "value", "flag"}``."""
        rows = []
        for name, value in self.knobs().items():
            knob = KNOBS[name]
            if value is None:
                text = "off (every site with a path)"
            elif name == "missing_rate":
                text = f"{100 * value:g} %"
            else:
                text = f"{value:g} {knob.unit}".strip()
            rows.append({"knob": knob.label, "value": text, "flag": knob.flag})
        return rows

    def summary(self) -> str:
        """One line, e.g. ``noise 2 dB / 3 ns / 3 deg, no clock offset, 20 % missing, K = 4, ≥ -100 dBm``."""
        clock = f"clock offset σ {self.clock_offset_ns:g} ns" if self.clock_offset_ns else "no clock offset"
        sens = "no sensitivity threshold" if self.sensitivity_dbm is None else f"sites ≥ {self.sensitivity_dbm:g} dBm"
        return (f"noise σ {self.path_gain_db:g} dB / {self.toa_ns:g} ns / {self.aoa_deg:g} deg, {clock}, "
                f"{100 * self.missing_rate:g} % reports missing, K = {self.sites_per_report}, {sens}; "
                f"world: {self.world.summary()}" + (f"; {self.motion.summary()}" if self.motion.enabled else ""))

    def in_world(self, world: WorldModel) -> MeasurementModel:
        """The same knobs in another world."""
        return replace(self, world=world)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _legacy(attrs: Mapping[str, Any]) -> MeasurementModel | None:
    """The model of a store written before ``attrs["measurement_model"]``: its ``noise`` dict."""
    noise = attrs.get("noise")
    if not isinstance(noise, Mapping):
        return None
    generator = attrs.get("generator") if isinstance(attrs.get("generator"), Mapping) else {}
    defaults = MeasurementModel()
    model = MeasurementModel(
        path_gain_db=noise.get("path_gain_db", defaults.path_gain_db), toa_ns=noise.get("toa_ns", defaults.toa_ns),
        aoa_deg=noise.get("aoa_deg", defaults.aoa_deg), clock_offset_ns=0.0,
        missing_rate=noise.get("p_missing", defaults.missing_rate),
        sites_per_report=generator.get("sites_per_report", defaults.sites_per_report), sensitivity_dbm=None)
    try:
        model.check()
    except CoreError as exc:
        raise CoreError(f"attrs noise holds a bad value ({exc})") from None
    return model
