"""Named LoRA slots shared by the quantized linears: add, remove, replace, list."""

from __future__ import annotations

import torch

_BUILT = ("_lora_down", "_lora_up", "_lora_bias")  # what _rebuild_lora derives from the slots


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

    def lora_state(self) -> tuple:
        """The LoRA slots and the tensors built from them, to put back with :meth:`restore_lora_state`.

        Restoring assigns the very tensors saved here: nothing is recomputed or allocated, so it
        cannot fail half way and gives the saved state bit for bit (engine.lora.manager).
        """
        built = {a: getattr(self, a) for a in _BUILT if hasattr(self, a)}
        return dict(self._loras), built

    def restore_lora_state(self, state: tuple) -> None:
        loras, built = state
        self._loras = dict(loras)
        for attr, value in built.items():
            setattr(self, attr, value)

    def _prepare_lora(self, down: torch.Tensor, up: torch.Tensor) -> tuple:
        raise NotImplementedError

    def _rebuild_lora(self) -> None:
        raise NotImplementedError
