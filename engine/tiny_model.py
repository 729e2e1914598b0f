"""A complete FLUX-architecture model folder with tiny random weights, built offline.

Same component classes, folder layout and sizes rules as FLUX.1-schnell (16-channel-per-2x2
latents packed for the transformer, VAE scale factor 8, 512 T5 tokens), so every code path of
the real model runs on it: diffusers loads it with ``FluxPipeline.from_pretrained``. Widths
are tiny so that a 1-megapixel image takes seconds on a 2-core CPU:

* the VAE has no mid-block attention: at 1024x1024 the latent is 128x128, and attention over
  its 16,384 positions is what made a tiny VAE's decode take about a minute;
* the quantized layers have K in {64, 256, 320}, multiples of the 64-channel group;
* like the real model's, its residual streams carry a few channels tens of times larger than
  the rest (the embedders' weights for those channels are scaled up), so the activation
  outliers SVDQuant exists for are there to be absorbed.

Tokenizers are built locally: a byte-level CLIP BPE with no merges (every character is a
token) and a character-level T5 unigram vocabulary.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

TINY_TRANSFORMER = {
    "patch_size": 1,
    "in_channels": 16,
    "num_layers": 2,
    "num_single_layers": 2,
    "attention_head_dim": 32,
    "num_attention_heads": 2,
    "joint_attention_dim": 64,
    "pooled_projection_dim": 32,
    "guidance_embeds": False,
    "axes_dims_rope": (8, 12, 12),
}
# FLUX.1-schnell's scheduler settings.
SCHEDULER = {
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "max_image_seq_len": 4096,
    "max_shift": 1.15,
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "use_dynamic_shifting": False,
}
CHECKPOINT_NAME = "svdq-transformer.safetensors"
TINY_RANK = 16
OUTLIER_CHANNELS, OUTLIER_SCALE = 4, 20.0


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable character map."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


def _clip_tokenizer():
    from transformers import CLIPTokenizer

    chars = list(_bytes_to_unicode().values())
    vocab = {tok: i for i, tok in enumerate(chars + [c + "</w>" for c in chars])}
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def clip_tokenizer():
    """The character-level CLIP tokenizer (also the embedded shapes model's)."""
    return _clip_tokenizer()


def _t5_tokenizer():
    from transformers import T5Tokenizer

    chars = [chr(c) for c in range(32, 127)] + ["▁"]
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(c, -1.0) for c in chars]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=512)


def build_tiny_pipeline(seed: int = 0):
    """The float tiny FluxPipeline, deterministic for a given seed."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    tok, tok2 = _clip_tokenizer(), _t5_tokenizer()
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(**TINY_TRANSFORMER)
    # diffusers zero-initializes the AdaLN and output layers; random values make every layer
    # matter, as in a trained model.
    with torch.no_grad():
        for p in transformer.parameters():
            if (p == 0).all():
                p.normal_(0.0, 0.02)
        g = torch.Generator().manual_seed(seed)
        for embedder in (transformer.x_embedder, transformer.context_embedder):
            outliers = torch.randperm(embedder.out_features, generator=g)[:OUTLIER_CHANNELS]
            embedder.weight[outliers] *= OUTLIER_SCALE
            embedder.bias[outliers] *= OUTLIER_SCALE
    clip = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=77,
            projection_dim=32,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
    )
    t5 = T5EncoderModel(
        T5Config(
            vocab_size=len(tok2),
            d_model=64,
            d_kv=32,
            d_ff=128,
            num_layers=1,
            num_heads=2,
            feed_forward_proj="gated-gelu",
            pad_token_id=tok2.pad_token_id,
            eos_token_id=tok2.eos_token_id,
        )
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=TINY_TRANSFORMER["in_channels"] // 4,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(16, 16, 16, 16),
        layers_per_block=1,
        norm_num_groups=8,
        mid_block_add_attention=False,
        use_quant_conv=False,
        use_post_quant_conv=False,
        scaling_factor=0.3611,
        shift_factor=0.1159,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(**SCHEDULER)
    return FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=clip,
        tokenizer=tok,
        text_encoder_2=t5,
        tokenizer_2=tok2,
        transformer=transformer,
    )


def make_tiny_model(out: str | Path, *, seed: int = 0, quantize: bool = True) -> Path:
    """Write the tiny model folder (and its quantized transformer checkpoint, format version 2:
    fused q/k/v, as quantize_transformer makes it) to ``out``."""
    out = Path(out)
    pipe = build_tiny_pipeline(seed)
    pipe.save_pretrained(out, safe_serialization=True)
    if quantize:
        from engine.flux import calibrate, quantize_transformer, save_checkpoint
        from engine.quant import SVDQConfig

        stats = calibrate(pipe, prompts=None, n_prompts=4, resolutions=((256, 256),), steps=2)
        config = SVDQConfig(rank=TINY_RANK)
        quantize_transformer(pipe.transformer, stats, config)
        save_checkpoint(pipe.transformer, out / CHECKPOINT_NAME, config)
    (out / "TINY_MODEL.json").write_text(
        json.dumps({"seed": seed, "transformer": TINY_TRANSFORMER}, indent=2)
    )
    return out
