// Batched small matrix products on CPU, as an XLA FFI custom call, threaded.
//
//     c[i] = op(a[i]) @ op(b[i]),   i over the batch,
//
// with a (batch, M, K), or (batch, K, M) when `transpose_a`, b (batch, K, N), or
// (batch, N, K) when `transpose_b`, c (batch, M, N), all row-major, float32 or
// float64. The chunked operators (`_gla.py`, `_delta.py`) spend most of their time in
// products of this size (tens of rows and columns, a batch of heads times chunks).
// XLA's CPU backend runs them on one thread at 30-45 GFLOP/s; here a register-blocked
// micro-kernel on packed panels runs at about twice that per core, and the work
// units (one product, or 64 of its rows) are shared with XLA's intra-op threads.

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define SSM_PAUSE() _mm_pause()
#else
#define SSM_PAUSE() std::this_thread::yield()
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// ------------------------------------------------------------------- threads

// The units 0..total-1 of a job, shared by the calling thread and tasks on XLA's
// intra-op thread pool (the threads XLA runs its own ops on, so nothing is
// oversubscribed). Units are taken from a shared counter: the caller does whatever
// the pool's threads have not started, so the call returns as soon as every unit is
// done even if the pool is busy elsewhere; a task that starts late finds nothing
// left (the job is shared, so it outlives the call).
template <typename F>
void Parallel(ffi::ThreadPool& pool, int64_t threads, int64_t total, F f) {
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

// ---------------------------------------------------------------- micro-kernel

#if defined(__AVX512F__)
constexpr int kVecBytes = 64, kPanelVectors = 4;  // 6 x 4 accumulators of 32 registers
#else
constexpr int kVecBytes = 32, kPanelVectors = 2;  // 6 x 2 accumulators of 16 registers
#endif
constexpr int kRows = 6;           // rows of c per micro-tile
constexpr int64_t kUnitRows = 64;  // rows of c per work unit

template <typename T>
struct Kernel {
  typedef T V __attribute__((vector_size(kVecBytes)));
  static constexpr int kLanes = kVecBytes / sizeof(T);
  static constexpr int kPanel = kPanelVectors * kLanes;  // columns per packed panel

  // acc[r][j] = sum_k ap[k, r] * bp[k, j-th vector], for a tile of kRows rows and
  // NV vectors of columns; ap is K x kRows, bp is K x kPanel (both packed).
  template <int NV>
  static void Tile(const T* ap, const T* bp, int64_t K, T* out) {
    V acc[kRows][NV];
    for (int r = 0; r < kRows; ++r)
      for (int j = 0; j < NV; ++j) acc[r][j] = V{};
    for (int64_t k = 0; k < K; ++k) {
      V bv[NV];
      for (int j = 0; j < NV; ++j) std::memcpy(&bv[j], bp + k * kPanel + j * kLanes, kVecBytes);
      for (int r = 0; r < kRows; ++r) {
        const T a = ap[k * kRows + r];
        for (int j = 0; j < NV; ++j) acc[r][j] += a * bv[j];
      }
    }
    for (int r = 0; r < kRows; ++r)
      for (int j = 0; j < NV; ++j) std::memcpy(out + r * kPanel + j * kLanes, &acc[r][j], kVecBytes);
  }

  struct Shape {
    int64_t M, K, N;
    bool ta, tb;
  };

  // Rows [r0, r1) of one product.
  static void Rows(const Shape& s, const T* a, const T* b, T* c, int64_t r0, int64_t r1,
                   T* bp, T* ap) {
    const int64_t M = s.M, K = s.K, N = s.N;
    T out[kRows * kPanel];
    for (int64_t j0 = 0; j0 < N; j0 += kPanel) {
      const int64_t w = std::min<int64_t>(kPanel, N - j0);
      // Pack b[:, j0:j0+w] as K x kPanel, zero-padded.
      for (int64_t k = 0; k < K; ++k) {
        T* row = bp + k * kPanel;
        if (!s.tb) {
          std::memcpy(row, b + k * N + j0, w * sizeof(T));
        } else {
          for (int64_t j = 0; j < w; ++j) row[j] = b[(j0 + j) * K + k];
        }
        for (int64_t j = w; j < kPanel; ++j) row[j] = T(0);
      }
      const int nv = static_cast<int>((w + kLanes - 1) / kLanes);
      for (int64_t i0 = r0; i0 < r1; i0 += kRows) {
        const int64_t h = std::min<int64_t>(kRows, r1 - i0);
        // Pack a[i0:i0+h, :] as K x kRows, zero-padded.
        for (int64_t k = 0; k < K; ++k) {
          for (int64_t r = 0; r < kRows; ++r) {
            const int64_t i = i0 + r;
            ap[k * kRows + r] = r < h ? (s.ta ? a[k * M + i] : a[i * K + k]) : T(0);
          }
        }
        switch (nv) {
          case 1: Tile<1>(ap, bp, K, out); break;
          case 2: Tile<2>(ap, bp, K, out); break;
#if defined(__AVX512F__)
          case 3: Tile<3>(ap, bp, K, out); break;
          default: Tile<4>(ap, bp, K, out); break;
#else
          default: Tile<2>(ap, bp, K, out); break;
#endif
        }
        for (int64_t r = 0; r < h; ++r)
          std::memcpy(c + (i0 + r) * N + j0, out + r * kPanel, w * sizeof(T));
      }
    }
  }

  static void Batch(const Shape& s, int64_t batch, const T* a, const T* b, T* c,
                    ffi::ThreadPool& pool, int64_t threads) {
    const int64_t blocks = (s.M + kUnitRows - 1) / kUnitRows;
    const int64_t total = batch * blocks;
    auto unit = [s, blocks, a, b, c](int64_t u) {
      thread_local std::vector<T> scratch;
      const size_t need = static_cast<size_t>(s.K) * (kPanel + kRows);
      if (scratch.size() < need) scratch.resize(need);
      const int64_t i = u / blocks, r0 = (u % blocks) * kUnitRows;
      Rows(s, a + i * s.M * s.K, b + i * s.K * s.N, c + i * s.M * s.N, r0,
           std::min(s.M, r0 + kUnitRows), scratch.data(), scratch.data() + s.K * kPanel);
    };
    Parallel(pool, threads, total, unit);
  }
};

ffi::Error Run(ffi::ThreadPool pool, ffi::AnyBuffer a, ffi::AnyBuffer b,
               ffi::Result<ffi::AnyBuffer> c, bool transpose_a, bool transpose_b,
               int64_t threads) {
  using DT = ffi::DataType;
  const auto ad = a.dimensions(), bd = b.dimensions(), cd = c->dimensions();
  const DT t = a.element_type();
  const size_t n = ad.size();
  bool ok = n >= 2 && bd.size() == n && cd.size() == n && b.element_type() == t &&
            c->element_type() == t && (t == DT::F32 || t == DT::F64);
  int64_t batch = 1;
  for (size_t i = 0; ok && i + 2 < n; ++i) {
    ok = ad[i] == bd[i] && ad[i] == cd[i];
    batch *= ad[i];
  }
  if (!ok) {
    return ffi::Error::InvalidArgument(
        "ssm matmul kernel: a, b and c must be float32 or float64 of one dtype and "
        "rank, with equal leading (batch) dimensions");
  }
  const int64_t M = transpose_a ? ad[n - 1] : ad[n - 2];
  const int64_t K = transpose_a ? ad[n - 2] : ad[n - 1];
  const int64_t N = transpose_b ? bd[n - 2] : bd[n - 1];
  const int64_t Kb = transpose_b ? bd[n - 1] : bd[n - 2];
  if (Kb != K || cd[n - 2] != M || cd[n - 1] != N) {
    return ffi::Error::InvalidArgument(
        "ssm matmul kernel: op(a) must be (M, K), op(b) (K, N) and c (M, N)");
  }
  if (batch * M * N == 0) return ffi::Error::Success();
  if (K == 0) {
    std::memset(c->untyped_data(), 0, c->size_bytes());
    return ffi::Error::Success();
  }
  if (t == DT::F32) {
    Kernel<float>::Batch({M, K, N, transpose_a, transpose_b}, batch,
                         static_cast<const float*>(a.untyped_data()),
                         static_cast<const float*>(b.untyped_data()),
                         static_cast<float*>(c->untyped_data()), pool, threads);
  } else {
    Kernel<double>::Batch({M, K, N, transpose_a, transpose_b}, batch,
                          static_cast<const double*>(a.untyped_data()),
                          static_cast<const double*>(b.untyped_data()),
                          static_cast<double*>(c->untyped_data()), pool, threads);
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(SsmMatmul, Run,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()  // a
                                  .Arg<ffi::AnyBuffer>()  // b
                                  .Ret<ffi::AnyBuffer>()  // c
                                  .Attr<bool>("transpose_a")
                                  .Attr<bool>("transpose_b")
                                  .Attr<int64_t>("threads"));
