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
// decayed by column j % Da of `a`. The state (h0, h) is f32, f64, c64 or c128; `a`
// and `b` have its dtype, or bf16 for an f32 state (read and widened in the loop).
// Optional `resets`, bool (T,) or (1,): where true the multiplier is 0 (the state
// restarts), read at the multiplier's time.
//
// Why a kernel of our own: XLA's CPU loop zero-fills its output and writes it row by
// row through the cache, and runs on one thread. Here the columns are split across
// threads (every column is an independent recurrence) and, for outputs larger than
// the cache, rows are written with non-temporal stores, which skip reading the
// destination lines in first. Where rows are a whole number of cache lines apart,
// blocks of columns keep their state in registers; elsewhere each thread streams its
// rows one after another with the state in L1 (see `Pass`). See
// scripts/bench_scan.py and the README for the measurements.

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

// bfloat16, stored as its 16 bits (the top half of a float32).
struct BF16 {
  uint16_t bits;
};

// A vector of R lanes from memory holding R, or bfloat16 when R is float.
template <typename R, typename T = R>
inline typename Vec<R>::type Load(const T* p) {
  typename Vec<R>::type v;
  if constexpr (std::is_same<T, BF16>::value) {
    typedef uint16_t Narrow __attribute__((vector_size(16)));
    typedef uint32_t Wide __attribute__((vector_size(32)));
    Narrow raw;
    std::memcpy(&raw, p, sizeof(raw));
    const Wide wide = __builtin_convertvector(raw, Wide) << 16;
    std::memcpy(&v, &wide, sizeof(v));
  } else {
    std::memcpy(&v, p, sizeof(v));
  }
  return v;
}

// One element as R.
template <typename R, typename T>
inline R Get(const T* p) {
  if constexpr (std::is_same<T, BF16>::value) {
    const uint32_t wide = static_cast<uint32_t>(p->bits) << 16;
    R r;
    std::memcpy(&r, &wide, sizeof(r));
    return r;
  } else {
    return *p;
  }
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
  const bool* resets;  // (Tr,) with Tr = T or 1, or null: where true, m = 0
  int64_t Tr;

  // Whether the step whose multiplier is read at time tm restarts.
  bool Reset(int64_t tm) const { return resets != nullptr && resets[Tr == 1 ? 0 : tm]; }
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

// Vectors of columns from j0, every row. With NV > 0, NV vectors whose state stays
// in registers (a block); with NV = 0, `nv` vectors whose state stays in L1, for rows
// that are not a whole number of cache lines apart, where walking memory a block at
// a time (a stride per row) is 2x slower than one stream. `a` is read as contiguous
// vectors (kBroadcast false) or as one value per row broadcast to every lane
// (kBroadcast: a real decay per step, Da = 1).
template <int NV, bool kBroadcast, typename R, bool kComplex, typename TA, typename TB>
void Pass(const Problem& pr, const TA* __restrict a, const TB* __restrict b,
          const R* __restrict h0, R* __restrict h, int64_t j0, int64_t nv) {
  using V = typename Vec<R>::type;
  constexpr int64_t kLanes = Vec<R>::kLanes;
  const int64_t T = pr.T, D = pr.D;
  const int64_t n = NV > 0 ? NV : nv;
  const int64_t dir = pr.reverse ? -1 : 1;
  const int64_t a_step = pr.Ta == 1 ? 0 : pr.Da;  // a's row stride in time
  const int64_t ja = kBroadcast ? 0 : j0 % pr.Da;
  // Non-temporal stores only of whole cache lines: rows a whole number of lines
  // apart, from a line boundary, into a line-aligned output (partial lines written
  // around the cache are far slower than cached stores).
  const bool nt = pr.nontemporal && (D * sizeof(R)) % 64 == 0 &&
                  (j0 * sizeof(R)) % 64 == 0 && (reinterpret_cast<uintptr_t>(h) & 63) == 0;
  V registers[NV > 0 ? NV : 1];
  std::vector<V> spilled(NV > 0 ? 0 : nv);
  V* __restrict s = NV > 0 ? registers : spilled.data();
  for (int64_t k = 0; k < n; ++k) s[k] = Load<R>(h0 + j0 + k * kLanes);
  for (int64_t p = 0, t = pr.reverse ? T - 1 : 0; p < T; ++p, t += dir) {
    const int64_t row = t * D + j0;
    const int64_t tm = pr.shift ? t - dir : t;  // the multiplier's time
    const TA* m = a + tm * a_step + ja;
    if ((pr.shift && p == 0) || pr.Reset(tm)) {  // multiplier 1 (first) or 0
      const bool keep = pr.shift && p == 0;
      for (int64_t k = 0; k < n; ++k) {
        const V bv = Load<R>(b + row + k * kLanes);
        s[k] = keep ? s[k] + bv : bv;
        Store(h + row + k * kLanes, s[k], nt);
      }
      continue;
    }
    V mb{};
    if constexpr (kBroadcast) mb = mb + Get<R>(m);
    for (int64_t k = 0; k < n; ++k) {
      const int64_t o = k * kLanes;
      V mv = mb;
      if constexpr (!kBroadcast) mv = Load<R>(m + o);
      s[k] = Mul<R, kComplex>(mv, s[k]) + Load<R>(b + row + o);
      Store(h + row + o, s[k], nt);
    }
  }
}

// Columns [c0, c1) of the recurrence, on reals: with kComplex, D, Da, c0 and c1 count
// reals and every column pair (2j, 2j+1) is one complex column.
template <typename R, bool kComplex, typename TA, typename TB>
void Columns(const Problem& pr, const TA* __restrict a, const TB* __restrict b,
             const R* __restrict h0, R* __restrict h, int64_t c0, int64_t c1) {
  constexpr int64_t kLanes = Vec<R>::kLanes;
  constexpr int64_t kBlock = kVectors * kLanes;
  const int64_t T = pr.T, D = pr.D, Da = pr.Da;
  int64_t j0 = c0;
  // Vector passes where b's columns meet contiguous columns of a's, or a single real
  // decay per step.
  const bool contiguous = Da == D || Da % kBlock == 0;
  const bool broadcast = Da == 1 && !kComplex;
  if ((contiguous || broadcast) && (D * sizeof(R)) % 64 == 0) {
    // Rows a whole number of cache lines apart: blocks of kVectors vectors with the
    // state in registers, one block after another (measured fastest here).
    for (; j0 + kBlock <= c1; j0 += kBlock) {
      if (broadcast) {
        Pass<kVectors, true, R, kComplex>(pr, a, b, h0, h, j0, kVectors);
      } else {
        Pass<kVectors, false, R, kComplex>(pr, a, b, h0, h, j0, kVectors);
      }
    }
  }
  if (contiguous || broadcast) {
    // Otherwise (and for what is left): every vector of the range, row after row.
    const int64_t nv = (c1 - j0) / kLanes;
    if (nv > 0) {
      if (broadcast) {
        Pass<0, true, R, kComplex>(pr, a, b, h0, h, j0, nv);
      } else {
        Pass<0, false, R, kComplex>(pr, a, b, h0, h, j0, nv);
      }
      j0 += nv * kLanes;
    }
  }
  // The rest (fewer than a vector of columns, or an `a` shared in a way that does not
  // line up with vectors), a row at a time.
  if (j0 < c1) {
    const int64_t w = c1 - j0;
    const int64_t dir = pr.reverse ? -1 : 1;
    const int64_t a_step = pr.Ta == 1 ? 0 : Da;
    std::vector<R> state(h0 + j0, h0 + c1);
    std::vector<int64_t> index(w);
    for (int64_t j = 0; j < w; ++j) index[j] = (j0 + j) % Da;
    R* __restrict s = state.data();
    const int64_t* __restrict ja = index.data();
    for (int64_t p = 0, t = pr.reverse ? T - 1 : 0; p < T; ++p, t += dir) {
      const int64_t row = t * D + j0;
      const int64_t tm = pr.shift ? t - dir : t;
      const TA* __restrict m = a + tm * a_step;
      R* __restrict out = h + row;
      const TB* __restrict in = b + row;
      if (pr.shift && p == 0) {
        for (int64_t j = 0; j < w; ++j) out[j] = s[j] = s[j] + Get<R>(in + j);
      } else if (pr.Reset(tm)) {
        for (int64_t j = 0; j < w; ++j) out[j] = s[j] = Get<R>(in + j);
      } else if constexpr (kComplex) {
        for (int64_t j = 0; j < w; j += 2) {
          const R mr = m[ja[j]], mi = m[ja[j] + 1], sr = s[j], si = s[j + 1];
          out[j] = s[j] = mr * sr - mi * si + in[j];
          out[j + 1] = s[j + 1] = mr * si + mi * sr + in[j + 1];
        }
      } else {
        for (int64_t j = 0; j < w; ++j) {
          out[j] = s[j] = Get<R>(m + ja[j]) * s[j] + Get<R>(in + j);
        }
      }
    }
  }
#if defined(__AVX__)
  if (pr.nontemporal) _mm_sfence();
#endif
}

// Columns split across threads, in whole blocks of 64 reals (whole blocks of the
// vector loop for every type), for state type R and storage types TA, TB.
template <typename R, bool kComplex, typename TA, typename TB>
void Split(const Problem& pr, const void* a, const void* b, const void* h0, void* h,
           int64_t threads) {
  const auto* pa = static_cast<const TA*>(a);
  const auto* pb = static_cast<const TB*>(b);
  const auto* ph0 = static_cast<const R*>(h0);
  auto* ph = static_cast<R*>(h);
  constexpr int64_t kBlock = 64;
  const int64_t blocks = (pr.D + kBlock - 1) / kBlock;
  const int64_t n = std::max<int64_t>(1, std::min(threads, blocks));
  std::vector<std::thread> pool;
  int64_t start = 0;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t stop = std::min(pr.D, (blocks * (i + 1) / n) * kBlock);
    if (i + 1 == n) {
      Columns<R, kComplex, TA, TB>(pr, pa, pb, ph0, ph, start, stop);
    } else {
      pool.emplace_back(Columns<R, kComplex, TA, TB>, std::cref(pr), pa, pb, ph0, ph,
                        start, stop);
    }
    start = stop;
  }
  for (auto& t : pool) t.join();
}

ffi::Error Run(ffi::AnyBuffer a, ffi::AnyBuffer b, ffi::AnyBuffer h0,
               ffi::AnyBuffer resets, ffi::Result<ffi::AnyBuffer> h, bool reverse,
               bool shift, bool nontemporal, bool has_resets, int64_t threads) {
  using DT = ffi::DataType;
  const DT state = h0.element_type(), ta = a.element_type(), tb = b.element_type();
  const bool complex = state == DT::C64 || state == DT::C128;
  const int64_t per = complex ? 2 : 1;  // reals per element
  auto dims = b.dimensions();
  auto adims = a.dimensions();
  if (dims.size() != 2 || adims.size() != 2 || (int64_t)h0.element_count() != dims[1] ||
      (adims[0] != dims[0] && adims[0] != 1) || adims[1] < 1 || dims[1] % adims[1] != 0 ||
      h->element_type() != state || (int64_t)h->element_count() != dims[0] * dims[1]) {
    return ffi::Error::InvalidArgument(
        "ssm linear scan kernel: b must be (T, D), a (T or 1, Da) with Da dividing D, "
        "h0 (D,), h (T, D) of h0's dtype");
  }
  const int64_t Tr = resets.element_count();
  if (has_resets && (resets.element_type() != DT::PRED || (Tr != dims[0] && Tr != 1))) {
    return ffi::Error::InvalidArgument("ssm linear scan kernel: resets must be bool (T,)");
  }
  const Problem pr{dims[0], per * dims[1], adims[0], per * adims[1],
                   reverse, shift, nontemporal,
                   has_resets ? static_cast<const bool*>(resets.untyped_data()) : nullptr,
                   Tr};
  if (pr.T == 0 || pr.D == 0) return ffi::Error::Success();
  const void *pa = a.untyped_data(), *pb = b.untyped_data(), *p0 = h0.untyped_data();
  void* ph = h->untyped_data();
  const bool same = ta == state && tb == state;
  if (same && state == DT::F64) {
    Split<double, false, double, double>(pr, pa, pb, p0, ph, threads);
  } else if (same && state == DT::C64) {
    Split<float, true, float, float>(pr, pa, pb, p0, ph, threads);
  } else if (same && state == DT::C128) {
    Split<double, true, double, double>(pr, pa, pb, p0, ph, threads);
  } else if (state == DT::F32 && (ta == DT::F32 || ta == DT::BF16) &&
             (tb == DT::F32 || tb == DT::BF16)) {
    // float32 state; decays and inputs in float32 or bfloat16.
    if (ta == DT::F32 && tb == DT::F32) {
      Split<float, false, float, float>(pr, pa, pb, p0, ph, threads);
    } else if (ta == DT::F32) {
      Split<float, false, float, BF16>(pr, pa, pb, p0, ph, threads);
    } else if (tb == DT::F32) {
      Split<float, false, BF16, float>(pr, pa, pb, p0, ph, threads);
    } else {
      Split<float, false, BF16, BF16>(pr, pa, pb, p0, ph, threads);
    }
  } else {
    return ffi::Error::InvalidArgument(
        "ssm linear scan kernel: unsupported dtypes (state f32 with f32/bf16 inputs, "
        "or f64, c64, c128 throughout)");
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(SsmLinearScan, Run,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()  // a
                                  .Arg<ffi::AnyBuffer>()  // b
                                  .Arg<ffi::AnyBuffer>()  // h0
                                  .Arg<ffi::AnyBuffer>()  // resets
                                  .Ret<ffi::AnyBuffer>()  // h
                                  .Attr<bool>("reverse")
                                  .Attr<bool>("shift")
                                  .Attr<bool>("nontemporal")
                                  .Attr<bool>("has_resets")
                                  .Attr<int64_t>("threads"));
