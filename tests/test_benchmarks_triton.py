"""The benchmarks' Triton path (the "triton" provider of benchmarks/ops.py's and benchmarks/mixed_op.py's run_case), on
CPU tensors under Triton's interpreter, on tiny shapes, with a CPU timer where a GPU run has CUDA events; and the
parts of benchmarks/_device.py that need no GPU.

TRITON_INTERPRET is set and restored as in tests/ops/test_triton.py: while this module imports and while its tests
run, so that the other modules see "triton" on CUDA tensors only.
"""

import os

_INTERPRET_BEFORE = os.environ.get("TRITON_INTERPRET")
os.environ["TRITON_INTERPRET"] = "1"

import json  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from benchmarks import _device, mixed_op  # noqa: E402
from benchmarks import ops as bench_ops  # noqa: E402
from fastdarts.ops import _registry, reference  # noqa: E402

if _INTERPRET_BEFORE is None:
    del os.environ["TRITON_INTERPRET"]
else:
    os.environ["TRITON_INTERPRET"] = _INTERPRET_BEFORE

TINY = {
    "relu_dwconv": {"stride1": (1, 3, 7, 6), "stride2": (1, 4, 7, 7)},
    "relu_dwconv_pointwise": {"stride1": (1, 3, 7, 6), "stride2": (1, 4, 7, 7)},
    "weighted_sum": {"stride1": (1, 3, 7, 6), "stride2": (2, 4, 4, 4)},
    "pool_bn_stats": {"stride1": (1, 3, 7, 6), "stride2": (2, 5, 7, 7)},
    "bn_weighted_sum": {"stride1": (1, 3, 7, 6), "stride2": (2, 4, 4, 4)},
    "mixed_op": {"stride1": (1, 2, 5, 5), "stride2": (1, 2, 6, 6)},
}
needs_triton = pytest.mark.skipif(
    not _registry.TRITON_LOADED, reason=f"triton did not import: {_registry.TRITON_ERROR}"
)
CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


@needs_triton
@pytest.mark.parametrize("case", ["stride1", "stride2"])
@pytest.mark.parametrize("op", bench_ops.OPS)
def test_run_case_times_the_triton_provider(op, case):
    peaks = _device.device_peaks("a CPU", peak_gbps=10.0, peak_gflops=100.0)
    shape = TINY[op][case]
    result = bench_ops.run_case(op, case, "triton", CPU, _device.cpu_timer(2), peaks, shape)
    assert len(result["all_seconds"]) == 2 and result["median_seconds"] > 0
    assert "peak_memory_bytes" not in result  # CUDA only
    flops, nbytes = bench_ops.flops_and_bytes(op, shape, bench_ops.CASES[op][case][1])
    assert (result.get("flops"), result["bytes"]) == (flops, nbytes)
    assert result["gbps"] == pytest.approx(nbytes / result["median_seconds"] / 1e9)
    if flops is None:  # pool_bn_stats: comparisons and additions, not counted
        assert "gflops_per_s" not in result and op == "pool_bn_stats"
    else:
        assert result["fraction_of_peak_gflops"] == pytest.approx(result["gflops_per_s"] / 100.0)
    # relu_dwconv saves only x and the weights, pool_bn_stats only x, bn_weighted_sum only its arguments (the Triton
    # relu_dwconv_pointwise keeps the depthwise outputs for ATen's 1x1 convs: a composition, not a fused kernel)
    if op not in ("weighted_sum", "relu_dwconv_pointwise"):
        assert result["saved_bytes_beyond_inputs"] == 0

    # What was timed is the op's forward + backward: it agrees with the reference's.
    args, inputs, grad_outs = bench_ops.make_problem(op, shape, bench_ops.CASES[op][case][1])
    differentiable = bench_ops.differentiable
    got = torch.autograd.grad(differentiable(bench_ops.make_forward(op, "triton")(*args)), inputs, grad_outs)
    want = torch.autograd.grad(differentiable(bench_ops.make_forward(op, "eager")(*args)), inputs, grad_outs)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-3, atol=1e-4)


class RecordOps(TorchDispatchMode):
    """How many times the op `name` ran."""

    def __init__(self, name):
        super().__init__()
        self.name, self.calls = name, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls += func.name() == self.name
        return func(*args, **(kwargs or {}))


@needs_triton
@pytest.mark.parametrize("case", ["stride1", "stride2"])
def test_mixed_op_run_case_times_the_triton_provider(case):
    peaks = _device.device_peaks("a CPU", peak_gbps=10.0, peak_gflops=100.0)
    shape, stride = TINY["mixed_op"][case], mixed_op.CASES[case][1]
    result = mixed_op.run_case(case, "triton", 1, shape, CPU, peaks)
    assert len(result["all_seconds"]) == 1 and result["median_seconds"] > 0 and result["peak_rss_bytes"] > 0
    B = sum(bns for _, bns in reference.mixed_op_layout(stride))
    assert result["saved_bytes"] <= 2 * B * shape[1] * 4  # the fused op keeps the statistics, no activation
    flops, nbytes = mixed_op.flops_and_bytes(shape, stride)
    assert (result["flops"], result["bytes"]) == (flops, nbytes) and flops > 0
    assert result["fraction_of_peak_gflops"] == pytest.approx(flops / result["median_seconds"] / 1e9 / 100.0)
    # What was timed is the fused op on the Triton kernels: its forward agrees with the reference's.
    x, w, weights, _ = mixed_op.make_problem(shape, stride)
    with RecordOps("fastdarts_triton::mixed_ops") as record:
        got = mixed_op.make_forward("triton", stride)(x, w, weights)
    assert record.calls == 1
    torch.testing.assert_close(got, mixed_op.make_forward("eager", stride)(x, w, weights), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("op", ["relu_dwconv", "relu_dwconv_pointwise"])
@pytest.mark.parametrize("stride", [1, 2])
def test_relu_dwconv_flops_match_the_corrected_flop_counter(stride, op):
    shape = (2, 3, 9, 8)
    args, inputs, grad_outs = bench_ops.make_problem(op, shape, stride)
    forward = bench_ops.make_forward(op, "eager")
    counted = _device.count_flops(
        lambda: torch.autograd.grad(bench_ops.differentiable(forward(*args)), inputs, grad_outs)
    )
    assert counted == bench_ops.flops_and_bytes(op, shape, stride)[0]


@pytest.mark.parametrize("stride", [1, 2])
def test_mixed_op_flops_counted_at_batch_1_scale_to_the_batch(stride):
    shape = (3, 4, 6, 6)
    x, w, weights, grad_out = mixed_op.make_problem(shape, stride)
    inputs = [x, w, *weights]
    counted = _device.count_flops(
        lambda: torch.autograd.grad(reference.mixed_op(x, w, weights, stride)[0], inputs, grad_out)
    )
    assert counted == mixed_op.flops_and_bytes(shape, stride)[0] > 0


def test_peaks_come_from_the_flags_then_the_table():
    table = _device.device_peaks("NVIDIA A100-SXM4-80GB")
    assert (table["peak_gbps"], table["peak_gflops"]) == (2039, 19500) and "A100-SXM4-80GB" in table["peaks_from"]
    assert _device.device_peaks("NVIDIA A10")["peak_gbps"] == 600  # not an A100
    assert _device.device_peaks("NVIDIA L40S")["peak_gbps"] is None  # not an L4
    both = _device.device_peaks("NVIDIA A100-SXM4-40GB", peak_gbps=1000.0)
    assert (both["peak_gbps"], both["peak_gflops"]) == (1000.0, 19500)
    assert "--peak_gbps" in both["peaks_from"] and "'A100'" in both["peaks_from"]
    unknown = _device.device_peaks("x86_64")
    assert unknown["peak_gbps"] is None and unknown["peaks_from"].startswith("none")
    assert "fraction_of_peak_gbps" not in _device.throughput(1.0, unknown, flops=10, nbytes=10)


def test_script_on_the_cpu_skips_triton_with_one_line(capsys, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    monkeypatch.setattr(_device, "benchmark_device", lambda: CPU)  # as on a machine without a GPU
    bench_ops.main(["--json", "--batch", "1", "--repeats", "1", "--cases", "stride2", "--providers", "eager"])
    out, err = capsys.readouterr()
    assert err.strip() == _device.TRITON_SKIPPED
    report = json.loads(out)
    assert report["notes"] == [_device.TRITON_SKIPPED] and report["device_type"] == "cpu"
    for op in bench_ops.OPS:
        assert report["ops"][op]["stride2"]["providers"]["eager"]["median_seconds"] > 0
    with pytest.raises(SystemExit):
        bench_ops.main(["--providers", "triton"])
    assert "triton needs a CUDA device" in capsys.readouterr().err


def test_mixed_op_script_on_the_cpu_skips_triton_with_one_line(capsys, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    monkeypatch.setattr(_device, "benchmark_device", lambda: CPU)
    # One case, in one child process.
    mixed_op.main(["--json", "--batch", "1", "--repeats", "1", "--cases", "stride2", "--providers", "eager"])
    out, err = capsys.readouterr()
    assert err.strip() == _device.TRITON_SKIPPED
    report = json.loads(out)
    assert report["notes"] == [_device.TRITON_SKIPPED]
    assert report["cases"]["stride2"]["providers"]["eager"]["median_seconds"] > 0
    with pytest.raises(SystemExit):
        mixed_op.main(["--providers", "triton"])
    assert "triton needs a CUDA device" in capsys.readouterr().err


@pytest.mark.parametrize(
    "flag,message",
    [
        ("--peak_gbps=0", "--peak_gbps: must be a positive number, got 0.0"),
        ("--peak_gflops=nan", "--peak_gflops: must be a positive number, got nan"),
        ("--repeats=0", "--repeats: must be at least 1, got 0"),
        ("--ops=conv", "--ops: unknown op 'conv'"),
    ],
)
def test_bad_flags_are_one_line_errors(capsys, flag, message):
    with pytest.raises(SystemExit):
        bench_ops.main([flag])
    assert message in capsys.readouterr().err.strip().splitlines()[-1]
