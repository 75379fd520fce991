"""The calibrated robust negative log-likelihood of a position given one measurement report.

A report (:class:`SiteObservation`) lists up to ``K`` sites by id with their measured
(path_gain [dB], toa [ns], aoa [deg]) and the serving cell's (snr, sinr, throughput,
bler). At a position ``p`` the map (:class:`~core.physics.site_lookup.SiteMaps`) predicts
each reported site's features; with the :class:`~core.physics.calibration.Calibration`
(bias ``b_{s,f}`` and scale ``sigma_{s,f}`` per site and feature) the residuals are::

    z_{k,f}   = (o_{k,f} - b_{s,f} - map_{s,f}(p)) / sigma_{s,f}      f = path_gain, toa  (s = site of slot k)
    z_{k,aoa} = |u(o_{k,aoa} - b_{s,aoa}) - v_s(p)| / sigma_{s,aoa}    (sigma in rad)

where ``u(a) = (cos a, sin a)`` and ``v_s(p)`` is the map's bilinearly interpolated AoA
direction (its cos/sin channels): the AoA residual is the chord between the observed
direction and the map's, ``2 sin(|delta|/2)`` ~ ``|delta|`` rad for unit vectors -- smooth
everywhere, no seam at +-180 deg, no atan2 (the von Mises kernel). The NLL in nats::

    NLL(p) = sum_k sum_f  m_{k,f} w_f [ c_k(p) rho(z_{k,f}) + (1 - c_k(p)) rho(z_miss) ]
           + sum_c        m_c     w_c [ c_0(p) rho(z_c)     + (1 - c_0(p)) rho(z_miss) ]

* ``rho`` is the Cauchy (Student-t, 1 dof) NLL ``log(1 + z^2)`` (``penalty="cauchy"``, the
  default) or the Huber NLL ``z^2/2`` for ``|z| <= delta``, ``delta (|z| - delta/2)``
  beyond (``penalty="huber"``, ``delta = 2``). Cauchy's influence ``2z / (1 + z^2)``
  REDESCENDS: a slot with an NLOS detour (ToA 100s of ns late, AoA from a reflection) has
  bounded cost and vanishing pull, so it cannot drag the position, while Huber's constant
  pull beyond ``delta`` still does; the search (:mod:`core.physics.refinement`) handles the
  non-convexity that redescending brings.
* ``c_k(p)`` is 1 where slot k's site covers the cell under ``p``, else 0
  (:meth:`SiteMaps.coverage`, a step: no gradient): a position where the map says a
  REPORTED site has no path costs ``rho(z_miss)`` per feature (default ``z_miss = 10``: as
  much as a 10-sigma outlier in every feature of that slot), never a perfect match,
  whatever the hole-filled values there; ``c_0`` is the serving coverage (``valid``) for
  cell features.
* ``m`` masks what is absent: empty slots (site id -1), NaN features, features not in
  :attr:`LikelihoodConfig.site_features`. Absent entries contribute exactly 0.
* A value averaged over ``n`` reports (``SiteObservation.weight``, see
  :func:`~core.physics.observation.site_observation` with ``window_s``) has the scale
  ``sigma / sqrt(n)``: ``z^2`` is multiplied by ``n`` (the miss cost is not).
* ``w_f`` are optional multipliers (default 1: a calibrated likelihood needs none).
* Serving features ``c`` enter only where the calibration marks them informative
  (``cell_features="auto"``, see :mod:`core.physics.calibration`) or when listed.

**k-path maps: a mixture over the paths.** A report's ToA and AoA are those of the UE's
strongest path, and near a change of strongest path between map nodes that is the map's
second or third path, not its first. With a k-path map (:attr:`SiteMaps.paths` ``k > 1``,
``generate-maps --paths-per-site k``) and ``path_mixture="auto"`` (the default) a slot's ToA
and AoA match ANY path of the ``2 x 2`` cells of the bilinear stencil around ``p``, jointly (one
path explains both), each evaluated AT ``p`` from its anchor (:meth:`SiteMaps.path_components`:
never an interpolation across two paths)::

    rho_path(p) = -log sum_r sum_c pi_r w_c(p) exp(-[w_toa rho(z_toa,rc) + w_aoa rho(z_aoa,rc)])

(``r = 0 .. k-1`` the path rank at cell ``c``, ``w_c(p)`` the cell's bilinear weight, ``sum_c w_c = 1``)
replacing ``w_toa rho(z_toa) + w_aoa rho(z_aoa)`` in the sum above (path gain is the sum over
paths: unchanged, interpolated). ``z_{.,rc}`` are the residuals against component ``(r, c)`` with the
same calibrated bias and scale; ``pi_r`` are weights per path RANK, ``sum pi_r = 1``, estimated on the
calibration split at the truth (:attr:`Calibration.path_weights`: the EM fit of this very mixture,
so each rank's weight is how often the report's strongest path is the map's path ``r``); a
calibration without them (made with a k = 1 map) gives :data:`DEFAULT_PATH_WEIGHT0` to path 0 and
the rest in equal parts. Rank weights rather than the paths' relative power: per-rank weights
fitted on the data are the frequencies the mixture needs. At a cell centre only that cell's
``k`` paths count (``w_c = 1``); a component enters with weight 0 where the stencil changes, so the
mixture is continuous in ``p``. With ``k = 1`` (or ``path_mixture="off"``)
``rho_path`` is ``rho(z_toa) + rho(z_aoa)`` exactly: the same code path as without paths. The
mixture is a log-sum-exp, smooth in ``p`` inside a cell; its gradient is each component's gradient
weighted by its responsibility ``gamma_m = omega_m exp(-r_m) / sum_i omega_i exp(-r_i)``
(``omega = pi_r w_c``) plus the weights' own gradient ``-sum_r pi_r exp(-r_rc) / sum_i omega_i
exp(-r_i)`` through ``d w_c / d p``. A path absent at a cell holds that cell's path 0, so its
weight goes to path 0.

**Silence** (``LikelihoodConfig.silence``, with a :class:`~core.physics.silence.Silence`): a
report with a free slot says the sites it lacks were below the sensitivity; where the map
predicts such a site loud, the position costs ``-log(eps + (1 - eps) Phi((G_thr - b_s -
G_s(p)) / sigma_s))`` per site (:mod:`core.physics.silence`). Added to the NLL (and to
:attr:`LikelihoodTerms.silence`); ignored when the observation does not say which report had room.

API (the physics term for training and the objective of the MAP search)::

    lik = RobustLikelihood(radio_map_or_site_maps, calibration, LikelihoodConfig())
    obs = site_observation(dataset, indices)          # the label's report, as tensors
    nll = lik(xy, obs)          # xy [B, 2] -> [B] nats (or xy [B, P, 2] -> [B, P]); differentiable in xy
    prep = lik.prepare(obs)     # once per batch, then lik.evaluate(xy, prep) (what forward does)
    t = lik.terms(xy, obs)      # detached breakdown for an inspector (:class:`LikelihoodTerms`)

Site ids within one report must be distinct (as in the datasets). Implementation: the
observation is scattered site-major once (``[S, B]`` per quantity, absent = 0 weight), so
the candidates of a sample need no gather; one grid_sample reads all sites; a fused
kernel computes the NLL and, when ``xy`` requires grad, its analytic gradient with
respect to the sampled channels (the backward is then grid_sample's alone), with one
``log`` of the product of the Cauchy factors per site instead of one per feature.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch
from torch.autograd.function import once_differentiable

from core.errors import ConfigError, CoreError
from core.physics.calibration import CELL_FEATURES, SITE_FEATURES, Calibration
from core.physics.observation import SiteObservation, site_observation
from core.physics.silence import Silence, silence_cost, silence_nll, unheard_sites
from core.physics.site_lookup import SiteMaps, prepare_site_maps

__all__ = ["RobustLikelihood", "LikelihoodConfig", "SiteObservation", "PreparedObservation", "LikelihoodTerms",
           "site_observation", "penalty", "PENALTIES", "PATH_MIXTURES", "path_log_weights"]

PENALTIES = ("cauchy", "huber")
PATH_MIXTURES = ("auto", "off")
#: path 0's mixture weight when the calibration has none (the rest share 1 - this equally)
DEFAULT_PATH_WEIGHT0 = 0.9
_MIN_PATH_WEIGHT = 1e-6


def path_log_weights(calibration, paths: int) -> np.ndarray:
    """``log pi [paths]``: the calibration's per-rank path weights (``Calibration.path_weights``) when it has
    ``paths`` of them, else :data:`DEFAULT_PATH_WEIGHT0` and equal shares; floored and renormalised."""
    pi = getattr(calibration, "path_weights", None)
    if pi is None or len(pi) != paths:
        pi = [DEFAULT_PATH_WEIGHT0] + [(1 - DEFAULT_PATH_WEIGHT0) / (paths - 1)] * (paths - 1) if paths > 1 else [1.0]
    pi = np.maximum(np.asarray(pi, dtype=np.float64), _MIN_PATH_WEIGHT)
    return np.log(pi / pi.sum())


def penalty(z2: torch.Tensor, kind: str = "cauchy", delta: float = 2.0) -> torch.Tensor:
    """``rho`` from the SQUARED normalised residual ``z2 >= 0`` (any shape), in nats.

    cauchy: ``log(1 + z2)``; huber: ``z^2/2`` for ``|z| <= delta``, ``delta (|z| - delta/2)``
    beyond. Finite gradients everywhere, ``z2 = 0`` included.
    """
    if kind == "cauchy":
        return torch.log1p(z2)
    pos = z2 > 0
    a = torch.where(pos, torch.where(pos, z2, 1.0).sqrt(), 0.0)  # |z| without sqrt'(0) = inf
    q = a.clamp(max=delta)
    return q * (a - 0.5 * q)


@dataclass(frozen=True)
class LikelihoodConfig:
    """Which features enter and how (see the module doc).

    site_features: per-site features used, a subset of ``("path_gain", "toa", "aoa")``.
    cell_features: serving features, a subset of ``("snr", "sinr", "throughput", "bler")``,
        or "auto": those the calibration marks informative.
    penalty: "cauchy" or "huber"; huber_delta: Huber's threshold in sigmas.
    miss_z: the normalised residual an uncovered slot is charged per feature.
    weights: ``{feature: multiplier}`` (default 1).
    path_mixture: "auto": a k-path map's ToA/AoA as a mixture over its paths (module doc); "off":
        path 0 only (the map read as k = 1).
    silence: add the cost of the sites a report with a free slot did not hear (module doc; needs a
        :class:`~core.physics.silence.Silence` given to the likelihood).
    """

    site_features: tuple[str, ...] = SITE_FEATURES
    cell_features: tuple[str, ...] | str = "auto"
    penalty: str = "cauchy"
    huber_delta: float = 2.0
    miss_z: float = 10.0
    weights: dict[str, float] = field(default_factory=dict)
    path_mixture: str = "auto"
    silence: bool = False

    def __post_init__(self) -> None:
        if self.path_mixture not in PATH_MIXTURES:
            raise ConfigError(f"likelihood: path_mixture must be one of {PATH_MIXTURES}, got {self.path_mixture!r}")
        if self.penalty not in PENALTIES:
            raise ConfigError(f"likelihood: penalty must be one of {PENALTIES}, got {self.penalty!r}")
        bad = [f for f in self.site_features if f not in SITE_FEATURES]
        if bad or not self.site_features:
            raise ConfigError(f"likelihood: site_features must be a non-empty subset of {SITE_FEATURES}, got {self.site_features}")
        if self.cell_features != "auto" and any(f not in CELL_FEATURES for f in self.cell_features):
            raise ConfigError(f"likelihood: cell_features must be 'auto' or a subset of {CELL_FEATURES}, got {self.cell_features}")
        for key, value in self.weights.items():
            if key not in SITE_FEATURES + CELL_FEATURES:
                raise ConfigError(f"likelihood: weights: unknown feature {key!r}")
            if not (math.isfinite(float(value)) and float(value) >= 0):
                raise ConfigError(f"likelihood: weights: {key!r} must be a finite number >= 0, got {value}")
        if not (self.huber_delta > 0 and self.miss_z > 0):
            raise ConfigError("likelihood: huber_delta and miss_z must be > 0")


class PreparedObservation(NamedTuple):
    """A report made site-major and bias-corrected once (:meth:`RobustLikelihood.prepare`).

    Site-major like the table's samples, ``[S, B]`` each, 0 for sites not reported:
    ``o_pg``, ``o_toa`` (measured - bias), ``u_c``, ``u_s`` (unit vector of measured AoA -
    bias), ``inv2_pg``, ``inv2_toa``, ``inv2_aoa`` (``m n / sigma^2``, ``n`` the reports averaged, sigma of AoA in rad),
    ``r_miss`` (``rho(z_miss) sum_f m w``). Serving part: ``o_cell``, ``inv2_cell``
    ``[F_c, B]``, ``r_miss_cell [B]``. ``site_ids [B, K]``. ``unheard [S, B]`` 0/1: sites the
    silence term charges (None: no silence term).
    """

    o_pg: torch.Tensor
    o_toa: torch.Tensor
    u_c: torch.Tensor
    u_s: torch.Tensor
    inv2_pg: torch.Tensor
    inv2_toa: torch.Tensor
    inv2_aoa: torch.Tensor
    r_miss: torch.Tensor
    o_cell: torch.Tensor
    inv2_cell: torch.Tensor
    r_miss_cell: torch.Tensor
    site_ids: torch.Tensor
    unheard: torch.Tensor | None = None

    def take(self, idx) -> PreparedObservation:
        """The same observation for samples ``idx`` (a long tensor or a slice)."""
        cols = [v[:, idx] for v in self[:10]]
        return PreparedObservation(*cols, self.r_miss_cell[idx], self.site_ids[idx],
                                   None if self.unheard is None else self.unheard[:, idx])


class LikelihoodTerms(NamedTuple):
    """Detached per-term breakdown at one position per sample (:meth:`RobustLikelihood.terms`).

    total ``[B]`` nats (= the NLL); site ``[B, K, 3]`` nats per slot and feature (coverage
    mix included); cell ``[B, F_c]`` nats; residual ``[B, K, 3]`` measured - bias - map in
    feature units (AoA wrapped, deg); z ``[B, K, 3]`` normalised residuals (AoA: chord /
    sigma); coverage ``[B, K]``; present bool ``[B, K, 3]``; cell_residual, cell_z
    ``[B, F_c]``; cell_coverage ``[B]``; silence ``[B]`` nats of the silence term (0 without one;
    included in ``total``); cell_features names.
    """

    total: torch.Tensor
    site: torch.Tensor
    cell: torch.Tensor
    residual: torch.Tensor
    z: torch.Tensor
    coverage: torch.Tensor
    present: torch.Tensor
    cell_residual: torch.Tensor
    cell_z: torch.Tensor
    cell_coverage: torch.Tensor
    silence: torch.Tensor
    cell_features: tuple[str, ...]


def _huber(z2: torch.Tensor, delta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Huber ``(rho, d rho / d z2)`` from ``z2``; the slope is finite at ``z2 = 0``."""
    a = z2.sqrt()
    inside = a <= delta
    rho = torch.where(inside, 0.5 * z2, delta * (a - 0.5 * delta))
    slope = torch.where(inside, 0.5, 0.5 * delta / torch.where(inside, 1.0, a))
    return rho, slope


_DEN_MAX = 1e12  # Cauchy factors are capped (z < 1e6) so that a product of three stays finite in float32


def _linear_rho(chan, o, inv2, kind: str, delta: float, grad_out, defer_log: bool = False) -> torch.Tensor:
    """``rho(z2)`` with ``z2 = (chan - o)^2 inv2`` (broadcast); ``grad_out`` <- ``d rho / d chan``.

    With ``defer_log`` (Cauchy only) it returns ``1 + z2`` (capped) instead of its log, so
    that the caller takes ONE log of the product over features (log is ~20x the cost of
    a multiply here). In-place on fresh buffers: each op reuses one of two allocations
    (fresh multi-MiB temporaries cost more in page faults than the arithmetic).
    """
    d = chan - o
    q = d * inv2
    z2 = d.mul_(q)
    if kind == "cauchy":  # d log(1 + z2) / d chan = 2 q / (1 + z2)
        den = z2.add_(1.0)
        if grad_out is not None:
            torch.div(q, den, out=grad_out).mul_(2.0)
        return den.clamp_(max=_DEN_MAX) if defer_log else den.log_()
    rho, slope = _huber(z2, delta)
    if grad_out is not None:
        torch.mul(q, slope, out=grad_out).mul_(2.0)
    return rho


def _chord_rho(cos, sin, uc, us, inv2, kind: str, delta: float, grad_out, defer_log: bool = False) -> torch.Tensor:
    """``rho(z2)`` with ``z2 = ((cos - uc)^2 + (sin - us)^2) inv2``; ``grad_out [2, ...]`` <- d rho / d (cos, sin).

    ``defer_log`` as in :func:`_linear_rho`.
    """
    dc, ds = cos - uc, sin - us
    z2 = (dc * dc).addcmul_(ds, ds).mul_(inv2)
    if kind == "cauchy":
        den = z2.add_(1.0)
        if grad_out is not None:
            k = torch.div(inv2, den).mul_(2.0)
            torch.mul(dc, k, out=grad_out[0])
            torch.mul(ds, k, out=grad_out[1])
        return den.clamp_(max=_DEN_MAX) if defer_log else den.log_()
    rho, slope = _huber(z2, delta)
    if grad_out is not None:
        k = slope.mul_(inv2).mul_(2.0)
        torch.mul(dc, k, out=grad_out[0])
        torch.mul(ds, k, out=grad_out[1])
    return rho


class _FusedNLL(torch.autograd.Function):
    """``total = kernel(raw)`` whose kernel also returns ``d total / d raw``: the backward is one multiply."""

    @staticmethod
    def forward(ctx, raw, kernel):
        total, grad = kernel(raw, True)
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_total):
        (grad,) = ctx.saved_tensors
        g = grad_total.reshape(1, -1)
        if bool((g == 1).all()):  # the usual .sum().backward(): no multiply, no new buffer
            return grad, None
        return grad * g, None


class RobustLikelihood(torch.nn.Module):
    """The NLL of the module doc: ``lik(xy, observation) -> [B]`` nats, differentiable in ``xy``.

    Args:
        maps: a RadioMap with per-site layers, or a :class:`SiteMaps` (shared; it must
            hold the serving features the config needs).
        calibration: a :class:`Calibration` with one row per map site.
        config: a :class:`LikelihoodConfig`.
        device: where to put a map prepared here.
        silence: the silence term's constants (:func:`~core.physics.silence.fit_silence`); used when
            ``config.silence`` (required then).
    """

    def __init__(self, maps, calibration: Calibration, config: LikelihoodConfig | None = None, device=None,
                 silence: Silence | None = None) -> None:
        super().__init__()
        self.config = config = config or LikelihoodConfig()
        cells = calibration.informative_cell_features if config.cell_features == "auto" else tuple(config.cell_features)
        if isinstance(maps, SiteMaps):
            if tuple(maps.cell_features) != cells:
                raise CoreError(f"likelihood: the SiteMaps holds cell features {list(maps.cell_features)}, "
                                f"the config needs {list(cells)}; prepare it with cell_features={cells}")
            if device is not None:
                maps = maps.to(device)
        else:
            maps = prepare_site_maps(maps, cell_features=cells, device=device, paths=config.path_mixture == "auto")
        if calibration.num_sites != maps.num_sites:
            raise CoreError(f"likelihood: the calibration has {calibration.num_sites} sites, the map {maps.num_sites}")
        missing = [c for c in cells if c not in calibration.cell]
        if missing:
            raise CoreError(f"likelihood: cell feature(s) {missing} are not calibrated")
        self.maps, self.calibration, self.cell_features = maps, calibration, cells
        rho_miss = float(penalty(torch.tensor(config.miss_z ** 2, dtype=torch.float64), config.penalty, config.huber_delta))
        w = [float(config.weights.get(f, 1.0)) * (f in config.site_features) for f in SITE_FEATURES]
        wc = [float(config.weights.get(f, 1.0)) for f in cells]
        self.w, self.wc, self.rho_miss = w, wc, rho_miss
        sigma = calibration.scale.copy()
        sigma[:, 2] = np.deg2rad(sigma[:, 2])
        dt, dev = maps.dtype, maps.device
        buf = lambda name, v: self.register_buffer(name, torch.as_tensor(np.asarray(v, dtype=np.float64)).to(dev, dt), persistent=False)  # noqa: E731
        buf("bias_t", calibration.bias.T)  # [3, S], AoA in deg
        buf("inv2_t", ((np.asarray(w) > 0)[None] / sigma**2).T)  # [3, S]: 1 / sigma^2, 0 for unused features
        buf("w_miss", np.asarray(w) * rho_miss)  # [3]
        buf("cell_bias", [calibration.cell[c]["bias"] for c in cells])
        buf("cell_inv2", [1.0 / calibration.cell[c]["scale"] ** 2 for c in cells])
        buf("cell_w_miss", np.asarray(wc) * rho_miss)
        self._cell_cols = [CELL_FEATURES.index(c) for c in cells]
        #: paths in the mixture (1: none, the single-path NLL); k-path SiteMaps with path_mixture "off" -> 1
        self.paths = maps.paths if config.path_mixture == "auto" and (w[1] > 0 or w[2] > 0) else 1
        self._product_mixture = config.penalty == "cauchy" and all(v in (0.0, 1.0) for v in w)
        buf("log_pi", path_log_weights(calibration, self.paths))
        if config.silence and silence is None:
            raise CoreError("likelihood: silence is on but no Silence was given (fit_silence)")
        self.silence = silence if config.silence else None
        buf("pg_scale", calibration.scale[:, 0])  # [S] dB, the silence term's sigma_s

    @classmethod
    def calibrated(cls, radio_map, dataset, config: LikelihoodConfig | None = None, split: str | None = "train",
                   device=None) -> RobustLikelihood:
        """Calibrate on ``dataset[split]`` (:func:`~core.physics.calibration.calibrate`) and build the likelihood.

        The calibration is ``likelihood.calibration`` (save it with the run: ``.save(path)``).
        """
        from core.physics.calibration import calibrate

        return cls(radio_map, calibrate(dataset, radio_map, split=split), config, device=device)

    def extra_repr(self) -> str:
        c = self.config
        return (f"penalty={c.penalty}, site_features={list(c.site_features)}, cell_features={list(self.cell_features)}, "
                f"miss_z={c.miss_z}, rho_miss={self.rho_miss:.3f}, paths={self.paths}")

    # -- observation side --------------------------------------------------------------
    def prepare(self, obs: SiteObservation) -> PreparedObservation:
        """Validate ``obs`` and make it site-major and bias-corrected (see :class:`PreparedObservation`)."""
        maps, dt, dev = self.maps, self.maps.dtype, self.maps.device
        ids = maps.check_site_ids(obs.site_ids)
        b, k = ids.shape
        site = torch.as_tensor(obs.site, device=dev).to(dt)
        if site.shape != (b, k, 3):
            raise CoreError(f"likelihood: observation site features must be [{b}, {k}, 3], got {tuple(site.shape)}")
        s = maps.num_sites
        # site-major row of every slot: site * B + b (empty slots: the dummy site S)
        index = torch.where(ids >= 0, ids, s).mul_(b).add_(torch.arange(b, device=dev).unsqueeze(1)).view(-1)
        if k > 1 and int(torch.bincount(index, minlength=(s + 1) * b)[: s * b].max()) > 1:
            raise CoreError("likelihood: a report lists the same site twice")
        # scatter the measured values into NaN: NaN = site not reported or feature absent (inf counts as absent)
        flat = torch.full((3, (s + 1) * b), math.nan, dtype=dt, device=dev)
        src = torch.nan_to_num(site.reshape(b * k, 3).t(), nan=math.nan, posinf=math.nan, neginf=math.nan)
        for f in range(3):  # 1-D index_copy: a plain scatter
            flat[f].index_copy_(0, index, src[f])
        measured = flat.view(3, s + 1, b)[:, :s]  # [3, S, B]
        m = (measured == measured).to(dt)
        if obs.weight is not None:  # reports averaged per value: the variance is divided by it
            weight = torch.as_tensor(obs.weight, device=dev).to(dt)
            if weight.shape != (b, k, 3):
                raise CoreError(f"likelihood: observation weight must be [{b}, {k}, 3], got {tuple(weight.shape)}")
            flat_w = torch.zeros((3, (s + 1) * b), dtype=dt, device=dev)
            src_w = torch.nan_to_num(weight.reshape(b * k, 3).t(), nan=0.0, posinf=0.0, neginf=0.0).clamp_(min=0.0)
            for f in range(3):
                flat_w[f].index_copy_(0, index, src_w[f])
            m = m * flat_w.view(3, s + 1, b)[:, :s]
        o = (measured - self.bias_t.unsqueeze(-1)).nan_to_num_(0.0)  # measured - bias, 0 where absent
        present = (m > 0).to(dt)
        rad = torch.deg2rad(o[2])
        u_c, u_s = torch.cos(rad).mul_(present[2]), torch.sin(rad).mul_(present[2])
        inv2 = m * self.inv2_t.unsqueeze(-1)  # n / sigma^2 (n = reports averaged, 1 without weights)
        r_miss = torch.tensordot(self.w_miss, present, dims=1)  # [S, B]
        per_site = (o[0], o[1], u_c, u_s, inv2[0], inv2[1], inv2[2], r_miss)
        o_cell, inv2_cell, r_cell = self._prepare_cell(obs, b)
        unheard = None
        if self.silence is not None and obs.room is not None:
            unheard = unheard_sites(ids, torch.as_tensor(obs.room, device=dev), s).to(dt)
        return PreparedObservation(*per_site, o_cell, inv2_cell, r_cell, ids, unheard)

    def _prepare_cell(self, obs: SiteObservation, b: int):
        dt, dev = self.maps.dtype, self.maps.device
        fc = len(self.cell_features)
        if not fc:
            z = torch.zeros(0, b, dtype=dt, device=dev)
            return z, z, torch.zeros(b, dtype=dt, device=dev)
        if obs.cell is None:
            raise CoreError(f"likelihood: the observation has no cell features; the config uses {list(self.cell_features)}")
        cell = torch.as_tensor(obs.cell, device=dev).to(dt)
        if cell.shape != (b, len(CELL_FEATURES)):
            raise CoreError(f"likelihood: observation cell features must be [{b}, {len(CELL_FEATURES)}], got {tuple(cell.shape)}")
        cell = cell[:, self._cell_cols]
        ok = torch.isfinite(cell)
        o = torch.where(ok, cell - self.cell_bias, 0.0)
        m = ok.to(dt)
        return o.t().contiguous(), (self.cell_inv2 * m).t().contiguous(), m @ self.cell_w_miss

    # -- the NLL -----------------------------------------------------------------------
    def rho(self, z2: torch.Tensor) -> torch.Tensor:
        """The configured penalty of squared normalised residuals (see :func:`penalty`)."""
        return penalty(z2, self.config.penalty, self.config.huber_delta)

    def evaluate(self, xy: torch.Tensor, prep: PreparedObservation) -> torch.Tensor:
        """NLL at ``xy [B, 2]`` -> ``[B]``, or at candidates ``xy [B, P, 2]`` -> ``[B, P]``.

        One grid_sample, then a fused kernel that also writes the analytic gradient with
        respect to the sampled channels when ``xy`` requires grad (no autograd graph of
        the ~30 elementwise ops; see :class:`_FusedNLL`).
        """
        single = xy.ndim == 2
        xy3 = xy.unsqueeze(1) if single else xy
        b, p = xy3.shape[:2]
        flat = xy3.reshape(b * p, 2)
        raw = self.maps.sample(flat, paths=self.paths > 1)
        cov = self.maps.coverage(flat)  # [S + 1, N] 0/1, no gradient
        kernel = lambda r, need_grad: self._kernel(r, cov, prep, b, p, need_grad)  # noqa: E731
        if raw.requires_grad and torch.is_grad_enabled():
            total = _FusedNLL.apply(raw, kernel)
        else:
            total = kernel(raw, False)[0]
        total = self._add_silence(total, raw, cov, prep, b, p)
        return total.squeeze(1) if single else total

    def _add_silence(self, total: torch.Tensor, raw: torch.Tensor, cov: torch.Tensor, prep: PreparedObservation,
                     b: int, p: int) -> torch.Tensor:
        """``total [B, P]`` plus the silence term of ``prep`` at the points of ``raw [C, B P]`` (autograd through the
        path-gain channels); ``total`` itself without one."""
        if prep.unheard is None:
            return total
        s = self.maps.num_sites
        return total + self._silence(raw[:s].view(s, b, p), cov[:s].view(s, b, p), prep.unheard.unsqueeze(-1))

    def _silence(self, gain: torch.Tensor, cover: torch.Tensor, unheard: torch.Tensor) -> torch.Tensor:
        """The silence term [nats] (:func:`~core.physics.silence.silence_nll`) with the path-gain calibration."""
        return silence_nll(gain, cover, unheard, self.bias_t[0], self.pg_scale, self.silence)

    @torch.no_grad()
    def evaluate_shared(self, points: torch.Tensor, prep: PreparedObservation) -> torch.Tensor:
        """NLL ``[B, P]`` at the SAME candidate points ``[P, 2]`` for every sample of ``prep`` (no gradient).

        The map is sampled once at the points (not once per sample), then the kernel runs over
        ``[S, B, P]``: for scoring a fixed set of positions (e.g. every coarse cell) for many samples.
        """
        b, p = prep.site_ids.shape[0], points.shape[0]
        pts = points.to(device=self.maps.device, dtype=self.maps.dtype)
        sampled = self.maps.sample(pts, paths=self.paths > 1)
        cov = self.maps.coverage(pts).unsqueeze(1).expand(-1, b, p).reshape(-1, b * p)
        if self.paths > 1 and self._product_mixture:  # the path components broadcast, never copied per sample
            s, n_base = self.maps.num_sites, self.maps.num_channels
            raw = sampled[:n_base].unsqueeze(1).expand(-1, b, p).reshape(-1, b * p)
            chans, weight = self.maps.path_part(sampled)
            shared = (chans.view(3, self.paths, s, 4, 1, p), weight.view(4, 1, p))
            total = self._mixture_kernel(raw, cov[:s].view(s, b, p), cov, prep, b, p, None, shared)[0]
        else:
            raw = sampled.unsqueeze(1).expand(-1, b, p).reshape(-1, b * p)
            total = self._kernel(raw, cov, prep, b, p, False)[0]
        if prep.unheard is not None:  # per (site, point) once, then [B, S] @ [S, P]
            s = self.maps.num_sites
            gain, cover = sampled[:s], self.maps.coverage(pts)[:s]
            per_site = silence_cost(gain, self.bias_t[0], self.pg_scale, self.silence) * cover  # [S, P]
            total = total + prep.unheard.t() @ per_site
        return total

    @torch.no_grad()
    def evaluate_sampled(self, raw: torch.Tensor, coverage: torch.Tensor, prep: PreparedObservation) -> torch.Tensor:
        """NLL ``[B, P]`` of sample ``b`` of ``prep`` at its own ``P`` points, given their table channels
        ``raw [C, B * P]`` (:meth:`SiteMaps.sample`, with ``paths`` for a mixture: :meth:`sampled_channels` rows;
        sample-major: columns ``b P .. b P + P - 1``) and coverage
        ``[S + 1, B * P]`` (:meth:`SiteMaps.coverage`); no gradient. For points whose map values were sampled
        once and are scored for many reports (a column may repeat)."""
        b = prep.site_ids.shape[0]
        n = raw.shape[1] if raw.ndim == 2 else -1
        rows = self.sampled_channels
        if (raw.ndim != 2 or raw.shape[0] != rows or b == 0 or n % b
                or coverage.shape != (self.maps.num_sites + 1, n)):
            raise CoreError(f"likelihood: evaluate_sampled needs raw [{rows}, B * P] and coverage "
                            f"[{self.maps.num_sites + 1}, B * P] for B = {b}, got {tuple(raw.shape)}, "
                            f"{tuple(coverage.shape)}")
        raw = raw.contiguous()
        return self._add_silence(self._kernel(raw, coverage, prep, b, n // b, False)[0], raw, coverage, prep, b, n // b)

    @property
    def sampled_channels(self) -> int:
        """Rows of the map sample this likelihood reads (:meth:`SiteMaps.sample` with ``paths = self.paths > 1``)."""
        m = self.maps
        return m.num_channels + (3 * m.components * m.num_sites + 4 if self.paths > 1 else 0)

    def _kernel(self, raw: torch.Tensor, coverage: torch.Tensor, prep: PreparedObservation, b: int, p: int,
                need_grad: bool):
        """``(NLL [B, P], d NLL / d raw [C, N] or None)`` from the sampled channels ``raw [C, N]``
        and the coverage ``[S + 1, N]``."""
        s = self.maps.num_sites
        pg, toa, cos, sin = raw[: 4 * s].view(4, s, b, p).unbind(0)
        cov = coverage[:s].view(s, b, p)
        grad = torch.empty_like(raw) if need_grad else None
        gs = None if grad is None else grad[: 4 * s].view(4, s, b, p)
        if self.paths > 1:
            return self._mixture_kernel(raw, cov, coverage, prep, b, p, grad)
        un = lambda v: v.unsqueeze(-1)  # noqa: E731  [S, B] -> [S, B, 1]
        kind, delta = self.config.penalty, self.config.huber_delta
        product = kind == "cauchy" and all(w in (0.0, 1.0) for w in self.w)  # sum of logs = log of the product
        t = None
        for f, w in enumerate(self.w):
            if not w:
                if gs is not None:
                    gs[f].zero_()
                    if f == 2:
                        gs[3].zero_()
                continue
            if f < 2:
                o, inv2 = (prep.o_pg, prep.inv2_pg) if f == 0 else (prep.o_toa, prep.inv2_toa)
                rho = _linear_rho(pg if f == 0 else toa, un(o), un(inv2), kind, delta, None if gs is None else gs[f],
                                  product)
            else:
                rho = _chord_rho(cos, sin, un(prep.u_c), un(prep.u_s), un(prep.inv2_aoa), kind, delta,
                                 None if gs is None else gs[2:4], product)
            if w != 1.0:
                rho.mul_(w)
                if gs is not None:
                    gs[f if f < 2 else slice(2, 4)].mul_(w)
            t = rho if t is None else (t.mul_(rho) if product else t.add_(rho))
        if product:
            t = t.log_()
        tm = t.sub_(un(prep.r_miss))  # t - R: c (t - R) + R summed over sites
        if gs is not None:
            gs.mul_(cov)
        total = tm.mul_(cov).sum(0).add_(prep.r_miss.sum(0).unsqueeze(-1))
        if self.cell_features:
            total.add_(self._cell_kernel(raw, coverage[s].view(b, p), prep, b, p, grad))
        return total, grad

    def _cell_kernel(self, raw, cov: torch.Tensor, prep: PreparedObservation, b: int, p: int, grad) -> torch.Tensor:
        """Serving-feature NLL ``[B, P]`` (``cov [B, P]``: serving coverage); writes its gradient rows into ``grad``."""
        cell = self.maps.cell_part(raw).view(-1, b, p)
        gc = None if grad is None else self.maps.cell_part(grad).view(-1, b, p)
        rho = _linear_rho(cell, prep.o_cell.unsqueeze(-1), prep.inv2_cell.unsqueeze(-1), self.config.penalty,
                          self.config.huber_delta, gc)
        wc = torch.as_tensor(self.wc, dtype=rho.dtype, device=rho.device).view(-1, 1, 1)
        tm = rho.mul_(wc).sum(0).sub_(prep.r_miss_cell.unsqueeze(1))
        if gc is not None:
            gc.mul_(wc).mul_(cov)
        return tm.mul_(cov).add_(prep.r_miss_cell.unsqueeze(1))

    def _components(self, raw: torch.Tensor, b: int, p: int, shared=None):
        """``(values [3, k, S, 4, B|1, P], weight [4, B|1, P])``: the mixture components of a k-path map (ToA, cos,
        sin of path rank ``r`` of site ``s`` at stencil cell ``c``; :meth:`SiteMaps.path_components`) and the stencil
        cells' weights, from ``raw`` or ``shared``."""
        if shared is not None:
            return shared
        chans, weight = self.maps.path_part(raw)
        return chans.view(3, self.paths, self.maps.num_sites, 4, b, p), weight.view(4, b, p)

    def _log_omega(self, weight: torch.Tensor) -> torch.Tensor:
        """``log (pi_r w_c)`` ``[k, 1, 4, B|1, P]`` (-inf where ``w_c = 0``)."""
        return self.log_pi.view(-1, 1, 1, 1, 1) + torch.log(weight).unsqueeze(0).unsqueeze(0)

    def _path_rho(self, chans: torch.Tensor, prep: PreparedObservation, b: int, need_grad: bool):
        """Per component: ``r [k, S, 4, B, P]`` = ``w_toa rho(z_toa) + w_aoa rho(z_aoa)`` from ``chans
        [3, k, S, 4, B|1, P]`` and, if asked, its gradients ``d r / d (toa, cos, sin)`` ``[3, k, S, 4, B, P]``."""
        k, s, p = chans.shape[1], chans.shape[2], chans.shape[-1]
        kind, delta = self.config.penalty, self.config.huber_delta
        r = torch.zeros((k, s, 4, b, p), dtype=chans.dtype, device=chans.device)
        g = torch.zeros((3, k, s, 4, b, p), dtype=chans.dtype, device=chans.device) if need_grad else None
        un = lambda v: v.view(1, s, 1, b, 1)  # noqa: E731
        if self.w[1]:
            r.add_(_linear_rho(chans[0], un(prep.o_toa), un(prep.inv2_toa), kind, delta,
                               None if g is None else g[0]).mul_(self.w[1]))
            if g is not None:
                g[0].mul_(self.w[1])
        if self.w[2]:
            r.add_(_chord_rho(chans[1], chans[2], un(prep.u_c), un(prep.u_s), un(prep.inv2_aoa), kind, delta,
                              None if g is None else g[1:3]).mul_(self.w[2]))
            if g is not None:
                g[1:3].mul_(self.w[2])
        return r, g

    def _path_factors(self, chans: torch.Tensor, prep: PreparedObservation, b: int, g=None) -> torch.Tensor:
        """Cauchy with 0/1 weights: ``1 / (D_toa D_aoa)`` ``[k, S, 4, B, P]`` with ``D = 1 + z^2`` (capped as in
        :func:`_linear_rho`): :meth:`_path_rho`'s ``exp(-r)`` without a log. Writes ``d r / d`` (toa, cos,
        sin) into ``g [3, k, S, 4, B, P]`` when given."""
        s = chans.shape[2]
        un = lambda v: v.view(1, s, 1, b, 1)  # noqa: E731
        den = None
        if self.w[1]:
            den = _linear_rho(chans[0], un(prep.o_toa), un(prep.inv2_toa), "cauchy", 0.0, None if g is None else g[0],
                              True)
        elif g is not None:
            g[0].zero_()
        if self.w[2]:
            d2 = _chord_rho(chans[1], chans[2], un(prep.u_c), un(prep.u_s), un(prep.inv2_aoa), "cauchy", 0.0,
                            None if g is None else g[1:3], True)
            den = d2 if den is None else den.mul_(d2)
        elif g is not None:
            g[1:3].zero_()
        return den.reciprocal_()

    def _mixture_kernel(self, raw, cov, coverage, prep: PreparedObservation, b: int, p: int, grad, shared=None):
        """:meth:`_kernel` for a k-path map: path gain as always, ToA and AoA a mixture over the ``M = 4 k`` path
        components of the stencil cells, weights ``pi_r w_c(p)`` (module doc)."""
        s, k = self.maps.num_sites, self.paths
        gs = None if grad is None else grad[: 4 * s].view(4, s, b, p)
        kind, delta = self.config.penalty, self.config.huber_delta
        t = torch.zeros((s, b, p), dtype=raw.dtype, device=raw.device)
        if self.w[0]:
            t.add_(_linear_rho(raw[:s].view(s, b, p), prep.o_pg.unsqueeze(-1), prep.inv2_pg.unsqueeze(-1), kind, delta,
                               None if gs is None else gs[0]).mul_(self.w[0]))
            if gs is not None:
                gs[0].mul_(self.w[0])
        elif gs is not None:
            gs[0].zero_()
        chans, weight = self._components(raw, b, p, shared)
        log_omega = self._log_omega(weight)  # [k, 1, 4, B|1, P]
        g = gw = None
        if gs is not None:
            gs[1:4].zero_()  # path 0's interpolated channels: not in the mixture (its anchors are)
            g, gw = self._components(grad, b, p)
        if self._product_mixture:  # Cauchy, weights 0/1: sum pi_r w_c / (D_toa D_aoa), ONE log, no copies
            inv = self._path_factors(chans, prep, b, g)  # [k, S, 4, B, P]
            omega = log_omega.exp()
            mix = (inv.mul_(omega) if g is None else inv * omega).sum((0, 2))  # [S, B, P]
            t.sub_(torch.log(mix))
            if g is not None:
                e = inv.div_(mix.unsqueeze(1))  # exp(-r) / mix, per unit weight
                g.mul_(e * omega)  # times the responsibilities
        else:
            r, gr = self._path_rho(chans, prep, b, g is not None)
            a = log_omega - r
            lse = torch.logsumexp(a, (0, 2))  # over (rank, cell): [S, B, P]
            t.sub_(lse)
            if g is not None:
                g.copy_(gr.mul_((a - lse.unsqueeze(1)).exp_()))  # times the responsibilities
                e = (-r - lse.unsqueeze(1)).exp_()  # exp(-r) / mix, per unit weight
        if g is not None:  # d (-log mix) / d w_c = -sum_r pi_r exp(-r_(r,c)) / mix, summed over covered sites
            e = e.mul_(cov.unsqueeze(1)).sum(1).mul_(self.log_pi.exp().view(k, 1, 1, 1)).sum(0)  # [4, B, P]
            gw.copy_(e.neg_())
            gs.mul_(cov)
            g.mul_(cov.unsqueeze(1))
        total = t.sub_(prep.r_miss.unsqueeze(-1)).mul_(cov).sum(0).add_(prep.r_miss.sum(0).unsqueeze(-1))
        if self.cell_features:
            total.add_(self._cell_kernel(raw, coverage[s].view(b, p), prep, b, p, grad))
        return total, grad

    def forward(self, xy: torch.Tensor, obs) -> torch.Tensor:
        """NLL [nats]: ``xy [B, 2] -> [B]`` or ``xy [B, P, 2] -> [B, P]``; ``obs`` a Site- or PreparedObservation."""
        if not isinstance(xy, torch.Tensor) or xy.ndim not in (2, 3) or xy.shape[-1] != 2:
            raise CoreError(f"likelihood: xy must be a tensor [B, 2] or [B, P, 2], got {getattr(xy, 'shape', xy)}")
        prep = obs if isinstance(obs, PreparedObservation) else self.prepare(obs)
        if prep.site_ids.shape[0] != xy.shape[0]:
            raise CoreError(f"likelihood: {xy.shape[0]} positions for {prep.site_ids.shape[0]} observations")
        return self.evaluate(xy.to(device=self.maps.device, dtype=self.maps.dtype), prep)

    @torch.no_grad()
    def terms(self, xy: torch.Tensor, obs) -> LikelihoodTerms:
        """The NLL at ``xy [B, 2]`` broken down per slot and feature (see :class:`LikelihoodTerms`)."""
        prep = obs if isinstance(obs, PreparedObservation) else self.prepare(obs)
        maps = self.maps
        xy = xy.to(device=maps.device, dtype=maps.dtype)
        raw, coverage = maps.sample(xy, paths=self.paths > 1), maps.coverage(xy)
        ids = prep.site_ids
        b, k = ids.shape
        g = torch.gather(maps.site_part(raw).permute(2, 0, 1), 2, ids.clamp(min=0).unsqueeze(1).expand(b, 4, k))  # [B, 4, K]
        slot = lambda v: torch.where(ids >= 0, torch.gather(v.t(), 1, ids.clamp(min=0)), 0.0)  # noqa: E731  [S, B] -> [B, K]
        cov = slot(coverage[:-1])
        r_pg, r_toa = slot(prep.o_pg) - g[:, 0], slot(prep.o_toa) - g[:, 1]
        uc, us = slot(prep.u_c), slot(prep.u_s)
        chord2 = (g[:, 2] - uc).square() + (g[:, 3] - us).square()
        r_aoa = torch.rad2deg(torch.atan2(us * g[:, 2] - uc * g[:, 3], uc * g[:, 2] + us * g[:, 3]))
        inv2 = torch.stack([slot(prep.inv2_pg), slot(prep.inv2_toa), slot(prep.inv2_aoa)], -1)  # m / sigma^2
        m = (inv2 > 0).to(maps.dtype)  # present and used
        z2 = torch.stack([r_pg.square(), r_toa.square(), chord2], -1) * inv2
        w = torch.as_tensor(self.w, dtype=maps.dtype, device=maps.device)
        correction = None
        if self.paths > 1:  # the most responsible path's residuals; the mixture's -log(pi_j / gamma_j) booked to ToA
            r_toa, r_aoa, z2, correction = self._path_terms(raw, prep, ids, inv2, r_pg)
        site = cov.unsqueeze(-1) * self.rho(z2) * w + (1 - cov).unsqueeze(-1) * self.w_miss * m
        if correction is not None:
            site[..., 1] += cov * correction
        residual = torch.where(m > 0, torch.stack([r_pg, r_toa, r_aoa], -1), 0.0)
        cell, c_res, c_z, c_cov = self._cell_terms(raw, coverage[-1], prep, b)
        silence = torch.zeros(b, dtype=maps.dtype, device=maps.device) if prep.unheard is None else \
            self._silence(maps.site_part(raw)[0], coverage[:-1], prep.unheard)
        total = site.sum((1, 2)) + cell.sum(-1) + silence
        return LikelihoodTerms(total, site, cell, residual, z2.sqrt(), cov, m > 0, c_res, c_z, c_cov, silence,
                               self.cell_features)

    def _path_terms(self, raw: torch.Tensor, prep: PreparedObservation, ids: torch.Tensor, inv2: torch.Tensor,
                    r_pg: torch.Tensor):
        """For :meth:`terms` with a mixture: ``(r_toa, r_aoa, z2 [B, K, 3], correction [B, K])`` against each slot's
        most responsible path component ``m*``; ``correction = mixture - r_m* = log(gamma_m* / omega_m*)`` [nats]."""
        b, k_slots = ids.shape
        chans, weight = self._components(raw, b, 1)  # [3, k, S, 4, B, 1], [4, B, 1]
        r, _ = self._path_rho(chans, prep, b, False)  # [k, S, 4, B, 1]
        a = self._log_omega(weight) - r
        flat = lambda v: v.transpose(1, 2).flatten(0, 1)  # noqa: E731  [k, S, 4, ...] -> [M, S, ...], m = 4 r + c
        r, a = flat(r), flat(a)
        lse = torch.logsumexp(a, 0)
        best = a.argmax(0)  # [S, B, 1]
        corr = (-lse - torch.gather(r, 0, best.unsqueeze(0))[0])[..., 0].t()  # [B, S]
        pick = best[..., 0].unsqueeze(0)  # [1, S, B]

        def sel(c):  # c [M, S, B] -> the best component's value per slot [B, K]
            return torch.gather(torch.gather(c, 0, pick)[0].t(), 1, ids.clamp(min=0))

        chans = chans[..., 0].transpose(2, 3).flatten(1, 2)  # [3, M, S, B]
        toa_j, cos_j, sin_j = (sel(chans[i]) for i in range(3))  # [B, K]
        uc = torch.where(ids >= 0, torch.gather(prep.u_c.t(), 1, ids.clamp(min=0)), 0.0)
        us = torch.where(ids >= 0, torch.gather(prep.u_s.t(), 1, ids.clamp(min=0)), 0.0)
        o_toa = torch.where(ids >= 0, torch.gather(prep.o_toa.t(), 1, ids.clamp(min=0)), 0.0)
        r_toa = o_toa - toa_j
        r_aoa = torch.rad2deg(torch.atan2(us * cos_j - uc * sin_j, uc * cos_j + us * sin_j))
        chord2 = (cos_j - uc).square() + (sin_j - us).square()
        z2 = torch.stack([r_pg.square(), r_toa.square(), chord2], -1) * inv2
        correction = torch.where(ids >= 0, torch.gather(corr, 1, ids.clamp(min=0)), 0.0)
        return r_toa, r_aoa, z2, correction

    def _cell_terms(self, raw: torch.Tensor, cov: torch.Tensor, prep: PreparedObservation, b: int):
        dt, dev = self.maps.dtype, self.maps.device
        if not self.cell_features:
            z = torch.zeros(b, 0, dtype=dt, device=dev)
            return z, z, z, cov
        cell = self.maps.cell_part(raw)
        m = (prep.inv2_cell > 0).to(dt).t()
        r = (prep.o_cell - cell).t() * m
        z2 = r.square() * prep.inv2_cell.t()
        wc = torch.as_tensor(self.wc, dtype=dt, device=dev)
        nats = cov.unsqueeze(-1) * self.rho(z2) * wc + (1 - cov).unsqueeze(-1) * self.cell_w_miss * m
        return nats, r, z2.sqrt(), cov
