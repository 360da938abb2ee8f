// ChaCha20 keystream and Gaussian noise on the CPU, and the dispatch to the
// CUDA kernels (noise_cuda.cu) for CUDA devices. The generator itself is in
// chacha20.h, shared with the CUDA code.
#include "vaultkern.h"
#include "noise_simd.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/Config.h>

#include <algorithm>

#ifdef VAULTKERN_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#endif

namespace vaultkern {
namespace {

// RFC 8439's block counter is 32 bits: one (key, nonce) stream has 2^32 blocks.
constexpr uint64_t kRfcBlocks = uint64_t(1) << 32;
constexpr int64_t kGrainBlocks = 256;  // blocks per parallel work unit

uint32_t load_le32(const uint8_t* b) {
  return uint32_t(b[0]) | (uint32_t(b[1]) << 8) | (uint32_t(b[2]) << 16) | (uint32_t(b[3]) << 24);
}

void store_le32(uint32_t w, uint8_t* b) {
  b[0] = uint8_t(w);
  b[1] = uint8_t(w >> 8);
  b[2] = uint8_t(w >> 16);
  b[3] = uint8_t(w >> 24);
}

// The bytes of a uint8 tensor of exactly `nbytes` elements, read on the CPU.
inline at::Tensor byte_tensor(const at::Tensor& t, int64_t nbytes, const char* fn, const char* name) {
  VK_CHECK(t.scalar_type() == at::kByte && t.numel() == nbytes, fn, ": ", name,
              " must be a uint8 tensor of ", nbytes, " bytes, got dtype ", t.scalar_type(),
              " with ", t.numel(), " elements");
  return t.to(at::kCPU).contiguous();
}

inline chacha::Key key_from(const at::Tensor& key, const char* fn) {
  at::Tensor k = byte_tensor(key, 32, fn, "key");
  chacha::Key out;
  for (int i = 0; i < 8; ++i) out.w[i] = load_le32(k.data_ptr<uint8_t>() + 4 * i);
  return out;
}

inline chacha::Nonce nonce_from(const at::Tensor& nonce, const char* fn) {
  at::Tensor n = byte_tensor(nonce, 12, fn, "nonce");
  chacha::Nonce out;
  for (int i = 0; i < 3; ++i) out.w[i] = load_le32(n.data_ptr<uint8_t>() + 4 * i);
  return out;
}

// The stream of one (key, nonce) must fit in 2^32 blocks: counter + blocks.
inline void check_blocks(int64_t counter, uint64_t blocks, const char* fn) {
  VK_CHECK(counter >= 0 && uint64_t(counter) < kRfcBlocks, fn,
              ": counter must be in [0, 2^32), got ", counter);
  VK_CHECK(uint64_t(counter) + blocks <= kRfcBlocks, fn, ": counter ", counter, " + ", blocks,
              " blocks runs past the 2^32-block stream of one key/nonce; use another nonce");
}

inline void check_cuda_build(const at::Device& device, const char* fn) {
#ifndef VAULTKERN_WITH_CUDA
  VK_CHECK(!device.is_cuda(), fn, ": device ", device,
              " requested but vaultkern._C was built without CUDA");
#endif
  VK_CHECK(device.is_cpu() || device.is_cuda(), fn, ": device must be cpu or cuda, got ", device);
}

// Four consecutive blocks side by side, one per lane of a 4×32-bit vector
// (GCC/Clang vector extensions: SSE2 on x86-64, NEON on ARM). Lane l of the
// result is exactly chacha::block_at(key, nonce, index + l), the scalar
// function the CUDA kernels use; this is the same arithmetic, four at a time.
using u32x4 = uint32_t __attribute__((vector_size(16)));

inline u32x4 rotl(u32x4 x, int n) { return (x << n) | (x >> (32 - n)); }

inline void quarter_round(u32x4& a, u32x4& b, u32x4& c, u32x4& d) {
  a += b; d ^= a; d = rotl(d, 16);
  c += d; b ^= c; b = rotl(b, 12);
  a += b; d ^= a; d = rotl(d, 8);
  c += d; b ^= c; b = rotl(b, 7);
}

void blocks4(const chacha::Key& key, const chacha::Nonce& nonce, uint64_t index, uint32_t out[4][16]) {
  const u32x4 zero = {0, 0, 0, 0};
  u32x4 s[16] = {zero + chacha::kSigma0, zero + chacha::kSigma1, zero + chacha::kSigma2,
                 zero + chacha::kSigma3};
  for (int i = 0; i < 8; ++i) s[4 + i] = zero + key.w[i];
  for (int l = 0; l < 4; ++l) {  // block_at: low 32 bits -> counter, high bits -> nonce word 0
    s[12][l] = static_cast<uint32_t>(index + l);
    s[13][l] = nonce.w[0] + static_cast<uint32_t>((index + l) >> 32);
  }
  s[14] = zero + nonce.w[1];
  s[15] = zero + nonce.w[2];
  u32x4 x[16];
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
  for (int i = 0; i < 16; ++i) {
    const u32x4 w = x[i] + s[i];
    for (int l = 0; l < 4; ++l) out[l][i] = w[l];
  }
}

// out[j] = ξ(first + j), or (in[j] + std·ξ(first + j))·scale when `in` is given,
// where ξ(s) is Gaussian sample s of the (key, nonce) stream (chacha20.h).
template <typename scalar_t>
void fill_gaussian_cpu(const chacha::Key& key, const chacha::Nonce& nonce, uint64_t first,
                       int64_t n, const scalar_t* in, double std, double scale, scalar_t* out) {
  if (n == 0) return;
  const uint64_t b0 = first / 2, blocks = (first + n - 1) / 2 - b0 + 1;
  auto emit = [&](uint64_t b, const double xi[2]) {  // samples 2b, 2b + 1 that fall in range
    for (int slot = 0; slot < 2; ++slot) {
      const uint64_t s = 2 * b + slot;
      if (s < first || s >= first + uint64_t(n)) continue;
      const int64_t j = int64_t(s - first);
      out[j] = static_cast<scalar_t>(in ? (double(in[j]) + std * xi[slot]) * scale : xi[slot]);
    }
  };
  // The widest vector path the CPU has takes every block: a sample never depends on the cut
  // (a partial group is computed whole and its extra samples dropped).
  using VectorBlocks = void (*)(const chacha::Key&, const chacha::Nonce&, uint64_t, int64_t,
                                double*);
  static const int64_t lanes = cpu_has_avx512() ? 16 : cpu_has_avx2() ? 8 : 0;
  static const VectorBlocks vector_blocks =
      lanes == 16 ? gaussian_blocks_avx512 : gaussian_blocks_avx2;
  if (lanes) {
    constexpr int64_t kBlocksPerBuffer = 256;  // 4 KiB of samples
    const int64_t groups = int64_t((blocks + lanes - 1) / lanes);
    at::parallel_for(0, groups, kGrainBlocks / lanes, [&](int64_t begin, int64_t end) {
      double buf[2 * kBlocksPerBuffer];
      for (int64_t g = begin; g < end; g += kBlocksPerBuffer / lanes) {
        const int64_t count = std::min(kBlocksPerBuffer / lanes, end - g);
        vector_blocks(key, nonce, b0 + uint64_t(lanes * g), count, buf);
        for (int64_t k = 0; k < lanes * count && lanes * g + k < int64_t(blocks); ++k)
          emit(b0 + uint64_t(lanes * g + k), buf + 2 * k);
      }
    });
    return;
  }
  at::parallel_for(0, int64_t(blocks), kGrainBlocks, [&](int64_t begin, int64_t end) {
    uint32_t words[4][16];
    for (int64_t b4 = begin; b4 < end; b4 += 4) {
      blocks4(key, nonce, b0 + b4, words);
      for (int64_t b = b4; b < std::min(b4 + 4, end); ++b) {
        double xi[2];  // samples 2b and 2b + 1
        chacha::gaussians_from_block(words[b - b4], xi);
        emit(b0 + b, xi);
      }
    }
  });
}

// (summed + std·ξ)·scale on the device of `summed`, ξ(j) = sample first + j.
at::Tensor noisy_scale_impl(const at::Tensor& summed, double std, double scale,
                            const chacha::Key& key, const chacha::Nonce& nonce, uint64_t first,
                            const char* fn) {
  VK_CHECK(at::isFloatingType(summed.scalar_type()), fn,
              ": summed must be a floating-point tensor, got dtype ", summed.scalar_type());
  VK_CHECK(std >= 0.0, fn, ": std must be >= 0, got ", std);
  check_cuda_build(summed.device(), fn);
  at::Tensor in = summed.contiguous();
  at::Tensor out = at::empty(in.sizes(), in.options());
#ifdef VAULTKERN_WITH_CUDA
  if (in.is_cuda()) {
    c10::cuda::CUDAGuard guard(in.device());
    gaussian_cuda(key, nonce, first, in, std, scale, out);
    return out;
  }
#endif
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.scalar_type(), "noisy_scale", [&] {
    fill_gaussian_cpu<scalar_t>(key, nonce, first, in.numel(), in.data_ptr<scalar_t>(), std, scale,
                                out.data_ptr<scalar_t>());
  });
  return out;
}

}  // namespace

at::Tensor chacha20_block(const at::Tensor& key, int64_t counter, const at::Tensor& nonce) {
  const char* fn = "chacha20_block";
  check_blocks(counter, 1, fn);
  uint32_t words[16];
  chacha::block(key_from(key, fn), uint32_t(counter), nonce_from(nonce, fn), words);
  at::Tensor out = at::empty({64}, at::TensorOptions().dtype(at::kByte));
  for (int i = 0; i < 16; ++i) store_le32(words[i], out.data_ptr<uint8_t>() + 4 * i);
  return out;
}

at::Tensor chacha20_stream(const at::Tensor& key, const at::Tensor& nonce, int64_t counter,
                           int64_t nbytes, const at::Device& device) {
  const char* fn = "chacha20_stream";
  VK_CHECK(nbytes >= 0, fn, ": nbytes must be >= 0, got ", nbytes);
  const uint64_t blocks = (uint64_t(nbytes) + 63) / 64;
  check_blocks(counter, blocks, fn);
  check_cuda_build(device, fn);
  const chacha::Key k = key_from(key, fn);
  const chacha::Nonce n = nonce_from(nonce, fn);
  at::Tensor out = at::empty({int64_t(blocks * 64)}, at::TensorOptions().dtype(at::kByte).device(device));
#ifdef VAULTKERN_WITH_CUDA
  if (device.is_cuda()) {
    c10::cuda::CUDAGuard guard(device);
    chacha20_stream_cuda(k, n, uint64_t(counter), out);
    return out.narrow(0, 0, nbytes);
  }
#endif
  uint8_t* op = out.data_ptr<uint8_t>();
  at::parallel_for(0, int64_t(blocks), kGrainBlocks, [&](int64_t begin, int64_t end) {
    uint32_t words[4][16];
    for (int64_t b4 = begin; b4 < end; b4 += 4) {
      blocks4(k, n, uint64_t(counter + b4), words);  // counter + b < 2^32: plain RFC blocks
      for (int64_t b = b4; b < std::min(b4 + 4, end); ++b)
        for (int i = 0; i < 16; ++i) store_le32(words[b - b4][i], op + 64 * b + 4 * i);
    }
  });
  return out.narrow(0, 0, nbytes);
}

at::Tensor gaussian(int64_t n, const at::Tensor& key, const at::Tensor& nonce, int64_t counter,
                    at::ScalarType dtype, const at::Device& device) {
  const char* fn = "gaussian";
  VK_CHECK(n >= 0, fn, ": n must be >= 0, got ", n);
  VK_CHECK(at::isFloatingType(dtype), fn, ": dtype must be floating point, got ", dtype);
  check_blocks(counter, (uint64_t(n) + 1) / 2, fn);
  check_cuda_build(device, fn);
  const chacha::Key k = key_from(key, fn);
  const chacha::Nonce nn = nonce_from(nonce, fn);
  const uint64_t first = 2 * uint64_t(counter);  // sample j lives in block counter + j/2
  at::Tensor out = at::empty({n}, at::TensorOptions().dtype(dtype).device(device));
#ifdef VAULTKERN_WITH_CUDA
  if (device.is_cuda()) {
    c10::cuda::CUDAGuard guard(device);
    gaussian_cuda(k, nn, first, at::Tensor(), 0.0, 1.0, out);
    return out;
  }
#endif
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "gaussian", [&] {
    fill_gaussian_cpu<scalar_t>(k, nn, first, n, nullptr, 0.0, 1.0, out.data_ptr<scalar_t>());
  });
  return out;
}

at::Tensor secure_noisy_scale(const at::Tensor& summed, double std, double scale,
                              const at::Tensor& key, const at::Tensor& nonce) {
  const char* fn = "secure_noisy_scale";
  check_blocks(0, (uint64_t(summed.numel()) + 1) / 2, fn);
  return noisy_scale_impl(summed, std, scale, key_from(key, fn), nonce_from(nonce, fn), 0, fn);
}

// Reproducible noise: `key` is the run's 256-bit master key (the Python side
// derives it from the seed), the step's key is derived from it
// (chacha20.h, derive_step_key), the nonce is zero, and element j uses sample
// offset + j, so the noise of a parameter element depends only on
// (master key, step, its offset). The same sampler as secure_noisy_scale.
at::Tensor noisy_scale(const at::Tensor& summed, double std, double scale, const at::Tensor& key,
                       int64_t step, int64_t offset) {
  const char* fn = "noisy_scale";
  VK_CHECK(offset >= 0, fn, ": offset must be >= 0, got ", offset);
  VK_CHECK(step >= 0, fn, ": step must be >= 0, got ", step);
  const chacha::Key step_key = chacha::derive_step_key(key_from(key, fn), uint64_t(step));
  const chacha::Nonce zero = {{0u, 0u, 0u}};
  return noisy_scale_impl(summed, std, scale, step_key, zero, uint64_t(offset), fn);
}

bool built_with_cuda() {
#ifdef VAULTKERN_WITH_CUDA
  return true;
#else
  return false;
#endif
}

bool built_with_openmp() {
#if defined(_OPENMP) && AT_PARALLEL_OPENMP
  return true;
#else
  return false;
#endif
}

}  // namespace vaultkern
