"""scripts/gpu_stages.py: the stage timer runs the pipeline's own stages (tiny model, CPU).

On a CPU its times say nothing about a GPU; what is checked is that the stages it times are the
pipeline's: the staged run gives the very images FluxGenerator.generate gives, and every stage
is reported.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from engine.pipeline import FluxGenerator
from engine.safety import SafetyChecker
from engine.tiny_model import CHECKPOINT_NAME

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("gpu_stages", ROOT / "scripts" / "gpu_stages.py")
gpu_stages = sys.modules.setdefault("gpu_stages", importlib.util.module_from_spec(_spec))
_spec.loader.exec_module(gpu_stages)


@pytest.fixture(scope="module")
def gen(tiny_model_dir):
    return FluxGenerator.from_pretrained(tiny_model_dir, tiny_model_dir / CHECKPOINT_NAME)


def test_staged_run_gives_the_images_generate_gives(gen, tiny_model_dir):
    checker = SafetyChecker.load(tiny_model_dir, gen.device)
    times, images = gpu_stages.run_once(gen, checker, "a fox", 256, 1, 2, seed=5)
    expected = gen.generate("a fox", width=256, height=256, steps=1, seed=5, num_outputs=2)
    assert len(images) == 2
    for a, b in zip(images, expected, strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    want = set(gpu_stages.STAGES) if checker is not None else set(gpu_stages.STAGES) - {"safety checker"}
    assert set(times) == want and all(t > 0 for t in times.values())


@pytest.mark.slow
def test_cli_writes_medians_and_total(tmp_path, tiny_model_dir):
    out = tmp_path / "stages.json"
    ckpt = tiny_model_dir / CHECKPOINT_NAME
    rc = gpu_stages.main(
        [
            "--model",
            str(tiny_model_dir),
            "--checkpoint",
            str(ckpt),
            "--size",
            "256",
            "--steps",
            "1",
            "--repeats",
            "2",
            "--json",
            str(out),
        ]
    )
    assert rc == 0
    result = json.loads(out.read_text())
    assert result["device"] == "cpu" and result["repeats"] == 2
    assert abs(result["total_median_s"] - sum(result["median_s"].values())) < 1e-9
    assert set(result["median_s"]) == set(result["warm_up_s"])
