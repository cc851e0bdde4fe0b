"""Loads the compiled kernels (fastdarts._C) without ever breaking `import fastdarts`."""

from __future__ import annotations

try:
    # Importing the module runs the C++ static registrars: the ops appear under torch.ops.fastdarts.
    from fastdarts import _C  # noqa: F401

    EXTENSION_LOADED = True
    LOAD_ERROR: str | None = None
except ImportError as error:
    EXTENSION_LOADED = False
    LOAD_ERROR = f"{type(error).__name__}: {error}"
