"""Static gates of the warp-specialized sm_90 GEMM (engine/kernels/triton/gemm_sm90_ws.py) and
its model (scripts/perfmodel/hopper_ws.py), no GPU needed.

The Gluon kernel is compiled for sm_90 (Triton's ptxas) at FLUX's shapes and its consumer and
producer loops read from the SASS. Per 64-channel group and consumer warpgroup the gates hold:
two FP8 wgmmas, ONE wgmma wait, one mbarrier wait and one arrive, at most two barriers and those
of one warpgroup (128 threads: never the CTA), no shared stores (no operand round trip), no
spills; the producer issues 5 TMA loads per group (the signed path's weight scales and offsets
interleaved in one box). ptxas serializing
the wgmmas (its answer to register pressure) would show as a second wait. The model must price
it below the FP8 kernel it replaces on every shape, and the dispatch's split of the last wave
(gemm_sm90_ws_split) where, and only where, it prices the split faster; the split grid's compile
holds the same loop gates. Compiles run in a child (no TRITON_INTERPRET).
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from .ptx_compile import run_compiled

ROOT = Path(__file__).resolve().parents[1]

_ONE_SHAPE = """
import json, sys
sys.path.insert(0, "scripts")
from perfmodel import hopper_ws as h
static = [h.ws_static(4352, 3072, 21504, u) for u in (False, True)]
static += [h.ws_static(4352, 3072, 3072, u, split=True) for u in (False, True)]  # the split grid
print(json.dumps({"gates": h.gate_failures(static),
                  "static": [{k: v for k, v in e.items() if k not in ("body", "producer_body")} for e in static]}))
"""


def _run(args: list[str], timeout: int = 1200) -> subprocess.CompletedProcess:
    return run_compiled(args, timeout=timeout)


def test_ws_loop_structure_at_the_largest_flux_shape_and_of_the_split_grid():
    res = _run([sys.executable, "-c", _ONE_SHAPE], timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got["gates"] == [], got["gates"]
    assert [e["split"] for e in got["static"]] == [False, False, True, True]
    for e in got["static"]:
        assert e["loop_mma_waits"] == 1 and e["loop_wait_pending"] == [0], e
        assert e["loop_bar_threads"] == ["0x80"] and e["loop_bar_sync"] <= 2, e  # one warpgroup's barrier
        assert e["loop_mbar_waits"] == 1 and e["loop_mbar_arrives"] == 1, e
        assert e["loop_qgmma"] == 2 and e["loop_shared_stores"] == 0, e
        assert e["stack_bytes"] == 0 and e["spill_instrs"] == 0, e
        assert e["threads"] == 384 and 232 in e["setmaxnreg"], e  # 2 consumer warpgroups + producer
        assert e["producer_tma"] == 5, e
        assert e["consumer_sass"] <= 200, e  # 128 FP32 + 16 LDS.128 of scale/offset pairs + the rest


@pytest.mark.slow
def test_ws_model_beats_the_fp8_kernel_on_every_flux_shape(tmp_path):
    out = tmp_path / "ws.json"
    res = _run([sys.executable, str(ROOT / "scripts" / "kernel_model_hopper_ws.py"), "--json", str(out)])
    report = json.loads(out.read_text()) if out.exists() else None
    assert res.returncode == 0, (res.stderr[-3000:], report and report["gates_failed"])
    rows = {(r["k"], r["n"], r["unsigned"]): r for r in report["model"]}
    assert (3072, 21504, False) in rows and len(rows) == 12
    for r in report["fp8_kernel"]:
        ws = rows[(r["k"], r["n"], r["unsigned"])]
        assert ws["gemm_us"] < r["gemm_us"], (ws, r)
        assert ws["bound"] in ("chain", "issue", "tensor", "L2")
        assert ws["ring_covers_latency"], ws  # the chain's satisfied mbarrier wait holds
    for ws in rows.values():  # the split where the model prices it faster, and only there
        split = ws["split"]
        assert (ws["n"] == 3072 or ws["n"] == 21504) == (split["candidate"] is not None), ws
        if split["candidate"] is not None:
            assert split["planned"] == (split["gemm_us"] < ws["gemm_us"]), ws
    assert rows[(3072, 3072, False)]["split"]["planned"]
    assert len(report["static"]) == 12 + 8 and not report["gates_failed"]
