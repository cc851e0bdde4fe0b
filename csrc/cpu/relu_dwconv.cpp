// CPU kernels of relu_dwconv and relu_dwconv_backward (schemas in ../fastdarts.cpp): ReLU, then K depthwise
// convolutions of the result with "same" padding and one stride. This is the first stage that the four conv
// candidates of a DARTS edge share (3x3, 5x5, 3x3 dilation 2, 5x5 dilation 2), computed from one read of x.
// relu_dwconv_pointwise and its backward are the same loops with each depthwise conv followed by its 1x1 conv
// (at the end of this comment).
//
//   shapes:   x [N, C, H, W]; w_i [C, 1, k_i, k_i] with k_i odd; out_i and grad_i [N, C, Ho, Wo], where
//             s = stride, d_i = dilations[i], p_i = d_i (k_i - 1) / 2, Ho = (H - 1) / s + 1, Wo = (W - 1) / s + 1
//   forward:  r = relu(x) (x itself when relu is false), taken as 0 outside the image;
//             out_i[n, c, ho, wo] = sum_{a, b < k_i} w_i[c, 0, a, b] r[n, c, ho s - p_i + d_i a, wo s - p_i + d_i b]
//   backward: grad_x[n, c, y, x] = [x > 0] sum_i sum_{a, b} w_i[c, 0, a, b] grad_i[n, c, ho, wo], summed over the
//                                  (ho, wo) with ho s - p_i + d_i a = y and wo s - p_i + d_i b = x (no mask when
//                                  relu is false): a transposed convolution
//             grad_w_i[c, 0, a, b] = sum_{n, ho, wo} grad_i[n, c, ho, wo] r[n, c, ho s - p_i + d_i a, wo s - p_i + d_i b]
//             The backward recomputes r from x, so autograd keeps only x and the weights, never r.
//
// Floors at (N, C, H, W) = (64, 16, 32, 32), stride 1, the DARTS four kernels, float32 (DESIGN.md 3):
//   compute: 9 + 25 + 9 + 25 = 68 taps per output element, N C Ho Wo = 2^20 output elements per kernel, so
//            2 * 68 * 2^20 = 143 MFLOP each for the forward, grad_x and grad_w: 428 MFLOP, 2.4 ms at 180 GFLOP/s.
//   memory:  forward reads x (4 MiB) and writes 4 outputs (16 MiB); backward reads x (4 MiB) and 4 output
//            gradients (16 MiB) and writes grad_x (4 MiB): 44 MiB = 46 MB, 1.8 ms at 26 GB/s.
//   The compute floor binds: the loops have to run close to the FMA rate, whatever the layout of x.
// At (64, 32, 16, 16) stride 2 (a reduction edge) the memory floor binds instead: 3 x 17.8 MFLOP = 53 MFLOP,
// 0.30 ms; x twice, the outputs and their gradients (2 MiB each) and grad_x: 10 MiB, 0.40 ms.
//
// How. The work is split into chunks of whole output rows of one image; the split depends on the shapes only.
// A chunk first copies the input rows it reads into a thread-local tile: ReLU applied, zero padding of the
// largest kernel's width around the image, channels innermost and padded to whole 64-byte vectors, whatever
// the layout of x. Every tap of every kernel then reads the tile without bounds checks, and the inner loop
// holds kCols output columns of one vector of channels in registers while it runs over the taps.
// The backward copies each grad_i into a tile the same way (padded by ceil(P / s) in output coordinates).
// grad_x runs the same inner loop on it, one phase (y mod s, x mod s) of the input grid at a time: the input
// positions of one phase receive gradient through a fixed subset of the taps, each reading the gradient tile
// at a fixed offset (taps whose offset is not a whole number of output rows or columns meet no gradient in that
// phase and are left out, so no multiply-add is spent on them). grad_w accumulates in the chunk's own slot of a
// partial-sum buffer while both tiles are in cache, and the slots are added up in chunk order, so grad_w is the
// same bit for bit whatever the number of threads.
//
// relu_dwconv_pointwise: t_i = P_i z_i per position, P_i [C, C] a 1x1 conv, z_i the depthwise output above. Each
// output row of z_i, still in cache, goes through P_i (pointwise_row in tiles.h: a block of positions x output
// channels in registers, each z value broadcast against a row of P_i); each block's per-channel sum and sum of
// squares are taken while it is still in registers, summed over the row and added to the chunk's slot (in double)
// before the row is written: z_i never reaches memory, and the BN after the 1x1 conv gets its batch statistics
// without a pass of its own. The backward writes dz_i = dt_i P_i into the gradient tile row by row (the same
// transposed pointwise_row, the tile's border rows included, each dt_i row prefetched two rows ahead: read one at a
// time between long stretches of arithmetic, the rows otherwise wait on memory) in place of copying grad_i there;
// grad_x and grad_w then run as above. dP_i = sum over positions of dt_i z_i^T needs z_i:
// while the chunk's own rows pass, each z_i row is recomputed from the input tile (the forward's conv_row) and
// multiplied out with its dt_i row (pointwise_grad_row, into the chunk's slot). At (64, 16, 32, 32), stride 1, the
// four DARTS kernels: the forward reads x (4 MiB) and writes the 4 outputs (16 MiB) where relu_dwconv, four 1x1
// convs and four statistics passes move 68 MiB; the backward reads x and 4 output gradients and writes grad_x
// (24 MiB) where recomputing z, four 1x1 conv backwards and relu_dwconv_backward move about 90 MiB.
// Formed gradients. With grad_inputs and grad_factors the backward forms each dt_i row as it reads it, a g + b (t -
// mean) + e per channel from a row of g (a BN's output gradient, which the candidates of an edge share) and of t (its
// input): the BN's backward, whose per-channel factors bn_weighted_sum_backward_factors made, and dt_i is never
// written nor read back. In a DARTS step at (64, 16, 32, 32) that spares a write and a read of 4 MiB per conv
// candidate and per sep conv's middle BN; g's row, read once per candidate, is in L2 after the first.
//
// Packed columns. A tile column of C < 16 channels padded to a 64-byte vector would spend 16 / C lanes of every
// multiply-add on padding (PC-DARTS's edges compute on C/4 channels: 4 of 16 lanes at C = 16). At stride 1, with
// C dividing 16 and Wo C a multiple of 16, the tiles instead hold columns of exactly C values, so that one vector
// spans G = 16 / C neighbouring columns: a tap of kernel i shifts the tile by whole columns (C values), the tap
// vectors repeat each channel's weight G times (for G = 2 or 4, tiles.h's unrolled loops load each column that a
// kernel row reads once for all its taps, as they load each vector unpacked), and each 1x1 conv becomes the
// block-diagonal Cp x Cp matrix of G copies of P_i (the same multiply-adds per position as before). Where the
// tier's registers hold whole columns (C divides their lanes), the 1x1 convs and their weight gradient instead
// take each input channel of every column by a lane shuffle (tiles.h's pointwise_row_columns): C shuffles and C
// multiply-adds a vector in place of Cp multiply-adds. Sums over positions (the moments, grad_w, the 1x1 gradient)
// come out per lane and are folded over the G lanes of each channel at the end. (Float64 vectors hold 8 lanes: the
// same with 8 in place of 16.)
//
// Normalised input. relu_dwconv_pointwise(_backward) with input_mean and input_invstd read u = (x - mean) invstd in
// place of x: the pack into the input tile normalises each value before the ReLU, so a sep conv's second stage
// reads its first stage's output t_1 through the middle BN and u is never written (nor read back, nor kept). The
// backward's grad_x is then dL/du (ReLU-masked by u > 0); the BN's own backward, through its batch statistics,
// follows it outside the kernel. At (64, 16, 32, 32) this spares writing and reading u: 8 MiB per sep conv, in the
// forward and again in the backward's recomputation.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

#include "fastdarts/checks.h"
#include "fastdarts/cpu_common.h"
#include "fastdarts/cpu_isa.h"
#include "fastdarts/relu_dwconv.h"
#include "fastdarts/tiles.h"

namespace fastdarts {
namespace {

using tiles::kCols;
using tiles::add_row_products;
using tiles::conv_row;
using tiles::depthwise_grad_weight_row;
using tiles::depthwise_row;
using tiles::pointwise_grad_row;
using tiles::pointwise_row;

// A chunk holds about this many output values (positions x padded channels), never less than one row: at
// C = 16 and 32x32 that is one image, whose input tile (40 x 40 x 16 floats, 100 KiB) stays in L2.
constexpr int64_t kChunkValues = 16384;
// A thread gets chunks worth at least this many depthwise multiply-adds: below that, waking a second thread costs
// more than it saves. Small images run far below the FMA rate (the rows are short, the 1x1 convs not counted): at
// the digits' 8x8, a sep conv's second stage over 64 images took 78 us on one thread and 49 us on two (1 << 20 had
// kept it on one).
constexpr int64_t kTaskMacs = int64_t{1} << 16;

// A tile: rows x cols positions of Cp values each, channels innermost.
struct TileShape {
  int64_t rows, cols, row_stride;
  int64_t size() const {
    return rows * row_stride;
  }
};

// Everything that depends on the shapes alone.
struct Geometry {
  int64_t N, C, H, W, Ho, Wo, s;
  int64_t P;     // the largest padding: the width of the input tile's zero border
  int64_t Pg;    // ceil(P / s): the gradient tile's border, in output positions
  int64_t Cp;    // C rounded up to whole vectors: the lanes of one step of the loops
  // Narrow channels packed (see "Packed columns" above): G > 1 columns share one vector of Cp lanes.
  int64_t G;           // columns per vector: Cp / C when packed, else 1
  int64_t col;         // values per column in the tiles: C when packed, else Cp
  int64_t Wo_r;        // Wo rounded up to whole column blocks of the loops (kCols vectors)
  int64_t loop_cols;   // the loops' steps per row: Wo_r / G
  int64_t loop_C;      // the 1x1 loops' input channels: C, or Cp for the block-diagonal matrix when packed
  int64_t valid_cols;  // the loops' steps that hold real output columns (moments, the 1x1 gradient): Wo / G
  int64_t chunk_rows, chunks_per_image, num_chunks;  // a chunk: chunk_rows output rows of one image
  int64_t grain;                                     // at::parallel_for's grain, in chunks
  // relu(x) for input rows from ho0 s - P and columns from -P (ho0: the chunk's first output row): the forward
  // and grad_w read (chunk_rows - 1) s + 2P + 1 rows and (Wo_r - 1) s + 2P + 1 columns; grad_x's mask reads the
  // chunk's own input rows, at most chunk_rows s, and W <= Wo_r s columns past the border.
  TileShape input;
  // grad_i for output rows from ho0 - Pg and columns from -Pg.
  TileShape grad;
  int64_t gx_cols;  // columns of the chunk's grad_x rows: Wo_r s >= W, the columns the s phases fill
  int64_t num_taps;
  std::vector<int64_t> kernel_size, dilation;  // k_i and d_i of kernel i
  std::vector<int64_t> tap_begin;  // kernel i's taps are [tap_begin[i], tap_begin[i + 1]), row-major (a, b)
  // Forward and grad_w: tap (a, b) of kernel i reads the input tile at offsets[tap] past the position of its
  // output's tap (0, 0) without padding: (P - p_i + d_i a) rows and (P - p_i + d_i b) columns further.
  std::vector<int64_t> offsets;
  // grad_x: the input position (s yy + py, s xx + px) receives grad_i[(s yy + py + p_i - d_i a) / s, ...] w_i[a, b]
  // from every tap whose row and column divisions are exact. The taps of kernel i in phase (py, px) are
  // [phase_begin[l], phase_begin[l + 1]) with l = (py s + px) K + i; each reads the gradient tile at phase_offsets
  // past output position (yy, xx), and the weight of tap phase_taps (a number in the numbering of tap_begin).
  // Every tap belongs to exactly one phase.
  std::vector<int64_t> phase_begin, phase_offsets, phase_taps;

  Geometry(const at::Tensor& x, at::TensorList weights, at::IntArrayRef dilations, int64_t stride, int64_t lanes,
           bool with_pointwise)
      : N(x.size(0)), C(x.size(1)), H(x.size(2)), W(x.size(3)), s(stride) {
    Ho = (H - 1) / s + 1;
    Wo = (W - 1) / s + 1;
    const int64_t K = static_cast<int64_t>(weights.size());
    P = 0;
    for (int64_t i = 0; i < K; ++i) {
      P = std::max(P, dilations[i] * (weights[i].size(2) - 1) / 2);
    }
    Pg = (P + s - 1) / s;
    Cp = round_up(C, lanes);
    // Packed when it takes fewer vector multiply-adds per row: the rows round up to whole blocks of kCols G
    // columns, and the 1x1 convs contract over Cp inputs instead of C (an upper bound: by lane shuffles they take
    // C shuffles and C multiply-adds).
    int64_t taps_per_position = 0;
    for (const at::Tensor& w : weights) {
      taps_per_position += w.size(2) * w.size(3);
    }
    const int64_t G_packed = C < Cp && Cp % C == 0 ? Cp / C : 1;
    const int64_t packed_cost =
        round_up(Wo, kCols * G_packed) / G_packed * (taps_per_position + (with_pointwise ? K * Cp : 0));
    const int64_t unpacked_cost = round_up(Wo, kCols) * (taps_per_position + (with_pointwise ? K * C : 0));
    const bool packed = s == 1 && G_packed > 1 && (Wo * C) % Cp == 0 && packed_cost < unpacked_cost;
    G = packed ? G_packed : 1;
    col = packed ? C : Cp;
    Wo_r = round_up(Wo, kCols * G);
    loop_cols = Wo_r / G;
    loop_C = packed ? Cp : C;
    valid_cols = Wo / G;
    chunk_rows = std::min(Ho, std::max<int64_t>(1, kChunkValues / (Wo_r * col)));
    chunks_per_image = (Ho + chunk_rows - 1) / chunk_rows;
    num_chunks = N * chunks_per_image;
    input.rows = chunk_rows * s + 2 * P;
    input.cols = Wo_r * s + 2 * P;
    input.row_stride = input.cols * col;
    grad.rows = chunk_rows + 2 * Pg;
    grad.cols = Wo_r + 2 * Pg;
    grad.row_stride = grad.cols * col;
    gx_cols = Wo_r * s;
    tap_begin.push_back(0);
    for (int64_t i = 0; i < K; ++i) {
      const int64_t k = weights[i].size(2);
      const int64_t d = dilations[i];
      kernel_size.push_back(k);
      dilation.push_back(d);
      const int64_t o = P - d * (k - 1) / 2;
      for (int64_t a = 0; a < k; ++a) {
        for (int64_t b = 0; b < k; ++b) {
          offsets.push_back((o + d * a) * input.row_stride + (o + d * b) * col);
        }
      }
      tap_begin.push_back(static_cast<int64_t>(offsets.size()));
    }
    num_taps = static_cast<int64_t>(offsets.size());
    phase_begin.push_back(0);
    for (int64_t py = 0; py < s; ++py) {
      for (int64_t px = 0; px < s; ++px) {
        for (int64_t i = 0; i < K; ++i) {
          const int64_t k = weights[i].size(2);
          const int64_t d = dilations[i];
          const int64_t p = d * (k - 1) / 2;
          for (int64_t a = 0; a < k; ++a) {
            // b descending: at stride 1 a kernel row's offsets then ascend by d Cp, as depthwise_row reads them
            for (int64_t b = k - 1; b >= 0; --b) {
              const int64_t dy = py + p - d * a;  // s times the row offset, when a multiple of s
              const int64_t dx = px + p - d * b;
              if (dy % s == 0 && dx % s == 0) {  // exact division, also for negative numbers
                phase_offsets.push_back((dy / s + Pg) * grad.row_stride + (dx / s + Pg) * col);
                phase_taps.push_back(tap_begin[i] + a * k + b);
              }
            }
          }
          phase_begin.push_back(static_cast<int64_t>(phase_offsets.size()));
        }
      }
    }
    grain = std::max<int64_t>(1, kTaskMacs / std::max<int64_t>(1, chunk_rows * loop_cols * Cp * num_taps));
  }

  int64_t taps(int64_t i) const {
    return tap_begin[i + 1] - tap_begin[i];
  }

  // Channel c of per-lane sums `lanes` (one vector): lane c, plus lanes c + C, c + 2C, ... when packed.
  double lane_sum(const double* lanes, int64_t c) const {
    double sum = 0.0;
    for (int64_t l = c; l < G * C; l += C) {
      sum += lanes[l];
    }
    return sum;
  }
};

// The weights as one vector of channels per tap: taps[t][c] = w_i[c, 0, a, b] for tap t = (a, b) of kernel i;
// zero for the padding channels; packed, lane l holds channel l mod C (the vector spans G columns).
template <typename T>
std::vector<T> tap_vectors(at::TensorList weights, const Geometry& g) {
  std::vector<T> taps(g.num_taps * g.Cp, T(0));
  for (size_t i = 0; i < weights.size(); ++i) {
    const at::Tensor w = weights[i].contiguous();
    const T* src = w.const_data_ptr<T>();
    const int64_t k = w.size(2);
    for (int64_t t = 0; t < k * k; ++t) {
      T* tap = taps.data() + (g.tap_begin[i] + t) * g.Cp;
      for (int64_t c = 0; c < g.C; ++c) {  // lane block + c holds channel c: no division per lane
        const T value = src[c * k * k + t];
        for (int64_t block = 0; block < g.G * g.C; block += g.C) {
          tap[block + c] = value;
        }
      }
    }
  }
  return taps;
}

// values [rows][C] as rows of kVecLanes lanes, lane l holding channel l mod C (C dividing kVecLanes): per-channel
// factors laid out as the vectors of packed columns see them.
template <typename T>
void spread_over_lanes(const T* values, int64_t rows, int64_t C, T* lanes) {
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t l = 0; l < kVecLanes<T>; ++l) {
      lanes[r * kVecLanes<T> + l] = values[r * C + l % C];
    }
  }
}

// The tap vectors in the order of the phase lists (Geometry::phase_taps).
template <typename T>
std::vector<T> phase_tap_vectors(const std::vector<T>& taps, const Geometry& g) {
  std::vector<T> ordered(g.num_taps * g.Cp);
  for (int64_t t = 0; t < g.num_taps; ++t) {
    std::copy_n(taps.begin() + g.phase_taps[t] * g.Cp, g.Cp, ordered.begin() + t * g.Cp);
  }
  return ordered;
}

// ---- Loops (and those of tiles.h). FASTDARTS_ALWAYS_INLINE, so that each is compiled for the instruction set of
// ---- the chunk loop that calls it (cpu_isa.h).

// dst[r * dst_row + w * dst_col + c] = f(src[r * s.h + w * s.w + c * s.c]) for r < rows, w < cols, c < C, with f
// relu or the identity, after the normalisation v -> (v - mean[c]) invstd[c] when kNormalise (as bn_weighted_sum
// computes it, so a normalised input tile holds the values that BN would have written). The loop order follows the
// source: channels innermost when they are contiguous. (Normalised rows contiguous on both sides go through
// normalise_rows instead.)
template <typename T, bool kRelu, bool kNormalise = false>
FASTDARTS_ALWAYS_INLINE void pack(const T* src, const Strides& s, int64_t rows, int64_t cols, int64_t C, T* dst,
                                  int64_t dst_row, int64_t dst_col, const T* mean = nullptr,
                                  const T* invstd = nullptr) {
  if (!kNormalise && s.c == 1 && s.w == C && dst_col == C) {
    // Whole rows contiguous on both sides (a packed tile's rows of a channels_last x): one run of cols C values a
    // row, which the compiler vectorizes; a loop over C = 4 or 8 channels a column ran one value at a time.
    for (int64_t r = 0; r < rows; ++r) {
      const T* __restrict__ from = src + r * s.h;
      T* __restrict__ to = dst + r * dst_row;
      for (int64_t e = 0; e < cols * C; ++e) {
        const T v = from[e];
        to[e] = kRelu && v < T(0) ? T(0) : v;  // a NaN stays NaN, as in torch.relu
      }
    }
  } else if (s.c == 1) {
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t w = 0; w < cols; ++w) {
        const T* __restrict__ from = src + r * s.h + w * s.w;
        T* __restrict__ to = dst + r * dst_row + w * dst_col;
        for (int64_t c = 0; c < C; ++c) {
          T v = from[c];
          if constexpr (kNormalise) {
            v = (v - mean[c]) * invstd[c];
          }
          to[c] = kRelu && v < T(0) ? T(0) : v;  // a NaN stays NaN, as in torch.relu
        }
      }
    }
  } else {
    for (int64_t c = 0; c < C; ++c) {
      for (int64_t r = 0; r < rows; ++r) {
        const T* __restrict__ from = src + c * s.c + r * s.h;
        T* __restrict__ to = dst + r * dst_row + c;
        for (int64_t w = 0; w < cols; ++w) {
          T v = from[w * s.w];
          if constexpr (kNormalise) {
            v = (v - mean[c]) * invstd[c];
          }
          to[w * dst_col] = kRelu && v < T(0) ? T(0) : v;
        }
      }
    }
  }
}

// Asks for one row of a channels_last tensor (cols columns of C values from src) to be brought into the cache; other
// layouts are left to the hardware. Rows read one at a time between long stretches of arithmetic (the backward's
// output gradients, 16 streams of 2 KiB rows for a group's first stage) otherwise stall on memory at every row.
template <typename T>
FASTDARTS_ALWAYS_INLINE void prefetch_row(const T* src, const Strides& s, int64_t cols, int64_t C) {
  if (s.c != 1 || cols <= 0) {
    return;
  }
  const char* begin = reinterpret_cast<const char*>(src);
  const char* end = reinterpret_cast<const char*>(src + (cols - 1) * s.w + C);
  for (const char* p = begin; p < end; p += 64) {
    __builtin_prefetch(p, 0, 3);
  }
}

// Non-temporal copies of a channels_last row block in vectors of kBytes (16, 32 or 64): when C values and the
// column stride fill whole vectors and dst is aligned to them. False (nothing written) otherwise.
template <int64_t kBytes, typename T>
FASTDARTS_ALWAYS_INLINE bool unpack_streamed(const T* src, int64_t src_row, int64_t Cp, int64_t rows, int64_t cols,
                                             int64_t C, T* dst, const Strides& s) {
#if defined(__x86_64__)
  using V = typename VecOf<T, kBytes>::type;
  constexpr int64_t kGroup = kBytes / static_cast<int64_t>(sizeof(T));
  if (s.c == 1 && s.w == C && Cp == C && (cols * C * sizeof(T)) % kBytes == 0 && (s.h * sizeof(T)) % kBytes == 0 &&
      reinterpret_cast<uintptr_t>(dst) % kBytes == 0) {
    // Whole rows contiguous on both sides (packed columns): each row one run of cols C values, in whole vectors
    // even where C values are less than one.
    for (int64_t r = 0; r < rows; ++r) {
      const T* from = src + r * src_row;
      T* to = dst + r * s.h;
      for (int64_t e = 0; e < cols * C; e += kGroup) {
        V v;
        vec_load(v, from + e);
        vec_stream(to + e, v);
      }
    }
    return true;
  }
  if (s.c != 1 || (C * sizeof(T)) % kBytes != 0 || (s.w * sizeof(T)) % kBytes != 0 ||
      (s.h * sizeof(T)) % kBytes != 0 || reinterpret_cast<uintptr_t>(dst) % kBytes != 0) {
    return false;
  }
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t w = 0; w < cols; ++w) {
      const T* from = src + r * src_row + w * Cp;
      T* to = dst + r * s.h + w * s.w;
      for (int64_t c = 0; c < C; c += kGroup) {
        V v;
        vec_load(v, from + c);
        vec_stream(to + c, v);
      }
    }
  }
  return true;
#else
  return false;
#endif
}

// dst[r * s.h + w * s.w + c * s.c] = src[r * src_row + w * Cp + c] for r < rows, w < cols, c < C, in the loop order
// of the destination.
template <typename T, CpuIsa kIsa>
FASTDARTS_ALWAYS_INLINE void unpack(const T* src, int64_t src_row, int64_t Cp, int64_t rows, int64_t cols, int64_t C,
                                    T* dst, const Strides& s) {
  // Channels_last with whole vectors of channels: non-temporal stores, which write the output lines without first
  // reading them into the cache (a plain store reads each line it writes); store_fence orders them. The tier's
  // widest vector that fits: a 64-byte store fills a line at once, where 16-byte ones (4 a line) fill the store
  // queue four times as fast.
  if constexpr (kVecBytes<kIsa> >= 64) {
    if (unpack_streamed<64>(src, src_row, Cp, rows, cols, C, dst, s)) {
      return;
    }
  }
  if constexpr (kVecBytes<kIsa> >= 32) {
    if (unpack_streamed<32>(src, src_row, Cp, rows, cols, C, dst, s)) {
      return;
    }
  }
  if (unpack_streamed<16>(src, src_row, Cp, rows, cols, C, dst, s)) {
    return;
  }
  if (s.c == 1) {
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t w = 0; w < cols; ++w) {
        const T* __restrict__ from = src + r * src_row + w * Cp;
        T* __restrict__ to = dst + r * s.h + w * s.w;
        for (int64_t c = 0; c < C; ++c) {
          to[c] = from[c];
        }
      }
    }
  } else {
    for (int64_t c = 0; c < C; ++c) {
      for (int64_t r = 0; r < rows; ++r) {
        const T* __restrict__ from = src + r * src_row + c;
        T* __restrict__ to = dst + c * s.c + r * s.h;
        for (int64_t w = 0; w < cols; ++w) {
          to[w * s.w] = from[w * Cp];
        }
      }
    }
  }
}

// ReLU's backward on rows of a tile: g[r * g_row + e] = 0 unless relu_x[r * x_row + e] > 0, for e < len. It runs
// on the tiles, where both are contiguous runs, so it compiles to blends; a select inside the strided unpack
// compiled to a mispredicted branch per value.
template <typename T>
FASTDARTS_ALWAYS_INLINE void mask_rows(T* g, int64_t g_row, const T* relu_x, int64_t x_row, int64_t rows,
                                       int64_t len) {
  for (int64_t r = 0; r < rows; ++r) {
    T* __restrict__ to = g + r * g_row;
    const T* __restrict__ m = relu_x + r * x_row;
    for (int64_t e = 0; e < len; ++e) {
      const T v = to[e];
      to[e] = m[e] > T(0) ? v : T(0);
    }
  }
}

// Zeroes what a pack into rows [r0, r1) and columns [c0, c1) of a tile leaves unwritten: only the border when
// the pack fills every value of a column (C == col), the whole tile otherwise.
template <typename T>
FASTDARTS_ALWAYS_INLINE void clear_around(const Geometry& g, const TileShape& shape, T* tile, int64_t r0, int64_t r1,
                                          int64_t c0, int64_t c1) {
  if (r0 >= r1 || g.C != g.col) {
    std::fill(tile, tile + shape.size(), T(0));
    return;
  }
  std::fill(tile, tile + r0 * shape.row_stride, T(0));
  for (int64_t r = r0; r < r1; ++r) {
    T* row = tile + r * shape.row_stride;
    std::fill(row, row + c0 * g.col, T(0));
    std::fill(row + c1 * g.col, row + shape.row_stride, T(0));
  }
  std::fill(tile + r1 * shape.row_stride, tile + shape.size(), T(0));
}

// How the input tile is made from x: r = relu(x) or x, of x normalised per channel first when `mean` is set.
template <typename T>
struct InputMap {
  bool relu;
  const T* mean = nullptr;  // [C] each, or nullptr
  const T* invstd = nullptr;
  // The same by lanes of packed columns, kVecLanes each, lane l holding channel l mod C (when C divides kVecLanes),
  // or nullptr.
  const T* mean_lanes = nullptr;
  const T* invstd_lanes = nullptr;
};

// pack's normalised rows, `values` contiguous values a row on both sides (a multiple of kVecLanes), by vectors of
// the tier: lane l of mean_lanes and invstd_lanes holds channel l mod C. Written as a loop over values, GCC
// vectorized it across runs instead (16 x 16 transposes: a quarter of a sep conv's second stage forward at C = 16).
template <typename T, bool kRelu, CpuIsa kIsa>
FASTDARTS_ALWAYS_INLINE void normalise_rows(const T* src, int64_t src_row, int64_t rows, int64_t values, T* dst,
                                            int64_t dst_row, const T* mean_lanes, const T* invstd_lanes) {
  using V = Vec<T, kIsa>;
  constexpr int64_t L = kLanes<T, kIsa>;
  constexpr int64_t kRun = kVecLanes<T> / L;  // the tier's vectors in a run of kVecLanes values
  V mean[kRun], invstd[kRun];
  for (int64_t v = 0; v < kRun; ++v) {
    vec_load(mean[v], mean_lanes + v * L);
    vec_load(invstd[v], invstd_lanes + v * L);
  }
  for (int64_t r = 0; r < rows; ++r) {
    const T* from = src + r * src_row;
    T* to = dst + r * dst_row;
    for (int64_t e0 = 0; e0 < values; e0 += kVecLanes<T>) {
#pragma GCC unroll 4
      for (int64_t v = 0; v < kRun; ++v) {
        V value;
        vec_load(value, from + e0 + v * L);
        value = (value - mean[v]) * invstd[v];
        if constexpr (kRelu) {
          value = value < V{} ? V{} : value;  // a NaN stays NaN, as in torch.relu
        }
        vec_store(to + e0 + v * L, value);
      }
    }
  }
}

// Fills the input tile of image n with r for input rows [y_origin, y_origin + input.rows) and columns from -P: r
// where it lies in the image, 0 elsewhere (padding rows and columns, padding channels).
template <typename T, CpuIsa kIsa>
FASTDARTS_ALWAYS_INLINE void load_input_tile(const Geometry& g, const T* x, const Strides& xs, const InputMap<T>& map,
                                             int64_t n, int64_t y_origin, T* tile) {
  const int64_t y_lo = std::max<int64_t>(0, y_origin);
  const int64_t y_hi = std::min(g.H, y_origin + g.input.rows);
  clear_around(g, g.input, tile, y_lo - y_origin, y_hi - y_origin, g.P, g.P + g.W);
  if (y_lo >= y_hi) {
    return;
  }
  const T* src = x + n * xs.n + y_lo * xs.h;
  T* dst = tile + (y_lo - y_origin) * g.input.row_stride + g.P * g.col;
  const int64_t rows = y_hi - y_lo, row = g.input.row_stride;
  if (map.mean_lanes != nullptr && xs.c == 1 && xs.w == g.C && g.col == g.C && g.W * g.C % kVecLanes<T> == 0) {
    if (map.relu) {
      normalise_rows<T, true, kIsa>(src, xs.h, rows, g.W * g.C, dst, row, map.mean_lanes, map.invstd_lanes);
    } else {
      normalise_rows<T, false, kIsa>(src, xs.h, rows, g.W * g.C, dst, row, map.mean_lanes, map.invstd_lanes);
    }
  } else if (map.mean != nullptr) {
    if (map.relu) {
      pack<T, true, true>(src, xs, rows, g.W, g.C, dst, row, g.col, map.mean, map.invstd);
    } else {
      pack<T, false, true>(src, xs, rows, g.W, g.C, dst, row, g.col, map.mean, map.invstd);
    }
  } else if (map.relu) {
    pack<T, true>(src, xs, rows, g.W, g.C, dst, row, g.col);
  } else {
    pack<T, false>(src, xs, rows, g.W, g.C, dst, row, g.col);
  }
}

// Fills the gradient tile of image n with grad for output rows [ho_origin, ho_origin + grad.rows) and columns
// from -Pg, 0 outside the output.
template <typename T>
FASTDARTS_ALWAYS_INLINE void load_grad_tile(const Geometry& g, const T* grad, const Strides& gs, int64_t n,
                                            int64_t ho_origin, T* tile) {
  const int64_t ho_lo = std::max<int64_t>(0, ho_origin);
  const int64_t ho_hi = std::min(g.Ho, ho_origin + g.grad.rows);
  clear_around(g, g.grad, tile, ho_lo - ho_origin, ho_hi - ho_origin, g.Pg, g.Pg + g.Wo);
  if (ho_lo >= ho_hi) {
    return;
  }
  pack<T, false>(grad + n * gs.n + ho_lo * gs.h, gs, ho_hi - ho_lo, g.Wo, g.C,
                 tile + (ho_lo - ho_origin) * g.grad.row_stride + g.Pg * g.col, g.grad.row_stride, g.col);
}

// One output row of kernel i (forward, z's recomputation) or of its transposed correlation (grad_x at stride 1)
// into (onto, when accumulate) a tile row, in loop steps (one vector of G columns when packed).
template <typename T, CpuIsa kIsa>
FASTDARTS_ALWAYS_INLINE void kernel_row(const Geometry& g, int64_t i, const T* in, const int64_t* offsets,
                                        const T* taps, T* out, bool accumulate) {
  depthwise_row<T, kIsa>(in, g.kernel_size[i], g.dilation[i], g.s, offsets, taps, out, g.loop_cols, g.Cp, accumulate,
                         g.G);
}

// Whether tier isa runs the 1x1 convs of packed columns by lane shuffles (tiles.h's pointwise_row_columns; its
// registers hold whole columns), each kernel's slot of pointwise_matrices then holding its column patterns, rather
// than by the block-diagonal Cp x Cp matrix.
template <typename T>
bool shuffles_columns(const Geometry& g, CpuIsa isa) {
  return g.G > 1 && tiles::shuffles_columns<T>(isa, g.C);
}

// Kernel i's 1x1 conv of one tile row (matrix: its slot of pointwise_matrices), with pointwise_row's moments when
// `sums` is given.
template <typename T, CpuIsa kIsa>
FASTDARTS_ALWAYS_INLINE void pointwise_conv_row(const Geometry& g, const T* in, const T* matrix, T* out,
                                                T* sums = nullptr) {
  if (!shuffles_columns<T>(g, kIsa)) {
    pointwise_row<T, kIsa>(in, matrix, out, g.loop_cols, g.loop_C, g.Cp, sums, g.valid_cols);
  } else if (g.C == 1) {  // C divides the tier's lanes (shuffles_columns): 1, 2, 4 or 8
    tiles::pointwise_row_columns<T, kIsa, 1>(in, matrix, out, g.loop_cols, g.Cp, sums, g.valid_cols);
  } else if (g.C == 2) {
    tiles::pointwise_row_columns<T, kIsa, 2>(in, matrix, out, g.loop_cols, g.Cp, sums, g.valid_cols);
  } else if constexpr (kLanes<T, kIsa> >= 4) {
    if (g.C == 4) {
      tiles::pointwise_row_columns<T, kIsa, 4>(in, matrix, out, g.loop_cols, g.Cp, sums, g.valid_cols);
    } else if constexpr (kLanes<T, kIsa> >= 8) {
      tiles::pointwise_row_columns<T, kIsa, 8>(in, matrix, out, g.loop_cols, g.Cp, sums, g.valid_cols);
    }
  }
}

// One row's share of kernel i's 1x1 weight gradient (partial: its slot, [Cp][Cp], or [C][Cp] of column sums when
// shuffles_columns), over the row's valid columns.
template <typename T, CpuIsa kIsa>
FASTDARTS_ALWAYS_INLINE void pointwise_conv_grad_row(const Geometry& g, const T* grad, const T* z, T* partial) {
  if (!shuffles_columns<T>(g, kIsa)) {
    pointwise_grad_row<T, kIsa>(grad, z, partial, g.valid_cols, g.loop_C, g.Cp);
  } else if (g.C == 1) {
    tiles::pointwise_grad_row_columns<T, kIsa, 1>(grad, z, partial, g.valid_cols, g.Cp);
  } else if (g.C == 2) {
    tiles::pointwise_grad_row_columns<T, kIsa, 2>(grad, z, partial, g.valid_cols, g.Cp);
  } else if constexpr (kLanes<T, kIsa> >= 4) {
    if (g.C == 4) {
      tiles::pointwise_grad_row_columns<T, kIsa, 4>(grad, z, partial, g.valid_cols, g.Cp);
    } else if constexpr (kLanes<T, kIsa> >= 8) {
      tiles::pointwise_grad_row_columns<T, kIsa, 8>(grad, z, partial, g.valid_cols, g.Cp);
    }
  }
}

template <typename T>
struct ForwardArgs {
  const Geometry& g;
  const T* x;
  Strides xs;
  InputMap<T> map;
  const T* taps;           // tap_vectors
  std::vector<T*> outs;    // K outputs, all with strides `os`
  Strides os;
  // relu_dwconv_pointwise: each depthwise output row goes through kernel i's 1x1 conv (pointwise_matrices, not
  // transposed) before it is written, and its moments go to the chunk's slot [num_chunks][K][2][Cp] of `moments`
  // (nullptr: no statistics wanted). nullptr for relu_dwconv.
  const T* pointwise = nullptr;
  double* moments = nullptr;
};

// Chunks [begin, end) of the forward, with scratch space for one input tile, two output rows (the second is the
// 1x1 conv's output, when there is one) and a row's sums ([2][Cp], with statistics).
template <typename T, CpuIsa kIsa>
FASTDARTS_ALWAYS_INLINE void forward_chunks(const ForwardArgs<T>& f, int64_t begin, int64_t end, T* tile, T* row,
                                            T* pointwise_row_out, T* row_sums) {
  const Geometry& g = f.g;
  const int64_t K = static_cast<int64_t>(f.outs.size());
  for (int64_t chunk = begin; chunk < end; ++chunk) {
    const int64_t n = chunk / g.chunks_per_image;
    const int64_t ho0 = chunk % g.chunks_per_image * g.chunk_rows;
    const int64_t ho1 = std::min(g.Ho, ho0 + g.chunk_rows);
    double* moments = f.moments == nullptr ? nullptr : f.moments + chunk * K * 2 * g.Cp;
    if (moments != nullptr) {
      std::fill(moments, moments + K * 2 * g.Cp, 0.0);
    }
    load_input_tile<T, kIsa>(g, f.x, f.xs, f.map, n, ho0 * g.s - g.P, tile);
    for (int64_t ho = ho0; ho < ho1; ++ho) {
      const T* in = tile + (ho - ho0) * g.s * g.input.row_stride;
      for (int64_t i = 0; i < K; ++i) {
        const int64_t t0 = g.tap_begin[i];
        kernel_row<T, kIsa>(g, i, in, g.offsets.data() + t0, f.taps + t0 * g.Cp, row, false);
        const T* result = row;
        if (f.pointwise != nullptr) {
          if (moments == nullptr) {
            pointwise_conv_row<T, kIsa>(g, row, f.pointwise + i * g.Cp * g.Cp, pointwise_row_out);
          } else {  // the row's moments in T as its blocks leave the registers, then into the chunk's (double)
            std::fill(row_sums, row_sums + 2 * g.Cp, T(0));
            pointwise_conv_row<T, kIsa>(g, row, f.pointwise + i * g.Cp * g.Cp, pointwise_row_out, row_sums);
            double* row_moments = moments + i * 2 * g.Cp;
            for (int64_t c = 0; c < 2 * g.Cp; ++c) {
              row_moments[c] += static_cast<double>(row_sums[c]);
            }
          }
          result = pointwise_row_out;
        }
        unpack<T, kIsa>(result, 0, g.col, 1, g.Wo, g.C, f.outs[i] + n * f.os.n + ho * f.os.h, f.os);
      }
    }
  }
  store_fence();
}

FASTDARTS_CPU_ISA_COPIES(forward_chunks)

template <typename T>
struct BackwardArgs {
  const Geometry& g;
  const T* x;
  Strides xs;
  InputMap<T> map;
  std::vector<const T*> grads;  // K output gradients
  std::vector<Strides> gs;
  const T* phase_taps;  // phase_tap_vectors; read only for grad_x
  T* grad_x;              // nullptr: not wanted
  Strides gxs;
  T* partials;  // [num_chunks][num_taps][Cp], one slot per chunk; nullptr: grad_w not wanted
  // relu_dwconv_pointwise_backward: grads are the 1x1 convs' output gradients dt_i. The gradient tile of kernel i
  // is then dz_i = dt_i P_i (pointwise_matrices, transposed), computed row by row from dt_i, and while the chunk's
  // own rows pass by, z_i is recomputed from the input tile (`taps`, tap_vectors) for P_i's gradient, which adds
  // up in the chunk's slot [num_chunks][K][Cp][Cp] of `pointwise_partials` (nullptr: not wanted).
  const T* pointwise_transposed = nullptr;
  const T* taps = nullptr;
  T* pointwise_partials = nullptr;
  // With a normalised input and grad_x: the chunk's slot [num_chunks][2][Cp] of per-lane sums of dL/du and of
  // dL/du u over its rows (u the normalised input), for the normalisation's backward; nullptr otherwise.
  double* input_sums = nullptr;
  // With grad_inputs (relu_dwconv_pointwise_backward only): dt_i = a grads[i] + b (grad_inputs[i] - mean) + e per
  // channel, formed as each row is read (a BN's backward), with grad_factors [K][4][C] holding a, b, mean and e.
  std::vector<const T*> grad_inputs;
  std::vector<Strides> gis;
  const T* grad_factors = nullptr;
  // The same factors by lanes of packed columns, [K][4][kVecLanes], lane l holding channel l mod C (filled when C
  // divides kVecLanes): made once per call, not per row.
  const T* grad_factor_lanes = nullptr;
};

// One dt row formed from a row of the BN's output gradient and one of its input (BackwardArgs::grad_inputs):
// dst[w * dst_col + c] = a[c] grad + b[c] (input - mean[c]) + e[c], f holding a, b, mean and e (C values each).
// kNV > 0: channels contiguous in both rows, the first kNV vectors of the tier's of them, whose factors stay in
// registers.
template <typename T, CpuIsa kIsa, int64_t kNV>
FASTDARTS_ALWAYS_INLINE void pack_formed(const T* grad, const Strides& gs, const T* input, const Strides& is,
                                         int64_t cols, int64_t C, const T* f, T* dst, int64_t dst_col) {
  if constexpr (kNV > 0) {
    using V = Vec<T, kIsa>;
    constexpr int64_t L = kLanes<T, kIsa>;
    V a[kNV], b[kNV], m[kNV], e[kNV];
#pragma GCC unroll 4
    for (int64_t v = 0; v < kNV; ++v) {
      vec_load(a[v], f + v * L);
      vec_load(b[v], f + C + v * L);
      vec_load(m[v], f + 2 * C + v * L);
      vec_load(e[v], f + 3 * C + v * L);
    }
    for (int64_t w = 0; w < cols; ++w) {
#pragma GCC unroll 4
      for (int64_t v = 0; v < kNV; ++v) {
        V g, t;
        vec_load(g, grad + w * gs.w + v * L);
        vec_load(t, input + w * is.w + v * L);
        const V out = a[v] * g + b[v] * (t - m[v]) + e[v];
        vec_store(dst + w * dst_col + v * L, out);
      }
    }
  } else {
    const T* __restrict__ a = f;
    const T* __restrict__ b = f + C;
    const T* __restrict__ m = f + 2 * C;
    const T* __restrict__ e = f + 3 * C;
    for (int64_t c = 0; c < C; ++c) {
      for (int64_t w = 0; w < cols; ++w) {
        dst[w * dst_col + c] = a[c] * grad[w * gs.w + c * gs.c] + b[c] * (input[w * is.w + c * is.c] - m[c]) + e[c];
      }
    }
  }
}

// pack_formed of n values (a multiple of the tier's lanes L) of rows whose columns of C values lie one after the
// other in grad, input and dst (packed columns, C dividing L): whole vectors of L / C columns, the factors by lanes
// (f_lanes: a, b, mean and e, kVecLanes values each, lane l holding channel l mod C).
template <typename T, CpuIsa kIsa>
FASTDARTS_ALWAYS_INLINE void pack_formed_columns(const T* grad, const T* input, int64_t n, const T* f_lanes, T* dst) {
  using V = Vec<T, kIsa>;
  constexpr int64_t L = kLanes<T, kIsa>;
  V a, b, m, e;
  vec_load(a, f_lanes);
  vec_load(b, f_lanes + kVecLanes<T>);
  vec_load(m, f_lanes + 2 * kVecLanes<T>);
  vec_load(e, f_lanes + 3 * kVecLanes<T>);
  for (int64_t i = 0; i < n; i += L) {
    V g, t;
    vec_load(g, grad + i);
    vec_load(t, input + i);
    const V out = a * g + b * (t - m) + e;
    vec_store(dst + i, out);
  }
}

// pack_formed by whole vectors where the rows allow it, up to 4 vectors of channels at a time (16 registers of
// factors: AVX2 has 16 in all), or of several packed columns (f_lanes: BackwardArgs::grad_factor_lanes), else value
// by value.
template <typename T, CpuIsa kIsa>
FASTDARTS_ALWAYS_INLINE void pack_formed_row(const T* grad, const Strides& gs, const T* input, const Strides& is,
                                             int64_t cols, int64_t C, const T* f, const T* f_lanes, T* dst,
                                             int64_t dst_col) {
  constexpr int64_t L = kLanes<T, kIsa>;
  if (gs.c == 1 && is.c == 1 && gs.w == C && is.w == C && dst_col == C && L % C == 0) {
    const int64_t whole = cols - cols % (L / C);  // columns in whole vectors; the rest value by value
    pack_formed_columns<T, kIsa>(grad, input, whole * C, f_lanes, dst);
    pack_formed<T, kIsa, 0>(grad + whole * C, gs, input + whole * C, is, cols - whole, C, f, dst + whole * C, C);
    return;
  }
  if (gs.c != 1 || is.c != 1 || C % L != 0) {
    pack_formed<T, kIsa, 0>(grad, gs, input, is, cols, C, f, dst, dst_col);
    return;
  }
  for (int64_t c0 = 0; c0 < C; c0 += 4 * L) {
    const int64_t nv = std::min<int64_t>(4, (C - c0) / L);
    if (nv == 4) {
      pack_formed<T, kIsa, 4>(grad + c0, gs, input + c0, is, cols, C, f + c0, dst + c0, dst_col);
    } else if (nv == 3) {
      pack_formed<T, kIsa, 3>(grad + c0, gs, input + c0, is, cols, C, f + c0, dst + c0, dst_col);
    } else if (nv == 2) {
      pack_formed<T, kIsa, 2>(grad + c0, gs, input + c0, is, cols, C, f + c0, dst + c0, dst_col);
    } else {
      pack_formed<T, kIsa, 1>(grad + c0, gs, input + c0, is, cols, C, f + c0, dst + c0, dst_col);
    }
  }
}

// The gradient tile of image n for kernel i of relu_dwconv_pointwise_backward (BackwardArgs), for output rows
// from ho0 - Pg, and the chunk's share of that kernel's 1x1 weight gradient. dt_row and z_row: scratch rows of
// Wo_r x Cp values, dt_row zero past Wo columns and C channels (the pack below never writes there), so that the
// tile's columns past Wo and its padding channels come out zero.
template <typename T, CpuIsa kIsa>
FASTDARTS_ALWAYS_INLINE void pointwise_grad_tile(const BackwardArgs<T>& b, int64_t i, int64_t n, int64_t ho0,
                                                 int64_t ho1, const T* input_tile, T* grad_tile, T* dt_row,
                                                 T* z_row, T* pointwise_partial) {
  const Geometry& g = b.g;
  const int64_t ho_origin = ho0 - g.Pg;
  const int64_t ho_lo = std::max<int64_t>(0, ho_origin);
  const int64_t ho_hi = std::min(g.Ho, ho_origin + g.grad.rows);
  clear_around(g, g.grad, grad_tile, ho_lo - ho_origin, ho_hi - ho_origin, g.Pg, g.Pg + g.Wo_r);
  const Strides& gs = b.gs[i];
  constexpr int64_t kAhead = 2;  // rows prefetched ahead: the next kernel's first ones once this one's run out
  const bool next_kernel = i + 1 < static_cast<int64_t>(b.grads.size());
  const bool formed = !b.grad_inputs.empty();
  for (int64_t ho = ho_lo; ho < ho_hi; ++ho) {
    if (ho + kAhead < ho_hi) {
      prefetch_row(b.grads[i] + n * gs.n + (ho + kAhead) * gs.h, gs, g.Wo, g.C);
      if (formed) {
        prefetch_row(b.grad_inputs[i] + n * b.gis[i].n + (ho + kAhead) * b.gis[i].h, b.gis[i], g.Wo, g.C);
      }
    } else if (next_kernel && ho_lo + ho + kAhead - ho_hi < ho_hi) {
      const int64_t next_ho = ho_lo + ho + kAhead - ho_hi;
      const Strides& next = b.gs[i + 1];
      prefetch_row(b.grads[i + 1] + n * next.n + next_ho * next.h, next, g.Wo, g.C);
      if (formed) {
        const Strides& next_input = b.gis[i + 1];
        prefetch_row(b.grad_inputs[i + 1] + n * next_input.n + next_ho * next_input.h, next_input, g.Wo, g.C);
      }
    }
    if (formed) {
      const T* factor_lanes = b.grad_factor_lanes == nullptr ? nullptr : b.grad_factor_lanes + i * 4 * kVecLanes<T>;
      const T* input_row = b.grad_inputs[i] + n * b.gis[i].n + ho * b.gis[i].h;
      pack_formed_row<T, kIsa>(b.grads[i] + n * gs.n + ho * gs.h, gs, input_row, b.gis[i], g.Wo, g.C,
                               b.grad_factors + i * 4 * g.C, factor_lanes, dt_row, g.col);
    } else {
      pack<T, false>(b.grads[i] + n * gs.n + ho * gs.h, gs, 1, g.Wo, g.C, dt_row, 0, g.col);
    }
    pointwise_conv_row<T, kIsa>(g, dt_row, b.pointwise_transposed + i * g.Cp * g.Cp,
                                grad_tile + (ho - ho_origin) * g.grad.row_stride + g.Pg * g.col);
    if (pointwise_partial != nullptr && ho >= ho0 && ho < ho1) {
      const int64_t t0 = g.tap_begin[i];
      kernel_row<T, kIsa>(g, i, input_tile + (ho - ho0) * g.s * g.input.row_stride, g.offsets.data() + t0,
                          b.taps + t0 * g.Cp, z_row, false);
      pointwise_conv_grad_row<T, kIsa>(g, dt_row, z_row, pointwise_partial + i * g.Cp * g.Cp);
    }
  }
}

// Chunks [begin, end) of the backward, with scratch space for an input tile, a gradient tile and the chunk's
// grad_x rows (chunk_rows s rows of gx_cols x Cp values), and for relu_dwconv_pointwise_backward two rows
// (pointwise_grad_tile's dt_row and z_row).
template <typename T, CpuIsa kIsa>
FASTDARTS_ALWAYS_INLINE void backward_chunks(const BackwardArgs<T>& b, int64_t begin, int64_t end, T* input_tile,
                                             T* grad_tile, T* grad_x_rows, T* dt_row, T* z_row) {
  const Geometry& g = b.g;
  const int64_t K = static_cast<int64_t>(b.grads.size());
  const bool want_input_tile = b.partials != nullptr || b.pointwise_partials != nullptr ||
                               (b.grad_x != nullptr && (b.map.relu || b.input_sums != nullptr));
  const int64_t grad_x_row = g.gx_cols * g.col;
  for (int64_t chunk = begin; chunk < end; ++chunk) {
    const int64_t n = chunk / g.chunks_per_image;
    const int64_t ho0 = chunk % g.chunks_per_image * g.chunk_rows;
    const int64_t ho1 = std::min(g.Ho, ho0 + g.chunk_rows);
    // The input rows whose gradient this chunk owns; together the chunks of an image cover [0, H) once.
    const int64_t y0 = ho0 * g.s;
    const int64_t y1 = ho1 == g.Ho ? g.H : ho1 * g.s;
    if (want_input_tile) {
      load_input_tile<T, kIsa>(g, b.x, b.xs, b.map, n, y0 - g.P, input_tile);
    }
    T* partial = b.partials == nullptr ? nullptr : b.partials + chunk * g.num_taps * g.Cp;
    if (partial != nullptr) {
      std::fill(partial, partial + g.num_taps * g.Cp, T(0));
    }
    T* pointwise_partial = nullptr;
    if (b.pointwise_partials != nullptr) {
      pointwise_partial = b.pointwise_partials + chunk * K * g.Cp * g.Cp;
      std::fill(pointwise_partial, pointwise_partial + K * g.Cp * g.Cp, T(0));
    }
    for (int64_t i = 0; i < K; ++i) {
      if (b.pointwise_transposed != nullptr) {
        pointwise_grad_tile<T, kIsa>(b, i, n, ho0, ho1, input_tile, grad_tile, dt_row, z_row, pointwise_partial);
      } else {
        load_grad_tile(g, b.grads[i], b.gs[i], n, ho0 - g.Pg, grad_tile);
      }
      if (partial != nullptr) {
        const int64_t t0 = g.tap_begin[i];
        for (int64_t ho = ho0; ho < ho1; ++ho) {
          const T* grad_row = grad_tile + (ho - ho0 + g.Pg) * g.grad.row_stride + g.Pg * g.col;
          const T* input_row = input_tile + (ho - ho0) * g.s * g.input.row_stride;
          depthwise_grad_weight_row<T, kIsa>(grad_row, input_row, g.kernel_size[i], g.dilation[i], g.s,
                                             g.offsets.data() + t0, partial + t0 * g.Cp, g.loop_cols, g.Cp, g.G);
        }
      }
      if (b.grad_x != nullptr) {
        // Input row y = s yy + py, column x = s xx + px: phase (py, px), its taps reading gradient row yy.
        for (int64_t y = y0; y < y1; ++y) {
          const int64_t py = (y - y0) % g.s;
          const T* in = grad_tile + (y - y0) / g.s * g.grad.row_stride;
          T* out = grad_x_rows + (y - y0) * grad_x_row;
          for (int64_t px = 0; px < g.s; ++px) {
            const int64_t list = (py * g.s + px) * K + i;
            const int64_t t0 = g.phase_begin[list];
            if (g.s == 1) {  // one phase: every tap, the kernel flipped, a correlation of the gradient tile
              kernel_row<T, kIsa>(g, i, in, g.phase_offsets.data() + t0, b.phase_taps + t0 * g.Cp, out, i > 0);
            } else {
              conv_row<T, kIsa>(in, g.Cp, g.phase_offsets.data() + t0, b.phase_taps + t0 * g.Cp,
                                g.phase_begin[list + 1] - t0, out + px * g.Cp, g.s * g.Cp, g.Wo_r, g.Cp, i > 0);
            }
          }
        }
      }
    }
    if (b.grad_x != nullptr) {
      const T* r_rows = input_tile + g.P * g.input.row_stride + g.P * g.col;  // input row y0 is input tile row P
      if (b.map.relu) {  // (r: the mask of the normalised x when normalised)
        mask_rows(grad_x_rows, grad_x_row, r_rows, g.input.row_stride, y1 - y0, g.W * g.col);
      }
      if (b.input_sums != nullptr) {  // dL/du u = dL/du r: with the ReLU, dL/du is 0 wherever u <= 0
        double* sums = b.input_sums + chunk * 2 * g.Cp;
        std::fill(sums, sums + 2 * g.Cp, 0.0);
        for (int64_t y = y0; y < y1; ++y) {
          add_row_products<T, kIsa>(grad_x_rows + (y - y0) * grad_x_row, r_rows + (y - y0) * g.input.row_stride,
                                    g.W * g.col / g.Cp, g.Cp, sums);
        }
      }
      unpack<T, kIsa>(grad_x_rows, grad_x_row, g.col, y1 - y0, g.W, g.C, b.grad_x + n * b.gxs.n + y0 * b.gxs.h, b.gxs);
    }
  }
  store_fence();
}

FASTDARTS_CPU_ISA_COPIES(backward_chunks)

std::vector<int64_t> output_sizes(const at::Tensor& x, int64_t stride) {
  return {x.size(0), x.size(1), (x.size(2) - 1) / stride + 1, (x.size(3) - 1) / stride + 1};
}

// The checks of both ops; `pointwise` is empty for relu_dwconv.
void check_arguments(const char* op, const at::Tensor& x, at::TensorList weights, at::TensorList pointwise,
                     bool with_pointwise, at::IntArrayRef dilations, int64_t stride) {
  check_images(op, "x", x);
  check_depthwise_weights(op, "weights", weights, "x", x);
  if (with_pointwise) {
    const int64_t C = x.size(1);
    check_sized_list(op, "pointwise_weights", pointwise, static_cast<int64_t>(weights.size()), "weight",
                     {C, C, 1, 1}, "x", x);
  }
  check_positive_per_item(op, "dilations", dilations, static_cast<int64_t>(weights.size()), "weight");
  check_positive(op, "stride", stride);
  check_supported_dtype(op, x);
  TORCH_INTERNAL_ASSERT(x.device().is_cpu());
}

// relu_dwconv_pointwise's optional normalisation of x: input_mean and input_invstd [1, C] both, or neither.
void check_normalisation(const char* op, const at::Tensor& x, const std::optional<at::Tensor>& mean,
                         const std::optional<at::Tensor>& invstd) {
  TORCH_CHECK_VALUE(mean.has_value() == invstd.has_value(), op,
                    ": input_mean and input_invstd must be given together, got only ",
                    mean.has_value() ? "input_mean" : "input_invstd");
  if (mean.has_value()) {
    check_channel_rows(op, "input_mean", *mean, 1, x);
    check_channel_rows(op, "input_invstd", *invstd, 1, x);
  }
}

// The input map of the chunk loops, pointing into `normalisation` (mean then invstd, C values each) when x is
// normalised.
template <typename T>
InputMap<T> input_map(bool relu, const std::optional<at::Tensor>& mean, const std::optional<at::Tensor>& invstd,
                      std::vector<T>& normalisation) {
  if (!mean.has_value()) {
    return {relu};
  }
  const int64_t C = mean->size(1);
  constexpr int64_t L = kVecLanes<T>;
  const bool by_lanes = L % C == 0;
  normalisation.resize(2 * C + (by_lanes ? 2 * L : 0));
  const at::Tensor m = mean->contiguous(), v = invstd->contiguous();
  std::copy(m.const_data_ptr<T>(), m.const_data_ptr<T>() + C, normalisation.begin());
  std::copy(v.const_data_ptr<T>(), v.const_data_ptr<T>() + C, normalisation.begin() + C);
  if (!by_lanes) {
    return {relu, normalisation.data(), normalisation.data() + C};
  }
  T* lanes = normalisation.data() + 2 * C;
  spread_over_lanes(normalisation.data(), 2, C, lanes);  // mean, then invstd
  return {relu, normalisation.data(), normalisation.data() + C, lanes, lanes + L};
}

// The 1x1 convs' weights [C, C, 1, 1] as Cp x Cp matrices, one after the other, zero past C rows and columns:
// m[(i Cp + j) Cp + c] = P_i[c, j] for the forward (input channel j, output channel c), P_i[j, c] when transposed
// (the backward's dz = dt P_i: output channel j, input channel c). When tier isa shuffles_columns, each matrix's
// slot holds its column patterns (tiles::column_patterns) instead.
template <typename T>
std::vector<T> pointwise_matrices(at::TensorList pointwise, const Geometry& g, bool transposed, CpuIsa isa) {
  std::vector<T> m(pointwise.size() * g.Cp * g.Cp, T(0));
  for (size_t i = 0; i < pointwise.size(); ++i) {
    const at::Tensor p = pointwise[i].contiguous();
    const T* src = p.const_data_ptr<T>();
    for (int64_t block = 0; block < g.G * g.C; block += g.C) {  // one diagonal block per column of a vector
      for (int64_t out = 0; out < g.C; ++out) {
        for (int64_t in = 0; in < g.C; ++in) {
          const int64_t j = block + (transposed ? out : in);
          const int64_t c = block + (transposed ? in : out);
          m[(i * g.Cp + j) * g.Cp + c] = src[out * g.C + in];
        }
      }
    }
  }
  if (shuffles_columns<T>(g, isa)) {
    std::vector<T> patterns(m.size(), T(0));
    for (size_t i = 0; i < pointwise.size(); ++i) {
      tiles::column_patterns(m.data() + i * g.Cp * g.Cp, g.C, g.Cp, patterns.data() + i * g.Cp * g.Cp);
    }
    return patterns;
  }
  return m;
}

// The forward of both ops: the K outputs, laid out like x (channels_last in, channels_last out), and with
// pointwise weights and `statistics` the [K, C] mean and biased variance of each output over (N, Ho, Wo)
// (undefined otherwise).
std::tuple<std::vector<at::Tensor>, at::Tensor, at::Tensor> forward(
    const at::Tensor& x, at::TensorList weights, at::TensorList pointwise, bool with_pointwise,
    at::IntArrayRef dilations, int64_t stride, bool relu, const std::optional<at::Tensor>& input_mean = std::nullopt,
    const std::optional<at::Tensor>& input_invstd = std::nullopt, bool statistics = true) {
  statistics = statistics && with_pointwise;
  const at::TensorOptions options = x.options().memory_format(x.suggest_memory_format());
  std::vector<at::Tensor> outs;
  for (size_t i = 0; i < weights.size(); ++i) {
    outs.push_back(at::empty(output_sizes(x, stride), options));
  }
  const int64_t K = static_cast<int64_t>(weights.size());
  at::Tensor mean, var;
  if (statistics) {
    mean = at::empty({K, x.size(1)}, x.options());
    var = at::empty({K, x.size(1)}, x.options());
  }
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "relu_dwconv_cpu", [&] {
    const CpuIsa isa = cpu_isa();  // once per call, before the threads start
    const Geometry g(x, weights, dilations, stride, kVecLanes<scalar_t>, with_pointwise);
    const std::vector<scalar_t> taps = tap_vectors<scalar_t>(weights, g);
    std::vector<scalar_t> matrices;
    std::vector<double> moments;  // [num_chunks][K][2][Cp]
    std::vector<scalar_t> normalisation;
    const InputMap<scalar_t> map = input_map(relu, input_mean, input_invstd, normalisation);
    ForwardArgs<scalar_t> f{g, x.const_data_ptr<scalar_t>(), strides_of(x), map, taps.data(), {}, strides_of(outs[0])};
    for (at::Tensor& out : outs) {
      f.outs.push_back(out.data_ptr<scalar_t>());
    }
    if (with_pointwise) {
      matrices = pointwise_matrices<scalar_t>(pointwise, g, false, isa);
      f.pointwise = matrices.data();
    }
    if (statistics) {
      moments.resize(g.num_chunks * K * 2 * g.Cp);
      f.moments = moments.data();
    }
    if (x.numel() > 0) {
      parallel_for_balanced(0, g.num_chunks, g.grain, [&](int64_t begin, int64_t end) {
        scalar_t* tile = thread_scratch<scalar_t>(0, g.input.size());
        scalar_t* row = thread_scratch<scalar_t>(1, (with_pointwise ? 2 : 1) * g.Wo_r * g.col + 2 * g.Cp);
        const int64_t row_values = g.Wo_r * g.col;
        FASTDARTS_CALL_FOR_CPU_ISA(isa, forward_chunks, scalar_t, f, begin, end, tile, row, row + row_values,
                                   row + (with_pointwise ? 2 : 1) * row_values);
      });
    }
    if (statistics) {
      // Biased variance from the sums in double; N = 0 gives NaN, as torch.var_mean of an empty tensor does.
      const std::vector<double> total = add_slots(moments.data(), g.num_chunks, K * 2 * g.Cp);
      const double count = static_cast<double>(g.N * g.Ho * g.Wo);
      scalar_t* m = mean.data_ptr<scalar_t>();
      scalar_t* v = var.data_ptr<scalar_t>();
      for (int64_t i = 0; i < K; ++i) {
        for (int64_t c = 0; c < g.C; ++c) {
          const double mu = g.lane_sum(total.data() + i * 2 * g.Cp, c) / count;
          const double second = g.lane_sum(total.data() + i * 2 * g.Cp + g.Cp, c) / count;
          m[i * g.C + c] = static_cast<scalar_t>(mu);
          v[i * g.C + c] = static_cast<scalar_t>(std::max(second - mu * mu, 0.0));
        }
      }
    }
  });
  return {outs, mean, var};
}

// The backward of both ops: grad_x if input_grad, the depthwise and (with pointwise weights) the 1x1 weights'
// gradients if weight_grad, and with a normalised input and input_grad the [2, C] sums over (N, H, W) of grad_x
// and of grad_x times the normalised input.
std::tuple<std::optional<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>, std::optional<at::Tensor>>
backward(
    const char* op, at::TensorList grads, const at::Tensor& x, at::TensorList weights, at::TensorList pointwise,
    bool with_pointwise, at::IntArrayRef dilations, int64_t stride, bool relu, bool input_grad, bool weight_grad,
    const std::optional<at::Tensor>& input_mean = std::nullopt,
    const std::optional<at::Tensor>& input_invstd = std::nullopt,
    const std::optional<at::TensorList>& grad_inputs = std::nullopt,
    const std::optional<at::Tensor>& grad_factors = std::nullopt) {
  check_arguments(op, x, weights, pointwise, with_pointwise, dilations, stride);
  check_normalisation(op, x, input_mean, input_invstd);
  const int64_t K = static_cast<int64_t>(weights.size());
  check_sized_list(op, "grads", grads, K, "weight", output_sizes(x, stride), "x", x);
  at::Tensor factors;
  if (check_formed_grads(op, grad_inputs, grad_factors, K, "weight", output_sizes(x, stride), "x", x)) {
    factors = grad_factors->contiguous();
  }

  std::optional<at::Tensor> grad_x, input_sums;
  if (input_grad) {
    grad_x = at::empty_like(x);
    if (input_mean.has_value()) {
      input_sums = at::zeros({2, x.size(1)}, x.options());  // zeros: the sums of an empty batch
    }
  }
  std::vector<at::Tensor> grad_weights, grad_pointwise;
  if (weight_grad) {
    for (const at::Tensor& w : weights) {
      grad_weights.push_back(at::empty(w.sizes(), w.options()));
    }
    if (with_pointwise) {
      for (const at::Tensor& p : pointwise) {
        grad_pointwise.push_back(at::empty(p.sizes(), p.options()));
      }
    }
  }
  if (!input_grad && !weight_grad) {
    return {grad_x, grad_weights, grad_pointwise, input_sums};
  }
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "relu_dwconv_backward_cpu", [&] {
    const CpuIsa isa = cpu_isa();  // once per call, before the threads start
    const Geometry g(x, weights, dilations, stride, kVecLanes<scalar_t>, with_pointwise);
    const std::vector<scalar_t> taps = tap_vectors<scalar_t>(weights, g);
    std::vector<scalar_t> phase_taps;
    if (input_grad) {
      phase_taps = phase_tap_vectors(taps, g);
    }
    std::vector<scalar_t> transposed;
    if (with_pointwise) {
      transposed = pointwise_matrices<scalar_t>(pointwise, g, true, isa);
    }
    at::Tensor partials, pointwise_partials;  // each chunk zeroes its own slots
    std::vector<double> sum_slots(input_sums.has_value() ? g.num_chunks * 2 * g.Cp : 0);  // [num_chunks][2][Cp]
    if (weight_grad) {
      partials = scratch(g.num_chunks * g.num_taps * g.Cp, x);
      if (with_pointwise) {
        pointwise_partials = scratch(g.num_chunks * K * g.Cp * g.Cp, x);
      }
    }
    std::vector<scalar_t> normalisation, factor_lanes;
    BackwardArgs<scalar_t> b{g,
                             x.const_data_ptr<scalar_t>(),
                             strides_of(x),
                             input_map(relu, input_mean, input_invstd, normalisation),
                             {},
                             {},
                             phase_taps.data(),
                             input_grad ? grad_x->data_ptr<scalar_t>() : nullptr,
                             input_grad ? strides_of(*grad_x) : Strides{},
                             weight_grad ? partials.data_ptr<scalar_t>() : nullptr};
    for (const at::Tensor& grad : grads) {
      b.grads.push_back(grad.const_data_ptr<scalar_t>());
      b.gs.push_back(strides_of(grad));
    }
    if (grad_inputs.has_value()) {
      for (const at::Tensor& input : *grad_inputs) {
        b.grad_inputs.push_back(input.const_data_ptr<scalar_t>());
        b.gis.push_back(strides_of(input));
      }
      b.grad_factors = factors.const_data_ptr<scalar_t>();
      if (kVecLanes<scalar_t> % g.C == 0) {
        factor_lanes.resize(K * 4 * kVecLanes<scalar_t>);
        spread_over_lanes(b.grad_factors, K * 4, g.C, factor_lanes.data());
        b.grad_factor_lanes = factor_lanes.data();
      }
    }
    if (with_pointwise) {
      b.pointwise_transposed = transposed.data();
      b.taps = taps.data();
      b.pointwise_partials = weight_grad ? pointwise_partials.data_ptr<scalar_t>() : nullptr;
    }
    if (input_sums.has_value()) {
      b.input_sums = sum_slots.data();
    }
    if (x.numel() > 0) {
      parallel_for_balanced(0, g.num_chunks, g.grain, [&](int64_t begin, int64_t end) {
        // grad_w and the 1x1 gradient read r; grad_x's mask reads relu(x), the normalisation's sums u
        const bool want_input_tile = weight_grad || relu || b.input_sums != nullptr;
        scalar_t* input_tile = thread_scratch<scalar_t>(0, want_input_tile ? g.input.size() : 0);
        scalar_t* grad_tile = thread_scratch<scalar_t>(1, g.grad.size());
        scalar_t* grad_x_rows = thread_scratch<scalar_t>(2, input_grad ? g.chunk_rows * g.s * g.gx_cols * g.col : 0);
        // dt_row must be zero wherever the pack of one dt row does not write (pointwise_grad_tile).
        const int64_t dt_values = with_pointwise ? 2 * g.Wo_r * g.col : 0;
        scalar_t* dt_row = thread_scratch<scalar_t>(3, dt_values);
        std::fill_n(dt_row, dt_values, scalar_t(0));
        FASTDARTS_CALL_FOR_CPU_ISA(isa, backward_chunks, scalar_t, b, begin, end, input_tile, grad_tile, grad_x_rows,
                                   dt_row, with_pointwise ? dt_row + g.Wo_r * g.col : nullptr);
      });
    }
    if (input_sums.has_value() && x.numel() > 0) {
      const std::vector<double> total = add_slots(sum_slots.data(), g.num_chunks, 2 * g.Cp);
      scalar_t* sums = input_sums->data_ptr<scalar_t>();
      for (int64_t c = 0; c < g.C; ++c) {
        sums[c] = static_cast<scalar_t>(g.lane_sum(total.data(), c));
        sums[g.C + c] = static_cast<scalar_t>(g.lane_sum(total.data() + g.Cp, c));
      }
    }
    if (weight_grad) {
      const std::vector<double> total = add_slots(partials.const_data_ptr<scalar_t>(), g.num_chunks, g.num_taps * g.Cp);
      for (int64_t i = 0; i < K; ++i) {
        scalar_t* gw = grad_weights[i].data_ptr<scalar_t>();  // contiguous [C, 1, k, k]
        const int64_t k = weights[i].size(2);
        for (int64_t c = 0; c < g.C; ++c) {
          for (int64_t t = 0; t < k * k; ++t) {
            gw[c * k * k + t] = static_cast<scalar_t>(g.lane_sum(total.data() + (g.tap_begin[i] + t) * g.Cp, c));
          }
        }
      }
      if (with_pointwise) {
        const std::vector<double> sums =
            add_slots(pointwise_partials.const_data_ptr<scalar_t>(), g.num_chunks, K * g.Cp * g.Cp);
        const bool columns = shuffles_columns<scalar_t>(g, isa);  // the slots' layout
        for (int64_t i = 0; i < K; ++i) {
          scalar_t* gp = grad_pointwise[i].data_ptr<scalar_t>();  // contiguous [C, C, 1, 1]: [out][in]
          for (int64_t out = 0; out < g.C; ++out) {
            for (int64_t in = 0; in < g.C; ++in) {
              double sum = 0.0;  // over the diagonal blocks, one per column of a packed vector
              for (int64_t block = 0; block < g.G * g.C; block += g.C) {
                sum += columns ? sums[(i * g.Cp + in) * g.Cp + block + out]
                               : sums[(i * g.Cp + block + out) * g.Cp + block + in];
              }
              gp[out * g.C + in] = static_cast<scalar_t>(sum);
            }
          }
        }
      }
    }
  });
  return {grad_x, grad_weights, grad_pointwise, input_sums};
}

std::vector<at::Tensor> relu_dwconv_cpu(const at::Tensor& x, at::TensorList weights, at::IntArrayRef dilations,
                                        int64_t stride, bool relu) {
  check_arguments("relu_dwconv", x, weights, {}, false, dilations, stride);
  return std::get<0>(forward(x, weights, {}, false, dilations, stride, relu));
}

std::tuple<std::optional<at::Tensor>, std::vector<at::Tensor>> relu_dwconv_backward_cpu(
    at::TensorList grads, const at::Tensor& x, at::TensorList weights, at::IntArrayRef dilations, int64_t stride,
    bool relu, bool input_grad, bool weight_grad) {
  auto [grad_x, grad_weights, unused, no_sums] =
      backward("relu_dwconv_backward", grads, x, weights, {}, false, dilations, stride, relu, input_grad, weight_grad);
  return {grad_x, grad_weights};
}

// relu_dwconv_pointwise's checks, then its forward, with or without the outputs' statistics.
std::tuple<std::vector<at::Tensor>, at::Tensor, at::Tensor> pointwise_forward(
    const at::Tensor& x, at::TensorList weights, at::TensorList pointwise_weights, at::IntArrayRef dilations,
    int64_t stride, bool relu, const std::optional<at::Tensor>& input_mean,
    const std::optional<at::Tensor>& input_invstd, bool statistics) {
  check_arguments("relu_dwconv_pointwise", x, weights, pointwise_weights, true, dilations, stride);
  check_normalisation("relu_dwconv_pointwise", x, input_mean, input_invstd);
  return forward(x, weights, pointwise_weights, true, dilations, stride, relu, input_mean, input_invstd, statistics);
}

std::tuple<std::vector<at::Tensor>, at::Tensor, at::Tensor> relu_dwconv_pointwise_cpu(
    const at::Tensor& x, at::TensorList weights, at::TensorList pointwise_weights, at::IntArrayRef dilations,
    int64_t stride, bool relu, const std::optional<at::Tensor>& input_mean,
    const std::optional<at::Tensor>& input_invstd) {
  return pointwise_forward(x, weights, pointwise_weights, dilations, stride, relu, input_mean, input_invstd, true);
}

std::tuple<std::optional<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>, std::optional<at::Tensor>>
relu_dwconv_pointwise_backward_cpu(at::TensorList grads, const at::Tensor& x, at::TensorList weights,
                                   at::TensorList pointwise_weights, at::IntArrayRef dilations, int64_t stride,
                                   bool relu, bool input_grad, bool weight_grad,
                                   const std::optional<at::Tensor>& input_mean,
                                   const std::optional<at::Tensor>& input_invstd,
                                   const std::optional<at::TensorList>& grad_inputs,
                                   const std::optional<at::Tensor>& grad_factors) {
  return backward("relu_dwconv_pointwise_backward", grads, x, weights, pointwise_weights, true, dilations, stride,
                  relu, input_grad, weight_grad, input_mean, input_invstd, grad_inputs, grad_factors);
}

}  // namespace

std::vector<at::Tensor> relu_dwconv_pointwise_outputs(const at::Tensor& x, at::TensorList weights,
                                                      at::TensorList pointwise_weights, at::IntArrayRef dilations,
                                                      int64_t stride, bool relu,
                                                      const std::optional<at::Tensor>& input_mean,
                                                      const std::optional<at::Tensor>& input_invstd) {
  return std::get<0>(
      pointwise_forward(x, weights, pointwise_weights, dilations, stride, relu, input_mean, input_invstd, false));
}

TORCH_LIBRARY_IMPL(fastdarts, CPU, m) {
  m.impl("relu_dwconv", &relu_dwconv_cpu);
  m.impl("relu_dwconv_backward", &relu_dwconv_backward_cpu);
  m.impl("relu_dwconv_pointwise", &relu_dwconv_pointwise_cpu);
  m.impl("relu_dwconv_pointwise_backward", &relu_dwconv_pointwise_backward_cpu);
}

}  // namespace fastdarts
