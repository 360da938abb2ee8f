"""Which C++ error paths crash the process on this machine? (diagnostic for csrc/)

    python bench/diag_cpp_errors.py

On the GPU machine (torch 2.11+cu130, g++ 13) some argument errors raised from
vaultkern._C killed the process with SIGSEGV instead of raising RuntimeError. This
builds a tiny extension with torch.utils.cpp_extension.load_inline and runs each error
path in its own subprocess, printing "ok" (the expected exception arrived), "crash
(signal)" or the unexpected outcome, so the failing ingredient (c10::Error itself,
its message formatting, a second throw, std:: exceptions) can be told apart.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile

SOURCE = r"""
#include <torch/extension.h>
#include <sstream>
#include <stdexcept>

void check_plain() { TORCH_CHECK(false, "plain message"); }
void check_int(int64_t n) { TORCH_CHECK(false, "n = ", n); }
void check_device(const at::Tensor& t) { TORCH_CHECK(false, "device ", t.device()); }
void check_sizes(const at::Tensor& t) { TORCH_CHECK(false, "shape ", t.sizes()); }
std::string format_int(int64_t n) { std::ostringstream ss; ss << "n = " << n; return ss.str(); }
std::string c10_str_int(int64_t n) { return c10::str("n = ", n); }
void std_runtime(int64_t n) { throw std::runtime_error("n = " + std::to_string(n)); }
void std_invalid(int64_t n) {
  std::ostringstream ss; ss << "n = " << n; throw std::invalid_argument(ss.str());
}
"""
FUNCTIONS = ["check_plain", "check_int", "check_device", "check_sizes", "format_int",
             "c10_str_int", "std_runtime", "std_invalid"]

CASES = {  # name: python statements run after `m = load()`
    "TORCH_CHECK, literal message": "m.check_plain()",
    "TORCH_CHECK, int64 in message": "m.check_int(3)",
    "TORCH_CHECK, device in message": "m.check_device(torch.zeros(1))",
    "TORCH_CHECK, sizes in message": "m.check_sizes(torch.zeros(2, 3))",
    "ostringstream << int64, no throw": "print(m.format_int(3))",
    "c10::str(int64), no throw": "print(m.c10_str_int(3))",
    "throw std::runtime_error": "m.std_runtime(3)",
    "throw std::invalid_argument (ostringstream message)": "m.std_invalid(3)",
    "literal TORCH_CHECK, then int64 TORCH_CHECK": "\n".join([
        "try:\n    m.check_plain()\nexcept RuntimeError:\n    pass", "m.check_int(3)"]),
    "int64 TORCH_CHECK twice": "\n".join([
        "try:\n    m.check_int(3)\nexcept RuntimeError:\n    pass", "m.check_int(4)"]),
}


# the flags setup.py builds vaultkern._C with, and none
VARIANTS = {"setup.py flags (-O3 -g0 -fopenmp)": (["-O3", "-g0", "-fopenmp"], ["-fopenmp"]),
            "no extra flags": ([], [])}


def main() -> int:
    for variant, (cflags, ldflags) in VARIANTS.items():
        print(f"== {variant}")
        if run_variant(variant, cflags, ldflags) != 0:
            return 1
    return 0


def run_variant(variant, cflags, ldflags) -> int:
    build = tempfile.mkdtemp(prefix="vk_diag_")
    name = "vk_diag_" + str(abs(hash(variant)) % 10**6)
    loader = (
        "import torch\nfrom torch.utils.cpp_extension import load_inline\n"
        f"def load():\n    return load_inline({name!r}, cpp_sources=[{SOURCE!r}], "
        f"functions={FUNCTIONS!r}, build_directory={build!r}, verbose=False, "
        f"extra_cflags={cflags!r}, extra_ldflags={ldflags!r})\n"
        "m = load()\n")
    first = subprocess.run([sys.executable, "-c", loader], capture_output=True, text=True)
    if first.returncode != 0:
        print("build failed:\n" + first.stderr[-3000:])
        return 1
    env = dict(os.environ, TORCH_SHOW_CPP_STACKTRACES=os.environ.get("TORCH_SHOW_CPP_STACKTRACES", "0"))
    for name, body in CASES.items():
        script = loader + "try:\n" + "".join("    " + line + "\n" for line in body.splitlines()) + \
            "except (RuntimeError, ValueError) as e:\n    print('raised', type(e).__name__, str(e).splitlines()[0])\n"
        r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
        if r.returncode < 0:
            outcome = f"CRASH (signal {-r.returncode})"
        elif r.returncode != 0:
            outcome = f"exit {r.returncode}: {r.stderr.strip().splitlines()[-1:]}"
        else:
            outcome = "ok: " + r.stdout.strip().replace("\n", " | ")
        print(f"{name:<55} {outcome}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
