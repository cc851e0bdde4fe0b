// CPU kernel of sample_gates (schema in ../fastdarts.cpp): the deterministic part of PR-DARTS's gate sampling
// (METHOD.md 2.1-2.2), fastdarts.ops.reference.gates_from_noise, given the noise that
// reference.draw_gate_noise drew from the caller's generator.
//
// Inputs: beta, u: [E, K] (E edges, K ops per edge; float32 or float64); tau > 0, a < 0, b > 1; k in 1..K or
// unset; with k set also explore: bool [E, K] and perm: int64 [K], a permutation of the op columns.
// For every gate (e, j):
//   s     = sigmoid((beta + log u - log1p(-u)) / tau)
//   s'    = s * (b - a) + a
//   g     = clamp(s', 0, 1)
//   p     = sigmoid(beta - tau * log(-a / b))                      P(g != 0)
// and for every edge e, with k set:
//   mask  = 1 on the k highest scores g - explore of the row, 0 elsewhere; among equal scores the column that
//           comes earlier in perm wins (the stable descending sort of the columns taken in perm order)
//   gates = mask * ((g - g) + 1)        exactly the mask, but NaN where g is NaN, like the reference's
//                                       straight-through mask * ((g - g.detach()) + 1)
// and with k unset: mask = 1, gates = g.
// Outputs, each [E, K] with beta's dtype, contiguous: gates, mask, p_nonzero = p, and
//   s_kept = s where the gate is kept (mask = 1) and not clamped (0 <= s' <= 1), else 0.
// s_kept carries every derivative the backward needs (fastdarts/ops/_cpp.py, in torch ops):
//   d gates / d beta = (b - a) / tau * s_kept (1 - s_kept)     (0 off the mask and where the clamp is active)
//   d s_kept / d beta = s_kept (1 - s_kept) / tau,   d p / d beta = p (1 - p)
// Since these are functions of the op's own outputs, the backward is differentiable again, to any order.
//
// The arithmetic follows the reference's operations one by one, in the same dtype and order (the float settings
// rounded to the dtype as PyTorch rounds a Python scalar), so outputs differ from the reference only where the
// math library's log, log1p and exp round differently from PyTorch's vectorised ones (an ulp or so). The build
// targets baseline x86-64, which has no FMA, so s * (b - a) + a is not contracted into one rounding either.
// Rows are independent, so the result does not depend on how at::parallel_for splits them.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <optional>
#include <tuple>
#include <vector>

#include "fastdarts/checks.h"

namespace fastdarts {
namespace {

// Gates per task (whole rows). A gate costs a log, a log1p and two exps, many times a memory-bound element, so a
// task is worth a thread at far fewer elements than weighted_sum's kGrain. PR-DARTS's 14 x 8 betas stay on one.
constexpr int64_t kGatesPerTask = 1024;

template <typename scalar_t>
struct GateConstants {
  scalar_t tau;    // the temperature
  scalar_t a;      // the lower end of the stretch
  scalar_t scale;  // b - a
  scalar_t shift;  // tau * log(-a / b), the offset of P(g != 0)
};

// torch.sort's descending order, which puts NaN first: x comes before y.
template <typename scalar_t>
inline bool sorts_before(scalar_t x, scalar_t y) {
  return x > y || (std::isnan(x) && !std::isnan(y));
}

template <typename scalar_t>
inline scalar_t sigmoid(scalar_t x) {
  // torch.sigmoid's formula; exp overflows to inf for very negative x, which gives exactly 0.
  return static_cast<scalar_t>(1) / (static_cast<scalar_t>(1) + std::exp(-x));
}

template <typename scalar_t>
void sample_gates_kernel(const scalar_t* beta, const scalar_t* u, const bool* explore, const int64_t* perm,
                         int64_t E, int64_t K, std::optional<int64_t> k, GateConstants<scalar_t> c, scalar_t* gates,
                         scalar_t* mask, scalar_t* p_nonzero, scalar_t* s_kept) {
  const scalar_t zero = 0;
  const scalar_t one = 1;
  const int64_t rows_per_task = std::max<int64_t>(1, kGatesPerTask / K);
  at::parallel_for(0, E, rows_per_task, [&](int64_t begin, int64_t end) {
    // Per row: g and s (0 where clamped) by column, and the scores and the ranking by position in perm.
    std::vector<scalar_t> g_row(K), s_row(K), scores(K);
    std::vector<int64_t> order(K);
    for (int64_t e = begin; e < end; ++e) {
      const int64_t row = e * K;
      for (int64_t j = 0; j < K; ++j) {
        const int64_t i = row + j;
        const scalar_t x = (beta[i] + std::log(u[i])) - std::log1p(-u[i]);
        const scalar_t s = sigmoid<scalar_t>(x / c.tau);
        const scalar_t stretched = s * c.scale + c.a;
        // clamp(s', 0, 1), NaN kept as NaN like torch.clamp. The clamp's gradient passes on the closed
        // interval [0, 1], as torch.clamp's backward does, so s counts as unclamped at the two ends too.
        const scalar_t g = stretched < zero ? zero : (stretched > one ? one : stretched);
        const bool unclamped = stretched >= zero && stretched <= one;
        p_nonzero[i] = sigmoid<scalar_t>(beta[i] - c.shift);
        if (k.has_value()) {
          g_row[j] = g;
          s_row[j] = unclamped ? s : zero;
        } else {
          gates[i] = g;
          mask[i] = one;
          s_kept[i] = unclamped ? s : zero;
        }
      }
      if (!k.has_value()) {
        continue;
      }
      // The top-k of g - explore (subtracted in the dtype: g - 1 can round, and then ties, as in the reference),
      // ranked as the reference's stable sort ranks them: by score, then by position in perm. That is a strict
      // total order, so nth_element picks exactly the reference's k columns.
      for (int64_t q = 0; q < K; ++q) {
        const int64_t j = perm[q];
        scores[q] = g_row[j] - static_cast<scalar_t>(explore[row + j] ? 1 : 0);
      }
      std::iota(order.begin(), order.end(), int64_t{0});
      if (*k < K) {
        std::nth_element(order.begin(), order.begin() + *k, order.end(), [&](int64_t q1, int64_t q2) {
          if (sorts_before(scores[q1], scores[q2])) {
            return true;
          }
          if (sorts_before(scores[q2], scores[q1])) {
            return false;
          }
          return q1 < q2;
        });
      }
      for (int64_t j = 0; j < K; ++j) {
        mask[row + j] = zero;
      }
      for (int64_t r = 0; r < *k; ++r) {
        mask[row + perm[order[r]]] = one;
      }
      for (int64_t j = 0; j < K; ++j) {
        const int64_t i = row + j;
        const scalar_t g = g_row[j];
        gates[i] = mask[i] * ((g - g) + one);
        s_kept[i] = mask[i] == one ? s_row[j] : zero;
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> sample_gates_cpu(
    const at::Tensor& beta, double tau, double a, double b, std::optional<int64_t> k, const at::Tensor& u,
    const std::optional<at::Tensor>& explore, const std::optional<at::Tensor>& perm) {
  // The reference's checks in its order (check_beta, check_gate_settings, check_gate_noise), then what only the
  // kernel needs: a dtype it is compiled for, and a perm it can index with.
  check_gate_logits("sample_gates", "beta", beta);
  check_supported_dtype("sample_gates", beta);
  check_gate_settings("sample_gates", tau, a, b, k, beta.size(1));
  check_gate_noise("sample_gates", beta, k.has_value(), u, explore, perm);
  TORCH_INTERNAL_ASSERT(beta.device().is_cpu());
  const int64_t E = beta.size(0);
  const int64_t K = beta.size(1);

  const at::Tensor beta_c = beta.contiguous();
  const at::Tensor u_c = u.contiguous();
  at::Tensor explore_c;
  at::Tensor perm_c;
  if (k.has_value()) {
    check_permutation("sample_gates", "perm", *perm);
    explore_c = explore->contiguous();
    perm_c = perm->contiguous();
  }
  at::Tensor gates = at::empty({E, K}, beta.options());
  at::Tensor mask = at::empty({E, K}, beta.options());
  at::Tensor p_nonzero = at::empty({E, K}, beta.options());
  at::Tensor s_kept = at::empty({E, K}, beta.options());
  AT_DISPATCH_FLOATING_TYPES(beta.scalar_type(), "sample_gates_cpu", [&] {
    // Each setting rounded to the dtype once, as PyTorch rounds the Python floats of the reference's tensor-scalar
    // operations; b - a and tau * log(-a / b) are formed in double first, as Python forms them.
    GateConstants<scalar_t> constants;
    constants.tau = static_cast<scalar_t>(tau);
    constants.a = static_cast<scalar_t>(a);
    constants.scale = static_cast<scalar_t>(b - a);
    constants.shift = static_cast<scalar_t>(tau * std::log(-a / b));
    sample_gates_kernel<scalar_t>(beta_c.const_data_ptr<scalar_t>(), u_c.const_data_ptr<scalar_t>(),
                                  k.has_value() ? explore_c.const_data_ptr<bool>() : nullptr,
                                  k.has_value() ? perm_c.const_data_ptr<int64_t>() : nullptr, E, K, k, constants,
                                  gates.data_ptr<scalar_t>(), mask.data_ptr<scalar_t>(), p_nonzero.data_ptr<scalar_t>(),
                                  s_kept.data_ptr<scalar_t>());
  });
  return {gates, mask, p_nonzero, s_kept};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdarts, CPU, m) {
  m.impl("sample_gates", &sample_gates_cpu);
}

}  // namespace fastdarts
