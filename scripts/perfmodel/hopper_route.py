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
(issue 27) instead; ``takes_w4a8`` reads that decision the same way (sm_90, the W4A8 GEMM's
self-check taken as passed). The image model does not price W4A8 calls yet: its trace
(perfmodel.image_trace, on meta) takes the W4A4 route everywhere.
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
    "int8" (gemm.py, the epilogue in the kernel); ``split`` the ws kernel's K-split of its last wave
    (gemm_sm90_ws_split.Split) or None; ``out_dtype`` what the kernel writes; ``epilogue_bytes`` the
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


def takes_w4a8(m: int, k: int, n: int, *, rank: int = 32, group: int = 64) -> bool:
    """Whether an H100 runs a W4A4 linear's call of M rows (weight [N, K], low-rank width
    ``rank``, ``group``-channel scales) as W4A8: kernels.w4a8_route itself on meta tensors, with
    the triton backend serving (as auto chooses it on an H100), the architecture read as sm_90
    and the W4A8 GEMM's self-check taken as passed."""
    import engine.kernels as kernels
    import engine.kernels.triton_backend as tb
    from engine.kernels.triton import gemm_sm90_w4a8

    meta = {"device": "meta"}
    x = torch.empty(m, k, dtype=torch.bfloat16, **meta)
    qweight = torch.empty(n, k // 2, dtype=torch.uint8, **meta)
    wscales = torch.empty(k // group, n, dtype=torch.bfloat16, **meta).t()
    proj_up = torch.empty(n, rank, dtype=torch.bfloat16, **meta)
    patches = [
        mock.patch.object(tb, "_major", lambda device: 9),
        mock.patch.object(gemm_sm90_w4a8, "serves", lambda device: True),
        mock.patch.object(kernels, "backend_for", lambda device: tb),
        mock.patch.object(kernels, "_settings", {"current": kernels.KernelConfig()}),  # auto, w4a8 auto
    ]
    with contextlib.ExitStack() as stack:
        for p in patches:
            stack.enter_context(p)
        return kernels.w4a8_route(x, qweight, wscales, proj_up)
