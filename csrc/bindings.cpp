// Python bindings of vaultkern._C.
//
// The norm kernels are exported under the op names that vaultkern.backend
// dispatches to only where bench/cpu_kernels.py measured them faster than the
// torch reference on CPU; the others stay reachable under a leading "_".
#include <torch/extension.h>

#include "vaultkern.h"

#ifndef VAULTKERN_VERSION
#define VAULTKERN_VERSION "unknown"
#endif

namespace py = pybind11;

namespace {

// Accepts "cpu", "cuda", "cuda:1" or a torch.device.
at::Device as_device(const py::object& device) { return at::Device(py::str(device).cast<std::string>()); }

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "vaultkern compiled kernels: per-example norms (CPU), ChaCha20 secure noise (CPU/CUDA)";
  using namespace vaultkern;

  // ---- per-example norms and clipped gradients (semantics: vaultkern/ops/) ----
  m.def("linear_norm_sq", &linear_norm_sq, "‖g_iᵀa_i‖² per example -> [B]",
        py::arg("a"), py::arg("g"), py::arg("mode") = "ghost");
  m.def("linear_cross", &linear_cross, "<g1ᵀa1, g2ᵀa2> per example -> [B]",
        py::arg("a1"), py::arg("g1"), py::arg("a2"), py::arg("g2"));
  m.def("embedding_norm_sq", &embedding_norm_sq, "Σ_v ‖Σ_{t:x_t=v} g_t‖² per example -> [B]",
        py::arg("ids"), py::arg("g"));
  m.def("embedding_linear_cross", &embedding_linear_cross,
        "Σ_{t,s} z_s[x_t](e_t·h_s) per example -> [B]",
        py::arg("ids"), py::arg("e"), py::arg("h"), py::arg("z"));
  m.def("clipped_embedding_grad", &clipped_embedding_grad,
        "Σ_i clip_i Σ_t onehot(ids_it) ⊗ g_it -> [V, d]",
        py::arg("ids"), py::arg("g"), py::arg("clip"), py::arg("num_embeddings"));

  // ---- ChaCha20 and Gaussian noise ----
  m.def("chacha20_block", &chacha20_block, "RFC 8439 block function -> uint8[64]",
        py::arg("key"), py::arg("counter"), py::arg("nonce"));
  m.def(
      "chacha20_stream",
      [](const at::Tensor& key, const at::Tensor& nonce, int64_t counter, int64_t nbytes,
         const py::object& device) { return chacha20_stream(key, nonce, counter, nbytes, as_device(device)); },
      "nbytes of the ChaCha20 keystream starting at block `counter` -> uint8[nbytes]",
      py::arg("key"), py::arg("nonce"), py::arg("counter"), py::arg("nbytes"),
      py::arg("device") = "cpu");
  m.def(
      "gaussian",
      [](int64_t n, const at::Tensor& key, const at::Tensor& nonce, int64_t counter,
         at::ScalarType dtype, const py::object& device) {
        return gaussian(n, key, nonce, counter, dtype, as_device(device));
      },
      "n N(0,1) samples; sample j from stream block counter + j//2",
      py::arg("n"), py::arg("key"), py::arg("nonce"), py::arg("counter") = 0,
      py::arg("dtype") = at::kFloat, py::arg("device") = "cpu");
  m.def("secure_noisy_scale", &secure_noisy_scale,
        "(summed + std·ξ)·scale with ξ from ChaCha20(key, nonce)",
        py::arg("summed"), py::arg("std"), py::arg("scale"), py::arg("key"), py::arg("nonce"));
  // The reproducible DP noise of every path (DPOptimizer without secure_mode): the
  // same ChaCha20 sampler as secure_noisy_scale, keyed by a 256-bit master key.
  m.def("noisy_scale", &noisy_scale,
        "(summed + std·ξ)·scale, ξ[j] = sample offset+j of the stream of (master key, step)",
        py::arg("summed"), py::arg("std"), py::arg("scale"), py::arg("key"), py::arg("step"),
        py::arg("offset") = 0);

  m.def("build_info", [] {
    py::dict info;
    info["cuda"] = built_with_cuda();
    info["openmp"] = built_with_openmp();
    info["version"] = VAULTKERN_VERSION;
    return info;
  }, "How this extension was built: {'cuda', 'openmp', 'version'}");
}
