"""scripts/count_launches.py: the per-block launch count that issue 16 measures against."""

from count_launches import FLUX_SCHNELL_BLOCKS, count_step, summary

from engine.flux import load_transformer
from engine.modules import SVDQLinear, W4A16Linear
from engine.tiny_model import CHECKPOINT_NAME

from .flux_cases import first_step_inputs, float_pipe


def test_every_quantized_linear_is_counted_once_per_op_and_blocks_agree(tiny_model_dir):
    transformer = load_transformer(tiny_model_dir / CHECKPOINT_NAME)
    counts = count_step(transformer, first_step_inputs(float_pipe(tiny_model_dir), "a fox"))
    result = summary(counts)
    for kind in FLUX_SCHNELL_BLOCKS:
        blocks = getattr(transformer, kind)
        w4a4 = sum(isinstance(m, SVDQLinear) for m in blocks[0].modules())
        w4a16 = sum(isinstance(m, W4A16Linear) for m in blocks[0].modules())
        # quantize_act + w4a4_gemm per W4A4 linear, one GEMV per AdaLN linear (a conditioning vector)
        assert result[kind]["svdq_ops_per_block"] == 2 * w4a4 + w4a16
        per_block = {sum(c.values()) for name, c in counts.items() if name.startswith(kind + ".")}
        assert len(per_block) == 1  # every block of a kind launches the same operations
        assert result[kind]["per_block"] > result[kind]["svdq_ops_per_block"]  # the glue is counted too
