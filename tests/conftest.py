import pytest
import torch

from fastdarts import ops

# Marks tests that need the compiled fastdarts._C (the `ext` marker); they are skipped, not
# failed, when it is not built. Works as a decorator and in pytest.param(..., marks=requires_ext).
requires_ext = pytest.mark.ext


def pytest_collection_modifyitems(config, items):
    if ops.EXTENSION_LOADED:
        return
    skip = pytest.mark.skip(reason=f"needs the compiled extension fastdarts._C ({ops.EXTENSION_ERROR})")
    for item in items:
        if item.get_closest_marker("ext") is not None:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)
