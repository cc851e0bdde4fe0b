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
// only the inputs (states, the pre-activations ch, p). The loops are plain scalar code (the activations go through
// libm), compiled once for the baseline tier and run as such on every tier. grad_p is summed per fixed block of
// rows in double, the blocks combined in order: identical bit for bit whatever the thread count.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <vector>

#include "fastdarts/checks.h"

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

template <typename T>
inline T sigmoid(T v) {
  return T(1) / (T(1) + std::exp(-v));
}

template <typename scalar_t>
void forward_kernel(const scalar_t* s, const scalar_t* ch, const scalar_t* p, scalar_t* x, int64_t n, int64_t B,
                    int64_t H) {
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      scalar_t* __restrict__ out = x + b * H;
      for (int64_t f = 0; f < H; ++f) {
        out[f] = scalar_t(0);
      }
      for (int64_t j = 0; j < n; ++j) {
        const scalar_t* __restrict__ sj = s + (j * B + b) * H;
        const scalar_t* __restrict__ c = ch + (j * B + b) * 2 * H;
        const scalar_t* __restrict__ h = c + H;
        const scalar_t p1 = p[j * kOps + 1], p2 = p[j * kOps + 2], p3 = p[j * kOps + 3], p4 = p[j * kOps + 4];
        const scalar_t total = p1 + p2 + p3 + p4;
        for (int64_t f = 0; f < H; ++f) {
          const scalar_t gate = sigmoid(c[f]);
          const scalar_t hv = h[f];
          const scalar_t g = p1 * std::tanh(hv) + p2 * (hv < 0 ? scalar_t(0) : hv) + p3 * sigmoid(hv) + p4 * hv;
          out[f] += total * (scalar_t(1) - gate) * sj[f] + gate * g;
        }
      }
    }
  });
}

template <typename scalar_t>
void backward_kernel(const scalar_t* dx, const scalar_t* s, const scalar_t* ch, const scalar_t* p, scalar_t* ds,
                     scalar_t* dch, scalar_t* dp, int64_t n, int64_t B, int64_t H) {
  const int64_t blocks = (B + kRowsPerBlock - 1) / kRowsPerBlock;
  std::vector<double> partial(blocks * n * (kOps - 1), 0.0);  // partial[(block * n + j) * 4 + k - 1]
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t blk = begin; blk < end; ++blk) {
      for (int64_t b = blk * kRowsPerBlock; b < std::min(B, (blk + 1) * kRowsPerBlock); ++b) {
        const scalar_t* __restrict__ d = dx + b * H;
        for (int64_t j = 0; j < n; ++j) {
          const int64_t row = (j * B + b) * H;
          const scalar_t* __restrict__ sj = s + row;
          const scalar_t* __restrict__ c = ch + 2 * row;
          const scalar_t* __restrict__ h = c + H;
          scalar_t* __restrict__ dsj = ds + row;
          scalar_t* __restrict__ dc = dch + 2 * row;
          scalar_t* __restrict__ dh = dc + H;
          const scalar_t p1 = p[j * kOps + 1], p2 = p[j * kOps + 2], p3 = p[j * kOps + 3], p4 = p[j * kOps + 4];
          const scalar_t total = p1 + p2 + p3 + p4;
          double sum_tanh = 0.0, sum_relu = 0.0, sum_sigmoid = 0.0, sum_identity = 0.0;
          for (int64_t f = 0; f < H; ++f) {
            const scalar_t gate = sigmoid(c[f]);
            const scalar_t hv = h[f];
            const scalar_t t = std::tanh(hv), r = hv < 0 ? scalar_t(0) : hv, q = sigmoid(hv);
            const scalar_t g = p1 * t + p2 * r + p3 * q + p4 * hv;
            const scalar_t keep = d[f] * (scalar_t(1) - gate) * sj[f];  // the residual term of every op
            const scalar_t dg = d[f] * gate;
            dsj[f] = d[f] * total * (scalar_t(1) - gate);
            dc[f] = d[f] * (g - total * sj[f]) * gate * (scalar_t(1) - gate);
            dh[f] = dg * (p1 * (scalar_t(1) - t * t) + (hv > 0 ? p2 : scalar_t(0)) + p3 * q * (scalar_t(1) - q) + p4);
            sum_tanh += static_cast<double>(keep + dg * t);
            sum_relu += static_cast<double>(keep + dg * r);
            sum_sigmoid += static_cast<double>(keep + dg * q);
            sum_identity += static_cast<double>(keep + dg * hv);
          }
          double* acc = partial.data() + (blk * n + j) * (kOps - 1);
          acc[0] += sum_tanh;
          acc[1] += sum_relu;
          acc[2] += sum_sigmoid;
          acc[3] += sum_identity;
        }
      }
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
