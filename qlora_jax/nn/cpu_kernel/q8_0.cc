// A fused Q8_0 matmul for the CPU, called from XLA through its FFI:
// y [m, n] = x [m, k] @ W.T, W [n, k] given as int8 codes and one float16
// scale per block of 32 columns of a row (GGML's Q8_0: a decoding head).
//
// Element (o, c) of W is float(scale[o, c / 32]) * code[o, c] in float32,
// which is exact (11 by 8 significant bits): the kernel multiplies by the
// very weights a float32 copy of d * q holds, and sums the products in
// float32 in its own order. It reads 8.5 bits per weight.
//
// A tile is one row of W by up to 8 rows of x, every product of a row of
// W with a row of x accumulated in registers (for a single row of x, four
// accumulators, one per 8 columns of a block: four multiply-add chains at
// once). Tiles of several rows of W measured slower on an AVX2 EPYC. The
// AVX2 path (also taken by AVX-512 builds) widens 8 codes at a time to
// float; the generic path is plain loops. Rows of W are shared out among
// XLA's intra-op threads when a call is large enough.

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>

#if defined(__AVX2__) || defined(__F16C__)
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kBlock = 32;

struct ProblemQ8 {
  const float* x;        // [m, k]
  int64_t m, k, n;
  const int8_t* codes;   // [n, k]
  const uint16_t* bits;  // [n, k / 32] float16 bit patterns
  float* y;              // [m, n]
};

// IEEE half to float, exactly (normal, subnormal, zero, inf, NaN).
inline float half_to_float(uint16_t h) {
#if defined(__F16C__)
  return _cvtsh_ss(h);
#else
  const uint32_t sign = uint32_t(h & 0x8000) << 16;
  uint32_t exp = (h >> 10) & 0x1f, man = h & 0x3ff, out;
  if (exp == 0x1f) {
    out = sign | 0x7f800000u | (man << 13);
  } else if (exp != 0) {
    out = sign | ((exp + 112) << 23) | (man << 13);
  } else if (man == 0) {
    out = sign;
  } else {  // subnormal: normalize
    int e = -1;
    do {
      ++e;
      man <<= 1;
    } while (!(man & 0x400));
    out = sign | (uint32_t(112 - e) << 23) | ((man & 0x3ff) << 13);
  }
  float f;
  std::memcpy(&f, &out, sizeof f);
  return f;
#endif
}

#if defined(__AVX2__)

constexpr int kMaxTile = 8;  // rows of x per tile
template <int T>
constexpr int kChains = T == 1 ? 4 : (T <= 3 ? 2 : 1);

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// 8 codes at `p` as float32, times the block's scale.
inline __m256 weights8(const int8_t* p, __m256 d) {
  const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
  return _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes)), d);
}

template <int T>
void tile(const ProblemQ8& p, int64_t o, int64_t m0) {
  constexpr int A = kChains<T>;
  const int64_t nb = p.k / kBlock;
  const int8_t* row = p.codes + o * p.k;
  __m256 acc[T][A];
  for (int i = 0; i < T; ++i)
    for (int a = 0; a < A; ++a) acc[i][a] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const int64_t c0 = b * kBlock;
    const __m256 d = _mm256_set1_ps(half_to_float(p.bits[o * nb + b]));
#pragma GCC unroll 4
    for (int v = 0; v < kBlock / 8; ++v) {
      const __m256 w = weights8(row + c0 + 8 * v, d);
#pragma GCC unroll 8
      for (int i = 0; i < T; ++i)
        acc[i][v % A] = _mm256_fmadd_ps(
            w, _mm256_loadu_ps(p.x + (m0 + i) * p.k + c0 + 8 * v),
            acc[i][v % A]);
    }
  }
  for (int i = 0; i < T; ++i) {
    __m256 sum = acc[i][0];
    for (int a = 1; a < A; ++a) sum = _mm256_add_ps(sum, acc[i][a]);
    p.y[(m0 + i) * p.n + o] = hsum(sum);
  }
}

#else

constexpr int kMaxTile = 4;

template <int T>
void tile(const ProblemQ8& p, int64_t o, int64_t m0) {
  const int64_t nb = p.k / kBlock;
  float acc[T] = {};
  for (int64_t b = 0; b < nb; ++b) {
    const float d = half_to_float(p.bits[o * nb + b]);
    const int8_t* row = p.codes + o * p.k + b * kBlock;
    for (int64_t j = 0; j < kBlock; ++j) {
      const float w = d * float(row[j]);
      for (int i = 0; i < T; ++i)
        acc[i] += w * p.x[(m0 + i) * p.k + b * kBlock + j];
    }
  }
  for (int i = 0; i < T; ++i) p.y[(m0 + i) * p.n + o] = acc[i];
}

#endif

template <int T>
void rows_upto(const ProblemQ8& p, int64_t r0, int64_t r1, int64_t m0,
               int64_t t) {
  if constexpr (T > 1) {
    if (t < T) return rows_upto<T - 1>(p, r0, r1, m0, t);
  }
  for (int64_t o = r0; o < r1; ++o) tile<T>(p, o, m0);
}

void rows(const ProblemQ8& p, int64_t r0, int64_t r1) {
  for (int64_t m0 = 0; m0 < p.m; m0 += kMaxTile)
    rows_upto<kMaxTile>(p, r0, r1, m0, std::min<int64_t>(kMaxTile, p.m - m0));
}

// Rows are handed out in chunks from a shared counter, the calling thread
// working too (as in matmul4.cc): a late task finds no chunk left and
// returns, and the shared state outlives the call.
struct WorkQ8 {
  ProblemQ8 p;
  int64_t chunk, chunks;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
};

void drain(WorkQ8& w) {
  for (;;) {
    const int64_t c = w.next.fetch_add(1, std::memory_order_relaxed);
    if (c >= w.chunks) return;
    rows(w.p, c * w.chunk, std::min(w.p.n, (c + 1) * w.chunk));
    w.done.fetch_add(1, std::memory_order_release);
  }
}

// Below this many multiply-adds a call runs on the calling thread alone.
constexpr int64_t kParallelMacs = int64_t{1} << 17;

ffi::Error MatmulQ8(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                    ffi::Buffer<ffi::S8> codes, ffi::Buffer<ffi::U16> scales,
                    ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions(), cd = codes.dimensions();
  const auto sd = scales.dimensions();
  if (xd.size() != 2 || cd.size() != 2 || sd.size() != 2)
    return ffi::Error::InvalidArgument("matmul_q8_0: x, codes, scales 2-D");
  const int64_t m = xd[0], k = xd[1], n = cd[0];
  if (cd[1] != k || k % kBlock || sd[0] != n || sd[1] * kBlock != k)
    return ffi::Error::InvalidArgument("matmul_q8_0: inconsistent shapes");

  auto w = std::make_shared<WorkQ8>();
  w->p = ProblemQ8{x.typed_data(), m, k, n, codes.typed_data(),
                   scales.typed_data(), y->typed_data()};
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
#if defined(__AVX2__)
    _mm_pause();
#endif
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(QloraMatmulQ8_0, MatmulQ8,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::U16>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
