// The CPU Gaussian sampler of chacha20.h, sixteen blocks at a time with AVX-512F (x86-64).
//
// noise_avx2.cpp with twice the lanes: the ChaCha20 rounds on 16 lanes (with AVX-512's own
// rotate), each block's four Box–Muller pairs in 8-lane doubles, log and sincos from SLEEF's
// 1-ulp AVX-512 functions (exported by libtorch_cpu), sqrt the correctly rounded
// instruction, no contracted multiply-adds. Only this file is compiled for AVX-512; noise.cpp
// calls it after checking the CPU.
#include "noise_simd.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#pragma GCC target("avx512f")
#pragma GCC optimize("fp-contract=off")  // the same roundings as the scalar sum of products
#include <immintrin.h>

extern "C" {
typedef struct {
  __m512d x, y;
} Sleef___m512d_2;
__m512d Sleef_logd8_u10avx512f(__m512d);
Sleef___m512d_2 Sleef_sincosd8_u10avx512f(__m512d);
}

namespace vaultkern {
namespace {

using chacha::Key;
using chacha::Nonce;

inline void quarter_round(__m512i& a, __m512i& b, __m512i& c, __m512i& d) {
  a = _mm512_add_epi32(a, b); d = _mm512_rol_epi32(_mm512_xor_si512(d, a), 16);
  c = _mm512_add_epi32(c, d); b = _mm512_rol_epi32(_mm512_xor_si512(b, c), 12);
  a = _mm512_add_epi32(a, b); d = _mm512_rol_epi32(_mm512_xor_si512(d, a), 8);
  c = _mm512_add_epi32(c, d); b = _mm512_rol_epi32(_mm512_xor_si512(b, c), 7);
}

// Words of blocks index .. index + 15, lane l = block index + l (as chacha::block_at).
inline void blocks16(const Key& key, const Nonce& nonce, uint64_t index, __m512i out[16]) {
  __m512i s[16];
  s[0] = _mm512_set1_epi32(int(chacha::kSigma0));
  s[1] = _mm512_set1_epi32(int(chacha::kSigma1));
  s[2] = _mm512_set1_epi32(int(chacha::kSigma2));
  s[3] = _mm512_set1_epi32(int(chacha::kSigma3));
  for (int i = 0; i < 8; ++i) s[4 + i] = _mm512_set1_epi32(int(key.w[i]));
  alignas(64) uint32_t counter[16], word0[16];
  for (int l = 0; l < 16; ++l) {
    counter[l] = static_cast<uint32_t>(index + l);
    word0[l] = nonce.w[0] + static_cast<uint32_t>((index + l) >> 32);
  }
  s[12] = _mm512_load_si512(counter);
  s[13] = _mm512_load_si512(word0);
  s[14] = _mm512_set1_epi32(int(nonce.w[1]));
  s[15] = _mm512_set1_epi32(int(nonce.w[2]));
  __m512i x[16];
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
  for (int i = 0; i < 16; ++i) out[i] = _mm512_add_epi32(x[i], s[i]);
}

// The top 53 bits of hi:lo as an exact double integer: hi·2^21 + (lo >> 11) < 2^53.
inline __m512d top53(__m256i lo, __m256i hi) {
  return _mm512_add_pd(_mm512_mul_pd(_mm512_cvtepu32_pd(hi), _mm512_set1_pd(2097152.0)),
                       _mm512_cvtepu32_pd(_mm256_srli_epi32(lo, 11)));
}

// Samples of 8 blocks (one half of the 16 lanes): cos halves and sin halves.
inline void gaussians8(const __m256i w[16], __m512d& cos_half, __m512d& sin_half) {
  const __m512d ulp53 = _mm512_set1_pd(0x1.0p-53), one = _mm512_set1_pd(1.0);
  const __m512d minus_two = _mm512_set1_pd(-2.0);
  const __m512d two_pi = _mm512_set1_pd(6.283185307179586476925286766559);
  __m512d c_sum = _mm512_setzero_pd(), s_sum = _mm512_setzero_pd();
  for (int pair = 0; pair < 4; ++pair) {
    const __m256i* q = w + 4 * pair;
    const __m512d u1 = _mm512_mul_pd(_mm512_add_pd(top53(q[0], q[1]), one), ulp53);  // (0, 1]
    const __m512d u2 = _mm512_mul_pd(top53(q[2], q[3]), ulp53);                     // [0, 1)
    const __m512d r = _mm512_sqrt_pd(_mm512_mul_pd(minus_two, Sleef_logd8_u10avx512f(u1)));
    const Sleef___m512d_2 sc = Sleef_sincosd8_u10avx512f(_mm512_mul_pd(two_pi, u2));
    c_sum = _mm512_add_pd(c_sum, _mm512_mul_pd(r, sc.y));  // .x = sin, .y = cos
    s_sum = _mm512_add_pd(s_sum, _mm512_mul_pd(r, sc.x));
  }
  cos_half = _mm512_mul_pd(_mm512_set1_pd(0.5), c_sum);
  sin_half = _mm512_mul_pd(_mm512_set1_pd(0.5), s_sum);
}

}  // namespace

void gaussian_blocks_avx512(const chacha::Key& key, const chacha::Nonce& nonce, uint64_t first,
                            int64_t groups, double* out) {
  for (int64_t g = 0; g < groups; ++g) {
    __m512i words[16];
    blocks16(key, nonce, first + 16 * uint64_t(g), words);
    for (int half = 0; half < 2; ++half) {
      __m256i w[16];
      for (int i = 0; i < 16; ++i)  // (the lane index must be an immediate)
        w[i] = half ? _mm512_extracti64x4_epi64(words[i], 1) : _mm512_castsi512_si256(words[i]);
      __m512d c, s;
      gaussians8(w, c, s);
      alignas(64) double cos_k[8], sin_k[8];
      _mm512_store_pd(cos_k, c);
      _mm512_store_pd(sin_k, s);
      double* dst = out + 32 * g + 16 * half;  // block k gives samples (cos_k, sin_k)
      for (int k = 0; k < 8; ++k) {
        dst[2 * k] = cos_k[k];
        dst[2 * k + 1] = sin_k[k];
      }
    }
  }
}

bool cpu_has_avx512() { return __builtin_cpu_supports("avx512f"); }

}  // namespace vaultkern

#else  // not x86-64 with GCC/Clang: the scalar path only

namespace vaultkern {
void gaussian_blocks_avx512(const chacha::Key&, const chacha::Nonce&, uint64_t, int64_t,
                            double*) {}
bool cpu_has_avx512() { return false; }
}  // namespace vaultkern

#endif
