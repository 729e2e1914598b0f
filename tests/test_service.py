"""engine.service without the server: model choice, inputs, LoRAs, encoding, the safety checker."""

import io
import re
import shutil
import time

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from engine.inputs import MAX_LORA_SOURCE_CHARS, MAX_PROMPT_CHARS, check_lora_source, seed_from
from engine.lora import StoreConfig
from engine.pipeline import FluxGenerator
from engine.safety import SafetyChecker
from engine.service import FluxService
from engine.service.config import ServiceConfig
from engine.service.models import choose_model, model_files
from engine.service.outputs import save_images
from engine.service.request import NSFWError
from engine.tiny_model import CHECKPOINT_NAME
from engine.weights import WeightsError

from .test_lora import DIFFUSERS_MODULES, diffusers_file, kohya_file


@pytest.fixture(scope="module")
def generator(tiny_model_dir):
    return FluxGenerator.from_pretrained(tiny_model_dir, tiny_model_dir / CHECKPOINT_NAME)


# replicate/cog-flux predict.py, word for word.
REPLICATE_ALL_FLAGGED = re.escape(
    "All generated images contained NSFW content. Try running it again with a different prompt."
)


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


def test_choose_model(tmp_path):
    cfg = ServiceConfig(weights_dir=tmp_path)
    assert (
        choose_model(ServiceConfig(weights_dir=tmp_path, model="flux-schnell"), gpu=False) == "flux-schnell"
    )
    assert choose_model(cfg, gpu=False) == "tiny-shapes"  # the trained embedded model (docs/tiny-model.md)
    assert choose_model(cfg, gpu=True) == "flux-schnell"  # never the tiny model on a GPU unless named
    assert choose_model(ServiceConfig(weights_dir=tmp_path, model="tiny"), gpu=True) == "tiny"


def test_gpu_host_without_weights_fails_setup_naming_the_files_and_folder(tmp_path):
    """On a GPU (faked), auto with no cached weights and no network is a setup error, not noise."""
    cfg = ServiceConfig(weights_dir=tmp_path, model="auto", offline=True)
    t0 = time.monotonic()
    with pytest.raises(WeightsError) as e:
        FluxService.setup(cfg, gpu=True)
    msg = str(e.value)
    assert f"missing from the cache folder {tmp_path / 'flux-schnell'}" in msg
    assert "text_encoder/model.safetensors" in msg and "SVDQ_MODEL=tiny" in msg
    assert time.monotonic() - t0 < 10 and not (tmp_path / "tiny").exists()


def test_corrupt_shard_fails_setup_naming_it(tiny_model_dir, tmp_path):
    weights = tmp_path / "w"
    shutil.copytree(tiny_model_dir, weights / "tiny")
    shard = weights / "tiny" / "text_encoder_2" / "model.safetensors"
    shard.write_bytes((2**40).to_bytes(8, "little") + b"{}")  # "header too large" in safetensors' words
    with pytest.raises(WeightsError, match=r"text_encoder_2/model\.safetensors: damaged \.safetensors file"):
        model_files("tiny", ServiceConfig(weights_dir=weights, model="tiny"))
    data = bytearray((tiny_model_dir / "text_encoder_2" / "model.safetensors").read_bytes())
    shard.write_bytes(bytes(data[: len(data) // 2]))  # truncated: tensors run past the end
    with pytest.raises(WeightsError, match=r"text_encoder_2/model\.safetensors: .* lies outside the file"):
        model_files("tiny", ServiceConfig(weights_dir=weights, model="tiny"))


def test_config_is_read_from_the_environment_in_one_place(tmp_path):
    cfg = ServiceConfig.from_env(
        {
            "SVDQ_WEIGHTS_DIR": str(tmp_path),
            "SVDQ_MODEL": "tiny",
            "SVDQ_LORA_DIR": str(tmp_path / "loras"),
            "SVDQ_LORA_MAX_BYTES": "1000",
            "SVDQ_LORA_CACHE_BYTES": "5000",
            "HF_ENDPOINT": "http://mirror",
            "HF_TOKEN": "hf_x",
            "HF_HUB_OFFLINE": "1",
        }
    )
    assert (cfg.weights_dir, cfg.model, cfg.offline) == (tmp_path, "tiny", True)
    lora = cfg.lora
    assert (lora.root, lora.local_dir, lora.max_download_bytes, lora.cache_bytes) == (
        tmp_path / "loras",
        tmp_path / "loras",
        1000,
        5000,
    )
    assert lora.hub == "http://mirror" and lora.hf_token == "hf_x" and "hf_x" not in repr(lora)
    assert ServiceConfig.from_env({}).lora.local_dir is None  # no local paths unless configured
    with pytest.raises(ValueError, match="SVDQ_LORA_MAX_BYTES='lots' is not a number"):
        ServiceConfig.from_env({"SVDQ_LORA_MAX_BYTES": "lots"})
    assert ServiceConfig.from_env({}).w4a8 == "auto" and ServiceConfig.from_env({"SVDQ_W4A8": "Off"}).w4a8 == "off"
    with pytest.raises(ValueError, match="SVDQ_W4A8='force': choose auto or off"):
        ServiceConfig.from_env({"SVDQ_W4A8": "force"})  # a test setting, not a serving one


def test_prompt_cap_is_checked_before_any_work(generator, tmp_path):
    service = FluxService(generator, None, "tiny")
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match=r"prompt is 1,000,000 characters; the limit is 10,000"):
        service.predict(prompt="a" * 1_000_000, out_dir=tmp_path)
    assert time.perf_counter() - t0 < 0.5 and not list(tmp_path.iterdir())


def test_lora_source_cap_names_the_field_never_the_value(generator, tmp_path):
    """URLs and hub references are capped in characters before any fetch; data: URLs are not
    (the store bounds them in bytes); the error gives the length and the limit only."""
    service = FluxService(generator, None, "tiny")
    long_url = "https://example.com/" + "q" * MAX_LORA_SOURCE_CHARS
    for field in ("lora_weights", "extra_lora"):
        with pytest.raises(ValueError) as e:
            service.predict(prompt="x", out_dir=tmp_path, **{field: long_url})
        assert str(e.value).startswith(
            f"{field} is {len(long_url):,} characters; the limit is {MAX_LORA_SOURCE_CHARS:,}"
        )
        assert "qqqq" not in str(e.value)
    assert check_lora_source("lora_weights", None) is None
    data = "data:application/octet-stream;base64," + "A" * (2 * MAX_LORA_SOURCE_CHARS)
    assert check_lora_source("lora_weights", data) == data  # bounded by the store's cap instead
    with pytest.raises(TypeError, match="extra_lora must be a string, got int"):
        check_lora_source("extra_lora", 7)
    assert not list(tmp_path.iterdir())


def test_longest_allowed_prompt_costs_about_what_a_short_one_does(generator):
    """At the cap, tokenizing (what made a 1 MB prompt take 16-35 s) stays in the milliseconds."""
    pipe = generator.pipe
    t0 = time.perf_counter()
    for tok in (pipe.tokenizer, pipe.tokenizer_2):
        tok("word " * (MAX_PROMPT_CHARS // 5), truncation=False)
    assert time.perf_counter() - t0 < 1.0


@pytest.mark.slow
def test_seeds_any_integer_mapped_mod_2_32(generator, tmp_path, caplog):
    assert [seed_from(s) for s in (0, 7, 7.0, -1, 2**32, 2**32 + 5, 2**64 + 7, 1e23)] == [
        0,
        7,
        7,
        2**32 - 1,
        0,
        5,
        7,
        int(1e23) % 2**32,
    ]
    with pytest.raises(TypeError, match=r"seed must be an integer, got 7\.5"):
        seed_from(7.5)
    with pytest.raises(TypeError, match="seed must be an integer, got bool"):
        seed_from(True)
    service = FluxService(generator, None, "tiny")
    kw = {"prompt": "x", "num_inference_steps": 1, "megapixels": "0.25", "output_format": "png"}

    def image(seed, name):
        (tmp_path / name).mkdir()
        return service.predict(**kw, seed=seed, out_dir=tmp_path / name)[0].read_bytes()

    with caplog.at_level("INFO"):
        assert image(7.0, "a") == image(7, "b")
        assert image(-1, "c") == image(2**32 - 1, "d")
    assert "seed: 4294967295 (from -1, taken mod 2^32)" in caplog.text


@pytest.fixture()
def lora_service(generator, tmp_path):
    folder = tmp_path / "loras"
    folder.mkdir()
    save_file(diffusers_file(DIFFUSERS_MODULES, amp=4.0), folder / "a.safetensors")
    save_file(kohya_file(seed=7, amp=4.0), folder / "b.safetensors")
    nan = diffusers_file(DIFFUSERS_MODULES)
    nan["transformer.x_embedder.lora_B.weight"][:] = float("nan")
    save_file(nan, folder / "nan.safetensors")
    service = FluxService(generator, None, "tiny", StoreConfig(root=tmp_path / "cache", local_dir=folder))
    yield service
    service.loras.clear()


@pytest.mark.slow
def test_extra_lora_and_failures_name_their_field_and_leave_the_model(lora_service, tmp_path):
    kw = {"prompt": "x", "num_inference_steps": 1, "megapixels": "0.25", "output_format": "png", "seed": 3}
    n = iter(range(100))

    def image(**more):
        out = tmp_path / f"o{next(n)}"
        out.mkdir()
        return lora_service.predict(**kw, **more, out_dir=out)[0].read_bytes()

    base = image()
    a = image(lora_weights="a.safetensors")
    ab = image(lora_weights="a.safetensors", extra_lora="b.safetensors", extra_lora_scale=0.5)
    assert len({base, a, ab}) == 3
    assert [name for name, _ in lora_service.loras.active] == ["lora_weights", "extra_lora"]
    for bad, field, match in (
        ({"extra_lora": "nan.safetensors"}, "extra_lora", "NaN or Inf"),
        ({"lora_weights": "nan.safetensors"}, "lora_weights", "NaN or Inf"),
        ({"extra_lora": "fofr/flux-pixar-cars:abcdef12"}, "extra_lora", "Replicate's platform"),
        ({"extra_lora": "missing.safetensors"}, "extra_lora", "not a file inside the LoRA folder"),
    ):
        with pytest.raises(ValueError, match=f"^{field}: .*{match}"):
            image(**{"lora_weights": "a.safetensors", **bad})
        assert [name for name, _ in lora_service.loras.active] == ["lora_weights", "extra_lora"]
    with pytest.raises(ValueError, match=r"extra_lora_scale must be a number in \[-1, 3\]"):
        image(extra_lora="b.safetensors", extra_lora_scale=4)
    assert image(lora_weights="a.safetensors", extra_lora="b.safetensors", extra_lora_scale=0.5) == ab
    assert image() == base


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


@pytest.mark.slow
def test_safety_checker_flags_drop_images(generator, tmp_path):
    flag_all = tiny_safety_checker(tmp_path / "strict", threshold=-10.0)
    service = FluxService(generator, flag_all, "tiny")
    kw = {"prompt": "x", "num_inference_steps": 1, "megapixels": "0.25", "seed": 1, "num_outputs": 2}
    with pytest.raises(NSFWError, match=REPLICATE_ALL_FLAGGED):
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
