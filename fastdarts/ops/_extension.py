"""Loads the compiled kernels, fastdarts._C, without ever breaking `import fastdarts` (torchao style).

A missing or broken build (no compiler at install time, a torch ABI mismatch) costs speed, not
correctness: every op then runs its pure-PyTorch reference. This module is imported once per
process, so its warning is the one warning about the fallback.
"""

from __future__ import annotations

import warnings

try:
    # Loading the shared library runs its static registrars: the ops appear under torch.ops.fastdarts.
    from .. import _C  # noqa: F401

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
