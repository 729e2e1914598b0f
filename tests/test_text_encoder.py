"""The small memory mode's 4-bit T5 (engine/text_encoder.py): its weights, its error on real
prompts (T5's output and the transformer's), and the pipeline in each memory mode."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from engine.flux import load_transformer
from engine.flux.prompts import CALIBRATION_PROMPTS
from engine.memory import Mode
from engine.modules import W4A16Linear
from engine.pipeline import FluxGenerator
from engine.text_encoder import T5W4A16Linear, quantize_t5
from engine.tiny_model import CHECKPOINT_NAME

from .flux_cases import float_pipe

PROMPTS = CALIBRATION_PROMPTS[:4]
# Measured on the tiny model's T5 (random weights, 4-bit RTN, group 64; docs/quantization.md):
# T5 output cosine 0.992-0.993 per prompt; the first step's transformer output moves by
# |y(q5) - y(t5)| / |y(t5)| , 1.8e-3 at most. (The tiny T5's outputs for different prompts
# differ less than that: 256 tokens, mostly padding, through one random layer; so this model
# cannot say how visible the change is, only bound it.)
T5_COSINE_MIN = 0.99
TRANSFORMER_CHANGE_MAX = 0.005  # measured 1.8e-3


def _ids(pipe, prompt: str) -> torch.Tensor:
    return pipe.tokenizer_2(
        prompt, padding="max_length", max_length=256, truncation=True, return_tensors="pt"
    ).input_ids


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lean_dequantization_is_the_generic_one(dtype):
    linear = nn.Linear(256, 96, bias=False).to(dtype)
    generic = W4A16Linear.from_linear(linear, dtype=dtype)
    lean = T5W4A16Linear.from_linear(linear, dtype=dtype)
    a, b = generic.dequantized_weight(dtype), lean.dequantized_weight(dtype)
    assert a.shape == b.shape == (96, 256) and b.dtype == dtype
    # the generic path computes in fp32 and rounds once, the lean one computes q * s + z in
    # dtype: they differ by at most a rounding of the product and one of the sum, each at most
    # eps times the size of its terms (codes 0..15)
    s, z = lean.wscales.float(), lean.wzeros.float()
    bound = (torch.finfo(dtype).eps * (2 * 15 * s.abs() + z.abs())).repeat_interleave(64, dim=1)
    assert ((a.float() - b.float()).abs() <= bound).all()
    assert (a != b).float().mean() < 0.5  # mostly identical
    assert lean.weight.dtype == dtype and lean.weight.numel() == 0  # what T5's wo cast reads


def test_quantize_t5_swaps_every_block_linear_and_shrinks_it(tiny_model_dir):
    t5 = float_pipe(tiny_model_dir).text_encoder_2
    linears = [n for n, m in t5.named_modules() if isinstance(m, nn.Linear)]
    before, after = quantize_t5(t5, "cpu")
    assert linears and not any(isinstance(m, nn.Linear) for m in t5.modules())
    assert sum(isinstance(m, T5W4A16Linear) for m in t5.modules()) == len(linears)
    # fp32 weights (4 B) -> 0.5 B codes + one fp32 scale and zero per 64: 0.625 B per weight
    assert after == pytest.approx(before * 0.625 / 4, rel=1e-6)
    with pytest.raises(ValueError, match="no linear layers"):
        quantize_t5(nn.Sequential(nn.Linear(64, 64)), "cpu")


def test_t5_error_on_real_prompts_and_the_transformers_output(tiny_model_dir):
    pipe = float_pipe(tiny_model_dir)
    q5 = copy.deepcopy(pipe.text_encoder_2)
    quantize_t5(q5, "cpu")
    transformer = load_transformer(tiny_model_dir / CHECKPOINT_NAME)
    config = transformer.config
    common = {
        "hidden_states": torch.randn(1, 256, config.in_channels),
        "pooled_projections": torch.randn(1, config.pooled_projection_dim),
        "timestep": torch.tensor([1.0]),
        "img_ids": torch.zeros(256, 3),
        "txt_ids": torch.zeros(256, 3),
        "return_dict": False,
    }
    t5_cos, change = [], []
    with torch.no_grad():
        embeds = [(pipe.text_encoder_2(_ids(pipe, p))[0], q5(_ids(pipe, p))[0]) for p in PROMPTS]
        outs = [[transformer(encoder_hidden_states=e, **common)[0] for e in pair] for pair in embeds]
    for (a, b), (ya, yb) in zip(embeds, outs, strict=True):
        t5_cos.append(F.cosine_similarity(a.flatten(), b.flatten(), dim=0).item())
        change.append(((yb - ya).norm() / ya.norm()).item())
        assert (yb - ya).norm() > 0  # the quantized encoder does change the output
    print(f"T5 cosine {min(t5_cos):.4f}-{max(t5_cos):.4f}; transformer change {max(change):.2e}")
    assert min(t5_cos) >= T5_COSINE_MIN
    assert max(change) <= TRANSFORMER_CHANGE_MAX


def test_small_mode_pipeline_matches_fast_and_decodes_one_image_at_a_time(tiny_model_dir):
    fast = FluxGenerator.from_pretrained(tiny_model_dir, tiny_model_dir / CHECKPOINT_NAME, memory=Mode.FAST)
    small = FluxGenerator.from_pretrained(tiny_model_dir, tiny_model_dir / CHECKPOINT_NAME, memory=Mode.SMALL)
    assert fast.pipe.vae.use_slicing and small.pipe.vae.use_slicing
    assert any(isinstance(m, T5W4A16Linear) for m in small.pipe.text_encoder_2.modules())
    assert not any(isinstance(m, T5W4A16Linear) for m in fast.pipe.text_encoder_2.modules())
    decoded = []
    hook = small.pipe.vae.decoder.register_forward_hook(lambda m, a, o: decoded.append(a[0].shape[0]))
    images = small.generate("a fox", width=128, height=128, steps=1, seed=3, num_outputs=2)
    hook.remove()
    assert decoded == [1, 1]  # one image per decoder call
    ref = fast.generate("a fox", width=128, height=128, steps=1, seed=3, num_outputs=2)
    for a, b in zip(images, ref, strict=True):
        x = torch.tensor(list(a.get_flattened_data()), dtype=torch.float32)
        y = torch.tensor(list(b.get_flattened_data()), dtype=torch.float32)
        assert F.cosine_similarity(x.flatten(), y.flatten(), dim=0) > 0.99
