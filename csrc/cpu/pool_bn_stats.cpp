// CPU kernels of pool_bn_stats and pool_bn_stats_backward (schemas in ../fastdarts.cpp): the 3x3 max and average
// pools of a DARTS edge (padding 1, stride 1 or 2, the average over the window's pixels inside the image) and the
// per-channel batch statistics of both, which their affine-free BNs normalise with, from one read of x.
//
//   shapes:   x [N, C, H, W]; max_out, avg_out [N, C, Ho, Wo] with s = stride, Ho = (H - 1) / s + 1,
//             Wo = (W - 1) / s + 1; mean, var [2, C] (row 0: max_out, row 1: avg_out)
//   forward:  window(ho, wo) = the input rows ho s - 1 .. ho s + 1 and columns wo s - 1 .. wo s + 1 inside the
//             image (2 or 3 of each); max_out = its maximum (a NaN wins), avg_out = its sum / its pixel count;
//             mean, var = the per-channel mean and biased variance over (N, Ho, Wo), accumulated in double
//   backward: grad_x = grad_max routed to each window's argmax + grad_avg / count spread over each window.
//             The argmax follows ATen's max_pool2d (a tap replaces the running maximum when it is greater or
//             NaN, in scan order kh then kw), so the gradient lands where max_pool2d's indices point. It is
//             recomputed from x: autograd saves nothing but x.
//
// Floors, float32 (DESIGN.md 3: 26 GB/s from DRAM, 90-140 GB/s in L2/L3, AVX-512, 2 cores):
//   (64, 16, 32, 32), stride 1: read x (4 MiB), write the two pools (8 MiB): 12.6 MB, 0.48 ms from DRAM,
//     0.09-0.14 ms from cache (x fits in L3). FLOPs are negligible (about 20 compares and adds per output
//     value), but the instructions are not: per vector of 16 channels about 9 loads, 8 x (NaN compare, blend,
//     max, add), 2 stores and 16 double-precision statistics instructions, about 60 in all, so 4 M instructions or
//     roughly 0.1-0.2 ms on 2 cores: the same order as the cache floor.
//   its backward: read x and the two output gradients, write grad_x: 16.8 MB, 0.65 ms from DRAM.
//   (64, 32, 16, 16), stride 2: x (2 MiB) and two 0.5 MiB pools: 3.1 MB, 0.12 ms from DRAM, 0.02-0.03 ms in cache.
//
// How. Work is split by output rows (forward) or images (backward, whose windows overlap so that two outputs of
// one image add into the same grad_x values); for each output the 2x2 to 3x3 window is walked in scan order.
// With channels contiguous in x and in every output (channels_last), the loops run over whole vectors of the
// tier's width (cpu_isa.h) up to a multiple of 64 bytes of channels (kVecLanes), then in 16-byte vectors (kNarrow:
// PC-DARTS's edges have 4 or 8 channels, which would otherwise all run one at a time), and the rest one at a time
// (at stride 1 with fewer channels than a vector's lanes, a vector holds several pixels: "Packed pixels" below);
// each channel's arithmetic is the same in every lane width, so the results are too. With any other layout every channel runs one at a time (correct, not fast). The statistics are sums of (v - shift)
// and (v - shift)^2 in double, with shift = x[0, c, 0, 0], a value in the data's range, so that the variance does
// not cancel catastrophically. They are summed in locals over an output row, then added to the slot of its chunk of
// rows (chunks fixed by the shapes alone), and the slots are added up in chunk order at the end: the same bits
// whatever the number of threads.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <limits>
#include <optional>
#include <type_traits>
#include <vector>

#include "fastdarts/checks.h"
#include "fastdarts/cpu_common.h"
#include "fastdarts/cpu_isa.h"

namespace fastdarts {
namespace {

// Output values per forward task: below about this much work a second thread costs more than it saves.
constexpr int64_t kTaskValues = 32768;

// The window of output row ho (or column wo): the first input row and how many rows lie inside [0, size).
struct Span {
  int64_t first, count;
};

FASTDARTS_ALWAYS_INLINE Span window_span(int64_t out, int64_t stride, int64_t size) {
  const int64_t lo = std::max<int64_t>(0, out * stride - 1);
  const int64_t hi = std::min<int64_t>(size, out * stride + 2);
  return {lo, hi - lo};
}

// One channel (kVector false) or one vector of channels of tier kIsa (true): the value type V, the per-lane tap number
// I (the integer type a comparison of two V yields), the double-precision type D with one lane per channel, and
// loads and stores through pointers (by reference: see cpu_isa.h on -Wpsabi).
template <typename T, bool kVector, CpuIsa kIsa>
struct Lane;

// The channels of one 16-byte vector, the baseline tier's, which every tier's loops can use for a short tail.
template <typename T>
constexpr int64_t kNarrow = kLanes<T, CpuIsa::kBaseline>;

template <typename T, CpuIsa kIsa>
struct Lane<T, false, kIsa> {
  using V = T;
  using I = int64_t;
  using IElem = int64_t;
  using D = double;
  static constexpr int64_t kWidth = 1;
  static FASTDARTS_ALWAYS_INLINE void load(V& v, const T* p) {
    v = *p;
  }
  static FASTDARTS_ALWAYS_INLINE void store(T* p, const V& v) {
    *p = v;
  }
  static FASTDARTS_ALWAYS_INLINE void widen(D& d, const V& v) {
    d = static_cast<double>(v);
  }
  static FASTDARTS_ALWAYS_INLINE void load_wide(D& d, const double* p) {
    d = *p;
  }
  static FASTDARTS_ALWAYS_INLINE void store_wide(double* p, const D& d) {
    *p = d;
  }
};

// One vector of T's channels in double: kParts registers of the tier (two for float, one for double). A single
// GCC vector twice the register width goes through the stack and general registers in every operation under AVX2.
template <typename T, CpuIsa kIsa>
struct Wide {
  static constexpr int64_t kParts = sizeof(double) / sizeof(T);
  Vec<double, kIsa> part[kParts];
  FASTDARTS_ALWAYS_INLINE Wide& operator+=(const Wide& o) {
    for (int64_t p = 0; p < kParts; ++p) {
      part[p] += o.part[p];
    }
    return *this;
  }
  FASTDARTS_ALWAYS_INLINE Wide& operator-=(const Wide& o) {
    for (int64_t p = 0; p < kParts; ++p) {
      part[p] -= o.part[p];
    }
    return *this;
  }
  FASTDARTS_ALWAYS_INLINE Wide operator*(const Wide& o) const {
    Wide product;
    for (int64_t p = 0; p < kParts; ++p) {
      product.part[p] = part[p] * o.part[p];
    }
    return product;
  }
};

template <typename T, CpuIsa kIsa>
struct Lane<T, true, kIsa> {
  using V = Vec<T, kIsa>;
  using I = decltype(V{} > V{});
  using IElem = std::conditional_t<sizeof(T) == 4, int32_t, int64_t>;
  using D = Wide<T, kIsa>;
  static constexpr int64_t kWidth = kLanes<T, kIsa>;
  static FASTDARTS_ALWAYS_INLINE void load(V& v, const T* p) {
    vec_load(v, p);
  }
  static FASTDARTS_ALWAYS_INLINE void store(T* p, const V& v) {
    vec_store(p, v);
  }
  static FASTDARTS_ALWAYS_INLINE void widen(D& d, const V& v) {
    using Part = typename VecOf<T, kVecBytes<kIsa> / D::kParts>::type;  // the channels of one part of d
    for (int64_t p = 0; p < D::kParts; ++p) {
      Part lanes;
      std::memcpy(&lanes, reinterpret_cast<const char*>(&v) + p * sizeof(Part), sizeof(Part));
      d.part[p] = __builtin_convertvector(lanes, Vec<double, kIsa>);
    }
  }
  static FASTDARTS_ALWAYS_INLINE void load_wide(D& d, const double* p) {
    std::memcpy(&d, p, sizeof(D));
  }
  static FASTDARTS_ALWAYS_INLINE void store_wide(double* p, const D& d) {
    std::memcpy(p, &d, sizeof(D));
  }
};

// ---- Loops. FASTDARTS_ALWAYS_INLINE, so that each is compiled for the instruction set of the task loop that
// ---- calls it (cpu_isa.h).

// The maximum and the sum of a rows x cols window whose first tap is at p (channel strides are 1 or unused). The
// maximum follows ATen: a tap replaces it when greater or NaN, so any NaN in the window comes out.
template <typename L, typename T>
FASTDARTS_ALWAYS_INLINE void pool_window(const T* p, int64_t step_h, int64_t step_w, int64_t rows, int64_t cols,
                                         typename L::V& max, typename L::V& sum) {
  using V = typename L::V;
  L::load(max, p);
  sum = max;
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t q = r == 0 ? 1 : 0; q < cols; ++q) {
      V v;
      L::load(v, p + r * step_h + q * step_w);
      // NaN first: then v > max is false and the NaN stays. (The other order lets GCC merge the two conditions
      // into one integer-vector mask, which it turns into scalar code when these loops are inlined.)
      max = v != v ? v : max;
      max = v > max ? v : max;
      sum += v;
    }
  }
}

// The tap number r * cols + q of the window's argmax, by pool_window's rule: the first maximum in scan order, or
// the last NaN.
template <typename L, typename T>
FASTDARTS_ALWAYS_INLINE void argmax_window(const T* p, int64_t step_h, int64_t step_w, int64_t rows, int64_t cols,
                                           typename L::I& index) {
  using V = typename L::V;
  using I = typename L::I;
  V max;
  L::load(max, p);
  index = I{};
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t q = r == 0 ? 1 : 0; q < cols; ++q) {
      V v;
      L::load(v, p + r * step_h + q * step_w);
      // The tap wins when v > max or v is NaN: when !(v <= ceiling), with a NaN maximum raised to +inf so that only
      // a NaN beats it. One comparison for both selects, for the same reason as in pool_window.
      const V ceiling = max != max ? V{} + std::numeric_limits<T>::infinity() : max;
      const I tap = I{} + static_cast<typename L::IElem>(r * cols + q);
      index = v <= ceiling ? index : tap;
      max = v <= ceiling ? max : v;
    }
  }
}

// s1 += v - shift, s2 += (v - shift)^2, in double.
template <typename L>
FASTDARTS_ALWAYS_INLINE void add_moments(typename L::D& s1, typename L::D& s2, const typename L::V& v,
                                         const typename L::D& shift) {
  typename L::D d;
  L::widen(d, v);
  d -= shift;
  s1 += d;
  s2 += d * d;
}

template <typename T>
struct ForwardArgs {
  int64_t C, H, W, Ho, Wo, s;
  const T* x;
  Strides xs;
  T* max_out;
  T* avg_out;
  Strides os;                // both outputs have these strides
  int64_t vector_channels;   // channels [0, vector_channels) run in whole vectors,
  int64_t narrow_channels;   // [vector_channels, narrow_channels) in 16-byte ones (kNarrow), the rest one at a time
  const double* shift;       // [C]
};

// Output columns [wo_begin, wo_end) of row (n, ho), channels [c0, c0 + L::kWidth): both pools, and their moments
// added to `partial`.
template <typename L, typename T>
FASTDARTS_ALWAYS_INLINE void forward_row(const ForwardArgs<T>& f, int64_t n, int64_t ho, int64_t c0,
                                         int64_t wo_begin, int64_t wo_end, double* partial) {
  using V = typename L::V;
  using D = typename L::D;
  const Span rows = window_span(ho, f.s, f.H);
  const T* in = f.x + n * f.xs.n + c0 * f.xs.c + rows.first * f.xs.h;
  const int64_t out_offset = n * f.os.n + c0 * f.os.c + ho * f.os.h;
  T* max_row = f.max_out + out_offset;
  T* avg_row = f.avg_out + out_offset;
  D shift;
  L::load_wide(shift, f.shift + c0);
  D s1_max{}, s2_max{}, s1_avg{}, s2_avg{};
  for (int64_t wo = wo_begin; wo < wo_end; ++wo) {
    const Span cols = window_span(wo, f.s, f.W);
    V max, sum;
    pool_window<L>(in + cols.first * f.xs.w, f.xs.h, f.xs.w, rows.count, cols.count, max, sum);
    const V avg = sum / static_cast<T>(rows.count * cols.count);
    L::store(max_row + wo * f.os.w, max);
    L::store(avg_row + wo * f.os.w, avg);
    add_moments<L>(s1_max, s2_max, max, shift);
    add_moments<L>(s1_avg, s2_avg, avg, shift);
  }
  const D sums[4] = {s1_max, s2_max, s1_avg, s2_avg};
  for (int64_t k = 0; k < 4; ++k) {
    double* slot = partial + k * f.C + c0;
    D total;
    L::load_wide(total, slot);
    total += sums[k];
    L::store_wide(slot, total);
  }
}

// Packed pixels. With fewer channels than a vector of the tier has lanes (PC-DARTS's 4 and 8), a vector per pixel
// would leave most lanes idle. At stride 1, in channels_last with C dividing the lanes, one vector instead holds
// G = lanes / C neighbouring pixels: their windows' taps are the same vector loads shifted by whole pixels (C
// values), so the loops of one pixel serve G of them. The interior columns 1 .. Wo-2 have full 3-wide windows and
// run so in whole vectors; the border columns and the rest run a pixel at a time. Each pixel's arithmetic, and in
// the backward the order in which the windows add into grad_x, is the one of a pixel at a time: the same bits.
// Only the statistics' double sums are added in another order.

// The number of pixels a vector of tier kIsa holds, or 0 when the pixels of f (ForwardArgs or BackwardArgs) are
// not packed.
template <typename T, CpuIsa kIsa, typename Args>
FASTDARTS_ALWAYS_INLINE int64_t packed_pixels(const Args& a, std::initializer_list<Strides> dense) {
  constexpr int64_t kWidth = kLanes<T, kIsa>;
  if (a.s != 1 || a.C >= kWidth || kWidth % a.C != 0) {
    return 0;
  }
  for (const Strides& t : dense) {  // channels, then pixels, contiguous
    if (t.c != 1 || t.w != a.C) {
      return 0;
    }
  }
  return kWidth / a.C;
}

// Output row (n, ho), columns from 1 in whole vectors of G pixels (see "Packed pixels"); returns the first column
// not done.
template <typename T, CpuIsa kIsa>
FASTDARTS_ALWAYS_INLINE int64_t forward_packed(const ForwardArgs<T>& f, int64_t n, int64_t ho, int64_t G,
                                               double* partial) {
  using L = Lane<T, true, kIsa>;
  using V = typename L::V;
  using D = typename L::D;
  const int64_t vectors = (f.Wo - 2) / G;
  if (vectors <= 0) {
    return 1;
  }
  const Span rows = window_span(ho, 1, f.H);
  const T* in = f.x + n * f.xs.n + rows.first * f.xs.h;
  T* max_row = f.max_out + n * f.os.n + ho * f.os.h;
  T* avg_row = f.avg_out + n * f.os.n + ho * f.os.h;
  double lanes[L::kWidth];
  for (int64_t l = 0; l < L::kWidth; ++l) {
    lanes[l] = f.shift[l % f.C];
  }
  D shift;
  L::load_wide(shift, lanes);
  D s1_max{}, s2_max{}, s1_avg{}, s2_avg{};
  for (int64_t k = 0; k < vectors; ++k) {
    const int64_t wo = 1 + k * G;
    V max, sum;
    pool_window<L>(in + (wo - 1) * f.C, f.xs.h, f.C, rows.count, 3, max, sum);
    const V avg = sum / static_cast<T>(rows.count * 3);
    L::store(max_row + wo * f.C, max);
    L::store(avg_row + wo * f.C, avg);
    add_moments<L>(s1_max, s2_max, max, shift);
    add_moments<L>(s1_avg, s2_avg, avg, shift);
  }
  const D sums[4] = {s1_max, s2_max, s1_avg, s2_avg};
  for (int64_t k = 0; k < 4; ++k) {  // each lane's sums to its channel
    L::store_wide(lanes, sums[k]);
    for (int64_t l = 0; l < L::kWidth; ++l) {
      partial[k * f.C + l % f.C] += lanes[l];
    }
  }
  return 1 + vectors * G;
}

// Output columns [wo_begin, wo_end) of row (n, ho), every channel, a pixel at a time. (A function that always
// inlines, not a lambda: a lambda's body would be compiled for the baseline in every tier's copy.)
template <typename T, CpuIsa kIsa>
FASTDARTS_ALWAYS_INLINE void forward_pixels(const ForwardArgs<T>& f, int64_t n, int64_t ho, int64_t wo_begin,
                                            int64_t wo_end, double* partial) {
  for (int64_t c0 = 0; c0 < f.vector_channels; c0 += kLanes<T, kIsa>) {
    forward_row<Lane<T, true, kIsa>>(f, n, ho, c0, wo_begin, wo_end, partial);
  }
  for (int64_t c0 = f.vector_channels; c0 < f.narrow_channels; c0 += kNarrow<T>) {
    forward_row<Lane<T, true, CpuIsa::kBaseline>>(f, n, ho, c0, wo_begin, wo_end, partial);
  }
  for (int64_t c = f.narrow_channels; c < f.C; ++c) {
    forward_row<Lane<T, false, kIsa>>(f, n, ho, c, wo_begin, wo_end, partial);
  }
}

// Output rows [begin, end) (row = n Ho + ho) of every channel.
template <typename T, CpuIsa kIsa>
FASTDARTS_ALWAYS_INLINE void forward_rows(const ForwardArgs<T>& f, int64_t begin, int64_t end, double* partial) {
  const int64_t G = packed_pixels<T, kIsa>(f, {f.xs, f.os});
  for (int64_t row = begin; row < end; ++row) {
    const int64_t n = row / f.Ho;
    const int64_t ho = row % f.Ho;
    if (G == 0) {
      forward_pixels<T, kIsa>(f, n, ho, 0, f.Wo, partial);
      continue;
    }
    forward_pixels<T, kIsa>(f, n, ho, 0, std::min<int64_t>(1, f.Wo), partial);
    forward_pixels<T, kIsa>(f, n, ho, forward_packed<T, kIsa>(f, n, ho, G, partial), f.Wo, partial);
  }
}

FASTDARTS_CPU_ISA_COPIES(forward_rows)

template <typename T>
struct BackwardArgs {
  int64_t C, H, W, Ho, Wo, s;
  const T* x;
  Strides xs;
  const T* grad_max;  // nullptr: no max part
  Strides gms;
  const T* grad_avg;  // nullptr: no avg part
  Strides gas;
  T* grad_x;
  Strides gxs;
  int64_t vector_channels, narrow_channels;  // as in ForwardArgs
};

// Adds the gradient of output columns [wo_begin, wo_end) of row (n, ho), channels [c0, c0 + L::kWidth), into grad_x.
template <typename L, bool kMax, bool kAvg, typename T>
FASTDARTS_ALWAYS_INLINE void backward_row(const BackwardArgs<T>& b, int64_t n, int64_t ho, int64_t c0,
                                          int64_t wo_begin, int64_t wo_end) {
  using V = typename L::V;
  using I = typename L::I;
  const Span rows = window_span(ho, b.s, b.H);
  const T* in = b.x + n * b.xs.n + c0 * b.xs.c + rows.first * b.xs.h;
  T* out = b.grad_x + n * b.gxs.n + c0 * b.gxs.c + rows.first * b.gxs.h;
  for (int64_t wo = wo_begin; wo < wo_end; ++wo) {
    const Span cols = window_span(wo, b.s, b.W);
    I index{};
    V g_max{}, g_avg{};
    if (kMax) {
      argmax_window<L>(in + cols.first * b.xs.w, b.xs.h, b.xs.w, rows.count, cols.count, index);
      L::load(g_max, b.grad_max + n * b.gms.n + c0 * b.gms.c + ho * b.gms.h + wo * b.gms.w);
    }
    if (kAvg) {
      L::load(g_avg, b.grad_avg + n * b.gas.n + c0 * b.gas.c + ho * b.gas.h + wo * b.gas.w);
      g_avg = g_avg / static_cast<T>(rows.count * cols.count);  // ATen's avg_pool2d backward divides, too
    }
    T* window = out + cols.first * b.gxs.w;
    for (int64_t r = 0; r < rows.count; ++r) {
      for (int64_t q = 0; q < cols.count; ++q) {
        T* p = window + r * b.gxs.h + q * b.gxs.w;
        V v;
        L::load(v, p);
        if (kMax) {
          // A select, not a multiply by a 0/1 mask: an inf or NaN gradient must not leak into the other taps.
          v += index == I{} + static_cast<typename L::IElem>(r * cols.count + q) ? g_max : V{};
        }
        if (kAvg) {
          v += g_avg;
        }
        L::store(p, v);
      }
    }
  }
}

// Adds the gradient of output row (n, ho), columns from 1 in whole vectors of G pixels (see "Packed pixels"), into
// grad_x; returns the first column not done. The taps run from the right (q = 2, 1, 0): each pixel of grad_x then
// receives its windows' gradients in the order of their output columns, as a pixel at a time gives them.
template <typename T, CpuIsa kIsa, bool kMax, bool kAvg>
FASTDARTS_ALWAYS_INLINE int64_t backward_packed(const BackwardArgs<T>& b, int64_t n, int64_t ho, int64_t G) {
  using L = Lane<T, true, kIsa>;
  using V = typename L::V;
  using I = typename L::I;
  const int64_t vectors = (b.Wo - 2) / G;
  if (vectors <= 0) {
    return 1;
  }
  const Span rows = window_span(ho, 1, b.H);
  const T* in = b.x + n * b.xs.n + rows.first * b.xs.h;
  T* out = b.grad_x + n * b.gxs.n + rows.first * b.gxs.h;
  for (int64_t k = 0; k < vectors; ++k) {
    const int64_t wo = 1 + k * G;
    I index{};
    V g_max{}, g_avg{};
    if (kMax) {
      argmax_window<L>(in + (wo - 1) * b.C, b.xs.h, b.C, rows.count, 3, index);
      L::load(g_max, b.grad_max + n * b.gms.n + ho * b.gms.h + wo * b.C);
    }
    if (kAvg) {
      L::load(g_avg, b.grad_avg + n * b.gas.n + ho * b.gas.h + wo * b.C);
      g_avg = g_avg / static_cast<T>(rows.count * 3);
    }
    T* window = out + (wo - 1) * b.C;
    for (int64_t r = 0; r < rows.count; ++r) {
      for (int64_t q = 2; q >= 0; --q) {
        T* p = window + r * b.gxs.h + q * b.C;
        V v;
        L::load(v, p);
        if (kMax) {
          v += index == I{} + static_cast<typename L::IElem>(r * 3 + q) ? g_max : V{};
        }
        if (kAvg) {
          v += g_avg;
        }
        L::store(p, v);
      }
    }
  }
  return 1 + vectors * G;
}

// Adds the gradient of output columns [wo_begin, wo_end) of row (n, ho), every channel, a pixel at a time, into grad_x
// (a function that always inlines, as forward_pixels).
template <typename T, CpuIsa kIsa, bool kMax, bool kAvg>
FASTDARTS_ALWAYS_INLINE void backward_pixels(const BackwardArgs<T>& b, int64_t n, int64_t ho, int64_t wo_begin,
                                             int64_t wo_end) {
  for (int64_t c0 = 0; c0 < b.vector_channels; c0 += kLanes<T, kIsa>) {
    backward_row<Lane<T, true, kIsa>, kMax, kAvg>(b, n, ho, c0, wo_begin, wo_end);
  }
  for (int64_t c0 = b.vector_channels; c0 < b.narrow_channels; c0 += kNarrow<T>) {
    backward_row<Lane<T, true, CpuIsa::kBaseline>, kMax, kAvg>(b, n, ho, c0, wo_begin, wo_end);
  }
  for (int64_t c = b.narrow_channels; c < b.C; ++c) {
    backward_row<Lane<T, false, kIsa>, kMax, kAvg>(b, n, ho, c, wo_begin, wo_end);
  }
}

// Images [begin, end): grad_x zeroed, then every output's gradient added in. Windows of different images never
// overlap, so each task writes only its own images.
template <typename T, CpuIsa kIsa, bool kMax, bool kAvg>
FASTDARTS_ALWAYS_INLINE void backward_images(const BackwardArgs<T>& b, int64_t begin, int64_t end) {
  const Strides& s = b.gxs;
  // Packed only on AVX-512, where it measured faster (64 images of 4 channels at 32x32: 0.66 -> 0.43 ms). On AVX2 it
  // measured slower (0.57 -> 0.66 ms); a likely cause, not measured: each tap's read-modify-write of grad_x overlaps
  // the previous tap's store without matching it, which a vector of two pixels pays for without gaining much.
  const int64_t G = kIsa != CpuIsa::kAvx512
                        ? 0
                        : packed_pixels<T, kIsa>(b, {b.xs, b.gxs, kMax ? b.gms : b.xs, kAvg ? b.gas : b.xs});
  for (int64_t n = begin; n < end; ++n) {
    T* image = b.grad_x + n * s.n;
    if (s.c == 1 || b.C == 1) {
      for (int64_t h = 0; h < b.H; ++h) {
        for (int64_t w = 0; w < b.W; ++w) {
          std::fill_n(image + h * s.h + w * s.w, b.C, T(0));
        }
      }
    } else {
      for (int64_t c = 0; c < b.C; ++c) {
        for (int64_t h = 0; h < b.H; ++h) {
          for (int64_t w = 0; w < b.W; ++w) {
            image[c * s.c + h * s.h + w * s.w] = T(0);
          }
        }
      }
    }
    for (int64_t ho = 0; ho < b.Ho; ++ho) {
      if (G == 0) {
        backward_pixels<T, kIsa, kMax, kAvg>(b, n, ho, 0, b.Wo);
        continue;
      }
      backward_pixels<T, kIsa, kMax, kAvg>(b, n, ho, 0, std::min<int64_t>(1, b.Wo));
      backward_pixels<T, kIsa, kMax, kAvg>(b, n, ho, backward_packed<T, kIsa, kMax, kAvg>(b, n, ho, G), b.Wo);
    }
  }
}

template <typename T, CpuIsa kIsa>
FASTDARTS_ALWAYS_INLINE void backward_images_any(const BackwardArgs<T>& b, int64_t begin, int64_t end) {
  const bool with_max = b.grad_max != nullptr;
  const bool with_avg = b.grad_avg != nullptr;
  if (with_max && with_avg) {
    backward_images<T, kIsa, true, true>(b, begin, end);
  } else if (with_max) {
    backward_images<T, kIsa, true, false>(b, begin, end);
  } else if (with_avg) {
    backward_images<T, kIsa, false, true>(b, begin, end);
  } else {
    backward_images<T, kIsa, false, false>(b, begin, end);
  }
}

FASTDARTS_CPU_ISA_COPIES(backward_images_any)

void check_arguments(const char* op, const at::Tensor& x, int64_t stride) {
  check_images(op, "x", x);
  // The two pools of a DARTS edge: stride 1 on a normal edge, 2 on a reduction edge.
  TORCH_CHECK_VALUE(stride == 1 || stride == 2, op, ": stride must be 1 or 2, got ", stride);
  check_supported_dtype(op, x);
  TORCH_INTERNAL_ASSERT(x.device().is_cpu());
}

std::vector<int64_t> output_sizes(const at::Tensor& x, int64_t stride) {
  return {x.size(0), x.size(1), (x.size(2) - 1) / stride + 1, (x.size(3) - 1) / stride + 1};
}

void check_output_grad(const char* op, const char* name, const std::optional<at::Tensor>& grad,
                       at::IntArrayRef sizes, const at::Tensor& x) {
  if (!grad.has_value()) {
    return;
  }
  TORCH_CHECK_VALUE(grad->sizes() == sizes, op, ": ", name, " must have shape ", sizes, ", got ", grad->sizes());
  check_dtype_and_device(op, name, *grad, "x", x);
}

// Whether channel c + 1 follows channel c in every tensor (any layout when there is one channel).
bool channels_contiguous(std::initializer_list<const at::Tensor*> tensors) {
  return std::all_of(tensors.begin(), tensors.end(), [](const at::Tensor* t) {
    return t->size(1) == 1 || t->stride(1) == 1;
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> pool_bn_stats_cpu(const at::Tensor& x, int64_t stride) {
  check_arguments("pool_bn_stats", x, stride);
  // The pools take the layout of x: channels_last in, channels_last out.
  const at::TensorOptions options = x.options().memory_format(x.suggest_memory_format());
  const std::vector<int64_t> sizes = output_sizes(x, stride);
  at::Tensor max_out = at::empty(sizes, options);
  at::Tensor avg_out = at::empty(sizes, options);
  const int64_t C = x.size(1);
  at::Tensor mean = at::empty({2, C}, x.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor var = at::empty({2, C}, mean.options());
  if (x.size(0) == 0) {  // no values: the statistics are NaN, as torch.var_mean's are
    mean.fill_(std::numeric_limits<double>::quiet_NaN());
    var.fill_(std::numeric_limits<double>::quiet_NaN());
    return {max_out, avg_out, mean, var};
  }
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "pool_bn_stats_cpu", [&] {
    const CpuIsa isa = cpu_isa();  // once per call, before the threads start
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const Strides xs = strides_of(x);
    std::vector<double> shift(C);
    for (int64_t c = 0; c < C; ++c) {
      shift[c] = static_cast<double>(xp[c * xs.c]);
    }
    const bool vectors = channels_contiguous({&x, &max_out});
    const ForwardArgs<scalar_t> f{C,
                                  x.size(2),
                                  x.size(3),
                                  sizes[2],
                                  sizes[3],
                                  stride,
                                  xp,
                                  xs,
                                  max_out.data_ptr<scalar_t>(),
                                  avg_out.data_ptr<scalar_t>(),
                                  strides_of(max_out),
                                  vectors ? C / kVecLanes<scalar_t> * kVecLanes<scalar_t> : 0,
                                  vectors ? C / kNarrow<scalar_t> * kNarrow<scalar_t> : 0,
                                  shift.data()};
    // Chunks of rows fixed by the shapes, each with its own slot [4][C] of sums (of d and d^2 for max_out, then for
    // avg_out), added up in chunk order: the statistics do not depend on how the threads split the chunks.
    const int64_t num_rows = x.size(0) * f.Ho;
    const int64_t chunk_rows = std::max<int64_t>(1, kTaskValues / (f.Wo * C));
    const int64_t num_chunks = (num_rows + chunk_rows - 1) / chunk_rows;
    std::vector<double> slots(num_chunks * 4 * C, 0.0);
    parallel_for_balanced(0, num_chunks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t chunk = begin; chunk < end; ++chunk) {
        const int64_t first = chunk * chunk_rows;
        FASTDARTS_CALL_FOR_CPU_ISA(isa, forward_rows, scalar_t, f, first, std::min(first + chunk_rows, num_rows),
                                   slots.data() + chunk * 4 * C);
      }
    });
    const std::vector<double> sums = add_slots(slots.data(), num_chunks, 4 * C);
    // mean = shift + E[d] and var = E[d^2] - E[d]^2 with d = v - shift.
    const double count = static_cast<double>(num_rows * f.Wo);
    scalar_t* mp = mean.data_ptr<scalar_t>();
    scalar_t* vp = var.data_ptr<scalar_t>();
    for (int64_t k = 0; k < 2; ++k) {
      for (int64_t c = 0; c < C; ++c) {
        const double s1 = sums[(2 * k) * C + c];
        const double s2 = sums[(2 * k + 1) * C + c];
        const double m = s1 / count;
        const double v = s2 / count - m * m;
        mp[k * C + c] = static_cast<scalar_t>(shift[c] + m);
        // Rounding can leave a constant channel's variance a hair below 0; a NaN stays NaN (std::max would drop it).
        vp[k * C + c] = static_cast<scalar_t>(v < 0.0 ? 0.0 : v);
      }
    }
  });
  return {max_out, avg_out, mean, var};
}

at::Tensor pool_bn_stats_backward_cpu(const std::optional<at::Tensor>& grad_max,
                                      const std::optional<at::Tensor>& grad_avg, const at::Tensor& x,
                                      int64_t stride) {
  const char* op = "pool_bn_stats_backward";
  check_arguments(op, x, stride);
  const std::vector<int64_t> sizes = output_sizes(x, stride);
  check_output_grad(op, "grad_max", grad_max, sizes, x);
  check_output_grad(op, "grad_avg", grad_avg, sizes, x);
  at::Tensor grad_x = at::empty_like(x);
  if (x.numel() == 0) {
    return grad_x;
  }
  // On the vector path every gradient needs contiguous channels: a gradient without them (autograd's expanded
  // gradient of a sum, say) is copied to channels_last first.
  const bool vectors = channels_contiguous({&x, &grad_x});
  auto prepare = [&](const std::optional<at::Tensor>& grad) {
    if (!grad.has_value()) {
      return at::Tensor();
    }
    if (vectors && !channels_contiguous({&*grad})) {
      return grad->contiguous(at::MemoryFormat::ChannelsLast);
    }
    return *grad;
  };
  const at::Tensor gm = prepare(grad_max);
  const at::Tensor ga = prepare(grad_avg);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "pool_bn_stats_backward_cpu", [&] {
    const CpuIsa isa = cpu_isa();  // once per call, before the threads start
    const BackwardArgs<scalar_t> b{x.size(1),
                                   x.size(2),
                                   x.size(3),
                                   sizes[2],
                                   sizes[3],
                                   stride,
                                   x.const_data_ptr<scalar_t>(),
                                   strides_of(x),
                                   gm.defined() ? gm.const_data_ptr<scalar_t>() : nullptr,
                                   gm.defined() ? strides_of(gm) : Strides{},
                                   ga.defined() ? ga.const_data_ptr<scalar_t>() : nullptr,
                                   ga.defined() ? strides_of(ga) : Strides{},
                                   grad_x.data_ptr<scalar_t>(),
                                   strides_of(grad_x),
                                   vectors ? x.size(1) / kVecLanes<scalar_t> * kVecLanes<scalar_t> : 0,
                                   vectors ? x.size(1) / kNarrow<scalar_t> * kNarrow<scalar_t> : 0};
    // Whole images per task (their windows overlap only within an image); one image is already a few
    // microseconds of work at the smallest DARTS shapes.
    parallel_for_balanced(0, x.size(0), 1, [&](int64_t begin, int64_t end) {
      FASTDARTS_CALL_FOR_CPU_ISA(isa, backward_images_any, scalar_t, b, begin, end);
    });
  });
  return grad_x;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdarts, CPU, m) {
  m.impl("pool_bn_stats", &pool_bn_stats_cpu);
  m.impl("pool_bn_stats_backward", &pool_bn_stats_backward_cpu);
}

}  // namespace fastdarts
