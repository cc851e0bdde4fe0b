"""Time one DARTS search step per backend, in one process, and count the bytes saved for backward.

    python benchmarks/search_step.py --json [--batch 64] [--repeats 3] [--backends reference,cpp]

A first-order step is an architecture step on one batch plus a weight step on another; a
second-order step replaces the architecture step by the unrolled one (METHOD.md 1.3). The
network is `SearchNetwork(C=16, layers=8, num_classes=10)` on random 3x32x32 data unless the
flags say otherwise. Prints one JSON object (with --json) or a table.
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from fastdarts import SearchNetwork, ops
from fastdarts.bilevel import Architect


def make_problem(batch: int, C: int, layers: int, size: int, seed: int = 0):
    torch.manual_seed(seed)
    model = SearchNetwork(C=C, num_classes=10, layers=layers, in_channels=3)
    weight_optimizer = torch.optim.SGD(model.weight_parameters(), 0.025, momentum=0.9, weight_decay=3e-4)
    batches = [(torch.randn(batch, 3, size, size), torch.randint(0, 10, (batch,))) for _ in range(2)]
    return model, weight_optimizer, batches


def search_step(model, weight_optimizer, architect, train_batch, val_batch, lr=0.025):
    architect.step(train_batch, val_batch, lr)
    weights = model.weight_parameters()
    weight_optimizer.zero_grad(set_to_none=True)
    F.cross_entropy(model(train_batch[0]), train_batch[1]).backward(inputs=weights)
    torch.nn.utils.clip_grad_norm_(weights, 5.0)
    weight_optimizer.step()


def saved_bytes_of_forward(model, x, y) -> int:
    """Bytes of the distinct storages autograd saves for the backward of one training forward."""
    storages: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = F.cross_entropy(model(x), y)
    del loss
    return sum(storages.values())


def time_steps(fn, repeats: int) -> list[float]:
    fn()  # warm-up: allocator, one-time dispatch work
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def benchmark(backend: str, batch: int, C: int, layers: int, size: int, repeats: int, orders) -> dict:
    model, weight_optimizer, (train_batch, val_batch) = make_problem(batch, C, layers, size)
    result: dict = {}
    with ops.use_backend(backend):
        result["saved_bytes"] = saved_bytes_of_forward(model, *train_batch)
        for order in orders:
            architect = Architect(model, weight_optimizer, unrolled=order == "second")
            step = functools.partial(search_step, model, weight_optimizer, architect, train_batch, val_batch)
            times = time_steps(step, repeats)
            result[f"{order}_order_seconds"] = statistics.median(times)
            result[f"{order}_order_all_seconds"] = [round(t, 4) for t in times]
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--init_channels", type=int, default=16)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--size", type=int, default=32, help="image height and width")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per case (after one warm-up)")
    parser.add_argument("--backends", default=None, help="comma-separated (default: every available one)")
    parser.add_argument("--orders", default="first,second", help="first, second or both")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    backends = args.backends.split(",") if args.backends else ops.available_backends("weighted_sum", "cpu")
    orders = args.orders.split(",")
    report = {
        "case": {"batch": args.batch, "C": args.init_channels, "layers": args.layers, "size": args.size,
                 "repeats": args.repeats},
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "backends": {b: benchmark(b, args.batch, args.init_channels, args.layers, args.size, args.repeats, orders)
                     for b in backends},
    }  # fmt: skip
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for backend, r in report["backends"].items():
            timings = "  ".join(f"{o}-order {r[f'{o}_order_seconds']:.3f} s" for o in orders)
            print(f"{backend:>10}: {timings}  saved for backward {r['saved_bytes'] / 2**30:.3f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
