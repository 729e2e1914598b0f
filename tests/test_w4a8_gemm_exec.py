"""The W4A8 sm_90 GEMM (engine/kernels/triton/gemm_sm90_w4a8.py, Gluon) compiled for sm_90 and its
PTX executed by the PTX interpreter (tests/ptx_exec.py with the sm_90 instructions of
tests/ptx_sm90.py: TMA from tensor maps built here, mbarriers, named barriers, wgmma with the A
operand in registers), against the definer ``ops.w4a8_gemm`` bit for bit.

Gluon kernels do not run under TRITON_INTERPRET, so this is their only execution without a GPU.
Inputs are exact (``gemm_sm90_w4a8.exact_inputs``: e4m3 activation codes |a| <= 4 in steps of
1/4, weight codes -7..7, power-of-two scales, small integer low-rank factors and bias), so every
group's sum is exact in fp32 and the comparison is exact. The weight goes through the real
``prepare_weight`` (the sign-magnitude packing the kernel expands in registers).

Shape: M = 100 tokens (one tile of 128, partly empty), N = 292 (two weight tiles of 192 rows,
the second mostly past N), K = 384 (six groups through the four-slot ring, so slots are reused),
rank 20 (masked to 32), with bias; both thread orders (consumers first, producer first). Then
the persistent grid (one CTA running all tiles of M = 200: the ring across tiles), the rank-0
bf16 variant, and a kernel with a moved wgmma wait, which must fail.
"""

from __future__ import annotations

import json
import sys

import pytest
import torch

from engine.kernels.triton import gemm_sm90_w4a8 as w4a8
from engine.quant import ops

from .ptx_compile import run_compiled
from .ptx_exec import GlobalMemory, launch, parse
from .ptx_sm90 import TensorMap

SHAPE = (100, 292, 384, 20)  # M, N, K, R

_COMPILE = """
import json, sys
sys.path.insert(0, "scripts")
import torch
from perfmodel.hopper_w4a8_static import compile_w4a8, w4a8_launch
m, k, n, r, bias, dtype, programs = json.loads(sys.argv[1])
dtype = getattr(torch, dtype)
args, kwargs, grid = w4a8_launch(m, k, n, rank=r, bias=bias, out_dtype=dtype, programs=programs)
kernel = compile_w4a8(m, k, n, rank=r, bias=bias, out_dtype=dtype)
fn = __import__("engine.kernels.triton.gemm_sm90_w4a8", fromlist=["x"]).w4a8_gemm_sm90_kernel
runtime = [name for name, p, a in zip(fn.arg_names, fn.params, args)
           if not p.is_constexpr and not (isinstance(a, int) and a == 1)]
print(json.dumps({"ptx": kernel.asm["ptx"], "shared": kernel.metadata.shared, "grid": grid,
                  "threads": kernel.metadata.num_warps * 32, "runtime_args": runtime}))
"""


def compile_w4a8(shape: tuple, bias: bool = True, dtype: str = "float32", programs: int | None = None) -> dict:
    """The kernel's PTX for sm_90 at ``shape`` (a child process: no TRITON_INTERPRET) and the
    arguments that stay runtime parameters (Triton makes integers equal to 1 constants);
    ``programs``: the persistent grid's size (fewer CTAs than tiles)."""
    m, n, k, r = shape
    res = run_compiled([sys.executable, "-c", _COMPILE, json.dumps([m, k, n, r, bias, dtype, programs])])
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def compiled() -> dict:
    return compile_w4a8(SHAPE)


def run_w4a8(info: dict, x: dict, ptx: str | None = None, schedule: str = "lowest_pc",
             dtype: torch.dtype = torch.float32):
    """Execute the compiled kernel on the contract inputs ``x``: (findings, output, bytes written)."""
    weight = w4a8.prepare_weight(x["qweight"], x["wscales"])
    assert weight is not None
    mem = GlobalMemory()

    def put(name: str, t: torch.Tensor) -> int:
        return mem.alloc(name, t.contiguous().view(-1).view(torch.uint8).numpy(), readonly=True)

    M, K = x["codes"].shape
    N, R = x["qweight"].shape[0], x["lora_act"].shape[1]
    g = K // 64
    cfg = w4a8.CONFIG
    a_addr, w_addr, sw_addr = put("codes", x["codes"]), put("packed", weight.packed), put("sw", weight.sw)
    size = torch.empty(0, dtype=dtype).element_size()
    out_addr = mem.alloc("out", M * N * size)
    b_addr = put("bias", x["bias"]) if x["bias"] is not None else out_addr
    maps = {
        "w": TensorMap(w_addr, 1, (K // 2, N), (1, K // 2), (32, 64), 32),
        "a": TensorMap(a_addr, 1, (K, M), (1, K), (32, cfg.block_t), 32),
        "sw": TensorMap(sw_addr, 4, (g * N,), (4,), (64,)),
    }
    handles = {name: (1 << 60) + 128 * i for i, name in enumerate(maps)}
    desc = {  # a tensor descriptor is its map, its sizes and its strides (outermost first)
        "w_desc": [handles["w"], N, K // 2, K // 2, 1],
        "a_desc": [handles["a"], M, K, K, 1],
        "sw_desc": [handles["sw"], g * N, 1],
    }
    value = {"ascale_ptr": put("ascale", x["ascale"]), "lora_ptr": put("lora_act", x["lora_act"]),
             "up_ptr": put("proj_up", x["proj_up"]), "bias_ptr": b_addr, "out_ptr": out_addr, "M": M, "N": N,
             "K": K, "R": R, "ws_ptr": out_addr,  # no split: FULL = every tile, no workspace
             "FULL": -(-M // cfg.block_t) * -(-N // cfg.block_w)}  # fmt: skip
    args = [v for name in info["runtime_args"] for v in desc.get(name, [value.get(name)])]
    kernel = parse(ptx or info["ptx"])
    args += [0] * (len(kernel.params) - len(args))  # Triton's scratch pointers (unused here)
    findings = launch(kernel, mem, args, (info["grid"][0], 1, 1), info["threads"], info["shared"],
                      tmaps={handles[k]: v for k, v in maps.items()}, schedule=schedule)  # fmt: skip
    out = torch.from_numpy(mem.get("out").copy()).view(dtype).reshape(M, N)
    return findings, out, mem.written("out")


def _want(x: dict, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return ops.w4a8_gemm(x["codes"], x["ascale"], x["qweight"], x["wscales"], x["lora_act"], x["proj_up"],
                         x["bias"], out_dtype=dtype)  # fmt: skip


@pytest.mark.parametrize("schedule", ["lowest_pc", pytest.param("high_warpgroup_first", marks=pytest.mark.slow)])
def test_compiled_w4a8_kernel_matches_ops_bit_for_bit(compiled, schedule):
    """Exact against ops.w4a8_gemm with the consumers first (the producer one slot ahead) and
    with the producer first (the ring full, every slot refilled as soon as it is freed); no
    out-of-bounds, racy or uninitialized access; every output element written."""
    m, n, k, r = SHAPE
    assert compiled["threads"] == 512 and compiled["grid"] == [2]  # 3 consumer warpgroups + producer
    x = w4a8.exact_inputs(m, n, k, r)
    findings, out, written = run_w4a8(compiled, x, schedule=schedule)
    assert not findings, findings.report()
    assert written.all(), f"{int((~written).sum())} output bytes never written"
    want = _want(x)
    assert want.abs().max() > 0 and torch.equal(out, want), (out - want).abs().max()


@pytest.mark.slow
def test_slot_released_before_the_mma_wait_is_caught(compiled):
    """The consumers' wgmma wait moved below their empty-barrier arrive: the producer refills the
    slot while the MMAs still read it, and the result is wrong (the check above can fail)."""
    lines = compiled["ptx"].splitlines()
    arrives = [i for i, t in enumerate(lines) if "mbarrier.arrive.shared::cta.b64" in t]
    assert len(arrives) == 3  # one per consumer warpgroup
    for a in arrives:  # each loop's wgmma wait (the last before its release) moved just after it
        w = max(i for i, t in enumerate(lines[:a]) if "wgmma.wait_group.sync.aligned 0" in t)
        lines.insert(a, lines.pop(w))
    m, n, k, r = SHAPE
    x = w4a8.exact_inputs(m, n, k, r)
    _, out, _ = run_w4a8(compiled, x, ptx="\n".join(lines), schedule="high_warpgroup_first")
    assert not torch.equal(out, _want(x))


@pytest.mark.slow
def test_compiled_w4a8_kernel_without_low_rank_or_bias_in_bf16():
    """Rank 0 and no bias (their branches compiled out), bf16 output (one rounding, as the
    reference's), whole tiles, two groups through the four-slot ring (the producer stops early)."""
    m, n, k, r = 128, 192, 128, 0
    info = compile_w4a8((m, n, k, r), bias=False, dtype="bfloat16")
    x = w4a8.exact_inputs(m, n, k, r)
    x["bias"] = None
    findings, out, written = run_w4a8(info, x, schedule="high_warpgroup_first", dtype=torch.bfloat16)
    assert not findings, findings.report()
    assert written.all()
    want = _want(x, torch.bfloat16)
    assert want.abs().max() > 0 and torch.equal(out, want)


@pytest.mark.slow  # seconds of compiling (and PTX interpretation): CI runs it, -m 'not slow' skips it
def test_persistent_grid_runs_every_tile_through_one_ring():
    """One CTA for all four tiles (2 x 2, the last of each partial): the ring's slots and phases
    run on from tile to tile, each consumer restages its low-rank operands, scales and bias per
    tile; exact against ops.w4a8_gemm, no racy access (e.g. a restage over the last tile's
    epilogue reads), every output written."""
    m, n, k, r = 200, 292, 384, 20
    info = compile_w4a8((m, n, k, r), programs=1)
    assert info["grid"] == [1]
    x = w4a8.exact_inputs(m, n, k, r)
    findings, out, written = run_w4a8(info, x, schedule="high_warpgroup_first")
    assert not findings, findings.report()
    assert written.all()
    assert torch.equal(out, _want(x))
