"""The W4A8 quantizer as Triton compiles it for sm_90 (scripts/perfmodel/act_fp8.py, in a child
without TRITON_INTERPRET): no spills; the loops the design has (the modulation's statistics,
pass 1 with the low-rank MMAs, pass 2 storing the codes, the NaN-block fix-up) and no other;
one hardware e4m3 conversion per two codes; no approximate division, no NaN-dropping max; the
plain kernel's SASS per 64-channel group below quantize_act's (which the W4A8 route replaces)."""

from __future__ import annotations

import json
import sys

import pytest

from .ptx_compile import ROOT, run_compiled


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("act_fp8") / "report.json"
    res = run_compiled(
        [sys.executable, str(ROOT / "scripts/perfmodel/act_fp8.py"), "--json", str(out)], scripts=True
    )
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.slow  # seconds of compiling (and PTX interpretation): CI runs it, -m 'not slow' skips it
def test_compiled_structure(report):
    assert [e["prologue"] for e in report["static"]] == ["none", "modulation", "gelu"]
    for e in report["static"]:
        tag = e["prologue"]
        assert e["stack_bytes"] == 0 and e["spill_instrs"] == 0, tag
        want = {"pass1", "pass2", "fixup"} | ({"stats"} if tag == "modulation" else set())
        assert set(e["loops"]) == want, (tag, e["loops"])
        codes_per_thread = 16 * e["block_k2"] // (32 * e["num_warps"])  # 16 rows per program
        assert e["e4m3_cvt"] == e["ptx_e4m3_cvt"] == codes_per_thread // 2, tag
        assert not any("MMA" in op for op in e["loop_ops"]["pass2"]), tag
        assert e["loop_ops"]["pass2"].get("LDGSTS.E.BYPASS.128", 0) >= 1, tag  # x through cp.async, 16 B
        assert e["ptx_div_approx"] == 0 and e["ptx_max_drops_nan"] == 0 and e["ptx_wide_immediates"] == 0, tag


@pytest.mark.slow  # seconds of compiling (and PTX interpretation): CI runs it, -m 'not slow' skips it
def test_plain_costs_less_issue_than_quantize_act(report):
    plain = report["static"][0]
    assert plain["group_sass"] < report["quantize_act_loop_sass"]["none"], (
        plain["loops"],
        report["quantize_act_loop_sass"],
    )


@pytest.mark.slow  # seconds of compiling (and PTX interpretation): CI runs it, -m 'not slow' skips it
def test_model_rows(report):
    rows = {(r["prologue"], r["k"]): r for r in report["table"]}
    assert rows["none", 3072]["reread"] == "l2" and rows["none", 12288]["reread"].startswith("dram")
    for r in rows.values():
        assert r["us"] >= max(r["us_issue"], r["us_dram_floor_one_read"]) > 0
        assert r["us_reread_dram"] >= r["us_reread_l2"]
