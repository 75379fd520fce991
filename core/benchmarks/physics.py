"""``python -m core bench physics``: lookup, physics loss and refinement vs bare grid_sample.

On an analytic 7 x 512 x 512 map (:func:`core.synthetic.analytic_radio_map`) and for
each batch size it times, as the median of ``--repeats`` runs after a warm-up:

* ``lookup_fwd`` / ``lookup_fwdbwd``: :meth:`PreparedMaps.lookup` (angles on the circle,
  holes handled), forward, and forward + backward w.r.t. ``xy``;
* ``loss_fwdbwd``: :class:`PhysicsLoss` forward + backward w.r.t. ``xy``;
* ``refine5``: :func:`refine` with 5 steps (every sample moves);
* ``bare_fwd`` / ``bare_fwdbwd``: ONE plain ``F.grid_sample`` on the raw ``[1, F, H, W]``
  map with a ``[1, N, 1, 2]`` grid, forward, and forward + backward w.r.t. the grid;
  ``bare_fwdbwd_x5``: five of those in a row;

and the peak memory of the loss (forward + backward) and of the refinement. The two
sides of each ratio run interleaved (bare, ours, bare, ours, ...) so that background
load on a shared machine hits both alike; ``--threads`` (default 1) applies to both.

Peak memory is the peak of bytes allocated through torch's allocator during the
operation, above the level before it (see :class:`_PeakMemory`): on the CPU from the
allocator's alloc/free records (the profiler's ``profile_memory``), summed in time order
-- an exact running total of live tensor and scratch memory, not the per-operator sums
the profiler's tables print; on CUDA from ``torch.cuda.max_memory_allocated``. The
resident-set size of the process is NOT used: the kernel's RSS counters are batched
and miss short-lived buffers of a few MiB.

The summary holds the two target ratios at the largest batch and the memory check:
the part of peak memory that is not linear in N, ``peak(N) - slope * N`` with the slope
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

from core.device import resolve_device
from core.jobs import progress

LOSS_RATIO_TARGET = 2.0
REFINE_RATIO_TARGET = 3.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batches", default="1,256,4096,65536", help="comma-separated batch sizes (default: %(default)s)")
    parser.add_argument("--size", type=int, default=512, help="map height = width in cells (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=9, help="timed repeats per measurement; the median is kept (default: %(default)s)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads for both sides of every ratio (default: %(default)s; one thread gives stable "
        "timings on a small shared machine)",
    )
    parser.add_argument("--seed", type=int, default=0)


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
def run(args: argparse.Namespace) -> int:
    from core.benchmarks.report import write_report
    from core.errors import CoreError
    from core.physics.lookup import PreparedMaps
    from core.physics.physics_loss import PhysicsLoss
    from core.physics.refinement import refine
    from core.physics.synthetic import analytic_radio_map

    try:
        batches = [int(b) for b in str(args.batches).split(",") if b.strip()]
    except ValueError:
        raise CoreError(f"--batches: expected comma-separated integers, got {args.batches!r}") from None
    if not batches or min(batches) < 1:
        raise CoreError(f"--batches: batch sizes must be >= 1, got {args.batches!r}")
    if args.size < 2:
        raise CoreError(f"--size: must be >= 2, got {args.size}")
    if args.repeats < 1:
        raise CoreError(f"--repeats: must be >= 1, got {args.repeats}")
    if args.threads < 1:
        raise CoreError(f"--threads: must be >= 1, got {args.threads}")
    device = resolve_device(getattr(args, "device", "auto"))
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(args.seed)

    half = args.size  # 2 m cells
    radio_map = analytic_radio_map(height=args.size, width=args.size, bounds=(-half, -half, half, half))
    bare_map = torch.from_numpy(radio_map.values).unsqueeze(0).to(device)  # [1, F, H, W]
    prepared = PreparedMaps(radio_map, device=device)
    loss_fn = PhysicsLoss(prepared)
    memory = _PeakMemory(device)
    print(f"map {radio_map}, device {device}, {torch.get_num_threads()} thread(s), repeats {args.repeats}")

    rows = []
    total_work = len(batches)
    for b_i, n in enumerate(tqdm(batches, desc="bench physics", unit="batch")):
        progress.report(b_i / total_work, f"batch {n}")
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

        def bare_fwdbwd_x5():
            for _ in range(5):
                bare_fwdbwd()

        def lookup_fwd():
            with torch.no_grad():
                return prepared.lookup(xy)

        def lookup_fwdbwd():
            p = xy.detach().requires_grad_(True)
            return torch.autograd.grad(prepared.lookup(p).sum(), p)

        def loss_fwdbwd():
            p = xy.detach().requires_grad_(True)
            return torch.autograd.grad(loss_fn(p, observed).total, p)

        def refine5():
            with torch.no_grad():
                return refine(xy, observed, loss_fn, steps=5, lr=0.5)

        timings = {}
        timings["bare_fwd"], timings["lookup_fwd"] = _paired_ms([bare_fwd, lookup_fwd], args.repeats, device)
        timings["bare_fwdbwd"], timings["lookup_fwdbwd"], timings["loss_fwdbwd"] = _paired_ms(
            [bare_fwdbwd, lookup_fwdbwd, loss_fwdbwd], args.repeats, device
        )
        timings["bare_fwdbwd_x5"], timings["refine5"] = _paired_ms([bare_fwdbwd_x5, refine5], args.repeats, device)
        row = {"batch": n, **{f"{k}_ms": v for k, v in timings.items()}}
        row["loss_vs_bare"] = timings["loss_fwdbwd"] / timings["bare_fwdbwd"]
        row["refine5_vs_bare_x5"] = timings["refine5"] / timings["bare_fwdbwd_x5"]
        row["bare_fwdbwd_peak_MiB"] = memory.measure(bare_fwdbwd) / 2**20
        row["loss_fwdbwd_peak_MiB"] = memory.measure(loss_fwdbwd) / 2**20
        row["refine5_peak_MiB"] = memory.measure(refine5) / 2**20
        rows.append(row)
        truth = xy = observed = grid = None  # free this size before the next
    progress.report(1.0, "done", force=True)

    last = rows[-1]
    summary = {
        "date": date.today().isoformat(),
        "device": str(device),
        "threads": torch.get_num_threads(),
        "map": f"{radio_map.values.shape[0]}x{args.size}x{args.size}",
        "largest_batch": last["batch"],
        "loss_fwdbwd_vs_bare_fwdbwd": round(last["loss_vs_bare"], 3),
        "loss_target": f"<= {LOSS_RATIO_TARGET}",
        "loss_ok": bool(last["loss_vs_bare"] <= LOSS_RATIO_TARGET),
        "refine5_vs_5_bare_fwdbwd": round(last["refine5_vs_bare_x5"], 3),
        "refine_target": f"<= {REFINE_RATIO_TARGET}",
        "refine_ok": bool(last["refine5_vs_bare_x5"] <= REFINE_RATIO_TARGET),
    }
    summary.update(_memory_check(rows))
    write_report("physics", rows, args.out, summary)
    return 0


def _memory_check(rows: list[dict]) -> dict:
    """Is peak memory O(N)? Fit the slope between the two largest batches; the rest must be flat.

    ``const(N) = peak(N) - slope * N`` is the memory that does not scale with the batch
    (map-sized buffers, allocator granularity). It passes when ``const`` grows by less
    than 8 MiB (about one map copy: 7 x 512 x 512 float32 is 7 MiB) from the smallest to
    the largest batch, i.e. nothing map-sized is allocated per sample or per batch.
    """
    out: dict = {}
    if len(rows) < 2:
        return out
    a, b = rows[-2], rows[-1]
    for key in ("loss_fwdbwd_peak_MiB", "refine5_peak_MiB"):
        if any(r[key] != r[key] for r in rows):  # NaN: not measurable here
            out[f"{key}_O(N)_ok"] = None
            continue
        slope = (b[key] - a[key]) / (b["batch"] - a["batch"])  # MiB per point
        const = [r[key] - slope * r["batch"] for r in rows]
        name = key.removesuffix("_peak_MiB")
        out[f"{name}_bytes_per_point"] = round(slope * 2**20, 1)
        out[f"{name}_non_linear_MiB"] = [round(c, 2) for c in const]
        out[f"{name}_memory_O(N)_ok"] = bool(max(const) - const[0] < 8.0)
    return out
