"""THE dispatch table: which implementation of each op runs for a call.

The first rule that names a backend wins:
1. the call's `backend=` argument;
2. the innermost `use_backend(name)` block;
3. the FASTDARTS_BACKEND environment variable, read and validated once, at import;
4. the device: CPU tensors run "cpp" when fastdarts._C loaded, else "reference"; CUDA tensors run
   "triton" when triton imports, else "reference"; tensors on any other device run "reference".

"triton" runs CPU tensors too, through Triton's interpreter, when TRITON_INTERPRET=1 (the tests),
but only when asked for by name.

The Triton backend is imported when it is first needed: for a CUDA tensor, when "triton" is asked for
by name (`backend=`, `use_backend`, FASTDARTS_BACKEND), or when `available_backends` is asked about a
device it could run on. Importing triton pulls in torch._dynamo and torch._inductor, seconds that
`import fastdarts` and every command line would otherwise pay.

The call path reads nothing but plain module globals, so torch.compile traces the choice (and
guards on it) instead of breaking the graph; only an explicit "triton" on CPU tensors reads
TRITON_INTERPRET, at call time, since the tests set it after fastdarts was imported.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from typing import Any

import torch

from . import reference
from ._extension import EXTENSION_ERROR, EXTENSION_LOADED

if EXTENSION_LOADED:
    from . import _cpp, _mixed_op

BACKENDS: tuple[str, ...] = ("reference", "cpp", "triton")
ENV_VAR = "FASTDARTS_BACKEND"

# op -> backend -> implementation. A backend missing from a row cannot run that op in this process. The
# "triton" entries are added when the Triton backend is imported (_load_triton).
_TABLE: dict[str, dict[str, Callable[..., Any]]] = {
    "weighted_sum": {
        "reference": reference.weighted_sum,
        **({"cpp": _cpp.weighted_sum} if EXTENSION_LOADED else {}),
    },
    "relu_dwconv": {
        "reference": reference.relu_dwconv,
        **({"cpp": _cpp.relu_dwconv} if EXTENSION_LOADED else {}),
    },
    "relu_dwconv_pointwise": {
        "reference": reference.relu_dwconv_pointwise,
        **({"cpp": _cpp.relu_dwconv_pointwise} if EXTENSION_LOADED else {}),
    },
    "mixed_op": {
        "reference": reference.mixed_op,
        **({"cpp": _mixed_op.cpp_mixed_op} if EXTENSION_LOADED else {}),
    },
    "mixed_ops": {
        "reference": reference.mixed_ops,
        **({"cpp": _mixed_op.cpp_mixed_ops} if EXTENSION_LOADED else {}),
    },
    "mixed_cell": {
        "reference": reference.mixed_cell,
        **({"cpp": _mixed_op.cpp_mixed_cell} if EXTENSION_LOADED else {}),
    },
    "sample_gates": {
        "reference": reference.sample_gates,
        **({"cpp": _cpp.sample_gates} if EXTENSION_LOADED else {}),
    },
    "pool_bn_stats": {
        "reference": reference.pool_bn_stats,
        **({"cpp": _cpp.pool_bn_stats} if EXTENSION_LOADED else {}),
    },
    "bn_weighted_sum": {
        "reference": reference.bn_weighted_sum,
        **({"cpp": _cpp.bn_weighted_sum} if EXTENSION_LOADED else {}),
    },
    "factorized_reduce": {
        "reference": reference.factorized_reduce,
        **({"cpp": _cpp.factorized_reduce} if EXTENSION_LOADED else {}),
    },
    "factorized_reduce_bn": {
        "reference": reference.factorized_reduce_bn,
        **({"cpp": _cpp.factorized_reduce_bn} if EXTENSION_LOADED else {}),
    },
    "relu_conv_bn": {
        "reference": reference.relu_conv_bn,
        **({"cpp": _cpp.relu_conv_bn} if EXTENSION_LOADED else {}),
    },
    "relu_conv_bns": {
        "reference": reference.relu_conv_bns,
        **({"cpp": _cpp.relu_conv_bns} if EXTENSION_LOADED else {}),
    },
    "rnn_mixed_node": {
        "reference": reference.rnn_mixed_node,
        **({"cpp": _cpp.rnn_mixed_node} if EXTENSION_LOADED else {}),
    },
}
# The device types a backend runs on (None: wherever PyTorch runs). "triton" also runs CPU
# tensors under TRITON_INTERPRET=1 (see _runs_on).
_DEVICE_TYPES: dict[str, tuple[str, ...] | None] = {"reference": None, "cpp": ("cpu",), "triton": ("cuda",)}
# Why a backend is missing from every row of the table. A backend missing from some rows only
# has no implementation of those ops yet.
_WHY_MISSING: dict[str, str] = {}
if not EXTENSION_LOADED:
    _WHY_MISSING["cpp"] = (
        f"the C++ extension fastdarts._C is not loaded ({EXTENSION_ERROR}); rebuild it with `pip install -e .`"
    )

# Whether the Triton backend was imported yet, and why it could not be (None: it was, or was not tried yet).
_triton_tried = False
_triton_error: str | None = None


def _load_triton() -> bool:
    """Import the Triton backend, once per process, and enter its ops in the table; True when they are there."""
    global _triton_tried, _triton_error
    if _triton_tried:
        return _triton_error is None
    try:
        # Registers the fastdarts_triton ops (the mixed op too); the kernels themselves are made at their first launch.
        from . import _triton
    except ImportError as error:  # triton is not installed, or does not load on this platform
        _triton_error = f"{type(error).__name__}: {error}"
        _WHY_MISSING["triton"] = f"triton did not import ({_triton_error}); install it with `pip install triton`"
    else:
        for op, row in _TABLE.items():
            row["triton"] = getattr(_triton, op)
    _triton_tried = True
    return _triton_error is None


def __getattr__(name: str) -> Any:
    # TRITON_LOADED and TRITON_ERROR, read as module attributes, import the Triton backend to answer.
    if name == "TRITON_LOADED":
        return _load_triton()
    if name == "TRITON_ERROR":
        _load_triton()
        return _triton_error
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _check_known(name: object, where: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{where}: unknown backend {name!r}; the backends are {', '.join(BACKENDS)}")
    return name


def _row(op: str) -> dict[str, Callable[..., Any]]:
    row = _TABLE.get(op)
    if row is None:
        raise ValueError(f"unknown op {op!r}; the ops are {', '.join(_TABLE)}")
    return row


def _backend_from_environment() -> str | None:
    value = os.environ.get(ENV_VAR, "").strip()
    if value and value not in BACKENDS:
        raise ValueError(
            f"{ENV_VAR}={value!r} is not a fastdarts backend; allowed values: {', '.join(BACKENDS)} "
            "(or leave it unset for the per-device default)"
        )
    return value or None


_ENV_BACKEND = _backend_from_environment()
_context_backend: str | None = None  # set by use_backend()


def use_backend(name: str) -> contextlib.AbstractContextManager[None]:
    """Run every fastdarts op inside the `with` block on backend `name` ("reference", "cpp" or "triton").

    A call's own `backend=` argument still wins. Blocks nest, and leaving one, even through an
    exception, restores the enclosing choice. The name is checked here, before the block starts.
    """
    return _backend_block(_check_known(name, "use_backend"))


@contextlib.contextmanager
def _backend_block(name: str) -> Iterator[None]:
    global _context_backend
    previous, _context_backend = _context_backend, name
    try:
        yield
    finally:
        _context_backend = previous


def available_backends(op: str | None = None, device: str | torch.device = "cpu") -> list[str]:
    """The backends that can run `op` (every op, when None) on tensors of `device` in this process."""
    rows = [_row(name) for name in ([op] if op is not None else _TABLE)]
    device_type = torch.device(device).type
    if _runs_on("triton", device_type):
        _load_triton()
    return [name for name in BACKENDS if all(name in row for row in rows) and _runs_on(name, device_type)]


def _runs_on(name: str, device_type: str) -> bool:
    device_types = _DEVICE_TYPES[name]
    if device_types is None or device_type in device_types:
        return True
    # Triton's interpreter runs CPU tensors. Read at call time: the tests set TRITON_INTERPRET after
    # fastdarts was imported.
    return name == "triton" and device_type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


def select(op: str, device: torch.device, backend: str | None = None) -> str:
    """The name of the backend that runs `op` on tensors of `device` (the rules are in the module docstring)."""
    row = _row(op)
    if backend is not None:
        _check_known(backend, f"fastdarts.ops.{op}")
    name = backend or _context_backend or _ENV_BACKEND
    if name is None:
        if device.type == "cuda" and _load_triton() and "triton" in row:
            return "triton"
        return "cpp" if device.type == "cpu" and "cpp" in row else "reference"
    if name == "triton":
        _load_triton()
    if name not in row:
        why = _WHY_MISSING.get(name, f"this op has no {name!r} implementation yet")
        raise RuntimeError(f"fastdarts.ops.{op}: backend {name!r} was requested, but {why}")
    if not _runs_on(name, device.type):
        raise RuntimeError(
            f"fastdarts.ops.{op}: backend {name!r} runs on {', '.join(_DEVICE_TYPES[name])} tensors only, "
            f"got {device.type} tensors" + (" (and CPU tensors when TRITON_INTERPRET=1)" if name == "triton" else "")
        )
    return name


def dispatch(op: str, device: torch.device, backend: str | None = None) -> Callable[..., Any]:
    """The implementation of `op` to call for tensors on `device`."""
    return _TABLE[op][select(op, device, backend)]
