"""Time the 1x1 conv inside relu_dwconv_pointwise: fastdarts's register tiles against oneDNN's brgemm micro-kernel.

    python benchmarks/pointwise_gemm.py [--cpu_isa baseline|avx2|avx512] [--calls 20000] [--json]

The fused kernel multiplies each row of a depthwise output, still in L1, by the [C, C] weights of its 1x1 conv:
out[w, c] = sum_j in[w, j] m[j, c], a small GEMM with M = the row's positions (rounded to 8), K = C, N = C padded
to 64 bytes. This script times that GEMM alone, in and out in L1 as in the kernel, two ways:

- tiles: `fastdarts::tiles::pointwise_row` (csrc/include/fastdarts/tiles.h), compiled for the tier in force;
- brgemm: `at::native::cpublas::brgemm` (float32), oneDNN's batch-reduce GEMM micro-kernel, which the torch wheel
  exports and oneDNN generates at run time for the CPU (within ONEDNN_MAX_CPU_ISA, which --cpu_isa sets).

Shapes: the DARTS search network's rows at batch 64 (32 positions x C = 16 in the first cells, 16 x 32 after the
first reduction, 8 x 64 after the second). It compiles a small extension with torch.utils.cpp_extension the first
time (about a minute). Prints per shape the median ns per call of 5 runs of --calls calls and the GFLOP/s (2 M K N
per call, N the padded channels).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
from torch.utils.cpp_extension import load_inline

if __package__:
    from . import _device
else:  # run as a script: benchmarks/ is sys.path[0]
    import _device

SHAPES = [(32, 16), (16, 32), (8, 64)]  # (positions per row, C)
INCLUDE = Path(__file__).resolve().parent.parent / "csrc" / "include"

SOURCE = r"""
#include <ATen/ATen.h>
#include <ATen/native/CPUBlas.h>

#include <chrono>

#include "fastdarts/tiles.h"

namespace {
using fastdarts::CpuIsa;

template <typename T, CpuIsa kIsa>
FASTDARTS_ALWAYS_INLINE void tile_calls(const T* in, const T* m, T* out, int64_t cols, int64_t C, int64_t Cp,
                                        int64_t calls) {
  for (int64_t i = 0; i < calls; ++i) {
    fastdarts::tiles::pointwise_row<T, kIsa>(in, m, out, cols, C, Cp);
    asm volatile("" : : "r"(out) : "memory");  // keep every call
  }
}
FASTDARTS_CPU_ISA_COPIES(tile_calls)

double seconds_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}
}  // namespace

// Seconds for `calls` calls of one way ("tiles" on tier `isa`, or "brgemm") on in [cols, Cp] and m [Cp, Cp], both
// float32 and contiguous, writing out [cols, Cp].
double time_calls(const std::string& way, int64_t isa, at::Tensor in, at::Tensor m, at::Tensor out, int64_t C,
                  int64_t calls) {
  const int64_t cols = in.size(0), Cp = in.size(1);
  const float* a = in.data_ptr<float>();
  const float* b = m.data_ptr<float>();
  float* c = out.data_ptr<float>();
  const auto start = std::chrono::steady_clock::now();
  if (way == "brgemm") {
    for (int64_t i = 0; i < calls; ++i) {
      at::native::cpublas::brgemm(cols, Cp, C, Cp, Cp, Cp, false, a, b, c, false);
    }
    at::native::cpublas::brgemm_release(false);
  } else if (isa == 2) {
    tile_calls_avx512<float>(a, b, c, cols, C, Cp, calls);
  } else if (isa == 1) {
    tile_calls_avx2<float>(a, b, c, cols, C, Cp, calls);
  } else {
    tile_calls_baseline<float>(a, b, c, cols, C, Cp, calls);
  }
  return seconds_since(start);
}
"""


def build():
    return load_inline(
        name="fastdarts_pointwise_gemm_bench",
        cpp_sources=[SOURCE],
        functions=["time_calls"],
        extra_include_paths=[str(INCLUDE)],
        extra_cflags=["-O3", "-std=c++17"],
        verbose=False,
    )


def run_shape(module, tier: str, cols: int, C: int, calls: int) -> dict:
    Cp = -(-C // 16) * 16
    generator = torch.Generator().manual_seed(0)
    x = torch.zeros(cols, Cp)
    x[:, :C] = torch.randn(cols, C, generator=generator)
    m = torch.zeros(Cp, Cp)
    m[:C, :C] = torch.randn(C, C, generator=generator)
    isa = ("baseline", "avx2", "avx512").index(tier)
    result = {"positions": cols, "C": C}
    outputs = {}
    for way in ("tiles", "brgemm"):
        out = torch.full((cols, Cp), float("nan"))
        module.time_calls(way, isa, x, m, out, C, 100)  # warm-up (and oneDNN's code generation)
        runs = [module.time_calls(way, isa, x, m, out, C, calls) / calls for _ in range(5)]
        seconds = statistics.median(runs)
        result[way] = {"ns_per_call": seconds * 1e9, "gflops": 2 * cols * C * Cp / seconds / 1e9}
        outputs[way] = out
    expected = x[:, :C] @ m[:C]
    for way, out in outputs.items():  # both compute the same product, zeros in the padding columns
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5, msg=lambda s, w=way: f"{w}: {s}")
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20000, help="calls per timed run (5 runs per shape and way)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    _device.add_cpu_isa_flag(parser)
    args = parser.parse_args(argv)
    _device.prepare_process(parser, args.cpu_isa)
    if args.calls < 1:
        parser.error(f"--calls: must be at least 1, got {args.calls}")
    from fastdarts import ops

    tier = ops.cpu_isa()
    if tier is None:
        parser.error("the fastdarts extension is not built: there are no tiles to time")
    module = build()
    results = [run_shape(module, tier, cols, C, args.calls) for cols, C in SHAPES]
    report = {"cpu": _device.cpu_line(), "tier": tier, "calls": args.calls, "shapes": results}
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(report["cpu"])
    for r in results:
        line = f"{r['positions']:3d} positions x C = {r['C']:3d}:"
        for way in ("tiles", "brgemm"):
            line += f"  {way} {r[way]['ns_per_call']:8.1f} ns ({r[way]['gflops']:6.1f} GFLOP/s)"
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
