"""The instruction-set tier of the C++ kernels: chosen from the CPU, forced by FASTDARTS_CPU_ISA, switched by
use_cpu_isa, refused with one line when the CPU cannot run it. (The kernels' results on every tier are checked in
their own test files through the cpu_isa fixture.)"""

import os
import subprocess
import sys

import pytest

from fastdarts import ops

from ..conftest import requires_ext


def cpu_flags() -> set[str]:
    if not os.path.exists("/proc/cpuinfo"):
        return set()
    with open("/proc/cpuinfo") as cpuinfo:
        return set(next((line for line in cpuinfo if line.startswith(("flags", "Features"))), "").split())


def expected_best_tier() -> str:
    flags = cpu_flags()
    if {"avx512f", "avx512vl", "avx512bw", "avx512dq", "avx2", "fma"} <= flags:
        return "avx512"
    return "avx2" if {"avx2", "fma"} <= flags else "baseline"


def run_python(code: str, **environment: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "FASTDARTS_CPU_ISA"} | environment
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)


@requires_ext
def test_the_best_tier_of_this_cpu_is_in_force_by_default():
    if not sys.platform.startswith("linux"):
        pytest.skip("reads the CPU's flags from /proc/cpuinfo")
    result = run_python("from fastdarts import ops; print(ops.cpu_isa(), *ops.supported_cpu_isas())")
    assert result.returncode == 0, result.stderr
    in_force, *supported = result.stdout.split()
    best = expected_best_tier()
    assert in_force == best
    assert supported == list(ops.CPU_ISAS[: ops.CPU_ISAS.index(best) + 1])


@requires_ext
@pytest.mark.parametrize("tier", ops.supported_cpu_isas())
def test_the_environment_forces_a_supported_tier(tier):
    code = "from fastdarts import ops; print(ops.cpu_isa(), ops.describe_kernels())"
    result = run_python(code, FASTDARTS_CPU_ISA=tier)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[0] == tier
    assert f"CPU tier {tier}" in result.stdout


@requires_ext
def test_an_unknown_tier_in_the_environment_is_one_line_from_the_api_the_kernels_and_the_search():
    message = "FASTDARTS_CPU_ISA: unknown CPU tier 'sse9' (baseline, avx2 or avx512)"
    for call in ("ops.cpu_isa()", "ops.pool_bn_stats(torch.ones(1, 1, 2, 2), 1)"):
        code = f"import torch\nfrom fastdarts import ops\ntry:\n    {call}\nexcept ValueError as e:\n    print(e)"
        result = run_python(code, FASTDARTS_CPU_ISA="sse9")
        assert result.stdout.strip().splitlines() == [message], call
    # the search stops before it writes anything
    result = run_python(
        "import sys, fastdarts.search, fastdarts.config; sys.argv[1:] = ['--epochs', '1']; "
        "sys.exit(fastdarts.config.run_cli(fastdarts.search.main))",
        FASTDARTS_CPU_ISA="sse9",
    )
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: {message}"


@requires_ext
def test_a_tier_the_cpu_lacks_is_refused_naming_its_best_tier():
    best = ops.supported_cpu_isas()[-1]
    if best == "avx512":
        pytest.skip("this CPU runs every tier")
    beyond = ops.CPU_ISAS[ops.CPU_ISAS.index(best) + 1]
    with pytest.raises(ValueError, match=f"^use_cpu_isa: this CPU cannot run tier {beyond}; its best tier is {best}$"):
        ops.use_cpu_isa(beyond).__enter__()
    result = run_python("from fastdarts import ops; ops.cpu_isa()", FASTDARTS_CPU_ISA=beyond)
    assert f"FASTDARTS_CPU_ISA: this CPU cannot run tier {beyond}; its best tier is {best}" in result.stderr


@requires_ext
def test_use_cpu_isa_switches_and_restores_even_on_errors():
    before = ops.cpu_isa()
    with ops.use_cpu_isa("baseline"):
        assert ops.cpu_isa() == "baseline"
    assert ops.cpu_isa() == before
    with pytest.raises(KeyError), ops.use_cpu_isa("baseline"):
        raise KeyError("inside")
    assert ops.cpu_isa() == before
    with pytest.raises(ValueError, match=r"^use_cpu_isa: unknown CPU tier 'fast' \(baseline, avx2 or avx512\)$"):
        ops.use_cpu_isa("fast").__enter__()
    assert ops.cpu_isa() == before
