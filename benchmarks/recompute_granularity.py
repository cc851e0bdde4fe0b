"""Compare where the fused search step recomputes: per edge (the default), per cell, or nowhere.

    python benchmarks/recompute_granularity.py edge|cell|none [--batch 64] [--repeats 3]

"edge": every mixed op keeps only its input and recomputes its edge in backward (SearchNetwork's default).
"cell": every search cell's edges and nodes run under torch.utils.checkpoint, its mixed ops keeping their
intermediates, so a cell's backward recomputes them (not the cell's preprocessing, which the network runs once per
state for the cells that read it) and then holds all its edges' intermediates.
"none": the mixed ops keep their intermediates (recompute=False) and nothing is recomputed.
Times first-order steps (one warm-up, then --repeats) in this process and prints one line: the median, the
steps, the bytes saved for backward (as benchmarks/search_step.py counts them) and the peak RSS. Run each
granularity in its own process, so the peak RSS is its own.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time

from torch.utils.checkpoint import checkpoint

from fastdarts.bilevel import Architect

if __package__:
    from .search_step import make_problem, saved_bytes_of_step, search_step
else:  # run as a script: benchmarks/ is sys.path[0]
    from search_step import make_problem, saved_bytes_of_step, search_step

GRANULARITIES = ("edge", "cell", "none")


def checkpoint_cells(model) -> None:
    """Run each search cell's edges and nodes (SearchCell.nodes, which the network calls on the preprocessed inputs)
    under non-reentrant activation checkpointing."""
    for cell in model.cells:
        nodes = cell.nodes
        cell.nodes = lambda *args, nodes=nodes, **kwargs: checkpoint(nodes, *args, use_reentrant=False, **kwargs)


def run(granularity: str, batch: int, C: int, layers: int, size: int, repeats: int) -> dict:
    model, weight_optimizer, (train_batch, val_batch) = make_problem(
        batch, C, layers, size, recompute=granularity == "edge"
    )  # fmt: skip
    if granularity == "cell":
        checkpoint_cells(model)
    saved = saved_bytes_of_step(model, *train_batch)["saved_bytes"]
    architect = Architect(model, weight_optimizer, unrolled=False)
    search_step(model, weight_optimizer, architect, train_batch, val_batch)  # warm-up
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        search_step(model, weight_optimizer, architect, train_batch, val_batch)
        seconds.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"median_seconds": statistics.median(seconds), "all_seconds": seconds, "saved_bytes": saved,
            "peak_rss_bytes": peak}  # fmt: skip


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1 (argparse turns the ValueError into a one-line usage error)."""
    value = int(text)
    if value < 1:
        raise ValueError(text)
    return value


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("granularity", choices=GRANULARITIES)
    parser.add_argument("--batch", type=positive_int, default=64)
    parser.add_argument("--init_channels", type=positive_int, default=16)
    parser.add_argument("--layers", type=positive_int, default=8)
    parser.add_argument("--size", type=positive_int, default=32, help="image height and width")
    parser.add_argument("--repeats", type=positive_int, default=3, help="timed steps (after one warm-up)")
    args = parser.parse_args(argv)
    r = run(args.granularity, args.batch, args.init_channels, args.layers, args.size, args.repeats)
    steps = ", ".join(f"{s:.2f}" for s in r["all_seconds"])
    saved, peak = r["saved_bytes"] / 2**30, r["peak_rss_bytes"] / 2**30
    median = r["median_seconds"]
    print(f"{args.granularity}: median {median:.2f} s ({steps}), saved {saved:.3f} GiB, peak RSS {peak:.2f} GiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
