// CPU kernels of partial_channel_outputs, partial_channel_outputs_backward and partial_channel_node (schemas in
// ../fastdarts.cpp): PC-DARTS's partial channels around the ops of the E edges leaving one state x [N, C, H, W], K
// groups of m = C / K channels.
//
//   bypass:   b = x's channels m .. C-1 (stride 1), or their 2x2 max pool, stride 2, rounding an odd side up
//             (ATen's max_pool2d: the first maximum in scan order, or a NaN; stride 2), [N, C - m, Ho, Wo]
//   forward:  out_e [N, C, Ho, Wo]: channel c K is outs[e]'s channel c, channel c K + g (g = 1 .. K-1) is
//             bypass_w[e] b[(g - 1) m + c] (b itself without bypass_w): reference.partial_channel_edge
//   backward: ops_grads[e] = grad_e's channels c K; the bypass's gradient sum_e bypass_w[e] grad_e[c K + g] goes
//             to x's channel m + (g - 1) m + c (stride 1) or to that channel at its window's argmax (stride 2);
//             grad_x's first m channels are zero (the ops' own backward gives them); grad_bypass_w[e] = the sum
//             over every value of grad_e[c K + g] b[(g - 1) m + c].
//   node:     the sum, in edge order, of the forward's out_e (stride 1) of the E edges entering one node, each
//             from its own state x_e, or from its bypass b_e alone (a cell's node, without the edges' full-width
//             outputs written and read back; a stride-2 state's bypass is pooled by the cell, once for the nodes
//             it feeds).
//
// Why a kernel: in ATen the same took a zero fill and strided copies to place the shuffled bypass, a multiply and
// a strided copy per edge, and in the backward a strided copy of each gradient's ops channels, a weighted sum and
// another strided copy: about 100 ms of PC-DARTS's 0.85 s search step at batch 64. Here every tensor is read or
// written once, an output row at a time (channels_last). The forward splits the row's bypass by group into
// contiguous rows in L1 (bypass_row), then each edge's output row interleaves its ops' row with them (interleave,
// with K fixed at compile time for 2, 4 and 8 so that the K streams become vector shuffles). The node sums its
// edges' bypasses pixel by pixel as the states hold them (runs of C - C/K values) and shuffles the sum into the node
// once. The backward reads each gradient row once (deinterleave): the ops' channels out, and the row weighted into
// the edges' sum in its own layout, contiguous; the sum's bypass channels then go to dL/dx a pixel at a time (at
// stride 2 a pixel's whole bypass through its window's argmax: pooled_row). The sums of grad_bypass_w are taken per
// image and added in image order, in double: the same bits whatever the number of threads (on a given tier: the
// loops are compiled once per instruction-set tier, and the vectorised sums of a wider tier add in another order).

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

#include "fastdarts/checks.h"
#include "fastdarts/cpu_common.h"
#include "fastdarts/cpu_isa.h"

namespace fastdarts {
namespace {

constexpr auto kChannelsLast = at::MemoryFormat::ChannelsLast;
// Values per task: below about this many a second thread costs more than it saves.
constexpr int64_t kGrainValues = 32768;

// 16-byte vectors (4 floats, 2 doubles), which every CPU of the baseline has: a group's m channels are few, and the
// kernel is bound by memory, not by the vectors' width.
template <typename T>
using V16Of = typename VecOf<T, 16>::type;
template <typename T>
constexpr int64_t kLanes16Of = 16 / static_cast<int64_t>(sizeof(T));

// x_C and x_skip: where the bypass lies in the tensor it is read from, x_C values a pixel with group g = 1 .. K-1
// at channel x_skip + (g - 1) m: the edge's state (x_C = C, x_skip = m) or, for partial_channel_node, the bypass
// alone (x_C = C - m, x_skip = 0).
struct Shape {
  int64_t N, C, H, W, Ho, Wo, K, m, stride, x_C, x_skip;
};

Shape shape_of(const at::Tensor& x, int64_t partial_channels, int64_t stride) {
  const int64_t C = x.size(1), m = C / partial_channels;
  Shape s{x.size(0), C, x.size(2), x.size(3), 0, 0, partial_channels, m, stride, C, m};
  s.Ho = (s.H + stride - 1) / stride;
  s.Wo = (s.W + stride - 1) / stride;
  return s;
}

void check_arguments(const char* op, const at::Tensor& x, int64_t partial_channels, int64_t stride,
                     const std::optional<at::Tensor>& bypass_w, int64_t E) {
  check_images(op, "x", x);
  check_supported_dtype(op, x);
  TORCH_CHECK_VALUE(stride == 1 || stride == 2, op, ": stride must be 1 or 2, got ", stride);
  TORCH_CHECK_VALUE(partial_channels >= 2 && x.size(1) % partial_channels == 0, op,
                    ": partial_channels must be an integer >= 2 dividing the ", x.size(1), " channels, got ",
                    partial_channels);
  if (bypass_w.has_value()) {
    check_weights(op, "bypass_w", *bypass_w, E, x);
  }
}

// An edge's output gradient, when given: [N, C, Ho, Wo] with the dtype and device of x (check_sized_list's rule, for
// a list with None in it).
void check_gradient(const char* op, int64_t e, const at::Tensor& grad, const at::Tensor& x, const Shape& s) {
  const ArgName item("grads", e);
  TORCH_CHECK_VALUE(grad.sizes() == at::IntArrayRef({s.N, s.C, s.Ho, s.Wo}), op, ": ", item, " must have shape ",
                    at::IntArrayRef({s.N, s.C, s.Ho, s.Wo}), ", got ", grad.sizes());
  check_dtype_and_device(op, item, grad, "x", x);
}

template <typename scalar_t>
std::vector<scalar_t> values_of(const std::optional<at::Tensor>& w, int64_t E) {
  if (!w.has_value()) {
    return std::vector<scalar_t>(E, scalar_t(1));
  }
  const at::Tensor c = w->contiguous();
  return std::vector<scalar_t>(c.const_data_ptr<scalar_t>(), c.const_data_ptr<scalar_t>() + E);
}

// out[c] = in[c] (in[c] = 0 when in is null) for c < m, for the channels of one pixel or its group: in 16-byte vectors
// rather than the library call GCC makes of a copy loop, which costs more than the copy at 4 or 8 values (the
// vector held in a register, vec_load_once: a plain load and store was still recognised as a copy and made a call).
template <typename scalar_t>
FASTDARTS_ALWAYS_INLINE void copy_short(scalar_t* __restrict__ out, const scalar_t* __restrict__ in, int64_t m) {
  int64_t c = 0;
  for (; c + kLanes16Of<scalar_t> <= m; c += kLanes16Of<scalar_t>) {
    V16Of<scalar_t> v{};
    if (in != nullptr) {
      vec_load_once(v, in + c);
    }
    vec_store(out + c, v);
  }
  for (; c < m; ++c) {
    out[c] = in == nullptr ? scalar_t(0) : in[c];
  }
}

// ATen's max_pool2d at one tap t (0..3 in scan order) of `count` windows, one per value: out[c] = v[c] where v[c] is
// greater or a NaN, and tap[c] = t there (when tap is given; held as scalar_t so that the selects vectorise with the
// values'). In 16-byte vectors, whose selects have no branch: GCC's scalar loop branched on every value, and random
// data mispredicted half of them; on the tiers' 32- and 64-byte vectors GCC made the selects scalar compares again.
template <typename scalar_t>
FASTDARTS_ALWAYS_INLINE void window_max(const scalar_t* __restrict__ v, scalar_t* __restrict__ out,
                                        scalar_t* __restrict__ tap, scalar_t t, int64_t count) {
  using V16 = V16Of<scalar_t>;
  int64_t c = 0;
  for (; c + kLanes16Of<scalar_t> <= count; c += kLanes16Of<scalar_t>) {
    V16 vv, vo;
    vec_load(vv, v + c);
    vec_load(vo, out + c);
    const auto wins = (vv > vo) | (vv != vv);
    vec_store(out + c, V16(wins ? vv : vo));
    if (tap != nullptr) {
      V16 vt;
      vec_load(vt, tap + c);
      vec_store(tap + c, V16(wins ? V16{} + t : vt));
    }
  }
  for (; c < count; ++c) {
    const bool wins = v[c] > out[c] || std::isnan(v[c]);
    out[c] = wins ? v[c] : out[c];
    if (tap != nullptr) {
      tap[c] = wins ? t : tap[c];
    }
  }
}

// out[c] = total[c] where tap[c] is t, else 0, plus base[c] when base is given, for c < count: the pool's gradient at
// one pixel of its windows. In 16-byte vectors, as window_max.
template <typename scalar_t>
FASTDARTS_ALWAYS_INLINE void routed_to_tap(scalar_t* __restrict__ out, const scalar_t* __restrict__ total,
                                           const scalar_t* __restrict__ tap, scalar_t t,
                                           const scalar_t* __restrict__ base, int64_t count) {
  using V16 = V16Of<scalar_t>;
  int64_t c = 0;
  for (; c + kLanes16Of<scalar_t> <= count; c += kLanes16Of<scalar_t>) {
    V16 vt, vg;
    vec_load(vt, tap + c);
    vec_load(vg, total + c);
    V16 routed = vt == t ? vg : V16{};
    if (base != nullptr) {
      V16 vb;
      vec_load(vb, base + c);
      routed = vb + routed;
    }
    vec_store(out + c, routed);
  }
  for (; c < count; ++c) {
    const scalar_t routed = tap[c] == t ? total[c] : scalar_t(0);
    out[c] = base == nullptr ? routed : base[c] + routed;
  }
}

// One output row (n, ho) of the bypass, split by group: rows[g - 1][wo m + c] = b[(g - 1) m + c] at (n, ho, wo), for
// g = 1 .. K-1, so that every group's values lie contiguous as the interleaving loops read them; at stride 2 each
// the maximum of its 2x2 window.
template <typename scalar_t>
FASTDARTS_ALWAYS_INLINE void bypass_row(const scalar_t* x, const Shape& s, int64_t n, int64_t ho, scalar_t* rows) {
  const int64_t m = s.m, row = s.Wo * m;
  if (s.stride == 1) {  // a group at a time, each pixel's m values one short copy: a tight loop of loads and stores
    for (int64_t g = 1; g < s.K; ++g) {
      const scalar_t* in = x + (n * s.H + ho) * s.W * s.x_C + s.x_skip + (g - 1) * m;
      scalar_t* out = rows + (g - 1) * row;
      for (int64_t wo = 0; wo < s.Wo; ++wo, in += s.x_C, out += m) {
        copy_short(out, in, m);
      }
    }
    return;
  }
  for (int64_t wo = 0; wo < s.Wo; ++wo) {
    for (int64_t g = 1; g < s.K; ++g) {
      scalar_t* out = rows + (g - 1) * row + wo * m;
      std::fill(out, out + m, -std::numeric_limits<scalar_t>::infinity());
      for (int64_t dh = 0; dh < 2 && 2 * ho + dh < s.H; ++dh) {  // a window at an odd side's end has fewer pixels
        for (int64_t dw = 0; dw < 2 && 2 * wo + dw < s.W; ++dw) {
          const scalar_t* v = x + ((n * s.H + 2 * ho + dh) * s.W + 2 * wo + dw) * s.x_C + s.x_skip + (g - 1) * m;
          window_max(v, out, static_cast<scalar_t*>(nullptr), scalar_t(0), m);
        }
      }
    }
  }
}

// The same row at stride 2 pixel by pixel, as x holds it: maxima[wo B + j] (B = C - m) the maximum of the window of
// the bypass's channel j, and taps[wo B + j] (when given) the window's tap it came from. Whole pixels at once: the
// group-split rows took a loop of m values (one 16-byte vector at m = 4) per group, window tap and pixel.
template <typename scalar_t>
FASTDARTS_ALWAYS_INLINE void pooled_row(const scalar_t* x, const Shape& s, int64_t n, int64_t ho,
                                        scalar_t* maxima, scalar_t* taps) {
  const int64_t B = s.C - s.m;
  for (int64_t wo = 0; wo < s.Wo; ++wo) {
    scalar_t* out = maxima + wo * B;
    scalar_t* tap = taps == nullptr ? nullptr : taps + wo * B;
    std::fill(out, out + B, -std::numeric_limits<scalar_t>::infinity());
    if (tap != nullptr) {
      std::fill(tap, tap + B, scalar_t(0));
    }
    for (int64_t dh = 0; dh < 2 && 2 * ho + dh < s.H; ++dh) {
      for (int64_t dw = 0; dw < 2 && 2 * wo + dw < s.W; ++dw) {
        const scalar_t* v = x + ((n * s.H + 2 * ho + dh) * s.W + 2 * wo + dw) * s.x_C + s.x_skip;
        window_max(v, out, tap, static_cast<scalar_t>(2 * dh + dw), B);
      }
    }
  }
}

// out[i K] = ops[i] and out[i K + g] = w rows[g - 1][i] for i < count: one row of an edge's output. With K fixed at
// compile time (kK > 0) the compiler turns the K interleaved streams into vector shuffles; kK = 0 reads K at run
// time.
template <int kK, typename scalar_t>
FASTDARTS_ALWAYS_INLINE void interleave(scalar_t* __restrict__ out, const scalar_t* __restrict__ ops,
                                        const scalar_t* __restrict__ rows, int64_t row, scalar_t w, int64_t count,
                                        int64_t K) {
  if constexpr (kK > 0) {
    K = kK;
  }
  for (int64_t i = 0; i < count; ++i) {
    out[i * K] = ops[i];
    for (int64_t g = 1; g < K; ++g) {
      out[i * K + g] = w * rows[(g - 1) * row + i];
    }
  }
}

// The reverse for one row (count values) of an edge's output gradient: ops_grad[i] = grad[i K] (i < count / K);
// sum = w grad (first edge) or plus it (later edges: the edges' sum in edge order, as weighted_sum adds), over the
// whole row in the gradients' layout (the ops' channels in it unused), when sum is given; and, when dot is given, the
// dot product of the row with `shuffled`, the bypass in its places of an output row (zeros in the ops' channels).
template <int kK, typename scalar_t>
FASTDARTS_ALWAYS_INLINE void deinterleave(const scalar_t* __restrict__ grad, scalar_t* __restrict__ ops_grad,
                                          scalar_t* __restrict__ sum, bool first,
                                          const scalar_t* __restrict__ shuffled, double* dot, scalar_t w,
                                          int64_t count, int64_t K) {
  if constexpr (kK > 0) {
    K = kK;
  }
  for (int64_t i = 0; i < count / K; ++i) {
    ops_grad[i] = grad[i * K];
  }
  if (sum != nullptr && first) {
    for (int64_t j = 0; j < count; ++j) {
      sum[j] = w * grad[j];
    }
  } else if (sum != nullptr) {
    for (int64_t j = 0; j < count; ++j) {
      sum[j] += w * grad[j];
    }
  }
  if (dot != nullptr) {
    double total = 0.0;
    // The reduction needs the pragma to vectorise; its order is fixed at compile time, so still deterministic.
#pragma omp simd reduction(+ : total)
    for (int64_t j = 0; j < count; ++j) {
      total += static_cast<double>(grad[j]) * static_cast<double>(shuffled[j]);
    }
    *dot += total;
  }
}

// ---- The loops over rows (forward) and images (backward), compiled once per instruction-set tier (cpu_isa.h) and
// ---- once per group count K of 2, 4 and 8 (kK; 0: K read at run time). The helpers above are inlined into them.

template <typename scalar_t>
struct ForwardArgs {
  const scalar_t* x;
  std::vector<const scalar_t*> outs;
  std::vector<scalar_t> bw;
  std::vector<scalar_t*> results;
  Shape s;
};

template <typename scalar_t, CpuIsa kIsa, int kK>
FASTDARTS_ALWAYS_INLINE void forward_rows_of(const ForwardArgs<scalar_t>& a, int64_t begin, int64_t end) {
  const Shape& s = a.s;
  const int64_t E = static_cast<int64_t>(a.outs.size());
  const int64_t row = s.Wo * s.m;  // values per row of each group
  std::vector<scalar_t> rows((s.K - 1) * row);
  for (int64_t r = begin; r < end; ++r) {
    bypass_row(a.x, s, r / s.Ho, r % s.Ho, rows.data());
    for (int64_t e = 0; e < E; ++e) {
      interleave<kK>(a.results[e] + r * s.Wo * s.C, a.outs[e] + r * row, rows.data(), row, a.bw[e], row, s.K);
    }
  }
}

template <typename scalar_t, CpuIsa kIsa>  // kIsa: the tier the copy is compiled for
FASTDARTS_ALWAYS_INLINE void forward_rows(const ForwardArgs<scalar_t>& a, int64_t begin, int64_t end) {
  switch (a.s.K) {  // a switch, not a generic lambda: a lambda would be compiled for the baseline in every copy
    case 2:
      return forward_rows_of<scalar_t, kIsa, 2>(a, begin, end);
    case 4:
      return forward_rows_of<scalar_t, kIsa, 4>(a, begin, end);
    case 8:
      return forward_rows_of<scalar_t, kIsa, 8>(a, begin, end);
    default:
      return forward_rows_of<scalar_t, kIsa, 0>(a, begin, end);
  }
}

FASTDARTS_CPU_ISA_COPIES(forward_rows)

// A node of a partial-channel cell: the edges' outputs of forward_rows, each from its own state, summed in edge
// order one output row at a time (the row stays in L1 while every edge adds to it) instead of written out
// full width and read back by the node's sum.
template <typename scalar_t>
struct NodeArgs {
  std::vector<const scalar_t*> xs, outs;
  std::vector<scalar_t> bw;
  std::vector<Shape> shapes;  // edge e's: where its bypass lies in xs[e] (x_C, x_skip); the rest the same for all
  scalar_t* node;
};

template <typename scalar_t, CpuIsa kIsa, int kK>
FASTDARTS_ALWAYS_INLINE void node_rows_of(const NodeArgs<scalar_t>& a, int64_t begin, int64_t end) {
  const Shape& s = a.shapes[0];
  const int64_t E = static_cast<int64_t>(a.outs.size());
  const int64_t K = kK > 0 ? kK : s.K;
  const int64_t m = s.m, C = s.C, B = C - m, row = s.Wo * m;
  // The node's row as the edges' states hold it: the ops' channels (row values), and the bypass pixel by pixel
  // (B values each, the edges' states read in runs of B), summed over the edges by contiguous adds and shuffled into
  // the output once: a split by group took a loop of m values per group and pixel for every edge.
  std::vector<scalar_t> ops_sum(row), bypass_sum(s.Wo * B), products(s.Wo * B);
  for (int64_t r = begin; r < end; ++r) {
    for (int64_t e = 0; e < E; ++e) {
      const Shape& se = a.shapes[e];  // at stride 1 an output row is a row of every state
      const scalar_t* __restrict__ ops = a.outs[e] + r * row;
      const scalar_t* __restrict__ x = a.xs[e] + r * s.Wo * se.x_C + se.x_skip;
      // The first edge's bypass goes straight into the sums; a later one's into the scratch row, then added.
      scalar_t* __restrict__ target = e == 0 ? bypass_sum.data() : products.data();
      // The products rounded and stored before the adds: an add of w * x[j] would compile to one fused
      // multiply-add, whose single rounding gives other bits than an edge's output written out and then summed.
      const scalar_t w = a.bw[e];
      for (int64_t wo = 0; wo < s.Wo; ++wo) {
        if (w == scalar_t(1)) {
          copy_short(target + wo * B, x + wo * se.x_C, B);
        } else {
          for (int64_t j = 0; j < B; ++j) {
            target[wo * B + j] = w * x[wo * se.x_C + j];
          }
        }
      }
      if (e == 0) {
        std::copy(ops, ops + row, ops_sum.data());
        continue;
      }
      for (int64_t i = 0; i < row; ++i) {
        ops_sum[i] += ops[i];
      }
      for (int64_t i = 0; i < s.Wo * B; ++i) {
        bypass_sum[i] += products[i];
      }
    }
    // Channel c K of the node is the ops' channel c, channel c K + g the bypass's (g - 1) m + c.
    for (int64_t wo = 0; wo < s.Wo; ++wo) {
      scalar_t* __restrict__ out = a.node + (r * s.Wo + wo) * C;
      const scalar_t* __restrict__ bypass = bypass_sum.data() + wo * B;
      for (int64_t c = 0; c < m; ++c) {
        out[c * K] = ops_sum[wo * m + c];
        for (int64_t g = 1; g < K; ++g) {
          out[c * K + g] = bypass[(g - 1) * m + c];
        }
      }
    }
  }
}

template <typename scalar_t, CpuIsa kIsa>  // kIsa: the tier the copy is compiled for
FASTDARTS_ALWAYS_INLINE void node_rows(const NodeArgs<scalar_t>& a, int64_t begin, int64_t end) {
  switch (a.shapes[0].K) {  // as in forward_rows
    case 2:
      return node_rows_of<scalar_t, kIsa, 2>(a, begin, end);
    case 4:
      return node_rows_of<scalar_t, kIsa, 4>(a, begin, end);
    case 8:
      return node_rows_of<scalar_t, kIsa, 8>(a, begin, end);
    default:
      return node_rows_of<scalar_t, kIsa, 0>(a, begin, end);
  }
}

FASTDARTS_CPU_ISA_COPIES(node_rows)

template <typename scalar_t>
struct BackwardArgs {
  const scalar_t* x;
  std::vector<const scalar_t*> grads;
  std::vector<scalar_t> bw;
  std::vector<scalar_t*> ops_grads;
  scalar_t* grad_x;         // null without x_grad
  const scalar_t* base;     // grad_x_base, null without it
  double* dots;             // [N, E], null without bypass_w_grad
  Shape s;
};

template <typename scalar_t, CpuIsa kIsa, int kK>
FASTDARTS_ALWAYS_INLINE void backward_images_of(const BackwardArgs<scalar_t>& a, int64_t begin, int64_t end) {
  const Shape& s = a.s;
  const int64_t E = static_cast<int64_t>(a.grads.size());
  const int64_t K = kK > 0 ? kK : s.K;
  const int64_t m = s.m, C = s.C, B = C - m, row = s.Wo * C;
  const bool pooled = s.stride == 2 && (a.grad_x != nullptr || a.dots != nullptr);
  // sum: the edges' gradients weighted and summed over an output row, in their layout; totals: its bypass channels
  // pixel by pixel in x's order (stride 2, where each goes to its window's argmax); maxima and taps: pooled_row's.
  std::vector<scalar_t> sum(a.grad_x == nullptr ? 0 : row), totals(a.grad_x != nullptr && pooled ? s.Wo * B : 0);
  std::vector<scalar_t> maxima(pooled ? s.Wo * B : 0), taps(a.grad_x != nullptr && pooled ? s.Wo * B : 0);
  std::vector<scalar_t> shuffled(a.dots == nullptr ? 0 : row);
  for (int64_t n = begin; n < end; ++n) {
    double* dot = a.dots == nullptr ? nullptr : a.dots + n * E;
    if (dot != nullptr) {
      std::fill(dot, dot + E, 0.0);
    }
    for (int64_t ho = 0; ho < s.Ho; ++ho) {
      const int64_t r = n * s.Ho + ho;
      // The bypass of the row pixel by pixel, `pixel` values apart: x's own channels, or their pooled maxima.
      const scalar_t* bypass = a.x + (n * s.H + ho) * s.W * s.x_C + s.x_skip;
      int64_t pixel = s.x_C;
      if (pooled) {
        pooled_row(a.x, s, n, ho, maxima.data(), taps.empty() ? nullptr : taps.data());
        bypass = maxima.data();
        pixel = B;
      }
      if (dot != nullptr) {  // once per row for every edge's dot product: x's channel m + (g - 1) m + c at c K + g
        for (int64_t wo = 0; wo < s.Wo; ++wo) {
          scalar_t* out = shuffled.data() + wo * C;
          const scalar_t* in = bypass + wo * pixel;
          for (int64_t c = 0; c < m; ++c) {
            out[c * K] = scalar_t(0);
            for (int64_t g = 1; g < K; ++g) {
              out[c * K + g] = in[(g - 1) * m + c];
            }
          }
        }
      }
      for (int64_t e = 0; e < E; ++e) {
        deinterleave<kK>(a.grads[e] + r * row, a.ops_grads[e] + r * s.Wo * m, sum.empty() ? nullptr : sum.data(),
                         e == 0, shuffled.data(), dot == nullptr ? nullptr : dot + e, a.bw[e], row, K);
      }
      if (a.grad_x == nullptr) {
        continue;
      }
      // dL/dx: zero in the ops' channels, and in x's channel m + (g - 1) m + c the sum's c K + g (zero without
      // edges), at stride 2 at its window's argmax (the windows do not overlap: each pixel is written once); base
      // plus that when given (what base + that dL/dx would give, bit for bit, without being written out first).
      for (int64_t wo = 0; wo < s.Wo; ++wo) {
        const scalar_t* in = sum.data() + wo * C;
        if (s.stride == 1) {
          const int64_t at = r * row + wo * C;
          scalar_t* __restrict__ gx = a.grad_x + at;
          const scalar_t* __restrict__ base = a.base == nullptr ? nullptr : a.base + at;
          if (base == nullptr) {
            std::fill(gx, gx + (E == 0 ? C : m), scalar_t(0));
          } else {
            copy_short(gx, base, E == 0 ? C : m);
          }
          for (int64_t c = 0; c < m && E > 0; ++c) {
            for (int64_t g = 1; g < K; ++g) {
              gx[g * m + c] = base == nullptr ? in[c * K + g] : base[g * m + c] + in[c * K + g];
            }
          }
          continue;
        }
        scalar_t* __restrict__ total = totals.data() + wo * B;
        for (int64_t c = 0; c < m; ++c) {
          for (int64_t g = 1; g < K; ++g) {
            total[(g - 1) * m + c] = E == 0 ? scalar_t(0) : in[c * K + g];
          }
        }
        const scalar_t* __restrict__ tap = taps.data() + wo * B;
        for (int64_t dh = 0; dh < 2 && 2 * ho + dh < s.H; ++dh) {
          for (int64_t dw = 0; dw < 2 && 2 * wo + dw < s.W; ++dw) {
            const int64_t at = ((n * s.H + 2 * ho + dh) * s.W + 2 * wo + dw) * C;
            scalar_t* __restrict__ gx = a.grad_x + at;
            const scalar_t* __restrict__ base = a.base == nullptr ? nullptr : a.base + at;
            if (base == nullptr) {
              std::fill(gx, gx + m, scalar_t(0));
            } else {
              copy_short(gx, base, m);
            }
            routed_to_tap(gx + m, total, tap, static_cast<scalar_t>(2 * dh + dw),
                          base == nullptr ? nullptr : base + m, B);
          }
        }
      }
    }
  }
}

template <typename scalar_t, CpuIsa kIsa>  // kIsa: the tier the copy is compiled for
FASTDARTS_ALWAYS_INLINE void backward_images(const BackwardArgs<scalar_t>& a, int64_t begin, int64_t end) {
  switch (a.s.K) {  // as in forward_rows
    case 2:
      return backward_images_of<scalar_t, kIsa, 2>(a, begin, end);
    case 4:
      return backward_images_of<scalar_t, kIsa, 4>(a, begin, end);
    case 8:
      return backward_images_of<scalar_t, kIsa, 8>(a, begin, end);
    default:
      return backward_images_of<scalar_t, kIsa, 0>(a, begin, end);
  }
}

FASTDARTS_CPU_ISA_COPIES(backward_images)

template <typename scalar_t>
void forward_kernel(const ForwardArgs<scalar_t>& a) {
  const Shape& s = a.s;
  const int64_t E = static_cast<int64_t>(a.outs.size());
  const int64_t grain = std::max<int64_t>(1, kGrainValues / std::max<int64_t>(1, s.Wo * s.C * (E + 1)));
  const CpuIsa isa = cpu_isa();  // once per call, before the threads start
  parallel_for_balanced(0, s.N * s.Ho, grain, [&](int64_t begin, int64_t end) {
    FASTDARTS_CALL_FOR_CPU_ISA(isa, forward_rows, scalar_t, a, begin, end);
  });
}

template <typename scalar_t>
void node_kernel(const NodeArgs<scalar_t>& a) {
  const Shape& s = a.shapes[0];
  const int64_t E = static_cast<int64_t>(a.outs.size());
  const int64_t grain = std::max<int64_t>(1, kGrainValues / std::max<int64_t>(1, s.Wo * s.C * (E + 1)));
  const CpuIsa isa = cpu_isa();  // once per call, before the threads start
  parallel_for_balanced(0, s.N * s.Ho, grain, [&](int64_t begin, int64_t end) {
    FASTDARTS_CALL_FOR_CPU_ISA(isa, node_rows, scalar_t, a, begin, end);
  });
}

template <typename scalar_t>
void backward_kernel(const BackwardArgs<scalar_t>& a) {
  const Shape& s = a.s;
  const int64_t E = static_cast<int64_t>(a.grads.size());
  const int64_t grain = std::max<int64_t>(1, kGrainValues / std::max<int64_t>(1, s.Ho * s.Wo * s.C * (E + 1)));
  const CpuIsa isa = cpu_isa();  // once per call, before the threads start
  parallel_for_balanced(0, s.N, grain, [&](int64_t begin, int64_t end) {
    FASTDARTS_CALL_FOR_CPU_ISA(isa, backward_images, scalar_t, a, begin, end);
  });
}

std::vector<at::Tensor> partial_channel_outputs_cpu(at::TensorList outs, const at::Tensor& x, int64_t partial_channels,
                                                    int64_t stride, const std::optional<at::Tensor>& bypass_w) {
  const char* op = "partial_channel_outputs";
  const int64_t E = static_cast<int64_t>(outs.size());
  TORCH_CHECK_VALUE(E >= 1, op, ": outs must be a non-empty list of tensors");
  check_arguments(op, x, partial_channels, stride, bypass_w, E);
  const Shape s = shape_of(x, partial_channels, stride);
  check_sized_list(op, "outs", outs, E, "edge", {s.N, s.m, s.Ho, s.Wo}, "x", x);
  std::vector<at::Tensor> inputs, results;
  for (int64_t e = 0; e < E; ++e) {
    inputs.push_back(outs[e].contiguous(kChannelsLast));
    results.push_back(at::empty({s.N, s.C, s.Ho, s.Wo}, x.options().memory_format(kChannelsLast)));
  }
  const at::Tensor xc = x.contiguous(kChannelsLast);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "partial_channels_cpu", [&] {
    std::vector<const scalar_t*> out_data;
    std::vector<scalar_t*> result_data;
    for (int64_t e = 0; e < E; ++e) {
      out_data.push_back(inputs[e].const_data_ptr<scalar_t>());
      result_data.push_back(results[e].data_ptr<scalar_t>());
    }
    forward_kernel<scalar_t>(
        {xc.const_data_ptr<scalar_t>(), out_data, values_of<scalar_t>(bypass_w, E), result_data, s});
  });
  return results;
}

at::Tensor partial_channel_node_cpu(at::TensorList outs, at::TensorList xs, int64_t partial_channels,
                                   const std::optional<at::Tensor>& bypass_w) {
  const char* op = "partial_channel_node";
  const int64_t E = static_cast<int64_t>(outs.size());
  TORCH_CHECK_VALUE(E >= 1, op, ": outs must be a non-empty list of tensors");
  TORCH_CHECK_VALUE(static_cast<int64_t>(xs.size()) == E, op, ": xs must have one tensor per edge (E = ", E,
                    "), got ", xs.size());
  TORCH_CHECK_VALUE(partial_channels >= 2, op, ": partial_channels must be an integer >= 2, got ", partial_channels);
  check_images(op, ArgName("outs", 0), outs[0]);
  check_supported_dtype(op, outs[0]);
  const int64_t N = outs[0].size(0), m = outs[0].size(1), C = partial_channels * m;
  const int64_t Ho = outs[0].size(2), Wo = outs[0].size(3);
  check_sized_list(op, "outs", outs, E, "edge", {N, m, Ho, Wo}, "outs[0]", outs[0]);
  std::vector<Shape> shapes;
  std::vector<at::Tensor> states, inputs;
  for (int64_t e = 0; e < E; ++e) {
    const at::Tensor& x = xs[e];
    const ArgName name("xs", e);
    TORCH_CHECK_VALUE(x.dim() == 4 && x.size(0) == N && (x.size(1) == C || x.size(1) == C - m) && x.size(2) == Ho &&
                          x.size(3) == Wo,
                      op, ": ", name, " must be a state [", N, ", ", C, ", ", Ho, ", ", Wo, "] or its bypass alone [",
                      N, ", ", C - m, ", ", Ho, ", ", Wo, "] (outs[0] ", outs[0].sizes(), ", partial_channels ",
                      partial_channels, "), got ", x.sizes());
    check_dtype_and_device(op, name, x, "outs[0]", outs[0]);
    shapes.push_back({N, C, Ho, Wo, Ho, Wo, partial_channels, m, 1, x.size(1), x.size(1) == C ? m : 0});
    states.push_back(x.contiguous(kChannelsLast));
    inputs.push_back(outs[e].contiguous(kChannelsLast));
  }
  if (bypass_w.has_value()) {
    check_weights(op, "bypass_w", *bypass_w, E, outs[0]);
  }
  at::Tensor node = at::empty({N, C, Ho, Wo}, outs[0].options().memory_format(kChannelsLast));
  AT_DISPATCH_FLOATING_TYPES(outs[0].scalar_type(), "partial_channels_cpu", [&] {
    NodeArgs<scalar_t> a{{}, {}, values_of<scalar_t>(bypass_w, E), shapes, node.data_ptr<scalar_t>()};
    for (int64_t e = 0; e < E; ++e) {
      a.xs.push_back(states[e].const_data_ptr<scalar_t>());
      a.outs.push_back(inputs[e].const_data_ptr<scalar_t>());
    }
    node_kernel<scalar_t>(a);
  });
  return node;
}

std::tuple<std::vector<at::Tensor>, std::optional<at::Tensor>, std::optional<at::Tensor>>
partial_channel_outputs_backward_cpu(const c10::List<std::optional<at::Tensor>>& grads, const at::Tensor& x,
                                     int64_t partial_channels, int64_t stride,
                                     const std::optional<at::Tensor>& bypass_w, bool x_grad, bool bypass_w_grad,
                                     const std::optional<at::Tensor>& grad_x_base) {
  const char* op = "partial_channel_outputs_backward";
  const int64_t E = static_cast<int64_t>(grads.size());
  TORCH_CHECK_VALUE(E >= 1, op, ": grads must be a non-empty list");
  check_arguments(op, x, partial_channels, stride, bypass_w, E);
  const Shape s = shape_of(x, partial_channels, stride);
  std::vector<int64_t> given;  // the edges whose output is in the loss
  std::vector<at::Tensor> inputs, ops_grads;
  for (int64_t e = 0; e < E; ++e) {
    const std::optional<at::Tensor> g = grads.get(e);
    if (!g.has_value()) {
      continue;
    }
    check_gradient(op, e, *g, x, s);
    given.push_back(e);
    inputs.push_back(g->contiguous(kChannelsLast));
    ops_grads.push_back(at::empty({s.N, s.m, s.Ho, s.Wo}, x.options().memory_format(kChannelsLast)));
  }
  const at::Tensor xc = x.contiguous(kChannelsLast);
  at::Tensor base;
  if (grad_x_base.has_value()) {
    TORCH_CHECK_VALUE(x_grad, op, ": grad_x_base needs x_grad");
    TORCH_CHECK_VALUE(grad_x_base->sizes() == x.sizes(), op, ": grad_x_base must have the shape of x ", x.sizes(),
                      ", got ", grad_x_base->sizes());
    check_dtype_and_device(op, "grad_x_base", *grad_x_base, "x", x);
    base = grad_x_base->contiguous(kChannelsLast);
  }
  std::optional<at::Tensor> grad_x, grad_bypass_w;
  if (x_grad) {
    grad_x = at::empty_like(xc, kChannelsLast);
  }
  const int64_t G = static_cast<int64_t>(given.size());
  at::Tensor dots;  // [N, G] per image, in double
  if (bypass_w_grad) {
    dots = at::empty({s.N, G}, x.options().dtype(at::kDouble));
  }
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "partial_channels_cpu", [&] {
    const std::vector<scalar_t> all_w = values_of<scalar_t>(bypass_w, E);
    std::vector<scalar_t> w;
    std::vector<const scalar_t*> grad_data;
    std::vector<scalar_t*> ops_grad_data;
    for (int64_t i = 0; i < G; ++i) {
      w.push_back(all_w[given[i]]);
      grad_data.push_back(inputs[i].const_data_ptr<scalar_t>());
      ops_grad_data.push_back(ops_grads[i].data_ptr<scalar_t>());
    }
    backward_kernel<scalar_t>({xc.const_data_ptr<scalar_t>(), grad_data, w, ops_grad_data,
                               grad_x.has_value() ? grad_x->data_ptr<scalar_t>() : nullptr,
                               base.defined() ? base.const_data_ptr<scalar_t>() : nullptr,
                               bypass_w_grad ? dots.data_ptr<double>() : nullptr, s});
    if (bypass_w_grad) {
      const std::vector<double> totals = add_slots(dots.const_data_ptr<double>(), s.N, G);
      grad_bypass_w = at::zeros({E}, x.options());
      scalar_t* out = grad_bypass_w->data_ptr<scalar_t>();
      for (int64_t i = 0; i < G; ++i) {
        out[given[i]] = static_cast<scalar_t>(totals[i]);
      }
    }
  });
  return {std::move(ops_grads), grad_x, grad_bypass_w};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdarts, CPU, m) {
  m.impl("partial_channel_outputs", &partial_channel_outputs_cpu);
  m.impl("partial_channel_outputs_backward", &partial_channel_outputs_backward_cpu);
  m.impl("partial_channel_node", &partial_channel_node_cpu);
}

}  // namespace fastdarts
