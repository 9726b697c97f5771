"""Test setup: without a CUDA device, Triton kernels run under the interpreter (must be set before triton imports)."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
