"""The set of LoRAs applied to one transformer, changed all-or-nothing.

On SVDQLinear and W4A16Linear a LoRA widens the 16-bit low-rank branch
(engine/modules/lora_slots.py); a SplitInputLinear splits the down factor by input slice; on a
layer that stays 16-bit (embedders, output projection) it is merged into the float weight, and
the original weight tensor is kept to restore it bit for bit. LoRAs of layers that a fused
block holds as one (q/k/v, proj_mlp) arrive here already as factors of the fused layer
(engine.lora.formats).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from engine.flux.layers import SplitInputLinear
from engine.lora.formats import ParsedLora
from engine.modules import SVDQLinear, W4A16Linear

logger = logging.getLogger(__name__)


class LoraManager:
    """The set of LoRAs applied to one transformer; every change is all-or-nothing."""

    def __init__(self, transformer: nn.Module) -> None:
        self.transformer = transformer
        self._applied: list[tuple[str, ParsedLora, float]] = []
        self._merged: dict[str, torch.Tensor] = {}  # 16-bit module -> its original weight

    @property
    def active(self) -> list[tuple[str, float]]:
        return [(name, scale) for name, _, scale in self._applied]

    def set(self, loras: list[tuple[str, ParsedLora, float]]) -> None:
        """Replace the active LoRAs by ``[(name, parsed, scale)]`` (empty: the base model).

        If applying fails, the previous set is restored and the error raised.
        """
        if [(n, id(p), s) for n, p, s in loras] == [(n, id(p), s) for n, p, s in self._applied]:
            return
        previous = self._applied
        self._clear()
        try:
            for name, parsed, scale in loras:
                self._apply(name, parsed, scale)
        except Exception:
            self._clear()
            for name, parsed, scale in previous:
                self._apply(name, parsed, scale)
            self._applied = previous
            raise
        self._applied = list(loras)

    def clear(self) -> None:
        self.set([])

    def _clear(self) -> None:
        modules = dict(self.transformer.named_modules())
        for m in modules.values():
            if isinstance(m, SVDQLinear | W4A16Linear):
                m.clear_loras()
        for name, weight in self._merged.items():
            modules[name].weight = weight
        self._merged.clear()
        self._applied = []

    @torch.no_grad()
    def _add(self, name: str, module_name: str, m: nn.Module, down: torch.Tensor, up: torch.Tensor, s: float) -> None:
        """One LoRA on one layer: a slot of a quantized layer, or merged into a 16-bit weight."""
        if isinstance(m, SVDQLinear | W4A16Linear):
            m.add_lora(name, down, up, s)
            return
        original = self._merged.setdefault(module_name, m.weight)  # kept to restore bit for bit
        w = m.weight
        merged = w.float() + s * (up.to(w.device) @ down.to(w.device))
        m.weight = nn.Parameter(merged.to(original.dtype), requires_grad=False)

    @torch.no_grad()
    def _apply(self, name: str, parsed: ParsedLora, scale: float) -> None:
        modules = dict(self.transformer.named_modules())
        for f in parsed.factors:
            m = modules[f.module]
            s = scale * f.scale
            if isinstance(m, SplitInputLinear):
                for i, (part, down) in enumerate(zip(m.parts, f.down.split(m.sizes, dim=1), strict=True)):
                    self._add(name, f"{f.module}.parts.{i}", part, down, f.up, s)
            else:
                self._add(name, f.module, m, f.down, f.up, s)
        if parsed.unmatched:
            logger.warning(
                "LoRA %s: %d key(s) match no layer of this model and were not applied: %s",
                name,
                len(parsed.unmatched),
                ", ".join(parsed.unmatched[:8]),
            )
        if parsed.text_encoder:
            logger.warning(
                "LoRA %s: %d text-encoder key(s) are not applied (transformer LoRAs only): %s",
                name,
                len(parsed.text_encoder),
                ", ".join(parsed.text_encoder[:4]),
            )
        logger.info(
            "LoRA %s (%s format): %d layers, scale %g", name, parsed.format, len(parsed.factors), scale
        )
