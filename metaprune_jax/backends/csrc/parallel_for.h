// Shared by the XLA:CPU FFI kernels (grid_cpu.cc, conv_cpu.cc): a parallel loop on XLA's
// intra-op thread pool.
#ifndef METAPRUNE_JAX_CSRC_PARALLEL_FOR_H_
#define METAPRUNE_JAX_CSRC_PARALLEL_FOR_H_

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace metaprune_cpu {

// fn(i) for every i in [0, n), on the calling thread and up to num_threads pool threads. A pool
// task that starts after every item was taken touches only the shared counters (held by a
// shared_ptr), so the caller returns as soon as the items it saw started have finished.
template <typename F>
void ParallelFor(xla::ffi::ThreadPool& pool, int64_t n, const F& fn) {
  int64_t helpers = std::min<int64_t>(pool.num_threads(), n - 1);
  if (helpers <= 0) {
    for (int64_t i = 0; i < n; ++i) fn(i);
    return;
  }
  struct State {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
  };
  auto state = std::make_shared<State>();
  const F* f = &fn;
  auto work = [state, f, n]() {
    for (int64_t i; (i = state->next.fetch_add(1)) < n;) {
      (*f)(i);
      state->done.fetch_add(1);
    }
  };
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule([work]() { work(); });
  work();
  while (state->done.load() < n) std::this_thread::yield();
}

}  // namespace metaprune_cpu

#endif  // METAPRUNE_JAX_CSRC_PARALLEL_FOR_H_
