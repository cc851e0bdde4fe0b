"""pytest cases of one recurrent search step per provider (benchmarks/rnn_search_step.py).

    pytest benchmarks/bench_rnn_search_step.py -n 0 --benchmark-enable    # tiny case, timed

The test suite (and CI) runs them with timing disabled, which executes each case once.
"""

import json

import pytest

from fastdarts import ops

from .rnn_search_step import PROVIDERS, lm_weight_step, main, make_problem, saved_bytes_of_weight_step

CASE = dict(batch=8, nhid=12, bptt=6, ntoken=50)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("order", ["first", "second"])
def test_rnn_search_step(benchmark, provider, order):
    model, optimizer, architect, config, train, val = make_problem(provider, order, **CASE)
    hidden = model.init_hidden(CASE["batch"])
    before = model.alpha.detach().clone()

    def step():
        architect.step(train, val, hidden, hidden, config.lr)
        lm_weight_step(model, optimizer, *train, hidden, config.lr, config)

    benchmark(step)
    assert (model.alpha != before).any()


@pytest.mark.skipif("cpp" not in ops.available_backends(), reason="the fused node runs the C++ kernel on the CPU")
def test_fused_node_saves_several_times_fewer_bytes():
    saved = {}
    for provider in PROVIDERS:
        model, _, _, _, train, _ = make_problem(provider, "first", batch=16, nhid=32, bptt=5, ntoken=20)
        saved[provider] = saved_bytes_of_weight_step(model, *train)
    assert saved["eager"] > 4 * saved["fused"]


@pytest.mark.slow
def test_the_script_reports_every_case(capsys):
    main(["--json", "--batch", "4", "--nhid", "8", "--bptt", "4", "--ntoken", "30", "--repeats", "1", "--orders",
          "second"])  # fmt: skip
    report = json.loads(capsys.readouterr().out)
    for provider in PROVIDERS:
        case = report["providers"][provider]["second"]
        assert case["median_seconds"] > 0 and case["saved_bytes"] > 0 and case["peak_rss_bytes"] > 0
