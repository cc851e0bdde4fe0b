// CPU kernels of rnn_mixed_node and rnn_mixed_node_backward (schemas in ../fastdarts.cpp): DARTS's recurrent mixed
// op for one node, after the node's one matmul. For predecessor j (of n), element (b, f):
//
//   sigma = sigmoid(c_j), g_j = p1 tanh(h_j) + p2 relu(h_j) + p3 sigmoid(h_j) + p4 h_j, P_j = p1 + p2 + p3 + p4
//   x = sum_j P_j (1 - sigma) s_j + sigma g_j                              (column 0 of p, none, adds nothing)
//
//   grad_s_j = dx P_j (1 - sigma)
//   grad_c_j = dx (g_j - P_j s_j) sigma (1 - sigma)
//   grad_h_j = dx sigma (p1 (1 - tanh^2) + p2 [h > 0] + p3 q (1 - q) + p4),   q = sigmoid(h_j)
//   grad_p_jk = sum_{b,f} dx ((1 - sigma) s_j + sigma f_k(h_j)) for k >= 1, grad_p_j0 = 0
//
// No per-op tensor is ever written: the activations are recomputed from c and h in the backward, so autograd keeps
// only the inputs (states, the pre-activations ch, p). The loops over a row are plain loops with the activations
// written out in float (exp_fast), which vectorise; they are compiled once per instruction-set tier
// (include/fastdarts/cpu_isa.h). grad_p is summed per fixed block of rows in double, the blocks combined in order:
// identical bit for bit whatever the thread count.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <tuple>
#include <vector>

#include "fastdarts/checks.h"
#include "fastdarts/cpu_isa.h"

namespace fastdarts {
namespace {

constexpr int64_t kOps = 5;         // none, tanh, relu, sigmoid, identity
constexpr int64_t kRowsPerBlock = 8;  // rows of the batch per block of the grad_p sums

void check_rnn_mixed_node(const char* op, const at::Tensor& states, const at::Tensor& ch, const at::Tensor& p) {
  TORCH_CHECK_VALUE(states.dim() == 3 && states.size(0) >= 1, op,
                    ": states must have shape [n, B, H] with n >= 1, got ", states.sizes());
  check_supported_dtype(op, states);
  const int64_t n = states.size(0), B = states.size(1), H = states.size(2);
  TORCH_CHECK_VALUE(ch.dim() == 3 && ch.size(0) == n && ch.size(1) == B && ch.size(2) == 2 * H, op,
                    ": ch must have shape [", n, ", ", B, ", ", 2 * H, "] (c and h of each state), got ", ch.sizes());
  check_dtype_and_device(op, ArgName{"ch"}, ch, "states", states);
  TORCH_CHECK_VALUE(p.dim() == 2 && p.size(0) == n && p.size(1) == kOps, op, ": p must have shape [", n, ", ",
                    kOps, "] (none, tanh, relu, sigmoid, identity per state), got ", p.sizes());
  check_dtype_and_device(op, ArgName{"p"}, p, "states", states);
}

// exp(x) in float without libm, so that the loops below vectorise: Cephes's expf (x = n ln 2 + r, a degree-6
// polynomial for e^r, 2^n put in the exponent bits), within 2 ulp of std::exp on [-87.3, 88.7]; x is clamped there
// (exp of the lower end is the smallest normal float). Double keeps std::exp, for gradcheck.
FASTDARTS_ALWAYS_INLINE float exp_fast(float x) {
  x = x < -87.33654f ? -87.33654f : (x > 88.72283f ? 88.72283f : x);
  const float t = x * 1.44269504088896341f;
  const float nf = (t + 12582912.0f) - 12582912.0f;  // round to nearest, branch-free: 1.5 * 2^23 shifts the fraction out
  const int32_t n = static_cast<int32_t>(nf);
  const float r = (x - nf * 0.693359375f) + nf * 2.12194440e-4f;
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * r * r + r + 1.0f;
  // 2^n in two steps, 2^(n/2) twice: n reaches 128 at the upper end, one past the largest exponent.
  const int32_t half = n >> 1;
  const int32_t low_bits = (half + 127) << 23, high_bits = (n - half + 127) << 23;
  float low, high;
  std::memcpy(&low, &low_bits, sizeof(float));
  std::memcpy(&high, &high_bits, sizeof(float));
  return y * low * high;
}

template <typename T>
FASTDARTS_ALWAYS_INLINE T sigmoid_of(T v) {
  if constexpr (std::is_same_v<T, float>) {
    return 1.0f / (1.0f + exp_fast(-v));
  } else {
    return T(1) / (T(1) + std::exp(-v));
  }
}

template <typename T>
FASTDARTS_ALWAYS_INLINE T tanh_of(T v) {
  if constexpr (std::is_same_v<T, float>) {
    return 2.0f * sigmoid_of(2.0f * v) - 1.0f;  // absolute error ~1e-7 near 0, where tanh(v) ~ v
  } else {
    return std::tanh(v);
  }
}

// Rows [begin, end) of the batch: x[b] = sum_j (the formula at the top), one pass over each row per state.
template <typename T, CpuIsa kIsa>
FASTDARTS_ALWAYS_INLINE void forward_rows(const T* s, const T* ch, const T* p, T* x, int64_t n, int64_t B, int64_t H,
                                          int64_t begin, int64_t end) {
  for (int64_t b = begin; b < end; ++b) {
    T* __restrict__ out = x + b * H;
    for (int64_t f = 0; f < H; ++f) {
      out[f] = T(0);
    }
    for (int64_t j = 0; j < n; ++j) {
      const T* __restrict__ sj = s + (j * B + b) * H;
      const T* __restrict__ c = ch + (j * B + b) * 2 * H;
      const T* __restrict__ h = c + H;
      const T p1 = p[j * kOps + 1], p2 = p[j * kOps + 2], p3 = p[j * kOps + 3], p4 = p[j * kOps + 4];
      const T total = p1 + p2 + p3 + p4;
#pragma omp simd
      for (int64_t f = 0; f < H; ++f) {
        const T gate = sigmoid_of(c[f]);
        const T hv = h[f];
        const T g = p1 * tanh_of(hv) + p2 * (hv < T(0) ? T(0) : hv) + p3 * sigmoid_of(hv) + p4 * hv;
        out[f] += total * (T(1) - gate) * sj[f] + gate * g;
      }
    }
  }
}
FASTDARTS_CPU_ISA_COPIES(forward_rows)

// Rows [begin, end) of the batch (one block): the three gradients, and the block's sums of grad_p in `acc`
// (n x 4: tanh, relu, sigmoid, identity).
template <typename T, CpuIsa kIsa>
FASTDARTS_ALWAYS_INLINE void backward_rows(const T* dx, const T* s, const T* ch, const T* p, T* ds, T* dch, int64_t n,
                                           int64_t B, int64_t H, int64_t begin, int64_t end, double* acc) {
  for (int64_t b = begin; b < end; ++b) {
    const T* __restrict__ d = dx + b * H;
    for (int64_t j = 0; j < n; ++j) {
      const int64_t at = (j * B + b) * H;
      const T* __restrict__ sj = s + at;
      const T* __restrict__ c = ch + 2 * at;
      const T* __restrict__ h = c + H;
      T* __restrict__ dsj = ds + at;
      T* __restrict__ dc = dch + 2 * at;
      T* __restrict__ dh = dc + H;
      const T p1 = p[j * kOps + 1], p2 = p[j * kOps + 2], p3 = p[j * kOps + 3], p4 = p[j * kOps + 4];
      const T total = p1 + p2 + p3 + p4;
      double sum_tanh = 0.0, sum_relu = 0.0, sum_sigmoid = 0.0, sum_identity = 0.0;
#pragma omp simd reduction(+ : sum_tanh, sum_relu, sum_sigmoid, sum_identity)
      for (int64_t f = 0; f < H; ++f) {
        const T gate = sigmoid_of(c[f]);
        const T hv = h[f];
        const T t = tanh_of(hv), r = hv < T(0) ? T(0) : hv, q = sigmoid_of(hv);
        const T g = p1 * t + p2 * r + p3 * q + p4 * hv;
        const T keep = d[f] * (T(1) - gate) * sj[f];  // the residual term of every op
        const T dg = d[f] * gate;
        dsj[f] = d[f] * total * (T(1) - gate);
        dc[f] = d[f] * (g - total * sj[f]) * gate * (T(1) - gate);
        dh[f] = dg * (p1 * (T(1) - t * t) + (hv > T(0) ? p2 : T(0)) + p3 * q * (T(1) - q) + p4);
        sum_tanh += static_cast<double>(keep + dg * t);
        sum_relu += static_cast<double>(keep + dg * r);
        sum_sigmoid += static_cast<double>(keep + dg * q);
        sum_identity += static_cast<double>(keep + dg * hv);
      }
      double* a = acc + j * (kOps - 1);
      a[0] += sum_tanh;
      a[1] += sum_relu;
      a[2] += sum_sigmoid;
      a[3] += sum_identity;
    }
  }
}
FASTDARTS_CPU_ISA_COPIES(backward_rows)

template <typename scalar_t>
void forward_kernel(const scalar_t* s, const scalar_t* ch, const scalar_t* p, scalar_t* x, int64_t n, int64_t B,
                    int64_t H) {
  const CpuIsa isa = cpu_isa();
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    FASTDARTS_CALL_FOR_CPU_ISA(isa, forward_rows, scalar_t, s, ch, p, x, n, B, H, begin, end);
  });
}

template <typename scalar_t>
void backward_kernel(const scalar_t* dx, const scalar_t* s, const scalar_t* ch, const scalar_t* p, scalar_t* ds,
                     scalar_t* dch, scalar_t* dp, int64_t n, int64_t B, int64_t H) {
  const CpuIsa isa = cpu_isa();
  const int64_t blocks = (B + kRowsPerBlock - 1) / kRowsPerBlock;
  std::vector<double> partial(blocks * n * (kOps - 1), 0.0);  // partial[(block * n + j) * 4 + k - 1]
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t blk = begin; blk < end; ++blk) {
      FASTDARTS_CALL_FOR_CPU_ISA(isa, backward_rows, scalar_t, dx, s, ch, p, ds, dch, n, B, H, blk * kRowsPerBlock,
                                 std::min(B, (blk + 1) * kRowsPerBlock), partial.data() + blk * n * (kOps - 1));
    }
  });
  for (int64_t j = 0; j < n; ++j) {
    dp[j * kOps] = scalar_t(0);
    for (int64_t k = 1; k < kOps; ++k) {
      double total = 0.0;
      for (int64_t blk = 0; blk < blocks; ++blk) {
        total += partial[(blk * n + j) * (kOps - 1) + k - 1];
      }
      dp[j * kOps + k] = static_cast<scalar_t>(total);
    }
  }
}

at::Tensor rnn_mixed_node_cpu(const at::Tensor& states, const at::Tensor& ch, const at::Tensor& p) {
  check_rnn_mixed_node("rnn_mixed_node", states, ch, p);
  TORCH_INTERNAL_ASSERT(states.device().is_cpu());
  const at::Tensor s = states.contiguous(), c = ch.contiguous(), w = p.contiguous();
  const int64_t n = s.size(0), B = s.size(1), H = s.size(2);
  at::Tensor x = at::empty({B, H}, s.options());
  AT_DISPATCH_FLOATING_TYPES(s.scalar_type(), "rnn_mixed_node_cpu", [&] {
    forward_kernel<scalar_t>(s.const_data_ptr<scalar_t>(), c.const_data_ptr<scalar_t>(), w.const_data_ptr<scalar_t>(),
                             x.data_ptr<scalar_t>(), n, B, H);
  });
  return x;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> rnn_mixed_node_backward_cpu(const at::Tensor& grad,
                                                                           const at::Tensor& states,
                                                                           const at::Tensor& ch, const at::Tensor& p) {
  check_rnn_mixed_node("rnn_mixed_node_backward", states, ch, p);
  TORCH_CHECK_VALUE(grad.dim() == 2 && grad.size(0) == states.size(1) && grad.size(1) == states.size(2),
                    "rnn_mixed_node_backward: grad must have shape [", states.size(1), ", ", states.size(2),
                    "], got ", grad.sizes());
  check_dtype_and_device("rnn_mixed_node_backward", ArgName{"grad"}, grad, "states", states);
  TORCH_INTERNAL_ASSERT(states.device().is_cpu());
  const at::Tensor d = grad.contiguous(), s = states.contiguous(), c = ch.contiguous(), w = p.contiguous();
  const int64_t n = s.size(0), B = s.size(1), H = s.size(2);
  at::Tensor ds = at::empty_like(s, at::MemoryFormat::Contiguous);
  at::Tensor dch = at::empty_like(c, at::MemoryFormat::Contiguous);
  at::Tensor dp = at::empty_like(w, at::MemoryFormat::Contiguous);
  AT_DISPATCH_FLOATING_TYPES(s.scalar_type(), "rnn_mixed_node_backward_cpu", [&] {
    backward_kernel<scalar_t>(d.const_data_ptr<scalar_t>(), s.const_data_ptr<scalar_t>(), c.const_data_ptr<scalar_t>(),
                              w.const_data_ptr<scalar_t>(), ds.data_ptr<scalar_t>(), dch.data_ptr<scalar_t>(),
                              dp.data_ptr<scalar_t>(), n, B, H);
  });
  return {ds, dch, dp};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdarts, CPU, m) {
  m.impl("rnn_mixed_node", &rnn_mixed_node_cpu);
  m.impl("rnn_mixed_node_backward", &rnn_mixed_node_backward_cpu);
}

}  // namespace fastdarts
