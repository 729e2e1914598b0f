"""The CUDA kernels' PTX (engine/kernels/cuda/csrc/*.cu, nvcc -ptx for sm_86) executed by
the PTX interpreter of tests/ptx_exec.py and compared with the reference backend.

The launch (grid, threads, dynamic shared memory, argument order) is the host code's in
w4a4_gemm.cu and quantize_act.cu (svdq::w4a4_gemm, launch_quantize), with their constants (tiles,
kThreads, kSmemBytes, and the small tile's kSmallBM, kSmallThreads, kSmallSmemBytes) evaluated from the
sources themselves. Edge shapes: odd M and N inside one 192 x 128 tile (the large tile's instances, valid
at any M, though the host takes the small tile below kSmallMaxM), M = 150 over two 128-row tiles of the
small one (the second partial), three K groups, ranks 0, 5 and 48 (48 takes the kNT = 8 instance of quantize_act). The GEMM runs on inputs whose
products and sums are exact (see exact_gemm_inputs), so it must equal the reference bit for bit;
quantize_act's codes and scales are exact by contract, its low-rank product (bf16 hi + lo) to
~2^-16. Every run must be clean of the interpreter's findings.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.kernels import reference

from . import ptx_exec as X
from .kernel_cases import act_inputs
from .test_ptx_exec_triton import exact_gemm_inputs

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "engine" / "kernels" / "cuda" / "csrc"
KERNEL_SOURCES = sorted(CSRC.glob("*.cu"))  # one file per kernel family
CONSTANT_SOURCES = [CSRC / "fragments.cuh", *KERNEL_SOURCES]  # the shared header's constants come first
DTYPE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # svdq::DType
M, N, K = 19, 21, 192

pytestmark = pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc (CUDA toolkit) for -ptx")


@pytest.fixture(scope="module")
def ptx(pytestconfig, tmp_path_factory) -> str:
    """The kernel sources compiled to PTX for sm_86, one module per file, concatenated (cached by the
    sources' hash in pytest's cache: nvcc takes ~15 s)."""
    src = b"".join(f.read_bytes() for f in [*sorted(CSRC.glob("*.cu*")), CSRC / "kernels.h"])
    cache = getattr(pytestconfig, "cache", None)
    folder = cache.mkdir("ptx_exec") if cache is not None else tmp_path_factory.mktemp("ptx_exec")
    out = folder / f"kernels_sm86_{hashlib.sha256(src).hexdigest()[:16]}.ptx"
    if not out.exists():
        tmp = out.with_suffix(".tmp")
        modules = []
        for source in KERNEL_SOURCES:
            cmd = ["nvcc", "-std=c++17", "-O3", "-ptx", "-arch=sm_86", str(source), "-o", str(tmp)]
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
            assert res.returncode == 0, res.stderr[-3000:]
            modules.append(tmp.read_text())
        tmp.write_text("\n".join(modules))
        tmp.rename(out)
    return out.read_text()


@pytest.fixture(scope="module")
def prm() -> dict:
    return host_constants()


def host_constants() -> dict[str, int]:
    """The kernel sources' namespace-level ``constexpr int`` constants (tile sizes, threads, shared
    memory bytes: what their host code launches with), evaluated in order, C integer arithmetic."""
    env: dict[str, int] = {}
    text = "\n".join(f.read_text() for f in CONSTANT_SOURCES)
    for m in re.finditer(r"^constexpr int ([^;]+);", text, re.M):
        for decl in m.group(1).split(","):
            name, expr = (x.strip() for x in decl.split("=", 1))
            if not re.fullmatch(r"[\w\s+\-*/()]+", expr):
                raise ValueError(f"cannot evaluate {name} = {expr}")
            env[name] = int(eval(re.sub(r"(?<!/)/(?!/)", "//", expr), {"__builtins__": {}}, dict(env)))
    return env


def entry(ptx: str, pattern: str) -> str:
    names = re.findall(r"\.entry\s+([\w$]+)\s*\(", ptx)
    hits = [n for n in names if re.search(pattern, n)]
    assert len(hits) == 1, (pattern, names)
    return hits[0]


def _bytes(t: torch.Tensor) -> np.ndarray:
    return np.frombuffer(bytes(t.untyped_storage()), dtype=np.uint8)[t.storage_offset() * t.element_size() :]


def gate_inputs(m: int, n: int, images: int, dtype: torch.dtype, seed: int = 4) -> dict:
    """The epilogue's operands (w4a4_gemm's contract): partial [M, N] (another part's output, exact
    in 16 bits: multiples of 1/4 below 8), residual [M, N], gate [B, N]."""
    g = torch.Generator().manual_seed(seed)
    return {"partial": (torch.randint(-32, 32, (m, n), generator=g) / 4).to(dtype),
            "residual": (torch.randn(m, n, generator=g) * 8).to(dtype),
            "gate": torch.randn(images, n, generator=g).to(dtype)}  # fmt: skip


def tile_launch(prm: dict, small: bool) -> tuple[int, int, int, int]:
    """(kTileM, rows per tile, threads, dynamic shared memory) of one of the GEMM's two tiles, as
    svdq::w4a4_gemm launches Tile<kTileM>."""
    if small:
        return prm["kSmallBM"], prm["kSmallBM"], prm["kSmallThreads"], prm["kSmallSmemBytes"]
    return prm["kBM"], prm["kBM"], prm["kThreads"], prm["kSmemBytes"]


def run_gemm(ptx: str, prm: dict, r: int, unsigned: bool, src: str | None = None, gated: int = 0,
             out_dtype: torch.dtype = torch.float32, m: int = M, split_up: bool = False,
             small: bool = False):  # fmt: skip
    """``gated``: the gate/residual epilogue with that many images (gate rows), M divisible by it;
    ``split_up``: proj_up in fp32 beyond bf16, passed as bf16 hi + lo (the kernel's third MMA);
    ``small``: the small-M tile's instance (Tile<kSmallBM>), else the large one's."""
    a = exact_gemm_inputs(m, K, N, r, unsigned)
    a["wscales"] = a["wscales"].float().contiguous()
    e = gate_inputs(m, N, gated, out_dtype) if gated else {}
    mem = X.GlobalMemory()
    put = lambda name, t: mem.alloc(name, _bytes(t), readonly=True)  # noqa: E731
    asc = a["ascales"]  # group-major, strides (1, M)
    size = torch.empty(0, dtype=out_dtype).element_size()
    ldo = N + N % 2  # ops.cpp's padded rows for an odd N: every output pair one aligned store
    # partial, residual and gate in rows of ldo too (ops.cpp pads them the same way)
    pad = {k: torch.nn.functional.pad(v, (0, ldo - N)) for k, v in e.items()}
    up_lo = None
    if split_up and r:  # proj_up as fp32 that bf16 cannot hold: hi + lo, as ops.cpp's as_bf16_pair splits it
        a["proj_up"] = a["proj_up"].float() + torch.where(torch.arange(r) % 2 == 0, 1 / 256, -1 / 128)
        up_hi = a["proj_up"].to(torch.bfloat16)
        up_lo = (a["proj_up"] - up_hi.float()).to(torch.bfloat16)
        assert torch.equal(up_hi.float() + up_lo.float(), a["proj_up"])
        assert (up_lo != 0).float().mean() > 0.5  # most entries need the lo part
    args = [put("qx", a["qx"]), put("ascales", asc), asc.stride(0), asc.stride(1), put("qweight", a["qweight"]),
            put("wscales", a["wscales"]), a["wscales"].stride(0), a["wscales"].stride(1),
            put("lora_act", a["lora_act"]) if r else 0,
            (put("up_hi", up_hi) if up_lo is not None else put("up_hi", a["proj_up"])) if r else 0,
            put("up_lo", up_lo) if up_lo is not None else 0,
            put("bias", a["bias"]), DTYPE[torch.bfloat16], mem.alloc("out", m * ldo * size), ldo,
            put("partial", pad["partial"]) if gated else 0, put("residual", pad["residual"]) if gated else 0, put("gate", pad["gate"]) if gated else 0,
            m // gated if gated else 1, m, N, K, r]  # fmt: skip
    tout = {torch.float32: "f", torch.float16: "6__half", torch.bfloat16: "13__nv_bfloat16"}[out_dtype]
    tile_m, bm, threads, smem = tile_launch(prm, small)
    name = rf"w4a4_gemm_kernelILb{int(unsigned)}E{tout}Lb{int(bool(gated))}ELi{tile_m}EE"
    kernel = X.parse(src or ptx, entry(ptx, name))
    tiles = -(-m // bm) * -(-N // prm["kBN"])
    findings = X.launch(kernel, mem, args, (tiles, 1, 1), threads, smem)
    np_dtype = {torch.float32: np.float32, torch.float16: np.float16, torch.bfloat16: np.uint16}[out_dtype]
    y = torch.from_numpy(mem.get("out").view(np_dtype).reshape(m, ldo)[:, :N].copy())
    y = y.view(torch.bfloat16) if out_dtype == torch.bfloat16 else y
    want = reference.w4a4_gemm(**a, **e, unsigned=unsigned, out_dtype=out_dtype)
    return findings, y, want, mem.written("out").reshape(m, ldo * size)[:, : N * size]


@pytest.mark.parametrize(
    "r,unsigned,out_dtype,split_up",
    [(0, False, torch.float32, False), (5, True, torch.float32, False), (48, False, torch.float32, False),
     (40, True, torch.bfloat16, True)],
)  # fmt: skip
def test_cuda_gemm_ptx_matches_reference(ptx, prm, r, unsigned, out_dtype, split_up):
    """Ranks: none; 5 (odd: element loads of the low-rank operands); 48 (16-byte loads, two passes of
    32 ranks, the second half empty); 40 with proj_up split into bf16 hi + lo and a bf16 output."""
    findings, y, want, written = run_gemm(ptx, prm, r, unsigned, out_dtype=out_dtype, split_up=split_up)
    assert not findings, findings.report()
    assert written.all()
    assert torch.equal(y, want), (y - want).abs().max()


@pytest.mark.parametrize(
    "r,unsigned,images,out_dtype",
    [(5, True, 1, torch.bfloat16), (0, False, 2, torch.float16), (32, False, 5, torch.bfloat16)],
)
def test_cuda_gemm_gate_residual_epilogue_ptx_matches_reference(ptx, prm, r, unsigned, images, out_dtype):
    """The partial/gate/residual epilogue compiled: residual + gate * (y + partial) with the
    contract's three roundings to a 16-bit output, bit for bit (y + partial exact, so every
    rounding is the reference's); two images take their own gate rows (M = 20, rows 0..9, 10..19),
    five images rows of 4 (a thread's rows, 8 apart, skip a gate row)."""
    findings, y, want, written = run_gemm(ptx, prm, r, unsigned, gated=images, out_dtype=out_dtype, m=20)
    assert not findings, findings.report()
    assert written.all()
    assert torch.equal(y, want), (y.float() - want.float()).abs().max()
    plain = reference.w4a4_gemm(
        **exact_gemm_inputs(20, K, N, r, unsigned), unsigned=unsigned, out_dtype=out_dtype
    )
    assert not torch.equal(y, plain)  # the epilogue really ran


SMALL_M = 150  # two tile rows of the small tile, the second with 22 of its 128 rows


@pytest.mark.parametrize(
    "r,unsigned,images,out_dtype",
    [(48, False, 0, torch.bfloat16), (5, True, 2, torch.bfloat16)],
)
def test_cuda_gemm_small_tile_ptx_matches_reference(ptx, prm, r, unsigned, images, out_dtype):
    """The small-M tile (Tile<kSmallBM>: 8 warps, what the host launches for M <= kSmallMaxM) over two tile
    rows, the second partial: the plain instance (rank 48: 16-byte loads, two low-rank passes) and the
    partial/gate/residual epilogue's (two images: gate rows 0..74 and 75..149, the second crossing the tile
    boundary at row 128), bit for bit as the large tile; the host takes this tile at this M."""
    assert prm["kSmallMaxM"] >= SMALL_M and prm["kSmallBM"] < SMALL_M < 2 * prm["kSmallBM"]
    findings, y, want, written = run_gemm(
        ptx, prm, r, unsigned, gated=images, out_dtype=out_dtype, m=SMALL_M, small=True
    )
    assert not findings, findings.report()
    assert written.all()
    assert torch.equal(y, want), (y.float() - want.float()).abs().max()


@pytest.mark.parametrize("r,unsigned", [(0, False), (5, True), (48, False)])
def test_cuda_quantize_act_ptx_matches_reference(ptx, prm, r, unsigned):
    a = act_inputs(M, K, r, unsigned=unsigned)
    kw = {"group_size": 64, "unsigned": unsigned, "shift": 0.171875 if unsigned else 0.0}
    want = reference.quantize_act(a["x"], a["smooth"], a["proj_down"], **kw)
    knt = 4 if r <= 32 else 8
    kernel = X.parse(ptx, entry(ptx, rf"quantize_act_kernelI13__nv_bfloat16Li{knt}E"))
    mem = X.GlobalMemory()
    g = K // 64
    args = [mem.alloc("x", _bytes(a["x"]), True), mem.alloc("smooth", _bytes(a["smooth"]), True),
            DTYPE[torch.bfloat16], mem.alloc("down_hi", _bytes(a["proj_down"]), True) if r else 0, 0,
            mem.alloc("qx", M * K // 2), mem.alloc("ascales", M * g * 4), mem.alloc("lora_act", max(M * r * 4, 4)),
            M, K, r, kw["shift"], int(unsigned)]  # fmt: skip
    findings = X.launch(kernel, mem, args, (-(-M // prm["kQRows"]), 1, 1), 32 * prm["kQWarps"], 0)
    assert not findings, findings.report()
    qx = torch.from_numpy(mem.get("qx").reshape(M, K // 2).copy())
    sc = torch.from_numpy(mem.get("ascales").view(np.float32).copy())
    assert torch.equal(qx, want[0])
    # the scales in either layout (row-major [M, G], or group-major as issue 22 makes every backend)
    assert torch.equal(sc.view(M, g), want[1]) or torch.equal(sc.view(g, M).t(), want[1])
    if r:
        lora = torch.from_numpy(mem.get("lora_act").view(np.float32)[: M * r].reshape(M, r).copy())
        torch.testing.assert_close(lora, want[2], rtol=1e-4, atol=1e-4)
    assert mem.written("qx").all() and mem.written("ascales").all()


def test_cuda_gemm_without_its_barrier_races(ptx, prm):
    """The main loop's __syncthreads after cp_async_wait removed: the interpreter reports the race."""
    name = entry(ptx, rf"w4a4_gemm_kernelILb0EfLb0ELi{prm['kBM']}EE")
    body = ptx[ptx.index(name) :]
    m = re.search(r"cp\.async\.wait_group\s+\d+;(?:\s|//[^\n]*)*(bar\.sync\s+0;)", body)
    assert m, "no cp.async wait + barrier in the GEMM's PTX"
    cut = ptx.index(name) + m.start(1)
    broken = ptx[:cut] + ptx[cut + len(m.group(1)) :]
    findings, *_ = run_gemm(ptx, prm, 0, False, src=broken)
    assert findings.kinds() & {"race-raw", "race-war"}, findings.report()


def test_cuda_gemm_with_wait_count_one_too_high_reads_in_flight_data(ptx, prm):
    """cp_async_wait<kStages - 1> instead of <kStages - 2>: the stage about to be read may still be
    in flight; the interpreter reports it, and the result is wrong."""
    name = entry(ptx, rf"w4a4_gemm_kernelILb0EfLb0ELi{prm['kBM']}EE")
    start = ptx.index(name)
    m = re.search(r"cp\.async\.wait_group\s+(\d+);(?=(?:\s|//[^\n]*)*bar\.sync\s+0;)", ptx[start:])
    assert m and int(m.group(1)) == prm["kStages"] - 2
    cut = start + m.start(1)
    broken = ptx[:cut] + str(int(m.group(1)) + 1) + ptx[cut + len(m.group(1)) :]
    findings, y, want, _ = run_gemm(ptx, prm, 0, False, src=broken)
    assert "race-inflight" in findings.kinds(), findings.report()
    assert not torch.equal(y, want)
