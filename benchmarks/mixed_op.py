"""Time one DARTS mixed op (one edge, all 7 computed candidates) forward + backward per provider.

    python benchmarks/mixed_op.py --json [--repeats 10] [--providers eager-contiguous,eager,cpp,compile,triton]
                                  [--peak_gbps G --peak_gflops F]

Cases: (N, C, H, W) = (64, 16, 32, 32) at stride 1 (a normal-cell edge of the batch-64 search) and
(64, 32, 16, 16) at stride 2 (a reduction edge). Providers: the eager reference (ops.mixed_op on "reference":
DARTS's ops in eager PyTorch) on a contiguous and on a channels_last input, the fused op on the C++ kernels
("cpp", CPU only; "cpp-no-recompute" keeps the edge's intermediates instead of recomputing them, not run by
default), torch.compile (inductor) of the reference on channels_last, and the fused op on the Triton
kernels ("triton", channels_last; CUDA only: on the CPU it is skipped with one printed line, and runs only if asked
for by name under TRITON_INTERPRET=1, where its times mean nothing). Each timed call is one forward and one
backward for x, the 7 candidate weights and every conv weight. Every (case, provider) runs in a fresh child
process, so its peak RSS is its own; the providers alternate inside each case, so drifting load hits them alike.

On a CUDA device (torch.cuda.is_available()) the tensors live there and the providers are eager-contiguous, eager,
compile and triton; the times come from CUDA events and each case also reports its peak device memory
(benchmarks/_device.py).

Every case reports GFLOP/s and GB/s (and their fractions of the peaks, when known), from:
- FLOPs: the convolutions of one eager forward + backward as benchmarks/_device.count_flops counts them (the
  depthwise, pointwise and FactorizedReduce convs and their input and weight gradients; BN, pools and sums not
  counted), counted at batch 1 on the CPU and multiplied by the batch size (conv FLOPs scale with it);
- bytes: E * (3 |x| + 2 |out| + 3 (|weights| + 7)), E bytes per element: x read by the forward and the backward and
  grad_x written, out written and its gradient read, the conv weights and w read twice and their gradients written.
  That is the least a fused forward + backward moves, the same for every provider (the eager one moves far more).
Prints one JSON object (with --json) or a table; notes (such as the Triton skip) go to stderr.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys

import torch

from fastdarts import ops
from fastdarts.ops import reference

if __package__:
    from . import _device, _report
else:  # run as a script: benchmarks/ is sys.path[0]
    import _device
    import _report

CASES = {"stride1": ((64, 16, 32, 32), 1), "stride2": ((64, 32, 16, 16), 2)}
PROVIDERS = ("eager-contiguous", "eager", "cpp", "cpp-no-recompute", "compile", "triton")
BACKEND_OF = {
    "eager-contiguous": "reference",
    "eager": "reference",
    "compile": "reference",
    "cpp": "cpp",
    "cpp-no-recompute": "cpp",  # keeps the edge's intermediates for the backward instead of recomputing them
    "triton": "triton",
}


def default_providers(device: torch.device) -> list[str]:
    if device.type == "cuda":
        return ["eager-contiguous", "eager", "compile", "triton"]
    cpp = ["cpp"] if "cpp" in ops.available_backends("mixed_op", "cpu") else []
    return ["eager-contiguous", "eager", *cpp, "compile"]


def make_problem(shape, stride, layout=torch.channels_last, seed=0, device="cpu"):
    generator = torch.Generator().manual_seed(seed)  # drawn on the CPU, so every device gets the same numbers
    x = torch.randn(shape, generator=generator).to(device).contiguous(memory_format=layout).requires_grad_()
    w = torch.randn(len(ops.MIXED_OP_CANDIDATES), generator=generator).softmax(0).to(device).requires_grad_()
    shapes = ops.mixed_op_weight_shapes(shape[1], stride)
    weights = [(0.3 * torch.randn(s, generator=generator)).to(device).requires_grad_() for s in shapes]
    grad_out = torch.randn(reference.mixed_op_output_shape(x, stride), generator=generator).to(device)
    return x, w, weights, grad_out.contiguous(memory_format=layout)


def flops_and_bytes(shape, stride: int, element_size: int = 4) -> tuple[int, int]:
    """FLOPs and least bytes of one forward + backward (the module docstring says how)."""
    x, w, weights, grad_out = make_problem((1, *shape[1:]), stride)
    inputs = [x, w, *weights]
    flops = shape[0] * _device.count_flops(
        lambda: torch.autograd.grad(reference.mixed_op(x, w, weights, stride)[0], inputs, grad_out)
    )
    elements = 3 * x.numel() * shape[0] + 2 * grad_out.numel() * shape[0] + 3 * (sum(t.numel() for t in weights) + 7)
    return flops, element_size * elements


def make_forward(provider: str, stride: int):
    """The forward to time: (x, w, weights) -> out."""
    if provider == "compile":
        return torch.compile(lambda x, w, weights: reference.mixed_op(x, w, weights, stride)[0])
    backend, recompute = BACKEND_OF[provider], provider != "cpp-no-recompute"
    return lambda x, w, weights: ops.mixed_op(x, w, weights, stride, recompute=recompute, backend=backend)[0]


def saved_bytes(forward, x, w, weights) -> int:
    """Bytes of the distinct storages autograd saves for the backward of one forward, beyond the op's inputs (which
    the caller holds anyway): what the op adds to a training step's memory."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward(x, w, weights)
    del out
    inputs = {t.untyped_storage().data_ptr() for t in (x, w, *weights)}
    return sum(size for ptr, size in storages.items() if ptr not in inputs)


def run_case(case: str, provider: str, repeats: int, shape=None, device="cpu", peaks=None) -> dict:
    """One (case, provider) on `device`: times (one warm-up first, which for compile compiles), saved bytes, peak
    RSS, on CUDA peak device memory, and the achieved rates (against `peaks`, from _device.device_peaks)."""
    device = torch.device(device)
    shape = shape or CASES[case][0]
    stride = CASES[case][1]
    layout = torch.contiguous_format if provider == "eager-contiguous" else torch.channels_last
    x, w, weights, grad_out = make_problem(shape, stride, layout, device=device)
    forward = make_forward(provider, stride)

    def step():
        torch.autograd.grad(forward(x, w, weights), [x, w, *weights], grad_out)

    result = _device.measure(step, _device.timer_for(device, repeats)[0], device)
    result["saved_bytes"] = saved_bytes(forward, x, w, weights)
    result["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    flops, nbytes = flops_and_bytes(shape, stride, x.element_size())  # after the RSS: it runs an eager step
    result.update(_device.throughput(result["median_seconds"], peaks or {}, flops, nbytes))
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10, help="timed calls per case (after one warm-up)")
    parser.add_argument("--providers", default=None, help=f"comma-separated from {', '.join(PROVIDERS)} (default: all)")
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, from {', '.join(CASES)}")
    parser.add_argument("--batch", type=int, default=None, help="override the batch size of every case (tests)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--one_case", help=argparse.SUPPRESS)  # CASE:PROVIDER, used by the parent
    args, device, peaks = _report.parse_device_args(parser, argv)

    def shape_of(case):
        shape = CASES[case][0]
        return shape if args.batch is None else (args.batch, *shape[1:])

    if args.one_case:
        case, provider = args.one_case.split(":")
        print(json.dumps(run_case(case, provider, args.repeats, shape_of(case), device, peaks)))
        return 0
    providers = _report.choices(parser, "providers", args.providers, PROVIDERS, default_providers(device))
    for provider in providers:
        if BACKEND_OF[provider] not in ops.available_backends("mixed_op", device):
            if provider == "triton":
                parser.error("--providers: triton needs a CUDA device (or TRITON_INTERPRET=1 on the CPU)")
            if provider == "cpp" and device.type == "cpu":
                parser.error("--providers: cpp is not available (the C++ extension is not built)")
            parser.error(f"--providers: {provider} does not run the mixed op on {device.type} tensors")
    cases = _report.choices(parser, "cases", args.cases, CASES)

    notes = _report.triton_notes(providers, device)
    results: dict[str, dict] = {}
    for case in cases:
        results[case] = {"shape": list(shape_of(case)), "stride": CASES[case][1], "providers": {}}
        for provider in providers:
            results[case]["providers"][provider] = _report.run_child(__file__, argv, f"{case}:{provider}")
    timer = _device.timer_for(device, args.repeats)[1]
    report = {**_report.common_fields(device, peaks, timer, notes), "repeats": args.repeats, "cases": results}
    rows = [
        f"{case} {provider:>16}: {1e3 * c['median_seconds']:8.2f} ms median, saved for backward "
        f"{c['saved_bytes'] / 2**20:8.2f} MiB, peak RSS {c['peak_rss_bytes'] / 2**20:7.0f} MiB" + _device.describe(c)
        for case, r in results.items()
        for provider, c in r["providers"].items()
    ]
    _report.print_report(report, args.json, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
