"""Run the Triton kernels in the interpreter when there is no GPU.

Triton reads TRITON_INTERPRET when a ``@triton.jit`` function is decorated, i.e. when a ``stageserve_kernels``
module is first imported; this conftest is imported before the test modules of this directory, so setting the
variable here is early enough (nothing outside tests/kernels imports the kernel modules).
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
