"""Pricing one image's traced ops and its stages (every figure MODELLED): our kernels from their
compiled code through the kernel models, 16-bit matmuls and convolutions by roofline, attention
by FLOPs, everything else by its bytes, at the stated efficiencies below (perfmodel.image)."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch

from perfmodel.devices import IMAGE_PEAKS as DEVICES
from perfmodel.image_trace import Op

# Stated efficiencies (fractions of the peaks above): what the model assumes, in one place.
EFF = {
    "matmul": 0.70,  # cuBLAS bf16 on large shapes (the kernel models' baseline)
    "conv": 0.50,  # cuDNN bf16 implicit GEMM, 3x3 convolutions of the VAE
    "attention": {"A40": 0.60, "H100 SXM": 0.35},  # FA2 through SDPA: tuned for Ampere, not Hopper
    "dram": 0.80,  # elementwise and reduction kernels, of DRAM bandwidth
    "compiled_glue": 0.50,  # torch.compile: fraction of the eager glue bytes left after fusion
}
LAUNCH_US = 4.0  # per kernel launch that the GPU waits for: eager small ops, CPU-bound
CPU_BPS = 4e9  # single-threaded numpy elementwise pass on the host (bytes read + written per s)

OUR_OPS = ("svdq.", "count_launches.flash_attention")
EPILOGUE_COL = "GEMM epilogue kernel (H100)"


class KernelTimes:
    """Our kernels' modelled times from their compiled code, through the kernel models' readers."""

    def __init__(self) -> None:
        from perfmodel import cuda as km_cuda
        from perfmodel.devices import DEVICES as TRITON_DEVICES

        self.cuda = km_cuda
        self.devices = {d.name: d for d in TRITON_DEVICES}
        self._cache: dict = {}

    @functools.cached_property
    def cuda_report(self):
        """The CUDA kernels' static report (nvcc + cuobjdump), made once, when the A40 is priced."""
        return self.cuda.analyse("86")

    def _triton_gemm(self, m: int, k: int, n: int, unsigned: bool, epilogue: bool = False) -> float:
        import engine.kernels.triton_backend as tb
        from perfmodel.launches import gemm_launch
        from perfmodel.loops import compile_sass
        from perfmodel.triton_model import model_gemm

        dev = self.devices["H100 SXM"]
        cfg = tb.gemm_config(9, m)
        _, args, kwargs = gemm_launch(m, k, n, 9, cfg, unsigned, gated=epilogue)
        info = compile_sass(tb.w4a4_gemm_kernel, args, kwargs, 90)
        return model_gemm(m, k, n, dev, info, cfg)["us"] * 1e-6

    def _triton_act(self, m: int, k: int) -> float:
        import engine.kernels.triton_backend as tb
        from engine.kernels.triton.act import ACT_CONFIGS
        from perfmodel.launches import act_launch
        from perfmodel.loops import compile_sass
        from perfmodel.triton_model import model_act

        dev = self.devices["H100 SXM"]
        _, args, kwargs = act_launch(m, k, 9)
        info = compile_sass(tb.quantize_act_kernel, args, kwargs, 90)
        return model_act(m, k, dev, info, ACT_CONFIGS[9])["us"] * 1e-6

    def hopper_gemm(self, op: Op) -> dict[str, float]:
        """One traced w4a4_gemm call on the H100, priced as the dispatch routes it (perfmodel.
        hopper_route): the warp-specialized kernel (plain or its last wave split in K:
        perfmodel.hopper_ws) or the FP8 kernel (perfmodel.hopper), both at the calibrated L2 figure,
        writing what the route writes (fp32 where an epilogue follows); then the epilogue kernel
        (engine/kernels/triton/epilogue.py) as one DRAM pass over the bytes it moves, at the stated
        DRAM efficiency. Seconds per column: {"W4A4 GEMM": kernel, EPILOGUE_COL: epilogue kernel}."""
        from perfmodel.hopper_route import route

        r = route(op.args)
        split = (r.split.full, r.split.slices, r.split.slice_groups) if r.split is not None else None
        key = ("h100", r.kernel, r.m, r.k, r.n, r.rank, r.unsigned, r.out_dtype, split)
        if key not in self._cache:
            if r.kernel == "int8":  # the epilogue in the kernel: its code, and its reads as on the A40
                reads = _epilogue_reads(op)
                t = self._triton_gemm(r.m, r.k, r.n, r.unsigned, reads > 0) + dram_s(reads, "H100 SXM")
            else:
                t = self._hopper_kernel(r, split)
            self._cache[key] = t
        return {"W4A4 GEMM": self._cache[key], EPILOGUE_COL: dram_s(r.epilogue_bytes, "H100 SXM")}

    def _hopper_kernel(self, r, split: tuple | None) -> float:
        from engine.kernels.triton import gemm_sm90
        from perfmodel.hopper import sm90_entry, sm90_model
        from perfmodel.hopper_calibration import DEFAULT_L2
        from perfmodel.hopper_ws import ws_model, ws_static

        if r.kernel == "fp8":
            e = sm90_entry(r.m, r.k, r.n, gemm_sm90.sm90_config(r.m), r.unsigned, r.out_dtype, r.rank)
            return sm90_model(e, DEFAULT_L2, 0.0)["gemm_us"] * 1e-6
        e = ws_static(r.m, r.k, r.n, r.unsigned, rank=r.rank, out_dtype=r.out_dtype)
        mod = ws_model(e, DEFAULT_L2, 0.0)
        s = mod["split"]
        # the model prices the split gemm_sm90_ws.plan gives; the dispatch's must be that one
        if s["planned"] != (split is not None) or (split is not None and tuple(s["candidate"]) != split):
            raise ValueError(f"ws split at M={r.m} K={r.k} N={r.n}: dispatch {split}, model {s}")
        return (s["gemm_us"] if split is not None else mod["gemm_us"]) * 1e-6

    def hopper_w4a8_gemm(self, op: Op) -> dict[str, float]:
        """One traced w4a8_gemm call on the H100, priced as the dispatch runs it (perfmodel.
        hopper_route.w4a8_route): the W4A8 kernel (gemm_sm90_w4a8 at its CONFIG tile) by perfmodel.
        hopper_w4a8's model of its compiled loop at the call's M, K, N (waves of the persistent grid,
        the DRAM floor; the split of its last wave where the dispatch plans one: the model must price
        that very split), at the calibrated L2 figure; then the epilogue kernel, as ``hopper_gemm``
        prices it. Seconds per column: {"W4A8 GEMM": kernel, EPILOGUE_COL: epilogue kernel}."""
        from perfmodel.hopper_route import w4a8_route

        r = w4a8_route(op.args)
        split = (r.split.full, r.split.slices, r.split.slice_groups) if r.split is not None else None
        key = ("h100 w4a8", r.m, r.k, r.n, split)
        if key not in self._cache:
            self._cache[key] = self._w4a8_kernel(r.m, r.k, r.n, split)
        return {"W4A8 GEMM": self._cache[key], EPILOGUE_COL: dram_s(r.epilogue_bytes, "H100 SXM")}

    @functools.cached_property
    def _w4a8_loop(self) -> tuple[dict, dict]:
        """The W4A8 GEMM's compiled loop (its launcher's CONFIG tile) and its per-group terms."""
        from engine.kernels.triton import gemm_sm90_w4a8
        from perfmodel import hopper_w4a8
        from perfmodel.hopper_calibration import DEFAULT_L2

        cfg = gemm_sm90_w4a8.CONFIG
        e = hopper_w4a8.compiled_gemm(hopper_w4a8.Tile("served", cfg.block_w, cfg.block_t, cfg.stages))
        if e is None:
            raise RuntimeError("gemm_sm90_w4a8 did not compile at its CONFIG: the W4A8 GEMM is not priced")
        return e, hopper_w4a8.group_terms(e, DEFAULT_L2)

    def _w4a8_kernel(self, m: int, k: int, n: int, split: tuple | None) -> float:
        from perfmodel import hopper_w4a8
        from perfmodel.hopper_calibration import DEFAULT_L2

        e, g = self._w4a8_loop
        t = hopper_w4a8.gemm_time(e, g, m, k, n, DEFAULT_L2)
        if split is None:
            return t["gemm_us"] * 1e-6
        s = t["split"]
        if s.get("candidate") is None or tuple(s["candidate"]) != split:
            raise ValueError(f"w4a8 split at M={m} K={k} N={n}: dispatch {split}, model {s.get('candidate')}")
        return s["gemm_us"] * 1e-6

    def quantize_fp8(self, m: int, k: int, prologue: str, rank: int) -> float:
        """The W4A8 quantizer (engine/kernels/triton/act_fp8.py) on the H100: its sm_90 SASS for
        this prologue ("", "modulation" or "gelu") through perfmodel.act_fp8.model_act_fp8."""
        key = ("act_fp8", m, k, prologue, rank)
        if key not in self._cache:
            from engine.kernels.triton.act_fp8 import ACT_FP8_CONFIGS
            from perfmodel.act_fp8 import compile_act_fp8, model_act_fp8

            info = compile_act_fp8(k, prologue, m=m, rank=rank)
            t = model_act_fp8(m, k, self.devices["H100 SXM"], info, ACT_FP8_CONFIGS[9])["us"]
            self._cache[key] = t * 1e-6
        return self._cache[key]

    def gemm(self, device: str, m: int, k: int, n: int, unsigned: bool, epilogue: bool = False) -> float:
        """The A40's CUDA kernel at (M, K, N); ``epilogue``: the kernel with the partial/gate/residual
        epilogue compiled in (its extra instructions; the image model adds its extra reads). The
        H100's calls are priced per call as routed (``hopper_gemm``)."""
        if device != "A40":
            raise ValueError(f"gemm prices the A40's kernel; on {device} use hopper_gemm (the routed kernel)")
        key = ("gemm", device, m, k, n, unsigned, epilogue)
        if key not in self._cache:
            variant = "s4+epilogue" if epilogue else "s4"
            self._cache[key] = (
                self.cuda.model_gemm(self.cuda_report, m, k, n, variant=variant)["time_us"] * 1e-6
            )
        return self._cache[key]

    def quantize(self, device: str, m: int, k: int) -> float:
        key = ("act", device, m, k)
        if key not in self._cache:
            if device == "A40":
                t = self.cuda.model_quant(self.cuda_report, m, k)["time_us"] * 1e-6
            else:
                t = self._triton_act(m, k)
            self._cache[key] = t
        return self._cache[key]


def dram_s(nbytes: float, device: str) -> float:
    return nbytes / (EFF["dram"] * DEVICES[device]["dram"])


def attention_flops(q_shape: tuple[int, ...], k_shape: tuple[int, ...]) -> tuple[int, int]:
    """(QK^T FLOPs, PV FLOPs) of one attention on [B, S, H, D] (or [B, H, S, D] with H < S)."""
    b, s_q, h, d = q_shape
    s_k = k_shape[1]
    if h > s_q:  # [B, H, S, D]
        h, s_q, s_k = s_q, h, k_shape[2]
    return 2 * b * h * s_q * s_k * d, 2 * b * h * s_q * s_k * d


def classify(op: Op) -> str:
    """The stage column an op belongs to."""
    n = op.name
    if n == "svdq.w4a4_gemm":
        return "W4A4 GEMM"
    if n in ("svdq.quantize_act", "svdq.quantize_act_prologue"):
        return "quantize_act (+prologue)"
    if n == "svdq.w4a8_gemm":
        return "W4A8 GEMM"
    if n == "svdq.quantize_act_fp8":
        return "quantize_act_fp8 (+prologue)"
    if n == "svdq.w4a16_gemv":
        return "AdaLN GEMV (W4A16)"
    if n in ("svdq.qk_norm_rope", "svdq.qk_norm_rope_sage"):
        return "qk_norm_rope"
    if n in ("count_launches.flash_attention", "svdq.sage_attention_int8"):
        return "attention"
    if op.flops:
        return "16-bit matmul / conv"
    return "glue (elementwise, copies)"


def _epilogue_reads(op: Op) -> int:
    """Bytes of a w4a4_gemm call's partial, residual and gate (args 7-9)."""
    return sum(t.numel() * t.element_size() for t in op.args[7:10] if isinstance(t, torch.Tensor))


def price_parts(
    op: Op, device: str, kt: KernelTimes | None, *, compiled: bool, sage: bool
) -> dict[str, float]:
    """Modelled seconds of one op on ``device`` per stage column (one column but for a W4A4 GEMM
    on the H100, whose dispatch may run the epilogue as torch ops after the kernel)."""
    if op.name == "svdq.w4a4_gemm" and device == "H100 SXM":
        return kt.hopper_gemm(op)
    if op.name == "svdq.w4a8_gemm":
        _h100_only(op, device)
        return kt.hopper_w4a8_gemm(op)
    return {classify(op): price(op, device, kt, compiled=compiled, sage=sage)}


def price(op: Op, device: str, kt: KernelTimes | None, *, compiled: bool, sage: bool) -> float:
    """Modelled seconds of one op on ``device``."""
    hw, n = DEVICES[device], op.name
    if n == "svdq.w4a4_gemm":
        if device == "H100 SXM":
            return sum(kt.hopper_gemm(op).values())
        qx, qweight = op.args[0], op.args[2]
        m, k, nn = qx.shape[0], 2 * qx.shape[1], qweight.shape[0]
        # (..., bias, partial, residual, gate, unsigned, out_dtype): the epilogue's reads of partial,
        # residual and gate at DRAM speed on top of the kernel's modelled time (not overlapped)
        epilogue = _epilogue_reads(op)
        return kt.gemm(device, m, k, nn, bool(op.args[10]), epilogue > 0) + dram_s(epilogue, device)
    if n == "svdq.w4a8_gemm":
        _h100_only(op, device)
        return sum(kt.hopper_w4a8_gemm(op).values())
    if n == "svdq.quantize_act_fp8":
        _h100_only(op, device)
        x, proj_down = op.args[0], op.args[2]
        return kt.quantize_fp8(x.shape[0], x.shape[1], fp8_prologue(op), proj_down.shape[0])
    if n == "svdq.quantize_act":
        x = op.args[0]
        return kt.quantize(device, x.shape[0], x.shape[1])
    if n == "svdq.quantize_act_prologue":
        # the plain kernel's time plus the prologue's extra pass over x (LayerNorm statistics)
        x = op.args[0]
        extra = 2 * x.numel() if op.args[3] is not None else 0
        return kt.quantize(device, x.shape[0], x.shape[1]) + dram_s(extra, device)
    if n == "svdq.w4a16_gemv":
        return dram_s(op.in_bytes + op.out_bytes, device)  # at its DRAM time on the A40 (kernel_model_triton)
    if n == "svdq.qk_norm_rope":
        # reads q | k | v (not the rest of a single block's projection) and the RoPE tables, writes
        # q, k, v: kernel_model_rope.py's minimum, which its access check shows the kernel moves
        tables = sum(t.numel() * t.element_size() for t in op.args[6:8] if isinstance(t, torch.Tensor))
        return dram_s(2 * op.out_bytes + tables, device)
    if n == "svdq.qk_norm_rope_sage":
        # the rope launch (q|k in; q8, k, its block sums out; V untouched) and K's quantize pass
        # (k and the sums in, k8 out): kernel_model_rope.py's sage_bytes
        return dram_s(qk_norm_rope_sage_bytes(op)["fused_total"], device)
    if n == "svdq.sage_attention_int8":
        # our port of SageAttention's kernel on the prepared int8 Q/K, V read in place in bf16 (the
        # same bytes as sage's fp16 copy; its conversion's instructions not priced), no passes
        qk, pv = attention_flops(tuple(op.args[0].shape), tuple(op.args[2].shape))
        eff = EFF["attention"][device]
        return qk / (eff * hw["int8"]) + pv / (eff * hw["bf16"])
    if n == "count_launches.flash_attention":
        q, k = op.args[0], op.args[1]
        qk, pv = attention_flops(tuple(q.shape), tuple(k.shape))
        if not sage:
            return (qk + pv) / (EFF["attention"][device] * hw["bf16"])
        # SageAttention 1.0.6 (Triton): QK^T at the int8 rate, PV in fp16 (the bf16 rate on both
        # GPUs, whatever the accumulator), at the same fraction of peak as the device's SDPA
        eff = EFF["attention"][device]
        t = qk / (eff * hw["int8"]) + pv / (eff * hw["bf16"])
        return t + dram_s(sage_prep_bytes(op), device)
    if op.flops:
        eff = EFF["conv"] if "conv" in n else EFF["matmul"]
        return max(op.flops / (eff * hw["bf16"]), (op.in_bytes + op.out_bytes) / hw["dram"])
    nbytes = op.in_bytes + op.out_bytes
    if compiled:
        return EFF["compiled_glue"] * dram_s(nbytes, device)
    return max(dram_s(nbytes, device), LAUNCH_US * 1e-6)


def fp8_prologue(op: Op) -> str:
    """A traced quantize_act_fp8 call's prologue variant (args: x, smooth, proj_down, mod_scale,
    mod_shift, shift, gelu): "modulation", "gelu" or "" (plain), as perfmodel.act_fp8 compiles them."""
    modulated, gelu = op.args[3] is not None, bool(op.args[6])
    if modulated and gelu:
        raise ValueError("quantize_act_fp8 call with both prologues (modulation and gelu): not a kernel variant")
    return "modulation" if modulated else "gelu" if gelu else ""


def _h100_only(op: Op, device: str) -> None:
    """The W4A8 ops are the sm_90 route's: only the H100's trace issues them."""
    if device != "H100 SXM":
        raise ValueError(f"{op.name} priced on {device}: the W4A8 route runs on Hopper (sm_90) only")


def sage_prep_bytes(op: Op) -> int:
    """SageAttention 1.0.6's passes before its kernel (engine/flux/attention.py): K's mean (read K),
    K minus it (read, write), V to fp16 (read, write), Q and K to int8 per block (read, write 1 B)."""
    q = op.args[0]
    t = q.numel() * q.element_size()
    return t + 2 * t + 2 * t + 2 * (t + t // 2)


def qk_norm_rope_sage_bytes(op: Op) -> dict:
    """perfmodel.rope.sage_bytes at a traced svdq.qk_norm_rope_sage call's shape: its two launches'
    bytes (``fused_total``) and those of qk_norm_rope + sageattn's passes it replaced."""
    from perfmodel.rope import sage_bytes

    qkv0, norm_q0, qkv1, heads = op.args[0], op.args[1], op.args[3], op.args[8]
    s = qkv0.shape[1] + (qkv1.shape[1] if qkv1 is not None else 0)
    return sage_bytes(s, heads, norm_q0.shape[0], qkv0.shape[0], qkv0.element_size())


# --- stages --------------------------------------------------------------------------------------------


@dataclass
class Stage:
    name: str
    seconds: dict[str, float]  # device -> s
    detail: dict[str, dict[str, float]] = field(default_factory=dict)  # device -> column -> s


def stage(
    name: str, ops: list[Op] | dict[str, list[Op]], kt, *, compiled: bool, sage: bool, repeat: int = 1
) -> Stage:
    """One stage priced on every device; ``ops``: one trace for all, or a trace per device (the
    transformer's: the H100 traced with its W4A8 route, the A40 without)."""
    st = Stage(name, {}, {})
    for device in DEVICES:
        cols: dict[str, float] = {}
        for op in ops[device] if isinstance(ops, dict) else ops:
            for col, t in price_parts(op, device, kt, compiled=compiled, sage=sage).items():
                cols[col] = cols.get(col, 0.0) + repeat * t
        st.detail[device] = cols
        st.seconds[device] = sum(cols.values())
    return st


def post_bytes(batch: int, size: int) -> dict[str, float]:
    """Bytes of the post-processing as the code runs it, and as diffusers' own path ran it before.

    Now (engine.pipeline.to_pil): on the GPU, eager, bf16 -> float32, x 255, round, -> uint8 (27 B per
    value); one byte per value to the host; PIL's copy. The safety checker's input (engine/safety.py,
    on the host): np.asarray(float32) / 255 per image (13 B per value) and CLIPImageProcessor's pass
    over the uint8 image (read it, write float32: 5 B per value; its 224-pixel output is negligible).
    Before: the float32 image to the host (4 B per value), then permute, x 255, round, astype (29 B).
    The safety checker's input prepared on the GPU instead (engine.safety_input): read the uint8 image,
    write it as float32, the first resize pass reads that (1 + 4 + 4 B per value); the rest works on
    images a fifth the size or less (the first pass shrinks one side to 224 of >= 512), about 1 B more."""
    px = batch * 3 * size * size
    return {
        "gpu": 27 * px,
        "to_host": px,
        "host_pil": px,
        "host_safety": 13 * px + 5 * px,
        "gpu_safety": 10 * px,
        "before_to_host": 4 * px,
        "before_host": (8 + 8 + 8 + 5) * px,
    }


def postprocess_stage(batch: int, size: int, *, safety_on_gpu: bool = False) -> Stage:
    """To uint8 on the GPU (engine.pipeline.to_uint8), then the safety checker's input prepared on the
    host, or (``safety_on_gpu``) on the GPU (engine.safety_input)."""
    b = post_bytes(batch, size)
    seconds, detail = {}, {}
    for d, hw in DEVICES.items():
        gpu = dram_s(b["gpu"] + (b["gpu_safety"] if safety_on_gpu else 0), d) + b["to_host"] / hw["pcie"]
        host = (b["host_pil"] + (0 if safety_on_gpu else b["host_safety"])) / CPU_BPS
        seconds[d], detail[d] = gpu + host, {"GPU + copy": gpu, "CPU": host}
    where = "GPU" if safety_on_gpu else "CPU"
    return Stage(f"post-processing (GPU) + safety input ({where})", seconds, detail)
