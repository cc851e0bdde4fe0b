"""`python -m fastdarts.analyze GENOTYPE`: read a genotype and describe its cells.

GENOTYPE is a built-in name (DARTS_V1, DARTS_V2), a DARTS-format string, a genotype.json or
genotype.txt file, or a search run directory.
"""

from __future__ import annotations

import json
import sys

from .config import OneLineParser, run_cli
from .space import Genotype, load_genotype

PARAMETER_FREE = {"none", "max_pool_3x3", "avg_pool_3x3", "skip_connect"}


def describe(genotype: Genotype) -> dict:
    report = {"genotype": str(genotype)}
    for cell in ("normal", "reduce"):
        edges = getattr(genotype, cell)
        report[cell] = {
            "nodes": len(edges) // 2,
            "concat": list(getattr(genotype, f"{cell}_concat")),
            "skip_connects": sum(op == "skip_connect" for op, _ in edges),
            "parameter_free_ops": sum(op in PARAMETER_FREE for op, _ in edges),
        }
    return report


def main(argv=None) -> int:
    parser = OneLineParser(prog="python -m fastdarts.analyze", description=__doc__.splitlines()[0])
    parser.add_argument("genotype", help="built-in name, DARTS string, genotype file or run directory")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    report = describe(load_genotype(args.genotype))
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(report["genotype"])
    for cell in ("normal", "reduce"):
        r = report[cell]
        print(f"{cell}: {r['nodes']} nodes, concat {r['concat']}, {r['skip_connects']} skip connections, "
              f"{r['parameter_free_ops']} parameter-free ops")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
