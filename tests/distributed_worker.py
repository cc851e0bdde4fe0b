"""What tests/test_distributed.py launches with torchrun: `python -m fastdarts.search` (or `.train`) in every
process, each of which also saves the state it ends with to `<dumps>/rank<r>.pt`, to be compared.

    python -m torch.distributed.run --nproc_per_node=2 tests/distributed_worker.py search DUMPS [flags]
"""

import sys
from pathlib import Path

import torch

from fastdarts import config, runloop, search, train


def main() -> int:
    kind, dumps, *flags = sys.argv[1:]
    real_save = runloop.Run.save

    def save(self, complete=False, **extra):
        real_save(self, complete, **extra)
        if complete:  # every process's own copy of the state, beside the run's one checkpoint
            state = {name: obj.state_dict() for name, obj in self.stateful.items()}
            torch.save({**state, "rng": runloop.rng_state(self.generator)}, Path(dumps) / f"rank{self.world.rank}.pt")

    runloop.Run.save = save
    return config.run_cli({"search": search, "train": train}[kind].main, flags)


if __name__ == "__main__":
    sys.exit(main())
