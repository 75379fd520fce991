"""Link abstraction: SINR -> MCS, transport-block error rate and throughput (Sionna SYS).

For each SINR (a wideband, effective SINR) :class:`sionna.sys.InnerLoopLinkAdaptation`
picks the highest MCS of the NR PDSCH MCS table whose TBLER is at most the BLER
target, and :class:`sionna.sys.PHYAbstraction` gives that MCS's TBLER and
transport-block size. Then::

    bler       = TBLER(MCS, SINR)                                   [1]
    throughput = TBS(MCS, n_RE) * (1 - bler) / T_slot / 1e6         [Mbit/s]

the expected (not sampled) goodput of a UE given the whole carrier every slot.
The mapping depends on the SINR only, so it is tabulated once on a 0.01 dB grid over
[-30, 50] dB and read by rounding to the nearest grid point (an error below 0.005 dB
of SINR); SINR outside the grid is clipped to it (the tables saturate there).

Assumptions (:class:`LinkConfig`, recorded in store attrs): 51 PRBs (20 MHz at
30 kHz SCS), 14-symbol slot of 0.5 ms with 12 data symbols (2 DMRS), one layer,
so ``n_RE = 51 * 12 * 12 = 7344``; PDSCH MCS table 1 (up to 64-QAM); BLER target 0.1.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class LinkConfig:
    """Link-abstraction assumptions.

    Attributes:
        num_prbs: allocated physical resource blocks (12 subcarriers each).
        data_symbols_per_slot: OFDM symbols carrying data in a slot.
        slot_duration_s: slot duration [s] (30 kHz SCS).
        mcs_table_index: NR MCS table (1: 64-QAM, 2: 256-QAM, ...).
        mcs_category: 1 = PDSCH (downlink), 0 = PUSCH.
        bler_target: link-adaptation BLER target.
    """

    num_prbs: int = 51
    data_symbols_per_slot: int = 12
    slot_duration_s: float = 0.5e-3
    mcs_table_index: int = 1
    mcs_category: int = 1
    bler_target: float = 0.1

    @property
    def num_allocated_re(self) -> int:
        return self.num_prbs * 12 * self.data_symbols_per_slot

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(num_allocated_re=self.num_allocated_re, num_layers=1,
                 method="sionna.sys InnerLoopLinkAdaptation + PHYAbstraction, expected goodput")
        return d


class LinkAbstraction:
    """Maps SINR [dB] to (throughput [Mbit/s], bler [1], mcs) with Sionna SYS; CPU, float32."""

    SINR_GRID_DB = (-30.0, 50.0, 0.01)  # min, max, step of the tabulation

    def __init__(self, config: LinkConfig = LinkConfig()) -> None:
        import os

        import sionna.sys
        import torch
        from sionna.sys import InnerLoopLinkAdaptation, PHYAbstraction

        self.config = config
        self._torch = torch
        kind = "PDSCH" if config.mcs_category == 1 else "PUSCH"
        table = os.path.join(os.path.dirname(sionna.sys.__file__), "bler_tables",
                             f"{kind}_table{config.mcs_table_index}.json")
        self._phy = PHYAbstraction(load_bler_tables_from=[table], device="cpu")
        self._illa = InnerLoopLinkAdaptation(self._phy, bler_target=config.bler_target, device="cpu")
        lo, hi, step = self.SINR_GRID_DB
        self._grid = np.round(np.arange(lo, hi + step / 2, step), 6)
        self._table = self._evaluate(self._grid)

    def __call__(self, sinr_db: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``sinr_db [...]`` -> ``(throughput [...] Mbit/s, bler [...] in [0, 1], mcs [...] int16)``.

        Non-finite SINR gives NaN throughput and BLER and MCS -1.
        """
        sinr_db = np.asarray(sinr_db, dtype=np.float64)
        lo, _, step = self.SINR_GRID_DB
        finite = np.isfinite(sinr_db)
        k = np.clip(np.rint((np.where(finite, sinr_db, lo) - lo) / step), 0, len(self._grid) - 1).astype(np.int64)
        thr_t, bler_t, mcs_t = self._table
        thr = np.where(finite, thr_t[k], np.nan).astype(np.float32)
        bler = np.where(finite, bler_t[k], np.nan).astype(np.float32)
        mcs = np.where(finite, mcs_t[k], -1).astype(np.int16)
        return thr, bler, mcs

    def _evaluate(self, sinr_db: np.ndarray, chunk: int = 65_536):
        """Sionna SYS at every SINR of the 1-D array ``sinr_db``: (throughput, bler, mcs)."""
        torch = self._torch
        cfg = self.config
        flat = np.asarray(sinr_db, dtype=np.float64)
        thr = np.empty(flat.shape, np.float32)
        bler = np.empty(flat.shape, np.float32)
        mcs = np.empty(flat.shape, np.int16)
        for start in range(0, len(flat), chunk):
            sel = slice(start, start + chunk)
            sinr = torch.tensor(10 ** (flat[sel] / 10), dtype=torch.float32)
            n_re = torch.full(sinr.shape, cfg.num_allocated_re, dtype=torch.int32)
            with torch.no_grad():
                m = self._illa(sinr_eff=sinr, num_allocated_re=n_re, mcs_table_index=cfg.mcs_table_index,
                               mcs_category=cfg.mcs_category)
                _, _, _, tbler, _ = self._phy(m, sinr_eff=sinr, num_allocated_re=n_re,
                                              mcs_table_index=cfg.mcs_table_index, mcs_category=cfg.mcs_category)
                tb_size = self._tb_size(m, n_re)
            tbler = tbler.clamp(0.0, 1.0)
            thr[sel] = (tb_size * (1.0 - tbler) / cfg.slot_duration_s / 1e6).numpy()
            bler[sel] = tbler.numpy()
            mcs[sel] = m.numpy().astype(np.int16)
        return thr.reshape(sinr_db.shape), bler.reshape(sinr_db.shape), mcs.reshape(sinr_db.shape)

    def _tb_size(self, mcs, n_re):
        """Transport-block size [bits] of ``mcs`` on ``n_re`` resource elements (float32)."""
        cfg = self.config
        # PHYAbstraction keeps the MCS decoder and TB-size function it was built with;
        # reuse them so the size matches the TBLER above.
        mod, rate = self._phy._mcs_decoder_fun(mcs, cfg.mcs_table_index, cfg.mcs_category)
        tb_size, _, _ = self._phy._transport_block_info(mod, rate, mod * n_re)
        return tb_size.to(self._torch.float32)


_CACHE: dict[LinkConfig, LinkAbstraction] = {}


def link_abstraction(config: LinkConfig = LinkConfig()) -> LinkAbstraction:
    """A shared :class:`LinkAbstraction` per config (building one takes seconds)."""
    if config not in _CACHE:
        _CACHE[config] = LinkAbstraction(config)
    return _CACHE[config]
