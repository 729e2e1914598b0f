"""4-bit group quantization and nibble packing.

Notation: a tensor ``[..., K]`` is split along its last dimension into ``G = K / group_size``
groups of consecutive channels, each with one scale.

Codes:
  signed    q = clamp(round(x / s), -8, 7),  s = max|x_g| / 7
  unsigned  q = clamp(round(x / s),  0, 15), s = max(x_g) / 15   (inputs >= 0; negatives clamp to 0)
  W4A16     q = clamp(round((w - z) / s), 0, 15), s = (max - min) / 15, z = min   (asymmetric)

``round`` is round-half-to-even (``torch.round``), the rounding every backend must reproduce.
A group that is all zero has scale 0 and codes 0: no division by zero, no NaN.

Packing: two codes per uint8, the even channel in the low nibble, the odd channel in the high
nibble; signed codes are stored as their two's-complement nibble.
"""

from __future__ import annotations

import torch

DEFAULT_GROUP_SIZE = 64


def _check_groups(x: torch.Tensor, group_size: int, name: str = "x") -> int:
    if group_size <= 0 or group_size % 2:
        raise ValueError(f"group_size must be a positive even number, got {group_size}")
    k = x.shape[-1]
    if k % group_size:
        raise ValueError(
            f"{name}: the last dimension K={k} must be a multiple of the group size {group_size}"
        )
    return k // group_size


def _safe_div(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x / scale, with 0 where the scale is 0 (an all-zero group)."""
    return torch.where(scale > 0, x / torch.where(scale > 0, scale, 1.0), 0.0)


def quantize_int4(
    x: torch.Tensor,
    group_size: int = DEFAULT_GROUP_SIZE,
    *,
    unsigned: bool = False,
    scale_dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric 4-bit group quantization of ``x [..., K]``.

    Returns ``(codes int8 [..., K], scales [..., G] in scale_dtype)``. The codes are computed
    against the scale *as stored* (after rounding to ``scale_dtype``), so dequantizing with the
    stored scale reproduces exactly what a kernel will see.
    """
    g = _check_groups(x, group_size)
    xg = x.float().unflatten(-1, (g, group_size))  # [..., G, gs]
    # Divide by a tensor, not a Python number: on CUDA torch turns `t / 7.0` into `t * (1/7)`,
    # one ulp away from the IEEE division every kernel performs.
    if unsigned:
        scale = xg.amax(dim=-1).clamp_min(0.0) / xg.new_tensor(15.0)
        lo, hi = 0, 15
    else:
        scale = xg.abs().amax(dim=-1) / xg.new_tensor(7.0)
        lo, hi = -8, 7
    scale = scale.to(scale_dtype)
    codes = torch.round(_safe_div(xg, scale.float().unsqueeze(-1))).clamp_(lo, hi)
    return codes.to(torch.int8).flatten(-2), scale


def dequantize_int4(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`quantize_int4` up to the rounding: ``codes * scale`` in fp32."""
    g = scales.shape[-1]
    cg = codes.float().unflatten(-1, (g, codes.shape[-1] // g))
    return (cg * scales.float().unsqueeze(-1)).flatten(-2)


def quantize_int4_asym(
    w: torch.Tensor,
    group_size: int = DEFAULT_GROUP_SIZE,
    *,
    scale_dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric (min/max) 4-bit group quantization for weight-only W4A16.

    Returns ``(codes uint8 in [0, 15] [..., K], scales [..., G], zeros [..., G])`` with
    ``w ~= codes * scale + zero``. Asymmetric codes spend all 16 levels on the group's range,
    which matters for weights whose groups are not centred on zero.
    """
    g = _check_groups(w, group_size, "weight")
    wg = w.float().unflatten(-1, (g, group_size))
    lo = wg.amin(dim=-1)
    hi = wg.amax(dim=-1)
    scale = ((hi - lo) / wg.new_tensor(15.0)).to(scale_dtype)
    zero = lo.to(scale_dtype)
    codes = torch.round(_safe_div(wg - zero.float().unsqueeze(-1), scale.float().unsqueeze(-1)))
    return codes.clamp_(0, 15).to(torch.uint8).flatten(-2), scale, zero


def dequantize_int4_asym(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    g = scales.shape[-1]
    cg = codes.float().unflatten(-1, (g, codes.shape[-1] // g))
    return (cg * scales.float().unsqueeze(-1) + zeros.float().unsqueeze(-1)).flatten(-2)


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """``[..., K]`` 4-bit codes (int8 signed or uint8 unsigned) -> ``[..., K/2]`` uint8."""
    if codes.shape[-1] % 2:
        raise ValueError(f"pack_int4: the last dimension must be even, got {codes.shape[-1]}")
    c = codes.to(torch.int16) & 0xF
    return (c[..., 0::2] | (c[..., 1::2] << 4)).to(torch.uint8)


def unpack_int4(packed: torch.Tensor, *, signed: bool = True) -> torch.Tensor:
    """``[..., K/2]`` uint8 -> ``[..., K]`` int8 codes (sign-extended when ``signed``)."""
    if packed.dtype != torch.uint8:
        raise TypeError(f"unpack_int4: expected uint8, got {packed.dtype}")
    p = packed.to(torch.int16)
    codes = torch.stack((p & 0xF, p >> 4), dim=-1).flatten(-2)
    if signed:
        codes = codes - ((codes & 0x8) << 1)  # nibble 8..15 -> -8..-1
    return codes.to(torch.int8)
