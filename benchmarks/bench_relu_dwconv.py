"""pytest-benchmark cases of relu_dwconv forward + backward: the eager reference in both memory layouts
(DESIGN.md 3: quote speedups against the faster one) and the C++ kernel on the CPU, the Triton kernel on CUDA.

    pytest benchmarks/bench_relu_dwconv.py -n 0 --benchmark-enable                          # tiny shapes, timed
    FASTDARTS_BENCH_FULL=1 pytest benchmarks/bench_relu_dwconv.py -n 0 --benchmark-enable   # the DARTS shapes below

The op runs the four first-stage depthwise convolutions of a DARTS edge (3x3, 5x5, 3x3 dilation 2, 5x5
dilation 2) on relu(x): at (N, C, H, W) = (64, 16, 32, 32) stride 1 (a normal cell of the batch-64 search)
and (64, 32, 16, 16) stride 2 (a reduction edge). Each timed call is one forward and one backward for x and
every weight. `extra_info` records the bytes autograd saves for backward, in all and beyond the op's inputs.
The test suite (and CI) runs these with timing disabled, which executes each case once.

With a CUDA device (torch.cuda.is_available()) the cases run there: the reference and "triton" in both layouts
(each timed call ends with torch.cuda.synchronize, so pytest-benchmark's clock sees the kernels). Without one they
run on the CPU and the "triton" cases are skipped with one reason. `python benchmarks/ops.py` times the same op with
CUDA events, peak device memory and GB/s.
"""

import os

import pytest
import torch

from fastdarts import ops
from fastdarts.ops import reference

from ._device import TRITON_SKIPPED

FULL = os.environ.get("FASTDARTS_BENCH_FULL") == "1"
DARTS = [(3, 1), (5, 1), (3, 2), (5, 2)]  # (kernel size, dilation)
CASES = {
    "stride1": ((64, 16, 32, 32) if FULL else (2, 16, 9, 9), 1),
    "stride2": ((64, 32, 16, 16) if FULL else (2, 32, 8, 8), 2),
}
LAYOUTS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# Triton on the CPU only under its interpreter, far too slow to time: those cases are skipped there.
BACKENDS = [b for b in ops.available_backends("relu_dwconv", DEVICE) if DEVICE.type == "cuda" or b != "triton"]
VARIANTS = [
    pytest.param(backend, layout, id=f"{backend}-{layout}")
    for backend in BACKENDS
    for layout in ("contiguous", "channels_last")
] + (
    []
    if "triton" in BACKENDS
    else [
        pytest.param("triton", layout, id=f"triton-{layout}", marks=pytest.mark.skip(reason=TRITON_SKIPPED))
        for layout in ("contiguous", "channels_last")
    ]
)


def make_problem(shape, stride, layout, seed=0, device=DEVICE):
    generator = torch.Generator().manual_seed(seed)  # drawn on the CPU: the same numbers on every device
    memory_format = LAYOUTS[layout]
    x = torch.randn(shape, generator=generator).to(device).contiguous(memory_format=memory_format).requires_grad_()
    C = shape[1]
    weights = [torch.randn(C, 1, k, k, generator=generator).to(device).requires_grad_() for k, _ in DARTS]
    out_shape = reference.relu_dwconv_output_shape(x, stride)
    # Output gradients in the layout the outputs have, as autograd would hand them over.
    grad_outs = [
        torch.randn(out_shape, generator=generator).to(device).contiguous(memory_format=memory_format) for _ in DARTS
    ]
    return x, weights, [d for _, d in DARTS], grad_outs


def forward_backward(x, weights, dilations, stride, grad_outs, backend):
    outs = ops.relu_dwconv(x, weights, dilations, stride, backend=backend)
    grads = torch.autograd.grad(outs, [x, *weights], grad_outs)
    if x.is_cuda:  # the kernels run asynchronously: wait, so that the timer sees them
        torch.cuda.synchronize(x.device)
    return grads


def saved_bytes(x, weights, dilations, stride, backend) -> dict[str, int]:
    """Bytes of the distinct storages autograd saves for backward: all of them, and those beyond the op's own
    inputs (x and the weights, which the caller holds anyway: what the op adds to the memory of a training step)."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        ops.relu_dwconv(x, weights, dilations, stride, backend=backend)
    inputs = {t.untyped_storage().data_ptr() for t in (x, *weights)}
    return {
        "saved_bytes": sum(storages.values()),
        "saved_bytes_beyond_inputs": sum(n for ptr, n in storages.items() if ptr not in inputs),
    }


@pytest.mark.parametrize("backend,layout", VARIANTS)
@pytest.mark.parametrize("case", list(CASES))
def test_relu_dwconv_forward_backward(benchmark, case, backend, layout):
    shape, stride = CASES[case]
    x, weights, dilations, grad_outs = make_problem(shape, stride, layout)
    benchmark.group = f"relu_dwconv {case} {'x'.join(map(str, shape))}"
    benchmark.extra_info.update(shape=list(shape), stride=stride, **saved_bytes(x, weights, dilations, stride, backend))
    got = benchmark(forward_backward, x, weights, dilations, stride, grad_outs, backend)
    expected = forward_backward(x, weights, dilations, stride, grad_outs, "reference")
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-3, atol=1e-3)
