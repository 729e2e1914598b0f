"""Tracing one image's work on the meta device: every operator call of the transformer, the VAE
decoder and the text encoders with its tensors' sizes and FLOPs (count_launches.py's tracer and
skeleton); attention counts as one launch. Priced by perfmodel.image_price."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

SCRIPTS = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(SCRIPTS))
import count_launches as cl  # noqa: E402  (the meta-device skeleton and the flash stand-in)


@dataclass
class Op:
    name: str
    where: str
    shapes: list[tuple[int, ...]]
    in_bytes: int
    out_bytes: int
    flops: int
    args: tuple = field(repr=False, default=())


def _bytes(tree: object) -> int:
    return cl._tensor_bytes(tree)


class OpRecorder(TorchDispatchMode):
    """Every non-view operator call with its tensors' sizes and (for matmuls, convolutions) FLOPs."""

    def __init__(self) -> None:
        super().__init__()
        self.where = "outside"
        self.ops: list[Op] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func.is_view:
            return out
        packet = func.overloadpacket
        flops = 0
        if packet in flop_registry:
            flops = flop_registry[packet](*args, **kwargs, out_val=out)
        shapes = [tuple(t.shape) for t in pytree.tree_leaves(args) if isinstance(t, torch.Tensor)]
        self.ops.append(
            Op(str(packet), self.where, shapes, _bytes((args, kwargs)), _bytes(out), int(flops), args)
        )
        return out


def record(module: torch.nn.Module, call, blocks: dict[str, int] | None = None) -> list[Op]:
    """Ops of ``call()`` on meta; inside ``module``'s blocks (attribute -> count) they are tagged."""
    rec, hooks = OpRecorder(), []
    for kind in blocks or {}:
        for block in getattr(module, kind):
            hooks.append(block.register_forward_pre_hook(lambda m, a, kind=kind: setattr(rec, "where", kind)))
            hooks.append(block.register_forward_hook(lambda m, a, o: setattr(rec, "where", "outside")))
    try:
        with torch.no_grad(), rec, cl._attention_as_one_launch():
            call()
    finally:
        for h in hooks:
            h.remove()
    return rec.ops


def transformer_inputs(batch: int, width: int, height: int, text_tokens: int, guidance: bool) -> dict:
    tokens = (width // 16) * (height // 16)
    meta = {"device": "meta", "dtype": torch.bfloat16}
    inputs = {
        "hidden_states": torch.empty(batch, tokens, 64, **meta),
        "encoder_hidden_states": torch.empty(batch, text_tokens, 4096, **meta),
        "pooled_projections": torch.empty(batch, 768, **meta),
        "timestep": torch.empty(batch, **meta),
        "img_ids": torch.empty(tokens, 3, **meta),
        "txt_ids": torch.empty(text_tokens, 3, **meta),
        "return_dict": False,
    }
    if guidance:
        inputs["guidance"] = torch.empty(batch, **meta)
    return inputs


def trace_transformer(
    quantized: bool,
    batch: int = 1,
    size: int = 1024,
    text_tokens: int = 256,
    *,
    sage: bool = False,
    hopper: bool = False,
) -> list[Op]:
    """One denoising step, ops per block kind scaled to FLUX's 19 double + 38 single blocks.
    ``sage``: with the attention backend go_fast serves (engine.flux.attention.using("sage")), so
    the blocks issue what they issue there (qk_norm_rope_sage and sage's int8 kernel).
    ``hopper``: the W4A8 route as an H100 takes it (perfmodel.hopper_route.h100_w4a8), so the
    linears it takes issue quantize_act_fp8 + w4a8_gemm (the A40 has no W4A8 route: without it
    every linear issues quantize_act + w4a4_gemm)."""
    if hopper:
        from perfmodel.hopper_route import h100_w4a8

        with h100_w4a8():
            return trace_transformer(quantized, batch, size, text_tokens, sage=sage)
    if sage:
        from engine.flux import attention

        with attention.using("sage"):
            return trace_transformer(quantized, batch, size, text_tokens)
    if quantized:
        model, guidance = cl.full_size_transformer(2), False
    else:
        from diffusers import FluxTransformer2DModel

        config = dict(cl.FLUX_SCHNELL_CONFIG, num_layers=1, num_single_layers=1, guidance_embeds=True)
        with torch.device("meta"):
            model = FluxTransformer2DModel.from_config(config).to(torch.bfloat16).eval()
        guidance = True
    inputs = transformer_inputs(batch, size, size, text_tokens, guidance)
    ops = record(model, lambda: model(**inputs), cl.FLUX_SCHNELL_BLOCKS)
    return [op for op in ops for _ in range(cl.FLUX_SCHNELL_BLOCKS.get(op.where, 1))]


FLUX_VAE_CONFIG = {  # black-forest-labs/FLUX.1-schnell, vae/config.json
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 16,
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
}


def trace_vae(batch: int = 1, size: int = 1024, *, subpixel: bool = False) -> list[Op]:
    """The VAE decode of ``batch`` latents as the pipeline calls it (bf16, eager layout).
    ``subpixel``: with the decoder's upsamplers as the pipeline's sub-pixel convolutions
    (engine.vae_upsample); without, diffusers' own (nearest x2, then a 3x3 convolution)."""
    from diffusers import AutoencoderKL

    with torch.device("meta"):
        vae = AutoencoderKL.from_config(FLUX_VAE_CONFIG).to(torch.bfloat16).eval()
    if subpixel:
        from engine.vae_upsample import use_subpixel_upsampling

        use_subpixel_upsampling(vae.decoder)
    z = torch.empty(batch, 16, size // 8, size // 8, device="meta", dtype=torch.bfloat16)
    return record(vae, lambda: vae.decode(z, return_dict=False))


def trace_text_encoders(text_tokens: int = 256) -> list[Op]:
    """T5-XXL (256 tokens for schnell) and CLIP-L (77 tokens), bf16, as the pipeline runs them."""
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    t5_config = T5Config(  # google/t5-v1_1-xxl, FLUX's text_encoder_2
        d_model=4096,
        d_ff=10240,
        d_kv=64,
        num_heads=64,
        num_layers=24,
        feed_forward_proj="gated-gelu",
        vocab_size=32128,
    )
    clip_config = CLIPTextConfig(  # openai/clip-vit-large-patch14's text tower
        hidden_size=768,
        intermediate_size=3072,
        num_attention_heads=12,
        num_hidden_layers=12,
        max_position_embeddings=77,
        projection_dim=768,
        hidden_act="quick_gelu",
    )
    with torch.device("meta"):
        t5 = T5EncoderModel(t5_config).to(torch.bfloat16).eval()
        clip = CLIPTextModel(clip_config).to(torch.bfloat16).eval()
    ids_t5 = torch.zeros(1, text_tokens, dtype=torch.long, device="meta")
    ids_clip = torch.zeros(1, 77, dtype=torch.long, device="meta")
    return record(t5, lambda: t5(ids_t5)) + record(clip, lambda: clip(ids_clip))
