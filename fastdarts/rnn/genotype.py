"""The recurrent cell's genotype in DARTS's format (RNN.md 1.7-1.9): one (op, predecessor) per node.

`RecurrentGenotype(recurrent=[('sigmoid', 0), ...], concat=range(1, 9))`: node n (from 1) applies the
op to its predecessor (0 = node 0, the highway of x_t and h_{t-1}); the cell's output is the mean of
the nodes in `concat`.
"""

from __future__ import annotations

import ast
import json
import stat
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import GenotypeError, path_stat, shorten
from ..space import _as_int, _literal_range

PRIMITIVES = ("none", "tanh", "relu", "sigmoid", "identity")
ACTIVATIONS = PRIMITIVES[1:]  # every op but none
STEPS = 8

Step = tuple[str, int]  # (op, predecessor)


@dataclass(frozen=True)
class RecurrentGenotype:
    recurrent: tuple[Step, ...]
    concat: tuple[int, ...]

    def __post_init__(self):
        steps = []
        for node, step in enumerate(self.recurrent, start=1):
            if not (isinstance(step, (list, tuple)) and len(step) == 2 and isinstance(step[0], str)):
                raise GenotypeError(f"recurrent: each node must be a pair (op name, predecessor), got {step!r}")
            op, pred = step[0], _as_int(step[1], f"recurrent node {node}")
            if op not in ACTIVATIONS:
                raise GenotypeError(f"recurrent node {node}: unknown op {op!r}; the ops are {', '.join(ACTIVATIONS)}")
            if not 0 <= pred < node:
                raise GenotypeError(f"recurrent node {node} reads node {pred}, which is not an earlier node")
            steps.append((op, pred))
        if not steps:
            raise GenotypeError("recurrent: the cell has no node")
        concat = tuple(_as_int(c, "concat") for c in self.concat)
        if not concat or any(not 0 <= c <= len(steps) for c in concat):
            raise GenotypeError(f"concat must name nodes among 0..{len(steps)}, got {list(concat)}")
        object.__setattr__(self, "recurrent", tuple(steps))
        object.__setattr__(self, "concat", concat)

    def __str__(self) -> str:
        steps = ", ".join(f"({op!r}, {pred})" for op, pred in self.recurrent)
        c = self.concat
        is_range = len(c) > 1 and c == tuple(range(c[0], c[-1] + 1))
        concat = f"range({c[0]}, {c[-1] + 1})" if is_range else str(list(c))
        return f"Genotype(recurrent=[{steps}], concat={concat})"

    __repr__ = __str__

    def to_dict(self) -> dict:
        return {"recurrent": [list(s) for s in self.recurrent], "concat": list(self.concat)}

    @classmethod
    def from_dict(cls, fields) -> RecurrentGenotype:
        if not isinstance(fields, dict) or set(fields) != {"recurrent", "concat"}:
            got = sorted(map(str, fields)) if isinstance(fields, dict) else type(fields).__name__
            raise GenotypeError(f"a recurrent genotype has exactly the fields concat and recurrent, got {got}")
        for name, value in fields.items():
            if not isinstance(value, (list, tuple, range)):
                raise GenotypeError(f"genotype field {name!r} must be a list, got {type(value).__name__}")
        return cls(tuple(fields["recurrent"]), tuple(fields["concat"]))

    @classmethod
    def parse(cls, text: str) -> RecurrentGenotype:
        """DARTS's `Genotype(recurrent=[...], concat=range(1, 9))`."""
        try:
            tree = ast.parse(text.strip(), mode="eval").body
        except (SyntaxError, ValueError, RecursionError, MemoryError):
            raise GenotypeError(
                f"{shorten(repr(text))} is not a Genotype(recurrent=[...], concat=...) string"
            ) from None
        if not (isinstance(tree, ast.Call) and isinstance(tree.func, ast.Name) and tree.func.id == "Genotype"
                and not tree.args and all(kw.arg for kw in tree.keywords)):  # fmt: skip
            raise GenotypeError("a recurrent genotype string has the form Genotype(recurrent=[...], concat=...)")
        fields = {}
        for kw in tree.keywords:
            if kw.arg in fields:
                raise GenotypeError(f"genotype field {kw.arg!r} is given twice")
            if isinstance(kw.value, ast.Call):
                fields[kw.arg] = _literal_range(kw, max_length=len(text))
                continue
            try:
                fields[kw.arg] = ast.literal_eval(kw.value)
            except (ValueError, SyntaxError, TypeError, RecursionError):
                raise GenotypeError(f"genotype field {kw.arg!r} is not a literal") from None
        return cls.from_dict(fields)


def _darts(recurrent) -> RecurrentGenotype:
    return RecurrentGenotype(tuple(recurrent), tuple(range(1, STEPS + 1)))


# quark0/darts rnn/genotypes.py (RNN.md 1.9); DARTS_V2 is the cell of the paper's PTB result.
DARTS_V1 = _darts([("relu", 0), ("relu", 1), ("tanh", 2), ("relu", 3), ("relu", 4), ("identity", 1), ("relu", 5),
                   ("relu", 1)])  # fmt: skip
DARTS_V2 = _darts([("sigmoid", 0), ("relu", 1), ("relu", 1), ("identity", 1), ("tanh", 2), ("sigmoid", 5),
                   ("tanh", 3), ("relu", 5)])  # fmt: skip
BUILTIN = {"DARTS_V1": DARTS_V1, "DARTS_V2": DARTS_V2, "DARTS": DARTS_V2}


def load_recurrent_genotype(source: str | Path) -> RecurrentGenotype:
    """A built-in name, a Genotype(...) string, a genotype.json/.txt file or a search's run directory."""
    text = str(source)
    if text in BUILTIN:
        return BUILTIN[text]
    if text.lstrip().startswith("Genotype("):
        return RecurrentGenotype.parse(text)
    path = Path(text)
    found = path_stat(path, "genotype", GenotypeError)
    if found is None:
        raise GenotypeError(f"{shorten(repr(text))} is not a built-in recurrent genotype ({', '.join(BUILTIN)}), "
                            "a Genotype(...) string or an existing path")  # fmt: skip
    if stat.S_ISDIR(found.st_mode):
        path = path / "genotype.json"
        if path_stat(path, "genotype", GenotypeError) is None:
            raise GenotypeError(f"{shorten(str(path.parent))}: directory has no genotype.json")
    try:
        content = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise GenotypeError(f"{shorten(str(path))}: cannot read it ({getattr(e, 'strerror', None) or e})") from None
    try:
        if content.lstrip().startswith("{"):
            return RecurrentGenotype.from_dict(json.loads(content))
        return RecurrentGenotype.parse(content)
    except json.JSONDecodeError as e:
        raise GenotypeError(f"{shorten(str(path))}: malformed JSON: {e.msg} at line {e.lineno}") from None
    except GenotypeError as e:
        raise GenotypeError(f"{shorten(str(path))}: {e}") from None


def row(node: int, pred: int) -> int:
    """The row of alpha for node `node` (1..8) reading `pred` (0..node-1): node-major, predecessor-minor."""
    return node * (node - 1) // 2 + pred


def derive_recurrent(probabilities: torch.Tensor, steps: int = STEPS) -> RecurrentGenotype:
    """DARTS's rule (RNN.md 1.8) on the softmax probabilities `[rows, len(PRIMITIVES)]`: each node keeps the
    predecessor whose best non-none op is strongest (ties: the lower predecessor), and that op (ties: the
    lower column)."""
    expected = (steps * (steps + 1) // 2, len(PRIMITIVES))
    if tuple(probabilities.shape) != expected:
        raise ValueError(f"probabilities must have shape {list(expected)}, got {list(probabilities.shape)}")
    p = probabilities.detach().cpu().double()[:, 1:]  # the none column never wins
    recurrent = []
    for node in range(1, steps + 1):
        rows = p[row(node, 0) : row(node, node)]
        best = rows.max(dim=1).values.tolist()
        pred = max(range(node), key=lambda j: (best[j], -j))  # the strongest, the lowest index on a tie
        op = max(range(len(ACTIVATIONS)), key=lambda k: (rows[pred, k].item(), -k))
        recurrent.append((ACTIVATIONS[op], pred))
    return RecurrentGenotype(tuple(recurrent), tuple(range(1, steps + 1)))
