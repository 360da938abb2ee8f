// The CPU Gaussian sampler of chacha20.h, eight blocks at a time with AVX2 + FMA (x86-64).
//
// Same stream, same transform: block b of (key, nonce) gives samples 2b and 2b + 1 as
// ½ Σ_p r_p cos θ_p and ½ Σ_p r_p sin θ_p over its four Box–Muller pairs (chacha20.h has
// the argument). Here the ChaCha20 rounds run on 8 lanes and log and sincos come from
// SLEEF's 1-ulp vector functions (exported by libtorch_cpu; torch's own vectorised log
// uses them; sqrt is the correctly rounded instruction), where the scalar path calls libm: the two agree to about an ulp per
// sample, not bit for bit. So that a sample never depends on how a request is cut, every
// block of every request goes through this path on a machine that has AVX2 (a partial
// group of 8 is computed whole and the extra samples dropped).
//
// Only this file is compiled for AVX2 (the target pragma below); noise.cpp calls it after
// checking the CPU, so the library still runs on x86-64 without AVX2. It includes no
// header with inline code it calls (chacha20.h only for its types and constants), so no
// AVX2 copy of a shared inline function can replace the baseline one at link time.
#include "noise_simd.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#pragma GCC target("avx2,fma")
#pragma GCC optimize("fp-contract=off")  // the same roundings as the scalar sum of products
#include <immintrin.h>

// SLEEF's AVX2 entry points as libtorch_cpu exports them (sleef.h declares them only when
// the whole file is compiled with -mavx, which this one is not).
extern "C" {
typedef struct {
  __m256d x, y;
} Sleef___m256d_2;
__m256d Sleef_logd4_u10avx2(__m256d);
Sleef___m256d_2 Sleef_sincosd4_u10avx2(__m256d);
}

namespace vaultkern {
namespace {

using chacha::Key;
using chacha::Nonce;

inline __m256i rotl(__m256i x, int n) {
  return _mm256_or_si256(_mm256_slli_epi32(x, n), _mm256_srli_epi32(x, 32 - n));
}

// Rotations by whole bytes are one byte shuffle instead of two shifts and an or.
inline __m256i rotl16(__m256i x) {
  const __m256i idx = _mm256_setr_epi8(2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13,
                                       2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13);
  return _mm256_shuffle_epi8(x, idx);
}

inline __m256i rotl8(__m256i x) {
  const __m256i idx = _mm256_setr_epi8(3, 0, 1, 2, 7, 4, 5, 6, 11, 8, 9, 10, 15, 12, 13, 14,
                                       3, 0, 1, 2, 7, 4, 5, 6, 11, 8, 9, 10, 15, 12, 13, 14);
  return _mm256_shuffle_epi8(x, idx);
}

inline void quarter_round(__m256i& a, __m256i& b, __m256i& c, __m256i& d) {
  a = _mm256_add_epi32(a, b); d = rotl16(_mm256_xor_si256(d, a));
  c = _mm256_add_epi32(c, d); b = rotl(_mm256_xor_si256(b, c), 12);
  a = _mm256_add_epi32(a, b); d = rotl8(_mm256_xor_si256(d, a));
  c = _mm256_add_epi32(c, d); b = rotl(_mm256_xor_si256(b, c), 7);
}

// Words of blocks index .. index + 7, lane l = block index + l (as chacha::block_at).
inline void blocks8(const Key& key, const Nonce& nonce, uint64_t index, __m256i out[16]) {
  __m256i s[16];
  s[0] = _mm256_set1_epi32(int(chacha::kSigma0));
  s[1] = _mm256_set1_epi32(int(chacha::kSigma1));
  s[2] = _mm256_set1_epi32(int(chacha::kSigma2));
  s[3] = _mm256_set1_epi32(int(chacha::kSigma3));
  for (int i = 0; i < 8; ++i) s[4 + i] = _mm256_set1_epi32(int(key.w[i]));
  alignas(32) uint32_t counter[8], word0[8];
  for (int l = 0; l < 8; ++l) {
    counter[l] = static_cast<uint32_t>(index + l);
    word0[l] = nonce.w[0] + static_cast<uint32_t>((index + l) >> 32);
  }
  s[12] = _mm256_load_si256(reinterpret_cast<const __m256i*>(counter));
  s[13] = _mm256_load_si256(reinterpret_cast<const __m256i*>(word0));
  s[14] = _mm256_set1_epi32(int(nonce.w[1]));
  s[15] = _mm256_set1_epi32(int(nonce.w[2]));
  __m256i x[16];
  for (int i = 0; i < 16; ++i) x[i] = s[i];
  for (int round = 0; round < 10; ++round) {
    quarter_round(x[0], x[4], x[8], x[12]);
    quarter_round(x[1], x[5], x[9], x[13]);
    quarter_round(x[2], x[6], x[10], x[14]);
    quarter_round(x[3], x[7], x[11], x[15]);
    quarter_round(x[0], x[5], x[10], x[15]);
    quarter_round(x[1], x[6], x[11], x[12]);
    quarter_round(x[2], x[7], x[8], x[13]);
    quarter_round(x[3], x[4], x[9], x[14]);
  }
  for (int i = 0; i < 16; ++i) out[i] = _mm256_add_epi32(x[i], s[i]);
}

// Unsigned 32-bit lanes (4 of them, from 128 bits) as exact doubles.
inline __m256d u32_to_double(__m128i v) {
  const __m128i flipped = _mm_xor_si128(v, _mm_set1_epi32(int(0x80000000u)));
  return _mm256_add_pd(_mm256_cvtepi32_pd(flipped), _mm256_set1_pd(2147483648.0));
}

// The top 53 bits of hi:lo as an exact double integer: hi·2^21 + (lo >> 11) < 2^53.
inline __m256d top53(__m128i lo, __m128i hi) {
  return _mm256_add_pd(_mm256_mul_pd(u32_to_double(hi), _mm256_set1_pd(2097152.0)),
                       u32_to_double(_mm_srli_epi32(lo, 11)));
}

// Samples of 4 blocks (one half of the 8 lanes): cos halves and sin halves.
inline void gaussians4(const __m128i w[16], __m256d& cos_half, __m256d& sin_half) {
  const __m256d ulp53 = _mm256_set1_pd(0x1.0p-53), one = _mm256_set1_pd(1.0);
  const __m256d minus_two = _mm256_set1_pd(-2.0);
  const __m256d two_pi = _mm256_set1_pd(6.283185307179586476925286766559);
  __m256d c_sum = _mm256_setzero_pd(), s_sum = _mm256_setzero_pd();
  for (int pair = 0; pair < 4; ++pair) {
    const __m128i* q = w + 4 * pair;
    const __m256d u1 = _mm256_mul_pd(_mm256_add_pd(top53(q[0], q[1]), one), ulp53);  // (0, 1]
    const __m256d u2 = _mm256_mul_pd(top53(q[2], q[3]), ulp53);                     // [0, 1)
    const __m256d r = _mm256_sqrt_pd(_mm256_mul_pd(minus_two, Sleef_logd4_u10avx2(u1)));
    const Sleef___m256d_2 sc = Sleef_sincosd4_u10avx2(_mm256_mul_pd(two_pi, u2));
    c_sum = _mm256_add_pd(c_sum, _mm256_mul_pd(r, sc.y));  // .x = sin, .y = cos
    s_sum = _mm256_add_pd(s_sum, _mm256_mul_pd(r, sc.x));
  }
  cos_half = _mm256_mul_pd(_mm256_set1_pd(0.5), c_sum);
  sin_half = _mm256_mul_pd(_mm256_set1_pd(0.5), s_sum);
}

}  // namespace

void gaussian_blocks_avx2(const chacha::Key& key, const chacha::Nonce& nonce, uint64_t first,
                          int64_t groups, double* out) {
  for (int64_t g = 0; g < groups; ++g) {
    __m256i words[16];
    blocks8(key, nonce, first + 8 * uint64_t(g), words);
    for (int half = 0; half < 2; ++half) {
      __m128i w[16];
      for (int i = 0; i < 16; ++i)
        w[i] = half ? _mm256_extracti128_si256(words[i], 1) : _mm256_castsi256_si128(words[i]);
      __m256d c, s;
      gaussians4(w, c, s);
      // interleave: block k gives samples (cos_k, sin_k)
      const __m256d lo = _mm256_unpacklo_pd(c, s), hi = _mm256_unpackhi_pd(c, s);
      double* dst = out + 16 * g + 8 * half;
      _mm256_storeu_pd(dst, _mm256_permute2f128_pd(lo, hi, 0x20));
      _mm256_storeu_pd(dst + 4, _mm256_permute2f128_pd(lo, hi, 0x31));
    }
  }
}

bool cpu_has_avx2() {
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}

}  // namespace vaultkern

#else  // not x86-64 with GCC/Clang: the scalar path only

namespace vaultkern {
void gaussian_blocks_avx2(const chacha::Key&, const chacha::Nonce&, uint64_t, int64_t, double*) {}
bool cpu_has_avx2() { return false; }
}  // namespace vaultkern

#endif
