"""Architecture-search methods: how architecture parameters become per-edge weights (DESIGN.md 1).

`make_method(name, **settings)` builds one by its command-line name; `SearchNetwork(method=...)`
takes the object.
"""

from __future__ import annotations

from .base import CellWeights, Method, NetworkStyle, edge_entropy
from .betadarts import BetaDARTSMethod
from .darts import DARTSMethod
from .dartsminus import DARTSMinusMethod
from .drnas import DrNASMethod
from .fairdarts import FairDARTSMethod
from .gdas import GDASMethod
from .pcdarts import PCDARTSMethod
from .prdarts import PRDARTSMethod
from .sdarts import SDARTSMethod

METHODS: dict[str, type[Method]] = {DARTSMethod.name: DARTSMethod, PRDARTSMethod.name: PRDARTSMethod}
METHODS.update({m.name: m for m in (BetaDARTSMethod, DARTSMinusMethod, FairDARTSMethod, SDARTSMethod)})
METHODS.update({m.name: m for m in (GDASMethod, PCDARTSMethod, DrNASMethod)})


def make_method(name: str, **settings) -> Method:
    """The method called `name` (a key of METHODS), built with `settings` as keyword arguments."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; the methods are {', '.join(METHODS)}")
    return METHODS[name](**settings)


__all__ = [
    "BetaDARTSMethod",
    "DARTSMethod",
    "DARTSMinusMethod",
    "DrNASMethod",
    "FairDARTSMethod",
    "GDASMethod",
    "PCDARTSMethod",
    "SDARTSMethod",
    "METHODS",
    "PRDARTSMethod",
    "CellWeights",
    "Method",
    "NetworkStyle",
    "edge_entropy",
    "make_method",
]
