"""The W4A8 sm_90 GEMM's weight layout (engine/kernels/triton/gemm_sm90_w4a8.prepare_weight): the
kernel expands each 32-bit word of packed sign-magnitude codes with three instructions,
lo = w & 0x87878787 and hi = rotate_right(w, 4) & 0x87878787 (its inline PTX: and.b32,
shf.r.wrap.b32, and.b32). Emulated here bit for bit on the host over every code -7..7 in every
position of a word, the e4m3 bytes must be the codes times 2^-9 at the channels the kernel's two
wgmmas pair them with (channels kk and 32 + kk of the group for byte kk); a code -8 has no
sign-magnitude form and the weight is refused (None)."""

import pytest
import torch

from engine.kernels.triton import gemm_sm90_w4a8 as w4a8
from engine.quant import pack_int4

MASK = w4a8.SIGN_MAGNITUDE_MASK


def _expand(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's expansion on the host: packed u8 [N, K/2] -> (lo, hi) e4m3 bytes [N, K/2]."""
    w = packed.contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF  # little-endian words
    rot = ((w >> 4) | (w << 28)) & 0xFFFFFFFF  # shf.r.wrap.b32 d, w, w, 4
    lo, hi = w & MASK, rot & MASK
    as_bytes = lambda v: v.to(torch.int32).contiguous().view(torch.uint8)  # noqa: E731
    return as_bytes(lo), as_bytes(hi)


def test_random_codes_expand_to_their_e4m3_values():
    g = torch.Generator().manual_seed(0)
    n, k = 60, 256
    codes = torch.randint(-7, 8, (n, k), generator=g, dtype=torch.int8)
    codes[:15] = torch.arange(-7, 8, dtype=torch.int8)[:, None]  # whole rows of each code
    wscales = torch.rand(n, k // 64, generator=g).to(torch.bfloat16)
    weight = w4a8.prepare_weight(pack_int4(codes), wscales)
    assert weight is not None and weight.packed.shape == (n, k // 2) and weight.packed.dtype == torch.uint8
    lo, hi = _expand(weight.packed)
    val = lambda b: b.view(torch.float8_e4m3fn).float()  # noqa: E731
    grp = codes.view(n, k // 64, 2, 32).float() * 2.0**-9  # [N, G, half, kk]
    assert torch.equal(val(lo).view(n, k // 64, 32), grp[:, :, 0])
    assert torch.equal(val(hi).view(n, k // 64, 32), grp[:, :, 1])
    # the scales: times 2^9 (the codes' unit), exact, group-major
    assert torch.equal(weight.sw, (wscales.float() * 512).t())


def test_all_positions_of_a_word_hold_each_code():
    """The sign bit of a "hi" code lives in the next byte of its word: every (code, byte) pair."""
    n, k = 15 * 4, 64
    codes = torch.zeros(n, k, dtype=torch.int8)
    for q in range(-7, 8):
        for j in range(4):
            row = 4 * (q + 7) + j
            codes[row, j::4] = q  # code q at byte position j of every word, lo and hi channels
    lo, hi = _expand(w4a8.prepare_weight(pack_int4(codes), torch.ones(n, 1)).packed)
    want = codes.float() * 2.0**-9
    assert torch.equal(lo.view(torch.float8_e4m3fn).float(), want[:, :32])
    assert torch.equal(hi.view(torch.float8_e4m3fn).float(), want[:, 32:])


@pytest.mark.parametrize("where", [(0, 0), (5, 37), (9, 127)])
def test_a_code_of_minus_8_is_refused(where):
    codes = torch.randint(-7, 8, (10, 128), generator=torch.Generator().manual_seed(1), dtype=torch.int8)
    codes[where] = -8
    assert w4a8.prepare_weight(pack_int4(codes), torch.ones(10, 2)) is None


def test_mismatched_scales_name_the_field():
    with pytest.raises(ValueError, match="wscales"):
        w4a8.prepare_weight(pack_int4(torch.zeros(4, 128, dtype=torch.int8)), torch.ones(4, 3))
