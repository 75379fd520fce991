"""Learning from an ensemble (``training.distill_from``, core/learning/distill.py). Tiny analytic scenes, no Sionna."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from refusals import refused_train

from core.learning.config import load_config
from core.learning.distill import pool_teachers
from core.learning.inference import load_run, predict
from core.learning.scene_data import prepare
from core.learning.training import _build_loop, train
from core.stores import run as run_store

TINY = ["model.preset=tiny", "training.batch_size=32", "training.epochs=1", "training.warmup_epochs=0",
        "training.learning_rate=0.005", "training.num_threads=1", "physics_loss.warmup_epochs=0",
        "physics_loss.ramp_epochs=0", "physics_loss.coarse_subgrid=2", "physics_loss.mode_subgrid=2",
        "model.num_candidates=6", "model.fine_subgrid=3", "model.d_report=16"]


def test_pool_teachers_matches_a_dense_reference():
    """The pooled distribution is the mean of the members' (sparse) cell probabilities, its top k renormalised;
    the position the mean of theirs. Reference: dense G x G arrays."""
    rng = np.random.default_rng(0)
    grid, bounds, n, members, k_each = 6, (-12.0, -12.0, 12.0, 12.0), 5, 3, 4
    w = (bounds[2] - bounds[0]) / grid

    def cell_of(xy):  # the cell i * G + j of a square grid from (x_min, y_min), row i along +y
        return (np.floor((xy[..., 1] - bounds[1]) / w) * grid + np.floor((xy[..., 0] - bounds[0]) / w)).astype(int)
    preds = []
    for _ in range(members):
        cells = np.stack([rng.choice(12, k_each, replace=False) for _ in range(n)])  # overlapping, few cells
        i, j = cells // grid, cells % grid
        centres = np.stack([bounds[0] + (j + 0.5) * w, bounds[1] + (i + 0.5) * w], -1)
        prob = rng.dirichlet(np.ones(k_each), n)
        preds.append(SimpleNamespace(xy=rng.normal(0, 5, (n, 2)), coarse_xy=centres, coarse_prob=prob, cells=cells))
    for k in (3, 32):
        cells, q, mu = pool_teachers(preds, cell_of, k)
        dense = np.zeros((n, grid * grid))
        for p in preds:
            np.add.at(dense, (np.arange(n)[:, None].repeat(k_each, 1), p.cells), p.coarse_prob / members)
        for row in range(n):
            want = np.argsort(-dense[row], kind="stable")[: min(k, members * k_each)]
            want = want[dense[row, want] > 0]
            got = cells[row].numpy()[q[row].numpy() > 0]
            assert sorted(got) == sorted(want)
            ref = dense[row, got] / dense[row, want].sum()
            assert np.allclose(q[row].numpy()[q[row].numpy() > 0], ref, atol=1e-6)
        assert torch.allclose(q.sum(1), torch.ones(n))
        assert np.allclose(mu.numpy(), np.mean([p.xy for p in preds], 0), atol=1e-5)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """An analytic city ``alpha`` (and ``gamma``, another one) and two teachers trained on alpha (seeds 0, 1)."""
    from core.physics.synthetic import synthetic_scene

    root = tmp_path_factory.mktemp("distill")
    synthetic_scene(root, num_ues=120, height=24, width=24, cell=4.0, reports=6, k=3, seed=0, scene="alpha")
    synthetic_scene(root, num_ues=60, height=22, width=22, cell=4.0, reports=6, k=3, seed=2, scene="gamma")
    for seed in (0, 1):
        train(cfg(root, "alpha", f"seed={seed}"), root / f"teacher{seed}", show_progress=False)
    return root


def cfg(root, scene, *extra):
    return load_config("configs/agnostic.yaml", [f"data.dataset={root / 'datasets' / scene}",
                                                 f"physics_loss.radio_maps_dir={root / 'radio_maps'}", *TINY, *extra])


def test_a_student_learns_the_teachers_pooled_targets(world, tmp_path):
    teachers = [str(world / "teacher0"), str(world / "teacher1")]
    config = cfg(world, "alpha", "seed=2", f"training.distill_from=[{', '.join(teachers)}]")
    from core.learning.distill import check_teachers

    run = prepare(config)
    loop = _build_loop(config, run, torch.device("cpu"), 0, 1, None, check_teachers(config, run))
    data = loop.train_data
    xy = np.mean([predict(load_run(t), data.indices.numpy()).xy for t in teachers], 0)
    assert np.allclose(data.teach_xy.numpy(), xy, atol=1e-5)
    assert torch.allclose(data.teach_q.sum(1), torch.ones(len(data)))

    out, plain = tmp_path / "student", tmp_path / "plain"
    rows = train(config, out, show_progress=False)["history"]
    train(cfg(world, "alpha", "seed=2"), plain, show_progress=False)
    assert all(np.isfinite(r["train_distill"]) for r in rows)  # logged (its fine part, a Gaussian NLL, may be < 0)
    assert "distilled from" in (out / "log.txt").read_text()
    a, b = (run_store.load_checkpoint(p / "best.pt")["model"] for p in (out, plain))
    assert not all(torch.equal(a[k], b[k]) for k in a)  # the term changes what is learned
    off = cfg(world, "alpha", "seed=2", f"training.distill_from=[{teachers[0]}]", "training.distill_weight=0")
    train(off, tmp_path / "off", show_progress=False)  # weight 0: the plain run, bit for bit
    c = run_store.load_checkpoint(tmp_path / "off" / "best.pt")["model"]
    assert all(torch.equal(c[k], b[k]) for k in c)


def test_bad_teachers_are_one_line_before_any_work(world, tmp_path, capsys):
    train(cfg(world, "gamma"), world / "gamma_run", show_progress=False)

    def train_cli(*sets):
        return refused_train(capsys, tmp_path / "x", *TINY, f"data.dataset={world / 'datasets' / 'alpha'}",
                             f"physics_loss.radio_maps_dir={world / 'radio_maps'}", *sets)

    assert f"training.distill_from: {tmp_path / 'nowhere'}: " in train_cli(f"training.distill_from=[{tmp_path / 'nowhere'}]")
    assert f"training.distill_from: {world / 'gamma_run'}" in train_cli(f"training.distill_from=[{world / 'gamma_run'}]")
