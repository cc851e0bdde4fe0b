// What the CPU kernels of relu_dwconv.cpp offer other C++ code besides their ops.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>
#include <vector>

namespace fastdarts {

// relu_dwconv_pointwise's outputs without their BN statistics: for a recomputation, or a forward in evaluation,
// which normalise with statistics they already have. The statistics are the one epilogue the loops can skip (two
// sums per value in double, next to the 1x1 conv's C multiply-adds).
std::vector<at::Tensor> relu_dwconv_pointwise_outputs(const at::Tensor& x, at::TensorList weights,
                                                      at::TensorList pointwise_weights, at::IntArrayRef dilations,
                                                      int64_t stride, bool relu,
                                                      const std::optional<at::Tensor>& input_mean = std::nullopt,
                                                      const std::optional<at::Tensor>& input_invstd = std::nullopt);

}  // namespace fastdarts
