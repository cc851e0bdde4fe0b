"""What the op tests share across ops and backends (the C++ modules and their Triton twins)."""

import torch
from torch.utils._python_dispatch import TorchDispatchMode


def memory_format_of(layout: str) -> torch.memory_format:
    return torch.channels_last if layout == "channels_last" else torch.contiguous_format


class RecordCalls(TorchDispatchMode):
    """While on, `calls` gets `record(args)` for every call of the op overload `op` (its arguments by default): which
    gradients a backward op was asked for, or how often a kernel ran."""

    def __init__(self, op, record=tuple):
        super().__init__()
        self.op, self.record, self.calls = op, record, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is self.op:
            self.calls.append(self.record(args))
        return func(*args, **(kwargs or {}))


def backend_ops(backend: str):
    """The namespace of a backend's registered ops: torch.ops.fastdarts ("cpp") or torch.ops.fastdarts_triton."""
    return torch.ops.fastdarts_triton if backend == "triton" else torch.ops.fastdarts
