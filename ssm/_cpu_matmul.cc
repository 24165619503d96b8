// Batched small matrix products on CPU, as an XLA FFI custom call, threaded.
//
//     c[i] = op(a[i]) @ op(b[i]),   i over the batch,
//
// with a (batch, M, K), or (batch, K, M) when `transpose_a`, b (batch, K, N), or
// (batch, N, K) when `transpose_b`, c (batch, M, N), all row-major, float32 or
// float64. The chunked operators (`_gla.py`, `_delta.py`) spend most of their time in
// products of this size (tens of rows and columns, a batch of heads times chunks).
// XLA's CPU backend runs those with a transposed left operand 2-3x slower than plain
// ones, and small batched ones in a slow generic loop (README, "Compiled CPU
// products"). Here a register-blocked micro-kernel reads a and b in place (packing
// only transposed or ragged panels of b), and the work units (one product, several
// small ones, or 96 rows of a large one) are shared with XLA's intra-op threads.

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
constexpr int64_t kUnitRows = 96;       // at most this many rows of c per work unit
constexpr int64_t kUnitMacs = 1 << 15;  // small products are grouped into units this big

template <typename T>
struct Kernel {
  typedef T V __attribute__((vector_size(kVecBytes)));
  static constexpr int kLanes = kVecBytes / sizeof(T);
  static constexpr int kPanel = kPanelVectors * kLanes;  // columns per panel

  // Rows i of c[:, 0 : NV lanes) for i < R:  sum_k a[i * ars + k * aks] * b[k * bks, :],
  // with a's rows from `rows` on replaced by its last valid one (computed, not
  // stored). c's columns from `w` on are not stored (b is zero-padded there).
  template <int R, int NV>
  static void Tile(const T* a, int64_t ars, int64_t aks, int rows, const T* b, int64_t bks,
                   int64_t K, T* c, int64_t ldc, int64_t w) {
    const T* ar[R];
    for (int r = 0; r < R; ++r) ar[r] = a + std::min(r, rows - 1) * ars;
    V acc[R][NV];
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < NV; ++j) acc[r][j] = V{};
    for (int64_t k = 0; k < K; ++k) {
      V bv[NV];
      for (int j = 0; j < NV; ++j) std::memcpy(&bv[j], b + k * bks + j * kLanes, kVecBytes);
      for (int r = 0; r < R; ++r) {
        const T x = ar[r][k * aks];
        for (int j = 0; j < NV; ++j) acc[r][j] += x * bv[j];
      }
    }
    if (w == NV * kLanes) {
      for (int r = 0; r < rows; ++r)
        for (int j = 0; j < NV; ++j) std::memcpy(c + r * ldc + j * kLanes, &acc[r][j], kVecBytes);
    } else {
      for (int r = 0; r < rows; ++r) {
        T out[NV * kLanes];
        for (int j = 0; j < NV; ++j) std::memcpy(out + j * kLanes, &acc[r][j], kVecBytes);
        std::memcpy(c + r * ldc, out, w * sizeof(T));
      }
    }
  }

  // Tile<R, NV> for R >= rows (1, 2, 4 or 6) and NV vectors of columns.
  template <int NV>
  static void Rows(const T* a, int64_t ars, int64_t aks, int rows, const T* b, int64_t bks,
                   int64_t K, T* c, int64_t ldc, int64_t w) {
    if (rows <= 1) {
      Tile<1, NV>(a, ars, aks, rows, b, bks, K, c, ldc, w);
    } else if (rows <= 2) {
      Tile<2, NV>(a, ars, aks, rows, b, bks, K, c, ldc, w);
    } else if (rows <= 4) {
      Tile<4, NV>(a, ars, aks, rows, b, bks, K, c, ldc, w);
    } else {
      Tile<6, NV>(a, ars, aks, rows, b, bks, K, c, ldc, w);
    }
  }

  struct Shape {
    int64_t M, K, N;
    bool ta, tb;
  };

  // c[i, j] = a[i, :] . b[j, :] with rows of a and b contiguous (a @ b^T), as dot
  // products along K: for few columns, where packing b for the tiles costs more.
  static void Dots(const T* a, const T* b, T* c, int64_t r0, int64_t r1, int64_t K,
                   int64_t N) {
    const int64_t Kv = K - K % kLanes;
    for (int64_t i = r0; i < r1; ++i) {
      const T* ai = a + i * K;
      for (int64_t j = 0; j < N; ++j) {
        const T* bj = b + j * K;
        V acc = V{};
        for (int64_t k = 0; k < Kv; k += kLanes) {
          V x, y;
          std::memcpy(&x, ai + k, kVecBytes);
          std::memcpy(&y, bj + k, kVecBytes);
          acc += x * y;
        }
        T sum = T(0);
        for (int l = 0; l < kLanes; ++l) sum += acc[l];
        for (int64_t k = Kv; k < K; ++k) sum += ai[k] * bj[k];
        c[i * N + j] = sum;
      }
    }
  }

  // Rows [r0, r1) of one product; `bp` is scratch of K x kPanel.
  static void Product(const Shape& s, const T* a, const T* b, T* c, int64_t r0, int64_t r1,
                      T* bp) {
    const int64_t M = s.M, K = s.K, N = s.N;
    if (s.tb && !s.ta && N < kLanes && K >= kLanes) {
      Dots(a, b, c, r0, r1, K, N);
      return;
    }
    const int64_t ars = s.ta ? 1 : K, aks = s.ta ? M : 1;
    for (int64_t j0 = 0; j0 < N; j0 += kPanel) {
      const int64_t w = std::min<int64_t>(kPanel, N - j0);
      const int nv = static_cast<int>((w + kLanes - 1) / kLanes);
      const int64_t width = nv * kLanes;
      const T* panel;
      int64_t bks;
      if (!s.tb && w == width) {  // b's rows hold whole vectors: read in place
        panel = b + j0;
        bks = N;
      } else {  // pack b[:, j0:j0+w] as K x width, zero-padded
        for (int64_t k = 0; k < K; ++k) {
          T* row = bp + k * width;
          if (!s.tb) {
            std::memcpy(row, b + k * N + j0, w * sizeof(T));
          }
          for (int64_t j = w; j < width; ++j) row[j] = T(0);
        }
        if (s.tb) {
          for (int64_t j = 0; j < w; ++j) {
            const T* col = b + (j0 + j) * K;
            for (int64_t k = 0; k < K; ++k) bp[k * width + j] = col[k];
          }
        }
        panel = bp;
        bks = width;
      }
      Block(a + r0 * ars, ars, aks, r1 - r0, panel, bks, K, c + r0 * N + j0, N, nv, w);
    }
  }

  // Rows [0, M) of c[:, 0:w) = a @ panel, a's row i and column k at a[i * ars + k * aks],
  // the panel K x (nv vectors) with rows bks apart, whole vectors readable.
  static void Block(const T* a, int64_t ars, int64_t aks, int64_t M, const T* panel,
                    int64_t bks, int64_t K, T* c, int64_t ldc, int nv, int64_t w) {
    for (int64_t i0 = 0; i0 < M; i0 += 6) {
      const int rows = static_cast<int>(std::min<int64_t>(6, M - i0));
      const T* ai = a + i0 * ars;
      T* ci = c + i0 * ldc;
      switch (nv) {
        case 1: Rows<1>(ai, ars, aks, rows, panel, bks, K, ci, ldc, w); break;
#if defined(__AVX512F__)
        case 2: Rows<2>(ai, ars, aks, rows, panel, bks, K, ci, ldc, w); break;
        case 3: Rows<3>(ai, ars, aks, rows, panel, bks, K, ci, ldc, w); break;
        default: Rows<4>(ai, ars, aks, rows, panel, bks, K, ci, ldc, w); break;
#else
        default: Rows<2>(ai, ars, aks, rows, panel, bks, K, ci, ldc, w); break;
#endif
      }
    }
  }

  static void Batch(const Shape& s, int64_t batch, const T* a, const T* b, T* c,
                    ffi::ThreadPool& pool, int64_t threads) {
    // A unit is a block of rows of one product, or several whole small products.
    const int64_t blocks = (s.M + kUnitRows - 1) / kUnitRows;
    const int64_t macs = s.M * s.K * s.N;
    const int64_t per = blocks > 1 ? 1 : std::max<int64_t>(1, kUnitMacs / std::max<int64_t>(1, macs));
    const int64_t total = blocks > 1 ? batch * blocks : (batch + per - 1) / per;
    auto unit = [s, blocks, per, batch, a, b, c](int64_t u) {
      thread_local std::vector<T> scratch;
      const size_t need = static_cast<size_t>(s.K) * kPanel;
      if (scratch.size() < need) scratch.resize(need);
      const int64_t first = blocks > 1 ? u / blocks : u * per;
      const int64_t last = blocks > 1 ? first + 1 : std::min(batch, first + per);
      for (int64_t i = first; i < last; ++i) {
        const int64_t r0 = blocks > 1 ? (u % blocks) * kUnitRows : 0;
        Product(s, a + i * s.M * s.K, b + i * s.K * s.N, c + i * s.M * s.N, r0,
                std::min(s.M, r0 + kUnitRows), scratch.data());
      }
    };
    Parallel(pool, threads, total, unit);
  }

  // The arguments of `Chain`; arrays row-major, `lead` independent sequences of `n`
  // links (a leading batch times the heads, the links in between: (L, n, H, ...)).
  struct Links {
    const T *y0, *a, *b, *gamma, *c, *s0;
    T *states, *y, *last;
    int64_t L, n, H, C, dk, dv, ld0, lda, ldb, a_off, b_off;
    T sign_a, sign_b;
    bool reverse, has_c;
  };

  // For each sequence, the links i in order (or reversed), from s = s0 (dk x dv):
  //
  //     states[i] = s,  y[i] = y0[i] + sign_a a[i] s,  s = gamma[i] s + sign_b b[i]^T y[i] (+ c[i])
  //
  // with a[i], b[i] (C x dk) read at column offsets of wider rows, and last = s. A work
  // unit is one sequence's columns in one panel (columns of s never mix), its s and
  // y kept in zero-padded scratch.
  static void Chain(const Links& g, ffi::ThreadPool& pool, int64_t threads) {
    const int64_t panels = (g.dv + kPanel - 1) / kPanel;
    auto unit = [g, panels](int64_t u) {
      const int64_t p = u % panels, lh = u / panels, l = lh / g.H, h = lh % g.H;
      const int64_t j0 = p * kPanel, w = std::min<int64_t>(kPanel, g.dv - j0);
      const int nv = static_cast<int>((w + kLanes - 1) / kLanes);
      const int64_t width = nv * kLanes, dk = g.dk, dv = g.dv, C = g.C;
      thread_local std::vector<T> scratch;
      const size_t need = static_cast<size_t>((2 * dk + C) * width);
      if (scratch.size() < need) scratch.resize(need);
      T* s = scratch.data();
      T* t = s + dk * width;  // b^T y
      T* y = t + dk * width;
      std::fill(s, s + need, T(0));
      const T* s0 = g.s0 + lh * dk * dv + j0;
      for (int64_t r = 0; r < dk; ++r) std::memcpy(s + r * width, s0 + r * dv, w * sizeof(T));
      for (int64_t step = 0; step < g.n; ++step) {
        const int64_t i = g.reverse ? g.n - 1 - step : step;
        const int64_t link = (l * g.n + i) * g.H + h;
        T* state = g.states + link * dk * dv + j0;
        for (int64_t r = 0; r < dk; ++r)
          std::memcpy(state + r * dv, s + r * width, w * sizeof(T));
        Block(g.a + link * C * g.lda + g.a_off, g.lda, 1, C, s, width, dk, y, width, nv, width);
        const T* y0 = g.y0 + link * C * g.ld0 + j0;
        T* yo = g.y + link * C * dv + j0;
        for (int64_t r = 0; r < C; ++r) {
          T* yr = y + r * width;
          for (int64_t j = 0; j < w; ++j) yr[j] = y0[r * g.ld0 + j] + g.sign_a * yr[j];
          std::memcpy(yo + r * dv, yr, w * sizeof(T));
        }
        Block(g.b + link * C * g.ldb + g.b_off, 1, g.ldb, dk, y, width, C, t, width, nv, width);
        const T gamma = g.gamma[link];
        const T* c = g.has_c ? g.c + link * dk * dv + j0 : nullptr;
        for (int64_t r = 0; r < dk; ++r) {
          T* sr = s + r * width;
          const T* tr = t + r * width;
          for (int64_t j = 0; j < w; ++j) sr[j] = gamma * sr[j] + g.sign_b * tr[j];
          if (c)
            for (int64_t j = 0; j < w; ++j) sr[j] += c[r * dv + j];
        }
      }
      T* last = g.last + lh * dk * dv + j0;
      for (int64_t r = 0; r < dk; ++r) std::memcpy(last + r * dv, s + r * width, w * sizeof(T));
    };
    Parallel(pool, threads, g.L * g.H * panels, unit);
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

template <typename T>
void RunChainAs(ffi::ThreadPool& pool, const ffi::AnyBuffer& y0, const ffi::AnyBuffer& a,
                const ffi::AnyBuffer& b, const ffi::AnyBuffer& gamma, const ffi::AnyBuffer& c,
                const ffi::AnyBuffer& s0, ffi::AnyBuffer& states, ffi::AnyBuffer& y,
                ffi::AnyBuffer& last, int64_t L, int64_t n, int64_t H, int64_t C, int64_t dk,
                int64_t dv, int64_t a_offset, int64_t b_offset, bool negate_a, bool negate_b,
                bool reverse, bool has_c, int64_t threads) {
  const auto ld = [](const ffi::AnyBuffer& x) { return x.dimensions().back(); };
  typename Kernel<T>::Links g{
      static_cast<const T*>(y0.untyped_data()), static_cast<const T*>(a.untyped_data()),
      static_cast<const T*>(b.untyped_data()), static_cast<const T*>(gamma.untyped_data()),
      static_cast<const T*>(c.untyped_data()), static_cast<const T*>(s0.untyped_data()),
      static_cast<T*>(states.untyped_data()), static_cast<T*>(y.untyped_data()),
      static_cast<T*>(last.untyped_data()), L, n, H, C, dk, dv, ld(y0), ld(a), ld(b),
      a_offset, b_offset, negate_a ? T(-1) : T(1), negate_b ? T(-1) : T(1), reverse, has_c};
  Kernel<T>::Chain(g, pool, threads);
}

// Shapes (L... for any leading batch): y0 (L..., n, H, C, >= dv), a and b (L..., n, H,
// C, >= offset + dk), gamma (L..., n, H), c (L..., n, H, dk, dv) if has_c, s0 (L..., H,
// dk, dv); results states (L..., n, H, dk, dv), y (L..., n, H, C, dv), last as s0.
ffi::Error RunChain(ffi::ThreadPool pool, ffi::AnyBuffer y0, ffi::AnyBuffer a,
                    ffi::AnyBuffer b, ffi::AnyBuffer gamma, ffi::AnyBuffer c,
                    ffi::AnyBuffer s0, ffi::Result<ffi::AnyBuffer> states,
                    ffi::Result<ffi::AnyBuffer> y, ffi::Result<ffi::AnyBuffer> last,
                    int64_t a_offset, int64_t b_offset, bool negate_a, bool negate_b,
                    bool reverse, bool has_c, int64_t threads) {
  using DT = ffi::DataType;
  const DT t = y0.element_type();
  const auto yd = y0.dimensions(), sd = s0.dimensions();
  const size_t r = yd.size();
  bool ok = r >= 4 && sd.size() == r - 1 && (t == DT::F32 || t == DT::F64);
  for (const ffi::AnyBuffer* x : {&a, &b, &gamma, &c, &s0})
    ok = ok && x->element_type() == t;
  for (const ffi::AnyBuffer* x : {&*states, &*y, &*last}) ok = ok && x->element_type() == t;
  int64_t L = 1, n = 0, H = 0, C = 0, dk = 0, dv = 0;
  std::vector<int64_t> lead;
  if (ok) {
    lead.assign(yd.begin(), yd.end() - 4);
    for (int64_t d : lead) L *= d;
    n = yd[r - 4], H = yd[r - 3], C = yd[r - 2], dk = sd[r - 3], dv = sd[r - 2];
  }
  // x's shape is lead + tail, with its last dimension at least `last` if given.
  const auto is = [&lead](ffi::Span<const int64_t> x, std::vector<int64_t> tail,
                          int64_t last = -1) {
    std::vector<int64_t> want(lead);
    want.insert(want.end(), tail.begin(), tail.end());
    std::vector<int64_t> got(x.begin(), x.end());
    if (last >= 0) {  // the last dimension only bounded below
      if (got.size() != want.size() || got.back() < last) return false;
      got.back() = want.back();
    }
    return got == want;
  };
  ok = ok && is(yd, {n, H, C, 0}, dv) && is(sd, {H, dk, dv}) &&
       is(a.dimensions(), {n, H, C, 0}, a_offset + dk) &&
       is(b.dimensions(), {n, H, C, 0}, b_offset + dk) && is(gamma.dimensions(), {n, H}) &&
       (!has_c || is(c.dimensions(), {n, H, dk, dv})) &&
       is(states->dimensions(), {n, H, dk, dv}) && is(y->dimensions(), {n, H, C, dv}) &&
       is(last->dimensions(), {H, dk, dv}) && a_offset >= 0 && b_offset >= 0;
  if (!ok) {
    return ffi::Error::InvalidArgument(
        "ssm delta chain kernel: arrays must be float32 or float64 of one dtype, y0 "
        "(..., n, H, C, >= dv), a and b (..., n, H, C, >= offset + dk), gamma (..., n, "
        "H), c (..., n, H, dk, dv), s0 (..., H, dk, dv)");
  }
  if (L * H * dv == 0) return ffi::Error::Success();
  if (t == DT::F32) {
    RunChainAs<float>(pool, y0, a, b, gamma, c, s0, *states, *y, *last, L, n, H, C, dk, dv,
                      a_offset, b_offset, negate_a, negate_b, reverse, has_c, threads);
  } else {
    RunChainAs<double>(pool, y0, a, b, gamma, c, s0, *states, *y, *last, L, n, H, C, dk, dv,
                       a_offset, b_offset, negate_a, negate_b, reverse, has_c, threads);
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(SsmDeltaChain, RunChain,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()  // y0
                                  .Arg<ffi::AnyBuffer>()  // a
                                  .Arg<ffi::AnyBuffer>()  // b
                                  .Arg<ffi::AnyBuffer>()  // gamma
                                  .Arg<ffi::AnyBuffer>()  // c
                                  .Arg<ffi::AnyBuffer>()  // s0
                                  .Ret<ffi::AnyBuffer>()  // states
                                  .Ret<ffi::AnyBuffer>()  // y
                                  .Ret<ffi::AnyBuffer>()  // last
                                  .Attr<int64_t>("a_offset")
                                  .Attr<int64_t>("b_offset")
                                  .Attr<bool>("negate_a")
                                  .Attr<bool>("negate_b")
                                  .Attr<bool>("reverse")
                                  .Attr<bool>("has_c")
                                  .Attr<int64_t>("threads"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(SsmMatmul, Run,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()  // a
                                  .Arg<ffi::AnyBuffer>()  // b
                                  .Ret<ffi::AnyBuffer>()  // c
                                  .Attr<bool>("transpose_a")
                                  .Attr<bool>("transpose_b")
                                  .Attr<int64_t>("threads"));
