"""Inputs for the kernel op contract, shared by every backend's tests."""

import torch

from engine.quant import pack_int4


def gemm_inputs(
    m: int,
    k: int,
    n: int,
    r: int,
    *,
    unsigned: bool = False,
    bias: bool = True,
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
    device: str = "cpu",
) -> dict:
    g = torch.Generator().manual_seed(seed)
    lo, hi = (0, 16) if unsigned else (-8, 8)
    return {
        "qx": pack_int4(torch.randint(lo, hi, (m, k), generator=g, dtype=torch.int8)).to(device),
        "ascales": (torch.rand(m, k // 64, generator=g) + 0.01).to(device),
        "qweight": pack_int4(torch.randint(-8, 8, (n, k), generator=g, dtype=torch.int8)).to(device),
        "wscales": (torch.rand(n, k // 64, generator=g) / 10 + 1e-3).to(device, dtype),
        "lora_act": torch.randn(m, r, generator=g).to(device),
        "proj_up": torch.randn(n, r, generator=g).to(device, dtype),
        "bias": torch.randn(n, generator=g).to(device, dtype) if bias else None,
    }


def act_inputs(
    m: int,
    k: int,
    r: int,
    *,
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
    unsigned: bool = False,
    device: str = "cpu",
) -> dict:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * torch.exp(torch.randn(k, generator=g))
    if unsigned:
        x = torch.nn.functional.gelu(x, approximate="tanh")
    x[0, :64] = 0  # an all-zero group
    return {
        "x": x.to(device, dtype),
        "smooth": (torch.rand(k, generator=g) + 0.5).to(device, dtype),
        "proj_down": (torch.randn(r, k, generator=g) / k**0.5).to(device, dtype),
    }
