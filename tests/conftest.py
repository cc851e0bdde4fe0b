import os

import pytest
import torch

from fastdarts import ops

# Marks tests that need the compiled fastdarts._C (the `ext` marker); they are skipped, not
# failed, when it is not built. Works as a decorator and in pytest.param(..., marks=requires_ext).
requires_ext = pytest.mark.ext


def pytest_configure(config):
    # pytest-xdist runs one worker per core (pyproject's `-n auto`): each computes on one thread, as do the
    # processes its tests start, since workers that each start a pool of every core's threads thrash.
    if os.environ.get("PYTEST_XDIST_WORKER"):
        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    if ops.EXTENSION_LOADED:
        return
    skip = pytest.mark.skip(reason=f"needs the compiled extension fastdarts._C ({ops.EXTENSION_ERROR})")
    for item in items:
        if item.get_closest_marker("ext") is not None:
            item.add_marker(skip)


def pytest_generate_tests(metafunc):
    # A test that takes the `cpu_isa` fixture runs once per instruction-set tier this CPU supports.
    if "cpu_isa" in metafunc.fixturenames:
        metafunc.parametrize("cpu_isa", ops.supported_cpu_isas() or ["none"], indirect=True)


@pytest.fixture
def cpu_isa(request):
    """The C++ kernels run on tier request.param (one of ops.supported_cpu_isas()) for the test."""
    if request.param == "none":
        pytest.skip(f"needs the compiled extension fastdarts._C ({ops.EXTENSION_ERROR})")
    with ops.use_cpu_isa(request.param):
        yield request.param


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)


@pytest.fixture
def one_thread():
    """Torch on one thread for the test: for runs compared with processes of one thread each (torchrun's, a study's
    children), since the sums of a float reduction, and so the last bits of a run, depend on the thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
