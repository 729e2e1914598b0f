"""The request path around the transformer: T5 tokens, fp16 safety checker, encoding, output folders."""

import io
import os
import types
from pathlib import Path

import pytest
import torch
from PIL import Image

from engine.pipeline import DEV_TEXT_TOKENS, SCHNELL_TEXT_TOKENS, FluxGenerator, text_tokens_for
from engine.safety import SafetyChecker, default_dtype
from engine.service import FluxService
from engine.service.outputs import OUTPUT_PREFIX, WEBP_METHOD, OutputFolders, save_images
from engine.tiny_model import CHECKPOINT_NAME

from .test_service import tiny_safety_checker


@pytest.fixture(scope="module")
def generator(tiny_model_dir):
    return FluxGenerator.from_pretrained(tiny_model_dir, tiny_model_dir / CHECKPOINT_NAME)


def test_schnell_reads_256_t5_tokens_and_dev_512(generator):
    assert generator.text_tokens == SCHNELL_TEXT_TOKENS == 256
    dev = types.SimpleNamespace(config=types.SimpleNamespace(guidance_embeds=True))
    assert text_tokens_for(dev) == DEV_TEXT_TOKENS == 512
    seen = {}

    def record(name, shape) -> None:
        seen.setdefault(name, shape)

    hooks = [
        generator.pipe.text_encoder_2.register_forward_pre_hook(
            lambda m, args, kw: record("t5", (args[0] if args else kw["input_ids"]).shape), with_kwargs=True
        ),
        generator.pipe.transformer.register_forward_pre_hook(
            lambda m, args, kw: record("joint", kw["encoder_hidden_states"].shape), with_kwargs=True
        ),
    ]
    try:
        generator.generate("a lighthouse " * 100, width=128, height=128, steps=1)
    finally:
        for h in hooks:
            h.remove()
    assert seen["t5"][-1] == 256 and seen["joint"][1] == 256


def test_safety_checker_fp16_on_gpu_agrees_with_fp32(tmp_path):
    assert default_dtype(torch.device("cuda")) == torch.float16
    assert default_dtype(torch.device("cpu")) == torch.float32
    fp32 = tiny_safety_checker(tmp_path, threshold=0.0)
    fp16 = SafetyChecker.load(tmp_path, torch.device("cpu"), dtype=torch.float16)
    assert fp32.checker.dtype == torch.float32 and fp16.checker.dtype == torch.float16
    images = [Image.effect_noise((64, 64), s).convert("RGB") for s in (10, 40, 90)]
    clip = fp32.processor(images=images, return_tensors="pt").pixel_values
    with torch.inference_mode():
        e32 = fp32.checker.visual_projection(fp32.checker.vision_model(clip)[1])
        e16 = fp16.checker.visual_projection(fp16.checker.vision_model(clip.half())[1]).float()
    cos = torch.nn.functional.cosine_similarity(e32, e16, dim=-1)
    assert cos.min() > 0.999, cos
    for threshold in (-10.0, 10.0):  # thresholds that force every verdict one way
        a = tiny_safety_checker(tmp_path / str(threshold), threshold)
        b = SafetyChecker.load(tmp_path / str(threshold), torch.device("cpu"), dtype=torch.float16)
        assert a.flags(images) == b.flags(images) == [threshold < 0] * 3


def test_webp_uses_the_chosen_method_and_threads_keep_the_order(tmp_path):
    imgs = [Image.new("RGB", (96, 64), c) for c in ((250, 10, 10), (10, 250, 10), (10, 10, 250))]
    for i, img in enumerate(imgs):  # texture, so that the methods produce different files
        img.paste(Image.effect_noise((48, 32), 30 + 20 * i).convert("RGB"), (24, 16))
    paths = save_images(imgs, tmp_path, output_format="webp", quality=80, seeds=[1, 2, 3], prompt="x")
    assert [p.name for p in paths] == ["out-0.webp", "out-1.webp", "out-2.webp"]
    for path, img, seed in zip(paths, imgs, (1, 2, 3), strict=True):
        exif = Image.Exif()
        exif[0x010E] = f"seed={seed}"
        same, other = io.BytesIO(), io.BytesIO()
        img.save(same, format="WEBP", quality=80, method=WEBP_METHOD, exif=exif.tobytes())
        img.save(other, format="WEBP", quality=80, method=6, exif=exif.tobytes())
        assert path.read_bytes() == same.getvalue() != other.getvalue()


def test_output_folders_previous_removed_and_stale_ones_too(tmp_path):
    dead = tmp_path / f"{OUTPUT_PREFIX}999999999-old"  # above any pid the kernel hands out
    alive = tmp_path / f"{OUTPUT_PREFIX}{os.getpid()}-mine"
    for d in (dead, alive):
        (d / "pred-x").mkdir(parents=True)
    folders = OutputFolders(tmp_path)
    assert not dead.exists() and alive.exists()
    first = folders.next()
    (first / "out-0.webp").write_bytes(b"x")
    second = folders.next()
    assert not first.exists() and second.is_dir() and second.parent == folders.root
    folders.remove_all()
    assert not folders.root.exists()


@pytest.mark.slow
def test_service_removes_the_previous_predictions_files(generator, tmp_path):
    service = FluxService(generator, None, "tiny", output_base=tmp_path)
    kw = {"prompt": "x", "num_inference_steps": 1, "megapixels": "0.25", "aspect_ratio": "21:9"}
    (a,) = service.predict(**kw, seed=1)
    assert a.is_file()
    (b,) = service.predict(**kw, seed=2)
    assert not a.parent.exists() and b.is_file()
    assert [p.name for p in Path(service.outputs.root).iterdir()] == [b.parent.name]
    service.outputs.remove_all()


@pytest.mark.slow
def test_real_server_reads_outputs_before_they_are_removed(tmp_path):
    """coglet reads each returned file before it completes the prediction; the folder goes next time."""
    from cog_client import CogServer, decode_output

    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = {"SVDQ_WEIGHTS_DIR": str(tmp_path / "weights"), "SVDQ_MODEL": "tiny", "TMPDIR": str(tmp)}
    with CogServer(env=env) as server:
        assert server.wait_ready()["status"] == "READY"
        outputs = []
        for seed in (1, 2):
            status, resp = server.predict(
                {"prompt": "a red fox", "num_inference_steps": 1, "megapixels": "0.25", "seed": seed, "num_outputs": 2}
            )
            assert status == 200 and resp["status"] == "succeeded", resp
            outputs.append([decode_output(item) for item in resp["output"]])
            (root,) = tmp.glob(f"{OUTPUT_PREFIX}*")
            assert len(list(root.iterdir())) == 1  # only this prediction's folder is left
        (pred,) = root.iterdir()
        assert sorted(p.name for p in pred.iterdir()) == ["out-0.webp", "out-1.webp"]
        assert [data for data, _ in outputs[1]] == [p.read_bytes() for p in sorted(pred.iterdir())]
        assert all(Image.open(io.BytesIO(data)).size == (512, 512) for out in outputs for data, _ in out)
    assert not list(tmp.glob(f"{OUTPUT_PREFIX}*")), "the server's exit leaves no output folder"
