"""The warp-specialized sm_90 GEMM (engine/kernels/triton/gemm_sm90_ws.py, Gluon) compiled for
sm_90 and its PTX executed by the PTX interpreter (tests/ptx_exec.py with the sm_90 instructions
of tests/ptx_sm90.py: TMA from tensor maps built here, mbarriers, named barriers, wgmma with
shared-memory descriptors), against the reference backend.

Gluon kernels do not run under TRITON_INTERPRET, so this is their only execution without a GPU.
The machine runs the producer as soon as a slot is freed (tests/ptx_exec.CTA.run), so a consumer
that frees a slot before its MMAs or its scale reads are done sees the next group's data; a
broken variant (the slot released before the MMA wait) shows that this is caught.

Inputs are exact (power-of-two scales, small integer codes and low-rank factors), so every
product and sum is exact in fp32 in both the kernel and the reference: the comparison is exact.
Shapes: M = 100 (one tile of 128 rows, partly empty), N = 144 (two column tiles, the second
mostly past N), K = 384 (six groups through a four-slot ring, so slots are reused), rank 20
(masked to 32), signed and unsigned activations.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine.kernels import reference

from .ptx_exec import GlobalMemory, launch, parse
from .ptx_sm90 import TensorMap
from .test_ptx_exec_triton import exact_gemm_inputs

ROOT = Path(__file__).resolve().parents[1]
M, N, K, R = 100, 144, 384, 20

_COMPILE = """
import json, sys
sys.path.insert(0, "scripts")
import torch
from engine.kernels.triton import gemm_sm90_ws as ws
from perfmodel.hopper_ws import compile_gluon
from perfmodel.launches import _meta
m, k, n, r, unsigned = json.loads(sys.argv[1])
g = k // 64
w = ws.WsWeight(_meta(n, k, dtype=torch.float8_e4m3fn), _meta(g, n // 16, 4, 2, 2, dtype=torch.float32),
                _meta(g, n // 2, 2, 2, dtype=torch.float32))
args, kwargs, grid = ws.launch_args(_meta(m, k // 2, dtype=torch.uint8), _meta(g, m, dtype=torch.float32).t(), w,
    _meta(m, r, dtype=torch.float32), _meta(n, r), _meta(n), _meta(m, n, dtype=torch.float32), unsigned=unsigned)
kernel = compile_gluon(ws.w4a4_gemm_sm90_ws_kernel, args, kwargs)
fn = ws.w4a4_gemm_sm90_ws_kernel
const = [name for name, p in zip(fn.arg_names, fn.params) if p.is_constexpr]
print(json.dumps({"ptx": kernel.asm["ptx"], "shared": kernel.metadata.shared, "grid": grid,
                  "threads": kernel.metadata.num_warps * 32, "constexprs": const}))
"""


def compile_ws(unsigned: bool) -> dict:
    """The kernel's PTX for sm_90 at the test shape (a child process: no TRITON_INTERPRET)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT)
    res = subprocess.run(
        [sys.executable, "-c", _COMPILE, json.dumps([M, K, N, R, unsigned])],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def compiled() -> dict:
    return {u: compile_ws(u) for u in (False, True)}


def run_ws(info: dict, inputs: dict, unsigned: bool, ptx: str | None = None, schedule: str = "lowest_pc"):
    """Execute the compiled kernel on ``inputs``: (findings, output)."""
    from engine.kernels.triton import gemm_sm90, gemm_sm90_ws

    weight = gemm_sm90_ws.prepare_weight(gemm_sm90.prepare_weight(inputs["qweight"], inputs["wscales"]))
    mem = GlobalMemory()

    def put(name: str, t: torch.Tensor) -> int:
        return mem.alloc(name, t.contiguous().view(-1).view(torch.uint8).numpy(), readonly=True)

    g = K // 64
    sa = inputs["ascales"].t().contiguous()  # [G, M] (group-major storage)
    x_addr, w_addr = put("qx", inputs["qx"]), put("w8", weight.w8)
    sa_addr, sw_addr, wc_addr = put("ascales", sa), put("wscales", weight.wscales), put("swc", weight.swc)
    la_addr, up_addr = put("lora_act", inputs["lora_act"]), put("proj_up", inputs["proj_up"])
    b_addr = put("bias", inputs["bias"])
    out_addr = mem.alloc("out", M * N * 4)
    cfg = gemm_sm90_ws.CONFIG
    maps = {
        "x": TensorMap(x_addr, 1, (K // 2, M), (1, K // 2), (32, cfg.block_m), 32),
        "w": TensorMap(w_addr, 1, (K, N), (1, K), (32, cfg.block_n), 32),
        "sa": TensorMap(sa_addr, 4, (g * M,), (4,), (cfg.block_m,)),
        "sw": TensorMap(sw_addr, 4, (g * N,), (4,), (cfg.block_n,)),
        "wc": TensorMap(wc_addr, 4, (2 * g * N,), (4,), (2 * cfg.block_n,)),
    }
    handles = {name: (1 << 60) + 128 * i for i, name in enumerate(maps)}
    args = [
        handles["x"], M, K // 2, K // 2, 1,
        handles["w"], N, K, K, 1,
        handles["sa"], g * M, 1,
        handles["sw"], g * N, 1,
        handles["wc"], 2 * g * N, 1,
        la_addr, up_addr, b_addr, out_addr,
        M, N, K, R, R, R, N,
    ]  # fmt: skip
    kernel = parse(ptx or info["ptx"])
    args += [0] * (len(kernel.params) - len(args))  # Triton's scratch pointers (unused here)
    findings = launch(kernel, mem, args, (info["grid"][0], 1, 1), info["threads"], info["shared"],
                      tmaps={handles[k]: v for k, v in maps.items()}, schedule=schedule)  # fmt: skip
    out = torch.from_numpy(mem.get("out").view("float32").reshape(M, N).copy())
    return findings, out, mem.written("out")


def _want(inputs: dict, unsigned: bool) -> torch.Tensor:
    return reference.w4a4_gemm(
        inputs["qx"], inputs["ascales"], inputs["qweight"], inputs["wscales"], inputs["lora_act"],
        inputs["proj_up"], inputs["bias"], unsigned=unsigned, out_dtype=torch.float32,
    )  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize(
    "unsigned, schedule", [(False, "lowest_pc"), (False, "high_warpgroup_first"), (True, "high_warpgroup_first")]
)
def test_compiled_ws_kernel_matches_reference(compiled, unsigned, schedule):
    """Exact against the reference, with the consumers first (the producer one slot ahead) and
    with the producer first (the ring full, every slot refilled as soon as it is freed)."""
    inputs = exact_gemm_inputs(M, K, N, R, unsigned)
    findings, out, written = run_ws(compiled[unsigned], inputs, unsigned, schedule=schedule)
    assert not findings, findings.report()
    assert written.all(), f"{int((~written).sum())} output bytes never written"
    want = _want(inputs, unsigned)
    assert torch.equal(out, want), (out - want).abs().max()


@pytest.mark.slow
def test_slot_released_before_the_mma_wait_is_caught(compiled):
    """The consumer's empty-barrier arrive moved above its wgmma wait: the producer refills the
    slot while the MMAs still read it, and the result is wrong."""
    ptx = compiled[False]["ptx"]
    lines = ptx.splitlines()
    arrives = [i for i, t in enumerate(lines) if "mbarrier.arrive.shared::cta.b64" in t]
    waits = [i for i, t in enumerate(lines) if "wgmma.wait_group.sync.aligned 0" in t]
    assert arrives and waits
    for a in arrives:  # move each release just before the wgmma wait that precedes it
        w = max(i for i in waits if i < a)
        lines.insert(w, lines.pop(a))
    inputs = exact_gemm_inputs(M, K, N, R, False)
    _, out, _ = run_ws(compiled[False], inputs, False, ptx="\n".join(lines), schedule="high_warpgroup_first")
    assert not torch.equal(out, _want(inputs, False))
