"""Run configurations: one dataclass per entry point, with every flag's help, default and valid range.

The command-line parser, config-file loading and validation are all derived from the dataclass
fields, so each option is declared exactly once. Flags keep DARTS's names.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import inspect
import json
import math
import stat
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from torch.distributed import DistError

from .checkpoint import RunInterrupted
from .data import DATA_DIRECTORIES, DATASETS, IMAGE_DATASETS, SEARCH_DATASETS
from .distributed import DEVICES, writer_process
from .errors import ConfigError, FastDartsError, RunFailed, one_line, path_stat, summary
from .evalnet import FIXED_REDUCTION_CELL_MODULES, NETWORKS
from .methods import METHODS
from .space import OPS, load_genotype


def option(default, help: str, *, low=None, high=None, low_open=False, high_open=False, choices=None, method=None,
           setting=None):  # fmt: skip
    """A config field: `low`/`high` bound the value (open bounds exclude the end), `choices` lists it. `method`:
    the search method the field belongs to (an error with another one), `setting` its keyword argument there."""
    meta = dict(help=help, low=low, high=high, low_open=low_open, high_open=high_open, choices=choices,
                method=method, setting=setting)  # fmt: skip
    return field(default=default, metadata=meta)


@dataclass
class RunOptions:
    """How a long run is kept and stopped; shared by every entry point (listed last in --help)."""

    out: str | None = option(None, "run directory (default: a new folder under runs/)")
    save_every: int = option(1, "write a checkpoint every this many epochs", low=1)
    stop_after: int | None = option(None, "stop after this many epochs, resumably (to split a run into jobs)", low=1)
    on_nan: str = option("stop", "on a NaN or infinite loss or gradient: stop, or skip the batch",
                         choices=("stop", "skip"))  # fmt: skip
    progress: bool = option(True, "show a progress bar")

    # Fields left at None take the value of the data set's preset.
    PRESETS: typing.ClassVar[dict[str, dict[str, typing.Any]]] = {}

    def check(self) -> None:
        """Checks across fields, after each field's own range check."""

    def preset(self) -> dict[str, typing.Any]:
        """The values of the fields left at None: the data set's preset."""
        dataset = getattr(self, "dataset", None)
        return self.PRESETS.get(dataset, {}) if isinstance(dataset, str) else {}  # validate() names a wrong type

    def resolved(self):
        """A copy with the preset filled into every field left at None, validated."""
        preset = self.preset()
        filled = {k: v for k, v in preset.items() if getattr(self, k) is None}
        config = dataclasses.replace(self, **filled)
        validate(config)
        return config


@dataclass
class CommonConfig(RunOptions):
    """The fields search and train share: the data, the network's size, the weights' SGD."""

    dataset: str = option("digits", "data set: digits (bundled), cifar10, cifar100, folder (images, a sub-folder per "
                          "class) or imagenet (train only); all but digits need --data", choices=DATASETS)  # fmt: skip
    data: str | None = option(None, "data directory: cifar-10-batches-py, cifar-100-python, or a folder of images "
                              "with one sub-folder per class (train/, val/, test/ sub-folders split it)")  # fmt: skip
    image_size: int | None = option(None, "folder, imagenet: side of the square each image is resized and cropped to",
                                    low=1)  # fmt: skip
    workers: int = option(4, "folder, imagenet: processes that read and augment images ahead of the steps "
                          "(0: the main process does, between steps)", low=0)  # fmt: skip
    preload_mb: int = option(2048, "folder: hold a split in memory when its decoded images take at most this "
                             "many MiB (float32), else read them from disk every epoch (imagenet: always)",
                             low=0)  # fmt: skip
    batch_size: int | None = option(None, "batch size (under torchrun: the global batch, split across the processes)",
                                    low=1)  # fmt: skip
    momentum: float = option(0.9, "SGD momentum of the weights", low=0, high=1, high_open=True)
    epochs: int | None = option(None, "number of epochs", low=1)
    init_channels: int | None = option(None, "channels of the first cell (C)", low=1)
    # The cap keeps a network's Python objects (about 1.6 MB a search cell) and its build time bounded.
    layers: int | None = option(None, "number of cells (reductions at layers//3 and 2*layers//3)", low=3, high=1000)
    grad_clip: float = option(5.0, "gradient-norm clip of the weights", low=0, low_open=True)
    device: str = option("cpu", "where the network computes: cpu, or cuda (one GPU per process: under torchrun, the "
                         "GPU of the process's LOCAL_RANK)", choices=DEVICES)  # fmt: skip

    def check(self) -> None:
        # learning_rate and learning_rate_min are each config's own: their defaults and help differ.
        if self.dataset in DATA_DIRECTORIES and self.data is None:
            raise ConfigError(f"dataset {self.dataset} needs data: {DATA_DIRECTORIES[self.dataset]} (--data DIR)")
        if self.image_size is not None and self.dataset not in IMAGE_DATASETS:
            raise ConfigError(f"image_size applies to folder and imagenet data; {self.dataset} images have their own")
        if self.learning_rate_min > self.learning_rate:
            raise ConfigError(
                f"learning_rate_min ({self.learning_rate_min}) must not exceed learning_rate ({self.learning_rate})"
            )

    def data_options(self) -> dict:
        """How fastdarts.data.load_dataset reads the data set."""
        return dict(image_size=self.image_size, workers=self.workers, preload_mb=self.preload_mb)


@dataclass
class SearchConfig(CommonConfig):
    """DARTS search. Fields left at None take the data set's preset (see PRESETS)."""

    dataset: str = option("digits", "data set: digits (bundled), cifar10, cifar100 or folder (images, a sub-folder "
                          "per class); all but digits need --data", choices=SEARCH_DATASETS)  # fmt: skip
    learning_rate: float | None = option(None, "initial weight learning rate", low=0, low_open=True)
    learning_rate_min: float = option(0.001, "final weight learning rate of the cosine schedule", low=0)
    weight_decay: float = option(3e-4, "weight decay of the weights", low=0)
    train_portion: float = option(0.5, "fraction of the training set that trains the weights (a folder with val/ "
                                  "trains them on train/ and the architecture on val/)", low=0, high=1,
                                  low_open=True, high_open=True)  # fmt: skip
    unrolled: bool = option(False, "second-order (unrolled) architecture gradient")
    recompute: bool | None = option(None, "recompute each edge's intermediates in backward (keeping them is faster "
                                    "but takes more activation memory: benchmarks/RESULTS.md); default: recompute on "
                                    "the CIFAR-setting data sets except for pr-darts (but its paper form), gdas and "
                                    "pc-darts, keep on the digits")  # fmt: skip
    hessian_r: float = option(0.01, "second order: the finite-difference step of the Hessian-vector product (L2 norm)",
                              low=0, low_open=True)  # fmt: skip
    arch_learning_rate: float | None = option(None, "Adam learning rate of the architecture", low=0, low_open=True)
    arch_weight_decay: float = option(1e-3, "weight decay of the architecture parameters", low=0)
    arch_beta1: float | None = option(None, "Adam beta1 of the architecture (beta2 is 0.999)", low=0, high=1,
                                      high_open=True)  # fmt: skip
    seed: int = option(2, "random seed", low=0, high=2**32 - 1)  # NumPy's seeds
    method: str = option(
        "darts",
        "search method: darts (softmax over ops), pr-darts (hard-concrete gates), "
        "beta-darts, darts-minus, fair-darts, sdarts, gdas (one Gumbel-sampled op per edge), pc-darts (partial "
        "channels, edge normalisation), drnas (Dirichlet-sampled weights, pruned halfway) (METHODS_MORE.md; on "
        "cifar10, cifar100 and folder data, a method starts from its published batch size, learning rates and "
        "arch_beta1 where they differ from DARTS's: METHOD_PRESETS)",
        choices=tuple(METHODS),
    )
    # PR-DARTS (METHOD.md section 2); used only with --method pr-darts.
    prdarts_form: str = option("reference", "pr-darts: reference (top-k, hinged groups) or paper (all gates)",
                               choices=("reference", "paper"))  # fmt: skip
    prdarts_network: str = option("reference", "pr-darts: the reference code's search network (batch statistics "
                                  "in evaluation, BN + ReLU before the pooling) or DARTS's",
                                  choices=("reference", "darts"))  # fmt: skip
    tau_start: float = option(1.0, "pr-darts: gate temperature at the first epoch", low=0, low_open=True)
    tau_end: float = option(0.1, "pr-darts: gate temperature at the last epoch", low=0, low_open=True)
    l1: float = option(0.01, "pr-darts: weight of the skip-group term", low=0)
    l2: float = option(0.005, "pr-darts: weight of the non-skip and pooling group terms", low=0)
    l3: float = option(0.005, "pr-darts: weight of the path-depth term", low=0)
    hinge: float = option(0.2, "pr-darts: hinge of the group terms", low=0)
    top_k: int = option(2, "pr-darts: ops computed per edge", low=1, high=8)
    explore_p: float = option(0.4, "pr-darts: probability that a gate is pushed down before the top-k", low=0,
                              high=1)  # fmt: skip
    gate_a: float = option(-0.1, "pr-darts: lower end of the stretched sigmoid (a < 0)", high=0, high_open=True)
    gate_b: float = option(1.1, "pr-darts: upper end of the stretched sigmoid (b > 1)", low=1, low_open=True)
    # The published constants of beta-DARTS, DARTS-, Fair DARTS and SDARTS (METHODS_MORE.md 7, 5, 3, 6); each
    # is an error with another method.
    beta_decay_start: float = option(0.0, "beta-darts: weight of the beta-decay term at the first epoch", low=0,
                                     method="beta-darts", setting="lambda_start")  # fmt: skip
    beta_decay_end: float = option(50.0, "beta-darts: weight of the beta-decay term after the last epoch (epoch e "
                                   "of E: start + (end - start) e / E)", low=0, method="beta-darts",
                                   setting="lambda_end")  # fmt: skip
    auxiliary_skip_beta: float = option(1.0, "darts-minus: weight of the auxiliary skip at the first epoch", low=0,
                                        method="darts-minus", setting="beta")  # fmt: skip
    auxiliary_skip_decay: str = option("linear", "darts-minus: decay of the auxiliary skip's weight over the epochs",
                                       choices=("linear", "cosine", "slow_cosine", "none"), method="darts-minus",
                                       setting="decay")  # fmt: skip
    zero_one_weight: float = option(10.0, "fair-darts: weight of the zero-one loss", low=0, method="fair-darts",
                                    setting="zero_one_weight")  # fmt: skip
    zero_one_loss: str = option("l2", "fair-darts: zero-one loss -mean((w - 0.5)^2) (l2) or -mean|w - 0.5| (l1)",
                                choices=("l2", "l1"), method="fair-darts", setting="zero_one_form")  # fmt: skip
    threshold: float = option(0.85, "fair-darts: the genotype keeps an op whose weight reaches this", low=0, high=1,
                              low_open=True, high_open=True, method="fair-darts", setting="threshold")  # fmt: skip
    perturbation: str = option("rs", "sdarts: random (rs) or adversarial (adv, PGD) perturbation of the weight step's "
                               "edge weights", choices=("rs", "adv"), method="sdarts", setting="variant")  # fmt: skip
    epsilon_start: float = option(0.03, "sdarts: perturbation radius at the first epoch", low=0, method="sdarts",
                                  setting="epsilon_start")  # fmt: skip
    epsilon_end: float = option(0.3, "sdarts: perturbation radius after the last epoch (epoch e of E: start + "
                                "(end - start) e / E)", low=0, method="sdarts", setting="epsilon_end")  # fmt: skip
    pgd_steps: int = option(7, "sdarts adv: steps of the PGD attack", low=1, method="sdarts", setting="pgd_steps")
    gdas_tau_max: float = option(10.0, "gdas: Gumbel-softmax temperature at the first epoch", low=0, low_open=True,
                                 method="gdas", setting="tau_max")  # fmt: skip
    gdas_tau_min: float = option(0.1, "gdas: temperature at the last epoch", low=0, low_open=True, method="gdas",
                                 setting="tau_min")  # fmt: skip
    gdas_fixed_reduction: bool = option(False, "gdas: search the normal cell alone; the reduction cells are GDAS's "
                                        "hand-designed one (FRC), in the search and in the genotype",
                                        method="gdas", setting="fixed_reduction")  # fmt: skip
    pcdarts_k: int = option(4, "pc-darts: the ops compute on 1/K of each edge's channels (init_channels must be a "
                            "multiple of K)", low=1, method="pc-darts", setting="k")  # fmt: skip
    pcdarts_warmup_epochs: int | None = option(None, "pc-darts: first epochs that train the weights alone (default: "
                                               "15 of every 50 epochs, rounded down)", low=0, method="pc-darts",
                                               setting="warmup_epochs")  # fmt: skip
    drnas_k: int = option(4, "drnas: the ops compute on 1/K of each edge's channels (in the second stage when "
                          "drnas_k_first differs; init_channels must be a multiple of K)", low=1, method="drnas",
                          setting="k")  # fmt: skip
    drnas_k_first: int | None = option(None, "drnas: the first stage's K; above drnas_k, the second stage widens the "
                                       "ops from 1/drnas_k_first to 1/drnas_k of the channels (Net2Wider) and "
                                       "restarts the weights' SGD at learning_rate (default: drnas_k, no widening; "
                                       "the published 6 on cifar10, cifar100 and folder data)", low=1,
                                       method="drnas", setting="k_first")  # fmt: skip
    drnas_prune_to: int = option(4, "drnas: ops each edge keeps in the second stage", low=1, high=7, method="drnas",
                                 setting="prune_to")  # fmt: skip
    drnas_warmup_epochs: int | None = option(None, "drnas: first epochs of each stage that train the weights alone "
                                             "(default: 10 of every 25 epochs of the stage, rounded down)", low=0,
                                             method="drnas", setting="warmup_epochs")  # fmt: skip
    drnas_reg: str = option("l2", "drnas: l2 (the architecture's weight decay is drnas_reg_scale, in place of "
                            "arch_weight_decay) or kl (drnas_reg_scale * KL to the uniform Dirichlet in the "
                            "architecture loss, no weight decay)", choices=("l2", "kl"), method="drnas",
                            setting="reg")  # fmt: skip
    drnas_reg_scale: float = option(1e-3, "drnas: scale of the regulariser", low=0, method="drnas",
                                    setting="reg_scale")  # fmt: skip

    # DARTS's CIFAR-10 settings (for CIFAR-100 and 32-pixel folders too), and settings for the bundled
    # digits that finish a real search in a few minutes on 2 cores: 8x8 images need fewer cells, and
    # the architecture takes a larger step because a digits epoch has 15 steps where CIFAR-10 has 391.
    _DARTS = dict(batch_size=64, epochs=50, init_channels=16, layers=8, learning_rate=0.025, arch_learning_rate=3e-4,
                  arch_beta1=0.5, recompute=True)  # fmt: skip
    PRESETS: typing.ClassVar[dict[str, dict[str, typing.Any]]] = {
        "cifar10": _DARTS,
        "cifar100": _DARTS,
        "folder": {**_DARTS, "image_size": 32},
        # The digits' supernet keeps 39 MB for the backward at batch 64 (7 MB recomputing): it keeps, for speed.
        "digits": dict(_DARTS, epochs=15, init_channels=8, layers=5, arch_learning_rate=3e-3, recompute=False),
    }
    # A method's published search settings where they differ from DARTS's (METHODS_MORE.md), over the preset of
    # the data sets that take DARTS's CIFAR-10 setting; the digits preset is fastdarts's own, for every method.
    # PR-DARTS (the gated ops of each edge), GDAS (one op an edge) and PC-DARTS (the ops on a quarter of the
    # channels) keep their edges' intermediates: PR-DARTS saves 0.74 GiB for the backward at batch 64, GDAS and
    # PC-DARTS 1.69 and 2.44 GiB at their batch of 256 (recomputing: 0.23, 0.86 and 0.86; DARTS keeps 1.81 GiB at
    # batch 64), and their steps ran faster in most alternating rounds, PR-DARTS's by 15-25 %, GDAS's by 5-25 %
    # (benchmarks/RESULTS.md).
    METHOD_PRESETS: typing.ClassVar[dict[str, dict[str, typing.Any]]] = {
        "fair-darts": dict(batch_size=128, learning_rate=0.005, arch_learning_rate=3e-3, arch_beta1=0.9),
        "pr-darts": dict(recompute=False),
        "gdas": dict(batch_size=256, epochs=250, recompute=False),
        "pc-darts": dict(batch_size=256, learning_rate=0.1, arch_learning_rate=6e-4, recompute=False),
        "drnas": dict(init_channels=36, layers=20, learning_rate=0.1, arch_learning_rate=6e-4, drnas_k_first=6),
    }
    # The options whose value K has a method's edges compute on 1/K of their channels, in some stage of its search.
    PARTIAL_CHANNEL_OPTIONS: typing.ClassVar[dict[str, tuple[str, ...]]] = {
        "pc-darts": ("pcdarts_k",),
        "drnas": ("drnas_k_first", "drnas_k"),
    }

    def preset(self) -> dict[str, typing.Any]:
        preset = super().preset()
        if self.dataset == "digits" or not isinstance(self.method, str):  # validate() names a wrong type
            return preset
        method_preset = self.METHOD_PRESETS.get(self.method, {})
        if self.method == "pr-darts" and self.prdarts_form == "paper":
            # The paper's form computes every op of every edge: kept, its intermediates take DARTS's 1.81 GiB at
            # batch 64, so it recomputes them as DARTS does.
            method_preset = {k: v for k, v in method_preset.items() if k != "recompute"}
        return {**preset, **method_preset}

    def check(self) -> None:
        super().check()
        if self.unrolled and METHODS[self.method].samples_each_forward:
            raise ConfigError(f"unrolled: {self.method} samples new edge weights in every forward pass, so it searches "
                              "first order")  # fmt: skip
        for f in dataclasses.fields(self):
            owner = f.metadata.get("method")
            if owner is not None and owner != self.method and getattr(self, f.name) != f.default:
                raise ConfigError(f"{f.name} is an option of --method {owner}, not of {self.method}")
        if self.pgd_steps != type(self).pgd_steps and self.perturbation != "adv":
            raise ConfigError("pgd_steps is an option of the adversarial perturbation (--perturbation adv)")
        if self.method == "drnas" and self.drnas_k_first is not None and self.drnas_k_first != self.drnas_k:
            if self.drnas_k_first < self.drnas_k:
                raise ConfigError(f"drnas_k_first ({self.drnas_k_first}) must be at least drnas_k ({self.drnas_k}): "
                                  "the second stage widens the ops to 1/drnas_k of the channels, never narrows "
                                  "them")  # fmt: skip
            if self.epochs is not None and self.epochs < 2:
                raise ConfigError(f"drnas_k_first ({self.drnas_k_first}) above drnas_k ({self.drnas_k}) widens the "
                                  "network at the second stage, epoch epochs // 2: it needs epochs >= 2")  # fmt: skip
        try:  # settings each valid alone may still not go together (a final temperature above the first)
            method = METHODS[self.method](**self.method_settings())
        except ValueError as e:
            raise ConfigError(str(e)) from None
        for name in self.PARTIAL_CHANNEL_OPTIONS.get(self.method, ()):
            groups = getattr(self, name)
            if groups is not None and self.init_channels is not None and self.init_channels % groups:
                raise ConfigError(f"init_channels ({self.init_channels}) must be a multiple of {groups} ({name}): "
                                  f"{self.method}'s edges compute on 1/{groups} of their channels")  # fmt: skip
        check_fixed_reduction(method.network_style.fixed_reduction, self.init_channels)

    def method_settings(self) -> dict:
        """The keyword arguments of the method object (fastdarts.methods.make_method)."""
        own = {f.metadata["setting"]: getattr(self, f.name) for f in dataclasses.fields(self)
               if f.metadata.get("method") == self.method}  # fmt: skip
        if own:
            if "seed" in inspect.signature(METHODS[self.method]).parameters:  # its own generator: the run's seed
                own["seed"] = self.seed
            return own
        if self.method == "darts":
            return {}
        return dict(tau_start=self.tau_start, tau_end=self.tau_end, l1=self.l1, l2=self.l2, l3=self.l3,
                    hinge=self.hinge, k=self.top_k, explore_p=self.explore_p, a=self.gate_a, b=self.gate_b,
                    form=self.prdarts_form, network=self.prdarts_network, seed=self.seed)  # fmt: skip


@dataclass
class TrainConfig(CommonConfig):
    """Training a found cell from scratch (METHOD.md 1.5). Fields left at None take the data set's preset."""

    genotype: str = option("DARTS_V2", "the cell: built-in name, DARTS string, genotype.json/.txt or run directory")
    network: str | None = option(None, "evaluation network: cifar (NetworkCIFAR) or imagenet (NetworkImageNet: a "
                                 "stem of three stride-2 convs, for 224-pixel images)",
                                 choices=tuple(NETWORKS))  # fmt: skip
    learning_rate: float | None = option(None, "initial learning rate", low=0, low_open=True)
    learning_rate_min: float = option(0.0, "final learning rate of the cosine schedule", low=0)
    schedule: str | None = option(None, "learning-rate schedule: cosine (to learning_rate_min over the epochs) "
                                  "or step (times gamma every decay_period epochs)",
                                  choices=("cosine", "step"))  # fmt: skip
    gamma: float = option(0.97, "step schedule: factor of each decay", low=0, low_open=True, high=1)
    decay_period: int = option(1, "step schedule: epochs between two decays", low=1)
    weight_decay: float | None = option(None, "weight decay", low=0)
    label_smooth: float | None = option(None, "label smoothing of the training loss", low=0, high=1, high_open=True)
    auxiliary: bool = option(True, "use the auxiliary head (after cell 2*layers//3)")
    auxiliary_weight: float = option(0.4, "weight of the auxiliary loss", low=0)
    cutout: bool | None = option(None, "use cutout")
    cutout_length: int | None = option(None, "cutout square side in pixels", low=1)
    drop_path_prob: float | None = option(None, "final drop-path probability (ramped up linearly from 0)", low=0,
                                          high=1, high_open=True)  # fmt: skip
    seed: int = option(0, "random seed", low=0, high=2**32 - 1)  # NumPy's seeds

    # DARTS's published CIFAR-10 setting (also for CIFAR-100 and 32-pixel folders) and ImageNet setting
    # (cnn/train_imagenet.py), and one that trains on the 8x8 digits in a few minutes on 2 cores (the
    # cells shrink the image to 2x2 after two reductions, so fewer are needed).
    _CIFAR = dict(network="cifar", learning_rate=0.025, schedule="cosine", weight_decay=3e-4, label_smooth=0.0,
                  cutout=True, drop_path_prob=0.2)  # fmt: skip
    _DARTS_CIFAR = dict(_CIFAR, batch_size=96, epochs=600, init_channels=36, layers=20, cutout_length=16)
    _IMAGENET = dict(network="imagenet", image_size=224, batch_size=128, epochs=250, init_channels=48, layers=14,
                     learning_rate=0.1, schedule="step", weight_decay=3e-5, label_smooth=0.1, cutout=False,
                     cutout_length=16, drop_path_prob=0.0)  # fmt: skip
    PRESETS: typing.ClassVar[dict[str, dict[str, typing.Any]]] = {
        "cifar10": _DARTS_CIFAR,
        "cifar100": _DARTS_CIFAR,
        "folder": {**_DARTS_CIFAR, "image_size": 32},
        "imagenet": _IMAGENET,
        "digits": dict(_CIFAR, batch_size=64, epochs=20, init_channels=16, layers=8, cutout_length=4),
    }

    def check(self) -> None:
        super().check()
        genotype = self.cell()  # a genotype that cannot be read or built fails here, before anything is written
        check_fixed_reduction(genotype.fixed_reduction, self.init_channels)

    def cell(self):
        """The genotype to train, checked to use only ops fastdarts can build."""
        return buildable_genotype(self.genotype)


def check_fixed_reduction(name: str | None, init_channels: int | None) -> None:
    """A ConfigError when the fixed reduction cell `name` (None: none) cannot have the 2 * init_channels channels of
    the first reduction layer."""
    if name is None or init_channels is None:
        return
    groups = FIXED_REDUCTION_CELL_MODULES[name].groups
    if (2 * init_channels) % groups:
        raise ConfigError(
            f"init_channels ({init_channels}) must be a multiple of {groups // 2}: the fixed reduction cell {name} has "
            f"{2 * init_channels} channels at the first reduction, in {groups} groups"
        )


def buildable_genotype(source: str):
    """The genotype `source` names (space.load_genotype), checked to use only ops fastdarts can build."""
    genotype = load_genotype(source)
    unknown = sorted({op for op, _ in (*genotype.normal, *genotype.cell_edges("reduce"))} - set(OPS))
    if unknown:
        raise ConfigError(f"genotype uses op(s) fastdarts cannot build: {', '.join(unknown)}")
    return genotype


def number_list(text: str, what: str, cast=float) -> list:
    """A comma-separated list of numbers from a config field, or a ConfigError naming the field."""
    try:
        values = [cast(part) for part in str(text).split(",")]
    except ValueError:
        raise ConfigError(f"{what} must be comma-separated numbers such as 0,1,2, got {text!r}") from None
    if not all(math.isfinite(v) for v in values):
        raise ConfigError(f"{what} must be finite numbers, got {text!r}")
    if len(set(values)) != len(values):
        raise ConfigError(f"{what} must not repeat a value, got {text!r}")
    return values


@dataclass
class StudyConfig(CommonConfig):
    """The convergence study (CONVERGENCE_STUDY.md section 8): a cell and its variants trained with Shu et al.'s
    settings and probed. Fields left at None take the preset of the profile, or of the data set (and --quick)."""

    genotype: str = option("DARTS_V2", "the starting cell: built-in name, DARTS string, genotype.json/.txt or run "
                           "directory")  # fmt: skip
    study: str = option("width", "width: random rewirings grouped by normal-cell width (Shu et al.); skips: the "
                        "normal cell's wiring with 0..6 skip connections, the other edges sep_conv_3x3 (PR-DARTS)",
                        choices=("width", "skips"))  # fmt: skip
    profile: str = option("reduced", "reduced: minutes per run; shu: Shu et al.'s CIFAR-10 settings (C=36, 20 "
                          "cells, 600 epochs, a 51x51 landscape; days per run)",
                          choices=("reduced", "shu"))  # fmt: skip
    quick: bool = option(False, "a smoke run: a small network, 4 epochs, one variant per group, seed 0")
    widths: str = option("2,2.5,3,3.5", "width study: the normal-cell width groups, in units of c")
    per_group: int | None = option(None, "width study: variants per width group", low=1)
    generator: str = option("shu", "width study: shu (Shu et al.'s random_conn with seeds 1, 2, ...: DARTS_CONN1.. "
                            "for DARTS_V2) or fastdarts (one random.Random stream, as analyze --variants draws)",
                            choices=("shu", "fastdarts"))  # fmt: skip
    rewire: str = option("normal", "width study: rewire the normal cell only (its width is what the groups "
                         "describe), or both cells as Shu et al.'s generator does",
                         choices=("normal", "both"))  # fmt: skip
    skips: str = option("0,1,2,3,4,5,6", "skips study: the numbers of skip connections in the normal cell")
    placements: int | None = option(None, "skips study: random choices of the skip edges per number", low=1)
    learning_rate: float = option(0.025, "initial learning rate (cosine to learning_rate_min)", low=0, low_open=True)
    learning_rate_min: float = option(0.0, "final learning rate of the cosine schedule", low=0)
    weight_decay: float = option(3e-4, "weight decay", low=0)
    drop_path_prob: float = option(0.2, "final drop-path probability (ramped up linearly from 0)", low=0, high=1,
                                   high_open=True)  # fmt: skip
    probes: str = option("0.25,0.5,1", "when to measure the gradient variance, as fractions of training (also "
                         "always at initialisation and at the end)")  # fmt: skip
    gradvar_batch: int | None = option(None, "batch of the gradient-variance estimate (1: exact per-sample "
                                       "gradients)", low=1)  # fmt: skip
    probe_images: int | None = option(None, "images of the test split and of a fixed training subset that the "
                                      "gradient variance is measured on", low=2)  # fmt: skip
    clean_images: int | None = option(None, "training images of the clean (eval-mode, unaugmented) training loss "
                                      "logged every epoch", low=1)  # fmt: skip
    hessian_images: int | None = option(None, "training images of the top Hessian eigenvalue", low=1)
    hessian_iters: int | None = option(None, "power iterations of the top Hessian eigenvalue", low=1)
    landscape: str | None = option(None, "loss landscape around the trained weights on the test split, for the first "
                                   "seed: none, 1d (two filter-normalised directions) or 2d (a grid in their plane)",
                                   choices=("none", "1d", "2d"))  # fmt: skip
    landscape_points: int | None = option(None, "points of each 1-D loss curve on [-1, 1]", low=3)
    grid: int | None = option(None, "2d landscape: points per side of the grid on [-1, 1]^2", low=3)
    landscape_images: int | None = option(None, "test images the landscape is evaluated on", low=1)
    ntk_images: int | None = option(None, "training images of the empirical NTK Gram matrix", low=2)
    permutations: int = option(10000, "permutations of each Spearman p-value", low=100)
    bootstrap: int = option(2000, "resamples of each bootstrap interval", low=100)
    study_seed: int = option(0, "seed of the variants' draw, the probe subsets and the statistics", low=0,
                             high=2**32 - 1)  # fmt: skip
    jobs: int = option(1, "runs trained at once, each in a process of its own with one thread", low=1)
    save_every: int = option(1, "write each run's checkpoint every this many epochs", low=1)

    dataset: str = option("digits", "data set: digits (bundled), cifar10, cifar100 or folder (images, a sub-folder "
                          "per class); all but digits need --data", choices=SEARCH_DATASETS)  # fmt: skip

    # Shu et al.'s training settings (train_cifar10.py) on a network that trains in minutes: 8x8 digits, or CIFAR-10
    # at DARTS's search size. The probes' subsets follow CONVERGENCE_STUDY.md section 8.3.
    _PROBES = dict(per_group=3, placements=2, hessian_iters=20, landscape="1d", landscape_points=21, grid=21,
                   ntk_images=64)  # fmt: skip
    _CIFAR = dict(_PROBES, batch_size=80, epochs=50, init_channels=16, layers=8, gradvar_batch=64, probe_images=2000,
                  clean_images=5000, hessian_images=1000, landscape_images=2000)  # fmt: skip
    PRESETS: typing.ClassVar[dict[str, dict[str, typing.Any]]] = {
        "digits": dict(
            _PROBES,
            batch_size=64,
            epochs=12,
            init_channels=16,
            layers=8,
            gradvar_batch=16,
            probe_images=360,
            clean_images=512,
            hessian_images=256,
            hessian_iters=12,
            landscape_images=360,
        ),
        "cifar10": _CIFAR,
        "cifar100": _CIFAR,
        "folder": {**_CIFAR, "image_size": 32},
    }
    SHU = dict(_CIFAR, epochs=600, init_channels=36, layers=20, landscape="2d", grid=51, probe_images=10000,
               landscape_images=10000)  # fmt: skip
    QUICK = dict(epochs=4, init_channels=8, layers=5, per_group=1, placements=1, hessian_iters=5, landscape_points=11,
                 grid=7, clean_images=512, hessian_images=64, ntk_images=16)  # fmt: skip

    def resolved(self):
        preset = dict(self.PRESETS.get(self.dataset, {})) if isinstance(self.dataset, str) else {}
        if self.profile == "shu":
            preset.update(self.SHU)
        if self.quick is True:
            preset.update(self.QUICK)
        filled = {k: v for k, v in preset.items() if getattr(self, k) is None}
        config = dataclasses.replace(self, **filled)
        validate(config)
        return config

    def check(self) -> None:
        super().check()
        if self.device != "cpu":  # its probes (fastdarts.probes) compute on the CPU
            raise ConfigError(f"the convergence study runs on the CPU (--jobs processes); device {self.device} is "
                              "for search and train")  # fmt: skip
        buildable_genotype(self.genotype)  # a cell that cannot be read or built fails before anything is written
        widths = number_list(self.widths, "widths")
        if any(w < 0 or w * 2 != int(w * 2) for w in widths):
            raise ConfigError(f"widths must be multiples of 0.5 (a node is 0, c/2 or c wide), got {self.widths!r}")
        skips = number_list(self.skips, "skips", int)
        if any(k < 0 for k in skips):
            raise ConfigError(f"skips must be >= 0, got {self.skips!r}")
        probes = number_list(self.probes, "probes")
        if any(not 0 < f <= 1 for f in probes):
            raise ConfigError(f"probes must be fractions of training in (0, 1], got {self.probes!r}")
        if self.gradvar_batch * 2 > self.probe_images:
            raise ConfigError(f"probe_images ({self.probe_images}) must hold two batches of gradvar_batch "
                              f"({self.gradvar_batch}) at least")  # fmt: skip

    def width_groups(self) -> list[float]:
        return number_list(self.widths, "widths")

    def skip_counts(self) -> list[int]:
        return sorted(number_list(self.skips, "skips", int))

    def probe_epochs(self) -> list[int]:
        """The epochs (1..epochs, the last always) after which the gradient variance is measured, besides
        initialisation."""
        fractions = number_list(self.probes, "probes")
        return sorted({self.epochs} | {max(1, math.ceil(f * self.epochs - 1e-9)) for f in fractions})


@functools.cache
def _type_hints(cls) -> dict[str, typing.Any]:
    # Evaluated once per class: get_type_hints compiles every annotation anew, 1 ms a call.
    return typing.get_type_hints(cls)


def _field_type(cls, f: dataclasses.Field) -> type:
    hint = _type_hints(cls)[f.name]
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return hint


def validate(config) -> None:
    """Raise ConfigError naming the first field whose value is of the wrong type or out of range."""
    cls = type(config)
    for f in dataclasses.fields(cls):
        value = getattr(config, f.name)
        kind = _field_type(cls, f)
        if value is None:
            if f.default is None:  # unset: the preset's value, or none at all
                continue
            raise ConfigError(f"{f.name} must be of type {kind.__name__}, got None")
        ok = isinstance(value, kind) and not (kind is not bool and isinstance(value, bool))
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            ok = True
        if not ok:
            raise ConfigError(f"{f.name} must be of type {kind.__name__}, got {value!r}")
        if kind is float and not abs(value) <= sys.float_info.max:  # NaN, infinities, integers beyond a float
            raise ConfigError(f"{f.name} must be a finite number, got {value!r}")
        m = f.metadata
        if m.get("choices") and value not in m["choices"]:
            raise ConfigError(f"{f.name} must be one of {', '.join(m['choices'])}, got {value!r}")
        low, high = m.get("low"), m.get("high")
        if low is not None and (value <= low if m["low_open"] else value < low):
            raise ConfigError(f"{f.name} must be {'>' if m['low_open'] else '>='} {low}, got {value!r}")
        if high is not None and (value >= high if m["high_open"] else value > high):
            raise ConfigError(f"{f.name} must be {'<' if m['high_open'] else '<='} {high}, got {value!r}")
    check = getattr(config, "check", None)
    if check is not None:
        check()


def load_config_file(path: str | Path, cls) -> dict:
    """Read a YAML or JSON mapping of config keys; unknown keys are an error."""
    path = Path(path)
    found = path_stat(path, "config file", ConfigError)
    if found is None:
        raise ConfigError(f"config file {path} does not exist")
    if not stat.S_ISREG(found.st_mode):
        raise ConfigError(f"config file {path} is not a regular file")
    try:
        text = path.read_text()
        values = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {path}: cannot read it ({e})") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"config file {path}: malformed JSON: {e.msg} at line {e.lineno}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path}: malformed YAML: {str(e).splitlines()[0]}") from None
    except (ValueError, RecursionError) as e:  # an integer of too many digits, nesting too deep
        raise ConfigError(f"config file {path}: cannot read it ({type(e).__name__}: {e})") from None
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys to values")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(str(k) for k in values if k not in known)
    if unknown:
        raise ConfigError(f"config file {path}: unknown key(s) {', '.join(unknown)}")
    return values


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a usage error on one line (`prog: error: ...`) with exit status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {one_line(message)}\n")


def seed_list(text: str) -> list[int]:
    """`--seeds 0,1,2`: distinct integers, comma-separated."""
    try:
        seeds = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 0,1,2, got {text!r}") from None
    if len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"seeds must be distinct, got {text!r}")
    if not all(0 <= seed < 2**32 for seed in seeds):  # checked before the first run, not when its turn comes
        raise argparse.ArgumentTypeError(f"seeds must lie in 0..{2**32 - 1} (NumPy's seeds), got {text!r}")
    return seeds


def _fields_for_help(cls) -> list[dataclasses.Field]:
    """The config's own fields first, the shared RunOptions last."""
    shared = {f.name for f in dataclasses.fields(RunOptions)}
    fields = dataclasses.fields(cls)
    return [f for f in fields if f.name not in shared] + [f for f in fields if f.name in shared]


def _preset_default(cls, name: str) -> str:
    """How --help shows the default of a preset field: its value per data set ("digits: 64; cifar10/folder: 96")."""
    datasets_of: dict[typing.Any, list[str]] = {}
    for dataset, preset in cls.PRESETS.items():
        if name in preset:
            datasets_of.setdefault(preset[name], []).append(dataset)
    if len(datasets_of) == 1 and len(next(iter(datasets_of.values()))) == len(cls.PRESETS):
        return str(next(iter(datasets_of)))
    return "; ".join(f"{'/'.join(datasets)}: {value}" for value, datasets in datasets_of.items())


def build_parser(cls, prog: str, description: str) -> argparse.ArgumentParser:
    parser = OneLineParser(prog=prog, description=description)
    parser.add_argument("--config", help="YAML or JSON file with the same keys as the flags; flags override it")
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue the run saved in RUN_DIR, with its own settings")
    parser.add_argument("--seeds", type=seed_list, metavar="S1,S2,...",
                        help="one run per seed, then the mean and standard deviation of the final metrics")  # fmt: skip
    presets = set().union(*cls.PRESETS.values()) if cls.PRESETS else set()
    for f in _fields_for_help(cls):
        kind = _field_type(cls, f)
        shown = f.default if f.default is not None else _preset_default(cls, f.name) if f.name in presets else None
        helptext = f.metadata["help"] if "default" in f.metadata["help"] else f"{f.metadata['help']} (default: {shown})"
        if kind is bool:  # --x and --no_x both, whatever the default (DARTS commands spell out --auxiliary)
            switch = parser.add_mutually_exclusive_group()
            # --help shows the one that changes the default (both for a preset's).
            yes = helptext if f.default is None else f.metadata["help"]
            switch.add_argument(f"--{f.name}", action="store_true", default=argparse.SUPPRESS,
                                help=argparse.SUPPRESS if f.default is True else yes)  # fmt: skip
            no = argparse.SUPPRESS if f.default is False else f"do not {f.metadata['help']}"
            switch.add_argument(f"--no_{f.name}", dest=f.name, action="store_false", default=argparse.SUPPRESS,
                                help=no)  # fmt: skip
            continue
        parser.add_argument(f"--{f.name}", type=kind, help=helptext, default=argparse.SUPPRESS,
                            choices=f.metadata.get("choices"), metavar=f.name.upper())  # fmt: skip
    return parser


@dataclass
class CommandLine:
    """What an entry point was asked to do."""

    config: typing.Any  # flags over config file over defaults, not yet resolved
    given: dict  # the flags given explicitly (a resumed run accepts a few of them)
    resume: str | None
    seeds: list[int] | None


def parse_command_line(cls, argv, prog: str, description: str) -> CommandLine:
    args = vars(build_parser(cls, prog, description).parse_args(argv))
    config_file = args.pop("config", None)
    resume = args.pop("resume", None)
    seeds = args.pop("seeds", None)
    if resume is not None and config_file:
        raise ConfigError("--resume continues a run with its own settings; it takes no --config")
    if seeds is not None and (resume is not None or "seed" in args):
        raise ConfigError("--seeds starts one new run per seed; it goes with neither --seed nor --resume")
    values = load_config_file(config_file, cls) if config_file else {}
    values.update(args)
    return CommandLine(cls(**values), args, resume, seeds)


SPACES = ("cnn", "rnn")


def requested_space(argv: list[str]) -> tuple[str, list[str]]:
    """The search space a command line asks for (`--space cnn|rnn`, or the saved run's for `--resume DIR`; default
    cnn), and the command line without `--space`, which each space's parser implies."""
    space, rest, args = None, [], iter(argv)
    for arg in args:
        if arg == "--space" or arg.startswith("--space="):
            space = arg.partition("=")[2] if "=" in arg else next(args, "")
            if space not in SPACES:
                raise ConfigError(f"space must be one of {', '.join(SPACES)}, got {space!r}")
            continue
        rest.append(arg)
    if space is None and "--resume" in argv[:-1]:
        saved = Path(argv[argv.index("--resume") + 1]) / "config.json"
        try:
            space = json.loads(saved.read_text()).get("space")
        except (OSError, ValueError, AttributeError):
            space = None  # not a run directory of this version: the resume itself names the problem
    return space or "cnn", rest


def run_cli(main, argv=None) -> int:
    """Run an entry point: bad input is one line on stderr and exit status 2, a run that failed
    (diverged, could not save) one line and status 1, a run stopped by a signal says how to resume
    and exits with 128 + signal."""
    try:
        return main(argv) or 0
    except (FastDartsError, RunFailed, RunInterrupted) as e:
        # Over several processes an error that all of them raise together is printed by process 0 alone.
        if not getattr(e, "every_process", False) or writer_process():
            print(e if isinstance(e, RunInterrupted) else f"error: {one_line(str(e))}", file=sys.stderr)
        return e.status if isinstance(e, RunInterrupted) else 2 if isinstance(e, FastDartsError) else 1
    except DistError as e:  # a collective that failed: another process of the run ended first
        print(f"error: another process of this run failed ({one_line(summary(e))})", file=sys.stderr)
        return 1
