"""The embedded model that draws (docs/tiny-model.md): tiny FLUX with analytic text encoders and VAE.

Same classes as the real model (diffusers' FluxTransformer2DModel and FluxPipeline, transformers'
T5EncoderModel and CLIPTextModel with their tokenizers, diffusers' AutoencoderKL); only the
transformer is trained (scripts/train_tiny_model.py, weights in weights/tiny-shapes.safetensors).
Everything else is set by hand so that the caption reaches the transformer plainly:

* T5 reads words: one token per vocabulary word (engine.tiny_scenes), each with its own
  orthonormal code. Its one attention layer has three fixed heads: one reads the next token and
  one the previous (relative position bias), one the caption's position words (by content), so
  each word's output is ``[own; next; previous; position]`` (four 32-wide slots): "red" before
  "circle" (the shape's colour) and "red" before "background" differ, and every word carries
  where the shape is, so one attention of the transformer can place a colour. The end of text
  and the pads share a code that reads only pads, so every pad's output is the same (training
  reads the 256 padded tokens as the caption plus one pad of weight ``log n``: same arithmetic).
* CLIP's pooled output is the bag of the caption's characters: its attention averages every token
  up to the end of text (causal), its MLP is off, positions carry nothing. It differs between
  captions with different words; the roles of the words are T5's job.
* The VAE's latent is the picture at 1/64 size (RGB in channels 0-2): an exact average pool to
  encode, exact nearest-neighbour upsampling to decode. Seven levels (scale factor 64) keep the
  transformer's sequence at 64 image tokens for a 1024x1024 picture (16x16 cells of 64 pixels),
  which a CPU trains on in minutes. It draws at that size (the service's default); it was never
  shown another (docs/tiny-model.md).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

SHAPES_WEIGHTS = Path(__file__).resolve().parent.parent / "weights" / "tiny-shapes.safetensors"
SHAPES_TRANSFORMER = {
    "patch_size": 1,
    "in_channels": 16,
    "num_layers": 2,
    "num_single_layers": 2,
    "attention_head_dim": 32,
    "num_attention_heads": 4,
    "joint_attention_dim": 128,  # T5_SLOTS * WORD_DIM
    "pooled_projection_dim": 64,
    "guidance_embeds": False,
    "axes_dims_rope": (4, 14, 14),  # the first axis is 0 for every token: few channels
}
VAE_LEVELS = 7  # scale factor 2 ** (VAE_LEVELS - 1) = 64
VAE_FACTOR = 2 ** (VAE_LEVELS - 1)
# Channels per level: (x, -x) for each of RGB, in GroupNorm groups of two (the decoder's cost at
# full resolution grows with its square: 8 channels decode 1024x1024 in about a second).
VAE_WIDTH = 8
WORD_DIM = 32  # one T5 slot
CLIP_DIM = SHAPES_TRANSFORMER["pooled_projection_dim"]
# GroupNorm's eps is 1e-6; the analytic VAE scales its signal to VAE_SIGNAL so that the variance
# (<= 1e-10) is negligible beside eps and the normalization is linear.
VAE_SIGNAL, VAE_EPS, SILU_OFFSET = 1e-5, 1e-6, 20.0
# The attention bias that makes a T5 head read one neighbour, and the score of a content match:
# e^-score (0 in float32) of the weight goes elsewhere.
NEIGHBOUR_BIAS, HEAD_SCORE = 300.0, 200.0
T5_SLOTS = 4  # own word, next, previous, the caption's position


def word_t5_tokenizer(words):
    """The character-level T5 vocabulary plus one piece per word, so a known word is one token."""
    from transformers import T5Tokenizer

    chars = [chr(c) for c in range(32, 127)] + ["▁"]
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(c, -1.0) for c in chars]
    pieces += [("▁" + w, -1.0) for w in sorted(words)]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=512)


@torch.no_grad()
def analytic_t5(tokenizer, words, position_words, seed: int = 0):
    """T5 whose output for a word is ``[code(i); code(i+1); code(i-1); mean code of the caption's
    position words]`` (four slots of WORD_DIM; see the module doc).

    A word's code is ``[e_w, 1] / sqrt(2)`` with ``e_w`` orthonormal (dimension WORD_DIM - 1) and
    a last coordinate every word shares; the end of text and the pads share one code ``e_pad``
    without it. Heads 0 and 1 read the next and previous token (relative position bias; at the
    sequence's ends the token itself). Head 2 reads by content: a word's query (its shared
    coordinate) meets the keys of position words only, a pad's query the keys of pads only, and
    its values keep the position-word part of a code, so every pad's output is the same whatever
    the sequence's length and the caption.
    """
    from transformers import T5Config, T5EncoderModel
    from transformers.models.t5.modeling_t5 import T5Attention

    d = WORD_DIM
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=T5_SLOTS * d,
        d_kv=d,
        d_ff=4 * d,
        num_layers=1,
        num_heads=3,
        feed_forward_proj="gated-gelu",
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    t5 = T5EncoderModel(config)
    for p in t5.parameters():
        p.zero_()
    g = torch.Generator().manual_seed(seed)
    vocab = tokenizer.get_vocab()
    words = sorted(words)
    if len(words) + 1 > d - 1:
        raise ValueError(f"words: {len(words)} words and the pad do not fit {d - 1} orthogonal codes")
    basis, _ = torch.linalg.qr(torch.randn(d - 1, d - 1, generator=g))  # rows: orthonormal
    # other pieces (characters): random in the space no word and no pad uses, so they never
    # match head 2's keys
    used = basis[: len(words) + 1]
    codes = torch.randn(len(vocab), d - 1, generator=g)
    codes = codes - codes @ used.T @ used
    codes = torch.cat([codes / codes.norm(dim=1, keepdim=True), torch.ones(len(vocab), 1)], 1) / 2**0.5
    for i, w in enumerate(words):
        codes[vocab["▁" + w], : d - 1] = basis[i] / 2**0.5
    e_pad = torch.cat([basis[len(words)], torch.zeros(1)])
    codes[[tokenizer.pad_token_id, tokenizer.eos_token_id]] = e_pad
    t5.shared.weight[:, :d] = codes
    block = t5.encoder.block[0]
    # pre-attention RMSNorm: a unit code in slot 0 stays itself (rms of [c, 0, ...] is 1/sqrt(d_model))
    block.layer[0].layer_norm.weight.fill_(1.0 / config.d_model**0.5)
    attn = block.layer[0].SelfAttention
    eye = torch.eye(d)
    attn.v.weight[:d, :d] = eye  # head 0 value: own code
    attn.v.weight[d : 2 * d, :d] = eye  # head 1 value: own code
    positional = torch.stack([basis[words.index(w)] for w in position_words])  # [P, d - 1]
    attn.v.weight[2 * d : 3 * d - 1, : d - 1] = 2**0.5 * positional.T @ positional  # head 2: position part
    attn.q.weight[2 * d, d - 1] = 2**0.5  # a word's query: its shared coordinate (1)
    attn.q.weight[2 * d + 1, :d] = e_pad  # a pad's query: its pad-ness (1)
    attn.k.weight[2 * d, : d - 1] = HEAD_SCORE * 2**0.5 * positional.sum(0)  # keys of position words
    attn.k.weight[2 * d + 1, :d] = HEAD_SCORE * e_pad  # keys of pads
    for h in range(3):  # head h -> slot h + 1
        attn.o.weight[(h + 1) * d : (h + 2) * d, h * d : (h + 1) * d] = eye
    # head 0 reads the next token, head 1 the previous; with no such neighbour (the sequence's
    # ends), the token itself (half the bias), so nothing depends on the sequence's length.
    rel = torch.tensor([-1, 0, 1])
    buckets = T5Attention._relative_position_bucket(
        rel,
        bidirectional=True,
        num_buckets=config.relative_attention_num_buckets,
        max_distance=config.relative_attention_max_distance,
    ).tolist()
    bias = attn.relative_attention_bias.weight  # [buckets, heads]
    bias[buckets[2], 0] = NEIGHBOUR_BIAS
    bias[buckets[0], 1] = NEIGHBOUR_BIAS
    bias[buckets[1], :2] = NEIGHBOUR_BIAS / 2
    block.layer[1].layer_norm.weight.fill_(1.0)  # the MLP's output weights stay zero: it adds 0
    # slots of about unit norm come out about the same (rms of four unit slots is 1/sqrt(d))
    t5.encoder.final_layer_norm.weight.fill_(1.0 / d**0.5)
    return t5


@torch.no_grad()
def analytic_clip(tokenizer, seed: int = 0):
    """CLIP whose pooled output is the normalized mean of the caption's character codes."""
    from transformers import CLIPTextConfig, CLIPTextModel

    clip = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=CLIP_DIM,
            intermediate_size=2 * CLIP_DIM,
            num_hidden_layers=1,
            num_attention_heads=1,
            max_position_embeddings=77,
            projection_dim=CLIP_DIM,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    for p in clip.parameters():
        p.zero_()
    g = torch.Generator().manual_seed(seed)
    emb = clip.embeddings
    emb.token_embedding.weight.copy_(torch.randn(len(tokenizer), CLIP_DIM, generator=g))
    layer = clip.encoder.layers[0]
    for norm in (layer.layer_norm1, layer.layer_norm2, clip.final_layer_norm):
        norm.weight.fill_(1.0)
    # zero queries and keys: uniform attention over the causal prefix, values = normalized codes
    layer.self_attn.v_proj.weight.copy_(torch.eye(CLIP_DIM))
    layer.self_attn.out_proj.weight.copy_(torch.eye(CLIP_DIM))
    return clip


@torch.no_grad()
def analytic_vae():
    """A tiny AutoencoderKL whose latents are the picture itself at 1/64 size.

    Latent channels 0-2 are RGB in [-1, 1] (channel 3 is zero), scaling 1, shift 0. The encoder
    is an exact 64x64 average pool, the decoder an exact nearest-neighbour 64x upsampling: every
    residual branch is zeroed, each down/up-sampling conv is a fixed linear stencil, and the
    final GroupNorm is made linear by keeping each group's signal (x, -x) far below its eps.
    """
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * VAE_LEVELS,
        up_block_types=("UpDecoderBlock2D",) * VAE_LEVELS,
        block_out_channels=(VAE_WIDTH,) * VAE_LEVELS,
        layers_per_block=1,
        norm_num_groups=VAE_WIDTH // 2,
        mid_block_add_attention=False,
        use_quant_conv=False,
        use_post_quant_conv=False,
        scaling_factor=1.0,
        shift_factor=0.0,
    )
    for p in vae.parameters():
        p.zero_()
    gain = VAE_EPS**0.5 / VAE_SIGNAL  # the GroupNorm weight that undoes the signal scaling

    def fan_out(conv, n_in):  # input channel c -> channels (2c, 2c+1) = (s x, -s x), centre tap
        for c in range(n_in):
            conv.weight[2 * c, c, 1, 1] = VAE_SIGNAL
            conv.weight[2 * c + 1, c, 1, 1] = -VAE_SIGNAL

    def linear_norm(norm):  # (x, -x) groups -> x + SILU_OFFSET on even channels, 0 on odd
        norm.weight[0::2] = gain
        norm.bias[0::2] = SILU_OFFSET

    def gather(conv, n_out):  # even channel 2c -> output c, removing the SiLU offset
        for c in range(n_out):
            conv.weight[c, 2 * c, 1, 1] = 1.0
            conv.bias[c] = -SILU_OFFSET

    enc, dec = vae.encoder, vae.decoder
    fan_out(enc.conv_in, 3)
    for block in enc.down_blocks:
        for down in block.downsamplers or ():
            # Downsample2D pads (0, 1, 0, 1) and convolves with stride 2: taps (0..1, 0..1) are
            # the 2x2 window, an exact average pool.
            for c in range(VAE_WIDTH):
                down.conv.weight[c, c, :2, :2] = 0.25
    linear_norm(enc.conv_norm_out)
    gather(enc.conv_out, 3)
    enc.conv_out.bias[4:] = -30.0  # log-variance at DiagonalGaussianDistribution's floor
    fan_out(dec.conv_in, 3)
    for block in dec.up_blocks:
        for up in block.upsamplers or ():
            for c in range(VAE_WIDTH):
                up.conv.weight[c, c, 1, 1] = 1.0
    linear_norm(dec.conv_norm_out)
    gather(dec.conv_out, 3)
    return vae


def build_shapes_pipeline(seed: int = 0, *, transformer_state: dict | None = None):
    """The embedded model as a float FluxPipeline; the transformer is diffusers' initialization
    (seeded) unless ``transformer_state`` (the trained weights) is given."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    from engine.tiny_model import SCHEDULER, clip_tokenizer
    from engine.tiny_scenes import POSITIONS, VOCABULARY

    tok, tok2 = clip_tokenizer(), word_t5_tokenizer(VOCABULARY)
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(**SHAPES_TRANSFORMER)
    if transformer_state is not None:
        transformer.load_state_dict(transformer_state)
    # eval(): a freshly built T5 is in training mode, and its dropout would scramble the codes
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER),
        vae=analytic_vae().eval(),
        text_encoder=analytic_clip(tok, seed).eval(),
        tokenizer=tok,
        text_encoder_2=analytic_t5(
            tok2, VOCABULARY, sorted({w for p in POSITIONS for w in p.split()}), seed
        ).eval(),
        tokenizer_2=tok2,
        transformer=transformer.eval(),
    )


def shapes_weights_digest(path: Path = SHAPES_WEIGHTS) -> str:
    """The trained weights' sha256 (first 16 hex digits): a made model folder records it."""
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def make_shapes_model(out: str | Path, *, weights: Path = SHAPES_WEIGHTS, quantize: bool = True) -> Path:
    """Write the embedded model's folder: the trained tiny FLUX (16-bit) and its SVDQuant W4A4
    checkpoint, calibrated on its own training captions. Under a minute on a CPU."""
    from safetensors.torch import load_file

    from engine.tiny_model import CHECKPOINT_NAME

    out = Path(out)
    pipe = build_shapes_pipeline(transformer_state=load_file(weights))
    pipe.save_pretrained(out, safe_serialization=True)
    if quantize:
        from engine.flux import save_checkpoint

        config = quantize_shapes(pipe)
        save_checkpoint(pipe.transformer, out / CHECKPOINT_NAME, config)
    (out / "TINY_MODEL.json").write_text(
        json.dumps({"kind": "shapes", "weights_sha256": shapes_weights_digest(weights)}, indent=2)
    )
    return out


CALIBRATION_SIZES = ((1024, 1024),)  # the size it was trained at
SHAPES_RANK = 16


def calibration_prompts(n: int = 8) -> list[str]:
    """Training captions spread over the vocabulary (never a held-out colour/shape pair)."""
    from engine.tiny_scenes import all_scenes

    scenes = all_scenes(held_out=False)
    return [s.caption for s in scenes[:: max(1, len(scenes) // n)]][:n]


def quantize_shapes(pipe, config=None):
    """Quantize ``pipe.transformer`` in place (SVDQuant rank 16 unless ``config``), calibrated on
    :func:`calibration_prompts` at both trained sizes; returns the config."""
    from engine.flux import calibrate, quantize_transformer
    from engine.quant import SVDQConfig

    config = config or SVDQConfig(rank=SHAPES_RANK)
    prompts = calibration_prompts()
    stats = calibrate(pipe, prompts=prompts, n_prompts=len(prompts), resolutions=CALIBRATION_SIZES, steps=4)
    quantize_transformer(pipe.transformer, stats, config)
    return config
