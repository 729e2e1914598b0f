"""scripts/count_launches.py: the per-block launch count that issue 16 measures against."""

import time

from count_launches import FLUX_SCHNELL_BLOCKS, count_step, full_size_report, summary

from engine.flux import load_transformer
from engine.modules import SVDQLinear, W4A16Linear
from engine.tiny_model import CHECKPOINT_NAME

from .flux_cases import first_step_inputs, float_pipe


def test_every_quantized_linear_is_counted_once_per_op_and_blocks_agree(tiny_model_dir):
    transformer = load_transformer(tiny_model_dir / CHECKPOINT_NAME)
    counter = count_step(transformer, first_step_inputs(float_pipe(tiny_model_dir), "a fox"))
    result = summary(counter)
    for kind in FLUX_SCHNELL_BLOCKS:
        blocks = getattr(transformer, kind)
        w4a4 = sum(isinstance(m, SVDQLinear) for m in blocks[0].modules())
        w4a16 = sum(isinstance(m, W4A16Linear) for m in blocks[0].modules())
        # quantize_act (plain or with its prologue) + w4a4_gemm per W4A4 linear, one GEMV per
        # AdaLN linear (a conditioning vector)
        assert result[kind]["svdq_ops_per_block"] == 2 * w4a4 + w4a16
        per_block = {sum(c.values()) for name, c in counter.counts.items() if name.startswith(kind + ".")}
        assert len(per_block) == 1  # every block of a kind launches the same operations
        assert result[kind]["per_block"] > result[kind]["svdq_ops_per_block"]  # the glue is counted too


def test_full_size_launches_per_block_at_most_half_of_the_unfused_layout():
    """Issue 16's bar, at FLUX.1-schnell's widths (meta device): the fused blocks launch at most
    half of what the version-1 layout (diffusers' blocks) launches, and move fewer bytes."""
    t0 = time.perf_counter()
    report = full_size_report()
    for kind in FLUX_SCHNELL_BLOCKS:
        before, after = report["v1"][kind], report["v2"][kind]
        assert after["per_block"] <= before["per_block"] / 2, (kind, before["per_block"], after["per_block"])
        assert after["bytes_per_block"] < before["bytes_per_block"]
        # the same quantized weights are read: only the glue and the repeated activations go
        assert after["svdq_ops_per_block"] < before["svdq_ops_per_block"]
    assert time.perf_counter() - t0 < 60  # meta tensors: nothing is computed
