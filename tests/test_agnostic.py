"""The scene-agnostic model (``model.kind: agnostic``, core/learning/agnostic.py): site-permutation and
translation invariance (which the memorizing model lacks for sites), many scenes with different site
counts, the CLI train -> evaluate path and the checkpoint round trip. Tiny analytic scenes, no Sionna."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from core.learning.config import load_config
from core.learning.data_loading import build_tensors
from core.learning.kinds import build_model
from core.learning.model import SceneMaps
from core.learning.scene_data import model_spec, scene_input, spec_num_sites
from core.physics.synthetic import analytic_radio_map, synthetic_dataset
from core.stores.radio_map import RadioMap

TINY = ["model.preset=tiny", "training.batch_size=32", "training.epochs=2", "training.warmup_epochs=0",
        "training.num_threads=1", "physics_loss.warmup_epochs=0", "physics_loss.ramp_epochs=0",
        "physics_loss.coarse_subgrid=2", "physics_loss.mode_subgrid=2", "model.num_candidates=6",
        "model.fine_subgrid=3", "model.d_report=16"]
SITES = np.array([[-30.0, -25.0, 20.0], [35.0, -10.0, 25.0], [0.0, 38.0, 15.0], [-40.0, 30.0, 30.0]])


@pytest.fixture(scope="module")
def stores():
    """An analytic 24 x 24 map of 4 m cells with 4 sites and 60 walks of 6 reports, 3 slots."""
    radio_map = analytic_radio_map(24, 24, (-48.0, -48.0, 48.0, 48.0), sites=SITES)
    return radio_map, synthetic_dataset(radio_map, 60, reports=6, k=3, seed=3)


def _config(kind: str):
    return load_config("configs/model.yaml", [f"model.kind={kind}", *TINY])


def _outputs(kind: str, radio_map, dataset, seed: int = 0):
    """The untrained model of ``kind`` (parameters from ``seed``) on every walk: its ModelOutput and bounds."""
    spec = model_spec(_config(kind), dataset, radio_map, num_sites=len(SITES))
    model = build_model(spec, seed).eval()
    data = build_tensors(dataset, radio_map, None, spec.geometry_hint, num_sites=spec_num_sites(spec), kind=kind)
    maps = SceneMaps.stack([scene_input(radio_map, spec)], [radio_map.bounds])
    with torch.no_grad():
        return model(data.feats, data.site_index, data.mask, maps), maps.bounds[0]


def _relabelled(radio_map, dataset, perm: np.ndarray):
    """The same scene with site ``s`` renamed ``perm[s]``: layers, site list and the reports' ids permuted alike."""
    inv = np.argsort(perm)  # new position q holds old site inv[q]
    layers = {name: (v[inv] if name.startswith("site_") else v) for name, v in radio_map.layers.items()}
    sites = [radio_map.attrs["sites"][i] for i in inv]
    new_map = RadioMap(radio_map.values, radio_map.features, radio_map.bounds, valid=radio_map.valid,
                       attrs={**radio_map.attrs, "sites": sites}, layers=layers)
    ids = np.where(dataset.site_ids >= 0, perm[np.clip(dataset.site_ids, 0, None)], -1).astype(dataset.site_ids.dtype)
    return new_map, dataclasses.replace(dataset, site_ids=ids, attrs={**dataset.attrs, "sites": sites})


def _shifted(radio_map, dataset, shift):
    """The same scene in a frame shifted by ``shift`` [m]: bounds, sites and labels move, measurements do not."""
    dx, dy = shift
    x0, y0, x1, y1 = radio_map.bounds
    sites = [{**s, "position": [s["position"][0] + dx, s["position"][1] + dy, s["position"][2]]}
             for s in radio_map.attrs["sites"]]
    new_map = RadioMap(radio_map.values, radio_map.features, (x0 + dx, y0 + dy, x1 + dx, y1 + dy),
                       valid=radio_map.valid, attrs={**radio_map.attrs, "sites": sites}, layers=radio_map.layers)
    ue = dataset.ue_xyz + np.array([dx, dy, 0.0], dtype=dataset.ue_xyz.dtype)
    return new_map, dataclasses.replace(dataset, ue_xyz=ue, attrs={**dataset.attrs, "sites": sites})


def test_site_relabelling_leaves_the_agnostic_model_unchanged_but_not_the_memorizing_one(stores):
    radio_map, dataset = stores
    perm = np.array([2, 0, 3, 1])
    other_map, other_ds = _relabelled(radio_map, dataset, perm)
    a, _ = _outputs("agnostic", radio_map, dataset)
    b, _ = _outputs("agnostic", other_map, other_ds)
    assert torch.allclose(a.logits, b.logits, atol=1e-4)
    assert torch.allclose(a.xy, b.xy, atol=1e-4) and torch.allclose(a.sigma, b.sigma, atol=1e-4)
    assert torch.equal(a.cell, b.cell)
    m1, _ = _outputs("memorizing", radio_map, dataset)
    m2, _ = _outputs("memorizing", other_map, other_ds)
    assert not torch.allclose(m1.logits, m2.logits, atol=1e-3)  # it embeds the site ids


def test_a_shifted_scene_frame_leaves_the_outputs_relative_to_the_bounds_unchanged(stores):
    radio_map, dataset = stores
    a, bounds_a = _outputs("agnostic", radio_map, dataset)
    b, bounds_b = _outputs("agnostic", *_shifted(radio_map, dataset, (1234.5, -876.25)))
    assert torch.allclose(a.logits, b.logits, atol=1e-4) and torch.equal(a.cell, b.cell)
    rel_a = a.xy - bounds_a[:2].float()
    rel_b = b.xy - bounds_b[:2].float()
    assert torch.allclose(rel_a, rel_b, atol=2e-3)
    assert torch.allclose(a.sigma, b.sigma, atol=1e-4)


def test_many_scenes_with_different_site_counts(tmp_path):
    """A batch of two scenes (3 and 4 sites: the tables are padded) gives each sample what its own scene alone gives."""
    from core.learning.scene_data import prepare, tensors
    from core.physics.synthetic import synthetic_scene

    synthetic_scene(tmp_path, num_ues=60, height=20, width=20, cell=4.0, reports=6, k=3, seed=0, scene="alpha")
    synthetic_scene(tmp_path, num_ues=60, height=16, width=24, cell=4.0, reports=6, k=3, seed=1, scene="beta",
                    sites=SITES)
    sets = f"[{tmp_path / 'datasets' / 'alpha'}, {tmp_path / 'datasets' / 'beta'}]"
    config = load_config("configs/agnostic.yaml", [f"data.datasets={sets}",
                                                   f"physics_loss.radio_maps_dir={tmp_path / 'radio_maps'}", *TINY])
    run = prepare(config)
    assert run.maps.images.site_ok.tolist() == [[True, True, True, False], [True, True, True, True]]
    data = tensors(run, "val", config)
    model = build_model(run.spec, 0).eval()
    b = data.batch(torch.arange(len(data)))
    with torch.no_grad():
        mixed = model(b["feats"], b["site_index"], b["mask"], run.maps, scene_index=b["scene_index"])
        for m, scene in enumerate(run.scenes):
            sel = b["scene_index"] == m
            alone = model(b["feats"][sel], b["site_index"][sel], b["mask"][sel],
                          SceneMaps.stack([scene.map_image], [scene.radio_map.bounds]))
            assert torch.allclose(mixed.xy[sel], alone.xy, atol=1e-4)


def test_train_evaluate_cli_and_checkpoint_round_trip(scene, tmp_path, capsys):
    from core.cli import main
    from core.learning.inference import load_run, predict
    from core.stores import run as run_store

    out = tmp_path / "run"
    sets = [a for kv in scene for a in ("--set", kv)]
    assert main(["train", "--config", "configs/agnostic.yaml", *sets, *[a for kv in TINY for a in ("--set", kv)],
                 "--out", str(out), "--no-progress"]) == 0
    ckpt = run_store.load_checkpoint(run_store.checkpoint_path(out), "cpu")
    assert ckpt["spec"]["kind"] == "agnostic"
    run = load_run(out)
    assert type(run.model).__name__ == "AgnosticTransformer"
    rebuilt = build_model(ckpt["spec"], 123)  # other initial weights, then the checkpoint's
    rebuilt.load_state_dict(ckpt["model"])
    rebuilt.eval()
    idx = run.dataset.indices("test")
    pred = predict(run, idx, return_attention=True)
    data = run.tensors(idx)
    with torch.no_grad():
        again = rebuilt(data.feats, data.site_index, data.mask, run.maps)
    assert np.allclose(pred.xy, again.xy.numpy(), atol=1e-5)
    assert pred.attention["temporal"][0].shape[-1] == data.mask.shape[1] and pred.patch_grid is None
    # the network's distribution, coarse to fine: the chosen cell holds the estimate, whose offset is the fine
    # head's sub-point mean moved by at most half a sub-cell; the per-candidate attention of every candidate
    from core.learning.inference import subpoint_xy

    dist = predict(run, idx[:6], return_attention=True, return_distribution=True)
    g, s = run.model.spec.grid_size, run.model.spec.fine_subgrid
    assert dist.cell_prob.shape == (6, g, g) and np.allclose(dist.cell_prob.sum((1, 2)), 1.0, atol=1e-5)
    assert dist.subpoint_prob.shape == (6, s, s) and np.allclose(dist.subpoint_prob.sum((1, 2)), 1.0, atol=1e-5)
    cell_w = (np.array(run.radio_map.bounds[2:]) - np.array(run.radio_map.bounds[:2])) / g
    for row in range(6):
        mean = (subpoint_xy(dist, row, g) * dist.subpoint_prob[row][..., None]).sum((0, 1))
        assert (np.abs(dist.xy[row] - mean) <= 0.5 * cell_w / s + 1e-3).all()
    n_cand = dist.attention["candidate_cells"][0].shape[1]
    assert dist.attention["candidate_temporal"][0].shape[:2] == (6, n_cand)
    assert np.allclose(dist.xy, pred.xy[:6], atol=1e-5)  # the same estimates
    capsys.readouterr()
    assert main(["evaluate", "--run", str(out), "--refine", "--no-progress", "--json",
                 "--out", str(tmp_path / "eval.json")]) == 0
    result = json.loads((tmp_path / "eval.json").read_text())
    assert np.isfinite(result["median_m"]) and np.isfinite(result["refinement"]["after"]["median_m"]) and np.isfinite(pred.error_m).all()


def test_the_physics_gradient_reaches_the_fine_head_only(stores):
    radio_map, dataset = stores
    spec = model_spec(_config("agnostic"), dataset, radio_map)
    model = build_model(spec, 0)
    data = build_tensors(dataset, radio_map, None, kind="agnostic")
    out = model(data.feats, data.site_index, data.mask, scene_input(radio_map, spec), head_xy=True)
    out.head_xy.pow(2).sum().backward()
    fine = {id(p) for p in model.fine.parameters()}
    touched = [n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0]
    assert touched and all(id(dict(model.named_parameters())[n]) in fine for n in touched)


def test_the_preset_differs_from_model_yaml_only_in_the_model_kind_and_its_sizes():
    agnostic = load_config("configs/agnostic.yaml").to_dict()
    base = load_config("configs/model.yaml").to_dict()
    assert agnostic["model"].pop("kind") == "agnostic" and base["model"].pop("kind") == "memorizing"
    for key in ("num_candidates", "fine_subgrid", "d_report"):
        agnostic["model"].pop(key), base["model"].pop(key)
    assert agnostic == base
