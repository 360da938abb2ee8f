// Declarations of everything vaultkern._C exports (bound in bindings.cpp).
//
// The norm ops mirror the torch references in vaultkern/ops/*.py exactly
// (same arguments, shapes, result dtype: fp64 for fp64 inputs, fp32 otherwise).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <string>
#include <type_traits>

#include "chacha20.h"

// VK_CHECK(cond, parts...): TORCH_CHECK with a message built from strings only.
//
// Numbers, dtypes, devices and shapes are turned into text with std::to_string /
// c10::toString / Device::str, never with std::ostream: on the GPU machine
// (torch 2.11+cu130, g++ 13.3) any std::ostream numeric insertion compiled into an
// extension crashed the process (SIGSEGV in std::codecvt via ostream::_M_insert<long>,
// cuda-gdb backtrace; bench/diag_cpp_errors.py shows it for a bare load_inline
// extension too), and TORCH_CHECK formats its extra arguments with an ostringstream.
// A single std::string argument is passed through without a stream.
#define VK_CHECK(cond, ...) TORCH_CHECK(cond, ::vaultkern::detail::message(__VA_ARGS__))

namespace vaultkern {

namespace detail {
inline std::string text(const std::string& s) { return s; }
inline std::string text(const char* s) { return s; }
template <typename T, typename std::enable_if<std::is_integral<T>::value, int>::type = 0>
inline std::string text(T v) { return std::to_string(v); }
inline std::string text(double v) { return std::to_string(v); }
inline std::string text(c10::ScalarType t) { return c10::toString(t); }
inline std::string text(const c10::Device& d) { return d.str(); }
inline std::string text(c10::IntArrayRef sizes) {
  std::string out = "[";
  for (size_t i = 0; i < sizes.size(); ++i) out += (i ? ", " : "") + std::to_string(sizes[i]);
  return out + "]";
}
template <typename... Args>
std::string message(const Args&... args) {
  std::string out;
  ((out += text(args)), ...);
  return out;
}
}  // namespace detail

// ---- per-example norms and clipped gradients (norms.cpp) -------------------
at::Tensor linear_norm_sq(const at::Tensor& a, const at::Tensor& g, const std::string& mode);
at::Tensor linear_cross(const at::Tensor& a1, const at::Tensor& g1, const at::Tensor& a2,
                        const at::Tensor& g2);
at::Tensor embedding_norm_sq(const at::Tensor& ids, const at::Tensor& g);
at::Tensor embedding_linear_cross(const at::Tensor& ids, const at::Tensor& e, const at::Tensor& h,
                                  const at::Tensor& z);
at::Tensor clipped_embedding_grad(const at::Tensor& ids, const at::Tensor& g, const at::Tensor& clip,
                                  int64_t num_embeddings);

// ---- ChaCha20 stream and Gaussian noise (noise.cpp) ------------------------
at::Tensor chacha20_block(const at::Tensor& key, int64_t counter, const at::Tensor& nonce);
at::Tensor chacha20_stream(const at::Tensor& key, const at::Tensor& nonce, int64_t counter,
                           int64_t nbytes, const at::Device& device);
at::Tensor gaussian(int64_t n, const at::Tensor& key, const at::Tensor& nonce, int64_t counter,
                    at::ScalarType dtype, const at::Device& device);
at::Tensor secure_noisy_scale(const at::Tensor& summed, double std, double scale,
                              const at::Tensor& key, const at::Tensor& nonce);
at::Tensor noisy_scale(const at::Tensor& summed, double std, double scale, const at::Tensor& key,
                       int64_t step, int64_t offset);

bool built_with_cuda();
bool built_with_openmp();

#ifdef VAULTKERN_WITH_CUDA
// CUDA launchers (noise_cuda.cu); arguments are validated by the callers in
// noise.cpp. Streams are addressed by a 64-bit block index (chacha::block_at)
// and Gaussian samples by a 64-bit sample index (sample s lives in block s/2).
void chacha20_stream_cuda(const chacha::Key& key, const chacha::Nonce& nonce,
                          uint64_t first_block, at::Tensor& out);
// out[j] = ξ(first_sample + j) when `summed` is undefined, else
// out[j] = (summed[j] + std·ξ(first_sample + j))·scale; out is contiguous.
void gaussian_cuda(const chacha::Key& key, const chacha::Nonce& nonce, uint64_t first_sample,
                   const at::Tensor& summed, double std, double scale, at::Tensor& out);
#endif

}  // namespace vaultkern
