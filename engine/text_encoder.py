"""T5-XXL in 4-bit weights (W4A16) through our own W4A16Linear: the small memory mode's encoder.

T5-XXL's encoder is 4.76 B parameters, 9.5 GB in bf16: more than the 4-bit FLUX transformer
(6.8 GB). Its linears (q, k, v, o, wi_0, wi_1, wo: 97% of the parameters) take asymmetric
4-bit weights with one scale and zero per group of 64 input channels, round to nearest, the
W4A16 format our AdaLN layers use (0.5625 bytes per weight: 2.6 GB); the token embedding and
the RMSNorm weights stay bf16. The public engine ships an AWQ W4A16 T5 for the same reason.

The encoder runs once per prediction on 256 tokens, so its linears take W4A16Linear's
dequantize-then-matmul path (more than ``GEMV_MAX_ROWS`` rows): the 16-bit weight exists only
for the one layer running. The measured error is in docs/quantization.md ("T5 in 4 bits") and
bounded by tests/test_text_encoder.py.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from engine.modules import W4A16Linear

logger = logging.getLogger(__name__)

GROUP_SIZE = 64


class T5W4A16Linear(W4A16Linear):
    """W4A16Linear with the one attribute T5 reads from its linears.

    transformers' T5 feed-forward casts its input to ``wo.weight.dtype`` before ``wo`` (there
    for fp32-kept ``wo`` layers); ``weight`` answers with an empty tensor of the compute dtype,
    so the cast is to bf16, as for the float model. Nothing else of T5's is changed.
    """

    @property
    def weight(self) -> torch.Tensor:
        return self.wscales.new_empty(0)

    def dequantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The 16-bit weight ``q * wscales + wzeros``, with less traffic than the generic path
        (uint8 nibbles, one cast, one fused multiply-add in ``dtype``: about 11 bytes moved per
        weight instead of 27; within one bf16 rounding of the generic path, as tests/test_text_encoder.py checks)."""
        n, g = self.wscales.shape
        p = self.qweight  # [N, K/2] uint8, low nibble = even input channel
        codes = torch.stack((p & 0xF, p >> 4), dim=-1).view(n, g, -1)  # [N, G, group] uint8
        w = torch.addcmul(
            self.wzeros.to(dtype).unsqueeze(-1), codes.to(dtype), self.wscales.to(dtype).unsqueeze(-1)
        )
        return w.view(n, -1)  # [N, K]


def quantize_t5(
    encoder: nn.Module, device: torch.device | str, *, group_size: int = GROUP_SIZE
) -> tuple[int, int]:
    """Swap every ``nn.Linear`` of T5's encoder blocks for a 4-bit ``T5W4A16Linear`` on ``device``.

    One layer at a time: its float weight is moved to ``device``, quantized there (fast on a
    GPU) and dropped, so the float encoder never needs to fit on the device. Returns the float
    and quantized bytes of the swapped layers.
    """
    device = torch.device(device)
    before = after = 0
    names = [n for n, m in encoder.named_modules() if isinstance(m, nn.Linear) and ".block." in f".{n}"]
    if not names:
        raise ValueError("quantize_t5: no linear layers under the encoder's blocks (not a T5 encoder?)")
    for name in names:
        linear = encoder.get_submodule(name)
        if linear.in_features % group_size:
            raise ValueError(f"{name}: in_features={linear.in_features} is not a multiple of {group_size}")
        before += sum(p.numel() * p.element_size() for p in linear.parameters())
        q = T5W4A16Linear.from_linear(linear.to(device), group_size, dtype=linear.weight.dtype)
        after += sum(b.numel() * b.element_size() for b in q.buffers())
        parent, _, child = name.rpartition(".")
        setattr(encoder.get_submodule(parent), child, q)
    logger.info(
        "T5: %d linears in 4 bits (W4A16, group %d): %.2f GB -> %.2f GB",
        len(names),
        group_size,
        before / 1e9,
        after / 1e9,
    )
    return before, after
