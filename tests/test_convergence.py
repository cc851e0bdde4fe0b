"""The convergence study: its statistics, its probes on models with known answers, its variants, and a tiny study
that is interrupted and resumed."""

import json
import math
import os
import re
import signal
from fractions import Fraction

import numpy as np
import pytest
import torch

from fastdarts import convergence, train
from fastdarts.analyze import cell_depth, cell_width, shu_wiring_variant
from fastdarts.checkpoint import RunInterrupted, load_checkpoint
from fastdarts.config import StudyConfig, run_cli
from fastdarts.probes import (
    filter_normalized_direction,
    gradient_variance,
    loss_surface,
    sharpness_of_curves,
    top_hessian_eigenvalue,
)
from fastdarts.space import DARTS_V2
from fastdarts.stats import (
    average_ranks,
    bootstrap_interval,
    partial_spearman,
    permutation_pvalue,
    seed_noise_ratio,
    spearman,
)

# ----------------------------------------------------------------------------------------------
# Statistics


def test_spearman_with_ties_matches_the_hand_computed_value():
    # Ranks of x: 1, 2.5, 2.5, 4; centred -1.5, 0, 0, 1.5 against -1.5, -0.5, 0.5, 1.5: rho = 4.5 / sqrt(4.5 * 5).
    assert average_ranks([1, 2, 2, 3]).tolist() == [1, 2.5, 2.5, 4]
    assert spearman([1, 2, 2, 3], [10, 20, 30, 40]) == pytest.approx(3 / math.sqrt(10), abs=1e-12)
    assert spearman([3, 2, 2, 1], [10, 20, 30, 40]) == pytest.approx(-3 / math.sqrt(10), abs=1e-12)
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))


def test_exact_permutation_pvalues_match_hand_counts():
    # Only the pairings that send -1.5 and +1.5 to the ends reach |rho| = 3/sqrt(10): 2 ends x 2 ties = 4 of 24.
    assert permutation_pvalue([1, 2, 2, 3], [10, 20, 30, 40]) == pytest.approx(4 / 24)
    # A monotone n = 6: only the identity and the reversal reach |rho| = 1.
    assert permutation_pvalue(range(6), [0.5, 1, 4, 9, 20, 21]) == pytest.approx(2 / 720)


def test_monte_carlo_permutation_pvalue():
    n, b = 13, 2000
    assert permutation_pvalue(range(n), np.arange(n) ** 2, permutations=b) == pytest.approx(1 / (b + 1))
    p = permutation_pvalue(range(8), [3, 1, 4, 1, 5, 9, 2, 6], permutations=20000)  # 8! > 20000: Monte Carlo
    exact = permutation_pvalue(range(8), [3, 1, 4, 1, 5, 9, 2, 6], permutations=40320)
    assert p == pytest.approx(exact, abs=0.01)


def test_bootstrap_interval_and_partial_rho():
    x = np.arange(12.0)
    low, high = bootstrap_interval(x, x + np.sin(x), resamples=300)
    assert 0.5 < low <= high <= 1
    # The partial correlation of residuals after a line obeys the textbook formula in the three pairwise rhos.
    rng = np.random.default_rng(0)
    z = rng.normal(size=15)
    x, y = z + rng.normal(size=15), z + rng.normal(size=15)
    xy, xz, yz = spearman(x, y), spearman(x, z), spearman(y, z)
    assert partial_spearman(x, y, z) == pytest.approx((xy - xz * yz) / math.sqrt((1 - xz**2) * (1 - yz**2)))
    # Parameters falling with every skip: the skips' ranks are the parameters' (reversed), nothing is left.
    assert math.isnan(partial_spearman([0, 1, 1, 2, 3], [5.0, 4, 3, 1, 2], [9, 8, 8, 7, 6]))


def test_seed_noise_ratio():
    # Means 0 and 10, within-variant sd 1 with 2 seeds: sd of means 7.07 over 1/sqrt(2).
    h = 1 / math.sqrt(2)
    assert seed_noise_ratio([[-h, h], [10 - h, 10 + h]]) == pytest.approx(10)
    assert math.isnan(seed_noise_ratio([[1.0], [2.0]]))  # one seed: no noise to compare with


# ----------------------------------------------------------------------------------------------
# Probes on models with known answers


def test_power_iteration_recovers_the_top_eigenvalue_of_a_quadratic():
    generator = torch.Generator().manual_seed(1)
    q, _ = torch.linalg.qr(torch.randn(30, 30, generator=generator, dtype=torch.float64))
    eigenvalues = torch.cat([torch.tensor([7.0, 4.0, -3.0]), torch.rand(27, generator=generator) * 2]).double()
    a = q @ torch.diag(eigenvalues) @ q.T
    w0 = torch.randn(30, generator=generator, dtype=torch.float64)
    result = top_hessian_eigenvalue(lambda p: a @ p["w"], {"w": w0}, iterations=100, tolerance=1e-8,
                                    generator=generator)  # fmt: skip
    assert result["lambda_max"] == pytest.approx(7.0, rel=0.01)
    assert result["iterations"] < 100  # stopped by the tolerance


def test_gradient_variance_of_least_squares_equals_the_analytic_value():
    generator = torch.Generator().manual_seed(2)
    n, d = 48, 5
    x = torch.randn(n, d, generator=generator, dtype=torch.float64)
    y = torch.randn(n, generator=generator, dtype=torch.float64)
    w = torch.randn(d, generator=generator, dtype=torch.float64)

    def loss(params, indices):
        return 0.5 * ((x[indices] @ params["w"] - y[indices]) ** 2).mean()

    per_sample = (x @ w - y)[:, None] * x  # the gradient of each sample's loss
    analytic = float(((per_sample - per_sample.mean(0)) ** 2).sum(1).mean())
    exact = gradient_variance(loss, {"w": w}, torch.arange(n), batch_size=1)
    assert exact["gv_1"] == pytest.approx(analytic, rel=1e-12)
    assert exact["grad_norm"] == pytest.approx(float(per_sample.mean(0).norm()), rel=1e-12)
    # Minibatches of 6: GV_1 is unbiased over random partitions; GV_b relates to it by the finite-population factor.
    estimates = []
    for _ in range(400):
        result = gradient_variance(loss, {"w": w}, torch.randperm(n, generator=generator), batch_size=6)
        assert result["gv_1"] == pytest.approx(result["gv_b"] * 6 * (n - 1) / (n - 6))
        estimates.append(result["gv_1"])
    assert np.mean(estimates) == pytest.approx(analytic, rel=0.05)


def test_filter_normalisation_gives_each_filter_its_weights_norm_and_ignores_biases_and_bn():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 5, 3), torch.nn.BatchNorm2d(5), torch.nn.Linear(4, 6))
    params = {name: p.detach() for name, p in model.named_parameters()}
    direction = filter_normalized_direction(params, torch.Generator().manual_seed(0))
    for name, p in params.items():
        d = direction[name]
        assert d.shape == p.shape
        if p.dim() <= 1:
            assert torch.count_nonzero(d) == 0, name
        else:
            torch.testing.assert_close(d.flatten(1).norm(dim=1), p.flatten(1).norm(dim=1))
            assert not torch.allclose(d, p)


def test_loss_surface_and_sharpness_of_a_known_bowl():
    # L(w) = 2 ||w||^2 around w = 0, direction d with ||d|| = 1: L(t) = 2 t^2.
    def loss(params, indices):
        return 2 * params["w"].square().sum()

    ts = np.linspace(-1, 1, 21).tolist()
    curve = loss_surface(loss, {"w": torch.zeros(3)}, None, [{"w": torch.tensor([1.0, 0, 0])}], [(t,) for t in ts])
    assert curve == pytest.approx([2 * t * t for t in ts])
    sharp = sharpness_of_curves(ts, [curve])
    assert sharp["sharp"] == pytest.approx(2 * 0.2**2)  # the grid's largest |t| within 0.25 is 0.2
    assert sharp["basin_halfwidth"] == pytest.approx(0.8)  # 2 t^2 >= 1 first at |t| = 0.8 on this grid


# ----------------------------------------------------------------------------------------------
# Variants


def test_shu_generator_gives_the_widths_of_darts_conn1_to_10():
    # CONVERGENCE_STUDY.md S8, from running Shu et al.'s genotypes.py: DARTS_CONN1..10 have normal widths
    # 2c/2.5c/3c/3.5c 1/4/3/2 times, reduction widths 1.5c..4c; CONN4 is 3.5c with a 2c reduction cell, CONN10 3.5c
    # with a 4c one.
    conn = {seed: shu_wiring_variant(DARTS_V2, seed) for seed in range(1, 11)}
    normal = [cell_width(g.normal) for g in conn.values()]
    assert [normal.count(Fraction(w, 2)) for w in (4, 5, 6, 7)] == [1, 4, 3, 2]
    reduce = [cell_width(g.reduce) for g in conn.values()]
    assert min(reduce) == Fraction(3, 2) and max(reduce) == 4
    assert (normal[3], reduce[3], normal[9], reduce[9]) == (Fraction(7, 2), 2, Fraction(7, 2), 4)
    for g in conn.values():
        assert [op for op, _ in g.normal] == [op for op, _ in DARTS_V2.normal]
        assert [op for op, _ in g.reduce] == [op for op, _ in DARTS_V2.reduce]


@pytest.mark.parametrize("generator", ["shu", "fastdarts"])
@pytest.mark.parametrize("rewire", ["normal", "both"])
def test_width_variants_fill_each_group_with_distinct_rewirings(rewire, generator):
    variants = convergence.width_variants(DARTS_V2, [2, 2.5, 3, 3.5], 3, rewire, 0, generator)
    assert variants[0].original and variants[0].genotype == DARTS_V2
    drawn = [v.genotype for v in variants[1:]]
    assert [v.label for v in variants[1:]] == [f"C{i}" for i in range(1, 13)]
    widths = [cell_width(g.normal) for g in drawn]
    assert widths == sorted(widths)
    assert {w: widths.count(w) for w in widths} == {Fraction(w, 2): 3 for w in (4, 5, 6, 7)}
    for w in set(widths):  # within a group: depth descending
        depths = [cell_depth(g.normal, g.normal_concat) for g in drawn if cell_width(g.normal) == w]
        assert depths == sorted(depths, reverse=True)
    assert len(set(drawn)) == 12 and DARTS_V2 not in drawn
    for g in drawn:
        assert [op for op, _ in g.normal] == [op for op, _ in DARTS_V2.normal]
        assert g.normal_concat == DARTS_V2.normal_concat
    kept = [g.reduce == DARTS_V2.reduce for g in drawn]
    assert all(kept) if rewire == "normal" else not all(kept)
    assert convergence.width_variants(DARTS_V2, [2, 2.5, 3, 3.5], 3, rewire, 0, generator) == variants
    if generator == "shu":  # each is random_conn of a seed: the 2c group starts with DARTS_CONN2
        assert variants[1].drawn_with.startswith("random_conn seed ")
        seed = int(variants[1].drawn_with.split()[2].rstrip(","))
        assert variants[1].genotype.normal == shu_wiring_variant(DARTS_V2, seed).normal


def test_width_groups_that_cannot_be_filled_are_a_clear_error():
    with pytest.raises(convergence.ConfigError, match=r"4 nodes is 1c to 4c wide; no rewiring has width 0.5c, 5c"):
        convergence.width_variants(DARTS_V2, [0.5, 2, 5], 1, "normal", 0)
    with pytest.raises(
        convergence.ConfigError, match=r"too few distinct rewirings of this cell have width 2c \([0-2] of 3"
    ):
        convergence.width_variants(DARTS_V2, [2], 3, "normal", 0, max_draws=3)


def test_skip_variants_keep_the_wiring_and_count_their_skips():
    variants = convergence.skip_variants(DARTS_V2, [0, 1, 6], placements=2, seed=0)
    assert [v.label for v in variants] == ["skips0-1", "skips1-1", "skips1-2", "skips6-1", "skips6-2"]
    for v, k in zip(variants, [0, 1, 1, 6, 6]):
        ops = [op for op, _ in v.genotype.normal]
        assert ops.count("skip_connect") == k and ops.count("sep_conv_3x3") == 8 - k
        assert [i for _, i in v.genotype.normal] == [i for _, i in DARTS_V2.normal]
        assert v.genotype.reduce == DARTS_V2.reduce
    assert variants[1].genotype != variants[2].genotype
    with pytest.raises(convergence.ConfigError, match="cannot hold 9 skips"):
        convergence.skip_variants(DARTS_V2, [9], 1, 0)


# ----------------------------------------------------------------------------------------------
# A tiny study: 2 cells x 1 seed, 3 epochs of a 3-cell network


TINY = dict(widths="2", per_group=1, epochs=3, init_channels=2, layers=3, batch_size=128, clean_images=128,
            probe_images=64, gradvar_batch=16, hessian_images=32, hessian_iters=3, landscape_points=5,
            landscape_images=64, ntk_images=8, permutations=100, bootstrap=100, progress=False)  # fmt: skip


def finished(study_dir):
    return sorted(p.parent.parent.name for p in study_dir.glob("variants/*/seed-*/measurements.json"))


@pytest.mark.slow
def test_the_observer_leaves_training_unchanged(tmp_path):
    config = StudyConfig(**TINY).resolved()
    measurer = convergence.Measurer(config)
    variant = convergence.Variant("original", DARTS_V2, True)
    plain = train.run(convergence.train_config(config, variant, 0, tmp_path / "plain"))
    observed = train.run(convergence.train_config(config, variant, 0, tmp_path / "observed"),
                         observe=measurer.after_epoch)  # fmt: skip
    a = load_checkpoint(plain.run_dir / "checkpoint.pt")["model"]
    b = load_checkpoint(observed.run_dir / "checkpoint.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["train_loss"] for r in plain.history] == [r["train_loss"] for r in observed.history]
    assert "gradvar" in observed.history[-1] and "clean_train_loss" in observed.history[0]


@pytest.mark.slow
def test_an_interrupted_study_resumes_and_ends_as_an_uninterrupted_one(tmp_path, monkeypatch, one_thread):
    whole = convergence.new_study(StudyConfig(**TINY, out=str(tmp_path / "whole")).resolved(), [0])
    convergence.run_study(whole, progress=False)

    split = convergence.new_study(StudyConfig(**TINY, out=str(tmp_path / "split")).resolved(), [0])
    after_epoch = convergence.Measurer.after_epoch
    calls = []

    def interrupting(self, model, epochs_done):
        calls.append(epochs_done)
        if len(calls) == 4:  # the second run's first epoch: SIGTERM, as a scheduler would send
            os.kill(os.getpid(), signal.SIGTERM)
        return after_epoch(self, model, epochs_done)

    monkeypatch.setattr(convergence.Measurer, "after_epoch", interrupting)
    with pytest.raises(RunInterrupted, match=r"C1 seed 0 stopped.*--resume .*split"):
        convergence.run_study(split, progress=False)
    monkeypatch.setattr(convergence.Measurer, "after_epoch", after_epoch)
    assert finished(split) == ["original"] and not (split / "summary.json").exists()
    first = split / "variants/original/seed-0/measurements.json"
    written = first.stat().st_mtime_ns
    assert not load_checkpoint(split / "variants/C1/seed-0/checkpoint.pt")["complete"]

    # The interrupted run finishes in a child process (the --jobs path), the finished one is not run again.
    summary = convergence.run_study(split, jobs=2, progress=False)
    assert first.stat().st_mtime_ns == written
    assert finished(split) == ["C1", "original"]
    for label in ("original", "C1"):
        a = json.loads((whole / f"variants/{label}/seed-0/measurements.json").read_text())
        b = json.loads((split / f"variants/{label}/seed-0/measurements.json").read_text())
        assert a == b, label
    assert summary["runs_finished"] == 2
    assert {c["predictor"] for c in summary["correlations"]} == {"normal_width", "normal_depth"}
    for name in ("summary.md", "summary.json", "speed_vs_generalisation.png", "convergence_test_loss.png",
                 "gradient_variance.png", "sharpness.png"):  # fmt: skip
        assert (split / name).is_file(), name


def cli(capsys, *args) -> tuple[int, str]:
    status = run_cli(convergence.main, list(args))
    return status, capsys.readouterr().err


@pytest.mark.parametrize(
    "args, message",
    [
        (["--widths", "2,x"], "widths must be comma-separated numbers"),
        (["--widths", "2.25"], "widths must be multiples of 0.5"),
        (["--widths", "2,inf"], "widths must be finite numbers"),
        (["--widths", "3,3"], "widths must not repeat a value"),
        (["--probes", "0,1"], r"probes must be fractions of training in \(0, 1\]"),
        (["--genotype", "NoSuchCell"], "is not a built-in genotype"),
        (["--gradvar_batch", "200"], r"probe_images \(360\) must hold two batches"),
        (["--study", "skips", "--skips", "0,9"], "cannot hold 9 skips"),
    ],
)
def test_bad_input_is_one_line_and_status_2(tmp_path, capsys, args, message):
    status, err = cli(capsys, *args, "--out", str(tmp_path / "s"))
    assert status == 2 and err.count("\n") == 1, err
    assert re.search(message, err), err
    assert not (tmp_path / "s").exists()


def test_resume_needs_a_study_and_takes_only_jobs_and_progress(tmp_path, capsys):
    status, err = cli(capsys, "--resume", str(tmp_path / "nowhere"))
    assert status == 2 and "nowhere is not a convergence study directory" in err
    status, err = cli(capsys, "--resume", str(tmp_path), "--epochs", "3")
    assert status == 2 and "only jobs, progress may be given (got epochs)" in err


def test_probe_epochs_always_include_the_end():
    assert StudyConfig(probes="0.25", epochs=12).resolved().probe_epochs() == [3, 12]
    assert StudyConfig(probes="0.1,0.5", epochs=4).resolved().probe_epochs() == [1, 2, 4]


def test_verdicts_and_the_censored_threshold():
    config = StudyConfig(permutations=1000, bootstrap=200).resolved()
    x, falling = list(range(8)), [9.0, 7, 6, 4, 3.5, 2, 1, 0]
    assert convergence.correlation(x, falling, -1, config)["verdict"] == "agrees"
    assert convergence.correlation(x, falling, 1, config)["verdict"] == "disagrees"
    assert convergence.correlation(x, falling, None, config)["verdict"] == "no sign predicted"
    assert convergence.correlation(x, [3.0, 1, 4, 1, 5, 9, 2, 6], -1, config)["verdict"] == "not significant"
    assert convergence.correlation([1, 2], [2, 1], -1, config)["verdict"] == "—"  # too few cells
    # The clean loss after epochs 0..3: first at most tau after epoch 2; never: censored at E + 1 = 4.
    assert convergence.epochs_to_threshold([3, 2, 1, 0.5], 1) == 2
    assert convergence.epochs_to_threshold([3, 2, 1, 0.5], 0.1) == 4
