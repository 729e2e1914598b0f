"""W4A16Linear: weight-only 4-bit linear for layers whose input is one vector per image."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine import kernels
from engine.modules.lora_slots import LoraSlots
from engine.quant import (
    DEFAULT_GROUP_SIZE,
    dequantize_int4_asym,
    pack_int4,
    quantize_int4_asym,
    unpack_int4,
)


class W4A16Linear(LoraSlots, nn.Module):
    """Asymmetric 4-bit weights (``w = q * wscales + wzeros`` per group of 64), 16-bit math.

    Used for FLUX's AdaLN modulation linears: a quarter of the parameters, but their input is
    one conditioning vector per image, so the cost is reading the weight, not multiplying
    it; 4-bit storage cuts that read by 4x and activation quantization would gain nothing.
    Up to ``GEMV_MAX_ROWS`` rows go through the fused GEMV op (``kernels.w4a16_gemv``: the
    packed weight read once, dequantized in registers); more rows dequantize the weight once
    and take one 16-bit matmul, which is cheaper than a GEMV per row.
    """

    GEMV_MAX_ROWS = 4  # num_outputs: one conditioning vector per image

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        bias: bool = True,
        group_size: int = DEFAULT_GROUP_SIZE,
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if in_features % group_size:
            raise ValueError(f"in_features={in_features} must be a multiple of group_size={group_size}")
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        n, g = out_features, in_features // group_size
        fkw = {"dtype": dtype, "device": device}
        self.register_buffer("qweight", torch.zeros(n, in_features // 2, dtype=torch.uint8, device=device))
        self.register_buffer("wscales", torch.zeros(n, g, **fkw))
        self.register_buffer("wzeros", torch.zeros(n, g, **fkw))
        self.register_buffer("bias", torch.zeros(n, **fkw) if bias else None)
        # LoRA branch (16-bit, beside the 4-bit weight): concatenated factors, None when empty.
        self.register_buffer("_lora_down", None, persistent=False)
        self.register_buffer("_lora_up", None, persistent=False)
        self._loras: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    @classmethod
    @torch.no_grad()
    def from_linear(
        cls, linear: nn.Linear, group_size: int = DEFAULT_GROUP_SIZE, *, dtype: torch.dtype | None = None
    ) -> W4A16Linear:
        dtype = dtype or (linear.weight.dtype if linear.weight.dtype != torch.float32 else torch.bfloat16)
        layer = cls(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            group_size=group_size,
            dtype=dtype,
            device=linear.weight.device,
        )
        codes, scales, zeros = quantize_int4_asym(linear.weight, group_size, scale_dtype=dtype)
        layer.qweight.copy_(pack_int4(codes))
        layer.wscales.copy_(scales)
        layer.wzeros.copy_(zeros)
        if linear.bias is not None:
            layer.bias.copy_(linear.bias)
        return layer

    def dequantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        codes = unpack_int4(self.qweight, signed=False)  # [N, K]
        return dequantize_int4_asym(codes, self.wscales, self.wzeros).to(dtype)

    def _prepare_lora(self, down: torch.Tensor, up: torch.Tensor) -> tuple:
        dtype, device = self.wscales.dtype, self.wscales.device
        return down.to(device, dtype), up.to(device, dtype)

    def _rebuild_lora(self) -> None:
        if not self._loras:
            self._lora_down = self._lora_up = None
            return
        device = self.wscales.device
        self._lora_down = torch.cat([d.to(device) for d, _ in self._loras.values()], dim=0)
        self._lora_up = torch.cat([u.to(device) for _, u in self._loras.values()], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"x: expected last dimension {self.in_features}, got {x.shape[-1]}")
        rows = x.numel() // self.in_features
        if rows <= self.GEMV_MAX_ROWS:
            y = kernels.w4a16_gemv(x, self.qweight, self.wscales, self.wzeros, self.bias)
        else:
            bias = None if self.bias is None else self.bias.to(x.dtype)
            y = F.linear(x, self.dequantized_weight(x.dtype), bias)
        if self._lora_down is not None:
            y = y + F.linear(F.linear(x, self._lora_down.to(x.dtype)), self._lora_up.to(x.dtype))
        return y

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}"
        )
