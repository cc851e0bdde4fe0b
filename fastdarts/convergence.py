"""`python -m fastdarts.convergence`: do wide, shallow, skip-heavy cells converge faster, and do they generalise
better? (Shu, Wang & Cai, ICLR 2020; the PR-DARTS theory; CONVERGENCE_STUDY.md section 8.)

`--study width` trains a cell and random rewirings of it grouped by normal-cell width; `--study skips` trains
cells that share the normal cell's wiring and differ in their number of skip connections. Every (variant, seed)
is an ordinary `fastdarts.train` run in `<study>/variants/<label>/seed-<s>/`, measured at initialisation, after
every epoch (clean training loss; gradient variance at the probe epochs) and at the end (top Hessian eigenvalue,
loss landscape, empirical NTK). `summary.md`, `summary.json` and the plots then rank-correlate width, depth or
skips with each measurement and say whether each paper's prediction holds. A study stopped at any point continues
with `--resume STUDY_DIR`: finished runs are skipped, an interrupted run continues from its checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import signal
import stat
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

from . import train
from .analyze import (
    CELLS,
    cell_depth,
    cell_edges,
    cell_width,
    describe_network,
    random_wiring_variant,
    shu_wiring_variant,
)
from .checkpoint import RunInterrupted, StopSignals, atomic_write_text, load_checkpoint
from .config import CommonConfig, StudyConfig, TrainConfig, parse_command_line, run_cli
from .data import Images, load_dataset
from .errors import ConfigError, RunFailed, path_stat
from .memory import keep_freed_memory
from .plots import plot_convergence_study, read_metrics
from .probes import (
    ModelProbe,
    filter_normalized_direction,
    gradient,
    gradient_variance,
    gram_eigenvalues,
    loss_surface,
    recalibrated_copy,
    sharpness_of_curves,
    top_hessian_eigenvalue,
)
from .runloop import CHECKPOINT, METRICS, evaluate, seed_everything
from .space import Genotype, load_genotype
from .stats import bootstrap_interval, partial_spearman, permutation_pvalue, seed_noise_ratio, spearman

STUDY_FILE = "study.json"
INITIAL = "initial.json"  # a run's measurements at initialisation
MEASUREMENTS = "measurements.json"  # written last: a run with it is finished
EVAL_BATCH = 256
LANDSCAPE_SEED = 123  # the seed of the directions in Li et al.'s plot_surface.py
# Settings a resumed study may change: they do not alter what it computes.
RESUME_OVERRIDES = ("jobs", "progress")


# ----------------------------------------------------------------------------------------------
# The variants


@dataclass(frozen=True)
class Variant:
    label: str
    genotype: Genotype
    original: bool = False
    drawn_with: str = ""  # how to draw it again


def width_variants(genotype: Genotype, widths: list[float], per_group: int, rewire: str, seed: int,
                   generator: str = "shu", max_draws: int = 100000) -> list[Variant]:  # fmt: skip
    """`genotype` and `per_group` distinct random rewirings of it for each normal-cell width in `widths`, labelled
    C1, C2, ... by width ascending, then depth descending (as Shu et al. number theirs).

    The rewirings are the first that fill the groups among Shu et al.'s `random_conn` with seeds `seed` + 1, + 2, ...
    (`generator == "shu"`; seeds 1..10 of DARTS_V2 are their DARTS_CONN1..10), or among the draws of one
    `random.Random(seed)` stream (`"fastdarts"`, analyze.random_wiring_variant). With `rewire == "normal"` the
    reduction cell is kept, so that the normal cell's wiring is the only change between variants.
    """
    wanted: dict[Fraction, list[tuple[Genotype, str]]] = {Fraction(w).limit_denominator(2): [] for w in widths}
    steps = len(genotype.normal) // 2
    impossible = [f"{float(w):g}c" for w in wanted if not 1 <= w <= steps]  # the first node reads only the inputs
    if impossible:
        raise ConfigError(f"a normal cell of {steps} nodes is 1c to {steps}c wide; no rewiring has width "
                          f"{', '.join(impossible)}")  # fmt: skip
    rng = random.Random(seed)
    for draw in range(1, max_draws + 1):
        if all(len(found) == per_group for found in wanted.values()):
            break
        if generator == "shu":
            candidate, how = shu_wiring_variant(genotype, seed + draw), f"random_conn seed {seed + draw}"
        else:
            candidate, how = random_wiring_variant(genotype, rng), f"random.Random({seed}) draw {draw}"
        if rewire == "normal":
            candidate = dataclasses.replace(candidate, reduce=genotype.reduce, reduce_concat=genotype.reduce_concat)
            how += ", reduction cell kept"
        found = wanted.get(cell_width(candidate.normal))
        if found is None or len(found) == per_group or candidate == genotype or candidate in [g for g, _ in found]:
            continue
        found.append((candidate, how))
    short = [f"{float(w):g}c ({len(f)} of {per_group})" for w, f in wanted.items() if len(f) < per_group]
    if short:
        raise ConfigError(f"too few distinct rewirings of this cell have width {', '.join(short)}")
    drawn = [pair for found in wanted.values() for pair in found]
    drawn.sort(key=lambda pair: (cell_width(pair[0].normal), -cell_depth(pair[0].normal, pair[0].normal_concat)))
    return [Variant("original", genotype, True)] + [Variant(f"C{i + 1}", g, False, how)
                                                    for i, (g, how) in enumerate(drawn)]  # fmt: skip


def skip_variants(genotype: Genotype, counts: list[int], placements: int, seed: int) -> list[Variant]:
    """For each k in `counts`, up to `placements` distinct random choices of k normal-cell edges that become
    skip_connect, every other normal edge sep_conv_3x3; wiring, concat and reduction cell unchanged."""
    edges = genotype.normal
    if max(counts) > len(edges):
        raise ConfigError(f"skips: the normal cell has {len(edges)} edges, cannot hold {max(counts)} skips")
    rng = random.Random(seed)
    out = []
    for k in counts:
        chosen: list[tuple[int, ...]] = []
        while len(chosen) < min(placements, math.comb(len(edges), k)):
            pick = tuple(sorted(rng.sample(range(len(edges)), k)))
            if pick not in chosen:
                chosen.append(pick)
        for j, pick in enumerate(chosen):
            normal = [("skip_connect" if i in pick else "sep_conv_3x3", index) for i, (_, index) in enumerate(edges)]
            how = f"skip_connect on normal edges {list(pick)}"
            out.append(Variant(f"skips{k}-{j + 1}", dataclasses.replace(genotype, normal=tuple(normal)), False, how))
    return out


def describe_variant(variant: Variant, config: StudyConfig, data: Images) -> dict:
    g = variant.genotype
    row = {"label": variant.label, "original": variant.original, "drawn_with": variant.drawn_with, "genotype": str(g)}
    for cell in CELLS:
        edges, concat = cell_edges(g, cell)
        row[f"{cell}_width"] = float(cell_width(edges))
        row[f"{cell}_depth"] = cell_depth(edges, concat)
        row[f"{cell}_skips"] = sum(op == "skip_connect" for op, _ in edges)
    network = describe_network(g, C=config.init_channels, layers=config.layers, num_classes=data.num_classes,
                               image_size=data.image_size, in_channels=data.in_channels)  # fmt: skip
    row.update(parameters=network["parameters"], multiply_adds=network["multiply_adds"])
    return row


# ----------------------------------------------------------------------------------------------
# One run: train a variant for one seed, measuring it as it trains


class ProbeSets:
    """The fixed image subsets every run of a study is measured on, drawn from the study seed."""

    def __init__(self, config: StudyConfig, train_data: Images, test: Images):
        g = torch.Generator().manual_seed(config.study_seed)
        order = torch.randperm(len(train_data), generator=g)
        self.clean = order[: config.clean_images]
        self.gradvar_train = torch.randperm(len(train_data), generator=g)[: config.probe_images]
        self.gradvar_test = torch.randperm(len(test), generator=g)[: config.probe_images]
        self.hessian = order[: config.hessian_images]
        self.ntk = order[: config.ntk_images]
        self.recalibrate = order[: 4 * config.batch_size]  # TE-NAS recalibrates BN on 4 batches
        self.landscape = torch.randperm(len(test), generator=g)[: config.landscape_images]


class Measurer:
    """What a run measures and when; one per process, holding the data and the probe subsets."""

    def __init__(self, config: StudyConfig):
        self.config = config
        options = config.data_options()
        self.train = load_dataset(config.dataset, config.data, "train", **options)
        self.test = load_dataset(config.dataset, config.data, "test", **options)
        self.sets = ProbeSets(config, self.train, self.test)
        self.probe_epochs = set(config.probe_epochs())

    def gradient_variance(self, model: torch.nn.Module) -> dict:
        """The gradient variance on the test split (Shu et al.'s) and on a training subset of the same size."""
        was_training = model.training
        out = {}
        try:
            for split, data, indices in (("test", self.test, self.sets.gradvar_test),
                                         ("train", self.train, self.sets.gradvar_train)):  # fmt: skip
                probe = ModelProbe(model, data, EVAL_BATCH)
                out[split] = gradient_variance(probe.loss, probe.params(), indices, self.config.gradvar_batch)
        finally:
            model.train(was_training)
        return out

    def after_epoch(self, model: torch.nn.Module, epochs_done: int) -> dict:
        """The train.Observer: the clean training loss every epoch, the gradient variance at the probe epochs.
        Deterministic and read-only (eval mode, no augmentation), so the run trains as it would without it."""
        loss, acc = evaluate(model, self.train, self.sets.clean, EVAL_BATCH)
        row = {"clean_train_loss": loss, "clean_train_acc": acc}
        if epochs_done in self.probe_epochs:
            row["gradvar"] = self.gradient_variance(model)
        return row

    def ntk(self, model: torch.nn.Module) -> dict:
        """The empirical NTK's Gram matrix on the NTK subset, on a copy whose BN statistics are recalibrated."""
        calibrated = recalibrated_copy(model, self.train, self.sets.recalibrate, self.config.batch_size)
        probe = ModelProbe(calibrated, self.train)
        return gram_eigenvalues(probe.per_sample_output_gradients(probe.params(weights_only=True), self.sets.ntk))

    def at_initialisation(self, model: torch.nn.Module) -> dict:
        """Epoch 0: the untrained network's running BN statistics are placeholders, so a recalibrated copy is
        measured (the clean loss, the gradient variance) as the NTK is."""
        calibrated = recalibrated_copy(model, self.train, self.sets.recalibrate, self.config.batch_size)
        loss, acc = evaluate(calibrated, self.train, self.sets.clean, EVAL_BATCH)
        return {"clean_train_loss": loss, "clean_train_acc": acc, "gradvar": self.gradient_variance(calibrated),
                **self.ntk(model)}  # fmt: skip

    def at_end(self, model: torch.nn.Module, landscape: bool, seed: int) -> dict:
        config = self.config
        model.eval()
        train_probe = ModelProbe(model, self.train, EVAL_BATCH)
        params = train_probe.params()
        hessian = top_hessian_eigenvalue(lambda p: gradient(train_probe.loss, p, self.sets.hessian), params,
                                         config.hessian_iters,
                                         generator=torch.Generator().manual_seed(config.study_seed + seed))  # fmt: skip
        out = {"hessian": hessian, "lambda_max": hessian["lambda_max"], **self.ntk(model)}
        if landscape and config.landscape != "none":
            out["landscape"] = self.landscape(model)
            out.update(sharpness_of_curves(out["landscape"]["t"], out["landscape"]["curves"]))
        return out

    def landscape(self, model: torch.nn.Module) -> dict:
        """Loss curves along two filter-normalised directions through the trained weights, and with --landscape 2d
        the grid of their plane, on the landscape's test images."""
        probe = ModelProbe(model, self.test, EVAL_BATCH)
        params = probe.params()
        generator = torch.Generator().manual_seed(LANDSCAPE_SEED)
        directions = [filter_normalized_direction(params, generator) for _ in range(2)]
        ts = np.linspace(-1, 1, self.config.landscape_points).tolist()
        curves = [loss_surface(probe.loss, params, self.sets.landscape, [d], [(t,) for t in ts]) for d in directions]
        out = {"t": ts, "curves": curves}
        if self.config.landscape == "2d":
            axis = np.linspace(-1, 1, self.config.grid).tolist()
            points = [(a, b) for b in axis for a in axis]
            grid = loss_surface(probe.loss, params, self.sets.landscape, directions, points)
            out["grid"] = {"axis": axis, "loss": [grid[i * len(axis) : (i + 1) * len(axis)] for i in range(len(axis))]}
        return out


def train_config(config: StudyConfig, variant: Variant, seed: int, run_dir: Path) -> TrainConfig:
    """One run: Shu et al.'s train_cifar10.py settings (no auxiliary head, no cutout, drop path ramped, clip 5)."""
    common = {f.name: getattr(config, f.name) for f in dataclasses.fields(CommonConfig)}
    common.update(out=str(run_dir), stop_after=None)
    return TrainConfig(**common, genotype=str(variant.genotype), network="cifar", learning_rate=config.learning_rate,
                       learning_rate_min=config.learning_rate_min, schedule="cosine", weight_decay=config.weight_decay,
                       label_smooth=0.0, auxiliary=False, cutout=False, drop_path_prob=config.drop_path_prob,
                       seed=seed).resolved()  # fmt: skip


def run_variant(study_dir: Path, measurer: Measurer, variant: Variant, seed: int, landscape: bool,
                progress: bool) -> dict:  # fmt: skip
    """Train and measure one (variant, seed), or continue it where it stopped; returns its measurements."""
    run_dir = study_dir / "variants" / variant.label / f"seed-{seed}"
    if (run_dir / MEASUREMENTS).is_file():
        return json.loads((run_dir / MEASUREMENTS).read_text())
    run_dir.mkdir(parents=True, exist_ok=True)
    config = train_config(measurer.config, variant, seed, run_dir)
    if not (run_dir / INITIAL).is_file():
        seed_everything(seed)  # the network train.run builds next, from the same seed
        initial = measurer.at_initialisation(train.build_network(config, variant.genotype, measurer.train))
        atomic_write_text(run_dir / INITIAL, json.dumps(initial, indent=2) + "\n")
    checkpoint = load_checkpoint(run_dir / CHECKPOINT) if (run_dir / CHECKPOINT).is_file() else None
    if checkpoint is None:
        for stale in (METRICS, "config.json"):  # rows of epochs no checkpoint holds: they are trained again
            (run_dir / stale).unlink(missing_ok=True)
        train.run(dataclasses.replace(config, progress=progress), observe=measurer.after_epoch)
    elif not checkpoint["complete"]:
        train.run(resume=run_dir, observe=measurer.after_epoch, progress=progress)
    checkpoint = load_checkpoint(run_dir / CHECKPOINT)
    model = train.build_network(config, variant.genotype, measurer.train)
    model.load_state_dict(checkpoint["model"])
    result = {"label": variant.label, "seed": seed, "initial": json.loads((run_dir / INITIAL).read_text()),
              "final": measurer.at_end(model, landscape, seed)}  # fmt: skip
    atomic_write_text(run_dir / MEASUREMENTS, json.dumps(result, indent=2) + "\n")
    return result


def run_in_study(study_dir: Path, measurer: Measurer, variant: Variant, seed: int, landscape: bool,
                 progress: bool) -> dict:  # fmt: skip
    """run_variant, whose stop (a signal, Ctrl-C) says how to resume the study rather than the run alone."""
    try:
        return run_variant(study_dir, measurer, variant, seed, landscape, progress)
    except (RunInterrupted, KeyboardInterrupt) as e:
        raise RunInterrupted(f"{variant.label} seed {seed} stopped, its last checkpoint kept; resume the study with: "
                             f"python -m fastdarts.convergence --resume {study_dir}",
                             getattr(e, "status", 128 + signal.SIGINT)) from None  # fmt: skip


# ----------------------------------------------------------------------------------------------
# The study: its directory, its runs (in this process or in several), its summary


def new_study(config: StudyConfig, seeds: list[int]) -> Path:
    """Draw the variants, describe them and write study.json in a new study directory."""
    if config.out is not None:
        study_dir = Path(config.out)
        found = path_stat(study_dir, "out", ConfigError)
        if found is not None and not stat.S_ISDIR(found.st_mode):
            raise ConfigError(f"out {study_dir} exists and is not a directory")
        if (study_dir / STUDY_FILE).exists():
            raise ConfigError(f"out {study_dir} already holds a study; continue it with --resume {study_dir}")
    else:
        study_dir = Path("runs") / f"convergence-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    genotype = load_genotype(config.genotype)
    if config.study == "width":
        drawn = width_variants(genotype, config.width_groups(), config.per_group, config.rewire, config.study_seed,
                               config.generator)  # fmt: skip
    else:
        drawn = skip_variants(genotype, config.skip_counts(), config.placements, config.study_seed)
    data = load_dataset(config.dataset, config.data, "test", **config.data_options())
    if min(len(data), config.probe_images) < 2 * config.gradvar_batch:
        raise ConfigError(f"the gradient variance needs two batches of gradvar_batch ({config.gradvar_batch}) from "
                          f"the {len(data)} test images; lower gradvar_batch")  # fmt: skip
    try:
        study_dir.mkdir(parents=True, exist_ok=True)
    except (OSError, ValueError) as e:
        reason = getattr(e, "strerror", None) or e
        raise ConfigError(f"out {study_dir}: cannot create the directory ({reason})") from None
    study = {"config": dataclasses.asdict(config), "seeds": seeds,
             "variants": [describe_variant(v, config, data) for v in drawn]}  # fmt: skip
    atomic_write_text(study_dir / STUDY_FILE, json.dumps(study, indent=2) + "\n")
    return study_dir


def load_study(study_dir: Path) -> tuple[StudyConfig, list[int], list[Variant], dict]:
    path = study_dir / STUDY_FILE
    found = path_stat(path, "resume:", ConfigError)
    if found is None or not stat.S_ISREG(found.st_mode):
        raise ConfigError(f"resume: {study_dir} is not a convergence study directory (no {STUDY_FILE})")
    try:
        study = json.loads(path.read_text())
        config = StudyConfig(**study["config"]).resolved()
        variants = [Variant(v["label"], Genotype.parse(v["genotype"]), v["original"], v["drawn_with"])
                    for v in study["variants"]]  # fmt: skip
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"resume: {path} cannot be read ({type(e).__name__}: {e})") from None
    return config, study["seeds"], variants, study


def pending_runs(study_dir: Path, variants: list[Variant], seeds: list[int]) -> list[tuple[Variant, int]]:
    return [(v, s) for v in variants for s in seeds
            if not (study_dir / "variants" / v.label / f"seed-{s}" / MEASUREMENTS).is_file()]  # fmt: skip


def run_study(study_dir: Path, jobs: int = 1, progress: bool = True) -> dict:
    """Every run not finished yet (in `jobs` processes), then the summary and plots; returns the summary."""
    config, seeds, variants, _ = load_study(study_dir)
    todo = pending_runs(study_dir, variants, seeds)
    print(f"convergence study in {study_dir}: {len(variants)} cells x {len(seeds)} seeds, {len(todo)} runs to do")
    if jobs == 1:
        measurer = Measurer(config) if todo else None
        for i, (variant, seed) in enumerate(todo):
            print(f"[{i + 1}/{len(todo)}] {variant.label} seed {seed}")
            run_in_study(study_dir, measurer, variant, seed, seed == seeds[0], progress)
    else:
        run_in_processes(study_dir, todo, jobs)
    return summarise(study_dir)


def run_in_processes(study_dir: Path, todo: list[tuple[Variant, int]], jobs: int) -> None:
    """Each run in a child process with one thread, `jobs` at a time; its output goes to the run's log.txt. On
    SIGINT or SIGTERM every child is asked to stop (it saves its checkpoint) and the study stops, resumably."""
    queue = list(todo)
    running: dict[subprocess.Popen, tuple[str, int]] = {}
    failed: list[str] = []
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    forwarded = False
    with StopSignals() as stop:
        while queue or running:
            while queue and len(running) < jobs and stop.signum is None:
                variant, seed = queue.pop(0)
                run_dir = study_dir / "variants" / variant.label / f"seed-{seed}"
                run_dir.mkdir(parents=True, exist_ok=True)
                with open(run_dir / "log.txt", "a") as log:
                    command = [sys.executable, "-m", "fastdarts.convergence", "--run_one", str(study_dir),
                               variant.label, str(seed)]  # fmt: skip
                    # A session of its own: a Ctrl-C reaches the study, which stops each child exactly once.
                    child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env,
                                             start_new_session=True)  # fmt: skip
                running[child] = (variant.label, seed)
                print(f"started {variant.label} seed {seed} (log: {run_dir / 'log.txt'})")
            if stop.signum is not None and not forwarded:
                for child in running:
                    child.send_signal(signal.SIGTERM)
                forwarded = True
            time.sleep(0.2)
            for child in [c for c in running if c.poll() is not None]:
                label, seed = running.pop(child)
                if child.returncode == 0:
                    print(f"finished {label} seed {seed}")
                elif stop.signum is not None:  # stopped at a step (status 128 + signal) or while measuring (killed)
                    print(f"stopped {label} seed {seed} (its last checkpoint kept)")
                else:
                    failed.append(f"{label} seed {seed}")
                    print(f"failed {label} seed {seed} (exit status {child.returncode}; see its log.txt)")
    if stop.signum is not None:
        raise RunInterrupted(f"stopped by {signal.Signals(stop.signum).name}; resume with: python -m "
                             f"fastdarts.convergence --resume {study_dir}", 128 + stop.signum)  # fmt: skip
    if failed:
        raise RunFailed(f"{len(failed)} run(s) failed ({', '.join(failed)}); their log.txt says why; --resume "
                        f"{study_dir} runs them again")  # fmt: skip


def run_one_main(argv: list[str]) -> int:
    """`--run_one STUDY_DIR LABEL SEED`: the child process of one run (run_in_processes)."""
    study_dir, label, seed = Path(argv[0]), argv[1], int(argv[2])
    torch.set_num_threads(1)
    keep_freed_memory()
    config, seeds, variants, _ = load_study(study_dir)
    variant = next((v for v in variants if v.label == label), None)
    if variant is None:
        raise ConfigError(f"{study_dir} has no cell labelled {label!r}")
    run_in_study(study_dir, Measurer(config), variant, seed, seed == seeds[0], progress=False)
    return 0


# ----------------------------------------------------------------------------------------------
# Summary


# (key, what it is, the sign of its rank correlation with width that Shu et al. predict, the sign with skips
# that PR-DARTS predicts); None: no prediction. Depth is predicted the opposite sign of width.
MEASURES = (
    ("auc_train", "mean clean training loss over the epochs", -1, -1),
    ("train_loss_at_q", "clean training loss after a quarter of training", -1, -1),
    ("epochs_to_tau", "epochs until the clean training loss reaches 3x the study's median final one", -1, -1),
    ("auc_test", "mean test loss over the epochs (Shu et al.'s curve)", -1, None),
    ("gv_1_end_test", "per-sample gradient variance at the end, test split", -1, None),
    ("nsr_end_test", "gradient noise-to-signal ratio at the end, test split", -1, None),
    ("gv_1_init_test", "per-sample gradient variance at initialisation, test split", -1, None),
    ("lambda_max", "top Hessian eigenvalue at the end", -1, None),
    ("sharp_0.25", "largest loss rise within 0.25 along filter-normalised directions (first seed)", -1, None),
    ("ntk_lambda_min_init", "smallest eigenvalue of the empirical NTK Gram matrix at initialisation", 1, 1),
    ("final_test_acc", "final test accuracy", None, None),
    ("final_test_loss", "final test loss", None, None),
    ("gen_gap", "final test loss minus final clean training loss", None, None),
)
SIGNIFICANCE = 0.05
NOISE_RATIO = 2.0  # below it, seed noise may be as large as the differences between variants


def run_scalars(run_dir: Path, measured: dict) -> dict:
    """The scalars of one finished run (all but epochs_to_tau, which needs the whole study)."""
    rows = read_metrics(run_dir / METRICS)
    initial, final = measured["initial"], measured["final"]
    clean = [initial["clean_train_loss"]] + [r["clean_train_loss"] for r in rows]
    epochs = len(rows)
    probed = [r for r in rows if "gradvar" in r]
    scalars = {
        "clean_train_curve": clean,
        "test_curve": [r["test_loss"] for r in rows],
        "gradvar_curve": [(0, initial["gradvar"]["test"]["gv_1"])]
        + [(r["epoch"] + 1, r["gradvar"]["test"]["gv_1"]) for r in probed],
        "auc_train": float(np.mean(clean[1:])),
        "train_loss_at_q": clean[math.ceil(epochs / 4)],
        "auc_test": float(np.mean([r["test_loss"] for r in rows])),
        "gv_1_end_test": probed[-1]["gradvar"]["test"]["gv_1"],
        "nsr_end_test": probed[-1]["gradvar"]["test"]["nsr"],
        "gv_1_init_test": initial["gradvar"]["test"]["gv_1"],
        "lambda_max": final["lambda_max"],
        "sharp_0.25": final.get("sharp", float("nan")),
        "basin_halfwidth": final.get("basin_halfwidth", float("nan")),
        "ntk_lambda_min_init": initial["ntk_lambda_min"],
        "ntk_lambda_min_end": final["ntk_lambda_min"],
        "final_test_acc": rows[-1]["test_acc"],
        "final_test_loss": rows[-1]["test_loss"],
        "final_clean_train_loss": clean[-1],
        "gen_gap": rows[-1]["test_loss"] - clean[-1],
    }
    if "landscape" in final:
        scalars["landscape"] = final["landscape"]
    return scalars


def epochs_to_threshold(curve: list[float], tau: float) -> int:
    """The first epoch (1..E) whose clean training loss is at most `tau`; E + 1 when none is (censored)."""
    return next((e for e in range(1, len(curve)) if curve[e] <= tau), len(curve))


def correlation(x: list[float], y: list[float], expected: int | None, config: StudyConfig) -> dict:
    pairs = [(a, b) for a, b in zip(x, y) if not (math.isnan(a) or math.isnan(b))]
    if len(pairs) < 3:
        return {"rho": float("nan"), "p": float("nan"), "ci": [float("nan")] * 2, "n": len(pairs), "verdict": "—"}
    xs, ys = zip(*pairs)
    rho = spearman(xs, ys)
    p = permutation_pvalue(xs, ys, config.permutations, config.study_seed)
    ci = bootstrap_interval(xs, ys, config.bootstrap, config.study_seed)
    if math.isnan(rho):
        verdict = "—"
    elif p >= SIGNIFICANCE:
        verdict = "not significant"
    elif expected is None:
        verdict = "no sign predicted"
    else:
        verdict = "agrees" if np.sign(rho) == expected else "disagrees"
    return {"rho": rho, "p": p, "ci": list(ci), "n": len(pairs), "verdict": verdict}


def summarise(study_dir: Path) -> dict:
    """summary.json, summary.md and the plots, from every finished run of the study."""
    config, seeds, variants, study = load_study(study_dir)
    table = {row["label"]: row for row in study["variants"]}
    runs: dict[str, dict[int, dict]] = {}
    for v in variants:
        for s in seeds:
            run_dir = study_dir / "variants" / v.label / f"seed-{s}"
            if (run_dir / MEASUREMENTS).is_file():
                measured = json.loads((run_dir / MEASUREMENTS).read_text())
                runs.setdefault(v.label, {})[s] = run_scalars(run_dir, measured)
    if not runs:
        raise RunFailed(f"{study_dir}: no run has finished yet")
    finals = [r["final_clean_train_loss"] for per_seed in runs.values() for r in per_seed.values()]
    tau = 3 * float(np.median(finals))
    for per_seed in runs.values():
        for r in per_seed.values():
            r["epochs_to_tau"] = epochs_to_threshold(r["clean_train_curve"], tau)

    labels = [v.label for v in variants if v.label in runs]
    per_variant = {}
    for label in labels:
        entry = {}
        for key, *_ in (*MEASURES, ("basin_halfwidth",), ("ntk_lambda_min_end",)):
            values = [float(r[key]) for r in runs[label].values()]
            present = [v for v in values if not math.isnan(v)]
            entry[key] = {"mean": float(np.mean(present)) if present else float("nan"),
                          "sd": float(np.std(present, ddof=1)) if len(present) > 1 else float("nan"),
                          "values": values}  # fmt: skip
        per_variant[label] = entry

    predictors = ("normal_width", "normal_depth") if config.study == "width" else ("normal_skips",)
    correlations = []
    for predictor in predictors:
        x = [float(table[label][predictor]) for label in labels]
        for key, _, width_sign, skip_sign in MEASURES:
            expected = {"normal_width": width_sign, "normal_skips": skip_sign}.get(predictor)
            if predictor == "normal_depth":
                expected = None if width_sign is None else -width_sign
            y = [per_variant[label][key]["mean"] for label in labels]
            row = {"predictor": predictor, "metric": key, "expected": expected, **correlation(x, y, expected, config)}
            row["noise_ratio"] = seed_noise_ratio([per_variant[label][key]["values"] for label in labels])
            if predictor == "normal_skips":
                z = [float(table[label]["parameters"]) for label in labels]
                row["partial_rho_given_parameters"] = partial_spearman(x, y, z)
            correlations.append(row)
    summary = {"study": config.study, "genotype": config.genotype, "seeds": seeds, "runs_finished":
               sum(len(r) for r in runs.values()), "runs_total": len(variants) * len(seeds), "tau": tau,
               "variants": {label: {**table[label], "metrics": per_variant[label]} for label in labels},
               "correlations": correlations}  # fmt: skip
    original = next((v.label for v in variants if v.original and v.label in runs), None)
    if original is not None:
        accs = {label: per_variant[label]["final_test_acc"]["mean"] for label in labels}
        others = [label for label in labels if label != original]
        summary["original"] = {
            "label": original,
            "variants_at_least_as_accurate": sum(accs[label] >= accs[original] for label in others),
            "variants": len(others),
            "rank_by_auc_train": 1
            + sum(
                per_variant[label]["auc_train"]["mean"] < per_variant[original]["auc_train"]["mean"] for label in others
            ),  # fmt: skip
        }
    atomic_write_text(study_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    atomic_write_text(study_dir / "summary.md", summary_markdown(summary, config))
    summary["plots"] = [str(p) for p in plot_convergence_study(summary, runs, config.study, study_dir)]
    print((study_dir / "summary.md").read_text())
    return summary


def _mean_sd(entry: dict, digits: int = 4) -> str:
    if math.isnan(entry["mean"]):
        return "—"
    return f"{entry['mean']:.{digits}g}" + ("" if math.isnan(entry["sd"]) else f" ± {entry['sd']:.2g}")


def _number(value: float, spec: str) -> str:
    return "—" if math.isnan(value) else format(value, spec)


def summary_markdown(summary: dict, config: StudyConfig) -> str:
    title = "width and depth (Shu et al.)" if config.study == "width" else "skip connections (PR-DARTS)"
    lines = [f"# Convergence study: {title}", "",
             f"Starting cell {config.genotype}; {len(summary['variants'])} cells, seeds "
             f"{', '.join(map(str, summary['seeds']))}; {summary['runs_finished']} of {summary['runs_total']} runs "
             f"finished. {config.dataset}, C={config.init_channels}, {config.layers} cells, {config.epochs} epochs, "
             f"batch {config.batch_size}.", "",
             "| cell | width | depth | skips | parameters | mean clean train loss | epochs to tau | GV_1 end "
             "(test) | lambda_max | NTK lambda_min (init) | test accuracy | gen. gap |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for label, v in summary["variants"].items():
        m = v["metrics"]
        lines.append(f"| {label} | {v['normal_width']:g}c | {v['normal_depth']} | {v['normal_skips']} | "
                     f"{v['parameters']:,} | {_mean_sd(m['auc_train'])} | {_mean_sd(m['epochs_to_tau'], 3)} | "
                     f"{_mean_sd(m['gv_1_end_test'])} | {_mean_sd(m['lambda_max'])} | "
                     f"{_mean_sd(m['ntk_lambda_min_init'])} | {_mean_sd(m['final_test_acc'])} | "
                     f"{_mean_sd(m['gen_gap'])} |")  # fmt: skip
    lines += ["", f"Spearman rank correlations over the cells (seed means); two-sided permutation p-values "
              f"({config.permutations} permutations), 95 % bootstrap intervals; predicted sign: − or +, from Shu et "
              f"al. for width and depth, from PR-DARTS for skips. Verdicts at p < {SIGNIFICANCE}.", "",
              "| predictor | metric | rho | p | 95 % interval | predicted | verdict | seed-noise ratio |"
              + (" partial rho given parameters |" if config.study == "skips" else ""),
              "|---|---|---|---|---|---|---|---|" + ("---|" if config.study == "skips" else "")]  # fmt: skip
    warnings = []
    for c in summary["correlations"]:
        sign = {None: "none", 1: "+", -1: "−"}[c["expected"]]
        noise = c["noise_ratio"]
        line = (f"| {c['predictor'].removeprefix('normal_')} | {c['metric']} | {_number(c['rho'], '.2f')} | "
                f"{_number(c['p'], '.3g')} | [{_number(c['ci'][0], '.2f')}, {_number(c['ci'][1], '.2f')}] | {sign} | "
                f"{c['verdict']} | {_number(noise, '.2f')} |")  # fmt: skip
        if "partial_rho_given_parameters" in c:
            line += f" {_number(c['partial_rho_given_parameters'], '.2f')} |"
        lines.append(line)
        if not math.isnan(noise) and noise < NOISE_RATIO and c["predictor"] != "normal_depth":
            warnings.append(f"- {c['metric']}: the cells' means spread only {noise:.2f}x the seed noise of a mean; "
                            f"differences between cells may be seed noise.")  # fmt: skip
    lines += ["", "Metrics:", *[f"- {key}: {what}" for key, what, *_ in MEASURES]]
    if "original" in summary:
        o = summary["original"]
        lines += ["", f"The original cell ranks {o['rank_by_auc_train']} of {o['variants'] + 1} by mean clean "
                  f"training loss (1 = fastest); {o['variants_at_least_as_accurate']} of {o['variants']} variants "
                  f"reach at least its test accuracy."]  # fmt: skip
    if warnings:
        lines += ["", f"Seed noise (ratio below {NOISE_RATIO}):", *warnings]
    if config.study == "width":
        lines += ["", "Width and depth are strongly anti-correlated in this space: neither rho names a cause."]
    elif all(math.isnan(c.get("partial_rho_given_parameters", math.nan)) for c in summary["correlations"]):
        lines += ["", "The parameter count is a function of the number of skips here (each skip replaces a "
                  "sep_conv_3x3), so no partial rho can separate the two: fewer parameters may be the "
                  "cause."]  # fmt: skip
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------
# Command line


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--run_one"]:
        return run_one_main(argv[1:])
    cli = parse_command_line(StudyConfig, argv, "python -m fastdarts.convergence", __doc__.splitlines()[0])
    keep_freed_memory()
    if cli.resume is not None:
        changed = sorted(set(cli.given) - set(RESUME_OVERRIDES))
        if changed:
            raise ConfigError(f"--resume continues a study with its own settings; only {', '.join(RESUME_OVERRIDES)} "
                              f"may be given (got {', '.join(changed)})")  # fmt: skip
        study_dir = Path(cli.resume)
        config = load_study(study_dir)[0]
        run_study(study_dir, cli.given.get("jobs", config.jobs), cli.given.get("progress", config.progress))
        return 0
    config = cli.config.resolved()
    seeds = cli.seeds if cli.seeds is not None else ([0] if config.quick else [0, 1])
    study_dir = new_study(config, seeds)
    run_study(study_dir, config.jobs, config.progress)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
