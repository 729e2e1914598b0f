"""End to end on CPU with the tiny quantized model: sizes, seeds, batching, progress, CLIs."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from engine.inputs import ASPECT_RATIOS, round_size, size_for
from engine.pipeline import FluxGenerator
from engine.tiny_model import CHECKPOINT_NAME

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def gen(tiny_model_dir):
    return FluxGenerator.from_pretrained(tiny_model_dir, tiny_model_dir / CHECKPOINT_NAME)


def pixels(img: Image.Image) -> np.ndarray:
    return np.asarray(img)


def test_sizes_seeds_and_batching(gen):
    steps = []
    a = gen.generate(
        "a red fox", width=256, height=192, steps=2, seed=7, on_step=lambda i, n: steps.append((i, n))
    )
    assert len(a) == 1 and a[0].size == (256, 192) and steps == [(1, 2), (2, 2)]
    b = gen.generate("a red fox", width=256, height=192, steps=2, seed=7)
    c = gen.generate("a red fox", width=256, height=192, steps=2, seed=8)
    assert np.array_equal(pixels(a[0]), pixels(b[0]))
    assert np.abs(pixels(a[0]).astype(int) - pixels(c[0]).astype(int)).mean() > 5
    batch = gen.generate("a red fox", width=256, height=192, steps=2, seed=7, num_outputs=3)
    assert len(batch) == 3
    assert all(not np.array_equal(pixels(batch[i]), pixels(batch[j])) for i, j in [(0, 1), (0, 2), (1, 2)])
    # Image i of a batch uses seed + i: the first matches the single image up to batched-math rounding.
    assert np.abs(pixels(batch[0]).astype(int) - pixels(a[0]).astype(int)).max() <= 2
    assert np.abs(pixels(batch[1]).astype(int) - pixels(c[0]).astype(int)).max() <= 2


@pytest.mark.slow
def test_one_megapixel_runs(gen):
    (img,) = gen.generate("a lighthouse", width=1024, height=1024, steps=1, seed=0)
    assert img.size == (1024, 1024)


def test_size_rounding_and_errors(gen):
    assert round_size(1001, 777) == (1008, 784) and round_size(1024, 576) == (1024, 576)
    with pytest.raises(ValueError, match=r"width=4096 is outside the supported range \[128, 2048\]"):
        round_size(4096, 512)
    with pytest.raises(ValueError, match="height=64"):
        round_size(512, 64)
    with pytest.raises(TypeError, match="width must be an integer"):
        round_size(512.0, 512)
    assert size_for("16:9", "0.25") == (672, 384) and size_for("21:9") == (1536, 640)
    assert all(
        w % 16 == 0 and h % 16 == 0 for w, h in (size_for(a, m) for a in ASPECT_RATIOS for m in ("1", "0.25"))
    )
    with pytest.raises(ValueError, match="aspect_ratio must be one of"):
        size_for("7:3")
    with pytest.raises(ValueError, match="steps"):
        gen.generate("x", steps=0)
    with pytest.raises(ValueError, match="num_outputs"):
        gen.generate("x", num_outputs=0)
    with pytest.raises(ValueError, match="seed"):
        gen.generate("x", seed=-1)
    with pytest.raises(TypeError, match="prompt must be a string"):
        gen.generate(None)


def run_script(name: str, *args: str) -> subprocess.CompletedProcess:
    res = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / name), *args],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    return res


@pytest.mark.slow
def test_generate_cli_quantized_and_float(tiny_model_dir, tmp_path):
    common = [
        "--model",
        str(tiny_model_dir),
        "--prompt",
        "a cat",
        "--seed",
        "3",
        "--steps",
        "2",
        "--width",
        "256",
        "--height",
        "128",
    ]
    ckpt = ["--checkpoint", str(tiny_model_dir / CHECKPOINT_NAME)]
    res = run_script("generate.py", *common, *ckpt, "--num-outputs", "2", "--out", str(tmp_path / "q.png"))
    paths = [Path(p) for p in res.stdout.split()]
    assert paths == [tmp_path / "q-0.png", tmp_path / "q-1.png"]
    assert all(Image.open(p).size == (256, 128) for p in paths)
    run_script("generate.py", *common, "--out", str(tmp_path / "f.png"))  # the float transformer
    assert Image.open(tmp_path / "f.png").size == (256, 128)


@pytest.mark.slow
def test_quantize_cli(tiny_model_dir, tmp_path):
    out = tmp_path / "q.safetensors"
    res = run_script(
        "quantize_flux.py",
        "--model",
        str(tiny_model_dir),
        "--out",
        str(out),
        "--rank",
        "8",
        "--calib-prompts",
        "2",
        "--steps",
        "1",
        "--resolutions",
        "256x256",
    )
    # 2 double blocks x 10 layers + 2 single blocks x 4 (q/k/v and proj_mlp fused)
    assert out.exists() and "28 layers; relative error median" in res.stdout
    assert "single_transformer_blocks.1.proj_out" in res.stdout
    gen = FluxGenerator.from_pretrained(tiny_model_dir, out)
    assert gen.generate("x", width=128, height=128, steps=1)[0].size == (128, 128)
