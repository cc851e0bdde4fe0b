"""Time one DARTS mixed op (one edge, all 7 computed candidates) forward + backward per provider.

    python benchmarks/mixed_op.py --json [--repeats 10] [--providers eager-contiguous,eager,cpp,compile]

Cases: (N, C, H, W) = (64, 16, 32, 32) at stride 1 (a normal-cell edge of the batch-64 search) and
(64, 32, 16, 16) at stride 2 (a reduction edge). Providers: the eager reference (ops.mixed_op on "reference":
DARTS's ops in eager PyTorch) on a contiguous and on a channels_last input, the fused op ("cpp"), and
torch.compile (inductor) of the reference on channels_last. Each timed call is one forward and one backward
for x, the 7 candidate weights and every conv weight. Every (case, provider) runs in a fresh child process, so
its peak RSS is its own; the providers alternate inside each case, so drifting load hits them alike. Prints one
JSON object (with --json) or a table.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from fastdarts import ops
from fastdarts.ops import reference

CASES = {"stride1": ((64, 16, 32, 32), 1), "stride2": ((64, 32, 16, 16), 2)}
PROVIDERS = ("eager-contiguous", "eager", "cpp", "compile")


def make_problem(shape, stride, layout=torch.channels_last, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=generator).contiguous(memory_format=layout).requires_grad_()
    w = torch.randn(len(ops.MIXED_OP_CANDIDATES), generator=generator).softmax(0).requires_grad_()
    shapes = ops.mixed_op_weight_shapes(shape[1], stride)
    weights = [(0.3 * torch.randn(s, generator=generator)).requires_grad_() for s in shapes]
    grad_out = torch.randn(reference.mixed_op_output_shape(x, stride), generator=generator)
    return x, w, weights, grad_out.contiguous(memory_format=layout)


def make_forward(provider: str, stride: int):
    """The forward to time: (x, w, weights) -> out."""
    if provider == "compile":
        return torch.compile(lambda x, w, weights: reference.mixed_op(x, w, weights, stride)[0])
    backend = "cpp" if provider == "cpp" else "reference"
    return lambda x, w, weights: ops.mixed_op(x, w, weights, stride, backend=backend)[0]


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


def run_case(case: str, provider: str, repeats: int, shape=None) -> dict:
    default_shape, stride = CASES[case]
    layout = torch.contiguous_format if provider == "eager-contiguous" else torch.channels_last
    x, w, weights, grad_out = make_problem(shape or default_shape, stride, layout)
    forward = make_forward(provider, stride)

    def step():
        torch.autograd.grad(forward(x, w, weights), [x, w, *weights], grad_out)

    step()  # warm-up (and, for compile, the compilation)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return {
        "median_seconds": statistics.median(times),
        "all_seconds": [round(t, 5) for t in times],
        "saved_bytes": saved_bytes(forward, x, w, weights),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10, help="timed calls per case (after one warm-up)")
    parser.add_argument("--providers", default=None, help=f"comma-separated from {', '.join(PROVIDERS)} (default: all)")
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, from {', '.join(CASES)}")
    parser.add_argument("--batch", type=int, default=None, help="override the batch size of every case (tests)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--one_case", help=argparse.SUPPRESS)  # CASE:PROVIDER, used by the parent
    args = parser.parse_args(argv)

    def shape_of(case):
        shape = CASES[case][0]
        return shape if args.batch is None else (args.batch, *shape[1:])

    if args.one_case:
        case, provider = args.one_case.split(":")
        print(json.dumps(run_case(case, provider, args.repeats, shape_of(case))))
        return 0
    providers = args.providers.split(",") if args.providers else list(PROVIDERS)
    if "cpp" in providers and "cpp" not in ops.available_backends("mixed_op", "cpu"):
        parser.error("--providers: cpp is not available (the C++ extension is not built)")
    for name, allowed in ((p, PROVIDERS) for p in providers):
        if name not in allowed:
            parser.error(f"--providers: unknown provider {name!r}; choose from {', '.join(PROVIDERS)}")
    cases = args.cases.split(",")
    for case in cases:
        if case not in CASES:
            parser.error(f"--cases: unknown case {case!r}; choose from {', '.join(CASES)}")

    results: dict[str, dict] = {}
    for case in cases:
        results[case] = {"shape": list(shape_of(case)), "stride": CASES[case][1], "providers": {}}
        for provider in providers:
            child = subprocess.run(
                [sys.executable, str(Path(__file__).resolve()), *(argv or sys.argv[1:]), "--one_case",
                 f"{case}:{provider}"],
                capture_output=True,
                text=True,
            )  # fmt: skip
            if child.returncode != 0:
                tail = child.stderr.strip().splitlines()[-1:] or [f"exit status {child.returncode}"]
                raise SystemExit(f"case {case}:{provider} failed: {tail[0]}")
            results[case]["providers"][provider] = json.loads(child.stdout)
    report = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "repeats": args.repeats,
        "cases": results,
    }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for case, r in results.items():
            for provider, c in r["providers"].items():
                print(
                    f"{case} {provider:>16}: {1e3 * c['median_seconds']:8.2f} ms median, saved for backward "
                    f"{c['saved_bytes'] / 2**20:8.2f} MiB, peak RSS {c['peak_rss_bytes'] / 2**20:7.0f} MiB"
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
