"""The loader refuses what it cannot serve: every malformed file is a CheckpointError that names
the file and what is wrong; a layer without a low-rank branch is padded exactly."""

import json
import logging
import types

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from engine.flux import CheckpointError, load_transformer, read_metadata
from engine.tiny_model import CHECKPOINT_NAME

from .flux_cases import first_step_inputs, params_to_float, velocity
from .nunchaku_layout import their_checkpoint

LAYER = "transformer_blocks.0.out_proj"


@pytest.fixture(scope="module")
def theirs(wide_model):
    """A whole wide transformer in the public engine's layout (rank 16). Made-up activation
    statistics: these tests are about the file, not the quantization quality."""
    gen = torch.Generator().manual_seed(3)
    stats = {
        name: types.SimpleNamespace(act_max=torch.rand(m.in_features, generator=gen) + 0.5)
        for name, m in wide_model.transformer.named_modules()
        if isinstance(m, nn.Linear)
    }
    return their_checkpoint(wide_model.transformer, stats)


def write(tmp_path, sd, meta, name="svdq-int4_r16-flux.1-tiny.safetensors"):
    path = tmp_path / name
    save_file(sd, path, metadata=meta)
    return path


def refused(path, *patterns: str) -> str:
    """Load ``path``; it must raise a CheckpointError naming the file and each of ``patterns``."""
    with pytest.raises(CheckpointError) as e:
        load_transformer(path)
    message = str(e.value)
    assert str(path) in message, message
    for p in patterns:
        assert p in message, (p, message)
    return message


def test_public_file_without_metadata_says_which_merged_file_is_expected(theirs, tmp_path):
    sd, _ = theirs
    refused(write(tmp_path, sd, None), "no 'config' entry", "svdq-int4_r32-flux.1-schnell", "merged")


@pytest.mark.parametrize("ours", [False, True], ids=["public", "ours"])
def test_flux_dev_file_is_refused(theirs, tiny_model_dir, tmp_path, ours):
    """A guidance-distilled transformer would run with guidance 0 here: refused, not served wrong."""
    if ours:
        src = tiny_model_dir / CHECKPOINT_NAME
        meta, _ = read_metadata(src)
        config = {**json.loads(meta["transformer_config"]), "guidance_embeds": True}
        path = write(
            tmp_path, load_file(src), {**meta, "transformer_config": json.dumps(config)}, "dev.safetensors"
        )
    else:
        sd, meta = theirs
        config = {**json.loads(meta["config"]), "guidance_embeds": True}
        path = write(tmp_path, sd, {**meta, "config": json.dumps(config)})
    refused(path, "FLUX.1-dev", "guidance_embeds")


def test_layer_without_low_rank_branch_is_padded_exactly(wide_model, theirs, tmp_path, caplog):
    """No lora_down/lora_up (a layer quantized without the branch): zero factors of the file's
    rank, which compute exactly what the layer without a branch does."""
    sd, meta = theirs
    absent = {k: v for k, v in sd.items() if k not in (f"{LAYER}.lora_down", f"{LAYER}.lora_up")}
    zeros = {
        **sd,
        f"{LAYER}.lora_down": torch.zeros_like(sd[f"{LAYER}.lora_down"]),
        f"{LAYER}.lora_up": torch.zeros_like(sd[f"{LAYER}.lora_up"]),
    }
    with caplog.at_level(logging.INFO, logger="engine.flux.checkpoint"):
        padded = params_to_float(load_transformer(write(tmp_path, absent, meta, "absent.safetensors")))
    assert "1 layers without a low-rank branch padded with zeros" in caplog.text
    explicit = params_to_float(load_transformer(write(tmp_path, zeros, meta, "zeros.safetensors")))
    assert padded.transformer_blocks[0].attn.to_out[0].rank == 16
    inputs = first_step_inputs(wide_model, "a fox")
    assert torch.equal(velocity(padded, inputs), velocity(explicit, inputs))


def test_half_a_low_rank_branch_is_refused(theirs, tmp_path):
    sd, meta = theirs
    sd = {k: v for k, v in sd.items() if k != f"{LAYER}.lora_up"}
    refused(write(tmp_path, sd, meta), LAYER, "only one of lora_down and lora_up")


@pytest.mark.parametrize(
    ("tensor", "change", "patterns"),
    [
        ("wscales", lambda t: t.to(torch.float8_e4m3fn), ["wscales", "float8_e4m3fn", "NVFP4"]),
        ("wscales", lambda t: t[: t.shape[0] // 2], ["wscales", "group size 64"]),
        ("qweight", lambda t: t.view(torch.uint8), ["qweight", "torch.uint8", "int8"]),
        ("lora_down", lambda t: t.float()[:, :8], ["lora_down", "rank of lora_down"]),
        ("smooth", lambda t: t.to(torch.int16), ["smooth", "torch.int16"]),
        ("qweight", None, ["no qweight"]),
    ],
    ids=["fp8-wscales", "group-128-wscales", "uint8-qweight", "rank-mismatch", "int-smooth", "no-qweight"],
)
def test_malformed_public_layer_is_refused(theirs, tmp_path, tensor, change, patterns):
    sd, meta = theirs
    sd = dict(sd)
    key = f"{LAYER}.{tensor}"
    if change is None:
        del sd[key]
    else:
        sd[key] = change(sd[key]).contiguous()
    refused(write(tmp_path, sd, meta), LAYER, *patterns)


def test_malformed_awq_layer_is_refused(theirs, tmp_path):
    sd, meta = theirs
    key = "transformer_blocks.0.norm1.linear.wscales"
    sd = {**sd, key: sd[key].to(torch.float8_e5m2)}
    refused(write(tmp_path, sd, meta), "transformer_blocks.0.norm1.linear.wscales", "float8_e5m2")


def test_public_file_logs_what_it_holds(theirs, tmp_path, caplog):
    sd, meta = theirs
    with caplog.at_level(logging.INFO, logger="engine.flux.checkpoint"):
        load_transformer(write(tmp_path, sd, meta))
    assert "INT4 W4A4, rank 16, group size 64, bfloat16; smoothing NOT fused" in caplog.text


# --- our own format ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("edit", "patterns"),
    [
        (
            lambda sd, meta: sd.update(
                {
                    "transformer_blocks.0.attn.to_qkv.wscales": sd[
                        "transformer_blocks.0.attn.to_qkv.wscales"
                    ].to(torch.float8_e4m3fn)
                }
            ),
            ["transformer_blocks.0.attn.to_qkv.wscales", "float8_e4m3fn"],
        ),
        (
            lambda sd, meta: sd.update(
                {
                    "transformer_blocks.0.attn.to_qkv.qweight": sd[
                        "transformer_blocks.0.attn.to_qkv.qweight"
                    ].view(torch.int8)
                }
            ),
            ["transformer_blocks.0.attn.to_qkv.qweight", "torch.int8", "torch.uint8"],
        ),
        (
            lambda sd, meta: sd.update(
                {
                    "transformer_blocks.0.attn.to_qkv.bias": sd["transformer_blocks.0.attn.to_qkv.bias"][
                        :-1
                    ].clone()
                }
            ),
            ["does not match the transformer", "transformer_blocks.0.attn.to_qkv.bias"],
        ),
        (lambda sd, meta: meta.pop("transformer_config"), ["transformer_config"]),
        (lambda sd, meta: meta.update(quant_config="{"), ["quant_config"]),
    ],
    ids=["fp8-wscales", "int8-qweight", "bias-shape", "no-transformer-config", "bad-quant-config"],
)
def test_malformed_file_of_ours_is_refused(tiny_model_dir, tmp_path, edit, patterns):
    src = tiny_model_dir / CHECKPOINT_NAME
    meta, _ = read_metadata(src)
    sd = load_file(src)
    edit(sd, meta)
    refused(write(tmp_path, sd, meta, "ours.safetensors"), *patterns)
