"""The 4-bit transformer and pipeline used through diffusers' own API: save/load, LoRA adapters."""

import json

import pytest
import torch
from diffusers import FluxTransformer2DModel
from safetensors.torch import save_file

from engine.flux import CheckpointError, load_transformer
from engine.flux.model import WEIGHTS_NAME, SVDQFluxTransformer2DModel
from engine.lora import LoraManager, parse_lora
from engine.pipeline import FluxGenerator
from engine.tiny_model import CHECKPOINT_NAME

from .flux_cases import first_step_inputs, float_pipe, params_to_float, velocity
from .test_lora import DIFFUSERS_MODULES, diffusers_file


@pytest.fixture(scope="module")
def inputs(tiny_model_dir):
    return first_step_inputs(float_pipe(tiny_model_dir), "a red fox in the snow")


@pytest.fixture(scope="module")
def generator(tiny_model_dir):
    return FluxGenerator.from_pretrained(tiny_model_dir, tiny_model_dir / CHECKPOINT_NAME)


@pytest.mark.slow
def test_save_pretrained_round_trip_is_bit_identical(tiny_model_dir, tmp_path, inputs):
    model = params_to_float(load_transformer(tiny_model_dir / CHECKPOINT_NAME))
    assert isinstance(model, SVDQFluxTransformer2DModel) and model.svdq_config is not None
    model.save_pretrained(tmp_path / "t")
    assert sorted(p.name for p in (tmp_path / "t").iterdir()) == ["config.json", WEIGHTS_NAME]
    back = SVDQFluxTransformer2DModel.from_pretrained(tmp_path, subfolder="t", dtype=torch.float32)
    assert back.svdq_config == model.svdq_config
    a, b = model.state_dict(), back.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(velocity(model, inputs), velocity(back, inputs))


def test_stock_diffusers_refuses_our_folder_loudly(tiny_model_dir, tmp_path):
    load_transformer(tiny_model_dir / CHECKPOINT_NAME).save_pretrained(tmp_path)
    # Before: diffusers loaded plain Linear layers with random weights and only logged it.
    with pytest.raises(ValueError, match="svdquant-flux"):
        FluxTransformer2DModel.from_pretrained(tmp_path)


def test_our_loader_refuses_what_is_not_ours(tiny_model_dir, tmp_path):
    with pytest.raises(CheckpointError, match=r"no svdq-transformer\.safetensors.*FluxTransformer2DModel"):
        SVDQFluxTransformer2DModel.from_pretrained(tiny_model_dir, subfolder="transformer")
    save_file({"w": torch.zeros(2)}, tmp_path / "other.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="not an svdquant-flux checkpoint"):
        SVDQFluxTransformer2DModel.from_pretrained(tmp_path / "other.safetensors")
    load_transformer(tiny_model_dir / CHECKPOINT_NAME).save_pretrained(tmp_path / "t")
    cfg = json.loads((tmp_path / "t" / "config.json").read_text())
    (tmp_path / "t" / "config.json").write_text(json.dumps({**cfg, "num_layers": 7}))
    with pytest.raises(CheckpointError, match=r"disagree on \['num_layers'\]"):
        SVDQFluxTransformer2DModel.from_pretrained(tmp_path / "t")
    with pytest.raises(ValueError, match="variant"):
        load_transformer(tiny_model_dir / CHECKPOINT_NAME).save_pretrained(tmp_path / "v", variant="fp16")


@pytest.mark.slow
def test_pipeline_lora_api_routes_to_our_slots(generator, tiny_model_dir, tmp_path, inputs):
    pipe, transformer = generator.pipe, generator.pipe.transformer
    base = velocity(transformer, inputs)
    sd = diffusers_file(DIFFUSERS_MODULES)
    save_file(sd, tmp_path / "style.safetensors")
    # The same LoRA through engine.lora directly, on a second copy: the reference output.
    ref_model = params_to_float(load_transformer(tiny_model_dir / CHECKPOINT_NAME))
    LoraManager(ref_model).set([("ref", parse_lora(sd, ref_model), 0.5)])
    expected = velocity(ref_model, inputs)
    try:
        pipe.load_lora_weights(tmp_path / "style.safetensors", adapter_name="style")
        assert pipe.get_active_adapters() == ["style"]
        full = velocity(transformer, inputs)
        assert not torch.equal(full, base)
        pipe.set_adapters("style", 0.5)
        assert torch.equal(velocity(transformer, inputs), expected)
        pipe.load_lora_weights(sd, adapter_name="again")  # a state dict, second adapter
        assert pipe.get_list_adapters() == {"transformer": ["style", "again"]}
        assert pipe.get_active_adapters() == ["style", "again"]
        pipe.set_adapters(["style", "again"], [0.0, 0.0])
        assert torch.equal(velocity(transformer, inputs), base)
        pipe.set_adapters(["again"], [1.0])
        assert torch.equal(velocity(transformer, inputs), full)
        pipe.disable_lora()
        assert torch.equal(velocity(transformer, inputs), base)
        pipe.enable_lora()
        assert torch.equal(velocity(transformer, inputs), full)
        with pytest.raises(NotImplementedError, match="set_adapters"):
            pipe.fuse_lora()
        with pytest.raises(ValueError, match="already loaded"):
            pipe.load_lora_weights(sd, adapter_name="again")
        with pytest.raises(ValueError, match="no adapter named"):
            pipe.set_adapters("missing")
        pipe.delete_adapters("again")
        assert pipe.get_list_adapters() == {"transformer": ["style"]} and pipe.get_active_adapters() == []
        assert torch.equal(velocity(transformer, inputs), base)
    finally:
        pipe.unload_lora_weights()
    assert pipe.get_list_adapters() == {"transformer": []}
    assert torch.equal(velocity(transformer, inputs), base)


@pytest.mark.slow
def test_generate_with_a_lora_via_the_pipeline_api(generator, tmp_path):
    kw = {"width": 128, "height": 128, "steps": 1, "seed": 5}
    base = generator.generate("a cat", **kw)[0]
    try:
        generator.pipe.load_lora_weights(diffusers_file(DIFFUSERS_MODULES, amp=4.0), adapter_name="s")
        styled = generator.generate("a cat", **kw)[0]
    finally:
        generator.pipe.unload_lora_weights()
    assert styled.tobytes() != base.tobytes()
    assert generator.generate("a cat", **kw)[0].tobytes() == base.tobytes()
