#pragma once

// The register-tiled loops of relu_dwconv.cpp, in a header of their own so that a benchmark can time them against
// other GEMM micro-kernels (benchmarks/pointwise_gemm.py). Each is FASTDARTS_ALWAYS_INLINE and templated on the
// instruction-set tier, so that it compiles for the tier of the copy that calls it (cpu_isa.h). Rows are tiles:
// positions of Cp values each, channels innermost, Cp a multiple of kVecLanes.

#include <cstdint>

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

// conv_row for one k x k kernel with dilation kD at stride kS, written out at compile time: for each kernel row a,
// the k weight vectors stay in registers while the input columns the block of kBlock outputs reads pass once, each
// loaded once and multiplied into every output it reaches (output j, tap b reads column j kS + kD b). Per kernel
// row that is k + (kBlock - 1) kS + kD (k - 1) + 1 loads for k kBlock FMAs (5 + 12 = 17 for 40 at k = 5, stride 1,
// kBlock = 8): conv_row loads 9 for 8. offsets and taps as for conv_row (offsets[a k + b] = offsets[a k] + kD b Cp);
// the row is written to (added to, when accumulate) out[w * Cp + c]. cols is a multiple of kCols: what whole
// blocks of kBlock leave over runs in blocks of kCols.
template <typename T, CpuIsa kIsa, int kK, int kD, int kS, int64_t kBlock = kConvCols<kIsa>>
FASTDARTS_ALWAYS_INLINE void conv_row_unrolled(const T* in, const int64_t* offsets, const T* taps, T* out,
                                               int64_t cols, int64_t Cp, bool accumulate) {
  constexpr int64_t V = kLanes<T, kIsa>;
  constexpr int kInputs = (kBlock - 1) * kS + kD * (kK - 1) + 1;
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
          Vec<T, kIsa> v;
          vec_load_once(v, row + x * Cp);
#pragma GCC unroll 8
          for (int b = 0; b < kK; ++b) {
            const int shifted = x - kD * b;  // kS j for the output j that tap b of this column feeds
            if (shifted >= 0 && shifted % kS == 0 && shifted / kS < kBlock) {
              acc[shifted / kS] += wt[b] * v;
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
      conv_row_unrolled<T, kIsa, kK, kD, kS, kCols>(in + whole * kS * Cp, offsets, taps, out + whole * Cp,
                                                    cols - whole, Cp, accumulate);
    }
  }
}

// One row of a k x k depthwise kernel with dilation d at stride s into (onto, when accumulate) out[w * Cp + c]
// (w < cols): the unrolled loop for DARTS's kernels (k 3 or 5, dilation 1 or 2, stride 1 or 2), conv_row for any
// other.
template <typename T, CpuIsa kIsa>
FASTDARTS_ALWAYS_INLINE void depthwise_row(const T* in, int64_t k, int64_t d, int64_t s, const int64_t* offsets,
                                           const T* taps, T* out, int64_t cols, int64_t Cp, bool accumulate) {
  switch ((k * 10 + d) * 10 + s) {
    case 311: return conv_row_unrolled<T, kIsa, 3, 1, 1>(in, offsets, taps, out, cols, Cp, accumulate);
    case 511: return conv_row_unrolled<T, kIsa, 5, 1, 1>(in, offsets, taps, out, cols, Cp, accumulate);
    case 321: return conv_row_unrolled<T, kIsa, 3, 2, 1>(in, offsets, taps, out, cols, Cp, accumulate);
    case 521: return conv_row_unrolled<T, kIsa, 5, 2, 1>(in, offsets, taps, out, cols, Cp, accumulate);
    case 312: return conv_row_unrolled<T, kIsa, 3, 1, 2>(in, offsets, taps, out, cols, Cp, accumulate);
    case 512: return conv_row_unrolled<T, kIsa, 5, 1, 2>(in, offsets, taps, out, cols, Cp, accumulate);
    case 322: return conv_row_unrolled<T, kIsa, 3, 2, 2>(in, offsets, taps, out, cols, Cp, accumulate);
    case 522: return conv_row_unrolled<T, kIsa, 5, 2, 2>(in, offsets, taps, out, cols, Cp, accumulate);
    default: return conv_row<T, kIsa>(in, s * Cp, offsets, taps, k * k, out, Cp, cols, Cp, accumulate);
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
#pragma GCC unroll 16
      for (int64_t j = 0; j < kCols; ++j) {
        vec_load(g[j], grad + (w0 + j) * Cp + c0);
      }
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

// The register block of the 1x1 conv's loops (pointwise_row, pointwise_grad_row): kPointwiseRows positions (or
// output rows of the weight gradient) x kPointwiseVecs vectors of channels. With one vector per position, each
// multiply-add needs a broadcast load besides its vector: 9 loads for 8 FMAs, more than the 2 loads a cycle that
// feed 2 FMAs. AVX-512 makes up for it with 16-float vectors; on the narrower tiers 4 positions x 2 vectors load
// 6 times for 8 FMAs (benchmarks/pointwise_gemm.py measures it). Cp is a multiple of kPointwiseVecs vectors.
template <CpuIsa kIsa>
constexpr int64_t kPointwiseRows = kIsa == CpuIsa::kAvx512 ? 8 : 4;
template <CpuIsa kIsa>
constexpr int64_t kPointwiseVecs = kIsa == CpuIsa::kAvx512 ? 1 : 2;

// The register block of both 1x1 loops: acc[q][v] (+)= sum_{k < K} a[k a_k + q a_q] b[k b_k + v V] for q <
// kPointwiseRows and v < kPointwiseVecs (V lanes a vector), starting from zero, or from the block at `block` (row
// stride Cp) when accumulate, and written back there. With `sums` (the forward's statistics), the per-lane sum and
// sum of squares of rows q < valid_rows are added to sums[v V + l] and sums[Cp + v V + l] while still in registers;
// with `shift` too, those of acc - shift[v V + l] (a value near the mean, so that the variance does not cancel).
template <typename T, CpuIsa kIsa>
FASTDARTS_ALWAYS_INLINE void outer_product_block(const T* a, int64_t a_k, int64_t a_q, const T* b, int64_t b_k,
                                                 int64_t K, T* block, int64_t Cp, bool accumulate,
                                                 T* sums = nullptr, int64_t valid_rows = 0,
                                                 const T* shift = nullptr) {
  constexpr int64_t V = kLanes<T, kIsa>;
  constexpr int64_t R = kPointwiseRows<kIsa>;
  constexpr int64_t B = kPointwiseVecs<kIsa>;
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
