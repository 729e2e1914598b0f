"""Load the prebuilt SVDQuant CUDA library: it registers the ``torch.ops.svdq_cuda`` ops."""

from pathlib import Path

import torch

_libs = sorted(Path(__file__).parent.glob("_C*.so"))
if not _libs:
    raise ImportError(f"svdq_cuda_kernels: no compiled library in {Path(__file__).parent}")
torch.ops.load_library(str(_libs[0]))
