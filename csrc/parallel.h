// A tiny fork-join over index ranges for the C++ core.
//
// Built with OpenMP (the default where the compiler has it), the chunks run on the process's OpenMP
// pool: the one PyTorch's CPU ops use, since both load the same libgomp.so.1. Its workers spin for a while
// after each torch op, waiting for more; fresh std::threads would share the cores with those spinning
// workers (measured: the fused head + top-k 2x slower right after the model's forward), whereas an OpenMP
// region hands them the chunks. Without OpenMP: a std::thread per chunk.
#pragma once

#include <algorithm>
#include <cstdint>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

namespace genrec {

// The thread count a `threads` argument means: itself, or all cores when <= 0.
inline int resolve_threads(int threads) {
  return threads > 0 ? threads : static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
}

// Runs fn(begin, end) over `threads` contiguous chunks of [0, n) (at least `min_per_thread`
// indices each; threads <= 0 = all cores). An exception thrown by any chunk is rethrown here,
// after every worker has joined, so none escapes a worker thread.
template <class Fn>
void parallel_for(int64_t n, int threads, int64_t min_per_thread, Fn fn) {
  threads = resolve_threads(threads);
  const int64_t t = std::max<int64_t>(1, std::min<int64_t>(threads, n / std::max<int64_t>(1, min_per_thread)));
  if (t <= 1) {
    fn(int64_t{0}, n);
    return;
  }
  std::exception_ptr error;
  std::mutex error_mutex;
  auto guarded = [&](int64_t begin, int64_t end) {
    try {
      fn(begin, end);
    } catch (...) {
      std::lock_guard<std::mutex> lock(error_mutex);
      if (!error) error = std::current_exception();
    }
  };
#if defined(_OPENMP)
#pragma omp parallel for num_threads(static_cast<int>(t)) schedule(static, 1)
  for (int64_t i = 0; i < t; ++i) guarded(n * i / t, n * (i + 1) / t);
#else
  std::vector<std::thread> workers;
  try {
    for (int64_t i = 1; i < t; ++i) workers.emplace_back(guarded, n * i / t, n * (i + 1) / t);
  } catch (...) {  // could not start a thread: run the remaining chunks here
    for (int64_t i = static_cast<int64_t>(workers.size()) + 1; i < t; ++i) guarded(n * i / t, n * (i + 1) / t);
  }
  guarded(int64_t{0}, n / t);
  for (auto& w : workers) w.join();
#endif
  if (error) std::rethrow_exception(error);
}

}  // namespace genrec
