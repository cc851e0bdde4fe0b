"""Time the first-order search steps of several methods beside DARTS's, interleaved in one process: each method's
share of a DARTS step, beside its share of DARTS's FLOPs (step_flops.py).

    python benchmarks/method_shares.py [--json] [--methods darts,gdas,pc-darts] [--rounds 5] [--batch 64]
                                       [--size 32] [--no_flops] [--cpu_isa avx2]

Every method's network (search_step.py's: C=16, 8 cells, 10 classes, random data) is built first; then each round
runs one step of each method in turn, so that a drifting machine (the project's VMs moved by up to 2x from one minute
to the next) slows them alike, and a method's share is the median over the rounds of its step over DARTS's step of
the same round. Each method runs on the device's fused kernels (cpp on the CPU, triton on CUDA) with the recompute
setting its search takes on the CIFAR-setting data sets (fastdarts.config.SearchConfig: DARTS recomputes its edges'
intermediates, GDAS, PC-DARTS and PR-DARTS keep them), all at the same batch. The FLOP shares are step_flops.py's,
counted on the eager reference at batch 8 and 16x16 images (a share does not depend on the batch); --no_flops skips
them. Prints one JSON object (with --json) or a table.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from fastdarts import ops
from fastdarts.bilevel import Architect
from fastdarts.config import SearchConfig
from fastdarts.memory import objects_so_far_frozen
from fastdarts.methods import METHODS

if __package__:
    from . import _report, search_step, step_flops
else:  # run as a script: benchmarks/ is sys.path[0]
    import _report
    import search_step
    import step_flops


def preset_recompute(method: str) -> bool:
    """Whether `method`'s search recomputes its edges' intermediates on the CIFAR-setting data sets."""
    return SearchConfig(dataset="cifar10", data=".", method=method).resolved().recompute


def time_rounds(methods: list[str], rounds: int, batch: int, size: int, device: torch.device,
                backend: str) -> dict[str, dict]:  # fmt: skip
    """Per method: its recompute setting and the seconds of its step on `backend` in each round (after one warm-up
    step each)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    steps, results = {}, {}
    for method in methods:
        recompute = preset_recompute(method)
        model, optimizer, (train, val) = search_step.make_problem(batch, 16, 8, size, device=device,
                                                                  recompute=recompute, method=method)  # fmt: skip
        architect = Architect(model, optimizer)
        steps[method] = lambda m=model, o=optimizer, a=architect, t=train, v=val: search_step.search_step(m, o, a, t, v)
        results[method] = {"recompute": recompute, "all_seconds": []}
    with ops.use_backend(backend), objects_so_far_frozen():  # as a search's loop runs its steps
        for step in steps.values():
            step()
        for _ in range(rounds):
            for method, step in steps.items():
                sync()
                start = time.perf_counter()
                step()
                sync()
                results[method]["all_seconds"].append(time.perf_counter() - start)
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="darts,gdas,pc-darts", help="comma-separated, darts first")
    parser.add_argument("--rounds", type=int, default=5, help="steps of each method, one per round, after a warm-up")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--size", type=int, default=32, help="image height and width")
    parser.add_argument("--no_flops", action="store_true", help="skip the FLOP shares")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args, device, peaks = _report.parse_device_args(parser, argv)
    methods = _report.choices(parser, "methods", args.methods, tuple(METHODS))
    if methods[0] != "darts" or len(set(methods)) != len(methods):
        parser.error(f"--methods: darts first, each method once, got {args.methods!r}")
    for flag in ("rounds", "batch", "size"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag}: must be at least 1, got {getattr(args, flag)}")
    backend = "triton" if device.type == "cuda" else "cpp"
    if backend not in ops.available_backends(device=device):
        parser.error(f"the fused kernels ({backend}) do not run on {device.type} tensors in this process")

    results = time_rounds(methods, args.rounds, args.batch, args.size, device, backend)
    darts_seconds = results["darts"]["all_seconds"]
    darts_flops = None
    for method in methods:
        result = results[method]
        result["median_seconds"] = statistics.median(result["all_seconds"])
        shares = [s / d for s, d in zip(result["all_seconds"], darts_seconds)]
        result["share_of_darts"] = statistics.median(shares)
        result["share_range"] = [min(shares), max(shares)]
        if not args.no_flops:
            flops = statistics.mean(step_flops.cnn_step_flops(method, 8, 16, samples=10))
            darts_flops = darts_flops or flops
            result["flop_share"] = flops / darts_flops
    timer = f"time.perf_counter, one step of each method a round, {args.rounds} round(s) after one warm-up step each"
    report = {"case": {"batch": args.batch, "C": 16, "layers": 8, "size": args.size, "backend": backend},
              **_report.common_fields(device, peaks, timer, []), "methods": results}  # fmt: skip
    rows = [
        f"{method:>12}: {r['median_seconds']:.3f} s median, {r['share_of_darts']:.3f} of DARTS's step "
        f"(rounds {r['share_range'][0]:.3f}-{r['share_range'][1]:.3f})"
        + ("" if args.no_flops else f", FLOP share {r['flop_share']:.3f}")
        + f", {'recomputing' if r['recompute'] else 'keeping'} intermediates"
        for method, r in results.items()
    ]
    _report.print_report(report, args.json, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
