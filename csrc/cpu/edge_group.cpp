// CPU implementation of edge_group and edge_group_backward (schemas in ../fastdarts.cpp): the DARTS edges leaving
// one state, driven from C++ over the other kernels of this library. The passes are those of
// fastdarts/ops/_mixed_op.py (_EdgeGroup, the same steps written once for every backend over its kernels), in the
// same order and with the same calls, so that both give the same results bit for bit; here no Python runs
// between the kernels: at the digits' sizes (8x8 images) that Python cost as much as the kernels themselves.
//
// Per edge: every candidate ends in a tensor its last BN normalises ("final"; x itself for the stride-1 skip, and
// the pools' outputs when they have no BN), and one bn_weighted_sum folds those BNs and the edge weights into the
// edge's output. The group runs what its edges share once: the first stage of every conv of every edge
// (relu_dwconv_pointwise on x), the FactorizedReduce of every stride-2 skip (factorized_reduce_bn_stats), both pools
// and their statistics (pool_bn_stats), and in the backward those kernels' backwards and the sum that makes dL/dx.

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/record_function.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <map>
#include <optional>
#include <tuple>
#include <vector>

#include "fastdarts/relu_dwconv.h"

namespace fastdarts {
namespace {

// The candidates, in MIXED_OP_CANDIDATES order.
enum Candidate : int64_t { kMaxPool = 0, kAvgPool, kSkip, kSep3, kSep5, kDil3, kDil5, kNumCandidates };

constexpr auto kChannelsLast = at::MemoryFormat::ChannelsLast;

bool is_pool(int64_t k) {
  return k == kMaxPool || k == kAvgPool;
}
bool is_conv(int64_t k) {
  return k >= kSep3;
}
bool is_sep(int64_t k) {
  return k == kSep3 || k == kSep5;
}
// The dilation of a conv candidate's first depthwise conv.
int64_t first_stage_dilation(int64_t k) {
  return k == kDil3 || k == kDil5 ? 2 : 1;
}

// reference.mixed_op_layout: per candidate, where its conv weights start in an edge's weights, and its first BN's
// row in the edge's statistics.
struct Layout {
  Layout(int64_t stride, bool pool_bn) {
    const std::array<int64_t, kNumCandidates> num_weights{0, 0, stride == 1 ? 0 : 2, 4, 4, 2, 2};
    const std::array<int64_t, kNumCandidates> num_bns{pool_bn, pool_bn, stride == 1 ? 0 : 1, 2, 2, 1, 1};
    for (int64_t k = 0; k < kNumCandidates; ++k) {
      weight_start[k] = weights_per_edge;
      row[k] = rows;
      weights_per_edge += num_weights[k];
      rows += num_bns[k];
    }
  }
  std::array<int64_t, kNumCandidates> weight_start{}, row{};
  int64_t weights_per_edge = 0, rows = 0;  // rows: B
};

// The other kernels, called through the dispatcher.
template <typename Signature>
c10::TypedOperatorHandle<Signature> handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

using Tensors = std::vector<at::Tensor>;
using OptionalTensor = std::optional<at::Tensor>;

// The outputs, and their BN statistics when `statistics` (else undefined): a recomputation, or a forward in
// evaluation, normalises with statistics it has, and the kernel then skips their epilogue.
std::tuple<Tensors, at::Tensor, at::Tensor> relu_dwconv_pointwise(bool statistics, const at::Tensor& x,
                                                                  at::TensorList weights, at::TensorList pointwise,
                                                                  at::IntArrayRef dilations, int64_t stride,
                                                                  const OptionalTensor& mean = std::nullopt,
                                                                  const OptionalTensor& invstd = std::nullopt) {
  if (!statistics) {
    RECORD_FUNCTION("fastdarts::relu_dwconv_pointwise", std::vector<c10::IValue>());  // as the op, for profiles
    return {relu_dwconv_pointwise_outputs(x, weights, pointwise, dilations, stride, true, mean, invstd), {}, {}};
  }
  static const auto op =
      handle<std::tuple<Tensors, at::Tensor, at::Tensor>(const at::Tensor&, at::TensorList, at::TensorList,
                                                         at::IntArrayRef, int64_t, bool, const OptionalTensor&,
                                                         const OptionalTensor&)>("fastdarts::relu_dwconv_pointwise");
  return op.call(x, weights, pointwise, dilations, stride, true, mean, invstd);
}

// grads as given, or with grad_inputs and grad_factors formed from them inside the kernel (a BN's backward).
std::tuple<OptionalTensor, Tensors, Tensors, OptionalTensor> relu_dwconv_pointwise_backward(
    at::TensorList grads, const at::Tensor& x, at::TensorList weights, at::TensorList pointwise,
    at::IntArrayRef dilations, int64_t stride, bool input_grad, bool weight_grad,
    const OptionalTensor& mean = std::nullopt, const OptionalTensor& invstd = std::nullopt,
    const std::optional<at::TensorList>& grad_inputs = std::nullopt,
    const OptionalTensor& grad_factors = std::nullopt) {
  static const auto op = handle<std::tuple<OptionalTensor, Tensors, Tensors, OptionalTensor>(
      at::TensorList, const at::Tensor&, at::TensorList, at::TensorList, at::IntArrayRef, int64_t, bool, bool, bool,
      const OptionalTensor&, const OptionalTensor&, const std::optional<at::TensorList>&, const OptionalTensor&)>(
      "fastdarts::relu_dwconv_pointwise_backward");
  return op.call(grads, x, weights, pointwise, dilations, stride, true, input_grad, weight_grad, mean, invstd,
                 grad_inputs, grad_factors);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> pool_bn_stats(const at::Tensor& x, int64_t stride) {
  static const auto op = handle<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, int64_t)>(
      "fastdarts::pool_bn_stats");
  return op.call(x, stride);
}

at::Tensor pool_bn_stats_backward(const OptionalTensor& grad_max, const OptionalTensor& grad_avg, const at::Tensor& x,
                                  int64_t stride) {
  static const auto op =
      handle<at::Tensor(const OptionalTensor&, const OptionalTensor&, const at::Tensor&, int64_t)>(
          "fastdarts::pool_bn_stats_backward");
  return op.call(grad_max, grad_avg, x, stride);
}

at::Tensor weighted_sum(at::TensorList xs, const at::Tensor& w) {
  static const auto op = handle<at::Tensor(at::TensorList, const at::Tensor&)>("fastdarts::weighted_sum");
  return op.call(xs, w);
}

at::Tensor bn_weighted_sum(at::TensorList ts, const at::Tensor& w, const at::Tensor& mean,
                           const at::Tensor& invstd) {
  static const auto op =
      handle<at::Tensor(at::TensorList, const at::Tensor&, const at::Tensor&, const at::Tensor&)>(
          "fastdarts::bn_weighted_sum");
  return op.call(ts, w, mean, invstd);
}

std::tuple<Tensors, OptionalTensor> bn_weighted_sum_backward(const at::Tensor& grad, at::TensorList ts,
                                                             const at::Tensor& w, const at::Tensor& mean,
                                                             const at::Tensor& invstd,
                                                             const c10::List<bool>& batch_statistics,
                                                             bool input_grad, bool w_grad) {
  static const auto op = handle<std::tuple<Tensors, OptionalTensor>(
      const at::Tensor&, at::TensorList, const at::Tensor&, const at::Tensor&, const at::Tensor&,
      const c10::List<bool>&, bool, bool)>("fastdarts::bn_weighted_sum_backward");
  return op.call(grad, ts, w, mean, invstd, batch_statistics, input_grad, w_grad);
}

std::tuple<Tensors, at::Tensor, OptionalTensor> bn_weighted_sum_backward_factors(
    const at::Tensor& grad, at::TensorList ts, const at::Tensor& w, const at::Tensor& mean, const at::Tensor& invstd,
    const c10::List<bool>& batch_statistics, const c10::List<bool>& written, bool w_grad) {
  static const auto op = handle<std::tuple<Tensors, at::Tensor, OptionalTensor>(
      const at::Tensor&, at::TensorList, const at::Tensor&, const at::Tensor&, const at::Tensor&,
      const c10::List<bool>&, const c10::List<bool>&, bool)>("fastdarts::bn_weighted_sum_backward_factors");
  return op.call(grad, ts, w, mean, invstd, batch_statistics, written, w_grad);
}

std::tuple<Tensors, at::Tensor, at::Tensor> factorized_reduce_bn_stats(const at::Tensor& x, at::TensorList conv_1s,
                                                                       at::TensorList conv_2s) {
  static const auto op = handle<std::tuple<Tensors, at::Tensor, at::Tensor>(at::TensorList, at::TensorList,
                                                                            at::TensorList, bool)>(
      "fastdarts::factorized_reduce_bn_stats");
  return op.call({x}, conv_1s, conv_2s, true);
}

// grads formed from grad_inputs and grad_factors inside the kernel (a BN's backward).
std::tuple<OptionalTensor, Tensors, Tensors> factorized_reduce_bn_stats_backward(
    at::TensorList grads, const at::Tensor& x, at::TensorList conv_1s, at::TensorList conv_2s, bool input_grad,
    bool weight_grad, at::TensorList grad_inputs, const at::Tensor& grad_factors) {
  static const auto op = handle<std::tuple<Tensors, Tensors, Tensors>(
      at::TensorList, at::TensorList, at::TensorList, at::TensorList, bool, bool, bool,
      const std::optional<at::TensorList>&, const OptionalTensor&)>("fastdarts::factorized_reduce_bn_stats_backward");
  auto [grad_xs, grad_1s, grad_2s] =
      op.call(grads, {x}, conv_1s, conv_2s, true, input_grad, weight_grad, grad_inputs, grad_factors);
  OptionalTensor grad_x;
  if (input_grad) {
    grad_x = grad_xs[0];
  }
  return {grad_x, grad_1s, grad_2s};
}

at::Tensor partial_channel_node(at::TensorList outs, at::TensorList xs, int64_t partial_channels,
                                const OptionalTensor& bypass_w) {
  static const auto op = handle<at::Tensor(at::TensorList, at::TensorList, int64_t, const OptionalTensor&)>(
      "fastdarts::partial_channel_node");
  return op.call(outs, xs, partial_channels, bypass_w);
}

std::tuple<Tensors, OptionalTensor, OptionalTensor> partial_channel_outputs_backward(
    const c10::List<OptionalTensor>& grads, const at::Tensor& x, int64_t partial_channels, int64_t stride,
    const OptionalTensor& bypass_w, bool x_grad, bool bypass_w_grad, const OptionalTensor& grad_x_base) {
  static const auto op = handle<std::tuple<Tensors, OptionalTensor, OptionalTensor>(
      const c10::List<OptionalTensor>&, const at::Tensor&, int64_t, int64_t, const OptionalTensor&, bool, bool,
      const OptionalTensor&)>("fastdarts::partial_channel_outputs_backward");
  return op.call(grads, x, partial_channels, stride, bypass_w, x_grad, bypass_w_grad, grad_x_base);
}

at::Tensor index_tensor(const std::vector<int64_t>& indices) {
  return at::tensor(indices, at::kLong);
}

// One edge: its candidates, conv weights and statistics rows ([B, C] views of the group's), and the tensors its
// backward reads.
struct Edge {
  int64_t index = 0;  // e: the edge's row of w
  std::vector<int64_t> candidates;
  std::vector<at::Tensor> weights;  // the edge's slice of the group's weights (Layout order)
  at::Tensor mean, var;             // [B, C]
  at::Tensor candidate_index;       // candidates as an index tensor
  std::map<int64_t, at::Tensor> t, t_1;  // per candidate: its final tensor; a sep conv's first stage output
  std::map<int64_t, std::pair<at::Tensor, at::Tensor>> middle;  // a sep conv's middle BN: [1, C] mean, invstd
  std::vector<at::Tensor> finals;                               // per candidate, the tensor its last BN reads
  std::vector<int64_t> final_rows;  // per candidate, its last BN's row; B for a tensor added as it is
  at::Tensor final_mean, final_invstd;  // [K, C]

  const at::Tensor& weight(const Layout& layout, int64_t k, int64_t i) const {
    return weights[layout.weight_start[k] + i];
  }
  // The edge's weights of its candidates, w[e, candidates].
  at::Tensor candidate_w(const at::Tensor& w) const {
    return w.select(0, index).index_select(0, candidate_index);
  }
};

// The edges leaving x, built (forward, or the backward's recomputation) or restored from what a forward kept.
struct Group {
  at::Tensor x, w;
  int64_t stride;
  double eps;
  bool pool_bn;
  Layout layout;
  std::vector<Edge> edges;
  at::Tensor mean, var;  // [E, B, C]
  std::vector<int64_t> pool_candidates;  // the pools some edge computes, ascending
  std::map<int64_t, at::Tensor> pools;   // their outputs

  // `record`: a forward in training, which records its batch statistics; otherwise mean and var are the statistics
  // to normalise with. `saved`: the forward's saved() (then nothing is computed).
  Group(const at::Tensor& x_in, const at::Tensor& w_in, at::TensorList weights, int64_t stride_in,
        at::IntArrayRef candidates, at::IntArrayRef counts, const OptionalTensor& bn_mean,
        const OptionalTensor& bn_var, bool record, double eps_in, bool pool_bn_in, at::TensorList saved)
      : x(x_in.contiguous(kChannelsLast)), w(w_in), stride(stride_in), eps(eps_in), pool_bn(pool_bn_in),
        layout(stride_in, pool_bn_in) {
    const int64_t E = w.size(0), C = x.size(1), B = layout.rows;
    if (record) {
      mean = at::zeros({E, B, C}, x.options());
      var = at::ones({E, B, C}, x.options());
    } else {
      mean = bn_mean->clone();
      var = bn_var->clone();
    }
    edges.resize(E);
    int64_t at_candidate = 0;
    for (int64_t e = 0; e < E; ++e) {
      Edge& edge = edges[e];
      edge.index = e;
      edge.candidates.assign(candidates.begin() + at_candidate, candidates.begin() + at_candidate + counts[e]);
      at_candidate += counts[e];
      edge.weights.assign(weights.begin() + e * layout.weights_per_edge,
                          weights.begin() + (e + 1) * layout.weights_per_edge);
      edge.mean = mean.select(0, e);
      edge.var = var.select(0, e);
      edge.candidate_index = index_tensor(edge.candidates);
      for (int64_t k : edge.candidates) {
        if (is_pool(k) && std::find(pool_candidates.begin(), pool_candidates.end(), k) == pool_candidates.end()) {
          pool_candidates.push_back(k);
        }
      }
    }
    std::sort(pool_candidates.begin(), pool_candidates.end());
    if (!saved.empty()) {
      restore(saved);
    } else {
      compute(record);
    }
    set_finals();
  }

  // Calls f(k, first_stage) for an edge's saved tensors, in order (_mixed_op._saved_names): per conv candidate (and
  // the stride-2 skip) its final tensor (first_stage false), and a sep conv's first stage output after it.
  template <typename F>
  void for_each_saved(const Edge& edge, F&& f) const {
    for (int64_t k : edge.candidates) {
      if ((k == kSkip && stride == 1) || is_pool(k)) {
        continue;
      }
      f(k, false);
      if (is_sep(k)) {
        f(k, true);
      }
    }
  }

  void restore(at::TensorList saved) {
    size_t wanted = pool_candidates.size();
    for (const Edge& edge : edges) {
      for_each_saved(edge, [&](int64_t, bool) { ++wanted; });
    }
    TORCH_CHECK_VALUE(wanted == saved.size(), "edge_group_backward: saved holds ", saved.size(),
                      " tensors, the group's edges keep ", wanted);
    size_t at_saved = 0;
    for (int64_t k : pool_candidates) {
      pools[k] = saved[at_saved++];
    }
    for (Edge& edge : edges) {
      for_each_saved(edge, [&](int64_t k, bool first_stage) {
        (first_stage ? edge.t_1 : edge.t)[k] = saved[at_saved++];
      });
    }
  }

  Tensors saved() const {
    Tensors out;
    for (int64_t k : pool_candidates) {
      out.push_back(pools.at(k));
    }
    for (const Edge& edge : edges) {
      for_each_saved(edge, [&](int64_t k, bool first_stage) {
        out.push_back((first_stage ? edge.t_1 : edge.t).at(k));
      });
    }
    return out;
  }

  // The middle BN's [1, C] mean and invstd of sep conv k (its first BN row, recorded by then).
  const std::pair<at::Tensor, at::Tensor>& middle(Edge& edge, int64_t k) {
    auto it = edge.middle.find(k);
    if (it == edge.middle.end()) {
      const int64_t row = layout.row[k];
      it = edge.middle.emplace(k, std::make_pair(edge.mean.narrow(0, row, 1),
                                                 (edge.var.narrow(0, row, 1) + eps).rsqrt())).first;
    }
    return it->second;
  }

  void compute(bool record) {
    // relu(x) into every conv's first stage, from one read of x.
    std::vector<std::pair<Edge*, int64_t>> convs;
    Tensors depthwise, pointwise;
    std::vector<int64_t> dilations;
    for (Edge& edge : edges) {
      for (int64_t k : edge.candidates) {
        if (is_conv(k)) {
          convs.emplace_back(&edge, k);
          depthwise.push_back(edge.weight(layout, k, 0));
          pointwise.push_back(edge.weight(layout, k, 1));
          dilations.push_back(first_stage_dilation(k));
        }
      }
    }
    Tensors first;
    at::Tensor first_mean, first_var;
    if (!convs.empty()) {
      std::tie(first, first_mean, first_var) =
          relu_dwconv_pointwise(record, x, depthwise, pointwise, dilations, stride);
    }
    // The stride-2 skips (FactorizedReduce) of every edge, from one read of x.
    std::map<const Edge*, size_t> reduce_of;
    Tensors conv_1s, conv_2s;
    for (const Edge& edge : edges) {
      if (stride != 1 && std::count(edge.candidates.begin(), edge.candidates.end(), kSkip) > 0) {
        reduce_of[&edge] = conv_1s.size();
        conv_1s.push_back(edge.weight(layout, kSkip, 0));
        conv_2s.push_back(edge.weight(layout, kSkip, 1));
      }
    }
    Tensors reduced;
    at::Tensor reduced_mean, reduced_var;
    if (!conv_1s.empty()) {
      std::tie(reduced, reduced_mean, reduced_var) = factorized_reduce_bn_stats(x, conv_1s, conv_2s);
    }
    // Both pools and their statistics, once for the group.
    at::Tensor pool_mean, pool_var;
    if (!pool_candidates.empty()) {
      at::Tensor max_out, avg_out;
      std::tie(max_out, avg_out, pool_mean, pool_var) = pool_bn_stats(x, stride);
      pools[kMaxPool] = max_out;
      pools[kAvgPool] = avg_out;
    }
    // Row `source` of the kernels' statistics [K, C] into row `row` of the edge's [B, C] (both contiguous, of x's
    // dtype): a copy of C values, where select and copy_ took six ATen calls a row.
    auto set_row = [&](Edge& edge, int64_t row, const at::Tensor& m, const at::Tensor& v, int64_t source) {
      const int64_t bytes = x.size(1) * x.element_size();
      for (auto [to, from] : {std::pair{&edge.mean, &m}, std::pair{&edge.var, &v}}) {
        const at::Tensor from_rows = from->contiguous();
        std::memcpy(static_cast<char*>(to->data_ptr()) + row * bytes,
                    static_cast<const char*>(from_rows.const_data_ptr()) + source * bytes, bytes);
      }
    };
    size_t i = 0;
    std::map<std::pair<Edge*, int64_t>, size_t> first_of;
    for (const auto& conv : convs) {
      first_of[conv] = i++;
    }
    for (Edge& edge : edges) {
      for (int64_t k : edge.candidates) {
        const int64_t row = layout.row[k];
        if (is_pool(k)) {
          if (pool_bn && record) {
            set_row(edge, row, pool_mean, pool_var, k);
          }
        } else if (k == kSkip) {
          if (stride != 1) {
            const size_t f = reduce_of.at(&edge);
            if (record) {
              set_row(edge, row, reduced_mean, reduced_var, f);
            }
            edge.t[k] = reduced[f];
          }
        } else {
          const size_t f = first_of.at({&edge, k});
          const at::Tensor& t1 = first[f];
          if (record) {
            set_row(edge, row, first_mean, first_var, f);
          }
          if (!is_sep(k)) {
            edge.t[k] = t1;
            continue;
          }
          // The second stage normalises t1 with the middle BN's statistics as it reads it.
          edge.t_1[k] = t1;
          const auto& [mid_mean, mid_invstd] = middle(edge, k);
          auto [t2, m2, v2] = relu_dwconv_pointwise(record, t1, {edge.weight(layout, k, 2)},
                                                    {edge.weight(layout, k, 3)}, {1}, 1, mid_mean, mid_invstd);
          if (record) {
            set_row(edge, row + 1, m2, v2, 0);
          }
          edge.t[k] = t2[0];
        }
      }
    }
  }

  // Every edge's final tensors and their last BNs' statistics, once every row is recorded: the rows of the
  // statistics, with row B (mean 0, invstd 1) for the tensors added as they are.
  void set_finals() {
    const int64_t E = mean.size(0), B = mean.size(1), C = mean.size(2);
    const at::Tensor all_mean = at::cat({mean, at::zeros({E, 1, C}, mean.options())}, 1);
    const at::Tensor all_invstd = at::cat({(var + eps).rsqrt(), at::ones({E, 1, C}, var.options())}, 1);
    for (int64_t e = 0; e < E; ++e) {
      Edge& edge = edges[e];
      for (int64_t k : edge.candidates) {
        if (k == kSkip && stride == 1) {
          edge.finals.push_back(x);
          edge.final_rows.push_back(B);
        } else if (is_pool(k)) {
          edge.finals.push_back(pools.at(k));
          edge.final_rows.push_back(pool_bn ? layout.row[k] : B);
        } else {
          edge.finals.push_back(edge.t.at(k).contiguous(kChannelsLast));
          edge.final_rows.push_back(is_sep(k) ? layout.row[k] + 1 : layout.row[k]);
        }
      }
      const at::Tensor rows = index_tensor(edge.final_rows);
      edge.final_mean = all_mean.select(0, e).index_select(0, rows);
      edge.final_invstd = all_invstd.select(0, e).index_select(0, rows);
    }
  }

  Tensors outs() const {
    Tensors out;
    for (const Edge& edge : edges) {
      if (edge.candidates.empty()) {
        std::vector<int64_t> shape{x.size(0), x.size(1), (x.size(2) - 1) / stride + 1, (x.size(3) - 1) / stride + 1};
        out.push_back(at::empty(shape, x.options().memory_format(kChannelsLast)).zero_());
        continue;
      }
      out.push_back(bn_weighted_sum(edge.finals, edge.candidate_w(w), edge.final_mean, edge.final_invstd));
    }
    return out;
  }


  // The factors [1, 4, C] (a, b, mean, e) of dL/dt_1 = a grad + b (t_1 - mean) + e for sep conv k's middle BN,
  // u = BN(t_1), given dL/du = grad's sums over (N, H, W) of grad and of grad u from the second stage's backward
  // (_mixed_op._Edge._middle_bn_factors): with batch statistics, dL/dt_1 = invstd (grad - mean(grad) - u mean(grad
  // u)), so a = invstd, b = -invstd^2 mean(grad u), e = -invstd mean(grad); with fixed ones, invstd grad. The first
  // stage's backward forms dL/dt_1 from them as it reads grad and t_1.
  at::Tensor middle_bn_factors(Edge& edge, int64_t k, const at::Tensor& grad, const OptionalTensor& sums,
                               bool training) {
    const auto& [m, invstd] = middle(edge, k);
    if (!training) {
      const at::Tensor zero = at::zeros_like(invstd);
      return at::stack({invstd, zero, m, zero}, 1);
    }
    const at::Tensor means = *sums / (grad.numel() / grad.size(1));  // [mean(grad), mean(grad u)]
    return at::stack({invstd, -invstd.square() * means.slice(0, 1), m, -invstd * means.slice(0, 0, 1)}, 1);
  }

  // (dL/dx or None, dL/dw [E, K] or None, dL/dweights in the flat order of the weights, or []): every edge's
  // candidates through one bn_weighted_sum_backward_factors, a sep conv's second stage (its dL/dt formed inside)
  // and middle BN's factors, then what the edges share once: the pools' backward, the first stage's backward (every
  // conv's dL/dt_1 formed inside) and the sum that makes dL/dx.
  std::tuple<OptionalTensor, OptionalTensor, Tensors> backward(const c10::List<OptionalTensor>& grads, bool training,
                                                               bool x_grad, bool w_grad, bool weights_grad) {
    const int64_t B = layout.rows;
    const bool need_dt = x_grad || weights_grad;
    OptionalTensor grad_w;
    if (w_grad) {
      grad_w = at::zeros(w.sizes(), w.options());
    }
    std::vector<OptionalTensor> grad_weights(weights_grad ? edges.size() * layout.weights_per_edge : 0);
    auto set_weight_grad = [&](const Edge& edge, int64_t k, int64_t i, const at::Tensor& g) {
      grad_weights[edge.index * layout.weights_per_edge + layout.weight_start[k] + i] = g;
    };
    Tensors terms, term_weights;               // of dL/dx: the terms and their weights ([1] each)
    const at::Tensor unit = at::ones({1}, w.options());
    std::map<int64_t, Tensors> pool_grads;     // per pool, what each edge's output of it receives
    // per conv: the gradient, input and factors that form its dL/dt_1, and its first stage's weights
    Tensors first_grads, first_inputs, first_factor_rows, first_depthwise, first_pointwise;
    std::vector<int64_t> first_dilations;
    std::vector<std::pair<const Edge*, int64_t>> first_convs;
    // per stride-2 skip: the gradient, input and factors that form its dL/dt, and its FactorizedReduce's weights
    Tensors reduce_grads, reduce_inputs, reduce_factor_rows, reduce_conv_1s, reduce_conv_2s;
    std::vector<const Edge*> reduce_edges;
    for (Edge& edge : edges) {
      const OptionalTensor grad = grads.get(edge.index);
      if (!grad.has_value() || edge.candidates.empty()) {  // None: the edge's output took no part in the loss
        continue;
      }
      c10::List<bool> batch_statistics, written;
      for (size_t i = 0; i < edge.final_rows.size(); ++i) {
        batch_statistics.push_back(training && edge.final_rows[i] != B);
        written.push_back(is_pool(edge.candidates[i]));
      }
      // Every candidate's dL/dw[k], and dL/dt (w[k] included) in one pass over grad and the finals, written out
      // for the pools only: the convs' and the stride-2 skip's backward kernels form theirs from the factors as they
      // read grad and t; the stride-1 skip's is w[k] g (a fixed row, invstd 1), which dL/dx's sum takes as g with
      // weight w[k].
      const at::Tensor g = grad->contiguous(kChannelsLast);
      Tensors dts;
      at::Tensor factors;
      if (need_dt) {
        OptionalTensor dw;
        std::tie(dts, factors, dw) = bn_weighted_sum_backward_factors(
            g, edge.finals, edge.candidate_w(w), edge.final_mean, edge.final_invstd, batch_statistics, written, w_grad);
        if (w_grad) {
          grad_w->select(0, edge.index).index_copy_(0, edge.candidate_index, *dw);
        }
      } else if (w_grad) {
        auto [unused, dw] = bn_weighted_sum_backward(g, edge.finals, edge.candidate_w(w), edge.final_mean,
                                                     edge.final_invstd, batch_statistics, false, true);
        grad_w->select(0, edge.index).index_copy_(0, edge.candidate_index, *dw);
      }
      if (!need_dt) {
        continue;
      }
      size_t next_written = 0;
      for (size_t i = 0; i < edge.candidates.size(); ++i) {
        const int64_t k = edge.candidates[i];
        if (k == kSkip && stride == 1) {
          if (x_grad) {
            terms.push_back(g);
            term_weights.push_back(edge.candidate_w(w).narrow(0, static_cast<int64_t>(i), 1));
          }
        } else if (is_pool(k)) {
          const at::Tensor& dt = dts[next_written++];
          if (x_grad) {
            pool_grads[k].push_back(dt);
          }
        } else if (k == kSkip) {  // FactorizedReduce (stride-2 edges only): one kernel for the whole group
          reduce_grads.push_back(g);
          reduce_inputs.push_back(edge.finals[i]);
          reduce_factor_rows.push_back(factors.narrow(0, static_cast<int64_t>(i), 1));
          reduce_conv_1s.push_back(edge.weight(layout, k, 0));
          reduce_conv_2s.push_back(edge.weight(layout, k, 1));
          reduce_edges.push_back(&edge);
        } else {  // the convolutions: back to the first stage, whose backward is one kernel for the whole group
          at::Tensor first_grad = g, first_input = edge.finals[i];
          at::Tensor first_factors = factors.narrow(0, static_cast<int64_t>(i), 1);
          if (is_sep(k)) {  // the second stage (dL/du of the middle BN's output u), then the middle BN
            const auto& [mid_mean, mid_invstd] = middle(edge, k);
            auto [du, second, second_pointwise, du_sums] = relu_dwconv_pointwise_backward(
                {g}, edge.t_1.at(k), {edge.weight(layout, k, 2)}, {edge.weight(layout, k, 3)}, {1}, 1, true,
                weights_grad, mid_mean, mid_invstd, at::TensorList(first_input), first_factors);
            if (weights_grad) {
              set_weight_grad(edge, k, 2, second[0]);
              set_weight_grad(edge, k, 3, second_pointwise[0]);
            }
            first_grad = *du;
            first_input = edge.t_1.at(k);
            first_factors = middle_bn_factors(edge, k, *du, du_sums, training);
          }
          first_grads.push_back(first_grad);
          first_inputs.push_back(first_input);
          first_factor_rows.push_back(first_factors);
          first_depthwise.push_back(edge.weight(layout, k, 0));
          first_pointwise.push_back(edge.weight(layout, k, 1));
          first_dilations.push_back(first_stage_dilation(k));
          first_convs.emplace_back(&edge, k);
        }
      }
    }
    if (!reduce_grads.empty()) {
      auto [dx, grad_1s, grad_2s] =
          factorized_reduce_bn_stats_backward(reduce_grads, x, reduce_conv_1s, reduce_conv_2s, x_grad, weights_grad,
                                              reduce_inputs, at::cat(reduce_factor_rows));
      for (size_t i = 0; i < grad_1s.size(); ++i) {
        set_weight_grad(*reduce_edges[i], kSkip, 0, grad_1s[i]);
        set_weight_grad(*reduce_edges[i], kSkip, 1, grad_2s[i]);
      }
      if (x_grad) {
        terms.push_back(*dx);
        term_weights.push_back(unit);
      }
    }
    if (!pool_grads.empty()) {  // both pools' gradients in one pass over x, which recomputes the argmax
      auto pool_grad = [&](int64_t k) -> OptionalTensor {
        const auto it = pool_grads.find(k);
        if (it == pool_grads.end()) {
          return std::nullopt;
        }
        const Tensors& g = it->second;  // the pools of every edge are the same tensor: their gradients add up
        return g.size() == 1 ? g[0] : weighted_sum(g, at::ones({static_cast<int64_t>(g.size())}, g[0].options()));
      };
      terms.push_back(pool_bn_stats_backward(pool_grad(kMaxPool), pool_grad(kAvgPool), x, stride));
      term_weights.push_back(unit);
    }
    if (!first_grads.empty()) {
      auto [dx, firsts, firsts_pointwise, sums] = relu_dwconv_pointwise_backward(
          first_grads, x, first_depthwise, first_pointwise, first_dilations, stride, x_grad, weights_grad,
          std::nullopt, std::nullopt, at::TensorList(first_inputs), at::cat(first_factor_rows));
      if (weights_grad) {
        for (size_t i = 0; i < first_convs.size(); ++i) {
          set_weight_grad(*first_convs[i].first, first_convs[i].second, 0, firsts[i]);
          set_weight_grad(*first_convs[i].first, first_convs[i].second, 1, firsts_pointwise[i]);
        }
      }
      if (x_grad) {
        terms.push_back(*dx);
        term_weights.push_back(unit);
      }
    }
    OptionalTensor grad_x;
    if (x_grad) {
      if (terms.empty()) {
        grad_x = at::zeros_like(x);
      } else {
        for (at::Tensor& t : terms) {
          t = t.contiguous(kChannelsLast);
        }
        // One term of weight 1 (a kernel's dL/dx, made for this sum alone) is the sum: no pass to copy it.
        grad_x = terms.size() == 1 && term_weights[0].is_same(unit) ? terms[0]
                                                                   : weighted_sum(terms, at::cat(term_weights).detach());
      }
    }
    Tensors all_weight_grads;
    for (size_t i = 0; i < grad_weights.size(); ++i) {
      const Edge& edge = edges[i / layout.weights_per_edge];
      const at::Tensor& weight = edge.weights[i % layout.weights_per_edge];
      all_weight_grads.push_back(grad_weights[i].has_value() ? *grad_weights[i] : at::zeros_like(weight));
    }
    return {grad_x, grad_w, std::move(all_weight_grads)};
  }
};

// [E, B, C] statistics of the group's edges (bn_mean, bn_var, or the forward's mean and var).
void check_statistics(const char* op, const char* name, const at::Tensor& t, const at::Tensor& x, const at::Tensor& w,
                      int64_t stride, bool pool_bn) {
  const std::vector<int64_t> shape{w.size(0), Layout(stride, pool_bn).rows, x.size(1)};
  TORCH_CHECK_VALUE(t.sizes() == at::IntArrayRef(shape), op, ": ", name, " must have shape ", at::IntArrayRef(shape),
                    " ([E, B, C]), got ", t.sizes());
}

// The structure of the group's arguments; the values (shapes, dtypes) the kernels check as they run.
void check_group(const char* op, const at::Tensor& x, const at::Tensor& w, at::TensorList weights, int64_t stride,
                 at::IntArrayRef candidates, at::IntArrayRef counts, bool pool_bn) {
  TORCH_CHECK_VALUE(x.dim() == 4, op, ": x must be [N, C, H, W], got ", x.sizes());
  TORCH_CHECK_VALUE(w.dim() == 2 && w.size(0) >= 1, op, ": w must be [E, K] with E >= 1, got ", w.sizes());
  TORCH_CHECK_VALUE(stride == 1 || stride == 2, op, ": stride must be 1 or 2, got ", stride);
  const int64_t E = w.size(0);
  const Layout layout(stride, pool_bn);
  int64_t total = 0;
  for (int64_t n : counts) {
    TORCH_CHECK_VALUE(n >= 0, op, ": candidate counts must be >= 0, got ", counts);
    total += n;
  }
  TORCH_CHECK_VALUE(static_cast<int64_t>(counts.size()) == E && total == static_cast<int64_t>(candidates.size()),
                    op, ": ", E, " edges need one candidate count each, got counts ", counts, " for ",
                    candidates.size(), " candidates");
  TORCH_CHECK_VALUE(static_cast<int64_t>(weights.size()) == E * layout.weights_per_edge, op, ": ", E,
                    " edges at stride ", stride, " take ", E * layout.weights_per_edge, " conv weights, got ",
                    weights.size());
  int64_t at = 0;
  for (int64_t e = 0; e < E; ++e) {
    for (int64_t i = at; i < at + counts[e]; ++i) {
      const int64_t k = candidates[i];
      TORCH_CHECK_VALUE(k >= 0 && k < kNumCandidates, op, ": candidates must be in [0, ", int64_t{kNumCandidates},
                        "), got ", k);
      TORCH_CHECK_VALUE(i == at || candidates[i - 1] < k, op, ": edge ", e,
                        "'s candidates must be increasing, got ", candidates.slice(at, counts[e]));
    }
    at += counts[e];
  }
}

std::tuple<Tensors, at::Tensor, at::Tensor, Tensors> edge_group_cpu(
    const at::Tensor& x, const at::Tensor& w, at::TensorList weights, int64_t stride, at::IntArrayRef candidates,
    at::IntArrayRef counts, const OptionalTensor& bn_mean, const OptionalTensor& bn_var, bool training, double eps,
    bool pool_bn, bool keep) {
  check_group("edge_group", x, w, weights, stride, candidates, counts, pool_bn);
  TORCH_CHECK_VALUE(training || (bn_mean.has_value() && bn_var.has_value()),
                    "edge_group: evaluation (training false) needs bn_mean and bn_var");
  if (!training) {
    check_statistics("edge_group", "bn_mean", *bn_mean, x, w, stride, pool_bn);
    check_statistics("edge_group", "bn_var", *bn_var, x, w, stride, pool_bn);
  }
  at::AutoDispatchBelowADInplaceOrView guard;  // the kernels below run as parts of this op, not on their own
  Group group(x, w, weights, stride, candidates, counts, bn_mean, bn_var, training, eps, pool_bn, {});
  Tensors outs = group.outs();
  return {std::move(outs), group.mean, group.var, keep ? group.saved() : Tensors{}};
}

std::tuple<OptionalTensor, OptionalTensor, Tensors> edge_group_backward_cpu(
    const c10::List<OptionalTensor>& grads, const at::Tensor& x, const at::Tensor& w, at::TensorList weights,
    int64_t stride, at::IntArrayRef candidates, at::IntArrayRef counts, const at::Tensor& mean,
    const at::Tensor& var, bool training, double eps, bool pool_bn, at::TensorList saved, bool x_grad, bool w_grad,
    bool weights_grad) {
  check_group("edge_group_backward", x, w, weights, stride, candidates, counts, pool_bn);
  TORCH_CHECK_VALUE(static_cast<int64_t>(grads.size()) == w.size(0), "edge_group_backward: ", w.size(0),
                    " edges need one output gradient (or None) each, got ", grads.size());
  check_statistics("edge_group_backward", "mean", mean, x, w, stride, pool_bn);
  check_statistics("edge_group_backward", "var", var, x, w, stride, pool_bn);
  at::AutoDispatchBelowADInplaceOrView guard;
  // Without saved tensors the group is recomputed in "evaluation" with the statistics the forward normalised
  // with, which reproduces the forward exactly; the backward still treats them as batch statistics in training.
  Group group(x, w, weights, stride, candidates, counts, mean, var, false, eps, pool_bn, saved);
  return group.backward(grads, training, x_grad, w_grad, weights_grad);
}

// ---------------------------------------------------------------------------------------------------------------
// edge_cell and edge_cell_backward: a DARTS cell's edges and nodes, group after group (fastdarts/ops/_mixed_op.py's
// edge_cell, the same calls in the same order).

// Edge `node <- state` in node-major order (reference.edge_index).
int64_t edge_index(int64_t node, int64_t state) {
  return node * (node + 3) / 2 + state;
}

// The edges leaving one state that compute something (reference.CellGroup).
struct CellGroup {
  int64_t state, stride, rows;
  std::vector<int64_t> nodes, edges;
};

// A cell's flat arguments cut into its groups (_mixed_op._CellPlan).
struct CellPlan {
  std::vector<CellGroup> groups;
  std::vector<int64_t> weight_start, weight_count, candidate_start;
  at::IntArrayRef candidates, counts;

  CellPlan(const char* op, int64_t steps, int64_t stride, size_t num_weights, at::IntArrayRef candidates_in,
           at::IntArrayRef counts_in, bool pool_bn)
      : candidates(candidates_in), counts(counts_in) {
    TORCH_CHECK_VALUE(stride == 1 || stride == 2, op, ": stride must be 1 or 2, got ", stride);
    const int64_t E = edge_index(steps, 0);
    int64_t total = 0, weights_at = 0;
    for (int64_t node = 0; node < steps; ++node) {
      for (int64_t state = 0; state < node + 2; ++state) {
        const int64_t per_edge = Layout(state < 2 ? stride : 1, pool_bn).weights_per_edge;
        weight_start.push_back(weights_at);
        weight_count.push_back(per_edge);
        weights_at += per_edge;
      }
    }
    for (int64_t n : counts) {
      TORCH_CHECK_VALUE(n >= 0, op, ": candidate counts must be >= 0, got ", counts);
      candidate_start.push_back(total);
      total += n;
    }
    TORCH_CHECK_VALUE(static_cast<int64_t>(counts.size()) == E && total == static_cast<int64_t>(candidates.size()),
                      op, ": ", E, " edges need one candidate count each, got counts ", counts, " for ",
                      candidates.size(), " candidates");
    TORCH_CHECK_VALUE(static_cast<int64_t>(num_weights) == weights_at, op, ": the cell's edges take ", weights_at,
                      " conv weights, got ", num_weights);
    for (int64_t state = 0; state <= steps; ++state) {  // the last node feeds no edge
      CellGroup group{state, state < 2 ? stride : 1, 0, {}, {}};
      for (int64_t node = std::max<int64_t>(0, state - 1); node < steps; ++node) {
        if (counts[edge_index(node, state)] > 0) {
          group.nodes.push_back(node);
          group.edges.push_back(edge_index(node, state));
        }
      }
      if (!group.edges.empty()) {
        group.rows = static_cast<int64_t>(group.edges.size()) * Layout(group.stride, pool_bn).rows;
        groups.push_back(std::move(group));
      }
    }
  }

  int64_t rows() const {
    int64_t total = 0;
    for (const CellGroup& group : groups) {
      total += group.rows;
    }
    return total;
  }

  // The group's rows of w, weights, candidates and counts, as edge_group takes them, and its edges' index.
  struct Arguments {
    at::Tensor edges, w;
    Tensors weights;
    std::vector<int64_t> candidates, counts;
  };
  Arguments arguments(const CellGroup& group, const at::Tensor& w, at::TensorList weights) const {
    Arguments a;
    a.edges = index_tensor(group.edges).to(w.device());
    a.w = w.index_select(0, a.edges);
    for (int64_t e : group.edges) {
      a.weights.insert(a.weights.end(), weights.begin() + weight_start[e],
                       weights.begin() + weight_start[e] + weight_count[e]);
      a.candidates.insert(a.candidates.end(), candidates.begin() + candidate_start[e],
                          candidates.begin() + candidate_start[e] + counts[e]);
      a.counts.push_back(counts[e]);
    }
    return a;
  }

  // The tensors a group's forward keeps (Group::saved): the pools some edge computes, then each edge's.
  int64_t saved_count(const CellGroup& group) const {
    std::vector<int64_t> pools;
    int64_t count = 0;
    for (int64_t e : group.edges) {
      for (int64_t i = candidate_start[e]; i < candidate_start[e] + counts[e]; ++i) {
        const int64_t k = candidates[i];
        if (is_pool(k)) {
          if (std::find(pools.begin(), pools.end(), k) == pools.end()) {
            pools.push_back(k);
          }
        } else if (k != kSkip || group.stride == 2) {
          count += is_sep(k) ? 2 : 1;
        }
      }
    }
    return count + static_cast<int64_t>(pools.size());
  }
};

// The rows of `t` ([E]) of a group's edges, or none.
OptionalTensor edge_rows(const OptionalTensor& t, const at::Tensor& edges) {
  if (!t.has_value()) {
    return std::nullopt;
  }
  return t->index_select(0, edges);
}

// What enters a node: its incoming edges' outputs, in edge order; with partial channels each edge's ops' output
// (C/K channels) with the state its bypass comes from (at stride 2 that bypass, pooled) and the edge's index (for
// bypass_w).
struct NodeTerms {
  Tensors outs, xs;
  std::vector<int64_t> edges;
};

// A node: its incoming edges' outputs summed in turn (three or more by one weighted_sum pass with unit weights, the
// same bits; with partial channels the edges' full-width outputs summed as they are formed, partial_channel_node);
// zeros when it has none.
at::Tensor node_sum(const NodeTerms& terms, const at::Tensor& s0, int64_t stride, int64_t partial_channels,
                    const OptionalTensor& bypass_w) {
  const Tensors& outs = terms.outs;
  if (outs.empty()) {
    return at::empty({s0.size(0), s0.size(1), (s0.size(2) - 1) / stride + 1, (s0.size(3) - 1) / stride + 1},
                     s0.options(), kChannelsLast)
        .zero_();
  }
  if (partial_channels > 1) {
    return partial_channel_node(outs, terms.xs, partial_channels,
                                edge_rows(bypass_w, index_tensor(terms.edges).to(s0.device())));
  }
  if (outs.size() == 1) {
    return outs[0];
  }
  if (outs.size() == 2) {
    return outs[0] + outs[1];
  }
  return weighted_sum(outs, at::ones({static_cast<int64_t>(outs.size())}, outs[0].options()));
}

// The channels a partial-channel cell's ops compute on: a state's first C/K (K = partial_channels).
at::Tensor processed(const at::Tensor& x, int64_t partial_channels) {
  return partial_channels == 1 ? x : x.narrow(1, 0, x.size(1) / partial_channels).contiguous(kChannelsLast);
}

void check_cell_inputs(const char* op, const at::Tensor& s0, const at::Tensor& s1, const at::Tensor& w,
                       int64_t steps, int64_t partial_channels) {
  TORCH_CHECK_VALUE(steps >= 1, op, ": steps must be >= 1, got ", steps);
  TORCH_CHECK_VALUE(partial_channels >= 1 && (s0.dim() < 2 || s0.size(1) % partial_channels == 0), op,
                    ": partial_channels must be >= 1 and divide the channels, got ", partial_channels, " for ",
                    s0.sizes());
  TORCH_CHECK_VALUE(s0.dim() == 4, op, ": s0 must be [N, C, H, W], got ", s0.sizes());
  TORCH_CHECK_VALUE(s1.sizes() == s0.sizes(), op, ": s0 and s1 must have the same shape, got ", s0.sizes(), " and ",
                    s1.sizes());
  TORCH_CHECK_VALUE(w.dim() == 2 && w.size(0) == edge_index(steps, 0), op, ": a cell of ", steps, " nodes has ",
                    edge_index(steps, 0), " edges: w must have shape [", edge_index(steps, 0), ", K], got ",
                    w.sizes());
}

void check_cell_statistics(const char* op, const char* name, const at::Tensor& t, int64_t rows, int64_t C) {
  TORCH_CHECK_VALUE(t.dim() == 2 && t.size(0) == rows && t.size(1) == C, op, ": ", name, " must have shape [", rows,
                    ", ", C, "] (the computed edges' statistics, group after group), got ", t.sizes());
}

std::tuple<Tensors, at::Tensor, at::Tensor, Tensors> edge_cell_cpu(
    const at::Tensor& s0_in, const at::Tensor& s1_in, const at::Tensor& w, at::TensorList weights, int64_t steps,
    int64_t stride, at::IntArrayRef candidates, at::IntArrayRef counts, const OptionalTensor& bn_mean,
    const OptionalTensor& bn_var, bool training, double eps, bool pool_bn, bool keep, int64_t partial_channels,
    const OptionalTensor& bypass_w) {
  const char* op = "edge_cell";
  check_cell_inputs(op, s0_in, s1_in, w, steps, partial_channels);
  const CellPlan plan(op, steps, stride, weights.size(), candidates, counts, pool_bn);
  const int64_t C = s0_in.size(1) / partial_channels;
  TORCH_CHECK_VALUE(training || (bn_mean.has_value() && bn_var.has_value()),
                    op, ": evaluation (training false) needs bn_mean and bn_var");
  if (!training) {
    check_cell_statistics(op, "bn_mean", *bn_mean, plan.rows(), C);
    check_cell_statistics(op, "bn_var", *bn_var, plan.rows(), C);
  }
  at::AutoDispatchBelowADInplaceOrView guard;
  Tensors states{s0_in.contiguous(kChannelsLast), s1_in.contiguous(kChannelsLast)};
  std::vector<NodeTerms> incoming(steps);
  Tensors means, variances, saved;
  int64_t at_row = 0;
  auto complete_nodes = [&](size_t count) {
    while (states.size() < count) {
      states.push_back(node_sum(incoming[states.size() - 2], states[0], stride, partial_channels, bypass_w));
    }
  };
  for (const CellGroup& group : plan.groups) {
    complete_nodes(group.state + 1);
    const int64_t E = static_cast<int64_t>(group.edges.size());
    OptionalTensor group_mean, group_var;
    if (!training) {
      group_mean = bn_mean->narrow(0, at_row, group.rows).view({E, -1, C});
      group_var = bn_var->narrow(0, at_row, group.rows).view({E, -1, C});
    }
    at_row += group.rows;
    const CellPlan::Arguments a = plan.arguments(group, w, weights);
    const at::Tensor x = processed(states[group.state], partial_channels);
    check_group(op, x, a.w, a.weights, group.stride, a.candidates, a.counts, pool_bn);
    Group g(x, a.w, a.weights, group.stride, a.candidates, a.counts, group_mean, group_var, training, eps, pool_bn,
            {});
    const Tensors outs = g.outs();
    means.push_back(g.mean.view({-1, C}));
    variances.push_back(g.var.view({-1, C}));
    if (keep) {
      Tensors kept = g.saved();
      saved.insert(saved.end(), kept.begin(), kept.end());
    }
    // With partial channels, what each edge's bypass is read from: the state, or at stride 2 the state pooled once
    // here for every node it feeds (reference.split_partial_channels's pool), all its channels: the node reads the
    // bypass's among them, and ATen's pool would first copy a slice of the channels into a tensor of its own
    at::Tensor bypass = states[group.state];
    if (partial_channels > 1 && group.stride == 2) {
      bypass = at::max_pool2d(bypass, {2, 2}, {2, 2}, {0, 0}, {1, 1}, true);
    }
    for (size_t i = 0; i < outs.size(); ++i) {
      NodeTerms& terms = incoming[group.nodes[i]];
      terms.outs.push_back(outs[i]);
      terms.xs.push_back(bypass);
      terms.edges.push_back(group.edges[i]);
    }
  }
  complete_nodes(steps + 2);
  Tensors nodes(states.begin() + 2, states.end());
  if (means.empty()) {
    return {std::move(nodes), at::zeros({0, C}, s0_in.options()), at::zeros({0, C}, s0_in.options()),
            std::move(saved)};
  }
  return {std::move(nodes), at::cat(means), at::cat(variances), std::move(saved)};
}

std::tuple<OptionalTensor, OptionalTensor, OptionalTensor, OptionalTensor, Tensors> edge_cell_backward_cpu(
    const c10::List<OptionalTensor>& grads, const at::Tensor& s0, const at::Tensor& s1, at::TensorList nodes,
    const at::Tensor& w, at::TensorList weights, int64_t steps, int64_t stride, at::IntArrayRef candidates,
    at::IntArrayRef counts, const at::Tensor& mean, const at::Tensor& var, bool training, double eps, bool pool_bn,
    at::TensorList saved, bool s0_grad, bool s1_grad, bool w_grad, bool weights_grad, int64_t partial_channels,
    const OptionalTensor& bypass_w, bool bypass_w_grad) {
  const char* op = "edge_cell_backward";
  check_cell_inputs(op, s0, s1, w, steps, partial_channels);
  TORCH_CHECK_VALUE(!bypass_w_grad || bypass_w.has_value(), op, ": bypass_w_grad needs bypass_w");
  const CellPlan plan(op, steps, stride, weights.size(), candidates, counts, pool_bn);
  const int64_t C = s0.size(1) / partial_channels;
  TORCH_CHECK_VALUE(static_cast<int64_t>(grads.size()) == steps && static_cast<int64_t>(nodes.size()) == steps, op,
                    ": a cell of ", steps, " nodes needs ", steps, " nodes and ", steps,
                    " node gradients (or None), got ", nodes.size(), " and ", grads.size());
  check_cell_statistics(op, "mean", mean, plan.rows(), C);
  check_cell_statistics(op, "var", var, plan.rows(), C);
  std::vector<int64_t> saved_start;
  if (!saved.empty()) {
    int64_t total = 0;
    for (const CellGroup& group : plan.groups) {
      saved_start.push_back(total);
      total += plan.saved_count(group);
    }
    TORCH_CHECK_VALUE(total == static_cast<int64_t>(saved.size()), op, ": saved holds ", saved.size(),
                      " tensors, the cell's groups keep ", total);
  }
  at::AutoDispatchBelowADInplaceOrView guard;
  Tensors states{s0.contiguous(kChannelsLast), s1.contiguous(kChannelsLast)};
  std::vector<OptionalTensor> grad_states(2);
  for (int64_t i = 0; i < steps; ++i) {
    states.push_back(nodes[i]);
    grad_states.push_back(grads.get(i));
  }
  OptionalTensor grad_w, grad_bypass_w;
  if (w_grad) {
    grad_w = at::zeros_like(w);
  }
  if (bypass_w_grad) {
    grad_bypass_w = at::zeros_like(*bypass_w);
  }
  std::vector<OptionalTensor> grad_weights(weights.size());
  int64_t rows_end = plan.rows();
  for (size_t g = plan.groups.size(); g-- > 0;) {
    const CellGroup& group = plan.groups[g];
    rows_end -= group.rows;
    c10::List<OptionalTensor> edge_grads;
    bool any = false;
    for (int64_t node : group.nodes) {
      edge_grads.push_back(grad_states[2 + node]);
      any = any || grad_states[2 + node].has_value();
    }
    if (!any) {
      continue;  // no edge of the group reaches the loss
    }
    const int64_t E = static_cast<int64_t>(group.edges.size());
    const CellPlan::Arguments a = plan.arguments(group, w, weights);
    const at::Tensor x = processed(states[group.state], partial_channels);
    check_group(op, x, a.w, a.weights, group.stride, a.candidates, a.counts, pool_bn);
    const bool x_grad = group.state >= 2 || (group.state == 0 ? s0_grad : s1_grad);
    OptionalTensor& previous = grad_states[group.state];  // the state's gradient from its other readers
    OptionalTensor grad_full;
    if (partial_channels > 1) {  // the ops' part of each gradient; the bypass's, straight into dL/dx (plus previous)
      auto [ops_grads, bypass_grad_x, group_grad_bypass_w] = partial_channel_outputs_backward(
          edge_grads, states[group.state], partial_channels, group.stride, edge_rows(bypass_w, a.edges), x_grad,
          bypass_w_grad, x_grad ? previous : std::nullopt);
      size_t next = 0;
      for (size_t i = 0; i < edge_grads.size(); ++i) {
        if (edge_grads.get(i).has_value()) {
          edge_grads.set(i, ops_grads[next++]);
        }
      }
      grad_full = bypass_grad_x;
      if (bypass_w_grad) {
        grad_bypass_w->index_copy_(0, a.edges, *group_grad_bypass_w);
      }
    }
    const at::TensorList group_saved =
        saved.empty() ? at::TensorList{} : saved.slice(saved_start[g], plan.saved_count(group));
    Group cell_group(x, a.w, a.weights, group.stride, a.candidates, a.counts,
                     mean.narrow(0, rows_end, group.rows).view({E, -1, C}),
                     var.narrow(0, rows_end, group.rows).view({E, -1, C}), false, eps, pool_bn, group_saved);
    auto [grad_x, group_grad_w, group_grad_weights] =
        cell_group.backward(edge_grads, training, x_grad, w_grad, weights_grad);
    if (x_grad && grad_full.has_value()) {  // the ops' gradient in their channels; previous is in grad_full
      at::Tensor ops_part = grad_full->narrow(1, 0, C);
      if (previous.has_value()) {
        ops_part.add_(*grad_x);
      } else {
        ops_part.copy_(*grad_x);
      }
      previous = grad_full;
    } else if (x_grad) {
      previous = previous.has_value() ? *previous + *grad_x : *grad_x;
    }
    if (w_grad) {
      grad_w->index_copy_(0, a.edges, *group_grad_w);
    }
    if (weights_grad) {
      size_t i = 0;
      for (int64_t e : group.edges) {
        for (int64_t j = plan.weight_start[e]; j < plan.weight_start[e] + plan.weight_count[e]; ++j) {
          grad_weights[j] = group_grad_weights[i++];
        }
      }
    }
  }
  Tensors all_weight_grads;
  if (weights_grad) {
    for (size_t i = 0; i < weights.size(); ++i) {
      all_weight_grads.push_back(grad_weights[i].has_value() ? *grad_weights[i] : at::zeros_like(weights[i]));
    }
  }
  auto input_grad = [&](int64_t state, bool asked) -> OptionalTensor {
    if (!asked) {
      return std::nullopt;
    }
    return grad_states[state].has_value() ? grad_states[state]
                                          : OptionalTensor(at::zeros_like(states[state], kChannelsLast));
  };
  return {input_grad(0, s0_grad), input_grad(1, s1_grad), grad_w, grad_bypass_w, std::move(all_weight_grads)};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastdarts, CPU, m) {
  m.impl("edge_group", &edge_group_cpu);
  m.impl("edge_group_backward", &edge_group_backward_cpu);
  m.impl("edge_cell", &edge_cell_cpu);
  m.impl("edge_cell_backward", &edge_cell_backward_cpu);
}

}  // namespace fastdarts
