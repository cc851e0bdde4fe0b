// Small helpers shared by the CPU kernels: strided addressing of [N, C, H, W] tensors, scratch buffers, and sums
// over per-chunk slots that do not depend on the number of threads.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

namespace fastdarts {

struct Strides {
  int64_t n, c, h, w;
};

inline Strides strides_of(const at::Tensor& t) {
  return {t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}

inline int64_t round_up(int64_t n, int64_t multiple) {
  return (n + multiple - 1) / multiple * multiple;
}

// Scratch space from the ATen allocator, which aligns to 64 bytes: every vector a loop loads from a tile is
// then aligned, since tiles are made of whole vectors.
inline at::Tensor scratch(int64_t numel, const at::Tensor& like) {
  return at::empty({numel}, like.options().memory_format(at::MemoryFormat::Contiguous));
}

// Adds per-chunk slots [num_chunks][size] in chunk order, in double, whatever thread filled each: the result is
// the same bit for bit whatever the number of threads.
template <typename S>
std::vector<double> add_slots(const S* slots, int64_t num_chunks, int64_t size) {
  std::vector<double> total(size, 0.0);
  for (int64_t chunk = 0; chunk < num_chunks; ++chunk) {
    const S* slot = slots + chunk * size;
    for (int64_t e = 0; e < size; ++e) {
      total[e] += static_cast<double>(slot[e]);
    }
  }
  return total;
}

}  // namespace fastdarts
