// csrc/parallel.h's parallel_for, checked as built (with -fopenmp: the OpenMP region; without: std::threads):
// every index in exactly one chunk, chunks of at least min_per_thread, and an exception thrown in any chunk
// rethrown to the caller. Prints the mode and "ok", or what failed (exit 1).
#include <atomic>
#include <cstdio>
#include <stdexcept>
#include <vector>

#include "parallel.h"

int main() {
  for (int64_t n : {0, 1, 7, 100, 1000}) {
    for (int threads : {0, 1, 2, 3, 8}) {
      for (int64_t min_per_thread : {1, 16}) {
        std::vector<std::atomic<int>> hits(static_cast<size_t>(n));
        std::atomic<int64_t> short_chunks{0};
        genrec::parallel_for(n, threads, min_per_thread, [&](int64_t begin, int64_t end) {
          if (end - begin < min_per_thread && end - begin < n) ++short_chunks;
          for (int64_t i = begin; i < end; ++i) ++hits[static_cast<size_t>(i)];
        });
        for (int64_t i = 0; i < n; ++i) {
          if (hits[static_cast<size_t>(i)] != 1) {
            std::printf("index %lld covered %d times (n=%lld threads=%d)\n", static_cast<long long>(i),
                        hits[static_cast<size_t>(i)].load(), static_cast<long long>(n), threads);
            return 1;
          }
        }
        if (short_chunks > 0) {
          std::printf("a chunk below min_per_thread=%lld (n=%lld)\n", static_cast<long long>(min_per_thread),
                      static_cast<long long>(n));
          return 1;
        }
      }
    }
  }
  try {
    genrec::parallel_for(100, 4, 1, [](int64_t begin, int64_t) {
      if (begin > 0) throw std::runtime_error("chunk");
    });
    std::puts("an exception in a worker's chunk was lost");
    return 1;
  } catch (const std::runtime_error&) {
  }
#if defined(_OPENMP)
  std::puts("openmp");
#else
  std::puts("threads");
#endif
  std::puts("ok");
  return 0;
}
