"""The warp-specialized sm_90 GEMM (engine/kernels/triton/gemm_sm90_ws.py): its weight transform
and its place in the Hopper dispatch. The kernel itself is a Gluon kernel, which does not run
under TRITON_INTERPRET: its compiled PTX is executed in tests/test_hopper_ws_exec.py and its
compiled loop gated in tests/test_hopper_ws_static.py; here the dispatch is exercised with its
launch standing in (the FP8 kernel computes the same product).
"""

import pytest
import torch

from engine.kernels import reference
from engine.quant import unpack_int4

from .kernel_cases import gemm_inputs

tb = pytest.importorskip("engine.kernels.triton_backend")
from engine.kernels.triton import gemm_sm90, gemm_sm90_ws  # noqa: E402 (after the importorskip)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {"rtol": 2e-3, "atol": 2e-3}


def test_offset_term_is_minus_eight_times_the_group_column_sums():
    """wcorr[g, n] = -8 * sum over group g of weight codes * wscale[n, g] (from the plain codes),
    and the shared e4m3 weight and scales are the FP8 kernel's own."""
    a = gemm_inputs(3, 256, 48, 0, device="cpu")
    base = gemm_sm90.prepare_weight(a["qweight"], a["wscales"])
    w = gemm_sm90_ws.prepare_weight(base)
    codes = unpack_int4(a["qweight"]).double().view(48, 4, 64)
    want = (-8 * codes.sum(dim=2) * a["wscales"].double()).t()
    assert w.w8 is base.w8
    assert w.swc.dtype == torch.float32 and w.swc.is_contiguous() and w.swc.shape == (4, 24, 2, 2)
    torch.testing.assert_close(w.wcorr.double(), want, rtol=2**-24, atol=0)
    # the interleaved scales are the FP8 kernel's (times 2^9), column pair by column pair
    assert torch.equal(w.swc[:, :, 0].reshape(4, 48), base.wscales)
    # the unsigned path's: column 16 jj + 8 j2 + 2 q + c at [g, jj, q, j2, c]
    g, jj, q, j2, c = 3, 2, 1, 1, 0
    assert w.wscales[g, jj, q, j2, c] == base.wscales[g, 16 * jj + 8 * j2 + 2 * q + c]
    assert torch.equal(w.wscales.transpose(2, 3).reshape(4, 48), base.wscales)


def _route(monkeypatch, serves: bool = True) -> list:
    """CC 9, both kernels pass their device checks, small M counts as large; the ws launch is
    recorded and computed by the FP8 kernel from the weight it was given."""
    calls = []
    monkeypatch.setattr(tb, "_major", lambda device: 9)
    monkeypatch.setattr(gemm_sm90, "serves", lambda device: True)
    monkeypatch.setattr(gemm_sm90_ws, "serves", lambda device: serves)
    monkeypatch.setattr(gemm_sm90_ws, "MIN_M", 8)
    real = gemm_sm90.launch

    def ws_launch(qx, ascales, weight, *rest, **kw):
        assert isinstance(weight, gemm_sm90_ws.WsWeight)
        calls.append("ws")
        base = tb.sm90_weight(*keys)
        return real(qx, ascales, base, *rest, **kw)

    keys = []
    monkeypatch.setattr(gemm_sm90_ws, "launch", ws_launch)
    monkeypatch.setattr(gemm_sm90, "launch", lambda *a, **kw: calls.append("fp8") or real(*a, **kw))
    return calls, keys


def _inputs(m: int) -> dict:
    """GEMM inputs with group-major ascales (strides (1, M)), as quantize_act returns them."""
    a = gemm_inputs(m, 128, 32, 4, device=DEVICE)
    a["ascales"] = a["ascales"].t().contiguous().t()
    return a


def test_hopper_dispatch_takes_the_ws_kernel_for_large_group_major_problems(monkeypatch):
    calls, keys = _route(monkeypatch)
    a = _inputs(12)  # M % 4 == 0
    keys += [a["qweight"], a["wscales"]]
    kw = {"unsigned": False, "out_dtype": torch.float32}
    y = tb.w4a4_gemm(**a, **kw)
    assert calls == ["ws"]
    torch.testing.assert_close(y, reference.w4a4_gemm(**a, **kw), **TOL)
    a_small = _inputs(4)  # M below MIN_M: the FP8 kernel
    tb.w4a4_gemm(**a_small, **kw)
    assert calls == ["ws", "fp8"]
    a_odd = _inputs(13)  # M % 4 != 0: the TMA rows misalign
    tb.w4a4_gemm(**a_odd, **kw)
    assert calls[-1] == "fp8"
    row_major = dict(a, ascales=a["ascales"].contiguous())
    tb.w4a4_gemm(**row_major, **kw)
    assert calls[-1] == "fp8"


def test_hopper_dispatch_keeps_the_fp8_kernel_where_the_ws_kernel_fails_its_check(monkeypatch):
    calls, _ = _route(monkeypatch, serves=False)
    a = _inputs(12)
    tb.w4a4_gemm(**a, unsigned=False, out_dtype=torch.float32)
    assert calls == ["fp8"]


def test_ws_self_check_failure_is_logged_once_and_cached(monkeypatch, caplog):
    """A launch that raises (a Gluon kernel's first run on a GPU) is a logged "no", asked once."""
    tries = []

    def boom(device):
        tries.append(device)
        raise RuntimeError("TMA descriptor rejected")

    monkeypatch.setattr(gemm_sm90_ws, "self_check", boom)
    gemm_sm90_ws._serves.cache_clear()
    try:
        with caplog.at_level("WARNING"):
            assert not gemm_sm90_ws.serves(torch.device("cpu"))
            assert not gemm_sm90_ws.serves(torch.device("cpu"))
        assert len(tries) == 1 and "TMA descriptor rejected" in caplog.text
    finally:
        gemm_sm90_ws._serves.cache_clear()


def test_supports_the_flux_shapes():
    for k, n in [(3072, 3072), (3072, 9216), (3072, 12288), (12288, 3072), (15360, 3072), (3072, 21504)]:
        assert gemm_sm90_ws.supports(4352, n, k, 32, 64)
    assert not gemm_sm90_ws.supports(4353, 3072, 3072, 32, 64)  # ascales rows 16-byte aligned
    assert not gemm_sm90_ws.supports(4352, 3072, 3072, 96, 64)  # the low-rank tile
    assert not gemm_sm90_ws.supports(4352, 3072, 3072, 32, 128)  # one group per ring slot
    assert not gemm_sm90_ws.supports(4352, 3080, 3072, 32, 64)  # the scale layouts: N % 16


@pytest.mark.slow
@pytest.mark.parametrize("broken", [False, True])
def test_self_check_passes_a_right_kernel_and_fails_a_wrong_one(monkeypatch, broken):
    """self_check with the ws launch standing in as the FP8 kernel (right) or as the FP8 kernel
    with one weight code changed (wrong: the extreme-codes product then differs)."""
    real = gemm_sm90.launch

    def stand_in(qx, ascales, weight, *rest, **kw):
        w8 = weight.w8.clone()
        if broken:
            w8[0, 0] = torch.tensor(float(w8[0, 0].float()) + 1).to(w8.dtype)
        n, k = w8.shape
        base = gemm_sm90.Sm90Weight(w8, weight.swc[:, :, 0].reshape(k // 64, n), torch.zeros(2, k // 64, n))
        if kw["unsigned"]:
            return real(qx, ascales, base, *rest, **kw)
        # the FP8 kernel's own offset correction needs its bf16 halves: recompute them from the codes
        return real(qx, ascales, gemm_sm90.prepare_weight(*_plain(w8, base.wscales)), *rest, **kw)

    monkeypatch.setattr(gemm_sm90_ws, "launch", stand_in)
    assert gemm_sm90_ws.self_check(torch.device(DEVICE)) is not broken


def _plain(w8: torch.Tensor, wscales: torch.Tensor) -> tuple:
    """e4m3 codes (even channels then odd, per group) and scales x 2^9 -> packed codes, scales."""
    from engine.quant import pack_int4

    n, k = w8.shape
    codes = w8.float().view(n, k // 64, 2, 32).transpose(2, 3).reshape(n, k).to(torch.int8)
    return pack_int4(codes), (wscales.t() * gemm_sm90.A_UNIT)
