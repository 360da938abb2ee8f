// The vector Gaussian samplers (noise_avx2.cpp, noise_avx512.cpp); noise.cpp uses the widest
// one the CPU has, for every block, so that a sample never depends on how a request is cut.
#pragma once

#include <cstdint>

#include "chacha20.h"

namespace vaultkern {

// Samples 2b, 2b + 1 of blocks b = first .. first + 8·groups - 1 into out[16·groups]
// (out[2(b - first)] = sample 2b), as chacha::gaussian_pair computes them, to ~1 ulp.
void gaussian_blocks_avx2(const chacha::Key& key, const chacha::Nonce& nonce, uint64_t first,
                          int64_t groups, double* out);
bool cpu_has_avx2();

// The same with groups of 16 blocks: blocks first .. first + 16·groups - 1 into
// out[32·groups].
void gaussian_blocks_avx512(const chacha::Key& key, const chacha::Nonce& nonce, uint64_t first,
                            int64_t groups, double* out);
bool cpu_has_avx512();

}  // namespace vaultkern
