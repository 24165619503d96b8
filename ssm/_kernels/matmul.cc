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
#include <cmath>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using ssm_kernels::Parallel;

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

// ------------------------------------------------------------ per-key GLA tree

// exp(x) lane by lane for x <= 0 (the tree's factors): float32 by a Cephes-style
// polynomial after 2^n range reduction (relative error about 2e-7), 0 below -87;
// float64 by std::exp.
template <typename T>
struct Exp;

template <>
struct Exp<float> {
  typedef float V __attribute__((vector_size(kVecBytes)));
  typedef int32_t VI __attribute__((vector_size(kVecBytes)));
  static V Of(V x) {
    const VI under = x < -87.0f;  // lanes whose result underflows: 0
    x = under ? V{} - 87.0f : x;
    const V big = V{} + 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
    V n = (x * 1.44269504088896341f + big) - big;
    V r = x - n * 0.693359375f;
    r = r + n * 2.12194440e-4f;
    V p = V{} + 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    const VI bits = (__builtin_convertvector(n, VI) + 127) << 23;
    V scale;
    std::memcpy(&scale, &bits, sizeof scale);
    return under ? V{} : p * scale;
  }
};

template <>
struct Exp<double> {
  typedef double V __attribute__((vector_size(kVecBytes)));
  static V Of(V x) {
    for (int l = 0; l < static_cast<int>(sizeof(V) / sizeof(double)); ++l) x[l] = std::exp(x[l]);
    return x;
  }
};

// The within-chunk outputs of gated linear attention with a decay per key (`_gla.py`,
// `_intra_per_key` and its derivative), for chunks of C = 2^m steps:
//
//     o[i] = sum_{j <= i} (sum_d q[i, d] k[j, d] exp(b[i, d] - b[j, d])) v[j]
//
// by the same binary tree: the diagonal directly, then at each level the pairs that
// straddle the middle of a block of 2s steps, weighted by exp(b[i] - r) exp(r - b[j])
// with r = b at the end of the block's first half (both factors <= 1). The product
// of the two factors does not depend on r, so neither does the derivative: r is
// held constant. One unit is a chunk of one head, its rows copied to zero-padded
// scratch of whole vectors.
template <typename T>
struct Tree {
  typedef T V __attribute__((vector_size(kVecBytes)));
  static constexpr int kLanes = kVecBytes / sizeof(T);

  static T Dot(const V* x, const V* y, int nv) {
    V acc = V{};
    for (int j = 0; j < nv; ++j) acc += x[j] * y[j];
    T sum = T(0);
    for (int l = 0; l < kLanes; ++l) sum += acc[l];
    return sum;
  }

  // The C rows of x (w wide, contiguous) into scratch rows of nv whole vectors.
  static void Load(V* dst, const T* x, int64_t C, int64_t w, int nv) {
    for (int64_t i = 0; i < C; ++i) {
      V* row = dst + i * nv;
      for (int j = 0; j < nv; ++j) row[j] = V{};
      std::memcpy(row, x + i * w, w * sizeof(T));
    }
  }

  static void Store(T* x, const V* src, int64_t C, int64_t w, int nv) {
    for (int64_t i = 0; i < C; ++i) std::memcpy(x + i * w, src + i * nv, w * sizeof(T));
  }

  // q, k, b: (C, dk); v, o: (C, dv); with do given, the derivative instead: dq, dk,
  // db (C, dk) and dv (C, dv) (b's cotangent, the cumulative log decays').
  static void Chunk(const T* q, const T* k, const T* v, const T* b, const T* d_o, T* o,
                    T* dq, T* dk, T* dv, T* db, int64_t C, int64_t dkw, int64_t dvw) {
    const int nk = static_cast<int>((dkw + kLanes - 1) / kLanes);
    const int nvv = static_cast<int>((dvw + kLanes - 1) / kLanes);
    const bool bwd = d_o != nullptr;
    // (a vector of T, aligned by hand: a std::vector of V would drop V's attributes)
    thread_local std::vector<T> scratch;
    const size_t need = (static_cast<size_t>(C) * (9 * nk + 4 * nvv) + nk + 1) * kLanes;
    if (scratch.size() < need) scratch.resize(need);
    const uintptr_t at = reinterpret_cast<uintptr_t>(scratch.data());
    V* Q = reinterpret_cast<V*>((at + kVecBytes - 1) / kVecBytes * kVecBytes);
    V *K = Q + C * nk, *B = K + C * nk, *QH = B + C * nk, *KH = QH + C * nk;
    V *DQ = KH + C * nk, *DK = DQ + C * nk, *DB = DK + C * nk;
    V *DQH = DB + C * nk, *VV = DQH + C * nk, *DO = VV + C * nvv, *O = DO + C * nvv;
    V *DV = O + C * nvv, *ref = DV + C * nvv;
    Load(Q, q, C, dkw, nk);
    Load(K, k, C, dkw, nk);
    Load(B, b, C, dkw, nk);
    Load(VV, v, C, dvw, nvv);
    if (bwd) {
      Load(DO, d_o, C, dvw, nvv);
      for (int64_t i = 0; i < C * nk; ++i) DQ[i] = DK[i] = DB[i] = V{};
      for (int64_t i = 0; i < C * nvv; ++i) DV[i] = V{};
    } else {
      for (int64_t i = 0; i < C * nvv; ++i) O[i] = V{};
    }
    // the diagonal: o[i] += (q[i] . k[i]) v[i]
    for (int64_t i = 0; i < C; ++i) {
      const T a = Dot(Q + i * nk, K + i * nk, nk);
      if (!bwd) {
        for (int j = 0; j < nvv; ++j) O[i * nvv + j] += a * VV[i * nvv + j];
        continue;
      }
      const T da = Dot(DO + i * nvv, VV + i * nvv, nvv);
      for (int j = 0; j < nk; ++j) {
        DQ[i * nk + j] += da * K[i * nk + j];
        DK[i * nk + j] += da * Q[i * nk + j];
      }
      for (int j = 0; j < nvv; ++j) DV[i * nvv + j] += a * DO[i * nvv + j];
    }
    for (int64_t s = 1; s < C; s *= 2) {
      for (int64_t blk = 0; blk < C; blk += 2 * s) {
        const int64_t h1 = blk, h2 = blk + s;  // first rows of the two halves
        for (int j = 0; j < nk; ++j) ref[j] = B[(h2 - 1) * nk + j];
        // rescaled: QH[i] = q[h2 + i] e2[i], KH[j] = k[h1 + j] e1[j]; backwards the
        // factors e2, e1 are kept too (interleaved in DQH's 2s rows).
        for (int64_t i = 0; i < s; ++i)
          for (int j = 0; j < nk; ++j) {
            const V e2 = Exp<T>::Of(B[(h2 + i) * nk + j] - ref[j]);
            const V e1 = Exp<T>::Of(ref[j] - B[(h1 + i) * nk + j]);
            QH[i * nk + j] = Q[(h2 + i) * nk + j] * e2;
            KH[i * nk + j] = K[(h1 + i) * nk + j] * e1;
            if (bwd) {
              DQH[(2 * i) * nk + j] = e2;  // 2s rows of scratch: e2, e1 interleaved
              DQH[(2 * i + 1) * nk + j] = e1;
            }
          }
        if (!bwd) {
          for (int64_t i = 0; i < s; ++i)
            for (int64_t j = 0; j < s; ++j) {
              const T a = Dot(QH + i * nk, KH + j * nk, nk);
              for (int l = 0; l < nvv; ++l) O[(h2 + i) * nvv + l] += a * VV[(h1 + j) * nvv + l];
            }
          continue;
        }
        // dq̂[i] = sum_j dA[i, j] k̂[j], dA = do2 v1^T; dv1 += A^T do2
        for (int64_t i = 0; i < s; ++i) {
          for (int64_t j = 0; j < s; ++j) {
            const T a = Dot(QH + i * nk, KH + j * nk, nk);
            const T da = Dot(DO + (h2 + i) * nvv, VV + (h1 + j) * nvv, nvv);
            for (int l = 0; l < nvv; ++l) DV[(h1 + j) * nvv + l] += a * DO[(h2 + i) * nvv + l];
            V* dq2 = DQ + (h2 + i) * nk;
            const V* e2 = DQH + (2 * i) * nk;
            for (int l = 0; l < nk; ++l) {
              const V g = da * KH[j * nk + l];  // a part of dq̂[i]
              dq2[l] += g * e2[l];
              const V t2 = g * QH[i * nk + l];
              DB[(h2 + i) * nk + l] += t2;
            }
            V* dk1 = DK + (h1 + j) * nk;
            const V* e1 = DQH + (2 * j + 1) * nk;
            for (int l = 0; l < nk; ++l) {
              const V g = da * QH[i * nk + l];  // a part of dk̂[j]
              dk1[l] += g * e1[l];
              const V t1 = g * KH[j * nk + l];
              DB[(h1 + j) * nk + l] -= t1;
            }
          }
        }
      }
    }
    if (!bwd) {
      Store(o, O, C, dvw, nvv);
      return;
    }
    Store(dq, DQ, C, dkw, nk);
    Store(dk, DK, C, dkw, nk);
    Store(dv, DV, C, dvw, nvv);
    Store(db, DB, C, dkw, nk);
  }
};

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

// The tree over chunks: q, k, b (..., C, dk) and v (..., C, dv), C a power of two;
// forwards o (..., C, dv); backwards (with do) dq, dk, db and dv.
template <typename T>
void RunTreeAs(ffi::ThreadPool& pool, int64_t threads, int64_t N, int64_t C, int64_t dkw,
               int64_t dvw, const T* q, const T* k, const T* v, const T* b, const T* d_o, T* o,
               T* dq, T* dk, T* dv, T* db) {
  const int64_t per = std::max<int64_t>(1, kUnitMacs / std::max<int64_t>(1, C * C * (dkw + dvw)));
  auto unit = [=](int64_t u) {
    for (int64_t n = u * per; n < std::min(N, (u + 1) * per); ++n) {
      const int64_t ok = n * C * dkw, ov = n * C * dvw;
      Tree<T>::Chunk(q + ok, k + ok, v + ov, b + ok, d_o ? d_o + ov : nullptr,
                     o ? o + ov : nullptr, dq ? dq + ok : nullptr, dk ? dk + ok : nullptr,
                     dv ? dv + ov : nullptr, db ? db + ok : nullptr, C, dkw, dvw);
    }
  };
  Parallel(pool, threads, (N + per - 1) / per, unit);
}

ffi::Error RunTree(ffi::ThreadPool pool, ffi::RemainingArgs args, ffi::RemainingRets rets,
                   int64_t threads) {
  using DT = ffi::DataType;
  const bool bwd = args.size() == 5;
  bool ok = (args.size() == 4 && rets.size() == 1) || (bwd && rets.size() == 4);
  std::vector<ffi::AnyBuffer> in, out;
  for (size_t i = 0; ok && i < args.size(); ++i) {
    auto x = args.get<ffi::AnyBuffer>(i);
    ok = x.has_value();
    if (ok) in.push_back(*x);
  }
  for (size_t i = 0; ok && i < rets.size(); ++i) {
    auto x = rets.get<ffi::AnyBuffer>(i);
    ok = x.has_value();
    if (ok) out.push_back(**x);
  }
  const DT t = ok ? in[0].element_type() : DT::INVALID;
  ok = ok && (t == DT::F32 || t == DT::F64);
  for (const auto& x : in) ok = ok && x.element_type() == t;
  for (const auto& x : out) ok = ok && x.element_type() == t;
  const auto qd = ok ? in[0].dimensions() : ffi::Span<const int64_t>();
  const size_t r = qd.size();
  ok = ok && r >= 2;
  const int64_t C = ok ? qd[r - 2] : 0, dkw = ok ? qd[r - 1] : 0;
  const int64_t dvw = ok ? in[2].dimensions().back() : 0;
  ok = ok && C > 0 && (C & (C - 1)) == 0;
  // q, k, b, dq, dk, db: qd; v, do, o, dv: qd with dv columns
  const auto is = [&](const ffi::AnyBuffer& x, int64_t w) {
    const auto d = x.dimensions();
    if (d.size() != r || d.back() != w) return false;
    for (size_t i = 0; i + 1 < r; ++i)
      if (d[i] != qd[i]) return false;
    return true;
  };
  ok = ok && is(in[1], dkw) && is(in[2], dvw) && is(in[3], dkw) && (!bwd || is(in[4], dvw));
  if (ok && bwd) ok = is(out[0], dkw) && is(out[1], dkw) && is(out[2], dvw) && is(out[3], dkw);
  if (ok && !bwd) ok = is(out[0], dvw);
  if (!ok) {
    return ffi::Error::InvalidArgument(
        "ssm GLA tree kernel: q, k, b (..., C, d_k), v (..., C, d_v) and do (..., C, d_v) "
        "of one dtype, float32 or float64, C a power of two");
  }
  if (in[0].element_count() == 0 || in[2].element_count() == 0) {  // zero-sized: zeros
    for (auto& x : out) std::memset(x.untyped_data(), 0, x.size_bytes());
    return ffi::Error::Success();
  }
  const int64_t N = in[0].element_count() / (C * dkw);
  const auto run = [&](auto zero) {
    using T = decltype(zero);
    const auto p = [](const ffi::AnyBuffer& x) {
      return static_cast<const T*>(x.untyped_data());
    };
    const auto w = [](ffi::AnyBuffer& x) { return static_cast<T*>(x.untyped_data()); };
    if (bwd) {
      RunTreeAs<T>(pool, threads, N, C, dkw, dvw, p(in[0]), p(in[1]), p(in[2]), p(in[3]),
                   p(in[4]), nullptr, w(out[0]), w(out[1]), w(out[2]), w(out[3]));
    } else {
      RunTreeAs<T>(pool, threads, N, C, dkw, dvw, p(in[0]), p(in[1]), p(in[2]), p(in[3]),
                   nullptr, w(out[0]), nullptr, nullptr, nullptr, nullptr);
    }
  };
  if (t == DT::F32) {
    run(0.0f);
  } else {
    run(0.0);
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(SsmGlaTree, RunTree,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .RemainingArgs()  // q, k, v, b (and do: the derivative)
                                  .RemainingRets()  // o (or dq, dk, dv, db)
                                  .Attr<int64_t>("threads"));

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
