"""engine.kernels.triton.epilogue: the W4A4 GEMM's partial/gate/residual epilogue in one kernel,
bit for bit what its definer, engine.quant.ops.gemm_epilogue (the reference's torch ops), gives.

Run in the Triton interpreter (tests/conftest.py) over every output dtype, with and without the
partial and the gate/residual, one to three images (rows per gate > 1), sizes off the tile, and
values that reach every rounding edge: random bit patterns (NaN, infinities, subnormals of both
fp32 and the 16-bit types), ties of the fp32 -> 16-bit rounding, and sums that overflow it.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch

from engine.kernels.triton import epilogue as E
from engine.quant.ops import gemm_epilogue

from . import ptx_compile as PC
from .ptx_compile import run_compiled

ROOT = Path(__file__).resolve().parents[1]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the interpreter without a GPU (conftest)

DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_INT = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


def edge_values(shape: tuple[int, int], dtype: torch.dtype, g: torch.Generator) -> torch.Tensor:
    """A third random bit patterns (every class of float, NaN payloads, subnormals), a third
    ordinary values, a third specials: +-0, +-inf, NaN, the smallest subnormal, the largest finite,
    and (for fp32) values halfway between two bf16/fp16 neighbours."""
    bits = _INT[dtype]
    info = torch.iinfo(bits)
    rnd = torch.randint(info.min, info.max, shape, generator=g, dtype=torch.int64).to(bits).view(dtype)
    normal = (torch.randn(shape, generator=g) * 4).to(dtype)
    fi = torch.finfo(dtype)
    specials = [0.0, -0.0, float("inf"), float("-inf"), float("nan"), fi.smallest_normal / 4, -fi.tiny / 8,
                fi.max, -fi.max, 1.0 + 2**-8, 1.0 + 2**-11, 1.0 + 3 * 2**-9, 65504.0 + 16, 65520.0,
                3.3895e38, 2**-133, -(2**-140)]  # fmt: skip
    sp = torch.tensor(specials, dtype=torch.float32).to(dtype)
    pick = sp[torch.randint(0, len(specials), shape, generator=g)]
    which = torch.randint(0, 3, shape, generator=g)
    return torch.where(which == 0, rnd, torch.where(which == 1, normal, pick))


def run(acc, partial, residual, gate, out_dtype) -> torch.Tensor:
    """The launcher on DEVICE (inputs moved there, the result back)."""
    on = lambda t: t.to(DEVICE) if t is not None else None  # noqa: E731
    return E.launch(on(acc), on(partial), on(residual), on(gate), out_dtype).cpu()


def assert_bitwise(got: torch.Tensor, want: torch.Tensor) -> None:
    """Equal bits wherever the reference is a number; NaN exactly where it is NaN (payloads may differ)."""
    assert got.dtype == want.dtype and got.shape == want.shape
    nan = torch.isnan(want)
    assert torch.equal(torch.isnan(got), nan), int((torch.isnan(got) != nan).sum())
    bits = _INT[want.dtype]
    diff = (got.view(bits) != want.view(bits)) & ~nan
    assert not diff.any(), f"{int(diff.sum())} of {diff.numel()} differ, first at {diff.nonzero()[0].tolist()}"


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy on inf/NaN in the interpreter
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("partial", [False, True])
@pytest.mark.parametrize("images", [0, 1, 3])  # 0: no gate/residual
def test_matches_the_reference_bit_for_bit(dtype, partial, images):
    m, n = 39, 300  # three row tiles (the last partial), two column tiles (the last partial)
    g = torch.Generator().manual_seed(DTYPES.index(dtype) * 8 + partial * 4 + images)
    acc = edge_values((m, n), torch.float32, g)
    p = edge_values((m, n), dtype, g) if partial else None
    res = edge_values((m, n), dtype, g) if images else None
    gate = edge_values((images, n), dtype, g) if images else None
    want = gemm_epilogue(acc.clone(), p, res, gate, dtype)
    got = run(acc, p, res, gate, dtype)
    assert_bitwise(got, want)
    assert got.is_contiguous()


@pytest.mark.parametrize("dtype", DTYPES)
def test_ordinary_values_exactly(dtype):
    """Ordinary magnitudes (the case FLUX runs): equal bits everywhere, NaN-free, rows per gate 8."""
    g = torch.Generator().manual_seed(1)
    m, n = 16, 17
    acc = torch.randn(m, n, generator=g) * 3
    p, res = (torch.randn(m, n, generator=g).to(dtype) for _ in range(2))
    gate = torch.randn(2, n, generator=g).to(dtype)
    for args in ((None, None, None), (p, None, None), (None, res, gate), (p, res, gate)):
        want = gemm_epilogue(acc.clone(), *args, dtype)
        assert not torch.isnan(want).any()
        assert torch.equal(run(acc, *args, dtype).view(_INT[dtype]), want.view(_INT[dtype]))


def test_fp32_product_and_sum_round_twice():
    """fp32 output: gate * y and residual + prod are two roundings (the reference's two torch ops);
    a fused multiply-add would give a different sum on these values."""
    y = torch.tensor([[1.0 + 2**-23]], dtype=torch.float32)
    gate = torch.tensor([[1.0 - 2**-24]], dtype=torch.float32)
    res = torch.tensor([[-1.0]], dtype=torch.float32)
    want = gemm_epilogue(y.clone(), None, res, gate, torch.float32)
    fused = torch.tensor(float((1 + 2**-23) * (1 - 2**-24) - 1), dtype=torch.float32)  # exact, then one rounding
    assert want.item() != fused.item()
    assert_bitwise(run(y, None, res, gate, torch.float32), want)


def test_strided_inputs_are_read_as_the_reference_reads_them():
    g = torch.Generator().manual_seed(2)
    acc = torch.randn(20, 12, generator=g).t()  # [12, 20], not row-major
    p = torch.randn(20, 12, generator=g).to(torch.bfloat16).t()
    res = torch.randn(12, 20, generator=g).to(torch.bfloat16)
    gate = torch.randn(20, 4, generator=g).to(torch.bfloat16).t()  # [4, 20], column stride 4
    want = gemm_epilogue(acc.clone(), p, res, gate, torch.bfloat16)
    assert_bitwise(run(acc, p, res, gate, torch.bfloat16), want)


def test_empty_and_bad_input():
    assert run(torch.empty(0, 8), None, None, None, torch.bfloat16).shape == (0, 8)
    acc = torch.zeros(6, 8)
    bf = {"dtype": torch.bfloat16}
    with pytest.raises(ValueError, match="gate"):
        E.launch(acc, None, torch.zeros(6, 8, **bf), None, torch.bfloat16)
    with pytest.raises(ValueError, match="gate"):
        E.launch(acc, None, torch.zeros(6, 8, **bf), torch.zeros(4, 8, **bf), torch.bfloat16)
    with pytest.raises(ValueError, match="partial"):
        E.launch(acc, torch.zeros(6, 7, **bf), None, None, torch.bfloat16)
    with pytest.raises(ValueError, match="acc"):
        E.launch(acc.half(), None, None, None, torch.bfloat16)
    with pytest.raises(ValueError, match="out_dtype"):
        E.launch(acc, None, None, None, torch.int8)


def test_bytes_moved_counts_each_tensor_once():
    m, n = 4096, 3072
    assert E.bytes_moved(m, n, torch.bfloat16, False, False) == m * n * 6
    assert E.bytes_moved(m, n, torch.bfloat16, True, True, 2) == m * n * 10 + 2 * n * 2


# --- the compiled kernel: PTX for sm_90 and sm_86 executed, SASS without spills ---------------------

_KERNEL = "engine.kernels.triton.epilogue:gemm_epilogue_kernel"


def _record(*args) -> PC.Launch:
    """The launcher's launch as a GPU gets it (COMPILED=True), recorded instead of run."""
    rec = PC._Recorder(_KERNEL)
    with mock.patch.object(E, "gemm_epilogue_kernel", rec), mock.patch.object(E, "INTERPRET", False):
        E.launch(*args)
    (launch,) = rec.launches
    return launch


def _compiled_cases() -> list[tuple[str, PC.Launch, torch.Tensor]]:
    g = torch.Generator().manual_seed(7)
    m, n = 19, 300  # two row tiles of 16 (the second 3 rows), two column tiles (the second 44 columns)
    cases = []
    for dtype, partial, images in ((torch.bfloat16, True, 1), (torch.float16, False, 19), (torch.float32, True, 1),
                                   (torch.bfloat16, False, 0)):  # fmt: skip
        acc = edge_values((m, n), torch.float32, g)
        p = edge_values((m, n), dtype, g) if partial else None
        res = edge_values((m, n), dtype, g) if images else None
        gate = edge_values((images, n), dtype, g) if images else None
        want = gemm_epilogue(acc.clone(), p, res, gate, dtype)
        cases.append((f"{dtype}-{partial}-{images}", _record(acc, p, res, gate, dtype), want))
    return cases


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_compiled_ptx_for_sm90_and_sm86_matches_the_reference():
    """The launcher's kernel compiled by triton for sm_90 (the route that runs it) and sm_86, run by the
    PTX interpreter (tests/ptx_exec.py): bit for bit the reference on edge values, every output byte
    written, no out-of-bounds access; no FTZ and no fp32 fused multiply-add in its PTX (two roundings)."""
    cases = _compiled_cases()
    results = PC.compile_ptx([launch.request(cc) for _, launch, _ in cases for cc in (90, 86)])
    for i, (name, launch, want) in enumerate(cases):
        for res, cc in zip(results[2 * i : 2 * i + 2], (90, 86), strict=True):
            assert f".target sm_{cc}" in res["ptx"]
            # no flush to zero, no fp32 FMA (sm_86's bf16 sums may come as fma.rn.bf16 x, 1.0, r: one
            # rounding of the exact sum, what fp32 then bf16 gives: 24 >= 2 * 8 + 2 bits)
            assert ".ftz" not in res["ptx"] and not re.search(r"\bfma\.\S*f32", res["ptx"]), (name, cc)
            out = launch.args[4]
            out.fill_(0)
            findings, written = PC.execute(launch, res)
            assert not findings, (name, cc, findings.report())
            assert set(written) == {"out_ptr"} and written["out_ptr"].all(), (name, cc)
            assert_bitwise(out, want)


_SASS = """
import json, sys, torch
sys.path.insert(0, "scripts")
from perfmodel.loops import compile_sass
from engine.kernels.triton import epilogue as E
out = []
for cc in (90, 86):
    for dtype in (torch.bfloat16, torch.float32):
        for partial, gated in ((False, False), (True, True)):
            t = lambda dt: torch.empty(64, 64, dtype=dt)
            args = (t(torch.float32), t(dtype), t(dtype), t(dtype), t(dtype), 4352, 3072, 3072, 3072, 4352)
            kw = dict(BLOCK_M=E.BLOCK_M, BLOCK_N=E.BLOCK_N, HAS_PARTIAL=partial, GATED=gated, COMPILED=True,
                      num_warps=E.NUM_WARPS)
            info = compile_sass(E.gemm_epilogue_kernel, args, kw, cc)
            out.append({"cc": cc, "dtype": str(dtype), "gated": gated,
                        **{k: info[k] for k in ("regs", "stack_bytes", "spill_instrs")}})
print(json.dumps(out))
"""


def test_sass_has_no_spills():
    """Compiled by triton's ptxas for sm_90 and sm_86 (no GPU): no spills, no stack, and registers
    for at least 5 CTAs (20 warps) per SM: with 32 elements per thread that keeps far more bytes in
    flight than an H100's DRAM latency needs (about 25 KB per SM at 3.35 TB/s and ~1 us)."""
    res = run_compiled([sys.executable, "-c", _SASS])
    assert res.returncode == 0, res.stderr[-3000:]
    entries = json.loads(res.stdout.strip().splitlines()[-1])
    assert len(entries) == 8, entries
    for e in entries:
        assert e["spill_instrs"] == 0 and e["stack_bytes"] == 0 and e["regs"] <= 96, e
