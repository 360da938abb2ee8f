"""Build of vaultkern and its compiled extension ``vaultkern._C`` (csrc/).

Install with

    pip install --no-build-isolation -e .

after torch is installed. ``--no-build-isolation`` matters: the extension is
compiled against the C++ headers and libraries of the torch that will import
it, so the build must see the installed torch rather than a fresh copy that pip
would put in an isolated build environment (an ABI mismatch otherwise).

The CPU extension (``*.cpp``) is always built. The CUDA sources (``*.cu``) are
added when torch was built with CUDA, a CUDA toolkit is found, and either a GPU
is visible or ``CUDA_HOME`` is set; ``VAULTKERN_CUDA=0`` turns CUDA off,
``VAULTKERN_CUDA=1`` asks for it even without a visible GPU.
"""
import glob
import os
import re

from setuptools import find_packages, setup

try:
    import torch
    from torch.utils import cpp_extension
except ImportError as exc:  # e.g. pip's isolated build environment has no torch
    raise SystemExit(
        f"building vaultkern needs torch installed first ({exc}); then run "
        "`pip install --no-build-isolation -e .`") from exc

HERE = os.path.dirname(os.path.abspath(__file__))


def read_version() -> str:
    """The version string of vaultkern/_version.py (pyproject.toml reads the same)."""
    with open(os.path.join(HERE, "vaultkern", "_version.py")) as f:
        return re.search(r'__version__\s*=\s*"([^"]+)"', f.read()).group(1)


def want_cuda() -> bool:
    flag = os.environ.get("VAULTKERN_CUDA", "").strip()
    if flag == "0":
        return False
    # A CPU-only torch cannot link CUDA code, and nvcc must exist.
    possible = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    requested = flag == "1" or torch.cuda.is_available() or bool(os.environ.get("CUDA_HOME"))
    if flag == "1" and not possible:
        raise RuntimeError(
            f"VAULTKERN_CUDA=1 but torch.version.cuda={torch.version.cuda!r} and "
            f"CUDA_HOME={cpp_extension.CUDA_HOME!r}: need a CUDA build of torch and a CUDA toolkit")
    return possible and requested


def extension():
    cpp_sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    # The C++ standard is left to torch.utils.cpp_extension (it must match torch's headers).
    # -g0: no debug info (smaller library, faster build).
    cxx_flags = ["-O3", "-g0", "-fopenmp"]
    define_macros = [("VAULTKERN_VERSION", f'"{read_version()}"')]
    if want_cuda():
        define_macros.append(("VAULTKERN_WITH_CUDA", "1"))
        return cpp_extension.CUDAExtension(
            name="vaultkern._C",
            sources=cpp_sources + sorted(glob.glob(os.path.join("csrc", "*.cu"))),
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3"]},
            extra_link_args=["-fopenmp"],
        )
    return cpp_extension.CppExtension(
        name="vaultkern._C",
        sources=cpp_sources,
        define_macros=define_macros,
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=["-fopenmp"],
    )


setup(
    packages=find_packages(include=["vaultkern", "vaultkern.*"]),
    ext_modules=[extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
