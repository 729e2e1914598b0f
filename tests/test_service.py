"""engine.service without the server: model choice, encoding and metadata, the safety checker."""

import io

import pytest
import torch
from PIL import Image

from engine.pipeline import FluxGenerator
from engine.safety import SafetyChecker
from engine.service import FluxService, NSFWError, choose_model, save_images
from engine.tiny_model import CHECKPOINT_NAME


@pytest.fixture(scope="module")
def generator(tiny_model_dir):
    return FluxGenerator.from_pretrained(tiny_model_dir, tiny_model_dir / CHECKPOINT_NAME)


def tiny_safety_checker(path, threshold: float):
    """A randomly initialised checker whose concept thresholds force every verdict one way."""
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

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
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 8,
        },
        projection_dim=16,
    )
    torch.manual_seed(0)
    checker = StableDiffusionSafetyChecker(cfg)
    with torch.no_grad():
        checker.concept_embeds_weights.fill_(threshold)
        checker.special_care_embeds_weights.fill_(threshold)
    checker.save_pretrained(path / "safety_checker")
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        path / "feature_extractor"
    )
    return SafetyChecker.load(path, torch.device("cpu"))


def test_choose_model(monkeypatch):
    monkeypatch.setenv("SVDQ_MODEL", "flux-schnell")
    assert choose_model() == "flux-schnell"
    monkeypatch.setenv("SVDQ_MODEL", "auto")
    if not torch.cuda.is_available():
        assert choose_model() == "tiny"


def test_image_formats_and_metadata(tmp_path):
    img = Image.effect_noise((64, 48), 60).convert("RGB")
    png = save_images([img, img], tmp_path, output_format="png", quality=10, seeds=[7, 8], prompt="fox 🦊")
    assert [p.name for p in png] == ["out-0.png", "out-1.png"]
    assert Image.open(png[1]).text == {"seed": "8", "prompt": "fox 🦊"}
    (webp,) = save_images([img], tmp_path, output_format="webp", quality=80, seeds=[7], prompt="x")
    assert Image.open(webp).getexif()[0x010E] == "seed=7"
    (tmp_path / "hi").mkdir()
    (hi,) = save_images([img], tmp_path / "hi", output_format="jpg", quality=95, seeds=[7], prompt="x")
    (lo,) = save_images([img], tmp_path, output_format="jpg", quality=5, seeds=[7], prompt="x")
    assert lo.stat().st_size < hi.stat().st_size and Image.open(io.BytesIO(lo.read_bytes())).format == "JPEG"
    with pytest.raises(ValueError, match="output_format must be one of webp, jpg, png"):
        save_images([img], tmp_path, output_format="gif", quality=80, seeds=[0], prompt="x")


def test_safety_checker_flags_drop_images(generator, tmp_path):
    flag_all = tiny_safety_checker(tmp_path / "strict", threshold=-10.0)
    service = FluxService(generator, flag_all, "tiny")
    kw = {"prompt": "x", "num_inference_steps": 1, "megapixels": "0.25", "seed": 1, "num_outputs": 2}
    with pytest.raises(NSFWError, match="all images were flagged"):
        service.predict(**kw, out_dir=tmp_path)
    assert len(service.predict(**kw, disable_safety_checker=True, out_dir=tmp_path)) == 2
    service.safety = tiny_safety_checker(tmp_path / "lenient", threshold=10.0)
    assert len(service.predict(**kw, out_dir=tmp_path)) == 2


def test_a_dropped_image_leaves_the_others_their_seeds(generator, tmp_path):
    class FlagFirst:
        def flags(self, images):
            return [True] + [False] * (len(images) - 1)

    service = FluxService(generator, FlagFirst(), "tiny")
    paths = service.predict(
        prompt="x",
        num_inference_steps=1,
        megapixels="0.25",
        seed=10,
        num_outputs=3,
        output_format="png",
        out_dir=tmp_path,
    )
    assert [p.name for p in paths] == ["out-0.png", "out-1.png"]
    assert [Image.open(p).text["seed"] for p in paths] == ["11", "12"]


def test_bad_format_fails_before_any_work(generator, tmp_path):
    service = FluxService(generator, None, "tiny")
    with pytest.raises(ValueError, match="output_format must be one of"):
        service.predict(prompt="x", output_format="bmp", out_dir=tmp_path)
    with pytest.raises(ValueError, match="output_quality"):
        service.predict(prompt="x", output_quality=101, out_dir=tmp_path)
    assert not list(tmp_path.iterdir())
