"""The safety models' input prepared on the device (engine.safety_input, issue 26) against its
definer: transformers' own image processors (the PIL backend the service used before), run on
PIL images of served sizes with the published preprocessor configs; and the checker's verdicts,
with thresholds set between the images' own scores, unchanged."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from engine.safety import NSFWClassifier, SafetyChecker, as_pixels
from engine.safety_input import check_processor, pixel_values

# CompVis/stable-diffusion-safety-checker, preprocessor_config.json (the safety checker's
# feature_extractor, as FLUX.1-schnell's weights manifest fetches it)
CLIP_CONFIG = {
    "crop_size": 224,
    "do_center_crop": True,
    "do_normalize": True,
    "do_resize": True,
    "feature_extractor_type": "CLIPFeatureExtractor",
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "resample": 3,
    "size": 224,
}
# Falconsai/nsfw_image_detection, preprocessor_config.json
VIT_CONFIG = {
    "do_normalize": True,
    "do_rescale": True,
    "do_resize": True,
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
    "resample": 2,
    "rescale_factor": 0.00392156862745098,
    "size": {"height": 224, "width": 224},
}
# (width, height): 1:1, 16:9, 21:9, 9:16 (the height shrinks most: Pillow 13 resizes it first),
# 3:4, and 0.25 megapixels
SIZES = [(1024, 1024), (1344, 768), (1536, 640), (768, 1344), (896, 1152), (512, 512)]


def clip_processor():
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(**CLIP_CONFIG)


def vit_processor():
    from transformers import ViTImageProcessor

    return ViTImageProcessor(**VIT_CONFIG)


def image(width: int, height: int, seed: int) -> torch.Tensor:
    """``[H, W, 3]`` uint8 with an image's structure: smooth colour fields, edges and fine noise."""
    g = torch.Generator().manual_seed(seed)
    lo = torch.rand(1, 3, max(height // 64, 2), max(width // 64, 2), generator=g)
    x = torch.nn.functional.interpolate(lo, size=(height, width), mode="bicubic", align_corners=False)
    x = (
        x
        + (torch.rand(1, 3, height // 8, width // 8, generator=g) > 0.9)
        .float()
        .repeat_interleave(8, 2)
        .repeat_interleave(8, 3)
        * 0.5
    )  # hard-edged blocks
    x = x + 0.04 * torch.randn(1, 3, height, width, generator=g)
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)[0].permute(1, 2, 0).contiguous()


def levels(a: torch.Tensor, b: torch.Tensor, processor) -> torch.Tensor:
    """``|a - b|`` of two pixel_values in 8-bit levels of the original image."""
    std = torch.tensor(processor.image_std).view(1, -1, 1, 1)
    return (a - b).abs() * std / processor.rescale_factor


@pytest.mark.parametrize("make", [clip_processor, vit_processor], ids=["clip", "vit"])
@pytest.mark.parametrize(("width", "height"), SIZES)
def test_pixel_values_match_the_processor(make, width, height):
    processor = make()
    pixels = image(width, height, seed=width + height)
    ref = processor(images=[Image.fromarray(pixels.numpy())], return_tensors="pt").pixel_values
    got = pixel_values(pixels[None], processor)
    assert got.shape == ref.shape == (1, 3, 224, 224) and got.dtype == torch.float32
    d = levels(got, ref, processor)
    # PIL resizes in 22-bit fixed point, torch in float32: a value that lands within a hair of
    # k + 0.5 may round the other way, one level, in either of the two passes. Measured on these
    # images: at most 1 level, CLIP's bicubic <= 0.03% of the values, ViT's bilinear <= 0.8%
    # (its weights are simple fractions, so exact halves are common). A wrong pass order alone
    # moves 13-15% of the values; a wrong rounding rule or size, most of them.
    assert d.max() <= 1.0 + 1e-3
    assert (d > 0.5).float().mean() <= (0.001 if make is clip_processor else 0.01)


def test_pixel_values_of_a_batch_are_each_images():
    processor = clip_processor()
    batch = torch.stack([image(672, 384, seed=s) for s in range(3)])
    one = torch.cat([pixel_values(batch[i : i + 1], processor) for i in range(3)])
    assert torch.equal(pixel_values(batch, processor), one)


def test_bad_input_and_unsupported_processors_are_named():
    with pytest.raises(ValueError, match=r"images: expected \[B, H, W, 3\] uint8"):
        pixel_values(torch.zeros(1, 3, 8, 8, dtype=torch.uint8), clip_processor())
    with pytest.raises(ValueError, match=r"images: expected \[B, H, W, 3\] uint8"):
        pixel_values(torch.zeros(1, 8, 8, 3), clip_processor())
    from transformers import CLIPImageProcessor

    lanczos = CLIPImageProcessor(**{**CLIP_CONFIG, "resample": 1})
    with pytest.raises(ValueError, match=r"feature_extractor/preprocessor_config.json: resample=1"):
        check_processor(lanczos, "feature_extractor/preprocessor_config.json")
    check_processor(clip_processor(), "clip")  # the published configs are accepted
    check_processor(vit_processor(), "vit")
    with pytest.raises(ValueError, match="images: one size per call"):
        as_pixels([Image.new("RGB", (8, 8)), Image.new("RGB", (8, 6))], torch.device("cpu"))


def tiny_checker():
    """The Stable Diffusion safety checker's architecture at 224 pixels, tiny and random."""
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig

    cfg = CLIPConfig(
        text_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": 224,
            "patch_size": 32,
        },
        projection_dim=16,
    )
    torch.manual_seed(0)
    with torch.no_grad():
        checker = StableDiffusionSafetyChecker(cfg).eval()
        checker.concept_embeds.normal_()
        checker.special_care_embeds.normal_()
    return checker


def host_scores(checker, images: list[Image.Image]) -> torch.Tensor:
    """Concept cosine similarities, the host path: the processor on PIL images (the definer)."""
    from diffusers.pipelines.stable_diffusion.safety_checker import cosine_distance

    clip_input = clip_processor()(images=images, return_tensors="pt").pixel_values
    with torch.no_grad():
        embeds = checker.visual_projection(checker.vision_model(clip_input)[1])
    return cosine_distance(embeds, checker.concept_embeds)


def test_checker_verdicts_unchanged_with_thresholds_between_the_images():
    """Thresholds put between the images' own scores (host path), so that some are flagged and
    some not: the device path flags the very same images, and its scores stay within 1e-3 of
    the host's (the checker itself rounds them to 3 places)."""
    checker = tiny_checker()
    pixels = [image(w, h, seed=10 + i) for i, (w, h) in enumerate(SIZES)]
    pil = [Image.fromarray(p.numpy()) for p in pixels]
    scores = host_scores(checker, pil)  # [images, concepts]
    # concept 0's threshold between its 3rd and 4th score (half the images above it), the
    # others out of reach; the checker rounds score - threshold to 3 places, so the margin
    # either side must be wider than that
    srt = scores[:, 0].sort().values
    assert srt[3] - srt[2] > 4e-3
    with torch.no_grad():
        checker.concept_embeds_weights.fill_(2.0)
        checker.concept_embeds_weights[0] = (srt[2] + srt[3]) / 2
        checker.special_care_embeds_weights.fill_(2.0)  # no special-care adjustment
    ours = SafetyChecker(checker, clip_processor(), torch.device("cpu"))
    want = [bool((scores[i] > checker.concept_embeds_weights).any()) for i in range(len(pil))]
    assert 0 < sum(want) < len(pil)  # a split: the test can tell a changed verdict
    got = [ours.flags(p[None])[0] for p in pixels]  # one size per call, as a prediction's
    assert got == want == [ours.flags([im])[0] for im in pil]
    from diffusers.pipelines.stable_diffusion.safety_checker import cosine_distance

    for i, p in enumerate(pixels):
        with torch.no_grad():
            emb = checker.visual_projection(checker.vision_model(pixel_values(p[None], ours.processor))[1])
        assert (cosine_distance(emb, checker.concept_embeds)[0] - scores[i]).abs().max() < 1e-3


def test_classifier_logits_match_the_processor_path_and_run_on_the_cpu():
    """Falconsai's ViT (tiny, random, 224 pixels): the same logits from the device-prepared input as
    from the processor's; held on the CPU in float32 (the small memory mode) it takes the uint8
    batch wherever it is and moves only the 224x224 input."""
    from transformers import ViTForImageClassification

    from .test_safety import tiny_vit_config

    cfg = tiny_vit_config(image_size=224, patch_size=32)
    torch.manual_seed(0)
    model = ViTForImageClassification(cfg).eval()
    classifier = NSFWClassifier(model, vit_processor(), torch.device("cpu")).to("cpu", torch.float32)
    batch = torch.stack([image(1344, 768, seed=s) for s in range(3)])
    ref = vit_processor()(
        images=[Image.fromarray(b.numpy()) for b in batch], return_tensors="pt"
    ).pixel_values
    with torch.no_grad():
        want = model(pixel_values=ref).logits
        got = model(pixel_values=pixel_values(batch, classifier.processor)).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-3)
    verdicts = classifier.safe(batch)
    assert verdicts == [model.config.id2label[int(i)] == "normal" for i in want.argmax(-1)]


def test_on_demand_checker_takes_device_pixels(tmp_path):
    """The small memory mode's checker (weights in host memory, visiting the device per call)
    takes the uint8 batch the generator leaves on the device."""
    from engine import memory

    checker = tiny_checker()
    with torch.no_grad():
        checker.concept_embeds_weights.fill_(-10.0)  # flags everything
    ours = SafetyChecker(memory.OnDemand(checker, "cpu"), clip_processor(), torch.device("cpu"))
    pixels = torch.stack([image(512, 512, seed=s) for s in range(2)])
    assert ours.flags(pixels) == [True, True]
    assert np.asarray(pixels).dtype == np.uint8  # the images themselves are left as they were
