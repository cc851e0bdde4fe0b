import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fastdarts import ops
from fastdarts.ops import _registry

from .conftest import requires_ext


class RecordOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.namespaces = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.namespaces.add(func.namespace)
        return func(*args, **(kwargs or {}))


def backend_of_call(device="cpu", **kwargs):
    """Which backend an ops.weighted_sum call ran, told by the ops it dispatched."""
    xs, w = [torch.randn(3, device=device), torch.randn(3, device=device)], torch.randn(2, device=device)
    with RecordOps() as record:
        ops.weighted_sum(xs, w, **kwargs)
    return "cpp" if "fastdarts" in record.namespaces else "reference"


@pytest.fixture
def no_env_backend(monkeypatch):
    """Whatever FASTDARTS_BACKEND the test run was started with, test the rules without it."""
    monkeypatch.setattr(_registry, "_ENV_BACKEND", None)


@requires_ext
def test_cpu_defaults_to_cpp_and_other_devices_to_reference(no_env_backend):
    assert backend_of_call() == "cpp"
    assert backend_of_call(device="meta") == "reference"


@requires_ext
def test_explicit_backend_argument_wins_over_everything(no_env_backend, monkeypatch):
    assert backend_of_call(backend="reference") == "reference"
    with ops.use_backend("reference"):
        assert backend_of_call(backend="cpp") == "cpp"
    monkeypatch.setattr(_registry, "_ENV_BACKEND", "reference")
    assert backend_of_call(backend="cpp") == "cpp"


@requires_ext
def test_use_backend_nests_and_restores(no_env_backend):
    with ops.use_backend("reference"):
        assert backend_of_call() == "reference"
        with ops.use_backend("cpp"):
            assert backend_of_call() == "cpp"
            with ops.use_backend("reference"):
                assert backend_of_call() == "reference"
            assert backend_of_call() == "cpp"
        assert backend_of_call() == "reference"
        with pytest.raises(KeyError):
            with ops.use_backend("cpp"):
                raise KeyError("leaving the block through an exception")
        assert backend_of_call() == "reference"
    assert backend_of_call() == "cpp"


@requires_ext
def test_use_backend_beats_the_environment_variable(monkeypatch):
    monkeypatch.setattr(_registry, "_ENV_BACKEND", "reference")
    assert backend_of_call() == "reference"
    with ops.use_backend("cpp"):
        assert backend_of_call() == "cpp"


def test_unknown_names_are_rejected():
    with pytest.raises(ValueError, match="unknown backend 'fast'; the backends are reference, cpp"):
        ops.use_backend("fast")  # refused when called, before any block starts
    with pytest.raises(ValueError, match="unknown backend 'gpu'"):
        ops.weighted_sum([torch.randn(2)], torch.ones(1), backend="gpu")
    with pytest.raises(ValueError, match="unknown op 'conv9'; the ops are weighted_sum"):
        ops.available_backends("conv9")


@requires_ext
def test_cpp_refuses_tensors_it_cannot_run():
    with pytest.raises(RuntimeError, match="backend 'cpp' runs on cpu tensors only, got meta tensors"):
        ops.weighted_sum([torch.empty(2, device="meta")], torch.empty(1, device="meta"), backend="cpp")


@requires_ext
def test_available_backends_with_the_extension():
    assert ops.BACKENDS == ("reference", "cpp", "triton")
    assert ops.available_backends() == ["reference", "cpp"]
    assert ops.available_backends("weighted_sum", torch.device("cpu")) == ["reference", "cpp"]
    assert ops.available_backends("weighted_sum", "meta") == ["reference"]


def run_python(code, **env):
    """Run `code` in a fresh interpreter, to see what happens at import."""
    environment = {k: v for k, v in os.environ.items() if k != "FASTDARTS_BACKEND"} | env
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=environment, timeout=300
    )


def test_environment_variable_is_validated_at_import():
    result = run_python("import fastdarts", FASTDARTS_BACKEND="bogus")
    assert result.returncode != 0
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("ValueError: FASTDARTS_BACKEND='bogus' is not a fastdarts backend"), result.stderr
    assert "allowed values: reference, cpp" in last_line


def test_environment_variable_sets_the_default():
    code = """
        import json, torch
        from fastdarts import ops
        from fastdarts.ops._registry import select
        cpu = torch.device("cpu")
        chosen = {"default": select("weighted_sum", cpu)}
        if ops.EXTENSION_LOADED:  # both overrides still beat the variable
            chosen["argument"] = select("weighted_sum", cpu, "cpp")
            with ops.use_backend("cpp"):
                chosen["context"] = select("weighted_sum", cpu)
        print(json.dumps(chosen))
    """
    result = run_python(code, FASTDARTS_BACKEND="reference")
    assert result.returncode == 0, result.stderr
    chosen = json.loads(result.stdout)
    assert chosen.pop("default") == "reference"
    assert all(name == "cpp" for name in chosen.values()), chosen


def test_without_the_extension_everything_runs_on_the_reference_after_one_warning():
    code = """
        import json, sys, warnings, torch
        sys.modules["fastdarts._C"] = None  # what a user without a C++ build gets
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            from fastdarts import ops
            xs, w = [torch.ones(2), 2 * torch.ones(2)], torch.tensor([1.0, 3.0])
            outs = [ops.weighted_sum(xs, w).tolist() for _ in range(3)]
        try:
            ops.weighted_sum(xs, w, backend="cpp")
            explicit_cpp = "no error"
        except RuntimeError as error:
            explicit_cpp = str(error)
        print(json.dumps({
            "loaded": ops.EXTENSION_LOADED, "error": ops.EXTENSION_ERROR, "available": ops.available_backends(),
            "outs": outs, "warnings": [str(w.message) for w in caught if "fastdarts" in str(w.message)],
            "explicit_cpp": explicit_cpp,
        }))
    """
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["loaded"] is False and "fastdarts._C" in report["error"]
    assert report["available"] == ["reference"]
    assert report["outs"] == [[7.0, 7.0]] * 3
    assert len(report["warnings"]) == 1 and "fall back to the slower pure-PyTorch reference" in report["warnings"][0]
    assert "backend 'cpp' was requested, but the C++ extension fastdarts._C is not loaded" in report["explicit_cpp"]


requires_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")


@requires_triton
def test_import_leaves_triton_alone_until_cuda_tensors_need_it():
    # Importing triton pulls in torch._dynamo and torch._inductor: seconds every command line would pay.
    code = """
        import json, sys, torch
        import fastdarts
        from fastdarts import ops
        from fastdarts.ops import _registry
        seen = {"import": "triton" in sys.modules}
        ops.weighted_sum([torch.ones(2)], torch.ones(1))
        ops.describe_kernels()
        ops.available_backends()
        ops.available_backends("mixed_op", "meta")
        seen["cpu"] = "triton" in sys.modules
        seen["cuda"] = _registry.select("weighted_sum", torch.device("cuda"))
        seen["after"] = "triton" in sys.modules
        print(json.dumps(seen))
    """
    result = run_python(code, TRITON_INTERPRET="")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"import": False, "cpu": False, "cuda": "triton", "after": True}


DISPATCHED_NAMESPACES = """
    from torch.utils._python_dispatch import TorchDispatchMode

    class RecordOps(TorchDispatchMode):
        namespaces = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.namespaces.add(func.namespace)
            return func(*args, **(kwargs or {}))
"""


@requires_triton
@pytest.mark.parametrize("route", ["argument", "use_backend", "environment"])
def test_triton_is_imported_when_asked_for_by_name(route):
    test = f"""
    import json, sys, torch
    from fastdarts import ops
    before = "triton" in sys.modules
    xs, w = [torch.ones(3), 2 * torch.ones(3)], torch.tensor([1.0, 3.0])
    with RecordOps() as record:
        if {route!r} == "argument":
            out = ops.weighted_sum(xs, w, backend="triton")
        elif {route!r} == "use_backend":
            with ops.use_backend("triton"):
                out = ops.weighted_sum(xs, w)
        else:  # FASTDARTS_BACKEND=triton
            out = ops.weighted_sum(xs, w)
    print(json.dumps({{"before": before, "after": "triton" in sys.modules, "out": out.tolist(),
                      "ran": "fastdarts_triton" in record.namespaces}}))
    """
    env = {"TRITON_INTERPRET": "1"} | ({"FASTDARTS_BACKEND": "triton"} if route == "environment" else {})
    result = run_python(DISPATCHED_NAMESPACES + test, **env)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"before": False, "after": True, "out": [7.0] * 3, "ran": True}


def test_a_triton_that_does_not_import_is_reported_when_asked_for():
    code = """
        import json, sys, torch
        sys.modules["triton"] = None  # what a machine without triton gives
        from fastdarts import ops
        from fastdarts.ops import _registry
        report = {
            "cuda_default": _registry.select("weighted_sum", torch.device("cuda")),
            "cuda_available": ops.available_backends("weighted_sum", "cuda"),
            "loaded": _registry.TRITON_LOADED,
            "error": _registry.TRITON_ERROR,
        }
        try:
            ops.weighted_sum([torch.ones(2)], torch.ones(1), backend="triton")
        except RuntimeError as error:
            report["explicit"] = str(error)
        print(json.dumps(report))
    """
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["cuda_default"] == "reference" and report["cuda_available"] == ["reference"]
    assert report["loaded"] is False and report["error"].endswith("import of triton halted; None in sys.modules")
    assert report["explicit"] == (
        f"fastdarts.ops.weighted_sum: backend 'triton' was requested, but triton did not import ({report['error']}); "
        "install it with `pip install triton`"
    )
