"""Plots of a recurrent run's metrics.jsonl: perplexity curves, and each row of alpha's op weights over epochs."""

from __future__ import annotations

import math
from pathlib import Path

from ..plots import _save, read_metrics
from .genotype import PRIMITIVES


def plot_recurrent_run(metrics_path: Path, out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(Path(metrics_path))
    epochs = [r["epoch"] for r in rows]
    fig, ax = plt.subplots(figsize=(5, 4))
    for split in [s for s in ("train", "val", "test") if f"{s}_loss" in rows[0]]:
        ax.plot(epochs, [math.exp(min(r[f"{split}_loss"], 700)) for r in rows], marker=".", label=split)
    ax.set(xlabel="epoch", ylabel="perplexity", title="perplexity", yscale="log")
    ax.legend()
    ax.grid(alpha=0.3)
    written = [_save(fig, Path(out_dir) / "curves.png")]
    if "weights_recurrent" in rows[0]:
        num_rows = len(rows[0]["weights_recurrent"])
        cols = 6
        fig, axes = plt.subplots(-(-num_rows // cols), cols, figsize=(3 * cols, 2.2 * -(-num_rows // cols)),
                                 sharex=True, sharey=True, squeeze=False)  # fmt: skip
        names = [f"node {n} <- {j}" for n in range(1, num_rows + 1) for j in range(n)][:num_rows]
        for e, ax in enumerate(axes.flat):
            if e >= num_rows:
                ax.axis("off")
                continue
            for k, op in enumerate(PRIMITIVES):
                ax.plot(epochs, [r["weights_recurrent"][e][k] for r in rows], label=op)
            ax.set_title(names[e], fontsize=9)
            ax.grid(alpha=0.3)
        axes.flat[0].legend(fontsize=6, loc="upper left")
        fig.suptitle("recurrent cell: weight of every op on every edge")
        written.append(_save(fig, Path(out_dir) / "weights_recurrent.png"))
    return written
