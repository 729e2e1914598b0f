"""go_fast's compile logic on CPU: graphs shared across sizes, counted, and never a silent eager run.

The served backend is inductor on a GPU; here the same torch.compile runs with aot_eager
(tracing, functionalization and the fake kernels of our custom ops, without code generation).
"""

import logging

import pytest
import torch

from engine.flux import load_transformer
from engine.go_fast import (
    CompileSettings,
    GoFast,
    GoFastError,
    configure_compiler,
    shape_label,
    transformer_inputs,
)
from engine.pipeline import FluxGenerator
from engine.service import FluxService
from engine.tiny_model import CHECKPOINT_NAME

from .flux_cases import params_to_float

AOT = CompileSettings(backend="aot_eager", mode=None, dynamic=True)
# Regional compilation, graphs per shape class: one for every double block, one for every single
# block (each takes the joint sequence as one contiguous tensor: SVDQFluxTransformer2DModel.forward).
KINDS = 2
VAE_GRAPHS = 1  # the VAE decoder, one dynamic graph (tests/test_go_fast_vae.py)


@pytest.fixture(scope="module")
def transformer(tiny_model_dir):
    return params_to_float(load_transformer(tiny_model_dir / CHECKPOINT_NAME))


def call(fast: GoFast, transformer, width: int, height: int, batch: int) -> torch.Tensor:
    torch.manual_seed(0)
    with fast.track(shape_label(width, height, batch, transformer)), torch.inference_mode():
        return fast.compiled(**transformer_inputs(transformer, width, height, batch))[0]


def go_fast_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "engine.go_fast" and r.levelno >= logging.WARNING]


def set_lora(transformer, rank: int | None) -> None:
    """scripts/go_fast_compiles.py's random LoRA on every quantized layer (None: remove them)."""
    from go_fast_compiles import set_lora as probe_lora

    probe_lora(transformer, rank)


def test_configure_compiler_raises_the_limit_and_makes_it_loud(fresh_dynamo):
    configure_compiler(CompileSettings(recompile_limit=40))
    assert torch._dynamo.config.recompile_limit == 40
    assert torch._dynamo.config.fail_on_recompile_limit_hit is True
    import torch.fx.experimental._config as fx_config

    assert fx_config.use_duck_shape is False


@pytest.mark.slow
def test_a_recompile_past_the_limit_is_an_error_naming_the_shape(fresh_dynamo, transformer):
    static = CompileSettings(backend="aot_eager", mode=None, dynamic=False, recompile_limit=1)
    configure_compiler(static)
    torch._dynamo.config.recompile_limit = 1  # configure_compiler never lowers the limit
    fast = GoFast(transformer, static)
    call(fast, transformer, 128, 128, 1)
    assert fast.graphs == KINDS and fast.records[0].shape == "128x128 x1"
    with pytest.raises(GoFastError, match=r"192x128 x1 needs a new compiled graph past the recompile limit"):
        call(fast, transformer, 192, 128, 1)


@pytest.mark.slow
def test_sizes_and_batches_share_two_graphs_and_loras_two_more(fresh_dynamo, transformer, caplog):
    configure_compiler(AOT)
    fast = GoFast(transformer, AOT)
    # What setup does: default size at batch 1, then batch 2 (sizes scaled down 4x per side
    # to keep the test short; the sequence length is what varies, as with the served sizes).
    # 256x256 is 256 image tokens, as many as the text: with duck shaping (torch's default) the
    # two would share a symbol and every other size would recompile.
    for shape in ((256, 256, 1), (256, 256, 2)):
        call(fast, transformer, *shape)
    assert fast.graphs == 2 * KINDS
    caplog.clear()  # the warm-up's compiles were logged; from here on, none should be
    for w, h, n in ((336, 192, 1), (160, 384, 3), (272, 224, 4), (128, 128, 2)):
        out = call(fast, transformer, w, h, n)
        torch.manual_seed(0)
        with torch.inference_mode(), fast.disabled():  # the blocks are compiled in place: eager on request
            ref = transformer(**transformer_inputs(transformer, w, h, n))[0]
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    assert fast.graphs == 2 * KINDS and not go_fast_warnings(caplog)  # no request compiled anything
    set_lora(transformer, 4)
    try:
        for w, h, n in ((256, 256, 1), (336, 192, 2), (160, 384, 1)):
            call(fast, transformer, w, h, n)
        assert fast.graphs == 4 * KINDS  # the LoRA factors are new graph inputs: batch 1 and batch 2-4
        assert "LoRA rank 4" in fast.records[2].shape
        assert len(go_fast_warnings(caplog)) == 2
        set_lora(transformer, 12)  # another rank: buffers keep static shapes, so two more graphs
        call(fast, transformer, 272, 224, 3)
        call(fast, transformer, 128, 128, 1)
        assert fast.graphs == 6 * KINDS
        call(fast, transformer, 336, 192, 4)
        assert fast.graphs == 6 * KINDS
    finally:
        set_lora(transformer, None)
    call(fast, transformer, 256, 256, 1)
    assert fast.graphs == 6 * KINDS


@pytest.mark.slow
def test_service_warms_up_at_setup_and_requests_do_not_compile(fresh_dynamo, tiny_model_dir, caplog):
    generator = FluxGenerator.from_pretrained(tiny_model_dir, tiny_model_dir / CHECKPOINT_NAME)
    service = FluxService(generator, None, "tiny", compile_settings=AOT)
    # the decoder's first graph is compiled by the first warm-up step's decode; the VAE warm-up at
    # the request's size compiles any graph the CPU's convolution-backend guards split off
    service.warm_up(((256, 256, 1), (256, 256, 2)), vae_sizes=[(672, 384)])
    records = [(r.shape, r.at_setup) for r in service.go_fast.records]
    assert records[:2] == [("256x256 x1", True), ("256x256 x2", True)]
    assert all(shape.startswith("VAE decode") and at_setup for shape, at_setup in records[2:])
    at_setup = service.go_fast.graphs
    assert at_setup >= 2 * KINDS + VAE_GRAPHS
    assert generator.pipe.transformer is service._eager  # warm-up leaves the eager one in place
    caplog.set_level(logging.INFO)
    kw = {"prompt": "a cat", "num_inference_steps": 1, "megapixels": "0.25", "seed": 3}
    from PIL import Image

    def pixels(paths) -> list[torch.Tensor]:  # read now: the next prediction removes the folder
        return [torch.tensor(list(Image.open(p).convert("L").getdata()), dtype=torch.float) for p in paths]

    fast = pixels(service.predict(**kw, aspect_ratio="16:9", num_outputs=3, go_fast=True))
    slow = pixels(service.predict(**kw, aspect_ratio="16:9", num_outputs=3, go_fast=False))
    assert service.go_fast.graphs == at_setup and not go_fast_warnings(caplog)  # none in a request
    for a, b in zip(fast, slow, strict=True):
        assert (a - b).abs().mean() < 1.0  # same images up to a rounding step of the encoder


@pytest.mark.slow
def test_service_past_the_limit_warns_and_runs_eagerly(fresh_dynamo, tiny_model_dir, caplog):
    static = CompileSettings(backend="aot_eager", mode=None, dynamic=False, recompile_limit=1)
    generator = FluxGenerator.from_pretrained(tiny_model_dir, tiny_model_dir / CHECKPOINT_NAME)
    service = FluxService(generator, None, "tiny", compile_settings=static)
    service.warm_up(((512, 512, 1),), vae_sizes=[])
    torch._dynamo.config.recompile_limit = 1  # configure_compiler never lowers the limit
    caplog.set_level(logging.WARNING)
    kw = {"prompt": "a cat", "num_inference_steps": 1, "megapixels": "0.25", "seed": 3, "aspect_ratio": "4:3"}
    (path,) = service.predict(**kw, go_fast=True)
    fast = path.read_bytes()  # the next prediction removes this one's folder
    assert "576x448 x1 needs a new compiled graph past the recompile limit" in caplog.text
    assert "this request runs without go_fast" in caplog.text
    (slow,) = service.predict(**kw, go_fast=False)
    assert fast == slow.read_bytes()


def test_the_compile_cache_digest_covers_every_file_that_registers_a_fake(tmp_path, monkeypatch):
    """A fake edited anywhere in engine/ (attention.py's sage ops, not only kernels/) moves the
    compile cache folder: inductor's FX-graph cache would otherwise replay a graph traced
    against the old fake."""
    import shutil
    from pathlib import Path

    import engine
    from engine import kernels
    from engine.service import setup_phases

    src = Path(engine.__file__).resolve().parent
    copy = tmp_path / "engine"
    shutil.copytree(src, copy, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(kernels, "__file__", str(copy / "kernels" / "__init__.py"))
    before = setup_phases.ops_source_digest()
    attention = copy / "flux" / "attention.py"
    assert "register_fake" in attention.read_text()
    attention.write_text(attention.read_text() + "\n# edited\n")
    edited = setup_phases.ops_source_digest()
    assert edited != before
    unrelated = copy / "safety.py"  # no op of ours: the cache stays
    unrelated.write_text(unrelated.read_text() + "\n# edited\n")
    assert setup_phases.ops_source_digest() == edited
