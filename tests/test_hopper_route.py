"""perfmodel.hopper_route: the kernel the H100's dispatch runs for a W4A4 GEMM call, which the image
model's H100 column prices (perfmodel.image_price.KernelTimes.hopper_gemm).

The route is read by running the Triton backend's own ``w4a4_gemm`` on meta tensors; these tests
hold what it must find for the calls FLUX makes (and fail if the dispatch changes them), check
that it follows the dispatch's constants rather than a copy of them, and that the price is the
routed kernel's model (in a child process: the kernels compile for sm_90, not the interpreter).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from perfmodel.devices import H100
from perfmodel.hopper_route import route, takes_w4a8

from engine.kernels.triton import gemm_sm90, gemm_sm90_ws

from .ptx_compile import run_compiled

ROOT = Path(__file__).resolve().parents[1]
META = {"device": "meta"}


def call(m: int, k: int, n: int, *, rank: int = 32, unsigned: bool = False, epilogue: str = "",
         group_major: bool = True) -> tuple:  # fmt: skip
    """A w4a4_gemm call's args as the custom op passes them (quantize_act's group-major scales);
    ``epilogue``: "gated" (residual + gate) or "partial" (partial + residual + gate)."""
    g = k // 64
    ascales = torch.empty(g, m, dtype=torch.float32, **META).t() if group_major else torch.empty(m, g, **META)
    bf16 = {"dtype": torch.bfloat16, **META}
    partial = torch.empty(m, n, **bf16) if epilogue == "partial" else None
    residual = torch.empty(m, n, **bf16) if epilogue else None
    gate = torch.empty(1, n, **bf16) if epilogue else None
    return (
        torch.empty(m, k // 2, dtype=torch.uint8, **META),
        ascales,
        torch.empty(n, k // 2, dtype=torch.uint8, **META),
        torch.empty(n, g, **bf16),
        torch.empty(m, rank, dtype=torch.float32, **META),
        torch.empty(n, rank, **bf16),
        torch.empty(n, **bf16),
        partial,
        residual,
        gate,
        unsigned,
        torch.bfloat16,
    )


def test_the_image_stream_takes_the_ws_kernel_and_its_split_where_planned():
    r = route(call(4352, 3072, 3072))  # the single blocks' first proj_out part: 7 waves, the last 24 tiles
    split = gemm_sm90_ws.plan(4352, 3072, 3072, H100.sms)
    assert split is not None
    assert (r.kernel, r.split, r.out_dtype, r.epilogue_bytes) == ("ws", split, torch.bfloat16, 0)
    r = route(call(4096, 3072, 9216))  # 32 x 72 tiles: the last wave over half full, no split
    assert gemm_sm90_ws.plan(4096, 9216, 3072, H100.sms) is None
    assert (r.kernel, r.split) == ("ws", None)


def test_the_text_stream_takes_the_fp8_kernel():
    """M <= 1024 (the text stream: 256 tokens per image) goes to gemm_sm90.py; 1028 is the ws kernel's."""
    for m in (256, 512, 1024):
        assert route(call(m, 3072, 12288)).kernel == "fp8", m
    assert route(call(1028, 3072, 12288)).kernel == "ws"


def test_row_major_scales_and_wide_ranks_leave_the_ws_kernel():
    assert route(call(4352, 3072, 3072, group_major=False)).kernel == "fp8"  # ws reads group-major scales
    r = route(call(4352, 3072, 3072, rank=96, epilogue="gated"))  # wider than the FP8 kernels' rank tile:
    assert (r.kernel, r.out_dtype, r.epilogue_bytes) == ("int8", torch.bfloat16, 0)  # the int8 kernel's epilogue


def test_epilogue_calls_write_fp32_and_run_the_epilogue_kernel():
    """On the FP8 route the epilogue runs after the kernel as triton/epilogue.py's one pass: the fp32
    sum, residual and gate read, the bf16 result written; the partial adds its read."""
    m, n = 4096, 3072
    gated = route(call(m, 12288, n, unsigned=True, epilogue="gated"))
    assert (gated.kernel, gated.out_dtype, gated.unsigned) == ("ws", torch.float32, True)
    assert gated.epilogue_bytes == 4 * m * n + 2 * m * n + 2 * m * n + 2 * n  # acc, residual, out, gate
    partial = route(call(m, 12288, n, unsigned=True, epilogue="partial"))
    assert partial.epilogue_bytes == gated.epilogue_bytes + 2 * m * n
    text = route(call(256, 3072, n, epilogue="gated"))
    assert (text.kernel, text.out_dtype) == ("fp8", torch.float32) and text.epilogue_bytes
    assert route(call(m, 12288, n)).epilogue_bytes == 0


def test_the_route_follows_the_dispatch_not_a_copy_of_it(monkeypatch):
    """Move the dispatch's thresholds and the route moves with them."""
    monkeypatch.setattr(gemm_sm90_ws, "MIN_M", 10**9)
    assert route(call(4352, 3072, 3072)).kernel == "fp8"
    monkeypatch.setattr(gemm_sm90, "MAX_RANK", 16)
    assert route(call(4352, 3072, 3072)).kernel == "int8"


def test_the_h100_runs_the_triton_backend():
    """The CUDA extension (first in auto's order) serves compute capability 8.x only."""
    from engine.kernels import _AUTO_ORDER
    from engine.kernels.cuda import SUPPORTED_ARCHS

    assert _AUTO_ORDER["cuda"][:2] == ("cuda", "triton")
    assert (9, 0) not in SUPPORTED_ARCHS


def test_one_images_calls_by_route():
    """One image, 4 steps, as an H100 runs it (the W4A8 route taken where kernels.w4a8_route takes
    it): the text stream's GEMMs (19 double blocks x 4, M = 256) W4A4 on the FP8 kernel, the image
    stream's and the single blocks' (19 x 4 + 38 x 3) on the W4A8 kernel (its split where planned);
    the epilogue kernel on every gated call (out-projections and fc2 of both streams, proj_out's
    second part)."""
    from perfmodel.image import h100_routes

    c = h100_routes(1)
    assert c["fp8"] == 4 * 19 * 4
    assert c["w4a8"] + c.get("w4a8 split", 0) == 4 * (19 * 4 + 38 * 3)
    assert c["epilogue kernel"] == 4 * (19 * 4 + 38)
    assert not {"ws", "ws split", "int8"} & set(c)


def test_the_w4a8_route_on_an_h100():
    """kernels.w4a8_route as an H100 would take it: the image stream's and single blocks' calls
    (M > 1024) run W4A8; the text stream's (M <= 1024) and a rank past the W4A8 GEMM's limit
    stay W4A4."""
    for m, k, n in ((4352, 3072, 3072), (4096, 3072, 12288), (4096, 12288, 3072), (4352, 3072, 21504)):
        assert takes_w4a8(m, k, n), (m, k, n)
    assert not takes_w4a8(1024, 3072, 12288) and not takes_w4a8(256, 3072, 3072)
    assert not takes_w4a8(4352, 3072, 3072, rank=32 + 64)


_PRICE = """
import json, sys, torch
sys.path.insert(0, "scripts")
from tests.test_hopper_route import call
from perfmodel.hopper import sm90_entry, sm90_model
from perfmodel.hopper_calibration import DEFAULT_L2
from perfmodel.hopper_ws import ws_model, ws_static
from perfmodel.image_price import EPILOGUE_COL, KernelTimes, dram_s
from perfmodel.image_trace import Op
from engine.kernels.triton import gemm_sm90

kt = KernelTimes()
out = {}
# ws with its split, fp32 out and the epilogue kernel (the single blocks' proj_out second part)
args = call(4352, 12288, 3072, unsigned=True, epilogue="partial")
got = kt.hopper_gemm(Op("svdq.w4a4_gemm", "x", [], 0, 0, 0, args))
model = ws_model(ws_static(4352, 12288, 3072, True, out_dtype=torch.float32), DEFAULT_L2, 0.0)
glue = dram_s(4352 * 3072 * (4 + 2 + 2 + 2) + 2 * 3072, "H100 SXM")  # acc fp32; partial, residual, out bf16; gate
out["ws"] = [got["W4A4 GEMM"], model["split"]["gemm_us"] * 1e-6, model["split"]["planned"], model["gemm_us"] * 1e-6,
             got[EPILOGUE_COL], glue]
# the FP8 kernel at the text stream's M, its launcher's config
args = call(256, 3072, 12288)
got = kt.hopper_gemm(Op("svdq.w4a4_gemm", "x", [], 0, 0, 0, args))
e = sm90_entry(256, 3072, 12288, gemm_sm90.sm90_config(256), False)
out["fp8"] = [got["W4A4 GEMM"], sm90_model(e, DEFAULT_L2, 0.0)["gemm_us"] * 1e-6, got[EPILOGUE_COL]]
print(json.dumps(out))
"""


def test_the_h100_price_is_the_routed_kernels_model():
    res = run_compiled([sys.executable, "-c", _PRICE])
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    got, split_s, planned, plain_s, epi, glue = out["ws"]
    assert planned and got == pytest.approx(split_s) and split_s != pytest.approx(plain_s)
    assert epi == pytest.approx(glue) and epi > 0
    got, model_s, epi = out["fp8"]
    assert got == pytest.approx(model_s) and epi == 0


# --- the W4A8 route's calls (svdq.w4a8_gemm, svdq.quantize_act_fp8) as the image model prices them ---


def w4a8_call(m: int, k: int, n: int, *, rank: int = 32, epilogue: str = "") -> tuple:
    """A w4a8_gemm call's args as the custom op passes them (SVDQLinear's group-major wscales);
    ``epilogue`` as in ``call``."""
    g = k // 64
    bf16 = {"dtype": torch.bfloat16, **META}
    partial = torch.empty(m, n, **bf16) if epilogue == "partial" else None
    residual = torch.empty(m, n, **bf16) if epilogue else None
    gate = torch.empty(1, n, **bf16) if epilogue else None
    return (
        torch.empty(m, k, dtype=torch.float8_e4m3fn, **META),
        torch.empty(m, dtype=torch.float32, **META),
        torch.empty(n, k // 2, dtype=torch.uint8, **META),
        torch.empty(g, n, **bf16).t(),
        torch.empty(m, rank, dtype=torch.float32, **META),
        torch.empty(n, rank, **bf16),
        torch.empty(n, **bf16),
        partial,
        residual,
        gate,
        torch.bfloat16,
    )


def fp8_call(m: int, k: int, prologue: str = "", rank: int = 32) -> tuple:
    """A quantize_act_fp8 call's args (x, smooth, proj_down, mod_scale, mod_shift, shift, gelu)."""
    bf16 = {"dtype": torch.bfloat16, **META}
    mod = (torch.empty(1, k, **bf16), torch.empty(1, k, **bf16)) if prologue == "modulation" else (None, None)
    return (torch.empty(m, k, **bf16), torch.empty(k, **bf16), torch.empty(rank, k, **bf16), *mod, 0.0,
            prologue == "gelu")  # fmt: skip


def _planned_w4a8_split(m: int, k: int, n: int):
    """The split gemm_sm90_w4a8 plans on an H100 (None while the kernel has no split-K)."""
    from engine.kernels.triton import gemm_sm90_w4a8

    plan = getattr(gemm_sm90_w4a8, "plan", None)
    return plan(m, n, k, H100.sms) if plan is not None else None


def test_the_w4a8_route_reads_the_dispatch():
    """triton_backend.w4a8_gemm on the call's meta tensors: the W4A8 kernel, bf16 out without an
    epilogue; with one, fp32 out and triton/epilogue.py's pass after it (as the W4A4 route)."""
    from perfmodel.hopper_route import w4a8_route

    for m, k, n in ((4352, 3072, 21504), (4352, 3072, 3072)):  # the latter's last wave: 16 of 544 tiles
        r = w4a8_route(w4a8_call(m, k, n))
        assert (r.kernel, r.m, r.k, r.n, r.rank) == ("w4a8", m, k, n, 32)
        assert (r.out_dtype, r.epilogue_bytes, r.split) == (torch.bfloat16, 0, _planned_w4a8_split(m, k, n))
    m, k, n = 4096, 12288, 3072
    gated = w4a8_route(w4a8_call(m, k, n, epilogue="gated"))
    assert gated.out_dtype == torch.float32
    assert gated.epilogue_bytes == 4 * m * n + 2 * m * n + 2 * m * n + 2 * n  # acc, residual, out, gate
    partial = w4a8_route(w4a8_call(m, k, n, epilogue="partial"))
    assert partial.epilogue_bytes == gated.epilogue_bytes + 2 * m * n


def test_the_w4a8_route_follows_the_kernels_limits(monkeypatch):
    """A call the W4A8 kernel does not take runs the reference's arithmetic: not an H100 route, so
    the image model must not price it as the kernel."""
    from perfmodel.hopper_route import w4a8_route

    from engine.kernels.triton import gemm_sm90_w4a8

    with pytest.raises(ValueError, match="reference"):
        w4a8_route(w4a8_call(4352, 3072, 3072, rank=gemm_sm90_w4a8.MAX_RANK + 16))
    monkeypatch.setattr(gemm_sm90_w4a8, "supports", lambda *a: False)
    with pytest.raises(ValueError, match="reference"):
        w4a8_route(w4a8_call(4352, 3072, 3072))


_PRICE_W4A8 = """
import json, sys, torch
from tests.test_hopper_route import fp8_call, w4a8_call
from engine.kernels.triton import gemm_sm90_w4a8
from engine.kernels.triton.act_fp8 import ACT_FP8_CONFIGS
from perfmodel import hopper_w4a8
from perfmodel.act_fp8 import compile_act_fp8, model_act_fp8
from perfmodel.devices import H100
from perfmodel.hopper_calibration import DEFAULT_L2
from perfmodel.hopper_route import w4a8_route
from perfmodel.image_price import EPILOGUE_COL, KernelTimes, dram_s, price, stage
from perfmodel.image_trace import Op

kt = KernelTimes()
cfg = gemm_sm90_w4a8.CONFIG
e = hopper_w4a8.compiled_gemm(hopper_w4a8.Tile("launch", cfg.block_w, cfg.block_t, cfg.stages))
g = hopper_w4a8.group_terms(e, DEFAULT_L2)
out, ops = {"gemm": [], "quant": {}}, []
for m, k, n, epi in ((4352, 3072, 21504, ""), (4352, 3072, 3072, ""), (4096, 12288, 3072, "gated")):
    op = Op("svdq.w4a8_gemm", "x", [], 0, 0, 0, w4a8_call(m, k, n, epilogue=epi))
    got, r = kt.hopper_w4a8_gemm(op), w4a8_route(op.args)
    t = hopper_w4a8.gemm_time(e, g, m, k, n, DEFAULT_L2)
    want = (t["split"]["gemm_us"] if r.split is not None else t["gemm_us"]) * 1e-6
    out["gemm"].append([got["W4A8 GEMM"], want, got[EPILOGUE_COL], dram_s(r.epilogue_bytes, "H100 SXM"),
                        price(op, "H100 SXM", kt, compiled=True, sage=True), t["waves"]])
    ops.append(op)
for prologue in ("", "modulation", "gelu"):
    op = Op("svdq.quantize_act_fp8", "x", [], 0, 0, 0, fp8_call(4352, 12288, prologue))
    want = model_act_fp8(4352, 12288, H100, compile_act_fp8(12288, prologue, m=4352), ACT_FP8_CONFIGS[9])["us"]
    out["quant"][prologue] = [price(op, "H100 SXM", kt, compiled=True, sage=True), want * 1e-6]
    ops.append(op)
st = stage("t", {"A40": [], "H100 SXM": ops}, kt, compiled=True, sage=True)
out["cols"], out["a40"] = st.detail["H100 SXM"], []
for op in ops[2:4]:
    try:
        price(op, "A40", kt, compiled=True, sage=True)
    except ValueError as exc:
        out["a40"].append(str(exc))
print(json.dumps(out))
"""


@pytest.mark.slow  # seconds of compiling (and PTX interpretation): CI runs it, -m 'not slow' skips it
def test_the_h100_price_of_the_w4a8_ops_is_their_models():
    """w4a8_gemm: perfmodel.hopper_w4a8's model of the compiled kernel (its launch tile) at the
    call's M, K, N (waves, DRAM floor; the split the dispatch plans), plus the epilogue kernel's
    pass; quantize_act_fp8: perfmodel.act_fp8's model of the compiled variant the call runs. Their
    stage columns, and no A40 price (the A40 has no W4A8 route)."""
    res = run_compiled([sys.executable, "-c", _PRICE_W4A8], scripts=True)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    for got, want, epi, epi_want, total, waves in out["gemm"]:
        assert got == pytest.approx(want) and got > 0 and waves >= 1
        assert epi == pytest.approx(epi_want) and total == pytest.approx(got + epi)
    assert [row[2] > 0 for row in out["gemm"]] == [False, False, True]
    q = out["quant"]
    for got, want in q.values():
        assert got == pytest.approx(want) and got > 0
    assert len({got for got, _ in q.values()}) == 3  # each variant its own compiled code
    assert q["modulation"][0] > q[""][0]  # the statistics pass
    cols = out["cols"]
    assert cols["W4A8 GEMM"] == pytest.approx(sum(row[0] for row in out["gemm"]))
    assert cols["quantize_act_fp8 (+prologue)"] == pytest.approx(sum(got for got, _ in q.values()))
    assert len(out["a40"]) == 2 and all("Hopper" in t for t in out["a40"])
