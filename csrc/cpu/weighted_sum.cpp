// out = sum_k w[k] * xs[k] and its backward, on the CPU, for float and double.
//
// Memory-bound: the forward reads K inputs and writes one output; the backward reads grad and
// the K inputs once and writes K gradients, accumulating the K dot products on the way.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "fastdarts/checks.h"

namespace fastdarts {
namespace {

// Elements per tile: K passes over one tile of the output stay in L1/L2.
constexpr int64_t kTile = 4096;
// Fixed reduction chunks, independent of the thread count, so grad_w is bit-reproducible.
constexpr int64_t kReduceChunk = 16384;

// Tensors that share one dense layout (contiguous, channels_last, ...) can be walked as flat
// arrays in storage order; anything else is made contiguous first.
std::vector<at::Tensor> as_flat_walkable(std::vector<at::Tensor> ts) {
  bool shared = true;
  for (const auto& t : ts) {
    shared = shared && t.is_non_overlapping_and_dense() && t.strides() == ts[0].strides();
  }
  if (!shared) {
    for (auto& t : ts) t = t.contiguous();
  }
  return ts;
}

template <typename scalar_t>
std::vector<scalar_t> weights_of(const at::Tensor& w) {
  auto wc = w.contiguous();
  const scalar_t* p = wc.data_ptr<scalar_t>();
  return std::vector<scalar_t>(p, p + wc.numel());
}

template <typename scalar_t>
void weighted_sum_kernel(const std::vector<const scalar_t*>& xs, const std::vector<scalar_t>& w,
                         scalar_t* out, int64_t n) {
  const size_t K = xs.size();
  at::parallel_for(0, n, kTile, [&](int64_t begin, int64_t end) {
    for (int64_t t0 = begin; t0 < end; t0 += kTile) {
      const int64_t t1 = std::min(end, t0 + kTile);
      const scalar_t* x0 = xs[0];
      const scalar_t w0 = w[0];
      for (int64_t i = t0; i < t1; ++i) out[i] = w0 * x0[i];
      for (size_t k = 1; k < K; ++k) {
        const scalar_t* xk = xs[k];
        const scalar_t wk = w[k];
        for (int64_t i = t0; i < t1; ++i) out[i] += wk * xk[i];
      }
    }
  });
}

template <typename scalar_t>
void weighted_sum_backward_kernel(const scalar_t* grad, const std::vector<const scalar_t*>& xs,
                                  const std::vector<scalar_t>& w,
                                  const std::vector<scalar_t*>& grad_xs, double* grad_w,
                                  int64_t n) {
  const int64_t K = static_cast<int64_t>(xs.size());
  const int64_t chunks = (n + kReduceChunk - 1) / kReduceChunk;
  std::vector<double> partial(static_cast<size_t>(chunks * K), 0.0);
  at::parallel_for(0, chunks, 1, [&](int64_t c_begin, int64_t c_end) {
    for (int64_t c = c_begin; c < c_end; ++c) {
      const int64_t i0 = c * kReduceChunk;
      const int64_t i1 = std::min(n, i0 + kReduceChunk);
      for (int64_t k = 0; k < K; ++k) {
        const scalar_t* xk = xs[k];
        scalar_t* gk = grad_xs[k];
        const scalar_t wk = w[k];
        double acc = 0.0;
#pragma omp simd reduction(+ : acc)
        for (int64_t i = i0; i < i1; ++i) {
          gk[i] = wk * grad[i];
          acc += static_cast<double>(grad[i]) * static_cast<double>(xk[i]);
        }
        partial[c * K + k] = acc;
      }
    }
  });
  for (int64_t k = 0; k < K; ++k) grad_w[k] = 0.0;
  for (int64_t c = 0; c < chunks; ++c) {
    for (int64_t k = 0; k < K; ++k) grad_w[k] += partial[c * K + k];
  }
}

at::Tensor weighted_sum_cpu(at::TensorList xs_in, const at::Tensor& w) {
  check_same_tensors(xs_in, "xs");
  check_weights(w, static_cast<int64_t>(xs_in.size()), xs_in[0]);
  TORCH_CHECK(xs_in[0].device().is_cpu(), "weighted_sum_cpu needs CPU tensors");
  auto xs = as_flat_walkable(xs_in.vec());
  at::Tensor out = at::empty_like(xs[0]);
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "weighted_sum_cpu", [&] {
    std::vector<const scalar_t*> ptrs;
    for (const auto& x : xs) ptrs.push_back(x.const_data_ptr<scalar_t>());
    weighted_sum_kernel<scalar_t>(ptrs, weights_of<scalar_t>(w), out.mutable_data_ptr<scalar_t>(),
                                  out.numel());
  });
  return out;
}

std::tuple<std::vector<at::Tensor>, at::Tensor> weighted_sum_backward_cpu(
    const at::Tensor& grad_in, at::TensorList xs_in, const at::Tensor& w) {
  check_same_tensors(xs_in, "xs");
  check_weights(w, static_cast<int64_t>(xs_in.size()), xs_in[0]);
  check_same_as(grad_in, xs_in[0], "grad");
  TORCH_CHECK(grad_in.device().is_cpu(), "weighted_sum_backward_cpu needs CPU tensors");
  std::vector<at::Tensor> all = xs_in.vec();
  all.push_back(grad_in);
  all = as_flat_walkable(std::move(all));
  const at::Tensor grad = all.back();
  all.pop_back();
  std::vector<at::Tensor> grad_xs;
  for (const auto& x : all) grad_xs.push_back(at::empty_like(x));
  at::Tensor grad_w_acc = at::empty({static_cast<int64_t>(all.size())}, w.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES(grad.scalar_type(), "weighted_sum_backward_cpu", [&] {
    std::vector<const scalar_t*> x_ptrs;
    std::vector<scalar_t*> g_ptrs;
    for (const auto& x : all) x_ptrs.push_back(x.const_data_ptr<scalar_t>());
    for (auto& g : grad_xs) g_ptrs.push_back(g.mutable_data_ptr<scalar_t>());
    weighted_sum_backward_kernel<scalar_t>(grad.const_data_ptr<scalar_t>(), x_ptrs,
                                           weights_of<scalar_t>(w), g_ptrs,
                                           grad_w_acc.mutable_data_ptr<double>(), grad.numel());
  });
  return {grad_xs, grad_w_acc.to(w.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdarts, CPU, m) {
  m.impl("weighted_sum", &weighted_sum_cpu);
  m.impl("weighted_sum_backward", &weighted_sum_backward_cpu);
}

}  // namespace fastdarts
