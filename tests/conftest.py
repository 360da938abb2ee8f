"""Test session set-up.

Without a GPU, Triton kernels run under the interpreter (TRITON_INTERPRET=1), which must be
set before triton decorates any kernel, i.e. before vaultkern.ops is imported.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
