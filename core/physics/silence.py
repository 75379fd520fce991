"""Silence: the sites a UE did NOT report, as evidence about where it is.

A report lists the sites received at or above the sensitivity, ``P_tx + G~_s >= S_rx``
(``G~`` the measured, noisy path gain; :mod:`core.raytracing.measurements`), strongest
first, in up to ``K`` slots. A report with a FREE slot therefore also says that every other
site was below the sensitivity at the UE. Where the map predicts site ``s`` loud, that
silence is unlikely::

    G_thr = S_rx - P_tx                                                         [dB]
    P(s unheard | p) = eps + (1 - eps) Phi((G_thr - b_s - G_s(p)) / sigma_s)
    NLL_silence(p)   = - sum_{s unheard} c_s(p) log P(s unheard | p)            [nats]

with ``G_s(p)`` the map's path gain of site ``s`` (bilinear, as every lookup), ``b_s`` and
``sigma_s`` its calibrated path-gain bias and scale (measured = map + b + noise), ``Phi``
the standard normal CDF, and ``c_s(p)`` the map's coverage: where the map has no path from
``s`` the site cannot be heard (probability 1, no cost). ``eps`` is the share of silent
sites that the map predicts loud anyway (a path the twin has and the world blocks), fitted
by maximum likelihood at the TRUE positions of the calibration split
(:func:`fit_silence`); it bounds the cost of one silent site at ``-log eps``, so an
imperfect twin cannot veto the truth.

Which sites are unheard (:func:`unheard_sites`): of a pooled observation (the reports of the
last ``window_s``), the sites reported in none of them, when the LATEST report had a free
slot (a full report may have dropped a site that was heard). Without a sensitivity
(``--sensitivity-dbm off``) every site is reported up to ``K``: silence says nothing and is off.

The likelihood adds this term when its config asks for it
(:attr:`~core.physics.likelihood.LikelihoodConfig.silence`) and the observation carries
``room`` (:class:`~core.physics.observation.SiteObservation`); the network's physics term in
training does not use it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from core.errors import CoreError

__all__ = ["Silence", "unheard_sites", "silence_cost", "silence_nll", "silence_threshold_db", "fit_silence", "outlier_share",
           "DEFAULT_OUTLIER"]

#: eps when nothing is fitted (a held-out scene: no labels to fit on)
DEFAULT_OUTLIER = 0.02
#: eps is fitted in [this, 0.5]
_MIN_OUTLIER = 1e-4


@dataclass(frozen=True)
class Silence:
    """The silence term's constants: ``threshold_db`` ``G_thr`` [dB]; ``outlier`` ``eps`` in (0, 1);
    ``count`` the (report, covered site) pairs it was fitted on (0: :data:`DEFAULT_OUTLIER`)."""

    threshold_db: float
    outlier: float = DEFAULT_OUTLIER
    count: int = 0

    def __post_init__(self) -> None:
        if not math.isfinite(self.threshold_db):
            raise CoreError(f"silence: threshold_db must be finite, got {self.threshold_db}")
        if not 0.0 < self.outlier < 1.0:
            raise CoreError(f"silence: outlier must be in (0, 1), got {self.outlier}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Silence:
        return cls(float(d["threshold_db"]), float(d["outlier"]), int(d.get("count", 0)))


def unheard_sites(site_ids, room, num_sites: int) -> torch.Tensor:
    """Bool ``[S, B]``: site ``s`` unheard by sample ``b`` (not in its slots, and its report had room).

    site_ids: integer ``[B, K]`` (-1 = empty slot; a pooled observation's slots: every site heard in
    the window); room: bool ``[B]``, the latest report had a free slot.
    """
    ids = torch.as_tensor(site_ids)
    b = ids.shape[0]
    heard = torch.zeros(num_sites + 1, b, dtype=torch.bool, device=ids.device)
    heard[torch.where(ids >= 0, ids, num_sites), torch.arange(b, device=ids.device).unsqueeze(1).expand_as(ids)] = True
    return ~heard[:num_sites] & torch.as_tensor(room, device=ids.device).bool().unsqueeze(0)


def silence_cost(gain: torch.Tensor, bias: torch.Tensor, scale: torch.Tensor, silence: Silence) -> torch.Tensor:
    """``-log P(s unheard | p)`` [nats] per site, ``[S, ...]`` like ``gain`` (module doc).

    gain: the map's path gain of each site ``[S, ...]`` [dB]; bias, scale: ``[S]`` [dB], the calibrated
    path-gain bias and scale. Differentiable in ``gain``; in ``[0, -log eps]``.
    """
    shape = (-1,) + (1,) * (gain.ndim - 1)
    z = (silence.threshold_db - bias.view(shape) - gain) / scale.view(shape)
    eps = silence.outlier
    return -torch.log(eps + (1.0 - eps) * torch.special.ndtr(z))


def silence_nll(gain: torch.Tensor, cover: torch.Tensor, unheard, bias: torch.Tensor, scale: torch.Tensor,
                silence: Silence) -> torch.Tensor:
    """``- sum_s unheard_s c_s log P(s unheard)`` [nats]: :func:`silence_cost` summed over the first axis.

    cover: 0/1 ``[S, ...]`` (the map has a path from the site); unheard: 0/1, broadcastable to ``gain``.
    """
    return (silence_cost(gain, bias, scale, silence) * cover * unheard).sum(0)


def silence_threshold_db(dataset, radio_map) -> float | None:
    """``G_thr = S_rx - P_tx`` [dB]: the dataset's recorded sensitivity minus the map's transmit power;
    None when the measurement model has no sensitivity (or records none)."""
    from core.raytracing.coverage import heard_threshold_db, map_tx_power_dbm

    model = dataset.measurement_model
    if model is None or model.sensitivity_dbm is None:
        return None
    return heard_threshold_db(map_tx_power_dbm(radio_map), model.sensitivity_dbm)


def fit_silence(dataset, maps, calibration, threshold_db: float, split: str | None = "train",
                chunk: int = 65536) -> Silence:
    """The silence term at ``threshold_db`` (:func:`silence_threshold_db`) on ``maps`` (a SiteMaps), with
    ``eps`` fitted at the truth of ``dataset[split]`` (module doc).

    Every present report with a free slot gives, per site the map covers at the report's true position
``p_i``, ``Phi_i = Phi((G_thr - b_s - G_s(p_i)) / sigma_s)`` and whether the site was heard. Heard
sites have probability ``(1 - eps)(1 - Phi_i)``, unheard ones ``eps + (1 - eps) Phi_i``; ``eps`` maximises
their joint likelihood, by EM over the latent "silent whatever the map says" part: responsibility
``r_i = eps / (eps + (1 - eps) Phi_i)`` for an unheard site, 0 for a heard one, ``eps <- sum r_i / n``
(200 steps, kept in [1e-4, 0.5]). (Unheard sites alone would not identify ``eps``: silence is always
at least as likely with a larger one.)
    """
    threshold = float(threshold_db)
    indices = np.arange(dataset.num_samples) if split is None else dataset.indices(split)
    ids = np.asarray(dataset.site_ids[indices])  # [n, T, K]
    present = np.asarray(dataset.report_mask[indices]) & (ids[..., 0] >= 0)
    room = present & ((ids >= 0).sum(-1) < ids.shape[-1])
    xy = np.asarray(dataset.ue_xyz[indices])[room][:, :2]
    ids = ids[room]
    if not len(xy):
        return Silence(threshold)
    s_n = maps.num_sites
    bias = torch.as_tensor(calibration.bias[:, 0], dtype=maps.dtype)
    scale = torch.as_tensor(calibration.scale[:, 0], dtype=maps.dtype)
    phis, heard = [], 0
    with torch.no_grad():
        for s in range(0, len(xy), chunk):
            p = torch.as_tensor(xy[s:s + chunk], dtype=maps.dtype)
            gain = maps.site_part(maps.sample(p))[0]  # [S, n]
            cover = maps.coverage(p)[:s_n] > 0.5
            silent = unheard_sites(torch.as_tensor(ids[s:s + chunk].astype(np.int64)),
                                   torch.ones(len(p), dtype=torch.bool), s_n)
            z = (threshold - bias.unsqueeze(1) - gain) / scale.unsqueeze(1)
            phi = torch.special.ndtr(z).double()
            phis.append(phi[silent & cover].numpy())
            heard += int((~silent & cover).sum())
    phi = np.concatenate(phis)
    if not phi.size:
        return Silence(threshold)
    return Silence(threshold, outlier_share(phi, heard), int(phi.size + heard))


def outlier_share(phi: np.ndarray, heard: int, steps: int = 200) -> float:
    """``eps`` maximising ``sum_i log(eps + (1 - eps) phi_i) + heard log(1 - eps)`` (:func:`fit_silence`), by EM.

    phi: ``Phi_i`` of the unheard (report, site) pairs ``[M]``; heard: the number of heard pairs.
    """
    phi = np.asarray(phi, dtype=np.float64)
    n = phi.size + int(heard)
    if n == 0:
        return DEFAULT_OUTLIER
    eps = DEFAULT_OUTLIER
    for _ in range(steps):  # the responsibility of the "silent whatever the map says" part
        eps = float(np.clip(np.sum(eps / (eps + (1 - eps) * phi)) / n, _MIN_OUTLIER, 0.5))
    return eps
