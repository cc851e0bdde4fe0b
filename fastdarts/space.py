"""The DARTS convolutional search space: primitives, the OPS factory, genotypes and their derivation.

METHOD.md section 1.1 (ops) and 1.4 (derivation). Column order of every architecture tensor is
PRIMITIVES; code refers to op groups by name, never by column number.
"""

from __future__ import annotations

import ast
import json
import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from . import ops
from .errors import GenotypeError, path_stat, shorten
from .ops.reference import cell_edge_count, edge_index

PRIMITIVES: tuple[str, ...] = (
    "none",
    "max_pool_3x3",
    "avg_pool_3x3",
    "skip_connect",
    "sep_conv_3x3",
    "sep_conv_5x5",
    "dil_conv_3x3",
    "dil_conv_5x5",
)


# ----------------------------------------------------------------------------------------------
# Operations (ReLU -> conv -> BN, no conv bias)


class ReLUConvBN(nn.Sequential):
    def __init__(self, C_in: int, C_out: int, kernel_size: int, stride: int, padding: int, affine: bool = True):
        super().__init__(
            nn.ReLU(inplace=False),
            nn.Conv2d(C_in, C_out, kernel_size, stride=stride, padding=padding, bias=False),
            nn.BatchNorm2d(C_out, affine=affine),
        )


class DilConv(nn.Sequential):
    """ReLU, depthwise kxk with dilation, pointwise 1x1, BN.

    With "same" padding (as every DARTS op has) the ReLU and the depthwise conv run as one fused op,
    `ops.relu_dwconv`, which reads the input once and keeps only it for backward; the submodules stay
    those of DARTS, so state dicts keep their keys.
    """

    def __init__(self, C_in, C_out, kernel_size, stride, padding, dilation, affine=True):
        super().__init__(
            nn.ReLU(inplace=False),
            nn.Conv2d(C_in, C_in, kernel_size, stride, padding, dilation=dilation, groups=C_in, bias=False),
            nn.Conv2d(C_in, C_out, 1, bias=False),
            nn.BatchNorm2d(C_out, affine=affine),
        )
        self.fused = padding == dilation * (kernel_size - 1) // 2

    def forward(self, x):
        if not self.fused:
            return super().forward(x)
        _, depthwise, pointwise, bn = self
        z = ops.relu_dwconv(x, [depthwise.weight], [depthwise.dilation[0]], depthwise.stride[0])[0]
        return bn(pointwise(z))


class SepConv(nn.Sequential):
    """Two DilConv blocks with dilation 1; only the first carries the stride."""

    def __init__(self, C_in, C_out, kernel_size, stride, padding, affine=True):
        super().__init__(
            DilConv(C_in, C_in, kernel_size, stride, padding, 1, affine),
            DilConv(C_in, C_out, kernel_size, 1, padding, 1, affine),
        )


class Identity(nn.Module):
    def forward(self, x):
        return x


class Zero(nn.Module):
    """The `none` op: zeros of the (strided) output shape."""

    def __init__(self, stride: int):
        super().__init__()
        self.stride = stride

    def forward(self, x):
        if self.stride == 1:
            return x.mul(0.0)
        return x[:, :, :: self.stride, :: self.stride].mul(0.0)


class FactorizedReduce(nn.Module):
    """ReLU, two 1x1 stride-2 convs (on x and on x shifted by one pixel), concatenated, BN. The ReLU and the convs run
    as one op, ops.factorized_reduce (never as strided 1x1 convolutions: see reference.factorized_reduce)."""

    def __init__(self, C_in: int, C_out: int, affine: bool = True):
        super().__init__()
        if C_out % 2:
            raise ValueError(f"FactorizedReduce needs an even number of output channels, got {C_out}")
        self.conv_1 = nn.Conv2d(C_in, C_out // 2, 1, stride=2, bias=False)
        self.conv_2 = nn.Conv2d(C_in, C_out // 2, 1, stride=2, bias=False)
        self.bn = nn.BatchNorm2d(C_out, affine=affine)

    def forward(self, x, relu: bool = True):
        """relu=False: x is already the ReLU's output."""
        return self.bn(ops.factorized_reduce(x, self.conv_1.weight, self.conv_2.weight, relu))


def drop_running_statistics(module: nn.Module) -> None:
    """Make every BN in `module` normalise with its batch's statistics in evaluation too (and keep none)."""
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.track_running_stats = False
            m.running_mean = m.running_var = m.num_batches_tracked = None


def _pool(kind: str, stride: int) -> nn.Module:
    if kind == "max":
        return nn.MaxPool2d(3, stride=stride, padding=1)
    return nn.AvgPool2d(3, stride=stride, padding=1, count_include_pad=False)


OPS: dict[str, Callable[[int, int, bool], nn.Module]] = {
    "none": lambda C, stride, affine: Zero(stride),
    "max_pool_3x3": lambda C, stride, affine: _pool("max", stride),
    "avg_pool_3x3": lambda C, stride, affine: _pool("avg", stride),
    "skip_connect": lambda C, stride, affine: Identity() if stride == 1 else FactorizedReduce(C, C, affine),
    "sep_conv_3x3": lambda C, stride, affine: SepConv(C, C, 3, stride, 1, affine),
    "sep_conv_5x5": lambda C, stride, affine: SepConv(C, C, 5, stride, 2, affine),
    "dil_conv_3x3": lambda C, stride, affine: DilConv(C, C, 3, stride, 2, 2, affine),
    "dil_conv_5x5": lambda C, stride, affine: DilConv(C, C, 5, stride, 4, 2, affine),
}


# ----------------------------------------------------------------------------------------------
# Genotypes

Edge = tuple[str, int]  # (op name, input index): 0 = c_{k-2}, 1 = c_{k-1}, 2.. = intermediate nodes

# Hand-designed reduction cells a genotype may name in place of a searched one (its `reduce`, with an empty
# `reduce_concat`): GDAS's fixed reduction cell (METHODS_MORE.md 2, FRC; evalnet.GDASReductionCell).
FIXED_REDUCTION_CELLS: tuple[str, ...] = ("gdas_reduction",)


@dataclass(frozen=True)
class Genotype:
    """A discrete cell pair in DARTS's format: two (op, input) edges per intermediate node, nodes in order.

    `reduce` may instead name a hand-designed reduction cell of FIXED_REDUCTION_CELLS (GDAS's FRC searches the
    normal cell alone), with `reduce_concat` empty: `Genotype(normal=[...], normal_concat=[...],
    reduce='gdas_reduction', reduce_concat=[])`, in JSON `"reduce": "gdas_reduction", "reduce_concat": []`.
    """

    normal: tuple[Edge, ...]
    normal_concat: tuple[int, ...]
    reduce: tuple[Edge, ...] | str
    reduce_concat: tuple[int, ...]

    def __post_init__(self):
        cells = ("normal", "reduce")
        if isinstance(self.reduce, str):
            cells = ("normal",)
            if self.reduce not in FIXED_REDUCTION_CELLS:
                raise GenotypeError(f"reduce: {shorten(repr(self.reduce))} is not a fixed reduction cell "
                                    f"({', '.join(FIXED_REDUCTION_CELLS)}); a searched one is a list of (op, input) "
                                    "edges")  # fmt: skip
            if len(self.reduce_concat):
                raise GenotypeError(f"reduce_concat must be [] with the fixed reduction cell {self.reduce!r}, which "
                                    "has an output of its own")  # fmt: skip
            object.__setattr__(self, "reduce_concat", ())
        for cell in cells:
            edges = tuple(_as_edge(e, cell) for e in getattr(self, cell))
            concat = tuple(_as_int(c, f"{cell}_concat") for c in getattr(self, f"{cell}_concat"))
            object.__setattr__(self, cell, edges)
            object.__setattr__(self, f"{cell}_concat", concat)
            _check_cell(cell, edges, concat)

    @property
    def fixed_reduction(self) -> str | None:
        """The name of the hand-designed reduction cell the genotype uses; None when its reduction cell is searched."""
        return self.reduce if isinstance(self.reduce, str) else None

    def cell_edges(self, cell: str) -> tuple[Edge, ...]:
        """The (op, input) edges of cell type `cell` ("normal" or "reduce"); none for a fixed reduction cell."""
        edges = getattr(self, cell)
        return () if isinstance(edges, str) else edges

    def cells_without_ops(self) -> list[str]:
        """The searched cell types whose every edge is `none`: such a cell outputs zeros whatever its input (Fair
        DARTS's threshold rule gives one when no weight has reached the threshold yet)."""
        cells = ("normal",) if self.fixed_reduction else ("normal", "reduce")
        return [cell for cell in cells if all(op == "none" for op, _ in getattr(self, cell))]

    # DARTS string format ------------------------------------------------------------------------
    def __str__(self) -> str:
        def edges(es):
            if isinstance(es, str):
                return repr(es)
            return "[" + ", ".join(f"({op!r}, {i})" for op, i in es) + "]"

        return (
            f"Genotype(normal={edges(self.normal)}, normal_concat={list(self.normal_concat)}, "
            f"reduce={edges(self.reduce)}, reduce_concat={list(self.reduce_concat)})"
        )

    __repr__ = __str__

    @classmethod
    def parse(cls, text: str) -> Genotype:
        """Parse DARTS's `Genotype(normal=[...], normal_concat=[...], reduce=[...], reduce_concat=[...])`."""
        text = text.strip()
        if not text:
            raise GenotypeError("empty genotype string")
        try:
            tree = ast.parse(text, mode="eval").body
        except SyntaxError as e:
            raise GenotypeError(f"genotype string is not valid syntax: {e.msg} (column {e.offset})") from None
        except ValueError as e:  # a NUL byte, on some Pythons
            raise GenotypeError(f"genotype string cannot be parsed ({e})") from None
        except (RecursionError, MemoryError):  # Python's parser runs out of stack: "-" * 100000 + "1"
            raise GenotypeError("genotype string is nested too deeply to parse") from None
        if not (isinstance(tree, ast.Call) and isinstance(tree.func, ast.Name) and tree.func.id == "Genotype"):
            raise GenotypeError("genotype string must have the form Genotype(normal=[...], normal_concat=[...], ...)")
        if tree.args:
            raise GenotypeError("genotype string must use keyword fields (normal=..., normal_concat=..., ...)")
        fields = {}
        for kw in tree.keywords:
            if kw.arg is None:
                raise GenotypeError("genotype string must not use ** in Genotype(...)")
            if kw.arg in fields:
                raise GenotypeError(f"genotype field {kw.arg!r} is given twice")
            if isinstance(kw.value, ast.Call):  # DARTS writes range(2, 6) for the concat lists
                fields[kw.arg] = _literal_range(kw, max_length=len(text))
                continue
            try:
                fields[kw.arg] = ast.literal_eval(kw.value)
            except (ValueError, SyntaxError, TypeError, RecursionError):  # TypeError: {[1]: 2}, an unhashable key
                raise GenotypeError(f"genotype field {kw.arg!r} is not a literal") from None
        return cls.from_dict(fields)

    # JSON ----------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "normal": [list(e) for e in self.normal],
            "normal_concat": list(self.normal_concat),
            "reduce": self.reduce if self.fixed_reduction else [list(e) for e in self.reduce],
            "reduce_concat": list(self.reduce_concat),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_dict(cls, fields: dict) -> Genotype:
        if not isinstance(fields, dict):
            raise GenotypeError(f"a genotype must be a mapping of its four fields, got {type(fields).__name__}")
        expected = {"normal", "normal_concat", "reduce", "reduce_concat"}
        missing, unknown = expected - fields.keys(), fields.keys() - expected
        if missing:
            raise GenotypeError(f"genotype is missing field(s): {', '.join(sorted(missing))}")
        if unknown:
            raise GenotypeError(f"genotype has unknown field(s): {', '.join(sorted(map(str, unknown)))}")
        for name in expected:
            if name == "reduce" and isinstance(fields[name], str):  # a fixed reduction cell, by name
                continue
            if not isinstance(fields[name], (list, tuple, range)):
                raise GenotypeError(f"genotype field {name!r} must be a list, got {type(fields[name]).__name__}")
        return cls(**{k: v if isinstance(v, str) else tuple(v) for k, v in fields.items()})

    @classmethod
    def from_json(cls, text: str) -> Genotype:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise GenotypeError(f"genotype JSON is malformed: {e.msg} at line {e.lineno} column {e.colno}") from None
        except (ValueError, RecursionError) as e:  # an integer of too many digits, nesting too deep
            raise GenotypeError(f"genotype JSON cannot be read ({type(e).__name__}: {e})") from None
        return cls.from_dict(data)

    @property
    def steps(self) -> int:
        return len(self.normal) // 2


def _literal_range(kw: ast.keyword, max_length: int) -> list[int]:
    """The nodes of `range(...)`, refused when there are more than `max_length`: a range names distinct nodes,
    and a string of `max_length` characters describes fewer nodes than that (range(2, 10**12) is never listed)."""
    call = kw.value
    if not (isinstance(call.func, ast.Name) and call.func.id == "range" and not call.keywords):
        raise GenotypeError(f"genotype field {kw.arg!r} must be a list or range(...)")
    try:
        nodes = range(*[ast.literal_eval(a) for a in call.args])
        length = len(nodes)
    except (ValueError, TypeError, SyntaxError, RecursionError, OverflowError):
        raise GenotypeError(f"genotype field {kw.arg!r} has a malformed range(...)") from None
    if length > max_length:
        raise GenotypeError(f"genotype field {kw.arg!r} names {length} nodes, more than the cell has")
    return list(nodes)


def _as_int(value, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise GenotypeError(f"{where}: expected an integer, got {value!r}")
    return value


def _as_edge(edge, cell: str) -> Edge:
    if not (isinstance(edge, (list, tuple)) and len(edge) == 2 and isinstance(edge[0], str)):
        raise GenotypeError(f"{cell}: each edge must be a pair (op name, input index), got {edge!r}")
    return edge[0], _as_int(edge[1], f"{cell} edge {edge!r}")


def _check_cell(cell: str, edges: tuple[Edge, ...], concat: tuple[int, ...]) -> None:
    if not edges or len(edges) % 2:
        raise GenotypeError(f"{cell}: needs two edges per intermediate node, got {len(edges)} edge(s)")
    steps = len(edges) // 2
    for k, (_, inp) in enumerate(edges):
        node = 2 + k // 2
        if not 0 <= inp < node:
            raise GenotypeError(f"{cell}: node {node} reads input {inp}, which is not an earlier node (0..{node - 1})")
    if not concat:
        raise GenotypeError(f"{cell}_concat is empty")
    for c in concat:
        if not 0 <= c < 2 + steps:
            raise GenotypeError(f"{cell}_concat names node {c}, but the cell has nodes 0..{steps + 1}")
    if cell == "reduce" and min(concat) < 2:
        raise GenotypeError(
            f"reduce_concat names cell input {min(concat)}, but the reduction cell's output is at half the "
            "resolution of its inputs"
        )


def load_genotype(source: str | Path) -> Genotype:
    """A genotype from a built-in name, a DARTS string, a genotype.json/.txt file or a run directory."""
    return locate_genotype(source)[0]


def locate_genotype(source: str | Path) -> tuple[Genotype, Path | None]:
    """`load_genotype(source)`, and the run directory it was read from (None when `source` is not a directory)."""
    text = str(source)
    if text in BUILTIN_GENOTYPES:
        return BUILTIN_GENOTYPES[text], None
    # Never looked up as a path: a published genotype written out in full is longer than a file name may be.
    if text.lstrip().startswith("Genotype("):
        return Genotype.parse(text), None
    path = Path(text)
    found = path_stat(path, "genotype", GenotypeError)
    if found is None:
        known = ", ".join(BUILTIN_GENOTYPES)
        raise GenotypeError(
            f"{shorten(repr(text))} is not a built-in genotype ({known}), a Genotype(...) string or an existing path"
        )
    if stat.S_ISDIR(found.st_mode):
        for name in ("genotype.json", "genotype.txt"):
            inside = path_stat(path / name, "genotype", GenotypeError)
            if inside is not None and stat.S_ISREG(inside.st_mode):
                return _read_genotype_file(path / name), path
        raise GenotypeError(f"{shorten(str(path))}: directory has no genotype.json or genotype.txt")
    if not stat.S_ISREG(found.st_mode):  # a FIFO or a device would block or never end
        raise GenotypeError(f"{shorten(str(path))}: not a regular file")
    return _read_genotype_file(path), None


def _read_genotype_file(path: Path) -> Genotype:
    try:
        content = path.read_text()
    except OSError as e:
        raise GenotypeError(f"{shorten(str(path))}: cannot read genotype file ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise GenotypeError(f"{shorten(str(path))}: genotype file is not text ({e})") from None
    if not content.strip():
        raise GenotypeError(f"{shorten(str(path))}: genotype file is empty")
    try:
        if content.lstrip().startswith("{"):
            return Genotype.from_json(content)
        return Genotype.parse(content)
    except GenotypeError as e:
        raise GenotypeError(f"{shorten(str(path))}: {e}") from None


# ----------------------------------------------------------------------------------------------
# Cell structure and derivation (METHOD 1.4, 2.4)


def cell_steps(num_edges: int) -> int:
    """The number of intermediate nodes of a cell with `num_edges` edges."""
    steps = 0
    while cell_edge_count(steps) < num_edges:
        steps += 1
    if cell_edge_count(steps) != num_edges:
        raise ValueError(f"{num_edges} edges do not make a cell: a cell has 2, 5, 9, 14, ... edges")
    return steps


def deepest_chain(steps: int) -> tuple[int, ...]:
    """The edge rows of the chain c_{k-1} -> node 0 -> node 1 -> ... (edges 0<-1, 1<-2, 2<-3, ...)."""
    return tuple(edge_index(i, i + 1) for i in range(steps))


def _check_edge_weights(weights: torch.Tensor, steps: int, primitives: Sequence[str]) -> torch.Tensor:
    weights = weights.detach().double().cpu()
    expected = (cell_edge_count(steps), len(primitives))
    if weights.shape != expected:
        raise ValueError(f"expected edge weights of shape {expected}, got {tuple(weights.shape)}")
    return weights


def derive_cell(weights: torch.Tensor, steps: int, primitives: Sequence[str] = PRIMITIVES) -> tuple[Edge, ...]:
    """DARTS's rule on one cell's edge weights `[num_edges, num_ops]` (already softmaxed).

    For each node: score every incoming edge by its strongest non-`none` weight, keep the top-2
    edges by descending score (stable: ties go to the lower input), and on each the argmax
    non-`none` op (ties to the lower column).
    """
    weights = _check_edge_weights(weights, steps, primitives)
    candidate_cols = [j for j, name in enumerate(primitives) if name != "none"]
    gene: list[Edge] = []
    for i in range(steps):
        n_in = 2 + i
        start = edge_index(i, 0)
        W = weights[start : start + n_in, candidate_cols]
        scores = W.max(dim=1).values.tolist()
        # Python's sort is stable, so equal scores keep the lower input first.
        order = sorted(range(n_in), key=lambda e: -scores[e])[:2]
        for inp in order:
            row = W[inp].tolist()
            best = max(range(len(row)), key=lambda c: (row[c], -c))
            gene.append((primitives[candidate_cols[best]], inp))
    return tuple(gene)


def derive_cell_top_ops(weights: torch.Tensor, steps: int, primitives: Sequence[str] = PRIMITIVES) -> tuple[Edge, ...]:
    """PR-DARTS's rule on one cell's edge weights `[num_edges, num_ops]` (softmax over each edge).

    For each node: list every (op, input) pair with op != `none` over all incoming edges and keep
    the two of highest weight (stable: ties go to the lower input, then the lower column). Both
    may read the same input.
    """
    weights = _check_edge_weights(weights, steps, primitives)
    gene: list[Edge] = []
    for i in range(steps):
        pairs = [
            (weights[edge_index(i, inp), col].item(), name, inp)
            for inp in range(2 + i)
            for col, name in enumerate(primitives)
            if name != "none"
        ]
        # Python's sort is stable: the listing order (input, then column) breaks ties.
        best = sorted(pairs, key=lambda pair: -pair[0])[:2]
        gene.extend((name, inp) for _, name, inp in best)
    return tuple(gene)


# ----------------------------------------------------------------------------------------------
# Built-in genotypes (DARTS paper, Liu et al. 2019, as published in the reference code)

DARTS_V1 = Genotype(
    normal=[
        ("sep_conv_3x3", 1), ("sep_conv_3x3", 0), ("skip_connect", 0), ("sep_conv_3x3", 1),
        ("skip_connect", 0), ("sep_conv_3x3", 1), ("sep_conv_3x3", 0), ("skip_connect", 2),
    ],
    normal_concat=[2, 3, 4, 5],
    reduce=[
        ("max_pool_3x3", 0), ("max_pool_3x3", 1), ("skip_connect", 2), ("max_pool_3x3", 0),
        ("max_pool_3x3", 0), ("skip_connect", 2), ("skip_connect", 2), ("avg_pool_3x3", 0),
    ],
    reduce_concat=[2, 3, 4, 5],
)  # fmt: skip

DARTS_V2 = Genotype(
    normal=[
        ("sep_conv_3x3", 0), ("sep_conv_3x3", 1), ("sep_conv_3x3", 0), ("sep_conv_3x3", 1),
        ("sep_conv_3x3", 1), ("skip_connect", 0), ("skip_connect", 0), ("dil_conv_3x3", 2),
    ],
    normal_concat=[2, 3, 4, 5],
    reduce=[
        ("max_pool_3x3", 0), ("max_pool_3x3", 1), ("skip_connect", 2), ("max_pool_3x3", 1),
        ("max_pool_3x3", 0), ("skip_connect", 2), ("skip_connect", 2), ("max_pool_3x3", 1),
    ],
    reduce_concat=[2, 3, 4, 5],
)  # fmt: skip

PRDARTS = Genotype(
    normal=[
        ("skip_connect", 0), ("sep_conv_3x3", 1), ("dil_conv_3x3", 2), ("sep_conv_3x3", 0),
        ("dil_conv_3x3", 3), ("sep_conv_3x3", 1), ("dil_conv_3x3", 4), ("dil_conv_3x3", 1),
    ],
    normal_concat=[2, 3, 4, 5],
    reduce=[
        ("avg_pool_3x3", 0), ("dil_conv_5x5", 1), ("sep_conv_3x3", 0), ("dil_conv_5x5", 2),
        ("sep_conv_5x5", 1), ("dil_conv_3x3", 3), ("dil_conv_5x5", 4), ("dil_conv_5x5", 1),
    ],
    reduce_concat=[2, 3, 4, 5],
)  # fmt: skip

# Five-node cells from other search spaces (some of their ops are not in PRIMITIVES).
NASNET = Genotype(
    normal=[
        ("sep_conv_5x5", 1), ("sep_conv_3x3", 0), ("sep_conv_5x5", 0), ("sep_conv_3x3", 0), ("avg_pool_3x3", 1),
        ("skip_connect", 0), ("avg_pool_3x3", 0), ("avg_pool_3x3", 0), ("sep_conv_3x3", 1), ("skip_connect", 1),
    ],
    normal_concat=[2, 3, 4, 5, 6],
    reduce=[
        ("sep_conv_5x5", 1), ("sep_conv_7x7", 0), ("max_pool_3x3", 1), ("sep_conv_7x7", 0), ("avg_pool_3x3", 1),
        ("sep_conv_5x5", 0), ("skip_connect", 3), ("avg_pool_3x3", 2), ("sep_conv_3x3", 2), ("max_pool_3x3", 1),
    ],
    reduce_concat=[4, 5, 6],
)  # fmt: skip

AMOEBANET = Genotype(
    normal=[
        ("avg_pool_3x3", 0), ("max_pool_3x3", 1), ("sep_conv_3x3", 0), ("sep_conv_5x5", 2), ("sep_conv_3x3", 0),
        ("avg_pool_3x3", 3), ("sep_conv_3x3", 1), ("skip_connect", 1), ("skip_connect", 0), ("avg_pool_3x3", 1),
    ],
    normal_concat=[4, 5, 6],
    reduce=[
        ("avg_pool_3x3", 0), ("sep_conv_3x3", 1), ("max_pool_3x3", 0), ("sep_conv_7x7", 2), ("sep_conv_7x7", 0),
        ("avg_pool_3x3", 1), ("max_pool_3x3", 0), ("max_pool_3x3", 1), ("conv_7x1_1x7", 0), ("sep_conv_3x3", 5),
    ],
    reduce_concat=[3, 4, 6],
)  # fmt: skip

BUILTIN_GENOTYPES: dict[str, Genotype] = {
    "DARTS_V1": DARTS_V1,
    "DARTS_V2": DARTS_V2,
    "DARTS": DARTS_V2,
    "PRDARTS": PRDARTS,
    "NASNet": NASNET,
    "AmoebaNet": AMOEBANET,
}
BUILTIN_SOURCES: dict[str, str] = {
    "DARTS_V1": "DARTS first-order search on CIFAR-10 (Liu, Simonyan, Yang, ICLR 2019; the authors' genotypes.py)",
    "DARTS_V2": "DARTS second-order search on CIFAR-10 (Liu, Simonyan, Yang, ICLR 2019; the authors' genotypes.py)",
    "DARTS": "alias of DARTS_V2, as in the DARTS authors' code",
    "PRDARTS": "PR-DARTS search on CIFAR-10 (Zhou, Xiong, Socher, Hoi, NeurIPS 2020; the authors' genotypes.py)",
    "NASNet": "NASNet-A (Zoph et al., CVPR 2018), as written in the DARTS authors' genotypes.py",
    "AmoebaNet": "AmoebaNet-A (Real et al., AAAI 2019), as written in the DARTS authors' genotypes.py",
}
