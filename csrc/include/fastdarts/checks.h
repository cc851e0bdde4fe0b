#pragma once

// Argument checks shared by every kernel (CPU now, CUDA later), so each rule and its message is
// written once. They mirror the checks of fastdarts/ops/reference.py: shape, length and device
// problems raise ValueError in Python, dtype problems TypeError. Message arguments are only
// formatted when a check fails, so the checks cost nothing on the success path.

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <optional>
#include <ostream>
#include <string>
#include <vector>

namespace fastdarts {

// An argument's name in a message, "weights" or "weights[2]"; like every message argument it is only
// formatted when a check fails.
struct ArgName {
  ArgName(const char* name, int64_t index = -1) : name(name), index(index) {}  // NOLINT: implicit from a name
  const char* name;
  int64_t index;
};

inline std::ostream& operator<<(std::ostream& out, const ArgName& arg) {
  out << arg.name;
  if (arg.index >= 0) {
    out << "[" << arg.index << "]";
  }
  return out;
}

// The kernels compute in float32 or float64; float64 is there so that gradcheck can run.
inline void check_supported_dtype(const char* op, const at::Tensor& t) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, op,
                   ": only float32 and float64 are supported, got ", t.scalar_type());
}

// `t` has the dtype and device of `like`.
inline void check_dtype_and_device(const char* op, const ArgName& name, const at::Tensor& t, const char* like_name,
                                   const at::Tensor& like) {
  TORCH_CHECK_TYPE(t.scalar_type() == like.scalar_type(), op, ": ", name, " must have the dtype of ", like_name,
                   " (", like.scalar_type(), "), got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.device() == like.device(), op, ": ", name, " must be on the device of ", like_name, " (",
                    like.device(), "), got ", t.device());
}

// `t` has the shape, dtype and device of `like`.
inline void check_like(const char* op, const char* name, const at::Tensor& t, const char* like_name,
                       const at::Tensor& like) {
  TORCH_CHECK_VALUE(t.sizes() == like.sizes(), op, ": ", name, " must have the shape of ", like_name, " ",
                    like.sizes(), ", got ", t.sizes());
  check_dtype_and_device(op, name, t, like_name, like);
}

// A non-empty list whose tensors all share the shape, dtype and device of the first.
inline void check_same_tensors(const char* op, const char* name, at::TensorList tensors) {
  TORCH_CHECK_VALUE(!tensors.empty(), op, ": ", name, " must be a non-empty list of tensors");
  const at::Tensor& first = tensors[0];
  for (size_t k = 1; k < tensors.size(); ++k) {
    const at::Tensor& t = tensors[k];
    TORCH_CHECK_VALUE(t.sizes() == first.sizes(), op, ": ", name, "[", k, "] must have the shape of ", name, "[0] ",
                      first.sizes(), ", got ", t.sizes());
    TORCH_CHECK_TYPE(t.scalar_type() == first.scalar_type(), op, ": ", name, "[", k, "] must have the dtype of ",
                     name, "[0] (", first.scalar_type(), "), got ", t.scalar_type());
    TORCH_CHECK_VALUE(t.device() == first.device(), op, ": ", name, "[", k, "] must be on the device of ", name,
                      "[0] (", first.device(), "), got ", t.device());
  }
}

// One weight per tensor of a K-long list: shape [K], with the dtype and device of `like`.
inline void check_weights(const char* op, const char* name, const at::Tensor& w, int64_t K, const at::Tensor& like) {
  TORCH_CHECK_VALUE(w.dim() == 1 && w.size(0) == K, op, ": ", name, " must have shape [K] with K = ", K,
                    " (one weight per tensor), got shape ", w.sizes());
  TORCH_CHECK_TYPE(w.scalar_type() == like.scalar_type(), op, ": ", name, " must have the dtype of the tensors (",
                   like.scalar_type(), "), got ", w.scalar_type());
  TORCH_CHECK_VALUE(w.device() == like.device(), op, ": ", name, " must be on the device of the tensors (",
                    like.device(), "), got ", w.device());
}

// Per-channel values (a BN's mean, say) for each of K batches of images like `like`: shape [K, C], with the dtype
// and device of `like`.
inline void check_channel_rows(const char* op, const char* name, const at::Tensor& t, int64_t K,
                               const at::Tensor& like) {
  const int64_t C = like.size(1);
  TORCH_CHECK_VALUE(t.dim() == 2 && t.size(0) == K && t.size(1) == C, op, ": ", name, " must have shape [K, C] = [",
                    K, ", ", C, "] (one row per tensor), got shape ", t.sizes());
  check_dtype_and_device(op, name, t, "the tensors", like);
}

// A batch of images: a 4-D [N, C, H, W] tensor with C, H and W at least 1 (N may be 0).
inline void check_images(const char* op, const ArgName& name, const at::Tensor& x) {
  TORCH_CHECK_VALUE(x.dim() == 4 && x.size(1) >= 1 && x.size(2) >= 1 && x.size(3) >= 1, op, ": ", name,
                    " must be a 4-D [N, C, H, W] tensor with C, H, W >= 1, got shape ", x.sizes());
}

// A non-empty list of depthwise kernels for the C channels of `like`: each [C, 1, k, k] with k odd (so that
// "same" padding d*(k-1)/2 exists), with the dtype and device of `like`.
inline void check_depthwise_weights(const char* op, const char* name, at::TensorList weights, const char* like_name,
                                    const at::Tensor& like) {
  TORCH_CHECK_VALUE(!weights.empty(), op, ": ", name, " must be a non-empty list of tensors");
  const int64_t C = like.size(1);
  for (size_t i = 0; i < weights.size(); ++i) {
    const at::Tensor& w = weights[i];
    const bool ok = w.dim() == 4 && w.size(0) == C && w.size(1) == 1 && w.size(2) == w.size(3) && w.size(2) % 2 == 1;
    const ArgName item(name, static_cast<int64_t>(i));
    TORCH_CHECK_VALUE(ok, op, ": ", item, " must have shape [C, 1, k, k] with C = ", C, " and k odd, got shape ",
                      w.sizes());
    check_dtype_and_device(op, item, w, like_name, like);
  }
}

// A list argument with one entry per item of a K-long list (a flag per tensor, say).
inline void check_one_per_item(const char* op, const char* name, int64_t count, int64_t K, const char* per) {
  TORCH_CHECK_VALUE(count == K, op, ": ", name, " must have one entry per ", per, " (K = ", K, "), got ", count);
}

// One positive integer per item of a K-long list (a dilation per kernel, say).
inline void check_positive_per_item(const char* op, const char* name, at::IntArrayRef values, int64_t K,
                                    const char* per) {
  check_one_per_item(op, name, static_cast<int64_t>(values.size()), K, per);
  for (const int64_t v : values) {
    TORCH_CHECK_VALUE(v >= 1, op, ": ", name, " must be positive, got ", values);
  }
}

inline void check_positive(const char* op, const char* name, int64_t value) {
  TORCH_CHECK_VALUE(value >= 1, op, ": ", name, " must be positive, got ", value);
}

// A list of K tensors, each of shape `sizes` with the dtype and device of `like`.
inline void check_sized_list(const char* op, const char* name, at::TensorList tensors, int64_t K, const char* per,
                             at::IntArrayRef sizes, const char* like_name, const at::Tensor& like) {
  TORCH_CHECK_VALUE(static_cast<int64_t>(tensors.size()) == K, op, ": ", name, " must have one tensor per ", per,
                    " (K = ", K, "), got ", tensors.size());
  for (size_t i = 0; i < tensors.size(); ++i) {
    const ArgName item(name, static_cast<int64_t>(i));
    TORCH_CHECK_VALUE(tensors[i].sizes() == sizes, op, ": ", item, " must have shape ", sizes, ", got ",
                      tensors[i].sizes());
    check_dtype_and_device(op, item, tensors[i], like_name, like);
  }
}

// A backward's formed output gradients (relu_dwconv_pointwise_backward, relu_pointwise_bn_stats_backward): with
// grad_inputs, one per output gradient of shape `sizes`, grad_factors [K, 4, C_out] (a, b, mean and e per channel).
// Returns whether they are given.
inline bool check_formed_grads(const char* op, const std::optional<at::TensorList>& grad_inputs,
                               const std::optional<at::Tensor>& grad_factors, int64_t K, const char* per,
                               at::IntArrayRef sizes, const char* like_name, const at::Tensor& like) {
  TORCH_CHECK_VALUE(grad_inputs.has_value() == grad_factors.has_value(), op,
                    ": grad_inputs and grad_factors must be given together, got only ",
                    grad_inputs.has_value() ? "grad_inputs" : "grad_factors");
  if (!grad_inputs.has_value()) {
    return false;
  }
  check_sized_list(op, "grad_inputs", *grad_inputs, K, per, sizes, like_name, like);
  const int64_t C = sizes[1];
  TORCH_CHECK_VALUE(grad_factors->dim() == 3 && grad_factors->size(0) == K && grad_factors->size(1) == 4 &&
                        grad_factors->size(2) == C,
                    op, ": grad_factors must have shape [", K, ", 4, ", C, "] (a, b, mean and e per channel of each ",
                    "of the ", K, " grads), got ", grad_factors->sizes());
  check_dtype_and_device(op, "grad_factors", *grad_factors, like_name, like);
  return true;
}

// A double written the way Python's repr() writes it (0.0, 0.25, 1e-05, inf), so that a message about a float
// argument reads exactly like the reference's f"{value!r}".
struct PyFloat {
  explicit PyFloat(double value) : value(value) {}
  double value;
};

inline std::ostream& operator<<(std::ostream& out, const PyFloat& f) {
  const double v = f.value;
  if (std::isnan(v)) {
    return out << "nan";
  }
  if (std::isinf(v)) {
    return out << (v < 0 ? "-inf" : "inf");
  }
  // The shortest digits that read back as v (what repr() prints), as [-]d[.ddd]e<exponent>.
  char buffer[64];
  const auto written = std::to_chars(buffer, buffer + sizeof(buffer), v, std::chars_format::scientific);
  const std::string text(buffer, written.ptr);
  const size_t e = text.find('e');
  std::string mantissa = text.substr(0, e);
  const int exponent = std::atoi(text.c_str() + e + 1);
  std::string sign;
  if (mantissa[0] == '-') {
    sign = "-";
    mantissa.erase(0, 1);
  }
  std::string digits = mantissa;
  digits.erase(std::remove(digits.begin(), digits.end(), '.'), digits.end());
  // repr() is positional for 1e-4 <= |v| < 1e16 (with ".0" on whole numbers), scientific with an at least two-digit
  // exponent otherwise.
  if (exponent >= 0 && exponent < 16) {
    const size_t whole = static_cast<size_t>(exponent) + 1;
    if (digits.size() <= whole) {
      return out << sign << digits << std::string(whole - digits.size(), '0') << ".0";
    }
    return out << sign << digits.substr(0, whole) << "." << digits.substr(whole);
  }
  if (exponent < 0 && exponent >= -4) {
    return out << sign << "0." << std::string(static_cast<size_t>(-exponent - 1), '0') << digits;
  }
  char exponent_text[16];
  std::snprintf(exponent_text, sizeof(exponent_text), "e%c%02d", exponent < 0 ? '-' : '+', std::abs(exponent));
  return out << sign << mantissa << exponent_text;
}

// PR-DARTS gate logits: a floating-point [num_edges, num_ops] matrix with num_ops >= 1 (num_edges may be 0).
inline void check_gate_logits(const char* op, const char* name, const at::Tensor& beta) {
  TORCH_CHECK_VALUE(beta.dim() == 2 && beta.size(1) > 0, op, ": ", name,
                    " must have shape [num_edges, num_ops] with num_ops >= 1, got shape ", beta.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(beta.scalar_type()), op, ": ", name, " must be floating point, got ",
                   beta.scalar_type());
}

// The scalar settings of a hard-concrete gate sample over num_ops ops per edge: a finite tau > 0, a finite a < 0 and
// b > 1 (the stretched sigmoid overshoots both ends, so g has point masses at 0 and 1), and k unset (every op kept)
// or in 1..num_ops.
inline void check_gate_settings(const char* op, double tau, double a, double b, std::optional<int64_t> k,
                                int64_t num_ops) {
  TORCH_CHECK_VALUE(std::isfinite(tau) && tau > 0, op, ": tau must be a finite number > 0, got ", PyFloat(tau));
  TORCH_CHECK_VALUE(std::isfinite(a) && a < 0, op, ": a must be a finite number < 0, got ", PyFloat(a));
  TORCH_CHECK_VALUE(std::isfinite(b) && b > 1, op, ": b must be a finite number > 1, got ", PyFloat(b));
  TORCH_CHECK_VALUE(!k.has_value() || (*k >= 1 && *k <= num_ops), op, ": k must be None or an integer in 1..",
                    num_ops, " (the ops per edge), got ", k.value_or(0));
}

// The random inputs of a gate sample for the logits `beta` [E, K]: u of the shape, dtype and device of beta and,
// with top-k, explore (bool [E, K]) and perm (int64 [K]) on beta's device. explore and perm are not looked at
// without top-k. Whether perm really is a permutation needs its values: check_permutation.
inline void check_gate_noise(const char* op, const at::Tensor& beta, bool top_k, const at::Tensor& u,
                             const std::optional<at::Tensor>& explore, const std::optional<at::Tensor>& perm) {
  check_like(op, "u", u, "beta", beta);
  if (!top_k) {
    return;
  }
  TORCH_CHECK_VALUE(explore.has_value() && perm.has_value(), op, ": top-k needs explore and perm");
  TORCH_CHECK_VALUE(explore->sizes() == beta.sizes() && explore->scalar_type() == at::kBool, op,
                    ": explore must be a bool tensor of the shape of beta ", beta.sizes(), ", got ",
                    explore->scalar_type(), " of shape ", explore->sizes());
  TORCH_CHECK_VALUE(perm->dim() == 1 && perm->size(0) == beta.size(1) && perm->scalar_type() == at::kLong, op,
                    ": perm must be an int64 permutation of the ", beta.size(1), " op columns, got ",
                    perm->scalar_type(), " of shape ", perm->sizes());
  TORCH_CHECK_VALUE(explore->device() == beta.device(), op, ": explore must be on the device of beta (",
                    beta.device(), "), got ", explore->device());
  TORCH_CHECK_VALUE(perm->device() == beta.device(), op, ": perm must be on the device of beta (", beta.device(),
                    "), got ", perm->device());
}

// An int64 CPU tensor of K values holding each of 0..K-1 exactly once (it is used to index columns).
inline void check_permutation(const char* op, const char* name, const at::Tensor& perm) {
  const at::Tensor values = perm.contiguous();
  const int64_t K = values.numel();
  const int64_t* v = values.const_data_ptr<int64_t>();
  std::vector<bool> seen(static_cast<size_t>(K), false);
  bool ok = true;
  for (int64_t i = 0; i < K && ok; ++i) {
    ok = v[i] >= 0 && v[i] < K && !seen[static_cast<size_t>(v[i])];
    if (ok) {
      seen[static_cast<size_t>(v[i])] = true;
    }
  }
  TORCH_CHECK_VALUE(ok, op, ": ", name, " must hold each of the ", K, " op columns 0..", K - 1, " once, got ",
                    at::IntArrayRef(v, static_cast<size_t>(K)));
}

}  // namespace fastdarts
