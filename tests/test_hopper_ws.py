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
    monkeypatch.setattr(gemm_sm90_ws, "_sm_count", lambda device: 132)
    monkeypatch.setattr(gemm_sm90_ws, "_serves", lambda device, split=False: serves)
    real = gemm_sm90.launch

    def ws_launch(qx, ascales, weight, *rest, split=None, **kw):
        assert isinstance(weight, gemm_sm90_ws.WsWeight)
        calls.append("ws" if split is None else ("ws split", split))
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


def test_hopper_dispatch_passes_the_planned_split_once_it_checks_on_the_device(monkeypatch):
    """A one-tile problem on 132 SMs: its last wave (the tile) in two slices of one group once the
    break-even is lowered to 0 and the split grid passed its device check; the plain grid where
    the split grid failed it."""
    from engine.kernels.triton import gemm_sm90_ws_split

    calls, keys = _route(monkeypatch)
    a = _inputs(12)
    keys += [a["qweight"], a["wscales"]]
    kw = {"unsigned": False, "out_dtype": torch.float32}
    tb.w4a4_gemm(**a, **kw)
    assert calls == ["ws"]  # 1 group saved < MIN_SAVED_GROUPS
    monkeypatch.setattr(gemm_sm90_ws_split, "MIN_SAVED_GROUPS", 0)
    tb.w4a4_gemm(**a, **kw)
    assert calls[-1] == ("ws split", gemm_sm90_ws_split.Split(full=0, slices=2, slice_groups=1))
    monkeypatch.setattr(gemm_sm90_ws, "_serves", lambda device, split=False: not split)
    tb.w4a4_gemm(**a, **kw)
    assert calls[-1] == "ws"


def test_hopper_dispatch_keeps_the_fp8_kernel_where_the_ws_kernel_fails_its_check(monkeypatch):
    calls, _ = _route(monkeypatch, serves=False)
    a = _inputs(12)
    tb.w4a4_gemm(**a, unsigned=False, out_dtype=torch.float32)
    assert calls == ["fp8"]


def test_ws_self_check_failure_is_logged_once_and_cached(monkeypatch, caplog):
    """A launch that raises (a Gluon kernel's first run on a GPU) is a logged "no", asked once."""
    tries = []

    def boom(device, split=None):
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


def test_serves_checks_the_split_grid_at_the_same_first_call(monkeypatch, caplog):
    """Both self-checks run once, at the first ``serves``; a split grid that fails its own is
    logged and ``split_for`` then gives no split (the plain grid serves)."""
    tries = []

    def check(device, split=None):
        tries.append(split)
        return split is None

    monkeypatch.setattr(gemm_sm90_ws, "self_check", check)
    monkeypatch.setattr(gemm_sm90_ws, "_sm_count", lambda device: 132)
    gemm_sm90_ws._serves.cache_clear()
    try:
        cpu = torch.device("cpu")
        with caplog.at_level("WARNING"):
            assert gemm_sm90_ws.serves(cpu) and gemm_sm90_ws.serves(cpu)
        assert tries == [None, gemm_sm90_ws.CHECK_SPLIT] and "split-K grid" in caplog.text
        assert gemm_sm90_ws.plan(4352, 3072, 3072, 132) is not None
        assert gemm_sm90_ws.split_for(cpu, 4352, 3072, 3072) is None
        assert len(tries) == 2
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

    def stand_in(qx, ascales, weight, *rest, split=None, **kw):
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


def test_plan_splits_only_the_n3072_last_waves_at_flux_size():
    """At M = 4352 on 132 SMs: the N = 3072 shapes (816 tiles: 6 waves + 24) in 5 slices of 10,
    10, 10, 10 and 8 groups (K = 3072), 21504 (5712 tiles: 43 waves + 36) in 3; the others'
    last waves (72 and 96 tiles) are more than half full: no split."""
    from engine.kernels.triton.gemm_sm90_ws_split import Split, plan_split

    assert gemm_sm90_ws.plan(4352, 3072, 3072, 132) == Split(full=792, slices=5, slice_groups=10)
    assert gemm_sm90_ws.plan(4352, 3072, 12288, 132) == Split(full=792, slices=5, slice_groups=39)
    assert gemm_sm90_ws.plan(4352, 21504, 3072, 132) == Split(full=5676, slices=3, slice_groups=16)
    assert gemm_sm90_ws.plan(4352, 9216, 3072, 132) is None
    assert gemm_sm90_ws.plan(4352, 12288, 3072, 132) is None
    assert plan_split(264, 48, 132) is None  # whole waves
    assert plan_split(133, 8, 132) is None  # a 1-tile remainder of 8 groups: too little to gain
    assert plan_split(133, 5, 132) is None
    assert plan_split(140, 48, 132) == Split(full=132, slices=16, slice_groups=3)
    with pytest.raises(ValueError, match="sms"):
        plan_split(10, 4, 0)


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
def test_sum_slices_adds_them_in_slice_order_then_the_bias(out_dtype):
    """The sum (TRITON_INTERPRET on a CPU) against ((p0 + p1) + p2) + bias rounded once, with
    partials where another order gives other bits (1 + 2^-24 + 2^-24), on the split tiles of a
    3 x 3 grid with partial edge tiles, in the GEMM's grouped tile order; other tiles untouched."""
    from engine.kernels.triton.gemm_sm90_ws_split import Split, sum_slices, workspace_shape

    m, n, bm, bn = 300, 272, 128, 128
    split = Split(full=5, slices=3, slice_groups=4)
    g = torch.Generator().manual_seed(1)
    space = torch.randn(workspace_shape(9, split, bm, bn), generator=g)
    space[0, 0], space[0, 1], space[0, 2] = 1.0, 2.0**-24, 2.0**-24  # tile 5: order-sensitive
    bias = torch.randn(n, generator=g).to(torch.bfloat16)
    bias[128] = 0.0
    out = torch.full((m, n), 7.0, dtype=out_dtype)
    sum_slices(space, bias, out, split, group_m=8)
    want = torch.full((m, n), 7.0, dtype=out_dtype)
    num_m, num_n = 3, 3
    for q in range(4):
        t = split.full + q  # grouped order (gemm_sm90_ws.w4a4_gemm_sm90_ws_kernel), GROUP_M = 8
        width = 8 * num_n
        first = (t // width) * 8
        size = min(num_m - first, 8)
        om, on = (first + (t % width) % size) * bm, ((t % width) // size) * bn
        acc = (space[q, 0] + space[q, 1]) + space[q, 2]
        acc = acc[:, : min(bn, n - on)] + bias[on : on + bn].float()
        want[om : om + bm, on : on + bn] = acc[: min(bm, m - om)].to(out_dtype)
    assert torch.equal(out, want)
    # tile 5 is at rows 256.., columns 128..: slice order gives 1, the other grouping 1 + 2^-23
    assert out[256, 128].item() == 1.0
    assert (space[0, 0, 0, 0] + (space[0, 1, 0, 0] + space[0, 2, 0, 0])).item() != 1.0
