"""Pictures of a run, drawn with matplotlib (no display needed): the curves of its metrics.jsonl, and the cell
diagrams where Graphviz is not installed."""

from __future__ import annotations

import json
import math
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
            for j, op in enumerate(rows[0].get("ops", PRIMITIVES)):  # runs before "ops" was logged: PRIMITIVES
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


# ----------------------------------------------------------------------------------------------
# Cell diagrams without Graphviz: the picture of analyze.cell_to_dot's digraph, drawn with matplotlib

_FIRST = 3.2  # data units from the inputs to the first node: most edges leave the inputs
_COLUMN = 2.6  # data units between node columns: room for the widest label ("sep_conv_3x3") between two nodes
_ROW = 0.8  # intermediate nodes zigzag above and below the middle line, so that an edge skipping one clears it
_INPUT_ROW = 1.6  # c_{k-2} above the middle line, c_{k-1} below it
_RADIUS = 0.32  # of an intermediate node
_BOX = (1.1, 0.55)  # width and height of the input and output boxes
_INCH = 0.7  # inches per data unit
_FONT = 9  # points, of the op labels
_CHAR = _FONT * 0.62 / 72 / _INCH  # width of a label character in data units (DejaVu Sans averages 0.6 em)
_LINE = 0.36  # data units between two labels' baselines at the least: a line of text and its white box
_RADS = (0.0, 0.15, -0.15, 0.3, -0.3, 0.45, -0.45, 0.6, -0.6)  # arc curvatures to try, straightest first
_LABEL_TS = (0.5, 0.6, 0.4, 0.7, 0.3, 0.65, 0.35, 0.75, 0.25, 0.8, 0.2)  # places on an arc to try, middle first
# Graphviz's darkseagreen2, lightblue and palegoldenrod, the colours of the .dot file.
_FILL = {"input": "#b4eeb4", "node": "#add8e6", "output": "#eee8aa"}

_Label = tuple[tuple[float, float], float, str]  # centre, angle in degrees, op name


def draw_cell(edges, concat, base: Path) -> list[Path]:
    """Draw one cell as a DAG, left to right: c_{k-2} and c_{k-1}, the intermediate nodes in their order (every
    edge goes from an earlier node to a later one), c_{k}; each edge labelled with its op along it, and gray edges
    from the `concat` nodes into c_{k}. Writes `base`.png and `base`.svg, the files Graphviz would render."""
    import matplotlib
    from matplotlib.figure import Figure  # no pyplot: no global backend to set, no figure to close
    from matplotlib.patches import Circle, FancyArrowPatch, FancyBboxPatch

    steps = len(edges) // 2
    output = 2 + steps
    nodes = _cell_nodes(steps)
    names = {0: "$c_{k-2}$", 1: "$c_{k-1}$", output: "$c_{k}$", **{2 + i: str(i) for i in range(steps)}}
    routed = _route(_cell_arrows(edges, concat), nodes)
    labels = _place_labels(routed, nodes)

    fig = Figure()
    ax = fig.add_axes((0, 0, 1, 1))
    patches = {}
    for node, (x, y, half_w, half_h) in nodes.items():
        if node in (0, 1, output):
            kind = "output" if node == output else "input"
            patch = FancyBboxPatch((x - half_w, y - half_h), 2 * half_w, 2 * half_h, facecolor=_FILL[kind],
                                   boxstyle="round,pad=0,rounding_size=0.08", edgecolor="black")  # fmt: skip
        else:
            patch = Circle((x, y), _RADIUS, facecolor=_FILL["node"], edgecolor="black")
        patches[node] = ax.add_patch(patch)
        ax.text(x, y, names[node], ha="center", va="center", fontsize=_FONT + 2, zorder=4)
    for source, target, op, rad in routed:
        ax.add_patch(FancyArrowPatch(nodes[source][:2], nodes[target][:2], connectionstyle=f"arc3,rad={rad}",
                                     arrowstyle="-|>", mutation_scale=12, linewidth=1.1,
                                     color="gray" if op is None else "black", patchA=patches[source],
                                     patchB=patches[target], shrinkA=0, shrinkB=1))  # fmt: skip
    for (x, y), angle, op in labels:
        ax.text(x, y, op, ha="center", va="center", rotation=angle, rotation_mode="anchor", fontsize=_FONT,
                zorder=3, bbox=dict(boxstyle="round,pad=0.1", facecolor="white", edgecolor="none"))  # fmt: skip

    # The axes span every node, arc and label, at _INCH inches per unit in both directions.
    points = [(x + sx * w, y + sy * h) for x, y, w, h in nodes.values() for sx in (-1, 1) for sy in (-1, 1)]
    points += [p for s, t, _, rad in routed for p in _arc(nodes[s][:2], nodes[t][:2], rad)]
    points += [(x, y + sy * _LINE / 2) for label in labels for x, y in _label_points(*label) for sy in (-1, 1)]
    x0, x1 = min(x for x, _ in points) - 0.2, max(x for x, _ in points) + 0.2
    y0, y1 = min(y for _, y in points) - 0.2, max(y for _, y in points) + 0.2
    ax.set(xlim=(x0, x1), ylim=(y0, y1), aspect="equal")  # equal: label angles in data units are those drawn
    ax.axis("off")
    fig.set_size_inches((x1 - x0) * _INCH, (y1 - y0) * _INCH)
    written = []
    for suffix in (".png", ".svg"):
        path = base.with_suffix(suffix)
        with matplotlib.rc_context({"svg.fonttype": "none"}):  # SVG text stays text, as in Graphviz's SVG
            fig.savefig(path, dpi=150, bbox_inches="tight", pad_inches=0.1)
        written.append(path)
    return written


def _cell_arrows(edges, concat) -> list[tuple[int, int, str | None]]:
    """(source node, target node, op) of every edge, then (concat node, output node, None) of the output's inputs."""
    output = 2 + len(edges) // 2
    return [(index, 2 + k // 2, op) for k, (op, index) in enumerate(edges)] + [(c, output, None) for c in concat]


def _cell_nodes(steps: int) -> dict[int, tuple[float, float, float, float]]:
    """Node (0, 1 the inputs, 2.. the intermediate nodes, 2 + steps the output) -> centre and half width and height,
    in data units."""
    box = (_BOX[0] / 2, _BOX[1] / 2)
    nodes = {0: (0.0, _INPUT_ROW, *box), 1: (0.0, -_INPUT_ROW, *box)}
    for i in range(steps):
        nodes[2 + i] = (_FIRST + i * _COLUMN, _ROW if i % 2 == 0 else -_ROW, _RADIUS, _RADIUS)
    nodes[2 + steps] = (_FIRST + steps * _COLUMN, 0.0, *box)
    return nodes


def _arc(a, b, rad: float, ts=None) -> list[tuple[float, float]]:
    """Points of matplotlib's arc3 connection from centre a to centre b: the quadratic Bezier curve whose control
    point lies `rad` times the chord's length off its middle, to the right when looking from a to b."""
    (xa, ya), (xb, yb), (xc, yc) = a, b, _control_point(a, b, rad)
    ts = [i / 20 for i in range(1, 20)] if ts is None else ts
    return [((1 - t) ** 2 * xa + 2 * (1 - t) * t * xc + t**2 * xb, (1 - t) ** 2 * ya + 2 * (1 - t) * t * yc + t**2 * yb)
            for t in ts]  # fmt: skip


def _control_point(a, b, rad: float) -> tuple[float, float]:
    (xa, ya), (xb, yb) = a, b
    return (xa + xb) / 2 + rad * (yb - ya), (ya + yb) / 2 - rad * (xb - xa)


def _overlaps(point, half_w, half_h, node) -> bool:
    """Whether a box of these half sizes around `point` overlaps the (box around the) node, 0.1 apart at least."""
    x, y, w, h = node
    return abs(point[0] - x) < half_w + w + 0.1 and abs(point[1] - y) < half_h + h + 0.1


def _route(arrows, nodes) -> list[tuple[int, int, str | None, float]]:
    """Each (source, target, op) with the straightest arc that passes no other node and is not drawn already
    between the same two nodes (a node may take both its edges from one input)."""
    routed = []
    for source, target, op in arrows:
        taken = [rad for s, t, _, rad in routed if (s, t) == (source, target)]
        others = [n for key, n in nodes.items() if key not in (source, target)]
        free = [rad for rad in _RADS if all(abs(rad - r) > 0.25 for r in taken)]  # parallel arcs well apart
        a, b = nodes[source][:2], nodes[target][:2]
        hits = [sum(_overlaps(p, 0.05, 0.05, n) for p in _arc(a, b, rad) for n in others) for rad in free]
        routed.append((source, target, op, free[hits.index(min(hits))]))  # of the fewest hits, the straightest
    return routed


def _label_points(centre, angle: float, op: str) -> list[tuple[float, float]]:
    """Points along a label's baseline, a character apart, from end to end."""
    half, n = len(op) * _CHAR / 2, max(len(op), 1)
    dx, dy = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    return [(centre[0] + s * dx, centre[1] + s * dy) for s in (half * (2 * i / n - 1) for i in range(n + 1))]


def _labels_clash(a: _Label, b: _Label) -> bool:
    return any(math.dist(p, q) < _LINE for p in _label_points(*a) for q in _label_points(*b))


def _label_hits_node(label: _Label, nodes) -> bool:
    return any(_overlaps(p, _LINE / 2, _LINE / 2, n) for p in _label_points(*label) for n in nodes.values())


def _place_labels(routed, nodes) -> list[_Label]:
    """Each labelled arc's op name laid along it, at the place nearest its middle where it touches no node and no
    label placed before it (else at the middle)."""
    placed: list[_Label] = []
    for source, target, op, rad in routed:
        if op is None:
            continue
        (xa, ya), (xb, yb) = a, b = nodes[source][:2], nodes[target][:2]
        xc, yc = _control_point(a, b, rad)
        candidates = []
        for t, point in zip(_LABEL_TS, _arc(a, b, rad, _LABEL_TS)):
            # The curve's direction at t; every edge runs left to right, so the text is never upside down.
            dx = (1 - t) * (xc - xa) + t * (xb - xc)
            dy = (1 - t) * (yc - ya) + t * (yb - yc)
            candidates.append((point, math.degrees(math.atan2(dy, dx)), op))
        clear = [c for c in candidates if not (_label_hits_node(c, nodes) or any(_labels_clash(c, p) for p in placed))]
        placed.append((clear or candidates)[0])
    return placed


# ----------------------------------------------------------------------------------------------
# The convergence study (fastdarts.convergence)


def plot_convergence_study(summary: dict, runs: dict[str, dict[int, dict]], study: str, out_dir: Path) -> list[Path]:
    """The study's pictures from its summary and each run's scalars and curves (label -> seed -> scalars):
    loss curves per group (Shu et al.'s Fig. 13), speed against generalisation, gradient variance, sharpness,
    the 2-D landscapes when measured, and for the skips study the measures against the number of skips."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    variants = summary["variants"]
    predictor = "normal_width" if study == "width" else "normal_skips"
    name = {"normal_width": "normal-cell width (c)", "normal_skips": "skip connections in the normal cell"}[predictor]
    groups = sorted({v[predictor] for v in variants.values()})
    original = next((label for label, v in variants.items() if v["original"]), None)
    colours = plt.get_cmap("viridis")(np.linspace(0, 0.9, max(len(groups), 1)))
    colour = {label: colours[groups.index(v[predictor])] for label, v in variants.items()}
    written = []

    def curve_band(ax, label, key, **style):
        curves = np.array([r[key] for r in runs[label].values()])
        epochs = np.arange(curves.shape[1]) + (0 if key == "clean_train_curve" else 1)
        ax.plot(epochs, curves.mean(0), label=label, **style)
        if len(curves) > 1:
            ax.fill_between(epochs, curves.min(0), curves.max(0), alpha=0.15, color=style.get("color"))

    for key, file, ylabel in (("test_curve", "convergence_test_loss.png", "test loss"),
                              ("clean_train_curve", "convergence_train_loss.png", "clean training loss")):  # fmt: skip
        fig, axes = plt.subplots(1, len(groups), figsize=(3.6 * len(groups), 3.4), sharey=True, squeeze=False)
        for ax, group in zip(axes[0], groups):
            for label, v in variants.items():
                if v[predictor] == group and label != original:
                    curve_band(ax, label, key, color=colour[label])
            if original is not None:
                curve_band(ax, original, key, color="black", linewidth=2)
            ax.set(title=f"{group:g}" + ("c" if study == "width" else " skips"), xlabel="epoch")
            ax.set_yscale("log")
            ax.legend(fontsize=7)
            ax.grid(alpha=0.3)
        axes[0][0].set_ylabel(ylabel)
        written.append(_save(fig, out_dir / file))

    def by_predictor(ax, key, ylabel, log=False):
        rng = np.random.default_rng(0)
        for label, v in variants.items():
            m = v["metrics"][key]
            x = v[predictor] + rng.uniform(-0.08, 0.08) * (0.5 if study == "width" else 1)
            marker = "*" if label == original else "os^Dv<>"[min(v["normal_depth"], 8) % 7]
            ax.errorbar(x, m["mean"], yerr=0 if np.isnan(m["sd"]) else m["sd"], fmt=marker, color=colour[label],
                        markersize=12 if label == original else 6, markeredgecolor="black" if label == original
                        else "none", capsize=2)  # fmt: skip
        found = [c for c in summary["correlations"] if c["predictor"] == predictor and c["metric"] == key]
        title = ylabel if not found else f"{ylabel}\nrho {found[0]['rho']:.2f}, p {found[0]['p']:.2g}"
        ax.set(xlabel=name, ylabel=ylabel, title=title)
        if log:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    by_predictor(left, "auc_train", "mean clean training loss (lower: faster)")
    by_predictor(right, "final_test_acc", "final test accuracy")
    fig.suptitle("converges faster, generalises better?" + (" (star: the original; marker: depth)"
                                                            if original else ""))  # fmt: skip
    written.append(_save(fig, out_dir / "speed_vs_generalisation.png"))

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for label in variants:
        points = np.array([p for r in runs[label].values() for p in r["gradvar_curve"]])
        epochs = sorted(set(points[:, 0]))
        means = [points[points[:, 0] == e, 1].mean() for e in epochs]
        left.plot(epochs, means, marker=".", color="black" if label == original else colour[label], label=label)
    left.set(xlabel="epoch", ylabel="per-sample gradient variance (test)", yscale="log", title="gradient variance")
    left.legend(fontsize=6, ncol=2)
    left.grid(alpha=0.3)
    by_predictor(right, "gv_1_end_test", "gradient variance at the end", log=True)
    written.append(_save(fig, out_dir / "gradient_variance.png"))

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for label in variants:
        landscapes = [r["landscape"] for r in runs[label].values() if "landscape" in r]
        if landscapes:
            ls = landscapes[0]
            left.plot(ls["t"], np.mean(ls["curves"], axis=0), color="black" if label == original else colour[label],
                      label=label)  # fmt: skip
    left.set(xlabel="step along a filter-normalised direction", ylabel="test loss (mean of 2 directions)",
             yscale="log", title="1-D loss landscape (first seed)")  # fmt: skip
    left.legend(fontsize=6, ncol=2)
    left.grid(alpha=0.3)
    by_predictor(right, "lambda_max", "top Hessian eigenvalue", log=True)
    written.append(_save(fig, out_dir / "sharpness.png"))

    grids = {label: r["landscape"]["grid"] for label in variants for r in list(runs[label].values())[:1]
             if "grid" in r.get("landscape", {})}  # fmt: skip
    if grids:
        cols = min(4, len(grids))
        rows = (len(grids) + cols - 1) // cols
        fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3 * rows), squeeze=False)
        # One set of levels for every panel, unlike Shu et al.'s, so that the panels compare.
        low = min(min(map(min, g["loss"])) for g in grids.values())
        high = max(max(map(max, g["loss"])) for g in grids.values())
        levels = np.geomspace(max(low, 1e-4), high, 15)
        for ax, (label, g) in zip(axes.flat, grids.items()):
            ax.contour(g["axis"], g["axis"], g["loss"], levels=levels, cmap="summer")
            ax.set(title=f"{label} ({variants[label][predictor]:g})", aspect="equal")
        for ax in list(axes.flat)[len(grids) :]:
            ax.axis("off")
        written.append(_save(fig, out_dir / "landscape_2d.png"))

    if study == "skips":
        fig, axes = plt.subplots(1, 3, figsize=(14, 4))
        by_predictor(axes[0], "auc_train", "mean clean training loss")
        by_predictor(axes[1], "final_test_acc", "final test accuracy")
        by_predictor(axes[2], "ntk_lambda_min_init", "NTK lambda_min at initialisation", log=True)
        for v in variants.values():
            m = v["metrics"]["auc_train"]["mean"]
            axes[0].annotate(f"{v['parameters'] / 1e3:.0f}k", (v[predictor], m), fontsize=6, alpha=0.7)
        fig.suptitle("skip connections (labels: parameters)")
        written.append(_save(fig, out_dir / "skips.png"))
    return written
