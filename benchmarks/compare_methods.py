"""Compare DARTS and PR-DARTS searches on the bundled digits over several seeds.

    python benchmarks/compare_methods.py [--seeds 0,1,2] [--out runs/compare] [search flags...]

Runs `python -m fastdarts.search`'s search once per method and seed (default settings unless
search flags follow), then prints, per method, the final validation accuracy of the supernet and
the skip connections in the derived normal cell as mean ± sample standard deviation, and the
search time per epoch. Each run keeps its directory (`<out>/<method>/seed-<s>`).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

from fastdarts import search
from fastdarts.config import SearchConfig, parse_command_line, run_cli, seed_list
from fastdarts.runloop import run_seeds

METHODS = ("darts", "pr-darts")
KEYS = ("val_acc", "normal_skip_connects", "seconds_per_epoch")


def final_metrics(config: SearchConfig) -> dict:
    history = search.run(config).history
    return {**history[-1], "seconds_per_epoch": statistics.mean(row["seconds"] for row in history)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=seed_list, default=[0, 1, 2], help="comma-separated (default 0,1,2)")
    parser.add_argument("--out", default="runs/compare", help="parent of the run directories (default runs/compare)")
    args, search_flags = parser.parse_known_args(argv)
    summaries = {}
    for method in METHODS:
        cli = parse_command_line(SearchConfig, [*search_flags, "--method", method], "compare_methods.py", "")
        config = cli.config.__class__(**{**vars(cli.config), "out": str(Path(args.out) / method)})
        print(f"== {method}")
        summaries[method] = run_seeds(final_metrics, config, args.seeds, KEYS)
    print(f"\nsearch on the bundled digits, seeds {', '.join(map(str, args.seeds))} (mean ± sample std):")
    print(f"{'method':>9} | {'val accuracy':>16} | {'normal-cell skips':>17} | {'s per epoch':>13}")
    for method, s in summaries.items():
        acc, skips, secs = (s[k] for k in KEYS)
        print(f"{method:>9} | {acc['mean']:.4f} ± {acc['std']:.4f} | {skips['mean']:>8.2f} ± {skips['std']:.2f} | "
              f"{secs['mean']:>6.1f} ± {secs['std']:.1f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
