"""Pictures of a search run, drawn from its metrics.jsonl (matplotlib, no display needed)."""

from __future__ import annotations

import json
from pathlib import Path

from .errors import FastDartsError
from .space import PRIMITIVES


def read_metrics(path: Path) -> list[dict]:
    try:
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except (OSError, json.JSONDecodeError) as e:
        raise FastDartsError(f"{path}: cannot read the run's metrics ({e})") from None
    if not rows:
        raise FastDartsError(f"{path}: no epochs logged yet")
    return rows


def plot_run(metrics_path: Path, out_dir: Path) -> list[Path]:
    """Loss and accuracy curves, every op's weight on every edge over epochs, and skip counts per epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(Path(metrics_path))
    out_dir.mkdir(parents=True, exist_ok=True)
    epochs = [r["epoch"] for r in rows]
    written = []

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for split in [s for s in ("train", "val", "test") if f"{s}_loss" in rows[0]]:
        ax_loss.plot(epochs, [r[f"{split}_loss"] for r in rows], marker=".", label=split)
        ax_acc.plot(epochs, [r[f"{split}_acc"] for r in rows], marker=".", label=split)
    ax_loss.set(xlabel="epoch", ylabel="loss", title="loss")
    ax_acc.set(xlabel="epoch", ylabel="accuracy", title="accuracy")
    for ax in (ax_loss, ax_acc):
        ax.legend()
        ax.grid(alpha=0.3)
    written.append(_save(fig, out_dir / "curves.png"))

    if "normal_skip_connects" in rows[0]:  # a search run
        fig, ax = plt.subplots(figsize=(5, 4))
        for cell in ("normal", "reduce"):
            ax.plot(epochs, [r[f"{cell}_skip_connects"] for r in rows], marker="o", label=f"{cell} cell")
        ax.set(xlabel="epoch", ylabel="skip connections in the derived cell", title="skip connections")
        ax.yaxis.get_major_locator().set_params(integer=True)
        ax.legend()
        ax.grid(alpha=0.3)
        written.append(_save(fig, out_dir / "skip_connects.png"))

    for cell in ("normal", "reduce"):
        key = f"weights_{cell}"
        if key not in rows[0]:
            continue
        num_edges = len(rows[0][key])
        cols = 5
        fig, axes = plt.subplots((num_edges + cols - 1) // cols, cols, figsize=(3 * cols, 2.4 * ((num_edges + 4) // 5)),
                                 sharex=True, sharey=True, squeeze=False)  # fmt: skip
        names = _edge_names(num_edges)
        for e, ax in enumerate(axes.flat):
            if e >= num_edges:
                ax.axis("off")
                continue
            for j, op in enumerate(PRIMITIVES):
                ax.plot(epochs, [r[key][e][j] for r in rows], label=op)
            ax.set_title(names[e], fontsize=9)
            ax.grid(alpha=0.3)
        axes.flat[0].legend(fontsize=6, loc="upper left")
        for ax in axes[-1]:
            ax.set_xlabel("epoch")
        fig.suptitle(f"{cell} cell: weight of every op on every edge")
        written.append(_save(fig, out_dir / f"weights_{cell}.png"))
    return written


def _edge_names(num_edges: int) -> list[str]:
    names, node = [], 0
    while len(names) < num_edges:
        names += [f"node {node} <- {i}" for i in range(2 + node)]
        node += 1
    return names[:num_edges]


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
