"""Loads the compiled kernels, fastdarts._C, without ever breaking `import fastdarts` (torchao style).

A missing or broken build (no compiler at install time, a torch ABI mismatch) costs speed, not
correctness: every op then runs its pure-PyTorch reference. This module is imported once per
process, so its warning is the one warning about the fallback.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

try:
    # Loading the shared library runs its static registrars: the ops appear under torch.ops.fastdarts.
    from .. import _C

    EXTENSION_LOADED = True
    EXTENSION_ERROR: str | None = None
except ImportError as error:  # an unloadable .so (undefined symbol, wrong ABI) is an ImportError too
    EXTENSION_LOADED = False
    EXTENSION_ERROR = f"{type(error).__name__}: {error}"
    warnings.warn(
        f"fastdarts: the C++ extension fastdarts._C did not load ({EXTENSION_ERROR}); CPU ops fall back to "
        "the slower pure-PyTorch reference. Rebuild it with `pip install -e .`.",
        RuntimeWarning,
        stacklevel=2,
    )


CPU_ISAS = ("baseline", "avx2", "avx512")
"""The instruction-set tiers of the C++ kernels, from the most portable to the fastest (csrc/include/fastdarts/
cpu_isa.h): plain x86-64 (SSE2; NEON on AArch64), AVX2 + FMA (x86-64-v3), AVX-512 (x86-64-v4)."""


def cpu_isa() -> str | None:
    """The tier the C++ kernels run in this process: the CPU's best, unless FASTDARTS_CPU_ISA or `use_cpu_isa` names
    another. None when the extension is not built. Raises ValueError (one line) when FASTDARTS_CPU_ISA names an
    unknown tier or one this CPU lacks."""
    return _C.cpu_isa() if EXTENSION_LOADED else None


def supported_cpu_isas() -> list[str]:
    """The tiers this CPU can run, best last (empty without the extension)."""
    if not EXTENSION_LOADED:
        return []
    return list(CPU_ISAS[: CPU_ISAS.index(_C.best_cpu_isa()) + 1])


@contextlib.contextmanager
def use_cpu_isa(name: str) -> Iterator[None]:
    """Run the C++ kernels on tier `name` inside the `with` block (the tests run every kernel on every tier), then
    go back to the tier before. Raises ValueError for an unknown tier or one this CPU lacks, RuntimeError without
    the extension."""
    if not EXTENSION_LOADED:
        raise RuntimeError(f"use_cpu_isa: the C++ extension is not loaded ({EXTENSION_ERROR})")
    previous = _C.cpu_isa()
    _C.set_cpu_isa(name)
    try:
        yield
    finally:
        _C.set_cpu_isa(previous)
