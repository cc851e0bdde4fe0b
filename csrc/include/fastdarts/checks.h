// Input checks shared by every kernel file (CPU and CUDA), written once.
#pragma once

#include <ATen/ATen.h>

namespace fastdarts {

inline void check_float_dtype(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble,
              name, " must be float32 or float64, got ", t.scalar_type());
}

// A non-empty list of tensors with one shape, dtype and device.
inline void check_same_tensors(at::TensorList ts, const char* name) {
  TORCH_CHECK(!ts.empty(), name, " must not be empty");
  const at::Tensor& first = ts[0];
  check_float_dtype(first, name);
  for (size_t k = 1; k < ts.size(); ++k) {
    TORCH_CHECK(ts[k].sizes() == first.sizes(), name, "[", k, "] has shape ", ts[k].sizes(),
                " but ", name, "[0] has shape ", first.sizes());
    TORCH_CHECK(ts[k].scalar_type() == first.scalar_type(), name, "[", k, "] has dtype ",
                ts[k].scalar_type(), " but ", name, "[0] has dtype ", first.scalar_type());
    TORCH_CHECK(ts[k].device() == first.device(), name, "[", k, "] is on ", ts[k].device(),
                " but ", name, "[0] is on ", first.device());
  }
}

// A 1-D weight vector with one entry per tensor of `like`, matching its dtype and device.
inline void check_weights(const at::Tensor& w, int64_t count, const at::Tensor& like) {
  TORCH_CHECK(w.dim() == 1 && w.size(0) == count, "w must have shape [", count,
              "] (one weight per tensor), got ", w.sizes());
  TORCH_CHECK(w.scalar_type() == like.scalar_type(), "w has dtype ", w.scalar_type(),
              " but the tensors have ", like.scalar_type());
  TORCH_CHECK(w.device() == like.device(), "w is on ", w.device(), " but the tensors are on ",
              like.device());
}

inline void check_same_as(const at::Tensor& t, const at::Tensor& like, const char* name) {
  TORCH_CHECK(t.sizes() == like.sizes() && t.scalar_type() == like.scalar_type() &&
                  t.device() == like.device(),
              name, " must match the inputs in shape, dtype and device");
}

}  // namespace fastdarts
