// Small helpers shared by the CPU kernels: strided addressing of [N, C, H, W] tensors, scratch buffers, and sums
// over per-chunk slots that do not depend on the number of threads.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <new>
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

// Scratch space of the calling thread that outlives the call, 64-byte aligned like scratch(): the pieces a thread
// takes in parallel_for_balanced (up to four a call) and the later calls reuse it, where small calls (a search on
// 8x8 images) spent a measurable part of their time allocating tiles per piece. `slot` numbers a kernel's buffers; a
// thread's buffer in a slot holds one thing at a time, so no kernel may call another that uses its slots while it
// holds them. Each buffer keeps the size of the largest request so far.
constexpr int kThreadScratchSlots = 4;

template <typename T>
T* thread_scratch(int slot, int64_t numel) {
  struct Buffer {
    void* data = nullptr;
    size_t bytes = 0;
    ~Buffer() {
      std::free(data);
    }
  };
  thread_local std::array<Buffer, kThreadScratchSlots> buffers;
  Buffer& buffer = buffers.at(static_cast<size_t>(slot));
  const size_t bytes = static_cast<size_t>(round_up(std::max<int64_t>(numel, 1) * sizeof(T), 64));
  if (bytes > buffer.bytes) {
    std::free(buffer.data);
    buffer.data = std::aligned_alloc(64, bytes);
    buffer.bytes = buffer.data == nullptr ? 0 : bytes;
    if (buffer.data == nullptr) {
      throw std::bad_alloc();
    }
  }
  return static_cast<T*>(buffer.data);
}

// at::parallel_for(begin, end, grain, f), with the range dealt out in pieces as the threads ask for them instead of
// cut in one equal share per thread: a thread that finishes early takes the next piece rather than waiting for the
// others at the end (on a VM whose cores are shared with other guests, a sampling profile of a search step found
// the first thread in OpenMP, waiting, for 9-16 % of its samples; 5 % with this). f(b, e) is called once per
// piece, so it must not assume one call per thread; as with at::parallel_for, the grain sets how many threads
// start. Kernels whose results are summed per chunk in chunk order stay independent of the split.
template <typename F>
void parallel_for_balanced(int64_t begin, int64_t end, int64_t grain, const F& f) {
  if (begin >= end) {
    return;
  }
  const int64_t n = end - begin;
  const int64_t g = std::max<int64_t>(grain, 1);
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), (n + g - 1) / g);
  if (threads <= 1 || at::in_parallel_region()) {
    at::parallel_for(begin, end, grain, f);
    return;
  }
  constexpr int64_t kPiecesPerThread = 4;
  const int64_t piece = std::max<int64_t>(1, (n + threads * kPiecesPerThread - 1) / (threads * kPiecesPerThread));
  std::atomic<int64_t> next{begin};
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    for (int64_t b = next.fetch_add(piece); b < end; b = next.fetch_add(piece)) {
      f(b, std::min(end, b + piece));
    }
  });
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
