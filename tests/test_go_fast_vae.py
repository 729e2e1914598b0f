"""go_fast's compiled VAE decoder (issue 26): the compiled decoder gives the eager one's image up
to fp32 rounding under real inductor on the CPU (C++ code generation, not aot_eager), one graph
serves the served sizes, and go_fast off (or no go_fast) keeps the eager decoder."""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKL

from engine.flux import load_transformer
from engine.go_fast import CompileSettings, GoFast, compile_vae_decoder, configure_compiler, graphs_compiled
from engine.inputs import served_sizes
from engine.tiny_model import CHECKPOINT_NAME

from .flux_cases import params_to_float


def narrow_flux_vae(attention: bool = True) -> AutoencoderKL:
    """FLUX.1's VAE structure (4 up blocks of 3 resnets, 3 upsamplers, mid-block attention, 16
    latent channels) at narrow widths, so that a CPU decodes a served size in a moment.
    ``attention=False``: without the mid-block attention, for aot_eager on the CPU, which fails
    on its output (its channels-last strides reach the CPU group_norm kernel's contiguity check:
    a CPU aot_eager limitation; inductor, the served backend, decomposes group_norm)."""
    torch.manual_seed(0)
    return AutoencoderKL(
        mid_block_add_attention=attention,
        latent_channels=16,
        block_out_channels=(8, 8, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2,
        norm_num_groups=4,
        use_quant_conv=False,
        use_post_quant_conv=False,
    ).eval()


def latent(width: int, height: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, 16, height // 8, width // 8, generator=g)


@pytest.mark.slow
def test_inductor_decoder_equals_eager_with_one_graph_and_go_fast_off_is_eager(fresh_dynamo):
    """0.25 megapixels at 1:1, 16:9, 9:16 and 21:9: one inductor graph (counted), the eager
    decoder's image within fp32 rounding; under go_fast off, bit for bit the eager decoder."""
    configure_compiler(CompileSettings())  # no duck shaping, as served
    vae = narrow_flux_vae()
    sizes = [(512, 512), (672, 384), (384, 672), (768, 320)]
    with torch.inference_mode():
        eager = {s: vae.decode(latent(*s), return_dict=False)[0] for s in sizes}
    compile_vae_decoder(vae, CompileSettings(backend="inductor"))
    before = graphs_compiled()
    with torch.inference_mode():
        with GoFast.disabled():  # go_fast off: nothing compiles, the eager forward runs
            off = vae.decode(latent(512, 512), return_dict=False)[0]
        assert graphs_compiled() == before and torch.equal(off, eager[(512, 512)])
        for s in sizes:
            got = vae.decode(latent(*s), return_dict=False)[0]
            assert got.shape == (1, 3, s[1], s[0])
            # inductor fuses GroupNorm's reductions and the SiLU/add glue: fp32 summation-order
            # differences only (outputs of magnitude ~1-10; measured max difference ~1e-5)
            torch.testing.assert_close(got, eager[s], rtol=1e-4, atol=1e-4)
    assert graphs_compiled() - before == 1  # the four sizes share one dynamic graph


@pytest.mark.slow
def test_one_graph_serves_every_served_size_of_fluxs_vae(fresh_dynamo):
    """FLUX.1's real VAE (full widths, on the meta device: no arithmetic) traced at all 22 served
    sizes: one graph. Guards of the device's convolution backend are not on the meta device:
    the CPU's splits the sizes in two by input size (scripts/gpu_session.py counts CUDA's)."""
    from perfmodel.image_trace import FLUX_VAE_CONFIG

    configure_compiler(CompileSettings())
    with torch.device("meta"):
        vae = AutoencoderKL.from_config(FLUX_VAE_CONFIG).eval()
    compile_vae_decoder(vae, CompileSettings(backend="aot_eager"))
    before = graphs_compiled()
    sizes = served_sizes()
    assert len(sizes) == 22
    with torch.inference_mode():
        for w, h in sizes:
            out = vae.decode(torch.empty(1, 16, h // 8, w // 8, device="meta"), return_dict=False)[0]
            assert out.shape == (1, 3, h, w)
    assert graphs_compiled() - before == 1


def test_go_fast_compiles_the_decoder_only_when_asked(tiny_model_dir, fresh_dynamo):
    """With a VAE and CompileSettings.vae the decoder is compiled in place; without go_fast
    (a CPU service: no settings), or with vae=False, it stays the eager module. Nothing runs."""
    transformer = params_to_float(load_transformer(tiny_model_dir / CHECKPOINT_NAME))
    aot = CompileSettings(backend="aot_eager", mode=None)
    vae = narrow_flux_vae()
    GoFast(transformer, aot, vae=vae)
    assert vae.decoder._compiled_call_impl is not None
    for settings in (CompileSettings(backend="aot_eager", vae=False), aot):
        vae = narrow_flux_vae()
        fast = GoFast(transformer, settings, vae=None if settings is aot else vae)
        assert fast.vae is None and vae.decoder._compiled_call_impl is None


@pytest.mark.slow
def test_warm_up_decodes_each_size_once_and_logs_new_graphs(tiny_model_dir, fresh_dynamo):
    transformer = params_to_float(load_transformer(tiny_model_dir / CHECKPOINT_NAME))
    configure_compiler(CompileSettings())
    vae = narrow_flux_vae(attention=False)
    fast = GoFast(transformer, CompileSettings(backend="aot_eager", mode=None), vae=vae)
    fast.warm_up_vae([(512, 512), (672, 384)])
    assert [(r.shape, r.graphs, r.at_setup) for r in fast.records] == [("VAE decode 512x512", 1, True)]
