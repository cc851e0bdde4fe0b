"""Runs over several processes with torch.distributed: `torchrun --nproc_per_node=N -m fastdarts.search` (or
`fastdarts.train`), on one machine or several (torchrun's rendezvous flags; one torchrun per node under SLURM's
srun). Without torchrun's environment nothing here starts a process group, and a run is what it always was.

One run, N processes, one global batch per step (`--batch_size` is the global batch):
- Every process draws the same random numbers: the epoch's batch order, each step's validation batch and
  augmentation seeds, PR-DARTS's gates (one gate sample per step for the whole global batch, as the method
  defines it), train's drop-path masks (drawn for the whole global batch). Each process then makes only its
  part of each batch (data.part_slice), every image exactly as in the whole batch.
- The weights are in DistributedDataParallel, which averages the gradients of `backward()`. The architecture
  parameters are outside it: their gradients come from `torch.autograd.grad`, which DDP does not see, so every
  step that produces one all-reduces it here (bilevel.Architect), as it does the weight gradient of the
  second-order step's virtual step and the vector of its Hessian-vector product. Each process's loss counts
  with its share of the global batch, so uneven parts still give the global batch's mean.
- Batch norm takes its statistics per process, over its part of the batch (the fused mixed op computes them
  inside the kernel; torch's SyncBatchNorm runs on GPUs only), as DARTS's own multi-GPU training of ImageNet
  (DataParallel) does. So N processes at global batch B compute what one process computes when it splits
  every batch into N parts for batch norm (tests/test_distributed.py checks exactly that). The running
  statistics, used for evaluation, are averaged over the processes after every step.
- On GPUs (`--device cuda`) each process computes on the GPU of its LOCAL_RANK and the process group runs
  NCCL for CUDA tensors and gloo for CPU ones; without a GPU it is gloo alone.
- Process 0 alone writes the run directory (logs, plots, checkpoints) and prints; a checkpoint holds no trace
  of the number of processes, so `--resume` continues with any number.
- Every decision that ends a run is taken together: a NaN or infinite loss or gradient is one of the all-reduced
  values, and a signal to any process stops every process after the same step. A process that dies ends the
  job (torchrun stops the others); the last checkpoint is intact.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist

from .data import part_slice
from .errors import ConfigError


class World:
    """This process's place in a run of `size` processes; alone (`size` 1) every collective is a no-op."""

    def __init__(self, rank: int = 0, size: int = 1):
        self.rank, self.size = rank, size

    @property
    def alone(self) -> bool:
        return self.size == 1

    @property
    def writes(self) -> bool:
        """Whether this process writes the run directory and prints (process 0)."""
        return self.rank == 0

    @property
    def part(self) -> tuple[int, int] | None:
        """This process's part of each batch (a BatchJob's `part`); None alone."""
        return None if self.alone else (self.rank, self.size)

    def part_size(self, n: int) -> int:
        """The images of a global batch of `n` that this process makes."""
        return len(range(n)[part_slice(n, self.part)])

    def share(self, n: int) -> float:
        """The fraction of a global batch of `n` images that this process makes."""
        return self.part_size(n) / n

    def sum_(self, tensors: Sequence[torch.Tensor]) -> None:
        """Replace each tensor by its sum over the processes, in one all-reduce."""
        if self.alone or not tensors:
            return
        flat = torch.cat([t.detach().reshape(-1) for t in tensors])
        dist.all_reduce(flat)
        for t, piece in zip(tensors, flat.split([t.numel() for t in tensors])):
            t.copy_(piece.view_as(t))

    def sum(self, values: Sequence[float]) -> list[float]:
        """Python numbers summed over the processes (in float64)."""
        if self.alone:
            return list(values)
        flat = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(flat)
        return flat.tolist()

    def share_step(self, model: torch.nn.Module, values: Sequence[float]) -> list[float]:
        """What ends every step, in one all-reduce: `values` (the step's sums, stop flags) summed over the
        processes, returned; and the model's floating-point buffers, batch norm's running statistics,
        averaged. Each process's statistics come from its part of the batch; averaged after every step,
        they are the same in every process, and a run resumed from a checkpoint goes on with what the
        uninterrupted run holds."""
        buffers = [b for b in model.buffers() if b.is_floating_point()]
        device = buffers[0].device if buffers else torch.device("cpu")
        # In float64: the sums of a long epoch stay exact, as Python's floats keep them in one process.
        values_t = torch.tensor(values, dtype=torch.float64, device=device)
        flat = torch.cat([values_t, *(b.reshape(-1).double() for b in buffers)])
        dist.all_reduce(flat)
        with torch.no_grad():
            offset = len(values)
            for b in buffers:
                b.copy_((flat[offset : offset + b.numel()] / self.size).view_as(b))
                offset += b.numel()
        return flat[: len(values)].tolist()

    def barrier(self) -> None:
        if not self.alone:
            dist.barrier()

    def broadcast_(self, tensors: Sequence[torch.Tensor]) -> None:
        """Give every process process 0's values of `tensors`."""
        if self.alone:
            return
        for t in tensors:
            dist.broadcast(t.data, 0)

    def from_writer(self, fn: Callable[..., Any], *args, **kwargs) -> Any:
        """`fn(*args, **kwargs)` computed by process 0 and handed to every process, or its error raised in every
        process (a run's configuration, checkpoint and directory: read and made once, on process 0)."""
        if self.alone:
            return fn(*args, **kwargs)
        box: list[Any] = [None]
        if self.writes:
            try:
                box[0] = ("value", fn(*args, **kwargs))
            except Exception as e:  # every process raises it, process 0 alone says so
                box[0] = ("error", e)
        dist.broadcast_object_list(box, 0)
        kind, payload = box[0]
        if kind == "error":
            raise mark_shared(payload)
        return payload

    def data_parallel(self, model: torch.nn.Module, ignore: Sequence[torch.nn.Parameter] = (),
                      find_unused_parameters: bool = False) -> torch.nn.Module:  # fmt: skip
        """`model` in DistributedDataParallel without the parameters `ignore` (the architecture's, whose gradients
        DDP would wait for in every weight step); the model itself alone. Process 0's parameters and buffers
        are given to every process first. Buffers are not broadcast before each forward: share_step averages them."""
        if self.alone:
            return model
        # The fused ops give a 1x1 conv's weight gradient channels_last strides: the same memory order as the
        # bucket's for a 1x1 kernel, which DDP copies, once, with a warning about layouts.
        warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
        self.broadcast_(ignore)
        # DDP leaves out the parameters that need no gradient when it is built (its ignore list alone still has
        # its reducer wait for them, in torch 2.13).
        for p in ignore:
            p.requires_grad_(False)
        try:
            return torch.nn.parallel.DistributedDataParallel(model, forward_sync_buffers=False,
                                                             find_unused_parameters=find_unused_parameters)  # fmt: skip
        finally:
            for p in ignore:
                p.requires_grad_(True)

    def check_batch_size(self, batch_size: int) -> None:
        """A global batch must give every process an image."""
        if batch_size < self.size:
            raise mark_shared(ConfigError(f"batch_size ({batch_size}) is the global batch: it must be at least the "
                                          f"number of processes ({self.size})"))  # fmt: skip

    def describe_batch(self, batch_size: int) -> str:
        """What `--batch_size` means in this run, for its first line."""
        if self.alone:
            return f"batch {batch_size}"
        low, high = batch_size // self.size, -(-batch_size // self.size)
        each = f"{low}" if low == high else f"{low}-{high}"
        return f"global batch {batch_size}: {each} images on each of {self.size} processes"


def mark_shared(error: BaseException) -> BaseException:
    """Mark an error that every process raises together: process 0 alone prints it (config.run_cli)."""
    error.every_process = True
    return error


# The values of --device.
DEVICES = ("cpu", "cuda")


def run_device(name: str) -> torch.device:
    """The device a run computes on for `--device name`: the CPU, or this process's GPU (under torchrun the one
    of its LOCAL_RANK, as `torchrun --nproc_per_node=<GPUs per machine>` expects; alone the first visible one).
    Raises ConfigError when no such GPU is visible to this process."""
    if name not in DEVICES:
        raise ConfigError(f"device must be one of {', '.join(DEVICES)}, got {name!r}")
    if name == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        built = f"built for CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        raise mark_shared(ConfigError(f"device cuda: no GPU is visible to this process (torch {torch.__version__}, "
                                      f"{built})"))  # fmt: skip
    index = int(os.environ.get("LOCAL_RANK", "0"))
    if index >= torch.cuda.device_count():
        raise mark_shared(ConfigError(f"device cuda: this process's LOCAL_RANK is {index} but only "
                                      f"{torch.cuda.device_count()} GPUs are visible; start at most that many "
                                      "processes per machine"))  # fmt: skip
    return torch.device("cuda", index)


SINGLE = World()
_world: World | None = None
_started_here = False


def launched() -> bool:
    """Whether torchrun (or another torch.distributed launcher) started this process."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ


def world() -> World:
    """This process's World: the process group already started, or one started from torchrun's environment
    (process_group_backend), or SINGLE when the process was not launched by torchrun."""
    global _world, _started_here
    if _world is not None:
        return _world
    if dist.is_available() and dist.is_initialized():
        _world = World(dist.get_rank(), dist.get_world_size())
    elif dist.is_available() and launched() and int(os.environ["WORLD_SIZE"]) > 1:
        dist.init_process_group(process_group_backend())
        _started_here = True
        _world = World(dist.get_rank(), dist.get_world_size())
    else:
        _world = SINGLE
    return _world


def process_group_backend() -> str:
    """gloo for CPU tensors, and NCCL for CUDA tensors when this process sees a GPU (on its LOCAL_RANK's, which
    it then makes current: NCCL works on the current device)."""
    if not (torch.cuda.is_available() and dist.is_nccl_available()):
        return "gloo"
    index = int(os.environ.get("LOCAL_RANK", "0"))
    if index < torch.cuda.device_count():
        torch.cuda.set_device(index)
    return "cpu:gloo,cuda:nccl"


def writer_process() -> bool:
    """Whether this process is a run's process 0, also after its process group has ended."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return os.environ.get("RANK", "0") == "0"


def finish() -> None:
    """End the process group this module started (the command-line runs call it last)."""
    global _world, _started_here
    if _started_here and dist.is_initialized():
        dist.destroy_process_group()
    _world, _started_here = None, False
