"""Build the SVDQuant CUDA extension ahead of time (inside the container image).

Cog installs the sdist listed in requirements.txt while it builds the image, so setup() only
loads the compiled library (engine/kernels/cuda keeps a just-in-time build for development
machines). Archs: sm_80/86/89 (``TORCH_CUDA_ARCH_LIST`` overrides); the build machine has no
GPU, so they must be named.
"""

import os

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CUDAExtension

# Cog exports CFLAGS="... -flto -S" around its pip install; "-S" stops the compiler at assembly
# and the extension would not link. The extension's own flags are given below.
os.environ.pop("CFLAGS", None)
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;8.6;8.9")

setup(
    ext_modules=[
        CUDAExtension(
            "svdq_cuda_kernels._C",
            sources=sorted(f"csrc/{f}" for f in os.listdir("csrc") if f.endswith((".cpp", ".cu"))),
            extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3"]},
        )
    ],
    cmdclass={"build_ext": BuildExtension},
)
