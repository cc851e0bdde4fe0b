// CPU kernels of bn_weighted_sum and bn_weighted_sum_backward (schemas in ../fastdarts.cpp): the end of a DARTS
// mixed op, sum_k w[k] BN_k(t_k), with the K affine-free batch norms folded into the weighted sum, so that the K
// normalised tensors are never written nor read back.
//
//   shapes:   ts[k], grad, out, grad_ts[k] [N, C, H, W]; w [K]; mean, invstd [K, C]; M = N H W
//   forward:  xhat_k = (t_k - mean[k, c]) invstd[k, c];  out = sum_k w[k] xhat_k
//   backward: grad_w[k] = sum_{n, c, h, w} g xhat_k, with g = grad
//             grad_t_k = w[k] invstd (g - mean_c(g) - xhat_k mean_c(g xhat_k))  (batch-statistics rows: mean and
//                        invstd are the biased batch statistics of t_k, so the gradient flows through them, as in
//                        native_batch_norm_backward in training)
//             grad_t_k = w[k] invstd g                                        (fixed rows: skip connection, eval)
//             mean_c: the mean over (n, h, w) of one channel.
//
// Floors, float32, (64, 16, 32, 32), K = 7 (4.2 MB per tensor; 26 GB/s from DRAM, benchmarks/RESULTS.md; the
// few FLOPs per value are trivial):
//   forward:  read the K inputs, write out: 33.6 MB, 1.3 ms.
//   backward: read grad and the K inputs, write the K input gradients: 62.9 MB, 2.4 ms. With batch-statistics
//             rows the second pass has to wait for the per-channel sums of the first, so it reads grad and those
//             inputs again: 96.5 MB, 3.7 ms when all K rows are.
//
// How. The kernels compute in channels_last, where a pixel's C channels are contiguous: other layouts are copied
// in (and the results out), correct but not fast. The pixels are cut into fixed units (about kUnitValues values,
// whole pixels), split among the threads; a unit is walked in groups of R pixels (R C about kGroupValues values).
// Each per-channel quantity is expanded once per call into a pattern of one group's length (pattern[r C + c] =
// value[c]), so that every inner loop is a plain elementwise loop over a group, which vectorises whatever C is.
// forward:  out's group stays in L1 while the K inputs are added into it. (Walking a unit one input at a time, as
//           pass 2 below does, measured no faster inside a search step.)
// backward: pass 1 reads grad once (a group of it stays in L1 while the K inputs' are read) and accumulates, per
//           value of a group, sum g and sum g (t_k - mean) in double (each product rounded once to the inputs'
//           precision); a unit's group-wide sums are folded into per-channel sums in its own slot, and the slots
//           are added in unit order, so the results do not depend on the thread count. Subtracting the mean
//           before the product keeps the sums free of cancellation. Pass 1 also writes the fixed rows' gradients
//           (they need no sums). Pass 2 writes the batch-statistics rows':
//             grad_t_k = a g + b (t_k - mean) + e,  a = w invstd,  b = -a invstd^2 S_k / M,  e = -a S / M,
//           with S = sum g and S_k = sum g (t_k - mean) per channel; grad_w[k] = sum_c invstd S_k. Pass 2
//           walks a unit one row at a time while grad's unit stays in L1. (Pass 1 walked that way ran
//           slower: each value's double sum then waits on its own previous update.)
// bn_weighted_sum_backward_factors is the same backward with pass 2 only for the rows it writes out: it returns the
// factors (a, b, mean, e) of every row, so that a kernel reading grad and t_k anyway (the backward of a conv
// candidate, of a stride-2 skip or of a cell's preprocessing) forms grad_t_k itself, and neither writes nor reads it
// back.
// Where C is a multiple of the vectors' lanes or divides them, the patterns repeat every few whole vectors
// (register_period): pass 2 then holds one row's patterns in registers instead of reading them for every group.
// The loops are compiled once per instruction-set tier (cpu_isa.h): the conversions and double sums
// of pass 1 keep up with memory only at 8 doubles per instruction.
// Outputs of 2 MiB and more (out, and pass 2's gradients) are written by non-temporal stores where whole vectors
// allow it: a plain store first reads the line it writes, a third more traffic for pass 2's one input and one
// output. On an Intel Xeon, inputs not in any cache, (64, 16, 32, 32): forward 1.8-1.3 ms against 2.3-1.8,
// backward 5.1-4.1 ms against 6.2-6.0; with a pass reading the outputs right after, streamed was still faster in 10
// of 12 pairs (benchmarks/RESULTS.md; weighted_sum, whose output is read at once too, gained nothing from them).

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

namespace fastdarts {
namespace {

// A group. The forward and pass 1 walk all K inputs over one group before the next, so what a group touches (the
// group of grad or out and of each input, K patterns, K + 1 rows of double sums) must stay well inside L1: groups of
// 256 values and more ran markedly slower.
constexpr int64_t kGroupValues = 64;
// A unit, the grain of the deterministic reduction: 16 KiB of grad in float32, as in weighted_sum_backward.
constexpr int64_t kUnitValues = 4096;
// at::internal::GRAIN_SIZE: below this many values read or written a second thread costs more than it saves (a
// pixel's channel touches one value of each tensor: K + 1 in the forward, up to K + 1 per backward pass; at the
// digits' 8x8 images, K = 7, a backward took 121 us on one thread).
constexpr int64_t kGrain = 32768;
// Outputs of at least this many bytes are written by non-temporal stores (streams() says where they can be). Only
// pass 2's and the forward's: pass 1 writes the fixed rows with plain stores.
constexpr int64_t kStreamBytes = int64_t{2} << 20;

// How the channels_last values [M pixels][C] are cut into units and groups, from the shape alone.
struct Geometry {
  // tensors: how many tensors the loops read or write per value of one.
  Geometry(int64_t C, int64_t pixels, int64_t tensors) : C(C), pixels(pixels) {
    group_pixels = std::max<int64_t>(1, kGroupValues / C);
    group = group_pixels * C;
    unit_pixels = group_pixels * std::max<int64_t>(1, kUnitValues / group);
    num_units = (pixels + unit_pixels - 1) / unit_pixels;
    grain = std::max<int64_t>(1, kGrain / (unit_pixels * C * tensors));
  }
  // The values [begin, end) of unit u.
  int64_t begin(int64_t u) const {
    return u * unit_pixels * C;
  }
  int64_t end(int64_t u) const {
    return std::min((u + 1) * unit_pixels, pixels) * C;
  }
  int64_t C, pixels, group_pixels, group, unit_pixels, num_units, grain;
};

// Whether the loops write outputs `outs` of geometry g with non-temporal stores on tier isa: large ones, whose groups
// are 4 or 8 of the tier's vectors (forward_units_streamed) and whose data start at a vector boundary, so that every
// group does.
template <typename T>
bool streams(const Geometry& g, CpuIsa isa, const std::vector<T*>& outs) {
  const int64_t lanes = vec_bytes(isa) / static_cast<int64_t>(sizeof(T));
  if (isa == CpuIsa::kBaseline || (g.group != 4 * lanes && g.group != 8 * lanes) ||
      g.pixels * g.C * static_cast<int64_t>(sizeof(T)) < kStreamBytes) {
    return false;
  }
  return std::all_of(outs.begin(), outs.end(),
                     [&](T* out) { return reinterpret_cast<uintptr_t>(out) % vec_bytes(isa) == 0; });
}

// values [rows, C] (row-major) repeated along a group: [rows, group] with pattern[i][r C + c] = values[i][c].
template <typename P>
std::vector<P> patterns(const std::vector<double>& values, int64_t rows, const Geometry& g) {
  std::vector<P> out(rows * g.group);
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t j = 0; j < g.group; ++j) {
      out[i * g.group + j] = static_cast<P>(values[i * g.C + j % g.C]);
    }
  }
  return out;
}

// The period, in values, of a per-channel pattern that whole vectors of tier kIsa repeat: C when it is a multiple of
// the vector's lanes, the lanes when C divides them, else 0 (no such period: the loops read the group's patterns).
// It divides a group (kGroupValues is a multiple of every tier's lanes), so a unit starts at phase 0.
template <typename T, CpuIsa kIsa>
int64_t register_period(int64_t C) {
  constexpr int64_t L = kLanes<T, kIsa>;
  return C % L == 0 ? C : L % C == 0 ? L : 0;
}

// The values of w [K] or of a statistic [K, C] in double, row-major whatever the strides. Read in place: a
// conversion through ATen costs microseconds, as much as the whole kernel at the supernet's small sizes.
std::vector<double> values_of(const at::Tensor& t) {
  const bool matrix = t.dim() == 2;
  const int64_t rows = matrix ? t.size(0) : 1;
  const int64_t cols = t.size(t.dim() - 1);
  const int64_t row_stride = matrix ? t.stride(0) : 0;
  const int64_t col_stride = t.stride(t.dim() - 1);
  std::vector<double> out(rows * cols);
  AT_DISPATCH_FLOATING_TYPES(t.scalar_type(), "values_of", [&] {
    const scalar_t* p = t.const_data_ptr<scalar_t>();
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t c = 0; c < cols; ++c) {
        out[r * cols + c] = static_cast<double>(p[r * row_stride + c * col_stride]);
      }
    }
  });
  return out;
}

// `t` with the channels contiguous: itself when it is already, else a copy.
at::Tensor channels_last(const at::Tensor& t) {
  return t.contiguous(at::MemoryFormat::ChannelsLast);
}

// An output laid out like `like` (at::empty_like, which keeps channels_last) and the channels_last tensor the
// kernel writes: the output itself when it is channels_last, else a scratch tensor copied into it by finish().
struct Output {
  explicit Output(const at::Tensor& like) : result(at::empty_like(like)) {
    work = result.is_contiguous(at::MemoryFormat::ChannelsLast)
               ? result
               : at::empty_like(result, at::MemoryFormat::ChannelsLast);
  }
  at::Tensor finish() {
    if (!work.is_same(result)) {
      result.copy_(work);
    }
    return result;
  }
  at::Tensor result, work;
};

// ---- Loops. FASTDARTS_ALWAYS_INLINE, so that each is compiled for the instruction set of the task loop that
// ---- calls it (cpu_isa.h).

template <typename T>
struct ForwardArgs {
  Geometry g;
  std::vector<const T*> ts;
  const T* mean;  // [K, group] patterns
  const T* coef;  // w[k] invstd[k, c], [K, group] patterns
  T* out;
};

// The forward of one group, the len values from lo: out's group stays in L1 while the K inputs are added into it.
template <typename T>
FASTDARTS_ALWAYS_INLINE void forward_group(const ForwardArgs<T>& f, int64_t lo, int64_t len) {
  const int64_t K = static_cast<int64_t>(f.ts.size());
  const int64_t G = f.g.group;
  T* __restrict__ o = f.out + lo;
  for (int64_t k = 0; k < K; ++k) {
    const T* __restrict__ t = f.ts[k] + lo;
    const T* __restrict__ m = f.mean + k * G;
    const T* __restrict__ c = f.coef + k * G;
    if (k == 0) {
      for (int64_t j = 0; j < len; ++j) {
        o[j] = (t[j] - m[j]) * c[j];
      }
    } else {
      for (int64_t j = 0; j < len; ++j) {
        o[j] += (t[j] - m[j]) * c[j];
      }
    }
  }
}

template <typename T, CpuIsa kIsa>  // kIsa: the tier the copy is compiled for
FASTDARTS_ALWAYS_INLINE void forward_units(const ForwardArgs<T>& f, int64_t begin, int64_t end) {
  const int64_t stop = f.g.end(end - 1);
  for (int64_t lo = f.g.begin(begin); lo < stop; lo += f.g.group) {
    forward_group(f, lo, std::min(f.g.group, stop - lo));
  }
}

// The forward of whole groups [lo, stop) of kNV vectors each (kNV V = G), out written by non-temporal stores: a
// group's sum over the K inputs stays in registers and its lines are written without being read first. The sum is
// formed in the order of forward_units, so both give the same bits.
template <typename T, CpuIsa kIsa, int64_t kNV>
FASTDARTS_ALWAYS_INLINE void forward_groups_streamed(const ForwardArgs<T>& f, int64_t lo, int64_t stop) {
  using V = Vec<T, kIsa>;
  constexpr int64_t L = kLanes<T, kIsa>;
  const int64_t K = static_cast<int64_t>(f.ts.size());
  const int64_t G = f.g.group;
  for (int64_t i = lo; i < stop; i += G) {
    V acc[kNV];
#pragma GCC unroll 8
    for (int64_t v = 0; v < kNV; ++v) {  // input 0 (K >= 1)
      V tv, mv, cv;
      vec_load(tv, f.ts[0] + i + v * L);
      vec_load(mv, f.mean + v * L);
      vec_load(cv, f.coef + v * L);
      acc[v] = (tv - mv) * cv;
    }
    for (int64_t k = 1; k < K; ++k) {
      const T* t = f.ts[k] + i;
      const T* m = f.mean + k * G;
      const T* c = f.coef + k * G;
#pragma GCC unroll 8
      for (int64_t v = 0; v < kNV; ++v) {
        V tv, mv, cv;
        vec_load(tv, t + v * L);
        vec_load(mv, m + v * L);
        vec_load(cv, c + v * L);
        acc[v] += (tv - mv) * cv;
      }
    }
#pragma GCC unroll 8
    for (int64_t v = 0; v < kNV; ++v) {
      vec_stream(f.out + i + v * L, acc[v]);
    }
  }
}

// forward_units with out streamed (where streams() allows it): whole groups through forward_groups_streamed, the
// tensor's last, partial group (if any) through forward_group.
template <typename T, CpuIsa kIsa>  // kIsa: the tier the copy is compiled for
FASTDARTS_ALWAYS_INLINE void forward_units_streamed(const ForwardArgs<T>& f, int64_t begin, int64_t end) {
  const int64_t G = f.g.group;
  const int64_t lo = f.g.begin(begin), stop = f.g.end(end - 1);
  const int64_t whole = lo + (stop - lo) / G * G;
  if constexpr (kIsa != CpuIsa::kBaseline) {  // streams() holds on these tiers only
    if (G == 4 * kLanes<T, kIsa>) {
      forward_groups_streamed<T, kIsa, 4>(f, lo, whole);
    } else {
      forward_groups_streamed<T, kIsa, 8>(f, lo, whole);
    }
  }
  if (whole < stop) {
    forward_group(f, whole, stop - whole);
  }
  store_fence();
}

FASTDARTS_CPU_ISA_COPIES(forward_units)
FASTDARTS_CPU_ISA_COPIES(forward_units_streamed)

template <typename T>
struct BackwardArgs {
  Geometry g;
  const T* grad = nullptr;
  std::vector<const T*> ts;
  std::vector<T*> grad_ts;  // per row, nullptr where no gradient is written (a row left to its factors)
  // Pass 1: which rows need S_k, whether S is needed, and where unit u's sums go: sums[u][row][c], row K for S.
  std::vector<bool> dot;
  bool sum_grad = false;
  double* sums = nullptr;
  // Pass 1 writes the rows with `fixed` set (a g), pass 2 the others (a g + b (t - mean) + e).
  std::vector<bool> fixed;
  const T* mean = nullptr;  // [K, group] patterns
  const T* a = nullptr;
  const T* b = nullptr;
  const T* e = nullptr;
  bool stream = false;  // pass 2 writes by non-temporal stores where whole vectors repeat their patterns
};

template <typename T, CpuIsa kIsa>  // kIsa: the tier the copy is compiled for
FASTDARTS_ALWAYS_INLINE void reduce_units(const BackwardArgs<T>& p, int64_t begin, int64_t end, double* acc) {
  const int64_t K = static_cast<int64_t>(p.ts.size());
  const int64_t C = p.g.C;
  const int64_t G = p.g.group;
  for (int64_t u = begin; u < end; ++u) {
    std::fill(acc, acc + (K + 1) * G, 0.0);
    const int64_t stop = p.g.end(u);
    for (int64_t lo = p.g.begin(u); lo < stop; lo += G) {
      const int64_t len = std::min(G, stop - lo);
      const T* __restrict__ g = p.grad + lo;
      if (p.sum_grad) {
        double* __restrict__ s = acc + K * G;
        for (int64_t j = 0; j < len; ++j) {
          s[j] += static_cast<double>(g[j]);
        }
      }
      for (int64_t k = 0; k < K; ++k) {
        const T* __restrict__ t = p.ts[k] + lo;
        if (p.dot[k]) {
          double* __restrict__ s = acc + k * G;
          const T* __restrict__ m = p.mean + k * G;
          for (int64_t j = 0; j < len; ++j) {
            s[j] += static_cast<double>(g[j] * (t[j] - m[j]));
          }
        }
        if (p.fixed[k] && p.grad_ts[k] != nullptr) {
          T* __restrict__ gt = p.grad_ts[k] + lo;
          const T* __restrict__ a = p.a + k * G;
          for (int64_t j = 0; j < len; ++j) {
            gt[j] = a[j] * g[j];
          }
        }
      }
    }
    // The group-wide sums folded into the unit's per-channel slot.
    double* slot = p.sums + u * (K + 1) * C;
    for (int64_t row = 0; row <= K; ++row) {
      if (row == K ? !p.sum_grad : !p.dot[row]) {
        continue;
      }
      for (int64_t c = 0; c < C; ++c) {
        double total = 0.0;
        for (int64_t r = 0; r < p.g.group_pixels; ++r) {
          total += acc[row * G + r * C + c];
        }
        slot[row * C + c] = total;
      }
    }
  }
}

FASTDARTS_CPU_ISA_COPIES(reduce_units)

// Pass 2 over the whole groups of one unit's values [lo, stop) for row k, kNV > 0: its four patterns held in kNV
// registers each (a period of kNV vectors, see register_period), so that a value costs a load of g (in L1, read
// once per row) and of t, and a store. Returns where it stopped: the start of the unit's last, partial group, if
// any (only the tensor's last unit has one).
template <typename T, CpuIsa kIsa, int64_t kNV, bool kStream>
FASTDARTS_ALWAYS_INLINE int64_t normalised_grad_groups(const BackwardArgs<T>& p, int64_t k, int64_t lo,
                                                       int64_t stop) {
  using V = Vec<T, kIsa>;
  constexpr int64_t L = kLanes<T, kIsa>;
  constexpr int64_t P = kNV * L;
  const int64_t G = p.g.group;
  V m[kNV], a[kNV], b[kNV], e[kNV];  // every loop over them unrolled: otherwise GCC keeps them on the stack (AVX2)
#pragma GCC unroll 4
  for (int64_t v = 0; v < kNV; ++v) {
    vec_load(m[v], p.mean + k * G + v * L);
    vec_load(a[v], p.a + k * G + v * L);
    vec_load(b[v], p.b + k * G + v * L);
    vec_load(e[v], p.e + k * G + v * L);
  }
  const T* __restrict__ g = p.grad;
  const T* __restrict__ t = p.ts[k];
  T* __restrict__ gt = p.grad_ts[k];
  const int64_t whole = lo + (stop - lo) / G * G;  // a group is a whole number of periods
  for (int64_t i = lo; i < whole; i += P) {
#pragma GCC unroll 4
    for (int64_t v = 0; v < kNV; ++v) {
      V gv, tv;
      vec_load(gv, g + i + v * L);
      vec_load(tv, t + i + v * L);
      const V out = a[v] * gv + b[v] * (tv - m[v]) + e[v];
      if constexpr (kStream) {
        vec_stream(gt + i + v * L, out);
      } else {
        vec_store(gt + i + v * L, out);
      }
    }
  }
  return whole;
}

// Pass 2, one unit at a time and one row at a time within it: a unit of grad stays in L1 while the rows stream
// their t in and their gradient out, two streams at a time rather than 2 K + 1. The group loop reads the patterns
// from memory: for every group where no register period exists, else for the last, partial group.
template <typename T, CpuIsa kIsa>  // kIsa: the tier the copy is compiled for
FASTDARTS_ALWAYS_INLINE void normalised_grad_units(const BackwardArgs<T>& p, int64_t begin, int64_t end) {
  const int64_t K = static_cast<int64_t>(p.ts.size());
  const int64_t G = p.g.group;
  const int64_t nv = register_period<T, kIsa>(p.g.C) / kLanes<T, kIsa>;
  for (int64_t u = begin; u < end; ++u) {
    const int64_t first = p.g.begin(u), stop = p.g.end(u);
    for (int64_t k = 0; k < K; ++k) {
      if (p.fixed[k] || p.grad_ts[k] == nullptr) {
        continue;
      }
      int64_t rest = first;  // where the group loop starts
      if (nv == 1) {
        rest = p.stream ? normalised_grad_groups<T, kIsa, 1, true>(p, k, first, stop)
                        : normalised_grad_groups<T, kIsa, 1, false>(p, k, first, stop);
      } else if (nv == 2) {
        rest = p.stream ? normalised_grad_groups<T, kIsa, 2, true>(p, k, first, stop)
                        : normalised_grad_groups<T, kIsa, 2, false>(p, k, first, stop);
      } else if (nv == 4 && kIsa == CpuIsa::kAvx512) {  // 16 of the 32 registers; the other tiers have 16 in all
        rest = p.stream ? normalised_grad_groups<T, kIsa, 4, true>(p, k, first, stop)
                        : normalised_grad_groups<T, kIsa, 4, false>(p, k, first, stop);
      }
      const T* __restrict__ m = p.mean + k * G;
      const T* __restrict__ a = p.a + k * G;
      const T* __restrict__ b = p.b + k * G;
      const T* __restrict__ e = p.e + k * G;
      for (int64_t lo = rest; lo < stop; lo += G) {
        const int64_t len = std::min(G, stop - lo);
        const T* __restrict__ g = p.grad + lo;
        const T* __restrict__ t = p.ts[k] + lo;
        T* __restrict__ gt = p.grad_ts[k] + lo;
        for (int64_t j = 0; j < len; ++j) {
          gt[j] = a[j] * g[j] + b[j] * (t[j] - m[j]) + e[j];
        }
      }
    }
  }
  if (p.stream) {
    store_fence();
  }
}

FASTDARTS_CPU_ISA_COPIES(normalised_grad_units)

// ---- Entry points.

// The arguments both ops take, checked in the order of reference.check_bn_weighted_sum_arguments.
void check_arguments(const char* op, at::TensorList ts, const at::Tensor& w, const at::Tensor& mean,
                     const at::Tensor& invstd) {
  check_same_tensors(op, "ts", ts);
  check_images(op, "ts", ts[0]);
  const int64_t K = static_cast<int64_t>(ts.size());
  check_weights(op, "w", w, K, ts[0]);
  check_channel_rows(op, "mean", mean, K, ts[0]);
  check_channel_rows(op, "invstd", invstd, K, ts[0]);
  check_supported_dtype(op, ts[0]);
  TORCH_INTERNAL_ASSERT(ts[0].device().is_cpu());
}

std::vector<at::Tensor> channels_last_all(at::TensorList ts) {
  std::vector<at::Tensor> out;
  out.reserve(ts.size());
  for (const at::Tensor& t : ts) {
    out.push_back(channels_last(t));
  }
  return out;
}

template <typename T>
std::vector<const T*> data_pointers(const std::vector<at::Tensor>& tensors) {
  std::vector<const T*> pointers;
  pointers.reserve(tensors.size());
  for (const at::Tensor& t : tensors) {
    pointers.push_back(t.const_data_ptr<T>());
  }
  return pointers;
}

at::Tensor bn_weighted_sum_cpu(at::TensorList ts, const at::Tensor& w, const at::Tensor& mean,
                               const at::Tensor& invstd) {
  check_arguments("bn_weighted_sum", ts, w, mean, invstd);
  const int64_t K = static_cast<int64_t>(ts.size());
  const int64_t C = ts[0].size(1);
  Output out(ts[0]);
  if (ts[0].numel() == 0) {
    return out.result;
  }
  const std::vector<at::Tensor> inputs = channels_last_all(ts);
  const std::vector<double> wv = values_of(w);
  const std::vector<double> mv = values_of(mean);
  std::vector<double> coef = values_of(invstd);
  for (int64_t k = 0; k < K; ++k) {
    for (int64_t c = 0; c < C; ++c) {
      coef[k * C + c] *= wv[k];
    }
  }
  const Geometry g(C, ts[0].numel() / C, K + 1);
  AT_DISPATCH_FLOATING_TYPES(ts[0].scalar_type(), "bn_weighted_sum_cpu", [&] {
    const CpuIsa isa = cpu_isa();  // once per call, before the threads start
    const std::vector<scalar_t> mean_p = patterns<scalar_t>(mv, K, g);
    const std::vector<scalar_t> coef_p = patterns<scalar_t>(coef, K, g);
    const ForwardArgs<scalar_t> f{g, data_pointers<scalar_t>(inputs), mean_p.data(), coef_p.data(),
                                  out.work.data_ptr<scalar_t>()};
    const bool stream = streams<scalar_t>(g, isa, {f.out});
    parallel_for_balanced(0, g.num_units, g.grain, [&](int64_t begin, int64_t end) {
      if (stream) {
        FASTDARTS_CALL_FOR_CPU_ISA(isa, forward_units_streamed, scalar_t, f, begin, end);
      } else {
        FASTDARTS_CALL_FOR_CPU_ISA(isa, forward_units, scalar_t, f, begin, end);
      }
    });
  });
  return out.finish();
}

// The backward of both ops: per row k, its gradient written where written[k] (empty: no row), and the factors
// [K, 4, C] (a, b, mean, e) with grad_t_k = a g + b (t_k - mean) + e (b = e = 0 for fixed rows) when `factors`;
// grad_w when w_grad.
struct Gradients {
  std::vector<at::Tensor> grad_ts;  // one per written row, in row order
  at::Tensor factors;               // undefined unless asked for
  std::optional<at::Tensor> grad_w;
};

Gradients backward(const char* op, const at::Tensor& grad, at::TensorList ts, const at::Tensor& w,
                   const at::Tensor& mean, const at::Tensor& invstd, const c10::List<bool>& batch_statistics,
                   const std::vector<bool>& written, bool factors, bool w_grad) {
  check_arguments(op, ts, w, mean, invstd);
  check_like(op, "grad", grad, "ts[0]", ts[0]);
  const int64_t K = static_cast<int64_t>(ts.size());
  check_one_per_item(op, "batch_statistics", static_cast<int64_t>(batch_statistics.size()), K, "tensor");
  if (factors) {  // the factors op names every row
    check_one_per_item(op, "written", static_cast<int64_t>(written.size()), K, "tensor");
  }
  const int64_t C = ts[0].size(1);
  const int64_t pixels = ts[0].numel() / C;

  Gradients result;
  std::vector<std::optional<Output>> grad_outs(K);
  bool any_written = false;
  for (int64_t k = 0; k < K; ++k) {
    if (!written.empty() && written[k]) {
      grad_outs[k].emplace(ts[0]);
      any_written = true;
    }
  }
  if (w_grad) {
    result.grad_w = at::empty({K}, w.options());
  }
  if (factors) {
    result.factors = at::empty({K, 4, C}, ts[0].options().memory_format(at::MemoryFormat::Contiguous));
  }
  if (!any_written && !factors && !w_grad) {
    return result;
  }
  // The rows whose gradient reads the sums: every row for grad_w, the batch-statistics rows for their gradients
  // (written or as factors), which also read sum g (and need pass 2 when written).
  std::vector<bool> dot(K), fixed(K);
  bool sum_grad = false, normalised = false;
  for (int64_t k = 0; k < K; ++k) {
    const bool statistics = batch_statistics.get(k);
    const bool wanted = grad_outs[k].has_value() || factors;
    fixed[k] = !statistics;
    dot[k] = w_grad || (wanted && statistics);
    sum_grad = sum_grad || (wanted && statistics);
    normalised = normalised || (grad_outs[k].has_value() && statistics);
  }

  const std::vector<double> wv = values_of(w);
  const std::vector<double> mv = values_of(mean);
  const std::vector<double> sv = values_of(invstd);
  const Geometry g(C, pixels, K + 1);
  const at::Tensor grad_cl = channels_last(grad);
  const std::vector<at::Tensor> inputs = channels_last_all(ts);
  std::vector<double> sums(g.num_units * (K + 1) * C, 0.0);
  // a = w invstd for every row; b and e (batch-statistics rows) once pass 1 has the sums.
  std::vector<double> a(K * C), b(K * C, 0.0), e(K * C, 0.0);
  for (int64_t k = 0; k < K; ++k) {
    for (int64_t c = 0; c < C; ++c) {
      a[k * C + c] = wv[k] * sv[k * C + c];
    }
  }

  AT_DISPATCH_FLOATING_TYPES(ts[0].scalar_type(), "bn_weighted_sum_backward_cpu", [&] {
    const CpuIsa isa = cpu_isa();  // once per call, before the threads start
    const std::vector<scalar_t> mean_p = patterns<scalar_t>(mv, K, g);
    const std::vector<scalar_t> a_p = patterns<scalar_t>(a, K, g);
    BackwardArgs<scalar_t> p{g};
    p.grad = grad_cl.const_data_ptr<scalar_t>();
    p.ts = data_pointers<scalar_t>(inputs);
    p.dot = dot;
    p.sum_grad = sum_grad;
    p.sums = sums.data();
    p.fixed = fixed;
    p.mean = mean_p.data();
    p.a = a_p.data();
    for (std::optional<Output>& o : grad_outs) {
      p.grad_ts.push_back(o.has_value() ? o->work.data_ptr<scalar_t>() : nullptr);
    }
    parallel_for_balanced(0, g.num_units, g.grain, [&](int64_t begin, int64_t end) {
      std::vector<double> acc((K + 1) * g.group);
      FASTDARTS_CALL_FOR_CPU_ISA(isa, reduce_units, scalar_t, p, begin, end, acc.data());
    });
    // The units' sums, added in unit order whatever thread computed each.
    std::vector<double> total((K + 1) * C, 0.0);
    for (int64_t u = 0; u < g.num_units; ++u) {
      for (int64_t i = 0; i < (K + 1) * C; ++i) {
        total[i] += sums[u * (K + 1) * C + i];
      }
    }
    if (w_grad) {
      scalar_t* gw = result.grad_w->data_ptr<scalar_t>();
      for (int64_t k = 0; k < K; ++k) {
        double share = 0.0;
        for (int64_t c = 0; c < C; ++c) {
          share += sv[k * C + c] * total[k * C + c];
        }
        gw[k] = static_cast<scalar_t>(share);
      }
    }
    if (sum_grad && pixels > 0) {
      const double M = static_cast<double>(pixels);
      for (int64_t k = 0; k < K; ++k) {
        if (fixed[k]) {
          continue;
        }
        for (int64_t c = 0; c < C; ++c) {
          const double s = sv[k * C + c];
          b[k * C + c] = -a[k * C + c] * s * s * total[k * C + c] / M;
          e[k * C + c] = -a[k * C + c] * total[K * C + c] / M;
        }
      }
    }
    if (factors) {  // rounded as the patterns are, so that a g + b (t - mean) + e is what pass 2 computes
      scalar_t* f = result.factors.data_ptr<scalar_t>();
      for (int64_t k = 0; k < K; ++k) {
        for (int64_t c = 0; c < C; ++c) {
          f[(k * 4 + 0) * C + c] = static_cast<scalar_t>(a[k * C + c]);
          f[(k * 4 + 1) * C + c] = static_cast<scalar_t>(b[k * C + c]);
          f[(k * 4 + 2) * C + c] = static_cast<scalar_t>(mv[k * C + c]);
          f[(k * 4 + 3) * C + c] = static_cast<scalar_t>(e[k * C + c]);
        }
      }
    }
    if (normalised && pixels > 0) {
      const std::vector<scalar_t> b_p = patterns<scalar_t>(b, K, g);
      const std::vector<scalar_t> e_p = patterns<scalar_t>(e, K, g);
      p.b = b_p.data();
      p.e = e_p.data();
      std::vector<scalar_t*> written_ts;
      for (scalar_t* out : p.grad_ts) {
        if (out != nullptr) {
          written_ts.push_back(out);
        }
      }
      p.stream = streams<scalar_t>(g, isa, written_ts);
      parallel_for_balanced(0, g.num_units, g.grain, [&](int64_t begin, int64_t end) {
        FASTDARTS_CALL_FOR_CPU_ISA(isa, normalised_grad_units, scalar_t, p, begin, end);
      });
    }
  });
  for (std::optional<Output>& o : grad_outs) {
    if (o.has_value()) {
      result.grad_ts.push_back(o->finish());
    }
  }
  return result;
}

std::tuple<std::vector<at::Tensor>, std::optional<at::Tensor>> bn_weighted_sum_backward_cpu(
    const at::Tensor& grad, at::TensorList ts, const at::Tensor& w, const at::Tensor& mean, const at::Tensor& invstd,
    const c10::List<bool>& batch_statistics, bool input_grad, bool w_grad) {
  Gradients r = backward("bn_weighted_sum_backward", grad, ts, w, mean, invstd, batch_statistics,
                         std::vector<bool>(input_grad ? ts.size() : 0, true), false, w_grad);
  return {std::move(r.grad_ts), r.grad_w};
}

std::tuple<std::vector<at::Tensor>, at::Tensor, std::optional<at::Tensor>> bn_weighted_sum_backward_factors_cpu(
    const at::Tensor& grad, at::TensorList ts, const at::Tensor& w, const at::Tensor& mean, const at::Tensor& invstd,
    const c10::List<bool>& batch_statistics, const c10::List<bool>& written, bool w_grad) {
  std::vector<bool> rows;
  for (const bool row : written) {
    rows.push_back(row);
  }
  Gradients r = backward("bn_weighted_sum_backward_factors", grad, ts, w, mean, invstd, batch_statistics, rows, true,
                         w_grad);
  return {std::move(r.grad_ts), r.factors, r.grad_w};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdarts, CPU, m) {
  m.impl("bn_weighted_sum", &bn_weighted_sum_cpu);
  m.impl("bn_weighted_sum_backward", &bn_weighted_sum_backward_cpu);
  m.impl("bn_weighted_sum_backward_factors", &bn_weighted_sum_backward_factors_cpu);
}

}  // namespace fastdarts
