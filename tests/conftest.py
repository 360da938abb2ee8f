"""Test session set-up.

Without a GPU, Triton kernels run under the interpreter (TRITON_INTERPRET=1), which must be
set before triton decorates any kernel, i.e. before vaultkern.ops is imported.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
else:
    # Compiled kernels: time only each kernel's first autotune candidate (every candidate is
    # still run and checked by tests/test_triton_ops.py::test_every_block_config).
    os.environ.setdefault("VAULTKERN_AUTOTUNE", "0")


@pytest.fixture(scope="session")
def C():
    """The compiled extension vaultkern._C. CI builds it, so a missing one fails, not skips."""
    try:
        from vaultkern import _C
    except ImportError as exc:
        pytest.fail(f"vaultkern._C is not built ({exc}); build it with "
                    "`pip install --no-build-isolation -e .`", pytrace=False)
    return _C


@pytest.fixture
def one_thread():
    """2 shared cores: one intra-op thread is several times faster than two for the tiny
    training runs (their modules: pytestmark = pytest.mark.usefixtures("one_thread"))."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def config(tmp_path):
    from train_setup import TINY32  # imports vaultkern: after TRITON_INTERPRET is set
    path = tmp_path / "tiny32.toml"
    path.write_text(TINY32)  # the tiny decoder at seq_len 32, for the training-run tests
    return str(path)
