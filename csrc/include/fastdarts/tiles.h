#pragma once

// The register-tiled loops of relu_dwconv.cpp, in a header of their own so that a benchmark can time them against
// other GEMM micro-kernels (benchmarks/pointwise_gemm.py). Each is FASTDARTS_ALWAYS_INLINE and templated on the
// instruction-set tier, so that it compiles for the tier of the copy that calls it (cpu_isa.h). Rows are tiles:
// positions of Cp values each, channels innermost, Cp a multiple of kVecLanes.

#include <cstddef>
#include <cstdint>
#include <type_traits>
#include <utility>

#include "fastdarts/cpu_isa.h"

namespace fastdarts {
namespace tiles {

// Output columns whose accumulators stay in registers: 8 vectors of the tier's width, of 32 zmm (avx512) or 16
// ymm or xmm registers (avx2, baseline). Rows are rounded to whole blocks of kCols columns.
constexpr int64_t kCols = 8;

// One row of one kernel: out[w * out_step + c] (+)= sum_t taps[t * Cp + c] * in[offsets[t] + w * step + c] for
// w < cols (a multiple of kCols) and c < Cp. Each block of kCols columns x one vector of channels is accumulated
// in registers over all taps: per tap, one weight load and kCols FMAs whose other operand comes from the tile.
template <typename T, CpuIsa kIsa>
FASTDARTS_ALWAYS_INLINE void conv_row(const T* in, int64_t step, const int64_t* offsets, const T* taps,
                                      int64_t num_taps, T* out, int64_t out_step, int64_t cols, int64_t Cp,
                                      bool accumulate) {
  constexpr int64_t V = kLanes<T, kIsa>;
  for (int64_t w0 = 0; w0 < cols; w0 += kCols) {
    for (int64_t c0 = 0; c0 < Cp; c0 += V) {
      T* o = out + w0 * out_step + c0;
      Vec<T, kIsa> acc[kCols];
#pragma GCC unroll 16
      for (int64_t j = 0; j < kCols; ++j) {
        if (accumulate) {
          vec_load(acc[j], o + j * out_step);
        } else {
          acc[j] = Vec<T, kIsa>{};
        }
      }
      const T* base = in + w0 * step + c0;
      for (int64_t t = 0; t < num_taps; ++t) {
        Vec<T, kIsa> wt;
        vec_load(wt, taps + t * Cp + c0);
        const T* src = base + offsets[t];
#pragma GCC unroll 16
        for (int64_t j = 0; j < kCols; ++j) {
          Vec<T, kIsa> v;
          vec_load(v, src + j * step);
          acc[j] += wt * v;
        }
      }
#pragma GCC unroll 16
      for (int64_t j = 0; j < kCols; ++j) {
        vec_store(o + j * out_step, acc[j]);
      }
    }
  }
}

// Output columns of conv_row_unrolled's blocks: 16 on AVX-512, whose 32 registers hold 16 accumulators, k weights
// and an input (a 5x5 kernel ran 20-40 % faster than with kCols); kCols on the 16-register tiers.
template <CpuIsa kIsa>
constexpr int64_t kConvCols = kIsa == CpuIsa::kAvx512 ? 2 * kCols : kCols;

// Whether input column x of a kernel row meets an output of the unrolled loops' block: output j, tap b reads
// column j kStep + kD b (kStep = stride x columns per loop step), for j < kBlock and b < kK.
template <int kK, int kD, int kStep, int64_t kBlock>
constexpr bool reaches_output(int x) {
  for (int b = 0; b < kK; ++b) {
    const int shifted = x - kD * b;
    if (shifted >= 0 && shifted % kStep == 0 && shifted / kStep < kBlock) {
      return true;
    }
  }
  return false;
}

// conv_row for one k x k kernel with dilation kD at stride kS, written out at compile time: for each kernel row a,
// the k weight vectors stay in registers while the input columns the block of kBlock outputs reads pass once, each
// loaded once and multiplied into every output it reaches (output j, tap b reads column j kS + kD b). Per kernel
// row that is k + (kBlock - 1) kS + kD (k - 1) + 1 loads for k kBlock FMAs (5 + 12 = 17 for 40 at k = 5, stride 1,
// kBlock = 8): conv_row loads 9 for 8. offsets and taps as for conv_row (offsets[a k + b] = offsets[a k] + kD b Cp);
// the row is written to (added to, when accumulate) out[w * Cp + c]. cols is a multiple of kCols: what whole
// blocks of kBlock leave over runs in blocks of kCols.
// Packed columns (kG > 1, stride 1; relu_dwconv.cpp): a tile column is Cp / kG values, a loop step kG columns, and
// output j, tap b reads column j kG + kD b, so the same loop runs with columns of Cp / kG values (offsets[a k + b] =
// offsets[a k] + kD b Cp / kG); a column that no output of the block reads is not loaded. Each output sums its taps
// in conv_row's order, so both give the same bits.
template <typename T, CpuIsa kIsa, int kK, int kD, int kS, int kG = 1,
          int64_t kBlock = kG == 1 ? kConvCols<kIsa> : kCols>
FASTDARTS_ALWAYS_INLINE void conv_row_unrolled(const T* in, const int64_t* offsets, const T* taps, T* out,
                                               int64_t cols, int64_t Cp, bool accumulate) {
  static_assert(kG == 1 || kS == 1, "packed columns run at stride 1");
  constexpr int64_t V = kLanes<T, kIsa>;
  constexpr int kStep = kS * kG;  // input columns between two outputs
  constexpr int kInputs = (kBlock - 1) * kStep + kD * (kK - 1) + 1;
  const int64_t column = Cp / kG;
  const int64_t whole = cols / kBlock * kBlock;
  for (int64_t w0 = 0; w0 < whole; w0 += kBlock) {
    for (int64_t c0 = 0; c0 < Cp; c0 += V) {
      Vec<T, kIsa> acc[kBlock];
#pragma GCC unroll 16  // every accumulator named at compile time, so that none goes through the stack
      for (int64_t j = 0; j < kBlock; ++j) {
        if (accumulate) {
          vec_load(acc[j], out + (w0 + j) * Cp + c0);
        } else {
          acc[j] = Vec<T, kIsa>{};
        }
      }
      const T* base = in + w0 * kS * Cp + c0;
      for (int a = 0; a < kK; ++a) {
        Vec<T, kIsa> wt[kK];
#pragma GCC unroll 8
        for (int b = 0; b < kK; ++b) {
          vec_load(wt[b], taps + (a * kK + b) * Cp + c0);
        }
        const T* row = base + offsets[a * kK];
#pragma GCC unroll 64  // every input column of the widest case ((16 - 1) 2 + 2 (5 - 1) + 1 = 39)
        for (int x = 0; x < kInputs; ++x) {
          if (!reaches_output<kK, kD, kStep, kBlock>(x)) {
            continue;
          }
          Vec<T, kIsa> v;
          vec_load_once(v, row + x * column);
#pragma GCC unroll 8
          for (int b = 0; b < kK; ++b) {
            const int shifted = x - kD * b;  // kStep j for the output j that tap b of this column feeds
            if (shifted >= 0 && shifted % kStep == 0 && shifted / kStep < kBlock) {
              acc[shifted / kStep] += wt[b] * v;
            }
          }
        }
      }
#pragma GCC unroll 16
      for (int64_t j = 0; j < kBlock; ++j) {
        vec_store(out + (w0 + j) * Cp + c0, acc[j]);
      }
    }
  }
  if constexpr (kBlock > kCols) {
    if (whole < cols) {
      conv_row_unrolled<T, kIsa, kK, kD, kS, kG, kCols>(in + whole * kS * Cp, offsets, taps, out + whole * Cp,
                                                        cols - whole, Cp, accumulate);
    }
  }
}

// One row of a k x k depthwise kernel with dilation d at stride s into (onto, when accumulate) out[w * Cp + c]
// (w < cols): the unrolled loop for DARTS's kernels (k 3 or 5, dilation 1 or 2, stride 1 or 2; packed columns of
// G = 2 or 4 to a loop step at stride 1), conv_row for any other.
template <typename T, CpuIsa kIsa>
FASTDARTS_ALWAYS_INLINE void depthwise_row(const T* in, int64_t k, int64_t d, int64_t s, const int64_t* offsets,
                                           const T* taps, T* out, int64_t cols, int64_t Cp, bool accumulate,
                                           int64_t G = 1) {
  switch (((G * 10 + k) * 10 + d) * 10 + s) {
    case 1311: return conv_row_unrolled<T, kIsa, 3, 1, 1>(in, offsets, taps, out, cols, Cp, accumulate);
    case 1511: return conv_row_unrolled<T, kIsa, 5, 1, 1>(in, offsets, taps, out, cols, Cp, accumulate);
    case 1321: return conv_row_unrolled<T, kIsa, 3, 2, 1>(in, offsets, taps, out, cols, Cp, accumulate);
    case 1521: return conv_row_unrolled<T, kIsa, 5, 2, 1>(in, offsets, taps, out, cols, Cp, accumulate);
    case 1312: return conv_row_unrolled<T, kIsa, 3, 1, 2>(in, offsets, taps, out, cols, Cp, accumulate);
    case 1512: return conv_row_unrolled<T, kIsa, 5, 1, 2>(in, offsets, taps, out, cols, Cp, accumulate);
    case 1322: return conv_row_unrolled<T, kIsa, 3, 2, 2>(in, offsets, taps, out, cols, Cp, accumulate);
    case 1522: return conv_row_unrolled<T, kIsa, 5, 2, 2>(in, offsets, taps, out, cols, Cp, accumulate);
    case 2311: return conv_row_unrolled<T, kIsa, 3, 1, 1, 2>(in, offsets, taps, out, cols, Cp, accumulate);
    case 2511: return conv_row_unrolled<T, kIsa, 5, 1, 1, 2>(in, offsets, taps, out, cols, Cp, accumulate);
    case 2321: return conv_row_unrolled<T, kIsa, 3, 2, 1, 2>(in, offsets, taps, out, cols, Cp, accumulate);
    case 2521: return conv_row_unrolled<T, kIsa, 5, 2, 1, 2>(in, offsets, taps, out, cols, Cp, accumulate);
    case 4311: return conv_row_unrolled<T, kIsa, 3, 1, 1, 4>(in, offsets, taps, out, cols, Cp, accumulate);
    case 4511: return conv_row_unrolled<T, kIsa, 5, 1, 1, 4>(in, offsets, taps, out, cols, Cp, accumulate);
    case 4321: return conv_row_unrolled<T, kIsa, 3, 2, 1, 4>(in, offsets, taps, out, cols, Cp, accumulate);
    case 4521: return conv_row_unrolled<T, kIsa, 5, 2, 1, 4>(in, offsets, taps, out, cols, Cp, accumulate);
    default: return conv_row<T, kIsa>(in, s * Cp, offsets, taps, k * k, out, Cp, cols, Cp, accumulate);
  }
}

// vs[j] = the vector at p + j * stride, for j < kN: a block of columns' vectors, held in registers by its caller.
template <typename V, typename T, int64_t kN>
FASTDARTS_ALWAYS_INLINE void load_columns(V (&vs)[kN], const T* p, int64_t stride) {
#pragma GCC unroll 16
  for (int64_t j = 0; j < kN; ++j) {
    vec_load(vs[j], p + j * stride);
  }
}

// One row's share of one kernel's weight gradient:
//   partial[t * Cp + c] += sum_{w < cols} grad[w * Cp + c] * in[offsets[t] + w * step + c]   (c < Cp).
// kCols gradient vectors stay in registers while every tap reads its kCols inputs; two interleaved sums per tap
// halve the chain of dependent FMAs.
template <typename T, CpuIsa kIsa>
FASTDARTS_ALWAYS_INLINE void grad_weight_row(const T* grad, const T* in, int64_t step, const int64_t* offsets,
                                             int64_t num_taps, T* partial, int64_t cols, int64_t Cp) {
  constexpr int64_t V = kLanes<T, kIsa>;
  for (int64_t w0 = 0; w0 < cols; w0 += kCols) {
    for (int64_t c0 = 0; c0 < Cp; c0 += V) {
      Vec<T, kIsa> g[kCols];
      load_columns(g, grad + w0 * Cp + c0, Cp);
      const T* base = in + w0 * step + c0;
      for (int64_t t = 0; t < num_taps; ++t) {
        const T* src = base + offsets[t];
        Vec<T, kIsa> even;
        Vec<T, kIsa> odd{};
        vec_load(even, partial + t * Cp + c0);
#pragma GCC unroll 16
        for (int64_t j = 0; j < kCols; ++j) {
          Vec<T, kIsa> v;
          vec_load(v, src + j * step);
          if (j % 2 == 0) {
            even += g[j] * v;
          } else {
            odd += g[j] * v;
          }
        }
        even += odd;
        vec_store(partial + t * Cp + c0, even);
      }
    }
  }
}

// grad_weight_row for one k x k kernel with dilation kD at stride kS, written out at compile time (as
// conv_row_unrolled): for each kernel row a, the k partial sums of its taps stay in registers while the input columns
// that the block of kBlock gradient vectors reaches pass once, each loaded once and multiplied into every tap that
// reads it: (kBlock - 1) kS + kD (k - 1) + 1 input loads per kernel row for k kBlock FMAs (12 for 40 at k = 5,
// stride 1), where grad_weight_row loads one input per FMA. offsets and packed columns (kG) as for
// conv_row_unrolled; cols is a multiple of kCols.
template <typename T, CpuIsa kIsa, int kK, int kD, int kS, int kG = 1,
          int64_t kBlock = kG == 1 ? kConvCols<kIsa> : kCols>
FASTDARTS_ALWAYS_INLINE void grad_weight_row_unrolled(const T* grad, const T* in, const int64_t* offsets, T* partial,
                                                      int64_t cols, int64_t Cp) {
  static_assert(kG == 1 || kS == 1, "packed columns run at stride 1");
  constexpr int64_t V = kLanes<T, kIsa>;
  constexpr int kStep = kS * kG;  // input columns between two gradient columns
  constexpr int kInputs = (kBlock - 1) * kStep + kD * (kK - 1) + 1;
  const int64_t column = Cp / kG;
  // Two sums per tap (even and odd gradient columns) halve the chain of dependent FMAs where the registers hold them.
  constexpr int kSplit = kBlock + 2 * kK + 1 <= (kIsa == CpuIsa::kAvx512 ? 32 : 16) ? 2 : 1;
  const int64_t whole = cols / kBlock * kBlock;
  if constexpr (kBlock > kCols) {
    if (whole < cols) {
      grad_weight_row_unrolled<T, kIsa, kK, kD, kS, kG, kCols>(grad + whole * Cp, in + whole * kS * Cp, offsets,
                                                               partial, cols - whole, Cp);
    }
  }
  for (int64_t w0 = 0; w0 < whole; w0 += kBlock) {
    for (int64_t c0 = 0; c0 < Cp; c0 += V) {
      Vec<T, kIsa> g[kBlock];
      load_columns(g, grad + w0 * Cp + c0, Cp);
      const T* base = in + w0 * kS * Cp + c0;
      for (int a = 0; a < kK; ++a) {
        T* sums = partial + a * kK * Cp + c0;
        Vec<T, kIsa> acc[kSplit][kK];
#pragma GCC unroll 8
        for (int b = 0; b < kK; ++b) {
          vec_load(acc[0][b], sums + b * Cp);
          if constexpr (kSplit > 1) {
            acc[1][b] = Vec<T, kIsa>{};
          }
        }
        const T* row = base + offsets[a * kK];
#pragma GCC unroll 64
        for (int x = 0; x < kInputs; ++x) {
          if (!reaches_output<kK, kD, kStep, kBlock>(x)) {
            continue;
          }
          Vec<T, kIsa> v;
          vec_load_once(v, row + x * column);
#pragma GCC unroll 8
          for (int b = 0; b < kK; ++b) {
            const int shifted = x - kD * b;  // kStep j for the gradient column j that tap b meets in this column
            if (shifted >= 0 && shifted % kStep == 0 && shifted / kStep < kBlock) {
              const int j = shifted / kStep;
              acc[j % kSplit][b] += g[j] * v;
            }
          }
        }
#pragma GCC unroll 8
        for (int b = 0; b < kK; ++b) {
          if constexpr (kSplit > 1) {
            acc[0][b] += acc[1][b];
          }
          vec_store(sums + b * Cp, acc[0][b]);
        }
      }
    }
  }
}

// One row's share of a k x k depthwise kernel's weight gradient (grad_weight_row's sums, the tap offsets as
// depthwise_row takes them, and its packed columns): the unrolled loop for DARTS's kernels, grad_weight_row for
// any other.
template <typename T, CpuIsa kIsa>
FASTDARTS_ALWAYS_INLINE void depthwise_grad_weight_row(const T* grad, const T* in, int64_t k, int64_t d, int64_t s,
                                                       const int64_t* offsets, T* partial, int64_t cols, int64_t Cp,
                                                       int64_t G = 1) {
  switch (((G * 10 + k) * 10 + d) * 10 + s) {
    case 1311: return grad_weight_row_unrolled<T, kIsa, 3, 1, 1>(grad, in, offsets, partial, cols, Cp);
    case 1511: return grad_weight_row_unrolled<T, kIsa, 5, 1, 1>(grad, in, offsets, partial, cols, Cp);
    case 1321: return grad_weight_row_unrolled<T, kIsa, 3, 2, 1>(grad, in, offsets, partial, cols, Cp);
    case 1521: return grad_weight_row_unrolled<T, kIsa, 5, 2, 1>(grad, in, offsets, partial, cols, Cp);
    case 1312: return grad_weight_row_unrolled<T, kIsa, 3, 1, 2>(grad, in, offsets, partial, cols, Cp);
    case 1512: return grad_weight_row_unrolled<T, kIsa, 5, 1, 2>(grad, in, offsets, partial, cols, Cp);
    case 1322: return grad_weight_row_unrolled<T, kIsa, 3, 2, 2>(grad, in, offsets, partial, cols, Cp);
    case 1522: return grad_weight_row_unrolled<T, kIsa, 5, 2, 2>(grad, in, offsets, partial, cols, Cp);
    case 2311: return grad_weight_row_unrolled<T, kIsa, 3, 1, 1, 2>(grad, in, offsets, partial, cols, Cp);
    case 2511: return grad_weight_row_unrolled<T, kIsa, 5, 1, 1, 2>(grad, in, offsets, partial, cols, Cp);
    case 2321: return grad_weight_row_unrolled<T, kIsa, 3, 2, 1, 2>(grad, in, offsets, partial, cols, Cp);
    case 2521: return grad_weight_row_unrolled<T, kIsa, 5, 2, 1, 2>(grad, in, offsets, partial, cols, Cp);
    case 4311: return grad_weight_row_unrolled<T, kIsa, 3, 1, 1, 4>(grad, in, offsets, partial, cols, Cp);
    case 4511: return grad_weight_row_unrolled<T, kIsa, 5, 1, 1, 4>(grad, in, offsets, partial, cols, Cp);
    case 4321: return grad_weight_row_unrolled<T, kIsa, 3, 2, 1, 4>(grad, in, offsets, partial, cols, Cp);
    case 4521: return grad_weight_row_unrolled<T, kIsa, 5, 2, 1, 4>(grad, in, offsets, partial, cols, Cp);
    default: return grad_weight_row<T, kIsa>(grad, in, s * Cp, offsets, k * k, partial, cols, Cp);
  }
}

// The register block of the 1x1 conv's loops (pointwise_row, pointwise_grad_row): kPointwiseRows positions (or
// output rows of the weight gradient) x kPointwiseVecs vectors of channels. With one vector per position, each
// multiply-add needs a broadcast load besides its vector: 9 loads for 8 FMAs, more than the 2 loads a cycle that
// feed 2 FMAs. AVX-512 makes up for it with 16-float vectors; on the narrower tiers 4 positions x 2 vectors load
// 6 times for 8 FMAs (benchmarks/pointwise_gemm.py measures it). Cp is a multiple of kPointwiseVecs vectors.
template <CpuIsa kIsa>
constexpr int64_t kPointwiseRows = kIsa == CpuIsa::kAvx512 ? 8 : 4;
template <CpuIsa kIsa>
constexpr int64_t kPointwiseVecs = kIsa == CpuIsa::kAvx512 ? 1 : 2;

// The register block of both 1x1 loops: acc[q][v] (+)= sum_{k < K} a[k a_k + q a_q] b[k b_k + v V] for q < kR
// and v < kB (V lanes a vector; kR x kB defaults to kPointwiseRows x kPointwiseVecs), starting from zero, or from the
// block at `block` (row stride Cp) when accumulate, and written back there. With `sums` (the forward's statistics),
// the per-lane sum and sum of squares of rows q < valid_rows are added to sums[v V + l] and sums[Cp + v V + l] while
// still in registers; with `shift` too, those of acc - shift[v V + l] (a value near the mean, so that the variance
// does not cancel).
template <typename T, CpuIsa kIsa, int64_t kR = kPointwiseRows<kIsa>, int64_t kB = kPointwiseVecs<kIsa>>
FASTDARTS_ALWAYS_INLINE void outer_product_block(const T* a, int64_t a_k, int64_t a_q, const T* b, int64_t b_k,
                                                 int64_t K, T* block, int64_t Cp, bool accumulate,
                                                 T* sums = nullptr, int64_t valid_rows = 0,
                                                 const T* shift = nullptr) {
  constexpr int64_t V = kLanes<T, kIsa>;
  constexpr int64_t R = kR;
  constexpr int64_t B = kB;
  Vec<T, kIsa> acc[R][B];
#pragma GCC unroll 16
  for (int64_t q = 0; q < R; ++q) {
#pragma GCC unroll 16
    for (int64_t v = 0; v < B; ++v) {
      if (accumulate) {
        vec_load(acc[q][v], block + q * Cp + v * V);
      } else {
        acc[q][v] = Vec<T, kIsa>{};
      }
    }
  }
  for (int64_t k = 0; k < K; ++k) {
    Vec<T, kIsa> bk[B];
#pragma GCC unroll 16
    for (int64_t v = 0; v < B; ++v) {
      vec_load(bk[v], b + k * b_k + v * V);
    }
#pragma GCC unroll 16
    for (int64_t q = 0; q < R; ++q) {
      const T x = a[k * a_k + q * a_q];
#pragma GCC unroll 16
      for (int64_t v = 0; v < B; ++v) {
        acc[q][v] += x * bk[v];
      }
    }
  }
#pragma GCC unroll 16
  for (int64_t q = 0; q < R; ++q) {
#pragma GCC unroll 16
    for (int64_t v = 0; v < B; ++v) {
      vec_store(block + q * Cp + v * V, acc[q][v]);
    }
  }
  if (sums != nullptr) {
#pragma GCC unroll 16
    for (int64_t v = 0; v < B; ++v) {
      Vec<T, kIsa> sum[R];
      Vec<T, kIsa> squares[R];
      Vec<T, kIsa> centre{};
      if (shift != nullptr) {
        vec_load(centre, shift + v * V);
      }
#pragma GCC unroll 16
      for (int64_t q = 0; q < R; ++q) {
        const bool valid = q < valid_rows;
        sum[q] = valid ? acc[q][v] - centre : Vec<T, kIsa>{};
        squares[q] = sum[q] * sum[q];
      }
      // A tree over the rows: a chain of adds would wait out the add's latency at every row.
#pragma GCC unroll 16
      for (int64_t step = 1; step < R; step *= 2) {
#pragma GCC unroll 16
        for (int64_t q = 0; q + step < R; q += 2 * step) {
          sum[q] += sum[q + step];
          squares[q] += squares[q + step];
        }
      }
      Vec<T, kIsa> total;
      vec_load(total, sums + v * V);
      total += sum[0];
      vec_store(sums + v * V, total);
      vec_load(total, sums + Cp + v * V);
      total += squares[0];
      vec_store(sums + Cp + v * V, total);
    }
  }
}

// One row of a 1x1 conv: out[w * Cp + c] = sum_{j < C} in[w * Cp + j] * m[j * Cp + c] for w < cols (a multiple of
// kCols) and c < Cp, with m [C][Cp] (the weights, input channel major): blocks of kPointwiseRows positions x
// kPointwiseVecs vectors of output channels, each input value broadcast against the block's part of a row of m.
// in and out do not overlap.
// With `sums` [2][Cp] (T), the per-lane sum and sum of squares of out's positions w < valid_cols are added to
// sums[c] and sums[Cp + c] as each block is computed, in place of a pass over the row that reloads it.
template <typename T, CpuIsa kIsa>
FASTDARTS_ALWAYS_INLINE void pointwise_row(const T* in, const T* m, T* out, int64_t cols, int64_t C, int64_t Cp,
                                           T* sums = nullptr, int64_t valid_cols = 0) {
  for (int64_t w0 = 0; w0 < cols; w0 += kPointwiseRows<kIsa>) {
    for (int64_t c0 = 0; c0 < Cp; c0 += kPointwiseVecs<kIsa> * kLanes<T, kIsa>) {
      outer_product_block<T, kIsa>(in + w0 * Cp, 1, Cp, m + c0, Cp, C, out + w0 * Cp + c0, Cp, false,
                                   sums == nullptr ? nullptr : sums + c0, valid_cols - w0);
    }
  }
}

// One row's share of a 1x1 conv's weight gradient:
//   partial[o * Cp + c] += sum_{w < cols} grad[w * Cp + o] * z[w * Cp + c]
// for o < C rounded up to kPointwiseRows (Cp is a multiple of it; the rows past C add the zeros of grad's padding
// channels) and c < Cp: blocks of kPointwiseRows rows of partial x kPointwiseVecs vectors of z's channels.
template <typename T, CpuIsa kIsa>
FASTDARTS_ALWAYS_INLINE void pointwise_grad_row(const T* grad, const T* z, T* partial, int64_t cols, int64_t C,
                                                int64_t Cp) {
  for (int64_t o0 = 0; o0 < C; o0 += kPointwiseRows<kIsa>) {
    for (int64_t c0 = 0; c0 < Cp; c0 += kPointwiseVecs<kIsa> * kLanes<T, kIsa>) {
      outer_product_block<T, kIsa>(grad + o0, Cp, 1, z + c0, Cp, cols, partial + o0 * Cp + c0, Cp, true);
    }
  }
}

// ---- The 1x1 conv of packed columns (relu_dwconv.cpp's "Packed columns"): a vector of Cp lanes holds Cp / kC
// ---- columns of kC channels, and the 1x1 conv mixes channels within each column only. The loops above multiply by
// ---- the block-diagonal Cp x Cp matrix, Cp multiply-adds a vector; these take, for each input channel j < kC, every
// ---- lane's channel j of its own column by a lane shuffle and multiply it by a pattern vector: kC shuffles and kC
// ---- multiply-adds a vector (4 + 4 against 16 at C = 4 in float32). They need kC <= the tier's lanes, so that a
// ---- column never straddles two registers (shuffles_columns), and Cp == kVecLanes (packed tiles are one vector).

// Whether the registers of tier isa hold whole packed columns of C channels.
template <typename T>
constexpr bool shuffles_columns(CpuIsa isa, int64_t C) {
  return vec_bytes(isa) / static_cast<int64_t>(sizeof(T)) % C == 0;
}

// The shuffle mask that gives every lane channel kJ of its own column of kC lanes.
template <typename T>
using LaneIndex = std::conditional_t<sizeof(T) == 4, int32_t, int64_t>;
template <typename T, CpuIsa kIsa>
using LaneMask = typename VecOf<LaneIndex<T>, kVecBytes<kIsa>>::type;
template <typename T, CpuIsa kIsa, int64_t kC, int64_t kJ, size_t... kL>
FASTDARTS_ALWAYS_INLINE void column_channel_mask(LaneMask<T, kIsa>& mask, std::index_sequence<kL...>) {
  mask = LaneMask<T, kIsa>{static_cast<LaneIndex<T>>(kL - kL % kC + kJ)...};
}
template <typename T, CpuIsa kIsa, int64_t kC, int64_t kJ>
FASTDARTS_ALWAYS_INLINE void column_channel(const Vec<T, kIsa>& v, Vec<T, kIsa>& out) {
  LaneMask<T, kIsa> mask;
  column_channel_mask<T, kIsa, kC, kJ>(mask, std::make_index_sequence<kLanes<T, kIsa>>{});
  out = __builtin_shuffle(v, mask);
}

// acc[q] += column_channel<j>(v[q]) p[j] for q < kR and kJ <= j < kC (a template per j, not a loop: a constant
// mask lets the compiler pick the cheapest shuffle, one instruction on x86).
template <typename T, CpuIsa kIsa, int64_t kC, int64_t kR, int64_t kJ = 0>
FASTDARTS_ALWAYS_INLINE void add_column_products(const Vec<T, kIsa> (&v)[kR], const Vec<T, kIsa>* p,
                                                 Vec<T, kIsa> (&acc)[kR]) {
  if constexpr (kJ < kC) {
#pragma GCC unroll 8
    for (int64_t q = 0; q < kR; ++q) {
      Vec<T, kIsa> channel;
      column_channel<T, kIsa, kC, kJ>(v[q], channel);
      acc[q] += channel * p[kJ];
    }
    add_column_products<T, kIsa, kC, kR, kJ + 1>(v, p, acc);
  }
}

// acc[j] += g column_channel<j>(z) for kJ <= j < kC.
template <typename T, CpuIsa kIsa, int64_t kC, int64_t kJ = 0>
FASTDARTS_ALWAYS_INLINE void add_column_gradients(const Vec<T, kIsa>& g, const Vec<T, kIsa>& z, Vec<T, kIsa>* acc) {
  if constexpr (kJ < kC) {
    Vec<T, kIsa> channel;
    column_channel<T, kIsa, kC, kJ>(z, channel);
    acc[kJ] += g * channel;
    add_column_gradients<T, kIsa, kC, kJ + 1>(g, z, acc);
  }
}

// patterns[j Cp + l] = m[(l - l % kC + j) Cp + l] for j < kC, l < Cp, from a block-diagonal matrix m [Cp][Cp] of
// pointwise_row: the weight by which lane l's column's channel j enters lane l.
template <typename T>
void column_patterns(const T* m, int64_t C, int64_t Cp, T* patterns) {
  for (int64_t j = 0; j < C; ++j) {
    for (int64_t l = 0; l < Cp; ++l) {
      patterns[j * Cp + l] = m[(l - l % C + j) * Cp + l];
    }
  }
}

// pointwise_row on packed columns: out[w * Cp + l] = sum_{j < kC} in[w * Cp + l - l % kC + j] patterns[j * Cp + l]
// for w < cols (a multiple of kCols) and l < Cp (column_patterns), with `sums` as pointwise_row's.
template <typename T, CpuIsa kIsa, int64_t kC>
FASTDARTS_ALWAYS_INLINE void pointwise_row_columns(const T* in, const T* patterns, T* out, int64_t cols,
                                                   int64_t Cp, T* sums = nullptr, int64_t valid_cols = 0) {
  constexpr int64_t V = kLanes<T, kIsa>;
  constexpr int64_t U = kVecLanes<T> / V;  // registers a packed vector spans
  constexpr int64_t R = kIsa == CpuIsa::kAvx512 ? 8 : 4;  // registers a block: kC long chains interleaved
  static_assert(V % kC == 0 && R % U == 0, "whole columns in a register, whole vectors in a block");
  Vec<T, kIsa> p[kC];  // the pattern repeats every kC lanes, so each register of a vector takes the first V
#pragma GCC unroll 8
  for (int64_t j = 0; j < kC; ++j) {
    vec_load(p[j], patterns + j * Cp);
  }
  Vec<T, kIsa> sum[U] = {};
  Vec<T, kIsa> squares[U] = {};
  for (int64_t r0 = 0; r0 < cols * U; r0 += R) {
    Vec<T, kIsa> v[R];
    Vec<T, kIsa> acc[R];
#pragma GCC unroll 8
    for (int64_t q = 0; q < R; ++q) {
      vec_load(v[q], in + (r0 + q) * V);
      acc[q] = Vec<T, kIsa>{};
    }
    add_column_products<T, kIsa, kC, R>(v, p, acc);
#pragma GCC unroll 8
    for (int64_t q = 0; q < R; ++q) {
      vec_store(out + (r0 + q) * V, acc[q]);
    }
    if (sums != nullptr) {
#pragma GCC unroll 8
      for (int64_t q = 0; q < R; ++q) {
        if ((r0 + q) / U < valid_cols) {
          sum[q % U] += acc[q];
          squares[q % U] += acc[q] * acc[q];
        }
      }
    }
  }
  if (sums != nullptr) {
#pragma GCC unroll 8
    for (int64_t u = 0; u < U; ++u) {
      Vec<T, kIsa> total;
      vec_load(total, sums + u * V);
      total += sum[u];
      vec_store(sums + u * V, total);
      vec_load(total, sums + Cp + u * V);
      total += squares[u];
      vec_store(sums + Cp + u * V, total);
    }
  }
}

// pointwise_grad_row on packed columns: partial[j * Cp + l] += sum_{w < cols} grad[w * Cp + l] z[w * Cp + l - l % kC
// + j] for j < kC and l < Cp: lane l of row j holds the products of output channel l % kC with input channel j of
// lane l's columns, which the caller adds up over the Cp / kC columns of a vector.
template <typename T, CpuIsa kIsa, int64_t kC>
FASTDARTS_ALWAYS_INLINE void pointwise_grad_row_columns(const T* grad, const T* z, T* partial, int64_t cols,
                                                        int64_t Cp) {
  constexpr int64_t V = kLanes<T, kIsa>;
  constexpr int64_t U = kVecLanes<T> / V;
  static_assert(V % kC == 0, "whole columns in a register");
#pragma GCC unroll 4
  for (int64_t u = 0; u < U; ++u) {
    // Two sets of sums, even and odd positions: kC chains alone would wait on the multiply-add's latency.
    Vec<T, kIsa> even[kC];
    Vec<T, kIsa> odd[kC] = {};
#pragma GCC unroll 8
    for (int64_t j = 0; j < kC; ++j) {
      vec_load(even[j], partial + j * Cp + u * V);
    }
    int64_t w = 0;
    for (; w + 1 < cols; w += 2) {
      Vec<T, kIsa> g[2];
      Vec<T, kIsa> zw[2];
#pragma GCC unroll 2
      for (int64_t h = 0; h < 2; ++h) {
        vec_load(g[h], grad + (w + h) * Cp + u * V);
        vec_load(zw[h], z + (w + h) * Cp + u * V);
      }
      add_column_gradients<T, kIsa, kC>(g[0], zw[0], even);
      add_column_gradients<T, kIsa, kC>(g[1], zw[1], odd);
    }
    if (w < cols) {
      Vec<T, kIsa> g;
      Vec<T, kIsa> zw;
      vec_load(g, grad + w * Cp + u * V);
      vec_load(zw, z + w * Cp + u * V);
      add_column_gradients<T, kIsa, kC>(g, zw, even);
    }
#pragma GCC unroll 8
    for (int64_t j = 0; j < kC; ++j) {
      even[j] += odd[j];
      vec_store(partial + j * Cp + u * V, even[j]);
    }
  }
}

// Adds one row's per-lane sum of a and sum of a b (cols vectors of Cp lanes each, a and b laid out alike) to
// sums[c] and sums[Cp + c]: the row in T, the running totals in double.
template <typename T, CpuIsa kIsa>
FASTDARTS_ALWAYS_INLINE void add_row_products(const T* a, const T* b, int64_t cols, int64_t Cp, double* sums) {
  constexpr int64_t V = kLanes<T, kIsa>;
  for (int64_t c0 = 0; c0 < Cp; c0 += V) {
    Vec<T, kIsa> sum{};
    Vec<T, kIsa> products{};
    for (int64_t w = 0; w < cols; ++w) {
      Vec<T, kIsa> va;
      Vec<T, kIsa> vb;
      vec_load(va, a + w * Cp + c0);
      vec_load(vb, b + w * Cp + c0);
      sum += va;
      products += va * vb;
    }
    for (int64_t l = 0; l < V; ++l) {
      sums[c0 + l] += static_cast<double>(sum[l]);
      sums[Cp + c0 + l] += static_cast<double>(products[l]);
    }
  }
}

}  // namespace tiles
}  // namespace fastdarts
