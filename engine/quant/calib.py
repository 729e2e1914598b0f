"""Calibration statistics: what each linear layer sees on real inputs.

Forward pre-hooks record, per chosen ``nn.Linear``, the running per-input-channel maximum of
``|x|`` over every token seen, and a bounded uniform sample of input rows (priority
sampling: every row gets a random key, the rows with the largest keys are kept), which the
alpha search scores candidates on. A generator seeded per layer makes the sample reproducible.
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Iterable

import torch
from torch import nn


@dataclasses.dataclass
class LayerStats:
    act_max: torch.Tensor  # fp32 [K], max |x_k| over all tokens seen
    samples: torch.Tensor  # fp32 [n <= max_samples, K]
    keys: torch.Tensor  # fp32 [n], sampling priorities
    generator: torch.Generator
    tokens: int = 0


class ActivationRecorder:
    """Context manager that records :class:`LayerStats` for the named linears of ``model``.

    >>> with ActivationRecorder(model, ["blocks.0.ff.net.2"], max_samples=256) as rec:
    ...     model(inputs)
    >>> rec.stats["blocks.0.ff.net.2"].act_max
    """

    def __init__(
        self, model: nn.Module, names: Iterable[str], *, max_samples: int = 256, seed: int = 0
    ) -> None:
        if max_samples < 0:
            raise ValueError(f"max_samples must be >= 0, got {max_samples}")
        modules = dict(model.named_modules())
        self.names = list(names)
        missing = [n for n in self.names if not isinstance(modules.get(n), nn.Linear)]
        if missing:
            raise ValueError(f"not nn.Linear layers of the model: {missing[:5]}")
        self._modules = {n: modules[n] for n in self.names}
        self.max_samples = max_samples
        self.stats: dict[str, LayerStats] = {}
        self.seed = seed
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> ActivationRecorder:
        for name, module in self._modules.items():
            self._handles.append(module.register_forward_pre_hook(self._hook(name)))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _hook(self, name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            self._record(name, args[0])

        return hook

    @torch.no_grad()
    def _record(self, name: str, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        amax = x.abs().amax(dim=0)
        st = self.stats.get(name)
        if st is None:
            # One generator per layer: a layer's sample does not depend on what else is recorded.
            gen = torch.Generator().manual_seed(self.seed + zlib.crc32(name.encode()))
            st = LayerStats(amax, x[:0], x.new_zeros(0), gen)
            self.stats[name] = st
        else:
            st.act_max = torch.maximum(st.act_max, amax)
        keys = torch.rand(x.shape[0], generator=st.generator).to(x.device)
        st.tokens += x.shape[0]
        keys = torch.cat([st.keys, keys])
        rows = torch.cat([st.samples, x])
        keep = keys.topk(min(self.max_samples, keys.numel())).indices
        st.samples, st.keys = rows[keep], keys[keep]
