"""pytest-benchmark cases of one search step per provider.

    pytest benchmarks/bench_search_step.py -n 0 --benchmark-enable                         # tiny case, timed
    FASTDARTS_BENCH_FULL=1 pytest benchmarks/bench_search_step.py -n 0 --benchmark-enable  # batch 64, C=16, 8 cells

The test suite (and CI) runs them with timing disabled, which executes each case once.
"""

import json
import os
import statistics

import pytest

from fastdarts import ops
from fastdarts.bilevel import Architect

from . import method_shares, recompute_granularity
from ._device import benchmark_device
from .search_step import PROVIDERS, default_providers, main, make_problem, saved_bytes_of_step, search_step

FULL = os.environ.get("FASTDARTS_BENCH_FULL") == "1"
CASE = dict(batch=64, C=16, layers=8, size=32) if FULL else dict(batch=4, C=4, layers=3, size=8)
AVAILABLE = [p for p in ("reference-contiguous", "reference", "cpp", "cpp-no-recompute")
             if PROVIDERS[p][0] in ops.available_backends()]  # fmt: skip


@pytest.mark.parametrize("provider", AVAILABLE)
@pytest.mark.parametrize("order", ["first", "second"])
def test_search_step(benchmark, provider, order):
    backend, memory_format, _, recompute = PROVIDERS[provider]
    model, weight_optimizer, (train_batch, val_batch) = make_problem(**CASE, memory_format=memory_format,
                                                                     recompute=recompute)  # fmt: skip
    with ops.use_backend(backend):
        architect = Architect(model, weight_optimizer, unrolled=order == "second")
        benchmark.extra_info.update(saved_bytes_of_step(model, *train_batch))
        before = [a.detach().clone() for a in model.arch_parameters()]
        benchmark(search_step, model, weight_optimizer, architect, train_batch, val_batch)
    assert any((a != b).any() for a, b in zip(model.arch_parameters(), before))


# The methods of METHODS_MORE.md (name, settings): each step on the eager reference and fused.
METHODS = {"beta-darts": {}, "darts-minus": {}, "fair-darts": {}, "sdarts": {}, "sdarts-adv": {"variant": "adv"},
           "gdas": {}, "pc-darts": {}, "drnas": {}}  # fmt: skip


@pytest.mark.parametrize("provider", [p for p in ("reference", "cpp") if p in AVAILABLE])
@pytest.mark.parametrize("method", METHODS)
def test_search_step_of_each_method(benchmark, provider, method):
    backend, memory_format, _, recompute = PROVIDERS[provider]
    model, weight_optimizer, (train_batch, val_batch) = make_problem(
        **CASE, memory_format=memory_format, recompute=recompute, method=method.removesuffix("-adv"),
        method_settings=METHODS[method],
    )  # fmt: skip
    with ops.use_backend(backend):
        architect = Architect(model, weight_optimizer)
        before = [p.detach().clone() for p in (*model.arch_parameters(), *model.weight_parameters())]
        benchmark(search_step, model, weight_optimizer, architect, train_batch, val_batch)
    after = [*model.arch_parameters(), *model.weight_parameters()]
    assert any((a != b).any() for a, b in zip(after[:2], before[:2]))  # the architecture moved
    assert any((a != b).any() for a, b in zip(after[2:], before[2:]))  # and the weights


@pytest.mark.slow
def test_the_script_measures_every_case_in_child_processes(capsys):
    main(["--json", "--batch", "2", "--init_channels", "2", "--layers", "3", "--size", "8", "--repeats", "1"])
    report = json.loads(capsys.readouterr().out)
    for provider in default_providers(benchmark_device()):  # without cpp on a CUDA device
        for order in ("first", "second"):
            case = report["providers"][provider][order]
            assert case["median_seconds"] > 0 and case["peak_rss_bytes"] > 0
            assert case["saved_bytes"] == max(case["saved_bytes_arch_step"], case["saved_bytes_weight_step"]) > 0


@pytest.mark.skipif("cpp" not in ops.available_backends(), reason="the fused mixed op needs the C++ extension")
def test_recompute_granularities_trade_memory_as_described(capsys):
    tiny = dict(batch=2, C=2, layers=3, size=8, repeats=1)
    saved = {g: recompute_granularity.run(g, **tiny)["saved_bytes"] for g in recompute_granularity.GRANULARITIES}
    assert saved["cell"] < saved["edge"] < saved["none"]
    recompute_granularity.main(["cell", "--batch", "2", "--init_channels", "2", "--layers", "3", "--size", "8"])
    assert capsys.readouterr().out.startswith("cell: median ")


def test_recompute_granularity_refuses_a_non_positive_count(capsys):
    with pytest.raises(SystemExit):
        recompute_granularity.main(["edge", "--repeats", "0"])
    assert "--repeats: invalid positive_int value: '0'" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.skipif("cpp" not in ops.available_backends(), reason="the shares time the fused kernels")
def test_the_method_shares_interleave_the_methods_and_count_their_flops(capsys):
    method_shares.main(["--json", "--batch", "2", "--size", "8", "--rounds", "2", "--methods", "darts,gdas"])
    report = json.loads(capsys.readouterr().out)
    darts, gdas = report["methods"]["darts"], report["methods"]["gdas"]
    assert darts["recompute"] is True and gdas["recompute"] is False  # their searches' settings on CIFAR-10
    assert len(darts["all_seconds"]) == len(gdas["all_seconds"]) == 2
    assert darts["share_of_darts"] == darts["flop_share"] == 1.0
    rounds = [g / d for g, d in zip(gdas["all_seconds"], darts["all_seconds"])]
    assert gdas["share_of_darts"] == statistics.median(rounds) and gdas["share_range"] == [min(rounds), max(rounds)]
    assert 0.1 < gdas["flop_share"] < 0.3  # one op of the eight an edge; the preprocessing and the stem in full


def test_the_method_shares_want_darts_first(capsys):
    with pytest.raises(SystemExit):
        method_shares.main(["--methods", "gdas,darts"])
    assert "--methods: darts first, each method once, got 'gdas,darts'" in capsys.readouterr().err
