"""Time the building blocks of the mixed op, relu_dwconv, relu_dwconv_pointwise, weighted_sum, pool_bn_stats and
bn_weighted_sum, forward + backward per provider.

    python benchmarks/ops.py --json [--ops relu_dwconv,relu_dwconv_pointwise,weighted_sum,pool_bn_stats,bn_weighted_sum]
                             [--cases stride1,stride2,narrow] [--providers ...]
                             [--repeats 10] [--peak_gbps G --peak_gflops F]

Runs on the CUDA device when torch.cuda.is_available(), else on the CPU (benchmarks/_device.py: timers, peak
memory, peaks). Cases, the tensors of one DARTS edge of the batch-64 search:
- relu_dwconv: ReLU, then the four first-stage depthwise convs of the edge (3x3, 5x5, 3x3 dilation 2, 5x5
  dilation 2), on x = (64, 16, 32, 32) at stride 1 (a normal edge) and (64, 32, 16, 16) at stride 2 (a reduction
  edge);
- relu_dwconv_pointwise: the same, each depthwise conv followed by its 1x1 conv (the first stage of the edge's four
  conv candidates up to their BNs), with the outputs' batch statistics (no gradient);
- weighted_sum: the sum of the K = 7 computed candidates of the edge's mixed op, each of its output shape,
  (64, 16, 32, 32) and (64, 32, 8, 8);
- pool_bn_stats: both 3x3 pools of the edge and their BN statistics, on x = (64, 16, 32, 32) at stride 1 and
  (64, 32, 16, 16) at stride 2 (the backward for both pools; the statistics carry no gradient);
- bn_weighted_sum: the K = 7 candidates' last BNs folded into the weighted sum, at weighted_sum's shapes, with given
  statistics (mean, invstd [K, C], no gradient: the backward for the inputs and w; the path through batch statistics
  is the mixed op's, benchmarks/mixed_op.py).
The "narrow" case (not run by default) gives every op (64, 4, 32, 32) at stride 1: a PC-DARTS normal edge at K = 4.
Providers: "eager-contiguous" and "eager" (the reference in the contiguous and the channels_last layout),
"compile" (torch.compile of the reference, channels_last), "cpp" (the C++ kernel, CPU only) and "triton" (the
Triton kernel, channels_last; CUDA only: on the CPU it is skipped with one printed line, and runs only if asked
for by name under TRITON_INTERPRET=1, where its times mean nothing). Each timed call is one forward and one backward
for every input; all cases run in this process.

FLOPs and bytes of one forward + backward, from the shapes (E bytes per element, a multiply-add is 2 FLOPs):
- relu_dwconv, x [N, C, H, W], K kernels k_i x k_i, outputs [N, C, Ho, Wo]:
  FLOPs = 3 * sum_i 2 N C Ho Wo k_i^2 (the forward, grad_x and grad_w are one convolution's worth each, padding taps
  included, as torch.utils.flop_counter counts them);
  bytes = E * (3 N C H W + 2 K N C Ho Wo + 3 C sum_i k_i^2): x read by the forward and the backward and grad_x
  written, each output written and its gradient read, the weights read twice and their gradients written.
- relu_dwconv_pointwise: relu_dwconv's, plus 3 * K * 2 N C^2 Ho Wo FLOPs for the 1x1 convs (forward, input and weight
  gradients) and E * 3 K C^2 bytes for their weights (the depthwise outputs are never stored).
- weighted_sum, K inputs of n elements: FLOPs = 5 K n (the forward's K multiply-adds per element, the backward's K
  products for the grad_xs and K multiply-adds for grad_w); bytes = E * ((3 K + 2) n + 3 K): the inputs read by the
  forward and the backward and their gradients written, the output written and its gradient read, w read twice and
  grad_w written.
- pool_bn_stats, x [N, C, H, W], pools [N, C, Ho, Wo]: no FLOPs counted (comparisons and additions, which
  torch.utils.flop_counter does not count either), so no GFLOP/s; bytes = E * (3 N C H W + 4 N C Ho Wo + 4 C): x read
  by the forward and by the backward (which recomputes the argmax) and grad_x written, both pools written and their
  gradients read, the [2, C] mean and variance written.
- bn_weighted_sum, K inputs of n elements with C channels: FLOPs = 7 K n (the forward's subtraction, product and
  sum per input and element, the backward's product for the grad_ts and subtraction, product and sum for grad_w);
  bytes = E * ((3 K + 2) n + 3 K + 4 K C): weighted_sum's, and the statistics read by the forward and the backward.
The bytes are the least a fused forward + backward must move (relu(x) recomputed, never stored), the same for every
provider: GB/s is that traffic over the measured time, so a provider that moves more shows a lower figure than the
bandwidth it used. Prints one JSON object (with --json) or a table; notes (such as the Triton skip) go to stderr.
"""

from __future__ import annotations

import argparse
import sys

import torch
from torch.utils import _pytree as pytree

from fastdarts import ops
from fastdarts.ops import reference

if __package__:
    from . import _device, _report
else:  # run as a script: benchmarks/ is sys.path[0]
    import _device
    import _report

OPS = ("relu_dwconv", "relu_dwconv_pointwise", "weighted_sum", "pool_bn_stats", "bn_weighted_sum")
DARTS = [(3, 1), (5, 1), (3, 2), (5, 2)]  # (kernel size, dilation)
K_CANDIDATES = len(ops.MIXED_OP_CANDIDATES)
# op -> case -> (shape, stride): relu_dwconv's and pool_bn_stats's x, weighted_sum's and bn_weighted_sum's inputs (the
# mixed op's output at that stride). "narrow": a PC-DARTS normal edge at K = 4, its ops on 4 of the 16 channels (the
# CPU kernels pack 4 columns to a 64-byte vector there).
CASES = {
    "relu_dwconv": {"stride1": ((64, 16, 32, 32), 1), "stride2": ((64, 32, 16, 16), 2)},
    "relu_dwconv_pointwise": {"stride1": ((64, 16, 32, 32), 1), "stride2": ((64, 32, 16, 16), 2)},
    "weighted_sum": {"stride1": ((64, 16, 32, 32), 1), "stride2": ((64, 32, 8, 8), 2)},
    "pool_bn_stats": {"stride1": ((64, 16, 32, 32), 1), "stride2": ((64, 32, 16, 16), 2)},
    "bn_weighted_sum": {"stride1": ((64, 16, 32, 32), 1), "stride2": ((64, 32, 8, 8), 2)},
}
for _cases in CASES.values():
    _cases["narrow"] = ((64, 4, 32, 32), 1)

PROVIDERS = ("eager-contiguous", "eager", "cpp", "compile", "triton")
BACKEND_OF = {"eager-contiguous": "reference", "eager": "reference", "cpp": "cpp", "triton": "triton"}


def default_providers(device: torch.device) -> list[str]:
    if device.type == "cuda":
        return ["eager-contiguous", "eager", "compile", "triton"]
    cpp = ["cpp"] if all("cpp" in ops.available_backends(op, "cpu") for op in OPS) else []
    return ["eager-contiguous", "eager", *cpp, "compile"]


def make_problem(op: str, shape, stride: int, layout=torch.channels_last, device="cpu", seed=0):
    """(args, inputs, grad_outs): the op's arguments, the tensors among them to differentiate for, and one gradient
    per differentiable output, laid out like the outputs (as autograd hands them over)."""
    generator = torch.Generator().manual_seed(seed)

    def randn(*size, scale=1.0):
        return (scale * torch.randn(size, generator=generator)).to(device)

    if op in ("relu_dwconv", "relu_dwconv_pointwise"):
        x = randn(*shape).contiguous(memory_format=layout).requires_grad_()
        weights = [randn(shape[1], 1, k, k).requires_grad_() for k, _ in DARTS]
        out_shape = reference.relu_dwconv_output_shape(x, stride)
        grad_outs = [randn(*out_shape).contiguous(memory_format=layout) for _ in DARTS]
        dilations = [d for _, d in DARTS]
        if op == "relu_dwconv":
            return (x, weights, dilations, stride), [x, *weights], grad_outs
        pointwise = [randn(shape[1], shape[1], 1, 1, scale=0.25).requires_grad_() for _ in DARTS]
        return (x, weights, pointwise, dilations, stride), [x, *weights, *pointwise], grad_outs
    if op == "pool_bn_stats":
        x = randn(*shape).contiguous(memory_format=layout).requires_grad_()
        out_shape = reference.pool_bn_stats_output_shape(x, stride)
        return (x, stride), [x], [randn(*out_shape).contiguous(memory_format=layout) for _ in range(2)]
    xs = [randn(*shape).contiguous(memory_format=layout).requires_grad_() for _ in range(K_CANDIDATES)]
    w = randn(K_CANDIDATES).softmax(0).requires_grad_()
    grad_outs = [randn(*shape).contiguous(memory_format=layout)]
    if op == "bn_weighted_sum":
        mean, invstd = randn(K_CANDIDATES, shape[1], scale=0.1), 1 + randn(K_CANDIDATES, shape[1], scale=0.1).abs()
        return (xs, w, mean, invstd), [*xs, w], grad_outs
    return (xs, w), [*xs, w], grad_outs


def make_forward(op: str, provider: str):
    """The forward to time: args -> list of outputs (every output: compile must not drop the statistics)."""

    def as_list(out):  # relu_dwconv_pointwise returns (outs, mean, var): every tensor, flat
        return pytree.tree_leaves(out)

    if provider == "compile":
        return torch.compile(lambda *args: as_list(getattr(reference, op)(*args)))
    backend = BACKEND_OF[provider]
    return lambda *args: as_list(getattr(ops, op)(*args, backend=backend))


def differentiable(outputs: list) -> list:
    """The outputs that carry a gradient (pool_bn_stats's statistics do not), which grad_outs match."""
    return [out for out in outputs if out.requires_grad]


def flops_and_bytes(op: str, shape, stride: int, element_size: int = 4) -> tuple[int | None, int]:
    """The FLOPs (None: not counted) and the least bytes of one forward + backward (the module docstring says how)."""
    N, C, H, W = shape
    if op == "pool_bn_stats":
        Ho, Wo = (H - 1) // stride + 1, (W - 1) // stride + 1
        return None, element_size * (3 * N * C * H * W + 4 * N * C * Ho * Wo + 4 * C)
    if op in ("relu_dwconv", "relu_dwconv_pointwise"):
        Ho, Wo = (H - 1) // stride + 1, (W - 1) // stride + 1
        taps, K = sum(k * k for k, _ in DARTS), len(DARTS)
        flops = 3 * 2 * N * C * Ho * Wo * taps
        nbytes = element_size * (3 * N * C * H * W + 2 * K * N * C * Ho * Wo + 3 * C * taps)
        if op == "relu_dwconv_pointwise":
            flops += 3 * K * 2 * N * C * C * Ho * Wo
            nbytes += element_size * 3 * K * C * C
        return flops, nbytes
    n, K = N * C * H * W, K_CANDIDATES
    if op == "bn_weighted_sum":
        return 7 * K * n, element_size * ((3 * K + 2) * n + 3 * K + 4 * K * C)
    return 5 * K * n, element_size * ((3 * K + 2) * n + 3 * K)


def saved_bytes_beyond_inputs(forward, args) -> int:
    """Bytes of the distinct storages autograd saves for backward beyond the op's tensor arguments (which the caller
    holds anyway): what the op adds to a training step's memory."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward(*args)
    held = {t.untyped_storage().data_ptr() for t in pytree.tree_leaves(args) if isinstance(t, torch.Tensor)}
    return sum(size for ptr, size in storages.items() if ptr not in held)


def run_case(op, case, provider, device, timer, peaks, shape=None) -> dict:
    """Time one (op, case, provider) on `device` with `timer` (benchmarks/_device.py)."""
    default_shape, stride = CASES[op][case]
    shape = shape or default_shape
    layout = torch.contiguous_format if provider == "eager-contiguous" else torch.channels_last
    args, inputs, grad_outs = make_problem(op, shape, stride, layout, device)
    forward = make_forward(op, provider)

    def step():
        return torch.autograd.grad(differentiable(forward(*args)), inputs, grad_outs)

    result = _device.measure(step, timer, torch.device(device))
    result["saved_bytes_beyond_inputs"] = saved_bytes_beyond_inputs(forward, args)
    flops, nbytes = flops_and_bytes(op, shape, stride, inputs[0].element_size())
    result.update(_device.throughput(result["median_seconds"], peaks, flops, nbytes))
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ops", default=",".join(OPS), help=f"comma-separated, from {', '.join(OPS)}")
    parser.add_argument("--cases", default="stride1,stride2", help="comma-separated, from stride1, stride2, narrow")
    parser.add_argument(
        "--providers", default=None, help=f"comma-separated, from {', '.join(PROVIDERS)} (default: those of the device)"
    )
    parser.add_argument("--repeats", type=int, default=10, help="CPU: timed calls per case after one warm-up")
    parser.add_argument("--batch", type=int, default=None, help="override the batch size of every case (tests)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args, device, peaks = _report.parse_device_args(parser, argv)
    if args.repeats < 1:
        parser.error(f"--repeats: must be at least 1, got {args.repeats}")
    if args.batch is not None and args.batch < 1:
        parser.error(f"--batch: must be at least 1, got {args.batch}")

    op_names = _report.choices(parser, "ops", args.ops, OPS)
    cases = _report.choices(parser, "cases", args.cases, list(CASES[OPS[0]]))
    providers = _report.choices(parser, "providers", args.providers, PROVIDERS, default_providers(device))
    for provider in providers:
        backend = BACKEND_OF.get(provider, "reference")
        for op in op_names:
            if backend not in ops.available_backends(op, device):
                if provider == "triton":
                    parser.error("--providers: triton needs a CUDA device (or TRITON_INTERPRET=1 on the CPU)")
                parser.error(f"--providers: {provider} does not run {op} on {device.type} tensors")

    notes = _report.triton_notes(providers, device)
    timer, timer_description = _device.timer_for(device, args.repeats)
    results: dict[str, dict] = {}
    for op in op_names:
        for case in cases:
            shape, stride = CASES[op][case]
            shape = shape if args.batch is None else (args.batch, *shape[1:])
            entry = results.setdefault(op, {})[case] = {"shape": list(shape), "stride": stride, "providers": {}}
            for provider in providers:  # alternate inside each case, so drifting load hits the providers alike
                entry["providers"][provider] = run_case(op, case, provider, device, timer, peaks, shape)
    report = {**_report.common_fields(device, peaks, timer_description, notes), "ops": results}
    rows = [
        f"{op} {case} {provider:>16}: {1e3 * c['median_seconds']:8.3f} ms median" + _device.describe(c)
        for op, by_case in results.items()
        for case, r in by_case.items()
        for provider, c in r["providers"].items()
    ]
    _report.print_report(report, args.json, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
