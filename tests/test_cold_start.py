"""Cold start: nothing done per boot that can be done once.

* regional compilation (go_fast compiles one double and one single block, not the whole model)
  gives the whole-model compile's outputs (to fp32 rounding), under inductor on the CPU;
* the public engine's checkpoint is converted once: the second setup loads the converted file
  (the conversion does not run again) and every phase of setup is logged with its time.
"""

from __future__ import annotations

import logging
import types

import pytest
import torch
from safetensors.torch import save_file

from engine.flux import load_transformer
from engine.go_fast import CompileSettings, GoFast, graphs_compiled, transformer_inputs
from engine.service import FluxService
from engine.service.config import ServiceConfig
from engine.tiny_model import CHECKPOINT_NAME

from .flux_cases import params_to_float
from .nunchaku_layout import their_checkpoint


@pytest.fixture()
def fresh_dynamo():
    """An empty dynamo cache and no inductor caches: a graph another run cached may hold other ops' fakes."""
    torch._dynamo.reset()
    with torch._inductor.config.patch(force_disable_caches=True):
        yield
    torch._dynamo.reset()


@pytest.mark.slow
def test_regional_compile_equals_the_whole_model_compile_under_inductor(fresh_dynamo, tiny_model_dir):
    """Regional compile (one graph per block class) gives the whole-model compile's output to fp32
    rounding. One double and one single block keep inductor's CPU compile (C++ per kernel) to a few
    minutes; that blocks of a class share one graph is counted in tests/test_go_fast.py (2 + 2
    blocks, aot_eager)."""
    settings = CompileSettings(backend="inductor", mode=None, dynamic=True)
    models = []
    for _ in range(2):
        model = params_to_float(load_transformer(tiny_model_dir / CHECKPOINT_NAME))
        model.transformer_blocks = model.transformer_blocks[:1]
        model.single_transformer_blocks = model.single_transformer_blocks[:1]
        models.append(model)
    whole_model, regional = models
    torch.manual_seed(0)
    kw = transformer_inputs(whole_model, 256, 192, 2)
    with torch.inference_mode():
        eager = whole_model(**kw)[0]
        fast = GoFast(regional, settings)
        before = graphs_compiled()
        got = fast.compiled(**kw)[0]
        assert graphs_compiled() - before == 2  # one double block and one single block
        with fast.disabled():  # go_fast off: the same modules, eager
            assert torch.equal(fast.compiled(**kw)[0], eager)
        whole = torch.compile(whole_model, backend="inductor", dynamic=True, fullgraph=True)(**kw)[0]
    # Not bit for bit: the whole graph lets inductor fuse across a block boundary (a block's
    # residual add into the next norm), which rounds differently in fp32. Regional sits as close
    # to the whole-model compile as that compile sits to eager, and both within fp32 rounding.
    to_whole, whole_to_eager = (got - whole).abs().max().item(), (whole - eager).abs().max().item()
    assert to_whole <= max(whole_to_eager, 1e-6), (to_whole, whole_to_eager)
    torch.testing.assert_close(got, whole, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, eager, rtol=1e-5, atol=1e-5)


class _Stats(dict):
    """Activation maxima for their_checkpoint (no calibration: the conversion is what is tested)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def __missing__(self, name: str) -> types.SimpleNamespace:
        g = torch.Generator().manual_seed(len(name))
        k = self.model.get_submodule(name).in_features
        return types.SimpleNamespace(act_max=torch.rand(k, generator=g) + 0.1)


def test_second_setup_loads_the_converted_checkpoint(wide_model, tmp_path, caplog, monkeypatch):
    """A model folder whose checkpoint is the public engine's file (128 wide: their tiles)."""
    import engine.flux.converted as converted

    folder = tmp_path / "weights" / "tiny"
    wide_model.save_pretrained(folder)
    sd, meta = their_checkpoint(wide_model.transformer, _Stats(wide_model.transformer))
    save_file(sd, folder / CHECKPOINT_NAME, metadata=meta)
    conversions = []
    real = converted.convert_public_checkpoint
    monkeypatch.setattr(converted, "convert_public_checkpoint", lambda p: conversions.append(p) or real(p))
    config = ServiceConfig(weights_dir=tmp_path / "weights", model="tiny", baked_dir=tmp_path / "none")
    caplog.set_level(logging.INFO, logger="engine")

    first = FluxService.setup(config, gpu=False)
    assert len(conversions) == 1 and "setup: converted the public engine's checkpoint" in caplog.text
    files = list((tmp_path / "weights" / "converted").glob("*.svdq.safetensors"))
    assert len(files) == 1
    caplog.clear()
    second = FluxService.setup(config, gpu=False)
    assert len(conversions) == 1, "the second setup converted again"
    assert f"converted checkpoint from the cache: {files[0]}" in caplog.text
    for phase in ("runtime", "weights", "convert", "load"):
        assert f"setup: {phase} " in caplog.text  # each phase with its time
    assert "setup: model tiny on cpu" in caplog.text and "(runtime " in caplog.text
    a, b = first._eager.state_dict(), second._eager.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
