"""scripts/gpu_session.sh: the one prepared GPU call, run end to end on the CPU at tiny sizes
(every part, the Triton kernels under the interpreter), and its time budget."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import gpu_session
import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "gpu_session.sh"
CALL_LIMIT_S = 8 * 60  # issue 22: one call of at most 8 minutes
MAX_FILES = 8  # what the device tool returns from $OUT


def _parts() -> list[tuple[str, int]]:
    """(name, limit) of every part the script runs, in order (hooks commented out excluded)."""
    block = SCRIPT.read_text().split("PARTS=(", 1)[1].split("\n)", 1)[0]
    return [(m[1], int(m[2])) for m in re.finditer(r"^\s+'(\w+) (\d+) ", block, re.M)]


HOOKS = ("hopper_gemm",)  # parts run by their own scripts, after gpu_session.py's


def test_parts_fit_one_call_and_the_tools_file_limit():
    parts = _parts()
    # gpu_session.py's parts first (most valuable first, all of them), then the hooks
    assert [name for name, _ in parts] == [*gpu_session.PARTS, *HOOKS]
    # the parts' limits, plus 30 s for the wheel install and the device report, fit one call
    assert sum(limit for _, limit in parts) + 30 <= CALL_LIMIT_S
    assert 1 + len(parts) <= MAX_FILES  # log + one JSON per part


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu")
    env = {
        **os.environ,
        "OUT": str(out),
        "SIZE": "tiny",
        "LIMIT_SCALE": "10",
        "PYTHON": sys.executable,
        "TRITON_INTERPRET": "1",
    }
    env.pop("SVDQ_KERNELS", None)
    res = subprocess.run(
        ["bash", str(SCRIPT)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800
    )
    log = (out / "log.txt").read_text()
    return res, log, {name: json.loads((out / f"{name}.json").read_text()) for name, _ in _parts()}


@pytest.mark.slow
def test_hooks_run_and_write_their_json(session):
    _, log, results = session
    for name in HOOKS:
        assert f"=== {name}: exit 0" in log, log[-3000:]
        assert results[name], name


@pytest.mark.slow
def test_every_part_runs_and_writes_its_json(session):
    res, log, results = session
    for name in gpu_session.PARTS:
        assert f"=== {name}: exit" in log, log[-3000:]
        assert results[name]["done"] and results[name]["rows"], (name, log[-3000:])
        assert results[name]["size"] == "tiny"
    assert "files in" in res.stdout


@pytest.mark.slow
def test_kernels_part_checks_every_op_against_the_reference(session):
    rows = session[2]["kernels"]["rows"]
    assert {r["op"] for r in rows} == {"linear", "prologue", "w4a16_gemv", "qk_norm_rope", "sage_attention_int8"}
    assert {r["R"] for r in rows if r["op"] == "linear"} == {16, 48}
    assert all(r.get("ok") for r in rows), [r for r in rows if not r.get("ok")]


@pytest.mark.slow
def test_step_bench_and_memory_parts_measure(session):
    results = session[2]
    assert [r["batch"] for r in results["step"]["rows"]] == [1, 4]
    assert all(r["ok"] and r["step_s"] > 0 for r in results["step"]["rows"])
    assert {r["backend"] for r in results["bench"]["rows"]} >= {"torch-bf16", "triton"}
    memory = results["memory"]["rows"]
    assert [(r["mode"], r["num_outputs"], r["images"]) for r in memory] == [
        ("small", 1, 1),
        ("small", 4, 4),
        ("fast", 1, 1),
        ("fast", 4, 4),
    ]
    assert all(r["traced_peak_allocated_bytes"] > 0 for r in memory)


@pytest.mark.slow
def test_compile_part_matches_the_reference(session):
    rows = session[2]["compile"]["rows"]
    assert rows and all(r.get("ok") for r in rows), rows
