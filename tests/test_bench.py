"""scripts/bench.py runs on CPU (tiny shapes) and writes its JSON: CI keeps it from rotting."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# Each test runs bench.py in a subprocess: seconds each.
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent


def run_bench(mode: str, tmp_path: Path, **env: str) -> tuple[dict, str]:
    """``bench.py --mode MODE --device cpu --json``: (the JSON, stdout)."""
    out = tmp_path / f"{mode}.json"
    cmd = [
        sys.executable,
        str(ROOT / "scripts" / "bench.py"),
        "--mode",
        mode,
        "--device",
        "cpu",
        "--json",
        str(out),
    ]
    res = subprocess.run(
        cmd, env={**os.environ, **env}, capture_output=True, text=True, timeout=300, cwd=ROOT
    )
    assert res.returncode == 0, res.stderr
    return json.loads(out.read_text()), res.stdout


def test_kernel_bench_runs_and_writes_json(tmp_path):
    data, stdout = run_bench("kernels", tmp_path, TRITON_INTERPRET="1")
    assert data["environment"]["device_type"] == "cpu" and data["environment"]["torch"]
    backends = {r["backend"] for r in data["results"]}
    assert backends == {"torch-bf16", "reference", "triton"}
    for r in data["results"]:
        assert r["median_ms"] > 0 and r["TOPS"] > 0 and r["weight_bytes"] > 0
        assert r["p20_ms"] <= r["median_ms"] <= r["p80_ms"]
    w4 = next(r for r in data["results"] if r["backend"] == "reference")
    bf16 = next(r for r in data["results"] if r["backend"] == "torch-bf16")
    # 4-bit codes + scales + the rank-32 branch, which at 128 x 128 is most of it.
    assert w4["weight_bytes"] == 128 * 64 + 128 * 2 * 2 + 256 * 32 * 2 + 128 * 2 * 2 < bf16["weight_bytes"]
    assert "| 128 | 128 | 64 | reference |" in stdout


def test_e2e_bench_runs_on_cpu(tmp_path):
    base, ours = run_bench("e2e", tmp_path)[0]["results"]
    assert base["bytes_per_param"] == 4.0 and ours["bytes_per_param"] < base["bytes_per_param"]
    assert ours["checkpoint_bytes"] > 0 and ours["load_seconds"] > 0 and ours["seconds_per_image"] > 0
    assert ours["ratio_to_16bit"] == base["seconds_per_image"] / ours["seconds_per_image"]


def test_lora_bench_runs_on_cpu(tmp_path):
    rows = run_bench("lora", tmp_path)[0]["results"]
    assert [r["lora"] for r in rows] == ["none", "rank 16", "rank 64", "swap r64 -> r16"]
    assert all(r["apply_s"] > 0 and r["parse_s"] > 0 for r in rows[1:3]) and rows[3]["swap_s"] > 0
