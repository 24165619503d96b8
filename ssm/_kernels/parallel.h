// Shared by the kernels' sources (matmul.cc, selective.cc): work shared with XLA's
// intra-op thread pool. Header-only, in an anonymous namespace of each includer.
#ifndef SSM_KERNELS_PARALLEL_H_
#define SSM_KERNELS_PARALLEL_H_

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define SSM_PAUSE() _mm_pause()
#else
#define SSM_PAUSE() std::this_thread::yield()
#endif

#include "xla/ffi/api/ffi.h"

namespace ssm_kernels {

// The units 0..total-1 of a job, shared by the calling thread and tasks on XLA's
// intra-op thread pool (the threads XLA runs its own ops on, so nothing is
// oversubscribed). Units are taken from a shared counter: the caller does whatever
// the pool's threads have not started, so the call returns as soon as every unit is
// done even if the pool is busy elsewhere; a task that starts late finds nothing
// left (the job is shared, so it outlives the call).
template <typename F>
void Parallel(xla::ffi::ThreadPool& pool, int64_t threads, int64_t total, F f) {
  struct Job {
    Job(F f, int64_t total) : f(std::move(f)), total(total) {}
    F f;
    const int64_t total;
    std::atomic<int64_t> next{0}, done{0};
    void Drain() {
      for (int64_t u; (u = next.fetch_add(1)) < total;) {
        f(u);
        done.fetch_add(1);
      }
    }
  };
  const int64_t helpers = std::min<int64_t>(
      std::min<int64_t>(threads, pool.num_threads()), total) - 1;
  if (helpers <= 0) {
    for (int64_t u = 0; u < total; ++u) f(u);
    return;
  }
  auto job = std::make_shared<Job>(std::move(f), total);
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([job] { job->Drain(); });
  job->Drain();
  while (job->done.load() != total) SSM_PAUSE();
}

}  // namespace ssm_kernels

#endif  // SSM_KERNELS_PARALLEL_H_
