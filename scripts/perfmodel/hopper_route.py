"""Which kernel an H100 runs for one traced ``svdq.w4a4_gemm`` call, read from the dispatch itself.

Why: on Hopper (sm_90) the Triton backend's ``w4a4_gemm`` (engine/kernels/triton_backend.py) sends
a call to the warp-specialized Gluon kernel (gemm_sm90_ws, with its last wave split in K where
gemm_sm90_ws.split_for plans it), to the FP8 kernel (gemm_sm90), or to the int8 kernel (gemm.py),
by the call's M, K, N, rank, scale layout and epilogue; and on the first two it writes fp32 and
runs the partial/gate/residual epilogue after the kernel as one elementwise kernel
(engine/kernels/triton/epilogue.py, bit for bit ops.gemm_epilogue). Rather
than restate those rules, ``route`` runs that very function on the call's meta tensors with:

- the architecture read as sm_90 (``triton_backend._major``, as the kernel models patch it);
- the on-device self-checks taken as passed (gemm_sm90.serves, gemm_sm90_ws.serves and its split
  grid's check): an assumption, that the kernels are right on the H100 they would serve;
- the SM count of an H100 SXM (perfmodel.devices.H100) for the split's plan;
- the four launchers replaced by recorders (nothing is compiled or run); the epilogue kernel's
  records the bytes it moves (epilogue.bytes_moved of the tensors the dispatch passes it).

The H100 runs the Triton backend: the CUDA extension serves compute capability 8.x only
(engine.kernels.cuda.SUPPORTED_ARCHS; tests/test_hopper_route.py checks it).

Above that dispatch, ``kernels.w4a8_route`` decides per call whether a W4A4 linear runs as W4A8
(issue 27) instead. ``h100_w4a8`` is that decision as an H100 makes it (the triton backend
serving, sm_90, the W4A8 GEMM's self-checks taken as passed), in one place: ``takes_w4a8`` asks
it for one linear, and the image model traces its H100 column's transformer under it
(perfmodel.image_trace), so that the traced calls are the ops the H100 runs (quantize_act_fp8 +
w4a8_gemm for the image stream, M >= the route's minimum; quantize_act + w4a4_gemm for the rest).
``w4a8_route`` reads a traced ``svdq.w4a8_gemm`` call's dispatch (triton_backend.w4a8_gemm) as
``route`` reads w4a4_gemm's: the kernel's launch recorded with the split it is given (where
gemm_sm90_w4a8 plans one), the epilogue kernel's bytes where one follows.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from unittest import mock

import torch

from perfmodel.devices import H100


@dataclass
class Route:
    """What the dispatch runs for one call: ``kernel`` "ws" (gemm_sm90_ws), "fp8" (gemm_sm90) or
    "int8" (gemm.py, the epilogue in the kernel), or for a w4a8_gemm call "w4a8" (gemm_sm90_w4a8);
    ``split`` the ws (or W4A8) kernel's K-split of its last wave (gemm_sm90_ws_split.Split) or None; ``out_dtype`` what the kernel writes; ``epilogue_bytes`` the
    DRAM bytes of the epilogue kernel the dispatch runs after it (0 where there is none)."""

    kernel: str
    m: int
    k: int
    n: int
    rank: int
    unsigned: bool
    out_dtype: torch.dtype
    split: object = None
    epilogue_bytes: int = 0


def route(args: tuple) -> Route:
    """The route of a traced ``svdq.w4a4_gemm`` call (its args: qx, ascales, qweight, wscales,
    lora_act, proj_up, bias, partial, residual, gate, unsigned, out_dtype) on an H100."""
    import engine.kernels.triton_backend as tb
    from engine.kernels.triton import gemm_sm90, gemm_sm90_ws
    from engine.kernels.triton.epilogue import bytes_moved

    qx, qweight, lora_act = args[0], args[2], args[4]
    m, k, n, rank = qx.shape[0], 2 * qx.shape[1], qweight.shape[0], lora_act.shape[1]
    seen: dict = {"kernel": [], "epilogue": 0}

    def launcher(kind: str):
        def record(*a, **kw):
            seen["kernel"].append((kind, kw))
            return torch.empty(m, n, dtype=kw["out_dtype"], device="meta")

        return record

    def epilogue(acc, partial, residual, gate, out_dtype):
        gate_rows = gate.shape[0] if residual is not None else 0
        seen["epilogue"] += bytes_moved(m, n, out_dtype, partial is not None, residual is not None, gate_rows)
        return torch.empty(m, n, dtype=out_dtype, device="meta")
    patches = [
        mock.patch.object(tb, "_major", lambda device: 9),
        mock.patch.object(gemm_sm90, "serves", lambda device: True),
        mock.patch.object(gemm_sm90_ws, "serves", lambda device: True),
        mock.patch.object(gemm_sm90_ws, "_serves", lambda device, split=False: True),
        mock.patch.object(gemm_sm90_ws, "_sm_count", lambda device: H100.sms),
        mock.patch.object(gemm_sm90, "launch", launcher("fp8")),
        mock.patch.object(gemm_sm90_ws, "launch", launcher("ws")),
        mock.patch.object(tb, "launch_w4a4_gemm", launcher("int8")),
        mock.patch.object(tb, "sm90_epilogue", epilogue),
    ]
    with contextlib.ExitStack() as stack, torch.no_grad():
        for p in patches:
            stack.enter_context(p)
        tb.w4a4_gemm(*args[:10], unsigned=args[10], out_dtype=args[11])
    (kind, kw), = seen["kernel"]  # fmt: skip
    return Route(kind, m, k, n, rank, bool(args[10]), kw["out_dtype"], kw.get("split"), seen["epilogue"])


@contextlib.contextmanager
def h100_w4a8():
    """kernels.w4a8_route as an H100 decides it, for the block's duration: the triton backend
    serving (auto's choice on sm_90: the CUDA extension serves 8.x only), the architecture read as
    sm_90, the W4A8 GEMM's self-check taken as passed, the kernel config auto (w4a8 "auto"). Only
    the route's decision is patched: the ops' meta (fake) implementations are what a trace runs."""
    import engine.kernels as kernels
    import engine.kernels.triton_backend as tb
    from engine.kernels.triton import gemm_sm90_w4a8

    patches = [
        mock.patch.object(tb, "_major", lambda device: 9),
        mock.patch.object(kernels, "backend_for", lambda device: tb),
        mock.patch.object(kernels, "_settings", {"current": kernels.KernelConfig()}),  # auto, w4a8 auto
        mock.patch.object(gemm_sm90_w4a8, "serves", lambda device: True),
    ]
    with contextlib.ExitStack() as stack:
        for p in patches:
            stack.enter_context(p)
        yield


def takes_w4a8(m: int, k: int, n: int, *, rank: int = 32, group: int = 64) -> bool:
    """Whether an H100 runs a W4A4 linear's call of M rows (weight [N, K], low-rank width
    ``rank``, ``group``-channel scales) as W4A8: kernels.w4a8_route itself on meta tensors under
    ``h100_w4a8``."""
    import engine.kernels as kernels

    meta = {"device": "meta"}
    x = torch.empty(m, k, dtype=torch.bfloat16, **meta)
    qweight = torch.empty(n, k // 2, dtype=torch.uint8, **meta)
    wscales = torch.empty(k // group, n, dtype=torch.bfloat16, **meta).t()
    proj_up = torch.empty(n, rank, dtype=torch.bfloat16, **meta)
    with h100_w4a8():
        return kernels.w4a8_route(x, qweight, wscales, proj_up)


def w4a8_min_m() -> int:
    """The smallest M an H100 runs as W4A8 (kernels.w4a8_min_m under ``h100_w4a8``)."""
    import engine.kernels as kernels

    with h100_w4a8():
        return kernels.w4a8_min_m(torch.device("meta"))


def w4a8_route(args: tuple) -> Route:
    """What an H100 runs for a traced ``svdq.w4a8_gemm`` call (its args: codes, ascale, qweight,
    wscales, lora_act, proj_up, bias, partial, residual, gate, out_dtype): the triton backend's
    ``w4a8_gemm`` run on the call's meta tensors with the architecture read as sm_90, the GEMM's
    self-checks taken as passed, the SM count of an H100 SXM for its persistent grid (and the
    split's plan, where the kernel has one), its launch and the epilogue kernel recorded. The
    Route's ``kernel`` is "w4a8"; it raises where the dispatch would not run the W4A8 kernel (the
    reference's arithmetic: not an H100's route)."""
    import engine.kernels.triton_backend as tb
    from engine.kernels.triton import gemm_sm90_w4a8 as gemm
    from engine.kernels.triton.epilogue import bytes_moved

    codes, qweight, lora_act = args[0], args[2], args[4]
    m, k, n, rank = codes.shape[0], codes.shape[1], qweight.shape[0], lora_act.shape[1]
    seen: dict = {"kernel": [], "epilogue": 0}

    def launch(*a, **kw):
        seen["kernel"].append(kw)
        return torch.empty(m, n, dtype=kw["out_dtype"], device="meta")

    def epilogue(acc, partial, residual, gate, out_dtype):
        gate_rows = gate.shape[0] if residual is not None else 0
        seen["epilogue"] += bytes_moved(m, n, out_dtype, partial is not None, residual is not None, gate_rows)
        return torch.empty(m, n, dtype=out_dtype, device="meta")

    def reference(*a, out_dtype, **kw):
        seen["reference"] = True
        return torch.empty(m, n, dtype=out_dtype, device="meta")

    patches = [
        mock.patch.object(tb, "_major", lambda device: 9),
        mock.patch.object(tb.ops, "w4a8_gemm", reference),
        mock.patch.object(gemm, "serves", lambda device: True),
        mock.patch.object(gemm, "_sm_count", lambda device: H100.sms),
        mock.patch.object(gemm, "launch", launch),
        mock.patch.object(tb, "sm90_w4a8_weight", lambda qweight, wscales: None),  # made at load, not priced
        mock.patch.object(tb, "sm90_epilogue", epilogue),
    ]
    if hasattr(gemm, "_serves"):  # the split grid's own self-check (with gemm_sm90_w4a8's split-K)
        patches.append(mock.patch.object(gemm, "_serves", lambda device, split=False: True))
    with contextlib.ExitStack() as stack, torch.no_grad():
        for p in patches:
            stack.enter_context(p)
        tb.w4a8_gemm(*args[:10], out_dtype=args[10])
    if seen.get("reference") or len(seen["kernel"]) != 1:
        raise ValueError(
            f"w4a8_route: the dispatch ran the reference at M={m} K={k} N={n} rank={rank}, not the kernel"
        )
    (kw,) = seen["kernel"]
    return Route("w4a8", m, k, n, rank, False, kw["out_dtype"], kw.get("split"), seen["epilogue"])
