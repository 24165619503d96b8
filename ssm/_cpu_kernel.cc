// The diagonal linear recurrence on CPU, as an XLA FFI custom call.
//
// In processing order p = 0, 1, ..., T-1 (time t = p, or t = T-1-p when `reverse`):
//
//     h[t] = m[p] * h[t'] + b[t],     h[t'] = h0 at p = 0,
//
// where t' is the previous time in processing order and m[p] = a[t] (`shift` false)
// or a[t'] with m[0] = 1 (`shift` true: the transpose of a scan, g[t] = ct[t] +
// a[t+1] g[t+1], without a shifted copy of `a`). `b` and `h` are (T, D) row-major,
// `h0` is (D,), `a` is (T, Da) or (1, Da) (time-invariant) with column j of `b`
// decayed by column j % Da of `a`; all of one dtype: f32, f64, c64 or c128.
//
// Why a kernel of our own: XLA's CPU loop zero-fills its output and writes it row by
// row through the cache, and runs on one thread. Here the columns are split across
// threads (every column is an independent recurrence) and, for outputs larger than
// the cache, rows are written with non-temporal stores, which skip reading the
// destination lines in first. The state of a block of columns lives in registers.
// See scripts/bench_scan.py and the README for the measurements.

#include <algorithm>
#include <complex>
#include <type_traits>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>

#if defined(__AVX__)
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

template <typename F>
struct Vec {
  static constexpr int kLanes = 32 / sizeof(F);
  typedef F type __attribute__((vector_size(32)));
};

template <typename F>
inline typename Vec<F>::type Load(const F* p) {
  typename Vec<F>::type v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

template <typename F>
inline void Store(F* p, typename Vec<F>::type v, bool nontemporal) {
#if defined(__AVX__)
  if (nontemporal && (reinterpret_cast<uintptr_t>(p) & 31) == 0) {
    if constexpr (sizeof(F) == 4) {
      _mm256_stream_ps(reinterpret_cast<float*>(p), reinterpret_cast<__m256&>(v));
    } else {
      _mm256_stream_pd(reinterpret_cast<double*>(p), reinterpret_cast<__m256d&>(v));
    }
    return;
  }
#endif
  (void)nontemporal;
  std::memcpy(p, &v, sizeof(v));
}

constexpr int kVectors = 8;  // vectors of state per block of columns

struct Problem {
  int64_t T, D;   // b and h are (T, D)
  int64_t Ta, Da; // a is (Ta, Da): Ta is T or 1 (time-invariant); column j of b
                  // takes column j % Da of a (a broadcast over leading state axes)
  bool reverse, shift, nontemporal;
};

template <typename F>
struct IsReal : std::is_floating_point<F> {};

// Columns [c0, c1) of the recurrence.
template <typename F>
void Columns(const Problem& pr, const F* __restrict a, const F* __restrict b,
             const F* __restrict h0, F* __restrict h, int64_t c0, int64_t c1) {
  const int64_t T = pr.T, D = pr.D, Da = pr.Da;
  const int64_t dir = pr.reverse ? -1 : 1;
  const int64_t t0 = pr.reverse ? T - 1 : 0;
  const int64_t a_step = pr.Ta == 1 ? 0 : Da;  // a's row stride in time
  int64_t j0 = c0;
  if constexpr (IsReal<F>::value) {
    using V = typename Vec<F>::type;
    constexpr int64_t kBlock = kVectors * Vec<F>::kLanes;
    // Whole blocks of columns, the state in registers, when a block of b's columns
    // meets a contiguous block of a's.
    if (Da == D || Da % kBlock == 0) {
      for (; j0 + kBlock <= c1; j0 += kBlock) {
        V s[kVectors];
        for (int k = 0; k < kVectors; ++k) s[k] = Load(h0 + j0 + k * Vec<F>::kLanes);
        const int64_t ja = j0 % Da;
        for (int64_t p = 0, t = t0; p < T; ++p, t += dir) {
          const int64_t row = t * D + j0;
          const F* m = a + (pr.shift ? (t - dir) : t) * a_step + ja;
          const bool unit = pr.shift && p == 0;
          for (int k = 0; k < kVectors; ++k) {
            const int64_t o = k * Vec<F>::kLanes;
            const V bv = Load(b + row + o);
            s[k] = unit ? s[k] + bv : Load(m + o) * s[k] + bv;
            Store(h + row + o, s[k], pr.nontemporal);
          }
        }
      }
    }
  }
  // The remaining columns (complex ones, or fewer than a block), a row at a time.
  if (j0 < c1) {
    const int64_t w = c1 - j0;
    std::vector<F> s(h0 + j0, h0 + c1);
    std::vector<int64_t> ja(w);
    for (int64_t j = 0; j < w; ++j) ja[j] = (j0 + j) % Da;
    for (int64_t p = 0, t = t0; p < T; ++p, t += dir) {
      const int64_t row = t * D + j0;
      const F* m = a + (pr.shift ? (t - dir) : t) * a_step;
      if (pr.shift && p == 0) {
        for (int64_t j = 0; j < w; ++j) h[row + j] = s[j] = s[j] + b[row + j];
      } else {
        for (int64_t j = 0; j < w; ++j) h[row + j] = s[j] = m[ja[j]] * s[j] + b[row + j];
      }
    }
  }
#if defined(__AVX__)
  if (pr.nontemporal) _mm_sfence();
#endif
}

template <ffi::DataType DT>
ffi::Error Run(ffi::Buffer<DT> a, ffi::Buffer<DT> b, ffi::Buffer<DT> h0,
               ffi::ResultBuffer<DT> h, bool reverse, bool shift, bool nontemporal,
               int64_t threads) {
  using F = ffi::NativeType<DT>;
  auto dims = b.dimensions();
  auto adims = a.dimensions();
  if (dims.size() != 2 || adims.size() != 2 || h0.element_count() != dims[1] ||
      (adims[0] != dims[0] && adims[0] != 1) || adims[1] < 1 || dims[1] % adims[1] != 0) {
    return ffi::Error::InvalidArgument(
        "ssm linear scan kernel: b must be (T, D), a (T or 1, Da) with Da dividing D, "
        "h0 (D,)");
  }
  const Problem pr{dims[0], dims[1], adims[0], adims[1], reverse, shift, nontemporal};
  if (pr.T == 0 || pr.D == 0) return ffi::Error::Success();
  const F* pa = a.typed_data();
  const F* pb = b.typed_data();
  const F* ph0 = h0.typed_data();
  F* ph = h->typed_data();
  // Split whole blocks of 64 columns across the threads.
  constexpr int64_t kBlock = 64;
  const int64_t blocks = (pr.D + kBlock - 1) / kBlock;
  const int64_t n = std::max<int64_t>(1, std::min(threads, blocks));
  std::vector<std::thread> pool;
  int64_t start = 0;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t stop = std::min(pr.D, (blocks * (i + 1) / n) * kBlock);
    if (i + 1 == n) {
      Columns<F>(pr, pa, pb, ph0, ph, start, stop);
    } else {
      pool.emplace_back(Columns<F>, std::cref(pr), pa, pb, ph0, ph, start, stop);
    }
    start = stop;
  }
  for (auto& t : pool) t.join();
  return ffi::Error::Success();
}

}  // namespace

#define SSM_DEFINE(NAME, DT)                                  \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(NAME, Run<DT>,                \
                                ffi::Ffi::Bind()              \
                                    .Arg<ffi::Buffer<DT>>()   \
                                    .Arg<ffi::Buffer<DT>>()   \
                                    .Arg<ffi::Buffer<DT>>()   \
                                    .Ret<ffi::Buffer<DT>>()   \
                                    .Attr<bool>("reverse")    \
                                    .Attr<bool>("shift")      \
                                    .Attr<bool>("nontemporal") \
                                    .Attr<int64_t>("threads"));

SSM_DEFINE(SsmLinearScanF32, ffi::F32)
SSM_DEFINE(SsmLinearScanF64, ffi::F64)
SSM_DEFINE(SsmLinearScanC64, ffi::C64)
SSM_DEFINE(SsmLinearScanC128, ffi::C128)
