// CPU kernels of weighted_sum and weighted_sum_backward (schemas in ../fastdarts.cpp).
//
//   forward:  out = sum_k w[k] * xs[k]
//   backward: grad_xs[k] = w[k] * grad,  grad_w[k] = sum(grad * xs[k])
//
// Both walk the tensors as flat arrays: every tensor is first given the layout of the output
// (at::empty_like of xs[0], which keeps channels_last), so when the inputs already share one
// dense layout nothing is copied.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <vector>

#include "fastdarts/checks.h"
#include "fastdarts/cpu_common.h"
#include "fastdarts/cpu_isa.h"

namespace fastdarts {
namespace {

// Forward block: the unit of work handed to a thread (4 KiB of output in float32, a whole number of vectors).
constexpr int64_t kBlock = 1024;
// Backward chunk. The chunking does not depend on the thread count and the per-chunk dot products
// are combined in chunk order, so grad_w is identical bit for bit however the threads are scheduled.
// A chunk of grad (16 KiB in float32) stays in L1 while it is read once per k.
constexpr int64_t kChunk = 4096;
// at::internal::GRAIN_SIZE: below this many values read or written a second thread costs more than it saves. An
// element of the output touches K + 1 values (K + 1 + K in the backward).
constexpr int64_t kGrain = 32768;

// The grain in elements (or chunks of `per` elements) when each element touches `values` values.
int64_t grain(int64_t values, int64_t per = 1) {
  return std::max<int64_t>(1, kGrain / (values * per));
}

// `t` with exactly the strides of `like` (same sizes; `like` is fresh from at::empty_like, so dense
// and non-overlapping): `t` itself when the strides agree, else a copy.
at::Tensor with_layout_of(const at::Tensor& t, const at::Tensor& like) {
  if (t.strides() == like.strides()) {
    return t;
  }
  return at::empty_like(like).copy_(t);
}

template <typename scalar_t>
std::vector<const scalar_t*> data_pointers(const std::vector<at::Tensor>& tensors) {
  std::vector<const scalar_t*> pointers;
  pointers.reserve(tensors.size());
  for (const at::Tensor& t : tensors) {
    pointers.push_back(t.const_data_ptr<scalar_t>());
  }
  return pointers;
}

template <typename scalar_t>
std::vector<scalar_t> weight_values(const at::Tensor& w) {
  const at::Tensor contiguous = w.contiguous();
  const scalar_t* begin = contiguous.const_data_ptr<scalar_t>();
  return std::vector<scalar_t>(begin, begin + contiguous.numel());
}

template <typename T>
struct ForwardArgs {
  std::vector<const T*> xs;
  std::vector<T> w;
  T* out;
  int64_t n;
};

// out[i] for i in [lo, hi): w[0] xs[0][i], then + w[k] xs[k][i] for k = 1, 2, ... in turn (the same order, so the
// same bits, whether a value goes through the vector or the scalar loop).
template <typename T>
FASTDARTS_ALWAYS_INLINE void forward_values(const ForwardArgs<T>& f, int64_t lo, int64_t hi) {
  const int64_t K = static_cast<int64_t>(f.xs.size());
  for (int64_t i = lo; i < hi; ++i) {
    T acc = f.w[0] * f.xs[0][i];
    for (int64_t k = 1; k < K; ++k) {
      acc += f.w[k] * f.xs[k][i];
    }
    f.out[i] = acc;
  }
}

// The forward of blocks [begin, end) (of kBlock values): each run of kNV vectors summed over the K inputs in
// registers, then stored once. Plain stores, not non-temporal ones: the output is read right away (a node's sum by
// the edges leaving it, dL/dx by the op before), and from the cache that a non-temporal store would bypass; with
// streamed stores a sum and a pass reading it took no less time than with plain ones (benchmarks/RESULTS.md).
template <typename T, CpuIsa kIsa>
FASTDARTS_ALWAYS_INLINE void forward_blocks(const ForwardArgs<T>& f, int64_t begin, int64_t end) {
  using V = Vec<T, kIsa>;
  constexpr int64_t L = kLanes<T, kIsa>;
  constexpr int64_t kNV = 4;  // 4 independent sums: enough loads in flight to cover the latency
  const int64_t K = static_cast<int64_t>(f.xs.size());
  const int64_t lo = begin * kBlock, hi = std::min(end * kBlock, f.n);
  int64_t i = lo;
  for (; i + kNV * L <= hi; i += kNV * L) {
    V acc[kNV];
    V wv = V{} + f.w[0];
#pragma GCC unroll 4
    for (int64_t v = 0; v < kNV; ++v) {
      vec_load(acc[v], f.xs[0] + i + v * L);
      acc[v] = wv * acc[v];
    }
    for (int64_t k = 1; k < K; ++k) {
      wv = V{} + f.w[k];
      const T* x = f.xs[k] + i;
#pragma GCC unroll 4
      for (int64_t v = 0; v < kNV; ++v) {
        V xv;
        vec_load(xv, x + v * L);
        acc[v] += wv * xv;
      }
    }
#pragma GCC unroll 4
    for (int64_t v = 0; v < kNV; ++v) {
      vec_store(f.out + i + v * L, acc[v]);
    }
  }
  forward_values(f, i, hi);
}

FASTDARTS_CPU_ISA_COPIES(forward_blocks)

template <typename scalar_t>
void weighted_sum_kernel(const ForwardArgs<scalar_t>& f) {
  const CpuIsa isa = cpu_isa();  // once per call, before the threads start
  const int64_t K = static_cast<int64_t>(f.xs.size());
  parallel_for_balanced(0, (f.n + kBlock - 1) / kBlock, grain(K + 1, kBlock), [&](int64_t begin, int64_t end) {
    FASTDARTS_CALL_FOR_CPU_ISA(isa, forward_blocks, scalar_t, f, begin, end);
  });
}

template <typename scalar_t>
void weighted_sum_backward_kernel(const scalar_t* grad, const std::vector<const scalar_t*>& xs,
                                  const std::vector<scalar_t>& w, const std::vector<scalar_t*>& grad_xs,
                                  scalar_t* grad_w, int64_t n) {
  const int64_t K = static_cast<int64_t>(xs.size());
  const int64_t num_chunks = (n + kChunk - 1) / kChunk;
  std::vector<double> partial(num_chunks * K);  // partial[c * K + k]: chunk c's share of grad_w[k]
  parallel_for_balanced(0, num_chunks, grain(2 * K + 1, kChunk), [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const int64_t lo = c * kChunk;
      const int64_t len = std::min(kChunk, n - lo);
      const scalar_t* __restrict__ g = grad + lo;
      for (int64_t k = 0; k < K; ++k) {
        const scalar_t* __restrict__ x = xs[k] + lo;
        scalar_t* __restrict__ gx = grad_xs[k] + lo;
        const scalar_t wk = w[k];
        double dot = 0.0;
        // The reduction needs the pragma to vectorise (without -ffast-math the compiler keeps
        // the sequential order); the vector order is fixed at compile time, so still deterministic.
#pragma omp simd reduction(+ : dot)
        for (int64_t i = 0; i < len; ++i) {
          gx[i] = wk * g[i];
          dot += static_cast<double>(g[i]) * static_cast<double>(x[i]);
        }
        partial[c * K + k] = dot;
      }
    }
  });
  for (int64_t k = 0; k < K; ++k) {
    double total = 0.0;
    for (int64_t c = 0; c < num_chunks; ++c) {
      total += partial[c * K + k];
    }
    grad_w[k] = static_cast<scalar_t>(total);
  }
}

at::Tensor weighted_sum_cpu(at::TensorList xs, const at::Tensor& w) {
  check_same_tensors("weighted_sum", "xs", xs);
  check_supported_dtype("weighted_sum", xs[0]);
  check_weights("weighted_sum", "w", w, static_cast<int64_t>(xs.size()), xs[0]);
  TORCH_INTERNAL_ASSERT(xs[0].device().is_cpu());

  at::Tensor out = at::empty_like(xs[0]);
  std::vector<at::Tensor> inputs;
  inputs.reserve(xs.size());
  for (const at::Tensor& x : xs) {
    inputs.push_back(with_layout_of(x, out));
  }
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "weighted_sum_cpu", [&] {
    weighted_sum_kernel<scalar_t>({data_pointers<scalar_t>(inputs), weight_values<scalar_t>(w),
                                   out.data_ptr<scalar_t>(), out.numel()});
  });
  return out;
}

std::tuple<std::vector<at::Tensor>, at::Tensor> weighted_sum_backward_cpu(const at::Tensor& grad, at::TensorList xs,
                                                                          const at::Tensor& w) {
  check_same_tensors("weighted_sum_backward", "xs", xs);
  check_supported_dtype("weighted_sum_backward", xs[0]);
  check_like("weighted_sum_backward", "grad", grad, "xs[0]", xs[0]);
  check_weights("weighted_sum_backward", "w", w, static_cast<int64_t>(xs.size()), xs[0]);
  TORCH_INTERNAL_ASSERT(xs[0].device().is_cpu());

  std::vector<at::Tensor> grad_xs;
  std::vector<at::Tensor> inputs;
  grad_xs.reserve(xs.size());
  inputs.reserve(xs.size());
  for (const at::Tensor& x : xs) {
    grad_xs.push_back(at::empty_like(xs[0]));
    inputs.push_back(with_layout_of(x, grad_xs[0]));
  }
  const at::Tensor grad_in_layout = with_layout_of(grad, grad_xs[0]);
  at::Tensor grad_w = at::empty({static_cast<int64_t>(xs.size())}, w.options());
  AT_DISPATCH_FLOATING_TYPES(grad_w.scalar_type(), "weighted_sum_backward_cpu", [&] {
    std::vector<scalar_t*> grad_x_pointers;
    grad_x_pointers.reserve(grad_xs.size());
    for (at::Tensor& g : grad_xs) {
      grad_x_pointers.push_back(g.data_ptr<scalar_t>());
    }
    weighted_sum_backward_kernel<scalar_t>(grad_in_layout.const_data_ptr<scalar_t>(), data_pointers<scalar_t>(inputs),
                                           weight_values<scalar_t>(w), grad_x_pointers, grad_w.data_ptr<scalar_t>(),
                                           grad_in_layout.numel());
  });
  return {std::move(grad_xs), grad_w};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdarts, CPU, m) {
  m.impl("weighted_sum", &weighted_sum_cpu);
  m.impl("weighted_sum_backward", &weighted_sum_backward_cpu);
}

}  // namespace fastdarts
