"""Long runs (search and train): exact resume, signals, divergence, failed writes, --seeds."""

import functools
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
import types

import numpy as np
import pytest
import torch

from fastdarts import search, train
from fastdarts.checkpoint import load_checkpoint
from fastdarts.config import TrainConfig, parse_command_line
from fastdarts.data import ImageData
from fastdarts.errors import CheckpointWriteError, ConfigError, FastDartsError, TrainingDiverged
from fastdarts.evalnet import NETWORKS
from fastdarts.methods import make_method
from fastdarts.runloop import check_network_fits
from fastdarts.space import BUILTIN_GENOTYPES, Genotype
from fastdarts.supernet import SearchNetwork

# Tiny runs: a search epoch has 6 steps (718 images, batch 128), a train epoch 12 (1437, batch 128).
SEARCH = dict(epochs=2, layers=3, init_channels=2, batch_size=128, progress=False)
TRAIN = dict(epochs=2, layers=3, init_channels=4, batch_size=128, progress=False)
KINDS = {"search": (search, SEARCH), "train": (train, TRAIN)}
# PR-DARTS also carries the gate temperature and the gate generator in its checkpoint.
RESUMABLE = {**KINDS, "search-prdarts": (search, {**SEARCH, "method": "pr-darts"})}


def rows(run_dir):
    """metrics.jsonl without the wall-clock fields."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in ("seconds", "data_seconds")} for line in lines]


def assert_same_end(a, b):
    """Two finished runs: bit-identical weights, architecture, optimizer states and logged rows."""
    ca, cb = load_checkpoint(a / "checkpoint.pt"), load_checkpoint(b / "checkpoint.pt")
    assert ca["complete"] and cb["complete"]
    assert ca["model"].keys() == cb["model"].keys()
    for name, tensor in ca["model"].items():
        assert torch.equal(tensor, cb["model"][name]), name
    for key in ("weight_optimizer", "arch_optimizer", "optimizer"):
        if key in ca:
            for pa, pb in zip(ca[key]["state"].values(), cb[key]["state"].values()):
                for name in pa:
                    assert torch.equal(torch.as_tensor(pa[name]), torch.as_tensor(pb[name])), (key, name)
    assert rows(a) == rows(b)


@pytest.mark.slow
@pytest.mark.parametrize("kind", RESUMABLE)
def test_stopped_and_resumed_run_ends_bit_identical(tmp_path, kind):
    module, settings = RESUMABLE[kind]
    whole = module.run(**settings, out=str(tmp_path / "whole"))
    first = module.run(**settings, stop_after=1, out=str(tmp_path / "split"))
    assert first.stopped_early and len(first.history) == 1
    assert not load_checkpoint(tmp_path / "split" / "checkpoint.pt")["complete"]
    resumed = module.run(resume=tmp_path / "split", progress=False)
    assert not resumed.stopped_early and len(resumed.history) == 2
    assert_same_end(whole.run_dir, resumed.run_dir)
    if module is search:
        assert resumed.genotype == whole.genotype


def cli(kind, *args):
    return [sys.executable, "-m", f"fastdarts.{kind}", *args]


def flags(settings):
    out = []
    for key, value in settings.items():
        if key == "progress":
            continue
        out += [f"--{key}", str(value)]
    return out


# The methods of METHODS_MORE.md 3, 5, 6 and 7, on 2 steps an epoch; each keeps its state in the checkpoint
# (SDARTS's adversarial variant draws from the same generator as its random one, and more).
MORE_METHODS = {
    "beta-darts": {"method": "beta-darts"},
    "darts-minus": {"method": "darts-minus"},
    "fair-darts": {"method": "fair-darts"},
    "sdarts-adv": {"method": "sdarts", "perturbation": "adv", "pgd_steps": 2},
}


@pytest.mark.slow
@pytest.mark.parametrize("name", MORE_METHODS)
def test_each_method_searches_from_the_command_line_and_resumes_bit_identical(tmp_path, name):
    settings = {**SEARCH, "train_portion": 0.1, **MORE_METHODS[name]}
    whole = subprocess.run(cli("search", *flags(settings), "--no_progress", "--out", str(tmp_path / "whole")),
                           capture_output=True, text=True, timeout=600)  # fmt: skip
    assert whole.returncode == 0, whole.stderr
    genotype = Genotype.from_json((tmp_path / "whole" / "genotype.json").read_text())
    # Two steps leave every Fair DARTS weight near 0.5, below its 0.85 threshold: both cells come out empty.
    empty = ["normal", "reduce"] if name == "fair-darts" else []
    assert genotype.cells_without_ops() == empty
    warnings = [line for line in whole.stderr.splitlines() if line.startswith("warning: the ")]
    assert len(warnings) == len(empty) and all("lower --threshold (now 0.85)" in line for line in warnings)
    train_config = parse_command_line(TrainConfig, ["--genotype", str(tmp_path / "whole")], "p", "d").config
    assert train_config.resolved().cell() == genotype
    first = search.run(**settings, stop_after=1, out=str(tmp_path / "split"))
    assert first.stopped_early
    resumed = search.run(resume=tmp_path / "split", progress=False)
    assert_same_end(tmp_path / "whole", resumed.run_dir)
    assert resumed.genotype == genotype


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_sigterm_mid_epoch_saves_and_the_resumed_run_ends_bit_identical(tmp_path, kind):
    module, settings = KINDS[kind]
    args = flags(settings)
    whole = subprocess.run(cli(kind, *args, "--no_progress", "--out", str(tmp_path / "whole")),
                           capture_output=True, text=True, timeout=600)  # fmt: skip
    assert whole.returncode == 0, whole.stderr

    # Watch the progress bar and send SIGTERM a few steps into the second epoch.
    proc = subprocess.Popen(cli(kind, *args, "--out", str(tmp_path / "cut")), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    stderr = []
    reader = threading.Thread(target=lambda: stderr.extend(iter(lambda: proc.stderr.read(1), "")), daemon=True)
    reader.start()
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        done = [(int(a), int(b)) for a, b in re.findall(r"(\d+)/(\d+)", "".join(stderr))]
        if done and done[-1][0] >= done[-1][1] // 2 + 2:  # two steps into epoch 1 of 2
            proc.send_signal(signal.SIGTERM)
            break
        time.sleep(0.02)
    proc.wait(timeout=300)
    reader.join(timeout=10)
    message = "".join(stderr).splitlines()[-1]
    assert proc.returncode == 128 + signal.SIGTERM, "".join(stderr)
    step = int(re.search(r"stopped by SIGTERM at epoch 1 step (\d+)", message).group(1))
    position = load_checkpoint(tmp_path / "cut" / "checkpoint.pt")["position"]
    assert position["epoch"] == 1 and position["step"] == step and 0 < step < len(position["batches"])
    assert f"--resume {tmp_path / 'cut'}" in message

    resumed = subprocess.run(cli(kind, "--resume", str(tmp_path / "cut"), "--no_progress"),
                             capture_output=True, text=True, timeout=600)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr
    assert_same_end(tmp_path / "whole", tmp_path / "cut")


@pytest.mark.slow
def test_a_checkpoint_write_that_fails_halfway_leaves_the_previous_one(tmp_path, monkeypatch):
    import fastdarts.checkpoint as checkpoint

    real_fsync, calls = os.fsync, []

    def failing_fsync(fd):  # the second checkpoint's bytes are written, then the disk gives up
        calls.append(fd)
        # config.json and the first checkpoint fsync twice each (the file, then its directory):
        # the fifth call is the second checkpoint's file.
        if len(calls) == 5:
            raise OSError(28, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(checkpoint.os, "fsync", failing_fsync)
    settings = {**SEARCH, "epochs": 3}
    with pytest.raises(CheckpointWriteError, match="previous one is intact"):
        search.run(**settings, out=str(tmp_path / "run"))
    monkeypatch.setattr(checkpoint.os, "fsync", real_fsync)

    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["checkpoint.pt", "config.json", "metrics.jsonl"]
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt")["position"]["epoch"] == 1
    search.run(resume=tmp_path / "run", progress=False)
    search.run(**settings, out=str(tmp_path / "whole"))
    assert_same_end(tmp_path / "whole", tmp_path / "run")


def poison_batches(monkeypatch, at_call: int):
    """From the `at_call`-th training batch on, the images are NaN."""
    real_batch, count = ImageData.batch, [0]

    def batch(self, indices, generator=None, augment=False, cutout=0):
        x, y = real_batch(self, indices, generator, augment, cutout)
        if augment:
            count[0] += 1
            if count[0] >= at_call:
                x = torch.full_like(x, float("nan"))
        return x, y

    monkeypatch.setattr(ImageData, "batch", batch)


@pytest.mark.slow
def test_a_nan_stops_the_run_naming_the_step_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    # Search steps draw two augmented batches (train, then validation): call 17 is epoch 1's third step.
    poison_batches(monkeypatch, at_call=6 * 2 + 2 * 2 + 1)
    expected = r"the validation loss is not finite at epoch 1 step 2; stopped, the last checkpoint"
    with pytest.raises(TrainingDiverged, match=expected):
        search.run(**SEARCH, out=str(tmp_path / "run"))
    saved = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert saved["position"]["epoch"] == 1 and saved["position"]["step"] == 0
    assert all(torch.isfinite(t).all() for t in saved["model"].values() if t.is_floating_point())
    assert len(rows(tmp_path / "run")) == 1


@pytest.mark.slow
def test_on_nan_skip_counts_the_skipped_batches(tmp_path, monkeypatch):
    poison_batches(monkeypatch, at_call=12 + 1)  # train: one batch a step; epoch 1's first step on
    result = train.run(**TRAIN, on_nan="skip", out=str(tmp_path / "run"))
    assert [r["skipped_steps"] for r in result.history] == [0, 12]
    assert all(torch.isfinite(p).all() for p in load_checkpoint(result.run_dir / "checkpoint.pt")["model"].values())


@pytest.mark.slow
def test_cli_divergence_is_one_line_and_status_1(tmp_path):
    result = subprocess.run(cli("train", *flags(TRAIN), "--learning_rate", "1e30", "--out", str(tmp_path / "r")),
                            capture_output=True, text=True, timeout=600)  # fmt: skip
    assert result.returncode == 1, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    pattern = r"error: .*(not finite|non-finite).* at epoch 0 step \d+; stopped, no checkpoint had been written yet"
    assert re.fullmatch(pattern, last), last
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_seeds_report_mean_and_std(tmp_path, capsys):
    train.main([*flags({**TRAIN, "epochs": 1}), "--no_progress", "--seeds", "3,4", "--out", str(tmp_path)])
    summary = json.loads((tmp_path / "seeds.json").read_text())
    assert summary["seeds"] == [3, 4]
    accs = [json.loads((tmp_path / f"seed-{s}" / "result.json").read_text())["test_acc"] for s in (3, 4)]
    assert summary["test_acc"]["values"] == accs
    assert summary["test_acc"]["mean"] == pytest.approx(sum(accs) / 2)
    assert summary["test_acc"]["std"] == pytest.approx(abs(accs[0] - accs[1]) / 2**0.5)
    assert "test_acc:" in capsys.readouterr().out


def test_resume_errors(tmp_path):
    with pytest.raises(FastDartsError, match="not a run directory"):
        search.run(resume=tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FastDartsError, match="no checkpoint to resume from"):
        search.run(resume=tmp_path / "empty")
    (tmp_path / "torn").mkdir()
    (tmp_path / "torn" / "checkpoint.pt").write_bytes(b"PK\x03\x04 not a whole file")
    with pytest.raises(FastDartsError, match="cannot load the checkpoint"):
        train.run(resume=tmp_path / "torn")


@pytest.mark.parametrize("kind", ["search", "train"])
def test_network_size_check_leaves_every_random_stream_as_it_was(kind):
    # It builds the network once more (on the meta device) before the run's own build draws its weights.
    if kind == "search":
        network = functools.partial(SearchNetwork, 4, 10, 3, 1, method=make_method("drnas"))
    else:
        network = functools.partial(NETWORKS["cifar"], BUILTIN_GENOTYPES["DARTS_V2"], 4, 10, 3, True, 1)
    before = torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()
    check_network_fits(network, types.SimpleNamespace(init_channels=4, layers=3), "init_channels", "layers")
    after = torch.get_rng_state(), random.getstate(), np.random.get_state()[1]
    assert torch.equal(before[0], after[0]) and before[1] == after[1] and np.array_equal(before[2], after[2])


def test_resume_refuses_a_network_too_large_for_memory(tmp_path):
    # Found by the fuzzing: a damaged checkpoint's init_channels of 65536 built a network of terabytes, and the
    # kernel killed the process before anything could refuse it.
    train.run(**TRAIN, stop_after=1, out=str(tmp_path / "run"))
    path = tmp_path / "run" / "checkpoint.pt"
    state = torch.load(path, weights_only=False)
    state["config"]["init_channels"] = 65536
    torch.save(state, path)
    with pytest.raises(ConfigError, match=r"init_channels 65536 and layers 3 make a network of [\d,]+ weights, which "
                       r"with their gradients and momentum need [\d,.]+ GiB; this machine has [\d.]+ GiB"):  # fmt: skip
        train.run(resume=tmp_path / "run")


# Found by the fuzzing: `fastdarts.train --init_channels 189812532` made a 1x1 conv whose byte count overflows 64 bits
# (torch's RuntimeError), and `--init_channels 3074457345618258603` a stem of 3 C channels, more than 64 bits hold
# (torch's TypeError, with a C++ stack trace): the meta build's errors, instead of the size check's one line.
@pytest.mark.parametrize("C,reason", [(10**9, "Storage size calculation overflowed"),
                                      (3074457345618258603, "empty(): argument 'size' failed to unpack")])  # fmt: skip
@pytest.mark.parametrize("kind", ["search", "train"])
def test_a_width_that_overflows_64_bits_is_one_line(kind, C, reason):
    if kind == "search":
        network = functools.partial(SearchNetwork, C, 10, 3, 1, method=make_method("darts"))
    else:
        network = functools.partial(NETWORKS["cifar"], BUILTIN_GENOTYPES["DARTS_V2"], C, 10, 3, False, 0)
    config = types.SimpleNamespace(init_channels=C, layers=3)
    with pytest.raises(ConfigError, match=rf"^init_channels {C} and layers 3 make a weight too large to allocate on "
                       rf"any machine \({re.escape(reason)}") as error:  # fmt: skip
        check_network_fits(network, config, "init_channels", "layers")
    assert "\n" not in str(error.value)


@pytest.mark.slow
def test_resume_refuses_other_settings_another_kind_and_a_finished_run(tmp_path):
    search.run(**{**SEARCH, "epochs": 1}, out=str(tmp_path / "done"))
    with pytest.raises(ConfigError, match="already complete"):
        search.run(resume=tmp_path / "done")
    with pytest.raises(ConfigError, match="holds a search run, not a train run"):
        train.run(resume=tmp_path / "done")
    with pytest.raises(ConfigError, match=r"only progress, stop_after, device may be given \(got learning_rate\)"):
        search.run(resume=tmp_path / "done", learning_rate=0.1)


def run_train_cli(*args):
    return subprocess.run(cli("train", *args), capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize(
    "args,message",
    [
        (["--learning_rate", "-0.1"], "learning_rate must be > 0"),
        (["--weight_decay", "-1"], "weight_decay must be >= 0"),
        (["--batch_size", "0"], "batch_size must be >= 1"),
        (["--init_channels", "-4"], "init_channels must be >= 1"),
        (["--layers", "2"], "layers must be >= 3"),
        (["--layers", "1001"], "layers must be <= 1000"),
        (["--init_channels", "30000"], "with their gradients and momentum need"),
        (["--drop_path_prob", "1"], "drop_path_prob must be < 1"),
        (["--epochs", "0"], "epochs must be >= 1"),
        (["--dataset", "cifar10", "--data", "/nonexistent/cifar"], "does not exist"),
        (["--genotype", "DARTS_V9"], "not a built-in genotype"),
        (["--genotype", "NASNet"], "genotype uses op(s) fastdarts cannot build: sep_conv_7x7"),
        (["--genotype", "Genotype(normal=[('sep_conv_3x3', 3)"], "not valid syntax"),
        (["--seeds", "1,x"], "expected comma-separated integers"),
        (["--seeds", "1,2", "--seed", "3"], "--seeds starts one new run per seed"),
        (["--resume", "/nonexistent/run"], "not a run directory"),
        (["--auxiliary", "--no_auxiliary"], "not allowed with argument"),
    ],
)
def test_train_bad_input_gives_one_line_and_status_2(tmp_path, args, message):
    result = run_train_cli(*args, "--out", str(tmp_path / "never"))
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (tmp_path / "never").exists()


def test_train_config_file_errors_and_cifar_directory_with_wrong_files(tmp_path):
    from .test_data import make_cifar_dir

    cfg = tmp_path / "c.yaml"
    cfg.write_text("epochs: 2\ncutout_lenght: 8\n")
    result = run_train_cli("--config", str(cfg))
    assert result.returncode == 2 and "unknown key(s) cutout_lenght" in result.stderr
    root = make_cifar_dir(tmp_path / "cifar")
    (root / "test_batch").unlink()
    result = run_train_cli("--dataset", "cifar10", "--data", str(root), "--out", str(tmp_path / "never"))
    assert result.returncode == 2 and "missing test_batch" in result.stderr
    assert not (tmp_path / "never").exists()


@pytest.mark.slow
def test_train_cli_writes_its_outputs(tmp_path):
    result = run_train_cli(*flags({**TRAIN, "epochs": 1}), "--no_progress", "--genotype", "DARTS_V1",
                           "--out", str(tmp_path / "r"))  # fmt: skip
    assert result.returncode == 0, result.stderr
    out = tmp_path / "r"
    summary = json.loads((out / "result.json").read_text())
    assert summary["parameters"] > 0 and 0 <= summary["test_acc"] <= 1
    assert "M parameters (auxiliary head excluded)" in result.stdout and "test accuracy:" in result.stdout
    assert (out / "genotype.txt").read_text().startswith("Genotype(normal=[('sep_conv_3x3', 1)")
    assert (out / "curves.png").stat().st_size > 0
    assert rows(out)[0]["drop_path_prob"] == 0.0


@pytest.mark.slow
def test_method_comparison_gives_each_method_the_epochs_of_its_budget(tmp_path, capsys):
    from benchmarks.compare_methods import main

    tiny = ["--layers", "3", "--init_channels", "4", "--batch_size", "128", "--no_progress"]
    assert main(["--budget", "0.001", "--seeds", "0,1", "--methods", "darts,pr-darts", "--out", str(tmp_path),
                 *tiny]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert re.search(r"== darts: \d+\.\d s per calibration epoch \(median of 3\) -> 1 epochs per run", printed)
    assert len(rows(tmp_path / "darts" / "calibration")) == 3
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert list(summary["summary"]) == ["darts", "pr-darts"] and summary["seeds"] == [0, 1]
    for method in ("darts", "pr-darts"):
        runs = summary["runs"][method]
        assert [run["epochs"] for run in runs] == [1, 1]
        assert all(0 <= run["val_acc"] <= 1 and 0 <= run["normal_width"] <= 4 for run in runs)
        assert (tmp_path / method / "seed-1" / "genotype.txt").exists()
    assert re.search(r"\| pr-darts \| 0\.\d{4} ± 0\.\d{4} \|", (tmp_path / "summary.md").read_text())
    assert (tmp_path / "compare.png").stat().st_size > 0


def test_method_comparison_refuses_the_flags_it_sets(tmp_path):
    from benchmarks.compare_methods import main

    with pytest.raises(ConfigError, match="--method, --epochs"):
        main(["--out", str(tmp_path), "--epochs", "3"])
