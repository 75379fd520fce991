"""``python -m core ablate [--quick] --scene etoile --out runs/ablation [--set k=v ...]``.

Does the physics term help? Arms, all on ``configs/model.yaml`` plus the plan's overrides
(:data:`PLANS`; ``--set`` on top, for every arm):

* λ_phys ∈ {0, λ*}: λ* is tuned on the val split FOR EACH label fraction (the physics term does
  different work at each: on unlabelled walks it is the only signal, at 100 % labels only the
  offset term acts), on the random split with the first seed, over the plan's small grid (the
  λ > 0 with the lowest val median); the arm is "transformer λ*" and every row shows the λ applied;
* test-time refinement off / on (the run's refinement settings, through
  :func:`core.learning.evaluation.evaluate_run`);
* label fractions (``data.label_fraction``: the other train walks give only the physics term);
* the random and the spatial split (``data.split``);
* the same seeds for every arm (paired: seed ``s`` of every arm has the same labelled walks,
  initial weights and batch order, and every arm is tested on the same UEs);
* next to the baselines (kNN fingerprinting, ML map matching, multilateration and exhaustive map
  matching -- the calibrated likelihood searched over the whole map with no network; no training,
  so one "seed"; all on the reports of the one report window).

For each (split, label fraction, refinement) the λ* arm and the baselines are compared with the
λ = 0 arm of the same split, fraction and refinement: mean ± sd over seeds of the test median,
P90 and RMSE, and the change in each with its 95 % CI from the paired two-level bootstrap of
:mod:`core.learning.statistics` (seeds, then UEs), overall and per UE group
(:func:`core.learning.groups.ue_groups`: LOS / NLOS at the latest present report, last report
missing, sites heard 1 / 2 / 3 / >= 4, sparse).

Written to ``--out``:

* ``table.csv`` (every number; one row per split, fraction, refinement, group, arm) and
  ``table.md`` (the same, readable, with the plan in its header);
* ``curve.csv``: median vs label fraction per split, refinement and arm, with its 95 % CI band
  (two-level bootstrap of the median itself) and the change against λ = 0 with its CI;
* ``cdf.json``: test error CDFs (all seeds pooled) per ``"<split> split, <p> % labels"`` block;
* ``tuning.csv``, ``summary.json`` (plan, λ*, wall time, machine);
* ``runs/<split>-f<fraction>-s<seed>-lam<λ>/``: each training run. A run whose status is done
  is not retrained (its test errors are cached in ``ablation_test.npz``); a killed run resumes
  from its ``last.pt``. A cached run trained with another config is refused (use another --out).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from core import cli_types, progress, resolve_path
from core.errors import CoreError
from core.learning.config import Config, load_config
from core.learning.groups import GROUP_LABELS
from core.learning.metrics import error_cdf
from core.learning.statistics import compare_arms, paired_delta
from core.stores.atomic import atomic_path, atomic_write_text
from core.stores.lock import output_lock
from core.stores.output import check_replaceable, check_writable, holds_only
from core.stores.run import ABLATION_TEST, LAST, is_run_file, read_config, read_status

BASE_CONFIG = "configs/model.yaml"
#: the UE groups of the tables (:func:`core.learning.groups.ue_groups`)
GROUPS = ("all", "los", "nlos", "last_missing", "sites_1", "sites_2", "sites_3", "sites_4+", "sparse")
DELTA_METRICS = ("median_m", "p90_m", "rmse_m")


@dataclass(frozen=True)
class Plan:
    """An ablation's grid: overrides on ``configs/model.yaml`` for every arm, then the arms."""

    name: str
    overrides: tuple[str, ...]
    seeds: tuple[int, ...] = (0, 1, 2)
    fractions: tuple[float, ...] = (0.05, 0.2, 1.0)
    splits: tuple[str, ...] = ("random", "spatial")
    lambda_grid: tuple[float, ...] = (0.3, 1.0, 3.0, 10.0)
    n_boot: int = 1000


#: ``full`` fits the 90-minute budget on the shared 2-core CPU; ``quick`` a 5-minute smoke run
PLANS: dict[str, Plan] = {
    "full": Plan("full", ("model.preset=small", "training.epochs=16", "training.early_stopping_patience=0",
                          "physics_loss.warmup_epochs=2", "physics_loss.ramp_epochs=2")),
    "quick": Plan("quick", ("model.preset=tiny", "training.epochs=2", "training.warmup_epochs=0",
                            "training.early_stopping_patience=0", "data.max_samples=2000",
                            "physics_loss.warmup_epochs=0", "physics_loss.ramp_epochs=1"),
                  lambda_grid=(0.1, 0.5), n_boot=200),
}


def _pct(fraction: float) -> str:
    return f"{100 * fraction:g} %"


def run_name(split: str, fraction: float, seed: int, lam: float) -> str:
    return f"{split}-f{fraction:g}-s{seed}-lam{lam:g}"


def arm_config(base: list[str], split: str, fraction: float, seed: int, lam: float) -> Config:
    return load_config(resolve_path(BASE_CONFIG), [*base, f"data.split={split}", f"data.label_fraction={fraction}",
                                                   f"seed={seed}", f"physics_loss.lambda_phys={lam}"])


# -- training and evaluating one arm ------------------------------------------------------------
def _check_cached(run_dir: Path, config: Config) -> None:
    """Refuse a finished run that was trained with another config than ``config``."""
    have, want = read_config(run_dir).to_dict(), config.to_dict()
    have["physics_loss"].pop("feature_weights"), want["physics_loss"].pop("feature_weights")  # "auto" is resolved
    for section in want:
        if have.get(section) != want[section]:
            raise CoreError(f"{run_dir}: trained with another {section!r} config than this ablation asks for; "
                            "use another --out (or remove that run)")


def ensure_trained(config: Config, run_dir: Path, stores, device, show_progress: bool) -> bool:
    """Train ``config`` into ``run_dir`` unless it is done there (resume a killed run); True when it trained."""
    from core.learning.scene_data import apply_data_config, prepare
    from core.learning.training import train

    if read_status(run_dir).get("state") == "done":
        _check_cached(run_dir, config)
        return False
    if run_dir.exists() and not (run_dir / LAST).exists() and holds_only(run_dir, is_run_file):
        shutil.rmtree(run_dir)  # killed before its first epoch ended: nothing to resume
    dataset, radio_map = stores
    run_data = prepare(config, apply_data_config(config, dataset, radio_map), radio_map)
    train(config, run_dir, resume=True, device=device, run_data=run_data, show_progress=show_progress)
    (run_dir / ABLATION_TEST).unlink(missing_ok=True)
    return True


def test_errors(run_dir: Path, stores, device) -> dict[str, np.ndarray]:
    """Test errors without and with refinement, and the UE groups (cached in ``ablation_test.npz``)."""
    from core.learning.evaluation import evaluate_run
    from core.learning.inference import load_run

    cache = run_dir / ABLATION_TEST
    if cache.exists():
        with np.load(cache) as z:
            return {k: z[k] for k in z.files}
    run = load_run(run_dir, device=device, stores=stores)
    res = evaluate_run(run_dir, "test", refine=True, run=run, keep_errors=True)
    idx = run.dataset.indices("test")
    data = run.tensors(idx)
    out = {"off": res["_errors"]["model"], "on": res["_errors"]["model_refined"], "indices": idx,
           "los": data.los.numpy(), "num_reports": data.num_reports.numpy()}
    with atomic_path(cache) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, **out)
    return out


def baseline_errors(out: Path, split: str, config: Config, stores) -> dict[str, np.ndarray]:
    """The baselines' test errors on ``split`` (:func:`~core.learning.baselines.run_baselines`; cached in
    ``baselines-<split>.npz``, recomputed when the cache lacks exhaustive map matching)."""
    from core.learning.baselines import run_baselines
    from core.learning.metrics import position_errors
    from core.learning.scene_data import apply_data_config

    cache = out / f"baselines-{split}.npz"
    if cache.exists():
        with np.load(cache) as z:
            if "exhaustive" in z.files:
                return {k: z[k] for k in z.files}
    dataset = apply_data_config(config, *stores)
    idx = dataset.indices("test")
    est = run_baselines(dataset, stores[1], idx, config)
    result = {name: position_errors(xy, dataset.labels[idx]) for name, xy in est.items()}
    with atomic_path(cache) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, **result)
    return result


# -- the grid ---------------------------------------------------------------------------------------
def tune_lambda(plan: Plan, base: list[str], out: Path, stores, device, show_progress: bool):
    """``({label fraction: λ*}, rows)``: per label fraction, the λ > 0 of the grid with the lowest val
    median (random split, first seed; the λ = 0 run is trained too, for the record and for reuse)."""
    split = "random" if "random" in plan.splits else plan.splits[0]
    rows, lam_star = [], {}
    for fraction in plan.fractions:
        for lam in (0.0, *plan.lambda_grid):
            config = arm_config(base, split, fraction, plan.seeds[0], lam)
            run_dir = out / "runs" / run_name(split, fraction, plan.seeds[0], lam)
            progress.report(0.0, f"tuning lambda_phys at {_pct(fraction)} labels: {lam:g}")
            ensure_trained(config, run_dir, stores, device, show_progress)
            rows.append({"lambda_phys": lam, "split": split, "label_fraction": fraction, "seed": plan.seeds[0],
                         "val_median_m": read_status(run_dir).get("best_val_median_m")})
        best = min((r for r in rows if r["label_fraction"] == fraction and r["lambda_phys"] > 0),
                   key=lambda r: r["val_median_m"])
        lam_star[fraction] = best["lambda_phys"]
    return lam_star, rows


def collect_errors(plan: Plan, base: list[str], lam_star: dict[float, float], out: Path, stores, device,
                   show_progress: bool) -> dict[tuple, Any]:
    """Train (or reuse) every arm and seed; ``{(split, fraction, lam): [per-seed test errors dict]}``."""
    keys = [(sp, f, lam) for sp in plan.splits for f in plan.fractions for lam in (0.0, lam_star[f])]
    total, done = len(keys) * len(plan.seeds), 0
    errors: dict[tuple, Any] = {}
    for split, fraction, lam in keys:
        per_seed = []
        for seed in plan.seeds:
            config = arm_config(base, split, fraction, seed, lam)
            run_dir = out / "runs" / run_name(split, fraction, seed, lam)
            progress.report(0.05 + 0.85 * done / total, f"{run_dir.name}")
            if ensure_trained(config, run_dir, stores, device, show_progress) or show_progress:
                print(f"== {run_dir.name}: done", flush=True)
            per_seed.append(test_errors(run_dir, stores, device))
            done += 1
        errors[(split, fraction, lam)] = per_seed
    return errors


# -- statistics -------------------------------------------------------------------------------------
BASELINE_NAMES = {"knn": "kNN fingerprinting", "ml": "ML map matching", "multilateration": "multilateration",
                  "exhaustive": "map matching, exhaustive"}


STAR_ARM = "transformer λ*"


def arm_label(lam: float) -> str:
    """``transformer λ=0`` (the reference arm) or ``transformer λ*`` (the tuned λ, shown in its own column)."""
    return "transformer λ=0" if lam == 0 else STAR_ARM


def split_groups(config: Config, stores, indices) -> dict[str, np.ndarray]:
    """The UE groups (:func:`core.learning.groups.ue_groups`, the config's report window) of test UEs
    ``indices`` of ``config``'s split."""
    from core.learning.groups import ue_groups
    from core.learning.scene_data import apply_data_config

    return ue_groups(apply_data_config(config, *stores), indices, config.physics_loss.report_window_s)


def _check_paired(runs: list[dict[str, np.ndarray]], baselines: dict[str, np.ndarray], where: str) -> None:
    for r in runs[1:]:
        if not np.array_equal(r["indices"], runs[0]["indices"]):
            raise CoreError(f"ablation {where}: the arms were not tested on the same UEs")
    for name, b in baselines.items():
        if len(b) != len(runs[0]["off"]):
            raise CoreError(f"ablation {where}: baseline {name} has {len(b)} test UEs, the model {len(runs[0]['off'])}")


def block_rows(errors, baselines, split: str, fraction: float, lam_star: float, n_boot: int,
               groups: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    """Rows of one (split, label fraction) block: every refinement, group and arm against λ = 0
    (``lam_star``: the λ* of this label fraction; ``groups``: the test UEs' group masks, :func:`split_groups`)."""
    ref_runs, star_runs = errors[(split, fraction, 0.0)], errors[(split, fraction, lam_star)]
    _check_paired(ref_runs + star_runs, baselines, f"{split}/{fraction:g}")
    rows = []
    for refine in ("off", "on"):
        for group in GROUPS:
            m = groups[group]
            if not m.any():
                continue
            arms = {arm_label(0.0): [r[refine][m] for r in ref_runs],
                    arm_label(lam_star): [r[refine][m] for r in star_runs]}
            if refine == "off":  # deterministic: the same errors for every seed
                arms.update({BASELINE_NAMES[k]: [b[m]] * len(ref_runs) for k, b in baselines.items()})
            for row in compare_arms(arms, arm_label(0.0), n_boot=n_boot):
                baseline = row["arm"] in BASELINE_NAMES.values()
                lam = float("nan") if baseline else (0.0 if row["arm"] == arm_label(0.0) else lam_star)
                meta = {"split": split, "label_fraction": fraction, "refinement": "-" if baseline else refine,
                        "group": group, "count": int(m.sum()), "lambda_phys": lam}
                if baseline:  # one deterministic estimate, no seed spread
                    row.update({"seeds": 1, **{f"{k}_sd": float("nan") for k in DELTA_METRICS}})
                rows.append({**meta, **row})
    return rows


def curve_rows(errors, baselines, plan: Plan, lam_star: dict[float, float]) -> list[dict[str, Any]]:
    """Median vs label fraction per split, refinement and arm, with the CI band of the median itself
    (the two-level bootstrap of its difference to an all-zero error arm)."""
    rows = []
    for split in plan.splits:
        for fraction in plan.fractions:
            arms = [(arm_label(lam), lam, refine, [r[refine] for r in errors[(split, fraction, lam)]])
                    for lam in (0.0, lam_star[fraction]) for refine in ("off", "on")]
            arms += [(BASELINE_NAMES[k], float("nan"), "-", [b]) for k, b in baselines[split].items()]
            for arm, lam, refine, per_seed in arms:
                level = paired_delta(per_seed, [np.zeros_like(e) for e in per_seed], "median_m", n_boot=plan.n_boot)
                rows.append({"split": split, "refinement": refine, "arm": arm, "lambda_phys": lam,
                             "label_fraction": fraction, "seeds": len(per_seed), "median_m": level["delta"],
                             "median_m_lo": level["ci_low"], "median_m_hi": level["ci_high"]})
    return rows


def cdf_blocks(errors, baselines, plan: Plan, lam_star: dict[float, float]) -> dict[str, dict[str, Any]]:
    """``{"<split> split, <p> % labels": {arm: CDF}}`` of the test errors, all seeds pooled."""
    blocks = {}
    for split in plan.splits:
        for fraction in plan.fractions:
            curves = {}
            for lam in (0.0, lam_star[fraction]):
                for refine, suffix in (("off", ""), ("on", " + refine")):
                    curves[arm_label(lam) + suffix] = np.concatenate([r[refine] for r in errors[(split, fraction, lam)]])
            curves.update({BASELINE_NAMES[k]: b for k, b in baselines[split].items()})
            top = max(float(np.percentile(e, 99)) for e in curves.values())
            blocks[f"{split} split, {_pct(fraction)} labels"] = {k: error_cdf(e, 200, top) for k, e in curves.items()}
    return blocks


# -- outputs ------------------------------------------------------------------------------------------
def _fmt(v: float, sign: bool = False) -> str:
    if v is None or not np.isfinite(v):
        return "–"
    return f"{v:+.2f}" if sign else f"{v:.2f}"


def _cell(row: pd.Series, metric: str) -> str:
    sd = row.get(f"{metric}_sd")
    return _fmt(row[metric]) + (f" ± {_fmt(sd)}" if sd is not None and np.isfinite(sd) else "")


def _delta(row: pd.Series, metric: str) -> str:
    d = row.get(f"d_{metric}")
    if d is None or not np.isfinite(d):
        return ""
    return f"{_fmt(d, True)} [{_fmt(row[f'd_{metric}_lo'], True)}, {_fmt(row[f'd_{metric}_hi'], True)}]"


def markdown(table: pd.DataFrame, header: str) -> str:
    """``table`` as Markdown: per split, the overall table, then each UE group."""
    lines = [header, ""]
    cols = ["labels", "refine", "arm", "λ_phys applied", "seeds", "median m", "P90 m", "RMSE m",
            "Δ median m [95 % CI]", "Δ P90 m [95 % CI]", "Δ RMSE m [95 % CI]"]
    for split in table["split"].unique():
        for group in GROUPS:
            part = table[(table["split"] == split) & (table["group"] == group)]
            if part.empty:
                continue
            what = "all test UEs" if group == "all" else f"test UEs: {GROUP_LABELS[group]}"
            lines += [f"### {split} split — {what} ({int(part['count'].iloc[0])})", "",
                      "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
            for _, r in part.iterrows():
                lam = "" if not np.isfinite(r["lambda_phys"]) else f"{r['lambda_phys']:g}"
                cells = [_pct(r["label_fraction"]), r["refinement"], r["arm"], lam, str(int(r["seeds"])),
                         _cell(r, "median_m"), _cell(r, "p90_m"), _cell(r, "rmse_m"),
                         _delta(r, "median_m"), _delta(r, "p90_m"), _delta(r, "rmse_m")]
                lines.append("| " + " | ".join(cells) + " |")
            lines.append("")
    return "\n".join(lines)


def header_text(plan: Plan, scene: str, overrides: list[str], lam_star: dict[float, float], tuning: list[dict],
                wall_s: float, machine: str, n_test: dict[str, int]) -> str:
    tune = "; ".join(f"{_pct(f)} labels: " + ", ".join(f"λ={r['lambda_phys']:g} {r['val_median_m']:.2f} m"
                                                       for r in tuning if r["label_fraction"] == f)
                     + f" → **λ* = {lam_star[f]:g}**" for f in plan.fractions)
    return "\n".join([
        f"# Ablation of the physics term — scene {scene}, plan `{plan.name}`", "",
        f"* Every arm: `{BASE_CONFIG}` with {', '.join(f'`{o}`' for o in (*plan.overrides, *overrides))}.",
        f"* Seeds {', '.join(map(str, plan.seeds))}, paired (same seeds, labelled walks and test UEs in every arm); "
        f"label fractions {', '.join(_pct(f) for f in plan.fractions)}; splits {', '.join(plan.splits)} "
        f"(test UEs: {', '.join(f'{k} {v}' for k, v in n_test.items())}).",
        f"* λ_phys tuned per label fraction on the val split ({tuning[0]['split']} split, seed {plan.seeds[0]}), "
        f"val median — {tune}.",
        "* Cells: mean ± sd over seeds; Δ = change against the λ = 0 arm of the same split, label fraction and "
        f"refinement (negative = better), 95 % CI from a paired two-level bootstrap ({plan.n_boot} replicates: "
        "seeds, then UEs). Baselines need no training: one estimate, no sd; their Δ is against λ = 0 without refinement.",
        f"* Wall time {wall_s / 60:.1f} min on {machine}.",
    ])


def write_outputs(out: Path, table: pd.DataFrame, curve: pd.DataFrame, cdf: dict, tuning: list[dict],
                  summary: dict[str, Any]) -> None:
    atomic_write_text(out / "table.csv", table.to_csv(index=False))
    atomic_write_text(out / "table.md", markdown(table, summary["header"]))
    atomic_write_text(out / "curve.csv", curve.to_csv(index=False))
    atomic_write_text(out / "cdf.json", json.dumps(cdf))
    atomic_write_text(out / "tuning.csv", pd.DataFrame(tuning).to_csv(index=False))
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2, default=float))


# -- the command --------------------------------------------------------------------------------------
def ablate(scene: str, out: str | Path, overrides: list[str] = (), quick: bool = False, device="cpu",
           show_progress: bool = True, **grid) -> dict[str, Any]:
    """Run the ablation (see the module doc); ``grid`` overrides fields of the plan (seeds, fractions,
    splits, lambda_grid, n_boot)."""
    from core.device import machine_info
    from core.learning.scene_data import load_scene

    started = time.time()
    plan = Plan(**{**asdict(PLANS["quick" if quick else "full"]), **{k: tuple(v) if isinstance(v, list) else v
                                                                      for k, v in grid.items() if v is not None}})
    out = Path(out)
    check_ablation_folder(out)
    out.mkdir(parents=True, exist_ok=True)
    base = [*plan.overrides, f"data.dataset=datasets/{scene}", *overrides]
    probe = arm_config(base, "random", 1.0, plan.seeds[0], 0.0)
    stores = load_scene(probe)  # once: every arm gets them with its own split applied
    lam_star, tuning = tune_lambda(plan, base, out, stores, device, show_progress)
    errors = collect_errors(plan, base, lam_star, out, stores, device, show_progress)
    progress.report(0.9, "classical baselines and statistics")
    baselines = {sp: baseline_errors(out, sp, arm_config(base, sp, 1.0, plan.seeds[0], 0.0), stores)
                 for sp in plan.splits}
    groups = {sp: split_groups(arm_config(base, sp, 1.0, plan.seeds[0], 0.0), stores,
                               errors[(sp, plan.fractions[0], 0.0)][0]["indices"]) for sp in plan.splits}
    rows = [r for sp in plan.splits for f in plan.fractions
            for r in block_rows(errors, baselines[sp], sp, f, lam_star[f], plan.n_boot, groups[sp])]
    table = pd.DataFrame(rows)
    curve = pd.DataFrame(curve_rows(errors, baselines, plan, lam_star))
    cdf = cdf_blocks(errors, baselines, plan, lam_star)
    m = machine_info()
    machine = f"{m['cpu']} ({m['cores']} cores, torch {m['torch']}, {device})"
    n_test = {sp: len(errors[(sp, plan.fractions[0], 0.0)][0]["off"]) for sp in plan.splits}
    wall_s = time.time() - started
    header = header_text(plan, scene, list(overrides), lam_star, tuning, wall_s, machine, n_test)
    summary = {"scene": scene, "plan": asdict(plan), "overrides": list(overrides),
               "lambda_star": {f"{f:g}": v for f, v in lam_star.items()},
               "tuning": tuning, "wall_s": wall_s, "machine": machine, "n_test": n_test, "header": header}
    write_outputs(out, table, curve, cdf, tuning, summary)
    progress.report(1.0, "ablation done")
    return {"table": table, "curve": curve, "cdf": cdf, **summary}


#: what an ablation folder holds (write_outputs, baseline_errors, the runs/ of its arms)
OUTPUTS = ("table.csv", "table.md", "curve.csv", "cdf.json", "tuning.csv", "summary.json", "runs")


def is_ablation_file(name: str) -> bool:
    """Whether ``name`` is an entry of an ablation folder (:data:`OUTPUTS`, ``baselines-<split>.npz``, or
    a temporary or lock of one)."""
    base = name[1:].split(".tmp-")[0].split(".old-")[0].removesuffix(".json").removesuffix(".lock") \
        if name.startswith(".") else name
    return base in OUTPUTS or (base.startswith("baselines-") and base.endswith(".npz"))


def check_ablation_folder(out: Path) -> None:
    """Refuse a shipped ``--out`` (assets/ablation_etoile) and a folder holding anything an ablation did not
    write (it is continued in place: its runs are the cache)."""
    check_writable(out)
    if out.is_dir():
        check_replaceable(out, is_ablation_file, "an ablation folder (its tables and runs/)",
                          action="ablate continues (and overwrites)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--scene", default="etoile",
                        help="scene name: trains on datasets/<scene> and the radio map it was made with")
    parser.add_argument("--out", default="runs/ablation", help="output directory (runs are cached there)")
    parser.add_argument("--quick", action="store_true",
                        help="the 5-minute plan: tiny model, 2 epochs, first 2,000 samples")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a config key in every arm (e.g. data.dataset=...); repeatable")
    parser.add_argument("--seeds", type=cli_types.seed, nargs="+", default=None, help="paired seeds (default 0 1 2)")
    parser.add_argument("--fractions", type=cli_types.number(0.0, 1.0, low_open=True), nargs="+", default=None, help="label fractions (default 0.05 0.2 1)")
    parser.add_argument("--splits", nargs="+", choices=["random", "spatial"], default=None)
    parser.add_argument("--lambdas", type=cli_types.non_negative, nargs="+", default=None, help="λ_phys grid tuned on val")
    parser.add_argument("--n-boot", type=cli_types.count, default=None, help="bootstrap replicates")
    parser.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    import torch

    torch.set_num_threads(1)  # one thread: much faster than 2 on a shared 2-core CPU
    device = "cpu" if args.device == "auto" and not torch.cuda.is_available() else args.device
    if args.lambdas is not None and not all(v > 0 for v in args.lambdas):
        raise CoreError("--lambdas: every λ_phys to tune must be > 0 (λ = 0 is always an arm)")
    check_ablation_folder(Path(args.out))  # before the lock: a shipped folder gets no lock file beside it
    with output_lock(args.out, "ablation folder"):  # one writer per ablation folder, for its whole life
        result = ablate(args.scene, args.out, args.overrides, quick=args.quick, device=device,
                        show_progress=not args.no_progress, seeds=args.seeds, fractions=args.fractions,
                        splits=args.splits, lambda_grid=args.lambdas, n_boot=args.n_boot)
    table = result["table"]
    part = table[table["group"] == "all"]
    cols = ["split", "label_fraction", "refinement", "arm", "median_m", "median_m_sd", "d_median_m", "d_median_m_lo",
            "d_median_m_hi", "d_rmse_m"]
    print(part[cols].to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    stars = ", ".join(f"{100 * float(f):g} %: {v:g}" for f, v in result["lambda_star"].items())
    print(f"\nλ* per label fraction: {stars}; wrote {args.out}/table.csv, table.md, curve.csv, cdf.json "
          f"({result['wall_s']:.0f} s)")
    return 0
