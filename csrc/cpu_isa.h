// Which vector instruction set the core's hand-blocked kernels (dense.cpp, leaf_scores.cpp) run: the best this CPU
// has, or less when the environment variable GENREC_CPU_ISA asks for it ("base" or "avx2"), so that tests run the
// kernels this machine would not pick. Read once per process. (`target_clones("avx2")` is not enough for those
// kernels: that clone has no FMA.)
#pragma once

#include <algorithm>
#include <cstdlib>
#include <string>

namespace genrec {

enum class Isa { kBase = 0, kAvx2Fma = 1, kAvx512 = 2 };

inline Isa cpu_isa() {
  static const Isa isa = [] {
    __builtin_cpu_init();
    int best = __builtin_cpu_supports("avx512f") ? 2 : __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    const char* ask = std::getenv("GENREC_CPU_ISA");
    const std::string want = ask == nullptr ? "" : ask;
    if (want == "base") best = 0;
    if (want == "avx2") best = std::min(best, 1);
    return static_cast<Isa>(best);
  }();
  return isa;
}

}  // namespace genrec
