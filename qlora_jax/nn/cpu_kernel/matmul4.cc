// A fused 4-bit matmul for the CPU, called from XLA through its FFI:
// y [m, n] = x [m, k] @ W.T, W [n, k] given as packed 4-bit codes and one
// scale (and an optional minimum) per block of a row.
//
// Element (o, c) of W is table[code] * scale[o, c / bs] (+ minimum[o, c / bs])
// in float32, the same two roundings as the XLA dequantization, so the
// kernel multiplies by exactly the weight that path materializes; only the
// order of the sums differs. Byte j of a row holds columns 2j (high nibble)
// and 2j + 1 (low nibble). The codes are decoded in registers: for each
// block the 16 table values are scaled once, and each code is turned into
// its value by a register permute (AVX-512: one vpermps over 16 lanes;
// AVX2: two over 8 lanes and a blend), so W never exists in float.
//
// x is split once per call into its even and odd columns, so that the two
// nibble planes of a byte multiply contiguous vectors. Rows of W are shared
// out among XLA's intra-op threads when a call is large enough.

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

struct Problem {
  const float* xe;  // [m, k / 2] even columns of x
  const float* xo;  // [m, k / 2] odd columns of x
  int64_t m, k, n, bs;
  const uint8_t* codes;   // [n, k / 2]
  const float* scale;     // [n, k / bs]
  const float* minimum;   // [n, k / bs] or null
  const float* table;     // [16]
  float* y;               // [m, n]
};

// Columns decoded per step: 16 bytes of codes.
constexpr int64_t kStep = 32;

// A tile is R rows of W by T rows of x, with two accumulators (the even and
// the odd columns) per pair: R * T * 2 independent multiply-add chains, all
// in registers (every index is a compile-time constant). Few rows of x
// take several rows of W at once, so that the chains hide the latency of
// a multiply-add; the table values are scaled per row and block.

#if defined(__AVX512F__)

constexpr int kMaxTile = 8;  // rows of x per tile
template <int T>
constexpr int kRowsOfW = T == 1 ? 4 : (T == 2 ? 4 : (T <= 4 ? 2 : 1));

template <int R, int T>
void tile(const Problem& p, int64_t o0, int64_t m0) {
  const int64_t half = p.k / 2, nb = p.k / p.bs;
  __m512 acc[R][T][2];
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < T; ++i)
      acc[r][i][0] = acc[r][i][1] = _mm512_setzero_ps();
  const __m512i low = _mm512_set1_epi32(15);
  const __m512 table = _mm512_loadu_ps(p.table);
  for (int64_t b = 0; b < nb; ++b) {
    __m512 t[R];
    for (int r = 0; r < R; ++r) {
      const int64_t at = (o0 + r) * nb + b;
      t[r] = _mm512_mul_ps(table, _mm512_set1_ps(p.scale[at]));
      if (p.minimum) t[r] = _mm512_add_ps(t[r], _mm512_set1_ps(p.minimum[at]));
    }
    for (int64_t c = b * p.bs; c < (b + 1) * p.bs; c += kStep) {
      for (int r = 0; r < R; ++r) {
        const __m128i bytes = _mm_loadu_si128(
            reinterpret_cast<const __m128i*>(p.codes + (o0 + r) * half + c / 2));
        const __m512i q = _mm512_cvtepu8_epi32(bytes);
        const __m512 we = _mm512_permutexvar_ps(_mm512_srli_epi32(q, 4), t[r]);
        const __m512 wo = _mm512_permutexvar_ps(_mm512_and_si512(q, low), t[r]);
        for (int i = 0; i < T; ++i) {
          const int64_t at = (m0 + i) * half + c / 2;
          acc[r][i][0] =
              _mm512_fmadd_ps(we, _mm512_loadu_ps(p.xe + at), acc[r][i][0]);
          acc[r][i][1] =
              _mm512_fmadd_ps(wo, _mm512_loadu_ps(p.xo + at), acc[r][i][1]);
        }
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < T; ++i)
      p.y[(m0 + i) * p.n + o0 + r] =
          _mm512_reduce_add_ps(_mm512_add_ps(acc[r][i][0], acc[r][i][1]));
}

#elif defined(__AVX2__)

constexpr int kMaxTile = 4;  // 16 vector registers
template <int T>
constexpr int kRowsOfW = T == 1 ? 4 : (T == 2 ? 2 : 1);

// The 16-entry table as two 8-lane halves, read by index (0..15) per lane.
inline __m256 lookup(__m256 lo, __m256 hi, __m256i idx) {
  const __m256 a = _mm256_permutevar8x32_ps(lo, idx);
  const __m256 b = _mm256_permutevar8x32_ps(hi, idx);
  // Bit 3 of the index, moved to the sign bit, picks the upper half.
  return _mm256_blendv_ps(a, b, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

template <int R, int T>
void tile(const Problem& p, int64_t o0, int64_t m0) {
  const int64_t half = p.k / 2, nb = p.k / p.bs;
  __m256 acc[R][T][2];
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < T; ++i)
      acc[r][i][0] = acc[r][i][1] = _mm256_setzero_ps();
  const __m256i low = _mm256_set1_epi32(15);
  for (int64_t b = 0; b < nb; ++b) {
    __m256 t0[R], t1[R];
    for (int r = 0; r < R; ++r) {
      const int64_t at = (o0 + r) * nb + b;
      const __m256 s = _mm256_set1_ps(p.scale[at]);
      t0[r] = _mm256_mul_ps(_mm256_loadu_ps(p.table), s);
      t1[r] = _mm256_mul_ps(_mm256_loadu_ps(p.table + 8), s);
      if (p.minimum) {
        const __m256 mn = _mm256_set1_ps(p.minimum[at]);
        t0[r] = _mm256_add_ps(t0[r], mn);
        t1[r] = _mm256_add_ps(t1[r], mn);
      }
    }
    for (int64_t c = b * p.bs; c < (b + 1) * p.bs; c += 16) {
      for (int r = 0; r < R; ++r) {
        const __m128i bytes = _mm_loadl_epi64(
            reinterpret_cast<const __m128i*>(p.codes + (o0 + r) * half + c / 2));
        const __m256i q = _mm256_cvtepu8_epi32(bytes);
        const __m256 we = lookup(t0[r], t1[r], _mm256_srli_epi32(q, 4));
        const __m256 wo = lookup(t0[r], t1[r], _mm256_and_si256(q, low));
        for (int i = 0; i < T; ++i) {
          const int64_t at = (m0 + i) * half + c / 2;
          acc[r][i][0] =
              _mm256_fmadd_ps(we, _mm256_loadu_ps(p.xe + at), acc[r][i][0]);
          acc[r][i][1] =
              _mm256_fmadd_ps(wo, _mm256_loadu_ps(p.xo + at), acc[r][i][1]);
        }
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < T; ++i)
      p.y[(m0 + i) * p.n + o0 + r] =
          hsum(_mm256_add_ps(acc[r][i][0], acc[r][i][1]));
}

#else

constexpr int kMaxTile = 4;
template <int T>
constexpr int kRowsOfW = 1;

template <int R, int T>
void tile(const Problem& p, int64_t o0, int64_t m0) {
  const int64_t half = p.k / 2, nb = p.k / p.bs;
  for (int r = 0; r < R; ++r) {
    const int64_t o = o0 + r;
    float acc[T] = {};
    const uint8_t* row = p.codes + o * half;
    float t[16];
    for (int64_t b = 0; b < nb; ++b) {
      const float s = p.scale[o * nb + b];
      for (int j = 0; j < 16; ++j) {
        const float v = p.table[j] * s;
        t[j] = p.minimum ? v + p.minimum[o * nb + b] : v;
      }
      for (int64_t j = b * p.bs / 2; j < (b + 1) * p.bs / 2; ++j) {
        const float we = t[row[j] >> 4], wo = t[row[j] & 15];
        for (int i = 0; i < T; ++i) {
          const int64_t at = (m0 + i) * half + j;
          acc[i] += we * p.xe[at] + wo * p.xo[at];
        }
      }
    }
    for (int i = 0; i < T; ++i) p.y[(m0 + i) * p.n + o] = acc[i];
  }
}

#endif

template <int T>
void rows_of(const Problem& p, int64_t r0, int64_t r1, int64_t m0) {
  constexpr int R = kRowsOfW<T>;
  int64_t o = r0;
  for (; o + R <= r1; o += R) tile<R, T>(p, o, m0);
  for (; o < r1; ++o) tile<1, T>(p, o, m0);
}

template <int T>
void rows_upto(const Problem& p, int64_t r0, int64_t r1, int64_t m0,
               int64_t t) {
  if constexpr (T > 1) {
    if (t < T) return rows_upto<T - 1>(p, r0, r1, m0, t);
  }
  rows_of<T>(p, r0, r1, m0);
}

void rows(const Problem& p, int64_t r0, int64_t r1) {
  for (int64_t m0 = 0; m0 < p.m; m0 += kMaxTile)
    rows_upto<kMaxTile>(p, r0, r1, m0, std::min<int64_t>(kMaxTile, p.m - m0));
}

// Rows are handed out in chunks from a shared counter: the calling thread
// works too, so the call finishes even if no pool thread ever picks up a
// task (a late task finds no chunk left and returns). The state is shared
// so that a late task never reads a finished call's stack.
struct Work {
  Problem p;
  int64_t chunk, chunks;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  std::vector<float> xs;  // the even and odd planes of x
};

void drain(Work& w) {
  for (;;) {
    const int64_t c = w.next.fetch_add(1, std::memory_order_relaxed);
    if (c >= w.chunks) return;
    rows(w.p, c * w.chunk, std::min(w.p.n, (c + 1) * w.chunk));
    w.done.fetch_add(1, std::memory_order_release);
  }
}

// Below this many multiply-adds a call runs on the calling thread alone.
constexpr int64_t kParallelMacs = int64_t{1} << 17;

ffi::Error Matmul4(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                   ffi::Buffer<ffi::U8> codes, ffi::Buffer<ffi::F32> scale,
                   ffi::Buffer<ffi::F32> minimum, ffi::Buffer<ffi::F32> table,
                   ffi::ResultBuffer<ffi::F32> y, int64_t has_minimum) {
  const auto xd = x.dimensions(), sd = scale.dimensions();
  const auto cd = codes.dimensions();
  if (xd.size() != 2 || sd.size() != 2 || cd.size() != 2)
    return ffi::Error::InvalidArgument("matmul4: x, codes, scale must be 2-D");
  const int64_t m = xd[0], k = xd[1], n = sd[0], nb = sd[1];
  if (nb <= 0 || k % nb || cd[0] != n || cd[1] * 2 != k)
    return ffi::Error::InvalidArgument("matmul4: inconsistent shapes");
  const int64_t bs = k / nb;
  if (bs % kStep || table.element_count() != 16)
    return ffi::Error::InvalidArgument("matmul4: block size or table");
  if (has_minimum && minimum.element_count() != n * nb)
    return ffi::Error::InvalidArgument("matmul4: minimum shape");

  auto w = std::make_shared<Work>();
  const int64_t half = k / 2;
  w->xs.resize(2 * m * half);
  float* xe = w->xs.data();
  float* xo = xe + m * half;
  const float* xp = x.typed_data();
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < half; ++j) {
      xe[i * half + j] = xp[i * k + 2 * j];
      xo[i * half + j] = xp[i * k + 2 * j + 1];
    }
  w->p = Problem{xe, xo, m, k, n, bs, codes.typed_data(), scale.typed_data(),
                 has_minimum ? minimum.typed_data() : nullptr,
                 table.typed_data(), y->typed_data()};

  const int64_t threads = pool.num_threads();
  if (threads <= 1 || m * n * k < kParallelMacs) {
    rows(w->p, 0, n);
    return ffi::Error::Success();
  }
  // A few chunks per thread, so that an uneven start evens out.
  w->chunks = std::min<int64_t>(n, 4 * (threads + 1));
  w->chunk = (n + w->chunks - 1) / w->chunks;
  w->chunks = (n + w->chunk - 1) / w->chunk;
  for (int64_t t = 0; t < threads; ++t) pool.Schedule([w] { drain(*w); });
  drain(*w);
  while (w->done.load(std::memory_order_acquire) < w->chunks) {
#if defined(__AVX2__) || defined(__AVX512F__)
    _mm_pause();
#endif
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(QloraMatmul4, Matmul4,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("has_minimum"));

// Which instruction set the build uses, for the Python side to report.
extern "C" const char* qlora_matmul4_isa() {
#if defined(__AVX512F__)
  return "avx512";
#elif defined(__AVX2__)
  return "avx2";
#else
  return "generic";
#endif
}
