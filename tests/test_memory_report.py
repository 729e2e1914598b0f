"""scripts/memory_report.py (the traced peak of a prediction) and engine/memory.py (the modes)."""

import dataclasses
import math
from pathlib import Path

import memory_report as mr
import pytest
import torch
from torch import nn

from engine import memory
from engine.service.config import ServiceConfig

GiB = 2**30
DOCS = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"


def test_allocator_rounding_is_the_caching_allocators():
    assert mr.allocator_bytes(0) == 0
    assert mr.allocator_bytes(1) == 512 and mr.allocator_bytes(513) == 1024
    assert mr.allocator_bytes(10 * 2**20) == 10 * 2**20  # at the cut-off: 512 B granules
    assert mr.allocator_bytes(10 * 2**20 + 1) == 12 * 2**20  # above: 2 MiB


def test_live_bytes_counts_each_storage_once_until_it_dies():
    tracer = mr.LiveBytes("meta")
    w = torch.empty(1024, device="meta")  # 4 KiB, made before the mode: tracked by hand
    tracer.track([w, w.view(2, 512)])
    assert tracer.live == 4096
    with tracer:
        a = torch.empty(2048, device="meta")  # 8 KiB
        v = a.view(2, 1024)  # a view: no new bytes
        assert tracer.live == 4096 + 8192
        b = a * 2  # 8 KiB more: peak 20 KiB
        del a  # v keeps the storage alive
        assert tracer.live == 4096 + 16384
        del v, b
        c = torch.ones(10, device="cpu")  # another device: not counted
    assert tracer.live == 4096 and tracer.peak == 4096 + 16384 and c.numel() == 10


def test_mode_choice_from_the_gpus_memory_and_the_setting():
    assert memory.choose("auto", None) == (memory.Mode.FAST, "no GPU")
    assert memory.choose("auto", 16 * GiB)[0] is memory.Mode.SMALL
    assert memory.choose("auto", 12 * GiB)[0] is memory.Mode.SMALL
    assert memory.choose("auto", 24 * GiB)[0] is memory.Mode.FAST
    assert memory.choose("auto", math.ceil(memory.FAST_CARD_GIB * GiB))[0] is memory.Mode.FAST
    assert memory.choose("auto", int(memory.FAST_CARD_GIB * GiB) - 2**20)[0] is memory.Mode.SMALL
    assert memory.choose("small", 80 * GiB)[0] is memory.Mode.SMALL
    assert memory.choose(" Fast ", 8 * GiB)[0] is memory.Mode.FAST
    assert memory.safety_resident(memory.Mode.FAST) and not memory.safety_resident(memory.Mode.SMALL)
    with pytest.raises(ValueError, match="SVDQ_MEMORY='tiny'"):
        memory.parse("tiny")


def test_service_config_reads_the_memory_mode(tmp_path):
    env = {"SVDQ_WEIGHTS_DIR": str(tmp_path)}
    assert ServiceConfig.from_env(env).memory == "auto"
    assert ServiceConfig.from_env({**env, "SVDQ_MEMORY": "small"}).memory == "small"
    with pytest.raises(ValueError, match="SVDQ_MEMORY"):
        ServiceConfig.from_env({**env, "SVDQ_MEMORY": "huge"})
    assert dataclasses.fields(ServiceConfig)  # a frozen dataclass, as before


def test_on_demand_module_computes_the_same_and_keeps_no_device_copy():
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4)).eval()
    x = torch.randn(3, 8)
    expected = module(x)
    visiting = memory.OnDemand(module, "cpu")
    assert torch.equal(visiting(x), expected)
    assert list(visiting.parameters()) == [] and visiting.dtype == torch.float32
    copies = memory.device_copies(visiting.host_state, torch.device("cpu"))
    for name, t in copies.items():  # fresh storage, same values
        assert torch.equal(t, visiting.host_state[name])
        assert t.untyped_storage().data_ptr() != visiting.host_state[name].untyped_storage().data_ptr()


@pytest.mark.slow
def test_report_meets_the_budgets_and_the_docs_table_is_current():
    r = mr.report()
    small, fast = r["modes"]["small"], r["modes"]["fast"]
    for case in small["cases"]:
        assert case["card_bytes"] <= r["budgets"][str(case["num_outputs"])], case
    for s, f in zip(small["cases"], fast["cases"], strict=True):
        assert s["card_bytes"] < f["card_bytes"] - 6 * GiB  # the T5's 6.7 GB
        assert s["peak_stage"] in ("decode", "denoise")
    # the fast mode's weights are the figures: transformer 6.8, T5 9.5 GB
    assert fast["components_bytes"]["transformer"] == pytest.approx(6.84e9, rel=0.01)
    assert fast["components_bytes"]["t5"] == pytest.approx(9.52e9, rel=0.01)
    assert round(max(c["card_bytes"] for c in fast["cases"]) / GiB, 2) == memory.FAST_CARD_GIB
    assert r["small_mode_cost_ms"] > 0
    text = DOCS.read_text()
    assert mr.docs_block(text) == mr.markdown(r), (
        "run: python scripts/memory_report.py --write-docs docs/benchmarks.md"
    )


def test_setup_chooses_and_logs_the_mode(caplog):
    from engine.service.setup_phases import memory_mode

    with caplog.at_level("INFO", logger="engine.service"):
        assert memory_mode("auto", torch.device("cpu")) is memory.Mode.FAST
        assert memory_mode("small", torch.device("cpu")) is memory.Mode.SMALL
    assert "memory mode: fast (no GPU)" in caplog.text
    assert "memory mode: small (SVDQ_MEMORY=small)" in caplog.text


def test_on_demand_serves_the_safety_checkers_keyword_call():
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig

    torch.manual_seed(0)
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}
    checker = StableDiffusionSafetyChecker(CLIPConfig(vision_config=vision, projection_dim=16)).eval()
    images = [torch.rand(8, 8, 3).numpy() for _ in range(2)]
    clip_input = torch.randn(2, 3, 224, 224)
    _, expected = checker(images=images, clip_input=clip_input)
    visiting = memory.OnDemand(checker, "cpu")
    _, got = visiting(images=images, clip_input=clip_input)
    assert got == expected and visiting.dtype == torch.float32
