"""What makes a long run safe to stop: atomic checkpoints, every random stream's state, and
signal handling that lets the current step finish and save before the process exits."""

from __future__ import annotations

import io
import os
import random
import signal
import stat
import tempfile
import threading
import zipfile
from pathlib import Path

import numpy as np
import torch

from .errors import CheckpointWriteError, FastDartsError, path_stat, summary


def atomic_write_bytes(path: str | Path, payload: bytes) -> None:
    """Write to a temporary file beside `path`, fsync it, then rename it over `path`: a crash at
    any point leaves either the old file or the new one, never a torn one."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def save_checkpoint(path: str | Path, state: dict) -> None:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    try:
        atomic_write_bytes(path, buffer.getvalue())
    except OSError as e:
        raise CheckpointWriteError(f"cannot write the checkpoint {path} ({e}); the previous one is intact") from None


# What every run's checkpoint holds besides its stateful objects (runloop.Run.save), and of which type.
RUN_FIELDS: dict[str, type] = {"kind": str, "config": dict, "position": dict, "rng": dict, "complete": bool}


def load_checkpoint(path: str | Path) -> dict:
    """A run's checkpoint; a missing, torn or foreign file is a FastDartsError naming it."""
    path = Path(path)
    found = path_stat(path, "checkpoint")
    if found is None or not stat.S_ISREG(found.st_mode):
        raise FastDartsError(f"{path}: no checkpoint to resume from")
    try:
        # Every member's CRC first: a damaged byte would otherwise load as a wrong weight, or make torch.load
        # fail part-way, printing messages of its own.
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
        # Our own file: it holds Python RNG states and config dicts, so not weights_only.
        state = None if damaged else torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # a truncated or foreign file: name it in one line
        raise FastDartsError(f"{path}: cannot load the checkpoint ({summary(e)})") from None
    if damaged:
        raise FastDartsError(f"{path}: cannot load the checkpoint ({damaged} fails its checksum: the file is damaged)")
    if not isinstance(state, dict):
        raise FastDartsError(f"{path}: not a fastdarts run checkpoint (it holds a {type(state).__name__})")
    wrong = [key for key, kind in RUN_FIELDS.items() if not isinstance(state.get(key), kind)]
    if wrong:
        raise FastDartsError(f"{path}: not a fastdarts run checkpoint (no valid {', '.join(wrong)})")
    return state


def rng_state(generator: torch.Generator) -> dict:
    """Every random stream a run draws from: Python, NumPy, torch's global one and the run's own."""
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "generator": generator.get_state(),
    }


def set_rng_state(state: dict, generator: torch.Generator) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    generator.set_state(state["generator"])


class RunInterrupted(Exception):
    """A run stopped by SIGINT or SIGTERM after saving a checkpoint; `status` is the exit status."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


class StopSignals:
    """Inside the block SIGINT and SIGTERM only set `signum`, so the loop can finish its step,
    save and stop. A second signal interrupts at once. Off the main thread nothing is installed."""

    signum: int | None = None

    def __enter__(self) -> StopSignals:
        self.signum = None
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc) -> bool:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False
