"""Run configurations: one dataclass per entry point, with every flag's help, default and valid range.

The command-line parser, config-file loading and validation are all derived from the dataclass
fields, so each option is declared exactly once. Flags keep DARTS's names.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .checkpoint import RunInterrupted
from .data import DATASETS
from .errors import ConfigError, FastDartsError, TrainingDiverged


def option(default, help: str, *, low=None, high=None, low_open=False, high_open=False, choices=None):
    """A config field: `low`/`high` bound the value (open bounds exclude the end), `choices` lists it."""
    meta = dict(help=help, low=low, high=high, low_open=low_open, high_open=high_open, choices=choices)
    return field(default=default, metadata=meta)


@dataclass
class SearchConfig:
    """DARTS search. Fields left at None take the data set's preset (see PRESETS)."""

    dataset: str = option("digits", "data set: digits (bundled) or cifar10 (needs --data)", choices=DATASETS)
    data: str | None = option(None, "data directory (cifar10: the cifar-10-batches-py directory)")
    batch_size: int | None = option(None, "batch size", low=1)
    learning_rate: float = option(0.025, "initial weight learning rate", low=0, low_open=True)
    learning_rate_min: float = option(0.001, "final weight learning rate of the cosine schedule", low=0)
    momentum: float = option(0.9, "weight SGD momentum", low=0, high=1, high_open=True)
    weight_decay: float = option(3e-4, "weight decay of the weights", low=0)
    epochs: int | None = option(None, "number of search epochs", low=1)
    init_channels: int | None = option(None, "channels of the first cell (C)", low=1)
    layers: int | None = option(None, "number of cells (reductions at layers//3 and 2*layers//3)", low=3)
    train_portion: float = option(0.5, "fraction of the training set that trains the weights", low=0, high=1,
                                  low_open=True, high_open=True)  # fmt: skip
    unrolled: bool = option(False, "second-order (unrolled) architecture gradient")
    hessian_r: float = option(0.01, "second order: the finite-difference step of the Hessian-vector product (L2 norm)",
                              low=0, low_open=True)  # fmt: skip
    arch_learning_rate: float | None = option(None, "Adam learning rate of the architecture", low=0, low_open=True)
    arch_weight_decay: float = option(1e-3, "weight decay of the architecture parameters", low=0)
    grad_clip: float = option(5.0, "gradient-norm clip of the weights", low=0, low_open=True)
    seed: int = option(2, "random seed")
    out: str | None = option(None, "run directory (default: a new folder under runs/)")
    save_every: int = option(1, "write a checkpoint every this many epochs", low=1)
    on_nan: str = option("stop", "on a NaN or infinite loss or gradient: stop, or skip the batch",
                         choices=("stop", "skip"))  # fmt: skip
    progress: bool = option(True, "show a progress bar")

    def check(self) -> None:
        if self.dataset == "cifar10" and self.data is None:
            raise ConfigError("dataset cifar10 needs data: the cifar-10-batches-py directory (--data DIR)")
        if self.learning_rate_min > self.learning_rate:
            raise ConfigError(
                f"learning_rate_min ({self.learning_rate_min}) must not exceed learning_rate ({self.learning_rate})"
            )

    def resolved(self) -> SearchConfig:
        """A copy with the data set's preset filled into every field left at None, validated."""
        preset = PRESETS[self.dataset] if self.dataset in PRESETS else {}
        filled = {k: v for k, v in preset.items() if getattr(self, k) is None}
        config = dataclasses.replace(self, **filled)
        validate(config)
        return config


# DARTS's CIFAR-10 settings, and settings for the bundled digits that finish a real search in a few
# minutes on 2 cores: 8x8 images need fewer cells, and the architecture takes a larger step
# because a digits epoch has 15 steps where a CIFAR-10 epoch has 391.
PRESETS: dict[str, dict[str, typing.Any]] = {
    "cifar10": dict(batch_size=64, epochs=50, init_channels=16, layers=8, arch_learning_rate=3e-4),
    "digits": dict(batch_size=64, epochs=15, init_channels=8, layers=5, arch_learning_rate=3e-3),
}


def _field_type(cls, f: dataclasses.Field) -> type:
    hint = typing.get_type_hints(cls)[f.name]
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return hint


def validate(config) -> None:
    """Raise ConfigError naming the first field whose value is of the wrong type or out of range."""
    cls = type(config)
    for f in dataclasses.fields(cls):
        value = getattr(config, f.name)
        if value is None:
            continue
        kind = _field_type(cls, f)
        ok = isinstance(value, kind) and not (kind is not bool and isinstance(value, bool))
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            ok = True
        if not ok:
            raise ConfigError(f"{f.name} must be of type {kind.__name__}, got {value!r}")
        if kind is float and not math.isfinite(value):
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
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        text = path.read_text()
        values = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {path}: cannot read it ({e})") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"config file {path}: malformed JSON: {e.msg} at line {e.lineno}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path}: malformed YAML: {str(e).splitlines()[0]}") from None
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
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser(cls, prog: str, description: str) -> argparse.ArgumentParser:
    parser = OneLineParser(prog=prog, description=description)
    parser.add_argument("--config", help="YAML or JSON file with the same keys as the flags; flags override it")
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue the run saved in RUN_DIR, with its own settings")
    for f in dataclasses.fields(cls):
        kind = _field_type(cls, f)
        shown = f.default if f.default is not None else "preset" if f.name in PRESETS["digits"] else None
        helptext = f"{f.metadata['help']} (default: {shown})"
        if kind is bool:
            if f.default:
                parser.add_argument(f"--no_{f.name}", dest=f.name, action="store_false", help=f"do not {helptext}",
                                    default=argparse.SUPPRESS)  # fmt: skip
            else:
                parser.add_argument(f"--{f.name}", action="store_true", help=helptext, default=argparse.SUPPRESS)
            continue
        parser.add_argument(f"--{f.name}", type=kind, help=helptext, default=argparse.SUPPRESS,
                            choices=f.metadata.get("choices"), metavar=f.name.upper())  # fmt: skip
    return parser


def parse_config(cls, argv, prog: str, description: str):
    """Flags over config file over defaults; returns the (unresolved) config and the --resume directory."""
    args = vars(build_parser(cls, prog, description).parse_args(argv))
    config_file = args.pop("config", None)
    resume = args.pop("resume", None)
    if resume is not None and (config_file or set(args) - {"progress"}):
        raise ConfigError("--resume continues a run with its own settings; give no other flags but --no_progress")
    values = load_config_file(config_file, cls) if config_file else {}
    values.update(args)
    return cls(**values), resume


def run_cli(main, argv=None) -> int:
    """Run an entry point: bad input is one line on stderr and exit status 2, a diverged run one
    line and status 1, a run stopped by a signal says how to resume and exits with 128 + signal."""
    try:
        return main(argv) or 0
    except FastDartsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except RunInterrupted as e:
        print(e, file=sys.stderr)
        return e.status
