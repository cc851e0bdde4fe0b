// The instruction-set tier in force (include/fastdarts/cpu_isa.h).

#include "fastdarts/cpu_isa.h"

#include <c10/util/Exception.h>

#include <atomic>
#include <cstdlib>
#include <optional>

namespace fastdarts {
namespace {

constexpr int kUnset = -1;
std::atomic<int> g_cpu_isa{kUnset};

std::optional<CpuIsa> parse(const std::string& name) {
  for (CpuIsa isa : {CpuIsa::kBaseline, CpuIsa::kAvx2, CpuIsa::kAvx512}) {
    if (name == cpu_isa_name(isa)) {
      return isa;
    }
  }
  return std::nullopt;
}

// The tier named `name`, or the reason it cannot run here (one line).
CpuIsa checked(const std::string& name, const char* source, std::string* problem) {
  const std::optional<CpuIsa> isa = parse(name);
  if (!isa) {
    *problem = std::string(source) + ": unknown CPU tier '" + name + "' (baseline, avx2 or avx512)";
  } else if (static_cast<int>(*isa) > static_cast<int>(best_cpu_isa())) {
    *problem = std::string(source) + ": this CPU cannot run tier " + name + "; its best tier is " +
               cpu_isa_name(best_cpu_isa());
  }
  return isa.value_or(CpuIsa::kBaseline);
}

}  // namespace

const char* cpu_isa_name(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::kAvx512:
      return "avx512";
    case CpuIsa::kAvx2:
      return "avx2";
    default:
      return "baseline";
  }
}

CpuIsa best_cpu_isa() {
#if FASTDARTS_HAS_X86_TIERS
  // __builtin_cpu_supports also checks that the OS saves the registers (XCR0).
  static const CpuIsa best = [] {
    const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
                        __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq");
    return avx512 ? CpuIsa::kAvx512 : avx2 ? CpuIsa::kAvx2 : CpuIsa::kBaseline;
  }();
  return best;
#else
  return CpuIsa::kBaseline;
#endif
}

CpuIsa cpu_isa() {
  const int current = g_cpu_isa.load(std::memory_order_relaxed);
  if (current != kUnset) {
    return static_cast<CpuIsa>(current);
  }
  CpuIsa isa = best_cpu_isa();
  const char* forced = std::getenv("FASTDARTS_CPU_ISA");
  if (forced != nullptr && *forced != '\0') {
    std::string problem;
    isa = checked(forced, "FASTDARTS_CPU_ISA", &problem);
    TORCH_CHECK_VALUE(problem.empty(), problem);
  }
  g_cpu_isa.store(static_cast<int>(isa), std::memory_order_relaxed);
  return isa;
}

void set_cpu_isa(const std::string& name) {
  std::string problem;
  const CpuIsa isa = checked(name, "use_cpu_isa", &problem);
  TORCH_CHECK_VALUE(problem.empty(), problem);
  g_cpu_isa.store(static_cast<int>(isa), std::memory_order_relaxed);
}

}  // namespace fastdarts
