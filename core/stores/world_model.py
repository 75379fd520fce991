"""The world model of a dataset: how the world the UEs measure in differs from the radio map.

A radio map is a digital twin, and a twin has errors. ``python -m core make-dataset
--world realistic|oracle`` traces the UEs' reports in a perturbed COPY of the map's scene
(:mod:`core.raytracing.world` applies it); the radio map stays as it was generated. One
record, :class:`WorldModel`, holds every perturbation, each its own flag, all drawn from
``--world-seed`` (independent of ``--seed``, which draws walks, noise and split)::

    field                       flag                          unit   meaning (0 / off = as the map)
    material_spread             --world-materials             1      eps_r and sigma of each material x U[1-a, 1+a]
    height_sigma_m              --world-height-sigma          m      each building's height + N(0, sigma^2)
    remove_fraction             --world-remove-buildings      1      this fraction of buildings is not in the world
    vehicle_density_per_km2     --world-vehicles              1/km2  metal cars (Sionna's low-poly car) on the streets
    site_position_sigma_m       --world-site-position-sigma   m      each site's surveyed x and y + N(0, sigma^2)
    site_orientation_sigma_deg  --world-site-orientation-sigma deg   each site's mechanical tilt and azimuth + N(0, sigma^2)
    downtilt_error_deg          --world-downtilt-error        deg    the world's electrical down-tilt - the map's
    scattering_coefficient      --world-diffuse               1      diffuse scattering S of every material (map: 0)
    shadowing_los_db            --world-shadowing-los         dB     shadow-fading sigma on a line-of-sight link
    shadowing_nlos_db           --world-shadowing-nlos        dB     shadow-fading sigma on a non-line-of-sight link
    shadowing_decorrelation_m   --world-shadowing-distance    m      its decorrelation distance d (Gudmundson)
    detect_on_noisy             --world-detect-on-noisy       bool   sites heard and their slots by the NOISY power

``--world oracle`` (the default) is every perturbation off: the world is the map, and the
dataset is bit-identical to one made before worlds existed. ``--world realistic`` is
:data:`PRESETS` ``["realistic"]``; a flag given beside ``--world`` overrides that one value.
Where each realistic value comes from (docs/world.md has the sources):

* materials +-30 %: measured permittivities of one nominal material (concrete, brick,
  glass) spread over tens of per cent between buildings and studies, around the ITU-R
  P.2040 values the map uses;
* building heights sigma 2 m and 3 % of buildings missing: heights in open city models
  are often estimated from storey counts (about 3 m a storey), and footprints lag
  construction and demolition;
* 500 vehicles per km^2 of map area: a busy city centre's parked and moving cars;
* site position sigma 1 m, orientation sigma 2 deg: site databases from surveys and
  installation tolerances of mechanical tilt and azimuth of a few degrees;
* down-tilt error 2 deg: the network's configured electrical tilt is not the one the
  planning tool assumed;
* diffuse scattering S = 0.3: measured scattering coefficients of building walls lie
  between about 0.2 and 0.5 (Degli-Esposti et al.);
* shadow fading 4 dB LOS / 7.82 dB NLOS, decorrelation 10 m: 3GPP TR 38.901 UMi street
  canyon (Table 7.5-6: sigma_SF; Table 7.6.3.1-2: d_cor 10 m LOS, 13 m NLOS);
* detection on the noisy power: a UE decides what it hears from what it measures.

Stored inside ``attrs["measurement_model"]["world"]`` (:meth:`to_attrs`). A dataset without
it was made in the oracle world and reads as :data:`ORACLE`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from core.errors import CoreError

PRESET_NAMES = ("oracle", "realistic")


@dataclass(frozen=True)
class WorldKnob:
    """One perturbation's flag, unit, short label and upper bound (inclusive unless ``below``)."""

    flag: str
    unit: str
    label: str
    upper: float
    below: bool = False  # the value must be strictly below ``upper``


WORLD_KNOBS: dict[str, WorldKnob] = {
    "material_spread": WorldKnob("--world-materials", "", "materials ±", 0.9),
    "height_sigma_m": WorldKnob("--world-height-sigma", "m", "building heights σ", 100.0),
    "remove_fraction": WorldKnob("--world-remove-buildings", "", "buildings removed", 1.0, below=True),
    "vehicle_density_per_km2": WorldKnob("--world-vehicles", "/km²", "vehicles", 20_000.0),
    "site_position_sigma_m": WorldKnob("--world-site-position-sigma", "m", "site position σ", 100.0),
    "site_orientation_sigma_deg": WorldKnob("--world-site-orientation-sigma", "deg", "site orientation σ", 45.0),
    "downtilt_error_deg": WorldKnob("--world-downtilt-error", "deg", "down-tilt error", 30.0),
    "scattering_coefficient": WorldKnob("--world-diffuse", "", "diffuse S", 1.0),
    "shadowing_los_db": WorldKnob("--world-shadowing-los", "dB", "shadowing σ LOS", 30.0),
    "shadowing_nlos_db": WorldKnob("--world-shadowing-nlos", "dB", "shadowing σ NLOS", 30.0),
    "shadowing_decorrelation_m": WorldKnob("--world-shadowing-distance", "m", "shadowing decorrelation", 10_000.0),
    "detect_on_noisy": WorldKnob("--world-detect-on-noisy", "", "detection on noisy power", 1.0),
}


@dataclass(frozen=True)
class WorldModel:
    """Every perturbation of the world against the map (module docstring: units, flags, sources)."""

    seed: int = 0
    material_spread: float = 0.0
    height_sigma_m: float = 0.0
    remove_fraction: float = 0.0
    vehicle_density_per_km2: float = 0.0
    site_position_sigma_m: float = 0.0
    site_orientation_sigma_deg: float = 0.0
    downtilt_error_deg: float = 0.0
    scattering_coefficient: float = 0.0
    shadowing_los_db: float = 0.0
    shadowing_nlos_db: float = 0.0
    shadowing_decorrelation_m: float = 10.0
    detect_on_noisy: bool = False

    # -- what it is --------------------------------------------------------------------------
    @property
    def perturbations(self) -> dict[str, float | bool]:
        """The perturbations that are on (``{field: value}``); empty for the oracle world."""
        out: dict[str, float | bool] = {}
        for name in WORLD_KNOBS:
            value = getattr(self, name)
            if name == "shadowing_decorrelation_m":
                continue
            if value:
                out[name] = value
        return out

    @property
    def is_oracle(self) -> bool:
        """True when the world is the map (no perturbation on; the seed does not matter)."""
        return not self.perturbations

    @property
    def shadowing(self) -> bool:
        return bool(self.shadowing_los_db or self.shadowing_nlos_db)

    @property
    def name(self) -> str:
        """``oracle``, ``realistic`` (the preset, any seed) or ``custom``."""
        if self.is_oracle:
            return "oracle"
        if replace(self, seed=0) == PRESETS["realistic"]:
            return "realistic"
        return "custom"

    def check(self) -> None:
        """Raise :class:`CoreError` naming the flag of the first bad value."""
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**63:
            raise CoreError(f"--world-seed must be an integer >= 0, got {self.seed!r}")
        if not isinstance(self.detect_on_noisy, bool):
            raise CoreError(f"--world-detect-on-noisy must be true or false, got {self.detect_on_noisy!r}")
        for name, knob in WORLD_KNOBS.items():
            if name == "detect_on_noisy":
                continue
            value = getattr(self, name)
            low = -knob.upper if name == "downtilt_error_deg" else 0.0
            ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) \
                and low <= value and (value < knob.upper if knob.below else value <= knob.upper)
            if name == "shadowing_decorrelation_m" and ok:
                ok = value > 0
            if not ok:
                rng = f"[{low:g}, {knob.upper:g}{')' if knob.below else ']'}"
                unit = f" [{knob.unit}]" if knob.unit else ""
                raise CoreError(f"{knob.flag} must be a finite number in {rng}{unit}"
                                + (", > 0" if name == "shadowing_decorrelation_m" else "") + f", got {value!r}")

    # -- the command line --------------------------------------------------------------------
    @classmethod
    def from_flags(cls, preset: str | None, seed: int | None, values: Mapping[str, Any]) -> WorldModel:
        """The preset (default ``oracle``) with the given flags' raw values over it, checked."""
        preset = preset or "oracle"
        if preset not in PRESETS:
            raise CoreError(f"--world must be one of {', '.join(PRESET_NAMES)}, got {preset!r}")
        parsed: dict[str, Any] = {}
        for name, raw in values.items():
            if raw is None:
                continue
            if name == "detect_on_noisy":
                text = str(raw).strip().lower()
                if text not in ("true", "false", "1", "0", "yes", "no", "on", "off"):
                    raise CoreError(f"{WORLD_KNOBS[name].flag} must be true or false, got {raw!r}")
                parsed[name] = text in ("true", "1", "yes", "on")
                continue
            try:
                parsed[name] = float(raw)
            except (TypeError, ValueError):
                raise CoreError(f"{WORLD_KNOBS[name].flag} must be a number, got {raw!r}") from None
        if seed is not None:
            parsed["seed"] = seed
        world = replace(PRESETS[preset], **parsed)
        world.check()
        return world

    def cli_args(self) -> list[str]:
        """The flags that make this world: ``["--world", "oracle"]`` or the preset, seed and overrides."""
        base_name = "realistic" if self.name == "realistic" else "oracle"
        args = ["--world", base_name]
        if self.seed:
            args += ["--world-seed", str(self.seed)]
        base = PRESETS[base_name]
        for name, knob in WORLD_KNOBS.items():
            value = getattr(self, name)
            if value != getattr(base, name):
                args += [knob.flag, str(value).lower() if isinstance(value, bool) else f"{value:.12g}"]
        return args

    # -- the store ---------------------------------------------------------------------------
    def to_attrs(self) -> dict[str, Any]:
        """The record kept in ``attrs["measurement_model"]["world"]`` (with its name)."""
        return {"name": self.name, **asdict(self)}

    @classmethod
    def from_attrs(cls, record: Mapping[str, Any] | None) -> WorldModel:
        """The world a record describes; :data:`ORACLE` for none (a dataset made before worlds)."""
        if record is None:
            return ORACLE
        if not isinstance(record, Mapping):
            raise CoreError(f"world record must be a mapping, got {type(record).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(record) - known - {"name"})
        if unknown:
            raise CoreError(f"world record: unknown keys {unknown}")
        world = cls(**{k: v for k, v in record.items() if k in known})
        world.check()
        return world

    def summary(self) -> str:
        """One line: ``oracle`` or ``realistic (materials ±30 %, building heights σ 2 m, ...)``."""
        if self.is_oracle:
            return "oracle (the world is the map)"
        parts = []
        for name, value in self.perturbations.items():
            knob = WORLD_KNOBS[name]
            if name == "detect_on_noisy":
                parts.append(knob.label)
            elif name in ("material_spread", "remove_fraction"):
                parts.append(f"{knob.label} {100 * value:g} %")
            elif name.startswith("shadowing"):
                parts.append(f"{knob.label} {value:g} dB")
            else:
                parts.append(f"{knob.label} {value:g} {knob.unit}".rstrip())
        if self.shadowing:
            parts.append(f"shadowing decorrelation {self.shadowing_decorrelation_m:g} m")
        return f"{self.name} ({', '.join(parts)}; world seed {self.seed})"

    def describe(self) -> list[dict[str, str]]:
        """One row per perturbation for a table: ``{"perturbation", "value", "flag"}``."""
        rows = []
        for name, knob in WORLD_KNOBS.items():
            value = getattr(self, name)
            text = ("on" if value else "off") if isinstance(value, bool) else f"{value:g} {knob.unit}".strip()
            rows.append({"perturbation": knob.label, "value": text, "flag": knob.flag})
        return rows


ORACLE = WorldModel()

#: the presets of ``--world`` (values and their sources: module docstring and docs/world.md)
PRESETS: dict[str, WorldModel] = {
    "oracle": ORACLE,
    "realistic": WorldModel(
        material_spread=0.3, height_sigma_m=2.0, remove_fraction=0.03, vehicle_density_per_km2=500.0,
        site_position_sigma_m=1.0, site_orientation_sigma_deg=2.0, downtilt_error_deg=2.0,
        scattering_coefficient=0.3, shadowing_los_db=4.0, shadowing_nlos_db=7.82, shadowing_decorrelation_m=10.0,
        detect_on_noisy=True),
}
