"""Triton kernels of the SVDQuant ops (jit functions and their launch configs).

The host-side wrappers that the dispatch calls live in ``engine.kernels.triton_backend``;
this package holds the kernels themselves, one file per op, so that the static checks
(``scripts/kernel_model_triton.py``) can compile each for a GPU target without a GPU.
"""
