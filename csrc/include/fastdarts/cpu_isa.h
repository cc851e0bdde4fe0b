#pragma once

// Run-time choice of the instruction-set tier for compute-bound CPU loops.
//
// setup.py compiles for the baseline of the target (x86-64: SSE2, no FMA) so that one build runs on any CPU of
// that architecture. A kernel whose hot loops are compute bound compiles them once per tier: it writes the loops
// once as FASTDARTS_ALWAYS_INLINE templates taking the tier as a template argument (to pick register tiles), and
// FASTDARTS_CPU_ISA_COPIES(loop) defines loop_baseline, loop_avx2 and loop_avx512, each marked with its tier's
// target attribute; FASTDARTS_CALL_FOR_CPU_ISA(isa, loop, T, args...) calls the one of tier `isa`. An op reads
// the tier once, cpu_isa(), before its threads start, so that one call runs one tier even if set_cpu_isa changes
// it meanwhile. (Inlining is what makes a copy's target apply to the loops; a function called, not inlined, keeps
// the baseline.)
//
//   baseline: no target attribute (x86-64: SSE2; AArch64: NEON, which every AArch64 CPU has).
//   avx2:     AVX2 + FMA, x86-64-v3's vector instructions: 16 ymm registers of 8 floats.
//   avx512:   AVX-512 F/VL/BW/DQ + FMA, x86-64-v4: 32 zmm registers of 16 floats.
//
// The tier in force is the best one the CPU supports, unless FASTDARTS_CPU_ISA=baseline|avx2|avx512 names
// another (one the CPU lacks is refused), decided at the first kernel call; set_cpu_isa changes it (the tests
// run every kernel on every tier with it). The copies do the same arithmetic in the same order, except that the
// avx2 and avx512 ones contract a * b + c into one FMA rounding, so they agree to the last bit or two with the
// baseline, not bit for bit.
//
// Plain loops vectorise well when each element is loaded, updated and stored once. A register-tiled loop (a
// small block of accumulators updated many times, as in a convolution) is different: GCC keeps a fixed-size
// accumulator array on the stack and reloads it for every update. Such loops use Vec<T, kIsa>, one register of
// the tier (below), which stays in registers.

#include <cstdint>
#include <cstring>
#include <string>

#define FASTDARTS_ALWAYS_INLINE inline __attribute__((always_inline))

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define FASTDARTS_HAS_X86_TIERS 1
#define FASTDARTS_TARGET_AVX2 __attribute__((target("avx2,fma")))
#define FASTDARTS_TARGET_AVX512 __attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma")))
#else
#define FASTDARTS_HAS_X86_TIERS 0
#define FASTDARTS_TARGET_AVX2
#define FASTDARTS_TARGET_AVX512
#endif

namespace fastdarts {

enum class CpuIsa : int { kBaseline = 0, kAvx2 = 1, kAvx512 = 2 };

// "baseline", "avx2" or "avx512".
const char* cpu_isa_name(CpuIsa isa);
// The best tier this CPU (and this build: x86-64 tiers on x86-64 only) can run.
CpuIsa best_cpu_isa();
// The tier in force (see above). Throws c10::Error when FASTDARTS_CPU_ISA names an unknown tier or one the CPU
// lacks, until set_cpu_isa sets a valid one.
CpuIsa cpu_isa();
// Makes `name` the tier in force; throws c10::ValueError with a one-line message for an unknown tier or one the
// CPU lacks.
void set_cpu_isa(const std::string& name);

// The copies of an FASTDARTS_ALWAYS_INLINE loop template `loop<T, CpuIsa>`, one per tier, each compiled for it.
#define FASTDARTS_CPU_ISA_COPIES(loop)                                                  \
  template <typename T, typename... Args>                                               \
  void loop##_baseline(Args&&... args) {                                                \
    loop<T, ::fastdarts::CpuIsa::kBaseline>(args...);                                   \
  }                                                                                     \
  template <typename T, typename... Args>                                               \
  FASTDARTS_TARGET_AVX2 void loop##_avx2(Args&&... args) {                              \
    loop<T, ::fastdarts::CpuIsa::kAvx2>(args...);                                       \
  }                                                                                     \
  template <typename T, typename... Args>                                               \
  FASTDARTS_TARGET_AVX512 void loop##_avx512(Args&&... args) {                          \
    loop<T, ::fastdarts::CpuIsa::kAvx512>(args...);                                     \
  }

// Calls the copy of `loop` (defined by FASTDARTS_CPU_ISA_COPIES) for tier `isa`.
#define FASTDARTS_CALL_FOR_CPU_ISA(isa, loop, T, ...)  \
  do {                                                 \
    switch (isa) {                                     \
      case ::fastdarts::CpuIsa::kAvx512:               \
        loop##_avx512<T>(__VA_ARGS__);                 \
        break;                                         \
      case ::fastdarts::CpuIsa::kAvx2:                 \
        loop##_avx2<T>(__VA_ARGS__);                   \
        break;                                         \
      default:                                         \
        loop##_baseline<T>(__VA_ARGS__);               \
    }                                                  \
  } while (false)

// The vectors of tier kIsa in GCC/Clang vector-extension form: 64 bytes (one zmm) on avx512, 32 (one ymm) on
// avx2, 16 (one xmm, or an AArch64 q register) on the baseline. A loop written with the tier's own width keeps
// its vectors in registers; a wider one (64 bytes under avx2, say) GCC splits through the stack.
constexpr int64_t vec_bytes(CpuIsa isa) {
  return isa == CpuIsa::kAvx512 ? 64 : isa == CpuIsa::kAvx2 ? 32 : 16;
}
template <CpuIsa kIsa>
constexpr int64_t kVecBytes = vec_bytes(kIsa);
template <typename T, int64_t kBytes>
struct VecOf {
  typedef T type __attribute__((vector_size(kBytes)));
};
template <typename T, CpuIsa kIsa>
using Vec = typename VecOf<T, kVecBytes<kIsa>>::type;
template <typename T, CpuIsa kIsa>
constexpr int64_t kLanes = kVecBytes<kIsa> / static_cast<int64_t>(sizeof(T));
// The widest tier's lanes (16 floats, 8 doubles): tiles pad channels to a multiple of it, so that every tier's
// loops cover them in whole vectors.
template <typename T>
constexpr int64_t kVecLanes = 64 / static_cast<int64_t>(sizeof(T));

// Unaligned loads and stores. They pass the vector by reference: by value, GCC warns that the calling
// convention of a vector differs between the tiers (-Wpsabi), although these always inline.
template <typename V, typename T>
FASTDARTS_ALWAYS_INLINE void vec_load(V& v, const T* p) {
  std::memcpy(&v, p, sizeof(V));
}
template <typename V, typename T>
FASTDARTS_ALWAYS_INLINE void vec_store(T* p, const V& v) {
  std::memcpy(p, &v, sizeof(V));
}

// vec_load into a register that the compiler must keep: for a vector that several multiply-adds read, GCC
// otherwise folds the load into each of them as a memory operand, loading it again each time (a 3x3 kernel's loop
// loaded each input 3 times, and ran at half the rate of the 5x5 one).
template <typename V, typename T>
FASTDARTS_ALWAYS_INLINE void vec_load_once(V& v, const T* p) {
  vec_load(v, p);
#if defined(__x86_64__)
  asm("" : "+v"(v));
#elif defined(__aarch64__)
  asm("" : "+w"(v));
#endif
}

// A non-temporal store of one vector of the tier (p aligned to its size): writes the line without first reading it
// into the cache (a plain store reads each line it writes). In asm because GCC has no builtin for it, and the
// intrinsics of a wider tier cannot inline into these tier-neutral helpers (the "v" constraint gives a register of
// the vector's own width). A plain store elsewhere than x86-64. Writers end with store_fence before their results
// are read by another thread.
template <typename V>
FASTDARTS_ALWAYS_INLINE void vec_stream(void* p, const V& v) {
#if defined(__x86_64__)
  static_assert(sizeof(V) == 16 || sizeof(V) == 32 || sizeof(V) == 64, "a vector of 16, 32 or 64 bytes");
  if constexpr (sizeof(V) == 16) {
    asm volatile("movntps %1, %0" : "=m"(*static_cast<V*>(p)) : "x"(v));
  } else {
    asm volatile("vmovntps %1, %0" : "=m"(*static_cast<V*>(p)) : "v"(v));
  }
#else
  std::memcpy(p, &v, sizeof(V));
#endif
}

// Makes this thread's non-temporal stores (vec_stream's) globally visible before its work counts as done.
FASTDARTS_ALWAYS_INLINE void store_fence() {
#if defined(__x86_64__)
  asm volatile("sfence" ::: "memory");
#endif
}

}  // namespace fastdarts
