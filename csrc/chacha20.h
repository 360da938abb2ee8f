// ChaCha20 (RFC 8439) and the Gaussian sampler built on its stream.
//
// Header-only and usable from host and device code: the CPU functions in
// noise.cpp and the CUDA kernels in noise_cuda.cu call exactly these
// functions, so both produce the same stream for the same key/nonce/counter.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define VK_HD __host__ __device__ __forceinline__
#else
#define VK_HD inline
#endif

namespace vaultkern {
namespace chacha {

// 256-bit key and 96-bit nonce as little-endian 32-bit words (RFC 8439 §2.3).
struct Key {
  uint32_t w[8];
};
struct Nonce {
  uint32_t w[3];
};

// The four constant words "expand 32-byte k" that open every block's state.
constexpr uint32_t kSigma0 = 0x61707865u, kSigma1 = 0x3320646eu, kSigma2 = 0x79622d32u,
                   kSigma3 = 0x6b206574u;

VK_HD uint32_t rotl32(uint32_t x, int n) { return (x << n) | (x >> (32 - n)); }

// RFC 8439 §2.1: a += b; d ^= a; d <<<= 16; c += d; b ^= c; b <<<= 12; ...
VK_HD void quarter_round(uint32_t& a, uint32_t& b, uint32_t& c, uint32_t& d) {
  a += b; d ^= a; d = rotl32(d, 16);
  c += d; b ^= c; b = rotl32(b, 12);
  a += b; d ^= a; d = rotl32(d, 8);
  c += d; b ^= c; b = rotl32(b, 7);
}

// RFC 8439 §2.3: the block function. State = 4 constant words ("expand
// 32-byte k"), 8 key words, the 32-bit block counter, 3 nonce words; 20 rounds
// (10 column + 10 diagonal rounds); output = rounds(state) + state, as 16
// words that serialise little-endian into the 64-byte keystream block.
VK_HD void block(const Key& key, uint32_t counter, const Nonce& nonce, uint32_t out[16]) {
  uint32_t s[16] = {kSigma0,     kSigma1,     kSigma2,     kSigma3,
                    key.w[0],    key.w[1],    key.w[2],    key.w[3],
                    key.w[4],    key.w[5],    key.w[6],    key.w[7],
                    counter,     nonce.w[0],  nonce.w[1],  nonce.w[2]};
  uint32_t x[16];
  for (int i = 0; i < 16; ++i) x[i] = s[i];
  for (int round = 0; round < 10; ++round) {
    quarter_round(x[0], x[4], x[8], x[12]);  // columns
    quarter_round(x[1], x[5], x[9], x[13]);
    quarter_round(x[2], x[6], x[10], x[14]);
    quarter_round(x[3], x[7], x[11], x[15]);
    quarter_round(x[0], x[5], x[10], x[15]);  // diagonals
    quarter_round(x[1], x[6], x[11], x[12]);
    quarter_round(x[2], x[7], x[8], x[13]);
    quarter_round(x[3], x[4], x[9], x[14]);
  }
  for (int i = 0; i < 16; ++i) out[i] = x[i] + s[i];
}

// Block number `index` of a stream that may run past 2^32 blocks: the low 32
// bits go into the RFC's block counter and the high 32 bits are added to the
// first nonce word. For index < 2^32 this is exactly RFC 8439 (the secure
// entry points refuse larger indices); the reproducible generator uses a zero
// nonce and therefore a 96-bit counter.
VK_HD void block_at(const Key& key, const Nonce& nonce, uint64_t index, uint32_t out[16]) {
  Nonce n = nonce;
  n.w[0] += static_cast<uint32_t>(index >> 32);
  block(key, static_cast<uint32_t>(index), n, out);
}

// ---------------------------------------------------------------------------
// Gaussian samples.
//
// One 64-byte block = 8 little-endian 64-bit words. Each word gives a uniform
// double from its top 53 bits (the full precision of a double mantissa). Two
// uniforms give one Box–Muller pair (r, θ):
//     r = sqrt(-2 ln u1),  θ = 2π u2,   r cos θ and r sin θ independent N(0,1)
// with u1 = (k1 + 1)/2^53 ∈ (0, 1] (never 0, so ln u1 is finite) and
// u2 = k2/2^53 ∈ [0, 1); both are exact in double. So one block holds four
// independent pairs (r_p, θ_p), p = 0..3.
//
// Mitigation against floating-point attacks. A sampler that computes a
// Gaussian in floating point does not produce a continuous distribution: its
// outputs lie on an irregular grid fixed by the transform and the rounding of
// each step, and that grid (gaps, local density, unreachable values) looks
// different around x than around x + Δ. When the noisy value summed + σξ is
// released, an observer who knows the sampler can sometimes tell from the
// released float alone which of two neighbouring inputs produced it, which
// breaks the DP guarantee no matter how large σ is (Mironov 2012 showed this
// for the Laplace mechanism; the same holds for textbook Gaussian samplers).
// We therefore release the sum of k = 4 independent normals scaled by
// 1/sqrt(k) = 1/2, each from its own pair (r_p, θ_p):
//     sample 2b     = ½ Σ_p r_p cos θ_p,     sample 2b + 1 = ½ Σ_p r_p sin θ_p
// Each sample thus has four independent radii and angles (summing r cos θ and
// r sin θ of one pair would be √2·r·cos(θ − π/4), one draw in disguise), and
// the two samples of a block are independent because cos and sin of a
// Box–Muller pair are. The variance is again 1, the value can land on vastly
// more floating-point numbers and the grid of any single draw is smoothed out;
// 1/2 is a power of two, so the rescaling adds no rounding. The work is done in
// double for every output dtype and rounded once at the end.
//
// Tails: r ≤ sqrt(2·53·ln 2) ≈ 8.57, so |ξ| ≤ 2·8.57 ≈ 17.1; a standard
// normal exceeds 17 with probability ≈ 1e-64, so the truncation is far beyond
// any δ in use (per coordinate, the mass a shift by the sensitivity moves out
// of the support is below the normal density at ≈ 16, ≈ 1e-56).
//
// Layout: sample j of a stream starting at block `first` is slot j mod 2 of
// block first + j / 2. So sample j depends only on (key, nonce, first + j/2,
// j mod 2): splitting a request into pieces, or launching it with any grid,
// gives the same numbers.
// ---------------------------------------------------------------------------

constexpr int kNormalsPerSample = 4;   // k above
constexpr int kSamplesPerBlock = 2;    // 4 pairs per block, cos halves and sin halves

VK_HD double uniform_open_zero(uint32_t lo, uint32_t hi) {  // (0, 1]
  const uint64_t bits = ((static_cast<uint64_t>(hi) << 32) | lo) >> 11;
  return static_cast<double>(bits + 1) * 0x1.0p-53;
}

VK_HD double uniform_closed_zero(uint32_t lo, uint32_t hi) {  // [0, 1)
  const uint64_t bits = ((static_cast<uint64_t>(hi) << 32) | lo) >> 11;
  return static_cast<double>(bits) * 0x1.0p-53;
}

// The two N(0,1) samples of one block's 16 words (4 pairs -> 8 normals -> 2 samples).
VK_HD void gaussians_from_block(const uint32_t w[16], double out[2]) {
  const double two_pi = 6.283185307179586476925286766559;
  double cos_sum = 0.0, sin_sum = 0.0;
  for (int pair = 0; pair < 4; ++pair) {
    const uint32_t* q = w + 4 * pair;
    const double r = sqrt(-2.0 * log(uniform_open_zero(q[0], q[1])));
    const double theta = two_pi * uniform_closed_zero(q[2], q[3]);
    cos_sum += r * cos(theta);
    sin_sum += r * sin(theta);
  }
  out[0] = 0.5 * cos_sum;  // (z1 + z2 + z3 + z4) / sqrt(4), four independent pairs
  out[1] = 0.5 * sin_sum;
}

// Both samples that block `index` yields: out[0] = sample 2b, out[1] = 2b + 1.
VK_HD void gaussian_pair(const Key& key, const Nonce& nonce, uint64_t index, double out[2]) {
  uint32_t words[16];
  block_at(key, nonce, index, words);
  gaussians_from_block(words, out);
}

// ---------------------------------------------------------------------------
// Reproducible-mode keys: ChaCha20 used as a PRF. The master key (256 bits,
// derived from the seed on the Python side: SHA-256) keys a block whose nonce
// holds the step and a domain-separation word; its first 8 words become the
// key of the noise stream of that step, whose nonce is zero. Different steps
// thus get unrelated keys, and the noise of element offset + j of that step
// is sample offset + j of the stream. Secure mode differs only in where the
// key comes from (os.urandom instead of a seed).
// ---------------------------------------------------------------------------
VK_HD Key derive_step_key(const Key& master, uint64_t step) {
  const uint32_t kNoiseDomain = 0x31657369u;  // ASCII "ise1": the noise's step keys
  const Nonce nonce = {{static_cast<uint32_t>(step), static_cast<uint32_t>(step >> 32),
                        kNoiseDomain}};
  uint32_t words[16];
  block(master, 0u, nonce, words);
  Key key;
  for (int i = 0; i < 8; ++i) key.w[i] = words[i];
  return key;
}

}  // namespace chacha
}  // namespace vaultkern
