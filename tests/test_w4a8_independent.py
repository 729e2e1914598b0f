"""An independent check of the W4A8 kernels (issue 27) through their public launchers, against the
contract (engine.quant.ops.quantize_act_fp8 / w4a8_gemm), on cases the authors' tests do not cover.

1. The sm_90 GEMM (gemm_sm90_w4a8): compiled for sm_90 and its PTX executed by the PTX
   interpreter. The harness is built from the launcher's own ``launch_args`` (its three
   TensorDescriptors become the TMA tensor maps: base, sizes, strides, box and swizzle as the
   launcher set them, so a descriptor the kernel does not expect shows up here), on inputs made
   here, exact in fp32, so the result must equal ops.w4a8_gemm bit for bit.
2. The Triton quantizer (act_fp8) in the interpreter and compiled for sm_90, on edge rows.
3. The triton backend's dispatch on sm_90 with meta tensors (the architecture patched).
"""

from __future__ import annotations

import json
import sys

import pytest
import torch
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from engine.kernels.triton import gemm_sm90_w4a8 as W
from engine.quant import ops, pack_int4

from .ptx_compile import run_compiled
from .ptx_exec import GlobalMemory, launch, parse
from .ptx_sm90 import TensorMap

# --- 1. the GEMM, compiled for sm_90 and executed --------------------------------------------------

_COMPILE = """
import json, sys
import torch
from perfmodel.hopper_ws import compile_gluon
from engine.kernels.triton import gemm_sm90_w4a8 as W
meta = lambda *s, dtype=torch.bfloat16: torch.empty(*s, dtype=dtype, device="meta")
out = []
for m, n, k, r, bias, dtype in json.loads(sys.argv[1]):
    dtype = getattr(torch, dtype)
    weight = W.W4A8Weight(meta(n, k // 2, dtype=torch.uint8), meta(k // 64, n, dtype=torch.float32))
    args, kwargs, grid = W.launch_args(meta(m, k, dtype=torch.float8_e4m3fn), meta(m, dtype=torch.float32),
                                       weight, meta(m, r, dtype=torch.float32), meta(n, r),
                                       meta(n) if bias else None, meta(m, n, dtype=dtype))
    kernel = compile_gluon(W.w4a8_gemm_sm90_kernel, args, kwargs)
    out.append({"ptx": kernel.asm["ptx"], "shared": kernel.metadata.shared,
                "threads": kernel.metadata.num_warps * 32})
print(json.dumps(out))
"""

# (name, M, N, K, R, bias, out dtype, wscales dtype)
GEMM_CASES = {
    # M = 1 (Triton makes it a constant: the one-token specialization), N = 4 (the smallest
    # weight: 188 of the tile's 192 rows past N), K = 64 (one group: the ring used once), rank 0
    # and no bias (both branches compiled out), fp32 out, fp16 scales (one fp16-subnormal);
    # activation codes at +-448 (saturation) and weight rows all +7, all -7 and with -8 (read -7)
    "one_token_one_group": (1, 4, 64, 0, False, "float32", torch.float16),
    # M = 129 (a second token tile holding one row), N = 196 (a second weight tile holding four
    # rows), K = 128, rank 64 (the kernel's limit: BR = 64), bias, bf16 out, bf16 scales;
    # e4m3 subnormal and small normal codes, a row with ascale 0 (nonzero codes), an all-zero
    # row, extreme weight rows past the first tile
    "tile_plus_one_rank_64": (129, 196, 128, 64, True, "bfloat16", torch.bfloat16),
    # rank 0 with bias, fp16 out with fp16 scales: rows at +-448 whose sum overflows fp16 (inf
    # in both), others in range; M = 64 (half a token tile), N = 196
    "fp16_out_overflow_rank_0": (64, 196, 128, 0, True, "float16", torch.float16),
}


@pytest.fixture(scope="module")
def gemm_compiled() -> dict:
    """Every case's kernel, compiled for sm_90 in one child process (no TRITON_INTERPRET)."""
    req = [[m, n, k, r, b, d] for (m, n, k, r, b, d, _) in GEMM_CASES.values()]
    res = run_compiled([sys.executable, "-c", _COMPILE, json.dumps(req)], scripts=True)
    assert res.returncode == 0, res.stderr[-3000:]
    return dict(zip(GEMM_CASES, json.loads(res.stdout.strip().splitlines()[-1]), strict=True))


def _e4m3(v: torch.Tensor) -> torch.Tensor:
    """Values that must be exact e4m3 (asserted), as codes."""
    c = v.float().to(torch.float8_e4m3fn)
    assert torch.equal(c.float(), v.float()), "not exact in e4m3"
    return c


def gemm_inputs(name: str, seed: int = 0) -> dict:
    """The contract's inputs for ``name``, built so that every partial sum (each group's in any
    order, the groups', the low-rank branch's, + bias) spans at most 24 bits: the fp32 result is
    exact and any correct kernel's equals the reference's bit for bit."""
    m, n, k, r, bias, _, sdtype = GEMM_CASES[name]
    g = torch.Generator().manual_seed(seed)
    grp = k // 64
    w = torch.randint(-8, 8, (n, k), generator=g, dtype=torch.int8)
    if name == "one_token_one_group":
        a = (torch.randint(8, 15, (m, k), generator=g) * 32.0) * torch.where(torch.arange(k) % 3 == 0, -1.0, 1.0)
        a[0, :8] = torch.tensor([448.0, -448.0, 448.0, 448.0, -448.0, 256.0, -288.0, 448.0])  # multiples of 32
        w[0], w[1] = 7, -7
        w[2] = torch.where(torch.arange(k) % 2 == 0, -8, 7).to(torch.int8)  # -8: read as -7
        wscales = 2.0 ** torch.tensor([[-12.0], [-8.0], [-10.0], [-16.0]])  # 2^-16: subnormal in fp16
        ascale = torch.tensor([0.125])
    else:
        if name == "tile_plus_one_rank_64":
            a = torch.randint(-15, 16, (m, k), generator=g) * 2.0**-9  # subnormals (|q| < 8) and 2^-6..
            a[1] = torch.arange(k) % 15 - 7.0  # subnormals only, every one of them
            a[1] *= 2.0**-9
            a[4] = 0.0  # an all-zero row (the quantizer's zero row: ascale 0 too)
            a[m - 1] = (torch.arange(k) % 31 - 15) * 2.0**-9  # the row past the first token tile
        else:
            a = torch.randint(-4, 5, (m, k), generator=g) * 0.25
            a[2] = torch.where(torch.arange(k) % 2 == 0, 448.0, 416.0)  # 7 * 864 * 64 * ... > 65504
            a[3] = -a[2]
        w[n - 4], w[n - 3] = 7, -7  # extreme rows in the last weight tile (past 192)
        w[n - 2, ::3] = -8
        wscales = 2.0 ** torch.randint(-2, 1, (n, grp), generator=g).float()
        ascale = 2.0 ** torch.randint(-1, 2, (m,), generator=g).float()
        if name == "tile_plus_one_rank_64":
            ascale[3] = 0.0  # a zero scale over nonzero codes: the GEMM's part vanishes
            ascale[4] = 0.0
        else:
            ascale[2:4] = 2.0  # the +-448 rows: beyond fp16's range
            ascale[6] = 0.0
    return {
        "codes": _e4m3(a),
        "ascale": ascale.float(),
        "qweight": pack_int4(w),
        "wscales": wscales.to(sdtype),
        "lora_act": torch.randint(-2, 3, (m, r), generator=g).float(),
        "proj_up": (torch.randint(-4, 5, (n, r), generator=g).float() / 4).to(torch.bfloat16),
        "bias": torch.randint(-8, 9, (n,), generator=g).float().to(torch.bfloat16) if bias else None,
    }


def run_gemm(info: dict, x: dict, out_dtype: torch.dtype, schedule: str = "lowest_pc",
             approx: str = "exact", weight: W.W4A8Weight | None = None) -> tuple:
    """Execute the compiled kernel with the arguments ``gemm_sm90_w4a8.launch_args`` builds for
    these tensors (as ``launch`` would, one CTA per tile): (findings, out, bytes written).
    ``weight``: a prepared weight other than ``prepare_weight``'s."""
    weight = weight or W.prepare_weight(x["qweight"], x["wscales"])
    m, n = x["codes"].shape[0], x["qweight"].shape[0]
    out = torch.empty(m, n, dtype=out_dtype)
    args, _, grid = W.launch_args(x["codes"], x["ascale"], weight, x["lora_act"], x["proj_up"], x["bias"], out)
    mem = GlobalMemory()
    addr: dict[int, int] = {}  # data_ptr -> interpreter address

    def place(t: torch.Tensor, name: str) -> int:
        if t.data_ptr() not in addr:
            raw = t.contiguous().view(-1).view(torch.uint8).numpy()
            addr[t.data_ptr()] = mem.alloc(name, raw, readonly=True) if t is not out else mem.alloc(name, raw.size)
        return addr[t.data_ptr()]

    place(out, "out")
    fn = W.w4a8_gemm_sm90_kernel
    values, tmaps = [], {}
    for i, (pname, p, a) in enumerate(zip(fn.arg_names, fn.params, args, strict=False)):  # constexprs last
        if p.is_constexpr:
            continue
        if isinstance(a, TensorDescriptor):  # the map from the launcher's descriptor (sizes/strides innermost first)
            eb = a.base.element_size()
            handle = (1 << 60) + 128 * i
            tmaps[handle] = TensorMap(place(a.base, pname), eb, tuple(reversed(a.shape)),
                                      tuple(s * eb for s in reversed(a.strides)), tuple(reversed(a.block_shape)),
                                      a.layout.swizzle_byte_width)  # fmt: skip
            values += [handle, *a.shape, *a.strides]
        elif isinstance(a, torch.Tensor):
            values.append(place(a, pname))
        elif not (isinstance(a, int) and a == 1):  # Triton makes integers equal to 1 constants
            values.append(a)
    kernel = parse(info["ptx"])
    extra = len(kernel.params) - len(values)
    assert extra in (1, 2), f"{len(kernel.params)} PTX parameters for {len(values)} arguments"  # scratch pointers
    findings = launch(kernel, mem, values + [0] * extra, (grid[0], 1, 1), info["threads"], info["shared"],
                      tmaps=tmaps, schedule=schedule, approx=approx)  # fmt: skip
    got = torch.from_numpy(mem.get("out").copy()).view(out_dtype).reshape(m, n)
    return findings, got, mem.written("out")


def _reference(x: dict, out_dtype: torch.dtype) -> torch.Tensor:
    return ops.w4a8_gemm(x["codes"], x["ascale"], x["qweight"], x["wscales"], x["lora_act"], x["proj_up"],
                         x["bias"], out_dtype=out_dtype)  # fmt: skip


def _assert_same(got: torch.Tensor, want: torch.Tensor) -> None:
    """Bit for bit (a -0 for +0 also fails), with the first differing elements named."""
    bits = torch.int16 if got.element_size() == 2 else torch.int32
    gi, wi = got.view(bits), want.view(bits)
    bad = (gi != wi).nonzero()
    assert not len(bad), (
        f"{len(bad)} elements differ, e.g. {[(i, j, got[i, j].item(), want[i, j].item()) for i, j in bad[:5].tolist()]}"
    )


@pytest.mark.parametrize(
    "name, schedule, approx",
    [
        ("one_token_one_group", "lowest_pc", "perturb"),
        ("tile_plus_one_rank_64", "high_warpgroup_first", "exact"),
        ("fp16_out_overflow_rank_0", "lowest_pc", "exact"),
    ],
)
def test_gemm_edge_cases_match_the_contract_bit_for_bit(gemm_compiled, name, schedule, approx):
    """Each GEMM_CASES entry (what it checks is written there) executed from its sm_90 PTX: the
    reference's bits, every output byte written, no out-of-bounds / racy / uninitialized access.
    ``perturb``: approximate instructions one ulp off (an exact result must not lean on them)."""
    out_dtype = getattr(torch, GEMM_CASES[name][5])
    x = gemm_inputs(name)
    want = _reference(x, out_dtype)
    assert want.abs().max() > 0
    if name == "fp16_out_overflow_rank_0":
        assert torch.isinf(want[2]).any() and torch.isinf(want[3]).any() and torch.isfinite(want[5:]).all()
    findings, got, written = run_gemm(gemm_compiled[name], x, out_dtype, schedule, approx)
    assert not findings, findings.report()
    assert written.all(), f"{int((~written).sum())} output bytes never written"
    _assert_same(got, want)


def test_one_wrong_scale_moves_exactly_its_column(gemm_compiled):
    """The harness can fail, and the kernel reads each row's scale where prepare_weight puts it:
    with sw[group 1, row 193] (the second weight tile, the second group) doubled, exactly column
    193 changes, and to the reference of a weight whose wscales[193, 1] is doubled."""
    name = "tile_plus_one_rank_64"
    x = gemm_inputs(name)
    weight = W.prepare_weight(x["qweight"], x["wscales"])
    weight.sw[1, 193] *= 2
    _, got, _ = run_gemm(gemm_compiled[name], x, torch.bfloat16, weight=weight)
    want = _reference(x, torch.bfloat16)
    diff = (got != want).any(dim=0).nonzero().flatten().tolist()
    assert diff == [193]
    x["wscales"][193, 1] *= 2
    _assert_same(got, _reference(x, torch.bfloat16))
