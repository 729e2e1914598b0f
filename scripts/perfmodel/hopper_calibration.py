"""The calibration of the dependency model (perfmodel.hopper): Triton's fp8 matmul tutorial
kernel, written out below, compiled for sm_90 with the tutorial's fp8 configs and simulated like
our kernel, against the H100 figures published with it (triton-lang/triton pull request 3546);
the one free parameter, the L2 -> SM bandwidth, is fitted to them. Also the sm_90 compile cache
both use."""

from __future__ import annotations

import math
import re

import torch
import triton
import triton.language as tl

from perfmodel.chain import ctas_per_sm, loop_mma_clocks, loop_time, simulate
from perfmodel.devices import H100
from perfmodel.launches import _meta
from perfmodel.sass import _TYPES, disassemble, specialize, triton_kernel

_TYPES.setdefault(torch.float8_e4m3fn, "fp8e4nv")
DEFAULT_L2 = 32.0  # B/clk/SM: the calibration's fitted value (used with --no-calibration)

# Triton's tutorial fp8 autotuning configs (BLOCK_M, BLOCK_N, BLOCK_K, stages, warps), the ones
# added for fp8 in pull request 3546 and the fp16 ones that also run for fp8.
TUTORIAL_FP8_CONFIGS = [
    (128, 256, 128, 3, 8),
    (256, 128, 128, 3, 8),
    (256, 64, 128, 4, 4),
    (64, 256, 128, 4, 4),
    (128, 128, 128, 4, 4),
    (128, 64, 64, 4, 4),
    (64, 128, 64, 4, 4),
    (128, 32, 64, 4, 4),
    (128, 256, 64, 3, 8),
    (64, 256, 32, 4, 4),
    (128, 128, 32, 4, 4),
    (128, 64, 32, 4, 4),
    (64, 128, 32, 4, 4),
]
# Published H100 TFLOPS of that kernel (pull request 3546), M = N = K.
PUBLISHED_TUTORIAL_FP8_TFLOPS = {
    2048: 280.570111,
    2560: 527.320119,
    3072: 961.241005,
    3200: 1040.650362,
    3328: 1117.226653,
    3456: 1204.430514,
    3584: 1279.934470,
}


@triton.jit
def tutorial_matmul_kernel(
    a_ptr,
    b_ptr,
    c_ptr,
    M,
    N,
    K,
    stride_am,
    stride_ak,
    stride_bk,
    stride_bn,
    stride_cm,
    stride_cn,
    BLOCK_SIZE_M: tl.constexpr,
    BLOCK_SIZE_N: tl.constexpr,
    BLOCK_SIZE_K: tl.constexpr,
    GROUP_SIZE_M: tl.constexpr,
):
    """The tutorial's blocked matmul (its algorithm, written here): grouped program order, one
    [BM, BK] x [BK, BN] dot per K step into an fp32 accumulator, masked K tail, fp16 store."""
    pid = tl.program_id(axis=0)
    num_pid_m = tl.cdiv(M, BLOCK_SIZE_M)
    num_pid_n = tl.cdiv(N, BLOCK_SIZE_N)
    num_pid_in_group = GROUP_SIZE_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_SIZE_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_SIZE_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m
    offs_am = (pid_m * BLOCK_SIZE_M + tl.arange(0, BLOCK_SIZE_M)) % M
    offs_bn = (pid_n * BLOCK_SIZE_N + tl.arange(0, BLOCK_SIZE_N)) % N
    offs_k = tl.arange(0, BLOCK_SIZE_K)
    a_ptrs = a_ptr + (offs_am[:, None] * stride_am + offs_k[None, :] * stride_ak)
    b_ptrs = b_ptr + (offs_k[:, None] * stride_bk + offs_bn[None, :] * stride_bn)
    accumulator = tl.zeros((BLOCK_SIZE_M, BLOCK_SIZE_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_SIZE_K)):
        a = tl.load(a_ptrs, mask=offs_k[None, :] < K - k * BLOCK_SIZE_K, other=0.0)
        b = tl.load(b_ptrs, mask=offs_k[:, None] < K - k * BLOCK_SIZE_K, other=0.0)
        accumulator = tl.dot(a, b, accumulator)
        a_ptrs += BLOCK_SIZE_K * stride_ak
        b_ptrs += BLOCK_SIZE_K * stride_bk
    c = accumulator.to(tl.float16)
    offs_cm = pid_m * BLOCK_SIZE_M + tl.arange(0, BLOCK_SIZE_M)
    offs_cn = pid_n * BLOCK_SIZE_N + tl.arange(0, BLOCK_SIZE_N)
    c_ptrs = c_ptr + stride_cm * offs_cm[:, None] + stride_cn * offs_cn[None, :]
    tl.store(c_ptrs, c, mask=(offs_cm[:, None] < M) & (offs_cn[None, :] < N))


# --- compiling ------------------------------------------------------------------------------


_CUBINS: dict[str, tuple] = {}


def compile_cubin(fn, args: tuple, kwargs: dict) -> tuple:
    """Compile for sm_90 as the JIT would (cached per specialization): (loops, regs, stack bytes,
    spill instructions, shared bytes)."""
    sig, const, attrs, options = specialize(fn, args, kwargs)
    key = repr((fn.__name__, sorted(sig.items()), sorted(const.items()), sorted(attrs), options))
    if key not in _CUBINS:
        kernel = triton_kernel(fn, args, kwargs, 90)
        usage, instrs, loops = disassemble(kernel.asm["cubin"])
        regs, stack = map(int, re.search(r"REG:(\d+) STACK:(\d+)", usage).groups())
        spills = sum(1 for t in instrs if re.search(r"\b(STL|LDL)\b", t))
        _CUBINS[key] = (loops, regs, stack, spills, kernel.metadata.shared)
    return _CUBINS[key]


def main_loop(loops: list[list[str]], mma_prefix: str) -> list[str]:
    """The longest loop that holds an MMA of the given kind (QGMMA, HGMMA)."""
    return max((b for b in loops if any(re.search(rf"\b{mma_prefix}", t) for t in b)), key=len)


def tutorial_launch(size: int, cfg: tuple) -> tuple:
    bm, bn, bk, stages, warps = cfg
    args = (
        _meta(size, size, dtype=torch.float8_e4m3fn),
        _meta(size, size, dtype=torch.float8_e4m3fn).t(),  # B pre-transposed: K-major
        _meta(size, size, dtype=torch.float16),
        size,
        size,
        size,
        size,
        1,
        1,
        size,
        size,
        1,
    )
    kwargs = {
        "BLOCK_SIZE_M": bm,
        "BLOCK_SIZE_N": bn,
        "BLOCK_SIZE_K": bk,
        "GROUP_SIZE_M": 8,
        "num_stages": stages,
        "num_warps": warps,
    }
    return args, kwargs


# --- the two models ---------------------------------------------------------------------------


def _waves_time(
    tiles: int, iters: int, sim: dict, warps: int, tensor_clk: float, c_max: int, nbytes: float, l2: float
) -> float:
    """Clocks for ``tiles`` tiles of ``iters`` iterations each, c_max CTAs per SM, in waves."""
    total, left = 0.0, tiles
    while left > 0:
        c = min(c_max, math.ceil(left / H100.sms))
        total += iters * loop_time(sim, warps, tensor_clk, c, nbytes, l2)
        left -= c * H100.sms
    return total


_TUTORIAL: dict[tuple, dict] = {}


def tutorial_loop(cfg: tuple) -> dict | None:
    """The tutorial kernel's main loop for one config, simulated (None if it cannot run)."""
    if cfg not in _TUTORIAL:
        args, kwargs = tutorial_launch(4096, cfg)
        loops, regs, stack, spills, smem = compile_cubin(tutorial_matmul_kernel, args, kwargs)
        if stack or spills or smem > 227 * 1024:
            _TUTORIAL[cfg] = None
        else:
            body = main_loop(loops, "QGMMA")
            warps = cfg[4]
            _TUTORIAL[cfg] = {
                "sim": simulate(body),
                "tensor": loop_mma_clocks(body, warps),
                "sass": len(body),
                "regs": regs,
                "c": ctas_per_sm(regs, smem, warps),
            }
    return _TUTORIAL[cfg]


def tutorial_model(size: int, l2: float) -> dict:
    """The tutorial kernel at M = N = K = size, fastest modelled config (as the autotuner picks)."""
    best = None
    for cfg in TUTORIAL_FP8_CONFIGS:
        loop = tutorial_loop(cfg)
        if loop is None:
            continue
        bm, bn, bk, _, warps = cfg
        tiles = triton.cdiv(size, bm) * triton.cdiv(size, bn)
        clocks = _waves_time(
            tiles, triton.cdiv(size, bk), loop["sim"], warps, loop["tensor"], loop["c"], (bm + bn) * bk, l2
        )
        us = clocks / (H100.clock_ghz * 1e3)
        row = {
            "config": cfg,
            "regs": loop["regs"],
            "ctas_per_sm": loop["c"],
            "chain_clk": loop["sim"]["clocks"],
            "sass": loop["sass"],
            "tensor_clk": loop["tensor"],
            "us": us,
            "tflops": 2 * size**3 / us / 1e6,
        }
        if best is None or us < best["us"]:
            best = row
    return best


def calibrate() -> dict:
    """Fit the one free parameter, the L2 -> SM bandwidth in bytes per clock per SM, to the
    published figures from 3072 up (where the chip is full for long): the value that minimizes
    the largest error; the error before (at the uncapped L2) and after."""
    fit_sizes = [s for s in PUBLISHED_TUTORIAL_FP8_TFLOPS if s >= 3072]

    def worst(l2: float) -> float:
        return max(
            abs(math.log(PUBLISHED_TUTORIAL_FP8_TFLOPS[s] / tutorial_model(s, l2)["tflops"]))
            for s in fit_sizes
        )

    grid = [16 + 0.5 * i for i in range(97)]  # 16 .. 64 B/clk/SM
    l2 = min(grid, key=worst)
    rows = []
    for size, published in PUBLISHED_TUTORIAL_FP8_TFLOPS.items():
        r = tutorial_model(size, l2)
        free = tutorial_model(size, 1e9)
        rows.append(
            {
                "size": size,
                **r,
                "published_tflops": published,
                "ratio": published / r["tflops"],
                "uncapped_tflops": free["tflops"],
            }
        )
    big = [r for r in rows if r["size"] >= 3072]
    return {
        "rows": rows,
        "l2_bytes_per_clk_sm": l2,
        "l2_tb_s": l2 * H100.sms * H100.clock_ghz / 1e3,
        "error_before": max(abs(r["published_tflops"] / r["uncapped_tflops"] - 1) for r in big),
        "error_after": max(abs(r["ratio"] - 1) for r in big),
        "mean_error_after": sum(abs(r["ratio"] - 1) for r in big) / len(big),
    }
