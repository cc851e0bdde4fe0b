import pytest
import torch

from fastdarts import ops

requires_ext = pytest.mark.skipif(not ops.EXTENSION_LOADED, reason="the compiled extension fastdarts._C is not built")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
