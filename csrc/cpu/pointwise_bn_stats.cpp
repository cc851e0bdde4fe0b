// CPU kernels of factorized_reduce_bn_stats, relu_pointwise_bn_stats and their backwards (schemas in
// ../fastdarts.cpp): DARTS's FactorizedReduce before its BN, for E pairs of weights at once (the skip candidates of
// every stride-2 edge leaving one state), and a ReLU and 1x1 conv before a BN (a cell's preprocessing), each with
// the BN statistics of its outputs. Both are the same loops over s "parts" of the input pixels: FactorizedReduce
// reads s = 2 parts (the even and the odd pixels, for the two halves of its output channels), the 1x1 conv one
// (every pixel, for all its output channels).
//
// factorized_reduce_bn_stats:
//
//   shapes:   x [N, C, H, W]; conv_1s[e], conv_2s[e] [h, C, 1, 1]; outs[e] [N, 2h, Ho, Wo], Ho = (H + 1) / 2,
//             Wo = (W + 1) / 2; mean, var [E, 2h]
//   forward:  r = relu(x) (x when relu is false); outs[e][:, :h] = conv_1s[e] r at the even pixels (2i, 2j),
//             outs[e][:, h:] = conv_2s[e] r at the odd pixels (2i + 1, 2j + 1), 0 where those fall outside x;
//             mean, var: the per-channel mean and biased variance of each output over (N, Ho, Wo), in double
//   backward: grad_x = [x > 0] (sum_e conv_1s[e]^T g_e[:, :h] at the even pixels, conv_2s[e]^T g_e[:, h:] at the
//             odd ones, 0 elsewhere); grad_conv_1s[e] = sum over positions of g_e[:, :h] r_even^T, and so for
//             conv_2s with the odd pixels.
//
// Floors, float32, one reduction cell's group of 4 edges at (64, 32, 32, 32) (C = 32, h = 16): the forward reads x
// (8 MiB: the even and odd pixels lie on every row, so every line of x is fetched) and writes 4 outputs of 2 MiB,
// 16.8 MB, 0.28 ms at 60 GB/s; its products are 2 x 16384 positions x 32 x 64 multiply-adds, 134 MFLOP, 0.3 ms at
// the 2 cores' AVX-512 FMA rate. The backward reads x and the 4 output gradients and writes grad_x: 25 MB, 0.42 ms,
// and twice the forward's products. The ATen composition it replaces (ReLU, strided slices, padding, concatenation,
// a matrix product and a copy back to channels_last per edge; in the backward a zero fill, two strided copies and
// a ReLU backward per edge, and a sum over the edges) took 7.7 ms forward and 27.6 ms backward for this group.
//
// relu_pointwise_bn_stats: outs[e] = weights[e] r, weights[e] [C_out, C, 1, 1], outs[e] [N, C_out, H, W]; its
// backward grad_x = [x > 0] sum_e weights[e]^T g_e and grad_weights[e] = sum over pixels of g_e r^T. The same floors
// as a 1x1 conv's, with the ReLU, its mask and the statistics in the same pass. Its x comes as a list of tensors,
// x = cat(xs, 1), and its gradient as one per input: a cell's output is its nodes side by side, which the kernel reads
// where they are (no concatenated copy is made, in the forward or in the backward).
//
// How (told for FactorizedReduce; the 1x1 conv is the same with one part). Work is split into fixed chunks of output
// rows (n, i), so that the sums come out the same whatever the number of threads, and a chunk into tiles of a few
// whole rows. For each tile, the ReLU of x at its rows' even pixels and at their odd pixels is packed (one output
// position a tile row: the even pixel's C channels, then the odd one's, each padded to a whole vector), and the two
// halves of every edge's output are two matrix products with the tile (tiles.h's register blocks): the first halves
// of all E edges side by side from the even channels, the second halves from the odd ones, so no multiply-add
// touches the zeros of FactorizedReduce's block-diagonal matrix. The statistics are summed from the register blocks,
// around each column's first value. The backward packs the E output gradients of the tile's rows into one tile in the
// same column order; their products with the transposed matrices give the gradient at the even and odd pixels, which
// is masked and written out for each output row's input rows 2i and 2i + 1 (zeros between), and the products of the
// gradient tile with the input tile give the weights' gradients, summed per chunk. The packs and the copies out run
// in whole vectors of the tier when the channels allow it (loops over a channel count known only at run time, and
// a memcpy call per position and output, took about a third of the forward's time on inputs in cache), and outputs
// of 8 MiB or more are written with non-temporal stores: the forward at (64, 64 -> 2 x 16, 32x32) went from 2.4-3.2
// ms to 2.0-2.2 ms (benchmarks/RESULTS.md), against 1.6-1.7 ms for torch.mm of its GEMM alone.
// With grad_inputs and grad_factors, the backward forms each output gradient as it packs it, a g + b (t - mean) + e
// per output channel (its BN's backward, as relu_dwconv.cpp's "Formed gradients"): a cell's preprocessing and a
// stride-2 skip never write theirs.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <optional>
#include <tuple>
#include <vector>

#include "fastdarts/checks.h"
#include "fastdarts/cpu_common.h"
#include "fastdarts/cpu_isa.h"
#include "fastdarts/tiles.h"

namespace fastdarts {
namespace {

using tiles::kPointwiseRows;
using tiles::kPointwiseVecs;
using tiles::outer_product_block;

// About this many output positions a chunk: a few chunks a thread at the search's sizes.
constexpr int64_t kChunkPositions = 1024;
// Output rows go through the products in tiles of about this many positions (whole rows): at 8x8 a tile of one row
// gave the weight gradient's register blocks 8 multiply-adds between loading and storing them (a tile of 4 rows:
// backward 8-25 % faster at 16x16 and 8x8). Tiles of 64 positions made the 32x32 forward 15-40 % slower.
constexpr int64_t kTilePositions = 32;
// Outputs (the forward's, grad_x) of at least this many bytes are written with non-temporal stores.
constexpr int64_t kStreamBytes = int64_t{8} << 20;

struct Geometry {
  int64_t N, C, H, W;
  int64_t s;       // parts: output pixel (i, j) reads input pixels (s i + p, s j + p) for p < s
  int64_t Ho, Wo;
  int64_t E, h;    // E outputs of s h channels: part p gives channels [p h, (p + 1) h)
  int64_t Cq;      // C padded to whole vectors: the input tile holds part p's pixel in [p Cq, p Cq + C)
  int64_t Nh;      // E h padded to whole vectors: output columns [p Nh, (p + 1) Nh) are every edge's channels of
                   // part p (edge e's at p Nh + e h)
  int64_t tile_rows;  // output rows a tile holds, one after the other
  int64_t P_r;        // a tile's positions, tile_rows Wo, rounded up to whole register blocks
  int64_t rows;    // N Ho output rows
  int64_t num_chunks;

  // x = cat(xs, 1)
  Geometry(at::TensorList xs, int64_t s, int64_t E, int64_t h)
      : N(xs[0].size(0)), C(total_channels(xs)), H(xs[0].size(2)), W(xs[0].size(3)), s(s),
        Ho((xs[0].size(2) + s - 1) / s), Wo((xs[0].size(3) + s - 1) / s), E(E), h(h) {
    const int64_t lanes = kVecLanes<float>;  // 16: a whole vector of every tier (and two of float64's 8 lanes)
    Cq = round_up(C, lanes);
    Nh = round_up(E * h, lanes);
    tile_rows = std::max<int64_t>(1, kTilePositions / std::max<int64_t>(Wo, 1));
    P_r = round_up(tile_rows * Wo, 8);  // kPointwiseRows of every tier divides 8
    rows = N * Ho;
    num_chunks = std::max<int64_t>(1, std::min<int64_t>(rows, rows * Wo / kChunkPositions));
  }
  int64_t Kp() const {
    return s * Cq;
  }
  int64_t Np() const {
    return s * Nh;
  }
  int64_t chunk_begin(int64_t chunk) const {
    return chunk * rows / num_chunks;
  }
  static int64_t total_channels(at::TensorList xs) {
    int64_t C = 0;
    for (const at::Tensor& x : xs) {
      C += x.size(1);
    }
    return C;
  }
};

// The weights of each part (parts[p][e]: [h, C, 1, 1]) as the parts' matrices, one after the other: forward
// m[(p Cq + k) Nh + e h + c] = parts[p][e][c, k] (input channel k, output column e h + c), transposed
// m[(p Nh + e h + c) Cq + k], zeros elsewhere.
template <typename T>
std::vector<T> weight_matrices(const std::vector<at::TensorList>& parts, const Geometry& g, bool transposed) {
  std::vector<T> m(g.s * g.Cq * g.Nh, T(0));
  for (int64_t part = 0; part < g.s; ++part) {
    for (int64_t e = 0; e < g.E; ++e) {
      const at::Tensor w = parts[part][e].contiguous();
      const T* src = w.const_data_ptr<T>();
      for (int64_t c = 0; c < g.h; ++c) {
        for (int64_t k = 0; k < g.C; ++k) {
          const int64_t col = e * g.h + c;
          const int64_t at = transposed ? (part * g.Nh + col) * g.Cq + k : (part * g.Cq + k) * g.Nh + col;
          m[at] = src[c * g.C + k];
        }
      }
    }
  }
  return m;
}

// Each output column's value at the first position (0, 0, 0), 0 for an empty batch: the shift of the statistics'
// sums, a value in the data's range so that a variance small against the mean does not cancel in the sum of squares.
template <typename T>
std::vector<T> first_outputs(at::TensorList xs, const std::vector<T>& m, bool relu, const Geometry& g) {
  std::vector<T> shift(g.Np(), T(0));
  if (g.N == 0) {
    return shift;
  }
  for (int64_t part = 0; part < g.s; ++part) {
    // the part's first pixel, (part, part), or zeros outside x
    at::Tensor pixel = at::zeros({g.C}, xs[0].options().dtype(at::kDouble));
    if (part < g.H && part < g.W) {
      std::vector<at::Tensor> pixels;
      for (const at::Tensor& x : xs) {
        pixels.push_back(x.select(0, 0).select(1, part).select(1, part));
      }
      pixel = at::cat(pixels).to(at::kDouble).contiguous();
      if (relu) {
        pixel = pixel.relu();
      }
    }
    const double* p = pixel.const_data_ptr<double>();
    for (int64_t col = 0; col < g.Nh; ++col) {
      double sum = 0.0;
      for (int64_t k = 0; k < g.C; ++k) {
        sum += p[k] * static_cast<double>(m[(part * g.Cq + k) * g.Nh + col]);
      }
      shift[part * g.Nh + col] = static_cast<T>(sum);
    }
  }
  return shift;
}

// Input i of x = cat(inputs, 1): its channels [c0, c0 + C) of x; in the backward its gradient.
template <typename T>
struct Input {
  const T* x;
  Strides xs;
  int64_t c0, C;
  T* grad_x;  // backward, or nullptr
  Strides gxs;
};

template <typename T>
struct Args {
  Geometry g;
  std::vector<Input<T>> inputs;
  bool relu;
  const T* matrices;         // weight_matrices, transposed in the backward
  std::vector<T*> outs;      // forward
  Strides os;
  double* moments;           // forward: [num_chunks][2][Np] sums and sums of squares, of out - shift
  const T* shift;            // forward: [Np], each column's first output value
  std::vector<const T*> grads;  // backward
  std::vector<Strides> gs;
  // Backward with formed gradients: output e's gradient is a grads[e] + b (grad_inputs[e] - mean) + e per output
  // channel, with grad_factors [E][4][s h] holding a, b, mean and e (relu_dwconv.cpp's "Formed gradients").
  std::vector<const T*> grad_inputs;
  std::vector<Strides> gis;
  const T* grad_factors = nullptr;
  bool input_grad;           // backward: each input's grad_x is written
  T* partials;               // backward: [num_chunks][s][Nh][Cq] weight gradients, or nullptr
};

template <typename T>
FASTDARTS_ALWAYS_INLINE T relu_of(T v, bool relu) {
  return relu ? std::max(v, T(0)) : v;  // std::max keeps a NaN, as torch.relu does
}

// dst[k] = relu(src[k]) (src[k] without the ReLU) for k < n, n a multiple of the tier's vector: whole vectors, where
// the compiler's loop over a count known only at run time spent more on its bounds than on the copy. With kStream,
// non-temporal stores (dst aligned to the vector).
template <typename T, CpuIsa kIsa, bool kStream = false>
FASTDARTS_ALWAYS_INLINE void copy_vectors(const T* __restrict__ src, T* __restrict__ dst, int64_t n, bool relu) {
  constexpr int64_t V = kLanes<T, kIsa>;
  const Vec<T, kIsa> zero{};
  for (int64_t k = 0; k < n; k += V) {
    Vec<T, kIsa> v;
    vec_load(v, src + k);
    if (relu) {
      v = v < zero ? zero : v;  // a NaN stays NaN, as in torch.relu
    }
    if constexpr (kStream) {
      vec_stream(dst + k, v);
    } else {
      vec_store(dst + k, v);
    }
  }
}

// Packs relu(x) at the pixels of part p of output rows row0 .. row0 + rows - 1 into tile[(r Wo + j) Kp + p Cq + k]
// (zeros where a pixel falls outside x). The padding columns stay as they are (zeros).
template <typename T, CpuIsa kIsa>
FASTDARTS_ALWAYS_INLINE void pack_pixels(const Args<T>& a, int64_t row0, int64_t rows, T* tile) {
  const Geometry& g = a.g;
  const int64_t Kp = g.Kp();
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t n = (row0 + r) / g.Ho, i = (row0 + r) % g.Ho;
    for (int64_t part = 0; part < g.s; ++part) {
      const int64_t y = g.s * i + part;
      T* row = tile + r * g.Wo * Kp + part * g.Cq;
      // one input at a time along the row: a stream of whole rows of each, not short pieces of all of them
      for (const Input<T>& in : a.inputs) {
        const T* src_row = in.x + n * in.xs.n + y * in.xs.h;
        for (int64_t j = 0; j < g.Wo; ++j) {
          T* d = row + j * Kp + in.c0;
          const int64_t xw = g.s * j + part;
          if (y >= g.H || xw >= g.W) {
            std::fill(d, d + in.C, T(0));
            continue;
          }
          const T* src = src_row + xw * in.xs.w;
          if (in.xs.c == 1 && in.C % kLanes<T, kIsa> == 0) {
            copy_vectors<T, kIsa>(src, d, in.C, a.relu);
          } else if (in.xs.c == 1) {
            for (int64_t k = 0; k < in.C; ++k) {
              d[k] = relu_of(src[k], a.relu);
            }
          } else {
            for (int64_t k = 0; k < in.C; ++k) {
              d[k] = relu_of(src[k * in.xs.c], a.relu);
            }
          }
        }
      }
    }
  }
}

// Vectors of columns in a register block of kPointwiseRows rows (tiles.h's outer_product_block) when the product
// has a multiple of them: two on AVX-512, 16 accumulators of its 32 registers that take 10 loads for 16 FMAs where
// one vector takes 9 for 8 (tiles.h's kPointwiseVecs: relu_dwconv's 1x1 convs at C = 16 have one vector).
template <CpuIsa kIsa>
constexpr int64_t kWideVecs = kIsa == CpuIsa::kAvx512 ? 2 : kPointwiseVecs<kIsa>;

// block[w Np + c] (+)= sum_{k < K} a[k a_k + w a_q] b[k b_k + c] for w < rows (a multiple of kPointwiseRows) and
// c < cols (a multiple of kB vectors), by register blocks of kB vectors; with `sums`, outer_product_block's
// statistics of the rows w < valid_rows around `shift`.
template <typename T, CpuIsa kIsa, int64_t kB>
FASTDARTS_ALWAYS_INLINE void product_blocks(const T* a, int64_t a_k, int64_t a_q, const T* b, int64_t b_k, int64_t K,
                                            T* block, int64_t Np, int64_t rows, int64_t cols, bool accumulate,
                                            T* sums = nullptr, int64_t valid_rows = 0, const T* shift = nullptr) {
  constexpr int64_t R = kPointwiseRows<kIsa>;
  constexpr int64_t step = kB * kLanes<T, kIsa>;
  for (int64_t w0 = 0; w0 < rows; w0 += R) {
    for (int64_t c0 = 0; c0 < cols; c0 += step) {
      outer_product_block<T, kIsa, R, kB>(a + w0 * a_q, a_k, a_q, b + c0, b_k, K, block + w0 * Np + c0, Np,
                                          accumulate, sums == nullptr ? nullptr : sums + c0, valid_rows - w0,
                                          shift == nullptr ? nullptr : shift + c0);
    }
  }
}

// product_blocks with the widest register block that cols allows.
template <typename T, CpuIsa kIsa>
FASTDARTS_ALWAYS_INLINE void products(const T* a, int64_t a_k, int64_t a_q, const T* b, int64_t b_k, int64_t K,
                                      T* block, int64_t Np, int64_t rows, int64_t cols, bool accumulate,
                                      T* sums = nullptr, int64_t valid_rows = 0, const T* shift = nullptr) {
  constexpr int64_t kWide = kWideVecs<kIsa>;
  if (cols % (kWide * kLanes<T, kIsa>) == 0) {
    product_blocks<T, kIsa, kWide>(a, a_k, a_q, b, b_k, K, block, Np, rows, cols, accumulate, sums, valid_rows,
                                   shift);
  } else {
    product_blocks<T, kIsa, kPointwiseVecs<kIsa>>(a, a_k, a_q, b, b_k, K, block, Np, rows, cols, accumulate, sums,
                                                  valid_rows, shift);
  }
}

template <typename T, CpuIsa kIsa>
FASTDARTS_ALWAYS_INLINE void forward_chunks(const Args<T>& a, int64_t begin, int64_t end, T* tile, T* block,
                                            T* row_sums) {
  const Geometry& g = a.g;
  const int64_t Kp = g.Kp(), Np = g.Np();
  // Outputs of whole vectors per position, in non-temporal stores when they outgrow the cache (as grad_x in the
  // backward): a plain store first reads each line it writes.
  const bool vectors = a.os.c == 1 && g.h % kLanes<T, kIsa> == 0;
  bool stream = vectors && g.E * g.N * g.s * g.h * g.Ho * g.Wo * static_cast<int64_t>(sizeof(T)) >= kStreamBytes &&
                (a.os.w * static_cast<int64_t>(sizeof(T))) % kVecBytes<kIsa> == 0 &&
                (a.os.h * static_cast<int64_t>(sizeof(T))) % kVecBytes<kIsa> == 0 &&
                (a.os.n * static_cast<int64_t>(sizeof(T))) % kVecBytes<kIsa> == 0;
  for (T* out : a.outs) {
    stream = stream && reinterpret_cast<uintptr_t>(out) % kVecBytes<kIsa> == 0;
  }
  for (int64_t chunk = begin; chunk < end; ++chunk) {
    double* moments = a.moments + chunk * 2 * Np;
    std::fill(moments, moments + 2 * Np, 0.0);
    const int64_t chunk_end = g.chunk_begin(chunk + 1);
    for (int64_t row0 = g.chunk_begin(chunk); row0 < chunk_end; row0 += g.tile_rows) {
      const int64_t rows = std::min(g.tile_rows, chunk_end - row0), P = rows * g.Wo;
      pack_pixels<T, kIsa>(a, row0, rows, tile);
      std::fill(row_sums, row_sums + 2 * Np, T(0));
      for (int64_t part = 0; part < g.s; ++part) {
        const int64_t col = part * g.Nh;
        products<T, kIsa>(tile + part * g.Cq, 1, Kp, a.matrices + part * g.Cq * g.Nh, g.Nh, g.C, block + col, Np,
                          P, g.Nh, false, row_sums + col, P, a.shift + col);
      }
      for (int64_t c = 0; c < 2 * Np; ++c) {
        moments[c] += static_cast<double>(row_sums[c]);
      }
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t n = (row0 + r) / g.Ho, i = (row0 + r) % g.Ho;
        for (int64_t e = 0; e < g.E; ++e) {
          for (int64_t j = 0; j < g.Wo; ++j) {
            T* dst = a.outs[e] + n * a.os.n + i * a.os.h + j * a.os.w;
            for (int64_t part = 0; part < g.s; ++part) {
              const T* src = block + (r * g.Wo + j) * Np + part * g.Nh + e * g.h;
              if (stream) {
                copy_vectors<T, kIsa, true>(src, dst + part * g.h, g.h, false);
              } else if (vectors) {
                copy_vectors<T, kIsa>(src, dst + part * g.h, g.h, false);
              } else if (a.os.c == 1) {
                std::memcpy(dst + part * g.h, src, g.h * sizeof(T));
              } else {
                for (int64_t c = 0; c < g.h; ++c) {
                  dst[(part * g.h + c) * a.os.c] = src[c];
                }
              }
            }
          }
        }
      }
    }
  }
  store_fence();
}

FASTDARTS_CPU_ISA_COPIES(forward_chunks)

// Writes row y of input `in`'s grad_x: at the pixels of `part` (w = s j + part) the gradient in
// d[j Kp + part Cq + in.c0 + k] masked by x > 0 (with the ReLU), zeros at the others. With `stream` (a channels_last
// grad_x whose rows are whole, aligned vectors) in non-temporal stores of the tier's vectors: grad_x is written once
// and read by the next op, which a plain store would first read into the cache.
template <typename T, CpuIsa kIsa>
FASTDARTS_ALWAYS_INLINE void write_grad_row(const Args<T>& a, const Input<T>& in, int64_t n, int64_t y, int64_t part,
                                            const T* d, bool stream) {
  const Geometry& g = a.g;
  const bool dense = in.gxs.c == 1 && in.xs.c == 1;
  if (stream) {
    constexpr int64_t V = kLanes<T, kIsa>;
    const Vec<T, kIsa> zero{};
    T* dst = in.grad_x + n * in.gxs.n + y * in.gxs.h;
    const T* src = in.x + n * in.xs.n + y * in.xs.h;
    for (int64_t w = 0; w < g.W; ++w) {
      const T* grad = d + (w / g.s) * g.Kp() + part * g.Cq + in.c0;
      const bool sampled = w % g.s == part;
      for (int64_t k = 0; k < in.C; k += V) {
        Vec<T, kIsa> v = zero;
        if (sampled) {
          vec_load(v, grad + k);
          if (a.relu) {
            Vec<T, kIsa> xv;
            vec_load(xv, src + w * in.xs.w + k);
            v = xv > zero ? v : zero;
          }
        }
        vec_stream(dst + w * in.C + k, v);
      }
    }
    return;
  }
  for (int64_t w = 0; w < g.W; ++w) {
    T* dst = in.grad_x + n * in.gxs.n + y * in.gxs.h + w * in.gxs.w;
    const T* src = in.x + n * in.xs.n + y * in.xs.h + w * in.xs.w;
    const T* grad = d + (w / g.s) * g.Kp() + part * g.Cq + in.c0;
    if (w % g.s != part) {
      for (int64_t k = 0; k < in.C; ++k) {
        dst[k * in.gxs.c] = T(0);
      }
    } else if (dense && a.relu) {
      for (int64_t k = 0; k < in.C; ++k) {
        dst[k] = src[k] > T(0) ? grad[k] : T(0);
      }
    } else if (dense) {
      std::memcpy(dst, grad, in.C * sizeof(T));
    } else {
      for (int64_t k = 0; k < in.C; ++k) {
        dst[k * in.gxs.c] = !a.relu || src[k * in.xs.c] > T(0) ? grad[k] : T(0);
      }
    }
  }
}

// n values of one output position's gradient, formed from the BN's output gradient g and input t (strides gc and tc
// between channels) with factors f (a, b, mean and e, C_out values each) from output channel ch0 on: dst[c] =
// a g + b (t - mean) + e. By the tier's vectors when `vectors` (both contiguous, n a multiple of the lanes).
template <typename T, CpuIsa kIsa>
FASTDARTS_ALWAYS_INLINE void form_values(const T* g, int64_t gc, const T* t, int64_t tc, const T* f, int64_t C_out,
                                         int64_t ch0, int64_t n, T* __restrict__ dst, bool vectors) {
  const T* a = f + ch0;
  const T* b = f + C_out + ch0;
  const T* m = f + 2 * C_out + ch0;
  const T* e = f + 3 * C_out + ch0;
  if (vectors) {
    using V = Vec<T, kIsa>;
    constexpr int64_t L = kLanes<T, kIsa>;
    for (int64_t c = 0; c < n; c += L) {
      V av, bv, mv, ev, gv, tv;
      vec_load(av, a + c);
      vec_load(bv, b + c);
      vec_load(mv, m + c);
      vec_load(ev, e + c);
      vec_load(gv, g + c);
      vec_load(tv, t + c);
      const V out = av * gv + bv * (tv - mv) + ev;
      vec_store(dst + c, out);
    }
    return;
  }
  for (int64_t c = 0; c < n; ++c) {
    dst[c] = a[c] * g[c * gc] + b[c] * (t[c * tc] - m[c]) + e[c];
  }
}

template <typename T, CpuIsa kIsa>
FASTDARTS_ALWAYS_INLINE void backward_chunks(const Args<T>& a, int64_t begin, int64_t end, T* tile, T* grad_tile,
                                             T* d_pixels) {
  const Geometry& g = a.g;
  const int64_t Kp = g.Kp(), Np = g.Np();
  // Stream grad_x when it outgrows the cache that would keep it for the next op, each input's in whole aligned
  // vectors.
  constexpr int64_t kVec = kVecBytes<kIsa> / static_cast<int64_t>(sizeof(T));
  const bool large = g.N * g.C * g.H * g.W * static_cast<int64_t>(sizeof(T)) >= kStreamBytes;
  std::vector<char> stream;
  for (const Input<T>& in : a.inputs) {
    stream.push_back(a.input_grad && large && in.gxs.c == 1 && in.xs.c == 1 && in.gxs.w == in.C &&
                     in.C % kVec == 0 && (in.gxs.h * static_cast<int64_t>(sizeof(T))) % kVecBytes<kIsa> == 0 &&
                     reinterpret_cast<uintptr_t>(in.grad_x) % kVecBytes<kIsa> == 0);
  }
  for (int64_t chunk = begin; chunk < end; ++chunk) {
    T* partial = a.partials == nullptr ? nullptr : a.partials + chunk * g.s * g.Nh * g.Cq;
    if (partial != nullptr) {
      std::fill(partial, partial + g.s * g.Nh * g.Cq, T(0));
    }
    const int64_t chunk_end = g.chunk_begin(chunk + 1);
    for (int64_t row0 = g.chunk_begin(chunk); row0 < chunk_end; row0 += g.tile_rows) {
      const int64_t rows = std::min(g.tile_rows, chunk_end - row0), P = rows * g.Wo;
      for (int64_t r = 0; r < rows; ++r) {  // the output gradients in the forward's column order
        const int64_t n = (row0 + r) / g.Ho, i = (row0 + r) % g.Ho;
        for (int64_t e = 0; e < g.E; ++e) {
          const Strides& gs = a.gs[e];
          const bool vectors = gs.c == 1 && g.h % kLanes<T, kIsa> == 0;
          const bool formed = a.grad_factors != nullptr;
          const bool formed_vectors = formed && vectors && a.gis[e].c == 1;
          for (int64_t j = 0; j < g.Wo; ++j) {
            const T* src = a.grads[e] + n * gs.n + i * gs.h + j * gs.w;
            for (int64_t part = 0; part < g.s; ++part) {
              T* dst = grad_tile + (r * g.Wo + j) * Np + part * g.Nh + e * g.h;
              if (formed) {
                const Strides& is = a.gis[e];
                form_values<T, kIsa>(src + part * g.h * gs.c, gs.c,
                                     a.grad_inputs[e] + n * is.n + i * is.h + j * is.w + part * g.h * is.c, is.c,
                                     a.grad_factors + e * 4 * g.s * g.h, g.s * g.h, part * g.h, g.h, dst,
                                     formed_vectors);
              } else if (vectors) {
                copy_vectors<T, kIsa>(src + part * g.h, dst, g.h, false);
              } else if (gs.c == 1) {
                std::memcpy(dst, src + part * g.h, g.h * sizeof(T));
              } else {
                for (int64_t c = 0; c < g.h; ++c) {
                  dst[c] = src[(part * g.h + c) * gs.c];
                }
              }
            }
          }
        }
      }
      if (a.input_grad) {
        for (int64_t part = 0; part < g.s; ++part) {
          products<T, kIsa>(grad_tile + part * g.Nh, 1, Np, a.matrices + part * g.Nh * g.Cq, g.Cq, g.E * g.h,
                            d_pixels + part * g.Cq, Kp, P, g.Cq, false);
        }
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t n = (row0 + r) / g.Ho, i = (row0 + r) % g.Ho;
          for (int64_t part = 0; part < g.s && g.s * i + part < g.H; ++part) {
            for (size_t input = 0; input < a.inputs.size(); ++input) {
              write_grad_row<T, kIsa>(a, a.inputs[input], n, g.s * i + part, part, d_pixels + r * g.Wo * Kp,
                                      stream[input] != 0);
            }
          }
        }
      }
      if (partial != nullptr) {
        pack_pixels<T, kIsa>(a, row0, rows, tile);
        for (int64_t part = 0; part < g.s; ++part) {
          products<T, kIsa>(grad_tile + part * g.Nh, Np, 1, tile + part * g.Cq, Kp, P, partial + part * g.Nh * g.Cq,
                            g.Cq, g.Nh, g.Cq, true);
        }
      }
    }
  }
  store_fence();
}

FASTDARTS_CPU_ISA_COPIES(backward_chunks)

std::vector<int64_t> output_sizes(const at::Tensor& x, int64_t s, int64_t h) {
  return {x.size(0), s * h, (x.size(2) + s - 1) / s, (x.size(3) + s - 1) / s};
}

// A non-empty list of 1x1 weights for the C channels of x (`like` its first input), all of the first's shape
// [C_out, C, 1, 1], C_out >= 1.
void check_weights_list(const char* op, const char* name, at::TensorList weights, int64_t C, const at::Tensor& like) {
  TORCH_CHECK_VALUE(!weights.empty(), op, ": ", name, " must be a non-empty list of tensors");
  const at::Tensor& first = weights[0];
  TORCH_CHECK_VALUE(first.dim() == 4 && first.size(0) >= 1 && first.size(1) == C && first.size(2) == 1 &&
                        first.size(3) == 1,
                    op, ": ", name, "[0] must have shape [C_out, C, 1, 1] with C_out >= 1 and C = ", C,
                    ", got shape ", first.sizes());
  check_sized_list(op, name, weights, static_cast<int64_t>(weights.size()), "output", first.sizes(), "x", like);
}

// x = cat(xs, 1): a non-empty list of image batches of one N, H, W, dtype and device. Returns x's channel count.
int64_t check_inputs(const char* op, at::TensorList xs) {
  TORCH_CHECK_VALUE(!xs.empty(), op, ": xs must be a non-empty list of tensors");
  for (size_t i = 0; i < xs.size(); ++i) {
    const ArgName item("xs", static_cast<int64_t>(i));
    check_images(op, item, xs[i]);
    if (i > 0) {
      TORCH_CHECK_VALUE(xs[i].size(0) == xs[0].size(0) && xs[i].size(2) == xs[0].size(2) &&
                            xs[i].size(3) == xs[0].size(3),
                        op, ": ", item, " must have the N, H, W of xs[0] ", xs[0].sizes(), ", got shape ",
                        xs[i].sizes());
      check_dtype_and_device(op, item, xs[i], "xs[0]", xs[0]);
    }
  }
  check_supported_dtype(op, xs[0]);
  TORCH_INTERNAL_ASSERT(xs[0].device().is_cpu());
  return Geometry::total_channels(xs);
}

template <typename T>
std::vector<Input<T>> inputs_of(at::TensorList xs) {
  std::vector<Input<T>> inputs;
  int64_t c0 = 0;
  for (const at::Tensor& x : xs) {
    inputs.push_back({x.const_data_ptr<T>(), strides_of(x), c0, x.size(1), nullptr, {}});
    c0 += x.size(1);
  }
  return inputs;
}

// Both ops' forward on x = cat(xs, 1): parts[p][e] the weights of part p of output e (s = parts.size()).
std::tuple<std::vector<at::Tensor>, at::Tensor, at::Tensor> forward(at::TensorList xs,
                                                                    const std::vector<at::TensorList>& parts,
                                                                    bool relu) {
  const at::Tensor& x0 = xs[0];
  const int64_t s = static_cast<int64_t>(parts.size());
  const int64_t E = static_cast<int64_t>(parts[0].size()), h = parts[0][0].size(0), C_out = s * h;
  const at::TensorOptions options = x0.options().memory_format(x0.suggest_memory_format());
  std::vector<at::Tensor> outs;
  for (int64_t e = 0; e < E; ++e) {
    outs.push_back(at::empty(output_sizes(x0, s, h), options));
  }
  at::Tensor mean = at::empty({E, C_out}, x0.options());
  at::Tensor var = at::empty({E, C_out}, x0.options());
  AT_DISPATCH_FLOATING_TYPES(x0.scalar_type(), "pointwise_bn_stats_cpu", [&] {
    const CpuIsa isa = cpu_isa();  // once per call, before the threads start
    const Geometry g(xs, s, E, h);
    const std::vector<scalar_t> matrices = weight_matrices<scalar_t>(parts, g, false);
    std::vector<double> moments(g.num_chunks * 2 * g.Np());
    const std::vector<scalar_t> shift = first_outputs(xs, matrices, relu, g);
    Args<scalar_t> a{g, inputs_of<scalar_t>(xs), relu, matrices.data(), {}, strides_of(outs[0]), moments.data(),
                     shift.data()};
    for (at::Tensor& out : outs) {
      a.outs.push_back(out.data_ptr<scalar_t>());
    }
    if (g.rows > 0) {
      parallel_for_balanced(0, g.num_chunks, 1, [&](int64_t begin, int64_t end) {
        // zeros: the tile's padding columns and rows are never written, and the products read them
        const int64_t values = g.P_r * (g.Kp() + g.Np()) + 2 * g.Np();
        scalar_t* tile = thread_scratch<scalar_t>(0, values);
        std::fill_n(tile, values, scalar_t(0));
        FASTDARTS_CALL_FOR_CPU_ISA(isa, forward_chunks, scalar_t, a, begin, end, tile, tile + g.P_r * g.Kp(),
                                   tile + g.P_r * (g.Kp() + g.Np()));
      });
    }
    // Biased variance from the sums in double; N = 0 gives NaN, as torch.var_mean of an empty tensor does.
    const std::vector<double> total = add_slots(moments.data(), g.num_chunks, 2 * g.Np());
    const double count = static_cast<double>(g.rows * g.Wo);
    scalar_t* m = mean.data_ptr<scalar_t>();
    scalar_t* v = var.data_ptr<scalar_t>();
    for (int64_t e = 0; e < E; ++e) {
      for (int64_t c = 0; c < C_out; ++c) {
        const int64_t col = c / h * g.Nh + e * h + c % h;
        const double centred = total[col] / count;  // the mean of out - shift
        m[e * C_out + c] = static_cast<scalar_t>(shift[col] + centred);
        v[e * C_out + c] = static_cast<scalar_t>(std::max(total[g.Np() + col] / count - centred * centred, 0.0));
      }
    }
  });
  return {outs, mean, var};
}

// Both ops' backward on x = cat(xs, 1): each input's grad_x if input_grad (else none), and if weight_grad the
// gradients of every part's weights (per part, per output).
std::tuple<std::vector<at::Tensor>, std::vector<std::vector<at::Tensor>>> backward(
    const char* op, at::TensorList grads, at::TensorList xs, const std::vector<at::TensorList>& parts, bool relu,
    bool input_grad, bool weight_grad, const std::optional<at::TensorList>& grad_inputs,
    const std::optional<at::Tensor>& grad_factors) {
  const at::Tensor& x0 = xs[0];
  const int64_t s = static_cast<int64_t>(parts.size());
  const int64_t E = static_cast<int64_t>(parts[0].size()), h = parts[0][0].size(0);
  check_sized_list(op, "grads", grads, E, "output", output_sizes(x0, s, h), "x", x0);
  at::Tensor factors;
  if (check_formed_grads(op, grad_inputs, grad_factors, E, "output", output_sizes(x0, s, h), "x", x0)) {
    factors = grad_factors->contiguous();
  }
  std::vector<at::Tensor> grad_xs;
  if (input_grad) {
    for (const at::Tensor& x : xs) {
      grad_xs.push_back(at::empty_like(x));
    }
  }
  std::vector<std::vector<at::Tensor>> grad_parts(s);
  if (weight_grad) {
    for (int64_t p = 0; p < s; ++p) {
      for (int64_t e = 0; e < E; ++e) {
        grad_parts[p].push_back(at::empty(parts[p][e].sizes(), parts[p][e].options()));
      }
    }
  }
  if (!input_grad && !weight_grad) {
    return {grad_xs, grad_parts};
  }
  AT_DISPATCH_FLOATING_TYPES(x0.scalar_type(), "pointwise_bn_stats_backward_cpu", [&] {
    const CpuIsa isa = cpu_isa();
    const Geometry g(xs, s, E, h);
    const std::vector<scalar_t> transposed = weight_matrices<scalar_t>(parts, g, true);
    // each chunk zeroes its own slots; an empty batch leaves them unwritten, so zeros for it
    at::Tensor partials = weight_grad ? at::zeros({g.num_chunks * s * g.Nh * g.Cq}, x0.options()) : at::Tensor();
    Args<scalar_t> a{g, inputs_of<scalar_t>(xs), relu, transposed.data(), {}, {}, nullptr};
    for (const at::Tensor& grad : grads) {
      a.grads.push_back(grad.const_data_ptr<scalar_t>());
      a.gs.push_back(strides_of(grad));
    }
    if (factors.defined()) {
      for (const at::Tensor& input : *grad_inputs) {
        a.grad_inputs.push_back(input.const_data_ptr<scalar_t>());
        a.gis.push_back(strides_of(input));
      }
      a.grad_factors = factors.const_data_ptr<scalar_t>();
    }
    a.input_grad = input_grad;
    for (size_t i = 0; i < grad_xs.size(); ++i) {
      a.inputs[i].grad_x = grad_xs[i].data_ptr<scalar_t>();
      a.inputs[i].gxs = strides_of(grad_xs[i]);
    }
    a.partials = weight_grad ? partials.data_ptr<scalar_t>() : nullptr;
    if (g.rows > 0) {
      parallel_for_balanced(0, g.num_chunks, 1, [&](int64_t begin, int64_t end) {
        const int64_t values = g.P_r * (2 * g.Kp() + g.Np());  // zeros: as the forward's
        scalar_t* tile = thread_scratch<scalar_t>(0, values);
        std::fill_n(tile, values, scalar_t(0));
        FASTDARTS_CALL_FOR_CPU_ISA(isa, backward_chunks, scalar_t, a, begin, end, tile, tile + g.P_r * g.Kp(),
                                   tile + g.P_r * (g.Kp() + g.Np()));
      });
    }
    if (weight_grad) {
      const std::vector<double> total = add_slots(partials.const_data_ptr<scalar_t>(), g.num_chunks, s * g.Nh * g.Cq);
      for (int64_t p = 0; p < s; ++p) {
        for (int64_t e = 0; e < E; ++e) {
          scalar_t* dst = grad_parts[p][e].data_ptr<scalar_t>();  // contiguous [h, C, 1, 1]
          for (int64_t c = 0; c < h; ++c) {
            for (int64_t k = 0; k < g.C; ++k) {
              dst[c * g.C + k] = static_cast<scalar_t>(total[(p * g.Nh + e * h + c) * g.Cq + k]);
            }
          }
        }
      }
    }
  });
  return {grad_xs, grad_parts};
}

void check_factorized_reduce(const char* op, at::TensorList xs, at::TensorList conv_1s, at::TensorList conv_2s) {
  check_weights_list(op, "conv_1s", conv_1s, check_inputs(op, xs), xs[0]);
  check_sized_list(op, "conv_2s", conv_2s, static_cast<int64_t>(conv_1s.size()), "output", conv_1s[0].sizes(), "x",
                   xs[0]);
}

std::tuple<std::vector<at::Tensor>, at::Tensor, at::Tensor> factorized_reduce_bn_stats_cpu(
    at::TensorList xs, at::TensorList conv_1s, at::TensorList conv_2s, bool relu) {
  check_factorized_reduce("factorized_reduce_bn_stats", xs, conv_1s, conv_2s);
  return forward(xs, {conv_1s, conv_2s}, relu);
}

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>>
factorized_reduce_bn_stats_backward_cpu(at::TensorList grads, at::TensorList xs, at::TensorList conv_1s,
                                        at::TensorList conv_2s, bool relu, bool input_grad, bool weight_grad,
                                        const std::optional<at::TensorList>& grad_inputs,
                                        const std::optional<at::Tensor>& grad_factors) {
  const char* op = "factorized_reduce_bn_stats_backward";
  check_factorized_reduce(op, xs, conv_1s, conv_2s);
  auto [grad_xs, grad_parts] = backward(op, grads, xs, {conv_1s, conv_2s}, relu, input_grad, weight_grad,
                                        grad_inputs, grad_factors);
  return {grad_xs, grad_parts[0], grad_parts[1]};
}

std::tuple<std::vector<at::Tensor>, at::Tensor, at::Tensor> relu_pointwise_bn_stats_cpu(at::TensorList xs,
                                                                                        at::TensorList weights,
                                                                                        bool relu) {
  const char* op = "relu_pointwise_bn_stats";
  check_weights_list(op, "weights", weights, check_inputs(op, xs), xs[0]);
  return forward(xs, {weights}, relu);
}

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>> relu_pointwise_bn_stats_backward_cpu(
    at::TensorList grads, at::TensorList xs, at::TensorList weights, bool relu, bool input_grad, bool weight_grad,
    const std::optional<at::TensorList>& grad_inputs, const std::optional<at::Tensor>& grad_factors) {
  const char* op = "relu_pointwise_bn_stats_backward";
  check_weights_list(op, "weights", weights, check_inputs(op, xs), xs[0]);
  auto [grad_xs, grad_parts] =
      backward(op, grads, xs, {weights}, relu, input_grad, weight_grad, grad_inputs, grad_factors);
  return {grad_xs, grad_parts[0]};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdarts, CPU, m) {
  m.impl("factorized_reduce_bn_stats", &factorized_reduce_bn_stats_cpu);
  m.impl("factorized_reduce_bn_stats_backward", &factorized_reduce_bn_stats_backward_cpu);
  m.impl("relu_pointwise_bn_stats", &relu_pointwise_bn_stats_cpu);
  m.impl("relu_pointwise_bn_stats_backward", &relu_pointwise_bn_stats_backward_cpu);
}

}  // namespace fastdarts
