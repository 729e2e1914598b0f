"""Static gates of the W4A8 sm_90 GEMM (engine/kernels/triton/gemm_sm90_w4a8.py), no GPU needed.

The Gluon kernel is compiled for sm_90 (Triton's ptxas) at FLUX's largest shape (3072 -> 21504,
rank 32; bf16 output, and fp32 as the route launches it before its epilogue) and its loops read
from the SASS (scripts/perfmodel/hopper_w4a8_static.py). Per 64-channel group and consumer warp
the gates hold: exactly one FFMA per accumulator element (64 at 64 x 128 per warpgroup) and no
other fp32 arithmetic, two FP8 wgmmas with the weights from registers, ONE wgmma wait (ptxas
serializing the wgmmas, its answer to register pressure, would show as more), one mbarrier
wait and one arrive, at most two barriers and those of one warpgroup (128 threads), no shared
stores, no spills anywhere in the kernel (ptxas -v: no spill bytes, no C7512); the CTA is 3
consumer warpgroups and the producer's (512 threads) and the producer issues 8 TMA loads per
group (a weight box and a scale box per consumer, the two activation halves).
Compiles run in a child (no TRITON_INTERPRET).
"""

import json
import sys

import pytest

from .ptx_compile import run_compiled

_STATIC = """
import json, sys
sys.path.insert(0, "scripts")
import torch
from perfmodel import hopper_w4a8_static as h
out = []
for dtype in (torch.bfloat16, torch.float32):
    e = h.w4a8_static(4352, 3072, 21504, out_dtype=dtype, ptxas=True)
    out.append({k: v for k, v in e.items() if k not in ("body", "producer_body")} | {"gates": h.gate_failures(e)})
print(json.dumps(out))
"""


@pytest.mark.slow  # seconds of compiling (and PTX interpretation): CI runs it, -m 'not slow' skips it
def test_w4a8_loop_structure_at_the_largest_flux_shape():
    res = run_compiled([sys.executable, "-c", _STATIC], timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    for e in json.loads(res.stdout.strip().splitlines()[-1]):
        assert e["gates"] == [], e["gates"]
        assert e["config"]["consumers"] == 3 and e["config"]["block_t"] == 128, e["config"]
        assert e["threads"] == 512 and e["config"]["consumer_regs"] in e["setmaxnreg"], e
        assert e["loop_ffma"] == 64 == e["acc_elems_per_thread"] and e["loop_fp32"] == 64, e["consumer_ops"]
        assert e["loop_qgmma"] == 2 and e["loop_mma_waits"] == 1 and e["loop_wait_pending"] == [0], e
        assert e["loop_mbar_waits"] == 1 and e["loop_mbar_arrives"] == 1, e
        assert e["loop_bar_threads"] == ["0x80"] and e["loop_bar_sync"] <= 2, e
        assert e["loop_shared_stores"] == 0 and e["loop_shared_loads"] <= 3, e  # weights + 2 scales
        assert e["stack_bytes"] == 0 and e["spill_instrs"] == 0, e
        assert e["ptxas_spill_bytes"] == 0 and e["ptxas_c7512"] == 0, e
        assert e["producer_tma"] == 8, e["producer_ops"]
        assert e["consumer_sass"] <= 125, e["consumer_ops"]  # 64 FFMA + ~50 (expansion, MMA, sync, loop)
        assert e["shared_bytes"] <= 227 * 1024, e


_TOO_WIDE = """
import json, sys
sys.path.insert(0, "scripts")
from perfmodel import hopper_w4a8_static as h
e = h.w4a8_static(4352, 3072, 3072, h.w4a8.W4A8Config(consumers=2, block_t=256, consumer_regs=232))
print(json.dumps(h.gate_failures(e)))
"""


@pytest.mark.slow
def test_the_gates_catch_a_tile_whose_registers_do_not_fit():
    """Two consumers of 64 x 256 (128 accumulators + 128 partials per thread at 232 registers)
    spill: the gate that holds the shipped config fails on it."""
    res = run_compiled([sys.executable, "-c", _TOO_WIDE], timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    gates = json.loads(res.stdout.strip().splitlines()[-1])
    assert any("spills" in g for g in gates), gates


_SPLIT = """
import json, sys
sys.path.insert(0, "scripts")
import torch
from perfmodel import hopper_w4a8_static as h
split = h.w4a8.plan(4352, 3072, 15360, 132)
out = []
for s in (None, split):
    e = h.w4a8_static(4352, 15360, 3072, out_dtype=torch.bfloat16, split=s)
    out.append({k: v for k, v in e.items() if k not in ("body", "producer_body")} | {"gates": h.gate_failures(e)})
print(json.dumps(out))
"""


@pytest.mark.slow  # seconds of compiling (and PTX interpretation): CI runs it, -m 'not slow' skips it
def test_the_split_variant_keeps_the_plain_loops():
    """The K-sliced variant (SPLIT, at single: proj_out's planned split) has the plain kernel's
    group loops: every loop gate holds, no local-memory access in any group loop (consumer
    copies, producer); what it keeps in local memory across the partitions' register
    reallocation (a few words, loaded per partition or work item) is bounded here."""
    res = run_compiled([sys.executable, "-c", _SPLIT], timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    plain, split = json.loads(res.stdout.strip().splitlines()[-1])
    assert plain["split"] is None and split["split"] == [528, 8, 30]
    assert plain["gates"] == [] and plain["group_loop_spill_instrs"] == 0
    assert [g for g in split["gates"] if "spills" not in g] == [], split["gates"]
    assert split["group_loop_spill_instrs"] == 0 and split["stack_bytes"] <= 32, split
    for key in ("consumer_ops", "consumer_sass", "producer_tma", "shared_bytes", "setmaxnreg"):
        assert split[key] == plain[key], key
    assert split["producer_sass"] <= plain["producer_sass"] + 4  # its group range starts at the slice's first
