"""The memory mode: how much GPU memory one prediction may take, and what that costs.

``SVDQ_MEMORY`` (read once by the service's config, passed down as an argument):

* ``fast``: every component in the dtype it ships in (T5-XXL in bf16, 9.5 GB).
* ``small``: T5-XXL's linears in 4-bit weights (W4A16, group 64; ``engine.text_encoder``):
  2.9 GB instead of 9.5 GB, for about 54 ms more per prediction (modelled, A40).
* ``auto`` (default): ``fast`` where the GPU has the memory the fast mode needs for the
  largest request (four 1024x1024 images), else ``small``; the choice is logged.

In both modes the VAE decodes one image at a time (its peak does not grow with num_outputs).
The safety checker's placement follows the mode: resident on the GPU in ``fast``; in ``small``
its weights (0.61 GB in fp16) wait in pinned host memory and are copied to the GPU for each
check, after the VAE decode, the peak (``OnDemand``): 0.57 GiB off the peak for about 25 ms
of PCIe copy per prediction, where a tiled VAE decode would save more but cost about half a
decode again (scripts/memory_report.py models both). The small mode's whole cost: about 80 ms.
The figure (``FAST_CARD_GIB``) comes from ``scripts/memory_report.py``, which traces a
prediction on the meta device; a test keeps them equal.
"""

from __future__ import annotations

import enum

import torch
from torch import nn
from torch.func import functional_call

ENV_VAR = "SVDQ_MEMORY"
AUTO = "auto"


class Mode(enum.StrEnum):
    FAST = "fast"
    SMALL = "small"


CHOICES = (AUTO, Mode.FAST.value, Mode.SMALL.value)

# The card memory (allocated peak + allocator slack + workspaces + CUDA context) the fast mode
# needs for its largest request (four 1024x1024 images), in GiB to two places:
# scripts/memory_report.py's figure (tests/test_memory_report.py checks it is the report's).
FAST_CARD_GIB = 18.72


def safety_resident(mode: Mode) -> bool:
    """Whether the safety checker's weights stay on the GPU (else they visit it per check)."""
    return Mode(mode) is Mode.FAST


def parse(value: str | None) -> str:
    """``SVDQ_MEMORY``'s value, checked: auto, fast or small (blank: auto)."""
    value = (value or AUTO).strip().lower() or AUTO
    if value not in CHOICES:
        raise ValueError(f"{ENV_VAR}={value!r}: choose one of {', '.join(CHOICES)}")
    return value


def choose(requested: str, total_bytes: int | None) -> tuple[Mode, str]:
    """The mode to run and why. ``total_bytes``: the GPU's memory (None: no GPU, where the
    fast mode's float T5 costs nothing but host memory and is the one tested)."""
    requested = parse(requested)
    if requested != AUTO:
        return Mode(requested), f"{ENV_VAR}={requested}"
    if total_bytes is None:
        return Mode.FAST, "no GPU"
    gib, need = total_bytes / 2**30, FAST_CARD_GIB
    if gib >= need:
        return Mode.FAST, f"the GPU has {gib:.1f} GiB, the fast mode needs {need:.1f} GiB for 4 images"
    return Mode.SMALL, f"the GPU has {gib:.1f} GiB, under the {need:.1f} GiB the fast mode needs for 4 images"


class OnDemand(nn.Module):
    """A module whose weights live in host memory (pinned where CUDA is) and visit ``device``
    for each call: copied there, used, and freed when the call returns.

    For a model used once per prediction after the prediction's peak (the safety checker): its
    bytes leave the peak for one host-to-device copy per call.
    """

    def __init__(self, module: nn.Module, device: torch.device | str) -> None:
        super().__init__()
        self.device = torch.device(device)
        module = module.to("cpu")
        if torch.cuda.is_available():  # pinned: the copy is a DMA, asynchronous to the host
            for t in [*module.parameters(), *module.buffers()]:
                t.data = t.data.pin_memory()
        # Held outside nn.Module's registries, so .to() and state_dict() leave the host copy alone.
        self.__dict__["module"] = module
        self.__dict__["host_state"] = dict([*module.named_parameters(), *module.named_buffers()])

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self.host_state.values())).dtype

    def forward(self, *args, **kwargs):
        return functional_call(self.module, device_copies(self.host_state, self.device), args, kwargs)


def device_copies(state: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """A copy of every tensor of ``state`` on ``device`` (freed when the dict is)."""
    return {name: torch.empty_like(t, device=device).copy_(t, non_blocking=True) for name, t in state.items()}
