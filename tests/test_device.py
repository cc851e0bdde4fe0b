"""--device: the CPU, or one GPU per process (the GPU path is checked here up to the point where it needs one)."""

import pytest
import torch

from fastdarts import distributed, search
from fastdarts.config import SearchConfig
from fastdarts.errors import ConfigError
from fastdarts.runloop import start_config


def test_cpu_is_the_default_and_needs_nothing():
    assert SearchConfig().device == "cpu"
    assert distributed.run_device("cpu") == torch.device("cpu")


def test_cuda_takes_the_gpu_of_the_local_rank(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert distributed.run_device("cuda") == torch.device("cuda", 0)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert distributed.run_device("cuda") == torch.device("cuda", 1)
    monkeypatch.setenv("LOCAL_RANK", "2")
    with pytest.raises(ConfigError, match="LOCAL_RANK is 2 but only 2 GPUs are visible"):
        distributed.run_device("cuda")


def test_cuda_without_a_gpu_is_a_config_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="device cuda: no GPU is visible"):
        distributed.run_device("cuda")
    with pytest.raises(ConfigError, match="device must be one of cpu, cuda"):
        distributed.run_device("tpu")


def test_process_group_backend_is_gloo_without_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert distributed.process_group_backend() == "gloo"


def test_a_stopped_run_may_resume_on_another_device(tmp_path):
    settings = dict(epochs=2, layers=3, init_channels=2, batch_size=128, progress=False)
    search.run(**settings, stop_after=1, out=str(tmp_path / "run"))
    config, checkpoint = start_config(SearchConfig, "search", resume=tmp_path / "run", device="cpu")
    assert config.device == "cpu" and checkpoint["position"]["epoch"] == 1
    with pytest.raises(ConfigError, match="only progress, stop_after, device may be given"):
        start_config(SearchConfig, "search", resume=tmp_path / "run", epochs=3)
