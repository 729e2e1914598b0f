"""Split-K of the last partial wave of the W4A8 sm_90 GEMM (engine/kernels/triton/gemm_sm90_w4a8.py
with gemm_sm90_ws_split's plan and sum): the plan, the sum of the [n, t] slices under
TRITON_INTERPRET, the dispatch's device checks, and the compiled sm_90 PTX of the split grid and
of the sum executed by the PTX interpreter (tests/ptx_exec.py, tests/ptx_sm90.py) against the
definer ``ops.w4a8_gemm`` bit for bit on exact inputs (``gemm_sm90_w4a8.exact_inputs``).
"""

from __future__ import annotations

import json
import sys

import pytest
import torch
import triton

from engine.kernels.triton import gemm_sm90_w4a8 as w4a8
from engine.kernels.triton.gemm_sm90_ws_split import Split, plan_split, sum_slices, workspace_shape
from engine.quant import ops

from .ptx_compile import run_compiled
from .ptx_exec import GlobalMemory, launch, parse
from .ptx_sm90 import TensorMap


def test_plan_splits_the_n3072_last_waves_at_flux_size():
    """At M = 4352 on 132 SMs the N = 3072 shapes run 544 tiles of 192 x 128 (4 waves and 16
    tiles): those 16 in 8 slices; the other FLUX shapes' last waves are too full to pay (48 or 64
    tiles: two slices of 24 groups save 24 < MIN_SAVED_GROUPS) or whole; at M = 4096 (the double
    blocks) 512 tiles leave 116, which one more slice cannot hold."""
    assert w4a8.plan(4352, 3072, 15360, 132) == Split(full=528, slices=8, slice_groups=30)
    assert w4a8.plan(4352, 3072, 12288, 132) == Split(full=528, slices=8, slice_groups=24)
    assert w4a8.plan(4352, 3072, 3072, 132) == Split(full=528, slices=8, slice_groups=6)
    for n, k in ((9216, 3072), (12288, 3072), (21504, 3072)):
        assert w4a8.plan(4352, n, k, 132) is None, (n, k)
    assert w4a8.plan(4096, 3072, 3072, 132) is None and w4a8.plan(4096, 3072, 12288, 132) is None
    # 3072 -> 9216: 48 remainder tiles in two slices of 24 groups save 24 (the model prices it slower)
    assert plan_split(1632, 48, 132, min_saved=24) == Split(full=1584, slices=2, slice_groups=24)
    assert plan_split(1632, 48, 132, min_saved=w4a8.MIN_SAVED_GROUPS) is None


def test_plan_split_cuts_slices_the_kernel_can_rebuild():
    """The kernel takes no slice width: it cuts ceil(G / slices) groups per slice, which must be
    plan_split's width for every plan (and the launch refuses a split that is not)."""
    for groups in range(1, 70):
        for rem in range(1, 40):
            s = plan_split(132 + rem, groups, 132, min_saved=0)
            if s is not None:
                assert s.slice_groups == triton.cdiv(groups, s.slices), (groups, rem, s)
                assert (s.slices - 1) * s.slice_groups < groups  # no empty slice
    x = w4a8.exact_inputs(200, 292, 384, 4)
    weight = w4a8.prepare_weight(x["qweight"], x["wscales"])
    out = torch.empty(200, 292)
    space = torch.empty(workspace_shape(4, Split(1, 3, 3), 192, 128))
    with pytest.raises(ValueError, match="plan_split cut"):
        w4a8.launch_args(x["codes"], x["ascale"], weight, x["lora_act"], x["proj_up"], None, out,
                         split=Split(1, 3, 3), workspace=space)  # fmt: skip
    with pytest.raises(ValueError, match="workspace"):  # sized for another split
        w4a8.launch_args(x["codes"], x["ascale"], weight, x["lora_act"], x["proj_up"], None, out,
                         split=Split(2, 3, 2), workspace=space)  # fmt: skip


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
def test_sum_of_transposed_slices_adds_them_in_slice_order_then_the_bias(out_dtype):
    """The sum (TRITON_INTERPRET on a CPU) of [n, t] tiles (192 weight rows x 128 tokens) into
    y[t, n], against ((p0 + p1) + p2) + bias[n] rounded once, with partials where another order
    gives other bits (1 + 2^-24 + 2^-24), on the split tiles of a 3 (n) x 3 (t) grid with
    partial edge tiles, in gemm_sm90_w4a8's grouped order; other elements untouched."""
    m, n, bw, bt = 300, 500, 192, 128
    split = Split(full=5, slices=3, slice_groups=4)
    g = torch.Generator().manual_seed(1)
    space = torch.randn(workspace_shape(9, split, bw, bt), generator=g)
    space[0, 0, 0, 0], space[0, 1, 0, 0], space[0, 2, 0, 0] = 1.0, 2.0**-24, 2.0**-24
    bias = torch.randn(n, generator=g).to(torch.bfloat16)
    bias[384] = 0.0  # tile 5 (the first split one) starts at n = 384, t = 128
    out = torch.full((m, n), 7.0, dtype=out_dtype)
    sum_slices(space, bias, out, split, group_m=8, transposed=True)
    want = torch.full((m, n), 7.0, dtype=out_dtype)
    num_n, num_t = 3, 3
    for q in range(4):
        t = split.full + q  # grouped order (gemm_sm90_w4a8._tile), GROUP_N = 8
        width = 8 * num_t
        first = (t // width) * 8
        size = min(num_n - first, 8)
        on, ot = (first + (t % width) % size) * bw, ((t % width) // size) * bt
        acc = (space[q, 0] + space[q, 1]) + space[q, 2]  # [n, t]
        acc = acc[: min(bw, n - on), : min(bt, m - ot)] + bias[on : on + bw].float()[:, None]
        want[ot : ot + bt, on : on + bw] = acc.t().to(out_dtype)
    assert torch.equal(out, want)
    # tile 5's first element: slice order gives 1, the other grouping 1 + 2^-23
    assert out[128, 384].item() == 1.0
    assert (space[0, 0, 0, 0] + (space[0, 1, 0, 0] + space[0, 2, 0, 0])).item() != 1.0


def test_serves_checks_the_split_grid_at_the_same_first_call(monkeypatch, caplog):
    """Both self-checks run once, at the first ``serves``; a split grid that fails its own is
    logged and ``split_for`` then gives no split (the plain grid serves); where it passes,
    ``split_for`` gives ``plan`` at the device's SM count."""
    tries = []

    def check(device, split=None):
        tries.append(split)
        return split is None or passes

    monkeypatch.setattr(w4a8, "self_check", check)
    monkeypatch.setattr(w4a8, "_sm_count", lambda device: 132)
    cpu = torch.device("cpu")
    for passes in (False, True):
        w4a8._serves.cache_clear()
        tries.clear()
        try:
            assert w4a8.serves(cpu) and tries == [None, w4a8.CHECK_SPLIT]
            assert w4a8.split_for(cpu, 4352, 3072, 15360) == (
                w4a8.plan(4352, 3072, 15360, 132) if passes else None
            )
            assert w4a8.split_for(cpu, 4352, 21504, 3072) is None  # none planned
            assert len(tries) == 2  # cached: no check launches after the first call
        finally:
            w4a8._serves.cache_clear()
    assert "split-K grid" in caplog.text and "plain grid" in caplog.text


_COMPILE = """
import json, sys
sys.path.insert(0, "scripts")
import torch
from engine.kernels.triton import gemm_sm90_w4a8 as w4a8, gemm_sm90_ws_split as sp
from perfmodel.hopper_w4a8_static import compile_gluon, w4a8_launch
from perfmodel.launches import _meta
from perfmodel.sass import triton_kernel
m, k, n, r, split, programs = json.loads(sys.argv[1])
split = sp.Split(*split)
args, kwargs, grid = w4a8_launch(m, k, n, rank=r, bias=True, out_dtype=torch.float32, programs=programs, split=split)
kernel = compile_gluon(w4a8.w4a8_gemm_sm90_kernel, args, kwargs)
tiles = -(-m // 128) * -(-n // 192)
space = _meta(*sp.workspace_shape(tiles, split, 192, 128), dtype=torch.float32)
sargs, skw, sgrid = sp.sum_slices_args(space, _meta(n), _meta(m, n, dtype=torch.float32), split,
                                       group_m=kwargs["GROUP_N"], transposed=True)
sk = triton_kernel(sp._sum_slices_kernel, sargs, skw, 90)

def runtime(fn, args):
    return [name for name, p, a in zip(fn.arg_names, fn.params, args)
            if not p.is_constexpr and not (isinstance(a, int) and a == 1)]

print(json.dumps({"ptx": kernel.asm["ptx"], "shared": kernel.metadata.shared, "grid": grid,
                  "threads": kernel.metadata.num_warps * 32, "runtime_args": runtime(w4a8.w4a8_gemm_sm90_kernel, args),
                  "sum": {"ptx": sk.asm["ptx"], "shared": sk.metadata.shared, "grid": sgrid,
                          "threads": sk.metadata.num_warps * 32, "runtime_args": runtime(sp._sum_slices_kernel, sargs)}}))
"""

SHAPE = (200, 292, 320, 20)  # M, N, K, R: 2 (n) x 2 (t) tiles, the second of each partial; 5 groups
SPLIT = Split(full=2, slices=2, slice_groups=3)  # tiles 0-1 over all K; tiles 2-3 in slices of 3 and 2 groups


def compile_split(programs: int | None) -> dict:
    m, n, k, r = SHAPE
    arg = json.dumps([m, k, n, r, [SPLIT.full, SPLIT.slices, SPLIT.slice_groups], programs])
    res = run_compiled([sys.executable, "-c", _COMPILE, arg])
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def run_split(info: dict, x: dict, reverse: bool) -> tuple:
    """The split grid (CTAs in reverse order if ``reverse``), then the sum: (findings, output,
    bytes written, bytes of the output the GEMM itself wrote)."""
    weight = w4a8.prepare_weight(x["qweight"], x["wscales"])
    mem = GlobalMemory()

    def put(name: str, t: torch.Tensor) -> int:
        return mem.alloc(name, t.contiguous().view(-1).view(torch.uint8).numpy(), readonly=True)

    M, K = x["codes"].shape
    N, R = x["qweight"].shape[0], x["lora_act"].shape[1]
    g = K // 64
    tiles = triton.cdiv(M, 128) * triton.cdiv(N, 192)
    a_addr, w_addr, sw_addr = put("codes", x["codes"]), put("packed", weight.packed), put("sw", weight.sw)
    out_addr = mem.alloc("out", M * N * 4)
    # the workspace starts as NaN (0xFF bytes): a partial read before it is written shows
    ws_addr = mem.alloc("workspace", 4 * (tiles - SPLIT.full) * SPLIT.slices * 192 * 128)
    maps = {
        "w": TensorMap(w_addr, 1, (K // 2, N), (1, K // 2), (32, 64), 32),
        "a": TensorMap(a_addr, 1, (K, M), (1, K), (32, 128), 32),
        "sw": TensorMap(sw_addr, 4, (g * N,), (4,), (64,)),
    }
    handles = {name: (1 << 60) + 128 * i for i, name in enumerate(maps)}
    desc = {
        "w_desc": [handles["w"], N, K // 2, K // 2, 1],
        "a_desc": [handles["a"], M, K, K, 1],
        "sw_desc": [handles["sw"], g * N, 1],
    }
    value = {"ascale_ptr": put("ascale", x["ascale"]), "lora_ptr": put("lora_act", x["lora_act"]),
             "up_ptr": put("proj_up", x["proj_up"]), "bias_ptr": put("bias", x["bias"]), "out_ptr": out_addr,
             "ws_ptr": ws_addr, "M": M, "N": N, "K": K, "R": R, "FULL": SPLIT.full, "SLICES": SPLIT.slices,
             "stride_om": N}  # fmt: skip
    args = [v for name in info["runtime_args"] for v in desc.get(name, [value.get(name)])]
    kernel = parse(info["ptx"])
    args += [0] * (len(kernel.params) - len(args))
    grid = (info["grid"][0], 1, 1)
    ctas = [(c, 0, 0) for c in range(grid[0])][:: -1 if reverse else 1]
    findings = launch(kernel, mem, args, grid, info["threads"], info["shared"], ctas=ctas,
                      tmaps={handles[k]: v for k, v in maps.items()}, schedule="high_warpgroup_first")  # fmt: skip
    by_gemm = mem.written("out").copy()
    s = info["sum"]
    sargs = [value[name] for name in s["runtime_args"]]
    skernel = parse(s["ptx"])
    sargs += [0] * (len(skernel.params) - len(sargs))
    for f in launch(skernel, mem, sargs, (*s["grid"], 1), s["threads"], s["shared"]).items:
        findings.add(f.kind, f.pc, f.line, f"(the sum) {f.detail}")
    out = torch.from_numpy(mem.get("out").copy()).view(torch.float32).reshape(M, N)
    return findings, out, mem.written("out"), by_gemm


@pytest.mark.slow  # seconds of compiling and PTX interpretation: CI runs it, -m 'not slow' skips it
@pytest.mark.parametrize("programs", [None, 4])
def test_compiled_split_kernel_and_its_sum_match_ops_bit_for_bit(programs):
    """The K-sliced grid and the sum of its slices, both compiled for sm_90: one CTA per work item
    in reverse order (slices before the whole tile, the last slice first), and (slow) a persistent
    grid of 4 CTAs each running whole and sliced items through one ring; exact against
    ops.w4a8_gemm (the low-rank branch and the bias counted once, the token scale per slice), no
    race, out-of-bounds or uninitialized read; the GEMM itself writes only the whole-K tiles."""
    m, n, k, r = SHAPE
    info = compile_split(programs)
    items = SPLIT.full + 2 * SPLIT.slices  # 6
    assert info["grid"] == [programs or items] and info["threads"] == 512
    assert "SLICES" not in info["runtime_args"]  # a constant of the compile
    x = w4a8.exact_inputs(m, n, k, r)
    findings, out, written, by_gemm = run_split(info, x, reverse=programs is None)
    assert not findings, findings.report()
    assert written.all(), f"{int((~written).sum())} output bytes never written"
    want_gemm = torch.zeros(m, n, dtype=torch.bool)
    want_gemm[:128] = True  # tiles 0 and 1 (grouped order: weight blocks 0 and 1 of token block 0)
    assert torch.equal(torch.from_numpy(by_gemm).view(m, n, 4).all(dim=2), want_gemm)
    want = ops.w4a8_gemm(x["codes"], x["ascale"], x["qweight"], x["wscales"], x["lora_act"], x["proj_up"],
                         x["bias"], out_dtype=torch.float32)  # fmt: skip
    assert want.abs().max() > 0 and torch.equal(out, want), (out - want).abs().max()
