"""Named LoRA slots shared by the quantized linears: add, remove, replace, list."""

from __future__ import annotations

import torch


class LoraSlots:
    """LoRAs kept beside a layer's own tensors, never folded into them, so removal is exact.

    A subclass has ``in_features``, ``out_features`` and a dict ``_loras``, and says how one
    LoRA is stored (``_prepare_lora``) and how the stored ones combine (``_rebuild_lora``).
    """

    in_features: int
    out_features: int
    _loras: dict[str, tuple]

    @torch.no_grad()
    def add_lora(self, name: str, down: torch.Tensor, up: torch.Tensor, scale: float = 1.0) -> None:
        """Add ``scale * x down^T up^T`` (``down [r, K]``, ``up [N, r]``) to the output, as ``name``."""
        k, n = self.in_features, self.out_features
        if down.dim() != 2 or down.shape[1] != k:
            raise ValueError(f"LoRA {name!r}: down must have shape [r, {k}], got {list(down.shape)}")
        if up.dim() != 2 or up.shape != (n, down.shape[0]):
            raise ValueError(
                f"LoRA {name!r}: up must have shape [{n}, {down.shape[0]}], got {list(up.shape)}"
            )
        self._loras[name] = self._prepare_lora(down.float(), up.float() * scale)
        self._rebuild_lora()

    def remove_lora(self, name: str) -> None:
        if name not in self._loras:
            raise KeyError(f"no LoRA named {name!r} on this layer (have: {sorted(self._loras)})")
        del self._loras[name]
        self._rebuild_lora()

    def clear_loras(self) -> None:
        self._loras.clear()
        self._rebuild_lora()

    @property
    def lora_names(self) -> list[str]:
        return list(self._loras)

    def _prepare_lora(self, down: torch.Tensor, up: torch.Tensor) -> tuple:
        raise NotImplementedError

    def _rebuild_lora(self) -> None:
        raise NotImplementedError
