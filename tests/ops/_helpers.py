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


def assert_gradients_close(got, want, tol):
    """A backend's gradients against the reference's, in order: None on both (a conv that was not computed, an input
    that took no part) or close."""
    assert len(got) == len(want)
    for i, (g, r) in enumerate(zip(got, want)):
        assert (g is None) == (r is None), (
            f"gradient {i}: {'None' if g is None else 'a tensor'} where the reference gives "
            f"{'None' if r is None else 'a tensor'}"
        )
        if g is not None:
            torch.testing.assert_close(g, r, **tol, msg=lambda m, i=i: f"gradient {i}: {m}")
