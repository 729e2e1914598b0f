"""The VAE decoder's upsamplers as sub-pixel convolutions: the same function at 4/9 of the FLOPs.

Why: diffusers' ``Upsample2D`` (FLUX.1's decoder has three) repeats each pixel 2x2 (nearest
neighbour) and then runs a 3x3 convolution at the high resolution, where 5 of every 9 taps read a
copy of a pixel another tap already reads. In real arithmetic that equals four 2x2 convolutions
at the LOW resolution, one per output phase ``(a, b)`` in {0, 1}^2, whose taps are sums of the
3x3 kernel's: along an axis, output row ``2i + a`` reads upsampled rows ``2i + a - 1 .. 2i + a + 1``,
which are low-res rows ``i - 1, i, i`` (a = 0: taps {-1} and {0, +1} merge onto offsets -1 and 0)
or ``i, i, i + 1`` (a = 1: taps {-1, 0} and {+1} onto offsets 0 and +1). Zero padding of the
upsampled image is zero padding of the low-res one (upsampled row -1 or 2H is low-res row -1 or
H). FLOPs per output pixel: ``2 * 4 * Cin * Cout`` instead of ``2 * 9 * Cin * Cout``; at 1024x1024
the decoder's three upsample convolutions go from 2.78 to 1.24 TFLOP (scripts/image_model.py).

How: one ``nn.Conv2d`` with a 2x2 kernel, ``4 * Cout`` output channels ordered ``(a, b, cout)``
and padding 1 gives ``[B, 4 Cout, H + 1, W + 1]``; phase ``(a, b)`` is its ``(H, W)`` window at
offset ``(a, b)``. All four windows are one strided view of that output (the offset of phase
``(a, b)`` folds into the strides of the ``a`` and ``b`` axes), so one copy interleaves them to
``[B, Cout, 2H, 2W]``, in the input's memory format (channels_last on CUDA). The merged weights
are summed once, at load, in fp32 from the module's weights and rounded once to their dtype; the
bias is the original's, once per phase. The result is the original's up to rounding: fp32 sums
in another order, and in bf16 one rounding of each merged tap (tests/test_vae_upsample.py).

Only ``Upsample2D`` with interpolation and a plain 3x3 convolution (stride 1, padding 1, no
norm, no transposed convolution, zero padding) is replaced; any other upsampler is left as it
is, with a warning naming it. The decoder never passes ``output_size`` (UpDecoderBlock2D calls
its upsampler with the input alone; every served size is a multiple of 16 pixels, so every
latent level is whole); an ``output_size`` other than twice the input raises ValueError.
``Upsample2D``'s ``.contiguous()`` calls before its interpolation work around bugs of the NHWC
nearest-upsampling kernel, which this form does not call. The merged weights hold 16 taps per
channel pair where the original held 9 (FLUX's VAE: 8 MB more in bf16).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

logger = logging.getLogger(__name__)

# Per axis: which of the 3x3 kernel's taps (-1, 0, +1) land on each of the 2x2 kernel's taps, for
# output phase 0 (low-res offsets -1, 0) and phase 1 (offsets 0, +1). [phase, tap2, tap3]
_MERGE = (((1, 0, 0), (0, 1, 1)), ((1, 1, 0), (0, 0, 1)))


def subpixel_weight(weight: torch.Tensor) -> torch.Tensor:
    """A 3x3 convolution's ``[Cout, Cin, 3, 3]`` weight after nearest x2 upsampling, as the
    ``[4 * Cout, Cin, 2, 2]`` weight of its four output phases at the low resolution (channels
    ordered ``(a, b, cout)``), summed in fp32 (fp64 for an fp64 weight) and rounded once to
    ``weight``'s dtype."""
    if weight.dim() != 4 or tuple(weight.shape[2:]) != (3, 3):
        raise ValueError(f"weight must be [Cout, Cin, 3, 3], got {tuple(weight.shape)}")
    acc = torch.promote_types(weight.dtype, torch.float32)
    m = torch.tensor(_MERGE, dtype=acc, device=weight.device)  # [phase, 2, 3]
    merged = torch.einsum("akt,blu,oitu->aboikl", m, m, weight.to(acc))  # [2, 2, Cout, Cin, 2, 2]
    return merged.reshape(-1, *merged.shape[3:]).to(weight.dtype)


def interleave_phases(y: torch.Tensor, out_channels: int) -> torch.Tensor:
    """``[B, 4 C, H + 1, W + 1]`` (channels ``(a, b, c)``) -> ``[B, C, 2H, 2W]`` with
    ``out[:, c, 2i + a, 2j + b] = y[:, (2a + b) C + c, i + a, j + b]``: one strided view of ``y``
    (phase (a, b)'s window offset folded into the a and b strides), then one copy, in ``y``'s
    memory format."""
    b, _, hp, wp = y.shape
    h, w, c = hp - 1, wp - 1, out_channels
    s0, s1, s2, s3 = y.stride()
    # element (n, c, i, a, j, b) at n s0 + ((2a + b) C + c) s1 + (i + a) s2 + (j + b) s3
    phases = y.as_strided((b, c, h, 2, w, 2), (s0, s1, s2, 2 * c * s1 + s2, s3, c * s1 + s3))  # at y's offset
    # .contiguous() then .view(): one aten.clone (reshape would add an _unsafe_view)
    if y.is_contiguous(memory_format=torch.channels_last) and not y.is_contiguous():
        # [B, H, 2, W, 2, C] dense, seen as [B, C, 2H, 2W] in channels_last
        return phases.permute(0, 2, 3, 4, 5, 1).contiguous().view(b, 2 * h, 2 * w, c).permute(0, 3, 1, 2)
    return phases.contiguous().view(b, c, 2 * h, 2 * w)


class SubpixelUpsample2D(nn.Module):
    """Nearest x2 upsampling + 3x3 convolution (diffusers' ``Upsample2D``), computed as one 2x2
    convolution at the low resolution with ``4 * out_channels`` outputs (module docstring).

    ``conv``: the merged convolution (``[4 Cout, Cin, 2, 2]``, padding 1); called like
    ``Upsample2D`` (``output_size``, if given, must be twice the input's size).
    """

    def __init__(self, channels: int, out_channels: int, *, bias: bool = True) -> None:
        super().__init__()
        self.channels, self.out_channels = channels, out_channels
        self.conv = nn.Conv2d(channels, 4 * out_channels, kernel_size=2, padding=1, bias=bias)

    @classmethod
    @torch.no_grad()
    def from_upsample(cls, up: nn.Module) -> SubpixelUpsample2D:
        """The sub-pixel form of an eligible ``Upsample2D`` (:func:`ineligible` is None), on its
        device and in its dtype and memory format."""
        reason = ineligible(up)
        if reason is not None:
            raise ValueError(f"cannot rewrite this Upsample2D as a sub-pixel convolution: {reason}")
        conv = up.conv
        new = cls(up.channels, up.out_channels, bias=conv.bias is not None)
        weight = subpixel_weight(conv.weight)
        channels_last = (
            conv.weight.is_contiguous(memory_format=torch.channels_last) and not conv.weight.is_contiguous()
        )
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        new.conv.weight = nn.Parameter(weight.contiguous(memory_format=fmt), requires_grad=False)
        if conv.bias is not None:
            new.conv.bias = nn.Parameter(conv.bias.detach().repeat(4), requires_grad=False)
        return new.train(up.training)

    def forward(
        self, hidden_states: torch.Tensor, output_size: tuple[int, int] | None = None, *args, **kwargs
    ) -> torch.Tensor:
        """``[B, Cin, H, W]`` -> ``[B, Cout, 2H, 2W]``; extra arguments are ignored, as
        ``Upsample2D`` ignores its deprecated ``scale``."""
        _, cin, h, w = hidden_states.shape
        if cin != self.channels:
            raise ValueError(f"hidden_states has {cin} channels, this upsampler takes {self.channels}")
        if output_size is not None and tuple(output_size) != (2 * h, 2 * w):
            raise ValueError(
                f"output_size={tuple(output_size)}: the sub-pixel upsampler only doubles ({2 * h}, {2 * w} here)"
            )
        y = self.conv(hidden_states)  # [B, 4 Cout, H + 1, W + 1], channels (a, b, cout)
        return interleave_phases(y, self.out_channels)  # [B, Cout, 2H, 2W]


def ineligible(up: nn.Module) -> str | None:
    """Why ``up`` (an ``Upsample2D``) is not nearest x2 + a plain 3x3 convolution, or None if it is."""
    if getattr(up, "use_conv_transpose", False):
        return "a transposed convolution"
    if not getattr(up, "use_conv", False):
        return "no convolution"
    if not getattr(up, "interpolate", True):
        return "no interpolation"
    if getattr(up, "norm", None) is not None:
        return "a norm before the upsampling"
    conv = getattr(up, "conv", None)
    if not isinstance(conv, nn.Conv2d):
        return f"its convolution is {type(conv).__name__}, not Conv2d named conv"
    plain = dict(
        kernel_size=(3, 3), stride=(1, 1), padding=(1, 1), dilation=(1, 1), groups=1, padding_mode="zeros"
    )
    got = {k: getattr(conv, k) for k in plain}
    if got != plain:
        return f"convolution {got}, not {plain}"
    return None


def use_subpixel_upsampling(module: nn.Module) -> int:
    """Replace, in place, every eligible diffusers ``Upsample2D`` under ``module`` (a VAE or its
    decoder) by :class:`SubpixelUpsample2D`; returns how many. Ineligible ones are left as they
    are, each with a warning naming it and why."""
    from diffusers.models.upsampling import Upsample2D

    replaced = 0
    for name, up in list(module.named_modules()):
        if not isinstance(up, Upsample2D):
            continue
        reason = ineligible(up)
        if reason is not None:
            logger.warning("%s kept as Upsample2D (%s): not a sub-pixel convolution", name, reason)
            continue
        module.set_submodule(name, SubpixelUpsample2D.from_upsample(up))
        replaced += 1
    return replaced
