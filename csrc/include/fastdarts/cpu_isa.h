#pragma once

// Run-time choice of the instruction set for compute-bound CPU loops.
//
// setup.py compiles for the baseline x86-64 instruction set (SSE2, no FMA) so that one build runs on any
// x86-64 CPU. A kernel whose hot loops are compute bound compiles them a second time for AVX-512 + FMA:
// it writes the loops once as FASTDARTS_ALWAYS_INLINE templates, wraps them in one function marked
// FASTDARTS_TARGET_AVX512 and one without, and calls the first when cpu_has_avx512(). (Inlining is what
// makes the wrapper's target apply to the loops; a function called, not inlined, keeps the baseline.)
// Both copies do the same arithmetic in the same order, except that the AVX-512 copy contracts
// a * b + c into one FMA rounding, so the two agree to the last bit or two, not bit for bit.
//
// Plain loops vectorise well when each element is loaded, updated and stored once. A register-tiled
// loop (a small block of accumulators updated many times, as in a convolution) is different: GCC keeps
// a fixed-size accumulator array on the stack and reloads it for every update. Such loops use Vec<T>,
// one 64-byte vector in GCC/Clang vector-extension form, which stays in registers: one zmm under
// FASTDARTS_TARGET_AVX512, four xmm in the baseline copy.

#include <cstdint>
#include <cstdlib>
#include <cstring>

#define FASTDARTS_ALWAYS_INLINE inline __attribute__((always_inline))

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define FASTDARTS_HAS_AVX512_VARIANT 1
#define FASTDARTS_TARGET_AVX512 __attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma")))
#else
#define FASTDARTS_HAS_AVX512_VARIANT 0
#define FASTDARTS_TARGET_AVX512
#endif

namespace fastdarts {

// Whether to run the FASTDARTS_TARGET_AVX512 copies: the CPU has the instructions and the environment variable
// FASTDARTS_CPU_BASELINE is not "1" (which lets the tests run the baseline copies on an AVX-512 machine).
// Decided once per process.
inline bool cpu_has_avx512() {
#if FASTDARTS_HAS_AVX512_VARIANT
  static const bool has = [] {
    const char* baseline = std::getenv("FASTDARTS_CPU_BASELINE");
    if (baseline != nullptr && std::strcmp(baseline, "1") == 0) {
      return false;
    }
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
           __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }();
  return has;
#else
  return false;
#endif
}

// One 64-byte vector of T: 16 floats (exactly C = 16 channels in channels_last) or 8 doubles.
template <typename T>
struct VecOf {
  typedef T type __attribute__((vector_size(64)));
};
template <typename T>
using Vec = typename VecOf<T>::type;
template <typename T>
constexpr int64_t kVecLanes = 64 / sizeof(T);

// Unaligned loads and stores. They pass the vector by reference: by value, GCC warns that the calling
// convention of a 64-byte vector differs with and without AVX-512 (-Wpsabi), although these always inline.
template <typename T>
FASTDARTS_ALWAYS_INLINE void vec_load(Vec<T>& v, const T* p) {
  std::memcpy(&v, p, sizeof(Vec<T>));
}
template <typename T>
FASTDARTS_ALWAYS_INLINE void vec_store(T* p, const Vec<T>& v) {
  std::memcpy(p, &v, sizeof(Vec<T>));
}

}  // namespace fastdarts
