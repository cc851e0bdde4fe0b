"""Search and training over 2 processes with torchrun (gloo, 1 thread each), as fastdarts.distributed describes."""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
import torch

from fastdarts import search, train
from fastdarts.checkpoint import load_checkpoint
from fastdarts.data import part_slice
from fastdarts.evalnet import EvalNetwork
from fastdarts.supernet import SearchNetwork

from .test_runs import assert_same_end

WORKER = Path(__file__).with_name("distributed_worker.py")
ROOT = Path(__file__).resolve().parents[1]
# Tiny runs: a search epoch is 6 steps (718 images, global batch 128), a training epoch 12 (1437 images).
SEARCH = ["--epochs", "1", "--layers", "3", "--init_channels", "2", "--batch_size", "128"]
# Training takes 2 epochs: drop path starts at 0 in the first.
TRAIN = ["--epochs", "2", "--layers", "3", "--init_channels", "4", "--batch_size", "128"]
DRNAS_WIDENING = ["--epochs", "2", "--layers", "3", "--init_channels", "4", "--batch_size", "128", "--method", "drnas",
                  "--drnas_k", "2", "--drnas_k_first", "4"]  # fmt: skip
KINDS = {
    "search": ("search", SEARCH),
    "search-unrolled": ("search", [*SEARCH, "--unrolled"]),
    "search-prdarts": ("search", [*SEARCH, "--method", "pr-darts"]),
    # DrNAS widens its ops from 1/4 to 1/2 of the channels at epoch 1: the weights' DDP wrapper is rebuilt.
    "search-drnas-widening": ("search", DRNAS_WIDENING),
    "train": ("train", TRAIN),
}
MODULES = {"search": search, "train": train}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(processes: int, kind: str, dumps: Path, *flags: str) -> list[str]:
    """The command that runs fastdarts.`kind` in `processes` processes; each saves its final state in `dumps`."""
    dumps.mkdir(parents=True, exist_ok=True)
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}", "--master_addr=127.0.0.1",
            f"--master_port={free_port()}", str(WORKER), kind, str(dumps), *flags]  # fmt: skip


def environment(**extra) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **extra}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    """`get(kind)`: the run directory, the per-process states and the output of a 2-process run (made once)."""
    made = {}

    def get(kind):
        if kind not in made:
            module, flags = KINDS[kind]
            base = tmp_path_factory.mktemp(kind)
            result = subprocess.run(torchrun(2, module, base / "dumps", *flags, "--no_progress", "--out",
                                             str(base / "run")), capture_output=True, text=True, timeout=600,
                                    env=environment())  # fmt: skip
            assert result.returncode == 0, result.stderr[-3000:]
            made[kind] = base / "run", base / "dumps", result
        return made[kind]

    return get


def assert_same(a, b, where="state"):
    """Bit-identical nested state: tensors, numbers, strings, in dicts, lists and tuples."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif hasattr(a, "shape"):  # NumPy's generator state
        assert (a == b).all(), where
    else:
        assert a == b, where


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_both_processes_end_identical_and_write_one_run(two_processes, kind):
    run_dir, dumps, result = two_processes(kind)
    first, second = (torch.load(dumps / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    # Weights, architecture parameters, BN statistics, optimizer states, PR-DARTS's gates, every random stream.
    assert_same(first, second)
    checkpoint = load_checkpoint(run_dir / "checkpoint.pt")
    assert checkpoint["complete"]
    for name in first.keys() - {"rng"}:
        assert_same(first[name], checkpoint[name], name)
    assert not any("rank" in p.name for p in run_dir.iterdir())
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    epochs = int(KINDS[kind][1][1])
    assert [r["epoch"] for r in rows] == list(range(epochs))
    # Process 0 alone prints; the batch flag is the global batch.
    assert result.stdout.count("epoch 0:") == 1 and result.stdout.count(f"epoch {epochs - 1}:") == 1
    assert result.stdout.count("global batch 128: 64 images on each of 2 processes") == 1


def split_batch_norm(forward):
    """`forward` of a network in training mode run on each half of the batch (batch norm then takes statistics
    per half, as it does per process), drop-path masks drawn once for the whole batch as every process does."""

    def halves(self, x):
        if not self.training:
            return forward(self, x)
        rng, outputs = torch.get_rng_state(), []
        for i, part in enumerate(x.tensor_split(2)):
            torch.set_rng_state(rng)
            if isinstance(self, EvalNetwork):
                self.drop_path_part = (len(x), part_slice(len(x), (i, 2)))
            outputs.append(forward(self, part))
        if isinstance(self, EvalNetwork):
            self.drop_path_part = None
            logits, aux = zip(*outputs)
            return torch.cat(logits), torch.cat(aux)
        return torch.cat(outputs)

    return halves


def largest_difference(a: dict, b: dict) -> float:
    return max(float((a[n] - b[n]).abs().max()) for n in a if a[n].is_floating_point() and "running" not in n)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["search", "train"])
def test_two_processes_compute_what_one_computes_with_batch_norm_per_half(two_processes, kind, tmp_path,
                                                                          monkeypatch, one_thread):  # fmt: skip
    """First order, global batch 128: 2 processes end where 1 process ends when its batch norm takes statistics
    over each half of the batch. With statistics over the whole batch (a plain run) they do not."""
    module, flags = KINDS[kind]
    run_dir, _, _ = two_processes(kind)
    two = load_checkpoint(run_dir / "checkpoint.pt")["model"]
    MODULES[module].main([*flags, "--no_progress", "--out", str(tmp_path / "plain")])
    network = SearchNetwork if module == "search" else EvalNetwork
    monkeypatch.setattr(network, "forward", split_batch_norm(network.forward))
    MODULES[module].main([*flags, "--no_progress", "--out", str(tmp_path / "halves")])
    halves = load_checkpoint(tmp_path / "halves" / "checkpoint.pt")["model"]
    plain = load_checkpoint(tmp_path / "plain" / "checkpoint.pt")["model"]
    for name, tensor in two.items():
        if tensor.is_floating_point() and "running" not in name:  # weights and alphas (running BN: per process)
            torch.testing.assert_close(tensor, halves[name], rtol=1e-4, atol=1e-5, msg=name)
    assert largest_difference(plain, two) > 30 * largest_difference(halves, two)


def worker_pid(marker: str, rank: int, timeout: float = 60) -> int:
    """The process of `rank` among those launched with the environment variable FASTDARTS_TEST_RUN=marker."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                env = (entry / "environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if f"FASTDARTS_TEST_RUN={marker}".encode() in env and f"RANK={rank}".encode() in env:
                if b"LOCAL_RANK=" + str(rank).encode() in env:
                    return int(entry.name)
        time.sleep(0.05)
    raise AssertionError(f"no process of rank {rank} found")


@pytest.mark.slow
def test_sigterm_to_one_process_stops_both_with_a_checkpoint_and_the_resumed_run_ends_as_the_whole(
    two_processes, tmp_path
):
    whole, _, _ = two_processes("search")
    marker = uuid.uuid4().hex
    proc = subprocess.Popen(torchrun(2, "search", tmp_path / "dumps", *SEARCH, "--out", str(tmp_path / "cut")),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=environment(FASTDARTS_TEST_RUN=marker))  # fmt: skip
    stderr = []
    reader = threading.Thread(target=lambda: stderr.extend(iter(lambda: proc.stderr.read(1), "")), daemon=True)
    reader.start()
    second = worker_pid(marker, 1)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        done = [int(a) for a, _ in re.findall(r"(\d+)/(\d+) \[", "".join(stderr))]
        if done and done[-1] >= 2:  # two steps of the epoch's six done: SIGTERM to process 1 alone
            os.kill(second, signal.SIGTERM)
            break
        time.sleep(0.02)
    proc.wait(timeout=300)
    reader.join(timeout=10)
    text = "".join(stderr)
    assert proc.returncode != 0, text[-3000:]
    stops = re.findall(r"stopped by SIGTERM at epoch 0 step (\d+)", text)
    assert len(stops) == 1, text[-3000:]  # said once, by process 0
    assert f"torchrun --nproc_per_node=N -m fastdarts.search --resume {tmp_path / 'cut'}" in text
    position = load_checkpoint(tmp_path / "cut" / "checkpoint.pt")["position"]
    assert position["epoch"] == 0 and position["step"] == int(stops[0]) and 2 <= position["step"] < 6
    shutil.copytree(tmp_path / "cut", tmp_path / "cut-one-process")

    resumed = subprocess.run(torchrun(2, "search", tmp_path / "dumps", "--resume", str(tmp_path / "cut"),
                                      "--no_progress"), capture_output=True, text=True, timeout=600,
                             env=environment())  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_end(whole, tmp_path / "cut")

    # Another number of processes resumes the same checkpoint (batch norm's statistics then come from other parts).
    search.main(["--resume", str(tmp_path / "cut-one-process"), "--no_progress"])
    assert load_checkpoint(tmp_path / "cut-one-process" / "checkpoint.pt")["complete"]


@pytest.mark.slow
def test_a_nan_in_one_process_stops_both_with_one_line(tmp_path):
    # A search step makes two augmented batches (training, validation): process 1's 5th is step 2's training batch.
    result = subprocess.run(torchrun(2, "search", tmp_path / "dumps", *SEARCH, "--no_progress", "--out",
                                     str(tmp_path / "r")), capture_output=True, text=True, timeout=600,
                            env=environment(FASTDARTS_TEST_NAN="1,5"))  # fmt: skip
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    expected = r"error: the validation loss is not finite at epoch 0 step 2; stopped, no checkpoint had been written"
    assert len(errors) == 1 and re.match(expected, errors[0]), result.stderr[-3000:]
    assert not re.search(r'File ".*fastdarts', result.stderr), result.stderr  # torchrun's own report aside
    assert not (tmp_path / "r" / "checkpoint.pt").exists()


@pytest.mark.slow
def test_with_on_nan_skip_both_processes_skip_the_same_steps(tmp_path):
    # Training makes one augmented batch a step: process 1's images are NaN from step 8 of 12 on.
    result = subprocess.run(torchrun(2, "train", tmp_path / "dumps", *TRAIN[:1], "1", *TRAIN[2:], "--no_progress",
                                     "--on_nan", "skip", "--out", str(tmp_path / "r")), capture_output=True,
                            text=True, timeout=600, env=environment(FASTDARTS_TEST_NAN="1,9"))  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert [json.loads(line)["skipped_steps"] for line in (tmp_path / "r" / "metrics.jsonl").open()] == [4]
    first, second = (torch.load(tmp_path / "dumps" / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert_same(first, second)


def test_part_slice_splits_as_tensor_split():
    for n, count in ((1, 1), (5, 2), (6, 2), (7, 3), (128, 3)):
        for i, part in enumerate(torch.arange(n).tensor_split(count)):
            assert torch.equal(torch.arange(n)[part_slice(n, (i, count))], part)
    assert part_slice(5, None) == slice(None)


@pytest.mark.parametrize("data", ["digits", "folder", "imagenet"])
def test_the_parts_of_a_batch_are_the_whole_batch(tmp_path, data):
    """Each process makes its part of a global batch, every image augmented (crop, flip, cutout, ImageNet's
    resized crop and jitter) exactly as in the whole batch."""
    from fastdarts.data import BatchJob, load_dataset

    from .test_datasets import make_image_folder

    if data == "digits":
        images = load_dataset("digits")
    else:
        root = make_image_folder(tmp_path / "f", layout="train_val", per_class=4, fmt="JPEG")
        images = load_dataset(data, root, "train", image_size=16, workers=0, preload_mb=0)
    indices = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))[:11]
    for seed, cutout in ((None, 0), (7, 0), (7, 4)):
        x, y = images.make(BatchJob(indices, seed, cutout))
        for count in (2, 3):
            parts = [images.make(BatchJob(indices, seed, cutout, (i, count))) for i in range(count)]
            assert torch.equal(torch.cat([p[0] for p in parts]), x) and torch.equal(torch.cat([p[1] for p in parts]), y)
