"""Count (not time) the FLOPs of one first-order search step: the share of DARTS's work a method's step computes,
and the recurrent step whose count sets its compute floor.

    python benchmarks/step_flops.py [--methods darts,pc-darts,gdas] [--batch 8] [--size 16] [--samples 10]
    python benchmarks/step_flops.py --space rnn [--batch 256] [--nhid 300] [--bptt 35] [--ntoken 10000]

CNN: the step of benchmarks/search_step.py (C=16, 8 cells; weight step and architecture step in the method's order)
on the reference backend, whose convolutions torch.utils.flop_counter sees; a sampling method's count is the mean
over `--samples` steps (each draws its own ops), printed with its range and its ratio to DARTS's. RNN: the alpha
step and the weight step of benchmarks/rnn_search_step.py, first order. Counted by benchmarks/_device.count_flops:
matmuls and convolutions, forward and backward; element-wise work, BN and pools are not counted.
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch

if __package__:
    from . import _device, rnn_search_step, search_step
else:  # run from a script: benchmarks/ is sys.path[0]
    import _device
    import rnn_search_step
    import search_step

from fastdarts import ops
from fastdarts.bilevel import Architect
from fastdarts.config import run_cli
from fastdarts.errors import ConfigError
from fastdarts.methods import METHODS
from fastdarts.rnn.loop import lm_weight_step


def cnn_step_flops(method: str, batch: int, size: int, samples: int) -> list[int]:
    """FLOPs of `samples` consecutive first-order steps of `method` (one unless the method samples its ops)."""
    model, optimizer, (train, val) = search_step.make_problem(batch, 16, 8, size, method=method)
    architect = Architect(model, optimizer)
    counts = samples if model.method.samples_each_forward else 1
    with ops.use_backend("reference"):
        return [_device.count_flops(lambda: search_step.search_step(model, optimizer, architect, train, val))
                for _ in range(counts)]  # fmt: skip


def rnn_step_flops(batch: int, nhid: int, bptt: int, ntoken: int) -> tuple[int, int]:
    """(alpha step, weight step) FLOPs of the recurrent search, first order, fused node."""
    model, optimizer, architect, config, train, val = rnn_search_step.make_problem("fused", "first", batch, nhid,
                                                                                  bptt, ntoken)  # fmt: skip
    hidden = model.init_hidden(batch)
    alpha = _device.count_flops(lambda: architect.step(train, val, hidden, hidden, config.lr))
    weight = _device.count_flops(lambda: lm_weight_step(model, optimizer, *train, hidden, config.lr, config))
    return alpha, weight


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--space", choices=("cnn", "rnn"), default="cnn")
    parser.add_argument("--methods", default="darts,pc-darts,gdas", help="cnn: comma-separated, darts first")
    parser.add_argument("--batch", type=int, default=None, help="default 8 (cnn), 256 (rnn)")
    parser.add_argument("--size", type=int, default=16, help="cnn: image side")
    parser.add_argument("--samples", type=int, default=10, help="cnn: steps counted for a sampling method")
    parser.add_argument("--nhid", type=int, default=300)
    parser.add_argument("--bptt", type=int, default=35)
    parser.add_argument("--ntoken", type=int, default=10000)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    if args.space == "rnn":
        alpha, weight = rnn_step_flops(args.batch or 256, args.nhid, args.bptt, args.ntoken)
        print(f"recurrent first-order step: alpha step {alpha / 1e9:.1f} GFLOP, weight step {weight / 1e9:.1f} "
              f"GFLOP, whole {(alpha + weight) / 1e9:.1f} GFLOP")  # fmt: skip
        return 0
    methods = args.methods.split(",")
    unknown = [m for m in methods if m not in METHODS]
    if unknown or methods[0] != "darts":
        raise ConfigError(f"--methods must start with darts and name methods of {', '.join(METHODS)}, "
                          f"got {args.methods!r}")  # fmt: skip
    if min(args.batch or 8, args.size, args.samples) < 1:
        raise ConfigError("--batch, --size and --samples must be >= 1")
    darts = None
    for method in methods:
        counts = cnn_step_flops(method, args.batch or 8, args.size, args.samples)
        mean = statistics.mean(counts)
        darts = darts or mean
        print(f"{method}: {mean / 1e9:.3f} GFLOP per step (range {min(counts) / 1e9:.3f}-{max(counts) / 1e9:.3f} "
              f"over {len(counts)} step(s)), {mean / darts:.3f} of DARTS's")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
