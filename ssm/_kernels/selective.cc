// Mamba's selective scan on CPU, as two XLA FFI custom calls (forward, backward).
//
// Per example b, inner channel d and state index n (Gu and Dao 2023, eq. 2, with the
// zero-order-hold decay and Euler input of their code; `ssm/_selective.py`):
//
//     h[t, n, d] = exp(dt[t, d] A[n, d]) h[t-1, n, d] + dt[t, d] x[t, d] B[t, n, g(d)]
//     y[t, d]    = sum_n h[t, n, d] C[t, n, g(d)]
//
// with h[-1] = h0 and, where resets[t], the decay 0 (the state restarts). Layouts, all
// row-major with any leading batch axes L... (from `vmap_method="broadcast_all"`):
// x, dt, y (L..., T, D); A, h0, hT (L..., N, D); B, C (L..., T, N, G), channel d in
// group g(d) = d / (D / G); resets bool (L..., T); starts (L..., nc, N, D), the state
// before step c K of each chunk of K steps.
//
// The state index comes first so that vector lanes run over channels: a block of one
// vector of channels keeps its N states in L1 and, per step, computes exp(dt A) (a
// float32 polynomial, or std::exp for float64), the update and the read-out. Nothing
// of size T x N x D is stored: the forward keeps the chunk-start states, and the
// backward, chunk by chunk in reverse, recomputes the chunk's states and decays into
// a (K, N, lanes) buffer and then runs the adjoint recurrence
//
//     g[t] = dy[t] C[t] + exp(dt[t+1] A) g[t+1],   g[T-1] = dy[T-1] C[T-1] + dhT,
//
// reducing dx, ddt per step, summing dB and dC over the block's channels, and
// accumulating dA in registers. Work is shared with XLA's intra-op threads in units of
// (example, range of channel blocks); in the backward each unit sums dB and dC over
// its channels into a buffer of its own, which are added at the end.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <type_traits>
#include <vector>

#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using ssm_kernels::Parallel;

constexpr int kVecBytes = 32;

template <typename F>
struct Vec {
  static constexpr int kLanes = kVecBytes / sizeof(F);
  typedef F V __attribute__((vector_size(kVecBytes)));
};

// exp lane by lane. float32: 2^n range reduction and a Cephes polynomial (relative
// error about 2e-7 against expf), 0 below -87.3, +inf above 88.7, NaN kept. float64:
// std::exp, exactly.
template <typename F>
struct Exp;

template <>
struct Exp<float> {
  typedef Vec<float>::V V;
  typedef int32_t VI __attribute__((vector_size(kVecBytes)));
  static V Of(V x) {
    const VI under = x < -87.3f, over = x > 88.7f, nan = x != x;
    V c = under ? V{} + 0.0f : x;
    c = over ? V{} + 0.0f : c;
    const V big = V{} + 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
    const V n = (c * 1.44269504088896341f + big) - big;
    V r = c - n * 0.693359375f;
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
    V e = p * scale;
    e = under ? V{} : e;
    e = over ? V{} + __builtin_inff() : e;
    return nan ? x : e;
  }
};

template <>
struct Exp<double> {
  typedef Vec<double>::V V;
  static V Of(V x) {
    for (int l = 0; l < Vec<double>::kLanes; ++l) x[l] = std::exp(x[l]);
    return x;
  }
};

template <typename F>
inline F Sum(typename Vec<F>::V v) {
  F s = 0;
  for (int l = 0; l < Vec<F>::kLanes; ++l) s += v[l];
  return s;
}

// The sizes of one call; leading batch axes flattened to L.
struct Shape {
  int64_t L, T, D, N, G, K, nc;  // nc = ceil(T / K) chunks
  int64_t P() const { return D / G; }
};

// One block of `w` channels from d0 (w = lanes, or fewer at the end, `kFull` when
// w = lanes): loads zero the lanes from w on, stores skip them. Lanes in one group
// (`kUniform`) share B[t, n, g0] and C[t, n, g0], broadcast; otherwise each lane reads
// its own group's, and sums over channels are added lane by lane.
template <typename F, bool kFull, bool kUniform>
struct Block {
  using V = typename Vec<F>::V;
  static constexpr int kLanes = Vec<F>::kLanes;
  int64_t d0, w, g0;
  int64_t group[kLanes];

  Block(const Shape& s, int64_t d0_) : d0(d0_), w(std::min<int64_t>(kLanes, s.D - d0_)) {
    for (int l = 0; l < kLanes; ++l) group[l] = std::min(d0 + l, d0 + w - 1) / s.P();
    g0 = group[0];
  }
  V Load(const F* p) const {
    V v{};
    std::memcpy(&v, p + d0, (kFull ? kLanes : w) * sizeof(F));
    return v;
  }
  void Store(F* p, V v) const { std::memcpy(p + d0, &v, (kFull ? kLanes : w) * sizeof(F)); }
  // B[t, n, :] (a row of G) for this block's lanes.
  V Groups(const F* row) const {
    if constexpr (kUniform) {
      return V{} + row[g0];
    } else {
      V v{};
      for (int l = 0; l < kLanes; ++l) v[l] = row[group[l]];
      return v;
    }
  }
  // out[g] += the sum of v over the lanes of group g (the lanes from w on are zero).
  void AddLanes(F* out, V v) const {
    for (int l = 0; l < w; ++l) out[group[l]] += v[l];
  }
};

// Calls f(Block<F, full, uniform>) for the block of channels from d0.
template <typename F, typename Fn>
void WithBlock(const Shape& s, int64_t d0, Fn&& f) {
  constexpr int64_t kLanes = Vec<F>::kLanes;
  const int64_t w = std::min<int64_t>(kLanes, s.D - d0);
  const bool uniform = d0 / s.P() == (d0 + w - 1) / s.P();
  if (w == kLanes && uniform) {
    f(Block<F, true, true>(s, d0));
  } else if (w == kLanes) {
    f(Block<F, true, false>(s, d0));
  } else if (uniform) {
    f(Block<F, false, true>(s, d0));
  } else {
    f(Block<F, false, false>(s, d0));
  }
}

template <typename F>
struct Selective {
  using V = typename Vec<F>::V;
  static constexpr int kLanes = Vec<F>::kLanes;

  // One example's inputs.
  struct In {
    const F *x, *dt, *A, *B, *C;
    const bool* r;
    In(const Shape& s, const F* x_, const F* dt_, const F* A_, const F* B_, const F* C_,
       const bool* r_, int64_t b)
        : x(x_ + b * s.T * s.D),
          dt(dt_ + b * s.T * s.D),
          A(A_ + b * s.N * s.D),
          B(B_ + b * s.T * s.N * s.G),
          C(C_ + b * s.T * s.N * s.G),
          r(r_ + b * s.T) {}
  };

  // One block through the sequence: y (T, D), hT (N, D), starts (nc, N, D) of the
  // example; h0 (N, D); h a buffer of N vectors.
  template <typename Blk>
  static void ForwardBlock(const Shape& s, const In& in, const Blk& blk, const F* h0, F* y,
                           F* hT, F* starts, V* __restrict h) {
    const int64_t T = s.T, D = s.D, N = s.N, G = s.G, K = s.K;
    for (int64_t n = 0; n < N; ++n) h[n] = blk.Load(h0 + n * D);
    const F* A = in.A;
    for (int64_t t = 0; t < T; ++t) {
      if (t % K == 0) {
        F* st = starts + (t / K) * N * D;
        for (int64_t n = 0; n < N; ++n) blk.Store(st + n * D, h[n]);
      }
      const V dtv = blk.Load(in.dt + t * D);
      const V u = dtv * blk.Load(in.x + t * D);
      const F* Bt = in.B + t * N * G;
      const F* Ct = in.C + t * N * G;
      V acc{};
      if (in.r[t]) {
        for (int64_t n = 0; n < N; ++n) {
          h[n] = u * blk.Groups(Bt + n * G);
          acc += h[n] * blk.Groups(Ct + n * G);
        }
      } else {
        for (int64_t n = 0; n < N; ++n) {
          const V e = Exp<F>::Of(dtv * blk.Load(A + n * D));
          h[n] = e * h[n] + u * blk.Groups(Bt + n * G);
          acc += h[n] * blk.Groups(Ct + n * G);
        }
      }
      blk.Store(y + t * D, acc);
    }
    for (int64_t n = 0; n < N; ++n) blk.Store(hT + n * D, h[n]);
  }

  // Channel blocks [k0, k1) of example b, forwards.
  static void Forward(const Shape& s, const In& in, const F* h0, F* y, F* hT, F* starts,
                      int64_t b, int64_t k0, int64_t k1) {
    const int64_t T = s.T, D = s.D, N = s.N;
    std::vector<V> h(N);
    for (int64_t k = k0; k < k1; ++k) {
      WithBlock<F>(s, k * kLanes, [&](const auto& blk) {
        ForwardBlock(s, in, blk, h0 + b * N * D, y + b * T * D, hT + b * N * D,
                     starts + b * s.nc * N * D, h.data());
      });
    }
  }

  // The backward pass's buffers for one unit (a range of blocks of one example).
  struct Work {
    int64_t gl, Gu;         // the groups the range spans: gl, ..., gl + Gu - 1
    std::vector<V> m, dA;   // per block, N vectors each: the adjoint carry, dA
    std::vector<V> H, E;    // (K, N): a chunk's states before each step, its decays
    std::vector<V> h;       // (N,): the running state
    std::vector<V> sB, sC;  // (K, N, Gu): dB and dC of the chunk, lane by lane
  };

  // One block through chunk [t0, t1), backwards: recompute the chunk's states from
  // `st` (N, D), then the adjoint from t1 - 1 down to t0. m, dA: the block's carry.
  template <typename Blk>
  static void ChunkBlock(const Shape& s, const In& in, const Blk& blk, const F* st,
                         const F* gy, F* dx, F* ddt, F* dBs, F* dCs, int64_t t0,
                         int64_t t1, V* __restrict m, V* __restrict dA, Work& w) {
    constexpr bool kUniform = std::is_same<Blk, Block<F, true, true>>::value ||
                              std::is_same<Blk, Block<F, false, true>>::value;
    const int64_t D = s.D, N = s.N, G = s.G, Gu = w.Gu, gi = blk.g0 - w.gl;
    V* __restrict H = w.H.data();
    V* __restrict E = w.E.data();
    V* __restrict h = w.h.data();
    V* __restrict sB = w.sB.data();
    V* __restrict sC = w.sC.data();
    const F* A = in.A;
    for (int64_t n = 0; n < N; ++n) h[n] = blk.Load(st + n * D);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t j = t - t0;
      const V dtv = blk.Load(in.dt + t * D);
      const V u = dtv * blk.Load(in.x + t * D);
      const V g = blk.Load(gy + t * D);
      const F* Bt = in.B + t * N * G;
      V* Hj = H + j * N;
      V* Ej = E + j * N;
      const bool reset = in.r[t];
      for (int64_t n = 0; n < N; ++n) {
        const V e = reset ? V{} : Exp<F>::Of(dtv * blk.Load(A + n * D));
        Ej[n] = e;
        Hj[n] = h[n];
        h[n] = e * h[n] + u * blk.Groups(Bt + n * G);
        if constexpr (kUniform) {
          sC[(j * N + n) * Gu + gi] += g * h[n];
        } else {
          blk.AddLanes(dCs + (t * N + n) * G, g * h[n]);
        }
      }
    }
    for (int64_t t = t1 - 1; t >= t0; --t) {
      const int64_t j = t - t0;
      const V dtv = blk.Load(in.dt + t * D);
      const V xv = blk.Load(in.x + t * D);
      const V u = dtv * xv;
      const V gyv = blk.Load(gy + t * D);
      const F* Bt = in.B + t * N * G;
      const F* Ct = in.C + t * N * G;
      const V* Hj = H + j * N;
      const V* Ej = E + j * N;
      V sb{}, sa{};
      for (int64_t n = 0; n < N; ++n) {
        const V g = gyv * blk.Groups(Ct + n * G) + m[n];
        sb += g * blk.Groups(Bt + n * G);
        const V q = g * Ej[n] * Hj[n];
        sa += q * blk.Load(A + n * D);
        dA[n] += dtv * q;
        if constexpr (kUniform) {
          sB[(j * N + n) * Gu + gi] += g * u;
        } else {
          blk.AddLanes(dBs + (t * N + n) * G, g * u);
        }
        m[n] = Ej[n] * g;
      }
      blk.Store(dx + t * D, dtv * sb);
      blk.Store(ddt + t * D, sa + xv * sb);
    }
  }

  // Channel blocks [k0, k1) of example b, backwards, chunk by chunk (every block of the
  // range through a chunk, then the previous chunk), so that dB and dC are summed over
  // the range's channels lane by lane and reduced across lanes once per chunk; into
  // dBs, dCs (T, N, G), which the caller zeroed.
  static void Backward(const Shape& s, const In& in, const F* starts, const F* gy,
                       const F* m0, F* dx, F* ddt, F* dA, F* dBs, F* dCs, F* dh0,
                       int64_t b, int64_t k0, int64_t k1) {
    const int64_t T = s.T, D = s.D, N = s.N, G = s.G, K = s.K, nb = k1 - k0;
    if (nb <= 0) return;
    Work w;
    w.gl = (k0 * kLanes) / s.P();
    w.Gu = (std::min(D, k1 * kLanes) - 1) / s.P() - w.gl + 1;
    w.m.resize(nb * N);
    w.dA.assign(nb * N, V{});
    w.H.resize(K * N);
    w.E.resize(K * N);
    w.h.resize(N);
    w.sB.resize(K * N * w.Gu);
    w.sC.resize(K * N * w.Gu);
    starts += b * s.nc * N * D;
    gy += b * T * D;
    dx += b * T * D;
    ddt += b * T * D;
    for (int64_t k = k0; k < k1; ++k) {
      WithBlock<F>(s, k * kLanes, [&](const auto& blk) {
        for (int64_t n = 0; n < N; ++n) w.m[(k - k0) * N + n] = blk.Load(m0 + (b * N + n) * D);
      });
    }
    for (int64_t c = s.nc - 1; c >= 0; --c) {
      const int64_t t0 = c * K, t1 = std::min(T, t0 + K);
      std::fill(w.sB.begin(), w.sB.end(), V{});
      std::fill(w.sC.begin(), w.sC.end(), V{});
      for (int64_t k = k0; k < k1; ++k) {
        WithBlock<F>(s, k * kLanes, [&](const auto& blk) {
          ChunkBlock(s, in, blk, starts + c * N * D, gy, dx, ddt, dBs, dCs, t0, t1,
                     w.m.data() + (k - k0) * N, w.dA.data() + (k - k0) * N, w);
        });
      }
      for (int64_t t = t0; t < t1; ++t) {
        for (int64_t n = 0; n < N; ++n) {
          for (int64_t gi = 0; gi < w.Gu; ++gi) {
            const int64_t i = ((t - t0) * N + n) * w.Gu + gi;
            dBs[(t * N + n) * G + w.gl + gi] += Sum<F>(w.sB[i]);
            dCs[(t * N + n) * G + w.gl + gi] += Sum<F>(w.sC[i]);
          }
        }
      }
    }
    for (int64_t k = k0; k < k1; ++k) {
      WithBlock<F>(s, k * kLanes, [&](const auto& blk) {
        for (int64_t n = 0; n < N; ++n) {
          blk.Store(dh0 + (b * N + n) * D, w.m[(k - k0) * N + n]);
          blk.Store(dA + (b * N + n) * D, w.dA[(k - k0) * N + n]);
        }
      });
    }
  }
};

// The sizes from the buffers, or an error message.
const char* Sizes(ffi::AnyBuffer x, ffi::AnyBuffer dt, ffi::AnyBuffer A, ffi::AnyBuffer B,
                  ffi::AnyBuffer C, ffi::AnyBuffer resets, int64_t K, Shape& s) {
  const auto xd = x.dimensions(), ad = A.dimensions(), bd = B.dimensions();
  if (xd.size() < 2 || ad.size() < 2 || bd.size() < 3 || K < 1) {
    return "x, dt (..., T, D), A (..., N, D), B, C (..., T, N, G), chunk >= 1";
  }
  s.T = xd[xd.size() - 2];
  s.D = xd[xd.size() - 1];
  s.N = ad[ad.size() - 2];
  s.G = bd[bd.size() - 1];
  s.K = K;
  if (s.T < 1 || s.D < 1 || s.N < 1 || s.G < 1 || s.D % s.G) {
    return "T, D, N, G >= 1 and G dividing D";
  }
  s.nc = (s.T + K - 1) / K;
  s.L = x.element_count() / (s.T * s.D);
  const auto t = x.element_type();
  if (t != ffi::DataType::F32 && t != ffi::DataType::F64) return "float32 or float64";
  for (const auto* v : {&dt, &A, &B, &C}) {
    if (v->element_type() != t) return "one dtype";
  }
  if ((int64_t)dt.element_count() != s.L * s.T * s.D ||
      (int64_t)A.element_count() != s.L * s.N * s.D ||
      ad[ad.size() - 1] != s.D || bd[bd.size() - 3] != s.T || bd[bd.size() - 2] != s.N ||
      (int64_t)B.element_count() != s.L * s.T * s.N * s.G ||
      (int64_t)C.element_count() != s.L * s.T * s.N * s.G ||
      resets.element_type() != ffi::DataType::PRED ||
      (int64_t)resets.element_count() != s.L * s.T) {
    return "shapes: x, dt (L, T, D), A (L, N, D), B, C (L, T, N, G), resets bool (L, T)";
  }
  return nullptr;
}

template <typename F>
const F* P(const ffi::AnyBuffer& b) {
  return static_cast<const F*>(b.untyped_data());
}
template <typename F>
F* W(ffi::Result<ffi::AnyBuffer>& b) {
  return static_cast<F*>(b->untyped_data());
}

// Blocks of one example per unit: enough units for every thread a few times over.
int64_t Ranges(const Shape& s, int64_t blocks, int64_t threads) {
  if (threads <= 1) return 1;
  return std::max<int64_t>(1, std::min<int64_t>(blocks, (4 * threads + s.L - 1) / s.L));
}

ffi::Error Fwd(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer dt, ffi::AnyBuffer A,
               ffi::AnyBuffer B, ffi::AnyBuffer C, ffi::AnyBuffer h0, ffi::AnyBuffer resets,
               ffi::Result<ffi::AnyBuffer> y, ffi::Result<ffi::AnyBuffer> hT,
               ffi::Result<ffi::AnyBuffer> starts, int64_t chunk, int64_t threads) {
  Shape s;
  if (const char* e = Sizes(x, dt, A, B, C, resets, chunk, s)) {
    return ffi::Error::InvalidArgument(std::string("ssm selective scan kernel: ") + e);
  }
  const auto t = x.element_type();
  if (h0.element_type() != t || (int64_t)h0.element_count() != s.L * s.N * s.D ||
      (int64_t)starts->element_count() != s.L * s.nc * s.N * s.D ||
      (int64_t)y->element_count() != s.L * s.T * s.D) {
    return ffi::Error::InvalidArgument("ssm selective scan kernel: h0 (L, N, D)");
  }
  const auto run = [&](auto zero) {
    using F = decltype(zero);
    const bool* pr = static_cast<const bool*>(resets.untyped_data());
    const int64_t blocks = (s.D + Vec<F>::kLanes - 1) / Vec<F>::kLanes;
    const int64_t R = Ranges(s, blocks, threads);
    const F* ph0 = P<F>(h0);
    F *py = W<F>(y), *phT = W<F>(hT), *pst = W<F>(starts);
    Parallel(pool, threads, s.L * R, [&, R, blocks](int64_t u) {
      const int64_t b = u / R, i = u % R;
      const typename Selective<F>::In in(s, P<F>(x), P<F>(dt), P<F>(A), P<F>(B), P<F>(C),
                                         pr, b);
      Selective<F>::Forward(s, in, ph0, py, phT, pst, b, blocks * i / R,
                            blocks * (i + 1) / R);
    });
  };
  if (t == ffi::DataType::F32) {
    run(0.0f);
  } else {
    run(0.0);
  }
  return ffi::Error::Success();
}

ffi::Error Bwd(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer dt, ffi::AnyBuffer A,
               ffi::AnyBuffer B, ffi::AnyBuffer C, ffi::AnyBuffer resets,
               ffi::AnyBuffer starts, ffi::AnyBuffer gy, ffi::AnyBuffer m,
               ffi::Result<ffi::AnyBuffer> dx, ffi::Result<ffi::AnyBuffer> ddt,
               ffi::Result<ffi::AnyBuffer> dA, ffi::Result<ffi::AnyBuffer> dB,
               ffi::Result<ffi::AnyBuffer> dC, ffi::Result<ffi::AnyBuffer> dh0,
               int64_t chunk, int64_t threads) {
  Shape s;
  if (const char* e = Sizes(x, dt, A, B, C, resets, chunk, s)) {
    return ffi::Error::InvalidArgument(std::string("ssm selective scan kernel: ") + e);
  }
  const auto t = x.element_type();
  if (starts.element_type() != t || gy.element_type() != t || m.element_type() != t ||
      (int64_t)starts.element_count() != s.L * s.nc * s.N * s.D ||
      (int64_t)gy.element_count() != s.L * s.T * s.D ||
      (int64_t)m.element_count() != s.L * s.N * s.D ||
      (int64_t)dB->element_count() != s.L * s.T * s.N * s.G) {
    return ffi::Error::InvalidArgument(
        "ssm selective scan kernel: starts (L, nc, N, D), gy (L, T, D), m (L, N, D)");
  }
  const auto run = [&](auto zero) {
    using F = decltype(zero);
    const bool* pr = static_cast<const bool*>(resets.untyped_data());
    const int64_t blocks = (s.D + Vec<F>::kLanes - 1) / Vec<F>::kLanes;
    const int64_t R = Ranges(s, blocks, threads);
    const int64_t TNG = s.T * s.N * s.G;
    F *pdB = W<F>(dB), *pdC = W<F>(dC);
    // With one range per example, its sums go straight to the output; otherwise to a
    // buffer per range, added up at the end.
    std::vector<F> scratch(R > 1 ? 2 * s.L * R * TNG : 0, F(0));
    if (R == 1) {
      std::fill(pdB, pdB + s.L * TNG, F(0));
      std::fill(pdC, pdC + s.L * TNG, F(0));
    }
    const F *pst = P<F>(starts), *pgy = P<F>(gy), *pm = P<F>(m);
    F *pdx = W<F>(dx), *pddt = W<F>(ddt), *pdA = W<F>(dA), *pdh0 = W<F>(dh0);
    Parallel(pool, threads, s.L * R, [&, R, blocks](int64_t u) {
      const int64_t b = u / R, i = u % R;
      F* sB = R == 1 ? pdB + b * TNG : scratch.data() + u * TNG;
      F* sC = R == 1 ? pdC + b * TNG : scratch.data() + (s.L * R + u) * TNG;
      const typename Selective<F>::In in(s, P<F>(x), P<F>(dt), P<F>(A), P<F>(B), P<F>(C),
                                         pr, b);
      Selective<F>::Backward(s, in, pst, pgy, pm, pdx, pddt, pdA, sB, sC, pdh0, b,
                             blocks * i / R, blocks * (i + 1) / R);
    });
    if (R > 1) {
      for (int64_t b = 0; b < s.L; ++b) {
        F* oB = pdB + b * TNG;
        F* oC = pdC + b * TNG;
        const F* sB = scratch.data() + b * R * TNG;
        const F* sC = scratch.data() + (s.L * R + b * R) * TNG;
        for (int64_t j = 0; j < TNG; ++j) {
          F vb = 0, vc = 0;
          for (int64_t i = 0; i < R; ++i) {
            vb += sB[i * TNG + j];
            vc += sC[i * TNG + j];
          }
          oB[j] = vb;
          oC[j] = vc;
        }
      }
    }
  };
  if (t == ffi::DataType::F32) {
    run(0.0f);
  } else {
    run(0.0);
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(SsmSelectiveFwd, Fwd,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()  // x
                                  .Arg<ffi::AnyBuffer>()  // dt
                                  .Arg<ffi::AnyBuffer>()  // A
                                  .Arg<ffi::AnyBuffer>()  // B
                                  .Arg<ffi::AnyBuffer>()  // C
                                  .Arg<ffi::AnyBuffer>()  // h0
                                  .Arg<ffi::AnyBuffer>()  // resets
                                  .Ret<ffi::AnyBuffer>()  // y
                                  .Ret<ffi::AnyBuffer>()  // hT
                                  .Ret<ffi::AnyBuffer>()  // starts
                                  .Attr<int64_t>("chunk")
                                  .Attr<int64_t>("threads"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(SsmSelectiveBwd, Bwd,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()  // x
                                  .Arg<ffi::AnyBuffer>()  // dt
                                  .Arg<ffi::AnyBuffer>()  // A
                                  .Arg<ffi::AnyBuffer>()  // B
                                  .Arg<ffi::AnyBuffer>()  // C
                                  .Arg<ffi::AnyBuffer>()  // resets
                                  .Arg<ffi::AnyBuffer>()  // starts
                                  .Arg<ffi::AnyBuffer>()  // gy
                                  .Arg<ffi::AnyBuffer>()  // m (dhT)
                                  .Ret<ffi::AnyBuffer>()  // dx
                                  .Ret<ffi::AnyBuffer>()  // ddt
                                  .Ret<ffi::AnyBuffer>()  // dA
                                  .Ret<ffi::AnyBuffer>()  // dB
                                  .Ret<ffi::AnyBuffer>()  // dC
                                  .Ret<ffi::AnyBuffer>()  // dh0
                                  .Attr<int64_t>("chunk")
                                  .Attr<int64_t>("threads"));
