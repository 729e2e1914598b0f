"""SVDQLinear: a W4A4 linear with a 16-bit low-rank branch and LoRA slots."""

from __future__ import annotations

import torch
from torch import nn

from engine import kernels
from engine.modules.lora_slots import LoraSlots
from engine.quant import DEFAULT_GROUP_SIZE, SVDQConfig, SVDQWeight, search_alpha


class SVDQLinear(LoraSlots, nn.Module):
    """``y = Q(x^) Q(R)^T + (x^ proj_down^T) proj_up^T + bias`` with ``x^ = (x + shift) / smooth``.

    Buffers carry the checkpoint names: ``qweight`` (uint8 [N, K/2]), ``wscales`` ([N, G]),
    ``smooth_factor`` ([K]), ``proj_down`` ([r, K]), ``proj_up`` ([N, r]), ``bias`` ([N]).
    ``unsigned`` layers quantize ``x + act_shift`` with unsigned codes; the shift is already
    folded into the stored bias.

    LoRAs widen the low-rank branch (``add_lora``); they are kept outside the state dict and
    the base factors are never modified, so removing every LoRA restores the base output bit
    for bit.

    Where ``kernels.w4a8_route`` takes a call (Hopper, M large enough), the same weight runs
    against FP8 activations (``quantize_act_fp8`` + ``w4a8_gemm``, the prologue, epilogue and
    LoRAs as on the W4A4 route).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        rank: int = 32,
        bias: bool = True,
        group_size: int = DEFAULT_GROUP_SIZE,
        unsigned: bool = False,
        act_shift: float = 0.0,
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if in_features % group_size:
            raise ValueError(f"in_features={in_features} must be a multiple of group_size={group_size}")
        if act_shift and not unsigned:
            raise ValueError("act_shift is only meaningful with unsigned=True")
        self.in_features, self.out_features = in_features, out_features
        self.rank, self.group_size = rank, group_size
        self.unsigned, self.act_shift = unsigned, float(act_shift)
        n, k, g = out_features, in_features, in_features // group_size
        fkw = {"dtype": dtype, "device": device}
        self.register_buffer("qweight", torch.zeros(n, k // 2, dtype=torch.uint8, device=device))
        # [N, G] stored group-major (strides (1, N)): a CTA's scales for one group are one
        # coalesced load in both GPU backends. The file keeps the plain row-major layout.
        self.register_buffer("wscales", torch.zeros(g, n, **fkw).t())
        self.register_buffer("smooth_factor", torch.ones(k, **fkw))
        self.register_buffer("proj_down", torch.zeros(rank, k, **fkw))
        self.register_buffer("proj_up", torch.zeros(n, rank, **fkw))
        self.register_buffer("bias", torch.zeros(n, **fkw) if bias else None)
        # Effective low-rank factors and bias with the LoRAs appended; None when there are none.
        self.register_buffer("_lora_down", None, persistent=False)
        self.register_buffer("_lora_up", None, persistent=False)
        self.register_buffer("_lora_bias", None, persistent=False)
        self._loras: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = {}
        self._register_load_state_dict_pre_hook(_wscales_group_major)

    @classmethod
    @torch.no_grad()
    def from_linear(
        cls,
        linear: nn.Linear,
        calib: torch.Tensor,
        rank: int = 32,
        group_size: int = DEFAULT_GROUP_SIZE,
        *,
        config: SVDQConfig | None = None,
        act_max: torch.Tensor | None = None,
        unsigned: bool = False,
        act_shift: float = 0.0,
        dtype: torch.dtype | None = None,
    ) -> SVDQLinear:
        """Quantize ``linear``, searching the smoothing strength on ``calib [n, K]``.

        ``act_max [K]`` (max |x| per channel over the whole calibration set) overrides the
        maximum of ``calib``, which may be only a sample. ``config`` overrides rank and
        group_size and sets the alpha grid.
        """
        config = config or SVDQConfig(rank=rank, group_size=group_size)
        dtype = dtype or (linear.weight.dtype if linear.weight.dtype != torch.float32 else torch.bfloat16)
        layer = cls(
            linear.in_features,
            linear.out_features,
            rank=min(config.rank, *linear.weight.shape),
            bias=linear.bias is not None or bool(act_shift),  # the shift is folded into a bias
            group_size=config.group_size,
            unsigned=unsigned,
            act_shift=act_shift,
            dtype=dtype,
            device=linear.weight.device,
        )
        q, alpha, err = search_alpha(
            linear.weight,
            linear.bias,
            calib.to(linear.weight.device),
            config,
            act_max=act_max,
            dtype=dtype,
            unsigned=unsigned,
            act_shift=act_shift,
        )
        layer.load_quantized(q)
        layer.alpha, layer.calib_error = alpha, err
        return layer

    def load_quantized(self, q: SVDQWeight) -> None:
        for name in ("qweight", "wscales", "smooth_factor", "proj_down", "proj_up", "bias"):
            value = getattr(q, name)
            if (value is None) != (getattr(self, name) is None):
                raise ValueError(f"{name}: the layer and the quantized weights disagree on its presence")
            if value is not None:
                getattr(self, name).copy_(value)

    # --- LoRA slots (add_lora, remove_lora, clear_loras: LoraSlots) ------------------------

    def _prepare_lora(self, down: torch.Tensor, up: torch.Tensor) -> tuple:
        """The branch sees ``x^ = (x + shift) / smooth``: store ``down * smooth``, and take the
        shift's contribution ``shift * up @ down.sum(1)`` off the bias."""
        dtype, device = self.proj_down.dtype, self.proj_down.device
        down, up = down.to(device), up.to(device)
        bias_delta = -self.act_shift * (up @ down.sum(dim=1)) if self.act_shift else None
        return (down * self.smooth_factor.float()).to(dtype), up.to(dtype), bias_delta

    def _rebuild_lora(self) -> None:
        if not self._loras:
            self._lora_down = self._lora_up = self._lora_bias = None
            return
        device = self.proj_down.device
        downs = [self.proj_down] + [d.to(device) for d, _, _ in self._loras.values()]
        ups = [self.proj_up] + [u.to(device) for _, u, _ in self._loras.values()]
        self._lora_down = torch.cat(downs, dim=0)
        self._lora_up = torch.cat(ups, dim=1)
        deltas = [b.to(device) for _, _, b in self._loras.values() if b is not None]
        if deltas:
            base = self.bias.float() if self.bias is not None else 0.0
            self._lora_bias = (base + sum(deltas)).to(self.proj_down.dtype)
        else:
            self._lora_bias = None

    # --- forward ----------------------------------------------------------------------------

    def forward(
        self,
        x: torch.Tensor,
        *,
        modulation: tuple[torch.Tensor, torch.Tensor] | None = None,
        gelu: bool = False,
        partial: torch.Tensor | None = None,
        residual: torch.Tensor | None = None,
        gate: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``x [..., K]``; ``modulation=(scale [B, K], shift [B, K])`` applies the block's
        ``LayerNorm(x) * (1 + scale) + shift`` and ``gelu`` its tanh GELU inside quantize_act
        (x [B, S, K]), so the normalized 16-bit tensor is never written. ``residual [..., N]``
        with ``gate [B, N]`` returns the block's ``residual + gate[:, None] * y`` from the GEMM's
        epilogue (diffusers' roundings; kernels.w4a4_gemm), so y is never written either;
        ``partial [..., N]`` (another part of a split-input linear, in x's dtype) is added to y
        before them. Where kernels.w4a8_route takes the call, the same with FP8 activations."""
        lead = x.shape[:-1]
        down = self.proj_down if self._lora_down is None else self._lora_down  # [R, K]
        up = self.proj_up if self._lora_up is None else self._lora_up  # [N, R]
        bias = self.bias if self._lora_bias is None else self._lora_bias  # [N]
        partial = None if partial is None else partial.reshape(-1, self.out_features)  # [M, N]
        residual = None if residual is None else residual.reshape(-1, self.out_features)  # [M, N]
        if kernels.w4a8_route(x, self.qweight, self.wscales, up):
            codes, ascale, lora_act = kernels.quantize_act_fp8(  # [M, K] e4m3, [M], [M, R]
                x, self.smooth_factor, down, shift=self.act_shift, modulation=modulation, gelu=gelu
            )
            y = kernels.w4a8_gemm(  # [M, N]
                codes, ascale, self.qweight, self.wscales, lora_act, up, bias, partial, residual, gate,
                out_dtype=x.dtype,
            )  # fmt: skip
            return y.reshape(*lead, self.out_features)
        qx, ascales, lora_act = kernels.quantize_act(  # [M, K/2], [M, G], [M, R]
            x,
            self.smooth_factor,
            down,
            group_size=self.group_size,
            unsigned=self.unsigned,
            shift=self.act_shift,
            modulation=modulation,
            gelu=gelu,
        )
        y = kernels.w4a4_gemm(  # [M, N]
            qx,
            ascales,
            self.qweight,
            self.wscales,
            lora_act,
            up,
            bias,
            partial,
            residual,
            gate,  # [B, N]
            unsigned=self.unsigned,
            out_dtype=x.dtype,
        )
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
            f"group_size={self.group_size}, unsigned={self.unsigned}, loras={self.lora_names}"
        )


def _wscales_group_major(state: dict, prefix: str, *args: object) -> None:
    """Loading (also with ``assign=True``) keeps wscales group-major, whatever the file's layout."""
    key = prefix + "wscales"
    if key in state and state[key].dim() == 2:
        state[key] = state[key].t().contiguous().t()
