"""pytest-benchmark cases of one search step per backend.

    pytest benchmarks/bench_search_step.py                          # tiny CI-sized case, timed
    FASTDARTS_BENCH_FULL=1 pytest benchmarks/bench_search_step.py   # batch 64, C=16, 8 layers, 32x32

CI runs them with --benchmark-disable, which executes each case once.
"""

import os

import pytest

from fastdarts import ops
from fastdarts.bilevel import Architect

from .search_step import make_problem, saved_bytes_of_forward, search_step

FULL = os.environ.get("FASTDARTS_BENCH_FULL") == "1"
CASE = dict(batch=64, C=16, layers=8, size=32) if FULL else dict(batch=4, C=4, layers=3, size=8)


@pytest.mark.parametrize("backend", ops.available_backends("weighted_sum", "cpu"))
@pytest.mark.parametrize("order", ["first", "second"])
def test_search_step(benchmark, backend, order):
    model, weight_optimizer, (train_batch, val_batch) = make_problem(**CASE)
    with ops.use_backend(backend):
        architect = Architect(model, weight_optimizer, unrolled=order == "second")
        benchmark.extra_info["saved_bytes"] = saved_bytes_of_forward(model, *train_batch)
        before = [a.detach().clone() for a in model.arch_parameters()]
        benchmark(search_step, model, weight_optimizer, architect, train_batch, val_batch)
    assert any((a != b).any() for a, b in zip(model.arch_parameters(), before))
