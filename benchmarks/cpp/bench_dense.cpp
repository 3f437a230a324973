// GFLOP/s of the C++ core's dense layer (csrc/dense.h `linear`, one thread) on the decoder's shapes: 5,120 rows
// (256 users x 20 beams), 1,000 and 256 rows, 20-40 (one user's beams). Best of 200 calls per shape.
//
//   g++ -O3 -fopenmp-simd -fno-trapping-math -Icsrc benchmarks/cpp/bench_dense.cpp csrc/dense.cpp -o /tmp/bench_dense
//   /tmp/bench_dense                        # the kernel this CPU picks (GENREC_CPU_ISA=base|avx2 asks for less)
//
// Against another version of dense.cpp, alternating call by call in one process (this VM's speed drifts):
//   git show REV:csrc/dense.cpp | sed 's/^namespace genrec {/namespace genrec_old {\nusing genrec::Isa;\nusing genrec::cpu_isa;/;
//     s/exp_nonpositive(/genrec::exp_nonpositive(/' > /tmp/dense_old.cpp
//   g++ -O3 -fopenmp-simd -fno-trapping-math -Icsrc -DWITH_OLD benchmarks/cpp/bench_dense.cpp csrc/dense.cpp /tmp/dense_old.cpp -o /tmp/bench_dense
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cmath>
#include <cstdio>
#include <vector>

#include "dense.h"

#ifdef WITH_OLD
namespace genrec_old {
void linear(const float* x, int64_t rows, int64_t in, int64_t ldx, const float* w, const float* b, int64_t out,
            float* y, int64_t ldy);
}
#endif

int main() {
  const int64_t shapes[][3] = {{5120, 64, 64}, {5120, 64, 256}, {5120, 256, 64}, {5120, 64, 192}, {1000, 64, 256},
                               {256, 64, 64},  {40, 64, 192},   {20, 64, 64},   {20, 64, 256},  {20, 256, 64}};
  std::printf("| rows x in -> out | GFLOP/s |%s\n|---|---:|%s\n", 
#ifdef WITH_OLD
              " old GFLOP/s | max abs diff |", "---:|---:|"
#else
              "", ""
#endif
  );
  for (const auto& s : shapes) {
    const int64_t rows = s[0], in = s[1], out = s[2];
    std::vector<float> x(rows * in), w(out * in), b(out), y(rows * out), y_old(rows * out);
    for (size_t i = 0; i < x.size(); ++i) x[i] = static_cast<float>((i * 7919) % 1000) / 1000.0f - 0.5f;
    for (size_t i = 0; i < w.size(); ++i) w[i] = static_cast<float>((i * 104729) % 1000) / 1000.0f - 0.5f;
    for (size_t i = 0; i < b.size(); ++i) b[i] = static_cast<float>(i % 7) / 7.0f;
    double best = 1e30, best_old = 1e30;
    for (int rep = 0; rep < 200; ++rep) {
      auto t = std::chrono::steady_clock::now();
      genrec::linear(x.data(), rows, in, in, w.data(), b.data(), out, y.data(), out);
      best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t).count());
#ifdef WITH_OLD
      t = std::chrono::steady_clock::now();
      genrec_old::linear(x.data(), rows, in, in, w.data(), b.data(), out, y_old.data(), out);
      best_old = std::min(best_old, std::chrono::duration<double>(std::chrono::steady_clock::now() - t).count());
#endif
    }
    const double flop = 2.0 * static_cast<double>(rows * in * out);
    std::printf("| %lld x %lld -> %lld | %.1f |", static_cast<long long>(rows), static_cast<long long>(in),
                static_cast<long long>(out), flop / best / 1e9);
#ifdef WITH_OLD
    float diff = 0.0f;
    for (size_t i = 0; i < y.size(); ++i) diff = std::max(diff, std::abs(y[i] - y_old[i]));
    std::printf(" %.1f | %.1e |", flop / best_old / 1e9, static_cast<double>(diff));
#endif
    std::printf("\n");
  }
  return 0;
}
