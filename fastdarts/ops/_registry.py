"""The dispatch table: which implementation of an op runs for a call.

Order of precedence: the call's `backend=` argument, then the innermost `use_backend(...)`,
then the `FASTDARTS_BACKEND` environment variable (read once, at import), then the default for
the tensors' device: C++ on the CPU when the extension is built, else the reference.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Callable, Iterator

import torch

from . import reference
from ._extension import EXTENSION_LOADED, LOAD_ERROR

BACKENDS: tuple[str, ...] = ("reference", "cpp")

# op name -> backend -> implementation. A backend missing from an op's row cannot run it.
TABLE: dict[str, dict[str, Callable]] = {
    "weighted_sum": {"reference": reference.weighted_sum},
}

if EXTENSION_LOADED:
    from . import _cpp

    TABLE["weighted_sum"]["cpp"] = _cpp.weighted_sum

# Which devices each compiled backend can run on.
_DEVICES: dict[str, tuple[str, ...]] = {"reference": ("cpu", "cuda", "meta", "mps", "xpu"), "cpp": ("cpu",)}


def _check_name(name: str, where: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{where}: unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    return name


_env = os.environ.get("FASTDARTS_BACKEND") or None
_from_env: str | None = _check_name(_env, "FASTDARTS_BACKEND") if _env else None
_forced: list[str] = []  # the stack of use_backend() contexts
_warned_fallback = False


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run every fastdarts op in this block with backend `name` ("reference" or "cpp")."""
    _forced.append(_check_name(name, "use_backend"))
    try:
        yield
    finally:
        _forced.pop()


def available_backends(op: str | None = None, device: str | torch.device = "cpu") -> list[str]:
    """The backends that can run `op` (every op when None) on `device` in this installation."""
    device_type = torch.device(device).type
    ops = [op] if op is not None else list(TABLE)
    for name in ops:
        if name not in TABLE:
            raise ValueError(f"unknown op {name!r}; known ops: {', '.join(TABLE)}")
    return [b for b in BACKENDS if device_type in _DEVICES[b] and all(b in TABLE[name] for name in ops)]


def resolve(op: str, device: torch.device, backend: str | None = None) -> Callable:
    """The implementation of `op` to call for tensors on `device`."""
    global _warned_fallback
    chosen = backend or (_forced[-1] if _forced else None) or _from_env
    if chosen is not None:
        _check_name(chosen, op)
        if chosen not in TABLE[op]:
            why = f" (the extension did not load: {LOAD_ERROR})" if chosen == "cpp" and not EXTENSION_LOADED else ""
            raise RuntimeError(f"{op}: backend {chosen!r} is not available{why}")
        if device.type not in _DEVICES[chosen]:
            raise RuntimeError(f"{op}: backend {chosen!r} cannot run on {device.type} tensors")
        return TABLE[op][chosen]
    if device.type == "cpu" and "cpp" in TABLE[op]:
        return TABLE[op]["cpp"]
    if device.type == "cpu" and not _warned_fallback:
        _warned_fallback = True
        warnings.warn(
            f"fastdarts: the compiled kernels are not available ({LOAD_ERROR}); using the PyTorch reference",
            stacklevel=3,
        )
    return TABLE[op]["reference"]
