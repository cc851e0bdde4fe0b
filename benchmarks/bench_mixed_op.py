"""pytest-benchmark cases of one DARTS mixed op forward + backward: the eager reference in both memory layouts
(DESIGN.md 3: quote speedups against the faster one), the fused op, and torch.compile of the reference.

    pytest benchmarks/bench_mixed_op.py -n 0 --benchmark-enable                          # tiny shapes, timed
    FASTDARTS_BENCH_FULL=1 pytest benchmarks/bench_mixed_op.py -n 0 --benchmark-enable   # the shapes of mixed_op.py

`extra_info` records the bytes autograd saves for backward beyond the op's inputs. The test suite (and CI) runs
these with timing disabled, which executes each case once. `python benchmarks/mixed_op.py --json` measures the
same cases with peak RSS, each in a fresh process.
"""

import json
import os

import pytest
import torch

from fastdarts import ops

from ._device import TRITON_SKIPPED, benchmark_device
from .mixed_op import CASES, default_providers, main, make_forward, make_problem, saved_bytes

FULL = os.environ.get("FASTDARTS_BENCH_FULL") == "1"
SHAPES = {name: shape if FULL else (2, shape[1], 9 if stride == 1 else 8, 9 if stride == 1 else 8)
          for name, (shape, stride) in CASES.items()}  # fmt: skip
PROVIDERS = ["eager-contiguous", "eager"] + (["cpp"] if "cpp" in ops.available_backends("mixed_op", "cpu") else [])


@pytest.mark.parametrize("provider", [*PROVIDERS, pytest.param("compile", marks=pytest.mark.slow)])
@pytest.mark.parametrize("case", list(CASES))
def test_mixed_op(benchmark, case, provider):
    stride = CASES[case][1]
    layout = torch.contiguous_format if provider == "eager-contiguous" else torch.channels_last
    x, w, weights, grad_out = make_problem(SHAPES[case], stride, layout)
    forward = make_forward(provider, stride)
    benchmark.extra_info["saved_bytes"] = saved_bytes(forward, x, w, weights)
    inputs = [x, w, *weights]
    grads = benchmark(lambda: torch.autograd.grad(forward(x, w, weights), inputs, grad_out))
    reference = torch.autograd.grad(make_forward("eager", stride)(x, w, weights), inputs, grad_out)
    for got, want in zip(grads, reference):
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-4)


@pytest.mark.slow
def test_the_script_measures_every_case_in_child_processes(capsys):
    # The script runs on the CUDA device when there is one (without cpp there), so it has its own providers.
    providers = [p for p in default_providers(benchmark_device()) if p in PROVIDERS]
    main(["--json", "--batch", "2", "--repeats", "1", "--providers", ",".join(providers), "--peak_gbps", "10"])
    out, err = capsys.readouterr()
    report = json.loads(out)
    assert err.strip() == (TRITON_SKIPPED if benchmark_device().type == "cpu" else "") and report["peak_gbps"] == 10
    for case in CASES:
        for provider in providers:
            result = report["cases"][case]["providers"][provider]
            assert result["median_seconds"] > 0 and result["peak_rss_bytes"] > 0 and result["saved_bytes"] >= 0
            assert result["flops"] > 0 and result["fraction_of_peak_gbps"] == result["gbps"] / 10
