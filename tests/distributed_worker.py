"""What tests/test_distributed.py launches with torchrun: `python -m fastdarts.search` (or `.train`) in every
process, each of which also saves the state it ends with to `<dumps>/rank<r>.pt`, to be compared.

    python -m torch.distributed.run --nproc_per_node=2 tests/distributed_worker.py search DUMPS [flags]

With FASTDARTS_TEST_NAN=R,C the process of rank R makes NaN images from its C-th augmented batch on.
"""

import os
import sys
from pathlib import Path

import torch

from fastdarts import config, runloop, search, train
from fastdarts.data import ImageData


def poison(rank: int, at_call: int) -> None:
    if int(os.environ["RANK"]) != rank:
        return
    real_batch, count = ImageData.batch, [0]

    def batch(self, indices, generator=None, augment=False, cutout=0, keep=slice(None)):
        x, y = real_batch(self, indices, generator, augment, cutout, keep)
        if augment:
            count[0] += 1
            if count[0] >= at_call:
                x = torch.full_like(x, float("nan"))
        return x, y

    ImageData.batch = batch


def main() -> int:
    kind, dumps, *flags = sys.argv[1:]
    real_save = runloop.Run.save

    def save(self, complete=False, **extra):
        real_save(self, complete, **extra)
        if complete:  # every process's own copy of the state, beside the run's one checkpoint
            state = {name: obj.state_dict() for name, obj in self.stateful.items()}
            torch.save({**state, "rng": runloop.rng_state(self.generator)}, Path(dumps) / f"rank{self.world.rank}.pt")

    runloop.Run.save = save
    if "FASTDARTS_TEST_NAN" in os.environ:
        poison(*map(int, os.environ["FASTDARTS_TEST_NAN"].split(",")))
    return config.run_cli({"search": search, "train": train}[kind].main, flags)


if __name__ == "__main__":
    sys.exit(main())
