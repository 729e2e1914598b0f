"""engine.vae_upsample (issue 26): the VAE decoder's nearest x2 + 3x3 upsamplers as 2x2 sub-pixel
convolutions, checked against the definer, diffusers' own Upsample2D and AutoencoderKL decode:
the module within a rounding bound derived per element, the decoder within the error diffusers'
own decode has against a float64 decode, under inductor with one graph over the sizes, and
applied by FluxGenerator.from_pretrained."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from diffusers import AutoencoderKL
from diffusers.models.upsampling import Upsample2D

from engine.go_fast import CompileSettings, compile_vae_decoder, configure_compiler, graphs_compiled
from engine.inputs import served_sizes
from engine.vae_upsample import SubpixelUpsample2D, use_subpixel_upsampling

from .test_go_fast_vae import latent, narrow_flux_vae  # fresh_dynamo: conftest's fixture

U32, U16 = 2.0**-24, 2.0**-8  # unit roundoff of fp32 and bf16 (8-bit significand)
FMTS = {"nchw": torch.contiguous_format, "nhwc": torch.channels_last}


def upsampler(cin: int, cout: int, seed: int = 0) -> Upsample2D:
    torch.manual_seed(seed)
    up = Upsample2D(cin, use_conv=True, out_channels=cout)
    with torch.no_grad():
        up.conv.bias.normal_()
    return up.eval()


def abs_conv(up: Upsample2D, x: torch.Tensor) -> torch.Tensor:
    """sum |w| |x| over each output's taps (plus |bias|), in float64: the scale rounding errors are
    relative to (diffusers' module with absolute weights on |x|)."""
    a = copy.deepcopy(up).double()
    with torch.no_grad():
        a.conv.weight.abs_()
        a.conv.bias.abs_()
    return a(x.double().abs())


@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize(
    ("cin", "cout", "h", "w"), [(8, 8, 6, 6), (12, 5, 5, 9), (4, 16, 11, 3), (16, 16, 1, 7)]
)
def test_upsampler_equals_diffusers_fp32(cin, cout, h, w, fmt):
    """fp32: the two differ only in summation order (9 Cin taps there, 4 Cin here, with merged taps
    summed in fp32), so each output is within the deterministic bound 2 n u sum |w x| (n = 9 Cin + 1
    terms; Higham's gamma_n for each side). A wrong phase or tap would be off by O(sum |w x|)."""
    up = upsampler(cin, cout).to(memory_format=FMTS[fmt])
    x = torch.randn(2, cin, h, w).to(memory_format=FMTS[fmt])
    sub = SubpixelUpsample2D.from_upsample(up)
    with torch.no_grad():
        ref, got = up(x), sub(x)
    assert got.shape == ref.shape == (2, cout, 2 * h, 2 * w)
    assert got.is_contiguous(memory_format=FMTS[fmt])  # the input's memory format is kept
    bound = 2 * (9 * cin + 1) * U32 * abs_conv(up, x)
    assert ((got.double() - ref.double()).abs() <= bound).all()


@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize(("cin", "cout", "h", "w"), [(8, 8, 6, 6), (12, 5, 5, 9)])
def test_upsampler_bf16_within_bf16_rounding(cin, cout, h, w, fmt):
    """bf16: against the exact result for the same bf16 weights and input (float64), each output is
    off by at most its own bf16 rounding (u |y|) plus each merged tap's one rounding (u |tap| |x|,
    summed: u sum |w x|) plus fp32 accumulation; diffusers' bf16 module meets the same bound
    without the middle term."""
    up = upsampler(cin, cout).to(torch.bfloat16, memory_format=FMTS[fmt])
    x = torch.randn(2, cin, h, w).to(torch.bfloat16, memory_format=FMTS[fmt])
    sub = SubpixelUpsample2D.from_upsample(up)
    assert sub.conv.weight.dtype == torch.bfloat16
    with torch.no_grad():
        exact = copy.deepcopy(up).double()(x.double())
        got, ref = sub(x).double(), up(x).double()
    scale = abs_conv(up, x)
    accumulate = 2 * (9 * cin + 1) * U32 * scale
    assert ((ref - exact).abs() <= U16 * exact.abs() + accumulate).all()  # the bound holds for the definer
    assert ((got - exact).abs() <= U16 * (exact.abs() + scale) + accumulate).all()


def test_output_size_channels_and_ineligible_upsamplers(caplog):
    up = upsampler(8, 8)
    sub = SubpixelUpsample2D.from_upsample(up)
    x = torch.randn(1, 8, 4, 6)
    with torch.no_grad():
        torch.testing.assert_close(sub(x, output_size=(8, 12)), sub(x))  # twice the input: as diffusers
        with pytest.raises(ValueError, match="output_size"):
            sub(x, output_size=(9, 12))
        with pytest.raises(ValueError, match="channels"):
            sub(torch.randn(1, 4, 4, 6))
    holder = torch.nn.ModuleDict(
        {
            "plain": upsampler(8, 8),
            "no_conv": Upsample2D(8, use_conv=False),
            "transposed": Upsample2D(8, use_conv_transpose=True),
            "k5": Upsample2D(8, use_conv=True, kernel_size=5, padding=2),
            "norm": Upsample2D(8, use_conv=True, norm_type="rms_norm", eps=1e-6, elementwise_affine=True),
        }
    )
    with caplog.at_level(logging.WARNING, logger="engine.vae_upsample"):
        assert use_subpixel_upsampling(holder) == 1
    assert isinstance(holder["plain"], SubpixelUpsample2D)
    kept = [k for k, m in holder.items() if isinstance(m, Upsample2D)]
    assert kept == ["no_conv", "transposed", "k5", "norm"]
    assert all(any(k in r.getMessage() for r in caplog.records) for k in kept)
    with pytest.raises(ValueError, match="transposed"):
        SubpixelUpsample2D.from_upsample(holder["transposed"])


def tiny_quant_vae() -> AutoencoderKL:
    """The tiny model's VAE layout (engine.tiny_model) with quant convs: another decoder shape."""
    torch.manual_seed(1)
    return AutoencoderKL(
        latent_channels=16,
        block_out_channels=(16, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        layers_per_block=1,
        norm_num_groups=8,
        mid_block_add_attention=False,
    ).eval()


def _images(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """diffusers' postprocessing of a decode: [0, 1] images and their uint8 levels (as to_uint8)."""
    img = (x.float() / 2 + 0.5).clamp(0, 1)
    return img, (img * 255).round()


DECODE_SIZES = [(192, 192), (256, 144), (112, 240)]


@pytest.mark.parametrize("make", [narrow_flux_vae, tiny_quant_vae], ids=["flux-narrow", "tiny-quant"])
def test_decode_equals_diffusers(make):
    """The whole AutoencoderKL.decode, random weights, square and non-square sizes, against
    diffusers' decode and a float64 decode. fp32: within 3x diffusers' own fp32 error (measured
    ratio about 1.1-1.3; the images' max difference about 4e-6 in [0, 1], at most 1 uint8 level on
    under 1e-4 of the values, where a value sits on a rounding edge). bf16: the RMS error against
    float64 within 1.25x diffusers' own bf16 decode's (measured 0.9-1.1x)."""
    vae = make()
    sub = copy.deepcopy(vae)
    assert use_subpixel_upsampling(sub.decoder) == len(vae.config.block_out_channels) - 1
    vae64 = copy.deepcopy(vae).double()
    bf, sub_bf = copy.deepcopy(vae).bfloat16(), copy.deepcopy(sub).bfloat16()
    rms = lambda t: t.double().pow(2).mean().sqrt().item()  # noqa: E731
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    for w, h in DECODE_SIZES:
        g = torch.Generator().manual_seed(w + h)
        z = torch.randn(1, vae.config.latent_channels, h // factor, w // factor, generator=g)
        with torch.inference_mode():
            exact = vae64.decode(z.double(), return_dict=False)[0]
            ref, got = vae.decode(z, return_dict=False)[0], sub.decode(z, return_dict=False)[0]
            ref_bf = bf.decode(z.bfloat16(), return_dict=False)[0].double()
            got_bf = sub_bf.decode(z.bfloat16(), return_dict=False)[0].double()
        assert got.shape == (1, 3, h, w)
        own = (ref.double() - exact).abs().max().item()
        assert 0 < (got - ref).abs().max().item() <= 3 * own, (w, h)
        (img_ref, u8_ref), (img_got, u8_got) = _images(ref), _images(got)
        assert (img_got - img_ref).abs().max() <= 3 * own
        assert (u8_got - u8_ref).abs().max() <= 1 and (u8_got != u8_ref).double().mean() < 1e-3
        assert rms(got_bf - exact) <= 1.25 * rms(ref_bf - exact), (w, h)


def test_the_analytic_vae_decodes_bit_for_bit_the_same():
    """tiny-shapes' analytic VAE (engine.tiny_shapes): its upsamplers are identity centre taps, whose
    merged taps are exact (sums with zeros), so its nearest 64x decode is unchanged bit for bit."""
    from engine.tiny_shapes import VAE_FACTOR, analytic_vae

    vae = analytic_vae().eval()
    sub = copy.deepcopy(vae)
    assert use_subpixel_upsampling(sub.decoder) == 6
    z = torch.rand(1, 4, 384 // VAE_FACTOR, 640 // VAE_FACTOR) * 2 - 1
    z[:, 3] = 0
    with torch.inference_mode():
        assert torch.equal(sub.decode(z, return_dict=False)[0], vae.decode(z, return_dict=False)[0])


def test_from_pretrained_applies_it_unless_asked_not_to(tiny_model_dir):
    from engine.pipeline import FluxGenerator
    from engine.tiny_model import CHECKPOINT_NAME

    kinds = {}
    for flag in (True, False):
        gen = FluxGenerator.from_pretrained(
            tiny_model_dir, tiny_model_dir / CHECKPOINT_NAME, vae_subpixel=flag
        )
        kinds[flag] = {type(m).__name__ for b in gen.pipe.vae.decoder.up_blocks for m in b.upsamplers or ()}
    assert kinds == {True: {"SubpixelUpsample2D"}, False: {"Upsample2D"}}


@pytest.mark.slow
def test_inductor_decoder_equals_eager_with_one_graph(fresh_dynamo):
    """go_fast's compile (compile_vae_decoder, inductor on the CPU) of the sub-pixel decoder: one
    dynamic graph over 1:1, 16:9, 9:16 and 21:9 at 0.25 megapixels (no graph more than diffusers'
    decoder takes, tests/test_go_fast_vae.py), within fp32 rounding of the eager sub-pixel decode
    and of diffusers' eager decode."""
    configure_compiler(CompileSettings())
    vae = narrow_flux_vae()
    sizes = [(512, 512), (672, 384), (384, 672), (768, 320)]
    with torch.inference_mode():
        ref = {s: vae.decode(latent(*s), return_dict=False)[0] for s in sizes}
    use_subpixel_upsampling(vae.decoder)
    with torch.inference_mode():
        eager = {s: vae.decode(latent(*s), return_dict=False)[0] for s in sizes}
    compile_vae_decoder(vae, CompileSettings(backend="inductor"))
    before = graphs_compiled()
    with torch.inference_mode():
        for s in sizes:
            got = vae.decode(latent(*s), return_dict=False)[0]
            torch.testing.assert_close(got, eager[s], rtol=1e-4, atol=1e-4)  # as test_go_fast_vae
            torch.testing.assert_close(got, ref[s], rtol=1e-4, atol=1e-4)
    assert graphs_compiled() - before == 1


@pytest.mark.slow
def test_one_graph_serves_every_served_size_of_fluxs_vae(fresh_dynamo):
    """FLUX.1's VAE at full widths with sub-pixel upsamplers, on the meta device, traced at all 22
    served sizes: one graph, as diffusers' decoder (tests/test_go_fast_vae.py)."""
    from perfmodel.image_trace import FLUX_VAE_CONFIG

    configure_compiler(CompileSettings())
    with torch.device("meta"):
        vae = AutoencoderKL.from_config(FLUX_VAE_CONFIG).eval()
    assert use_subpixel_upsampling(vae.decoder) == 3
    compile_vae_decoder(vae, CompileSettings(backend="aot_eager"))
    before = graphs_compiled()
    with torch.inference_mode():
        for w, h in served_sizes():
            out = vae.decode(torch.empty(1, 16, h // 8, w // 8, device="meta"), return_dict=False)[0]
            assert out.shape == (1, 3, h, w)
    assert graphs_compiled() - before == 1


@pytest.mark.slow
def test_inductor_channels_last_upsampler_then_group_norm(fresh_dynamo):
    """The CUDA layout (engine.pipeline puts the VAE in channels_last) under inductor on the CPU:
    the sub-pixel upsampler and the next resnet's GroupNorm + SiLU, dynamic over three sizes in one
    graph, equal to diffusers' Upsample2D and the same norm within fp32 rounding, channels_last out."""
    configure_compiler(CompileSettings())
    up = upsampler(16, 16).to(memory_format=torch.channels_last)
    norm = torch.nn.GroupNorm(4, 16).eval()
    sub = SubpixelUpsample2D.from_upsample(up)
    step = torch.compile(
        lambda x: torch.nn.functional.silu(norm(sub(x))), backend="inductor", dynamic=True, fullgraph=True
    )
    before = graphs_compiled()
    with torch.inference_mode():
        for h, w in [(12, 12), (9, 16), (16, 7)]:
            x = torch.randn(1, 16, h, w).to(memory_format=torch.channels_last)
            got = step(x)
            assert got.shape == (1, 16, 2 * h, 2 * w) and got.is_contiguous(memory_format=torch.channels_last)
            torch.testing.assert_close(got, torch.nn.functional.silu(norm(up(x))), rtol=1e-5, atol=1e-5)
    assert graphs_compiled() - before == 1
