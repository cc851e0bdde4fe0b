"""Property-based tests (Hypothesis) of every entry point and parser: whatever a user gives them, fastdarts accepts
it or stops with its one-line error and exit status 2, never with another exception, and leaves no file behind
when it refuses.

The entry points run in this process, each `main` under `run_cli` as `python -m` runs it, and stop where the run
itself would begin: a new run once its directory is made (Reached, raised after the real make_run_dir), a resumed
one once its checkpoint is restored (Reached, raised by Run.loop). Every example works in a directory of its own.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import pickle
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from fastdarts import analyze, runloop, search, train
from fastdarts.config import SearchConfig, TrainConfig, run_cli
from fastdarts.data import CIFAR10_TRAIN_FILES, write_cifar10_batch
from fastdarts.errors import FastDartsError, GenotypeError
from fastdarts.space import BUILTIN_GENOTYPES, DARTS_V1, DARTS_V2, PRIMITIVES, Genotype, load_genotype

# 200 cases per entry point, drawn afresh on every run (no example database replays earlier failures).
FUZZ = settings(max_examples=200, deadline=None, database=None, suppress_health_check=list(HealthCheck))


class Reached(Exception):
    """The input was accepted: the run would start here."""


REAL_LOOP = runloop.Run.loop  # before stop_where_runs_start replaces it


@pytest.fixture(scope="module", autouse=True)
def stop_where_runs_start(tmp_path_factory):
    real_make_run_dir = runloop.make_run_dir

    def make_run_dir(out, kind):
        real_make_run_dir(out, kind)
        raise Reached

    def loop(self, task):
        raise Reached

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(search, "make_run_dir", make_run_dir)
        patch.setattr(train, "make_run_dir", make_run_dir)
        patch.setattr(runloop.Run, "loop", loop)
        # Tuning glibc's allocator is the command line's business, not this test process's.
        patch.setattr(runloop, "keep_freed_memory", lambda: False)
        # A run without --out makes runs/ in the working directory.
        patch.chdir(tmp_path_factory.mktemp("cwd"))
        yield


def entry(main, argv: list[str]) -> tuple[int | None, str]:
    """Run `main(argv)` as its command line does: (exit status, stderr), status None when the run was reached."""
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        try:
            status = run_cli(main, argv)
        except Reached:
            status = None
        except SystemExit as e:  # argparse's usage errors
            status = e.code
    return status, err.getvalue()


def assert_accepted_or_refused_in_one_line(status, err) -> bool:
    """True when the input was refused, as it must be: one line on stderr, exit status 2."""
    event("accepted" if status is None or status == 0 else "refused")  # the mix, in --hypothesis-show-statistics
    if status is None or status == 0:
        return False
    assert status == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "error: " in lines[0], err
    return True


def snapshot(root: Path) -> dict[str, tuple[int, int, int]]:
    """Every entry under `root` with its type, size and modification time (no read: some are unreadable)."""
    found = {}
    for p in sorted(root.rglob("*")):
        info = p.lstat()
        found[str(p.relative_to(root))] = (info.st_mode, info.st_size, info.st_mtime_ns)
    return found


@contextlib.contextmanager
def workdir():
    with tempfile.TemporaryDirectory() as name:
        yield Path(name)


# ----------------------------------------------------------------------------------------------
# Genotype strings

OP_NAMES = st.one_of(
    st.sampled_from(PRIMITIVES),
    st.sampled_from(["sep_conv_7x7", "conv_7x1_1x7", "", "Sep_Conv_3x3", 'a"b', "back\\slash"]),
    st.text(max_size=12),
)
NOT_AN_INDEX = st.sampled_from([True, 1.5, "0", None, -1, 10**30, [0], float("nan")])
CORRUPTIONS = (None, None, None, "op", "index", "bad_index", "odd_edges", "no_edges", "concat_range", "concat_empty",
               "concat_type", "concat_input", "missing_field", "extra_field")  # fmt: skip


@st.composite
def genotype_fields(draw) -> tuple[dict, bool]:
    """The four fields of a cell pair, with at most one kind of damage; and whether the result is a valid cell."""
    corruption = draw(st.sampled_from(CORRUPTIONS))
    fields = {}
    for cell in ("normal", "reduce"):
        steps = draw(st.integers(1, 6))
        edges = [(draw(st.sampled_from(PRIMITIVES)), draw(st.integers(0, 1 + k // 2))) for k in range(2 * steps)]
        concat = draw(st.lists(st.integers(2, 1 + steps), min_size=1, max_size=steps + 1))
        fields[cell], fields[f"{cell}_concat"] = edges, concat
    cell = draw(st.sampled_from(["normal", "reduce"]))
    edges, concat = fields[cell], fields[f"{cell}_concat"]
    k = draw(st.integers(0, len(edges) - 1))
    if corruption == "op":
        edges[k] = (draw(OP_NAMES), edges[k][1])
    elif corruption == "index":  # a node reading itself or a later node
        edges[k] = (edges[k][0], draw(st.integers(2 + k // 2, 2 + k // 2 + 5)))
    elif corruption == "bad_index":
        edges[k] = (edges[k][0], draw(NOT_AN_INDEX))
    elif corruption == "odd_edges":
        edges.pop(k)
    elif corruption == "no_edges":
        edges.clear()
    elif corruption == "concat_range":
        concat.append(draw(st.one_of(st.integers(-5, -1), st.integers(2 + len(edges) // 2, 10**20))))
    elif corruption == "concat_empty":
        concat.clear()
    elif corruption == "concat_type":
        concat.append(draw(NOT_AN_INDEX))
    elif corruption == "concat_input":
        concat.append(draw(st.integers(0, 1)))
    elif corruption == "missing_field":
        del fields[draw(st.sampled_from(sorted(fields)))]
    elif corruption == "extra_field":
        fields[draw(st.sampled_from(["normal_concatt", "steps", "Normal"]))] = [2]
    # Unknown op names are a valid genotype (analyze counts what it can); train refuses them later.
    valid = corruption in (None, "op", "concat_input") and (corruption != "concat_input" or cell == "normal")
    return fields, valid


def darts_string(fields: dict, draw) -> str:
    """`fields` written as DARTS prints a genotype, a contiguous concat list now and then as range(...)."""
    parts = []
    for name, value in fields.items():
        concat = name.endswith("concat") and value and all(type(c) is int for c in value)
        if concat and value == sorted(set(value)) and len(value) == value[-1] - value[0] + 1 and draw(st.booleans()):
            parts.append(f"{name}=range({value[0]}, {value[-1] + 1})")
        else:
            parts.append(f"{name}={value!r}")
    return f"Genotype({', '.join(parts)})"


@st.composite
def mutated(draw, text: str) -> str:
    """`text` cut, with a slice removed, or with random text inserted."""
    kind = draw(st.sampled_from(["keep", "keep", "cut", "delete", "insert", "pad"]))
    i = draw(st.integers(0, len(text)))
    if kind == "cut":
        return text[:i]
    if kind == "delete":
        return text[:i] + text[draw(st.integers(i, len(text))) :]
    if kind == "insert":
        return text[:i] + draw(st.text(max_size=8)) + text[i:]
    if kind == "pad":
        return draw(st.sampled_from(["", " ", "\n", "\t "])) + text + draw(st.sampled_from(["", "\n", "  \n"]))
    return text


@st.composite
def genotype_strings(draw) -> str:
    """Any string a user may pass as a genotype: names, DARTS strings (whole, damaged, long), anything."""
    kind = draw(st.sampled_from(["builtin", "darts", "darts", "darts", "published", "text", "nested", "huge"]))
    if kind == "builtin":
        return draw(st.sampled_from([*BUILTIN_GENOTYPES, "darts_v2", "DARTS_V9", "DARTS_V2 "]))
    if kind == "published":
        return draw(mutated(str(draw(st.sampled_from([DARTS_V1, DARTS_V2])))))
    if kind == "text":
        return draw(st.text(max_size=300))
    if kind == "nested":  # deep nesting and integer literals past Python's digit limit
        depth = draw(st.integers(1, 3000))
        inner = draw(st.sampled_from(["[" * depth + "]" * depth, "-" * depth + "1", "1" * (3 * depth), "(" * depth]))
        return f"Genotype(normal={inner}, normal_concat=[2], reduce=[], reduce_concat=[2])"
    if kind == "huge":  # a well-formed cell with many nodes (of cheap ops: analyze builds its network)
        steps = draw(st.integers(20, 60))
        edges = [(draw(st.sampled_from(["skip_connect", "max_pool_3x3"])), k // 2 + 1) for k in range(2 * steps)]
        return str(Genotype(edges, [steps + 1], edges, [steps + 1]))
    fields, _ = draw(genotype_fields())
    return draw(mutated(darts_string(fields, draw)))


def parsed_or_refused(parse, text):
    """`parse(text)`, or None when it raises GenotypeError (any other exception fails the test)."""
    try:
        return parse(text)
    except GenotypeError:
        return None


@FUZZ
@given(data=st.data())
def test_genotype_parsers_raise_only_genotype_errors(data):
    fields, valid = data.draw(genotype_fields())
    parsed = parsed_or_refused(Genotype.parse, darts_string(fields, data.draw))
    assert (parsed is not None) == valid, fields
    assert parsed_or_refused(Genotype.from_json, json.dumps(fields)) == parsed
    if parsed is not None:  # what parses prints back to itself, in both formats
        assert Genotype.parse(str(parsed)) == parsed and Genotype.from_json(parsed.to_json()) == parsed
    for source in (data.draw(genotype_strings()), data.draw(st.text())):
        loaded = parsed_or_refused(load_genotype, source)
        assert loaded is None or isinstance(loaded, Genotype)


@pytest.mark.parametrize("genotype", [DARTS_V1, DARTS_V2], ids=["DARTS_V1", "DARTS_V2"])
def test_published_genotypes_in_full_go_through_every_entry_point(genotype):
    text = str(genotype)
    assert len(text) > 255  # longer than a file name may be: it must never be looked up as a path
    status, err = entry(analyze.main, ["--json", text, "--init_channels", "4", "--layers", "3"])
    assert status == 0, err
    with workdir() as tmp:
        status, err = entry(train.main, ["--genotype", text, "--out", str(tmp / "run")])
        assert status is None, err  # accepted: the run was about to start
        assert TrainConfig(genotype=text).resolved().cell() == genotype
        # As DARTS prints them: concat lists as range(2, 6).
        darts = text.replace("_concat=[2, 3, 4, 5]", "_concat=range(2, 6)")
        assert load_genotype(darts) == genotype == load_genotype("\n" + text + "\n")


ANALYZE_NETWORK = ["--init_channels", "2", "--layers", "3", "--image_size", "8"]


@st.composite
def genotype_sources(draw, tmp: Path) -> str:
    """A genotype argument: a string, or a path to a file or run directory holding one, or a bad path."""
    kind = draw(st.sampled_from(["string", "string", "string", "file", "json", "run_dir", "path"]))
    if kind == "string":
        return draw(genotype_strings())
    if kind == "path":
        return draw(bad_paths(tmp))
    text = draw(genotype_strings())
    if kind == "json":
        fields, _ = draw(genotype_fields())
        text = draw(mutated(json.dumps(fields)))
    path = tmp / ("run" if kind == "run_dir" else "g")
    if kind == "run_dir":
        path.mkdir()
        path = path / draw(st.sampled_from(["genotype.json", "genotype.txt", "other.txt"]))
    path.write_text(text)
    return str(path.parent if kind == "run_dir" else path)


@FUZZ
@given(data=st.data())
def test_analyze_genotype_argument(data):
    with workdir() as tmp:
        source = data.draw(genotype_sources(tmp))
        before = snapshot(tmp)
        status, err = entry(analyze.main, ["--json", source, *ANALYZE_NETWORK])
        assert_accepted_or_refused_in_one_line(status, err)
        assert snapshot(tmp) == before


@FUZZ
@given(data=st.data())
def test_train_genotype_argument(data):
    with workdir() as tmp:
        source = data.draw(genotype_sources(tmp))
        before = snapshot(tmp)
        status, err = entry(train.main, ["--genotype", source, "--out", str(tmp / "out"), "--no_progress"])
        if assert_accepted_or_refused_in_one_line(status, err):
            assert snapshot(tmp) == before


# ----------------------------------------------------------------------------------------------
# Paths


@st.composite
def bad_paths(draw, tmp: Path) -> str:
    """A path that is missing, too long, unreadable, of the wrong kind, or names a file as a directory."""
    (tmp / "file").write_text("not what you think")
    (tmp / "dir").mkdir(exist_ok=True)
    kind = draw(st.sampled_from(["missing", "long_name", "long_path", "file_as_dir", "dir", "file", "unreadable",
                                 "fifo", "loop", "nul", "empty", "device", "text"]))  # fmt: skip
    if kind == "missing":
        return str(tmp / "missing" / draw(st.sampled_from(["x", "genotype.json", "checkpoint.pt"])))
    if kind == "long_name":
        return str(tmp / ("x" * draw(st.integers(256, 5000))))
    if kind == "long_path":
        return str(tmp / "/".join(["y" * 200] * draw(st.integers(21, 40))))
    if kind == "file_as_dir":
        return str(tmp / "file" / draw(st.sampled_from(["x", "genotype.json", "checkpoint.pt", "data_batch_1"])))
    if kind == "dir":
        return str(tmp / "dir")
    if kind == "file":
        return str(tmp / "file")
    if kind == "unreadable":  # root reads it anyway: then it is a file of the wrong content
        path = tmp / "unreadable"
        path.write_text("secret")
        path.chmod(0)
        return str(path / "x" if draw(st.booleans()) else path)
    if kind == "fifo":  # opening it would block: nothing may try
        path = tmp / "fifo"
        if not path.exists():
            os.mkfifo(path)
        return str(path)
    if kind == "loop":
        path = tmp / "loop"
        if not path.is_symlink():
            path.symlink_to(path)
        return str(path)
    if kind == "nul":
        return str(tmp / "a\0b")
    if kind == "empty":
        return ""
    if kind == "device":
        return "/dev/null"
    return draw(st.text(max_size=50))


PATH_FLAGS = {
    "search": ["--config", "--data", "--resume", "--out"],
    "train": ["--genotype", "--config", "--data", "--resume", "--out"],
}
MAINS = {"search": search.main, "train": train.main}


@FUZZ
@pytest.mark.parametrize("kind", ["search", "train"])
@given(data=st.data())
def test_path_arguments(kind, data):
    with workdir() as tmp:
        flag = data.draw(st.sampled_from(PATH_FLAGS[kind]))
        path = data.draw(bad_paths(tmp))
        argv = [f"{flag}={path}", "--no_progress"]
        if flag == "--data":
            argv += ["--dataset", data.draw(st.sampled_from(["cifar10", "cifar100", "folder"]))]
        if flag != "--out" and flag != "--resume":
            argv += ["--out", str(tmp / "out")]
        before = snapshot(tmp)
        status, err = entry(MAINS[kind], argv)
        if assert_accepted_or_refused_in_one_line(status, err):
            assert snapshot(tmp) == before


@FUZZ
@given(data=st.data())
def test_analyze_paths(data):
    with workdir() as tmp:
        out_flag = data.draw(st.booleans())
        path = data.draw(bad_paths(tmp))
        argv = [f"--out={path}", "--variants", "1", "DARTS_V2"] if out_flag else [path]
        before = snapshot(tmp)
        status, err = entry(analyze.main, ["--json", *argv, *ANALYZE_NETWORK])
        if assert_accepted_or_refused_in_one_line(status, err):
            assert snapshot(tmp) == before


# ----------------------------------------------------------------------------------------------
# Configuration files and flags

ODD_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-10, 100),
    st.integers(-(2**80), 2**80),
    st.floats(),
    st.sampled_from(["nan", "inf", "-1", "1e400", "digits", "cifar10", "pr-darts", "DARTS_V2", "", "0x10"]),
    st.text(max_size=10),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)


@st.composite
def config_texts(draw, cls) -> tuple[str, str]:
    """(file suffix, contents) of a config file: known and unknown keys with odd values, or malformed text."""
    keys = st.one_of(st.sampled_from([f.name for f in dataclasses.fields(cls)]), st.text(max_size=12))
    values = draw(st.dictionaries(keys, ODD_VALUES, max_size=4))
    suffix = draw(st.sampled_from([".json", ".yaml", ".yml", ".txt", ""]))
    kind = draw(st.sampled_from(["mapping", "mapping", "mapping", "cut", "not_a_mapping", "text", "deep"]))
    if kind == "not_a_mapping":
        values = draw(st.one_of(st.lists(st.integers(), max_size=3), st.integers(), st.text(max_size=5)))
    if kind == "text":
        return suffix, draw(st.text(max_size=200))
    if kind == "deep":  # past Python's recursion limit (YAML's pure-Python reader takes 0.2 s at 600 levels)
        depth = draw(st.integers(10, 1100 if suffix == ".json" else 700))
        return suffix, "[" * depth + "]" * depth
    text = json.dumps(values) if suffix == ".json" else yaml.safe_dump(values)
    return suffix, draw(mutated(text)) if kind == "cut" else text


@FUZZ
@pytest.mark.parametrize("kind", ["search", "train"])
@given(data=st.data())
def test_config_files(kind, data):
    cls = SearchConfig if kind == "search" else TrainConfig
    with workdir() as tmp:
        suffix, text = data.draw(config_texts(cls))
        path = tmp / f"config{suffix}"
        path.write_text(text)
        before = snapshot(tmp)
        status, err = entry(MAINS[kind], ["--config", str(path), "--out", str(tmp / "out"), "--no_progress"])
        if assert_accepted_or_refused_in_one_line(status, err):
            assert snapshot(tmp) == before


NUMBERS = st.one_of(
    st.integers(-5, 300).map(str),
    st.integers().map(str),
    st.floats().map(repr),
    st.sampled_from(["nan", "-nan", "inf", "-inf", "1e400", "-0", "0.0", "1_000", " 3", "0x10", "1,2", "", "many"]),
    st.text(max_size=6),
)


@FUZZ
@pytest.mark.parametrize("kind", ["search", "train"])
@given(data=st.data())
def test_command_line_flags(kind, data):
    cls = SearchConfig if kind == "search" else TrainConfig
    flags = [f"--{f.name}" for f in dataclasses.fields(cls) if f.name not in ("out", "data", "genotype", "progress")]
    flags += ["--seeds", "--unknown_flag"]
    with workdir() as tmp:
        argv = ["--out", str(tmp / "out"), "--no_progress"]
        for flag in data.draw(st.lists(st.sampled_from(flags), max_size=4)):
            argv += [flag, data.draw(NUMBERS)]
        before = snapshot(tmp)
        status, err = entry(MAINS[kind], argv)
        if assert_accepted_or_refused_in_one_line(status, err):
            assert snapshot(tmp) == before


def small_or_not_an_integer(text: str) -> bool:
    """A flag value that is not an integer argparse reads, or a small one: the values go to every flag, and a large
    --layers or --variants takes long (large sizes have their own tests in test_analyze.py)."""
    try:
        return abs(int(text)) <= 12
    except ValueError:
        return True


ANALYZE_VALUES = st.one_of(
    st.integers(-3, 12).map(str),
    st.sampled_from(["nan", "inf", "1e400", "-0", "0.0", "1_0", " 3", "0x10", "1,2", "", "many", "-" + "9" * 30]),
    st.text(max_size=4).filter(small_or_not_an_integer),
)
ANALYZE_FLAGS = ["--init_channels", "--layers", "--num_classes", "--image_size", "--variants", "--seed"]


@FUZZ
@given(data=st.data())
def test_analyze_flags(data):
    # A small network unless the drawn flags, given after, say otherwise.
    argv = [data.draw(st.sampled_from(["DARTS_V2", "PRDARTS", "NASNet"])), "--json", *ANALYZE_NETWORK]
    for flag in data.draw(st.lists(st.sampled_from(ANALYZE_FLAGS), max_size=4)):
        argv += [flag, data.draw(ANALYZE_VALUES)]
    with workdir() as tmp:
        status, err = entry(analyze.main, [*argv, "--out", str(tmp / "out")])
        assert_accepted_or_refused_in_one_line(status, err)


# ----------------------------------------------------------------------------------------------
# CIFAR-10 directories with damaged batches

PIXELS = 3 * 32 * 32


@st.composite
def cifar_entries(draw):
    """A pickled object where a CIFAR-10 batch should be: a dict whose data or labels are off, or anything."""
    n = draw(st.integers(0, 3))
    data = draw(st.sampled_from(["ok", "ok", "shape", "dtype", "values", "list", "text", "none", "3d"]))
    labels = draw(st.sampled_from(["ok", "ok", "range", "length", "text", "scalar", "floats", "nested", "none"]))
    entry = {"batch_label": "fuzz"}
    entry["data"] = {
        "ok": np.zeros((n, PIXELS), np.uint8),
        "shape": np.zeros((n, draw(st.integers(0, 4000))), np.uint8),
        "dtype": np.full((n, PIXELS), draw(st.floats()), np.float64),
        "values": [[draw(st.integers(-(2**70), 2**70))] * PIXELS] * n,
        "list": [list(range(PIXELS))] * n,
        "text": "pixels",
        "none": None,
        "3d": np.zeros((n, 3, 1024), np.uint8),
    }[data]
    entry["labels"] = {
        "ok": [draw(st.integers(0, 9)) for _ in range(n)],
        "range": [draw(st.integers(-(2**70), 2**70)) for _ in range(n)],
        "length": list(range(n + 1)),
        "text": "labels",
        "scalar": 3,
        "floats": [draw(st.floats())] * n,
        "nested": [[1, [2]]] * n,
        "none": None,
    }[labels]
    if draw(st.booleans()):
        del entry[draw(st.sampled_from(["data", "labels"]))]
    return draw(st.one_of(st.just(entry), st.just(entry), st.lists(st.integers(), max_size=2), st.text(max_size=5)))


@st.composite
def cifar_directories(draw, tmp: Path) -> Path:
    """A cifar-10-batches-py directory of tiny batches, some of them damaged, missing or of the wrong kind."""
    root = tmp / "cifar-10-batches-py"
    root.mkdir()
    names = [*CIFAR10_TRAIN_FILES, "test_batch"]
    for name in names:
        write_cifar10_batch(root / name, np.zeros((2, 3, 32, 32), np.uint8), [0, 1])
    for name in draw(st.lists(st.sampled_from(names), min_size=1, max_size=3, unique=True)):
        path = root / name
        damage = draw(st.sampled_from(["cut", "bytes", "object", "object", "empty", "missing", "dir", "flip"]))
        if damage == "cut":
            raw = path.read_bytes()
            path.write_bytes(raw[: draw(st.integers(0, len(raw) - 1))])
        elif damage == "bytes":
            path.write_bytes(draw(st.binary(max_size=200)))
        elif damage == "object":
            path.write_bytes(pickle.dumps(draw(cifar_entries()), protocol=draw(st.integers(0, 5))))
        elif damage == "empty":
            path.write_bytes(b"")
        elif damage == "missing":
            path.unlink()
        elif damage == "dir":
            path.unlink()
            path.mkdir()
        elif damage == "flip":
            raw = bytearray(path.read_bytes())
            i = draw(st.integers(0, len(raw) - 1))
            raw[i] ^= draw(st.integers(1, 255))
            path.write_bytes(bytes(raw))
    return draw(st.sampled_from([root, tmp]))  # the directory itself, or its parent


@FUZZ
@pytest.mark.parametrize("kind", ["search", "train"])
@given(data=st.data())
def test_cifar10_directories(kind, data):
    with workdir() as tmp:
        root = data.draw(cifar_directories(tmp))
        before = snapshot(tmp)
        argv = ["--dataset", "cifar10", "--data", str(root), "--out", str(tmp / "out"), "--no_progress"]
        status, err = entry(MAINS[kind], argv + (["--batch_size", "2"] if kind == "search" else []))
        if assert_accepted_or_refused_in_one_line(status, err):
            assert snapshot(tmp) == before


# ----------------------------------------------------------------------------------------------
# Checkpoints to resume from: torn, damaged, of the other kind, or from another version

TINY = dict(epochs=2, stop_after=1, layers=3, init_channels=4, batch_size=256, progress=False)


class SavedRun:
    """A run directory and its checkpoint, as bytes and as loaded."""

    def __init__(self, directory: Path):
        self.dir = directory
        self.raw = (directory / "checkpoint.pt").read_bytes()
        self.state = torch.load(io.BytesIO(self.raw), weights_only=False)

    def __repr__(self) -> str:  # what Hypothesis shows of a failing case
        return f"<the {self.dir.name} run>"


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, SavedRun]:
    """A search and a training run, each stopped after the first of its two epochs."""
    root = tmp_path_factory.mktemp("runs")
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        with pytest.MonkeyPatch.context() as patch:  # the real runs, not the fixture's stop
            patch.setattr(search, "make_run_dir", runloop.make_run_dir)
            patch.setattr(train, "make_run_dir", runloop.make_run_dir)
            patch.setattr(runloop.Run, "loop", REAL_LOOP)
            search.run(**TINY, out=str(root / "search"))
            train.run(**TINY, out=str(root / "train"))
    return {kind: SavedRun(root / kind) for kind in ("search", "train")}


class Damaged:
    """The bytes of a checkpoint, the run they came from and what was done to them (shown when a case fails)."""

    def __init__(self, raw: bytes, run: SavedRun, what: str):
        self.raw, self.run, self.what = raw, run, what

    def __repr__(self) -> str:
        return f"<{self.run.dir.name} checkpoint, {self.what}>"


@st.composite
def damaged_checkpoints(draw, runs: dict[str, SavedRun]) -> Damaged:
    # Mostly the training run's: the search network's checkpoint holds ~2000 tensors and takes 60 ms to load.
    run = runs[draw(st.sampled_from(["search", "train", "train", "train"]))]
    raw = run.raw
    damage = draw(st.sampled_from(["none", "cut", "cut", "flip", "bytes", "object", "key", "config", "state",
                                   "other_kind", "complete"]))  # fmt: skip
    if damage == "none":
        return Damaged(raw, run, "whole")
    if damage == "cut":
        n = draw(st.integers(0, len(raw) - 1))
        return Damaged(raw[:n], run, f"cut to {n} bytes")
    if damage == "flip":
        raw = bytearray(raw)
        flips = [
            (draw(st.integers(0, len(raw) - 1)), draw(st.integers(1, 255))) for _ in range(draw(st.integers(1, 3)))
        ]
        for i, bits in flips:
            raw[i] ^= bits
        return Damaged(bytes(raw), run, f"bytes flipped (offset, xor): {flips}")
    if damage == "bytes":
        return Damaged(draw(st.binary(max_size=300)), run, "random bytes")
    state = {**run.state, "config": dict(run.state["config"])}  # the parts changed below are copies
    if damage == "object":
        state = draw(st.one_of(st.lists(st.integers(), max_size=2), st.integers(), st.none(),
                               st.dictionaries(st.text(max_size=5), st.integers(), max_size=3)))  # fmt: skip
        what = f"holding {state!r}"
    elif damage == "key":  # a field of the checkpoint gone or of the wrong type
        key = draw(st.sampled_from(sorted(state)))
        if draw(st.booleans()):
            del state[key]
            what = f"without {key!r}"
        else:
            state[key] = draw(ODD_VALUES)
            what = f"{key} = {state[key]!r}"
    elif damage == "config":  # settings of another version: a key added or gone, a value of the wrong type
        key = draw(st.sampled_from([*sorted(state["config"]), "renamed_flag"]))
        if draw(st.booleans()):
            state["config"].pop(key, None)
            what = f"config without {key!r}"
        else:
            state["config"][key] = draw(ODD_VALUES)
            what = f"config {key} = {state['config'][key]!r}"
    elif damage == "state":  # weights of another network
        state["model"] = runs["train" if run is runs["search"] else "search"].state["model"]
        what = "the other run's weights"
    elif damage == "other_kind":
        state["kind"] = "train" if state["kind"] == "search" else "search"
        what = f"kind {state['kind']!r}"
    else:
        state["complete"] = True
        what = "marked complete"
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return Damaged(buffer.getvalue(), run, what)


@FUZZ
@given(data=st.data())
def test_resume_from_damaged_checkpoints(runs, data):
    damaged = data.draw(damaged_checkpoints(runs))
    kind = data.draw(st.sampled_from(["search", "train"]))
    with workdir() as tmp:
        run_dir = tmp / "run"
        run_dir.mkdir()
        (run_dir / "checkpoint.pt").write_bytes(damaged.raw)
        for name in ("config.json", "metrics.jsonl"):
            (run_dir / name).write_bytes((damaged.run.dir / name).read_bytes())
        before = snapshot(tmp)
        status, err = entry(MAINS[kind], ["--resume", str(run_dir), "--no_progress"])
        if assert_accepted_or_refused_in_one_line(status, err):
            assert snapshot(tmp) == before


def test_resume_accepts_its_own_checkpoints(runs):
    for kind, run in runs.items():
        status, err = entry(MAINS[kind], ["--resume", str(run.dir), "--no_progress"])
        assert status is None, err


def test_load_checkpoint_refuses_what_is_not_a_run_checkpoint(tmp_path):
    path = tmp_path / "checkpoint.pt"
    torch.save({"model": {}}, path)
    with pytest.raises(FastDartsError, match="not a fastdarts run checkpoint"):
        runloop.load_checkpoint(path)


def test_load_checkpoint_checks_every_member_against_its_checksum(runs, tmp_path):
    # Found by the fuzzing: three flipped bytes made torch.load print a SystemError of its own, then raise
    # MemoryError; a flipped byte in a tensor loads as a wrong weight.
    raw = bytearray(runs["train"].raw)
    raw[raw.index(b"archive/data.pkl") + 100] ^= 1  # inside the pickle, data.pkl's first member
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(bytes(raw))
    with pytest.raises(FastDartsError, match="archive/data.pkl fails its checksum: the file is damaged"):
        runloop.load_checkpoint(path)
