"""fastdarts: differentiable architecture search (DARTS, PR-DARTS) with fused kernels."""

from . import ops
from .errors import ConfigError, DataError, FastDartsError, GenotypeError
from .methods import DARTSMethod, Method, PRDARTSMethod, make_method
from .space import DARTS_V1, DARTS_V2, OPS, PRIMITIVES, Genotype, derive_cell, load_genotype
from .supernet import SearchNetwork

__version__ = "0.1.0"

__all__ = [
    "DARTS_V1",
    "DARTS_V2",
    "OPS",
    "PRIMITIVES",
    "ConfigError",
    "DARTSMethod",
    "DataError",
    "FastDartsError",
    "Genotype",
    "GenotypeError",
    "Method",
    "PRDARTSMethod",
    "SearchNetwork",
    "derive_cell",
    "load_genotype",
    "make_method",
    "ops",
]
