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

// Complex numbers are handled as interleaved (re, im) pairs of reals; these act on a
// vector of such pairs.
#if defined(__clang__)
#define SSM_SHUFFLE8(v, i0, i1, i2, i3, i4, i5, i6, i7) \
  __builtin_shufflevector(v, v, i0, i1, i2, i3, i4, i5, i6, i7)
#define SSM_SHUFFLE4(v, i0, i1, i2, i3) __builtin_shufflevector(v, v, i0, i1, i2, i3)
#else
#define SSM_SHUFFLE8(v, i0, i1, i2, i3, i4, i5, i6, i7)                              \
  __builtin_shuffle(v, (int32_t __attribute__((vector_size(32)))){i0, i1, i2, i3, \
                                                                  i4, i5, i6, i7})
#define SSM_SHUFFLE4(v, i0, i1, i2, i3) \
  __builtin_shuffle(v, (int64_t __attribute__((vector_size(32)))){i0, i1, i2, i3})
#endif

// m * s, elementwise (real) or as complex pairs.
template <typename R, bool kComplex>
inline typename Vec<R>::type Mul(typename Vec<R>::type m, typename Vec<R>::type s) {
  if constexpr (!kComplex) {
    return m * s;
  } else if constexpr (sizeof(R) == 4) {
    const auto re = SSM_SHUFFLE8(m, 0, 0, 2, 2, 4, 4, 6, 6);
    const auto im = SSM_SHUFFLE8(m, 1, 1, 3, 3, 5, 5, 7, 7);
    const auto sw = SSM_SHUFFLE8(s, 1, 0, 3, 2, 5, 4, 7, 6);
    const typename Vec<R>::type sign = {-1, 1, -1, 1, -1, 1, -1, 1};
    return re * s + im * sw * sign;
  } else {
    const auto re = SSM_SHUFFLE4(m, 0, 0, 2, 2);
    const auto im = SSM_SHUFFLE4(m, 1, 1, 3, 3);
    const auto sw = SSM_SHUFFLE4(s, 1, 0, 3, 2);
    const typename Vec<R>::type sign = {-1, 1, -1, 1};
    return re * s + im * sw * sign;
  }
}

// Columns [c0, c1) of the recurrence, on reals: with kComplex, D, Da, c0 and c1 count
// reals and every column pair (2j, 2j+1) is one complex column.
template <typename R, bool kComplex>
void Columns(const Problem& pr, const R* __restrict a, const R* __restrict b,
             const R* __restrict h0, R* __restrict h, int64_t c0, int64_t c1) {
  using V = typename Vec<R>::type;
  constexpr int64_t kLanes = Vec<R>::kLanes;
  constexpr int64_t kBlock = kVectors * kLanes;
  const int64_t T = pr.T, D = pr.D, Da = pr.Da;
  const int64_t dir = pr.reverse ? -1 : 1;
  const int64_t t0 = pr.reverse ? T - 1 : 0;
  const int64_t a_step = pr.Ta == 1 ? 0 : Da;  // a's row stride in time
  int64_t j0 = c0;
  // Whole blocks of columns, the state in registers, when a block of b's columns
  // meets a contiguous block of a's.
  if (Da == D || Da % kBlock == 0) {
    for (; j0 + kBlock <= c1; j0 += kBlock) {
      V s[kVectors];
      for (int k = 0; k < kVectors; ++k) s[k] = Load(h0 + j0 + k * kLanes);
      const int64_t ja = j0 % Da;
      for (int64_t p = 0, t = t0; p < T; ++p, t += dir) {
        const int64_t row = t * D + j0;
        const R* m = a + (pr.shift ? (t - dir) : t) * a_step + ja;
        const bool unit = pr.shift && p == 0;
        for (int k = 0; k < kVectors; ++k) {
          const int64_t o = k * kLanes;
          const V bv = Load(b + row + o);
          s[k] = unit ? s[k] + bv : Mul<R, kComplex>(Load(m + o), s[k]) + bv;
          Store(h + row + o, s[k], pr.nontemporal);
        }
      }
    }
  }
  // The remaining columns (fewer than a block, or an `a` that does not line up with
  // blocks), a row at a time.
  if (j0 < c1) {
    const int64_t w = c1 - j0;
    std::vector<R> s(h0 + j0, h0 + c1);
    std::vector<int64_t> ja(w);
    for (int64_t j = 0; j < w; ++j) ja[j] = (j0 + j) % Da;
    for (int64_t p = 0, t = t0; p < T; ++p, t += dir) {
      const int64_t row = t * D + j0;
      const R* m = a + (pr.shift ? (t - dir) : t) * a_step;
      R* out = h + row;
      const R* in = b + row;
      if (pr.shift && p == 0) {
        for (int64_t j = 0; j < w; ++j) out[j] = s[j] = s[j] + in[j];
      } else if constexpr (kComplex) {
        for (int64_t j = 0; j < w; j += 2) {
          const R mr = m[ja[j]], mi = m[ja[j] + 1], sr = s[j], si = s[j + 1];
          out[j] = s[j] = mr * sr - mi * si + in[j];
          out[j + 1] = s[j + 1] = mr * si + mi * sr + in[j + 1];
        }
      } else {
        for (int64_t j = 0; j < w; ++j) out[j] = s[j] = m[ja[j]] * s[j] + in[j];
      }
    }
  }
#if defined(__AVX__)
  if (pr.nontemporal) _mm_sfence();
#endif
}

template <typename F>
struct RealOf {
  using type = F;
};
template <typename R>
struct RealOf<std::complex<R>> {
  using type = R;
};

template <ffi::DataType DT>
ffi::Error Run(ffi::Buffer<DT> a, ffi::Buffer<DT> b, ffi::Buffer<DT> h0,
               ffi::ResultBuffer<DT> h, bool reverse, bool shift, bool nontemporal,
               int64_t threads) {
  using F = ffi::NativeType<DT>;
  constexpr bool kComplex = !std::is_floating_point<F>::value;
  using R = typename RealOf<F>::type;
  constexpr int64_t kPer = kComplex ? 2 : 1;  // reals per element
  auto dims = b.dimensions();
  auto adims = a.dimensions();
  if (dims.size() != 2 || adims.size() != 2 || h0.element_count() != dims[1] ||
      (adims[0] != dims[0] && adims[0] != 1) || adims[1] < 1 || dims[1] % adims[1] != 0) {
    return ffi::Error::InvalidArgument(
        "ssm linear scan kernel: b must be (T, D), a (T or 1, Da) with Da dividing D, "
        "h0 (D,)");
  }
  const Problem pr{dims[0], kPer * dims[1], adims[0], kPer * adims[1],
                   reverse, shift, nontemporal};
  if (pr.T == 0 || pr.D == 0) return ffi::Error::Success();
  const R* pa = reinterpret_cast<const R*>(a.typed_data());
  const R* pb = reinterpret_cast<const R*>(b.typed_data());
  const R* ph0 = reinterpret_cast<const R*>(h0.typed_data());
  R* ph = reinterpret_cast<R*>(h->typed_data());
  // Split whole blocks of 64 reals (whole blocks of the kernels) across the threads.
  constexpr int64_t kBlock = 64;
  const int64_t blocks = (pr.D + kBlock - 1) / kBlock;
  const int64_t n = std::max<int64_t>(1, std::min(threads, blocks));
  std::vector<std::thread> pool;
  int64_t start = 0;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t stop = std::min(pr.D, (blocks * (i + 1) / n) * kBlock);
    if (i + 1 == n) {
      Columns<R, kComplex>(pr, pa, pb, ph0, ph, start, stop);
    } else {
      pool.emplace_back(Columns<R, kComplex>, std::cref(pr), pa, pb, ph0, ph, start, stop);
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
