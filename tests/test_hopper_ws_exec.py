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
(masked to 32), signed and unsigned activations. The split grid (gemm_sm90_ws_split) and the
second kernel that sums its slices run one after the other on the same memory: M = 200, N = 144,
K = 704, one whole tile and three tiles in slices of 5, 5 and 1 groups, CTAs in reverse order.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from engine.kernels import reference

from .ptx_compile import run_compiled
from .ptx_exec import GlobalMemory, launch, parse
from .ptx_sm90 import TensorMap
from .test_ptx_exec_triton import exact_gemm_inputs

ROOT = Path(__file__).resolve().parents[1]
SHAPE = (100, 144, 384, 20)  # M, N, K, R
SMALL = (128, 128, 128, 0)  # whole tiles, two groups (fewer than the ring's slots), no low-rank branch

_COMPILE = """
import json, sys
sys.path.insert(0, "scripts")
import torch
from engine.kernels.triton import gemm_sm90_ws as ws
from perfmodel.hopper_ws import compile_gluon
from perfmodel.launches import _meta
from engine.kernels.triton import gemm_sm90_ws_split as sp
from perfmodel.sass import triton_kernel
m, k, n, r, unsigned, bias, split = json.loads(sys.argv[1])
g = k // 64
w = ws.WsWeight(_meta(n, k, dtype=torch.float8_e4m3fn), _meta(g, n // 16, 4, 2, 2, dtype=torch.float32),
                _meta(g, n // 2, 2, 2, dtype=torch.float32))
split = sp.Split(*split) if split else None
tiles = -(-m // 128) * -(-n // 128)
space = _meta(*sp.workspace_shape(tiles, split, 128, 128), dtype=torch.float32) if split else None
out = _meta(m, n, dtype=torch.float32)
args, kwargs, grid = ws.launch_args(_meta(m, k // 2, dtype=torch.uint8), _meta(g, m, dtype=torch.float32).t(), w,
    _meta(m, r, dtype=torch.float32), _meta(n, r), _meta(n) if bias else None, out,
    unsigned=unsigned, split=split, workspace=space)
kernel = compile_gluon(ws.w4a4_gemm_sm90_ws_kernel, args, kwargs)


def runtime(fn, args):
    return [name for name, p, a in zip(fn.arg_names, fn.params, args)
            if not p.is_constexpr and not (isinstance(a, int) and a == 1)]


info = {"ptx": kernel.asm["ptx"], "shared": kernel.metadata.shared, "grid": grid,
        "threads": kernel.metadata.num_warps * 32, "runtime_args": runtime(ws.w4a4_gemm_sm90_ws_kernel, args),
        "split_values": {name: a for name, a in zip(ws.w4a4_gemm_sm90_ws_kernel.arg_names, args)
                         if name in ("FULL", "SLICES", "SLICE_G")}}
if split:
    sargs, skw, sgrid = sp.sum_slices_args(space, _meta(n) if bias else None, out, split, group_m=kwargs["GROUP_M"])
    sk = triton_kernel(sp._sum_slices_kernel, sargs, skw, 90)
    info["sum"] = {"ptx": sk.asm["ptx"], "shared": sk.metadata.shared, "grid": sgrid,
                   "threads": sk.metadata.num_warps * 32, "runtime_args": runtime(sp._sum_slices_kernel, sargs)}
print(json.dumps(info))
"""


def compile_ws(shape: tuple, unsigned: bool, bias: bool = True, split: tuple | None = None) -> dict:
    """The kernel's PTX for sm_90 at ``shape`` (a child process: no TRITON_INTERPRET), and the
    kernel arguments that stay runtime parameters (Triton makes integers equal to 1 constants);
    with ``split`` (gemm_sm90_ws_split.Split's fields), the split grid and the sum's PTX too."""
    m, n, k, r = shape
    res = run_compiled([sys.executable, "-c", _COMPILE, json.dumps([m, k, n, r, unsigned, bias, split])])
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def compiled() -> dict:
    return {u: compile_ws(SHAPE, u) for u in (False, True)}


def run_ws(info: dict, inputs: dict, unsigned: bool, ptx: str | None = None, schedule: str = "lowest_pc",
           reverse: bool = False, first: dict | None = None):
    """Execute the compiled kernel on ``inputs`` (its CTAs in reverse order if ``reverse``), then
    the sum of the slices if ``info`` has one: (findings, output, bytes of it written); the bytes
    of the output the first launch wrote go to ``first["written"]``."""
    from engine.kernels.triton import gemm_sm90, gemm_sm90_ws

    weight = gemm_sm90_ws.prepare_weight(gemm_sm90.prepare_weight(inputs["qweight"], inputs["wscales"]))
    mem = GlobalMemory()

    def put(name: str, t: torch.Tensor) -> int:
        return mem.alloc(name, t.contiguous().view(-1).view(torch.uint8).numpy(), readonly=True)

    M, K = inputs["qx"].shape[0], 2 * inputs["qx"].shape[1]
    N, R = inputs["qweight"].shape[0], inputs["lora_act"].shape[1]
    g = K // 64
    sa = inputs["ascales"].t().contiguous()  # [G, M] (group-major storage)
    x_addr, w_addr = put("qx", inputs["qx"]), put("w8", weight.w8)
    sa_addr, sw_addr, wc_addr = put("ascales", sa), put("wscales", weight.wscales), put("swc", weight.swc)
    la_addr, up_addr = put("lora_act", inputs["lora_act"]), put("proj_up", inputs["proj_up"])
    out_addr = mem.alloc("out", M * N * 4)
    b_addr = put("bias", inputs["bias"]) if inputs["bias"] is not None else out_addr
    # the workspace starts as NaN (0xFF bytes): a partial read before it is written shows
    ws_addr = mem.alloc("workspace", 4 * 128 * 128 * info["grid"][0]) if "sum" in info else out_addr
    cfg = gemm_sm90_ws.CONFIG
    maps = {
        "x": TensorMap(x_addr, 1, (K // 2, M), (1, K // 2), (32, cfg.block_m), 32),
        "w": TensorMap(w_addr, 1, (K, N), (1, K), (32, cfg.block_n), 32),
        "sa": TensorMap(sa_addr, 4, (g * M,), (4,), (cfg.block_m,)),
        "sw": TensorMap(sw_addr, 4, (g * N,), (4,), (cfg.block_n,)),
        "wc": TensorMap(wc_addr, 4, (2 * g * N,), (4,), (2 * cfg.block_n,)),
    }
    handles = {name: (1 << 60) + 128 * i for i, name in enumerate(maps)}
    # a tensor descriptor is its map, its sizes and its strides (outermost first)
    desc = {
        "x_desc": [handles["x"], M, K // 2, K // 2, 1],
        "w_desc": [handles["w"], N, K, K, 1],
        "sa_desc": [handles["sa"], g * M, 1],
        "sw_desc": [handles["sw"], g * N, 1],
        "wc_desc": [handles["wc"], 2 * g * N, 1],
    }
    value = {"lora_ptr": la_addr, "up_ptr": up_addr, "bias_ptr": b_addr, "out_ptr": out_addr, "M": M, "N": N,
             "K": K, "R": R, "stride_lm": R, "stride_un": R, "stride_om": N, "ws_ptr": ws_addr,
             **info.get("split_values", {})}  # fmt: skip
    args = [x for name in info["runtime_args"] for x in desc.get(name, [value.get(name)])]
    kernel = parse(ptx or info["ptx"])
    args += [0] * (len(kernel.params) - len(args))  # Triton's scratch pointers (unused here)
    grid = (info["grid"][0], 1, 1)
    ctas = [(x, 0, 0) for x in range(grid[0])][:: -1 if reverse else 1]
    findings = launch(kernel, mem, args, grid, info["threads"], info["shared"], ctas=ctas,
                      tmaps={handles[k]: v for k, v in maps.items()}, schedule=schedule)  # fmt: skip
    if first is not None:
        first["written"] = mem.written("out").copy()
    if "sum" in info:  # the second launch, on the same stream: after every CTA of the first
        s = info["sum"]
        sargs = [value[name] for name in s["runtime_args"]]
        skernel = parse(s["ptx"])
        sargs += [0] * (len(skernel.params) - len(sargs))
        sgrid = (*s["grid"], 1)
        found = launch(skernel, mem, sargs, sgrid, s["threads"], s["shared"])
        for f in found.items:
            findings.add(f.kind, f.pc, f.line, f"(the sum) {f.detail}")
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
    m, n, k, r = SHAPE
    inputs = exact_gemm_inputs(m, k, n, r, unsigned)
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
    m, n, k, r = SHAPE
    inputs = exact_gemm_inputs(m, k, n, r, False)
    _, out, _ = run_ws(compiled[False], inputs, False, ptx="\n".join(lines), schedule="high_warpgroup_first")
    assert not torch.equal(out, _want(inputs, False))


@pytest.mark.slow
def test_compiled_ws_kernel_without_low_rank_or_bias():
    """Rank 0 and no bias (their branches compiled out), whole tiles, two groups through the
    four-slot ring (the producer stops early)."""
    m, n, k, r = SMALL
    inputs = exact_gemm_inputs(m, k, n, r, False)
    inputs["bias"] = None
    info = compile_ws(SMALL, False, bias=False)
    findings, out, written = run_ws(info, inputs, False, schedule="high_warpgroup_first")
    assert not findings, findings.report()
    assert written.all()
    assert torch.equal(out, _want(inputs, False))


SPLIT_SHAPE = (200, 144, 704, 20)  # 2 x 2 tiles (the second row and column partial), 11 groups
SPLIT = (1, 3, 5)  # tile 0 over the whole K; tiles 1-3 in slices of 5, 5 and 1 groups (9 CTAs)


@pytest.mark.slow
@pytest.mark.parametrize("unsigned", [False, True])
def test_compiled_split_kernel_and_its_sum_match_the_reference(unsigned):
    """The K-sliced grid (gemm_sm90_ws_split) and the sum of its slices, both compiled for sm_90,
    executed with the CTAs in reverse order (slices before the whole tile, the last slice
    first): exact against the reference, so the low-rank branch and the bias are counted once;
    the GEMM itself writes only the whole-K tile of the output, the sum the rest."""
    m, n, k, r = SPLIT_SHAPE
    info = compile_ws(SPLIT_SHAPE, unsigned, split=SPLIT)
    full, slices, per = SPLIT
    assert info["grid"] == [full + 3 * slices] and "sum" in info
    assert info["split_values"] == {"FULL": full, "SLICES": slices, "SLICE_G": per}
    inputs = exact_gemm_inputs(m, k, n, r, unsigned)
    first = {}
    findings, out, written = run_ws(info, inputs, unsigned, schedule="high_warpgroup_first", reverse=True,
                                    first=first)  # fmt: skip
    assert not findings, findings.report()
    assert written.all(), f"{int((~written).sum())} output bytes never written"
    by_gemm = torch.from_numpy(first["written"]).view(m, n, 4).all(dim=2)
    want_gemm = torch.zeros(m, n, dtype=torch.bool)
    want_gemm[:128, :128] = True  # tile 0 (grouped order: row block 0, column block 0)
    assert torch.equal(by_gemm, want_gemm)
    want = _want(inputs, unsigned)
    assert torch.equal(out, want), (out - want).abs().max()
