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
// uniforms give two independent N(0,1) by Box–Muller:
//     r = sqrt(-2 ln u1),  θ = 2π u2,   z1 = r cos θ,  z2 = r sin θ
// with u1 = (k1 + 1)/2^53 ∈ (0, 1] (never 0, so ln u1 is finite) and
// u2 = k2/2^53 ∈ [0, 1); both are exact in double.
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
// We therefore release the sum of k = 4 independent Box–Muller normals scaled
// by 1/sqrt(k) = 1/2: the variance is again 1, but the value is a sum of
// independent draws, so it can land on vastly more floating-point numbers and
// the grid structure of any single draw is smoothed out; 1/2 is a power of
// two, so the rescaling itself adds no rounding. The work is done in double
// for every output dtype and rounded once at the end.
//
// Layout: sample j of a stream starting at block `first` uses block
// first + j / 2; samples 2b and 2b+1 take words 0..7 and 8..15 of that block
// (four 64-bit words -> four uniforms -> two Box–Muller pairs -> the four
// normals of one sample). So sample j depends only on
// (key, nonce, first + j/2, j mod 2): splitting a request into pieces, or
// launching it with any grid, gives the same numbers.
// ---------------------------------------------------------------------------

constexpr int kNormalsPerSample = 4;   // k above
constexpr int kSamplesPerBlock = 2;    // 8 uniforms per block / (k normals per sample)

VK_HD double uniform_open_zero(uint32_t lo, uint32_t hi) {  // (0, 1]
  const uint64_t bits = ((static_cast<uint64_t>(hi) << 32) | lo) >> 11;
  return static_cast<double>(bits + 1) * 0x1.0p-53;
}

VK_HD double uniform_closed_zero(uint32_t lo, uint32_t hi) {  // [0, 1)
  const uint64_t bits = ((static_cast<uint64_t>(hi) << 32) | lo) >> 11;
  return static_cast<double>(bits) * 0x1.0p-53;
}

// One N(0,1) sample from 8 words (4 uniforms -> 2 Box–Muller pairs -> 4 normals).
VK_HD double gaussian_from_words(const uint32_t w[8]) {
  const double two_pi = 6.283185307179586476925286766559;
  double sum = 0.0;
  for (int pair = 0; pair < 2; ++pair) {
    const uint32_t* q = w + 4 * pair;
    const double r = sqrt(-2.0 * log(uniform_open_zero(q[0], q[1])));
    const double theta = two_pi * uniform_closed_zero(q[2], q[3]);
    sum += r * cos(theta) + r * sin(theta);
  }
  return 0.5 * sum;  // (z1 + z2 + z3 + z4) / sqrt(4)
}

// Both samples that block `index` yields: out[0] = sample 2b, out[1] = 2b + 1.
VK_HD void gaussian_pair(const Key& key, const Nonce& nonce, uint64_t index, double out[2]) {
  uint32_t words[16];
  block_at(key, nonce, index, words);
  out[0] = gaussian_from_words(words);
  out[1] = gaussian_from_words(words + 8);
}

// ---------------------------------------------------------------------------
// Reproducible-mode key: ChaCha20 used as a PRF. The seed (64 bits) fills key
// words 0-1, the remaining six words hold a fixed domain-separation constant;
// the step fills nonce words 0-1. Block 0 of that stream is computed and its
// first 8 words become the key of the noise stream for (seed, step), whose
// nonce is zero. Different (seed, step) pairs thus get unrelated keys, and the
// noise of element offset + j of that step is sample offset + j of the stream.
// (Reproducible mode is for experiments: a 64-bit seed is not a secret key.)
// ---------------------------------------------------------------------------
VK_HD Key derive_step_key(uint64_t seed, uint64_t step) {
  // ASCII "vaultkern-noise-key-v1\0\0" as little-endian words.
  const Key master = {{static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32),
                       0x6c756176u, 0x72656b74u, 0x6f6e2d6eu, 0x2d657369u, 0x2d79656bu,
                       0x00003176u}};
  const Nonce nonce = {{static_cast<uint32_t>(step), static_cast<uint32_t>(step >> 32), 0u}};
  uint32_t words[16];
  block(master, 0u, nonce, words);
  Key key;
  for (int i = 0; i < 8; ++i) key.w[i] = words[i];
  return key;
}

}  // namespace chacha
}  // namespace vaultkern
