import subprocess
import sys

import pytest
import torch

from fastdarts import ops
from fastdarts.ops import _registry

from .conftest import requires_ext


def calls(monkeypatch):
    """Record which backend each weighted_sum call reaches."""
    seen = []
    row = _registry.TABLE["weighted_sum"]
    for name, fn in list(row.items()):
        monkeypatch.setitem(row, name, lambda xs, w, _n=name, _f=fn: seen.append(_n) or _f(xs, w))
    return seen


@requires_ext
def test_default_on_cpu_is_cpp_and_overrides_nest(monkeypatch):
    seen = calls(monkeypatch)
    xs, w = [torch.randn(3)], torch.ones(1)
    ops.weighted_sum(xs, w)
    with ops.use_backend("reference"):
        ops.weighted_sum(xs, w)
        with ops.use_backend("cpp"):
            ops.weighted_sum(xs, w)
        ops.weighted_sum(xs, w)
        ops.weighted_sum(xs, w, backend="cpp")  # the call's own argument wins
    ops.weighted_sum(xs, w)
    assert seen == ["cpp", "reference", "cpp", "reference", "cpp", "cpp"]


def test_unknown_backend_names_are_rejected():
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        with ops.use_backend("fast"):
            pass
    with pytest.raises(ValueError, match="unknown backend 'gpu'"):
        ops.weighted_sum([torch.randn(2)], torch.ones(1), backend="gpu")


def test_use_backend_restores_after_an_exception():
    with pytest.raises(KeyError):
        with ops.use_backend("reference"):
            raise KeyError
    assert _registry._forced == []


@requires_ext
def test_available_backends():
    assert ops.available_backends() == ["reference", "cpp"]
    assert ops.available_backends("weighted_sum", "meta") == ["reference"]
    with pytest.raises(ValueError, match="unknown op"):
        ops.available_backends("conv9")


def test_cpp_backend_refuses_other_devices():
    if not ops.EXTENSION_LOADED:
        pytest.skip("extension not built")
    with pytest.raises(RuntimeError, match="cannot run on meta tensors"):
        ops.weighted_sum([torch.empty(2, device="meta")], torch.empty(1, device="meta"), backend="cpp")


def run_python(code, **env):
    import os

    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, **env})


def test_environment_variable_is_validated_and_used():
    bad = run_python("import fastdarts", FASTDARTS_BACKEND="bogus")
    assert bad.returncode != 0 and "FASTDARTS_BACKEND: unknown backend 'bogus'" in bad.stderr
    good = run_python(
        "import torch; from fastdarts.ops import _registry as r; "
        "print(r.resolve('weighted_sum', torch.device('cpu')).__module__)",
        FASTDARTS_BACKEND="reference",
    )
    assert good.returncode == 0 and good.stdout.strip() == "fastdarts.ops.reference"


def test_missing_extension_falls_back_to_reference_with_one_warning():
    # Block the compiled module to see what a user without a C++ build gets.
    code = (
        "import sys, warnings, torch\n"
        "sys.modules['fastdarts._C'] = None\n"
        "from fastdarts import ops\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    for _ in range(3): ops.weighted_sum([torch.ones(2)], torch.ones(1))\n"
        "print(ops.EXTENSION_LOADED, ops.available_backends(), len(caught))\n"
        "try:\n"
        "    ops.weighted_sum([torch.ones(2)], torch.ones(1), backend='cpp')\n"
        "except RuntimeError as e:\n"
        "    print(e)\n"
    )
    result = run_python(code)
    lines = result.stdout.splitlines()
    assert lines[0] == "False ['reference'] 1", result.stderr
    assert "backend 'cpp' is not available (the extension did not load" in lines[1]
