"""Every search method on the bundled digits at equal wall time, over several seeds.

    python benchmarks/compare_methods.py [--budget 120] [--seeds 0,1,2] [--methods darts,gdas,...]
                                         [--out runs/compare] [search flags...]

A sampling method's epoch costs less than DARTS's, so equal epochs would not compare like with like: each
method gets `--budget` seconds of search epochs per run. A calibration run of 3 epochs per method (seed 0, in
`<out>/<method>/calibration`, not counted) measures its seconds per epoch as the median of the 3 (the first
epoch also pays for start-up allocations, and a 3-epoch run spreads the method's stages over its epochs);
every run of the method then searches `floor(budget / that)` epochs (at least 1), its own schedules
(temperatures, warm-ups, stages) spread over them as over any number of epochs. Per method: the supernet's
final validation accuracy, the derived normal cell's skip connections, width (in c, as Shu et al. count it)
and depth, seconds per epoch, epochs and total seconds, as mean ± sample standard deviation; printed, and
written to `<out>/summary.md`, `<out>/summary.json` and `<out>/compare.png`. Each run keeps its directory
(`<out>/<method>/seed-<s>`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import sys
from pathlib import Path

from fastdarts import search
from fastdarts.analyze import cell_depth, cell_width
from fastdarts.checkpoint import atomic_write_text
from fastdarts.config import SearchConfig, parse_command_line, run_cli, seed_list
from fastdarts.errors import ConfigError
from fastdarts.methods import METHODS

# Per run: what the table reports, in its order, with the column titles.
COLUMNS = {
    "val_acc": "val accuracy",
    "normal_skip_connects": "normal skips",
    "normal_width": "width (c)",
    "normal_depth": "depth",
    "seconds_per_epoch": "s / epoch",
    "epochs": "epochs",
    "seconds": "s in all",
}


def method_list(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in METHODS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown method {unknown[0] if unknown else text!r}; the methods are "
                                         f"{', '.join(METHODS)}")  # fmt: skip
    return names


def final_metrics(config: SearchConfig) -> dict:
    """One search's figures for the table."""
    result = search.run(config)
    seconds = [row["seconds"] for row in result.history]
    genotype = result.genotype
    return {
        "val_acc": result.history[-1]["val_acc"],
        "normal_skip_connects": result.history[-1]["normal_skip_connects"],
        "normal_width": float(cell_width(genotype.normal)),
        "normal_depth": cell_depth(genotype.normal, genotype.normal_concat),
        "seconds_per_epoch": statistics.mean(seconds),
        "epochs": len(seconds),
        "seconds": sum(seconds),
        "genotype": str(genotype),
    }


CALIBRATION_EPOCHS = 3


def epochs_in_budget(config: SearchConfig, budget: float, out: Path) -> tuple[int, float]:
    """(epochs that fit `budget` seconds, the calibration's median seconds per epoch) for `config`'s method."""
    calibration = dataclasses.replace(config, epochs=CALIBRATION_EPOCHS, seed=0, out=str(out))
    seconds = statistics.median(row["seconds"] for row in search.run(calibration).history)
    return max(1, math.floor(budget / seconds)), seconds


def summarise(runs: list[dict]) -> dict:
    summary = {}
    for key in COLUMNS:
        values = [float(run[key]) for run in runs]
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        summary[key] = {"mean": statistics.mean(values), "std": std, "values": values}
    return summary


def table(summaries: dict[str, dict], seeds: list[int], budget: float) -> str:
    lines = [
        f"Search on the bundled digits, {budget:g} s of epochs per run, seeds {', '.join(map(str, seeds))} "
        "(mean ± sample std):",
        "",
        "| method | " + " | ".join(COLUMNS.values()) + " |",
        "|---|" + "---|" * len(COLUMNS),
    ]
    for method, summary in summaries.items():
        cells = []
        for key in COLUMNS:
            s = summary[key]
            digits = 4 if key == "val_acc" else 1 if key in ("seconds_per_epoch", "seconds") else 2
            cells.append(f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f}")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(summaries: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(summaries)
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, key in zip(axes, ("val_acc", "normal_skip_connects", "seconds_per_epoch")):
        means = [summaries[m][key]["mean"] for m in methods]
        stds = [summaries[m][key]["std"] for m in methods]
        ax.bar(range(len(methods)), means, yerr=stds, capsize=3, color="tab:blue", alpha=0.8)
        for i, m in enumerate(methods):  # every seed's value over its bar
            ax.plot([i] * len(summaries[m][key]["values"]), summaries[m][key]["values"], "k.", ms=4)
        ax.set_xticks(range(len(methods)), methods, rotation=35, ha="right")
        ax.set_title(COLUMNS[key])
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=120.0, help="seconds of search epochs per run (default 120)")
    parser.add_argument("--seeds", type=seed_list, default=[0, 1, 2], help="comma-separated (default 0,1,2)")
    parser.add_argument("--methods", type=method_list, default=list(METHODS),
                        help=f"comma-separated (default all: {','.join(METHODS)})")  # fmt: skip
    parser.add_argument("--out", default="runs/compare", help="parent of the run directories (default runs/compare)")
    args, search_flags = parser.parse_known_args(argv)
    if not args.budget > 0:
        raise ConfigError(f"budget must be > 0 seconds, got {args.budget}")
    if any(flag.split("=")[0] in ("--method", "--epochs", "--seed", "--seeds", "--out") for flag in search_flags):
        raise ConfigError("--method, --epochs, --seed(s) and --out are this script's to set")
    out = Path(args.out)
    summaries, runs = {}, {}
    for method in args.methods:
        cli = parse_command_line(SearchConfig, [*search_flags, "--method", method], "compare_methods.py", "")
        epochs, calibration = epochs_in_budget(cli.config, args.budget, out / method / "calibration")
        print(f"== {method}: {calibration:.1f} s per calibration epoch (median of {CALIBRATION_EPOCHS}) "
              f"-> {epochs} epochs per run")
        runs[method] = [final_metrics(dataclasses.replace(cli.config, epochs=epochs, seed=seed,
                                                          out=str(out / method / f"seed-{seed}")))
                        for seed in args.seeds]  # fmt: skip
        summaries[method] = summarise(runs[method])
    text = table(summaries, args.seeds, args.budget)
    print("\n" + text)
    atomic_write_text(out / "summary.md", text)
    record = {"budget": args.budget, "seeds": args.seeds, "summary": summaries, "runs": runs}
    atomic_write_text(out / "summary.json", json.dumps(record, indent=2) + "\n")
    plot(summaries, out / "compare.png")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
