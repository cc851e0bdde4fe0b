"""`python -m fastdarts.analyze GENOTYPE`: what a found cell looks like (METHOD.md section 3).

GENOTYPE is a built-in name (DARTS_V1, DARTS_V2), a DARTS-format string, a genotype.json or
genotype.txt file, or a search run directory. For the normal and the reduction cell it prints
the width (in units of c, the width of one node), the depth, the skip connections and the
parameter-free ops, and for the evaluation network the parameter count and the multiply-adds of
one image. `--variants N` draws random-wiring variants grouped by width, `--plot` writes cell
diagrams (and, for a run directory, the search curves).
"""

from __future__ import annotations

import json
import random
import shutil
import stat
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

from .config import OneLineParser, run_cli
from .errors import FastDartsError, path_stat
from .evalnet import NetworkCIFAR, count_multiply_adds, count_parameters
from .space import BUILTIN_SOURCES, PRIMITIVES, Genotype, locate_genotype

PARAMETER_FREE = {"none", "max_pool_3x3", "avg_pool_3x3", "skip_connect"}
# The evaluation network analyze counts is built on the meta device, so its size costs no memory; these bounds keep
# its cells' Python objects (layers) and its tensors' element counts (the other sizes) within reach.
NETWORK_LIMITS = {"init_channels": 100_000, "layers": 1000, "num_classes": 1_000_000, "image_size": 8192}
CELLS = ("normal", "reduce")


def searched_cells(genotype: Genotype) -> tuple[str, ...]:
    """The cell types of `genotype` made of searched edges: both, or the normal one beside a fixed reduction cell."""
    return ("normal",) if genotype.fixed_reduction else CELLS


def fixed_fields(genotype: Genotype) -> dict:
    """The genotype fields of its fixed reduction cell, which a variant keeps as they are; none when searched."""
    return {"reduce": genotype.reduce, "reduce_concat": []} if genotype.fixed_reduction else {}


def cell_edges(genotype: Genotype, cell: str) -> tuple[tuple[tuple[str, int], ...], tuple[int, ...]]:
    return getattr(genotype, cell), getattr(genotype, f"{cell}_concat")


def cell_width(edges) -> Fraction:
    """Sum over intermediate nodes of the fraction of their inputs (with repetition) that are cell inputs, in c.
    A `none` edge (no op: Fair DARTS's edges below its threshold) is no input."""
    width = Fraction(0)
    for node in range(len(edges) // 2):
        inputs = [index for op, index in edges[2 * node : 2 * node + 2] if op != "none"]
        if inputs:
            width += Fraction(sum(index < 2 for index in inputs), len(inputs))
    return width


def cell_depth(edges, concat) -> int:
    """Edges on the longest path from a cell input to the output node (the edge into the output included), over
    the edges that have an op (not `none`); 0 when no node of the concat is reached."""
    depth: list[int | None] = [0, 0]  # the two cell inputs; None: a node no path reaches
    for node in range(len(edges) // 2):
        reached = [depth[index] for op, index in edges[2 * node : 2 * node + 2] if op != "none"]
        reached = [d for d in reached if d is not None]
        depth.append(1 + max(reached) if reached else None)
    ends = [depth[i] for i in concat if depth[i] is not None]
    return 1 + max(ends) if ends else 0


def describe_cell(genotype: Genotype, cell: str) -> dict:
    edges, concat = cell_edges(genotype, cell)
    return {
        "nodes": len(edges) // 2,
        "concat": list(concat),
        "width_c": float(cell_width(edges)),
        "depth": cell_depth(edges, concat),
        "skip_connects": sum(op == "skip_connect" for op, _ in edges),
        "parameter_free_ops": sum(op in PARAMETER_FREE for op, _ in edges),
    }


def describe_network(genotype: Genotype, C=36, layers=20, num_classes=10, image_size=32, in_channels=3) -> dict:
    """Parameter count (auxiliary head excluded) and multiply-adds of one image for the evaluation network, built
    and run on the meta device: shapes only, so that no width or image size fills the memory."""
    uncounted: set[str] = set()
    with torch.device("meta"):
        net = NetworkCIFAR(genotype, C, num_classes, layers, auxiliary=False, in_channels=in_channels,
                           uncounted=uncounted)  # fmt: skip
    return {
        "C": C,
        "layers": layers,
        "num_classes": num_classes,
        "image_size": image_size,
        "parameters": count_parameters(net),
        "multiply_adds": count_multiply_adds(net, (in_channels, image_size, image_size)),
        "uncounted_ops": sorted(uncounted),
    }


def describe(genotype: Genotype, **network) -> dict:
    return {
        "genotype": str(genotype),
        **{cell: describe_cell(genotype, cell) for cell in searched_cells(genotype)},
        **({"reduce": {"fixed": genotype.fixed_reduction}} if genotype.fixed_reduction else {}),
        "network": describe_network(genotype, **network),
    }


# ----------------------------------------------------------------------------------------------
# Random variants (the generators of Shu et al.)


def random_wiring_variant(genotype: Genotype, rng: random.Random) -> Genotype:
    """Same ops and concat lists; each edge's input redrawn uniformly among the nodes before it."""
    fields = fixed_fields(genotype)
    for cell in searched_cells(genotype):
        edges, concat = cell_edges(genotype, cell)
        fields[cell] = [(op, rng.randrange(2 + k // 2)) for k, (op, _) in enumerate(edges)]
        fields[f"{cell}_concat"] = list(concat)
    return Genotype(**fields)


def shu_wiring_variant(genotype: Genotype, seed: int) -> Genotype:
    """Shu et al.'s `random_conn(arch, num_ops, seed)` (genotypes.py of shuyao95/Understanding-NAS): NumPy's legacy
    stream seeded with `seed` redraws each edge's input uniformly among the nodes before it, the normal and the
    reduction cell's edge k drawn in turn (a fixed reduction cell is kept, and draws nothing). Seeds 1..10 on DARTS_V2
    give their DARTS_CONN1..10."""
    rng = np.random.RandomState(seed)
    cells = searched_cells(genotype)
    inputs: dict[str, list[int]] = {cell: [] for cell in cells}
    for k in range(len(genotype.normal)):
        for cell in cells:
            inputs[cell].append(int(rng.choice(2 + k // 2, 1)[0]))
    fields = fixed_fields(genotype)
    for cell in cells:
        edges, concat = cell_edges(genotype, cell)
        fields[cell] = [(op, index) for (op, _), index in zip(edges, inputs[cell])]
        fields[f"{cell}_concat"] = list(concat)
    return Genotype(**fields)


def random_op_variant(genotype: Genotype, rng: random.Random) -> Genotype:
    """Same wiring and concat lists; each edge's op redrawn uniformly among the non-`none` primitives."""
    choices = [p for p in PRIMITIVES if p != "none"]
    fields = fixed_fields(genotype)
    for cell in searched_cells(genotype):
        edges, concat = cell_edges(genotype, cell)
        fields[cell] = [(rng.choice(choices), index) for _, index in edges]
        fields[f"{cell}_concat"] = list(concat)
    return Genotype(**fields)


def variants(genotype: Genotype, n: int, seed: int, kind: str = "wiring", max_tries: int = 10000) -> list[Genotype]:
    """`n` distinct variants that differ from `genotype`, drawn from one seeded stream serving both cells."""
    draw = random_wiring_variant if kind == "wiring" else random_op_variant
    rng = random.Random(seed)
    found: list[Genotype] = []
    for _ in range(max_tries):
        if len(found) == n:
            break
        candidate = draw(genotype, rng)
        if candidate != genotype and candidate not in found:
            found.append(candidate)
    if len(found) < n:
        raise FastDartsError(f"only {len(found)} distinct {kind} variants of this cell exist, asked for {n}")
    return found


def group_by_width(genotypes: list[Genotype], cell: str = "normal") -> dict[str, list[Genotype]]:
    groups: dict[str, list[Genotype]] = {}
    for g in sorted(genotypes, key=lambda g: cell_width(cell_edges(g, cell)[0])):
        groups.setdefault(format_c(cell_width(cell_edges(g, cell)[0])), []).append(g)
    return groups


def format_c(width: Fraction | float) -> str:
    return f"{float(width):g}c"


# ----------------------------------------------------------------------------------------------
# Cell diagrams


def cell_to_dot(genotype: Genotype, cell: str) -> str:
    """A Graphviz digraph: inputs c_{k-2} and c_{k-1}, the nodes, the output c_{k}; edges labelled by op."""
    edges, concat = cell_edges(genotype, cell)
    steps = len(edges) // 2
    names = ["c_{k-2}", "c_{k-1}", *[str(i) for i in range(steps)]]
    lines = [
        f"digraph {cell} {{",
        "  rankdir=LR;",
        '  node [style=filled, fontname="helvetica"];',
        '  edge [fontname="helvetica", fontsize=10];',
        '  "c_{k-2}" [fillcolor=darkseagreen2, shape=box];',
        '  "c_{k-1}" [fillcolor=darkseagreen2, shape=box];',
    ]
    lines += [f'  "{i}" [fillcolor=lightblue, shape=circle];' for i in range(steps)]
    lines.append('  "c_{k}" [fillcolor=palegoldenrod, shape=box];')
    for k, (op, index) in enumerate(edges):
        lines.append(f'  "{names[index]}" -> "{k // 2}" [label="{_dot_escape(op)}"];')
    for c in concat:
        lines.append(f'  "{names[c]}" -> "c_{{k}}" [color=gray];')
    lines.append("}")
    return "\n".join(lines) + "\n"


def _dot_escape(text: str) -> str:
    """`text` inside a DOT double-quoted string: an op name from a user's genotype may hold quotes or backslashes."""
    return text.replace("\\", "\\\\").replace('"', '\\"')


def write_cell_diagrams(genotype: Genotype, out_dir: Path) -> list[Path]:
    """Write `<cell>.dot`, and `.png`/`.svg` rendered by Graphviz's `dot`, or drawn with matplotlib without it."""
    from .plots import draw_cell

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    dot = shutil.which("dot")
    for cell in searched_cells(genotype):
        path = out_dir / f"{cell}.dot"
        path.write_text(cell_to_dot(genotype, cell))
        written.append(path)
        if dot is None:
            written += draw_cell(*cell_edges(genotype, cell), path)
            continue
        for fmt in ("png", "svg"):
            target = path.with_suffix(f".{fmt}")
            subprocess.run([dot, f"-T{fmt}", str(path), "-o", str(target)], check=True, capture_output=True)
            written.append(target)
    return written


# ----------------------------------------------------------------------------------------------
# Command line


def main(argv=None) -> int:
    parser = OneLineParser(prog="python -m fastdarts.analyze", description=__doc__.splitlines()[0])
    parser.add_argument("genotype", help="built-in name, DARTS string, genotype file or run directory")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--init_channels", type=int, default=36, help="C of the evaluation network (default 36)")
    parser.add_argument("--layers", type=int, default=20, help="cells of the evaluation network (default 20)")
    parser.add_argument("--num_classes", type=int, default=10, help="classes (default 10)")
    parser.add_argument("--image_size", type=int, default=32, help="image height and width (default 32)")
    parser.add_argument("--variants", type=int, default=0, metavar="N", help="draw N random-wiring variants")
    parser.add_argument("--random_ops", action="store_true", help="variants redraw the ops, keeping the wiring")
    parser.add_argument("--seed", type=int, default=0, help="seed of the variants (default 0)")
    parser.add_argument("--plot", action="store_true", help="write cell diagrams (and a run directory's curves)")
    parser.add_argument("--out", help="where --plot and --variants write (default: the run directory or ./)")
    args = parser.parse_args(argv)
    for name, most in NETWORK_LIMITS.items():
        value = getattr(args, name)
        if value < (3 if name == "layers" else 1):
            raise FastDartsError(f"--{name} must be positive (layers at least 3), got {value}")
        if value > most:
            raise FastDartsError(f"--{name} must be at most {most:,}, got {value:,}")
    if args.variants < 0:
        raise FastDartsError(f"--variants must be >= 0, got {args.variants}")

    genotype, run_dir = locate_genotype(args.genotype)
    out_dir = Path(args.out) if args.out else (run_dir or Path("."))
    if args.variants or args.plot:
        check_out_dir(out_dir)
    report = describe(
        genotype, C=args.init_channels, layers=args.layers, num_classes=args.num_classes, image_size=args.image_size
    )
    if args.genotype in BUILTIN_SOURCES:
        report["source"] = BUILTIN_SOURCES[args.genotype]
    if args.variants:
        kind = "ops" if args.random_ops else "wiring"
        drawn = variants(genotype, args.variants, args.seed, kind)
        report["variants"] = {width: [str(g) for g in gs] for width, gs in group_by_width(drawn).items()}
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_report(report)
    if args.variants:
        path = out_dir / "variants.json"
        make_out_dir(out_dir)
        path.write_text(json.dumps(report["variants"], indent=2) + "\n")
        print(f"variants written to {path}", file=sys.stderr if args.json else sys.stdout)
    if args.plot:
        make_out_dir(out_dir)
        written = write_cell_diagrams(genotype, out_dir)
        if run_dir is not None and (run_dir / "metrics.jsonl").is_file():
            from .plots import plot_run

            written += plot_run(run_dir / "metrics.jsonl", out_dir)
        print("wrote " + ", ".join(str(p) for p in written), file=sys.stderr if args.json else sys.stdout)
    return 0


def check_out_dir(path: Path) -> None:
    """Refuse an --out that cannot become a directory before anything is computed or written."""
    found = path_stat(path, "out")
    if found is not None and not stat.S_ISDIR(found.st_mode):
        raise FastDartsError(f"out {path} exists and is not a directory")


def make_out_dir(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (OSError, ValueError) as e:  # ValueError: a NUL byte in the name
        raise FastDartsError(f"out {path}: cannot create the directory ({getattr(e, 'strerror', None) or e})") from None


def print_report(report: dict) -> None:
    print(report["genotype"])
    if "source" in report:
        print(f"source: {report['source']}")
    for cell in CELLS:
        r = report[cell]
        if "fixed" in r:
            print(f"{cell:>6}: the fixed reduction cell {r['fixed']}")
            continue
        print(
            f"{cell:>6}: width {r['width_c']:g}c, depth {r['depth']}, {r['nodes']} nodes, concat {r['concat']}, "
            f"{r['skip_connects']} skip connections, {r['parameter_free_ops']} parameter-free ops"
        )
    n = report["network"]
    line = (
        f"network (C={n['C']}, {n['layers']} cells, {n['num_classes']} classes): "
        f"{n['parameters'] / 1e6:.3f} M parameters (auxiliary head excluded), "
        f"{n['multiply_adds'] / 1e6:.1f} M multiply-adds per {n['image_size']}x{n['image_size']} image"
    )
    if n["uncounted_ops"]:
        line += f"; not counted: {', '.join(n['uncounted_ops'])}"
    print(line)
    for width, gs in report.get("variants", {}).items():
        print(f"variants with normal-cell width {width}:")
        for g in gs:
            print(f"  {g}")


if __name__ == "__main__":
    sys.exit(run_cli(main))
