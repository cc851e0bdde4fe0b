"""What the benchmark scripts share to run on a CUDA device as well as on the CPU: the device, the timers, the peak
device memory, the FLOP count, and the achieved GB/s and GFLOP/s with the peaks they are compared against.

- Device: CUDA when `torch.cuda.is_available()`, else the CPU.
- Timers take `fn` (one forward + backward, or one search step) and return the seconds of each timed call. On CUDA,
  `triton.testing.do_bench` times with CUDA events: one warm-up call, then about `warmup_ms` of untimed and
  `rep_ms` of timed calls, with the L2 cache flushed before each timed call (cold-cache times, as a call inside a
  training step sees). On the CPU, `time.perf_counter` around each of `repeats` calls after one warm-up.
- Peak memory (CUDA only): `torch.cuda.max_memory_allocated` over one call after the timing, reset just before it:
  every tensor allocated during the call, the case's inputs included.
- CPU tier: `--cpu_isa baseline|avx2|avx512` runs the benchmark as on a CPU of that tier, fastdarts and eager
  PyTorch alike: the process restarts itself with FASTDARTS_CPU_ISA, ATEN_CPU_CAPABILITY, ONEDNN_MAX_CPU_ISA and
  MKL_ENABLE_INSTRUCTIONS set (CPU_TIERS), which must be in place before torch starts. `cpu_line()` says which
  CPU ran and which tier each library used.
- GFLOP/s = FLOPs / median seconds / 1e9 and GB/s = bytes / median seconds / 1e9, with the FLOPs and bytes of
  each script's docstring. The peaks come from --peak_gbps / --peak_gflops when given, else from DEVICE_PEAKS by
  device name, else there are none (no fraction of peak is printed); the report says which.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode, conv_flop_count

from fastdarts import ops
from fastdarts.memory import keep_freed_memory

TRITON_SKIPPED = "triton: skipped, no CUDA device (Triton kernels run on CPU only under TRITON_INTERPRET=1)"

# Datasheet peaks of NVIDIA GPUs: (name as it occurs, as a whole word, in torch.cuda.get_device_name(), memory GB/s,
# float32 GFLOP/s without tensor cores). The first match wins, so the specific names come first. With
# torch.backends.cudnn.allow_tf32 (PyTorch's default) the dense convs of the mixed op and the network may run on
# TF32 tensor cores and exceed the float32 peak; the depthwise convs and element-wise ops do not.
DEVICE_PEAKS: tuple[tuple[str, float, float], ...] = (
    ("H100 PCIe", 2000, 51200),
    ("H100", 3350, 66900),  # SXM5
    ("A100-SXM4-80GB", 2039, 19500),
    ("A100 80GB PCIe", 1935, 19500),
    ("A100", 1555, 19500),  # 40 GB
    ("A10", 600, 31200),
    ("L4", 300, 30300),
    ("T4", 320, 8100),
    ("V100", 900, 15700),  # SXM2
)

Timer = Callable[[Callable[[], object]], list[float]]

# A benchmark's child process (one case) that runs longer than this is stuck: the benchmark fails instead of hanging.
CHILD_TIMEOUT_SECONDS = 3600


# The environment that makes fastdarts and eager PyTorch (ATen's kernels, oneDNN, MKL) run as on a CPU whose best
# tier is the key: an AVX2 machine is emulated on an AVX-512 one (oneDNN and MKL honour these limits, see
# ONEDNN_VERBOSE=1 and MKL_VERBOSE=1), a baseline one (SSE4.1 for oneDNN, SSE4.2 for MKL) on either.
CPU_TIERS: dict[str, dict[str, str]] = {
    "baseline": {"FASTDARTS_CPU_ISA": "baseline", "ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41",
                 "MKL_ENABLE_INSTRUCTIONS": "SSE4_2"},
    "avx2": {"FASTDARTS_CPU_ISA": "avx2", "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2",
             "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
    "avx512": {"FASTDARTS_CPU_ISA": "avx512", "ATEN_CPU_CAPABILITY": "avx512", "ONEDNN_MAX_CPU_ISA": "AVX512_CORE",
               "MKL_ENABLE_INSTRUCTIONS": "AVX512"},
}  # fmt: skip


def add_cpu_isa_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--cpu_isa", choices=list(CPU_TIERS), default=None,
        help="run fastdarts and eager PyTorch as on a CPU of this tier (default: this CPU's best, unlimited)",
    )  # fmt: skip


def prepare_process(parser: argparse.ArgumentParser | None = None, tier: str | None = None) -> None:
    """Set this process up as the command-line runs set up theirs (fastdarts.memory.keep_freed_memory), for every
    provider alike; with a tier, first restart it with CPU_TIERS[tier] in its environment, unless it is there."""
    _apply_cpu_isa(parser, tier)
    global FREED_MEMORY_KEPT
    FREED_MEMORY_KEPT = keep_freed_memory()


FREED_MEMORY_KEPT = False  # whether prepare_process made glibc keep freed memory


def _apply_cpu_isa(parser: argparse.ArgumentParser | None, tier: str | None) -> None:
    if tier is None:
        return
    assert parser is not None, "a tier comes from a command line"
    if tier not in ops.supported_cpu_isas():
        parser.error(f"--cpu_isa: this CPU cannot run tier {tier}; it runs {', '.join(ops.supported_cpu_isas())}")
    environment = CPU_TIERS[tier]
    if any(os.environ.get(k) != v for k, v in environment.items()):
        sys.stdout.flush()
        os.execve(sys.executable, [sys.executable, *sys.argv], os.environ | environment)


def cpu_model() -> str:
    """The CPU's model name and its vector flags, from /proc/cpuinfo (Linux), else what platform knows."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            lines = cpuinfo.read().splitlines()
    except OSError:
        return platform.processor() or platform.machine()
    fields = dict(line.split(":", 1) for line in lines if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    flags = [f for f in fields.get("flags", fields.get("Features", "")).split() if f in ("avx2", "fma", "avx512f")]
    model = fields.get("model name", platform.machine())
    family = f", family {fields['cpu family']} model {fields['model']}" if "cpu family" in fields else ""
    return f"{model}{family} ({' '.join(flags) or 'no avx2/fma/avx512f'})"


def cpu_line() -> str:
    """Which CPU ran, and the tier fastdarts's kernels, ATen's and oneDNN's used."""
    onednn = os.environ.get("ONEDNN_MAX_CPU_ISA", "its best")
    return (f"CPU: {cpu_model()}; fastdarts tier {ops.cpu_isa()}, ATen {torch.backends.cpu.get_cpu_capability()}, "
            f"oneDNN up to {onednn}, {torch.get_num_threads()} threads, freed memory "
            f"{'kept for reuse' if FREED_MEMORY_KEPT else 'as the allocator decides'}")  # fmt: skip


def benchmark_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


def cpu_timer(repeats: int) -> Timer:
    def time_calls(fn):
        fn()  # warm-up: allocator, one-time dispatch work, compilation
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return times

    return time_calls


def cuda_timer(warmup_ms: float = 25, rep_ms: float = 100) -> Timer:
    def time_calls(fn):
        from triton.testing import do_bench  # here: only CUDA runs need triton

        return [ms / 1e3 for ms in do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="all")]

    return time_calls


def timer_for(device: torch.device, repeats: int, rep_ms: float = 100) -> tuple[Timer, str]:
    """The timer for `device` and its description for the report."""
    if device.type == "cuda":
        return cuda_timer(rep_ms=rep_ms), f"CUDA events (triton.testing.do_bench, rep={rep_ms:g} ms, L2 flushed)"
    return cpu_timer(repeats), f"time.perf_counter, {repeats} timed call(s) after one warm-up"


def measure(fn: Callable[[], object], timer: Timer, device: torch.device) -> dict:
    """Median and every timed call of `fn`, and on CUDA the peak bytes allocated during one more call."""
    times = timer(fn)
    result = {"median_seconds": statistics.median(times), "all_seconds": [round(t, 7) for t in times]}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        result["peak_memory_bytes"] = torch.cuda.max_memory_allocated(device)
    return result


def _conv_backward_flops(
    grad_out_shape,
    x_shape,
    w_shape,
    _bias,
    _stride,
    _padding,
    _dilation,
    transposed,
    _output_padding,
    _groups,
    output_mask,
    out_shape=None,
    **kwargs,
) -> int:
    """grad_input and grad_weight each take the multiply-adds of the forward. (torch.utils.flop_counter's own formula
    ignores the groups of grad_weight: C times too many for a depthwise conv, whose weight gradient it counts as a
    dense conv's.)"""
    forward = conv_flop_count(x_shape, w_shape, grad_out_shape, transposed)
    return forward * (int(output_mask[0]) + int(output_mask[1]))


def count_flops(fn: Callable[[], object]) -> int:
    """The FLOPs of one call of `fn` as torch.utils.flop_counter counts them, with the weight gradients of grouped
    convs corrected: matmuls and convolutions, forward and backward, a multiply-add as 2, padding taps included
    (element-wise ops, BN and pools are not counted)."""
    corrected = {torch.ops.aten.convolution_backward: _conv_backward_flops}
    with FlopCounterMode(display=False, custom_mapping=corrected) as counter:
        fn()
    return counter.get_total_flops()


def add_peak_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--peak_gbps",
        type=float,
        default=None,
        help="the device's memory bandwidth in GB/s (default: DEVICE_PEAKS by device name, else none)",
    )
    parser.add_argument(
        "--peak_gflops",
        type=float,
        default=None,
        help="the device's float32 GFLOP/s (default: DEVICE_PEAKS by device name, else none)",
    )


def check_peak_flags(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    for flag in ("peak_gbps", "peak_gflops"):
        value = getattr(args, flag)
        if value is not None and not (math.isfinite(value) and value > 0):
            parser.error(f"--{flag}: must be a positive number, got {value}")


def device_peaks(name: str, peak_gbps: float | None = None, peak_gflops: float | None = None) -> dict:
    """The peaks to compare against and where they come from: the flags first, then DEVICE_PEAKS."""
    entry = next((e for e in DEVICE_PEAKS if re.search(rf"\b{re.escape(e[0])}\b", name)), None)
    sources = []
    if peak_gbps is not None or peak_gflops is not None:
        sources.append("from --peak_gbps/--peak_gflops")
    if entry is not None and (peak_gbps is None or peak_gflops is None):
        sources.append(f"from the datasheet table entry {entry[0]!r} (benchmarks/_device.py)")
        peak_gbps = entry[1] if peak_gbps is None else peak_gbps
        peak_gflops = entry[2] if peak_gflops is None else peak_gflops
    return {
        "device": name,
        "peak_gbps": peak_gbps,
        "peak_gflops": peak_gflops,
        "peaks_from": " and ".join(sources) or "none: unknown device, pass --peak_gbps and --peak_gflops",
    }


def throughput(seconds: float, peaks: dict, flops: int | None = None, nbytes: int | None = None) -> dict:
    """Achieved GFLOP/s and GB/s (1 GB = 1e9 bytes) and their fractions of the peaks that are known."""
    result = {}
    for key, amount, rate_key, peak_key in (
        ("flops", flops, "gflops_per_s", "peak_gflops"),
        ("bytes", nbytes, "gbps", "peak_gbps"),
    ):
        if amount is None:
            continue
        rate = amount / seconds / 1e9
        result[key], result[rate_key] = amount, rate
        if peaks.get(peak_key):
            result[f"fraction_of_{peak_key}"] = rate / peaks[peak_key]
    return result


def describe(result: dict) -> str:
    """`, 12.3 GFLOP/s (4% of peak), 45.6 GB/s (...)`, and the CUDA peak memory, for the table output."""
    parts = []
    for rate_key, unit, peak_key in (("gflops_per_s", "GFLOP/s", "peak_gflops"), ("gbps", "GB/s", "peak_gbps")):
        if rate_key in result:
            fraction = result.get(f"fraction_of_{peak_key}")
            parts.append(f"{result[rate_key]:8.1f} {unit}" + (f" ({100 * fraction:4.1f}% of peak)" if fraction else ""))
    if "peak_memory_bytes" in result:
        parts.append(f"peak allocated {result['peak_memory_bytes'] / 2**20:7.1f} MiB")
    return "".join(f", {p}" for p in parts)
