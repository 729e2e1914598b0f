"""Post-processing on the device (issue 26, lever g) and the channels_last VAE decoder (lever f).

The definer of the images' bytes is diffusers' own post-processing (``pt_to_numpy`` then
``numpy_to_pil``): ``engine.pipeline.to_pil`` must give the same bytes from the tensor it now
converts on the GPU.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from diffusers.image_processor import VaeImageProcessor

from engine.pipeline import to_pil


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_to_pil_gives_diffusers_bytes(dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 17, 23, generator=g)
    # every rounding boundary k + 0.5 (half to even in both), and the ends of the range
    x.view(-1)[:511] = (torch.arange(511) + 1) / 2 / 255
    x.view(-1)[511:513] = torch.tensor([0.0, 1.0])
    x = x.to(dtype)
    ours = to_pil(x)
    theirs = VaeImageProcessor.numpy_to_pil(VaeImageProcessor.pt_to_numpy(x))
    assert [im.mode for im in ours] == [im.mode for im in theirs] == ["RGB", "RGB"]
    for a, b in zip(ours, theirs, strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_channels_last_vae_decodes_the_same_image():
    torch.manual_seed(0)
    vae = AutoencoderKL(
        latent_channels=4,
        block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=8,
    ).eval()
    z = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        ref = vae.decode(z, return_dict=False)[0]
        vae.to(memory_format=torch.channels_last)
        got = vae.decode(z, return_dict=False)[0]
    assert got.shape == ref.shape == (1, 3, 16, 16)
    # the same convolutions in another memory order: fp32 summation-order differences only
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
