#pragma once

// Argument checks shared by every kernel (CPU now, CUDA later), so each rule and its message is
// written once. They mirror the checks of fastdarts/ops/reference.py: shape, length and device
// problems raise ValueError in Python, dtype problems TypeError. Message arguments are only
// formatted when a check fails, so the checks cost nothing on the success path.

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>

namespace fastdarts {

// The kernels compute in float32 or float64; float64 is there so that gradcheck can run.
inline void check_supported_dtype(const char* op, const at::Tensor& t) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, op,
                   ": only float32 and float64 are supported, got ", t.scalar_type());
}

// `t` has the shape, dtype and device of `like`.
inline void check_like(const char* op, const char* name, const at::Tensor& t, const char* like_name,
                       const at::Tensor& like) {
  TORCH_CHECK_VALUE(t.sizes() == like.sizes(), op, ": ", name, " must have the shape of ", like_name, " ",
                    like.sizes(), ", got ", t.sizes());
  TORCH_CHECK_TYPE(t.scalar_type() == like.scalar_type(), op, ": ", name, " must have the dtype of ", like_name,
                   " (", like.scalar_type(), "), got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.device() == like.device(), op, ": ", name, " must be on the device of ", like_name, " (",
                    like.device(), "), got ", t.device());
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

}  // namespace fastdarts
