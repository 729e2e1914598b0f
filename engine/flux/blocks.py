"""FLUX blocks whose sibling projections are one layer: one quantize_act, one GEMM per input.

In diffusers' blocks q, k and v (and, in the single blocks, the MLP's input projection) are
separate linears over the same input. Here they are one linear with concatenated outputs:

* double block: ``attn.to_qkv`` (q | k | v of the image stream) and ``attn.to_added_qkv``
  (q | k | v of the text stream), diffusers' own names for fused projections;
* single block: ``to_qkv_mlp`` (q | k | v | proj_mlp), on the block;
* the single block's ``proj_out`` is a :class:`SplitInputLinear` whose two parts the forward
  calls on the attention output and the GELU output directly (no concatenation, no slices);
  quantized, the second part's GEMM adds the first's output, then the gate and the residual.

The forwards are diffusers' arithmetic (FLUX.1 as diffusers 0.42.1 computes it) with the glue
between the quantized linears folded into as few launches as possible:

* LayerNorm + AdaLN modulation run inside the projection's activation quantization
  (``SVDQLinear(x, modulation=...)``, ``_project``), and the feed-forward's GELU inside the
  next layer's (``gelu=True``, ``_gelu_project``): no 16-bit normalized or GELU'd copy is written;
* the gates and residual adds (``h + gate * linear(...)``) run in the out-projections' and fc2's
  GEMM epilogues (``_gated``), with diffusers' roundings: no 16-bit y or product is written;
* q/k RMSNorm + RoPE + the joint (text, image) concatenation are one op,
  ``engine.kernels.qk_norm_rope``; the attention is ``engine.flux.attention.attend`` (SDPA, or
  SageAttention where setup chose it), both through ``attention.norm_rope_attend`` (with sage, the
  op emits sage's int8 inputs itself: ``kernels.qk_norm_rope_sage``).

A float layer (the quantizer's fused float model) takes the same steps unfused. diffusers'
``FluxTransformer2DModel.forward`` drives the blocks unchanged; ``SVDQFluxTransformer2DModel``'s
drives the single blocks on the joint sequence, formed once (``FusedFluxSingleTransformerBlock``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from diffusers.models.transformers.transformer_flux import (
    FluxSingleTransformerBlock,
    FluxTransformerBlock,
)
from torch import nn

from engine.flux.attention import norm_rope_attend
from engine.flux.layers import SplitInputLinear, set_module, split_linear
from engine.modules.svdq_linear import SVDQLinear

# fused module (relative to its block) -> the diffusers siblings it replaces, in output order
DOUBLE_FUSED = {
    "attn.to_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "attn.to_added_qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
}
SINGLE_FUSED = {"to_qkv_mlp": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")}
_UNSUPPORTED_KWARGS = ("ip_hidden_states", "ip_adapter_masks")


def _project(
    layer: nn.Module, norm: nn.Module, x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor
) -> torch.Tensor:
    """``layer(LayerNorm(x) * (1 + scale) + shift)``: a quantized layer folds the norm and the
    modulation into its activation quantization (one read of x, no 16-bit copy written); a float
    layer (the quantizer's fused float model) takes diffusers' arithmetic step by step."""
    if isinstance(layer, SVDQLinear):
        return layer(x, modulation=(scale, shift))
    return layer(_modulated(norm, x, scale, shift))


def _gelu_project(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``layer(gelu_tanh(x))``, the GELU folded into a quantized layer's activation quantization."""
    if isinstance(layer, SVDQLinear):
        return layer(x, gelu=True)
    return layer(F.gelu(x, approximate="tanh"))


def _gated(
    layer: nn.Module, x: torch.Tensor, residual: torch.Tensor, gate: torch.Tensor, *, gelu: bool = False
) -> torch.Tensor:
    """``residual + gate[:, None] * layer(x)`` (``layer(gelu_tanh(x))`` with ``gelu``): a quantized
    layer takes the gate multiply and the residual add into its GEMM's epilogue, with diffusers'
    roundings (one read of the residual, one write, no 16-bit y round trip); a float layer takes
    diffusers' arithmetic step by step."""
    if isinstance(layer, SVDQLinear):
        return layer(x, gelu=gelu, residual=residual, gate=gate)
    return residual + gate.unsqueeze(1) * layer(F.gelu(x, approximate="tanh") if gelu else x)


def _modulated(norm: nn.Module, x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """AdaLN: ``LayerNorm(x) * (1 + scale) + shift`` (diffusers' AdaLayerNormZero arithmetic)."""
    return norm(x) * (1 + scale[:, None]) + shift[:, None]


def _check_kwargs(joint_attention_kwargs: dict[str, Any] | None) -> None:
    if joint_attention_kwargs and any(k in joint_attention_kwargs for k in _UNSUPPORTED_KWARGS):
        raise NotImplementedError("IP-adapter attention is not supported by the fused FLUX blocks")


class FusedFluxTransformerBlock(FluxTransformerBlock):
    """diffusers' double block with ``attn.to_qkv`` and ``attn.to_added_qkv`` (see module doc)."""

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        temb: torch.Tensor,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
        joint_attention_kwargs: dict[str, Any] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        _check_kwargs(joint_attention_kwargs)
        attn = self.attn
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.norm1.linear(
            self.norm1.silu(temb)
        ).chunk(6, dim=1)
        c_shift_msa, c_scale_msa, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = (
            self.norm1_context.linear(self.norm1_context.silu(temb)).chunk(6, dim=1)
        )

        # Norm + modulation -> one projection per stream.
        qkv = _project(attn.to_qkv, self.norm1.norm, hidden_states, scale_msa, shift_msa)
        c_qkv = _project(
            attn.to_added_qkv, self.norm1_context.norm, encoder_hidden_states, c_scale_msa, c_shift_msa
        )
        # q/k RMSNorm + RoPE + joint (text, image) sequence -> attention.
        cos, sin = image_rotary_emb if image_rotary_emb is not None else (None, None)
        out = norm_rope_attend(
            [
                (c_qkv, attn.norm_added_q.weight, attn.norm_added_k.weight),
                (qkv, attn.norm_q.weight, attn.norm_k.weight),
            ],
            cos,
            sin,
            heads=attn.heads,
            eps=attn.norm_q.eps,
        ).flatten(2, 3)
        context_out, out = out.split_with_sizes(
            [encoder_hidden_states.shape[1], hidden_states.shape[1]], dim=1
        )
        # Out-projections with their gates and residuals (attn.to_out[1] is an eval-mode Dropout);
        # the feed-forward of each stream, its gate and residual in fc2's epilogue.
        hidden_states = _gated(attn.to_out[0], out.contiguous(), hidden_states, gate_msa)
        hidden_states = _feed_forward(self.ff, self.norm2, hidden_states, scale_mlp, shift_mlp, gate_mlp)
        encoder_hidden_states = _gated(attn.to_add_out, context_out.contiguous(), encoder_hidden_states, c_gate_msa)
        encoder_hidden_states = _feed_forward(
            self.ff_context, self.norm2_context, encoder_hidden_states, c_scale_mlp, c_shift_mlp, c_gate_mlp
        )
        if encoder_hidden_states.dtype == torch.float16:
            encoder_hidden_states = encoder_hidden_states.clip(-65504, 65504)
        return encoder_hidden_states, hidden_states


def _feed_forward(
    ff: nn.Module,
    norm: nn.Module,
    x: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    gate: torch.Tensor,
) -> torch.Tensor:
    """``x + gate * FeedForward(modulated x)`` (diffusers' GELU-tanh FeedForward: proj -> gelu ->
    (eval-mode dropout) -> out), the norm folded into proj's and the GELU into out's activation
    quantization, the gate and the residual into out's GEMM epilogue."""
    return _gated(ff.net[2], _project(ff.net[0].proj, norm, x, scale, shift), x, gate, gelu=True)


class FusedFluxSingleTransformerBlock(FluxSingleTransformerBlock):
    """diffusers' single block with ``to_qkv_mlp`` and a two-part ``proj_out`` (see module doc),
    on the joint (text, image) sequence.

    The block's work is over the joint sequence as one tensor: its input feeds the projection and is
    the residual, and its output (the GEMM epilogue's) is the next block's input. So the joint
    sequence is formed once, by the model's forward (``SVDQFluxTransformer2DModel.forward``: one
    concatenation after the double blocks, one split after the single blocks), and passed as
    ``hidden_states`` with ``encoder_hidden_states=None``; no block writes a concatenation (about
    27 MB per block at 1024x1024). Called as diffusers' model forward calls it (the two streams),
    the block concatenates and splits itself, as diffusers' block does.
    """

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None,
        temb: torch.Tensor,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
        joint_attention_kwargs: dict[str, Any] | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """``(text, image)`` out of the two streams, or ``(None, joint)`` out of the joint sequence
        given as ``hidden_states`` with ``encoder_hidden_states=None``."""
        _check_kwargs(joint_attention_kwargs)
        if encoder_hidden_states is None:
            return None, self._joint_forward(hidden_states, temb, image_rotary_emb)
        text_seq_len = encoder_hidden_states.shape[1]
        joint = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        joint = self._joint_forward(joint, temb, image_rotary_emb)
        return joint[:, :text_seq_len], joint[:, text_seq_len:]

    def _joint_forward(
        self,
        hidden_states: torch.Tensor,
        temb: torch.Tensor,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> torch.Tensor:
        """The block on the joint sequence ``[B, text + image, D]``: the next block's input."""
        attn = self.attn
        residual = hidden_states
        shift_msa, scale_msa, gate_msa = self.norm.linear(self.norm.silu(temb)).chunk(3, dim=1)

        # Norm + modulation -> one projection: q | k | v | MLP input.
        proj = _project(self.to_qkv_mlp, self.norm.norm, hidden_states, scale_msa, shift_msa)
        # q/k RMSNorm + RoPE (the q | k | v channels of proj, read in place) -> attention.
        cos, sin = image_rotary_emb if image_rotary_emb is not None else (None, None)
        attn_output = norm_rope_attend(
            [(proj, attn.norm_q.weight, attn.norm_k.weight)], cos, sin, heads=attn.heads, eps=attn.norm_q.eps
        ).flatten(2, 3)

        # proj_out over (attention, MLP) as its two parts, no concatenation: quantized, the MLP
        # part's GEMM adds the attention part's output to its own, then the gate and the residual
        # in its epilogue (one output, one rounding of the stream, as diffusers); float, diffusers'
        # arithmetic on the parts' sum.
        attn_part, mlp_part = self.proj_out.parts
        mlp_in = proj[..., 3 * attn.inner_dim :]
        if isinstance(mlp_part, SVDQLinear):
            y_attn = attn_part(attn_output)  # [B, S, D]
            hidden_states = mlp_part(mlp_in, gelu=True, partial=y_attn, residual=residual, gate=gate_msa)
        else:
            out = attn_part(attn_output) + _gelu_project(mlp_part, mlp_in)
            hidden_states = residual + gate_msa.unsqueeze(1) * out
        if hidden_states.dtype == torch.float16:
            hidden_states = hidden_states.clip(-65504, 65504)
        return hidden_states


def fused_siblings(block: nn.Module) -> dict[str, list[tuple[str, int]]]:
    """``{fused module: [(diffusers sibling, output rows)]}`` of a fused block (relative names)."""
    if isinstance(block, FusedFluxTransformerBlock):
        inner = block.attn.inner_dim
        return {name: [(s, inner) for s in sibs] for name, sibs in DOUBLE_FUSED.items()}
    if isinstance(block, FusedFluxSingleTransformerBlock):
        inner, sibs = block.attn.inner_dim, SINGLE_FUSED["to_qkv_mlp"]
        return {"to_qkv_mlp": [(s, inner) for s in sibs[:3]] + [(sibs[3], block.mlp_hidden_dim)]}
    return {}


def unfused_blocks(model: nn.Module) -> list[str]:
    """The blocks of ``model`` that still have diffusers' separate q/k/v layers."""
    return [
        name
        for name, m in model.named_modules()
        if isinstance(m, FluxTransformerBlock | FluxSingleTransformerBlock) and not fused_siblings(m)
    ]


def is_fused(model: nn.Module) -> bool:
    """Whether ``model`` has blocks and all of them are fused ones (a version-2 model)."""
    blocks = [m for m in model.modules() if isinstance(m, FluxTransformerBlock | FluxSingleTransformerBlock)]
    return bool(blocks) and not unfused_blocks(model)


@torch.no_grad()
def fuse_projections(model: nn.Module) -> nn.Module:
    """Turn diffusers' FluxTransformer2DModel into the fused one, in place (float weights).

    Sibling linears become one ``nn.Linear`` with their weights and biases concatenated (on the
    meta device too: the checkpoint loader builds its skeleton this way), each block takes the
    fused class (same modules, so diffusers' model forward drives it), and the single block's
    ``proj_out`` becomes a SplitInputLinear of its attention columns (with the bias) and its
    MLP columns. Exact up to float rounding of the larger matmul.
    """
    for block in model.transformer_blocks:
        if isinstance(block, FusedFluxTransformerBlock):
            continue
        for fused, sibs in DOUBLE_FUSED.items():
            _fuse_linears(block, fused, sibs)
        block.__class__ = FusedFluxTransformerBlock  # same modules and state, our forward
    for block in model.single_transformer_blocks:
        if isinstance(block, FusedFluxSingleTransformerBlock):
            continue
        for fused, sibs in SINGLE_FUSED.items():
            _fuse_linears(block, fused, sibs)
        linear = block.proj_out
        sizes = [linear.in_features - block.mlp_hidden_dim, block.mlp_hidden_dim]
        parts = split_linear(linear, sizes)
        block.proj_out = SplitInputLinear(parts, sizes)
        block.__class__ = FusedFluxSingleTransformerBlock
    return model


def _fuse_linears(block: nn.Module, fused: str, siblings: tuple[str, ...]) -> None:
    linears = [block.get_submodule(s) for s in siblings]
    first = linears[0]
    if not all(isinstance(m, nn.Linear) for m in linears):
        raise TypeError(
            f"fuse_projections: {siblings} must be float nn.Linear layers (quantize after fusing)"
        )
    out = nn.Linear(
        first.in_features,
        sum(m.out_features for m in linears),
        bias=first.bias is not None,
        device=first.weight.device,
        dtype=first.weight.dtype,
    )
    out.weight.copy_(torch.cat([m.weight for m in linears]))
    if out.bias is not None:
        out.bias.copy_(torch.cat([m.bias for m in linears]))
    for s in siblings:
        parent, _, child = s.rpartition(".")
        delattr(block.get_submodule(parent) if parent else block, child)
    set_module(block, fused, out)


def sibling_rows(model: nn.Module) -> dict[str, tuple[str, slice]]:
    """``{diffusers sibling: (fused module, its output rows)}`` over the fused blocks of ``model``
    (full names): where a LoRA trained on diffusers' separate layers lands."""
    table = {}
    for prefix, block in model.named_modules():
        for fused, sibs in fused_siblings(block).items():
            start = 0
            for sib, rows in sibs:
                table[f"{prefix}.{sib}"] = (f"{prefix}.{fused}", slice(start, start + rows))
                start += rows
    return table
