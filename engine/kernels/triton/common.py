"""Helpers shared by the Triton kernels: exact conversions, nibble unpacking, launch configs."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def arch_major(device: torch.device) -> int:
    """The GPU's compute-capability major (which config table applies); 0 in the interpreter."""
    return torch.cuda.get_device_capability(device)[0] if device.type == "cuda" and not INTERPRET else 0


def row_major(t: torch.Tensor) -> torch.Tensor:
    """Last dimension contiguous (the kernels take the row stride, not the column stride)."""
    return t if t.stride(-1) == 1 else t.contiguous()


I2F_MAGIC_BITS = 0x4B400000  # the bit pattern of 1.5 * 2^23
I2F_EXACT_LIMIT = 1 << 22  # bits(1.5 * 2^23) + v reads as 1.5 * 2^23 + v for |v| <= 2^22
MAX_GEMM_GROUP = 256  # |group sum| <= 256 * (16 * 8)^2 = 2^22: the GEMM's conversion stays exact
# Hopper's conversion (see scale_lowest_binade): a bias of BIAS_MMA_UNIT per channel of the bias
# MMA (its -128 x -128 products), scales taken times 2^SUB_IN_EXP, results in units of 2^-SUB_OUT_EXP.
# (constexpr: the kernels read them; ``.value`` is the int)
BIAS_MMA_UNIT = tl.constexpr(1 << 14)
SUB_IN_EXP = tl.constexpr(80)
SUB_OUT_EXP = tl.constexpr(149 - 80)  # 69: the accumulator is multiplied by 2^69 once, at the end


def check_group_size(group_size: int, largest: int | None = None) -> None:
    """Group sizes the GPU kernels compile for: powers of two from 64 (one K=64 MMA step), up
    to ``largest`` where a kernel's exactness needs a bound.

    The interpreter accepts any size, a GPU compile does not (``tl.arange`` needs a power of
    two): reject the others on every device, so a test on CPU fails where a GPU would.
    """
    if group_size < 64 or group_size & (group_size - 1):
        raise ValueError(f"group_size must be a power of two >= 64 for the triton backend, got {group_size}")
    if largest is not None and group_size > largest:
        raise ValueError(f"group_size must be at most {largest} for this triton kernel, got {group_size}")


def block_r(r: int, chunk: int) -> int:
    """Low-rank ranks per step of a kernel: a power of two >= 16 (the smallest MMA K/N), at most
    the kernel's ``chunk``, so registers and shared memory do not grow with the rank (the base
    32 plus LoRAs of any width: tests/test_triton_static.py compiles ranks 32 to 224 and gates
    them)."""
    return min(chunk, max(16, triton.next_power_of_2(r)))


@dataclass(frozen=True)
class LaunchConfig:
    """A fixed launch configuration (tile sizes, warps, pipeline depth) for one kernel."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    maxnreg: int | None = None  # register cap per thread (more CTAs per SM); None: ptxas decides
    bias_mma: bool = False  # GEMM: the Hopper conversion (scale_lowest_binade), no accumulator resets

    def launch_options(self) -> dict:
        """The launch keywords of this config (``num_warps``, ``num_stages``, ``maxnreg``)."""
        opts = {"num_warps": self.num_warps, "num_stages": self.num_stages}
        if self.maxnreg is not None:
            opts["maxnreg"] = self.maxnreg
        return opts


@triton.jit
def grouped_tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(row block, column block) of this program in grouped order: GROUP_M row blocks sweep the
    columns together, so their weight tiles are shared in L2."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    width = GROUP_M * num_n
    first_m = (pid // width) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    return first_m + (pid % width) % size_m, (pid % width) // size_m


@triton.jit
def unpack_nibbles(p, SIGNED: tl.constexpr, ASM: tl.constexpr):
    """uint8 codes, two per byte -> (low, high) int8 tensors of the same shape.

    signed: 16 * code, exact in int8 (the nibble moved to the top of its byte); the caller
    divides the dot by 16 per signed operand, a power of two, folded into a scale.
    unsigned: the code itself, 0..15. On the GPU each 32-bit shift/mask handles four bytes.
    """
    if ASM:
        if SIGNED:
            lo, hi = tl.inline_asm_elementwise(
                "{ shl.b32 $0, $2, 4; and.b32 $0, $0, 0xF0F0F0F0; and.b32 $1, $2, 0xF0F0F0F0; }",
                "=r,=r,r",
                [p],
                dtype=(tl.int8, tl.int8),
                is_pure=True,
                pack=4,
            )
        else:
            lo, hi = tl.inline_asm_elementwise(
                "{ and.b32 $0, $2, 0x0F0F0F0F; shr.b32 $1, $2, 4; and.b32 $1, $1, 0x0F0F0F0F; }",
                "=r,=r,r",
                [p],
                dtype=(tl.int8, tl.int8),
                is_pure=True,
                pack=4,
            )
    else:  # the interpreter has no inline PTX: the same bytes, one element at a time
        if SIGNED:
            lo = (p << 4).to(tl.int8, bitcast=True)
            hi = (p & 0xF0).to(tl.int8, bitcast=True)
        else:
            lo = (p & 0xF).to(tl.int8, bitcast=True)
            hi = (p >> 4).to(tl.int8, bitcast=True)
    return lo, hi


@triton.jit
def div_correct(a, b, rb):
    """``a / b`` rounded like IEEE division, from ``rb = RN(1 / b)``: Markstein's correction.

    ``q = a * rb`` is within one ulp of a / b; the residual ``a - q * b`` is then exact in one
    FMA, and ``q + residual * rb`` (one more FMA) is the correctly rounded quotient, provided
    b, 1/b and a/b are normal numbers. Three instructions instead of the ~15 of a full IEEE
    division (reciprocal, refinement, range check and a slow-path call) per element.
    GPU code only (inline PTX): ``neg.f32`` of b folds into the FMA's operand. Written in
    ``tl``, ``fma(-q, b, a)`` compiled to a second, negated product beside q, and ``fma(q, -b,
    a)`` to a subtraction 0 - b per element (not foldable: it differs from -b at +0): four
    instructions either way, three here, the same bits.
    """
    return tl.inline_asm_elementwise(
        "{ .reg .f32 q, r, nb; mul.rn.f32 q, $1, $3; neg.f32 nb, $2; "
        "fma.rn.f32 r, q, nb, $1; fma.rn.f32 $0, r, $3, q; }",
        "=r,r,r,r",
        [a, b, rb],
        dtype=tl.float32,
        is_pure=True,
        pack=1,
    )


@triton.jit
def dot_bf16(a, b, acc, NATIVE: tl.constexpr):
    """``acc + a @ b`` for bf16 ``a`` and ``b``: a bf16 MMA on the GPU; in the interpreter, whose
    bf16 dot is wrong (triton 3.6), the same exact products in fp32."""
    if NATIVE:
        return tl.dot(a, b, acc)
    return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")


@triton.jit
def round_to_22_bits(s):
    """``s`` rounded to 22 significant bits (to nearest; relative change <= 2^-22, at most
    two fp32 ulps): then ``1.5 * 2^23 * s`` is exact (3 x a 22-bit significand fits in 24 bits),
    which lets one FMA both remove the magic bias of an integer and scale it (scale_biased)."""
    return ((s.to(tl.int32, bitcast=True) + 2) & -4).to(tl.float32, bitcast=True)


@triton.jit
def scale_biased(biased, s22, neg_bias_s22, FUSED: tl.constexpr):
    """``RN(v * s22)`` from ``biased`` = the bits of 1.5 * 2^23 plus the integer v (|v| <= 2^22)
    and ``neg_bias_s22 = -1.5 * 2^23 * s22`` (exact, see round_to_22_bits). On the GPU one FMA
    (the product is not rounded before the exact bias cancels); in the interpreter, which has
    no fused multiply-add, the exact subtraction then one multiply: the same single rounding."""
    b = biased.to(tl.float32, bitcast=True)
    if FUSED:
        return tl.fma(b, s22, neg_bias_s22)
    return (b - 12582912.0) * s22


@triton.jit
def mul_rn(a, b, COMPILED: tl.constexpr):
    """fp32 ``a * b`` rounded on its own: ``mul.rn`` is never contracted into an FMA with a
    following add (as an unfused torch op is not); the interpreter never contracts."""
    if COMPILED:
        return tl.inline_asm_elementwise(
            "mul.rn.f32 $0, $1, $2;", "=r,r,r", [a, b], dtype=tl.float32, is_pure=True, pack=1
        )
    return a * b


# libdevice's __nv_tanhf as Triton links it (the instruction sequence read from its PTX), with
# its two paths computed and selected instead of branched to: the same instructions, the same
# bits, no divergent branch per element. |x| < 0.6: odd polynomial; else 1 - 2 / (2^(2|x| log2 e)
# + 1), 1 from |x| >= 9.0109, with x's sign.
_TANHF_PTX = tl.constexpr("""{
.reg .f32 a, s, p, e, t;
.reg .pred small, big;
abs.ftz.f32 a, $1;
mul.f32 s, $1, $1;
fma.rn.ftz.f32 p, 0f3C80F082, s, 0fBD563CAE;
fma.rn.ftz.f32 p, p, s, 0f3E085941;
fma.rn.ftz.f32 p, p, s, 0fBEAAA9ED;
fma.rn.ftz.f32 p, p, s, 0f00000000;
fma.rn.ftz.f32 p, p, $1, $1;
mul.f32 e, a, 0f4038AA3B;
ex2.approx.ftz.f32 e, e;
add.f32 e, e, 0f3F800000;
rcp.approx.ftz.f32 e, e;
fma.rn.ftz.f32 t, e, 0fC0000000, 0f3F800000;
setp.ge.f32 big, a, 0f41102CB4;
selp.f32 t, 0f3F800000, t, big;
copysign.f32 t, $1, t;
setp.ltu.f32 small, a, 0f3F19999A;
selp.f32 $0, p, t, small;
}""")


@triton.jit
def tanh_f32(x, COMPILED: tl.constexpr):
    """fp32 tanh: CUDA's tanhf algorithm on the GPU (libdevice's, as torch's CUDA kernels call
    it, without libdevice's per-element branch); the interpreter has no libdevice: fp64
    exponentials, then one rounding to fp32."""
    if COMPILED:
        return tl.inline_asm_elementwise(_TANHF_PTX, "=r,r", [x], dtype=tl.float32, is_pure=True, pack=1)
    e = tl.exp(2.0 * tl.minimum(tl.maximum(x.to(tl.float64), -20.0), 20.0))
    return ((e - 1.0) / (e + 1.0)).to(tl.float32)


@triton.jit
def scale_lowest_binade(biased, s, neg_bias_s, bias_value, FUSED: tl.constexpr):
    """``RN(v * s * 2^-149)`` from ``biased`` = B + v as int32, with 0 <= B + v < 2^24.

    Every int32 in [0, 2^24) read as fp32 is exactly itself times 2^-149 (the subnormals and
    the lowest normal binade, where the value is linear in the bits), so the biased integer
    needs no conversion: ``neg_bias_s`` = -B * 2^-149 * s (exact: B is a power of two) cancels
    the bias inside one FMA, which rounds once. The bias comes from an MMA with its
    accumulator off (wgmma's scale-d = 0), so nothing resets the accumulator between groups.
    In the interpreter (no fused multiply-add): the exact subtraction of ``bias_value`` =
    B * 2^-149 (both multiples of 2^-149 below 2^-125), then one multiply.
    """
    b = biased.to(tl.float32, bitcast=True)
    if FUSED:
        return tl.fma(b, s, neg_bias_s)
    return (b - bias_value) * s


@triton.jit
def round_to(x, dtype: tl.constexpr, COMPILED: tl.constexpr):
    """fp32 ``x`` rounded to ``dtype`` (half to even) and back, as torch stores an op's result. The
    interpreter truncates fp32 -> bf16 casts (triton 3.6): there the rounding is done on the bits
    (NaN kept a quiet NaN, which a later truncating cast keeps NaN, as the GPU's cvt.rn does)."""
    if dtype == tl.float32:
        return x
    elif dtype == tl.bfloat16 and not COMPILED:
        b = x.to(tl.int32, bitcast=True)
        b = (b + 0x7FFF + ((b >> 16) & 1)) & -65536
        return tl.where(x != x, float("nan"), b.to(tl.float32, bitcast=True))
    else:
        return x.to(dtype).to(tl.float32)


@triton.jit
def widen(x, COMPILED: tl.constexpr):
    """A 16-bit or fp32 ``x`` as fp32, exactly. The interpreter flushes bf16 subnormals to zero in
    bf16 -> fp32 casts (triton 3.6): there the bf16 bits are shifted into place."""
    if x.dtype == tl.bfloat16 and not COMPILED:
        return (x.to(tl.int16, bitcast=True).to(tl.int32) << 16).to(tl.float32, bitcast=True)
    return x.to(tl.float32)


@triton.jit
def narrow(x, dtype: tl.constexpr, COMPILED: tl.constexpr):
    """fp32 ``x`` rounded to ``dtype`` (half to even), in ``dtype``: round_to, then a cast that is
    exact. The interpreter's fp32 -> bf16 cast also flushes subnormals: there the top half of
    the rounded bits is taken."""
    r = round_to(x, dtype, COMPILED)
    if dtype == tl.bfloat16 and not COMPILED:
        return (r.to(tl.int32, bitcast=True) >> 16).to(tl.int16).to(tl.bfloat16, bitcast=True)
    return r.to(dtype)
