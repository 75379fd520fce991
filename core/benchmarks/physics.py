"""``python -m core bench physics``: lookup, likelihoods and the MAP search vs bare grid_sample.

On an analytic 512 x 512 map with 5 sites (2 m cells; :func:`core.physics.synthetic.analytic_radio_map`:
7 serving features and the per-site layers ``site_path_gain``, ``site_toa``, ``site_aoa``
``[5, H, W]``) and for each batch size it times, as the median of ``--repeats`` runs after
a warm-up:

* serving map (the original physics loss): ``lookup_fwd`` / ``lookup_fwdbwd``
  (:meth:`PreparedMaps.lookup`), ``loss_fwdbwd`` (:class:`PhysicsLoss`), against
  ``bare_fwd`` / ``bare_fwdbwd``: plain ``F.grid_sample`` on the raw ``[1, 7, H, W]`` map
  (forward; forward + backward w.r.t. the grid);
* per-site layout (the calibrated likelihood, K = 4 slots): ``lik_fwdbwd``
  (:class:`RobustLikelihood` forward + backward w.r.t. ``xy`` on a prepared observation),
  ``lik_prep_fwdbwd`` (the same including :meth:`RobustLikelihood.prepare` of the
  observation), against ``site_bare_fwdbwd``: plain ``F.grid_sample`` forward + backward
  on the raw per-site layers ``[1, 3 S, H, W]``;

and peak memory of the loss and the likelihood. The two sides of each
ratio run interleaved (bare, ours, bare, ours, ...) so that background load on a shared
machine hits both alike; ``--threads`` (default 1) applies to both.

The MAP search (:class:`~core.physics.refinement.MapRefiner`, default settings: window
+-20 m at 2 m, 2 global blocks, pattern search to 0.5 m, 5 polish steps) is timed on
``--map-samples`` samples of an analytic dataset on the same map (network estimate =
truth + N(0, 4 m), 5 % gross misses of 100-150 m): ``map_ms_per_sample`` and its peak
memory per sample count, whose part not linear in N must stay flat (memory does not
scale with N beyond the outputs); these rows are the summary's ``map_search``. The
median and 90th percentile of the error before and after are recorded as a sanity check. At the
largest count the same search with starts from the exact scan (``scan_top`` =
:data:`SCAN_STARTS`, :mod:`core.physics.bounded_scan`; ``evaluate --scan-starts``) is timed too:
``map_scan_ms_per_sample``, its ratio to the default search measured in the same run, and
``map_scan_ok`` against :data:`MAP_SCAN_MS_TARGET` (issue 19: network + MAP within 2 ms).

The whole-walk estimator (:mod:`core.physics.trajectory`: the lattice scan bounded by blocks,
:mod:`core.physics.bounded_scan`, + snapshot MAP start, then the joint MAP of the walk's 8 reports) is timed on ``--walks`` walks of 8 reports at 0.2 s
on the same map, no network: ``walk_ms_per_walk`` (everything) and ``walk_smoother_ms_per_walk``
(the joint optimisation alone), against the target of 30 ms per walk (``walk_ok``); and the same with
up to 3 runner-up basins of the snapshot search as more starts (``walk_basins3_ms_per_walk``, its ratio to
the one start ``walk_basins3_vs_one_start``, ``walk_basins3_ok``; ``evaluate --walk-basins 3``).

Peak memory is the peak of bytes allocated through torch's allocator during the
operation, above the level before it (see :class:`_PeakMemory`): on the CPU from the
allocator's alloc/free records (the profiler's ``profile_memory``), summed in time order
-- an exact running total of live tensor and scratch memory, not the per-operator sums
the profiler's tables print; on CUDA from ``torch.cuda.max_memory_allocated``. The
resident-set size of the process is NOT used: the kernel's RSS counters are batched
and miss short-lived buffers of a few MiB.

The summary holds the target ratios at the largest batch and the memory checks: the
part of peak memory that is not linear in N, ``peak(N) - slope * N`` with the slope
fitted between the two largest batches, must stay flat across batch sizes.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from collections.abc import Callable
from datetime import date

import torch
import torch.nn.functional as F
from tqdm import tqdm

from core import cli_types, progress
from core.device import resolve_device

LOSS_RATIO_TARGET = 2.0
LIK_RATIO_TARGET = 2.0
MAP_MS_TARGET = 1.0
#: the MAP search with starts from the exact scan (``--scan-starts``): its starts and its target [ms/sample]
SCAN_STARTS = 6
MAP_SCAN_MS_TARGET = 2.0
NUM_SITES = 5


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batches", default="1,256,4096,65536", help="comma-separated batch sizes (default: %(default)s)")
    parser.add_argument("--size", type=cli_types.integer(2), default=512, help="map height = width in cells (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=9, help="timed repeats per measurement; the median is kept (default: %(default)s)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads for both sides of every ratio (default: %(default)s; one thread gives stable "
        "timings on a small shared machine)",
    )
    parser.add_argument("--map-samples", default="500,1000,2000",
                        help="sample counts for the MAP search row; the largest is timed (default: %(default)s)")
    parser.add_argument("--walks", type=cli_types.count, default=500,
                        help="walks timed for the whole-walk estimator (default: %(default)s)")
    parser.add_argument("--seed", type=cli_types.seed, default=0)


# -- measuring -------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_ms(fn: Callable[[], object], repeats: int, device: torch.device) -> float:
    return _paired_ms([fn], repeats, device)[0]


def _paired_ms(fns: list[Callable[[], object]], repeats: int, device: torch.device) -> list[float]:
    """Median milliseconds of each of ``fns``, run interleaved (a, b, a, b, ...) after a warm-up.

    Interleaving exposes every function to the same background load, so ratios between
    them are fair on a machine shared with other work.
    """
    for fn in fns:  # warm-up
        fn()
        fn()
    _sync(device)
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, acc in zip(fns, times):
            start = time.perf_counter()
            fn()
            _sync(device)
            acc.append(time.perf_counter() - start)
    return [1e3 * statistics.median(t) for t in times]


@contextlib.contextmanager
def _quiet_stderr():
    """Silence file descriptor 2 (the profiler's C++ start/stop log lines) for a moment."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


class _PeakMemory:
    """Peak torch memory allocated by a call, above the level before it.

    CUDA: the caching allocator's own peak counter. CPU: torch's allocator reports every
    allocation and free to the profiler (``profile_memory=True``); the peak is the
    maximum of the running sum of those byte deltas in time order. That counts every
    tensor and every kernel scratch buffer torch allocates (all go through its
    allocator), and nothing else (Python objects are not tensors' memory).
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def measure(self, fn: Callable[[], object]) -> float:
        """Bytes of peak allocation above the level before ``fn``."""
        fn()  # warm-up: lazy initialisation is not part of the operation
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            before = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            fn()
            torch.cuda.synchronize(self.device)
            return float(torch.cuda.max_memory_allocated(self.device) - before)
        from torch._C._profiler import _EventType
        from torch.profiler import ProfilerActivity, profile

        with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
        deltas = []
        stack = list(prof.profiler.kineto_results.experimental_event_tree())
        while stack:
            event = stack.pop()
            stack.extend(event.children)
            if event.typed[0] == _EventType.Allocation:
                deltas.append((event.start_time_ns, event.typed[1].alloc_size))
        deltas.sort()
        live = peak = 0
        for _, nbytes in deltas:
            live += nbytes
            peak = max(peak, live)
        return float(peak)


# -- the benchmark ---------------------------------------------------------------------------
def _bench_map(size: int):
    """The analytic map: ``size x size`` cells of 2 m, 5 sites at 25 m."""
    import numpy as np

    from core.physics.synthetic import analytic_radio_map

    half = float(size)  # 2 m cells
    f = np.array([[-0.6, -0.5], [0.55, -0.4], [0.0, 0.6], [-0.65, 0.5], [0.65, 0.55]])
    sites = np.concatenate([f * half, np.full((NUM_SITES, 1), 25.0)], axis=1)
    return analytic_radio_map(height=size, width=size, bounds=(-half, -half, half, half), sites=sites,
                              excess_ns=[0.0, 10.0, 0.0, 5.0, 0.0])


def _ints(text: str, flag: str) -> list[int]:
    from core.errors import CoreError

    try:
        values = [int(b) for b in str(text).split(",") if b.strip()]
    except ValueError:
        raise CoreError(f"{flag}: expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise CoreError(f"{flag}: values must be >= 1, got {text!r}")
    return values


def _serving_row(n, ctx, args, device, gen) -> dict:
    """The original serving-map rows at batch ``n`` (see the module doc)."""
    half, prepared, loss_fn, bare_map, memory = ctx["half"], ctx["prepared"], ctx["loss"], ctx["bare"], ctx["memory"]
    truth = (torch.rand(n, 2, generator=gen) * 2 - 1) * (0.9 * half)
    xy = (truth + 5.0 * torch.randn(n, 2, generator=gen)).to(device)
    with torch.no_grad():
        observed = prepared.lookup(truth.to(device))
    grid = (xy * (1.0 / half)).view(1, n, 1, 2)  # the same points, in grid_sample units

    def bare_fwd():
        with torch.no_grad():
            return F.grid_sample(bare_map, grid, mode="bilinear", padding_mode="border", align_corners=False)

    def bare_fwdbwd():
        g = grid.detach().requires_grad_(True)
        out = F.grid_sample(bare_map, g, mode="bilinear", padding_mode="border", align_corners=False)
        return torch.autograd.grad(out.sum(), g)

    def lookup_fwd():
        with torch.no_grad():
            return prepared.lookup(xy)

    def lookup_fwdbwd():
        p = xy.detach().requires_grad_(True)
        return torch.autograd.grad(prepared.lookup(p).sum(), p)

    def loss_fwdbwd():
        p = xy.detach().requires_grad_(True)
        return torch.autograd.grad(loss_fn(p, observed).total, p)

    t = {}
    t["bare_fwd"], t["lookup_fwd"] = _paired_ms([bare_fwd, lookup_fwd], args.repeats, device)
    t["bare_fwdbwd"], t["lookup_fwdbwd"], t["loss_fwdbwd"] = _paired_ms(
        [bare_fwdbwd, lookup_fwdbwd, loss_fwdbwd], args.repeats, device)
    row = {f"{k}_ms": v for k, v in t.items()}
    row["loss_vs_bare"] = t["loss_fwdbwd"] / t["bare_fwdbwd"]
    row["bare_fwdbwd_peak_MiB"] = memory.measure(bare_fwdbwd) / 2**20
    row["loss_fwdbwd_peak_MiB"] = memory.measure(loss_fwdbwd) / 2**20
    return row


def _site_row(n, ctx, args, device, gen) -> dict:
    """The per-site likelihood rows at batch ``n``: observations of random samples, points 5 m off."""
    lik, obs_all, truth_all, site_bare, memory = ctx["lik"], ctx["obs"], ctx["truth"], ctx["site_bare"], ctx["memory"]
    pick = torch.randint(0, len(truth_all), (n,), generator=gen)
    obs = obs_all.take(pick)
    xy = (truth_all[pick] + 5.0 * torch.randn(n, 2, generator=gen)).to(device)
    prep = lik.prepare(obs)
    grid = (xy * (1.0 / ctx["half"])).view(1, n, 1, 2)

    def site_bare_fwdbwd():
        g = grid.detach().requires_grad_(True)
        out = F.grid_sample(site_bare, g, mode="bilinear", padding_mode="border", align_corners=False)
        return torch.autograd.grad(out.sum(), g)

    def lik_fwdbwd():
        p = xy.detach().requires_grad_(True)
        return torch.autograd.grad(lik.evaluate(p, prep).sum(), p)

    def lik_prep_fwdbwd():
        p = xy.detach().requires_grad_(True)
        return torch.autograd.grad(lik(p, obs).sum(), p)

    t = dict(zip(("site_bare_fwdbwd", "lik_fwdbwd", "lik_prep_fwdbwd"),
                 _paired_ms([site_bare_fwdbwd, lik_fwdbwd, lik_prep_fwdbwd], args.repeats, device)))
    row = {f"{k}_ms": v for k, v in t.items()}
    row["lik_vs_site_bare"] = t["lik_fwdbwd"] / t["site_bare_fwdbwd"]
    row["lik_prep_vs_site_bare"] = t["lik_prep_fwdbwd"] / t["site_bare_fwdbwd"]
    row["lik_fwdbwd_peak_MiB"] = memory.measure(lik_fwdbwd) / 2**20
    return row


def _map_rows(ctx, args, counts: list[int], device) -> list[dict]:
    """The MAP search on ``counts`` samples: time (largest count) and peak memory (every count)."""
    from core.physics.refinement import MapRefiner, MapSearchConfig

    refiner = MapRefiner(ctx["lik"])
    scanning = MapRefiner(ctx["lik"], MapSearchConfig(scan_top=SCAN_STARTS))
    obs, truth, mu, sigma = ctx["map_obs"], ctx["map_truth"], ctx["map_mu"], ctx["map_sigma"]
    rows = []
    for n in counts:
        call = lambda n=n: refiner(mu[:n], sigma[:n], obs.take(slice(0, n)))  # noqa: E731
        row = {"map_samples": n, "map_peak_MiB": ctx["memory"].measure(call) / 2**20}
        if n == max(counts):
            ms = _median_ms(call, max(1, min(args.repeats, 3)), device)
            res = call()
            err0 = (mu[:n] - truth[:n]).norm(dim=1)
            err1 = (res.xy.cpu() - truth[:n]).norm(dim=1)
            row.update(map_ms=ms, map_ms_per_sample=ms / n, median_err_before_m=float(err0.median()),
                       median_err_after_m=float(err1.median()), p90_err_before_m=float(err0.quantile(0.9)),
                       p90_err_after_m=float(err1.quantile(0.9)))
            scan = lambda n=n: scanning(mu[:n], sigma[:n], obs.take(slice(0, n)))  # noqa: E731
            scan_ms = _median_ms(scan, max(1, min(args.repeats, 3)), device)
            err2 = (scan().xy.cpu() - truth[:n]).norm(dim=1)
            row.update(map_scan_ms_per_sample=scan_ms / n, map_scan_vs_map=scan_ms / ms,
                       median_err_after_scan_m=float(err2.median()), p90_err_after_scan_m=float(err2.quantile(0.9)))
        rows.append(row)
    return rows


def _context(args, device, gen, map_samples: int) -> dict:
    """Maps, losses and analytic observations shared by every row."""
    import numpy as np

    from core.physics.calibration import calibrate
    from core.physics.likelihood import LikelihoodConfig, RobustLikelihood
    from core.physics.lookup import PreparedMaps
    from core.physics.observation import site_observation
    from core.physics.physics_loss import PhysicsLoss
    from core.physics.synthetic import synthetic_dataset

    radio_map = _bench_map(args.size)
    prepared = PreparedMaps(radio_map, device=device)
    layers = [radio_map.layers[k] for k in ("site_path_gain", "site_toa", "site_aoa")]
    site_bare = torch.from_numpy(np.concatenate(layers)).unsqueeze(0).to(device)  # [1, 3S, H, W]
    n_ues = max(map_samples, 2000)
    data = synthetic_dataset(radio_map, n_ues, reports=4, k=4, seed=args.seed, nlos_prob=0.1)
    calibration = calibrate(data, radio_map, split=None)
    lik = RobustLikelihood(radio_map, calibration, LikelihoodConfig(cell_features=()), device=device)
    obs = site_observation(data)
    truth = torch.from_numpy(data.labels).float()
    mu = truth + 4.0 * torch.randn(n_ues, 2, generator=gen)
    miss = torch.rand(n_ues, generator=gen) < 0.05
    angle = torch.rand(int(miss.sum()), generator=gen) * 6.2832
    mu[miss] += (100 + 50 * torch.rand(int(miss.sum()), generator=gen)).unsqueeze(1) * torch.stack(
        [angle.cos(), angle.sin()], 1)
    mu = torch.maximum(torch.minimum(mu, lik.maps.hi.cpu()), lik.maps.lo.cpu())
    return {"radio_map": radio_map, "half": float(args.size), "prepared": prepared, "loss": PhysicsLoss(prepared),
            "bare": torch.from_numpy(radio_map.values).unsqueeze(0).to(device), "site_bare": site_bare, "lik": lik,
            "obs": obs, "truth": truth, "map_obs": obs, "map_truth": truth, "map_mu": mu,
            "map_sigma": torch.full((n_ues,), 4.0), "memory": _PeakMemory(device)}


def run(args: argparse.Namespace) -> int:
    from core.benchmarks.report import write_report
    from core.errors import CoreError

    batches = _ints(args.batches, "--batches")
    map_counts = _ints(getattr(args, "map_samples", "500,1000,2000"), "--map-samples")
    if args.size < 8:
        raise CoreError(f"--size: must be >= 8, got {args.size}")
    if args.repeats < 1:
        raise CoreError(f"--repeats: must be >= 1, got {args.repeats}")
    if args.threads < 1:
        raise CoreError(f"--threads: must be >= 1, got {args.threads}")
    device = resolve_device(getattr(args, "device", "auto"))
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(args.seed)
    ctx = _context(args, device, gen, max(map_counts))
    print(f"map {ctx['radio_map']}, {NUM_SITES} sites, device {device}, {torch.get_num_threads()} thread(s), "
          f"repeats {args.repeats}")
    rows = []
    total_work = len(batches) + 1
    for b_i, n in enumerate(tqdm(batches, desc="bench physics", unit="batch")):
        progress.report(b_i / total_work, f"batch {n}")
        rows.append({"batch": n, **_serving_row(n, ctx, args, device, gen), **_site_row(n, ctx, args, device, gen)})
    progress.report(len(batches) / total_work, "MAP search")
    map_rows = _map_rows(ctx, args, sorted(map_counts), device)
    progress.report(0.95, "whole-walk")
    summary = _summary(rows, map_rows, args, device)
    summary.update(_walk_row(ctx, args))
    progress.report(1.0, "done", force=True)
    write_report("physics", rows, args.out, summary)
    return 0


#: the whole-walk estimator's budget per walk [ms] (issue 21)
WALK_MS_TARGET = 30.0
#: runner-up basins of the timed arm with more starts (evaluate --walk-basins)
WALK_BASINS = 3


def _walk_row(ctx, args) -> dict:
    """The whole-walk estimator's cost per walk (see the module doc), after a warm-up on a few walks."""
    import numpy as np

    from core.physics.refinement import MapRefiner
    from core.physics.synthetic import synthetic_dataset
    from core.physics.trajectory import WalkConfig, WalkSmoother, walk_observation, whole_walk

    if args.walks < 1:
        return {}
    data = synthetic_dataset(ctx["radio_map"], args.walks, reports=8, k=4, seed=args.seed + 1, nlos_prob=0.1,
                             report_interval_s=0.2, speed_mps=(0.5, 1.5))
    refiner = MapRefiner(ctx["lik"])
    idx = np.arange(args.walks)
    whole_walk(data, idx[: min(8, args.walks)], refiner)  # warm-up
    res = whole_walk(data, idx, refiner)
    obs, t = walk_observation(data, idx)
    t0 = time.perf_counter()
    WalkSmoother(ctx["lik"])(obs, t, res.xy)
    smoother_s = time.perf_counter() - t0
    basins = whole_walk(data, idx, refiner, WalkConfig(basins=WALK_BASINS))
    err = np.linalg.norm(res.xy.cpu().numpy() - data.labels, axis=1)
    ms = 1000.0 * res.seconds / args.walks
    ms_basins = 1000.0 * basins.seconds / args.walks
    return {"walks": args.walks, "walk_ms_per_walk": round(ms, 3),
            f"walk_basins{WALK_BASINS}_ms_per_walk": round(ms_basins, 3),
            f"walk_basins{WALK_BASINS}_vs_one_start": round(ms_basins / ms, 3),
            f"walk_basins{WALK_BASINS}_ok": bool(ms_basins <= WALK_MS_TARGET),
            "walk_smoother_ms_per_walk": round(1000.0 * smoother_s / args.walks, 3),
            "walk_target": f"<= {WALK_MS_TARGET} ms/walk", "walk_ok": bool(ms <= WALK_MS_TARGET),
            "walk_median_err_m": round(float(np.median(err)), 3)}


def _summary(rows: list[dict], map_rows: list[dict], args, device) -> dict:
    last, top = rows[-1], map_rows[-1]
    summary = {
        "date": date.today().isoformat(),
        "device": str(device),
        "threads": torch.get_num_threads(),
        "map": f"7x{args.size}x{args.size} serving + {NUM_SITES} sites x 3 layers",
        "largest_batch": last["batch"],
        "loss_fwdbwd_vs_bare_fwdbwd": round(last["loss_vs_bare"], 3),
        "loss_target": f"<= {LOSS_RATIO_TARGET}",
        "loss_ok": bool(last["loss_vs_bare"] <= LOSS_RATIO_TARGET),
        "lik_fwdbwd_vs_site_bare_fwdbwd": round(last["lik_vs_site_bare"], 3),
        "lik_prep_fwdbwd_vs_site_bare_fwdbwd": round(last["lik_prep_vs_site_bare"], 3),
        "lik_target": f"<= {LIK_RATIO_TARGET}",
        "lik_ok": bool(last["lik_vs_site_bare"] <= LIK_RATIO_TARGET),
        "map_samples": top["map_samples"],
        "map_ms_per_sample": round(top["map_ms_per_sample"], 4),
        "map_target": f"<= {MAP_MS_TARGET} ms/sample",
        "map_ok": bool(top["map_ms_per_sample"] <= MAP_MS_TARGET),
        "map_scan_starts": SCAN_STARTS,
        "map_scan_ms_per_sample": round(top["map_scan_ms_per_sample"], 4),
        "map_scan_vs_map": round(top["map_scan_vs_map"], 3),
        "map_scan_target": f"<= {MAP_SCAN_MS_TARGET} ms/sample",
        "map_scan_ok": bool(top["map_scan_ms_per_sample"] <= MAP_SCAN_MS_TARGET),
    }
    summary.update(_memory_check(rows, "batch", ("loss_fwdbwd_peak_MiB", "lik_fwdbwd_peak_MiB")))
    summary.update(_memory_check(map_rows, "map_samples", ("map_peak_MiB",)))
    summary["map_search"] = [{k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()} for r in map_rows]
    return summary


def _memory_check(rows: list[dict], by: str, keys) -> dict:
    """Is peak memory O(N)? Fit the slope between the two largest sizes; the rest must be flat.

    ``const(N) = peak(N) - slope * N`` is the memory that does not scale with ``N``
    (map-sized buffers, a search chunk's working set, allocator granularity). It passes
    when ``const`` grows by less than 8 MiB (about one serving-map copy: 7 x 512 x 512
    float32 is 7 MiB) from the smallest to the largest size, i.e. nothing map-sized is
    allocated per sample or per batch, and the MAP search's working set does not grow
    with N (its slope is its outputs).
    """
    out: dict = {}
    if len(rows) < 2:
        return out
    a, b = rows[-2], rows[-1]
    for key in keys:
        if any(r[key] != r[key] for r in rows):  # NaN: not measurable here
            out[f"{key}_O(N)_ok"] = None
            continue
        slope = (b[key] - a[key]) / (b[by] - a[by])  # MiB per point
        const = [r[key] - slope * r[by] for r in rows]
        name = key.removesuffix("_peak_MiB")
        out[f"{name}_bytes_per_point"] = round(slope * 2**20, 1)
        out[f"{name}_non_linear_MiB"] = [round(c, 2) for c in const]
        out[f"{name}_memory_O(N)_ok"] = bool(max(const) - const[0] < 8.0)
    return out
