"""The CUDA int4 backend: fragment layouts (host), fall-back, GPU tests.

Compilation and the static performance gates are in test_cuda_static.py; the CPU emulation of the kernels'
tiles and pipeline, on the PTX ISA emulator, in test_cuda_emulation.py."""

import pytest
import torch

from engine import kernels
from engine.kernels import reference

from .kernel_cases import act_inputs, gemm_inputs

# --- host model of the fragments, from the PTX ISA (mma.m16n8k64 with .s4/.u4, ldmatrix .b16) ---


def ldmatrix(smem: torch.Tensor, addresses: list[tuple[int, int]], count: int) -> list[list[bytes]]:
    """regs[lane][j]: 4 bytes thread ``lane`` receives from matrix j; lanes 8j..8j+7 give its row addresses."""
    regs = [[b""] * count for _ in range(32)]
    for j in range(count):
        rows = [addresses[8 * j + i] for i in range(8)]
        for lane in range(32):
            r, byte = rows[lane // 4]
            regs[lane][j] = bytes(smem[r, byte + 4 * (lane % 4) : byte + 4 * (lane % 4) + 4].tolist())
    return regs


def nibbles(word: bytes, signed: bool) -> list[int]:
    out = []
    for b in word:  # element 0 in the lowest bits
        for v in (b & 0xF, b >> 4):
            out.append(v - 16 if signed and v >= 8 else v)
    return out


def test_plain_layout_gives_the_mma_fragments():
    g = torch.Generator().manual_seed(0)
    a_codes = torch.randint(-8, 8, (16, 64), generator=g)  # one m16 tile, one group of 64 channels
    b_codes = torch.randint(-8, 8, (16, 64), generator=g)  # two n8 tiles of weight rows
    pack = lambda c: ((c[:, 0::2] & 0xF) | ((c[:, 1::2] & 0xF) << 4)).to(torch.uint8)  # noqa: E731
    sa, sb = pack(a_codes), pack(b_codes)  # [16, 32] bytes: the checkpoint's plain layout
    # The kernel's ldmatrix addresses (w4a4_gemm_kernel): A rows lane%16, bytes (lane/16)*16;
    # B rows (lane/16)*8 + lane%8, bytes ((lane/8)%2)*16 for n tiles nt and nt+1.
    a_regs = ldmatrix(sa, [(lane % 16, (lane // 16) * 16) for lane in range(32)], 4)
    b_regs = ldmatrix(sb, [((lane // 16) * 8 + lane % 8, ((lane // 8) % 2) * 16) for lane in range(32)], 4)
    a = torch.full((16, 64), 99)
    b = [torch.full((64, 8), 99), torch.full((64, 8), 99)]
    for lane in range(32):
        group, tig = lane // 4, lane % 4
        for i in range(4):  # A fragment: a_i rows group + 8*(i%2), cols tig*8 + j + 32*(i//2)
            for j, v in enumerate(nibbles(a_regs[lane][i], signed=True)):
                a[group + 8 * (i % 2), tig * 8 + j + 32 * (i // 2)] = v
        for nt in range(2):  # B fragment: b_i rows (k) tig*8 + j + 32*i, col (n) group
            for i in range(2):
                for j, v in enumerate(nibbles(b_regs[lane][2 * nt + i], signed=True)):
                    b[nt][tig * 8 + j + 32 * i, group] = v
    assert torch.equal(a, a_codes)  # every element placed once, where mma expects it
    assert torch.equal(torch.cat(b, dim=1), b_codes.T)
    # and so the MMA computes exactly the integer product of the plain codes
    assert torch.equal(a @ torch.cat(b, dim=1), a_codes @ b_codes.T)


def test_dispatch_falls_back_to_triton_when_the_extension_cannot_build(monkeypatch, caplog):
    import engine.kernels.cuda as cuda_backend
    import engine.kernels.triton_backend as tb

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 6))
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(cuda_backend, "_build", lambda: "could not build the extension (no nvcc)")
    monkeypatch.setattr(tb, "unavailable_reason", lambda device: None)
    monkeypatch.delenv("SVDQ_KERNELS", raising=False)
    kernels._resolve.cache_clear()
    try:
        with caplog.at_level("INFO"):
            assert kernels._resolve("auto", torch.device("cuda", 0)) is tb
        assert "cuda skipped: could not build the extension (no nvcc)" in caplog.text
        with pytest.raises(kernels.BackendUnavailableError, match="could not build the extension"):
            kernels._resolve("cuda", torch.device("cuda", 0))
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
        kernels._resolve.cache_clear()
        assert "no 4-bit integer MMA" in kernels.unavailable_reason("cuda", torch.device("cuda", 0))
    finally:
        kernels._resolve.cache_clear()


# --- on a GPU of compute capability 8.x -------------------------------------------------------

sm8x = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 8,
    reason="needs a GPU with int4 MMA (sm_80/86/89)",
)


@pytest.mark.gpu
@sm8x
@pytest.mark.parametrize("k,n", [(3072, 3072), (3072, 12288), (12288, 3072), (15360, 3072), (128, 40)])
@pytest.mark.parametrize("unsigned", [False, True])
def test_cuda_matches_reference(k, n, unsigned):
    from engine.kernels import cuda as cb

    m, r = 4352 if k > 128 else 37, 32
    a = act_inputs(m, k, r, unsigned=unsigned, device="cuda")
    kw = {"group_size": 64, "unsigned": unsigned, "shift": 0.171875 if unsigned else 0.0}
    got = cb.quantize_act(a["x"], a["smooth"], a["proj_down"], **kw)
    ref = reference.quantize_act(a["x"], a["smooth"], a["proj_down"], **kw)
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
    torch.testing.assert_close(got[2], ref[2], rtol=1e-4, atol=1e-4)
    g = gemm_inputs(m, k, n, r, unsigned=unsigned, device="cuda")
    g["ascales"].fill_(1.0)
    g["wscales"].fill_(1.0)
    exact = {**g, "lora_act": g["lora_act"][:, :0], "proj_up": g["proj_up"][:, :0], "bias": None}
    y = cb.w4a4_gemm(**exact, unsigned=unsigned, out_dtype=torch.float32)
    assert torch.equal(y, reference.w4a4_gemm(**exact, unsigned=unsigned, out_dtype=torch.float32))
    g = gemm_inputs(m, k, n, r, unsigned=unsigned, device="cuda")
    y = cb.w4a4_gemm(**g, unsigned=unsigned, out_dtype=torch.bfloat16)
    torch.testing.assert_close(
        y, reference.w4a4_gemm(**g, unsigned=unsigned, out_dtype=torch.bfloat16), rtol=1.6e-2, atol=1e-2
    )
    assert torch.equal(y, cb.w4a4_gemm(**g, unsigned=unsigned, out_dtype=torch.bfloat16))  # deterministic


@pytest.mark.gpu
@sm8x
@pytest.mark.parametrize("unsigned", [False, True])
def test_cuda_small_m_tile_is_bit_identical_to_the_large_tile(unsigned):
    """The text stream's M = 256 takes the 128-row tile (M <= kSmallMaxM), M = 1024 the 192-row one: the
    same rows come out bit for bit (same per-element order), with scales, the low-rank branch, bias and a
    bf16 output; also through the gate/residual epilogue's instance."""
    from engine.kernels import cuda as cb

    big, small, k, n = 1024, 256, 3072, 3072
    g = gemm_inputs(big, k, n, 32, unsigned=unsigned, device="cuda")
    rows = {**g, "qx": g["qx"][:small], "ascales": g["ascales"][:small], "lora_act": g["lora_act"][:small]}
    y = cb.w4a4_gemm(**g, unsigned=unsigned, out_dtype=torch.bfloat16)
    assert torch.equal(cb.w4a4_gemm(**rows, unsigned=unsigned, out_dtype=torch.bfloat16), y[:small])
    gen = torch.Generator(device="cuda").manual_seed(5)
    res = torch.randn(big, n, device="cuda", generator=gen).to(torch.bfloat16)
    gate = torch.randn(1, n, device="cuda", generator=gen).to(torch.bfloat16)
    h = cb.w4a4_gemm(**g, residual=res, gate=gate, unsigned=unsigned, out_dtype=torch.bfloat16)
    h_small = cb.w4a4_gemm(**rows, residual=res[:small], gate=gate, unsigned=unsigned, out_dtype=torch.bfloat16)
    assert torch.equal(h_small, h[:small])


@pytest.mark.gpu
@sm8x
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_cuda_partial_gate_residual_epilogue_matches_the_contract(out_dtype):
    """The epilogue instances on the GPU, FLUX's shape (two images of 2176 rows): bit for bit the
    contract's arithmetic (engine.quant.ops.gate_residual) on the kernel's own fp32 y + partial
    for 16-bit outputs; fp32 to one rounding of the FMA the contract allows."""
    from engine.kernels import cuda as cb
    from engine.quant.ops import gate_residual

    m, k, n = 4352, 3072, 3072
    gen = torch.Generator(device="cuda").manual_seed(3)
    g = gemm_inputs(m, k, n, 32, device="cuda")
    part = torch.randn(m, n, device="cuda", generator=gen).to(out_dtype)
    res = (16 * torch.randn(m, n, device="cuda", generator=gen)).to(out_dtype)
    gate = torch.randn(2, n, device="cuda", generator=gen).to(out_dtype)
    h = cb.w4a4_gemm(**g, partial=part, residual=res, gate=gate, unsigned=False, out_dtype=out_dtype)
    y = cb.w4a4_gemm(**g, unsigned=False, out_dtype=torch.float32) + part.float()
    want = gate_residual(y, res, gate, out_dtype)
    if out_dtype == torch.float32:
        torch.testing.assert_close(h, want, rtol=1e-6, atol=1e-5)
    else:
        assert torch.equal(h, want)


@pytest.mark.gpu
@sm8x
def test_cuda_scale_strides_nan_groups_and_alignment_errors():
    from engine.kernels import cuda as cb

    m, k, n, r = 300, 256, 200, 48  # ragged tiles, R > 32 (two low-rank passes in quantize_act)
    g = gemm_inputs(m, k, n, r, device="cuda", dtype=torch.float32)
    y = cb.w4a4_gemm(**g, unsigned=False, out_dtype=torch.float32)
    group_major = {  # logical [N, G] / [M, G], strides (1, N) / (1, M): the contract's layout
        **g,
        "wscales": g["wscales"].t().contiguous().t(),
        "ascales": g["ascales"].t().contiguous().t(),
    }
    assert group_major["wscales"].stride() == (1, n) and group_major["ascales"].stride() == (1, m)
    assert torch.equal(cb.w4a4_gemm(**group_major, unsigned=False, out_dtype=torch.float32), y)
    ref = reference.w4a4_gemm(**g, unsigned=False, out_dtype=torch.float32)
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-3)

    a = act_inputs(m, k, r, device="cuda")
    a["x"][5, 70] = float("nan")
    kw = {"group_size": 64, "unsigned": False, "shift": 0.0}
    got = cb.quantize_act(a["x"], a["smooth"], a["proj_down"], **kw)
    want = reference.quantize_act(a["x"], a["smooth"], a["proj_down"], **kw)
    assert torch.equal(got[0], want[0])
    assert torch.isnan(got[1][5, 1]) and torch.equal(got[1].nan_to_num(-1), want[1].nan_to_num(-1))
    assert got[1].stride() == (1, m)  # group-major, the contract's strides (torch.compile asserts them)

    misaligned = torch.empty(m * (k // 2) + 1, dtype=torch.uint8, device="cuda")[1:].view(m, k // 2)
    with pytest.raises(RuntimeError, match="16-byte aligned"):
        cb.w4a4_gemm(**{**g, "qx": misaligned}, unsigned=False, out_dtype=torch.float32)
