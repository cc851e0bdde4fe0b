"""The kernels' loops compiled for plain x86-64, which an AVX-512 machine never runs by itself (cpu_isa.h)."""

import json
import os
import subprocess
import sys
import textwrap


def max_error_on_baseline_loops(code: str) -> float:
    """Runs `code` in a fresh Python process with FASTDARTS_CPU_BASELINE=1, which makes the kernels pick their
    baseline loops, and returns the one JSON number it prints (the largest relative error it found)."""
    environment = os.environ | {"FASTDARTS_CPU_BASELINE": "1"}
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=environment, timeout=300
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)
