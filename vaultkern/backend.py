"""Backend selection: which implementation of an op runs for a given tensor.

Every op in :mod:`vaultkern.ops` has up to three implementations with one
signature (DESIGN.md §6):

* ``torch``  - the pure-PyTorch reference, always present, the ground truth;
* ``triton`` - Triton kernels, chosen for CUDA tensors (on a CPU they run only
  under ``TRITON_INTERPRET=1``, which is how the tests exercise them);
* ``cpp``    - functions of the compiled extension ``vaultkern._C`` (csrc/),
  chosen for CPU tensors when the extension is built.

``VAULTKERN_BACKEND=torch|cpp|triton`` forces one backend for every op that has
it (ops without that backend fall back to torch).
"""
from __future__ import annotations

import functools
import os
import warnings
from typing import Callable, Dict, Optional

import torch

BACKENDS = ("torch", "cpp", "triton")


@functools.lru_cache(maxsize=None)
def extension():
    """The compiled extension module ``vaultkern._C``, or None (warns once)."""
    try:
        from vaultkern import _C  # type: ignore[attr-defined]
        return _C
    except ImportError as exc:  # optional, like torchao's extension loading
        if os.environ.get("VAULTKERN_QUIET_EXT") != "1":
            warnings.warn(
                f"vaultkern._C is not built ({exc}); CPU ops use the torch reference. "
                "Build it with `pip install --no-build-isolation -e .`.",
                RuntimeWarning, stacklevel=2)
        return None


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
        return True
    except Exception:  # pragma: no cover - depends on the machine
        return False


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def forced_backend() -> Optional[str]:
    name = os.environ.get("VAULTKERN_BACKEND", "").strip().lower()
    if not name:
        return None
    if name not in BACKENDS:
        raise ValueError(f"VAULTKERN_BACKEND={name!r}: expected one of {BACKENDS}")
    if name == "triton" and not triton_available():
        raise RuntimeError("VAULTKERN_BACKEND=triton but triton is not importable")
    return name


class Op:
    """One operation with per-backend implementations sharing one signature.

    The first tensor argument decides the backend: CUDA -> triton, CPU -> cpp
    when the extension provides the function, torch otherwise.  Pass
    ``backend=`` to force one for a single call (used by tests and benches).
    """

    def __init__(self, name: str, doc: str = "", cuda_default: str = "triton"):
        self.name = name
        # Backend for CUDA tensors when none is forced: triton, unless measurements showed
        # the torch reference (cuBLAS) to be faster for this op (see bench/NOTES.md).
        self.cuda_default = cuda_default
        self.__doc__ = doc
        self.impls: Dict[str, Callable] = {}
        self._cpp_name: Optional[str] = None
        self._chosen: Dict[str, str] = {}

    def register(self, backend: str) -> Callable[[Callable], Callable]:
        if backend not in BACKENDS:
            raise ValueError(backend)

        def deco(fn: Callable) -> Callable:
            self.impls[backend] = fn
            self._chosen.clear()
            return fn
        return deco

    def register_cpp(self, fn_name: str, adapter: Optional[Callable] = None) -> None:
        """Use ``vaultkern._C.<fn_name>`` as the cpp implementation, if built."""
        self._cpp_name = fn_name
        self._cpp_adapter = adapter

    def available(self, backend: str) -> bool:
        if backend == "cpp":
            ext = extension() if self._cpp_name else None
            return ext is not None and hasattr(ext, self._cpp_name)
        if backend == "triton":
            return "triton" in self.impls and triton_available()
        return backend in self.impls

    def _impl(self, backend: str) -> Callable:
        if backend == "cpp":
            fn = getattr(extension(), self._cpp_name)
            return functools.partial(self._cpp_adapter, fn) if self._cpp_adapter else fn
        return self.impls[backend]

    def choose(self, tensor: torch.Tensor) -> str:
        forced = forced_backend()
        if forced is not None:
            return forced if self.available(forced) else "torch"
        device_type = tensor.device.type
        chosen = self._chosen.get(device_type)
        if chosen is None:  # availability does not change within a process
            if device_type == "cuda" and self.available(self.cuda_default):
                chosen = self.cuda_default
            elif device_type == "cpu" and self.available("cpp"):
                chosen = "cpp"
            else:
                chosen = "torch"
            self._chosen[device_type] = chosen
        return chosen

    def __call__(self, *args, backend: Optional[str] = None, **kwargs):
        first = _first_tensor(args)
        name = backend or (self.choose(first) if first is not None else "torch")
        if not self.available(name):
            raise RuntimeError(f"op {self.name}: backend {name!r} is not available")
        return self._impl(name)(*args, **kwargs)

    def __repr__(self) -> str:
        have = [b for b in BACKENDS if self.available(b)]
        return f"Op({self.name}, backends={have})"


def _first_tensor(args) -> Optional[torch.Tensor]:
    """The tensor that decides the backend: the first tensor argument, or the first
    element of the first list/tuple of tensors (multi-tensor ops)."""
    for a in args:
        if isinstance(a, torch.Tensor):
            return a
        if isinstance(a, (list, tuple)) and a and isinstance(a[0], torch.Tensor):
            return a[0]
    return None


ALL_OPS: Dict[str, Op] = {}


def define_op(name: str, doc: str = "", cuda_default: str = "triton") -> Op:
    op = Op(name, doc, cuda_default)
    ALL_OPS[name] = op
    return op


def acc_dtype(t: torch.Tensor) -> torch.dtype:
    """Accumulation dtype for norms: float64 stays float64, everything else fp32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32
