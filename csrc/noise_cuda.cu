// CUDA kernels for the ChaCha20 keystream and Gaussian noise. One thread
// computes one 64-byte block with the same functions as the CPU code
// (chacha20.h), so a given (key, nonce, block index) yields the same bytes on
// both devices. Grid-stride loops: the result does not depend on the launch
// configuration.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAStream.h>

#include "vaultkern.h"

namespace vaultkern {
namespace {

constexpr int kThreads = 256;

int grid_for(int64_t work_items) {
  const int64_t wanted = (work_items + kThreads - 1) / kThreads;
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, c10::cuda::current_device()));
  const int64_t cap = int64_t(std::max(sms, 1)) * 32;
  return int(std::max<int64_t>(1, std::min(wanted, cap)));
}

__global__ void stream_kernel(chacha::Key key, chacha::Nonce nonce, uint64_t first_block,
                              int64_t blocks, uint4* out) {
  for (int64_t b = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; b < blocks;
       b += int64_t(gridDim.x) * blockDim.x) {
    uint32_t w[16];
    chacha::block_at(key, nonce, first_block + b, w);
    // CUDA devices are little-endian: storing the words is the RFC byte order.
    for (int i = 0; i < 4; ++i) out[4 * b + i] = make_uint4(w[4 * i], w[4 * i + 1], w[4 * i + 2], w[4 * i + 3]);
  }
}

// out[j] = ξ(first + j) or (in[j] + std·ξ(first + j))·scale, j < n; one thread per block.
template <typename scalar_t>
__global__ void gaussian_kernel(chacha::Key key, chacha::Nonce nonce, uint64_t first, int64_t n,
                                const scalar_t* in, double std, double scale, scalar_t* out) {
  const uint64_t b0 = first / 2;
  const int64_t blocks = int64_t((first + n - 1) / 2 - b0 + 1);
  for (int64_t b = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; b < blocks;
       b += int64_t(gridDim.x) * blockDim.x) {
    double xi[2];
    chacha::gaussian_pair(key, nonce, b0 + b, xi);
    for (int slot = 0; slot < 2; ++slot) {
      const uint64_t s = 2 * (b0 + b) + slot;
      if (s < first || s >= first + uint64_t(n)) continue;
      const int64_t j = int64_t(s - first);
      const double v = in ? (static_cast<double>(in[j]) + std * xi[slot]) * scale : xi[slot];
      out[j] = static_cast<scalar_t>(v);
    }
  }
}

}  // namespace

void chacha20_stream_cuda(const chacha::Key& key, const chacha::Nonce& nonce, uint64_t first_block,
                          at::Tensor& out) {
  const int64_t blocks = out.numel() / 64;
  if (blocks == 0) return;
  auto stream = c10::cuda::getCurrentCUDAStream();
  stream_kernel<<<grid_for(blocks), kThreads, 0, stream>>>(
      key, nonce, first_block, blocks, reinterpret_cast<uint4*>(out.data_ptr<uint8_t>()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void gaussian_cuda(const chacha::Key& key, const chacha::Nonce& nonce, uint64_t first_sample,
                   const at::Tensor& summed, double std, double scale, at::Tensor& out) {
  const int64_t n = out.numel();
  if (n == 0) return;
  const int64_t blocks = int64_t((first_sample + n - 1) / 2 - first_sample / 2 + 1);
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "gaussian_cuda", [&] {
    const scalar_t* in = summed.defined() ? summed.data_ptr<scalar_t>() : nullptr;
    gaussian_kernel<scalar_t><<<grid_for(blocks), kThreads, 0, stream>>>(
        key, nonce, first_sample, n, in, std, scale, out.data_ptr<scalar_t>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace vaultkern
