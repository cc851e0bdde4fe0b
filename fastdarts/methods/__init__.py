"""Architecture-search methods: how architecture parameters become per-edge weights (DESIGN.md 1).

`make_method(name, **settings)` builds one by its command-line name; `SearchNetwork(method=...)`
takes the object.
"""

from __future__ import annotations

from .base import CellWeights, Method, NetworkStyle, edge_entropy
from .darts import DARTSMethod
from .drnas import DrNASMethod
from .gdas import GDASMethod
from .pcdarts import PCDARTSMethod
from .prdarts import PRDARTSMethod

METHODS: dict[str, type[Method]] = {DARTSMethod.name: DARTSMethod, PRDARTSMethod.name: PRDARTSMethod}
METHODS[GDASMethod.name] = GDASMethod
METHODS[PCDARTSMethod.name] = PCDARTSMethod
METHODS[DrNASMethod.name] = DrNASMethod


def make_method(name: str, **settings) -> Method:
    """The method called `name` (a key of METHODS), built with `settings` as keyword arguments."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; the methods are {', '.join(METHODS)}")
    return METHODS[name](**settings)


__all__ = [
    "DARTSMethod",
    "DrNASMethod",
    "GDASMethod",
    "PCDARTSMethod",
    "METHODS",
    "PRDARTSMethod",
    "CellWeights",
    "Method",
    "NetworkStyle",
    "edge_entropy",
    "make_method",
]
